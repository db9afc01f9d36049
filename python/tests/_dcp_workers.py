"""The rank side of test_dcp.py: functions run in spawned processes (one per rank), each
joining a gloo process group on 127.0.0.1 and writing what it saw to ``<out>/<phase>-<rank>.json``.

Kept out of the test module so that a spawned rank imports only this (torch, uring_ckpt),
not pytest's collection of the tests."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from uring_ckpt.dcp import UringStorageReader, UringStorageWriter

GLOO_TIMEOUT = timedelta(seconds=10)
"""Every collective of a rank gives up after this long (a dead peer never answers)."""


def full_tensors(seed: int) -> dict[str, torch.Tensor]:
    """The whole (unsharded) values of the test state, different for each ``seed``."""
    return {
        # 12 rows: 3 per rank on 4 ranks, 4 on 3, 6 on 2 (loads on 3 read parts of chunks).
        "a": torch.arange(12 * 5, dtype=torch.float32).reshape(12, 5) + seed,
        # 10 rows: uneven chunks (3, 3, 3, 1 on 4 ranks; 4, 4, 2 on 3).
        "b": (torch.arange(10 * 3, dtype=torch.int64) * 7 + seed).reshape(10, 3),
        "c": torch.linspace(0, 1, 16, dtype=torch.float64).reshape(4, 4) + seed,
        "plain": torch.arange(7, dtype=torch.bfloat16) + seed,
        # complex128 has no safetensors dtype: stored as raw bytes.
        "z": torch.complex(torch.arange(6, dtype=torch.float64), torch.full((6,), float(seed), dtype=torch.float64)),
    }


def sharded_state(seed: int, mesh: Any, zeros: bool = False) -> dict[str, Any]:
    """The state as each rank holds it: ``a``, ``b`` sharded on dim 0, ``c`` replicated
    (DTensors on ``mesh``), plain tensors, an int and a BytesIO; zeros (and empty values)
    when it is a destination to load into."""
    full = full_tensors(seed)
    if zeros:
        full = {k: torch.zeros_like(v) for k, v in full.items()}
    return {
        "model": {
            "a": distribute_tensor(full["a"], mesh, [Shard(0)]),
            "b": distribute_tensor(full["b"], mesh, [Shard(0)]),
            "c": distribute_tensor(full["c"], mesh, [Replicate()]),
        },
        "plain": full["plain"],
        "z": full["z"],
        "step": 0 if zeros else 100 + seed,
        "blob": io.BytesIO() if zeros else io.BytesIO(b"bytes of step %d" % seed),
    }


def check_loaded(state: dict[str, Any], seed: int) -> dict[str, Any]:
    """Compares a loaded state with what ``seed`` saved: the local shards and the whole
    tensors (gathered)."""
    full = full_tensors(seed)
    out: dict[str, Any] = {}
    for key in ("a", "b", "c"):
        dt = state["model"][key]
        whole = dt.full_tensor()
        out[key] = bool(torch.equal(whole, full[key]))
        expected_local = distribute_tensor(full[key], dt.device_mesh, dt.placements).to_local()
        out[key + "_local"] = bool(torch.equal(dt.to_local(), expected_local))
    out["plain"] = bool(torch.equal(state["plain"], full["plain"]))
    out["z"] = bool(torch.equal(state["z"], full["z"]))
    out["step"] = state["step"] == 100 + seed
    blob = state["blob"]
    out["blob"] = (blob.getvalue() if isinstance(blob, io.BytesIO) else blob) == b"bytes of step %d" % seed
    return out


class FaultyPlanner(DefaultSavePlanner):
    """Makes rank ``rank`` fail inside ``write_data`` (whose first step is resolving the
    items): ``"raise"`` raises, ``"kill"`` sends itself SIGKILL."""

    def __init__(self, rank: int, how: str) -> None:
        super().__init__()
        self.fault_rank = rank
        self.how = how

    def resolve_data(self, write_item: Any) -> Any:
        if dist.get_rank() == self.fault_rank:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure on rank {self.fault_rank}")
        return super().resolve_data(write_item)


def _join(rank: int, world: int, port: int) -> Any:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=GLOO_TIMEOUT
    )
    return init_device_mesh("cpu", (world,))


def _report(out: str, phase: str, rank: int, result: dict[str, Any]) -> None:
    tmp = os.path.join(out, f".{phase}-{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, os.path.join(out, f"{phase}-{rank}.json"))


def main(rank: int, world: int, ports: list[int], scenario: str, path: str, out: str) -> None:
    """Entry point of every spawned rank."""
    torch.set_num_threads(1)
    try:
        SCENARIOS[scenario](rank, world, ports, path, out)
    except BaseException as e:  # report it, then fail the process
        _report(out, "error", rank, {"error": repr(e), "trace": traceback.format_exc()})
        os._exit(1)
    os._exit(0)  # no teardown of process groups a dead peer may have broken


def reshard(rank: int, world: int, ports: list[int], path: str, out: str) -> None:
    """Saves on ``world`` (4) ranks, then loads on 2 and on 3 of them (new process groups)."""
    mesh = _join(rank, world, ports[0])
    dcp.save(sharded_state(1, mesh), storage_writer=UringStorageWriter(path))
    _report(out, "saved", rank, {"ok": True})
    dist.destroy_process_group()
    for new_world, port in ((2, ports[1]), (3, ports[2])):
        if rank < new_world:
            mesh = _join(rank, new_world, port)
            state = sharded_state(0, mesh, zeros=True)
            reader = UringStorageReader(path)
            dcp.load(state, storage_reader=reader)
            _report(out, f"load{new_world}", rank, {**check_loaded(state, 1), "counts": reader.read_counts})
            dist.destroy_process_group()


def _listing(path: str) -> list[str]:
    return sorted(os.listdir(os.path.dirname(path)))


def _load_check(path: str, mesh: Any, seed: int) -> dict[str, Any]:
    state = sharded_state(0, mesh, zeros=True)
    dcp.load(state, storage_reader=UringStorageReader(path))
    return check_loaded(state, seed)


def raising_rank(rank: int, world: int, ports: list[int], path: str, out: str) -> None:
    """Saves A; a save of B where rank 1 raises in write_data (everyone must get DCP's
    CheckpointException, nothing committed, A intact); then a save of C (the leftover of B
    removed); A, then C, checked by loading on all ranks."""
    mesh = _join(rank, world, ports[0])
    dcp.save(sharded_state(1, mesh), storage_writer=UringStorageWriter(path, replace=True))
    failed: dict[str, Any] = {}
    try:
        dcp.save(
            sharded_state(2, mesh),
            storage_writer=UringStorageWriter(path, replace=True),
            planner=FaultyPlanner(1, "raise"),
        )
        failed["raised"] = None
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - what DCP raises is the point
        failed["raised"] = type(e).__name__
        failed["message"] = str(e)[:2000]
    failed["listing"] = _listing(path)
    failed["loaded"] = _load_check(path, mesh, 1)
    _report(out, "failed", rank, failed)
    dist.barrier()
    dcp.save(sharded_state(3, mesh), storage_writer=UringStorageWriter(path, replace=True))
    dist.barrier()
    _report(out, "after", rank, {"listing": _listing(path), "loaded": _load_check(path, mesh, 3)})


def killed_rank(rank: int, world: int, ports: list[int], path: str, out: str) -> None:
    """Saves A; a save of B where rank 1 SIGKILLs itself in write_data. The survivors
    report what they got and how long it took (bounded by the gloo timeout)."""
    mesh = _join(rank, world, ports[0])
    dcp.save(sharded_state(1, mesh), storage_writer=UringStorageWriter(path, replace=True))
    dist.barrier()
    started = time.monotonic()
    result: dict[str, Any] = {}
    try:
        dcp.save(
            sharded_state(2, mesh),
            storage_writer=UringStorageWriter(path, replace=True),
            planner=FaultyPlanner(1, "kill"),
        )
        result["raised"] = None
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - what the survivors get is the point
        result["raised"] = type(e).__name__
        result["message"] = str(e)[:2000]
    result["seconds"] = time.monotonic() - started
    _report(out, "killed", rank, result)


def _result(future: Any) -> Any:
    """What an ``async_save`` returned, waited for: a Future, or an AsyncSaveResponse."""
    return (future.upload_completion if hasattr(future, "upload_completion") else future).result()


def async_modes(rank: int, world: int, ports: list[int], path: str, out: str) -> None:
    """``dcp.async_save`` with a UringStorageWriter in thread mode, then in process mode
    (the writer, pickled, saves from DCP's checkpoint process with its own gloo group),
    each loaded back on all ranks; the writer's config travels with it."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    import uring_ckpt

    os.environ["MASTER_ADDR"] = "127.0.0.1"  # where DCP's checkpoint processes meet
    mesh = _join(rank, world, ports[0])
    config = uring_ckpt.Config(chunk_size="4MiB", io_threads=2)
    result: dict[str, Any] = {}
    writer = UringStorageWriter(f"{path}-thread", config)  # one writer, its staging memory kept
    for seed, mode in ((1, AsyncCheckpointerType.THREAD), (2, AsyncCheckpointerType.PROCESS)):
        where = f"{path}-{mode.value}"
        started = time.monotonic()
        future = dcp.async_save(
            sharded_state(seed, mesh),
            storage_writer=writer,
            checkpoint_id=where,
            async_checkpointer_type=mode,
        )
        result[f"{mode.value}_staging"] = writer.staging_stats
        result[f"{mode.value}_returned_s"] = time.monotonic() - started
        _result(future)
        dist.barrier()
        result[mode.value] = _load_check(where, mesh, seed)
        result[f"{mode.value}_listing"] = _listing(where)
    _report(out, "async", rank, result)
    # Stop DCP's checkpoint process before os._exit (which skips the finalizers that would).
    from torch.distributed.checkpoint import _async_process_executor

    process = getattr(_async_process_executor, "_CHECKPOINT_PROCESS", None)
    if process is not None:
        process.__del__()


SCENARIOS: dict[str, Callable[[int, int, list[int], str, str], None]] = {
    "reshard": reshard,
    "raising_rank": raising_rank,
    "killed_rank": killed_rank,
    "async_modes": async_modes,
}
