//! The baseline engine: plain `std::fs` writes through the page cache, then fsync. What
//! most checkpoint code does today, and the fallback when O_DIRECT is refused.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use super::core::WriteFiles;
use super::file::{truncate_and_sync, ReadFile};
use super::reader::{EngineReader, ReadCompletion, ReadEngine, ReadLimits, ReadRequest};
use super::{pool_exhausted, EngineReport, FileId, IoStats, Payload, PoolBuf, StagingBuf, Writer};
use crate::config::{Config, FsyncPolicy};
use crate::error::{Error, Result};

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

/// The page-cache side of a reader: each piece is one `pread`, done at once. Files,
/// pieces and their bookkeeping are the reader core's.
#[derive(Default)]
pub struct SyncReadEngine {
    done: Vec<ReadCompletion>,
}

/// Reads synchronously through the page cache.
pub type BufferedReader = EngineReader<SyncReadEngine>;

impl EngineReader<SyncReadEngine> {
    /// A reader.
    pub fn new(mut report: EngineReport) -> Self {
        report.direct_io = false;
        report.queue_depth = 1;
        let limits = ReadLimits {
            op_name: "read",
            max_in_flight: 1,
            piece_len: usize::MAX, // one piece: the page cache needs no split
            mem_align: 1,          // no O_DIRECT: any address will do
        };
        EngineReader::from_parts(SyncReadEngine::default(), limits, report)
    }
}

impl ReadEngine for SyncReadEngine {
    fn start(&mut self, file: &ReadFile, idx: usize, request: ReadRequest) {
        // SAFETY: `request.dst..+len` lies inside the destination the reader core holds
        // borrowed mutably for the whole read (see `ReadRequest`), and nothing else uses it
        // during this call.
        let dst = unsafe { std::slice::from_raw_parts_mut(request.dst, request.len) };
        let result = file.file.read_at(dst, request.offset);
        self.done.push((idx, result, None));
    }

    fn wait(&mut self, _file: &ReadFile, _stats: &mut IoStats) -> Result<Vec<ReadCompletion>> {
        Ok(std::mem::take(&mut self.done))
    }
}
