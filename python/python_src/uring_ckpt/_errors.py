"""Exceptions raised by uring_ckpt. I/O failures are plain ``OSError`` (with ``errno``)."""

from __future__ import annotations

import pickle

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "ConfigError",
    "CorruptCheckpointError",
    "InvalidCheckpointError",
    "NotACheckpointError",
    "TensorNotFoundError",
    "UnavailableError",
    "UnsafeCheckpointError",
]


class CheckpointError(Exception):
    """Base class of every uring_ckpt error except ``OSError`` from the system."""


class NotACheckpointError(CheckpointError):
    """The path is not a committed checkpoint: no ``manifest.json`` (an unfinished save, a
    foreign directory)."""


class CorruptCheckpointError(CheckpointError):
    """The checkpoint's files do not match its manifest: a CRC mismatch, a truncated or
    unparsable shard or manifest, a missing or altered sidecar file."""


class UnsafeCheckpointError(CorruptCheckpointError, pickle.UnpicklingError):
    """A ``weights_only`` load (the default) refused the pickled sidecar: it names a global
    that is not on the allow-list, uses an opcode that could run code, or is malformed.
    Load a checkpoint you trust with ``weights_only=False``, or allow a global that cannot
    run code with ``torch.serialization.add_safe_globals([...])``. Also a
    ``pickle.UnpicklingError``, as ``torch.load``'s refusals are."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A save would replace an existing checkpoint and replacing was not asked for."""


class CheckpointLockedError(CheckpointError):
    """Another save of the same checkpoint path holds its lock (config ``lock="wait"`` waits)."""


class ConfigError(CheckpointError, ValueError):
    """A configuration value is out of range or malformed."""


class InvalidCheckpointError(CheckpointError, ValueError):
    """What was handed to a save cannot be saved (duplicate names, wrong byte counts, a path
    without a usable name)."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The destination of :func:`load_into` does not match the checkpoint. Every problem is
    in the message; ``missing`` (destination names the checkpoint lacks), ``unexpected``
    (checkpoint tensors with no destination) and ``mismatched`` (one line per tensor whose
    dtype or shape differs) list them."""

    def __init__(
        self,
        message: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []


class TensorNotFoundError(CheckpointError, KeyError):
    """A tensor asked for by name is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable.
        return str(self.args[0]) if self.args else ""


class UnavailableError(CheckpointError, RuntimeError):
    """A feature (io_uring, O_DIRECT, CUDA) is not available on this system."""
