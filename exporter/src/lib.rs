//! # onestep-export
//!
//! Data flow: [`source`] (GGUF / HF folder) → `arch` (one file per architecture, written over symbolic
//! tensors) → `trace` (records ops into the shared graph IR) → `quant` → `write` (ONNX, aligned weights).
#![warn(missing_docs)]

pub mod source;
