//! Background saves: `AsyncWriter` starts them ([`AsyncCheckpointIO`]) and hands back a
//! `SaveHandle` per save, which waits (GIL released) for its staged and durable completions.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use uring_ckpt::background::{AsyncCheckpointIO, Durable, OwnedCheckpoint, Staged};
use uring_ckpt::UringCheckpointIO;

use crate::config::Config;
use crate::cuda::Gpu;
use crate::errors::OrRaise;
use crate::report::{save_report_json, CudaUse};
use crate::tensors::{entries, lend, Entry};

/// A background save: its staged and durable completions.
#[pyclass(module = "uring_ckpt._uring_ckpt", frozen)]
pub(crate) struct SaveHandle {
    path: PathBuf,
    staged: Staged,
    durable: Mutex<Option<Durable>>,
    outcome: Mutex<Option<PyResult<String>>>,
    cuda: CudaUse,
}

/// A copy of a stored outcome (the error a new reference to the same exception).
fn copy_outcome(py: Python<'_>, outcome: &PyResult<String>) -> PyResult<String> {
    match outcome {
        Ok(report) => Ok(report.clone()),
        Err(e) => Err(e.clone_ref(py)),
    }
}

/// `timeout` seconds (negative ones as zero).
fn seconds(timeout: f64) -> Duration {
    // NaN and negative wait nothing; infinity (or more than a Duration holds) waits "forever".
    Duration::try_from_secs_f64(timeout.max(0.0)).unwrap_or(Duration::MAX)
}

impl SaveHandle {
    fn stored(&self, py: Python<'_>) -> Option<PyResult<String>> {
        let outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        outcome.as_ref().map(|r| copy_outcome(py, r))
    }
}

#[pymethods]
impl SaveHandle {
    /// The checkpoint path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Waits (GIL released) until the save no longer reads the tensors; False on timeout.
    #[pyo3(signature = (timeout=None))]
    fn wait_staged(&self, py: Python<'_>, timeout: Option<f64>) -> bool {
        py.detach(|| match timeout {
            Some(t) => self.staged.wait_timeout(seconds(t)),
            None => {
                self.staged.wait();
                true
            }
        })
    }

    /// Waits (GIL released) until the checkpoint is committed and returns the save report as
    /// JSON, or raises the save's error; None on timeout.
    #[pyo3(signature = (timeout=None))]
    fn wait_durable(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<String>> {
        if let Some(stored) = self.stored(py) {
            return stored.map(Some);
        }
        let result = py.detach(|| {
            let mut slot = self.durable.lock().unwrap_or_else(|e| e.into_inner());
            let durable = slot.as_ref()?;
            if let Some(t) = timeout {
                if !durable.wait_timeout(seconds(t)) {
                    return None;
                }
            }
            slot.take().map(Durable::wait)
        });
        let Some(result) = result else {
            // Timed out, or another thread took the result: it is stored by now or soon.
            return match self.stored(py) {
                Some(stored) => stored.map(Some),
                None => Ok(None),
            };
        };
        let converted = result.or_raise(py).and_then(|r| save_report_json(&r, self.cuda));
        let mut outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        *outcome = Some(copy_outcome(py, &converted));
        converted.map(Some)
    }

    /// Whether the save no longer reads the tensors.
    fn is_staged(&self) -> bool {
        self.staged.is_staged()
    }

    /// Whether the save finished (committed or failed).
    fn is_done(&self) -> bool {
        let stored = self.outcome.lock().map(|o| o.is_some()).unwrap_or(true);
        stored || self.durable.lock().map(|d| d.as_ref().is_none_or(Durable::is_done)).unwrap_or(true)
    }
}

/// Background saves ([`AsyncCheckpointIO`]) with this configuration's `async_mode`
/// (`snapshot`: the tensors are copied into a reused host area, the shortest stall; `stream`:
/// through the staging ring, no extra memory), `max_saves_in_flight`, `background_nice` and
/// `background_threads`.
#[pyclass(module = "uring_ckpt._uring_ckpt", frozen)]
pub(crate) struct AsyncWriter {
    /// Declared first, so dropped before `io` (see [`Gpu`] and `Drop`).
    gpu: Gpu,
    io: Arc<AsyncCheckpointIO<UringCheckpointIO>>,
}

impl Drop for AsyncWriter {
    /// With the staging pool page-locked, waits for the saves still running, so that their
    /// device copies end before the CUDA contexts in `gpu` go (the pool itself unregisters
    /// each buffer before freeing it).
    fn drop(&mut self) {
        if self.gpu.prepared() {
            let io = self.io.clone();
            Python::attach(|py| py.detach(|| io.teardown().ok()));
        }
    }
}

#[pymethods]
impl AsyncWriter {
    #[new]
    fn new(py: Python<'_>, config: &Config) -> PyResult<Self> {
        let io = AsyncCheckpointIO::from_config(config.inner.clone()).or_raise(py)?;
        Ok(AsyncWriter { gpu: Gpu::default(), io: Arc::new(io) })
    }

    /// Staging buffers page-locked for CUDA copies (see `Writer.cuda_staging_buffers`).
    #[getter]
    fn cuda_staging_buffers(&self) -> usize {
        self.gpu.page_locked()
    }

    /// Starts saving (same arguments as `Writer.save`) and returns its `SaveHandle` once the
    /// save has started (waiting first, GIL released, for a free slot). The tensors (CUDA
    /// ones included) must not change until `wait_staged()` returns.
    #[pyo3(signature = (path, tensors, extra_files, metadata, hf_index=true))]
    fn save(
        &self,
        py: Python<'_>,
        path: PathBuf,
        tensors: &Bound<'_, PyList>,
        extra_files: &Bound<'_, PyList>,
        metadata: BTreeMap<String, String>,
        hf_index: bool,
    ) -> PyResult<SaveHandle> {
        let mut checkpoint = OwnedCheckpoint::new();
        let mut cuda = CudaUse::default();
        self.gpu.begin_save();
        for entry in entries(tensors) {
            let Entry { name, dtype, shape, kind, obj } = entry?;
            let source = lend(py, &self.gpu, &kind, &obj)?;
            cuda.count(&kind, source.len());
            checkpoint.add(name, dtype, &shape, source).or_raise(py)?;
        }
        if cuda.tensors > 0 {
            self.gpu.prepare_staging(py, self.io.inner());
        }
        let extras: Vec<(String, Bound<'_, PyBytes>)> = extra_files.extract()?;
        for (name, bytes) in &extras {
            checkpoint.add_extra_file(name.clone(), Bytes::copy_from_slice(bytes.as_bytes())).or_raise(py)?;
        }
        checkpoint.metadata = metadata;
        checkpoint.hf_index = hf_index;
        let io = self.io.clone();
        let started = py.detach(|| io.save_checkpoint(checkpoint, &path));
        let handle = started.or_raise(py)?;
        let staged = handle.staged();
        Ok(SaveHandle {
            path: handle.path().to_path_buf(),
            staged,
            durable: Mutex::new(Some(handle.durable())),
            outcome: Mutex::new(None),
            cuda,
        })
    }

    /// Saves running or waiting.
    fn in_flight(&self) -> usize {
        self.io.in_flight()
    }

    /// Reserves a snapshot area of at least `nbytes` and faults it in on a helper thread at
    /// the config's `background_nice`, so that the first save does not fault it in while its
    /// caller waits; returns at once (see `AsyncCheckpointIO::reserve_snapshot`). Snapshot
    /// mode only.
    fn reserve(&self, py: Python<'_>, nbytes: usize) -> PyResult<()> {
        let io = self.io.clone();
        py.detach(|| io.reserve_snapshot(nbytes)).or_raise(py)
    }

    /// Waits (GIL released) until no reservation is faulting an area in.
    fn wait_reserved(&self, py: Python<'_>) {
        let io = self.io.clone();
        py.detach(|| io.wait_reserved());
    }

    /// The snapshot areas: `areas` (kept), `in_use`, `reserved_bytes`, `resident_bytes`
    /// (faulted in), `reserving` (a helper at work), `pending_bytes`.
    fn snapshot_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let io = self.io.clone();
        let s = py.detach(|| io.snapshot_stats());
        let out = PyDict::new(py);
        out.set_item("areas", s.areas)?;
        out.set_item("in_use", s.in_use)?;
        out.set_item("reserved_bytes", s.reserved_bytes)?;
        out.set_item("resident_bytes", s.resident_bytes)?;
        out.set_item("reserving", s.reserving)?;
        out.set_item("pending_bytes", s.pending_bytes)?;
        Ok(out)
    }

    /// Waits (GIL released) for every save, then raises the first error of a save whose
    /// handle was dropped without its result being looked at.
    fn teardown(&self, py: Python<'_>) -> PyResult<()> {
        let io = self.io.clone();
        py.detach(|| io.teardown()).or_raise(py)
    }
}
