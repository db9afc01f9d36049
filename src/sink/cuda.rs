//! CUDA device memory as a [`TensorSink`] (feature `cuda`): each piece is copied from the
//! (page-locked) staging buffer with `cuMemcpyHtoDAsync` on a stream of the copy thread's
//! own, while the CRC of the same bytes is computed on the host; the stream is synchronized
//! before the buffer goes back to be read into again, so the next reads overlap the copies.

use std::sync::Arc;

use super::{check_range, Claims, Expect, SinkWriter, TensorMeta, TensorSink};
use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::source::cuda::{CopyStream, CudaContext, CudaEvent};

/// One destination: `len` bytes of device memory at `ptr`, checked against a dtype and a
/// shape when given.
#[derive(Debug, Clone)]
pub struct CudaDest {
    /// The tensor's name in the checkpoint.
    pub name: String,
    ptr: u64,
    len: usize,
    dtype: Option<Dtype>,
    shape: Option<Vec<u64>>,
}

impl CudaDest {
    /// A destination of `len` bytes at device address `ptr` (a tensor's `data_ptr()`),
    /// checked against `dtype` and `shape` when given.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be device memory of the sink's context that nothing else uses
    /// until the load has returned, and must not overlap another destination.
    pub unsafe fn from_raw(
        name: String,
        ptr: u64,
        len: usize,
        dtype: Option<Dtype>,
        shape: Option<Vec<u64>>,
    ) -> CudaDest {
        CudaDest { name, ptr, len, dtype, shape }
    }
}

/// Device memory of one CUDA context, filled by a load (see the module docs).
pub struct CudaSink {
    ctx: Arc<CudaContext>,
    /// Copies wait for it (recorded on the stream the destinations were allocated on).
    after: Option<Arc<CudaEvent>>,
    dests: Vec<CudaDest>,
    claims: Claims,
}

impl CudaSink {
    /// A sink over `dests` in `ctx`; two with the same name are refused.
    ///
    /// # Safety
    /// Every destination must satisfy [`CudaDest::from_raw`]'s contract.
    pub unsafe fn new(ctx: Arc<CudaContext>, dests: Vec<CudaDest>) -> Result<CudaSink> {
        let claims = Claims::new(dests.iter().map(|d| d.name.clone()).collect())?;
        Ok(CudaSink { ctx, after: None, dests, claims })
    }
}

impl CudaSink {
    /// Orders every copy into the destinations after `event`, recorded on the stream that
    /// last used their memory (torch's current stream, where they were allocated), so that
    /// no copy lands while earlier work there still uses it. The event must belong to the
    /// sink's context.
    pub fn after(mut self, event: Arc<CudaEvent>) -> Result<CudaSink> {
        if event.context().raw() != self.ctx.raw() {
            return Err(Error::InvalidCheckpoint(format!(
                "an event of CUDA device {} cannot order copies on device {}",
                event.context().ordinal(),
                self.ctx.ordinal()
            )));
        }
        self.after = Some(event);
        Ok(self)
    }
}

impl TensorSink for CudaSink {
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
        let stream = self.ctx.copy_stream()?;
        if let Some(event) = &self.after {
            stream.wait_for(event)?;
        }
        Ok(Box::new(CudaWriter { sink: self, stream, queued: false }))
    }
}

struct CudaWriter<'s> {
    sink: &'s CudaSink,
    stream: CopyStream<'s>,
    /// Whether a copy was queued since the last synchronize.
    queued: bool,
}

impl SinkWriter for CudaWriter<'_> {
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
        // SAFETY: the range lies inside the destination (checked above), device memory of
        // the sink's context lent to it (`CudaDest::from_raw`); `bytes` (the staging buffer)
        // is not reused before `flush` synchronizes the stream.
        unsafe { self.stream.copy_to_device(dest.ptr + start as u64, bytes) }?;
        self.queued = true;
        // The CRC runs on the host while the DMA engine copies.
        if let Some(crc) = crc {
            crc.update(bytes);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if std::mem::take(&mut self.queued) {
            self.stream.synchronize()?;
        }
        Ok(())
    }
}

impl Drop for CudaWriter<'_> {
    fn drop(&mut self) {
        // A failed load may drop the writer without a flush: no copy may outlive it (the
        // staging buffers go back to the pool).
        if self.queued {
            if let Err(e) = self.stream.synchronize() {
                log::warn!("synchronizing a load's copy stream failed: {e}");
            }
        }
    }
}
