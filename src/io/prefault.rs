//! Faulting a fresh read destination in on a helper thread, ahead of the reads.
//!
//! A fresh destination (a load's new tensors) is otherwise faulted in, page by page and
//! zeroed, by whoever pins it for the direct read: the thread that submits the reads (inside
//! `io_uring_enter`), serially with the submissions. On the RAM-backed XFS that zeroing was
//! 85% of a load's CPU samples. The helper ([`Frontier::fault_in`]) faults the destination
//! in with `MADV_POPULATE_WRITE`, in order, and publishes how far it got; the reader issues a
//! piece only once the helper is past it ([`Frontier::reached`], [`Frontier::wait_for`]), so
//! the zeroing runs on the helper's core while the device reads what is already faulted.
//! `MADV_POPULATE_WRITE` only maps and zeroes pages not yet present and leaves the contents
//! of present ones alone, so it never races with data. Best effort: a kernel without it
//! (before 5.14) or a mapping that refuses it makes the helper give up and open the whole
//! range at once, and the reads fault the rest in themselves.
//!
//! [`fault_in_owned`] does the same for memory that nothing else touches while it runs (a
//! snapshot area reserved ahead of a save): there, where `MADV_POPULATE_WRITE` is refused,
//! writing back the first byte of each page faults it in without changing a byte.
//!
//! Huge or 4 KiB pages ([`Pages::Chosen`]): a fresh destination of the reader's caller's own
//! is faulted in with whichever page size faults in faster on this machine at this moment,
//! measured step by step ([`PageChoice`]). Huge pages usually win (on the 2-vCPU VM of the
//! README, 5.3 against 2.9 GiB/s), except where the free huge pages are slow to hand out: in a
//! virtual machine whose balloon reports free memory to the host (virtio-balloon free page
//! reporting, as under Firecracker), every free block of 2 MiB or more is given back to the
//! host after a few seconds, and the next huge page made of it faults in on the host too
//! (0.75-1.0 GiB/s there, while 4 KiB pages come from smaller free blocks, never reported:
//! 2.5 GiB/s); or where the kernel must compact memory first.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::aligned::HUGE_PAGE;

/// Reads at least this large fault their destination in on a helper thread; below it a
/// thread costs more than it saves.
pub(crate) const PREFAULT_MIN: usize = 32 << 20;

/// Helper threads faulting one destination in. Two were no faster than one here (ext4 on
/// the 2-vCPU VM, alternating runs: medians 955 against 1016 MiB/s with builds running).
pub(crate) const PREFAULT_HELPERS: usize = 1;

/// Bytes the helper faults in per `madvise` call (and publishes at once).
const STEP: usize = 8 << 20;

/// Whose choice the page size of a read's destination is while it is faulted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    /// The caller's: the memory keeps the advice it has (`MADV_HUGEPAGE` or not).
    Kept,
    /// The read's: the destination is a fresh mapping of the caller's own that nothing has
    /// touched yet (an [`AlignedBuf`](super::AlignedBuf) just allocated), and the helper
    /// faulting it in ahead of the reads advises each step for huge or 4 KiB pages, whichever
    /// faults in faster here ([`PageChoice`]).
    Chosen,
}

/// A page size to fault a step in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PageKind {
    /// Transparent huge pages (`MADV_HUGEPAGE`).
    Huge,
    /// 4 KiB pages (`MADV_NOHUGEPAGE`).
    Small,
}

impl PageKind {
    fn other(self) -> PageKind {
        match self {
            PageKind::Huge => PageKind::Small,
            PageKind::Small => PageKind::Huge,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The page size that faulted in faster in the last destination of this process (0: none
/// measured yet, 1: huge, 2: small): the next destination starts with it.
static LAST_FASTER: AtomicU8 = AtomicU8::new(0);

/// Every this many steps, one step is faulted in with the page size that was slower, so that
/// a change (free huge pages running out, or coming back) is seen within
/// `REPROBE_EVERY * STEP` bytes (128 MiB).
const REPROBE_EVERY: usize = 16;

/// Which page size each step of one destination is faulted in with: the first step with
/// the one that was faster last time (huge pages at first), the second with the other; from
/// then on the faster of the two by their last measured step, and every
/// [`REPROBE_EVERY`]th step the slower one again, to see whether it still is.
#[derive(Debug)]
pub(crate) struct PageChoice {
    /// The kind of the first step.
    first: PageKind,
    /// Seconds per byte of the last step of each kind, by [`PageKind::index`].
    cost: [Option<f64>; 2],
    steps: usize,
    /// Bytes faulted in with each kind.
    bytes: [usize; 2],
}

impl PageChoice {
    /// A choice whose first step uses `first`.
    pub fn starting_with(first: PageKind) -> PageChoice {
        PageChoice { first, cost: [None, None], steps: 0, bytes: [0, 0] }
    }

    /// A choice that starts with the kind that was faster in this process's last
    /// destination (huge pages if none was measured).
    pub fn starting_with_last_faster() -> PageChoice {
        let first = match LAST_FASTER.load(Ordering::Relaxed) {
            2 => PageKind::Small,
            _ => PageKind::Huge,
        };
        PageChoice::starting_with(first)
    }

    /// The kind for the next step.
    pub fn next(&mut self) -> PageKind {
        let kind = match self.cost {
            [None, None] => self.first,
            [Some(_), None] => PageKind::Small,
            [None, Some(_)] => PageKind::Huge,
            [Some(_), Some(_)] => {
                let faster = self.faster().unwrap_or(self.first);
                if self.steps % REPROBE_EVERY == REPROBE_EVERY - 1 {
                    faster.other()
                } else {
                    faster
                }
            }
        };
        self.steps += 1;
        kind
    }

    /// Books a step of `kind`: `bytes` faulted in in `seconds`.
    pub fn record(&mut self, kind: PageKind, bytes: usize, seconds: f64) {
        if bytes == 0 {
            return;
        }
        self.cost[kind.index()] = Some(seconds / bytes as f64);
        self.bytes[kind.index()] += bytes;
        if let Some(faster) = self.faster() {
            LAST_FASTER.store(if faster == PageKind::Huge { 1 } else { 2 }, Ordering::Relaxed);
        }
    }

    /// The kind that faulted in faster, once both were measured (huge pages on a tie).
    fn faster(&self) -> Option<PageKind> {
        match self.cost {
            [Some(huge), Some(small)] => Some(if small < huge { PageKind::Small } else { PageKind::Huge }),
            _ => None,
        }
    }

    /// Bytes faulted in with huge and with 4 KiB pages.
    pub fn bytes(&self) -> (usize, usize) {
        (self.bytes[PageKind::Huge.index()], self.bytes[PageKind::Small.index()])
    }
}

/// How far a helper has faulted a destination in, shared with the reader.
pub(crate) struct Frontier {
    len: usize,
    pages: Pages,
    /// The page size of each step, when [`Pages::Chosen`].
    choice: Mutex<PageChoice>,
    /// Bytes from the start of the destination faulted in (all of it once the helper is done
    /// or gave up).
    faulted: AtomicUsize,
    stop: AtomicBool,
    /// The next step to claim (helpers share the work, step by step).
    next: AtomicUsize,
    /// `done[i]`: step `i` is faulted in.
    done: Vec<AtomicBool>,
    /// Steps from the first all faulted in (guarded: one helper advances it at a time).
    contiguous: std::sync::Mutex<usize>,
    /// The reader, woken after each step.
    reader: Thread,
}

impl Frontier {
    /// A frontier for a destination of `len` bytes, owned by the calling (reading) thread.
    pub fn new(len: usize, pages: Pages) -> Frontier {
        // One step more than `len / STEP` covers the rounding of the start down to a huge
        // page.
        let steps = len / STEP + 2;
        Frontier {
            len,
            pages,
            choice: Mutex::new(PageChoice::starting_with_last_faster()),
            faulted: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            next: AtomicUsize::new(0),
            done: (0..steps).map(|_| AtomicBool::new(false)).collect(),
            contiguous: std::sync::Mutex::new(0),
            reader: std::thread::current(),
        }
    }

    /// A helper: faults `[start, start + len)` in, claiming steps in order (several helpers
    /// may share the work) and publishing the prefix that is all in, until done, stopped or
    /// refused. A refusal or a stop opens the whole range. Steps start on huge-page
    /// boundaries (the first one at the start's page), so that each step's advice covers
    /// whole huge pages.
    pub fn fault_in(&self, start: usize) {
        let first_page = start & !(4096 - 1);
        let origin = start & !(HUGE_PAGE - 1);
        let end = start + self.len;
        loop {
            let step = self.next.fetch_add(1, Ordering::Relaxed);
            let at = (origin + step * STEP).max(first_page);
            if at >= end || step >= self.done.len() {
                break;
            }
            let n = (origin + (step + 1) * STEP).min(end) - at;
            if self.stop.load(Ordering::Relaxed) || !self.fault_step(at, n) {
                self.stop.store(true, Ordering::Relaxed);
                self.faulted.store(self.len, Ordering::Release);
                break;
            }
            self.done[step].store(true, Ordering::Release);
            let mut contiguous = self.contiguous.lock().unwrap_or_else(|p| p.into_inner());
            while *contiguous < self.done.len() && self.done[*contiguous].load(Ordering::Acquire) {
                *contiguous += 1;
            }
            let reached = (origin + *contiguous * STEP).saturating_sub(start).min(self.len);
            self.faulted.fetch_max(reached, Ordering::AcqRel);
            drop(contiguous);
            self.reader.unpark();
        }
        self.reader.unpark();
    }

    /// Faults `[at, at + n)` in, with the page size [`PageChoice`] picks when the pages are
    /// the read's to choose; false where refused.
    fn fault_step(&self, at: usize, n: usize) -> bool {
        if self.pages == Pages::Kept {
            return populate(at, n);
        }
        populate_chosen_step(&self.choice, at, n)
    }

    /// Bytes faulted in with huge and with 4 KiB pages, when [`Pages::Chosen`].
    pub fn page_bytes(&self) -> (usize, usize) {
        self.choice.lock().unwrap_or_else(|p| p.into_inner()).bytes()
    }

    /// Whether the first `end` bytes are faulted in (or the helper is done).
    pub fn reached(&self, end: usize) -> bool {
        self.faulted.load(Ordering::Acquire) >= end.min(self.len)
    }

    /// Waits until [`Frontier::reached`]`(end)`.
    pub fn wait_for(&self, end: usize) {
        while !self.reached(end) {
            std::thread::park_timeout(Duration::from_millis(1));
        }
    }

    /// Tells the helpers to stop (the reads are over): the whole range opens.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.faulted.store(self.len, Ordering::Release);
    }
}

/// Faults one step, `[at, at + n)`, in with `MADV_POPULATE_WRITE`, advised first for the
/// page size `choice` picks ([`PageChoice::next`]) and timed for it
/// ([`PageChoice::record`]); false where the kernel refuses (nothing is booked). The range
/// must lie in memory whose page size is the caller's to choose (see [`advise`]).
fn populate_chosen_step(choice: &Mutex<PageChoice>, at: usize, n: usize) -> bool {
    let kind = choice.lock().unwrap_or_else(|p| p.into_inner()).next();
    advise(at, n, kind);
    let started = Instant::now();
    let faulted = populate(at, n);
    if faulted {
        let seconds = started.elapsed().as_secs_f64();
        choice.lock().unwrap_or_else(|p| p.into_inner()).record(kind, n, seconds);
    }
    faulted
}

/// Faults `[at, at + len)` in with `MADV_POPULATE_WRITE`, step by step (steps of up to 8 MiB
/// that end on huge-page boundaries, so that each step's advice covers whole huge pages
/// inside the range), each step advised for the page size `choice` picks and timed for it,
/// as a fresh load's helper does ([`Frontier::fault_in`]). Several threads may share one
/// `choice`. Returns false where the kernel refuses `MADV_POPULATE_WRITE` (before Linux
/// 5.14): the rest of the range is left as it is, to be faulted in by whoever writes it.
///
/// The range must lie in a mapping of the caller's own that nothing has faulted in yet (a
/// fresh [`AlignedBuf`](super::AlignedBuf), or the new tail of a grown one), since its
/// advice changes (see [`advise`]). No byte changes: pages already present are left alone
/// (and then the step's timing means little), so others may write the range meanwhile.
pub(crate) fn populate_chosen(choice: &Mutex<PageChoice>, at: usize, len: usize) -> bool {
    let end = at + len;
    let mut p = at;
    while p < end {
        let step_end = ((p & !(HUGE_PAGE - 1)) + STEP).min(end);
        if !populate_chosen_step(choice, p, step_end - p) {
            return false;
        }
        p = step_end;
    }
    true
}

/// Faults staging buffers in on a helper thread while the reads that use them start (a
/// process's first load in place pays for its whole staging pool otherwise, on the thread
/// that submits the reads: the kernel faults a buffer in when it pins it). Each
/// `(address, length)`, in order, in steps of [`STEP`] with `MADV_POPULATE_WRITE`, until
/// done, refused or `stop`. No byte and no advice changes; pages already present (a buffer
/// used before) cost a page-table walk, and a page the kernel pins for a read meanwhile is
/// simply present.
///
/// # Safety
/// Every span must be memory mapped for the caller (staging buffers it holds) that stays
/// mapped until this returns.
pub(crate) unsafe fn fault_in_spans(spans: &[(usize, usize)], stop: &AtomicBool) {
    for &(at, len) in spans {
        let mut done = 0;
        while done < len {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let n = STEP.min(len - done);
            if !populate(at + done, n) {
                return;
            }
            done += n;
        }
    }
}

/// Bytes [`fault_in_owned`] faults in per step: between two steps it looks at its stop
/// flag, so whoever stops it waits for one step at most.
pub(crate) const RESERVE_STEP: usize = 2 << 20;

/// [`fault_in_owned`] times its chosen steps in groups of this many (8 MiB, a fresh load's
/// step): one 2 MiB step is too short to time.
const RESERVE_GROUP: usize = STEP / RESERVE_STEP;

/// Faults `[start, start + len)` in, in steps of [`RESERVE_STEP`], until done or `stop` is
/// set, publishing in `faulted` the bytes done from `start`. `MADV_POPULATE_WRITE` where the
/// kernel has it, else the first byte of each page read and written back. No byte changes;
/// pages already present cost a page-table walk.
///
/// From `choose_from` bytes on (`len` or more: nowhere) the memory is fresh and its page
/// size is the caller's to choose: there each group of [`RESERVE_GROUP`] steps is advised
/// for the page size [`PageChoice`] picks (seeded by the last destination's faster one) and
/// timed for it; before it the memory keeps its advice. Returns the bytes done, and those
/// faulted in with huge and with 4 KiB pages (as [`PageChoice::bytes`]).
///
/// # Safety
/// `[start, start + len)` must be initialised memory of a live mapping owned by the caller,
/// which nothing else reads or writes until this returns; from `choose_from` on, memory of
/// a mapping of the caller's own that nothing has faulted in yet (its advice changes).
pub(crate) unsafe fn fault_in_owned(
    start: usize,
    len: usize,
    choose_from: usize,
    stop: &AtomicBool,
    faulted: &AtomicUsize,
) -> (usize, (usize, usize)) {
    let page = 4096usize;
    let mut populate_works = true;
    let mut done = 0usize;
    let mut choice = PageChoice::starting_with_last_faster();
    // The group being timed: its kind, start, bytes and steps so far.
    let mut group: Option<(PageKind, Instant, usize, usize)> = None;
    while done < len && !stop.load(Ordering::Relaxed) {
        let n = RESERVE_STEP.min(len - done);
        let at = start + done;
        if populate_works && done + n > choose_from {
            // The chosen part of the step, from its first page.
            let from = (start + choose_from.max(done)) & !(page - 1);
            let (kind, _, bytes, steps) = group.get_or_insert_with(|| (choice.next(), Instant::now(), 0, 0));
            advise(from, at + n - from, *kind);
            if populate(from, at + n - from) {
                *bytes += at + n - from;
                *steps += 1;
            } else {
                populate_works = false;
                group = None;
            }
            if let Some((kind, started, bytes, steps)) = group {
                if steps == RESERVE_GROUP || done + n == len {
                    choice.record(kind, bytes, started.elapsed().as_secs_f64());
                    group = None;
                }
            }
        } else if populate_works && !populate(at & !(page - 1), n + (at & (page - 1))) {
            populate_works = false;
        }
        if !populate_works {
            // The first byte of every page the step touches (and the step's own first byte).
            let mut p = at;
            while p < at + n {
                // SAFETY: p lies in the caller's initialised memory, which nothing else
                // accesses (this function's contract); writing back what it holds changes
                // nothing.
                unsafe { std::ptr::write_volatile(p as *mut u8, std::ptr::read_volatile(p as *const u8)) };
                p = (p & !(page - 1)) + page;
            }
        }
        done += n;
        faulted.store(done, Ordering::Release);
    }
    if let Some((kind, started, bytes, _)) = group {
        // Stopped within a group: what it did.
        choice.record(kind, bytes, started.elapsed().as_secs_f64());
    }
    (done, choice.bytes())
}

/// Advises `[at, at + len)` for huge or for 4 KiB pages (a hint: where refused, the pages
/// are what the mapping had). The range must lie in a mapping of the caller's own whose page
/// size is the caller's to choose; no byte changes, but the advice splits the mapping where
/// it differs from its neighbours' (see [`AlignedBuf::grow`](super::AlignedBuf::grow)).
fn advise(at: usize, len: usize, kind: PageKind) {
    #[cfg(target_os = "linux")]
    {
        let advice = match kind {
            PageKind::Huge => libc::MADV_HUGEPAGE,
            PageKind::Small => libc::MADV_NOHUGEPAGE,
        };
        // SAFETY: the range lies in the destination, a mapping of the caller's own
        // ([`Pages::Chosen`]); the advice changes which pages back it, never its bytes.
        unsafe { libc::madvise(at as *mut libc::c_void, len, advice) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (at, len, kind);
}

/// Whether this kernel refuses `MADV_POPULATE_WRITE` (before Linux 5.14), saying so: the
/// tests that need it skip then.
#[cfg(test)]
pub(crate) fn populate_refused() -> bool {
    let mut probe = super::AlignedBuf::zeroed(HUGE_PAGE, 4096);
    let refused = !populate(probe.as_mut_ptr() as usize, HUGE_PAGE);
    if refused {
        eprintln!("skipped: this kernel refuses MADV_POPULATE_WRITE (before Linux 5.14)");
    }
    refused
}

/// `MADV_POPULATE_WRITE` over `[at, at + len)`; false where refused.
fn populate(at: usize, len: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the range lies in memory mapped for the caller's destination (rounded down
        // to its first page, which holds destination bytes); POPULATE_WRITE changes no byte
        // of it, it only populates page tables as a write fault would.
        unsafe { libc::madvise(at as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (at, len);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::AlignedBuf;

    #[test]
    fn the_reader_waits_for_the_helper_and_the_helper_leaves_the_bytes_alone() {
        let mut buf = AlignedBuf::zeroed_pages(PREFAULT_MIN + 12345, 4096);
        buf.as_full_mut_slice()[..4].copy_from_slice(b"keep");
        let len = buf.capacity();
        let frontier = Frontier::new(len, Pages::Kept);
        assert!(frontier.reached(0) && !frontier.reached(1), "nothing faulted yet");
        let addr = buf.as_mut_ptr() as usize;
        std::thread::scope(|scope| {
            scope.spawn(|| frontier.fault_in(addr));
            frontier.wait_for(STEP + 1);
            assert!(frontier.reached(STEP + 1));
            frontier.wait_for(usize::MAX);
        });
        assert!(frontier.reached(len), "done: the whole range is open");
        assert_eq!(&buf.as_full_mut_slice()[..4], b"keep", "POPULATE_WRITE changes no byte");
    }

    #[test]
    fn helpers_share_the_work_and_the_frontier_is_the_prefix_all_in() {
        let mut buf = AlignedBuf::zeroed_pages(10 * STEP + 4096, 4096);
        let frontier = Frontier::new(buf.capacity(), Pages::Kept);
        let addr = buf.as_mut_ptr() as usize;
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| frontier.fault_in(addr));
            }
            frontier.wait_for(usize::MAX);
        });
        assert!(frontier.reached(buf.capacity()));
        assert!(frontier.done.iter().take(11).all(|d| d.load(Ordering::Relaxed)), "every step faulted once");
    }

    #[test]
    fn a_reservation_faults_every_page_in_and_stops_when_told() {
        let buf = AlignedBuf::zeroed_pages(3 * RESERVE_STEP + 5000, 4096);
        assert_eq!(buf.resident_bytes(), 0, "fresh mapping: nothing faulted yet");
        let (stop, faulted) = (AtomicBool::new(false), AtomicUsize::new(0));
        let len = buf.capacity();
        // SAFETY: the buffer is fresh (zeroed) and nothing else touches it meanwhile.
        let (done, chosen) = unsafe { fault_in_owned(buf.as_ptr() as usize, len, len, &stop, &faulted) };
        assert_eq!((done, faulted.load(Ordering::Acquire)), (len, len));
        assert_eq!(chosen, (0, 0), "nothing of it was fresh to choose");
        assert_eq!(buf.resident_bytes(), len, "every page is faulted in");
        assert!(buf.as_full_slice().iter().all(|&b| b == 0), "and still zero");

        let other = AlignedBuf::zeroed_pages(4 * RESERVE_STEP, 4096);
        stop.store(true, Ordering::Relaxed);
        // SAFETY: as above.
        let (done, _) =
            unsafe { fault_in_owned(other.as_ptr() as usize, other.capacity(), 0, &stop, &faulted) };
        assert_eq!(done, 0, "a stopped reservation does nothing more");
        assert_eq!(other.resident_bytes(), 0);
    }

    #[test]
    fn a_reservation_chooses_page_sizes_for_its_fresh_part_only() {
        if populate_refused() {
            return;
        }
        let (stop, faulted) = (AtomicBool::new(false), AtomicUsize::new(0));
        let mut buf = AlignedBuf::zeroed(10 * RESERVE_STEP + 8192, 4096);
        buf.as_full_mut_slice()[..4].copy_from_slice(b"keep");
        let len = buf.capacity();
        // SAFETY: the buffer is fresh (zeroed) and nothing else touches it meanwhile.
        let (done, (huge, small)) = unsafe { fault_in_owned(buf.as_ptr() as usize, len, 0, &stop, &faulted) };
        assert_eq!(done, len);
        assert_eq!(huge + small, len, "every step chosen and booked");
        assert!(huge > 0 && small > 0, "both sizes measured: {huge} huge, {small} small");
        assert_eq!(buf.resident_bytes(), len);
        assert_eq!(&buf.as_full_slice()[..4], b"keep", "no byte changes");
        assert!(buf.as_full_slice()[4..].iter().all(|&b| b == 0));

        // A grown buffer's head is faulted in already: only its tail is chosen (from a page
        // boundary inside a step).
        let other = AlignedBuf::zeroed(12 * RESERVE_STEP, 4096);
        let head = 3 * RESERVE_STEP + 3 * 4096;
        // SAFETY: as above.
        let (done, (huge, small)) =
            unsafe { fault_in_owned(other.as_ptr() as usize, other.capacity(), head, &stop, &faulted) };
        assert_eq!((done, huge + small), (other.capacity(), other.capacity() - head));
    }

    #[test]
    fn the_choice_measures_both_page_sizes_then_keeps_the_faster_and_looks_again() {
        let mut choice = PageChoice::starting_with(PageKind::Huge);
        assert_eq!(choice.next(), PageKind::Huge, "first: the seed");
        choice.record(PageKind::Huge, STEP, 0.010); // 0.8 GiB/s: a host-faulted huge page
        assert_eq!(choice.next(), PageKind::Small, "second: the other size");
        choice.record(PageKind::Small, STEP, 0.003);
        let kinds: Vec<PageKind> = (2..REPROBE_EVERY + 2).map(|_| choice.next()).collect();
        // Steps 2..=14 the faster (small); step 15 looks at huge pages again.
        assert!(kinds[..REPROBE_EVERY - 3].iter().all(|&k| k == PageKind::Small), "{kinds:?}");
        assert_eq!(kinds[REPROBE_EVERY - 3], PageKind::Huge, "{kinds:?}");
        assert_eq!(kinds[REPROBE_EVERY - 2], PageKind::Small, "{kinds:?}");
        // Huge pages are fast again: from the next step on they are kept.
        choice.record(PageKind::Huge, STEP, 0.001);
        assert_eq!(choice.next(), PageKind::Huge);
        assert_eq!(choice.bytes(), (2 * STEP, STEP));
        // A seed of 4 KiB pages starts with them and measures huge pages second.
        let mut small_first = PageChoice::starting_with(PageKind::Small);
        assert_eq!(small_first.next(), PageKind::Small);
        small_first.record(PageKind::Small, STEP, 0.003);
        assert_eq!(small_first.next(), PageKind::Huge);
    }

    #[test]
    fn a_chosen_destination_is_faulted_in_whole_with_both_sizes_measured_and_its_bytes_kept() {
        if populate_refused() {
            return;
        }
        let mut buf = AlignedBuf::zeroed(6 * STEP, 4096);
        buf.as_full_mut_slice()[..4].copy_from_slice(b"keep");
        // A destination that starts inside the buffer, off a huge-page boundary, as a
        // shard's rest after its first segment may.
        let skip = 3 * 4096 + 100;
        let len = buf.capacity() - skip;
        let frontier = Frontier::new(len, Pages::Chosen);
        let addr = buf.as_mut_ptr() as usize + skip;
        std::thread::scope(|scope| {
            scope.spawn(|| frontier.fault_in(addr));
            frontier.wait_for(usize::MAX);
        });
        assert!(frontier.reached(len));
        let (huge, small) = frontier.page_bytes();
        assert_eq!(huge + small, buf.capacity() - 3 * 4096, "every step from the start's page, once");
        assert!(huge > 0 && small > 0, "both sizes measured: {huge} huge, {small} small");
        // Pages 1 and 2 lie before the destination: in only if "keep" faulted a huge page.
        assert!(buf.resident_bytes() >= buf.capacity() - 2 * 4096, "every page of the destination is in");
        assert_eq!(&buf.as_full_mut_slice()[..4], b"keep", "advice and POPULATE_WRITE change no byte");
        assert!(buf.as_full_slice()[4..].iter().all(|&b| b == 0), "and the rest is still zero");
    }

    #[test]
    fn kept_pages_are_not_advised_or_counted() {
        let mut buf = AlignedBuf::zeroed_pages(3 * STEP, 4096);
        let frontier = Frontier::new(buf.capacity(), Pages::Kept);
        frontier.fault_in(buf.as_mut_ptr() as usize);
        assert!(frontier.reached(buf.capacity()));
        assert_eq!(frontier.page_bytes(), (0, 0), "the caller's pages: nothing chosen");
    }

    #[test]
    fn staging_spans_are_faulted_in_whole_keeping_their_bytes_and_a_stop_is_heeded() {
        let mut used = AlignedBuf::zeroed(2 * STEP, 4096);
        used.as_full_mut_slice()[..STEP].fill(0x5A); // a buffer used before: half in
        let fresh = AlignedBuf::zeroed_pages(STEP + 3 * 4096, 4096);
        let spans = [(used.as_ptr() as usize, used.capacity()), (fresh.as_ptr() as usize, fresh.capacity())];
        let stop = AtomicBool::new(false);
        // SAFETY: both buffers are ours and stay mapped for the call.
        unsafe { fault_in_spans(&spans, &stop) };
        if fresh.resident_bytes() == 0 {
            eprintln!("skipped: this kernel refuses MADV_POPULATE_WRITE (before Linux 5.14)");
            return;
        }
        assert_eq!((used.resident_bytes(), fresh.resident_bytes()), (used.capacity(), fresh.capacity()));
        assert!(used.as_full_slice()[..STEP].iter().all(|&b| b == 0x5A), "bytes written before kept");
        assert!(used.as_full_slice()[STEP..].iter().chain(fresh.as_full_slice()).all(|&b| b == 0));

        let other = AlignedBuf::zeroed_pages(2 * STEP, 4096);
        stop.store(true, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { fault_in_spans(&[(other.as_ptr() as usize, other.capacity())], &stop) };
        assert_eq!(other.resident_bytes(), 0, "stopped: nothing more faulted in");
    }

    #[test]
    fn a_stopped_helper_opens_the_whole_range() {
        let mut buf = AlignedBuf::zeroed_pages(4 * STEP, 4096);
        let frontier = Frontier::new(buf.capacity(), Pages::Kept);
        frontier.stop();
        frontier.fault_in(buf.as_mut_ptr() as usize);
        assert!(frontier.reached(buf.capacity()), "the reads go on, faulting pages themselves");
    }
}
