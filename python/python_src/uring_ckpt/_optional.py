"""The optional dependencies, numpy and torch: the package works without either.

numpy is imported here once (``np`` is None without it). torch is imported on first use,
not at import time (``import uring_ckpt`` stays fast and works without torch): these are
the only lazy imports of the package, and they are lazy because the dependency is optional.
"""

from __future__ import annotations

import sys
from typing import Any

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is a dependency of every test setup
    np = None  # type: ignore[assignment]


def torch_module() -> Any:
    """The torch module, or None when it is not installed (imported on first use)."""
    mod = sys.modules.get("torch")
    if mod is not None:
        return mod
    try:
        import torch  # optional: imported on first use only
    except ImportError:
        return None
    return torch


__all__ = ["np", "torch_module"]
