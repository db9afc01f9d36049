//! `uring-ckpt save`: generate a synthetic checkpoint and save it.

use std::path::PathBuf;
use std::time::Instant;

use uring_ckpt::synthetic::{Layout, SyntheticCheckpoint};
use uring_ckpt::{CheckpointIO, SaveReport, UringCheckpointIO};

use super::{
    engine_line, latency_line, mib, parse_size_arg, print_fallbacks, single_config, CliError, DtypeArg,
    GlobalOpts, Result,
};

/// Arguments of `save`.
#[derive(Debug, clap::Args)]
pub struct SaveArgs {
    /// Generate a deterministic synthetic checkpoint of about this size (e.g. 1GiB).
    #[arg(long, value_name = "SIZE")]
    synthetic: String,
    /// Tensor layout of the synthetic checkpoint.
    #[arg(long, default_value = "mixed", value_name = "mixed|gpt2|llama")]
    layout: Layout,
    /// Element type.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DtypeArg,
    /// Seed of the pseudo-random tensor contents.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint directory to create.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Replace an existing checkpoint at --out (atomically).
    #[arg(long)]
    replace: bool,
    /// Print the save report as JSON instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn run(global: &GlobalOpts, args: SaveArgs) -> Result<()> {
    let size = parse_size_arg(&args.synthetic).map_err(|e| CliError::msg(format!("--synthetic: {e}")))?;
    let mut config = single_config(global)?;
    config.replace_existing = args.replace;
    if args.out.exists() && !args.replace {
        return Err(CliError::msg(format!(
            "{} already exists; pass --replace to replace it atomically",
            args.out.display()
        )));
    }
    check_memory(size)?;
    let started = Instant::now();
    let synth = SyntheticCheckpoint::generate(args.layout, size, args.seed, args.dtype.dtype())?;
    eprintln!(
        "generated {} layout: {} tensors, {} bytes ({}; asked for {}) in {:.2}s",
        args.layout,
        synth.tensor_count(),
        synth.data_bytes(),
        mib(synth.data_bytes()),
        mib(size),
        started.elapsed().as_secs_f64()
    );
    let io = UringCheckpointIO::new(config)?;
    let report = io.save_checkpoint(&synth.checkpoint(), &args.out)?;
    if args.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::msg(format!("cannot encode the report as JSON: {e}")))?;
        println!("{json}");
    } else {
        print_summary(&report);
    }
    Ok(())
}

fn print_summary(r: &SaveReport) {
    println!("saved {}", r.path.display());
    println!("  tensors      {} in {} shard(s)", r.tensors, r.shards);
    println!("  bytes        {} data, {} in files ({})", r.data_bytes, r.file_bytes, mib(r.file_bytes));
    println!("  time         {:.3} s to durable (commit {:.3} s)", r.seconds, r.commit_seconds);
    println!("  throughput   {:.1} MiB/s", r.throughput_mib_s);
    println!("  engine       {}", engine_line(&r.engine));
    print_fallbacks(&r.engine);
    println!(
        "  zero-copy    {} written from tensor memory, {} staged",
        mib(r.zero_copy_bytes),
        mib(r.staged_bytes)
    );
    println!("  write lat.   {}", latency_line(&r.write_latency, Some(r.writes)));
}

/// Refuses a synthetic checkpoint larger than 90% of the memory available now (it is held
/// in memory while it is saved).
pub(super) fn check_memory(size: u64) -> Result<()> {
    if let Some(available) = mem_available() {
        if size > available / 10 * 9 {
            return Err(CliError::msg(format!(
                "a synthetic checkpoint of {} needs that much memory, but only {} is available",
                mib(size),
                mib(available)
            )));
        }
    }
    Ok(())
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
