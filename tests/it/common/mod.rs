//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use uring_ckpt::config::{Config, EngineKind};

/// A scratch directory on the repository's file system (a real disk, not tmpfs, so that
/// O_DIRECT is exercised).
pub fn scratch() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).expect("create target tmp dir");
    tempfile::tempdir_in(base).expect("create scratch dir")
}

/// Deterministic pseudo-random bytes (splitmix64).
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The engines every behaviour test runs on.
pub const ENGINES: [EngineKind; 3] = [EngineKind::Uring, EngineKind::Pwrite, EngineKind::Buffered];

/// A small config on `engine`: 64 KiB chunks, 4 buffers, so that tests cross chunk
/// boundaries and exhaust the pool.
pub fn small_config(engine: EngineKind) -> Config {
    Config::builder()
        .engine(engine)
        .chunk_size(64 * 1024)
        .staging_pool_size(256 * 1024)
        .queue_depth(4)
        .io_threads(2)
        .build()
        .expect("valid test config")
}

/// Path of a checkpoint inside `dir`.
pub fn ckpt(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Names in `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Every file of a checkpoint directory with its bytes, sorted by name.
pub fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| {
            let e = e.expect("entry");
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read"))
        })
        .collect();
    out.sort();
    out
}

/// Copies the files of a checkpoint directory into a new directory `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("list") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}
