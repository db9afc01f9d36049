//! Saving a checkpoint: cut it into shards ([`plan`]), write them on up to four threads
//! ([`workers`]), each shard as one aligned stream through the staging pool
//! ([`shard_writer`]), then commit the directory ([`crate::store`]), with a Hugging Face
//! index (`model.safetensors.index.json`) unless asked not to. A multi-rank save writes
//! each rank's shards into one shared temporary directory and commits once ([`ranks`]).
//!
//! Every shard header's `__metadata__` holds the checkpoint's metadata plus
//! `"format": "pt"` (unless the metadata sets `format` itself), which Hugging Face loaders
//! require of a PyTorch checkpoint.
//!
//! [`crate::UringCheckpointIO`] is the public face of this module; the functions here take
//! the config and the staging pool it owns.

mod plan;
mod ranks;
pub(crate) mod shard_writer;
mod workers;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::format::{encode_index, Manifest, ShardInfo, HF_INDEX_FILE};
use crate::io::{SaveThreads, StagingPool};
use crate::report::{SaveReport, StagedSignal};
use crate::store::{self, TempCheckpointDir};

pub(crate) use ranks::{begin_ranks, commit_ranks, save_rank};

/// Where one saved tensor's bytes are: what a multi-rank caller (a
/// `torch.distributed.checkpoint` storage writer, say) records to read them back without
/// the manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorLocation {
    /// The tensor's name.
    pub name: String,
    /// Its shard file, in the checkpoint directory.
    pub file: String,
    /// Offset of its first byte in that file.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
    /// CRC-32 (IEEE) of its bytes, as stored in the shard header.
    pub crc32: u32,
}

/// One rank's part of a multi-rank save: the shards it wrote and how. Serializes (with
/// serde, e.g. to JSON) without its `report`, so that the ranks can send their parts to the
/// coordinator, which commits them ([`commit_ranks`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankShards {
    /// The rank.
    pub rank: u32,
    /// Manifest entries of its shards.
    pub shards: Vec<ShardInfo>,
    /// Its tensors: name to shard file.
    pub weight_map: BTreeMap<String, String>,
    /// Sum of its tensor bytes.
    pub data_bytes: u64,
    /// Where each of its tensors is, in the order written.
    pub tensors: Vec<TensorLocation>,
    /// How its writes went (on the rank that wrote; `None` once deserialized).
    #[serde(skip)]
    pub report: Option<SaveReport>,
}

/// A whole single-process save of `checkpoint` at `path`, with the threads `threads`
/// allows; `on_staged` (if any) is called once the sources are no longer read, at the
/// latest when this returns.
pub(crate) fn save(
    config: &Config,
    pool: &StagingPool,
    checkpoint: &Checkpoint<'_>,
    path: &Path,
    on_staged: Option<&(dyn Fn() + Sync)>,
    threads: SaveThreads,
) -> Result<SaveReport> {
    let signal = StagedSignal::new(on_staged, Instant::now());
    let result = save_signalled(config, pool, checkpoint, path, &signal, threads);
    signal.fire();
    result
}

fn save_signalled(
    config: &Config,
    pool: &StagingPool,
    checkpoint: &Checkpoint<'_>,
    path: &Path,
    signal: &StagedSignal<'_>,
    threads: SaveThreads,
) -> Result<SaveReport> {
    let replace = config.replace_existing;
    // Input mistakes (a reserved or over-long name, a malformed checkpoint) are refused
    // before anything is written, the lock file included.
    store::names::split_save_target(path)?;
    checkpoint.validate()?;
    // Held until the commit (or the failure) is over; then the stale leftovers of crashed
    // saves of this path can go, since none of them can be in use.
    let _lock = store::SaveLock::acquire(path, config.lock)?;
    store::clean_stale_temp_dirs(path)?;
    let tmp = TempCheckpointDir::create(path, replace)?;
    let rank = workers::write_shards(config, pool, checkpoint, path, tmp.path(), 0, signal, threads)?;
    let commit_started = Instant::now();
    let report = rank.report.ok_or_else(|| Error::Internal("a rank save without its report".into()))?;
    let mut manifest =
        Manifest::new(rank.shards, rank.weight_map, rank.data_bytes, checkpoint.metadata.clone());
    for (name, bytes) in &checkpoint.extra_files {
        manifest.extra_files.push(tmp.write_extra_file(name, bytes)?);
    }
    if checkpoint.hf_index && !manifest.weight_map.is_empty() {
        let index = encode_index(&manifest.weight_map, manifest.total_size);
        manifest.extra_files.push(tmp.write_extra_file(HF_INDEX_FILE, &index)?);
    }
    tmp.commit(&manifest, replace)?;
    let mut report = report;
    report.commit_seconds = commit_started.elapsed().as_secs_f64();
    report.finish(signal.started, signal.is_watched().then(|| signal.seconds()).flatten());
    log::info!(
        "saved {} ({} tensors, {} shards, {} bytes) in {:.3}s, {:.0} MiB/s with {}",
        path.display(),
        report.tensors,
        report.shards,
        report.file_bytes,
        report.seconds,
        report.throughput_mib_s,
        report.engine.engine
    );
    Ok(report)
}
