//! # onestep-format
//!
//! What the exporter writes and the runtime reads, and nothing else: the graph IR ([`graph`]), the
//! step-graph contract ([`contract`]: inputs, outputs, metadata keys, generation defaults), the ONNX
//! protobuf types and their zero-copy decoding ([`onnx`]), the readers' resource [`limits`], and the one
//! error type ([`Error`]). Small on purpose: `onestep-export` depends on this crate, not on the runtime
//! (no wgpu, tokenizers or kernels in an exporter build).
#![warn(missing_docs)]

pub mod contract;
pub mod error;
pub mod graph;
pub mod limits;
pub mod onnx;

pub use contract::{GenerationDefaults, ModelInfo};
pub use error::{DeviceFault, Error, Result};
pub use limits::Limits;
