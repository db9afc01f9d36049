//! Where tensor bytes come from on their way to the disk: the [`TensorSource`] trait and
//! its implementations, and how the staging ring moves them.
//!
//! # Sources
//!
//! - host memory: `Vec<u8>`, [`bytes::Bytes`], [`crate::io::AlignedBuf`], `[u8]` (borrowed
//!   through [`crate::checkpoint::TensorData::Host`]) and [`HostPtrSource`] (an address and
//!   length lent by a foreign caller, `unsafe` to create);
//! - [`Releasable`]: any source behind an `Arc`, which a background save lets go of at
//!   *staged*; [`Reuse`]: the cache of costly handles (CUDA streams) lent one at a time;
//! - [`SimulatedDevice`] memory ([`SimulatedTensor`]): copies to the host run on the
//!   device's copy thread at a configured bandwidth, for tests and benchmarks of overlap;
//! - CUDA device memory (`cuda` feature): `cuda::CudaTensorSource`, copied with
//!   `cuMemcpyDtoHAsync` on a stream its context reuses (after the producer's event, when
//!   given) into the staging buffers, which
//!   `cuda::CudaStaging` page-locks with `cuMemHostRegister` (through
//!   [`crate::UringCheckpointIO::prepare_staging`]).
//!
//! # The staging ring is the shard writer's buffer pool
//!
//! There is one ring, and it is the engine's pool of staging buffers:
//!
//! | pipeline step | code |
//! |---|---|
//! | N aligned buffers of `chunk_size` | one [`crate::io::StagingPool`] owns `staging_pool_size / chunk_size` [`crate::io::AlignedBuf`]s (alignment from [`crate::io::pool::staging_align`]) and runs its registration hooks (CUDA page-locking) on them; each shard writer borrows its share, which the io_uring engine registers with its ring (`WriteFixed`) |
//! | allocated once, reused across saves | [`crate::UringCheckpointIO`] keeps the pool between saves; a writer's buffers go back to it when the writer drops, on success, error or panic |
//! | source -> copy into buffer k | the shard writer's stream (`Writer::take_buffer`, then a memcpy with the CRC-32 in the same pass for host memory, or [`TensorSource::copy_to`] followed by the CRC of the bytes still in cache) |
//! | submit the write of buffer k while k+1 fills | a full buffer is queued with `Writer::write` (`Payload::Staged`) and the stream takes the next one at once; the engine writes in the background (io_uring: up to `queue_depth` writes in flight) |
//! | back-pressure when all buffers are in flight | `Writer::take_buffer` waits for a completion when the pool is empty |
//! | buffer returns to the ring on completion | the engine puts it back on its free list when the kernel is done with it |
//!
//! Large aligned host tensors skip the ring entirely (zero-copy writes straight from their
//! memory) in synchronous saves. A save that must report "staged" before its writes
//! complete ([`crate::CheckpointIO::save_checkpoint_staged`], used by the `stream` mode of
//! [`crate::AsyncCheckpointIO`]) turns zero-copy off, so that once the last chunk is in the
//! ring no write reads the sources.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host;
pub mod release;
pub mod reuse;
pub mod simulated;
pub mod tensor_source;

pub use host::HostPtrSource;
pub use release::Releasable;
pub use reuse::{Lease, Reuse};
pub use simulated::{SimulatedDevice, SimulatedTensor};
pub use tensor_source::TensorSource;
