//! The baseline engine: plain `std::fs` writes through the page cache, then fsync. What
//! most checkpoint code does today, and the fallback when O_DIRECT is refused.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::file::{check_read, open_for_write, truncate_and_sync, ReadFiles};
use super::{AlignedBuf, EngineReport, FileId, IoStats, Payload, Reader, StagingBuf, Writer};
use crate::config::{Config, FsyncPolicy};
use crate::{Error, Result};

/// Writes synchronously through the page cache.
pub struct BufferedWriter {
    report: EngineReport,
    fsync: FsyncPolicy,
    files: Vec<Option<(File, PathBuf)>>,
    free: Vec<StagingBuf>,
    stats: IoStats,
}

impl BufferedWriter {
    /// A writer with these staging buffers.
    pub fn new(config: &Config, mut report: EngineReport, buffers: Vec<AlignedBuf>) -> Self {
        report.direct_io = false;
        report.registered_buffers = false;
        report.queue_depth = 1;
        BufferedWriter {
            report,
            fsync: config.fsync,
            files: Vec::new(),
            free: buffers.into_iter().map(|b| StagingBuf::new(b, None)).collect(),
            stats: IoStats::default(),
        }
    }

    fn file(&self, file: FileId) -> Result<&(File, PathBuf)> {
        self.files
            .get(file.0)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::io("write", "(closed file)", io::Error::from_raw_os_error(libc::EBADF)))
    }
}

impl<'a> Writer<'a> for BufferedWriter {
    fn report(&self) -> &EngineReport {
        &self.report
    }

    fn create(&mut self, path: &Path, _len: u64) -> Result<FileId> {
        let file = open_for_write(path, false)?;
        self.files.push(Some((file, path.to_path_buf())));
        Ok(FileId(self.files.len() - 1))
    }

    fn take_buffer(&mut self) -> Result<StagingBuf> {
        self.free
            .pop()
            .ok_or_else(|| Error::Config("staging pool exhausted: every buffer is lent out".into()))
    }

    fn return_buffer(&mut self, mut buf: StagingBuf) {
        buf.clear();
        self.free.push(buf);
    }

    fn write(&mut self, file: FileId, payload: Payload<'a>, offset: u64) -> Result<()> {
        let started = Instant::now();
        let (f, path) = self.file(file)?;
        let result = crate::failpoint::io("buffered.write")
            .and_then(|()| match &payload {
                Payload::Staged(buf) => f.write_all_at(buf, offset),
                Payload::Borrowed(slice) => f.write_all_at(slice, offset),
            })
            .map_err(|e| Error::io_at("write", path, offset, e));
        let len = payload.len();
        if let Payload::Staged(buf) = payload {
            self.return_buffer(buf);
        }
        result?;
        self.stats.record(len, started.elapsed());
        Ok(())
    }

    fn finish(&mut self, file: FileId, len: u64) -> Result<()> {
        self.file(file)?;
        let (f, path) = self.files[file.0].take().expect("checked above");
        truncate_and_sync(&f, &path, len, self.fsync)
    }

    fn stats(&self) -> &IoStats {
        &self.stats
    }

    fn into_buffers(self: Box<Self>) -> Vec<AlignedBuf> {
        self.free.into_iter().map(|b| b.into_parts().0).collect()
    }
}

/// Reads synchronously through the page cache.
pub struct BufferedReader {
    report: EngineReport,
    files: ReadFiles,
    stats: IoStats,
}

impl BufferedReader {
    /// A reader.
    pub fn new(mut report: EngineReport) -> Self {
        report.direct_io = false;
        report.queue_depth = 1;
        BufferedReader { report, files: ReadFiles::default(), stats: IoStats::default() }
    }
}

impl Reader for BufferedReader {
    fn report(&self) -> &EngineReport {
        &self.report
    }

    fn open(&mut self, dir: &super::Dir, name: &str) -> Result<(FileId, u64)> {
        self.files.open(&mut self.report, dir, name)
    }

    fn read_at(&mut self, file: FileId, dst: &mut [u8], offset: u64, len: usize) -> Result<()> {
        let open = self.files.get(file)?;
        check_read(&open.path, dst, offset, len, len, open.len, 1)?;
        let started = Instant::now();
        open.file
            .read_exact_at(&mut dst[..len], offset)
            .map_err(|e| Error::io_at("read", &open.path, offset, e))?;
        self.stats.record(len, started.elapsed());
        Ok(())
    }

    fn close(&mut self, file: FileId) {
        self.files.close(file);
    }

    fn stats(&self) -> &IoStats {
        &self.stats
    }
}
