//! Mistral: llama whose layers may attend a sliding window (config.json `sliding_window`; `null`: the
//! whole context). The graph is the shared llama-shaped decoder (decoder.rs).

use onestep_format::graph::Graph;

use super::{decoder, Arch, ArchOptions, Weights};
use crate::source::hf::HfKeys;
use crate::source::{ModelConfig, SourceError};
use crate::trace::TraceError;

/// Mistral (HF folders; llama.cpp writes Mistral GGUFs as `llama`).
pub struct Mistral;

impl Arch for Mistral {
    fn name(&self) -> &'static str {
        "mistral"
    }
    fn hf_model_types(&self) -> &'static [&'static str] {
        &["mistral"]
    }
    fn hf_classes(&self) -> &'static [&'static str] {
        &["MistralForCausalLM"]
    }
    fn read_hf(&self, c: &HfKeys<'_>, cfg: &mut ModelConfig) -> Result<(), SourceError> {
        cfg.sliding_window = c.positive("sliding_window")?;
        Ok(())
    }
    fn build(&self, cfg: &ModelConfig, w: &Weights, o: &ArchOptions) -> Result<Graph, TraceError> {
        decoder::build(cfg, w, o)
    }
}
