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
use crate::error::{Error, Result};

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
    fn register(&self, buf: &AlignedBuf) -> Result<()>;
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
    fn catch_up(&mut self, entry: &mut Entry) -> Result<()> {
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
mod saves;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
