//! Micro-benchmarks of the hot kernels: CRC-32, header build/parse for 10k tensors, the
//! staging copy with its CRC, and a small end-to-end save on the real disk.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use uring_ckpt::format::{encode_header, parse_header, Dtype, ShardLayout, TensorSpec};
use uring_ckpt::io::AlignedBuf;
use uring_ckpt::{Checkpoint, CheckpointIO, Config, UringCheckpointIO};

const MIB: usize = 1 << 20;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

fn crc32(c: &mut Criterion) {
    let data = pattern(64 * MIB);
    let mut group = c.benchmark_group("crc32");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("crc32fast 64MiB", |b| b.iter(|| crc32fast::hash(black_box(&data))));
    group.finish();
}

fn layout_10k() -> ShardLayout {
    let specs = (0..10_000)
        .map(|i| TensorSpec {
            name: format!("model.layers.{}.block.{}.weight", i / 16, i % 16),
            dtype: Dtype::BF16,
            shape: vec![64, 1 + i % 97],
        })
        .collect();
    ShardLayout::new(specs).expect("valid layout")
}

fn header(c: &mut Criterion) {
    let layout = layout_10k();
    let crcs: Vec<u32> = (0..10_000u32).collect();
    let meta = BTreeMap::new();
    let encoded = encode_header(&layout, Some(&crcs), &meta, 4096).expect("encode");
    let file_len = encoded.len() as u64 + layout.data_len;
    let mut group = c.benchmark_group("header 10k tensors");
    group.throughput(Throughput::Elements(10_000));
    group
        .bench_function("encode", |b| b.iter(|| encode_header(black_box(&layout), Some(&crcs), &meta, 4096)));
    group.bench_function("parse", |b| b.iter(|| parse_header(black_box(&encoded), file_len)));
    group.finish();
}

fn staging_copy(c: &mut Criterion) {
    let chunk = 8 * MIB;
    let src = pattern(chunk);
    let mut group = c.benchmark_group("staging");
    group.throughput(Throughput::Bytes(chunk as u64));
    group.bench_function("copy+crc 8MiB chunk", |b| {
        let mut buf = AlignedBuf::zeroed(chunk, 4096);
        b.iter(|| {
            buf.clear();
            let mut hasher = crc32fast::Hasher::new();
            buf.extend_hashing(black_box(&src), &mut hasher);
            hasher.finalize()
        })
    });
    group.bench_function("copy only 8MiB chunk", |b| {
        let mut buf = AlignedBuf::zeroed(chunk, 4096);
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(black_box(&src))
        })
    });
    group.finish();
}

fn small_save(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("scratch dir on the repo's disk");
    let tensors: Vec<Vec<u8>> = (0..16).map(|i| pattern(MIB + i * 4099)).collect();
    let io = UringCheckpointIO::new(Config::default()).expect("config");
    let mut n = 0u64;
    let total: usize = tensors.iter().map(Vec::len).sum();
    let mut group = c.benchmark_group("end to end");
    group.throughput(Throughput::Bytes(total as u64));
    group.sample_size(10);
    group.bench_function("save 16MiB, uring, durable", |b| {
        b.iter_batched(
            || {
                n += 1;
                dir.path().join(format!("c{n}"))
            },
            |path| {
                let mut ck = Checkpoint::new();
                for (i, t) in tensors.iter().enumerate() {
                    ck.add(format!("t{i}"), Dtype::U8, &[t.len() as u64], t).expect("tensor");
                }
                io.save_checkpoint(&ck, &path).expect("save");
                std::fs::remove_dir_all(&path).expect("cleanup");
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, crc32, header, staging_copy, small_save);
criterion_main!(benches);
