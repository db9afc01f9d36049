//! Opening a committed checkpoint: its directory, held open, and its manifest, read safely
//! (a regular file, never through a link, never past [`MAX_MANIFEST_LEN`]). Whether a
//! directory is a checkpoint of ours, before anything removes or replaces it.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::{Manifest, MANIFEST_FILE, MAX_MANIFEST_LEN};
use crate::io::Dir;

use super::names::is_temporary_name;

/// Opens the checkpoint directory `dir` and reads its manifest.
pub fn open_checkpoint(dir: &Path) -> Result<(Dir, Manifest)> {
    let not_checkpoint = |reason: String| Error::NotACheckpoint { path: dir.to_path_buf(), reason };
    if dir.file_name().and_then(|n| n.to_str()).is_some_and(is_temporary_name) {
        return Err(not_checkpoint("a temporary directory of an unfinished save".to_owned()));
    }
    let handle = match Dir::open(dir) {
        Ok(handle) => handle,
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(not_checkpoint("not a directory".to_owned()));
        }
        Err(e) => return Err(e),
    };
    let bytes = match handle.read_file(MANIFEST_FILE, MAX_MANIFEST_LEN) {
        Ok(bytes) => bytes,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            return Err(not_checkpoint(format!("no {MANIFEST_FILE} (an unfinished or foreign directory)")));
        }
        Err(e) => return Err(e),
    };
    let manifest =
        Manifest::parse(&bytes).map_err(|source| Error::Format { path: dir.join(MANIFEST_FILE), source })?;
    Ok((handle, manifest))
}

/// Reads and checks `dir/manifest.json`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    Ok(open_checkpoint(dir)?.1)
}

/// Checks that `dir` is a checkpoint of ours (its manifest parses as one) before it is
/// removed or replaced (`what`: "delete", "replace"). Anything else, a foreign directory
/// that merely holds a file named `manifest.json` included, is [`Error::NotACheckpoint`]
/// and must be left untouched.
pub fn ensure_checkpoint(dir: &Path, what: &str) -> Result<()> {
    match open_checkpoint(dir) {
        Ok(_) => Ok(()),
        Err(Error::NotACheckpoint { reason, .. } | Error::Corrupt { reason, .. }) => {
            Err(Error::NotACheckpoint {
                path: dir.to_path_buf(),
                reason: format!("{reason}; refusing to {what} it"),
            })
        }
        Err(Error::Format { source, .. }) => Err(Error::NotACheckpoint {
            path: dir.to_path_buf(),
            reason: format!(
                "its {MANIFEST_FILE} is not a uring-ckpt manifest ({source}); refusing to {what} it"
            ),
        }),
        Err(other) => Err(other),
    }
}
