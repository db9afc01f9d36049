"""Loads into tensors that already exist: :func:`load_into` (a model or a state dict, in
place) and :func:`load_to_device` (new tensors on one CUDA device, filled from the staging
buffers with no full host copy), both through the Rust restore path (the staging pool,
copy threads, CRCs in the same pass)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, NamedTuple

from ._common import ConfigLike, PathLike, cached_writer
from ._errors import CheckpointMismatchError
from ._optional import torch_module as _torch
from ._pytree import torch_dtype_from_safetensors, torch_dtype_map


class LoadIntoResult(NamedTuple):
    """What :func:`load_into` did: ``missing`` (destination names the checkpoint lacks)
    and ``unexpected`` (checkpoint tensors under the prefix with no destination), both
    empty when ``strict``; ``report``: bytes, seconds, MiB/s, engine."""

    missing: list[str]
    unexpected: list[str]
    report: dict[str, Any]


def _checkpoint_tensors(writer: Any, path: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape), from the shard headers only."""
    info = json.loads(writer.inspect(path))
    return {t["name"]: (t["dtype"], list(t["shape"])) for t in info["tensors"]}


def _state_of(target: Any) -> dict[str, Any]:
    torch = _torch()
    if torch is not None and isinstance(target, torch.nn.Module):
        # Detached tensors sharing the parameters' and buffers' memory: written in place.
        return dict(target.state_dict())
    if isinstance(target, dict):
        return target
    raise TypeError(f"load_into: expected an nn.Module or a dict of tensors, got {type(target).__name__}")


def load_into(
    target: Any,
    path: PathLike,
    *,
    strict: bool = True,
    prefix: str = "",
    verify: bool = True,
    config: ConfigLike = None,
) -> LoadIntoResult:
    """Loads the checkpoint at ``path`` into ``target`` in place: an ``nn.Module`` (its
    parameters and buffers) or a flat dict of tensors (CPU, or CUDA with the CUDA build).
    No tensor is allocated; the bytes go from the disk through the staging pool straight
    into the existing memory, every tensor's CRC-32 checked on the way (``verify``).

    The checkpoint tensor of destination ``key`` is ``prefix + key`` (``prefix=
    "state_dict/"`` for a Lightning checkpoint saved by the plugins). With ``strict``
    (default), destinations the checkpoint lacks and checkpoint tensors under ``prefix``
    with no destination are errors; dtype and shape mismatches always are. Every problem is
    raised at once, before anything is read, as one :class:`CheckpointMismatchError`.
    Without ``strict`` the missing and unexpected names are returned instead.

    Tied tensors (two names sharing memory) are loaded once, from whichever name the
    checkpoint has. A non-contiguous destination is loaded into a contiguous copy first and
    copied over. On a read or CRC error the destinations may hold part of the checkpoint.
    """
    torch = _torch()
    if torch is None:
        raise ImportError("load_into needs torch")
    path = os.fspath(path)
    writer = cached_writer(config)
    state = _state_of(target)
    in_ckpt = _checkpoint_tensors(writer, path)
    dtypes = torch_dtype_map()
    groups: dict[str, list[tuple[str, Any, str, list[int]]]] = {}
    copies: list[tuple[Any, Any]] = []
    seen: dict[tuple, str] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    wanted: set[str] = set()
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"load_into: {key!r} is a {type(tensor).__name__}, not a tensor")
        name = prefix + key
        nbytes = tensor.numel() * tensor.element_size()
        alias_key = (str(tensor.device), tensor.data_ptr(), nbytes, tensor.dtype, tuple(tensor.shape))
        if nbytes and alias_key in seen:
            # Tied: the memory is already a destination; load it from whichever name exists.
            other = seen[alias_key]
            if other not in in_ckpt and name in in_ckpt:
                _rename_dest(groups, other, name)
                wanted.discard(other)
                wanted.add(name)
                seen[alias_key] = name
            elif other in in_ckpt or name in in_ckpt:
                wanted.add(name)  # covered by the tie
            else:
                missing.append(name)
            continue
        if nbytes:
            seen[alias_key] = name
        if name not in in_ckpt:
            missing.append(name)
            continue
        wanted.add(name)
        dtype = dtypes.get(tensor.dtype)
        ck_dtype, ck_shape = in_ckpt[name]
        if dtype != ck_dtype or list(tensor.shape) != ck_shape:
            mismatched.append(
                f"{name}: {ck_dtype} {ck_shape} in the checkpoint, {tensor.dtype} {list(tensor.shape)} in the destination"
            )
            continue
        dest = tensor
        if not (tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()):
            dest = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
            copies.append((tensor, dest))
        groups.setdefault(str(tensor.device), []).append((name, dest, ck_dtype, ck_shape))
    missing = [m for m in missing if m not in wanted]
    unexpected = sorted(n for n in in_ckpt if n.startswith(prefix) and n not in wanted)
    problems = list(mismatched)
    if strict:
        problems += [f"{m}: not in the checkpoint" for m in missing]
        problems += [f"{u}: no destination" for u in unexpected]
    if problems:
        raise CheckpointMismatchError(
            f"{path} does not match the destination: " + "; ".join(problems),
            missing=missing if strict else [],
            unexpected=unexpected if strict else [],
            mismatched=mismatched,
        )
    report: dict[str, Any] = {}
    with torch.no_grad():
        for dests in groups.values():
            names = [d[0] for d in dests]
            r, _, _ = writer.load_into(path, dests, names, verify, True)
            report = _merge(report, json.loads(r))
        for tensor, dest in copies:
            tensor.copy_(dest)
    return LoadIntoResult(missing if not strict else [], unexpected if not strict else [], report)


def _rename_dest(groups: dict[str, list[tuple[str, Any, str, list[int]]]], old: str, new: str) -> None:
    for dests in groups.values():
        for i, (name, tensor, dtype, shape) in enumerate(dests):
            if name == old:
                dests[i] = (new, tensor, dtype, shape)


def _merge(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """One report of several loads (one per device): bytes and seconds add up."""
    if not total:
        return part
    merged = dict(total)
    for key in ("data_bytes", "read_bytes", "seconds"):
        merged[key] = total.get(key, 0) + part.get(key, 0)
    seconds = merged["seconds"]
    merged["throughput_mib_s"] = merged["read_bytes"] / 2**20 / seconds if seconds > 0 else 0.0
    return merged


def load_to_device(
    path: str,
    device: Any,
    names: list[str] | None,
    verify: bool,
    config: ConfigLike,
) -> dict[str, tuple[str, list[int], Any]]:
    """Every tensor of the checkpoint (or ``names``) in new memory on CUDA ``device``,
    filled through the restore path: name -> (dtype, shape, uint8 device tensor of its
    bytes), the form :class:`~uring_ckpt._pytree.Restorer` takes."""
    torch = _torch()
    writer = cached_writer(config)
    in_ckpt = _checkpoint_tensors(writer, path)
    wanted = names if names is not None else list(in_ckpt)
    out: dict[str, tuple[str, list[int], Any]] = {}
    dests = []
    for name in wanted:
        if name not in in_ckpt:
            continue  # the load below raises TensorNotFoundError for it
        dtype, shape = in_ckpt[name]
        itemsize = torch.empty((), dtype=torch_dtype_from_safetensors(dtype)).element_size()
        raw = torch.empty(math.prod(shape) * itemsize, dtype=torch.uint8, device=device)
        out[name] = (dtype, shape, raw)
        dests.append((name, raw, dtype, shape))
    # The destinations are stamped with the checkpoint's own dtypes and shapes: the Rust side
    # checks their sizes against the shard headers it reads.
    writer.load_into(path, dests, wanted, verify, True)
    return out


def is_single_cuda_device(device: Any) -> bool:
    """Whether ``device`` (a ``load`` argument) names one CUDA device."""
    torch = _torch()
    if torch is None or device is None or isinstance(device, dict) or callable(device):
        return False
    try:
        return torch.device(device).type == "cuda"
    except (RuntimeError, TypeError, ValueError):
        return False


__all__ = ["LoadIntoResult", "is_single_cuda_device", "load_into", "load_to_device"]
