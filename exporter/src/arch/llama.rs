//! Llama, Qwen2 (= Llama with q/k/v biases), Qwen3 (= Llama with an RMSNorm on each head's q and k
//! before the rotation), SmolLM3 (= Llama with some layers that apply no rotation), Mistral (= Llama
//! whose attention may be a sliding window) and Phi-3 (= Llama with LongRoPE tables; its fused
//! projections are split by the reader): the step graph of docs/GRAPH.md.

use bytes::Bytes;
use onestep_format::contract;
use onestep_format::graph::{DType, Graph};

use super::{add_matrix, embedding, linear, rope_tables, token_choice, ArchOptions, Weights};
use crate::source::{canonical, ModelConfig};
use crate::trace::{SDim, Sym, TraceError, Tracer};

use SDim::N;
const T: SDim = SDim::T(0);

fn f32_bytes(v: &[f32]) -> Bytes {
    Bytes::from(bytemuck::cast_slice::<f32, u8>(v).to_vec())
}

/// Builds the llama/qwen2 step graph.
pub fn build(cfg: &ModelConfig, w: &Weights, opts: &ArchOptions) -> Result<Graph, TraceError> {
    let (h, nh, kvh, d, v) = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    );
    let s = opts.max_cache;
    if kvh == 0 || nh % kvh != 0 || d % 2 != 0 || s == 0 {
        return Err(TraceError::Model(format!(
            "config: {nh} heads / {kvh} kv heads / head dim {d} / max cache {s} are not usable"
        )));
    }
    let bias = cfg.attention_bias || cfg.architecture == "qwen2";
    let kv = opts.kv_dtype;
    let mut t = Tracer::new(&format!("{}_step", cfg.architecture));

    // ---- inputs
    let input_ids = t.input(contract::INPUT_IDS, DType::I64, vec![N(1), T])?;
    let position = t.input(contract::POSITION, DType::I64, vec![N(1)])?;
    let mut past = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let shape = vec![N(1), N(kvh), N(s), N(d)];
        past.push((
            t.input(&contract::past_key(i), kv, shape.clone())?,
            t.input(&contract::past_value(i), kv, shape)?,
        ));
    }
    let temperature = t.input(contract::TEMPERATURE, DType::F32, vec![N(1)])?;
    let top_k = t.input(contract::TOP_K, DType::I64, vec![N(1)])?;
    let top_p = t.input(contract::TOP_P, DType::F32, vec![N(1)])?;
    let random_u = t.input(contract::RANDOM_U, DType::F32, vec![N(1)])?;

    // ---- weights shared by the whole graph
    let (cos, sin) = rope_tables(cfg, s);
    let cos = t.weight("rope.cos", DType::F32, &[s, d / 2], f32_bytes(&cos))?;
    let sin = t.weight("rope.sin", DType::F32, &[s, d / 2], f32_bytes(&sin))?;
    let embd = add_matrix(&mut t, "token_embd", w.matrix(canonical::TOKEN_EMBD)?)?;

    // ---- positions and mask
    let ids = t.reshape("ids", &input_ids, &[T])?;
    let tn = t.shape("chunk_len", &input_ids, 1, 2)?;
    let tn = t.squeeze("chunk_len_scalar", &tn, &[0])?;
    let pos = t.squeeze("pos", &position, &[0])?;
    let zero = t.const_i64(&[0], true);
    let one = t.const_i64(&[1], true);
    let steps = t.range("steps", &zero, &tn, &one)?;
    let pos_ids_flat = t.add("pos_ids_flat", &steps, &pos)?;
    let pos_ids = t.unsqueeze("pos_ids", &pos_ids_flat, &[0])?;
    let smax = t.const_i64(&[s as i64], true);
    let slots = t.range("mask.slots", &zero, &smax, &one)?;
    let past_ok = t.less("mask.past_valid", &slots, &pos)?;
    let past_ok = t.unsqueeze("mask.past_row", &past_ok, &[0])?;
    let tn1 = t.unsqueeze("mask.t", &tn, &[0])?;
    let s1 = t.const_i64(&[s as i64], false);
    let pshape = t.concat("mask.past_shape", &[&tn1, &s1], 0)?;
    let past_mask = t.expand("mask.past", &past_ok, &pshape)?;
    let krow = t.unsqueeze("mask.key_idx", &steps, &[0])?;
    let qcol = t.unsqueeze("mask.query_idx", &steps, &[1])?;
    let causal = t.less_or_equal("mask.causal", &krow, &qcol)?;
    let (past_mask, causal) = match cfg.sliding_window {
        // mistral: key position k is attended from query position q only if k > q − w (a window
        // as long as the cache changes nothing, so the plain mask stays)
        Some(w) if w < s => {
            let w = t.const_i64(&[w as i64], true);
            let qpos = t.unsqueeze("mask.window.query_pos", &pos_ids_flat, &[1])?;
            let sw = t.add("mask.window.slot_end", &slots, &w)?;
            let sw = t.unsqueeze("mask.window.slot_row", &sw, &[0])?;
            let pin = t.greater("mask.window.past_in", &sw, &qpos)?;
            let past = t.and("mask.window.past", &past_mask, &pin)?;
            let kw = t.add("mask.window.key_end", &krow, &w)?;
            let cin = t.greater("mask.window.chunk_in", &kw, &qcol)?;
            (past, t.and("mask.window.chunk", &causal, &cin)?)
        }
        _ => (past_mask, causal),
    };
    let allowed = t.concat("mask.allowed", &[&past_mask, &causal], 1)?;
    // Additive float mask (0 = attend, -inf = masked): onnxruntime and tract both take it (tract
    // refuses boolean masks in Attention).
    let mzero = t.const_f32(0.0);
    let mninf = t.const_f32(f32::NEG_INFINITY);
    let mask = t.where_("mask", &allowed, &mzero, &mninf)?;

    let mut x = embedding(&mut t, &embd, &ids)?;

    for (i, (pk, pv)) in past.iter().enumerate() {
        let l = |suffix: &str| canonical::blk(i, suffix);
        let p = format!("l{i}");
        // weights of this layer
        let attn_norm = t.weight(
            &format!("{p}.attn_norm.weight"),
            DType::F32,
            &[h],
            w.vector(&l("attn_norm.weight"))?.clone(),
        )?;
        let ffn_norm = t.weight(
            &format!("{p}.ffn_norm.weight"),
            DType::F32,
            &[h],
            w.vector(&l("ffn_norm.weight"))?.clone(),
        )?;
        let wq = add_matrix(
            &mut t,
            &format!("{p}.attn.q_proj"),
            w.matrix(&l("attn_q.weight"))?,
        )?;
        let wk = add_matrix(
            &mut t,
            &format!("{p}.attn.k_proj"),
            w.matrix(&l("attn_k.weight"))?,
        )?;
        let wv = add_matrix(
            &mut t,
            &format!("{p}.attn.v_proj"),
            w.matrix(&l("attn_v.weight"))?,
        )?;
        let wo = add_matrix(
            &mut t,
            &format!("{p}.attn.o_proj"),
            w.matrix(&l("attn_output.weight"))?,
        )?;
        let wg = add_matrix(
            &mut t,
            &format!("{p}.mlp.gate"),
            w.matrix(&l("ffn_gate.weight"))?,
        )?;
        let wu = add_matrix(
            &mut t,
            &format!("{p}.mlp.up"),
            w.matrix(&l("ffn_up.weight"))?,
        )?;
        let wd = add_matrix(
            &mut t,
            &format!("{p}.mlp.down"),
            w.matrix(&l("ffn_down.weight"))?,
        )?;
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
            let mut norm = |name: &str| {
                t.weight(
                    &format!("{p}.attn.{name}.weight"),
                    DType::F32,
                    &[d],
                    w.vector(&l(&format!("attn_{name}.weight")))?.clone(),
                )
            };
            Some((norm("q_norm")?, norm("k_norm")?))
        } else {
            None
        };

        t.set_scope(&p);
        // attention
        let hn = t.rms_norm("attn_norm", &x, &attn_norm, cfg.rms_eps)?;
        let q = linear(&mut t, "attn.q_proj", &hn, &wq, bq.as_ref())?;
        let k = linear(&mut t, "attn.k_proj", &hn, &wk, bk.as_ref())?;
        let vv = linear(&mut t, "attn.v_proj", &hn, &wv, bv.as_ref())?;
        let heads = |t: &mut Tracer, name: &str, y: &Sym, n: usize| -> Result<Sym, TraceError> {
            let r = t.reshape(&format!("{name}.split"), y, &[N(1), T, N(n), N(d)])?;
            t.transpose(name, &r, &[0, 2, 1, 3])
        };
        let q4 = heads(&mut t, "attn.q_heads", &q, nh)?;
        let k4 = heads(&mut t, "attn.k_heads", &k, kvh)?;
        let v4 = heads(&mut t, "attn.v_heads", &vv, kvh)?;
        // qwen3: RMSNorm over each head's dimensions, before the rotation
        let (q4, k4) = match &qk_norm {
            Some((qn, kn)) => (
                t.rms_norm("attn.q_norm", &q4, qn, cfg.rms_eps)?,
                t.rms_norm("attn.k_norm", &k4, kn, cfg.rms_eps)?,
            ),
            None => (q4, k4),
        };
        // smollm3's NoPE layers attend without positions
        let (qr, kr) = if cfg.no_rope_layers.contains(&i) {
            (q4, k4)
        } else {
            let il = cfg.rope_interleaved;
            (
                t.rope("attn.q_rope", &q4, &cos, &sin, &pos_ids, il)?,
                t.rope("attn.k_rope", &k4, &cos, &sin, &pos_ids, il)?,
            )
        };
        let (kall, vall) = if kv == DType::F32 {
            let nk = t.output(&kr, &contract::new_key(i))?;
            let nv = t.output(&v4, &contract::new_value(i))?;
            (
                t.concat("attn.keys", &[pk, &nk], 2)?,
                t.concat("attn.values", &[pv, &nv], 2)?,
            )
        } else {
            let nk = t.cast("attn.new_key", &kr, kv)?;
            let nk = t.output(&nk, &contract::new_key(i))?;
            let nv = t.cast("attn.new_value", &v4, kv)?;
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
        let a = t.attention("attn.sdpa", &qr, &kall, &vall, &mask)?;
        let a = t.transpose("attn.merge", &a, &[0, 2, 1, 3])?;
        let a = t.reshape("attn.merge_flat", &a, &[T, N(nh * d)])?;
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
    let out_norm = t.weight(
        "output_norm.weight",
        DType::F32,
        &[h],
        w.vector(canonical::OUTPUT_NORM)?.clone(),
    )?;
    let out_w = if cfg.tie_word_embeddings {
        embd
    } else {
        add_matrix(&mut t, "output", w.matrix(canonical::OUTPUT)?)?
    };
    let last_idx = t.sub("last_index", &tn, &one)?;
    let last = t.gather("last", &x, &last_idx, 0)?;
    let last = t.unsqueeze("last_row", &last, &[0])?;
    let last = t.rms_norm("final_norm", &last, &out_norm, cfg.rms_eps)?;
    let logits = linear(&mut t, "lm_head", &last, &out_w, None)?;
    if logits.shape != [N(1), N(v)] {
        return Err(TraceError::Model(format!(
            "logits have shape {:?}, vocab size is {v}",
            logits.shape
        )));
    }
    let logits = t.output(&logits, contract::LOGITS)?;
    let next = token_choice(&mut t, &logits, v, &temperature, &top_k, &top_p, &random_u)?;
    t.output(&next, contract::NEXT_TOKEN)?;
    Ok(t.finish())
}
