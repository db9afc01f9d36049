//! Lays one shard's tensors into a file through a [`Writer`]: the data region is one stream
//! cut into aligned chunks. Each tensor is either written straight from its memory (when
//! address, file offset and length allow it) or copied into a staging buffer, with its
//! CRC-32 computed in the same pass. The header goes last, into space reserved at the start,
//! once every CRC is known; then the padded tail is truncated away and the file synced.
//!
//! The data region starts at a phase past a 4096-byte offset chosen from the tensors'
//! memory ([`data_phase`]): torch's allocator puts large tensors 64 bytes past a page
//! boundary, and only with the data region 64 bytes past one do their addresses and file
//! offsets agree modulo the direct-I/O alignment, as a write without a copy needs. With a
//! phase the block holding the end of the header padding also holds the first data bytes;
//! the padding there is spaces whatever the CRCs are, so that block starts the first
//! staging buffer (spaces, then data) and the header written last ends where it begins.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::TensorLocation;
use crate::checkpoint::{TensorData, TensorView};
use crate::error::{Error, Result};
use crate::format::{encode_header_with_phase, ShardInfo, ShardLayout, TensorSpec, DATA_ALIGN, PHASE_ALIGN};
use crate::io::aligned::round_down_u64;
use crate::io::stats::BusySpans;
use crate::io::{FileId, Payload, StagingBuf, Writer};
use crate::source::TensorSource;

/// Tensors at least this large may be written without a staging copy (smaller ones are
/// cheaper to batch into a staging buffer than to send as writes of their own).
const ZERO_COPY_MIN: usize = 256 * 1024;

/// With O_DIRECT a shard's writes are cut at file offsets that are multiples of this (or of
/// the direct-I/O alignment, if larger), the usual file-system block: XFS and ext4 take a
/// direct write that starts or ends inside a block (allowed from the 512-byte alignment
/// `STATX_DIOALIGN` reports) one at a time, under the exclusive inode lock after waiting out
/// every direct write in flight, which leaves a queue of one. A tensor whose address and
/// offset agree then stages at most this much before going without a copy.
const WRITE_ALIGN: u64 = 4096;

/// Shard streams copying at this moment, in this process (see [`split_copies`]).
static ACTIVE_STREAMS: AtomicUsize = AtomicUsize::new(0);

/// Whether a stream should split its staging copies over two threads: when every stream
/// running now can have a second core (one shard written alone on a machine with two or
/// more cores). A staged shard's one thread copies and hashes every byte, and on a fast
/// device that thread is the limit; with more streams than half the cores the other
/// streams already use them.
fn split_copies() -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    ACTIVE_STREAMS.load(Ordering::Relaxed) * 2 <= cores
}

/// Counts one stream as active for as long as it lives.
struct ActiveStream;

impl ActiveStream {
    fn enter() -> ActiveStream {
        ACTIVE_STREAMS.fetch_add(1, Ordering::Relaxed);
        ActiveStream
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        ACTIVE_STREAMS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts of how the bytes of one shard travelled.
#[derive(Debug, Clone, Default)]
pub(crate) struct ShardVolume {
    pub zero_copy_bytes: u64,
    pub staged_bytes: u64,
    /// When staging copies (out of the sources) ran.
    pub copies: BusySpans,
}

impl ShardVolume {
    pub(crate) fn add(&mut self, other: &ShardVolume) {
        self.zero_copy_bytes += other.zero_copy_bytes;
        self.staged_bytes += other.staged_bytes;
        self.copies.merge(&other.copies);
    }
}

/// How one shard is written.
#[derive(Clone, Copy)]
pub(crate) struct ShardOptions<'h> {
    /// Let large aligned host tensors go to disk without a staging copy. Off when the
    /// caller must be told, before the writes complete, that the sources are no longer read.
    pub zero_copy: bool,
    /// Called once every tensor byte of the shard is in a staging buffer (or, with
    /// zero-copy, queued for writing), before the header is written and the file synced.
    pub on_appended: Option<&'h (dyn Fn() + Sync)>,
    /// Let staging copies be split over a second thread (see [`split_copies`]). Off for a
    /// save in the background, whose threads are bounded.
    pub split: bool,
}

impl Default for ShardOptions<'_> {
    fn default() -> Self {
        ShardOptions { zero_copy: true, on_appended: None, split: true }
    }
}

/// Writes one complete shard file at `path` and returns its manifest entry, how its bytes
/// travelled and where each tensor is in it.
pub(crate) fn write_shard<'a>(
    writer: &mut dyn Writer<'a>,
    path: &Path,
    file_name: &str,
    tensors: &[&TensorView<'a>],
    metadata: &BTreeMap<String, String>,
    options: ShardOptions<'_>,
) -> Result<(ShardInfo, ShardVolume, Vec<TensorLocation>)> {
    let specs = tensors
        .iter()
        .map(|t| TensorSpec { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() })
        .collect();
    let layout = ShardLayout::new(specs).map_err(|source| Error::Format { path: path.into(), source })?;
    let report = writer.report();
    // With O_DIRECT, writes start and end at multiples of the direct-I/O alignment and of
    // 4096 ([`WRITE_ALIGN`]), whichever is larger.
    let (align, mem_align) = match report.direct_io {
        true => ((report.align as u64).max(WRITE_ALIGN), report.mem_align),
        false => (1, 1),
    };
    let header_align = report.align as u64;
    let format_err = |source| Error::Format { path: path.into(), source };
    let phase = data_phase(tensors, &layout);
    let placeholder =
        encode_header_with_phase(&layout, None, metadata, header_align, phase).map_err(format_err)?;
    let prefix_len = placeholder.len() as u64;
    // The data region's first block starts here; from here on the prefix is spaces.
    let head = round_down_u64(prefix_len, align);

    let chunk = stream_chunk(writer)?;
    let _active = ActiveStream::enter();
    let file = writer.create(path, prefix_len + layout.data_len)?;
    let mut stream = Stream {
        file,
        pos: prefix_len,
        cur: None,
        cur_offset: head,
        chunk,
        align,
        mem_align,
        zero_copy: options.zero_copy,
        split: options.split,
        volume: ShardVolume::default(),
    };
    if head < prefix_len {
        // The end of the header padding begins the stream's first block.
        let mut buf = writer.take_buffer()?;
        buf.extend_from_slice(&placeholder[head as usize..]);
        stream.cur = Some(buf);
    }
    let mut crcs = Vec::with_capacity(tensors.len());
    for tensor in tensors {
        let crc = match tensor.data {
            TensorData::Host(bytes) => stream.append(writer, bytes)?,
            TensorData::Source(source) => match source.host_bytes() {
                Some(bytes) => stream.append(writer, bytes)?,
                None => stream.append_copied(writer, source)?,
            },
        };
        crcs.push(crc);
    }
    stream.flush(writer)?;
    if let Some(on_appended) = options.on_appended {
        on_appended();
    }
    let file_len = prefix_len + layout.data_len;
    debug_assert_eq!(stream.pos, file_len);

    let header =
        encode_header_with_phase(&layout, Some(&crcs), metadata, header_align, phase).map_err(format_err)?;
    // What went out with the first data bytes must be what the header has there.
    if header.len() != placeholder.len() || header[head as usize..] != placeholder[head as usize..] {
        return Err(Error::Internal(format!("the header of {} changed length or padding", path.display())));
    }
    let mut offset = 0u64;
    for piece in header[..head as usize].chunks(chunk) {
        let mut buf = writer.take_buffer()?;
        buf.extend_from_slice(piece);
        buf.pad_to(align as usize);
        writer.write(file, Payload::Staged(buf), offset)?;
        offset += piece.len() as u64;
    }
    writer.finish(file, file_len)?;
    let info = ShardInfo {
        file: file_name.to_owned(),
        size: file_len,
        header_len: prefix_len,
        header_crc32: crc32fast::hash(&header),
        tensor_count: tensors.len() as u64,
    };
    let locations = layout
        .tensors
        .iter()
        .zip(&crcs)
        .map(|(entry, &crc32)| TensorLocation {
            name: entry.name.clone(),
            file: file_name.to_owned(),
            offset: prefix_len + entry.data_offsets.0,
            length: entry.len(),
            crc32,
        })
        .collect();
    Ok((info, stream.volume, locations))
}

/// Where the shard's data region starts past a multiple of [`DATA_ALIGN`]: the phase at
/// which the most bytes of large host tensors (at least [`ZERO_COPY_MIN`]) would have memory
/// address and file offset congruent modulo 4096 (hence modulo any direct-I/O alignment up
/// to a page), so that they can be written without a copy. A tensor's vote is its address
/// minus its offset in the data region, modulo 4096; votes that are not a multiple of
/// [`PHASE_ALIGN`] are ignored (the data region stays 8-byte aligned). Ties go to the
/// smaller phase; 0 when nothing votes (device sources, page-aligned memory), which is the
/// layout of a shard written without phases. The choice depends on memory and layout only,
/// not on the engine, so every engine writes the same bytes for the same tensors.
fn data_phase(tensors: &[&TensorView<'_>], layout: &ShardLayout) -> u64 {
    let mut votes: Vec<(u64, u64)> = Vec::new();
    for (tensor, entry) in tensors.iter().zip(&layout.tensors) {
        let bytes = match tensor.data {
            TensorData::Host(bytes) => Some(bytes),
            TensorData::Source(source) => source.host_bytes(),
        };
        let Some(bytes) = bytes.filter(|b| b.len() >= ZERO_COPY_MIN) else { continue };
        // 4096 divides 2^64, so the wrapping difference is right modulo 4096.
        let phase = (bytes.as_ptr() as u64).wrapping_sub(entry.data_offsets.0) % DATA_ALIGN;
        if phase % PHASE_ALIGN != 0 {
            continue;
        }
        match votes.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, n)) => *n += bytes.len() as u64,
            None => votes.push((phase, bytes.len() as u64)),
        }
    }
    votes.into_iter().max_by_key(|&(phase, n)| (n, std::cmp::Reverse(phase))).map_or(0, |(phase, _)| phase)
}

/// Capacity of the writer's staging buffers.
fn stream_chunk(writer: &mut dyn Writer<'_>) -> Result<usize> {
    let buf = writer.take_buffer()?;
    let capacity = buf.capacity();
    writer.return_buffer(buf);
    Ok(capacity)
}

struct Stream {
    file: FileId,
    /// File offset of the next byte of the stream.
    pos: u64,
    /// The staging buffer being filled, which starts at `cur_offset`. If the stream ends in
    /// an error (or a panic) it is dropped with it, which sends it back to the staging pool.
    cur: Option<StagingBuf>,
    cur_offset: u64,
    /// Capacity of a staging buffer.
    chunk: usize,
    align: u64,
    mem_align: usize,
    zero_copy: bool,
    /// May copies go to a second thread ([`ShardOptions::split`]).
    split: bool,
    volume: ShardVolume,
}

impl Stream {
    /// Appends one tensor's bytes; returns their CRC-32.
    fn append<'a>(&mut self, writer: &mut dyn Writer<'a>, data: &'a [u8]) -> Result<u32> {
        let mut hasher = crc32fast::Hasher::new();
        let mut rest = data;
        let large = self.zero_copy && data.len() >= ZERO_COPY_MIN;
        while !rest.is_empty() {
            if let Some(n) = self.zero_copy_len(rest).filter(|_| large) {
                // The stream position is aligned, so whatever is staged fills whole blocks.
                self.send_current(writer)?;
                let (head, tail) = rest.split_at(n);
                hasher.update(head);
                writer.write(self.file, Payload::Borrowed(head), self.pos)?;
                self.pos += n as u64;
                self.volume.zero_copy_bytes += n as u64;
                rest = tail;
                continue;
            }
            // Stage only up to the next aligned file offset if the rest can go from there
            // without a copy (its address is then aligned too): with a memory alignment
            // below the block size (STATX_DIOALIGN: 4 on NVMe, 512 on a loop device) a
            // tensor that starts anywhere needs at most one block staged.
            let stage_first = if large { self.to_zero_copy(rest) } else { None };
            let buf = match &mut self.cur {
                Some(buf) => buf,
                None => {
                    self.cur_offset = self.pos;
                    self.cur.insert(writer.take_buffer()?)
                }
            };
            let mut n = rest.len().min(buf.remaining());
            if let Some(k) = stage_first {
                n = n.min(k);
            }
            let (head, tail) = rest.split_at(n);
            let started = Instant::now();
            if self.split && split_copies() {
                buf.extend_hashing_split(head, &mut hasher);
            } else {
                buf.extend_hashing(head, &mut hasher);
            }
            self.volume.copies.add(started, Instant::now());
            self.pos += n as u64;
            self.volume.staged_bytes += n as u64;
            rest = tail;
            if buf.remaining() == 0 {
                self.send_current(writer)?;
            }
        }
        Ok(hasher.finalize())
    }

    /// Appends a tensor that is not in host memory: each range is copied by the source
    /// straight into a staging buffer, then hashed while still in cache. Disk writes of
    /// earlier buffers run while the source copies the next one.
    fn append_copied(&mut self, writer: &mut dyn Writer<'_>, source: &dyn TensorSource) -> Result<u32> {
        let mut hasher = crc32fast::Hasher::new();
        let mut offset = 0usize;
        let total = source.len();
        while offset < total {
            let buf = match &mut self.cur {
                Some(buf) => buf,
                None => {
                    self.cur_offset = self.pos;
                    self.cur.insert(writer.take_buffer()?)
                }
            };
            let n = (total - offset).min(buf.remaining());
            let start = buf.len();
            let started = Instant::now();
            source.copy_to(offset, &mut buf.as_full_mut_slice()[start..start + n])?;
            buf.set_len(start + n);
            hasher.update(&buf[start..]);
            self.volume.copies.add(started, Instant::now());
            offset += n;
            self.pos += n as u64;
            self.volume.staged_bytes += n as u64;
            if buf.remaining() == 0 {
                self.send_current(writer)?;
            }
        }
        Ok(hasher.finalize())
    }

    /// How many bytes of `rest` can go to disk without a copy: a whole number of blocks, at
    /// most one staging buffer's worth, when file position and address are aligned.
    fn zero_copy_len(&self, rest: &[u8]) -> Option<usize> {
        let n = round_down_u64(rest.len() as u64, self.align) as usize;
        let aligned = self.pos % self.align == 0 && (rest.as_ptr() as usize) % self.mem_align == 0;
        (aligned && n > 0).then(|| n.min(self.chunk))
    }

    /// Bytes of `rest` to stage before the stream reaches an aligned file offset where the
    /// remainder could be written without a copy (address aligned too, at least one block
    /// left), when there is such a point within the first block.
    fn to_zero_copy(&self, rest: &[u8]) -> Option<usize> {
        let k = ((self.align - self.pos % self.align) % self.align) as usize;
        let aligned = (rest.as_ptr() as usize).wrapping_add(k) % self.mem_align == 0;
        (k > 0 && aligned && rest.len() >= k + self.align as usize).then_some(k)
    }

    /// Queues the staging buffer being filled, if any.
    fn send_current(&mut self, writer: &mut dyn Writer<'_>) -> Result<()> {
        if let Some(buf) = self.cur.take() {
            writer.write(self.file, Payload::Staged(buf), self.cur_offset)?;
        }
        Ok(())
    }

    /// Pads the last block with zeros (the file is truncated to its exact length later)
    /// and queues it.
    fn flush(&mut self, writer: &mut dyn Writer<'_>) -> Result<()> {
        if let Some(buf) = self.cur.as_mut() {
            buf.pad_to(self.align as usize);
        }
        self.send_current(writer)
    }
}
