//! The blocks every architecture's step graph is built from (docs/GRAPH.md): the contract's inputs, the
//! positions and masks, a norm weight, attention over the static cache, and the last position's logits
//! with the in-graph token choice. An architecture file composes these and adds only what is its own.

use bytes::Bytes;
use onestep_format::contract;
use onestep_format::graph::{DType, Graph};

use super::{add_matrix, linear, rope_tables, token_choice, ArchOptions, MatSyms, Weights};
use crate::source::ModelConfig;
use crate::trace::{AttentionScores, SDim, Sym, TraceError, Tracer};

use SDim::N;
const T: SDim = SDim::T(0);

/// f32 values as little-endian bytes (an initializer's data).
pub fn f32_bytes(v: &[f32]) -> Bytes {
    Bytes::from(bytemuck::cast_slice::<f32, u8>(v).to_vec())
}

/// The contract's graph inputs.
pub struct Inputs {
    /// `input_ids` int64 `[1, T]`.
    pub input_ids: Sym,
    /// `position` int64 `[1]`: the cache slot of the chunk's first token.
    pub position: Sym,
    /// Per layer, `past_key_i` and `past_value_i` `[1, kv_heads, max_cache, head_dim]`.
    pub past: Vec<(Sym, Sym)>,
    /// Sampling inputs: `temperature`, `top_k`, `top_p`, `random_u`.
    pub sampling: [Sym; 4],
}

/// Declares the contract's inputs for `cfg` and `opts`, checking the attention shape is usable.
pub fn inputs(t: &mut Tracer, cfg: &ModelConfig, opts: &ArchOptions) -> Result<Inputs, TraceError> {
    let (nh, kvh, d, s) = (
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        opts.max_cache,
    );
    if kvh == 0 || nh % kvh != 0 || d % 2 != 0 || s == 0 {
        return Err(TraceError::Model(format!(
            "config: {nh} heads / {kvh} kv heads / head dim {d} / max cache {s} are not usable"
        )));
    }
    let input_ids = t.input(contract::INPUT_IDS, DType::I64, vec![N(1), T])?;
    let position = t.input(contract::POSITION, DType::I64, vec![N(1)])?;
    let mut past = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let shape = vec![N(1), N(kvh), N(s), N(d)];
        past.push((
            t.input(&contract::past_key(i), opts.kv_dtype, shape.clone())?,
            t.input(&contract::past_value(i), opts.kv_dtype, shape)?,
        ));
    }
    let sampling = [
        t.input(contract::TEMPERATURE, DType::F32, vec![N(1)])?,
        t.input(contract::TOP_K, DType::I64, vec![N(1)])?,
        t.input(contract::TOP_P, DType::F32, vec![N(1)])?,
        t.input(contract::RANDOM_U, DType::F32, vec![N(1)])?,
    ];
    Ok(Inputs {
        input_ids,
        position,
        past,
        sampling,
    })
}

/// The chunk's token ids and positions, and what the masks are built from.
pub struct Positions {
    /// Token ids int64 `[T]`.
    pub ids: Sym,
    /// The chunk length, an int64 scalar.
    pub chunk_len: Sym,
    /// Position ids int64 `[1, T]` (the rotary tables' rows).
    pub pos_ids: Sym,
    pos_flat: Sym,
    slots: Sym,
    steps_row: Sym,
    steps_col: Sym,
    past_mask: Sym,
    causal: Sym,
    max_cache: usize,
}

/// The chunk's ids and positions from the inputs.
pub fn positions(t: &mut Tracer, x: &Inputs, max_cache: usize) -> Result<Positions, TraceError> {
    let ids = t.reshape("ids", &x.input_ids, &[T])?;
    let tn = t.shape("chunk_len", &x.input_ids, 1, 2)?;
    let tn = t.squeeze("chunk_len_scalar", &tn, &[0])?;
    let pos = t.squeeze("pos", &x.position, &[0])?;
    let zero = t.const_i64(&[0], true);
    let one = t.const_i64(&[1], true);
    let steps = t.range("steps", &zero, &tn, &one)?;
    let pos_flat = t.add("pos_ids_flat", &steps, &pos)?;
    let pos_ids = t.unsqueeze("pos_ids", &pos_flat, &[0])?;
    let smax = t.const_i64(&[max_cache as i64], true);
    let slots = t.range("mask.slots", &zero, &smax, &one)?;
    let past_ok = t.less("mask.past_valid", &slots, &pos)?;
    let past_ok = t.unsqueeze("mask.past_row", &past_ok, &[0])?;
    let tn1 = t.unsqueeze("mask.t", &tn, &[0])?;
    let s1 = t.const_i64(&[max_cache as i64], false);
    let pshape = t.concat("mask.past_shape", &[&tn1, &s1], 0)?;
    let past_mask = t.expand("mask.past", &past_ok, &pshape)?;
    let steps_row = t.unsqueeze("mask.key_idx", &steps, &[0])?;
    let steps_col = t.unsqueeze("mask.query_idx", &steps, &[1])?;
    let causal = t.less_or_equal("mask.causal", &steps_row, &steps_col)?;
    Ok(Positions {
        ids,
        chunk_len: tn,
        pos_ids,
        pos_flat,
        slots,
        steps_row,
        steps_col,
        past_mask,
        causal,
        max_cache,
    })
}

impl Positions {
    /// The additive attention mask `[T, max_cache + T]` (0 = attend, -inf = masked): past slots before
    /// the position and the chunk causally; with `window = Some(w)`, only keys less than `w` positions
    /// behind the query (key position k is attended from query position q only if k > q − w). A window
    /// as long as the cache changes nothing, so the plain mask is built. Node names start with `name`.
    pub fn mask(
        &self,
        t: &mut Tracer,
        name: &str,
        window: Option<usize>,
    ) -> Result<Sym, TraceError> {
        let (past, causal) = match window {
            Some(w) if w < self.max_cache => {
                let w = t.const_i64(&[w as i64], true);
                let qpos = t.unsqueeze(&format!("{name}.query_pos"), &self.pos_flat, &[1])?;
                let sw = t.add(&format!("{name}.slot_end"), &self.slots, &w)?;
                let sw = t.unsqueeze(&format!("{name}.slot_row"), &sw, &[0])?;
                let pin = t.greater(&format!("{name}.past_in"), &sw, &qpos)?;
                let past = t.and(&format!("{name}.past"), &self.past_mask, &pin)?;
                let kw = t.add(&format!("{name}.key_end"), &self.steps_row, &w)?;
                let cin = t.greater(&format!("{name}.chunk_in"), &kw, &self.steps_col)?;
                (past, t.and(&format!("{name}.chunk"), &self.causal, &cin)?)
            }
            _ => (self.past_mask.clone(), self.causal.clone()),
        };
        let allowed = t.concat(&format!("{name}.allowed"), &[&past, &causal], 1)?;
        // Additive float mask: onnxruntime and tract both take it (tract refuses boolean masks in
        // Attention).
        let zero = t.const_f32(0.0);
        let ninf = t.const_f32(f32::NEG_INFINITY);
        t.where_(name, &allowed, &zero, &ninf)
    }
}

/// A norm weight `[n]` named `name` from the canonical vector `src`, plus `offset` on every element
/// (norms that scale by `1 + w`, read from a checkpoint that stores `w`).
pub fn norm_weight(
    t: &mut Tracer,
    w: &Weights,
    name: &str,
    src: &str,
    n: usize,
    offset: f32,
) -> Result<Sym, TraceError> {
    let bytes = w.vector(src)?.clone();
    let bytes = if offset == 0.0 {
        bytes
    } else {
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) + offset)
            .collect();
        f32_bytes(&v)
    };
    t.weight(name, DType::F32, &[n], bytes)
}

/// Rotary tables `{name}.cos`, `{name}.sin` `[max_cache, head_dim/2]` for `cfg`'s base and scaling.
pub fn rope_weights(
    t: &mut Tracer,
    name: &str,
    cfg: &ModelConfig,
    s: usize,
) -> Result<(Sym, Sym), TraceError> {
    let half = cfg.head_dim / 2;
    let (cos, sin) = rope_tables(cfg, s);
    let cos = t.weight(
        &format!("{name}.cos"),
        DType::F32,
        &[s, half],
        f32_bytes(&cos),
    )?;
    let sin = t.weight(
        &format!("{name}.sin"),
        DType::F32,
        &[s, half],
        f32_bytes(&sin),
    )?;
    Ok((cos, sin))
}

/// A layer's seven linear layers, their initializers named `l{i}.attn.{q,k,v,o}_proj.*` and
/// `l{i}.mlp.{gate,up,down}.*` and added in that order.
pub struct Linears {
    /// Query projection.
    pub q: MatSyms,
    /// Key projection.
    pub k: MatSyms,
    /// Value projection.
    pub v: MatSyms,
    /// Attention output projection.
    pub o: MatSyms,
    /// MLP gate.
    pub gate: MatSyms,
    /// MLP up projection.
    pub up: MatSyms,
    /// MLP down projection.
    pub down: MatSyms,
}

/// Layer `i`'s [`Linears`] from the canonical `blk.{i}.*` matrices.
pub fn linears(t: &mut Tracer, w: &Weights, i: usize) -> Result<Linears, TraceError> {
    let mut mat = |name: &str, src: &str| {
        let m = w.matrix(&crate::source::canonical::blk(i, src))?;
        add_matrix(t, &format!("l{i}.{name}"), m)
    };
    Ok(Linears {
        q: mat("attn.q_proj", "attn_q.weight")?,
        k: mat("attn.k_proj", "attn_k.weight")?,
        v: mat("attn.v_proj", "attn_v.weight")?,
        o: mat("attn.o_proj", "attn_output.weight")?,
        gate: mat("mlp.gate", "ffn_gate.weight")?,
        up: mat("mlp.up", "ffn_up.weight")?,
        down: mat("mlp.down", "ffn_down.weight")?,
    })
}

/// `q` and `k` rotated by the tables `(cos, sin)` at the chunk's positions (adjacent pairs where
/// `interleaved`, else halves): nodes `attn.q_rope`, `attn.k_rope`.
pub fn rotate(
    t: &mut Tracer,
    (q, k): (&Sym, &Sym),
    (cos, sin): &(Sym, Sym),
    pos: &Positions,
    interleaved: bool,
) -> Result<(Sym, Sym), TraceError> {
    let ids = &pos.pos_ids;
    Ok((
        t.rope("attn.q_rope", q, cos, sin, ids, interleaved)?,
        t.rope("attn.k_rope", k, cos, sin, ids, interleaved)?,
    ))
}

/// The gated MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// SiLU (`g·sigmoid(g)`): nodes `mlp.gate_sigmoid`, `mlp.silu`.
    Silu,
    /// GeLU with the tanh approximation: node `mlp.gelu`.
    GeluTanh,
}

/// The MLP sub-layer with its residual: `x + down(act(gate(n)) · up(n))` with `n = RMSNorm(x)` (node
/// `ffn_norm`), the MLP's output normed again where `post_norm` is given (node `post_ffw_norm`). Nodes
/// `mlp.gate`, `mlp.up`, the gate's, `mlp.gated`, `mlp.down`, `mlp.residual`.
pub fn gated_mlp(
    t: &mut Tracer,
    x: &Sym,
    (norm, post_norm): (&Sym, Option<&Sym>),
    [wg, wu, wd]: [&MatSyms; 3],
    gate: Gate,
    eps: f32,
) -> Result<Sym, TraceError> {
    let h = t.rms_norm("ffn_norm", x, norm, eps)?;
    let g = linear(t, "mlp.gate", &h, wg, None)?;
    let u = linear(t, "mlp.up", &h, wu, None)?;
    let act = match gate {
        Gate::Silu => {
            let sg = t.sigmoid("mlp.gate_sigmoid", &g)?;
            t.mul("mlp.silu", &g, &sg)?
        }
        Gate::GeluTanh => t.gelu_tanh("mlp.gelu", &g)?,
    };
    let gu = t.mul("mlp.gated", &act, &u)?;
    let down = linear(t, "mlp.down", &gu, wd, None)?;
    let down = match post_norm {
        Some(n) => t.rms_norm("post_ffw_norm", &down, n, eps)?,
        None => down,
    };
    t.add("mlp.residual", x, &down)
}

/// Splits `[T, n·d]` into heads `[1, n, T, d]`; nodes `{name}.split` and `name`.
fn heads_of(t: &mut Tracer, name: &str, y: &Sym, n: usize, d: usize) -> Result<Sym, TraceError> {
    let r = t.reshape(&format!("{name}.split"), y, &[N(1), T, N(n), N(d)])?;
    t.transpose(name, &r, &[0, 2, 1, 3])
}

/// The attention's inputs as heads: `x` through the q, k and v projections `w` (with biases where
/// given), split into heads `[1, n, T, d]` (`n` = `heads.0` for q, `heads.1` for k and v), then q and
/// k RMS-normalized per head where `qk_norm` has their weights (qwen3, gemma3; before the rotation).
/// Nodes `attn.{q,k,v}_proj`, `attn.{q,k,v}_heads`, `attn.{q,k}_norm`.
pub fn qkv_heads(
    t: &mut Tracer,
    x: &Sym,
    w: [&MatSyms; 3],
    bias: [Option<&Sym>; 3],
    (heads, kv_heads, d): (usize, usize, usize),
    qk_norm: Option<&(Sym, Sym)>,
    eps: f32,
) -> Result<[Sym; 3], TraceError> {
    let q = linear(t, "attn.q_proj", x, w[0], bias[0])?;
    let k = linear(t, "attn.k_proj", x, w[1], bias[1])?;
    let v = linear(t, "attn.v_proj", x, w[2], bias[2])?;
    let q = heads_of(t, "attn.q_heads", &q, heads, d)?;
    let k = heads_of(t, "attn.k_heads", &k, kv_heads, d)?;
    let v = heads_of(t, "attn.v_heads", &v, kv_heads, d)?;
    Ok(match qk_norm {
        Some((qn, kn)) => [
            t.rms_norm("attn.q_norm", &q, qn, eps)?,
            t.rms_norm("attn.k_norm", &k, kn, eps)?,
            v,
        ],
        None => [q, k, v],
    })
}

/// Attention of layer `i` over its static cache: the new keys and values (`[1, kvh, T, d]`, rotated
/// where the architecture rotates) become the layer's `new_key_i`/`new_value_i` outputs (in the cache
/// dtype), the past and new rows are concatenated, attended with `q` under `mask`, and the heads merged
/// back to `[T, nh·d]`.
#[allow(clippy::too_many_arguments)]
pub fn cache_attention(
    t: &mut Tracer,
    i: usize,
    (q, k, v): (&Sym, &Sym, &Sym),
    (pk, pv): (&Sym, &Sym),
    kv: DType,
    mask: &Sym,
    scores: AttentionScores,
    width: usize,
) -> Result<Sym, TraceError> {
    let (kall, vall) = if kv == DType::F32 {
        let nk = t.output(k, &contract::new_key(i))?;
        let nv = t.output(v, &contract::new_value(i))?;
        (
            t.concat("attn.keys", &[pk, &nk], 2)?,
            t.concat("attn.values", &[pv, &nv], 2)?,
        )
    } else {
        let nk = t.cast("attn.new_key", k, kv)?;
        let nk = t.output(&nk, &contract::new_key(i))?;
        let nv = t.cast("attn.new_value", v, kv)?;
        let nv = t.output(&nv, &contract::new_value(i))?;
        let pkf = t.cast("attn.past_key_f32", pk, DType::F32)?;
        let pvf = t.cast("attn.past_value_f32", pv, DType::F32)?;
        let nkf = t.cast("attn.new_key_f32", &nk, DType::F32)?;
        let nvf = t.cast("attn.new_value_f32", &nv, DType::F32)?;
        (
            t.concat("attn.keys", &[&pkf, &nkf], 2)?,
            t.concat("attn.values", &[&pvf, &nvf], 2)?,
        )
    };
    let a = t.attention_with("attn.sdpa", q, &kall, &vall, Some(mask), scores)?;
    let a = t.transpose("attn.merge", &a, &[0, 2, 1, 3])?;
    t.reshape("attn.merge_flat", &a, &[T, N(width)])
}

/// The output head: the chunk's last row of `x`, normed (`out_norm`, `eps`), through `out_w` to logits
/// `[1, vocab]`, optionally soft-capped (`c·tanh(z/c)`, gemma2), then the `logits` and `next_token`
/// outputs. Finishes the graph.
pub fn logits_and_choice(
    mut t: Tracer,
    cfg: &ModelConfig,
    (x, pos): (&Sym, &Positions),
    out_norm: &Sym,
    out_w: &MatSyms,
    softcap: Option<f32>,
    sampling: &[Sym; 4],
) -> Result<Graph, TraceError> {
    let v = cfg.vocab_size;
    let one = t.const_i64(&[1], true);
    let last_idx = t.sub("last_index", &pos.chunk_len, &one)?;
    let last = t.gather("last", x, &last_idx, 0)?;
    let last = t.unsqueeze("last_row", &last, &[0])?;
    let last = t.rms_norm("final_norm", &last, out_norm, cfg.rms_eps)?;
    let mut logits = linear(&mut t, "lm_head", &last, out_w, None)?;
    if logits.shape != [N(1), N(v)] {
        return Err(TraceError::Model(format!(
            "logits have shape {:?}, vocab size is {v}",
            logits.shape
        )));
    }
    if let Some(c) = softcap {
        let inv = t.const_f32(1.0 / c);
        let cap = t.const_f32(c);
        let z = t.mul("lm_head.softcap_in", &logits, &inv)?;
        let z = t.tanh("lm_head.softcap_tanh", &z)?;
        logits = t.mul("lm_head.softcap", &z, &cap)?;
    }
    let logits = t.output(&logits, contract::LOGITS)?;
    let [temperature, top_k, top_p, random_u] = sampling;
    let next = token_choice(&mut t, &logits, v, temperature, top_k, top_p, random_u)?;
    t.output(&next, contract::NEXT_TOKEN)?;
    Ok(t.finish())
}

/// The output layer: the embedding table when tied, else `output.weight`.
pub fn output_matrix(
    t: &mut Tracer,
    cfg: &ModelConfig,
    w: &Weights,
    embd: &MatSyms,
) -> Result<MatSyms, TraceError> {
    if cfg.tie_word_embeddings {
        Ok(embd.clone())
    } else {
        add_matrix(t, "output", w.matrix(crate::source::canonical::OUTPUT)?)
    }
}
