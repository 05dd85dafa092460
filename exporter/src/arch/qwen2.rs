//! Qwen2: llama with biases on the q, k and v projections (always: the GGUF file and config.json need
//! not say so). Its config.json `sliding_window` applies only under `use_sliding_window`, which the
//! reader refuses. GGUF: stored unpermuted (rope type NEOX, rotate_half). The graph is the shared
//! llama-shaped decoder (decoder.rs).

use onestep_format::graph::Graph;

use super::{decoder, Arch, ArchOptions, Weights};
use crate::source::gguf::GgufKeys;
use crate::source::hf::HfKeys;
use crate::source::{ModelConfig, SourceError};
use crate::trace::TraceError;

/// Qwen2 and Qwen2.5.
pub struct Qwen2;

impl Arch for Qwen2 {
    fn name(&self) -> &'static str {
        "qwen2"
    }
    fn hf_model_types(&self) -> &'static [&'static str] {
        &["qwen2"]
    }
    fn hf_classes(&self) -> &'static [&'static str] {
        &["Qwen2ForCausalLM"]
    }
    fn gguf_names(&self) -> &'static [&'static str] {
        &["qwen2"]
    }
    fn read_hf(&self, _c: &HfKeys<'_>, cfg: &mut ModelConfig) -> Result<(), SourceError> {
        cfg.attention_bias = true;
        Ok(())
    }
    fn read_gguf(&self, _m: &GgufKeys<'_>, cfg: &mut ModelConfig) -> Result<(), SourceError> {
        cfg.attention_bias = true;
        Ok(())
    }
    fn build(&self, cfg: &ModelConfig, w: &Weights, o: &ArchOptions) -> Result<Graph, TraceError> {
        decoder::build(cfg, w, o)
    }
}
