//! A small ext4 file system on a loop device, for real ENOSPC and power-loss tests. Needs
//! root, `losetup`, `mkfs.ext4` and `mount`; [`LoopFs::new`] says why when it cannot run.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `EXT4_IOC_SHUTDOWN` = `_IOR('X', 125, __u32)`.
pub const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D;
/// Shut down after flushing the journal (a crash that lost only the page cache).
pub const EXT4_GOING_FLAGS_LOGFLUSH: u32 = 1;
/// Shut down without flushing the journal (power loss).
pub const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;

/// A mounted loop-device ext4 file system; unmounted and detached on drop, even on panic.
pub struct LoopFs {
    image: PathBuf,
    device: String,
    mount: PathBuf,
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

impl LoopFs {
    /// Creates, formats and mounts a `size_mib` MiB ext4 file system (4 KiB blocks, no
    /// reserved blocks). `Err` is the reason to skip.
    pub fn new(name: &str, size_mib: u64) -> Result<LoopFs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root for losetup and mount".into());
        }
        for tool in ["losetup", "mkfs.ext4", "mount", "umount"] {
            if run("sh", &["-c", &format!("command -v {tool}")]).is_err() {
                return Err(format!("{tool} is not installed"));
            }
        }
        let base =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("loopfs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).map_err(|e| e.to_string())?;
        let image = base.join("fs.img");
        let mount = base.join("mnt");
        fs::create_dir(&mount).map_err(|e| e.to_string())?;
        let file = fs::File::create(&image).map_err(|e| e.to_string())?;
        file.set_len(size_mib << 20).map_err(|e| e.to_string())?;
        drop(file);
        run("mkfs.ext4", &["-q", "-F", "-b", "4096", "-m", "0", image.to_str().ok_or("path")?])?;
        let device = run("losetup", &["--find", "--show", image.to_str().ok_or("path")?])?;
        let mut fs = LoopFs { image, device, mount, mounted: false };
        fs.mount()?;
        Ok(fs)
    }

    fn mount(&mut self) -> Result<(), String> {
        run("mount", &["-t", "ext4", &self.device, self.mount.to_str().ok_or("path")?])?;
        self.mounted = true;
        Ok(())
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Unmounts and mounts again (replaying the journal after a shutdown).
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

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted && run("umount", &[&self.mount.to_string_lossy()]).is_err() {
            let _ = run("umount", &["-l", &self.mount.to_string_lossy()]);
        }
        let _ = run("losetup", &["-d", &self.device]);
        if let Some(base) = self.image.parent() {
            let _ = fs::remove_dir_all(base);
        }
    }
}
