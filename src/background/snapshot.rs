//! Snapshot mode: every tensor is copied into one aligned host area (kept and reused by
//! later saves), the sources are released, and the save writes from the copy.
//!
//! When device sources are present, the area is page-locked through the registrar the
//! sources offer ([`TensorSource::host_registrar`], CUDA's `cuMemHostRegister`) the first
//! time it is filled from a device, and stays so while it is kept: [`SnapshotArea`]
//! unregisters it before its memory is freed, whatever the reason (a larger checkpoint, the
//! end of the wrapper). Copies are cut into pieces of [`SNAPSHOT_PIECE`] bytes spread over up
//! to [`SNAPSHOT_THREADS`] threads, so the pieces of one large tensor are copied at once (on
//! several CUDA streams: each copy borrows its own).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::completion::lock;
use super::job::Shared;
use super::owned::OwnedCheckpoint;
use crate::checkpoint::{Checkpoint, SaveReport, TensorData, TensorView};
use crate::checkpoint_io::CheckpointIO;
use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::io::{AlignedBuf, Registrar};
use crate::source::TensorSource;

/// Snapshot copies are split into pieces of at most this size, shared among threads.
const SNAPSHOT_PIECE: usize = 64 << 20;
/// Threads copying a snapshot at most.
const SNAPSHOT_THREADS: usize = 4;
/// Alignment of the snapshot area (and so of every tensor that starts a shard in it).
const SNAPSHOT_ALIGN: usize = 4096;

/// A kept snapshot area, page-locked (registered) or not.
pub(super) struct SnapshotArea {
    buf: AlignedBuf,
    /// Who registered `buf`, unregistered before it is freed.
    registrar: Option<Arc<dyn Registrar>>,
}

impl SnapshotArea {
    fn new(len: usize) -> SnapshotArea {
        SnapshotArea { buf: AlignedBuf::zeroed(len, SNAPSHOT_ALIGN), registrar: None }
    }

    /// Registers the area with `registrar` unless it is already registered; a refusal is
    /// logged and the area stays pageable (copies into it are slower).
    fn register(&mut self, registrar: Arc<dyn Registrar>) {
        if self.registrar.is_some() {
            return;
        }
        match registrar.register(&self.buf) {
            Ok(()) => self.registrar = Some(registrar),
            Err(e) => log::warn!(
                "{} refused the snapshot area of {} bytes ({e}); device copies into it use pageable memory",
                registrar.name(),
                self.buf.capacity()
            ),
        }
    }

    /// Whether the area is registered.
    #[cfg(test)]
    pub(super) fn is_registered(&self) -> bool {
        self.registrar.is_some()
    }
}

impl Drop for SnapshotArea {
    fn drop(&mut self) {
        // Before `buf` (a field) is freed.
        if let Some(registrar) = self.registrar.take() {
            registrar.unregister(&self.buf);
        }
    }
}

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
    let device_registrar = checkpoint
        .tensors
        .iter()
        .filter(|t| t.source.host_bytes().is_none() && !t.source.is_empty())
        .find_map(|t| t.source.host_registrar());
    if let Some(registrar) = device_registrar {
        area.register(registrar);
    }
    let copy_started = Instant::now();
    let copied =
        copy_snapshot(&checkpoint, &offsets, &mut area.buf.as_full_mut_slice()[..total], SNAPSHOT_PIECE);
    let snapshot_seconds = copy_started.elapsed().as_secs_f64();
    // Nothing reads the sources any more: release them before saying so.
    let OwnedCheckpoint { tensors, metadata, extra_files, hf_index } = checkpoint;
    let specs: Vec<(String, Dtype, Vec<u64>, usize)> =
        tensors.into_iter().map(|t| (t.name, t.dtype, t.shape, t.source.len())).collect();
    on_staged();
    let result = copied.and_then(|()| {
        area.buf.set_len(total);
        let view = Checkpoint {
            tensors: specs
                .iter()
                .zip(&offsets)
                .map(|((name, dtype, shape, len), &start)| TensorView {
                    name: name.clone(),
                    dtype: *dtype,
                    shape: shape.clone(),
                    data: TensorData::Host(&area.buf[start..start + len]),
                })
                .collect(),
            metadata,
            extra_files: extra_files.iter().map(|(n, b)| (n.clone(), &b[..])).collect(),
            hf_index,
        };
        inner.save_checkpoint(&view, path)
    });
    area.buf.clear();
    lock(&shared.state).snapshots.push(area);
    let mut report = result?;
    report.add_serial_copy(snapshot_seconds, total as u64);
    Ok(report)
}

/// A kept snapshot area of at least `len` bytes, or a new one.
fn take_snapshot_area(shared: &Shared, len: usize) -> SnapshotArea {
    let mut state = lock(&shared.state);
    let fits = state
        .snapshots
        .iter()
        .enumerate()
        .filter(|(_, a)| a.buf.capacity() >= len)
        .min_by_key(|(_, a)| a.buf.capacity());
    if let Some((i, _)) = fits {
        return state.snapshots.swap_remove(i);
    }
    // None is large enough: replace the largest (the checkpoint grew).
    // (Dropping it unregisters it first.)
    if let Some(i) = (0..state.snapshots.len()).max_by_key(|&i| state.snapshots[i].buf.capacity()) {
        drop(state.snapshots.swap_remove(i));
    }
    drop(state);
    SnapshotArea::new(len)
}

/// Copies every tensor to its offset in `dst`, in pieces of at most `piece_size` bytes
/// spread over a few threads (pieces of one tensor run at once).
fn copy_snapshot(
    checkpoint: &OwnedCheckpoint,
    offsets: &[usize],
    dst: &mut [u8],
    piece_size: usize,
) -> Result<()> {
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
            let n = tensor_dst.len().min(piece_size.max(1));
            let (piece, more) = std::mem::take(&mut tensor_dst).split_at_mut(n);
            pieces.push(Piece { source: &*t.source, offset, dst: piece });
            tensor_dst = more;
            offset += n;
        }
    }
    // Device copies mostly wait for DMA: as many threads as allowed, whatever the cores.
    let devices = checkpoint.tensors.iter().any(|t| t.source.host_bytes().is_none());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if devices { SNAPSHOT_THREADS } else { cores.min(SNAPSHOT_THREADS) }.min(pieces.len());
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::background::{AsyncCheckpointIO, AsyncOptions};
    use crate::checkpoint_io::{LoadOptions, UringCheckpointIO};
    use crate::config::{AsyncMode, Config};
    use crate::io::pool::testing::FakeRegistrar;

    /// A device-like source (no host bytes) that offers a fake page-locking registrar and
    /// records, for each copy, whether the registrar had a live registration, and how many
    /// copies ran at once.
    struct FakeDevice {
        bytes: Vec<u8>,
        registrar: Arc<FakeRegistrar>,
        unregistered_copies: AtomicUsize,
        active: AtomicUsize,
        max_active: AtomicUsize,
        delay: Duration,
    }

    impl FakeDevice {
        fn new(bytes: Vec<u8>, registrar: Arc<FakeRegistrar>, delay: Duration) -> FakeDevice {
            FakeDevice {
                bytes,
                registrar,
                unregistered_copies: AtomicUsize::new(0),
                active: AtomicUsize::new(0),
                max_active: AtomicUsize::new(0),
                delay,
            }
        }
    }

    impl TensorSource for FakeDevice {
        fn len(&self) -> usize {
            self.bytes.len()
        }
        fn host_bytes(&self) -> Option<&[u8]> {
            None
        }
        fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
            if self.registrar.counts().2 == 0 {
                self.unregistered_copies.fetch_add(1, Ordering::SeqCst);
            }
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_active.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            dst.copy_from_slice(&self.bytes[offset..offset + dst.len()]);
            self.active.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
        fn host_registrar(&self) -> Option<Arc<dyn Registrar>> {
            Some(self.registrar.clone())
        }
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn pieces_of_one_large_tensor_are_copied_at_once() {
        let registrar = FakeRegistrar::new();
        let len = (1 << 20) + 5;
        let device = Arc::new(FakeDevice::new(pattern(3, len), registrar, Duration::from_millis(3)));
        let mut ck = OwnedCheckpoint::new();
        ck.add_bytes("host", Dtype::U8, &[7], vec![9u8; 7]).expect("add");
        ck.add("dev", Dtype::U8, &[len as u64], device.clone()).expect("add");
        let offsets = [0, 7];
        let mut dst = vec![0u8; 7 + len];
        copy_snapshot(&ck, &offsets, &mut dst, 64 << 10).expect("copy");
        assert_eq!(&dst[..7], &[9u8; 7]);
        assert!(dst[7..] == device.bytes[..], "pieces land at their offsets");
        let most = device.max_active.load(Ordering::SeqCst);
        assert!(most >= 2, "the pieces of one tensor run on several threads at once (max {most})");
        assert!(most <= SNAPSHOT_THREADS);
    }

    #[test]
    fn the_area_is_page_locked_before_device_copies_and_unlocked_before_it_is_freed() {
        let registrar = FakeRegistrar::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let config =
            Config::builder().chunk_size(1 << 16).staging_pool_size(1 << 18).build().expect("config");
        let io = AsyncCheckpointIO::new(
            UringCheckpointIO::new(config).expect("io"),
            AsyncOptions { mode: AsyncMode::Snapshot, max_saves_in_flight: 1 },
        )
        .expect("async io");
        let mut devices = Vec::new();
        // Three saves of one size reuse one area (registered once), a larger one replaces it
        // (the old one unregistered before it is freed), a host-only save leaves it alone.
        for (i, len) in [300_000usize, 300_000, 290_000, 700_000].into_iter().enumerate() {
            let device = Arc::new(FakeDevice::new(pattern(i as u8, len), registrar.clone(), Duration::ZERO));
            let mut ck = OwnedCheckpoint::new();
            ck.add("dev", Dtype::U8, &[len as u64], device.clone()).expect("add");
            let path = dir.path().join(format!("c{i}"));
            io.save_checkpoint(ck, &path).expect("save").wait().expect("durable");
            let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
            assert!(loaded.get("dev").expect("tensor").data[..] == device.bytes[..]);
            devices.push(device);
        }
        let mut ck = OwnedCheckpoint::new();
        ck.add_bytes("host", Dtype::U8, &[3], vec![1u8, 2, 3]).expect("add");
        io.save_checkpoint(ck, dir.path().join("host")).expect("save").wait().expect("durable");
        for d in &devices {
            assert_eq!(d.unregistered_copies.load(Ordering::SeqCst), 0, "a copy into pageable memory");
        }
        assert_eq!(registrar.counts(), (2, 1, 1), "registered once per area, the replaced one unlocked");
        assert!(lock(&io.shared.state).snapshots.iter().any(SnapshotArea::is_registered));
        drop(io);
        assert_eq!(registrar.counts(), (2, 2, 0), "the kept area is unlocked when the wrapper goes");
        registrar.assert_sound();
    }

    #[test]
    fn a_refused_registration_leaves_the_area_pageable_and_the_save_correct() {
        let registrar = FakeRegistrar::refusing(vec![1]);
        let dir = tempfile::tempdir().expect("tempdir");
        let io = AsyncCheckpointIO::new(
            UringCheckpointIO::new(Config::default()).expect("io"),
            AsyncOptions { mode: AsyncMode::Snapshot, max_saves_in_flight: 1 },
        )
        .expect("async io");
        let device = Arc::new(FakeDevice::new(pattern(1, 5000), registrar.clone(), Duration::ZERO));
        let mut ck = OwnedCheckpoint::new();
        ck.add("dev", Dtype::U8, &[5000], device.clone()).expect("add");
        io.save_checkpoint(ck, dir.path().join("c")).expect("save").wait().expect("durable");
        let loaded = io.load_checkpoint(dir.path().join("c"), &LoadOptions::default()).expect("load");
        assert!(loaded.get("dev").expect("tensor").data[..] == device.bytes[..]);
        drop(io);
        assert_eq!(registrar.counts(), (1, 0, 0));
        registrar.assert_sound();
    }
}
