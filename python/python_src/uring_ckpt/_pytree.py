"""Flattening a nested training state into tensor entries plus a pickled sidecar, and back.

The state (dicts, lists, tuples, any picklable object) is pickled with a ``persistent_id``
hook, as ``torch.save`` does: every torch tensor and numpy array of a safetensors dtype is
left out of the pickle and replaced by a reference to a named tensor entry; the entries go to
safetensors shards. Names are the tensor's path in the nested dicts and lists
(``state_dict/layer.weight``, ``optimizer_states/0/state/3/exp_avg``); a tensor reached only
through some other object is named ``objects/<n>``.

Tensors that share memory with the same offset, shape, strides and dtype (tied weights, or
one tensor object reached twice) are stored once, and come back as one tensor object.
Partially overlapping views are stored separately. Tensors of other dtypes (complex128,
quantized, sparse) and tensor subclasses stay in the pickle, as ``pickle`` writes them.

CUDA tensors are saved from device memory (entry kind ``"cuda"``) when the extension was
built with its ``cuda`` feature and the CUDA driver loads (``_uring_ckpt.cuda_available()``):
they are made contiguous on their device, the device is synchronized, and the Rust side
copies them chunk by chunk into its staging buffers. Otherwise they are copied to the CPU
here (``.to("cpu")``), and the ``uring_ckpt`` logger says why, once.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from . import _safe_pickle
from ._errors import CorruptCheckpointError

try:  # numpy and torch are both optional; either may be missing.
    import numpy as np
except ImportError:  # pragma: no cover - numpy is a dependency of every test setup
    np = None  # type: ignore[assignment]


def _torch() -> Any:
    """The torch module, or None when it is not installed (imported on first use)."""
    mod = sys.modules.get("torch")
    if mod is not None:
        return mod
    try:
        import torch
    except ImportError:
        return None
    return torch


_log = logging.getLogger("uring_ckpt")
_cuda_direct_state: bool | None = None


def cuda_direct() -> bool:
    """Whether CUDA tensors are saved from device memory (the extension was built with the
    ``cuda`` feature and found the CUDA driver). When not, says so once on the
    ``uring_ckpt`` logger (CUDA tensors are then copied to the CPU first)."""
    global _cuda_direct_state
    if _cuda_direct_state is None:
        from . import _uring_ckpt

        _cuda_direct_state = bool(_uring_ckpt.cuda_available())
        if not _cuda_direct_state:
            why = (
                "no CUDA driver (libcuda.so.1) was found"
                if _uring_ckpt.cuda_built()
                else "the extension was built without CUDA (maturin develop --release --features cuda)"
            )
            _log.info("CUDA tensors are copied to the CPU before saving: %s", why)
    return _cuda_direct_state


SIDECAR = "extras.pkl"
"""File name of the pickled sidecar inside a checkpoint directory."""

FORMAT_KEY = "uring_ckpt.python.format"
"""Manifest metadata key naming the sidecar format; its value is ``FORMAT_VERSION``."""

FORMAT_VERSION = "1"

PID_TAG = "uring_ckpt.tensor"

# torch dtype attribute name -> safetensors dtype (only those this torch has are used).
_TORCH_DTYPES = [
    ("bool", "BOOL"),
    ("uint8", "U8"),
    ("int8", "I8"),
    ("int16", "I16"),
    ("uint16", "U16"),
    ("float16", "F16"),
    ("bfloat16", "BF16"),
    ("int32", "I32"),
    ("uint32", "U32"),
    ("float32", "F32"),
    ("complex64", "C64"),
    ("float64", "F64"),
    ("int64", "I64"),
    ("uint64", "U64"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e8m0fnu", "F8_E8M0"),
]

# numpy dtype name -> safetensors dtype.
_NUMPY_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "complex64": "C64",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
}
_NUMPY_FROM_SAFETENSORS = {v: k for k, v in _NUMPY_DTYPES.items()}
_NUMPY_DTYPE_STR = re.compile(r"[<>|=]?[a-z][0-9]{1,2}")


def torch_dtype_map() -> dict[Any, str]:
    """torch dtype -> safetensors dtype, for the dtypes the installed torch has."""
    torch = _torch()
    if torch is None:
        return {}
    return {getattr(torch, n): s for n, s in _TORCH_DTYPES if hasattr(torch, n)}


def torch_dtype_from_safetensors(dtype: str) -> Any:
    torch = _torch()
    for n, s in _TORCH_DTYPES:
        if s == dtype and hasattr(torch, n):
            return getattr(torch, n)
    raise TypeError(f"safetensors dtype {dtype} has no torch dtype in this torch version")


@dataclass
class TensorEntry:
    """One tensor to save: its bytes are ``obj`` (a contiguous CPU torch tensor when ``kind``
    is ``"torch"``, a contiguous CUDA torch tensor, its device synchronized, when it is
    ``"cuda"``, a C-contiguous uint8 numpy view when it is ``"buffer"``)."""

    name: str
    dtype: str
    shape: list[int]
    kind: str
    obj: Any

    def as_tuple(self) -> tuple[str, str, list[int], str, Any]:
        return (self.name, self.dtype, self.shape, self.kind, self.obj)


@dataclass
class Flattened:
    """A state split into tensor entries and the pickled rest."""

    tensors: list[TensorEntry]
    sidecar: bytes
    copied_bytes: int
    """Bytes copied to make tensors contiguous, move them to the CPU or snapshot them."""
    cuda_devices: list[Any] = field(default_factory=list)
    """CUDA devices of the ``"cuda"`` entries (synchronized by :func:`flatten`)."""

    @property
    def tensor_bytes(self) -> int:
        return sum(_nbytes(e) for e in self.tensors)


def _nbytes(entry: TensorEntry) -> int:
    obj = entry.obj
    if entry.kind in ("torch", "cuda"):
        return int(obj.numel() * obj.element_size())
    return int(obj.nbytes)


class _Namer:
    """Assigns each tensor reachable through dicts, lists and tuples the path to it."""

    def __init__(self, is_tensor: Callable[[Any], bool]) -> None:
        self.paths: dict[int, str] = {}
        self._is_tensor = is_tensor
        self._seen: set[int] = set()

    def walk(self, obj: Any, path: str) -> None:
        if self._is_tensor(obj):
            self.paths.setdefault(id(obj), path or "tensor")
            return
        if isinstance(obj, (dict, list, tuple)):
            if id(obj) in self._seen:  # shared or cyclic containers: walk once
                return
            self._seen.add(id(obj))
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            for key, value in items:
                self.walk(value, f"{path}/{key}" if path else str(key))


class _Flattener(pickle.Pickler):
    def __init__(self, file: io.BytesIO, state: Any, snapshot: bool) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.torch = _torch()
        self.torch_dtypes = torch_dtype_map()
        self.snapshot = snapshot
        self.entries: list[TensorEntry] = []
        self.copied = 0
        self.cuda_devices: dict[str, Any] = {}  # str(device) -> device of the "cuda" entries
        self._pids: dict[Any, tuple] = {}  # tie key -> persistent id
        self._names: set[str] = set()
        self._others = 0
        self._keep: list[Any] = []  # objects whose id() is a key: kept alive while pickling
        namer = _Namer(self._is_tensor)
        namer.walk(state, "")
        self._paths = namer.paths

    def _is_tensor(self, obj: Any) -> bool:
        torch = self.torch
        if torch is not None and isinstance(obj, torch.Tensor):
            return True
        return np is not None and isinstance(obj, np.ndarray)

    def _name(self, obj: Any) -> str:
        name = self._paths.get(id(obj))
        if name is None:
            name = f"objects/{self._others}"
            self._others += 1
        base, n = name, 2
        while name in self._names:
            name = f"{base}#{n}"
            n += 1
        self._names.add(name)
        return name

    def persistent_id(self, obj: Any) -> tuple | None:
        torch = self.torch
        if torch is not None and isinstance(obj, torch.Tensor):
            return self._torch_pid(obj)
        if np is not None and type(obj) is np.ndarray:
            return self._numpy_pid(obj)
        return None

    def _torch_pid(self, t: Any) -> tuple | None:
        torch = self.torch
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            return None  # a subclass: pickle it as it pickles itself
        dtype = self.torch_dtypes.get(t.dtype)
        if (
            dtype is None
            or t.layout != torch.strided
            or t.is_quantized
            or getattr(t, "is_nested", False)
            or t.device.type == "meta"
        ):
            return None
        storage = t.untyped_storage()
        if storage.nbytes() == 0:
            key: Any = ("id", id(t))
        else:
            key = (storage.data_ptr(), str(t.device), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            key = (key, t.is_conj(), t.is_neg())
        self._keep.append(t)
        base = self._pids.get(key)
        if base is None:
            name = self._name(t)
            data = t.detach()
            kind = "torch"
            if data.device.type == "cuda" and cuda_direct():
                kind = "cuda"
                self.cuda_devices.setdefault(str(data.device), data.device)
                if self.snapshot:
                    data = data.clone(memory_format=torch.contiguous_format)
                    self.copied += data.numel() * data.element_size()
            elif data.device.type != "cpu":
                data = data.to("cpu")
                self.copied += data.numel() * data.element_size()
            elif self.snapshot:
                data = data.clone(memory_format=torch.contiguous_format)
                self.copied += data.numel() * data.element_size()
            if data.is_conj() or data.is_neg():
                data = data.resolve_conj().resolve_neg()
            if not data.is_contiguous():
                data = data.contiguous()
                self.copied += data.numel() * data.element_size()
            self.entries.append(TensorEntry(name, dtype, list(data.shape), kind, data))
            base = (PID_TAG, name, "torch", str(t.dtype).removeprefix("torch."), str(t.device))
            self._pids[key] = base
        return (*base, bool(t.requires_grad), isinstance(t, torch.nn.Parameter))

    def _numpy_pid(self, a: Any) -> tuple | None:
        dtype = _NUMPY_DTYPES.get(a.dtype.name)
        if dtype is None or a.dtype.hasobject:
            return None
        if a.size == 0:
            key: Any = ("id", id(a))
        else:
            key = (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)
        self._keep.append(a)
        pid = self._pids.get(key)
        if pid is None:
            name = self._name(a)
            data = a
            if not data.dtype.isnative:
                data = data.astype(data.dtype.newbyteorder("="))
            if not data.flags.c_contiguous:
                data = np.ascontiguousarray(data)
            if self.snapshot and np.shares_memory(data, a):
                data = data.copy()
            if data is not a:
                self.copied += data.nbytes
            view = data.reshape(-1).view(np.uint8)
            self.entries.append(TensorEntry(name, dtype, list(a.shape), "buffer", view))
            pid = (PID_TAG, name, "numpy", data.dtype.str, "cpu", False, False)
            self._pids[key] = pid
        return pid


def flatten(state: Any, *, snapshot: bool = False) -> Flattened:
    """Splits ``state`` into tensor entries and the pickled rest. With ``snapshot``, every
    tensor is copied (so the caller may change the originals as soon as this returns).

    The devices of ``"cuda"`` entries are synchronized before this returns: the save reads
    device memory on a stream of its own, so kernels queued on torch's streams (the ones
    that computed the tensors, or made them contiguous here) must have finished."""
    buf = io.BytesIO()
    pickler = _Flattener(buf, state, snapshot)
    pickler.dump(state)
    devices = list(pickler.cuda_devices.values())
    if devices:
        torch = _torch()
        for device in devices:
            torch.cuda.synchronize(device)
    return Flattened(pickler.entries, buf.getvalue(), pickler.copied, devices)


# ---------------------------------------------------------------------------------------
# Loading


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
        if len(buf) == 0:
            return torch.empty(shape, dtype=dtype)
        # The buffer is writable and owned by `buf`, which the tensor keeps alive: no copy.
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)

    @staticmethod
    def _numpy_from(buf: Any, dtype: Any, shape: list[int]) -> Any:
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
        import ml_dtypes  # bfloat16 and float8 types for numpy, when installed

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


__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "SIDECAR",
    "Flattened",
    "Restorer",
    "TensorEntry",
    "cuda_direct",
    "flatten",
    "torch_dtype_map",
    "unflatten",
]
