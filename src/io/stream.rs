//! Streamed reads: a sequence of reads of one file, each into a buffer of its own, with the
//! engine's depth of pieces kept in flight across them ([`Reader::read_stream`]). The
//! restore path uses it to read a shard into a few reused staging buffers while other
//! threads copy the buffers already read to where the tensors live.
//!
//! [`Reader::read_stream`]: super::Reader::read_stream

use std::time::Instant;

use super::aligned::round_up;
use super::file::{check_read, zero_past_eof, ReadFile};
use super::reader::{never_issued, settle, Piece, ReadEngine, ReadLimits, Settled};
use super::{IoStats, PoolBuf};
use crate::error::{Error, Result};

/// One read of a stream: `len` bytes at `offset` into the start of `dst`. Under direct I/O
/// `offset` must be a multiple of the engine's alignment and `dst` must hold `len` rounded
/// up to it (pool buffers of the engine's shape do).
#[derive(Debug)]
pub struct StreamRead {
    /// Where the bytes go; when the read is done, its first `len` bytes hold them (bytes
    /// past the end of the file read as zero).
    pub dst: ReadDst,
    /// Offset in the file.
    pub offset: u64,
    /// Bytes to read.
    pub len: usize,
    /// The feed's own number for this read, handed back with it.
    pub tag: usize,
}

/// The memory one [`StreamRead`] lands in.
#[derive(Debug)]
pub enum ReadDst {
    /// A staging buffer, handed back with the read.
    Staged(PoolBuf),
    /// Memory the feed lends for the read: a tensor's own, read straight into.
    Lent(LentSpan),
}

/// Memory lent to one read of a stream (see [`LentSpan::new`]).
#[derive(Debug)]
pub struct LentSpan {
    base: *mut u8,
    len: usize,
}

// SAFETY: a lent span is exclusive memory (the contract of `LentSpan::new`), only written
// through by the read it belongs to, on whichever thread runs the stream.
unsafe impl Send for LentSpan {}

impl LentSpan {
    /// `len` bytes at `base`, lent to a read.
    ///
    /// # Safety
    /// `base..base + len` must be writable memory that nothing else reads or writes for as
    /// long as the span exists: the read writes it, and whoever holds the span once the read
    /// is handed back ([`ReadFeed::done`]) may read it.
    pub unsafe fn new(base: *mut u8, len: usize) -> LentSpan {
        LentSpan { base, len }
    }

    /// The span's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the span is valid and exclusive while it exists (`LentSpan::new`).
        unsafe { std::slice::from_raw_parts(self.base, self.len) }
    }
}

impl ReadDst {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        match self {
            ReadDst::Staged(buf) => buf.as_mut_ptr(),
            ReadDst::Lent(span) => span.base,
        }
    }

    fn as_full_mut_slice(&mut self) -> &mut [u8] {
        match self {
            ReadDst::Staged(buf) => buf.as_full_mut_slice(),
            // SAFETY: the span is valid and exclusive while it exists (`LentSpan::new`).
            ReadDst::Lent(span) => unsafe { std::slice::from_raw_parts_mut(span.base, span.len) },
        }
    }
}

/// What a [`ReadFeed`] offers next.
#[derive(Debug)]
pub enum Feed {
    /// Issue this read.
    Read(StreamRead),
    /// Nothing yet (no buffer free); ask again after some read has finished.
    NotNow,
    /// No more reads.
    End,
}

/// The two ends of a stream of reads: where the reads come from and where finished ones go.
pub trait ReadFeed {
    /// The next read to issue. With `wait` (nothing is in flight, so nothing else can free a
    /// buffer) the feed must block until it can answer [`Feed::Read`] or [`Feed::End`].
    fn next(&mut self, wait: bool) -> Result<Feed>;
    /// A finished read (in any order). An error stops the stream: no new read is issued,
    /// the ones in flight are waited for, and the error is returned.
    fn done(&mut self, read: StreamRead) -> Result<()>;
}

/// A read of the stream in progress: its buffer and how many of its pieces are out.
struct Active {
    read: StreamRead,
    /// The read's span (its length, rounded up under direct I/O).
    span: usize,
    pieces_left: usize,
}

/// Issues the reads `feed` offers, at most `max_in_flight` pieces at a time across them,
/// and hands each one back to the feed when all its pieces are in. Returns the first error
/// once nothing is in flight any more.
pub(crate) fn run_stream<E: ReadEngine>(
    engine: &mut E,
    limits: &ReadLimits,
    stats: &mut IoStats,
    file: &ReadFile,
    direct: bool,
    align: usize,
    feed: &mut dyn ReadFeed,
) -> Result<()> {
    let depth = limits.max_in_flight.max(1);
    // Pieces by engine index; `owner[idx]` is the index of the read it belongs to in `active`.
    let mut pieces: Vec<Piece> = Vec::new();
    let mut owner: Vec<usize> = Vec::new();
    let mut free_idx: Vec<usize> = Vec::new();
    let mut active: Vec<Option<Active>> = Vec::new();
    let mut queued: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
    let (mut inflight, mut ended) = (0usize, false);
    let mut error: Option<Error> = None;
    loop {
        // Keep `depth` pieces in flight: queued pieces first, then new reads from the feed.
        while error.is_none() && inflight < depth {
            if let Some(idx) = queued.pop_front() {
                let read = active[owner[idx]].as_mut().expect("a queued piece's read is active");
                pieces[idx].started = Instant::now();
                engine.start(file, idx, pieces[idx].request(read.read.dst.as_mut_ptr()));
                inflight += 1;
                continue;
            }
            if ended {
                break;
            }
            let offered = match feed.next(inflight == 0) {
                Ok(offered) => offered,
                Err(err) => {
                    error = Some(err);
                    break;
                }
            };
            let mut read = match offered {
                Feed::Read(read) => read,
                Feed::NotNow if inflight > 0 => break,
                Feed::NotNow => {
                    error =
                        Some(Error::Internal("a read feed answered NotNow with nothing in flight".into()));
                    break;
                }
                Feed::End => {
                    ended = true;
                    break;
                }
            };
            let span = if direct { round_up(read.len, align) } else { read.len };
            let checked = check_read(
                &file.path,
                read.dst.as_full_mut_slice(),
                read.offset,
                read.len,
                span,
                file.len,
                limits.mem_align,
            );
            if let Err(err) = checked {
                error = Some(err);
                break;
            }
            let slot = match active.iter().position(Option::is_none) {
                Some(slot) => slot,
                None => {
                    active.push(None);
                    active.len() - 1
                }
            };
            let split = super::reader::pieces(read.offset, span, limits.piece_len, file.len, direct);
            let mut count = 0;
            for piece in split {
                if piece.want == 0 {
                    continue; // wholly past the end of the file: zeroed when the read is done
                }
                let idx = match free_idx.pop() {
                    Some(idx) => {
                        pieces[idx] = piece;
                        owner[idx] = slot;
                        idx
                    }
                    None => {
                        pieces.push(piece);
                        owner.push(slot);
                        pieces.len() - 1
                    }
                };
                queued.push_back(idx);
                count += 1;
            }
            if count == 0 {
                zero_past_eof(read.dst.as_full_mut_slice(), read.offset, span, file.len);
                if let Err(err) = feed.done(read) {
                    error = Some(err);
                }
                continue;
            }
            active[slot] = Some(Active { read, span, pieces_left: count });
        }
        if inflight == 0 {
            if error.is_some() || (ended && queued.is_empty()) {
                break;
            }
            continue;
        }
        for (idx, result, latency) in engine.wait(file, stats)? {
            let Some(piece) = pieces.get_mut(idx) else {
                error.get_or_insert(never_issued(limits, idx));
                continue;
            };
            match settle(piece, result, latency, limits, file, stats, error.is_none()) {
                Settled::Resubmit => {
                    let read = active[owner[idx]].as_mut().expect("a piece in flight has an active read");
                    engine.start(file, idx, piece.request(read.read.dst.as_mut_ptr()));
                    continue;
                }
                Settled::Done => {}
                Settled::Failed(err) => {
                    error.get_or_insert(err);
                }
            }
            inflight -= 1;
            free_idx.push(idx);
            let slot = owner[idx];
            let read = active[slot].as_mut().expect("a finished piece has an active read");
            read.pieces_left -= 1;
            if read.pieces_left == 0 {
                let Active { mut read, span, .. } = active[slot].take().expect("active");
                if error.is_none() {
                    zero_past_eof(read.dst.as_full_mut_slice(), read.offset, span, file.len);
                    if let Err(err) = feed.done(read) {
                        error = Some(err);
                    }
                }
            }
        }
        if error.is_some() {
            // Issue nothing more; drop the queued pieces of reads that never went out whole.
            queued.clear();
        }
    }
    error.map_or(Ok(()), Err)
}
