//! Snapshot mode: every tensor is copied into one aligned host area (kept and reused by
//! later saves), the sources are released, and the save writes from the copy.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use super::completion::lock;
use super::job::Shared;
use super::owned::OwnedCheckpoint;
use crate::checkpoint::{Checkpoint, SaveReport, TensorData, TensorView};
use crate::checkpoint_io::CheckpointIO;
use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::io::AlignedBuf;
use crate::source::TensorSource;

/// Snapshot copies are split into pieces of at most this size, shared among threads.
const SNAPSHOT_PIECE: usize = 64 << 20;
/// Threads copying a snapshot at most.
const SNAPSHOT_THREADS: usize = 4;
/// Alignment of the snapshot area (and so of every tensor that starts a shard in it).
const SNAPSHOT_ALIGN: usize = 4096;

/// Snapshot mode: copies every tensor into one aligned host area (reused across saves),
/// releases the sources, then saves from the copy.
pub(super) fn snapshot_save<C: CheckpointIO>(
    inner: &C,
    shared: &Shared,
    checkpoint: OwnedCheckpoint,
    path: &Path,
    on_staged: &(dyn Fn() + Sync),
) -> Result<SaveReport> {
    // Tensors are packed as in a shard's data region, so that file offsets and addresses
    // agree modulo the alignment and the writer can send aligned runs without a copy.
    let mut offsets = Vec::with_capacity(checkpoint.tensors.len());
    let mut total = 0usize;
    for t in &checkpoint.tensors {
        offsets.push(total);
        total = total
            .checked_add(t.source.len())
            .ok_or_else(|| Error::InvalidCheckpoint("checkpoint size overflows".into()))?;
    }
    let mut area = take_snapshot_area(shared, total);
    let copy_started = Instant::now();
    let copied = copy_snapshot(&checkpoint, &offsets, &mut area.as_full_mut_slice()[..total]);
    let snapshot_seconds = copy_started.elapsed().as_secs_f64();
    // Nothing reads the sources any more: release them before saying so.
    let OwnedCheckpoint { tensors, metadata, extra_files } = checkpoint;
    let specs: Vec<(String, Dtype, Vec<u64>, usize)> =
        tensors.into_iter().map(|t| (t.name, t.dtype, t.shape, t.source.len())).collect();
    on_staged();
    let result = copied.and_then(|()| {
        area.set_len(total);
        let view = Checkpoint {
            tensors: specs
                .iter()
                .zip(&offsets)
                .map(|((name, dtype, shape, len), &start)| TensorView {
                    name: name.clone(),
                    dtype: *dtype,
                    shape: shape.clone(),
                    data: TensorData::Host(&area[start..start + len]),
                })
                .collect(),
            metadata,
            extra_files: extra_files.iter().map(|(n, b)| (n.clone(), &b[..])).collect(),
        };
        inner.save_checkpoint(&view, path)
    });
    area.clear();
    lock(&shared.state).snapshots.push(area);
    let mut report = result?;
    report.add_serial_copy(snapshot_seconds, total as u64);
    Ok(report)
}

/// A kept snapshot area of at least `len` bytes, or a new one.
fn take_snapshot_area(shared: &Shared, len: usize) -> AlignedBuf {
    let mut state = lock(&shared.state);
    let fits = state
        .snapshots
        .iter()
        .enumerate()
        .filter(|(_, b)| b.capacity() >= len)
        .min_by_key(|(_, b)| b.capacity());
    if let Some((i, _)) = fits {
        return state.snapshots.swap_remove(i);
    }
    // None is large enough: replace the largest (the checkpoint grew).
    if let Some(i) = (0..state.snapshots.len()).max_by_key(|&i| state.snapshots[i].capacity()) {
        drop(state.snapshots.swap_remove(i));
    }
    drop(state);
    AlignedBuf::zeroed(len, SNAPSHOT_ALIGN)
}

/// Copies every tensor to its offset in `dst`, in pieces spread over a few threads.
fn copy_snapshot(checkpoint: &OwnedCheckpoint, offsets: &[usize], dst: &mut [u8]) -> Result<()> {
    struct Piece<'a> {
        source: &'a dyn TensorSource,
        offset: usize,
        dst: &'a mut [u8],
    }
    let mut pieces = Vec::new();
    let mut rest = dst;
    let mut at = 0usize;
    for (t, &start) in checkpoint.tensors.iter().zip(offsets) {
        debug_assert_eq!(start, at);
        let len = t.source.len();
        let (mut tensor_dst, tail) = std::mem::take(&mut rest).split_at_mut(len);
        rest = tail;
        at += len;
        let mut offset = 0usize;
        while !tensor_dst.is_empty() {
            let n = tensor_dst.len().min(SNAPSHOT_PIECE);
            let (piece, more) = std::mem::take(&mut tensor_dst).split_at_mut(n);
            pieces.push(Piece { source: &*t.source, offset, dst: piece });
            tensor_dst = more;
            offset += n;
        }
    }
    let threads =
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(SNAPSHOT_THREADS).min(pieces.len());
    let queue = Mutex::new(pieces.into_iter());
    let copy = || -> Result<()> {
        loop {
            let next = lock(&queue).next();
            let Some(piece) = next else { return Ok(()) };
            match piece.source.host_bytes() {
                Some(bytes) => {
                    piece.dst.copy_from_slice(&bytes[piece.offset..piece.offset + piece.dst.len()])
                }
                None => piece.source.copy_to(piece.offset, piece.dst)?,
            }
        }
    };
    if threads <= 1 {
        return copy();
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads).map(|_| scope.spawn(copy)).collect();
        let mut first = Ok(());
        for h in handles {
            let result =
                h.join().unwrap_or_else(|_| Err(Error::Internal("a snapshot copy thread panicked".into())));
            if first.is_ok() {
                first = result;
            }
        }
        first
    })
}
