//! What a background save holds on to: [`OwnedCheckpoint`], tensors whose sources live
//! behind `Arc`s, released as soon as the save no longer reads them.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::checkpoint::{check_new_tensor, Checkpoint, TensorData, TensorView};
use crate::error::Result;
use crate::format::Dtype;
use crate::source::TensorSource;

/// One tensor of an [`OwnedCheckpoint`]: the save keeps its source alive until staged.
#[derive(Clone)]
pub struct OwnedTensor {
    /// Unique name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions; empty for a scalar.
    pub shape: Vec<u64>,
    /// The bytes: host memory (`Vec<u8>`, [`Bytes`], [`crate::source::HostPtrSource`]), a
    /// simulated or CUDA device, ...
    pub source: Arc<dyn TensorSource>,
}

impl std::fmt::Debug for OwnedTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedTensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.source.len())
            .finish()
    }
}

/// A checkpoint whose tensors a background save can hold on to: sources behind `Arc`s.
#[derive(Debug, Clone)]
pub struct OwnedCheckpoint {
    /// Tensors in the order they are laid out on disk.
    pub tensors: Vec<OwnedTensor>,
    /// String metadata stored in the manifest.
    pub metadata: BTreeMap<String, String>,
    /// Small non-tensor files (name, bytes), committed with the shards (see
    /// [`Checkpoint::extra_files`]).
    pub extra_files: Vec<(String, Bytes)>,
    /// Whether the save also writes `model.safetensors.index.json` (see
    /// [`Checkpoint::hf_index`]); default true.
    pub hf_index: bool,
}

impl Default for OwnedCheckpoint {
    fn default() -> Self {
        OwnedCheckpoint {
            tensors: Vec::new(),
            metadata: BTreeMap::new(),
            extra_files: Vec::new(),
            hf_index: true,
        }
    }
}

impl OwnedCheckpoint {
    /// An empty checkpoint.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor after checking that the source has exactly the size `dtype` x `shape`
    /// needs and that the name is new.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        dtype: Dtype,
        shape: &[u64],
        source: Arc<dyn TensorSource>,
    ) -> Result<&mut Self> {
        let name = name.into();
        check_new_tensor(&name, dtype, shape, source.len(), self.tensors.iter().map(|t| t.name.as_str()))?;
        self.tensors.push(OwnedTensor { name, dtype, shape: shape.to_vec(), source });
        Ok(self)
    }

    /// Adds a tensor of host bytes (a `Vec<u8>`, [`Bytes`], `&'static [u8]`, ...).
    pub fn add_bytes(
        &mut self,
        name: impl Into<String>,
        dtype: Dtype,
        shape: &[u64],
        bytes: impl Into<Bytes>,
    ) -> Result<&mut Self> {
        self.add(name, dtype, shape, Arc::new(bytes.into()))
    }

    /// Sets a metadata entry.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Adds a non-tensor file, with the checks of [`Checkpoint::add_extra_file`].
    pub fn add_extra_file(&mut self, name: impl Into<String>, bytes: impl Into<Bytes>) -> Result<&mut Self> {
        let (name, bytes) = (name.into(), bytes.into());
        self.as_checkpoint().add_extra_file(name.clone(), &bytes)?;
        self.extra_files.push((name, bytes));
        Ok(self)
    }

    /// Sum of the tensors' byte sizes.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.source.len() as u64).sum()
    }

    /// A borrowed view, for a synchronous [`CheckpointIO::save_checkpoint`].
    pub fn as_checkpoint(&self) -> Checkpoint<'_> {
        Checkpoint {
            tensors: self
                .tensors
                .iter()
                .map(|t| TensorView {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data: TensorData::Source(&*t.source),
                })
                .collect(),
            metadata: self.metadata.clone(),
            extra_files: self.extra_files.iter().map(|(n, b)| (n.clone(), &b[..])).collect(),
            hf_index: self.hf_index,
        }
    }
}
