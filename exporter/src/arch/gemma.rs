//! Gemma 2 and Gemma 3 (text): the llama decoder with four norms a layer (before and after the attention
//! and the MLP), RMSNorm scaling by `1 + w`, a GeLU-tanh gated MLP, the embedding scaled by √hidden,
//! sliding-window layers between global ones (Gemma 3: each kind with its own rotary base), scores scaled
//! by `query_pre_attn_scalar^-0.5`, and either q/k norms (Gemma 3) or tanh soft caps on the attention
//! scores and the logits (Gemma 2). HF checkpoints store the norms' `w` (the graph adds 1), GGUF files
//! `1 + w`; GGUF q/k rows are unpermuted (rope type NEOX: rotate_half).

use onestep_format::graph::Graph;

use super::blocks::{self, norm_weight, Gate, Positions};
use super::{add_matrix, embedding, linear, ArchOptions, Weights};
use crate::source::{canonical, ModelConfig};
use crate::trace::{AttentionScores, Sym, TraceError, Tracer};

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

/// Builds the gemma2/gemma3 step graph.
pub fn build(cfg: &ModelConfig, w: &Weights, opts: &ArchOptions) -> Result<Graph, TraceError> {
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
