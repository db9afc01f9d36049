//! The CUDA source (feature `cuda`): a clear error where CUDA is missing; where a GPU exists,
//! device memory saved through the async layer (staging page-locked) loads back unchanged,
//! even when the device memory is overwritten right after `staged()`.
#![cfg(feature = "cuda")]

use crate::common;

use std::sync::Arc;

use common::{bytes, scratch};
use uring_ckpt::config::{AsyncMode, Config};
use uring_ckpt::format::Dtype;
use uring_ckpt::source::cuda::{probe, CudaContext, CudaStaging, CudaTensorSource};
use uring_ckpt::{
    AsyncCheckpointIO, AsyncOptions, CheckpointIO, Error, LoadOptions, OwnedCheckpoint, UringCheckpointIO,
};

#[test]
fn missing_libcuda_is_a_clear_unavailable_error() {
    match probe() {
        Err(Error::Unavailable(what)) => {
            assert!(what.contains("libcuda.so.1 not found"), "{what}");
            // Never a panic from the bindings: the constructors probe first.
            match CudaContext::new(0) {
                Err(Error::Unavailable(what)) => assert!(what.contains("libcuda.so.1"), "{what}"),
                other => panic!("expected Unavailable, got {other:?}"),
            }
        }
        Err(other) => panic!("unexpected error kind: {other}"),
        Ok(()) => eprintln!("libcuda.so.1 is present: nothing to check here (see the GPU test)"),
    }
}

#[test]
fn device_memory_saves_through_the_async_layer() {
    if let Err(e) = probe() {
        eprintln!("skipped: {e}");
        return;
    }
    let ctx = match CudaContext::new(0) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let dir = scratch();
    let config = Config::builder().chunk_size(1 << 20).staging_pool_size(8 << 20).build().expect("config");
    for mode in [AsyncMode::Stream, AsyncMode::Snapshot] {
        let inner = UringCheckpointIO::new(config.clone()).expect("config");
        let io = AsyncCheckpointIO::new(inner, AsyncOptions { mode, max_saves_in_flight: 1 }).expect("io");
        // The pool page-locks its buffers and unlocks each before freeing it.
        let registered = io.inner().prepare_staging(Arc::new(CudaStaging::new(ctx.clone()))).registered;
        eprintln!("{mode}: {registered} staging buffers page-locked");

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
        let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
        assert!(loaded.get("gpu").expect("tensor").data[..] == old[..], "{mode}: device tensor differs");
        drop(io);
        let _ = UringCheckpointIO::new(config.clone()).and_then(|io| io.remove_checkpoint(&path));
    }
}
