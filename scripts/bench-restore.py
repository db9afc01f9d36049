#!/usr/bin/env python3
"""Restores through the staging pool, side by side in one run (issue 11's memory and overlap
targets): one synthetic checkpoint loaded by the CLI in place into host memory, into a
simulated device at each --device-gib-s (host-to-device copies on the device's copy thread,
keeping nothing), and into fresh memory, alternating with fio's O_DIRECT read of a file of the
same size; the page cache dropped before each run; medians.

    scripts/bench-restore.py --dir DIR [--size 4GiB] [--repeat 3] [--device-gib-s 2,8]
                             [--bin target/release/uring-ckpt] [--out target/bench-restore]

For each row: seconds and GiB/s; the peak memory the load added over the destinations (the CLI
resets VmHWM after allocating them), against the staging pool + 64 MiB; and for a simulated
device its copy time (bytes / bandwidth) and total / max(read, copy), where read is fio's read
of the same bytes. scripts/bench-restore.sh brings up a RAM-backed file system for it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

MIB = 1 << 20
GIB = 1 << 30


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}[m.group(2).upper()])


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError:
        pass  # not root: O_DIRECT reads bypass the cache anyway


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def fio_read(path: str) -> float:
    drop_caches()
    out = subprocess.run(
        ["fio", "--name=read", f"--filename={path}", "--rw=read", "--bs=8M", "--direct=1",
         "--ioengine=io_uring", "--iodepth=32", "--readonly", "--output-format=json"],
        check=True, capture_output=True, text=True,
    ).stdout
    job = json.loads(out)["jobs"][0]["read"]
    return job["io_bytes"] / job["bw_bytes"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--size", type=parse_size, default=parse_size("4GiB"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device-gib-s", default="2,8")
    p.add_argument("--bin", default="target/release/uring-ckpt")
    p.add_argument("--out", default="target/bench-restore")
    a = p.parse_args()
    bandwidths = [float(x) for x in a.device_gib_s.split(",") if x]
    os.makedirs(a.out, exist_ok=True)
    ckpt = os.path.join(a.dir, f"restore-{os.getpid()}")
    fio_file = os.path.join(a.dir, f"restore-{os.getpid()}.fio")
    subprocess.run([a.bin, "save", "--synthetic", str(a.size), "--layout", "llama", "--out", ckpt],
                   check=True, capture_output=True)
    data = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    subprocess.run(["fio", "--name=prep", f"--filename={fio_file}", "--rw=write", "--bs=8M", "--direct=1",
                    "--ioengine=io_uring", "--iodepth=32", f"--size={data}"], check=True, capture_output=True)
    methods = ["fio", "host", "fresh"] + [f"sim-{bw:g}" for bw in bandwidths]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    try:
        for rnd in range(a.repeat):
            order = methods[rnd % len(methods):] + methods[: rnd % len(methods)]
            for m in order:
                if m == "fio":
                    runs[m].append({"seconds": fio_read(fio_file)})
                    continue
                cmd = [a.bin, "load", ckpt, "--json"]
                if m.startswith("sim-"):
                    cmd += ["--into", "sim-device", "--device-gib-s", m[4:]]
                else:
                    cmd += ["--into", m]
                drop_caches()
                runs[m].append(run_json(cmd))
            print(f"round {rnd + 1}/{a.repeat} done", file=sys.stderr)
    finally:
        subprocess.run(["rm", "-rf", ckpt, fio_file], check=False)
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    read = med["fio"]
    fs = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", a.dir], capture_output=True, text=True).stdout.strip()
    lines = [
        f"Restore of a {data / GIB:.2f} GiB synthetic llama checkpoint on {a.dir} ({fs}), "
        f"{a.repeat} alternating rounds, medians; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"`{' '.join(sys.argv)}`",
        "",
        "| load | median s | GiB/s | x fio read | peak memory added (MiB) | pool + 64 MiB | copy s | total / max(read, copy) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        s = med[m]
        row = [m if m != "fio" else "fio read (O_DIRECT, bs 8M, qd 32)", f"{s:.3f}", f"{data / s / GIB:.2f}", f"{read / s:.2f}"]
        peaks = [r.get("peak_extra_bytes") for r in runs[m] if r.get("peak_extra_bytes") is not None]
        pool = next((r.get("staging_pool_bytes") for r in runs[m] if r.get("staging_pool_bytes")), None)
        row.append(f"{max(peaks) / MIB:.1f}" if peaks else "-")
        row.append(f"{(pool + 64 * MIB) / MIB:.0f}" if pool and peaks else "-")
        if m.startswith("sim-"):
            copy = data / (float(m[4:]) * GIB)
            row += [f"{copy:.3f}", f"{s / max(read, copy):.2f}"]
        else:
            row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "bench-restore.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(a.out, "bench-restore.json"), "w") as f:
        json.dump({"data_bytes": data, "runs": runs, "medians": med}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
