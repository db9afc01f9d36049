//! `Writer`: synchronous saves, loads, removal, verification and inspection with one
//! configuration, every call with the GIL released while the I/O runs; and the three steps
//! of a multi-rank save (`begin_ranks`, `save_rank`, `commit_ranks`) that
//! `uring_ckpt.dcp` drives.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use uring_ckpt::{Checkpoint, CheckpointIO, Dtype, LoadOptions, RankShards, UringCheckpointIO};

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

impl Writer {
    /// Holds the memory of a save's tensor entries (see `save`): their specs, the memory,
    /// and how many came from CUDA memory (the staging pool is page-locked if any did).
    #[allow(clippy::type_complexity)]
    fn hold_tensors<'py>(
        &self,
        py: Python<'py>,
        tensors: &Bound<'py, PyList>,
    ) -> PyResult<(Vec<(String, Dtype, Vec<u64>)>, Vec<Held<'py>>, CudaUse)> {
        let mut specs: Vec<(String, Dtype, Vec<u64>)> = Vec::with_capacity(tensors.len());
        let mut held: Vec<Held<'py>> = Vec::with_capacity(tensors.len());
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
        Ok((specs, held, cuda))
    }
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
    /// at `path`, with a Hugging Face `model.safetensors.index.json` when `hf_index`.
    /// Returns the save report as JSON (with `cuda_tensors` and `cuda_bytes`). No
    /// tensor bytes are copied in Python or here; CUDA tensors are copied from the device
    /// into the staging buffers, chunk by chunk.
    #[pyo3(signature = (path, tensors, extra_files, metadata, hf_index=true))]
    fn save(
        &self,
        py: Python<'_>,
        path: PathBuf,
        tensors: &Bound<'_, PyList>,
        extra_files: &Bound<'_, PyList>,
        metadata: BTreeMap<String, String>,
        hf_index: bool,
    ) -> PyResult<String> {
        let (specs, held, cuda) = self.hold_tensors(py, tensors)?;
        let extras: Vec<(String, Bound<'_, PyBytes>)> = extra_files.extract()?;
        let mut checkpoint = Checkpoint::new();
        for ((name, dtype, shape), memory) in specs.iter().zip(&held) {
            checkpoint.add_source(name.clone(), *dtype, shape, memory.data()).or_raise(py)?;
        }
        for (name, bytes) in &extras {
            checkpoint.add_extra_file(name.clone(), bytes.as_bytes()).or_raise(py)?;
        }
        checkpoint.metadata = metadata;
        checkpoint.hf_index = hf_index;
        let report = py.detach(|| self.io.save_checkpoint(&checkpoint, &path)).or_raise(py)?;
        drop(checkpoint);
        drop(held);
        save_report_json(&report, cuda)
    }

    /// Begins a multi-rank save of `path` on its coordinator (before any rank writes):
    /// refuses an existing `path` unless the config replaces, removes what failed earlier
    /// multi-rank saves of `path` left, creates the shared temporary directory and returns
    /// the save id every rank passes to `save_rank` and the coordinator to `commit_ranks`.
    fn begin_ranks(&self, py: Python<'_>, path: PathBuf) -> PyResult<String> {
        py.detach(|| self.io.begin_ranks(&path)).or_raise(py)
    }

    /// Writes this rank's `tensors` (entries as for `save`, taken without a copy) as shards
    /// into the shared temporary directory of save `save_id` of `path`; commits nothing.
    /// Returns this rank's part as JSON: `rank`, `shards`, `weight_map`, `data_bytes` and
    /// `tensors` (`name`, `file`, `offset`, `length`, `crc32` of each), which the
    /// coordinator passes to `commit_ranks`.
    fn save_rank(
        &self,
        py: Python<'_>,
        path: PathBuf,
        save_id: String,
        rank: u32,
        tensors: &Bound<'_, PyList>,
    ) -> PyResult<String> {
        let (specs, held, _cuda) = self.hold_tensors(py, tensors)?;
        let mut checkpoint = Checkpoint::new();
        for ((name, dtype, shape), memory) in specs.iter().zip(&held) {
            checkpoint.add_source(name.clone(), *dtype, shape, memory.data()).or_raise(py)?;
        }
        let part = py.detach(|| self.io.save_rank(&checkpoint, &path, &save_id, rank)).or_raise(py)?;
        drop(checkpoint);
        drop(held);
        // The part, plus `"engine"` (how this rank wrote: engine, fallbacks) for the caller
        // to report; the caller drops it before sending the part to the coordinator.
        let mut part_value = serde_json::to_value(&part).map_err(|e| PyValueError::new_err(e.to_string()))?;
        if let (Some(report), Some(fields)) = (&part.report, part_value.as_object_mut()) {
            let engine =
                serde_json::to_value(&report.engine).map_err(|e| PyValueError::new_err(e.to_string()))?;
            fields.insert("engine".to_owned(), engine);
        }
        report_json(&part_value)
    }

    /// Commits a multi-rank save once every rank's part (the JSON `save_rank` returned) is
    /// in: checks that every shard is there, writes `extra_files` (`(name, bytes)`) and the
    /// manifest (with string `metadata`), fsyncs, renames. Nothing is committed on error.
    fn commit_ranks(
        &self,
        py: Python<'_>,
        path: PathBuf,
        save_id: String,
        ranks: Vec<String>,
        metadata: BTreeMap<String, String>,
        extra_files: &Bound<'_, PyList>,
    ) -> PyResult<()> {
        let parts = ranks
            .iter()
            .map(|json| serde_json::from_str::<RankShards>(json))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PyValueError::new_err(format!("commit_ranks: a rank's part does not parse: {e}")))?;
        let extras: Vec<(String, Bound<'_, PyBytes>)> = extra_files.extract()?;
        let files: Vec<(String, &[u8])> = extras.iter().map(|(n, b)| (n.clone(), b.as_bytes())).collect();
        py.detach(|| self.io.commit_ranks(&path, &save_id, &parts, &metadata, &files)).or_raise(py)
    }

    /// Loads the checkpoint at `path`: returns `(tensors, metadata, extra_files, report)` with
    /// `tensors` a list of `(name, dtype, shape, Buffer)`, `extra_files` a dict of bytes and
    /// `report` JSON. With `map`, the shard files are mapped copy-on-write instead of read
    /// (`LoadOptions::map`).
    #[pyo3(signature = (path, names=None, verify=None, map=false))]
    fn load<'py>(
        &self,
        py: Python<'py>,
        path: PathBuf,
        names: Option<Vec<String>>,
        verify: Option<bool>,
        map: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let options = LoadOptions { names, verify, map };
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
        let options = LoadOptions { names, verify, ..LoadOptions::default() };
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
