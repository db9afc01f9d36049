//! Safetensors checkpoints written by someone else, read through the loader's own path: one
//! `.safetensors` file, a directory of them, a Hugging Face directory with
//! `model.safetensors.index.json`. The files are written here by a small encoder of the
//! upstream layout (8-byte length, JSON padded to 8 bytes, packed data, no CRCs), so that
//! nothing of the crate's own writer is involved. Then the hostile variants: links, names
//! that leave the directory, an index that disagrees with the files, truncated files.

use crate::common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bytes, scratch, small_config, ENGINES};
use uring_ckpt::config::{Config, EngineKind};
use uring_ckpt::format::{FormatError, MAX_INDEX_LEN};
use uring_ckpt::store::{identify, open_any, CheckpointKind};
use uring_ckpt::{inspect, Checkpoint, CheckpointIO, Dtype, Error, LoadOptions, UringCheckpointIO};

/// One tensor of a hand-written file.
#[derive(Clone)]
struct T {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    data: Vec<u8>,
}

fn t(name: &str, dtype: Dtype, shape: &[u64], seed: u64) -> T {
    let len = dtype.byte_len(shape).expect("whole bytes") as usize;
    T { name: name.to_owned(), dtype, shape: shape.to_vec(), data: bytes(seed, len) }
}

/// A safetensors file as upstream writes it: tensors in the order given, the JSON padded
/// with spaces to a multiple of 8 bytes, `__metadata__` when given.
fn encode(tensors: &[T], metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, serde_json::Value> =
            metadata.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v))).collect();
        header.insert("__metadata__".to_owned(), meta.into());
    }
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.data.len() as u64;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.as_str(), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).expect("json");
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    for t in tensors {
        out.extend_from_slice(&t.data);
    }
    out
}

fn write(path: &Path, tensors: &[T], metadata: &[(&str, &str)]) {
    fs::write(path, encode(tensors, metadata)).expect("write safetensors");
}

/// Every dtype the crate knows (sub-byte ones in whole bytes), empty tensors, odd sizes.
fn every_dtype() -> Vec<T> {
    let mut out: Vec<T> = Dtype::ALL
        .iter()
        .enumerate()
        .map(|(i, &dtype)| {
            // 12 elements are whole bytes for every dtype (F4: 6 bytes, F6: 9 bytes).
            t(&format!("w.{}", dtype.as_str().to_lowercase()), dtype, &[3, 4], i as u64 + 1)
        })
        .collect();
    out.push(t("empty.f32", Dtype::F32, &[0], 90));
    out.push(t("empty.matrix", Dtype::BF16, &[3, 0, 2], 91));
    out.push(t("scalar", Dtype::F64, &[], 92));
    out.push(t("odd.u8", Dtype::U8, &[1001], 93));
    out.push(t("odd.f16", Dtype::F16, &[3, 5, 7], 94));
    out.push(t("big.f32", Dtype::F32, &[70_001], 95)); // crosses 64 KiB chunks, unaligned end
    out
}

/// Asserts that `loaded` holds exactly `expected`, bytes, dtypes and shapes.
fn assert_loaded(loaded: &uring_ckpt::LoadedCheckpoint, expected: &[T], what: &str) {
    assert_eq!(loaded.tensors.len(), expected.len(), "{what}: tensor count");
    for t in expected {
        let got = loaded.get(&t.name).unwrap_or_else(|| panic!("{what}: {} missing", t.name));
        assert_eq!(got.dtype, t.dtype, "{what}: {}", t.name);
        assert_eq!(got.shape, t.shape, "{what}: {}", t.name);
        assert!(got.data[..] == t.data[..], "{what}: bytes of {} differ", t.name);
    }
    assert!(loaded.extra_files.is_empty(), "{what}: no extra files");
}

fn load(config: &Config, path: &Path) -> uring_ckpt::Result<uring_ckpt::LoadedCheckpoint> {
    UringCheckpointIO::new(config.clone()).expect("config").load_checkpoint(path, &LoadOptions::default())
}

#[test]
fn a_single_file_loads_every_dtype_on_every_engine() {
    let dir = scratch();
    let tensors = every_dtype();
    let file = dir.path().join("model.safetensors");
    write(&file, &tensors, &[("format", "pt")]);
    fs::write(dir.path().join("README.md"), b"not read").expect("write");
    for engine in ENGINES {
        let config = small_config(engine);
        let loaded = load(&config, &file).expect("load the file");
        assert_loaded(&loaded, &tensors, engine.as_str());
        assert_eq!(loaded.metadata.get("format").map(String::as_str), Some("pt"), "its __metadata__");
        assert!(loaded.report.verified);

        let report = inspect::verify(&config, &file, |_, _| {}).expect("verify");
        assert_eq!(report.kind, CheckpointKind::SafetensorsFile);
        assert_eq!((report.shards, report.tensors, report.tensors_without_crc), (1, 0, tensors.len()));
        assert_eq!(report.bytes, fs::metadata(&file).expect("stat").len());
    }
    let config = small_config(EngineKind::Uring);
    let info = inspect::inspect(&config, &file).expect("inspect");
    assert_eq!(info.kind, CheckpointKind::SafetensorsFile);
    assert_eq!(info.manifest.shards.len(), 1);
    assert_eq!(info.manifest.shards[0].file, "model.safetensors");
    assert_eq!(info.manifest.total_size, tensors.iter().map(|t| t.data.len() as u64).sum::<u64>());
    assert!(info.manifest.extra_files.is_empty());
    assert!(info.tensors.iter().all(|t| t.crc32.is_none() && t.shard == "model.safetensors"));
    assert_eq!(identify(&file).expect("identify"), (CheckpointKind::SafetensorsFile, 1));

    // A subset by name, read without the rest of the file.
    let io = UringCheckpointIO::new(config.clone()).expect("config");
    let names = vec!["odd.f16".to_owned(), "empty.matrix".to_owned()];
    let subset = io
        .load_checkpoint(&file, &LoadOptions { names: Some(names), verify: Some(true), ..Default::default() })
        .expect("load a subset");
    let wanted: Vec<T> =
        tensors.iter().filter(|t| t.name == "odd.f16" || t.name == "empty.matrix").cloned().collect();
    assert_loaded(&subset, &wanted, "subset");
    assert!(subset.report.read_bytes < fs::metadata(&file).expect("stat").len());
    let err = io
        .load_checkpoint(&file, &LoadOptions { names: Some(vec!["nope".into()]), ..Default::default() })
        .expect_err("unknown name");
    assert!(matches!(err, Error::TensorNotFound(ref n) if n == "nope"), "{err}");

    // The path given may itself be a link (the caller's own argument): it is resolved.
    let elsewhere = scratch();
    let link = elsewhere.path().join("linked.safetensors");
    symlink(&file, &link).expect("symlink");
    assert_loaded(&load(&config, &link).expect("load through a link"), &tensors, "link");
}

#[test]
fn a_directory_loads_all_its_safetensors_files_sorted() {
    let dir = scratch();
    let ck = dir.path().join("shards");
    fs::create_dir(&ck).expect("mkdir");
    let all = every_dtype();
    let parts: Vec<Vec<T>> = all.chunks(9).map(<[T]>::to_vec).collect();
    assert_eq!(parts.len(), 3);
    // Written out of name order: the loader sorts.
    for (name, part) in
        [("c.safetensors", &parts[2]), ("a.safetensors", &parts[0]), ("b.safetensors", &parts[1])]
    {
        write(&ck.join(name), part, &[]);
    }
    fs::write(ck.join("config.json"), b"{}").expect("write");
    fs::write(ck.join(".partial.safetensors"), b"junk of a download in progress").expect("hidden");
    fs::create_dir(ck.join("sub")).expect("mkdir");
    for engine in ENGINES {
        let config = small_config(engine);
        let loaded = load(&config, &ck).expect("load the directory");
        assert_loaded(&loaded, &all, engine.as_str());
        let order: Vec<&str> = loaded.tensors.iter().map(|t| t.name.as_str()).collect();
        let expected: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(order, expected, "shard by shard, sorted by file name");
        assert!(loaded.metadata.is_empty(), "several files: no metadata");
        let report = inspect::verify(&config, &ck, |_, _| {}).expect("verify");
        assert_eq!(report.kind, CheckpointKind::SafetensorsDir);
        assert_eq!((report.shards, report.tensors_without_crc), (3, all.len()));
    }
    let info = inspect::inspect(&small_config(EngineKind::Pwrite), &ck).expect("inspect");
    let files: Vec<&str> = info.manifest.shards.iter().map(|s| s.file.as_str()).collect();
    assert_eq!(files, ["a.safetensors", "b.safetensors", "c.safetensors"]);
    assert_eq!(info.kind.describe(files.len()), "safetensors directory (3 shards)");
    assert_eq!(identify(&ck).expect("identify"), (CheckpointKind::SafetensorsDir, 3));
}

/// A Hugging Face layout: two shards and the index, plus an unlisted file beside them.
fn hugging_face_dir(root: &Path) -> (PathBuf, Vec<T>) {
    let ck = root.join("hf");
    fs::create_dir(&ck).expect("mkdir");
    let all = every_dtype();
    let (first, second) = all.split_at(12);
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    write(&ck.join(names[0]), first, &[("format", "pt")]);
    write(&ck.join(names[1]), second, &[("format", "pt")]);
    let mut weight_map = serde_json::Map::new();
    for (part, name) in [(first, names[0]), (second, names[1])] {
        for t in part {
            weight_map.insert(t.name.clone(), name.into());
        }
    }
    let total: u64 = all.iter().map(|t| t.data.len() as u64).sum();
    let index = serde_json::json!({"metadata": {"total_size": total, "total_parameters": 1}, "weight_map": weight_map});
    fs::write(ck.join("model.safetensors.index.json"), serde_json::to_vec_pretty(&index).expect("json"))
        .expect("write index");
    // Not in the weight map: never read (it is not even a valid file).
    fs::write(ck.join("consolidated.safetensors"), b"junk").expect("write");
    (ck, all)
}

#[test]
fn a_hugging_face_index_reads_exactly_the_mapped_files() {
    let dir = scratch();
    let (ck, all) = hugging_face_dir(dir.path());
    for engine in ENGINES {
        let config = small_config(engine);
        assert_loaded(&load(&config, &ck).expect("load the index"), &all, engine.as_str());
        let report = inspect::verify(&config, &ck, |_, _| {}).expect("verify");
        assert_eq!(report.kind, CheckpointKind::HuggingFaceIndex);
        assert_eq!((report.shards, report.tensors, report.tensors_without_crc), (2, 0, all.len()));
    }
    let config = small_config(EngineKind::Uring);
    let opened = open_any(&ck).expect("open");
    assert_eq!(opened.describe(), "Hugging Face index (2 shards)");
    assert_eq!(opened.manifest.weight_map.len(), all.len());
    // The index file itself as the path reads the same.
    let via_index = ck.join("model.safetensors.index.json");
    assert_loaded(&load(&config, &via_index).expect("load via the index file"), &all, "index path");
    assert_eq!(identify(&via_index).expect("identify"), (CheckpointKind::HuggingFaceIndex, 2));
    // One shard of it, on its own.
    let one = load(&config, &ck.join("model-00002-of-00002.safetensors")).expect("one shard");
    assert_eq!(one.tensors.len(), all.len() - 12);
    assert_eq!(one.metadata.get("format").map(String::as_str), Some("pt"));
}

#[test]
fn our_own_checkpoints_read_as_before_and_without_their_manifest_as_a_directory() {
    let dir = scratch();
    let config = small_config(EngineKind::Uring);
    let data = bytes(7, 5000);
    let mut ck = Checkpoint::new();
    ck.hf_index = false; // without its manifest: a plain directory of shards (with it: an HF index)
    ck.add("w", Dtype::U8, &[5000], &data).expect("w");
    ck.set_metadata("step", "3");
    let path = dir.path().join("ours");
    let io = UringCheckpointIO::new(config.clone()).expect("config");
    io.save_checkpoint(&ck, &path).expect("save");
    let report = inspect::verify(&config, &path, |_, _| {}).expect("verify");
    assert_eq!((report.kind, report.tensors, report.tensors_without_crc), (CheckpointKind::UringCkpt, 1, 0));
    assert_eq!(identify(&path).expect("identify"), (CheckpointKind::UringCkpt, 1));

    // Without its manifest it is a directory of safetensors files, whose CRCs still count.
    fs::remove_file(path.join("manifest.json")).expect("rm manifest");
    let loaded = load(&config, &path).expect("load without the manifest");
    assert!(loaded.get("w").expect("w").data[..] == data[..]);
    let report = inspect::verify(&config, &path, |_, _| {}).expect("verify");
    assert_eq!(
        (report.kind, report.tensors, report.tensors_without_crc),
        (CheckpointKind::SafetensorsDir, 1, 0)
    );
    let shard = fs::read_dir(&path).expect("list").next().expect("one shard").expect("entry").path();
    let mut bytes_of = fs::read(&shard).expect("read");
    let last = bytes_of.len() - 1;
    bytes_of[last] ^= 1;
    fs::write(&shard, &bytes_of).expect("write");
    let err = load(&config, &path).expect_err("a flipped byte");
    assert!(matches!(err, Error::Crc { ref tensor, .. } if tensor == "w"), "{err}");
    // Retention and removal never act on it: it is not a checkpoint of ours.
    let err = io.remove_checkpoint(&path).expect_err("not ours to remove");
    assert!(matches!(err, Error::NotACheckpoint { .. }), "{err}");
    assert!(shard.exists());
}

#[test]
fn retention_and_removal_never_act_on_foreign_directories() {
    let dir = scratch();
    let config = small_config(EngineKind::Uring);
    let (hf, _) = hugging_face_dir(dir.path());
    fs::write(dir.path().join("latest"), b"hf\n").expect("point latest at it");
    assert_eq!(uring_ckpt::retention::latest_valid(&config, dir.path()).expect("latest_valid"), None);
    let err = inspect::verify_ours(&config, &hf, |_, _| {}).expect_err("not ours");
    assert!(matches!(err, Error::NotACheckpoint { .. }), "{err}");
    let before = common::entries(&hf);
    let io = UringCheckpointIO::new(config.clone()).expect("config");
    let err = io.remove_checkpoint(&hf).expect_err("not ours to remove");
    assert!(matches!(err, Error::NotACheckpoint { .. }), "{err}");
    let replacing = Config { replace_existing: true, ..config.clone() };
    let mut ck = Checkpoint::new();
    let data = bytes(1, 10);
    ck.add("x", Dtype::U8, &[10], &data).expect("x");
    let err =
        UringCheckpointIO::new(replacing).expect("config").save_checkpoint(&ck, &hf).expect_err("replace");
    assert!(matches!(err, Error::NotACheckpoint { .. }), "{err}");
    assert_eq!(common::entries(&hf), before, "untouched");
}

/// Loads, verifies and inspects `path`; all three must fail, and `check` must hold for each.
fn assert_refused(path: &Path, what: &str, check: impl Fn(&Error) -> bool) -> String {
    let config = small_config(EngineKind::Uring);
    let errors = [
        load(&config, path).err(),
        inspect::verify(&config, path, |_, _| {}).err(),
        inspect::inspect(&config, path).err(),
    ];
    let mut message = String::new();
    for (i, err) in errors.into_iter().enumerate() {
        let err = err.unwrap_or_else(|| panic!("{what}: call {i} accepted it"));
        assert!(check(&err), "{what}: call {i} gave {err:?}");
        message = err.to_string();
    }
    message
}

fn corrupt_saying<'a>(words: &'a [&'a str]) -> impl Fn(&Error) -> bool + 'a {
    move |e| matches!(e, Error::Corrupt { reason, .. } if words.iter().all(|w| reason.contains(w)))
}

#[test]
fn links_inside_are_refused_with_the_hugging_face_cache_explained() {
    let dir = scratch();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).expect("mkdir");
    write(&outside.join("secret.safetensors"), &[t("s", Dtype::U8, &[8], 1)], &[]);

    // A directory of shards, one of them a link.
    let ck = dir.path().join("linked");
    fs::create_dir(&ck).expect("mkdir");
    write(&ck.join("a.safetensors"), &[t("a", Dtype::U8, &[8], 2)], &[]);
    symlink(outside.join("secret.safetensors"), ck.join("b.safetensors")).expect("symlink");
    let msg = assert_refused(
        &ck,
        "linked shard",
        corrupt_saying(&["b.safetensors", "symbolic link", "snapshot_download"]),
    );
    assert!(msg.contains("../../blobs"), "{msg}");

    // A Hugging Face cache snapshot: the index and the shards link into ../../blobs.
    let repo = dir.path().join("models--org--name");
    let (blobs, snapshot) = (repo.join("blobs"), repo.join("snapshots/0123abcd"));
    fs::create_dir_all(&blobs).expect("mkdir");
    fs::create_dir_all(&snapshot).expect("mkdir");
    let tensors = [t("w", Dtype::F32, &[10], 3)];
    write(&blobs.join("aaaa"), &tensors, &[]);
    fs::write(blobs.join("bbbb"), br#"{"weight_map": {"w": "model-00001-of-00001.safetensors"}}"#)
        .expect("write");
    symlink("../../blobs/aaaa", snapshot.join("model-00001-of-00001.safetensors")).expect("symlink");
    symlink("../../blobs/bbbb", snapshot.join("model.safetensors.index.json")).expect("symlink");
    assert_refused(
        &snapshot,
        "cache snapshot",
        corrupt_saying(&["model.safetensors.index.json", "symbolic link", "local_dir"]),
    );
    // The index file given as the path is followed, but its shards are still links.
    assert_refused(
        &snapshot.join("model.safetensors.index.json"),
        "index given as the path",
        corrupt_saying(&["model-00001-of-00001.safetensors", "symbolic link"]),
    );
    // A linked file given itself as the path is the caller's choice: it loads.
    let config = small_config(EngineKind::Uring);
    let loaded =
        load(&config, &snapshot.join("model-00001-of-00001.safetensors")).expect("the linked file itself");
    assert_loaded(&loaded, &tensors, "linked file as path");
}

fn index_dir(root: &Path, name: &str, index: &serde_json::Value, files: &[(&str, &[T])]) -> PathBuf {
    let ck = root.join(name);
    fs::create_dir(&ck).expect("mkdir");
    for (file, tensors) in files {
        write(&ck.join(file), tensors, &[]);
    }
    fs::write(ck.join("model.safetensors.index.json"), serde_json::to_vec(index).expect("json"))
        .expect("index");
    ck
}

#[test]
fn an_index_that_disagrees_with_its_files_is_refused_naming_tensor_and_file() {
    let dir = scratch();
    let root = dir.path();
    let (a, b) = (t("a", Dtype::U8, &[16], 1), t("b", Dtype::F32, &[4], 2));
    let pair: &[T] = &[a.clone(), b.clone()];
    let only_a: &[T] = std::slice::from_ref(&a);
    let only_b: &[T] = std::slice::from_ref(&b);
    let map = |entries: &[(&str, &str)]| {
        let m: serde_json::Map<String, serde_json::Value> =
            entries.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v))).collect();
        serde_json::json!({ "weight_map": m })
    };

    // Outside the directory: the file there is never opened.
    write(&root.join("x.safetensors"), only_a, &[]);
    for (i, bad) in ["../x.safetensors", "a/b.safetensors", "/etc/passwd.safetensors", ".hidden.safetensors"]
        .into_iter()
        .enumerate()
    {
        let ck = index_dir(root, &format!("escape-{i}"), &map(&[("a", bad)]), &[]);
        let msg = assert_refused(
            &ck,
            bad,
            corrupt_saying(&["model.safetensors.index.json", "unsafe shard file name", bad]),
        );
        assert!(msg.contains(&ck.display().to_string()), "{msg}");
    }

    let ck = index_dir(
        root,
        "wrong-file",
        &map(&[("a", "one.safetensors"), ("b", "one.safetensors")]),
        &[("one.safetensors", only_a), ("two.safetensors", only_b)],
    );
    // b is not found in one.safetensors; two.safetensors is not in the index, never read.
    assert_refused(
        &ck,
        "mapped tensor missing",
        corrupt_saying(&["\"b\"", "one.safetensors", "does not hold it"]),
    );

    let ck = index_dir(
        root,
        "misplaced",
        &map(&[("a", "one.safetensors"), ("b", "one.safetensors"), ("c", "two.safetensors")]),
        &[("one.safetensors", only_a), ("two.safetensors", only_b)],
    );
    assert_refused(
        &ck,
        "tensor in the wrong file",
        corrupt_saying(&["\"b\"", "two.safetensors", "maps it to one.safetensors"]),
    );

    let ck = index_dir(root, "unmapped", &map(&[("a", "one.safetensors")]), &[("one.safetensors", pair)]);
    assert_refused(&ck, "unmapped tensor", corrupt_saying(&["one.safetensors", "\"b\"", "does not map"]));

    let ck = index_dir(
        root,
        "missing-file",
        &map(&[("a", "one.safetensors"), ("b", "gone.safetensors")]),
        &[("one.safetensors", only_a)],
    );
    let msg = assert_refused(&ck, "missing file", |e| e.raw_os_error() == Some(libc::ENOENT));
    assert!(msg.contains("gone.safetensors"), "{msg}");

    let mut sized = map(&[("a", "one.safetensors"), ("b", "one.safetensors")]);
    sized["metadata"] = serde_json::json!({"total_size": 31});
    let ck = index_dir(root, "total-size", &sized, &[("one.safetensors", pair)]);
    assert_refused(&ck, "wrong total_size", corrupt_saying(&["total_size of 31", "32"]));
    sized["metadata"] = serde_json::json!({"total_size": 32});
    fs::write(ck.join("model.safetensors.index.json"), serde_json::to_vec(&sized).expect("json"))
        .expect("index");
    load(&small_config(EngineKind::Uring), &ck).expect("the right total_size loads");

    let ck = index_dir(
        root,
        "duplicate",
        &map(&[("a", "one.safetensors"), ("b", "two.safetensors")]),
        &[("one.safetensors", pair), ("two.safetensors", only_b)],
    );
    assert_refused(
        &ck,
        "tensor in two mapped files",
        corrupt_saying(&["\"b\"", "in both one.safetensors and two.safetensors"]),
    );

    let ck = root.join("two-indexes");
    fs::create_dir(&ck).expect("mkdir");
    fs::write(ck.join("a.safetensors.index.json"), b"{}").expect("write");
    fs::write(ck.join("b.safetensors.index.json"), b"{}").expect("write");
    let msg = assert_refused(&ck, "two indexes", |e| matches!(e, Error::NotACheckpoint { .. }));
    assert!(msg.contains("a.safetensors.index.json, b.safetensors.index.json"), "{msg}");

    for (name, text) in [
        ("not-json", &b"{ nope"[..]),
        ("no-map", br#"{"metadata": {}}"#),
        ("dup-key", br#"{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}"#),
    ] {
        let ck = root.join(name);
        fs::create_dir(&ck).expect("mkdir");
        fs::write(ck.join("model.safetensors.index.json"), text).expect("write");
        assert_refused(&ck, name, corrupt_saying(&["model.safetensors.index.json"]));
    }

    // An index past the cap is refused from its size, before a byte of it is read.
    let ck = root.join("huge-index");
    fs::create_dir(&ck).expect("mkdir");
    let huge = fs::File::create(ck.join("model.safetensors.index.json")).expect("create");
    huge.set_len(MAX_INDEX_LEN + 1).expect("sparse file");
    assert_refused(
        &ck,
        "huge index",
        corrupt_saying(&["model.safetensors.index.json", "more than the 104857600 allowed"]),
    );
}

#[test]
fn broken_files_are_refused_naming_the_file() {
    let dir = scratch();
    let root = dir.path();
    let good = encode(&[t("a", Dtype::F32, &[100], 1), t("b", Dtype::U8, &[7], 2)], &[]);
    let format_of = |name: &'static str, pred: fn(&FormatError) -> bool| move |e: &Error| matches!(e, Error::Format { path, source } if path.ends_with(name) && pred(source));

    let ck = root.join("dup");
    fs::create_dir(&ck).expect("mkdir");
    write(&ck.join("a.safetensors"), &[t("w", Dtype::U8, &[3], 1)], &[]);
    write(&ck.join("b.safetensors"), &[t("w", Dtype::U8, &[3], 2)], &[]);
    assert_refused(
        &ck,
        "duplicate across shards",
        corrupt_saying(&["\"w\"", "in both a.safetensors and b.safetensors"]),
    );

    let truncated = root.join("truncated.safetensors");
    fs::write(&truncated, &good[..good.len() - 5]).expect("write");
    assert_refused(
        &truncated,
        "truncated",
        format_of("truncated.safetensors", |f| matches!(f, FormatError::OutOfRange { .. })),
    );

    let trailing = root.join("trailing.safetensors");
    fs::write(&trailing, [&good[..], b"extra"].concat()).expect("write");
    assert_refused(
        &trailing,
        "trailing bytes",
        format_of("trailing.safetensors", |f| matches!(f, FormatError::FileLength { .. })),
    );

    let past_end = root.join("past.safetensors");
    let mut bytes_of = good.clone();
    bytes_of[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
    fs::write(&past_end, &bytes_of).expect("write");
    assert_refused(
        &past_end,
        "header past the end",
        format_of("past.safetensors", |f| matches!(f, FormatError::HeaderBeyondFile { .. })),
    );

    let huge_len = root.join("huge.safetensors");
    let mut bytes_of = good.clone();
    bytes_of[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    fs::write(&huge_len, &bytes_of).expect("write");
    assert_refused(
        &huge_len,
        "absurd header length",
        format_of("huge.safetensors", |f| matches!(f, FormatError::HeaderTooLarge { .. })),
    );

    let tiny = root.join("tiny.safetensors");
    fs::write(&tiny, b"abc").expect("write");
    assert_refused(
        &tiny,
        "three bytes",
        format_of("tiny.safetensors", |f| matches!(f, FormatError::PrefixTooShort { .. })),
    );

    // A shard directory with one broken file among good ones names that file.
    let ck = root.join("one-bad");
    fs::create_dir(&ck).expect("mkdir");
    fs::write(ck.join("a.safetensors"), &good).expect("write");
    fs::write(ck.join("b.safetensors"), &good[..20]).expect("write");
    assert_refused(&ck, "one broken shard", format_of("b.safetensors", |_| true));

    // A shard name that cannot be opened by name is refused, not skipped...
    let ck = root.join("odd-name");
    fs::create_dir(&ck).expect("mkdir");
    fs::write(ck.join("a.safetensors"), &good).expect("write");
    let odd = std::ffi::OsStr::from_bytes(b"b\xff.safetensors");
    fs::write(ck.join(odd), &good).expect("write");
    assert_refused(&ck, "non-UTF-8 shard name", corrupt_saying(&["not a plain UTF-8 file name"]));
    // ... unless the index decides what is read.
    let index = serde_json::json!({"weight_map": {"a": "a.safetensors", "b": "a.safetensors"}});
    fs::write(ck.join("model.safetensors.index.json"), serde_json::to_vec(&index).expect("json"))
        .expect("index");
    load(&small_config(EngineKind::Buffered), &ck).expect("the index names a.safetensors only");

    // Nothing to read: said so.
    let empty = root.join("empty");
    fs::create_dir(&empty).expect("mkdir");
    fs::write(empty.join("notes.txt"), b"hi").expect("write");
    let msg = assert_refused(&empty, "no safetensors", |e| matches!(e, Error::NotACheckpoint { .. }));
    assert!(msg.contains("manifest.json") && msg.contains("*.safetensors"), "{msg}");
    let missing = root.join("missing.safetensors");
    assert_refused(&missing, "missing", |e| e.raw_os_error() == Some(libc::ENOENT));
}

#[test]
fn the_cli_reads_foreign_checkpoints_and_says_which_kind() {
    let dir = scratch();
    let (hf, all) = hugging_face_dir(dir.path());
    let single = dir.path().join("single.safetensors");
    write(&single, &all[..3], &[]);
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_uring-ckpt"))
            .args(args)
            .env_remove("URING_CKPT_CONFIG")
            .env_remove("URING_CKPT_ENGINE")
            .output()
            .expect("run uring-ckpt");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    let hf_arg = hf.to_str().expect("utf8");
    let out = run(&["inspect", hf_arg]);
    assert!(
        out.contains("kind: Hugging Face index (2 shards)")
            && out.contains("model-00002-of-00002.safetensors"),
        "{out}"
    );
    let out = run(&["verify", hf_arg]);
    assert!(
        out.starts_with("ok: 0 tensors in 2 shards")
            && out.contains(&format!("{} more without a stored CRC", all.len())),
        "{out}"
    );
    assert!(out.contains("Hugging Face index (2 shards)"), "{out}");
    let out = run(&["load", hf_arg]);
    assert!(
        out.contains("kind         Hugging Face index (2 shards)")
            && out.contains(&format!("tensors      {}", all.len())),
        "{out}"
    );
    let json = run(&["inspect", "--json", single.to_str().expect("utf8")]);
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(parsed["kind"], "safetensors_file");
    assert_eq!(parsed["tensors"].as_array().map(Vec::len), Some(3));
    let out = run(&["load", single.to_str().expect("utf8"), "--names", &all[1].name]);
    assert!(out.contains("kind         safetensors file") && out.contains("tensors      1"), "{out}");
}
