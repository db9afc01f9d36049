//! Whole saves through [`crate::UringCheckpointIO`] with a fake registrar on its pool:
//! after every save (successful, failed, or with a panicking worker) each staging buffer
//! is back in the pool, registered exactly once, and no memory was freed while
//! registered; the next save writes the same bytes.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::testing::FakeRegistrar;
use super::Shape;
use crate::checkpoint::TensorData;
use crate::config::{Config, EngineKind};
use crate::error::{Error, Result};
use crate::io::testing::{arm, Fault};
use crate::source::TensorSource;
use crate::{Checkpoint, CheckpointIO, Dtype, UringCheckpointIO};

const ENGINES: [EngineKind; 3] = [EngineKind::Uring, EngineKind::Pwrite, EngineKind::Buffered];

fn scratch() -> tempfile::TempDir {
    // On the repository's file system, so that O_DIRECT runs (tmpfs refuses it).
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("tmp");
    std::fs::create_dir_all(&base).expect("create target/tmp");
    tempfile::tempdir_in(base).expect("scratch dir")
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    crate::source::simulated::generate(seed, 0, &mut out);
    out
}

/// The default pool (16 x 8 MiB) or a small one (4 x 64 KiB), shards of at most 1 MiB.
fn config(engine: EngineKind, small: bool) -> Config {
    let mut builder = Config::builder().engine(engine).max_shard_size(1 << 20).replace_existing(true);
    if small {
        builder = builder.chunk_size(64 * 1024).staging_pool_size(256 * 1024).queue_depth(4).io_threads(2);
    }
    builder.build().expect("valid config")
}

/// `shards` tensors of 700 KiB and some (so one shard each), odd lengths.
fn tensors(shards: usize) -> Vec<(String, Vec<u8>)> {
    (0..shards).map(|i| (format!("t{i}"), bytes(i as u64, 700 * 1024 + 4099 * i + 3))).collect()
}

fn checkpoint<'a>(tensors: &'a [(String, Vec<u8>)], source: Option<&'a dyn TensorSource>) -> Checkpoint<'a> {
    let mut ck = Checkpoint::new();
    for (name, data) in tensors {
        ck.add(name.clone(), Dtype::U8, &[data.len() as u64], data).expect("add");
    }
    if let Some(source) = source {
        ck.add_source("device", Dtype::U8, &[source.len() as u64], TensorData::Source(source)).expect("add");
    }
    ck
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| {
            let e = e.expect("entry");
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read"))
        })
        .collect();
    out.sort();
    out
}

/// Every buffer is idle in the pool and registered once with `fake`; nothing was freed
/// while registered.
fn assert_whole(io: &UringCheckpointIO, fake: &FakeRegistrar, what: &str) {
    let stats = io.staging_pool().stats();
    assert_eq!(stats.lent, 0, "{what}: buffers still lent: {stats:?}");
    assert_eq!(stats.registered, vec![stats.idle], "{what}: {stats:?}");
    let (_, _, live) = fake.counts();
    assert_eq!(live, stats.idle, "{what}: live registrations {live}, idle buffers {}", stats.idle);
    fake.assert_sound();
}

fn with_fake(config: Config) -> (UringCheckpointIO, Arc<FakeRegistrar>) {
    let io = UringCheckpointIO::new(config).expect("io");
    let fake = FakeRegistrar::new();
    let registration = io.prepare_staging(fake.clone());
    assert_eq!(registration.refused, 0);
    assert_eq!(registration.registered, io.staging_pool().stats().idle);
    (io, fake)
}

/// A device tensor whose `copy_to` fails, or panics, at its `at`-th call.
struct Flaky {
    bytes: Vec<u8>,
    at: usize,
    panic: bool,
    calls: AtomicUsize,
}

impl TensorSource for Flaky {
    fn len(&self) -> usize {
        self.bytes.len()
    }

    fn host_bytes(&self) -> Option<&[u8]> {
        None
    }

    fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.at {
            if self.panic {
                panic!("injected panic in copy_to");
            }
            return Err(Error::Unavailable("device (injected copy failure)".into()));
        }
        dst.copy_from_slice(&self.bytes[offset..offset + dst.len()]);
        Ok(())
    }
}

#[test]
fn multi_shard_saves_reuse_the_pool_and_keep_registrations_sound() {
    let dir = scratch();
    for engine in ENGINES {
        for small in [false, true] {
            for shards in [3, 4] {
                let what = format!("{engine} small={small} shards={shards}");
                let (io, fake) = with_fake(config(engine, small));
                let data = tensors(shards);
                let path = dir.path().join(format!("{engine}-{small}-{shards}"));
                let report = io.save_checkpoint(&checkpoint(&data, None), &path).expect("save");
                assert_eq!(report.shards, shards, "{what}");
                assert_whole(&io, &fake, &what);
                let first = files(&path);
                let allocated = io.staging_pool().stats().allocated;
                io.save_checkpoint(&checkpoint(&data, None), &path).expect("second save");
                assert_eq!(files(&path), first, "{what}: second save differs");
                assert_eq!(io.staging_pool().stats().allocated, allocated, "{what}: pool reallocated");
                assert_whole(&io, &fake, &what);
                drop(io);
                let (registers, unregisters, live) = fake.counts();
                assert_eq!((live, registers), (0, unregisters), "{what}: the pool's end unregisters all");
                fake.assert_sound();
            }
        }
    }
}

/// A save that fails (`fail` arms the fault) leaves the pool whole, and the save after
/// it writes what a save without faults writes.
fn fails_then_recovers(
    name: &str,
    setup: impl Fn(&Path) -> Option<crate::io::testing::Guard>,
    source: impl Fn() -> Option<Flaky>,
) {
    let dir = scratch();
    for engine in ENGINES {
        for small in [false, true] {
            let what = format!("{name} on {engine} small={small}");
            let (io, fake) = with_fake(config(engine, small));
            let data = tensors(4);
            let clean =
                Flaky { bytes: bytes(99, (20 << 20) + 17), at: 0, panic: false, calls: AtomicUsize::new(0) };
            let reference = dir.path().join(format!("{engine}-{small}-reference"));
            io.save_checkpoint(&checkpoint(&data, Some(&clean)), &reference).expect("reference save");

            let faulty_parent = dir.path().join(format!("{engine}-{small}-faulty"));
            std::fs::create_dir_all(&faulty_parent).expect("mkdir");
            let path = faulty_parent.join("ck");
            let guard = setup(&faulty_parent);
            let flaky = source();
            let source_ref = flaky.as_ref().map(|s| s as &dyn TensorSource);
            let failed = io.save_checkpoint(&checkpoint(&data, source_ref), &path);
            assert!(failed.is_err(), "{what}: the save should fail");
            assert!(!path.exists(), "{what}: nothing committed");
            assert_whole(&io, &fake, &what);
            drop(guard);

            io.save_checkpoint(&checkpoint(&data, Some(&clean)), &path).expect("save after the failure");
            assert_eq!(files(&path), files(&reference), "{what}: save after the failure differs");
            assert_whole(&io, &fake, &what);
            drop(io);
            assert_eq!(fake.counts().2, 0, "{what}: the pool's end unregisters all");
            fake.assert_sound();
        }
    }
}

#[test]
fn a_worker_whose_write_fails_mid_save_returns_its_buffers() {
    for at in [1, 3, 7] {
        fails_then_recovers(&format!("write {at} fails"), |p| Some(arm(p, Fault::FailWrite { at })), || None);
    }
}

#[test]
fn a_worker_that_panics_mid_save_returns_its_buffers() {
    fails_then_recovers("writer panics", |p| Some(arm(p, Fault::PanicWrite { at: 4 })), || None);
}

#[test]
fn a_stream_whose_source_fails_or_panics_returns_its_buffer() {
    for panic in [false, true] {
        fails_then_recovers(
            &format!("copy_to fails (panic: {panic})"),
            |_| None,
            || Some(Flaky { bytes: bytes(99, (20 << 20) + 17), at: 3, panic, calls: AtomicUsize::new(0) }),
        );
    }
}

#[test]
fn resizing_the_pool_between_saves_unregisters_before_freeing() {
    let dir = scratch();
    for engine in ENGINES {
        let (io, fake) = with_fake(config(engine, true));
        let data = tensors(3);
        let path = dir.path().join(format!("{engine}"));
        io.save_checkpoint(&checkpoint(&data, None), &path).expect("save");
        let first = files(&path);
        let pool = io.staging_pool();
        let shape = pool.shape().expect("shaped by the save");
        for (shape, capacity) in [
            (shape, 2),
            (shape, 24),
            (Shape { chunk: 128 * 1024, ..shape }, 5),
            (Shape { align: 65536, ..shape }, 3),
        ] {
            pool.resize(shape, capacity);
            assert_whole(&io, &fake, &format!("{engine} after resize to {capacity} x {shape:?}"));
            io.save_checkpoint(&checkpoint(&data, None), &path).expect("save after resize");
            assert_eq!(files(&path), first, "{engine}: save after resize differs");
            assert_whole(&io, &fake, &format!("{engine} after a save at {capacity} x {shape:?}"));
        }
        let stats = pool.stats();
        assert!(stats.freed > 0, "{stats:?}");
        drop(io);
        fake.assert_sound();
        assert_eq!(fake.counts().2, 0);
    }
}

#[test]
fn concurrent_saves_share_the_pool_and_settle_at_its_capacity() {
    let dir = scratch();
    let (io, fake) = with_fake(config(EngineKind::Uring, true));
    let data = tensors(3);
    std::thread::scope(|scope| {
        for i in 0..3 {
            let (io, data, dir) = (&io, &data, dir.path());
            scope.spawn(move || {
                io.save_checkpoint(&checkpoint(data, None), &dir.join(format!("c{i}"))).expect("save");
            });
        }
    });
    assert_whole(&io, &fake, "after concurrent saves");
    let stats = io.staging_pool().stats();
    assert!(stats.idle <= stats.capacity, "{stats:?}");
    assert_eq!(files(&dir.path().join("c0")), files(&dir.path().join("c2")));
}
