//! # onestep-export
//!
//! Data flow: [`source`] (GGUF / HF folder) → [`quant`] (weight forms) → [`arch`] (one file per
//! architecture, written over symbolic tensors) → [`trace`] (records ops into the shared graph IR) →
//! [`write`] (ONNX, 64-byte aligned weights). [`export::export`] runs the whole pipeline
//! ([`export_speech::export_whisper`] for a Whisper checkpoint).
#![warn(missing_docs)]

pub mod arch;
pub mod export;
pub mod export_speech;
pub mod inspect;
pub mod quant;
pub mod source;
pub mod trace;
pub mod write;

pub use export::{export, ExportError, ExportOptions, ExportSummary, NoProgress, Progress};
pub use quant::Quantize;
