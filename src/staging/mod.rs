//! Where tensor bytes come from on their way to the disk: the [`TensorSource`] trait and
//! its implementations.

pub mod source;

pub use source::TensorSource;
