//! The plan: built once per model, run for every step.
//!
//! Planning (1) resolves value names to slots, (2) folds zero-copy views of constants
//! (`Reshape(scales)`), (3) recognizes linear layers — `Gemm` whose `B` is a constant, possibly behind
//! `Cast` or `DequantizeLinear`, and `MatMulNBits` with constant weights — and binds them to
//! [`LinearWeights`] that read the mapped bytes in place, (4) recognizes attention over a
//! caller-owned cache (`Attention(q, Concat(past, new), ...)`) so the cache is read in place instead
//! of concatenated, (5) folds the remaining small constant subgraphs, (6) binds the token embedding
//! (the rows gathered from constant tables by the token ids, see `plan/embedding.rs`) to one step over
//! [`LinearWeights`] — shared with a tied output layer — and (7) drops dead nodes and records each
//! value's last use so buffers are freed as soon as possible.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::cpu::ops;
use crate::error::{Error, Result};
use crate::graph::{DType, Graph, Node};
use crate::tensor::Tensor;
use crate::weights::LinearWeights;

mod choice;
mod embedding;

/// Graph builders for the planner's unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    use std::collections::BTreeMap;

    use bytes::Bytes;

    use crate::graph::{Attr, DType, Initializer, Node};

    /// An initializer `name` of `dtype` `dims` holding `v`.
    pub fn init<T: bytemuck::Pod>(
        name: &str,
        dtype: DType,
        dims: &[usize],
        v: &[T],
    ) -> Initializer {
        Initializer {
            name: name.into(),
            dtype,
            dims: dims.to_vec(),
            data: Bytes::from(bytemuck::cast_slice::<T, u8>(v).to_vec()),
        }
    }

    /// A node named after its first output.
    pub fn node(op: &str, ins: &[&str], outs: &[&str], attrs: &[(&str, Attr)]) -> Node {
        Node {
            name: outs[0].into(),
            op: op.into(),
            domain: String::new(),
            inputs: ins.iter().map(|s| s.to_string()).collect(),
            outputs: outs.iter().map(|s| s.to_string()).collect(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        }
    }
}

/// Index of a value (tensor name) in the plan.
pub type ValId = usize;

/// Constant subgraphs whose outputs exceed this many elements are not folded (they would copy weights).
const FOLD_LIMIT: usize = 1 << 16;

/// One executable step.
#[derive(Debug)]
pub enum Step {
    /// A graph node run by the generic op implementation.
    Node {
        /// Index into the graph's nodes.
        node: usize,
        /// Input slots (`None` = absent optional input).
        inputs: Vec<Option<ValId>>,
        /// Output slots.
        outputs: Vec<ValId>,
    },
    /// A linear layer bound to its weights.
    Linear {
        /// Index of the originating node (for names in errors).
        node: usize,
        /// Activation `[.., K]`.
        x: ValId,
        /// Weights.
        w: Arc<LinearWeights>,
        /// Bias `[N]`.
        bias: Option<Tensor>,
        /// Output `[.., N]`.
        out: ValId,
    },
    /// `SiLU(g)·u` fused (the gated MLP's activation).
    SiluGate(SiluGate),
    /// The token embedding: rows of a table gathered by the token ids and decoded.
    Embedding(Embedding),
    /// The token choice after its `TopK`: softmax, nucleus, draw (see [`TokenChoice`]).
    TokenChoice(TokenChoice),
    /// Attention over a caller-owned static cache plus this chunk's rows.
    CacheAttention {
        /// Index of the `Attention` node.
        node: usize,
        /// Query `[1, H, T, D]`.
        q: ValId,
        /// The cache inputs (indices into [`Plan::caches`]) for K and V.
        past: [usize; 2],
        /// This chunk's K and V rows `[1, KVH, T, D]` (any float dtype; cast as the graph says).
        new: [ValId; 2],
        /// Whether the graph casts the new rows before concatenating (dtype of the concat).
        mask: Option<ValId>,
        /// Output: `[1, H, T, D]`, or `[1, T, H, D]` when `tokens_first` (the graph's following
        /// `Transpose(perm=[0,2,1,3])` is absorbed and `out` is that node's output).
        out: ValId,
        /// Whether `out` is in `[1, T, H, D]` order.
        tokens_first: bool,
    },
}

/// Gated MLP activation `Mul(Mul(g, Sigmoid(g)), u)` as one kernel (SiLU(g)·u).
#[derive(Debug)]
pub struct SiluGate {
    /// Index of the outer `Mul` node.
    pub node: usize,
    /// Gate input.
    pub g: ValId,
    /// Up input.
    pub u: ValId,
    /// Output.
    pub out: ValId,
}

/// The token embedding: `out[i..] = decode(W[ids[i..]])`, `[ids.., K]` f32, as proven at plan time
/// to equal the graph's gather-and-decode subgraph it replaces.
#[derive(Debug)]
pub struct Embedding {
    /// Index of the node whose output `out` is (the subgraph's last).
    pub node: usize,
    /// Token ids (int64).
    pub ids: ValId,
    /// The table `[V, K]`: the same `Arc` as a tied output layer's weights.
    pub w: Arc<LinearWeights>,
    /// Output.
    pub out: ValId,
}

/// The token choice's tail after its `TopK`, as proven at plan time to equal the nodes it replaces:
/// `out = idx[j]` with `j =` [`nucleus_pick`](crate::backend::cpu::misc::nucleus_pick)`(vals,
/// top_p, u)` — the softmax of the sorted values, the nucleus of mass `top_p`, the draw `u`.
#[derive(Debug)]
pub struct TokenChoice {
    /// Index of the node whose output `out` is (the tail's last).
    pub node: usize,
    /// The `TopK`'s values `[1, k]`, sorted best first.
    pub vals: ValId,
    /// The `TopK`'s indices `[1, k]` (int64).
    pub idx: ValId,
    /// The `TopK`'s `k` (int64 `[1]`).
    pub k: ValId,
    /// The nucleus mass (f32, one element).
    pub top_p: ValId,
    /// The draw in `[0, 1)` (f32, one element).
    pub u: ValId,
    /// The token (int64, one element).
    pub out: ValId,
    /// The shape of `out`.
    pub out_shape: Vec<usize>,
}

/// A cache tensor the caller owns: graph input `past.X` paired with graph output `new.X`.
#[derive(Debug, Clone)]
pub struct CacheSlot {
    /// Input name (`past.3.key`).
    pub input: String,
    /// Output name (`new.3.key`).
    pub output: String,
    /// Element type.
    pub dtype: DType,
    /// Shape `[1, KVH, S, D]`.
    pub shape: Vec<usize>,
    /// Slot of the input value.
    pub input_val: ValId,
    /// Slot of the output value.
    pub output_val: ValId,
}

/// The planned graph.
#[derive(Debug)]
pub struct Plan {
    /// The graph (nodes are referenced by index).
    pub graph: Graph,
    /// Value names by slot.
    pub names: Vec<String>,
    /// Constant values by slot.
    pub consts: Vec<Option<Tensor>>,
    /// Steps in execution order.
    pub steps: Vec<Step>,
    /// For each step, the slots whose last use it is.
    pub frees: Vec<Vec<ValId>>,
    /// Caller-owned caches.
    pub caches: Vec<CacheSlot>,
    /// Non-cache graph inputs: name → slot.
    pub inputs: HashMap<String, ValId>,
    /// Graph outputs: name → slot.
    pub outputs: HashMap<String, ValId>,
    /// Counts of fused steps (for `inspect`/bench output).
    pub stats: PlanStats,
}

/// What the planner did.
#[derive(Debug, Default, Clone)]
pub struct PlanStats {
    /// Generic node steps.
    pub generic: usize,
    /// Linear layers bound to weights.
    pub linear: usize,
    /// Attention steps reading the cache in place.
    pub cache_attention: usize,
    /// Fused gated-MLP activations.
    pub silu_gate: usize,
    /// Token embeddings bound to their table (and of those, tied to an output layer's weights).
    pub embedding: usize,
    /// Embeddings sharing their table with an output layer.
    pub embedding_tied: usize,
    /// Token choices bound to one step after their `TopK`.
    pub token_choice: usize,
    /// Bias `Add`s folded into the linear layer before them.
    pub linear_bias: usize,
    /// Nodes folded into constants.
    pub folded: usize,
    /// Nodes removed as dead or absorbed.
    pub removed: usize,
}

/// Ops that only relabel a tensor's shape.
pub(crate) fn is_view_op(op: &str) -> bool {
    matches!(op, "Reshape" | "Squeeze" | "Unsqueeze" | "Identity")
}

impl Plan {
    /// Plans `graph`.
    pub fn new(graph: Graph) -> Result<Plan> {
        let mut slots: HashMap<String, ValId> = HashMap::new();
        let mut names: Vec<String> = Vec::new();
        let mut slot = |name: &str, names: &mut Vec<String>| -> ValId {
            if let Some(&s) = slots.get(name) {
                return s;
            }
            names.push(name.to_string());
            slots.insert(name.to_string(), names.len() - 1);
            names.len() - 1
        };
        let mut consts_map: Vec<(ValId, Tensor)> = Vec::new();
        for init in &graph.initializers {
            let s = slot(&init.name, &mut names);
            consts_map.push((s, Tensor::mapped(init.dtype, &init.dims, init.data.clone())));
        }
        let mut inputs = HashMap::new();
        for i in &graph.inputs {
            inputs.insert(i.name.clone(), slot(&i.name, &mut names));
        }
        let mut node_in: Vec<Vec<Option<ValId>>> = Vec::new();
        let mut node_out: Vec<Vec<ValId>> = Vec::new();
        for n in &graph.nodes {
            node_in.push(
                n.inputs
                    .iter()
                    .map(|s| (!s.is_empty()).then(|| slot(s, &mut names)))
                    .collect(),
            );
            node_out.push(n.outputs.iter().map(|s| slot(s, &mut names)).collect());
        }
        let mut outputs = HashMap::new();
        for o in &graph.outputs {
            outputs.insert(o.name.clone(), slot(&o.name, &mut names));
        }
        let nvals = names.len();
        let mut consts: Vec<Option<Tensor>> = vec![None; nvals];
        for (s, t) in consts_map {
            consts[s] = Some(t);
        }
        let mut producer: Vec<Option<usize>> = vec![None; nvals];
        for (ni, outs) in node_out.iter().enumerate() {
            for &o in outs {
                producer[o] = Some(ni);
            }
        }
        let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); nvals];
        for (ni, ins) in node_in.iter().enumerate() {
            for &i in ins.iter().flatten() {
                consumers[i].push(ni);
            }
        }
        let graph_outputs: Vec<ValId> = outputs.values().copied().collect();
        let only_consumer = |v: ValId, ni: usize, consumers: &Vec<Vec<usize>>| {
            consumers[v].iter().all(|&c| c == ni) && !graph_outputs.contains(&v)
        };

        // Caches: graph inputs `past.X` with a matching output `new.X`.
        let mut caches = Vec::new();
        for vi in &graph.inputs {
            if let Some(rest) = vi.name.strip_prefix("past.") {
                let out_name = format!("new.{rest}");
                if let Some(&ov) = outputs.get(&out_name) {
                    let shape: Option<Vec<usize>> = vi
                        .shape
                        .iter()
                        .map(|d| match d {
                            crate::graph::Dim::Known(k) => Some(*k),
                            _ => None,
                        })
                        .collect();
                    let shape = shape.filter(|s| s.len() == 4 && s[0] == 1).ok_or_else(|| {
                        Error::Contract(format!(
                            "cache input `{}` must have a static shape [1, heads, slots, dim]",
                            vi.name
                        ))
                    })?;
                    caches.push(CacheSlot {
                        input: vi.name.clone(),
                        output: out_name,
                        dtype: vi.dtype,
                        shape,
                        input_val: inputs[&vi.name],
                        output_val: ov,
                    });
                }
            }
        }
        for c in &caches {
            inputs.remove(&c.input);
        }
        let cache_of = |v: ValId| caches.iter().position(|c| c.input_val == v);

        let mut stats = PlanStats::default();
        let mut kind: Vec<Option<Step>> = (0..graph.nodes.len()).map(|_| None).collect();
        let mut absorbed = vec![false; graph.nodes.len()];
        let is_const = |v: Option<ValId>, consts: &Vec<Option<Tensor>>| match v {
            None => true,
            Some(v) => consts[v].is_some(),
        };

        for (ni, n) in graph.nodes.iter().enumerate() {
            let ins = &node_in[ni];
            let all_const = ins.iter().all(|&v| is_const(v, &consts));
            // (2) zero-copy views of constants, and (5) small constant subgraphs.
            if all_const && !ins.is_empty() {
                // Never fold what feeds a weight input: that would expand weights to f32.
                let feeds_weights = node_out[ni].iter().any(|&o| {
                    consumers[o].iter().any(|&c| {
                        let cn = &graph.nodes[c];
                        matches!(cn.op.as_str(), "Gemm" | "MatMul" | "MatMulNBits")
                            && node_in[c].iter().skip(1).any(|&v| v == Some(o))
                    })
                });
                let fold = if is_view_op(&n.op) {
                    true
                } else if feeds_weights {
                    false
                } else {
                    let big = ins
                        .iter()
                        .flatten()
                        .any(|&v| consts[v].as_ref().is_some_and(|t| t.numel() > FOLD_LIMIT));
                    !big && n.op != "Gemm" && n.op != "MatMulNBits"
                };
                if fold {
                    let args: Vec<Option<&Tensor>> = ins
                        .iter()
                        .map(|v| v.and_then(|v| consts[v].as_ref()))
                        .collect();
                    let outs = ops::run_node(n, &args)?;
                    for (&o, t) in node_out[ni].iter().zip(outs) {
                        consts[o] = Some(t);
                    }
                    absorbed[ni] = true;
                    stats.folded += 1;
                    continue;
                }
            }
            if n.op == "Constant" {
                let outs = ops::run_node(n, &[])?;
                for (&o, t) in node_out[ni].iter().zip(outs) {
                    consts[o] = Some(t);
                }
                absorbed[ni] = true;
                stats.folded += 1;
                continue;
            }
            // (3) linear layers.
            if let Some((w, bias)) =
                Self::linear_for(n, ni, ins, &consts, &producer, &graph, &node_in)?
            {
                let x = ins[0].ok_or_else(|| Error::node(&n.name, &n.op, "input A missing"))?;
                kind[ni] = Some(Step::Linear {
                    node: ni,
                    x,
                    w: Arc::new(w),
                    bias,
                    out: node_out[ni][0],
                });
                stats.linear += 1;
                continue;
            }
            // A bias added after a linear layer (`MatMulNBits` + `Add`): into the layer's epilogue.
            if n.op == "Add" && n.domain.is_empty() && ins.len() == 2 {
                let found = (0..2).find_map(|side| {
                    let (y, b) = (ins[side]?, ins[1 - side]?);
                    let li = producer[y]?;
                    let bt = consts[b].as_ref()?;
                    match &kind[li] {
                        Some(Step::Linear { w, bias: None, .. })
                            if bt.dtype == DType::F32
                                && bt.numel() == w.n
                                && bt.shape.last() == Some(&w.n)
                                && only_consumer(y, ni, &consumers) =>
                        {
                            Some((li, bt.clone()))
                        }
                        _ => None,
                    }
                });
                if let Some((li, bt)) = found {
                    if let Some(Step::Linear { bias, out, .. }) = kind[li].as_mut() {
                        *bias = Some(Tensor::f32(&[bt.numel()], bt.typed::<f32>()));
                        *out = node_out[ni][0];
                    }
                    absorbed[ni] = true;
                    stats.linear_bias += 1;
                    continue;
                }
            }
            // Gated MLP activation: Mul(Mul(g, Sigmoid(g)), u) with private intermediates.
            if n.op == "Mul" && n.domain.is_empty() && ins.len() == 2 {
                let found = (0..2).find_map(|side| {
                    let (a, u) = (ins[side]?, ins[1 - side]?);
                    let ai = producer[a]?;
                    let an = &graph.nodes[ai];
                    if an.op != "Mul" || node_in[ai].len() != 2 || !only_consumer(a, ni, &consumers)
                    {
                        return None;
                    }
                    (0..2).find_map(|gs| {
                        let (g, sg) = (node_in[ai][gs]?, node_in[ai][1 - gs]?);
                        let si = producer[sg]?;
                        (graph.nodes[si].op == "Sigmoid"
                            && node_in[si].first().copied().flatten() == Some(g)
                            && only_consumer(sg, ai, &consumers))
                        .then_some((g, u, ai, si))
                    })
                });
                if let Some((g, u, ai, si)) = found {
                    absorbed[ai] = true;
                    absorbed[si] = true;
                    kind[ni] = Some(Step::SiluGate(SiluGate {
                        node: ni,
                        g,
                        u,
                        out: node_out[ni][0],
                    }));
                    stats.silu_gate += 1;
                    continue;
                }
            }
            // (4) attention over the caller-owned cache.
            if n.op == "Attention" && n.domain.is_empty() && ins.len() >= 3 {
                let extra = ins.len() > 4 && ins[4..].iter().any(|v| v.is_some());
                let plain = n.attrs.keys().all(|k| k == "scale" || k == "is_causal")
                    && n.attr_int("is_causal", 0) == 0;
                let mut parts = Vec::new();
                for &kv in &ins[1..3] {
                    let Some(kv) = kv else { break };
                    let Some(ci) = producer[kv] else { break };
                    let c = &graph.nodes[ci];
                    if c.op != "Concat"
                        || node_in[ci].len() != 2
                        || !only_consumer(kv, ni, &consumers)
                    {
                        break;
                    }
                    let axis = c.attr_int("axis", 0);
                    if axis != 2 && axis != -2 {
                        break;
                    }
                    let (Some(p), Some(newv)) = (node_in[ci][0], node_in[ci][1]) else {
                        break;
                    };
                    // past directly, or through a Cast to f32 used only here.
                    let (cache_idx, cast_node) = match cache_of(p) {
                        Some(c) => (Some(c), None),
                        None => match producer[p] {
                            Some(pi)
                                if graph.nodes[pi].op == "Cast"
                                    && graph.nodes[pi].attr_int("to", 0)
                                        == DType::F32.onnx_code() as i64
                                    && only_consumer(p, ci, &consumers) =>
                            {
                                (node_in[pi][0].and_then(cache_of), Some(pi))
                            }
                            _ => (None, None),
                        },
                    };
                    let Some(cache_idx) = cache_idx else { break };
                    parts.push((cache_idx, newv, ci, cast_node));
                }
                if parts.len() == 2 && !extra && plain {
                    let q = ins[0].ok_or_else(|| Error::node(&n.name, &n.op, "Q missing"))?;
                    for &(_, _, ci, cast) in &parts {
                        absorbed[ci] = true;
                        if let Some(c) = cast {
                            absorbed[c] = true;
                        }
                    }
                    // Absorb a following Transpose to [1, T, H, D] (the kernel writes that order).
                    let a_out = node_out[ni][0];
                    let transpose = match consumers[a_out].as_slice() {
                        [ti] if graph.nodes[*ti].op == "Transpose"
                            && graph.nodes[*ti].attr_ints("perm") == Some(&[0, 2, 1, 3][..])
                            && !graph_outputs.contains(&a_out) =>
                        {
                            Some(*ti)
                        }
                        _ => None,
                    };
                    let (out, tokens_first) = match transpose {
                        Some(ti) => {
                            absorbed[ti] = true;
                            (node_out[ti][0], true)
                        }
                        None => (a_out, false),
                    };
                    kind[ni] = Some(Step::CacheAttention {
                        node: ni,
                        q,
                        past: [parts[0].0, parts[1].0],
                        new: [parts[0].1, parts[1].1],
                        mask: ins.get(3).copied().flatten(),
                        out,
                        tokens_first,
                    });
                    stats.cache_attention += 1;
                    continue;
                }
            }
        }

        // The planner's view for the passes over subgraphs: the nodes taken so far.
        let taken = |absorbed: &[bool], kind: &[Option<Step>]| -> Vec<bool> {
            (0..graph.nodes.len())
                .map(|ni| absorbed[ni] || kind[ni].is_some())
                .collect()
        };
        macro_rules! graphs {
            ($taken:expr) => {
                embedding::Graphs {
                    graph: &graph,
                    node_in: &node_in,
                    node_out: &node_out,
                    consts: &consts,
                    consumers: &consumers,
                    graph_outputs: &graph_outputs,
                    taken: $taken,
                }
            };
        }

        // (6) the token embedding.
        if let Some(&ids) = inputs.get(crate::contract::INPUT_IDS) {
            let found = graphs!(&taken(&absorbed, &kind)).embeddings(ids);
            for f in found {
                for &m in &f.absorbs {
                    absorbed[m] = true;
                }
                // A tied output layer: one set of weights for both.
                let shared = kind.iter().find_map(|k| match k {
                    Some(Step::Linear { w, .. }) if w.same_weights(&f.w) => Some(w.clone()),
                    _ => None,
                });
                stats.embedding += 1;
                stats.embedding_tied += usize::from(shared.is_some());
                kind[f.leader] = Some(Step::Embedding(Embedding {
                    node: f.leader,
                    ids: f.ids,
                    w: shared.unwrap_or_else(|| Arc::new(f.w)),
                    out: f.out,
                }));
            }
        }

        // (6b) the token choice after its TopK.
        if let Some(&out) = outputs.get(crate::contract::NEXT_TOKEN) {
            if let Some((absorbs, c)) = graphs!(&taken(&absorbed, &kind)).token_choice(out) {
                for m in absorbs {
                    absorbed[m] = true;
                }
                stats.token_choice += 1;
                let node = c.node;
                kind[node] = Some(Step::TokenChoice(c));
            }
        }

        // (7) liveness: walk back from the graph outputs; keep only what is needed.
        let mut needed = vec![false; nvals];
        for &o in &graph_outputs {
            needed[o] = true;
        }
        let mut live_nodes = vec![false; graph.nodes.len()];
        for ni in (0..graph.nodes.len()).rev() {
            if absorbed[ni] && kind[ni].is_none() {
                continue;
            }
            let produces_needed = match &kind[ni] {
                Some(Step::CacheAttention { out, .. })
                | Some(Step::Linear { out, .. })
                | Some(Step::Embedding(Embedding { out, .. }))
                | Some(Step::TokenChoice(TokenChoice { out, .. })) => needed[*out],
                _ => node_out[ni].iter().any(|&o| needed[o]),
            };
            if !produces_needed {
                continue;
            }
            live_nodes[ni] = true;
            let reads: Vec<ValId> = match &kind[ni] {
                Some(Step::Linear { x, .. }) => vec![*x],
                Some(Step::SiluGate(sg)) => vec![sg.g, sg.u],
                Some(Step::Embedding(e)) => vec![e.ids],
                Some(Step::TokenChoice(c)) => vec![c.vals, c.idx, c.k, c.top_p, c.u],
                Some(Step::CacheAttention { q, new, mask, .. }) => {
                    let mut r = vec![*q, new[0], new[1]];
                    r.extend(mask);
                    r
                }
                _ => node_in[ni].iter().flatten().copied().collect(),
            };
            for v in reads {
                if consts[v].is_none() {
                    needed[v] = true;
                }
            }
        }
        // Unabsorbed cache inputs read by generic nodes are materialized on demand (see exec).
        let mut steps = Vec::new();
        for ni in 0..graph.nodes.len() {
            if !live_nodes[ni] {
                if !absorbed[ni] {
                    stats.removed += 1;
                }
                continue;
            }
            match kind[ni].take() {
                Some(s) => steps.push(s),
                None => {
                    stats.generic += 1;
                    steps.push(Step::Node {
                        node: ni,
                        inputs: node_in[ni].clone(),
                        outputs: node_out[ni].clone(),
                    })
                }
            }
        }
        let mut last_use: Vec<Option<usize>> = vec![None; nvals];
        for (si, s) in steps.iter().enumerate() {
            for v in step_reads(s) {
                last_use[v] = Some(si);
            }
        }
        let mut frees = vec![Vec::new(); steps.len()];
        for (v, lu) in last_use.iter().enumerate() {
            if let Some(si) = lu {
                if consts[v].is_none() && !graph_outputs.contains(&v) {
                    frees[*si].push(v);
                }
            }
        }
        Ok(Plan {
            graph,
            names,
            consts,
            steps,
            frees,
            caches,
            inputs,
            outputs,
            stats,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn linear_for(
        n: &Node,
        _ni: usize,
        ins: &[Option<ValId>],
        consts: &[Option<Tensor>],
        producer: &[Option<usize>],
        graph: &Graph,
        node_in: &[Vec<Option<ValId>>],
    ) -> Result<Option<(LinearWeights, Option<Tensor>)>> {
        let c = |v: Option<ValId>| v.and_then(|v| consts[v].as_ref());
        let bias_of = |v: Option<ValId>, nout: usize| -> Result<Option<Tensor>> {
            match v {
                None => Ok(None),
                Some(_) => match c(v) {
                    Some(t) if t.numel() == nout => {
                        Ok(Some(Tensor::f32(&[nout], &t.to_f32_vec(&n.name)?)))
                    }
                    _ => Err(Error::node(&n.name, &n.op, "bias must be a constant [N]")),
                },
            }
        };
        match (n.domain.as_str(), n.op.as_str()) {
            ("com.microsoft", "MatMulNBits") => {
                let args: Vec<Option<&Tensor>> = ins.iter().map(|&v| c(v)).collect();
                if args.len() < 3 || args[1].is_none() || args[2].is_none() {
                    return Ok(None);
                }
                if ins.get(3).copied().flatten().is_some() && args[3].is_none() {
                    return Ok(None);
                }
                let w = LinearWeights::from_matmul_nbits(n, &args)
                    .map_err(|e| Error::node(&n.name, &n.op, e))?;
                let bias = bias_of(ins.get(5).copied().flatten(), w.n)?;
                Ok(Some((w, bias)))
            }
            ("", "Gemm") => {
                if n.attr_int("transA", 0) != 0
                    || n.attr_float("alpha", 1.0) != 1.0
                    || n.attr_float("beta", 1.0) != 1.0
                    || n.attr_int("transB", 0) == 0
                {
                    return Ok(None);
                }
                let Some(b) = ins.get(1).copied().flatten() else {
                    return Ok(None);
                };
                let w = if let Some(t) = c(Some(b)) {
                    LinearWeights::from_gemm_b(t, true)
                        .map_err(|e| Error::node(&n.name, &n.op, e))?
                } else if let Some(pi) = producer[b] {
                    let p = &graph.nodes[pi];
                    let pin = &node_in[pi];
                    match p.op.as_str() {
                        "Cast" if p.attr_int("to", 0) == DType::F32.onnx_code() as i64 => {
                            match c(pin[0]) {
                                Some(t) => LinearWeights::from_gemm_b(t, true)
                                    .map_err(|e| Error::node(&n.name, &n.op, e))?,
                                None => return Ok(None),
                            }
                        }
                        "DequantizeLinear" => {
                            let (q, s) = (c(pin[0]), c(pin.get(1).copied().flatten()));
                            let zp = pin.get(2).copied().flatten();
                            let zero_ok = match zp {
                                None => true,
                                Some(_) => c(zp).is_some_and(|z| z.bytes().iter().all(|&b| b == 0)),
                            };
                            match (q, s) {
                                (Some(q), Some(s))
                                    if q.dtype == DType::I8
                                        && q.rank() == 2
                                        && s.dtype == DType::F32
                                        && s.numel() == q.shape[0]
                                        && p.attr_int("axis", 1) == 0
                                        && p.attr_int("block_size", 0) == 0
                                        && zero_ok =>
                                {
                                    LinearWeights {
                                        n: q.shape[0],
                                        k: q.shape[1],
                                        form: crate::weights::WeightForm::Int8PerChannel {
                                            q: q.clone(),
                                            scale: s.clone(),
                                        },
                                    }
                                }
                                _ => return Ok(None),
                            }
                        }
                        _ => return Ok(None),
                    }
                } else {
                    return Ok(None);
                };
                let bias = bias_of(ins.get(2).copied().flatten(), w.n)?;
                Ok(Some((w, bias)))
            }
            _ => Ok(None),
        }
    }
}

/// The value slots a step reads.
pub fn step_reads(s: &Step) -> Vec<ValId> {
    match s {
        Step::Node { inputs, .. } => inputs.iter().flatten().copied().collect(),
        Step::Linear { x, .. } => vec![*x],
        Step::SiluGate(sg) => vec![sg.g, sg.u],
        Step::Embedding(e) => vec![e.ids],
        Step::TokenChoice(c) => vec![c.vals, c.idx, c.k, c.top_p, c.u],
        Step::CacheAttention { q, new, mask, .. } => {
            let mut r = vec![*q, new[0], new[1]];
            r.extend(mask);
            r
        }
    }
}
