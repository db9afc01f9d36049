"""What the synchronous functions (:mod:`._api`), :class:`~uring_ckpt.AsyncSaver`
(:mod:`._async`) and the Lightning plugins share: the argument types, the coercion of a
``config`` argument, the cache of writers, and how a flattened state becomes the arguments
of a Rust writer's ``save`` and its report."""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Union

from . import _pytree
from ._uring_ckpt import Config, Writer

PathLike = Union[str, "os.PathLike[str]"]
"""A checkpoint path: a string or an ``os.PathLike``."""

ConfigLike = Union[Config, dict, None]
"""A ``config`` argument: a :class:`Config`, a dict of its TOML keys, or None."""

_writers: dict[str, Writer] = {}
_writers_lock = threading.Lock()


def coerce_config(config: ConfigLike, replace: bool | None = None) -> Config:
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


def cached_writer(config: ConfigLike, replace: bool | None = None) -> Writer:
    """A writer for this configuration; writers (and their staging buffers) are reused."""
    cfg = coerce_config(config, replace)
    key = cfg.to_toml()
    with _writers_lock:
        writer = _writers.get(key)
        if writer is None:
            if len(_writers) >= 8:
                _writers.pop(next(iter(_writers)))
            writer = _writers[key] = Writer(cfg)
        return writer


def manifest_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """The caller's metadata as strings, plus the key naming the Python format."""
    out = {str(k): str(v) for k, v in (metadata or {}).items()}
    out[_pytree.FORMAT_KEY] = _pytree.FORMAT_VERSION
    return out


def extra_file_list(extra_files: dict[str, bytes] | None) -> list[tuple[str, bytes]]:
    """A save's ``extra_files`` argument as ``(name, bytes)`` pairs, checked: names are
    strings, contents bytes-like, and none is the sidecar's name (the Rust side checks that
    the names are plain file names)."""
    out: list[tuple[str, bytes]] = []
    for name, data in (extra_files or {}).items():
        if not isinstance(name, str):
            raise TypeError(f"extra file names must be strings, not {type(name).__name__}")
        if name == _pytree.SIDECAR:
            raise ValueError(f"extra file {name!r}: the name is the sidecar's, reserved")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"extra file {name!r} must be bytes, not {type(data).__name__}")
        out.append((name, bytes(data)))
    return out


def save_args(
    flat: _pytree.Flattened,
    path: PathLike,
    metadata: dict[str, str] | None,
    extra_files: dict[str, bytes] | None = None,
) -> tuple[str, list[tuple[str, str, list[int], str, Any]], list[tuple[str, bytes]], dict[str, str], bool]:
    """The arguments of ``Writer.save`` and ``AsyncWriter.save`` for a flattened state: the
    path, the tensor entries, the sidecar and the caller's extra files, the metadata, and
    whether to write a Hugging Face index (for a flat state dict only)."""
    tensors = [e.as_tuple() for e in flat.tensors]
    extras = [(_pytree.SIDECAR, flat.sidecar), *extra_file_list(extra_files)]
    return os.fspath(path), tensors, extras, manifest_metadata(metadata), flat.flat


log = logging.getLogger("uring_ckpt")
"""Where the package reports what the caller should know but need not handle: fallbacks."""


def log_fallbacks(engine: dict[str, Any] | None, path: Any) -> None:
    """Logs (warning) each fallback an engine report names: what the system refused, what
    was used instead, and why (e.g. O_DIRECT refused by a network file system)."""
    for fallback in (engine or {}).get("fallbacks") or []:
        log.warning(
            "%s: %s unavailable (%s); used %s",
            os.fspath(path),
            fallback.get("what"),
            fallback.get("reason"),
            fallback.get("instead"),
        )


def save_report(report: str, copied_bytes: int) -> dict[str, Any]:
    """A save report (the Rust side's JSON) with ``python_copied_bytes`` added; its
    fallbacks logged (:func:`log_fallbacks`)."""
    out: dict[str, Any] = json.loads(report)
    out["python_copied_bytes"] = copied_bytes
    log_fallbacks(out.get("engine"), out.get("path", ""))
    return out
