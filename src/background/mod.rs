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
//!   [`AsyncCheckpointIO::reserve_snapshot`] makes and faults in an area ahead of the first
//!   save, on a helper thread, so that the first save stalls no longer than later ones.
//!
//! Once a snapshot save is staged its thread drops to the nice value `background_nice`
//! (the threads it starts then inherit it), and [`AsyncCheckpointIO::from_config`] bounds
//! its writer threads by `background_threads`: the write takes little CPU from the work the
//! caller goes on with.
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

mod completion;
mod job;
mod owned;
mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use completion::{lock, Completion};
pub use completion::{Durable, SaveHandle, Staged};
use job::{Claim, SaveJob, Shared, State};
pub use owned::{OwnedCheckpoint, OwnedTensor};
pub use snapshot::SnapshotStats;

use crate::checkpoint::LoadedCheckpoint;
use crate::checkpoint_io::{CheckpointIO, LoadOptions, UringCheckpointIO};
use crate::config::{AsyncMode, Config};
use crate::error::{Error, Result};

/// How an [`AsyncCheckpointIO`] runs saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncOptions {
    /// How the sources are staged. Default [`AsyncMode::Stream`].
    pub mode: AsyncMode,
    /// Saves running at once (at least 1). Default 1.
    pub max_saves_in_flight: usize,
    /// Nice value a snapshot save's thread takes once staged (the threads it starts then
    /// inherit it), and that reservations fault areas in at; 0 keeps the caller's. Default
    /// 10, as the config's `background_nice`.
    pub background_nice: u32,
}

impl Default for AsyncOptions {
    fn default() -> Self {
        AsyncOptions { mode: AsyncMode::Stream, max_saves_in_flight: 1, background_nice: 10 }
    }
}

impl AsyncOptions {
    /// The config's `async_mode`, `max_saves_in_flight` and `background_nice`.
    pub fn from_config(config: &Config) -> Self {
        AsyncOptions {
            mode: config.async_mode,
            max_saves_in_flight: config.max_saves_in_flight as usize,
            background_nice: config.background_nice,
        }
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
    /// `async_mode`, `max_saves_in_flight` and `background_nice` say. In snapshot mode its
    /// saves write with at most `background_threads` threads
    /// ([`UringCheckpointIO::for_background`]); in stream mode, whose caller waits for the
    /// write (staged comes with its last byte), as a synchronous save does.
    pub fn from_config(config: Config) -> Result<Self> {
        let options = AsyncOptions::from_config(&config);
        let inner = match config.async_mode {
            AsyncMode::Snapshot => UringCheckpointIO::for_background(config)?,
            AsyncMode::Stream => UringCheckpointIO::new(config)?,
        };
        AsyncCheckpointIO::new(inner, options)
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
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                options,
            }),
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

    /// Reserves a snapshot area of at least `bytes` off the critical path: made (or a kept
    /// one grown, keeping its pages) now, and faulted in by a helper thread at
    /// `background_nice`, so that the next save copies into memory that is already there
    /// instead of faulting it in while its caller waits. Returns at once.
    ///
    /// A save that comes while the helper is still at work stops it (waiting one step of
    /// 2 MiB at most) and faults the rest in as it copies: it is never slower than without
    /// the reservation. Memory: the area is `bytes` until the first save that uses it,
    /// then that save's size (rounded up to 2 MiB). With every area in use by a save (and
    /// `max_saves_in_flight` of them), the first to come back is grown. Snapshot mode only
    /// (a [`Error::Config`] otherwise).
    pub fn reserve_snapshot(&self, bytes: usize) -> Result<()> {
        if self.options.mode != AsyncMode::Snapshot {
            return Err(Error::Config(format!(
                "reserving a snapshot area needs async_mode snapshot, not {}",
                self.options.mode
            )));
        }
        let mut state = lock(&self.shared.state);
        snapshot::reserve(&mut state, bytes, self.options.max_saves_in_flight, self.options.background_nice);
        Ok(())
    }

    /// Blocks until no kept snapshot area is being faulted in by a reservation (one waiting
    /// for an area in use is not waited for).
    pub fn wait_reserved(&self) {
        snapshot::wait_reserved(&self.shared);
    }

    /// The snapshot areas kept and in use, how much of them is faulted in, and whether a
    /// reservation is at work.
    pub fn snapshot_stats(&self) -> SnapshotStats {
        snapshot::snapshot_stats(&lock(&self.shared.state))
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
        Ok(SaveHandle::new(path, staged, durable, self.shared.clone()))
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
