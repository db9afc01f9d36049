//! Configuration: one [`Config`] with documented defaults, validated once.
//!
//! A configuration comes from a TOML file, from `URING_CKPT_*` environment variables, from a
//! [`ConfigBuilder`], or from a mix of them ([`Config::load`]: the file, then the environment
//! on top). Every constructor that hands out a `Config` validates it; a `Config` built by hand
//! (its fields are public) should be checked with [`Config::validate`].
//!
//! # Reference
//!
//! Sizes are written as integers (bytes) or as strings such as `"8MiB"`, `"4 GiB"`, `"512k"`
//! or `"1.5GiB"` (see [`parse_size`]: `k`/`M`/`G`/`T` and `KiB`/`MiB`/`GiB`/`TiB` are
//! powers of 1024, `KB`/`MB`/`GB`/`TB` powers of 1000). Booleans in the environment accept
//! `1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`.
//!
//! | TOML key | environment variable | type | default | allowed | meaning |
//! |---|---|---|---|---|---|
//! | `engine` | `URING_CKPT_ENGINE` | `"auto"`, `"uring"`, `"pwrite"`, `"buffered"` | `"auto"` | | how bytes reach the disk; `auto` tries io_uring, then the pwrite thread pool, then buffered I/O, and logs each fallback |
//! | `queue_depth` | `URING_CKPT_QUEUE_DEPTH` | integer | `32` | 1..=4096 | io_uring submission queue depth (writes in flight) |
//! | `chunk_size` | `URING_CKPT_CHUNK_SIZE` | size | `"8MiB"` | 4KiB..=1GiB, multiple of 4096 | bytes per write and per staging buffer |
//! | `staging_pool_size` | `URING_CKPT_STAGING_POOL_SIZE` | size | `"128MiB"` | 2 × `chunk_size`..=64GiB | total memory of the staging ring |
//! | `max_shard_size` | `URING_CKPT_MAX_SHARD_SIZE` | size | `"4GiB"` | >= 1MiB | shard size limit; a larger tensor gets a shard of its own |
//! | `direct_io` | `URING_CKPT_DIRECT_IO` | bool | `true` | | open files with `O_DIRECT` |
//! | `register_buffers` | `URING_CKPT_REGISTER_BUFFERS` | bool | `true` | | register staging buffers with io_uring (falls back to plain writes when `RLIMIT_MEMLOCK` is too low) |
//! | `sqpoll` | `URING_CKPT_SQPOLL` | bool | `false` | | use a kernel submission-polling thread |
//! | `fsync` | `URING_CKPT_FSYNC` | `"fdatasync"`, `"fsync"`, `"never"` | `"fdatasync"` | | how shards are made durable; `never` is for benchmarks only |
//! | `verify_on_load` | `URING_CKPT_VERIFY_ON_LOAD` | bool | `true` | | check every tensor's CRC-32 when loading |
//! | `replace_existing` | `URING_CKPT_REPLACE_EXISTING` | bool | `false` | | allow a save to replace an existing checkpoint (atomically) |
//! | `io_threads` | `URING_CKPT_IO_THREADS` | integer | `4` | 1..=256 | threads of the pwrite engine |
//! | `async_mode` | `URING_CKPT_ASYNC_MODE` | `"stream"`, `"snapshot"` | `"stream"` | | how [`AsyncCheckpointIO`](crate::AsyncCheckpointIO) stages: `stream` through the bounded staging ring (memory = pool; the caller waits until the last chunk is staged), `snapshot` copies the whole checkpoint to host memory first (memory = checkpoint size; shortest wait) |
//! | `max_saves_in_flight` | `URING_CKPT_MAX_SAVES_IN_FLIGHT` | integer | `1` | 1..=64 | asynchronous saves running at once; a new save waits for a slot |
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

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use crate::lock::LockMode;
use crate::{Error, Result};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Prefix shared by every environment variable this module reads.
const ENV_PREFIX: &str = "URING_CKPT_";

/// Which I/O engine writes and reads shard files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring, falling back to `Pwrite` and then `Buffered` when it is unavailable.
    #[default]
    Auto,
    /// io_uring only (an error where it is unavailable).
    #[serde(alias = "io_uring")]
    Uring,
    /// A thread pool of `pwrite`/`pread` calls (`io_threads` threads).
    Pwrite,
    /// `std::fs` buffered I/O, the baseline.
    Buffered,
}

impl EngineKind {
    /// The lowercase name used in TOML, in environment variables and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Auto => "auto",
            EngineKind::Uring => "uring",
            EngineKind::Pwrite => "pwrite",
            EngineKind::Buffered => "buffered",
        }
    }

    fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(EngineKind::Auto),
            "uring" | "io_uring" => Ok(EngineKind::Uring),
            "pwrite" => Ok(EngineKind::Pwrite),
            "buffered" => Ok(EngineKind::Buffered),
            _ => Err(format!("unknown engine {s:?}; expected auto, uring, pwrite or buffered")),
        }
    }
}

impl FromStr for EngineKind {
    type Err = Error;

    /// Parses `auto`, `uring` (or `io_uring`), `pwrite` or `buffered`, in any case.
    fn from_str(s: &str) -> Result<Self> {
        EngineKind::parse(s).map_err(Error::Config)
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a shard is made durable before the checkpoint is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// `fdatasync` each shard (data and the metadata needed to read it back).
    #[default]
    Fdatasync,
    /// `fsync` each shard (data and all metadata).
    Fsync,
    /// Never sync. **Unsafe for real checkpoints**: a crash or power loss after the "commit"
    /// can leave a checkpoint that is torn or missing. For benchmarks of the write path only.
    Never,
}

impl FsyncPolicy {
    /// The lowercase name used in TOML, in environment variables and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FsyncPolicy::Fdatasync => "fdatasync",
            FsyncPolicy::Fsync => "fsync",
            FsyncPolicy::Never => "never",
        }
    }

    fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fdatasync" => Ok(FsyncPolicy::Fdatasync),
            "fsync" => Ok(FsyncPolicy::Fsync),
            "never" => Ok(FsyncPolicy::Never),
            _ => Err(format!("unknown fsync policy {s:?}; expected fdatasync, fsync or never")),
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = Error;

    /// Parses `fdatasync`, `fsync` or `never`, in any case.
    fn from_str(s: &str) -> Result<Self> {
        FsyncPolicy::parse(s).map_err(Error::Config)
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How [`AsyncCheckpointIO`](crate::AsyncCheckpointIO) takes the bytes from the sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AsyncMode {
    /// Through the bounded staging ring: memory is the staging pool, and the sources are
    /// released ("staged") once their last chunk is in the ring.
    #[default]
    Stream,
    /// Copy the whole checkpoint into (reused) host memory first, release the sources, then
    /// write from that copy: the shortest stall, memory the size of the checkpoint per save
    /// in flight (as `torch.distributed.checkpoint.async_save` does).
    Snapshot,
}

impl AsyncMode {
    /// The lowercase name used in TOML, in environment variables and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AsyncMode::Stream => "stream",
            AsyncMode::Snapshot => "snapshot",
        }
    }

    fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "stream" => Ok(AsyncMode::Stream),
            "snapshot" => Ok(AsyncMode::Snapshot),
            _ => Err(format!("unknown async mode {s:?}; expected stream or snapshot")),
        }
    }
}

impl FromStr for AsyncMode {
    type Err = Error;

    /// Parses `stream` or `snapshot`, in any case.
    fn from_str(s: &str) -> Result<Self> {
        AsyncMode::parse(s).map_err(Error::Config)
    }
}

impl fmt::Display for AsyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Faults the engines simulate so that every fallback path can be tested on any machine.
///
/// In TOML this is the `[simulate]` table; in the environment, `URING_CKPT_SIMULATE` is a
/// comma-separated list of `uring-eperm`, `direct-einval` and `register-enomem`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatedFaults {
    /// `io_uring_setup` fails with `EPERM`, as in containers whose seccomp profile blocks it
    /// (`uring-eperm`). Default `false`.
    pub uring_setup_eperm: bool,
    /// Opening with `O_DIRECT` fails with `EINVAL`, as on tmpfs (`direct-einval`).
    /// Default `false`.
    pub direct_io_einval: bool,
    /// Registering buffers fails with `ENOMEM`, as when `RLIMIT_MEMLOCK` is too low
    /// (`register-enomem`). Default `false`.
    pub register_enomem: bool,
}

impl SimulatedFaults {
    /// Parses the `URING_CKPT_SIMULATE` list: comma-separated `uring-eperm`,
    /// `direct-einval`, `register-enomem`; empty means no faults.
    fn parse_list(s: &str) -> std::result::Result<Self, String> {
        let mut faults = SimulatedFaults::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.to_ascii_lowercase().as_str() {
                "uring-eperm" => faults.uring_setup_eperm = true,
                "direct-einval" => faults.direct_io_einval = true,
                "register-enomem" => faults.register_enomem = true,
                _ => {
                    return Err(format!(
                        "unknown fault {item:?}; expected uring-eperm, direct-einval or \
                         register-enomem"
                    ))
                }
            }
        }
        Ok(faults)
    }
}

/// Everything that tunes how checkpoints are written and read.
///
/// See the [module documentation](self) for the TOML keys and environment variables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Which I/O engine to use. Default [`EngineKind::Auto`]: io_uring, falling back to the
    /// pwrite thread pool and then to buffered I/O, logging each fallback.
    pub engine: EngineKind,
    /// io_uring submission queue depth: how many writes are in flight at once.
    /// Default `32`, range `1..=4096`.
    pub queue_depth: u32,
    /// Bytes per write and per staging buffer. Default 8 MiB; range 4 KiB..=1 GiB and a
    /// multiple of 4096.
    #[serde(serialize_with = "size_serde::serialize")]
    #[serde(deserialize_with = "size_serde::deserialize")]
    pub chunk_size: u64,
    /// Total bytes of the staging ring (`staging_pool_size / chunk_size` buffers).
    /// Default 128 MiB; at least `2 * chunk_size` (double buffering), at most 64 GiB.
    #[serde(serialize_with = "size_serde::serialize")]
    #[serde(deserialize_with = "size_serde::deserialize")]
    pub staging_pool_size: u64,
    /// Largest shard file; tensors are packed into shards up to this size, and a tensor
    /// larger than this gets a shard of its own. Default 4 GiB, at least 1 MiB.
    #[serde(serialize_with = "size_serde::serialize")]
    #[serde(deserialize_with = "size_serde::deserialize")]
    pub max_shard_size: u64,
    /// Open shard files with `O_DIRECT`, bypassing the page cache. Default `true`; where the
    /// file system refuses it (tmpfs), the engine falls back to buffered I/O and says so.
    pub direct_io: bool,
    /// Register the staging buffers with io_uring (fixed buffers). Default `true`; when
    /// registration fails (`RLIMIT_MEMLOCK`), the engine falls back to plain writes.
    pub register_buffers: bool,
    /// Use a kernel submission-queue polling thread (`IORING_SETUP_SQPOLL`). Default `false`.
    pub sqpoll: bool,
    /// How shards are made durable before commit. Default [`FsyncPolicy::Fdatasync`].
    /// [`FsyncPolicy::Never`] is for benchmarks only and unsafe for real checkpoints.
    pub fsync: FsyncPolicy,
    /// Check every tensor's CRC-32 when loading. Default `true`.
    pub verify_on_load: bool,
    /// Allow a save to replace an existing checkpoint (atomically). Default `false`: saving
    /// over an existing checkpoint is an error.
    pub replace_existing: bool,
    /// Threads of the pwrite engine's pool. Default `4`, range `1..=256`.
    pub io_threads: u32,
    /// How asynchronous saves stage the sources. Default [`AsyncMode::Stream`].
    pub async_mode: AsyncMode,
    /// Asynchronous saves running at once; a further save waits for one to finish (none is
    /// ever dropped). Default `1`, range `1..=64`.
    pub max_saves_in_flight: u32,
    /// What a save does when another save of the same path holds its lock (see
    /// [`crate::lock`]). Default [`LockMode::Fail`]: an [`Error::Locked`] at once.
    pub lock: LockMode,
    /// Faults to simulate, for testing fallback paths. Default: none.
    pub simulate: SimulatedFaults,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            engine: EngineKind::Auto,
            queue_depth: 32,
            chunk_size: 8 * MIB,
            staging_pool_size: 128 * MIB,
            max_shard_size: 4 * GIB,
            direct_io: true,
            register_buffers: true,
            sqpoll: false,
            fsync: FsyncPolicy::Fdatasync,
            verify_on_load: true,
            replace_existing: false,
            io_threads: 4,
            async_mode: AsyncMode::Stream,
            max_saves_in_flight: 1,
            lock: LockMode::Fail,
            simulate: SimulatedFaults::default(),
        }
    }
}

/// `1234 (1.5KiB)`-style rendering of a size for error messages.
fn show_size(bytes: u64) -> String {
    let human = format_size(bytes);
    if human == format!("{bytes}B") {
        bytes.to_string()
    } else {
        format!("{bytes} ({human})")
    }
}

impl Config {
    /// Bounds of `queue_depth`.
    pub const QUEUE_DEPTH_RANGE: std::ops::RangeInclusive<u32> = 1..=4096;
    /// Bounds of `chunk_size` (which must also be a multiple of [`Config::CHUNK_ALIGN`]).
    pub const CHUNK_SIZE_RANGE: std::ops::RangeInclusive<u64> = 4 * KIB..=GIB;
    /// `chunk_size` must be a multiple of this.
    pub const CHUNK_ALIGN: u64 = 4096;
    /// Largest `staging_pool_size`.
    pub const MAX_STAGING_POOL_SIZE: u64 = 64 * GIB;
    /// Smallest `max_shard_size`.
    pub const MIN_SHARD_SIZE: u64 = MIB;
    /// Bounds of `io_threads`.
    pub const IO_THREADS_RANGE: std::ops::RangeInclusive<u32> = 1..=256;
    /// Bounds of `max_saves_in_flight`.
    pub const MAX_SAVES_IN_FLIGHT_RANGE: std::ops::RangeInclusive<u32> = 1..=64;

    /// A builder starting from the defaults; `build()` validates.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// Checks every field's range and the relations between fields. The error lists every
    /// problem found, each naming the field and the offending value.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if !Self::QUEUE_DEPTH_RANGE.contains(&self.queue_depth) {
            problems.push(format!("queue_depth must be 1..=4096, got {}", self.queue_depth));
        }
        let chunk_ok = if !Self::CHUNK_SIZE_RANGE.contains(&self.chunk_size) {
            problems.push(format!("chunk_size must be 4KiB..=1GiB, got {}", show_size(self.chunk_size)));
            false
        } else if self.chunk_size % Self::CHUNK_ALIGN != 0 {
            problems
                .push(format!("chunk_size must be a multiple of 4096, got {}", show_size(self.chunk_size)));
            false
        } else {
            true
        };
        if self.staging_pool_size > Self::MAX_STAGING_POOL_SIZE {
            problems.push(format!(
                "staging_pool_size must be at most 64GiB, got {}",
                show_size(self.staging_pool_size)
            ));
        } else if chunk_ok && self.staging_pool_size < 2 * self.chunk_size {
            problems.push(format!(
                "staging_pool_size must be at least 2 * chunk_size ({}), got {}",
                format_size(2 * self.chunk_size),
                show_size(self.staging_pool_size)
            ));
        }
        if self.max_shard_size < Self::MIN_SHARD_SIZE {
            problems.push(format!(
                "max_shard_size must be at least 1MiB, got {}",
                show_size(self.max_shard_size)
            ));
        }
        if !Self::IO_THREADS_RANGE.contains(&self.io_threads) {
            problems.push(format!("io_threads must be 1..=256, got {}", self.io_threads));
        }
        if !Self::MAX_SAVES_IN_FLIGHT_RANGE.contains(&self.max_saves_in_flight) {
            problems.push(format!("max_saves_in_flight must be 1..=64, got {}", self.max_saves_in_flight));
        }
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
    /// reads back to an equal `Config`. Sizes are written human-readable (`"8MiB"`).
    pub fn to_toml_string(&self) -> String {
        let s = &self.simulate;
        format!(
            "# uring-ckpt configuration; every key is described in the docs of uring_ckpt::config.\n\
             engine = \"{}\"\n\
             queue_depth = {}\n\
             chunk_size = \"{}\"\n\
             staging_pool_size = \"{}\"\n\
             max_shard_size = \"{}\"\n\
             direct_io = {}\n\
             register_buffers = {}\n\
             sqpoll = {}\n\
             fsync = \"{}\"\n\
             verify_on_load = {}\n\
             replace_existing = {}\n\
             io_threads = {}\n\
             async_mode = \"{}\"\n\
             max_saves_in_flight = {}\n\
             lock = \"{}\"\n\
             \n\
             [simulate]\n\
             uring_setup_eperm = {}\n\
             direct_io_einval = {}\n\
             register_enomem = {}\n",
            self.engine,
            self.queue_depth,
            format_size(self.chunk_size),
            format_size(self.staging_pool_size),
            format_size(self.max_shard_size),
            self.direct_io,
            self.register_buffers,
            self.sqpoll,
            self.fsync,
            self.verify_on_load,
            self.replace_existing,
            self.io_threads,
            self.async_mode,
            self.max_saves_in_flight,
            self.lock,
            s.uring_setup_eperm,
            s.direct_io_einval,
            s.register_enomem,
        )
    }

    /// Applies `URING_CKPT_*` overrides from the process environment, then validates.
    /// See [`with_env_from`](Config::with_env_from).
    pub fn with_env(self) -> Result<Config> {
        let mut vars = Vec::new();
        for (key, value) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            if !key.starts_with(ENV_PREFIX) {
                continue;
            }
            let value = value
                .into_string()
                .map_err(|v| Error::Config(format!("{key}={v:?}: value is not valid UTF-8")))?;
            vars.push((key.to_owned(), value));
        }
        self.with_env_from(vars)
    }

    /// Applies `URING_CKPT_*` overrides from `vars`, then validates.
    ///
    /// Variables without the `URING_CKPT_` prefix are ignored, as are `URING_CKPT_CONFIG` and
    /// `URING_CKPT_LOG`; any other unknown `URING_CKPT_*` variable is an error, as is a value
    /// that does not parse. Errors name the variable and its value.
    pub fn with_env_from<I, K, V>(mut self, vars: I) -> Result<Config>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        for (key, value) in vars {
            let (key, value) = (key.as_ref(), value.as_ref());
            let Some(name) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            self.apply_env(name, value).map_err(|msg| Error::Config(format!("{key}={value:?}: {msg}")))?;
        }
        self.validate()?;
        Ok(self)
    }

    fn apply_env(&mut self, name: &str, value: &str) -> std::result::Result<(), String> {
        match name {
            "ENGINE" => self.engine = EngineKind::parse(value)?,
            "QUEUE_DEPTH" => self.queue_depth = parse_env_int(value)?,
            "CHUNK_SIZE" => self.chunk_size = parse_size_msg(value)?,
            "STAGING_POOL_SIZE" => self.staging_pool_size = parse_size_msg(value)?,
            "MAX_SHARD_SIZE" => self.max_shard_size = parse_size_msg(value)?,
            "DIRECT_IO" => self.direct_io = parse_env_bool(value)?,
            "REGISTER_BUFFERS" => self.register_buffers = parse_env_bool(value)?,
            "SQPOLL" => self.sqpoll = parse_env_bool(value)?,
            "FSYNC" => self.fsync = FsyncPolicy::parse(value)?,
            "VERIFY_ON_LOAD" => self.verify_on_load = parse_env_bool(value)?,
            "REPLACE_EXISTING" => self.replace_existing = parse_env_bool(value)?,
            "IO_THREADS" => self.io_threads = parse_env_int(value)?,
            "ASYNC_MODE" => self.async_mode = AsyncMode::parse(value)?,
            "MAX_SAVES_IN_FLIGHT" => self.max_saves_in_flight = parse_env_int(value)?,
            "LOCK" => self.lock = LockMode::parse(value)?,
            "SIMULATE" => self.simulate = SimulatedFaults::parse_list(value)?,
            "CONFIG" | "LOG" => {}
            _ => {
                return Err(format!(
                    "unknown environment variable {ENV_PREFIX}{name}; known: {}",
                    ENV_VARS.join(", ")
                ))
            }
        }
        Ok(())
    }

    /// The configuration to use: the TOML file at `path` if given, else the file named by
    /// `URING_CKPT_CONFIG` if set, else the defaults; then the `URING_CKPT_*` overrides
    /// ([`with_env`](Config::with_env)), then validation.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let from_env = std::env::var_os("URING_CKPT_CONFIG").filter(|p| !p.is_empty());
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

/// Every environment variable [`Config::with_env_from`] understands.
const ENV_VARS: [&str; 18] = [
    "URING_CKPT_ENGINE",
    "URING_CKPT_QUEUE_DEPTH",
    "URING_CKPT_CHUNK_SIZE",
    "URING_CKPT_STAGING_POOL_SIZE",
    "URING_CKPT_MAX_SHARD_SIZE",
    "URING_CKPT_DIRECT_IO",
    "URING_CKPT_REGISTER_BUFFERS",
    "URING_CKPT_SQPOLL",
    "URING_CKPT_FSYNC",
    "URING_CKPT_VERIFY_ON_LOAD",
    "URING_CKPT_REPLACE_EXISTING",
    "URING_CKPT_IO_THREADS",
    "URING_CKPT_ASYNC_MODE",
    "URING_CKPT_MAX_SAVES_IN_FLIGHT",
    "URING_CKPT_LOCK",
    "URING_CKPT_SIMULATE",
    "URING_CKPT_CONFIG",
    "URING_CKPT_LOG",
];

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

fn parse_env_int(value: &str) -> std::result::Result<u32, String> {
    value.trim().parse::<u32>().map_err(|e| format!("expected a non-negative integer: {e}"))
}

fn parse_env_bool(value: &str) -> std::result::Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err("expected a boolean (1/0, true/false, yes/no, on/off)".to_owned()),
    }
}

/// Builds a [`Config`] from the defaults, one field at a time; [`build`](ConfigBuilder::build)
/// validates.
#[derive(Debug, Clone, Default)]
pub struct ConfigBuilder {
    config: Config,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty;)*) => {
        $(
            $(#[$doc])*
            #[must_use]
            pub fn $field(mut self, value: $ty) -> Self {
                self.config.$field = value;
                self
            }
        )*
    };
}

impl ConfigBuilder {
    setters! {
        /// Sets [`Config::engine`].
        engine: EngineKind;
        /// Sets [`Config::queue_depth`] (1..=4096).
        queue_depth: u32;
        /// Sets [`Config::chunk_size`] in bytes (4 KiB..=1 GiB, multiple of 4096).
        chunk_size: u64;
        /// Sets [`Config::staging_pool_size`] in bytes (2 × chunk_size..=64 GiB).
        staging_pool_size: u64;
        /// Sets [`Config::max_shard_size`] in bytes (>= 1 MiB).
        max_shard_size: u64;
        /// Sets [`Config::direct_io`].
        direct_io: bool;
        /// Sets [`Config::register_buffers`].
        register_buffers: bool;
        /// Sets [`Config::sqpoll`].
        sqpoll: bool;
        /// Sets [`Config::fsync`].
        fsync: FsyncPolicy;
        /// Sets [`Config::verify_on_load`].
        verify_on_load: bool;
        /// Sets [`Config::replace_existing`].
        replace_existing: bool;
        /// Sets [`Config::io_threads`] (1..=256).
        io_threads: u32;
        /// Sets [`Config::async_mode`].
        async_mode: AsyncMode;
        /// Sets [`Config::max_saves_in_flight`] (1..=64).
        max_saves_in_flight: u32;
        /// Sets [`Config::lock`].
        lock: LockMode;
        /// Sets [`Config::simulate`].
        simulate: SimulatedFaults;
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<Config> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// Parses a size: an integer number of bytes (`"4096"`) or a number with a unit, with or
/// without a space (`"8MiB"`, `"8 MiB"`, `"1.5GiB"`, `"512k"`).
///
/// Units, case-insensitive: `B` (or none); `k`, `KiB`, `M`, `MiB`, `G`, `GiB`, `T`, `TiB`,
/// `P`, `PiB`, `E`, `EiB` are powers of 1024; `KB`, `MB`, `GB`, `TB`, `PB`, `EB` are powers
/// of 1000. A fraction is allowed if the result is a whole number of bytes. Negative, empty,
/// malformed and overflowing (> `u64::MAX`) sizes are errors.
///
/// ```
/// use uring_ckpt::config::parse_size;
/// assert_eq!(parse_size("8MiB")?, 8 << 20);
/// assert_eq!(parse_size("8MB")?, 8_000_000);
/// assert_eq!(parse_size("1.5 GiB")?, 3 << 29);
/// assert!(parse_size("99999999999TiB").is_err());
/// # Ok::<(), uring_ckpt::Error>(())
/// ```
pub fn parse_size(s: &str) -> Result<u64> {
    parse_size_msg(s).map_err(Error::Config)
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    let m = match unit.to_ascii_lowercase().as_str() {
        "" | "b" | "byte" | "bytes" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "p" | "pi" | "pib" => 1 << 50,
        "e" | "ei" | "eib" => 1 << 60,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        "eb" => 1_000_000_000_000_000_000,
        _ => return None,
    };
    Some(m)
}

fn parse_size_msg(s: &str) -> std::result::Result<u64, String> {
    let bad = |why: &str| format!("size {s:?} {why}");
    let t = s.trim();
    if t.is_empty() {
        return Err("size is empty".to_owned());
    }
    if t.starts_with('-') {
        return Err(bad("is negative"));
    }
    let num_end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(num_end);
    let unit = unit.trim_start();
    let mult = unit_multiplier(unit).ok_or_else(|| {
        bad(&format!(
            "has an unknown unit {unit:?} (expected B, k/KiB, M/MiB, G/GiB, T/TiB, KB, MB, GB, \
             TB, ...)"
        ))
    })?;
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    if frac_part.contains('.') {
        return Err(bad("has more than one decimal point"));
    }
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(bad("has no number"));
    }
    let too_large = || bad("is too large (more than u64::MAX bytes)");
    let mut int: u128 = 0;
    for d in int_part.bytes() {
        int = int.checked_mul(10).and_then(|v| v.checked_add(u128::from(d - b'0'))).ok_or_else(too_large)?;
    }
    let frac_digits = frac_part.trim_end_matches('0');
    if frac_digits.len() > 19 {
        return Err(bad("has too many decimal places"));
    }
    let mut frac: u128 = 0;
    for d in frac_digits.bytes() {
        frac = frac * 10 + u128::from(d - b'0');
    }
    let denom = 10u128.pow(frac_digits.len() as u32);
    // frac < 10^19 < 2^64 and mult <= 2^60, so the product fits in a u128.
    let frac_bytes = frac * u128::from(mult);
    if frac_bytes % denom != 0 {
        return Err(bad("is not a whole number of bytes"));
    }
    let total = int
        .checked_mul(u128::from(mult))
        .and_then(|v| v.checked_add(frac_bytes / denom))
        .ok_or_else(too_large)?;
    u64::try_from(total).map_err(|_| too_large())
}

/// Formats a size with the largest binary unit that renders it exactly with at most three
/// decimals: `"8MiB"`, `"1.5GiB"`, `"4KiB"`; otherwise in bytes (`"4097B"`).
/// [`parse_size`] reads the result back to the same number.
///
/// ```
/// use uring_ckpt::config::format_size;
/// assert_eq!(format_size(8 << 20), "8MiB");
/// assert_eq!(format_size(3 << 29), "1.5GiB");
/// assert_eq!(format_size(4097), "4097B");
/// ```
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 6] =
        [("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in UNITS {
        let unit = 1u64 << shift;
        if bytes < unit {
            continue;
        }
        let whole = bytes >> shift;
        let rem = u128::from(bytes & (unit - 1));
        if rem == 0 {
            return format!("{whole}{name}");
        }
        // rem / unit as a decimal with at most three digits, if it is exact.
        let scaled = rem * 1000;
        if scaled % u128::from(unit) == 0 {
            let frac = format!("{:03}", scaled / u128::from(unit));
            return format!("{whole}.{}{name}", frac.trim_end_matches('0'));
        }
    }
    format!("{bytes}B")
}

/// Serde helpers for size fields: read an integer (bytes) or a size string, write a
/// human-readable string.
mod size_serde {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_size(*bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(SizeVisitor)
    }

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a size in bytes (integer) or a string such as \"8MiB\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("size {v} is negative")))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            super::parse_size_msg(v).map_err(E::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = Config::default();
        c.validate().expect("defaults are valid");
        assert_eq!(c.staging_buffers(), 16);
    }

    #[test]
    fn validate_lists_every_problem() {
        let c = Config { queue_depth: 0, io_threads: 0, ..Config::default() };
        let msg = c.validate().expect_err("invalid").to_string();
        assert!(msg.contains("queue_depth must be 1..=4096, got 0"), "{msg}");
        assert!(msg.contains("io_threads must be 1..=256, got 0"), "{msg}");
    }

    #[test]
    fn chunk_alignment_message() {
        let c = Config { chunk_size: 5000, ..Config::default() };
        let msg = c.validate().expect_err("invalid").to_string();
        assert!(msg.contains("chunk_size must be a multiple of 4096, got 5000"), "{msg}");
    }

    #[test]
    fn staging_buffers_never_divides_by_zero() {
        let c = Config { chunk_size: 0, ..Config::default() };
        assert_eq!(c.staging_buffers(), 0);
    }

    #[test]
    fn parse_size_fractions_and_units() {
        assert_eq!(parse_size_msg("0.5k"), Ok(512));
        assert_eq!(parse_size_msg(".5k"), Ok(512));
        assert_eq!(parse_size_msg("2."), Ok(2));
        assert_eq!(parse_size_msg("1.50000MiB"), Ok(3 << 19));
        assert_eq!(
            parse_size_msg("16EiB"),
            Err("size \"16EiB\" is too large (more than u64::MAX bytes)".to_owned())
        );
        assert_eq!(
            parse_size_msg("15.999EiB").map(|_| ()),
            Err("size \"15.999EiB\" is not a whole number of bytes".to_owned())
        );
        assert!(parse_size_msg("0.1k").is_err());
        assert!(parse_size_msg("1..2k").is_err());
        assert!(parse_size_msg("1.2.3").is_err());
        assert!(parse_size_msg(".").is_err());
        assert!(parse_size_msg("k").is_err());
    }

    #[test]
    fn format_size_picks_exact_units() {
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(1023), "1023B");
        assert_eq!(format_size(1024), "1KiB");
        assert_eq!(format_size(1536), "1.5KiB");
        assert_eq!(format_size(GIB + 256 * MIB), "1.25GiB");
        assert_eq!(format_size(GIB + 4096), "1048580KiB");
        assert_eq!(format_size(u64::MAX), format!("{}B", u64::MAX));
        assert_eq!(format_size(1 << 63), "8EiB");
    }

    #[test]
    fn derived_serialize_matches_to_toml_string() {
        let c = Config {
            engine: EngineKind::Pwrite,
            chunk_size: 3 * MIB,
            simulate: SimulatedFaults { register_enomem: true, ..SimulatedFaults::default() },
            ..Config::default()
        };
        let derived = toml::to_string(&c).expect("serializes");
        assert_eq!(parse_toml(&derived), Ok(c.clone()));
        assert_eq!(parse_toml(&c.to_toml_string()), Ok(c));
    }
}
