//! `uring-ckpt load`: read a checkpoint (ours, a safetensors file or directory, a Hugging
//! Face index) and report how the reads went.

use std::path::PathBuf;

use uring_ckpt::{CheckpointIO, LoadOptions, UringCheckpointIO};

use super::{
    engine_line, existing_checkpoint_path, latency_line, mib, print_fallbacks, single_config, GlobalOpts,
    Result,
};

/// Arguments of `load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Checkpoint directory, directory of *.safetensors files (with or without a Hugging
    /// Face model.safetensors.index.json), or one .safetensors file.
    dir: PathBuf,
    /// Load only these tensors (comma-separated names).
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    names: Option<Vec<String>>,
    /// Skip the CRC-32 check of each tensor.
    #[arg(long)]
    no_verify: bool,
    /// Print the load report as JSON instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn run(global: &GlobalOpts, args: LoadArgs) -> Result<()> {
    existing_checkpoint_path(&args.dir)?;
    let io = UringCheckpointIO::new(single_config(global)?)?;
    // What it is, for the summary (reads a manifest or index at most, no shard).
    let (kind, shards) = uring_ckpt::store::identify(&args.dir)?;
    let options = LoadOptions { names: args.names, verify: args.no_verify.then_some(false) };
    let loaded = io.load_checkpoint(&args.dir, &options)?;
    let r = &loaded.report;
    if args.json {
        let json = serde_json::to_string_pretty(r)
            .map_err(|e| super::CliError::msg(format!("cannot encode the report as JSON: {e}")))?;
        println!("{json}");
        return Ok(());
    }
    println!("loaded {}", args.dir.display());
    println!("  kind         {}", kind.describe(shards));
    println!("  tensors      {}", loaded.tensors.len());
    println!("  bytes        {} tensor bytes, {} read ({})", r.data_bytes, r.read_bytes, mib(r.read_bytes));
    println!("  time         {:.3} s", r.seconds);
    println!("  throughput   {:.1} MiB/s", r.throughput_mib_s);
    let verified = match (r.verified, kind) {
        (false, _) => "no",
        (true, uring_ckpt::store::CheckpointKind::UringCkpt) => "every tensor's CRC-32",
        (true, _) => "every stored CRC-32 (files not written by uring-ckpt store none; their structure and sizes are checked)",
    };
    println!("  verified     {verified}");
    println!("  engine       {}", engine_line(&r.engine));
    print_fallbacks(&r.engine);
    println!("  read lat.    {}", latency_line(&r.read_latency, None));
    Ok(())
}
