#!/usr/bin/env python3
"""Load throughput of every peer side by side, on ONE directory, in one run (issue 11, item 6).

Driver of scripts/bench-load.sh (which sets up fio, the venv and, with --fs, a RAM-backed file
system); runnable on its own:

  python scripts/bench-load.py --dir DIR [--size 1GiB] [--repeat 3] [--out target/bench-load]
                               [--bin target/release/uring-ckpt] [--methods a,b,...]
                               [--touch page|full] [--seed 0] [--timeout 900]

One deterministic, transformer-like state dict (embedding and LM head, per layer q/k/v/o and
gate/up/down matrices in bf16 or f32 by layer, f32 norms and biases) is saved once in every
peer's format, outside the timing: safetensors `save_file`, `torch.save`, tensorizer, DCP
`FileSystemWriter`, `uring_ckpt.save`, plus a fio data file of the same size. Then --repeat
rounds run every method once each, round-robin (the order rotated by one each round), every
load in a FRESH subprocess (fresh process memory, as after a restart). Each Python child
imports what it needs, allocates the in-place target when there is one, drops the page cache
for the files (os.sync, POSIX_FADV_DONTNEED on each file, and `echo 1 >
/proc/sys/vm/drop_caches` when that is writable), then times from just before the load call
to after every page of the result has been touched (--touch page: one byte of every 4 KiB of
every tensor, which faults in every page of an mmap'ed load; --touch full: sums every byte).
The sampled bytes add up to a checksum compared with the saved state dict's.

Methods (--methods takes these keys):
  fio-1M, fio-8M   fio O_DIRECT sequential read, ioengine io_uring, iodepth 32 (its own figure)
  safetensors      safetensors.torch.load_file (mmap'ed: pages faulted in by the touch)
  torch            torch.load(mmap=False, weights_only=True)
  tensorizer       tensorizer TensorDeserializer (plaid_mode=True where accepted)
  fastsafetensors  fastsafetensors SafeTensorsFileLoader(nogds=True, device cpu)
  dcp              torch.distributed.checkpoint.load into an existing state dict, FileSystemReader
  ours             uring_ckpt.load(path)  (fresh tensors, CRC-32s checked)
  ours-into        uring_ckpt.load_into(target, path)  (in place, when the build has it)
  cli              `uring-ckpt load PATH --json`: its reported seconds, and the process wall time
  cli-into         `uring-ckpt load PATH --into host --json` (in place into memory the CLI
                   allocates and touches before its timing; when the binary has --into)

Writes OUT/bench-load.md (the table) and OUT/bench-load.json (every run), prints the table. A
method that cannot run (not installed, save or load failed) gets a `skipped: <reason>` row;
the others go on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (parse_size, storage, machine: shared with scripts/compare.sh)

MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096
DROP_CACHES = "/proc/sys/vm/drop_caches"

# key -> row label; the order of the table (and of the first round).
LABELS = {
    "fio-1M": "fio read, O_DIRECT io_uring qd32 bs=1M",
    "fio-8M": "fio read, O_DIRECT io_uring qd32 bs=8M",
    "safetensors": "safetensors.torch.load_file (mmap)",
    "torch": "torch.load (mmap=False, weights_only=True)",
    "tensorizer": "tensorizer TensorDeserializer",
    "fastsafetensors": "fastsafetensors SafeTensorsFileLoader (nogds, cpu)",
    "dcp": "DCP dcp.load, FileSystemReader (into existing state dict)",
    "ours": "**uring_ckpt.load** (fresh)",
    "ours-mmap": "**uring_ckpt.load(mmap=True)** (fresh, mapped copy-on-write)",
    "ours-into": "**uring_ckpt.load_into** (into existing state dict)",
    "cli": "**uring-ckpt load --into fresh** CLI (its reported time)",
    "cli-wall": "uring-ckpt load --into fresh CLI (process wall, exec to exit)",
    "cli-into": "**uring-ckpt load --into host** CLI (in place, its reported time)",
}
METHODS = [k for k in LABELS if k != "cli-wall"]
PEERS = ["safetensors", "torch", "tensorizer", "fastsafetensors", "dcp"]
IN_PLACE = {"dcp", "ours-into", "cli-into"}

# The files each method reads, relative to the work directory.
FILES = {
    "fio-1M": "fio.dat",
    "fio-8M": "fio.dat",
    "safetensors": "model.safetensors",
    "fastsafetensors": "model.safetensors",
    "torch": "model.pt",
    "tensorizer": "model.tensors",
    "dcp": "dcp",
    "ours": "uring",
    "ours-mmap": "uring",
    "ours-into": "uring",
    "cli": "uring",
    "cli-into": "uring",
}


# ---------------------------------------------------------------------------------------------
# The state dict


def layout(size: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of a Llama-like state dict of about `size` bytes (never more than
    one layer short of it): hidden size the largest multiple of 256 that leaves room for at
    least 4 layers; embedding and LM head bf16 (vocab 16 x hidden); per layer q/k/v/o
    (hidden^2) and gate/up/down (hidden x 2.75 hidden) matrices, bf16 in even layers and f32
    in odd ones; f32 norms (hidden, head_dim) and q/k/v biases."""
    hidden = 256
    while 211 * (hidden + 256) ** 2 <= size:
        hidden += 256
    inter = (hidden * 11 // 4 + 255) // 256 * 256
    vocab = 16 * hidden
    head_dim = 128 if hidden >= 1024 else 64
    sizes = {"bf16": 2, "f32": 4}
    spec = [("model.embed_tokens.weight", (vocab, hidden), "bf16")]
    tail = [("model.norm.weight", (hidden,), "f32"), ("lm_head.weight", (vocab, hidden), "bf16")]

    def nbytes(items):
        total = 0
        for _, shape, dtype in items:
            n = sizes[dtype]
            for d in shape:
                n *= d
            total += n
        return total

    budget = size - nbytes(spec) - nbytes(tail)
    layer = 0
    while True:
        p = f"model.layers.{layer}."
        mat = "bf16" if layer % 2 == 0 else "f32"
        items = [
            (p + "input_layernorm.weight", (hidden,), "f32"),
            (p + "self_attn.q_proj.weight", (hidden, hidden), mat),
            (p + "self_attn.q_proj.bias", (hidden,), "f32"),
            (p + "self_attn.k_proj.weight", (hidden, hidden), mat),
            (p + "self_attn.k_proj.bias", (hidden,), "f32"),
            (p + "self_attn.v_proj.weight", (hidden, hidden), mat),
            (p + "self_attn.v_proj.bias", (hidden,), "f32"),
            (p + "self_attn.q_norm.weight", (head_dim,), "f32"),
            (p + "self_attn.k_norm.weight", (head_dim,), "f32"),
            (p + "self_attn.o_proj.weight", (hidden, hidden), mat),
            (p + "post_attention_layernorm.weight", (hidden,), "f32"),
            (p + "mlp.gate_proj.weight", (inter, hidden), mat),
            (p + "mlp.up_proj.weight", (inter, hidden), mat),
            (p + "mlp.down_proj.weight", (hidden, inter), mat),
        ]
        need = nbytes(items)
        if need > budget:
            if layer == 0 or mat == "f32":
                # An f32 layer that does not fit may fit as bf16; layer 0 always goes in.
                items = [(n, s, "bf16" if len(s) == 2 else d) for n, s, d in items]
                need = nbytes(items)
            if need > budget and layer > 0:
                break
        spec += items
        budget -= need
        layer += 1
    return spec + tail


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "f32": torch.float32}[name]


def make_state_dict(spec, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.empty(shape, dtype=torch_dtype(dtype)).uniform_(-1, 1, generator=g)
        for name, shape, dtype in spec
    }


def empty_state_dict(spec):
    """The already-allocated state dict of an in-place load: same shapes, zero-filled (every
    page faulted in, as a model's parameters are)."""
    import torch

    return {name: torch.zeros(shape, dtype=torch_dtype(dtype)) for name, shape, dtype in spec}


def touch(tensors, mode: str) -> int:
    """Reads every page of every tensor; returns the sum of the bytes read (a checksum that
    does not depend on where the tensor lies in memory)."""
    import torch

    total = 0
    for t in tensors:
        if t.numel() == 0:
            continue
        if not t.is_contiguous():
            t = t.contiguous()
        u8 = t.reshape(-1).view(torch.uint8)
        if mode == "full":
            total += int(u8.sum(dtype=torch.int64))
        else:
            # One byte in every 4 KiB from the tensor's start, and its last byte: every page
            # the tensor spans, whatever its alignment.
            total += int(u8[::PAGE].sum(dtype=torch.int64)) + int(u8[-1])
    return total


# ---------------------------------------------------------------------------------------------
# Page cache


def drop_caches_writable() -> bool:
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def files_under(path: str) -> list[str]:
    if os.path.isdir(path):
        out = []
        for base, _, names in os.walk(path):
            out += [os.path.join(base, n) for n in names]
        return out
    return [path]


def drop_cache(paths: list[str], use_drop_caches: bool) -> None:
    """os.sync, then POSIX_FADV_DONTNEED on every file, then `echo 1 > drop_caches` when
    asked (root): nothing of these files stays in the page cache."""
    os.sync()
    for top in paths:
        for p in files_under(top):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    if use_drop_caches:
        with open(DROP_CACHES, "w") as f:
            f.write("1")


def rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


# ---------------------------------------------------------------------------------------------
# Children: one load each, in a fresh process


class Skip(Exception):
    """The method cannot run here (a missing package or function): a `skipped:` row."""


def child(a) -> None:
    warnings.filterwarnings("ignore")
    method, work = a.child, a.work
    with open(os.path.join(work, "spec.json")) as f:
        spec = [(n, tuple(s), d) for n, s, d in json.load(f)["spec"]]
    path = os.path.join(work, FILES[method])
    import torch

    # Imports and set-up before the timing: the load call is what is measured.
    target = None
    closers = []
    kwargs: dict = {}
    if method == "safetensors":
        from safetensors.torch import load_file

        def load():
            return list(load_file(path, device="cpu").values())

    elif method == "torch":

        def load():
            return list(torch.load(path, mmap=False, weights_only=True, map_location="cpu").values())

    elif method == "tensorizer":
        try:
            import inspect

            from tensorizer import TensorDeserializer
        except ImportError as e:
            raise Skip(f"tensorizer not importable ({e}); pip install tensorizer") from e
        kwargs = {"device": "cpu", "lazy_load": False}
        if "plaid_mode" in inspect.signature(TensorDeserializer.__init__).parameters:
            kwargs["plaid_mode"] = True

        def load():
            d = TensorDeserializer(path, **kwargs)
            closers.append(d.close)
            return list(d.values())

    elif method == "fastsafetensors":
        try:
            from fastsafetensors import SafeTensorsFileLoader, SingleGroup
        except ImportError as e:
            raise Skip(f"fastsafetensors not importable ({e}); pip install fastsafetensors") from e

        def load():
            loader = SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True)
            loader.add_filenames({0: [path]})
            fb = loader.copy_files_to_device()
            closers.extend([fb.close, loader.close])
            return [fb.get_tensor(k) for k in loader.get_keys()]

    elif method == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        target = empty_state_dict(spec)

        def load():
            dcp.load(target, storage_reader=FileSystemReader(path))
            return list(target.values())

    elif method in ("ours", "ours-mmap", "ours-into"):
        import uring_ckpt

        if method in ("ours", "ours-mmap"):
            options = {"mmap": True} if method == "ours-mmap" else {}

            def load():
                return list(uring_ckpt.load(path, **options).values())

        else:
            if not hasattr(uring_ckpt, "load_into"):
                raise Skip("uring_ckpt.load_into not available in this build")
            target = empty_state_dict(spec)

            def load():
                uring_ckpt.load_into(target, path)
                return list(target.values())

    else:
        raise SystemExit(f"unknown method {method}")

    # The touch's torch ops run once before the timing (their first call initialises torch's
    # thread pool and kernels: tens of ms that no load should be charged for).
    touch([torch.zeros(4 * PAGE, dtype=torch.bfloat16), torch.zeros(4 * PAGE, dtype=torch.float32)], a.touch)
    drop_cache([path], a.drop == "drop_caches")
    rss_before = rss_mib()
    started = time.perf_counter()
    tensors = load()
    checksum = touch(tensors, a.touch)
    seconds = time.perf_counter() - started
    hwm = rss_mib("VmHWM")
    n = len(tensors)
    del tensors
    for close in closers:
        try:
            close()
        except Exception:  # noqa: BLE001 (only cleanup after the timing)
            pass
    print(json.dumps({"seconds": seconds, "checksum": checksum, "tensors": n,
                      "rss_before_mib": rss_before, "vmhwm_mib": hwm,
                      "plaid_mode": method == "tensorizer" and "plaid_mode" in kwargs}))


# ---------------------------------------------------------------------------------------------
# The parent


def run_child_process(cmd, timeout: float, stdout_path: str, stderr_path: str):
    """Runs cmd; returns (returncode, wall seconds, peak RSS MiB from wait4, stdout, stderr)."""
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        started = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = started + timeout
        timed_out = False
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                timed_out = True
                p.kill()
                pid, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.002)
        wall = time.perf_counter() - started
    p.returncode = os.waitstatus_to_exitcode(status)
    with open(stdout_path) as f:
        stdout = f.read()
    with open(stderr_path) as f:
        stderr = f.read()
    if timed_out:
        stderr += f"\ntimed out after {timeout:.0f} s"
    return p.returncode, wall, usage.ru_maxrss / 1024, stdout, stderr


def last_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else "no output"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def save_formats(work: str, spec, seed: int, size_fio: int, bin_path: str, methods):
    """Saves the state dict once in every format the methods need (outside any timing).
    Returns ({method: skip reason}, payload bytes, {touch mode: expected checksum},
    {step: seconds it took})."""
    import torch

    skips: dict[str, str] = {}
    info: dict[str, float] = {}
    sd = make_state_dict(spec, seed)
    payload = sum(t.numel() * t.element_size() for t in sd.values())
    checksums = {mode: touch(sd.values(), mode) for mode in ("page", "full")}

    def step(keys, what, fn):
        keys = [k for k in keys if k in methods]
        if not keys:
            return
        started = time.perf_counter()
        try:
            fn()
        except Skip as e:
            for k in keys:
                skips[k] = str(e)
            print(f"  {what}: skipped: {e}", file=sys.stderr, flush=True)
            return
        except Exception as e:  # noqa: BLE001 (one peer failing must not stop the run)
            for k in keys:
                skips[k] = f"{what} failed: {type(e).__name__}: {e}"
            print(f"  {what}: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return
        info[what] = time.perf_counter() - started
        print(f"  {what}: {info[what]:.2f} s", file=sys.stderr, flush=True)

    def st():
        from safetensors.torch import save_file

        save_file(sd, os.path.join(work, FILES["safetensors"]))

    def pt():
        torch.save(sd, os.path.join(work, FILES["torch"]))

    def tz():
        try:
            from tensorizer import TensorSerializer
        except ImportError as e:
            raise Skip(f"tensorizer not importable ({e}); pip install tensorizer") from e
        s = TensorSerializer(os.path.join(work, FILES["tensorizer"]))
        s.write_state_dict(sd)
        s.close()

    def fst():
        try:
            import fastsafetensors  # noqa: F401
        except ImportError as e:
            raise Skip(f"fastsafetensors not importable ({e}); pip install fastsafetensors") from e

    def dc():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, storage_writer=FileSystemWriter(os.path.join(work, FILES["dcp"])))

    def ours():
        try:
            import uring_ckpt
        except ImportError as e:
            raise Skip(f"uring_ckpt not importable ({e}): build it (maturin develop --release)") from e
        uring_ckpt.save(sd, os.path.join(work, FILES["ours"]), replace=True)

    def cli_ok():
        if not (bin_path and os.access(bin_path, os.X_OK)):
            raise Skip(f"no uring-ckpt binary at {bin_path!r} (cargo build --release, or --bin)")

    def cli_into_ok():
        cli_ok()
        usage = subprocess.run([bin_path, "load", "--help"], capture_output=True, text=True).stdout
        if "--into" not in usage:
            raise Skip("this uring-ckpt binary has no `load --into`")

    def fio_file():
        cmd = ["fio", "--name=prep", f"--filename={os.path.join(work, FILES['fio-1M'])}", "--rw=write",
               "--bs=8M", "--direct=1", "--ioengine=io_uring", "--iodepth=32", f"--size={size_fio}",
               "--end_fsync=1", "--output-format=json"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except FileNotFoundError as e:
            raise Skip("fio is not installed (apt-get install fio)") from e
        except subprocess.CalledProcessError as e:
            raise RuntimeError(last_line(e.stderr or e.stdout)) from e

    step(["fio-1M", "fio-8M"], "fio data file (fio write, O_DIRECT)", fio_file)
    step(["safetensors", "fastsafetensors"], "safetensors save_file", st)
    step(["fastsafetensors"], "fastsafetensors import", fst)
    step(["torch"], "torch.save", pt)
    step(["tensorizer"], "tensorizer TensorSerializer", tz)
    step(["dcp"], "DCP save, FileSystemWriter", dc)
    step(["ours", "ours-mmap", "ours-into", "cli", "cli-into"], "uring_ckpt.save", ours)
    step(["cli"], "uring-ckpt binary", cli_ok)
    step(["cli-into"], "uring-ckpt load --into", cli_into_ok)
    del sd
    gc.collect()
    return skips, payload, checksums, info


def versions(bin_path: str) -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    dists = ("torch", "safetensors", "tensorizer", "fastsafetensors", "uring-ckpt", "uring_ckpt", "numpy")
    for dist in dists:
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    for tool, cmd in (("fio", ["fio", "--version"]), ("uring_ckpt_cli", [bin_path, "--version"])):
        try:
            out[tool] = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="work directory (its files are written here)")
    p.add_argument("--size", default="1GiB", help="about this many bytes of tensors (default 1GiB)")
    p.add_argument("--repeat", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--out", default=None, help="OUT/bench-load.md and .json (default: target/bench-load)")
    p.add_argument("--bin", default=None, help="uring-ckpt binary (default: target/release/uring-ckpt)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ",".join(METHODS))
    p.add_argument("--touch", choices=["page", "full"], default="page",
                   help="page: one byte per 4 KiB (every page read); full: sum every byte")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds one load may take")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--drop", help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fio-size", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.prepare:
        with open(os.path.join(a.work, "spec.json")) as f:
            spec = [(n, tuple(s), d) for n, s, d in json.load(f)["spec"]]
        skips, payload, checksums, seconds = save_formats(a.work, spec, a.seed, a.fio_size, a.bin,
                                                          a.methods.split(","))
        with open(os.path.join(a.work, "prepared.json"), "w") as f:
            json.dump({"skips": skips, "payload": payload, "checksums": checksums,
                       "save_seconds": seconds}, f)
        return
    if a.child:
        try:
            child(a)
        except Skip as e:
            print(json.dumps({"skipped": str(e)}))
            sys.exit(3)
        return

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not a.dir:
        p.error("--dir is required")
    out_dir = a.out or os.path.join(root, "target", "bench-load")
    bin_path = a.bin or os.path.join(root, "target", "release", "uring-ckpt")
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {METHODS}")
    size = compare.parse_size(a.size)
    work = os.path.realpath(a.dir)
    os.makedirs(work, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    where = compare.storage(work)
    drop = "drop_caches" if drop_caches_writable() else "fadvise"
    drop_text = ("os.sync + POSIX_FADV_DONTNEED on each file + `echo 1 > /proc/sys/vm/drop_caches`"
                 if drop == "drop_caches" else
                 "os.sync + POSIX_FADV_DONTNEED on each file (/proc/sys/vm/drop_caches not writable)")
    print(f"directory {work} on {where['summary']}", file=sys.stderr)
    print(f"page cache: {drop_text}", file=sys.stderr)

    spec = layout(size)
    with open(os.path.join(work, "spec.json"), "w") as f:
        json.dump({"spec": spec, "seed": a.seed}, f)
    spec_bytes = sum((2 if d == "bf16" else 4) * _prod(s) for _, s, d in spec)
    size_fio = max((spec_bytes + 8 * MIB - 1) // (8 * MIB) * (8 * MIB), 8 * MIB)
    print(f"state dict: {len(spec)} tensors, {spec_bytes / MIB:.1f} MiB; saving every format once",
          file=sys.stderr, flush=True)
    copies = len({FILES[m] for m in methods})  # the files (or directories) the methods read
    need = copies * size_fio + 64 * MIB
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work} has {free / MIB:.0f} MiB free; {copies} copies of the state dict "
                         f"need about {need / MIB:.0f} MiB: free some space, or a smaller --size")
    # Saved in a process of its own: this one stays small (a child's ru_maxrss starts from
    # its parent's high-water mark at exec), and a crash while saving is one more skip.
    prep = [sys.executable, os.path.abspath(__file__), "--prepare", "--work", work, "--bin", bin_path,
            "--methods", ",".join(methods), "--seed", str(a.seed), "--fio-size", str(size_fio)]
    try:
        os.unlink(os.path.join(work, "prepared.json"))
    except FileNotFoundError:
        pass
    rc = subprocess.run(prep).returncode
    try:
        with open(os.path.join(work, "prepared.json")) as f:
            prepared = json.load(f)
    except (OSError, ValueError):
        raise SystemExit(f"saving the formats failed (exit {rc}): see the messages above")
    skips, payload, save_seconds = prepared["skips"], prepared["payload"], prepared["save_seconds"]
    checksums = prepared["checksums"]
    expected = checksums[a.touch]
    vers = versions(bin_path)

    runs: dict[str, list[dict]] = {m: [] for m in methods}
    if "cli" in methods:
        runs["cli-wall"] = []
    failed: dict[str, str] = {}
    load_avgs = []
    raw = os.path.join(work, "raw")
    os.makedirs(raw, exist_ok=True)

    def one(method: str, r: int) -> None:
        tag = f"{raw}/{method}-{r}"
        if method.startswith("fio"):
            bs = method.split("-")[1]
            fio_path = os.path.join(work, FILES[method])
            drop_cache([fio_path], drop == "drop_caches")
            cmd = ["fio", "--name=seq", f"--filename={fio_path}", "--rw=read", f"--bs={bs}", "--direct=1",
                   "--ioengine=io_uring", "--iodepth=32", f"--size={size_fio}", "--output-format=json"]
            rc, wall, peak, out, err = run_child_process(cmd, a.timeout, tag + ".out", tag + ".err")
            if rc != 0:
                raise RuntimeError(f"fio exit {rc}: {last_line(err or out)}")
            job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
            seconds = job["io_bytes"] / job["bw_bytes"]
            runs[method].append({"seconds": seconds, "bytes": job["io_bytes"], "wall_s": wall,
                                 "peak_rss_mib": peak, "command": " ".join(cmd)})
        elif method in ("cli", "cli-into"):
            path = os.path.join(work, FILES[method])
            drop_cache([path], drop == "drop_caches")
            cmd = [bin_path, "load", path, "--json", "--into", "host" if method == "cli-into" else "fresh"]
            rc, wall, peak, out, err = run_child_process(cmd, a.timeout, tag + ".out", tag + ".err")
            if rc != 0:
                raise RuntimeError(f"uring-ckpt load exit {rc}: {last_line(err or out)}")
            report = json.loads(out)
            common = {"bytes": payload, "peak_rss_mib": peak, "command": " ".join(cmd),
                      "cli_mib_s": report["throughput_mib_s"], "cli_read_bytes": report["read_bytes"],
                      "engine": report["engine"]["engine"], "verified": report.get("verified")}
            runs[method].append({"seconds": report["seconds"], "wall_s": wall, **common})
            if method == "cli":
                runs["cli-wall"].append({"seconds": wall, "wall_s": wall, **common})
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--work", work,
                   "--touch", a.touch, "--drop", drop]
            rc, wall, peak, out, err = run_child_process(cmd, a.timeout, tag + ".out", tag + ".err")
            if rc == 3 and out.strip().startswith("{"):
                raise Skip(json.loads(last_line(out, 10**6))["skipped"])
            if rc != 0:
                raise RuntimeError(f"exit {rc}: {last_line(err or out)}")
            result = json.loads(last_line(out, 10**6))
            runs[method].append({"seconds": result["seconds"], "bytes": payload, "wall_s": wall,
                                 "peak_rss_mib": result["vmhwm_mib"], "wait4_maxrss_mib": peak,
                                 "rss_before_mib": result["rss_before_mib"],
                                 "vmhwm_mib": result["vmhwm_mib"],
                                 "checksum_ok": result["checksum"] == expected,
                                 "tensors": result["tensors"], "plaid_mode": result["plaid_mode"],
                                 "command": " ".join(cmd)})

    todo = [m for m in methods if m not in skips]
    for r in range(a.repeat):
        order = todo[r % len(todo):] + todo[: r % len(todo)] if todo else []
        print(f"round {r + 1}/{a.repeat} (load average {os.getloadavg()[0]:.2f})",
              file=sys.stderr, flush=True)
        for method in order:
            if method in skips or method in failed:
                continue
            load_avgs.append(os.getloadavg()[0])
            try:
                one(method, r)
            except Skip as e:
                skips[method] = str(e)
                print(f"  {method:<16} skipped: {e}", file=sys.stderr, flush=True)
                continue
            except Exception as e:  # noqa: BLE001 (one peer failing must not stop the run)
                failed[method] = f"load failed: {type(e).__name__}: {e}"
                print(f"  {method:<16} FAILED: {e}", file=sys.stderr, flush=True)
                continue
            last = runs[method][-1]
            note = "" if last.get("checksum_ok", True) else "  CHECKSUM MISMATCH"
            gib = last["bytes"] / GIB / last["seconds"]
            print(f"  {method:<16} {gib:7.2f} GiB/s  {last['seconds']:7.3f} s"
                  f"  peak RSS {last['peak_rss_mib']:7.0f} MiB{note}", file=sys.stderr, flush=True)

    # Medians and ratios.
    def med_s(m):
        return statistics.median(x["seconds"] for x in runs[m])

    def gib_s(m):
        return statistics.median(x["bytes"] for x in runs[m]) / GIB / med_s(m)

    done = [m for m in runs if runs[m]]
    fio_keys = [m for m in ("fio-1M", "fio-8M") if m in done]
    fio_best = max((gib_s(m) for m in fio_keys), default=None)
    peer_done = [m for m in PEERS if m in done]
    fastest = max(peer_done, key=gib_s) if peer_done else None
    rows = []
    for m in list(LABELS):
        if m not in methods and not (m == "cli-wall" and "cli" in methods):
            continue
        label = LABELS[m]
        reason = skips.get(m if m != "cli-wall" else "cli") or failed.get(m if m != "cli-wall" else "cli")
        if not runs.get(m):
            rows.append({"key": m, "method": label, "skipped": reason or "no run"})
            continue
        rs = runs[m]
        notes = []
        if m == "tensorizer":
            notes.append("plaid_mode=True passed (documented as a no-op in tensorizer 2.x)"
                         if rs[0].get("plaid_mode") else "plaid_mode not accepted by this tensorizer")
        if m == "cli-into":
            notes.append("target allocated and touched by the CLI before its timing")
        elif m in IN_PLACE:
            notes.append("target allocated and zero-filled before the timing")
        if m in ("ours", "ours-mmap", "ours-into"):
            notes.append("CRC-32s checked")
        if m in ("cli", "cli-into"):
            notes.append(f"CLI-reported {statistics.median(x['cli_mib_s'] for x in rs):.0f} MiB/s "
                         f"({rs[0]['engine']} engine, CRCs checked: {rs[0]['verified']})")
        if m == "cli-wall":
            notes.append("process start + load + exit, cache dropped before exec")
        if "rss_before_mib" in rs[0]:
            notes.append(f"RSS before load {statistics.median(x['rss_before_mib'] for x in rs):.0f} MiB")
        if any(x.get("checksum_ok") is False for x in rs):
            notes.append("**CHECKSUM MISMATCH**")
        if m in failed:
            notes.append(failed[m])
        if m == fastest:
            notes.append("fastest peer")
        g = gib_s(m)
        rows.append({
            "key": m, "method": label, "median_s": med_s(m), "median_gib_s": g,
            "x_fio_read": g / fio_best if fio_best else None,
            "x_fastest_peer": g / gib_s(fastest) if fastest else None,
            "peak_rss_mib": max(x["peak_rss_mib"] for x in rs),
            "runs": [x["bytes"] / GIB / x["seconds"] for x in rs], "notes": notes,
        })

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    hw = compare.machine()
    la = f"{min(load_avgs):.2f}-{max(load_avgs):.2f}" if load_avgs else "n/a"
    touch_text = ("one byte of every 4 KiB page of every tensor read (and its last byte)"
                  if a.touch == "page" else "every byte of every tensor summed")
    vtext = ", ".join(f"{k} {v}" for k, v in vers.items() if k not in ("python",) and "\n" not in v)
    header = (
        f"Load of one {payload / MIB:.0f} MiB state dict ({len(spec)} tensors, bf16/f32, seed {a.seed}), "
        f"one directory, {a.repeat} alternating round(s) (round-robin, order rotated each round), "
        f"median; every load in a fresh process; {when}.  \n"
        f"File system: **{where['fs_type']}** on **{where['device']}** ({where['summary']}).  \n"
        f"Machine: {hw}; load average {la}.  \n"
        f"Page cache before every load: {drop_text}.  \n"
        f"Timed: from just before the load call to after {touch_text}. "
        f"GiB/s = tensor bytes / median s (fio: its own figure on a {size_fio / MIB:.0f} MiB file). "
        f"x fio read: vs fio's best O_DIRECT read (bs 1M or 8M); x fastest peer: vs the fastest of "
        f"{', '.join(PEERS)}{f' ({fastest})' if fastest else ''}. Peak RSS: VmHWM of the Python "
        f"process (imports, the in-place target and mmap'ed file pages included), wait4's ru_maxrss "
        f"for fio and the CLI.  \n"
        f"Versions: {vtext}.\n\n"
        "| method | median s | median GiB/s | x fio read | x fastest peer | peak RSS MiB "
        "| runs (GiB/s) | notes |\n"
        "|---|---:|---:|---:|---:|---:|---|---|\n"
    )

    def cell(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = []
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['method']} | skipped: {row['skipped']} | | | | | | |")
            continue
        lines.append(
            f"| {row['method']} | {row['median_s']:.3f} | {row['median_gib_s']:.2f} "
            f"| {cell(row['x_fio_read'], '.2f')} "
            f"| {cell(row['x_fastest_peer'], '.2f')} | {row['peak_rss_mib']:.0f} "
            f"| {' / '.join(f'{x:.2f}' for x in row['runs'])} | {'; '.join(row['notes'])} |")
    table = header + "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "bench-load.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, "bench-load.json"), "w") as f:
        json.dump({"when": when, "machine": hw, "storage": where, "work_dir": work, "page_cache": drop,
                   "touch": a.touch, "seed": a.seed, "size_asked": size, "payload_bytes": payload,
                   "fio_file_bytes": size_fio, "tensors": len(spec), "repeat": a.repeat,
                   "load_average": load_avgs, "versions": vers, "save_seconds": save_seconds,
                   "expected_checksum": expected, "rows": rows, "runs": runs,
                   "skipped": skips, "failed": failed}, f, indent=2)
    print(table)
    print(f"wrote {os.path.join(out_dir, 'bench-load.md')} and bench-load.json", file=sys.stderr)


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
