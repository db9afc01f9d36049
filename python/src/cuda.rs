//! The CUDA side of a writer: `cuda_built`/`cuda_available`, the primary context of each
//! device saved from, CUDA torch tensors held for a save (or lent to a background one) as
//! `uring_ckpt::source::cuda::CudaTensorSource`s, and the page-locking of the staging pool.
//!
//! Ordering: each CUDA tensor's copies wait (on the device, `cuStreamWaitEvent`) for an
//! event recorded on `torch.cuda.current_stream(device)` when the save starts holding its
//! tensors, so kernels queued on torch's current stream before the save (the ones that
//! computed the tensors, the contiguous copies `flatten` made) finish before the bytes are
//! read; work on other streams must be ordered before it as torch requires anyway
//! (`current_stream().wait_stream(side)`). No device-wide synchronize. The caller's current
//! CUDA context (torch's current device) is never changed: the core pushes and pops its
//! context around every driver call.
//!
//! Everything that touches CUDA is behind the crate's `cuda` feature; without it [`Gpu`] is
//! empty, refuses CUDA tensors and reports nothing page-locked.

#[cfg(feature = "cuda")]
use std::cell::Cell;
#[cfg(feature = "cuda")]
use std::sync::{Arc, Mutex, OnceLock};
#[cfg(feature = "cuda")]
use std::time::Instant;

use pyo3::prelude::*;
#[cfg(feature = "cuda")]
use uring_ckpt::source::cuda::{CudaContext, CudaEvent, CudaTensorSource};
use uring_ckpt::UringCheckpointIO;

/// Whether this extension was built with the `cuda` feature.
#[pyfunction]
pub(crate) fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

/// Whether CUDA tensors can be saved from device memory: built with the `cuda` feature, the
/// CUDA driver library (`libcuda.so.1`, the instance torch uses) loads, `cuInit` succeeds
/// and there is a device (see `uring_ckpt::source::cuda::probe`). Never raises.
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

    fn host_registrar(&self) -> Option<Arc<dyn uring_ckpt::io::Registrar>> {
        self.memory.host_registrar()
    }
}

#[cfg(feature = "cuda")]
thread_local! {
    /// When the save running on this thread (the Python thread holding its tensors)
    /// started holding them: events recorded before that do not cover its tensors.
    static SAVE_BEGAN: Cell<Option<Instant>> = const { Cell::new(None) };
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
    /// Events recorded on torch's current stream of a device, with when: a save reuses one
    /// recorded after it began (one event per device and save, not per tensor).
    #[cfg(feature = "cuda")]
    events: Mutex<Vec<(i32, Instant, Arc<CudaEvent>)>>,
}

/// The staging pool's registration with CUDA.
#[cfg(feature = "cuda")]
struct PageLocked {
    /// The registrar (the pool unregisters each buffer before freeing it); it counts the
    /// buffers registered now.
    staging: std::sync::Arc<uring_ckpt::source::cuda::CudaStaging>,
}

impl Gpu {
    /// Marks the start of a save on this thread: the CUDA tensors it holds next are ordered
    /// after an event recorded from now on (see the module docs).
    pub(crate) fn begin_save(&self) {
        #[cfg(feature = "cuda")]
        SAVE_BEGAN.with(|b| b.set(Some(Instant::now())));
    }

    /// An event recorded on torch's current stream of `device` (ordinal `ordinal`) since
    /// this thread's save began, recording one if needed.
    #[cfg(feature = "cuda")]
    fn producer_event(
        &self,
        py: Python<'_>,
        ctx: &Arc<CudaContext>,
        ordinal: i32,
        device: &Bound<'_, PyAny>,
    ) -> PyResult<Arc<CudaEvent>> {
        use crate::errors::OrRaise;
        let began = SAVE_BEGAN.with(Cell::get);
        if let Some(began) = began {
            // The lock is never held across a call into Python (which may let another
            // thread take the GIL and then wait for this lock).
            let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, _, event)) = events.iter().find(|(o, at, _)| *o == ordinal && *at >= began) {
                return Ok(event.clone());
            }
        }
        let stream: u64 = py
            .import("torch")?
            .getattr("cuda")?
            .call_method1("current_stream", (device,))?
            .getattr("cuda_stream")?
            .extract()?;
        let at = Instant::now();
        // SAFETY: `stream` is torch's current stream of device `ordinal` (0 for the legacy
        // default stream), a live stream of that device's primary context, which is `ctx`
        // (torch allocates and launches in the primary context). It is only recorded on.
        let event = Arc::new(unsafe { CudaEvent::record(ctx.clone(), stream) }.or_raise(py)?);
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.retain(|(o, _, _)| *o != ordinal);
        events.push((ordinal, at, event.clone()));
        Ok(event)
    }

    /// Validates and holds a CUDA torch tensor's device memory, its copies ordered after
    /// torch's current stream of its device.
    #[cfg(feature = "cuda")]
    pub(crate) fn hold<'py>(&self, py: Python<'py>, obj: &Bound<'py, PyAny>) -> PyResult<CudaTensor<'py>> {
        use crate::errors::{to_py_err, OrRaise};
        if let Err(e) = uring_ckpt::source::cuda::probe() {
            return Err(to_py_err(py, e));
        }
        let (address, len, storage) = crate::torch::torch_memory(py, obj, "cuda")?;
        let device = obj.getattr("device")?;
        let ordinal: i32 = device.getattr("index")?.extract()?;
        let ctx = self.context(ordinal).or_raise(py)?;
        let event = self.producer_event(py, &ctx, ordinal, &device)?;
        // SAFETY: `address`/`len` are the `data_ptr()` and `numel() * element_size()` of a
        // dense, contiguous tensor on CUDA device `ordinal` with no lazy conjugate/negative
        // bit (checked by `torch_memory`), so they are device memory of `len` bytes in that
        // device; `ctx` is the device's primary context, the one torch allocates in. The
        // returned `CudaTensor` keeps the tensor and its storage referenced, and whoever owns
        // the source (the sync save's `CudaTensor`, the async save's `PyCudaSource`) keeps
        // them so at least until the save is staged, so torch does not free (or reuse) the
        // memory. "Unmodified": every copy waits for `event`, recorded on torch's current
        // stream of the device after the tensor was produced (kernels queued there before,
        // the contiguous copies of `flatten` included, finish first), and the Python side
        // hands control back only once the save no longer reads it (sync: returned; async:
        // `staged`); work on another stream not ordered before torch's current stream, or a
        // caller writing the tensor from another thread meanwhile, races, as documented.
        let source = unsafe { CudaTensorSource::from_raw(ctx, address as u64, len) }
            .and_then(|s| s.after(event))
            .or_raise(py)?;
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

    /// A sink over the device memory of CUDA torch tensors of one device (`(name, tensor,
    /// dtype, shape)`), its copies ordered after torch's current stream of the device (where
    /// the tensors were allocated), and the objects that keep the memory allocated.
    #[cfg(feature = "cuda")]
    pub(crate) fn sink<'py>(
        &self,
        py: Python<'py>,
        dests: Vec<crate::torch::PyDest<'py>>,
    ) -> PyResult<crate::torch::HeldSink<'py>> {
        use crate::errors::{to_py_err, OrRaise};
        use uring_ckpt::sink::cuda::{CudaDest, CudaSink};
        if let Err(e) = uring_ckpt::source::cuda::probe() {
            return Err(to_py_err(py, e));
        }
        let Some((_, first, _, _)) = dests.first() else {
            return Err(pyo3::exceptions::PyValueError::new_err("no destinations"));
        };
        let device = first.getattr("device")?;
        let ordinal: i32 = device.getattr("index")?.extract()?;
        let ctx = self.context(ordinal).or_raise(py)?;
        // Recorded after the tensors were allocated on torch's current stream.
        SAVE_BEGAN.with(|b| b.set(Some(Instant::now())));
        let event = self.producer_event(py, &ctx, ordinal, &device)?;
        let mut keep = Vec::with_capacity(2 * dests.len());
        let mut raw = Vec::with_capacity(dests.len());
        for (name, obj, dtype, shape) in dests {
            let (address, len, storage) = crate::torch::torch_memory(py, &obj, "cuda")?;
            let dtype = uring_ckpt::Dtype::parse(&dtype).ok_or_else(|| {
                pyo3::exceptions::PyValueError::new_err(format!("tensor {name:?}: unknown dtype {dtype:?}"))
            })?;
            // SAFETY: `address`/`len` are the `data_ptr()` and byte size of a dense,
            // contiguous tensor on CUDA device `ordinal` (checked by `torch_memory`; all
            // destinations are on one device, checked by the caller), device memory of its
            // primary context `ctx`; the tensor and its storage are kept referenced while
            // the sink lives. Every copy waits for `event`, recorded on torch's current
            // stream after the allocation, and the load synchronizes its streams before it
            // returns. Overlapping destinations are refused by the caller.
            raw.push(unsafe { CudaDest::from_raw(name, address as u64, len, Some(dtype), Some(shape)) });
            keep.push(obj);
            keep.push(storage);
        }
        // SAFETY: as above.
        let sink = unsafe { CudaSink::new(ctx, raw) }.and_then(|s| s.after(event)).or_raise(py)?;
        Ok((Box::new(sink), keep))
    }

    /// Refuses CUDA destinations: this build has no CUDA.
    #[cfg(not(feature = "cuda"))]
    pub(crate) fn sink<'py>(
        &self,
        _py: Python<'py>,
        _dests: Vec<crate::torch::PyDest<'py>>,
    ) -> PyResult<crate::torch::HeldSink<'py>> {
        Err(pyo3::exceptions::PyValueError::new_err(
            "this uring_ckpt extension was built without CUDA: rebuild it with \
             `maturin develop --release --features cuda`, or load to the CPU",
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
                    PageLocked { staging }
                })
                .staging
                .registered()
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

    /// Staging buffers page-locked now (0 until a CUDA tensor was saved): the registrar's
    /// live count, so buffers the pool added or freed since are counted as they are.
    pub(crate) fn page_locked(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            self.staging.get().map_or(0, |s| s.staging.registered())
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
