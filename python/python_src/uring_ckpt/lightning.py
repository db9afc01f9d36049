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

Works with ``lightning`` (``lightning.pytorch``) or, failing that, ``pytorch_lightning``.
"""

from __future__ import annotations

import threading
from typing import Any

from ._api import load, remove, save
from ._async import AsyncSaver, SaveFuture, wait_all
from ._common import ConfigLike, coerce_config

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError:  # the standalone pytorch_lightning package
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO  # type: ignore[no-redef,assignment]

__all__ = ["AsyncUringCheckpointIO", "UringCheckpointIO"]


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
    (``max_in_flight`` saves at most; each holds a host copy of the checkpoint). An error of
    a background save is raised by the next ``save_checkpoint``, ``load_checkpoint``,
    ``remove_checkpoint`` or ``teardown``. Loads and removes wait for the saves in flight
    first, so ``save_top_k`` never removes a checkpoint being written."""

    def __init__(
        self, config: ConfigLike = None, *, verify_on_load: bool = True, max_in_flight: int = 1
    ) -> None:
        super().__init__(config, verify_on_load=verify_on_load)
        self.max_in_flight = max_in_flight
        self._saver: AsyncSaver | None = None
        self._futures: list[SaveFuture] = []
        self._lock = threading.Lock()

    def _raise_finished_errors(self) -> None:
        with self._lock:
            done = [f for f in self._futures if f.done()]
            self._futures = [f for f in self._futures if not f.done()]
        for f in done:
            error = f.exception()
            if error is not None:
                raise error

    def _wait_all(self) -> None:
        with self._lock:
            futures, self._futures = self._futures, []
        wait_all(futures)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        self._refuse_storage_options(storage_options)
        self._raise_finished_errors()
        if self._saver is None:
            self._saver = AsyncSaver(self.config, max_in_flight=self.max_in_flight)
        future = self._saver.save(checkpoint, path)
        with self._lock:
            self._futures.append(future)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        self._wait_all()
        return super().load_checkpoint(path, map_location, weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self._wait_all()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        """Waits for every save in flight; raises the first error among them."""
        self._wait_all()
        self._saver = None
