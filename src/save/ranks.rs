//! Multi-rank saves: every rank writes its shards into one temporary directory named by a
//! save id all ranks share; one call commits them all, once every rank returned.
//!
//! The coordinator may first call [`begin_ranks`], which mints the save id, removes what
//! earlier multi-rank saves of the path left behind when they failed, and creates the
//! shared directory; the ranks then call [`save_rank`] with that id, and the coordinator
//! [`commit_ranks`] with every rank's [`RankShards`]. The commit checks that every shard the
//! ranks report is there, at its size, before the manifest is written: a directory removed
//! and made again under a rank's feet (a second save of the same path) never commits with
//! shards missing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::Instant;

use super::{workers, RankShards};
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::format::{check_extra_file_name, Manifest};
use crate::io::{SaveThreads, StagingPool};
use crate::report::StagedSignal;
use crate::store::{self, TempCheckpointDir};

/// Begins a multi-rank save of `path` on its coordinator: refuses an existing `path`
/// unless the config replaces, removes the temporary directories of earlier multi-rank
/// saves of `path` that did not commit (see [`store::clean_stale_rank_dirs`]) and of
/// crashed single-process saves, creates the shared temporary directory and returns its
/// save id, for every rank's [`save_rank`] and the [`commit_ranks`].
pub(crate) fn begin_ranks(config: &Config, path: &Path) -> Result<String> {
    let save_id = store::names::rank_save_id();
    store::names::validate_save_id(path, &save_id)?;
    let _lock = store::SaveLock::acquire(path, config.lock)?;
    store::clean_stale_temp_dirs(path)?;
    store::clean_stale_rank_dirs(path, &save_id)?;
    TempCheckpointDir::create_named(path, config.replace_existing, &save_id)?.keep();
    Ok(save_id)
}

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
    tmp.keep();
    result
}

/// Commits a multi-rank save: checks that every rank's shards are there, writes the extra
/// files and the manifest, fsyncs and renames.
pub(crate) fn commit_ranks(
    config: &Config,
    path: &Path,
    save_id: &str,
    ranks: &[RankShards],
    metadata: &BTreeMap<String, String>,
    extra_files: &[(String, &[u8])],
) -> Result<()> {
    store::names::validate_save_id(path, save_id)?;
    let mut names = BTreeSet::new();
    for (name, _) in extra_files {
        check_extra_file_name(name)
            .map_err(|_| Error::InvalidCheckpoint(format!("unsafe extra file name {name:?}")))?;
        if !names.insert(name.as_str()) {
            return Err(Error::InvalidCheckpoint(format!("extra file {name:?} given twice")));
        }
    }
    let _lock = store::SaveLock::acquire(path, config.lock)?;
    let tmp = TempCheckpointDir::create_named(path, config.replace_existing, save_id)?;
    let mut shards = Vec::new();
    let mut weight_map = BTreeMap::new();
    let mut seen_ranks = BTreeSet::new();
    let mut total = 0u64;
    for rank in ranks {
        if !seen_ranks.insert(rank.rank) {
            return Err(Error::InvalidCheckpoint(format!("rank {} given twice", rank.rank)));
        }
        shards.extend(rank.shards.iter().cloned());
        total += rank.data_bytes;
        for (name, file) in &rank.weight_map {
            if weight_map.insert(name.clone(), file.clone()).is_some() {
                return Err(Error::InvalidCheckpoint(format!("tensor {name:?} saved by two ranks")));
            }
        }
    }
    let mut manifest = Manifest::new(shards, weight_map, total, metadata.clone());
    // What the loader will check of the manifest (names, counts, sizes), checked now.
    Manifest::parse(&manifest.to_json())
        .map_err(|source| Error::Format { path: tmp.path().into(), source })?;
    for shard in &manifest.shards {
        let file = tmp.path().join(&shard.file);
        let found = fs::symlink_metadata(&file).map_err(|e| Error::io("stat shard", &file, e))?;
        if !found.file_type().is_file() || found.len() != shard.size {
            return Err(Error::InvalidCheckpoint(format!(
                "{}: a rank reported {} bytes, found {} bytes{}; not committing",
                file.display(),
                shard.size,
                found.len(),
                if found.file_type().is_file() { "" } else { " (not a regular file)" }
            )));
        }
    }
    for (name, bytes) in extra_files {
        manifest.extra_files.push(tmp.write_extra_file(name, bytes)?);
    }
    tmp.commit(&manifest, config.replace_existing)
}
