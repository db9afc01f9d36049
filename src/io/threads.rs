//! The threads of a save run in the background: how many, and at which CPU priority.
//!
//! A background save lowers the priority of its own thread ([`lower_priority`]) once its
//! caller no longer waits for it (*staged*). Linux gives each new thread the nice value of
//! the thread that makes it, so every thread the save starts afterwards inherits it: shard
//! writers, the pwrite engine's workers, copy helpers, and io_uring's io-wq workers (made
//! from the thread that submits). [`SaveThreads::Background`] bounds how many of them run.

use std::io;

/// How many threads one save may run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SaveThreads {
    /// As many as help (a save the caller waits for): up to four shard writers (one per
    /// core), each of which may copy on a second thread; the engines as configured.
    #[default]
    Foreground,
    /// A save in the background: at most this many shard writers (at least one), none with
    /// a second copy thread, each io_uring ring with at most this many io-wq workers, the
    /// pwrite engine with at most this many threads.
    Background(u32),
}

impl SaveThreads {
    /// Shard writers at most, given `cores` (at least one).
    pub fn writers(self, cores: usize) -> usize {
        let by_cores = cores.clamp(1, 4);
        match self {
            SaveThreads::Foreground => by_cores,
            SaveThreads::Background(n) => by_cores.min((n as usize).max(1)),
        }
    }

    /// Whether a shard writer may split its copies over a second thread.
    pub fn may_split(self) -> bool {
        self == SaveThreads::Foreground
    }

    /// The cap on each io_uring ring's io-wq workers and on the pwrite engine's threads.
    pub fn engine_cap(self) -> Option<u32> {
        match self {
            SaveThreads::Foreground => None,
            SaveThreads::Background(n) => Some(n.max(1)),
        }
    }
}

/// The kernel's id of the calling thread.
pub fn thread_id() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// The nice value of thread `tid` of this process (field 19 of `/proc/self/task/<tid>/stat`).
pub fn nice_of(tid: i32) -> io::Result<i32> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold anything: count after it.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    rest.split_whitespace()
        .nth(19 - 3)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no nice value in {stat:?}")))
}

/// Lowers the CPU priority of the calling thread to nice `nice` (0..=19), unless it runs at a
/// lower priority already (raising it back needs a privilege); returns the nice value now in
/// effect. Threads this thread starts from now on inherit it.
pub fn lower_priority(nice: u32) -> io::Result<i32> {
    let tid = thread_id();
    let current = nice_of(tid)?;
    let wanted = i32::try_from(nice.min(19)).unwrap_or(19);
    if wanted <= current {
        return Ok(current);
    }
    // SAFETY: setpriority reads its arguments only; on Linux, PRIO_PROCESS with a thread id
    // changes that one thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, wanted) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_lowers_its_own_priority_and_its_new_threads_inherit_it() {
        let main = thread_id();
        let before = nice_of(main).expect("nice of this thread");
        let (lowered, child, after_main) = std::thread::spawn(move || {
            let lowered = lower_priority(12).expect("lower");
            let child = std::thread::spawn(|| nice_of(thread_id()).expect("nice")).join().expect("join");
            (lowered, child, nice_of(main).expect("nice of the test thread"))
        })
        .join()
        .expect("join");
        assert_eq!(lowered, before.max(12));
        assert_eq!(child, lowered, "a thread started afterwards inherits the nice value");
        assert_eq!(after_main, before, "other threads keep theirs");
        let again = std::thread::spawn(|| (lower_priority(15), lower_priority(3))).join().expect("join");
        let (first, second) = (again.0.expect("15"), again.1.expect("3"));
        assert_eq!(second, first, "never raised back");
    }

    #[test]
    fn background_bounds_the_threads() {
        assert_eq!(SaveThreads::Foreground.writers(16), 4);
        assert_eq!(SaveThreads::Foreground.writers(2), 2);
        assert_eq!(SaveThreads::Background(2).writers(16), 2);
        assert_eq!(SaveThreads::Background(0).writers(16), 1);
        assert!(SaveThreads::Foreground.may_split() && !SaveThreads::Background(4).may_split());
        assert_eq!(SaveThreads::Background(3).engine_cap(), Some(3));
        assert_eq!(SaveThreads::Foreground.engine_cap(), None);
    }
}
