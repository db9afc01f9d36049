//! Loads into existing memory (`UringCheckpointIO::load_into` with a `TensorSink`): the
//! bytes land where the destinations are, on every engine, for every dtype, for empty and
//! odd-sized tensors and for tensors spanning staging buffers and shards; mismatches are
//! reported together before anything is read; CRC errors name the tensor and the file; the
//! staging pool bounds the memory.

use crate::common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::{bytes, scratch, small_config, ENGINES};
use uring_ckpt::config::Config;
use uring_ckpt::format::Dtype;
use uring_ckpt::sink::{HostSink, SimulatedSink};
use uring_ckpt::source::SimulatedDevice;
use uring_ckpt::{Checkpoint, CheckpointIO, Error, LoadOptions, UringCheckpointIO};

/// Tensors of every dtype with odd element counts, an empty one and a scalar, plus two
/// that span several 64 KiB staging buffers.
fn tensors() -> Vec<(String, Dtype, Vec<u64>, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, &dtype) in Dtype::ALL.iter().enumerate() {
        let elems = 1000 + 8 * i as u64;
        let len = dtype.byte_len(&[elems]).expect("size") as usize;
        out.push((format!("t.{dtype}"), dtype, vec![elems], bytes(i as u64, len)));
    }
    out.push(("empty".into(), Dtype::F32, vec![0, 4], Vec::new()));
    out.push(("scalar".into(), Dtype::F64, vec![], bytes(90, 8)));
    out.push(("big.a".into(), Dtype::U8, vec![1_300_001], bytes(91, 1_300_001)));
    out.push(("big.b".into(), Dtype::BF16, vec![3, 200_003], bytes(92, 1_200_018)));
    out
}

fn save(io: &UringCheckpointIO, path: &std::path::Path, tensors: &[(String, Dtype, Vec<u64>, Vec<u8>)]) {
    let mut ck = Checkpoint::new();
    for (name, dtype, shape, data) in tensors {
        ck.add(name.clone(), *dtype, shape, data).expect("tensor");
    }
    io.save_checkpoint(&ck, path).expect("save");
}

/// Zeroed destinations of the right sizes, by name.
fn destinations(tensors: &[(String, Dtype, Vec<u64>, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    tensors.iter().map(|(name, _, _, data)| (name.clone(), vec![0u8; data.len()])).collect()
}

fn sink(dests: &mut [(String, Vec<u8>)]) -> HostSink<'_> {
    HostSink::new(dests.iter_mut().map(|(n, d)| (n.clone(), d.as_mut_slice()))).expect("sink")
}

#[test]
fn in_place_loads_put_every_byte_where_it_belongs_on_every_engine() {
    let dir = scratch();
    let tensors = tensors();
    for engine in ENGINES {
        // Shards of 1 MiB: the big tensors span staging buffers and get shards of their own.
        let config = Config { max_shard_size: 1 << 20, ..small_config(engine) };
        let io = UringCheckpointIO::new(config).expect("config");
        let path = dir.path().join(engine.as_str());
        save(&io, &path, &tensors);
        assert!(
            uring_ckpt::load::read_manifest(&path).expect("manifest").shards.len() > 2,
            "{engine}: several shards"
        );
        let mut dests = destinations(&tensors);
        let report =
            io.load_into(&path, &LoadOptions::default(), true, &sink(&mut dests)).expect("load_into");
        for ((name, _, _, data), (dest_name, dest)) in tensors.iter().zip(&dests) {
            assert_eq!(name, dest_name);
            assert!(dest == data, "{engine}: {name} differs");
        }
        let total: usize = tensors.iter().map(|t| t.3.len()).sum();
        assert_eq!(report.report.data_bytes, total as u64, "{engine}");
        assert!(report.report.verified && report.missing.is_empty() && report.unexpected.is_empty());
        let stats = io.staging_pool().stats();
        assert_eq!(stats.lent, 0, "{engine}: every staging buffer is back");
        assert!(stats.allocated as usize <= 4, "{engine}: the load used the pool's 4 buffers, got {stats:?}");
    }
}

#[test]
fn subsets_and_non_strict_loads_say_what_was_missing_or_skipped() {
    let dir = scratch();
    let tensors = tensors();
    let io = UringCheckpointIO::new(small_config(uring_ckpt::EngineKind::Uring)).expect("config");
    let path = dir.path().join("ck");
    save(&io, &path, &tensors);

    // Only two destinations, not strict: the others are skipped and listed.
    let mut dests = vec![("big.b".to_owned(), vec![0u8; 1_200_018]), ("nope".to_owned(), vec![0u8; 4])];
    let report = io.load_into(&path, &LoadOptions::default(), false, &sink(&mut dests)).expect("non-strict");
    assert!(dests[0].1 == tensors.iter().find(|t| t.0 == "big.b").expect("big.b").3);
    assert_eq!(report.missing, ["nope"]);
    assert_eq!(report.unexpected.len(), tensors.len() - 1);
    assert!(
        report.report.read_bytes < 1_300_000,
        "only big.b's bytes are read: {}",
        report.report.read_bytes
    );

    // `names` narrows what is asked for: with it, strict is satisfied by one destination.
    let options = LoadOptions { names: Some(vec!["t.U8".into()]), ..LoadOptions::default() };
    let mut dests = vec![("t.U8".to_owned(), vec![0u8; 3])];
    let u8_index = Dtype::ALL.iter().position(|&d| d == Dtype::U8).expect("u8");
    let mut dests_right = vec![("t.U8".to_owned(), vec![0u8; tensors[u8_index].3.len()])];
    assert!(io.load_into(&path, &options, true, &sink(&mut dests)).is_err(), "wrong size");
    io.load_into(&path, &options, true, &sink(&mut dests_right)).expect("subset");
    assert!(dests_right[0].1 == tensors[u8_index].3);
}

#[test]
fn every_mismatch_is_reported_at_once_before_anything_is_read() {
    let dir = scratch();
    let tensors = tensors();
    let io = UringCheckpointIO::new(small_config(uring_ckpt::EngineKind::Uring)).expect("config");
    let path = dir.path().join("ck");
    save(&io, &path, &tensors);
    let mut dests = destinations(&tensors);
    dests.retain(|(n, _)| n != "scalar"); // unexpected: "scalar"
    dests.push(("extra".into(), vec![0u8; 8])); // missing: "extra"
    dests.iter_mut().find(|(n, _)| n == "big.a").expect("big.a").1.push(0); // one byte too many
    let sink = {
        // "big.b" with the right size but the wrong shape and dtype.
        let mut raw = Vec::new();
        for (name, dest) in dests.iter_mut() {
            // SAFETY: each Vec lives until the end of the test and is lent to the sink only.
            let host = unsafe {
                uring_ckpt::sink::host::HostDest::from_raw(name.clone(), dest.as_mut_ptr(), dest.len())
            };
            raw.push(if name == "big.b" { host.expecting(Dtype::F16, vec![200_003, 3]) } else { host });
        }
        // SAFETY: as above.
        unsafe { HostSink::from_dests(raw) }.expect("sink")
    };
    let err = io.load_into(&path, &LoadOptions::default(), true, &sink).expect_err("mismatch");
    let Error::Mismatch { problems, path: at } = &err else { panic!("not a mismatch: {err}") };
    assert_eq!(at, &path);
    let text = problems.join("\n");
    for needle in [
        "\"big.a\": 1300001 bytes in the checkpoint, 1300002",
        "\"big.b\": dtype BF16",
        "[3, 200003]",
        "\"extra\" is not in the checkpoint",
        "\"scalar\" has no destination",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert_eq!(problems.len(), 4, "{text}");
    assert!(dests.iter().all(|(_, d)| d.iter().all(|&b| b == 0)), "nothing was written");
}

#[test]
fn a_flipped_byte_is_named_by_tensor_and_file() {
    let dir = scratch();
    let tensors = tensors();
    for engine in ENGINES {
        let io = UringCheckpointIO::new(small_config(engine)).expect("config");
        let path = dir.path().join(engine.as_str());
        save(&io, &path, &tensors);
        let manifest = uring_ckpt::load::read_manifest(&path).expect("manifest");
        let shard_of_b = &manifest.weight_map["big.b"];
        let shard = path.join(shard_of_b);
        // Inside big.b, past its first staging buffer: the CRC combines pieces from several.
        let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
        let offset = {
            let b = loaded.get("big.b").expect("big.b");
            let whole = fs::read(&shard).expect("read");
            let at = whole.windows(64).position(|w| w == &b.data[700_000..700_064]).expect("find big.b");
            at as u64 + 7
        };
        let file = fs::OpenOptions::new().read(true).write(true).open(&shard).expect("open");
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, offset).expect("read");
        file.write_all_at(&[byte[0] ^ 1], offset).expect("flip");
        let mut dests = destinations(&tensors);
        let err = io.load_into(&path, &LoadOptions::default(), true, &sink(&mut dests)).expect_err("crc");
        match &err {
            Error::Crc { tensor, path: p, .. } => {
                assert_eq!(tensor, "big.b", "{engine}: {err}");
                assert_eq!(p, &shard, "{engine}: {err}");
            }
            other => panic!("{engine}: not a CRC error: {other}"),
        }
        let unverified = LoadOptions { verify: Some(false), ..LoadOptions::default() };
        io.load_into(&path, &unverified, true, &sink(&mut dests)).expect("unverified load reads it");
    }
}

/// Destinations that start at the same place in a page as their tensor's bytes in the file,
/// shifted by `skew` bytes: each is `(name, buffer, start, bytes)`.
fn phased_destinations(
    path: &std::path::Path,
    io: &UringCheckpointIO,
    skew: usize,
) -> Vec<(String, Vec<u8>, usize, usize)> {
    let info = uring_ckpt::inspect::inspect(io.config(), path).expect("inspect");
    let page = 4096usize;
    let phased = info.tensors.iter().map(|t| {
        let buf = vec![0u8; t.bytes as usize + 2 * page];
        let want = (t.offset as usize + skew) % page;
        let start = (want + page - buf.as_ptr() as usize % page) % page;
        (t.name.clone(), buf, start, t.bytes as usize)
    });
    phased.collect()
}

/// A sink over the destinations of [`phased_destinations`].
fn phased_sink(dests: &mut [(String, Vec<u8>, usize, usize)]) -> HostSink<'_> {
    let lent = dests.iter_mut().map(|(n, buf, at, len)| (n.clone(), &mut buf[*at..*at + *len]));
    HostSink::new(lent).expect("sink")
}

/// The bytes of destination `name` of [`phased_destinations`].
fn phased_bytes<'a>(dests: &'a [(String, Vec<u8>, usize, usize)], name: &str) -> &'a [u8] {
    let (_, buf, at, len) = dests.iter().find(|d| d.0 == name).expect("destination");
    &buf[*at..*at + *len]
}

#[test]
fn tensors_at_the_files_phase_are_read_straight_into_their_memory_on_every_engine() {
    let dir = scratch();
    // Large odd-sized tensors (unaligned heads and tails), a small one between them, and the
    // tensors of every dtype: spanning staging buffers and shards.
    let mut tensors = tensors();
    tensors.push(("large.a".into(), Dtype::U8, vec![2_500_003], bytes(93, 2_500_003)));
    tensors.push(("large.b".into(), Dtype::F32, vec![3, 300_001], bytes(94, 3_600_012)));
    tensors.push(("after".into(), Dtype::U8, vec![999], bytes(95, 999)));
    tensors.push(("large.c".into(), Dtype::BF16, vec![1_500_001], bytes(96, 3_000_002)));
    for engine in ENGINES {
        let config = Config { max_shard_size: 4 << 20, zero_copy_loads: true, ..small_config(engine) };
        let io = UringCheckpointIO::new(config.clone()).expect("config");
        let path = dir.path().join(engine.as_str());
        save(&io, &path, &tensors);
        // Off (the default): everything staged.
        let staged = UringCheckpointIO::new(Config { zero_copy_loads: false, ..config }).expect("config");
        let mut dests = phased_destinations(&path, &io, 0);
        let sink = phased_sink(&mut dests);
        let loaded = staged.load_into(&path, &LoadOptions::default(), true, &sink).expect("staged load");
        assert_eq!(loaded.report.zero_copy_bytes, 0, "{engine}: zero_copy_loads off");
        drop(sink);
        // At the file's phase, then one byte off it: every byte lands either way.
        for skew in [0, 1] {
            let mut dests = phased_destinations(&path, &io, skew);
            let sink = phased_sink(&mut dests);
            let loaded = io.load_into(&path, &LoadOptions::default(), true, &sink).expect("load_into");
            drop(sink);
            for (name, _, _, data) in &tensors {
                assert!(phased_bytes(&dests, name) == &data[..], "{engine}, skew {skew}: {name} differs");
            }
            let r = &loaded.report;
            let (align, mem_align) =
                if r.engine.direct_io { (r.engine.align as u64, r.engine.mem_align as u64) } else { (1, 1) };
            let info = uring_ckpt::inspect::inspect(io.config(), &path).expect("inspect");
            let expected: u64 = info
                .tensors
                .iter()
                .filter(|_| skew as u64 % mem_align == 0)
                .map(|t| {
                    ((t.offset + t.bytes) / align * align).saturating_sub(t.offset.div_ceil(align) * align)
                })
                .filter(|&interior| interior >= 1 << 20) // the least a direct read takes
                .sum();
            assert_eq!(r.zero_copy_bytes, expected, "{engine}, skew {skew}: {r:?}");
            if skew == 0 {
                assert!(expected > 9_000_000, "{engine}: the large tensors' interiors are read directly");
            }
        }
        // A flipped byte inside a directly read interior is still a CRC error naming the
        // tensor and its file.
        let info = uring_ckpt::inspect::inspect(io.config(), &path).expect("inspect");
        let b = info.tensors.iter().find(|t| t.name == "large.b").expect("large.b");
        let shard = path.join(&b.shard);
        let file = fs::OpenOptions::new().read(true).write(true).open(&shard).expect("open");
        let (mut byte, at) = ([0u8; 1], b.offset + 2_000_001);
        file.read_exact_at(&mut byte, at).expect("read");
        file.write_all_at(&[byte[0] ^ 0x10], at).expect("flip");
        let mut dests = phased_destinations(&path, &io, 0);
        let sink = phased_sink(&mut dests);
        match io.load_into(&path, &LoadOptions::default(), true, &sink).expect_err("crc") {
            Error::Crc { tensor, path: p, .. } => {
                assert_eq!((tensor.as_str(), &p), ("large.b", &shard), "{engine}")
            }
            other => panic!("{engine}: not a CRC error: {other}"),
        }
        assert_eq!(io.staging_pool().stats().lent, 0, "{engine}: every staging buffer is back");
    }
}

#[test]
fn loads_into_a_simulated_device_through_its_copy_engine() {
    let dir = scratch();
    let tensors = tensors();
    let io = UringCheckpointIO::new(small_config(uring_ckpt::EngineKind::Uring)).expect("config");
    let path = dir.path().join("ck");
    save(&io, &path, &tensors);
    let device = SimulatedDevice::new(256 << 20).expect("device");
    let dests = tensors.iter().map(|(n, _, _, d)| (n.clone(), device.zeroed(d.len()))).collect();
    let sink = SimulatedSink::new(dests).expect("sink");
    io.load_into(&path, &LoadOptions::default(), true, &sink).expect("load into the device");
    let total: usize = tensors.iter().map(|t| t.3.len()).sum();
    assert_eq!(device.bytes_uploaded(), total as u64, "every byte went through the copy engine");
    for (name, _, _, data) in &tensors {
        assert!(sink.tensor(name).expect("dest").to_host().expect("read") == *data, "{name}");
    }
    // A generated destination keeps nothing but takes the copies (for benches of any size).
    let generated = tensors.iter().map(|(n, _, _, d)| (n.clone(), device.generated(d.len(), 0))).collect();
    let discard = SimulatedSink::new(generated).expect("sink");
    io.load_into(&path, &LoadOptions::default(), true, &discard).expect("load into generated");
    assert_eq!(device.bytes_uploaded(), 2 * total as u64);
}
