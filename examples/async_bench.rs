//! Stall of asynchronous saves against a synchronous save, and overlap of simulated device
//! copies with disk writes, side by side in one run.
//!
//! ```text
//! cargo run --release --example async_bench -- --size 4GiB --dir DIR [--tensor-size 256MiB]
//!     [--bandwidth 1GiB] [--only all|host|device]
//! ```
//!
//! `--only device` allocates no host tensors, so its peak RSS (VmHWM) is that of a streaming
//! save from a device whose bytes are generated on the fly: the staging pool plus overhead.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use uring_ckpt::config::{format_size, parse_size, AsyncMode, Config};
use uring_ckpt::format::Dtype;
use uring_ckpt::source::simulated::generate;
use uring_ckpt::source::SimulatedDevice;
use uring_ckpt::{
    AsyncCheckpointIO, AsyncOptions, Checkpoint, CheckpointIO, OwnedCheckpoint, SaveReport, UringCheckpointIO,
};

struct Args {
    size: u64,
    tensor_size: u64,
    bandwidth: u64,
    dir: PathBuf,
    only: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        size: 4 << 30,
        tensor_size: 256 << 20,
        bandwidth: 1 << 30,
        dir: PathBuf::from("bench-out"),
        only: "all".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let size = |v: String| parse_size(&v).map_err(|e| e.to_string());
        match flag.as_str() {
            "--size" => args.size = size(value()?)?,
            "--tensor-size" => args.tensor_size = size(value()?)?,
            "--bandwidth" => args.bandwidth = size(value()?)?,
            "--dir" => args.dir = PathBuf::from(value()?),
            "--only" => args.only = value()?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.tensor_size == 0 || args.size == 0 {
        return Err("sizes must be positive".into());
    }
    Ok(args)
}

/// Tensor sizes adding up to `size`.
fn sizes(size: u64, tensor: u64) -> Vec<usize> {
    let mut out = Vec::new();
    let mut left = size;
    while left > 0 {
        let n = left.min(tensor);
        out.push(n as usize);
        left -= n;
    }
    out
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn gib_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / seconds
}

fn line(label: &str, r: &SaveReport) {
    println!(
        "{label:<28} stall {:>7.3}s  durable {:>7.3}s  ({:.2} GiB/s)  copy {:>6.3}s  write {:>6.3}s  overlap {:.2}  commit {:.3}s  \
         write p50/p99/p99.9 {}/{}/{} us",
        r.stall_seconds,
        r.seconds,
        gib_s(r.file_bytes, r.seconds),
        r.copy_seconds,
        r.write_seconds,
        r.overlap_ratio,
        r.commit_seconds,
        r.write_latency.p50_us,
        r.write_latency.p99_us,
        r.write_latency.p999_us
    );
}

fn remove(path: &Path) {
    if path.exists() {
        if let Err(e) = UringCheckpointIO::new(Config::default()).and_then(|io| io.remove_checkpoint(path)) {
            eprintln!("cannot remove {}: {e}", path.display());
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let config = Config::load(None)?;
    std::fs::create_dir_all(&args.dir)?;
    let sizes = sizes(args.size, args.tensor_size);
    println!(
        "checkpoint {} in {} tensors; chunk {}, staging pool {}, queue depth {}, fsync {}",
        format_size(args.size),
        sizes.len(),
        format_size(config.chunk_size),
        format_size(config.staging_pool_size),
        config.queue_depth,
        config.fsync
    );

    if args.only == "all" || args.only == "host" {
        let host: Vec<Arc<Vec<u8>>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut v = vec![0u8; n];
                generate(i as u64, 0, &mut v);
                Arc::new(v)
            })
            .collect();
        let owned = || {
            let mut ck = OwnedCheckpoint::new();
            for (i, data) in host.iter().enumerate() {
                ck.add(format!("t{i:04}"), Dtype::U8, &[data.len() as u64], data.clone()).map(|_| ())?;
            }
            Ok::<_, uring_ckpt::Error>(ck)
        };
        let memcpy_started = Instant::now();
        let mut scratch: Vec<Vec<u8>> = host.iter().map(|d| d.to_vec()).collect();
        let first_memcpy = memcpy_started.elapsed().as_secs_f64();
        let started = Instant::now();
        for (dst, src) in scratch.iter_mut().zip(&host) {
            dst.copy_from_slice(src);
        }
        let memcpy = started.elapsed().as_secs_f64();
        drop(scratch);
        println!(
            "{:<28} {memcpy:.3}s warm ({:.2} GiB/s), {first_memcpy:.3}s into fresh memory",
            "one memcpy of the checkpoint",
            gib_s(args.size, memcpy)
        );

        let sync = UringCheckpointIO::new(config.clone())?;
        let borrowed = {
            let mut ck = Checkpoint::new();
            for (i, data) in host.iter().enumerate() {
                ck.add(format!("t{i:04}"), Dtype::U8, &[data.len() as u64], data)?;
            }
            ck
        };
        let path = args.dir.join("sync");
        remove(&path);
        let sync_report = sync.save_checkpoint(&borrowed, &path)?;
        line("sync save", &sync_report);
        remove(&path);
        drop(sync);

        for mode in [AsyncMode::Snapshot, AsyncMode::Stream] {
            let io = AsyncCheckpointIO::new(
                UringCheckpointIO::new(config.clone())?,
                AsyncOptions { mode, max_saves_in_flight: 1, ..AsyncOptions::default() },
            )?;
            for round in ["first", "second"] {
                let path = args.dir.join(format!("async-{mode}"));
                remove(&path);
                let called = Instant::now();
                let handle = io.save_checkpoint(owned()?, &path)?;
                handle.staged().wait();
                let staged = called.elapsed().as_secs_f64();
                let report = handle.wait()?;
                line(&format!("async {mode} ({round})"), &report);
                println!(
                    "{:<28} caller waited {staged:.3}s = {:.3} of the sync save",
                    "",
                    staged / sync_report.seconds
                );
                remove(&path);
            }
        }
        // The first snapshot save again, with its area reserved (faulted in) ahead of it.
        let io = AsyncCheckpointIO::new(
            UringCheckpointIO::new(config.clone())?,
            AsyncOptions { mode: AsyncMode::Snapshot, max_saves_in_flight: 1, ..AsyncOptions::default() },
        )?;
        let reserve_started = Instant::now();
        io.reserve_snapshot(args.size as usize)?;
        io.wait_reserved();
        let reserved = reserve_started.elapsed().as_secs_f64();
        let path = args.dir.join("async-snapshot-reserved");
        remove(&path);
        let called = Instant::now();
        let handle = io.save_checkpoint(owned()?, &path)?;
        handle.staged().wait();
        let staged = called.elapsed().as_secs_f64();
        let report = handle.wait()?;
        line("async snapshot (reserved)", &report);
        println!(
            "{:<28} caller waited {staged:.3}s = {:.3} of the sync save (reservation took {reserved:.3}s beforehand, off the critical path)",
            "",
            staged / sync_report.seconds
        );
        remove(&path);
    }

    if args.only == "all" || args.only == "device" {
        let device = SimulatedDevice::new(args.bandwidth)?;
        let mut ck = OwnedCheckpoint::new();
        for (i, &n) in sizes.iter().enumerate() {
            ck.add(format!("t{i:04}"), Dtype::U8, &[n as u64], Arc::new(device.generated(n, i as u64)))?;
        }
        let io = AsyncCheckpointIO::new(
            UringCheckpointIO::new(config.clone())?,
            AsyncOptions { mode: AsyncMode::Stream, max_saves_in_flight: 1, ..AsyncOptions::default() },
        )?;
        let path = args.dir.join("device-stream");
        remove(&path);
        let report = io.save_checkpoint(ck, &path)?.wait()?;
        let copy_alone = args.size as f64 / args.bandwidth as f64;
        line(&format!("device {}/s stream", format_size(args.bandwidth)), &report);
        println!(
            "{:<28} copy at bandwidth alone {copy_alone:.3}s; total {:.3}s = {:.2} x max(copy, write), {:.2} x (copy + write)",
            "",
            report.seconds,
            report.seconds / copy_alone.max(report.write_seconds),
            report.seconds / (copy_alone + report.write_seconds)
        );
        remove(&path);
    }
    let hwm = vm_hwm_kib();
    println!(
        "peak RSS (VmHWM) {:.1} MiB; staging pool {} (+64 MiB = {:.0} MiB)",
        hwm as f64 / 1024.0,
        format_size(config.staging_pool_size),
        config.staging_pool_size as f64 / 1048576.0 + 64.0
    );
    Ok(())
}
