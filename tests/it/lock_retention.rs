//! Concurrency and retention: one saver per path (fail or wait), stale temporary
//! directories of dead savers removed by the next save, `keep_last` and the `latest`
//! pointer.

use crate::common;
use crate::reliability;

use std::fs;
use std::time::Duration;

use common::{entries, scratch, small_config};
use reliability::Data;
use uring_ckpt::config::{Config, EngineKind, LockMode};
use uring_ckpt::store::{lock_path, SaveLock};
use uring_ckpt::{retention, CheckpointIO, Error, UringCheckpointIO};

fn io(lock: LockMode) -> UringCheckpointIO {
    let mut config = small_config(EngineKind::Uring);
    config.lock = lock;
    UringCheckpointIO::new(config).expect("config")
}

#[test]
fn a_second_saver_of_the_same_path_fails_clearly_or_waits() {
    let dir = scratch();
    let path = dir.path().join("ckpt");
    let data = Data::sized(1, &[10_000]);
    let held = SaveLock::acquire(&path, LockMode::Fail).expect("lock");

    let err = io(LockMode::Fail).save_checkpoint(&data.checkpoint(), &path).expect_err("locked");
    let lock_file = lock_path(&path).expect("lock path");
    assert!(matches!(&err, Error::Locked(p) if *p == lock_file), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&lock_file.display().to_string()) && text.contains("another save"), "{text}");
    assert!(!path.exists());
    // Another path of the same directory is not blocked.
    io(LockMode::Fail).save_checkpoint(&data.checkpoint(), &dir.path().join("other")).expect("other path");

    std::thread::scope(|s| {
        let waiter = s.spawn(|| io(LockMode::Wait).save_checkpoint(&data.checkpoint(), &path));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!waiter.is_finished(), "a waiting saver must wait for the lock");
        assert!(!path.exists());
        drop(held);
        waiter.join().expect("join").expect("the waiting save succeeds once the lock is free");
    });
    data.assert_loads(&small_config(EngineKind::Uring), &path, "waited save");
    assert_eq!(entries(dir.path()), vec!["ckpt", "other"], "lock files are removed after the save");
}

#[test]
fn remove_takes_the_save_lock_of_the_path() {
    let dir = scratch();
    let path = dir.path().join("ckpt");
    let data = Data::sized(2, &[10_000]);
    io(LockMode::Fail).save_checkpoint(&data.checkpoint(), &path).expect("save");
    let held = SaveLock::acquire(&path, LockMode::Fail).expect("lock");
    let err = io(LockMode::Fail).remove_checkpoint(&path).expect_err("a save holds the path");
    assert!(matches!(&err, Error::Locked(_)), "{err:?}");
    data.assert_loads(&small_config(EngineKind::Uring), &path, "untouched while locked");
    std::thread::scope(|s| {
        let waiter = s.spawn(|| io(LockMode::Wait).remove_checkpoint(&path));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!waiter.is_finished(), "a waiting remove must wait for the lock");
        drop(held);
        waiter.join().expect("join").expect("removed once the lock is free");
    });
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
}

#[test]
fn many_threads_saving_one_path_never_tear_it() {
    let dir = scratch();
    let path = dir.path().join("ckpt");
    let data: Vec<Data> = (0..6).map(|s| Data::sized(s + 40, &[70_000, 5])).collect();
    let mut config = small_config(EngineKind::Uring);
    config.lock = LockMode::Wait;
    config.replace_existing = true;
    let io = UringCheckpointIO::new(config.clone()).expect("config");
    std::thread::scope(|s| {
        for d in &data {
            let io = &io;
            let path = &path;
            s.spawn(move || io.save_checkpoint(&d.checkpoint(), path).expect("save"));
        }
    });
    assert!(data.iter().any(|d| d.matches(&config, &path)), "the last save wins, whole");
    assert_eq!(entries(dir.path()), vec!["ckpt"]);
}

#[test]
fn lock_mode_follows_the_config_conventions() {
    assert_eq!(Config::default().lock, LockMode::Fail);
    let config = Config::from_toml_str("lock = \"wait\"").expect("toml");
    assert_eq!(config.lock, LockMode::Wait);
    assert!(Config::from_toml_str("lock = \"maybe\"").is_err());
    let config = Config::default().with_env_from([("URING_CKPT_LOCK", "WAIT")]).expect("env");
    assert_eq!(config.lock, LockMode::Wait);
    let err = Config::default().with_env_from([("URING_CKPT_LOCK", "sometimes")]).expect_err("bad");
    assert!(err.to_string().contains("URING_CKPT_LOCK"), "{err}");
    let config = Config::builder().lock(LockMode::Wait).build().expect("builder");
    assert_eq!(Config::from_toml_str(&config.to_toml_string()).expect("round trip"), config);
    assert_eq!("fail".parse::<LockMode>().expect("parse"), LockMode::Fail);
}

fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().expect("spawn true");
    let pid = child.id();
    child.wait().expect("wait");
    pid
}

#[test]
fn the_next_save_removes_temp_dirs_of_dead_savers_only() {
    let dir = scratch();
    let path = dir.path().join("ckpt");
    let dead = dir.path().join(format!(".ckpt.tmp-{}-17abc-0", dead_pid()));
    let dead_removal = dir.path().join(format!(".ckpt.tmp-removing-{}", dead_pid()));
    // pid 1 is always alive; a dir of this process that no save of it uses is stale.
    let alive = dir.path().join(".ckpt.tmp-1-17abc-9");
    let own_unused = dir.path().join(format!(".ckpt.tmp-{}-17abc-9", std::process::id()));
    let rank_save = dir.path().join(".ckpt.tmp-step-100");
    let other_name = dir.path().join(format!(".other.tmp-{}-17abc-0", dead_pid()));
    for d in [&dead, &dead_removal, &alive, &own_unused, &rank_save, &other_name] {
        fs::create_dir(d).expect("mkdir");
        fs::write(d.join("shard-r00000-00000.safetensors"), b"partial").expect("write");
    }
    assert!(retention::list_committed(dir.path()).expect("list").is_empty(), "temp dirs are not checkpoints");
    io(LockMode::Fail).save_checkpoint(&Data::sized(2, &[100]).checkpoint(), &path).expect("save");
    assert!(!dead.exists() && !dead_removal.exists() && !own_unused.exists(), "stale dirs are removed");
    assert!(alive.exists() && rank_save.exists() && other_name.exists(), "{:?}", entries(dir.path()));
    assert_eq!(retention::list_committed(dir.path()).expect("list"), vec![path]);
}

#[test]
fn keep_last_orders_by_step_and_never_deletes_the_newest_or_latest() {
    let dir = scratch();
    let io = io(LockMode::Fail);
    let d = Data::sized(3, &[1000]);
    for step in [1, 10, 2, 30, 4] {
        io.save_checkpoint(&d.checkpoint(), &dir.path().join(format!("step-{step}"))).expect("save");
    }
    let names = |v: Vec<std::path::PathBuf>| -> Vec<String> {
        v.iter().map(|p| p.file_name().expect("name").to_string_lossy().into_owned()).collect()
    };
    assert_eq!(
        names(retention::list_committed(dir.path()).expect("list")),
        ["step-1", "step-2", "step-4", "step-10", "step-30"]
    );
    assert!(matches!(retention::keep_last(dir.path(), 0), Err(Error::Config(_))));
    retention::set_latest(&dir.path().join("step-2")).expect("latest");
    let removed = retention::keep_last(dir.path(), 2).expect("keep_last");
    assert_eq!(names(removed), ["step-1", "step-4"], "latest (step-2) is kept");
    assert_eq!(entries(dir.path()), ["latest", "step-10", "step-2", "step-30"]);
    retention::keep_last(dir.path(), 1).expect("keep_last");
    assert_eq!(entries(dir.path()), ["latest", "step-2", "step-30"], "newest and latest stay");

    // Names without a number: by commit time.
    let dir = scratch();
    for name in ["zeta", "alpha", "mid"] {
        io.save_checkpoint(&d.checkpoint(), &dir.path().join(name)).expect("save");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(names(retention::list_committed(dir.path()).expect("list")), ["zeta", "alpha", "mid"]);
    retention::keep_last(dir.path(), 1).expect("keep_last");
    assert_eq!(entries(dir.path()), ["mid"]);
}

#[test]
fn latest_pointer_is_validated_and_latest_valid_skips_damaged_checkpoints() {
    let dir = scratch();
    let config = small_config(EngineKind::Uring);
    let io = UringCheckpointIO::new(config.clone()).expect("config");
    assert_eq!(retention::read_latest(dir.path()).expect("none"), None);
    assert!(retention::latest_valid(&config, dir.path()).expect("none").is_none());
    let (a, b) = (Data::sized(4, &[5000]), Data::sized(5, &[5000]));
    io.save_checkpoint(&a.checkpoint(), &dir.path().join("step-1")).expect("save");
    io.save_checkpoint(&b.checkpoint(), &dir.path().join("step-2")).expect("save");

    let not_committed = dir.path().join("step-3");
    fs::create_dir(&not_committed).expect("mkdir");
    assert!(matches!(retention::set_latest(&not_committed), Err(Error::NotACheckpoint { .. })));
    fs::remove_dir(&not_committed).expect("rm");

    for garbage in ["../etc", "", ".hidden", "a/b", "x\ny"] {
        fs::write(dir.path().join("latest"), garbage).expect("write");
        assert!(retention::read_latest(dir.path()).is_err(), "{garbage:?} must be refused");
    }
    retention::set_latest(&dir.path().join("step-2")).expect("latest");
    assert_eq!(retention::latest_valid(&config, dir.path()).expect("ok"), Some(dir.path().join("step-2")));

    // Damage step-2: latest_valid falls back to step-1.
    let shard = dir.path().join("step-2/shard-r00000-00000.safetensors");
    let mut bytes = fs::read(&shard).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&shard, bytes).expect("write");
    assert_eq!(retention::latest_valid(&config, dir.path()).expect("ok"), Some(dir.path().join("step-1")));
}
