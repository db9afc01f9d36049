//! `uring-ckpt bench`: save and load a synthetic checkpoint on each engine and setting,
//! side by side, in a scratch directory that is removed afterwards.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use uring_ckpt::background::{AsyncCheckpointIO, AsyncOptions, OwnedCheckpoint};
use uring_ckpt::config::AsyncMode;
use uring_ckpt::config::{format_size, Config, EngineKind};
use uring_ckpt::io::stats::LatencySummary;
use uring_ckpt::source::HostPtrSource;
use uring_ckpt::synthetic::{Layout, SyntheticCheckpoint};
use uring_ckpt::{Checkpoint, CheckpointIO, LoadOptions, SaveReport, UringCheckpointIO};

use super::inspect::print_table;
use super::{
    base_config, mib, parse_list, parse_queue_depth, parse_size_arg, progress_bar, with_settings, CliError,
    Context, DtypeArg, EngineArg, GlobalOpts, Result,
};

const CPU_NOTE: &str = "CPU s/GiB is user+system time of this process (getrusage RUSAGE_SELF: all its \
threads, io_uring's io-wq workers included) per GiB moved. Kernel writeback threads (kworker) that \
flush the page cache for buffered writes are other processes and are not counted.";

/// Arguments of `bench`.
#[derive(Debug, clap::Args)]
#[command(after_help = CPU_NOTE)]
pub struct BenchArgs {
    /// Size of the synthetic checkpoint.
    #[arg(long, default_value = "512MiB", value_name = "SIZE")]
    size: String,
    /// Tensor layout.
    #[arg(long, default_value = "llama", value_name = "mixed|gpt2|llama")]
    layout: Layout,
    /// Element type.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DtypeArg,
    /// Phases to measure: save, load (a load always needs a save first), and the async
    /// saves `snapshot` and `stream` (for those rows `s` is the caller's stall until the
    /// tensors may change again, and MiB/s is to durable).
    #[arg(long, default_value = "save,load", value_name = "save,load,snapshot,stream")]
    phases: String,
    /// Runs per engine and setting; the table shows the median (and min-max of MiB/s).
    #[arg(long, default_value_t = 3, value_name = "N")]
    repeat: u32,
    /// Also write every figure as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Leave the checkpoints on disk.
    #[arg(long)]
    keep: bool,
    /// Parent directory of the scratch directory (default: the current directory). The
    /// output names its file system, device and, for a loop device, the backing file and
    /// whether it is RAM-backed (scripts/fastdev.sh makes such file systems).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Seed of the synthetic tensor contents.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// A measured phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Phase {
    Save,
    Load,
    /// An async save in snapshot mode: `s` is the caller's stall, MiB/s is to durable.
    Snapshot,
    /// An async save in stream mode: `s` is the caller's stall, MiB/s is to durable.
    Stream,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Save => "save",
            Phase::Load => "load",
            Phase::Snapshot => "async-snapshot",
            Phase::Stream => "async-stream",
        }
    }

    fn async_mode(self) -> Option<AsyncMode> {
        match self {
            Phase::Snapshot => Some(AsyncMode::Snapshot),
            Phase::Stream => Some(AsyncMode::Stream),
            Phase::Save | Phase::Load => None,
        }
    }
}

/// One engine and setting to measure.
#[derive(Debug, Clone)]
pub(super) struct Setting {
    pub config: Config,
}

impl Setting {
    /// Queue depth as it matters for the engine: io_uring's depth, pwrite's threads.
    fn depth_label(&self) -> String {
        match self.config.engine {
            EngineKind::Pwrite => format!("{}t", self.config.io_threads),
            EngineKind::Buffered => "-".to_owned(),
            _ => self.config.queue_depth.to_string(),
        }
    }
}

/// Figures of one save or load.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Sample {
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

/// The repeats of one engine x setting x phase, and their medians.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Row {
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
    pub(super) fn new(setting: &Setting, phase: Phase, runs: Vec<Sample>) -> Row {
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

    pub(super) fn cells(&self) -> [String; 12] {
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

pub(super) const HEADER: [&str; 12] = [
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
pub(super) const RIGHT: [bool; 12] =
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
struct BenchJson<'a> {
    command: String,
    machine: &'a Machine,
    layout: String,
    dtype: String,
    requested_bytes: u64,
    data_bytes: u64,
    tensors: usize,
    repeat: u32,
    peak_rss_is_per_run: bool,
    results: &'a [Row],
}

pub fn run(global: &GlobalOpts, args: BenchArgs) -> Result<()> {
    let size = parse_size_arg(&args.size).map_err(|e| CliError::msg(format!("--size: {e}")))?;
    if args.repeat == 0 {
        return Err(CliError::msg("--repeat must be at least 1"));
    }
    let phases = parse_phases(&args.phases)?;
    let base = base_config(global)?;
    let engines = match global.engine.unwrap_or(EngineArg::All) {
        EngineArg::All => vec![EngineKind::Uring, EngineKind::Pwrite, EngineKind::Buffered],
        other => other.kind().into_iter().collect(),
    };
    let settings = sweep(&base, &engines, global)?;
    super::save::check_memory(size)?;

    let machine = Machine::probe(args.dir.as_deref().unwrap_or(Path::new(".")));
    let command = command_line();
    let workspace = Workspace::create(args.dir.as_deref(), "bench", args.keep)?;

    let started = Instant::now();
    let synth = SyntheticCheckpoint::generate(args.layout, size, args.seed, args.dtype.dtype())?;
    let ckpt = synth.checkpoint();
    eprintln!(
        "generated {} checkpoint: {} tensors, {} ({} requested) in {:.2}s",
        args.layout,
        synth.tensor_count(),
        mib(synth.data_bytes()),
        mib(size),
        started.elapsed().as_secs_f64()
    );

    let async_phases = phases.iter().filter(|p| p.async_mode().is_some()).count() as u64;
    let bar = progress_bar(
        (settings.len() as u64) * u64::from(args.repeat) * (1 + async_phases),
        "{prefix} [{bar:30}] {pos}/{len} runs, {elapsed} {msg}",
    );
    let mut rows = Vec::new();
    let mut rss_per_run = true;
    for setting in &settings {
        bar.set_message(format!("{} {}", setting.config.engine, format_size(setting.config.chunk_size)));
        let (save, load, per_run) =
            measure(setting, &ckpt, &workspace, &phases, args.repeat, args.keep, || bar.inc(1))?;
        rss_per_run &= per_run;
        if phases.contains(&Phase::Save) {
            rows.push(Row::new(setting, Phase::Save, save));
        }
        if phases.contains(&Phase::Load) {
            rows.push(Row::new(setting, Phase::Load, load));
        }
        for phase in phases.iter().copied().filter(|p| p.async_mode().is_some()) {
            let samples = measure_async(setting, &ckpt, &workspace, phase, args.repeat, || bar.inc(1))?;
            rows.push(Row::new(setting, phase, samples));
        }
    }
    bar.finish_and_clear();

    println!("uring-ckpt bench: {}", command);
    println!("{}", machine.describe());
    println!(
        "checkpoint: {} layout, {}, {} tensors, {} of tensor data; {} run(s) per row, median shown; \
         fsync {}; verify on load {}",
        args.layout,
        args.dtype.dtype(),
        synth.tensor_count(),
        mib(synth.data_bytes()),
        args.repeat,
        base.fsync,
        base.verify_on_load
    );
    println!();
    let cells: Vec<[String; 12]> = rows.iter().map(Row::cells).collect();
    print_table(&HEADER, &cells, &RIGHT);
    println!();
    print_notes(&rows, rss_per_run);
    if let Some(path) = &args.json {
        let doc = BenchJson {
            command,
            machine: &machine,
            layout: args.layout.to_string(),
            dtype: args.dtype.dtype().to_string(),
            requested_bytes: size,
            data_bytes: synth.data_bytes(),
            tensors: synth.tensor_count(),
            repeat: args.repeat,
            peak_rss_is_per_run: rss_per_run,
            results: &rows,
        };
        write_json(path, &doc)?;
        eprintln!("wrote {}", path.display());
    }
    drop(workspace);
    Ok(())
}

fn print_notes(rows: &[Row], rss_per_run: bool) {
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

fn parse_phases(s: &str) -> Result<Vec<Phase>> {
    let phases = parse_list(s, "--phases", |p| match p.to_ascii_lowercase().as_str() {
        "save" => Ok(Phase::Save),
        "load" => Ok(Phase::Load),
        "snapshot" | "async-snapshot" => Ok(Phase::Snapshot),
        "stream" | "async-stream" => Ok(Phase::Stream),
        _ => Err(CliError::msg(format!("unknown phase {p:?}; expected save, load, snapshot or stream"))),
    })?;
    let mut out = Vec::new();
    for p in phases {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

/// The engine x chunk size x queue depth settings to run; queue depth is swept for io_uring
/// only (pwrite uses `io_threads`, buffered has none).
pub(super) fn sweep(base: &Config, engines: &[EngineKind], global: &GlobalOpts) -> Result<Vec<Setting>> {
    let depths = match &global.queue_depth {
        Some(list) => parse_list(list, "--queue-depth", parse_queue_depth)?,
        None => vec![base.queue_depth],
    };
    let chunks = match &global.chunk_size {
        Some(list) => parse_list(list, "--chunk-size", parse_size_arg)?,
        None => vec![base.chunk_size],
    };
    let mut settings = Vec::new();
    for &engine in engines {
        let mut engine_config = base.clone();
        engine_config.engine = engine;
        for &chunk in &chunks {
            let engine_depths = if matches!(engine, EngineKind::Uring | EngineKind::Auto) {
                &depths[..]
            } else {
                &depths[..1]
            };
            for &qd in engine_depths {
                let config = with_settings(&engine_config, qd, chunk)?;
                settings.push(Setting { config });
            }
        }
    }
    Ok(settings)
}

/// Runs `repeat` saves (each to a new path) and, when asked, a load of each from disk.
/// Returns the save samples, the load samples, and whether the peak RSS could be reset
/// before every run.
pub(super) fn measure(
    setting: &Setting,
    ckpt: &Checkpoint<'_>,
    workspace: &Workspace,
    phases: &[Phase],
    repeat: u32,
    keep: bool,
    mut tick: impl FnMut(),
) -> Result<(Vec<Sample>, Vec<Sample>, bool)> {
    let io = UringCheckpointIO::new(setting.config.clone())?;
    let (mut saves, mut loads) = (Vec::new(), Vec::new());
    let mut rss_reset = true;
    for _ in 0..repeat {
        if interrupted() {
            return Err(CliError::msg("interrupted"));
        }
        let path = workspace.next_path();
        rss_reset &= reset_peak_rss();
        let before = cpu_seconds();
        let report = io.save_checkpoint(ckpt, &path)?;
        let cpu = cpu_seconds() - before;
        saves.push(Sample::of_save(&report, report.seconds, cpu));
        if phases.contains(&Phase::Load) {
            drop_page_cache(&path)?;
            rss_reset &= reset_peak_rss();
            let before = cpu_seconds();
            let loaded = io.load_checkpoint(&path, &LoadOptions::default())?;
            let cpu = cpu_seconds() - before;
            let r = &loaded.report;
            loads.push(Sample {
                mib_s: r.throughput_mib_s,
                seconds: r.seconds,
                bytes: r.read_bytes,
                cpu_seconds: cpu,
                latency: r.read_latency,
                ops: 0,
                peak_rss_bytes: peak_rss(),
                engine_used: r.engine.engine,
                fallbacks: fallbacks(&r.engine),
                zero_copy_bytes: 0,
                staged_bytes: 0,
            });
        }
        if !keep {
            io.remove_checkpoint(&path)?;
        }
        tick();
    }
    Ok((saves, loads, rss_reset))
}

/// Runs `repeat` async saves in `phase`'s mode through one `AsyncCheckpointIO` (so later
/// runs reuse its staging memory, as a training loop would) and records the stall of each.
fn measure_async(
    setting: &Setting,
    ckpt: &Checkpoint<'_>,
    workspace: &Workspace,
    phase: Phase,
    repeat: u32,
    mut tick: impl FnMut(),
) -> Result<Vec<Sample>> {
    let Some(mode) = phase.async_mode() else { return Ok(Vec::new()) };
    let inner = UringCheckpointIO::new(setting.config.clone())?;
    let io = AsyncCheckpointIO::new(inner, AsyncOptions { mode, max_saves_in_flight: 1 })?;
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

/// Evicts every file of the checkpoint at `dir` from the page cache (after syncing it, so
/// that no page is dirty and every page can go), so that a load reads from the disk.
fn drop_page_cache(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let entries = fs::read_dir(dir).context(|| format!("list {}", dir.display()))?;
    for entry in entries {
        let path = entry.context(|| format!("list {}", dir.display()))?.path();
        if !path.is_file() {
            continue;
        }
        let file = fs::File::open(&path).context(|| format!("open {}", path.display()))?;
        file.sync_data().context(|| format!("fdatasync {}", path.display()))?;
        nix::fcntl::posix_fadvise(
            file.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .context(|| format!("posix_fadvise(DONTNEED) {}", path.display()))?;
    }
    Ok(())
}

/// User + system CPU seconds of this process so far (every thread).
fn cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => 0.0,
    }
}

/// Resets VmHWM to the current RSS; false when the kernel does not allow it.
fn reset_peak_rss() -> bool {
    fs::write("/proc/self/clear_refs", b"5").is_ok()
}

/// VmHWM (peak resident set size) in bytes, 0 when unknown.
fn peak_rss() -> u64 {
    let Ok(status) = fs::read_to_string("/proc/self/status") else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
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

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether Ctrl-C was pressed since [`Workspace::create`]. A second Ctrl-C kills at once.
pub(super) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn install_sigint_handler() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(SigHandler::Handler(on_sigint), SaFlags::SA_RESETHAND, SigSet::empty());
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and
    // SA_RESETHAND restores the default action so a second Ctrl-C terminates as usual.
    if let Err(e) = unsafe { sigaction(Signal::SIGINT, &action) } {
        log::warn!("cannot install a Ctrl-C handler ({e}); an interrupted run leaves its files");
    }
}

/// A scratch directory `<parent>/.uring-ckpt-<what>-<pid>` that is removed (with everything
/// in it) when dropped, unless asked to keep it. Ctrl-C stops a run between two
/// saves and the directory is removed on the way out.
pub(super) struct Workspace {
    dir: PathBuf,
    keep: bool,
    next: std::cell::Cell<u32>,
}

impl Workspace {
    pub(super) fn create(parent: Option<&Path>, what: &str, keep: bool) -> Result<Workspace> {
        let parent = parent.unwrap_or(Path::new("."));
        super::existing_dir(parent)?;
        let dir = parent.join(format!(".uring-ckpt-{what}-{}", std::process::id()));
        fs::create_dir(&dir).context(|| format!("create scratch directory {}", dir.display()))?;
        install_sigint_handler();
        Ok(Workspace { dir, keep, next: std::cell::Cell::new(0) })
    }

    /// A new checkpoint path inside the scratch directory.
    pub(super) fn next_path(&self) -> PathBuf {
        let n = self.next.get();
        self.next.set(n + 1);
        self.dir.join(format!("ckpt-{n:04}"))
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.dir.display());
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// Where the benchmark runs.
#[derive(Debug, Serialize)]
pub(super) struct Machine {
    kernel: String,
    cpus: usize,
    cpu_model: String,
    memory_gib: f64,
    dir: String,
    #[serde(flatten)]
    storage: Storage,
}

/// The file system and device a directory lives on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(super) struct Storage {
    /// File system type as /proc/self/mountinfo names it (`xfs`, `ext4`, `btrfs`, `tmpfs`).
    fs_type: String,
    /// Mount source: the block device (`/dev/vda`, `/dev/loop3`) or the pseudo source of a
    /// memory file system.
    device: String,
    mount_point: String,
    /// For a loop device: the file behind it (/sys/block/loopN/loop/backing_file).
    backing_file: Option<String>,
    /// For a loop device: the file system type of the backing file.
    backing_fs_type: Option<String>,
    /// Whether the bytes end up in memory: a tmpfs/ramfs mount, or a loop device whose
    /// backing file is on one (or a /dev/ram or zram device).
    ram_backed: bool,
    /// One line for humans, the same as the text output prints.
    summary: String,
}

impl Storage {
    /// Probes the file system of `path` (which must exist).
    pub(super) fn probe(path: &Path) -> Storage {
        let Some(mount) = mount_of(path) else {
            return Storage {
                fs_type: "unknown".to_owned(),
                device: "unknown".to_owned(),
                mount_point: "unknown".to_owned(),
                summary: "an unknown file system (not in /proc/self/mountinfo)".to_owned(),
                ..Storage::default()
            };
        };
        let block = block_name(&mount.source);
        let backing_file = block.as_deref().and_then(loop_backing_file);
        let backing_fs_type = backing_file.as_deref().and_then(|f| mount_of(Path::new(f))).map(|m| m.fs_type);
        let memory_fs = |t: &str| matches!(t, "tmpfs" | "ramfs");
        let ram_block = block.as_deref().is_some_and(|b| b.starts_with("ram") || b.starts_with("zram"));
        let ram_backed =
            memory_fs(&mount.fs_type) || ram_block || backing_fs_type.as_deref().is_some_and(memory_fs);
        let mut storage = Storage {
            fs_type: mount.fs_type,
            device: mount.source,
            mount_point: mount.mount_point,
            backing_file,
            backing_fs_type,
            ram_backed,
            summary: String::new(),
        };
        storage.summary = storage.describe();
        storage
    }

    fn describe(&self) -> String {
        let ram = if self.ram_backed { ": RAM-backed" } else { "" };
        match (&self.backing_file, &self.backing_fs_type) {
            (Some(file), fs) => format!(
                "{} on {} (loop device over {} on {}{ram}), mounted at {}",
                self.fs_type,
                self.device,
                file,
                fs.as_deref().unwrap_or("an unknown file system"),
                self.mount_point
            ),
            (None, _) => format!("{} on {}{ram}, mounted at {}", self.fs_type, self.device, self.mount_point),
        }
    }
}

impl Machine {
    pub(super) fn probe(dir: &Path) -> Machine {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim()))
            .unwrap_or("unknown")
            .to_owned();
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
        let canonical = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            memory_gib,
            dir: canonical.display().to_string(),
            storage: Storage::probe(&canonical),
        }
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "machine: Linux {}, {} CPU(s) ({}), {:.1} GiB RAM\nstorage: directory {} on {}",
            self.kernel, self.cpus, self.cpu_model, self.memory_gib, self.dir, self.storage.summary
        )
    }
}

/// One line of /proc/self/mountinfo, the fields we use.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    fs_type: String,
    source: String,
    mount_point: String,
}

/// The mount that holds `path`: among the mounts whose mount point is above `path`, the
/// longest, preferring one with `path`'s device number (a later mount over the same point
/// hides earlier ones, and btrfs subvolumes have device numbers of their own).
fn mount_of(path: &Path) -> Option<Mount> {
    use std::os::unix::fs::MetadataExt;
    let canonical = fs::canonicalize(path).ok()?;
    let dev = fs::metadata(&canonical).ok()?.dev();
    let wanted = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    best_mount(&info, &canonical, &wanted)
}

fn best_mount(info: &str, path: &Path, wanted_dev: &str) -> Option<Mount> {
    // (same device, mount point length, line order): the greatest wins.
    let mut best: Option<((bool, usize, usize), Mount)> = None;
    for (order, line) in info.lines().enumerate() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else { continue };
        if fields.len() < sep + 3 || sep < 5 {
            continue;
        }
        let mount_point = unescape_mountinfo(fields[4]);
        if !path.starts_with(&mount_point) {
            continue;
        }
        let key = (fields[2] == wanted_dev, mount_point.len(), order);
        if best.as_ref().is_none_or(|(k, _)| key > *k) {
            let mount = Mount {
                fs_type: unescape_mountinfo(fields[sep + 1]),
                source: unescape_mountinfo(fields[sep + 2]),
                mount_point,
            };
            best = Some((key, mount));
        }
    }
    best.map(|(_, m)| m)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The kernel's name of the block device `source` (`/dev/loop3` -> `loop3`, following
/// links such as /dev/mapper/x or /dev/disk/by-*), `None` when it is not a device path.
fn block_name(source: &str) -> Option<String> {
    if !source.starts_with("/dev/") {
        return None;
    }
    let real = fs::canonicalize(source).unwrap_or_else(|_| PathBuf::from(source));
    let name = real.file_name()?.to_str()?.to_owned();
    Path::new("/sys/class/block").join(&name).exists().then_some(name)
}

/// The backing file of the loop device `name` (`loop3`), `None` when it is not one.
fn loop_backing_file(name: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/sys/class/block/{name}/loop/backing_file")).ok()?;
    let file = text.trim_end_matches('\n');
    Some(file.strip_suffix(" (deleted)").unwrap_or(file).to_owned()).filter(|f| !f.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 25 0:27 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24731184k
90 27 7:3 / /mnt/uring\\040ckpt rw,relatime - xfs /dev/loop3 rw
91 27 0:50 / /mnt/over rw,relatime - tmpfs first rw
92 27 0:51 / /mnt/over rw,relatime - tmpfs second rw
";

    #[test]
    fn finds_the_mount_of_a_path() {
        let m = best_mount(INFO, Path::new("/mnt/uring ckpt/a/b"), "7:3").expect("mount");
        assert_eq!(
            (m.fs_type.as_str(), m.source.as_str(), m.mount_point.as_str()),
            ("xfs", "/dev/loop3", "/mnt/uring ckpt")
        );
        let m = best_mount(INFO, Path::new("/work/x"), "254:0").expect("mount");
        assert_eq!((m.fs_type.as_str(), m.source.as_str()), ("ext4", "/dev/vda"));
        // A device number that matches no line (btrfs subvolumes): the longest mount point.
        let m = best_mount(INFO, Path::new("/dev/shm/f"), "0:99").expect("mount");
        assert_eq!(m.fs_type, "tmpfs");
        // Two mounts on one point: the later one is what the path sees.
        let m = best_mount(INFO, Path::new("/mnt/over/x"), "0:1").expect("mount");
        assert_eq!(m.source, "second");
    }

    #[test]
    fn unescapes_mountinfo_fields() {
        assert_eq!(unescape_mountinfo("a\\040b\\011c\\134d"), "a b\tc\\d");
        assert_eq!(unescape_mountinfo("no\\escape\\9"), "no\\escape\\9");
    }

    #[test]
    fn describes_this_machine_storage() {
        let s = Storage::probe(Path::new(env!("CARGO_MANIFEST_DIR")));
        assert_ne!(s.fs_type, "unknown", "{s:?}");
        assert!(s.summary.contains(&s.fs_type) && s.summary.contains(&s.mount_point), "{s:?}");
    }
}
