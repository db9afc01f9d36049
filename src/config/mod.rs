//! Configuration: one [`Config`] with documented defaults, validated once.
//!
//! A configuration comes from a TOML file, from `URING_CKPT_*` environment variables, from a
//! [`ConfigBuilder`], or from a mix of them ([`Config::load`]: the file, then the environment
//! on top). Every constructor that hands out a `Config` validates it; a `Config` built by hand
//! (its fields are public) should be checked with [`Config::validate`].
//!
//! Each setting is declared once, in the field list of [`Config`] (type, default, docs): the
//! struct, its `Default`, its TOML form (serde), its environment variable (`URING_CKPT_` and
//! the field name in upper case) and its [`ConfigBuilder`] setter all follow from that list,
//! and a unit test checks the table below and the one in README.md against it.
//!
//! # Reference
//!
//! Sizes are written as integers (bytes) or as strings such as `"8MiB"`, `"4 GiB"`, `"512k"`
//! or `"1.5GiB"` (see [`Size`] and [`parse_size`]: `k`/`M`/`G`/`T` and `KiB`/`MiB`/`GiB`/`TiB` are
//! powers of 1024, `KB`/`MB`/`GB`/`TB` powers of 1000). Booleans in the environment accept
//! `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`.
//!
//! | TOML key | environment variable | type | default | allowed | meaning |
//! |---|---|---|---|---|---|
//! | `engine` | `URING_CKPT_ENGINE` | `"auto"`, `"uring"`, `"pwrite"`, `"buffered"` | `"auto"` | | how bytes reach the disk; `auto` tries io_uring, then the pwrite thread pool, then buffered I/O, and logs each fallback |
//! | `queue_depth` | `URING_CKPT_QUEUE_DEPTH` | integer | `32` | 1..=4096 | io_uring submission queue depth (writes in flight) |
//! | `chunk_size` | `URING_CKPT_CHUNK_SIZE` | size | `"8MiB"` | 4KiB..=1GiB, multiple of 4096 | bytes per write and per staging buffer (a load's staging buffers are at most 2 MiB) |
//! | `staging_pool_size` | `URING_CKPT_STAGING_POOL_SIZE` | size | `"32MiB"` | 2 × `chunk_size`..=64GiB | total memory of the staging ring (a load through it uses at most 16 MiB) |
//! | `max_shard_size` | `URING_CKPT_MAX_SHARD_SIZE` | size | `"4GiB"` | >= 1MiB | shard size limit; a larger tensor gets a shard of its own |
//! | `direct_io` | `URING_CKPT_DIRECT_IO` | bool | `true` | | open files with `O_DIRECT` |
//! | `register_buffers` | `URING_CKPT_REGISTER_BUFFERS` | bool | `true` | | register staging buffers with io_uring (falls back to plain writes when `RLIMIT_MEMLOCK` is too low) |
//! | `sqpoll` | `URING_CKPT_SQPOLL` | bool | `false` | | use a kernel submission-polling thread |
//! | `fsync` | `URING_CKPT_FSYNC` | `"fdatasync"`, `"fsync"`, `"never"` | `"fdatasync"` | | how shards are made durable; `never` is for benchmarks only |
//! | `verify_on_load` | `URING_CKPT_VERIFY_ON_LOAD` | bool | `true` | | check every tensor's CRC-32 when loading |
//! | `zero_copy_loads` | `URING_CKPT_ZERO_COPY_LOADS` | bool | `false` | | loads in place read a host tensor's aligned interior straight into it where its address and file offset agree modulo the direct-I/O memory alignment, staging only head and tail; off by default: on the virtio disk and the RAM-backed loop device measured here, staging through the pool was faster |
//! | `replace_existing` | `URING_CKPT_REPLACE_EXISTING` | bool | `false` | | allow a save to replace an existing checkpoint (atomically) |
//! | `io_threads` | `URING_CKPT_IO_THREADS` | integer | `4` | 1..=256 | threads of the pwrite engine |
//! | `async_mode` | `URING_CKPT_ASYNC_MODE` | `"stream"`, `"snapshot"` | `"stream"` | | how [`AsyncCheckpointIO`](crate::AsyncCheckpointIO) stages: `stream` through the bounded staging ring (memory = pool; the caller waits until the last chunk is staged), `snapshot` copies the whole checkpoint to host memory first (memory = checkpoint size; shortest wait) |
//! | `max_saves_in_flight` | `URING_CKPT_MAX_SAVES_IN_FLIGHT` | integer | `1` | 1..=64 | asynchronous saves running at once; a new save waits for a slot |
//! | `background_nice` | `URING_CKPT_BACKGROUND_NICE` | integer | `10` | 0..=19 | nice value a snapshot-mode asynchronous save's threads take once it is staged (the caller no longer waits), and the threads reserving snapshot areas; `0` keeps the caller's priority; never raises a thread's priority |
//! | `background_threads` | `URING_CKPT_BACKGROUND_THREADS` | integer | `2` | 1..=64 | writer threads of a snapshot-mode asynchronous save at most (shard writers, without a second copy thread each; also the io-wq workers of each io_uring ring and the pwrite engine's threads) |
//! | `lock` | `URING_CKPT_LOCK` | `"fail"`, `"wait"` | `"fail"` | | when another save of the same path holds its lock: fail at once with `Error::Locked`, or wait for it |
//! | `[simulate]` | `URING_CKPT_SIMULATE` | table / comma-separated list | none | `uring-eperm`, `direct-einval`, `register-enomem` | faults to simulate, for testing fallbacks |
//! | | `URING_CKPT_CONFIG` | path | unset | | the TOML file [`Config::load`] reads when given no path |
//! | | `URING_CKPT_LOG` | log filter | unset | | log level of the CLI (not read by this module) |
//!
//! The `[simulate]` table has the keys `uring_setup_eperm`, `direct_io_einval` and
//! `register_enomem` (see [`SimulatedFaults`]). Any other `URING_CKPT_*` variable, and any
//! other TOML key, is an error.
//!
//! # Example
//!
//! ```
//! use uring_ckpt::config::{Config, EngineKind};
//!
//! let config = Config::from_toml_str(
//!     r#"
//!     engine = "uring"
//!     queue_depth = 16
//!     chunk_size = "4MiB"
//!     staging_pool_size = 268435456
//!     "#,
//! )?;
//! assert_eq!(config.engine, EngineKind::Uring);
//! assert_eq!(config.chunk_size, 4 << 20);
//! assert_eq!(config.staging_buffers(), 64);
//!
//! let config = Config::builder().queue_depth(8).chunk_size(1 << 20).build()?;
//! assert_eq!(config.queue_depth, 8);
//! assert!(Config::builder().queue_depth(0).build().is_err());
//! # Ok::<(), uring_ckpt::Error>(())
//! ```

#[macro_use]
mod macros;
mod builder;
#[cfg(test)]
mod doc_table;
mod enums;
mod env;
mod faults;
mod size;

use std::ops::RangeInclusive;
use std::path::Path;

pub use builder::ConfigBuilder;
pub use enums::{AsyncMode, EngineKind, FsyncPolicy, LockMode};
pub use faults::SimulatedFaults;
pub use size::{format_size, parse_size, Size};
use size::{show_size, GIB, KIB, MIB};

use crate::error::{Error, Result};

config_struct! {
    /// Everything that tunes how checkpoints are written and read.
    ///
    /// See the [module documentation](self) for the TOML keys and environment variables.
    pub struct Config {
        /// Which I/O engine to use. Default [`EngineKind::Auto`]: io_uring, falling back to the
        /// pwrite thread pool and then to buffered I/O, logging each fallback.
        engine: EngineKind = EngineKind::Auto,
        /// io_uring submission queue depth: how many writes are in flight at once.
        /// Default `32`, range [`Config::QUEUE_DEPTH_RANGE`].
        queue_depth: u32 = 32,
        /// Bytes per write and per staging buffer. Default 8 MiB; range
        /// [`Config::CHUNK_SIZE_RANGE`] and a multiple of [`Config::CHUNK_ALIGN`].
        chunk_size: u64 as Size = 8 * MIB,
        /// Total bytes of the staging ring (`staging_pool_size / chunk_size` buffers).
        /// Default 32 MiB (four 8 MiB buffers: as fast as 128 MiB for saves); at least
        /// `2 * chunk_size` (double buffering), at most [`Config::MAX_STAGING_POOL_SIZE`].
        /// A load through the pool uses at most 16 MiB of it, in buffers of at most 2 MiB,
        /// which then stay in the CPU's cache between the read and the copy.
        staging_pool_size: u64 as Size = 32 * MIB,
        /// Largest shard file; tensors are packed into shards up to this size, and a tensor
        /// larger than this gets a shard of its own. Default 4 GiB, at least
        /// [`Config::MIN_SHARD_SIZE`].
        max_shard_size: u64 as Size = 4 * GIB,
        /// Open shard files with `O_DIRECT`, bypassing the page cache. Default `true`; where
        /// the file system refuses it (tmpfs), the engine falls back to buffered I/O and says so.
        direct_io: bool = true,
        /// Register the staging buffers with io_uring (fixed buffers). Default `true`; when
        /// registration fails (`RLIMIT_MEMLOCK`), the engine falls back to plain writes.
        register_buffers: bool = true,
        /// Use a kernel submission-queue polling thread (`IORING_SETUP_SQPOLL`). Default `false`.
        sqpoll: bool = false,
        /// How shards are made durable before commit. Default [`FsyncPolicy::Fdatasync`].
        /// [`FsyncPolicy::Never`] is for benchmarks only and unsafe for real checkpoints.
        fsync: FsyncPolicy = FsyncPolicy::Fdatasync,
        /// Check every tensor's CRC-32 when loading. Default `true`.
        verify_on_load: bool = true,
        /// Loads into host memory in place read each tensor's aligned interior (at least
        /// 1 MiB) straight into it where its address and file offset agree modulo the
        /// direct-I/O memory alignment, staging only the head and tail. Default `false`: on
        /// the devices measured so far (a virtio disk, whose requests from 4 KiB-page memory
        /// stop at 254 segments, and a loop device over tmpfs, whose one worker thread copies
        /// faster into a small staging pool that stays in cache) the staged path was faster;
        /// where the device writes memory itself (NVMe) it saves the copy: measure it there.
        zero_copy_loads: bool = false,
        /// Allow a save to replace an existing checkpoint (atomically). Default `false`: saving
        /// over an existing checkpoint is an error.
        replace_existing: bool = false,
        /// Threads of the pwrite engine's pool. Default `4`, range [`Config::IO_THREADS_RANGE`].
        io_threads: u32 = 4,
        /// How asynchronous saves stage the sources. Default [`AsyncMode::Stream`].
        async_mode: AsyncMode = AsyncMode::Stream,
        /// Asynchronous saves running at once; a further save waits for one to finish (none is
        /// ever dropped). Default `1`, range [`Config::MAX_SAVES_IN_FLIGHT_RANGE`].
        max_saves_in_flight: u32 = 1,
        /// Nice value (CPU priority) the threads of a snapshot-mode asynchronous save take
        /// once it is staged, so that the write takes little CPU from the work beside it;
        /// threads the save starts afterwards inherit it, and threads reserving snapshot areas
        /// run at it too. (A stream-mode save is staged only once its last byte is in the
        /// staging ring: its caller waits for the write, which keeps the caller's priority.)
        /// `0` keeps the caller's priority; a thread already nicer keeps its own. Default
        /// `10`, range [`Config::BACKGROUND_NICE_RANGE`].
        background_nice: u32 = 10,
        /// Writer threads of a snapshot-mode asynchronous save at most: its shard writers
        /// (each without a second copy thread), and each of their io_uring rings' io-wq
        /// workers or pwrite engine threads (stream mode keeps the synchronous rule, as its
        /// caller waits for the write). Default `2`, range
        /// [`Config::BACKGROUND_THREADS_RANGE`].
        background_threads: u32 = 2,
        /// What a save does when another save of the same path holds its lock (see
        /// [`crate::lock`]). Default [`LockMode::Fail`]: an [`Error::Locked`] at once.
        lock: LockMode = LockMode::Fail,
        /// Faults to simulate, for testing fallback paths. Default: none.
        simulate: SimulatedFaults = SimulatedFaults::default(),
    }
}

/// The first line of [`Config::to_toml_string`].
const TOML_HEADER: &str =
    "# uring-ckpt configuration; every key is described in the docs of uring_ckpt::config.\n";

impl Config {
    /// Bounds of `queue_depth`.
    pub const QUEUE_DEPTH_RANGE: RangeInclusive<u32> = 1..=4096;
    /// Bounds of `chunk_size` (which must also be a multiple of [`Config::CHUNK_ALIGN`]).
    pub const CHUNK_SIZE_RANGE: RangeInclusive<u64> = 4 * KIB..=GIB;
    /// `chunk_size` must be a multiple of this.
    pub const CHUNK_ALIGN: u64 = 4096;
    /// Largest `staging_pool_size`.
    pub const MAX_STAGING_POOL_SIZE: u64 = 64 * GIB;
    /// Smallest `max_shard_size`.
    pub const MIN_SHARD_SIZE: u64 = MIB;
    /// Bounds of `io_threads`.
    pub const IO_THREADS_RANGE: RangeInclusive<u32> = 1..=256;
    /// Bounds of `max_saves_in_flight`.
    pub const MAX_SAVES_IN_FLIGHT_RANGE: RangeInclusive<u32> = 1..=64;
    /// Bounds of `background_nice`.
    pub const BACKGROUND_NICE_RANGE: RangeInclusive<u32> = 0..=19;
    /// Bounds of `background_threads`.
    pub const BACKGROUND_THREADS_RANGE: RangeInclusive<u32> = 1..=64;
    /// Smallest `staging_pool_size / chunk_size`: double buffering.
    const MIN_STAGING_BUFFERS: u64 = 2;

    /// A builder starting from the defaults; `build()` validates.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// Checks every field's range and the relations between fields. The error lists every
    /// problem found, each naming the field and the offending value.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        check_count(&mut problems, "queue_depth", self.queue_depth, &Self::QUEUE_DEPTH_RANGE);
        let chunk = self.chunk_size;
        let chunk_ok = if !Self::CHUNK_SIZE_RANGE.contains(&chunk) {
            let (lo, hi) =
                (format_size(*Self::CHUNK_SIZE_RANGE.start()), format_size(*Self::CHUNK_SIZE_RANGE.end()));
            problems.push(format!("chunk_size must be {lo}..={hi}, got {}", show_size(chunk)));
            false
        } else if chunk % Self::CHUNK_ALIGN != 0 {
            problems.push(format!(
                "chunk_size must be a multiple of {}, got {}",
                Self::CHUNK_ALIGN,
                show_size(chunk)
            ));
            false
        } else {
            true
        };
        let pool = self.staging_pool_size;
        if pool > Self::MAX_STAGING_POOL_SIZE {
            let max = format_size(Self::MAX_STAGING_POOL_SIZE);
            problems.push(format!("staging_pool_size must be at most {max}, got {}", show_size(pool)));
        } else if chunk_ok && pool < Self::MIN_STAGING_BUFFERS * chunk {
            // chunk_ok: chunk <= 1 GiB, so the product cannot overflow.
            problems.push(format!(
                "staging_pool_size must be at least {n} * chunk_size ({}), got {}",
                format_size(Self::MIN_STAGING_BUFFERS * chunk),
                show_size(pool),
                n = Self::MIN_STAGING_BUFFERS,
            ));
        }
        if self.max_shard_size < Self::MIN_SHARD_SIZE {
            let min = format_size(Self::MIN_SHARD_SIZE);
            problems.push(format!(
                "max_shard_size must be at least {min}, got {}",
                show_size(self.max_shard_size)
            ));
        }
        check_count(&mut problems, "io_threads", self.io_threads, &Self::IO_THREADS_RANGE);
        check_count(
            &mut problems,
            "max_saves_in_flight",
            self.max_saves_in_flight,
            &Self::MAX_SAVES_IN_FLIGHT_RANGE,
        );
        check_count(&mut problems, "background_nice", self.background_nice, &Self::BACKGROUND_NICE_RANGE);
        check_count(
            &mut problems,
            "background_threads",
            self.background_threads,
            &Self::BACKGROUND_THREADS_RANGE,
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(problems.join("; ")))
        }
    }

    /// Number of staging buffers: `staging_pool_size / chunk_size` (0 if `chunk_size` is 0,
    /// which [`validate`](Config::validate) rejects).
    pub fn staging_buffers(&self) -> usize {
        let n = self.staging_pool_size.checked_div(self.chunk_size).unwrap_or(0);
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// Parses and validates a TOML document. Missing keys keep their defaults; unknown keys
    /// are errors. Sizes may be integers (bytes) or strings such as `"8MiB"`.
    pub fn from_toml_str(s: &str) -> Result<Config> {
        let config = parse_toml(s).map_err(Error::Config)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML file. Errors name the file.
    pub fn from_toml_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read config", path, e))?;
        let with_path = |msg: String| Error::Config(format!("{}: {msg}", path.display()));
        let config = parse_toml(&text).map_err(with_path)?;
        config.validate().map_err(|e| with_path(config_message(e)))?;
        Ok(config)
    }

    /// The configuration as a TOML document that [`from_toml_str`](Config::from_toml_str)
    /// reads back to an equal `Config`: every key, sizes human-readable (`"8MiB"`).
    pub fn to_toml_string(&self) -> String {
        let body = toml::to_string(self)
            .expect("a Config always serializes: strings, booleans, u32s and a table of booleans");
        format!("{TOML_HEADER}{body}")
    }

    /// The configuration to use: the TOML file at `path` if given, else the file named by
    /// `URING_CKPT_CONFIG` if set, else the defaults; then the `URING_CKPT_*` overrides
    /// ([`with_env`](Config::with_env)), then validation.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let from_env = std::env::var_os(env::CONFIG_VAR).filter(|p| !p.is_empty());
        let base = match (path, from_env.as_deref()) {
            (Some(path), _) => Config::from_toml_file(path)?,
            (None, Some(path)) => Config::from_toml_file(Path::new(path))?,
            (None, None) => Config::default(),
        };
        let config = base.with_env()?;
        log::debug!("configuration: {config:?}");
        Ok(config)
    }
}

/// Adds `"{field} must be {lo}..={hi}, got {value}"` to `problems` unless `range` holds
/// `value`.
fn check_count(problems: &mut Vec<String>, field: &str, value: u32, range: &RangeInclusive<u32>) {
    if !range.contains(&value) {
        problems.push(format!("{field} must be {}..={}, got {value}", range.start(), range.end()));
    }
}

fn parse_toml(s: &str) -> std::result::Result<Config, String> {
    toml::from_str::<Config>(s).map_err(|e| e.to_string().trim_end().to_owned())
}

/// The message inside an `Error::Config`, or the error's display otherwise.
fn config_message(e: Error) -> String {
    match e {
        Error::Config(msg) => msg,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = Config::default();
        c.validate().expect("defaults are valid");
        assert_eq!(c.staging_buffers(), 4);
    }

    #[test]
    fn validate_lists_every_problem() {
        let c = Config { queue_depth: 0, io_threads: 0, ..Config::default() };
        let msg = c.validate().expect_err("invalid").to_string();
        assert!(msg.contains("queue_depth must be 1..=4096, got 0"), "{msg}");
        assert!(msg.contains("io_threads must be 1..=256, got 0"), "{msg}");
    }

    #[test]
    fn limits_in_messages_come_from_the_constants() {
        let c =
            Config { chunk_size: 5000, max_shard_size: 0, staging_pool_size: u64::MAX, ..Config::default() };
        let msg = c.validate().expect_err("invalid").to_string();
        assert!(msg.contains("chunk_size must be a multiple of 4096, got 5000"), "{msg}");
        assert!(msg.contains("max_shard_size must be at least 1MiB, got 0"), "{msg}");
        assert!(msg.contains("staging_pool_size must be at most 64GiB"), "{msg}");
        let c = Config { chunk_size: 8 * GIB, ..Config::default() };
        let msg = c.validate().expect_err("invalid").to_string();
        assert!(msg.contains("chunk_size must be 4KiB..=1GiB, got 8589934592 (8GiB)"), "{msg}");
    }

    #[test]
    fn staging_buffers_never_divides_by_zero() {
        let c = Config { chunk_size: 0, ..Config::default() };
        assert_eq!(c.staging_buffers(), 0);
    }

    #[test]
    fn to_toml_string_is_the_header_and_serde() {
        let c = Config {
            engine: EngineKind::Pwrite,
            chunk_size: 3 * MIB,
            simulate: SimulatedFaults { register_enomem: true, ..SimulatedFaults::default() },
            ..Config::default()
        };
        let text = c.to_toml_string();
        assert_eq!(text, format!("{TOML_HEADER}{}", toml::to_string(&c).expect("serializes")));
        assert!(text.contains("engine = \"pwrite\"\nqueue_depth = 32\nchunk_size = \"3MiB\"\n"), "{text}");
        assert!(
            text.ends_with(
                "\n[simulate]\nuring_setup_eperm = false\ndirect_io_einval = false\nregister_enomem = true\n"
            ),
            "{text}"
        );
        assert_eq!(parse_toml(&text), Ok(c));
    }

    #[test]
    fn fields_are_the_toml_keys() {
        let value = toml::Value::try_from(Config::default()).expect("serializes");
        let keys: Vec<&str> = value.as_table().expect("a table").keys().map(String::as_str).collect();
        let mut fields = Config::FIELDS.to_vec();
        fields.sort_unstable();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(keys, fields);
    }
}
