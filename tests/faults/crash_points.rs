//! A crash (abort) at each step of a save and of retention, in a child process. Afterwards
//! the loader sees the previous checkpoint (crash before the commit's rename) or the new one
//! (after it), whole, never a partial one; the crashed save's temporary directory is
//! ignored by the loader and removed by the next save of that path.
//!
//! The child is this test binary, re-run on the single test `child` with the crash point in
//! `CRASH_POINT`; the failpoint's action `return(abort)` calls `std::process::abort()`.

use crate::common;
use crate::reliability;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use common::{entries, files_of, scratch};
use reliability::{fault_config, run_self, temp_dirs, Data};
use uring_ckpt::config::EngineKind;
use uring_ckpt::{retention, CheckpointIO, Error, LoadOptions, UringCheckpointIO};

const OLD_SEED: u64 = 10;
const NEW_SEED: u64 = 20;

/// Where a crash point lies relative to the commit.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Before,
    After,
}

fn engine_name(engine: EngineKind) -> String {
    engine.as_str().to_owned()
}

/// The child: saves (or runs retention) with the crash point armed. Does nothing unless
/// started by a parent test.
#[test]
fn child() {
    let _alone = crate::alone();
    let Ok(point) = std::env::var("CRASH_POINT") else { return };
    let dir = PathBuf::from(std::env::var("CRASH_DIR").expect("CRASH_DIR"));
    let engine: EngineKind = std::env::var("CRASH_ENGINE").expect("CRASH_ENGINE").parse().expect("engine");
    let action = std::env::var("CRASH_ACTION").unwrap_or_else(|_| "return(abort)".into());
    let config = fault_config(engine);
    fail::cfg(&point, &action).expect("failpoint");
    match std::env::var("CRASH_OP").as_deref() {
        Ok("keep_last") => {
            let _ = retention::keep_last(&dir, 2);
        }
        Ok("set_latest") => {
            let _ = retention::set_latest(&dir.join("step-2"));
        }
        _ => {
            let io = UringCheckpointIO::new(config).expect("config");
            let _ = io.save_checkpoint(&Data::new(NEW_SEED).checkpoint(), &dir.join("ckpt"));
        }
    }
    // The crash point was not reached.
    std::process::exit(3);
}

fn crash(dir: &Path, engine: EngineKind, point: &str, op: &str, action: &str) {
    let status = run_self(
        &reliability::test_name(module_path!(), "child"),
        &[
            ("CRASH_POINT", point.to_owned()),
            ("CRASH_DIR", dir.display().to_string()),
            ("CRASH_ENGINE", engine_name(engine)),
            ("CRASH_OP", op.to_owned()),
            ("CRASH_ACTION", action.to_owned()),
        ],
    );
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "{point} on {engine}: the child must die at the point ({status})"
    );
}

#[test]
fn crash_at_every_step_of_a_save() {
    let _alone = crate::alone();
    let steps: Vec<(EngineKind, &str, Side)> = {
        let mut v = Vec::new();
        for engine in common::ENGINES {
            v.push((engine, "file.fdatasync", Side::Before));
            v.push((engine, "file.ftruncate", Side::Before));
        }
        v.push((EngineKind::Uring, "uring.write.complete", Side::Before));
        v.push((EngineKind::Uring, "uring.submit", Side::Before));
        v.push((EngineKind::Pwrite, "pwrite.write", Side::Before));
        v.push((EngineKind::Buffered, "buffered.write", Side::Before));
        for point in [
            "commit.after_shards",
            "commit.manifest_write",
            "commit.after_manifest_write",
            "commit.manifest_fsync",
            "commit.after_manifest_fsync",
            "dir.fsync",
            "commit.after_dir_fsync",
            "commit.rename",
        ] {
            v.push((EngineKind::Uring, point, Side::Before));
        }
        v.push((EngineKind::Uring, "commit.after_rename", Side::After));
        v.push((EngineKind::Uring, "commit.after_parent_fsync", Side::After));
        v
    };
    let (old, new) = (Data::new(OLD_SEED), Data::new(NEW_SEED));
    let mut tried = 0;
    // Each point twice: replacing a checkpoint at the same path, and saving a new path next
    // to an older checkpoint.
    for replace in [true, false] {
        for &(engine, point, side) in &steps {
            let what = format!("crash at {point} on {engine} (replace: {replace})");
            let dir = scratch();
            let config = fault_config(engine);
            let io = UringCheckpointIO::new(config.clone()).expect("config");
            let target = dir.path().join("ckpt");
            let previous = if replace { target.clone() } else { dir.path().join("older") };
            io.save_checkpoint(&old.checkpoint(), &previous).expect("previous checkpoint");
            let before = files_of(&previous);

            crash(dir.path(), engine, point, "save", "return(abort)");
            tried += 1;

            // What the loader sees.
            match (side, replace) {
                (Side::Before, true) => old.assert_loads(&config, &target, &what),
                (Side::Before, false) => {
                    assert!(!target.exists(), "{what}: nothing may be committed");
                    old.assert_loads(&config, &previous, &what);
                }
                (Side::After, _) => {
                    new.assert_loads(&config, &target, &what);
                    if !replace {
                        old.assert_loads(&config, &previous, &what);
                    }
                }
            }
            if side == Side::Before {
                assert!(files_of(&previous) == before, "{what}: the previous checkpoint changed");
            }
            // The crashed save's leftovers are never mistaken for a checkpoint...
            let leftovers = temp_dirs(dir.path());
            if side == Side::Before {
                assert_eq!(leftovers.len(), 1, "{what}: {:?}", entries(dir.path()));
            }
            for tmp in &leftovers {
                let err = io
                    .load_checkpoint(tmp, &LoadOptions::default())
                    .expect_err("a temp dir is no checkpoint");
                assert!(matches!(err, Error::NotACheckpoint { .. }), "{what}: {err}");
                assert!(uring_ckpt::retention::list_committed(dir.path())
                    .expect("list")
                    .iter()
                    .all(|p| p != tmp));
            }
            // ...and the next save of the path removes them.
            let mut replacing = config.clone();
            replacing.replace_existing = true;
            UringCheckpointIO::new(replacing)
                .expect("config")
                .save_checkpoint(&new.checkpoint(), &target)
                .unwrap_or_else(|e| panic!("{what}: the next save failed: {e}"));
            new.assert_loads(&config, &target, &what);
            let mut expected = vec!["ckpt".to_owned()];
            if !replace {
                expected.push("older".to_owned());
            }
            assert_eq!(entries(dir.path()), expected, "{what}: stale temp dir or lock left");
        }
    }
    println!("crash points tried: {tried} (save steps x engines x {{replace, new path}}); each: previous or new checkpoint whole, temp dir ignored and cleaned by the next save");
}

#[test]
fn crash_during_retention_and_latest_pointer_keeps_whole_checkpoints() {
    let _alone = crate::alone();
    let config = fault_config(EngineKind::Uring);
    let io = UringCheckpointIO::new(config.clone()).expect("config");
    let data: Vec<Data> = (1..=5).map(|s| Data::sized(s, &[5000, 70_000])).collect();
    let mut tried = 0;
    // Crash before the second deletion; crash between a deletion's rename and its delete.
    for (point, action) in
        [("retention.before_remove", "1*off->return(abort)"), ("dir.fsync", "return(abort)")]
    {
        let what = format!("keep_last crash at {point}");
        let dir = scratch();
        for (i, d) in data.iter().enumerate() {
            io.save_checkpoint(&d.checkpoint(), &dir.path().join(format!("step-{}", i + 1))).expect("save");
        }
        retention::set_latest(&dir.path().join("step-5")).expect("latest");
        crash(dir.path(), EngineKind::Uring, point, "keep_last", action);
        tried += 1;
        // Every name still present is a whole checkpoint; the newest two are there.
        let committed = retention::list_committed(dir.path()).expect("list");
        assert!(committed.len() >= 2, "{what}: {committed:?}");
        for path in &committed {
            let step: usize =
                path.to_string_lossy().rsplit('-').next().and_then(|s| s.parse().ok()).expect("step");
            data[step - 1].assert_loads(&config, path, &what);
        }
        // The next run finishes the job and removes what the crash left.
        retention::keep_last(dir.path(), 2).expect("keep_last");
        assert_eq!(entries(dir.path()), vec!["latest", "step-4", "step-5"], "{what}");
        assert_eq!(retention::read_latest(dir.path()).expect("latest"), Some(dir.path().join("step-5")));
    }

    // A crash between writing the new pointer and renaming it: the old pointer stands.
    let dir = scratch();
    for (i, d) in data.iter().take(2).enumerate() {
        io.save_checkpoint(&d.checkpoint(), &dir.path().join(format!("step-{}", i + 1))).expect("save");
    }
    retention::set_latest(&dir.path().join("step-1")).expect("latest");
    crash(dir.path(), EngineKind::Uring, "latest.after_write", "set_latest", "return(abort)");
    tried += 1;
    assert_eq!(retention::read_latest(dir.path()).expect("latest"), Some(dir.path().join("step-1")));
    retention::set_latest(&dir.path().join("step-2")).expect("latest");
    assert_eq!(retention::read_latest(dir.path()).expect("latest"), Some(dir.path().join("step-2")));
    assert_eq!(entries(dir.path()), vec!["latest", "step-1", "step-2"], "the stale pointer file is gone");
    println!("retention crash points tried: {tried}");
}
