//! `TensorSource`: the bytes behind one tensor, wherever they live.

use std::sync::Arc;

use crate::error::Result;
use crate::io::Registrar;

/// The bytes of one tensor. Host memory hands out a slice (so the writer can send it to disk
/// without a copy); other memory (a device) copies ranges into the writer's staging buffers.
pub trait TensorSource: Send + Sync {
    /// Length in bytes.
    fn len(&self) -> usize;

    /// Whether the tensor has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, when they are plain host memory that can be read at any time.
    fn host_bytes(&self) -> Option<&[u8]>;

    /// Copies bytes `[offset, offset + dst.len())` of the tensor into `dst` (a staging
    /// buffer). Called in increasing offset order, one staging chunk at a time.
    fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<()>;

    /// A registrar that makes host memory faster to copy into from this source (for CUDA
    /// memory: page-locking with `cuMemHostRegister`), for host areas that are filled from it
    /// again and again (the snapshot area of `background`). `None` (the default) for sources
    /// that gain nothing from it.
    fn host_registrar(&self) -> Option<Arc<dyn Registrar>> {
        None
    }
}

impl TensorSource for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn host_bytes(&self) -> Option<&[u8]> {
        Some(self)
    }

    fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        dst.copy_from_slice(&self[offset..offset + dst.len()]);
        Ok(())
    }
}

/// Host byte containers: their bytes are the tensor, readable at any time.
macro_rules! host_source {
    ($($ty:ty),*) => {$(
        impl TensorSource for $ty {
            fn len(&self) -> usize {
                <[u8]>::len(self)
            }

            fn host_bytes(&self) -> Option<&[u8]> {
                Some(self)
            }

            fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
                self[..].copy_to(offset, dst)
            }
        }
    )*};
}

host_source!(Vec<u8>, bytes::Bytes, crate::io::AlignedBuf);
