//! Compute backends. `cpu` holds the CPU kernels (one file per kernel family).
pub mod cpu;
#[cfg(feature = "gpu")]
pub mod gpu;
pub(crate) mod mask;
