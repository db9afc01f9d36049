//! Safetensors index parser (`model.safetensors.index.json`): any bytes. It must never
//! panic, and every file name it accepts must be a plain `*.safetensors` name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uring_ckpt::format::{check_shard_name, parse_index};

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = parse_index(data) {
        assert!(!index.weight_map.is_empty());
        for file in index.files() {
            assert!(check_shard_name(file).is_ok(), "{file:?}");
            assert!(!file.contains('/') && !file.starts_with('.'));
        }
        assert!(index.weight_map.keys().all(|t| !t.is_empty()));
    }
});
