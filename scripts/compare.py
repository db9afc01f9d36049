"""Driver of scripts/compare.sh: runs every writer on the same directory and size, one after
the other in one run, and prints/writes the comparison. See compare.sh for usage."""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

MIB = 1 << 20


def parse_size(text):
    units = {"k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}
    t = text.strip().lower()
    for suffix in sorted(units, key=len, reverse=True):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * units[suffix])
    return int(t)


def drop_cache(path):
    """Evicts a file (or every file under a directory) from the page cache."""
    paths = [path]
    if os.path.isdir(path):
        paths = [os.path.join(path, f) for f in os.listdir(path)]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fio(args, directory, size, rw, direct, engine, iodepth, bs="1M"):
    path = os.path.join(directory, "fio.dat")
    cmd = [
        "fio", "--name=seq", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--direct={direct}",
        f"--ioengine={engine}", f"--iodepth={iodepth}", f"--size={size}", "--output-format=json",
    ]
    if rw == "write":
        cmd.append("--end_fsync=1")
        if os.path.exists(path):
            os.unlink(path)
    else:
        drop_cache(path)
    started = time.monotonic()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    wall = time.monotonic() - started
    job = json.loads(out[out.index("{"):])["jobs"][0][rw]
    return {"seconds": wall, "bytes": size, "fio_reported_mib_s": job["bw_bytes"] / MIB, "command": " ".join(cmd)}


def ours_save(binary, directory, size, engine, tag):
    path = os.path.join(directory, f"ours-{engine}-{tag}")
    cmd = [binary, "--engine", engine, "save", "--synthetic", str(size), "--layout", "llama", "--dtype", "bf16",
           "--seed", "1", "--out", path, "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    return path, {"seconds": report["seconds"], "bytes": report["file_bytes"], "command": " ".join(cmd)}


def ours_load(binary, path, engine):
    drop_cache(path)
    cmd = [binary, "--engine", engine, "load", path, "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    return {"seconds": report["seconds"], "bytes": report["read_bytes"], "command": " ".join(cmd)}


def synthetic_arrays(size):
    import numpy as np

    rng = np.random.default_rng(1)
    arrays = {}
    remaining = size
    i = 0
    # Llama-like: big square and MLP matrices plus small norm vectors (float16 stands in for bf16).
    shapes = [(4096, 4096), (11008, 4096), (4096,), (4096, 4096), (4096,)]
    while remaining > 0:
        shape = shapes[i % len(shapes)]
        n = 2
        for d in shape:
            n *= d
        if n > remaining:
            shape = (max(remaining // 2, 1),)
            n = shape[0] * 2
        arrays[f"layers.{i // len(shapes)}.t{i % len(shapes)}"] = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16).view(np.float16)
        remaining -= n
        i += 1
    return arrays


def safetensors_save(arrays, directory, tag):
    from safetensors.numpy import save_file

    path = os.path.join(directory, f"safetensors-{tag}.safetensors")
    started = time.monotonic()
    save_file(arrays, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    fsync_dir(directory)
    seconds = time.monotonic() - started
    size = os.path.getsize(path)
    os.unlink(path)
    return {"seconds": seconds, "bytes": size, "command": "safetensors.numpy.save_file + fsync"}


def torch_save(arrays, directory, tag):
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    path = os.path.join(directory, f"torch-{tag}.pt")
    started = time.monotonic()
    with open(path, "wb") as f:
        torch.save(tensors, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(directory)
    seconds = time.monotonic() - started
    size = os.path.getsize(path)
    os.unlink(path)
    return {"seconds": seconds, "bytes": size, "command": "torch.save + fsync"}


def _unescape(field):
    """Undoes /proc/self/mountinfo's octal escapes (\\040 for a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount_of(path):
    """(fs_type, source, mount_point) of the mount holding path: the longest mount point above
    it, preferring one with its device number, later lines winning (as `uring-ckpt bench`)."""
    path = os.path.realpath(path)
    dev = os.stat(path).st_dev
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    best = None
    with open("/proc/self/mountinfo") as f:
        for order, line in enumerate(f):
            fields = line.split()
            if "-" not in fields:
                continue
            sep = fields.index("-")
            if len(fields) < sep + 3 or sep < 5:
                continue
            mount_point = _unescape(fields[4])
            if not (path == mount_point or path.startswith(mount_point.rstrip("/") + "/")):
                continue
            key = (fields[2] == wanted, len(mount_point), order)
            if best is None or key > best[0]:
                best = (key, (_unescape(fields[sep + 1]), _unescape(fields[sep + 2]), mount_point))
    return best[1] if best else None


def storage(directory):
    """The file system and device `directory` is on, with the same fields and summary line as
    the `machine` object of `uring-ckpt bench --json`."""
    mount = _mount_of(directory)
    if mount is None:
        return {"fs_type": "unknown", "device": "unknown", "mount_point": "unknown", "backing_file": None,
                "backing_fs_type": None, "ram_backed": False, "summary": "an unknown file system"}
    fs_type, source, mount_point = mount
    block = None
    if source.startswith("/dev/"):
        name = os.path.basename(os.path.realpath(source))
        if os.path.exists(f"/sys/class/block/{name}"):
            block = name
    backing_file = backing_fs_type = None
    if block:
        try:
            with open(f"/sys/class/block/{block}/loop/backing_file") as f:
                backing_file = f.read().rstrip("\n").removesuffix(" (deleted)") or None
        except OSError:
            pass
    if backing_file:
        m = _mount_of(backing_file) if os.path.exists(backing_file) else None
        backing_fs_type = m[0] if m else None
    memory = ("tmpfs", "ramfs")
    ram_backed = (fs_type in memory or backing_fs_type in memory
                  or bool(block and (block.startswith("ram") or block.startswith("zram"))))
    ram = ": RAM-backed" if ram_backed else ""
    if backing_file:
        summary = (f"{fs_type} on {source} (loop device over {backing_file} on "
                   f"{backing_fs_type or 'an unknown file system'}{ram}), mounted at {mount_point}")
    else:
        summary = f"{fs_type} on {source}{ram}, mounted at {mount_point}"
    return {"fs_type": fs_type, "device": source, "mount_point": mount_point, "backing_file": backing_file,
            "backing_fs_type": backing_fs_type, "ram_backed": ram_backed, "summary": summary}


def machine():
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{platform.node()}: Linux {platform.release()}, {os.cpu_count()} CPUs ({cpu})"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True)
    p.add_argument("--size", default="4GiB")
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args()
    size = parse_size(a.size)
    runs = {}
    where = storage(a.dir)
    print(f"directory {os.path.realpath(a.dir)} on {where['summary']}", file=sys.stderr, flush=True)

    def record(name, result):
        runs.setdefault(name, []).append(result)
        mib_s = result["bytes"] / MIB / result["seconds"]
        print(f"  {name:<34} {mib_s:8.0f} MiB/s  ({result['seconds']:.2f} s)", file=sys.stderr, flush=True)

    arrays = synthetic_arrays(size)
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
        print("torch is not importable: torch.save row skipped", file=sys.stderr)

    for r in range(a.repeat):
        print(f"round {r + 1}/{a.repeat}", file=sys.stderr)
        for bs in ["1M", "8M"]:
            record(f"fio write, O_DIRECT io_uring qd32 bs={bs}", fio(a, a.dir, size, "write", 1, "io_uring", 32, bs))
            record(f"fio read, O_DIRECT io_uring qd32 bs={bs}", fio(a, a.dir, size, "read", 1, "io_uring", 32, bs))
        record("fio write, buffered + fsync", fio(a, a.dir, size, "write", 0, "psync", 1))
        os.unlink(os.path.join(a.dir, "fio.dat"))
        for engine in ["uring", "pwrite", "buffered"]:
            path, saved = ours_save(a.bin, a.dir, size, engine, r)
            record(f"uring-ckpt save, {engine}", saved)
            record(f"uring-ckpt load, {engine}", ours_load(a.bin, path, engine))
            subprocess.run(["rm", "-rf", path], check=True)
        record("safetensors save_file + fsync", safetensors_save(arrays, a.dir, r))
        if have_torch:
            record("torch.save + fsync", torch_save(arrays, a.dir, r))

    def median_mib_s(name):
        return statistics.median(x["bytes"] / MIB / x["seconds"] for x in runs[name])

    # The physical limit is fio's best O_DIRECT sequential figure in each direction.
    fio_write = max(median_mib_s(f"fio write, O_DIRECT io_uring qd32 bs={bs}") for bs in ["1M", "8M"])
    fio_read = max(median_mib_s(f"fio read, O_DIRECT io_uring qd32 bs={bs}") for bs in ["1M", "8M"])
    buffered = median_mib_s("fio write, buffered + fsync")
    rows = []
    for name in runs:
        mib_s = median_mib_s(name)
        ref = fio_read if " read" in name or " load" in name else fio_write
        rows.append({
            "name": name,
            "mib_s": mib_s,
            "ratio_to_fio": mib_s / ref,
            "ratio_to_buffered_fsync": mib_s / buffered if "load" not in name and "read" not in name else None,
            "seconds": statistics.median(x["seconds"] for x in runs[name]),
            "command": runs[name][0]["command"],
        })
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (
        f"Size {a.size} per writer, same directory, one run ({a.repeat} round(s), median), {when}.  \n"
        f"Machine: {machine()}.  \n"
        f"Storage: {where['summary']}.\n\n"
        "| writer | MiB/s | s | vs fio's best (same direction) | vs fio buffered+fsync |\n|---|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in rows:
        vs_buf = f"{row['ratio_to_buffered_fsync']:.2f}x" if row["ratio_to_buffered_fsync"] is not None else ""
        lines.append(f"| {row['name']} | {row['mib_s']:.0f} | {row['seconds']:.2f} | {row['ratio_to_fio']:.2f} | {vs_buf} |")
    table = header + "\n".join(lines) + "\n"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "compare.md"), "w") as f:
        f.write(table)
    with open(os.path.join(a.out, "compare.json"), "w") as f:
        json.dump({"size": size, "machine": machine(), "storage": where, "when": when, "rows": rows, "runs": runs}, f, indent=2)
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
        names = [r["name"] for r in rows][::-1]
        values = [r["mib_s"] for r in rows][::-1]
        colors = ["#4c72b0" if "uring-ckpt" in n else "#999999" for n in names]
        ax.barh(names, values, color=colors)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
        ax.set_xlabel("MiB/s (to durable for writes)")
        ax.set_title(f"{a.size} checkpoint, same disk, one run")
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "compare.png"), dpi=110)
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)


if __name__ == "__main__":
    main()
