//! The measured phases: `repeat` saves (and loads) of one engine and setting, or async
//! saves in snapshot or stream mode, each recorded as a [`Sample`].

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use uring_ckpt::background::{AsyncCheckpointIO, AsyncOptions, OwnedCheckpoint};
use uring_ckpt::config::{AsyncMode, Config, EngineKind};
use uring_ckpt::io::stats::LatencySummary;
use uring_ckpt::source::HostPtrSource;
use uring_ckpt::{Checkpoint, CheckpointIO, LoadOptions, LoadReport, SaveReport, UringCheckpointIO};

use super::resources::{cpu_seconds, drop_page_cache, peak_rss, reset_peak_rss};
use super::scratch::{interrupted, Workspace};
use crate::cli::load::PhasedDests;
use crate::cli::{CliError, Result};

/// A measured phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(in crate::cli) enum Phase {
    Save,
    /// A load into memory the load allocates (a restart with no model yet).
    Load,
    /// A load in place into host memory allocated and touched before the timed runs (a live
    /// model's parameters), through the staging pool.
    LoadInto,
    /// An async save in snapshot mode: `s` is the caller's stall, MiB/s is to durable.
    Snapshot,
    /// An async save in stream mode: `s` is the caller's stall, MiB/s is to durable.
    Stream,
}

impl Phase {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Phase::Save => "save",
            Phase::Load => "load",
            Phase::LoadInto => "load-into",
            Phase::Snapshot => "async-snapshot",
            Phase::Stream => "async-stream",
        }
    }

    pub(super) fn async_mode(self) -> Option<AsyncMode> {
        match self {
            Phase::Snapshot => Some(AsyncMode::Snapshot),
            Phase::Stream => Some(AsyncMode::Stream),
            Phase::Save | Phase::Load | Phase::LoadInto => None,
        }
    }
}

/// One engine and setting to measure.
#[derive(Debug, Clone)]
pub(in crate::cli) struct Setting {
    pub config: Config,
}

impl Setting {
    /// Queue depth as it matters for the engine: io_uring's depth, pwrite's threads.
    pub(super) fn depth_label(&self) -> String {
        match self.config.engine {
            EngineKind::Pwrite => format!("{}t", self.config.io_threads),
            EngineKind::Buffered => "-".to_owned(),
            _ => self.config.queue_depth.to_string(),
        }
    }
}

/// Figures of one save or load.
#[derive(Debug, Clone, Serialize)]
pub(in crate::cli) struct Sample {
    pub mib_s: f64,
    pub seconds: f64,
    pub bytes: u64,
    pub cpu_seconds: f64,
    pub latency: LatencySummary,
    pub ops: u64,
    pub peak_rss_bytes: u64,
    pub engine_used: EngineKind,
    pub fallbacks: Vec<String>,
    pub zero_copy_bytes: u64,
    pub staged_bytes: u64,
}

impl Sample {
    /// The figures of one save; `seconds` is the time shown (to durable, or the stall of an
    /// async save), `cpu_seconds` what the process spent on it.
    fn of_save(report: &SaveReport, seconds: f64, cpu_seconds: f64) -> Sample {
        Sample {
            mib_s: report.throughput_mib_s,
            seconds,
            bytes: report.file_bytes,
            cpu_seconds,
            latency: report.write_latency,
            ops: report.writes,
            peak_rss_bytes: peak_rss(),
            engine_used: report.engine.engine,
            fallbacks: fallbacks(&report.engine),
            zero_copy_bytes: report.zero_copy_bytes,
            staged_bytes: report.staged_bytes,
        }
    }
}

/// The samples of [`measure`]: saves, fresh loads, in-place loads.
#[derive(Default)]
pub(in crate::cli) struct Measured {
    pub saves: Vec<Sample>,
    pub loads: Vec<Sample>,
    pub loads_into: Vec<Sample>,
    /// Whether the peak RSS could be reset before every run.
    pub rss_reset: bool,
}

impl Sample {
    /// The figures of one load, `cpu_seconds` what the process spent on it.
    fn of_load(r: &LoadReport, cpu_seconds: f64) -> Sample {
        Sample {
            mib_s: r.throughput_mib_s,
            seconds: r.seconds,
            bytes: r.read_bytes,
            cpu_seconds,
            latency: r.read_latency,
            ops: 0,
            peak_rss_bytes: peak_rss(),
            engine_used: r.engine.engine,
            fallbacks: fallbacks(&r.engine),
            zero_copy_bytes: 0,
            staged_bytes: 0,
        }
    }
}

/// Runs `repeat` saves (each to a new path) and, when asked, a fresh and an in-place load
/// of each from disk.
pub(in crate::cli) fn measure(
    setting: &Setting,
    ckpt: &Checkpoint<'_>,
    workspace: &Workspace,
    phases: &[Phase],
    repeat: u32,
    keep: bool,
    mut tick: impl FnMut(),
) -> Result<Measured> {
    let io = UringCheckpointIO::new(setting.config.clone())?;
    let mut out = Measured { rss_reset: true, ..Measured::default() };
    // The in-place destination: allocated and touched after the first save (at each tensor's
    // place in a page of the file, as `load --into host` does), reused by every run.
    let mut dests: Option<PhasedDests> = None;
    for _ in 0..repeat {
        if interrupted() {
            return Err(CliError::msg("interrupted"));
        }
        let path = workspace.next_path();
        out.rss_reset &= reset_peak_rss();
        let before = cpu_seconds();
        let report = io.save_checkpoint(ckpt, &path)?;
        let cpu = cpu_seconds() - before;
        out.saves.push(Sample::of_save(&report, report.seconds, cpu));
        if phases.contains(&Phase::Load) {
            drop_page_cache(&path)?;
            out.rss_reset &= reset_peak_rss();
            let before = cpu_seconds();
            let loaded = io.load_checkpoint(&path, &LoadOptions::default())?;
            out.loads.push(Sample::of_load(&loaded.report, cpu_seconds() - before));
        }
        if phases.contains(&Phase::LoadInto) {
            let dests = match &mut dests {
                Some(dests) => dests,
                None => {
                    dests.insert(PhasedDests::new(&uring_ckpt::inspect::inspect(io.config(), &path)?.tensors))
                }
            };
            drop_page_cache(&path)?;
            out.rss_reset &= reset_peak_rss();
            let sink = dests.sink()?;
            let before = cpu_seconds();
            let loaded = io.load_into(&path, &LoadOptions::default(), true, &sink)?;
            out.loads_into.push(Sample::of_load(&loaded.report, cpu_seconds() - before));
        }
        if !keep {
            io.remove_checkpoint(&path)?;
        }
        tick();
    }
    Ok(out)
}

/// Runs `repeat` async saves in `phase`'s mode through one `AsyncCheckpointIO` (so later
/// runs reuse its staging memory, as a training loop would) and records the stall of each.
pub(super) fn measure_async(
    setting: &Setting,
    ckpt: &Checkpoint<'_>,
    workspace: &Workspace,
    phase: Phase,
    repeat: u32,
    mut tick: impl FnMut(),
) -> Result<Vec<Sample>> {
    let Some(mode) = phase.async_mode() else { return Ok(Vec::new()) };
    let inner = UringCheckpointIO::new(setting.config.clone())?;
    let io = AsyncCheckpointIO::new(
        inner,
        AsyncOptions { mode, max_saves_in_flight: 1, ..AsyncOptions::default() },
    )?;
    let mut samples = Vec::new();
    for _ in 0..repeat {
        if interrupted() {
            return Err(CliError::msg("interrupted"));
        }
        let mut owned = OwnedCheckpoint::new();
        for tensor in &ckpt.tensors {
            let bytes =
                tensor.data.host_bytes().ok_or_else(|| CliError::msg("synthetic tensors are host memory"))?;
            // SAFETY: the synthetic checkpoint outlives this function and is never modified;
            // every save is waited for (durable) before the next one starts or we return.
            let source = unsafe { HostPtrSource::new(bytes.as_ptr(), bytes.len()) };
            owned.add(tensor.name.clone(), tensor.dtype, &tensor.shape, Arc::new(source))?;
        }
        let path = workspace.next_path();
        reset_peak_rss();
        let before = cpu_seconds();
        let started = Instant::now();
        let handle = io.save_checkpoint(owned, &path)?;
        handle.staged().wait();
        let stall = started.elapsed().as_secs_f64();
        let report = handle.wait()?;
        let cpu = cpu_seconds() - before;
        samples.push(Sample::of_save(&report, stall, cpu));
        io.remove_checkpoint(&path)?;
        tick();
    }
    Ok(samples)
}

fn fallbacks(report: &uring_ckpt::io::EngineReport) -> Vec<String> {
    report
        .fallbacks
        .iter()
        .map(|f| format!("{} refused, using {}: {}", f.what, f.instead, f.reason))
        .collect()
}
