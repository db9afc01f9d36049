#!/usr/bin/env python3
"""torch.distributed.checkpoint (DCP) on one machine: uring_ckpt.dcp against DCP's own
writers and readers, 1, 2 and 4 ranks (spawned processes, gloo, CPU tensors).

The state is the same for every world size: --size-mib in total, 8 float32 tensors, each a
DTensor sharded on dim 0 (Shard(0)) across the ranks, every rank building its own rows.
Every save is durable (fsynced) before it counts:

  save     UringStorageWriter; FileSystemWriter(thread_count=1, sync_files=True);
           FileSystemWriter(thread_count=4, sync_files=True); HuggingFaceStorageWriter
           (save_distributed=True, when this torch has it)
  stall    dcp.async_save: the time until it returns (what the training loop waits): ours
           (one UringStorageWriter kept for the run, staging through itself: its memory
           reused), DCP's default (a new FileSystemWriter() and default stager per save, as
           DCP's docs call it) and DCP with one DefaultStager kept for the run (its cache
           reused); "first stall" is each one's first save in the process (allocation and
           page faults included), "to durable" the time until its future completes
  reshard  a checkpoint saved on 4 ranks loaded on 2: UringStorageReader, FileSystemReader

Methods alternate round-robin within each repeat; the page cache is dropped before every
run (os.sync(), then ``echo 1 > /proc/sys/vm/drop_caches``; needs root, else a warning and
the cache stays); --warmup rounds (default 1: every process's first save of each method,
with its one-time set-up) are run and not counted; each figure is the median of --repeat
runs, a run's time being the slowest rank's. Before each world size's job, fio writes the
same size to the same directory (O_DIRECT, io_uring, queue depth 32, bs 1M and 8M, fsync at
the end: the device's limit; --no-fio skips it). Prints a markdown table (method, ranks,
median s, GiB/s, x best FileSystemWriter: the best FileSystemWriter's median over the row's,
so above 1 is faster; async rows compare with DCP's default async_save, reshard rows with
FileSystemReader; x fio best write: a durable save's GiB/s over fio's best) and writes it to
OUT/bench-dcp.md (--out, default $OUT or target/bench-dcp).

Usage: python scripts/bench-dcp.py [--size-mib 1024] [--ranks 1,2,4] [--repeat 3] [--warmup 1]
                                   [--dir target/bench-dcp/data] [--out DIR] [--no-fio]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

MIB = 1 << 20
GIB = 1 << 30
TENSORS = 8
COLS = 4096
"""Each tensor is (rows, COLS) float32; rows a multiple of 4 so every world size splits it evenly."""

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows_per_tensor(size_mib: float) -> int:
    rows = int(size_mib * MIB / TENSORS / (COLS * 4))
    return max(4, rows - rows % 4)


def total_bytes(size_mib: float) -> int:
    return TENSORS * rows_per_tensor(size_mib) * COLS * 4


def drop_caches(warned: list[bool]) -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError as e:
        if not warned:
            print(f"warning: cannot drop the page cache ({e}); reads may come from memory", file=sys.stderr)
            warned.append(True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------- rank side


def _state(mesh: Any, rows: int, zeros: bool = False) -> dict[str, Any]:
    """The state as this rank holds it: its rows of every tensor (deterministic values,
    the same whole tensors on 1, 2 and 4 ranks)."""
    import torch
    from torch.distributed.tensor import DTensor, Shard

    world, rank = mesh.size(), mesh.get_local_rank()
    local_rows = rows // world
    state: dict[str, Any] = {}
    for i in range(TENSORS):
        if zeros:
            local = torch.zeros(local_rows, COLS)
        else:  # the same values whatever the world size: 4 blocks of rows, each its own seed
            per_block, blocks = rows // 4, 4 // world
            local = torch.empty(local_rows, COLS)
            for b in range(blocks):
                g = torch.Generator().manual_seed(1000 * i + rank * blocks + b)
                local[b * per_block : (b + 1) * per_block].uniform_(-1, 1, generator=g)
        state[f"model.layers.{i}.weight"] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size([rows, COLS]), stride=(COLS, 1)
        )
    state["step"] = 7
    return state


def _writers(path: str) -> dict[str, Callable[[], Any]]:
    import torch.distributed.checkpoint as dcp

    from uring_ckpt.dcp import UringStorageWriter

    out: dict[str, Callable[[], Any]] = {
        "UringStorageWriter": lambda: UringStorageWriter(path),
        "FileSystemWriter(thread_count=1)": lambda: dcp.FileSystemWriter(path, thread_count=1, sync_files=True),
        "FileSystemWriter(thread_count=4)": lambda: dcp.FileSystemWriter(path, thread_count=4, sync_files=True),
    }
    hf = getattr(dcp, "HuggingFaceStorageWriter", None)
    if hf is not None:
        out["HuggingFaceStorageWriter"] = lambda: hf(path, save_distributed=True)
    return out


def _timed(fn: Callable[[], Any]) -> float:
    """Runs ``fn`` on every rank between barriers; the slowest rank's seconds."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item())


def _between_runs(rank: int, path: str | None, warned: list[bool]) -> None:
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        drop_caches(warned)
    dist.barrier()


def _progress(rank: int, world: int, what: str) -> None:
    if rank == 0:
        print(f"  {world} rank(s): {what}", file=sys.stderr, flush=True)


def _wait(future: Any) -> None:
    (future.upload_completion if hasattr(future, "upload_completion") else future).result()


def save_job(rank: int, world: int, port: int, args: dict[str, Any], out: str) -> None:
    """Saves with every writer, then the two async stalls, round-robin, --repeat times;
    on 4 ranks, also leaves one checkpoint of ours and one of FileSystemWriter for the
    reshard job."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.device_mesh import init_device_mesh

    from uring_ckpt.dcp import UringStorageWriter

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=1800)
    )
    mesh = init_device_mesh("cpu", (world,))
    # async_save's background thread runs its collectives on a group of its own, so they
    # never interleave with this thread's barriers on the default group.
    async_group = dist.new_group(backend="gloo")
    state = _state(mesh, args["rows"])
    path = os.path.join(args["dir"], f"save-w{world}")
    writers = _writers(path)
    # async_save as a training run calls it: our writer kept for the run (its staging memory
    # reused, as the README says to), DCP's writer as its docs show (a new default stager per
    # save), and DCP's DefaultStager kept for the run (its cache reused: DCP's best case).
    ours = UringStorageWriter(path)
    kept_stager = DefaultStager(StagingOptions(False, False, False, False))
    asyncs: dict[str, Callable[[], Any]] = {
        "async_save UringStorageWriter": lambda: dcp.async_save(
            state, storage_writer=ours, checkpoint_id=path, process_group=async_group
        ),
        "async_save FileSystemWriter (DCP default)": lambda: dcp.async_save(
            state, storage_writer=dcp.FileSystemWriter(path), process_group=async_group
        ),
        "async_save FileSystemWriter, DefaultStager kept": lambda: dcp.async_save(
            state, storage_writer=dcp.FileSystemWriter(path), async_stager=kept_stager, process_group=async_group
        ),
    }
    times: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    warned: list[bool] = []
    _between_runs(rank, path, warned)
    for rep in range(args["warmup"] + args["repeat"]):
        keep = rep >= args["warmup"]  # warm-up rounds (each process's first save) are not counted
        for name, make in writers.items():
            if name in errors:
                continue
            _progress(rank, world, name)
            try:
                t = _timed(lambda: dcp.save(state, storage_writer=make()))
                if keep:
                    times.setdefault(name, []).append(t)
            except Exception as e:  # noqa: BLE001 - a method that fails is reported, the rest go on
                errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
            _between_runs(rank, path, warned)
        for name, begin in asyncs.items():
            _progress(rank, world, name)
            pending: list[Any] = []

            def start(begin: Callable[[], Any] = begin, pending: list[Any] = pending) -> None:
                pending.append(begin())

            t0 = time.perf_counter()
            stall = _timed(start)
            _wait(pending[0])
            durable = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(durable, op=dist.ReduceOp.MAX)
            if rep == 0:
                times.setdefault(f"{name} (first stall)", []).append(stall)
            if keep:
                times.setdefault(f"{name} (stall)", []).append(stall)
                times.setdefault(f"{name} (to durable)", []).append(float(durable.item()))
            _between_runs(rank, path, warned)
    if world == 4:
        for kind, make in (("uring", lambda p: UringStorageWriter(p)), ("fs", lambda p: dcp.FileSystemWriter(p))):
            where = os.path.join(args["dir"], f"reshard-{kind}")
            if rank == 0:
                shutil.rmtree(where, ignore_errors=True)
            dist.barrier()
            dcp.save(state, storage_writer=make(where))
    if rank == 0:
        with open(os.path.join(out, f"save-w{world}.json"), "w") as f:
            json.dump({"times": times, "errors": errors}, f)
    dist.barrier()


def load_job(rank: int, world: int, port: int, args: dict[str, Any], out: str) -> None:
    """Loads the 4-rank checkpoints on ``world`` ranks, round-robin, --repeat times, and
    checks the values once."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from uring_ckpt.dcp import UringStorageReader

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=1800)
    )
    mesh = init_device_mesh("cpu", (world,))
    expected = _state(mesh, args["rows"])
    readers = {
        "reshard 4->2 UringStorageReader": lambda: UringStorageReader(os.path.join(args["dir"], "reshard-uring")),
        "reshard 4->2 FileSystemReader": lambda: dcp.FileSystemReader(os.path.join(args["dir"], "reshard-fs")),
    }
    times: dict[str, list[float]] = {}
    warned: list[bool] = []
    _between_runs(rank, None, warned)
    for rep in range(args["warmup"] + args["repeat"]):
        for name, make in readers.items():
            _progress(rank, world, name)
            dest = _state(mesh, args["rows"], zeros=True)
            t = _timed(lambda: dcp.load(dest, storage_reader=make()))
            if rep >= args["warmup"]:
                times.setdefault(name, []).append(t)
            if rep == 0:
                for key, want in expected.items():
                    got = dest[key]
                    same = got == want if key == "step" else torch.equal(got.to_local(), want.to_local())
                    if not same:
                        raise AssertionError(f"{name}: {key} differs after the load")
            del dest
            _between_runs(rank, None, warned)
    if rank == 0:
        with open(os.path.join(out, f"load-w{world}.json"), "w") as f:
            json.dump({"times": times, "errors": {}}, f)
    dist.barrier()


JOBS: dict[str, Callable[[int, int, int, dict[str, Any], str], None]] = {"save": save_job, "load": load_job}


def rank_main(job: str, rank: int, world: int, port: int, args: dict[str, Any], out: str) -> None:
    import torch

    torch.set_num_threads(1)
    try:
        JOBS[job](rank, world, port, args, out)
    except BaseException:  # the trace, then fail the process
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


# ---------------------------------------------------------------- launcher


def run(job: str, world: int, args: dict[str, Any], out: str, timeout: float) -> None:
    """Runs ``job`` on ``world`` spawned ranks; kills them all after ``timeout`` seconds."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(job, r, world, port, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise SystemExit(f"{job} on {world} ranks failed (exit codes {[p.exitcode for p in procs]})")


def fio_write(directory: str, size: int, bs: str) -> float:
    """fio's O_DIRECT sequential write of ``size`` bytes (io_uring, queue depth 32, fsync at
    the end) in ``directory``: GiB/s as fio reports it."""
    path = os.path.join(directory, "fio.dat")
    cmd = ["fio", "--name=seq", f"--filename={path}", "--rw=write", f"--bs={bs}", "--direct=1",
           "--ioengine=io_uring", "--iodepth=32", f"--size={size}", "--end_fsync=1", "--output-format=json"]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    finally:
        if os.path.exists(path):
            os.unlink(path)
    job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    return float(job["bw_bytes"]) / GIB


def table(results: list[tuple[str, int, dict[str, Any]]], size: int, fio_best: float | None) -> str:
    lines = [
        "| method | ranks | median s | GiB/s | x best FileSystemWriter | x fio best write |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, world, data in results:
        med = {name: statistics.median(ts) for name, ts in data["times"].items()}
        if kind == "save":
            fs = [v for k, v in med.items() if k.startswith("FileSystemWriter(")]
        else:
            fs = [v for k, v in med.items() if "FileSystemReader" in k]
        best_fs = min(fs) if fs else None
        for name, m in med.items():
            ref = best_fs
            for row in ("(first stall)", "(stall)", "(to durable)"):
                if name.endswith(row):  # async rows: against DCP's default async_save
                    ref = med.get(f"async_save FileSystemWriter (DCP default) {row}")
                    break
            ratio = f"{ref / m:.2f}" if ref and m > 0 else "-"
            durable = kind == "save" and not name.endswith("stall)")  # a write to durable
            vs_fio = f"{size / GIB / m / fio_best:.2f}" if fio_best and durable and m > 0 else "-"
            lines.append(f"| {name} | {world} | {m:.3f} | {size / GIB / m:.2f} | {ratio} | {vs_fio} |")
        for name, err in data["errors"].items():
            lines.append(f"| {name} | {world} | failed: {err.splitlines()[0][:120]} | - | - | - |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=float, default=1024, help="total state size (default 1024)")
    ap.add_argument("--ranks", default="1,2,4", help="world sizes to save with (default 1,2,4)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method; medians (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (default 1)")
    ap.add_argument("--dir", default=os.path.join(REPO, "target", "bench-dcp", "data"), help="checkpoint directory")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "target", "bench-dcp"))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per job before its ranks are killed")
    ap.add_argument("--no-reshard", action="store_true", help="skip the 4->2 resharded load")
    ap.add_argument("--no-fio", action="store_true", help="skip the fio O_DIRECT write reference")
    a = ap.parse_args()
    ranks = [int(r) for r in a.ranks.split(",") if r]
    os.makedirs(a.dir, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    args = {"rows": rows_per_tensor(a.size_mib), "repeat": a.repeat, "warmup": a.warmup, "dir": os.path.abspath(a.dir)}
    size = total_bytes(a.size_mib)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed.checkpoint as dcp

    results: list[tuple[str, int, dict[str, Any]]] = []
    fio: dict[str, list[float]] = {}
    use_fio = not a.no_fio and shutil.which("fio") is not None
    if not a.no_fio and not use_fio:
        print("warning: fio is not installed (apt-get install fio): no fio rows", file=sys.stderr)
    for world in ranks:
        if use_fio:  # the device's limit, measured between the jobs (alternating with them)
            for bs in ("1M", "8M"):
                print(f"fio write bs={bs} ...", file=sys.stderr, flush=True)
                fio.setdefault(bs, []).append(fio_write(args["dir"], size, bs))
        print(f"save, {world} rank(s) ...", file=sys.stderr, flush=True)
        run("save", world, args, a.out, a.timeout)
        with open(os.path.join(a.out, f"save-w{world}.json")) as f:
            results.append(("save", world, json.load(f)))
    reshard = not a.no_reshard
    if reshard and 4 not in ranks:
        print("save, 4 ranks (for the reshard) ...", file=sys.stderr, flush=True)
        run("save", 4, {**args, "repeat": 1, "warmup": 0}, a.out, a.timeout)
    if reshard:
        print("reshard load, 2 ranks ...", file=sys.stderr, flush=True)
        run("load", 2, args, a.out, a.timeout)
        with open(os.path.join(a.out, "load-w2.json")) as f:
            results.append(("load", 2, json.load(f)))
    notes = [
        f"# bench-dcp: {size / GIB:.3f} GiB state ({TENSORS} float32 DTensors, Shard(0)), "
        f"median of {a.repeat} after {a.warmup} warm-up round(s), torch {torch.__version__}, dir {a.dir}",
        "",
        "x best FileSystemWriter: the best FileSystemWriter median over the row's (above 1: faster);"
        " async_save rows compare with DCP's default async_save (FileSystemWriter), reshard rows"
        " with FileSystemReader. GiB/s of a stall row: state size over the stall.",
        "",
    ]
    if not hasattr(dcp, "HuggingFaceStorageWriter"):
        notes += ["HuggingFaceStorageWriter: skipped, this torch has none.", ""]
    fio_best = max((statistics.median(v) for v in fio.values()), default=None)
    if fio:
        notes += [
            "fio O_DIRECT write (io_uring, qd32, end_fsync, one job, same size and directory; median of "
            f"{len(next(iter(fio.values())))} runs between the jobs): "
            + ", ".join(f"bs={bs} {statistics.median(v):.2f} GiB/s" for bs, v in fio.items())
            + "; x fio best write: a save row's GiB/s over the best of these.",
            "",
        ]
    text = "\n".join(notes) + table(results, size, fio_best) + "\n"
    print(text)
    with open(os.path.join(a.out, "bench-dcp.md"), "w") as f:
        f.write(text)
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
