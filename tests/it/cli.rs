//! The `uring-ckpt` binary end to end: save, inspect, verify, load, corruption, replace,
//! a short benchmark on each engine, and tune.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_uring-ckpt");

/// A fresh scratch directory on the build's file system (a real disk, for O_DIRECT).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Runs the binary in `cwd` with no configuration from the environment.
fn run(cwd: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env_remove("URING_CKPT_CONFIG")
        .env_remove("URING_CKPT_ENGINE")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run uring-ckpt")
}

fn text(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_ok(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_fails(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("error: "), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
    stderr
}

#[test]
fn save_inspect_verify_load_then_corrupt() {
    let dir = scratch("roundtrip");
    let out = assert_ok(&run(&dir, &["save", "--synthetic", "3MiB", "--out", "ck"]));
    assert!(out.contains("saved ck") && out.contains("MiB/s") && out.contains("p99.9"), "{out}");

    let listing = assert_ok(&run(&dir, &["inspect", "ck"]));
    assert!(listing.contains("blocks.0.odd.weight") && listing.contains("[1000, 1003]"), "{listing}");
    assert!(listing.contains("shard-r00000-00000.safetensors"), "{listing}");
    let json = assert_ok(&run(&dir, &["inspect", "ck", "--json"]));
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("inspect --json is JSON");
    assert!(parsed["tensors"].as_array().is_some_and(|t| t.len() > 5), "{json}");

    let verified = assert_ok(&run(&dir, &["verify", "ck"]));
    assert!(verified.starts_with("ok: "), "{verified}");
    let loaded = assert_ok(&run(&dir, &["load", "ck"]));
    assert!(loaded.contains("MiB/s"), "{loaded}");
    assert_ok(&run(&dir, &["load", "ck", "--names", "embed.weight,blocks.0.v4097", "--no-verify"]));

    // Flip one byte inside the first large tensor's bytes (the data region starts at 4096).
    let shard = dir.join("ck/shard-r00000-00000.safetensors");
    let mut bytes = fs::read(&shard).expect("read shard");
    let at = 4096 + 1000;
    bytes[at] ^= 0x40;
    fs::write(&shard, &bytes).expect("write shard");
    let err = assert_fails(&run(&dir, &["verify", "ck"]));
    assert!(err.contains("CRC mismatch for tensor \"embed.weight\""), "{err}");
    assert!(err.contains("shard-r00000-00000.safetensors"), "{err}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn existing_output_needs_replace_and_bad_input_is_a_clean_error() {
    let dir = scratch("replace");
    assert_ok(&run(&dir, &["save", "--synthetic", "64KiB", "--layout", "gpt2", "--out", "ck"]));
    let err = assert_fails(&run(&dir, &["save", "--synthetic", "64KiB", "--out", "ck"]));
    assert!(err.contains("already exists") && err.contains("--replace"), "{err}");
    let json = assert_ok(&run(
        &dir,
        &[
            "save",
            "--synthetic",
            "64KiB",
            "--layout",
            "llama",
            "--dtype",
            "f32",
            "--out",
            "ck",
            "--replace",
            "--json",
        ],
    ));
    let report: serde_json::Value = serde_json::from_str(&json).expect("save --json is JSON");
    assert!(report["throughput_mib_s"].as_f64().is_some_and(|v| v > 0.0), "{json}");

    let err = assert_fails(&run(&dir, &["save", "--synthetic", "12 parsecs", "--out", "x"]));
    assert!(err.contains("--synthetic") && err.contains("unknown unit"), "{err}");
    let err = assert_fails(&run(&dir, &["verify", "missing-dir"]));
    assert!(err.contains("missing-dir"), "{err}");
    fs::create_dir(dir.join("empty")).expect("mkdir");
    let err = assert_fails(&run(&dir, &["inspect", "empty"]));
    assert!(err.contains("not a valid checkpoint"), "{err}");
    assert_fails(&run(&dir, &["bench", "--size", "lots"]));
    assert_eq!(run(&dir, &["save", "--no-such-flag"]).status.code(), Some(2));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn bench_on_each_engine_writes_json_and_cleans_up() {
    for engine in ["uring", "pwrite", "buffered"] {
        let dir = scratch(&format!("bench-{engine}"));
        let json = dir.join("bench.json");
        let out = run(
            &dir,
            &["bench", "--size", "8MiB", "--repeat", "1", "--engine", engine, "--json", "bench.json"],
        );
        let table = assert_ok(&out);
        assert!(table.contains("machine:") && table.contains("p99.9 us"), "{table}");
        let doc: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&json).expect("json written")).expect("valid JSON");
        let results = doc["results"].as_array().expect("results");
        for phase in ["save", "load"] {
            let row = results.iter().find(|r| r["phase"] == phase).unwrap_or_else(|| panic!("{phase} row"));
            assert_eq!(row["engine"], engine);
            assert!(row["mib_s_median"].as_f64().is_some_and(|v| v > 0.0), "{engine} {phase}: {row}");
        }
        let left: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n != "bench.json")
            .collect();
        assert!(left.is_empty(), "{engine}: bench left {left:?}");
        let _ = fs::remove_dir_all(&dir);
    }
}

#[test]
fn tune_writes_a_config_with_a_swept_setting() {
    let dir = scratch("tune");
    let args = [
        "tune",
        ".",
        "--size",
        "1MiB",
        "--queue-depth",
        "2,8",
        "--chunk-size",
        "64KiB,256KiB",
        "--output",
        "tuned.toml",
    ];
    let out = assert_ok(&run(&dir, &args));
    assert!(out.contains("best: queue_depth"), "{out}");
    let config =
        uring_ckpt::Config::from_toml_file(&dir.join("tuned.toml")).expect("tune wrote a valid config");
    assert!([2, 8].contains(&config.queue_depth), "{config:?}");
    assert!([64 << 10, 256 << 10].contains(&config.chunk_size), "{config:?}");
    assert!(config.staging_pool_size >= 2 * config.chunk_size);
    let err = assert_fails(&run(&dir, &args));
    assert!(err.contains("--force"), "{err}");
    assert_ok(&run(&dir, &[&args[..], &["--force"]].concat()));
    let left: Vec<_> =
        fs::read_dir(&dir).expect("list").filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("tuned.toml")], "tune left files behind");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn load_json_reports_throughput() {
    let dir = scratch("load-json");
    assert_ok(&run(&dir, &["save", "--synthetic", "2MiB", "--out", "ck"]));
    let stdout = assert_ok(&run(&dir, &["load", "ck", "--json"]));
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("load --json prints JSON");
    assert!(report["read_bytes"].as_u64().expect("read_bytes") > 2 << 20, "{report}");
    assert!(report["throughput_mib_s"].as_f64().expect("throughput") > 0.0, "{report}");
    assert_eq!(report["verified"], serde_json::Value::Bool(true));
    assert_eq!(report["mapped"], serde_json::Value::Bool(false));

    // The shard files mapped copy-on-write: every tensor byte, verified, the page cache's reads.
    let mapped = assert_ok(&run(&dir, &["load", "ck", "--into", "mapped", "--json"]));
    let mapped: serde_json::Value = serde_json::from_str(&mapped).expect("JSON");
    assert_eq!(
        (&mapped["mapped"], &mapped["into"], &mapped["verified"]),
        (&true.into(), &"mapped".into(), &true.into())
    );
    assert_eq!(mapped["data_bytes"], report["data_bytes"], "{mapped}");
    assert_eq!(mapped["engine"]["engine"], "buffered", "{mapped}");

    // In place (the default), into memory at each tensor's phase in the file: staged by
    // default; with zero_copy_loads the large tensors' aligned interiors are read straight
    // into it.
    assert_ok(&run(&dir, &["save", "--synthetic", "32MiB", "--out", "large", "--layout", "llama"]));
    let report: serde_json::Value =
        serde_json::from_str(&assert_ok(&run(&dir, &["load", "large", "--json"]))).expect("JSON");
    assert_eq!(report["zero_copy_bytes"].as_u64(), Some(0), "{report}");
    fs::write(dir.join("zero-copy.toml"), "zero_copy_loads = true\n").expect("config");
    let args = ["--config", "zero-copy.toml", "load", "large"];
    let report: serde_json::Value =
        serde_json::from_str(&assert_ok(&run(&dir, &[&args[..], &["--json"]].concat()))).expect("JSON");
    let (data, zero_copy) =
        (report["data_bytes"].as_u64().expect("data"), report["zero_copy_bytes"].as_u64());
    assert!(zero_copy.expect("zero_copy_bytes") > data / 2, "{report}");
    let text = assert_ok(&run(&dir, &args));
    assert!(text.contains("read straight into the destinations"), "{text}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn bench_measures_async_stalls() {
    let dir = scratch("bench-async");
    let json = dir.join("async.json");
    let json_arg = json.to_str().expect("utf-8 path");
    let args =
        ["--engine", "uring", "bench", "--size", "8MiB", "--repeat", "2", "--phases", "save,snapshot,stream"];
    let stdout = assert_ok(&run(&dir, &[&args[..], &["--json", json_arg]].concat()));
    assert!(stdout.contains("async-snapshot") && stdout.contains("async-stream"), "{stdout}");
    let doc: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&json).expect("json")).expect("parse");
    let rows = doc["results"].as_array().expect("results");
    for phase in ["save", "snapshot", "stream"] {
        let row =
            rows.iter().find(|r| r["phase"] == phase).unwrap_or_else(|| panic!("no {phase} row: {doc}"));
        assert!(row["mib_s_median"].as_f64().expect("mib/s") > 0.0, "{row}");
        assert!(row["seconds_median"].as_f64().expect("stall") > 0.0, "{row}");
    }
    let _ = fs::remove_dir_all(&dir);
}
