//! The crate's one error type: what failed, on which path, at which offset.

use std::io;
use std::path::PathBuf;

use crate::format::FormatError;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while saving, loading or checking a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed. `op` names what was being done.
    #[error("{op} {}{}: {source}", path.display(), offset_suffix(*offset))]
    Io {
        /// What was being done ("open", "write", "fdatasync", "rename", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// Byte offset in the file, when the operation had one.
        offset: Option<u64>,
        /// The operating system's error; test its `raw_os_error()`.
        #[source]
        source: io::Error,
    },
    /// A shard header or manifest did not parse.
    #[error("{}: {source}", path.display())]
    Format {
        /// The file that failed to parse.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: FormatError,
    },
    /// A tensor's bytes do not match the CRC-32 stored for it.
    #[error("CRC mismatch for tensor {tensor:?} in {}: stored {expected:08x}, computed {actual:08x}", path.display())]
    Crc {
        /// The shard file.
        path: PathBuf,
        /// The tensor whose bytes are wrong.
        tensor: String,
        /// The CRC stored in the header.
        expected: u32,
        /// The CRC of the bytes read.
        actual: u32,
    },
    /// The directory is not a committed checkpoint of ours: no manifest (an unfinished save,
    /// a foreign directory), a temporary directory, or (when removing or replacing) a
    /// manifest that is not ours.
    #[error("{} is not a valid checkpoint: {reason}", path.display())]
    NotACheckpoint {
        /// The directory.
        path: PathBuf,
        /// Why it is not one.
        reason: String,
    },
    /// The checkpoint's files do not match its manifest, or one of them is not what a
    /// checkpoint holds (a link, a FIFO, a device, a directory, a file longer than stated).
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong, naming the file.
        reason: String,
    },
    /// The destination of a load into existing memory does not match the checkpoint: every
    /// problem found (names missing on either side, sizes, dtypes, shapes), at once.
    #[error("{} does not match the destination: {}", path.display(), problems.join("; "))]
    Mismatch {
        /// The checkpoint.
        path: PathBuf,
        /// One line per problem, each naming the tensor.
        problems: Vec<String>,
    },
    /// Saving would replace an existing checkpoint and replacing was not asked for.
    #[error("{} already exists; pass replace_existing to replace it atomically", .0.display())]
    AlreadyExists(PathBuf),
    /// Another save of the same checkpoint path holds its lock (the lock file is named).
    #[error("{} is locked: another save to this checkpoint path is in progress", .0.display())]
    Locked(PathBuf),
    /// A configuration value is out of range or malformed.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The checkpoint handed to a save is malformed (duplicate names, wrong byte count, ...).
    #[error("invalid checkpoint: {0}")]
    InvalidCheckpoint(String),
    /// A tensor asked for by name is not in the checkpoint.
    #[error("tensor {0:?} is not in the checkpoint")]
    TensorNotFound(String),
    /// A feature (io_uring, O_DIRECT, CUDA) is not available on this system.
    #[error("{0} is unavailable")]
    Unavailable(String),
    /// An invariant of this library did not hold, or one of its threads panicked (a bug:
    /// please report it), or a result was taken twice.
    #[error("internal error: {0}")]
    Internal(String),
}

fn offset_suffix(offset: Option<u64>) -> String {
    offset.map(|o| format!(" at offset {o}")).unwrap_or_default()
}

impl Error {
    /// An I/O error with its context.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io { op, path: path.into(), offset: None, source }
    }

    /// An I/O error at a byte offset of a file.
    pub fn io_at(op: &'static str, path: impl Into<PathBuf>, offset: u64, source: io::Error) -> Self {
        Error::Io { op, path: path.into(), offset: Some(offset), source }
    }

    /// The errno behind this error, if it came from the operating system.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
