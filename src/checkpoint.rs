//! What a checkpoint holds: named tensors and string metadata, on the way in (borrowed
//! views) and on the way out (loaded `Bytes`), plus the reports of a save and a load.

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::format::Dtype;
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
#[derive(Debug, Clone)]
pub struct Checkpoint<'a> {
    /// Tensors in the order they are laid out on disk.
    pub tensors: Vec<TensorView<'a>>,
    /// String metadata stored in the manifest (and each shard's `__metadata__`).
    pub metadata: BTreeMap<String, String>,
    /// Small non-tensor files (name, bytes) written into the checkpoint directory before the
    /// manifest and listed in it with their size and CRC-32: part of the atomic commit.
    pub extra_files: Vec<(String, &'a [u8])>,
    /// Whether a (single-process) save also writes `model.safetensors.index.json`
    /// ([`HF_INDEX_FILE`](crate::format::HF_INDEX_FILE)), so that Hugging Face tooling loads
    /// the directory as a sharded checkpoint whose tensor names are these tensors' names.
    /// Default true; without tensors no index is written. An extra file of that name is
    /// then refused.
    pub hf_index: bool,
}

impl Default for Checkpoint<'_> {
    fn default() -> Self {
        Checkpoint { tensors: Vec::new(), metadata: BTreeMap::new(), extra_files: Vec::new(), hf_index: true }
    }
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
        check_new_tensor(&name, dtype, shape, data.len(), self.tensors.iter().map(|t| t.name.as_str()))?;
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
            if self.hf_index && name == crate::format::HF_INDEX_FILE {
                return Err(Error::InvalidCheckpoint(format!(
                    "extra file {name:?}: the save writes that index itself (set hf_index to false \
                     to write your own)"
                )));
            }
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

/// The checks of adding one tensor: a usable name not among `existing`, and exactly the
/// bytes `dtype` x `shape` needs.
pub(crate) fn check_new_tensor<'n>(
    name: &str,
    dtype: Dtype,
    shape: &[u64],
    len: usize,
    mut existing: impl Iterator<Item = &'n str>,
) -> Result<()> {
    check_tensor_name(name)?;
    let expected = dtype.byte_len(shape).ok_or_else(|| {
        Error::InvalidCheckpoint(format!("tensor {name:?}: shape {shape:?} of {dtype} overflows"))
    })?;
    if expected != len as u64 {
        return Err(Error::InvalidCheckpoint(format!(
            "tensor {name:?}: {dtype} {shape:?} needs {expected} bytes, got {len}"
        )));
    }
    if existing.any(|t| t == name) {
        return Err(Error::InvalidCheckpoint(format!("tensor {name:?} added twice")));
    }
    Ok(())
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

pub use crate::report::{LoadReport, SaveReport};
