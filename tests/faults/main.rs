//! The tests that arm failpoints (the `fail` crate; Cargo.toml builds this binary only with
//! `--features failpoints`): injected faults on every engine and at every step of the commit
//! (`failpoints`), aborts at each step in a child process (`crash_points`), power loss by
//! the ext4 shutdown ioctl (`power_loss`), engine faults seen from the staging pool
//! (`pool_faults`).
//!
//! Failpoints are process-wide: a fault armed by one test fires in every save running in the
//! process at that moment. So these tests are a binary apart from `it` (tests/it/main.rs says
//! why not one binary), and within this one they run one at a time: each test first takes
//! [`alone`]. `fail::FailScenario`, which serializes the scenarios, is not enough by itself:
//! some tests save outside theirs (the previous checkpoint before arming a fault, the save
//! after a remount) and crash_points' parent tests save without one.

#[path = "../it/common/mod.rs"]
mod common;
#[path = "../it/reliability/mod.rs"]
mod reliability;

mod crash_points;
mod failpoints;
mod pool_faults;
mod power_loss;

/// Held by every test of this binary for its whole run, so that no test's failpoint fires in
/// another test's save. A test that failed while holding it does not fail the others.
fn alone() -> std::sync::MutexGuard<'static, ()> {
    static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ALONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
