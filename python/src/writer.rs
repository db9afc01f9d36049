//! `Writer`: synchronous saves, loads, removal, verification and inspection with one
//! configuration, every call with the GIL released while the I/O runs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use uring_ckpt::{Checkpoint, CheckpointIO, Dtype, LoadOptions, UringCheckpointIO};

use crate::buffers::Buffer;
use crate::config::Config;
use crate::cuda::Gpu;
use crate::errors::OrRaise;
use crate::report::{report_json, save_report_json, CudaUse};
use crate::sinks::{destinations, PyDest};
use crate::tensors::{entries, hold, Entry, Held};

/// A checkpoint writer and reader with one configuration; keeps its staging buffers between
/// saves. All I/O runs with the GIL released.
#[pyclass(module = "uring_ckpt._uring_ckpt", frozen)]
pub(crate) struct Writer {
    /// Declared first, so dropped before `io` (see [`Gpu`]).
    gpu: Gpu,
    io: UringCheckpointIO,
}

#[pymethods]
impl Writer {
    #[new]
    #[pyo3(signature = (config=None))]
    fn new(py: Python<'_>, config: Option<&Config>) -> PyResult<Self> {
        let config = match config {
            Some(c) => c.inner.clone(),
            None => uring_ckpt::Config::load(None).or_raise(py)?,
        };
        let io = UringCheckpointIO::new(config).or_raise(py)?;
        Ok(Writer { gpu: Gpu::default(), io })
    }

    /// The configuration in use.
    #[getter]
    fn config(&self) -> Config {
        Config { inner: self.io.config().clone() }
    }

    /// Staging buffers page-locked for CUDA copies (0 until a CUDA tensor was saved, and
    /// without the `cuda` feature).
    #[getter]
    fn cuda_staging_buffers(&self) -> usize {
        self.gpu.page_locked()
    }

    /// Saves `tensors` (a list of `(name, dtype, shape, kind, obj)`, `kind` being `"torch"`
    /// for a contiguous CPU torch tensor, `"cuda"` for a contiguous CUDA torch tensor (feature
    /// `cuda`; its copies are ordered after torch's current stream of its device) or `"buffer"` for a C-contiguous buffer of its
    /// bytes), `extra_files` (`(name, bytes)`) and string `metadata` as a committed checkpoint
    /// at `path`. Returns the save report as JSON (with `cuda_tensors` and `cuda_bytes`). No
    /// tensor bytes are copied in Python or here; CUDA tensors are copied from the device
    /// into the staging buffers, chunk by chunk.
    #[pyo3(signature = (path, tensors, extra_files, metadata))]
    fn save(
        &self,
        py: Python<'_>,
        path: PathBuf,
        tensors: &Bound<'_, PyList>,
        extra_files: &Bound<'_, PyList>,
        metadata: BTreeMap<String, String>,
    ) -> PyResult<String> {
        let mut specs: Vec<(String, Dtype, Vec<u64>)> = Vec::with_capacity(tensors.len());
        let mut held: Vec<Held<'_>> = Vec::with_capacity(tensors.len());
        let mut cuda = CudaUse::default();
        self.gpu.begin_save();
        for entry in entries(tensors) {
            let Entry { name, dtype, shape, kind, obj } = entry?;
            specs.push((name, dtype, shape));
            let memory = hold(py, &self.gpu, &kind, &obj)?;
            cuda.count(&kind, memory.data().len());
            held.push(memory);
        }
        if cuda.tensors > 0 {
            self.gpu.prepare_staging(py, &self.io);
        }
        let extras: Vec<(String, Bound<'_, PyBytes>)> = extra_files.extract()?;
        let mut checkpoint = Checkpoint::new();
        for ((name, dtype, shape), memory) in specs.iter().zip(&held) {
            checkpoint.add_source(name.clone(), *dtype, shape, memory.data()).or_raise(py)?;
        }
        for (name, bytes) in &extras {
            checkpoint.add_extra_file(name.clone(), bytes.as_bytes()).or_raise(py)?;
        }
        checkpoint.metadata = metadata;
        let report = py.detach(|| self.io.save_checkpoint(&checkpoint, &path)).or_raise(py)?;
        drop(checkpoint);
        drop(held);
        save_report_json(&report, cuda)
    }

    /// Loads the checkpoint at `path`: returns `(tensors, metadata, extra_files, report)` with
    /// `tensors` a list of `(name, dtype, shape, Buffer)`, `extra_files` a dict of bytes and
    /// `report` JSON.
    #[pyo3(signature = (path, names=None, verify=None))]
    fn load<'py>(
        &self,
        py: Python<'py>,
        path: PathBuf,
        names: Option<Vec<String>>,
        verify: Option<bool>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let options = LoadOptions { names, verify };
        let loaded = py.detach(|| self.io.load_checkpoint(&path, &options)).or_raise(py)?;
        let tensors = PyList::empty(py);
        for t in loaded.tensors {
            // SAFETY: `t.data` is one tensor of the finished load, moved into the `Buffer`:
            // the loader hands each tensor's byte range out once, and ranges never overlap.
            let buffer = Bound::new(py, unsafe { Buffer::new(t.data) })?;
            tensors.append((t.name, t.dtype.as_str(), t.shape, buffer))?;
        }
        let extras = PyDict::new(py);
        for (name, bytes) in &loaded.extra_files {
            extras.set_item(name, PyBytes::new(py, bytes))?;
        }
        let report = report_json(&loaded.report)?;
        (tensors, loaded.metadata, extras, report).into_pyobject(py)
    }

    /// Loads the checkpoint at `path` into existing torch tensors, in place: `dests` is a list
    /// of `(name, tensor, dtype, shape)` (dense, contiguous, all on the CPU or all on one
    /// CUDA device; `dtype` the safetensors name). Every mismatch (missing or unexpected
    /// names with `strict`, sizes, dtypes, shapes) is raised together before anything is
    /// read. Returns `(report, missing, unexpected)`, `report` JSON.
    #[pyo3(signature = (path, dests, names=None, verify=None, strict=true))]
    fn load_into<'py>(
        &self,
        py: Python<'py>,
        path: PathBuf,
        dests: Vec<PyDest<'py>>,
        names: Option<Vec<String>>,
        verify: Option<bool>,
        strict: bool,
    ) -> PyResult<(String, Vec<String>, Vec<String>)> {
        let destinations = destinations(py, &self.gpu, dests)?;
        self.gpu.prepare_staging(py, &self.io);
        let options = LoadOptions { names, verify };
        let sink = destinations.sink.as_ref();
        let loaded = py.detach(|| self.io.load_into(&path, &options, strict, sink)).or_raise(py)?;
        Ok((report_json(&loaded.report)?, loaded.missing, loaded.unexpected))
    }

    /// Deletes the checkpoint at `path` atomically (a missing path is not an error; a
    /// directory that is not a checkpoint is refused).
    fn remove(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.io.remove_checkpoint(&path)).or_raise(py)
    }

    /// Checks every shard, tensor CRC and extra file of the checkpoint at `path`; returns the
    /// report as JSON.
    fn verify(&self, py: Python<'_>, path: PathBuf) -> PyResult<String> {
        let report =
            py.detach(|| uring_ckpt::inspect::verify(self.io.config(), &path, |_, _| {})).or_raise(py)?;
        report_json(&report)
    }

    /// Reads the manifest and shard headers of the checkpoint at `path`; returns JSON.
    fn inspect(&self, py: Python<'_>, path: PathBuf) -> PyResult<String> {
        let info = py.detach(|| uring_ckpt::inspect::inspect(self.io.config(), &path)).or_raise(py)?;
        report_json(&info)
    }
}
