"""The synchronous functions: :func:`save`, :func:`load`, :func:`load_safetensors`,
:func:`remove`, :func:`verify` and :func:`inspect` (re-exported by the package; see its
docstring)."""

from __future__ import annotations

import json
import os
from typing import Any

from . import _pytree
from ._common import ConfigLike, PathLike, cached_writer, save_args, save_report
from ._errors import CheckpointError
from ._into import is_single_cuda_device, load_to_device
from ._uring_ckpt import cuda_available


def save(
    state: Any,
    path: PathLike,
    *,
    config: ConfigLike = None,
    replace: bool | None = None,
    metadata: dict[str, str] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Saves ``state`` (a nested dict/list of tensors and anything picklable, such as a
    Lightning checkpoint dict) as a committed checkpoint directory at ``path``; returns once
    it is durable, with the save report (bytes, seconds, MiB/s, engine).

    Torch tensors (any safetensors dtype, bf16 and float8 included) and numpy arrays go to
    the shards without a copy when they are contiguous CPU memory; others are made
    contiguous first. CUDA tensors are copied from device memory straight into the
    (page-locked) staging buffers when the extension was built with CUDA
    (``maturin develop --release --features cuda``; see ``_uring_ckpt.cuda_available()``),
    and to the CPU in Python otherwise. Tied tensors are stored once.

    The report counts ``cuda_tensors``/``cuda_bytes`` (read from device memory) and
    ``python_copied_bytes`` (copied in Python: made contiguous or moved to the CPU).

    ``config``: a :class:`Config`, a dict of its keys, or None for the environment's.
    ``replace``: whether an existing checkpoint at ``path`` may be replaced (atomically);
    default from the config (``replace_existing``, false), else
    :class:`CheckpointExistsError`. ``metadata``: strings stored in the manifest.
    ``extra_files``: small files (name to bytes, e.g. ``{"config.json": ...}``) written into
    the checkpoint directory and committed with it atomically, each listed in the manifest
    with its size and CRC-32 (names are plain file names, not ``*.safetensors``,
    ``manifest.json``, ``extras.pkl`` nor, for a flat state dict, the index below).

    A flat state dict (``model.state_dict()``: string keys to tensors, nothing nested) is
    also a Hugging Face checkpoint: tensor names are its keys, every shard header says
    ``"format": "pt"``, and ``model.safetensors.index.json`` (``total_size`` and the
    ``weight_map``) is committed beside ``manifest.json``. With ``extra_files={"config.json":
    ...}``, ``transformers``' ``from_pretrained(path)`` loads it. Tied weights are stored once,
    under the first key (``transformers`` re-ties the others).
    """
    flat = _pytree.flatten(state)
    report = cached_writer(config, replace).save(*save_args(flat, path, metadata, extra_files))
    return save_report(report, flat.copied_bytes)


def load(
    path: PathLike,
    *,
    device: Any = "cpu",
    names: list[str] | None = None,
    verify: bool = True,
    weights_only: bool = True,
    mmap: bool = False,
    config: ConfigLike = None,
) -> Any:
    """Loads the checkpoint at ``path`` and rebuilds the structure that was saved, tensors as
    torch tensors when torch is importable (numpy otherwise; numpy arrays stay numpy).

    ``path`` may also be any safetensors checkpoint (see :func:`load_safetensors`): it has
    no saved structure, so a flat dict of its tensors comes back.

    ``device``: where torch tensors go (``"cpu"``, ``"cuda:0"``, a ``torch.device``, a dict
    mapping saved device names to new ones, or None for the device each tensor was saved
    from). ``names``: load only these tensors (their flattened names, e.g.
    ``"state_dict/layer.weight"``) and return them as a flat dict. ``verify``: check every
    tensor's CRC-32.

    ``weights_only`` (default True, as ``torch.load`` since torch 2.6): unpickle the sidecar
    with a restricted unpickler that never runs code, whatever the files hold. It builds
    containers (dict, list, tuple, set, ``OrderedDict``, ``defaultdict``, ``Counter``,
    ``deque``), numbers, strings, bytes, the checkpoint's tensors and arrays, torch
    dtypes/devices/``Size``, plain numpy dtypes and scalars, ``pathlib`` POSIX paths,
    Lightning's ``AttributeDict``, and the globals added with
    ``torch.serialization.add_safe_globals`` (matched exactly). Anything else raises
    :class:`UnsafeCheckpointError` (a :class:`CorruptCheckpointError` and a
    ``pickle.UnpicklingError``), whose message names the global. ``weights_only=False``:
    unpickle with ``pickle``, for checkpoints you trust only (it runs what the sidecar names).
    Either way a sidecar whose tensor references do not match the shards raises
    :class:`CorruptCheckpointError`.

    ``mmap`` (CPU tensors only): map the shard files copy-on-write instead of reading them,
    as ``torch.load(mmap=True)`` does; see :func:`load_safetensors`.

    Loaded CPU tensors use the read buffers directly (no copy) and are writable. With
    ``device`` one CUDA device and the CUDA build (``cuda_available()``), the tensors are
    allocated on the device and filled from the (page-locked) staging buffers, chunk by
    chunk, copies overlapped with the next reads: no host copy of the whole checkpoint.
    To load into a model that already exists, use :func:`load_into`.
    """
    writer = cached_writer(config)
    if is_single_cuda_device(device) and cuda_available():
        buffers = load_to_device(os.fspath(path), device, names, verify, config)
        _, metadata, extras, _report = writer.load(os.fspath(path), [], verify)  # no tensor read
    else:
        tensors, metadata, extras, _report = writer.load(os.fspath(path), names, verify, mmap)
        buffers = {name: (dtype, shape, buf) for name, dtype, shape, buf in tensors}
    restorer = _pytree.Restorer(buffers, device, where=os.path.join(os.fspath(path), _pytree.SIDECAR))
    if names is not None:
        return {name: restorer.plain(name) for name in names}
    sidecar = extras.get(_pytree.SIDECAR)
    version = metadata.get(_pytree.FORMAT_KEY)
    if sidecar is None or version is None:
        # Written by the Rust API or the CLI: a flat dict of tensors.
        return {name: restorer.plain(name) for name in buffers}
    if version != _pytree.FORMAT_VERSION:
        raise CheckpointError(
            f"{os.fspath(path)} was written by a newer uring_ckpt (Python format {version}, "
            f"this one reads {_pytree.FORMAT_VERSION})"
        )
    return _pytree.unflatten(sidecar, restorer, weights_only=weights_only)


def load_safetensors(
    path: PathLike,
    *,
    device: Any = "cpu",
    names: list[str] | None = None,
    verify: bool = True,
    mmap: bool = False,
    config: ConfigLike = None,
) -> dict[str, Any]:
    """Loads the tensors of any safetensors checkpoint at ``path`` as a flat dict of name to
    torch tensor (numpy array without torch), through the same io_uring/O_DIRECT reads as
    :func:`load`. ``path`` is one of:

    - a ``.safetensors`` file (a link to one is followed);
    - a directory of ``*.safetensors`` files (all of them, sorted by name);
    - a Hugging Face directory with ``model.safetensors.index.json`` (exactly the files its
      ``weight_map`` names; each tensor must be in the file the index says, and the index's
      ``total_size`` must be the tensors' byte total), or that index file itself;
    - a checkpoint of ours (its tensors only, by their stored names; the rest of a saved
      structure is not rebuilt: use :func:`load` for that).

    Files in a directory are never read through a symbolic link: a Hugging Face cache
    snapshot (``.../snapshots/<revision>/``, whose files link into ``../../blobs``) raises
    :class:`CorruptCheckpointError` saying so; download with
    ``huggingface_hub.snapshot_download(repo_id, local_dir=...)`` for plain files, or pass
    one linked file itself. A file that disagrees with the index, or whose header does not
    parse, raises :class:`CorruptCheckpointError` naming the file and tensor.

    ``device``: where the tensors go (``"cpu"``, ``"cuda:0"``, a ``torch.device``).
    ``names``: load only these tensors (others are not read); an unknown name raises
    :class:`TensorNotFoundError`. ``verify``: check the CRC-32 of every tensor that has one
    stored (files written by uring-ckpt); files written by others have none, and their
    structure and sizes are always checked. Loaded CPU tensors use the read buffers
    directly (no copy) and are writable; with one CUDA device and the CUDA build they are
    filled in device memory from the staging buffers, as :func:`load` does.

    ``mmap=True`` (CPU tensors; ignored for a CUDA device, which is filled from the staging
    buffers either way): the files are mapped copy-on-write instead of read, as
    ``torch.load(mmap=True)`` and safetensors' own loads do. The tensors are then views of
    the files' pages in the page cache, which the kernel fills by reading and never has to
    zero, so a load into no existing memory skips the zeroing of new memory that a read
    pays; every page is still brought in (and every CRC checked) before the call returns.
    The files back the tensors for as long as they live: a file truncated meanwhile kills
    the process with ``SIGBUS`` when a lost page is touched, a file rewritten in place
    shows its new bytes in pages not yet written (uring-ckpt never rewrites a checkpoint's
    files), and the first write to each page copies it. The pages count as page cache.
    """
    where = os.fspath(path)
    if is_single_cuda_device(device) and cuda_available():
        # Straight into device memory through the staging pool: no host copy.
        buffers = load_to_device(where, device, names, verify, config)
    else:
        tensors, _metadata, _extras, _report = cached_writer(config).load(where, names, verify, mmap)
        buffers = {name: (dtype, shape, buf) for name, dtype, shape, buf in tensors}
    restorer = _pytree.Restorer(buffers, device, where=where)
    return {name: restorer.plain(name) for name in (names if names is not None else buffers)}


def remove(path: PathLike, *, config: ConfigLike = None) -> None:
    """Deletes the checkpoint at ``path`` atomically (renamed away, then deleted). A missing
    path is not an error; a directory that is not a checkpoint is refused
    (:class:`NotACheckpointError`)."""
    cached_writer(config).remove(os.fspath(path))


def verify(path: PathLike, *, config: ConfigLike = None) -> dict[str, Any]:
    """Checks the manifest, every shard, every tensor's CRC-32 and the sidecar; raises
    :class:`CorruptCheckpointError` (or :class:`NotACheckpointError`) at the first problem;
    returns what was checked (``kind``: ``"uring_ckpt"``, ``"safetensors_file"``,
    ``"safetensors_dir"`` or ``"hugging_face_index"``; ``tensors``: those whose CRC matched;
    ``tensors_without_crc``: those of files not written by uring-ckpt, checked for
    structure and size only). ``path`` may be any safetensors checkpoint
    (:func:`load_safetensors`)."""
    result: dict[str, Any] = json.loads(cached_writer(config).verify(os.fspath(path)))
    return result


def inspect(path: PathLike, *, config: ConfigLike = None) -> dict[str, Any]:
    """The kind, the manifest and every tensor's name, dtype, shape, size and shard, without
    reading tensor data. ``path`` may be any safetensors checkpoint (:func:`load_safetensors`;
    its manifest is then made from the shard headers)."""
    result: dict[str, Any] = json.loads(cached_writer(config).inspect(os.fspath(path)))
    return result


__all__ = ["inspect", "load", "load_safetensors", "remove", "save", "verify"]
