#!/usr/bin/env bash
# Restores through the staging pool on a RAM-backed XFS (or --dir DIR), side by side with fio:
# in place, into a simulated device at two copy bandwidths, and into fresh memory; peak memory
# added against the staging pool + 64 MiB, and a simulated-device load's total time against
# max(read, copy). See scripts/bench-restore.py for the columns.
#
#   scripts/bench-restore.sh [--size 4GiB] [--repeat 3] [--fs xfs | --dir DIR] [--device-gib-s 2,8]
#
# Needs root for --fs (scripts/fastdev.sh); installs fio with apt-get when missing; builds the
# CLI (cargo build --release) unless --bin is given.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
size="4GiB"; repeat=3; fs="xfs"; dir=""; bws="2,8"; bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --fs) fs="$2"; shift 2 ;;
    --dir) dir="$2"; fs=""; shift 2 ;;
    --device-gib-s) bws="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
command -v fio >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq fio) >&2
if [ -z "$bin" ]; then
  (cd "$root" && cargo build --release --quiet)
  bin="$root/target/release/uring-ckpt"
fi
down=""
if [ -n "$fs" ]; then
  [ -f "/run/uring-ckpt-fastdev/$fs.state" ] || down="$fs"
  fs_size="$(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import compare; print(2 * compare.parse_size(sys.argv[2]) + (1 << 30))' "$root/scripts" "$size")"
  dir="$(bash "$root/scripts/fastdev.sh" up "$fs" --size "$fs_size")"
fi
trap '[ -z "$down" ] || bash "$root/scripts/fastdev.sh" down "$down"' EXIT
python3 "$root/scripts/bench-restore.py" --dir "$dir" --size "$size" --repeat "$repeat" \
  --device-gib-s "$bws" --bin "$bin" --out "$root/target/bench-restore"
