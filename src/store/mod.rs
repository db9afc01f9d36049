//! The directory protocol, in one place: what a checkpoint's directory and its siblings are
//! called ([`names`]), how a checkpoint is opened and recognised ([`open`]), how any
//! safetensors checkpoint (a file, a directory, a Hugging Face index) is opened for reading
//! ([`foreign`]), how a save commits one atomically ([`commit`]), how saves of one path
//! exclude each other and clean up after crashed ones ([`lock`]), and how one is removed
//! ([`remove`]). Which
//! checkpoints to keep ([`crate::retention`]) sits above this layer and the loader.
//!
//! Everything a checkpoint directory holds may have been written by someone hostile: files
//! in it are opened through [`crate::io::Dir`] (no links, regular files only, reads capped),
//! and nothing is removed or replaced unless its manifest parses as ours.

pub mod commit;
pub mod foreign;
pub mod lock;
pub mod names;
pub mod open;
pub mod remove;

pub use commit::{fsync_dir, TempCheckpointDir};
pub use foreign::{identify, open_any, CheckpointKind, Opened, MAX_FOREIGN_SHARDS};
pub use lock::{clean_stale_rank_dirs, clean_stale_temp_dirs, SaveLock};
pub use names::{is_temporary_name, lock_path, split_target, TMP_MARKER};
pub use open::{ensure_checkpoint, open_checkpoint, read_manifest};
pub use remove::remove_checkpoint_dir;
