"""PyTorch Lightning plugins: ``Trainer(plugins=[UringCheckpointIO()])``.

A checkpoint is a directory at the path Lightning asks for (``epoch=0-step=10.ckpt`` is a
directory holding shards, ``extras.pkl`` and ``manifest.json``); ``ModelCheckpoint``,
``save_top_k`` rotation (through ``remove_checkpoint``), ``save_last`` and
``Trainer.fit(ckpt_path=...)`` work with it as with a file. Saving to an existing path
replaces that checkpoint atomically, as Lightning expects (``last.ckpt``).

Loading is safe by default: ``load_checkpoint`` with ``weights_only=None`` (what the Trainer
passes unless told otherwise) or ``True`` reads the sidecar with uring_ckpt's restricted
unpickler, which never runs code (see :func:`uring_ckpt.load`); a refused global raises
:class:`uring_ckpt.UnsafeCheckpointError`. Only an explicit ``weights_only=False``
(``Trainer.fit(..., weights_only=False)``) unpickles everything, for checkpoints you trust.

The first asynchronous save need not stall longer than the later ones: give the Trainer
the plugin's :meth:`AsyncUringCheckpointIO.reserve_callback` too, and the snapshot area is
made and faulted in, in the background, before the first save (see :class:`ReserveSnapshot`)::

    io = AsyncUringCheckpointIO()
    Trainer(plugins=[io], callbacks=[io.reserve_callback(), ModelCheckpoint(...)])

Works with ``lightning`` (``lightning.pytorch``) or, failing that, ``pytorch_lightning``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ._api import load, remove, save
from ._async import AsyncSaver, SaveFuture, snapshot_bytes, wait_all
from ._common import ConfigLike, coerce_config

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone pytorch_lightning package
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO  # type: ignore[no-redef,assignment]
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment]

__all__ = ["AsyncUringCheckpointIO", "ReserveSnapshot", "UringCheckpointIO"]


def _device(map_location: Any) -> Any:
    """torch.load's ``map_location`` as a ``uring_ckpt.load`` device: None keeps each tensor
    on the device it was saved from, a callable maps to the CPU (it receives CPU storages)."""
    if map_location is None or isinstance(map_location, dict):
        return map_location
    if callable(map_location):
        return "cpu"
    return map_location


class UringCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that saves through uring_ckpt (io_uring + O_DIRECT, atomic
    commit). ``config``: a :class:`uring_ckpt.Config`, a dict of its keys, or None for the
    environment's; replacing an existing checkpoint is always allowed."""

    def __init__(self, config: ConfigLike = None, *, verify_on_load: bool = True) -> None:
        super().__init__()
        self.config = coerce_config(config, replace=True)
        self.verify_on_load = verify_on_load

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        self._refuse_storage_options(storage_options)
        save(checkpoint, path, config=self.config)

    def _refuse_storage_options(self, storage_options: Any | None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} does not support storage_options, got {storage_options!r}"
            )

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Loads the checkpoint directory at ``path``. ``weights_only``: None (the default)
        and True read the sidecar with the restricted unpickler, which never runs code; only
        False unpickles everything (trusted checkpoints only)."""
        state: dict[str, Any] = load(
            path,
            device=_device(map_location),
            verify=self.verify_on_load,
            weights_only=weights_only is not False,
            config=self.config,
        )
        return state

    def remove_checkpoint(self, path: Any) -> None:
        remove(path, config=self.config)

    def teardown(self) -> None:
        pass


class AsyncUringCheckpointIO(UringCheckpointIO):
    """Like :class:`UringCheckpointIO`, but ``save_checkpoint`` returns once the tensors are
    snapshotted (copied to host memory: :class:`uring_ckpt.AsyncSaver`'s ``snapshot``
    mode, whatever the config's ``async_mode``); the write and commit run in the background
    (``max_in_flight`` saves at most; each holds a host copy of the checkpoint), at the
    config's ``background_nice`` with at most ``background_threads`` writer threads.
    ``remove_checkpoint`` (``save_top_k`` rotation) runs in the background too, on one thread
    at ``background_nice``, after the saves of that path: deleting a checkpoint can take as
    long as writing it (a file system mounted with ``discard`` trims every freed block
    before ``unlink`` returns), and the training loop need not wait for it. A save to a path
    being removed waits for the removal; loads and ``teardown`` wait for every save and
    removal. An error of a background save or removal is raised by the next
    ``save_checkpoint``, ``load_checkpoint``, ``remove_checkpoint`` or ``teardown``.

    ``reserve``: the snapshot area to make and fault in right away, in the background (a byte
    count, a state, or an ``nn.Module``; see :meth:`uring_ckpt.AsyncSaver.reserve`), so that
    the first save stalls no longer than later ones. Without it, :meth:`reserve_callback`
    sizes the area from the model and its optimizers during ``fit``."""

    def __init__(
        self,
        config: ConfigLike = None,
        *,
        verify_on_load: bool = True,
        max_in_flight: int = 1,
        reserve: Any = None,
    ) -> None:
        super().__init__(config, verify_on_load=verify_on_load)
        self.max_in_flight = max_in_flight
        self._saver: AsyncSaver | None = None
        self._futures: list[SaveFuture] = []
        self._removals: list[tuple[str, Future[None]]] = []
        self._remover: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        if reserve is not None:
            self.reserve(reserve)

    def saver(self) -> AsyncSaver:
        """The :class:`uring_ckpt.AsyncSaver` behind the plugin (made on first use)."""
        with self._lock:
            if self._saver is None:
                self._saver = AsyncSaver(self.config, max_in_flight=self.max_in_flight)
            return self._saver

    def reserve(self, state: Any) -> int:
        """Makes the snapshot area for a checkpoint of ``state`` (bytes, a state or an
        ``nn.Module``) and faults it in on a helper thread; returns at once, with the bytes
        asked for (see :meth:`uring_ckpt.AsyncSaver.reserve`)."""
        return self.saver().reserve(state)

    def reserve_callback(self, *, slack: int = 1 << 20) -> ReserveSnapshot:
        """A Lightning callback that reserves this plugin's snapshot area during ``fit``,
        sized from the model and the optimizers (plus ``slack`` bytes): pass it to the
        Trainer's ``callbacks`` (see :class:`ReserveSnapshot`)."""
        return ReserveSnapshot(self, slack=slack)

    def _raise_finished_errors(self) -> None:
        with self._lock:
            done = [f for f in self._futures if f.done()]
            self._futures = [f for f in self._futures if not f.done()]
            removed = [f for _, f in self._removals if f.done()]
            self._removals = [(k, f) for k, f in self._removals if not f.done()]
        errors = [f.exception() for f in done] + [f.exception() for f in removed]
        for error in errors:
            if error is not None:
                raise error

    def _wait_all(self) -> None:
        with self._lock:
            futures, self._futures = self._futures, []
            removals, self._removals = self._removals, []
        first: BaseException | None = None
        for _, removal in removals:
            error = removal.exception()
            first = first or error
        try:
            wait_all(futures)
        finally:
            if first is not None:
                raise first

    def _wait_removal_of(self, key: str) -> None:
        """Waits for the removals of ``key`` in flight (their errors are raised later)."""
        with self._lock:
            pending = [f for k, f in self._removals if k == key]
        for f in pending:
            f.exception()

    def _remove_later(self, path: Any, saves: list[SaveFuture]) -> None:
        """Waits for ``saves`` (their errors are the saves' to raise), then removes ``path``."""
        for f in saves:
            f.exception()
        UringCheckpointIO.remove_checkpoint(self, path)

    def _lower_priority(self) -> None:
        """The removal thread's start: down to ``background_nice``, never back up."""
        nice = self.config.background_nice
        if nice > 0 and hasattr(os, "setpriority"):
            tid = threading.get_native_id()
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
            except OSError:  # pragma: no cover - lowering one's own priority is always allowed
                pass

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        self._refuse_storage_options(storage_options)
        self._wait_removal_of(os.path.abspath(os.fspath(path)))
        self._raise_finished_errors()
        future = self.saver().save(checkpoint, path)
        with self._lock:
            self._futures.append(future)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        self._wait_all()
        return super().load_checkpoint(path, map_location, weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        """Removes ``path`` in the background, once the saves of that path are done."""
        self._raise_finished_errors()
        key = os.path.abspath(os.fspath(path))
        with self._lock:
            saves = [f for f in self._futures if os.path.abspath(f.path) == key]
            if self._remover is None:
                self._remover = ThreadPoolExecutor(
                    1, thread_name_prefix="uring-ckpt-remove", initializer=self._lower_priority
                )
            self._removals.append((key, self._remover.submit(self._remove_later, path, saves)))

    def teardown(self) -> None:
        """Waits for every save and removal in flight; raises the first error among them."""
        try:
            self._wait_all()
        finally:
            self._saver = None
            remover, self._remover = self._remover, None
            if remover is not None:
                remover.shutdown(wait=True)


class ReserveSnapshot(Callback):
    """Reserves the snapshot area of an :class:`AsyncUringCheckpointIO` ahead of its first
    save, so that the first save's stall is one memory copy, as the later ones are, instead
    of that plus faulting a fresh area in: at ``fit`` start for the model's ``state_dict()``
    and the optimizers' state so far, then after each training batch until every optimizer
    has state (Adam makes its moments at its first step), each time for the bytes counted
    plus ``slack``, rounded up to 2 MiB. The area is made at once and faulted in on a helper
    thread at the config's ``background_nice``; a larger estimate grows it (its pages kept);
    the first save trims it to that save's size. Counting walks the state's tensors only
    (nothing is copied).

    ``Trainer(plugins=[io], callbacks=[io.reserve_callback(), ...])``."""

    def __init__(self, io: AsyncUringCheckpointIO, *, slack: int = 1 << 20) -> None:
        super().__init__()
        self.io = io
        self.slack = slack
        self.reserved = 0
        """Bytes asked for so far."""
        self._settled = False
        self._batches = 0

    @staticmethod
    def estimate(trainer: Any, pl_module: Any) -> int:
        """Tensor bytes of the model's ``state_dict()`` and the optimizers' state now: the
        bulk of a Lightning checkpoint."""
        optimizers = [list(opt.state.values()) for opt in trainer.optimizers]
        return snapshot_bytes({"state_dict": pl_module.state_dict(), "optimizer_states": optimizers})

    def _reserve(self, trainer: Any, pl_module: Any) -> None:
        huge = 2 << 20
        nbytes = -(-(self.estimate(trainer, pl_module) + self.slack) // huge) * huge
        if nbytes > self.reserved:
            self.io.reserve(nbytes)
            self.reserved = nbytes

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._reserve(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._settled:
            return
        self._batches += 1
        # Every optimizer has state once it stepped (or after enough batches, whatever it keeps).
        self._settled = self._batches >= 64 or all(len(opt.state) > 0 for opt in trainer.optimizers)
        self._reserve(trainer, pl_module)
