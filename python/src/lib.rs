//! `_uring_ckpt`: the Rust extension module behind the `uring_ckpt` Python package.
//!
//! The Python side (`python_src/uring_ckpt`) flattens a nested state into tensor entries and
//! a pickled sidecar; this module writes them with [`UringCheckpointIO`] while the GIL is
//! released, and reads them back as [`Buffer`] objects that own the loaded bytes and export
//! them through the buffer protocol (so `torch.frombuffer`/`numpy.frombuffer` need no copy).
//!
//! With the `cuda` feature, CUDA torch tensors are saved from device memory: each becomes a
//! [`uring_ckpt::staging::cuda::CudaTensorSource`] in the primary context of its device (the
//! one torch uses), copied chunk by chunk into the (page-locked) staging buffers.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::collections::BTreeMap;
use std::ffi::{c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyOSError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple, PyType};
use uring_ckpt::async_io::{AsyncCheckpointIO, Durable, OwnedCheckpoint, Staged};
use uring_ckpt::checkpoint::TensorData;
use uring_ckpt::staging::{HostPtrSource, TensorSource};
use uring_ckpt::{Checkpoint, CheckpointIO, Dtype, Error, LoadOptions, UringCheckpointIO};

/// Converts a crate error into the matching `uring_ckpt` exception (defined in Python, in
/// `uring_ckpt/_errors.py`); I/O errors become `OSError` with their errno.
fn to_py_err(py: Python<'_>, err: Error) -> PyErr {
    let message = err.to_string();
    let class = match &err {
        Error::Io { source, path, .. } => {
            return match source.raw_os_error() {
                Some(errno) => PyOSError::new_err((errno, message, path.display().to_string())),
                None => PyOSError::new_err(message),
            };
        }
        Error::Format { .. } | Error::Crc { .. } => "CorruptCheckpointError",
        // A directory with a manifest that does not match its files is damaged; one without
        // a manifest (or with no directory at all) is not a checkpoint.
        Error::NotACheckpoint { path, .. } if path.join(uring_ckpt::format::MANIFEST_FILE).exists() => {
            "CorruptCheckpointError"
        }
        Error::NotACheckpoint { .. } => "NotACheckpointError",
        Error::AlreadyExists(_) => "CheckpointExistsError",
        Error::Config(_) => "ConfigError",
        Error::InvalidCheckpoint(_) => "InvalidCheckpointError",
        Error::TensorNotFound(_) => "TensorNotFoundError",
        Error::Unavailable(_) => "UnavailableError",
        Error::Locked(_) => "CheckpointLockedError",
        Error::Internal(_) => "CheckpointError",
    };
    match py
        .import("uring_ckpt._errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| Ok(c.cast_into::<PyType>()?))
    {
        Ok(ty) => PyErr::from_type(ty, message),
        Err(import_error) => import_error,
    }
}

fn parse_dtype(name: &str) -> PyResult<Dtype> {
    Dtype::parse(name).ok_or_else(|| PyValueError::new_err(format!("unknown safetensors dtype {name:?}")))
}

/// A checkpoint configuration (see the crate's `config` module for every key). Build one from
/// keyword arguments with the TOML keys: `Config(engine="uring", chunk_size="8MiB")`.
#[pyclass(module = "uring_ckpt._uring_ckpt", frozen)]
#[derive(Clone)]
struct Config {
    inner: uring_ckpt::Config,
}

/// A TOML value from a Python bool, int, float, str or dict.
fn toml_value(value: &Bound<'_, PyAny>) -> PyResult<toml::Value> {
    if let Ok(b) = value.cast::<pyo3::types::PyBool>() {
        return Ok(toml::Value::Boolean(b.is_true()));
    }
    if let Ok(i) = value.extract::<i64>() {
        return Ok(toml::Value::Integer(i));
    }
    if let Ok(f) = value.extract::<f64>() {
        return Ok(toml::Value::Float(f));
    }
    if let Ok(s) = value.extract::<String>() {
        return Ok(toml::Value::String(s));
    }
    if let Ok(d) = value.cast::<PyDict>() {
        return Ok(toml::Value::Table(toml_table(d)?));
    }
    Err(PyTypeError::new_err(format!("config value {value} is not a bool, int, float, str or dict")))
}

fn toml_table(dict: &Bound<'_, PyDict>) -> PyResult<toml::Table> {
    let mut table = toml::Table::new();
    for (k, v) in dict.iter() {
        table.insert(k.extract::<String>()?, toml_value(&v)?);
    }
    Ok(table)
}

#[pymethods]
impl Config {
    /// Defaults, with the given keys (TOML names) set. Environment variables are not read.
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let table = match kwargs {
            Some(d) => toml_table(d)?,
            None => toml::Table::new(),
        };
        let inner = uring_ckpt::Config::from_toml_str(&table.to_string()).map_err(|e| to_py_err(py, e))?;
        Ok(Config { inner })
    }

    /// The TOML file at `path`, then the `URING_CKPT_*` environment on top; with no path, the
    /// file named by `URING_CKPT_CONFIG` if set (the same rules as the CLI).
    #[staticmethod]
    #[pyo3(signature = (path=None))]
    fn load(py: Python<'_>, path: Option<PathBuf>) -> PyResult<Self> {
        let inner = uring_ckpt::Config::load(path.as_deref()).map_err(|e| to_py_err(py, e))?;
        Ok(Config { inner })
    }

    /// A copy with the given keys changed.
    #[pyo3(signature = (**kwargs))]
    fn replace(&self, py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut table: toml::Table = toml::from_str(&self.inner.to_toml_string())
            .map_err(|e| PyValueError::new_err(format!("config does not round-trip through TOML: {e}")))?;
        if let Some(d) = kwargs {
            for (k, v) in toml_table(d)? {
                table.insert(k, v);
            }
        }
        let inner = uring_ckpt::Config::from_toml_str(&table.to_string()).map_err(|e| to_py_err(py, e))?;
        Ok(Config { inner })
    }

    /// The configuration as TOML (every key).
    fn to_toml(&self) -> String {
        self.inner.to_toml_string()
    }

    /// Whether a save may replace an existing checkpoint (atomically).
    #[getter]
    fn replace_existing(&self) -> bool {
        self.inner.replace_existing
    }

    fn __repr__(&self) -> String {
        let body = self.inner.to_toml_string();
        let fields: Vec<&str> = body.lines().filter(|l| !l.trim().is_empty()).collect();
        format!("Config({})", fields.join(", "))
    }
}

/// Loaded tensor bytes that Python can view without a copy (buffer protocol, writable: each
/// `Buffer` is the only handle on its byte range, see `__getbuffer__`).
#[pyclass(module = "uring_ckpt._uring_ckpt", frozen)]
struct Buffer {
    data: Bytes,
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
        // Writable: the memory is a heap allocation made by the loader (an aligned read
        // buffer) that no Rust code reads or writes again once the load returned; the only
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

/// The memory behind one tensor to save, and what keeps it alive.
enum Held<'py> {
    /// A CUDA torch tensor's device memory (feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda {
        /// Reads `len` bytes at the tensor's `data_ptr()` (dropped first: only a stream).
        source: uring_ckpt::staging::cuda::CudaTensorSource,
        /// The tensor and its `untyped_storage()`, held only to keep the memory allocated.
        _keep: [Bound<'py, PyAny>; 2],
    },
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
    fn data(&self) -> TensorData<'_> {
        match self {
            #[cfg(feature = "cuda")]
            Held::Cuda { source, .. } => TensorData::Source(source),
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
fn hold<'py>(py: Python<'py>, gpu: &Gpu, kind: &str, obj: &Bound<'py, PyAny>) -> PyResult<Held<'py>> {
    match kind {
        "torch" => hold_torch(py, obj),
        "cuda" => gpu.hold(py, obj),
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

/// Checks that `obj` is a dense, contiguous torch tensor on a `device_type` device without
/// lazy conjugate/negative bits, and returns its `data_ptr()`, its byte length and its
/// `untyped_storage()` (which keeps the memory allocated).
fn torch_memory<'py>(
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

fn report_json<T: serde::Serialize>(value: &T) -> PyResult<String> {
    serde_json::to_string(value).map_err(|e| PyValueError::new_err(format!("report does not serialize: {e}")))
}

/// Tensors of one save read from device memory through the CUDA source.
#[derive(Clone, Copy, Default)]
struct CudaUse {
    tensors: usize,
    bytes: u64,
}

impl CudaUse {
    fn count(&mut self, kind: &str, len: usize) {
        if kind == "cuda" {
            self.tensors += 1;
            self.bytes += len as u64;
        }
    }
}

/// The save report as JSON, with `cuda_tensors` and `cuda_bytes` (read from device memory
/// by the CUDA source, not copied to the CPU in Python) added.
fn save_report_json(report: &uring_ckpt::SaveReport, cuda: CudaUse) -> PyResult<String> {
    let mut value = serde_json::to_value(report)
        .map_err(|e| PyValueError::new_err(format!("report does not serialize: {e}")))?;
    if let Some(fields) = value.as_object_mut() {
        fields.insert("cuda_tensors".into(), cuda.tensors.into());
        fields.insert("cuda_bytes".into(), cuda.bytes.into());
    }
    report_json(&value)
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

/// Whether this extension was built with the `cuda` feature.
#[pyfunction]
fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

/// Whether CUDA tensors can be saved from device memory: built with the `cuda` feature and
/// the CUDA driver library (`libcuda.so.1`) loads. Never raises.
#[pyfunction]
fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| uring_ckpt::staging::cuda::probe().is_ok())
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// The CUDA side of one writer (feature `cuda`; empty without it): the primary context of
/// each device saved from, and the page-locking of the staging pool, done once on the first
/// save with a CUDA tensor. A writer declares it before its I/O, so it is dropped first:
/// the staging buffers are unregistered before the pool is freed.
#[derive(Default)]
struct Gpu {
    #[cfg(feature = "cuda")]
    contexts: Mutex<Vec<(i32, Arc<uring_ckpt::staging::cuda::CudaContext>)>>,
    #[cfg(feature = "cuda")]
    staging: OnceLock<PageLocked>,
}

/// The staging pool's registration with CUDA.
#[cfg(feature = "cuda")]
struct PageLocked {
    /// The registrar (the pool unregisters each buffer before freeing it).
    _staging: Arc<uring_ckpt::staging::cuda::CudaStaging>,
    /// Buffers page-locked.
    registered: usize,
}

impl Gpu {
    /// Validates and holds a CUDA torch tensor's device memory.
    #[cfg(feature = "cuda")]
    fn hold<'py>(&self, py: Python<'py>, obj: &Bound<'py, PyAny>) -> PyResult<Held<'py>> {
        use uring_ckpt::staging::cuda::CudaTensorSource;
        if !cuda_available() {
            return Err(to_py_err(py, Error::Unavailable("CUDA (libcuda.so.1 not found)".into())));
        }
        let (address, len, storage) = torch_memory(py, obj, "cuda")?;
        let ordinal: i32 = obj.getattr("device")?.getattr("index")?.extract()?;
        let ctx = self.context(ordinal).map_err(|e| to_py_err(py, e))?;
        // SAFETY: `address`/`len` are the `data_ptr()` and `numel() * element_size()` of a
        // dense, contiguous tensor on CUDA device `ordinal` with no lazy conjugate/negative
        // bit (checked by `torch_memory`), so they are device memory of `len` bytes in that
        // device; `ctx` is the device's primary context, the one torch allocates in. The
        // returned `Held` keeps the tensor and its storage referenced, and whoever owns the
        // source (the sync save's `Held`, the async save's `PyCudaSource`) keeps them so at
        // least until the save is staged, so torch does not free (or reuse) the memory.
        // "Unmodified": the Python side synchronizes the device before the save (pending
        // kernels writing the tensor have finished) and hands control back only once the
        // save no longer reads it (sync: returned; async: `staged`); a caller writing the
        // tensor from another thread meanwhile races, as documented for the CPU path.
        let source =
            unsafe { CudaTensorSource::from_raw(ctx, address as u64, len) }.map_err(|e| to_py_err(py, e))?;
        Ok(Held::Cuda { source, _keep: [obj.clone(), storage] })
    }

    #[cfg(not(feature = "cuda"))]
    fn hold<'py>(&self, _py: Python<'py>, _obj: &Bound<'py, PyAny>) -> PyResult<Held<'py>> {
        Err(PyValueError::new_err(
            "this uring_ckpt extension was built without CUDA: rebuild it with \
             `maturin develop --release --features cuda`, or move the tensor to the CPU",
        ))
    }

    /// The primary context of device `ordinal` (retained once per writer).
    #[cfg(feature = "cuda")]
    fn context(&self, ordinal: i32) -> uring_ckpt::Result<Arc<uring_ckpt::staging::cuda::CudaContext>> {
        let mut contexts = self.contexts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, ctx)) = contexts.iter().find(|(o, _)| *o == ordinal) {
            return Ok(ctx.clone());
        }
        let ctx = uring_ckpt::staging::cuda::CudaContext::new(ordinal)?;
        contexts.push((ordinal, ctx.clone()));
        Ok(ctx)
    }

    /// Page-locks the staging pool of `io` for device-to-host copies, once, if a CUDA tensor
    /// was held. A refusal (`RLIMIT_MEMLOCK`, say) is logged to the `uring_ckpt` logger and
    /// the copies go to pageable memory.
    #[cfg(feature = "cuda")]
    fn prepare_staging(&self, py: Python<'_>, io: &UringCheckpointIO) {
        use uring_ckpt::staging::cuda::CudaStaging;
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
                    let staging = Arc::new(CudaStaging::new(ctx));
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
    fn prepare_staging(&self, _py: Python<'_>, _io: &UringCheckpointIO) {}

    /// Staging buffers page-locked so far (0 until a CUDA tensor was saved).
    fn page_locked(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            self.staging.get().map_or(0, |s| s.registered)
        }
        #[cfg(not(feature = "cuda"))]
        {
            0
        }
    }

    /// Whether the staging pool was page-locked (and is unregistered when this drops).
    fn prepared(&self) -> bool {
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

/// A checkpoint writer and reader with one configuration; keeps its staging buffers between
/// saves. All I/O runs with the GIL released.
#[pyclass(module = "uring_ckpt._uring_ckpt", frozen)]
struct Writer {
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
            None => uring_ckpt::Config::load(None).map_err(|e| to_py_err(py, e))?,
        };
        let io = UringCheckpointIO::new(config).map_err(|e| to_py_err(py, e))?;
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
    /// `cuda`; synchronize its device first) or `"buffer"` for a C-contiguous buffer of its
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
        for entry in tensors.iter() {
            let entry = entry.cast_into::<PyTuple>()?;
            let (name, dtype, shape, kind, obj): (String, String, Vec<u64>, String, Bound<'_, PyAny>) =
                entry.extract()?;
            specs.push((name, parse_dtype(&dtype)?, shape));
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
            checkpoint
                .add_source(name.clone(), *dtype, shape, memory.data())
                .map_err(|e| to_py_err(py, e))?;
        }
        for (name, bytes) in &extras {
            checkpoint.add_extra_file(name.clone(), bytes.as_bytes()).map_err(|e| to_py_err(py, e))?;
        }
        checkpoint.metadata = metadata;
        let report =
            py.detach(|| self.io.save_checkpoint(&checkpoint, &path)).map_err(|e| to_py_err(py, e))?;
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
        let loaded = py.detach(|| self.io.load_checkpoint(&path, &options)).map_err(|e| to_py_err(py, e))?;
        let tensors = PyList::empty(py);
        for t in loaded.tensors {
            let buffer = Bound::new(py, Buffer { data: t.data })?;
            tensors.append((t.name, t.dtype.as_str(), t.shape, buffer))?;
        }
        let extras = PyDict::new(py);
        for (name, bytes) in &loaded.extra_files {
            extras.set_item(name, PyBytes::new(py, bytes))?;
        }
        let report = report_json(&loaded.report)?;
        (tensors, loaded.metadata, extras, report).into_pyobject(py)
    }

    /// Deletes the checkpoint at `path` atomically (a missing path is not an error; a
    /// directory that is not a checkpoint is refused).
    fn remove(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.io.remove_checkpoint(&path)).map_err(|e| to_py_err(py, e))
    }

    /// Checks every shard, tensor CRC and extra file of the checkpoint at `path`; returns the
    /// report as JSON.
    fn verify(&self, py: Python<'_>, path: PathBuf) -> PyResult<String> {
        let report = py
            .detach(|| uring_ckpt::inspect::verify(self.io.config(), &path, |_, _| {}))
            .map_err(|e| to_py_err(py, e))?;
        report_json(&report)
    }

    /// Reads the manifest and shard headers of the checkpoint at `path`; returns JSON.
    fn inspect(&self, py: Python<'_>, path: PathBuf) -> PyResult<String> {
        let info = py
            .detach(|| uring_ckpt::inspect::inspect(self.io.config(), &path))
            .map_err(|e| to_py_err(py, e))?;
        report_json(&info)
    }
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

/// A CUDA tensor's device memory lent to a background save: the tensor and its storage are
/// held until the save drops the source (once staged). Dropped in field order: the stream
/// first, then the references (queued decrefs when dropped without the GIL).
#[cfg(feature = "cuda")]
struct PyCudaSource {
    memory: uring_ckpt::staging::cuda::CudaTensorSource,
    _owners: [Py<PyAny>; 2],
}

#[cfg(feature = "cuda")]
impl TensorSource for PyCudaSource {
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

/// An entry's memory as a source for a background save, holding the objects that keep it
/// allocated.
fn lend(py: Python<'_>, gpu: &Gpu, kind: &str, obj: &Bound<'_, PyAny>) -> PyResult<Arc<dyn TensorSource>> {
    let (address, len, owners) = match hold(py, gpu, kind, obj)? {
        #[cfg(feature = "cuda")]
        Held::Cuda { source, _keep: [tensor, storage] } => {
            return Ok(Arc::new(PyCudaSource {
                memory: source,
                _owners: [tensor.unbind(), storage.unbind()],
            }));
        }
        Held::Torch { _keep: [tensor, storage], address, len } => {
            (address, len, vec![tensor.unbind(), storage.unbind()])
        }
        // The buffer is released at once; the exporting object (a numpy array refuses to
        // resize while referenced) keeps the memory.
        Held::Buffer(buf) => (buf.buf_ptr() as usize, buf.len_bytes(), vec![obj.clone().unbind()]),
    };
    // SAFETY: `address`/`len` describe the object's bytes (see `Held::bytes`), and the
    // objects in `owners` keep that memory allocated for as long as this source lives; the
    // save drops the source once staged, and nothing here writes the memory. Changes made
    // to the tensor by Python before `staged` race with the copy: the Python side waits
    // for `staged` before handing control back to the caller.
    let memory = unsafe { HostPtrSource::new(address as *const u8, len) };
    Ok(Arc::new(PyHostSource { memory, _owners: owners }))
}

/// A background save: its staged and durable completions.
#[pyclass(module = "uring_ckpt._uring_ckpt", frozen)]
struct SaveHandle {
    path: PathBuf,
    staged: Staged,
    durable: Mutex<Option<Durable>>,
    outcome: Mutex<Option<PyResult<String>>>,
    cuda: CudaUse,
}

impl SaveHandle {
    fn stored(&self, py: Python<'_>) -> Option<PyResult<String>> {
        let outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        outcome.as_ref().map(|r| match r {
            Ok(report) => Ok(report.clone()),
            Err(e) => Err(e.clone_ref(py)),
        })
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
            Some(t) => self.staged.wait_timeout(Duration::from_secs_f64(t.max(0.0))),
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
                if !durable.wait_timeout(Duration::from_secs_f64(t.max(0.0))) {
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
        let converted = result.map_err(|e| to_py_err(py, e)).and_then(|r| save_report_json(&r, self.cuda));
        let mut outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        *outcome = Some(match &converted {
            Ok(report) => Ok(report.clone()),
            Err(e) => Err(e.clone_ref(py)),
        });
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
/// through the staging ring, no extra memory) and `max_saves_in_flight`.
#[pyclass(module = "uring_ckpt._uring_ckpt", frozen)]
struct AsyncWriter {
    /// Declared first, so dropped before `io` (see [`Gpu`] and `Drop`).
    gpu: Gpu,
    io: Arc<AsyncCheckpointIO<UringCheckpointIO>>,
}

impl Drop for AsyncWriter {
    /// With the staging pool page-locked, waits for the saves still running (they hold the
    /// pool): the buffers are unregistered right after, when `gpu` drops.
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
        let io = AsyncCheckpointIO::from_config(config.inner.clone()).map_err(|e| to_py_err(py, e))?;
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
    #[pyo3(signature = (path, tensors, extra_files, metadata))]
    fn save(
        &self,
        py: Python<'_>,
        path: PathBuf,
        tensors: &Bound<'_, PyList>,
        extra_files: &Bound<'_, PyList>,
        metadata: BTreeMap<String, String>,
    ) -> PyResult<SaveHandle> {
        let mut checkpoint = OwnedCheckpoint::new();
        let mut cuda = CudaUse::default();
        for entry in tensors.iter() {
            let entry = entry.cast_into::<PyTuple>()?;
            let (name, dtype, shape, kind, obj): (String, String, Vec<u64>, String, Bound<'_, PyAny>) =
                entry.extract()?;
            let source = lend(py, &self.gpu, &kind, &obj)?;
            cuda.count(&kind, source.len());
            checkpoint.add(name, parse_dtype(&dtype)?, &shape, source).map_err(|e| to_py_err(py, e))?;
        }
        if cuda.tensors > 0 {
            self.gpu.prepare_staging(py, self.io.inner());
        }
        let extras: Vec<(String, Bound<'_, PyBytes>)> = extra_files.extract()?;
        for (name, bytes) in &extras {
            checkpoint
                .add_extra_file(name.clone(), Bytes::copy_from_slice(bytes.as_bytes()))
                .map_err(|e| to_py_err(py, e))?;
        }
        checkpoint.metadata = metadata;
        let io = self.io.clone();
        let started = py.detach(|| io.save_checkpoint(checkpoint, &path));
        let handle = started.map_err(|e| to_py_err(py, e))?;
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

    /// Waits (GIL released) for every save, then raises the first error of a save whose
    /// handle was dropped without its result being looked at.
    fn teardown(&self, py: Python<'_>) -> PyResult<()> {
        let io = self.io.clone();
        py.detach(|| io.teardown()).map_err(|e| to_py_err(py, e))
    }
}

/// Every safetensors dtype this build knows, as spelled in shard headers.
#[pyfunction]
fn dtypes() -> Vec<&'static str> {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES.get_or_init(|| Dtype::ALL.iter().map(|d| d.as_str()).collect()).clone()
}

/// The extension module.
#[pymodule]
fn _uring_ckpt(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Config>()?;
    m.add_class::<Writer>()?;
    m.add_class::<Buffer>()?;
    m.add_class::<AsyncWriter>()?;
    m.add_class::<SaveHandle>()?;
    m.add_function(wrap_pyfunction!(dtypes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_built, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
