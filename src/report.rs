//! The figures of one save ([`SaveReport`]) and one load ([`LoadReport`]), and the one place
//! that derives figures from others: throughput from bytes and seconds, the stall from
//! the [`StagedSignal`], the copy/write overlap when a copy ran before the writes.
//!
//! The shard writers fill a save's report once, from their engines' [`IoStats`] and their
//! copy clocks ([`crate::io::stats::overlap_ratio`]); the layers above only add what they
//! did themselves through the methods here, never by patching fields.
//!
//! [`IoStats`]: crate::io::IoStats

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::io::stats::{FreshPages, LatencySummary};
use crate::io::EngineReport;

/// Figures of one save.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SaveReport {
    /// The committed checkpoint directory.
    pub path: PathBuf,
    /// Sum of tensor bytes.
    pub data_bytes: u64,
    /// Bytes of the shard files (headers included).
    pub file_bytes: u64,
    /// Shard files written.
    pub shards: usize,
    /// Tensors written.
    pub tensors: usize,
    /// Seconds from the call until the checkpoint was committed and durable.
    pub seconds: f64,
    /// Seconds spent in the commit step (manifest, fsyncs, rename).
    pub commit_seconds: f64,
    /// Seconds the caller had to keep the sources unchanged: from the call until every byte
    /// was staged (copied out of the sources, or written where it went to disk without a
    /// copy). A synchronous save stalls for all of `seconds`; an asynchronous one
    /// ([`crate::AsyncCheckpointIO`]) only until its `staged()` completion.
    pub stall_seconds: f64,
    /// Wall-clock seconds during which at least one copy out of a source was running: the
    /// staging copies of the shard writers (host memcpy with CRC, or
    /// [`crate::source::TensorSource::copy_to`] of a device), and in `snapshot` mode the
    /// copy of the whole checkpoint into host memory. Copies on several threads at once
    /// count once.
    pub copy_seconds: f64,
    /// Wall-clock seconds during which at least one write was in flight in an engine (from
    /// submission until its completion was seen; fsyncs not included).
    pub write_seconds: f64,
    /// How much copying and writing overlapped: `(copy + write - busy) / min(copy, write)`
    /// where `busy` is the time either was running: 1 when the shorter one was entirely
    /// hidden behind the other, 0 when they ran one after the other (or either is zero).
    pub overlap_ratio: f64,
    /// `file_bytes / seconds`, MiB/s.
    pub throughput_mib_s: f64,
    /// Bytes written straight from tensor memory (no staging copy).
    pub zero_copy_bytes: u64,
    /// Bytes copied through staging buffers.
    pub staged_bytes: u64,
    /// The engine and its fallbacks.
    pub engine: EngineReport,
    /// Per-write completion latency.
    pub write_latency: LatencySummary,
    /// Writes completed.
    pub writes: u64,
    /// io_uring_enter calls that submitted (0 for other engines).
    pub submit_calls: u64,
    /// SQEs those calls submitted.
    pub sqes_submitted: u64,
}

/// Figures of one load.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    /// Tensor bytes handed out.
    pub data_bytes: u64,
    /// Bytes read from disk.
    pub read_bytes: u64,
    /// Seconds from the call until everything was read and verified.
    pub seconds: f64,
    /// `read_bytes / seconds`, MiB/s.
    pub throughput_mib_s: f64,
    /// Whether each tensor's CRC was checked.
    pub verified: bool,
    /// The engine and its fallbacks.
    pub engine: EngineReport,
    /// Per-read completion latency.
    pub read_latency: LatencySummary,
    /// How the fresh memory the tensors were read into was faulted in: bytes with huge pages
    /// and with 4 KiB pages, whichever faulted in faster (zeros for loads in place).
    pub fresh_pages: FreshPages,
    /// Tensor bytes read straight into where they end up, past any staging buffer: every
    /// byte of a fresh load (its tensors are the memory read into); for a load into a sink,
    /// the aligned interiors of tensors whose host memory sits at their file offset's phase.
    pub zero_copy_bytes: u64,
    /// Whether the shard files were mapped copy-on-write instead of read
    /// ([`LoadOptions::map`](crate::LoadOptions::map)); the engine then says
    /// [`EngineKind::Buffered`](crate::config::EngineKind) (the page cache's reads).
    pub mapped: bool,
}

/// MiB/s of `bytes` moved in `seconds`.
pub(crate) fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / (1024.0 * 1024.0) / seconds
    } else {
        0.0
    }
}

impl LoadReport {
    /// The report of a load called at `started` and done now, which read `read_bytes` and
    /// handed out `data_bytes` of tensors on `engine`; no latencies, fresh pages or
    /// zero-copy bytes yet (the caller adds those it has).
    pub(crate) fn finished(
        started: Instant,
        data_bytes: u64,
        read_bytes: u64,
        verified: bool,
        engine: EngineReport,
    ) -> LoadReport {
        let seconds = started.elapsed().as_secs_f64();
        LoadReport {
            data_bytes,
            read_bytes,
            seconds,
            throughput_mib_s: mib_per_s(read_bytes, seconds),
            verified,
            engine,
            read_latency: LatencySummary::default(),
            fresh_pages: FreshPages::default(),
            zero_copy_bytes: 0,
            mapped: false,
        }
    }
}

impl SaveReport {
    /// Closes the report of a save that was called at `called`: end-to-end seconds,
    /// throughput, and the stall (until `staged` fired, or the whole save when nobody
    /// watched the signal: a synchronous save holds its caller until the end).
    pub(crate) fn finish(&mut self, called: Instant, staged: Option<f64>) {
        self.seconds = called.elapsed().as_secs_f64();
        self.throughput_mib_s = mib_per_s(self.file_bytes, self.seconds);
        self.stall_seconds = staged.unwrap_or(self.seconds);
    }

    /// Adds a copy of `bytes` that ran for `seconds` before any write of this save (the
    /// snapshot of snapshot mode): it adds copy time, not overlap.
    pub(crate) fn add_serial_copy(&mut self, seconds: f64, bytes: u64) {
        let overlapped = self.overlap_ratio * self.copy_seconds.min(self.write_seconds);
        self.copy_seconds += seconds;
        let shorter = self.copy_seconds.min(self.write_seconds);
        self.overlap_ratio = if shorter > 0.0 { (overlapped / shorter).clamp(0.0, 1.0) } else { 0.0 };
        self.staged_bytes += bytes;
    }
}

/// Calls a save's `on_staged` once: when the last shard has been appended, or at the end.
pub(crate) struct StagedSignal<'h> {
    remaining: AtomicUsize,
    fired: AtomicBool,
    callback: Option<&'h (dyn Fn() + Sync)>,
    /// When the save was called: the start of its stall.
    pub(crate) started: Instant,
    at: Mutex<Option<f64>>,
}

impl<'h> StagedSignal<'h> {
    pub(crate) fn new(callback: Option<&'h (dyn Fn() + Sync)>, started: Instant) -> Self {
        StagedSignal {
            remaining: AtomicUsize::new(usize::MAX),
            fired: AtomicBool::new(false),
            callback,
            started,
            at: Mutex::new(None),
        }
    }

    /// Sets how many shards must be appended before the signal fires.
    pub(crate) fn expect(&self, shards: usize) {
        self.remaining.store(shards, Ordering::SeqCst);
    }

    pub(crate) fn shard_appended(&self) {
        if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.fire();
        }
    }

    /// Fires (once); later calls do nothing.
    pub(crate) fn fire(&self) {
        if self.fired.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Ok(mut at) = self.at.lock() {
            *at = Some(self.started.elapsed().as_secs_f64());
        }
        if let Some(callback) = self.callback {
            callback();
        }
    }

    /// Whether someone waits for the signal (an asynchronous save).
    pub(crate) fn is_watched(&self) -> bool {
        self.callback.is_some()
    }

    /// Seconds from the start of the save until the signal fired.
    pub(crate) fn seconds(&self) -> Option<f64> {
        self.at.lock().ok().and_then(|at| *at)
    }
}
