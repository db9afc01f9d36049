//! Reports handed to Python as JSON: the core's save, load, verify and inspect reports, and
//! the count of the tensors a save read from device memory.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// `value` as JSON.
pub(crate) fn report_json<T: serde::Serialize>(value: &T) -> PyResult<String> {
    serde_json::to_string(value).map_err(not_serializable)
}

fn not_serializable(e: serde_json::Error) -> PyErr {
    PyValueError::new_err(format!("report does not serialize: {e}"))
}

/// Tensors of one save read from device memory through the CUDA source.
#[derive(Clone, Copy, Default)]
pub(crate) struct CudaUse {
    pub(crate) tensors: usize,
    bytes: u64,
}

impl CudaUse {
    /// Counts a tensor entry of `kind` holding `len` bytes (only `"cuda"` ones count).
    pub(crate) fn count(&mut self, kind: &str, len: usize) {
        if kind == "cuda" {
            self.tensors += 1;
            self.bytes += len as u64;
        }
    }
}

/// The save report as JSON, with `cuda_tensors` and `cuda_bytes` (read from device memory
/// by the CUDA source, not copied to the CPU in Python) added.
pub(crate) fn save_report_json(report: &uring_ckpt::SaveReport, cuda: CudaUse) -> PyResult<String> {
    let mut value = serde_json::to_value(report).map_err(not_serializable)?;
    if let Some(fields) = value.as_object_mut() {
        fields.insert("cuda_tensors".into(), cuda.tensors.into());
        fields.insert("cuda_bytes".into(), cuda.bytes.into());
    }
    report_json(&value)
}
