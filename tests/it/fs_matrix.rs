//! The same checks on every file system a user may checkpoint to: ext4, XFS and btrfs (each
//! on a loop device over a small sparse image in `CARGO_TARGET_TMPDIR`) and tmpfs. For each:
//! - every engine saves and loads a checkpoint of odd sizes, and the files are byte-identical
//!   across engines;
//! - the engine report is what that file system implies: O_DIRECT on the block file systems;
//!   on tmpfs O_DIRECT either works (Linux 6.6 and later) or the save falls back to buffered
//!   writes with the reason recorded, whichever the kernel does (probed here first); the
//!   fallbacks it does not take by itself (io_uring or O_DIRECT refused) forced, same files;
//! - a refused silent replace, an atomic replace and a remove leave nothing behind;
//! - saves killed with SIGKILL at a few moments on each engine leave only whole checkpoints, and the next
//!   save clears what the killed one left;
//! - `uring-ckpt bench --dir` names the file system, the device and the loop device's backing
//!   file.
//!
//! A file system that cannot be set up here (not root, no loop device, mkfs missing, mount
//! refused) is skipped with `skipped: <reason>`. Mounts and loop devices are released by
//! [`LoopFs`]'s drop, also when an assertion fails.

use crate::common;
use crate::reliability;

use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{entries, files_of, small_config, ENGINES};
use reliability::loopfs::{FsType, LoopFs};
use reliability::{no_core_dumps, temp_dirs, Data};
use uring_ckpt::config::{Config, EngineKind};
use uring_ckpt::io::EngineReport;
use uring_ckpt::{retention, CheckpointIO, Error, LoadOptions, UringCheckpointIO};

/// Sizes around 512, 4096 and 64 KiB boundaries, an empty tensor, and enough for two shards.
const ODD_SIZES: [usize; 9] = [0, 1, 511, 4095, 4097, 65_537, 300_001, (1 << 20) + 3, 77];

fn mount(fs_type: FsType, name: &str) -> Option<LoopFs> {
    // Smallest images the mkfs tools accept; ext4 and tmpfs need only a few MiB here.
    match LoopFs::with_type(fs_type, name, 48) {
        Ok(lfs) => {
            println!(
                "{}: mounted at {} ({})",
                fs_type.name(),
                lfs.path().display(),
                lfs.device().unwrap_or("no device")
            );
            Some(lfs)
        }
        Err(reason) => {
            println!("skipped: {reason}");
            None
        }
    }
}

/// The config of the matrix: small chunks and pool, shards of at most 1 MiB.
fn config(engine: EngineKind) -> Config {
    let mut config = small_config(engine);
    config.max_shard_size = 1 << 20;
    config
}

fn uring_enabled() -> bool {
    let disabled = fs::read_to_string("/proc/sys/kernel/io_uring_disabled").unwrap_or_default();
    matches!(disabled.trim(), "" | "0")
}

/// What the kernel does with O_DIRECT in `dir`: an aligned write through a descriptor opened
/// with O_DIRECT.
fn probe_direct_io(dir: &Path) -> io::Result<()> {
    let path = dir.join("odirect-probe");
    let result = (|| {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)?;
        let backing = vec![0u8; 3 * 4096];
        let skip = backing.as_ptr().align_offset(4096);
        file.write_all_at(&backing[skip..skip + 4096], 0)
    })();
    let _ = fs::remove_file(&path);
    result
}

/// Asserts that `report` is what `engine` must do on a file system where O_DIRECT gave
/// `direct` (`None`: works; `Some(errno)`: refused with that errno).
fn assert_engine(what: &str, engine: EngineKind, direct: Option<i32>, report: &EngineReport) {
    // Buffer registration may be refused for lack of locked memory: that is not about the
    // file system, and it is reported on its own.
    let fallbacks: Vec<_> = report.fallbacks.iter().filter(|f| f.what != "buffer registration").collect();
    let mut expected = engine;
    if engine == EngineKind::Uring && !uring_enabled() {
        expected = EngineKind::Pwrite;
        assert_eq!(fallbacks.first().map(|f| f.what), Some("io_uring"), "{what}: {report:?}");
    }
    match direct {
        _ if engine == EngineKind::Buffered => {
            assert_eq!(report.engine, EngineKind::Buffered, "{what}: {report:?}");
            assert!(!report.direct_io && fallbacks.is_empty(), "{what}: {report:?}");
        }
        None => {
            assert_eq!(report.engine, expected, "{what}: {report:?}");
            assert!(report.direct_io, "{what}: O_DIRECT works here, the engine must use it: {report:?}");
            assert_eq!(fallbacks.len(), usize::from(expected != engine), "{what}: {report:?}");
        }
        Some(errno) => {
            assert_eq!(report.engine, EngineKind::Buffered, "{what}: O_DIRECT is refused here: {report:?}");
            assert!(!report.direct_io, "{what}: {report:?}");
            let refused = fallbacks
                .iter()
                .find(|f| f.what == "O_DIRECT")
                .unwrap_or_else(|| panic!("{what}: the O_DIRECT fallback must be reported: {report:?}"));
            let reason = io::Error::from_raw_os_error(errno).to_string();
            assert!(
                refused.reason.contains(&reason),
                "{what}: reason {:?} must say {reason:?}",
                refused.reason
            );
        }
    }
}

/// Every engine saves and loads the odd sizes; the files are byte-identical across engines
/// and the reports match what O_DIRECT does here.
fn round_trip_every_engine(lfs: &LoopFs) {
    let name = lfs.fs_type().name();
    let direct = match probe_direct_io(lfs.path()) {
        Ok(()) => None,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Some(libc::EINVAL),
        Err(e) => panic!("{name}: O_DIRECT probe failed with something other than EINVAL: {e}"),
    };
    println!("{name}: O_DIRECT {}", if direct.is_none() { "works" } else { "refused (EINVAL)" });
    if lfs.fs_type().is_block() {
        assert_eq!(direct, None, "{name} on a loop device must accept O_DIRECT");
    }
    let data = Data::sized(7, &ODD_SIZES);
    let mut reference: Option<Vec<(String, Vec<u8>)>> = None;
    for engine in ENGINES {
        let what = format!("{name}, {engine}");
        let config = config(engine);
        let io = UringCheckpointIO::new(config.clone()).expect("config");
        let path = lfs.path().join(format!("rt-{engine}"));
        let report =
            io.save_checkpoint(&data.checkpoint(), &path).unwrap_or_else(|e| panic!("{what}: save: {e}"));
        assert_engine(&format!("{what} save"), engine, direct, &report.engine);
        // btrfs checksums a direct write in the submitting thread: io_uring hands its writes
        // to io-wq there (and the files below are still byte-identical to every engine's).
        let offload = report.engine.engine == EngineKind::Uring
            && report.engine.direct_io
            && lfs.fs_type() == FsType::Btrfs;
        assert_eq!(
            report.engine.offload_writes, offload,
            "{what}: writes handed to io-wq: {:?}",
            report.engine
        );
        assert!(report.shards >= 2, "{what}: expected several shards, got {}", report.shards);
        let loaded = io
            .load_checkpoint(&path, &LoadOptions { verify: Some(true), ..Default::default() })
            .unwrap_or_else(|e| panic!("{what}: load: {e}"));
        assert_engine(&format!("{what} load"), engine, direct, &loaded.report.engine);
        data.assert_loads(&config, &path, &what);
        let files = files_of(&path);
        match &reference {
            None => reference = Some(files),
            Some(r) => assert!(*r == files, "{what}: files differ from the {} engine's", ENGINES[0]),
        }
        let fallbacks: Vec<String> =
            report.engine.fallbacks.iter().map(|f| format!("{}: {}", f.what, f.reason)).collect();
        println!(
            "{what}: saved with {} (direct I/O {}), fallbacks {fallbacks:?}",
            report.engine.engine, report.engine.direct_io
        );
        io.remove_checkpoint(&path).expect("remove");
    }
    forced_fallbacks(lfs, &data, reference.as_deref().expect("reference files"));
}

/// The fallbacks this file system may not take by itself, forced (io_uring refused with
/// EPERM, O_DIRECT refused with EINVAL): the same files, and the fallback reported.
fn forced_fallbacks(lfs: &LoopFs, data: &Data, reference: &[(String, Vec<u8>)]) {
    /// The fault, how to set it, the engine that must run, what the fallback names.
    type Case = (&'static str, fn(&mut Config), EngineKind, &'static str);
    let name = lfs.fs_type().name();
    let cases: [Case; 2] = [
        ("io_uring EPERM", |c| c.simulate.uring_setup_eperm = true, EngineKind::Pwrite, "io_uring"),
        ("O_DIRECT EINVAL", |c| c.simulate.direct_io_einval = true, EngineKind::Buffered, "O_DIRECT"),
    ];
    for (fault, set, engine, what) in cases {
        let what_case = format!("{name}, uring with {fault}");
        let mut config = config(EngineKind::Uring);
        set(&mut config);
        let io = UringCheckpointIO::new(config.clone()).expect("config");
        let path = lfs.path().join("forced");
        let report =
            io.save_checkpoint(&data.checkpoint(), &path).unwrap_or_else(|e| panic!("{what_case}: {e}"));
        assert_eq!(report.engine.engine, engine, "{what_case}: {:?}", report.engine);
        assert_eq!(
            report.engine.fallbacks.first().map(|f| f.what),
            Some(what),
            "{what_case}: {:?}",
            report.engine
        );
        data.assert_loads(&config, &path, &what_case);
        assert!(files_of(&path) == reference, "{what_case}: files differ from a normal save's");
        io.remove_checkpoint(&path).expect("remove");
    }
}

/// A refused silent replace leaves the old checkpoint; an explicit replace swaps it
/// atomically; a remove leaves nothing, not even the lock file's temporary directories.
fn replace_and_remove(lfs: &LoopFs) {
    let name = lfs.fs_type().name();
    let dir = lfs.path().join("replace");
    fs::create_dir(&dir).expect("mkdir");
    let path = dir.join("ckpt");
    let (old, new) = (Data::sized(11, &[5000, 70_001, 3]), Data::sized(12, &ODD_SIZES));
    for engine in ENGINES {
        let what = format!("{name}, {engine}");
        let config = config(engine);
        let io = UringCheckpointIO::new(config.clone()).expect("config");
        io.save_checkpoint(&old.checkpoint(), &path).unwrap_or_else(|e| panic!("{what}: save: {e}"));
        let before = files_of(&path);
        let err = io.save_checkpoint(&new.checkpoint(), &path).expect_err("silent replace must be refused");
        assert!(matches!(err, Error::AlreadyExists(_)), "{what}: {err}");
        assert!(files_of(&path) == before, "{what}: refused replace changed the checkpoint");
        let mut replacing = config.clone();
        replacing.replace_existing = true;
        let io_replace = UringCheckpointIO::new(replacing).expect("config");
        io_replace
            .save_checkpoint(&new.checkpoint(), &path)
            .unwrap_or_else(|e| panic!("{what}: replace: {e}"));
        new.assert_loads(&config, &path, &format!("{what}: after replace"));
        assert!(temp_dirs(&dir).is_empty(), "{what}: leftovers {:?}", entries(&dir));
        io.remove_checkpoint(&path).unwrap_or_else(|e| panic!("{what}: remove: {e}"));
        assert!(!path.exists(), "{what}: removed checkpoint still there");
        assert!(temp_dirs(&dir).is_empty(), "{what}: leftovers {:?}", entries(&dir));
    }
    fs::remove_dir_all(&dir).expect("rm");
}

/// Child of [`killed_saves`]: saves `step-N` checkpoints forever on the engine it is told,
/// each followed by `set_latest` and `keep_last(2)`. Does nothing unless started by it.
#[test]
fn kill_child() {
    let (Ok(dir), Ok(engine)) = (std::env::var("FS_MATRIX_KILL_DIR"), std::env::var("FS_MATRIX_ENGINE"))
    else {
        return;
    };
    let dir = PathBuf::from(dir);
    let engine: EngineKind = engine.parse().expect("engine");
    let parent: i32 =
        std::env::var("FS_MATRIX_PARENT").ok().and_then(|p| p.parse().ok()).expect("parent pid");
    let mut config = config(engine);
    config.replace_existing = true;
    let io = UringCheckpointIO::new(config).expect("config");
    reliability::save_steps_until_killed(&io, &dir, 2, Some(parent), step_data)
}

fn step_data(step: u64) -> Data {
    Data::sized(step, &[300_001, 4097, (1 << 20) + 5])
}

/// The child gets SIGKILL when this test process dies, so that a killed test run leaves no
/// child saving forever (the child also checks its parent's pid before each save).
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl, a system call
    // that is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
}

/// Saves killed at a few moments on each engine leave only whole checkpoints; the latest
/// valid one loads; the next save clears the killed save's temporary directory.
fn killed_saves(lfs: &LoopFs) {
    let name = lfs.fs_type().name();
    let dir = lfs.path().join("kill");
    fs::create_dir(&dir).expect("mkdir");
    let exe = std::env::current_exe().expect("exe");
    let child_test = reliability::test_name(module_path!(), "kill_child");
    let mut killed = 0;
    let mut dead_pid = 0;
    for (i, engine) in ENGINES.into_iter().enumerate() {
        let config = config(engine);
        for delay_ms in [60 + 37 * i as u64, 150 + 23 * i as u64] {
            let what = format!("{name}, {engine}, SIGKILL after {delay_ms} ms");
            let mut cmd = Command::new(&exe);
            cmd.args(["--exact", &child_test, "--nocapture", "--test-threads=1"])
                .env("FS_MATRIX_KILL_DIR", &dir)
                .env("FS_MATRIX_ENGINE", engine.as_str())
                .env("FS_MATRIX_PARENT", std::process::id().to_string())
                .stdout(Stdio::null());
            no_core_dumps(&mut cmd);
            die_with_parent(&mut cmd);
            let mut child = cmd.spawn().expect("spawn");
            dead_pid = child.id();
            std::thread::sleep(Duration::from_millis(delay_ms));
            child.kill().expect("SIGKILL");
            let status = child.wait().expect("wait");
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "{what}: the child must still be saving ({status})"
            );
            killed += 1;
            for path in retention::list_committed(&dir).expect("list") {
                let step = path
                    .file_name()
                    .and_then(|n| n.to_str()?.strip_prefix("step-")?.parse().ok())
                    .expect("step");
                step_data(step).assert_loads(&config, &path, &what);
            }
            if let Some(latest) = retention::latest_valid(&config, &dir).expect("latest_valid") {
                let step = latest
                    .file_name()
                    .and_then(|n| n.to_str()?.strip_prefix("step-")?.parse().ok())
                    .expect("step");
                step_data(step).assert_loads(&config, &latest, &format!("{what}: latest"));
            }
        }
        // The next save of a path clears the temporary directory a killed save of it left.
        let step = reliability::newest_step(&dir) + 1;
        let io = UringCheckpointIO::new(config.clone()).expect("config");
        let path = dir.join(format!("step-{step}"));
        // Named as an unfinished save of a process that is gone (the last child killed).
        let stale = dir.join(format!(".step-{step}.tmp-{dead_pid}-17a3f-0"));
        fs::create_dir(&stale).expect("stale temp dir");
        fs::write(stale.join("model-00001-of-00002.safetensors"), b"partial").expect("partial shard");
        io.save_checkpoint(&step_data(step).checkpoint(), &path).expect("save after the kills");
        step_data(step).assert_loads(&config, &path, &format!("{name}, {engine}: after the kills"));
        assert!(
            !stale.exists(),
            "{name}, {engine}: the stale temporary directory must go: {:?}",
            entries(&dir)
        );
    }
    println!("{name}: {killed} saves killed, newest step {}", reliability::newest_step(&dir));
    fs::remove_dir_all(&dir).expect("rm");
}

/// `bench --dir` on this file system names its type, device and backing file in the text
/// and the JSON output.
fn bench_names_the_file_system(lfs: &LoopFs) {
    let name = lfs.fs_type().name();
    let json = lfs.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_uring-ckpt"))
        .args([
            "--engine", "buffered", "bench", "--size", "2MiB", "--repeat", "1", "--phases", "save", "--dir",
        ])
        .arg(lfs.path())
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{name}: bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&fs::read(&json).expect("json")).expect("parse json");
    let machine = &doc["machine"];
    assert_eq!(machine["fs_type"], name, "{machine}");
    assert_eq!(machine["mount_point"], lfs.path().to_str().expect("utf-8"), "{machine}");
    let storage_line = text.lines().find(|l| l.starts_with("storage: ")).unwrap_or_else(|| panic!("{text}"));
    assert!(storage_line.contains(name), "{storage_line}");
    match (lfs.device(), lfs.image()) {
        (Some(device), Some(image)) => {
            assert_eq!(machine["device"], device, "{machine}");
            let image = fs::canonicalize(image).expect("image");
            assert_eq!(machine["backing_file"], image.to_str().expect("utf-8"), "{machine}");
            assert!(machine["backing_fs_type"].is_string(), "{machine}");
            assert!(
                storage_line.contains(device) && storage_line.contains("loop device over"),
                "{storage_line}"
            );
        }
        _ => {
            assert_eq!(machine["ram_backed"], true, "{machine}");
            assert!(machine["backing_file"].is_null(), "{machine}");
            assert!(storage_line.contains("RAM-backed"), "{storage_line}");
        }
    }
    println!("{name}: bench says {storage_line:?}");
}

fn matrix(fs_type: FsType) {
    let Some(lfs) = mount(fs_type, "matrix") else { return };
    round_trip_every_engine(&lfs);
    replace_and_remove(&lfs);
    killed_saves(&lfs);
    bench_names_the_file_system(&lfs);
}

#[test]
fn ext4() {
    matrix(FsType::Ext4);
}

#[test]
fn xfs() {
    matrix(FsType::Xfs);
}

#[test]
fn btrfs() {
    matrix(FsType::Btrfs);
}

#[test]
fn tmpfs() {
    matrix(FsType::Tmpfs);
}

/// The helper itself: every mount is gone after drop, loop devices detached, files removed.
#[test]
fn loopfs_releases_everything_on_drop() {
    let Some(lfs) = mount(FsType::Ext4, "drop") else { return };
    let (mnt, device, image) =
        (lfs.path().to_owned(), lfs.device().map(str::to_owned), lfs.image().map(Path::to_owned));
    fs::write(mnt.join("f"), b"x").expect("write");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _held = lfs;
        panic!("a failing test (on purpose: the guard must still clean up)");
    }));
    assert!(result.is_err());
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(mnt.to_str().expect("utf-8")), "still mounted: {}", mnt.display());
    if let (Some(device), Some(image)) = (device, image) {
        let name = device.trim_start_matches("/dev/");
        let backing =
            fs::read_to_string(format!("/sys/class/block/{name}/loop/backing_file")).unwrap_or_default();
        assert!(
            !backing.contains(image.to_str().expect("utf-8")),
            "{device} still attached to {}",
            image.display()
        );
        assert!(!image.exists(), "image left behind");
    }
}
