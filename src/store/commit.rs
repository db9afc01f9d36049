//! The commit protocol: nothing half-written is ever a checkpoint.
//!
//! 1. Everything is written into `<parent>/.<name>.tmp-<unique>/`.
//! 2. The engines fdatasync every shard after its last write.
//! 3. `manifest.json` is written and fsynced, then the temporary directory is fsynced.
//! 4. The directory is renamed to `<parent>/<name>` with `RENAME_NOREPLACE` (or, when
//!    replacing was asked for, atomically exchanged with the old checkpoint, which is then
//!    deleted), and `<parent>` is fsynced. That rename is the commit.
//! 5. On any failure the temporary directory is removed and nothing else is touched; a
//!    failed fsync is never retried.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::names::{split_save_target, temp_dir_path, unique_suffix};
use super::open::ensure_checkpoint;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::format::{ExtraFileInfo, Manifest, MANIFEST_FILE};

/// A temporary checkpoint directory; removed on drop unless committed.
#[derive(Debug)]
pub struct TempCheckpointDir {
    tmp: PathBuf,
    target: PathBuf,
    parent: PathBuf,
    committed: bool,
}

impl TempCheckpointDir {
    /// Creates `<parent>/.<name>.tmp-<unique>/` (and `<parent>` if missing). Fails early if
    /// `target` exists and `replace` is false.
    pub fn create(target: &Path, replace: bool) -> Result<Self> {
        Self::create_named(target, replace, &unique_suffix())
    }

    /// Like [`TempCheckpointDir::create`] with a caller-chosen suffix, so that several
    /// ranks of one save find the same directory. Reuses the directory if it exists.
    ///
    /// Refuses, before anything is written: a name reserved by the protocol or too long
    /// ([`split_save_target`]), an existing `target` unless `replace`, and, with `replace`,
    /// an existing `target` that is not a checkpoint of ours.
    pub fn create_named(target: &Path, replace: bool, suffix: &str) -> Result<Self> {
        let (parent, name) = split_save_target(target)?;
        if fs::symlink_metadata(target).is_ok() {
            if !replace {
                return Err(Error::AlreadyExists(target.to_path_buf()));
            }
            ensure_checkpoint(target, "replace")?;
        }
        fs::create_dir_all(&parent).map_err(|e| Error::io("create directory", &parent, e))?;
        let tmp = temp_dir_path(&parent, &name, suffix);
        match fs::create_dir(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tmp.is_dir() => {}
            Err(e) => return Err(Error::io("create directory", &tmp, e)),
        }
        super::lock::register_temp(&tmp);
        Ok(TempCheckpointDir { tmp, target: target.to_path_buf(), parent, committed: false })
    }

    /// Leaves the directory in place, no longer counted as in use by this process: a rank of
    /// a multi-rank save hands it on to the other ranks and the commit (or, if the save
    /// fails, to [`clean_stale_rank_dirs`](super::lock::clean_stale_rank_dirs)).
    pub fn keep(mut self) {
        self.committed = true; // so Drop unregisters it and removes nothing
    }

    /// The temporary directory the shards go into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Writes and fsyncs a small non-tensor file into the temporary directory (before the
    /// manifest, which lists it with the returned size and CRC-32).
    pub fn write_extra_file(&self, name: &str, bytes: &[u8]) -> Result<ExtraFileInfo> {
        let path = self.tmp.join(name);
        let mut file = create_no_follow(&path)?;
        file.write_all(bytes).map_err(|e| Error::io("write", &path, e))?;
        file.sync_all().map_err(|e| Error::io("fsync", &path, e))?;
        Ok(ExtraFileInfo { file: name.to_owned(), size: bytes.len() as u64, crc32: crc32fast::hash(bytes) })
    }

    /// Steps 3 and 4: writes and fsyncs the manifest and the directory, renames it into
    /// place, fsyncs the parent.
    pub fn commit(mut self, manifest: &Manifest, replace: bool) -> Result<()> {
        let manifest_path = self.tmp.join(MANIFEST_FILE);
        failpoint::step("commit.after_shards", &self.tmp)?;
        let mut file = create_no_follow(&manifest_path)?;
        failpoint::io("commit.manifest_write")
            .and_then(|()| file.write_all(&manifest.to_json()))
            .map_err(|e| Error::io("write", &manifest_path, e))?;
        failpoint::step("commit.after_manifest_write", &manifest_path)?;
        failpoint::io("commit.manifest_fsync")
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("fsync", &manifest_path, e))?;
        drop(file);
        failpoint::step("commit.after_manifest_fsync", &manifest_path)?;
        fsync_dir(&self.tmp)?;
        failpoint::step("commit.after_dir_fsync", &self.tmp)?;
        failpoint::io("commit.rename").map_err(|e| Error::io("rename", &self.tmp, e))?;
        if replace {
            exchange_or_rename(&self.tmp, &self.target)?;
        } else {
            rename_noreplace(&self.tmp, &self.target)?;
        }
        self.committed = true;
        failpoint::step("commit.after_rename", &self.target)?;
        fsync_dir(&self.parent)?;
        failpoint::step("commit.after_parent_fsync", &self.target)?;
        // After an exchange the old checkpoint sits under the temporary name: delete it.
        if self.tmp.exists() {
            remove_dir_all_logged(&self.tmp);
        }
        Ok(())
    }
}

impl Drop for TempCheckpointDir {
    fn drop(&mut self) {
        super::lock::unregister_temp(&self.tmp);
        if !self.committed {
            remove_dir_all_logged(&self.tmp);
        }
    }
}

/// Creates (truncating) a file of the temporary directory; a link planted at `path` is
/// refused, not followed.
fn create_no_follow(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io("create", path, e))
}

fn remove_dir_all_logged(path: &Path) {
    if let Err(e) = fs::remove_dir_all(path) {
        if e.kind() != io::ErrorKind::NotFound {
            log::warn!("could not remove {}: {e}", path.display());
        }
    }
}

/// fsyncs a directory so that entries created or renamed in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let handle = File::open(dir).map_err(|e| Error::io("open directory", dir, e))?;
    failpoint::io("dir.fsync")
        .and_then(|()| handle.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidCheckpoint(format!("{} contains a NUL byte", path.display())))
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (from_c, to_c) = (c_path(from).map_err(io::Error::other)?, c_path(to).map_err(io::Error::other)?);
    // SAFETY: both are valid NUL-terminated paths; renameat2 does not keep the pointers.
    let rc =
        unsafe { libc::renameat2(libc::AT_FDCWD, from_c.as_ptr(), libc::AT_FDCWD, to_c.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Renames without ever replacing an existing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    match renameat2(from, to, libc::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Err(Error::AlreadyExists(to.to_path_buf())),
        Err(e) if unsupported_flag(&e) => {
            // The file system has no RENAME_NOREPLACE (NFS, some FUSE file systems): check,
            // then rename (a small window in which another writer's rename could be lost).
            log::warn!(
                "{}: the file system refuses RENAME_NOREPLACE ({e}); checking, then renaming",
                to.display()
            );
            if to.exists() {
                return Err(Error::AlreadyExists(to.to_path_buf()));
            }
            fs::rename(from, to).map_err(|e| Error::io("rename", from, e))
        }
        Err(e) => Err(Error::io("rename", from, e)),
    }
}

/// Whether a `renameat2` error means the file system does not know the flag.
fn unsupported_flag(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP))
}

/// Puts `from` at `to` atomically; an existing `to` ends up at `from`.
///
/// Where the file system refuses `RENAME_EXCHANGE` (NFS, CIFS, some FUSE file systems) the
/// replace is two renames: the old checkpoint to `from`'s name with `-old` appended, then
/// `from` to `to`; the old one ends up at `from` as after an exchange. Between the two a
/// crash leaves no checkpoint at `to`, the old one complete under the `-old` name and the
/// new one complete under `from` (both hidden, `.<name>.tmp-*`, so loaders skip them and
/// the next save of `to` by this host removes them once their process is gone).
fn exchange_or_rename(from: &Path, to: &Path) -> Result<()> {
    if fs::symlink_metadata(to).is_err() {
        return rename_noreplace(from, to);
    }
    // Checked when the save began; checked again: the directory may have changed since.
    ensure_checkpoint(to, "replace")?;
    let exchanged =
        failpoint::io("commit.exchange").and_then(|()| renameat2(from, to, libc::RENAME_EXCHANGE));
    match exchanged {
        Ok(()) => Ok(()),
        Err(e) if unsupported_flag(&e) => {
            log::warn!(
                "{}: the file system refuses RENAME_EXCHANGE ({e}); replacing with two renames \
                 (no checkpoint at this path between them)",
                to.display()
            );
            let mut old = from.as_os_str().to_owned();
            old.push("-old");
            let old = PathBuf::from(old);
            fs::rename(to, &old).map_err(|e| Error::io("rename (old checkpoint aside)", to, e))?;
            let second =
                failpoint::step("commit.between_renames", &old).and_then(|()| rename_noreplace(from, to));
            if let Err(e) = second {
                // Put the old one back; if even that fails, it stays complete under `old`.
                if let Err(back) = fs::rename(&old, to) {
                    log::error!("{}: could not put the old checkpoint back ({back})", old.display());
                }
                return Err(e);
            }
            fs::rename(&old, from).map_err(|e| Error::io("rename (old checkpoint)", &old, e))
        }
        Err(e) => Err(Error::io("rename (exchange)", from, e)),
    }
}
