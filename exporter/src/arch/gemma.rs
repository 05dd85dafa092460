//! Gemma 2 and Gemma 3 (text): the llama decoder with four norms a layer (before and after the attention
//! and the MLP), RMSNorm scaling by `1 + w`, a GeLU-tanh gated MLP, the embedding scaled by √hidden,
//! sliding-window layers between global ones (Gemma 3: each kind with its own rotary base), scores scaled
//! by `query_pre_attn_scalar^-0.5`, and either q/k norms (Gemma 3) or tanh soft caps on the attention
//! scores and the logits (Gemma 2).

use onestep_format::graph::{DType, Graph};

use super::blocks::{self, norm_weight};
use super::{add_matrix, embedding, linear, rope_tables, ArchOptions, Weights};
use crate::source::{canonical, ModelConfig};
use crate::trace::{AttentionScores, Sym, TraceError, Tracer};

/// Rotary tables `{name}.cos`, `{name}.sin` `[max_cache, head_dim/2]` for `cfg`'s base and scaling.
fn rope(t: &mut Tracer, name: &str, cfg: &ModelConfig, s: usize) -> Result<(Sym, Sym), TraceError> {
    let half = cfg.head_dim / 2;
    let (cos, sin) = rope_tables(cfg, s);
    Ok((
        t.weight(
            &format!("{name}.cos"),
            DType::F32,
            &[s, half],
            blocks::f32_bytes(&cos),
        )?,
        t.weight(
            &format!("{name}.sin"),
            DType::F32,
            &[s, half],
            blocks::f32_bytes(&sin),
        )?,
    ))
}

/// Builds the gemma2/gemma3 step graph.
pub fn build(cfg: &ModelConfig, w: &Weights, opts: &ArchOptions) -> Result<Graph, TraceError> {
    let (h, nh, kvh, d) = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    let s = opts.max_cache;
    let off = cfg.norm_offset;
    let mut t = Tracer::new(&format!("{}_step", cfg.architecture));
    let inputs = blocks::inputs(&mut t, cfg, opts)?;
    let local = |i: usize| cfg.sliding_window.is_some() && !cfg.global_layers.contains(&i);
    let any_local = (0..cfg.num_layers).any(local);
    let any_global = (0..cfg.num_layers).any(|i| !local(i));

    // ---- weights shared by the whole graph: the global layers' rotary tables and, where their base
    // differs (Gemma 3), the local layers'
    let global_rope = rope(&mut t, "rope", cfg, s)?;
    let local_cfg = ModelConfig {
        rope_theta: cfg.local_rope_theta.unwrap_or(cfg.rope_theta),
        rope_scaling: None,
        ..cfg.clone()
    };
    let local_rope = if (local_cfg.rope_theta, &local_cfg.rope_scaling)
        == (cfg.rope_theta, &cfg.rope_scaling)
        || !any_local
    {
        global_rope.clone()
    } else {
        rope(&mut t, "rope.local", &local_cfg, s)?
    };
    let embd = add_matrix(&mut t, "token_embd", w.matrix(canonical::TOKEN_EMBD)?)?;

    // ---- positions and masks: one for the global layers, one for the windowed ones
    let pos = blocks::positions(&mut t, &inputs, s)?;
    let global_mask = match any_global {
        true => Some(pos.mask(&mut t, "mask", None)?),
        false => None,
    };
    let local_mask = match any_local {
        true => Some(pos.mask(&mut t, "mask.local", cfg.sliding_window)?),
        false => None,
    };

    let x = embedding(&mut t, &embd, &pos.ids)?;
    let scale = t.const_f32((h as f64).sqrt() as f32);
    let mut x = t.mul("embed.scaled", &x, &scale)?;
    let scores = AttentionScores {
        scale: Some(cfg.attn_scale.unwrap_or(1.0 / (d as f32).sqrt())),
        softcap: cfg.attn_softcap,
    };

    for (i, (pk, pv)) in inputs.past.iter().enumerate() {
        let l = |suffix: &str| canonical::blk(i, suffix);
        let p = format!("l{i}");
        let norm = |t: &mut Tracer, name: &str, n: usize| {
            norm_weight(
                t,
                w,
                &format!("{p}.{name}.weight"),
                &l(&format!("{name}.weight")),
                n,
                off,
            )
        };
        let mat = |t: &mut Tracer, name: &str, src: &str| {
            add_matrix(t, &format!("{p}.{name}"), w.matrix(&l(src))?)
        };
        let attn_norm = norm(&mut t, "attn_norm", h)?;
        let post_attn_norm = norm(&mut t, "post_attention_norm", h)?;
        let ffn_norm = norm(&mut t, "ffn_norm", h)?;
        let post_ffn_norm = norm(&mut t, "post_ffw_norm", h)?;
        let qk_norm = if cfg.qk_norm {
            Some((
                norm(&mut t, "attn_q_norm", d)?,
                norm(&mut t, "attn_k_norm", d)?,
            ))
        } else {
            None
        };
        let wq = mat(&mut t, "attn.q_proj", "attn_q.weight")?;
        let wk = mat(&mut t, "attn.k_proj", "attn_k.weight")?;
        let wv = mat(&mut t, "attn.v_proj", "attn_v.weight")?;
        let wo = mat(&mut t, "attn.o_proj", "attn_output.weight")?;
        let wg = mat(&mut t, "mlp.gate", "ffn_gate.weight")?;
        let wu = mat(&mut t, "mlp.up", "ffn_up.weight")?;
        let wd = mat(&mut t, "mlp.down", "ffn_down.weight")?;
        let ((cos, sin), mask) = match local(i) {
            true => (&local_rope, &local_mask),
            false => (&global_rope, &global_mask),
        };
        let mask = mask
            .as_ref()
            .ok_or_else(|| TraceError::Model(format!("layer {i}: no mask for its kind")))?;

        t.set_scope(&p);
        // attention, normed before and after
        let hn = t.rms_norm("attn_norm", &x, &attn_norm, cfg.rms_eps)?;
        let [q4, k4, v4] = blocks::qkv_heads(
            &mut t,
            &hn,
            [&wq, &wk, &wv],
            [None; 3],
            (nh, kvh, d),
            qk_norm.as_ref(),
            cfg.rms_eps,
        )?;
        let il = cfg.rope_interleaved;
        let qr = t.rope("attn.q_rope", &q4, cos, sin, &pos.pos_ids, il)?;
        let kr = t.rope("attn.k_rope", &k4, cos, sin, &pos.pos_ids, il)?;
        let kv = opts.kv_dtype;
        let a = blocks::cache_attention(
            &mut t,
            i,
            (&qr, &kr, &v4),
            (pk, pv),
            kv,
            mask,
            scores,
            nh * d,
        )?;
        let o = linear(&mut t, "attn.o_proj", &a, &wo, None)?;
        let o = t.rms_norm("post_attention_norm", &o, &post_attn_norm, cfg.rms_eps)?;
        x = t.add("attn.residual", &x, &o)?;
        // GeLU-tanh gated MLP, normed before and after
        let h2 = t.rms_norm("ffn_norm", &x, &ffn_norm, cfg.rms_eps)?;
        let gate = linear(&mut t, "mlp.gate", &h2, &wg, None)?;
        let up = linear(&mut t, "mlp.up", &h2, &wu, None)?;
        let act = t.gelu_tanh("mlp.gelu", &gate)?;
        let gu = t.mul("mlp.gated", &act, &up)?;
        let down = linear(&mut t, "mlp.down", &gu, &wd, None)?;
        let down = t.rms_norm("post_ffw_norm", &down, &post_ffn_norm, cfg.rms_eps)?;
        x = t.add("mlp.residual", &x, &down)?;
        t.set_scope("");
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
    let x = (&x, &pos);
    blocks::logits_and_choice(
        t,
        cfg,
        x,
        &out_norm,
        &out_w,
        cfg.final_softcap,
        &inputs.sampling,
    )
}
