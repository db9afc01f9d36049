//! CUDA device memory as a [`TensorSource`] (feature `cuda`).
//!
//! Built on `cudarc`'s driver API with dynamic loading: the crate builds, and its tests run,
//! without CUDA. The driver is loaded at run time; [`probe`] checks, *before* any `cudarc`
//! call (which would panic without it), that `libcuda.so.1` (the name torch and the CUDA
//! runtime load) is there and that the library `cudarc` opens is that same instance, then runs
//! `cuInit` and counts the devices through it. Any failure is [`Error::Unavailable`].
//!
//! Rules every driver call here follows:
//!
//! - **The caller's current context is left as it was.** Every call runs inside a
//!   [`ContextGuard`] (`cuCtxPushCurrent` ... `cuCtxPopCurrent`), so a save never moves the
//!   calling thread (and torch's current device) to another GPU.
//! - **Streams are reused.** Each [`CudaContext`] keeps its idle non-blocking streams
//!   ([`Reuse`]): a copy borrows one, so a save creates as many streams as it runs copies at
//!   once, not one per tensor; they are destroyed with the context.
//! - **Copies are ordered after the producer.** A [`CudaTensorSource`] may carry a
//!   [`CudaEvent`] recorded on the stream that produced the memory (torch's current stream,
//!   say); every copy waits for it on the device (`cuStreamWaitEvent`) before it starts.
//!
//! - [`CudaContext`]: the primary context of one device.
//! - [`CudaTensorSource`]: `len` bytes at a device address. [`TensorSource::copy_to`] issues
//!   `cuMemcpyDtoHAsync` on a borrowed stream, straight into the staging buffer, and
//!   synchronizes that stream.
//! - [`CudaStaging`]: page-locks host buffers with `cuMemHostRegister` so those copies run
//!   at full DMA speed. It is a [`Registrar`] of the staging pool, added through
//!   [`crate::UringCheckpointIO::prepare_staging`]: the pool page-locks each of its buffers
//!   (the same buffers the io_uring ring registers) once, and unlocks each
//!   (`cuMemHostUnregister`) before freeing it. When registration fails (a
//!   `RLIMIT_MEMLOCK`, say), copies go to pageable memory, slower but correct, and the
//!   failure is logged. The snapshot area of the asynchronous saves is page-locked the same
//!   way ([`TensorSource::host_registrar`]).

use std::marker::PhantomData;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, sys};

use crate::error::{Error, Result};
use crate::io::{AlignedBuf, Registrar};
use crate::source::{Reuse, TensorSource};

/// The driver library torch (and the CUDA runtime) load.
const DRIVER_LIB: &std::ffi::CStr = c"libcuda.so.1";

/// Whether the CUDA driver can be used: `libcuda.so.1` loads, `cudarc` would open that same
/// library (not, say, a stub `libcuda.so` on `LD_LIBRARY_PATH`), `cuInit` succeeds and there
/// is at least one device. Checked once per process; call before anything else in this
/// module (the constructors do).
pub fn probe() -> Result<()> {
    device_count().map(|_| ())
}

/// The number of CUDA devices (see [`probe`]; an error where there are none).
pub fn device_count() -> Result<usize> {
    static PROBED: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    PROBED.get_or_init(probe_once).clone().map_err(Error::Unavailable)
}

/// `dlsym(handle, "cuInit")`, or null.
fn cu_init_symbol(handle: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `handle` is a live dlopen handle and the name is NUL-terminated.
    unsafe { libc::dlsym(handle, c"cuInit".as_ptr()) }
}

fn probe_once() -> std::result::Result<usize, String> {
    // SAFETY: dlopen gets a NUL-terminated name. The handle is never closed: the driver stays
    // loaded for the process (as torch keeps it), which also pins the instance compared below.
    let driver = unsafe { libc::dlopen(DRIVER_LIB.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if driver.is_null() {
        return Err("CUDA (libcuda.so.1 not found)".into());
    }
    let ours = cu_init_symbol(driver);
    if ours.is_null() {
        return Err("CUDA (libcuda.so.1 has no cuInit)".into());
    }
    // cudarc opens the first of these names that loads: it must be the same library.
    let mut theirs = None;
    for name in cudarc::get_lib_name_candidates("cuda") {
        let Ok(cname) = std::ffi::CString::new(name.clone()) else { continue };
        // SAFETY: as above; this handle is closed once below.
        let handle = unsafe { libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            continue;
        }
        let symbol = cu_init_symbol(handle);
        // SAFETY: `handle` came from dlopen and is closed once (the library stays loaded
        // through `driver`, or is reopened by cudarc).
        unsafe { libc::dlclose(handle) };
        theirs = Some((name, symbol));
        break;
    }
    match theirs {
        Some((_, symbol)) if symbol == ours => {}
        Some((name, _)) => {
            return Err(format!(
                "CUDA (the driver library cudarc loads, {name}, is not the libcuda.so.1 torch \
                 uses: a stub or second driver on LD_LIBRARY_PATH?)"
            ))
        }
        None => return Err("CUDA (no driver library name cudarc searches loads)".into()),
    }
    result::init().map_err(|e| format!("CUDA (cuInit failed: {e})"))?;
    let count = result::device::get_count().map_err(|e| format!("CUDA (cuDeviceGetCount failed: {e})"))?;
    if count <= 0 {
        return Err("CUDA (no CUDA device)".into());
    }
    Ok(count as usize)
}

fn cuda_err(what: &str, e: result::DriverError) -> Error {
    Error::Unavailable(format!("CUDA ({what} failed: {e})"))
}

/// The primary context of one CUDA device, with its idle copy streams.
#[derive(Debug)]
pub struct CudaContext {
    ordinal: i32,
    device: sys::CUdevice,
    ctx: sys::CUcontext,
    streams: Reuse<Stream>,
}

/// A non-blocking stream of a [`CudaContext`] (destroyed by it).
#[derive(Debug)]
struct Stream(sys::CUstream);

// SAFETY: a CUDA context handle may be used from any thread (each call pushes it, see
// `enter`); the driver synchronizes access. Streams are lent to one thread at a time.
unsafe impl Send for CudaContext {}
// SAFETY: as above.
unsafe impl Sync for CudaContext {}
// SAFETY: a stream handle may be used from any thread in which its context is current.
unsafe impl Send for Stream {}

/// The context made current on this thread by [`CudaContext::enter`]; the previous one is
/// current again when this drops (`cuCtxPopCurrent`). Not `Send`: it belongs to its thread.
#[derive(Debug)]
pub struct ContextGuard<'a> {
    _ctx: PhantomData<&'a CudaContext>,
    _not_send: PhantomData<*const ()>,
}

impl Drop for ContextGuard<'_> {
    fn drop(&mut self) {
        let mut popped: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context `enter` pushed on this thread (the guard is not Send and
        // guards nest lexically), restoring the caller's current context.
        if let Err(e) = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) }.result() {
            log::warn!("cuCtxPopCurrent failed: {e}");
        }
    }
}

impl CudaContext {
    /// Initializes the driver and retains the primary context of device `ordinal`. The
    /// calling thread's current context is not changed.
    pub fn new(ordinal: i32) -> Result<Arc<CudaContext>> {
        let count = device_count()?;
        if ordinal < 0 || ordinal as usize >= count {
            return Err(Error::Unavailable(format!("CUDA (no device {ordinal}: {count} devices)")));
        }
        let device = result::device::get(ordinal).map_err(|e| cuda_err("cuDeviceGet", e))?;
        // SAFETY: `device` is a valid device handle from cuDeviceGet.
        let ctx = unsafe { result::primary_ctx::retain(device) }
            .map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
        Ok(Arc::new(CudaContext { ordinal, device, ctx, streams: Reuse::default() }))
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    /// The raw context handle (to compare with `cuCtxGetCurrent`).
    pub fn raw(&self) -> sys::CUcontext {
        self.ctx
    }

    /// Makes this context current on the calling thread until the guard drops, when the
    /// thread's previous context (or none) is current again.
    pub fn enter(&self) -> Result<ContextGuard<'_>> {
        // SAFETY: `ctx` is a retained, live primary context; the guard pops it.
        unsafe { sys::cuCtxPushCurrent_v2(self.ctx) }
            .result()
            .map_err(|e| cuda_err("cuCtxPushCurrent", e))?;
        Ok(ContextGuard { _ctx: PhantomData, _not_send: PhantomData })
    }

    /// Waits for all work of this context.
    pub fn synchronize(&self) -> Result<()> {
        let _current = self.enter()?;
        sync_current()
    }

    /// Streams created so far (each is reused; for tests).
    pub fn streams_created(&self) -> u64 {
        self.streams.created()
    }

    /// Runs `f` with an idle non-blocking stream of this context (created on first need),
    /// the context current.
    fn with_stream<T>(&self, f: impl FnOnce(sys::CUstream) -> Result<T>) -> Result<T> {
        let _current = self.enter()?;
        let lease = self.streams.lease(|| {
            result::stream::create(result::stream::StreamKind::NonBlocking)
                .map(Stream)
                .map_err(|e| cuda_err("cuStreamCreate", e))
        })?;
        f(lease.get().0)
    }
}

/// A stream of a [`CudaContext`] lent to one thread for host-to-device copies (a load's
/// copy thread): the context is current on that thread while the stream is held.
pub struct CopyStream<'a> {
    lease: crate::source::Lease<'a, Stream>,
    _current: ContextGuard<'a>,
}

impl CudaContext {
    /// Lends an idle stream of this context to the calling thread and makes the context
    /// current there until the returned stream drops.
    pub fn copy_stream(&self) -> Result<CopyStream<'_>> {
        let current = self.enter()?;
        let lease = self.streams.lease(|| {
            result::stream::create(result::stream::StreamKind::NonBlocking)
                .map(Stream)
                .map_err(|e| cuda_err("cuStreamCreate", e))
        })?;
        Ok(CopyStream { lease, _current: current })
    }
}

impl CopyStream<'_> {
    /// Queues a copy of `src` to device address `dst` on this stream.
    ///
    /// # Safety
    /// `dst..dst + src.len()` must be device memory of the context, and `src` must stay
    /// valid and unmodified until [`CopyStream::synchronize`] returns.
    pub unsafe fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: the caller's contract above; the stream belongs to the current context.
        unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), src.len(), self.lease.get().0) }
            .result()
            .map_err(|e| cuda_err("cuMemcpyHtoDAsync", e))
    }

    /// Orders the copies queued on this stream from now on after `event` (on the device;
    /// the host does not wait).
    pub fn wait_for(&self, event: &CudaEvent) -> Result<()> {
        event.wait_on(self.lease.get().0)
    }

    /// Waits for every copy queued on this stream.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live stream of the current context, lent to this thread.
        unsafe { result::stream::synchronize(self.lease.get().0) }
            .map_err(|e| cuda_err("cuStreamSynchronize", e))
    }
}

impl Drop for CudaContext {
    fn drop(&mut self) {
        let streams = self.streams.drain();
        if !streams.is_empty() {
            match self.enter() {
                Ok(_current) => {
                    for stream in streams {
                        // SAFETY: created by `with_stream` in this context, idle (every lease
                        // ended, the context being dropped), destroyed once.
                        let _ = unsafe { result::stream::destroy(stream.0) };
                    }
                }
                Err(e) => log::warn!("cannot destroy CUDA streams: {e}"),
            }
        }
        // SAFETY: releases the retain of `new`, once.
        if let Err(e) = unsafe { result::primary_ctx::release(self.device) } {
            log::warn!("cuDevicePrimaryCtxRelease failed: {e}");
        }
    }
}

/// A CUDA event recorded on a producer's stream: copies from a [`CudaTensorSource`] that
/// carries it start only once the work queued on that stream before the record is done.
#[derive(Debug)]
pub struct CudaEvent {
    ctx: Arc<CudaContext>,
    event: sys::CUevent,
}

// SAFETY: an event handle may be used from any thread with its context current (every use
// here pushes it).
unsafe impl Send for CudaEvent {}
// SAFETY: as above; recording happens once, in `record`.
unsafe impl Sync for CudaEvent {}

impl CudaEvent {
    /// Records a new event on `stream` (a raw `CUstream`, e.g. torch's
    /// `torch.cuda.current_stream(device).cuda_stream`; 0 is the legacy default stream).
    ///
    /// # Safety
    /// `stream` must be 0 or a live stream of `ctx`'s device's primary context.
    pub unsafe fn record(ctx: Arc<CudaContext>, stream: u64) -> Result<CudaEvent> {
        let _current = ctx.enter()?;
        let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| cuda_err("cuEventCreate", e))?;
        // SAFETY: `event` was just created; `stream` is valid per the contract.
        if let Err(e) = unsafe { result::event::record(event, stream as sys::CUstream) } {
            // SAFETY: created above, destroyed once.
            let _ = unsafe { result::event::destroy(event) };
            return Err(cuda_err("cuEventRecord", e));
        }
        drop(_current);
        Ok(CudaEvent { ctx, event })
    }

    /// The context the event belongs to.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Makes `stream` (of the same context, which is current) wait for this event.
    fn wait_on(&self, stream: sys::CUstream) -> Result<()> {
        // SAFETY: `event` is live (recorded in `record`), `stream` a live stream of its
        // context, which the caller made current.
        unsafe { sys::cuStreamWaitEvent(stream, self.event, 0) }
            .result()
            .map_err(|e| cuda_err("cuStreamWaitEvent", e))
    }
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        if let Ok(_current) = self.ctx.enter() {
            // SAFETY: created in `record`, destroyed once (the driver keeps it until waits on
            // it resolve).
            let _ = unsafe { result::event::destroy(self.event) };
        }
    }
}

/// `len` bytes of device memory, copied to staging buffers with `cuMemcpyDtoHAsync` on a
/// stream borrowed from its context, after the producer's event when it has one.
#[derive(Debug)]
pub struct CudaTensorSource {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    len: usize,
    /// Copies wait for it before they start.
    after: Option<Arc<CudaEvent>>,
    /// Allocated by [`CudaTensorSource::upload`]: freed on drop.
    owned: bool,
}

// SAFETY: the device pointer is a plain address usable from any thread with the context
// current (every call pushes it); the event is Send + Sync.
unsafe impl Send for CudaTensorSource {}
// SAFETY: as above; `copy_to` only reads.
unsafe impl Sync for CudaTensorSource {}

impl CudaTensorSource {
    /// Wraps `len` bytes at device address `ptr` in `ctx` (a tensor's `data_ptr()`).
    ///
    /// # Safety
    /// `ptr` must be device memory of at least `len` bytes in `ctx`'s device, and stay
    /// allocated and unmodified (by work not ordered before [`CudaTensorSource::after`]'s
    /// event, when one is given) until the save it is handed to resolves `staged()` (or
    /// until this source is dropped if it is never saved).
    pub unsafe fn from_raw(ctx: Arc<CudaContext>, ptr: u64, len: usize) -> Result<CudaTensorSource> {
        Ok(CudaTensorSource { ctx, ptr, len, after: None, owned: false })
    }

    /// Orders every copy from this source after `event` (recorded on the stream that
    /// produced the memory), with `cuStreamWaitEvent`: the host does not wait. The event
    /// must belong to this source's context.
    pub fn after(mut self, event: Arc<CudaEvent>) -> Result<CudaTensorSource> {
        if event.ctx.raw() != self.ctx.raw() {
            return Err(Error::InvalidCheckpoint(format!(
                "an event of CUDA device {} cannot order copies on device {}",
                event.ctx.ordinal(),
                self.ctx.ordinal()
            )));
        }
        self.after = Some(event);
        Ok(self)
    }

    /// Allocates device memory and copies `bytes` into it (for tests and examples); the copy
    /// is complete on the device when this returns.
    pub fn upload(ctx: Arc<CudaContext>, bytes: &[u8]) -> Result<CudaTensorSource> {
        let _current = ctx.enter()?;
        // SAFETY: a plain allocation of `len` (at least 1) bytes in the current context.
        let ptr =
            unsafe { result::malloc_sync(bytes.len().max(1)) }.map_err(|e| cuda_err("cuMemAlloc", e))?;
        // SAFETY: `ptr` holds at least `bytes.len()` bytes. cuMemcpyHtoD from pageable memory
        // may return before the DMA lands: the context is synchronized below.
        let copied = unsafe { result::memcpy_htod_sync(ptr, bytes) }
            .map_err(|e| cuda_err("cuMemcpyHtoD", e))
            .and_then(|()| sync_current());
        if let Err(e) = copied {
            // SAFETY: `ptr` was allocated above and is freed once.
            let _ = unsafe { result::free_sync(ptr) };
            return Err(e);
        }
        drop(_current);
        // SAFETY: `ptr` is device memory of `bytes.len()` bytes owned by this source.
        let mut source = unsafe { CudaTensorSource::from_raw(ctx, ptr, bytes.len()) }?;
        source.owned = true;
        Ok(source)
    }

    /// The device address.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Overwrites the device memory with `bytes` at `offset` (for tests); complete on the
    /// device when this returns.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<()> {
        if offset.checked_add(bytes.len()).is_none_or(|end| end > self.len) {
            return Err(Error::InvalidCheckpoint(format!(
                "write of {} bytes at {offset} past the end of {} bytes of device memory",
                bytes.len(),
                self.len
            )));
        }
        let _current = self.ctx.enter()?;
        // SAFETY: the range lies inside the device memory (checked above).
        unsafe { result::memcpy_htod_sync(self.ptr + offset as u64, bytes) }
            .map_err(|e| cuda_err("cuMemcpyHtoD", e))?;
        sync_current()
    }
}

/// `cuCtxSynchronize` of the calling thread's current context (the caller entered one).
fn sync_current() -> Result<()> {
    // SAFETY: no arguments; waits for the current context's work.
    unsafe { sys::cuCtxSynchronize() }.result().map_err(|e| cuda_err("cuCtxSynchronize", e))
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
        self.ctx.with_stream(|stream| {
            if let Some(event) = &self.after {
                event.wait_on(stream)?;
            }
            // SAFETY: the source range lies inside the device memory (checked above and by
            // `from_raw`'s contract); `dst` stays borrowed until the stream is synchronized
            // below, so the asynchronous copy never outlives it.
            unsafe {
                sys::cuMemcpyDtoHAsync_v2(
                    dst.as_mut_ptr().cast(),
                    self.ptr + offset as u64,
                    dst.len(),
                    stream,
                )
            }
            .result()
            .map_err(|e| cuda_err("cuMemcpyDtoHAsync", e))?;
            // SAFETY: `stream` is a live stream of the current context, lent to this call.
            unsafe { result::stream::synchronize(stream) }.map_err(|e| cuda_err("cuStreamSynchronize", e))
        })
    }

    fn host_registrar(&self) -> Option<Arc<dyn Registrar>> {
        Some(Arc::new(CudaStaging::new(self.ctx.clone())))
    }
}

impl Drop for CudaTensorSource {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Ok(_current) = self.ctx.enter() {
            // SAFETY: allocated by `upload`, freed once; no copy is in flight (each
            // `copy_to` synchronizes before returning).
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Page-locks host buffers (`cuMemHostRegister`, flag `PORTABLE`: pinned for every context)
/// for fast device-to-host copies: a [`Registrar`] of the staging pool, which calls
/// [`Registrar::unregister`] before it frees a buffer. Anything still registered when this
/// is dropped (a buffer an engine had to give up for lost) is unregistered then.
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

    /// Buffers registered now (registered and not unregistered since).
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
        let _current = self.ctx.enter()?;
        // SAFETY: `buf` is a live allocation of `capacity()` bytes; the staging pool (or the
        // snapshot area) calls `unregister` for it before the memory is freed (the Registrar
        // contract).
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
        let _current = match self.ctx.enter() {
            Ok(guard) => guard,
            Err(e) => {
                log::warn!("cannot unregister a page-locked staging buffer: {e}");
                return;
            }
        };
        // SAFETY: `addr` is the start of memory this registrar registered and that is still
        // allocated (unregistered before freeing); it is unregistered once.
        if let Err(e) = unsafe { sys::cuMemHostUnregister(addr as *mut _) }.result() {
            log::warn!("cuMemHostUnregister failed: {e}");
        }
    }
}

impl Drop for CudaStaging {
    fn drop(&mut self) {
        let Ok(registered) = self.registered.lock() else { return };
        if registered.is_empty() {
            return;
        }
        let Ok(_current) = self.ctx.enter() else { return };
        for &addr in registered.iter() {
            // SAFETY: `addr` was registered by `register`, not unregistered since, and
            // its memory is never freed (only buffers given up for lost remain here).
            let _ = unsafe { sys::cuMemHostUnregister(addr as *mut _) };
        }
    }
}

/// The calling thread's current context (null when none), for tests that check a save
/// leaves it as it was.
pub fn current_context() -> Result<sys::CUcontext> {
    probe()?;
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: writes one handle into `ctx`.
    unsafe { sys::cuCtxGetCurrent(&mut ctx) }.result().map_err(|e| cuda_err("cuCtxGetCurrent", e))?;
    Ok(ctx)
}
