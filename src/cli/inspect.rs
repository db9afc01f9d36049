//! `uring-ckpt inspect`: tensors, shards and metadata of a checkpoint (ours, a safetensors
//! file or directory, a Hugging Face index).

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{existing_checkpoint_path, mib, single_config, CliError, GlobalOpts, Result};

/// Arguments of `inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Checkpoint directory, directory of *.safetensors files (with or without a Hugging
    /// Face model.safetensors.index.json), or one .safetensors file.
    dir: PathBuf,
    /// Print everything as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(global: &GlobalOpts, args: InspectArgs) -> Result<()> {
    existing_checkpoint_path(&args.dir)?;
    let config = single_config(global)?;
    let info = uring_ckpt::inspect::inspect(&config, &args.dir)?;
    let kind = info.kind.describe(info.manifest.shards.len());
    if args.json {
        let json = serde_json::to_string_pretty(&info)
            .map_err(|e| CliError::msg(format!("cannot encode as JSON: {e}")))?;
        println!("{json}");
        return Ok(());
    }
    let rows: Vec<[String; 5]> = info
        .tensors
        .iter()
        .map(|t| {
            let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
            [
                t.name.clone(),
                t.dtype.to_string(),
                format!("[{}]", shape.join(", ")),
                t.bytes.to_string(),
                t.shard.clone(),
            ]
        })
        .collect();
    print_table(&["name", "dtype", "shape", "bytes", "shard"], &rows, &[false, false, false, true, false]);
    println!();
    let mut per_shard: BTreeMap<&str, u64> = BTreeMap::new();
    for t in &info.tensors {
        *per_shard.entry(t.shard.as_str()).or_default() += 1;
    }
    let rows: Vec<[String; 4]> = info
        .manifest
        .shards
        .iter()
        .map(|s| [s.file.clone(), s.size.to_string(), mib(s.size), s.tensor_count.to_string()])
        .collect();
    print_table(&["shard", "bytes", "size", "tensors"], &rows, &[false, true, true, true]);
    let file_bytes: u64 = info.manifest.shards.iter().map(|s| s.size).sum();
    let data_bytes: u64 = info.tensors.iter().map(|t| t.bytes).sum();
    println!();
    println!("kind: {kind}");
    println!(
        "total: {} tensors, {} data bytes ({}), {} shard(s) of {} bytes ({})",
        info.tensors.len(),
        data_bytes,
        mib(data_bytes),
        info.manifest.shards.len(),
        file_bytes,
        mib(file_bytes)
    );
    if info.manifest.metadata.is_empty() {
        println!("metadata: none");
    } else {
        println!("metadata:");
        for (k, v) in &info.manifest.metadata {
            println!("  {k} = {v}");
        }
    }
    Ok(())
}

/// Prints rows under a header, columns padded to their widest cell; `right` aligns numbers.
pub(super) fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]], right: &[bool; N]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> =
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if right[i] {
                        format!("{c:>w$}", w = widths[i])
                    } else {
                        format!("{c:<w$}", w = widths[i])
                    }
                })
                .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    line(widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().iter().map(String::as_str).collect());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
