//! One background save from start to end ([`SaveJob`]), and the state the wrapper, its
//! save threads and the handles share: saves in flight, claimed paths, errors nobody took,
//! kept snapshot areas.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::completion::{lock, Completion};
use super::owned::OwnedCheckpoint;
use super::snapshot::snapshot_save;
use crate::checkpoint::SaveReport;
use crate::checkpoint_io::CheckpointIO;
use crate::config::AsyncMode;
use crate::error::{Error, Result};
use crate::io::AlignedBuf;
use crate::report::StagedSignal;

/// State shared by the wrapper, its save threads and the handles.
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) changed: Condvar,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) in_flight: usize,
    /// Paths claimed by saves in flight (and by removals and loads while they run).
    pub(super) busy_paths: Vec<PathBuf>,
    /// Errors of saves whose `Durable` was dropped unobserved.
    pub(super) unobserved: Vec<Error>,
    pub(super) threads: Vec<JoinHandle<()>>,
    /// Snapshot areas kept for reuse.
    pub(super) snapshots: Vec<AlignedBuf>,
}

impl Shared {
    pub(super) fn wait_until<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        ready: impl Fn(&State) -> bool,
    ) -> MutexGuard<'a, State> {
        while !ready(&state) {
            state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        state
    }

    pub(super) fn release(&self, path: &Path, save: bool) {
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
pub(super) struct Claim {
    pub(super) shared: Arc<Shared>,
    pub(super) path: PathBuf,
    pub(super) save: bool,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.shared.release(&self.path, self.save);
    }
}

/// Everything one background save needs.
pub(super) struct SaveJob<C: CheckpointIO + 'static> {
    pub(super) inner: Arc<C>,
    pub(super) mode: AsyncMode,
    pub(super) shared: Arc<Shared>,
    pub(super) checkpoint: OwnedCheckpoint,
    pub(super) path: PathBuf,
    pub(super) called: Instant,
    pub(super) staged: Arc<Completion<()>>,
    pub(super) durable: Arc<Completion<Result<SaveReport>>>,
    pub(super) claim: Claim,
}

impl<C: CheckpointIO + 'static> SaveJob<C> {
    pub(super) fn run(self) {
        let SaveJob { inner, mode, shared, checkpoint, path, called, staged, durable, claim } = self;
        let complete_staged = || {
            staged.complete(());
        };
        let signal = StagedSignal::new(Some(&complete_staged), called);
        let on_staged = || signal.fire();
        let outcome = catch_unwind(AssertUnwindSafe(|| match mode {
            AsyncMode::Stream => {
                let result = inner.save_checkpoint_staged(&checkpoint.as_checkpoint(), &path, &on_staged);
                drop(checkpoint);
                result
            }
            AsyncMode::Snapshot => snapshot_save(&*inner, &shared, checkpoint, &path, &on_staged),
        }));
        let result = outcome.unwrap_or_else(|_| {
            Err(Error::Internal(format!("the thread saving {} panicked", path.display())))
        });
        on_staged(); // whatever happened, nothing reads the sources any more
        let result = result.map(|mut report| {
            report.finish(called, signal.seconds());
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
