"""The load side: tensor buffers from the shards turned back into tensors and arrays, and
the sidecar unpickled around them.

:class:`Restorer` resolves the sidecar's tensor references, checking every field against
the shards first (a forged reference is a :class:`CorruptCheckpointError`);
:func:`unflatten` unpickles the sidecar with the restricted unpickler of
:mod:`uring_ckpt._safe_pickle` (``weights_only``) or with ``pickle``.
"""

from __future__ import annotations

import io
import math
import pickle
import warnings
from typing import Any

from .. import _safe_pickle
from .._errors import CorruptCheckpointError
from .._optional import np
from .._optional import torch_module as _torch
from ._format import (
    _NUMPY_DTYPE_STR,
    _NUMPY_FROM_SAFETENSORS,
    PID_TAG,
    SIDECAR,
    torch_dtype_from_safetensors,
    torch_dtype_map,
)


class Restorer:
    """Turns loaded tensor buffers into torch tensors or numpy arrays, once per name."""

    def __init__(
        self,
        buffers: dict[str, tuple[str, list[int], Any]],
        device: Any,
        prefer_torch: bool = True,
        where: str = SIDECAR,
    ) -> None:
        self.buffers = buffers
        self.device = device
        self.where = where
        self.torch: Any = _torch() if prefer_torch else None
        self._base: dict[str, Any] = {}
        self._objs: dict[tuple, Any] = {}

    # -- plain tensors, by safetensors dtype --------------------------------------------------

    def plain(self, name: str) -> Any:
        """The tensor ``name`` as a torch tensor (numpy without torch), on the device."""
        if name not in self._base:
            dtype, shape, buf = self.buffers[name]
            if self.torch is not None:
                t = self._torch_from(buf, torch_dtype_from_safetensors(dtype), shape)
                self._base[name] = self._to_device(t, None)
            else:
                self._base[name] = self._numpy_from(buf, _numpy_dtype(dtype), shape)
        return self._base[name]

    def _torch_from(self, buf: Any, dtype: Any, shape: list[int]) -> Any:
        torch = self.torch
        if isinstance(buf, torch.Tensor):
            # Loaded straight into device memory (a uint8 tensor of the bytes): a view.
            if len(buf) == 0:
                return torch.empty(shape, dtype=dtype, device=buf.device)
            return buf.view(dtype).reshape(shape)
        if len(buf) == 0:
            return torch.empty(shape, dtype=dtype)
        # The buffer is writable and owned by `buf`, which the tensor keeps alive: no copy.
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)

    @staticmethod
    def _numpy_from(buf: Any, dtype: Any, shape: list[int]) -> Any:
        if hasattr(buf, "device") and hasattr(buf, "cpu"):  # a device tensor of the bytes
            buf = buf.cpu().numpy()
        if len(buf) == 0:
            return np.empty(shape, dtype=dtype)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def _to_device(self, t: Any, saved_device: str | None) -> Any:
        device = self.device
        if callable(device) and not isinstance(device, (str, dict)):
            device = "cpu"  # torch.load's map_location callable receives storages: keep CPU
        if isinstance(device, dict):
            device = device.get(saved_device or "cpu", saved_device or "cpu")
        if device is None:
            device = saved_device or "cpu"
        if str(device) == "cpu":
            return t
        return t.to(device)

    # -- persistent ids of the sidecar ---------------------------------------------------------

    def __call__(self, pid: Any) -> Any:
        """Resolves a persistent id of the sidecar. Every field is checked against the
        shards before anything is built: a forged sidecar that names a tensor the shards do
        not have, or gives it another dtype, raises :class:`CorruptCheckpointError`."""
        cached = self._objs.get(pid) if self._valid_pid(pid) else None
        if cached is None:
            cached = self._restore(pid)
            self._objs[pid] = cached
        return cached

    def _corrupt(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.where}: {message}")

    def _valid_pid(self, pid: Any) -> bool:
        """Raises unless ``pid`` is ``(PID_TAG, name, kind, dtype, device, requires_grad,
        is_param)`` with fields of those types (only then is it hashed)."""
        if not (type(pid) is tuple and len(pid) == 7 and type(pid[0]) is str and pid[0] == PID_TAG):
            raise self._corrupt(
                f"persistent id {_safe_pickle._short(pid)} is not a uring_ckpt tensor reference"
            )
        _, name, kind, dtype_name, device, requires_grad, is_param = pid
        if not (
            type(name) is str
            and type(kind) is str
            and kind in ("torch", "numpy")
            and type(dtype_name) is str
            and type(device) is str
            and type(requires_grad) is bool
            and type(is_param) is bool
        ):
            raise self._corrupt(f"malformed tensor reference {_safe_pickle._short(pid)}")
        if name not in self.buffers:
            raise self._corrupt(f"tensor {name!r} is in the sidecar but not in the shards")
        return True

    def _check_bytes(self, name: str, itemsize: int) -> None:
        dtype, shape, buf = self.buffers[name]
        want = math.prod(shape) * itemsize
        if len(buf) != want:
            raise self._corrupt(
                f"tensor {name!r}: {len(buf)} bytes in the shard for shape {list(shape)} of {dtype} ({want} expected)"
            )

    def _restore(self, pid: tuple) -> Any:
        _, name, kind, dtype_name, device, requires_grad, is_param = pid
        shard_dtype, shape, buf = self.buffers[name]
        if kind == "numpy":
            np_dtype = self._numpy_dtype_of(name, dtype_name, shard_dtype)
            if name not in self._base:
                self._check_bytes(name, np_dtype.itemsize)
                self._base[name] = self._numpy_from(buf, np_dtype, shape)
            return self._base[name]
        torch = self.torch
        if torch is None:
            return self._numpy_fallback(name)
        dtype = _safe_pickle.torch_dtypes_by_name().get(dtype_name)
        if dtype is None or torch_dtype_map().get(dtype) != shard_dtype:
            raise self._corrupt(
                f"tensor {name!r}: the sidecar says dtype {dtype_name!r}, the shard stores {shard_dtype}"
            )
        if requires_grad and not (dtype.is_floating_point or dtype.is_complex):
            raise self._corrupt(f"tensor {name!r} of dtype {dtype_name} cannot require gradients")
        if name not in self._base:
            self._check_bytes(name, dtype.itemsize)
            try:
                target = torch.device(device)
            except (RuntimeError, ValueError, TypeError) as e:
                raise self._corrupt(f"tensor {name!r}: bad device {device!r} ({e})") from None
            self._base[name] = self._to_device(self._torch_from(buf, dtype, shape), str(target))
        t = self._base[name]
        if is_param:
            return torch.nn.Parameter(t, requires_grad=requires_grad)
        if requires_grad:
            return t.detach().requires_grad_(True)
        return t

    def _numpy_dtype_of(self, name: str, dtype_name: str, shard_dtype: str) -> Any:
        """The numpy dtype of a ``"numpy"`` reference: the shard's, in native byte order
        (what the saver wrote, ``"<f4"``); anything else is a forged reference."""
        native = _NUMPY_FROM_SAFETENSORS.get(shard_dtype)
        if np is None or native is None or not _NUMPY_DTYPE_STR.fullmatch(dtype_name):
            raise self._corrupt(
                f"tensor {name!r}: numpy dtype {dtype_name!r} for a {shard_dtype} shard tensor"
            )
        want = np.dtype(native)
        if np.dtype(dtype_name) != want:
            raise self._corrupt(
                f"tensor {name!r}: the sidecar says numpy dtype {dtype_name!r}, the shard stores {shard_dtype}"
            )
        return want

    def _numpy_fallback(self, name: str) -> Any:
        dtype, shape, buf = self.buffers[name]
        if name not in self._base:
            np_dtype = _numpy_dtype(dtype)
            self._base[name] = self._numpy_from(buf, np_dtype, shape)
        return self._base[name]


def _numpy_dtype(dtype: str) -> Any:
    name = _NUMPY_FROM_SAFETENSORS.get(dtype)
    if name is not None:
        return np.dtype(name)
    try:
        import ml_dtypes  # optional (bfloat16 and float8 for numpy): imported only when needed

        special = {"BF16": "bfloat16", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn"}
        if dtype in special:
            return np.dtype(getattr(ml_dtypes, special[dtype]))
    except ImportError:
        pass
    raw = {"BF16": np.uint16}.get(dtype, np.uint8)
    warnings.warn(
        f"{dtype} has no numpy dtype (install torch or ml_dtypes): returned as raw {np.dtype(raw).name}",
        stacklevel=4,
    )
    return np.dtype(raw)


def unflatten(sidecar: bytes, restorer: Restorer, *, weights_only: bool = True) -> Any:
    """Rebuilds the state pickled by :func:`flatten`, taking tensors from ``restorer``.

    With ``weights_only`` (the default) the sidecar is read by the restricted unpickler
    of :mod:`uring_ckpt._safe_pickle`, which never runs code and raises
    :class:`UnsafeCheckpointError` for anything off its allow-list; without it, by
    ``pickle``, which runs whatever the sidecar names (trusted checkpoints only)."""
    if weights_only:
        return _safe_pickle.load(sidecar, restorer, restorer.where)
    unpickler = pickle.Unpickler(io.BytesIO(sidecar))
    unpickler.persistent_load = restorer  # type: ignore[assignment]
    return unpickler.load()
