//! The io_uring engine: O_DIRECT files, staging buffers registered with the ring
//! (`WriteFixed`), many SQEs per `submit`, at most `queue_depth` operations in flight.
//!
//! Every operation owns (or borrows for `'a`) its memory until its completion arrives;
//! dropping the writer first drains the ring so the kernel never writes from freed memory.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use io_uring::{opcode, types, IoUring};

use super::aligned::round_up;
use super::file::{
    check_direct, check_read, open_for_write, preallocate, truncate_and_sync, zero_past_eof, ReadFiles,
};
use super::{
    is_transient, poisoned, probe, resultify, AlignedBuf, EngineReport, FileId, IoStats, Payload, Reader,
    StagingBuf, Writer,
};
use crate::config::{Config, FsyncPolicy};
use crate::{Error, Result};

/// Transient errors (EINTR/EAGAIN/EBUSY) tolerated for one operation before giving up.
const MAX_RETRIES: u32 = 64;

/// Sets up a ring of at least `queue_depth` entries, honouring the simulated EPERM.
fn build_ring(config: &Config) -> io::Result<IoUring> {
    if config.simulate.uring_setup_eperm {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    crate::failpoint::io("uring.setup")?;
    let mut builder = IoUring::builder();
    if config.sqpoll {
        builder.setup_sqpoll(1000);
    }
    builder.build(config.queue_depth.next_power_of_two().max(2))
}

struct OpenFile {
    file: File,
    path: PathBuf,
    inflight: usize,
}

enum OpData<'a> {
    Staged(StagingBuf),
    Borrowed(&'a [u8]),
}

impl OpData<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            OpData::Staged(buf) => buf,
            OpData::Borrowed(slice) => slice,
        }
    }
}

struct WriteOp<'a> {
    file: usize,
    data: OpData<'a>,
    offset: u64,
    done: usize,
    retries: u32,
    started: Instant,
}

/// Writes through io_uring.
pub struct UringWriter<'a> {
    ring: IoUring,
    report: EngineReport,
    fsync: FsyncPolicy,
    files: Vec<Option<OpenFile>>,
    free: Vec<StagingBuf>,
    ops: Vec<Option<WriteOp<'a>>>,
    free_ops: Vec<usize>,
    inflight: usize,
    unsubmitted: usize,
    batch: usize,
    error: Option<Error>,
    failed: bool,
    stats: IoStats,
    _borrows: PhantomData<&'a [u8]>,
}

impl<'a> UringWriter<'a> {
    /// Sets up the ring and registers the staging buffers. On failure the buffers come back
    /// with the error, so the caller can fall back to another engine.
    pub fn new(
        config: &Config,
        mut report: EngineReport,
        buffers: Vec<AlignedBuf>,
    ) -> std::result::Result<Self, (Error, Vec<AlignedBuf>)> {
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
                // SAFETY: every iovec describes a live AlignedBuf owned by this writer. The
                // buffers are only freed after the ring (which holds the registration) is
                // dropped or once no slot can name them again (see StagingBuf).
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
        let queue_depth = config.queue_depth as usize;
        Ok(UringWriter {
            ring,
            report,
            fsync: config.fsync,
            files: Vec::new(),
            free,
            ops: Vec::with_capacity(queue_depth),
            free_ops: Vec::new(),
            inflight: 0,
            unsubmitted: 0,
            batch: (queue_depth / 4).max(1),
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

    fn open_file(&mut self, file: FileId) -> Result<&mut OpenFile> {
        self.files
            .get_mut(file.0)
            .and_then(Option::as_mut)
            .ok_or_else(|| Error::io("write", "(closed file)", io::Error::from_raw_os_error(libc::EBADF)))
    }

    /// Pushes the SQE for the unwritten rest of operation `idx`.
    fn push(&mut self, idx: usize) -> Result<()> {
        let op = self.ops[idx].as_ref().expect("pushed operation exists");
        let fd = types::Fd(self.files[op.file].as_ref().expect("file of a live op is open").file.as_raw_fd());
        let bytes = op.data.as_slice();
        let ptr = bytes[op.done..].as_ptr();
        let mut len = (bytes.len() - op.done) as u32;
        if let Some(Ok(())) = crate::failpoint::write("uring.write.submit") {
            len = crate::failpoint::short_len(len as usize, self.report.align) as u32;
        }
        let offset = op.offset + op.done as u64;
        let sqe = match &op.data {
            OpData::Staged(buf) if op.done == 0 && buf.slot.is_some() => {
                let slot = buf.slot.unwrap_or_default();
                opcode::WriteFixed::new(fd, ptr, len, slot).offset(offset).build()
            }
            _ => opcode::Write::new(fd, ptr, len).offset(offset).build(),
        }
        .user_data(idx as u64);
        loop {
            // SAFETY: the SQE points into memory owned by (Staged) or borrowed for 'a by
            // (Borrowed) the operation in self.ops[idx], which stays there until its
            // completion is reaped; Drop drains every completion before that memory can go.
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                break;
            }
            self.submit(0)?; // queue full: hand what is queued to the kernel first
        }
        self.unsubmitted += 1;
        Ok(())
    }

    /// Submits queued SQEs and waits for `want` completions, retrying EINTR.
    fn submit(&mut self, want: usize) -> Result<()> {
        let mut again = 0u32;
        loop {
            let result = match crate::failpoint::error("uring.submit") {
                Some(injected) => Err(injected),
                None if want == 0 => self.ring.submit(),
                None => self.ring.submit_and_wait(want),
            };
            match result {
                Ok(_) => {
                    self.stats.submits += 1;
                    self.stats.sqes_submitted += self.unsubmitted as u64;
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && again < MAX_RETRIES => {
                    // The kernel is short of resources for now: reap, then try again.
                    again += 1;
                    self.reap();
                    std::thread::yield_now();
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full: reap before submitting more.
                    self.reap();
                    if want > 0 {
                        return Ok(());
                    }
                }
                Err(e) => return Err(Error::io("io_uring_enter", "(ring)", e)),
            }
        }
    }

    /// Waits for at least one completion and handles what has completed.
    fn wait_one(&mut self) -> Result<()> {
        self.submit(1)?;
        self.reap();
        Ok(())
    }

    /// Handles every completion in the queue.
    fn reap(&mut self) {
        let done: Vec<(u64, i32)> =
            self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())).collect();
        for (user_data, res) in done {
            self.complete(user_data as usize, res);
        }
    }

    fn complete(&mut self, idx: usize, res: i32) {
        let res = match crate::failpoint::error("uring.write.complete") {
            Some(injected) => -injected.raw_os_error().unwrap_or(libc::EIO),
            None => res,
        };
        let Some(op) = self.ops[idx].as_mut() else { return };
        let total = op.data.as_slice().len();
        let path = || self.files[op.file].as_ref().map(|f| f.path.clone()).unwrap_or_default();
        match resultify(res) {
            Ok(0) => {
                let err = io::Error::new(io::ErrorKind::WriteZero, "write returned 0 bytes");
                let failure = Error::io_at("write", path(), op.offset + op.done as u64, err);
                self.error.get_or_insert(failure);
            }
            Ok(n) => {
                op.done += n;
                if op.done < total {
                    // Short write: submit the rest.
                    if let Err(err) = self.push(idx) {
                        self.error.get_or_insert(err);
                    } else {
                        return;
                    }
                }
            }
            Err(e) if is_transient(&e) && op.retries < MAX_RETRIES => {
                op.retries += 1;
                if let Err(err) = self.push(idx) {
                    self.error.get_or_insert(err);
                } else {
                    return;
                }
            }
            Err(e) => {
                let failure = Error::io_at("write", path(), op.offset + op.done as u64, e);
                self.error.get_or_insert(failure);
            }
        }
        self.retire(idx);
    }

    fn retire(&mut self, idx: usize) {
        let Some(op) = self.ops[idx].take() else { return };
        self.free_ops.push(idx);
        self.inflight -= 1;
        if let Some(file) = self.files[op.file].as_mut() {
            file.inflight -= 1;
        }
        if op.done == op.data.as_slice().len() {
            self.stats.record(op.done, op.started.elapsed());
        }
        if let OpData::Staged(mut buf) = op.data {
            buf.clear();
            self.free.push(buf);
        }
    }

    fn drain(&mut self) -> Result<()> {
        while self.inflight > 0 {
            self.wait_one()?;
        }
        Ok(())
    }
}

impl<'a> Writer<'a> for UringWriter<'a> {
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
            self.wait_one()?;
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
        let data = match payload {
            Payload::Staged(buf) if buf.is_empty() => {
                self.return_buffer(buf);
                return Ok(());
            }
            Payload::Borrowed([]) => return Ok(()),
            Payload::Staged(buf) => OpData::Staged(buf),
            Payload::Borrowed(slice) => OpData::Borrowed(slice),
        };
        let report = &self.report;
        let open = self.files.get(file.0).and_then(Option::as_ref);
        let path = open.map(|f| f.path.clone()).unwrap_or_default();
        if let Err(err) = check_direct(report, &path, data.as_slice().as_ptr(), data.as_slice().len(), offset)
        {
            if let OpData::Staged(buf) = data {
                self.return_buffer(buf);
            }
            return Err(err);
        }
        while self.inflight >= self.report.queue_depth as usize {
            self.wait_one()?;
            self.check()?;
        }
        self.open_file(file)?.inflight += 1;
        let op = WriteOp { file: file.0, data, offset, done: 0, retries: 0, started: Instant::now() };
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
        self.push(idx)?;
        if self.unsubmitted >= self.batch {
            self.submit(0)?;
        }
        Ok(())
    }

    fn finish(&mut self, file: FileId, len: u64) -> Result<()> {
        self.check()?;
        while self.open_file(file)?.inflight > 0 {
            self.wait_one()?;
            self.check()?;
        }
        let open = self.files[file.0].take().expect("open_file checked it");
        truncate_and_sync(&open.file, &open.path, len, self.fsync)
    }

    fn stats(&self) -> &IoStats {
        &self.stats
    }

    fn into_buffers(mut self: Box<Self>) -> Vec<AlignedBuf> {
        let _ = self.drain();
        std::mem::take(&mut self.free).into_iter().map(|b| b.into_parts().0).collect()
    }
}

impl Drop for UringWriter<'_> {
    fn drop(&mut self) {
        while self.inflight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.reap(),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap(),
                Err(e) => {
                    // The kernel may still use these buffers: leak them rather than free
                    // memory it could write from.
                    log::error!("cannot drain io_uring ({e}); leaking {} buffers", self.inflight);
                    for op in self.ops.drain(..).flatten() {
                        std::mem::forget(op);
                    }
                    break;
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
struct ReadPiece {
    offset: u64,
    dst: *mut u8,
    len: usize,
    want: usize,
    done: usize,
    retries: u32,
    started: Instant,
}

/// Reads through io_uring.
pub struct UringReader {
    ring: IoUring,
    report: EngineReport,
    chunk: usize,
    files: ReadFiles,
    stats: IoStats,
}

impl UringReader {
    /// Sets up the ring.
    pub fn new(config: &Config, report: EngineReport) -> Result<Self> {
        let ring = build_ring(config).map_err(|e| Error::io("io_uring_setup", "(ring)", e))?;
        Ok(UringReader {
            ring,
            report,
            chunk: config.chunk_size as usize,
            files: ReadFiles::default(),
            stats: IoStats::default(),
        })
    }

    fn push_piece(&mut self, fd: types::Fd, idx: usize, piece: &ReadPiece) {
        // SAFETY (of the pointer arithmetic): done < want and dst..dst+want lies inside the
        // destination buffer checked by read_at.
        let ptr = piece.dst.wrapping_add(piece.done);
        let sqe = opcode::Read::new(fd, ptr, (piece.len - piece.done) as u32)
            .offset(piece.offset + piece.done as u64)
            .build()
            .user_data(idx as u64);
        loop {
            // SAFETY: the destination is inside `dst`, which read_at borrows mutably until
            // every piece has completed (it does not return before that, even on error).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                break;
            }
            let _ = self.ring.submit();
        }
    }
}

impl Reader for UringReader {
    fn report(&self) -> &EngineReport {
        &self.report
    }

    fn open(&mut self, dir: &super::Dir, name: &str) -> Result<(FileId, u64)> {
        self.files.open(&mut self.report, dir, name)
    }

    fn read_at(&mut self, file: FileId, dst: &mut [u8], offset: u64, len: usize) -> Result<()> {
        let open = self.files.get(file)?;
        let (fd, path, file_len) = (types::Fd(open.file.as_raw_fd()), open.path.clone(), open.len);
        let span = if self.report.direct_io { round_up(len, self.report.align) } else { len };
        check_read(&path, dst, offset, len, span, file_len, self.report.mem_align)?;
        let base = dst.as_mut_ptr();
        let mut pieces: Vec<ReadPiece> = Vec::new();
        let mut at = 0usize;
        while at < span {
            let n = self.chunk.min(span - at);
            let want_in_file = (file_len.saturating_sub(offset + at as u64)).min(n as u64) as usize;
            // Direct reads need the full aligned length even where the file ends inside it.
            let request = if self.report.direct_io { n } else { want_in_file };
            pieces.push(ReadPiece {
                offset: offset + at as u64,
                dst: base.wrapping_add(at),
                len: request,
                want: want_in_file,
                done: 0,
                retries: 0,
                started: Instant::now(),
            });
            at += n;
        }
        let qd = self.report.queue_depth as usize;
        let mut next = 0usize;
        let mut inflight = 0usize;
        let mut error: Option<Error> = None;
        while next < pieces.len() || inflight > 0 {
            while error.is_none() && next < pieces.len() && inflight < qd {
                if pieces[next].want > 0 {
                    pieces[next].started = Instant::now();
                    self.push_piece(fd, next, &pieces[next]);
                    inflight += 1;
                }
                next += 1;
            }
            if inflight == 0 {
                break;
            }
            let mut waited = self.ring.submit_and_wait(1);
            while matches!(&waited, Err(e) if e.raw_os_error() == Some(libc::EINTR)) {
                waited = self.ring.submit_and_wait(1);
            }
            if let Err(e) = waited {
                // Pieces may still be in flight into dst: wait them out before returning.
                drain_ring(&mut self.ring, inflight);
                return Err(Error::io("io_uring_enter", &path, e));
            }
            self.stats.submits += 1;
            let done: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (user_data, res) in done {
                let idx = user_data as usize;
                let piece = &mut pieces[idx];
                match resultify(res) {
                    Ok(0) => {
                        inflight -= 1;
                        let err = io::Error::new(io::ErrorKind::UnexpectedEof, "file ended early");
                        error.get_or_insert(Error::io_at(
                            "read",
                            &path,
                            piece.offset + piece.done as u64,
                            err,
                        ));
                    }
                    Ok(n) => {
                        piece.done += n;
                        if piece.done < piece.want && error.is_none() {
                            // Short read before the end of the file: read the rest.
                            let piece_copy = *piece;
                            self.push_piece(fd, idx, &piece_copy);
                        } else {
                            inflight -= 1;
                            self.stats.record(piece.done, piece.started.elapsed());
                        }
                    }
                    Err(e) if is_transient(&e) && piece.retries < MAX_RETRIES && error.is_none() => {
                        piece.retries += 1;
                        let piece_copy = *piece;
                        self.push_piece(fd, idx, &piece_copy);
                    }
                    Err(e) => {
                        inflight -= 1;
                        error.get_or_insert(Error::io_at("read", &path, piece.offset + piece.done as u64, e));
                    }
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
