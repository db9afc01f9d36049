//! `uring-ckpt verify`: structure and every tensor's CRC-32.

use std::path::PathBuf;

use super::{existing_dir, progress_bar, single_config, GlobalOpts, Result};

/// Arguments of `verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Checkpoint directory.
    dir: PathBuf,
}

pub fn run(global: &GlobalOpts, args: VerifyArgs) -> Result<()> {
    existing_dir(&args.dir)?;
    let config = single_config(global)?;
    let bar = progress_bar(0, "verify [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}");
    let result = uring_ckpt::inspect::verify(&config, &args.dir, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let report = result?;
    let without = if report.tensors_without_crc > 0 {
        format!(" ({} more without a stored CRC)", report.tensors_without_crc)
    } else {
        String::new()
    };
    println!(
        "ok: {} tensors in {} shards{without}, {:.0} MiB/s",
        report.tensors, report.shards, report.throughput_mib_s
    );
    Ok(())
}
