//! A fake [`Registrar`] standing in for CUDA, and a check, run by every
//! [`AlignedBuf`] as it frees its memory, that no fake registration of that memory is
//! still live.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{AlignedBuf, Registrar};
use crate::error::{Error, Result};

/// Live fake registrations, by start address: (registrar id, capacity).
static LIVE: Mutex<Vec<(usize, u64, usize)>> = Mutex::new(Vec::new());
/// Buffers freed while still registered: (address, registrar id).
static FREED_REGISTERED: Mutex<Vec<(usize, u64)>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Called by `AlignedBuf::drop` (tests only) just before the memory goes.
pub(crate) fn freeing(addr: usize) {
    let live = lock(&LIVE);
    let offenders: Vec<(usize, u64)> =
        live.iter().filter(|(a, _, _)| *a == addr).map(|(a, id, _)| (*a, *id)).collect();
    drop(live);
    lock(&FREED_REGISTERED).extend(offenders);
}

/// Records every call; fails registrations whose (1-based) sequence number is in
/// `refuse`.
pub(crate) struct FakeRegistrar {
    id: u64,
    refuse: Vec<usize>,
    calls: Mutex<Calls>,
    /// Set when a hook saw something wrong (kept in `problems`).
    broken: AtomicBool,
}

#[derive(Default)]
struct Calls {
    registers: usize,
    unregisters: usize,
    /// Live registrations of this registrar: address to count.
    live: HashMap<usize, usize>,
    problems: Vec<String>,
}

impl FakeRegistrar {
    pub(crate) fn new() -> Arc<FakeRegistrar> {
        FakeRegistrar::refusing(Vec::new())
    }

    pub(crate) fn refusing(refuse: Vec<usize>) -> Arc<FakeRegistrar> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Arc::new(FakeRegistrar {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            refuse,
            calls: Mutex::new(Calls::default()),
            broken: AtomicBool::new(false),
        })
    }

    /// (register calls, unregister calls, live registrations).
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        let calls = lock(&self.calls);
        (calls.registers, calls.unregisters, calls.live.len())
    }

    /// Panics unless every hook call was sound and no buffer was freed while this
    /// registrar still had it registered.
    pub(crate) fn assert_sound(&self) {
        let calls = lock(&self.calls);
        assert!(!self.broken.load(Ordering::SeqCst), "registrar problems: {:?}", calls.problems);
        let freed: Vec<usize> =
            lock(&FREED_REGISTERED).iter().filter(|(_, id)| *id == self.id).map(|(a, _)| *a).collect();
        assert!(freed.is_empty(), "buffers freed while registered: {freed:x?}");
    }

    fn problem(&self, calls: &mut Calls, what: String) {
        self.broken.store(true, Ordering::SeqCst);
        calls.problems.push(what);
    }
}

impl Registrar for FakeRegistrar {
    fn name(&self) -> &str {
        "fake registrar"
    }

    fn register(&self, buf: &AlignedBuf) -> Result<()> {
        let addr = buf.as_ptr() as usize;
        let mut calls = lock(&self.calls);
        calls.registers += 1;
        if self.refuse.contains(&calls.registers) {
            return Err(Error::Unavailable("fake registration (refused on purpose)".into()));
        }
        let count = calls.live.entry(addr).or_insert(0);
        *count += 1;
        if *count > 1 {
            self.problem(&mut calls, format!("{addr:x} registered twice"));
        }
        lock(&LIVE).push((addr, self.id, buf.capacity()));
        Ok(())
    }

    fn unregister(&self, buf: &AlignedBuf) {
        let addr = buf.as_ptr() as usize;
        let mut calls = lock(&self.calls);
        calls.unregisters += 1;
        if calls.live.remove(&addr).is_none() {
            self.problem(&mut calls, format!("{addr:x} unregistered but not registered"));
        }
        let mut live = lock(&LIVE);
        match live.iter().position(|(a, id, cap)| *a == addr && *id == self.id && *cap == buf.capacity()) {
            Some(i) => {
                live.swap_remove(i);
            }
            None => {
                drop(live);
                self.problem(&mut calls, format!("{addr:x} unregistered with another capacity"));
            }
        }
    }
}
