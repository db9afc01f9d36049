//! Mapped loads (`LoadOptions::map`): the same tensors as a load by reads, from several
//! shards, with empty and odd-sized tensors and tensors spanning the workers' 4 MiB pieces;
//! subsets; a flipped byte named by tensor and file; a shard shorter than the manifest says
//! refused before anything is mapped; a safetensors file written by others.

use crate::common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::{bytes, scratch, small_config};
use uring_ckpt::config::EngineKind;
use uring_ckpt::format::Dtype;
use uring_ckpt::{Checkpoint, CheckpointIO, Config, Error, LoadOptions, LoadedCheckpoint, UringCheckpointIO};

const MIB: usize = 1 << 20;

fn mapped() -> LoadOptions {
    LoadOptions { map: true, ..LoadOptions::default() }
}

/// Shards of at most 8 MiB: the 9 MiB tensor gets one of its own.
fn config() -> Config {
    Config { max_shard_size: (8 * MIB) as u64, ..small_config(EngineKind::Uring) }
}

fn same_tensors(a: &LoadedCheckpoint, b: &LoadedCheckpoint) {
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!((&x.name, x.dtype, &x.shape), (&y.name, y.dtype, &y.shape));
        assert!(x.data[..] == y.data[..], "{}", x.name);
    }
}

fn shards(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = fs::read_dir(path)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("shard-")))
        .collect();
    out.sort();
    out
}

#[test]
fn a_mapped_load_equals_a_load_by_reads_and_names_a_flipped_byte() {
    let dir = scratch();
    let tensors = [
        ("big", bytes(1, 9 * MIB + 3)),
        ("odd", bytes(2, 4 * MIB + 1)),
        ("empty", vec![]),
        ("one", bytes(3, 1)),
        ("mid", bytes(4, 3 * MIB - 7)),
    ];
    let mut ck = Checkpoint::new();
    for (name, data) in &tensors {
        ck.add(*name, Dtype::U8, &[data.len() as u64], data).expect("tensor");
    }
    let f32s = bytes(5, 60);
    ck.add("f32", Dtype::F32, &[3, 5], &f32s).expect("tensor");
    let io = UringCheckpointIO::new(config()).expect("config");
    let path = dir.path().join("ck");
    io.save_checkpoint(&ck, &path).expect("save");
    assert!(shards(&path).len() >= 2, "the test wants several shards");

    let read = io.load_checkpoint(&path, &LoadOptions::default()).expect("load by reads");
    let map = io.load_checkpoint(&path, &mapped()).expect("mapped load");
    same_tensors(&read, &map);
    assert!(map.report.mapped && !read.report.mapped);
    assert!(map.report.verified);
    assert_eq!(map.report.engine.engine, EngineKind::Buffered);
    assert_eq!(map.report.data_bytes, read.report.data_bytes);
    for (name, data) in &tensors {
        assert!(map.get(name).expect("tensor").data[..] == data[..], "{name}");
    }

    // A subset: only its tensors, the same bytes.
    let names = vec!["odd".to_owned(), "empty".to_owned()];
    let subset = io
        .load_checkpoint(&path, &LoadOptions { names: Some(names), map: true, ..LoadOptions::default() })
        .expect("mapped subset");
    assert_eq!(subset.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["odd", "empty"]);
    assert!(subset.get("odd").expect("odd").data[..] == tensors[1].1[..]);
    let unknown = LoadOptions { names: Some(vec!["nope".into()]), map: true, ..LoadOptions::default() };
    let err = io.load_checkpoint(&path, &unknown).expect_err("unknown name");
    assert!(matches!(err, Error::TensorNotFound(ref n) if n == "nope"), "{err}");

    // A flipped byte 5 MiB into "big" (in its second piece) is named by tensor and file;
    // unverified, the mapped load hands the flipped byte out.
    let shard = shards(&path)
        .into_iter()
        .find(|s| fs::metadata(s).expect("stat").len() > 9 * MIB as u64)
        .expect("the shard of big, a shard of its own");
    let offset = fs::metadata(&shard).expect("stat").len() - 4 * MIB as u64;
    let file = fs::OpenOptions::new().read(true).write(true).open(&shard).expect("open");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).expect("read");
    file.write_all_at(&[byte[0] ^ 0x10], offset).expect("flip");
    drop(file);
    let err = io.load_checkpoint(&path, &mapped()).expect_err("a corrupt mapped load");
    match &err {
        Error::Crc { tensor, path: p, .. } => assert_eq!((tensor.as_str(), p), ("big", &shard), "{err}"),
        other => panic!("expected a CRC error, got {other}"),
    }
    let unverified =
        io.load_checkpoint(&path, &LoadOptions { verify: Some(false), ..mapped() }).expect("unverified");
    let big = &unverified.get("big").expect("big").data;
    let at = big.len() - 4 * MIB;
    assert_eq!(big[at], tensors[0].1[at] ^ 0x10);
}

#[test]
fn a_shard_shorter_than_the_manifest_says_is_refused() {
    let dir = scratch();
    let mut ck = Checkpoint::new();
    let w = bytes(7, 2 * MIB);
    ck.add("w", Dtype::U8, &[(2 * MIB) as u64], &w).expect("tensor");
    let io = UringCheckpointIO::new(config()).expect("config");
    let path = dir.path().join("ck");
    io.save_checkpoint(&ck, &path).expect("save");
    let shard = shards(&path).pop().expect("a shard");
    let len = fs::metadata(&shard).expect("stat").len();
    fs::OpenOptions::new().write(true).open(&shard).expect("open").set_len(len - 4096).expect("truncate");
    let err = io.load_checkpoint(&path, &mapped()).expect_err("a short shard");
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("the manifest says"), "{err}");
}

#[test]
fn a_safetensors_file_maps_as_it_reads() {
    let dir = scratch();
    // Written by hand as another tool would: an 8-byte-aligned header, no CRCs.
    let data = bytes(9, 5 * MIB + 6);
    let header = format!(
        "{{\"a\":{{\"dtype\":\"U8\",\"shape\":[{n}],\"data_offsets\":[0,{n}]}},\"b\":{{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[{n},{m}]}}}}",
        n = 5 * MIB,
        m = 5 * MIB + 6
    );
    let mut header = header.into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    file.extend_from_slice(&data);
    let path = dir.path().join("model.safetensors");
    fs::write(&path, &file).expect("write");
    let io = UringCheckpointIO::new(config()).expect("config");
    let read = io.load_checkpoint(&path, &LoadOptions::default()).expect("read");
    let map = io.load_checkpoint(&path, &mapped()).expect("map");
    same_tensors(&read, &map);
    assert!(map.get("a").expect("a").data[..] == data[..5 * MIB]);
    assert!(map.get("b").expect("b").data[..] == data[5 * MIB..]);
}
