"""Pass 2 of a ``weights_only`` load: the interpreter.

A small stack machine that implements each opcode the pre-scan allows itself, with
explicit type checks: REDUCE calls only the allowed callables, each through its validator
(:mod:`._reduce`); NEWOBJ and BUILD work only on the types listed; list/dict/set opcodes
only on the exact built-in container types. Every value it builds comes from an allowed
type, and the work and memory it spends are charged to a budget proportional to the
sidecar's size.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from .._errors import UnsafeCheckpointError
from .._optional import torch_module as _torch
from ._allow import _check_global, _Tables
from ._describe import _short
from ._scan import _CONSTANT_OPS

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
