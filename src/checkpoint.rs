//! What a checkpoint holds: named tensors and string metadata, on the way in (borrowed
//! views) and on the way out (loaded `Bytes`), plus the reports of a save and a load.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::io::stats::LatencySummary;
use crate::io::EngineReport;
use crate::source::TensorSource;

/// One tensor to save: its name, dtype, shape and where its bytes are (borrowed, not copied).
#[derive(Clone)]
pub struct TensorView<'a> {
    /// Unique name, e.g. `"model.layers.0.attn.q_proj.weight"`.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions; empty for a scalar.
    pub shape: Vec<u64>,
    /// The tensor's bytes in row-major order, exactly `dtype` x `shape` long.
    pub data: TensorData<'a>,
}

/// Where a tensor's bytes are.
#[derive(Clone, Copy)]
pub enum TensorData<'a> {
    /// Host memory, readable at any time: may go to disk without a copy.
    Host(&'a [u8]),
    /// Any other memory (a device), copied range by range into staging buffers.
    Source(&'a dyn TensorSource),
}

impl<'a> TensorData<'a> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            TensorData::Host(bytes) => bytes.len(),
            TensorData::Source(source) => source.len(),
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, when they are host memory.
    pub fn host_bytes(&self) -> Option<&'a [u8]> {
        match self {
            TensorData::Host(bytes) => Some(bytes),
            TensorData::Source(source) => source.host_bytes(),
        }
    }
}

impl std::fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorView")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .field("host", &self.data.host_bytes().is_some())
            .finish()
    }
}

/// A set of tensors and metadata to save.
#[derive(Debug, Clone, Default)]
pub struct Checkpoint<'a> {
    /// Tensors in the order they are laid out on disk.
    pub tensors: Vec<TensorView<'a>>,
    /// String metadata stored in the manifest (and each shard's `__metadata__`).
    pub metadata: BTreeMap<String, String>,
    /// Small non-tensor files (name, bytes) written into the checkpoint directory before the
    /// manifest and listed in it with their size and CRC-32: part of the atomic commit.
    pub extra_files: Vec<(String, &'a [u8])>,
}

impl<'a> Checkpoint<'a> {
    /// An empty checkpoint.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor after checking that `data` has exactly the size `dtype` x `shape` needs
    /// and that the name is new.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        dtype: Dtype,
        shape: &[u64],
        data: &'a [u8],
    ) -> Result<&mut Self> {
        self.add_source(name, dtype, shape, TensorData::Host(data))
    }

    /// Adds a tensor whose bytes are [`TensorData`] (a device [`TensorSource`], say), with the
    /// same checks as [`Checkpoint::add`].
    pub fn add_source(
        &mut self,
        name: impl Into<String>,
        dtype: Dtype,
        shape: &[u64],
        data: TensorData<'a>,
    ) -> Result<&mut Self> {
        let name = name.into();
        check_tensor_name(&name)?;
        let expected = dtype.byte_len(shape).ok_or_else(|| {
            Error::InvalidCheckpoint(format!("tensor {name:?}: shape {shape:?} of {dtype} overflows"))
        })?;
        if expected != data.len() as u64 {
            return Err(Error::InvalidCheckpoint(format!(
                "tensor {name:?}: {dtype} {shape:?} needs {expected} bytes, got {}",
                data.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Error::InvalidCheckpoint(format!("tensor {name:?} added twice")));
        }
        self.tensors.push(TensorView { name, dtype, shape: shape.to_vec(), data });
        Ok(self)
    }

    /// Sets a metadata entry.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Adds a non-tensor file, after checking its name (see
    /// [`check_extra_file_name`](crate::format::check_extra_file_name)) and that it is new.
    pub fn add_extra_file(&mut self, name: impl Into<String>, bytes: &'a [u8]) -> Result<&mut Self> {
        let name = name.into();
        check_extra_name(&name, &self.extra_files[..])?;
        self.extra_files.push((name, bytes));
        Ok(self)
    }

    /// Sum of the tensors' byte sizes.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.data.len() as u64).sum()
    }

    /// Checks names, sizes and uniqueness (for checkpoints built without [`Checkpoint::add`]).
    pub fn validate(&self) -> Result<()> {
        for (i, (name, _)) in self.extra_files.iter().enumerate() {
            check_extra_name(name, &self.extra_files[..i])?;
        }
        let mut seen = HashSet::with_capacity(self.tensors.len());
        for t in &self.tensors {
            check_tensor_name(&t.name)?;
            if !seen.insert(t.name.as_str()) {
                return Err(Error::InvalidCheckpoint(format!("tensor {:?} appears twice", t.name)));
            }
            match t.dtype.byte_len(&t.shape) {
                Some(n) if n == t.data.len() as u64 => {}
                Some(n) => {
                    return Err(Error::InvalidCheckpoint(format!(
                        "tensor {:?}: {} {:?} needs {n} bytes, got {}",
                        t.name,
                        t.dtype,
                        t.shape,
                        t.data.len()
                    )))
                }
                None => {
                    return Err(Error::InvalidCheckpoint(format!(
                        "tensor {:?}: shape {:?} of {} overflows or is not a whole number of bytes",
                        t.name, t.shape, t.dtype
                    )))
                }
            }
        }
        Ok(())
    }
}

/// A tensor name must not be empty nor the safetensors header's reserved key.
fn check_tensor_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidCheckpoint("a tensor has an empty name".into()));
    }
    if name == crate::format::header::METADATA_KEY {
        return Err(Error::InvalidCheckpoint(format!(
            "{name:?} cannot be a tensor name: safetensors reserves it for the header's metadata"
        )));
    }
    Ok(())
}

/// An extra file's name must be safe and not among `earlier`.
fn check_extra_name(name: &str, earlier: &[(String, &[u8])]) -> Result<()> {
    crate::format::check_extra_file_name(name)
        .map_err(|_| Error::InvalidCheckpoint(format!("unsafe extra file name {name:?}")))?;
    if earlier.iter().any(|(n, _)| n == name) {
        return Err(Error::InvalidCheckpoint(format!("extra file {name:?} added twice")));
    }
    Ok(())
}

/// A tensor read back from disk. `data` is a view into the aligned read buffer: no copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedTensor {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// The bytes.
    pub data: Bytes,
}

/// What a load returns.
#[derive(Debug, Clone)]
pub struct LoadedCheckpoint {
    /// Tensors, in manifest order (shard by shard, in file order).
    pub tensors: Vec<LoadedTensor>,
    /// The user metadata saved with the checkpoint.
    pub metadata: BTreeMap<String, String>,
    /// The extra files (name, bytes), in manifest order, their sizes and CRCs checked.
    pub extra_files: Vec<(String, Bytes)>,
    /// How the load went.
    pub report: LoadReport,
}

impl LoadedCheckpoint {
    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&LoadedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of the extra file called `name`.
    pub fn extra_file(&self, name: &str) -> Option<&Bytes> {
        self.extra_files.iter().find(|(n, _)| n == name).map(|(_, b)| b)
    }
}

/// Figures of one save.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SaveReport {
    /// The committed checkpoint directory.
    pub path: PathBuf,
    /// Sum of tensor bytes.
    pub data_bytes: u64,
    /// Bytes of the shard files (headers included).
    pub file_bytes: u64,
    /// Shard files written.
    pub shards: usize,
    /// Tensors written.
    pub tensors: usize,
    /// Seconds from the call until the checkpoint was committed and durable.
    pub seconds: f64,
    /// Seconds spent in the commit step (manifest, fsyncs, rename).
    pub commit_seconds: f64,
    /// Seconds the caller had to keep the sources unchanged: from the call until every byte
    /// was staged (copied out of the sources, or written where it went to disk without a
    /// copy). A synchronous save stalls for all of `seconds`; an asynchronous one
    /// ([`crate::AsyncCheckpointIO`]) only until its `staged()` completion.
    pub stall_seconds: f64,
    /// Wall-clock seconds during which at least one copy out of a source was running: the
    /// staging copies of the shard writers (host memcpy with CRC, or
    /// [`crate::source::TensorSource::copy_to`] of a device), and in `snapshot` mode the
    /// copy of the whole checkpoint into host memory. Copies on several threads at once
    /// count once.
    pub copy_seconds: f64,
    /// Wall-clock seconds during which at least one write was in flight in an engine (from
    /// submission until its completion was seen; fsyncs not included).
    pub write_seconds: f64,
    /// How much copying and writing overlapped: `(copy + write - busy) / min(copy, write)`
    /// where `busy` is the time either was running: 1 when the shorter one was entirely
    /// hidden behind the other, 0 when they ran one after the other (or either is zero).
    pub overlap_ratio: f64,
    /// `file_bytes / seconds`, MiB/s.
    pub throughput_mib_s: f64,
    /// Bytes written straight from tensor memory (no staging copy).
    pub zero_copy_bytes: u64,
    /// Bytes copied through staging buffers.
    pub staged_bytes: u64,
    /// The engine and its fallbacks.
    pub engine: EngineReport,
    /// Per-write completion latency.
    pub write_latency: LatencySummary,
    /// Writes completed.
    pub writes: u64,
    /// io_uring_enter calls that submitted (0 for other engines).
    pub submit_calls: u64,
    /// SQEs those calls submitted.
    pub sqes_submitted: u64,
}

/// Figures of one load.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    /// Tensor bytes handed out.
    pub data_bytes: u64,
    /// Bytes read from disk.
    pub read_bytes: u64,
    /// Seconds from the call until everything was read and verified.
    pub seconds: f64,
    /// `read_bytes / seconds`, MiB/s.
    pub throughput_mib_s: f64,
    /// Whether each tensor's CRC was checked.
    pub verified: bool,
    /// The engine and its fallbacks.
    pub engine: EngineReport,
    /// Per-read completion latency.
    pub read_latency: LatencySummary,
}

/// MiB/s of `bytes` moved in `seconds`.
pub(crate) fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / (1024.0 * 1024.0) / seconds
    } else {
        0.0
    }
}
