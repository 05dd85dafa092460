//! Gemma 2 and Gemma 3 (text): the llama decoder with four norms a layer (before and after the attention
//! and the MLP), RMSNorm scaling by `1 + w`, a GeLU-tanh gated MLP, the embedding scaled by √hidden,
//! sliding-window layers between global ones (Gemma 3: each kind with its own rotary base), scores scaled
//! by `query_pre_attn_scalar^-0.5`, and either q/k norms (Gemma 3) or tanh soft caps on the attention
//! scores and the logits (Gemma 2). HF checkpoints store the norms' `w` (the graph adds 1), GGUF files
//! `1 + w`; GGUF q/k rows are unpermuted (rope type NEOX: rotate_half).

use onestep_format::graph::Graph;
use serde_json::Value;

use super::blocks::Gate;
use super::decoder::{self, Layout};
use super::family::HfLayerTensor;
use super::{Arch, ArchOptions, Weights};
use crate::source::gguf::GgufKeys;
use crate::source::hf::HfKeys;
use crate::source::{canonical, ModelConfig, SourceError, SourceTensor};
use crate::trace::TraceError;

/// A Gemma generation: what tells Gemma 2 and Gemma 3 apart.
pub struct Gemma {
    name: &'static str,
    gguf_names: &'static [&'static str],
    model_types: &'static [&'static str],
    classes: &'static [&'static str],
    refused: &'static [(&'static str, &'static str)],
    /// Every this-many-th layer is global where the config has no layer list or pattern (llama.cpp
    /// fixes it for GGUF files).
    global_every: usize,
    /// The local layers' rotary base where the config does not say (`None`: the global base).
    local_theta: Option<f32>,
    /// q/k norms.
    qk_norm: bool,
}

/// Gemma 2: soft caps, every second layer global, one rotary base.
pub static GEMMA2: Gemma = Gemma {
    name: "gemma2",
    gguf_names: &["gemma2"],
    model_types: &["gemma2"],
    classes: &["Gemma2ForCausalLM"],
    refused: &[],
    global_every: 2,
    local_theta: None,
    qk_norm: false,
};

/// Gemma 3 (text): q/k norms, every sixth layer global, local layers on base 10,000.
pub static GEMMA3: Gemma = Gemma {
    name: "gemma3",
    gguf_names: &["gemma3"],
    model_types: &["gemma3_text"],
    classes: &["Gemma3ForCausalLM"],
    refused: &[(
        "gemma3",
        "the multimodal Gemma 3; its text model, model_type `gemma3_text`, is supported",
    )],
    global_every: 6,
    local_theta: Some(10_000.0),
    qk_norm: true,
};

/// The decoder as Gemma has it: the GeLU-tanh gate, norms after the attention and the MLP, the
/// embedding scaled by √hidden.
const LAYOUT: Layout = Layout {
    gate: Gate::GeluTanh,
    post_norms: true,
    scaled_embedding: true,
};

/// The norms after the attention and after the MLP.
const POST_NORMS: &[(&str, &str)] = &[
    (
        "post_attention_norm.weight",
        "a norm after attention or the MLP",
    ),
    ("post_ffw_norm.weight", "a norm after attention or the MLP"),
];

impl Arch for Gemma {
    fn name(&self) -> &'static str {
        self.name
    }
    fn hf_model_types(&self) -> &'static [&'static str] {
        self.model_types
    }
    fn hf_classes(&self) -> &'static [&'static str] {
        self.classes
    }
    fn hf_refused(&self) -> &'static [(&'static str, &'static str)] {
        self.refused
    }
    fn gguf_names(&self) -> &'static [&'static str] {
        self.gguf_names
    }
    fn hf_activation(&self) -> (&'static [&'static str], &'static [&'static str]) {
        (
            &["hidden_activation", "hidden_act"],
            &["gelu_pytorch_tanh", "gelu_tanh"],
        )
    }
    fn read_hf(&self, c: &HfKeys<'_>, cfg: &mut ModelConfig) -> Result<(), SourceError> {
        self.hf_config(c, cfg)
    }
    fn read_gguf(&self, m: &GgufKeys<'_>, cfg: &mut ModelConfig) -> Result<(), SourceError> {
        self.gguf_config(m, cfg)
    }
    /// Gemma's four norms a layer take llama.cpp's Gemma names: its `post_attention_layernorm` follows
    /// the attention (llama's precedes the MLP).
    fn hf_layer_tensor(
        &self,
        _cfg: &ModelConfig,
        _name: &str,
        layer: usize,
        suffix: &str,
        t: &SourceTensor,
    ) -> HfLayerTensor {
        let canon = match suffix {
            "post_attention_layernorm.weight" => "post_attention_norm.weight",
            "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
            "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
            _ => return Ok(None),
        };
        Ok(Some(vec![(canonical::blk(layer, canon), t.clone())]))
    }
    fn extra_layer_norms(&self) -> &'static [(&'static str, &'static str)] {
        POST_NORMS
    }
    fn build(&self, cfg: &ModelConfig, w: &Weights, o: &ArchOptions) -> Result<Graph, TraceError> {
        decoder::build_with(cfg, w, o, LAYOUT)
    }
}

impl Gemma {
    /// config.json: the window (required), the global layers (`layer_types`, else every
    /// `sliding_window_pattern`-th), the local rotary base (transformers 5's per-kind `rope_parameters`,
    /// else `rope_local_base_freq`), the scale from `query_pre_attn_scalar`, the soft caps; the norms
    /// scale by `1 + w`.
    fn hf_config(&self, c: &HfKeys<'_>, cfg: &mut ModelConfig) -> Result<(), SourceError> {
        let window = c.positive("sliding_window")?;
        let window = window
            .ok_or_else(|| c.err("sliding_window", "missing (Gemma's local layers need it)"))?;
        cfg.sliding_window = Some(window);
        cfg.qk_norm = self.qk_norm;
        cfg.global_layers = self.hf_global_layers(c, cfg.num_layers)?;
        let params = c.get("rope_parameters");
        let local = params
            .and_then(|p| p.get("sliding_attention"))
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(c.f64("rope_local_base_freq")?);
        let global = || -> Result<f32, SourceError> {
            let theta = params
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64);
            Ok(theta.or(c.f64("rope_theta")?).unwrap_or(10_000.0) as f32)
        };
        cfg.local_rope_theta = Some(match (local, self.local_theta) {
            (Some(t), _) => t as f32,
            (None, Some(t)) => t,
            (None, None) => global()?,
        });
        let scalar = c.f64("query_pre_attn_scalar")?;
        let scalar = scalar.unwrap_or(cfg.head_dim as f64);
        if !(scalar.is_finite() && scalar > 0.0) {
            return Err(c.err("query_pre_attn_scalar", "must be positive"));
        }
        cfg.attn_scale = Some(scalar.powf(-0.5) as f32);
        let cap = |key: &str| match c.f64(key)? {
            Some(v) if !(v.is_finite() && v > 0.0) => Err(c.err(key, "must be positive")),
            v => Ok(v.map(|v| v as f32)),
        };
        cfg.attn_softcap = cap("attn_logit_softcapping")?;
        cfg.final_softcap = cap("final_logit_softcapping")?;
        cfg.norm_offset = 1.0;
        Ok(())
    }

    /// The global layers from `layer_types` (`full_attention`), else every `sliding_window_pattern`-th.
    fn hf_global_layers(&self, c: &HfKeys<'_>, layers: usize) -> Result<Vec<usize>, SourceError> {
        let Some(types) = c.strings("layer_types")? else {
            return match c.positive("sliding_window_pattern")? {
                Some(n) => Ok(every(n, layers)),
                None => Ok(every(self.global_every, layers)),
            };
        };
        if types.len() != layers {
            let detail = format!("{} entries for {layers} layers", types.len());
            return Err(c.err("layer_types", detail));
        }
        let mut global = Vec::new();
        for (i, ty) in types.into_iter().enumerate() {
            match ty {
                "full_attention" => global.push(i),
                "sliding_attention" => {}
                other => {
                    let detail = format!("layer {i}: unknown kind `{other}`");
                    return Err(c.err("layer_types", detail));
                }
            }
        }
        Ok(global)
    }

    /// GGUF, as llama.cpp reads it: the window, every `n`-th layer global (`n` from
    /// `attention.sliding_window_pattern` where the file has it, else llama.cpp's fixed one), Gemma 3's
    /// local layers on base 10,000, scores scaled by `1/sqrt(head_dim)`, Gemma 2's soft caps. The norms
    /// are stored as `1 + w` already.
    fn gguf_config(&self, m: &GgufKeys<'_>, cfg: &mut ModelConfig) -> Result<(), SourceError> {
        cfg.qk_norm = self.qk_norm;
        cfg.sliding_window = Some(m.positive("attention.sliding_window")?);
        let n = match m.usize_opt("attention.sliding_window_pattern")? {
            Some(0) => return Err(m.err("attention.sliding_window_pattern", "must be positive")),
            Some(n) => n,
            None => self.global_every,
        };
        cfg.global_layers = every(n, cfg.num_layers);
        cfg.local_rope_theta = Some(match self.local_theta {
            Some(t) => t,
            None => m.f32_opt("rope.freq_base")?.unwrap_or(10_000.0),
        });
        cfg.attn_scale = Some(1.0 / (cfg.head_dim as f32).sqrt());
        let softcap = |key: &str| match m.f32_opt(key)? {
            Some(c) if !(c.is_finite() && c > 0.0) => {
                Err(m.err(key, format!("must be positive, got {c}")))
            }
            c => Ok(c),
        };
        cfg.attn_softcap = softcap("attn_logit_softcapping")?;
        cfg.final_softcap = softcap("final_logit_softcapping")?;
        Ok(())
    }
}

/// Every `n`-th of `layers` layers (the last of each `n`).
fn every(n: usize, layers: usize) -> Vec<usize> {
    (0..layers).filter(|i| i % n == n - 1).collect()
}
