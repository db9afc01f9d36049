//! `AlignedBuf`: an owned, zero-initialised heap buffer whose start address and capacity are
//! multiples of a run-time alignment, as O_DIRECT requires. The only owner of its memory.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// An owned buffer aligned for direct I/O.
///
/// The capacity is fixed at allocation; `len` marks how much of it holds data. Memory is
/// zeroed on allocation so that a padded O_DIRECT tail never leaks stale heap bytes.
/// Buffers of [`HUGE_PAGE`] bytes or more are mapped directly and advised to use
/// transparent huge pages, so the kernel pins and faults 2 MiB pages, not 4 KiB ones.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    size: usize,
    align: usize,
    len: usize,
    backing: Backing,
}

/// Where the memory of an [`AlignedBuf`] comes from.
enum Backing {
    /// The global allocator, with this layout.
    Heap(Layout),
    /// An anonymous mapping starting at `base`, `len` bytes long, advised to use
    /// transparent huge pages (`huge`) or not.
    Mapped { base: NonNull<u8>, len: usize, huge: bool },
}

/// Size from which buffers are mapped with huge pages (the x86-64 huge page size).
pub const HUGE_PAGE: usize = 2 << 20;

// SAFETY: AlignedBuf uniquely owns its allocation (like Vec<u8>), so moving it to another
// thread or sharing `&AlignedBuf` is as safe as for Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: see above; shared references only permit reads.
unsafe impl Sync for AlignedBuf {}

/// The CRC follows the copy in pieces this size, so it reads from L1/L2.
const HASH_PIECE: usize = 64 * 1024;

/// Copies `src` into `dst` (the same length) and feeds the copied bytes to `hasher`, piece
/// by piece while they are in cache.
fn copy_hashing_into(dst: &mut [u8], src: &[u8], hasher: &mut crc32fast::Hasher) {
    for (d, s) in dst.chunks_mut(HASH_PIECE).zip(src.chunks(HASH_PIECE)) {
        d.copy_from_slice(s);
        hasher.update(d);
    }
}

/// [`copy_hashing_into`] with a hasher of its own, returned.
fn copy_hashing(dst: &mut [u8], src: &[u8]) -> crc32fast::Hasher {
    let mut hasher = crc32fast::Hasher::new();
    copy_hashing_into(dst, src, &mut hasher);
    hasher
}

impl AlignedBuf {
    /// Allocates `capacity` zeroed bytes aligned to `align`; the capacity is rounded up to a
    /// multiple of `align`. `align` must be a power of two.
    ///
    /// # Panics
    /// Panics if `align` is not a power of two or the size overflows, and aborts on
    /// allocation failure, like `Vec`.
    pub fn zeroed(capacity: usize, align: usize) -> AlignedBuf {
        Self::allocate(capacity, align, true)
    }

    /// Like [`AlignedBuf::zeroed`], without asking for transparent huge pages (`MADV_NOHUGEPAGE`).
    /// Snapshot areas and staging buffers use huge pages (`examples/snapshot_pages.rs`);
    /// a fresh load's read buffer is mapped for huge pages and its helper then advises each
    /// step for whichever size faults in faster (`io/prefault.rs`). This stays for tests
    /// that need memory faulted page by page and for measuring the difference.
    pub fn zeroed_pages(capacity: usize, align: usize) -> AlignedBuf {
        Self::allocate(capacity, align, false)
    }

    fn allocate(capacity: usize, align: usize, huge: bool) -> AlignedBuf {
        assert!(align.is_power_of_two(), "alignment {align} is not a power of two");
        let size = round_up(capacity.max(1), align);
        if size >= HUGE_PAGE {
            if let Some(buf) = Self::mapped(size, align, huge) {
                return buf;
            }
        }
        let layout = Layout::from_size_align(size, align).expect("aligned buffer layout overflows");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        AlignedBuf { ptr, size, align, len: 0, backing: Backing::Heap(layout) }
    }

    /// Maps `size` zeroed bytes aligned to at least `align` and to the huge page size;
    /// `None` if the mapping is refused (the caller then uses the heap).
    fn mapped(size: usize, align: usize, huge: bool) -> Option<AlignedBuf> {
        let page_align = page_align(align, huge);
        let map_len = size.checked_add(page_align)?;
        // SAFETY: an anonymous private mapping at an address the kernel chooses; no
        // existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        let base = NonNull::new(raw.cast::<u8>())?;
        let offset = round_up(base.as_ptr() as usize, page_align) - base.as_ptr() as usize;
        // SAFETY: offset < page_align, so base + offset .. + size lies inside the mapping.
        let ptr = unsafe { NonNull::new_unchecked(base.as_ptr().add(offset)) };
        // One page of the slack after the buffer (page_align - offset > 0 bytes) is faulted
        // in while the mapping is still one, so that every part it is later split into (by
        // the advice below, by page sizes chosen part by part: io/prefault.rs) shares its
        // reverse map (`anon_vma`); parts that do not cannot be merged again, and `grow`
        // (mremap) moves one mapping only.
        // SAFETY: ptr + size lies inside the mapping, in the slack no buffer byte uses, which
        // this buffer owns and never hands out.
        unsafe { ptr.as_ptr().add(size).write_volatile(0) };
        // SAFETY: the range lies inside our mapping; the advice is only a hint and its
        // failure (THP disabled) changes nothing but speed.
        unsafe {
            libc::madvise(
                ptr.as_ptr().cast(),
                size,
                if huge { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE },
            )
        };
        Some(AlignedBuf { ptr, size, align, len: 0, backing: Backing::Mapped { base, len: map_len, huge } })
    }

    /// Enlarges the capacity to at least `capacity` bytes (rounded up to the alignment),
    /// keeping the pages already faulted in: the mapping is moved (`mremap`, page tables
    /// only, no byte copied) onto an address aligned as [`AlignedBuf::zeroed`] aligns, and
    /// only the new tail is fresh (zeroed) memory. `len` is unchanged. Returns false, and
    /// changes nothing, for a buffer not mapped by itself (a small one, on the heap) or
    /// when the kernel refuses; the caller then allocates anew.
    ///
    /// Memory registered elsewhere (page-locked for a device, an io_uring buffer table)
    /// must be unregistered first: its pages move to another address. Parts advised for
    /// another page size than the buffer's (io/prefault.rs) are advised as the buffer again
    /// when the kernel cannot move the buffer otherwise (the pages present keep their size).
    pub fn grow(&mut self, capacity: usize) -> bool {
        let Backing::Mapped { base, len, huge } = self.backing else { return false };
        let new_size = round_up(capacity.max(1), self.align);
        if new_size <= self.size {
            return true;
        }
        let page_align = page_align(self.align, huge);
        let Some(reserve_len) = new_size.checked_add(page_align) else { return false };
        // An address range to land on, so that the moved buffer is aligned as a fresh one.
        // SAFETY: an inaccessible anonymous mapping at an address the kernel chooses; no
        // existing memory is affected.
        let reserved = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reserved == libc::MAP_FAILED {
            return false;
        }
        let reserved = reserved as usize;
        let target = round_up(reserved, page_align);
        let old = self.ptr.as_ptr() as usize;
        // SAFETY: `old..old + size` is the whole of this buffer's pages (the mapping made by
        // `mapped`, split where parts were advised apart), owned by `self` and borrowed by
        // nobody (`&mut self`); the target lies inside our own reservation, which
        // MREMAP_FIXED replaces. The kernel refuses (EFAULT) a range of several mappings.
        let remap = || unsafe {
            libc::mremap(
                old as *mut libc::c_void,
                self.size,
                new_size,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target as *mut libc::c_void,
            )
        };
        let mut moved = remap();
        if moved == libc::MAP_FAILED && std::io::Error::last_os_error().raw_os_error() == Some(libc::EFAULT) {
            // The buffer is several mappings: parts of it were advised for another page size
            // (pages chosen as they were faulted in, io/prefault.rs), and mremap moves one
            // mapping only. Advised as at allocation, the parts merge into one again; the
            // pages present keep their size.
            // SAFETY: the range is this buffer's own pages (as above); the advice changes
            // which pages back later faults, never a byte.
            unsafe {
                libc::madvise(
                    old as *mut libc::c_void,
                    self.size,
                    if huge { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE },
                )
            };
            moved = remap();
        }
        if moved == libc::MAP_FAILED {
            unmap(reserved, reserve_len);
            return false;
        }
        // What is left mapped: the old slack around the old pages, and the reservation's
        // slack around the new ones.
        let base = base.as_ptr() as usize;
        unmap(base, old - base);
        unmap(old + self.size, base + len - (old + self.size));
        unmap(reserved, target - reserved);
        unmap(target + new_size, reserved + reserve_len - (target + new_size));
        // SAFETY: target is the start of the mapping just made (non-null: inside a mapping).
        let ptr = unsafe { NonNull::new_unchecked(target as *mut u8) };
        self.ptr = ptr;
        self.size = new_size;
        self.backing = Backing::Mapped { base: ptr, len: new_size, huge };
        true
    }

    /// Lowers the capacity to `capacity` bytes (rounded up to the alignment and to whole
    /// pages), giving the pages past it back to the system. Returns false, and changes
    /// nothing, for a buffer on the heap. `len` is cut to the new capacity.
    pub fn shrink(&mut self, capacity: usize) -> bool {
        let Backing::Mapped { base, len, huge } = self.backing else { return false };
        let new_size = round_up(round_up(capacity.max(1), self.align), 4096);
        if new_size >= self.size {
            return true;
        }
        let start = self.ptr.as_ptr() as usize;
        let base_addr = base.as_ptr() as usize;
        // The tail of the buffer and the slack after it.
        unmap(start + new_size, base_addr + len - (start + new_size));
        self.size = new_size;
        self.len = self.len.min(new_size);
        self.backing = Backing::Mapped { base, len: start + new_size - base_addr, huge };
        true
    }

    /// Bytes of the capacity backed by memory now (faulted in), as `mincore` reports for
    /// whole pages; the capacity where the kernel does not say.
    pub fn resident_bytes(&self) -> usize {
        let page = 4096usize;
        let start = self.ptr.as_ptr() as usize;
        let first = start & !(page - 1);
        let end = start + self.size;
        let pages = (end - first).div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: `first..end` lies in memory this buffer owns (its first page holds the
        // buffer's first byte; heap buffers are aligned to at least their alignment, and a
        // page of the heap is mapped as a whole); `vec` has one byte per page.
        let ok = unsafe { libc::mincore(first as *mut libc::c_void, end - first, vec.as_mut_ptr()) } == 0;
        if !ok {
            return self.size;
        }
        let resident = vec.iter().filter(|&&b| b & 1 != 0).count() * page;
        resident.min(self.size)
    }

    /// Whether the buffer is a mapping of its own (not on the heap): its pages may then be
    /// advised for a page size, and [`AlignedBuf::grow`] keeps them.
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self.backing, Backing::Mapped { .. })
    }

    /// Bytes this buffer can hold (a multiple of its alignment).
    pub fn capacity(&self) -> usize {
        self.size
    }

    /// The alignment of the start address and capacity.
    pub fn align(&self) -> usize {
        self.align
    }

    /// Bytes currently holding data.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes hold data.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets how many bytes hold data.
    ///
    /// # Panics
    /// Panics if `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "len {len} exceeds capacity {}", self.capacity());
        self.len = len;
    }

    /// Marks the buffer empty (capacity and contents unchanged).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes free after `len`.
    pub fn remaining(&self) -> usize {
        self.capacity() - self.len
    }

    /// Appends as much of `src` as fits; returns how many bytes were taken.
    pub fn extend_from_slice(&mut self, src: &[u8]) -> usize {
        let n = src.len().min(self.remaining());
        let start = self.len;
        self.as_full_mut_slice()[start..start + n].copy_from_slice(&src[..n]);
        self.len += n;
        n
    }

    /// Appends as much of `src` as fits, feeding the copied bytes to `hasher` in the same
    /// pass (piece by piece, while they are still in cache). Returns how many were taken.
    pub fn extend_hashing(&mut self, src: &[u8], hasher: &mut crc32fast::Hasher) -> usize {
        const PIECE: usize = HASH_PIECE;
        let take = src.len().min(self.remaining());
        for piece in src[..take].chunks(PIECE) {
            let start = self.len;
            self.extend_from_slice(piece);
            hasher.update(&self[start..]);
        }
        take
    }

    /// Like [`AlignedBuf::extend_hashing`], with the copy and CRC of the second half of what
    /// fits done on a second thread; the two CRCs are combined (`Hasher::combine`). The
    /// bytes and the CRC are the same as `extend_hashing` gives. For a thread whose copy is
    /// the limit and a machine with a core to spare; small pieces are done on this thread.
    pub fn extend_hashing_split(&mut self, src: &[u8], hasher: &mut crc32fast::Hasher) -> usize {
        /// Below this a thread costs more than half a copy saves.
        const SPLIT_MIN: usize = 1 << 20;
        let take = src.len().min(self.remaining());
        if take < SPLIT_MIN {
            return self.extend_hashing(&src[..take], hasher);
        }
        let start = self.len;
        let half = (take / 2).next_multiple_of(HASH_PIECE).min(take);
        let (src0, src1) = src[..take].split_at(half);
        let dst = &mut self.as_full_mut_slice()[start..start + take];
        let (dst0, dst1) = dst.split_at_mut(half);
        let helped = std::thread::scope(|scope| {
            let helper = std::thread::Builder::new()
                .name("uring-ckpt-copy".into())
                .spawn_scoped(scope, move || copy_hashing(dst1, src1));
            copy_hashing_into(dst0, src0, hasher);
            helper.ok().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        });
        // No thread to be had: this one copies the second half too.
        let second = helped
            .unwrap_or_else(|| copy_hashing(&mut self.as_full_mut_slice()[start + half..start + take], src1));
        hasher.combine(&second);
        self.len = start + take;
        take
    }

    /// Zeroes the bytes from `len` up to the next multiple of `align` and sets `len` there.
    /// Returns the padded length. Used for the O_DIRECT tail.
    pub fn pad_to(&mut self, align: usize) -> usize {
        let padded = round_up(self.len, align).min(self.capacity());
        let start = self.len;
        self.as_full_mut_slice()[start..padded].fill(0);
        self.len = padded;
        padded
    }

    /// The whole capacity as a read-only slice (what a read left there).
    pub fn as_full_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid and initialised (zeroed at allocation) for capacity() bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.capacity()) }
    }

    /// The whole capacity as a slice (for reads into the buffer).
    pub fn as_full_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for capacity() bytes, zero-initialised at allocation, and
        // uniquely borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity()) }
    }

    /// Start address (for io_uring SQEs and `iovec`s).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable start address (for reads).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid and initialised for capacity() >= len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid and initialised for capacity() >= len bytes, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        #[cfg(test)]
        super::pool::testing::freeing(self.ptr.as_ptr() as usize);
        match self.backing {
            // SAFETY: ptr was allocated with exactly this layout and is freed once.
            Backing::Heap(layout) => unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) },
            Backing::Mapped { base, len, .. } => {
                // SAFETY: base..base+len is the mapping made in `mapped`, unmapped once.
                unsafe { libc::munmap(base.as_ptr().cast(), len) };
            }
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .field("align", &self.align())
            .finish()
    }
}

/// The alignment of a mapped buffer's start: its own, and a whole (huge) page.
fn page_align(align: usize, huge: bool) -> usize {
    if huge {
        align.max(HUGE_PAGE)
    } else {
        align.max(4096)
    }
}

/// Unmaps `[at, at + len)` (nothing when `len` is 0): part of a mapping of ours.
fn unmap(at: usize, len: usize) {
    if len > 0 {
        // SAFETY: callers pass a range of a mapping they made and no longer use.
        unsafe { libc::munmap(at as *mut libc::c_void, len) };
    }
}

/// Rounds `n` up to a multiple of `align` (a power of two).
pub fn round_up(n: usize, align: usize) -> usize {
    (n + align - 1) & !(align - 1)
}

/// Rounds `n` up to a multiple of `align` (a power of two), for file offsets.
pub fn round_up_u64(n: u64, align: u64) -> u64 {
    (n + align - 1) & !(align - 1)
}

/// Rounds `n` down to a multiple of `align` (a power of two), for file offsets.
pub fn round_down_u64(n: u64, align: u64) -> u64 {
    n & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_aligned_zeroed_and_rounded() {
        for align in [512, 4096, 65536] {
            let buf = AlignedBuf::zeroed(1000, align);
            assert_eq!(buf.as_ptr() as usize % align, 0);
            assert_eq!(buf.capacity(), align.max(1024).next_multiple_of(align));
            assert!(buf.is_empty());
        }
        let mut buf = AlignedBuf::zeroed(8192, 4096);
        assert!(buf.as_full_mut_slice().iter().all(|&b| b == 0));
    }

    #[test]
    fn large_buffers_are_mapped_aligned_and_zeroed() {
        let mut buf = AlignedBuf::zeroed(3 * HUGE_PAGE + 5, 4096);
        assert_eq!(buf.as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!(buf.align(), 4096);
        assert_eq!(buf.capacity(), (3 * HUGE_PAGE + 5).next_multiple_of(4096));
        assert!(buf.as_full_mut_slice().iter().all(|&b| b == 0));
        buf.as_full_mut_slice().fill(7);
        assert!(buf.as_full_mut_slice().iter().all(|&b| b == 7));
    }

    #[test]
    fn grow_keeps_bytes_and_pages_and_shrink_gives_the_tail_back() {
        for (huge, align) in [(true, 4096), (false, 4096), (false, 65536)] {
            let mut buf = if huge {
                AlignedBuf::zeroed(3 * HUGE_PAGE, align)
            } else {
                AlignedBuf::zeroed_pages(3 * HUGE_PAGE, align)
            };
            let old = buf.capacity();
            buf.as_full_mut_slice()[..5].copy_from_slice(b"hello");
            buf.as_full_mut_slice()[old - 1] = 9;
            let resident = buf.resident_bytes();
            assert!(resident >= 2 * 4096, "two pages touched");
            buf.set_len(5);
            for _ in 0..3 {
                let want = buf.capacity() * 2 + 100;
                assert!(buf.grow(want), "huge {huge}, align {align}");
                assert_eq!(buf.capacity(), want.next_multiple_of(align));
                let page = if huge { HUGE_PAGE } else { align.max(4096) };
                assert_eq!(buf.as_ptr() as usize % page, 0, "aligned as a fresh buffer");
                assert_eq!(&buf[..], b"hello", "len and bytes kept");
                assert_eq!(buf.as_full_slice()[old - 1], 9);
                assert!(buf.as_full_slice()[old..].iter().all(|&b| b == 0), "a fresh, zeroed tail");
                assert!(buf.resident_bytes() >= resident, "faulted pages kept");
            }
            assert!(buf.grow(10), "already large enough");
            let big = buf.capacity();
            buf.as_full_mut_slice().fill(3);
            assert!(buf.resident_bytes() == big);
            assert!(buf.shrink(HUGE_PAGE + 1));
            assert_eq!(buf.capacity(), (HUGE_PAGE + 1).next_multiple_of(align.max(4096)));
            assert_eq!(buf.len(), 5);
            assert!(buf.resident_bytes() <= buf.capacity(), "the tail went back");
            assert!(buf.as_full_slice().iter().all(|&b| b == 3));
            assert!(buf.shrink(big), "shrinking to more is nothing");
        }
        let mut small = AlignedBuf::zeroed(8192, 4096);
        assert!(!small.grow(1 << 20) && !small.shrink(4096), "heap buffers are not remapped");
        assert_eq!(small.capacity(), 8192);
    }

    #[test]
    fn a_buffer_advised_apart_in_parts_still_grows_keeping_its_pages() {
        let mut buf = AlignedBuf::zeroed(4 * HUGE_PAGE, 4096);
        assert!(buf.is_mapped());
        let at = buf.as_mut_ptr() as usize + HUGE_PAGE;
        // SAFETY: the second huge page of the buffer's own mapping; advice changes no byte.
        let advised = unsafe { libc::madvise(at as *mut libc::c_void, HUGE_PAGE, libc::MADV_NOHUGEPAGE) };
        assert_eq!(advised, 0, "the mapping is split in three");
        buf.as_full_mut_slice().fill(7);
        let resident = buf.resident_bytes();
        assert!(buf.grow(6 * HUGE_PAGE), "mremap moves one mapping: the parts are merged first");
        assert!(buf.resident_bytes() >= resident, "faulted pages kept");
        assert!(buf.as_full_slice()[..4 * HUGE_PAGE].iter().all(|&b| b == 7), "and their bytes");
        assert!(buf.as_full_slice()[4 * HUGE_PAGE..].iter().all(|&b| b == 0), "a fresh tail");
        assert!(!AlignedBuf::zeroed(8192, 4096).is_mapped(), "small buffers live on the heap");
    }

    #[test]
    fn extend_and_pad() {
        let mut buf = AlignedBuf::zeroed(8192, 4096);
        buf.as_full_mut_slice().fill(0xAA);
        assert_eq!(buf.extend_from_slice(&[1, 2, 3]), 3);
        assert_eq!(&buf[..], &[1, 2, 3]);
        assert_eq!(buf.pad_to(4096), 4096);
        assert!(buf[3..].iter().all(|&b| b == 0), "padding must be zeroed");
        let big = vec![7u8; 10_000];
        assert_eq!(buf.extend_from_slice(&big), 4096);
        assert_eq!(buf.remaining(), 0);
    }

    #[test]
    fn a_split_copy_gives_the_bytes_and_crc_of_a_plain_one() {
        let src: Vec<u8> = (0..5 * (1 << 20) + 12345).map(|i| (i * 7 % 251) as u8).collect();
        for (prefix, len) in [(0, src.len()), (100, src.len() - 100), (3, 1 << 20), (0, (1 << 20) - 1)] {
            let (mut plain, mut split) =
                (AlignedBuf::zeroed(8 << 20, 4096), AlignedBuf::zeroed(8 << 20, 4096));
            let (mut h1, mut h2) = (crc32fast::Hasher::new(), crc32fast::Hasher::new());
            for (buf, h) in [(&mut plain, &mut h1), (&mut split, &mut h2)] {
                buf.extend_from_slice(&src[..prefix]);
                h.update(&src[..prefix]);
            }
            assert_eq!(plain.extend_hashing(&src[prefix..prefix + len], &mut h1), len);
            assert_eq!(split.extend_hashing_split(&src[prefix..prefix + len], &mut h2), len);
            assert_eq!(&plain[..], &split[..], "prefix {prefix}, len {len}");
            assert_eq!(h1.finalize(), h2.finalize(), "prefix {prefix}, len {len}");
        }
        let mut small = AlignedBuf::zeroed(2 << 20, 4096);
        let mut h = crc32fast::Hasher::new();
        assert_eq!(small.extend_hashing_split(&src, &mut h), 2 << 20, "takes what fits");
        assert_eq!(h.finalize(), crc32fast::hash(&src[..2 << 20]));
    }

    #[test]
    fn rounding() {
        assert_eq!(round_up(0, 4096), 0);
        assert_eq!(round_up(1, 4096), 4096);
        assert_eq!(round_up_u64(4097, 512), 4608);
        assert_eq!(round_down_u64(4097, 4096), 4096);
    }
}
