//! A mapped load ([`LoadOptions::map`]): every shard file mapped copy-on-write
//! (`io/mapped.rs` says what that buys and costs), its size and header checked as a read
//! load checks them, then the wanted tensors' pages brought in by worker threads.
//!
//! The tensors are cut into pieces of [`PIECE`] bytes, in file order; each worker takes the
//! next piece, asks the kernel to start reading the piece [`AHEAD`] pieces on
//! (`MADV_WILLNEED`, so that the device works ahead of the workers), maps the piece's pages
//! (`MADV_POPULATE_READ`: a file that shrank or cannot be read is an error here, not a
//! `SIGBUS` later) and, when verifying, hashes it. The pieces' CRCs are then combined tensor
//! by tensor. When the load returns every wanted byte is in memory: it is not lazy.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;

use super::{
    check_crc, check_header, check_len, check_weight_map, holds_wanted, read_extra_files, wanted_names,
    LoadOptions,
};
use crate::checkpoint::{LoadedCheckpoint, LoadedTensor};
use crate::config::{Config, EngineKind};
use crate::error::{Error, Result};
use crate::format::TensorEntry;
use crate::io::mapped::{Advice, MappedFile};
use crate::io::EngineReport;
use crate::report::LoadReport;

/// Bytes a worker brings in (and hashes) at a time.
const PIECE: usize = 4 << 20;

/// How many pieces ahead of the one a worker takes the kernel is asked to read (256 MiB).
/// On the RAM-backed XFS of the README (1 GiB, `load --into mapped`, 6 alternating rounds,
/// medians) 8 pieces ran at 2002 MiB/s, 32 at 2017, the whole file hinted at once at 2139;
/// a bound keeps a large checkpoint's read-ahead from outrunning the memory that holds it.
const AHEAD: usize = 64;

/// Most worker threads of one load (the config's `io_threads`, at most this many and at
/// most one per core). One worker ran at 1476 MiB/s where two ran at 2139 (the line above).
const MAX_WORKERS: usize = 4;

/// One piece of one wanted tensor: `[begin, end)` of shard `shard`'s mapping.
struct Piece {
    shard: usize,
    begin: usize,
    end: usize,
    /// Whether the piece is hashed (its tensor has a CRC and the load verifies).
    hash: bool,
}

/// A wanted tensor of one shard: its entry, its place in the file and its pieces.
struct Wanted<'h> {
    shard: usize,
    entry: &'h TensorEntry,
    expected: Option<u32>,
    begin: usize,
    end: usize,
    pieces: std::ops::Range<usize>,
}

/// What a mapped load came to.
pub(super) enum Mapped {
    Loaded(LoadedCheckpoint),
    /// The file system refused the mapping itself (no `mmap`; the reason): nothing was
    /// handed out, and the caller reads instead.
    Refused(String),
}

/// Loads the checkpoint at `dir` by mapping its shard files.
pub(super) fn load_mapped(config: &Config, dir: &Path, options: &LoadOptions) -> Result<Mapped> {
    let started = Instant::now();
    let crate::store::Opened { dir: handle, manifest, .. } = crate::store::open_any(dir)?;
    let verify = options.verify.unwrap_or(config.verify_on_load);
    let wanted_set = wanted_names(&manifest, options)?;
    let is_wanted = |name: &str| wanted_set.as_ref().is_none_or(|w| w.contains(name));

    let mut maps = Vec::new();
    let mut headers = Vec::new();
    let mut read_bytes = 0u64;
    for info in &manifest.shards {
        if !holds_wanted(&manifest, &info.file, &wanted_set) {
            continue;
        }
        let path = handle.member_path(&info.file);
        let (file, len) = handle.open_file(&info.file, false)?;
        check_len(dir, info, len)?;
        let map = match MappedFile::map(&file, len, &path) {
            Ok(map) => map,
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {
                return Ok(Mapped::Refused(format!("{}: {source}", path.display())));
            }
            Err(e) => return Err(e),
        };
        // The header is parsed from a copy: the mapping's bytes could change under the
        // parser if someone wrote the file meanwhile.
        let prefix = map.as_ref()[..info.header_len as usize].to_vec();
        let header = check_header(dir, &path, info, &prefix, len)?;
        check_weight_map(dir, &manifest.weight_map, info, &header)?;
        read_bytes += info.header_len;
        maps.push(map);
        headers.push(header);
    }

    let mut wanted = Vec::new();
    let mut pieces = Vec::new();
    for (shard, header) in headers.iter().enumerate() {
        let start = header.data_start as usize;
        for (i, entry) in header.tensors.iter().enumerate() {
            if !is_wanted(&entry.name) {
                continue;
            }
            let (begin, end) = (start + entry.data_offsets.0 as usize, start + entry.data_offsets.1 as usize);
            let expected = header.crcs[i];
            let first = pieces.len();
            let mut at = begin;
            while at < end {
                let stop = end.min(at + PIECE);
                pieces.push(Piece { shard, begin: at, end: stop, hash: verify && expected.is_some() });
                at = stop;
            }
            wanted.push(Wanted { shard, entry, expected, begin, end, pieces: first..pieces.len() });
        }
    }

    let workers = config.io_threads.clamp(1, MAX_WORKERS as u32) as usize;
    let workers = workers.min(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let crcs = bring_in(&maps, &pieces, workers)?;

    if verify {
        for tensor in &wanted {
            let mut hasher = crc32fast::Hasher::new();
            for piece in tensor.pieces.clone() {
                let len = (pieces[piece].end - pieces[piece].begin) as u64;
                if let Some(crc) = crcs[piece].get() {
                    hasher.combine(&crc32fast::Hasher::new_with_initial_len(*crc, len));
                }
            }
            if tensor.expected.is_some() {
                check_crc(maps[tensor.shard].path(), tensor.entry, tensor.expected, hasher.finalize())?;
            }
        }
    }

    let owners: Vec<Bytes> = maps.into_iter().map(Bytes::from_owner).collect();
    let mut tensors = Vec::with_capacity(wanted.len());
    let mut data_bytes = 0u64;
    for tensor in &wanted {
        data_bytes += (tensor.end - tensor.begin) as u64;
        tensors.push(LoadedTensor {
            name: tensor.entry.name.clone(),
            dtype: tensor.entry.dtype,
            shape: tensor.entry.shape.clone(),
            data: owners[tensor.shard].slice(tensor.begin..tensor.end),
        });
    }
    read_bytes += data_bytes;
    let extra_files = read_extra_files(&handle, &manifest, &mut read_bytes)?;
    let engine = EngineReport {
        requested: config.engine,
        engine: EngineKind::Buffered,
        direct_io: false,
        registered_buffers: false,
        align: 1,
        mem_align: 1,
        queue_depth: workers as u32,
        offload_writes: false,
        fallbacks: Vec::new(),
    };
    Ok(Mapped::Loaded(LoadedCheckpoint {
        tensors,
        metadata: manifest.metadata,
        extra_files,
        report: LoadReport {
            zero_copy_bytes: data_bytes,
            mapped: true,
            ..LoadReport::finished(started, data_bytes, read_bytes, verify, engine)
        },
    }))
}

/// Brings every piece into memory on `workers` threads (see the module docs); returns the
/// CRC of each piece that is hashed.
fn bring_in(maps: &[MappedFile], pieces: &[Piece], workers: usize) -> Result<Vec<OnceLock<u32>>> {
    let crcs: Vec<OnceLock<u32>> = pieces.iter().map(|_| OnceLock::new()).collect();
    let hint = |i: usize| {
        if let Some(p) = pieces.get(i) {
            maps[p.shard].advise(p.begin, p.end - p.begin, Advice::WillNeed);
        }
    };
    (0..AHEAD).for_each(hint);
    let next = AtomicUsize::new(0);
    let work = || -> Result<()> {
        let stop_all = |e| {
            next.store(pieces.len(), Ordering::Relaxed);
            Err(e)
        };
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(piece) = pieces.get(i) else { return Ok(()) };
            hint(i + AHEAD);
            let map = &maps[piece.shard];
            let bytes = &map.as_ref()[piece.begin..piece.end];
            if !map.advise(piece.begin, bytes.len(), Advice::PopulateRead) {
                let error = std::io::Error::last_os_error();
                if error.raw_os_error() != Some(libc::EINVAL) {
                    // EFAULT: a page past the end of a file that shrank, or one that could
                    // not be read. Touching it would raise SIGBUS.
                    return stop_all(Error::io_at("read (mapped)", map.path(), piece.begin as u64, error));
                }
                // A kernel without MADV_POPULATE_READ (before 5.14): the hash or the touch
                // below faults the pages in.
                if !piece.hash {
                    touch(bytes);
                }
            }
            if piece.hash {
                let _ = crcs[i].set(crc32fast::hash(bytes));
            }
        }
    };
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..workers)
            .map(|n| {
                std::thread::Builder::new()
                    .name(format!("uring-ckpt-map-{n}"))
                    .spawn_scoped(scope, work)
                    .map_err(|e| Error::Internal(format!("cannot start a mapped load's worker: {e}")))
            })
            .collect::<Result<_>>()?;
        let mut result = work();
        for helper in helpers {
            let joined = helper
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("a mapped load's worker panicked".into())));
            result = result.and(joined);
        }
        result
    })?;
    Ok(crcs)
}

/// Reads one byte of every page of `bytes`, so that each is faulted in.
fn touch(bytes: &[u8]) {
    for at in (0..bytes.len()).step_by(4096) {
        // SAFETY: `at` is inside `bytes`; a volatile read keeps the access.
        unsafe { std::ptr::read_volatile(bytes.as_ptr().add(at)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that is shorter than its mapping (truncated after it was measured) is an I/O
    /// error naming the file and the offset, not a `SIGBUS`.
    #[test]
    fn a_file_that_shrank_is_an_error_not_a_signal() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("shrunk");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let map = MappedFile::map(&file, 8 << 20, &path).unwrap();
        if !map.advise(0, 4096, Advice::PopulateRead) {
            eprintln!("skipped: this kernel has no MADV_POPULATE_READ (Linux 5.14+)");
            return;
        }
        let pieces: Vec<Piece> =
            (0..8).map(|i| Piece { shard: 0, begin: i << 20, end: (i + 1) << 20, hash: true }).collect();
        let maps = [map];
        match bring_in(&maps, &pieces, 2) {
            Err(Error::Io { op, path: p, offset: Some(offset), .. }) => {
                assert_eq!((op, p.as_path()), ("read (mapped)", path.as_path()));
                assert!(offset >= 1 << 20, "{offset}");
            }
            other => panic!("expected an I/O error, got {:?}", other.map(|c| c.len())),
        }
        // The part that exists is hashed as it should be.
        let crcs = bring_in(&maps, &pieces[..1], 1).unwrap();
        assert_eq!(crcs[0].get().copied(), Some(crc32fast::hash(&[7u8; 1 << 20])));
    }
}
