"""The ``weights_only`` unpickler of the sidecar (``extras.pkl``).

Whoever can write a checkpoint controls its sidecar (DESIGN.md, "Threat model"), so a
``weights_only`` load must never run code, whatever the bytes. Subclassing the C
``pickle.Unpickler`` and overriding ``find_class`` is not enough for that: ``find_class``
only vets where a global comes from, while BUILD calls ``__setstate__`` (or sets
attributes) on whatever object is on the stack, APPENDS/SETITEMS/ADDITEMS call
``extend``/``__setitem__``/``add`` of whatever object is there, REDUCE passes any
arguments to an allowed callable (``bytearray(10**12)``), and none of these has a hook.
So the restricted load never hands the bytes to ``pickle`` at all:

1. **Pre-scan** (:func:`_scan`): ``pickletools.genops`` decodes the whole opcode stream
   before anything is constructed. Opcodes outside :data:`_ALLOWED_OPS` are refused
   (INST, OBJ, EXT1/2/4, NEWOBJ_EX, PERSID, out-of-band buffers, the text opcodes of
   protocol 0), so is a GLOBAL or STACK_GLOBAL naming anything but an allowed
   ``(module, name)`` pair (STACK_GLOBAL operands must be string constants the scan can
   see), and so are bytes after STOP.
2. **Interpreter** (:class:`_Machine`): a small stack machine that implements each
   allowed opcode itself, with explicit type checks: REDUCE calls only the allowed
   callables, each through a validator that accepts the argument types ``pickle`` writes
   for it and charges what it allocates to a budget proportional to the sidecar's size;
   NEWOBJ and BUILD work only on the types listed; list/dict/set opcodes only on the
   exact built-in container types. Every value it builds comes from an allowed type.

The allow-list is exact ``(module, name)`` pairs: no prefix rule, and no dotted name
(protocol 4 resolves ``name`` as an attribute path, which is how an allowed module leads
to ``builtins``). Globals added with ``torch.serialization.add_safe_globals`` are matched
exactly against ``{module}.{name}`` as torch does (a dotted nested-class name included,
since it is looked up in that table and never resolved by attribute); they are called,
instantiated and given state as ``torch.load`` does, which is what adding them means.

Any failure on hostile input comes out as :class:`UnsafeCheckpointError` (both a
``CorruptCheckpointError`` and a ``pickle.UnpicklingError``); tensor references that do
not match the shards raise ``CorruptCheckpointError`` from the restorer.
"""

from __future__ import annotations

import collections
import pathlib
import pickletools
import sys
from typing import Any, Callable

from ._errors import CorruptCheckpointError, UnsafeCheckpointError

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is a dependency of every test setup
    np = None  # type: ignore[assignment]

_ALLOWED_OPS = frozenset(
    {
        # framing
        "PROTO",
        "FRAME",
        "STOP",
        # stack and memo
        "MARK",
        "POP",
        "POP_MARK",
        "DUP",
        "BINPUT",
        "LONG_BINPUT",
        "MEMOIZE",
        "BINGET",
        "LONG_BINGET",
        # constants (binary forms: what protocols 2 to 5 write)
        "NONE",
        "NEWTRUE",
        "NEWFALSE",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "LONG4",
        "BINFLOAT",
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "SHORT_BINBYTES",
        "BINBYTES",
        "BINBYTES8",
        "BYTEARRAY8",
        # containers
        "EMPTY_TUPLE",
        "TUPLE",
        "TUPLE1",
        "TUPLE2",
        "TUPLE3",
        "EMPTY_LIST",
        "LIST",
        "APPEND",
        "APPENDS",
        "EMPTY_DICT",
        "DICT",
        "SETITEM",
        "SETITEMS",
        "EMPTY_SET",
        "ADDITEMS",
        "FROZENSET",
        # objects: each checked against the allow-list (see _Machine)
        "GLOBAL",
        "STACK_GLOBAL",
        "REDUCE",
        "NEWOBJ",
        "BUILD",
        "BINPERSID",
    }
)
"""Opcodes a weights_only load interprets; every other one is refused by the pre-scan."""

_REFUSED_WHY = {
    "INST": "it imports and calls a class named in the stream",
    "OBJ": "it calls a class with arbitrary arguments",
    "EXT1": "it names a global through the copyreg extension registry",
    "EXT2": "it names a global through the copyreg extension registry",
    "EXT4": "it names a global through the copyreg extension registry",
    "NEWOBJ_EX": "it calls __new__ with keyword arguments; no allowed type needs it",
    "PERSID": "uring_ckpt's tensor references are binary (BINPERSID) tuples",
    "NEXT_BUFFER": "the sidecar has no out-of-band buffers",
    "READONLY_BUFFER": "the sidecar has no out-of-band buffers",
}

_MAX_KEY_NODES = 4096
"""Largest dict key or set element accepted, counted in nested tuple/frozenset nodes as
hashing walks them (shared sub-tuples counted each time): a key nesting memo references
would otherwise cost 2**depth to hash."""

_BUDGET_BASE = 1 << 20
_BUDGET_PER_BYTE = 16
"""Work and memory units a load may spend beyond the opcodes themselves (bytes copied,
elements copied into new containers, key nodes hashed): ``_BUDGET_BASE +
_BUDGET_PER_BYTE * len(sidecar)``. Each opcode builds at most one object, so what a load
allocates stays within a constant factor of the sidecar's size, itself capped by the
manifest."""

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

_CONSTANT_OPS = frozenset(
    {
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "LONG4",
        "BINFLOAT",
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "SHORT_BINBYTES",
        "BINBYTES",
        "BINBYTES8",
        "BYTEARRAY8",  # genops decodes it into a fresh bytearray
    }
)
"""Allowed opcodes whose decoded argument is the value they push."""

_UNKNOWN = object()
"""What the pre-scan knows about a stack value that is not a string constant."""


_PLAIN = (str, bytes, int, float, bool, type(None))


def _leaf(obj: Any) -> str:
    t = type(obj)
    if t in _PLAIN:
        try:
            return repr(obj[:100] if t is str or t is bytes else obj)
        except ValueError:  # an int too long to print
            return f"<{t.__name__}>"
    if isinstance(obj, type):
        return f"<class {getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}>"
    return f"<{t.__name__}>"


def _short(obj: Any, limit: int = 120) -> str:
    """A bounded description of a value of the stream. Never ``repr()`` of a container:
    one that nests memo references (a DAG) would take 2**depth to print."""
    if type(obj) is tuple or type(obj) is list:
        inner = ", ".join(_leaf(x) for x in obj[:8]) + (", ..." if len(obj) > 8 else "")
        text = f"({inner})" if type(obj) is tuple else f"[{inner}]"
    else:
        text = _leaf(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


# ---------------------------------------------------------------------------------------
# The allow-list


def _torch() -> Any:
    mod = sys.modules.get("torch")
    if mod is not None:
        return mod
    try:
        import torch
    except ImportError:
        return None
    return torch


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

_NP_DTYPE_CODES = frozenset(
    {"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16"}
)
"""The numpy dtype codes a sidecar may build (``np.dtype('f8', False, True)``): plain
numbers and bools, no objects, structures, sub-arrays, strings or datetimes."""


def _simple_np_dtype(dtype: Any) -> bool:
    return (
        np is not None
        and isinstance(dtype, np.dtype)
        and dtype.kind in "biufc"
        and not dtype.hasobject
        and dtype.fields is None
        and dtype.subdtype is None
        and dtype.str[1:] in _NP_DTYPE_CODES
    )


class _Entry:
    """An allowed global: the object a GLOBAL pushes, and what REDUCE does with it (None:
    it cannot be called)."""

    __slots__ = ("reduce", "value")

    def __init__(self, value: Any, reduce: Callable[[_Machine, tuple], Any] | None = None) -> None:
        self.value = value
        self.reduce = reduce


def _args(args: tuple, low: int, high: int, what: str) -> None:
    if not low <= len(args) <= high:
        raise UnsafeCheckpointError(f"{what} takes {low} to {high} arguments in a sidecar, got {len(args)}")


def _of(value: Any, types: tuple, what: str) -> Any:
    if type(value) not in types:
        raise UnsafeCheckpointError(
            f"{what} does not accept a {type(value).__name__} argument in a weights_only load"
        )
    return value


def _seq(m: _Machine, value: Any, what: str) -> Any:
    """A list or tuple argument whose elements are copied: charged by length."""
    _of(value, (list, tuple), what)
    m.charge(len(value))
    return value


def _r_bytearray(m: _Machine, args: tuple) -> Any:
    # Only a copy of bytes that are in the stream: never bytearray(n), which allocates n.
    _args(args, 0, 1, "bytearray")
    if not args:
        return bytearray()
    data = _of(args[0], (bytes, bytearray), "bytearray")
    m.charge(len(data))
    return bytearray(data)


def _r_set(cls: type) -> Callable[[_Machine, tuple], Any]:
    def build(m: _Machine, args: tuple) -> Any:
        _args(args, 0, 1, cls.__name__)
        if not args:
            return cls()
        items = args[0]
        _of(items, (list, tuple, set, frozenset), cls.__name__)
        m.charge(len(items))
        for item in items:
            m.key(item)
        return cls(items)

    return build


def _r_slice(m: _Machine, args: tuple) -> Any:
    _args(args, 1, 3, "slice")
    for a in args:
        _of(a, (int, bool, type(None)), "slice")
    return slice(*args)


def _r_range(m: _Machine, args: tuple) -> Any:
    _args(args, 1, 3, "range")
    for a in args:
        _of(a, (int, bool), "range")
    return range(*args)


def _r_complex(m: _Machine, args: tuple) -> Any:
    _args(args, 0, 2, "complex")
    for a in args:
        _of(a, (int, bool, float), "complex")
    return complex(*args)


def _r_ordered_dict(m: _Machine, args: tuple) -> Any:
    # What OrderedDict.__reduce__ writes: OrderedDict() then SETITEMS (and BUILD for
    # attributes such as a state_dict's _metadata). A list of pairs is accepted too.
    _args(args, 0, 1, "OrderedDict")
    out: collections.OrderedDict = collections.OrderedDict()
    if args:
        for pair in _seq(m, args[0], "OrderedDict"):
            _of(pair, (tuple, list), "OrderedDict")
            if len(pair) != 2:
                raise UnsafeCheckpointError("OrderedDict items must be pairs")
            m.key(pair[0])
            out[pair[0]] = pair[1]
    return out


def _r_defaultdict(m: _Machine, args: tuple) -> Any:
    # defaultdict.__reduce__ writes (factory,) and the items as SETITEMS. The factory is
    # called later, by the user's code, on a missing key: only None or an allowed type
    # that builds an empty value from no arguments.
    _args(args, 0, 1, "defaultdict")
    factory = args[0] if args else None
    if factory is not None and not any(factory is t for t in m.tables.factories):
        raise UnsafeCheckpointError(
            f"defaultdict default_factory {_short(factory)} is not allowed in a weights_only load"
        )
    return collections.defaultdict(factory)


def _r_counter(m: _Machine, args: tuple) -> Any:
    # Counter.__reduce__ writes (dict(self),): copied, keys already vetted as dict keys.
    _args(args, 0, 1, "Counter")
    if not args:
        return collections.Counter()
    items = _of(args[0], (dict,), "Counter")
    m.charge(len(items))
    return collections.Counter(items)


def _r_deque(m: _Machine, args: tuple) -> Any:
    # deque.__reduce__ writes ((), maxlen) and the items as APPENDS.
    _args(args, 0, 2, "deque")
    items = _seq(m, args[0], "deque") if args else ()
    maxlen = args[1] if len(args) > 1 else None
    _of(maxlen, (int, type(None)), "deque maxlen")
    return collections.deque(items, maxlen)


def _r_path(cls: type) -> Callable[[_Machine, tuple], Any]:
    # PurePath.__reduce__ writes (cls, parts): building one parses strings, nothing more.
    def build(m: _Machine, args: tuple) -> Any:
        for part in args:
            _of(part, (str,), cls.__name__)
            m.charge(len(part) + 1)
        return cls(*args)

    return build


def _r_torch_size(m: _Machine, args: tuple) -> Any:
    torch = _torch()
    _args(args, 0, 1, "torch.Size")
    dims = _seq(m, args[0], "torch.Size") if args else ()
    for d in dims:
        _of(d, (int,), "torch.Size")
    return torch.Size(dims)


def _r_torch_device(m: _Machine, args: tuple) -> Any:
    torch = _torch()
    _args(args, 1, 2, "torch.device")
    kind = _of(args[0], (str,), "torch.device")
    if len(kind) > 64:
        raise UnsafeCheckpointError("torch.device name too long")
    if len(args) == 2:
        index = _of(args[1], (int, type(None)), "torch.device")
        if index is not None and not 0 <= index < 1 << 16:
            raise UnsafeCheckpointError(f"torch.device index {index} out of range")
        return torch.device(kind, index) if index is not None else torch.device(kind)
    return torch.device(kind)


def _r_np_dtype(m: _Machine, args: tuple) -> Any:
    # What numpy writes for a plain dtype: dtype('f8', False, True), then BUILD with its
    # byte order. Always a fresh copy (copy=True), so BUILD never touches numpy's shared
    # built-in descriptors, whatever the stream asked for.
    _args(args, 1, 3, "numpy.dtype")
    code = _of(args[0], (str,), "numpy.dtype")
    for flag in args[1:]:
        _of(flag, (bool,), "numpy.dtype")
    if code not in _NP_DTYPE_CODES:
        raise UnsafeCheckpointError(f"numpy.dtype({code!r}) is not a plain numeric dtype")
    dtype = np.dtype(code, False, True)
    m.fresh_dtypes[id(dtype)] = dtype
    return dtype


def _r_np_scalar(m: _Machine, args: tuple) -> Any:
    # numpy scalars pickle as scalar(dtype, raw bytes). Built here from the validated
    # dtype and exactly itemsize bytes (numpy's own scalar() also takes object dtypes).
    _args(args, 2, 2, "numpy scalar")
    dtype, data = args
    if not _simple_np_dtype(dtype):
        raise UnsafeCheckpointError(f"numpy scalar of dtype {_short(dtype)} is not allowed")
    _of(data, (bytes,), "numpy scalar")
    if len(data) != dtype.itemsize:
        raise UnsafeCheckpointError(f"numpy scalar of {dtype} needs {dtype.itemsize} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=dtype)[0]


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


# ---------------------------------------------------------------------------------------
# Pass 1: the pre-scan


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


def _scan(data: bytes, tabs: _Tables, user: dict[str, Any], where: str) -> list[tuple[str, Any, int]]:
    """Decodes every opcode before anything is built; refuses opcodes outside
    :data:`_ALLOWED_OPS`, globals off the allow-list and bytes after STOP."""
    ops: list[tuple[str, Any, int]] = []
    # For STACK_GLOBAL, what the scan knows of the last two values pushed (a string
    # constant, or _UNKNOWN) and of the memo (index -> string constant or _UNKNOWN).
    last: list[Any] = []
    memo: dict[int, Any] = {}
    end = -1
    for op, arg, pos in pickletools.genops(data):
        name = op.name
        if name not in _ALLOWED_OPS:
            why = _REFUSED_WHY.get(name, "weights_only loads read the binary opcodes of protocols 2 to 5")
            raise UnsafeCheckpointError(
                f"{where}: weights_only load refuses opcode {name} at byte {pos}: {why}"
            )
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"):
            last.append(arg)
        elif name in ("BINGET", "LONG_BINGET"):
            last.append(memo.get(arg, _UNKNOWN))
        elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else arg
            memo[index] = last[-1] if last else _UNKNOWN
        elif name in ("FRAME", "PROTO"):
            pass
        elif name == "GLOBAL":
            module, _, gname = arg.partition(" ")
            if " " in gname:
                raise UnsafeCheckpointError(f"{where}: GLOBAL {_short(arg)} at byte {pos} is malformed")
            _check_global(module, gname, tabs, user, where)
            last.append(_UNKNOWN)
        elif name == "STACK_GLOBAL":
            module_name = last[-2:]
            if len(module_name) != 2 or any(type(s) is not str for s in module_name):
                raise UnsafeCheckpointError(
                    f"{where}: STACK_GLOBAL at byte {pos} does not take its module and name from "
                    "string constants"
                )
            _check_global(module_name[0], module_name[1], tabs, user, where)
            last.append(_UNKNOWN)
        else:
            last.append(_UNKNOWN)
        if len(last) > 2:
            del last[0]
        ops.append((name, arg, pos))
        if name == "STOP":
            end = pos + 1
    if end != len(data):
        raise UnsafeCheckpointError(f"{where}: {len(data) - end} bytes after the pickle's STOP")
    return ops


# ---------------------------------------------------------------------------------------
# Pass 2: the interpreter

_NESTED_KEYS = (tuple, frozenset)


class _Machine:
    def __init__(
        self,
        size: int,
        persistent_load: Callable[[Any], Any],
        tabs: _Tables,
        user: dict[str, Any],
        where: str,
    ) -> None:
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.persistent_load = persistent_load
        self.tables = tabs
        self.user = user
        self.user_ids = {id(v): v for v in user.values()}
        self.where = where
        self.units = _BUDGET_BASE + _BUDGET_PER_BYTE * size
        self.fresh_dtypes: dict[int, Any] = {}
        self._key_costs: dict[int, tuple[Any, int]] = {}
        torch = _torch()
        if torch is not None:
            self._nested: tuple = (*_NESTED_KEYS, torch.Size)
        else:
            self._nested = _NESTED_KEYS

    # -- accounting ----------------------------------------------------------------------

    def charge(self, units: int) -> None:
        self.units -= units
        if self.units < 0:
            raise UnsafeCheckpointError(
                f"{self.where}: the sidecar asks for more memory or work than its size allows"
            )

    def key(self, key: Any) -> None:
        """Vets a dict key or set element: charged by the nodes hashing it walks."""
        self.charge(self._key_cost(key) if type(key) in self._nested else 1)

    def _key_cost(self, root: Any) -> int:
        costs = self._key_costs  # id -> (obj, cost); the obj keeps the id from being reused
        nested = self._nested
        todo: list[tuple[Any, bool]] = [(root, False)]
        while todo:
            obj, children_done = todo.pop()
            hit = costs.get(id(obj))
            if hit is not None and hit[0] is obj:
                continue
            if children_done:
                cost = 1
                for child in obj:
                    cost += costs[id(child)][1] if type(child) in nested else 1
                if cost > _MAX_KEY_NODES:
                    raise UnsafeCheckpointError(
                        f"{self.where}: a dict key or set element is larger than {_MAX_KEY_NODES} nodes"
                    )
                costs[id(obj)] = (obj, cost)
                continue
            todo.append((obj, True))
            todo.extend((child, False) for child in obj if type(child) in nested)
        return costs[id(root)][1]

    # -- the stack -----------------------------------------------------------------------

    def pop_mark(self) -> list[Any]:
        items = self.stack
        self.stack = self.metastack.pop()  # IndexError without a MARK: typed by load()
        return items

    def top(self) -> Any:
        if not self.stack:
            raise UnsafeCheckpointError(f"{self.where}: stack underflow")
        return self.stack[-1]

    def pop(self) -> Any:
        if not self.stack:
            raise UnsafeCheckpointError(f"{self.where}: stack underflow")
        return self.stack.pop()

    def refuse(self, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{self.where}: weights_only load refuses {what}")

    def run(self, ops: list[tuple[str, Any, int]]) -> Any:
        dispatch = self._dispatch()
        for name, arg, _pos in ops:
            if name in _CONSTANT_OPS:
                self.stack.append(arg)
                continue
            if name == "STOP":
                value = self.pop()
                if self.stack or self.metastack:
                    raise UnsafeCheckpointError(f"{self.where}: values left on the stack at STOP")
                return value
            dispatch[name](arg)
        raise UnsafeCheckpointError(f"{self.where}: no STOP")

    def _dispatch(self) -> dict[str, Callable[[Any], Any]]:
        """A handler for every allowed opcode but the constants (STOP: see run())."""
        s = self
        return {
            "PROTO": s._proto,
            "FRAME": lambda arg: None,
            "STOP": lambda arg: None,
            "MARK": s._mark,
            "POP": lambda arg: s.pop(),
            "POP_MARK": lambda arg: s.pop_mark(),
            "DUP": lambda arg: s.stack.append(s.top()),
            "BINPUT": s._put,
            "LONG_BINPUT": s._put,
            "MEMOIZE": lambda arg: s._put(len(s.memo)),
            "BINGET": s._get,
            "LONG_BINGET": s._get,
            "NONE": lambda arg: s.stack.append(None),
            "NEWTRUE": lambda arg: s.stack.append(True),
            "NEWFALSE": lambda arg: s.stack.append(False),
            "EMPTY_TUPLE": lambda arg: s.stack.append(()),
            "TUPLE": s._tuple_mark,
            "TUPLE1": lambda arg: s._tuple(1),
            "TUPLE2": lambda arg: s._tuple(2),
            "TUPLE3": lambda arg: s._tuple(3),
            "EMPTY_LIST": lambda arg: s.stack.append([]),
            "LIST": s._list_mark,
            "APPEND": lambda arg: s._extend([s.pop()]),
            "APPENDS": lambda arg: s._extend(s.pop_mark()),
            "EMPTY_DICT": lambda arg: s.stack.append({}),
            "DICT": s._dict,
            "SETITEM": s._setitem,
            "SETITEMS": s._setitems,
            "EMPTY_SET": lambda arg: s.stack.append(set()),
            "ADDITEMS": s._additems,
            "FROZENSET": s._frozenset,
            "GLOBAL": s._global,
            "STACK_GLOBAL": s._stack_global,
            "REDUCE": s._reduce,
            "NEWOBJ": s._newobj,
            "BUILD": s._build,
            "BINPERSID": s._persid,
        }

    # -- opcodes -------------------------------------------------------------------------

    def _proto(self, arg: int) -> None:
        if not 2 <= arg <= 5:
            raise UnsafeCheckpointError(f"{self.where}: unsupported pickle protocol {arg}")

    def _mark(self, arg: Any) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def _put(self, index: int) -> None:
        self.memo[index] = self.top()

    def _get(self, index: int) -> None:
        try:
            self.stack.append(self.memo[index])
        except KeyError:
            raise UnsafeCheckpointError(f"{self.where}: memo index {index} was never stored") from None

    # (pop_mark() replaces self.stack: pop first, then push onto the outer stack.)
    def _tuple_mark(self, arg: Any) -> None:
        items = tuple(self.pop_mark())
        self.stack.append(items)

    def _list_mark(self, arg: Any) -> None:
        items = self.pop_mark()
        self.stack.append(items)

    def _tuple(self, n: int) -> None:
        if len(self.stack) < n:
            raise UnsafeCheckpointError(f"{self.where}: stack underflow")
        items = tuple(self.stack[-n:])
        del self.stack[-n:]
        self.stack.append(items)

    def _extend(self, items: list[Any]) -> None:
        target = self.top()
        t = type(target)
        if t is list or t is collections.deque:
            target.extend(items)
        elif id(t) in self.user_ids:  # a user-allowed type: as pickle does
            extend = getattr(target, "extend", None)
            if extend is not None:
                extend(items)
            else:
                for item in items:
                    target.append(item)
        else:
            raise self.refuse(f"appending to a {t.__name__}")

    def _pairs(self, items: list[Any]) -> None:
        if len(items) % 2:
            raise UnsafeCheckpointError(f"{self.where}: odd number of dict items")
        target = self.top()
        t = type(target)
        if any(t is d for d in self.tables.dict_types):
            for i in range(0, len(items), 2):
                self.key(items[i])
                if t is dict or t is collections.OrderedDict or t is collections.defaultdict:
                    target[items[i]] = items[i + 1]
                else:  # Counter, AttributeDict: dict's own __setitem__
                    dict.__setitem__(target, items[i], items[i + 1])
        elif id(t) in self.user_ids:
            for i in range(0, len(items), 2):
                self.key(items[i])
                target[items[i]] = items[i + 1]
        else:
            raise self.refuse(f"setting items of a {t.__name__}")

    def _setitem(self, arg: Any) -> None:
        value = self.pop()
        key = self.pop()
        self._pairs([key, value])

    def _setitems(self, arg: Any) -> None:
        self._pairs(self.pop_mark())

    def _dict(self, arg: Any) -> None:
        items = self.pop_mark()
        self.stack.append({})
        self._pairs(items)

    def _additems(self, arg: Any) -> None:
        items = self.pop_mark()
        target = self.top()
        if type(target) is not set:
            raise self.refuse(f"adding items to a {type(target).__name__}")
        for item in items:
            self.key(item)
            target.add(item)

    def _frozenset(self, arg: Any) -> None:
        items = self.pop_mark()
        for item in items:
            self.key(item)
        self.stack.append(frozenset(items))

    def _global(self, arg: str) -> None:
        module, _, name = arg.partition(" ")
        self.stack.append(_check_global(module, name, self.tables, self.user, self.where))

    def _stack_global(self, arg: Any) -> None:
        name = self.pop()
        module = self.pop()
        self.stack.append(_check_global(module, name, self.tables, self.user, self.where))

    def _reduce(self, arg: Any) -> None:
        args = self.pop()
        func = self.top()
        if type(args) is not tuple:
            raise self.refuse(f"REDUCE with {type(args).__name__} arguments")
        entry = self.tables.reducers.get(id(func))
        if entry is not None and entry.value is func and entry.reduce is not None:
            result = entry.reduce(self, args)
        elif self.user_ids.get(id(func)) is func:
            result = func(*args)  # added with add_safe_globals: called, as torch.load does
        else:
            raise self.refuse(f"calling {_short(func)}")
        self.stack[-1] = result

    def _newobj(self, arg: Any) -> None:
        args = self.pop()
        cls = self.top()
        if type(args) is not tuple:
            raise self.refuse(f"NEWOBJ with {type(args).__name__} arguments")
        if self.tables.newobj.get(id(cls)) is cls:
            if args:
                raise self.refuse(f"arguments to {cls.__name__}.__new__")
            result = dict.__new__(cls)
        elif self.user_ids.get(id(cls)) is cls and isinstance(cls, type):
            result = cls.__new__(cls, *args)
        else:
            raise self.refuse(f"creating an object of {_short(cls)}")
        self.stack[-1] = result

    def _build(self, arg: Any) -> None:
        state = self.pop()
        inst = self.top()
        t = type(inst)
        if t is collections.OrderedDict:
            self._build_ordered_dict(inst, state)
        elif self.fresh_dtypes.get(id(inst)) is inst:
            self._build_np_dtype(inst, state)
        elif id(t) in self.user_ids:
            # A user-allowed type: what pickle and torch.load do.
            setstate = getattr(inst, "__setstate__", None)
            if setstate is not None:
                setstate(state)
                return
            slotstate = None
            if type(state) is tuple and len(state) == 2:
                state, slotstate = state
            if state:
                inst.__dict__.update(state)
            if slotstate:
                for k, v in slotstate.items():
                    setattr(inst, k, v)
        else:
            raise self.refuse(f"setting the state of a {t.__name__}")

    def _build_ordered_dict(self, inst: Any, state: Any) -> None:
        # torch's state_dict() is an OrderedDict with a _metadata attribute, pickled as a
        # BUILD with {"_metadata": {...}}. Attributes may not be dunders nor shadow anything
        # of the class (od.keys = <an allowed callable> would run on od.keys()).
        if state is None:
            return
        if type(state) is not dict:
            raise self.refuse(f"OrderedDict state of type {type(state).__name__}")
        for k in state:
            if type(k) is not str or not k.isidentifier() or k.startswith("__") or hasattr(type(inst), k):
                raise self.refuse(f"the OrderedDict attribute {_short(k)}")
        inst.__dict__.update(state)

    def _build_np_dtype(self, inst: Any, state: Any) -> None:
        # The state numpy writes for a plain dtype: (3, byteorder, None, None, None, -1, -1, 0).
        ok = (
            type(state) is tuple
            and len(state) == 8
            and all(type(v) is int for v in (state[0], *state[5:]))
            and state[0] == 3
            and type(state[1]) is str
            and state[1] in ("<", ">", "|", "=")
            and state[2] is None
            and state[3] is None
            and state[4] is None
            and state[5] == -1
            and state[6] == -1
            and state[7] == 0
        )
        if not ok:
            raise self.refuse(f"numpy dtype state {_short(state)}")
        del self.fresh_dtypes[id(inst)]  # once
        inst.__setstate__(state)

    def _persid(self, arg: Any) -> None:
        pid = self.pop()
        self.stack.append(self.persistent_load(pid))


def load(data: bytes, persistent_load: Callable[[Any], Any], where: str = "extras.pkl") -> Any:
    """Unpickles ``data`` under the allow-list; ``persistent_load`` resolves tensor
    references. Raises :class:`UnsafeCheckpointError` for anything refused or malformed
    (and lets ``CorruptCheckpointError`` from ``persistent_load`` through)."""
    try:
        tabs = tables()
        user = _user_globals()
        ops = _scan(bytes(data), tabs, user, where)
        return _Machine(len(data), persistent_load, tabs, user, where).run(ops)
    except CorruptCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - hostile input: whatever failed, the caller gets the typed error
        # Described from its arguments only when they are plain values: the str() of an
        # exception holding a stream value could take as long as that value's repr().
        plain = all(type(a) in _PLAIN for a in e.args)
        detail = "; ".join(_short(a, 200) for a in e.args[:3]) if plain else "(a value of the stream)"
        error = UnsafeCheckpointError(
            f"{where}: weights_only load failed on a malformed sidecar: {type(e).__name__}: {detail}"
        )
        raise error from (e if plain else None)


__all__ = ["load", "refusal", "tables", "torch_dtypes_by_name"]
