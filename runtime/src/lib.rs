//! # onestep
//!
//! Loads a one-file ONNX step graph written by `onestep-export` (memory-mapped, weights never copied),
//! plans it once, and runs its nodes on the CPU (and, behind the same plan, on wgpu). Nothing about any
//! model architecture is hard-coded: the runtime follows the graph.
//!
//! Data flow: [`onnx`] (decode) → [`load`] (checks into the [`graph`] IR) → plan → backend kernels →
//! [`model::StepState`] (KV cache) → [`generate`] (Session: tokenizer, chat template, stream, stop).
//!
//! The API: [`Model`] and [`StepState`] (a step at a time), [`generate::Session`] (text in, text out),
//! their options ([`LoadOptions`], [`kv::KvOptions`], [`gpu::GpuOptions`]) and reports ([`PlanStats`],
//! [`gpu::GpuStats`], [`system`]). The planner, the weights and the backends are the crate's own; the
//! conformance tests reach two entry points through `testing`, which is not API.
#![warn(missing_docs)]

#[cfg(feature = "audio")]
pub mod audio;
pub(crate) mod backend;
mod encode;
mod file_map;
pub use onestep_format::{contract, error, graph, onnx};
pub mod generate;
pub mod kv;
pub mod load;
pub mod model;
mod phases;
pub(crate) mod plan;
mod step;
pub mod tensor;
pub(crate) mod weights;

pub use backend::cpu::linear::Precision;
pub use contract::{GenerationDefaults, ModelInfo};
pub use error::{DeviceFault, Error, Result};
pub use load::{Limits, LoadOptions};
pub use model::{Model, StepOutput, StepSampling, StepState};
pub use plan::PlanStats;

/// The GPU backend's options and reports.
#[cfg(feature = "gpu")]
pub mod gpu {
    pub use crate::backend::gpu::context::{list_adapters, AdapterId};
    pub use crate::backend::gpu::exec::GpuStats;
    pub use crate::backend::gpu::{
        BackendFilter, DeviceRequest, GpuFusions, GpuInfo, GpuOptions, Variant,
    };
}

/// What this machine's CPU does, for reports: the instruction set the fast kernels run and the
/// measured read bandwidth decode speed is held against.
pub mod system {
    pub use crate::backend::cpu::bandwidth::read_gbps;
    pub use crate::backend::cpu::linear::fast_isa;
}

/// Not API: the entry points the conformance tests drive (`runtime/tests/onnx_node.rs`) — the generic
/// CPU op of a node (the oracle) and a plain graph run once on the GPU — and the CPU linear kernels
/// `examples/kernel_bench.rs` times.
#[doc(hidden)]
pub mod testing {
    /// The CPU linear and attention kernels.
    pub mod kernels {
        pub use crate::backend::cpu::attention::{attention_paged, AttnShape};
        pub use crate::backend::cpu::linear::{
            linear_cached, linear_with, Activations, Precision, QuantCache, Weights,
        };
    }
    pub use crate::backend::cpu::ops::run_node;
    #[cfg(feature = "gpu")]
    pub use crate::backend::gpu::graph::{run_graph, GraphRun};
    #[cfg(feature = "gpu")]
    pub use crate::backend::gpu::GpuContext;
}
