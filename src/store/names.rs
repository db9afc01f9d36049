//! The names of the directory protocol: a checkpoint `<parent>/<name>`, its temporary
//! directories `.<name>.tmp-<suffix>`, its removal `.<name>.tmp-removing-<pid>` and its lock
//! file `.<name>.lock`; which names a save accepts; the save ids of multi-rank saves this
//! crate mints (`r-<host>-<pid>-<hex nanos>-<n>`), whose coordinator can be told alive or gone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Marker in the names of temporary directories; loaders skip names that contain it.
pub const TMP_MARKER: &str = ".tmp-";

/// Suffix of a save's lock file: `.<name>.lock`.
pub const LOCK_SUFFIX: &str = ".lock";

/// The longest file name a directory entry may have (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// The longest temporary-directory suffix this process makes itself
/// (`<pid>-<hex nanos>-<counter>`, or `removing-<pid>`).
const MAX_OWN_SUFFIX: usize = 64;

/// The longest checkpoint name a save accepts: its temporary directory
/// `.<name>.tmp-<suffix>` must still fit in [`NAME_MAX`].
pub const MAX_CHECKPOINT_NAME: usize = NAME_MAX - 1 - TMP_MARKER.len() - MAX_OWN_SUFFIX;

/// The longest save id of a multi-rank save.
pub const MAX_SAVE_ID: usize = 128;

/// Whether a directory entry name is a temporary (uncommitted) checkpoint directory.
pub fn is_temporary_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(TMP_MARKER)
}

/// Whether a directory entry name is a save's lock file.
pub fn is_lock_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(LOCK_SUFFIX)
}

/// Splits a checkpoint path into its parent directory and name.
pub fn split_target(target: &Path) -> Result<(PathBuf, String)> {
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .ok_or_else(|| {
            Error::InvalidCheckpoint(format!("{} has no usable directory name", target.display()))
        })?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_owned()))
}

/// Splits the path a save writes to, refusing (before anything is written) a name that
/// looks like one of the protocol's own (a temporary directory, which `load` would refuse
/// and the next save of the base name would delete; a lock file) and a name too long for
/// its temporary directory's name to fit in `NAME_MAX`.
pub fn split_save_target(target: &Path) -> Result<(PathBuf, String)> {
    let (parent, name) = split_target(target)?;
    if is_temporary_name(&name) {
        return Err(Error::InvalidCheckpoint(format!(
            "{}: a name starting with '.' and containing {TMP_MARKER:?} is reserved for the \
             temporary directories of unfinished saves",
            target.display()
        )));
    }
    if is_lock_name(&name) {
        return Err(Error::InvalidCheckpoint(format!(
            "{}: a name starting with '.' and ending in {LOCK_SUFFIX:?} is reserved for save locks",
            target.display()
        )));
    }
    if name.len() > MAX_CHECKPOINT_NAME {
        return Err(Error::InvalidCheckpoint(format!(
            "{}: the checkpoint name is {} bytes; at most {MAX_CHECKPOINT_NAME} are allowed (its \
             temporary directory's name must fit in {NAME_MAX})",
            target.display(),
            name.len()
        )));
    }
    Ok((parent, name))
}

/// The temporary directory `<parent>/.<name>.tmp-<suffix>`.
pub fn temp_dir_path(parent: &Path, name: &str, suffix: &str) -> PathBuf {
    parent.join(format!(".{name}{TMP_MARKER}{suffix}"))
}

/// The hidden name a removal renames `<parent>/<name>` to before deleting it.
pub fn removal_path(parent: &Path, name: &str) -> PathBuf {
    temp_dir_path(parent, name, &format!("removing-{}", std::process::id()))
}

/// The lock file of a checkpoint path: `<parent>/.<name>.lock`.
pub fn lock_path(target: &Path) -> Result<PathBuf> {
    let (parent, name) = split_target(target)?;
    Ok(parent.join(format!(".{name}{LOCK_SUFFIX}")))
}

/// A suffix no other temporary directory of this host has: `<pid>-<hex nanos>-<counter>`.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos:x}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Checks a multi-rank save id: 1 to [`MAX_SAVE_ID`] of `[A-Za-z0-9_-]`, and short enough
/// that `.<name>.tmp-<save id>` fits in `NAME_MAX` for the checkpoint `target`.
pub fn validate_save_id(target: &Path, save_id: &str) -> Result<()> {
    let ok = !save_id.is_empty()
        && save_id.len() <= MAX_SAVE_ID
        && save_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(Error::InvalidCheckpoint(format!(
            "save id {save_id:?} must be 1-{MAX_SAVE_ID} of [A-Za-z0-9_-]"
        )));
    }
    let (_, name) = split_save_target(target)?;
    let len = 1 + name.len() + TMP_MARKER.len() + save_id.len();
    if len > NAME_MAX {
        return Err(Error::InvalidCheckpoint(format!(
            "{}: the temporary directory name for save id {save_id:?} would be {len} bytes, more \
             than {NAME_MAX}; use a shorter name or save id",
            target.display()
        )));
    }
    Ok(())
}

/// Prefix of the save ids [`rank_save_id`] mints.
const RANK_ID_PREFIX: &str = "r-";

/// Eight hex digits naming this host and boot: a process id means something only where this
/// tag matches (the CRC-32 of the host name and the kernel's boot id).
pub fn host_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let mut hasher = crc32fast::Hasher::new();
        let mut name = [0u8; 256];
        // SAFETY: the buffer is writable for its length; gethostname writes at most that
        // many bytes and does not keep the pointer.
        if unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0 {
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            hasher.update(&name[..end]);
        }
        hasher.update(b"\0");
        if let Ok(boot) = std::fs::read("/proc/sys/kernel/random/boot_id") {
            hasher.update(&boot);
        }
        format!("{:08x}", hasher.finalize())
    })
}

/// A save id for a multi-rank save coordinated by this process:
/// `r-<host tag>-<pid>-<hex nanos>-<counter>`, unique on this host, at most
/// 64 bytes. A later save of the same path recognises it
/// ([`rank_dir_owner`]) and removes the directory once its coordinator is gone.
pub fn rank_save_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{RANK_ID_PREFIX}{}-{}-{nanos:x}-{n}", host_tag(), std::process::id())
}

/// Who coordinates the multi-rank save of a temporary directory: the host tag and process
/// id in its save id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankDirOwner {
    /// The coordinator's [`host_tag`].
    pub host: String,
    /// The coordinator's process id (on that host).
    pub pid: u32,
}

/// The coordinator of a temporary directory of `name` whose save id [`rank_save_id`]
/// minted (`.<name>.tmp-r-<host>-<pid>-<hex nanos>-<n>`); `None` for any other name.
pub fn rank_dir_owner(name: &str, entry: &str) -> Option<RankDirOwner> {
    let rest = entry.strip_prefix('.')?.strip_prefix(name)?.strip_prefix(TMP_MARKER)?;
    let rest = rest.strip_prefix(RANK_ID_PREFIX)?;
    let parts: Vec<&str> = rest.split('-').collect();
    let [host, pid, nanos, n] = parts[..] else { return None };
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if host.len() != 8 || !hex(host) || !digits(pid) || !hex(nanos) || !digits(n) {
        return None;
    }
    Some(RankDirOwner { host: host.to_owned(), pid: pid.parse().ok()? })
}

/// The process id in a temporary directory name of `name` made by a single-process save
/// (`.<name>.tmp-<pid>-<hex nanos>-<n>`) or a removal (`.<name>.tmp-removing-<pid>`).
/// `None` for any other name, including multi-rank save directories.
pub fn temp_dir_owner(name: &str, entry: &str) -> Option<u32> {
    let rest = entry.strip_prefix('.')?.strip_prefix(name)?.strip_prefix(TMP_MARKER)?;
    if let Some(pid) = rest.strip_prefix("removing-") {
        return pid.parse().ok().filter(|p: &u32| p.to_string() == pid);
    }
    let mut parts = rest.split('-');
    let (pid, nanos, n) = (parts.next()?, parts.next()?, parts.next()?);
    let well_formed = parts.next().is_none()
        && !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && !nanos.is_empty()
        && nanos.bytes().all(|b| b.is_ascii_hexdigit())
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit());
    if well_formed {
        pid.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_of_temp_names() {
        assert_eq!(temp_dir_owner("ck", ".ck.tmp-1234-17a3f-0"), Some(1234));
        assert_eq!(temp_dir_owner("ck", ".ck.tmp-removing-77"), Some(77));
        assert_eq!(temp_dir_owner("ck", ".ck.tmp-step-100"), None, "multi-rank save ids");
        assert_eq!(temp_dir_owner("ck", ".ck.tmp-12-zz-0"), None);
        assert_eq!(temp_dir_owner("ck", ".other.tmp-12-ab-0"), None);
        assert_eq!(temp_dir_owner("ck", ".ck.tmp-12-ab-0-1"), None);
        assert_eq!(temp_dir_owner("ck", "ck"), None);
        assert_eq!(temp_dir_owner("ck", ".ck.lock"), None);
    }

    #[test]
    fn owner_of_rank_save_ids() {
        let id = rank_save_id();
        let entry = format!(".ck{TMP_MARKER}{id}");
        let owner = rank_dir_owner("ck", &entry).expect("minted ids are recognised");
        assert_eq!(owner, RankDirOwner { host: host_tag().to_owned(), pid: std::process::id() });
        assert!(validate_save_id(Path::new("ck"), &id).is_ok(), "{id}");
        assert_eq!(temp_dir_owner("ck", &entry), None, "not a single-process directory");
        assert_eq!(rank_dir_owner("other", &entry), None);
        assert_eq!(rank_dir_owner("ck", ".ck.tmp-step-100"), None, "ids chosen by the caller");
        assert_eq!(rank_dir_owner("ck", ".ck.tmp-r-abc-1-2-3"), None, "host tag of 8 hex digits");
        assert_eq!(rank_dir_owner("ck", ".ck.tmp-r-0123abcd-1-2-3-4"), None);
        assert_eq!(
            rank_dir_owner("ck", ".ck.tmp-r-0123abcd-77-1f-0"),
            Some(RankDirOwner { host: "0123abcd".into(), pid: 77 })
        );
        assert_eq!(temp_dir_owner("ck", ".ck.tmp-1234-17a3f-0"), Some(1234));
        assert_eq!(rank_dir_owner("ck", ".ck.tmp-1234-17a3f-0"), None);
    }

    #[test]
    fn own_suffixes_fit_the_bound() {
        let longest = format!("{}-{:x}-{}", u32::MAX, u128::MAX, u64::MAX);
        assert!(longest.len() <= MAX_OWN_SUFFIX, "{}", longest.len());
        let longest_rank = format!("{RANK_ID_PREFIX}{}-{}-{:x}-{}", host_tag(), u32::MAX, u64::MAX, u64::MAX);
        assert!(longest_rank.len() <= MAX_OWN_SUFFIX, "{}", longest_rank.len());
        assert!(format!("removing-{}", u32::MAX).len() <= MAX_OWN_SUFFIX);
    }

    #[test]
    fn save_targets_refuse_reserved_and_long_names() {
        for bad in [".ck.tmp-1-2-3", ".x.tmp-anything", ".ck.lock"] {
            let err = split_save_target(Path::new(bad)).unwrap_err();
            assert!(matches!(err, Error::InvalidCheckpoint(_)), "{bad}: {err}");
        }
        let longest = "n".repeat(MAX_CHECKPOINT_NAME);
        assert!(split_save_target(Path::new(&longest)).is_ok());
        let temp = temp_dir_path(Path::new("."), &longest, &unique_suffix());
        assert!(temp.file_name().unwrap().len() <= NAME_MAX);
        let err = split_save_target(Path::new(&format!("{longest}n"))).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        for good in ["step-10", ".hidden", "epoch=0-step=10.ckpt", ".ck.tmp"] {
            assert!(split_save_target(Path::new(good)).is_ok(), "{good}");
        }
    }

    #[test]
    fn save_ids_must_fit_with_the_name() {
        assert!(validate_save_id(Path::new("ck"), "step-100").is_ok());
        assert!(validate_save_id(Path::new("ck"), "a/b").is_err());
        assert!(validate_save_id(Path::new("ck"), &"s".repeat(MAX_SAVE_ID + 1)).is_err());
        let name = "n".repeat(MAX_CHECKPOINT_NAME);
        let err = validate_save_id(Path::new(&name), &"s".repeat(MAX_SAVE_ID)).unwrap_err();
        assert!(err.to_string().contains("more than 255"), "{err}");
    }
}
