//! Snapshot mode: every tensor is copied into one aligned host area (kept and reused by
//! later saves), the sources are released, and the save writes from the copy.
//!
//! When device sources are present, the area is page-locked through the registrar the
//! sources offer ([`TensorSource::host_registrar`], CUDA's `cuMemHostRegister`) the first
//! time it is filled from a device, and stays so while it is kept: [`SnapshotArea`]
//! unregisters it before its memory is freed, whatever the reason (a larger checkpoint, the
//! end of the wrapper). Copies are cut into pieces of [`SNAPSHOT_PIECE`] bytes spread over up
//! to [`SNAPSHOT_THREADS`] threads, so the pieces of one large tensor are copied at once (on
//! several CUDA streams: each copy borrows its own).
//!
//! Memory of an area that nothing has faulted in yet (a new area, a grown one's tail) is
//! faulted in before it is first copied into, piece by piece, with huge or 4 KiB pages,
//! whichever faults in faster here at that moment ([`PageChoice`], shared by the copy
//! threads; io/prefault.rs says why either may win); so is it by a reservation's helper
//! ([`fault_in_owned`]). Memory already faulted in keeps its pages and advice.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use super::completion::lock;
use super::job::{Shared, State};
use super::owned::OwnedCheckpoint;
use crate::checkpoint::{Checkpoint, SaveReport, TensorData, TensorView};
use crate::checkpoint_io::CheckpointIO;
use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::io::aligned::{round_up, HUGE_PAGE};
use crate::io::threads::lower_priority;
use crate::io::{copy_streaming, fault_in_owned, populate_chosen, AlignedBuf, PageChoice, Registrar};
use crate::source::TensorSource;

/// Snapshot copies are split into pieces of at most this size, shared among threads.
const SNAPSHOT_PIECE: usize = 64 << 20;
/// Threads copying a snapshot at most.
const SNAPSHOT_THREADS: usize = 4;
/// Alignment of the snapshot area (and so of every tensor that starts a shard in it).
const SNAPSHOT_ALIGN: usize = 4096;
/// Whether snapshot areas ask for transparent huge pages. Yes, by measurement
/// (`examples/snapshot_pages.rs`, 1 GiB, on the 2-vCPU VM of the README's figures): faulted in
/// ahead (`MADV_POPULATE_WRITE`) at 4.4-5.4 GiB/s against 2.9-3.3 for small pages, even with
/// most memory in the page cache; a first copy into fresh memory at 2.5-4.2 against 1.3-1.7
/// GiB/s; a save written from the area (O_DIRECT pins its pages) at 1.5-2.1 against 1.5-1.6
/// GiB/s; copies into a faulted area equal (7-10 GiB/s). A reservation moves the first touch
/// off the critical path either way. This is the advice an area is mapped with; where a
/// save or a reservation faults fresh memory of it in, each step is advised for the page
/// size that faults in faster at that moment ([`FreshFill`], [`fault_in_owned`]).
const SNAPSHOT_HUGE_PAGES: bool = true;

/// What the kept snapshot areas of an [`AsyncCheckpointIO`](super::AsyncCheckpointIO) hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Areas kept for the next saves (not in use by a save now).
    pub areas: usize,
    /// Areas in use by saves running now.
    pub in_use: usize,
    /// Bytes of the kept areas (their capacity).
    pub reserved_bytes: u64,
    /// Of those, bytes faulted in (backed by memory, as `mincore` says).
    pub resident_bytes: u64,
    /// Whether a helper thread is still faulting a kept area in.
    pub reserving: bool,
    /// Bytes a reservation asked for that no kept area holds yet: every area is in use; the
    /// first to come back is grown to this.
    pub pending_bytes: u64,
}

/// How far a reservation's helper got, and its stop flag.
struct Progress {
    stop: AtomicBool,
    faulted: AtomicUsize,
    done: Mutex<bool>,
    finished: Condvar,
    /// The helper's nice value once it set it (tests).
    #[cfg(test)]
    nice: std::sync::atomic::AtomicI32,
}

impl Progress {
    fn finish(&self) {
        *lock(&self.done) = true;
        self.finished.notify_all();
    }

    fn wait(&self) {
        let mut done = lock(&self.done);
        while !*done {
            done = self.finished.wait(done).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The helper thread faulting an area in.
struct Helper {
    progress: Arc<Progress>,
    thread: JoinHandle<()>,
}

/// A kept snapshot area, page-locked (registered) or not, perhaps being faulted in by the
/// helper thread of a reservation.
pub(super) struct SnapshotArea {
    buf: AlignedBuf,
    /// Who registered `buf`, unregistered before it is freed.
    registrar: Option<Arc<dyn Registrar>>,
    /// Faulting `buf` in; stopped and joined before anything else touches the area (a save,
    /// growing, trimming, freeing).
    helper: Option<Helper>,
    /// Sized by a reservation (a guess) and not used by a save yet: the first save trims it
    /// to its own size.
    guess: bool,
    /// Bytes from the start known to be faulted in (by a save's copy, a reservation's
    /// helper, page-locking): memory past it is fresh, and whoever faults it in first
    /// chooses its page size.
    faulted: usize,
}

impl SnapshotArea {
    fn new(len: usize) -> SnapshotArea {
        let buf = if SNAPSHOT_HUGE_PAGES {
            AlignedBuf::zeroed(len, SNAPSHOT_ALIGN)
        } else {
            AlignedBuf::zeroed_pages(len, SNAPSHOT_ALIGN)
        };
        SnapshotArea { buf, registrar: None, helper: None, guess: false, faulted: 0 }
    }

    /// A new area of `len` bytes, faulted in by a helper thread at nice `nice`.
    fn reserved(len: usize, nice: u32) -> SnapshotArea {
        let mut area = SnapshotArea::new(len);
        area.guess = true;
        area.fault_in_behind(nice);
        area
    }

    /// Starts a helper thread (at nice `nice`; 0: this thread's priority) that faults the
    /// whole area in, pages already present costing a page-table walk. A helper that cannot
    /// be started is logged: the save that takes the area faults it in as it copies.
    fn fault_in_behind(&mut self, nice: u32) {
        self.settle();
        let progress = Arc::new(Progress {
            stop: AtomicBool::new(false),
            faulted: AtomicUsize::new(0),
            done: Mutex::new(false),
            finished: Condvar::new(),
            #[cfg(test)]
            nice: std::sync::atomic::AtomicI32::new(i32::MIN),
        });
        let (start, len) = (self.buf.as_ptr() as usize, self.buf.capacity());
        // Heap memory (a small area) keeps the allocator's advice.
        let choose_from = if self.buf.is_mapped() { self.faulted } else { len };
        let theirs = progress.clone();
        let spawned = std::thread::Builder::new().name("uring-ckpt-reserve".into()).spawn(move || {
            if nice > 0 {
                if let Err(e) = lower_priority(nice) {
                    log::debug!("the snapshot reservation keeps its priority ({e})");
                }
            }
            #[cfg(test)]
            if let Ok(n) = crate::io::threads::nice_of(crate::io::threads::thread_id()) {
                theirs.nice.store(n, Ordering::SeqCst);
            }
            // SAFETY: the area's memory (initialised: zeroed at allocation) stays mapped and
            // untouched by anyone else until this thread is joined (`settle`), which happens
            // before the area is used, grown, trimmed or freed; past `choose_from` (the bytes
            // known to be faulted in) it is fresh memory of the area's own mapping.
            let (done, (huge, small)) =
                unsafe { fault_in_owned(start, len, choose_from, &theirs.stop, &theirs.faulted) };
            log::debug!(
                "snapshot reservation: {done} of {len} bytes faulted in, of the fresh ones {huge} with huge and {small} with 4 KiB pages"
            );
            theirs.finish();
        });
        match spawned {
            Ok(thread) => self.helper = Some(Helper { progress, thread }),
            Err(e) => log::warn!("no thread to reserve a snapshot area of {len} bytes ({e})"),
        }
    }

    /// Stops the helper (if any) and waits for it: at most one step of its work.
    fn settle(&mut self) {
        if let Some(helper) = self.helper.take() {
            helper.progress.stop.store(true, Ordering::Relaxed);
            if helper.thread.join().is_err() {
                log::error!("the thread reserving a snapshot area panicked");
            }
            // What it faulted in from the start (published after each step, so right even
            // after a panic).
            self.faulted = self.faulted.max(helper.progress.faulted.load(Ordering::Acquire));
        }
    }

    /// Whether a helper is still faulting the area in.
    fn reserving(&self) -> bool {
        self.helper.as_ref().is_some_and(|h| !h.thread.is_finished())
    }

    /// Registers the area with `registrar` unless it is already registered; a refusal is
    /// logged and the area stays pageable (copies into it are slower).
    fn register(&mut self, registrar: Arc<dyn Registrar>) {
        if self.registrar.is_some() {
            return;
        }
        match registrar.register(&self.buf) {
            Ok(()) => {
                self.registrar = Some(registrar);
                // Page-locking faults every page in (with the area's advice).
                self.faulted = self.buf.capacity();
            }
            Err(e) => log::warn!(
                "{} refused the snapshot area of {} bytes ({e}); device copies into it use pageable memory",
                registrar.name(),
                self.buf.capacity()
            ),
        }
    }

    fn unregister(&mut self) {
        if let Some(registrar) = self.registrar.take() {
            registrar.unregister(&self.buf);
        }
    }

    /// Grows the area to `len` bytes keeping its faulted pages (settled and unregistered
    /// first: its pages move); false where it cannot (a small area on the heap).
    fn grow(&mut self, len: usize) -> bool {
        self.settle();
        if self.buf.capacity() >= len {
            return true;
        }
        self.unregister();
        self.buf.grow(len)
    }

    /// After the first save that used a reserved area: gives back what that save did not
    /// need (past `used`, rounded up to a huge page), so that the area is the checkpoint's
    /// size whatever the reservation guessed. A page-locked area stays as it is: unlocking
    /// it and locking it again would cost the next save more than the memory is worth.
    fn trim_guess(&mut self, used: usize) {
        if !std::mem::take(&mut self.guess) || self.registrar.is_some() {
            return;
        }
        let keep = round_up(used.max(1), HUGE_PAGE);
        if self.buf.capacity() > keep {
            self.settle();
            self.buf.shrink(keep);
            self.faulted = self.faulted.min(self.buf.capacity());
        }
    }

    /// Waits for the helper to finish its work, then settles it.
    #[cfg(test)]
    fn settle_finished(&mut self) {
        if let Some(helper) = &self.helper {
            helper.progress.wait();
        }
        self.settle();
    }

    /// Whether the area is registered.
    #[cfg(test)]
    pub(super) fn is_registered(&self) -> bool {
        self.registrar.is_some()
    }

    /// The area's address and the helper's nice value (`i32::MIN` before it set it).
    #[cfg(test)]
    fn probe(&self) -> (usize, Option<i32>) {
        let nice = self.helper.as_ref().map(|h| h.progress.nice.load(Ordering::SeqCst));
        (self.buf.as_ptr() as usize, nice)
    }
}

impl Drop for SnapshotArea {
    fn drop(&mut self) {
        // Before `buf` (a field) is freed.
        self.settle();
        self.unregister();
    }
}

/// The snapshot figures of `state`.
pub(super) fn snapshot_stats(state: &State) -> SnapshotStats {
    let idle = &state.snapshots;
    SnapshotStats {
        areas: idle.len(),
        in_use: state.areas_in_use,
        reserved_bytes: idle.iter().map(|a| a.buf.capacity() as u64).sum(),
        resident_bytes: idle.iter().map(|a| a.buf.resident_bytes() as u64).sum(),
        reserving: idle.iter().any(SnapshotArea::reserving),
        pending_bytes: state.pending_reserve as u64,
    }
}

/// Asks for a kept area of at least `len` bytes, faulted in by a helper thread: an area
/// kept already is grown (keeping its pages), else a new one is made if fewer than
/// `max_areas` exist; else the request waits for an area to come back from its save.
pub(super) fn reserve(state: &mut State, len: usize, max_areas: usize, nice: u32) {
    state.pending_reserve = state.pending_reserve.max(len);
    serve_reservation(state, max_areas, nice);
}

/// Serves a pending reservation (see [`reserve`]) if an area allows it now.
fn serve_reservation(state: &mut State, max_areas: usize, nice: u32) {
    let want = state.pending_reserve;
    if want == 0 {
        return;
    }
    if state.snapshots.iter().any(|a| a.buf.capacity() >= want) {
        state.pending_reserve = 0;
        return;
    }
    let largest = (0..state.snapshots.len()).max_by_key(|&i| state.snapshots[i].buf.capacity());
    let area = match largest {
        Some(i) => {
            let mut area = state.snapshots.swap_remove(i);
            if area.grow(want) {
                area.guess = true;
                area.fault_in_behind(nice);
                area
            } else {
                drop(area); // (unregistered as it goes)
                SnapshotArea::reserved(want, nice)
            }
        }
        None if state.areas_in_use < max_areas => SnapshotArea::reserved(want, nice),
        None => return, // every area is in use: served when one comes back
    };
    state.snapshots.push(area);
    state.pending_reserve = 0;
}

/// Waits until no kept area is being faulted in (reservations waiting for an area in use
/// are not waited for).
pub(super) fn wait_reserved(shared: &Shared) {
    loop {
        let progress = {
            let state = lock(&shared.state);
            state
                .snapshots
                .iter()
                .filter(|a| a.reserving())
                .find_map(|a| a.helper.as_ref().map(|h| h.progress.clone()))
        };
        match progress {
            Some(p) => p.wait(),
            None => return,
        }
    }
}

/// A save's claim on one of the areas: [`AreaSlot::put_back`] returns the area to the kept
/// ones; dropped without that (a panic: the area is freed), the claim alone goes.
struct AreaSlot<'s> {
    shared: &'s Shared,
    held: bool,
}

impl AreaSlot<'_> {
    /// Keeps `area` for the next saves, trimmed to `used` bytes if it was a reservation's
    /// guess, then grows it for a pending reservation.
    fn put_back(mut self, mut area: SnapshotArea, used: usize) {
        area.buf.clear();
        area.trim_guess(used);
        let options = self.shared.options;
        let mut state = lock(&self.shared.state);
        state.areas_in_use -= 1;
        self.held = false;
        state.snapshots.push(area);
        serve_reservation(&mut state, options.max_saves_in_flight, options.background_nice);
        drop(state);
        self.shared.changed.notify_all();
    }
}

impl Drop for AreaSlot<'_> {
    fn drop(&mut self) {
        if self.held {
            lock(&self.shared.state).areas_in_use -= 1;
            self.shared.changed.notify_all();
        }
    }
}

/// Snapshot mode: copies every tensor into one aligned host area (reused across saves),
/// releases the sources, lowers this thread's priority (the caller no longer waits), then
/// saves from the copy.
pub(super) fn snapshot_save<C: CheckpointIO>(
    inner: &C,
    shared: &Shared,
    checkpoint: OwnedCheckpoint,
    path: &Path,
    on_staged: &(dyn Fn() + Sync),
) -> Result<SaveReport> {
    // Tensors are packed as in a shard's data region, so that file offsets and addresses
    // agree modulo the alignment and the writer can send aligned runs without a copy.
    let mut offsets = Vec::with_capacity(checkpoint.tensors.len());
    let mut total = 0usize;
    for t in &checkpoint.tensors {
        offsets.push(total);
        total = total
            .checked_add(t.source.len())
            .ok_or_else(|| Error::InvalidCheckpoint("checkpoint size overflows".into()))?;
    }
    let (slot, mut area) = take_snapshot_area(shared, total);
    let device_registrar = checkpoint
        .tensors
        .iter()
        .filter(|t| t.source.host_bytes().is_none() && !t.source.is_empty())
        .find_map(|t| t.source.host_registrar());
    if let Some(registrar) = device_registrar {
        area.register(registrar);
    }
    let copy_started = Instant::now();
    let copied = fill_area(&mut area, &checkpoint, &offsets, total, SNAPSHOT_PIECE).map(|(huge, small)| {
        if huge + small > 0 {
            log::debug!(
                "snapshot of {}: fresh area memory faulted in, {huge} bytes with huge and {small} with 4 KiB pages",
                path.display()
            );
        }
    });
    let snapshot_seconds = copy_started.elapsed().as_secs_f64();
    // Nothing reads the sources any more: release them before saying so.
    let OwnedCheckpoint { tensors, metadata, extra_files, hf_index } = checkpoint;
    let specs: Vec<(String, Dtype, Vec<u64>, usize)> =
        tensors.into_iter().map(|t| (t.name, t.dtype, t.shape, t.source.len())).collect();
    on_staged();
    let nice = shared.options.background_nice;
    if nice > 0 {
        // The threads the save starts from here on (writers, io-wq workers) inherit it.
        if let Err(e) = lower_priority(nice) {
            log::debug!("the background save of {} keeps its priority ({e})", path.display());
        }
    }
    let result = copied.and_then(|()| {
        area.buf.set_len(total);
        let view = Checkpoint {
            tensors: specs
                .iter()
                .zip(&offsets)
                .map(|((name, dtype, shape, len), &start)| TensorView {
                    name: name.clone(),
                    dtype: *dtype,
                    shape: shape.clone(),
                    data: TensorData::Host(&area.buf[start..start + len]),
                })
                .collect(),
            metadata,
            extra_files: extra_files.iter().map(|(n, b)| (n.clone(), &b[..])).collect(),
            hf_index,
        };
        inner.save_checkpoint(&view, path)
    });
    slot.put_back(area, total);
    let mut report = result?;
    report.add_serial_copy(snapshot_seconds, total as u64);
    Ok(report)
}

/// A kept snapshot area of at least `len` bytes, else the largest kept one grown to `len`
/// (its faulted pages kept), else a new one. A reservation still faulting the area in is
/// stopped first (the copy faults in the rest): never slower than a fresh area.
fn take_snapshot_area(shared: &Shared, len: usize) -> (AreaSlot<'_>, SnapshotArea) {
    let chosen = {
        let mut state = lock(&shared.state);
        state.areas_in_use += 1;
        let fits = state
            .snapshots
            .iter()
            .enumerate()
            .filter(|(_, a)| a.buf.capacity() >= len)
            .min_by_key(|(_, a)| a.buf.capacity())
            .map(|(i, _)| i);
        let pick =
            fits.or_else(|| (0..state.snapshots.len()).max_by_key(|&i| state.snapshots[i].buf.capacity()));
        pick.map(|i| state.snapshots.swap_remove(i))
    };
    let slot = AreaSlot { shared, held: true };
    let area = match chosen {
        Some(mut area) => {
            area.settle();
            if area.grow(len) {
                area
            } else {
                drop(area); // (unregistered as it goes)
                SnapshotArea::new(len)
            }
        }
        None => SnapshotArea::new(len),
    };
    (slot, area)
}

/// The first fill of an area's fresh memory (a new area, a grown one's tail): before each
/// piece is copied, the fresh huge pages that start in it are faulted in
/// (`MADV_POPULATE_WRITE`, timed), each step with the page size the shared [`PageChoice`]
/// picks, whichever faults in faster here (io/prefault.rs). Each huge page belongs to the
/// one piece it starts in, so no page is advised twice; the piece before it may reach into
/// the next one's first huge page, which is harmless: neither advice nor `MADV_POPULATE_WRITE`
/// changes a byte, and the copy writing there faults a page in itself if it comes first.
struct FreshFill {
    /// The area's address.
    base: usize,
    /// Area offset where the fresh memory starts (a page boundary).
    from: usize,
    /// Area offset where the fill's faulting stops: the save's bytes rounded up to a huge
    /// page, within the area.
    end: usize,
    choice: Mutex<PageChoice>,
    /// `MADV_POPULATE_WRITE` was refused: the copies fault the rest in themselves.
    refused: AtomicBool,
}

impl FreshFill {
    /// The fill of `area`'s first `total` bytes, if any of them is fresh memory of a mapping
    /// of the area's own (heap memory, a small area, keeps the allocator's advice).
    fn new(area: &mut SnapshotArea, total: usize) -> Option<FreshFill> {
        let from = area.faulted & !(4096 - 1);
        let end = round_up(total, HUGE_PAGE).min(area.buf.capacity());
        if !area.buf.is_mapped() || from >= end {
            return None;
        }
        Some(FreshFill {
            base: area.buf.as_mut_ptr() as usize,
            from,
            end,
            choice: Mutex::new(PageChoice::starting_with_last_faster()),
            refused: AtomicBool::new(false),
        })
    }

    /// Before the piece at area offsets `[start, end)` is copied: faults in the fresh huge
    /// pages that start in it.
    fn before_copy(&self, start: usize, end: usize) {
        let from = round_up(start, HUGE_PAGE).max(self.from);
        let to = round_up(end, HUGE_PAGE).min(self.end);
        if from < to
            && !self.refused.load(Ordering::Relaxed)
            && !populate_chosen(&self.choice, self.base + from, to - from)
        {
            self.refused.store(true, Ordering::Relaxed);
        }
    }
}

/// Copies every tensor into `area` at its offset (the first `total` bytes), faulting fresh
/// memory in first with the page size that faults in faster ([`FreshFill`]), and books what
/// is faulted in now. Returns the bytes faulted in with huge and with 4 KiB pages.
fn fill_area(
    area: &mut SnapshotArea,
    checkpoint: &OwnedCheckpoint,
    offsets: &[usize],
    total: usize,
    piece_size: usize,
) -> Result<(usize, usize)> {
    let fill = FreshFill::new(area, total);
    copy_snapshot(
        checkpoint,
        offsets,
        &mut area.buf.as_full_mut_slice()[..total],
        piece_size,
        fill.as_ref(),
    )?;
    // Every page of the save's bytes is in now (the copies wrote them), and so is the rest
    // of what the fill faulted in. (After a failed copy the area keeps what it knew: the
    // next save may advise again what this one faulted in, which is only slower.)
    let mut faulted = round_up(total, 4096).min(area.buf.capacity());
    if let Some(fill) = &fill {
        if !fill.refused.load(Ordering::Relaxed) {
            faulted = faulted.max(fill.end);
        }
    }
    area.faulted = area.faulted.max(faulted);
    Ok(fill.map_or((0, 0), |f| f.choice.into_inner().unwrap_or_else(PoisonError::into_inner).bytes()))
}

/// Copies every tensor to its offset in `dst`, in pieces of at most `piece_size` bytes
/// spread over a few threads (pieces of one tensor run at once). With `fill`, `dst` is the
/// start of a snapshot area, and each piece's fresh memory is faulted in before its copy.
fn copy_snapshot(
    checkpoint: &OwnedCheckpoint,
    offsets: &[usize],
    dst: &mut [u8],
    piece_size: usize,
    fill: Option<&FreshFill>,
) -> Result<()> {
    struct Piece<'a> {
        source: &'a dyn TensorSource,
        offset: usize,
        /// Where `dst` starts in the destination.
        at: usize,
        dst: &'a mut [u8],
    }
    let mut pieces = Vec::new();
    let mut rest = dst;
    let mut at = 0usize;
    for (t, &start) in checkpoint.tensors.iter().zip(offsets) {
        debug_assert_eq!(start, at);
        let len = t.source.len();
        let (mut tensor_dst, tail) = std::mem::take(&mut rest).split_at_mut(len);
        rest = tail;
        at += len;
        let mut offset = 0usize;
        while !tensor_dst.is_empty() {
            let n = tensor_dst.len().min(piece_size.max(1));
            let (piece, more) = std::mem::take(&mut tensor_dst).split_at_mut(n);
            pieces.push(Piece { source: &*t.source, offset, at: start + offset, dst: piece });
            tensor_dst = more;
            offset += n;
        }
    }
    // Device copies mostly wait for DMA: as many threads as allowed, whatever the cores.
    let devices = checkpoint.tensors.iter().any(|t| t.source.host_bytes().is_none());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if devices { SNAPSHOT_THREADS } else { cores.min(SNAPSHOT_THREADS) }.min(pieces.len());
    let queue = Mutex::new(pieces.into_iter());
    let copy = || -> Result<()> {
        loop {
            let next = lock(&queue).next();
            let Some(piece) = next else { return Ok(()) };
            if let Some(fill) = fill {
                fill.before_copy(piece.at, piece.at + piece.dst.len());
            }
            match piece.source.host_bytes() {
                Some(bytes) => {
                    copy_streaming(piece.dst, &bytes[piece.offset..piece.offset + piece.dst.len()])
                }
                None => piece.source.copy_to(piece.offset, piece.dst)?,
            }
        }
    };
    if threads <= 1 {
        return copy();
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads).map(|_| scope.spawn(copy)).collect();
        let mut first = Ok(());
        for h in handles {
            let result =
                h.join().unwrap_or_else(|_| Err(Error::Internal("a snapshot copy thread panicked".into())));
            if first.is_ok() {
                first = result;
            }
        }
        first
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::background::{AsyncCheckpointIO, AsyncOptions};
    use crate::checkpoint_io::{LoadOptions, UringCheckpointIO};
    use crate::config::{AsyncMode, Config};
    use crate::io::pool::testing::FakeRegistrar;

    /// A device-like source (no host bytes) that offers a fake page-locking registrar and
    /// records, for each copy, whether the registrar had a live registration, and how many
    /// copies ran at once.
    struct FakeDevice {
        bytes: Vec<u8>,
        registrar: Arc<FakeRegistrar>,
        unregistered_copies: AtomicUsize,
        active: AtomicUsize,
        max_active: AtomicUsize,
        delay: Duration,
    }

    impl FakeDevice {
        fn new(bytes: Vec<u8>, registrar: Arc<FakeRegistrar>, delay: Duration) -> FakeDevice {
            FakeDevice {
                bytes,
                registrar,
                unregistered_copies: AtomicUsize::new(0),
                active: AtomicUsize::new(0),
                max_active: AtomicUsize::new(0),
                delay,
            }
        }
    }

    impl TensorSource for FakeDevice {
        fn len(&self) -> usize {
            self.bytes.len()
        }
        fn host_bytes(&self) -> Option<&[u8]> {
            None
        }
        fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
            if self.registrar.counts().2 == 0 {
                self.unregistered_copies.fetch_add(1, Ordering::SeqCst);
            }
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_active.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            dst.copy_from_slice(&self.bytes[offset..offset + dst.len()]);
            self.active.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
        fn host_registrar(&self) -> Option<Arc<dyn Registrar>> {
            Some(self.registrar.clone())
        }
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn pieces_of_one_large_tensor_are_copied_at_once() {
        let registrar = FakeRegistrar::new();
        let len = (1 << 20) + 5;
        let device = Arc::new(FakeDevice::new(pattern(3, len), registrar, Duration::from_millis(3)));
        let mut ck = OwnedCheckpoint::new();
        ck.add_bytes("host", Dtype::U8, &[7], vec![9u8; 7]).expect("add");
        ck.add("dev", Dtype::U8, &[len as u64], device.clone()).expect("add");
        let offsets = [0, 7];
        let mut dst = vec![0u8; 7 + len];
        copy_snapshot(&ck, &offsets, &mut dst, 64 << 10, None).expect("copy");
        assert_eq!(&dst[..7], &[9u8; 7]);
        assert!(dst[7..] == device.bytes[..], "pieces land at their offsets");
        let most = device.max_active.load(Ordering::SeqCst);
        assert!(most >= 2, "the pieces of one tensor run on several threads at once (max {most})");
        assert!(most <= SNAPSHOT_THREADS);
    }

    /// Whether this kernel takes `MADV_POPULATE_WRITE` (Linux 5.14 and later); says why not.
    fn populate_works() -> bool {
        !crate::io::populate_refused()
    }

    /// A host checkpoint of tensors of `sizes` bytes (patterns), with their offsets packed.
    fn host_checkpoint(sizes: &[usize]) -> (OwnedCheckpoint, Vec<usize>, Vec<Vec<u8>>) {
        let mut ck = OwnedCheckpoint::new();
        let (mut offsets, mut all, mut at) = (Vec::new(), Vec::new(), 0usize);
        for (i, &n) in sizes.iter().enumerate() {
            let bytes = pattern(i as u8, n);
            ck.add_bytes(format!("t{i}"), Dtype::U8, &[n as u64], bytes.clone()).expect("add");
            offsets.push(at);
            at += n;
            all.push(bytes);
        }
        (ck, offsets, all)
    }

    #[test]
    fn a_fresh_areas_first_fill_measures_both_page_sizes_and_copies_every_byte() {
        if !populate_works() {
            return;
        }
        // Tensor and piece boundaries off huge pages: each huge page is faulted once.
        let sizes = [(13 << 20) + 5, 4097, (21 << 20) + 333, 7];
        let (ck, offsets, sources) = host_checkpoint(&sizes);
        let total: usize = sizes.iter().sum();
        let mut area = SnapshotArea::new(total);
        let cap = area.buf.capacity();
        assert_eq!(area.buf.resident_bytes(), 0, "a fresh area");
        let (huge, small) = fill_area(&mut area, &ck, &offsets, total, (5 << 20) + 17).expect("fill");
        for (bytes, &at) in sources.iter().zip(&offsets) {
            assert!(area.buf.as_full_slice()[at..at + bytes.len()] == bytes[..], "tensor at {at}");
        }
        assert_eq!(huge + small, cap, "every page of the area faulted in once, by the fill");
        assert!(huge > 0 && small > 0, "both sizes measured: {huge} huge, {small} small");
        assert_eq!((area.faulted, area.buf.resident_bytes()), (cap, cap));

        // The next fill finds it all in: nothing is advised or faulted again.
        let (ck, offsets, sources) = host_checkpoint(&[total]);
        assert_eq!(fill_area(&mut area, &ck, &offsets, total, 4 << 20).expect("fill"), (0, 0));
        assert!(area.buf.as_full_slice()[..total] == sources[0][..]);
        // Advised apart, the area is several mappings; it still grows, keeping its pages.
        assert!(area.grow(cap + (4 << 20)), "grown, not replaced");
        assert!(area.buf.resident_bytes() >= cap && area.buf.as_full_slice()[..total] == sources[0][..]);
    }

    #[test]
    fn a_grown_area_chooses_pages_for_its_new_tail_only_and_grows_again() {
        if !populate_works() {
            return;
        }
        let first = 8 << 20;
        let mut area = SnapshotArea::new(first);
        let (ck, offsets, _) = host_checkpoint(&[first]);
        fill_area(&mut area, &ck, &offsets, first, 4 << 20).expect("fill");
        assert_eq!(area.faulted, first);
        let address = area.buf.as_ptr() as usize;
        let total = (30 << 20) + 4096;
        assert!(area.grow(total), "a mapped area grows in place of a new one");
        let (ck, offsets, sources) = host_checkpoint(&[5 << 20, total - (5 << 20)]);
        let (huge, small) = fill_area(&mut area, &ck, &offsets, total, 3 << 20).expect("fill");
        assert_eq!(
            huge + small,
            area.buf.capacity() - first,
            "the tail only: the faulted head keeps its advice"
        );
        assert!(huge > 0 && small > 0, "both sizes measured: {huge} huge, {small} small");
        assert!(area.buf.as_full_slice()[..5 << 20] == sources[0][..]);
        assert!(area.buf.as_full_slice()[5 << 20..total] == sources[1][..]);
        // Advised apart, the area is several mappings; growing it still keeps its pages.
        let before = area.buf.resident_bytes();
        assert!(area.grow(total + (6 << 20)), "grown again (address was {address:#x})");
        assert!(area.buf.resident_bytes() >= before, "the faulted pages moved with it");
        assert!(area.buf.as_full_slice()[5 << 20..total] == sources[1][..], "and kept their bytes");
    }

    #[test]
    fn a_reservation_chooses_pages_for_fresh_memory_and_the_save_after_it_chooses_none() {
        if !populate_works() {
            return;
        }
        let mut area = SnapshotArea::reserved(20 << 20, 0);
        area.settle_finished();
        assert_eq!(area.faulted, 20 << 20, "the helper faulted the whole area in");
        let (ck, offsets, sources) = host_checkpoint(&[(20 << 20) - 3]);
        assert_eq!(fill_area(&mut area, &ck, &offsets, (20 << 20) - 3, 4 << 20).expect("fill"), (0, 0));
        assert!(area.buf.as_full_slice()[..(20 << 20) - 3] == sources[0][..]);
    }

    #[test]
    fn the_area_is_page_locked_before_device_copies_and_unlocked_before_it_is_freed() {
        let registrar = FakeRegistrar::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let config =
            Config::builder().chunk_size(1 << 16).staging_pool_size(1 << 18).build().expect("config");
        let io = AsyncCheckpointIO::new(
            UringCheckpointIO::new(config).expect("io"),
            AsyncOptions { mode: AsyncMode::Snapshot, max_saves_in_flight: 1, ..AsyncOptions::default() },
        )
        .expect("async io");
        let mut devices = Vec::new();
        // Three saves of one size reuse one area (registered once), a larger one replaces it
        // (the old one unregistered before it is freed), a host-only save leaves it alone.
        for (i, len) in [300_000usize, 300_000, 290_000, 700_000].into_iter().enumerate() {
            let device = Arc::new(FakeDevice::new(pattern(i as u8, len), registrar.clone(), Duration::ZERO));
            let mut ck = OwnedCheckpoint::new();
            ck.add("dev", Dtype::U8, &[len as u64], device.clone()).expect("add");
            let path = dir.path().join(format!("c{i}"));
            io.save_checkpoint(ck, &path).expect("save").wait().expect("durable");
            let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
            assert!(loaded.get("dev").expect("tensor").data[..] == device.bytes[..]);
            devices.push(device);
        }
        let mut ck = OwnedCheckpoint::new();
        ck.add_bytes("host", Dtype::U8, &[3], vec![1u8, 2, 3]).expect("add");
        io.save_checkpoint(ck, dir.path().join("host")).expect("save").wait().expect("durable");
        for d in &devices {
            assert_eq!(d.unregistered_copies.load(Ordering::SeqCst), 0, "a copy into pageable memory");
        }
        assert_eq!(registrar.counts(), (2, 1, 1), "registered once per area, the replaced one unlocked");
        assert!(lock(&io.shared.state).snapshots.iter().any(SnapshotArea::is_registered));
        drop(io);
        assert_eq!(registrar.counts(), (2, 2, 0), "the kept area is unlocked when the wrapper goes");
        registrar.assert_sound();
    }

    #[test]
    fn a_refused_registration_leaves_the_area_pageable_and_the_save_correct() {
        let registrar = FakeRegistrar::refusing(vec![1]);
        let dir = tempfile::tempdir().expect("tempdir");
        let io = AsyncCheckpointIO::new(
            UringCheckpointIO::new(Config::default()).expect("io"),
            AsyncOptions { mode: AsyncMode::Snapshot, max_saves_in_flight: 1, ..AsyncOptions::default() },
        )
        .expect("async io");
        let device = Arc::new(FakeDevice::new(pattern(1, 5000), registrar.clone(), Duration::ZERO));
        let mut ck = OwnedCheckpoint::new();
        ck.add("dev", Dtype::U8, &[5000], device.clone()).expect("add");
        io.save_checkpoint(ck, dir.path().join("c")).expect("save").wait().expect("durable");
        let loaded = io.load_checkpoint(dir.path().join("c"), &LoadOptions::default()).expect("load");
        assert!(loaded.get("dev").expect("tensor").data[..] == device.bytes[..]);
        drop(io);
        assert_eq!(registrar.counts(), (1, 0, 0));
        registrar.assert_sound();
    }

    fn snapshot_io(max: usize, nice: u32) -> AsyncCheckpointIO<UringCheckpointIO> {
        let config =
            Config::builder().chunk_size(1 << 20).staging_pool_size(8 << 20).build().expect("config");
        AsyncCheckpointIO::new(
            UringCheckpointIO::new(config).expect("io"),
            AsyncOptions { mode: AsyncMode::Snapshot, max_saves_in_flight: max, background_nice: nice },
        )
        .expect("async io")
    }

    /// Saves `tensors` (name, bytes) at `path` and checks what loads back.
    fn save_and_check(io: &AsyncCheckpointIO<UringCheckpointIO>, path: &Path, tensors: &[(&str, Vec<u8>)]) {
        let mut ck = OwnedCheckpoint::new();
        for (name, bytes) in tensors {
            ck.add_bytes(*name, Dtype::U8, &[bytes.len() as u64], bytes.clone()).expect("add");
        }
        io.save_checkpoint(ck, path).expect("save").wait().expect("durable");
        let loaded = io.load_checkpoint(path, &LoadOptions::default()).expect("load");
        for (name, bytes) in tensors {
            assert!(loaded.get(name).expect("tensor").data[..] == bytes[..], "{name}");
        }
    }

    fn kept(io: &AsyncCheckpointIO<UringCheckpointIO>) -> Vec<(usize, Option<i32>)> {
        lock(&io.shared.state).snapshots.iter().map(SnapshotArea::probe).collect()
    }

    #[test]
    fn a_reservation_faults_an_area_in_that_the_first_save_uses_then_trims() {
        let io = snapshot_io(1, 10);
        let reserve = 24 << 20;
        io.reserve_snapshot(reserve).expect("reserve");
        let stats = io.snapshot_stats();
        assert_eq!((stats.areas, stats.in_use, stats.pending_bytes), (1, 0, 0), "{stats:?}");
        assert_eq!(stats.reserved_bytes, reserve as u64, "made at once");
        io.wait_reserved();
        let stats = io.snapshot_stats();
        assert!(!stats.reserving, "{stats:?}");
        assert_eq!(stats.resident_bytes, stats.reserved_bytes, "every page faulted in by the helper");
        let [(address, nice)] = kept(&io)[..] else { panic!("one area") };
        assert!(nice.expect("a helper ran") >= 10, "the helper ran at background_nice: {nice:?}");
        io.reserve_snapshot(reserve - 4096).expect("smaller: nothing to do");
        assert_eq!(io.snapshot_stats().areas, 1);

        let dir = tempfile::tempdir().expect("tempdir");
        let tensors = [("a", pattern(1, (5 << 20) + 3)), ("b", pattern(2, 3 << 20))];
        save_and_check(&io, &dir.path().join("c"), &tensors);
        let stats = io.snapshot_stats();
        assert_eq!((stats.areas, stats.in_use), (1, 0), "the save used the reserved area: {stats:?}");
        assert_eq!(stats.reserved_bytes, 10 << 20, "trimmed to the checkpoint, rounded up to 2 MiB");
        assert_eq!(kept(&io)[0].0, address, "the same memory, not a fresh area");
        assert_eq!(stats.resident_bytes, stats.reserved_bytes);
        // Later saves keep the area as it is.
        save_and_check(&io, &dir.path().join("d"), &[("a", pattern(3, 1 << 20))]);
        assert_eq!(io.snapshot_stats().reserved_bytes, 10 << 20);
    }

    #[test]
    fn a_save_during_a_reservation_takes_the_area_over_and_is_correct() {
        let dir = tempfile::tempdir().expect("tempdir");
        for round in 0..3u8 {
            let io = snapshot_io(1, 19);
            io.reserve_snapshot(256 << 20).expect("reserve");
            let tensors = [("x", pattern(round, (40 << 20) + 11)), ("y", pattern(round + 7, 1000))];
            save_and_check(&io, &dir.path().join(format!("c{round}")), &tensors);
            let stats = io.snapshot_stats();
            assert_eq!((stats.areas, stats.in_use), (1, 0), "one area, never a second: {stats:?}");
            assert!(!stats.reserving, "the save stopped the helper");
            assert_eq!(stats.reserved_bytes, 42 << 20, "trimmed to the save's size");
        }
    }

    #[test]
    fn a_kept_area_grows_keeping_its_pages() {
        let io = snapshot_io(1, 10);
        io.reserve_snapshot(4 << 20).expect("reserve");
        io.wait_reserved();
        io.reserve_snapshot(16 << 20).expect("grow");
        io.wait_reserved();
        let stats = io.snapshot_stats();
        assert_eq!(
            (stats.areas, stats.reserved_bytes, stats.resident_bytes),
            (1, 16 << 20, 16 << 20),
            "{stats:?}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        // Larger than the reservation: the save grows the area (only the tail is fresh).
        save_and_check(&io, &dir.path().join("c"), &[("big", pattern(9, (20 << 20) + 5))]);
        let stats = io.snapshot_stats();
        assert_eq!(stats.areas, 1);
        assert_eq!(stats.reserved_bytes, ((20 << 20) + 5usize).next_multiple_of(4096) as u64);
    }

    #[test]
    fn a_reservation_waits_for_an_area_in_use_and_grows_it_when_it_comes_back() {
        let registrar = FakeRegistrar::new();
        let io = snapshot_io(1, 10);
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 3 << 20;
        let device = Arc::new(FakeDevice::new(pattern(4, len), registrar, Duration::from_millis(2)));
        let mut ck = OwnedCheckpoint::new();
        ck.add("dev", Dtype::U8, &[len as u64], device.clone()).expect("add");
        let handle = io.save_checkpoint(ck, dir.path().join("c")).expect("save");
        handle.staged().wait();
        io.reserve_snapshot(12 << 20).expect("reserve");
        let during = io.snapshot_stats();
        handle.wait().expect("durable");
        if during.in_use == 1 {
            assert_eq!((during.areas, during.pending_bytes), (0, 12 << 20), "no second area: {during:?}");
        }
        io.wait_reserved();
        let stats = io.snapshot_stats();
        assert_eq!((stats.areas, stats.in_use, stats.pending_bytes), (1, 0, 0), "{stats:?}");
        assert_eq!((stats.reserved_bytes, stats.resident_bytes), (12 << 20, 12 << 20));
    }

    #[test]
    fn reserving_needs_snapshot_mode() {
        let io = AsyncCheckpointIO::new(
            UringCheckpointIO::new(Config::default()).expect("io"),
            AsyncOptions { mode: AsyncMode::Stream, ..AsyncOptions::default() },
        )
        .expect("async io");
        assert!(matches!(io.reserve_snapshot(1 << 20), Err(Error::Config(_))));
        assert_eq!(io.snapshot_stats(), SnapshotStats::default());
    }

    /// A checkpoint IO that records the nice value of the thread that saves, and of a
    /// thread that one starts, then saves through `UringCheckpointIO`.
    struct NiceProbe {
        inner: UringCheckpointIO,
        seen: Mutex<Vec<(i32, i32)>>,
    }

    impl CheckpointIO for NiceProbe {
        fn save_checkpoint(&self, checkpoint: &Checkpoint<'_>, path: &Path) -> Result<SaveReport> {
            use crate::io::threads::{nice_of, thread_id};
            let own = nice_of(thread_id()).expect("nice");
            let child = std::thread::spawn(|| nice_of(thread_id()).expect("nice")).join().expect("join");
            lock(&self.seen).push((own, child));
            self.inner.save_checkpoint(checkpoint, path)
        }
        fn load_checkpoint(
            &self,
            path: &Path,
            options: &LoadOptions,
        ) -> Result<crate::checkpoint::LoadedCheckpoint> {
            self.inner.load_checkpoint(path, options)
        }
        fn remove_checkpoint(&self, path: &Path) -> Result<()> {
            self.inner.remove_checkpoint(path)
        }
    }

    /// A host-like source that records the nice value of the threads copying it.
    struct NiceSource {
        bytes: Vec<u8>,
        seen: Mutex<Vec<i32>>,
    }

    impl TensorSource for NiceSource {
        fn len(&self) -> usize {
            self.bytes.len()
        }
        fn host_bytes(&self) -> Option<&[u8]> {
            None
        }
        fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
            use crate::io::threads::{nice_of, thread_id};
            lock(&self.seen).push(nice_of(thread_id()).expect("nice"));
            dst.copy_from_slice(&self.bytes[offset..offset + dst.len()]);
            Ok(())
        }
    }

    #[test]
    fn the_write_runs_at_background_nice_the_copy_at_the_callers_priority() {
        use crate::io::threads::{nice_of, thread_id};
        let caller = nice_of(thread_id()).expect("nice");
        let dir = tempfile::tempdir().expect("tempdir");
        for nice in [0u32, 13] {
            let probe = NiceProbe {
                inner: UringCheckpointIO::new(Config::default()).expect("io"),
                seen: Mutex::new(Vec::new()),
            };
            let io = AsyncCheckpointIO::new(
                probe,
                AsyncOptions { mode: AsyncMode::Snapshot, max_saves_in_flight: 1, background_nice: nice },
            )
            .expect("async io");
            let source = Arc::new(NiceSource { bytes: pattern(5, 3 << 20), seen: Mutex::new(Vec::new()) });
            let mut ck = OwnedCheckpoint::new();
            ck.add("t", Dtype::U8, &[3 << 20], source.clone()).expect("add");
            io.save_checkpoint(ck, dir.path().join(format!("n{nice}")))
                .expect("save")
                .wait()
                .expect("durable");
            let want = caller.max(nice as i32);
            assert_eq!(
                lock(&io.inner().seen)[..],
                [(want, want)],
                "the save's thread and the threads it starts"
            );
            let copies = lock(&source.seen).clone();
            assert!(
                !copies.is_empty() && copies.iter().all(|&n| n == caller),
                "copies before staged: {copies:?}"
            );
        }
        assert_eq!(nice_of(thread_id()).expect("nice"), caller, "the caller's own priority is untouched");
    }
}
