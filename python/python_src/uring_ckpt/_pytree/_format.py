"""The vocabulary both sides of the Python format share: the sidecar's file name, the
manifest key naming the format, the tag of tensor references in the sidecar, and the
dtype tables between torch, numpy and safetensors."""

from __future__ import annotations

import re
from typing import Any

from .._optional import torch_module as _torch

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
