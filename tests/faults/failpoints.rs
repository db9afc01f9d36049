//! Injected faults (the `fail` crate, feature `failpoints`) on every engine and at every step
//! of the commit protocol. Each case ends with the documented outcome:
//!
//! * a failure: the typed [`Error::Io`] with the injected errno and the operation's name,
//!   the previous checkpoint at the same path byte-identical and verifying, no temporary
//!   directory or lock file left, and a later save without the fault succeeding;
//! * a transient fault (EINTR/EAGAIN, short writes): the save succeeds, and its files are
//!   byte-identical to those of a save without faults;
//! * a refused feature (io_uring EPERM, registration ENOMEM, O_DIRECT EINVAL): the
//!   documented fallback, reported with its reason, and identical files.

use crate::common;
use crate::reliability;

use std::path::Path;

use common::{entries, files_of, scratch};
use reliability::{fault_config, Data};
use uring_ckpt::config::{EngineKind, FsyncPolicy};
use uring_ckpt::{CheckpointIO, Error, SaveReport, UringCheckpointIO};

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The save fails with this errno, reported for this operation.
    Fails(i32, &'static str),
    /// The save succeeds with the same files as a fault-free save.
    Succeeds,
    /// The save succeeds on this engine after the named fallback.
    FallsBack(EngineKind, &'static str),
}

use Expect::*;

struct Case {
    engine: EngineKind,
    point: &'static str,
    action: &'static str,
    expect: Expect,
    fsync: FsyncPolicy,
}

fn case(engine: EngineKind, point: &'static str, action: &'static str, expect: Expect) -> Case {
    Case { engine, point, action, expect, fsync: FsyncPolicy::Fdatasync }
}

fn cases() -> Vec<Case> {
    use libc::{EIO, ENOSPC};
    use EngineKind::{Buffered, Pwrite, Uring};
    let mut cases = vec![
        // io_uring: completions, submission, setup, registration.
        case(Uring, "uring.write.complete", "return(EIO)", Fails(EIO, "write")),
        case(Uring, "uring.write.complete", "1*off->1*return(EIO)", Fails(EIO, "write")),
        case(Uring, "uring.write.complete", "return(ENOSPC)", Fails(ENOSPC, "write")),
        case(Uring, "uring.write.complete", "3*return(EINTR)", Succeeds),
        case(Uring, "uring.write.complete", "3*return(EAGAIN)", Succeeds),
        case(Uring, "uring.write.submit", "5*return(short)", Succeeds),
        case(Uring, "uring.submit", "3*return(EINTR)", Succeeds),
        case(Uring, "uring.submit", "3*return(EAGAIN)", Succeeds),
        case(Uring, "uring.submit", "return(EIO)", Fails(EIO, "io_uring_enter")),
        case(Uring, "uring.setup", "return(EPERM)", FallsBack(Pwrite, "io_uring")),
        case(Uring, "uring.register", "return(ENOMEM)", FallsBack(Uring, "buffer registration")),
        case(Uring, "probe.odirect", "return(EINVAL)", FallsBack(Buffered, "O_DIRECT")),
        case(Uring, "probe.odirect", "return(EIO)", Fails(EIO, "probe direct I/O")),
        case(Pwrite, "probe.odirect", "return(EINVAL)", FallsBack(Buffered, "O_DIRECT")),
        // pwrite thread pool.
        case(Pwrite, "pwrite.write", "return(EIO)", Fails(EIO, "pwrite")),
        case(Pwrite, "pwrite.write", "return(ENOSPC)", Fails(ENOSPC, "pwrite")),
        case(Pwrite, "pwrite.write", "2*off->1*return(EIO)", Fails(EIO, "pwrite")),
        case(Pwrite, "pwrite.write", "5*return(short)", Succeeds),
        case(Pwrite, "pwrite.write", "3*return(EINTR)", Succeeds),
        case(Pwrite, "pwrite.write", "3*return(EAGAIN)", Succeeds),
        // buffered baseline.
        case(Buffered, "buffered.write", "return(EIO)", Fails(EIO, "write")),
        case(Buffered, "buffered.write", "return(ENOSPC)", Fails(ENOSPC, "write")),
        // The commit protocol (engine-independent; run on io_uring).
        case(Uring, "commit.manifest_write", "return(ENOSPC)", Fails(ENOSPC, "write")),
        case(Uring, "commit.manifest_write", "return(EIO)", Fails(EIO, "write")),
        case(Uring, "commit.manifest_fsync", "1*return(EIO)", Fails(EIO, "fsync")),
        case(Uring, "dir.fsync", "1*return(EIO)", Fails(EIO, "fsync directory")),
        case(Uring, "commit.rename", "return(EIO)", Fails(EIO, "rename")),
        // A file system without RENAME_EXCHANGE (NFS, CIFS): the replace is two renames.
        case(Uring, "commit.exchange", "return(EINVAL)", Succeeds),
        case(Uring, "commit.exchange", "return(EOPNOTSUPP)", Succeeds),
        case(Uring, "commit.exchange", "return(EIO)", Fails(EIO, "rename (exchange)")),
        case(Uring, "commit.after_shards", "return(EIO)", Fails(EIO, "commit.after_shards")),
        case(Uring, "commit.after_manifest_write", "return(EIO)", Fails(EIO, "commit.after_manifest_write")),
        case(Uring, "commit.after_manifest_fsync", "return(EIO)", Fails(EIO, "commit.after_manifest_fsync")),
        case(Uring, "commit.after_dir_fsync", "return(EIO)", Fails(EIO, "commit.after_dir_fsync")),
    ];
    for engine in common::ENGINES {
        // EIO on the first fdatasync only: a retry would succeed, the save must still fail.
        cases.push(case(engine, "file.fdatasync", "1*return(EIO)", Fails(EIO, "fdatasync")));
        cases.push(case(engine, "file.fdatasync", "return(ENOSPC)", Fails(ENOSPC, "fdatasync")));
        cases.push(case(engine, "file.ftruncate", "1*return(EIO)", Fails(EIO, "ftruncate")));
        let mut fsync = case(engine, "file.fsync", "1*return(EIO)", Fails(EIO, "fsync"));
        fsync.fsync = FsyncPolicy::Fsync;
        cases.push(fsync);
    }
    cases
}

fn uring_available() -> bool {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").unwrap_or_default();
    disabled.trim().is_empty() || disabled.trim() == "0"
}

fn save(config: &uring_ckpt::Config, data: &Data, path: &Path) -> Result<SaveReport, Error> {
    UringCheckpointIO::new(config.clone()).expect("config").save_checkpoint(&data.checkpoint(), path)
}

#[test]
fn every_fault_ends_in_a_typed_error_or_the_documented_outcome() {
    let _alone = crate::alone();
    let cases = cases();
    if !uring_available() {
        println!("skipped: io_uring is disabled on this machine (kernel.io_uring_disabled)");
        return;
    }
    let (old, new) = (Data::new(1), Data::new(2));
    let mut tried = 0;
    for (i, case) in cases.iter().enumerate() {
        let what =
            format!("case {i}: {:?} {} = {} -> {:?}", case.engine, case.point, case.action, case.expect);
        // Held for the whole case: failpoints are process-wide, so no other test's fault
        // (armed under its own scenario) may fire in any save of this case.
        let scenario = fail::FailScenario::setup();
        let dir = scratch();
        let path = dir.path().join("ckpt");
        let mut config = fault_config(case.engine);
        config.fsync = case.fsync;

        // The previous checkpoint, and a fault-free save of the new data to compare with.
        save(&config, &old, &path).expect("previous checkpoint");
        let reference = dir.path().join("reference");
        let reference_report = save(&config, &new, &reference).expect("reference save");
        let reference_files = files_of(&reference);
        std::fs::remove_dir_all(&reference).expect("remove reference");
        let before = files_of(&path);

        fail::cfg(case.point, case.action).expect("failpoint action");
        let result = save(&config, &new, &path);
        fail::remove(case.point);

        assert_eq!(entries(dir.path()), vec!["ckpt"], "{what}: no temporary directory or lock may remain");
        match (case.expect, result) {
            (Fails(errno, op), Err(err)) => {
                assert_eq!(err.raw_os_error(), Some(errno), "{what}: {err}");
                assert!(
                    matches!(&err, Error::Io { op: o, .. } if *o == op),
                    "{what}: wrong operation in {err:?}"
                );
                assert!(files_of(&path) == before, "{what}: the previous checkpoint changed");
                old.assert_loads(&config, &path, &what);
                // The same save without the fault now succeeds.
                save(&config, &new, &path).unwrap_or_else(|e| panic!("{what}: save after the fault: {e}"));
                new.assert_loads(&config, &path, &what);
            }
            (Succeeds, Ok(report)) => {
                new.assert_loads(&config, &path, &what);
                assert!(files_of(&path) == reference_files, "{what}: files differ from a fault-free save");
                assert!(report.engine.fallbacks.is_empty(), "{what}: {:?}", report.engine);
                if case.point == "uring.write.submit" {
                    // Each short write was followed by an SQE for its rest. A write of one
                    // block cannot be cut (O_DIRECT), and a shard whose data region has a
                    // phase (`Vec` memory sits past a page boundary) has such writes: the
                    // block shared with the header, and one between neighbouring tensors
                    // sent without a copy. So at least one of the five was cut, at most five.
                    let extra = report.sqes_submitted - reference_report.sqes_submitted;
                    assert!(
                        (1..=5).contains(&extra),
                        "{what}: {} SQEs, {} without faults",
                        report.sqes_submitted,
                        reference_report.sqes_submitted
                    );
                }
            }
            (FallsBack(engine, fallback), Ok(report)) => {
                new.assert_loads(&config, &path, &what);
                assert_eq!(report.engine.engine, engine, "{what}: {:?}", report.engine);
                assert_eq!(report.engine.fallbacks.first().map(|f| f.what), Some(fallback), "{what}");
                assert!(!report.engine.fallbacks[0].reason.is_empty());
                assert!(files_of(&path) == reference_files, "{what}: files differ from a fault-free save");
            }
            (expect, result) => panic!("{what}: expected {expect:?}, got {result:?}"),
        }
        assert_eq!(entries(dir.path()), vec!["ckpt"], "{what}");
        drop(scenario);
        tried += 1;
    }
    println!("fault cases tried: {tried}; each: typed error or documented outcome, previous checkpoint intact, nothing left behind");
}

/// EIO on fdatasync is final: with the fault armed once and then off, a writer that retried
/// the sync would succeed and commit; ours fails, so nothing new is committed.
#[test]
fn fdatasync_eio_is_never_retried_then_committed() {
    let _alone = crate::alone();
    let dir = scratch();
    let path = dir.path().join("fresh");
    let config = fault_config(EngineKind::Uring);
    let scenario = fail::FailScenario::setup();
    fail::cfg("file.fdatasync", "1*return(EIO)").expect("cfg");
    let err = save(&config, &Data::new(3), &path).expect_err("the save must fail");
    drop(scenario);
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(!path.exists(), "nothing may be committed after a failed fdatasync");
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
}

/// A replace on a file system without `RENAME_EXCHANGE` is two renames; when the second one
/// fails, the old checkpoint is put back where it was, whole, and nothing else remains.
#[test]
fn a_two_rename_replace_that_fails_in_between_puts_the_old_checkpoint_back() {
    let _alone = crate::alone();
    let dir = scratch();
    let path = dir.path().join("ckpt");
    let config = fault_config(EngineKind::Uring);
    let (old, new) = (Data::new(1), Data::new(2));
    save(&config, &old, &path).expect("previous checkpoint");
    let before = files_of(&path);
    let scenario = fail::FailScenario::setup();
    fail::cfg("commit.exchange", "return(EINVAL)").expect("cfg");
    fail::cfg("commit.between_renames", "1*return(EIO)").expect("cfg");
    let err = save(&config, &new, &path).expect_err("the second rename fails");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(matches!(&err, Error::Io { op: "commit.between_renames", .. }), "{err:?}");
    assert!(files_of(&path) == before, "the old checkpoint is back, unchanged");
    old.assert_loads(&config, &path, "after the failed replace");
    assert_eq!(entries(dir.path()), vec!["ckpt"], "nothing else remains");
    // The same replace with the exchange still refused and no fault in between succeeds.
    save(&config, &new, &path).expect("two-rename replace");
    drop(scenario);
    new.assert_loads(&config, &path, "after the two-rename replace");
    assert_eq!(entries(dir.path()), vec!["ckpt"]);
}
