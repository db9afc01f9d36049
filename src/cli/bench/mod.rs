//! `uring-ckpt bench`: save and load a synthetic checkpoint on each engine and setting,
//! side by side, in a scratch directory that is removed afterwards.
//!
//! This module parses the arguments and runs the sweep; `measure` runs the phases, `output`
//! prints the table and notes (and `--json`), `machine` and `storage` describe where the
//! benchmark runs, `scratch` owns the scratch directory and Ctrl-C, and `resources` reads
//! CPU time and peak RSS and drops the page cache. `tune` reuses the sweep, the measurement,
//! the table and the scratch directory.

mod machine;
mod measure;
mod output;
mod resources;
mod scratch;
mod storage;

use std::path::{Path, PathBuf};
use std::time::Instant;

use uring_ckpt::config::{format_size, Config, EngineKind};
use uring_ckpt::synthetic::{Layout, SyntheticCheckpoint};

pub(super) use self::machine::Machine;
pub(super) use self::measure::{measure, Phase};
pub(super) use self::output::{Row, HEADER, RIGHT};
pub(super) use self::scratch::Workspace;

use self::measure::{measure_async, Setting};
use self::output::{command_line, print_notes, write_json, BenchJson};
use super::inspect::print_table;
use super::{
    base_config, mib, parse_list, parse_queue_depth, parse_size_arg, progress_bar, with_settings, CliError,
    DtypeArg, EngineArg, GlobalOpts, Result,
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
    /// Phases to measure: save, load (into memory the load allocates), load-into (in place
    /// into host memory allocated and touched before the runs, through the staging pool; a
    /// load always needs a save first), and the async saves `snapshot` and `stream` (for
    /// those rows `s` is the caller's stall until the tensors may change again, and MiB/s is
    /// to durable).
    #[arg(long, default_value = "save,load,load-into", value_name = "save,load,load-into,snapshot,stream")]
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
        let measured = measure(setting, &ckpt, &workspace, &phases, args.repeat, args.keep, || bar.inc(1))?;
        rss_per_run &= measured.rss_reset;
        if phases.contains(&Phase::Save) {
            rows.push(Row::new(setting, Phase::Save, measured.saves));
        }
        if phases.contains(&Phase::Load) {
            rows.push(Row::new(setting, Phase::Load, measured.loads));
        }
        if phases.contains(&Phase::LoadInto) {
            rows.push(Row::new(setting, Phase::LoadInto, measured.loads_into));
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

fn parse_phases(s: &str) -> Result<Vec<Phase>> {
    let phases = parse_list(s, "--phases", |p| match p.to_ascii_lowercase().as_str() {
        "save" => Ok(Phase::Save),
        "load" => Ok(Phase::Load),
        "load-into" | "into" => Ok(Phase::LoadInto),
        "snapshot" | "async-snapshot" => Ok(Phase::Snapshot),
        "stream" | "async-stream" => Ok(Phase::Stream),
        _ => Err(CliError::msg(format!(
            "unknown phase {p:?}; expected save, load, load-into, snapshot or stream"
        ))),
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
pub(in crate::cli) fn sweep(
    base: &Config,
    engines: &[EngineKind],
    global: &GlobalOpts,
) -> Result<Vec<Setting>> {
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
