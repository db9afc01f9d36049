//! Looking at a checkpoint without loading it: `inspect` (manifest and shard headers) and
//! `verify` (structure plus every tensor's CRC-32, one shard in memory at a time).
//!
//! Both take any safetensors checkpoint [`open_any`] recognises: ours, a single
//! `.safetensors` file, a directory of them, a Hugging Face index. [`verify_ours`] takes
//! checkpoints of ours only (what retention may pick as the latest).

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::format::{Dtype, Manifest};
use crate::io::open_reader;
use crate::load::{check_weight_map, open_checkpoint, open_shard, segment_len, ShardRead};
use crate::report::mib_per_s;
use crate::store::{open_any, CheckpointKind, Opened};

/// One tensor as a shard header describes it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorInfo {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Bytes.
    pub bytes: u64,
    /// Shard file holding it.
    pub shard: String,
    /// Offset of its first byte in that file.
    pub offset: u64,
    /// Stored CRC-32, if any.
    pub crc32: Option<u32>,
}

/// What `inspect` finds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointInfo {
    /// The path inspected (a directory, or a single file).
    pub path: PathBuf,
    /// What kind of checkpoint it is.
    pub kind: CheckpointKind,
    /// Its manifest (synthesized from the shard headers for a foreign checkpoint).
    pub manifest: Manifest,
    /// Every tensor, shard by shard in file order.
    pub tensors: Vec<TensorInfo>,
}

/// Reads the manifest and every shard header (checking sizes and header CRCs) of the
/// checkpoint at `dir`, of any kind ([`open_any`]).
pub fn inspect(config: &Config, dir: &Path) -> Result<CheckpointInfo> {
    let Opened { dir: handle, manifest, kind } = open_any(dir)?;
    let mut reader = open_reader(config, dir)?;
    let mut tensors = Vec::new();
    for info in &manifest.shards {
        let shard = open_shard(reader.as_mut(), &handle, info, ShardRead::Header, segment_len(config))?;
        for (entry, crc) in shard.header.tensors.iter().zip(&shard.header.crcs) {
            tensors.push(TensorInfo {
                name: entry.name.clone(),
                dtype: entry.dtype,
                shape: entry.shape.clone(),
                bytes: entry.len(),
                shard: info.file.clone(),
                offset: shard.header.data_start + entry.data_offsets.0,
                crc32: *crc,
            });
        }
        reader.close(shard.file);
    }
    Ok(CheckpointInfo { path: dir.to_path_buf(), kind, manifest, tensors })
}

/// What `verify` checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// What kind of checkpoint was verified.
    pub kind: CheckpointKind,
    /// Shards read.
    pub shards: usize,
    /// Tensors whose CRC matched.
    pub tensors: usize,
    /// Tensors without a stored CRC (files not written by uring-ckpt).
    pub tensors_without_crc: usize,
    /// Extra (non-tensor) files whose size and CRC matched.
    pub extra_files: usize,
    /// Bytes read.
    pub bytes: u64,
    /// Seconds taken.
    pub seconds: f64,
    /// MiB/s.
    pub throughput_mib_s: f64,
}

/// Checks the manifest, every shard's size, header and header CRC, the weight map, and
/// every tensor's CRC, of a checkpoint of any kind ([`open_any`]): tensors without a stored
/// CRC (files not written by uring-ckpt) are checked for structure and size only, and
/// counted in [`VerifyReport::tensors_without_crc`]. Stops at the first problem, which the
/// error names. `progress` is called with the bytes read so far after each shard.
pub fn verify(config: &Config, dir: &Path, progress: impl FnMut(u64, u64)) -> Result<VerifyReport> {
    let started = Instant::now();
    verify_opened(config, dir, open_any(dir)?, started, progress)
}

/// [`verify`] for checkpoints of ours only: anything without a `manifest.json` of ours is
/// [`Error::NotACheckpoint`] (what [`crate::retention::latest_valid`] may choose from).
pub fn verify_ours(config: &Config, dir: &Path, progress: impl FnMut(u64, u64)) -> Result<VerifyReport> {
    let started = Instant::now();
    let (handle, manifest) = open_checkpoint(dir)?;
    let opened = Opened { dir: handle, manifest, kind: CheckpointKind::UringCkpt };
    verify_opened(config, dir, opened, started, progress)
}

fn verify_opened(
    config: &Config,
    dir: &Path,
    opened: Opened,
    started: Instant,
    mut progress: impl FnMut(u64, u64),
) -> Result<VerifyReport> {
    let Opened { dir: handle, manifest, kind } = opened;
    let total: u64 = manifest.shards.iter().map(|s| s.size).sum();
    let mut reader = open_reader(config, dir)?;
    let mut report = VerifyReport {
        kind,
        shards: 0,
        tensors: 0,
        tensors_without_crc: 0,
        extra_files: 0,
        bytes: 0,
        seconds: 0.0,
        throughput_mib_s: 0.0,
    };
    let mut seen = 0usize;
    for info in &manifest.shards {
        // Reading the whole shard with verification checks every stored CRC on the way.
        let shard = open_shard(
            reader.as_mut(),
            &handle,
            info,
            ShardRead::Whole { verify: true },
            segment_len(config),
        )?;
        check_weight_map(dir, &manifest.weight_map, info, &shard.header)?;
        let with_crc = shard.header.crcs.iter().filter(|c| c.is_some()).count();
        report.tensors += with_crc;
        report.tensors_without_crc += shard.header.crcs.len() - with_crc;
        seen += shard.header.tensors.len();
        report.shards += 1;
        report.bytes += info.size;
        reader.close(shard.file);
        progress(report.bytes, total);
    }
    if seen != manifest.weight_map.len() {
        return Err(Error::Corrupt {
            path: dir.to_path_buf(),
            reason: format!(
                "the manifest maps {} tensors, the shards hold {seen}",
                manifest.weight_map.len()
            ),
        });
    }
    for info in &manifest.extra_files {
        crate::load::read_extra_file(&handle, info)?;
        report.extra_files += 1;
        report.bytes += info.size;
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.throughput_mib_s = mib_per_s(report.bytes, report.seconds);
    Ok(report)
}
