//! Qwen3: llama with an RMSNorm on each head's q and k before the rotation (`attn_q_norm`,
//! `attn_k_norm`; HF `self_attn.q_norm`, `self_attn.k_norm`). GGUF: rotate_half (rope type NEOX), no
//! biases. The graph is the shared llama-shaped decoder (decoder.rs).

use onestep_format::graph::Graph;

use super::{decoder, Arch, ArchOptions, Weights};
use crate::source::gguf::GgufKeys;
use crate::source::hf::HfKeys;
use crate::source::{ModelConfig, SourceError};
use crate::trace::TraceError;

/// Qwen3 (dense).
pub struct Qwen3;

impl Arch for Qwen3 {
    fn name(&self) -> &'static str {
        "qwen3"
    }
    fn hf_model_types(&self) -> &'static [&'static str] {
        &["qwen3"]
    }
    fn hf_classes(&self) -> &'static [&'static str] {
        &["Qwen3ForCausalLM"]
    }
    fn gguf_names(&self) -> &'static [&'static str] {
        &["qwen3"]
    }
    fn read_hf(&self, _c: &HfKeys<'_>, cfg: &mut ModelConfig) -> Result<(), SourceError> {
        cfg.qk_norm = true;
        Ok(())
    }
    fn read_gguf(&self, _m: &GgufKeys<'_>, cfg: &mut ModelConfig) -> Result<(), SourceError> {
        cfg.qk_norm = true;
        Ok(())
    }
    fn build(&self, cfg: &ModelConfig, w: &Weights, o: &ArchOptions) -> Result<Graph, TraceError> {
        decoder::build(cfg, w, o)
    }
}
