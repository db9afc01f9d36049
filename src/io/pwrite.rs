//! The thread-pool engine: `pwrite`/`pread` (with O_DIRECT) on a few threads, for kernels
//! and containers where io_uring is unavailable. Same buffers and promises as io_uring.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::aligned::round_up;
use super::core::{Core, Engine, EngineWriter};
use super::file::{check_read, zero_past_eof, ReadFiles};
use super::{is_transient, EngineReport, FileId, IoStats, PoolBuf, Reader, StagingBuf};
use crate::config::Config;
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

/// The thread-pool side of a writer: each operation is one job for a worker thread, which
/// writes all of it (see `transfer`). Files, operations and buffers are the writer core's.
pub struct PwriteEngine {
    pool: Pool,
    depth: usize,
}

/// Writes through the thread pool.
pub type PwriteWriter<'a> = EngineWriter<'a, PwriteEngine>;

impl<'a> EngineWriter<'a, PwriteEngine> {
    /// Starts `io_threads` workers.
    pub fn new(config: &Config, mut report: EngineReport, buffers: Vec<PoolBuf>) -> Result<Self> {
        report.registered_buffers = false;
        report.queue_depth = config.io_threads;
        // Keep at most two transfers per thread queued so back-pressure reaches the caller.
        let engine = PwriteEngine {
            pool: Pool::new(config.io_threads as usize)?,
            depth: 2 * config.io_threads as usize,
        };
        let free = buffers.into_iter().map(|b| StagingBuf::new(b, None)).collect();
        Ok(EngineWriter::from_parts(engine, Core::new(report, config.fsync, "pwrite", free)))
    }
}

impl<'a> Engine<'a> for PwriteEngine {
    fn max_in_flight(&self) -> usize {
        self.depth
    }

    fn start(&mut self, core: &mut Core<'a>, id: usize) -> Result<()> {
        let op = core.op(id).ok_or_else(|| Error::Internal(format!("write {id} is not in flight")))?;
        let fd = core.fd_of(op)?;
        let bytes = op.data.as_slice();
        let (ptr, len) = (bytes.as_ptr() as usize, bytes.len());
        self.pool.send(Job { id, direction: Direction::Write, fd, ptr, len, offset: op.offset });
        Ok(())
    }

    fn wait(&mut self, core: &mut Core<'a>) -> Result<()> {
        let done = self.pool.recv();
        if core.op(done.id).is_none() {
            let err = done.result.err().unwrap_or_else(|| io::Error::other("lost reply"));
            core.abandon(Error::io("write", "(pwrite pool)", err));
            return Ok(());
        }
        let outcome = done.result.map(|_| done.latency).map_err(|e| core.io_error(done.id, e));
        core.retire(done.id, outcome);
        Ok(())
    }

    fn drain(&mut self, core: &mut Core<'a>) {
        while core.in_flight() > 0 {
            let _ = self.wait(core);
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
