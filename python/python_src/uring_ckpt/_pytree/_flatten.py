"""The save side: a nested state split into tensor entries plus the pickled rest.

:func:`flatten` pickles the state with a ``persistent_id`` hook that takes every torch
tensor and numpy array of a safetensors dtype out of the pickle (see the package's
docstring for names, ties and CUDA tensors); :func:`cuda_direct` decides whether CUDA
tensors are read from device memory by the Rust side; :func:`tensor_bytes` counts the bytes
:func:`flatten` would hand to the shards, without copying any.
"""

from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import _uring_ckpt
from .._optional import np
from .._optional import torch_module as _torch
from ._format import _NUMPY_DTYPES, PID_TAG, torch_dtype_map

_log = logging.getLogger("uring_ckpt")
_cuda_direct_state: bool | None = None


def cuda_direct() -> bool:
    """Whether CUDA tensors are saved from device memory (the extension was built with the
    ``cuda`` feature and found the CUDA driver). When not, says so once on the
    ``uring_ckpt`` logger (CUDA tensors are then copied to the CPU first)."""
    global _cuda_direct_state
    if _cuda_direct_state is None:
        _cuda_direct_state = bool(_uring_ckpt.cuda_available())
        if not _cuda_direct_state:
            why = (
                "no CUDA driver (libcuda.so.1) was found"
                if _uring_ckpt.cuda_built()
                else "the extension was built without CUDA (maturin develop --release --features cuda)"
            )
            _log.info("CUDA tensors are copied to the CPU before saving: %s", why)
    return _cuda_direct_state


@dataclass
class TensorEntry:
    """One tensor to save: its bytes are ``obj`` (a contiguous CPU torch tensor when ``kind``
    is ``"torch"``, a contiguous CUDA torch tensor when it is ``"cuda"`` (read after torch's
    current stream of its device), a C-contiguous uint8 numpy view when it is ``"buffer"``)."""

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
    """Bytes copied to make tensors contiguous or move them to the CPU."""
    cuda_devices: list[Any] = field(default_factory=list)
    """CUDA devices of the ``"cuda"`` entries."""
    flat: bool = False
    """Whether the state is a flat state dict: a dict of string keys to tensors and plain
    values (no nested dict, list or tuple), each tensor stored under its key (or tied to one
    that is). Such a checkpoint is also a Hugging Face checkpoint (``hf_index``)."""


def _savable_tensor(torch: Any, dtypes: dict[Any, str], t: Any) -> bool:
    """Whether torch tensor ``t`` goes to a shard (else it stays in the pickle)."""
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and dtypes.get(t.dtype) is not None
        and t.layout == torch.strided
        and not t.is_quantized
        and not getattr(t, "is_nested", False)
        and t.device.type != "meta"
    )


def _tensor_key(t: Any) -> Any:
    """What ties two torch tensors into one entry: the same memory, offset, shape, strides
    and dtype (and conjugate/negative bits)."""
    storage = t.untyped_storage()
    if storage.nbytes() == 0:
        return ("id", id(t))
    key = (storage.data_ptr(), str(t.device), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
    return (key, t.is_conj(), t.is_neg())


def _array_key(a: Any) -> Any:
    """What ties two numpy arrays into one entry."""
    if a.size == 0:
        return ("id", id(a))
    return (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)


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
    def __init__(self, file: io.BytesIO, state: Any) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.torch = _torch()
        self.torch_dtypes = torch_dtype_map()
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
        if not _savable_tensor(torch, self.torch_dtypes, t):
            return None  # a subclass or an unsupported tensor: pickled as it pickles itself
        dtype = self.torch_dtypes[t.dtype]
        key = _tensor_key(t)
        self._keep.append(t)
        base = self._pids.get(key)
        if base is None:
            name = self._name(t)
            data = t.detach()
            kind = "torch"
            if data.device.type == "cuda" and cuda_direct():
                kind = "cuda"
                self.cuda_devices.setdefault(str(data.device), data.device)
            elif data.device.type != "cpu":
                data = data.to("cpu")
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
        key = _array_key(a)
        self._keep.append(a)
        pid = self._pids.get(key)
        if pid is None:
            name = self._name(a)
            data = a
            if not data.dtype.isnative:
                data = data.astype(data.dtype.newbyteorder("="))
            if not data.flags.c_contiguous:
                data = np.ascontiguousarray(data)
            if data is not a:
                self.copied += data.nbytes
            view = data.reshape(-1).view(np.uint8)
            self.entries.append(TensorEntry(name, dtype, list(a.shape), "buffer", view))
            pid = (PID_TAG, name, "numpy", data.dtype.str, "cpu", False, False)
            self._pids[key] = pid
        return pid


def flatten(state: Any) -> Flattened:
    """Splits ``state`` into tensor entries and the pickled rest. The entries are the
    caller's tensors where they are contiguous CPU memory (no copy): a snapshot, when one is
    wanted, is the Rust side's (``AsyncSaver``'s ``snapshot`` mode).

    Nothing is synchronized here: the Rust side orders its device-to-host copies of
    ``"cuda"`` entries after an event it records on ``torch.cuda.current_stream(device)``
    when the save starts, so kernels queued on torch's current stream (the ones that
    computed the tensors, or made them contiguous here) finish first without stalling the
    host. Work on other streams must be ordered before the current stream first
    (``torch.cuda.current_stream().wait_stream(side)``), as torch requires for any consumer."""
    buf = io.BytesIO()
    pickler = _Flattener(buf, state)
    pickler.dump(state)
    devices = list(pickler.cuda_devices.values())
    return Flattened(pickler.entries, buf.getvalue(), pickler.copied, devices, _is_flat(state, pickler.entries))


def _is_flat(state: Any, entries: list[TensorEntry]) -> bool:
    """See :attr:`Flattened.flat`."""
    if not isinstance(state, dict) or not entries:
        return False
    if not all(isinstance(k, str) and not isinstance(v, (dict, list, tuple)) for k, v in state.items()):
        return False
    return all(e.name in state for e in entries)
    return Flattened(pickler.entries, buf.getvalue(), pickler.copied, list(pickler.cuda_devices.values()))


class _Discard:
    """A file that forgets what is written to it."""

    def write(self, data: bytes) -> int:
        return len(data)


class _Counter(pickle.Pickler):
    """Walks a state as :class:`_Flattener` does, counting the bytes of the tensor entries."""

    def __init__(self) -> None:
        super().__init__(_Discard(), protocol=pickle.HIGHEST_PROTOCOL)
        self.torch = _torch()
        self.torch_dtypes = torch_dtype_map()
        self.total = 0
        self._seen: set[Any] = set()
        self._keep: list[Any] = []  # objects whose id() is a key: kept alive while pickling

    def persistent_id(self, obj: Any) -> tuple | None:
        torch = self.torch
        if torch is not None and isinstance(obj, torch.Tensor):
            if not _savable_tensor(torch, self.torch_dtypes, obj):
                return None
            key = _tensor_key(obj)
            nbytes = obj.numel() * obj.element_size()
        elif np is not None and type(obj) is np.ndarray:
            if _NUMPY_DTYPES.get(obj.dtype.name) is None or obj.dtype.hasobject:
                return None
            key = _array_key(obj)
            nbytes = obj.nbytes
        else:
            return None
        self._keep.append(obj)
        if key not in self._seen:
            self._seen.add(key)
            self.total += nbytes
        return ("t",)


def tensor_bytes(state: Any) -> int:
    """The bytes of the tensor entries :func:`flatten` makes of ``state`` (ties counted once):
    what a snapshot of it holds. Nothing is copied; the rest is pickled and thrown away."""
    counter = _Counter()
    counter.dump(state)
    return counter.total
