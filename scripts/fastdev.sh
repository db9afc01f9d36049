#!/usr/bin/env bash
# RAM-backed test file systems for benchmarks and tests: XFS, ext4 or btrfs on a loop device
# over an image file in a tmpfs of its own (DESIGN.md's fast-device regime: the CPU per byte
# decides, not the disk), or a plain tmpfs mount.
#
#   scripts/fastdev.sh up FS [--size 6GiB] [--dir /mnt/uring-ckpt-FS]   # prints the mount point
#   scripts/fastdev.sh down FS|all      # unmounts, detaches the loop device, frees the memory
#   scripts/fastdev.sh status           # what is up, where, on which device, how full
#
# FS is xfs, ext4, btrfs or tmpfs. SIZE takes K/M/G/T with or without "iB" (default 6GiB;
# XFS needs at least 300MiB, btrfs 128MiB). The image is sparse: memory is taken as the file
# system fills, up to SIZE, and given back by `down`. `up` refuses unless SIZE + 1GiB of
# memory is available (MemAvailable), and installs the mkfs tool it needs with apt-get when it
# is missing. Both commands are idempotent: `up` of a file system that is up prints its mount
# point again, `down` of one that is not up does nothing. A failed `up` undoes what it did.
# The mount point is mode 1777 so that unprivileged benchmarks can write to it.
# State (what to undo) is kept in /run/uring-ckpt-fastdev/FS.state; the tmpfs that holds the
# image is mounted at /run/uring-ckpt-fastdev/FS.ram. Needs root.
#
# tmpfs note: Linux 6.6 and later accept O_DIRECT on tmpfs; older kernels refuse it (EINVAL)
# and uring-ckpt falls back to buffered writes, saying so in its report. A loop device takes
# O_DIRECT on any kernel, so xfs/ext4/btrfs here measure the direct-I/O path.
#
# Example (benchmark the fast-device regime, then free the memory):
#   mnt=$(sudo scripts/fastdev.sh up xfs --size 8GiB)
#   cargo run --release -- bench --size 2GiB --engine all --repeat 3 --dir "$mnt"
#   scripts/compare.sh --size 2GiB --dir "$mnt"
#   sudo scripts/fastdev.sh down xfs
set -euo pipefail

state_root=/run/uring-ckpt-fastdev
up_kind=""
kinds="xfs ext4 btrfs tmpfs"

say() { printf 'fastdev: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit "${1:-2}"
}

need_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (mount, losetup and mkfs need it): sudo $0 $*"
}

check_kind() {
  case " $kinds " in
    *" $1 "*) ;;
    *) die "unknown file system '$1' (expected one of: $kinds)" ;;
  esac
}

# Bytes of a size such as 6GiB, 512M, 300MiB or 1048576.
parse_size() {
  local text="${1,,}" num unit
  [[ "$text" =~ ^([0-9]+)([kmgt]?)(i?b)?$ ]] || die "bad size '$1' (examples: 6GiB, 512MiB, 300M)"
  num="${BASH_REMATCH[1]}"
  unit="${BASH_REMATCH[2]}"
  case "$unit" in
    "") echo "$num" ;;
    k) echo $((num << 10)) ;;
    m) echo $((num << 20)) ;;
    g) echo $((num << 30)) ;;
    t) echo $((num << 40)) ;;
  esac
}

human() { numfmt --to=iec-i --suffix=B "$1" 2>/dev/null || echo "$1 bytes"; }

# Installs the Debian package $2 when the command $1 is missing.
ensure_tool() {
  command -v "$1" >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || die "$1 is missing and apt-get is not available: install $2"
  say "installing $2 (for $1)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2") >&2 \
    || die "could not install $2 (for $1)"
  command -v "$1" >/dev/null 2>&1 || die "$2 is installed but $1 is still missing"
}

state_file() { echo "$state_root/$1.state"; }

# Appends KEY=VALUE to the state of file system $1 (each step records what to undo).
record() {
  printf '%s=%q\n' "$2" "$3" >>"$(state_file "$1")"
}

is_mounted() { mountpoint -q "$1" 2>/dev/null; }

# Undoes everything recorded for file system $1, newest first; silent when it is not up.
teardown() {
  local kind="$1" file MNT="" LOOP="" IMG="" RAM="" CREATED_DIR=""
  file="$(state_file "$kind")"
  [ -f "$file" ] || return 0
  # shellcheck disable=SC1090
  . "$file"
  if [ -n "$MNT" ] && is_mounted "$MNT"; then
    sync -f "$MNT" 2>/dev/null || true
    if ! umount "$MNT"; then
      say "$MNT is busy (see: fuser -vm $MNT); detaching it lazily, memory is freed when the last user goes"
      umount -l "$MNT" || say "could not unmount $MNT"
    fi
  fi
  if [ -n "$LOOP" ] && [ -n "$IMG" ]; then
    local backing
    backing="$(cat "/sys/block/${LOOP#/dev/}/loop/backing_file" 2>/dev/null || true)"
    if [ "${backing% (deleted)}" = "$IMG" ]; then
      losetup -d "$LOOP" || say "could not detach $LOOP"
    fi
  fi
  if [ -n "$IMG" ]; then
    rm -f "$IMG"
  fi
  if [ -n "$RAM" ]; then
    if is_mounted "$RAM"; then
      umount "$RAM" 2>/dev/null || umount -l "$RAM" || say "could not unmount $RAM"
    fi
    rmdir "$RAM" 2>/dev/null || true
  fi
  if [ -n "$CREATED_DIR" ] && [ -n "$MNT" ] && ! is_mounted "$MNT"; then
    rmdir "$MNT" 2>/dev/null || true
  fi
  rm -f "$file"
}

# EXIT trap of `up`: a failed or interrupted `up` undoes what it recorded.
on_up_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$rc" -ne 0 ] && [ -n "$up_kind" ]; then
    say "up $up_kind failed: cleaning up"
    set +e
    teardown "$up_kind"
  fi
  exit "$rc"
}

cmd_up() {
  local kind="" size_text="6GiB" dir=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --size) size_text="${2:?--size needs a value}"; shift 2 ;;
      --size=*) size_text="${1#--size=}"; shift ;;
      --dir) dir="${2:?--dir needs a value}"; shift 2 ;;
      --dir=*) dir="${1#--dir=}"; shift ;;
      -h|--help) usage 0 ;;
      -*) die "unknown option: $1" ;;
      *) [ -z "$kind" ] || die "one file system at a time"; kind="$1"; shift ;;
    esac
  done
  [ -n "$kind" ] || usage
  check_kind "$kind"
  need_root up "$kind"
  dir="${dir:-/mnt/uring-ckpt-$kind}"
  local bytes
  bytes="$(parse_size "$size_text")"
  case "$kind" in
    xfs) [ "$bytes" -ge $((300 << 20)) ] || die "XFS needs at least 300MiB (asked: $size_text)" ;;
    btrfs) [ "$bytes" -ge $((128 << 20)) ] || die "btrfs needs at least 128MiB (asked: $size_text)" ;;
    *) [ "$bytes" -ge $((16 << 20)) ] || die "size at least 16MiB (asked: $size_text)" ;;
  esac

  ensure_tool mountpoint util-linux
  mkdir -p "$state_root"
  local file
  file="$(state_file "$kind")"
  if [ -f "$file" ]; then
    local MNT="" SIZE=""
    # shellcheck disable=SC1090
    . "$file"
    if [ -n "$MNT" ] && is_mounted "$MNT" && [ "$(findmnt -n -o FSTYPE --target "$MNT")" = "$kind" ]; then
      [ "$MNT" = "$(realpath -m "$dir")" ] || say "$kind is already up at $MNT (not $dir)"
      [ "$SIZE" = "$bytes" ] || say "$kind is up with $(human "${SIZE:-0}"), not $(human "$bytes"): run down first to change it"
      say "$kind already up"
      echo "$MNT"
      return 0
    fi
    say "stale state for $kind: cleaning it up first"
    teardown "$kind"
  fi
  dir="$(realpath -m "$dir")"
  if is_mounted "$dir"; then
    die "$dir is already a mount point of something else ($(findmnt -n -o SOURCE,FSTYPE "$dir")): choose another --dir"
  fi

  local avail_kib reserve=$((1 << 30))
  avail_kib="$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)"
  if [ $((avail_kib * 1024)) -lt $((bytes + reserve)) ]; then
    die "not enough memory for a $(human "$bytes") RAM-backed $kind: needs $(human $((bytes + reserve))) available (size + 1GiB for everything else), have $(human $((avail_kib * 1024))); try a smaller --size"
  fi

  local mkfs=() pkg=""
  case "$kind" in
    xfs) mkfs=(mkfs.xfs -q -f); pkg=xfsprogs ;;
    # Inode tables and journal written now: no lazy-init thread writing during a benchmark.
    ext4) mkfs=(mkfs.ext4 -q -F -m 0 -E "lazy_itable_init=0,lazy_journal_init=0"); pkg=e2fsprogs ;;
    btrfs) mkfs=(mkfs.btrfs -q -f); pkg=btrfs-progs ;;
  esac
  if [ "$kind" != tmpfs ]; then
    ensure_tool "${mkfs[0]}" "$pkg"
    ensure_tool losetup mount
  fi

  # From here on a failure (or Ctrl-C) undoes what was recorded so far.
  up_kind="$kind"
  trap on_up_exit EXIT
  trap 'exit 130' INT TERM
  : >"$file"
  record "$kind" KIND "$kind"
  record "$kind" SIZE "$bytes"
  if [ ! -d "$dir" ]; then
    mkdir -p "$dir"
    record "$kind" CREATED_DIR 1
  fi
  record "$kind" MNT "$dir"
  if [ "$kind" = tmpfs ]; then
    mount -t tmpfs -o "size=$bytes,mode=1777" uring-ckpt-tmpfs "$dir"
  else
    local ram="$state_root/$kind.ram" img loop
    mkdir -p "$ram"
    record "$kind" RAM "$ram"
    # A tmpfs of its own for the image, a little larger than it, so that the image can never
    # fill /dev/shm or another user's tmpfs.
    mount -t tmpfs -o "size=$((bytes + (16 << 20))),mode=0700" "uring-ckpt-$kind-ram" "$ram"
    img="$ram/$kind.img"
    record "$kind" IMG "$img"
    truncate -s "$bytes" "$img"
    "${mkfs[@]}" "$img" >&2
    loop="$(losetup --find --show "$img")"
    record "$kind" LOOP "$loop"
    mount -t "$kind" "$loop" "$dir"
    chmod 1777 "$dir"
  fi
  trap - EXIT INT TERM
  say "$kind up: $(describe "$kind")"
  echo "$dir"
}

# One line about file system $1 from its state.
describe() {
  local MNT="" LOOP="" IMG="" RAM="" KIND=""
  # shellcheck disable=SC1090
  . "$(state_file "$1")"
  local line
  if ! is_mounted "$MNT"; then
    echo "$1: state says $MNT but it is not mounted (run: $0 down $1)"
    return
  fi
  line="$(df -h --output=size,used,avail "$MNT" | tail -n 1 | awk '{print $1" size, "$2" used, "$3" free"}')"
  if [ -n "$LOOP" ]; then
    echo "$MNT: $KIND on $LOOP over $IMG (tmpfs at $RAM: RAM-backed), $line"
  else
    echo "$MNT: tmpfs (RAM), $line"
  fi
}

cmd_down() {
  [ $# -eq 1 ] || usage
  local kind
  if [ "$1" = all ]; then
    need_root down all
    for kind in $kinds; do
      if [ -f "$(state_file "$kind")" ]; then
        teardown "$kind"
        say "$kind down"
      fi
    done
    return 0
  fi
  check_kind "$1"
  need_root down "$1"
  if [ ! -f "$(state_file "$1")" ]; then
    say "$1 is not up"
    return 0
  fi
  teardown "$1"
  say "$1 down"
}

cmd_status() {
  local kind any=0
  for kind in $kinds; do
    if [ -f "$(state_file "$kind")" ]; then
      describe "$kind"
      any=1
    fi
  done
  [ $any -eq 1 ] || echo "no fast devices up (scripts/fastdev.sh up xfs)"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  status) shift; cmd_status ;;
  -h|--help|help) usage 0 ;;
  *) usage ;;
esac
