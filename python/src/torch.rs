//! The memory of a torch tensor, read through its Python API and checked to be one dense
//! byte range (shared by the CPU and the CUDA paths).

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// Checks that `obj` is a dense, contiguous torch tensor on a `device_type` device without
/// lazy conjugate/negative bits, and returns its `data_ptr()`, its byte length and its
/// `untyped_storage()` (which keeps the memory allocated).
pub(crate) fn torch_memory<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    device_type: &str,
) -> PyResult<(usize, usize, Bound<'py, PyAny>)> {
    let torch = py.import("torch")?;
    if !obj.is_instance(&torch.getattr("Tensor")?)? {
        return Err(PyTypeError::new_err("expected a torch.Tensor"));
    }
    let check = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(PyValueError::new_err(format!("tensor must be {what} (make it so before saving)")))
        }
    };
    let on =
        if device_type == "cpu" { "on the CPU".to_string() } else { format!("on a {device_type} device") };
    check(obj.getattr("device")?.getattr("type")?.extract::<String>()? == device_type, &on)?;
    check(obj.getattr("layout")?.eq(torch.getattr("strided")?)?, "strided (dense)")?;
    check(obj.call_method0("is_contiguous")?.extract::<bool>()?, "contiguous")?;
    check(!obj.call_method0("is_conj")?.extract::<bool>()?, "without a lazy conjugate bit")?;
    check(!obj.call_method0("is_neg")?.extract::<bool>()?, "without a lazy negative bit")?;
    let numel: usize = obj.call_method0("numel")?.extract()?;
    let element_size: usize = obj.call_method0("element_size")?.extract()?;
    let len = numel
        .checked_mul(element_size)
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| PyValueError::new_err("tensor byte size overflows"))?;
    let address: usize = obj.call_method0("data_ptr")?.extract()?;
    if address == 0 && len != 0 {
        return Err(PyValueError::new_err("tensor has no data"));
    }
    let storage = obj.call_method0("untyped_storage")?;
    Ok((address, len, storage))
}

/// One destination of a load into torch tensors, as Python hands it: `(name, tensor, dtype,
/// shape)`, `dtype` the safetensors name of the tensor's dtype.
pub(crate) type PyDest<'py> = (String, Bound<'py, PyAny>, String, Vec<u64>);

/// A sink over tensors' memory and the objects (tensors, storages) that keep it allocated
/// while the sink lives.
pub(crate) type HeldSink<'py> = (Box<dyn uring_ckpt::sink::TensorSink + Send>, Vec<Bound<'py, PyAny>>);
