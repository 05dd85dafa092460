//! Gemma 2 and Gemma 3 (text): the llama decoder with four norms a layer (before and after the attention
//! and the MLP), RMSNorm scaling by `1 + w`, a GeLU-tanh gated MLP, the embedding scaled by √hidden,
//! sliding-window layers between global ones (Gemma 3: each kind with its own rotary base), scores scaled
//! by `query_pre_attn_scalar^-0.5`, and either q/k norms (Gemma 3) or tanh soft caps on the attention
//! scores and the logits (Gemma 2). HF checkpoints store the norms' `w` (the graph adds 1), GGUF files
//! `1 + w`; GGUF q/k rows are unpermuted (rope type NEOX: rotate_half).

use onestep_format::graph::Graph;
use serde_json::Value;

use super::blocks::{self, norm_weight, Gate, Positions};
use super::family::HfLayerTensor;
use super::{add_matrix, embedding, linear, Arch, ArchOptions, Weights};
use crate::source::gguf::GgufKeys;
use crate::source::hf::HfKeys;
use crate::source::{canonical, ModelConfig, SourceError, SourceTensor};
use crate::trace::{AttentionScores, Sym, TraceError, Tracer};

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
        build(cfg, w, o)
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

/// What every layer reads besides its own weights.
struct Shared<'a> {
    cfg: &'a ModelConfig,
    w: &'a Weights,
    opts: &'a ArchOptions,
    pos: &'a Positions,
    scores: AttentionScores,
}

/// Rotary tables: `cos`, `sin`.
type Rope = (Sym, Sym);

/// The global layers' rotary tables and, where their base differs (Gemma 3), the local layers'
/// (`rope.local`, no scaling); else the global ones twice.
fn ropes(
    t: &mut Tracer,
    cfg: &ModelConfig,
    s: usize,
    any_local: bool,
) -> Result<[Rope; 2], TraceError> {
    let global = blocks::rope_weights(t, "rope", cfg, s)?;
    let local_cfg = ModelConfig {
        rope_theta: cfg.local_rope_theta.unwrap_or(cfg.rope_theta),
        rope_scaling: None,
        ..cfg.clone()
    };
    let same =
        (local_cfg.rope_theta, &local_cfg.rope_scaling) == (cfg.rope_theta, &cfg.rope_scaling);
    if same || !any_local {
        return Ok([global.clone(), global]);
    }
    let local = blocks::rope_weights(t, "rope.local", &local_cfg, s)?;
    Ok([global, local])
}

/// Builds the Gemma step graph.
fn build(cfg: &ModelConfig, w: &Weights, opts: &ArchOptions) -> Result<Graph, TraceError> {
    let (h, s, off) = (cfg.hidden_size, opts.max_cache, cfg.norm_offset);
    let mut t = Tracer::new(&format!("{}_step", cfg.architecture));
    let inputs = blocks::inputs(&mut t, cfg, opts)?;
    let local = |i: usize| cfg.sliding_window.is_some() && !cfg.global_layers.contains(&i);
    let any_local = (0..cfg.num_layers).any(local);
    let any_global = (0..cfg.num_layers).any(|i| !local(i));

    // ---- weights shared by the whole graph
    let [global_rope, local_rope] = ropes(&mut t, cfg, s, any_local)?;
    let embd = add_matrix(&mut t, "token_embd", w.matrix(canonical::TOKEN_EMBD)?)?;

    // ---- positions and masks: one for the global layers, one for the windowed ones
    let pos = blocks::positions(&mut t, &inputs, s)?;
    let global_mask = any_global
        .then(|| pos.mask(&mut t, "mask", None))
        .transpose()?;
    let local_mask = any_local
        .then(|| pos.mask(&mut t, "mask.local", cfg.sliding_window))
        .transpose()?;
    let x = embedding(&mut t, &embd, &pos.ids)?;
    let scale = t.const_f32((h as f64).sqrt() as f32);
    let mut x = t.mul("embed.scaled", &x, &scale)?;
    let scale = cfg.attn_scale.unwrap_or(1.0 / (cfg.head_dim as f32).sqrt());
    let shared = Shared {
        cfg,
        w,
        opts,
        pos: &pos,
        scores: AttentionScores {
            scale: Some(scale),
            softcap: cfg.attn_softcap,
        },
    };
    for (i, past) in inputs.past.iter().enumerate() {
        let (rope, mask) = match local(i) {
            true => (&local_rope, &local_mask),
            false => (&global_rope, &global_mask),
        };
        let mask = mask
            .as_ref()
            .ok_or_else(|| TraceError::Model(format!("layer {i}: no mask for its kind")))?;
        x = layer(&mut t, &shared, i, &x, past, rope, mask)?;
    }

    // ---- last position → logits (Gemma 2: soft-capped)
    let out_norm = norm_weight(
        &mut t,
        w,
        "output_norm.weight",
        canonical::OUTPUT_NORM,
        h,
        off,
    )?;
    let out_w = blocks::output_matrix(&mut t, cfg, w, &embd)?;
    let (x, sampling) = ((&x, &pos), &inputs.sampling);
    blocks::logits_and_choice(t, cfg, x, &out_norm, &out_w, cfg.final_softcap, sampling)
}

/// Layer `i`: its weights, then attention and the GeLU-tanh gated MLP, each normed before and after.
fn layer(
    t: &mut Tracer,
    s: &Shared<'_>,
    i: usize,
    x: &Sym,
    (pk, pv): &(Sym, Sym),
    rope: &(Sym, Sym),
    mask: &Sym,
) -> Result<Sym, TraceError> {
    let (cfg, w) = (s.cfg, s.w);
    let (h, d, width) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads * cfg.head_dim);
    let p = format!("l{i}");
    let norm = |t: &mut Tracer, name: &str, n: usize| {
        let (src, off) = (
            canonical::blk(i, &format!("{name}.weight")),
            cfg.norm_offset,
        );
        norm_weight(t, w, &format!("{p}.{name}.weight"), &src, n, off)
    };
    let attn_norm = norm(t, "attn_norm", h)?;
    let post_attn_norm = norm(t, "post_attention_norm", h)?;
    let ffn_norm = norm(t, "ffn_norm", h)?;
    let post_ffn_norm = norm(t, "post_ffw_norm", h)?;
    let qk_norm = match cfg.qk_norm {
        true => Some((norm(t, "attn_q_norm", d)?, norm(t, "attn_k_norm", d)?)),
        false => None,
    };
    let lin = blocks::linears(t, w, i)?;

    t.set_scope(&p);
    let hn = t.rms_norm("attn_norm", x, &attn_norm, cfg.rms_eps)?;
    let heads = (cfg.num_heads, cfg.num_kv_heads, d);
    let (qkv, qk_norm) = ([&lin.q, &lin.k, &lin.v], qk_norm.as_ref());
    let [q, k, v] = blocks::qkv_heads(t, &hn, qkv, [None; 3], heads, qk_norm, cfg.rms_eps)?;
    let (q, k) = blocks::rotate(t, (&q, &k), rope, s.pos, cfg.rope_interleaved)?;
    let kv = s.opts.kv_dtype;
    let a = blocks::cache_attention(t, i, (&q, &k, &v), (pk, pv), kv, mask, s.scores, width)?;
    let o = linear(t, "attn.o_proj", &a, &lin.o, None)?;
    let o = t.rms_norm("post_attention_norm", &o, &post_attn_norm, cfg.rms_eps)?;
    let x = t.add("attn.residual", x, &o)?;
    let (norms, mlp) = (
        (&ffn_norm, Some(&post_ffn_norm)),
        [&lin.gate, &lin.up, &lin.down],
    );
    let x = blocks::gated_mlp(t, &x, norms, mlp, Gate::GeluTanh, cfg.rms_eps)?;
    t.set_scope("");
    Ok(x)
}
