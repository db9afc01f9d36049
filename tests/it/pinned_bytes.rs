//! The bytes of a checkpoint are pinned: three deterministic synthetic checkpoints, saved on
//! every engine, must give exactly these files (CRC-32 and length of each), as written by the
//! code before the redesign (`uring-ckpt save --synthetic ...` at commit 5529683), then
//! re-pinned once on purpose when every shard header gained `"format": "pt"` and a save
//! gained `model.safetensors.index.json` (branch `dcp`; the shard lengths did not change).
//! A change that alters the format, the header padding, the manifest's JSON or the sharding
//! shows up here.

use crate::common;

use common::{scratch, small_config, ENGINES};
use uring_ckpt::format::Dtype;
use uring_ckpt::synthetic::{Layout, SyntheticCheckpoint};
use uring_ckpt::{CheckpointIO, UringCheckpointIO};

struct Pinned {
    layout: Layout,
    size: u64,
    seed: u64,
    dtype: Dtype,
    max_shard_size: Option<u64>,
    files: &'static [(&'static str, u64, u32)],
}

const PINNED: [Pinned; 3] = [
    Pinned {
        layout: Layout::Mixed,
        size: 3 << 20,
        seed: 7,
        dtype: Dtype::BF16,
        max_shard_size: None,
        files: &[
            ("manifest.json", 1463, 0x22b2899e),
            ("model.safetensors.index.json", 974, 0x19ab6878),
            ("shard-r00000-00000.safetensors", 3149824, 0x0cc82221),
        ],
    },
    Pinned {
        layout: Layout::Llama,
        size: 2 << 20,
        seed: 11,
        dtype: Dtype::F32,
        max_shard_size: None,
        files: &[
            ("manifest.json", 30382, 0x52392106),
            ("model.safetensors.index.json", 29889, 0x94520721),
            ("shard-r00000-00000.safetensors", 2161792, 0x9e428f3b),
        ],
    },
    Pinned {
        layout: Layout::Gpt2,
        size: 3 << 20,
        seed: 5,
        dtype: Dtype::BF16,
        max_shard_size: Some(1 << 20),
        files: &[
            ("manifest.json", 23983, 0xc4a0b4e2),
            ("model.safetensors.index.json", 22984, 0x14a647b8),
            ("shard-r00000-00000.safetensors", 1059328, 0x3459712a),
            ("shard-r00000-00001.safetensors", 1053696, 0x9e37f882),
            ("shard-r00000-00002.safetensors", 1053440, 0xf5d49ec7),
            ("shard-r00000-00003.safetensors", 37248, 0x15122f39),
        ],
    },
];

#[test]
fn checkpoint_bytes_are_pinned_on_every_engine() {
    let dir = scratch();
    for (i, pinned) in PINNED.iter().enumerate() {
        let synth = SyntheticCheckpoint::generate(pinned.layout, pinned.size, pinned.seed, pinned.dtype)
            .expect("generate");
        for engine in ENGINES {
            let mut config = small_config(engine);
            if let Some(max) = pinned.max_shard_size {
                config.max_shard_size = max;
            }
            let path = dir.path().join(format!("{i}-{engine}"));
            UringCheckpointIO::new(config)
                .expect("config")
                .save_checkpoint(&synth.checkpoint(), &path)
                .expect("save");
            let actual: Vec<(String, u64, u32)> = common::files_of(&path)
                .into_iter()
                .map(|(name, bytes)| (name, bytes.len() as u64, crc32fast::hash(&bytes)))
                .collect();
            let expected: Vec<(String, u64, u32)> =
                pinned.files.iter().map(|&(n, len, crc)| (n.to_owned(), len, crc)).collect();
            assert_eq!(actual, expected, "{:?} seed {} on {engine}", pinned.layout, pinned.seed);
        }
    }
}
