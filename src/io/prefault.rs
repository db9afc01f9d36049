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
    fn a_stopped_helper_opens_the_whole_range() {
        let mut buf = AlignedBuf::zeroed_pages(4 * STEP, 4096);
        let frontier = Frontier::new(buf.capacity());
        frontier.stop();
        frontier.fault_in(buf.as_mut_ptr() as usize);
        assert!(frontier.reached(buf.capacity()), "the reads go on, faulting pages themselves");
    }
}
