//! How a checkpoint is cut into shards, what each shard is called, and how the staging pool
//! is shared among the shard writers.

use crate::checkpoint::{Checkpoint, TensorView};
use crate::config::Config;

/// Splits tensors into shards of at most `max_shard_size` bytes (a larger tensor gets a
/// shard of its own), keeping their order.
pub(super) fn plan_shards<'c, 'a>(
    config: &Config,
    checkpoint: &'c Checkpoint<'a>,
) -> Vec<Vec<&'c TensorView<'a>>> {
    let mut shards: Vec<Vec<&TensorView>> = Vec::new();
    let mut current: Vec<&TensorView> = Vec::new();
    let mut size = 0u64;
    for tensor in &checkpoint.tensors {
        let len = tensor.data.len() as u64;
        if !current.is_empty() && size + len > config.max_shard_size {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(tensor);
        size += len;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// Each of `workers` writers gets an equal part of the staging pool (at least two chunks).
pub(super) fn worker_config(config: &Config, workers: usize) -> Config {
    let mut per = config.clone();
    let share = (config.staging_pool_size / workers.max(1) as u64).max(2 * config.chunk_size);
    per.staging_pool_size = share - share % config.chunk_size;
    per
}

/// `shard-r00000-00001.safetensors`: rank, then index within the rank.
pub(super) fn shard_file_name(rank: u32, index: usize) -> String {
    format!("shard-r{rank:05}-{index:05}.safetensors")
}
