//! Opening any safetensors checkpoint for reading: one of ours, a single `.safetensors`
//! file, a directory of them, or a Hugging Face directory with a `*.safetensors.index.json`.
//!
//! For the foreign kinds [`open_any`] reads every shard's header (capped at safetensors' own
//! [`MAX_HEADER_LEN`](crate::format::MAX_HEADER_LEN), checked strictly against the file's
//! length by [`parse_header`]) and synthesizes the [`Manifest`] the loader expects: each
//! shard's size, header length, header CRC-32 (of the bytes read here) and tensor count, the
//! weight map, the total size, the metadata. The loader then reads the shards exactly as it
//! reads ours: a file that changed in between no longer matches its size or header CRC and
//! is refused. Foreign files carry no per-tensor CRCs, so their bytes are checked for
//! structure and size only; a file written by uring-ckpt keeps its CRCs wherever it lies.
//!
//! What a foreign directory holds was written by someone else and may be hostile: members are
//! opened through [`Dir`] (one plain name, no link followed, regular files only), the index
//! is read capped at [`MAX_INDEX_LEN`] and parsed strictly ([`parse_index`]), at most
//! [`MAX_FOREIGN_SHARDS`] shards are read, and every tensor must be in exactly one file (and,
//! with an index, in the file the index names). Only loading, inspecting and verifying take
//! this path: removing, replacing and retention act on checkpoints of ours only
//! ([`open_checkpoint`], [`ensure_checkpoint`](super::ensure_checkpoint)).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::format::{
    check_shard_name, header_prefix_len, parse_header, parse_index, FormatError, Manifest, ParsedHeader,
    SafetensorsIndex, ShardInfo, HF_INDEX_FILE, INDEX_SUFFIX, MANIFEST_FILE, MAX_INDEX_LEN,
};
use crate::io::Dir;

use super::names::is_temporary_name;
use super::open::open_checkpoint;

/// The most shard files a foreign checkpoint may have (a directory's `*.safetensors` files,
/// an index's distinct files): 100 000.
pub const MAX_FOREIGN_SHARDS: usize = 100_000;

/// The most entries of a directory listed while looking for its `*.safetensors` files:
/// 1 000 000 (of any kind, the shards among them).
pub const MAX_LISTED_ENTRIES: usize = 1_000_000;

/// What kind of checkpoint a path holds, as [`open_any`] recognised it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// A checkpoint directory of ours, with its `manifest.json`.
    UringCkpt,
    /// One `.safetensors` file.
    SafetensorsFile,
    /// A directory of `*.safetensors` files and no manifest or index.
    SafetensorsDir,
    /// A directory with a `*.safetensors.index.json` (Hugging Face's sharded layout).
    HuggingFaceIndex,
}

impl CheckpointKind {
    /// The kind with its number of shard files, for messages: `"Hugging Face index (3
    /// shards)"`, `"safetensors file"`.
    pub fn describe(self, shards: usize) -> String {
        match self {
            CheckpointKind::SafetensorsFile => self.to_string(),
            _ => format!("{self} ({shards} shard{})", if shards == 1 { "" } else { "s" }),
        }
    }
}

impl fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckpointKind::UringCkpt => "uring-ckpt checkpoint",
            CheckpointKind::SafetensorsFile => "safetensors file",
            CheckpointKind::SafetensorsDir => "safetensors directory",
            CheckpointKind::HuggingFaceIndex => "Hugging Face index",
        })
    }
}

/// A checkpoint opened for reading: the directory its files are opened beneath, its manifest
/// (read, or synthesized for a foreign checkpoint) and its kind.
#[derive(Debug)]
pub struct Opened {
    /// The directory holding the shards (for a single file, the file's directory).
    pub dir: Dir,
    /// The manifest; for a foreign checkpoint synthesized from the shard headers, with no
    /// extra files.
    pub manifest: Manifest,
    /// What was found.
    pub kind: CheckpointKind,
}

impl Opened {
    /// The kind with its number of shards, e.g. `"Hugging Face index (3 shards)"`.
    pub fn describe(&self) -> String {
        self.kind.describe(self.manifest.shards.len())
    }
}

/// Opens the checkpoint at `path` for reading, whatever its kind:
///
/// 1. a directory with a `manifest.json`: a checkpoint of ours, exactly as
///    [`open_checkpoint`] opens it (the manifest must be ours; no fallback to the other
///    kinds);
/// 2. a directory with `model.safetensors.index.json`, or else with exactly one
///    `*.safetensors.index.json`: the files its weight map names, and only those; every
///    tensor in them must be the one the weight map places there, every mapped tensor must
///    be found, and `metadata.total_size`, if stated, must be the tensors' byte total;
/// 3. another directory: all its `*.safetensors` files, sorted by name (names starting with
///    `.` are skipped as hidden; a `*.safetensors` name that is not a plain UTF-8 file name
///    is refused, never skipped);
/// 4. a file named `*.safetensors.index.json`: that index, of the directory it is in
///    (case 2);
/// 5. another regular file: that one file, in its directory, whatever its name.
///
/// `path` itself is the caller's own argument and is resolved normally: a link to a
/// directory or a file is followed. A file path (case 5) is resolved with
/// [`std::fs::canonicalize`] first, so its directory is the one the file really is in (a
/// link to a file in a cache's blob store loads that file); an index given as the path is
/// read through the link, and its shards are looked for beside the path. Nothing *inside* the
/// directory is ever followed: a member that is a symbolic link (as in a Hugging Face cache
/// snapshot, whose files link into `../../blobs`) is [`Error::Corrupt`], saying so.
/// Temporary directories of unfinished saves (and files in them) are never opened.
///
/// Errors: [`Error::NotACheckpoint`] when there is nothing to read (no manifest, index or
/// `*.safetensors` file; several indexes; not a file or directory), [`Error::Corrupt`] when
/// the files disagree with each other or the index (naming the tensor and the file) or a
/// member is not a regular file, [`Error::Format`] when a header does not parse (naming the
/// file), [`Error::Io`] when a file cannot be read.
pub fn open_any(path: &Path) -> Result<Opened> {
    match locate(path)? {
        Found::Ours => {
            let (dir, manifest) = open_checkpoint(path)?;
            Ok(Opened { dir, manifest, kind: CheckpointKind::UringCkpt })
        }
        Found::File { dir, name } => synthesize(dir, CheckpointKind::SafetensorsFile, &[name], None),
        Found::Dir { dir, names } => synthesize(dir, CheckpointKind::SafetensorsDir, &names, None),
        Found::Index { dir, name, index } => {
            let files: Vec<String> = index.files().into_iter().map(str::to_owned).collect();
            synthesize(dir, CheckpointKind::HuggingFaceIndex, &files, Some((&name, &index)))
        }
    }
}

/// What [`open_any`] would open at `path` and how many shard files it has, without reading
/// any shard (a manifest or an index is read; a directory is listed).
pub fn identify(path: &Path) -> Result<(CheckpointKind, usize)> {
    Ok(match locate(path)? {
        Found::Ours => (CheckpointKind::UringCkpt, open_checkpoint(path)?.1.shards.len()),
        Found::File { .. } => (CheckpointKind::SafetensorsFile, 1),
        Found::Dir { names, .. } => (CheckpointKind::SafetensorsDir, names.len()),
        Found::Index { index, .. } => (CheckpointKind::HuggingFaceIndex, index.files().len()),
    })
}

/// What is at a path, before any shard is read.
enum Found {
    /// A directory with a `manifest.json`.
    Ours,
    /// One file `name` in `dir`.
    File { dir: Dir, name: String },
    /// The `*.safetensors` files of `dir`, sorted.
    Dir { dir: Dir, names: Vec<String> },
    /// The index `name` of `dir`, parsed.
    Index { dir: Dir, name: String, index: SafetensorsIndex },
}

fn locate(path: &Path) -> Result<Found> {
    let not_checkpoint = |reason: String| Error::NotACheckpoint { path: path.to_path_buf(), reason };
    let temporary = |p: &Path| p.file_name().and_then(|n| n.to_str()).is_some_and(is_temporary_name);
    if temporary(path) {
        return Err(not_checkpoint("a temporary directory of an unfinished save".to_owned()));
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io("open", path, e))?;
    if meta.is_dir() {
        let dir = Dir::open(path)?;
        if dir.contains(MANIFEST_FILE) {
            return Ok(Found::Ours);
        }
        return scan(dir);
    }
    if !meta.is_file() {
        return Err(not_checkpoint("neither a directory nor a regular file".to_owned()));
    }
    let given_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if given_name.ends_with(INDEX_SUFFIX) {
        // The index of the directory it is in, as given (a linked index, as in a cache
        // snapshot, is read; the shards beside it are members, never followed).
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if temporary(parent) {
            return Err(not_checkpoint("a file of an unfinished save's temporary directory".to_owned()));
        }
        let dir = Dir::open(parent)?;
        let bytes = read_given_file(path, MAX_INDEX_LEN)?;
        let index = check_index(&dir, given_name, &bytes)?;
        return Ok(Found::Index { dir, name: given_name.to_owned(), index });
    }
    let real = std::fs::canonicalize(path).map_err(|e| Error::io("resolve", path, e))?;
    let (Some(parent), Some(name)) = (real.parent(), real.file_name()) else {
        return Err(not_checkpoint("not a file in a directory".to_owned()));
    };
    let Some(name) = name.to_str().map(str::to_owned) else {
        return Err(not_checkpoint("its file name is not UTF-8".to_owned()));
    };
    if temporary(parent) {
        return Err(not_checkpoint("a file of an unfinished save's temporary directory".to_owned()));
    }
    let dir = Dir::open(parent)?;
    Ok(Found::File { dir, name })
}

/// Looks through a directory without a manifest for an index, else its `*.safetensors`.
fn scan(dir: Dir) -> Result<Found> {
    let corrupt = |reason: String| Error::Corrupt { path: dir.path().to_path_buf(), reason };
    let Some(entries) = dir.names(MAX_LISTED_ENTRIES)? else {
        return Err(corrupt(format!(
            "more than {MAX_LISTED_ENTRIES} entries; refusing to look for shards among so many"
        )));
    };
    let mut indexes = Vec::new();
    let mut shards = Vec::new();
    // The first index or shard name that cannot be read by name: refused, never skipped,
    // unless the index named `model.safetensors.index.json` decides what is read.
    let mut unreadable: Option<String> = None;
    for entry in &entries {
        let bytes = entry.as_bytes();
        let is_index = bytes.ends_with(INDEX_SUFFIX.as_bytes());
        if bytes.starts_with(b".") || !(is_index || bytes.ends_with(b".safetensors")) {
            continue; // hidden, or not ours to read
        }
        match entry.to_str().filter(|name| is_index || check_shard_name(name).is_ok()) {
            Some(name) if is_index => indexes.push(name.to_owned()),
            Some(name) => shards.push(name.to_owned()),
            None => {
                unreadable.get_or_insert_with(|| entry.to_string_lossy().into_owned());
            }
        }
    }
    indexes.sort_unstable();
    let chosen = match indexes.iter().position(|n| n == HF_INDEX_FILE) {
        Some(i) => Some(indexes.swap_remove(i)),
        None => {
            if let Some(name) = unreadable {
                return Err(corrupt(format!(
                    "{name} is not a plain UTF-8 file name; refusing to read the directory without it"
                )));
            }
            if indexes.len() > 1 {
                return Err(Error::NotACheckpoint {
                    path: dir.path().to_path_buf(),
                    reason: format!(
                        "it holds several safetensors indexes ({}); pass the one to read as the path",
                        indexes.join(", ")
                    ),
                });
            }
            indexes.pop()
        }
    };
    if let Some(name) = chosen {
        let index = read_index(&dir, &name)?;
        return Ok(Found::Index { dir, name, index });
    }
    if shards.is_empty() {
        return Err(Error::NotACheckpoint {
            path: dir.path().to_path_buf(),
            reason: format!("no {MANIFEST_FILE}, no *{INDEX_SUFFIX} and no *.safetensors file"),
        });
    }
    if shards.len() > MAX_FOREIGN_SHARDS {
        return Err(corrupt(format!(
            "{} *.safetensors files, more than the {MAX_FOREIGN_SHARDS} shards this build reads",
            shards.len()
        )));
    }
    shards.sort_unstable();
    Ok(Found::Dir { dir, names: shards })
}

/// Reads and parses the index `name` of `dir` (a member: capped at [`MAX_INDEX_LEN`], never
/// through a link).
fn read_index(dir: &Dir, name: &str) -> Result<SafetensorsIndex> {
    let bytes = dir.read_file(name, MAX_INDEX_LEN).map_err(|e| member_error(dir, name, e))?;
    check_index(dir, name, &bytes)
}

/// Reads the file the caller named (links followed: the caller's own argument), a regular
/// file of at most `max` bytes.
fn read_given_file(path: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    let too_large = |len: u64| Error::Corrupt {
        path: path.to_path_buf(),
        reason: format!("{len} bytes or more, more than the {max} allowed for an index"),
    };
    if !meta.is_file() {
        return Err(Error::NotACheckpoint {
            path: path.to_path_buf(),
            reason: "not a regular file".to_owned(),
        });
    }
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| Error::io("read", path, e))?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Parses the index `name` of `dir` and checks its number of files.
fn check_index(dir: &Dir, name: &str, bytes: &[u8]) -> Result<SafetensorsIndex> {
    let corrupt = |reason: String| Error::Corrupt { path: dir.path().to_path_buf(), reason };
    let index = parse_index(bytes).map_err(|e| corrupt(format!("{name}: {e}")))?;
    let files = index.files().len();
    if files > MAX_FOREIGN_SHARDS {
        return Err(corrupt(format!(
            "{name} names {files} files, more than the {MAX_FOREIGN_SHARDS} shards this build reads"
        )));
    }
    Ok(index)
}

/// An error opening member `name`, made clearer when the member is a symbolic link.
fn member_error(dir: &Dir, name: &str, err: Error) -> Error {
    if !matches!(err, Error::Corrupt { .. }) || !dir.is_symlink(name) {
        return err;
    }
    Error::Corrupt {
        path: dir.path().to_path_buf(),
        reason: format!(
            "{name} is a symbolic link, and no link inside a checkpoint directory is followed. \
             A Hugging Face cache snapshot (.../snapshots/<revision>/) links its files into \
             ../../blobs: download with huggingface_hub.snapshot_download(repo_id, local_dir=...) \
             to get plain files, or pass the linked file itself as the path (a link given as \
             the path is followed)"
        ),
    }
}

/// Reads the header of shard `name`: its manifest entry and the parsed header.
fn read_shard(dir: &Dir, name: &str) -> Result<(ShardInfo, ParsedHeader)> {
    let path = dir.member_path(name);
    let format = |source: FormatError| Error::Format { path: path.clone(), source };
    let (file, len) = dir.open_file(name, false).map_err(|e| member_error(dir, name, e))?;
    let read =
        |file: &File, buf: &mut [u8]| file.read_exact_at(buf, 0).map_err(|e| Error::io("read", &path, e));
    let mut first = [0u8; 8];
    let first = &mut first[..len.min(8) as usize];
    read(&file, first)?;
    let header_len = header_prefix_len(first).map_err(format)?;
    if header_len > len {
        // Checked before allocating: the length field is the file's word, not ours.
        return Err(format(FormatError::HeaderBeyondFile { header_end: header_len, file_len: len }));
    }
    let mut prefix = vec![0u8; header_len as usize];
    read(&file, &mut prefix)?;
    let header = parse_header(&prefix, len).map_err(format)?;
    let info = ShardInfo {
        file: name.to_owned(),
        size: len,
        header_len,
        header_crc32: crc32fast::hash(&prefix),
        tensor_count: header.tensors.len() as u64,
    };
    Ok((info, header))
}

/// Reads the headers of `names` in `dir` and builds their manifest; with an index (its name
/// and contents), checks the files against it.
fn synthesize(
    dir: Dir,
    kind: CheckpointKind,
    names: &[String],
    index: Option<(&str, &SafetensorsIndex)>,
) -> Result<Opened> {
    let corrupt = |reason: String| Error::Corrupt { path: dir.path().to_path_buf(), reason };
    let mut shards = Vec::with_capacity(names.len());
    let mut weight_map: BTreeMap<String, String> = BTreeMap::new();
    let mut total_size = 0u64;
    let mut metadata = BTreeMap::new();
    for name in names {
        let (info, header) = read_shard(&dir, name)?;
        for tensor in &header.tensors {
            if let Some(first) = weight_map.get(&tensor.name) {
                return Err(corrupt(format!("tensor {:?} is in both {first} and {name}", tensor.name)));
            }
            weight_map.insert(tensor.name.clone(), name.clone());
            total_size = total_size
                .checked_add(tensor.len())
                .ok_or_else(|| corrupt("the tensors' sizes add up past 2^64 bytes".to_owned()))?;
        }
        if names.len() == 1 {
            metadata = header.metadata;
        }
        shards.push(info);
    }
    if let Some((index_name, index)) = index {
        for (tensor, found) in &weight_map {
            match index.weight_map.get(tensor) {
                Some(mapped) if mapped == found => {}
                Some(mapped) => {
                    return Err(corrupt(format!(
                        "tensor {tensor:?} is in {found}, but {index_name} maps it to {mapped}"
                    )))
                }
                None => {
                    return Err(corrupt(format!(
                        "{found} holds tensor {tensor:?}, which {index_name} does not map"
                    )))
                }
            }
        }
        if let Some((tensor, file)) = index.weight_map.iter().find(|(t, _)| !weight_map.contains_key(*t)) {
            return Err(corrupt(format!(
                "{index_name} maps tensor {tensor:?} to {file}, which does not hold it"
            )));
        }
        if let Some(stated) = index.total_size.filter(|&stated| stated != total_size) {
            return Err(corrupt(format!(
                "{index_name} states a total_size of {stated} bytes, the tensors of its files hold \
                 {total_size}"
            )));
        }
    }
    Ok(Opened { dir, manifest: Manifest::new(shards, weight_map, total_size, metadata), kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_describe_themselves() {
        assert_eq!(CheckpointKind::HuggingFaceIndex.describe(3), "Hugging Face index (3 shards)");
        assert_eq!(CheckpointKind::SafetensorsDir.describe(1), "safetensors directory (1 shard)");
        assert_eq!(CheckpointKind::SafetensorsFile.describe(1), "safetensors file");
        assert_eq!(CheckpointKind::UringCkpt.describe(2), "uring-ckpt checkpoint (2 shards)");
        assert_eq!(
            serde_json::to_string(&CheckpointKind::HuggingFaceIndex).unwrap(),
            "\"hugging_face_index\""
        );
    }
}
