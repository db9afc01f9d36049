//! uring-ckpt: deep-learning checkpoints written and read at the speed of the disk.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(test)]
mod architecture;
pub mod config;
pub mod error;
mod failpoint;
pub mod format;
pub mod inspect;

pub use error::{Error, Result};
pub mod background;
pub mod checkpoint;
pub mod checkpoint_io;
pub mod io;
pub mod load;
pub mod report;
pub mod retention;
pub mod save;
pub mod sink;
pub mod source;
pub mod store;
pub mod synthetic;

pub use background::{
    AsyncCheckpointIO, AsyncOptions, Durable, OwnedCheckpoint, OwnedTensor, SaveHandle, SnapshotStats, Staged,
};
pub use checkpoint::{Checkpoint, LoadReport, LoadedCheckpoint, LoadedTensor, SaveReport, TensorView};
pub use checkpoint_io::{CheckpointIO, LoadOptions, RankShards, TensorLocation, UringCheckpointIO};
pub use config::{AsyncMode, Config, EngineKind, FsyncPolicy};
pub use format::Dtype;

#[doc(hidden)]
pub use source as staging;
/// The directory protocol's modules, also at the top level where they used to live.
pub use store::{commit, lock}; // TEMPORARY until io/pool.rs tests are updated

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
