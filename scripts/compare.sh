#!/usr/bin/env bash
# Side-by-side save/load throughput on one directory, in one run: fio's O_DIRECT io_uring
# sequential write and read (the physical limit), fio buffered + fsync, our three engines,
# Python safetensors save_file + fsync, and torch.save + fsync when torch is importable.
#
#   scripts/compare.sh [--size 4GiB] [--dir DIR] [--out DIR] [--repeat N]
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
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
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
if [ -z "$dir" ]; then
  dir="$(pwd)/.uring-ckpt-compare-$$"
  cleanup_dir="$dir"
fi
mkdir -p "$dir" "$out"
trap '[ -n "$cleanup_dir" ] && rm -rf "$cleanup_dir"' EXIT

"$python" "$root/scripts/compare.py" --bin "$root/target/release/uring-ckpt" \
  --size "$size" --dir "$dir" --out "$out" --repeat "$repeat"
