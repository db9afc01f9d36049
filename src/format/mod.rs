//! Safetensors-compatible shard headers and the checkpoint manifest. Pure code, no I/O.

/// Why a header or manifest is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Placeholder until the format module lands.
    #[error("invalid")]
    Invalid,
}
