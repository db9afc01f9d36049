//! A corpus of named bad (and a few tricky good) headers and manifests, each with the exact
//! error it must produce.
//!
//! (Long because it is a table: one entry per case, each a few lines; splitting it would
//! only scatter the corpus.)

use std::collections::BTreeMap;

use serde_json::{json, Value};
use uring_ckpt::format::{
    encode_header, parse_header, Dtype, FormatError, Manifest, ShardInfo, ShardLayout, TensorSpec,
    MAX_HEADER_LEN,
};

/// A header prefix made of `n` = `json.len()` and the JSON, with the file length that a data
/// region of `data_len` bytes gives.
fn file(json: &str, data_len: u64) -> (Vec<u8>, u64) {
    let mut prefix = (json.len() as u64).to_le_bytes().to_vec();
    prefix.extend_from_slice(json.as_bytes());
    let file_len = prefix.len() as u64 + data_len;
    (prefix, file_len)
}

fn parse(json: &str, data_len: u64) -> Result<uring_ckpt::format::ParsedHeader, FormatError> {
    let (prefix, file_len) = file(json, data_len);
    parse_header(&prefix, file_len)
}

fn s(v: &str) -> String {
    v.to_owned()
}

const TWO_F32: &str = r#""dtype":"F32","shape":[2]"#;

#[test]
fn bad_headers() {
    type Case = (&'static str, Vec<u8>, u64, FormatError);
    let mut cases: Vec<Case> = Vec::new();
    let mut add = |name: &'static str, json: &str, data_len: u64, err: FormatError| {
        let (prefix, file_len) = file(json, data_len);
        cases.push((name, prefix, file_len, err));
    };

    add("control character in a key", "{\"a\u{1}\": 1}", 0, FormatError::Json(String::new()));
    add("leading space before the object", " {}", 0, FormatError::NotJsonObject);
    add("JSON array", r#"[{"a":1}]"#, 0, FormatError::NotJsonObject);
    add("JSON string", r#""{}""#, 0, FormatError::NotJsonObject);
    add("unterminated object", "{  ", 0, FormatError::Json(String::new()));
    add("garbage after the object", "{}x", 0, FormatError::Json(String::new()));
    add("two objects", "{}{}", 0, FormatError::Json(String::new()));
    add(
        "duplicate tensor keys",
        &format!(r#"{{"a":{{{TWO_F32},"data_offsets":[0,8]}},"a":{{{TWO_F32},"data_offsets":[8,16]}}}}"#),
        16,
        FormatError::DuplicateKey(s("a")),
    );
    add(
        "duplicate __metadata__",
        r#"{"__metadata__":{"x":"1"},"__metadata__":{"y":"2"}}"#,
        0,
        FormatError::DuplicateKey(s("__metadata__")),
    );
    add(
        "duplicate metadata key",
        r#"{"__metadata__":{"x":"1","x":"2"}}"#,
        0,
        FormatError::DuplicateKey(s("x")),
    );
    add(
        "unknown dtype",
        r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#,
        16,
        FormatError::UnknownDtype { tensor: s("a"), dtype: s("F128") },
    );
    add(
        "lowercase dtype",
        r#"{"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}"#,
        4,
        FormatError::UnknownDtype { tensor: s("a"), dtype: s("f32") },
    );
    add(
        "shape overflow",
        r#"{"a":{"dtype":"U8","shape":[18446744073709551615,18446744073709551615],"data_offsets":[0,0]}}"#,
        0,
        FormatError::ShapeOverflow { tensor: s("a") },
    );
    add(
        "bit count overflow",
        r#"{"a":{"dtype":"F64","shape":[18446744073709551615],"data_offsets":[0,0]}}"#,
        0,
        FormatError::ShapeOverflow { tensor: s("a") },
    );
    add(
        "odd number of F4",
        r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
        2,
        FormatError::PartialByte { tensor: s("a"), dtype: Dtype::F4, bits: 12 },
    );
    add(
        "wrong byte count",
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,7]}}"#,
        7,
        FormatError::ByteCountMismatch { tensor: s("a"), expected: 8, actual: 7 },
    );
    add(
        "overlapping offsets",
        &format!(r#"{{"a":{{{TWO_F32},"data_offsets":[0,8]}},"b":{{{TWO_F32},"data_offsets":[4,12]}}}}"#),
        12,
        FormatError::NotContiguous { tensor: s("b"), expected_start: 8, actual_start: 4 },
    );
    add(
        "same offsets twice",
        &format!(r#"{{"a":{{{TWO_F32},"data_offsets":[0,8]}},"b":{{{TWO_F32},"data_offsets":[0,8]}}}}"#),
        8,
        FormatError::NotContiguous { tensor: s("b"), expected_start: 8, actual_start: 0 },
    );
    add(
        "gap",
        &format!(r#"{{"a":{{{TWO_F32},"data_offsets":[0,8]}},"b":{{{TWO_F32},"data_offsets":[12,20]}}}}"#),
        20,
        FormatError::NotContiguous { tensor: s("b"), expected_start: 8, actual_start: 12 },
    );
    add(
        "not starting at 0",
        &format!(r#"{{"a":{{{TWO_F32},"data_offsets":[4,12]}}}}"#),
        12,
        FormatError::NotContiguous { tensor: s("a"), expected_start: 0, actual_start: 4 },
    );
    add(
        "begin > end",
        r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[8,0]}}"#,
        8,
        FormatError::BadOffsets { tensor: s("a"), begin: 8, end: 0 },
    );
    add(
        "out of range",
        r#"{"a":{"dtype":"U8","shape":[1099511627776],"data_offsets":[0,1099511627776]}}"#,
        16,
        FormatError::OutOfRange { tensor: s("a"), end: 1 << 40, data_len: 16 },
    );
    let one = format!(r#"{{"a":{{{TWO_F32},"data_offsets":[0,8]}}}}"#);
    let n = one.len() as u64;
    add(
        "trailing bytes (file longer than header + data)",
        &one,
        9,
        FormatError::FileLength { expected: 8 + n + 8, actual: 8 + n + 9 },
    );
    add(
        "truncated file",
        &format!(r#"{{"a":{{{TWO_F32},"data_offsets":[0,8]}}}}"#),
        7,
        FormatError::OutOfRange { tensor: s("a"), end: 8, data_len: 7 },
    );
    for (name, value) in [
        ("bad crc: not hex", "xyz"),
        ("bad crc: 7 digits", "0a1b2c3"),
        ("bad crc: 9 digits", "0a1b2c3d4"),
        ("bad crc: sign", "+a1b2c3d"),
        ("bad crc: prefix", "0x1b2c3d"),
        ("bad crc: spaces", " a1b2c3d"),
    ] {
        add(
            name,
            &format!(r#"{{"__metadata__":{{"crc32:a":"{value}"}},"a":{{{TWO_F32},"data_offsets":[0,8]}}}}"#),
            8,
            FormatError::BadCrc { tensor: s("a"), value: s(value) },
        );
    }
    add(
        "crc for unknown tensor",
        &format!(r#"{{"__metadata__":{{"crc32:b":"00000000"}},"a":{{{TWO_F32},"data_offsets":[0,8]}}}}"#),
        8,
        FormatError::CrcForUnknownTensor(s("b")),
    );
    add(
        "metadata value not a string",
        r#"{"__metadata__":{"k":1}}"#,
        0,
        FormatError::MetadataNotString { key: s("k") },
    );
    add(
        "metadata value an object",
        r#"{"__metadata__":{"k":{"x":"y"}}}"#,
        0,
        FormatError::MetadataNotString { key: s("k") },
    );
    add(
        "crc value not a string",
        r#"{"__metadata__":{"crc32:a":12345678}}"#,
        0,
        FormatError::MetadataNotString { key: s("crc32:a") },
    );
    add("metadata not an object", r#"{"__metadata__":["a","b"]}"#, 0, FormatError::MetadataNotObject);
    add("metadata a string", r#"{"__metadata__":"a"}"#, 0, FormatError::MetadataNotObject);
    add(
        "empty tensor name",
        r#"{"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        1,
        FormatError::EmptyName,
    );
    add(
        "unknown field in a tensor entry",
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}"#,
        1,
        FormatError::Json(String::new()),
    );
    add("missing data_offsets", r#"{"a":{"dtype":"U8","shape":[1]}}"#, 1, FormatError::Json(String::new()));
    add(
        "three data_offsets",
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
        1,
        FormatError::Json(String::new()),
    );
    add(
        "negative dimension",
        r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
        1,
        FormatError::Json(String::new()),
    );
    add(
        "fractional dimension",
        r#"{"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}"#,
        1,
        FormatError::Json(String::new()),
    );
    add(
        "dimension beyond u64",
        r#"{"a":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,1]}}"#,
        1,
        FormatError::Json(String::new()),
    );
    add("tensor entry not an object", r#"{"a":[1,2,3]}"#, 0, FormatError::Json(String::new()));

    // Cases built from raw bytes.
    let mut raw = |name: &'static str, prefix: Vec<u8>, file_len: u64, err: FormatError| {
        cases.push((name, prefix, file_len, err));
    };
    raw("too short (5 bytes)", vec![2, 0, 0, 0, 0], 100, FormatError::PrefixTooShort { len: 5, need: 8 });
    raw("empty buffer", Vec::new(), 0, FormatError::PrefixTooShort { len: 0, need: 8 });
    raw("header length 0", 0u64.to_le_bytes().to_vec(), 8, FormatError::HeaderTooShort { len: 0 });
    raw(
        "header length 1",
        [&1u64.to_le_bytes()[..], b"{"].concat(),
        9,
        FormatError::HeaderTooShort { len: 1 },
    );
    raw(
        "header length u64::MAX",
        u64::MAX.to_le_bytes().to_vec(),
        u64::MAX,
        FormatError::HeaderTooLarge { len: u64::MAX, max: MAX_HEADER_LEN },
    );
    raw(
        "header length just over the cap",
        (MAX_HEADER_LEN + 1).to_le_bytes().to_vec(),
        u64::MAX,
        FormatError::HeaderTooLarge { len: MAX_HEADER_LEN + 1, max: MAX_HEADER_LEN },
    );
    raw(
        "header longer than the file",
        [&100u64.to_le_bytes()[..], &[b' '; 100]].concat(),
        50,
        FormatError::HeaderBeyondFile { header_end: 108, file_len: 50 },
    );
    raw(
        "buffer shorter than the header",
        [&100u64.to_le_bytes()[..], b"{}"].concat(),
        1000,
        FormatError::PrefixTooShort { len: 10, need: 108 },
    );
    raw(
        "non-UTF-8 bytes",
        [&6u64.to_le_bytes()[..], b"{\"\xff\":}"].concat(),
        14,
        FormatError::NotUtf8 { valid_up_to: 2 },
    );
    raw(
        "truncated UTF-8 sequence",
        [&4u64.to_le_bytes()[..], b"{}\xe2\x82"].concat(),
        12,
        FormatError::NotUtf8 { valid_up_to: 2 },
    );

    let mut failures = Vec::new();
    for (name, prefix, file_len, expected) in &cases {
        let got = parse_header(prefix, *file_len);
        let ok = match (&got, expected) {
            // serde_json's message is not part of the contract; the variant is.
            (Err(FormatError::Json(_)), FormatError::Json(_)) => true,
            (Err(e), expected) => e == expected,
            (Ok(_), _) => false,
        };
        if !ok {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn tricky_but_valid_headers() {
    // Reversed order in the JSON is fine: entries are sorted by offset.
    let json =
        format!(r#"{{"b":{{{TWO_F32},"data_offsets":[8,16]}},"a":{{{TWO_F32},"data_offsets":[0,8]}}}}"#);
    let parsed = parse(&json, 16);
    let Ok(parsed) = parsed else { panic!("{parsed:?}") };
    let names: Vec<_> = parsed.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(parsed.crcs, [None, None], "a foreign file has no CRCs");
    assert_eq!(parsed.data_len, 16);
    assert_eq!(parsed.data_start, 8 + json.len() as u64);

    // Zero-size tensors may share an offset with each other and with their neighbour.
    let json = r#"{"z2":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"z1":{"dtype":"U8","shape":[3,0],"data_offsets":[4,4]},"e":{"dtype":"BOOL","shape":[0],"data_offsets":[0,0]}}"#;
    let parsed = parse(json, 4);
    let Ok(parsed) = parsed else { panic!("{parsed:?}") };
    let names: Vec<_> = parsed.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["e", "a", "z2", "z1"], "sorted by (begin, end), ties in header order");

    // Only zero-size tensors, no data at all.
    let parsed = parse(r#"{"e":{"dtype":"F16","shape":[0],"data_offsets":[0,0]}}"#, 0);
    assert!(parsed.is_ok(), "{parsed:?}");

    // Trailing whitespace after the object, null metadata, uppercase CRC digits, escapes.
    let json = "{\"__metadata__\":null,\"a\\u00e9\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}} \n\t\r ";
    let parsed = parse(json, 1);
    let Ok(parsed) = parsed else { panic!("{parsed:?}") };
    assert_eq!(parsed.tensors[0].name, "aé");
    assert!(parsed.metadata.is_empty());
    let json = r#"{"__metadata__":{"crc32:a":"DEADBEEF","note":"x"},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    let parsed = parse(json, 1);
    let Ok(parsed) = parsed else { panic!("{parsed:?}") };
    assert_eq!(parsed.crcs, [Some(0xdead_beef)]);
    assert_eq!(parsed.metadata, BTreeMap::from([(s("note"), s("x"))]));

    // Bytes after the header in the buffer are ignored.
    let (mut prefix, file_len) = file(r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#, 2);
    prefix.extend_from_slice(b"\xff\xff");
    assert!(parse_header(&prefix, file_len).is_ok());
}

#[test]
fn encoded_headers_match_upstream_expectations() {
    let specs = vec![
        TensorSpec { name: s("w"), dtype: Dtype::BF16, shape: vec![3, 5] },
        TensorSpec { name: s("b"), dtype: Dtype::F32, shape: vec![5] },
    ];
    let Ok(layout) = ShardLayout::new(specs) else { panic!() };
    let meta = BTreeMap::from([(s("step"), s("7"))]);
    let Ok(prefix) = encode_header(&layout, Some(&[1, 0xffff_ffff]), &meta, 512) else { panic!() };
    assert_eq!(prefix.len(), 4096);
    let n = u64::from_le_bytes(prefix[..8].try_into().unwrap_or_default());
    assert_eq!(n, 4088);
    // What a plain JSON reader (upstream safetensors uses serde_json too) sees.
    let text = std::str::from_utf8(&prefix[8..]).unwrap_or_default();
    assert!(text.starts_with('{'));
    let v: Value = serde_json::from_str(text).unwrap_or_default();
    assert_eq!(
        v,
        json!({
            "__metadata__": {"step": "7", "crc32:w": "00000001", "crc32:b": "ffffffff"},
            "w": {"dtype": "BF16", "shape": [3, 5], "data_offsets": [0, 30]},
            "b": {"dtype": "F32", "shape": [5], "data_offsets": [30, 50]},
        })
    );
}

// ----- manifests -----

fn good_manifest() -> Value {
    json!({
        "format": "uring-ckpt",
        "version": 1,
        "shards": [
            {"file": "model-00001-of-00002.safetensors", "size": 4196, "header_len": 4096,
             "header_crc32": "0a1b2c3d", "tensor_count": 1},
            {"file": "model-00002-of-00002.safetensors", "size": 4100, "header_len": 4096,
             "header_crc32": "ffffffff", "tensor_count": 1},
        ],
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
        "total_size": 104,
        "metadata": {"step": "10"},
    })
}

fn with(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = good_manifest();
    edit(&mut v);
    serde_json::to_vec(&v).unwrap_or_default()
}

fn shard_name(name: &str) -> Vec<u8> {
    let name = name.to_owned();
    with(move |v| {
        v["shards"][0]["file"] = json!(name.clone());
        v["weight_map"]["a"] = json!(name);
    })
}

#[test]
fn good_manifest_parses() {
    let bytes = with(|_| {});
    let parsed = Manifest::parse(&bytes);
    let Ok(m) = parsed else { panic!("{parsed:?}") };
    assert_eq!(m.shards[0].header_crc32, 0x0a1b_2c3d);
    assert_eq!(m.total_size, 104);
    assert_eq!(Manifest::parse(&m.to_json()), Ok(m.clone()));
    let rebuilt = Manifest::new(m.shards.clone(), m.weight_map.clone(), m.total_size, m.metadata.clone());
    assert_eq!(rebuilt, m);
}

#[test]
fn bad_manifests() {
    let json_err = FormatError::Json(String::new());
    let cases: Vec<(&str, Vec<u8>, FormatError)> = vec![
        ("empty", Vec::new(), FormatError::BadManifest(String::new())),
        ("whitespace only", b" \n".to_vec(), FormatError::BadManifest(String::new())),
        ("garbage", b"\x00garbage{".to_vec(), json_err.clone()),
        ("not UTF-8", b"{\"format\":\"\xff\"}".to_vec(), FormatError::NotUtf8 { valid_up_to: 11 }),
        ("JSON array", b"[]".to_vec(), json_err.clone()),
        ("truncated", with(|_| {})[..40].to_vec(), json_err.clone()),
        (
            "wrong format",
            with(|v| v["format"] = json!("safetensors-index")),
            FormatError::WrongFormat(s("safetensors-index")),
        ),
        (
            "format not a string",
            with(|v| v["format"] = json!(1)),
            FormatError::WrongFormat(s("1")),
        ),
        (
            "no format",
            with(|v| {
                if let Some(o) = v.as_object_mut() {
                    o.remove("format");
                }
            }),
            FormatError::BadManifest(String::new()),
        ),
        (
            "version 2",
            with(|v| v["version"] = json!(2)),
            FormatError::UnsupportedVersion { found: 2, supported: 1 },
        ),
        (
            "version 2 with fields this build does not know",
            with(|v| {
                v["version"] = json!(2);
                v["new_field"] = json!(true);
            }),
            FormatError::UnsupportedVersion { found: 2, supported: 1 },
        ),
        (
            "version as a string",
            with(|v| v["version"] = json!("1")),
            FormatError::BadManifest(String::new()),
        ),
        ("../x.safetensors", shard_name("../x.safetensors"), FormatError::UnsafeShardName(s("../x.safetensors"))),
        ("/abs.safetensors", shard_name("/abs.safetensors"), FormatError::UnsafeShardName(s("/abs.safetensors"))),
        ("a/b.safetensors", shard_name("a/b.safetensors"), FormatError::UnsafeShardName(s("a/b.safetensors"))),
        ("a\\b.safetensors", shard_name("a\\b.safetensors"), FormatError::UnsafeShardName(s("a\\b.safetensors"))),
        (
            ".hidden.safetensors",
            shard_name(".hidden.safetensors"),
            FormatError::UnsafeShardName(s(".hidden.safetensors")),
        ),
        ("..", shard_name(".."), FormatError::UnsafeShardName(s(".."))),
        ("empty shard name", shard_name(""), FormatError::UnsafeShardName(s(""))),
        ("NUL in shard name", shard_name("a\0.safetensors"), FormatError::UnsafeShardName(s("a\0.safetensors"))),
        ("not .safetensors", shard_name("model.bin"), FormatError::UnsafeShardName(s("model.bin"))),
        (
            "duplicated shard",
            with(|v| {
                v["shards"][1]["file"] = json!("model-00001-of-00002.safetensors");
                v["weight_map"]["b"] = json!("model-00001-of-00002.safetensors");
            }),
            FormatError::DuplicateShard(s("model-00001-of-00002.safetensors")),
        ),
        (
            "weight_map naming a missing shard",
            with(|v| v["weight_map"]["b"] = json!("model-00003-of-00002.safetensors")),
            FormatError::UnknownShard { tensor: s("b"), file: s("model-00003-of-00002.safetensors") },
        ),
        (
            "tensor_count too high",
            with(|v| v["shards"][0]["tensor_count"] = json!(2)),
            FormatError::TensorCountMismatch {
                file: s("model-00001-of-00002.safetensors"),
                expected: 2,
                actual: 1,
            },
        ),
        (
            "header_len > size",
            with(|v| v["shards"][1]["header_len"] = json!(5000)),
            FormatError::BadManifest(String::new()),
        ),
        (
            "total_size beyond the shards' data",
            with(|v| v["total_size"] = json!(105)),
            FormatError::BadManifest(String::new()),
        ),
        ("unknown top-level field", with(|v| v["extra"] = json!(1)), json_err.clone()),
        ("unknown shard field", with(|v| v["shards"][0]["extra"] = json!(1)), json_err.clone()),
        (
            "missing field",
            with(|v| {
                if let Some(o) = v.as_object_mut() {
                    o.remove("total_size");
                }
            }),
            json_err.clone(),
        ),
        ("header_crc32 as a number", with(|v| v["shards"][0]["header_crc32"] = json!(5)), json_err.clone()),
        ("header_crc32 7 digits", with(|v| v["shards"][0]["header_crc32"] = json!("0a1b2c3")), json_err.clone()),
        ("metadata value not a string", with(|v| v["metadata"]["step"] = json!(10)), json_err.clone()),
        ("negative size", with(|v| v["shards"][0]["size"] = json!(-1)), json_err.clone()),
        (
            "duplicate weight_map key",
            br#"{"format":"uring-ckpt","version":1,"shards":[{"file":"a.safetensors","size":10,"header_len":10,"header_crc32":"00000000","tensor_count":1}],"weight_map":{"t":"a.safetensors","t":"a.safetensors"},"total_size":0,"metadata":{}}"#.to_vec(),
            json_err.clone(),
        ),
        (
            "duplicate top-level field",
            br#"{"format":"uring-ckpt","format":"uring-ckpt","version":1}"#.to_vec(),
            json_err.clone(),
        ),
    ];

    let mut failures = Vec::new();
    for (name, bytes, expected) in &cases {
        let got = Manifest::parse(bytes);
        let ok = match (&got, expected) {
            (Err(FormatError::Json(_)), FormatError::Json(_)) => true,
            (Err(FormatError::BadManifest(_)), FormatError::BadManifest(_)) => true,
            (Err(e), expected) => e == expected,
            (Ok(_), _) => false,
        };
        if !ok {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn manifest_with_no_shards_is_valid() {
    let m = Manifest::new(Vec::new(), BTreeMap::new(), 0, BTreeMap::new());
    assert_eq!(Manifest::parse(&m.to_json()), Ok(m));
    let shard =
        ShardInfo { file: s("a.safetensors"), size: 10, header_len: 10, header_crc32: 0, tensor_count: 0 };
    let m = Manifest::new(vec![shard], BTreeMap::new(), 0, BTreeMap::new());
    assert_eq!(Manifest::parse(&m.to_json()), Ok(m));
}
