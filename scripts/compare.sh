#!/usr/bin/env bash
# Side-by-side save/load throughput on one directory, in one run: fio's O_DIRECT io_uring
# sequential write and read (the physical limit), fio buffered + fsync, our three engines,
# Python safetensors save_file + fsync, and torch.save + fsync when torch is importable.
#
#   scripts/compare.sh [--size 4GiB] [--dir DIR | --fs xfs|ext4|btrfs|tmpfs] [--out DIR] [--repeat N]
#                      [--no-peer-loads]
#
# Then, in the same run and on the same directory, the loads of every peer (scripts/bench-load.py:
# safetensors, torch.load, tensorizer, fastsafetensors, DCP, ours fresh and in place, fio's read),
# appended to OUT/compare.md, when the venv has torch (scripts/test-python.sh installs it);
# --no-peer-loads skips them.
#
# --fs KIND measures on a RAM-backed file system from scripts/fastdev.sh (root; sized 2 x SIZE
# + 1GiB, or --fs-size), brought up for the run and down afterwards unless it was up already.
# The table, the JSON and stderr name the file system and device measured (for a loop device
# also its backing file and whether that is RAM-backed), as `uring-ckpt bench` does.
#
# Installs what it needs: fio (apt-get), a venv under the repo with numpy, safetensors and
# matplotlib (pip). Writes OUT/compare.md (the table README embeds), OUT/compare.json and
# OUT/compare.png (bar chart). DIR defaults to a fresh directory on the current file system.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
size="4GiB"
dir=""
out="$root/target/compare"
repeat=1
fs=""
fs_size=""
peer_loads=1
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --fs) fs="$2"; shift 2 ;;
    --fs-size) fs_size="$2"; shift 2 ;;
    --no-peer-loads) peer_loads=""; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

if ! command -v fio >/dev/null 2>&1; then
  echo "installing fio" >&2
  (apt-get update -qq && apt-get install -y -qq fio) >&2
fi
python="$(bash "$root/scripts/python-env.sh")"
if ! "$python" -c "import matplotlib" 2>/dev/null; then
  "$python" -m pip install --quiet --disable-pip-version-check matplotlib >&2
fi
(cd "$root" && cargo build --release --quiet)

cleanup_dir=""
fs_down=""
cleanup() {
  if [ -n "$cleanup_dir" ]; then rm -rf "$cleanup_dir"; fi
  if [ -n "$fs_down" ]; then bash "$root/scripts/fastdev.sh" down "$fs_down"; fi
}
trap cleanup EXIT
if [ -n "$fs" ]; then
  [ -z "$dir" ] || { echo "--fs and --dir: choose one" >&2; exit 2; }
  if [ -z "$fs_size" ]; then
    # fio's file and one checkpoint (or the safetensors file) at a time, plus room.
    fs_size="$(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import compare; print(2 * compare.parse_size(sys.argv[2]) + (1 << 30))' "$root/scripts" "$size")"
  fi
  [ -f "/run/uring-ckpt-fastdev/$fs.state" ] || fs_down="$fs"
  mnt="$(bash "$root/scripts/fastdev.sh" up "$fs" --size "$fs_size")"
  dir="$mnt/compare-$$"
  cleanup_dir="$dir"
elif [ -z "$dir" ]; then
  dir="$(pwd)/.uring-ckpt-compare-$$"
  cleanup_dir="$dir"
fi
mkdir -p "$dir" "$out"

"$python" "$root/scripts/compare.py" --bin "$root/target/release/uring-ckpt" \
  --size "$size" --dir "$dir" --out "$out" --repeat "$repeat"

if [ -n "$peer_loads" ]; then
  if "$python" -c "import torch, uring_ckpt" 2>/dev/null; then
    echo "== loads of every peer (scripts/bench-load.py), same directory" >&2
    "$python" "$root/scripts/bench-load.py" --bin "$root/target/release/uring-ckpt" \
      --size "$size" --dir "$dir" --out "$out" --repeat "$repeat" >&2
    { echo; echo "### Loads of every peer (same run, same directory)"; echo; cat "$out/bench-load.md"; } >>"$out/compare.md"
  else
    echo "peer loads skipped: $python has no torch/uring_ckpt (run scripts/test-python.sh first)" >&2
  fi
fi
