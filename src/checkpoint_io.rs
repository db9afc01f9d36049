//! The `CheckpointIO` interface (modelled on PyTorch Lightning's) and its default
//! implementation, [`UringCheckpointIO`]: the config, the staging pool reused by every save,
//! and the layers below put together ([`crate::save`], [`crate::load`], [`crate::store`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::checkpoint::{Checkpoint, LoadedCheckpoint, SaveReport};
use crate::config::Config;
use crate::error::Result;
use crate::io::pool::{self, Registration, Shape, StagingPool};
use crate::io::{Registrar, SaveThreads};
use crate::{load, save};

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
    /// Reads the checkpoint at `path`. [`UringCheckpointIO`] also reads any safetensors
    /// checkpoint there: one `.safetensors` file, a directory of them, or a Hugging Face
    /// directory with a `model.safetensors.index.json` ([`crate::store::open_any`]).
    fn load_checkpoint(&self, path: &Path, options: &LoadOptions) -> Result<LoadedCheckpoint>;
    /// Deletes the checkpoint at `path` (atomically: it disappears as a whole). A missing
    /// path is not an error; a directory that is not a checkpoint is refused.
    fn remove_checkpoint(&self, path: &Path) -> Result<()>;
}

pub use crate::save::{RankShards, TensorLocation};

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
    threads: SaveThreads,
}

impl UringCheckpointIO {
    /// A checkpoint writer with this (validated) config.
    pub fn new(config: Config) -> Result<Self> {
        config.validate()?;
        Ok(UringCheckpointIO { config, pool: StagingPool::new(), threads: SaveThreads::Foreground })
    }

    /// A checkpoint writer for saves that run in the background
    /// ([`AsyncCheckpointIO`](crate::AsyncCheckpointIO)): each save writes with at most the
    /// config's `background_threads` threads ([`SaveThreads::Background`]), so that it
    /// takes little CPU from the work it runs beside.
    pub fn for_background(config: Config) -> Result<Self> {
        let threads = SaveThreads::Background(config.background_threads);
        Ok(UringCheckpointIO { threads, ..UringCheckpointIO::new(config)? })
    }

    /// How many threads each save may run.
    pub fn threads(&self) -> SaveThreads {
        self.threads
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

    /// Loads the checkpoint at `path` into memory that already exists (`sink`: host tensors
    /// in place, device memory), through this instance's staging pool: peak memory is the
    /// pool's whatever the checkpoint's size. See [`load::load_into`] for `strict`.
    pub fn load_into(
        &self,
        path: &Path,
        options: &LoadOptions,
        strict: bool,
        sink: &dyn crate::sink::TensorSink,
    ) -> Result<load::LoadIntoReport> {
        load::load_into(&self.config, &self.pool, path, options, strict, sink)
    }

    /// Begins a multi-rank save of `path`, on its coordinator, before any rank writes:
    /// returns a new save id for every rank's [`UringCheckpointIO::save_rank`] and the
    /// [`UringCheckpointIO::commit_ranks`]. It refuses an existing `path` unless the config
    /// replaces, creates the shared temporary directory, and removes what earlier
    /// multi-rank saves of `path` left when they failed (a rank raised or was killed, so no
    /// commit came): the directories of save ids minted here whose coordinator is gone, or
    /// is this process (a save of a path that begins ends this process's earlier one of
    /// the same path). See [`crate::store::clean_stale_rank_dirs`].
    pub fn begin_ranks(&self, path: &Path) -> Result<String> {
        save::begin_ranks(&self.config, path)
    }

    /// Writes this rank's tensors as shards into the shared temporary directory of `path`
    /// (named after `save_id`, which every rank of one save must share). The checkpoint is
    /// not committed until [`UringCheckpointIO::commit_ranks`] runs, after all ranks returned.
    /// The result says where each tensor is ([`RankShards::tensors`]) and serializes, to
    /// travel to the coordinator.
    pub fn save_rank(
        &self,
        checkpoint: &Checkpoint<'_>,
        path: &Path,
        save_id: &str,
        rank: u32,
    ) -> Result<RankShards> {
        save::save_rank(&self.config, &self.pool, checkpoint, path, save_id, rank)
    }

    /// Commits a multi-rank save once every rank's [`RankShards`] is in: checks that each
    /// reported shard is in the temporary directory at its size, writes `extra_files`
    /// (name, bytes) and the manifest (with `metadata`), fsyncs and renames. On error nothing
    /// is committed and the temporary directory is removed.
    pub fn commit_ranks(
        &self,
        path: &Path,
        save_id: &str,
        ranks: &[RankShards],
        metadata: &BTreeMap<String, String>,
        extra_files: &[(String, &[u8])],
    ) -> Result<()> {
        save::commit_ranks(&self.config, path, save_id, ranks, metadata, extra_files)
    }
}

impl CheckpointIO for UringCheckpointIO {
    fn save_checkpoint(&self, checkpoint: &Checkpoint<'_>, path: &Path) -> Result<SaveReport> {
        save::save(&self.config, &self.pool, checkpoint, path, None, self.threads)
    }

    fn save_checkpoint_staged(
        &self,
        checkpoint: &Checkpoint<'_>,
        path: &Path,
        on_staged: &(dyn Fn() + Sync),
    ) -> Result<SaveReport> {
        save::save(&self.config, &self.pool, checkpoint, path, Some(on_staged), self.threads)
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
