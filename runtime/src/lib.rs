//! # onestep
//!
//! Loads a one-file ONNX step graph written by `onestep-export` (memory-mapped, weights never copied),
//! plans it once, and runs its nodes on the CPU (and, behind the same plan, on wgpu). Nothing about any
//! model architecture is hard-coded: the runtime follows the graph.
//!
//! Data flow: [`onnx`] (decode) → [`load`] (checks into the [`graph`] IR) → plan → [`backend`] kernels →
//! [`model::StepState`] (KV cache) → [`generate`] (Session: tokenizer, chat template, stream, stop).
#![warn(missing_docs)]

pub mod backend;
pub use onestep_format::{contract, error, graph, onnx};
pub mod generate;
pub mod kv;
pub mod load;
pub mod model;
pub mod plan;
mod step;
pub mod tensor;
pub mod weights;

pub use backend::cpu::linear::Precision;
pub use contract::{GenerationDefaults, ModelInfo};
pub use error::{DeviceFault, Error, Result};
pub use load::{Limits, LoadOptions};
pub use model::{Model, StepOutput, StepSampling, StepState};
