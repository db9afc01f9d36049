//! [`HostSink`]: a load into existing host memory, in place.

use std::marker::PhantomData;

use super::{check_range, copy_hashing, Claims, Expect, SinkWriter, TensorMeta, TensorSink};
use crate::error::{Error, Result};
use crate::format::Dtype;

/// One destination of a [`HostSink`]: where the tensor `name` goes, and optionally what it
/// must be (checked before anything is read).
#[derive(Debug, Clone)]
pub struct HostDest {
    /// The tensor's name in the checkpoint.
    pub name: String,
    ptr: *mut u8,
    len: usize,
    /// The dtype the destination has, when known (a torch tensor's).
    pub dtype: Option<Dtype>,
    /// The shape the destination has, when known.
    pub shape: Option<Vec<u64>>,
}

impl HostDest {
    /// A destination of `len` bytes at `ptr`, with no dtype or shape to check.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be writable memory that nothing else reads or writes until the
    /// load that uses the sink has returned, and must not overlap another destination.
    pub unsafe fn from_raw(name: String, ptr: *mut u8, len: usize) -> HostDest {
        HostDest { name, ptr, len, dtype: None, shape: None }
    }

    /// The same destination, checked against the tensor's dtype and shape as well.
    pub fn expecting(mut self, dtype: Dtype, shape: Vec<u64>) -> HostDest {
        self.dtype = Some(dtype);
        self.shape = Some(shape);
        self
    }

    /// The destination's address.
    pub fn address(&self) -> usize {
        self.ptr as usize
    }

    /// Bytes of the destination.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the destination holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Existing host memory, written in place by a load: each destination is a named byte range
/// (a tensor's storage). A tensor of the checkpoint with no destination is skipped; one
/// whose destination has another size, dtype or shape is a mismatch.
pub struct HostSink<'a> {
    dests: Vec<HostDest>,
    claims: Claims,
    _memory: PhantomData<&'a mut [u8]>,
}

// SAFETY: the destinations are disjoint byte ranges that the sink's creator lends it
// exclusively (borrowed `&mut [u8]`s, or the contract of `HostDest::from_raw`). Each is
// claimed by at most one tensor (`open` refuses a second claim), and the load hands each
// byte of a tensor to exactly one `write`, so concurrent writers never touch the same byte.
unsafe impl Send for HostSink<'_> {}
// SAFETY: as above.
unsafe impl Sync for HostSink<'_> {}

impl<'a> HostSink<'a> {
    /// A sink over borrowed byte slices, by tensor name.
    pub fn new(dests: impl IntoIterator<Item = (String, &'a mut [u8])>) -> Result<HostSink<'a>> {
        // SAFETY: each slice is borrowed mutably for 'a, so it is writable, unaliased and
        // disjoint from the others for as long as the sink lives.
        let dests = dests
            .into_iter()
            .map(|(name, buf)| unsafe { HostDest::from_raw(name, buf.as_mut_ptr(), buf.len()) });
        // SAFETY: as above; `from_dests` only checks names.
        unsafe { HostSink::from_dests(dests.collect()) }
    }

    /// A sink over raw destinations (see [`HostDest::from_raw`] for what they must be).
    /// Two destinations with the same name are refused.
    ///
    /// # Safety
    /// Every destination must stay valid, exclusive to the sink and disjoint from the others
    /// for `'a`.
    pub unsafe fn from_dests(dests: Vec<HostDest>) -> Result<HostSink<'a>> {
        let claims = Claims::new(dests.iter().map(|d| d.name.clone()).collect())?;
        Ok(HostSink { dests, claims, _memory: PhantomData })
    }
}

impl TensorSink for HostSink<'_> {
    fn open(&self, tensor: &TensorMeta<'_>) -> Result<Option<usize>> {
        self.claims.claim(tensor, |slot| {
            let dest = &self.dests[slot];
            Expect { len: dest.len, dtype: dest.dtype, shape: dest.shape.as_deref() }
        })
    }

    fn unclaimed(&self) -> Vec<String> {
        self.claims.unclaimed()
    }

    fn writer(&self) -> Result<Box<dyn SinkWriter + '_>> {
        Ok(Box::new(HostWriter { sink: self }))
    }

    fn host_memory(&self, slot: usize) -> Option<(*mut u8, usize)> {
        self.dests.get(slot).map(|d| (d.ptr, d.len))
    }
}

struct HostWriter<'s, 'a> {
    sink: &'s HostSink<'a>,
}

impl SinkWriter for HostWriter<'_, '_> {
    fn write(
        &mut self,
        slot: usize,
        at: u64,
        bytes: &[u8],
        crc: Option<&mut crc32fast::Hasher>,
    ) -> Result<()> {
        let dest =
            self.sink.dests.get(slot).ok_or_else(|| Error::Internal(format!("no destination {slot}")))?;
        let start = check_range(&dest.name, dest.len, at, bytes.len())?;
        if bytes.is_empty() {
            return Ok(());
        }
        // SAFETY: `start + bytes.len() <= dest.len` (checked above) and the destination is
        // writable and lent to the sink exclusively; the load hands this byte range to this
        // write only (see the `Sync` impl), so no other thread touches it meanwhile.
        let dst = unsafe { std::slice::from_raw_parts_mut(dest.ptr.add(start), bytes.len()) };
        copy_hashing(dst, bytes, crc);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}
