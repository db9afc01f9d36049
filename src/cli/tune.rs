//! `uring-ckpt tune`: sweep queue depth x chunk size on the user's disk, keep the fastest.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use uring_ckpt::config::{format_size, EngineKind};
use uring_ckpt::format::Dtype;
use uring_ckpt::synthetic::{Layout, SyntheticCheckpoint};

use super::bench::{measure, sweep, Machine, Phase, Row, Workspace, HEADER, RIGHT};
use super::inspect::print_table;
use super::{
    base_config, mib, parse_size_arg, progress_bar, CliError, Context, GlobalOpts, Result, LOCAL_CONFIG,
};

const DEFAULT_DEPTHS: &str = "4,8,16,32,64";
const DEFAULT_CHUNKS: &str = "1MiB,2MiB,4MiB,8MiB,16MiB";

/// Arguments of `tune`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Sweeps --queue-depth (default 4,8,16,32,64) x --chunk-size (default \
1MiB,2MiB,4MiB,8MiB,16MiB), saving a synthetic checkpoint with the uring engine (or --engine).")]
pub struct TuneArgs {
    /// Directory on the file system to tune for (a scratch directory is made inside it).
    dir: PathBuf,
    /// Size of the synthetic checkpoint saved at each setting.
    #[arg(long, default_value = "1GiB", value_name = "SIZE")]
    size: String,
    /// Saves per setting (the median counts).
    #[arg(long, default_value_t = 2, value_name = "N")]
    repeat: u32,
    /// Where to write the best configuration.
    #[arg(long, default_value = LOCAL_CONFIG, value_name = "FILE")]
    output: PathBuf,
    /// Overwrite --output if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(global: &GlobalOpts, args: TuneArgs) -> Result<()> {
    let size = parse_size_arg(&args.size).map_err(|e| CliError::msg(format!("--size: {e}")))?;
    if args.repeat == 0 {
        return Err(CliError::msg("--repeat must be at least 1"));
    }
    super::existing_dir(&args.dir)?;
    refuse_overwrite(&args.output, args.force)?;
    let base = base_config(global)?;
    let engine = match global.engine.map(|e| e.kind()) {
        None | Some(Some(EngineKind::Auto)) => EngineKind::Uring,
        Some(Some(kind)) => kind,
        Some(None) => return Err(CliError::msg("tune takes one engine, not --engine all")),
    };
    let sweep_opts = super::GlobalOpts {
        config: None,
        engine: None,
        queue_depth: Some(global.queue_depth.clone().unwrap_or_else(|| DEFAULT_DEPTHS.to_owned())),
        chunk_size: Some(global.chunk_size.clone().unwrap_or_else(|| DEFAULT_CHUNKS.to_owned())),
    };
    let settings = sweep(&base, &[engine], &sweep_opts)?;
    super::save::check_memory(size)?;

    let machine = Machine::probe(&args.dir);
    let workspace = Workspace::create(Some(&args.dir), "tune", false)?;
    let synth = SyntheticCheckpoint::generate(Layout::Mixed, size, 0, Dtype::BF16)?;
    let ckpt = synth.checkpoint();
    eprintln!(
        "tuning {engine} on {}: {} settings x {} saves of {}",
        args.dir.display(),
        settings.len(),
        args.repeat,
        mib(synth.data_bytes())
    );
    let bar =
        progress_bar((settings.len() as u64) * u64::from(args.repeat), "tune [{bar:30}] {pos}/{len} {msg}");
    let mut rows = Vec::new();
    for setting in &settings {
        bar.set_message(format!(
            "qd {} chunk {}",
            setting.config.queue_depth,
            format_size(setting.config.chunk_size)
        ));
        let saves =
            measure(setting, &ckpt, &workspace, &[Phase::Save], args.repeat, false, || bar.inc(1))?.saves;
        rows.push((Row::new(setting, Phase::Save, saves), setting.config.clone()));
    }
    bar.finish_and_clear();
    drop(workspace);

    rows.sort_by(|a, b| b.0.mib_s_median.total_cmp(&a.0.mib_s_median));
    println!("{}", machine.describe());
    println!(
        "save of a {} mixed checkpoint, {} run(s) per setting, sorted by median MiB/s:",
        mib(synth.data_bytes()),
        args.repeat
    );
    println!();
    let cells: Vec<[String; 12]> = rows.iter().map(|(r, _)| r.cells()).collect();
    print_table(&HEADER, &cells, &RIGHT);
    let Some((best_row, best)) = rows.first() else {
        return Err(CliError::msg("nothing was measured"));
    };
    let mut chosen = base.clone();
    chosen.queue_depth = best.queue_depth;
    chosen.chunk_size = best.chunk_size;
    chosen.staging_pool_size = best.staging_pool_size.max(2 * best.chunk_size);
    if global.engine.is_some() {
        chosen.engine = engine;
    }
    chosen.validate()?;
    println!();
    println!(
        "best: queue_depth = {}, chunk_size = {} ({:.0} MiB/s)",
        chosen.queue_depth,
        format_size(chosen.chunk_size),
        best_row.mib_s_median
    );
    write_config(&args.output, &chosen.to_toml_string(), args.force)?;
    println!("wrote {}", args.output.display());
    println!("{}", pickup_hint(&args.output));
    Ok(())
}

fn refuse_overwrite(path: &Path, force: bool) -> Result<()> {
    if path.exists() && !force {
        return Err(CliError::msg(format!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        )));
    }
    Ok(())
}

fn write_config(path: &Path, text: &str, force: bool) -> Result<()> {
    refuse_overwrite(path, force)?;
    let mut options = OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).context(|| format!("create {}", path.display()))?;
    file.write_all(text.as_bytes()).context(|| format!("write {}", path.display()))?;
    file.sync_all().context(|| format!("fsync {}", path.display()))
}

/// How the written file will be found.
fn pickup_hint(path: &Path) -> String {
    let shown = path.display();
    let is_local = path.file_name().is_some_and(|n| n == LOCAL_CONFIG)
        && path.parent().is_none_or(|p| p.as_os_str().is_empty() || p == Path::new("."));
    if is_local {
        format!(
            "uring-ckpt reads ./{LOCAL_CONFIG} by itself when run from this directory; elsewhere, and in \
             programs, set URING_CKPT_CONFIG={shown} (read by Config::load) or pass --config {shown}."
        )
    } else {
        format!(
            "to use it, set URING_CKPT_CONFIG={shown} (read by Config::load and by uring-ckpt) or pass \
             --config {shown}."
        )
    }
}
