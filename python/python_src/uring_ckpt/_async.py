"""Asynchronous saves: the caller waits only until the tensors are snapshotted (*staged*);
the write, fsync and commit (*durable*) happen on a background thread."""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from . import _pytree

if TYPE_CHECKING:
    from . import ConfigLike, PathLike


class SaveFuture:
    """The two completions of one asynchronous save.

    ``staged()``: the state has been snapshotted; the caller may change its tensors.
    ``durable()``: the checkpoint is committed on disk; returns the save report, or raises
    the save's error.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._staged = threading.Event()
        self._durable = threading.Event()
        self._report: Optional[dict[str, Any]] = None
        self._error: Optional[BaseException] = None
        self.stall_seconds = 0.0
        """Seconds the caller of ``AsyncSaver.save`` waited (flatten + snapshot)."""

    def staged(self, timeout: Optional[float] = None) -> bool:
        """Waits until the tensors are snapshotted; False on timeout. Raises the save's
        error if it failed before staging."""
        if not self._staged.wait(timeout):
            return False
        if self._error is not None and self._report is None and not self._durable.is_set():
            raise self._error
        return True

    def durable(self, timeout: Optional[float] = None) -> dict[str, Any]:
        """Waits until the checkpoint is committed and durable and returns the save report;
        raises the save's error, or ``TimeoutError``."""
        if not self._durable.wait(timeout):
            raise TimeoutError(f"save of {self.path} not durable after {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._report is not None
        return self._report

    result = durable

    def done(self) -> bool:
        """Whether the save finished (committed or failed)."""
        return self._durable.is_set()

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """The save's error once it finished (None if it succeeded)."""
        if not self._durable.wait(timeout):
            raise TimeoutError(f"save of {self.path} not finished after {timeout}s")
        return self._error

    def _set_staged(self) -> None:
        self._staged.set()

    def _finish(self, report: Optional[dict[str, Any]], error: Optional[BaseException]) -> None:
        self._report, self._error = report, error
        self._staged.set()
        self._durable.set()


class AsyncSaver:
    """Saves in the background, one after the other, at most ``max_in_flight`` unfinished
    saves at a time (a further ``save`` waits for the oldest).

    ``save`` snapshots every tensor (a copy into new CPU memory: this copy is the caller's
    whole stall) and the pickled rest, then returns a :class:`SaveFuture`; the write runs
    on a background thread with the GIL released. Use as a context manager, or call
    :meth:`close`, to wait for the last save.
    """

    def __init__(self, config: ConfigLike = None, *, max_in_flight: int = 1) -> None:
        from . import _config

        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._config = _config(config)
        self._max = max_in_flight
        self._queue: deque[tuple[SaveFuture, _pytree.Flattened, str, Any, Optional[dict[str, str]]]] = deque()
        self._pending: list[SaveFuture] = []
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def save(
        self,
        state: Any,
        path: PathLike,
        *,
        replace: Optional[bool] = None,
        metadata: Optional[dict[str, str]] = None,
    ) -> SaveFuture:
        """Snapshots ``state`` and queues its save to ``path``; returns once staged."""
        started = time.perf_counter()
        with self._cond:
            if self._closed:
                raise RuntimeError("AsyncSaver is closed")
            while len([f for f in self._pending if not f.done()]) >= self._max:
                self._cond.wait()
            self._pending = [f for f in self._pending if not f.done()]
        future = SaveFuture(os.fspath(path))
        flat = _pytree.flatten(state, snapshot=True)
        future._set_staged()
        future.stall_seconds = time.perf_counter() - started
        with self._cond:
            self._pending.append(future)
            self._queue.append((future, flat, os.fspath(path), replace, metadata))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="uring-ckpt-async", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return future

    def _run(self) -> None:
        from . import _save_flat, _writer

        while True:
            with self._cond:
                if not self._queue:
                    self._thread = None
                    return
                future, flat, path, replace, metadata = self._queue.popleft()
            report: Optional[dict[str, Any]] = None
            error: Optional[BaseException] = None
            try:
                report = _save_flat(_writer(self._config, replace), flat, path, metadata)
            except BaseException as e:  # noqa: BLE001 - handed to the future's owner
                error = e
            del flat  # the snapshot's memory goes as soon as it is on disk
            with self._cond:
                future._finish(report, error)
                self._cond.notify_all()

    def pending(self) -> list[SaveFuture]:
        """Saves not finished yet."""
        with self._cond:
            return [f for f in self._pending if not f.done()]

    def wait(self, timeout: Optional[float] = None) -> None:
        """Waits for every queued save; raises the first error among them (once: the saves
        waited for are then forgotten)."""
        with self._cond:
            futures = list(self._pending)
        first: Optional[BaseException] = None
        for f in futures:
            error = f.exception(timeout)
            if first is None:
                first = error
        with self._cond:  # an error is raised once: forget finished saves
            self._pending = [f for f in self._pending if not f.done()]
        if first is not None:
            raise first

    def close(self) -> None:
        """Waits for every queued save (raising the first error) and refuses new ones."""
        with self._cond:
            self._closed = True
        self.wait()

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
