//! [`Reuse`]: a small cache of handles that are costly to create (CUDA streams), lent to one
//! user at a time and kept for the next one instead of destroyed. Device-agnostic, so the
//! lending logic is tested without a GPU; `cuda::CudaContext` keeps one per context.

use std::sync::{Mutex, PoisonError};

/// Idle handles of type `T`, each lent to one user at a time ([`Reuse::lease`]); at most as
/// many exist as were ever in use at once. Whoever owns the `Reuse` destroys the idle
/// handles it takes back with [`Reuse::drain`].
#[derive(Debug)]
pub struct Reuse<T> {
    idle: Mutex<Vec<T>>,
    created: Mutex<u64>,
}

impl<T> Default for Reuse<T> {
    fn default() -> Self {
        Reuse { idle: Mutex::new(Vec::new()), created: Mutex::new(0) }
    }
}

/// A handle lent by [`Reuse::lease`]; back in the cache when dropped.
#[derive(Debug)]
pub struct Lease<'a, T> {
    reuse: &'a Reuse<T>,
    item: Option<T>,
}

impl<T> Lease<'_, T> {
    /// The handle.
    pub fn get(&self) -> &T {
        self.item.as_ref().expect("a lease holds its item until dropped")
    }
}

impl<T> Drop for Lease<'_, T> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            self.reuse.idle.lock().unwrap_or_else(PoisonError::into_inner).push(item);
        }
    }
}

impl<T> Reuse<T> {
    /// An idle handle, or a new one from `create`.
    pub fn lease<E>(&self, create: impl FnOnce() -> Result<T, E>) -> Result<Lease<'_, T>, E> {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let item = match idle {
            Some(item) => item,
            None => {
                let item = create()?;
                *self.created.lock().unwrap_or_else(PoisonError::into_inner) += 1;
                item
            }
        };
        Ok(Lease { reuse: self, item: Some(item) })
    }

    /// Handles created over the cache's life.
    pub fn created(&self) -> u64 {
        *self.created.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes every idle handle out (to destroy them).
    pub fn drain(&self) -> Vec<T> {
        std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    #[test]
    fn one_handle_serves_sequential_users() {
        let reuse = Reuse::<u32>::default();
        for _ in 0..1000 {
            let lease = reuse.lease(|| Ok::<_, ()>(7)).expect("lease");
            assert_eq!(*lease.get(), 7);
        }
        assert_eq!(reuse.created(), 1, "one stream for a thousand tensors, not a thousand");
        assert_eq!(reuse.drain(), vec![7]);
    }

    #[test]
    fn concurrent_users_get_distinct_handles_and_no_more_than_needed() {
        let reuse = Reuse::<u64>::default();
        let next = std::sync::atomic::AtomicU64::new(0);
        let barrier = Barrier::new(4);
        for _round in 0..3 {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            let lease = reuse
                                .lease(|| Ok::<_, ()>(next.fetch_add(1, std::sync::atomic::Ordering::SeqCst)))
                                .expect("lease");
                            let v = *lease.get();
                            barrier.wait(); // all four hold a lease at once
                            v
                        })
                    })
                    .collect();
                let mut got: Vec<u64> = handles.into_iter().map(|h| h.join().expect("thread")).collect();
                got.sort_unstable();
                got.dedup();
                assert_eq!(got.len(), 4, "a handle is lent to one user at a time");
            });
        }
        assert_eq!(reuse.created(), 4);
        assert_eq!(reuse.drain().len(), 4);
    }

    #[test]
    fn a_failed_create_lends_nothing() {
        let reuse = Reuse::<u8>::default();
        assert_eq!(reuse.lease(|| Err::<u8, _>("no")).err(), Some("no"));
        assert_eq!(reuse.created(), 0);
        assert!(reuse.drain().is_empty());
    }
}
