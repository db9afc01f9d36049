//! The `CheckpointIO` interface (modelled on PyTorch Lightning's) and its default
//! implementation, [`UringCheckpointIO`], which combines sharding, the I/O engines and the
//! commit protocol.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::checkpoint::{mib_per_s, Checkpoint, LoadedCheckpoint, SaveReport, TensorView};
use crate::config::Config;
use crate::format::{Manifest, ShardInfo};
use crate::io::pool::{self, Registration, Shape, StagingPool};
use crate::io::stats::overlap_ratio;
use crate::io::{self, EngineReport, IoStats, Registrar};
use crate::load;
use crate::shard_writer::{write_shard, ShardOptions, ShardVolume};
use crate::store::TempCheckpointDir;
use crate::{Error, Result};

pub use crate::load::LoadOptions;

/// Saving, loading and removing checkpoints, as Lightning's `CheckpointIO` does.
pub trait CheckpointIO: Send + Sync {
    /// Writes `checkpoint` as a committed checkpoint directory at `path`; returns once it is
    /// durable. On error nothing is committed and an earlier checkpoint at `path` is intact.
    fn save_checkpoint(&self, checkpoint: &Checkpoint<'_>, path: &Path) -> Result<SaveReport>;
    /// Like [`save_checkpoint`](CheckpointIO::save_checkpoint), and calls `on_staged` exactly
    /// once, as soon as the save no longer reads the checkpoint's tensor memory (every byte
    /// is staged or written), which may be long before the save returns. `on_staged` is
    /// called on failure too (then once nothing reads the sources any more), always before
    /// this method returns.
    ///
    /// The provided implementation calls it after `save_checkpoint` returns.
    fn save_checkpoint_staged(
        &self,
        checkpoint: &Checkpoint<'_>,
        path: &Path,
        on_staged: &(dyn Fn() + Sync),
    ) -> Result<SaveReport> {
        let result = self.save_checkpoint(checkpoint, path);
        on_staged();
        result
    }
    /// Reads the checkpoint at `path`.
    fn load_checkpoint(&self, path: &Path, options: &LoadOptions) -> Result<LoadedCheckpoint>;
    /// Deletes the checkpoint at `path` (atomically: it disappears as a whole). A missing
    /// path is not an error; a directory that is not a checkpoint is refused.
    fn remove_checkpoint(&self, path: &Path) -> Result<()>;
}

/// One rank's part of a multi-rank save: the shards it wrote and how.
#[derive(Debug, Clone)]
pub struct RankShards {
    /// The rank.
    pub rank: u32,
    /// Manifest entries of its shards.
    pub shards: Vec<ShardInfo>,
    /// Its tensors: name to shard file.
    pub weight_map: BTreeMap<String, String>,
    /// Sum of its tensor bytes.
    pub data_bytes: u64,
    /// How its writes went.
    pub report: SaveReport,
}

/// The default [`CheckpointIO`]: io_uring + O_DIRECT (with fallbacks), sharded, atomic.
/// Staging buffers are allocated once, in one [`StagingPool`] shared by the shard writers of
/// every save, and reused by later saves.
///
/// [`save_checkpoint_staged`](CheckpointIO::save_checkpoint_staged) reports "staged" once
/// every shard writer has copied its last tensor byte into a staging buffer. To make that
/// point come before the writes complete, such a save turns zero-copy off: every byte is
/// copied (with its CRC, in the same pass) into the staging ring, so no write in flight
/// still reads tensor memory. [`save_checkpoint`](CheckpointIO::save_checkpoint) keeps
/// zero-copy for large aligned host tensors.
pub struct UringCheckpointIO {
    config: Config,
    pool: StagingPool,
}

/// Calls a save's `on_staged` once: when the last shard has been appended, or at the end.
struct StagedSignal<'h> {
    remaining: AtomicUsize,
    fired: AtomicBool,
    callback: Option<&'h (dyn Fn() + Sync)>,
    started: Instant,
    at: Mutex<Option<f64>>,
}

impl<'h> StagedSignal<'h> {
    fn new(callback: Option<&'h (dyn Fn() + Sync)>, started: Instant) -> Self {
        StagedSignal {
            remaining: AtomicUsize::new(usize::MAX),
            fired: AtomicBool::new(false),
            callback,
            started,
            at: Mutex::new(None),
        }
    }

    /// Sets how many shards must be appended before the signal fires.
    fn expect(&self, shards: usize) {
        self.remaining.store(shards, Ordering::SeqCst);
    }

    fn shard_appended(&self) {
        if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.fire();
        }
    }

    /// Fires (once); later calls do nothing.
    fn fire(&self) {
        if self.fired.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Ok(mut at) = self.at.lock() {
            *at = Some(self.started.elapsed().as_secs_f64());
        }
        if let Some(callback) = self.callback {
            callback();
        }
    }

    /// Seconds from the start of the save until the signal fired.
    fn seconds(&self) -> Option<f64> {
        self.at.lock().ok().and_then(|at| *at)
    }
}

impl UringCheckpointIO {
    /// A checkpoint writer with this (validated) config.
    pub fn new(config: Config) -> Result<Self> {
        config.validate()?;
        Ok(UringCheckpointIO { config, pool: StagingPool::new() })
    }

    /// The config in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The staging pool that saves borrow their buffers from.
    pub fn staging_pool(&self) -> &StagingPool {
        &self.pool
    }

    /// Allocates the staging pool now (saves reuse it) and adds `registrar` to it, e.g.
    /// `source::cuda::CudaStaging` (feature `cuda`) to page-lock the buffers for device
    /// copies. The pool registers every buffer with it (buffers a running save holds when
    /// they come back) and unregisters each before freeing it. A buffer that `registrar`
    /// refuses stays usable (pageable); the first refusal is logged and returned.
    pub fn prepare_staging(&self, registrar: Arc<dyn Registrar>) -> Registration {
        let shape = self.pool.shape().unwrap_or(Shape {
            chunk: self.config.chunk_size as usize,
            align: pool::staging_align(pool::PAGE_ALIGN, pool::PAGE_ALIGN),
        });
        let capacity = self.pool.stats().capacity.max(self.config.staging_buffers().max(2));
        self.pool.resize(shape, capacity);
        let name = registrar.name().to_owned();
        let registration = self.pool.add_registrar(registrar);
        if let Some(e) = &registration.first_error {
            log::warn!(
                "{name} refused {} of {} staging buffers ({e}); copies into those use pageable memory",
                registration.refused,
                registration.refused + registration.registered
            );
        }
        registration
    }

    /// Writes this rank's tensors as shards into the shared temporary directory of `path`
    /// (named after `save_id`, which every rank of one save must share). The checkpoint is
    /// not committed until [`UringCheckpointIO::commit_ranks`] runs, after all ranks returned.
    pub fn save_rank(
        &self,
        checkpoint: &Checkpoint<'_>,
        path: &Path,
        save_id: &str,
        rank: u32,
    ) -> Result<RankShards> {
        crate::store::names::validate_save_id(path, save_id)?;
        let tmp = TempCheckpointDir::create_named(path, self.config.replace_existing, save_id)?;
        let signal = StagedSignal::new(None, Instant::now());
        let result = self.write_shards(checkpoint, path, tmp.path(), rank, &signal);
        // The directory belongs to the whole save: keep it even if this rank failed; the
        // commit step (or a later cleanup) decides.
        std::mem::forget(tmp);
        result
    }

    /// Commits a multi-rank save once every rank's [`RankShards`] is in: writes the manifest,
    /// fsyncs and renames. `metadata` goes into the manifest.
    pub fn commit_ranks(
        &self,
        path: &Path,
        save_id: &str,
        ranks: &[RankShards],
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        crate::store::names::validate_save_id(path, save_id)?;
        let _lock = crate::store::SaveLock::acquire(path, self.config.lock)?;
        let tmp = TempCheckpointDir::create_named(path, self.config.replace_existing, save_id)?;
        let mut shards = Vec::new();
        let mut weight_map = BTreeMap::new();
        let mut total = 0u64;
        for rank in ranks {
            shards.extend(rank.shards.iter().cloned());
            total += rank.data_bytes;
            for (name, file) in &rank.weight_map {
                if weight_map.insert(name.clone(), file.clone()).is_some() {
                    return Err(Error::InvalidCheckpoint(format!("tensor {name:?} saved by two ranks")));
                }
            }
        }
        let manifest = Manifest::new(shards, weight_map, total, metadata.clone());
        tmp.commit(&manifest, self.config.replace_existing)
    }

    /// Splits tensors into shards of at most `max_shard_size` bytes (a larger tensor gets a
    /// shard of its own), keeping their order.
    fn plan_shards<'c, 'a>(&self, checkpoint: &'c Checkpoint<'a>) -> Vec<Vec<&'c TensorView<'a>>> {
        let mut shards: Vec<Vec<&TensorView>> = Vec::new();
        let mut current: Vec<&TensorView> = Vec::new();
        let mut size = 0u64;
        for tensor in &checkpoint.tensors {
            let len = tensor.data.len() as u64;
            if !current.is_empty() && size + len > self.config.max_shard_size {
                shards.push(std::mem::take(&mut current));
                size = 0;
            }
            current.push(tensor);
            size += len;
        }
        if !current.is_empty() || shards.is_empty() {
            shards.push(current);
        }
        shards
    }

    /// Writes all shards of `checkpoint` into `dir`, several at once.
    fn write_shards(
        &self,
        checkpoint: &Checkpoint<'_>,
        target: &Path,
        dir: &Path,
        rank: u32,
        signal: &StagedSignal<'_>,
    ) -> Result<RankShards> {
        let started = Instant::now();
        checkpoint.validate()?;
        let plan = self.plan_shards(checkpoint);
        signal.expect(plan.len());
        let on_appended = || signal.shard_appended();
        let options = ShardOptions { zero_copy: signal.callback.is_none(), on_appended: Some(&on_appended) };
        let workers = plan.len().min(std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4));
        let per_worker = worker_config(&self.config, workers);
        // Each writer borrows an equal share of the pool for its lifetime; the pool keeps
        // what the workers of a save need together (at least the configured pool).
        let share = per_worker.staging_buffers().max(2);
        self.pool.set_capacity(self.config.staging_buffers().max(2).max(workers * share));
        let next = AtomicUsize::new(0);
        let names: Vec<String> = (0..plan.len()).map(|i| shard_file_name(rank, i)).collect();

        let outcomes: Vec<Result<WorkerOutcome>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    let (plan, names, next, per_worker, pool) =
                        (&plan, &names, &next, &per_worker, &self.pool);
                    let staging = (pool, share);
                    scope.spawn(move || {
                        run_worker(per_worker, dir, staging, plan, names, next, &checkpoint.metadata, options)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| Err(Error::Internal("a shard writer thread panicked".into())))
                })
                .collect()
        });

        let mut shards: Vec<(usize, ShardInfo)> = Vec::new();
        let mut stats = IoStats::default();
        let mut volume = ShardVolume::default();
        let mut engine: Option<EngineReport> = None;
        let mut first_error = None;
        for outcome in outcomes {
            match outcome {
                Ok(out) => {
                    shards.extend(out.shards);
                    stats.merge(&out.stats);
                    volume.add(&out.volume);
                    engine.get_or_insert(out.engine);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(err) = first_error {
            return Err(err);
        }
        shards.sort_by_key(|(i, _)| *i);
        let shards: Vec<ShardInfo> = shards.into_iter().map(|(_, s)| s).collect();
        let mut weight_map = BTreeMap::new();
        for (i, tensors) in plan.iter().enumerate() {
            for t in tensors {
                weight_map.insert(t.name.clone(), names[i].clone());
            }
        }
        let file_bytes: u64 = shards.iter().map(|s| s.size).sum();
        let seconds = started.elapsed().as_secs_f64();
        let report = SaveReport {
            path: target.to_path_buf(),
            data_bytes: checkpoint.data_bytes(),
            file_bytes,
            shards: shards.len(),
            tensors: checkpoint.tensors.len(),
            seconds,
            commit_seconds: 0.0,
            stall_seconds: signal.seconds().unwrap_or(seconds),
            copy_seconds: volume.copies.busy().as_secs_f64(),
            write_seconds: stats.busy.busy().as_secs_f64(),
            overlap_ratio: overlap_ratio(&volume.copies, &stats.busy),
            throughput_mib_s: mib_per_s(file_bytes, seconds),
            zero_copy_bytes: volume.zero_copy_bytes,
            staged_bytes: volume.staged_bytes,
            engine: engine.unwrap_or_else(|| empty_report(&self.config)),
            write_latency: stats.percentiles_us(),
            writes: stats.ops,
            submit_calls: stats.submits,
            sqes_submitted: stats.sqes_submitted,
        };
        Ok(RankShards { rank, shards, weight_map, data_bytes: checkpoint.data_bytes(), report })
    }
}

fn empty_report(config: &Config) -> EngineReport {
    EngineReport {
        requested: config.engine,
        engine: config.engine,
        direct_io: false,
        registered_buffers: false,
        align: 4096,
        mem_align: 4096,
        queue_depth: config.queue_depth,
        fallbacks: Vec::new(),
    }
}

struct WorkerOutcome {
    shards: Vec<(usize, ShardInfo)>,
    stats: IoStats,
    volume: ShardVolume,
    engine: EngineReport,
}

/// One writer thread: takes the next unwritten shard until none is left. Its writer borrows
/// `staging.1` buffers of the pool `staging.0`; they go back when the writer drops, whether
/// this returns or unwinds.
#[allow(clippy::too_many_arguments)]
fn run_worker<'a>(
    config: &Config,
    dir: &Path,
    staging: (&StagingPool, usize),
    plan: &[Vec<&TensorView<'a>>],
    names: &[String],
    next: &AtomicUsize,
    metadata: &BTreeMap<String, String>,
    options: ShardOptions<'_>,
) -> Result<WorkerOutcome> {
    let mut writer = io::open_writer(config, dir, staging.0, staging.1)?;
    let mut shards = Vec::new();
    let mut volume = ShardVolume::default();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= plan.len() {
            break;
        }
        let path = dir.join(&names[i]);
        let (info, shard_volume) =
            write_shard(writer.as_mut(), &path, &names[i], &plan[i], metadata, options)?;
        volume.add(&shard_volume);
        shards.push((i, info));
    }
    let stats = writer.stats().clone();
    let engine = writer.report().clone();
    Ok(WorkerOutcome { shards, stats, volume, engine })
}

/// Each of `workers` writers gets an equal part of the staging pool (at least two chunks).
fn worker_config(config: &Config, workers: usize) -> Config {
    let mut per = config.clone();
    let share = (config.staging_pool_size / workers.max(1) as u64).max(2 * config.chunk_size);
    per.staging_pool_size = share - share % config.chunk_size;
    per
}

/// `shard-r00000-00001.safetensors`: rank, then index within the rank.
fn shard_file_name(rank: u32, index: usize) -> String {
    format!("shard-r{rank:05}-{index:05}.safetensors")
}

impl UringCheckpointIO {
    /// A whole save; `signal` fires once the sources are no longer read (at the latest when
    /// this returns).
    fn save(
        &self,
        checkpoint: &Checkpoint<'_>,
        path: &Path,
        signal: &StagedSignal<'_>,
    ) -> Result<SaveReport> {
        let result = self.save_inner(checkpoint, path, signal);
        signal.fire();
        result
    }

    fn save_inner(
        &self,
        checkpoint: &Checkpoint<'_>,
        path: &Path,
        signal: &StagedSignal<'_>,
    ) -> Result<SaveReport> {
        let started = signal.started;
        let replace = self.config.replace_existing;
        // Input mistakes (a reserved or over-long name, a malformed checkpoint) are refused
        // before anything is written, the lock file included.
        crate::store::names::split_save_target(path)?;
        checkpoint.validate()?;
        // Held until the commit (or the failure) is over; then the stale leftovers of crashed
        // saves of this path can go, since none of them can be in use.
        let _lock = crate::store::SaveLock::acquire(path, self.config.lock)?;
        crate::store::clean_stale_temp_dirs(path)?;
        let tmp = TempCheckpointDir::create(path, replace)?;
        let rank = self.write_shards(checkpoint, path, tmp.path(), 0, signal)?;
        let commit_started = Instant::now();
        let mut manifest =
            Manifest::new(rank.shards, rank.weight_map, rank.data_bytes, checkpoint.metadata.clone());
        for (name, bytes) in &checkpoint.extra_files {
            manifest.extra_files.push(tmp.write_extra_file(name, bytes)?);
        }
        tmp.commit(&manifest, replace)?;
        let mut report = rank.report;
        report.commit_seconds = commit_started.elapsed().as_secs_f64();
        report.seconds = started.elapsed().as_secs_f64();
        report.throughput_mib_s = mib_per_s(report.file_bytes, report.seconds);
        report.stall_seconds = if signal.callback.is_some() {
            signal.seconds().unwrap_or(report.seconds)
        } else {
            report.seconds // a synchronous save holds its caller until the end
        };
        log::info!(
            "saved {} ({} tensors, {} shards, {} bytes) in {:.3}s, {:.0} MiB/s with {}",
            path.display(),
            report.tensors,
            report.shards,
            report.file_bytes,
            report.seconds,
            report.throughput_mib_s,
            report.engine.engine
        );
        Ok(report)
    }
}

impl CheckpointIO for UringCheckpointIO {
    fn save_checkpoint(&self, checkpoint: &Checkpoint<'_>, path: &Path) -> Result<SaveReport> {
        self.save(checkpoint, path, &StagedSignal::new(None, Instant::now()))
    }

    fn save_checkpoint_staged(
        &self,
        checkpoint: &Checkpoint<'_>,
        path: &Path,
        on_staged: &(dyn Fn() + Sync),
    ) -> Result<SaveReport> {
        self.save(checkpoint, path, &StagedSignal::new(Some(on_staged), Instant::now()))
    }

    fn load_checkpoint(&self, path: &Path, options: &LoadOptions) -> Result<LoadedCheckpoint> {
        load::load(&self.config, path, options)
    }

    fn remove_checkpoint(&self, path: &Path) -> Result<()> {
        if !path.exists() {
            return Ok(());
        }
        // A save of the same path (a replace) must not race the removal.
        let _lock = crate::store::SaveLock::acquire(path, self.config.lock)?;
        crate::store::remove_checkpoint_dir(path)
    }
}
