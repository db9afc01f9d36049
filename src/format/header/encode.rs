//! Building a shard's file prefix: length, JSON header, padding to the data alignment.

use std::collections::BTreeMap;

use super::layout::{check_layout, ShardLayout};
use super::{CRC_KEY_PREFIX, DATA_ALIGN, LEN_FIELD, MAX_HEADER_LEN, PHASE_ALIGN};
use crate::format::FormatError;

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
    encode_header_with_phase(layout, crcs, metadata, align, 0)
}

/// [`encode_header`] with the data region starting `phase` bytes past a multiple of
/// `lcm(DATA_ALIGN, align)`: the prefix length `8 + n` is the smallest such multiple that
/// holds the 8 length bytes and the JSON, plus `phase`. The padding is ASCII spaces, so the
/// bytes from that multiple to the data region are spaces whatever the CRCs are (a writer
/// may send them ahead, with the first data bytes, and the rest of the header last).
///
/// A writer picks the phase at which its tensors' memory sits past a page boundary
/// (torch's allocator puts large tensors 64 bytes past one), so that memory address and file
/// offset agree modulo the direct-I/O alignment and the tensors go to disk without a copy.
///
/// Errors: those of [`encode_header`], and [`FormatError::BadPhase`] for a `phase` not below
/// [`DATA_ALIGN`] or not a multiple of [`PHASE_ALIGN`].
pub fn encode_header_with_phase(
    layout: &ShardLayout,
    crcs: Option<&[u32]>,
    metadata: &BTreeMap<String, String>,
    align: u64,
    phase: u64,
) -> Result<Vec<u8>, FormatError> {
    if !align.is_power_of_two() {
        return Err(FormatError::BadAlign(align));
    }
    if phase >= DATA_ALIGN || phase % PHASE_ALIGN != 0 {
        return Err(FormatError::BadPhase(phase));
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
    let total = (LEN_FIELD + json_len)
        .checked_next_multiple_of(unit)
        .and_then(|t| t.checked_add(phase))
        .ok_or_else(|| too_large(json_len))?;
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
