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
use super::snapshot::{snapshot_save, SnapshotArea};
use super::AsyncOptions;
use crate::checkpoint::SaveReport;
use crate::checkpoint_io::CheckpointIO;
use crate::config::AsyncMode;
use crate::error::{Error, Result};
use crate::report::StagedSignal;
use crate::source::Releasable;

/// State shared by the wrapper, its save threads and the handles.
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) changed: Condvar,
    /// The wrapper's options.
    pub(super) options: AsyncOptions,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) in_flight: usize,
    /// Paths claimed by saves in flight (and by removals and loads while they run).
    pub(super) busy_paths: Vec<PathBuf>,
    /// Errors of saves whose `Durable` was dropped unobserved.
    pub(super) unobserved: Vec<Error>,
    pub(super) threads: Vec<JoinHandle<()>>,
    /// Snapshot areas kept for reuse (each unregisters itself before it is freed).
    pub(super) snapshots: Vec<SnapshotArea>,
    /// Snapshot areas taken by saves running now.
    pub(super) areas_in_use: usize,
    /// Bytes a reservation asked for that waits for an area to come back (0: none).
    pub(super) pending_reserve: usize,
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
                // Sources (and what they hold: a tensor, a temporary contiguous copy) are let
                // go of once staged, not once durable.
                let (checkpoint, releasable) = releasable_sources(checkpoint);
                let release_then_signal = || {
                    for r in &releasable {
                        r.release();
                    }
                    on_staged();
                };
                let result =
                    inner.save_checkpoint_staged(&checkpoint.as_checkpoint(), &path, &release_then_signal);
                drop(checkpoint);
                result
            }
            AsyncMode::Snapshot => snapshot_save(&*inner, &shared, checkpoint, &path, &on_staged),
        }));
        let result = outcome.unwrap_or_else(|_| {
            Err(Error::Internal(format!("the thread saving {} panicked", path.display())))
        });
        on_staged(); // whatever happened, nothing reads the sources any more (dropped above)
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

/// `checkpoint` with each device source (one without host bytes) wrapped in a
/// [`Releasable`], and those wrappers, which the save releases at *staged*: device memory
/// goes back before the write, fsync and commit. The stream mode runs without zero-copy
/// writes, so no write reads a source after staged. Host sources are left as they are: a
/// wrapper would hide their bytes and turn the one-pass copy + CRC into a copy and a second
/// CRC pass.
pub(super) fn releasable_sources(mut checkpoint: OwnedCheckpoint) -> (OwnedCheckpoint, Vec<Arc<Releasable>>) {
    let mut releasable = Vec::with_capacity(checkpoint.tensors.len());
    for t in &mut checkpoint.tensors {
        if t.source.host_bytes().is_some() {
            continue;
        }
        let wrapped = Arc::new(Releasable::new(t.source.clone()));
        t.source = wrapped.clone();
        releasable.push(wrapped);
    }
    (checkpoint, releasable)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::background::{AsyncCheckpointIO, AsyncOptions, OwnedCheckpoint};
    use crate::checkpoint_io::{LoadOptions, UringCheckpointIO};
    use crate::config::{AsyncMode, Config};
    use crate::format::Dtype;
    use crate::source::{SimulatedDevice, SimulatedTensor, TensorSource};

    use super::*;

    /// A simulated device tensor that says when it is dropped.
    struct Probe {
        tensor: SimulatedTensor,
        dropped: Arc<AtomicBool>,
    }

    impl TensorSource for Probe {
        fn len(&self) -> usize {
            self.tensor.len()
        }
        fn host_bytes(&self) -> Option<&[u8]> {
            None
        }
        fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
            self.tensor.copy_to(offset, dst)
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn save_with_probes(mode: AsyncMode, parent_exists: bool) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config =
            Config::builder().chunk_size(1 << 16).staging_pool_size(1 << 18).build().expect("config");
        let io = AsyncCheckpointIO::new(
            UringCheckpointIO::new(config).expect("io"),
            AsyncOptions { mode, max_saves_in_flight: 1, ..AsyncOptions::default() },
        )
        .expect("async io");
        let device = SimulatedDevice::new(4 << 30).expect("device");
        let mut ck = OwnedCheckpoint::new();
        let mut flags = Vec::new();
        let mut expected = Vec::new();
        for i in 0..3u64 {
            let tensor = device.generated(200_000 + i as usize, i);
            expected.push(tensor.to_host().expect("to host"));
            let dropped = Arc::new(AtomicBool::new(false));
            flags.push(dropped.clone());
            ck.add(format!("t{i}"), Dtype::U8, &[200_000 + i], Arc::new(Probe { tensor, dropped }))
                .expect("add");
        }
        let host: Arc<dyn TensorSource> = Arc::new(vec![1u8, 2, 3, 4]);
        let host_weak = Arc::downgrade(&host);
        ck.add("host", Dtype::U8, &[4], host).expect("add");
        std::fs::write(dir.path().join("file"), b"not a directory").expect("file");
        let path = if parent_exists { dir.path().join("c") } else { dir.path().join("file/c") };
        let handle = io.save_checkpoint(ck, &path).expect("save");
        handle.staged().wait();
        for (i, f) in flags.iter().enumerate() {
            assert!(f.load(Ordering::SeqCst), "{mode}: source {i} still held when staged resolved");
        }
        if mode == AsyncMode::Snapshot {
            assert!(host_weak.upgrade().is_none(), "{mode}: host source still held when staged resolved");
        }
        let result = handle.wait();
        // Stream mode keeps host sources (their bytes go straight into the one-pass copy +
        // CRC) until the save returns; then they are let go of too.
        assert!(host_weak.upgrade().is_none(), "{mode}: host source still held after the save");
        if parent_exists {
            result.expect("durable");
            let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
            for (i, bytes) in expected.iter().enumerate() {
                assert!(loaded.get(&format!("t{i}")).expect("tensor").data[..] == bytes[..], "t{i}");
            }
        } else {
            assert!(result.is_err(), "a save beneath a regular file fails");
        }
    }

    #[test]
    fn device_sources_are_released_when_staged_not_when_durable() {
        for mode in [AsyncMode::Stream, AsyncMode::Snapshot] {
            save_with_probes(mode, true);
            save_with_probes(mode, false);
        }
    }

    #[test]
    fn device_sources_are_let_go_of_at_release_host_sources_stay_direct() {
        let mut ck = OwnedCheckpoint::new();
        let host: Arc<dyn TensorSource> = Arc::new(vec![1u8, 2]);
        let weak = Arc::downgrade(&host);
        ck.add("host", Dtype::U8, &[2], host).expect("add");
        let device = SimulatedDevice::new(1 << 30).expect("device");
        ck.add("dev", Dtype::U8, &[10], Arc::new(device.generated(10, 1))).expect("add");
        let (ck, releasable) = releasable_sources(ck);
        assert_eq!(releasable.len(), 1, "only the device source is wrapped");
        assert!(ck.tensors[0].source.host_bytes().is_some(), "host bytes stay visible: one-pass copy + CRC");
        let mut dst = [0u8; 10];
        ck.tensors[1].source.copy_to(0, &mut dst).expect("copy before release");
        for r in &releasable {
            r.release();
        }
        assert!(weak.upgrade().is_some(), "host memory is the caller's, held by the checkpoint");
        assert!(ck.tensors[1].source.copy_to(0, &mut dst).is_err(), "no read after release");
    }
}
