//! Manifest parser: any bytes. It must never panic, and what it accepts must survive a
//! round trip through `to_json` unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uring_ckpt::format::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::parse(data) {
        let again = Manifest::parse(&manifest.to_json()).expect("a parsed manifest re-parses");
        assert_eq!(again, manifest);
        for shard in &manifest.shards {
            assert!(!shard.file.contains('/') && !shard.file.starts_with('.'));
            assert!(shard.header_len <= shard.size);
        }
    }
});
