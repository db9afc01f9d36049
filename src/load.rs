//! Reading a committed checkpoint: manifest, shard headers, tensor bytes (as `Bytes` views
//! of aligned read buffers, no extra copy), CRC checks.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;

use crate::checkpoint::{mib_per_s, LoadReport, LoadedCheckpoint, LoadedTensor};
use crate::checkpoint_io::LoadOptions;
use crate::config::Config;
use crate::format::{parse_header, Manifest, ParsedHeader, ShardInfo, MANIFEST_FILE, MAX_MANIFEST_LEN};
use crate::io::aligned::{round_down_u64, round_up_u64};
use crate::io::{open_reader, AlignedBuf, FileId, Reader};
use crate::{Error, Result};

/// Reads and checks `dir/manifest.json`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let not_checkpoint = |reason: String| Error::NotACheckpoint { path: dir.to_path_buf(), reason };
    if dir.file_name().and_then(|n| n.to_str()).is_some_and(crate::commit::is_temporary_name) {
        return Err(not_checkpoint("a temporary directory of an unfinished save".to_owned()));
    }
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(if dir.is_dir() {
                not_checkpoint(format!("no {MANIFEST_FILE} (an unfinished or foreign directory)"))
            } else {
                Error::io("open checkpoint", dir, e)
            })
        }
        Err(e) => return Err(Error::io("stat", &path, e)),
    };
    if meta.len() > MAX_MANIFEST_LEN {
        return Err(not_checkpoint(format!("{MANIFEST_FILE} is {} bytes, more than allowed", meta.len())));
    }
    let bytes = fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
    Manifest::parse(&bytes).map_err(|source| Error::Format { path, source })
}

/// One shard opened for reading, with its header checked.
pub(crate) struct OpenShard {
    pub path: PathBuf,
    pub file: FileId,
    pub header: ParsedHeader,
    /// The whole file, when it was read in one go.
    pub whole: Option<Bytes>,
}

/// Opens a shard, checks its size against the manifest and parses its header. Reads the
/// whole file at once when `whole` (one large sequential read), else only the header.
pub(crate) fn open_shard(
    reader: &mut dyn Reader,
    dir: &Path,
    info: &ShardInfo,
    whole: bool,
) -> Result<OpenShard> {
    let path = dir.join(&info.file);
    let (file, len) = reader.open(&path)?;
    if len != info.size {
        return Err(Error::NotACheckpoint {
            path: dir.to_path_buf(),
            reason: format!("shard {} is {len} bytes, the manifest says {}", info.file, info.size),
        });
    }
    let align = reader.report().align as u64;
    let read_len = if whole { len } else { info.header_len.min(len) };
    let mut buf = AlignedBuf::zeroed(round_up_u64(read_len, align) as usize, align as usize);
    reader.read_at(file, &mut buf, 0, read_len as usize)?;
    let prefix = &buf[..info.header_len.min(read_len) as usize];
    let actual = crc32fast::hash(prefix);
    if actual != info.header_crc32 {
        return Err(Error::NotACheckpoint {
            path: dir.to_path_buf(),
            reason: format!(
                "header of shard {} has CRC {actual:08x}, the manifest says {:08x}",
                info.file, info.header_crc32
            ),
        });
    }
    let header = parse_header(prefix, len).map_err(|source| Error::Format { path: path.clone(), source })?;
    if header.data_start != info.header_len || header.tensors.len() as u64 != info.tensor_count {
        return Err(Error::NotACheckpoint {
            path: dir.to_path_buf(),
            reason: format!("shard {} does not match its manifest entry", info.file),
        });
    }
    let whole = whole.then(|| Bytes::from_owner(buf));
    Ok(OpenShard { path, file, header, whole })
}

/// Loads the checkpoint at `dir`.
pub fn load(config: &Config, dir: &Path, options: &LoadOptions) -> Result<LoadedCheckpoint> {
    let started = Instant::now();
    let manifest = read_manifest(dir)?;
    let verify = options.verify.unwrap_or(config.verify_on_load);
    let wanted: Option<HashSet<&str>> =
        options.names.as_ref().map(|n| n.iter().map(String::as_str).collect());
    if let Some(names) = &options.names {
        if let Some(missing) = names.iter().find(|n| !manifest.weight_map.contains_key(n.as_str())) {
            return Err(Error::TensorNotFound(missing.clone()));
        }
    }
    let mut reader = open_reader(config, dir)?;
    let mut tensors = Vec::new();
    let mut read_bytes = 0u64;
    let mut data_bytes = 0u64;
    for info in &manifest.shards {
        let needed: Vec<&str> = manifest
            .weight_map
            .iter()
            .filter(|(name, file)| {
                **file == info.file && wanted.as_ref().is_none_or(|w| w.contains(name.as_str()))
            })
            .map(|(name, _)| name.as_str())
            .collect();
        if needed.is_empty() && wanted.is_some() {
            continue;
        }
        let shard = open_shard(reader.as_mut(), dir, info, wanted.is_none())?;
        check_weight_map(dir, &manifest.weight_map, info, &shard.header)?;
        let data_start = shard.header.data_start;
        let align = reader.report().align as u64;
        for (i, entry) in shard.header.tensors.iter().enumerate() {
            if let Some(w) = &wanted {
                if !w.contains(entry.name.as_str()) {
                    continue;
                }
            }
            let (begin, end) = (data_start + entry.data_offsets.0, data_start + entry.data_offsets.1);
            let data = match &shard.whole {
                Some(whole) => whole.slice(begin as usize..end as usize),
                None => {
                    let start = round_down_u64(begin, align);
                    let len = (end - start) as usize;
                    let mut buf =
                        AlignedBuf::zeroed(round_up_u64(len as u64, align) as usize, align as usize);
                    reader.read_at(shard.file, &mut buf, start, len)?;
                    read_bytes += len as u64;
                    Bytes::from_owner(buf).slice((begin - start) as usize..)
                }
            };
            if verify {
                if let Some(expected) = shard.header.crcs[i] {
                    let actual = crc32fast::hash(&data);
                    if actual != expected {
                        return Err(Error::Crc {
                            path: shard.path.clone(),
                            tensor: entry.name.clone(),
                            expected,
                            actual,
                        });
                    }
                }
            }
            data_bytes += data.len() as u64;
            tensors.push(LoadedTensor {
                name: entry.name.clone(),
                dtype: entry.dtype,
                shape: entry.shape.clone(),
                data,
            });
        }
        if shard.whole.is_some() {
            read_bytes += info.size;
        } else {
            read_bytes += info.header_len;
        }
        reader.close(shard.file);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(LoadedCheckpoint {
        tensors,
        metadata: manifest.metadata,
        report: LoadReport {
            data_bytes,
            read_bytes,
            seconds,
            throughput_mib_s: mib_per_s(read_bytes, seconds),
            verified: verify,
            engine: reader.report().clone(),
            read_latency: reader.stats().percentiles_us(),
        },
    })
}

/// The tensors in a shard's header must be exactly those the manifest maps to it.
fn check_weight_map(
    dir: &Path,
    weight_map: &BTreeMap<String, String>,
    info: &ShardInfo,
    header: &ParsedHeader,
) -> Result<()> {
    for entry in &header.tensors {
        if weight_map.get(&entry.name) != Some(&info.file) {
            return Err(Error::NotACheckpoint {
                path: dir.to_path_buf(),
                reason: format!(
                    "tensor {:?} in shard {} is not mapped to it by the manifest",
                    entry.name, info.file
                ),
            });
        }
    }
    Ok(())
}
