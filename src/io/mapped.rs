//! A shard file mapped copy-on-write (`MAP_PRIVATE`): the memory of a mapped load
//! ([`LoadOptions::map`](crate::LoadOptions::map)).
//!
//! A fresh load by reads needs new memory, and the kernel zeroes every new page before the
//! read fills it (on the README's VM that zeroing is the largest part of a fresh load). A
//! file's pages in the page cache are filled by the read itself and never zeroed, so a
//! mapped load's tensors are views of the file's cached pages: nothing is copied in user
//! space and nothing zeroed. Writing a tensor copies that page first (the file never
//! changes), as in `torch.load(mmap=True)` and safetensors' own loads.
//!
//! What the mapping costs, said where the option is offered: the file backs the tensors
//! for as long as they live, so a file truncated meanwhile kills the process with `SIGBUS`
//! when a vanished page is touched, and a file rewritten in place shows its new bytes in
//! pages not written yet (a checkpoint of ours is never rewritten: a save replaces the
//! directory, a removal unlinks, and unlinked files stay readable while mapped). The pages
//! are the page cache's, so the checkpoint also fills the cache (reads by O_DIRECT do not).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use crate::error::{Error, Result};

/// One file mapped whole, private and writable (see the module docs). Unmapped on drop.
#[derive(Debug)]
pub struct MappedFile {
    base: NonNull<u8>,
    len: usize,
    path: PathBuf,
}

// SAFETY: the mapping is plain memory owned by this value (no thread affinity); shared
// access hands out `&[u8]` only, and writes go through views the loader hands out once per
// byte range (see `LoadedTensor`).
unsafe impl Send for MappedFile {}
// SAFETY: as above: `&MappedFile` only reads.
unsafe impl Sync for MappedFile {}

/// How [`MappedFile::advise`] hints the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Advice {
    /// Read the range into the page cache now, in the background (`MADV_WILLNEED`).
    WillNeed,
    /// Map the range's pages now, reading what is not cached (`MADV_POPULATE_READ`).
    PopulateRead,
}

impl MappedFile {
    /// Maps the first `len` bytes of `file` (the length the caller checked; a file shorter
    /// than that raises `SIGBUS` when the missing pages are touched, so the caller states
    /// the length it measured). `path` names the file in errors. An empty file maps nothing.
    pub fn map(file: &File, len: u64, path: &Path) -> Result<MappedFile> {
        let len = usize::try_from(len)
            .map_err(|_| Error::io("mmap", path, std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
        if len == 0 {
            return Ok(MappedFile { base: NonNull::dangling(), len, path: path.to_path_buf() });
        }
        // SAFETY: a new private mapping of an open file at an address the kernel chooses; no
        // existing memory is affected. Writes to it never reach the file (MAP_PRIVATE).
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Error::io("mmap", path, std::io::Error::last_os_error()));
        }
        let base = NonNull::new(raw.cast::<u8>())
            .ok_or_else(|| Error::Internal(format!("mmap of {} returned null", path.display())))?;
        Ok(MappedFile { base, len, path: path.to_path_buf() })
    }

    /// The file this maps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hints the kernel about `[offset, offset + len)` (clamped to the mapping). Returns
    /// false where the advice is refused (`MADV_POPULATE_READ` before Linux 5.14, or an I/O
    /// error reading the file); nothing is changed then.
    pub(crate) fn advise(&self, offset: usize, len: usize, advice: Advice) -> bool {
        let start = offset.min(self.len);
        let end = offset.saturating_add(len).min(self.len);
        if start >= end {
            return true;
        }
        // madvise wants a page-aligned start; the page holding `start` is in the mapping.
        let page = page_size();
        let aligned = start - start % page;
        let flag = match advice {
            Advice::WillNeed => libc::MADV_WILLNEED,
            #[cfg(target_os = "linux")]
            Advice::PopulateRead => libc::MADV_POPULATE_READ,
            #[cfg(not(target_os = "linux"))]
            Advice::PopulateRead => return false,
        };
        // SAFETY: the range lies inside this mapping; both advices change no byte (they read
        // the file into the cache and map its pages as a read fault would).
        unsafe { libc::madvise(self.base.as_ptr().add(aligned).cast(), end - aligned, flag) == 0 }
    }
}

/// The size of a page of memory.
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `base .. base + len` is this mapping (or empty, with a dangling, aligned
        // pointer), alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the mapping was made by `map` with this address and length, and no
            // view of it outlives `self` (views hold the owner alive).
            unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_the_file_and_writes_stay_private() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::File::create(&path).unwrap().write_all(&bytes).unwrap();
        let file = File::open(&path).unwrap();
        let mapped = MappedFile::map(&file, bytes.len() as u64, &path).unwrap();
        assert_eq!(mapped.as_ref(), &bytes[..]);
        assert!(mapped.advise(4097, 8192, Advice::WillNeed));
        assert!(mapped.advise(0, usize::MAX, Advice::PopulateRead) || !cfg!(target_os = "linux"));
        // Writes through the mapping never reach the file.
        // SAFETY: the test owns the mapping; nothing else views it.
        unsafe { mapped.base.as_ptr().add(5).write(0xAA) };
        assert_eq!(mapped.as_ref()[5], 0xAA);
        drop(mapped);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn an_empty_file_maps_nothing() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("empty");
        std::fs::File::create(&path).unwrap();
        let mapped = MappedFile::map(&File::open(&path).unwrap(), 0, &path).unwrap();
        assert!(mapped.as_ref().is_empty());
        assert!(mapped.advise(0, 10, Advice::PopulateRead));
    }
}
