//! Data-region phase: tensors whose memory sits past a page boundary (torch's allocator puts
//! large tensors 64 bytes past one) get a shard whose data region starts at the same phase
//! past a 4096-byte offset, so that address and file offset agree modulo the direct-I/O
//! alignment and the large tensors go to disk without a copy, on every engine. The block
//! shared by the end of the header padding and the first data bytes must be right, the file
//! must load byte-identical, verify, and keep page-aligned memory at today's layout.

use crate::common;

use std::path::Path;

use common::{bytes, scratch, small_config, ENGINES};
use uring_ckpt::config::{Config, EngineKind};
use uring_ckpt::format::{parse_header, Dtype};
use uring_ckpt::io::AlignedBuf;
use uring_ckpt::sink::HostSink;
use uring_ckpt::{Checkpoint, CheckpointIO, LoadOptions, SaveReport, UringCheckpointIO};

/// Host memory laid out as the test asks: each tensor at a chosen offset in one page-aligned
/// arena (offset 64 past a page: where torch puts a large tensor).
struct Arena {
    buf: AlignedBuf,
    /// Per tensor: name, offset in the arena, length.
    tensors: Vec<(String, usize, usize)>,
}

impl Arena {
    /// `specs`: (name, phase past a page, length); each tensor starts on a page of its own.
    fn new(specs: &[(&str, usize, usize)]) -> Arena {
        let mut tensors = Vec::new();
        let mut at = 0usize;
        for &(name, phase, len) in specs {
            let start = at.next_multiple_of(4096) + phase;
            tensors.push((name.to_owned(), start, len));
            at = start + len;
        }
        let total = at.next_multiple_of(4096).max(4096);
        let mut buf = AlignedBuf::zeroed(total, 4096);
        buf.set_len(total);
        for (i, (_, start, len)) in tensors.iter().enumerate() {
            buf[*start..start + len].copy_from_slice(&bytes(i as u64 + 1, *len));
        }
        Arena { buf, tensors }
    }

    fn data(&self, i: usize) -> &[u8] {
        let (_, start, len) = &self.tensors[i];
        &self.buf[*start..start + len]
    }

    fn checkpoint(&self) -> Checkpoint<'_> {
        let mut ck = Checkpoint::new();
        for (i, (name, _, len)) in self.tensors.iter().enumerate() {
            ck.add(name.clone(), Dtype::U8, &[*len as u64], self.data(i)).expect("tensor");
        }
        ck
    }
}

/// The data-region start of each shard of the checkpoint at `path` (from the files).
fn data_starts(path: &Path) -> Vec<u64> {
    let manifest = uring_ckpt::load::read_manifest(path).expect("manifest");
    manifest
        .shards
        .iter()
        .map(|s| {
            let file = std::fs::read(path.join(&s.file)).expect("read shard");
            let header = parse_header(&file, file.len() as u64).expect("valid header");
            assert_eq!(header.data_start, s.header_len, "{}", s.file);
            // The padding is spaces right up to the data region.
            let json_end =
                file[8..header.data_start as usize].iter().rposition(|&b| b != b' ').expect("json");
            assert_eq!(file[8 + json_end], b'}');
            header.data_start
        })
        .collect()
}

/// Saves, then checks: loads byte-identical (fresh and in place), verifies, inspects.
fn save_and_check(config: &Config, arena: &Arena, path: &Path) -> SaveReport {
    let io = UringCheckpointIO::new(config.clone()).expect("config");
    let report = io.save_checkpoint(&arena.checkpoint(), path).expect("save");
    let loaded = io.load_checkpoint(path, &LoadOptions::default()).expect("load");
    assert!(loaded.report.verified);
    for (i, (name, _, _)) in arena.tensors.iter().enumerate() {
        let got = loaded.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert!(got.data[..] == *arena.data(i), "{}: {name} differs after load", config.engine);
    }
    let mut dests: Vec<(String, Vec<u8>)> =
        arena.tensors.iter().map(|(name, _, len)| (name.clone(), vec![0u8; *len])).collect();
    let sink = HostSink::new(dests.iter_mut().map(|(n, d)| (n.clone(), d.as_mut_slice()))).expect("sink");
    io.load_into(path, &LoadOptions::default(), true, &sink).expect("load_into");
    drop(sink);
    for (i, (name, dest)) in dests.iter().enumerate() {
        assert!(dest[..] == *arena.data(i), "{}: {name} differs after load_into", config.engine);
    }
    let verified = uring_ckpt::inspect::verify(config, path, |_, _| {}).expect("verify");
    assert_eq!(verified.tensors, arena.tensors.len());
    let info = uring_ckpt::inspect::inspect(config, path).expect("inspect");
    assert_eq!(info.tensors.len(), arena.tensors.len());
    report
}

/// With O_DIRECT, each large tensor whose address and offset agree stages at most one
/// write unit (the partial 4096-byte block at each end it shares with its neighbours).
fn assert_zero_copy(report: &SaveReport, engine: EngineKind, zero_copy: &[usize]) {
    if !report.engine.direct_io {
        assert_eq!(engine, EngineKind::Buffered, "{report:?}");
        return; // through the page cache every large tensor is written from its memory
    }
    let align = (report.engine.align as u64).max(4096);
    let total: u64 = zero_copy.iter().map(|&n| n as u64).sum();
    let min = total - align * zero_copy.len() as u64;
    assert!(
        (min..=total).contains(&report.zero_copy_bytes),
        "{engine}: {} zero-copy bytes, expected {min}..={total}",
        report.zero_copy_bytes
    );
}

const MIB: usize = 1 << 20;

#[test]
fn tensors_64_bytes_past_a_page_go_to_disk_without_a_copy_on_every_engine() {
    let dir = scratch();
    // Large tensors of sizes that keep the congruence, then small, odd and empty ones.
    let arena = Arena::new(&[
        ("a", 64, MIB),
        ("b", 64, 512 * 1024),
        ("c", 64, 2 * MIB + 4096),
        ("d", 64, 300 * 1024),
        ("small", 64, 1000),
        ("empty", 64, 0),
        ("odd", 64, 300_001),
    ]);
    let mut files = Vec::new();
    for engine in ENGINES {
        let config = small_config(engine);
        let path = dir.path().join(engine.as_str());
        let report = save_and_check(&config, &arena, &path);
        assert_eq!(data_starts(&path), vec![4096 + 64], "{engine}");
        // "odd" comes after a 1000-byte tensor: its offset no longer agrees with its address.
        assert_zero_copy(&report, engine, &[MIB, 512 * 1024, 2 * MIB + 4096, 300 * 1024]);
        if report.engine.direct_io && report.engine.mem_align >= 512 {
            assert!(report.zero_copy_bytes < (4 * MIB) as u64, "{engine}: odd was staged");
        }
        let manifest = uring_ckpt::load::read_manifest(&path).expect("manifest");
        files.push(std::fs::read(path.join(&manifest.shards[0].file)).expect("read shard"));
    }
    assert!(files.windows(2).all(|w| w[0] == w[1]), "every engine writes the same bytes");
}

#[test]
fn page_aligned_memory_keeps_the_data_region_on_a_page() {
    let dir = scratch();
    let arena = Arena::new(&[("a", 0, MIB), ("b", 0, 300 * 1024), ("c", 64, 1000)]);
    for engine in ENGINES {
        let path = dir.path().join(engine.as_str());
        let report = save_and_check(&small_config(engine), &arena, &path);
        assert_eq!(data_starts(&path), vec![4096], "{engine}");
        assert_zero_copy(&report, engine, &[MIB, 300 * 1024]);
    }
}

#[test]
fn mixed_phases_take_the_phase_of_the_most_bytes() {
    let dir = scratch();
    for (specs, start, zero_copy) in [
        (vec![("x", 64, 2 * MIB), ("y", 0, MIB)], 4096 + 64, 2 * MIB),
        (vec![("x", 0, 2 * MIB), ("y", 64, MIB)], 4096, 2 * MIB),
        // A tie goes to the smaller phase.
        (vec![("x", 512, MIB), ("y", 128, MIB)], 4096 + 128, MIB),
    ] {
        let arena = Arena::new(&specs);
        for engine in ENGINES {
            let path = dir.path().join(format!("{}-{start}-{}", engine.as_str(), specs[0].1));
            let report = save_and_check(&small_config(engine), &arena, &path);
            assert_eq!(data_starts(&path), vec![start], "{engine}: {specs:?}");
            assert_zero_copy(&report, engine, &[zero_copy]);
            if report.engine.direct_io && report.engine.mem_align >= 512 {
                let most = zero_copy as u64 + (report.engine.align as u64).max(4096);
                assert!(report.zero_copy_bytes < most, "{engine}: the other phase was staged");
            }
        }
    }
}

#[test]
fn the_phase_follows_the_file_offset_after_odd_sized_tensors() {
    let dir = scratch();
    // 1000 bytes before a tensor 64 bytes past a page: the data region starts at
    // 64 - 1000 (mod 4096) past a page, so that the large tensor's offset is 64 past one.
    let arena = Arena::new(&[("head", 64, 1000), ("w", 64, MIB), ("v", 64, 400 * 1024)]);
    for engine in ENGINES {
        let path = dir.path().join(engine.as_str());
        let report = save_and_check(&small_config(engine), &arena, &path);
        let start = data_starts(&path)[0];
        assert_eq!(start, 4096 + (64 + 4096 - 1000), "{engine}");
        assert_eq!((start + 1000) % 4096, 64);
        // "v" follows "w", whose size keeps the congruence: its address agrees too.
        assert_zero_copy(&report, engine, &[MIB, 400 * 1024]);
    }
}

#[test]
fn a_header_longer_than_one_block_with_a_phase() {
    let dir = scratch();
    let names: Vec<String> = (0..120).map(|i| format!("model.layers.{i}.self_attn.q_proj.bias")).collect();
    let mut specs: Vec<(&str, usize, usize)> = names.iter().map(|n| (n.as_str(), 64, 8)).collect();
    specs.push(("weight", 64, MIB));
    let arena = Arena::new(&specs);
    for engine in ENGINES {
        let path = dir.path().join(engine.as_str());
        let report = save_and_check(&small_config(engine), &arena, &path);
        let start = data_starts(&path)[0];
        // 120 tensors of 8 bytes before "weight": offset 960, so the phase is 64 - 960.
        assert!(start > 8192, "{engine}: the JSON needs more than one block: {start}");
        assert_eq!((start + 960) % 4096, 64, "{engine}");
        assert_zero_copy(&report, engine, &[MIB]);
    }
}

#[test]
fn every_shard_takes_its_own_phase() {
    let dir = scratch();
    let arena = Arena::new(&[("a", 64, MIB), ("b", 64, MIB), ("c", 0, MIB), ("d", 256, MIB)]);
    for engine in ENGINES {
        let config = Config { max_shard_size: MIB as u64, ..small_config(engine) };
        let path = dir.path().join(engine.as_str());
        let report = save_and_check(&config, &arena, &path);
        assert_eq!(report.shards, 4);
        let mut starts = data_starts(&path);
        starts.sort_unstable();
        assert_eq!(starts, vec![4096, 4096 + 64, 4096 + 64, 4096 + 256], "{engine}");
        assert_zero_copy(&report, engine, &[MIB; 4]);
    }
}
