//! File plumbing shared by the engines: opening with or without O_DIRECT (and falling back
//! when it is refused), preallocation, the O_DIRECT checks, truncation and sync, and the
//! table of files a reader has open.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{Dir, EngineReport, FileId};
use crate::config::FsyncPolicy;
use crate::error::{Error, Result};

/// The error for an operation `op` on a [`FileId`] that is not (or no longer) open.
pub(crate) fn closed_file(op: &'static str) -> Error {
    Error::io(op, "(closed file)", io::Error::from_raw_os_error(libc::EBADF))
}

/// Opens `path` for writing, with O_DIRECT when `direct`.
pub(crate) fn open_for_write(path: &Path, direct: bool) -> Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    // A link planted where a file of ours will be is refused, not followed.
    options.custom_flags(if direct { libc::O_DIRECT | libc::O_NOFOLLOW } else { libc::O_NOFOLLOW });
    options.open(path).map_err(|e| Error::io("create", path, e))
}

/// Reserves the blocks of a file that will be `len` bytes (rounded up to the direct-I/O
/// alignment) and sets its size, so that no write extends it. Best effort: a file system
/// without `fallocate` is written as it is.
pub(crate) fn preallocate(file: &File, path: &Path, len: u64, report: &EngineReport) {
    if !report.direct_io || len == 0 {
        return;
    }
    let padded = super::aligned::round_up_u64(len, report.align as u64);
    let Ok(padded) = libc::off_t::try_from(padded) else { return };
    // SAFETY: fallocate on an open descriptor we own; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, padded) };
    if rc != 0 {
        log::debug!("fallocate {} ({padded} bytes): {}", path.display(), io::Error::last_os_error());
    }
}

/// Truncates to the exact length and makes the file durable as `policy` says.
pub(crate) fn truncate_and_sync(file: &File, path: &Path, len: u64, policy: FsyncPolicy) -> Result<()> {
    crate::failpoint::io("file.ftruncate")
        .and_then(|()| file.set_len(len))
        .map_err(|e| Error::io_at("ftruncate", path, len, e))?;
    match policy {
        FsyncPolicy::Fdatasync => crate::failpoint::io("file.fdatasync")
            .and_then(|()| file.sync_data())
            .map_err(|e| Error::io("fdatasync", path, e)),
        FsyncPolicy::Fsync => crate::failpoint::io("file.fsync")
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("fsync", path, e)),
        FsyncPolicy::Never => Ok(()),
    }
}

/// Checks the O_DIRECT constraints of one write before it reaches the kernel.
pub(crate) fn check_direct(
    report: &EngineReport,
    path: &Path,
    ptr: *const u8,
    len: usize,
    offset: u64,
) -> Result<()> {
    let align = report.align;
    let aligned = offset % align as u64 == 0 && len % align == 0 && (ptr as usize) % report.mem_align == 0;
    if report.direct_io && !aligned {
        return Err(Error::io_at(
            "write (unaligned for O_DIRECT)",
            path,
            offset,
            io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    Ok(())
}

/// Validates a read request against the destination buffer and the file length.
pub(crate) fn check_read(
    path: &Path,
    dst: &[u8],
    offset: u64,
    len: usize,
    span: usize,
    file_len: u64,
    mem_align: usize,
) -> Result<()> {
    check_read_at(path, (dst.as_ptr() as usize, dst.len()), offset, len, span, file_len, mem_align)
}

/// [`check_read`] of a destination given by its address and length.
pub(crate) fn check_read_at(
    path: &Path,
    (address, dst_len): (usize, usize),
    offset: u64,
    len: usize,
    span: usize,
    file_len: u64,
    mem_align: usize,
) -> Result<()> {
    if span > dst_len || address % mem_align != 0 {
        return Err(Error::io_at(
            "read (destination too small or unaligned)",
            path,
            offset,
            io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    if offset + len as u64 > file_len {
        let err = io::Error::new(io::ErrorKind::UnexpectedEof, format!("file is {file_len} bytes"));
        return Err(Error::io_at("read past end of file", path, offset + len as u64, err));
    }
    Ok(())
}

/// Zeroes whatever part of `dst[..span]` lies past the end of the file.
pub(crate) fn zero_past_eof(dst: &mut [u8], offset: u64, span: usize, file_len: u64) {
    let valid = file_len.saturating_sub(offset).min(span as u64) as usize;
    dst[valid..span].fill(0);
}

/// Opens the regular file `name` in `dir` for reading, with O_DIRECT if the report says
/// so; on EINVAL reopens without it and records the fallback.
pub(crate) fn open_with_fallback(report: &mut EngineReport, dir: &Dir, name: &str) -> Result<(File, u64)> {
    match dir.open_file(name, report.direct_io) {
        Err(err) if report.direct_io && err.raw_os_error() == Some(libc::EINVAL) => {
            report.direct_io = false;
            report.fallbacks.push(super::Fallback {
                what: "O_DIRECT",
                instead: "buffered reads",
                reason: err.to_string(),
            });
            log::warn!("O_DIRECT refused for {} ({err}); reading buffered", dir.member_path(name).display());
            dir.open_file(name, false)
        }
        other => other,
    }
}

/// One file a [`Reader`](super::Reader) has open.
pub struct ReadFile {
    pub file: File,
    pub path: PathBuf,
    pub len: u64,
}

/// The files a [`Reader`](super::Reader) has open, by [`FileId`].
#[derive(Default)]
pub(crate) struct ReadFiles(Vec<Option<ReadFile>>);

impl ReadFiles {
    /// Opens the regular file `name` in `dir` (with O_DIRECT when the report says so,
    /// falling back on EINVAL) and returns its handle and length.
    pub fn open(&mut self, report: &mut EngineReport, dir: &Dir, name: &str) -> Result<(FileId, u64)> {
        let (file, len) = open_with_fallback(report, dir, name)?;
        self.0.push(Some(ReadFile { file, path: dir.member_path(name), len }));
        Ok((FileId(self.0.len() - 1), len))
    }

    /// The open file behind `id`.
    pub fn get(&self, id: FileId) -> Result<&ReadFile> {
        self.0.get(id.0).and_then(Option::as_ref).ok_or_else(|| closed_file("read"))
    }

    /// Closes `id` (a no-op if it is not open).
    pub fn close(&mut self, id: FileId) {
        if let Some(slot) = self.0.get_mut(id.0) {
            *slot = None;
        }
    }
}
