//! Extra (non-tensor) files: written before the manifest, listed in it with size and CRC-32,
//! returned by a load, checked by a load and by `verify`, names validated, and manifests
//! without the field still parse.

use crate::common;

use std::fs;

use common::{bytes, ckpt, scratch, small_config, ENGINES};
use uring_ckpt::format::{Dtype, Manifest, MANIFEST_FILE};
use uring_ckpt::inspect::{inspect, verify};
use uring_ckpt::{Checkpoint, CheckpointIO, Error, LoadOptions, UringCheckpointIO};

#[test]
fn extra_files_round_trip_on_every_engine() {
    let dir = scratch();
    let weights = bytes(1, 10_000);
    let pickled = bytes(2, 1234);
    for engine in ENGINES {
        let config = small_config(engine);
        let io = UringCheckpointIO::new(config.clone()).expect("config");
        let mut ck = Checkpoint::new();
        ck.hf_index = false; // only the caller's extra files (the index is one more otherwise)
        ck.add("w", Dtype::U8, &[10_000], &weights).expect("tensor");
        ck.add_extra_file("extras.pkl", &pickled).expect("extra");
        ck.add_extra_file("empty", &[]).expect("empty extra");
        let path = ckpt(dir.path(), &format!("c-{}", engine.as_str()));
        io.save_checkpoint(&ck, &path).expect("save");

        let manifest = Manifest::parse(&fs::read(path.join(MANIFEST_FILE)).expect("read")).expect("parse");
        assert_eq!(manifest.extra_files.len(), 2);
        assert_eq!(manifest.extra_files[0].file, "extras.pkl");
        assert_eq!(manifest.extra_files[0].size, 1234);
        assert_eq!(manifest.extra_files[0].crc32, crc32fast::hash(&pickled));
        assert_eq!(fs::read(path.join("extras.pkl")).expect("read"), pickled);

        let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
        assert_eq!(loaded.extra_file("extras.pkl").map(|b| &b[..]), Some(&pickled[..]));
        assert_eq!(loaded.extra_file("empty").map(|b| b.len()), Some(0));
        // A load of some tensors still returns the extra files.
        let some = LoadOptions { names: Some(vec!["w".into()]), verify: Some(true), ..Default::default() };
        assert_eq!(io.load_checkpoint(&path, &some).expect("load").extra_files.len(), 2);

        let report = verify(&config, &path, |_, _| {}).expect("verify");
        assert_eq!(report.extra_files, 2);
        let info = inspect(&config, &path).expect("inspect");
        assert_eq!(info.manifest.extra_files.len(), 2);
    }
}

#[test]
fn a_checkpoint_without_extra_files_has_no_field_in_its_manifest() {
    let dir = scratch();
    let io = UringCheckpointIO::new(small_config(ENGINES[2])).expect("config");
    let data = bytes(3, 100);
    let mut ck = Checkpoint::new();
    ck.hf_index = false; // the Hugging Face index would be an extra file
    ck.add("t", Dtype::U8, &[100], &data).expect("tensor");
    let path = ckpt(dir.path(), "plain");
    io.save_checkpoint(&ck, &path).expect("save");
    let text = fs::read_to_string(path.join(MANIFEST_FILE)).expect("read");
    assert!(!text.contains("extra_files"), "{text}");
    assert!(io.load_checkpoint(&path, &LoadOptions::default()).expect("load").extra_files.is_empty());
}

#[test]
fn corrupt_or_missing_extra_files_are_refused() {
    let dir = scratch();
    let config = small_config(ENGINES[2]);
    let io = UringCheckpointIO::new(config.clone()).expect("config");
    let pickled = bytes(4, 300);
    let mut ck = Checkpoint::new();
    ck.add_extra_file("extras.pkl", &pickled).expect("extra");
    let path = ckpt(dir.path(), "c");
    io.save_checkpoint(&ck, &path).expect("save");

    // One flipped byte: same size, wrong CRC.
    let mut bad = pickled.clone();
    bad[7] ^= 0xff;
    fs::write(path.join("extras.pkl"), &bad).expect("write");
    let err = io.load_checkpoint(&path, &LoadOptions::default()).expect_err("corrupt");
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("extras.pkl"), "{err}");
    assert!(matches!(verify(&config, &path, |_, _| {}), Err(Error::Corrupt { .. })));

    // Truncated.
    fs::write(path.join("extras.pkl"), &pickled[..10]).expect("write");
    assert!(matches!(io.load_checkpoint(&path, &LoadOptions::default()), Err(Error::Corrupt { .. })));

    // Missing.
    fs::remove_file(path.join("extras.pkl")).expect("remove");
    let err = io.load_checkpoint(&path, &LoadOptions::default()).expect_err("missing");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
}

#[test]
fn unsafe_or_duplicate_names_are_refused() {
    let data = [1u8, 2, 3];
    for bad in ["", ".hidden", "..", "a/b", "../x", "x.safetensors", MANIFEST_FILE, "a\0b"] {
        let mut ck = Checkpoint::new();
        assert!(
            matches!(ck.add_extra_file(bad, &data), Err(Error::InvalidCheckpoint(_))),
            "{bad:?} accepted"
        );
    }
    let mut ck = Checkpoint::new();
    ck.add_extra_file("a", &data).expect("first");
    assert!(matches!(ck.add_extra_file("a", &data), Err(Error::InvalidCheckpoint(_))));

    // Built by hand, caught by validate() before anything is written.
    let dir = scratch();
    let io = UringCheckpointIO::new(small_config(ENGINES[2])).expect("config");
    let mut ck = Checkpoint::new();
    ck.extra_files.push(("../escape".into(), &data));
    let path = ckpt(dir.path(), "c");
    assert!(matches!(io.save_checkpoint(&ck, &path), Err(Error::InvalidCheckpoint(_))));
    assert!(!path.exists());
    assert!(!dir.path().join("escape").exists());
}

#[test]
fn async_saves_carry_extra_files_in_both_modes() {
    use uring_ckpt::background::{AsyncCheckpointIO, OwnedCheckpoint};
    use uring_ckpt::config::AsyncMode;

    let dir = scratch();
    for mode in [AsyncMode::Stream, AsyncMode::Snapshot] {
        let mut config = small_config(ENGINES[0]);
        config.async_mode = mode;
        let io = AsyncCheckpointIO::from_config(config).expect("config");
        let mut ck = OwnedCheckpoint::new();
        ck.add_bytes("w", Dtype::U8, &[5000], bytes(5, 5000)).expect("tensor");
        ck.add_extra_file("extras.pkl", bytes(6, 77)).expect("extra");
        assert!(ck.add_extra_file("extras.pkl", vec![1u8]).is_err(), "duplicate accepted");
        let path = ckpt(dir.path(), &format!("{mode:?}"));
        io.save_checkpoint(ck, &path).expect("start").wait().expect("durable");
        let loaded = io.load_checkpoint(&path, &LoadOptions::default()).expect("load");
        assert_eq!(loaded.extra_file("extras.pkl").map(|b| b.to_vec()), Some(bytes(6, 77)));
        io.teardown().expect("teardown");
    }
}
