//! Removing a committed checkpoint atomically: renamed away first (so it disappears at once
//! and a crash never leaves half a checkpoint under its name), then deleted.
//!
//! Only a checkpoint of ours is removed ([`super::ensure_checkpoint`]); everything in its
//! directory goes with it, files a user added there included.

use std::fs;
use std::io;
use std::path::Path;

use crate::error::{Error, Result};

use super::commit::fsync_dir;
use super::names::{removal_path, split_target};
use super::open::ensure_checkpoint;

/// Deletes the committed checkpoint at `path`; a missing path is not an error, a directory
/// that is not a checkpoint of ours is [`Error::NotACheckpoint`] and stays as it is.
pub fn remove_checkpoint_dir(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", path, e)),
        Ok(_) => {}
    }
    ensure_checkpoint(path, "delete")?;
    let (parent, name) = split_target(path)?;
    let doomed = removal_path(&parent, &name);
    fs::rename(path, &doomed).map_err(|e| Error::io("rename", path, e))?;
    fsync_dir(&parent)?;
    fs::remove_dir_all(&doomed).map_err(|e| Error::io("remove", &doomed, e))
}
