//! Argument parsing, configuration and output helpers shared by the subcommands; one module
//! per subcommand.

mod bench;
mod inspect;
mod load;
mod save;
mod tune;
mod verify;

use std::error::Error as StdError;
use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use uring_ckpt::config::{parse_size, Config, EngineKind};
use uring_ckpt::format::Dtype;

/// The file `uring-ckpt` reads from the current directory when neither `--config` nor
/// `URING_CKPT_CONFIG` names one (and the file `tune` writes by default).
pub const LOCAL_CONFIG: &str = "uring-ckpt.toml";

/// Writes and reads deep-learning checkpoints (safetensors shards) with io_uring + O_DIRECT.
///
/// Configuration: `--config FILE`, else the file named by URING_CKPT_CONFIG, else
/// ./uring-ckpt.toml if it exists, else the defaults; then URING_CKPT_* environment
/// variables; then the options below. Log level: URING_CKPT_LOG (default warn).
#[derive(Debug, Parser)]
#[command(name = "uring-ckpt", version, about, max_term_width = 110)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalOpts,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, clap::Args)]
struct GlobalOpts {
    /// TOML configuration file.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// I/O engine: auto, uring, pwrite, buffered; `bench` also takes `all`.
    #[arg(long, global = true, value_name = "ENGINE")]
    engine: Option<EngineArg>,
    /// io_uring queue depth; `bench` and `tune` take a comma list to sweep (e.g. 1,4,16,64).
    #[arg(long, global = true, value_name = "N[,N...]")]
    queue_depth: Option<String>,
    /// Bytes per write and staging buffer (e.g. 8MiB); `bench` and `tune` take a comma list.
    #[arg(long, global = true, value_name = "SIZE[,SIZE...]")]
    chunk_size: Option<String>,
}

/// `--engine` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    /// io_uring, falling back to pwrite, then buffered.
    Auto,
    /// io_uring + O_DIRECT.
    #[value(alias = "io_uring")]
    Uring,
    /// Thread pool of pwrite/pread + O_DIRECT.
    Pwrite,
    /// std::fs buffered writes + fdatasync, the baseline.
    Buffered,
    /// uring, pwrite and buffered side by side (bench only).
    All,
}

impl EngineArg {
    fn kind(self) -> Option<EngineKind> {
        match self {
            EngineArg::Auto => Some(EngineKind::Auto),
            EngineArg::Uring => Some(EngineKind::Uring),
            EngineArg::Pwrite => Some(EngineKind::Pwrite),
            EngineArg::Buffered => Some(EngineKind::Buffered),
            EngineArg::All => None,
        }
    }
}

/// Element types of synthetic checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DtypeArg {
    /// bfloat16.
    Bf16,
    /// 32-bit float.
    F32,
}

impl DtypeArg {
    fn dtype(self) -> Dtype {
        match self {
            DtypeArg::Bf16 => Dtype::BF16,
            DtypeArg::F32 => Dtype::F32,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Save a synthetic checkpoint and report how the write went.
    Save(save::SaveArgs),
    /// List a checkpoint's tensors, shards and metadata.
    Inspect(inspect::InspectArgs),
    /// Check a checkpoint's structure and every tensor's CRC-32.
    Verify(verify::VerifyArgs),
    /// Read a checkpoint (or some tensors) and report throughput and latency.
    Load(load::LoadArgs),
    /// Benchmark save and load on each engine, side by side.
    Bench(bench::BenchArgs),
    /// Sweep queue depth x chunk size on this disk and write the best into a config file.
    Tune(tune::TuneArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let Cli { global, command } = cli;
    match command {
        Command::Save(args) => save::run(&global, args),
        Command::Inspect(args) => inspect::run(&global, args),
        Command::Verify(args) => verify::run(&global, args),
        Command::Load(args) => load::run(&global, args),
        Command::Bench(args) => bench::run(&global, args),
        Command::Tune(args) => tune::run(&global, args),
    }
}

/// What a subcommand fails with: a message, and the error behind it when there is one.
#[derive(Debug)]
pub struct CliError {
    message: String,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl CliError {
    fn msg(message: impl Into<String>) -> CliError {
        CliError { message: message.into(), source: None }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for CliError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn StdError + 'static))
    }
}

impl From<uring_ckpt::Error> for CliError {
    fn from(err: uring_ckpt::Error) -> CliError {
        // Keep the library error's own chain reachable for main's "caused by" lines.
        let message = err.to_string();
        CliError { message, source: err.source().map(|s| Box::from(s.to_string())) }
    }
}

/// Attaches what was being done to an error.
trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: StdError + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| CliError { message: format!("{}: {e}", what()), source: Some(Box::new(e)) })
    }
}

/// Result of the CLI's functions.
pub type Result<T, E = CliError> = std::result::Result<T, E>;

/// The configuration: file (`--config`, `URING_CKPT_CONFIG`, or `./uring-ckpt.toml`), then
/// the environment, then the command-line overrides that take a single value.
fn base_config(global: &GlobalOpts) -> Result<Config> {
    let local = Path::new(LOCAL_CONFIG);
    let from_env = std::env::var_os("URING_CKPT_CONFIG").is_some_and(|v| !v.is_empty());
    let path = match &global.config {
        Some(p) => Some(p.clone()),
        None if !from_env && local.is_file() => {
            eprintln!("using configuration from ./{LOCAL_CONFIG}");
            Some(local.to_path_buf())
        }
        None => None,
    };
    Ok(Config::load(path.as_deref())?)
}

/// [`base_config`] with `--engine`, `--queue-depth` and `--chunk-size` applied, for the
/// subcommands that take one value of each.
fn single_config(global: &GlobalOpts) -> Result<Config> {
    let mut config = base_config(global)?;
    if let Some(engine) = global.engine {
        config.engine =
            engine.kind().ok_or_else(|| CliError::msg("--engine all is only for `uring-ckpt bench`"))?;
    }
    if let Some(list) = &global.queue_depth {
        config.queue_depth = single(parse_list(list, "--queue-depth", parse_queue_depth)?, "--queue-depth")?;
    }
    if let Some(list) = &global.chunk_size {
        config.chunk_size = single(parse_list(list, "--chunk-size", parse_size_arg)?, "--chunk-size")?;
    }
    with_settings(&config, config.queue_depth, config.chunk_size)
}

/// `config` with this queue depth and chunk size, the staging pool grown to hold at least
/// two chunks; validated.
fn with_settings(config: &Config, queue_depth: u32, chunk_size: u64) -> Result<Config> {
    let mut c = config.clone();
    c.queue_depth = queue_depth;
    c.chunk_size = chunk_size;
    if c.staging_pool_size < 2 * chunk_size {
        c.staging_pool_size = 2 * chunk_size;
    }
    c.validate()?;
    Ok(c)
}

fn single<T: Copy>(values: Vec<T>, flag: &str) -> Result<T> {
    match values[..] {
        [v] => Ok(v),
        _ => Err(CliError::msg(format!("{flag} takes one value here (lists are for bench and tune)"))),
    }
}

/// Parses a comma-separated list with `parse`; empty items are refused.
fn parse_list<T>(list: &str, flag: &str, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    let values: Vec<T> = list
        .split(',')
        .map(|item| {
            let item = item.trim();
            if item.is_empty() {
                Err(CliError::msg(format!("{flag} {list:?}: empty item")))
            } else {
                parse(item).map_err(|e| CliError::msg(format!("{flag}: {e}")))
            }
        })
        .collect::<Result<_>>()?;
    Ok(values)
}

fn parse_queue_depth(s: &str) -> Result<u32> {
    s.parse::<u32>().map_err(|e| CliError::msg(format!("queue depth {s:?} is not a positive integer: {e}")))
}

/// Parses a size such as `512MiB`, with a message naming what was wrong.
fn parse_size_arg(s: &str) -> Result<u64> {
    parse_size(s).map_err(|e| CliError::msg(e.to_string().replace("invalid configuration: ", "")))
}

/// Checks that `path` exists and is a directory or a file (a checkpoint of ours, a
/// safetensors directory or Hugging Face index, or one `.safetensors` file).
fn existing_checkpoint_path(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() || m.is_file() => Ok(()),
        Ok(_) => Err(CliError::msg(format!("{} is neither a directory nor a regular file", path.display()))),
        Err(e) => Err(CliError::msg(format!("cannot open {}: {e}", path.display()))),
    }
}

/// Checks that `dir` exists and is a directory (for subcommands that read one).
fn existing_dir(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(CliError::msg(format!("{} is not a directory", dir.display()))),
        Err(e) => Err(CliError::msg(format!("cannot open directory {}: {e}", dir.display()))),
    }
}

/// MiB with one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A progress bar on stderr when stderr is a terminal, else a hidden one.
fn progress_bar(len: u64, template: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// One line per engine fallback, for summaries.
fn engine_line(report: &uring_ckpt::io::EngineReport) -> String {
    let mut parts = vec![format!("{} (requested {})", report.engine, report.requested)];
    parts.push(if report.direct_io { "O_DIRECT".into() } else { "page cache".into() });
    if report.registered_buffers {
        parts.push("registered buffers".into());
    }
    if report.offload_writes {
        parts.push("writes handed to io-wq (btrfs)".into());
    }
    parts.push(match report.engine {
        EngineKind::Pwrite => format!("{} threads", report.queue_depth),
        EngineKind::Buffered => "synchronous".into(),
        _ => format!("queue depth {}", report.queue_depth),
    });
    parts.join(", ")
}

fn print_fallbacks(report: &uring_ckpt::io::EngineReport) {
    for f in &report.fallbacks {
        println!("  fallback     {} refused, using {}: {}", f.what, f.instead, f.reason);
    }
}

fn latency_line(l: &uring_ckpt::io::stats::LatencySummary, ops: Option<u64>) -> String {
    let ops = ops.map(|n| format!(" ({n} ops)")).unwrap_or_default();
    format!("p50 {} us, p99 {} us, p99.9 {} us, max {} us{ops}", l.p50_us, l.p99_us, l.p999_us, l.max_us)
}
