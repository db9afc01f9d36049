//! Host memory that the caller owns and lends by address, for foreign callers (Python hands
//! a tensor's `data_ptr()` and byte size).

use crate::error::Result;
use crate::source::TensorSource;

/// Host memory lent by address: the bytes `[ptr, ptr + len)`.
///
/// The save reads them until its `staged()` completion resolves (see
/// [`crate::AsyncCheckpointIO`]); after that the memory may be changed or freed.
#[derive(Debug)]
pub struct HostPtrSource {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a HostPtrSource only reads the memory, and `HostPtrSource::new`'s contract makes
// the caller guarantee that the memory stays valid and unmodified while it is read, from
// any thread.
unsafe impl Send for HostPtrSource {}
// SAFETY: as above; shared access only ever reads.
unsafe impl Sync for HostPtrSource {}

impl HostPtrSource {
    /// Lends `len` bytes starting at `ptr`.
    ///
    /// # Safety
    /// Unless `len` is 0, `ptr` must be valid for reads of `len` bytes, and that memory must
    /// stay valid (not freed) and unmodified from this call until the save it is handed to
    /// has resolved its `staged()` completion, or until this source is dropped if it is
    /// never saved. The memory must not be a Rust `&mut` borrow in that time.
    pub unsafe fn new(ptr: *const u8, len: usize) -> HostPtrSource {
        HostPtrSource { ptr, len }
    }

    fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `new`'s contract: ptr is valid for reads of len bytes and unmodified while
        // this source is read.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl TensorSource for HostPtrSource {
    fn len(&self) -> usize {
        self.len
    }

    fn host_bytes(&self) -> Option<&[u8]> {
        Some(self.as_slice())
    }

    fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.as_slice().copy_to(offset, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_lent_bytes() {
        let data: Vec<u8> = (0..100u8).collect();
        // SAFETY: `data` outlives the source and is not modified while it exists.
        let source = unsafe { HostPtrSource::new(data.as_ptr(), data.len()) };
        assert_eq!(source.host_bytes(), Some(&data[..]));
        let mut dst = [0u8; 10];
        source.copy_to(90, &mut dst).expect("copy");
        assert_eq!(&dst[..], &data[90..]);
        // SAFETY: a zero-length source never dereferences its pointer.
        let empty = unsafe { HostPtrSource::new(std::ptr::null(), 0) };
        assert_eq!(empty.host_bytes(), Some(&[][..]));
    }
}
