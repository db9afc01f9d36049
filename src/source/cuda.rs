//! CUDA device memory as a [`TensorSource`] (feature `cuda`).
//!
//! Built on `cudarc`'s driver API with dynamic loading: the crate builds, and its tests run,
//! without CUDA. `libcuda.so.1` is loaded at run time; [`probe`] checks for it *before* any
//! `cudarc` call (which would panic without it) and returns [`Error::Unavailable`].
//!
//! - [`CudaContext`]: the primary context of one device.
//! - [`CudaTensorSource`]: `len` bytes at a device address. [`TensorSource::copy_to`] issues
//!   `cuMemcpyDtoHAsync` on the source's own (non-blocking) stream, straight into the
//!   staging buffer, and synchronizes that stream.
//! - [`CudaStaging`]: page-locks host buffers with `cuMemHostRegister` so those copies run
//!   at full DMA speed. It is a [`Registrar`] of the staging pool, added through
//!   [`crate::UringCheckpointIO::prepare_staging`]: the pool page-locks each of its buffers
//!   (the same buffers the io_uring ring registers) once, and unlocks each
//!   (`cuMemHostUnregister`) before freeing it. When registration fails (a
//!   `RLIMIT_MEMLOCK`, say), copies go to pageable memory, slower but correct, and the
//!   failure is logged.

use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys};

use crate::error::{Error, Result};
use crate::io::{AlignedBuf, Registrar};
use crate::source::TensorSource;

/// Whether the CUDA driver library can be loaded. Call before anything else in this module
/// (the constructors do).
pub fn probe() -> Result<()> {
    // SAFETY: dlopen gets a NUL-terminated name; the handle, if any, is closed at once.
    let handle = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(Error::Unavailable("CUDA (libcuda.so.1 not found)".into()));
    }
    // SAFETY: `handle` came from dlopen and is closed once.
    unsafe { libc::dlclose(handle) };
    Ok(())
}

fn cuda_err(what: &str, e: result::DriverError) -> Error {
    Error::Unavailable(format!("CUDA ({what} failed: {e})"))
}

/// The primary context of one CUDA device.
#[derive(Debug)]
pub struct CudaContext {
    device: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a CUDA context handle may be used from any thread (each thread makes it current
// before use, see `bind`); the driver synchronizes access.
unsafe impl Send for CudaContext {}
// SAFETY: as above.
unsafe impl Sync for CudaContext {}

impl CudaContext {
    /// Initializes the driver and retains the primary context of device `ordinal`.
    pub fn new(ordinal: i32) -> Result<Arc<CudaContext>> {
        probe()?;
        result::init().map_err(|e| cuda_err("cuInit", e))?;
        let device = result::device::get(ordinal).map_err(|e| cuda_err("cuDeviceGet", e))?;
        // SAFETY: `device` is a valid device handle from cuDeviceGet.
        let ctx = unsafe { result::primary_ctx::retain(device) }
            .map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
        let context = CudaContext { device, ctx };
        context.bind()?;
        Ok(Arc::new(context))
    }

    /// Makes this context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: `ctx` is a retained, live primary context.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(|e| cuda_err("cuCtxSetCurrent", e))
    }
}

impl Drop for CudaContext {
    fn drop(&mut self) {
        // SAFETY: releases the retain of `new`, once.
        if let Err(e) = unsafe { result::primary_ctx::release(self.device) } {
            log::warn!("cuDevicePrimaryCtxRelease failed: {e}");
        }
    }
}

/// `len` bytes of device memory, copied to staging buffers with `cuMemcpyDtoHAsync` on a
/// stream of its own.
#[derive(Debug)]
pub struct CudaTensorSource {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    len: usize,
    stream: Mutex<sys::CUstream>,
    /// Allocated by [`CudaTensorSource::upload`]: freed on drop.
    owned: bool,
}

// SAFETY: the device pointer and stream are plain handles usable from any thread once the
// context is current (`copy_to` binds it); the stream is used under a mutex.
unsafe impl Send for CudaTensorSource {}
// SAFETY: as above.
unsafe impl Sync for CudaTensorSource {}

impl CudaTensorSource {
    /// Wraps `len` bytes at device address `ptr` in `ctx` (a tensor's `data_ptr()`).
    ///
    /// # Safety
    /// `ptr` must be device memory of at least `len` bytes in `ctx`'s device, and stay
    /// allocated and unmodified until the save it is handed to resolves `staged()` (or
    /// until this source is dropped if it is never saved).
    pub unsafe fn from_raw(ctx: Arc<CudaContext>, ptr: u64, len: usize) -> Result<CudaTensorSource> {
        ctx.bind()?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| cuda_err("cuStreamCreate", e))?;
        Ok(CudaTensorSource { ctx, ptr, len, stream: Mutex::new(stream), owned: false })
    }

    /// Allocates device memory and copies `bytes` into it (for tests and examples).
    pub fn upload(ctx: Arc<CudaContext>, bytes: &[u8]) -> Result<CudaTensorSource> {
        ctx.bind()?;
        // SAFETY: a plain allocation of `len` (at least 1) bytes in the current context.
        let ptr =
            unsafe { result::malloc_sync(bytes.len().max(1)) }.map_err(|e| cuda_err("cuMemAlloc", e))?;
        // SAFETY: `ptr` holds at least `bytes.len()` bytes; the copy is synchronous.
        if let Err(e) = unsafe { result::memcpy_htod_sync(ptr, bytes) } {
            // SAFETY: `ptr` was allocated above and is freed once.
            let _ = unsafe { result::free_sync(ptr) };
            return Err(cuda_err("cuMemcpyHtoD", e));
        }
        // SAFETY: `ptr` is device memory of `bytes.len()` bytes owned by this source.
        let mut source = unsafe { CudaTensorSource::from_raw(ctx, ptr, bytes.len()) }?;
        source.owned = true;
        Ok(source)
    }

    /// Overwrites the device memory with `bytes` at `offset` (for tests).
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<()> {
        if offset.checked_add(bytes.len()).is_none_or(|end| end > self.len) {
            return Err(Error::InvalidCheckpoint(format!(
                "write of {} bytes at {offset} past the end of {} bytes of device memory",
                bytes.len(),
                self.len
            )));
        }
        self.ctx.bind()?;
        // SAFETY: the range lies inside the device memory (checked above); synchronous copy.
        unsafe { result::memcpy_htod_sync(self.ptr + offset as u64, bytes) }
            .map_err(|e| cuda_err("cuMemcpyHtoD", e))
    }
}

impl TensorSource for CudaTensorSource {
    fn len(&self) -> usize {
        self.len
    }

    fn host_bytes(&self) -> Option<&[u8]> {
        None
    }

    fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        if offset.checked_add(dst.len()).is_none_or(|end| end > self.len) {
            return Err(Error::InvalidCheckpoint(format!(
                "copy of {} bytes at {offset} past the end of {} bytes of device memory",
                dst.len(),
                self.len
            )));
        }
        if dst.is_empty() {
            return Ok(());
        }
        self.ctx.bind()?;
        let stream = self.stream.lock().map_err(|_| Error::Unavailable("CUDA stream (poisoned)".into()))?;
        // SAFETY: the source range lies inside the device memory (checked above and by
        // `from_raw`'s contract); `dst` stays borrowed until the stream is synchronized below,
        // so the asynchronous copy never outlives it.
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr().cast(), self.ptr + offset as u64, dst.len(), *stream)
        }
        .result()
        .map_err(|e| cuda_err("cuMemcpyDtoHAsync", e))?;
        // SAFETY: `stream` is a live stream created in `from_raw`.
        unsafe { result::stream::synchronize(*stream) }.map_err(|e| cuda_err("cuStreamSynchronize", e))
    }
}

impl Drop for CudaTensorSource {
    fn drop(&mut self) {
        if self.ctx.bind().is_err() {
            return;
        }
        if let Ok(stream) = self.stream.lock() {
            // SAFETY: the stream was created in `from_raw` and is destroyed once.
            let _ = unsafe { result::stream::destroy(*stream) };
        }
        if self.owned {
            // SAFETY: allocated by `upload`, freed once; no copy is in flight (each
            // `copy_to` synchronizes before returning).
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Page-locks host buffers (`cuMemHostRegister`) for fast device-to-host copies: a
/// [`Registrar`] of the staging pool, which calls [`Registrar::unregister`] before it frees a
/// buffer. Anything still registered when this is dropped (a buffer an engine had to give
/// up for lost) is unregistered then.
#[derive(Debug)]
pub struct CudaStaging {
    ctx: Arc<CudaContext>,
    registered: Mutex<Vec<usize>>,
}

impl CudaStaging {
    /// Registrations in `ctx`.
    pub fn new(ctx: Arc<CudaContext>) -> CudaStaging {
        CudaStaging { ctx, registered: Mutex::new(Vec::new()) }
    }

    /// Buffers registered now.
    pub fn registered(&self) -> usize {
        self.registered.lock().map(|r| r.len()).unwrap_or(0)
    }

    fn addresses(&self) -> Result<std::sync::MutexGuard<'_, Vec<usize>>> {
        self.registered.lock().map_err(|_| Error::Unavailable("CUDA staging (poisoned)".into()))
    }
}

impl Registrar for CudaStaging {
    fn name(&self) -> &str {
        "CUDA page-locking"
    }

    /// Page-locks `buf` (its whole capacity). Registering the same buffer twice is a no-op.
    /// On failure the buffer stays pageable: copies into it still work, more slowly.
    fn register(&self, buf: &AlignedBuf) -> Result<()> {
        let addr = buf.as_ptr() as usize;
        let mut registered = self.addresses()?;
        if registered.contains(&addr) {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: `buf` is a live allocation of `capacity()` bytes; the staging pool calls
        // `unregister` for it before the memory is freed (the Registrar contract).
        unsafe {
            sys::cuMemHostRegister_v2(
                buf.as_ptr() as *mut _,
                buf.capacity(),
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        }
        .result()
        .map_err(|e| cuda_err("cuMemHostRegister", e))?;
        registered.push(addr);
        Ok(())
    }

    fn unregister(&self, buf: &AlignedBuf) {
        let addr = buf.as_ptr() as usize;
        let Ok(mut registered) = self.addresses() else { return };
        let Some(i) = registered.iter().position(|&a| a == addr) else { return };
        registered.swap_remove(i);
        if let Err(e) = self.ctx.bind() {
            log::warn!("cannot unregister a page-locked staging buffer: {e}");
            return;
        }
        // SAFETY: `addr` is the start of memory this registrar registered and that is still
        // allocated (the pool unregisters before freeing); it is unregistered once.
        if let Err(e) = unsafe { sys::cuMemHostUnregister(addr as *mut _) }.result() {
            log::warn!("cuMemHostUnregister failed: {e}");
        }
    }
}

impl Drop for CudaStaging {
    fn drop(&mut self) {
        if self.ctx.bind().is_err() {
            return;
        }
        if let Ok(registered) = self.registered.lock() {
            for &addr in registered.iter() {
                // SAFETY: `addr` was registered by `register`, not unregistered since, and
                // its memory is never freed (only buffers given up for lost remain here).
                let _ = unsafe { sys::cuMemHostUnregister(addr as *mut _) };
            }
        }
    }
}
