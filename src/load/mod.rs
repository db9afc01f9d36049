//! Reading a committed checkpoint: manifest, shard headers, tensor bytes (as `Bytes` views
//! of aligned read buffers, no extra copy), CRC checks.
//!
//! A whole shard is read in segments into one aligned buffer; a verifier thread computes
//! the CRCs of segment k while segment k+1 is being read, so checking costs no extra time
//! when the disk is the bottleneck.

mod into;
mod mapped;
mod shard;

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use bytes::Bytes;

pub(crate) use crate::store::open_checkpoint;
pub use crate::store::read_manifest;
pub use into::{load_into, LoadIntoReport};
use shard::{check_crc, check_header, check_len};
pub(crate) use shard::{check_weight_map, open_shard, read_extra_file, segment_len, ShardRead};

use crate::checkpoint::{LoadedCheckpoint, LoadedTensor};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::format::Manifest;
use crate::io::aligned::{round_down_u64, round_up_u64};
use crate::io::{open_reader, AlignedBuf, Dir, Fallback};
use crate::report::LoadReport;

/// What to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Load only these tensors (all when `None`). An unknown name is an error.
    pub names: Option<Vec<String>>,
    /// Check every tensor's CRC-32; `None` uses the config's `verify_on_load`.
    pub verify: Option<bool>,
    /// Map the shard files copy-on-write instead of reading them into new memory
    /// (`io/mapped.rs`): the tensors are views of the files' pages in the page cache, which
    /// the kernel never zeroes, so a fresh load skips the zeroing of its memory and every
    /// copy. The load still brings every wanted byte in (and checks its CRC) before it
    /// returns. The files then back the tensors: one truncated while they live kills the
    /// process with `SIGBUS` when a lost page is touched, and one rewritten in place shows
    /// its new bytes in pages not yet written (checkpoints of ours are never rewritten), as
    /// with `torch.load(mmap=True)`. A file system that cannot map files is read instead
    /// (a fallback in the report).
    pub map: bool,
}

/// The tensors `options` asks for (`None`: all), each checked to be in the checkpoint: an
/// unknown name is [`Error::TensorNotFound`].
pub(crate) fn wanted_names<'o>(
    manifest: &Manifest,
    options: &'o LoadOptions,
) -> Result<Option<HashSet<&'o str>>> {
    let Some(names) = &options.names else { return Ok(None) };
    if let Some(missing) = names.iter().find(|n| !manifest.weight_map.contains_key(n.as_str())) {
        return Err(Error::TensorNotFound(missing.clone()));
    }
    Ok(Some(names.iter().map(String::as_str).collect()))
}

/// Whether the shard `file` holds a tensor of `wanted` (`None`: all are wanted).
pub(crate) fn holds_wanted(manifest: &Manifest, file: &str, wanted: &Option<HashSet<&str>>) -> bool {
    wanted
        .as_ref()
        .is_none_or(|w| manifest.weight_map.iter().any(|(n, f)| f == file && w.contains(n.as_str())))
}

/// Loads the checkpoint at `dir`.
pub fn load(config: &Config, dir: &Path, options: &LoadOptions) -> Result<LoadedCheckpoint> {
    if !options.map {
        return load_by_reads(config, dir, options);
    }
    match mapped::load_mapped(config, dir, options)? {
        mapped::Mapped::Loaded(loaded) => Ok(loaded),
        mapped::Mapped::Refused(reason) => {
            log::warn!("cannot map the shard files ({reason}); reading them instead");
            let mut loaded = load_by_reads(config, dir, options)?;
            loaded.report.engine.fallbacks.push(Fallback { what: "mmap", instead: "reads", reason });
            Ok(loaded)
        }
    }
}

/// Loads the checkpoint at `dir` by reading its shards into new aligned buffers.
fn load_by_reads(config: &Config, dir: &Path, options: &LoadOptions) -> Result<LoadedCheckpoint> {
    let started = Instant::now();
    let crate::store::Opened { dir: handle, manifest, .. } = crate::store::open_any(dir)?;
    let verify = options.verify.unwrap_or(config.verify_on_load);
    let wanted = wanted_names(&manifest, options)?;
    let mut reader = open_reader(config, dir)?;
    let mut tensors = Vec::new();
    let mut read_bytes = 0u64;
    let mut data_bytes = 0u64;
    for info in &manifest.shards {
        let is_wanted = |name: &str| wanted.as_ref().is_none_or(|w| w.contains(name));
        if !holds_wanted(&manifest, &info.file, &wanted) {
            continue;
        }
        let read = if wanted.is_none() { ShardRead::Whole { verify } } else { ShardRead::Header };
        let shard = open_shard(reader.as_mut(), &handle, info, read, segment_len(config))?;
        check_weight_map(dir, &manifest.weight_map, info, &shard.header)?;
        let data_start = shard.header.data_start;
        let align = reader.report().align as u64;
        let buf_align = reader.report().align.max(reader.report().mem_align);
        for (i, entry) in shard.header.tensors.iter().enumerate() {
            if !is_wanted(&entry.name) {
                continue;
            }
            let (begin, end) = (data_start + entry.data_offsets.0, data_start + entry.data_offsets.1);
            let data = match &shard.whole {
                Some(whole) => whole.slice(begin as usize..end as usize),
                None => {
                    let first = round_down_u64(begin, align);
                    let len = (end - first) as usize;
                    let mut buf = AlignedBuf::zeroed(round_up_u64(len as u64, align) as usize, buf_align);
                    reader.read_fresh(shard.file, &mut buf, first, len)?;
                    buf.set_len(len);
                    read_bytes += len as u64;
                    let data = Bytes::from_owner(buf).slice((begin - first) as usize..);
                    if verify {
                        if let Some(expected) = shard.header.crcs[i] {
                            check_crc(&shard.path, entry, Some(expected), crc32fast::hash(&data))?;
                        }
                    }
                    data
                }
            };
            data_bytes += data.len() as u64;
            tensors.push(LoadedTensor {
                name: entry.name.clone(),
                dtype: entry.dtype,
                shape: entry.shape.clone(),
                data,
            });
        }
        read_bytes += if shard.whole.is_some() { info.size } else { info.header_len };
        reader.close(shard.file);
    }
    let extra_files = read_extra_files(&handle, &manifest, &mut read_bytes)?;
    Ok(LoadedCheckpoint {
        tensors,
        metadata: manifest.metadata,
        extra_files,
        report: LoadReport {
            read_latency: reader.stats().percentiles_us(),
            fresh_pages: reader.stats().fresh_pages,
            zero_copy_bytes: data_bytes,
            ..LoadReport::finished(started, data_bytes, read_bytes, verify, reader.report().clone())
        },
    })
}

/// Reads every extra file of the manifest (checked: [`read_extra_file`]), adding their
/// bytes to `read_bytes`.
fn read_extra_files(handle: &Dir, manifest: &Manifest, read_bytes: &mut u64) -> Result<Vec<(String, Bytes)>> {
    let mut extra_files = Vec::with_capacity(manifest.extra_files.len());
    for info in &manifest.extra_files {
        let bytes = read_extra_file(handle, info)?;
        *read_bytes += bytes.len() as u64;
        extra_files.push((info.file.clone(), bytes));
    }
    Ok(extra_files)
}
