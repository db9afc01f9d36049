//! Every fallback path, forced through `SimulatedFaults` so that it runs on any machine:
//! io_uring refused (EPERM) -> pwrite, O_DIRECT refused (EINVAL) -> buffered + fdatasync,
//! buffer registration refused (ENOMEM) -> unregistered io_uring writes. Each must produce
//! files byte-identical to the normal path and say which fallback it took and why.

use crate::common;

use std::fs;
use std::path::Path;

use common::{bytes, files_of, scratch, small_config};
use uring_ckpt::config::{Config, EngineKind};
use uring_ckpt::format::Dtype;
use uring_ckpt::{Checkpoint, CheckpointIO, LoadOptions, SaveReport, UringCheckpointIO};

fn tensors() -> Vec<(String, Vec<u8>)> {
    [0usize, 1, 4095, 4097, 300_000, 1 << 20]
        .iter()
        .enumerate()
        .map(|(i, &len)| (format!("t{i}"), bytes(i as u64 + 11, len)))
        .collect()
}

fn save_with(config: Config, path: &Path, data: &[(String, Vec<u8>)]) -> SaveReport {
    let mut ck = Checkpoint::new();
    for (name, bytes) in data {
        ck.add(name.clone(), Dtype::U8, &[bytes.len() as u64], bytes).expect("tensor");
    }
    let io = UringCheckpointIO::new(config).expect("config");
    let report = io.save_checkpoint(&ck, path).expect("save");
    let loaded = io.load_checkpoint(path, &LoadOptions::default()).expect("load");
    for (name, bytes) in data {
        assert!(loaded.get(name).expect("tensor").data[..] == bytes[..], "{name} differs");
    }
    report
}

fn uring_available() -> bool {
    let disabled = fs::read_to_string("/proc/sys/kernel/io_uring_disabled").unwrap_or_default();
    if disabled.trim() != "" && disabled.trim() != "0" {
        println!("skipped: kernel.io_uring_disabled={} on this machine", disabled.trim());
        return false;
    }
    true
}

#[test]
fn each_fallback_writes_identical_files_and_reports_why() {
    let dir = scratch();
    let data = tensors();
    let reference = save_with(small_config(EngineKind::Uring), &dir.path().join("reference"), &data);
    if uring_available() {
        assert_eq!(reference.engine.engine, EngineKind::Uring, "{:?}", reference.engine);
        assert!(reference.engine.fallbacks.is_empty(), "{:?}", reference.engine.fallbacks);
        assert!(reference.engine.direct_io);
        assert!(reference.engine.registered_buffers);
    }

    let mut no_uring = small_config(EngineKind::Uring);
    no_uring.simulate.uring_setup_eperm = true;
    let report = save_with(no_uring, &dir.path().join("no_uring"), &data);
    assert_eq!(report.engine.engine, EngineKind::Pwrite);
    assert!(report.engine.direct_io, "pwrite keeps O_DIRECT");
    assert_eq!(report.engine.fallbacks[0].what, "io_uring");
    assert!(report.engine.fallbacks[0].reason.contains("Operation not permitted"), "{:?}", report.engine);

    let mut no_direct = small_config(EngineKind::Uring);
    no_direct.simulate.direct_io_einval = true;
    let report = save_with(no_direct, &dir.path().join("no_direct"), &data);
    assert_eq!(report.engine.engine, EngineKind::Buffered);
    assert!(!report.engine.direct_io);
    assert_eq!(report.engine.fallbacks[0].what, "O_DIRECT");

    let mut no_register = small_config(EngineKind::Uring);
    no_register.simulate.register_enomem = true;
    let report = save_with(no_register, &dir.path().join("no_register"), &data);
    if uring_available() {
        assert_eq!(report.engine.engine, EngineKind::Uring);
        assert!(!report.engine.registered_buffers);
        assert_eq!(report.engine.fallbacks[0].what, "buffer registration");
        assert!(report.engine.fallbacks[0].reason.contains("Cannot allocate memory"), "{:?}", report.engine);
    }

    let reference_files = files_of(&dir.path().join("reference"));
    for name in ["no_uring", "no_direct", "no_register"] {
        let files = files_of(&dir.path().join(name));
        assert_eq!(files.len(), reference_files.len());
        for ((a_name, a), (b_name, b)) in reference_files.iter().zip(&files) {
            assert_eq!(a_name, b_name);
            assert!(a == b, "{b_name} written with fallback {name} differs from the normal path");
        }
    }
}

#[test]
fn config_from_env_forces_each_engine() {
    for (value, engine) in
        [("uring", EngineKind::Uring), ("pwrite", EngineKind::Pwrite), ("buffered", EngineKind::Buffered)]
    {
        let config = Config::default().with_env_from([("URING_CKPT_ENGINE", value)]).expect("env config");
        assert_eq!(config.engine, engine);
    }
    let config = Config::default()
        .with_env_from([("URING_CKPT_SIMULATE", "uring-eperm,direct-einval,register-enomem")])
        .expect("env config");
    assert!(
        config.simulate.uring_setup_eperm
            && config.simulate.direct_io_einval
            && config.simulate.register_enomem
    );
}

#[test]
fn direct_io_off_in_config_keeps_the_engine_without_o_direct() {
    let dir = scratch();
    let mut config = small_config(EngineKind::Uring);
    config.direct_io = false;
    let report = save_with(config, &dir.path().join("c"), &tensors());
    assert!(!report.engine.direct_io);
    assert!(report.engine.fallbacks.is_empty(), "switching O_DIRECT off is a choice, not a fallback");
}
