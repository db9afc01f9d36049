"""Spawning the ranks of a multi-process test on one machine and reading what they wrote:
shared by test_dcp.py and test_lightning_dist.py (their ranks: _dcp_workers.py,
_lightning_workers.py). Every rank writes ``<phase>-<rank>.json`` into ``out``, and
``error-<rank>.json`` with its traceback when it fails."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from typing import Any, Callable


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now on 127.0.0.1."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def spawn_ranks(
    target: Callable[..., Any], world: int, args: tuple, deadline_s: float, daemon: bool = True
) -> list[int | None]:
    """Runs ``target(rank, world, *args)`` in ``world`` spawned processes (one BLAS thread
    each) and returns their exit codes once all ended or ``deadline_s`` passed (None: still
    running then, and killed)."""
    ctx = multiprocessing.get_context("spawn")
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        procs = [ctx.Process(target=target, args=(r, world, *args), daemon=daemon) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + deadline_s
    codes: list[int | None] = []
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def read(out: str, phase: str, rank: int) -> dict[str, Any]:
    """What rank ``rank`` wrote for ``phase``."""
    with open(os.path.join(out, f"{phase}-{rank}.json")) as f:
        result: dict[str, Any] = json.load(f)
    return result


def errors(out: str, world: int) -> str:
    """The tracebacks of the ranks that failed, for assertion messages."""
    found = []
    for rank in range(world):
        p = os.path.join(out, f"error-{rank}.json")
        if os.path.exists(p):
            found.append(f"rank {rank}: {read(out, 'error', rank)['trace']}")
    return "\n".join(found)
