"""Bounded descriptions of values of a hostile pickle stream, for error messages."""

from __future__ import annotations

from typing import Any

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
