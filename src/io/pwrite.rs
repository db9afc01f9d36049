//! The thread-pool engine: `pwrite`/`pread` (with O_DIRECT) on a few threads, for kernels
//! and containers where io_uring is unavailable. Same buffers and promises as io_uring.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::aligned::round_up;
use super::file::{
    check_direct, check_read, open_for_write, preallocate, truncate_and_sync, zero_past_eof, ReadFiles,
};
use super::{
    is_transient, poisoned, AlignedBuf, EngineReport, FileId, IoStats, Payload, Reader, StagingBuf, Writer,
};
use crate::config::{Config, FsyncPolicy};
use crate::{Error, Result};

#[derive(Clone, Copy)]
enum Direction {
    Write,
    Read,
}

/// One transfer for a worker. `ptr` stays valid until the worker's reply is received: the
/// submitting side keeps the memory alive and waits for every reply before releasing it.
struct Job {
    id: usize,
    direction: Direction,
    fd: RawFd,
    ptr: usize,
    len: usize,
    offset: u64,
}

struct Done {
    id: usize,
    result: io::Result<usize>,
    latency: Duration,
}

/// A few threads that each run one blocking transfer at a time.
struct Pool {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(threads: usize) -> Result<Pool> {
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("uring-ckpt-io-{i}"))
                .spawn(move || worker(&job_rx, &done_tx))
                .map_err(|e| Error::io("spawn I/O thread", "(pwrite pool)", e))?;
            handles.push(handle);
        }
        Ok(Pool { jobs: Some(job_tx), done: done_rx, threads: handles })
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            // Workers only exit once the sender is dropped, so sending cannot fail here.
            let _ = jobs.send(job);
        }
    }

    fn recv(&self) -> Done {
        self.done.recv().unwrap_or_else(|_| Done {
            id: usize::MAX,
            result: Err(io::Error::other("I/O worker thread died")),
            latency: Duration::ZERO,
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs.take();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

fn worker(jobs: &Mutex<Receiver<Job>>, done: &Sender<Done>) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
            Err(_) => return,
        };
        let started = Instant::now();
        let result = transfer(&job);
        let _ = done.send(Done { id: job.id, result, latency: started.elapsed() });
    }
}

/// Moves all `len` bytes (or, reading, up to end of file), resubmitting short transfers
/// and retrying EINTR/EAGAIN.
fn transfer(job: &Job) -> io::Result<usize> {
    let mut done = 0usize;
    let mut retries = 0u32;
    while done < job.len {
        let ptr = (job.ptr + done) as *mut libc::c_void;
        let mut remaining = job.len - done;
        let offset = (job.offset + done as u64) as libc::off_t;
        let injected = match job.direction {
            Direction::Write => crate::failpoint::write("pwrite.write"),
            Direction::Read => None,
        };
        if let Some(Ok(())) = injected {
            remaining = crate::failpoint::short_len(remaining, 4096);
        }
        let res = match injected {
            Some(Err(e)) => Err(e),
            // SAFETY: ptr..ptr+remaining lies inside memory the submitter keeps alive (and,
            // for reads, exclusively borrowed) until it has received this job's reply.
            _ => match unsafe {
                match job.direction {
                    Direction::Write => libc::pwrite(job.fd, ptr, remaining, offset),
                    Direction::Read => libc::pread(job.fd, ptr, remaining, offset),
                }
            } {
                n if n < 0 => Err(io::Error::last_os_error()),
                n => Ok(n as usize),
            },
        };
        let res = match res {
            Ok(n) => n,
            Err(err) => {
                if is_transient(&err) && retries < 64 {
                    retries += 1;
                    continue;
                }
                return Err(err);
            }
        };
        if res == 0 {
            return match job.direction {
                Direction::Write => Err(io::Error::new(io::ErrorKind::WriteZero, "pwrite returned 0 bytes")),
                Direction::Read => Ok(done),
            };
        }
        done += res;
    }
    Ok(done)
}

enum OpData<'a> {
    Staged(StagingBuf),
    Borrowed(&'a [u8]),
}

struct PwriteOp<'a> {
    file: usize,
    data: OpData<'a>,
    offset: u64,
}

struct OpenFile {
    file: File,
    path: PathBuf,
    inflight: usize,
}

/// Writes through the thread pool.
pub struct PwriteWriter<'a> {
    pool: Pool,
    report: EngineReport,
    fsync: FsyncPolicy,
    files: Vec<Option<OpenFile>>,
    free: Vec<StagingBuf>,
    ops: Vec<Option<PwriteOp<'a>>>,
    free_ops: Vec<usize>,
    inflight: usize,
    error: Option<Error>,
    failed: bool,
    stats: IoStats,
    _borrows: PhantomData<&'a [u8]>,
}

impl<'a> PwriteWriter<'a> {
    /// Starts `io_threads` workers.
    pub fn new(config: &Config, mut report: EngineReport, buffers: Vec<AlignedBuf>) -> Result<Self> {
        report.registered_buffers = false;
        report.queue_depth = config.io_threads;
        Ok(PwriteWriter {
            pool: Pool::new(config.io_threads as usize)?,
            report,
            fsync: config.fsync,
            files: Vec::new(),
            free: buffers.into_iter().map(|b| StagingBuf::new(b, None)).collect(),
            ops: Vec::new(),
            free_ops: Vec::new(),
            inflight: 0,
            error: None,
            failed: false,
            stats: IoStats::default(),
            _borrows: PhantomData,
        })
    }

    fn check(&mut self) -> Result<()> {
        if let Some(err) = self.error.take() {
            self.failed = true;
            return Err(err);
        }
        if self.failed {
            return Err(poisoned());
        }
        Ok(())
    }

    fn wait_one(&mut self) {
        let done = self.pool.recv();
        let Some(op) = self.ops.get_mut(done.id).and_then(Option::take) else {
            self.error.get_or_insert(Error::io(
                "write",
                "(pwrite pool)",
                done.result.err().unwrap_or_else(|| io::Error::other("lost reply")),
            ));
            self.inflight = 0;
            return;
        };
        self.free_ops.push(done.id);
        self.inflight -= 1;
        let len = match &op.data {
            OpData::Staged(buf) => buf.len(),
            OpData::Borrowed(slice) => slice.len(),
        };
        let file = self.files[op.file].as_mut();
        match done.result {
            Ok(_) => self.stats.record(len, done.latency),
            Err(e) => {
                let path = file.as_ref().map(|f| f.path.clone()).unwrap_or_default();
                self.error.get_or_insert(Error::io_at("pwrite", path, op.offset, e));
            }
        }
        if let Some(file) = file {
            file.inflight -= 1;
        }
        if let OpData::Staged(mut buf) = op.data {
            buf.clear();
            self.free.push(buf);
        }
    }
}

impl<'a> Writer<'a> for PwriteWriter<'a> {
    fn report(&self) -> &EngineReport {
        &self.report
    }

    fn create(&mut self, path: &Path, len: u64) -> Result<FileId> {
        self.check()?;
        let file = open_for_write(path, self.report.direct_io)?;
        preallocate(&file, path, len, &self.report);
        self.files.push(Some(OpenFile { file, path: path.to_path_buf(), inflight: 0 }));
        Ok(FileId(self.files.len() - 1))
    }

    fn take_buffer(&mut self) -> Result<StagingBuf> {
        self.check()?;
        while self.free.is_empty() {
            if self.inflight == 0 {
                return Err(Error::Config("staging pool exhausted: every buffer is lent out".into()));
            }
            self.wait_one();
            self.check()?;
        }
        Ok(self.free.pop().expect("free list is not empty"))
    }

    fn return_buffer(&mut self, mut buf: StagingBuf) {
        buf.clear();
        self.free.push(buf);
    }

    fn write(&mut self, file: FileId, payload: Payload<'a>, offset: u64) -> Result<()> {
        self.check()?;
        let (fd, path) = match self.files.get(file.0).and_then(Option::as_ref) {
            Some(f) => (f.file.as_raw_fd(), f.path.clone()),
            None => {
                return Err(Error::io("write", "(closed file)", io::Error::from_raw_os_error(libc::EBADF)))
            }
        };
        let data = match payload {
            Payload::Staged(buf) if buf.is_empty() => {
                self.return_buffer(buf);
                return Ok(());
            }
            Payload::Borrowed([]) => return Ok(()),
            Payload::Staged(buf) => OpData::Staged(buf),
            Payload::Borrowed(slice) => OpData::Borrowed(slice),
        };
        let (ptr, len) = match &data {
            OpData::Staged(buf) => (buf.as_ptr(), buf.len()),
            OpData::Borrowed(slice) => (slice.as_ptr(), slice.len()),
        };
        if let Err(err) = check_direct(&self.report, &path, ptr, len, offset) {
            if let OpData::Staged(buf) = data {
                self.return_buffer(buf);
            }
            return Err(err);
        }
        // Keep at most two transfers per thread queued so back-pressure reaches the caller.
        while self.inflight >= 2 * self.report.queue_depth as usize {
            self.wait_one();
            self.check()?;
        }
        let op = PwriteOp { file: file.0, data, offset };
        let id = match self.free_ops.pop() {
            Some(id) => {
                self.ops[id] = Some(op);
                id
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        };
        if let Some(f) = self.files[file.0].as_mut() {
            f.inflight += 1;
        }
        self.inflight += 1;
        self.pool.send(Job { id, direction: Direction::Write, fd, ptr: ptr as usize, len, offset });
        Ok(())
    }

    fn finish(&mut self, file: FileId, len: u64) -> Result<()> {
        self.check()?;
        loop {
            let pending = match self.files.get(file.0).and_then(Option::as_ref) {
                Some(f) => f.inflight,
                None => {
                    return Err(Error::io(
                        "finish",
                        "(closed file)",
                        io::Error::from_raw_os_error(libc::EBADF),
                    ))
                }
            };
            if pending == 0 {
                break;
            }
            self.wait_one();
            self.check()?;
        }
        let open = self.files[file.0].take().expect("checked above");
        truncate_and_sync(&open.file, &open.path, len, self.fsync)
    }

    fn stats(&self) -> &IoStats {
        &self.stats
    }

    fn into_buffers(mut self: Box<Self>) -> Vec<AlignedBuf> {
        while self.inflight > 0 {
            self.wait_one();
        }
        std::mem::take(&mut self.free).into_iter().map(|b| b.into_parts().0).collect()
    }
}

impl Drop for PwriteWriter<'_> {
    fn drop(&mut self) {
        // Every job points into memory this writer holds: wait for all replies first.
        while self.inflight > 0 {
            self.wait_one();
        }
    }
}

/// Reads through the thread pool.
pub struct PwriteReader {
    pool: Pool,
    report: EngineReport,
    chunk: usize,
    files: ReadFiles,
    stats: IoStats,
}

impl PwriteReader {
    /// Starts `io_threads` workers.
    pub fn new(config: &Config, mut report: EngineReport) -> Result<Self> {
        report.queue_depth = config.io_threads;
        Ok(PwriteReader {
            pool: Pool::new(config.io_threads as usize)?,
            report,
            chunk: config.chunk_size as usize,
            files: ReadFiles::default(),
            stats: IoStats::default(),
        })
    }
}

impl Reader for PwriteReader {
    fn report(&self) -> &EngineReport {
        &self.report
    }

    fn open(&mut self, dir: &super::Dir, name: &str) -> Result<(FileId, u64)> {
        self.files.open(&mut self.report, dir, name)
    }

    fn read_at(&mut self, file: FileId, dst: &mut [u8], offset: u64, len: usize) -> Result<()> {
        let open = self.files.get(file)?;
        let (fd, path, file_len) = (open.file.as_raw_fd(), open.path.clone(), open.len);
        let span = if self.report.direct_io { round_up(len, self.report.align) } else { len };
        check_read(&path, dst, offset, len, span, file_len, self.report.mem_align)?;
        let base = dst.as_mut_ptr() as usize;
        let mut wants = Vec::new();
        let mut at = 0usize;
        while at < span {
            let n = self.chunk.min(span - at);
            let want = file_len.saturating_sub(offset + at as u64).min(n as u64) as usize;
            if want > 0 {
                // Direct reads need the full aligned length even when the file ends inside it.
                let len = if self.report.direct_io { n } else { want };
                self.pool.send(Job {
                    id: wants.len(),
                    direction: Direction::Read,
                    fd,
                    ptr: base + at,
                    len,
                    offset: offset + at as u64,
                });
                wants.push((offset + at as u64, want));
            }
            at += n;
        }
        let mut error = None;
        for _ in 0..wants.len() {
            let done = self.pool.recv();
            let Some(&(piece_offset, want)) = wants.get(done.id) else {
                error.get_or_insert(Error::io("read", &path, io::Error::other("I/O worker thread died")));
                continue;
            };
            match done.result {
                Ok(n) if n >= want => self.stats.record(want, done.latency),
                Ok(n) => {
                    let err = io::Error::new(io::ErrorKind::UnexpectedEof, "file ended early");
                    error.get_or_insert(Error::io_at("read", &path, piece_offset + n as u64, err));
                }
                Err(e) => {
                    error.get_or_insert(Error::io_at("pread", &path, piece_offset, e));
                }
            }
        }
        if let Some(err) = error {
            return Err(err);
        }
        zero_past_eof(dst, offset, span, file_len);
        Ok(())
    }

    fn close(&mut self, file: FileId) {
        self.files.close(file);
    }

    fn stats(&self) -> &IoStats {
        &self.stats
    }
}
