//! What a run costs the process, read from the kernel: CPU time (getrusage) and peak RSS
//! (/proc/self/status, reset through /proc/self/clear_refs); and evicting a checkpoint from
//! the page cache so that a load reads from the disk.

use std::fs;
use std::path::Path;

use crate::cli::{Context, Result};

/// Evicts every file of the checkpoint at `dir` from the page cache (after syncing it, so
/// that no page is dirty and every page can go), so that a load reads from the disk.
pub(super) fn drop_page_cache(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let entries = fs::read_dir(dir).context(|| format!("list {}", dir.display()))?;
    for entry in entries {
        let path = entry.context(|| format!("list {}", dir.display()))?.path();
        if !path.is_file() {
            continue;
        }
        let file = fs::File::open(&path).context(|| format!("open {}", path.display()))?;
        file.sync_data().context(|| format!("fdatasync {}", path.display()))?;
        nix::fcntl::posix_fadvise(
            file.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .context(|| format!("posix_fadvise(DONTNEED) {}", path.display()))?;
    }
    Ok(())
}

/// User + system CPU seconds of this process so far (every thread).
pub(super) fn cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => 0.0,
    }
}

/// Resets VmHWM to the current RSS; false when the kernel does not allow it.
pub(super) fn reset_peak_rss() -> bool {
    fs::write("/proc/self/clear_refs", b"5").is_ok()
}

/// VmHWM (peak resident set size) in bytes, 0 when unknown.
pub(super) fn peak_rss() -> u64 {
    let Ok(status) = fs::read_to_string("/proc/self/status") else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}
