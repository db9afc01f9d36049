//! The CUDA side of a writer: `cuda_built`/`cuda_available`, the primary context of each
//! device saved from, CUDA torch tensors held for a save (or lent to a background one) as
//! `uring_ckpt::source::cuda::CudaTensorSource`s, and the page-locking of the staging pool.
//!
//! Everything that touches CUDA is behind the crate's `cuda` feature; without it [`Gpu`] is
//! empty, refuses CUDA tensors and reports nothing page-locked.

#[cfg(feature = "cuda")]
use std::sync::{Arc, Mutex, OnceLock};

use pyo3::prelude::*;
#[cfg(feature = "cuda")]
use uring_ckpt::source::cuda::{CudaContext, CudaTensorSource};
use uring_ckpt::UringCheckpointIO;

/// Whether this extension was built with the `cuda` feature.
#[pyfunction]
pub(crate) fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

/// Whether CUDA tensors can be saved from device memory: built with the `cuda` feature and
/// the CUDA driver library (`libcuda.so.1`) loads. Never raises.
#[pyfunction]
pub(crate) fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| uring_ckpt::source::cuda::probe().is_ok())
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// Logs `message` to the `uring_ckpt` Python logger at `level` ("info", "warning");
/// a logging failure is ignored.
#[cfg(feature = "cuda")]
fn py_log(py: Python<'_>, level: &str, message: &str) {
    let _ = py
        .import("logging")
        .and_then(|logging| logging.call_method1("getLogger", ("uring_ckpt",)))
        .and_then(|logger| logger.call_method1(level, (message,)));
}

/// A CUDA torch tensor's device memory held for a save (feature `cuda`).
#[cfg(feature = "cuda")]
pub(crate) struct CudaTensor<'py> {
    /// Reads `len` bytes at the tensor's `data_ptr()` (dropped first: only a stream).
    source: CudaTensorSource,
    /// The tensor and its `untyped_storage()`, held only to keep the memory allocated.
    keep: [Bound<'py, PyAny>; 2],
}

#[cfg(feature = "cuda")]
impl CudaTensor<'_> {
    /// The tensor's bytes as the core takes them (copied from the device chunk by chunk).
    pub(crate) fn data(&self) -> uring_ckpt::checkpoint::TensorData<'_> {
        uring_ckpt::checkpoint::TensorData::Source(&self.source)
    }

    /// The memory as a source for a background save, which holds the tensor and its storage
    /// until it drops the source (once staged).
    pub(crate) fn lend(self) -> Arc<dyn uring_ckpt::source::TensorSource> {
        let [tensor, storage] = self.keep;
        Arc::new(PyCudaSource { memory: self.source, _owners: [tensor.unbind(), storage.unbind()] })
    }
}

/// A CUDA tensor's device memory lent to a background save: the tensor and its storage are
/// held until the save drops the source (once staged). Dropped in field order: the stream
/// first, then the references (queued decrefs when dropped without the GIL).
#[cfg(feature = "cuda")]
struct PyCudaSource {
    memory: CudaTensorSource,
    _owners: [Py<PyAny>; 2],
}

#[cfg(feature = "cuda")]
impl uring_ckpt::source::TensorSource for PyCudaSource {
    fn len(&self) -> usize {
        self.memory.len()
    }

    fn host_bytes(&self) -> Option<&[u8]> {
        None
    }

    fn copy_to(&self, offset: usize, dst: &mut [u8]) -> uring_ckpt::Result<()> {
        self.memory.copy_to(offset, dst)
    }
}

/// The CUDA side of one writer (feature `cuda`; empty without it): the primary context of
/// each device saved from, and the page-locking of the staging pool, done once on the first
/// save with a CUDA tensor. A writer declares it before its I/O, so it is dropped first:
/// the staging buffers are unregistered before the pool is freed.
#[derive(Default)]
pub(crate) struct Gpu {
    #[cfg(feature = "cuda")]
    contexts: Mutex<Vec<(i32, Arc<CudaContext>)>>,
    #[cfg(feature = "cuda")]
    staging: OnceLock<PageLocked>,
}

/// The staging pool's registration with CUDA.
#[cfg(feature = "cuda")]
struct PageLocked {
    /// The registrar (the pool unregisters each buffer before freeing it).
    _staging: std::sync::Arc<uring_ckpt::source::cuda::CudaStaging>,
    /// Buffers page-locked.
    registered: usize,
}

impl Gpu {
    /// Validates and holds a CUDA torch tensor's device memory.
    #[cfg(feature = "cuda")]
    pub(crate) fn hold<'py>(&self, py: Python<'py>, obj: &Bound<'py, PyAny>) -> PyResult<CudaTensor<'py>> {
        use crate::errors::{to_py_err, OrRaise};
        if !cuda_available() {
            return Err(to_py_err(
                py,
                uring_ckpt::Error::Unavailable("CUDA (libcuda.so.1 not found)".into()),
            ));
        }
        let (address, len, storage) = crate::torch::torch_memory(py, obj, "cuda")?;
        let ordinal: i32 = obj.getattr("device")?.getattr("index")?.extract()?;
        let ctx = self.context(ordinal).or_raise(py)?;
        // SAFETY: `address`/`len` are the `data_ptr()` and `numel() * element_size()` of a
        // dense, contiguous tensor on CUDA device `ordinal` with no lazy conjugate/negative
        // bit (checked by `torch_memory`), so they are device memory of `len` bytes in that
        // device; `ctx` is the device's primary context, the one torch allocates in. The
        // returned `CudaTensor` keeps the tensor and its storage referenced, and whoever owns
        // the source (the sync save's `CudaTensor`, the async save's `PyCudaSource`) keeps
        // them so at least until the save is staged, so torch does not free (or reuse) the
        // memory. "Unmodified": the Python side synchronizes the device before the save
        // (pending kernels writing the tensor have finished) and hands control back only
        // once the save no longer reads it (sync: returned; async: `staged`); a caller
        // writing the tensor from another thread meanwhile races, as documented for the CPU
        // path.
        let source = unsafe { CudaTensorSource::from_raw(ctx, address as u64, len) }.or_raise(py)?;
        Ok(CudaTensor { source, keep: [obj.clone(), storage] })
    }

    /// Refuses a CUDA torch tensor: this build has no CUDA.
    #[cfg(not(feature = "cuda"))]
    pub(crate) fn hold(
        &self,
        _py: Python<'_>,
        _obj: &Bound<'_, PyAny>,
    ) -> PyResult<std::convert::Infallible> {
        Err(pyo3::exceptions::PyValueError::new_err(
            "this uring_ckpt extension was built without CUDA: rebuild it with \
             `maturin develop --release --features cuda`, or move the tensor to the CPU",
        ))
    }

    /// The primary context of device `ordinal` (retained once per writer).
    #[cfg(feature = "cuda")]
    fn context(&self, ordinal: i32) -> uring_ckpt::Result<Arc<CudaContext>> {
        let mut contexts = self.contexts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, ctx)) = contexts.iter().find(|(o, _)| *o == ordinal) {
            return Ok(ctx.clone());
        }
        let ctx = CudaContext::new(ordinal)?;
        contexts.push((ordinal, ctx.clone()));
        Ok(ctx)
    }

    /// Page-locks the staging pool of `io` for device-to-host copies, once, if a CUDA tensor
    /// was held. A refusal (`RLIMIT_MEMLOCK`, say) is logged to the `uring_ckpt` logger and
    /// the copies go to pageable memory.
    #[cfg(feature = "cuda")]
    pub(crate) fn prepare_staging(&self, py: Python<'_>, io: &UringCheckpointIO) {
        use uring_ckpt::source::cuda::CudaStaging;
        if self.staging.get().is_some() {
            return;
        }
        let first = self.contexts.lock().unwrap_or_else(|e| e.into_inner()).first().map(|(_, c)| c.clone());
        let Some(ctx) = first else { return };
        let mut refused: Option<String> = None;
        let mut ran = false;
        let registered = py.detach(|| {
            self.staging
                .get_or_init(|| {
                    ran = true;
                    let staging = std::sync::Arc::new(CudaStaging::new(ctx));
                    let registration = io.prepare_staging(staging.clone());
                    refused = registration.first_error.map(|e| e.to_string());
                    PageLocked { _staging: staging, registered: registration.registered }
                })
                .registered
        });
        if !ran {
            return;
        }
        match refused {
            Some(e) => py_log(
                py,
                "warning",
                &format!(
                    "page-locking the staging buffers for CUDA copies failed ({e}); {registered} \
                     page-locked, the others stay pageable (slower copies)"
                ),
            ),
            None => py_log(py, "info", &format!("{registered} staging buffers page-locked for CUDA copies")),
        }
    }

    #[cfg(not(feature = "cuda"))]
    pub(crate) fn prepare_staging(&self, _py: Python<'_>, _io: &UringCheckpointIO) {}

    /// Staging buffers page-locked so far (0 until a CUDA tensor was saved).
    pub(crate) fn page_locked(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            self.staging.get().map_or(0, |s| s.registered)
        }
        #[cfg(not(feature = "cuda"))]
        {
            0
        }
    }

    /// Whether the staging pool was page-locked (the pool unregisters each buffer before it
    /// frees it).
    pub(crate) fn prepared(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.staging.get().is_some()
        }
        #[cfg(not(feature = "cuda"))]
        {
            false
        }
    }
}
