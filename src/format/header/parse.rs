//! Strict parsing of a shard's file prefix into a [`ParsedHeader`].

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Deserialize;

use super::layout::{check_entry, TensorEntry};
use super::raw::{RawHeader, RawMeta, RawValue};
use super::{CRC_KEY_PREFIX, LEN_FIELD, MAX_HEADER_LEN};
use crate::format::{Dtype, FormatError};

/// Reads the header length `n` from the first 8 bytes and returns the prefix length `8 + n`.
///
/// Errors: fewer than 8 bytes, `n < 2`, or `n > MAX_HEADER_LEN`.
pub fn header_prefix_len(first8: &[u8]) -> Result<u64, FormatError> {
    let Some(len_bytes) = first8.get(..8) else {
        return Err(FormatError::PrefixTooShort { len: first8.len() as u64, need: LEN_FIELD });
    };
    let mut buf = [0u8; 8];
    buf.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(buf);
    if n < 2 {
        return Err(FormatError::HeaderTooShort { len: n });
    }
    if n > MAX_HEADER_LEN {
        return Err(FormatError::HeaderTooLarge { len: n, max: MAX_HEADER_LEN });
    }
    Ok(LEN_FIELD + n)
}

/// A header that passed [`parse_header`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedHeader {
    /// Tensors sorted by data offset (ties in header order).
    pub tensors: Vec<TensorEntry>,
    /// Parallel to `tensors`: the stored CRC-32, or `None` when the file has no `crc32:` key
    /// for the tensor (a foreign safetensors file).
    pub crcs: Vec<Option<u32>>,
    /// `__metadata__` without the `crc32:` keys.
    pub metadata: BTreeMap<String, String>,
    /// Offset of the data region in the file: `8 + n`.
    pub data_start: u64,
    /// Bytes of the data region: the end of the last tensor.
    pub data_len: u64,
}

/// Strictly parses a header prefix (at least `8 + n` bytes; bytes beyond are ignored) of a
/// file of `file_len` bytes.
///
/// Checks, in order: `n` within `2..=MAX_HEADER_LEN`; the header within the file; the buffer
/// long enough; UTF-8; the JSON starts with `{` (as upstream requires; trailing whitespace is
/// allowed); a JSON object with no duplicate key at any level that matters (tensor names,
/// `__metadata__`, metadata keys); each tensor entry has exactly `dtype` (known), `shape`
/// (u64s) and `data_offsets` `[begin, end]` with `begin <= end` and `end - begin` equal to the
/// overflow-checked byte size of shape x dtype; `__metadata__` is absent, `null` or an object
/// of strings; tensors sorted by `(begin, end)` are contiguous from 0 with no gap or overlap
/// and end within the file; `data_start + data_len == file_len` exactly; `crc32:` values are
/// exactly 8 hex digits (either case) and name an existing tensor.
pub fn parse_header(prefix: &[u8], file_len: u64) -> Result<ParsedHeader, FormatError> {
    let data_start = header_prefix_len(prefix)?;
    if data_start > file_len {
        return Err(FormatError::HeaderBeyondFile { header_end: data_start, file_len });
    }
    let short = || FormatError::PrefixTooShort { len: prefix.len() as u64, need: data_start };
    let end = usize::try_from(data_start).map_err(|_| short())?;
    let json_bytes = prefix.get(LEN_FIELD as usize..end).ok_or_else(short)?;
    let text =
        std::str::from_utf8(json_bytes).map_err(|e| FormatError::NotUtf8 { valid_up_to: e.valid_up_to() })?;
    if !text.starts_with('{') {
        return Err(FormatError::NotJsonObject);
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let raw = RawHeader::deserialize(&mut de)
        .and_then(|raw| de.end().map(|()| raw))
        .map_err(|e| FormatError::Json(e.to_string()))?;

    // __metadata__: at most once, strings only, no duplicate keys; split off the CRCs.
    let mut metadata = BTreeMap::new();
    let mut crc_values: Vec<(String, String)> = Vec::new();
    let mut meta_seen = false;
    let mut seen: HashSet<&str> = HashSet::with_capacity(raw.entries.len());
    let mut raw_tensors = Vec::with_capacity(raw.entries.len());
    for (key, value) in &raw.entries {
        match value {
            RawValue::Meta(meta) => {
                if meta_seen {
                    return Err(FormatError::DuplicateKey(key.clone()));
                }
                meta_seen = true;
                let RawMeta::Pairs(pairs) = meta else {
                    return Err(FormatError::MetadataNotObject);
                };
                let mut meta_keys: HashSet<&str> = HashSet::with_capacity(pairs.len());
                for (k, v) in pairs {
                    if !meta_keys.insert(k) {
                        return Err(FormatError::DuplicateKey(k.clone()));
                    }
                    let Some(v) = v else {
                        return Err(FormatError::MetadataNotString { key: k.clone() });
                    };
                    match k.strip_prefix(CRC_KEY_PREFIX) {
                        Some(tensor) => crc_values.push((tensor.to_owned(), v.clone())),
                        None => {
                            metadata.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            RawValue::Tensor(t) => {
                if !seen.insert(key) {
                    return Err(FormatError::DuplicateKey(key.clone()));
                }
                if key.is_empty() {
                    return Err(FormatError::EmptyName);
                }
                let Some(dtype) = Dtype::parse(&t.dtype) else {
                    return Err(FormatError::UnknownDtype { tensor: key.clone(), dtype: t.dtype.clone() });
                };
                let entry = TensorEntry {
                    name: key.clone(),
                    dtype,
                    shape: t.shape.clone(),
                    data_offsets: t.data_offsets,
                };
                check_entry(&entry)?;
                raw_tensors.push(entry);
            }
        }
    }
    drop(seen);
    let mut tensors = raw_tensors;
    tensors.sort_by_key(|t| t.data_offsets); // stable: ties keep header order

    // Contiguous from 0, within the file, and no trailing bytes.
    let available = file_len - data_start;
    let mut data_len = 0u64;
    for t in &tensors {
        let (begin, end) = t.data_offsets;
        if begin != data_len {
            return Err(FormatError::NotContiguous {
                tensor: t.name.clone(),
                expected_start: data_len,
                actual_start: begin,
            });
        }
        if end > available {
            return Err(FormatError::OutOfRange { tensor: t.name.clone(), end, data_len: available });
        }
        data_len = end;
    }
    if data_len != available {
        return Err(FormatError::FileLength { expected: data_start + data_len, actual: file_len });
    }

    // CRCs: each names a tensor and is 8 hex digits.
    let index: HashMap<&str, usize> = tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
    let mut crcs = vec![None; tensors.len()];
    for (tensor, value) in crc_values {
        let Some(&i) = index.get(tensor.as_str()) else {
            return Err(FormatError::CrcForUnknownTensor(tensor));
        };
        let Some(crc) = parse_crc(&value) else {
            return Err(FormatError::BadCrc { tensor, value });
        };
        if let Some(slot) = crcs.get_mut(i) {
            *slot = Some(crc);
        }
    }

    Ok(ParsedHeader { tensors, crcs, metadata, data_start, data_len })
}

/// Exactly 8 hex digits (no sign, no prefix), either case: how the header and the manifest
/// store a CRC-32.
pub(in crate::format) fn parse_crc(value: &str) -> Option<u32> {
    if value.len() == 8 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        u32::from_str_radix(value, 16).ok()
    } else {
        None
    }
}
