//! Loading checks every CRC while reading: tensors spanning the read segments (1 MiB with
//! the tests' 64 KiB chunks; 64 MiB with the default 8 MiB chunks) load
//! intact, and a flipped byte anywhere is reported with the tensor's and the file's name,
//! by `load_checkpoint` and by `inspect::verify`.

use crate::common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::{bytes, scratch, small_config, ENGINES};
use uring_ckpt::format::Dtype;
use uring_ckpt::{inspect, Checkpoint, CheckpointIO, Error, LoadOptions, UringCheckpointIO};

const MIB: usize = 1 << 20;

#[test]
fn tensors_across_read_segments_load_and_corruption_names_the_tensor() {
    let dir = scratch();
    let tensors =
        [("a", bytes(1, 3 * MIB + 5)), ("b", bytes(2, 1)), ("c", bytes(3, 3 * MIB - 3)), ("d", vec![])];
    let mut ck = Checkpoint::new();
    for (name, data) in &tensors {
        ck.add(*name, Dtype::U8, &[data.len() as u64], data).expect("tensor");
    }
    for engine in ENGINES {
        let config = small_config(engine);
        let io = UringCheckpointIO::new(config.clone()).expect("config");
        let path = dir.path().join(engine.as_str());
        io.save_checkpoint(&ck, &path).expect("save");
        let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
        for (name, data) in &tensors {
            assert!(loaded.get(name).expect("tensor").data[..] == data[..], "{engine}: {name}");
        }
        let report = inspect::verify(&config, &path, |_, _| {}).expect("verify");
        assert_eq!(report.tensors, 4);

        let shard = fs::read_dir(&path)
            .expect("list")
            .map(|e| e.expect("entry").path())
            .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .expect("a shard");
        let header_len = {
            let mut first8 = [0u8; 8];
            fs::File::open(&shard).expect("open").read_exact_at(&mut first8, 0).expect("read");
            8 + u64::from_le_bytes(first8)
        };
        // Byte 2 MiB of the file (a segment boundary) falls inside "a"; "c" starts after a, b.
        for (offset, tensor) in [(2 * MIB as u64, "a"), (header_len + (3 * MIB + 6 + 2 * MIB) as u64, "c")] {
            let file = fs::OpenOptions::new().read(true).write(true).open(&shard).expect("open");
            let mut byte = [0u8; 1];
            file.read_exact_at(&mut byte, offset).expect("read");
            file.write_all_at(&[byte[0] ^ 0x40], offset).expect("flip");
            drop(file);
            let err = io.load_checkpoint(&path, &LoadOptions::default()).expect_err("corrupt load");
            match &err {
                Error::Crc { tensor: t, path: p, .. } => {
                    assert_eq!(t, tensor, "{engine}: {err}");
                    assert_eq!(p, &shard, "{engine}: {err}");
                }
                other => panic!("{engine}: expected a CRC error, got {other}"),
            }
            assert!(err.to_string().contains(tensor), "{err}");
            let err = inspect::verify(&config, &path, |_, _| {}).expect_err("corrupt verify");
            assert!(matches!(&err, Error::Crc { tensor: t, .. } if t == tensor), "{err}");
            let skip = LoadOptions { verify: Some(false), ..Default::default() };
            io.load_checkpoint(&path, &skip).expect("without verification the load goes through");
            // Restore for the next case.
            let file = fs::OpenOptions::new().write(true).open(&shard).expect("open");
            file.write_all_at(&byte, offset).expect("restore");
        }
    }
}

/// A fresh load large enough to be faulted in ahead (at least 32 MiB past the first segment,
/// with the default 8 MiB chunks) picks each step's page size itself and says which it used;
/// the tensors are byte-identical whichever it picked, on every engine.
#[test]
fn a_large_fresh_load_reports_the_page_sizes_it_faulted_in_with() {
    let dir = scratch();
    let data = bytes(9, 112 * MIB + 4099);
    let mut ck = Checkpoint::new();
    ck.add("w", Dtype::U8, &[data.len() as u64], &data).expect("tensor");
    for engine in ENGINES {
        let config = uring_ckpt::Config { engine, ..uring_ckpt::Config::default() };
        let io = UringCheckpointIO::new(config).expect("config");
        let path = dir.path().join(engine.as_str());
        io.save_checkpoint(&ck, &path).expect("save");
        let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
        assert!(loaded.get("w").expect("tensor").data[..] == data[..], "{engine}");
        let pages = loaded.report.fresh_pages;
        let faulted = pages.huge_bytes + pages.small_bytes;
        if faulted == 0 {
            eprintln!("{engine}: skipped the page-size check: MADV_POPULATE_WRITE refused (Linux < 5.14)");
            continue;
        }
        // The whole shard: the first read (header and first 64 MiB segment) and the rest.
        assert!(faulted >= 40 * MIB as u64, "{engine}: {pages:?}");
        assert!(pages.huge_bytes > 0 && pages.small_bytes > 0, "{engine}: both sizes measured: {pages:?}");
    }
}
