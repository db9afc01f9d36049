//! `Buffer`: loaded tensor bytes exported to Python through the buffer protocol, without a
//! copy (`torch.frombuffer`/`numpy.frombuffer` view them). The one unsafe type of the
//! loading side: it fills CPython's `Py_buffer` by hand.

use std::ffi::{c_int, c_void, CStr};

use bytes::Bytes;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

/// Loaded tensor bytes that Python can view without a copy (buffer protocol, writable: each
/// `Buffer` is the only handle on its byte range, see `__getbuffer__`).
#[pyclass(module = "uring_ckpt._uring_ckpt", frozen)]
pub(crate) struct Buffer {
    data: Bytes,
}

impl Buffer {
    /// The `Buffer` of one loaded tensor's bytes.
    ///
    /// # Safety
    ///
    /// Nothing else may read or write `data`'s byte range while the `Buffer` lives (it is
    /// exported writable): `data` is one tensor of a finished load, which hands each tensor's
    /// range out once, and ranges never overlap.
    pub(crate) unsafe fn new(data: Bytes) -> Self {
        Buffer { data }
    }
}

#[pymethods]
impl Buffer {
    fn __len__(&self) -> usize {
        self.data.len()
    }

    /// # Safety
    ///
    /// `view` must be a valid `Py_buffer` to fill (CPython guarantees it).
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("null Py_buffer"));
        }
        let data = &slf.get().data;
        let ptr = data.as_ptr() as *mut c_void;
        let len = data.len() as isize;
        static FORMAT: &CStr = c"B";
        // SAFETY: `view` is valid for writes (checked non-null; CPython hands a real struct).
        // The exported memory is owned by `slf.data`, and `view.obj` holds a reference to
        // `slf` until the consumer releases the view, so it stays allocated that long.
        // Writable: the memory is an allocation made by the loader (an aligned read buffer,
        // or a private copy-on-write mapping of a shard file, whose writes never reach the
        // file) that no Rust code reads or writes again once the load returned; the only
        // handles on this byte range are this `Buffer` (the loader hands each tensor's range
        // to exactly one `Buffer`, and ranges never overlap). Consumers (a torch tensor, a
        // numpy array) may write into it, as they would into memory they allocated.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = ptr;
            (*view).len = len;
            (*view).readonly = 0;
            (*view).itemsize = 1;
            (*view).format =
                if flags & ffi::PyBUF_FORMAT != 0 { FORMAT.as_ptr() as *mut _ } else { std::ptr::null_mut() };
            (*view).ndim = 1;
            (*view).shape = if flags & ffi::PyBUF_ND != 0 { &mut (*view).len } else { std::ptr::null_mut() };
            (*view).strides =
                if flags & ffi::PyBUF_STRIDES != 0 { &mut (*view).itemsize } else { std::ptr::null_mut() };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    /// # Safety
    ///
    /// Called by CPython with a view this object filled.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}
