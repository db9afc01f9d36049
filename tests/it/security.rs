//! A checkpoint written by someone hostile, and careless paths (RELIABILITY.md, "Security"):
//! links, FIFOs, devices and directories in place of every kind of file; directories that
//! merely hold a `manifest.json`; names that look like the protocol's own or are too long;
//! a reserved tensor name. Each case ends in a typed error, reads nothing outside the
//! checkpoint, never hangs, and leaves what is not ours untouched.

use crate::common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::{bytes, entries, scratch, small_config, ENGINES};
use uring_ckpt::config::{Config, EngineKind};
use uring_ckpt::format::{Dtype, MANIFEST_FILE};
use uring_ckpt::store::lock_path;
use uring_ckpt::{inspect, Checkpoint, CheckpointIO, Error, LoadOptions, UringCheckpointIO};

const SHARD: &str = "shard-r00000-00000.safetensors";
const SIDECAR: &str = "extras.pkl";

/// A committed checkpoint `name` with two tensors and a sidecar.
fn make(dir: &Path, name: &str, config: &Config) -> PathBuf {
    let (a, b) = (bytes(1, 5000), bytes(2, 4096));
    let mut ck = Checkpoint::new();
    ck.add("a", Dtype::U8, &[5000], &a).expect("a");
    ck.add("b", Dtype::F32, &[1024], &b).expect("b");
    ck.add_extra_file(SIDECAR, b"sidecar bytes").expect("sidecar");
    let path = dir.join(name);
    UringCheckpointIO::new(config.clone()).expect("config").save_checkpoint(&ck, &path).expect("save");
    path
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path; mkfifo keeps no pointer.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", path.display());
}

/// Replaces `path` (a file of a checkpoint) with something that is not a regular file of it.
#[derive(Debug, Clone, Copy)]
enum Swap {
    /// A symbolic link to a file outside the checkpoint (same bytes: only the link differs).
    LinkOutside,
    /// A symbolic link to /dev/zero (endless bytes).
    LinkDevZero,
    /// A FIFO (opening it for reading would block until a writer comes).
    Fifo,
    /// A directory.
    Directory,
}

const SWAPS: [Swap; 4] = [Swap::LinkOutside, Swap::LinkDevZero, Swap::Fifo, Swap::Directory];

fn swap(path: &Path, how: Swap, outside: &Path) {
    let original = fs::read(path).expect("read original");
    fs::remove_file(path).expect("remove original");
    match how {
        Swap::LinkOutside => {
            let target = outside.join(path.file_name().expect("name"));
            fs::write(&target, &original).expect("write outside copy");
            symlink(&target, path).expect("symlink");
        }
        Swap::LinkDevZero => symlink("/dev/zero", path).expect("symlink"),
        Swap::Fifo => mkfifo(path),
        Swap::Directory => fs::create_dir(path).expect("mkdir"),
    }
}

/// Runs `f` on another thread and fails the test if it does not finish in 20 s (a FIFO
/// opened for reading would block forever).
fn within_time<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("{what} hangs"))
}

#[test]
fn no_member_is_opened_through_a_link_or_unless_it_is_a_regular_file() {
    let tmp = scratch();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).expect("mkdir");
    let mut cases = 0;
    for engine in ENGINES {
        let config = small_config(engine);
        let valid = make(tmp.path(), &format!("valid-{engine}"), &config);
        for member in [MANIFEST_FILE, SHARD, SIDECAR] {
            for how in SWAPS {
                let path = tmp.path().join(format!("{engine}-{member}-{how:?}"));
                common::copy_dir(&valid, &path);
                swap(&path.join(member), how, &outside);
                let (config2, path2) = (config.clone(), path.clone());
                let results = within_time(&format!("{engine} {member} {how:?}"), move || {
                    let io = UringCheckpointIO::new(config2.clone()).expect("config");
                    let load = io.load_checkpoint(&path2, &LoadOptions::default()).map(|_| ());
                    let verify = inspect::verify(&config2, &path2, |_, _| {}).map(|_| ());
                    let inspect = inspect::inspect(&config2, &path2).map(|_| ());
                    [("load", load), ("verify", verify), ("inspect", inspect)]
                });
                for (op, result) in results {
                    if op == "inspect" && member == SIDECAR {
                        assert!(result.is_ok(), "inspect reads no sidecar: {result:?}");
                        continue;
                    }
                    let err = result.expect_err(&format!("{op} of {engine} {member} {how:?} must fail"));
                    let message = err.to_string();
                    assert!(
                        matches!(&err, Error::Corrupt { reason, .. } if reason.contains("not a regular file")),
                        "{op} {engine} {member} {how:?}: {message}"
                    );
                    assert!(!message.contains("outside"), "the link's target must not show: {message}");
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 3 * 3 * 4 * 3 - 3 * 4, "every case ran");
}

#[test]
fn reads_stop_at_the_sizes_the_manifest_states() {
    let tmp = scratch();
    let config = small_config(EngineKind::Uring);
    let path = make(tmp.path(), "ck", &config);
    // The sidecar grows (same prefix): refused by its size, without reading it whole.
    let mut long = b"sidecar bytes".to_vec();
    long.extend(std::iter::repeat_n(b'x', 64 << 20));
    fs::write(path.join(SIDECAR), &long).expect("grow sidecar");
    let err = UringCheckpointIO::new(config.clone())
        .expect("config")
        .load_checkpoint(&path, &LoadOptions::default())
        .expect_err("longer sidecar");
    assert!(err.to_string().contains("more than the 13 allowed"), "{err}");
    // A manifest larger than any manifest may be is refused before it is read.
    let huge = tmp.path().join("huge");
    fs::create_dir(&huge).expect("mkdir");
    let file = fs::File::create(huge.join(MANIFEST_FILE)).expect("create");
    file.set_len(1 << 40).expect("sparse 1 TiB manifest");
    let err = uring_ckpt::load::read_manifest(&huge).expect_err("huge manifest");
    assert!(matches!(&err, Error::Corrupt { reason, .. } if reason.contains("allowed")), "{err}");
}

#[test]
fn a_planted_lock_link_or_special_file_is_refused_and_nothing_is_created_at_its_target() {
    let tmp = scratch();
    let config = small_config(EngineKind::Uring);
    let data = bytes(3, 4096);
    let mut ck = Checkpoint::new();
    ck.add("t", Dtype::U8, &[4096], &data).expect("t");
    let target_file = tmp.path().join("victim");
    for (i, plant) in ["dangling link", "link to a file", "directory", "fifo"].into_iter().enumerate() {
        let path = tmp.path().join(format!("ck{i}"));
        let lock = lock_path(&path).expect("lock path");
        match plant {
            "dangling link" => symlink(&target_file, &lock).expect("symlink"),
            "link to a file" => {
                fs::write(&target_file, b"keep me").expect("victim");
                symlink(&target_file, &lock).expect("symlink");
            }
            "directory" => fs::create_dir(&lock).expect("mkdir"),
            _ => mkfifo(&lock),
        }
        let err = within_time(plant, {
            let (config, path) = (config.clone(), path.clone());
            let data = data.clone();
            move || {
                let io = UringCheckpointIO::new(config).expect("config");
                let mut ck = Checkpoint::new();
                ck.add("t", Dtype::U8, &[4096], &data).expect("t");
                io.save_checkpoint(&ck, &path).map(|_| ())
            }
        })
        .expect_err(plant);
        assert!(err.to_string().contains("refusing"), "{plant}: {err}");
        assert!(!path.exists(), "{plant}: nothing committed");
        match plant {
            "dangling link" => assert!(!target_file.exists(), "the link's target was created"),
            "link to a file" => {
                assert_eq!(fs::read(&target_file).expect("victim"), b"keep me");
                fs::remove_file(&target_file).expect("rm");
            }
            _ => {}
        }
    }
    drop(ck);
}

/// Directories that are not checkpoints of ours but hold a file named `manifest.json`.
fn foreign_dirs(root: &Path) -> Vec<PathBuf> {
    let web = root.join("web-project");
    fs::create_dir_all(web.join("src")).expect("mkdir");
    fs::write(web.join(MANIFEST_FILE), br#"{"name": "my-web-app", "version": "1.0.0"}"#).expect("write");
    fs::write(web.join("src/index.js"), b"console.log('hi')").expect("write");
    let garbage = root.join("garbage");
    fs::create_dir(&garbage).expect("mkdir");
    fs::write(garbage.join(MANIFEST_FILE), b"not json at all").expect("write");
    fs::write(garbage.join("notes.txt"), b"my notes").expect("write");
    let linked = root.join("linked");
    fs::create_dir(&linked).expect("mkdir");
    symlink("/etc/hostname", linked.join(MANIFEST_FILE)).expect("symlink");
    vec![web, garbage, linked]
}

fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("list") {
            let p = e.expect("entry").path();
            let meta = fs::symlink_metadata(&p).expect("stat");
            if meta.is_dir() {
                stack.push(p);
            } else if meta.file_type().is_symlink() {
                out.push((p.clone(), fs::read_link(&p).expect("readlink").as_os_str().as_bytes().to_vec()));
            } else {
                out.push((p.clone(), fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn what_is_not_a_checkpoint_is_never_removed_or_replaced() {
    let tmp = scratch();
    let data = bytes(4, 4096);
    for dir in foreign_dirs(tmp.path()) {
        let before = snapshot(&dir);
        let remove = UringCheckpointIO::new(small_config(EngineKind::Uring))
            .expect("config")
            .remove_checkpoint(&dir)
            .expect_err("remove of a foreign directory");
        assert!(matches!(remove, Error::NotACheckpoint { .. }), "{remove}");
        let err = uring_ckpt::store::remove_checkpoint_dir(&dir).expect_err("remove_checkpoint_dir");
        assert!(matches!(err, Error::NotACheckpoint { .. }), "{err}");
        let replacing = Config { replace_existing: true, ..small_config(EngineKind::Uring) };
        let mut ck = Checkpoint::new();
        ck.add("t", Dtype::U8, &[4096], &data).expect("t");
        let replace = UringCheckpointIO::new(replacing)
            .expect("config")
            .save_checkpoint(&ck, &dir)
            .expect_err("replace");
        assert!(
            matches!(&replace, Error::NotACheckpoint { reason, .. } if reason.contains("refusing to replace")),
            "{replace}"
        );
        assert_eq!(snapshot(&dir), before, "{} untouched", dir.display());
        let leftovers: Vec<_> = entries(tmp.path()).into_iter().filter(|n| n.starts_with('.')).collect();
        assert!(leftovers.is_empty(), "nothing written beside it: {leftovers:?}");
        // The CLI's --replace takes the same path.
        let out = Command::new(env!("CARGO_BIN_EXE_uring-ckpt"))
            .args(["save", "--synthetic", "64KiB", "--replace", "--out"])
            .arg(&dir)
            .env_remove("URING_CKPT_CONFIG")
            .output()
            .expect("run cli");
        assert_ne!(out.status.code(), Some(0), "CLI --replace of {}", dir.display());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("refusing to replace"), "{stderr}");
        assert_eq!(snapshot(&dir), before, "{} untouched by the CLI", dir.display());
    }
    // A checkpoint of ours is still removed and replaced, whatever a user added to it.
    let config = small_config(EngineKind::Uring);
    let ours = make(tmp.path(), "ours", &config);
    fs::write(ours.join("my-notes.txt"), b"added by the user").expect("write");
    let replacing = Config { replace_existing: true, ..config.clone() };
    let mut ck = Checkpoint::new();
    ck.add("t", Dtype::U8, &[4096], &data).expect("t");
    UringCheckpointIO::new(replacing).expect("config").save_checkpoint(&ck, &ours).expect("replace ours");
    assert!(!ours.join("my-notes.txt").exists(), "a replace drops files the user added");
    UringCheckpointIO::new(config).expect("config").remove_checkpoint(&ours).expect("remove ours");
    assert!(!ours.exists());
}

#[test]
fn reserved_and_over_long_names_are_refused_before_anything_is_written() {
    let tmp = scratch();
    let parent = tmp.path().join("parent");
    fs::create_dir(&parent).expect("mkdir");
    let io = UringCheckpointIO::new(small_config(EngineKind::Uring)).expect("config");
    let data = bytes(5, 4096);
    let mut ck = Checkpoint::new();
    ck.add("t", Dtype::U8, &[4096], &data).expect("t");
    let long = "n".repeat(uring_ckpt::store::names::MAX_CHECKPOINT_NAME + 1);
    for name in [".ck.tmp-123-abc-0", ".ck.tmp-removing-1", ".ck.tmp-step-7", ".ck.lock", long.as_str()] {
        let err = io.save_checkpoint(&ck, &parent.join(name)).expect_err(name);
        assert!(matches!(err, Error::InvalidCheckpoint(_)), "{name}: {err}");
        assert!(entries(&parent).is_empty(), "{name}: nothing written: {:?}", entries(&parent));
        let err = io.save_rank(&ck, &parent.join(name), "s1", 0).expect_err(name);
        assert!(matches!(err, Error::InvalidCheckpoint(_)), "{name}: {err}");
        assert!(entries(&parent).is_empty(), "{name}: nothing written by save_rank");
    }
    // The longest accepted name works end to end.
    let longest = "n".repeat(uring_ckpt::store::names::MAX_CHECKPOINT_NAME);
    io.save_checkpoint(&ck, &parent.join(&longest)).expect("longest name");
    let loaded = io.load_checkpoint(&parent.join(&longest), &LoadOptions::default()).expect("load");
    assert_eq!(&loaded.tensors[0].data[..], &data[..]);
    // A save id too long for this name is refused up front too.
    let err = io.save_rank(&ck, &parent.join(&longest), &"s".repeat(100), 0).expect_err("long id");
    assert!(matches!(err, Error::InvalidCheckpoint(_)), "{err}");
    assert_eq!(entries(&parent), vec![longest.clone()]);
}

#[test]
fn the_reserved_tensor_name_is_an_input_error_before_anything_is_written() {
    let tmp = scratch();
    let io = UringCheckpointIO::new(small_config(EngineKind::Uring)).expect("config");
    let data = bytes(6, 64);
    let mut ck = Checkpoint::new();
    let err = ck.add("__metadata__", Dtype::U8, &[64], &data).map(|_| ()).expect_err("add");
    assert!(matches!(err, Error::InvalidCheckpoint(_)), "{err}");
    // Built without `add` (as the Python binding may): refused by the save itself.
    let mut ck = Checkpoint::new();
    ck.add("x", Dtype::U8, &[64], &data).expect("x");
    ck.tensors[0].name = "__metadata__".into();
    let err = io.save_checkpoint(&ck, &tmp.path().join("ck")).expect_err("save");
    assert!(matches!(err, Error::InvalidCheckpoint(_)), "{err}");
    assert!(entries(tmp.path()).is_empty(), "nothing written: {:?}", entries(tmp.path()));
}
