//! Multi-rank saves: every rank writes its shards into one temporary directory named by a
//! save id all ranks share; one call commits them all, once every rank returned.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use super::{workers, RankShards};
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::format::Manifest;
use crate::io::{SaveThreads, StagingPool};
use crate::report::StagedSignal;
use crate::store::{self, TempCheckpointDir};

/// Writes this rank's tensors as shards into the shared temporary directory of `path`.
pub(crate) fn save_rank(
    config: &Config,
    pool: &StagingPool,
    checkpoint: &Checkpoint<'_>,
    path: &Path,
    save_id: &str,
    rank: u32,
) -> Result<RankShards> {
    store::names::validate_save_id(path, save_id)?;
    let tmp = TempCheckpointDir::create_named(path, config.replace_existing, save_id)?;
    let signal = StagedSignal::new(None, Instant::now());
    let result = workers::write_shards(
        config,
        pool,
        checkpoint,
        path,
        tmp.path(),
        rank,
        &signal,
        SaveThreads::Foreground,
    );
    // The directory belongs to the whole save: keep it even if this rank failed; the
    // commit step (or a later cleanup) decides.
    std::mem::forget(tmp);
    result
}

/// Commits a multi-rank save: writes the manifest, fsyncs and renames.
pub(crate) fn commit_ranks(
    config: &Config,
    path: &Path,
    save_id: &str,
    ranks: &[RankShards],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    store::names::validate_save_id(path, save_id)?;
    let _lock = store::SaveLock::acquire(path, config.lock)?;
    let tmp = TempCheckpointDir::create_named(path, config.replace_existing, save_id)?;
    let mut shards = Vec::new();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for rank in ranks {
        shards.extend(rank.shards.iter().cloned());
        total += rank.data_bytes;
        for (name, file) in &rank.weight_map {
            if weight_map.insert(name.clone(), file.clone()).is_some() {
                return Err(Error::InvalidCheckpoint(format!("tensor {name:?} saved by two ranks")));
            }
        }
    }
    let manifest = Manifest::new(shards, weight_map, total, metadata.clone());
    tmp.commit(&manifest, config.replace_existing)
}
