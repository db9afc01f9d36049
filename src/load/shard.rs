//! One shard of a checkpoint, read: its size and header checked against the manifest, its
//! bytes read in segments into one aligned buffer while a second thread checks the CRCs of
//! the segment before; the extra files and the weight map checked likewise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use bytes::Bytes;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::format::{parse_header, ExtraFileInfo, ParsedHeader, ShardInfo, TensorEntry};
use crate::io::aligned::{round_up, round_up_u64};
use crate::io::{AlignedBuf, Dir, FileId, Pages, RawDst, Reader};

/// Bytes per read call when loading a whole shard (the verifier hashes one segment while
/// the next is read): eight chunks, between 1 MiB and 256 MiB; 64 MiB by default.
pub(crate) fn segment_len(config: &Config) -> usize {
    (config.chunk_size as usize).saturating_mul(8).clamp(1 << 20, 256 << 20)
}

/// One shard opened for reading, with its header checked.
pub(crate) struct OpenShard {
    pub path: PathBuf,
    pub file: FileId,
    pub header: ParsedHeader,
    /// The whole file, when it was read in one go.
    pub whole: Option<Bytes>,
}

/// How much of a shard [`open_shard`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShardRead {
    /// Only the header.
    Header,
    /// The whole file; with `verify`, every tensor's CRC is checked on the way.
    Whole { verify: bool },
}

/// Opens a shard, checks its size against the manifest and its header against the header
/// CRC in the manifest, parses the header, and reads as `read` says.
pub(crate) fn open_shard(
    reader: &mut dyn Reader,
    handle: &Dir,
    info: &ShardInfo,
    read: ShardRead,
    segment: usize,
) -> Result<OpenShard> {
    let dir = handle.path();
    let path = handle.member_path(&info.file);
    let (file, len) = reader.open(handle, &info.file)?;
    check_len(dir, info, len)?;
    let report = reader.report();
    let align = report.align;
    let buf_align = report.align.max(report.mem_align);
    let whole = matches!(read, ShardRead::Whole { .. });
    let buf_len = if whole { len } else { info.header_len };
    let mut buf = AlignedBuf::zeroed(round_up_u64(buf_len.max(1), align as u64) as usize, buf_align);
    // The first read covers the header (and, for a whole read, the first segment).
    let first = if whole {
        (round_up(info.header_len as usize, align).max(segment) as u64).min(len) as usize
    } else {
        info.header_len as usize
    };
    reader.read_fresh(file, &mut buf, 0, first)?;
    let header = check_header(dir, &path, info, &buf.as_full_mut_slice()[..info.header_len as usize], len)?;
    if let ShardRead::Whole { verify } = read {
        let verify = verify && header.crcs.iter().any(Option::is_some);
        read_rest(
            reader,
            file,
            &path,
            buf.as_full_mut_slice(),
            (first, segment),
            len,
            verify.then_some(&header),
        )?;
        buf.set_len(len as usize);
    }
    let whole = whole.then(|| Bytes::from_owner(buf));
    Ok(OpenShard { path, file, header, whole })
}

/// A shard file of `len` bytes must be as long as the manifest says, and hold its header.
pub(crate) fn check_len(dir: &Path, info: &ShardInfo, len: u64) -> Result<()> {
    if len != info.size {
        return Err(Error::Corrupt {
            path: dir.to_path_buf(),
            reason: format!("shard {} is {len} bytes, the manifest says {}", info.file, info.size),
        });
    }
    if info.header_len > len {
        return Err(Error::Corrupt {
            path: dir.to_path_buf(),
            reason: format!("shard {} is shorter than its header", info.file),
        });
    }
    Ok(())
}

/// A tensor's CRC-32 `actual` against the one its header stores (`None`: nothing to check):
/// a mismatch is [`Error::Crc`], naming the file and the tensor.
pub(crate) fn check_crc(path: &Path, entry: &TensorEntry, expected: Option<u32>, actual: u32) -> Result<()> {
    match expected {
        Some(expected) if expected != actual => {
            Err(Error::Crc { path: path.to_path_buf(), tensor: entry.name.clone(), expected, actual })
        }
        _ => Ok(()),
    }
}

/// Checks the header prefix against the manifest entry and parses it.
pub(crate) fn check_header(
    dir: &Path,
    path: &Path,
    info: &ShardInfo,
    prefix: &[u8],
    len: u64,
) -> Result<ParsedHeader> {
    let actual = crc32fast::hash(prefix);
    if actual != info.header_crc32 {
        return Err(Error::Corrupt {
            path: dir.to_path_buf(),
            reason: format!(
                "header of shard {} has CRC {actual:08x}, the manifest says {:08x}",
                info.file, info.header_crc32
            ),
        });
    }
    let header =
        parse_header(prefix, len).map_err(|source| Error::Format { path: path.to_path_buf(), source })?;
    if header.data_start != info.header_len || header.tensors.len() as u64 != info.tensor_count {
        return Err(Error::Corrupt {
            path: dir.to_path_buf(),
            reason: format!("shard {} does not match its manifest entry", info.file),
        });
    }
    Ok(header)
}

/// Reads `[done, len)` of the file into `buf` in one read (the engine's depth in flight
/// throughout). With `verify`, a second thread checks the CRCs of what has been read so
/// far, in order, while the rest is still being read (it hears of each new prefix).
fn read_rest(
    reader: &mut dyn Reader,
    file: FileId,
    path: &Path,
    buf: &mut [u8],
    (done, segment): (usize, usize),
    len: u64,
    verify: Option<&ParsedHeader>,
) -> Result<()> {
    let len = len as usize;
    if done >= len {
        return match verify {
            Some(header) => verify_prefix(path, header, &buf[..len]),
            None => Ok(()),
        };
    }
    let Some(header) = verify else {
        let dst = RawDst { base: buf[done..].as_mut_ptr(), len: buf.len() - done, pages: Pages::Chosen };
        // SAFETY: `buf` (a buffer just allocated, which nothing else touches: its page size
        // is ours to choose) is borrowed mutably for the whole call.
        return unsafe { reader.read_raw(file, dst, done as u64, len - done, &mut |_| {}) };
    };
    // The verifier is fed at least a segment at a time (or the end), not every piece.
    let feed_min = segment.max(1);
    let (base, cap) = (buf.as_mut_ptr(), buf.len());
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, &[u8])>();
        let verifier = scope.spawn(move || verify_segments(path, header, rx));
        // SAFETY: the first `done` bytes were read before; nothing writes them now.
        let _ = tx.send((0, unsafe { std::slice::from_raw_parts(base, done) }));
        let mut fed = done;
        let mut feed = |upto: usize| {
            if upto > fed && (upto - fed >= feed_min || upto >= len) {
                // SAFETY: `read_raw` reports `upto - done` bytes from `done` as read and
                // no longer written (its contract), so `fed..upto` may be read from here on.
                let part = unsafe { std::slice::from_raw_parts(base.add(fed), upto - fed) };
                // A send fails only when the verifier stopped at a mismatch; it reports it.
                let _ = tx.send((fed, part));
                fed = upto;
            }
        };
        // SAFETY: `buf` is borrowed mutably here; past `done` nothing but the reads writes
        // it, and the verifier reads only what `progress` reported as read.
        let read = unsafe {
            let dst = RawDst { base: base.add(done), len: cap - done, pages: Pages::Chosen };
            reader.read_raw(file, dst, done as u64, len - done, &mut |n| feed(done + n))
        };
        if read.is_ok() {
            feed(len);
        }
        drop(tx);
        let verified = verifier
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("the CRC verifier thread panicked".into())));
        verified.and(read)
    })
}

/// Checks the CRCs of a shard read whole in its first read.
fn verify_prefix(path: &Path, header: &ParsedHeader, bytes: &[u8]) -> Result<()> {
    let (tx, rx) = mpsc::channel::<(usize, &[u8])>();
    let _ = tx.send((0, bytes));
    drop(tx);
    verify_segments(path, header, rx)
}

/// Feeds consecutive segments of a shard file to one hasher per tensor; fails on the first
/// tensor whose CRC differs from the stored one.
fn verify_segments(
    path: &Path,
    header: &ParsedHeader,
    segments: mpsc::Receiver<(usize, &[u8])>,
) -> Result<()> {
    let start = header.data_start as usize;
    let mut index = 0usize;
    let mut hasher = crc32fast::Hasher::new();
    let check = |entry: &TensorEntry, expected: Option<u32>, hasher: crc32fast::Hasher| {
        check_crc(path, entry, expected, hasher.finalize())
    };
    for (offset, bytes) in segments {
        let end = offset + bytes.len();
        while let Some(entry) = header.tensors.get(index) {
            let (begin, stop) =
                (start + entry.data_offsets.0 as usize, start + entry.data_offsets.1 as usize);
            let (from, to) = (begin.max(offset), stop.min(end));
            if from < to {
                hasher.update(&bytes[from - offset..to - offset]);
            }
            if stop > end {
                break; // continues in the next segment
            }
            check(entry, header.crcs[index], std::mem::take(&mut hasher))?;
            index += 1;
        }
    }
    // Tensors past the last segment (only empty ones at the very end can be).
    while let Some(entry) = header.tensors.get(index) {
        check(entry, header.crcs[index], std::mem::take(&mut hasher))?;
        index += 1;
    }
    Ok(())
}

/// Reads an extra file of the checkpoint in `dir` and checks its size and CRC-32 against the
/// manifest (always: these files are small). Never reads more than the manifest states.
pub(crate) fn read_extra_file(dir: &Dir, info: &ExtraFileInfo) -> Result<Bytes> {
    let bad = |reason: String| Error::Corrupt { path: dir.path().to_path_buf(), reason };
    let bytes = dir.read_file(&info.file, info.size)?;
    let actual = crc32fast::hash(&bytes);
    if bytes.len() as u64 != info.size || actual != info.crc32 {
        return Err(bad(format!(
            "extra file {} has CRC {actual:08x} ({} bytes), the manifest says {:08x} ({} bytes)",
            info.file,
            bytes.len(),
            info.crc32,
            info.size
        )));
    }
    Ok(Bytes::from(bytes))
}

/// The tensors in a shard's header must be exactly those the manifest maps to it.
pub(crate) fn check_weight_map(
    dir: &Path,
    weight_map: &BTreeMap<String, String>,
    info: &ShardInfo,
    header: &ParsedHeader,
) -> Result<()> {
    for entry in &header.tensors {
        if weight_map.get(&entry.name) != Some(&info.file) {
            return Err(Error::Corrupt {
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
