//! A directory opened once, and the files in it opened by name relative to it.
//!
//! Whoever can write a checkpoint's files controls all of them, so a checkpoint directory
//! is read as if it were hostile:
//! - a member is named by one path component (no `/`, not `.` or `..`) and opened relative
//!   to the directory's descriptor, never through a symbolic link: `openat2` with
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` where the kernel has it, else `openat` with
//!   `O_NOFOLLOW` (equivalent for one component);
//! - only regular files are opened: the entry is checked with `fstatat` (no link followed)
//!   before the open, so a FIFO, a device or a socket is never opened (opening a FIFO
//!   blocks, opening a device can have effects); the open itself is non-blocking, and the
//!   opened descriptor is checked again with `fstat` (the entry may have been swapped in
//!   between);
//! - reads are capped at a size the caller states (what the manifest says), never at what
//!   the file says about itself.
//!
//! The directory itself is opened by the path the caller gave (links in that path are the
//! caller's choice).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// Whether `name` is one plain path component: not empty, not `.` or `..`, no `/` or NUL.
pub fn is_single_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.bytes().any(|b| b == b'/' || b == 0)
}

/// A directory, held open; its files are opened relative to it (see the module docs).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// What the entry at a name is, as `fstatat` without following links says.
fn entry_kind(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symbolic link",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFSOCK => "a socket",
        _ => "an unknown kind of file",
    }
}

/// Set once the kernel (or a seccomp filter) refused `openat2`; then `openat` is used.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

impl Dir {
    /// Opens the directory at `path`.
    pub fn open(path: &Path) -> Result<Dir> {
        let c = c_path(path)?;
        // SAFETY: `c` is a valid NUL-terminated path; open does not keep the pointer.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(Error::io("open directory", path, io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Dir { fd, path: path.to_path_buf() })
    }

    /// The path the directory was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of member `name`, for messages.
    pub fn member_path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The kind of the entry `name` (see [`entry_kind`]), or the error of `fstatat`.
    fn stat_entry(&self, name: &CString) -> io::Result<libc::stat> {
        // SAFETY: a zeroed `stat` is a valid value for fstatat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is open, `name` is NUL-terminated and `st` is writable.
        let rc =
            unsafe { libc::fstatat(self.fd.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        if rc == 0 {
            Ok(st)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Whether a member `name` exists (of any kind; no link followed).
    pub fn contains(&self, name: &str) -> bool {
        member_name(name).is_ok_and(|c| self.stat_entry(&c).is_ok())
    }

    /// Whether the entry `name` is a symbolic link (none is ever followed; this only says
    /// why an open was refused).
    pub fn is_symlink(&self, name: &str) -> bool {
        member_name(name)
            .ok()
            .and_then(|c| self.stat_entry(&c).ok())
            .is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
    }

    /// The names of the entries in the directory (of every kind, `.` and `..` left out),
    /// listed through the descriptor held (not the path, which may have changed since), in
    /// no particular order. At most `max` names are returned; `Ok(None)` says there were
    /// more.
    pub fn names(&self, max: usize) -> Result<Option<Vec<std::ffi::OsString>>> {
        use nix::fcntl::OFlag;
        use std::os::unix::ffi::OsStrExt;
        let listing = |e: nix::Error| Error::io("list directory", &self.path, io::Error::from(e));
        let mut dir = nix::dir::Dir::openat(
            Some(self.fd.as_raw_fd()),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(listing)?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(listing)?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            if names.len() == max {
                return Ok(None);
            }
            names.push(std::ffi::OsStr::from_bytes(name).to_owned());
        }
        Ok(Some(names))
    }

    /// Opens the regular file `name` for reading (with O_DIRECT when `direct`) and returns
    /// it with its length. A link, a directory, a FIFO, a device or a socket at `name` is an
    /// [`Error::Corrupt`] naming what was found; a missing file is an I/O error
    /// (ENOENT).
    pub fn open_file(&self, name: &str, direct: bool) -> Result<(File, u64)> {
        let path = self.member_path(name);
        let c = member_name(name).map_err(|e| Error::io("open", &path, e))?;
        let st = self.stat_entry(&c).map_err(|e| Error::io("open", &path, e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(self.not_regular(name, st.st_mode));
        }
        let fd =
            self.open_beneath(&c, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC).map_err(
                |e| match e.raw_os_error() {
                    Some(libc::ELOOP) | Some(libc::EXDEV) => self.not_regular(name, libc::S_IFLNK),
                    _ => Error::io("open", &path, e),
                },
            )?;
        let file = File::from(fd);
        let meta = self.check_regular(&file, name)?;
        // Blocking reads from here on; O_DIRECT as asked (EINVAL where it is refused).
        set_status_flags(&file, if direct { libc::O_DIRECT } else { 0 })
            .map_err(|e| Error::io("open (O_DIRECT)", &path, e))?;
        Ok((file, meta.len()))
    }

    /// Reads the whole regular file `name`, refusing it when it holds more than `max` bytes
    /// (the file is never read past `max + 1`).
    pub fn read_file(&self, name: &str, max: u64) -> Result<Vec<u8>> {
        let path = self.member_path(name);
        let (file, len) = self.open_file(name, false)?;
        if len > max {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                reason: format!("{name} is {len} bytes, more than the {max} allowed"),
            });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(max.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| Error::io("read", &path, e))?;
        if bytes.len() as u64 > max {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                reason: format!("{name} grew past the {max} bytes allowed while it was read"),
            });
        }
        Ok(bytes)
    }

    /// Creates (truncating) the regular file `name` for writing, with O_DIRECT when
    /// `direct`; a link or anything but a regular file at `name` is refused, not followed.
    pub fn create_file(&self, name: &str, direct: bool) -> Result<File> {
        let path = self.member_path(name);
        let c = member_name(name).map_err(|e| Error::io("create", &path, e))?;
        let mut flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NONBLOCK | libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        let fd = self.open_beneath(&c, flags).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::EXDEV) => self.not_regular(name, libc::S_IFLNK),
            Some(libc::EISDIR) => self.not_regular(name, libc::S_IFDIR),
            _ => Error::io("create", &path, e),
        })?;
        let file = File::from(fd);
        self.check_regular(&file, name)?;
        set_status_flags(&file, if direct { libc::O_DIRECT } else { 0 })
            .map_err(|e| Error::io("create", &path, e))?;
        Ok(file)
    }

    /// fsyncs the directory, so that entries created or renamed in it are durable.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: fsync only reads the descriptor, which `self` keeps open.
        if unsafe { libc::fsync(self.fd.as_raw_fd()) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn not_regular(&self, name: &str, mode: libc::mode_t) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            reason: format!("{name} is {}, not a regular file; refusing to open it", entry_kind(mode)),
        }
    }

    fn check_regular(&self, file: &File, name: &str) -> Result<std::fs::Metadata> {
        let meta = file.metadata().map_err(|e| Error::io("stat", self.member_path(name), e))?;
        if !meta.file_type().is_file() {
            use std::os::unix::fs::MetadataExt;
            return Err(self.not_regular(name, meta.mode() as libc::mode_t));
        }
        Ok(meta)
    }

    /// Opens `name` relative to the directory without following any link.
    fn open_beneath(&self, name: &CString, flags: libc::c_int) -> io::Result<OwnedFd> {
        const MODE: libc::mode_t = 0o644;
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            // SAFETY: open_how is plain integers; all zero is a valid value.
            let mut how: libc::open_how = unsafe { std::mem::zeroed() };
            how.flags = flags as u64;
            how.mode = if flags & libc::O_CREAT != 0 { MODE as u64 } else { 0 };
            how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
            // SAFETY: the descriptor is open, `name` is NUL-terminated, `how` is a valid
            // open_how of the size passed; the kernel keeps none of the pointers.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    self.fd.as_raw_fd(),
                    name.as_ptr(),
                    &how as *const libc::open_how,
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            if fd >= 0 {
                // SAFETY: openat2 returned a new descriptor that nobody else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENOSYS) | Some(libc::EPERM) => NO_OPENAT2.store(true, Ordering::Relaxed),
                _ => return Err(err),
            }
        }
        // SAFETY: as above; openat with O_NOFOLLOW refuses a link in the (single) component.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), name.as_ptr(), flags | libc::O_NOFOLLOW, MODE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openat returned a new descriptor that nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// `name` as a C string, when it is one plain component.
fn member_name(name: &str) -> io::Result<CString> {
    if !is_single_component(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn c_path(path: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidCheckpoint(format!("{} contains a NUL byte", path.display())))
}

/// Clears O_NONBLOCK on `file` and sets `extra` (O_DIRECT, say) in its status flags.
fn set_status_flags(file: &File, extra: libc::c_int) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL only reads the flags of a descriptor `file` keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let wanted = (flags & !libc::O_NONBLOCK) | extra;
    if wanted == flags {
        return Ok(());
    }
    // SAFETY: F_SETFL only changes the status flags of that descriptor.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, wanted) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn reason(err: Error) -> String {
        match err {
            Error::Corrupt { reason, .. } => reason,
            other => panic!("expected Corrupt, got {other}"),
        }
    }

    #[test]
    fn plain_names_only() {
        for bad in ["", ".", "..", "a/b", "/etc/passwd", "../x", "a\0b"] {
            assert!(!is_single_component(bad), "{bad:?}");
        }
        for good in ["model.safetensors", ".hidden", "..x", "manifest.json"] {
            assert!(is_single_component(good), "{good:?}");
        }
    }

    #[test]
    fn regular_files_open_and_reads_are_capped() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), b"hello").unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        assert_eq!(dir.read_file("f", 5).unwrap(), b"hello");
        assert!(reason(dir.read_file("f", 4).unwrap_err()).contains("more than the 4 allowed"));
        let (_, len) = dir.open_file("f", false).unwrap();
        assert_eq!(len, 5);
        let err = dir.open_file("missing", false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        let err = dir.open_file("../f", false).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn links_fifos_devices_and_directories_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"12345678").unwrap();
        symlink(outside.path().join("secret"), tmp.path().join("link")).unwrap();
        symlink("/dev/zero", tmp.path().join("zero")).unwrap();
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        let fifo = CString::new(tmp.path().join("fifo").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path; mkfifo keeps no pointer.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let dir = Dir::open(tmp.path()).unwrap();
        for (name, kind) in
            [("link", "symbolic link"), ("zero", "symbolic link"), ("sub", "directory"), ("fifo", "FIFO")]
        {
            let why = reason(dir.open_file(name, false).unwrap_err());
            assert!(why.contains(kind), "{name}: {why}");
            assert!(!why.contains('8'), "the size of the link's target must not show: {why}");
            let why = reason(dir.read_file(name, 1 << 20).unwrap_err());
            assert!(why.contains(kind), "{name}: {why}");
        }
        // Creating through a planted link is refused and the target is untouched.
        let why = reason(dir.create_file("link", false).unwrap_err());
        assert!(why.contains("symbolic link"), "{why}");
        assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"12345678");
        assert!(reason(dir.create_file("sub", false).unwrap_err()).contains("directory"));
    }

    #[test]
    fn names_are_listed_through_the_descriptor() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a"), b"").unwrap();
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        symlink("/etc/hostname", tmp.path().join("link")).unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let mut names = dir.names(10).unwrap().unwrap();
        names.sort();
        assert_eq!(names, ["a", "link", "sub"].map(std::ffi::OsString::from));
        assert_eq!(dir.names(2).unwrap(), None, "more than max");
        assert!(dir.is_symlink("link"));
        assert!(!dir.is_symlink("a") && !dir.is_symlink("sub") && !dir.is_symlink("missing"));
    }

    #[test]
    fn device_nodes_are_refused_without_opening_them() {
        let tmp = tempfile::tempdir().unwrap();
        let node = CString::new(tmp.path().join("null").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path; mknod keeps no pointer. Creating a device needs root.
        let rc = unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 3)) };
        if rc != 0 {
            eprintln!("skipped: mknod needs CAP_MKNOD ({})", io::Error::last_os_error());
            return;
        }
        let dir = Dir::open(tmp.path()).unwrap();
        let why = reason(dir.open_file("null", false).unwrap_err());
        assert!(why.contains("character device"), "{why}");
    }
}
