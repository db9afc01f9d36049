//! The two completions of a background save, [`Staged`] and [`Durable`], and the
//! [`SaveHandle`] that carries them: each can be waited for or awaited as a [`Future`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::job::Shared;
use crate::checkpoint::SaveReport;
use crate::error::{Error, Result};

/// Locks `mutex`, taking over a poisoned one.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent, so a panic elsewhere does not
    // make it unusable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A one-shot completion: a value, a condition variable for blocking waiters and the wakers
/// of futures.
pub(super) struct Completion<T> {
    pub(super) slot: Mutex<Slot<T>>,
    pub(super) ready: Condvar,
}

pub(super) struct Slot<T> {
    done: bool,
    value: Option<T>,
    wakers: Vec<Waker>,
    /// The receiving side is gone: nobody will take the value.
    abandoned: bool,
}

impl<T> Completion<T> {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Completion {
            slot: Mutex::new(Slot { done: false, value: None, wakers: Vec::new(), abandoned: false }),
            ready: Condvar::new(),
        })
    }

    /// Stores the value and wakes every waiter; hands the value back if nobody will take it
    /// or the completion had already happened.
    pub(super) fn complete(&self, value: T) -> Option<T> {
        let wakers = {
            let mut slot = lock(&self.slot);
            if slot.done {
                return Some(value);
            }
            slot.done = true;
            let unclaimed = if slot.abandoned {
                Some(value)
            } else {
                slot.value = Some(value);
                None
            };
            self.ready.notify_all();
            let wakers = std::mem::take(&mut slot.wakers);
            if unclaimed.is_some() {
                drop(slot);
                for w in wakers {
                    w.wake();
                }
                return unclaimed;
            }
            wakers
        };
        for w in wakers {
            w.wake();
        }
        None
    }

    pub(super) fn is_done(&self) -> bool {
        lock(&self.slot).done
    }

    pub(super) fn wait_done(&self) -> MutexGuard<'_, Slot<T>> {
        let mut slot = lock(&self.slot);
        while !slot.done {
            slot = self.ready.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
        slot
    }

    pub(super) fn wait_done_timeout(&self, timeout: Duration) -> bool {
        let Some(deadline) = Instant::now().checked_add(timeout) else {
            drop(self.wait_done()); // past any representable instant: wait without a limit
            return true;
        };
        let mut slot = lock(&self.slot);
        while !slot.done {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            slot = self.ready.wait_timeout(slot, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
        true
    }

    /// Polls: the locked slot when done, else registers the waker.
    pub(super) fn poll_done(&self, cx: &mut Context<'_>) -> Option<MutexGuard<'_, Slot<T>>> {
        let mut slot = lock(&self.slot);
        if slot.done {
            return Some(slot);
        }
        if !slot.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            slot.wakers.push(cx.waker().clone());
        }
        None
    }
}

/// The *staged* completion of a save: the sources may be changed or freed once it
/// resolves. Cheap to clone; every clone resolves at the same time.
#[derive(Clone)]
pub struct Staged {
    inner: Arc<Completion<()>>,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged").field("staged", &self.is_staged()).finish()
    }
}

impl Staged {
    /// Blocks until the save no longer reads its sources.
    pub fn wait(&self) {
        drop(self.inner.wait_done());
    }

    /// Blocks at most `timeout`; returns whether the save is staged.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.inner.wait_done_timeout(timeout)
    }

    /// Whether the save no longer reads its sources.
    pub fn is_staged(&self) -> bool {
        self.inner.is_done()
    }
}

impl Future for Staged {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.inner.poll_done(cx) {
            Some(_) => Poll::Ready(()),
            None => Poll::Pending,
        }
    }
}

/// The *durable* completion of a save: its [`SaveReport`] once the checkpoint is committed,
/// or the error of this save.
///
/// Dropping it before taking a failed result hands the error to
/// [`AsyncCheckpointIO::teardown`], which reports it.
pub struct Durable {
    inner: Arc<Completion<Result<SaveReport>>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable").field("done", &self.is_done()).finish()
    }
}

fn taken_twice() -> Error {
    Error::Internal("the result of this save was already taken".into())
}

impl Durable {
    /// Blocks until the save is committed or has failed; returns its report or error.
    pub fn wait(self) -> Result<SaveReport> {
        let mut slot = self.inner.wait_done();
        slot.value.take().unwrap_or_else(|| Err(taken_twice()))
    }

    /// Blocks at most `timeout`; returns whether the save has finished (committed or
    /// failed). The result stays for [`Durable::wait`].
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.inner.wait_done_timeout(timeout)
    }

    /// Whether the save has finished (committed or failed).
    pub fn is_done(&self) -> bool {
        self.inner.is_done()
    }
}

impl Future for Durable {
    type Output = Result<SaveReport>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.inner.poll_done(cx) {
            Some(mut slot) => Poll::Ready(slot.value.take().unwrap_or_else(|| Err(taken_twice()))),
            None => Poll::Pending,
        }
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        let unobserved = {
            let mut slot = lock(&self.inner.slot);
            slot.abandoned = true;
            match slot.value.take() {
                Some(Err(e)) => Some(e),
                _ => None,
            }
        };
        if let Some(err) = unobserved {
            lock(&self.shared.state).unobserved.push(err);
        }
    }
}

/// What [`AsyncCheckpointIO::save_checkpoint`] returns: the save's two completions.
#[derive(Debug)]
pub struct SaveHandle {
    path: PathBuf,
    staged: Staged,
    durable: Durable,
}

impl SaveHandle {
    /// The handle of a save to `path` whose completions are `staged` and `durable`.
    pub(super) fn new(
        path: PathBuf,
        staged: Arc<Completion<()>>,
        durable: Arc<Completion<Result<SaveReport>>>,
        shared: Arc<Shared>,
    ) -> SaveHandle {
        SaveHandle { path, staged: Staged { inner: staged }, durable: Durable { inner: durable, shared } }
    }

    /// The checkpoint path of this save.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The *staged* completion (the sources may be changed or freed once it resolves).
    pub fn staged(&self) -> Staged {
        self.staged.clone()
    }

    /// The *durable* completion (resolves to this save's report or error).
    pub fn durable(self) -> Durable {
        self.durable
    }

    /// Whether the sources are released.
    pub fn is_staged(&self) -> bool {
        self.staged.is_staged()
    }

    /// Whether the save has finished (committed or failed).
    pub fn is_done(&self) -> bool {
        self.durable.is_done()
    }

    /// Blocks until durable: `self.durable().wait()`.
    pub fn wait(self) -> Result<SaveReport> {
        self.durable.wait()
    }
}
