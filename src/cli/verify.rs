//! `uring-ckpt verify`: structure and every tensor's CRC-32 (of a checkpoint of any kind;
//! tensors of foreign files have no CRC, their structure and sizes are checked).

use std::path::PathBuf;

use super::{existing_checkpoint_path, progress_bar, single_config, GlobalOpts, Result};

/// Arguments of `verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Checkpoint directory, directory of *.safetensors files (with or without a Hugging
    /// Face model.safetensors.index.json), or one .safetensors file.
    dir: PathBuf,
}

pub fn run(global: &GlobalOpts, args: VerifyArgs) -> Result<()> {
    existing_checkpoint_path(&args.dir)?;
    let config = single_config(global)?;
    let bar = progress_bar(0, "verify [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}");
    let result = uring_ckpt::inspect::verify(&config, &args.dir, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let report = result?;
    let without = if report.tensors_without_crc > 0 {
        format!(" ({} more without a stored CRC: structure and sizes checked)", report.tensors_without_crc)
    } else {
        String::new()
    };
    println!(
        "ok: {} tensors in {} shards{without}, {:.0} MiB/s; {}",
        report.tensors,
        report.shards,
        report.throughput_mib_s,
        report.kind.describe(report.shards)
    );
    Ok(())
}
