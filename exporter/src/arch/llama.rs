//! Llama, Qwen2 (= Llama with q/k/v biases), Qwen3 (= Llama with an RMSNorm on each head's q and k
//! before the rotation), SmolLM3 (= Llama with some layers that apply no rotation), Mistral (= Llama
//! whose attention may be a sliding window) and Phi-3 (= Llama with LongRoPE tables; its fused
//! projections are split by the reader): the step graph of docs/GRAPH.md.

use onestep_format::graph::{DType, Graph};

use super::blocks::{self, norm_weight};
use super::{add_matrix, embedding, linear, rope_tables, ArchOptions, Weights};
use crate::source::{canonical, ModelConfig};
use crate::trace::{AttentionScores, Sym, TraceError, Tracer};

/// Builds the llama/qwen2 step graph.
pub fn build(cfg: &ModelConfig, w: &Weights, opts: &ArchOptions) -> Result<Graph, TraceError> {
    let (h, nh, kvh, d) = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    let s = opts.max_cache;
    let bias = cfg.attention_bias || cfg.architecture == "qwen2";
    let kv = opts.kv_dtype;
    let mut t = Tracer::new(&format!("{}_step", cfg.architecture));
    let inputs = blocks::inputs(&mut t, cfg, opts)?;

    // ---- weights shared by the whole graph
    let (cos, sin) = rope_tables(cfg, s);
    let cos = t.weight("rope.cos", DType::F32, &[s, d / 2], blocks::f32_bytes(&cos))?;
    let sin = t.weight("rope.sin", DType::F32, &[s, d / 2], blocks::f32_bytes(&sin))?;
    let embd = add_matrix(&mut t, "token_embd", w.matrix(canonical::TOKEN_EMBD)?)?;

    // ---- positions and mask (mistral: every layer attends a sliding window)
    let pos = blocks::positions(&mut t, &inputs, s)?;
    let mask = pos.mask(&mut t, "mask", cfg.sliding_window)?;

    let mut x = embedding(&mut t, &embd, &pos.ids)?;

    for (i, (pk, pv)) in inputs.past.iter().enumerate() {
        let l = |suffix: &str| canonical::blk(i, suffix);
        let p = format!("l{i}");
        // weights of this layer
        let norm = |t: &mut Tracer, name: &str, n: usize| {
            norm_weight(
                t,
                w,
                &format!("{p}.{name}.weight"),
                &l(&format!("{name}.weight")),
                n,
                0.0,
            )
        };
        let mat = |t: &mut Tracer, name: &str, src: &str| {
            add_matrix(t, &format!("{p}.{name}"), w.matrix(&l(src))?)
        };
        let attn_norm = norm(&mut t, "attn_norm", h)?;
        let ffn_norm = norm(&mut t, "ffn_norm", h)?;
        let wq = mat(&mut t, "attn.q_proj", "attn_q.weight")?;
        let wk = mat(&mut t, "attn.k_proj", "attn_k.weight")?;
        let wv = mat(&mut t, "attn.v_proj", "attn_v.weight")?;
        let wo = mat(&mut t, "attn.o_proj", "attn_output.weight")?;
        let wg = mat(&mut t, "mlp.gate", "ffn_gate.weight")?;
        let wu = mat(&mut t, "mlp.up", "ffn_up.weight")?;
        let wd = mat(&mut t, "mlp.down", "ffn_down.weight")?;
        let (bq, bk, bv) = if bias {
            let mut b = |proj: &str, src: &str, n: usize| -> Result<Sym, TraceError> {
                t.weight(
                    &format!("{p}.attn.{proj}.bias"),
                    DType::F32,
                    &[n],
                    w.vector(&l(src))?.clone(),
                )
            };
            (
                Some(b("q_proj", "attn_q.bias", nh * d)?),
                Some(b("k_proj", "attn_k.bias", kvh * d)?),
                Some(b("v_proj", "attn_v.bias", kvh * d)?),
            )
        } else {
            (None, None, None)
        };
        let qk_norm = if cfg.qk_norm {
            Some((
                norm(&mut t, "attn_q_norm", d)?,
                norm(&mut t, "attn_k_norm", d)?,
            ))
        } else {
            None
        };

        t.set_scope(&p);
        // attention
        let hn = t.rms_norm("attn_norm", &x, &attn_norm, cfg.rms_eps)?;
        let [q4, k4, v4] = blocks::qkv_heads(
            &mut t,
            &hn,
            [&wq, &wk, &wv],
            [bq.as_ref(), bk.as_ref(), bv.as_ref()],
            (nh, kvh, d),
            qk_norm.as_ref(),
            cfg.rms_eps,
        )?;
        // smollm3's NoPE layers attend without positions
        let (qr, kr) = if cfg.no_rope_layers.contains(&i) {
            (q4, k4)
        } else {
            let il = cfg.rope_interleaved;
            (
                t.rope("attn.q_rope", &q4, &cos, &sin, &pos.pos_ids, il)?,
                t.rope("attn.k_rope", &k4, &cos, &sin, &pos.pos_ids, il)?,
            )
        };
        let scores = AttentionScores::default();
        let a = blocks::cache_attention(
            &mut t,
            i,
            (&qr, &kr, &v4),
            (pk, pv),
            kv,
            &mask,
            scores,
            nh * d,
        )?;
        let o = linear(&mut t, "attn.o_proj", &a, &wo, None)?;
        x = t.add("attn.residual", &x, &o)?;
        // gated MLP
        let h2 = t.rms_norm("ffn_norm", &x, &ffn_norm, cfg.rms_eps)?;
        let g = linear(&mut t, "mlp.gate", &h2, &wg, None)?;
        let u = linear(&mut t, "mlp.up", &h2, &wu, None)?;
        let sg = t.sigmoid("mlp.gate_sigmoid", &g)?;
        let silu = t.mul("mlp.silu", &g, &sg)?;
        let gu = t.mul("mlp.gated", &silu, &u)?;
        let down = linear(&mut t, "mlp.down", &gu, &wd, None)?;
        x = t.add("mlp.residual", &x, &down)?;
        t.set_scope("");
    }

    // ---- last position → logits
    let out_norm = norm_weight(
        &mut t,
        w,
        "output_norm.weight",
        canonical::OUTPUT_NORM,
        h,
        0.0,
    )?;
    let out_w = blocks::output_matrix(&mut t, cfg, w, &embd)?;
    blocks::logits_and_choice(
        t,
        cfg,
        (&x, &pos),
        &out_norm,
        &out_w,
        None,
        &inputs.sampling,
    )
}
