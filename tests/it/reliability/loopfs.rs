//! Small real file systems for tests: ext4, XFS or btrfs on a loop device over a sparse image
//! in `CARGO_TARGET_TMPDIR`, or a size-limited tmpfs. Used by the ENOSPC and power-loss tests
//! (ext4) and the file-system matrix (every type). Needs root, `losetup`, the type's `mkfs`
//! and `mount`; [`LoopFs::new`] and [`LoopFs::with_type`] return the reason to skip when they
//! cannot run. Everything is unmounted, detached and removed on drop, even on panic; what a
//! killed test process left behind is released by the next one.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `EXT4_IOC_SHUTDOWN` = `_IOR('X', 125, __u32)` (XFS's `XFS_IOC_GOINGDOWN` is the same).
pub const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D;
/// Shut down after flushing the journal (a crash that lost only the page cache).
pub const EXT4_GOING_FLAGS_LOGFLUSH: u32 = 1;
/// Shut down without flushing the journal (power loss).
pub const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;

/// The file systems a [`LoopFs`] can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
    Btrfs,
    /// A plain tmpfs mount (no loop device, no image).
    Tmpfs,
}

impl FsType {
    /// Every type, in the order the matrix runs them.
    pub const ALL: [FsType; 4] = [FsType::Ext4, FsType::Xfs, FsType::Btrfs, FsType::Tmpfs];

    /// The name `mount -t` and /proc/self/mountinfo use.
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
            FsType::Tmpfs => "tmpfs",
        }
    }

    /// Whether it lives on a loop device.
    pub fn is_block(self) -> bool {
        self != FsType::Tmpfs
    }

    /// The smallest image its mkfs accepts, in MiB (XFS refuses data sections under 300 MiB,
    /// btrfs under about 114 MiB); smaller requests are rounded up to it.
    pub fn min_size_mib(self) -> u64 {
        match self {
            FsType::Ext4 | FsType::Tmpfs => 1,
            FsType::Xfs => 300,
            FsType::Btrfs => 128,
        }
    }

    /// The mkfs program and its arguments before the image path.
    fn mkfs(self) -> (&'static str, &'static [&'static str]) {
        match self {
            // 4 KiB blocks, no reserved blocks (what the ENOSPC tests count on), as before.
            FsType::Ext4 => ("mkfs.ext4", &["-q", "-F", "-b", "4096", "-m", "0"]),
            FsType::Xfs => ("mkfs.xfs", &["-q", "-f"]),
            FsType::Btrfs => ("mkfs.btrfs", &["-q", "-f"]),
            FsType::Tmpfs => ("true", &[]),
        }
    }
}

/// A mounted test file system; unmounted, detached and removed on drop, even on panic.
pub struct LoopFs {
    fs_type: FsType,
    base: PathBuf,
    image: Option<PathBuf>,
    device: Option<String>,
    mount: PathBuf,
    size_mib: u64,
    mounted: bool,
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn have(tool: &str) -> bool {
    run("sh", &["-c", &format!("command -v {tool}")]).is_ok()
}

impl LoopFs {
    /// Creates, formats and mounts a `size_mib` MiB ext4 file system (4 KiB blocks, no
    /// reserved blocks). `Err` is the reason to skip.
    pub fn new(name: &str, size_mib: u64) -> Result<LoopFs, String> {
        LoopFs::with_type(FsType::Ext4, name, size_mib)
    }

    /// Creates, formats and mounts a file system of `fs_type` of `size_mib` MiB (at least
    /// [`FsType::min_size_mib`]): an image under `CARGO_TARGET_TMPDIR` on a loop device, or a
    /// tmpfs limited to that size. `Err` is the reason to skip (not root, a tool missing, no
    /// free loop device, the kernel refusing the mount); whatever was set up before the
    /// failure is undone.
    pub fn with_type(fs_type: FsType, name: &str, size_mib: u64) -> Result<LoopFs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(format!("{}: needs root for losetup and mount", fs_type.name()));
        }
        let (mkfs, mkfs_args) = fs_type.mkfs();
        let tools: &[&str] =
            if fs_type.is_block() { &["losetup", mkfs, "mount", "umount"] } else { &["mount", "umount"] };
        for tool in tools {
            if !have(tool) {
                return Err(format!("{}: {tool} is not installed", fs_type.name()));
            }
        }
        static REAP: std::sync::Once = std::sync::Once::new();
        REAP.call_once(reap_stale);
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "loopfs-{}-{name}-{}",
            fs_type.name(),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).map_err(|e| e.to_string())?;
        let mount = base.join("mnt");
        // From here on, drop undoes whatever was set up.
        let mut lfs = LoopFs {
            fs_type,
            base,
            image: None,
            device: None,
            mount,
            size_mib: size_mib.max(fs_type.min_size_mib()),
            mounted: false,
        };
        fs::create_dir(&lfs.mount).map_err(|e| e.to_string())?;
        if fs_type.is_block() {
            let image = lfs.base.join("fs.img");
            let file = fs::File::create(&image).map_err(|e| e.to_string())?;
            file.set_len(lfs.size_mib << 20).map_err(|e| e.to_string())?;
            drop(file);
            let image_str = image.to_str().ok_or("path")?.to_owned();
            lfs.image = Some(image);
            let mut args = mkfs_args.to_vec();
            args.push(&image_str);
            run(mkfs, &args).map_err(|e| format!("{}: {e}", fs_type.name()))?;
            let device = run("losetup", &["--find", "--show", &image_str])
                .map_err(|e| format!("{}: no loop device: {e}", fs_type.name()))?;
            lfs.device = Some(device);
        }
        lfs.mount().map_err(|e| format!("{}: mount refused: {e}", fs_type.name()))?;
        Ok(lfs)
    }

    fn mount(&mut self) -> Result<(), String> {
        let target = self.mount.to_str().ok_or("path")?.to_owned();
        match &self.device {
            Some(device) => run("mount", &["-t", self.fs_type.name(), device, &target])?,
            None => {
                let options = format!("size={}m,mode=0755", self.size_mib);
                run("mount", &["-t", "tmpfs", "-o", &options, "uring-ckpt-test", &target])?
            }
        };
        self.mounted = true;
        Ok(())
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// The file system type.
    pub fn fs_type(&self) -> FsType {
        self.fs_type
    }

    /// The loop device (`/dev/loopN`), `None` for tmpfs.
    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    /// The image file behind the loop device, `None` for tmpfs.
    pub fn image(&self) -> Option<&Path> {
        self.image.as_deref()
    }

    /// Unmounts and mounts again (replaying the journal after a shutdown). On tmpfs this
    /// loses every file, as a reboot would.
    pub fn remount(&mut self) -> Result<(), String> {
        run("umount", &[self.mount.to_str().ok_or("path")?])?;
        self.mounted = false;
        self.mount()
    }

    /// An open descriptor of the mount point, for [`shutdown`].
    pub fn dir_fd(&self) -> i32 {
        let c = CString::new(self.mount.as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: c is a valid NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
        assert!(fd >= 0, "open {}: {}", self.mount.display(), std::io::Error::last_os_error());
        fd
    }

    /// Free bytes for an unprivileged writer (after a sync).
    pub fn free_bytes(&self) -> u64 {
        sync_fs(&self.mount);
        let c = CString::new(self.mount.as_os_str().as_bytes()).expect("no NUL");
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: c is a valid path and st points to writable memory of the right size.
        let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
        assert_eq!(rc, 0, "statvfs");
        // SAFETY: statvfs returned 0 and filled it.
        let st = unsafe { st.assume_init() };
        st.f_bavail * st.f_frsize
    }

    /// Fills the file system with a preallocated file so that about `leave` bytes stay free.
    pub fn fill_leaving(&self, leave: u64) {
        let filler = self.mount.join("filler");
        let _ = fs::remove_file(&filler);
        let free = self.free_bytes();
        let want = free.saturating_sub(leave);
        let file = fs::File::create(&filler).expect("filler");
        if want > 0 {
            use std::os::fd::AsRawFd;
            // SAFETY: fallocate on an open descriptor with valid offsets.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, want as libc::off_t) };
            assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
        }
        file.sync_all().expect("sync filler");
    }

    /// Removes the filler file.
    pub fn unfill(&self) {
        let _ = fs::remove_file(self.mount.join("filler"));
        sync_fs(&self.mount);
    }
}

/// `EXT4_IOC_SHUTDOWN` with `flags` on the file system of `fd`.
pub fn shutdown(fd: i32, flags: u32) -> i32 {
    // SAFETY: the ioctl reads a u32 from the pointer, which is valid for the call.
    unsafe { libc::ioctl(fd, EXT4_IOC_SHUTDOWN as _, &flags as *const u32) }
}

fn sync_fs(path: &Path) {
    if let Ok(dir) = fs::File::open(path) {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on an open descriptor.
        unsafe { libc::syncfs(dir.as_raw_fd()) };
    }
}

/// Releases what test processes that were killed (SIGKILL, Ctrl-C: no drop ran) left under
/// `CARGO_TARGET_TMPDIR`: `loopfs-*-<pid>` directories whose process is gone, their mounts
/// and loop devices.
fn reap_stale() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let Ok(entries) = fs::read_dir(tmp) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("loopfs-").and_then(|r| r.rsplit('-').next()?.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let base = entry.path();
        let mount = base.join("mnt").to_string_lossy().into_owned();
        let mounted = || {
            let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            info.lines().any(|l| l.split(' ').nth(4) == Some(mount.as_str()))
        };
        if mounted() {
            let _ = run("umount", &["-l", &mount]);
        }
        let image = base.join("fs.img").to_string_lossy().into_owned();
        if let Ok(list) = run("losetup", &["-j", &image]) {
            for device in list.lines().filter_map(|l| l.split(':').next()) {
                let _ = run("losetup", &["-d", device]);
            }
        }
        if !mounted() {
            let _ = fs::remove_dir_all(&base);
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let target = self.mount.to_string_lossy().into_owned();
        if self.mounted && run("umount", &[&target]).is_err() {
            // Busy (a file still open after a failed assertion): detach it lazily so that
            // the loop device is released once the last user goes.
            let _ = run("umount", &["-l", &target]);
        }
        if let Some(device) = &self.device {
            let _ = run("losetup", &["-d", device]);
        }
        let _ = fs::remove_dir_all(&self.base);
    }
}
