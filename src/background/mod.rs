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
