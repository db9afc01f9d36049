//! Copies into large memory that is not read again soon, with non-temporal stores, which
//! write whole cache lines to memory without reading them first.
//!
//! Two copies are of that kind: a load in place copies every staged byte into memory it has
//! not touched for a long time (a model's parameters, gigabytes of them), and an async save
//! copies every tensor into its snapshot area. An ordinary store reads each destination
//! line into the cache before overwriting it (a read for ownership) and later writes it
//! back, so the copy moves three bytes over the memory bus for every byte it delivers, and
//! evicts what the cache holds (a load's staging buffers). A non-temporal store writes the
//! line through write-combining buffers: one byte moved per byte delivered. glibc's `memcpy`
//! (2.36 here) streams only copies above a threshold it derives from the cache size, and on
//! this machine not even 64 MiB ones.
//!
//! Measured on the 2-vCPU AMD EPYC VM of the README (2 MiB staging buffers, hot, copied
//! into 1 GiB touched before; a throwaway program, 6 runs): copy + CRC-32 in 64 KiB pieces
//! took 0.200-0.231 s/GiB with `copy_from_slice` and the CRC of the copy, 0.133-0.163 s/GiB
//! with the CRC of the source and the copy below; the copy alone 0.153-0.179 against
//! 0.072-0.079 s/GiB; 1 GiB into 1 GiB (both cold) in 64 MiB pieces, as a snapshot is
//! copied, 0.257-0.340 against 0.154-0.173 s/GiB.
//!
//! On x86-64 only (SSE2's `movntdq`, in every x86-64 CPU; AVX2's 32-byte form measured the
//! same); elsewhere, and for copies below [`STREAM_MIN`], `copy_from_slice`.

/// Copies shorter than this go through the cache: a small tensor is likely read again soon,
/// and the fence that ends a streamed copy costs more than the lines it saves.
const STREAM_MIN: usize = 16 << 10;

/// Copies `src` into `dst` (same length), with non-temporal stores for all but the
/// unaligned head and tail of copies of at least [`STREAM_MIN`] bytes. The stores are
/// fenced before this returns, so whoever is told of the copy afterwards sees its bytes.
///
/// # Panics
/// When the lengths differ.
pub(crate) fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_streaming takes slices of one length");
    #[cfg(target_arch = "x86_64")]
    if dst.len() >= STREAM_MIN {
        // Head up to the first 16-byte-aligned destination address, body in 64-byte blocks.
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        let body = (dst.len() - head) / 64 * 64;
        let (dst_head, rest) = dst.split_at_mut(head);
        let (dst_body, dst_tail) = rest.split_at_mut(body);
        let (src_head, rest) = src.split_at(head);
        let (src_body, src_tail) = rest.split_at(body);
        dst_head.copy_from_slice(src_head);
        // SAFETY: `dst_body` starts 16-byte aligned (`head` above) and both bodies are the
        // same multiple of 64 bytes long, as `stream_body` requires.
        unsafe { x86::stream_body(dst_body, src_body) };
        dst_tail.copy_from_slice(src_tail);
        return;
    }
    dst.copy_from_slice(src);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};

    /// Copies `src` into `dst` 64 bytes at a time with `movntdq`, then `sfence`.
    ///
    /// # Safety
    /// `dst` starts at a 16-byte-aligned address; both slices have the same length, a
    /// multiple of 64.
    pub(super) unsafe fn stream_body(dst: &mut [u8], src: &[u8]) {
        debug_assert!(dst.len() == src.len() && dst.len() % 64 == 0 && dst.as_ptr() as usize % 16 == 0);
        let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
        for block in (0..dst.len()).step_by(64) {
            // SAFETY: `block + 64 <= len` for both slices (same length, a multiple of 64), so
            // every load and store below stays inside them; the loads are unaligned ones and
            // the stores land at `dst + block + 16k`, 16-byte aligned as `dst` is. SSE2 is
            // part of x86-64.
            unsafe {
                let (s, d) = (s.add(block), d.add(block));
                let a = _mm_loadu_si128(s as *const __m128i);
                let b = _mm_loadu_si128(s.add(16) as *const __m128i);
                let c = _mm_loadu_si128(s.add(32) as *const __m128i);
                let e = _mm_loadu_si128(s.add(48) as *const __m128i);
                _mm_stream_si128(d as *mut __m128i, a);
                _mm_stream_si128(d.add(16) as *mut __m128i, b);
                _mm_stream_si128(d.add(32) as *mut __m128i, c);
                _mm_stream_si128(d.add(48) as *mut __m128i, e);
            }
        }
        // SAFETY: `sfence` has no preconditions; it orders the streamed stores before any
        // later store (the copy thread's report that the piece is in place).
        unsafe { _mm_sfence() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_copies_equal_plain_ones_at_every_alignment_and_length() {
        let src: Vec<u8> = (0..(STREAM_MIN * 4 + 200)).map(|i| (i * 131 % 251) as u8).collect();
        for len in
            [0, 1, 63, STREAM_MIN - 1, STREAM_MIN, STREAM_MIN + 1, STREAM_MIN + 63, STREAM_MIN * 3 + 17]
        {
            for (dst_phase, src_phase) in [(0, 0), (1, 0), (15, 7), (16, 3), (33, 64)] {
                let mut dst = vec![0xAAu8; len + 128];
                let guard = dst.clone();
                copy_streaming(&mut dst[dst_phase..dst_phase + len], &src[src_phase..src_phase + len]);
                assert_eq!(&dst[dst_phase..dst_phase + len], &src[src_phase..src_phase + len], "len {len}");
                assert_eq!(&dst[..dst_phase], &guard[..dst_phase], "head guard, len {len}");
                assert_eq!(&dst[dst_phase + len..], &guard[dst_phase + len..], "tail guard, len {len}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "one length")]
    fn different_lengths_panic() {
        copy_streaming(&mut [0u8; 4], &[0u8; 5]);
    }
}
