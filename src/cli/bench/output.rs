//! What `bench` prints: the table rows (median, min-max and latency percentiles of the
//! repeats), the notes under the table, and the `--json` document.

use std::fs;
use std::path::Path;

use serde::Serialize;
use uring_ckpt::config::{format_size, EngineKind};

use super::machine::Machine;
use super::measure::{Phase, Sample, Setting};
use super::CPU_NOTE;
use crate::cli::{CliError, Context, Result};

/// The repeats of one engine x setting x phase, and their medians.
#[derive(Debug, Clone, Serialize)]
pub(in crate::cli) struct Row {
    pub engine: EngineKind,
    pub engine_used: EngineKind,
    pub queue_depth: u32,
    pub io_threads: u32,
    pub chunk_size: u64,
    pub phase: Phase,
    pub mib_s_median: f64,
    pub mib_s_min: f64,
    pub mib_s_max: f64,
    pub seconds_median: f64,
    pub cpu_seconds_per_gib: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub peak_rss_mib: f64,
    pub runs: Vec<Sample>,
    #[serde(skip)]
    depth_label: String,
}

impl Row {
    pub(in crate::cli) fn new(setting: &Setting, phase: Phase, runs: Vec<Sample>) -> Row {
        let pick = |f: fn(&Sample) -> f64| median(runs.iter().map(f).collect());
        let pick_u = |f: fn(&Sample) -> u64| median(runs.iter().map(|s| f(s) as f64).collect()) as u64;
        let mib_s: Vec<f64> = runs.iter().map(|s| s.mib_s).collect();
        let bytes: u64 = runs.iter().map(|s| s.bytes).sum();
        let cpu: f64 = runs.iter().map(|s| s.cpu_seconds).sum();
        Row {
            engine: setting.config.engine,
            engine_used: runs.first().map_or(setting.config.engine, |s| s.engine_used),
            queue_depth: setting.config.queue_depth,
            io_threads: setting.config.io_threads,
            chunk_size: setting.config.chunk_size,
            phase,
            mib_s_median: pick(|s| s.mib_s),
            mib_s_min: mib_s.iter().copied().fold(f64::INFINITY, f64::min),
            mib_s_max: mib_s.iter().copied().fold(0.0, f64::max),
            seconds_median: pick(|s| s.seconds),
            cpu_seconds_per_gib: if bytes > 0 { cpu / (bytes as f64 / (1u64 << 30) as f64) } else { 0.0 },
            p50_us: pick_u(|s| s.latency.p50_us),
            p99_us: pick_u(|s| s.latency.p99_us),
            p999_us: pick_u(|s| s.latency.p999_us),
            peak_rss_mib: runs.iter().map(|s| s.peak_rss_bytes).max().unwrap_or(0) as f64 / (1 << 20) as f64,
            runs,
            depth_label: setting.depth_label(),
        }
    }

    fn engine_cell(&self) -> String {
        if self.engine_used == self.engine {
            self.engine.to_string()
        } else {
            format!("{}->{}", self.engine, self.engine_used)
        }
    }

    pub(in crate::cli) fn cells(&self) -> [String; 12] {
        [
            self.engine_cell(),
            self.depth_label.clone(),
            format_size(self.chunk_size),
            self.phase.as_str().to_owned(),
            format!("{:.0}", self.mib_s_median),
            format!("{:.0}-{:.0}", self.mib_s_min, self.mib_s_max),
            format!("{:.3}", self.seconds_median),
            format!("{:.2}", self.cpu_seconds_per_gib),
            self.p50_us.to_string(),
            self.p99_us.to_string(),
            self.p999_us.to_string(),
            format!("{:.0}", self.peak_rss_mib),
        ]
    }
}

pub(in crate::cli) const HEADER: [&str; 12] = [
    "engine",
    "qd",
    "chunk",
    "phase",
    "MiB/s",
    "min-max",
    "s",
    "CPU s/GiB",
    "p50 us",
    "p99 us",
    "p99.9 us",
    "peak RSS MiB",
];
pub(in crate::cli) const RIGHT: [bool; 12] =
    [false, true, true, false, true, true, true, true, true, true, true, true];

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Everything `--json` writes.
#[derive(Debug, Serialize)]
pub(super) struct BenchJson<'a> {
    pub command: String,
    pub machine: &'a Machine,
    pub layout: String,
    pub dtype: String,
    pub requested_bytes: u64,
    pub data_bytes: u64,
    pub tensors: usize,
    pub repeat: u32,
    pub peak_rss_is_per_run: bool,
    pub results: &'a [Row],
}

pub(super) fn print_notes(rows: &[Row], rss_per_run: bool) {
    let best = |engine: EngineKind| {
        rows.iter()
            .filter(|r| r.engine == engine && r.phase == Phase::Save)
            .map(|r| r.mib_s_median)
            .fold(None, |acc: Option<f64>, v| Some(acc.map_or(v, |a| a.max(v))))
    };
    match best(EngineKind::Buffered) {
        Some(buffered) if buffered > 0.0 => {
            let ratios: Vec<String> = [EngineKind::Uring, EngineKind::Pwrite, EngineKind::Buffered]
                .into_iter()
                .filter_map(|e| best(e).map(|v| format!("{e} {:.2}x", v / buffered)))
                .collect();
            println!("save MiB/s relative to buffered (best setting of each engine): {}", ratios.join(", "));
        }
        _ if rows.iter().any(|r| r.phase == Phase::Save) => {
            println!("(run with --engine all to compare each engine's save MiB/s with buffered writes)")
        }
        _ => {}
    }
    if rows.iter().any(|r| r.phase.async_mode().is_some()) {
        println!(
            "async rows: s is the caller's stall (call until the tensors may change again), MiB/s is to \
             durable; a snapshot copies the checkpoint to reused host memory first, a stream stages it \
             through the staging pool."
        );
    }
    let mut seen = Vec::new();
    for row in rows {
        for sample in &row.runs {
            for f in &sample.fallbacks {
                if !seen.contains(f) {
                    println!("fallback ({} engine): {f}", row.engine);
                    seen.push(f.clone());
                }
            }
        }
    }
    println!("MiB/s counts shard file bytes over the time until the checkpoint is committed and durable");
    println!("(save) or read and CRC-checked (load); the page cache is dropped before each load.");
    println!("{CPU_NOTE}");
    if !rss_per_run {
        println!("peak RSS is the process's lifetime peak (/proc/self/clear_refs could not be written).");
    } else {
        println!("peak RSS (VmHWM, reset before each run) includes the synthetic checkpoint held in memory.");
    }
}

pub(super) fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::msg(format!("encode JSON: {e}")))?;
    fs::write(path, text + "\n").context(|| format!("write {}", path.display()))
}

/// The command line as typed (arguments with spaces quoted).
pub(super) fn command_line() -> String {
    std::env::args()
        .map(|a| if a.is_empty() || a.contains(char::is_whitespace) { format!("'{a}'") } else { a })
        .collect::<Vec<_>>()
        .join(" ")
}
