"""Staging for ``dcp.async_save`` (:class:`uring_ckpt.dcp.UringStorageWriter` is DCP's
``AsyncStager``): copies a state dict into CPU memory that is kept and reused from one save
to the next, so that after the first save the training loop waits only for the copy, not
for allocating and faulting in a whole new copy as DCP's default stager does every save.

A :class:`StagingArea` is one reusable copy: torch's ``StateDictStager`` (which walks the
state dict, DTensors and nested containers included, and maps every source storage to a
staged storage of its own, copying into the same one when asked again), with the staged
storages allocated here: page-aligned anonymous memory (huge pages where the kernel gives
them), page-locked when CUDA is there so device tensors come over at full speed. Page
alignment is what lets the writer send staged tensors to disk without another copy: with
O_DIRECT a tensor goes straight from its memory when its address and file offset agree
modulo the direct-I/O memory alignment. The writer starts each shard's data region at the
phase of most of its tensors' bytes past a page (64 for torch's own allocations, 0 for
these), and tensors whose sizes are multiples of 512 keep the next one congruent. An area is
*in use* while anything outside it still refers to one of its storages: the staged state
dict, or any view DCP made of it, on the thread (or, in process mode, the thread waiting
for the checkpoint process) that writes it. :class:`StagingAreas` hands each save an area
that is not in use and makes a new one when every area is (a save still in flight, or an
exception's traceback holding one): a staged copy is never overwritten while it is being
written, and staging never waits. At most :data:`KEEP_AREAS` idle areas are kept."""

from __future__ import annotations

import mmap
import threading
import time
import weakref
from typing import Any

KEEP_AREAS = 2
"""Areas kept between saves: one in flight while the next save stages into the other."""


HUGE_PAGE_MIN = 2 << 20
"""Staged storages at least this large are advised to use transparent huge pages."""


def _storage_users(storage: Any) -> int:
    """References to ``storage``'s memory (tensors, views, storage objects); a large number
    where this torch cannot say, so that an area is then never taken for free."""
    import torch

    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return 1 << 30
    count: int = use_count(storage._cdata)
    return count


def page_aligned_storage(nbytes: int) -> Any:
    """A CPU ``UntypedStorage`` of ``nbytes`` over anonymous memory of its own (an ``mmap``,
    so page-aligned, zero until written, unmapped when the storage dies)."""
    import torch

    if nbytes == 0:
        return torch.UntypedStorage(0)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= HUGE_PAGE_MIN and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # THP off in this kernel: 4 KiB pages
    return torch.frombuffer(memory, dtype=torch.uint8).untyped_storage()  # keeps `memory` alive


def _aligned_stager(pin_memory: bool) -> Any:
    """A ``StateDictStager`` whose new staged storages come from :func:`page_aligned_storage`
    (the cache, the reuse and the pinning are torch's, as in ``StateDictStager``)."""
    import torch.cuda._pin_memory_utils as pin_memory_utils
    import torch.distributed.checkpoint._state_dict_stager as state_dict_stager

    class AlignedStateDictStager(state_dict_stager.StateDictStager):  # type: ignore[misc]
        def _stage_untyped_storage(self, storage: Any, non_blocking: bool = False) -> Any:
            cached = self._cached_storage_mapping.get(storage)
            if cached is not None and cached.size() == storage.size():
                cached.copy_(storage, non_blocking=non_blocking)
                return cached
            staged = page_aligned_storage(storage.nbytes())
            if self.pin_memory and staged.nbytes() >= self.pin_memory_min_bytes:
                pin_memory_utils.pin_memory(staged.data_ptr(), staged.nbytes())
                unpin = weakref.finalize(staged, pin_memory_utils.unpin_memory, staged.data_ptr())
                unpin.atexit = False  # not after the CUDA context is gone
            staged.copy_(storage, non_blocking=non_blocking)
            self._cached_storage_mapping[storage] = staged
            return staged

    return AlignedStateDictStager(pin_memory=pin_memory, share_memory=False)


class StagingArea:
    """One reusable staged copy of a state dict (see the module's docstring)."""

    def __init__(self, pin_memory: bool) -> None:
        self._stager = _aligned_stager(pin_memory)

    def _storages(self) -> list[Any]:
        return list(self._stager._cached_storage_mapping.values())

    def in_use(self) -> bool:
        """Whether anything but this area refers to one of its storages (its cache holds
        exactly one reference to each)."""
        return any(_storage_users(s) > 1 for s in self._storages())

    def nbytes(self) -> int:
        return sum(int(s.nbytes()) for s in self._storages())

    def stage(self, state_dict: Any, non_blocking: bool) -> Any:
        return self._stager.stage(state_dict, non_blocking=non_blocking)

    def close(self) -> None:
        self._stager.close()


class StagingAreas:
    """The areas of one writer, and what its last staging did (:attr:`last`)."""

    def __init__(self) -> None:
        self._areas: list[StagingArea] = []
        self._lock = threading.Lock()
        self.last: dict[str, Any] = {}
        """The last :meth:`stage`: ``seconds``, ``bytes`` (of the area it used), ``reused``
        (staged into an area kept from an earlier save: the memory of the tensors that save
        also had is reused, new source tensors get new memory), ``areas`` (kept afterwards)."""

    def stage(self, state_dict: Any) -> Any:
        import torch

        start = time.perf_counter()
        cuda = torch.cuda.is_available()
        with self._lock:
            area = next((a for a in self._areas if not a.in_use()), None)
            reused = area is not None and area.nbytes() > 0
            if area is None:
                area = StagingArea(pin_memory=cuda)
                self._areas.append(area)
            # Areas beyond KEEP_AREAS that nothing uses any more are dropped (a burst of
            # overlapping saves made them).
            idle = [a for a in self._areas if a is not area and not a.in_use()]
            for extra in idle[: max(0, len(self._areas) - KEEP_AREAS)]:
                self._areas.remove(extra)
                extra.close()
        staged = area.stage(state_dict, non_blocking=cuda)
        if cuda:
            torch.cuda.current_stream().synchronize()  # the device-to-host copies were queued there
        self.last = {
            "seconds": time.perf_counter() - start,
            "bytes": area.nbytes(),
            "reused": reused,
            "areas": len(self._areas),
        }
        return staged

    def close(self) -> None:
        with self._lock:
            for area in self._areas:
                area.close()
            self._areas.clear()
