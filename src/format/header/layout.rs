//! Where tensors go in a shard's data region, and the checks every entry passes.

use std::collections::HashSet;

use super::METADATA_KEY;
use crate::format::{Dtype, FormatError};

/// A tensor to place in a shard: its name, dtype and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Unique, non-empty name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions; empty for a scalar.
    pub shape: Vec<u64>,
}

/// A tensor placed in a shard's data region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Unique, non-empty name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions; empty for a scalar.
    pub shape: Vec<u64>,
    /// `[begin, end)` byte offsets relative to the start of the data region.
    pub data_offsets: (u64, u64),
}

impl TensorEntry {
    /// Bytes of the tensor (`end - begin`; 0 if the offsets are reversed).
    pub fn len(&self) -> u64 {
        self.data_offsets.1.saturating_sub(self.data_offsets.0)
    }

    /// Whether the tensor has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where each tensor of a shard goes in its data region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    /// Tensors in data-region order, contiguous from offset 0.
    pub tensors: Vec<TensorEntry>,
    /// Bytes of the data region: the end of the last tensor.
    pub data_len: u64,
}

impl ShardLayout {
    /// Packs tensors in the given order with no holes.
    ///
    /// Errors: an empty name ([`FormatError::EmptyName`]), the reserved name `__metadata__`,
    /// a duplicate name, a shape whose byte size overflows or is not whole bytes, or a data
    /// region longer than `u64::MAX`.
    pub fn new(specs: Vec<TensorSpec>) -> Result<ShardLayout, FormatError> {
        let mut names: HashSet<&str> = HashSet::with_capacity(specs.len());
        for spec in &specs {
            check_name(&spec.name, &mut names)?;
        }
        drop(names);
        let mut tensors = Vec::with_capacity(specs.len());
        let mut offset = 0u64;
        for TensorSpec { name, dtype, shape } in specs {
            let size = tensor_size(&name, dtype, &shape)?;
            let Some(end) = offset.checked_add(size) else {
                return Err(FormatError::ShapeOverflow { tensor: name });
            };
            tensors.push(TensorEntry { name, dtype, shape, data_offsets: (offset, end) });
            offset = end;
        }
        Ok(ShardLayout { tensors, data_len: offset })
    }
}

/// Checks that `name` is a valid tensor name not in `seen`, and adds it there.
fn check_name<'a>(name: &'a str, seen: &mut HashSet<&'a str>) -> Result<(), FormatError> {
    if name.is_empty() {
        return Err(FormatError::EmptyName);
    }
    if name == METADATA_KEY {
        return Err(FormatError::ReservedTensorName(name.to_owned()));
    }
    if !seen.insert(name) {
        return Err(FormatError::DuplicateTensor(name.to_owned()));
    }
    Ok(())
}

/// Byte size of a tensor, with typed errors.
fn tensor_size(name: &str, dtype: Dtype, shape: &[u64]) -> Result<u64, FormatError> {
    let Some(bits) = dtype.bit_len(shape) else {
        return Err(FormatError::ShapeOverflow { tensor: name.to_owned() });
    };
    if bits % 8 != 0 {
        return Err(FormatError::PartialByte { tensor: name.to_owned(), dtype, bits });
    }
    Ok(bits / 8)
}

/// Checks one entry's own consistency: begin <= end and the span matches shape x dtype.
pub(super) fn check_entry(entry: &TensorEntry) -> Result<(), FormatError> {
    let (begin, end) = entry.data_offsets;
    if begin > end {
        return Err(FormatError::BadOffsets { tensor: entry.name.clone(), begin, end });
    }
    let size = tensor_size(&entry.name, entry.dtype, &entry.shape)?;
    if end - begin != size {
        return Err(FormatError::ByteCountMismatch {
            tensor: entry.name.clone(),
            expected: size,
            actual: end - begin,
        });
    }
    Ok(())
}

/// Checks a layout built by hand: names, sizes, contiguity in order, `data_len`.
pub(super) fn check_layout(layout: &ShardLayout) -> Result<(), FormatError> {
    let mut names: HashSet<&str> = HashSet::with_capacity(layout.tensors.len());
    let mut expected_start = 0u64;
    for entry in &layout.tensors {
        check_name(&entry.name, &mut names)?;
        check_entry(entry)?;
        if entry.data_offsets.0 != expected_start {
            return Err(FormatError::NotContiguous {
                tensor: entry.name.clone(),
                expected_start,
                actual_start: entry.data_offsets.0,
            });
        }
        expected_start = entry.data_offsets.1;
    }
    if layout.data_len != expected_start {
        return Err(FormatError::FileLength { expected: expected_start, actual: layout.data_len });
    }
    Ok(())
}
