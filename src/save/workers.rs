//! The shard writer threads of one save: up to four at once, each taking the next unwritten
//! shard, each with its own engine writer and its share of the staging pool; their figures
//! are merged into the save's report here, once.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::plan::{plan_shards, shard_file_name, worker_config};
use super::shard_writer::{write_shard, ShardOptions, ShardVolume};
use super::{RankShards, TensorLocation};
use crate::checkpoint::{Checkpoint, TensorView};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::format::ShardInfo;
use crate::io::stats::overlap_ratio;
use crate::io::{self, EngineReport, IoStats, SaveThreads, StagingPool};
use crate::report::{mib_per_s, SaveReport, StagedSignal};

/// Writes all shards of `checkpoint` into `dir`, several at once (as many as `threads`
/// allows).
#[allow(clippy::too_many_arguments)]
pub(super) fn write_shards(
    config: &Config,
    pool: &StagingPool,
    checkpoint: &Checkpoint<'_>,
    target: &Path,
    dir: &Path,
    rank: u32,
    signal: &StagedSignal<'_>,
    threads: SaveThreads,
) -> Result<RankShards> {
    let started = Instant::now();
    checkpoint.validate()?;
    let plan = plan_shards(config, checkpoint);
    signal.expect(plan.len());
    let on_appended = || signal.shard_appended();
    let options = ShardOptions {
        zero_copy: !signal.is_watched(),
        on_appended: Some(&on_appended),
        split: threads.may_split(),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = plan.len().min(threads.writers(cores));
    let per_worker = worker_config(config, workers);
    // Each writer borrows an equal share of the pool for its lifetime; the pool keeps
    // what the workers of a save need together (at least the configured pool).
    let share = per_worker.staging_buffers().max(2);
    pool.set_capacity(config.staging_buffers().max(2).max(workers * share));
    let next = AtomicUsize::new(0);
    let names: Vec<String> = (0..plan.len()).map(|i| shard_file_name(rank, i)).collect();
    let header_metadata = header_metadata(&checkpoint.metadata);

    let outcomes: Vec<Result<WorkerOutcome>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (plan, names, next, per_worker, pool) = (&plan, &names, &next, &per_worker, pool);
                let (staging, metadata) = ((pool, share), &header_metadata);
                scope.spawn(move || {
                    let shards = (&plan[..], &names[..], next);
                    run_worker(per_worker, dir, staging, shards, metadata, options, threads)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| Err(Error::Internal("a shard writer thread panicked".into())))
            })
            .collect()
    });

    let mut shards: Vec<(usize, ShardInfo, Vec<TensorLocation>)> = Vec::new();
    let mut stats = IoStats::default();
    let mut volume = ShardVolume::default();
    let mut engine: Option<EngineReport> = None;
    let mut first_error = None;
    for outcome in outcomes {
        match outcome {
            Ok(out) => {
                shards.extend(out.shards);
                stats.merge(&out.stats);
                volume.add(&out.volume);
                engine.get_or_insert(out.engine);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(err) = first_error {
        return Err(err);
    }
    shards.sort_by_key(|(i, ..)| *i);
    let mut tensors = Vec::with_capacity(checkpoint.tensors.len());
    let shards: Vec<ShardInfo> = shards
        .into_iter()
        .map(|(_, shard, locations)| {
            tensors.extend(locations);
            shard
        })
        .collect();
    let mut weight_map = BTreeMap::new();
    for (i, tensors) in plan.iter().enumerate() {
        for t in tensors {
            weight_map.insert(t.name.clone(), names[i].clone());
        }
    }
    let file_bytes: u64 = shards.iter().map(|s| s.size).sum();
    let seconds = started.elapsed().as_secs_f64();
    let report = SaveReport {
        path: target.to_path_buf(),
        data_bytes: checkpoint.data_bytes(),
        file_bytes,
        shards: shards.len(),
        tensors: checkpoint.tensors.len(),
        seconds,
        commit_seconds: 0.0,
        stall_seconds: signal.seconds().unwrap_or(seconds),
        copy_seconds: volume.copies.busy().as_secs_f64(),
        write_seconds: stats.busy.busy().as_secs_f64(),
        overlap_ratio: overlap_ratio(&volume.copies, &stats.busy),
        throughput_mib_s: mib_per_s(file_bytes, seconds),
        zero_copy_bytes: volume.zero_copy_bytes,
        staged_bytes: volume.staged_bytes,
        engine: engine.unwrap_or_else(|| empty_report(config)),
        write_latency: stats.percentiles_us(),
        writes: stats.ops,
        submit_calls: stats.submits,
        sqes_submitted: stats.sqes_submitted,
    };
    Ok(RankShards {
        rank,
        shards,
        weight_map,
        data_bytes: checkpoint.data_bytes(),
        tensors,
        report: Some(report),
    })
}

/// Key and value every shard header's `__metadata__` carries unless the checkpoint's
/// metadata sets the key: Hugging Face loaders refuse a PyTorch checkpoint without it.
const HF_FORMAT: (&str, &str) = ("format", "pt");

/// The `__metadata__` of every shard: the checkpoint's metadata plus [`HF_FORMAT`].
fn header_metadata(metadata: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut out = metadata.clone();
    out.entry(HF_FORMAT.0.to_owned()).or_insert_with(|| HF_FORMAT.1.to_owned());
    out
}

fn empty_report(config: &Config) -> EngineReport {
    EngineReport {
        requested: config.engine,
        engine: config.engine,
        direct_io: false,
        registered_buffers: false,
        align: 4096,
        mem_align: 4096,
        queue_depth: config.queue_depth,
        offload_writes: false,
        fallbacks: Vec::new(),
    }
}

struct WorkerOutcome {
    shards: Vec<(usize, ShardInfo, Vec<TensorLocation>)>,
    stats: IoStats,
    volume: ShardVolume,
    engine: EngineReport,
}

/// One writer thread: takes the next unwritten shard (of the plan, their names and the
/// counter of the next) until none is left. Its writer borrows `staging.1` buffers of the
/// pool `staging.0`; they go back when the writer drops, whether this returns or unwinds.
fn run_worker<'a>(
    config: &Config,
    dir: &Path,
    staging: (&StagingPool, usize),
    (plan, names, next): (&[Vec<&TensorView<'a>>], &[String], &AtomicUsize),
    metadata: &BTreeMap<String, String>,
    options: ShardOptions<'_>,
    threads: SaveThreads,
) -> Result<WorkerOutcome> {
    let mut writer = io::open_writer(config, dir, staging.0, staging.1, threads)?;
    let mut shards = Vec::new();
    let mut volume = ShardVolume::default();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= plan.len() {
            break;
        }
        let path = dir.join(&names[i]);
        let (info, shard_volume, locations) =
            write_shard(writer.as_mut(), &path, &names[i], &plan[i], metadata, options)?;
        volume.add(&shard_volume);
        shards.push((i, info, locations));
    }
    let stats = writer.stats().clone();
    let engine = writer.report().clone();
    Ok(WorkerOutcome { shards, stats, volume, engine })
}
