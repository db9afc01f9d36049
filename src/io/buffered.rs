//! The baseline engine: plain `std::fs` writes through the page cache, then fsync. What
//! most checkpoint code does today, and the fallback when O_DIRECT is refused.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use super::core::WriteFiles;
use super::file::{check_read, truncate_and_sync, ReadFiles};
use super::{pool_exhausted, EngineReport, FileId, IoStats, Payload, PoolBuf, Reader, StagingBuf, Writer};
use crate::config::{Config, FsyncPolicy};
use crate::{Error, Result};

/// Writes synchronously through the page cache.
pub struct BufferedWriter {
    report: EngineReport,
    fsync: FsyncPolicy,
    files: WriteFiles,
    free: Vec<StagingBuf>,
    stats: IoStats,
}

impl BufferedWriter {
    /// A writer with these staging buffers.
    pub fn new(config: &Config, mut report: EngineReport, buffers: Vec<PoolBuf>) -> Self {
        report.direct_io = false;
        report.registered_buffers = false;
        report.queue_depth = 1;
        BufferedWriter {
            report,
            fsync: config.fsync,
            files: WriteFiles::default(),
            free: buffers.into_iter().map(|b| StagingBuf::new(b, None)).collect(),
            stats: IoStats::default(),
        }
    }
}

impl<'a> Writer<'a> for BufferedWriter {
    fn report(&self) -> &EngineReport {
        &self.report
    }

    fn create(&mut self, path: &Path, len: u64) -> Result<FileId> {
        self.files.create(path, len, &self.report)
    }

    fn take_buffer(&mut self) -> Result<StagingBuf> {
        self.free.pop().ok_or_else(pool_exhausted)
    }

    fn return_buffer(&mut self, mut buf: StagingBuf) {
        buf.clear();
        self.free.push(buf);
    }

    fn write(&mut self, file: FileId, payload: Payload<'a>, offset: u64) -> Result<()> {
        let started = Instant::now();
        let result = self.files.get(file, "write").and_then(|f| {
            crate::failpoint::io("buffered.write")
                .and_then(|()| match &payload {
                    Payload::Staged(buf) => f.file.write_all_at(buf, offset),
                    Payload::Borrowed(slice) => f.file.write_all_at(slice, offset),
                })
                .map_err(|e| Error::io_at("write", &f.path, offset, e))
        });
        let len = payload.len();
        if let Payload::Staged(buf) = payload {
            self.return_buffer(buf);
        }
        result?;
        self.stats.record(len, started.elapsed());
        Ok(())
    }

    fn finish(&mut self, file: FileId, len: u64) -> Result<()> {
        let open = self.files.take(file, "finish")?;
        truncate_and_sync(&open.file, &open.path, len, self.fsync)
    }

    fn stats(&self) -> &IoStats {
        &self.stats
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
