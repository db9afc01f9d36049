//! uring-ckpt: deep-learning checkpoints written and read at the speed of the disk.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod error;
pub mod format;

pub use error::{Error, Result};
