#!/usr/bin/env bash
# A/B of the engines against fio on one file system (by default a RAM-backed XFS, the
# fast-device regime), in one run: ROUNDS alternating rounds of {fio O_DIRECT io_uring write
# bs=1M and 8M qd32, fio read bs=1M and 8M qd32, `uring-ckpt bench` save+load on each engine};
# prints the median of each figure over the rounds, the ratios to fio's best write/read and to
# pwrite, CPU-s/GiB, and the load average taken before each figure (the machine may be shared
# with other builds).
#
#   sudo scripts/engine-ab.sh [--fs xfs|ext4|btrfs | --dir DIR] [--size 2GiB] [--rounds 3]
#                             [--repeat 3] [--engines uring,pwrite] [--layout llama|mixed|gpt2]
#                             [--bin target/release/uring-ckpt] [--out DIR] [--keep-fs]
#
# --fs brings up scripts/fastdev.sh's file system of that kind (6GiB; default xfs) when it is
# not up and takes it down afterwards (unless --keep-fs, or it was up already). --dir measures
# an existing directory instead (e.g. one on the repository's disk); nothing is brought up.
# Either way the summary names the file system and the device measured. Writes
# OUT/engine-ab.json (every figure) and OUT/engine-ab.txt (the summary); OUT defaults to
# target/engine-ab (target/engine-ab-FS for another --fs, target/engine-ab-dir for --dir).
# --layout mixed is what `uring-ckpt save --synthetic` writes: unaligned tensors, so every
# byte is staged (copy+CRC); llama (the bench's default) goes to disk almost entirely
# zero-copy.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
size="2GiB"
rounds=3
repeat=3
engines="uring,pwrite"
layout="llama"
bin="$root/target/release/uring-ckpt"
out="$root/target/engine-ab"
keep_fs=""
fs="xfs"
dir=""
out_set=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --repeat) repeat="$2"; shift 2 ;;
    --engines) engines="$2"; shift 2 ;;
    --layout) layout="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --out) out="$2"; out_set=1; shift 2 ;;
    --fs) fs="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --keep-fs) keep_fs=1; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
[ -x "$bin" ] || { echo "no binary at $bin (cargo build --release)" >&2; exit 2; }
command -v fio >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq fio) >&2

case "$fs" in xfs|ext4|btrfs) ;; *) echo "--fs takes xfs, ext4 or btrfs" >&2; exit 2 ;; esac
fs_down=""
if [ -n "$dir" ]; then
  [ -d "$dir" ] || { echo "no directory $dir" >&2; exit 2; }
  mnt="$(cd "$dir" && pwd)"
  [ -n "$out_set" ] || out="$root/target/engine-ab-dir"
else
  [ -f "/run/uring-ckpt-fastdev/$fs.state" ] || { [ -n "$keep_fs" ] || fs_down="$fs"; }
  mnt="$(bash "$root/scripts/fastdev.sh" up "$fs" --size 6GiB)"
  [ -n "$out_set" ] || [ "$fs" = xfs ] || out="$root/target/engine-ab-$fs"
fi
work="$mnt/engine-ab-$$"
cleanup() {
  rm -rf "$work"
  if [ -n "$fs_down" ]; then bash "$root/scripts/fastdev.sh" down "$fs_down"; fi
}
trap cleanup EXIT
mkdir -p "$work" "$out"
# What is measured: the file system and the device under the work directory.
measured="$(findmnt -no FSTYPE,SOURCE -T "$work" | head -1) at $(findmnt -no TARGET -T "$work" | head -1)"
echo "measuring $measured" >&2
raw="$out/raw"
rm -rf "$raw"
mkdir -p "$raw"

loadavg() { cut -d' ' -f1 /proc/loadavg; }

# fio NAME RW BS ROUND: one O_DIRECT io_uring qd32 sequential job (compare.py's invocation).
run_fio() {
  local name="$1" rw="$2" bs="$3" r="$4" extra=()
  [ "$rw" = write ] && { rm -f "$work/fio.dat"; extra=(--end_fsync=1); }
  local la; la="$(loadavg)"
  fio --name=seq --filename="$work/fio.dat" --rw="$rw" --bs="$bs" --direct=1 --ioengine=io_uring \
    --iodepth=32 --size="$size" --output-format=json "${extra[@]}" >"$raw/$name-$r.json"
  echo "$la" >"$raw/$name-$r.load"
}

for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds (load $(loadavg))" >&2
  for bs in 1M 8M; do run_fio "fio-write-$bs" write "$bs" "$r"; done
  for bs in 1M 8M; do run_fio "fio-read-$bs" read "$bs" "$r"; done
  rm -f "$work/fio.dat"
  IFS=, read -ra list <<<"$engines"
  # Alternate the order of the engines from round to round.
  if [ $((r % 2)) -eq 0 ]; then
    rev=(); for ((i = ${#list[@]} - 1; i >= 0; i--)); do rev+=("${list[i]}"); done; list=("${rev[@]}")
  fi
  for e in "${list[@]}"; do
    la="$(loadavg)"
    "$bin" --engine "$e" bench --size "$size" --layout "$layout" --repeat "$repeat" --dir "$work" \
      --json "$raw/bench-$e-$r.json" >"$raw/bench-$e-$r.txt" 2>&1 \
      || { cat "$raw/bench-$e-$r.txt" >&2; exit 1; }
    echo "$la" >"$raw/bench-$e-$r.load"
  done
done

python3 - "$raw" "$rounds" "$engines" "$out" "$measured" <<'EOF'
import json, os, statistics, sys
raw, rounds, engines, out, measured = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4], sys.argv[5]
MIB = 1 << 20
def load(name, r):
    return float(open(f"{raw}/{name}-{r}.load").read())
fig = {}  # name -> list of (value, cpu_s_per_gib or None, loadavg)
for r in range(1, rounds + 1):
    for rw in ("write", "read"):
        for bs in ("1M", "8M"):
            name = f"fio-{rw}-{bs}"
            text = open(f"{raw}/{name}-{r}.json").read()
            job = json.loads(text[text.index("{"):])["jobs"][0]
            mib = job[rw]["bw_bytes"] / MIB
            secs = (job["job_runtime"] or 1) / 1000
            cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * secs / (job[rw]["io_bytes"] / (1 << 30))
            fig.setdefault(name, []).append((mib, cpu, load(name, r)))
    for e in engines:
        doc = json.load(open(f"{raw}/bench-{e}-{r}.json"))
        for row in doc["results"]:
            name = f"{e}-{row['phase']}"
            if row["engine_used"] != e:
                name += f"(fell back to {row['engine_used']})"
            fig.setdefault(name, []).append((row["mib_s_median"], row["cpu_seconds_per_gib"], load(f"bench-{e}", r)))
med = {k: statistics.median(v[0] for v in vals) for k, vals in fig.items()}
cpu = {k: statistics.median(v[1] for v in vals) for k, vals in fig.items()}
fio_w = max(med["fio-write-1M"], med["fio-write-8M"])
fio_r = max(med["fio-read-1M"], med["fio-read-8M"])
lines = [f"file system: {measured}", f"{'figure':28} {'median MiB/s':>12} {'runs':>24} {'CPU s/GiB':>9} {'vs fio':>7} {'vs pwrite':>9}  load avg"]
for k in fig:
    ref = fio_r if ("read" in k or "load" in k) else fio_w
    base = None
    if not k.startswith("fio"):
        phase = k.split("-", 1)[1]
        base = med.get(f"pwrite-{phase}")
    runs = "/".join(f"{v[0]:.0f}" for v in fig[k])
    vs_pw = f"{med[k] / base:9.3f}" if base else f"{'':9}"
    loads = " ".join(f"{v[2]:.2f}" for v in fig[k])
    lines.append(f"{k:28} {med[k]:12.0f} {runs:>24} {cpu[k]:9.3f} {med[k] / ref:7.3f} {vs_pw}  {loads}")
lines.append(f"fio best write {fio_w:.0f} MiB/s, best read {fio_r:.0f} MiB/s (medians of {rounds} rounds)")
text = "\n".join(lines)
print(text)
open(f"{out}/engine-ab.txt", "w").write(text + "\n")
json.dump({"file_system": measured} | {k: {"runs": [{"mib_s": a, "cpu_s_per_gib": b, "loadavg": c} for a, b, c in v], "median_mib_s": med[k]}
           for k, v in fig.items()}, open(f"{out}/engine-ab.json", "w"), indent=1)
EOF
