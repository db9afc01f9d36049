//! [`Releasable`]: a source a save can let go of while it still holds a view of it, so that
//! memory behind a source (a CUDA tensor, the temporary contiguous copy made for it) goes back
//! as soon as the save has staged it rather than once the save is durable.

use std::sync::{Arc, PoisonError, RwLock};

use crate::error::{Error, Result};
use crate::io::Registrar;
use crate::source::TensorSource;

/// Wraps a shared source; [`Releasable::release`] drops the wrapper's reference. Reading a
/// released source is an error (never a read of freed memory). Host memory is not handed out
/// ([`TensorSource::host_bytes`] is `None`: a slice could outlive the release), so host
/// sources are copied through [`TensorSource::copy_to`] (the CRC then runs over the staging
/// buffer just written, instead of in the same pass): use it where no zero-copy write is
/// wanted anyway (a save that reports *staged*). Each copy takes one uncontended read lock.
pub struct Releasable {
    inner: RwLock<Option<Arc<dyn TensorSource>>>,
    len: usize,
}

impl std::fmt::Debug for Releasable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Releasable").field("len", &self.len).field("released", &self.is_released()).finish()
    }
}

impl Releasable {
    /// Holds `source` until released.
    pub fn new(source: Arc<dyn TensorSource>) -> Releasable {
        let len = source.len();
        Releasable { inner: RwLock::new(Some(source)), len }
    }

    /// Drops the reference to the source (waiting for a copy from it in progress).
    pub fn release(&self) {
        let taken = self.inner.write().unwrap_or_else(PoisonError::into_inner).take();
        drop(taken);
    }

    /// Whether [`Releasable::release`] ran.
    pub fn is_released(&self) -> bool {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).is_none()
    }
}

impl TensorSource for Releasable {
    fn len(&self) -> usize {
        self.len
    }

    fn host_bytes(&self) -> Option<&[u8]> {
        None
    }

    fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        match inner.as_ref() {
            Some(source) => source.copy_to(offset, dst),
            None => Err(Error::Internal(format!(
                "a source of {} bytes was read after the save released it (staged)",
                self.len
            ))),
        }
    }

    fn host_registrar(&self) -> Option<Arc<dyn Registrar>> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).as_ref().and_then(|s| s.host_registrar())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_drops_the_reference_and_later_reads_fail() {
        let bytes: Arc<dyn TensorSource> = Arc::new(vec![1u8, 2, 3, 4]);
        let weak = Arc::downgrade(&bytes);
        let wrapped = Releasable::new(bytes);
        let mut dst = [0u8; 2];
        wrapped.copy_to(1, &mut dst).expect("copy");
        assert_eq!(dst, [2, 3]);
        assert!(wrapped.host_bytes().is_none());
        assert_eq!(wrapped.len(), 4);
        wrapped.release();
        assert!(weak.upgrade().is_none(), "the source is freed at release");
        assert!(wrapped.is_released());
        assert!(matches!(wrapped.copy_to(0, &mut dst), Err(Error::Internal(_))));
        assert_eq!(wrapped.len(), 4);
    }
}
