//! Hostile input to the loader: a valid checkpoint, then one corruption per case on a copy,
//! loaded with `load_checkpoint` (CRCs on) and checked with `inspect::verify`. Every case
//! must end in the expected typed error; none may panic or load.
//!
//! Header cases rewrite the shard *and* fix the manifest's size, header length and header
//! CRC to match, so that the corruption gets past the manifest's checks and reaches the
//! header parser itself.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{bytes, scratch, small_config};
use serde_json::Value;
use uring_ckpt::config::{Config, EngineKind};
use uring_ckpt::format::{Dtype, FormatError, Manifest, MANIFEST_FILE};
use uring_ckpt::{inspect, Checkpoint, CheckpointIO, Error, LoadOptions, UringCheckpointIO};

const SHARD: &str = "shard-r00000-00000.safetensors";

type Check = Box<dyn Fn(&Error) -> bool>;
type Corrupt = Box<dyn Fn(&Path)>;
type Case = (&'static str, Corrupt, Check);

fn format_err(pred: fn(&FormatError) -> bool) -> Check {
    Box::new(move |e| matches!(e, Error::Format { source, .. } if pred(source)))
}

fn corrupt() -> Check {
    Box::new(|e| matches!(e, Error::Corrupt { .. }))
}

fn io_errno(errno: i32) -> Check {
    Box::new(move |e| e.raw_os_error() == Some(errno))
}

/// A valid one-shard checkpoint of three tensors: `a` (100 x U8), `b` (50 x F32), `c` (1000 x U8).
fn make_valid(dir: &Path, config: &Config) -> PathBuf {
    let (a, b, c) = (bytes(1, 100), bytes(2, 200), bytes(3, 1000));
    let mut ck = Checkpoint::new();
    ck.add("a", Dtype::U8, &[100], &a).expect("a");
    ck.add("b", Dtype::F32, &[50], &b).expect("b");
    ck.add("c", Dtype::U8, &[1000], &c).expect("c");
    let path = dir.join("valid");
    UringCheckpointIO::new(config.clone()).expect("config").save_checkpoint(&ck, &path).expect("save");
    path
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("list") {
        let e = e.expect("entry");
        fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

/// The shard's JSON header (spaces trimmed) and its data region.
fn split_shard(ck: &Path) -> (String, Vec<u8>) {
    let file = fs::read(ck.join(SHARD)).expect("read shard");
    let n = u64::from_le_bytes(file[..8].try_into().expect("8 bytes")) as usize;
    let json = String::from_utf8(file[8..8 + n].to_vec()).expect("utf8").trim_end().to_owned();
    (json, file[8 + n..].to_vec())
}

fn edit_manifest(ck: &Path, edit: impl FnOnce(&mut Value)) {
    let path = ck.join(MANIFEST_FILE);
    let mut v: Value = serde_json::from_slice(&fs::read(&path).expect("read")).expect("json");
    edit(&mut v);
    fs::write(&path, serde_json::to_vec_pretty(&v).expect("json")).expect("write");
}

/// Writes the shard as `len field`, `header`, `data`, and makes the manifest agree with it.
fn write_shard(ck: &Path, len_field: u64, header: &[u8], data: &[u8]) {
    let mut file = len_field.to_le_bytes().to_vec();
    file.extend_from_slice(header);
    let header_len = file.len() as u64;
    let header_crc = crc32fast::hash(&file);
    file.extend_from_slice(data);
    fs::write(ck.join(SHARD), &file).expect("write shard");
    edit_manifest(ck, |m| {
        let shard = &mut m["shards"][0];
        shard["size"] = Value::from(file.len() as u64);
        shard["header_len"] = Value::from(header_len);
        shard["header_crc32"] = Value::from(format!("{header_crc:08x}"));
    });
}

/// Rewrites the header JSON (as text) and fixes the manifest.
fn rewrite_header(ck: &Path, edit: impl FnOnce(String) -> String) {
    let (json, data) = split_shard(ck);
    let json = edit(json);
    write_shard(ck, json.len() as u64, json.as_bytes(), &data);
}

/// Rewrites the header as a JSON value and fixes the manifest.
fn rewrite_header_value(ck: &Path, edit: impl FnOnce(&mut Value)) {
    rewrite_header(ck, |json| {
        let mut v: Value = serde_json::from_str(&json).expect("header json");
        edit(&mut v);
        v.to_string()
    });
}

fn flip_bit(path: &Path, offset_from_end: Option<usize>, offset: usize) {
    let mut file = fs::read(path).expect("read");
    let at = match offset_from_end {
        Some(back) => file.len() - back,
        None => offset,
    };
    file[at] ^= 0x10;
    fs::write(path, file).expect("write");
}

fn cases() -> Vec<Case> {
    let mut v: Vec<Case> = Vec::new();
    let mut add = |name, corrupt: Corrupt, check| v.push((name, corrupt, check));

    // Shard files.
    add(
        "truncated shard",
        Box::new(|ck| {
            let f = fs::OpenOptions::new().write(true).open(ck.join(SHARD)).expect("open");
            let len = f.metadata().expect("meta").len();
            f.set_len(len - 100).expect("truncate");
        }),
        corrupt(),
    );
    add(
        "shard truncated to 4 bytes",
        Box::new(|ck| fs::write(ck.join(SHARD), b"abcd").expect("write")),
        corrupt(),
    );
    add("empty shard", Box::new(|ck| fs::write(ck.join(SHARD), b"").expect("write")), corrupt());
    add(
        "bit flip in the data of the last tensor",
        Box::new(|ck| flip_bit(&ck.join(SHARD), Some(10), 0)),
        Box::new(|e| {
            matches!(e, Error::Crc { tensor, path, .. } if tensor == "c" && path.ends_with(SHARD))
                && e.to_string().contains("\"c\"")
                && e.to_string().contains(SHARD)
        }),
    );
    add(
        "bit flip in the data of the first tensor",
        Box::new(|ck| {
            let info = &Manifest::parse(&fs::read(ck.join(MANIFEST_FILE)).expect("m")).expect("m").shards[0];
            flip_bit(&ck.join(SHARD), None, info.header_len as usize + 3);
        }),
        Box::new(|e| matches!(e, Error::Crc { tensor, .. } if tensor == "a")),
    );
    add("bit flip in the header", Box::new(|ck| flip_bit(&ck.join(SHARD), None, 20)), corrupt());
    add("bit flip in the header length", Box::new(|ck| flip_bit(&ck.join(SHARD), None, 1)), corrupt());
    add(
        "header length u64::MAX",
        Box::new(|ck| {
            let (json, data) = split_shard(ck);
            write_shard(ck, u64::MAX, json.as_bytes(), &data);
        }),
        format_err(|f| matches!(f, FormatError::HeaderTooLarge { .. })),
    );
    add(
        "header longer than the file",
        Box::new(|ck| {
            let (json, data) = split_shard(ck);
            write_shard(ck, (json.len() + data.len() + 1) as u64, json.as_bytes(), &data);
        }),
        format_err(|f| {
            matches!(f, FormatError::HeaderBeyondFile { .. } | FormatError::PrefixTooShort { .. })
        }),
    );
    add(
        "header length 0",
        Box::new(|ck| {
            let (json, data) = split_shard(ck);
            write_shard(ck, 0, json.as_bytes(), &data);
        }),
        format_err(|f| matches!(f, FormatError::HeaderTooShort { .. })),
    );
    add(
        "U+FFFD in a tensor name (weight map disagrees)",
        Box::new(|ck| rewrite_header(ck, |j| j.replacen("\"a\"", "\"\u{fffd}\"", 1))),
        corrupt_or_format(),
    );
    add(
        "invalid UTF-8 bytes in the header",
        Box::new(|ck| {
            let (json, data) = split_shard(ck);
            let mut raw = json.into_bytes();
            let at = raw.iter().position(|&b| b == b'a').expect("a");
            raw[at] = 0xff;
            write_shard(ck, raw.len() as u64, &raw, &data);
        }),
        format_err(|f| matches!(f, FormatError::NotUtf8 { .. })),
    );
    add(
        "header not starting with {",
        Box::new(|ck| rewrite_header(ck, |j| format!(" {j}"))),
        format_err(|f| *f == FormatError::NotJsonObject),
    );
    add(
        "header is a JSON array",
        Box::new(|ck| rewrite_header(ck, |j| format!("[{j}]"))),
        format_err(|f| *f == FormatError::NotJsonObject),
    );
    add(
        "garbage after the header object",
        Box::new(|ck| rewrite_header(ck, |j| format!("{j}x"))),
        format_err(|f| matches!(f, FormatError::Json(_))),
    );
    add(
        "duplicate tensor key",
        Box::new(|ck| {
            rewrite_header(ck, |j| {
                let v: Value = serde_json::from_str(&j).expect("json");
                let a = v["a"].to_string();
                format!("{},\"a\":{a}}}", &j[..j.len() - 1])
            })
        }),
        format_err(|f| *f == FormatError::DuplicateKey("a".into())),
    );
    add(
        "duplicate metadata key",
        Box::new(|ck| {
            rewrite_header(ck, |j| {
                j.replacen("\"__metadata__\":{", "\"__metadata__\":{\"k\":\"1\",\"k\":\"2\",", 1)
            })
        }),
        format_err(|f| *f == FormatError::DuplicateKey("k".into())),
    );
    add(
        "overlapping offsets",
        Box::new(|ck| rewrite_header_value(ck, |h| h["b"]["data_offsets"] = serde_json::json!([50, 250]))),
        format_err(|f| matches!(f, FormatError::NotContiguous { .. })),
    );
    add(
        "gap between tensors",
        Box::new(|ck| {
            rewrite_header_value(ck, |h| {
                h["b"]["data_offsets"] = serde_json::json!([104, 304]);
                h["c"]["data_offsets"] = serde_json::json!([304, 1304]);
            })
        }),
        format_err(|f| matches!(f, FormatError::NotContiguous { .. })),
    );
    add(
        "out-of-order offsets (c before b, same total)",
        Box::new(|ck| {
            rewrite_header_value(ck, |h| {
                h["c"]["data_offsets"] = serde_json::json!([100, 1100]);
                h["b"]["data_offsets"] = serde_json::json!([1100, 1300]);
            })
        }),
        // The layout is valid but the bytes are not where the CRCs say: caught by the CRC.
        Box::new(|e| matches!(e, Error::Crc { .. })),
    );
    add(
        "offsets begin after end",
        Box::new(|ck| rewrite_header_value(ck, |h| h["a"]["data_offsets"] = serde_json::json!([100, 0]))),
        format_err(|f| matches!(f, FormatError::BadOffsets { .. })),
    );
    add(
        "shape overflow",
        Box::new(|ck| {
            rewrite_header_value(ck, |h| h["a"]["shape"] = serde_json::json!([u64::MAX, u64::MAX]))
        }),
        format_err(|f| matches!(f, FormatError::ShapeOverflow { .. })),
    );
    add(
        "wrong byte count for the shape",
        Box::new(|ck| rewrite_header_value(ck, |h| h["b"]["shape"] = serde_json::json!([49]))),
        format_err(|f| matches!(f, FormatError::ByteCountMismatch { .. })),
    );
    add(
        "unknown dtype",
        Box::new(|ck| rewrite_header_value(ck, |h| h["a"]["dtype"] = Value::from("Q8"))),
        format_err(|f| matches!(f, FormatError::UnknownDtype { .. })),
    );
    add(
        "bad CRC text",
        Box::new(|ck| rewrite_header_value(ck, |h| h["__metadata__"]["crc32:a"] = Value::from("xyz"))),
        format_err(|f| matches!(f, FormatError::BadCrc { .. })),
    );
    add(
        "trailing bytes after the data (manifest fixed)",
        Box::new(|ck| {
            let (json, mut data) = split_shard(ck);
            data.extend_from_slice(b"trailing");
            write_shard(ck, json.len() as u64, json.as_bytes(), &data);
        }),
        format_err(|f| matches!(f, FormatError::FileLength { .. })),
    );
    add(
        "trailing bytes after the data",
        Box::new(|ck| {
            let mut f = fs::read(ck.join(SHARD)).expect("read");
            f.extend_from_slice(b"trailing");
            fs::write(ck.join(SHARD), f).expect("write");
        }),
        corrupt(),
    );
    add(
        "tensor renamed in the header (weight map disagrees)",
        Box::new(|ck| {
            rewrite_header(ck, |j| j.replacen("\"c\":", "\"z\":", 1).replacen("crc32:c\"", "crc32:z\"", 1))
        }),
        corrupt(),
    );

    // Manifests.
    // Without its manifest the directory reads as a plain safetensors directory
    // (tests/it/foreign.rs), whose stored CRCs are still checked.
    add(
        "manifest missing and a tensor byte flipped",
        Box::new(|ck| {
            fs::remove_file(ck.join(MANIFEST_FILE)).expect("rm");
            let mut file = fs::read(ck.join(SHARD)).expect("read");
            let last = file.len() - 1;
            file[last] ^= 0x40;
            fs::write(ck.join(SHARD), &file).expect("write");
        }),
        Box::new(|e| matches!(e, Error::Crc { tensor, .. } if tensor == "c")),
    );
    add(
        "manifest empty",
        Box::new(|ck| fs::write(ck.join(MANIFEST_FILE), b"").expect("write")),
        format_err(|f| matches!(f, FormatError::BadManifest(_))),
    );
    add(
        "manifest garbage",
        Box::new(|ck| fs::write(ck.join(MANIFEST_FILE), b"\x00\x01garbage{").expect("write")),
        format_err(|f| matches!(f, FormatError::Json(_) | FormatError::NotUtf8 { .. })),
    );
    add(
        "manifest not UTF-8",
        Box::new(|ck| fs::write(ck.join(MANIFEST_FILE), b"{\"format\": \"\xff\"}").expect("write")),
        format_err(|f| matches!(f, FormatError::NotUtf8 { .. })),
    );
    add(
        "manifest truncated",
        Box::new(|ck| {
            let m = fs::read(ck.join(MANIFEST_FILE)).expect("read");
            fs::write(ck.join(MANIFEST_FILE), &m[..m.len() / 2]).expect("write");
        }),
        format_err(|f| matches!(f, FormatError::Json(_))),
    );
    for (name, file) in [
        ("manifest with ../ in a shard name", "../valid/shard-r00000-00000.safetensors"),
        ("manifest with an absolute shard path", "/etc/shard.safetensors"),
        ("manifest with a hidden shard name", ".hidden.safetensors"),
    ] {
        add(
            name,
            Box::new(move |ck| {
                edit_manifest(ck, |m| {
                    m["shards"][0]["file"] = Value::from(file);
                    for (_, v) in m["weight_map"].as_object_mut().expect("map").iter_mut() {
                        *v = Value::from(file);
                    }
                })
            }),
            format_err(|f| matches!(f, FormatError::UnsafeShardName(_))),
        );
    }
    add(
        "manifest naming a missing shard",
        Box::new(|ck| fs::remove_file(ck.join(SHARD)).expect("rm")),
        io_errno(libc::ENOENT),
    );
    add(
        "manifest with a wrong shard size",
        Box::new(|ck| {
            edit_manifest(ck, |m| {
                m["shards"][0]["size"] = Value::from(m["shards"][0]["size"].as_u64().expect("size") + 4096)
            })
        }),
        corrupt(),
    );
    add(
        "manifest with a wrong header CRC",
        Box::new(|ck| edit_manifest(ck, |m| m["shards"][0]["header_crc32"] = Value::from("00000000"))),
        corrupt(),
    );
    add(
        "manifest weight_map naming an unlisted shard",
        Box::new(|ck| edit_manifest(ck, |m| m["weight_map"]["a"] = Value::from("other.safetensors"))),
        format_err(|f| {
            matches!(f, FormatError::UnknownShard { .. } | FormatError::TensorCountMismatch { .. })
        }),
    );
    add(
        "manifest of a newer version",
        Box::new(|ck| edit_manifest(ck, |m| m["version"] = Value::from(99))),
        format_err(|f| matches!(f, FormatError::UnsupportedVersion { .. })),
    );
    add(
        "shard replaced by a directory",
        Box::new(|ck| {
            fs::remove_file(ck.join(SHARD)).expect("rm");
            fs::create_dir(ck.join(SHARD)).expect("mkdir");
        }),
        Box::new(|e| matches!(e, Error::Corrupt { .. })),
    );
    add(
        "manifest replaced by a directory",
        Box::new(|ck| {
            fs::remove_file(ck.join(MANIFEST_FILE)).expect("rm");
            fs::create_dir(ck.join(MANIFEST_FILE)).expect("mkdir");
        }),
        Box::new(|e| matches!(e, Error::Corrupt { .. })),
    );
    v
}

fn corrupt_or_format() -> Check {
    Box::new(|e| matches!(e, Error::Corrupt { .. } | Error::Format { .. } | Error::Crc { .. }))
}

#[test]
fn every_hostile_input_ends_in_a_typed_error() {
    let dir = scratch();
    let mut tried = 0;
    for engine in [EngineKind::Uring, EngineKind::Buffered] {
        let config = small_config(engine);
        let valid = make_valid(dir.path(), &config);
        let io = UringCheckpointIO::new(config.clone()).expect("config");
        io.load_checkpoint(&valid, &LoadOptions::default()).expect("the valid checkpoint loads");
        for (i, (name, corrupt, check)) in cases().into_iter().enumerate() {
            let copy = dir.path().join(format!("case-{}-{i}", engine.as_str()));
            copy_dir(&valid, &copy);
            corrupt(&copy);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let load =
                    io.load_checkpoint(&copy, &LoadOptions { verify: Some(true), ..Default::default() });
                let mapped = io.load_checkpoint(
                    &copy,
                    &LoadOptions { verify: Some(true), map: true, ..Default::default() },
                );
                let verify = inspect::verify(&config, &copy, |_, _| {});
                (load.err(), mapped.err(), verify.err())
            }));
            let Ok((load, mapped, verify)) = outcome else {
                panic!("{name} ({engine}): the loader panicked")
            };
            let load = load.unwrap_or_else(|| panic!("{name} ({engine}): load_checkpoint accepted it"));
            let mapped = mapped.unwrap_or_else(|| panic!("{name} ({engine}): a mapped load accepted it"));
            let verify = verify.unwrap_or_else(|| panic!("{name} ({engine}): verify accepted it"));
            assert!(check(&load), "{name} ({engine}): load_checkpoint gave {load:?}");
            assert!(check(&mapped), "{name} ({engine}): a mapped load gave {mapped:?}");
            assert!(check(&verify), "{name} ({engine}): verify gave {verify:?}");
            tried += 1;
        }
        fs::remove_dir_all(&valid).expect("rm");
    }
    println!("hostile inputs tried: {tried}; each: typed error from load_checkpoint (read and mapped) and verify, no panic");
}

#[test]
fn temporary_directories_are_never_loaded() {
    let dir = scratch();
    let config = small_config(EngineKind::Uring);
    let valid = make_valid(dir.path(), &config);
    let tmp = dir.path().join(".valid.tmp-1-ab-0");
    copy_dir(&valid, &tmp);
    let io = UringCheckpointIO::new(config).expect("config");
    let err = io.load_checkpoint(&tmp, &LoadOptions::default()).expect_err("temp dir");
    assert!(matches!(err, Error::NotACheckpoint { .. }), "{err}");
    assert_eq!(uring_ckpt::retention::list_committed(dir.path()).expect("list"), vec![valid]);
}
