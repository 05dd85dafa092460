//! The CPU backend ([`CpuBackend`]) and its step executor: runs a plan's steps over a value environment — generic nodes through
//! [`ops::run_node`], the planner's fused steps (linear layers, SiLU gate, embedding, token choice,
//! attention over the host KV pages) through the kernels of this folder. The GPU backend runs the same
//! function for the steps it leaves on the CPU (and in its dry run at load).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::backend::cpu::attention::{self, AttnShape};
use crate::backend::cpu::linear::{self, Activations, Precision, QuantCache};
use crate::backend::cpu::linear_q8::QIsa;
use crate::backend::cpu::repack::PackedSet;
use crate::backend::cpu::{attention_plain, gelu, linear_q8, misc, ops};
use crate::backend::mask::Attended;
use crate::backend::{Backend, SeqState, StepCall};
use crate::contract;
use crate::error::{Error, Result};
use crate::graph::{Attr, DType};
use crate::kv::{KvOptions, KvStats, PagedCache};
use crate::plan::{
    Gate, GateAct, LinearGroup, NormResidual, Plan, Residual, Rope, RoundTrip, Step, ValId,
};
use crate::tensor::Tensor;

/// The output slot of the linear layer whose result becomes the graph's `logits` through view ops
/// only (the output layer). With [`Precision::Fast`] it runs on two-digit activations
/// ([`Activations::Int8x2`]), as close to exact math as f32 decoding: its output is what the token
/// choice reads, and 8-bit activations there moved SmolLM2's logits more than anywhere else (median
/// |Δlogit| against exact math 0.134 → 0.130 with it exact). The two digits keep that fidelity at
/// the integer kernel's speed (an f32 pass over Gemma 3's 262,144-row output layer costs 10 ms a
/// step on 2 cores, the integer pass 8).
pub(crate) fn logits_linear(plan: &Plan) -> Option<ValId> {
    let mut v = *plan.outputs.get(contract::LOGITS)?;
    loop {
        let producer = plan.steps.iter().find_map(|s| match s {
            Step::Linear { out, .. } if *out == v => Some(s),
            Step::Node { outputs, .. } if outputs.contains(&v) => Some(s),
            Step::LinearGroup(g) if g.gate.is_none() => g
                .members
                .iter()
                .find(|m| matches!(m, Step::Linear { out, .. } if *out == v)),
            _ => None,
        })?;
        match producer {
            Step::Linear { out, .. } => return Some(*out),
            Step::Node { node, inputs, .. }
                if crate::plan::is_view_op(&plan.graph.nodes[*node].op) =>
            {
                v = (*inputs.first()?)?;
            }
            _ => return None,
        }
    }
}

/// Rows up to which a [`Precision::Fast`] linear takes two-digit activations.
///
/// A decode step's products (one row, a few) read each weight once and do little arithmetic per
/// byte: memory bounds them, and a second int8 digit of the activations ([`Activations::Int8x2`],
/// a second `vpdpbusd` on weight codes already in registers) costs next to nothing there, while it
/// takes the activations' rounding from 1/254 of each block's largest value to 1/64,516. Measured
/// on SmolLM2's fixtures (tests/peers/test_fast_precision.py): median |Δlogit| against exact math
/// 0.13 → 0.002, top-1 agreement 275 → 278 of 278, and decode no slower (EPYC, 2 threads). Longer
/// products (prefill chunks) are compute-bound and keep one digit.
pub(crate) const TWO_DIGIT_ROWS: usize = 4;

/// The kernel-level activations of a linear with `rows` input rows at `precision`; `output` for the
/// output layer ([`logits_linear`]), which under `Fast` always takes two digits (its logits are what
/// the token choice reads).
fn activations(precision: Precision, output: bool, rows: usize) -> Activations {
    match precision {
        Precision::Exact => Activations::F32,
        Precision::Fast if output || rows <= TWO_DIGIT_ROWS => Activations::Int8x2,
        Precision::Fast => Activations::Int8,
    }
}

/// What the CPU executor keeps across the plan steps of one model step.
pub(crate) struct CpuRun {
    /// What each mask value lets attend (prefix, window), found once a step.
    prefixes: Vec<(ValId, Option<Attended>)>,
    /// How the linear layers multiply.
    precision: Precision,
    /// The output layer's output slot: exact, or two-digit activations under `Fast` ([`logits_linear`]).
    exact_out: Option<ValId>,
    /// The 8-bit activations of the last input a fast linear read (value slots are assigned once a
    /// step, so the slot names the content).
    quant: QuantCache,
    /// The linear layers' packed forms (`repack.rs`; empty under `Exact`).
    packed: Arc<PackedSet>,
}

impl CpuRun {
    pub(crate) fn new(precision: Precision, exact_out: Option<ValId>) -> Self {
        CpuRun {
            prefixes: Vec::new(),
            precision,
            exact_out,
            quant: QuantCache::default(),
            packed: Arc::default(),
        }
    }

    /// This run reading the packed forms of `packed`.
    pub(crate) fn with_packed(mut self, packed: Arc<PackedSet>) -> Self {
        self.packed = packed;
        self
    }

    /// This run's integer products on `qisa` (`None`: this CPU's best).
    pub(crate) fn on(mut self, qisa: Option<QIsa>) -> Self {
        self.quant = QuantCache::on(qisa);
        self
    }
}

/// Runs one plan step on the CPU.
pub(crate) fn exec_step(
    plan: &Plan,
    s: &Step,
    env: &mut [Option<Tensor>],
    caches: Option<(&PagedCache, usize)>,
    run: &mut CpuRun,
) -> Result<()> {
    match s {
        Step::Node { .. } => node_step(plan, s, env),
        Step::Linear { .. } => linear_step(plan, s, env, run),
        Step::Embedding(_) => embedding_step(plan, s, env, run),
        Step::TokenChoice(_) => choice_step(plan, s, env),
        Step::Gate(sg) => gate_step(plan, sg, env),
        Step::LinearGroup(g) => group_step(plan, g, env, run),
        Step::Rope(r) => rope_step(plan, r, env),
        Step::NormResidual(nr) => norm_residual_step(plan, nr, env),
        Step::RoundTrip(r) => round_trip_step(plan, r, env),
        Step::CacheAttention {
            inputs: Some(a), ..
        } => {
            // The steps taken in, then the attention; their values only it read are dropped.
            for t in &a.steps {
                exec_step(plan, t, env, caches, run)?;
            }
            attention_step(plan, s, env, caches, run)?;
            for v in a.steps.iter().flat_map(|t| t.writes()) {
                if !a.writes.contains(&v) {
                    env[v] = None;
                }
            }
            Ok(())
        }
        Step::CacheAttention { .. } => attention_step(plan, s, env, caches, run),
    }
}

/// Value `v`: computed into `env`, or a constant.
fn val(plan: &Plan, env: &[Option<Tensor>], v: ValId) -> Result<Tensor> {
    env[v]
        .clone()
        .or_else(|| plan.consts[v].clone())
        .ok_or_else(|| Error::tensor(&plan.names[v], "value used before it was computed"))
}

/// A generic node: its op on its inputs.
fn node_step(plan: &Plan, s: &Step, env: &mut [Option<Tensor>]) -> Result<()> {
    let Step::Node {
        node,
        inputs,
        outputs,
    } = s
    else {
        return Err(Error::internal("node_step: another step kind"));
    };
    let n = &plan.graph.nodes[*node];
    let args: Vec<Option<Tensor>> = inputs
        .iter()
        .map(|v| v.map(|v| val(plan, env, v)).transpose())
        .collect::<Result<_>>()?;
    let refs: Vec<Option<&Tensor>> = args.iter().map(|a| a.as_ref()).collect();
    // Generic ops with a kernel of their own, where their inputs fit it: ONNX `Attention` on rank-4
    // f32 Q/K/V (attention_plain.rs), the exact `Gelu` on f32 (gelu.rs). Everything else, and what
    // those kernels decline, runs through the generic op (ops/, their reference).
    let fast = attention_plain::try_node(n, &refs).or_else(|| gelu::try_node(n, &refs));
    let outs = match fast {
        Some(t) => vec![t],
        None => ops::run_node(n, &refs)?,
    };
    for (&o, t) in outputs.iter().zip(outs) {
        env[o] = Some(t);
    }
    Ok(())
}

/// A linear layer, with its bias and residual (the output layer exact under `fast`).
fn linear_step(plan: &Plan, s: &Step, env: &mut [Option<Tensor>], run: &mut CpuRun) -> Result<()> {
    let Step::Linear {
        node,
        x,
        w,
        bias,
        residual,
        out,
    } = s
    else {
        return Err(Error::internal("linear_step: another step kind"));
    };
    let n = &plan.graph.nodes[*node];
    let xt = val(plan, env, *x)?;
    let xv = xt.as_f32(&plan.names[*x])?;
    let k = *xt.shape.last().unwrap_or(&0);
    if k != w.k {
        return Err(Error::node(
            &n.name,
            &n.op,
            format!("input has K = {k}, weights have K = {}", w.k),
        ));
    }
    let m = xv.len() / k.max(1);
    let mut shape = xt.shape.clone();
    if let Some(l) = shape.last_mut() {
        *l = w.n;
    }
    let mut o = Tensor::zeros(DType::F32, &shape);
    let acts = activations(run.precision, run.exact_out == Some(*out), m);
    let bias = bias.as_ref().map(|b| b.typed::<f32>());
    match run.packed.get(w) {
        Some(p) => linear::linear_cached(
            xv,
            m,
            &p.view(),
            bias,
            o.typed_mut(),
            acts,
            &mut run.quant,
            *x,
        )
        .map_err(|e| e.to_string()),
        None => w.forward_with(xv, m, bias, o.typed_mut(), acts, &mut run.quant, *x),
    }
    .map_err(|e| Error::node(&n.name, &n.op, e))?;
    if let Some(r) = residual {
        o = add_residual(plan, o, &val(plan, env, r.other)?, r)?;
    }
    env[*out] = Some(o);
    Ok(())
}

/// The token embedding: the rows the ids pick, decoded — from the packed copy where the table (a
/// tied output layer's) was repacked: the file's pages of it were handed back at load, and reading
/// rows there would fault them in again, 64 KB around each row (Linux's fault-around), until a
/// long chat held most of a large vocabulary's table twice (Gemma 3: +52 MB after one benchmark).
/// Packed values are lossless: a constant zero point decodes bit for bit as the file's; a per-block
/// `s·z` (GGUF Q4_1) within the roundings the linear kernels already take under `Fast`.
fn embedding_step(plan: &Plan, s: &Step, env: &mut [Option<Tensor>], run: &CpuRun) -> Result<()> {
    let Step::Embedding(e) = s else {
        return Err(Error::internal("embedding_step: another step kind"));
    };
    let n = &plan.graph.nodes[e.node];
    let ids = val(plan, env, e.ids)?;
    let idv = ids.to_i64_vec(&plan.names[e.ids])?;
    let (rows, k) = (e.w.n, e.w.k);
    let mut shape = ids.shape.clone();
    shape.push(k);
    let mut o = Tensor::zeros(DType::F32, &shape);
    let packed = run.packed.get(&e.w).map(|p| p.view());
    for (&id, row) in idv.iter().zip(o.typed_mut::<f32>().chunks_mut(k.max(1))) {
        // Negative ids count from the end, as `Gather` has them.
        let r = if id < 0 { id + rows as i64 } else { id };
        if r < 0 || r >= rows as i64 {
            return Err(Error::node(
                &n.name,
                &n.op,
                format!("token id {id} is out of range for the {rows}-row embedding"),
            ));
        }
        match &packed {
            Some(p) => p.decode_row(r as usize, row),
            None => e.w.decode_row(r as usize, row),
        }
    }
    env[e.out] = Some(o);
    Ok(())
}

/// The token choice after its `TopK`.
fn choice_step(plan: &Plan, s: &Step, env: &mut [Option<Tensor>]) -> Result<()> {
    let Step::TokenChoice(c) = s else {
        return Err(Error::internal("choice_step: another step kind"));
    };
    let n = &plan.graph.nodes[c.node];
    let vals = val(plan, env, c.vals)?;
    let idx = val(plan, env, c.idx)?;
    let k = val(plan, env, c.k)?.scalar_i64(&plan.names[c.k])?;
    let scalar = |v: ValId| -> Result<f32> {
        let t = val(plan, env, v)?;
        match (t.dtype, t.numel()) {
            (DType::F32, 1) => Ok(t.typed::<f32>()[0]),
            _ => Err(Error::node(
                &n.name,
                &n.op,
                format!("`{}` must be one f32", plan.names[v]),
            )),
        }
    };
    let (top_p, u) = (scalar(c.top_p)?, scalar(c.u)?);
    let row = vals.as_f32(&plan.names[c.vals])?;
    if vals.shape != [1, row.len()]
        || idx.shape != vals.shape
        || idx.dtype != DType::I64
        || k != row.len() as i64
    {
        return Err(Error::node(
            &n.name,
            &n.op,
            format!(
                "the token choice takes one row of k = {k} values and indices, got {:?} and {:?}",
                vals.shape, idx.shape
            ),
        ));
    }
    let j = misc::nucleus_pick(row, top_p, u)
        .map_err(|e| Error::node(&n.name, &n.op, e.to_string()))?;
    env[c.out] = Some(Tensor::i64(&c.out_shape, &[idx.typed::<i64>()[j]]));
    Ok(())
}

/// A linear group: its norm, its members, its gate, in turn; the values only the group reads are
/// dropped after it.
fn group_step(
    plan: &Plan,
    g: &LinearGroup,
    env: &mut [Option<Tensor>],
    run: &mut CpuRun,
) -> Result<()> {
    if let Some(nm) = &g.norm {
        let (x, scale) = (val(plan, env, nm.x)?, val(plan, env, nm.scale)?);
        let y = ops::run_node(&plan.graph.nodes[nm.node], &[Some(&x), Some(&scale)])?;
        env[g.x] = y.into_iter().next();
    }
    if !members_at_once(plan, g, env, run)? {
        for m in &g.members {
            linear_step(plan, m, env, run)?;
        }
    }
    if let Some(sg) = &g.gate {
        gate_step(plan, sg, env)?;
        for (_, out) in g.linears() {
            env[out] = None;
        }
    }
    if g.norm.is_some() {
        env[g.x] = None;
    }
    Ok(())
}

/// A decode step's group members as one parallel region ([`linear::linear_group_t1`]): one token row,
/// the integer path, no member the output layer. Whether it ran them (else the caller runs each).
fn members_at_once(
    plan: &Plan,
    g: &LinearGroup,
    env: &mut [Option<Tensor>],
    run: &mut CpuRun,
) -> Result<bool> {
    let acts = activations(run.precision, false, 1);
    if acts == Activations::F32 || g.members.len() < 2 {
        return Ok(false);
    }
    let xt = val(plan, env, g.x)?;
    let xv = xt.as_f32(&plan.names[g.x])?;
    let packed = Arc::clone(&run.packed);
    let mut ws = Vec::new();
    let mut biases = Vec::new();
    let mut outs = Vec::new();
    for m in &g.members {
        let Step::Linear {
            w, bias, out, x, ..
        } = m
        else {
            return Ok(false);
        };
        let Some(kw) = packed.view_of(w) else {
            return Ok(false);
        };
        if *x != g.x || w.k != xv.len() || run.exact_out == Some(*out) {
            return Ok(false);
        }
        ws.push(kw);
        biases.push(bias.as_ref().map(|b| b.typed::<f32>()));
        let mut shape = xt.shape.clone();
        if let Some(l) = shape.last_mut() {
            *l = w.n;
        }
        outs.push((*out, Tensor::zeros(DType::F32, &shape)));
    }
    let wrefs: Vec<&linear::Weights> = ws.iter().collect();
    let mut orefs: Vec<&mut [f32]> = outs.iter_mut().map(|(_, o)| o.typed_mut()).collect();
    let ran = linear::linear_group_t1(xv, &wrefs, &biases, &mut orefs, acts, (&mut run.quant, g.x))
        .map_err(|e| match g.members.first() {
            Some(Step::Linear { node, .. }) => {
                let n = &plan.graph.nodes[*node];
                Error::node(&n.name, &n.op, e.to_string())
            }
            _ => Error::internal(e.to_string()),
        })?;
    if ran {
        for (out, o) in outs {
            env[out] = Some(o);
        }
    }
    Ok(ran)
}

/// The rotary reading its input through the transpose before it: the two nodes' ops in turn.
fn rope_step(plan: &Plan, r: &Rope, env: &mut [Option<Tensor>]) -> Result<()> {
    let nodes = &plan.graph.nodes;
    let x = val(plan, env, r.x)?;
    let mut t = ops::run_node(&nodes[r.transpose], &[Some(&x)])?;
    if let Some(n) = &r.norm {
        let scale = val(plan, env, n.scale)?;
        t = ops::run_node(&nodes[n.node], &[t.first(), Some(&scale)])?;
    }
    let rest: Vec<Option<Tensor>> = r
        .rest
        .iter()
        .map(|v| v.map(|v| val(plan, env, v)).transpose())
        .collect::<Result<_>>()?;
    let args: Vec<Option<&Tensor>> = std::iter::once(t.first())
        .chain(rest.iter().map(Option::as_ref))
        .collect();
    env[r.out] = ops::run_node(&nodes[r.node], &args)?.into_iter().next();
    Ok(())
}

/// An RMS norm and the residual `Add` after it: the norm's op, then the add (in place where the shapes
/// agree, else the `Add`'s op).
fn norm_residual_step(plan: &Plan, nr: &NormResidual, env: &mut [Option<Tensor>]) -> Result<()> {
    let (x, scale) = (val(plan, env, nr.x)?, val(plan, env, nr.norm.scale)?);
    let node = &plan.graph.nodes[nr.norm.node];
    let y = ops::run_node(node, &[Some(&x), Some(&scale)])?
        .into_iter()
        .next()
        .ok_or_else(|| Error::node(&node.name, &node.op, "no output"))?;
    let other = val(plan, env, nr.residual.other)?;
    env[nr.out] = Some(add_residual(plan, y, &other, &nr.residual)?);
    Ok(())
}

/// The new cache rows' f16 round trip: the cache output and the rows read back, the two casts' ops.
fn round_trip_step(plan: &Plan, r: &RoundTrip, env: &mut [Option<Tensor>]) -> Result<()> {
    let nodes = &plan.graph.nodes;
    let x = val(plan, env, r.x)?;
    let half = ops::run_node(&nodes[r.first], &[Some(&x)])?;
    env[r.out] = ops::run_node(&nodes[r.node], &[half.first()])?
        .into_iter()
        .next();
    env[r.half] = half.into_iter().next();
    Ok(())
}

/// The gated MLP's activation, `act(g)·u`.
fn gate_step(plan: &Plan, sg: &Gate, env: &mut [Option<Tensor>]) -> Result<()> {
    let n = &plan.graph.nodes[sg.node];
    let (g, u) = (val(plan, env, sg.g)?, val(plan, env, sg.u)?);
    if g.dtype != DType::F32 || g.shape != u.shape || u.dtype != DType::F32 {
        // Broadcasting or other dtypes: the nodes as written (the outer Mul's node standing in for
        // the activation's).
        let act = |op: &str, attrs| crate::graph::Node {
            op: op.into(),
            attrs,
            ..n.clone()
        };
        let a = match sg.act {
            GateAct::Silu => {
                let sig = ops::run_node(&act("Sigmoid", Default::default()), &[Some(&g)])?;
                ops::run_node(n, &[Some(&g), Some(&sig[0])])?
            }
            GateAct::GeluTanh => {
                let tanh = [("approximate".to_string(), Attr::Str("tanh".into()))];
                ops::run_node(&act("Gelu", tanh.into_iter().collect()), &[Some(&g)])?
            }
        };
        let o = ops::run_node(n, &[Some(&a[0]), Some(&u)])?;
        env[sg.out] = o.into_iter().next();
        return Ok(());
    }
    let mut o = Tensor::zeros(DType::F32, &g.shape);
    let kernel = match sg.act {
        GateAct::Silu => misc::silu_gate,
        GateAct::GeluTanh => misc::gelu_gate,
    };
    kernel(g.typed(), u.typed(), o.typed_mut())
        .map_err(|e| Error::node(&n.name, &n.op, e.to_string()))?;
    env[sg.out] = Some(o);
    Ok(())
}

/// Attention over the sequence's host pages plus the chunk's new rows.
fn attention_step(
    plan: &Plan,
    s: &Step,
    env: &mut [Option<Tensor>],
    caches: Option<(&PagedCache, usize)>,
    run: &mut CpuRun,
) -> Result<()> {
    let Step::CacheAttention {
        node,
        q,
        past,
        new,
        mask,
        out,
        tokens_first,
        ..
    } = s
    else {
        return Err(Error::internal("attention_step: another step kind"));
    };
    let n = &plan.graph.nodes[*node];
    let err = |d: String| Error::node(&n.name, &n.op, d);
    let qt = val(plan, env, *q)?;
    let nk = val(plan, env, new[0])?;
    let nv = val(plan, env, new[1])?;
    let (pages, len) =
        caches.ok_or_else(|| err("the cache attention needs the sequence's cache".into()))?;
    let (ck, cv) = match (pages.caches.get(past[0]), pages.caches.get(past[1])) {
        (Some(k), Some(v)) => (k, v),
        _ => return Err(err("no cache for this attention".into())),
    };
    let (kslot, vslot) = (&plan.caches[past[0]], &plan.caches[past[1]]);
    if qt.rank() != 4 || nk.rank() != 4 || nv.rank() != 4 {
        return Err(err("Q and the new K/V rows must be 4-D".into()));
    }
    let (heads, t, d) = (qt.shape[1], qt.shape[2], qt.shape[3]);
    let (kvh, slots) = (kslot.shape[1], kslot.shape[2]);
    if kvh == 0
        || heads % kvh != 0
        || nk.shape != [1, kvh, t, d]
        || nv.shape != [1, kvh, t, d]
        || kslot.shape[3] != d
        || vslot.shape != kslot.shape
        || ck.dtype != cv.dtype
    {
        return Err(err(format!(
            "shapes Q {:?}, new K {:?}, new V {:?}, cache {:?} do not fit",
            qt.shape, nk.shape, nv.shape, kslot.shape
        )));
    }
    let scores = attention::Scores {
        scale: Some(n.attr_float("scale", 1.0 / (d as f32).sqrt())),
        softcap: Some(n.attr_float("softcap", 0.0)).filter(|&c| c > 0.0),
    };
    let p = match mask {
        Some(m) => match run.prefixes.iter().find(|(v, _)| v == m) {
            Some(&(_, p)) => p,
            None => {
                let p = crate::backend::mask::attended(&val(plan, env, *m)?, t, slots);
                run.prefixes.push((*m, p));
                p
            }
        },
        None => None,
    };
    let (p, window) = match p {
        Some(a) => (a.prefix, a.window),
        _ => {
            // Neither the standard mask nor a window: run the node as written (materialized concat).
            let kcat = concat_cache(&ck.to_head_major(len), &nk, t)?;
            let vcat = concat_cache(&cv.to_head_major(len), &nv, t)?;
            let m = mask.map(|m| val(plan, env, m)).transpose()?;
            let outs = ops::run_node(n, &[Some(&qt), Some(&kcat), Some(&vcat), m.as_ref()])?;
            let a = outs.into_iter().next();
            env[*out] = match (a, tokens_first) {
                (Some(a), true) => Some(heads_to_tokens(&a)),
                (a, _) => a,
            };
            return Ok(());
        }
    };
    let nkf = nk.to_f32_vec(&plan.names[new[0]])?;
    let nvf = nv.to_f32_vec(&plan.names[new[1]])?;
    let qv = qt.as_f32(&plan.names[*q])?;
    let shape = AttnShape {
        heads,
        kv_heads: kvh,
        tokens: t,
        head_dim: d,
        cache_len: slots,
        q_tokens_first: false,
        kv_tokens_first: false,
    };
    // The kernel writes [T, H·D]: exactly the absorbed transpose's [1, T, H, D].
    let mut o = Tensor::zeros(DType::F32, &[1, t, heads, d]);
    let ov = o.typed_mut::<f32>();
    let r = match ck.dtype {
        DType::F16 => {
            paged_attention::<half::f16>(ck, cv, qv, &nkf, &nvf, (p, window), &shape, scores, ov)
        }
        DType::F32 => {
            paged_attention::<f32>(ck, cv, qv, &nkf, &nvf, (p, window), &shape, scores, ov)
        }
        dt => return Err(err(format!("cache of {dt} is not supported"))),
    };
    r.map_err(|e| err(e.to_string()))?;
    env[*out] = Some(if *tokens_first {
        o
    } else {
        tokens_to_heads(&o)
    });
    Ok(())
}

/// `y + other` for a linear layer's residual `r`: in place when the shapes agree, else as the graph's
/// `Add` (broadcasting, operands in its order).
fn add_residual(plan: &Plan, mut y: Tensor, other: &Tensor, r: &Residual) -> Result<Tensor> {
    if other.dtype == DType::F32 && other.shape == y.shape {
        for (a, b) in y.typed_mut::<f32>().iter_mut().zip(other.typed::<f32>()) {
            *a += b;
        }
        return Ok(y);
    }
    let args = if r.linear_first {
        [Some(&y), Some(other)]
    } else {
        [Some(other), Some(&y)]
    };
    let mut outs = ops::run_node(&plan.graph.nodes[r.add], &args)?;
    Ok(outs.remove(0))
}

/// The fused attention over a sequence's host pages of element type `E`, attending the first `position`
/// slots (those a `window` of the query allows).
#[allow(clippy::too_many_arguments)]
fn paged_attention<E: attention::KvElement + bytemuck::Pod>(
    ck: &crate::kv::CachePages,
    cv: &crate::kv::CachePages,
    q: &[f32],
    new_k: &[f32],
    new_v: &[f32],
    (position, window): (usize, Option<usize>),
    shape: &AttnShape,
    scores: attention::Scores,
    out: &mut [f32],
) -> crate::backend::cpu::KernelResult {
    let kp: Vec<&[E]> = ck.pages().iter().map(|p| p.typed()).collect();
    let vp: Vec<&[E]> = cv.pages().iter().map(|p| p.typed()).collect();
    attention::attention_paged(
        q,
        &kp,
        &vp,
        ck.page_rows(),
        new_k,
        new_v,
        position,
        window,
        shape,
        scores,
        out,
    )
}

/// `[1, H, T, D]` → `[1, T, H, D]` (a copy; a view when `T = 1`).
fn heads_to_tokens(a: &Tensor) -> Tensor {
    let (h, t, d) = (a.shape[1], a.shape[2], a.shape[3]);
    if t == 1 || h == 1 {
        return a.reshaped(vec![1, t, h, d]);
    }
    let v = a.typed::<f32>();
    Tensor::build(DType::F32, &[1, t, h, d], |o: &mut [f32]| {
        for hi in 0..h {
            for ti in 0..t {
                o[(ti * h + hi) * d..][..d].copy_from_slice(&v[(hi * t + ti) * d..][..d]);
            }
        }
    })
}

/// `[1, T, H, D]` → `[1, H, T, D]` (a copy; a view when `T = 1`).
fn tokens_to_heads(a: &Tensor) -> Tensor {
    let (t, h, d) = (a.shape[1], a.shape[2], a.shape[3]);
    if t == 1 || h == 1 {
        return a.reshaped(vec![1, h, t, d]);
    }
    let v = a.typed::<f32>();
    Tensor::build(DType::F32, &[1, h, t, d], |o: &mut [f32]| {
        for ti in 0..t {
            for hi in 0..h {
                o[(hi * t + ti) * d..][..d].copy_from_slice(&v[(ti * h + hi) * d..][..d]);
            }
        }
    })
}

/// `Concat([Cast(cache, f32), Cast(new, f32)], axis=2)` materialized (the general path).
fn concat_cache(cache: &Tensor, new: &Tensor, t: usize) -> Result<Tensor> {
    let (h, s, d) = (cache.shape[1], cache.shape[2], cache.shape[3]);
    let c = cache.to_f32_vec("cache")?;
    let n = new.to_f32_vec("new rows")?;
    Ok(Tensor::build(
        DType::F32,
        &[1, h, s + t, d],
        |o: &mut [f32]| {
            for hi in 0..h {
                let base = hi * (s + t) * d;
                o[base..base + s * d].copy_from_slice(&c[hi * s * d..(hi + 1) * s * d]);
                o[base + s * d..base + (s + t) * d]
                    .copy_from_slice(&n[hi * t * d..(hi + 1) * t * d]);
            }
        },
    ))
}

/// Runs `plan` (one without caches: a transcription model's encoder phase) once on the CPU over
/// `env` (its inputs set) with `run`'s precision and packed weights, returning its values; each freed
/// as its last reader is done.
pub(crate) fn run_once(
    plan: &Plan,
    mut env: Vec<Option<Tensor>>,
    mut run: CpuRun,
    profile: Option<&OpProfile>,
) -> Result<Vec<Option<Tensor>>> {
    for (si, s) in plan.steps.iter().enumerate() {
        let t0 = profile.map(|_| Instant::now());
        exec_step(plan, s, &mut env, None, &mut run)?;
        if let (Some(t0), Some(p)) = (t0, profile) {
            p.add(s.label(&plan.graph), t0.elapsed().as_secs_f64());
        }
        for &v in &plan.frees[si] {
            env[v] = None;
        }
    }
    Ok(env)
}

/// Time per op kind (a step's label → calls, seconds), for `--profile` runs.
#[derive(Default)]
pub(crate) struct OpProfile(Mutex<BTreeMap<String, (u64, f64)>>);

impl OpProfile {
    /// Counts one call of `op` that took `secs`.
    pub(crate) fn add(&self, op: &str, secs: f64) {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry(op.to_string()).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += secs;
    }

    /// `(op, calls, seconds)`, slowest first.
    pub(crate) fn rows(&self) -> Vec<(String, u64, f64)> {
        let p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = p.iter().map(|(k, (n, t))| (k.clone(), *n, *t)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }
}

/// The CPU backend: every step through [`exec_step`], attention reading the host pages in place.
pub(crate) struct CpuBackend {
    precision: Precision,
    /// The output layer's output slot ([`logits_linear`]).
    logits_linear: Option<ValId>,
    /// Per plan cache: whether a step other than the fused attention reads the cache input (then the
    /// step gets it materialized in the graph's layout).
    cache_read_elsewhere: Vec<bool>,
    /// Time per op kind when profiling.
    profile: Option<OpProfile>,
    /// The linear layers repacked for the integer kernels (under `Fast`, where they read them).
    packed: Arc<PackedSet>,
    /// The integer kernels' instruction set ([`LoadOptions::cpu_isa`](crate::LoadOptions); `None`:
    /// this CPU's best).
    qisa: Option<QIsa>,
}

impl CpuBackend {
    /// The CPU backend for `plan` as `opts` ask (precision, profiling, the integer kernels'
    /// instruction set); under [`Precision::Fast`] its linear layers are repacked where the integer
    /// kernels read packed forms (`repack.rs`). Fails only for an instruction set this CPU lacks.
    pub(crate) fn new(plan: &Plan, opts: &crate::LoadOptions) -> Result<CpuBackend> {
        let (precision, profile) = (opts.precision, opts.profile);
        let qisa = opts.fast_isa()?;
        let packed = match precision {
            Precision::Fast => PackedSet::for_plan(plan, qisa.unwrap_or_else(linear_q8::best)),
            Precision::Exact => PackedSet::default(),
        };
        Ok(CpuBackend {
            precision,
            logits_linear: logits_linear(plan),
            cache_read_elsewhere: super::super::caches_read_elsewhere(plan),
            profile: profile.then(Default::default),
            packed: Arc::new(packed),
            qisa,
        })
    }
}

impl Backend for CpuBackend {
    fn new_seq(
        &self,
        _plan: &Plan,
        _shapes: &[(DType, Vec<usize>)],
        _kv: &KvOptions,
        _max_chunk: usize,
    ) -> Result<SeqState> {
        Ok(SeqState::Host)
    }

    fn weight_bytes_saved(&self) -> u64 {
        self.packed.saved_bytes()
    }

    fn step(
        &self,
        call: &StepCall<'_>,
        _seq: &mut SeqState,
        host: &mut PagedCache,
    ) -> Result<Vec<Option<Tensor>>> {
        let (plan, position, t) = (call.plan, call.position, call.ids.len());
        let mut env = crate::step::input_env(plan, call.ids, position, call.sampling, call.held)?;
        super::super::materialize_caches(
            plan,
            host,
            position,
            &self.cache_read_elsewhere,
            &mut env,
        );
        let mut run = CpuRun::new(self.precision, self.logits_linear)
            .with_packed(Arc::clone(&self.packed))
            .on(self.qisa);
        for (si, s) in plan.steps.iter().enumerate() {
            let t0 = self.profile.is_some().then(Instant::now);
            exec_step(plan, s, &mut env, Some((host, position)), &mut run)?;
            if let (Some(t0), Some(p)) = (t0, &self.profile) {
                p.add(s.label(&plan.graph), t0.elapsed().as_secs_f64());
            }
            for &v in &plan.frees[si] {
                env[v] = None;
            }
        }
        // The chunk's new rows into the host pages.
        let mut rows = Vec::with_capacity(plan.caches.len());
        for c in &plan.caches {
            let r = crate::step::value(plan, &env, &c.output)?;
            let want = [1, c.shape[1], t, c.shape[3]];
            if r.shape != want || r.dtype != c.dtype {
                return Err(Error::tensor(
                    &c.output,
                    format!(
                        "new rows are {} {:?}, the cache needs {} {:?}",
                        r.dtype, r.shape, c.dtype, want
                    ),
                ));
            }
            rows.push(r);
        }
        for (cache, r) in host.caches.iter_mut().zip(&rows) {
            cache.write_head_major(position, r)?;
        }
        Ok(env)
    }

    fn kv_stats(&self, _seq: &SeqState) -> KvStats {
        KvStats::default()
    }

    fn profile(&self) -> Vec<(String, u64, f64)> {
        self.profile
            .as_ref()
            .map(OpProfile::rows)
            .unwrap_or_default()
    }

    fn device(&self) -> String {
        "cpu".to_string()
    }
}
