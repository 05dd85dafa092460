//! The llama-shaped decoder's step graph (docs/GRAPH.md): per layer an RMSNorm, attention over the static
//! cache and a SiLU-gated MLP, each with its residual. The config switches what the families add to it:
//! q/k/v biases (`attention_bias`: qwen2), an RMSNorm on each head's q and k before the rotation
//! (`qk_norm`: qwen3), layers that apply no rotation (`no_rope_layers`: smollm3), a sliding window on
//! every layer (`sliding_window`: mistral, phi3) and the rotary scaling (phi3's LongRoPE, llama 3's).

use onestep_format::graph::{DType, Graph};

use super::blocks::{self, norm_weight, Gate, Positions};
use super::{add_matrix, embedding, linear, ArchOptions, Weights};
use crate::source::{canonical, ModelConfig};
use crate::trace::{AttentionScores, Sym, TraceError, Tracer};

/// Builds the llama-shaped step graph for `cfg`.
pub fn build(cfg: &ModelConfig, w: &Weights, opts: &ArchOptions) -> Result<Graph, TraceError> {
    let (h, s) = (cfg.hidden_size, opts.max_cache);
    let mut t = Tracer::new(&format!("{}_step", cfg.architecture));
    let inputs = blocks::inputs(&mut t, cfg, opts)?;

    // ---- weights shared by the whole graph
    let rope = blocks::rope_weights(&mut t, "rope", cfg, s)?;
    let embd = add_matrix(&mut t, "token_embd", w.matrix(canonical::TOKEN_EMBD)?)?;

    // ---- positions and mask (mistral: every layer attends a sliding window)
    let pos = blocks::positions(&mut t, &inputs, s)?;
    let mask = pos.mask(&mut t, "mask", cfg.sliding_window)?;

    let mut x = embedding(&mut t, &embd, &pos.ids)?;
    let shared = Shared {
        cfg,
        w,
        kv: opts.kv_dtype,
        pos: &pos,
        rope: &rope,
        mask: &mask,
    };
    for (i, past) in inputs.past.iter().enumerate() {
        x = layer(&mut t, &shared, i, &x, past)?;
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
    let (x, sampling) = ((&x, &pos), &inputs.sampling);
    blocks::logits_and_choice(t, cfg, x, &out_norm, &out_w, None, sampling)
}

/// What every layer reads besides its own weights.
struct Shared<'a> {
    cfg: &'a ModelConfig,
    w: &'a Weights,
    kv: DType,
    pos: &'a Positions,
    rope: &'a (Sym, Sym),
    mask: &'a Sym,
}

/// The q, k and v biases of layer `i` (`prefix` `l{i}`), where the config has them.
fn biases(
    t: &mut Tracer,
    s: &Shared<'_>,
    i: usize,
    prefix: &str,
) -> Result<[Option<Sym>; 3], TraceError> {
    if !s.cfg.attention_bias {
        return Ok([None, None, None]);
    }
    let (q, kv) = (
        s.cfg.num_heads * s.cfg.head_dim,
        s.cfg.num_kv_heads * s.cfg.head_dim,
    );
    let mut b = |proj: &str, src: &str, n: usize| -> Result<Option<Sym>, TraceError> {
        let bytes = s.w.vector(&canonical::blk(i, src))?.clone();
        let name = format!("{prefix}.attn.{proj}.bias");
        t.weight(&name, DType::F32, &[n], bytes).map(Some)
    };
    Ok([
        b("q_proj", "attn_q.bias", q)?,
        b("k_proj", "attn_k.bias", kv)?,
        b("v_proj", "attn_v.bias", kv)?,
    ])
}

/// Layer `i`: its weights, then attention (rotated unless a NoPE layer) and the SiLU-gated MLP.
fn layer(
    t: &mut Tracer,
    s: &Shared<'_>,
    i: usize,
    x: &Sym,
    (pk, pv): &(Sym, Sym),
) -> Result<Sym, TraceError> {
    let (cfg, w) = (s.cfg, s.w);
    let (h, d, width) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads * cfg.head_dim);
    let p = format!("l{i}");
    let norm = |t: &mut Tracer, name: &str, n: usize| {
        let src = canonical::blk(i, &format!("{name}.weight"));
        norm_weight(t, w, &format!("{p}.{name}.weight"), &src, n, 0.0)
    };
    let attn_norm = norm(t, "attn_norm", h)?;
    let ffn_norm = norm(t, "ffn_norm", h)?;
    let lin = blocks::linears(t, w, i)?;
    let [bq, bk, bv] = biases(t, s, i, &p)?;
    let qk_norm = match cfg.qk_norm {
        true => Some((norm(t, "attn_q_norm", d)?, norm(t, "attn_k_norm", d)?)),
        false => None,
    };

    t.set_scope(&p);
    let hn = t.rms_norm("attn_norm", x, &attn_norm, cfg.rms_eps)?;
    let bias = [bq.as_ref(), bk.as_ref(), bv.as_ref()];
    let heads = (cfg.num_heads, cfg.num_kv_heads, d);
    let qkv = [&lin.q, &lin.k, &lin.v];
    let qk_norm = qk_norm.as_ref();
    let [q, k, v] = blocks::qkv_heads(t, &hn, qkv, bias, heads, qk_norm, cfg.rms_eps)?;
    // smollm3's NoPE layers attend without positions
    let (q, k) = match cfg.no_rope_layers.contains(&i) {
        true => (q, k),
        false => blocks::rotate(t, (&q, &k), s.rope, s.pos, cfg.rope_interleaved)?,
    };
    let scores = AttentionScores::default();
    let (kv, mask) = (s.kv, s.mask);
    let a = blocks::cache_attention(t, i, (&q, &k, &v), (pk, pv), kv, mask, scores, width)?;
    let o = linear(t, "attn.o_proj", &a, &lin.o, None)?;
    let x = t.add("attn.residual", x, &o)?;
    let mlp = [&lin.gate, &lin.up, &lin.down];
    let x = blocks::gated_mlp(t, &x, (&ffn_norm, None), mlp, Gate::Silu, cfg.rms_eps)?;
    t.set_scope("");
    Ok(x)
}
