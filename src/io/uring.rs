//! The io_uring engine: O_DIRECT files, staging buffers registered with the ring
//! (`WriteFixed`), many SQEs per `submit`, at most `queue_depth` operations (and 64 MiB) in flight,
//! completions run cooperatively (`COOP_TASKRUN`: no interrupt per completion).
//!
//! Every operation owns (or borrows for `'a`) its memory until its completion arrives;
//! dropping the writer first drains the ring so the kernel never writes from freed memory.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types, IoUring};

use super::core::{Core, Engine, EngineWriter, OpData};
use super::file::ReadFile;
use super::reader::{EngineReader, ReadCompletion, ReadEngine, ReadLimits, ReadRequest};
use super::{is_transient, probe, resultify, EngineReport, IoStats, PoolBuf, StagingBuf};
use crate::config::Config;
use crate::error::{Error, Result};

/// Transient errors (EINTR/EAGAIN/EBUSY) tolerated for one operation before giving up.
const MAX_RETRIES: u32 = 64;

/// Bytes of writes one ring keeps in flight at most, whatever the queue depth: with 8 MiB
/// chunks a depth of 32 would queue 256 MiB, more than a block queue takes without waiting
/// for request tags (loop: 128 x 1.25 MiB). The kernel then fails the non-blocking attempt of
/// most writes and hands them to io-wq threads that sleep on tags, which costs context
/// switches and, on a busy machine, throughput; 64 MiB still keeps 8 such writes (and twice
/// what the pwrite pool has) in flight.
const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;

/// Writes in flight at most for `queue_depth` and `chunk_size`: the queue depth, capped by
/// [`MAX_IN_FLIGHT_BYTES`], and never under two (double buffering).
fn write_depth(queue_depth: u32, chunk_size: u64) -> usize {
    let by_bytes = (MAX_IN_FLIGHT_BYTES / chunk_size.max(1)).max(2);
    (queue_depth as u64).min(by_bytes) as usize
}

/// Sets up a ring of at least `queue_depth` entries, honouring the simulated EPERM.
///
/// The ring runs completions cooperatively (`IORING_SETUP_COOP_TASKRUN`, Linux 5.19): the
/// kernel does not interrupt the thread (an IPI and a kernel entry in the middle of its copy
/// and CRC loop) for each completion, but posts them at its next system call. Every ring here
/// is driven by the one thread that waits on it, and it always waits inside
/// `io_uring_enter`, so no completion waits longer. On the RAM-backed XFS this cut the save's
/// CPU from 0.146 to 0.130 s/GiB (median of 9 alternating runs, README). A kernel that does
/// not know the flag refuses it (EINVAL): the ring is then set up without it.
fn build_ring(config: &Config) -> io::Result<IoUring> {
    if config.simulate.uring_setup_eperm {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    crate::failpoint::io("uring.setup")?;
    let entries = config.queue_depth.next_power_of_two().max(2);
    with_coop_fallback(|coop| {
        let mut builder = IoUring::builder();
        if config.sqpoll {
            builder.setup_sqpoll(1000);
        }
        if coop {
            builder.setup_coop_taskrun();
        }
        builder.build(entries)
    })
    .map(|(ring, _coop)| ring)
}

/// Runs `build` with cooperative task running, and again without it if the kernel refuses
/// the flag (EINVAL); returns what it built and whether the flag is on.
fn with_coop_fallback<T>(mut build: impl FnMut(bool) -> io::Result<T>) -> io::Result<(T, bool)> {
    match build(true) {
        Ok(built) => Ok((built, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            log::debug!("io_uring refused IORING_SETUP_COOP_TASKRUN ({e}); setting up without it");
            build(false).map(|built| (built, false))
        }
        Err(e) => Err(e),
    }
}

/// The io_uring side of a writer: the ring and its batching of SQEs. Files, operations and
/// buffers are the writer core's.
pub struct UringEngine {
    ring: IoUring,
    depth: usize,
    unsubmitted: usize,
    batch: usize,
    /// Every write goes to io-wq at submission (`IOSQE_ASYNC`: [`EngineReport::offload_writes`]).
    offload: bool,
}

/// Writes through io_uring.
pub type UringWriter<'a> = EngineWriter<'a, UringEngine>;

impl<'a> EngineWriter<'a, UringEngine> {
    /// Sets up the ring and registers the staging buffers lent to this writer with it
    /// (`WriteFixed` slots). The registration lasts as long as the ring, which is closed
    /// before the buffers go back to the pool. On failure the buffers come back with the
    /// error, so the caller can fall back to another engine.
    pub fn new(
        config: &Config,
        mut report: EngineReport,
        buffers: Vec<PoolBuf>,
    ) -> std::result::Result<Self, (Error, Vec<PoolBuf>)> {
        let ring = match build_ring(config) {
            Ok(ring) => ring,
            Err(e) => return Err((Error::io("io_uring_setup", "(ring)", e), buffers)),
        };
        report.registered_buffers = false;
        if config.register_buffers && buffers.len() <= usize::from(u16::MAX) {
            let result = if config.simulate.register_enomem {
                Err(io::Error::from_raw_os_error(libc::ENOMEM))
            } else if let Some(e) = crate::failpoint::error("uring.register") {
                Err(e)
            } else {
                let iovecs: Vec<libc::iovec> = buffers
                    .iter()
                    .map(|b| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.capacity() })
                    .collect();
                // SAFETY: every iovec describes a live buffer lent to this writer. The
                // kernel pins the registered pages until the table goes with the ring, so
                // no memory is reused under it even if a buffer leaves the writer early
                // (dropped by a failing stream, it goes back to the pool); and only a
                // StagingBuf of this writer names a slot, for the memory registered there.
                // The ring is dropped before the writer's core, so the buffers the writer
                // holds go back to the pool after the registration has ended.
                unsafe { ring.submitter().register_buffers(&iovecs) }
            };
            match result {
                Ok(()) => report.registered_buffers = true,
                Err(e) => probe::registration_refused(&mut report, &e),
            }
        }
        let registered = report.registered_buffers;
        let free = buffers
            .into_iter()
            .enumerate()
            .map(|(i, b)| StagingBuf::new(b, registered.then_some(i as u16)))
            .collect();
        let depth = write_depth(config.queue_depth, config.chunk_size);
        let offload = report.offload_writes;
        let engine = UringEngine { ring, depth, unsubmitted: 0, batch: (depth / 4).max(1), offload };
        Ok(EngineWriter::from_parts(engine, Core::new(report, config.fsync, "write", free)))
    }
}

impl EngineWriter<'_, UringEngine> {
    /// Caps the io-wq workers of this writer's ring at `cap` (bounded and unbounded each),
    /// for a save in the background. Best effort: a kernel without the limit (before 5.15)
    /// keeps its own, which is logged.
    pub fn cap_io_workers(&self, cap: u32) {
        let mut max = [cap.max(1), cap.max(1)];
        if let Err(e) = self.engine().ring.submitter().register_iowq_max_workers(&mut max) {
            log::debug!("io_uring kept its io-wq worker limit ({e})");
        }
    }
}

impl UringEngine {
    /// Pushes the SQE for the unwritten rest of operation `idx`.
    fn push(&mut self, core: &mut Core<'_>, idx: usize) -> Result<()> {
        let sqe = {
            let op = core.op(idx).ok_or_else(|| Error::Internal(format!("write {idx} is not in flight")))?;
            let fd = types::Fd(core.fd_of(op)?);
            let bytes = op.data.as_slice();
            let ptr = bytes[op.done..].as_ptr();
            let mut len = (bytes.len() - op.done) as u32;
            if let Some(Ok(())) = crate::failpoint::write("uring.write.submit") {
                len = crate::failpoint::short_len(len as usize, core.report.align) as u32;
            }
            let offset = op.offset + op.done as u64;
            match &op.data {
                OpData::Staged(buf) if op.done == 0 && buf.slot.is_some() => {
                    let slot = buf.slot.unwrap_or_default();
                    opcode::WriteFixed::new(fd, ptr, len, slot).offset(offset).build()
                }
                _ => opcode::Write::new(fd, ptr, len).offset(offset).build(),
            }
            .user_data(idx as u64)
        };
        let sqe = if self.offload { sqe.flags(squeue::Flags::ASYNC) } else { sqe };
        loop {
            // SAFETY: the SQE points into memory owned by (Staged) or borrowed for 'a by
            // (Borrowed) operation `idx` of the core, which stays there until its completion
            // is reaped; the writer's drop drains every completion before that memory can go.
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                break;
            }
            self.submit(core, 0)?; // queue full: hand what is queued to the kernel first
        }
        self.unsubmitted += 1;
        Ok(())
    }

    /// Submits queued SQEs and waits for `want` completions, retrying EINTR.
    fn submit(&mut self, core: &mut Core<'_>, want: usize) -> Result<()> {
        let mut again = 0u32;
        loop {
            let result = match crate::failpoint::error("uring.submit") {
                Some(injected) => Err(injected),
                None if want == 0 => self.ring.submit(),
                None => self.ring.submit_and_wait(want),
            };
            match result {
                Ok(_) => {
                    core.stats.submits += 1;
                    core.stats.sqes_submitted += self.unsubmitted as u64;
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && again < MAX_RETRIES => {
                    // The kernel is short of resources for now: reap, then try again.
                    again += 1;
                    self.reap(core);
                    std::thread::yield_now();
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full: reap before submitting more.
                    self.reap(core);
                    if want > 0 {
                        return Ok(());
                    }
                }
                Err(e) => return Err(Error::io("io_uring_enter", "(ring)", e)),
            }
        }
    }

    /// Handles every completion in the queue.
    fn reap(&mut self, core: &mut Core<'_>) {
        let done: Vec<(u64, i32)> =
            self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())).collect();
        for (user_data, res) in done {
            self.complete(core, user_data as usize, res);
        }
    }

    /// Handles the completion `res` of operation `idx`: a short write or a transient error
    /// resubmits the rest, anything else retires it.
    fn complete(&mut self, core: &mut Core<'_>, idx: usize, res: i32) {
        let res = match crate::failpoint::error("uring.write.complete") {
            Some(injected) => -injected.raw_os_error().unwrap_or(libc::EIO),
            None => res,
        };
        let Some(op) = core.op_mut(idx) else { return };
        let outcome = match resultify(res) {
            Ok(0) => Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0 bytes")),
            Ok(n) => {
                op.done += n;
                if op.done < op.data.as_slice().len() {
                    return self.resubmit(core, idx); // short write: submit the rest
                }
                Ok(op.started.elapsed())
            }
            Err(e) if is_transient(&e) && op.retries < MAX_RETRIES => {
                op.retries += 1;
                return self.resubmit(core, idx);
            }
            Err(e) => Err(e),
        };
        let outcome = outcome.map_err(|e| core.io_error(idx, e));
        core.retire(idx, outcome);
    }

    fn resubmit(&mut self, core: &mut Core<'_>, idx: usize) {
        if let Err(err) = self.push(core, idx) {
            core.retire(idx, Err(err));
        }
    }
}

impl<'a> Engine<'a> for UringEngine {
    fn max_in_flight(&self) -> usize {
        self.depth
    }

    fn start(&mut self, core: &mut Core<'a>, idx: usize) -> Result<()> {
        self.push(core, idx)?;
        if self.unsubmitted >= self.batch {
            self.submit(core, 0)?;
        }
        Ok(())
    }

    fn wait(&mut self, core: &mut Core<'a>) -> Result<()> {
        self.submit(core, 1)?;
        self.reap(core);
        Ok(())
    }

    fn drain(&mut self, core: &mut Core<'a>) {
        while core.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.reap(core),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap(core),
                Err(e) => {
                    // The kernel may still use these buffers: leak them rather than free
                    // memory it could write from.
                    log::error!("cannot drain io_uring ({e})");
                    core.leak_in_flight();
                    break;
                }
            }
        }
    }
}

/// The io_uring side of a reader: the ring. Files, pieces and their bookkeeping are the
/// reader core's.
pub struct UringReadEngine {
    ring: IoUring,
    /// Pieces pushed and not yet completed.
    inflight: usize,
}

/// Reads through io_uring.
pub type UringReader = EngineReader<UringReadEngine>;

impl EngineReader<UringReadEngine> {
    /// Sets up the ring.
    pub fn new(config: &Config, report: EngineReport) -> Result<Self> {
        let ring = build_ring(config).map_err(|e| Error::io("io_uring_setup", "(ring)", e))?;
        let limits = ReadLimits {
            op_name: "read",
            max_in_flight: write_depth(report.queue_depth, config.chunk_size),
            piece_len: config.chunk_size as usize,
            mem_align: report.mem_align,
        };
        Ok(EngineReader::from_parts(UringReadEngine { ring, inflight: 0 }, limits, report))
    }
}

impl ReadEngine for UringReadEngine {
    fn start(&mut self, file: &ReadFile, idx: usize, request: ReadRequest) {
        let fd = types::Fd(file.file.as_raw_fd());
        let sqe = opcode::Read::new(fd, request.dst, request.len as u32)
            .offset(request.offset)
            .build()
            .user_data(idx as u64);
        loop {
            // SAFETY: the destination lies inside the memory the reader core keeps borrowed
            // until this piece's completion has been reaped (see `ReadRequest`); `wait` does
            // not fail before every piece in flight has completed.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                break;
            }
            let _ = self.ring.submit();
        }
        self.inflight += 1;
    }

    fn wait(&mut self, file: &ReadFile, stats: &mut IoStats) -> Result<Vec<ReadCompletion>> {
        let mut waited = self.ring.submit_and_wait(1);
        while matches!(&waited, Err(e) if e.raw_os_error() == Some(libc::EINTR)) {
            waited = self.ring.submit_and_wait(1);
        }
        if let Err(e) = waited {
            // Pieces may still be in flight into the destination: wait them out first.
            drain_ring(&mut self.ring, self.inflight);
            self.inflight = 0;
            return Err(Error::io("io_uring_enter", &file.path, e));
        }
        stats.submits += 1;
        let done: Vec<ReadCompletion> =
            self.ring.completion().map(|c| (c.user_data() as usize, resultify(c.result()), None)).collect();
        self.inflight -= done.len().min(self.inflight);
        Ok(done)
    }
}

/// Waits for `inflight` completions, ignoring their results (used on the error path so
/// that no read still targets memory the caller gets back).
fn drain_ring(ring: &mut IoUring, mut inflight: usize) {
    while inflight > 0 {
        match ring.submit_and_wait(1) {
            Ok(_) => inflight -= ring.completion().count().min(inflight),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(_) => {
                // Cannot wait: sleep-poll rather than return while the kernel may write.
                std::thread::sleep(std::time::Duration::from_millis(1));
                inflight -= ring.completion().count().min(inflight);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FsyncPolicy;
    use crate::io::pool::{staging_align, Shape, StagingPool};
    use crate::io::FileId;
    use std::path::Path;

    const LEN: usize = 8192;

    /// A core with one staging buffer holding `LEN` bytes queued as operation 0 on a fresh
    /// file (not started), and an engine with a ring; the data written is `data`.
    fn setup(dir: &Path, data: &[u8]) -> (UringEngine, Core<'static>, usize, FileId, StagingPool) {
        let config = Config::builder().chunk_size(64 * 1024).queue_depth(4).build().expect("config");
        let report = probe::plan(&config, dir).expect("plan");
        let pool = StagingPool::new();
        let shape = Shape { chunk: 64 * 1024, align: staging_align(report.align, report.mem_align) };
        let free = pool.lend(shape, 1).into_iter().map(|b| StagingBuf::new(b, None)).collect();
        let engine = UringEngine {
            ring: build_ring(&config).expect("ring"),
            depth: 4,
            unsubmitted: 0,
            batch: 1,
            offload: false,
        };
        let mut core = Core::new(report, FsyncPolicy::Never, "write", free);
        let file = core.files.create(&dir.join("f"), LEN as u64, &core.report.clone()).expect("create");
        let mut buf = core.take_free().expect("buffer");
        buf.extend_from_slice(data);
        let idx = core.begin(file, OpData::Staged(buf), 0).expect("begin");
        (engine, core, idx, file, pool)
    }

    fn finish(engine: &mut UringEngine, core: &mut Core<'_>, file: FileId) -> Vec<u8> {
        while core.in_flight() > 0 {
            engine.wait(core).expect("wait");
        }
        let open = core.files.take(file, "finish").expect("open");
        std::fs::read(&open.path).expect("read back")
    }

    fn scratch() -> tempfile::TempDir {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("tmp");
        std::fs::create_dir_all(&base).expect("target/tmp");
        tempfile::tempdir_in(base).expect("scratch")
    }

    #[test]
    fn bytes_in_flight_are_capped_but_double_buffering_stays() {
        assert_eq!(write_depth(32, 8 << 20), 8);
        assert_eq!(write_depth(32, 1 << 20), 32);
        assert_eq!(write_depth(4, 1 << 20), 4);
        assert_eq!(write_depth(1, 1 << 20), 1, "a depth of one is honoured");
        assert_eq!(write_depth(32, 256 << 20), 2);
    }

    #[test]
    fn rings_run_completions_cooperatively_unless_the_kernel_refuses() {
        let mut asked = Vec::new();
        let built = with_coop_fallback(|coop| {
            asked.push(coop);
            Ok::<_, io::Error>("ring")
        });
        assert_eq!(built.expect("built"), ("ring", true));
        assert_eq!(asked, [true], "tried with the flag first");

        let mut asked = Vec::new();
        let built = with_coop_fallback(|coop| {
            asked.push(coop);
            if coop {
                Err(io::Error::from_raw_os_error(libc::EINVAL)) // a kernel before 5.19
            } else {
                Ok("ring")
            }
        });
        assert_eq!(built.expect("built without the flag"), ("ring", false));
        assert_eq!(asked, [true, false]);

        let refused = with_coop_fallback(|_| Err::<(), _>(io::Error::from_raw_os_error(libc::EPERM)));
        assert_eq!(refused.expect_err("EPERM").raw_os_error(), Some(libc::EPERM), "not retried");

        // On this kernel: with the flag from 5.19 on, and either way a ring for the engine.
        let config = Config::builder().queue_depth(4).build().expect("config");
        let probe = with_coop_fallback(|coop| {
            let mut builder: io_uring::Builder = IoUring::builder();
            if coop {
                builder.setup_coop_taskrun();
            }
            builder.build(4)
        });
        if !probe.expect("ring").1 {
            eprintln!("note: this kernel refuses COOP_TASKRUN (before 5.19); its rings run without it");
        }
        build_ring(&config).expect("the engine's ring");
    }

    #[test]
    fn a_short_completion_resubmits_the_rest() {
        let dir = scratch();
        let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8 + 1).collect();
        let (mut engine, mut core, idx, file, _pool) = setup(dir.path(), &data);
        // As if the kernel had written only the first 4096 bytes: the rest is submitted.
        engine.complete(&mut core, idx, 4096);
        assert_eq!(core.in_flight(), 1, "the rest is in flight");
        let written = finish(&mut engine, &mut core, file);
        assert_eq!(&written[4096..], &data[4096..], "the rest landed at its offset");
        assert!(written[..4096].iter().all(|&b| b == 0), "the first part was not rewritten");
        core.check().expect("no error");
        assert_eq!((core.stats.ops, core.stats.bytes), (1, LEN as u64), "one complete write");
        assert_eq!(core.free_buffers(), 1, "the buffer is back");
    }

    #[test]
    fn a_transient_error_retries_and_a_hard_one_poisons() {
        let dir = scratch();
        let data = vec![9u8; LEN];
        let (mut engine, mut core, idx, file, _pool) = setup(dir.path(), &data);
        engine.complete(&mut core, idx, -libc::EAGAIN);
        assert_eq!(finish(&mut engine, &mut core, file), data, "retried in full");
        core.check().expect("no error");

        let (mut engine, mut core, idx, _file, _pool) = setup(dir.path(), &data);
        core.op_mut(idx).expect("op").done = 4096; // as if the first half had been written
        engine.complete(&mut core, idx, -libc::EIO); // and the rest failed
        assert_eq!(core.in_flight(), 0, "a hard error retires the write");
        let err = core.check().expect_err("EIO");
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(err.to_string().contains("at offset 4096"), "{err}");
        assert!(core.check().expect_err("poisoned").to_string().contains("earlier write"));
        assert_eq!(core.free_buffers(), 1, "the failed write's buffer is back");
    }
}
