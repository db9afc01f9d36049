"""What calling an allowed global may do: one validator per callable of the allow-list.

REDUCE calls an allowed callable only through its validator, which accepts the argument
types ``pickle`` writes for it (nothing else), builds the value itself and charges what it
allocates to the load's budget (:meth:`Interpreter.charge`), so a sidecar cannot make a
load allocate more than a constant factor of its own size (``bytearray(10**12)`` is
refused). Which globals are allowed at all is :mod:`._allow`'s job.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Protocol

from .._errors import UnsafeCheckpointError
from .._optional import np
from .._optional import torch_module as _torch
from ._describe import _short


class _Factories(Protocol):
    @property
    def factories(self) -> tuple: ...


class Interpreter(Protocol):
    """What a validator may use of the interpreter (:class:`._vm._Machine`): the budget,
    the key check, the allow-list's default factories and the dtypes it built."""

    @property
    def tables(self) -> _Factories: ...

    @property
    def fresh_dtypes(self) -> dict[int, Any]: ...

    def charge(self, units: int) -> None: ...

    def key(self, key: Any) -> None: ...


Validator = Callable[[Interpreter, tuple], Any]
"""A REDUCE validator: ``(interpreter, args) -> the value built``."""


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


def _args(args: tuple, low: int, high: int, what: str) -> None:
    if not low <= len(args) <= high:
        raise UnsafeCheckpointError(f"{what} takes {low} to {high} arguments in a sidecar, got {len(args)}")


def _of(value: Any, types: tuple, what: str) -> Any:
    if type(value) not in types:
        raise UnsafeCheckpointError(
            f"{what} does not accept a {type(value).__name__} argument in a weights_only load"
        )
    return value


def _seq(m: Interpreter, value: Any, what: str) -> Any:
    """A list or tuple argument whose elements are copied: charged by length."""
    _of(value, (list, tuple), what)
    m.charge(len(value))
    return value


def _r_bytearray(m: Interpreter, args: tuple) -> Any:
    # Only a copy of bytes that are in the stream: never bytearray(n), which allocates n.
    _args(args, 0, 1, "bytearray")
    if not args:
        return bytearray()
    data = _of(args[0], (bytes, bytearray), "bytearray")
    m.charge(len(data))
    return bytearray(data)


def _r_set(cls: type) -> Validator:
    def build(m: Interpreter, args: tuple) -> Any:
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


def _r_slice(m: Interpreter, args: tuple) -> Any:
    _args(args, 1, 3, "slice")
    for a in args:
        _of(a, (int, bool, type(None)), "slice")
    return slice(*args)


def _r_range(m: Interpreter, args: tuple) -> Any:
    _args(args, 1, 3, "range")
    for a in args:
        _of(a, (int, bool), "range")
    return range(*args)


def _r_complex(m: Interpreter, args: tuple) -> Any:
    _args(args, 0, 2, "complex")
    for a in args:
        _of(a, (int, bool, float), "complex")
    return complex(*args)


def _r_ordered_dict(m: Interpreter, args: tuple) -> Any:
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


def _r_defaultdict(m: Interpreter, args: tuple) -> Any:
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


def _r_counter(m: Interpreter, args: tuple) -> Any:
    # Counter.__reduce__ writes (dict(self),): copied, keys already vetted as dict keys.
    _args(args, 0, 1, "Counter")
    if not args:
        return collections.Counter()
    items = _of(args[0], (dict,), "Counter")
    m.charge(len(items))
    return collections.Counter(items)


def _r_deque(m: Interpreter, args: tuple) -> Any:
    # deque.__reduce__ writes ((), maxlen) and the items as APPENDS.
    _args(args, 0, 2, "deque")
    items = _seq(m, args[0], "deque") if args else ()
    maxlen = args[1] if len(args) > 1 else None
    _of(maxlen, (int, type(None)), "deque maxlen")
    return collections.deque(items, maxlen)


def _r_path(cls: type) -> Validator:
    # PurePath.__reduce__ writes (cls, parts): building one parses strings, nothing more.
    def build(m: Interpreter, args: tuple) -> Any:
        for part in args:
            _of(part, (str,), cls.__name__)
            m.charge(len(part) + 1)
        return cls(*args)

    return build


def _r_torch_size(m: Interpreter, args: tuple) -> Any:
    torch = _torch()
    _args(args, 0, 1, "torch.Size")
    dims = _seq(m, args[0], "torch.Size") if args else ()
    for d in dims:
        _of(d, (int,), "torch.Size")
    return torch.Size(dims)


def _r_torch_device(m: Interpreter, args: tuple) -> Any:
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


def _r_np_dtype(m: Interpreter, args: tuple) -> Any:
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


def _r_np_scalar(m: Interpreter, args: tuple) -> Any:
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
