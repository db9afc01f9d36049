//! A save's tensor entries, `(name, dtype, shape, kind, obj)`, turned into what the core
//! takes: memory held for a synchronous save ([`Held`], borrowed as [`TensorData`]), or
//! lent to a background save as an owned [`TensorSource`].

use std::sync::{Arc, OnceLock};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use uring_ckpt::checkpoint::TensorData;
use uring_ckpt::source::{HostPtrSource, TensorSource};
use uring_ckpt::Dtype;

use crate::cuda::Gpu;
use crate::torch::torch_memory;

/// Every safetensors dtype this build knows, as spelled in shard headers.
#[pyfunction]
pub(crate) fn dtypes() -> Vec<&'static str> {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES.get_or_init(|| Dtype::ALL.iter().map(|d| d.as_str()).collect()).clone()
}

/// One `(name, dtype, shape, kind, obj)` entry of a save's tensor list, its dtype parsed.
pub(crate) struct Entry<'py> {
    pub(crate) name: String,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<u64>,
    /// `"torch"`, `"cuda"` or `"buffer"` (see [`hold`]).
    pub(crate) kind: String,
    pub(crate) obj: Bound<'py, PyAny>,
}

/// The entries of a save's tensor list, in order.
pub(crate) fn entries<'py>(tensors: &Bound<'py, PyList>) -> impl Iterator<Item = PyResult<Entry<'py>>> {
    tensors.iter().map(|entry| {
        let entry = entry.cast_into::<PyTuple>()?;
        let (name, dtype, shape, kind, obj): (String, String, Vec<u64>, String, Bound<'_, PyAny>) =
            entry.extract()?;
        let dtype = Dtype::parse(&dtype)
            .ok_or_else(|| PyValueError::new_err(format!("unknown safetensors dtype {dtype:?}")))?;
        Ok(Entry { name, dtype, shape, kind, obj })
    })
}

/// The memory behind one tensor to save, and what keeps it alive.
pub(crate) enum Held<'py> {
    /// A CUDA torch tensor's device memory (feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaTensor<'py>),
    /// A CPU torch tensor's bytes, with the tensor and its storage kept alive.
    Torch {
        /// The tensor and its `untyped_storage()`, held only to keep the memory allocated.
        _keep: [Bound<'py, PyAny>; 2],
        /// `data_ptr()`.
        address: usize,
        /// `numel() * element_size()`.
        len: usize,
    },
    /// Any buffer-protocol object (a uint8 view of a numpy array, bytes, ...).
    Buffer(PyBuffer<u8>),
}

impl Held<'_> {
    /// The tensor's bytes as the core takes them.
    pub(crate) fn data(&self) -> TensorData<'_> {
        match self {
            #[cfg(feature = "cuda")]
            Held::Cuda(tensor) => tensor.data(),
            Held::Torch { len: 0, .. } => TensorData::Host(&[]),
            Held::Torch { address, len, .. } => {
                // SAFETY: `address` and `len` are the tensor's `data_ptr()` and
                // `numel() * element_size()`, read from a contiguous, strided, CPU tensor that
                // is neither conjugated nor negated (checked in `hold_torch`), so they describe
                // its bytes in order. The tensor and its storage are held by this value, so the
                // memory stays allocated while the slice lives (it lives no longer than `self`).
                // The slice is only read. Another Python thread writing into the tensor during a
                // synchronous save races with the write to disk, exactly as with `torch.save`;
                // that is documented as the caller's responsibility.
                let bytes = unsafe { std::slice::from_raw_parts(*address as *const u8, *len) };
                TensorData::Host(bytes)
            }
            Held::Buffer(buf) if buf.len_bytes() == 0 => TensorData::Host(&[]),
            // SAFETY: the buffer is C-contiguous (checked in `hold`) and exported until
            // `buf` is dropped (which releases it), so `len_bytes` bytes at `buf_ptr` are
            // valid for reads while the slice (bounded by `&self`) lives. Only read.
            Held::Buffer(buf) => TensorData::Host(unsafe {
                std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes())
            }),
        }
    }
}

/// Validates and holds a tensor entry's memory: `kind` is `"torch"`, `"cuda"` (a CUDA torch
/// tensor; needs the `cuda` feature) or `"buffer"`. `gpu` makes the CUDA sources.
pub(crate) fn hold<'py>(
    py: Python<'py>,
    gpu: &Gpu,
    kind: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<Held<'py>> {
    match kind {
        "torch" => hold_torch(py, obj),
        #[cfg(feature = "cuda")]
        "cuda" => gpu.hold(py, obj).map(Held::Cuda),
        #[cfg(not(feature = "cuda"))]
        "cuda" => match gpu.hold(py, obj)? {},
        "buffer" => {
            let buf = PyBuffer::<u8>::get(obj)?;
            if !buf.is_c_contiguous() {
                return Err(PyValueError::new_err("tensor buffer is not C-contiguous"));
            }
            Ok(Held::Buffer(buf))
        }
        other => Err(PyValueError::new_err(format!("unknown tensor entry kind {other:?}"))),
    }
}

fn hold_torch<'py>(py: Python<'py>, obj: &Bound<'py, PyAny>) -> PyResult<Held<'py>> {
    let (address, len, storage) = torch_memory(py, obj, "cpu")?;
    Ok(Held::Torch { _keep: [obj.clone(), storage], address, len })
}

/// Host memory of a Python object, lent by address to a background save: the object (and,
/// for a torch tensor, its storage) is held until the save drops the source, which it does
/// once staged. Dropping a `Py` without the GIL only queues the decref (no GIL is taken).
struct PyHostSource {
    memory: HostPtrSource,
    _owners: Vec<Py<PyAny>>,
}

impl TensorSource for PyHostSource {
    fn len(&self) -> usize {
        self.memory.len()
    }

    fn host_bytes(&self) -> Option<&[u8]> {
        self.memory.host_bytes()
    }

    fn copy_to(&self, offset: usize, dst: &mut [u8]) -> uring_ckpt::Result<()> {
        self.memory.copy_to(offset, dst)
    }
}

/// An entry's memory as a source for a background save, holding the objects that keep it
/// allocated.
pub(crate) fn lend(
    py: Python<'_>,
    gpu: &Gpu,
    kind: &str,
    obj: &Bound<'_, PyAny>,
) -> PyResult<Arc<dyn TensorSource>> {
    let (address, len, owners) = match hold(py, gpu, kind, obj)? {
        #[cfg(feature = "cuda")]
        Held::Cuda(tensor) => return Ok(tensor.lend()),
        Held::Torch { _keep: [tensor, storage], address, len } => {
            (address, len, vec![tensor.unbind(), storage.unbind()])
        }
        // The buffer is released at once; the exporting object (a numpy array refuses to
        // resize while referenced) keeps the memory.
        Held::Buffer(buf) => (buf.buf_ptr() as usize, buf.len_bytes(), vec![obj.clone().unbind()]),
    };
    // SAFETY: `address`/`len` describe the object's bytes (see `Held::data`), and the
    // objects in `owners` keep that memory allocated for as long as this source lives; the
    // save drops the source once staged, and nothing here writes the memory. Changes made
    // to the tensor by Python before `staged` race with the copy: the Python side waits
    // for `staged` before handing control back to the caller.
    let memory = unsafe { HostPtrSource::new(address as *const u8, len) };
    Ok(Arc::new(PyHostSource { memory, _owners: owners }))
}
