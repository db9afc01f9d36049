//! The asynchronous save layer: no torn checkpoint when sources change right after
//! `staged()`, overlap of simulated device copies with disk writes, errors on the handle of
//! the save that failed, the in-flight limit and same-path ordering, futures without a
//! runtime, and teardown of dropped failures. On the real disk (see `common::scratch`).

use crate::common;

use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use common::{bytes, scratch};
use uring_ckpt::config::{AsyncMode, Config};
use uring_ckpt::format::Dtype;
use uring_ckpt::source::{HostPtrSource, SimulatedDevice, TensorSource};
use uring_ckpt::{
    AsyncCheckpointIO, AsyncOptions, Checkpoint, CheckpointIO, Error, LoadOptions, LoadedCheckpoint,
    OwnedCheckpoint, SaveReport, UringCheckpointIO,
};

const MODES: [AsyncMode; 2] = [AsyncMode::Stream, AsyncMode::Snapshot];

/// The tests of this file run one at a time: the overlap test times the disk and the CPUs.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// 64 KiB chunks, a 256 KiB ring: a few MiB of tensors cross the ring many times.
fn config() -> Config {
    Config::builder()
        .chunk_size(64 * 1024)
        .staging_pool_size(256 * 1024)
        .queue_depth(4)
        .build()
        .expect("valid test config")
}

fn async_io(config: Config, mode: AsyncMode, max: usize) -> AsyncCheckpointIO<UringCheckpointIO> {
    let inner = UringCheckpointIO::new(config).expect("config");
    AsyncCheckpointIO::new(inner, AsyncOptions { mode, max_saves_in_flight: max, ..AsyncOptions::default() })
        .expect("options")
}

fn load(path: &Path) -> LoadedCheckpoint {
    UringCheckpointIO::new(config())
        .expect("config")
        .load_checkpoint(path, &LoadOptions::default())
        .expect("load")
}

fn tmp_dirs_left(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| uring_ckpt::store::is_temporary_name(n))
        .collect()
}

/// A [`CheckpointIO`] that holds the save for a while right after the sources are staged,
/// so that the test overwrites them while the save is certainly still running.
struct HoldAfterStaged(UringCheckpointIO);

const HOLD: Duration = Duration::from_millis(100);

impl CheckpointIO for HoldAfterStaged {
    fn save_checkpoint(&self, checkpoint: &Checkpoint<'_>, path: &Path) -> uring_ckpt::Result<SaveReport> {
        // Snapshot mode calls this after staging.
        std::thread::sleep(HOLD);
        self.0.save_checkpoint(checkpoint, path)
    }

    fn save_checkpoint_staged(
        &self,
        checkpoint: &Checkpoint<'_>,
        path: &Path,
        on_staged: &(dyn Fn() + Sync),
    ) -> uring_ckpt::Result<SaveReport> {
        let hold = || {
            on_staged();
            std::thread::sleep(HOLD); // on the shard writer, before its header and fsync
        };
        self.0.save_checkpoint_staged(checkpoint, path, &hold)
    }

    fn load_checkpoint(&self, path: &Path, options: &LoadOptions) -> uring_ckpt::Result<LoadedCheckpoint> {
        self.0.load_checkpoint(path, options)
    }

    fn remove_checkpoint(&self, path: &Path) -> uring_ckpt::Result<()> {
        self.0.remove_checkpoint(path)
    }
}

#[test]
fn sources_overwritten_after_staged_never_tear_the_checkpoint() {
    let _serial = serial();
    let dir = scratch();
    for mode in MODES {
        for hold in [false, true] {
            let name = format!("{mode}-{}", if hold { "held" } else { "plain" });
            let path = dir.path().join(&name);
            let len = 3 * (1 << 20) + 5; // crosses the 256 KiB ring a dozen times, ends unaligned
            let old = bytes(1, len);
            let mut host = old.clone();
            let device = SimulatedDevice::new(0).expect("device");
            let old_device = bytes(2, 1 << 20);
            let on_device = Arc::new(device.upload(old_device.clone()));

            let mut ck = OwnedCheckpoint::new();
            // SAFETY: `host` is neither freed nor modified until `staged()` has resolved
            // below, and is not borrowed mutably in that time.
            let lent = unsafe { HostPtrSource::new(host.as_ptr(), host.len()) };
            ck.add("host", Dtype::U8, &[len as u64], Arc::new(lent)).expect("add");
            ck.add("device", Dtype::U8, &[1 << 20], on_device.clone()).expect("add");
            ck.add_bytes("small", Dtype::F32, &[3], vec![1u8; 12]).expect("add");
            ck.set_metadata("step", "1");

            let report = if hold {
                let inner = HoldAfterStaged(UringCheckpointIO::new(config()).expect("config"));
                let io = AsyncCheckpointIO::new(
                    inner,
                    AsyncOptions { mode, max_saves_in_flight: 1, ..AsyncOptions::default() },
                )
                .expect("io");
                let handle = io.save_checkpoint(ck, &path).expect("save");
                handle.staged().wait();
                overwrite(&mut host, &on_device);
                assert!(!handle.is_done(), "{name}: the save must still be running when the sources change");
                handle.wait().expect("durable")
            } else {
                let io = async_io(config(), mode, 1);
                let handle = io.save_checkpoint(ck, &path).expect("save");
                handle.staged().wait();
                overwrite(&mut host, &on_device);
                handle.wait().expect("durable")
            };
            assert!(report.stall_seconds <= report.seconds, "{name}: {report:?}");

            let loaded = load(&path);
            assert!(loaded.get("host").expect("host").data[..] == old[..], "{name}: host tensor torn");
            assert!(
                loaded.get("device").expect("device").data[..] == old_device[..],
                "{name}: device tensor torn"
            );
            assert_eq!(loaded.metadata.get("step").map(String::as_str), Some("1"));
        }
    }
}

/// What training does after `staged()`: the next step's values.
fn overwrite(host: &mut [u8], device: &uring_ckpt::source::SimulatedTensor) {
    host.fill(0xEE);
    device.reseed(99).expect("reseed");
}

#[test]
fn device_copies_overlap_disk_writes() {
    let _serial = serial();
    let dir = scratch();
    let config = Config::builder()
        .chunk_size(1 << 20)
        .staging_pool_size(8 << 20)
        .queue_depth(8)
        .max_shard_size(16 << 20)
        .build()
        .expect("config");
    let tensors = 8;
    let tensor_len = 16usize << 20; // 128 MiB in all
    let total = (tensors * tensor_len) as f64;

    // A wall-clock comparison: on a machine shared with other work one run can be slowed
    // unevenly, so the pipelined save gets three tries (each measuring write alone, copy
    // alone and both again); a save that does not pipeline fails all three.
    let mut attempt = 0;
    let (report, sum, copy_alone, write_alone, on_device) = loop {
        attempt += 1;
        let dir = dir.path().join(format!("try{attempt}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        // Write alone: the same bytes from host memory, synchronously.
        let host: Vec<Vec<u8>> = (0..tensors).map(|i| bytes(i as u64, tensor_len)).collect();
        let mut ck = Checkpoint::new();
        for (i, data) in host.iter().enumerate() {
            ck.add(format!("t{i}"), Dtype::U8, &[tensor_len as u64], data).expect("add");
        }
        let sync = UringCheckpointIO::new(config.clone()).expect("config");
        let write_alone = sync.save_checkpoint(&ck, &dir.join("host")).expect("save").seconds;

        // A device as fast as the disk, so that neither side hides the other by itself.
        let bandwidth = (total / write_alone).clamp(64.0 * 1048576.0, 2048.0 * 1048576.0) as u64;
        let device = SimulatedDevice::new(bandwidth).expect("device");
        // Stored (not generated) bytes: the copy thread only memcpys, even in a debug build.
        let on_device: Vec<_> = host.iter().map(|data| Arc::new(device.upload(data.clone()))).collect();

        // Copy alone: every byte out of the device once.
        let mut sink = vec![0u8; tensor_len];
        let started = Instant::now();
        for t in &on_device {
            t.copy_to(0, &mut sink).expect("copy");
        }
        let copy_alone = started.elapsed().as_secs_f64();

        let io = async_io(config.clone(), AsyncMode::Stream, 1);
        let mut ck = OwnedCheckpoint::new();
        for (i, t) in on_device.iter().enumerate() {
            ck.add(format!("t{i}"), Dtype::U8, &[tensor_len as u64], t.clone()).expect("add");
        }
        let report = io.save_checkpoint(ck, dir.join("device")).expect("save").wait().expect("durable");
        let sum = copy_alone + write_alone;
        eprintln!(
            "copy alone {copy_alone:.3}s, write alone {write_alone:.3}s, pipelined {:.3}s ({:.2} of the sum); \
             report: copy {:.3}s write {:.3}s overlap {:.2} stall {:.3}s",
            report.seconds,
            report.seconds / sum,
            report.copy_seconds,
            report.write_seconds,
            report.overlap_ratio,
            report.stall_seconds
        );
        if report.seconds < 0.85 * sum || attempt == 3 {
            break (report, sum, copy_alone, write_alone, (on_device, dir));
        }
    };
    let (on_device, try_dir) = on_device;
    assert!(
        report.seconds < 0.85 * sum,
        "no overlap: {:.3}s vs copy {copy_alone:.3}s + write {write_alone:.3}s",
        report.seconds
    );
    assert!(report.overlap_ratio > 0.3, "{report:?}");
    assert!(report.copy_seconds > 0.0 && report.write_seconds > 0.0);
    assert!(report.write_latency.p50_us > 0 && report.write_latency.p999_us >= report.write_latency.p50_us);
    let loaded = load(&try_dir.join("device"));
    for (i, t) in on_device.iter().enumerate() {
        assert!(loaded.get(&format!("t{i}")).expect("tensor").data[..] == t.to_host().expect("read")[..]);
    }
}

/// A source whose copies fail with EIO, as a device copy that fails.
struct FailingSource(usize);

impl TensorSource for FailingSource {
    fn len(&self) -> usize {
        self.0
    }

    fn host_bytes(&self) -> Option<&[u8]> {
        None
    }

    fn copy_to(&self, offset: usize, _dst: &mut [u8]) -> uring_ckpt::Result<()> {
        Err(Error::io_at(
            "copy from device",
            "(failing test device)",
            offset as u64,
            std::io::Error::from_raw_os_error(libc::EIO),
        ))
    }
}

fn good_checkpoint(seed: u64) -> (OwnedCheckpoint, Vec<u8>) {
    let data = bytes(seed, 300_000);
    let mut ck = OwnedCheckpoint::new();
    ck.add_bytes("w", Dtype::U8, &[300_000], data.clone()).expect("add");
    (ck, data)
}

#[test]
fn a_failing_save_fails_on_its_own_handle_and_later_saves_work() {
    let _serial = serial();
    let dir = scratch();
    for mode in MODES {
        let io = async_io(config(), mode, 2);
        let ok_path = dir.path().join(format!("{mode}-ok"));
        let bad_path = dir.path().join(format!("{mode}-bad"));
        let after_path = dir.path().join(format!("{mode}-after"));

        let (good, good_data) = good_checkpoint(1);
        let mut bad = OwnedCheckpoint::new();
        bad.add_bytes("fine", Dtype::U8, &[1000], vec![3u8; 1000]).expect("add");
        bad.add("broken", Dtype::U8, &[500_000], Arc::new(FailingSource(500_000))).expect("add");

        // Two in flight at once: each handle gets its own outcome.
        let ok = io.save_checkpoint(good, &ok_path).expect("start");
        let failing = io.save_checkpoint(bad, &bad_path).expect("start");
        let err = failing.wait().expect_err("the failing save must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{mode}: {err}");
        assert!(err.to_string().contains("failing test device"), "{err}");
        ok.wait().expect("the other save is unaffected");

        assert!(!bad_path.exists(), "{mode}: a failed save must not commit");
        assert_eq!(tmp_dirs_left(dir.path()), Vec::<String>::new(), "{mode}: temporary directory left");

        let (after, after_data) = good_checkpoint(2);
        io.save_checkpoint(after, &after_path).expect("start").wait().expect("a later save works");
        assert!(load(&ok_path).get("w").expect("w").data[..] == good_data[..]);
        assert!(load(&after_path).get("w").expect("w").data[..] == after_data[..]);
        io.teardown().expect("every failure was taken through its handle");
    }
}

#[test]
fn teardown_reports_failures_whose_handles_were_dropped() {
    let _serial = serial();
    let dir = scratch();
    let io = async_io(config(), AsyncMode::Stream, 1);
    let mut bad = OwnedCheckpoint::new();
    bad.add("broken", Dtype::U8, &[4096], Arc::new(FailingSource(4096))).expect("add");
    drop(io.save_checkpoint(bad, dir.path().join("dropped")).expect("start"));
    let err = io.teardown().expect_err("the dropped failure is reported");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    io.teardown().expect("reported once");
}

#[test]
fn in_flight_limit_and_same_path_wait_for_the_save_in_flight() {
    let _serial = serial();
    let dir = scratch();
    let device = SimulatedDevice::new(32 << 20).expect("device"); // 4 MiB take ~125 ms
    let slow = || {
        let mut ck = OwnedCheckpoint::new();
        ck.add("slow", Dtype::U8, &[4 << 20], Arc::new(device.generated(4 << 20, 5))).expect("add");
        ck
    };

    // Limit 1: the second save starts only once the first is finished.
    let io = async_io(config(), AsyncMode::Stream, 1);
    let first = io.save_checkpoint(slow(), dir.path().join("a")).expect("start");
    assert!(!first.is_done());
    let second = io.save_checkpoint(good_checkpoint(1).0, dir.path().join("b")).expect("start");
    assert!(first.is_done(), "the second save must wait for a slot");
    first.wait().expect("first");
    second.wait().expect("second");

    // Limit 2, same path: removal and a replacing save wait for the save in flight.
    let mut config = config();
    config.replace_existing = true;
    let io = async_io(config, AsyncMode::Stream, 2);
    let target = dir.path().join("same");
    let first = io.save_checkpoint(slow(), &target).expect("start");
    io.remove_checkpoint(&target).expect("remove waits, then removes");
    assert!(first.is_done());
    first.wait().expect("first");
    assert!(!target.exists());

    let first = io.save_checkpoint(slow(), &target).expect("start");
    let (ck, data) = good_checkpoint(7);
    let replacing = io.save_checkpoint(ck, &target).expect("start");
    assert!(first.is_done(), "a save to the same path must wait for the one in flight");
    first.wait().expect("first");
    replacing.wait().expect("replacing save");
    let loaded = io.load_checkpoint(&target, &LoadOptions::default()).expect("load");
    assert!(loaded.get("w").expect("w").data[..] == data[..], "the later save wins");
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// The smallest executor: poll, park until woken.
fn block_on<F: Future>(future: F) -> F::Output {
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

#[test]
fn completions_are_futures_without_a_runtime() {
    let _serial = serial();
    let dir = scratch();
    for mode in MODES {
        let io = async_io(config(), mode, 1);
        let device = SimulatedDevice::new(64 << 20).expect("device");
        let mut ck = OwnedCheckpoint::new();
        ck.add("d", Dtype::U8, &[2 << 20], Arc::new(device.generated(2 << 20, 3))).expect("add");
        let handle = io.save_checkpoint(ck, dir.path().join(mode.as_str())).expect("start");
        let staged = handle.staged();
        block_on(staged.clone());
        assert!(staged.is_staged());
        let report = block_on(handle.durable()).expect("durable");
        assert!(report.stall_seconds > 0.0 && report.stall_seconds <= report.seconds, "{report:?}");
        assert!(report.copy_seconds > 0.0, "{report:?}");
        assert_eq!(report.data_bytes, 2 << 20);
    }
}

/// `from_config`: the reservation, the config's background settings, and a save of several
/// shards through one writer thread into the reserved area.
#[test]
fn from_config_reserves_the_snapshot_area_and_bounds_the_background_threads() {
    let _serial = serial();
    let dir = scratch();
    let config = Config::builder()
        .async_mode(AsyncMode::Snapshot)
        .max_shard_size(1 << 20)
        .background_threads(1)
        .background_nice(12)
        .build()
        .expect("config");
    let stream = AsyncCheckpointIO::from_config(Config { async_mode: AsyncMode::Stream, ..config.clone() });
    assert_eq!(
        stream.expect("io").inner().threads(),
        uring_ckpt::io::SaveThreads::Foreground,
        "its caller waits"
    );
    let io = AsyncCheckpointIO::from_config(config).expect("io");
    assert_eq!(io.inner().threads(), uring_ckpt::io::SaveThreads::Background(1));
    assert_eq!(io.options().background_nice, 12);
    io.reserve_snapshot(16 << 20).expect("reserve");
    io.wait_reserved();
    let stats = io.snapshot_stats();
    assert_eq!(
        (stats.areas, stats.reserved_bytes, stats.resident_bytes),
        (1, 16 << 20, 16 << 20),
        "{stats:?}"
    );
    assert!(!stats.reserving);

    let mut ck = OwnedCheckpoint::new();
    let expected: Vec<Vec<u8>> = (0..5u64).map(|i| bytes(10 + i, (3 << 20) + i as usize)).collect();
    for (i, bytes) in expected.iter().enumerate() {
        ck.add_bytes(format!("t{i}"), Dtype::U8, &[bytes.len() as u64], bytes.clone()).expect("add");
    }
    let handle = io.save_checkpoint(ck, dir.path().join("c")).expect("save");
    handle.staged().wait();
    let report = handle.wait().expect("durable");
    assert_eq!(report.shards, 5, "one shard per tensor, all through one writer thread");
    let loaded = load(&dir.path().join("c"));
    for (i, bytes) in expected.iter().enumerate() {
        assert!(loaded.get(&format!("t{i}")).expect("tensor").data[..] == bytes[..], "t{i}");
    }
    let stats = io.snapshot_stats();
    assert_eq!((stats.areas, stats.in_use), (1, 0), "the save used the reserved area: {stats:?}");
    assert_eq!(stats.reserved_bytes, 16 << 20, "trimmed to the save's 15 MiB and change, rounded to 2 MiB");
}
