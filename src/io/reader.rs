//! The reader core shared by the engines: the table of open files, the statistics and the
//! report, the validation of a read, its split into pieces, the bookkeeping of the pieces in
//! flight (short reads resubmitted, EINTR/EAGAIN retried, an early end of file or a hard
//! error reported once every piece has come back) and the zeroes past the end of the file,
//! and the [`Reader`] methods built on them. An engine only says how one piece is issued and
//! how completions are waited for ([`ReadEngine`]).

use std::io;
use std::time::{Duration, Instant};

use super::aligned::round_up;
use super::file::{check_read_at, ReadFile, ReadFiles};
use super::prefault::{Frontier, PREFAULT_HELPERS, PREFAULT_MIN};
use super::stream::{run_stream, ReadFeed};
use super::{is_transient, Dir, EngineReport, FileId, IoStats, RawDst, Reader};
use crate::error::{Error, Result};

/// Transient errors (EINTR/EAGAIN/EBUSY) tolerated for one piece before giving up.
const MAX_RETRIES: u32 = 64;

/// One request handed to an engine: read `len` bytes at `offset` of the file into `dst`.
///
/// `dst..dst + len` lies inside the destination of the [`Reader::read_at`] call that made
/// the request, which stays borrowed (mutably) until the completion of this piece has been
/// returned by [`ReadEngine::wait`] or `wait` has failed: the engine may write there until
/// then, and never after.
#[derive(Debug, Clone, Copy)]
pub struct ReadRequest {
    /// Where the bytes go.
    pub dst: *mut u8,
    /// Bytes to read at most.
    pub len: usize,
    /// Offset in the file.
    pub offset: u64,
}

/// The end of one request: which piece, the bytes read or the error, and the latency when
/// the engine measured it itself (else the core counts from the piece's first issue).
pub type ReadCompletion = (usize, io::Result<usize>, Option<Duration>);

/// How the core splits and paces the reads of one engine.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Name of the system call in errors ("read", "pread").
    pub op_name: &'static str,
    /// Pieces in flight at most.
    pub max_in_flight: usize,
    /// Bytes per piece at most: a read is split into pieces of this size.
    pub piece_len: usize,
    /// The memory alignment a destination must have.
    pub mem_align: usize,
}

/// How one engine issues and waits for reads; everything else is the [`EngineReader`]'s.
pub trait ReadEngine: Send {
    /// Issues `request` as piece `idx` of a read of `file`.
    fn start(&mut self, file: &ReadFile, idx: usize, request: ReadRequest);
    /// Waits for at least one piece to end and returns every one that ended. On error no
    /// piece is in flight any more (the engine waited them out, or its workers are gone).
    fn wait(&mut self, file: &ReadFile, stats: &mut IoStats) -> Result<Vec<ReadCompletion>>;
}

/// One piece of a read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    /// Offset in the file.
    pub offset: u64,
    /// Offset in the destination.
    pub at: usize,
    /// Bytes to request (with O_DIRECT the aligned length, even where the file ends inside).
    pub len: usize,
    /// Bytes of the piece that lie in the file.
    pub want: usize,
    /// Bytes read so far.
    pub done: usize,
    pub retries: u32,
    pub started: Instant,
}

impl Piece {
    /// The request for the unread rest of the piece.
    pub(crate) fn request(&self, base: *mut u8) -> ReadRequest {
        ReadRequest {
            dst: base.wrapping_add(self.at + self.done),
            len: self.len - self.done,
            offset: self.offset + self.done as u64,
        }
    }
}

/// Splits `[offset, offset + span)` into pieces of at most `piece_len` bytes.
pub(crate) fn pieces(offset: u64, span: usize, piece_len: usize, file_len: u64, direct: bool) -> Vec<Piece> {
    let mut out = Vec::with_capacity(span.div_ceil(piece_len.max(1)));
    let mut at = 0usize;
    while at < span {
        let n = piece_len.min(span - at);
        let want = file_len.saturating_sub(offset + at as u64).min(n as u64) as usize;
        let len = if direct { n } else { want };
        out.push(Piece {
            offset: offset + at as u64,
            at,
            len,
            want,
            done: 0,
            retries: 0,
            started: Instant::now(),
        });
        at += n;
    }
    out
}

/// An engine's completion for a piece index that was never issued (an engine bug).
pub(crate) fn never_issued(limits: &ReadLimits, idx: usize) -> Error {
    Error::Internal(format!("{} completed piece {idx}, which was never issued", limits.op_name))
}

/// What became of a piece whose completion came back.
pub(crate) enum Settled {
    /// Short of what it wants (a short read before the end of the file) or failed
    /// transiently: issue the rest of it again.
    Resubmit,
    /// All its bytes are in.
    Done,
    /// It failed; nothing more of it is issued.
    Failed(Error),
}

/// Books the completion `result` of `piece`: bytes read, a short read to resubmit, an
/// early end of the file, a transient error to retry (while `retry` holds: no other piece
/// failed) or a hard error naming the offset.
pub(crate) fn settle(
    piece: &mut Piece,
    result: io::Result<usize>,
    latency: Option<Duration>,
    limits: &ReadLimits,
    file: &ReadFile,
    stats: &mut IoStats,
    retry: bool,
) -> Settled {
    match result {
        Ok(0) => {
            let err = io::Error::new(io::ErrorKind::UnexpectedEof, "file ended early");
            Settled::Failed(Error::io_at("read", &file.path, piece.offset + piece.done as u64, err))
        }
        Ok(n) => {
            piece.done += n;
            if piece.done < piece.want && retry {
                return Settled::Resubmit;
            }
            stats.record(piece.done, latency.unwrap_or_else(|| piece.started.elapsed()));
            Settled::Done
        }
        Err(e) if is_transient(&e) && piece.retries < MAX_RETRIES && retry => {
            piece.retries += 1;
            Settled::Resubmit
        }
        Err(e) => {
            let at = piece.offset + piece.done as u64;
            Settled::Failed(Error::io_at(limits.op_name, &file.path, at, e))
        }
    }
}

/// A [`Reader`] made of the shared core and one [`ReadEngine`].
pub struct EngineReader<E: ReadEngine> {
    engine: E,
    limits: ReadLimits,
    report: EngineReport,
    files: ReadFiles,
    stats: IoStats,
}

impl<E: ReadEngine> EngineReader<E> {
    pub(crate) fn from_parts(engine: E, limits: ReadLimits, report: EngineReport) -> Self {
        EngineReader { engine, limits, report, files: ReadFiles::default(), stats: IoStats::default() }
    }
}

/// Where the pieces of one read go: the destination's start, the helper faulting it in
/// ahead (if any), and who hears of each growth of the prefix read so far.
struct Destination<'a> {
    base: *mut u8,
    frontier: Option<&'a Frontier>,
    progress: &'a mut dyn FnMut(usize),
}

/// Issues every piece that lies in the file, at most `max_in_flight` at a time, and waits
/// until all have come back. Returns the first failure.
///
/// With a `frontier` (a helper faulting the destination in ahead), a piece is issued only
/// once its part of the destination is faulted in, so that the zeroing of fresh pages stays
/// on the helper's core instead of delaying the submissions.
fn run<E: ReadEngine>(
    engine: &mut E,
    limits: &ReadLimits,
    stats: &mut IoStats,
    file: &ReadFile,
    pieces: &mut [Piece],
    dest: Destination<'_>,
) -> Result<()> {
    let Destination { base, frontier, progress } = dest;
    let depth = limits.max_in_flight.max(1);
    let (mut next, mut inflight) = (0usize, 0usize);
    let mut error: Option<Error> = None;
    // Pieces complete out of order: `settled[i]` once piece i is in; `prefix` pieces from the
    // start are, and the caller hears of each growth of that prefix.
    let mut settled = vec![false; pieces.len()];
    let mut prefix = 0usize;
    loop {
        while error.is_none() && next < pieces.len() && inflight < depth {
            if let Some(frontier) = frontier {
                let end = pieces[next].at + pieces[next].len;
                if !frontier.reached(end) {
                    if inflight > 0 {
                        break; // reap completions meanwhile
                    }
                    frontier.wait_for(end);
                }
            }
            if pieces[next].want > 0 {
                pieces[next].started = Instant::now();
                engine.start(file, next, pieces[next].request(base));
                inflight += 1;
            } else {
                settled[next] = true; // wholly past the end of the file: nothing to read
            }
            next += 1;
        }
        if inflight == 0 {
            break;
        }
        for (idx, result, latency) in engine.wait(file, stats)? {
            let Some(piece) = pieces.get_mut(idx) else {
                error.get_or_insert(never_issued(limits, idx));
                continue;
            };
            let resubmit = match settle(piece, result, latency, limits, file, stats, error.is_none()) {
                Settled::Resubmit => true,
                Settled::Done => false,
                Settled::Failed(err) => {
                    error.get_or_insert(err);
                    false
                }
            };
            if resubmit {
                engine.start(file, idx, piece.request(base));
            } else {
                inflight -= 1;
                settled[idx] = true;
            }
        }
        if error.is_none() {
            let before = prefix;
            while prefix < pieces.len() && settled[prefix] {
                prefix += 1;
            }
            if prefix > before {
                let last = &pieces[prefix - 1];
                progress(last.at + last.want);
            }
        }
    }
    error.map_or(Ok(()), Err)
}

impl<E: ReadEngine> Reader for EngineReader<E> {
    fn report(&self) -> &EngineReport {
        &self.report
    }

    fn open(&mut self, dir: &Dir, name: &str) -> Result<(FileId, u64)> {
        self.files.open(&mut self.report, dir, name)
    }

    unsafe fn read_raw(
        &mut self,
        file: FileId,
        dst: RawDst,
        offset: u64,
        len: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<()> {
        let RawDst { base, len: dst_len, .. } = dst;
        let open = self.files.get(file)?;
        let direct = self.report.direct_io;
        let span = if direct { round_up(len, self.report.align) } else { len };
        check_read_at(
            &open.path,
            (base as usize, dst_len),
            offset,
            len,
            span,
            open.len,
            self.limits.mem_align,
        )?;
        let mut pieces = pieces(offset, span, self.limits.piece_len, open.len, direct);
        let (engine, limits, stats) = (&mut self.engine, &self.limits, &mut self.stats);
        // Every request points into `dst`, which stays borrowed here until `run` has seen
        // every piece come back (it does not return before that, even on error). The helper
        // only gets its address, and is joined before `dst` is touched again.
        let fault_ahead = Frontier::new(span, dst.pages);
        let outcome = std::thread::scope(|scope| {
            // Helpers share the faulting (a fault costs the most on a virtual machine, where
            // the host backs the page too); without one (no thread to be had) the reads fault
            // the pages themselves.
            let mut helped = false;
            if span >= PREFAULT_MIN {
                for i in 0..PREFAULT_HELPERS {
                    let (frontier, addr) = (&fault_ahead, base as usize);
                    let spawned = std::thread::Builder::new()
                        .name(format!("uring-ckpt-prefault-{i}"))
                        .spawn_scoped(scope, move || frontier.fault_in(addr));
                    helped |= spawned.is_ok();
                }
            }
            let mut within = |n: usize| progress(n.min(len));
            let dest = Destination { base, frontier: helped.then_some(&fault_ahead), progress: &mut within };
            let outcome = run(engine, limits, stats, open, &mut pieces, dest);
            fault_ahead.stop();
            outcome
        });
        let (huge, small) = fault_ahead.page_bytes();
        self.stats.fresh_pages.huge_bytes += huge as u64;
        self.stats.fresh_pages.small_bytes += small as u64;
        outcome?;
        let valid = open.len.saturating_sub(offset).min(span as u64) as usize;
        // SAFETY: `valid..span` lies in the destination (`span <= dst_len`, checked) past the
        // `len` bytes read, which is all the caller may be reading meanwhile (`read_raw`'s
        // contract); every read has come back.
        unsafe { std::ptr::write_bytes(base.add(valid), 0, span - valid) };
        Ok(())
    }

    fn read_stream(&mut self, file: FileId, feed: &mut dyn ReadFeed) -> Result<()> {
        let open = self.files.get(file)?;
        let (direct, align) = (self.report.direct_io, self.report.align);
        run_stream(&mut self.engine, &self.limits, &mut self.stats, open, direct, align, feed)
    }

    fn close(&mut self, file: FileId) {
        self.files.close(file);
    }

    fn stats(&self) -> &IoStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::config::EngineKind;
    use crate::io::{AlignedBuf, Pages};

    /// What the scripted engine does with the next request.
    #[derive(Clone, Copy)]
    enum Step {
        /// Reads at most this many bytes of the request.
        Cap(usize),
        /// Fails with this errno.
        Errno(i32),
    }

    /// Reads the real file synchronously, doing to each request the next scripted step (all
    /// of it when the script is over), and remembers every request.
    #[derive(Default)]
    struct Scripted {
        steps: VecDeque<Step>,
        requests: Vec<(usize, usize, u64)>,
        done: Vec<ReadCompletion>,
    }

    impl ReadEngine for Scripted {
        fn start(&mut self, file: &ReadFile, idx: usize, request: ReadRequest) {
            self.requests.push((idx, request.len, request.offset));
            let cap = match self.steps.pop_front() {
                Some(Step::Errno(errno)) => {
                    self.done.push((idx, Err(io::Error::from_raw_os_error(errno)), None));
                    return;
                }
                Some(Step::Cap(n)) => n.min(request.len),
                None => request.len,
            };
            // SAFETY: the core lends `request.dst..+len` (cap <= len) for this request.
            let dst = unsafe { std::slice::from_raw_parts_mut(request.dst, cap) };
            self.done.push((idx, file.file.read_at(dst, request.offset), None));
        }

        fn wait(&mut self, _file: &ReadFile, stats: &mut IoStats) -> Result<Vec<ReadCompletion>> {
            stats.submits += 1;
            Ok(std::mem::take(&mut self.done))
        }
    }

    fn report(direct_io: bool) -> EngineReport {
        EngineReport {
            requested: EngineKind::Pwrite,
            engine: EngineKind::Pwrite,
            direct_io,
            registered_buffers: false,
            align: 4096,
            mem_align: 4096,
            queue_depth: 2,
            offload_writes: false,
            fallbacks: Vec::new(),
        }
    }

    /// A file of `len` patterned bytes in a scratch directory, opened by a scripted reader
    /// (with the direct-I/O rules when `direct`, though the file is read through the cache).
    fn open_scripted(
        len: usize,
        direct: bool,
        steps: &[Step],
    ) -> (EngineReader<Scripted>, FileId, Vec<u8>, tempfile::TempDir) {
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("tmp");
        std::fs::create_dir_all(&base).expect("target/tmp");
        let scratch = tempfile::tempdir_in(base).expect("scratch");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(scratch.path().join("f"), &data).expect("write");
        let engine = Scripted { steps: steps.iter().copied().collect(), ..Scripted::default() };
        let limits =
            ReadLimits { op_name: "scripted read", max_in_flight: 2, piece_len: 8192, mem_align: 4096 };
        let mut reader = EngineReader::from_parts(engine, limits, report(false));
        let dir = Dir::open(scratch.path()).expect("dir");
        let (file, file_len) = reader.open(&dir, "f").expect("open");
        assert_eq!(file_len, len as u64);
        reader.report.direct_io = direct;
        (reader, file, data, scratch)
    }

    fn filled(len: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(len, 4096);
        buf.as_full_mut_slice().fill(0xAA);
        buf
    }

    #[test]
    fn short_reads_are_resubmitted_until_the_piece_is_full() {
        let (mut reader, file, data, _dir) = open_scripted(20_000, false, &[Step::Cap(100), Step::Cap(5000)]);
        let mut buf = filled(20_480);
        reader.read_at(file, buf.as_full_mut_slice(), 0, 20_000).expect("read");
        assert_eq!(&buf.as_full_mut_slice()[..20_000], &data[..]);
        let requests = &reader.engine.requests;
        // Pieces 0 and 1 start and come back short (100 and 5000 bytes): the rest of each
        // is asked for at its offset, then the last piece.
        assert_eq!(requests[..2], [(0, 8192, 0), (1, 8192, 8192)]);
        assert_eq!(requests[2], (0, 8092, 100));
        assert_eq!(requests[3], (1, 3192, 13_192));
        assert_eq!(requests[4], (2, 3616, 16_384));
        assert_eq!(requests.len(), 5, "{requests:?}");
        assert_eq!((reader.stats().ops, reader.stats().bytes), (3, 20_000), "one record per piece");
    }

    #[test]
    fn progress_reports_the_prefix_read_so_far_up_to_the_length() {
        let (mut reader, file, data, _dir) = open_scripted(30_000, true, &[Step::Cap(100)]);
        let mut buf = filled(32_768);
        let mut seen = Vec::new();
        // SAFETY: `buf` is borrowed for the call and read only after it.
        unsafe {
            let dst = RawDst { base: buf.as_mut_ptr(), len: buf.capacity(), pages: Pages::Kept };
            reader.read_raw(file, dst, 0, 29_000, &mut |n| seen.push(n))
        }
        .expect("read");
        assert_eq!(&buf.as_full_mut_slice()[..29_000], &data[..29_000]);
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "growing: {seen:?}");
        assert_eq!(seen.last(), Some(&29_000), "ends at the length asked for, not the aligned span");
        assert!(seen.iter().all(|&n| n % 8192 == 0 || n == 29_000), "whole pieces only: {seen:?}");
    }

    #[test]
    fn transient_errors_are_retried_and_hard_ones_name_the_offset() {
        let (mut reader, file, data, _dir) = open_scripted(10_000, false, &[Step::Errno(libc::EINTR)]);
        let mut buf = filled(12_288);
        reader.read_at(file, buf.as_full_mut_slice(), 0, 10_000).expect("EINTR is retried");
        assert_eq!(&buf.as_full_mut_slice()[..10_000], &data[..]);

        let (mut reader, file, _data, _dir) =
            open_scripted(10_000, false, &[Step::Cap(4096), Step::Cap(10), Step::Errno(libc::EIO)]);
        let err = reader.read_at(file, buf.as_full_mut_slice(), 0, 10_000).expect_err("EIO");
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(err.to_string().starts_with("scripted read "), "{err}");
        assert!(err.to_string().contains("at offset 4096"), "{err}");
    }

    #[test]
    fn bytes_past_the_end_of_the_file_read_as_zero_under_direct_io() {
        let (mut reader, file, data, _dir) = open_scripted(5000, true, &[]);
        let mut buf = filled(16_384);
        reader.read_at(file, buf.as_full_mut_slice(), 4096, 904).expect("read the tail");
        let got = buf.as_full_mut_slice();
        assert_eq!(&got[..904], &data[4096..]);
        assert!(got[904..4096].iter().all(|&b| b == 0), "zero up to the aligned length");
        assert!(got[4096..].iter().all(|&b| b == 0xAA), "nothing past the aligned length");
        assert_eq!(reader.engine.requests, [(0, 4096, 4096)], "the aligned length is requested");
    }

    #[test]
    fn a_file_that_ends_early_is_an_error_and_so_is_reading_past_its_end() {
        // The file shrinks after it was opened: the piece comes back short, then empty.
        let (mut reader, file, _data, dir) = open_scripted(10_000, false, &[]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("f"))
            .expect("open")
            .set_len(6000)
            .expect("shrink");
        let mut buf = filled(12_288);
        let err = reader.read_at(file, buf.as_full_mut_slice(), 0, 8000).expect_err("ends early");
        assert!(err.to_string().contains("file ended early"), "{err}");
        assert!(err.to_string().contains("at offset 6000"), "{err}");

        let (mut reader, file, _data, _dir) = open_scripted(10_000, false, &[]);
        let err = reader.read_at(file, buf.as_full_mut_slice(), 8192, 2000).expect_err("past the end");
        assert!(err.to_string().contains("read past end of file"), "{err}");
        assert!(reader.engine.requests.is_empty(), "nothing was issued");
    }

    #[test]
    fn an_unaligned_or_short_destination_is_refused_before_any_read() {
        let (mut reader, file, _data, _dir) = open_scripted(10_000, true, &[]);
        let mut buf = filled(16_384);
        let unaligned = &mut buf.as_full_mut_slice()[1..];
        let err = reader.read_at(file, unaligned, 0, 4096).expect_err("unaligned");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        // Under direct I/O the destination must hold the length rounded up to the alignment.
        let err = reader.read_at(file, &mut buf.as_full_mut_slice()[..5000], 0, 5000).expect_err("short");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert!(reader.engine.requests.is_empty(), "nothing was issued");
        reader.close(file);
        let err = reader.read_at(file, buf.as_full_mut_slice(), 0, 4096).expect_err("closed");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }
}
