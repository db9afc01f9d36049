"""uring_ckpt: deep-learning checkpoints written at the speed of the disk.

A checkpoint is a directory: safetensors shards (written with io_uring + O_DIRECT, with
fallbacks), a pickled sidecar ``extras.pkl`` for everything that is not a tensor, and a
``manifest.json`` written last, which lists every file with its size and CRC-32. The
directory appears under its name atomically, once everything in it is durable.

>>> import uring_ckpt
>>> uring_ckpt.save({"model": model.state_dict(), "step": 10}, "ckpt/step-10")  # doctest: +SKIP
>>> state = uring_ckpt.load("ckpt/step-10")                                   # doctest: +SKIP

Any safetensors checkpoint loads the same way, as a flat dict of tensors: one
``.safetensors`` file, a directory of them, or a Hugging Face directory with
``model.safetensors.index.json``:

>>> weights = uring_ckpt.load_safetensors("Llama-3-8B/")                      # doctest: +SKIP

The GIL is released while bytes move to or from the disk. During a synchronous ``save`` the
tensors are written from their own memory (no copy); changing them from another Python
thread meanwhile races with the write, as it would with ``torch.save``. Use
:class:`AsyncSaver` to snapshot them and write in the background.

Loading is safe by default, as ``torch.load`` is since torch 2.6: ``load`` (and the Lightning
plugins) read the pickled sidecar with ``weights_only=True``, a restricted unpickler that never
runs code. It builds plain containers and numbers, strings and bytes, tensors and arrays from the
shards, torch dtypes/devices/sizes, numpy dtypes and scalars, ``pathlib`` paths and Lightning's
``AttributeDict``; anything else raises :class:`UnsafeCheckpointError`. For a checkpoint you
trust that holds other objects, pass ``weights_only=False`` (the sidecar is then unpickled by
``pickle``, which runs whatever it names), or allow the extra classes exactly with
``torch.serialization.add_safe_globals([MyConfig])`` (or the ``torch.serialization.safe_globals``
context manager).
"""

from __future__ import annotations

# The package's modules, each importing only those before it (none imports this facade):
#   _uring_ckpt (the Rust extension), _errors, _optional (numpy; torch on first use)
#   _safe_pickle/  the weights_only unpickler: _describe, _reduce, _allow, _scan, _vm
#   _pytree/       state <-> tensor entries + sidecar: _format, _flatten, _restore
#   _common        argument types, config coercion, the writer cache, save arguments/report
#   _into          load_into (in place), loads straight into CUDA memory
#   _api           save, load, load_safetensors, remove, verify, inspect
#   _async         AsyncSaver, SaveFuture, snapshot_bytes
#   _staging       reusable, page-aligned staging areas (dcp's AsyncStager)
#   dcp            torch.distributed.checkpoint storage writer/reader (imported by the user, not here)
#   lightning      the Lightning CheckpointIO plugins (imported by the user, not here)
from ._api import inspect, load, load_safetensors, remove, save, verify
from ._into import LoadIntoResult, load_into
from ._async import AsyncSaver, SaveFuture, snapshot_bytes
from ._common import ConfigLike as ConfigLike  # the types of the public signatures
from ._common import PathLike as PathLike
from ._common import cached_writer as _writer  # noqa: F401 - uring_ckpt._writer, used by the tests
from ._errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointLockedError,
    CheckpointMismatchError,
    ConfigError,
    CorruptCheckpointError,
    InvalidCheckpointError,
    NotACheckpointError,
    TensorNotFoundError,
    UnavailableError,
    UnsafeCheckpointError,
)
from ._uring_ckpt import Config, __version__, cuda_available
from ._uring_ckpt import Writer as Writer  # the extension's writer, as before

__all__ = [
    "AsyncSaver",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "Config",
    "ConfigError",
    "CorruptCheckpointError",
    "InvalidCheckpointError",
    "LoadIntoResult",
    "NotACheckpointError",
    "SaveFuture",
    "TensorNotFoundError",
    "UnavailableError",
    "UnsafeCheckpointError",
    "__version__",
    "cuda_available",
    "inspect",
    "load",
    "load_into",
    "load_safetensors",
    "remove",
    "save",
    "snapshot_bytes",
    "verify",
]
