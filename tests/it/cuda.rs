//! The CUDA source (feature `cuda`): a clear error where CUDA is missing; where a GPU exists,
//! device memory saved through the sync and async layers (staging page-locked) loads back
//! unchanged, the calling thread's current context is left alone, streams are reused, copies
//! wait for the producer's event, registrations survive many saves and a failed one.
//!
//! Without a GPU the GPU tests skip, saying why; with `URING_CKPT_REQUIRE_GPU=1` (set by
//! `scripts/gpu-check.sh run`) a GPU that cannot be used is a failure, never a skip.
#![cfg(feature = "cuda")]

use crate::common;

use std::sync::Arc;

use common::{bytes, scratch};
use cudarc::driver::sys;
use uring_ckpt::config::{AsyncMode, Config};
use uring_ckpt::format::Dtype;
use uring_ckpt::source::cuda::{
    current_context, probe, CudaContext, CudaEvent, CudaStaging, CudaTensorSource,
};
use uring_ckpt::{
    AsyncCheckpointIO, AsyncOptions, Checkpoint, CheckpointIO, Error, LoadOptions, OwnedCheckpoint,
    UringCheckpointIO,
};

/// Device 0's context, or `None` (test skipped, reason printed) without a usable GPU;
/// panics instead when `URING_CKPT_REQUIRE_GPU=1`.
fn gpu() -> Option<Arc<CudaContext>> {
    let required = std::env::var_os("URING_CKPT_REQUIRE_GPU").is_some_and(|v| v == "1");
    match probe().and_then(|()| CudaContext::new(0)) {
        Ok(ctx) => Some(ctx),
        Err(e) if required => panic!("URING_CKPT_REQUIRE_GPU=1 but CUDA is unusable: {e}"),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn config() -> Config {
    Config::builder().chunk_size(1 << 20).staging_pool_size(8 << 20).build().expect("config")
}

fn load(io: &impl CheckpointIO, path: &std::path::Path, name: &str) -> Vec<u8> {
    let loaded = io.load_checkpoint(path, &LoadOptions::default()).expect("load");
    loaded.get(name).expect("tensor").data.to_vec()
}

#[test]
fn missing_libcuda_is_a_clear_unavailable_error() {
    match probe() {
        Err(Error::Unavailable(what)) => {
            assert!(what.starts_with("CUDA ("), "{what}");
            // Never a panic from the bindings: the constructors probe first.
            match CudaContext::new(0) {
                Err(Error::Unavailable(again)) => assert_eq!(again, what),
                other => panic!("expected Unavailable, got {other:?}"),
            }
            assert!(current_context().is_err());
        }
        Err(other) => panic!("unexpected error kind: {other}"),
        Ok(()) => {
            // A driver and a device: out-of-range ordinals are refused, not a driver panic.
            assert!(matches!(CudaContext::new(i32::MAX), Err(Error::Unavailable(_))));
            assert!(matches!(CudaContext::new(-1), Err(Error::Unavailable(_))));
        }
    }
}

#[test]
fn device_memory_saves_through_the_async_layer() {
    let Some(ctx) = gpu() else { return };
    let dir = scratch();
    for mode in [AsyncMode::Stream, AsyncMode::Snapshot] {
        let inner = UringCheckpointIO::new(config()).expect("config");
        let io = AsyncCheckpointIO::new(
            inner,
            AsyncOptions { mode, max_saves_in_flight: 1, ..AsyncOptions::default() },
        )
        .expect("io");
        // The pool page-locks its buffers and unlocks each before freeing it.
        let staging = Arc::new(CudaStaging::new(ctx.clone()));
        let registration = io.inner().prepare_staging(staging.clone());
        assert!(registration.first_error.is_none(), "{mode}: {:?}", registration.first_error);
        assert_eq!(registration.registered, 8, "{mode}: 8 MiB of 1 MiB buffers");
        assert_eq!(staging.registered(), 8);
        assert_eq!(io.inner().staging_pool().stats().registered, vec![8]);

        let len = (24 << 20) + 3;
        let old = bytes(11, len);
        let source = Arc::new(CudaTensorSource::upload(ctx.clone(), &old).expect("upload"));
        let mut ck = OwnedCheckpoint::new();
        ck.add("gpu", Dtype::U8, &[len as u64], source.clone()).expect("add");
        let path = dir.path().join(mode.as_str());
        let handle = io.save_checkpoint(ck, &path).expect("save");
        handle.staged().wait();
        source.write(0, &vec![0xEE; len]).expect("overwrite after staged");
        let report = handle.wait().expect("durable");
        eprintln!(
            "{mode}: stall {:.3}s, copy {:.3}s, write {:.3}s, overlap {:.2}, total {:.3}s",
            report.stall_seconds,
            report.copy_seconds,
            report.write_seconds,
            report.overlap_ratio,
            report.seconds
        );
        assert!(load(io.inner(), &path, "gpu") == old, "{mode}: device tensor differs");
        assert_eq!(staging.registered(), 8, "{mode}: registrations survive the save");
        drop(io);
        assert_eq!(staging.registered(), 0, "{mode}: every buffer unlocked when the pool went");
    }
}

#[test]
fn the_calling_threads_context_is_left_as_it_was() {
    let Some(ctx) = gpu() else { return };
    let dir = scratch();
    // A fresh thread has no current context; one that entered `ctx` keeps it.
    std::thread::scope(|s| {
        s.spawn(|| {
            assert!(current_context().expect("current").is_null(), "fresh thread");
            for (i, entered) in [false, true].into_iter().enumerate() {
                let guard = entered.then(|| ctx.enter().expect("enter"));
                let expected = if entered { ctx.raw() } else { std::ptr::null_mut() };
                let data = bytes(i as u64, 3 << 20);
                let source = Arc::new(CudaTensorSource::upload(ctx.clone(), &data).expect("upload"));
                assert_eq!(current_context().expect("current"), expected, "upload changed the context");
                let io = UringCheckpointIO::new(config()).expect("io");
                let _ = io.prepare_staging(Arc::new(CudaStaging::new(ctx.clone())));
                let mut ck = Checkpoint::new();
                ck.add_source(
                    "t",
                    Dtype::U8,
                    &[data.len() as u64],
                    uring_ckpt::checkpoint::TensorData::Source(&*source),
                )
                .expect("add");
                let path = dir.path().join(format!("sync{i}"));
                io.save_checkpoint(&ck, &path).expect("save");
                assert_eq!(current_context().expect("current"), expected, "a sync save changed it");
                let asio = AsyncCheckpointIO::new(io, AsyncOptions::default()).expect("async");
                let mut owned = OwnedCheckpoint::new();
                owned.add("t", Dtype::U8, &[data.len() as u64], source.clone()).expect("add");
                asio.save_checkpoint(owned, dir.path().join(format!("async{i}")))
                    .expect("save")
                    .wait()
                    .expect("ok");
                drop(asio);
                assert_eq!(current_context().expect("current"), expected, "an async save changed it");
                assert!(load(&UringCheckpointIO::new(config()).expect("io"), &path, "t") == data);
                drop(source);
                drop(guard);
                assert!(current_context().expect("current").is_null(), "the guard popped");
            }
        });
    });
}

#[test]
fn streams_are_reused_and_registrations_survive_many_saves_and_a_failed_one() {
    let Some(ctx) = gpu() else { return };
    let dir = scratch();
    let io = UringCheckpointIO::new(config()).expect("io");
    let staging = Arc::new(CudaStaging::new(ctx.clone()));
    assert_eq!(io.prepare_staging(staging.clone()).registered, 8);
    let tensors: Vec<(Vec<u8>, CudaTensorSource)> = (0..200u64)
        .map(|i| {
            let data = bytes(i, 1000 + 37 * i as usize);
            let source = CudaTensorSource::upload(ctx.clone(), &data).expect("upload");
            (data, source)
        })
        .collect();
    let before = ctx.streams_created();
    std::fs::write(dir.path().join("file"), b"x").expect("file");
    for round in 0..25 {
        let mut ck = Checkpoint::new();
        for (i, (data, source)) in tensors.iter().enumerate() {
            ck.add_source(
                format!("t{i}"),
                Dtype::U8,
                &[data.len() as u64],
                uring_ckpt::checkpoint::TensorData::Source(source),
            )
            .expect("add");
        }
        if round == 10 {
            assert!(io.save_checkpoint(&ck, &dir.path().join("file/c")).is_err(), "beneath a regular file");
            continue;
        }
        let path = dir.path().join(format!("c{round}"));
        io.save_checkpoint(&ck, &path).expect("save");
        if round % 8 == 0 || round == 11 {
            let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
            for (i, (data, _)) in tensors.iter().enumerate() {
                assert!(loaded.get(&format!("t{i}")).expect("t").data[..] == data[..], "round {round} t{i}");
            }
        }
        io.remove_checkpoint(&path).expect("remove");
        assert_eq!(staging.registered(), 8, "round {round}");
        assert_eq!(io.staging_pool().stats().registered, vec![8], "round {round}");
    }
    let created = ctx.streams_created() - before;
    assert!(created <= 8, "{created} streams for 24 saves of 200 tensors: not reused");
    drop(io);
    assert_eq!(staging.registered(), 0);
}

#[test]
fn copies_wait_for_the_producers_event() {
    let Some(ctx) = gpu() else { return };
    let dir = scratch();
    let len = 64 << 20;
    let pattern = bytes(5, len);
    let src = CudaTensorSource::upload(ctx.clone(), &pattern).expect("upload pattern");
    let scratch_dev = CudaTensorSource::upload(ctx.clone(), &vec![0u8; 1 << 30]).expect("scratch");
    for round in 0..3 {
        let target = CudaTensorSource::upload(ctx.clone(), &vec![0u8; len]).expect("upload zeros");
        let event = {
            let _current = ctx.enter().expect("enter");
            let stream = cudarc::driver::result::stream::create(
                cudarc::driver::result::stream::StreamKind::NonBlocking,
            )
            .expect("stream");
            // SAFETY: device ranges inside allocations made above; the stream is live and
            // destroyed after its work is queued (the driver finishes it first).
            unsafe {
                for _ in 0..200 {
                    sys::cuMemsetD8Async(scratch_dev.device_ptr(), 1, 1 << 30, stream)
                        .result()
                        .expect("memset");
                }
                sys::cuMemcpyDtoDAsync_v2(target.device_ptr(), src.device_ptr(), len, stream)
                    .result()
                    .expect("copy");
            }
            // SAFETY: `stream` is a live stream of `ctx`.
            let event = unsafe { CudaEvent::record(ctx.clone(), stream as u64) }.expect("event");
            // SAFETY: created above, destroyed once (pending work completes first).
            unsafe { cudarc::driver::result::stream::destroy(stream) }.expect("destroy");
            Arc::new(event)
        };
        // SAFETY: `target` is `len` bytes of device memory in `ctx`, alive for the save.
        let source = unsafe { CudaTensorSource::from_raw(ctx.clone(), target.device_ptr(), len) }
            .and_then(|s| s.after(event))
            .expect("source");
        let io = UringCheckpointIO::new(config()).expect("io");
        let mut ck = Checkpoint::new();
        ck.add_source("t", Dtype::U8, &[len as u64], uring_ckpt::checkpoint::TensorData::Source(&source))
            .expect("add");
        let path = dir.path().join(format!("c{round}"));
        io.save_checkpoint(&ck, &path).expect("save");
        assert!(load(&io, &path, "t") == pattern, "round {round}: the copy did not wait for the producer");
    }
}

#[test]
fn loads_land_in_device_memory_through_the_cuda_sink() {
    use uring_ckpt::sink::cuda::{CudaDest, CudaSink};
    use uring_ckpt::source::TensorSource;
    let Some(ctx) = gpu() else { return };
    let dir = scratch();
    let io = UringCheckpointIO::new(config()).expect("io");
    io.prepare_staging(Arc::new(CudaStaging::new(ctx.clone())));
    let tensors: Vec<(String, Vec<u8>)> = [("a", 3 << 20), ("b", 1), ("c", 0), ("d", 5_000_001)]
        .iter()
        .map(|&(n, len)| (n.to_owned(), bytes(len as u64, len)))
        .collect();
    let mut ck = Checkpoint::new();
    for (name, data) in &tensors {
        ck.add(name.clone(), Dtype::U8, &[data.len() as u64], data).expect("add");
    }
    let path = dir.path().join("ck");
    io.save_checkpoint(&ck, &path).expect("save");
    let memory: Vec<CudaTensorSource> = tensors
        .iter()
        .map(|(_, d)| CudaTensorSource::upload(ctx.clone(), &vec![0u8; d.len()]).expect("alloc"))
        .collect();
    let dests = tensors
        .iter()
        .zip(&memory)
        // SAFETY: each destination is device memory of the right size owned by `memory`, which
        // outlives the load, and no two overlap.
        .map(|((n, d), m)| unsafe { CudaDest::from_raw(n.clone(), m.device_ptr(), d.len(), None, None) })
        .collect();
    // SAFETY: as above.
    let sink = unsafe { CudaSink::new(ctx.clone(), dests) }.expect("sink");
    io.load_into(&path, &LoadOptions::default(), true, &sink).expect("load into the device");
    for ((name, data), m) in tensors.iter().zip(&memory) {
        let mut back = vec![0u8; data.len()];
        m.copy_to(0, &mut back).expect("read back");
        assert!(back == *data, "{name}");
    }
    assert_eq!(
        current_context().expect("ctx"),
        std::ptr::null_mut(),
        "the calling thread's context is untouched"
    );
}
