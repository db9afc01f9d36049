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

Sharded checkpoints: Lightning's ``ModelParallelStrategy`` and ``FSDPStrategy``
(``state_dict_type="sharded"``) call ``torch.distributed.checkpoint`` themselves and never
use a ``CheckpointIO`` (Lightning issue 20205). :class:`UringModelParallelStrategy` and
:class:`UringFSDPStrategy` are those strategies saving and loading through
:mod:`uring_ckpt.dcp` instead: ``Trainer(strategy=UringModelParallelStrategy(...))``. The
checkpoint is Lightning's layout (a directory at the path Lightning asks for, holding
Lightning's ``meta.pt`` beside the shards), committed by all ranks at once with one rename
(``meta.pt`` included), an existing one replaced atomically. Loading (``ckpt_path=...``)
reads the model and optimizer shards on any world size and ``meta.pt`` through the checked
path; a checkpoint these classes did not write (no ``manifest.json``) is loaded by the
parent strategy as before.

Works with ``lightning`` (``lightning.pytorch``) or, failing that, ``pytorch_lightning``.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ._api import load, remove, save
from ._async import AsyncSaver, SaveFuture, snapshot_bytes, wait_all
from ._common import ConfigLike, cached_writer, coerce_config
from ._errors import CheckpointError
from .dcp import METADATA_FILE, UringStorageReader, UringStorageWriter

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone pytorch_lightning package
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO  # type: ignore[no-redef,assignment]
    from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment]

try:  # the sharded strategies need torch.distributed and a Lightning with ModelParallelStrategy (2.4)
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.optim import Optimizer

    try:
        from lightning.fabric.strategies.fsdp import _get_sharded_state_dict_context
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
        from lightning.pytorch.trainer.states import TrainerFn
    except ImportError:  # the standalone pytorch_lightning package
        from lightning_fabric.strategies.fsdp import _get_sharded_state_dict_context  # type: ignore[no-redef]
        from pytorch_lightning.strategies import FSDPStrategy, ModelParallelStrategy  # type: ignore[no-redef]
        from pytorch_lightning.trainer.states import TrainerFn  # type: ignore[no-redef]
except ImportError:
    FSDPStrategy = ModelParallelStrategy = None  # type: ignore[assignment,misc]

__all__ = [
    "AsyncUringCheckpointIO",
    "ReserveSnapshot",
    "UringCheckpointIO",
    "UringFSDPStrategy",
    "UringModelParallelStrategy",
]

META_FILE = "meta.pt"
"""Lightning's file of the non-tensor part of a sharded checkpoint (``_METADATA_FILENAME``)."""


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


class _UringSharded:
    """What :class:`UringModelParallelStrategy` and :class:`UringFSDPStrategy` share: the
    constructor's ``config`` and ``verify_on_load``, the save of Lightning's checkpoint dict
    (model and optimizer states through :class:`uring_ckpt.dcp.UringStorageWriter`, the rest
    as ``meta.pt`` in the same commit), the reading of ``meta.pt``, and the removal of a
    checkpoint."""

    global_rank: int
    is_global_zero: bool
    broadcast: Any  # the Lightning strategy's
    _uring_config: Any
    _uring_verify: bool

    def __init__(self, *args: Any, config: ConfigLike = None, verify_on_load: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the Lightning strategy's, next in the MRO
        self._uring_config = coerce_config(config, replace=True)
        self._uring_verify = verify_on_load

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A checkpoint of ours: the model and optimizer states through DCP
        (:meth:`_uring_load_states`, the strategy's own layout), then ``meta.pt``; any
        other kind through the Lightning strategy's loader."""
        path = Path(self.broadcast(checkpoint_path))
        if not self._is_uring_sharded(path):
            return super().load_checkpoint(path, weights_only)  # type: ignore[misc,no-any-return]
        self._uring_load_states(path)
        return self._uring_meta(path, weights_only)

    def _uring_load_states(self, path: Path) -> None:
        raise NotImplementedError  # each strategy reads its own layout

    def remove_checkpoint(self, filepath: Any) -> None:
        if not self._uring_remove(filepath):
            super().remove_checkpoint(filepath)  # type: ignore[misc]

    def _uring_save_lightning(self, checkpoint: dict[str, Any], filepath: Any, model_key: str) -> None:
        """Lightning's checkpoint dict saved as the parent strategy lays it out: the model
        state under ``model_key`` and each optimizer's as ``optimizer_<i>`` through DCP, the
        rest as ``meta.pt``."""
        path = Path(self.broadcast(filepath))
        converted = {model_key: checkpoint.pop("state_dict")}
        for idx, optim_state in enumerate(checkpoint.pop("optimizer_states", [])):
            converted[f"optimizer_{idx}"] = optim_state
        self._uring_save(converted, checkpoint, path)

    def _uring_save(
        self, converted_state: dict[str, Any], checkpoint: dict[str, Any], path: Path
    ) -> None:
        extra = None
        if self.global_rank == 0:  # DCP's coordinator commits meta.pt with the shards
            if path.is_file():  # a full checkpoint saved earlier at this path, as the parent does
                path.unlink()
            buf = io.BytesIO()
            torch.save(checkpoint, buf)
            extra = {META_FILE: buf.getvalue()}
        writer = UringStorageWriter(path, self._uring_config, replace=True, extra_files=extra)
        dcp.save(converted_state, storage_writer=writer)

    def _uring_reader(self, path: Path) -> Any:
        return UringStorageReader(path, self._uring_config, verify=self._uring_verify)

    def _uring_meta(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        writer = cached_writer(self._uring_config)
        _, _, extras, _ = writer.load(os.fspath(path), [], self._uring_verify)  # no tensor read
        blob = extras.get(META_FILE)
        if blob is None:
            raise CheckpointError(f"{path}: no {META_FILE} in this checkpoint")
        meta: dict[str, Any] = torch.load(io.BytesIO(bytes(blob)), weights_only=weights_only)
        return meta

    @staticmethod
    def _is_uring_sharded(path: Path) -> bool:
        return path.is_dir() and (path / "manifest.json").is_file() and (path / METADATA_FILE).is_file()

    def _uring_remove(self, filepath: Any) -> bool:
        """Removes a checkpoint of ours atomically on global rank 0; False for another kind."""
        path = Path(filepath)
        if not self._is_uring_sharded(path):
            return False
        if self.is_global_zero:
            remove(path, config=self._uring_config)
        return True


if ModelParallelStrategy is not None:

    class UringModelParallelStrategy(_UringSharded, ModelParallelStrategy):  # type: ignore[misc,valid-type]
        """Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallel) whose distributed
        checkpoints (``save_distributed_checkpoint=True``, the default) are written and read
        through :mod:`uring_ckpt.dcp` (see the module's docstring). ``config``: a
        :class:`uring_ckpt.Config`, a dict of its keys, or None for the environment's;
        ``verify_on_load``: check every tensor's CRC-32 on load. The other arguments are
        ``ModelParallelStrategy``'s. With ``save_distributed_checkpoint=False`` the parent
        saves one full checkpoint through the Trainer's ``CheckpointIO``."""

        def save_checkpoint(
            self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
        ) -> None:
            if storage_options is not None or not self._save_distributed_checkpoint:  # the parent's
                super().save_checkpoint(checkpoint, filepath, storage_options)
                return
            self._uring_save_lightning(checkpoint, filepath, "state_dict")

        def _uring_load_states(self, path: Path) -> None:
            assert self.model is not None and self.lightning_module is not None
            module_state = {"state_dict": get_model_state_dict(self.model)}
            dcp.load(module_state, storage_reader=self._uring_reader(path))
            strict = self.lightning_module.strict_loading
            self.model.load_state_dict(module_state["state_dict"], strict=strict)
            options = StateDictOptions(cpu_offload=True)
            for idx, optim in enumerate(self.optimizers):
                if not isinstance(optim, Optimizer):
                    continue
                key = f"optimizer_{idx}"
                optim_state = {key: get_optimizer_state_dict(self.model, optim)}
                dcp.load(optim_state, storage_reader=self._uring_reader(path))
                set_optimizer_state_dict(
                    self.model, optim, optim_state_dict=optim_state[key], options=options
                )


if FSDPStrategy is not None:

    class UringFSDPStrategy(_UringSharded, FSDPStrategy):  # type: ignore[misc,valid-type]
        """Lightning's ``FSDPStrategy`` whose sharded checkpoints (``state_dict_type="sharded"``)
        are written and read through :mod:`uring_ckpt.dcp` (see the module's docstring).
        ``config``, ``verify_on_load``: as :class:`UringModelParallelStrategy`'s; the other
        arguments are ``FSDPStrategy``'s. With ``state_dict_type="full"`` the parent saves
        one full checkpoint through the Trainer's ``CheckpointIO``."""

        def save_checkpoint(
            self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
        ) -> None:
            if storage_options is not None or self._state_dict_type != "sharded":  # the parent's
                super().save_checkpoint(checkpoint, filepath, storage_options)
                return
            self._uring_save_lightning(checkpoint, filepath, "model")

        def _uring_load_states(self, path: Path) -> None:
            assert self.model is not None and self.lightning_module is not None
            with _get_sharded_state_dict_context(self.model):
                module_state = {"model": self.model.state_dict()}
                dcp.load(module_state, storage_reader=self._uring_reader(path))
                strict = self.lightning_module.strict_loading
                self.model.load_state_dict(module_state["model"], strict=strict)
                if self.lightning_module.trainer.state.fn == TrainerFn.FITTING and self.optimizers:
                    for idx, optim in enumerate(self.optimizers):
                        key = f"optimizer_{idx}"
                        optim_state = load_sharded_optimizer_state_dict(
                            model_state_dict=module_state["model"],
                            optimizer_key=key,
                            storage_reader=self._uring_reader(path),
                        )
                        flat = FullyShardedDataParallel.optim_state_dict_to_load(
                            optim_state_dict=optim_state[key], model=self.model, optim=optim
                        )
                        optim.load_state_dict(flat)
