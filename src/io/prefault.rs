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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::Thread;
use std::time::Duration;

/// Reads at least this large fault their destination in on a helper thread; below it a
/// thread costs more than it saves.
pub(crate) const PREFAULT_MIN: usize = 32 << 20;

/// Helper threads faulting one destination in. Two were no faster than one here (ext4 on
/// the 2-vCPU VM, alternating runs: medians 955 against 1016 MiB/s with builds running).
pub(crate) const PREFAULT_HELPERS: usize = 1;

/// Bytes the helper faults in per `madvise` call (and publishes at once).
const STEP: usize = 8 << 20;

/// How far a helper has faulted a destination in, shared with the reader.
pub(crate) struct Frontier {
    len: usize,
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
    pub fn new(len: usize) -> Frontier {
        // One step more than `len / STEP` covers the page rounding at the start.
        let steps = len / STEP + 2;
        Frontier {
            len,
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
    /// refused. A refusal or a stop opens the whole range.
    pub fn fault_in(&self, start: usize) {
        let first_page = start & !(4096 - 1);
        let end = start + self.len;
        loop {
            let step = self.next.fetch_add(1, Ordering::Relaxed);
            let at = first_page + step * STEP;
            if at >= end || step >= self.done.len() {
                break;
            }
            if self.stop.load(Ordering::Relaxed) || !populate(at, STEP.min(end - at)) {
                self.stop.store(true, Ordering::Relaxed);
                self.faulted.store(self.len, Ordering::Release);
                break;
            }
            self.done[step].store(true, Ordering::Release);
            let mut contiguous = self.contiguous.lock().unwrap_or_else(|p| p.into_inner());
            while *contiguous < self.done.len() && self.done[*contiguous].load(Ordering::Acquire) {
                *contiguous += 1;
            }
            let reached = (first_page + *contiguous * STEP).saturating_sub(start).min(self.len);
            self.faulted.fetch_max(reached, Ordering::AcqRel);
            drop(contiguous);
            self.reader.unpark();
        }
        self.reader.unpark();
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

/// Bytes [`fault_in_owned`] faults in per step: between two steps it looks at its stop
/// flag, so whoever stops it waits for one step at most.
pub(crate) const RESERVE_STEP: usize = 2 << 20;

/// Faults `[start, start + len)` in, in steps of [`RESERVE_STEP`], until done or `stop` is
/// set, publishing in `faulted` the bytes done from `start`. `MADV_POPULATE_WRITE` where the
/// kernel has it, else the first byte of each page read and written back. No byte changes;
/// pages already present cost a page-table walk. Returns the bytes done.
///
/// # Safety
/// `[start, start + len)` must be initialised memory of a live mapping owned by the caller,
/// which nothing else reads or writes until this returns.
pub(crate) unsafe fn fault_in_owned(
    start: usize,
    len: usize,
    stop: &AtomicBool,
    faulted: &AtomicUsize,
) -> usize {
    let page = 4096usize;
    let mut populate_works = true;
    let mut done = 0usize;
    while done < len && !stop.load(Ordering::Relaxed) {
        let n = RESERVE_STEP.min(len - done);
        let at = start + done;
        if populate_works && !populate(at & !(page - 1), n + (at & (page - 1))) {
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
    done
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
        let frontier = Frontier::new(len);
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
        let frontier = Frontier::new(buf.capacity());
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
        let done = unsafe { fault_in_owned(buf.as_ptr() as usize, len, &stop, &faulted) };
        assert_eq!((done, faulted.load(Ordering::Acquire)), (len, len));
        assert_eq!(buf.resident_bytes(), len, "every page is faulted in");
        assert!(buf.as_full_slice().iter().all(|&b| b == 0), "and still zero");

        let other = AlignedBuf::zeroed_pages(4 * RESERVE_STEP, 4096);
        stop.store(true, Ordering::Relaxed);
        // SAFETY: as above.
        let done = unsafe { fault_in_owned(other.as_ptr() as usize, other.capacity(), &stop, &faulted) };
        assert_eq!(done, 0, "a stopped reservation does nothing more");
        assert_eq!(other.resident_bytes(), 0);
    }

    #[test]
    fn a_stopped_helper_opens_the_whole_range() {
        let mut buf = AlignedBuf::zeroed_pages(4 * STEP, 4096);
        let frontier = Frontier::new(buf.capacity());
        frontier.stop();
        frontier.fault_in(buf.as_mut_ptr() as usize);
        assert!(frontier.reached(buf.capacity()), "the reads go on, faulting pages themselves");
    }
}
