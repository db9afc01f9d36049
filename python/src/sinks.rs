//! The destinations of a load into existing torch tensors: CPU tensors as a
//! [`HostSink`], CUDA tensors of one device as a `CudaSink` (feature `cuda`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use uring_ckpt::sink::host::HostDest;
use uring_ckpt::sink::{HostSink, TensorSink};
use uring_ckpt::Dtype;

use crate::cuda::Gpu;

pub(crate) use crate::torch::PyDest;

/// A sink over the memory of torch tensors, with the tensors (and their storages) it keeps
/// referenced so that torch cannot free the memory while the load runs.
pub(crate) struct Destinations<'py> {
    pub(crate) sink: Box<dyn TensorSink + Send>,
    _keep: Vec<Bound<'py, PyAny>>,
}

fn parse_dtype(name: &str, dtype: &str) -> PyResult<Dtype> {
    Dtype::parse(dtype)
        .ok_or_else(|| PyValueError::new_err(format!("tensor {name:?}: unknown dtype {dtype:?}")))
}

/// Builds the sink for `dests`: every tensor dense and contiguous, all on the CPU or all on
/// one CUDA device.
pub(crate) fn destinations<'py>(
    py: Python<'py>,
    gpu: &Gpu,
    dests: Vec<PyDest<'py>>,
) -> PyResult<Destinations<'py>> {
    let mut devices: Vec<String> = Vec::new();
    for (_, obj, _, _) in &dests {
        let device: String = obj.getattr("device")?.str()?.extract()?;
        if !devices.contains(&device) {
            devices.push(device);
        }
    }
    if devices.len() > 1 {
        return Err(PyValueError::new_err(format!(
            "load_into: the destinations are on several devices ({}); load each device's tensors in a call of its own",
            devices.join(", ")
        )));
    }
    let on_cuda = devices.first().is_some_and(|d| d.starts_with("cuda"));
    if on_cuda {
        let (sink, keep) = gpu.sink(py, dests)?;
        return Ok(Destinations { sink, _keep: keep });
    }
    let mut keep = Vec::with_capacity(2 * dests.len());
    let mut host = Vec::with_capacity(dests.len());
    for (name, obj, dtype, shape) in dests {
        let (address, len, storage) = crate::torch::torch_memory(py, &obj, "cpu")?;
        let dtype = parse_dtype(&name, &dtype)?;
        // SAFETY: `address`/`len` are the `data_ptr()` and byte size of a dense, contiguous
        // CPU tensor (checked by `torch_memory`), writable host memory; the tensor and its
        // storage are kept referenced in `keep` for as long as the sink lives, so torch does
        // not free it. Two destinations sharing memory (tied weights) are refused below
        // rather than written twice. A Python thread that reads or writes the tensor during
        // the load races, as with any in-place operation.
        host.push(unsafe { HostDest::from_raw(name, address as *mut u8, len) }.expecting(dtype, shape));
        keep.push(obj);
        keep.push(storage);
    }
    refuse_overlaps(&host)?;
    // SAFETY: as above; the ranges are disjoint (checked).
    let sink = unsafe { HostSink::from_dests(host) }.map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(Destinations { sink: Box::new(sink), _keep: keep })
}

/// Two destinations whose memory overlaps (tied or viewed tensors) would be written twice,
/// concurrently: refused, naming both.
fn refuse_overlaps(dests: &[HostDest]) -> PyResult<()> {
    let mut ranges: Vec<(usize, usize, &str)> = dests
        .iter()
        .filter(|d| !d.is_empty())
        .map(|d| (d.address(), d.address() + d.len(), d.name.as_str()))
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(PyValueError::new_err(format!(
                "load_into: destinations {:?} and {:?} share memory; pass one of them",
                pair[0].2, pair[1].2
            )));
        }
    }
    Ok(())
}
