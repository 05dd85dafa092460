//! The llama-shaped decoder's step graph (docs/GRAPH.md): per layer an RMSNorm, attention over the static
//! cache and a gated MLP, each with its residual. The config switches what the families add to it:
//! q/k/v biases (`attention_bias`: qwen2), an RMSNorm on each head's q and k before the rotation
//! (`qk_norm`: qwen3, gemma3), layers that apply no rotation (`no_rope_layers`: smollm3), a sliding
//! window on every layer (`sliding_window`: mistral, phi3) or on all but `global_layers` (gemma, each
//! kind with its mask and, where `local_rope_theta` differs, its rotary tables), the rotary scaling
//! (phi3's LongRoPE, llama 3's), norms scaling by `1 + w` (`norm_offset`), the scores' scale and soft
//! cap, the logits' soft cap. A family's [`Layout`] adds what is not configuration: the gate's
//! activation, norms after the attention and the MLP, the embedding scaled by √hidden.

use onestep_format::graph::{DType, Graph};

use super::blocks::{self, norm_weight, Gate, Positions};
use super::{add_matrix, embedding, linear, ArchOptions, Weights};
use crate::source::{canonical, ModelConfig};
use crate::trace::{AttentionScores, Sym, TraceError, Tracer};

/// What a family changes in the decoder beyond its [`ModelConfig`].
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// The gated MLP's activation.
    pub gate: Gate,
    /// RMS norms after the attention and after the MLP (`post_attention_norm`, `post_ffw_norm`), before
    /// their residual `Add`s.
    pub post_norms: bool,
    /// The embedding multiplied by √hidden (node `embed.scaled`).
    pub scaled_embedding: bool,
}

impl Layout {
    /// Llama's: SiLU, no norms after, the embedding as it is.
    pub const LLAMA: Layout = Layout {
        gate: Gate::Silu,
        post_norms: false,
        scaled_embedding: false,
    };
}

/// Builds the llama-shaped step graph for `cfg`.
pub fn build(cfg: &ModelConfig, w: &Weights, opts: &ArchOptions) -> Result<Graph, TraceError> {
    build_with(cfg, w, opts, Layout::LLAMA)
}

/// Builds the step graph for `cfg` with a family's [`Layout`].
pub fn build_with(
    cfg: &ModelConfig,
    w: &Weights,
    opts: &ArchOptions,
    layout: Layout,
) -> Result<Graph, TraceError> {
    let (h, s) = (cfg.hidden_size, opts.max_cache);
    let mut t = Tracer::new(&format!("{}_step", cfg.architecture));
    let inputs = blocks::inputs(&mut t, cfg, opts)?;
    let kinds = Kinds::of(cfg);

    // ---- weights shared by the whole graph
    let ropes = ropes(&mut t, cfg, s, kinds.local)?;
    let embd = add_matrix(&mut t, "token_embd", w.matrix(canonical::TOKEN_EMBD)?)?;

    // ---- positions and masks (mistral: every layer attends a sliding window; gemma: one mask for
    // the global layers, one for the windowed ones)
    let pos = blocks::positions(&mut t, &inputs, s)?;
    let masks = kinds.masks(&mut t, cfg, &pos)?;

    let mut x = embedding(&mut t, &embd, &pos.ids)?;
    if layout.scaled_embedding {
        let scale = t.const_f32((h as f64).sqrt() as f32);
        x = t.mul("embed.scaled", &x, &scale)?;
    }
    let scores = AttentionScores {
        scale: cfg.attn_scale,
        softcap: cfg.attn_softcap,
    };
    let shared = Shared {
        cfg,
        w,
        kv: opts.kv_dtype,
        pos: &pos,
        layout,
        scores,
    };
    for (i, past) in inputs.past.iter().enumerate() {
        let k = usize::from(kinds.is_local(cfg, i));
        x = layer(&mut t, &shared, i, &x, past, (&ropes[k], &masks[k]))?;
    }

    // ---- last position → logits (gemma 2: soft-capped)
    let out_norm = norm_weight(
        &mut t,
        w,
        "output_norm.weight",
        canonical::OUTPUT_NORM,
        h,
        cfg.norm_offset,
    )?;
    let out_w = blocks::output_matrix(&mut t, cfg, w, &embd)?;
    let (x, sampling) = ((&x, &pos), &inputs.sampling);
    blocks::logits_and_choice(t, cfg, x, &out_norm, &out_w, cfg.final_softcap, sampling)
}

/// Which attention kinds the layers have: windowed layers beside global ones (`global_layers` set)
/// take masks and rotaries of their own; otherwise every layer shares one of each.
struct Kinds {
    /// Some layer attends a window while others attend everything.
    local: bool,
    /// Some layer attends everything.
    global: bool,
}

impl Kinds {
    fn of(cfg: &ModelConfig) -> Kinds {
        let mixed = cfg.sliding_window.is_some() && !cfg.global_layers.is_empty();
        let local = mixed && (0..cfg.num_layers).any(|i| !cfg.global_layers.contains(&i));
        Kinds {
            local,
            global: !local || (0..cfg.num_layers).any(|i| cfg.global_layers.contains(&i)),
        }
    }

    /// Whether layer `i` takes the windowed kind's mask and rotary (index 1).
    fn is_local(&self, cfg: &ModelConfig, i: usize) -> bool {
        self.local && !cfg.global_layers.contains(&i)
    }

    /// The masks: `[global, local]`, one of them standing in for the other where a kind is missing;
    /// without mixed kinds, `mask` (windowed where the config says) twice.
    fn masks(
        &self,
        t: &mut Tracer,
        cfg: &ModelConfig,
        pos: &Positions,
    ) -> Result<[Sym; 2], TraceError> {
        if !self.local {
            let m = pos.mask(t, "mask", cfg.sliding_window)?;
            return Ok([m.clone(), m]);
        }
        let global = self.global.then(|| pos.mask(t, "mask", None)).transpose()?;
        let local = pos.mask(t, "mask.local", cfg.sliding_window)?;
        Ok([global.unwrap_or_else(|| local.clone()), local])
    }
}

/// Rotary tables `[global, local]`: the windowed layers' own (`rope.local`, base `local_rope_theta`, no
/// scaling) where there are such layers and their base differs; else the global ones twice.
fn ropes(
    t: &mut Tracer,
    cfg: &ModelConfig,
    s: usize,
    any_local: bool,
) -> Result<[(Sym, Sym); 2], TraceError> {
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

/// What every layer reads besides its own weights.
struct Shared<'a> {
    cfg: &'a ModelConfig,
    w: &'a Weights,
    kv: DType,
    pos: &'a Positions,
    layout: Layout,
    scores: AttentionScores,
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

/// Layer `i` with its kind's rotary tables and mask: its weights, then attention (rotated unless a
/// NoPE layer) and the gated MLP, each normed after too where the layout says.
fn layer(
    t: &mut Tracer,
    s: &Shared<'_>,
    i: usize,
    x: &Sym,
    (pk, pv): &(Sym, Sym),
    (rope, mask): (&(Sym, Sym), &Sym),
) -> Result<Sym, TraceError> {
    let (cfg, w) = (s.cfg, s.w);
    let (h, d, width) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads * cfg.head_dim);
    let p = format!("l{i}");
    let norm = |t: &mut Tracer, name: &str, n: usize| {
        let src = canonical::blk(i, &format!("{name}.weight"));
        norm_weight(
            t,
            w,
            &format!("{p}.{name}.weight"),
            &src,
            n,
            cfg.norm_offset,
        )
    };
    let attn_norm = norm(t, "attn_norm", h)?;
    let ffn_norm = norm(t, "ffn_norm", h)?;
    let post = match s.layout.post_norms {
        true => Some((
            norm(t, "post_attention_norm", h)?,
            norm(t, "post_ffw_norm", h)?,
        )),
        false => None,
    };
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
        false => blocks::rotate(t, (&q, &k), rope, s.pos, cfg.rope_interleaved)?,
    };
    let (kv, scores) = (s.kv, s.scores);
    let a = blocks::cache_attention(t, i, (&q, &k, &v), (pk, pv), kv, mask, scores, width)?;
    let mut o = linear(t, "attn.o_proj", &a, &lin.o, None)?;
    if let Some((post_attn, _)) = &post {
        o = t.rms_norm("post_attention_norm", &o, post_attn, cfg.rms_eps)?;
    }
    let x = t.add("attn.residual", x, &o)?;
    let mlp = [&lin.gate, &lin.up, &lin.down];
    let norms = (&ffn_norm, post.as_ref().map(|p| &p.1));
    let x = blocks::gated_mlp(t, &x, norms, mlp, s.layout.gate, cfg.rms_eps)?;
    t.set_scope("");
    Ok(x)
}
