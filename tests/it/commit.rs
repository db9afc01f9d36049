//! The commit protocol as a user sees it: no silent replace, explicit atomic replace, no
//! temporary directory left after success or failure, an earlier checkpoint untouched by a
//! failed save, safe removal, and the multi-rank commit.

use crate::common;

use std::collections::BTreeMap;
use std::fs;

use common::{bytes, entries, scratch, small_config, ENGINES};
use uring_ckpt::checkpoint::TensorData;
use uring_ckpt::config::EngineKind;
use uring_ckpt::format::Dtype;
use uring_ckpt::io::AlignedBuf;
use uring_ckpt::{Checkpoint, CheckpointIO, Error, LoadOptions, TensorView, UringCheckpointIO};

fn one_tensor(data: &[u8]) -> Checkpoint<'_> {
    let mut ck = Checkpoint::new();
    ck.add("w", Dtype::U8, &[data.len() as u64], data).expect("tensor");
    ck
}

#[test]
fn refuses_silent_replace_and_replaces_atomically_when_asked() {
    let dir = scratch();
    let path = dir.path().join("ckpt");
    let (old, new) = (bytes(1, 10_000), bytes(2, 20_000));
    let io = UringCheckpointIO::new(small_config(EngineKind::Uring)).expect("config");
    io.save_checkpoint(&one_tensor(&old), &path).expect("first save");

    let err = io.save_checkpoint(&one_tensor(&new), &path).expect_err("second save must refuse");
    assert!(matches!(err, Error::AlreadyExists(ref p) if p == &path), "{err}");
    let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
    assert!(loaded.get("w").expect("w").data[..] == old[..], "the old checkpoint must be intact");

    let mut config = small_config(EngineKind::Uring);
    config.replace_existing = true;
    let replacing = UringCheckpointIO::new(config).expect("config");
    replacing.save_checkpoint(&one_tensor(&new), &path).expect("replace");
    let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
    assert!(loaded.get("w").expect("w").data[..] == new[..]);
    assert_eq!(entries(dir.path()), vec!["ckpt"], "no temporary directory may remain");
}

#[test]
fn failed_save_leaves_no_trace_and_keeps_the_previous_checkpoint() {
    let dir = scratch();
    let path = dir.path().join("ckpt");
    let old = bytes(3, 5000);
    let mut config = small_config(EngineKind::Uring);
    config.replace_existing = true;
    let io = UringCheckpointIO::new(config).expect("config");
    io.save_checkpoint(&one_tensor(&old), &path).expect("first save");

    // A checkpoint whose view lies about its size: the save fails after the temp dir exists.
    let data = bytes(4, 100);
    let mut bad = Checkpoint::new();
    bad.tensors.push(TensorView {
        name: "w".into(),
        dtype: Dtype::F32,
        shape: vec![1000],
        data: TensorData::Host(&data),
    });
    let err = io.save_checkpoint(&bad, &path).expect_err("invalid checkpoint");
    assert!(matches!(err, Error::InvalidCheckpoint(_)), "{err}");
    assert_eq!(entries(dir.path()), vec!["ckpt"]);
    let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
    assert!(loaded.get("w").expect("w").data[..] == old[..]);
}

#[test]
fn directory_without_manifest_is_not_a_checkpoint() {
    let dir = scratch();
    let fake = dir.path().join("fake");
    fs::create_dir(&fake).expect("mkdir");
    fs::write(fake.join("notes.txt"), b"junk").expect("write");
    let io = UringCheckpointIO::new(small_config(EngineKind::Uring)).expect("config");
    let err = io.load_checkpoint(&fake, &LoadOptions::default()).expect_err("no manifest");
    assert!(matches!(err, Error::NotACheckpoint { .. }), "{err}");
    // With a *.safetensors file it is read as a plain safetensors directory (tests/it/foreign.rs):
    // this one's header is junk, and the error names the file.
    fs::write(fake.join("x.safetensors"), b"junk").expect("write");
    let err = io.load_checkpoint(&fake, &LoadOptions::default()).expect_err("junk shard");
    assert!(matches!(&err, Error::Format { path, .. } if path.ends_with("x.safetensors")), "{err}");
    // Either way it is not a checkpoint of ours: never removed.
    let err = io.remove_checkpoint(&fake).expect_err("must refuse to delete a non-checkpoint");
    assert!(matches!(err, Error::NotACheckpoint { .. }), "{err}");
    assert!(fake.join("x.safetensors").exists());
}

#[test]
fn remove_checkpoint_deletes_whole_directory() {
    let dir = scratch();
    let path = dir.path().join("ckpt");
    let data = bytes(5, 1000);
    let io = UringCheckpointIO::new(small_config(EngineKind::Pwrite)).expect("config");
    io.save_checkpoint(&one_tensor(&data), &path).expect("save");
    io.remove_checkpoint(&path).expect("remove");
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
    io.remove_checkpoint(&path).expect("removing a missing checkpoint is not an error");
}

#[test]
fn aligned_sources_are_written_without_a_copy() {
    let dir = scratch();
    let len = 1 << 20;
    let mut aligned = AlignedBuf::zeroed(len, 4096);
    aligned.set_len(len);
    aligned.copy_from_slice(&bytes(6, len));
    for engine in ENGINES {
        let io = UringCheckpointIO::new(small_config(engine)).expect("config");
        let path = dir.path().join(engine.as_str());
        let report = io.save_checkpoint(&one_tensor(&aligned), &path).expect("save");
        assert_eq!(report.zero_copy_bytes, len as u64, "{engine}: {report:?}");
        assert_eq!(report.staged_bytes, 0);
        let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
        assert!(loaded.get("w").expect("w").data[..] == aligned[..]);
    }
}

#[test]
fn ranks_write_their_shards_and_one_commit_makes_the_checkpoint() {
    let dir = scratch();
    let path = dir.path().join("multi");
    let io = UringCheckpointIO::new(small_config(EngineKind::Uring)).expect("config");
    let data: Vec<Vec<u8>> = (0..4).map(|r| bytes(50 + r, 100_000 + r as usize)).collect();
    let mut reports = Vec::new();
    for (rank, bytes) in data.iter().enumerate() {
        let mut ck = Checkpoint::new();
        ck.add(format!("rank{rank}.w"), Dtype::U8, &[bytes.len() as u64], bytes).expect("tensor");
        reports.push(io.save_rank(&ck, &path, "step-100", rank as u32).expect("rank save"));
    }
    assert!(!path.exists(), "nothing is committed before commit_ranks");
    let metadata = BTreeMap::from([("step".to_owned(), "100".to_owned())]);
    io.commit_ranks(&path, "step-100", &reports, &metadata).expect("commit");
    let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
    for (rank, bytes) in data.iter().enumerate() {
        assert!(loaded.get(&format!("rank{rank}.w")).expect("tensor").data[..] == bytes[..]);
    }
    assert_eq!(loaded.metadata["step"], "100");
    assert_eq!(entries(dir.path()), vec!["multi"]);
}
