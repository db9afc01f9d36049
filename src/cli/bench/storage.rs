//! The file system and device a directory lives on: its mount from /proc/self/mountinfo,
//! the block device, and for a loop device the backing file (/sys/class/block/loopN) and
//! whether the bytes end up in memory.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The file system and device a directory lives on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(super) struct Storage {
    /// File system type as /proc/self/mountinfo names it (`xfs`, `ext4`, `btrfs`, `tmpfs`).
    fs_type: String,
    /// Mount source: the block device (`/dev/vda`, `/dev/loop3`) or the pseudo source of a
    /// memory file system.
    device: String,
    mount_point: String,
    /// For a loop device: the file behind it (/sys/block/loopN/loop/backing_file).
    backing_file: Option<String>,
    /// For a loop device: the file system type of the backing file.
    backing_fs_type: Option<String>,
    /// Whether the bytes end up in memory: a tmpfs/ramfs mount, or a loop device whose
    /// backing file is on one (or a /dev/ram or zram device).
    ram_backed: bool,
    /// One line for humans, the same as the text output prints.
    pub(super) summary: String,
}

impl Storage {
    /// Probes the file system of `path` (which must exist).
    pub(super) fn probe(path: &Path) -> Storage {
        let Some(mount) = mount_of(path) else {
            return Storage {
                fs_type: "unknown".to_owned(),
                device: "unknown".to_owned(),
                mount_point: "unknown".to_owned(),
                summary: "an unknown file system (not in /proc/self/mountinfo)".to_owned(),
                ..Storage::default()
            };
        };
        let block = block_name(&mount.source);
        let backing_file = block.as_deref().and_then(loop_backing_file);
        let backing_fs_type = backing_file.as_deref().and_then(|f| mount_of(Path::new(f))).map(|m| m.fs_type);
        let memory_fs = |t: &str| matches!(t, "tmpfs" | "ramfs");
        let ram_block = block.as_deref().is_some_and(|b| b.starts_with("ram") || b.starts_with("zram"));
        let ram_backed =
            memory_fs(&mount.fs_type) || ram_block || backing_fs_type.as_deref().is_some_and(memory_fs);
        let mut storage = Storage {
            fs_type: mount.fs_type,
            device: mount.source,
            mount_point: mount.mount_point,
            backing_file,
            backing_fs_type,
            ram_backed,
            summary: String::new(),
        };
        storage.summary = storage.describe();
        storage
    }

    fn describe(&self) -> String {
        let ram = if self.ram_backed { ": RAM-backed" } else { "" };
        match (&self.backing_file, &self.backing_fs_type) {
            (Some(file), fs) => format!(
                "{} on {} (loop device over {} on {}{ram}), mounted at {}",
                self.fs_type,
                self.device,
                file,
                fs.as_deref().unwrap_or("an unknown file system"),
                self.mount_point
            ),
            (None, _) => format!("{} on {}{ram}, mounted at {}", self.fs_type, self.device, self.mount_point),
        }
    }
}

/// One line of /proc/self/mountinfo, the fields we use.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    fs_type: String,
    source: String,
    mount_point: String,
}

/// The mount that holds `path`: among the mounts whose mount point is above `path`, the
/// longest, preferring one with `path`'s device number (a later mount over the same point
/// hides earlier ones, and btrfs subvolumes have device numbers of their own).
fn mount_of(path: &Path) -> Option<Mount> {
    use std::os::unix::fs::MetadataExt;
    let canonical = fs::canonicalize(path).ok()?;
    let dev = fs::metadata(&canonical).ok()?.dev();
    let wanted = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    best_mount(&info, &canonical, &wanted)
}

fn best_mount(info: &str, path: &Path, wanted_dev: &str) -> Option<Mount> {
    // (same device, mount point length, line order): the greatest wins.
    let mut best: Option<((bool, usize, usize), Mount)> = None;
    for (order, line) in info.lines().enumerate() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else { continue };
        if fields.len() < sep + 3 || sep < 5 {
            continue;
        }
        let mount_point = unescape_mountinfo(fields[4]);
        if !path.starts_with(&mount_point) {
            continue;
        }
        let key = (fields[2] == wanted_dev, mount_point.len(), order);
        if best.as_ref().is_none_or(|(k, _)| key > *k) {
            let mount = Mount {
                fs_type: unescape_mountinfo(fields[sep + 1]),
                source: unescape_mountinfo(fields[sep + 2]),
                mount_point,
            };
            best = Some((key, mount));
        }
    }
    best.map(|(_, m)| m)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The kernel's name of the block device `source` (`/dev/loop3` -> `loop3`, following
/// links such as /dev/mapper/x or /dev/disk/by-*), `None` when it is not a device path.
fn block_name(source: &str) -> Option<String> {
    if !source.starts_with("/dev/") {
        return None;
    }
    let real = fs::canonicalize(source).unwrap_or_else(|_| PathBuf::from(source));
    let name = real.file_name()?.to_str()?.to_owned();
    Path::new("/sys/class/block").join(&name).exists().then_some(name)
}

/// The backing file of the loop device `name` (`loop3`), `None` when it is not one.
fn loop_backing_file(name: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/sys/class/block/{name}/loop/backing_file")).ok()?;
    let file = text.trim_end_matches('\n');
    Some(file.strip_suffix(" (deleted)").unwrap_or(file).to_owned()).filter(|f| !f.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 25 0:27 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24731184k
90 27 7:3 / /mnt/uring\\040ckpt rw,relatime - xfs /dev/loop3 rw
91 27 0:50 / /mnt/over rw,relatime - tmpfs first rw
92 27 0:51 / /mnt/over rw,relatime - tmpfs second rw
";

    #[test]
    fn finds_the_mount_of_a_path() {
        let m = best_mount(INFO, Path::new("/mnt/uring ckpt/a/b"), "7:3").expect("mount");
        assert_eq!(
            (m.fs_type.as_str(), m.source.as_str(), m.mount_point.as_str()),
            ("xfs", "/dev/loop3", "/mnt/uring ckpt")
        );
        let m = best_mount(INFO, Path::new("/work/x"), "254:0").expect("mount");
        assert_eq!((m.fs_type.as_str(), m.source.as_str()), ("ext4", "/dev/vda"));
        // A device number that matches no line (btrfs subvolumes): the longest mount point.
        let m = best_mount(INFO, Path::new("/dev/shm/f"), "0:99").expect("mount");
        assert_eq!(m.fs_type, "tmpfs");
        // Two mounts on one point: the later one is what the path sees.
        let m = best_mount(INFO, Path::new("/mnt/over/x"), "0:1").expect("mount");
        assert_eq!(m.source, "second");
    }

    #[test]
    fn unescapes_mountinfo_fields() {
        assert_eq!(unescape_mountinfo("a\\040b\\011c\\134d"), "a b\tc\\d");
        assert_eq!(unescape_mountinfo("no\\escape\\9"), "no\\escape\\9");
    }

    #[test]
    fn describes_this_machine_storage() {
        let s = Storage::probe(Path::new(env!("CARGO_MANIFEST_DIR")));
        assert_ne!(s.fs_type, "unknown", "{s:?}");
        assert!(s.summary.contains(&s.fs_type) && s.summary.contains(&s.mount_point), "{s:?}");
    }
}
