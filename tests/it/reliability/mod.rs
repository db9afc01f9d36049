//! Helpers shared by the reliability tests (faults, crashes, hostile input, retention).
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use uring_ckpt::config::{Config, EngineKind};
use uring_ckpt::format::Dtype;
use uring_ckpt::{inspect, Checkpoint, CheckpointIO, LoadOptions, UringCheckpointIO};

use crate::common::{bytes, small_config};

pub mod loopfs;

use super::common::entries;

/// The tensors of one test checkpoint: sizes that cross 64 KiB chunks, an empty tensor, and
/// enough bytes (about 2.2 MiB) for several 1 MiB shards.
#[derive(Clone)]
pub struct Data {
    pub tensors: Vec<(String, Vec<u8>)>,
}

impl Data {
    pub fn new(seed: u64) -> Data {
        Data::sized(seed, &[0, 1, 4097, 300_000, (1 << 20) + 3, 600_000])
    }

    pub fn sized(seed: u64, sizes: &[usize]) -> Data {
        let tensors = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| (format!("t{i}"), bytes(seed * 100 + i as u64, len)))
            .collect();
        Data { tensors }
    }

    pub fn checkpoint(&self) -> Checkpoint<'_> {
        let mut ck = Checkpoint::new();
        for (name, data) in &self.tensors {
            ck.add(name.clone(), Dtype::U8, &[data.len() as u64], data).expect("tensor");
        }
        ck
    }

    /// Whether the checkpoint at `path` loads (CRCs checked), verifies, and holds exactly
    /// these tensors.
    pub fn matches(&self, config: &Config, path: &Path) -> bool {
        let io = UringCheckpointIO::new(config.clone()).expect("config");
        let Ok(loaded) = io.load_checkpoint(path, &LoadOptions { verify: Some(true), ..Default::default() })
        else {
            return false;
        };
        if inspect::verify(config, path, |_, _| {}).is_err() || loaded.tensors.len() != self.tensors.len() {
            return false;
        }
        self.tensors.iter().all(|(name, data)| loaded.get(name).is_some_and(|t| t.data[..] == data[..]))
    }

    pub fn assert_loads(&self, config: &Config, path: &Path, what: &str) {
        assert!(
            self.matches(config, path),
            "{what}: {} must load, verify and hold the expected tensors",
            path.display()
        );
    }
}

/// The config of the fault tests: small chunks and pool, 1 MiB shards, replacing allowed.
pub fn fault_config(engine: EngineKind) -> Config {
    let mut config = small_config(engine);
    config.max_shard_size = 1 << 20;
    config.replace_existing = true;
    config
}

/// The name the test harness gives the test `test` of the module `module` (pass
/// `module_path!()`), for re-running it in a child process with `--exact`: the harness names
/// a test by its path below the crate root, so the test binary's crate name is dropped
/// (`it::real_faults` gives `real_faults::kill_child`; a test file that is a binary of its
/// own gives `kill_child`).
pub fn test_name(module: &str, test: &str) -> String {
    match module.split_once("::") {
        Some((_crate, path)) => format!("{path}::{test}"),
        None => test.to_owned(),
    }
}

/// Runs the test `name` (see [`test_name`]) of this test binary in a child process with
/// `envs`, core dumps off.
pub fn run_self(name: &str, envs: &[(&str, String)]) -> ExitStatus {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    no_core_dumps(&mut cmd);
    cmd.stdout(std::process::Stdio::null());
    cmd.status().expect("spawn child")
}

/// Core dumps of children that abort on purpose would only cost time and disk.
pub fn no_core_dumps(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls setrlimit, which is
    // async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::setrlimit(libc::RLIMIT_CORE, &zero);
            Ok(())
        });
    }
}

/// Temporary directories (`.*.tmp-*`) in `dir`.
pub fn temp_dirs(dir: &Path) -> Vec<PathBuf> {
    entries(dir)
        .into_iter()
        .filter(|n| uring_ckpt::store::is_temporary_name(n))
        .map(|n| dir.join(n))
        .collect()
}

/// The newest `step-<n>` checkpoint committed in `dir` (0 when there is none).
pub fn newest_step(dir: &Path) -> u64 {
    uring_ckpt::retention::list_committed(dir)
        .expect("list")
        .last()
        .and_then(|p| p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok())
        .unwrap_or(0)
}

/// What a child process of a kill test does until it is killed: save `step-<n+1>` after the
/// newest one, point `latest` at it and keep the last `keep`, forever. It stops by itself
/// (exit 0) once `parent` (when given) is no longer its parent, so a killed test run leaves
/// no saver behind; a failed save exits 4.
pub fn save_steps_until_killed(
    io: &UringCheckpointIO,
    dir: &Path,
    keep: usize,
    parent: Option<i32>,
    data: impl Fn(u64) -> Data,
) -> ! {
    loop {
        // SAFETY: getppid has no preconditions.
        if parent.is_some_and(|p| unsafe { libc::getppid() } != p) {
            std::process::exit(0);
        }
        let step = newest_step(dir) + 1;
        let path = dir.join(format!("step-{step}"));
        if let Err(e) = io.save_checkpoint(&data(step).checkpoint(), &path) {
            eprintln!("save failed: {e}");
            std::process::exit(4);
        }
        uring_ckpt::retention::set_latest(&path).expect("latest");
        uring_ckpt::retention::keep_last(dir, keep).expect("keep_last");
    }
}
