//! Real faults, no injection: ENOSPC on a small loop-mounted ext4 file system (in the middle
//! of a shard, and in the manifest), and saves killed with SIGKILL at random moments.
//! Tests that cannot run here (not root, no loop devices) print `skipped: <reason>`.

use crate::common;
use crate::reliability;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{entries, files_of, scratch};
use reliability::loopfs::LoopFs;
use reliability::{fault_config, newest_step, no_core_dumps, temp_dirs, Data};
use uring_ckpt::config::EngineKind;
use uring_ckpt::{retention, CheckpointIO, Error, UringCheckpointIO};

fn loop_fs(name: &str) -> Option<LoopFs> {
    match LoopFs::new(name, 32) {
        Ok(fs) => Some(fs),
        Err(reason) => {
            println!("skipped: {reason}");
            None
        }
    }
}

#[test]
fn enospc_in_the_middle_of_a_shard_fails_cleanly_on_every_engine() {
    let Some(lfs) = loop_fs("enospc-shard") else { return };
    let (old, new) = (Data::sized(1, &[100_000, 3]), Data::new(2));
    let mut tried = 0;
    for engine in common::ENGINES {
        let config = fault_config(engine);
        let io = UringCheckpointIO::new(config.clone()).expect("config");
        let path = lfs.path().join("ckpt");
        io.save_checkpoint(&old.checkpoint(), &path).expect("previous checkpoint");
        let before = files_of(&path);
        // About 1 MiB free for a 2.2 MiB checkpoint: the disk fills in the middle of a shard.
        lfs.fill_leaving(1 << 20);
        let err = io.save_checkpoint(&new.checkpoint(), &path).expect_err("no space");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{engine}: {err}");
        assert!(
            matches!(&err, Error::Io { path: p, .. } if p.to_string_lossy().ends_with(".safetensors")),
            "{engine}: {err}"
        );
        assert!(files_of(&path) == before, "{engine}: previous checkpoint changed");
        old.assert_loads(&config, &path, engine.as_str());
        assert_eq!(entries(lfs.path()), ["ckpt", "filler", "lost+found"], "{engine}");
        lfs.unfill();
        io.save_checkpoint(&new.checkpoint(), &path).expect("save with space again");
        new.assert_loads(&config, &path, engine.as_str());
        std::fs::remove_dir_all(&path).expect("rm");
        tried += 1;
    }
    println!("real ENOSPC mid-shard cases: {tried}");
}

#[test]
fn enospc_in_the_manifest_fails_cleanly() {
    let Some(lfs) = loop_fs("enospc-manifest") else { return };
    let config = fault_config(EngineKind::Uring);
    let io = UringCheckpointIO::new(config.clone()).expect("config");
    let (old, new) = (Data::sized(3, &[50_000]), Data::sized(4, &[200_000, 7]));
    let path = lfs.path().join("ckpt");
    io.save_checkpoint(&old.checkpoint(), &path).expect("previous");
    // Leave k blocks free, k growing, until the shards fit but the manifest does not.
    let mut seen = Vec::new();
    let mut manifest_enospc = false;
    for k in 1..=80u64 {
        lfs.fill_leaving(k * 4096);
        match io.save_checkpoint(&new.checkpoint(), &path) {
            Ok(_) => break,
            Err(err) => {
                assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "k={k}: {err}");
                old.assert_loads(&config, &path, "after ENOSPC");
                assert!(temp_dirs(lfs.path()).is_empty(), "k={k}: {:?}", entries(lfs.path()));
                if let Error::Io { op, path: p, .. } = &err {
                    seen.push(format!("{op} {}", p.file_name().unwrap_or_default().to_string_lossy()));
                    if p.ends_with("manifest.json") {
                        manifest_enospc = true;
                        break;
                    }
                }
            }
        }
    }
    seen.dedup();
    assert!(manifest_enospc, "never ran out of space exactly at the manifest; failures seen: {seen:?}");
    lfs.unfill();
    io.save_checkpoint(&new.checkpoint(), &path).expect("save with space again");
    new.assert_loads(&config, &path, "after the fs has space again");
    println!("real ENOSPC in the manifest: hit after failures at {seen:?}");
}

/// Child of the SIGKILL loop: saves `step-N` checkpoints forever, each followed by
/// `set_latest` and `keep_last(3)`. Does nothing unless started by the parent.
#[test]
fn kill_child() {
    let Ok(dir) = std::env::var("KILL_DIR") else { return };
    let dir = PathBuf::from(dir);
    let io = UringCheckpointIO::new(fault_config(EngineKind::Uring)).expect("config");
    // Stops by itself if the test that started it is gone.
    let parent = std::env::var("KILL_PARENT").ok().and_then(|p| p.parse().ok());
    reliability::save_steps_until_killed(&io, &dir, 3, parent, step_data)
}

fn step_data(step: u64) -> Data {
    Data::sized(step, &[300_000, 70_000, 1 << 20, 5])
}

#[test]
fn saves_killed_at_random_moments_leave_the_latest_valid_checkpoint() {
    let dir = scratch();
    let config = fault_config(EngineKind::Uring);
    let exe = std::env::current_exe().expect("exe");
    let child_test = reliability::test_name(module_path!(), "kill_child");
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let runs = 30;
    let mut loaded = 0;
    for run in 0..runs {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(20 + rng % 150);
        let mut cmd = Command::new(&exe);
        cmd.args(["--exact", &child_test, "--nocapture", "--test-threads=1"])
            .env("KILL_DIR", dir.path())
            .env("KILL_PARENT", std::process::id().to_string())
            .stdout(Stdio::null());
        no_core_dumps(&mut cmd);
        let mut child = cmd.spawn().expect("spawn");
        std::thread::sleep(delay);
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("wait");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "run {run}: the child must still be saving ({status})"
        );

        // Every committed checkpoint is whole; the latest valid one loads.
        let committed = retention::list_committed(dir.path()).expect("list");
        for path in &committed {
            let step =
                path.file_name().and_then(|n| n.to_str()?.strip_prefix("step-")?.parse().ok()).expect("step");
            step_data(step).assert_loads(&config, path, &format!("run {run}"));
        }
        if let Some(latest) = retention::latest_valid(&config, dir.path()).expect("latest_valid") {
            let step = latest
                .file_name()
                .and_then(|n| n.to_str()?.strip_prefix("step-")?.parse().ok())
                .expect("step");
            step_data(step).assert_loads(&config, &latest, &format!("run {run}: latest"));
            loaded += 1;
        } else {
            assert!(committed.is_empty(), "run {run}: committed checkpoints but none valid");
        }
        assert!(temp_dirs(dir.path()).len() <= 2, "run {run}: leftovers pile up: {:?}", entries(dir.path()));
    }
    assert!(newest_step(dir.path()) >= 3, "the loop made progress");
    println!(
        "SIGKILL runs: {runs}, latest valid checkpoint loaded and verified after {loaded}; newest step {}",
        newest_step(dir.path())
    );
}
