"""The allow-list: which globals a ``weights_only`` load may name.

Exact ``(module, name)`` pairs (no prefix rule, no dotted name), each with its REDUCE
validator from :mod:`._reduce` (or none: the global is a value, such as ``torch.float32``,
and cannot be called); Lightning's ``AttributeDict`` when Lightning is imported; and the
globals added with ``torch.serialization.add_safe_globals``, matched exactly against
``module.qualname`` and never from a blocked module. :func:`_check_global` is the one
decision, used by the pre-scan and by the interpreter alike.
"""

from __future__ import annotations

import collections
import pathlib
import sys
from typing import Any

from .._errors import UnsafeCheckpointError
from .._optional import np
from .._optional import torch_module as _torch
from ._reduce import (
    Validator,
    _r_bytearray,
    _r_complex,
    _r_counter,
    _r_defaultdict,
    _r_deque,
    _r_np_dtype,
    _r_np_scalar,
    _r_ordered_dict,
    _r_path,
    _r_range,
    _r_set,
    _r_slice,
    _r_torch_device,
    _r_torch_size,
)

# Modules never allowed, even when a user added a global from them (as torch does), and
# builtins that evaluate, import or reach attributes by name.
_BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt", "subprocess", "_posixsubprocess", "pty", "shutil"})
_BLOCKED_BUILTINS = frozenset(
    {
        "eval",
        "exec",
        "compile",
        "__import__",
        "open",
        "getattr",
        "setattr",
        "delattr",
        "globals",
        "locals",
        "vars",
        "breakpoint",
        "input",
        "exit",
        "quit",
        "help",
    }
)

_ATTRIBUTE_DICTS = frozenset(
    {
        ("lightning.fabric.utilities.data", "AttributeDict"),
        ("lightning_fabric.utilities.data", "AttributeDict"),
    }
)


def refusal(module: str, name: str, where: str, why: str = "") -> UnsafeCheckpointError:
    """The error for a global a weights_only load refuses: it says how to go on."""
    full = f"{module}.{name}"
    detail = f" ({why})" if why else ""
    return UnsafeCheckpointError(
        f"{where}: weights_only load refuses the global {full}{detail}. If you trust this "
        f"checkpoint, load it with weights_only=False; to allow this one global, call "
        f"torch.serialization.add_safe_globals([{full}]) first (only for a class or function that "
        "cannot run code when the sidecar constructs it)."
    )


def torch_dtypes_by_name() -> dict[str, Any]:
    """``{"float32": torch.float32, ...}``: every dtype attribute of the torch module,
    read from its ``__dict__`` (no ``getattr``, which could import torch submodules)."""
    global _torch_dtypes_cache
    if _torch_dtypes_cache is None:
        torch = _torch()
        _torch_dtypes_cache = (
            {} if torch is None else {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
        )
    return _torch_dtypes_cache


_torch_dtypes_cache: dict[str, Any] | None = None


class _Entry:
    """An allowed global: the object a GLOBAL pushes, and what REDUCE does with it (None:
    it cannot be called)."""

    __slots__ = ("reduce", "value")

    def __init__(self, value: Any, reduce: Validator | None = None) -> None:
        self.value = value
        self.reduce = reduce


class _Tables:
    """The allow-list, built once: ``(module, name) -> _Entry``, REDUCE validators by the
    identity of the allowed object, and the types NEWOBJ may instantiate."""

    def __init__(self) -> None:
        entries: dict[tuple[str, str], _Entry] = {}

        def allow(module: str, name: str, value: Any, reduce: Any = None) -> None:
            entries[(module, name)] = _Entry(value, reduce)

        # Plain containers and numbers pickle writes through REDUCE (protocols 2-5).
        allow("builtins", "set", set, _r_set(set))
        allow("builtins", "frozenset", frozenset, _r_set(frozenset))
        allow("builtins", "slice", slice, _r_slice)
        allow("builtins", "range", range, _r_range)  # lazy: range(10**18) allocates nothing
        allow("builtins", "complex", complex, _r_complex)
        allow("builtins", "bytearray", bytearray, _r_bytearray)  # copies only, never bytearray(n)
        # collections: dict/deque subclasses written by REDUCE + SETITEMS/APPENDS; their
        # constructors build empty containers (or copy a container given as argument).
        allow("collections", "OrderedDict", collections.OrderedDict, _r_ordered_dict)
        allow("collections", "defaultdict", collections.defaultdict, _r_defaultdict)
        allow("collections", "Counter", collections.Counter, _r_counter)
        allow("collections", "deque", collections.deque, _r_deque)
        # pathlib: Lightning hyper-parameters often hold paths (a data or output dir).
        # PurePosixPath/PosixPath(*parts) only parse strings: no file-system access. Both
        # the public name and the defining module's (pathlib._local on Python 3.13+).
        for cls in (pathlib.PurePosixPath, pathlib.PosixPath):
            allow("pathlib", cls.__name__, cls, _r_path(cls))
            allow(cls.__module__, cls.__qualname__, cls, _r_path(cls))
        self.newobj: dict[int, Any] = {}
        torch = _torch()
        if torch is not None:
            # Size(tuple of ints) and device(type[, index]): plain values.
            allow("torch", "Size", torch.Size, _r_torch_size)
            allow("torch", "device", torch.device, _r_torch_device)
            for name, dtype in torch_dtypes_by_name().items():  # torch.float32 etc.: values
                allow("torch", name, dtype)
        if np is not None:
            # np.dtype with a plain numeric code, and scalars of such a dtype from raw bytes.
            allow("numpy", "dtype", np.dtype, _r_np_dtype)
            scalar = _numpy_scalar_function()
            if scalar is not None:
                allow("numpy._core.multiarray", "scalar", scalar, _r_np_scalar)  # numpy >= 2
                allow("numpy.core.multiarray", "scalar", scalar, _r_np_scalar)  # numpy 1.x
        self.entries = entries
        self.reducers = {id(e.value): e for e in entries.values() if e.reduce is not None}
        self.values = {id(e.value): e.value for e in entries.values()}
        self.factories = (set, frozenset, bytearray, complex, collections.OrderedDict, collections.deque)
        self.dict_types: tuple = (dict, collections.OrderedDict, collections.defaultdict, collections.Counter)

    def lookup(self, module: str, name: str) -> _Entry | None:
        entry = self.entries.get((module, name))
        if entry is None and (module, name) in _ATTRIBUTE_DICTS:
            entry = self._attribute_dict(module, name)
        return entry

    def _attribute_dict(self, module: str, name: str) -> _Entry | None:
        # Lightning's AttributeDict (Fabric's documented state container): a dict subclass
        # that only maps attribute access to its items, with no __new__/__init__/
        # __setstate__/__setitem__ of its own; pickled as NEWOBJ(cls, ()) + SETITEMS. Only
        # NEWOBJ without arguments is allowed, and items go in through dict.__setitem__.
        # Taken from sys.modules only: a sidecar never makes this load import anything
        # (it is there whenever Lightning's plugins or Fabric are in use).
        mod = sys.modules.get(module)
        cls = vars(mod).get(name) if mod is not None else None
        if not (isinstance(cls, type) and issubclass(cls, dict)):
            return None
        entry = _Entry(cls)
        self.entries[(module, name)] = entry
        self.values[id(cls)] = cls
        self.newobj[id(cls)] = cls
        self.dict_types = (*self.dict_types, cls)
        return entry


def _numpy_scalar_function() -> Any:
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        mod = sys.modules.get(module)
        if mod is not None and "scalar" in vars(mod):
            return vars(mod)["scalar"]
    return None


_tables: _Tables | None = None


def tables() -> _Tables:
    global _tables
    if _tables is None:
        _tables = _Tables()
    return _tables


def _user_globals() -> dict[str, Any]:
    """``{"module.qualname": obj}`` of ``torch.serialization.add_safe_globals``, read at
    each load (the set can change between loads)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    out: dict[str, Any] = {}
    for g in torch.serialization.get_safe_globals():
        if isinstance(g, tuple):
            if len(g) != 2 or not isinstance(g[1], str):
                continue
            out[g[1]] = g[0]
        else:
            module, name = getattr(g, "__module__", None), getattr(g, "__qualname__", None)
            if isinstance(module, str) and isinstance(name, str):
                out[f"{module}.{name}"] = g
    return out


def _check_global(module: Any, name: Any, tabs: _Tables, user: dict[str, Any], where: str) -> Any:
    """The object an allowed global names, or the refusal."""
    if type(module) is not str or type(name) is not str:
        raise UnsafeCheckpointError(f"{where}: a global's module and name must be strings")
    entry = tabs.lookup(module, name)
    if entry is not None:
        return entry.value
    blocked = module in _BLOCKED_MODULES or (module == "builtins" and name in _BLOCKED_BUILTINS)
    full = f"{module}.{name}"
    if full in user and not blocked:
        return user[full]
    if blocked:
        why = "never allowed"
    elif "." in name:
        why = "a dotted name reaches attributes of attributes"
    else:
        why = "not on the allow-list"
    raise refusal(module, name, where, why)
