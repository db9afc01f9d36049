//! [`StagingPool`]: the one owner of the aligned staging buffers.
//!
//! Every staging buffer is created, lent, taken back and freed here, and nowhere else:
//!
//! - The pool lends buffers as [`PoolBuf`]s. A `PoolBuf` goes back to the pool when it is
//!   dropped, on every path (a finished write, an error, a panic unwinding a worker). An
//!   engine whose kernel still reads a buffer keeps the `PoolBuf` inside its operation until
//!   the completion arrives (STYLE item 2), so the memory cannot come back early.
//! - [`Registrar`]s are the pool's registration hooks (CUDA page-locking, for instance):
//!   [`Registrar::register`] runs once for each buffer when it is created or when the
//!   registrar is added ([`StagingPool::add_registrar`]; a buffer lent out at that moment is
//!   registered when it comes back, before it is lent again), and
//!   [`Registrar::unregister`] runs before the buffer's memory is freed, whatever the reason
//!   (a resize, a change of alignment, the end of the pool).
//! - The alignment of the buffers is decided in one place, [`staging_align`].
//!
//! Registrations tied to something shorter-lived than the pool, such as an io_uring ring's
//! fixed-buffer table, belong to whoever borrows the buffers: the io_uring writer registers
//! the buffers lent to it with its ring and closes the ring (dropping the registration)
//! before they go back to the pool (see `io::core`).
//!
//! Lending never blocks: when no idle buffer fits, a new one is allocated (two saves of the
//! same [`crate::UringCheckpointIO`] running at once both get buffers). Buffers beyond the
//! pool's capacity are freed when they come back, so the pool settles at its capacity.

use std::fmt;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, MutexGuard};

use super::AlignedBuf;
use crate::Error;

/// Memory alignment every staging buffer has at least: registration (`cuMemHostRegister`,
/// io_uring fixed buffers) works on whole pages.
pub const PAGE_ALIGN: usize = 4096;

/// The alignment of staging buffers for an engine whose direct I/O needs offsets and lengths
/// aligned to `direct_align` and memory aligned to `mem_align`. The only place it is decided.
pub fn staging_align(direct_align: usize, mem_align: usize) -> usize {
    direct_align.max(mem_align).max(PAGE_ALIGN).next_power_of_two()
}

/// A registration hook run by a [`StagingPool`] for each of its buffers.
///
/// The pool calls the hooks with its lock held, also from the drop of a [`PoolBuf`]
/// (possibly while a thread unwinds): a hook must not call back into the pool, and must
/// report failures as errors (or log them), never panic.
pub trait Registrar: Send + Sync {
    /// What registers (for logs), e.g. "CUDA page-locking".
    fn name(&self) -> &str;
    /// Registers the whole capacity of `buf`, which stays at this address until
    /// [`Registrar::unregister`] is called for it. On error the buffer stays in use,
    /// unregistered (with CUDA: copies into it use pageable memory).
    fn register(&self, buf: &AlignedBuf) -> crate::Result<()>;
    /// Undoes a successful [`Registrar::register`] of `buf`; called before its memory is
    /// freed, and only for buffers this registrar accepted.
    fn unregister(&self, buf: &AlignedBuf);
}

/// What [`StagingPool::add_registrar`] did.
#[derive(Debug)]
pub struct Registration {
    /// Buffers the registrar accepted.
    pub registered: usize,
    /// Buffers it refused (they stay usable, unregistered).
    pub refused: usize,
    /// Buffers lent out at the time: registered when they come back to the pool.
    pub pending: usize,
    /// The first refusal.
    pub first_error: Option<Error>,
}

/// Counts of a pool's buffers, for reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers idle in the pool.
    pub idle: usize,
    /// Buffers lent out.
    pub lent: usize,
    /// Buffers the pool keeps (more are freed when they come back).
    pub capacity: usize,
    /// Buffers allocated over the pool's life.
    pub allocated: u64,
    /// Buffers freed over the pool's life (each unregistered first).
    pub freed: u64,
    /// Buffers given up for lost (an engine could not wait for the kernel to release
    /// them): never freed, still registered.
    pub leaked: u64,
    /// For each registrar, in the order added: buffers registered with it now.
    pub registered: Vec<usize>,
}

/// Size and alignment of the buffers of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Bytes per buffer (the chunk size).
    pub chunk: usize,
    /// Alignment of the buffers' addresses and capacities (see [`staging_align`]).
    pub align: usize,
}

impl Shape {
    /// Whether a buffer of shape `have` can serve as one of shape `self`.
    fn accepts(self, have: Shape) -> bool {
        have.chunk == self.chunk && have.align >= self.align
    }
}

/// One buffer and what the pool knows about it.
struct Entry {
    buf: AlignedBuf,
    shape: Shape,
    /// `registered[i]`: whether registrar `i` accepted this buffer. Registrars added after
    /// the buffer's last registration are missing at the end (see `catch_up`).
    registered: Vec<bool>,
}

struct State {
    shape: Option<Shape>,
    capacity: usize,
    idle: Vec<Entry>,
    lent: usize,
    registrars: Vec<Arc<dyn Registrar>>,
    stats: PoolStats,
}

struct Inner {
    state: Mutex<State>,
}

/// The owner of every staging buffer; cheap to clone (clones share the pool). See the
/// [module docs](self).
#[derive(Clone)]
pub struct StagingPool {
    inner: Arc<Inner>,
}

impl Default for StagingPool {
    fn default() -> Self {
        StagingPool::new()
    }
}

impl fmt::Debug for StagingPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StagingPool").field("stats", &self.stats()).finish()
    }
}

impl StagingPool {
    /// An empty pool; buffers are allocated when first lent or by [`StagingPool::resize`].
    pub fn new() -> StagingPool {
        let state = State {
            shape: None,
            capacity: 0,
            idle: Vec::new(),
            lent: 0,
            registrars: Vec::new(),
            stats: PoolStats::default(),
        };
        StagingPool { inner: Arc::new(Inner { state: Mutex::new(state) }) }
    }

    /// Sets the shape and the number of buffers the pool keeps, and allocates (and
    /// registers) idle buffers up to it now. Idle buffers that no longer fit, or beyond the
    /// capacity, are unregistered and freed; lent ones when they come back.
    pub fn resize(&self, shape: Shape, capacity: usize) {
        let mut state = self.lock();
        state.set_shape(shape);
        state.capacity = capacity;
        state.trim();
        while state.idle.len() + state.lent < capacity {
            let entry = state.allocate(shape);
            state.idle.push(entry);
        }
    }

    /// Sets how many buffers the pool keeps (idle and lent); idle ones beyond it are freed
    /// now, lent ones when they come back. Allocates nothing.
    pub fn set_capacity(&self, capacity: usize) {
        let mut state = self.lock();
        state.capacity = capacity;
        state.trim();
    }

    /// The shape of the buffers, once set.
    pub fn shape(&self) -> Option<Shape> {
        self.lock().shape
    }

    /// Adds a registration hook and registers every idle buffer with it now; buffers lent
    /// out are registered when they come back. The pool keeps the registrar until it is
    /// dropped, unregistering each buffer before freeing it.
    pub fn add_registrar(&self, registrar: Arc<dyn Registrar>) -> Registration {
        let mut state = self.lock();
        state.registrars.push(registrar);
        state.stats.registered.push(0);
        let mut outcome = Registration { registered: 0, refused: 0, pending: state.lent, first_error: None };
        let mut idle = std::mem::take(&mut state.idle);
        for entry in &mut idle {
            match state.catch_up(entry) {
                Ok(()) => outcome.registered += 1,
                Err(e) => {
                    outcome.refused += 1;
                    outcome.first_error.get_or_insert(e);
                }
            }
        }
        state.idle = idle;
        outcome
    }

    /// Counts of the pool's buffers.
    pub fn stats(&self) -> PoolStats {
        let state = self.lock();
        PoolStats {
            idle: state.idle.len(),
            lent: state.lent,
            capacity: state.capacity,
            ..state.stats.clone()
        }
    }

    /// Lends `n` buffers of `shape` (which becomes the pool's shape), allocating what the
    /// idle buffers do not cover. Each comes back when dropped.
    pub fn lend(&self, shape: Shape, n: usize) -> Vec<PoolBuf> {
        let mut state = self.lock();
        state.set_shape(shape);
        let mut lent = Vec::with_capacity(n);
        while lent.len() < n {
            let entry = match state.idle.pop() {
                Some(entry) => entry,
                None => state.allocate(shape),
            };
            lent.push(PoolBuf { entry: ManuallyDrop::new(entry), pool: self.inner.clone(), leak: false });
        }
        state.lent += n;
        lent
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }
}

impl Inner {
    /// The state, even if a thread panicked while holding the lock (no code that holds it
    /// panics: hooks may not, see [`Registrar`]).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Makes `shape` the pool's shape, freeing idle buffers that do not fit it.
    fn set_shape(&mut self, shape: Shape) {
        if self.shape == Some(shape) {
            return;
        }
        self.shape = Some(shape);
        let (keep, drop): (Vec<Entry>, Vec<Entry>) =
            std::mem::take(&mut self.idle).into_iter().partition(|e| shape.accepts(e.shape));
        self.idle = keep;
        for entry in drop {
            self.free(entry);
        }
    }

    /// Frees idle buffers beyond the capacity.
    fn trim(&mut self) {
        while self.idle.len() + self.lent > self.capacity {
            match self.idle.pop() {
                Some(entry) => self.free(entry),
                None => break,
            }
        }
    }

    /// Allocates a zeroed buffer of `shape` and registers it with every registrar.
    fn allocate(&mut self, shape: Shape) -> Entry {
        let mut entry =
            Entry { buf: AlignedBuf::zeroed(shape.chunk, shape.align), shape, registered: Vec::new() };
        self.stats.allocated += 1;
        if let Err(e) = self.catch_up(&mut entry) {
            log::debug!("staging buffer left unregistered: {e}");
        }
        entry
    }

    /// Registers `entry` with the registrars added since its last registration; returns
    /// the last refusal.
    fn catch_up(&mut self, entry: &mut Entry) -> crate::Result<()> {
        let mut result = Ok(());
        for i in entry.registered.len()..self.registrars.len() {
            let accepted = match self.registrars[i].register(&entry.buf) {
                Ok(()) => true,
                Err(e) => {
                    log::debug!("{} refused a staging buffer: {e}", self.registrars[i].name());
                    result = Err(e);
                    false
                }
            };
            self.stats.registered[i] += usize::from(accepted);
            entry.registered.push(accepted);
        }
        result
    }

    /// Unregisters `entry` from every registrar that accepted it (last added first), then
    /// frees its memory.
    fn free(&mut self, entry: Entry) {
        for (i, _) in entry.registered.iter().enumerate().rev().filter(|(_, &r)| r) {
            self.registrars[i].unregister(&entry.buf);
            self.stats.registered[i] -= 1;
        }
        self.stats.freed += 1;
        drop(entry.buf);
    }

    /// Takes back a lent buffer: kept (cleared, registered with every registrar) if it fits
    /// and the pool is not over capacity, freed otherwise.
    fn take_back(&mut self, mut entry: Entry) {
        self.lent -= 1;
        let fits = self.shape.is_none_or(|shape| shape.accepts(entry.shape));
        if fits && self.idle.len() + self.lent < self.capacity {
            entry.buf.clear();
            if let Err(e) = self.catch_up(&mut entry) {
                log::debug!("staging buffer left unregistered: {e}");
            }
            self.idle.push(entry);
        } else {
            self.free(entry);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Every lent buffer holds a reference to this pool, so none is out: all are idle.
        let state = self.state.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        for entry in std::mem::take(&mut state.idle) {
            state.free(entry);
        }
    }
}

/// A staging buffer lent by a [`StagingPool`]; goes back to the pool when dropped.
pub struct PoolBuf {
    entry: ManuallyDrop<Entry>,
    pool: Arc<Inner>,
    leak: bool,
}

impl PoolBuf {
    /// Gives the buffer up for lost: for memory the kernel may still use when waiting for it
    /// failed. It is never freed (nor unregistered); the pool stops counting it.
    pub(crate) fn leak(mut self) {
        self.leak = true;
    }

    /// A buffer outside any pool's accounting (for engine unit tests).
    #[cfg(test)]
    pub(crate) fn detached(chunk: usize) -> PoolBuf {
        StagingPool::new().lend(Shape { chunk, align: PAGE_ALIGN }, 1).pop().expect("lent one buffer")
    }
}

impl std::ops::Deref for PoolBuf {
    type Target = AlignedBuf;
    fn deref(&self) -> &AlignedBuf {
        &self.entry.buf
    }
}

impl std::ops::DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut AlignedBuf {
        &mut self.entry.buf
    }
}

impl fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.entry.buf.fmt(f)
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        // SAFETY: `entry` is taken exactly once, here; the PoolBuf is never used again.
        let entry = unsafe { ManuallyDrop::take(&mut self.entry) };
        let mut state = self.pool.lock();
        if self.leak {
            state.lent -= 1;
            state.stats.leaked += 1;
            std::mem::forget(entry.buf);
        } else {
            state.take_back(entry);
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A fake [`Registrar`] standing in for CUDA, and a check, run by every
    //! [`AlignedBuf`] as it frees its memory, that no fake registration of that memory is
    //! still live.

    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use super::{AlignedBuf, Registrar};
    use crate::Error;

    /// Live fake registrations, by start address: (registrar id, capacity).
    static LIVE: Mutex<Vec<(usize, u64, usize)>> = Mutex::new(Vec::new());
    /// Buffers freed while still registered: (address, registrar id).
    static FREED_REGISTERED: Mutex<Vec<(usize, u64)>> = Mutex::new(Vec::new());

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by `AlignedBuf::drop` (tests only) just before the memory goes.
    pub(crate) fn freeing(addr: usize) {
        let live = lock(&LIVE);
        let offenders: Vec<(usize, u64)> =
            live.iter().filter(|(a, _, _)| *a == addr).map(|(a, id, _)| (*a, *id)).collect();
        drop(live);
        lock(&FREED_REGISTERED).extend(offenders);
    }

    /// Records every call; fails registrations whose (1-based) sequence number is in
    /// `refuse`.
    pub(crate) struct FakeRegistrar {
        id: u64,
        refuse: Vec<usize>,
        calls: Mutex<Calls>,
        /// Set when a hook saw something wrong (kept in `problems`).
        broken: AtomicBool,
    }

    #[derive(Default)]
    struct Calls {
        registers: usize,
        unregisters: usize,
        /// Live registrations of this registrar: address to count.
        live: HashMap<usize, usize>,
        problems: Vec<String>,
    }

    impl FakeRegistrar {
        pub(crate) fn new() -> Arc<FakeRegistrar> {
            FakeRegistrar::refusing(Vec::new())
        }

        pub(crate) fn refusing(refuse: Vec<usize>) -> Arc<FakeRegistrar> {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            Arc::new(FakeRegistrar {
                id: NEXT.fetch_add(1, Ordering::Relaxed),
                refuse,
                calls: Mutex::new(Calls::default()),
                broken: AtomicBool::new(false),
            })
        }

        /// (register calls, unregister calls, live registrations).
        pub(crate) fn counts(&self) -> (usize, usize, usize) {
            let calls = lock(&self.calls);
            (calls.registers, calls.unregisters, calls.live.len())
        }

        /// Panics unless every hook call was sound and no buffer was freed while this
        /// registrar still had it registered.
        pub(crate) fn assert_sound(&self) {
            let calls = lock(&self.calls);
            assert!(!self.broken.load(Ordering::SeqCst), "registrar problems: {:?}", calls.problems);
            let freed: Vec<usize> =
                lock(&FREED_REGISTERED).iter().filter(|(_, id)| *id == self.id).map(|(a, _)| *a).collect();
            assert!(freed.is_empty(), "buffers freed while registered: {freed:x?}");
        }

        fn problem(&self, calls: &mut Calls, what: String) {
            self.broken.store(true, Ordering::SeqCst);
            calls.problems.push(what);
        }
    }

    impl Registrar for FakeRegistrar {
        fn name(&self) -> &str {
            "fake registrar"
        }

        fn register(&self, buf: &AlignedBuf) -> crate::Result<()> {
            let addr = buf.as_ptr() as usize;
            let mut calls = lock(&self.calls);
            calls.registers += 1;
            if self.refuse.contains(&calls.registers) {
                return Err(Error::Unavailable("fake registration (refused on purpose)".into()));
            }
            let count = calls.live.entry(addr).or_insert(0);
            *count += 1;
            if *count > 1 {
                self.problem(&mut calls, format!("{addr:x} registered twice"));
            }
            lock(&LIVE).push((addr, self.id, buf.capacity()));
            Ok(())
        }

        fn unregister(&self, buf: &AlignedBuf) {
            let addr = buf.as_ptr() as usize;
            let mut calls = lock(&self.calls);
            calls.unregisters += 1;
            if calls.live.remove(&addr).is_none() {
                self.problem(&mut calls, format!("{addr:x} unregistered but not registered"));
            }
            let mut live = lock(&LIVE);
            match live.iter().position(|(a, id, cap)| *a == addr && *id == self.id && *cap == buf.capacity())
            {
                Some(i) => {
                    live.swap_remove(i);
                }
                None => {
                    drop(live);
                    self.problem(&mut calls, format!("{addr:x} unregistered with another capacity"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::FakeRegistrar;
    use super::*;

    const SHAPE: Shape = Shape { chunk: 64 * 1024, align: PAGE_ALIGN };

    #[test]
    fn alignment_is_decided_once_from_both_alignments() {
        assert_eq!(staging_align(512, 512), 4096);
        assert_eq!(staging_align(4096, 512), 4096);
        assert_eq!(staging_align(512, 65536), 65536);
        assert_eq!(staging_align(16384, 4096), 16384);
    }

    #[test]
    fn lent_buffers_come_back_on_drop_and_are_reused() {
        let pool = StagingPool::new();
        pool.set_capacity(4);
        let bufs = pool.lend(SHAPE, 3);
        let addrs: Vec<usize> = bufs.iter().map(|b| b.as_ptr() as usize).collect();
        assert_eq!(pool.stats().lent, 3);
        drop(bufs);
        let stats = pool.stats();
        assert_eq!((stats.lent, stats.idle, stats.allocated, stats.freed), (0, 3, 3, 0));
        let again = pool.lend(SHAPE, 3);
        let mut reused: Vec<usize> = again.iter().map(|b| b.as_ptr() as usize).collect();
        reused.sort_unstable();
        let mut addrs = addrs;
        addrs.sort_unstable();
        assert_eq!(reused, addrs, "the same memory is lent again");
        assert_eq!(pool.stats().allocated, 3);
    }

    #[test]
    fn returned_buffers_are_cleared() {
        let pool = StagingPool::new();
        pool.set_capacity(1);
        let mut buf = pool.lend(SHAPE, 1).pop().expect("one");
        buf.extend_from_slice(b"abc");
        drop(buf);
        assert!(pool.lend(SHAPE, 1)[0].is_empty());
    }

    #[test]
    fn every_buffer_is_registered_once_and_unregistered_before_it_is_freed() {
        let fake = FakeRegistrar::new();
        {
            let pool = StagingPool::new();
            pool.resize(SHAPE, 4);
            let lent = pool.lend(SHAPE, 2);
            let registration = pool.add_registrar(fake.clone());
            assert_eq!((registration.registered, registration.pending), (2, 2));
            assert_eq!(pool.stats().registered, vec![2]);
            drop(lent); // registered on their way back
            assert_eq!(pool.stats().registered, vec![4]);
            assert_eq!(fake.counts(), (4, 0, 4));
            // More buffers, then fewer: new ones registered, surplus unregistered, then freed.
            pool.resize(SHAPE, 6);
            assert_eq!(fake.counts(), (6, 0, 6));
            pool.resize(SHAPE, 3);
            assert_eq!(fake.counts(), (6, 3, 3));
            // Another chunk size: every old buffer goes (unregistered first).
            let other = Shape { chunk: 128 * 1024, ..SHAPE };
            pool.resize(other, 3);
            assert_eq!(fake.counts(), (9, 6, 3));
            // Another alignment: larger replaces, smaller is served by what is there.
            let wide = Shape { align: 65536, ..other };
            drop(pool.lend(wide, 2));
            assert_eq!(pool.stats().registered, vec![2], "the 4 KiB-aligned ones went");
            drop(pool.lend(other, 3));
            fake.assert_sound();
            assert_eq!(pool.stats().idle, 3);
        }
        let (registers, unregisters, live) = fake.counts();
        assert_eq!((registers, live), (unregisters, 0), "the pool's end unregisters everything");
        fake.assert_sound();
    }

    #[test]
    fn over_capacity_buffers_are_freed_on_return() {
        let fake = FakeRegistrar::new();
        let pool = StagingPool::new();
        pool.add_registrar(fake.clone());
        pool.set_capacity(2);
        let first = pool.lend(SHAPE, 2);
        let second = pool.lend(SHAPE, 2); // a concurrent save: allocated beyond capacity
        assert_eq!(pool.stats().allocated, 4);
        drop(first);
        drop(second);
        let stats = pool.stats();
        assert_eq!((stats.idle, stats.freed, stats.registered.clone()), (2, 2, vec![2]));
        fake.assert_sound();
    }

    #[test]
    fn refusals_are_counted_and_leave_buffers_usable() {
        let fake = FakeRegistrar::refusing(vec![2]);
        let pool = StagingPool::new();
        pool.resize(SHAPE, 3);
        let registration = pool.add_registrar(fake.clone());
        assert_eq!((registration.registered, registration.refused), (2, 1));
        assert!(registration.first_error.is_some());
        assert_eq!(pool.stats().registered, vec![2]);
        let bufs = pool.lend(SHAPE, 3);
        assert_eq!(bufs.len(), 3);
        drop(bufs);
        drop(pool);
        assert_eq!(fake.counts(), (3, 2, 0), "a refused buffer is never unregistered");
        fake.assert_sound();
    }

    #[test]
    fn a_leaked_buffer_is_never_freed_nor_unregistered() {
        let fake = FakeRegistrar::new();
        let pool = StagingPool::new();
        pool.add_registrar(fake.clone());
        pool.set_capacity(2);
        let mut bufs = pool.lend(SHAPE, 2);
        bufs.pop().expect("two").leak();
        let stats = pool.stats();
        assert_eq!((stats.lent, stats.leaked), (1, 1));
        drop(bufs);
        drop(pool);
        assert_eq!(fake.counts(), (2, 1, 1), "the leaked one stays registered");
        fake.assert_sound();
    }

    #[test]
    fn buffers_come_back_from_a_panicking_thread() {
        let fake = FakeRegistrar::new();
        let pool = StagingPool::new();
        pool.add_registrar(fake.clone());
        pool.set_capacity(4);
        let shared = pool.clone();
        let joined = std::thread::spawn(move || {
            let _bufs = shared.lend(SHAPE, 4);
            panic!("worker panics holding every buffer");
        })
        .join();
        assert!(joined.is_err());
        let stats = pool.stats();
        assert_eq!((stats.lent, stats.idle, stats.registered.clone()), (0, 4, vec![4]));
        fake.assert_sound();
    }
}

#[cfg(test)]
mod saves {
    //! Whole saves through [`crate::UringCheckpointIO`] with a fake registrar on its pool:
    //! after every save (successful, failed, or with a panicking worker) each staging buffer
    //! is back in the pool, registered exactly once, and no memory was freed while
    //! registered; the next save writes the same bytes.

    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::testing::FakeRegistrar;
    use super::Shape;
    use crate::checkpoint::TensorData;
    use crate::config::{Config, EngineKind};
    use crate::io::testing::{arm, Fault};
    use crate::staging::TensorSource;
    use crate::{Checkpoint, CheckpointIO, Dtype, Error, UringCheckpointIO};

    const ENGINES: [EngineKind; 3] = [EngineKind::Uring, EngineKind::Pwrite, EngineKind::Buffered];

    fn scratch() -> tempfile::TempDir {
        // On the repository's file system, so that O_DIRECT runs (tmpfs refuses it).
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("tmp");
        std::fs::create_dir_all(&base).expect("create target/tmp");
        tempfile::tempdir_in(base).expect("scratch dir")
    }

    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        crate::staging::simulated::generate(seed, 0, &mut out);
        out
    }

    /// The default pool (16 x 8 MiB) or a small one (4 x 64 KiB), shards of at most 1 MiB.
    fn config(engine: EngineKind, small: bool) -> Config {
        let mut builder = Config::builder().engine(engine).max_shard_size(1 << 20).replace_existing(true);
        if small {
            builder =
                builder.chunk_size(64 * 1024).staging_pool_size(256 * 1024).queue_depth(4).io_threads(2);
        }
        builder.build().expect("valid config")
    }

    /// `shards` tensors of 700 KiB and some (so one shard each), odd lengths.
    fn tensors(shards: usize) -> Vec<(String, Vec<u8>)> {
        (0..shards).map(|i| (format!("t{i}"), bytes(i as u64, 700 * 1024 + 4099 * i + 3))).collect()
    }

    fn checkpoint<'a>(
        tensors: &'a [(String, Vec<u8>)],
        source: Option<&'a dyn TensorSource>,
    ) -> Checkpoint<'a> {
        let mut ck = Checkpoint::new();
        for (name, data) in tensors {
            ck.add(name.clone(), Dtype::U8, &[data.len() as u64], data).expect("add");
        }
        if let Some(source) = source {
            ck.add_source("device", Dtype::U8, &[source.len() as u64], TensorData::Source(source))
                .expect("add");
        }
        ck
    }

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| {
                let e = e.expect("entry");
                (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read"))
            })
            .collect();
        out.sort();
        out
    }

    /// Every buffer is idle in the pool and registered once with `fake`; nothing was freed
    /// while registered.
    fn assert_whole(io: &UringCheckpointIO, fake: &FakeRegistrar, what: &str) {
        let stats = io.staging_pool().stats();
        assert_eq!(stats.lent, 0, "{what}: buffers still lent: {stats:?}");
        assert_eq!(stats.registered, vec![stats.idle], "{what}: {stats:?}");
        let (_, _, live) = fake.counts();
        assert_eq!(live, stats.idle, "{what}: live registrations {live}, idle buffers {}", stats.idle);
        fake.assert_sound();
    }

    fn with_fake(config: Config) -> (UringCheckpointIO, Arc<FakeRegistrar>) {
        let io = UringCheckpointIO::new(config).expect("io");
        let fake = FakeRegistrar::new();
        let registration = io.prepare_staging(fake.clone());
        assert_eq!(registration.refused, 0);
        assert_eq!(registration.registered, io.staging_pool().stats().idle);
        (io, fake)
    }

    /// A device tensor whose `copy_to` fails, or panics, at its `at`-th call.
    struct Flaky {
        bytes: Vec<u8>,
        at: usize,
        panic: bool,
        calls: AtomicUsize,
    }

    impl TensorSource for Flaky {
        fn len(&self) -> usize {
            self.bytes.len()
        }

        fn host_bytes(&self) -> Option<&[u8]> {
            None
        }

        fn copy_to(&self, offset: usize, dst: &mut [u8]) -> crate::Result<()> {
            if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.at {
                if self.panic {
                    panic!("injected panic in copy_to");
                }
                return Err(Error::Unavailable("device (injected copy failure)".into()));
            }
            dst.copy_from_slice(&self.bytes[offset..offset + dst.len()]);
            Ok(())
        }
    }

    #[test]
    fn multi_shard_saves_reuse_the_pool_and_keep_registrations_sound() {
        let dir = scratch();
        for engine in ENGINES {
            for small in [false, true] {
                for shards in [3, 4] {
                    let what = format!("{engine} small={small} shards={shards}");
                    let (io, fake) = with_fake(config(engine, small));
                    let data = tensors(shards);
                    let path = dir.path().join(format!("{engine}-{small}-{shards}"));
                    let report = io.save_checkpoint(&checkpoint(&data, None), &path).expect("save");
                    assert_eq!(report.shards, shards, "{what}");
                    assert_whole(&io, &fake, &what);
                    let first = files(&path);
                    let allocated = io.staging_pool().stats().allocated;
                    io.save_checkpoint(&checkpoint(&data, None), &path).expect("second save");
                    assert_eq!(files(&path), first, "{what}: second save differs");
                    assert_eq!(io.staging_pool().stats().allocated, allocated, "{what}: pool reallocated");
                    assert_whole(&io, &fake, &what);
                    drop(io);
                    let (registers, unregisters, live) = fake.counts();
                    assert_eq!((live, registers), (0, unregisters), "{what}: the pool's end unregisters all");
                    fake.assert_sound();
                }
            }
        }
    }

    /// A save that fails (`fail` arms the fault) leaves the pool whole, and the save after
    /// it writes what a save without faults writes.
    fn fails_then_recovers(
        name: &str,
        setup: impl Fn(&Path) -> Option<crate::io::testing::Guard>,
        source: impl Fn() -> Option<Flaky>,
    ) {
        let dir = scratch();
        for engine in ENGINES {
            for small in [false, true] {
                let what = format!("{name} on {engine} small={small}");
                let (io, fake) = with_fake(config(engine, small));
                let data = tensors(4);
                let clean = Flaky {
                    bytes: bytes(99, (20 << 20) + 17),
                    at: 0,
                    panic: false,
                    calls: AtomicUsize::new(0),
                };
                let reference = dir.path().join(format!("{engine}-{small}-reference"));
                io.save_checkpoint(&checkpoint(&data, Some(&clean)), &reference).expect("reference save");

                let faulty_parent = dir.path().join(format!("{engine}-{small}-faulty"));
                std::fs::create_dir_all(&faulty_parent).expect("mkdir");
                let path = faulty_parent.join("ck");
                let guard = setup(&faulty_parent);
                let flaky = source();
                let source_ref = flaky.as_ref().map(|s| s as &dyn TensorSource);
                let failed = io.save_checkpoint(&checkpoint(&data, source_ref), &path);
                assert!(failed.is_err(), "{what}: the save should fail");
                assert!(!path.exists(), "{what}: nothing committed");
                assert_whole(&io, &fake, &what);
                drop(guard);

                io.save_checkpoint(&checkpoint(&data, Some(&clean)), &path).expect("save after the failure");
                assert_eq!(files(&path), files(&reference), "{what}: save after the failure differs");
                assert_whole(&io, &fake, &what);
                drop(io);
                assert_eq!(fake.counts().2, 0, "{what}: the pool's end unregisters all");
                fake.assert_sound();
            }
        }
    }

    #[test]
    fn a_worker_whose_write_fails_mid_save_returns_its_buffers() {
        for at in [1, 3, 7] {
            fails_then_recovers(
                &format!("write {at} fails"),
                |p| Some(arm(p, Fault::FailWrite { at })),
                || None,
            );
        }
    }

    #[test]
    fn a_worker_that_panics_mid_save_returns_its_buffers() {
        fails_then_recovers("writer panics", |p| Some(arm(p, Fault::PanicWrite { at: 4 })), || None);
    }

    #[test]
    fn a_stream_whose_source_fails_or_panics_returns_its_buffer() {
        for panic in [false, true] {
            fails_then_recovers(
                &format!("copy_to fails (panic: {panic})"),
                |_| None,
                || {
                    Some(Flaky {
                        bytes: bytes(99, (20 << 20) + 17),
                        at: 3,
                        panic,
                        calls: AtomicUsize::new(0),
                    })
                },
            );
        }
    }

    #[test]
    fn resizing_the_pool_between_saves_unregisters_before_freeing() {
        let dir = scratch();
        for engine in ENGINES {
            let (io, fake) = with_fake(config(engine, true));
            let data = tensors(3);
            let path = dir.path().join(format!("{engine}"));
            io.save_checkpoint(&checkpoint(&data, None), &path).expect("save");
            let first = files(&path);
            let pool = io.staging_pool();
            let shape = pool.shape().expect("shaped by the save");
            for (shape, capacity) in [
                (shape, 2),
                (shape, 24),
                (Shape { chunk: 128 * 1024, ..shape }, 5),
                (Shape { align: 65536, ..shape }, 3),
            ] {
                pool.resize(shape, capacity);
                assert_whole(&io, &fake, &format!("{engine} after resize to {capacity} x {shape:?}"));
                io.save_checkpoint(&checkpoint(&data, None), &path).expect("save after resize");
                assert_eq!(files(&path), first, "{engine}: save after resize differs");
                assert_whole(&io, &fake, &format!("{engine} after a save at {capacity} x {shape:?}"));
            }
            let stats = pool.stats();
            assert!(stats.freed > 0, "{stats:?}");
            drop(io);
            fake.assert_sound();
            assert_eq!(fake.counts().2, 0);
        }
    }

    #[test]
    fn concurrent_saves_share_the_pool_and_settle_at_its_capacity() {
        let dir = scratch();
        let (io, fake) = with_fake(config(EngineKind::Uring, true));
        let data = tensors(3);
        std::thread::scope(|scope| {
            for i in 0..3 {
                let (io, data, dir) = (&io, &data, dir.path());
                scope.spawn(move || {
                    io.save_checkpoint(&checkpoint(data, None), &dir.join(format!("c{i}"))).expect("save");
                });
            }
        });
        assert_whole(&io, &fake, "after concurrent saves");
        let stats = io.staging_pool().stats();
        assert!(stats.idle <= stats.capacity, "{stats:?}");
        assert_eq!(files(&dir.path().join("c0")), files(&dir.path().join("c2")));
    }
}
