"""``torch.distributed.checkpoint`` (DCP) storage: :class:`UringStorageWriter` and
:class:`UringStorageReader`, for ``dcp.save`` / ``dcp.load`` (imported by the user, not by
``import uring_ckpt``)::

    import torch.distributed.checkpoint as dcp
    from uring_ckpt.dcp import UringStorageReader, UringStorageWriter

    dcp.save(state_dict, storage_writer=UringStorageWriter("ckpt/step-100"))
    dcp.load(state_dict, storage_reader=UringStorageReader("ckpt/step-100"))

DCP's planners decide which rank writes what (each rank its DTensor shards, replicated
items once) and reshard on load (saved on N ranks, loaded on M); this module stores what
they ask through the Rust engine (io_uring + O_DIRECT, CRC-32 per tensor):

- **Save.** The coordinator's ``prepare_global_plan`` begins the save
  (``Writer.begin_ranks``): it mints one save id, which travels to every rank in its plan's
  ``storage_data``, removes what earlier failed saves of the path left, and creates the
  shared temporary directory ``.<name>.tmp-<save id>/``. Each rank's ``write_data`` writes
  its items as safetensors shards ``shard-r<rank>-<n>.safetensors`` there
  (``Writer.save_rank``; CPU tensors go without a copy, CUDA tensors are read from device
  memory by the CUDA build). The ranks of one machine share the configured staging pool
  (``staging_pool_size``, what is in flight to the disk): each local plan names its machine
  (the kernel's boot id), the coordinator counts the ranks of each, and a rank that shares
  its machine with ``n - 1`` others saves through ``staging_pool_size / n`` (whole chunks,
  at least two), so ``n`` ranks on one machine keep the memory and the writes in flight of
  one; byte items (``io.BytesIO``, and the non-tensor values DCP
  pickles) are stored as 1-D ``U8`` tensors in the same shards, so they are CRC-checked and
  read through the same path as tensors. Each ``WriteResult``'s ``storage_data`` is a plain
  dict naming the stored tensor, its file, offset, length and CRC-32; the first one of each
  rank also carries the rank's shard list, which is how the coordinator learns it (DCP
  gathers the results for ``finish``). ``finish`` (coordinator, only once every rank's
  ``write_data`` succeeded) pickles DCP's ``Metadata`` into the extra file
  ``dcp.metadata`` and commits (``Writer.commit_ranks``): it checks that every reported
  shard is there at its size, writes ``manifest.json``, fsyncs and renames the directory
  to ``path`` once. That rename is the commit: all or nothing.
- **Failure.** A rank that raises in ``write_data`` makes DCP raise
  ``CheckpointException`` on every rank without calling ``finish``: nothing is renamed, an
  earlier checkpoint at ``path`` (``replace=True``) is untouched, and the next save of the
  same path removes the temporary directory (its coordinator is this process, or is gone;
  directories of live coordinators elsewhere are left alone). A rank killed outright
  makes the others fail in DCP's collectives (with gloo at once, on the dropped
  connection; at the latest at the process group's timeout,
  ``init_process_group(timeout=...)``); then the same holds.
- **Load.** ``read_metadata`` reads ``dcp.metadata`` through the checked path (size and
  CRC from the manifest) and unpickles it with uring_ckpt's restricted unpickler, allowing
  only DCP's metadata classes, ``torch.Size``, dtypes and layouts: a hostile file cannot
  run code through it. (DCP's ``DefaultLoadPlanner`` itself unpickles byte items with
  ``torch.load(weights_only=False)``, as it does with ``FileSystemReader``.)
  ``read_data``: a stored tensor that goes whole into a contiguous destination of its dtype
  (the usual case, and every DTensor shard loaded on the same layout) is read in place,
  through the staging pool, CRC checked (``Writer.load_into``); a part of one (resharding)
  is read whole, CRC checked, narrowed to ``storage_offsets``/``lengths`` and copied.

- **Async.** The writer is DCP's ``AsyncStager`` too: ``dcp.async_save`` stages through
  ``UringStorageWriter.stage`` into page-aligned CPU memory the writer keeps for the next
  save (:mod:`uring_ckpt._staging`), in thread and process mode (the writer pickles
  without its staging memory, which stays with the process that stages).

The checkpoint is one of ours: ``uring_ckpt.verify``/``inspect`` and ``uring-ckpt
verify``/``inspect`` check it (shards, CRCs, ``dcp.metadata``); ``uring_ckpt.load`` gives
its stored tensors as a flat dict (names ``<fqn>@<chunk offsets>``).

Tested with torch 2.15 and 2.7.1 (CPU, gloo; with 2.7 the writer is not an ``AsyncStager``,
for lack of DCP's ``StateDictStager``, and ``async_save`` uses DCP's default stager). Importing this module works without torch.distributed;
constructing a writer or reader then raises ``ImportError``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import socket
import uuid
from collections import Counter
from typing import Any

from . import _safe_pickle
from ._common import ConfigLike, PathLike, cached_writer, coerce_config, extra_file_list, log_fallbacks
from ._errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from ._pytree import cuda_direct, torch_dtype_from_safetensors, torch_dtype_map
from ._staging import StagingAreas
from ._uring_ckpt import cuda_available

try:
    import torch
    from torch.distributed.checkpoint import metadata as _md
    from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
    from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
    from torch.futures import Future

    _IMPORT_ERROR: BaseException | None = None
except Exception as e:  # noqa: BLE001 - no torch, or a torch without torch.distributed
    _IMPORT_ERROR = e
    StorageReader = StorageWriter = object  # type: ignore[assignment,misc]

try:  # the writer stages async saves itself where this torch has DCP's stager protocol
    from torch.distributed.checkpoint._state_dict_stager import StateDictStager as _  # noqa: F401
    from torch.distributed.checkpoint.staging import AsyncStager

    _STAGER_BASES: tuple[type, ...] = (AsyncStager,)
except Exception:  # noqa: BLE001 - older torch, or no torch.distributed
    _STAGER_BASES = ()

try:  # the version DCP's own writer stamps on its metadata (absent in older torch)
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION as _DCP_VERSION
except Exception:  # noqa: BLE001 - older torch, or no torch.distributed
    _DCP_VERSION = None

__all__ = ["METADATA_FILE", "UringStorageReader", "UringStorageWriter"]

METADATA_FILE = "dcp.metadata"
"""The extra file holding DCP's pickled ``Metadata``."""

DCP_KEY = "uring_ckpt.dcp"
"""Manifest metadata key marking a DCP checkpoint; its value is the layout version."""

DCP_LAYOUT = "1"

_SLOW_BATCH_BYTES = 256 << 20
"""Stored bytes read at once for the items that need a narrow and a copy."""


def _machine_id() -> str:
    """What the ranks of one machine share, to count them: the kernel's boot id (the same in
    every container of a machine), else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = ""
    return boot_id or socket.gethostname()


def _rank_share(config: Any, local_ranks: int) -> Any:
    """The configuration one of ``local_ranks`` ranks on one machine saves with: its share of
    the staging pool (whole chunks, at least two: double buffering), the rest unchanged."""
    if local_ranks <= 1:
        return config
    chunk, pool = config.chunk_size, config.staging_pool_size
    share = max(2 * chunk, pool // local_ranks // chunk * chunk)
    return config if share >= pool else config.replace(staging_pool_size=share)


def _require_dcp() -> None:
    if _IMPORT_ERROR is not None:
        raise ImportError(f"uring_ckpt.dcp needs torch.distributed.checkpoint: {_IMPORT_ERROR}") from _IMPORT_ERROR


def _stored_name(index: Any) -> str:
    """The stored tensor of a write item: its fqn, plus ``@<chunk offsets>`` for a tensor
    (``model.w@4,0``), so the chunks of one DTensor saved by several ranks differ."""
    if index.offset is None:
        return str(index.fqn)
    return f"{index.fqn}@{','.join(str(int(o)) for o in index.offset)}"


def _tensor_entry(
    name: str, tensor: Any, dtypes: dict[Any, str]
) -> tuple[tuple[str, str, list[int], str, Any], dict[str, Any]]:
    """A ``save_rank`` entry for a resolved tensor, and what the reader needs besides its
    location: stored dtype and shape, the chunk's sizes, whether it is stored as raw bytes
    (a dtype safetensors lacks)."""
    t = tensor.detach()
    sizes = [int(s) for s in t.shape]
    kind = "torch"
    if t.device.type == "cuda" and cuda_direct():
        kind = "cuda"
    elif t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    dtype = dtypes.get(t.dtype)
    raw = dtype is None
    if raw:
        t = _bytes_of(t)
        dtype = "U8"
    shape = [int(s) for s in t.shape]
    return (name, dtype, shape, kind, t), {"dtype": dtype, "shape": shape, "sizes": sizes, "raw": raw}


def _bytes_of(t: Any) -> Any:
    """A contiguous tensor's bytes as a 1-D uint8 view of its memory (complex ones through
    their real view)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1).view(torch.uint8)


def _from_bytes(raw: Any, dtype: Any, sizes: list[int]) -> Any:
    """The inverse of :func:`_bytes_of`: ``raw`` (1-D uint8) as a tensor of ``dtype`` and
    shape ``sizes``, sharing its memory."""
    if dtype.is_complex:
        real = torch.view_as_real(torch.empty(0, dtype=dtype)).dtype
        return torch.view_as_complex(raw.view(real).reshape(*sizes, 2))
    return raw.view(dtype).reshape(sizes)


class UringStorageWriter(StorageWriter, *_STAGER_BASES):  # type: ignore[misc]
    """DCP ``StorageWriter`` writing through uring_ckpt, committing the whole checkpoint
    directory atomically on the coordinator (see the module's docstring).

    It is also DCP's ``AsyncStager``: ``dcp.async_save(..., storage_writer=writer)`` stages
    through :meth:`stage`, into CPU memory (page-locked with CUDA) that the writer keeps and
    reuses from one save to the next; keep one writer for the run (``checkpoint_id=`` names
    each save) so later saves stall only for the copy. ``writer.stage(state_dict)`` once at
    set-up takes the first save's allocation off the training loop too.

    ``path``: the checkpoint directory (``dcp.save(..., checkpoint_id=...)`` replaces it).
    ``config``: a :class:`uring_ckpt.Config`, a dict of its keys, or None for the
    environment's. ``replace``: whether an existing checkpoint at ``path`` may be replaced
    (atomically, at the commit); else the save fails at once with
    :class:`uring_ckpt.CheckpointExistsError` (inside DCP's ``CheckpointException``).
    ``extra_files``: ``{name: bytes}`` the coordinator commits beside the shards, in the
    same rename (plain file names, not ``dcp.metadata``; other ranks' are ignored): how
    :mod:`uring_ckpt.lightning` stores Lightning's ``meta.pt``.
    Rank-local saves (``use_collectives=False``) are refused: there is no commit without
    coordination."""

    def __init__(
        self,
        path: PathLike,
        config: ConfigLike = None,
        replace: bool = False,
        *,
        extra_files: dict[str, bytes] | None = None,
    ) -> None:
        _require_dcp()
        super().__init__()
        self.path = os.fspath(path)
        self.config = coerce_config(config, replace)
        self.extra_files = extra_file_list(extra_files)
        if any(name == METADATA_FILE for name, _ in self.extra_files):
            raise ValueError(f"extra file {METADATA_FILE!r}: the name is DCP's metadata's, reserved")
        self.is_coordinator = False
        self._save_id: str | None = None
        self._uuid = uuid.uuid4().hex
        self._staging = StagingAreas()

    # -- AsyncStager ------------------------------------------------------------------------

    _synchronize_after_execute = False  # stage() returns once the copy is complete

    def stage(self, state_dict: Any) -> Any:
        """A copy of ``state_dict`` that later training steps do not change, in staging
        memory this writer reuses (a new area while an earlier save still uses the last
        one). What it took: :attr:`staging_stats`."""
        return self._staging.stage(state_dict)

    @property
    def staging_stats(self) -> dict[str, Any]:
        """The last :meth:`stage`: ``seconds``, ``bytes`` (staging memory it used),
        ``reused`` (copied into memory kept from an earlier save), ``areas`` (kept)."""
        return dict(self._staging.last)

    def synchronize_staging(self) -> None:
        """Nothing to wait for: :meth:`stage` returns once its copy is complete."""

    def close(self) -> None:
        """Frees the staging memory (a later :meth:`stage` allocates it again)."""
        self._staging.close()

    def __getstate__(self) -> dict[str, Any]:
        # Process-mode async_save pickles the writer to its checkpoint process: the staging
        # memory stays here, with the process that stages.
        state = dict(self.__dict__)
        state["_staging"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._staging = StagingAreas()

    @property
    def checkpoint_id(self) -> str:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def reset(self, checkpoint_id: PathLike | None = None) -> None:
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self._save_id = None
        self._uuid = uuid.uuid4().hex

    def storage_meta(self) -> Any:
        return _md.StorageMeta(checkpoint_id=self.path, save_id=self._uuid)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("use_collectives", True):
            raise ValueError(
                "UringStorageWriter commits one checkpoint for all ranks and needs DCP's "
                "collectives: use_collectives=False is not supported"
            )
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: Any) -> Any:
        # The machine this rank runs on, for the coordinator to count the ranks sharing it.
        return dataclasses.replace(plan, storage_data={"machine": _machine_id()})

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        # The coordinator, before any rank writes: one save id for all, and for each rank
        # how many ranks share its machine (a plan that names none: a machine of its own).
        save_id = cached_writer(self.config).begin_ranks(self.path)
        self._save_id = save_id
        machines = [p.storage_data.get("machine") if isinstance(p.storage_data, dict) else None for p in plans]
        counts = Counter(m for m in machines if m is not None)
        return [
            dataclasses.replace(
                p, storage_data={"save_id": save_id, "rank": i, "local_ranks": counts[m] if m is not None else 1}
            )
            for i, (p, m) in enumerate(zip(plans, machines))
        ]

    def write_data(self, plan: Any, planner: Any) -> Any:
        info = plan.storage_data
        if not (isinstance(info, dict) and isinstance(info.get("save_id"), str)):
            raise CheckpointError("UringStorageWriter.write_data: the plan has no save id (prepare_global_plan did not run)")
        save_id, rank = info["save_id"], int(info["rank"])
        writer = cached_writer(_rank_share(self.config, int(info.get("local_ranks", 1))))
        entries: list[tuple[str, str, list[int], str, Any]] = []
        described: list[tuple[Any, str, dict[str, Any]]] = []
        dtypes = torch_dtype_map()
        for item in plan.items:
            name = _stored_name(item.index)
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw = bytes(data.getbuffer()) if isinstance(data, io.BytesIO) else bytes(data)
                entries.append((name, "U8", [len(raw)], "buffer", raw))
                described.append((item, name, {"dtype": "U8", "shape": [len(raw)], "bytes": True}))
            else:
                entry, meta = _tensor_entry(name, data, dtypes)
                entries.append(entry)
                described.append((item, name, meta))
        results: list[Any] = []
        if entries:
            part = json.loads(writer.save_rank(self.path, save_id, rank, entries))
            del entries  # the tensors are on disk: nothing holds them any more
            log_fallbacks(part.pop("engine", None), self.path)
            part_json = json.dumps(part)
            where = {t["name"]: t for t in part["tensors"]}
            for k, (item, name, meta) in enumerate(described):
                loc = where[name]
                storage = {
                    "tensor": name,
                    "file": loc["file"],
                    "offset": loc["offset"],
                    "length": loc["length"],
                    "crc32": loc["crc32"],
                    **meta,
                }
                if k == 0:
                    storage["rank_part"] = part_json  # for the coordinator's commit; dropped there
                results.append(WriteResult(index=item.index, size_in_bytes=loc["length"], storage_data=storage))
        future: Any = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Any, results: list[list[Any]]) -> None:
        # Called on the coordinator only when every rank's write_data succeeded.
        if self._save_id is None:
            raise CheckpointError("UringStorageWriter.finish: no save was begun on this coordinator")
        storage: dict[Any, Any] = {}
        parts: list[str] = []
        for rank_results in results:
            for result in rank_results:
                data = dict(result.storage_data)
                part = data.pop("rank_part", None)
                if part is not None:
                    parts.append(part)
                storage[result.index] = data
        metadata.storage_data = storage
        metadata.storage_meta = self.storage_meta()
        if _DCP_VERSION is not None:
            metadata.version = str(_DCP_VERSION)
        blob = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
        manifest = {DCP_KEY: DCP_LAYOUT, "torch": str(torch.__version__)}
        save_id, self._save_id = self._save_id, None
        extras = [(METADATA_FILE, blob), *self.extra_files]
        cached_writer(self.config).commit_ranks(self.path, save_id, parts, manifest, extras)


def _metadata_globals() -> dict[str, Any]:
    """The globals a pickled DCP ``Metadata`` names beyond the default allow-list: DCP's
    metadata classes, and torch layouts and memory formats (values, never called)."""
    out: dict[str, Any] = {}
    for cls in (
        _md.Metadata,
        _md.MetadataIndex,
        _md.TensorStorageMetadata,
        _md.BytesStorageMetadata,
        _md.ChunkStorageMetadata,
        _md.TensorProperties,
        _md.StorageMeta,
        _md._MEM_FORMAT_ENCODING,
    ):
        out[f"{cls.__module__}.{cls.__qualname__}"] = cls
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    for name, value in vars(torch).items():
        if isinstance(value, (torch.layout, torch.memory_format)):
            out[f"torch.{name}"] = value

    def get_layout(name: Any) -> Any:
        # What torch.layout pickles as (torch.serialization._get_layout("torch.strided")):
        # a lookup of a known layout by its name, nothing else.
        if type(name) is not str or name not in layouts:
            raise UnsafeCheckpointError(f"{METADATA_FILE}: unknown torch layout {name!r:.100}")
        return layouts[name]

    out["torch.serialization._get_layout"] = get_layout
    return out


def _refuse_persistent(pid: Any) -> Any:
    raise UnsafeCheckpointError(f"{METADATA_FILE}: a persistent reference has no place in DCP metadata")


def _unpickle_metadata(blob: bytes, where: str) -> Any:
    metadata = _safe_pickle.load(blob, _refuse_persistent, where, extra_globals=_metadata_globals())
    if not isinstance(metadata, _md.Metadata):
        raise CorruptCheckpointError(f"{where}: holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


_INFO_FIELDS = {"tensor": str, "file": str, "offset": int, "length": int, "crc32": int, "dtype": str, "shape": list}


def _check_storage_data(storage: Any, where: str) -> dict[Any, dict[str, Any]]:
    """DCP metadata's ``storage_data`` as this reader needs it: every value a dict with the
    fields the writer put there, of the types it put there."""
    if not isinstance(storage, dict):
        raise CorruptCheckpointError(f"{where}: storage_data is a {type(storage).__name__}, not a dict")
    for index, info in storage.items():
        ok = isinstance(info, dict) and all(isinstance(info.get(k), t) for k, t in _INFO_FIELDS.items())
        if not ok:
            raise CorruptCheckpointError(f"{where}: the storage entry of {index!r} is malformed: {info!r:.200}")
    return storage


def _narrow(tensor: Any, offsets: Any, lengths: Any) -> Any:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, int(offset), int(length))
    return tensor


def _dense(t: Any) -> bool:
    return t.layout == torch.strided and t.is_contiguous() and not t.is_conj() and not t.is_neg()


class UringStorageReader(StorageReader):  # type: ignore[misc]
    """DCP ``StorageReader`` for checkpoints written by :class:`UringStorageWriter` (see the
    module's docstring). ``verify``: check every tensor's CRC-32 (default)."""

    def __init__(self, path: PathLike, config: ConfigLike = None, *, verify: bool = True) -> None:
        _require_dcp()
        super().__init__()
        self.path = os.fspath(path)
        self.config = coerce_config(config)
        self.verify = verify
        self.storage_data: dict[Any, dict[str, Any]] = {}
        self._metadata: Any = None
        self.load_id = uuid.uuid4().hex
        self.read_counts = {"in_place": 0, "copied": 0, "bytes": 0}
        """Read items of the last ``read_data`` on this rank: ``in_place`` (whole chunks read
        straight into their destination), ``copied`` (parts of chunks: read, narrowed,
        copied), ``bytes`` (byte items)."""

    @property
    def checkpoint_id(self) -> str:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def reset(self, checkpoint_id: PathLike | None = None) -> None:
        self.storage_data = {}
        self._metadata = None
        if checkpoint_id:
            self.path = os.fspath(checkpoint_id)
        self.load_id = uuid.uuid4().hex

    def read_metadata(self) -> Any:
        where = os.path.join(self.path, METADATA_FILE)
        _, _, extras, _ = cached_writer(self.config).load(self.path, [], self.verify)  # no tensor read
        blob = extras.get(METADATA_FILE)
        if blob is None:
            raise CheckpointError(f"{self.path} is not a torch.distributed.checkpoint checkpoint: no {METADATA_FILE}")
        metadata = _unpickle_metadata(blob, where)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = _md.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._metadata = metadata
        self.storage_data = _check_storage_data(metadata.storage_data, os.path.join(self.path, METADATA_FILE))

    def prepare_local_plan(self, plan: Any) -> Any:
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        return plans

    def _saved_dtype(self, fqn: str, info: dict[str, Any]) -> Any:
        md = self._metadata.state_dict_metadata.get(fqn) if self._metadata is not None else None
        dtype = getattr(getattr(md, "properties", None), "dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
        return torch_dtype_from_safetensors(info["dtype"])

    def _info(self, item: Any) -> dict[str, Any]:
        info = self.storage_data.get(item.storage_index)
        if info is None:
            raise CorruptCheckpointError(f"{self.path}: no stored data for {item.storage_index}")
        return info

    def read_data(self, plan: Any, planner: Any) -> Any:
        writer = cached_writer(self.config)
        in_place: dict[str, list[tuple[str, Any, str, list[int]]]] = {}
        placed: list[tuple[Any, Any]] = []
        claimed: set[str] = set()
        copied: list[tuple[Any, dict[str, Any], Any]] = []
        for item in plan.items:
            info = self._info(item)
            if item.type == LoadItemType.BYTE_IO:
                copied.append((item, info, None))
                continue
            dest = planner.resolve_tensor(item).detach()
            saved = self._saved_dtype(item.storage_index.fqn, info)
            whole = all(int(o) == 0 for o in item.storage_offsets) and [int(n) for n in item.lengths] == list(
                info.get("sizes", info["shape"])
            )
            device_ok = dest.device.type == "cpu" or (dest.device.type == "cuda" and cuda_available())
            if whole and dest.dtype == saved and _dense(dest) and device_ok and info["tensor"] not in claimed:
                claimed.add(info["tensor"])
                target = _bytes_of(dest) if info.get("raw") else dest
                in_place.setdefault(str(dest.device), []).append((info["tensor"], target, info["dtype"], info["shape"]))
                placed.append((item, dest))
            else:
                copied.append((item, info, dest))
        byte_items = sum(1 for item, _, _ in copied if item.type == LoadItemType.BYTE_IO)
        self.read_counts = {"in_place": len(placed), "copied": len(copied) - byte_items, "bytes": byte_items}
        with torch.no_grad():
            for dests in in_place.values():
                writer.load_into(self.path, dests, [d[0] for d in dests], self.verify, True)
            for item, dest in placed:
                planner.commit_tensor(item, dest)
            for batch in _batches(copied):
                self._read_copied(writer, batch, planner)
        future: Any = Future()
        future.set_result(None)
        return future

    def _read_copied(self, writer: Any, batch: list[tuple[Any, dict[str, Any], Any]], planner: Any) -> None:
        names = sorted({info["tensor"] for _, info, _ in batch})
        tensors, _, _, _ = writer.load(self.path, names, self.verify)
        buffers = {name: buf for name, _dtype, _shape, buf in tensors}
        for item, info, dest in batch:
            buf = buffers[info["tensor"]]
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(bytes(buf)))
                continue
            raw = torch.frombuffer(buf, dtype=torch.uint8) if len(memoryview(buf)) else torch.empty(0, dtype=torch.uint8)
            saved = self._saved_dtype(item.storage_index.fqn, info)
            dtype = saved if info.get("raw") else torch_dtype_from_safetensors(info["dtype"])
            stored = _from_bytes(raw, dtype, list(info.get("sizes", info["shape"])))
            dest.copy_(_narrow(stored, item.storage_offsets, item.lengths))
            planner.commit_tensor(item, dest)


def _batches(items: list[tuple[Any, dict[str, Any], Any]]) -> list[list[tuple[Any, dict[str, Any], Any]]]:
    """The items in groups whose distinct stored tensors add up to at most
    ``_SLOW_BATCH_BYTES`` (a larger one alone), items of one stored tensor together."""
    by_tensor: dict[str, list[tuple[Any, dict[str, Any], Any]]] = {}
    for entry in items:
        by_tensor.setdefault(entry[1]["tensor"], []).append(entry)
    out: list[list[tuple[Any, dict[str, Any], Any]]] = []
    current: list[tuple[Any, dict[str, Any], Any]] = []
    size = 0
    for group in by_tensor.values():
        length = int(group[0][1]["length"])
        if current and size + length > _SLOW_BATCH_BYTES:
            out.append(current)
            current, size = [], 0
        current.extend(group)
        size += length
    if current:
        out.append(current)
    return out
