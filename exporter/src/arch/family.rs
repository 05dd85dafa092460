//! What an architecture family is to the exporter: the [`Arch`] description each family file implements
//! (its names, its own config fields and tensor names, the tensors it adds, its graph), and the look-ups
//! over the registry [`ARCHS`] (arch/mod.rs) that the readers in `source/` consult. The readers know no
//! family by name.

use onestep_format::graph::Graph;

use super::{ArchOptions, Weights, ARCHS};
use crate::source::gguf::GgufKeys;
use crate::source::hf::HfKeys;
use crate::source::{ModelConfig, SourceError, SourceTensor};
use crate::trace::TraceError;

/// An HF layer tensor's canonical tensors (one for a rename, several for a fused tensor split into
/// rows), or `None` where the common (llama) names apply; `Err` says what is wrong with the tensor (the
/// reader names the file).
pub type HfLayerTensor = Result<Option<Vec<(String, SourceTensor)>>, String>;

/// One architecture family. The defaults are llama's: a family overrides only what differs.
pub trait Arch: Sync {
    /// The family's name: `ModelConfig::architecture` and the exported file's metadata.
    fn name(&self) -> &'static str;

    /// config.json `model_type` values read as this family.
    fn hf_model_types(&self) -> &'static [&'static str];

    /// config.json `architectures[0]` class names read as this family where `model_type` is absent.
    fn hf_classes(&self) -> &'static [&'static str];

    /// `model_type` values of related models this family does not build, each with the reason given.
    fn hf_refused(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }

    /// GGUF `general.architecture` values read as this family (none: Hugging Face folders only).
    fn gguf_names(&self) -> &'static [&'static str] {
        &[]
    }

    /// The MLP gate's activation: the config.json keys that name it, the first present taken, and the
    /// values the family's graph computes (the first is named when another is refused).
    fn hf_activation(&self) -> (&'static [&'static str], &'static [&'static str]) {
        (&["hidden_act"], &["silu"])
    }

    /// Reads the family's own config.json fields into `cfg` (the common ones are read already; the
    /// tensors are not: `tie_word_embeddings` is decided after).
    fn read_hf(&self, _c: &HfKeys<'_>, _cfg: &mut ModelConfig) -> Result<(), SourceError> {
        Ok(())
    }

    /// Reads the family's own `{arch}.*` GGUF keys into `cfg`, and what llama.cpp hard-codes for it
    /// (the common keys are read, and `attention_bias` is set where the file has q biases).
    fn read_gguf(&self, _m: &GgufKeys<'_>, _cfg: &mut ModelConfig) -> Result<(), SourceError> {
        Ok(())
    }

    /// The HF layer tensor `name` (`model.layers.{layer}.{suffix}`) where the family names or stores it
    /// differently from llama.
    fn hf_layer_tensor(
        &self,
        _cfg: &ModelConfig,
        _name: &str,
        _layer: usize,
        _suffix: &str,
        _t: &SourceTensor,
    ) -> HfLayerTensor {
        Ok(None)
    }

    /// Per-layer norms `[hidden]` beyond llama's two that the family requires (canonical suffix, what
    /// it is). Another family's are refused in this one's files.
    fn extra_layer_norms(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }

    /// Builds the step graph of docs/GRAPH.md.
    fn build(
        &self,
        cfg: &ModelConfig,
        w: &Weights,
        opts: &ArchOptions,
    ) -> Result<Graph, TraceError>;
}

/// The family named `name` (`ModelConfig::architecture`).
pub fn find(name: &str) -> Option<&'static dyn Arch> {
    ARCHS.iter().copied().find(|a| a.name() == name)
}

/// The family whose config.json `model_type` is `model_type`.
pub fn find_hf_model_type(model_type: &str) -> Option<&'static dyn Arch> {
    ARCHS
        .iter()
        .copied()
        .find(|a| a.hf_model_types().contains(&model_type))
}

/// The family whose config.json `architectures[0]` is `class`.
pub fn find_hf_class(class: &str) -> Option<&'static dyn Arch> {
    ARCHS
        .iter()
        .copied()
        .find(|a| a.hf_classes().contains(&class))
}

/// Why `model_type` is refused, where a family names it as a related model it does not build.
pub fn hf_refusal(model_type: &str) -> Option<&'static str> {
    ARCHS
        .iter()
        .flat_map(|a| a.hf_refused())
        .find(|(t, _)| *t == model_type)
        .map(|(_, why)| *why)
}

/// The family whose GGUF `general.architecture` is `name`.
pub fn find_gguf(name: &str) -> Option<&'static dyn Arch> {
    ARCHS
        .iter()
        .copied()
        .find(|a| a.gguf_names().contains(&name))
}

/// Every family's names of one kind (`f` picks them), joined for an error message.
pub fn supported(f: impl Fn(&dyn Arch) -> &'static [&'static str]) -> String {
    ARCHS
        .iter()
        .flat_map(|a| f(*a).iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The per-layer norms beyond llama's that some family requires, each once, in registry order.
pub fn all_extra_layer_norms() -> Vec<(&'static str, &'static str)> {
    let mut all: Vec<(&'static str, &'static str)> = Vec::new();
    for n in ARCHS.iter().flat_map(|a| a.extra_layer_norms()) {
        if !all.contains(n) {
            all.push(*n);
        }
    }
    all
}
