//! One saver per checkpoint path, and the cleanup of what crashed saves left behind.
//!
//! A save holds an exclusive `flock` on `<parent>/.<name>.lock` from before its temporary
//! directory is created until after the commit (or the failure). A second save of the same
//! path, from this process or another, either fails at once with [`Error::Locked`] or waits,
//! as [`Config::lock`](crate::Config::lock) says. The holder deletes the lock file before it
//! lets go, and a saver that got the lock checks that the file it locked is still the one at
//! the path (else it locked a deleted file and tries again), so deleting never lets two
//! savers in. The kernel drops the lock when the process dies, so a crashed saver never
//! blocks the next one; the empty lock file it leaves starts with a dot (loaders and
//! [retention](crate::retention) ignore it) and goes with the next save of that path.
//!
//! While holding the lock, a save removes the temporary directories of earlier saves of the
//! same path whose process is gone ([`clean_stale_temp_dirs`]): `.<name>.tmp-<pid>-<nanos>-<n>`
//! (an unfinished save) and `.<name>.tmp-removing-<pid>` (an interrupted removal). Directories
//! of another live process, those this process still uses, and those of multi-rank saves
//! (named by their save id) are left alone.
//!
//! Multi-rank saves whose save id this crate minted ([`names::rank_save_id`]:
//! `.<name>.tmp-r-<host>-<pid>-<hex nanos>-<n>`) are cleaned when the next multi-rank save
//! of the same path begins ([`clean_stale_rank_dirs`]): a directory whose coordinator (on this
//! host and boot) is gone, or is this very process (which is beginning a new save of that
//! path, so its earlier one ended: it committed, or failed on some rank, which a coordinator
//! is not told of). Directories of coordinators on other hosts are left alone: their
//! process ids mean nothing here.
//!
//! [`names::rank_save_id`]: super::names::rank_save_id

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::names::{host_tag, lock_path, rank_dir_owner, split_target, temp_dir_owner};
// Configuration, so defined in `crate::config`; also named here, where it is used.
pub use crate::config::LockMode;
use crate::error::{Error, Result};

/// Opens (creating) the lock file at `path`: a link planted there is refused, not
/// followed, and so is anything but a regular file (a FIFO, a device, a directory).
fn open_lock_file(path: &Path) -> Result<File> {
    const REFUSED: &str = "open lock file (a link or not a regular file: refusing it)";
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::EISDIR) => Error::io(REFUSED, path, e),
            _ => Error::io("open lock file", path, e),
        })?;
    let meta = file.metadata().map_err(|e| Error::io("stat lock file", path, e))?;
    if !meta.file_type().is_file() {
        return Err(Error::io(REFUSED, path, io::Error::from_raw_os_error(libc::EINVAL)));
    }
    Ok(file)
}

/// An exclusive lock on a checkpoint path, held until dropped.
#[derive(Debug)]
pub struct SaveLock {
    file: File,
    path: PathBuf,
}

impl SaveLock {
    /// Takes the lock of `target` (creating `<parent>` and the lock file if needed), failing
    /// or waiting as `mode` says.
    pub fn acquire(target: &Path, mode: LockMode) -> Result<SaveLock> {
        let path = lock_path(target)?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
        }
        let op = match mode {
            LockMode::Fail => libc::LOCK_EX | libc::LOCK_NB,
            LockMode::Wait => libc::LOCK_EX,
        };
        loop {
            let file = open_lock_file(&path)?;
            loop {
                // SAFETY: flock only reads the descriptor, which `file` keeps open.
                if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                    break;
                }
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EWOULDBLOCK) => return Err(Error::Locked(path)),
                    _ => return Err(Error::io("flock", &path, err)),
                }
            }
            // The previous holder may have deleted the file between our open and our flock:
            // then we hold a lock nobody else sees. Only the file still at the path counts.
            let locked = file.metadata().map_err(|e| Error::io("stat lock file", &path, e))?;
            match fs::symlink_metadata(&path) {
                Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => {
                    return Ok(SaveLock { file, path });
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("stat lock file", &path, e)),
            }
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SaveLock {
    fn drop(&mut self) {
        // Delete while still holding the lock: a waiter then finds its file gone and retries.
        if let Err(e) = fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("could not remove lock file {}: {e}", self.path.display());
            }
        }
        // SAFETY: as in acquire; closing the file would drop the lock anyway.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Temporary directories in use by this process (created and not yet dropped).
static IN_USE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Records that this process uses the temporary directory `path`.
pub(crate) fn register_temp(path: &Path) {
    if let Ok(mut set) = IN_USE.lock() {
        set.insert(path.to_path_buf());
    }
}

/// Records that this process no longer uses the temporary directory `path`.
pub(crate) fn unregister_temp(path: &Path) {
    if let Ok(mut set) = IN_USE.lock() {
        set.remove(path);
    }
}

/// Whether a temporary directory of process `pid` may still be in use: its process lives
/// and, when that is this process, it is registered as in use.
fn maybe_in_use(pid: u32, path: &Path) -> bool {
    if pid == std::process::id() {
        return IN_USE.lock().map_or(true, |set| set.contains(path));
    }
    process_alive(pid)
}

/// Whether a process with this id exists (a zombie counts as existing).
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes the temporary directories that saves (and removals) of `target` left behind when
/// their process died (or, for this process, that no live save of it uses any more: what a
/// failed parent fsync after an exchange leaves, or what survives a file system shutdown). Call it holding `target`'s [`SaveLock`]. Returns the directories
/// removed; a directory that cannot be removed is logged and skipped (it never makes a save
/// fail: loaders ignore it anyway).
pub fn clean_stale_temp_dirs(target: &Path) -> Result<Vec<PathBuf>> {
    let (parent, name) = split_target(target)?;
    let entries = match fs::read_dir(&parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list directory", &parent, e)),
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(entry_name) = file_name.to_str() else { continue };
        let Some(pid) = temp_dir_owner(&name, entry_name) else { continue };
        let path = entry.path();
        if maybe_in_use(pid, &path) {
            continue;
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => {
                log::info!("removed {} left by a crashed save (pid {pid})", path.display());
                removed.push(path);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("could not remove stale {}: {e}", path.display()),
        }
    }
    Ok(removed)
}

/// Removes the temporary directories of earlier multi-rank saves of `target` (save ids
/// minted by [`rank_save_id`](super::names::rank_save_id)) whose coordinator is gone or is
/// this process, except `keep`'s (the save id beginning now). Call it holding `target`'s
/// [`SaveLock`], as the coordinator of a new save of `target`, before any rank writes.
/// Returns the directories removed; one that cannot be removed is logged and skipped.
pub fn clean_stale_rank_dirs(target: &Path, keep: &str) -> Result<Vec<PathBuf>> {
    let (parent, name) = split_target(target)?;
    let entries = match fs::read_dir(&parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list directory", &parent, e)),
    };
    let kept = format!(".{name}{}{keep}", super::names::TMP_MARKER);
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(entry_name) = file_name.to_str() else { continue };
        let Some(owner) = rank_dir_owner(&name, entry_name) else { continue };
        if entry_name == kept || owner.host != host_tag() {
            continue;
        }
        if owner.pid != std::process::id() && process_alive(owner.pid) {
            continue;
        }
        let path = entry.path();
        match fs::remove_dir_all(&path) {
            Ok(()) => {
                log::info!(
                    "removed {}, left by a multi-rank save that did not commit (coordinator pid {})",
                    path.display(),
                    owner.pid
                );
                removed.push(path);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("could not remove stale {}: {e}", path.display()),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(0));
    }
}
