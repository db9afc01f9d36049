//! Shard header parser: any bytes, any claimed file length. It must never panic, and what it
//! accepts must describe a file of exactly that length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uring_ckpt::format::parse_header;

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose how much longer than the prefix the file claims to be.
    let (extra, prefix) = data.split_at(data.len().min(2));
    let extra = extra.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b));
    let file_len = prefix.len() as u64 + extra;
    if let Ok(header) = parse_header(prefix, file_len) {
        assert_eq!(header.data_start + header.data_len, file_len);
        assert_eq!(header.tensors.len(), header.crcs.len());
        let mut end = 0;
        for t in &header.tensors {
            assert_eq!(t.data_offsets.0, end, "contiguous");
            end = t.data_offsets.1;
        }
        assert_eq!(end, header.data_len);
    }
});
