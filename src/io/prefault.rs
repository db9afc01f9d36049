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

/// Bytes the helper faults in per `madvise` call (and publishes at once).
const STEP: usize = 8 << 20;

/// How far a helper has faulted a destination in, shared with the reader.
pub(crate) struct Frontier {
    len: usize,
    /// Bytes from the start of the destination faulted in (all of it once the helper is done
    /// or gave up).
    faulted: AtomicUsize,
    stop: AtomicBool,
    /// The reader, woken after each step.
    reader: Thread,
}

impl Frontier {
    /// A frontier for a destination of `len` bytes, owned by the calling (reading) thread.
    pub fn new(len: usize) -> Frontier {
        Frontier {
            len,
            faulted: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            reader: std::thread::current(),
        }
    }

    /// The helper: faults `[start, start + len)` in, in steps, publishing each, until done,
    /// stopped or refused.
    pub fn fault_in(&self, start: usize) {
        let page = 4096usize;
        let first_page = start & !(page - 1);
        let end = start + self.len;
        let mut at = first_page;
        while at < end && !self.stop.load(Ordering::Relaxed) {
            let n = STEP.min(end - at);
            if !populate(at, n) {
                break;
            }
            at += n;
            self.faulted.store(at.saturating_sub(start).min(self.len), Ordering::Release);
            self.reader.unpark();
        }
        self.faulted.store(self.len, Ordering::Release);
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

    /// Tells the helper to stop (the reads are over).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
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
    fn a_stopped_helper_opens_the_whole_range() {
        let mut buf = AlignedBuf::zeroed_pages(4 * STEP, 4096);
        let frontier = Frontier::new(buf.capacity());
        frontier.stop();
        frontier.fault_in(buf.as_mut_ptr() as usize);
        assert!(frontier.reached(buf.capacity()), "the reads go on, faulting pages themselves");
    }
}
