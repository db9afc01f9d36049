//! `_uring_ckpt`: the Rust extension module behind the `uring_ckpt` Python package.
//!
//! The Python side (`python_src/uring_ckpt`) flattens a nested state into tensor entries and
//! a pickled sidecar; this module writes them with [`uring_ckpt::UringCheckpointIO`] while
//! the GIL is released, and reads them back as `Buffer` objects that own the loaded bytes and
//! export them through the buffer protocol (so `torch.frombuffer`/`numpy.frombuffer` need no
//! copy).
//!
//! With the `cuda` feature, CUDA torch tensors are saved from device memory: each becomes a
//! `uring_ckpt::source::cuda::CudaTensorSource` in the primary context of its device (the
//! one torch uses), copied chunk by chunk into the (page-locked) staging buffers.
//!
//! The modules, each knowing only the ones listed before it:
//!
//! - `errors`: crate errors as `uring_ckpt` exceptions;
//! - `config`: `Config`, from keyword arguments, a file or another one;
//! - `buffers`: `Buffer`, loaded bytes exported through the buffer protocol (unsafe);
//! - `report`: reports as JSON, with the count of tensors read from device memory;
//! - `torch`: a torch tensor's memory, checked to be one dense byte range;
//! - `cuda`: `cuda_built`/`cuda_available` and a writer's CUDA side (`Gpu`; feature `cuda`);
//! - `sinks`: the destinations of a load into existing torch tensors (CPU or one CUDA
//!   device);
//! - `tensors`: a save's tensor entries held for a synchronous save or lent to a
//!   background one; `dtypes`;
//! - `writer`: `Writer`, synchronous saves, loads, removal, verification, inspection;
//! - `background`: `AsyncWriter` and its `SaveHandle`s.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use pyo3::prelude::*;

mod background;
mod buffers;
mod config;
mod cuda;
mod errors;
mod report;
mod sinks;
mod tensors;
mod torch;
mod writer;

/// The extension module.
#[pymodule]
fn _uring_ckpt(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<config::Config>()?;
    m.add_class::<writer::Writer>()?;
    m.add_class::<buffers::Buffer>()?;
    m.add_class::<background::AsyncWriter>()?;
    m.add_class::<background::SaveHandle>()?;
    m.add_function(wrap_pyfunction!(tensors::dtypes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_built, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
