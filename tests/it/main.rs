//! The integration tests: one test binary, `it`, with a module per area, so that a change to
//! the library relinks one test binary instead of one per file. A test is named
//! `<module>::<test>`; `cargo test --test it <module>::` runs one area.
//!
//! The tests that arm failpoints (`--features failpoints`: injected faults, crash points,
//! power loss, pool faults) are a second binary, `tests/faults/`. Failpoints are
//! process-wide (the `fail` crate keeps one registry per process): a fault armed by one test
//! fires in whatever save another test runs in the same process at that moment. No test of
//! this binary arms one, so its tests run side by side as the harness schedules them; in
//! `faults` every test first takes that binary's lock and they run one at a time. One binary
//! for all would need that lock around every save of every module (or the whole binary one
//! test at a time) to protect four files.
//!
//! `common` and `reliability` are shared with `faults`, which includes them by `#[path]`.
//! A test that re-runs this binary on one of its tests in a child process (crash points,
//! saves killed with SIGKILL, and the peak-RSS bound of `async_memory`, which needs a process
//! of its own) names that test with `reliability::test_name(module_path!(), ..)`, right
//! whichever binary and module the file is in.

mod common;
mod reliability;

mod async_io;
mod async_memory;
mod cli;
mod commit;
mod config;
mod cuda;
mod extra_files;
mod fallback;
mod foreign;
mod format_corpus;
mod format_proptest;
mod fs_matrix;
mod hostile_input;
mod load;
mod load_into;
mod lock_retention;
mod mapped;
mod phase;
mod pinned_bytes;
mod python_interop;
mod real_faults;
mod roundtrip;
mod security;
