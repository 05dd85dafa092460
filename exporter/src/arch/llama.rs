//! Llama: the family the others are told against. Its GGUF q/k rows are permuted by llama.cpp's
//! converter for adjacent-pair rotation (rope type NORM), so a GGUF llama rotates interleaved pairs; an
//! HF checkpoint rotates halves. The graph is the shared llama-shaped decoder (decoder.rs).

use onestep_format::graph::Graph;

use super::{decoder, Arch, ArchOptions, Weights};
use crate::source::gguf::GgufKeys;
use crate::source::{ModelConfig, SourceError};
use crate::trace::TraceError;

/// Llama 1–3 (and the checkpoints that call themselves llama: SmolLM2, TinyLlama, …).
pub struct Llama;

impl Arch for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }
    fn hf_model_types(&self) -> &'static [&'static str] {
        &["llama"]
    }
    fn hf_classes(&self) -> &'static [&'static str] {
        &["LlamaForCausalLM"]
    }
    fn gguf_names(&self) -> &'static [&'static str] {
        &["llama"]
    }
    fn read_gguf(&self, _m: &GgufKeys<'_>, cfg: &mut ModelConfig) -> Result<(), SourceError> {
        cfg.rope_interleaved = true;
        Ok(())
    }
    fn build(&self, cfg: &ModelConfig, w: &Weights, o: &ArchOptions) -> Result<Graph, TraceError> {
        decoder::build(cfg, w, o)
    }
}
