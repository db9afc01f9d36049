//! How bytes reach the disk. One pair of traits ([`Writer`], [`Reader`]), three engines:
//! [`uring`] (io_uring, O_DIRECT, registered buffers), [`pwrite`] (thread pool of
//! `pwrite`/`pread`, for systems without io_uring) and [`buffered`] (std::fs, the baseline).
//! [`open_writer`] and [`open_reader`] pick the engine from the [`Config`] and fall back,
//! logging why, when the system refuses io_uring, O_DIRECT or buffer registration.
//!
//! Format, staging and commit code never know which engine runs.

pub mod aligned;
pub mod buffered;
pub mod dir;
pub(crate) mod file;
pub mod probe;
pub mod pwrite;
pub mod stats;
#[cfg(target_os = "linux")]
pub mod uring;

use std::path::Path;

pub use aligned::AlignedBuf;
pub use dir::Dir;
pub use stats::IoStats;

use crate::config::{Config, EngineKind};
use crate::{Error, Result};

/// A staging buffer lent out by a [`Writer`]. Only a writer makes them, so a buffer that
/// claims a registered slot really is the memory registered there.
#[derive(Debug)]
pub struct StagingBuf {
    buf: AlignedBuf,
    slot: Option<u16>,
}

impl StagingBuf {
    pub(crate) fn new(buf: AlignedBuf, slot: Option<u16>) -> StagingBuf {
        StagingBuf { buf, slot }
    }

    pub(crate) fn into_parts(self) -> (AlignedBuf, Option<u16>) {
        (self.buf, self.slot)
    }
}

impl std::ops::Deref for StagingBuf {
    type Target = AlignedBuf;
    fn deref(&self) -> &AlignedBuf {
        &self.buf
    }
}

impl std::ops::DerefMut for StagingBuf {
    fn deref_mut(&mut self) -> &mut AlignedBuf {
        &mut self.buf
    }
}

/// Handle of a file opened through a [`Writer`] or [`Reader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId(pub(crate) usize);

/// The bytes of one write.
pub enum Payload<'a> {
    /// A staging buffer taken from the writer; its `len()` bytes are written, and the buffer
    /// goes back to the writer's pool once the kernel is done with it.
    Staged(StagingBuf),
    /// Caller memory written without a copy (zero-copy). Its address must be aligned to
    /// [`Writer::mem_align`] and its length to [`Writer::align`] when direct I/O is on.
    Borrowed(&'a [u8]),
}

impl Payload<'_> {
    /// Bytes to write.
    pub fn len(&self) -> usize {
        match self {
            Payload::Staged(buf) => buf.len(),
            Payload::Borrowed(slice) => slice.len(),
        }
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes files through one engine. Writes may complete out of order and in the
/// background; every method that can observe a failed write returns it. After an error the
/// writer refuses further work. Dropping a writer waits until the kernel has released every
/// buffer and every borrowed slice it was given.
pub trait Writer<'a>: Send {
    /// What this writer is and which fallbacks led to it.
    fn report(&self) -> &EngineReport;
    /// Creates (truncating) a file for writing, `len` bytes long when finished. Direct-I/O
    /// engines preallocate it (`fallocate`) so that writes never extend the file: the
    /// kernel can then issue them without blocking (io_uring need not hand them to its
    /// worker threads) and the blocks are laid out in one piece.
    fn create(&mut self, path: &Path, len: u64) -> Result<FileId>;
    /// Takes an empty staging buffer of `chunk_size` bytes, waiting for a write in flight to
    /// complete when the pool is empty.
    fn take_buffer(&mut self) -> Result<StagingBuf>;
    /// Gives back a buffer that will not be written.
    fn return_buffer(&mut self, buf: StagingBuf);
    /// Queues a write at `offset`. With direct I/O, `offset` and the length must be
    /// multiples of [`EngineReport::align`]. Every byte is written or an error is reported:
    /// short writes are resubmitted, EINTR/EAGAIN retried.
    fn write(&mut self, file: FileId, payload: Payload<'a>, offset: u64) -> Result<()>;
    /// Waits for all writes to `file`, truncates it to `len` (dropping O_DIRECT padding),
    /// makes it durable as the fsync policy says and closes it.
    fn finish(&mut self, file: FileId, len: u64) -> Result<()>;
    /// Latency and volume of the writes so far.
    fn stats(&self) -> &IoStats;
    /// Waits for everything in flight and hands back the staging buffers for reuse.
    fn into_buffers(self: Box<Self>) -> Vec<AlignedBuf>;
}

/// Reads files through one engine.
pub trait Reader: Send {
    /// What this reader is and which fallbacks led to it.
    fn report(&self) -> &EngineReport;
    /// Opens the regular file `name` in `dir` (never through a link: see [`Dir`]); returns
    /// its handle and length.
    fn open(&mut self, dir: &Dir, name: &str) -> Result<(FileId, u64)>;
    /// Reads `[offset, offset + len)` of `file` into `dst[..len]`, where `offset` is a
    /// multiple of [`EngineReport::align`], `dst` starts at a multiple of
    /// [`EngineReport::mem_align`] and is at least
    /// `len` rounded up to the alignment. Bytes past the end of the file read as zero;
    /// reading short of the end of the file is an error.
    fn read_at(&mut self, file: FileId, dst: &mut [u8], offset: u64, len: usize) -> Result<()>;
    /// Closes a file.
    fn close(&mut self, file: FileId);
    /// Latency and volume of the reads so far.
    fn stats(&self) -> &IoStats;
}

/// A fallback taken while opening an engine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Fallback {
    /// What was refused ("io_uring", "O_DIRECT", "buffer registration").
    pub what: &'static str,
    /// What is used instead.
    pub instead: &'static str,
    /// Why (the error the system gave).
    pub reason: String,
}

/// Which engine runs and how it is set up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EngineReport {
    /// The engine the configuration asked for.
    pub requested: EngineKind,
    /// The engine in use after fallbacks.
    pub engine: EngineKind,
    /// Whether files are opened with O_DIRECT.
    pub direct_io: bool,
    /// Whether staging buffers are registered with the ring (io_uring only).
    pub registered_buffers: bool,
    /// Alignment of offsets and lengths for direct I/O, in bytes.
    pub align: usize,
    /// Alignment of memory for direct I/O, in bytes.
    pub mem_align: usize,
    /// Queue depth (io_uring) or threads (pwrite).
    pub queue_depth: u32,
    /// Fallbacks taken, in order.
    pub fallbacks: Vec<Fallback>,
}

/// Opens a writer for files under `dir`, choosing the engine from `config` and falling back
/// as the system requires. `buffers` are staging buffers to reuse (from an earlier writer's
/// [`Writer::into_buffers`]); missing ones are allocated.
pub fn open_writer<'a>(
    config: &Config,
    dir: &Path,
    buffers: Vec<AlignedBuf>,
) -> Result<Box<dyn Writer<'a> + 'a>> {
    let plan = probe::plan(config, dir)?;
    let buffers = probe::fill_pool(buffers, config, plan.align.max(plan.mem_align));
    open_planned_writer(config, plan, buffers)
}

fn open_planned_writer<'a>(
    config: &Config,
    mut plan: EngineReport,
    buffers: Vec<AlignedBuf>,
) -> Result<Box<dyn Writer<'a> + 'a>> {
    match plan.engine {
        #[cfg(target_os = "linux")]
        EngineKind::Uring => match uring::UringWriter::new(config, plan.clone(), buffers) {
            Ok(writer) => Ok(Box::new(writer)),
            Err((err, buffers)) => {
                probe::fall_back(&mut plan, "io_uring", EngineKind::Pwrite, &err);
                open_planned_writer(config, plan, buffers)
            }
        },
        #[cfg(not(target_os = "linux"))]
        EngineKind::Uring => {
            plan.engine = EngineKind::Pwrite;
            open_planned_writer(config, plan, buffers)
        }
        EngineKind::Pwrite => Ok(Box::new(pwrite::PwriteWriter::new(config, plan, buffers)?)),
        EngineKind::Buffered | EngineKind::Auto => {
            plan.engine = EngineKind::Buffered;
            plan.direct_io = false;
            Ok(Box::new(buffered::BufferedWriter::new(config, plan, buffers)))
        }
    }
}

/// Opens a reader for the files under `dir`, with the same engine choice and fallbacks as
/// [`open_writer`].
pub fn open_reader(config: &Config, dir: &Path) -> Result<Box<dyn Reader>> {
    let plan = probe::plan_read(config, dir)?;
    open_planned_reader(config, plan)
}

fn open_planned_reader(config: &Config, mut plan: EngineReport) -> Result<Box<dyn Reader>> {
    match plan.engine {
        #[cfg(target_os = "linux")]
        EngineKind::Uring => match uring::UringReader::new(config, plan.clone()) {
            Ok(reader) => Ok(Box::new(reader)),
            Err(err) => {
                probe::fall_back(&mut plan, "io_uring", EngineKind::Pwrite, &err);
                open_planned_reader(config, plan)
            }
        },
        #[cfg(not(target_os = "linux"))]
        EngineKind::Uring => {
            plan.engine = EngineKind::Pwrite;
            open_planned_reader(config, plan)
        }
        EngineKind::Pwrite => Ok(Box::new(pwrite::PwriteReader::new(config, plan)?)),
        EngineKind::Buffered | EngineKind::Auto => {
            plan.engine = EngineKind::Buffered;
            plan.direct_io = false;
            Ok(Box::new(buffered::BufferedReader::new(plan)))
        }
    }
}

/// Converts a completion or syscall result (`-errno` on failure) into a byte count.
pub(crate) fn resultify(res: i32) -> std::io::Result<usize> {
    if res < 0 {
        Err(std::io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

/// Whether an errno means "try the same operation again".
pub(crate) fn is_transient(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY))
}

/// The error for a writer used after one of its writes failed.
pub(crate) fn poisoned() -> Error {
    Error::io(
        "write",
        "(writer)",
        std::io::Error::other("an earlier write of this save failed; the save is abandoned"),
    )
}
