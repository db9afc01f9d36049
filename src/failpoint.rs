//! Fault injection for tests, through the `fail` crate behind the `failpoints` feature.
//!
//! Without the feature every function here is an inlined constant (`None` / `Ok(())`), so the
//! call sites in the engines and the commit protocol compile to nothing and cost nothing.
//!
//! With it, a test configures a failpoint by name (`fail::cfg("file.fdatasync",
//! "1*return(EIO)")`) and the site reacts to the action's argument:
//!
//! | argument | effect |
//! |---|---|
//! | an errno name (`EIO`, `ENOSPC`, `EINTR`, `EAGAIN`, `EPERM`, `ENOMEM`, `EINVAL`, ...) or number | the operation fails with that errno, exactly as if the system call had returned it |
//! | none (`return`) | `EIO` |
//! | `abort` | `std::process::abort()`: a crash at that point, for the crash-point tests |
//! | `short` | (write sites only) the write is cut to half its length, a real short write |
//!
//! The failpoints, in the order a save meets them:
//!
//! | name | where | typical arguments |
//! |---|---|---|
//! | `probe.odirect` | the O_DIRECT probe of [`crate::io::probe::plan`] | `EINVAL` (falls back to buffered I/O) |
//! | `uring.setup` | `io_uring_setup` | `EPERM` (falls back to the pwrite engine) |
//! | `uring.register` | buffer registration | `ENOMEM` (falls back to unregistered writes) |
//! | `uring.submit` | `io_uring_enter` (submit and wait) | `EINTR`, `EAGAIN` (retried), `EIO` |
//! | `uring.write.submit` | each write SQE | `short` |
//! | `uring.write.complete` | each write completion (the CQE result) | `EIO`, `ENOSPC`, `EINTR`, `EAGAIN` |
//! | `pwrite.write` | each `pwrite` call | `short`, `EIO`, `ENOSPC`, `EINTR`, `EAGAIN` |
//! | `buffered.write` | each buffered write | `EIO`, `ENOSPC` |
//! | `file.ftruncate` | the `ftruncate` that drops O_DIRECT padding | `EIO` |
//! | `file.fdatasync` / `file.fsync` | the sync of each shard | `EIO` (the save fails; never retried) |
//! | `commit.after_shards` | commit step 3 starts: every shard is durable | `abort` |
//! | `commit.manifest_write` | writing `manifest.json` | `ENOSPC`, `EIO` |
//! | `commit.after_manifest_write` | manifest written, not synced | `abort` |
//! | `commit.manifest_fsync` | fsync of `manifest.json` | `EIO` |
//! | `commit.after_manifest_fsync` | manifest durable, directory not synced | `abort` |
//! | `dir.fsync` | every directory fsync | `EIO` |
//! | `commit.after_dir_fsync` | temporary directory durable, not renamed | `abort` |
//! | `commit.rename` | the rename that commits | `EIO` |
//! | `commit.exchange` | the `RENAME_EXCHANGE` of a replacing commit | `EINVAL` (the two-rename replace of file systems without it), `EIO` |
//! | `commit.between_renames` | two-rename replace: old checkpoint moved aside, new one not yet in place | `abort`, `EIO` (the old one is put back) |
//! | `commit.after_rename` | renamed, parent not synced | `abort` |
//! | `commit.after_parent_fsync` | committed and durable, replaced checkpoint not yet deleted | `abort` |
//! | `retention.before_remove` | [`crate::store::retention::keep_last`], before each deletion | `abort`, `EIO` |
//! | `latest.after_write` | [`crate::store::retention::set_latest`], temporary pointer written and synced, not renamed | `abort` |
//!
//! Every site that takes an errno also accepts `abort`, so each is a crash point too.

use std::io;
use std::path::Path;

use crate::error::{Error, Result};

/// The action configured at `name`, if any: `Some(argument)`.
#[cfg(feature = "failpoints")]
#[inline]
pub(crate) fn hit(name: &str) -> Option<Option<String>> {
    fail::eval(name, |arg| arg)
}

/// Without the `failpoints` feature nothing is ever configured.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_name: &str) -> Option<Option<String>> {
    None
}

/// The error injected at `name`, if one is configured. Aborts the process on `abort`.
#[inline(always)]
pub(crate) fn error(name: &str) -> Option<io::Error> {
    hit(name).map(|arg| to_error(name, arg.as_deref()))
}

/// `Err(errno)` if a failure is configured at `name`.
#[inline(always)]
pub(crate) fn io(name: &str) -> io::Result<()> {
    match error(name) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A failure configured at the step `name` of a protocol, as an [`Error::Io`] whose op is
/// the failpoint's name.
#[inline(always)]
pub(crate) fn step(name: &'static str, path: &Path) -> Result<()> {
    match error(name) {
        Some(e) => Err(Error::io(name, path, e)),
        None => Ok(()),
    }
}

/// What a write site should do: `Some(Ok(()))` to cut the write short, `Some(Err(e))` to
/// fail it, `None` to go on normally.
#[inline(always)]
pub(crate) fn write(name: &str) -> Option<io::Result<()>> {
    hit(name).map(|arg| match arg.as_deref() {
        Some("short") => Ok(()),
        other => Err(to_error(name, other)),
    })
}

/// A short write's length: half of `len`, rounded down to `align`; `len` itself when that
/// would be nothing.
pub(crate) fn short_len(len: usize, align: usize) -> usize {
    let half = len / 2 / align.max(1) * align.max(1);
    if half == 0 {
        len
    } else {
        half
    }
}

fn to_error(name: &str, arg: Option<&str>) -> io::Error {
    let errno = match arg.map(str::trim) {
        None | Some("") => libc::EIO,
        Some("abort") => {
            log::error!("failpoint {name}: abort");
            std::process::abort();
        }
        Some(text) => errno_by_name(text).or_else(|| text.parse().ok()).unwrap_or(libc::EIO),
    };
    io::Error::from_raw_os_error(errno)
}

fn errno_by_name(name: &str) -> Option<i32> {
    Some(match name {
        "EIO" => libc::EIO,
        "ENOSPC" => libc::ENOSPC,
        "EINTR" => libc::EINTR,
        "EAGAIN" => libc::EAGAIN,
        "EBUSY" => libc::EBUSY,
        "EPERM" => libc::EPERM,
        "ENOMEM" => libc::ENOMEM,
        "EINVAL" => libc::EINVAL,
        "EDQUOT" => libc::EDQUOT,
        "EROFS" => libc::EROFS,
        "EXDEV" => libc::EXDEV,
        "ENOSYS" => libc::ENOSYS,
        "EOPNOTSUPP" => libc::EOPNOTSUPP,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names_and_numbers() {
        assert_eq!(to_error("x", Some("ENOSPC")).raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(to_error("x", Some("5")).raw_os_error(), Some(5));
        assert_eq!(to_error("x", None).raw_os_error(), Some(libc::EIO));
        assert_eq!(to_error("x", Some("nonsense")).raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn nothing_is_configured_by_default() {
        assert!(hit("no.such.point").is_none());
        assert!(io("no.such.point").is_ok());
    }
}
