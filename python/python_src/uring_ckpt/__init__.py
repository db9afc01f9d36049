"""uring_ckpt: deep-learning checkpoints written at the speed of the disk.

A checkpoint is a directory: safetensors shards (written with io_uring + O_DIRECT, with
fallbacks), a pickled sidecar ``extras.pkl`` for everything that is not a tensor, and a
``manifest.json`` written last, which lists every file with its size and CRC-32. The
directory appears under its name atomically, once everything in it is durable.

>>> import uring_ckpt
>>> uring_ckpt.save({"model": model.state_dict(), "step": 10}, "ckpt/step-10")  # doctest: +SKIP
>>> state = uring_ckpt.load("ckpt/step-10")                                   # doctest: +SKIP

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

import json
import os
import threading
from typing import Any, Union

from . import _pytree
from ._async import AsyncSaver, SaveFuture
from ._errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointLockedError,
    ConfigError,
    CorruptCheckpointError,
    InvalidCheckpointError,
    NotACheckpointError,
    TensorNotFoundError,
    UnavailableError,
    UnsafeCheckpointError,
)
from ._uring_ckpt import Config, Writer, __version__, cuda_available

PathLike = Union[str, "os.PathLike[str]"]
ConfigLike = Union[Config, dict, None]

__all__ = [
    "AsyncSaver",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointLockedError",
    "Config",
    "ConfigError",
    "CorruptCheckpointError",
    "InvalidCheckpointError",
    "NotACheckpointError",
    "SaveFuture",
    "TensorNotFoundError",
    "UnavailableError",
    "UnsafeCheckpointError",
    "__version__",
    "cuda_available",
    "inspect",
    "load",
    "remove",
    "save",
    "verify",
]

_writers: dict[str, Writer] = {}
_writers_lock = threading.Lock()


def _config(config: ConfigLike, replace: bool | None = None) -> Config:
    """A ``Config`` from a ``Config``, a dict of its TOML keys, or None (the environment:
    ``URING_CKPT_*`` variables and the file named by ``URING_CKPT_CONFIG``)."""
    if config is None:
        cfg = Config.load()
    elif isinstance(config, Config):
        cfg = config
    elif isinstance(config, dict):
        cfg = Config(**config)
    else:
        raise TypeError(f"config must be a uring_ckpt.Config, a dict or None, not {type(config).__name__}")
    if replace is not None and replace != cfg.replace_existing:
        cfg = cfg.replace(replace_existing=replace)
    return cfg


def _writer(config: ConfigLike, replace: bool | None = None) -> Writer:
    """A writer for this configuration; writers (and their staging buffers) are reused."""
    cfg = _config(config, replace)
    key = cfg.to_toml()
    with _writers_lock:
        writer = _writers.get(key)
        if writer is None:
            if len(_writers) >= 8:
                _writers.pop(next(iter(_writers)))
            writer = _writers[key] = Writer(cfg)
        return writer


def _metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    out = {str(k): str(v) for k, v in (metadata or {}).items()}
    out[_pytree.FORMAT_KEY] = _pytree.FORMAT_VERSION
    return out


def _save_flat(
    writer: Writer, flat: _pytree.Flattened, path: PathLike, metadata: dict[str, str] | None
) -> dict[str, Any]:
    tensors = [e.as_tuple() for e in flat.tensors]
    report = writer.save(os.fspath(path), tensors, [(_pytree.SIDECAR, flat.sidecar)], _metadata(metadata))
    out: dict[str, Any] = json.loads(report)
    out["python_copied_bytes"] = flat.copied_bytes
    return out


def save(
    state: Any,
    path: PathLike,
    *,
    config: ConfigLike = None,
    replace: bool | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Saves ``state`` (a nested dict/list of tensors and anything picklable, such as a
    Lightning checkpoint dict) as a committed checkpoint directory at ``path``; returns once
    it is durable, with the save report (bytes, seconds, MiB/s, engine).

    Torch tensors (any safetensors dtype, bf16 and float8 included) and numpy arrays go to
    the shards without a copy when they are contiguous CPU memory; others are made
    contiguous first. CUDA tensors are copied from device memory straight into the
    (page-locked) staging buffers when the extension was built with CUDA
    (``maturin develop --release --features cuda``; see ``_uring_ckpt.cuda_available()``),
    and to the CPU in Python otherwise. Tied tensors are stored once.

    The report counts ``cuda_tensors``/``cuda_bytes`` (read from device memory) and
    ``python_copied_bytes`` (copied in Python: made contiguous or moved to the CPU).

    ``config``: a :class:`Config`, a dict of its keys, or None for the environment's.
    ``replace``: whether an existing checkpoint at ``path`` may be replaced (atomically);
    default from the config (``replace_existing``, false), else
    :class:`CheckpointExistsError`. ``metadata``: strings stored in the manifest.
    """
    flat = _pytree.flatten(state)
    return _save_flat(_writer(config, replace), flat, path, metadata)


def load(
    path: PathLike,
    *,
    device: Any = "cpu",
    names: list[str] | None = None,
    verify: bool = True,
    weights_only: bool = True,
    config: ConfigLike = None,
) -> Any:
    """Loads the checkpoint at ``path`` and rebuilds the structure that was saved, tensors as
    torch tensors when torch is importable (numpy otherwise; numpy arrays stay numpy).

    ``device``: where torch tensors go (``"cpu"``, ``"cuda:0"``, a ``torch.device``, a dict
    mapping saved device names to new ones, or None for the device each tensor was saved
    from). ``names``: load only these tensors (their flattened names, e.g.
    ``"state_dict/layer.weight"``) and return them as a flat dict. ``verify``: check every
    tensor's CRC-32.

    ``weights_only`` (default True, as ``torch.load`` since torch 2.6): unpickle the sidecar
    with a restricted unpickler that never runs code, whatever the files hold. It builds
    containers (dict, list, tuple, set, ``OrderedDict``, ``defaultdict``, ``Counter``,
    ``deque``), numbers, strings, bytes, the checkpoint's tensors and arrays, torch
    dtypes/devices/``Size``, plain numpy dtypes and scalars, ``pathlib`` POSIX paths,
    Lightning's ``AttributeDict``, and the globals added with
    ``torch.serialization.add_safe_globals`` (matched exactly). Anything else raises
    :class:`UnsafeCheckpointError` (a :class:`CorruptCheckpointError` and a
    ``pickle.UnpicklingError``), whose message names the global. ``weights_only=False``:
    unpickle with ``pickle``, for checkpoints you trust only (it runs what the sidecar names).
    Either way a sidecar whose tensor references do not match the shards raises
    :class:`CorruptCheckpointError`.

    Loaded CPU tensors use the read buffers directly (no copy) and are writable.
    """
    writer = _writer(config)
    tensors, metadata, extras, _report = writer.load(os.fspath(path), names, verify)
    buffers = {name: (dtype, shape, buf) for name, dtype, shape, buf in tensors}
    restorer = _pytree.Restorer(buffers, device, where=os.path.join(os.fspath(path), _pytree.SIDECAR))
    if names is not None:
        return {name: restorer.plain(name) for name in names}
    sidecar = extras.get(_pytree.SIDECAR)
    version = metadata.get(_pytree.FORMAT_KEY)
    if sidecar is None or version is None:
        # Written by the Rust API or the CLI: a flat dict of tensors.
        return {name: restorer.plain(name) for name in buffers}
    if version != _pytree.FORMAT_VERSION:
        raise CheckpointError(
            f"{os.fspath(path)} was written by a newer uring_ckpt (Python format {version}, "
            f"this one reads {_pytree.FORMAT_VERSION})"
        )
    return _pytree.unflatten(sidecar, restorer, weights_only=weights_only)


def remove(path: PathLike, *, config: ConfigLike = None) -> None:
    """Deletes the checkpoint at ``path`` atomically (renamed away, then deleted). A missing
    path is not an error; a directory that is not a checkpoint is refused
    (:class:`NotACheckpointError`)."""
    _writer(config).remove(os.fspath(path))


def verify(path: PathLike, *, config: ConfigLike = None) -> dict[str, Any]:
    """Checks the manifest, every shard, every tensor's CRC-32 and the sidecar; raises
    :class:`CorruptCheckpointError` (or :class:`NotACheckpointError`) at the first problem;
    returns what was checked."""
    result: dict[str, Any] = json.loads(_writer(config).verify(os.fspath(path)))
    return result


def inspect(path: PathLike, *, config: ConfigLike = None) -> dict[str, Any]:
    """The manifest and every tensor's name, dtype, shape, size and shard, without reading
    tensor data."""
    result: dict[str, Any] = json.loads(_writer(config).inspect(os.fspath(path)))
    return result
