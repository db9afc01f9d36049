//! The writer core shared by the asynchronous engines (io_uring and the pwrite thread pool):
//! the table of open files, the operation slots and their reuse, the free list of staging
//! buffers, poisoning after an error, and the [`Writer`] methods built on them
//! (`take_buffer`, `write`, `finish`, waiting everything out on drop). An engine only says
//! how an operation starts and how completions are waited for ([`Engine`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::file::{check_direct, closed_file, open_for_write, preallocate, truncate_and_sync};
use super::{poisoned, pool_exhausted, EngineReport, FileId, IoStats, Payload, StagingBuf, Writer};
use crate::config::FsyncPolicy;
use crate::error::{Error, Result};

/// A file open for writing.
pub struct OpenFile {
    pub file: File,
    pub path: PathBuf,
    /// Operations on it not yet retired.
    pub inflight: usize,
}

/// The files a writer has open, by [`FileId`].
#[derive(Default)]
pub struct WriteFiles(Vec<Option<OpenFile>>);

impl WriteFiles {
    /// Creates (truncating) `path`, with O_DIRECT and preallocated to `len` bytes when the
    /// report says direct I/O.
    pub fn create(&mut self, path: &Path, len: u64, report: &EngineReport) -> Result<FileId> {
        let file = open_for_write(path, report.direct_io)?;
        preallocate(&file, path, len, report);
        self.0.push(Some(OpenFile { file, path: path.to_path_buf(), inflight: 0 }));
        Ok(FileId(self.0.len() - 1))
    }

    /// The open file `id`, or the closed-file error for `op`.
    pub fn get(&mut self, id: FileId, op: &'static str) -> Result<&mut OpenFile> {
        self.0.get_mut(id.0).and_then(Option::as_mut).ok_or_else(|| closed_file(op))
    }

    /// Removes `id` from the table (the caller closes it).
    pub fn take(&mut self, id: FileId, op: &'static str) -> Result<OpenFile> {
        self.0.get_mut(id.0).and_then(Option::take).ok_or_else(|| closed_file(op))
    }

    fn raw_fd(&self, index: usize) -> Option<RawFd> {
        self.0.get(index).and_then(Option::as_ref).map(|f| f.file.as_raw_fd())
    }

    fn path(&self, index: usize) -> PathBuf {
        self.0.get(index).and_then(Option::as_ref).map(|f| f.path.clone()).unwrap_or_default()
    }
}

/// The bytes of one operation: a staging buffer it owns, or caller memory borrowed for `'a`.
pub enum OpData<'a> {
    Staged(StagingBuf),
    Borrowed(&'a [u8]),
}

impl OpData<'_> {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            OpData::Staged(buf) => buf,
            OpData::Borrowed(slice) => slice,
        }
    }
}

/// One write in flight. It keeps its memory until the engine retires it.
pub struct Op<'a> {
    pub file: usize,
    pub data: OpData<'a>,
    pub offset: u64,
    /// Bytes written so far (an engine that resubmits short writes advances it).
    pub done: usize,
    /// Transient errors retried so far.
    pub retries: u32,
    pub started: Instant,
}

/// How one engine moves operations; everything else is the [`Core`]'s.
pub trait Engine<'a>: Send {
    /// Operations in flight at most before `write` waits for one to end.
    fn max_in_flight(&self) -> usize;
    /// Hands operation `idx` to the kernel (or a worker thread).
    fn start(&mut self, core: &mut Core<'a>, idx: usize) -> Result<()>;
    /// Waits for at least one operation to end and retires each that ended
    /// ([`Core::retire`]). Fails only when waiting itself fails.
    fn wait(&mut self, core: &mut Core<'a>) -> Result<()>;
    /// Waits out every operation in flight (the writer is going away). If waiting is not
    /// possible, gives up the memory of the operations left ([`Core::leak_in_flight`]) rather
    /// than free memory the kernel may still read.
    fn drain(&mut self, core: &mut Core<'a>);
}

/// The bookkeeping of a writer, shared by the engines.
pub struct Core<'a> {
    pub report: EngineReport,
    pub stats: IoStats,
    pub files: WriteFiles,
    fsync: FsyncPolicy,
    /// Name of the system call in errors ("write", "pwrite").
    op_name: &'static str,
    free: Vec<StagingBuf>,
    ops: Vec<Option<Op<'a>>>,
    free_ops: Vec<usize>,
    inflight: usize,
    /// The first failure, not yet reported.
    error: Option<Error>,
    /// A failure was reported: refuse further work.
    failed: bool,
}

impl<'a> Core<'a> {
    pub fn new(
        report: EngineReport,
        fsync: FsyncPolicy,
        op_name: &'static str,
        free: Vec<StagingBuf>,
    ) -> Self {
        Core {
            report,
            stats: IoStats::default(),
            files: WriteFiles::default(),
            fsync,
            op_name,
            free,
            ops: Vec::new(),
            free_ops: Vec::new(),
            inflight: 0,
            error: None,
            failed: false,
        }
    }

    /// Operations started and not yet retired.
    pub fn in_flight(&self) -> usize {
        self.inflight
    }

    /// Reports the first failure once, then refuses all further work.
    pub(super) fn check(&mut self) -> Result<()> {
        if let Some(err) = self.error.take() {
            self.failed = true;
            return Err(err);
        }
        if self.failed {
            return Err(poisoned());
        }
        Ok(())
    }

    /// Records a failure (the first one wins); the next call of a writer method reports it.
    pub fn fail(&mut self, err: Error) {
        self.error.get_or_insert(err);
    }

    /// Records a failure after which no operation will be retired (the workers are gone).
    pub fn abandon(&mut self, err: Error) {
        self.fail(err);
        self.inflight = 0;
    }

    pub fn op(&self, idx: usize) -> Option<&Op<'a>> {
        self.ops.get(idx).and_then(Option::as_ref)
    }

    pub fn op_mut(&mut self, idx: usize) -> Option<&mut Op<'a>> {
        self.ops.get_mut(idx).and_then(Option::as_mut)
    }

    /// The descriptor of the file of a live operation.
    pub fn fd_of(&self, op: &Op<'_>) -> Result<RawFd> {
        self.files.raw_fd(op.file).ok_or_else(|| closed_file("write"))
    }

    /// `err` as the failure of operation `idx`, with its path and the offset it reached.
    pub fn io_error(&self, idx: usize, err: io::Error) -> Error {
        match self.op(idx) {
            Some(op) => Error::io_at(self.op_name, self.files.path(op.file), op.offset + op.done as u64, err),
            None => Error::io(self.op_name, "(writer)", err),
        }
    }

    /// Ends operation `idx`: its latency is recorded, or its error kept for the caller; its
    /// staging buffer goes back to the free list.
    pub fn retire(&mut self, idx: usize, outcome: Result<Duration>) {
        let Some(op) = self.ops.get_mut(idx).and_then(Option::take) else { return };
        self.free_ops.push(idx);
        self.inflight -= 1;
        if let Ok(file) = self.files.get(FileId(op.file), "write") {
            file.inflight -= 1;
        }
        match outcome {
            Ok(latency) => self.stats.record(op.data.as_slice().len(), latency),
            Err(err) => self.fail(err),
        }
        if let OpData::Staged(buf) = op.data {
            self.give_back(buf);
        }
    }

    /// Gives up the memory of every operation still in flight: staging buffers are never
    /// freed (the kernel may still read them). For an engine that cannot wait any more.
    pub fn leak_in_flight(&mut self) {
        log::error!("cannot wait for {} writes in flight; leaking their buffers", self.inflight);
        for op in self.ops.drain(..).flatten() {
            if let OpData::Staged(buf) = op.data {
                buf.into_pool_buf().leak();
            }
        }
        self.inflight = 0;
    }

    /// An idle staging buffer, if one is free.
    pub(super) fn take_free(&mut self) -> Option<StagingBuf> {
        self.free.pop()
    }

    /// Idle staging buffers.
    #[cfg(test)]
    pub(super) fn free_buffers(&self) -> usize {
        self.free.len()
    }

    fn give_back(&mut self, mut buf: StagingBuf) {
        buf.clear();
        self.free.push(buf);
    }

    /// Puts an operation that will not start back: its buffer returns to the free list.
    fn give_back_data(&mut self, data: OpData<'a>) {
        if let OpData::Staged(buf) = data {
            self.give_back(buf);
        }
    }

    /// Takes a slot for a new operation on `file`.
    pub(super) fn begin(&mut self, file: FileId, data: OpData<'a>, offset: u64) -> Result<usize> {
        self.files.get(file, "write")?.inflight += 1;
        let op = Op { file: file.0, data, offset, done: 0, retries: 0, started: Instant::now() };
        let idx = match self.free_ops.pop() {
            Some(idx) => {
                self.ops[idx] = Some(op);
                idx
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        };
        self.inflight += 1;
        Ok(idx)
    }
}

/// A [`Writer`] made of the shared [`Core`] and one [`Engine`].
pub struct EngineWriter<'a, E: Engine<'a>> {
    /// Declared first so it is dropped first: an io_uring ring (and its registration of the
    /// buffers) is gone before the buffers go back to the pool.
    engine: E,
    core: Core<'a>,
}

impl<'a, E: Engine<'a>> EngineWriter<'a, E> {
    pub(crate) fn from_parts(engine: E, core: Core<'a>) -> Self {
        EngineWriter { engine, core }
    }

    /// The engine, for settings of its own.
    pub(crate) fn engine(&self) -> &E {
        &self.engine
    }

    /// Waits for one operation to end, then reports a failure if there was one.
    fn wait(&mut self) -> Result<()> {
        self.engine.wait(&mut self.core)?;
        self.core.check()
    }

    /// Checks that a write of `data` may start, waiting for room in the queue.
    fn admit(&mut self, file: FileId, data: &OpData<'a>, offset: u64) -> Result<()> {
        let path = &self.core.files.get(file, "write")?.path;
        let bytes = data.as_slice();
        check_direct(&self.core.report, path, bytes.as_ptr(), bytes.len(), offset)?;
        while self.core.inflight >= self.engine.max_in_flight() {
            self.wait()?;
        }
        Ok(())
    }
}

impl<'a, E: Engine<'a>> Writer<'a> for EngineWriter<'a, E> {
    fn report(&self) -> &EngineReport {
        &self.core.report
    }

    fn create(&mut self, path: &Path, len: u64) -> Result<FileId> {
        self.core.check()?;
        self.core.files.create(path, len, &self.core.report)
    }

    fn take_buffer(&mut self) -> Result<StagingBuf> {
        self.core.check()?;
        loop {
            if let Some(buf) = self.core.take_free() {
                return Ok(buf);
            }
            if self.core.inflight == 0 {
                return Err(pool_exhausted());
            }
            self.wait()?;
        }
    }

    fn return_buffer(&mut self, buf: StagingBuf) {
        self.core.give_back(buf);
    }

    fn write(&mut self, file: FileId, payload: Payload<'a>, offset: u64) -> Result<()> {
        let data = match payload {
            Payload::Staged(buf) => OpData::Staged(buf),
            Payload::Borrowed(slice) => OpData::Borrowed(slice),
        };
        let admitted = self.core.check().and_then(|()| match data.as_slice().is_empty() {
            true => Ok(false),
            false => self.admit(file, &data, offset).map(|()| true),
        });
        if !matches!(admitted, Ok(true)) {
            self.core.give_back_data(data);
            return admitted.map(drop);
        }
        let idx = self.core.begin(file, data, offset)?;
        self.engine.start(&mut self.core, idx)
    }

    fn finish(&mut self, file: FileId, len: u64) -> Result<()> {
        self.core.check()?;
        while self.core.files.get(file, "finish")?.inflight > 0 {
            self.wait()?;
        }
        let open = self.core.files.take(file, "finish")?;
        truncate_and_sync(&open.file, &open.path, len, self.core.fsync)
    }

    fn stats(&self) -> &IoStats {
        &self.core.stats
    }
}

impl<'a, E: Engine<'a>> Drop for EngineWriter<'a, E> {
    fn drop(&mut self) {
        // Every operation points into memory this writer holds: wait for all of them first.
        self.engine.drain(&mut self.core);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::config::EngineKind;
    use crate::io::PoolBuf;

    /// Completes operations in the order started, each with the next scripted outcome
    /// (`true`: written; `false`: EIO). Writes nothing.
    struct Scripted {
        started: VecDeque<usize>,
        outcomes: VecDeque<bool>,
        depth: usize,
    }

    impl<'a> Engine<'a> for Scripted {
        fn max_in_flight(&self) -> usize {
            self.depth
        }

        fn start(&mut self, _core: &mut Core<'a>, idx: usize) -> Result<()> {
            self.started.push_back(idx);
            Ok(())
        }

        fn wait(&mut self, core: &mut Core<'a>) -> Result<()> {
            let idx = self.started.pop_front().expect("something is in flight");
            let outcome = match self.outcomes.pop_front().unwrap_or(true) {
                true => Ok(Duration::from_micros(1)),
                false => Err(core.io_error(idx, io::Error::from_raw_os_error(libc::EIO))),
            };
            core.retire(idx, outcome);
            Ok(())
        }

        fn drain(&mut self, core: &mut Core<'a>) {
            while core.in_flight() > 0 {
                let _ = self.wait(core);
            }
        }
    }

    fn report() -> EngineReport {
        EngineReport {
            requested: EngineKind::Pwrite,
            engine: EngineKind::Pwrite,
            direct_io: false,
            registered_buffers: false,
            align: 4096,
            mem_align: 4096,
            queue_depth: 2,
            offload_writes: false,
            fallbacks: Vec::new(),
        }
    }

    fn writer(outcomes: &[bool], buffers: usize) -> EngineWriter<'static, Scripted> {
        let free = (0..buffers).map(|_| StagingBuf::new(PoolBuf::detached(4096), None)).collect();
        let engine =
            Scripted { started: VecDeque::new(), outcomes: outcomes.iter().copied().collect(), depth: 2 };
        EngineWriter::from_parts(engine, Core::new(report(), FsyncPolicy::Never, "write", free))
    }

    fn staged(w: &mut EngineWriter<'static, Scripted>) -> Payload<'static> {
        let mut buf = w.take_buffer().expect("buffer");
        buf.extend_from_slice(&[7; 4096]);
        Payload::Staged(buf)
    }

    #[test]
    fn buffers_cycle_through_the_free_list_and_the_queue_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(&[], 2);
        let file = w.create(&dir.path().join("f"), 5 * 4096).expect("create");
        for i in 0..5u64 {
            let payload = staged(&mut w);
            w.write(file, payload, i * 4096).expect("write");
            assert!(w.core.in_flight() <= 2);
        }
        w.finish(file, 5 * 4096).expect("finish");
        assert_eq!(w.stats().ops, 5);
        assert_eq!(w.core.free_buffers(), 2, "every buffer is back");
        assert!(w.write(file, Payload::Borrowed(&[1]), 0).is_err(), "closed file");
    }

    #[test]
    fn the_first_error_is_reported_once_then_the_writer_is_poisoned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(&[true, false], 2);
        let file = w.create(&dir.path().join("f"), 3 * 4096).expect("create");
        for i in 0..2u64 {
            let payload = staged(&mut w);
            w.write(file, payload, i * 4096).expect("queued");
        }
        let err = w.finish(file, 2 * 4096).expect_err("the second write failed");
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(err.to_string().contains("at offset 4096"), "{err}");
        for later in
            [w.take_buffer().map(drop), w.finish(file, 0), w.create(&dir.path().join("g"), 0).map(drop)]
        {
            let later = later.expect_err("poisoned");
            assert!(later.to_string().contains("earlier write"), "{later}");
        }
        let buf = StagingBuf::new(PoolBuf::detached(4096), None);
        assert!(w.write(file, Payload::Staged(buf), 0).is_err());
        assert_eq!(w.core.free_buffers(), 3, "a refused write's buffer goes back to the free list");
    }

    #[test]
    fn an_exhausted_pool_is_an_internal_error() {
        let mut w = writer(&[], 1);
        let held = w.take_buffer().expect("the only buffer");
        match w.take_buffer() {
            Err(Error::Internal(what)) => assert!(what.contains("exhausted"), "{what}"),
            other => panic!("expected an internal error, got {other:?}"),
        }
        w.return_buffer(held);
        assert!(w.take_buffer().is_ok());
    }
}
