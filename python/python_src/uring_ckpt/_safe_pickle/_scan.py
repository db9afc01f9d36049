"""Pass 1 of a ``weights_only`` load: the pre-scan.

``pickletools.genops`` decodes the whole opcode stream before anything is constructed.
Opcodes outside :data:`_ALLOWED_OPS` are refused (INST, OBJ, EXT1/2/4, NEWOBJ_EX, PERSID,
out-of-band buffers, the text opcodes of protocol 0), so is a GLOBAL or STACK_GLOBAL
naming anything but an allowed global (STACK_GLOBAL operands must be string constants the
scan can see), and so are bytes after STOP.
"""

from __future__ import annotations

import pickletools
from typing import Any

from .._errors import UnsafeCheckpointError
from ._allow import _check_global, _Tables
from ._describe import _short

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

_ALLOWED_OPS = _CONSTANT_OPS | frozenset(
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
        # constants without an argument (those with one: _CONSTANT_OPS, the binary forms
        # that protocols 2 to 5 write)
        "NONE",
        "NEWTRUE",
        "NEWFALSE",
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

_UNKNOWN = object()
"""What the pre-scan knows about a stack value that is not a string constant."""


def scan(data: bytes, tabs: _Tables, user: dict[str, Any], where: str) -> list[tuple[str, Any, int]]:
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
