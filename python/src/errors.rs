//! Crate errors as Python exceptions: each [`Error`] variant maps to one `uring_ckpt`
//! exception class (defined in Python, in `uring_ckpt/_errors.py`), I/O errors to `OSError`
//! with their errno.

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::PyType;
use uring_ckpt::Error;

/// Converts a crate error into the matching `uring_ckpt` exception (defined in Python, in
/// `uring_ckpt/_errors.py`); I/O errors become `OSError` with their errno.
pub(crate) fn to_py_err(py: Python<'_>, err: Error) -> PyErr {
    let message = err.to_string();
    let class = match &err {
        Error::Io { source, path, .. } => {
            return match source.raw_os_error() {
                Some(errno) => PyOSError::new_err((errno, message, path.display().to_string())),
                None => PyOSError::new_err(message),
            };
        }
        // A checkpoint whose files do not match its manifest is damaged; a directory without
        // a manifest of ours is not a checkpoint.
        Error::Format { .. } | Error::Crc { .. } | Error::Corrupt { .. } => "CorruptCheckpointError",
        Error::NotACheckpoint { .. } => "NotACheckpointError",
        Error::AlreadyExists(_) => "CheckpointExistsError",
        Error::Config(_) => "ConfigError",
        Error::InvalidCheckpoint(_) => "InvalidCheckpointError",
        Error::Mismatch { .. } => "CheckpointMismatchError",
        Error::TensorNotFound(_) => "TensorNotFoundError",
        Error::Unavailable(_) => "UnavailableError",
        Error::Locked(_) => "CheckpointLockedError",
        Error::Internal(_) => "CheckpointError",
    };
    match py
        .import("uring_ckpt._errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| Ok(c.cast_into::<PyType>()?))
    {
        Ok(ty) => PyErr::from_type(ty, message),
        Err(import_error) => import_error,
    }
}

/// A crate result raised as its Python exception ([`to_py_err`]).
pub(crate) trait OrRaise<T> {
    /// The value, or the error as the matching `uring_ckpt` exception.
    fn or_raise(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> OrRaise<T> for uring_ckpt::Result<T> {
    fn or_raise(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py_err(py, e))
    }
}
