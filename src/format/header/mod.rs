//! Shard layout, header encoding and strict header parsing.
//!
//! A shard file is the 8-byte little-endian header length `n`, `n` bytes of JSON padded with
//! ASCII spaces (to a multiple of [`DATA_ALIGN`], plus a phase below it), then the data region: the tensors' bytes packed in layout order with no
//! holes. `data_offsets` are relative to the start of the data region, as in safetensors.
//!
//! `layout` places tensors ([`ShardLayout`]) and checks entries, `encode` builds the file
//! prefix ([`encode_header`]), `parse` checks one strictly ([`parse_header`]) on top of
//! `raw`, the serde shapes of the JSON as found.

mod encode;
mod layout;
mod parse;
mod raw;
#[cfg(test)]
mod tests;

pub use encode::{encode_header, encode_header_with_phase};
pub use layout::{ShardLayout, TensorEntry, TensorSpec};
pub(super) use parse::parse_crc;
pub use parse::{header_prefix_len, parse_header, ParsedHeader};

/// The data region starts `phase` bytes past a multiple of this many bytes from the start of
/// the file (`phase` below it; 0 unless the writer chose otherwise, see
/// [`encode_header_with_phase`]).
pub const DATA_ALIGN: u64 = 4096;

/// A data-region phase is a multiple of this, so the data region stays 8-byte aligned (as
/// upstream safetensors writes it, and as dtypes up to 8 bytes want when a file is mapped).
pub const PHASE_ALIGN: u64 = 8;

/// The largest JSON header length accepted, as in upstream safetensors.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// `__metadata__` key prefix of per-tensor CRCs: `"crc32:<tensor name>"` maps to the CRC-32
/// (IEEE) of the tensor's bytes as 8 lowercase hex digits, e.g. `"0a1b2c3d"`.
pub const CRC_KEY_PREFIX: &str = "crc32:";

/// The top-level header key safetensors reserves for string metadata; no tensor may have
/// this name.
pub const METADATA_KEY: &str = "__metadata__";

/// Length of the little-endian header length field.
const LEN_FIELD: u64 = 8;
