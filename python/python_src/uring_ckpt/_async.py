"""Asynchronous saves through the Rust ``AsyncCheckpointIO``: the caller waits only until the
tensors are *staged* (copied into a reused host area in ``snapshot`` mode, or streamed
through the staging ring in ``stream`` mode); the write, fsync and commit (*durable*) go on
in the background with the GIL released."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from . import _pytree
from ._common import ConfigLike, PathLike, coerce_config, save_args, save_report
from ._optional import torch_module as _torch
from ._uring_ckpt import AsyncWriter
from ._uring_ckpt import SaveHandle as _SaveHandle


class SaveFuture:
    """The two completions of one asynchronous save.

    ``staged()``: the save no longer reads the tensors; the caller may change them.
    ``durable()``: the checkpoint is committed on disk; returns the save report, or raises
    the save's error.
    """

    def __init__(self, handle: _SaveHandle, stall_seconds: float, copied_bytes: int) -> None:
        self._handle = handle
        self.path = os.fspath(handle.path)
        self.stall_seconds = stall_seconds
        """Seconds the caller of ``AsyncSaver.save`` waited (flatten, pickle, staging)."""
        self._copied = copied_bytes

    def staged(self, timeout: float | None = None) -> bool:
        """Waits until the tensors are no longer read; False on timeout."""
        return self._handle.wait_staged(timeout)

    def durable(self, timeout: float | None = None) -> dict[str, Any]:
        """Waits until the checkpoint is committed and durable and returns the save report;
        raises the save's error, or ``TimeoutError``."""
        report = self._handle.wait_durable(timeout)
        if report is None:
            raise TimeoutError(f"save of {self.path} not durable after {timeout}s")
        out = save_report(report, self._copied)
        out["python_stall_seconds"] = self.stall_seconds
        return out

    result = durable

    def done(self) -> bool:
        """Whether the save finished (committed or failed)."""
        return self._handle.is_done()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The save's error once it finished (None if it succeeded)."""
        try:
            self.durable(timeout)
        except TimeoutError:
            if not self.done():
                raise
            return None  # pragma: no cover - finished between the two checks
        except Exception as e:  # noqa: BLE001 - the save's error, handed to the caller
            return e
        return None


class AsyncSaver:
    """Saves in the background, at most ``max_in_flight`` at a time (a further ``save``
    waits for a slot; a save to a path being written waits for that save). Use as a
    context manager, or call :meth:`close`, to wait for the last save.

    ``save`` returns once the save no longer reads the tensors (*staged*); the write, fsync
    and commit go on in the background. ``mode`` says how the tensors are staged (it
    overrides the config's ``async_mode``, as ``max_in_flight`` overrides
    ``max_saves_in_flight``):

    - ``"snapshot"`` (default): one multi-threaded memory copy into a host area, then
      ``save`` returns. Memory: a host copy of the checkpoint per save in flight, kept and
      reused by later saves while the saver lives.
    - ``"stream"``: through the bounded staging ring. Memory: the staging pool
      (``staging_pool_size``, 32 MiB by default); but ``save`` returns only once the last
      chunk is in the ring, so training stalls about as long as the checkpoint takes to
      write (less one pool's worth), nearly as long as a synchronous :func:`save`.

    The Rust ``AsyncCheckpointIO`` (and the config's ``async_mode``) defaults to
    ``"stream"`` instead, on purpose: a Rust caller hands the save an ``OwnedCheckpoint``
    whose bytes the save owns, so it goes on without waiting for *staged*, and a snapshot
    would only copy those bytes a second time. Here the tensors are the model's own,
    read in place, so the caller must wait until they are staged; ``"snapshot"`` makes that
    wait one memory copy. Pass ``mode="stream"`` when a host copy of the checkpoint does not
    fit in memory.

    CUDA tensors (with a CUDA build, see :func:`uring_ckpt.cuda_available`) are copied
    from device memory by the background save, in either mode; ``save`` returns once they
    are staged, and they are not copied in Python.

    ``reserve`` (snapshot mode): a byte count, or a state like the ones ``save`` takes (an
    ``nn.Module`` stands for its ``state_dict()``), whose snapshot area is made and faulted
    in right away on a helper thread, so that the *first* save copies into memory that is
    already there, as later saves do, instead of faulting a fresh area in while the caller
    waits (see :meth:`reserve`).

    Once staged, a save's threads drop to the config's ``background_nice`` (10 by default)
    and write with at most ``background_threads`` threads (2), so that the write takes
    little CPU from training.
    """

    def __init__(
        self,
        config: ConfigLike = None,
        *,
        max_in_flight: int = 1,
        mode: str = "snapshot",
        reserve: Any = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.config = coerce_config(config).replace(async_mode=mode, max_saves_in_flight=max_in_flight)
        self.mode = mode
        self._writer = AsyncWriter(self.config)
        self._futures: list[SaveFuture] = []
        self._lock = threading.Lock()
        self._closed = False
        if reserve is not None:
            self.reserve(reserve)

    def reserve(self, state: Any) -> int:
        """Makes the snapshot area for a checkpoint of ``state`` (a byte count, a state as
        ``save`` takes, or an ``nn.Module``: its ``state_dict()``) and faults it in on a helper
        thread at ``background_nice``; returns at once, with the bytes asked for.

        A kept area is grown (its pages kept) rather than replaced; an area at least this
        large is left as it is. A save that comes while the helper is at work takes the area
        over (the copy faults in the rest): it is never slower than without the reservation.
        Memory: the area is this size until the first save, then that save's size. Snapshot
        mode only (``ValueError`` otherwise)."""
        if self.mode != "snapshot":
            raise ValueError(f"reserve needs mode='snapshot', not {self.mode!r}")
        nbytes = snapshot_bytes(state)
        if nbytes > 0:
            self._writer.reserve(nbytes)
        return nbytes

    def wait_reserved(self) -> None:
        """Waits (GIL released) until no reservation is faulting an area in."""
        self._writer.wait_reserved()

    def snapshot_stats(self) -> dict[str, Any]:
        """The snapshot areas: ``areas`` (kept for the next saves), ``in_use`` (by saves
        running), ``reserved_bytes`` and ``resident_bytes`` (of the kept areas: their size and
        how much of it is faulted in), ``reserving`` (a helper at work), ``pending_bytes`` (a
        reservation waiting for an area in use)."""
        return dict(self._writer.snapshot_stats())

    def save(
        self,
        state: Any,
        path: PathLike,
        *,
        metadata: dict[str, str] | None = None,
        extra_files: dict[str, bytes] | None = None,
    ) -> SaveFuture:
        """Queues the save of ``state`` to ``path``; returns once it is staged. ``metadata``
        and ``extra_files`` as for :func:`uring_ckpt.save`."""
        if self._closed:
            raise RuntimeError("AsyncSaver is closed")
        started = time.perf_counter()
        flat = _pytree.flatten(state)
        handle = self._writer.save(*save_args(flat, path, metadata, extra_files))
        handle.wait_staged()
        future = SaveFuture(handle, time.perf_counter() - started, flat.copied_bytes)
        with self._lock:
            # Finished saves are forgotten unless they failed: wait() and close() raise those.
            self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
            self._futures.append(future)
        return future

    def pending(self) -> list[SaveFuture]:
        """Saves not finished yet."""
        with self._lock:
            return [f for f in self._futures if not f.done()]

    def wait(self, timeout: float | None = None) -> None:
        """Waits for every save started here; raises the first error among them (once: the
        saves waited for are then forgotten)."""
        with self._lock:
            futures, self._futures = self._futures, []
        wait_all(futures, timeout)

    def close(self) -> None:
        """Waits for every save (raising the first error) and refuses new ones."""
        self._closed = True
        try:
            self.wait()
        finally:
            self._writer.teardown()

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def snapshot_bytes(state: Any) -> int:
    """The bytes a snapshot of ``state`` takes: ``state`` itself if it is an int, the tensor
    bytes of an ``nn.Module``'s ``state_dict()``, else those of the state as ``save`` would
    store it (tied tensors once; nothing is copied)."""
    if isinstance(state, bool):
        raise TypeError("a snapshot size must be a byte count or a state, not a bool")
    if isinstance(state, int):
        if state < 0:
            raise ValueError(f"a snapshot size must not be negative, got {state}")
        return state
    torch = _torch()
    if torch is not None and isinstance(state, torch.nn.Module):
        state = state.state_dict()
    return _pytree.tensor_bytes(state)


def wait_all(futures: Iterable[SaveFuture], timeout: float | None = None) -> None:
    """Waits for every one of ``futures`` (each up to ``timeout``); then raises the first
    error among them, if any."""
    first: BaseException | None = None
    for f in futures:
        error = f.exception(timeout)
        if first is None:
            first = error
    if first is not None:
        raise first
