use super::testing::FakeRegistrar;
use super::*;

const SHAPE: Shape = Shape { chunk: 64 * 1024, align: PAGE_ALIGN };

/// An empty pool of `capacity` buffers with a fake registrar.
fn registered_pool(capacity: usize) -> (StagingPool, std::sync::Arc<FakeRegistrar>) {
    let fake = FakeRegistrar::new();
    let pool = StagingPool::new();
    pool.add_registrar(fake.clone());
    pool.set_capacity(capacity);
    (pool, fake)
}

/// Drops `pool`, then checks `fake`'s (register, unregister, live) counts and soundness.
fn assert_after_end(pool: StagingPool, fake: &FakeRegistrar, counts: (usize, usize, usize), what: &str) {
    drop(pool);
    assert_eq!(fake.counts(), counts, "{what}");
    fake.assert_sound();
}

#[test]
fn alignment_is_decided_once_from_both_alignments() {
    for (direct, mem, align) in
        [(512, 512, 4096), (4096, 512, 4096), (512, 65536, 65536), (16384, 4096, 16384)]
    {
        assert_eq!(staging_align(direct, mem), align, "direct {direct}, memory {mem}");
    }
}

#[test]
fn lent_buffers_come_back_on_drop_and_are_reused() {
    let pool = StagingPool::new();
    pool.set_capacity(4);
    let bufs = pool.lend(SHAPE, 3);
    let addrs: Vec<usize> = bufs.iter().map(|b| b.as_ptr() as usize).collect();
    assert_eq!(pool.stats().lent, 3);
    drop(bufs);
    let stats = pool.stats();
    assert_eq!((stats.lent, stats.idle, stats.allocated, stats.freed), (0, 3, 3, 0));
    let again = pool.lend(SHAPE, 3);
    let mut reused: Vec<usize> = again.iter().map(|b| b.as_ptr() as usize).collect();
    reused.sort_unstable();
    let mut addrs = addrs;
    addrs.sort_unstable();
    assert_eq!(reused, addrs, "the same memory is lent again");
    assert_eq!(pool.stats().allocated, 3);
}

#[test]
fn returned_buffers_are_cleared() {
    let pool = StagingPool::new();
    pool.set_capacity(1);
    let mut buf = pool.lend(SHAPE, 1).pop().expect("one");
    buf.extend_from_slice(b"abc");
    drop(buf);
    assert!(pool.lend(SHAPE, 1)[0].is_empty());
}

#[test]
fn every_buffer_is_registered_once_and_unregistered_before_it_is_freed() {
    let fake = FakeRegistrar::new();
    {
        let pool = StagingPool::new();
        pool.resize(SHAPE, 4);
        let lent = pool.lend(SHAPE, 2);
        let registration = pool.add_registrar(fake.clone());
        assert_eq!((registration.registered, registration.pending), (2, 2));
        assert_eq!(pool.stats().registered, vec![2]);
        drop(lent); // registered on their way back
        assert_eq!(pool.stats().registered, vec![4]);
        assert_eq!(fake.counts(), (4, 0, 4));
        // More buffers, then fewer: new ones registered, surplus unregistered, then freed.
        pool.resize(SHAPE, 6);
        assert_eq!(fake.counts(), (6, 0, 6));
        pool.resize(SHAPE, 3);
        assert_eq!(fake.counts(), (6, 3, 3));
        // Another chunk size: every old buffer goes (unregistered first).
        let other = Shape { chunk: 128 * 1024, ..SHAPE };
        pool.resize(other, 3);
        assert_eq!(fake.counts(), (9, 6, 3));
        // Another alignment: larger replaces, smaller is served by what is there.
        let wide = Shape { align: 65536, ..other };
        drop(pool.lend(wide, 2));
        assert_eq!(pool.stats().registered, vec![2], "the 4 KiB-aligned ones went");
        drop(pool.lend(other, 3));
        fake.assert_sound();
        assert_eq!(pool.stats().idle, 3);
    }
    let (registers, unregisters, live) = fake.counts();
    assert_eq!((registers, live), (unregisters, 0), "the pool's end unregisters everything");
    fake.assert_sound();
}

#[test]
fn over_capacity_buffers_are_freed_on_return() {
    let (pool, fake) = registered_pool(2);
    let first = pool.lend(SHAPE, 2);
    let second = pool.lend(SHAPE, 2); // a concurrent save: allocated beyond capacity
    assert_eq!(pool.stats().allocated, 4);
    drop(first);
    drop(second);
    let stats = pool.stats();
    assert_eq!((stats.idle, stats.freed, stats.registered.clone()), (2, 2, vec![2]));
    fake.assert_sound();
}

#[test]
fn refusals_are_counted_and_leave_buffers_usable() {
    let fake = FakeRegistrar::refusing(vec![2]);
    let pool = StagingPool::new();
    pool.resize(SHAPE, 3);
    let registration = pool.add_registrar(fake.clone());
    assert_eq!((registration.registered, registration.refused), (2, 1));
    assert!(registration.first_error.is_some());
    assert_eq!(pool.stats().registered, vec![2]);
    let bufs = pool.lend(SHAPE, 3);
    assert_eq!(bufs.len(), 3);
    drop(bufs);
    assert_after_end(pool, &fake, (3, 2, 0), "a refused buffer is never unregistered");
}

#[test]
fn a_leaked_buffer_is_never_freed_nor_unregistered() {
    let (pool, fake) = registered_pool(2);
    let mut bufs = pool.lend(SHAPE, 2);
    bufs.pop().expect("two").leak();
    let stats = pool.stats();
    assert_eq!((stats.lent, stats.leaked), (1, 1));
    drop(bufs);
    assert_after_end(pool, &fake, (2, 1, 1), "the leaked one stays registered");
}

#[test]
fn buffers_come_back_from_a_panicking_thread() {
    let (pool, fake) = registered_pool(4);
    let shared = pool.clone();
    let joined = std::thread::spawn(move || {
        let _bufs = shared.lend(SHAPE, 4);
        panic!("worker panics holding every buffer");
    })
    .join();
    assert!(joined.is_err());
    let stats = pool.stats();
    assert_eq!((stats.lent, stats.idle, stats.registered.clone()), (0, 4, vec![4]));
    fake.assert_sound();
}
