//! How bytes reach the disk. One pair of traits ([`Writer`], [`Reader`]), three engines:
//! [`uring`] (io_uring, O_DIRECT, registered buffers), [`pwrite`] (thread pool of
//! `pwrite`/`pread`, for systems without io_uring) and [`buffered`] (std::fs, the baseline).
//! [`open_writer`] and [`open_reader`] pick the engine from the [`Config`] and fall back,
//! logging why, when the system refuses io_uring, O_DIRECT or buffer registration.
//! The engines share a writer core (`core`) and a reader core (`reader`): each engine only
//! says how one operation is issued and how its completion is waited for.
//!
//! Format, staging and commit code never know which engine runs. Staging memory belongs to
//! one [`pool::StagingPool`]; a writer borrows its share of buffers for its lifetime and
//! every buffer goes back to the pool when the writer (or whoever holds it) drops it.

pub mod aligned;
pub mod buffered;
mod core;
pub mod dir;
pub(crate) mod file;
pub(crate) mod mapped;
pub mod pool;
mod prefault;
pub mod probe;
pub mod pwrite;
mod reader;
pub mod stats;
pub mod stream;
mod stream_copy;
pub mod threads;
#[cfg(target_os = "linux")]
pub mod uring;

use std::path::Path;

pub use aligned::AlignedBuf;
pub use dir::Dir;
pub use pool::{PoolBuf, Registrar, StagingPool};
#[cfg(test)]
pub(crate) use prefault::populate_refused;
pub use prefault::Pages;
pub(crate) use prefault::{fault_in_owned, fault_in_spans, populate_chosen, PageChoice};
pub use stats::IoStats;
pub(crate) use stream_copy::copy_streaming;
pub use threads::SaveThreads;

use crate::config::{Config, EngineKind};
use crate::error::{Error, Result};

/// A staging buffer lent out by a [`Writer`] (which borrowed it from the [`StagingPool`]).
/// Only a writer makes them, so a buffer that claims a registered slot really is the memory
/// registered there. Dropping one sends its memory back to the pool.
#[derive(Debug)]
pub struct StagingBuf {
    buf: PoolBuf,
    slot: Option<u16>,
}

impl StagingBuf {
    pub(crate) fn new(buf: PoolBuf, slot: Option<u16>) -> StagingBuf {
        StagingBuf { buf, slot }
    }

    /// The pool's buffer, for an engine that must give it up for lost.
    pub(crate) fn into_pool_buf(self) -> PoolBuf {
        self.buf
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
    /// [`EngineReport::mem_align`] and its length to [`EngineReport::align`] when direct I/O is on.
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
/// buffer and every borrowed slice it was given, then its staging buffers go back to the
/// pool they came from.
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
    /// reading short of the end of the file is an error. `dst` keeps its page size
    /// ([`Pages::Kept`]).
    fn read_at(&mut self, file: FileId, dst: &mut [u8], offset: u64, len: usize) -> Result<()> {
        let dst = RawDst { base: dst.as_mut_ptr(), len: dst.len(), pages: Pages::Kept };
        // SAFETY: `dst` is borrowed mutably for the whole call, so nothing else uses it.
        unsafe { self.read_raw(file, dst, offset, len, &mut |_| {}) }
    }
    /// [`Reader::read_at`] into a buffer just allocated ([`AlignedBuf::zeroed`]) that
    /// nothing has touched: a read large enough to fault it in ahead on a helper thread
    /// picks its page size too ([`Pages::Chosen`]).
    fn read_fresh(&mut self, file: FileId, dst: &mut AlignedBuf, offset: u64, len: usize) -> Result<()> {
        let dst = RawDst { base: dst.as_mut_ptr(), len: dst.capacity(), pages: Pages::Chosen };
        // SAFETY: the buffer is borrowed mutably for the whole call, so nothing else uses it.
        unsafe { self.read_raw(file, dst, offset, len, &mut |_| {}) }
    }
    /// [`Reader::read_at`] into `dst`, calling `progress(n)` each time the
    /// first `n` bytes of the read are all in (growing, ending at `len`), so that a caller can
    /// use them while the rest is still being read.
    ///
    /// # Safety
    /// The destination must be writable memory of `dst.len` bytes that nothing else writes,
    /// and nothing else reads except the first `n` bytes after `progress(n)`, until the call
    /// returns; with [`Pages::Chosen`], memory of the caller's own whose page size may change.
    unsafe fn read_raw(
        &mut self,
        file: FileId,
        dst: RawDst,
        offset: u64,
        len: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<()>;
    /// Reads what `feed` offers of `file`, each read into its own buffer, keeping the
    /// engine's depth of pieces in flight across reads, and hands each finished read back
    /// to the feed (see [`stream`]). Same alignment rules and errors as
    /// [`Reader::read_at`].
    fn read_stream(&mut self, file: FileId, feed: &mut dyn stream::ReadFeed) -> Result<()>;
    /// Closes a file.
    fn close(&mut self, file: FileId);
    /// Latency and volume of the reads so far.
    fn stats(&self) -> &IoStats;
}

/// The memory one [`Reader::read_raw`] lands in.
#[derive(Debug, Clone, Copy)]
pub struct RawDst {
    /// Its start.
    pub base: *mut u8,
    /// Its length in bytes.
    pub len: usize,
    /// Whose choice its page size is while it is faulted in.
    pub pages: Pages,
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
    /// io_uring only: writes go to the ring's worker threads at submission (`IOSQE_ASYNC`)
    /// instead of being tried in the submitting thread first, because the file system does
    /// a direct write's costly work in the thread that submits it (btrfs: data checksums).
    /// The copy and CRC of the next chunk then run beside that work, on another core.
    pub offload_writes: bool,
    /// Fallbacks taken, in order.
    pub fallbacks: Vec<Fallback>,
}

/// Opens a writer for files under `dir`, choosing the engine from `config` and falling back
/// as the system requires. The writer borrows `buffers` staging buffers of `chunk_size`
/// bytes from `pool` (allocated there if it has too few) for its lifetime. `threads` caps the
/// engine's own threads (io-wq workers, the pwrite pool) for a background save.
pub fn open_writer<'a>(
    config: &Config,
    dir: &Path,
    pool: &StagingPool,
    buffers: usize,
    threads: SaveThreads,
) -> Result<Box<dyn Writer<'a> + 'a>> {
    let capped;
    let config = match threads.engine_cap() {
        Some(cap) if cap < config.io_threads => {
            capped = Config { io_threads: cap, ..config.clone() };
            &capped
        }
        _ => config,
    };
    let plan = probe::plan(config, dir)?;
    let shape = pool::Shape {
        chunk: usize::try_from(config.chunk_size)
            .map_err(|_| Error::Config("chunk_size overflows".into()))?,
        align: pool::staging_align(plan.align, plan.mem_align),
    };
    let buffers = pool.lend(shape, buffers.max(1));
    let writer = open_planned_writer(config, plan, buffers, threads)?;
    #[cfg(test)]
    let writer = testing::wrap(dir, writer);
    Ok(writer)
}

fn open_planned_writer<'a>(
    config: &Config,
    mut plan: EngineReport,
    buffers: Vec<PoolBuf>,
    threads: SaveThreads,
) -> Result<Box<dyn Writer<'a> + 'a>> {
    match plan.engine {
        #[cfg(target_os = "linux")]
        EngineKind::Uring => match uring::UringWriter::new(config, plan.clone(), buffers) {
            Ok(writer) => {
                if let Some(cap) = threads.engine_cap() {
                    writer.cap_io_workers(cap);
                }
                Ok(Box::new(writer))
            }
            Err((err, buffers)) => {
                probe::fall_back(&mut plan, "io_uring", EngineKind::Pwrite, &err);
                open_planned_writer(config, plan, buffers, threads)
            }
        },
        #[cfg(not(target_os = "linux"))]
        EngineKind::Uring => {
            plan.engine = EngineKind::Pwrite;
            open_planned_writer(config, plan, buffers, threads)
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

/// The error for a writer whose staging buffers are all lent out with nothing in flight to
/// wait for (a caller holding buffers it never returns: a bug).
pub(crate) fn pool_exhausted() -> Error {
    Error::Internal("staging pool exhausted: every buffer is lent out and no write is in flight".into())
}

#[cfg(test)]
pub(crate) mod testing {
    //! Faults injected into the writers of saves under one directory, for tests of what
    //! happens to staging memory when a worker fails or panics mid-save.

    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::{EngineReport, FileId, IoStats, Payload, StagingBuf, Writer};
    use crate::error::{Error, Result};

    /// What a faulty writer does at its `at`-th write (counted across every writer of the
    /// armed directory, from 1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Fault {
        /// The write fails with EIO (the payload is dropped, not written).
        FailWrite { at: usize },
        /// The writer's thread panics (with the payload in hand).
        PanicWrite { at: usize },
    }

    struct Armed {
        parent: PathBuf,
        fault: Fault,
        writes: Arc<AtomicUsize>,
    }

    static ARMED: Mutex<Vec<Armed>> = Mutex::new(Vec::new());

    /// Disarms its fault when dropped.
    pub(crate) struct Guard(PathBuf);

    impl Drop for Guard {
        fn drop(&mut self) {
            ARMED.lock().unwrap_or_else(|e| e.into_inner()).retain(|a| a.parent != self.0);
        }
    }

    /// Makes every writer opened below `parent` faulty, until the guard drops.
    pub(crate) fn arm(parent: &Path, fault: Fault) -> Guard {
        let armed = Armed { parent: parent.to_path_buf(), fault, writes: Arc::new(AtomicUsize::new(0)) };
        ARMED.lock().unwrap_or_else(|e| e.into_inner()).push(armed);
        Guard(parent.to_path_buf())
    }

    /// Wraps `writer` if a fault is armed for a parent of `dir`.
    pub(crate) fn wrap<'a>(dir: &Path, writer: Box<dyn Writer<'a> + 'a>) -> Box<dyn Writer<'a> + 'a> {
        let armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
        match armed.iter().find(|a| dir.starts_with(&a.parent)) {
            Some(a) => Box::new(Faulty { inner: writer, fault: a.fault, writes: a.writes.clone() }),
            None => writer,
        }
    }

    struct Faulty<'a> {
        inner: Box<dyn Writer<'a> + 'a>,
        fault: Fault,
        writes: Arc<AtomicUsize>,
    }

    impl<'a> Writer<'a> for Faulty<'a> {
        fn report(&self) -> &EngineReport {
            self.inner.report()
        }

        fn create(&mut self, path: &Path, len: u64) -> Result<FileId> {
            self.inner.create(path, len)
        }

        fn take_buffer(&mut self) -> Result<StagingBuf> {
            self.inner.take_buffer()
        }

        fn return_buffer(&mut self, buf: StagingBuf) {
            self.inner.return_buffer(buf);
        }

        fn write(&mut self, file: FileId, payload: Payload<'a>, offset: u64) -> Result<()> {
            let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
            match self.fault {
                Fault::FailWrite { at } if n == at => {
                    drop(payload);
                    let err = std::io::Error::from_raw_os_error(libc::EIO);
                    Err(Error::io_at("write (injected)", "(faulty writer)", offset, err))
                }
                Fault::PanicWrite { at } if n == at => panic!("injected panic at write {n}"),
                _ => self.inner.write(file, payload, offset),
            }
        }

        fn finish(&mut self, file: FileId, len: u64) -> Result<()> {
            self.inner.finish(file, len)
        }

        fn stats(&self) -> &IoStats {
            self.inner.stats()
        }
    }
}
