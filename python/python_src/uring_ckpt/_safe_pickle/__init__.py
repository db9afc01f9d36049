"""The ``weights_only`` unpickler of the sidecar (``extras.pkl``).

Whoever can write a checkpoint controls its sidecar (DESIGN.md, "Threat model"), so a
``weights_only`` load must never run code, whatever the bytes. Subclassing the C
``pickle.Unpickler`` and overriding ``find_class`` is not enough for that: ``find_class``
only vets where a global comes from, while BUILD calls ``__setstate__`` (or sets
attributes) on whatever object is on the stack, APPENDS/SETITEMS/ADDITEMS call
``extend``/``__setitem__``/``add`` of whatever object is there, REDUCE passes any
arguments to an allowed callable (``bytearray(10**12)``), and none of these has a hook.
So the restricted load never hands the bytes to ``pickle`` at all:

1. **Pre-scan** (:mod:`._scan`): ``pickletools.genops`` decodes the whole opcode stream
   before anything is constructed. Opcodes outside :data:`._scan._ALLOWED_OPS` are refused
   (INST, OBJ, EXT1/2/4, NEWOBJ_EX, PERSID, out-of-band buffers, the text opcodes of
   protocol 0), so is a GLOBAL or STACK_GLOBAL naming anything but an allowed
   ``(module, name)`` pair (STACK_GLOBAL operands must be string constants the scan can
   see), and so are bytes after STOP.
2. **Interpreter** (:mod:`._vm`): a small stack machine that implements each
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

Modules, each knowing only those listed before it:

- :mod:`._describe`: bounded descriptions of stream values for error messages.
- :mod:`._reduce`: the REDUCE validators, one per allowed callable, and the budget they charge.
- :mod:`._allow`: the allow-list, blocked modules, the user's ``add_safe_globals``, and
  :func:`~._allow._check_global`, the one decision on a global.
- :mod:`._scan`: pass 1, the pre-scan of the opcode stream.
- :mod:`._vm`: pass 2, the interpreter.
- this module: :func:`load`, which runs both passes and types every failure.
"""

from __future__ import annotations

from typing import Any, Callable

from .._errors import CorruptCheckpointError, UnsafeCheckpointError
from ._allow import _user_globals, refusal, tables, torch_dtypes_by_name
from ._describe import _PLAIN, _short
from ._reduce import _simple_np_dtype as _simple_np_dtype  # re-exported for the tests
from ._scan import _ALLOWED_OPS as _ALLOWED_OPS  # re-exported for the tests
from ._scan import _CONSTANT_OPS as _CONSTANT_OPS  # re-exported for the tests
from ._scan import scan
from ._vm import _Machine


def load(
    data: bytes,
    persistent_load: Callable[[Any], Any],
    where: str = "extras.pkl",
    extra_globals: dict[str, Any] | None = None,
) -> Any:
    """Unpickles ``data`` under the allow-list; ``persistent_load`` resolves tensor
    references. ``extra_globals`` (``{"module.qualname": obj}``) are allowed for this load
    only, as if added with ``torch.serialization.add_safe_globals`` (the DCP reader passes
    DCP's metadata classes). Raises :class:`UnsafeCheckpointError` for anything refused or
    malformed (and lets ``CorruptCheckpointError`` from ``persistent_load`` through)."""
    try:
        tabs = tables()
        user = _user_globals()
        if extra_globals:
            user = {**user, **extra_globals}
        ops = scan(bytes(data), tabs, user, where)
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
