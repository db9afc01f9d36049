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
use uring_ckpt::{Checkpoint, CheckpointIO, Error, LoadOptions, RankShards, TensorView, UringCheckpointIO};

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
    io.commit_ranks(&path, "step-100", &reports, &metadata, &[]).expect("commit");
    let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
    for (rank, bytes) in data.iter().enumerate() {
        assert!(loaded.get(&format!("rank{rank}.w")).expect("tensor").data[..] == bytes[..]);
    }
    assert_eq!(loaded.metadata["step"], "100");
    assert_eq!(entries(dir.path()), vec!["multi"]);
}

/// Saves one U8 tensor `rank<r>.w` per rank with the given save id.
fn rank_part(io: &UringCheckpointIO, path: &std::path::Path, id: &str, rank: u32, data: &[u8]) -> RankShards {
    let mut ck = Checkpoint::new();
    ck.add(format!("rank{rank}.w"), Dtype::U8, &[data.len() as u64], data).expect("tensor");
    io.save_rank(&ck, path, id, rank).expect("rank save")
}

#[test]
fn rank_parts_travel_as_json_and_say_where_each_tensor_is() {
    let dir = scratch();
    let path = dir.path().join("dcp");
    let io = UringCheckpointIO::new(small_config(EngineKind::Uring)).expect("config");
    let id = io.begin_ranks(&path).expect("begin");
    let data: Vec<Vec<u8>> = (0..3).map(|r| bytes(70 + r, 3000 + 1000 * r as usize)).collect();
    let mut parts = Vec::new();
    for (rank, bytes) in data.iter().enumerate() {
        let part = rank_part(&io, &path, &id, rank as u32, bytes);
        assert!(part.report.is_some(), "the rank that wrote has its report");
        let json = serde_json::to_string(&part).expect("serializes");
        let back: RankShards = serde_json::from_str(&json).expect("deserializes");
        assert!(back.report.is_none());
        assert_eq!(back.tensors, part.tensors);
        // Each location names the bytes in the shard file, with their CRC.
        let tmp = dir.path().join(format!(".dcp.tmp-{id}"));
        for loc in &back.tensors {
            let file = fs::read(tmp.join(&loc.file)).expect("shard");
            let got = &file[loc.offset as usize..(loc.offset + loc.length) as usize];
            assert_eq!(got, &bytes[..], "{loc:?}");
            assert_eq!(crc32fast::hash(got), loc.crc32);
        }
        parts.push(back);
    }
    let extra = b"dcp metadata".to_vec();
    let meta = BTreeMap::new();
    io.commit_ranks(&path, &id, &parts, &meta, &[("dcp.metadata".to_owned(), &extra[..])]).expect("commit");
    let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
    let stored = loaded.extra_files.iter().find(|(n, _)| n == "dcp.metadata").expect("extra file");
    assert_eq!(stored.1[..], extra[..]);
    for (rank, bytes) in data.iter().enumerate() {
        assert!(loaded.get(&format!("rank{rank}.w")).expect("tensor").data[..] == bytes[..]);
    }
    assert_eq!(entries(dir.path()), vec!["dcp"], "no temporary directory, no lock file");
    assert!(!path.join(uring_ckpt::format::HF_INDEX_FILE).exists(), "no HF index for a multi-rank save");
}

#[test]
fn a_commit_with_a_shard_missing_commits_nothing() {
    let dir = scratch();
    let path = dir.path().join("dcp");
    let io = UringCheckpointIO::new(small_config(EngineKind::Pwrite)).expect("config");
    let id = io.begin_ranks(&path).expect("begin");
    let parts: Vec<RankShards> =
        (0..2).map(|r| rank_part(&io, &path, &id, r, &bytes(80 + u64::from(r), 5000))).collect();
    let tmp = dir.path().join(format!(".dcp.tmp-{id}"));
    fs::remove_file(tmp.join(&parts[1].shards[0].file)).expect("lose a shard");
    let err = io.commit_ranks(&path, &id, &parts, &BTreeMap::new(), &[]).expect_err("missing shard");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(!path.exists());
    assert_eq!(entries(dir.path()), Vec::<String>::new(), "the temporary directory is removed");
    // A rank given twice is refused too.
    let id = io.begin_ranks(&path).expect("begin");
    let part = rank_part(&io, &path, &id, 0, &bytes(90, 100));
    let err = io.commit_ranks(&path, &id, &[part.clone(), part], &BTreeMap::new(), &[]).expect_err("twice");
    assert!(matches!(err, Error::InvalidCheckpoint(_)), "{err}");
    assert!(!path.exists());
}

#[test]
fn the_next_multi_rank_save_removes_what_a_failed_one_left() {
    let dir = scratch();
    let path = dir.path().join("dcp");
    let mut config = small_config(EngineKind::Uring);
    config.replace_existing = true;
    let io = UringCheckpointIO::new(config).expect("config");
    let id = io.begin_ranks(&path).expect("begin");
    let first = rank_part(&io, &path, &id, 0, &bytes(100, 4000));
    io.commit_ranks(&path, &id, &[first], &BTreeMap::new(), &[]).expect("commit");
    // A save whose rank 1 never reports: no commit; its directory stays for now.
    let failed = io.begin_ranks(&path).expect("begin");
    rank_part(&io, &path, &failed, 0, &bytes(101, 4000));
    let leftover = format!(".dcp.tmp-{failed}");
    assert_eq!(entries(dir.path()), vec![leftover.clone(), "dcp".to_owned()]);
    // A directory of a dead coordinator on this host, one of another host, one named by the
    // caller: only the first goes.
    let dead = format!(".dcp.tmp-r-{}-{}-1f-0", uring_ckpt::store::names::host_tag(), u32::MAX - 1);
    let other_host = ".dcp.tmp-r-00000000-1-1f-0".to_owned();
    let named = ".dcp.tmp-step-7".to_owned();
    for d in [&dead, &other_host, &named] {
        fs::create_dir(dir.path().join(d)).expect("mkdir");
    }
    let next = io.begin_ranks(&path).expect("begin");
    let mut want = vec!["dcp".to_owned(), other_host, named, format!(".dcp.tmp-{next}")];
    want.sort();
    assert_eq!(
        entries(dir.path()),
        want,
        "the failed save's and the dead coordinator's directories are gone"
    );
    let part = rank_part(&io, &path, &next, 0, &bytes(102, 4000));
    io.commit_ranks(&path, &next, &[part], &BTreeMap::new(), &[]).expect("commit");
    let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
    assert!(loaded.get("rank0.w").expect("w").data[..] == bytes(102, 4000)[..]);
}

#[test]
fn a_single_process_save_writes_a_hugging_face_index_and_format_pt() {
    let dir = scratch();
    let path = dir.path().join("hf");
    let io = UringCheckpointIO::new(small_config(EngineKind::Uring)).expect("config");
    let (a, b) = (bytes(110, 300_000), bytes(111, 8));
    let mut ck = Checkpoint::new();
    ck.add("model.a", Dtype::U8, &[a.len() as u64], &a).expect("a");
    ck.add("model.b", Dtype::F32, &[2], &b).expect("b");
    ck.set_metadata("step", "3");
    io.save_checkpoint(&ck, &path).expect("save");
    let index = uring_ckpt::format::parse_index(
        &fs::read(path.join(uring_ckpt::format::HF_INDEX_FILE)).expect("index"),
    )
    .expect("parses");
    assert_eq!(index.total_size, Some(300_008));
    let manifest = uring_ckpt::store::read_manifest(&path).expect("manifest");
    assert_eq!(index.weight_map, manifest.weight_map);
    assert!(
        manifest.extra_files.iter().any(|f| f.file == uring_ckpt::format::HF_INDEX_FILE),
        "committed with the rest"
    );
    assert_eq!(manifest.metadata.get("format"), None, "the manifest keeps the caller's metadata");
    for shard in &manifest.shards {
        let file = fs::read(path.join(&shard.file)).expect("shard");
        let header = uring_ckpt::format::parse_header(&file, file.len() as u64).expect("header");
        assert_eq!(header.metadata.get("format").map(String::as_str), Some("pt"), "{}", shard.file);
        assert_eq!(header.metadata.get("step").map(String::as_str), Some("3"));
    }
    // The loader still sees our checkpoint, not the index.
    let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
    assert_eq!(loaded.metadata.get("step").map(String::as_str), Some("3"));
    // Opted out: no index; an extra file of that name is then the caller's.
    let mut ck2 = Checkpoint::new();
    ck2.add("x", Dtype::U8, &[8], &b).expect("x");
    ck2.add_extra_file(uring_ckpt::format::HF_INDEX_FILE, b"{}").expect("extra");
    let err = io.save_checkpoint(&ck2, &dir.path().join("refused")).expect_err("reserved while hf_index");
    assert!(matches!(err, Error::InvalidCheckpoint(_)), "{err}");
    ck2.hf_index = false;
    io.save_checkpoint(&ck2, &dir.path().join("own")).expect("own index");
    assert_eq!(fs::read(dir.path().join("own").join(uring_ckpt::format::HF_INDEX_FILE)).expect("own"), b"{}");
}
