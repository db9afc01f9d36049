//! Where tensor bytes go on their way back from the disk: the [`TensorSink`] trait (the
//! restore path's counterpart of [`crate::source::TensorSource`]) and its implementations.
//!
//! A load into a sink ([`crate::load::load_into`]) reads each shard into a few reused
//! staging buffers of the [`crate::io::StagingPool`]; copy threads take each buffer as it
//! is read and hand every piece of a tensor in it to the sink, computing the tensor's CRC
//! in the same pass. Peak memory is the pool's, whatever the checkpoint's size.
//!
//! # Sinks
//!
//! - [`HostSink`]: existing host memory (a model's parameters, a state dict's tensors),
//!   written in place;
//! - [`SimulatedSink`]: memory on a [`crate::source::SimulatedDevice`], whose copy thread
//!   performs the host-to-device copies at the device's bandwidth (for tests and benches of
//!   the overlap of reads and copies without a GPU);
//! - CUDA device memory (`cuda` feature): `cuda::CudaSink`, copied with `cuMemcpyHtoDAsync`
//!   from the (page-locked) staging buffers on a stream per copy thread.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host;
pub mod simulated;

pub use host::HostSink;
pub use simulated::SimulatedSink;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::io::copy_streaming;

/// A tensor of the checkpoint, as a sink is asked about it.
#[derive(Debug, Clone, Copy)]
pub struct TensorMeta<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its element type.
    pub dtype: Dtype,
    /// Its dimensions.
    pub shape: &'a [u64],
    /// Its bytes.
    pub len: u64,
}

/// Where a load puts tensor bytes. Shared by the copy threads of one load.
pub trait TensorSink: Sync {
    /// Whether `tensor` goes to this sink: `Ok(Some(slot))` (the sink's number for it, used
    /// by [`SinkWriter::write`]), `Ok(None)` to skip it, or an error saying why its
    /// destination does not fit it (naming the tensor). Called once per tensor of the
    /// checkpoint, before any of its bytes are read; the load gathers every error into one
    /// [`crate::Error::Mismatch`].
    fn open(&self, tensor: &TensorMeta<'_>) -> Result<Option<usize>>;
    /// Destinations no tensor of the checkpoint was opened for (reported as missing).
    fn unclaimed(&self) -> Vec<String>;
    /// A writer for one copy thread (created on that thread).
    fn writer(&self) -> Result<Box<dyn SinkWriter + '_>>;
    /// The host memory of the tensor in `slot` (its start and length), when reads may land
    /// in it directly, past the staging buffers: the load then reads every part of the
    /// tensor that the direct-I/O alignment allows straight into it and hands only the rest
    /// to [`SinkWriter::write`]. The memory is the load's alone until it returns, as for
    /// `write`. `None` (the default): every byte goes through `write` (device memory).
    fn host_memory(&self, slot: usize) -> Option<(*mut u8, usize)> {
        let _ = slot;
        None
    }
}

/// One copy thread's end of a [`TensorSink`].
pub trait SinkWriter {
    /// Bytes `[at, at + bytes.len())` of the tensor in `slot`, fed to `crc` in the same
    /// pass when given. The sink checks the range against the destination. It may return
    /// before the copy is done (device sinks) but may read `bytes` only until
    /// [`SinkWriter::flush`] returns: the staging buffer is reused after that.
    fn write(
        &mut self,
        slot: usize,
        at: u64,
        bytes: &[u8],
        crc: Option<&mut crc32fast::Hasher>,
    ) -> Result<()>;
    /// Waits until no write handed in so far still reads its bytes.
    fn flush(&mut self) -> Result<()>;
}

/// What a destination is, as checked against a tensor of the checkpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expect<'a> {
    pub len: usize,
    pub dtype: Option<Dtype>,
    pub shape: Option<&'a [u64]>,
}

/// The destinations of a sink by name, and which tensor claimed each: shared by the sinks
/// so that every one refuses duplicate names, claims each destination once and words
/// mismatches alike.
#[derive(Debug)]
pub(crate) struct Claims {
    names: Vec<String>,
    by_name: HashMap<String, usize>,
    claimed: Vec<AtomicBool>,
}

impl Claims {
    /// Slots `0..names.len()` by name; two equal names are refused.
    pub fn new(names: Vec<String>) -> Result<Claims> {
        let mut by_name = HashMap::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            if by_name.insert(name.clone(), i).is_some() {
                return Err(Error::InvalidCheckpoint(format!("two destinations named {name:?}")));
            }
        }
        let claimed = names.iter().map(|_| AtomicBool::new(false)).collect();
        Ok(Claims { names, by_name, claimed })
    }

    /// The slot of `tensor`'s destination (`None` when there is none), claimed once; its
    /// mismatches with `expect(slot)` as one [`Error::InvalidCheckpoint`] naming the tensor.
    pub fn claim<'e>(
        &self,
        tensor: &TensorMeta<'_>,
        expect: impl FnOnce(usize) -> Expect<'e>,
    ) -> Result<Option<usize>> {
        let Some(&slot) = self.by_name.get(tensor.name) else {
            return Ok(None);
        };
        // Claimed even when it does not fit, so it is not also reported as missing.
        if self.claimed[slot].swap(true, Ordering::AcqRel) {
            return Err(Error::InvalidCheckpoint(format!(
                "tensor {:?} appears twice in the checkpoint",
                tensor.name
            )));
        }
        let expect = expect(slot);
        let mut problems = Vec::new();
        if let Some(dtype) = expect.dtype.filter(|&d| d != tensor.dtype) {
            problems.push(format!("dtype {} in the checkpoint, {dtype} in the destination", tensor.dtype));
        }
        if let Some(shape) = expect.shape.filter(|&s| s != tensor.shape) {
            problems
                .push(format!("shape {:?} in the checkpoint, {shape:?} in the destination", tensor.shape));
        }
        if problems.is_empty() && expect.len as u64 != tensor.len {
            problems
                .push(format!("{} bytes in the checkpoint, {} in the destination", tensor.len, expect.len));
        }
        if !problems.is_empty() {
            return Err(Error::InvalidCheckpoint(format!(
                "tensor {:?}: {}",
                tensor.name,
                problems.join(", ")
            )));
        }
        Ok(Some(slot))
    }

    /// Names of the destinations no tensor claimed.
    pub fn unclaimed(&self) -> Vec<String> {
        let unclaimed = self.names.iter().zip(&self.claimed).filter(|(_, c)| !c.load(Ordering::Acquire));
        unclaimed.map(|(name, _)| name.clone()).collect()
    }
}

/// The check every sink makes of a write: `[at, at + len)` lies in a destination of
/// `dest_len` bytes. Returns the start as a `usize`.
pub(crate) fn check_range(name: &str, dest_len: usize, at: u64, len: usize) -> Result<usize> {
    let start = usize::try_from(at).ok();
    match start.and_then(|s| s.checked_add(len)) {
        Some(end) if end <= dest_len => Ok(end - len),
        _ => Err(Error::Internal(format!(
            "a write of {len} bytes at {at} lies past the end of the {dest_len}-byte destination of {name:?}"
        ))),
    }
}

/// Copies `src` to `dst` (same length), feeding `crc` each piece of the source just before
/// the piece is copied: the CRC reads the staging buffer, in cache, and the copy writes the
/// destination with non-temporal stores ([`copy_streaming`]), never reading it.
pub(crate) fn copy_hashing(dst: &mut [u8], src: &[u8], crc: Option<&mut crc32fast::Hasher>) {
    /// Bytes per piece: hashed, then copied while still in L1/L2.
    const PIECE: usize = 64 << 10;
    match crc {
        None => copy_streaming(dst, src),
        Some(crc) => {
            for (d, s) in dst.chunks_mut(PIECE).zip(src.chunks(PIECE)) {
                crc.update(s);
                copy_streaming(d, s);
            }
        }
    }
}
