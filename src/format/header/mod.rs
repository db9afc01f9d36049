//! Shard layout, header encoding and strict header parsing.
//!
//! A shard file is the 8-byte little-endian header length `n`, `n` bytes of JSON padded with
//! ASCII spaces, then the data region: the tensors' bytes packed in layout order with no
//! holes. `data_offsets` are relative to the start of the data region, as in safetensors.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{Dtype, FormatError};

/// The data region starts at a multiple of this many bytes from the start of the file.
pub const DATA_ALIGN: u64 = 4096;

/// The largest JSON header length accepted, as in upstream safetensors.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// `__metadata__` key prefix of per-tensor CRCs: `"crc32:<tensor name>"` maps to the CRC-32
/// (IEEE) of the tensor's bytes as 8 lowercase hex digits, e.g. `"0a1b2c3d"`.
pub const CRC_KEY_PREFIX: &str = "crc32:";

/// The reserved top-level header key for string metadata.
/// The header key safetensors reserves for metadata; no tensor may have this name.
pub const METADATA_KEY: &str = "__metadata__";

/// Length of the little-endian header length field.
const LEN_FIELD: u64 = 8;

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
            check_name(&spec.name)?;
            if !names.insert(&spec.name) {
                return Err(FormatError::DuplicateTensor(spec.name.clone()));
            }
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

fn check_name(name: &str) -> Result<(), FormatError> {
    if name.is_empty() {
        return Err(FormatError::EmptyName);
    }
    if name == METADATA_KEY {
        return Err(FormatError::ReservedTensorName(name.to_owned()));
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
fn check_entry(entry: &TensorEntry) -> Result<(), FormatError> {
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
fn check_layout(layout: &ShardLayout) -> Result<(), FormatError> {
    let mut names: HashSet<&str> = HashSet::with_capacity(layout.tensors.len());
    let mut expected_start = 0u64;
    for entry in &layout.tensors {
        check_name(&entry.name)?;
        if !names.insert(&entry.name) {
            return Err(FormatError::DuplicateTensor(entry.name.clone()));
        }
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

/// Appends `s` as a JSON string literal (quotes, backslashes and control characters escaped).
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Builds the whole file prefix of a shard: the u64 LE header length `n`, the JSON header,
/// then ASCII spaces so that the prefix length `8 + n` is a multiple of
/// `lcm(DATA_ALIGN, align)`.
///
/// `align` must be a power of two (the engine passes the file system's direct-I/O
/// alignment). The JSON has `"__metadata__"` first (user metadata plus `"crc32:<name>"` for
/// every tensor), then one `{"dtype","shape","data_offsets"}` entry per tensor in layout
/// order. With `crcs == None` every CRC is the placeholder `"00000000"`, so the prefix has
/// the same length as with the real CRCs: a writer reserves the space first and writes the
/// header last.
///
/// Errors: `align` not a power of two, a user metadata key starting with
/// [`CRC_KEY_PREFIX`], `crcs` without exactly one value per tensor, an inconsistent layout
/// (duplicate or empty names, wrong byte counts, holes, wrong `data_len`), or a header longer
/// than [`MAX_HEADER_LEN`].
pub fn encode_header(
    layout: &ShardLayout,
    crcs: Option<&[u32]>,
    metadata: &BTreeMap<String, String>,
    align: u64,
) -> Result<Vec<u8>, FormatError> {
    if !align.is_power_of_two() {
        return Err(FormatError::BadAlign(align));
    }
    if let Some(key) = metadata.keys().find(|k| k.starts_with(CRC_KEY_PREFIX)) {
        return Err(FormatError::ReservedMetadataKey(key.clone()));
    }
    if let Some(crcs) = crcs {
        if crcs.len() != layout.tensors.len() {
            return Err(FormatError::CrcCount { expected: layout.tensors.len(), actual: crcs.len() });
        }
    }
    check_layout(layout)?;

    let mut json = String::new();
    json.push_str("{\"__metadata__\":{");
    let mut first = true;
    for (key, value) in metadata {
        if !first {
            json.push(',');
        }
        first = false;
        push_json_str(&mut json, key);
        json.push(':');
        push_json_str(&mut json, value);
    }
    for (i, entry) in layout.tensors.iter().enumerate() {
        if !first {
            json.push(',');
        }
        first = false;
        push_json_str(&mut json, &format!("{CRC_KEY_PREFIX}{}", entry.name));
        let crc = crcs.and_then(|c| c.get(i).copied()).unwrap_or(0);
        json.push_str(&format!(":\"{crc:08x}\""));
    }
    json.push('}');
    for entry in &layout.tensors {
        json.push(',');
        push_json_str(&mut json, &entry.name);
        json.push_str(":{\"dtype\":\"");
        json.push_str(entry.dtype.as_str());
        json.push_str("\",\"shape\":[");
        for (i, dim) in entry.shape.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&dim.to_string());
        }
        let (begin, end) = entry.data_offsets;
        json.push_str(&format!("],\"data_offsets\":[{begin},{end}]}}"));
    }
    json.push('}');

    let unit = align.max(DATA_ALIGN); // lcm of two powers of two
    let too_large = |len: u64| FormatError::HeaderTooLarge { len, max: MAX_HEADER_LEN };
    let json_len = json.len() as u64;
    if json_len > MAX_HEADER_LEN {
        return Err(too_large(json_len));
    }
    // Both terms are small here: json_len <= MAX_HEADER_LEN and unit <= 2^63.
    let total = (LEN_FIELD + json_len).checked_next_multiple_of(unit).ok_or_else(|| too_large(json_len))?;
    let n = total - LEN_FIELD;
    if n > MAX_HEADER_LEN {
        return Err(too_large(n));
    }
    let total = usize::try_from(total).map_err(|_| too_large(n))?;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.resize(total, b' ');
    Ok(out)
}

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

/// Exactly 8 hex digits (no sign, no prefix).
fn parse_crc(value: &str) -> Option<u32> {
    if value.len() == 8 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        u32::from_str_radix(value, 16).ok()
    } else {
        None
    }
}

/// The header's top-level object, keys in file order, duplicates kept for the caller to see.
struct RawHeader {
    entries: Vec<(String, RawValue)>,
}

enum RawValue {
    Meta(RawMeta),
    Tensor(RawTensor),
}

/// `__metadata__` as found: key/value pairs in order (`None` for a non-string value), or
/// something other than an object.
enum RawMeta {
    Pairs(Vec<(String, Option<String>)>),
    NotObject,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeaderVisitor;

        impl<'de> Visitor<'de> for HeaderVisitor {
            type Value = RawHeader;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a safetensors header object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = if key == METADATA_KEY {
                        RawValue::Meta(map.next_value::<RawMeta>()?)
                    } else {
                        RawValue::Tensor(map.next_value::<RawTensor>()?)
                    };
                    entries.push((key, value));
                }
                Ok(RawHeader { entries })
            }
        }

        deserializer.deserialize_map(HeaderVisitor)
    }
}

/// A metadata value: a string, or `None` for any other JSON value (skipped over).
struct MaybeString(Option<String>);

impl<'de> Deserialize<'de> for MaybeString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;

        impl<'de> Visitor<'de> for V {
            type Value = MaybeString;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaybeString, E> {
                Ok(MaybeString(Some(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<MaybeString, E> {
                Ok(MaybeString(Some(v)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<MaybeString, E> {
                Ok(MaybeString(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MaybeString, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeString(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MaybeString, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeString(None))
            }
        }

        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawMeta {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;

        impl<'de> Visitor<'de> for V {
            type Value = RawMeta;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawMeta, A::Error> {
                let mut pairs = Vec::new();
                while let Some((k, MaybeString(v))) = map.next_entry::<String, MaybeString>()? {
                    pairs.push((k, v));
                }
                Ok(RawMeta::Pairs(pairs))
            }
            // `null` is what upstream accepts for "no metadata".
            fn visit_unit<E: de::Error>(self) -> Result<RawMeta, E> {
                Ok(RawMeta::Pairs(Vec::new()))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<RawMeta, E> {
                Ok(RawMeta::NotObject)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<RawMeta, E> {
                Ok(RawMeta::NotObject)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<RawMeta, E> {
                Ok(RawMeta::NotObject)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<RawMeta, E> {
                Ok(RawMeta::NotObject)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<RawMeta, E> {
                Ok(RawMeta::NotObject)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawMeta, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RawMeta::NotObject)
            }
        }

        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: Dtype, shape: &[u64]) -> TensorSpec {
        TensorSpec { name: name.to_owned(), dtype, shape: shape.to_vec() }
    }

    #[test]
    fn layout_packs_in_order() {
        let layout = ShardLayout::new(vec![
            spec("a", Dtype::F32, &[2, 3]),
            spec("empty", Dtype::F16, &[0, 5]),
            spec("b", Dtype::U8, &[]),
        ]);
        let Ok(layout) = layout else { panic!("{layout:?}") };
        let offsets: Vec<_> = layout.tensors.iter().map(|t| t.data_offsets).collect();
        assert_eq!(offsets, vec![(0, 24), (24, 24), (24, 25)]);
        assert_eq!(layout.data_len, 25);
        assert!(layout.tensors[1].is_empty());
        assert_eq!(layout.tensors[0].len(), 24);
    }

    #[test]
    fn layout_rejects_bad_specs() {
        let dup = ShardLayout::new(vec![spec("a", Dtype::U8, &[1]), spec("a", Dtype::U8, &[1])]);
        assert_eq!(dup, Err(FormatError::DuplicateTensor("a".into())));
        assert_eq!(ShardLayout::new(vec![spec("", Dtype::U8, &[1])]), Err(FormatError::EmptyName));
        assert_eq!(
            ShardLayout::new(vec![spec("__metadata__", Dtype::U8, &[1])]),
            Err(FormatError::ReservedTensorName("__metadata__".into()))
        );
        assert_eq!(
            ShardLayout::new(vec![spec("x", Dtype::F32, &[u64::MAX])]),
            Err(FormatError::ShapeOverflow { tensor: "x".into() })
        );
        assert!(matches!(
            ShardLayout::new(vec![spec("x", Dtype::F4, &[3])]),
            Err(FormatError::PartialByte { .. })
        ));
        // Each fits (the bit count of a U8 tensor caps it at u64::MAX / 8), nine do not.
        let specs = (0..9).map(|i| spec(&format!("t{i}"), Dtype::U8, &[u64::MAX / 8])).collect();
        assert_eq!(ShardLayout::new(specs), Err(FormatError::ShapeOverflow { tensor: "t8".into() }));
    }

    #[test]
    fn encode_small_header_exactly() {
        let Ok(layout) = ShardLayout::new(vec![spec("w\"\\\n", Dtype::BF16, &[2])]) else { panic!() };
        let meta = BTreeMap::from([("k".to_owned(), "v".to_owned())]);
        let Ok(prefix) = encode_header(&layout, Some(&[0xdead_beef]), &meta, 1) else { panic!() };
        assert_eq!(prefix.len(), 4096);
        let json = r#"{"__metadata__":{"k":"v","crc32:w\"\\\n":"deadbeef"},"w\"\\\n":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#;
        assert_eq!(&prefix[..8], &4088u64.to_le_bytes());
        assert_eq!(&prefix[8..8 + json.len()], json.as_bytes());
        assert!(prefix[8 + json.len()..].iter().all(|&b| b == b' '));
        let value: Result<serde_json::Value, _> = serde_json::from_slice(&prefix[8..]);
        assert!(value.is_ok());
    }

    #[test]
    fn encode_rejects_bad_input() {
        let Ok(layout) = ShardLayout::new(vec![spec("a", Dtype::U8, &[3])]) else { panic!() };
        let none = BTreeMap::new();
        assert_eq!(encode_header(&layout, None, &none, 0), Err(FormatError::BadAlign(0)));
        assert_eq!(encode_header(&layout, None, &none, 3000), Err(FormatError::BadAlign(3000)));
        assert_eq!(
            encode_header(&layout, Some(&[]), &none, 1),
            Err(FormatError::CrcCount { expected: 1, actual: 0 })
        );
        let reserved = BTreeMap::from([("crc32:a".to_owned(), "00000000".to_owned())]);
        assert_eq!(
            encode_header(&layout, None, &reserved, 1),
            Err(FormatError::ReservedMetadataKey("crc32:a".into()))
        );
        let mut holey = layout.clone();
        holey.tensors[0].data_offsets = (1, 4);
        holey.data_len = 4;
        assert!(matches!(encode_header(&holey, None, &none, 1), Err(FormatError::NotContiguous { .. })));
        let mut wrong_len = layout;
        wrong_len.data_len = 7;
        assert_eq!(
            encode_header(&wrong_len, None, &none, 1),
            Err(FormatError::FileLength { expected: 3, actual: 7 })
        );
    }

    #[test]
    fn large_alignment_and_empty_shard() {
        let Ok(layout) = ShardLayout::new(Vec::new()) else { panic!() };
        let none = BTreeMap::new();
        let Ok(prefix) = encode_header(&layout, None, &none, 1 << 16) else { panic!() };
        assert_eq!(prefix.len(), 1 << 16);
        let parsed = parse_header(&prefix, prefix.len() as u64);
        let Ok(parsed) = parsed else { panic!("{parsed:?}") };
        assert!(parsed.tensors.is_empty());
        assert_eq!(parsed.data_start, 1 << 16);
        assert_eq!(parsed.data_len, 0);
    }

    #[test]
    fn prefix_len_limits() {
        assert_eq!(header_prefix_len(&2u64.to_le_bytes()), Ok(10));
        assert_eq!(header_prefix_len(&1u64.to_le_bytes()), Err(FormatError::HeaderTooShort { len: 1 }));
        assert_eq!(
            header_prefix_len(&(MAX_HEADER_LEN + 1).to_le_bytes()),
            Err(FormatError::HeaderTooLarge { len: MAX_HEADER_LEN + 1, max: MAX_HEADER_LEN })
        );
        assert_eq!(header_prefix_len(&[0; 7]), Err(FormatError::PrefixTooShort { len: 7, need: 8 }));
    }

    #[test]
    fn crc_digits() {
        assert_eq!(parse_crc("0a1B2c3d"), Some(0x0a1b_2c3d));
        assert_eq!(parse_crc("+a1b2c3d"), None);
        assert_eq!(parse_crc("0a1b2c3"), None);
        assert_eq!(parse_crc("0a1b2c3d0"), None);
        assert_eq!(parse_crc("xyzxyzxy"), None);
    }
}
