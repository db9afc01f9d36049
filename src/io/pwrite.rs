//! The thread-pool engine: `pwrite`/`pread` (with O_DIRECT) on a few threads, for kernels
//! and containers where io_uring is unavailable. Same buffers and promises as io_uring.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::core::{Core, Engine, EngineWriter};
use super::file::ReadFile;
use super::reader::{EngineReader, ReadCompletion, ReadEngine, ReadLimits, ReadRequest};
use super::{is_transient, EngineReport, IoStats, PoolBuf, StagingBuf};
use crate::config::Config;
use crate::error::{Error, Result};

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

/// A worker's reply to one job.
struct Done {
    id: usize,
    /// What the transfer did, or the message of the panic that ended it.
    result: std::result::Result<io::Result<usize>, String>,
    latency: Duration,
}

/// The error for a job whose worker panicked (a bug: transfers do not panic).
fn worker_panicked(message: &str) -> Error {
    Error::Internal(format!("an I/O worker thread of the pwrite pool panicked: {message}"))
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

    /// The next reply; an error once every worker is gone (then no job is in flight).
    fn recv(&self) -> Result<Done> {
        self.done
            .recv()
            .map_err(|_| Error::Internal("every I/O worker thread of the pwrite pool is gone".into()))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs.take();
        for handle in self.threads.drain(..) {
            if handle.join().is_err() {
                log::error!("an I/O worker thread of the pwrite pool panicked");
            }
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
        // A panic ends this job, not the worker: the submitter hears of it (and the memory
        // of the job is no longer used once the reply is sent).
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| transfer(&job)))
            .map_err(|panic| panic_message(panic.as_ref()));
        let _ = done.send(Done { id: job.id, result, latency: started.elapsed() });
    }
}

/// The message of a panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_string(),
        (None, Some(message)) => message.clone(),
        (None, None) => "(no message)".to_string(),
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
        let done = match self.pool.recv() {
            Ok(done) => done,
            Err(err) => {
                core.abandon(err); // no worker is left to reply
                return Ok(());
            }
        };
        if core.op(done.id).is_none() {
            core.fail(Error::Internal(format!(
                "the pwrite pool replied for write {}, not in flight",
                done.id
            )));
            return Ok(());
        }
        let outcome = match done.result {
            Ok(result) => result.map(|_| done.latency).map_err(|e| core.io_error(done.id, e)),
            Err(panic) => Err(worker_panicked(&panic)),
        };
        core.retire(done.id, outcome);
        Ok(())
    }

    fn drain(&mut self, core: &mut Core<'a>) {
        while core.in_flight() > 0 {
            let _ = self.wait(core);
        }
    }
}

/// The thread-pool side of a reader: each piece is one job for a worker thread, which
/// reads all of it up to the end of the file (see `transfer`). Files, pieces and their
/// bookkeeping are the reader core's.
pub struct PreadEngine {
    pool: Pool,
    /// Jobs sent and not yet answered.
    inflight: usize,
}

/// Reads through the thread pool.
pub type PwriteReader = EngineReader<PreadEngine>;

impl EngineReader<PreadEngine> {
    /// Starts `io_threads` workers.
    pub fn new(config: &Config, mut report: EngineReport) -> Result<Self> {
        report.queue_depth = config.io_threads;
        let limits = ReadLimits {
            op_name: "pread",
            // Every piece is queued at once; the workers take them in turn.
            max_in_flight: usize::MAX,
            piece_len: config.chunk_size as usize,
            mem_align: report.mem_align,
        };
        let engine = PreadEngine { pool: Pool::new(config.io_threads as usize)?, inflight: 0 };
        Ok(EngineReader::from_parts(engine, limits, report))
    }
}

impl ReadEngine for PreadEngine {
    fn start(&mut self, file: &ReadFile, idx: usize, request: ReadRequest) {
        let ReadRequest { dst, len, offset } = request;
        let job = Job {
            id: idx,
            direction: Direction::Read,
            fd: file.file.as_raw_fd(),
            ptr: dst as usize,
            len,
            offset,
        };
        self.pool.send(job);
        self.inflight += 1;
    }

    fn wait(&mut self, _file: &ReadFile, _stats: &mut IoStats) -> Result<Vec<ReadCompletion>> {
        let done = self.pool.recv().inspect_err(|_| self.inflight = 0)?;
        self.inflight -= 1;
        match done.result {
            Ok(result) => Ok(vec![(done.id, result, Some(done.latency))]),
            Err(panic) => {
                // Other jobs may still read into the destination: wait for their replies.
                while self.inflight > 0 && self.pool.recv().is_ok() {
                    self.inflight -= 1;
                }
                self.inflight = 0;
                Err(worker_panicked(&panic))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_without_workers_is_an_internal_error_not_an_io_error() {
        // Every worker gone (as after panics that ended them) looks like this to the submitter.
        let pool = Pool::new(0).expect("pool");
        let job = Job { id: 0, direction: Direction::Read, fd: -1, ptr: 0, len: 0, offset: 0 };
        pool.send(job);
        match pool.recv() {
            Err(Error::Internal(message)) => assert!(message.contains("worker"), "{message}"),
            other => panic!("expected an internal error, got {:?}", other.map(|done| done.id)),
        }
        assert!(matches!(worker_panicked("boom"), Error::Internal(m) if m.contains("boom")));
        assert_eq!(panic_message(&"static str"), "static str");
        assert_eq!(panic_message(&String::from("owned")), "owned");
    }
}
