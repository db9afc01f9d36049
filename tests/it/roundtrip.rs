//! Save then load on every engine: every dtype, empty and 1-byte tensors, sizes around each
//! alignment boundary, a tensor larger than the staging pool, thousands of tiny tensors and a
//! checkpoint of several shards. Loaded bytes must equal the source and the files must be
//! byte-identical whichever engine wrote them.

use crate::common;

use std::fs;

use common::{bytes, ckpt, scratch, small_config, ENGINES};
use uring_ckpt::config::EngineKind;
use uring_ckpt::format::Dtype;
use uring_ckpt::{Checkpoint, CheckpointIO, LoadOptions, UringCheckpointIO};

struct Owned {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    data: Vec<u8>,
}

fn as_checkpoint(tensors: &[Owned]) -> Checkpoint<'_> {
    let mut ck = Checkpoint::new();
    for t in tensors {
        ck.add(t.name.clone(), t.dtype, &t.shape, &t.data).expect("valid tensor");
    }
    ck.set_metadata("step", "42");
    ck
}

/// A 1-D tensor of `len` bytes of U8.
fn u8_tensor(name: &str, len: usize, seed: u64) -> Owned {
    Owned { name: name.into(), dtype: Dtype::U8, shape: vec![len as u64], data: bytes(seed, len) }
}

/// Sizes around every alignment boundary the engines care about.
fn boundary_tensors() -> Vec<Owned> {
    let mut out = Vec::new();
    let mut seed = 1;
    for a in [512usize, 4096, 64 * 1024] {
        for len in [0, 1, a - 1, a, a + 1] {
            out.push(u8_tensor(&format!("b{a}_{len}"), len, seed));
            seed += 1;
        }
    }
    out
}

fn every_dtype() -> Vec<Owned> {
    Dtype::ALL
        .iter()
        .enumerate()
        .map(|(i, &dtype)| {
            let shape = vec![3u64, 4];
            let len = dtype.byte_len(&shape).expect("whole bytes") as usize;
            Owned {
                name: format!("dtype_{}", dtype.as_str()),
                dtype,
                shape,
                data: bytes(100 + i as u64, len),
            }
        })
        .collect()
}

fn assert_roundtrip(io: &UringCheckpointIO, tensors: &[Owned], path: &std::path::Path) {
    let ck = as_checkpoint(tensors);
    let report = io.save_checkpoint(&ck, path).expect("save");
    assert_eq!(report.tensors, tensors.len());
    assert_eq!(report.data_bytes, tensors.iter().map(|t| t.data.len() as u64).sum::<u64>());
    let loaded = io.load_checkpoint(path, &LoadOptions::default()).expect("load");
    assert_eq!(loaded.tensors.len(), tensors.len());
    for t in tensors {
        let got = loaded.get(&t.name).unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!(got.dtype, t.dtype, "{}", t.name);
        assert_eq!(got.shape, t.shape, "{}", t.name);
        assert!(got.data[..] == t.data[..], "{} differs after load", t.name);
    }
    assert_eq!(loaded.metadata.get("step").map(String::as_str), Some("42"));
    assert!(loaded.report.verified);
}

#[test]
fn every_dtype_and_boundary_size_on_every_engine() {
    let dir = scratch();
    let mut tensors = every_dtype();
    tensors.extend(boundary_tensors());
    for engine in ENGINES {
        let io = UringCheckpointIO::new(small_config(engine)).expect("config");
        assert_roundtrip(&io, &tensors, &ckpt(dir.path(), engine.as_str()));
    }
    assert_identical_files(dir.path(), &ENGINES.map(|e| e.as_str().to_owned()));
}

#[test]
fn tensor_larger_than_staging_pool_on_every_engine() {
    let dir = scratch();
    // Pool is 256 KiB; 1 MiB + 3 bytes crosses it four times and ends unaligned. An odd
    // start offset in a Vec makes the zero-copy path impossible for the second tensor.
    let big = u8_tensor("big", (1 << 20) + 3, 7);
    let backing = bytes(8, (1 << 20) + 1);
    let odd = Owned {
        name: "odd_address".into(),
        dtype: Dtype::U8,
        shape: vec![1 << 20],
        data: backing[1..].to_vec(),
    };
    let tensors = vec![u8_tensor("head", 5, 9), big, odd];
    for engine in ENGINES {
        let io = UringCheckpointIO::new(small_config(engine)).expect("config");
        assert_roundtrip(&io, &tensors, &ckpt(dir.path(), engine.as_str()));
    }
    assert_identical_files(dir.path(), &ENGINES.map(|e| e.as_str().to_owned()));
}

#[test]
fn thousands_of_tiny_tensors_on_every_engine() {
    let dir = scratch();
    let tensors: Vec<Owned> = (0..3000).map(|i| u8_tensor(&format!("t.{i}"), 1 + i % 13, i as u64)).collect();
    for engine in ENGINES {
        let io = UringCheckpointIO::new(small_config(engine)).expect("config");
        assert_roundtrip(&io, &tensors, &ckpt(dir.path(), engine.as_str()));
    }
}

#[test]
fn checkpoint_larger_than_one_shard_is_split_and_loads() {
    let dir = scratch();
    let tensors: Vec<Owned> =
        (0..10).map(|i| u8_tensor(&format!("layer{i}"), 700_000 + i, i as u64)).collect();
    for engine in ENGINES {
        let mut config = small_config(engine);
        config.max_shard_size = 1 << 20;
        let io = UringCheckpointIO::new(config).expect("config");
        let path = ckpt(dir.path(), engine.as_str());
        assert_roundtrip(&io, &tensors, &path);
        let shards = fs::read_dir(&path).expect("list").filter(|e| {
            e.as_ref().map(|e| e.file_name().to_string_lossy().ends_with(".safetensors")).unwrap_or(false)
        });
        assert_eq!(shards.count(), 10, "each 700 KB tensor needs its own 1 MiB shard");
    }
}

#[test]
fn empty_checkpoint_round_trips() {
    let dir = scratch();
    for engine in ENGINES {
        let io = UringCheckpointIO::new(small_config(engine)).expect("config");
        assert_roundtrip(&io, &[], &ckpt(dir.path(), engine.as_str()));
    }
}

#[test]
fn load_subset_by_name() {
    let dir = scratch();
    let tensors: Vec<Owned> =
        (0..20).map(|i| u8_tensor(&format!("w{i}"), 10_000 * (i + 1), i as u64)).collect();
    let io = UringCheckpointIO::new(small_config(EngineKind::Uring)).expect("config");
    let path = ckpt(dir.path(), "subset");
    io.save_checkpoint(&as_checkpoint(&tensors), &path).expect("save");
    let names = vec!["w3".to_owned(), "w17".to_owned()];
    let options = LoadOptions { names: Some(names), verify: Some(true), ..Default::default() };
    let loaded = io.load_checkpoint(&path, &options).expect("load subset");
    assert_eq!(loaded.tensors.len(), 2);
    assert!(loaded.get("w3").expect("w3").data[..] == tensors[3].data[..]);
    assert!(loaded.get("w17").expect("w17").data[..] == tensors[17].data[..]);
    assert!(loaded.report.read_bytes < (tensors[3].data.len() + tensors[17].data.len()) as u64 + 64 * 1024);
    let missing = LoadOptions { names: Some(vec!["nope".into()]), ..Default::default() };
    let err = io.load_checkpoint(&path, &missing).expect_err("unknown tensor");
    assert!(matches!(err, uring_ckpt::Error::TensorNotFound(ref n) if n == "nope"), "{err}");
}

/// The shard files under each named checkpoint are byte-identical across engines.
fn assert_identical_files(dir: &std::path::Path, names: &[String]) {
    let list = |name: &str| {
        let mut files: Vec<_> = fs::read_dir(dir.join(name))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        files
    };
    let reference = list(&names[0]);
    for name in &names[1..] {
        assert_eq!(list(name), reference, "{name} has other files than {}", names[0]);
        for file in &reference {
            let a = fs::read(dir.join(&names[0]).join(file)).expect("read");
            let b = fs::read(dir.join(name).join(file)).expect("read");
            assert!(a == b, "{file} differs between {} and {name}", names[0]);
        }
    }
}

/// A source that is not host memory: every byte must come through `copy_to`.
struct CopyOnly(Vec<u8>);

impl uring_ckpt::source::TensorSource for CopyOnly {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn host_bytes(&self) -> Option<&[u8]> {
        None
    }
    fn copy_to(&self, offset: usize, dst: &mut [u8]) -> uring_ckpt::Result<()> {
        dst.copy_from_slice(&self.0[offset..offset + dst.len()]);
        Ok(())
    }
}

#[test]
fn non_host_sources_go_through_staging_and_match_host_files() {
    use uring_ckpt::checkpoint::TensorData;
    let dir = scratch();
    let sizes = [0usize, 1, 4095, 4097, 300_000, (1 << 20) + 3];
    let host: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| bytes(i as u64 + 70, n)).collect();
    let devices: Vec<CopyOnly> = host.iter().map(|b| CopyOnly(b.clone())).collect();
    for engine in ENGINES {
        let io = UringCheckpointIO::new(small_config(engine)).expect("config");
        let mut from_host = Checkpoint::new();
        let mut from_device = Checkpoint::new();
        for (i, (h, d)) in host.iter().zip(&devices).enumerate() {
            from_host.add(format!("t{i}"), Dtype::U8, &[h.len() as u64], h).expect("tensor");
            from_device
                .add_source(format!("t{i}"), Dtype::U8, &[h.len() as u64], TensorData::Source(d))
                .expect("tensor");
        }
        let a = dir.path().join(format!("{}-host", engine.as_str()));
        let b = dir.path().join(format!("{}-device", engine.as_str()));
        io.save_checkpoint(&from_host, &a).expect("save host");
        let report = io.save_checkpoint(&from_device, &b).expect("save device");
        assert_eq!(report.zero_copy_bytes, 0);
        assert_eq!(report.staged_bytes, sizes.iter().sum::<usize>() as u64);
        // The same files, but for where the data region starts: a shard's phase follows
        // the host memory (a device source has none).
        for file in fs::read_dir(&a).expect("list") {
            let name = file.expect("entry").file_name();
            let (x, y) = (fs::read(a.join(&name)).expect("read"), fs::read(b.join(&name)).expect("read"));
            if !name.to_string_lossy().ends_with(".safetensors") {
                if name != "manifest.json" {
                    assert!(x == y, "{name:?}");
                }
                continue;
            }
            let hx = uring_ckpt::format::parse_header(&x, x.len() as u64).expect("header");
            let hy = uring_ckpt::format::parse_header(&y, y.len() as u64).expect("header");
            assert_eq!(
                (&hx.tensors, &hx.crcs, &hx.metadata),
                (&hy.tensors, &hy.crcs, &hy.metadata),
                "{name:?}"
            );
            assert!(x[hx.data_start as usize..] == y[hy.data_start as usize..], "{name:?}");
        }
    }
}
