//! Asynchronous saves: [`AsyncCheckpointIO`] wraps any [`CheckpointIO`] and runs each save on
//! a background thread, so that training stalls only until the sources are *staged*.
//!
//! A save returns a [`SaveHandle`] with two completions:
//!
//! - [`Staged`]: the save no longer reads the tensors' memory; the caller may change or
//!   free it. It resolves even when the save fails (then once nothing reads the sources).
//! - [`Durable`]: the checkpoint is committed per the commit protocol; it resolves to the
//!   [`SaveReport`] or the error of *that* save (never of another one).
//!
//! Both can be waited for (`wait()`, blocking) or awaited (they implement [`Future`], with no
//! runtime of their own: any executor works).
//!
//! Two ways to stage ([`AsyncMode`], `async_mode` in the config):
//!
//! - `stream`: the save runs through the bounded staging ring
//!   ([`CheckpointIO::save_checkpoint_staged`]); memory is the staging pool, and `staged`
//!   resolves once the last chunk is in the ring.
//! - `snapshot`: the whole checkpoint is first copied into host memory (one aligned area
//!   per save in flight, kept and reused by later saves), `staged` resolves, and the save
//!   then writes from that copy (without further copies where the layout allows zero-copy).
//!   Shortest stall; memory is the checkpoint's size per save in flight.
//!
//! At most `max_saves_in_flight` saves run at once: a further save waits in
//! [`AsyncCheckpointIO::save_checkpoint`] for a slot (no save is ever dropped), as do a save
//! to a path that a save in flight is writing, and [`AsyncCheckpointIO::remove_checkpoint`]
//! or [`AsyncCheckpointIO::load_checkpoint`] of such a path. [`AsyncCheckpointIO::teardown`]
//! (and dropping the wrapper) waits for every pending save and reports the errors of saves
//! whose handles were dropped without looking at their result.
//!
//! Paths are compared as given, made absolute against the current directory (no symlink
//! resolution): `ckpt/a` and `./ckpt/a` count as different paths.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::checkpoint::{mib_per_s, Checkpoint, LoadedCheckpoint, SaveReport, TensorData, TensorView};
use crate::checkpoint_io::{CheckpointIO, LoadOptions, UringCheckpointIO};
use crate::config::{AsyncMode, Config};
use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::io::AlignedBuf;
use crate::staging::TensorSource;

/// Snapshot copies are split into pieces of at most this size, shared among threads.
const SNAPSHOT_PIECE: usize = 64 << 20;
/// Threads copying a snapshot at most.
const SNAPSHOT_THREADS: usize = 4;
/// Alignment of the snapshot area (and so of every tensor that starts a shard in it).
const SNAPSHOT_ALIGN: usize = 4096;

/// One tensor of an [`OwnedCheckpoint`]: the save keeps its source alive until staged.
#[derive(Clone)]
pub struct OwnedTensor {
    /// Unique name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions; empty for a scalar.
    pub shape: Vec<u64>,
    /// The bytes: host memory (`Vec<u8>`, [`Bytes`], [`crate::staging::HostPtrSource`]), a
    /// simulated or CUDA device, ...
    pub source: Arc<dyn TensorSource>,
}

impl std::fmt::Debug for OwnedTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedTensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.source.len())
            .finish()
    }
}

/// A checkpoint whose tensors a background save can hold on to: sources behind `Arc`s.
#[derive(Debug, Clone, Default)]
pub struct OwnedCheckpoint {
    /// Tensors in the order they are laid out on disk.
    pub tensors: Vec<OwnedTensor>,
    /// String metadata stored in the manifest.
    pub metadata: BTreeMap<String, String>,
    /// Small non-tensor files (name, bytes), committed with the shards (see
    /// [`Checkpoint::extra_files`]).
    pub extra_files: Vec<(String, Bytes)>,
}

impl OwnedCheckpoint {
    /// An empty checkpoint.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor after checking that the source has exactly the size `dtype` x `shape`
    /// needs and that the name is new.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        dtype: Dtype,
        shape: &[u64],
        source: Arc<dyn TensorSource>,
    ) -> Result<&mut Self> {
        let name = name.into();
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Error::InvalidCheckpoint(format!("tensor {name:?} added twice")));
        }
        // The same size checks as a borrowed checkpoint.
        Checkpoint::new().add_source(name.clone(), dtype, shape, TensorData::Source(&*source))?;
        self.tensors.push(OwnedTensor { name, dtype, shape: shape.to_vec(), source });
        Ok(self)
    }

    /// Adds a tensor of host bytes (a `Vec<u8>`, [`Bytes`], `&'static [u8]`, ...).
    pub fn add_bytes(
        &mut self,
        name: impl Into<String>,
        dtype: Dtype,
        shape: &[u64],
        bytes: impl Into<Bytes>,
    ) -> Result<&mut Self> {
        self.add(name, dtype, shape, Arc::new(bytes.into()))
    }

    /// Sets a metadata entry.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Adds a non-tensor file, with the checks of [`Checkpoint::add_extra_file`].
    pub fn add_extra_file(&mut self, name: impl Into<String>, bytes: impl Into<Bytes>) -> Result<&mut Self> {
        let (name, bytes) = (name.into(), bytes.into());
        self.as_checkpoint().add_extra_file(name.clone(), &bytes)?;
        self.extra_files.push((name, bytes));
        Ok(self)
    }

    /// Sum of the tensors' byte sizes.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.source.len() as u64).sum()
    }

    /// A borrowed view, for a synchronous [`CheckpointIO::save_checkpoint`].
    pub fn as_checkpoint(&self) -> Checkpoint<'_> {
        Checkpoint {
            tensors: self
                .tensors
                .iter()
                .map(|t| TensorView {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data: TensorData::Source(&*t.source),
                })
                .collect(),
            metadata: self.metadata.clone(),
            extra_files: self.extra_files.iter().map(|(n, b)| (n.clone(), &b[..])).collect(),
        }
    }
}

/// How an [`AsyncCheckpointIO`] runs saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncOptions {
    /// How the sources are staged. Default [`AsyncMode::Stream`].
    pub mode: AsyncMode,
    /// Saves running at once (at least 1). Default 1.
    pub max_saves_in_flight: usize,
}

impl Default for AsyncOptions {
    fn default() -> Self {
        AsyncOptions { mode: AsyncMode::Stream, max_saves_in_flight: 1 }
    }
}

impl AsyncOptions {
    /// The config's `async_mode` and `max_saves_in_flight`.
    pub fn from_config(config: &Config) -> Self {
        AsyncOptions { mode: config.async_mode, max_saves_in_flight: config.max_saves_in_flight as usize }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent, so a panic elsewhere does not
    // make it unusable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A one-shot completion: a value, a condition variable for blocking waiters and the wakers
/// of futures.
struct Completion<T> {
    slot: Mutex<Slot<T>>,
    ready: Condvar,
}

struct Slot<T> {
    done: bool,
    value: Option<T>,
    wakers: Vec<Waker>,
    /// The receiving side is gone: nobody will take the value.
    abandoned: bool,
}

impl<T> Completion<T> {
    fn new() -> Arc<Self> {
        Arc::new(Completion {
            slot: Mutex::new(Slot { done: false, value: None, wakers: Vec::new(), abandoned: false }),
            ready: Condvar::new(),
        })
    }

    /// Stores the value and wakes every waiter; hands the value back if nobody will take it
    /// or the completion had already happened.
    fn complete(&self, value: T) -> Option<T> {
        let wakers = {
            let mut slot = lock(&self.slot);
            if slot.done {
                return Some(value);
            }
            slot.done = true;
            let unclaimed = if slot.abandoned {
                Some(value)
            } else {
                slot.value = Some(value);
                None
            };
            self.ready.notify_all();
            let wakers = std::mem::take(&mut slot.wakers);
            if unclaimed.is_some() {
                drop(slot);
                for w in wakers {
                    w.wake();
                }
                return unclaimed;
            }
            wakers
        };
        for w in wakers {
            w.wake();
        }
        None
    }

    fn is_done(&self) -> bool {
        lock(&self.slot).done
    }

    fn wait_done(&self) -> MutexGuard<'_, Slot<T>> {
        let mut slot = lock(&self.slot);
        while !slot.done {
            slot = self.ready.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
        slot
    }

    fn wait_done_timeout(&self, timeout: Duration) -> bool {
        let Some(deadline) = Instant::now().checked_add(timeout) else {
            drop(self.wait_done()); // past any representable instant: wait without a limit
            return true;
        };
        let mut slot = lock(&self.slot);
        while !slot.done {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            slot = self.ready.wait_timeout(slot, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
        true
    }

    /// Polls: the locked slot when done, else registers the waker.
    fn poll_done(&self, cx: &mut Context<'_>) -> Option<MutexGuard<'_, Slot<T>>> {
        let mut slot = lock(&self.slot);
        if slot.done {
            return Some(slot);
        }
        if !slot.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            slot.wakers.push(cx.waker().clone());
        }
        None
    }
}

/// The *staged* completion of a save: the sources may be changed or freed once it
/// resolves. Cheap to clone; every clone resolves at the same time.
#[derive(Clone)]
pub struct Staged {
    inner: Arc<Completion<()>>,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged").field("staged", &self.is_staged()).finish()
    }
}

impl Staged {
    /// Blocks until the save no longer reads its sources.
    pub fn wait(&self) {
        drop(self.inner.wait_done());
    }

    /// Blocks at most `timeout`; returns whether the save is staged.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.inner.wait_done_timeout(timeout)
    }

    /// Whether the save no longer reads its sources.
    pub fn is_staged(&self) -> bool {
        self.inner.is_done()
    }
}

impl Future for Staged {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.inner.poll_done(cx) {
            Some(_) => Poll::Ready(()),
            None => Poll::Pending,
        }
    }
}

/// The *durable* completion of a save: its [`SaveReport`] once the checkpoint is committed,
/// or the error of this save.
///
/// Dropping it before taking a failed result hands the error to
/// [`AsyncCheckpointIO::teardown`], which reports it.
pub struct Durable {
    inner: Arc<Completion<Result<SaveReport>>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable").field("done", &self.is_done()).finish()
    }
}

fn taken_twice() -> Error {
    Error::Unavailable("the result of this save (it was already taken)".into())
}

impl Durable {
    /// Blocks until the save is committed or has failed; returns its report or error.
    pub fn wait(self) -> Result<SaveReport> {
        let mut slot = self.inner.wait_done();
        slot.value.take().unwrap_or_else(|| Err(taken_twice()))
    }

    /// Blocks at most `timeout`; returns whether the save has finished (committed or
    /// failed). The result stays for [`Durable::wait`].
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.inner.wait_done_timeout(timeout)
    }

    /// Whether the save has finished (committed or failed).
    pub fn is_done(&self) -> bool {
        self.inner.is_done()
    }
}

impl Future for Durable {
    type Output = Result<SaveReport>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.inner.poll_done(cx) {
            Some(mut slot) => Poll::Ready(slot.value.take().unwrap_or_else(|| Err(taken_twice()))),
            None => Poll::Pending,
        }
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        let unobserved = {
            let mut slot = lock(&self.inner.slot);
            slot.abandoned = true;
            match slot.value.take() {
                Some(Err(e)) => Some(e),
                _ => None,
            }
        };
        if let Some(err) = unobserved {
            lock(&self.shared.state).unobserved.push(err);
        }
    }
}

/// What [`AsyncCheckpointIO::save_checkpoint`] returns: the save's two completions.
#[derive(Debug)]
pub struct SaveHandle {
    path: PathBuf,
    staged: Staged,
    durable: Durable,
}

impl SaveHandle {
    /// The checkpoint path of this save.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The *staged* completion (the sources may be changed or freed once it resolves).
    pub fn staged(&self) -> Staged {
        self.staged.clone()
    }

    /// The *durable* completion (resolves to this save's report or error).
    pub fn durable(self) -> Durable {
        self.durable
    }

    /// Whether the sources are released.
    pub fn is_staged(&self) -> bool {
        self.staged.is_staged()
    }

    /// Whether the save has finished (committed or failed).
    pub fn is_done(&self) -> bool {
        self.durable.is_done()
    }

    /// Blocks until durable: `self.durable().wait()`.
    pub fn wait(self) -> Result<SaveReport> {
        self.durable.wait()
    }
}

/// State shared by the wrapper, its save threads and the handles.
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    /// Paths claimed by saves in flight (and by removals and loads while they run).
    busy_paths: Vec<PathBuf>,
    /// Errors of saves whose `Durable` was dropped unobserved.
    unobserved: Vec<Error>,
    threads: Vec<JoinHandle<()>>,
    /// Snapshot areas kept for reuse.
    snapshots: Vec<AlignedBuf>,
}

impl Shared {
    fn wait_until<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        ready: impl Fn(&State) -> bool,
    ) -> MutexGuard<'a, State> {
        while !ready(&state) {
            state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        state
    }

    fn release(&self, path: &Path, save: bool) {
        let mut state = lock(&self.state);
        if let Some(i) = state.busy_paths.iter().position(|p| p == path) {
            state.busy_paths.swap_remove(i);
        }
        if save {
            state.in_flight -= 1;
        }
        self.changed.notify_all();
    }
}

/// Releases a claimed path (and an in-flight slot) when dropped, even on panic.
struct Claim {
    shared: Arc<Shared>,
    path: PathBuf,
    save: bool,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.shared.release(&self.path, self.save);
    }
}

/// Runs the saves of any [`CheckpointIO`] in the background. See the [module docs](self).
pub struct AsyncCheckpointIO<C: CheckpointIO + 'static> {
    inner: Arc<C>,
    options: AsyncOptions,
    shared: Arc<Shared>,
}

impl AsyncCheckpointIO<UringCheckpointIO> {
    /// The default checkpoint writer with this config, made asynchronous as the config's
    /// `async_mode` and `max_saves_in_flight` say.
    pub fn from_config(config: Config) -> Result<Self> {
        let options = AsyncOptions::from_config(&config);
        AsyncCheckpointIO::new(UringCheckpointIO::new(config)?, options)
    }
}

impl<C: CheckpointIO + 'static> AsyncCheckpointIO<C> {
    /// Wraps `inner`.
    pub fn new(inner: C, options: AsyncOptions) -> Result<Self> {
        if options.max_saves_in_flight == 0 {
            return Err(Error::Config("max_saves_in_flight must be at least 1, got 0".into()));
        }
        Ok(AsyncCheckpointIO {
            inner: Arc::new(inner),
            options,
            shared: Arc::new(Shared { state: Mutex::new(State::default()), changed: Condvar::new() }),
        })
    }

    /// The wrapped checkpoint IO.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// How saves run.
    pub fn options(&self) -> AsyncOptions {
        self.options
    }

    /// Saves running now.
    pub fn in_flight(&self) -> usize {
        lock(&self.shared.state).in_flight
    }

    /// Starts saving `checkpoint` at `path` in the background and returns its handle.
    ///
    /// Waits first while `max_saves_in_flight` saves are running, or while a save to the
    /// same path is. A malformed checkpoint is refused here; every other failure goes to
    /// the handle's [`Durable`].
    pub fn save_checkpoint(&self, checkpoint: OwnedCheckpoint, path: impl AsRef<Path>) -> Result<SaveHandle> {
        let called = Instant::now();
        let path = path.as_ref().to_path_buf();
        checkpoint.as_checkpoint().validate()?;
        let key = absolute(&path)?;
        let max = self.options.max_saves_in_flight;
        {
            let state = lock(&self.shared.state);
            let mut state =
                self.shared.wait_until(state, |s| s.in_flight < max && !s.busy_paths.contains(&key));
            state.in_flight += 1;
            state.busy_paths.push(key.clone());
        }
        let claim = Claim { shared: self.shared.clone(), path: key, save: true };
        let staged = Completion::new();
        let durable = Completion::new();
        let job = SaveJob {
            inner: self.inner.clone(),
            mode: self.options.mode,
            shared: self.shared.clone(),
            checkpoint,
            path: path.clone(),
            called,
            staged: staged.clone(),
            durable: durable.clone(),
            claim,
        };
        let thread = std::thread::Builder::new()
            .name("uring-ckpt-save".into())
            .spawn(move || job.run())
            .map_err(|e| Error::io("spawn save thread", &path, e))?;
        {
            let mut state = lock(&self.shared.state);
            let (finished, running): (Vec<_>, Vec<_>) =
                std::mem::take(&mut state.threads).into_iter().partition(|t| t.is_finished());
            state.threads = running;
            state.threads.push(thread);
            drop(state);
            for t in finished {
                let _ = t.join();
            }
        }
        Ok(SaveHandle {
            path,
            staged: Staged { inner: staged },
            durable: Durable { inner: durable, shared: self.shared.clone() },
        })
    }

    /// Runs `f` while holding `path` (after any save in flight to it has finished).
    fn with_path<T>(&self, path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let key = absolute(path)?;
        {
            let state = lock(&self.shared.state);
            let mut state = self.shared.wait_until(state, |s| !s.busy_paths.contains(&key));
            state.busy_paths.push(key.clone());
        }
        let _claim = Claim { shared: self.shared.clone(), path: key, save: false };
        f()
    }

    /// Loads the checkpoint at `path`, after any save in flight to it has finished.
    pub fn load_checkpoint(&self, path: impl AsRef<Path>, options: &LoadOptions) -> Result<LoadedCheckpoint> {
        let path = path.as_ref();
        self.with_path(path, || self.inner.load_checkpoint(path, options))
    }

    /// Removes the checkpoint at `path`, after any save in flight to it has finished.
    pub fn remove_checkpoint(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.with_path(path, || self.inner.remove_checkpoint(path))
    }

    /// Blocks until no save is in flight.
    pub fn wait_all(&self) {
        let state = lock(&self.shared.state);
        let mut state = self.shared.wait_until(state, |s| s.in_flight == 0);
        let threads = std::mem::take(&mut state.threads);
        drop(state);
        for t in threads {
            let _ = t.join();
        }
    }

    /// Waits for every pending save, then reports the failures of saves whose [`Durable`]
    /// was dropped without its result being taken: the first is returned, every one is
    /// logged. Failures taken through a handle are not repeated here.
    pub fn teardown(&self) -> Result<()> {
        self.wait_all();
        let errors = std::mem::take(&mut lock(&self.shared.state).unobserved);
        let count = errors.len();
        let mut errors = errors.into_iter();
        let first = errors.next();
        for (i, err) in errors.enumerate() {
            log::error!("background save failed ({} of {count}): {err}", i + 2);
        }
        match first {
            None => Ok(()),
            Some(err) => {
                log::error!("background save failed (1 of {count}): {err}");
                Err(err)
            }
        }
    }
}

impl<C: CheckpointIO + 'static> Drop for AsyncCheckpointIO<C> {
    /// Waits for pending saves; logs the errors nobody took (see [`AsyncCheckpointIO::teardown`]).
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

/// `path` made absolute against the current directory.
fn absolute(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let cwd = std::env::current_dir().map_err(|e| Error::io("current directory", path, e))?;
    Ok(cwd.join(path))
}

/// Everything one background save needs.
struct SaveJob<C: CheckpointIO + 'static> {
    inner: Arc<C>,
    mode: AsyncMode,
    shared: Arc<Shared>,
    checkpoint: OwnedCheckpoint,
    path: PathBuf,
    called: Instant,
    staged: Arc<Completion<()>>,
    durable: Arc<Completion<Result<SaveReport>>>,
    claim: Claim,
}

impl<C: CheckpointIO + 'static> SaveJob<C> {
    fn run(self) {
        let SaveJob { inner, mode, shared, checkpoint, path, called, staged, durable, claim } = self;
        let staged_at: Mutex<Option<Instant>> = Mutex::new(None);
        let on_staged = || {
            let mut at = lock(&staged_at);
            if at.is_none() {
                *at = Some(Instant::now());
                drop(at);
                staged.complete(());
            }
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| match mode {
            AsyncMode::Stream => {
                let result = inner.save_checkpoint_staged(&checkpoint.as_checkpoint(), &path, &on_staged);
                drop(checkpoint);
                result
            }
            AsyncMode::Snapshot => snapshot_save(&*inner, &shared, checkpoint, &path, &on_staged),
        }));
        let result = outcome.unwrap_or_else(|_| {
            Err(Error::Unavailable(format!("the save of {} (its thread panicked)", path.display())))
        });
        on_staged(); // whatever happened, nothing reads the sources any more
        let result = result.map(|mut report| {
            let staged = lock(&staged_at).unwrap_or_else(Instant::now);
            report.stall_seconds = staged.saturating_duration_since(called).as_secs_f64();
            report.seconds = called.elapsed().as_secs_f64();
            report.throughput_mib_s = mib_per_s(report.file_bytes, report.seconds);
            report
        });
        if let Err(e) = &result {
            log::warn!("asynchronous save of {} failed: {e}", path.display());
        }
        if let Some(Err(err)) = durable.complete(result) {
            lock(&shared.state).unobserved.push(err);
        }
        drop(claim);
    }
}

/// Snapshot mode: copies every tensor into one aligned host area (reused across saves),
/// releases the sources, then saves from the copy.
fn snapshot_save<C: CheckpointIO>(
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
    let mut area = take_snapshot_area(shared, total);
    let copy_started = Instant::now();
    let copied = copy_snapshot(&checkpoint, &offsets, &mut area.as_full_mut_slice()[..total]);
    let snapshot_seconds = copy_started.elapsed().as_secs_f64();
    // Nothing reads the sources any more: release them before saying so.
    let OwnedCheckpoint { tensors, metadata, extra_files } = checkpoint;
    let specs: Vec<(String, Dtype, Vec<u64>, usize)> =
        tensors.into_iter().map(|t| (t.name, t.dtype, t.shape, t.source.len())).collect();
    on_staged();
    let result = copied.and_then(|()| {
        area.set_len(total);
        let view = Checkpoint {
            tensors: specs
                .iter()
                .zip(&offsets)
                .map(|((name, dtype, shape, len), &start)| TensorView {
                    name: name.clone(),
                    dtype: *dtype,
                    shape: shape.clone(),
                    data: TensorData::Host(&area[start..start + len]),
                })
                .collect(),
            metadata,
            extra_files: extra_files.iter().map(|(n, b)| (n.clone(), &b[..])).collect(),
        };
        inner.save_checkpoint(&view, path)
    });
    area.clear();
    lock(&shared.state).snapshots.push(area);
    let mut report = result?;
    // The snapshot copy ran before any write: it adds copy time, not overlap.
    let both = report.overlap_ratio * report.copy_seconds.min(report.write_seconds);
    report.copy_seconds += snapshot_seconds;
    let shorter = report.copy_seconds.min(report.write_seconds);
    report.overlap_ratio = if shorter > 0.0 { (both / shorter).clamp(0.0, 1.0) } else { 0.0 };
    report.staged_bytes += total as u64;
    Ok(report)
}

/// A kept snapshot area of at least `len` bytes, or a new one.
fn take_snapshot_area(shared: &Shared, len: usize) -> AlignedBuf {
    let mut state = lock(&shared.state);
    let fits = state
        .snapshots
        .iter()
        .enumerate()
        .filter(|(_, b)| b.capacity() >= len)
        .min_by_key(|(_, b)| b.capacity());
    if let Some((i, _)) = fits {
        return state.snapshots.swap_remove(i);
    }
    // None is large enough: replace the largest (the checkpoint grew).
    if let Some(i) = (0..state.snapshots.len()).max_by_key(|&i| state.snapshots[i].capacity()) {
        drop(state.snapshots.swap_remove(i));
    }
    drop(state);
    AlignedBuf::zeroed(len, SNAPSHOT_ALIGN)
}

/// Copies every tensor to its offset in `dst`, in pieces spread over a few threads.
fn copy_snapshot(checkpoint: &OwnedCheckpoint, offsets: &[usize], dst: &mut [u8]) -> Result<()> {
    struct Piece<'a> {
        source: &'a dyn TensorSource,
        offset: usize,
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
            let n = tensor_dst.len().min(SNAPSHOT_PIECE);
            let (piece, more) = std::mem::take(&mut tensor_dst).split_at_mut(n);
            pieces.push(Piece { source: &*t.source, offset, dst: piece });
            tensor_dst = more;
            offset += n;
        }
    }
    let threads =
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(SNAPSHOT_THREADS).min(pieces.len());
    let queue = Mutex::new(pieces.into_iter());
    let copy = || -> Result<()> {
        loop {
            let next = lock(&queue).next();
            let Some(piece) = next else { return Ok(()) };
            match piece.source.host_bytes() {
                Some(bytes) => {
                    piece.dst.copy_from_slice(&bytes[piece.offset..piece.offset + piece.dst.len()])
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
            let result = h
                .join()
                .unwrap_or_else(|_| Err(Error::Unavailable("a snapshot copy thread (it panicked)".into())));
            if first.is_ok() {
                first = result;
            }
        }
        first
    })
}
