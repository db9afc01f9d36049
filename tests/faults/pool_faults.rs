//! Engine faults injected (feature `failpoints`) in the middle of multi-shard saves, seen
//! from the staging pool: every buffer comes back, registered once with the pool's
//! registration hook, and the next save through the same pool writes the same files.
//!
//! Alone in its process while it runs (`crate::alone`, as every test of this binary):
//! failpoints are process-wide, and these saves must not meet the faults of the other
//! failpoint tests (nor arm faults under them).

use crate::common;
use crate::reliability;

use common::{files_of, scratch};
use reliability::{fault_config, Data};
use uring_ckpt::config::EngineKind;
use uring_ckpt::{CheckpointIO, UringCheckpointIO};

fn uring_available() -> bool {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").unwrap_or_default();
    disabled.trim().is_empty() || disabled.trim() == "0"
}

/// Records the pool's registration hooks (as `cuMemHostRegister`/`cuMemHostUnregister`
/// would see them): each buffer registered at most once at a time, only registered buffers
/// unregistered.
#[derive(Default)]
struct Recorder {
    live: std::sync::Mutex<std::collections::HashSet<usize>>,
    problems: std::sync::Mutex<Vec<String>>,
}

impl uring_ckpt::io::Registrar for Recorder {
    fn name(&self) -> &str {
        "recording registrar"
    }

    fn register(&self, buf: &uring_ckpt::io::AlignedBuf) -> uring_ckpt::Result<()> {
        if !self.live.lock().expect("lock").insert(buf.as_ptr() as usize) {
            self.problems.lock().expect("lock").push(format!("{:p} registered twice", buf.as_ptr()));
        }
        Ok(())
    }

    fn unregister(&self, buf: &uring_ckpt::io::AlignedBuf) {
        if !self.live.lock().expect("lock").remove(&(buf.as_ptr() as usize)) {
            self.problems
                .lock()
                .expect("lock")
                .push(format!("{:p} unregistered, not registered", buf.as_ptr()));
        }
    }
}

/// An engine fault in the middle of a multi-shard save (writes of several shard workers in
/// flight) leaves every staging buffer back in the pool, registered once; the next save
/// through the same pool succeeds with the files of a fault-free save.
#[test]
fn engine_faults_mid_save_give_every_staging_buffer_back() {
    let _alone = crate::alone();
    use std::sync::Arc;
    use EngineKind::{Pwrite, Uring};
    if !uring_available() {
        println!("skipped: io_uring is disabled on this machine (kernel.io_uring_disabled)");
        return;
    }
    let faults = [
        (Uring, "uring.write.complete", "4*off->1*return(EIO)"),
        (Uring, "uring.submit", "3*off->1*return(EIO)"),
        (Pwrite, "pwrite.write", "4*off->1*return(EIO)"),
        (Uring, "file.fdatasync", "1*off->1*return(EIO)"),
    ];
    let data = Data::sized(4, &[700_000, 800_000, 900_000, (1 << 20) + 5, 4099]);
    for (engine, point, action) in faults {
        let what = format!("{engine:?} {point} = {action}");
        // Held for the whole case: no other test's failpoint fires in the saves below.
        let scenario = fail::FailScenario::setup();
        let dir = scratch();
        let io = UringCheckpointIO::new(fault_config(engine)).expect("config");
        let recorder = Arc::new(Recorder::default());
        io.prepare_staging(recorder.clone());
        let reference = dir.path().join("reference");
        io.save_checkpoint(&data.checkpoint(), &reference).expect("reference save");

        let path = dir.path().join("ckpt");
        fail::cfg(point, action).expect("failpoint action");
        let result = io.save_checkpoint(&data.checkpoint(), &path);
        fail::remove(point);
        assert_eq!(result.expect_err(&what).raw_os_error(), Some(libc::EIO), "{what}");

        let stats = io.staging_pool().stats();
        assert_eq!(stats.lent, 0, "{what}: {stats:?}");
        assert_eq!(stats.registered, vec![stats.idle], "{what}: {stats:?}");
        assert_eq!(recorder.live.lock().expect("lock").len(), stats.idle, "{what}");
        io.save_checkpoint(&data.checkpoint(), &path).expect("save after the fault");
        assert!(files_of(&path) == files_of(&reference), "{what}: files differ from a fault-free save");
        drop(io);
        assert!(recorder.live.lock().expect("lock").is_empty(), "{what}: the pool's end unregisters all");
        assert!(recorder.problems.lock().expect("lock").is_empty(), "{what}: {:?}", recorder.problems);
        drop(scenario);
    }
}
