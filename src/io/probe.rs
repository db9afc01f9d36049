//! Finding out what the system allows: the direct-I/O alignment of a file system, whether
//! O_DIRECT works there, and the resulting engine plan with its fallbacks.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::{AlignedBuf, EngineReport, Fallback};
use crate::config::{Config, EngineKind};
use crate::error::{Error, Result};

/// Direct-I/O alignment of a file system: offsets/lengths, and memory addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DioAlignment {
    /// Alignment of file offsets and transfer lengths.
    pub offset: usize,
    /// Alignment of user memory.
    pub mem: usize,
}

/// Reads the direct-I/O alignment for `file` (an existing regular file): `statx`
/// `STATX_DIOALIGN`, else the device's logical block size, else 4096.
pub fn dio_alignment(file: &Path) -> DioAlignment {
    if let Some(found) = statx_dioalign(file) {
        return found;
    }
    if let Some(block) = logical_block_size(file) {
        return DioAlignment { offset: block, mem: block };
    }
    DioAlignment { offset: 4096, mem: 4096 }
}

#[cfg(target_os = "linux")]
fn statx_dioalign(file: &Path) -> Option<DioAlignment> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(file.as_os_str().as_bytes()).ok()?;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: c_path is a valid NUL-terminated string and stx points to writable memory of
    // the size statx expects.
    let rc =
        unsafe { libc::statx(libc::AT_FDCWD, c_path.as_ptr(), 0, libc::STATX_DIOALIGN, stx.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statx returned 0, so it filled the structure (which was zeroed before).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let offset = stx.stx_dio_offset_align as usize;
    let mem = stx.stx_dio_mem_align as usize;
    if offset == 0 || mem == 0 || !offset.is_power_of_two() || !mem.is_power_of_two() {
        return None; // the file system does not support direct I/O for this file
    }
    Some(DioAlignment { offset, mem })
}

#[cfg(not(target_os = "linux"))]
fn statx_dioalign(_file: &Path) -> Option<DioAlignment> {
    None
}

fn logical_block_size(file: &Path) -> Option<usize> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(file).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let base = format!("/sys/dev/block/{major}:{minor}");
    // A partition's queue settings live in its parent device's directory.
    for candidate in
        [format!("{base}/queue/logical_block_size"), format!("{base}/../queue/logical_block_size")]
    {
        if let Ok(text) = fs::read_to_string(&candidate) {
            if let Ok(size) = text.trim().parse::<usize>() {
                if size.is_power_of_two() {
                    return Some(size);
                }
            }
        }
    }
    None
}

/// Decides the engine for writing under `dir` (which must exist): resolves `auto`, checks
/// that O_DIRECT works there with a one-block probe file, reads the alignment.
pub fn plan(config: &Config, dir: &Path) -> Result<EngineReport> {
    let mut report = base_report(config);
    if report.engine == EngineKind::Buffered {
        return Ok(report);
    }
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe_path = dir.join(format!(".uring-ckpt-probe-{}-{n}", std::process::id()));
    let outcome = probe_direct_write(config, &probe_path);
    let _ = fs::remove_file(&probe_path);
    match outcome {
        Ok(Some(align)) => {
            report.align = align.offset.max(512);
            report.mem_align = align.mem.max(1);
        }
        Ok(None) => {} // direct I/O switched off in the config: keep the engine, no O_DIRECT
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            let err = Error::io("open with O_DIRECT", &probe_path, err);
            fall_back(&mut report, "O_DIRECT", EngineKind::Buffered, &err);
        }
        Err(err) => return Err(Error::io("probe direct I/O", &probe_path, err)),
    }
    report.offload_writes =
        report.engine == EngineKind::Uring && report.direct_io && fs_type(dir).is_some_and(offloads_writes);
    Ok(report)
}

/// A regular file in `dir` to read the direct-I/O alignment from (the files a reader reads
/// there are on its file system): the first by name, links not followed; `None` when there
/// is none.
fn sample_file(dir: &Path) -> Option<std::path::PathBuf> {
    let mut names: Vec<std::ffi::OsString> = fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_file()))
        .map(|entry| entry.file_name())
        .collect();
    names.sort_unstable();
    names.first().map(|name| dir.join(name))
}

/// Decides the engine for reading the files under `dir`; the alignment is read from one of
/// the regular files there (see `sample_file`).
pub fn plan_read(config: &Config, dir: &Path) -> Result<EngineReport> {
    let mut report = base_report(config);
    if report.engine == EngineKind::Buffered || !report.direct_io {
        return Ok(report);
    }
    if config.simulate.direct_io_einval {
        let err = Error::io("open with O_DIRECT", dir, io::Error::from_raw_os_error(libc::EINVAL));
        fall_back(&mut report, "O_DIRECT", EngineKind::Buffered, &err);
        return Ok(report);
    }
    let sample = sample_file(dir);
    let align = dio_alignment(sample.as_deref().unwrap_or(dir));
    report.align = align.offset.max(512);
    report.mem_align = align.mem.max(1);
    Ok(report)
}

fn base_report(config: &Config) -> EngineReport {
    let engine = match config.engine {
        EngineKind::Auto if cfg!(target_os = "linux") => EngineKind::Uring,
        EngineKind::Auto | EngineKind::Uring if !cfg!(target_os = "linux") => EngineKind::Pwrite,
        other => other,
    };
    let direct_io = config.direct_io && engine != EngineKind::Buffered;
    EngineReport {
        requested: config.engine,
        engine,
        direct_io,
        registered_buffers: false,
        align: 4096,
        mem_align: 4096,
        queue_depth: match engine {
            EngineKind::Pwrite => config.io_threads,
            EngineKind::Buffered => 1,
            _ => config.queue_depth,
        },
        offload_writes: false,
        fallbacks: Vec::new(),
    }
}

/// `statfs`'s `f_type` of btrfs.
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;

/// Whether io_uring writes to a file system of type `f_type` (`statfs`) are better handed
/// to the ring's worker threads at once ([`EngineReport::offload_writes`]): btrfs computes a
/// direct write's data checksums in the thread that submits it, so a write tried there first
/// (io_uring's non-blocking attempt, which succeeds on btrfs) runs serially with the copy and
/// CRC of the next chunk. Handed to io-wq it runs beside them: on the RAM-backed btrfs of the
/// README (2-vCPU AMD EPYC), 1 GiB saves, 5 alternating rounds, 480 against 357 MiB/s (pwrite
/// 461). Reads handed over the same way were no faster there, so reads are left as they are.
fn offloads_writes(f_type: i64) -> bool {
    f_type == BTRFS_SUPER_MAGIC
}

/// The `statfs` type of the file system holding `dir`, if it can be read.
fn fs_type(dir: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `path` is NUL-terminated and `stat` is writable memory of the struct's size.
    let rc = unsafe { libc::statfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statfs returned 0, so it filled the struct in.
    let stat = unsafe { stat.assume_init() };
    #[allow(clippy::unnecessary_cast)] // `f_type` is an i64 here, an i32 or u32 on other targets
    Some(stat.f_type as i64)
}

/// Writes one aligned block with O_DIRECT; returns the alignment, or `None` when direct I/O
/// is off in the config.
fn probe_direct_write(config: &Config, path: &Path) -> io::Result<Option<DioAlignment>> {
    if !config.direct_io {
        return Ok(None);
    }
    if config.simulate.direct_io_einval {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    crate::failpoint::io("probe.odirect")?;
    // Create it without O_DIRECT first so statx can report the alignment for this file.
    fs::write(path, b"")?;
    let align = dio_alignment(path);
    let file = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path)?;
    let block = align.offset.max(align.mem).max(512);
    let mut buf = AlignedBuf::zeroed(block, block);
    buf.set_len(block);
    file.write_all_at(&buf, 0)?;
    Ok(Some(align))
}

/// Records a fallback in the report and logs it at warn level.
pub fn fall_back(report: &mut EngineReport, what: &'static str, to: EngineKind, err: &Error) {
    let instead = match to {
        EngineKind::Pwrite => "pwrite thread pool",
        EngineKind::Buffered => "buffered writes + fdatasync",
        _ => "another engine",
    };
    log::warn!("{what} unavailable ({err}); using {instead}");
    report.fallbacks.push(Fallback { what, instead, reason: err.to_string() });
    report.engine = to;
    report.offload_writes &= to == EngineKind::Uring;
    if to == EngineKind::Buffered {
        report.direct_io = false;
    }
}

/// Records that buffer registration was refused.
pub fn registration_refused(report: &mut EngineReport, err: &io::Error) {
    log::warn!("io_uring buffer registration refused ({err}); using unregistered writes");
    report.fallbacks.push(Fallback {
        what: "buffer registration",
        instead: "unregistered io_uring writes",
        reason: err.to_string(),
    });
    report.registered_buffers = false;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_uring_hands_writes_to_io_wq_on_btrfs_only() {
        assert!(offloads_writes(BTRFS_SUPER_MAGIC));
        for other in [0xEF53, 0x5846_5342, 0x0102_1994, 0x6969, 0] {
            assert!(!offloads_writes(other), "f_type {other:#x}");
        }
        // Here: what the file system of this checkout is, through the probe.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let f_type = fs_type(dir.path()).expect("statfs of the checkout");
        let config = Config::builder().engine(EngineKind::Uring).build().expect("config");
        let report = plan(&config, dir.path()).expect("plan");
        let expected = report.engine == EngineKind::Uring && report.direct_io && f_type == BTRFS_SUPER_MAGIC;
        assert_eq!(report.offload_writes, expected, "f_type {f_type:#x}: {report:?}");
        let pwrite = Config::builder().engine(EngineKind::Pwrite).build().expect("config");
        assert!(!plan(&pwrite, dir.path()).expect("plan").offload_writes, "pwrite has no io-wq");
        assert_eq!(fs_type(&dir.path().join("missing")), None);
    }

    #[test]
    fn alignment_of_a_real_file_is_a_power_of_two() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, b"x").expect("write");
        let a = dio_alignment(&path);
        assert!(a.offset.is_power_of_two() && a.mem.is_power_of_two(), "{a:?}");
        assert!(a.offset <= 65536);
    }

    #[test]
    fn simulated_einval_falls_back_to_buffered() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let mut config = Config::default();
        config.simulate.direct_io_einval = true;
        let report = plan(&config, dir.path()).expect("plan");
        assert_eq!(report.engine, EngineKind::Buffered);
        assert!(!report.direct_io);
        assert_eq!(report.fallbacks.len(), 1);
        assert_eq!(report.fallbacks[0].what, "O_DIRECT");
        assert!(report.fallbacks[0].reason.contains("Invalid argument"), "{:?}", report.fallbacks);
    }
}
