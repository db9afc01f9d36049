#!/usr/bin/env bash
# Load throughput of every peer side by side on one directory, in one run (issue 11, item 6):
# fio O_DIRECT io_uring read (bs 1M and 8M, qd32: the physical limit), safetensors load_file,
# torch.load, tensorizer, fastsafetensors (nogds, CPU), DCP FileSystemReader into an existing
# state dict, uring_ckpt.load, uring_ckpt.load_into (when the build has it) and the
# `uring-ckpt load` CLI (fresh, and --into host when it has it). --repeat rounds, round-robin, every load in a fresh process after
# dropping the page cache; medians, x fio read, x fastest peer, peak RSS.
#
#   scripts/bench-load.sh [--size 1GiB] [--dir DIR | --fs xfs|ext4|btrfs|tmpfs] [--out DIR]
#                         [--repeat 3] [--fs-size SIZE] [--bin PATH] [--python PY]
#                         [--methods a,b,...] [--touch page|full] [--keep]
#
# --fs KIND measures on a RAM-backed file system from scripts/fastdev.sh (root; sized
# 6 x SIZE + 1GiB, or --fs-size), brought up for the run and down afterwards unless it was up
# already. Files go to DIR/bench-load-PID (removed afterwards unless --keep); DIR defaults to
# target/ of the repository. --bin: the CLI to measure (default: cargo build --release, then
# target/release/uring-ckpt). --python (or $PYTHON): an interpreter with torch and uring_ckpt
# (default: the repository's venv from scripts/python-env.sh, where torch is installed and
# the extension built with maturin when missing). tensorizer and fastsafetensors are
# pip-installed into that interpreter when missing; a failed install only skips their rows.
# Writes OUT/bench-load.md and OUT/bench-load.json (OUT defaults to target/bench-load).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
size="1GiB"
dir=""
out="$root/target/bench-load"
repeat=3
fs=""
fs_size=""
bin=""
python="${PYTHON:-}"
extra=()
keep=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --fs) fs="$2"; shift 2 ;;
    --fs-size) fs_size="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --methods|--touch|--seed|--timeout) extra+=("$1" "$2"); shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

if ! command -v fio >/dev/null 2>&1; then
  echo "installing fio" >&2
  (apt-get update -qq && apt-get install -y -qq fio) >&2 || echo "could not install fio: its rows will be skipped" >&2
fi

if [ -z "$python" ]; then
  python="$(bash "$root/scripts/python-env.sh")"
  venv="$(dirname "$(dirname "$python")")"
  if ! "$python" -c "import torch" 2>/dev/null; then
    echo "installing torch into $venv (first run only; several GiB)" >&2
    "$python" -m pip install --quiet --disable-pip-version-check "torch>=2.1" >&2
  fi
  if ! "$python" -c "import uring_ckpt" 2>/dev/null; then
    echo "building the uring_ckpt extension into $venv (maturin develop --release)" >&2
    "$python" -m pip install --quiet --disable-pip-version-check "maturin>=1.5,<2" >&2
    (cd "$root/python" && VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" PYO3_PYTHON="$python" \
      "$venv/bin/maturin" develop --release --quiet) >&2
  fi
fi
for pkg in tensorizer fastsafetensors; do
  if ! "$python" -c "import $pkg" 2>/dev/null; then
    echo "installing $pkg into $python's environment" >&2
    "$python" -m pip install --quiet --disable-pip-version-check "$pkg" >&2 \
      || echo "could not install $pkg: its row will say skipped" >&2
  fi
done

if [ -z "$bin" ]; then
  (cd "$root" && cargo build --release --quiet)
  bin="$root/target/release/uring-ckpt"
fi

cleanup_dir=""
fs_down=""
cleanup() {
  if [ -n "$cleanup_dir" ] && [ -z "$keep" ]; then rm -rf "$cleanup_dir"; fi
  if [ -n "$fs_down" ]; then bash "$root/scripts/fastdev.sh" down "$fs_down"; fi
}
trap cleanup EXIT
if [ -n "$fs" ]; then
  [ -z "$dir" ] || { echo "--fs and --dir: choose one" >&2; exit 2; }
  if [ -z "$fs_size" ]; then
    # Six copies (fio's file and five formats) plus room.
    fs_size="$(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import compare; print(6 * compare.parse_size(sys.argv[2]) + (1 << 30))' "$root/scripts" "$size")"
  fi
  [ -f "/run/uring-ckpt-fastdev/$fs.state" ] || fs_down="$fs"
  mnt="$(bash "$root/scripts/fastdev.sh" up "$fs" --size "$fs_size")"
  dir="$mnt"
fi
[ -n "$dir" ] || dir="$root/target"
work="$dir/bench-load-$$"
cleanup_dir="$work"
mkdir -p "$work" "$out"

"$python" "$root/scripts/bench-load.py" --bin "$bin" --size "$size" --dir "$work" --out "$out" \
  --repeat "$repeat" "${extra[@]}"
