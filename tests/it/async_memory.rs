//! Memory of a streaming save: saving from a (simulated) device whose bytes are generated on
//! the fly, the process's peak RSS stays under the staging pool plus 64 MiB, whatever the
//! checkpoint size. The save runs in a process of its own (this test binary re-run on this
//! test alone), so that VmHWM is this save's, not that of the tests beside it in the binary.

use std::sync::Arc;

use uring_ckpt::config::{AsyncMode, Config};
use uring_ckpt::format::Dtype;
use uring_ckpt::source::SimulatedDevice;
use uring_ckpt::{AsyncCheckpointIO, AsyncOptions, OwnedCheckpoint, UringCheckpointIO};

/// Set in the child process that makes the measured save.
const CHILD: &str = "URING_CKPT_TEST_RSS_CHILD";

/// Runs `test` of this test binary alone in a child process with [`CHILD`] set, and passes
/// on what it printed (the peak measured, or why it skipped).
fn in_own_process(test: &str) {
    let exe = std::env::current_exe().expect("current exe");
    let out = std::process::Command::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .expect("spawn child");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the measuring child failed ({}):\n{stdout}", out.status);
    // A name the harness does not know would run nothing and pass.
    assert!(stdout.contains("1 passed"), "the child did not run {test}:\n{stdout}");
}

fn vm_hwm_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

#[test]
fn stream_mode_peak_rss_is_bounded_by_the_pool() {
    if std::env::var_os(CHILD).is_none() {
        in_own_process(&crate::reliability::test_name(
            module_path!(),
            "stream_mode_peak_rss_is_bounded_by_the_pool",
        ));
        return;
    }
    let pool = 32u64 << 20;
    let config = Config::builder()
        .chunk_size(4 << 20)
        .staging_pool_size(pool)
        .max_shard_size(128 << 20)
        .build()
        .expect("config");
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).expect("tmp dir");
    let dir = tempfile::tempdir_in(base).expect("scratch");
    let device = SimulatedDevice::new(0).expect("device");
    let total = 256usize << 20; // 8 x the pool
    let mut ck = OwnedCheckpoint::new();
    for i in 0..2 {
        ck.add(format!("t{i}"), Dtype::U8, &[total as u64 / 2], Arc::new(device.generated(total / 2, i)))
            .expect("add");
    }
    let io = AsyncCheckpointIO::new(
        UringCheckpointIO::new(config).expect("config"),
        AsyncOptions { mode: AsyncMode::Stream, max_saves_in_flight: 1, ..AsyncOptions::default() },
    )
    .expect("io");
    let report = io.save_checkpoint(ck, dir.path().join("big")).expect("start").wait().expect("durable");
    assert_eq!(report.data_bytes, total as u64);
    let Some(peak) = vm_hwm_bytes() else {
        eprintln!("skipped: /proc/self/status has no VmHWM");
        return;
    };
    eprintln!(
        "peak RSS {:.1} MiB for {} MiB saved through a {} MiB pool",
        peak as f64 / 1048576.0,
        total >> 20,
        pool >> 20
    );
    assert!(peak < pool + (64 << 20), "peak RSS {peak} exceeds pool + 64 MiB");
}
