//! Power loss at each step of the commit protocol, for real: the ext4 shutdown ioctl
//! (`EXT4_IOC_SHUTDOWN`) on a loop-mounted file system, fired from a failpoint callback at
//! the chosen step. Then unmount, mount again (replaying the journal) and check that the
//! path holds the previous checkpoint or the new one, whole, never a partial one; and the
//! new one for steps after the parent directory's fsync. Skipped with a printed reason
//! where loop devices or root are not available.

use crate::reliability;

use reliability::loopfs::{shutdown, LoopFs, EXT4_GOING_FLAGS_LOGFLUSH, EXT4_GOING_FLAGS_NOLOGFLUSH};
use reliability::{fault_config, temp_dirs, Data};
use uring_ckpt::config::EngineKind;
use uring_ckpt::{CheckpointIO, UringCheckpointIO};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Must {
    Old,
    Either,
    New,
}

#[test]
fn power_loss_at_each_step_leaves_the_previous_or_the_new_checkpoint() {
    let _alone = crate::alone();
    let mut lfs = match LoopFs::new("power-loss", 32) {
        Ok(fs) => fs,
        Err(reason) => {
            println!("skipped: {reason}");
            return;
        }
    };
    let points = [
        (EngineKind::Uring, "uring.write.complete", Must::Old),
        (EngineKind::Pwrite, "pwrite.write", Must::Old),
        (EngineKind::Uring, "file.fdatasync", Must::Old),
        (EngineKind::Uring, "commit.after_shards", Must::Old),
        (EngineKind::Uring, "commit.after_manifest_write", Must::Old),
        (EngineKind::Uring, "commit.after_manifest_fsync", Must::Old),
        (EngineKind::Uring, "commit.after_dir_fsync", Must::Old),
        (EngineKind::Uring, "commit.after_rename", Must::Either),
        (EngineKind::Uring, "commit.after_parent_fsync", Must::New),
    ];
    let (old, new) = (Data::new(31), Data::new(32));
    let mut tried = 0;
    let mut outcomes = Vec::new();
    for flags in [EXT4_GOING_FLAGS_NOLOGFLUSH, EXT4_GOING_FLAGS_LOGFLUSH] {
        for &(engine, point, must) in &points {
            let what = format!("power loss at {point} on {engine} (flags {flags})");
            let config = fault_config(engine);
            let io = UringCheckpointIO::new(config.clone()).expect("config");
            let path = lfs.path().join("ckpt");
            io.save_checkpoint(&old.checkpoint(), &path).expect("previous checkpoint");

            let fd = lfs.dir_fd();
            let scenario = fail::FailScenario::setup();
            fail::cfg_callback(point, move || {
                shutdown(fd, flags);
            })
            .expect("callback");
            let result = io.save_checkpoint(&new.checkpoint(), &path);
            fail::remove(point);
            drop(scenario);
            // SAFETY: fd was opened by dir_fd and is not used after this.
            unsafe { libc::close(fd) };
            if must != Must::New {
                assert!(result.is_err(), "{what}: a save on a shut-down file system cannot succeed");
            }

            lfs.remount().unwrap_or_else(|e| panic!("{what}: remount: {e}"));
            let is_old = old.matches(&config, &path);
            let is_new = new.matches(&config, &path);
            match must {
                Must::Old => assert!(is_old, "{what}: the previous checkpoint must be intact"),
                Must::New => assert!(is_new, "{what}: the durable new checkpoint must be there"),
                Must::Either => assert!(is_old || is_new, "{what}: neither the old nor the new checkpoint"),
            }
            outcomes.push(format!("{point}/{flags}: {}", if is_new { "new" } else { "old" }));
            // The next save cleans up whatever the power loss left.
            let mut replace = config.clone();
            replace.replace_existing = true;
            UringCheckpointIO::new(replace)
                .expect("config")
                .save_checkpoint(&new.checkpoint(), &path)
                .unwrap_or_else(|e| panic!("{what}: save after remount: {e}"));
            assert!(temp_dirs(lfs.path()).is_empty(), "{what}: {:?}", temp_dirs(lfs.path()));
            std::fs::remove_dir_all(&path).expect("rm");
            tried += 1;
        }
    }
    println!("power-loss points tried: {tried}; outcomes: {outcomes:?}");
}
