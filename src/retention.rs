//! Which checkpoints of a directory to keep, and which one is the latest.
//!
//! * [`list_committed`] lists the committed checkpoints in a directory, oldest first. A
//!   committed checkpoint is a directory whose name does not start with `.` (so temporary
//!   directories `.<name>.tmp-*`, removals in progress and lock files never count) and that
//!   holds a `manifest.json` file (the manifest only ever appears through the commit's
//!   rename). **Order:** when every committed name ends in a decimal number (`step-100`,
//!   `epoch2-step000300`), by that number, then by name; otherwise by the modification time
//!   of `manifest.json` (the commit time), then by name.
//! * [`keep_last`] deletes all but the newest `n` (n >= 1). It never deletes the newest
//!   committed checkpoint, nor the one the `latest` pointer names, nor one whose save lock is
//!   held. Each deletion is atomic ([`remove_checkpoint_dir`]: rename to a hidden
//!   `.<name>.tmp-removing-<pid>`, fsync the directory, then delete), so an interruption
//!   leaves only whole checkpoints under their names; the hidden leftovers of an interrupted
//!   run are deleted by the next one.
//! * [`set_latest`] points `<parent>/latest` at a committed checkpoint: a temporary file is
//!   written and fsynced, renamed over `latest`, and the directory fsynced. Call it after
//!   [`save_checkpoint`](crate::CheckpointIO::save_checkpoint) returned, which is when the
//!   commit is durable. [`read_latest`] reads the pointer; [`latest_valid`] finds the newest
//!   checkpoint of ours that passes [`verify_ours`](crate::inspect::verify_ours), trying the
//!   pointer first (a foreign safetensors directory is never the latest).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::format::MANIFEST_FILE;
use crate::io::Dir;
use crate::store::commit::fsync_dir;
use crate::store::lock::{process_alive, LockMode, SaveLock};
use crate::store::names::{split_target, temp_dir_owner, unique_suffix, TMP_MARKER};
use crate::store::remove::remove_checkpoint_dir;

/// Name of the pointer file in a checkpoint directory's parent.
pub const LATEST_FILE: &str = "latest";

/// The committed checkpoints in `parent`, oldest first (see the [module docs](self) for
/// the order). A missing `parent` has none.
pub fn list_committed(parent: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list directory", parent, e)),
    };
    let mut found: Vec<(String, SystemTime)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list directory", parent, e))?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        if name.starts_with('.') || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let manifest = entry.path().join(MANIFEST_FILE);
        match fs::metadata(&manifest) {
            Ok(meta) if meta.is_file() => {
                found.push((name, meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
            }
            _ => continue,
        }
    }
    let steps: Option<Vec<u128>> = found.iter().map(|(name, _)| trailing_number(name)).collect();
    match steps {
        Some(steps) => {
            let mut keyed: Vec<(u128, String)> =
                steps.into_iter().zip(found).map(|(step, (name, _))| (step, name)).collect();
            keyed.sort();
            Ok(keyed.into_iter().map(|(_, name)| parent.join(name)).collect())
        }
        None => {
            found.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
            Ok(found.into_iter().map(|(name, _)| parent.join(name)).collect())
        }
    }
}

/// The decimal number a name ends with (`step-0100` -> 100), if any.
fn trailing_number(name: &str) -> Option<u128> {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return None;
    }
    name[name.len() - digits..].parse().ok()
}

/// Deletes the committed checkpoints of `parent` except the newest `n`, the one `latest`
/// names, and any being saved right now. Returns the deleted paths, oldest first.
/// `n` must be at least 1: the newest committed checkpoint is never deleted.
pub fn keep_last(parent: &Path, n: usize) -> Result<Vec<PathBuf>> {
    if n == 0 {
        return Err(Error::Config("keep_last needs n >= 1: the newest checkpoint is always kept".into()));
    }
    clean_interrupted_removals(parent)?;
    let committed = list_committed(parent)?;
    let latest = read_latest(parent).ok().flatten();
    let doomed = committed.len().saturating_sub(n);
    let mut removed = Vec::new();
    for path in committed.into_iter().take(doomed) {
        if latest.as_ref() == Some(&path) {
            continue;
        }
        // A save of this very path (a replace) owns it for now: leave it.
        let _lock = match SaveLock::acquire(&path, LockMode::Fail) {
            Ok(lock) => lock,
            Err(Error::Locked(_)) => continue,
            Err(e) => return Err(e),
        };
        failpoint::step("retention.before_remove", &path)?;
        remove_checkpoint_dir(&path)?;
        removed.push(path);
    }
    Ok(removed)
}

/// Deletes what interrupted runs left in `parent`: `.<name>.tmp-removing-<pid>` directories
/// of a dead process (an interrupted [`keep_last`] or `remove_checkpoint`), temporary
/// `latest` pointer files of an interrupted [`set_latest`], and unheld lock files of
/// checkpoints that no longer exist.
fn clean_interrupted_removals(parent: &Path) -> Result<()> {
    let entries = match fs::read_dir(parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("list directory", parent, e)),
    };
    let marker = format!("{TMP_MARKER}removing-");
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else { continue };
        if let Some(pid) = temp_dir_owner(LATEST_FILE, &name) {
            // A pointer file that an interrupted set_latest never renamed.
            if !process_alive(pid) {
                let _ = fs::remove_file(entry.path());
            }
            continue;
        }
        if let Some(base) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".lock")) {
            // The lock file of a crashed save or removal whose checkpoint is gone: taking
            // and dropping the lock deletes it (unless someone holds it).
            if !base.is_empty() && !parent.join(base).exists() {
                let _ = SaveLock::acquire(&parent.join(base), LockMode::Fail);
            }
            continue;
        }
        let Some((_, pid)) = name.rsplit_once(&marker) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if name.starts_with('.') && !process_alive(pid) {
            if let Err(e) = fs::remove_dir_all(entry.path()) {
                log::warn!("could not remove {}: {e}", entry.path().display());
            }
        }
    }
    Ok(())
}

/// Points `<parent>/latest` at the committed checkpoint `checkpoint` (atomically and
/// durably: temporary file, fsync, rename, fsync of the directory).
pub fn set_latest(checkpoint: &Path) -> Result<()> {
    let (parent, name) = split_target(checkpoint)?;
    if !checkpoint.join(MANIFEST_FILE).is_file() {
        return Err(Error::NotACheckpoint {
            path: checkpoint.to_path_buf(),
            reason: "no manifest.json: only a committed checkpoint can be the latest".into(),
        });
    }
    clean_interrupted_removals(&parent)?;
    let tmp = parent.join(format!(".{LATEST_FILE}{TMP_MARKER}{}", unique_suffix()));
    let result = write_pointer(&tmp, &name).and_then(|()| {
        failpoint::step("latest.after_write", &tmp)?;
        fs::rename(&tmp, parent.join(LATEST_FILE)).map_err(|e| Error::io("rename", &tmp, e))?;
        fsync_dir(&parent)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_pointer(tmp: &Path, name: &str) -> Result<()> {
    let mut file = File::create(tmp).map_err(|e| Error::io("create", tmp, e))?;
    file.write_all(format!("{name}\n").as_bytes()).map_err(|e| Error::io("write", tmp, e))?;
    file.sync_all().map_err(|e| Error::io("fsync", tmp, e))
}

/// The checkpoint `<parent>/latest` names, or `None` when there is no pointer. A pointer
/// whose content is not a plain directory name is an error; whether the checkpoint it names
/// still exists is not checked here.
pub fn read_latest(parent: &Path) -> Result<Option<PathBuf>> {
    let path = parent.join(LATEST_FILE);
    // A regular file of at most one name (and its newline), never read through a link.
    let read = Dir::open(parent).and_then(|dir| dir.read_file(LATEST_FILE, 256));
    let bytes = match read {
        Ok(bytes) => bytes,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |reason: &str| Error::NotACheckpoint { path: path.clone(), reason: reason.to_owned() };
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("the latest pointer is not UTF-8"))?;
    let name = text.trim_end_matches('\n');
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0', '\n']);
    if !plain {
        return Err(bad("the latest pointer does not hold a plain checkpoint name"));
    }
    Ok(Some(parent.join(name)))
}

/// The newest checkpoint of ours in `parent` that passes
/// [`verify_ours`](crate::inspect::verify_ours): the one `latest` names if it does, else the
/// newest committed one that does. `None` if none does. A directory without a manifest of
/// ours (a plain safetensors directory) never counts, even when `latest` names it.
pub fn latest_valid(config: &Config, parent: &Path) -> Result<Option<PathBuf>> {
    let ok = |path: &Path| match crate::inspect::verify_ours(config, path, |_, _| {}) {
        Ok(_) => true,
        Err(e) => {
            log::warn!("skipping {}: {e}", path.display());
            false
        }
    };
    if let Ok(Some(pointed)) = read_latest(parent) {
        if ok(&pointed) {
            return Ok(Some(pointed));
        }
    }
    for path in list_committed(parent)?.into_iter().rev() {
        if ok(&path) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_numbers() {
        assert_eq!(trailing_number("step-0100"), Some(100));
        assert_eq!(trailing_number("epoch2-step7"), Some(7));
        assert_eq!(trailing_number("final"), None);
        assert_eq!(trailing_number("9"), Some(9));
    }
}
