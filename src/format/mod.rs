//! Safetensors-compatible shard headers and the checkpoint manifest. Pure code, no I/O.
//!
//! A shard file is `u64 LE n`, `n` bytes of JSON header padded with spaces so that the data
//! region starts at a chosen phase past a 4096-byte offset (0, or where the tensors' memory
//! sits past a page boundary, so that the writer can send them to disk without a copy), then the tensors' bytes packed with no holes. The
//! upstream `safetensors` library loads it unchanged. Per-tensor CRC-32 values live in the
//! header's `__metadata__` under `"crc32:<tensor name>"`.
//!
//! [`encode_header`] builds the file prefix, [`parse_header`] checks one strictly,
//! [`Manifest`] describes a whole checkpoint directory, and [`parse_index`] reads the
//! `model.safetensors.index.json` of a sharded Hugging Face checkpoint.

pub mod dtype;
pub mod header;
pub mod index;
pub mod manifest;

pub use dtype::{Dtype, ParseDtypeError};
pub use header::{
    encode_header, encode_header_with_phase, header_prefix_len, parse_header, ParsedHeader, ShardLayout,
    TensorEntry, TensorSpec, CRC_KEY_PREFIX, DATA_ALIGN, MAX_HEADER_LEN, PHASE_ALIGN,
};
pub use index::{encode_index, parse_index, SafetensorsIndex, HF_INDEX_FILE, INDEX_SUFFIX, MAX_INDEX_LEN};
pub use manifest::{
    check_extra_file_name, check_shard_name, ExtraFileInfo, Manifest, ShardInfo, FORMAT_NAME, FORMAT_VERSION,
    MANIFEST_FILE, MAX_MANIFEST_LEN,
};

/// Why a header or manifest is invalid (or why a layout cannot be encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The buffer holds fewer bytes than needed: fewer than the 8-byte length, or fewer
    /// than the `8 + n` bytes of the header prefix.
    #[error("header buffer holds {len} bytes, {need} are needed")]
    PrefixTooShort {
        /// Bytes given.
        len: u64,
        /// Bytes needed.
        need: u64,
    },
    /// The declared JSON header length `n` is below 2 (the smallest JSON object, `{}`).
    #[error("header length {len} is too short for a JSON object")]
    HeaderTooShort {
        /// The declared header length.
        len: u64,
    },
    /// The declared JSON header length exceeds the cap.
    #[error("header length {len} exceeds the maximum of {max}")]
    HeaderTooLarge {
        /// The declared header length.
        len: u64,
        /// The cap ([`MAX_HEADER_LEN`]).
        max: u64,
    },
    /// The header would end past the end of the file.
    #[error("header ends at byte {header_end} but the file has {file_len} bytes")]
    HeaderBeyondFile {
        /// `8 + n`.
        header_end: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The header (or manifest) is not UTF-8.
    #[error("not valid UTF-8 after byte {valid_up_to}")]
    NotUtf8 {
        /// Length of the valid UTF-8 prefix.
        valid_up_to: usize,
    },
    /// The header does not start with `{`.
    #[error("header is not a JSON object (it must start with '{{')")]
    NotJsonObject,
    /// The JSON is malformed or has the wrong shape; the message is serde_json's.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// A JSON object has the same key twice (a tensor, `__metadata__`, a metadata key).
    #[error("duplicate JSON key {0:?}")]
    DuplicateKey(String),
    /// A tensor's dtype is not a safetensors dtype.
    #[error("tensor {tensor:?} has unknown dtype {dtype:?}")]
    UnknownDtype {
        /// The tensor.
        tensor: String,
        /// The dtype string found.
        dtype: String,
    },
    /// A tensor's element or bit count overflows a `u64`.
    #[error("tensor {tensor:?}: shape too large, its byte size overflows")]
    ShapeOverflow {
        /// The tensor.
        tensor: String,
    },
    /// A tensor's bit count is not a whole number of bytes (an odd number of `F4`, ...).
    #[error("tensor {tensor:?}: {bits} bits of {dtype} is not a whole number of bytes")]
    PartialByte {
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its total size in bits.
        bits: u64,
    },
    /// A tensor's `data_offsets` has begin after end.
    #[error("tensor {tensor:?}: data_offsets [{begin}, {end}] end before they begin")]
    BadOffsets {
        /// The tensor.
        tensor: String,
        /// First offset.
        begin: u64,
        /// Second offset.
        end: u64,
    },
    /// A tensor's `data_offsets` span differs from its shape x dtype size.
    #[error("tensor {tensor:?}: shape and dtype need {expected} bytes, data_offsets span {actual}")]
    ByteCountMismatch {
        /// The tensor.
        tensor: String,
        /// Bytes from shape and dtype.
        expected: u64,
        /// `end - begin`.
        actual: u64,
    },
    /// Tensors sorted by offset leave a gap or overlap (or a layout is out of order).
    #[error("tensor {tensor:?} starts at {actual_start}, expected {expected_start} (gap or overlap)")]
    NotContiguous {
        /// The tensor.
        tensor: String,
        /// Where it should start: the end of the previous tensor.
        expected_start: u64,
        /// Where it starts.
        actual_start: u64,
    },
    /// A tensor ends past the end of the file's data region (truncated file).
    #[error("tensor {tensor:?} ends at {end}, past the data region's {data_len} bytes")]
    OutOfRange {
        /// The tensor.
        tensor: String,
        /// Its end offset, relative to the data region.
        end: u64,
        /// Bytes of data region the file has.
        data_len: u64,
    },
    /// The file is longer than header plus tensors (trailing bytes), or a layout's
    /// `data_len` disagrees with its tensors.
    #[error("expected {expected} bytes, found {actual}")]
    FileLength {
        /// Length implied by the header or tensors.
        expected: u64,
        /// Length found.
        actual: u64,
    },
    /// A `crc32:` metadata value is not exactly 8 hex digits.
    #[error("tensor {tensor:?}: CRC value {value:?} is not 8 hex digits")]
    BadCrc {
        /// The tensor.
        tensor: String,
        /// The value found.
        value: String,
    },
    /// A `crc32:` metadata key names no tensor of the file.
    #[error("CRC for unknown tensor {0:?}")]
    CrcForUnknownTensor(String),
    /// A `__metadata__` value is not a string.
    #[error("metadata value for key {key:?} is not a string")]
    MetadataNotString {
        /// The key.
        key: String,
    },
    /// `__metadata__` is not a JSON object of strings.
    #[error("__metadata__ is not a JSON object")]
    MetadataNotObject,
    /// User metadata uses a key reserved for the format (starting with [`CRC_KEY_PREFIX`]).
    #[error("metadata key {0:?} is reserved")]
    ReservedMetadataKey(String),
    /// A tensor is named `__metadata__`.
    #[error("tensor name {0:?} is reserved")]
    ReservedTensorName(String),
    /// Two tensors have the same name.
    #[error("duplicate tensor {0:?}")]
    DuplicateTensor(String),
    /// A tensor has an empty name.
    #[error("empty tensor name")]
    EmptyName,
    /// An alignment that is not a power of two.
    #[error("alignment {0} is not a power of two")]
    BadAlign(u64),
    /// A data-region phase that is not below [`DATA_ALIGN`] or not a multiple of
    /// [`PHASE_ALIGN`].
    #[error("data phase {0} is not a multiple of 8 below 4096")]
    BadPhase(u64),
    /// The CRC list does not have one value per tensor.
    #[error("{actual} CRC values given for {expected} tensors")]
    CrcCount {
        /// Number of tensors.
        expected: usize,
        /// Number of CRC values.
        actual: usize,
    },
    /// A manifest is larger than [`MAX_MANIFEST_LEN`].
    #[error("manifest is {len} bytes, more than the maximum of {max}")]
    ManifestTooLarge {
        /// Its length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// A `*.safetensors.index.json` is malformed (too large, no or an empty `weight_map`, a
    /// `total_size` that is not a whole number); the message says how.
    #[error("invalid safetensors index: {0}")]
    BadIndex(String),
    /// A manifest's `format` is not [`FORMAT_NAME`].
    #[error("manifest format is {0:?}, expected \"uring-ckpt\"")]
    WrongFormat(String),
    /// A manifest's `version` is not [`FORMAT_VERSION`].
    #[error("manifest version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The version found.
        found: u64,
        /// The version this build reads.
        supported: u32,
    },
    /// A manifest is inconsistent; the message says how.
    #[error("invalid manifest: {0}")]
    BadManifest(String),
    /// A shard file name could escape the checkpoint directory or is otherwise unsafe.
    #[error("unsafe shard file name {0:?}")]
    UnsafeShardName(String),
    /// A manifest lists the same shard file twice.
    #[error("shard {0:?} listed twice")]
    DuplicateShard(String),
    /// A manifest's `weight_map` names a shard the manifest does not list.
    #[error("tensor {tensor:?} maps to unlisted shard {file:?}")]
    UnknownShard {
        /// The tensor.
        tensor: String,
        /// The shard file named.
        file: String,
    },
    /// A shard's `tensor_count` differs from the `weight_map` entries naming it.
    #[error("shard {file:?} claims {expected} tensors, weight_map names {actual}")]
    TensorCountMismatch {
        /// The shard file.
        file: String,
        /// Its `tensor_count`.
        expected: u64,
        /// `weight_map` entries naming it.
        actual: u64,
    },
}
