//! The plan: built once per model, run for every step.
//!
//! [`Plan::new`] resolves value names to slots (`view.rs`, the passes' shared view), then runs the
//! passes in order, each in a file of its own:
//! - per node, the first that takes it: `fold.rs` (zero-copy views of constants such as
//!   `Reshape(scales)`, small constant subgraphs), `linear.rs` (a `Gemm`/`MatMulNBits` with constant
//!   weights — possibly behind `Cast` or `DequantizeLinear` — bound to [`LinearWeights`] that read the
//!   mapped bytes in place; then a bias `Add` into its epilogue), `residual.rs` (a residual `Add` into
//!   the epilogue of the linear before it), `norm_residual.rs` (a residual `Add` after an RMS norm,
//!   done by the norm's step), `gate.rs` (the SiLU or GELU gate), `attention.rs` (attention over a
//!   caller-owned cache, `Attention(q, Concat(past, new), ...)`, read in place instead of
//!   concatenated), `rope.rs` (a rotary reading through the `Transpose` before it, with a per-head RMS
//!   norm between them taken in), `round.rs` (the f16 round trip of new cache rows);
//! - over subgraphs: `embedding.rs` (the rows gathered from constant tables by the token ids, one step
//!   over [`LinearWeights`] shared with a tied output layer) and `choice.rs` (the token choice after its
//!   `TopK`), each proving its match by running it; then `attention_inputs.rs` (the attention taking its
//!   rotaries, transposes and round trips in) and `group.rs` (linear layers of one input as one step,
//!   with the norm before and the gate after them, within what the backend takes: [`GroupCaps`]);
//! - `liveness.rs`: dead nodes dropped, each value's last use recorded so buffers are freed as soon as
//!   possible.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Result;
use crate::graph::{DType, Graph};
use crate::tensor::Tensor;
use crate::weights::LinearWeights;

mod attention;
mod attention_inputs;
mod choice;
mod embedding;
mod fold;
mod gate;
mod group;
mod linear;
mod liveness;
mod norm_residual;
mod residual;
mod rope;
mod round;
mod view;

use view::Planning;

/// Graph builders for the planner's unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    use std::collections::BTreeMap;

    use bytes::Bytes;

    use super::Plan;
    use crate::backend::cpu::exec::{exec_step, CpuRun};
    use crate::backend::cpu::linear::Precision;
    use crate::backend::cpu::ops;
    use crate::graph::{Attr, DType, Dim, Graph, Initializer, Node, ValueInfo};
    use crate::tensor::Tensor;

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

    /// A graph of `nodes` over f32 `inputs` (name, shape) and `inits`, with graph outputs `outputs`.
    pub fn graph(
        inputs: &[(&str, &[usize])],
        outputs: &[&str],
        nodes: Vec<Node>,
        initializers: Vec<Initializer>,
    ) -> Graph {
        let vi = |name: &str, shape: &[usize]| ValueInfo {
            name: name.into(),
            dtype: DType::F32,
            shape: shape.iter().map(|&d| Dim::Known(d)).collect(),
        };
        Graph {
            name: "pass test".into(),
            inputs: inputs.iter().map(|(n, s)| vi(n, s)).collect(),
            outputs: outputs.iter().map(|n| vi(n, &[])).collect(),
            nodes,
            initializers,
            ..Default::default()
        }
    }

    /// Deterministic f32 noise in [-1, 1) of `shape` ([`crate::backend::testutil::noise`]).
    pub fn noise(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        Tensor::f32(shape, &crate::backend::testutil::noise(n, seed))
    }

    /// The token choice as docs/GRAPH.md writes it (the planner's `TokenChoice` pass reads it), over logits `[1, 100]`; `nucleus` is the value
    /// the nucleus test compares with `top_p` (`before` in the contract).
    pub fn token_choice(nucleus: &str) -> Graph {
        let n = |op: &str, ins: &[&str], out: &str| node(op, ins, &[out], &[]);
        let axis =
            |op: &str, ins: &[&str], out: &str| node(op, ins, &[out], &[("axis", Attr::Int(-1))]);
        let cast =
            |i: &str, out: &str, to: i64| node("Cast", &[i], &[out], &[("to", Attr::Int(to))]);
        let nodes = vec![
            n("LessOrEqual", &["temperature", "zero_f"], "greedy"),
            n("Greater", &["top_k", "zero_i"], "k_pos"),
            n("Less", &["top_k", "v"], "k_lt_v"),
            n("And", &["k_pos", "k_lt_v"], "k_ok"),
            n("Where", &["k_ok", "top_k", "v"], "k_limit"),
            n("Where", &["greedy", "one_i", "k_limit"], "k"),
            n("Max", &["temperature", "eps"], "temp"),
            n("Div", &["logits", "temp"], "scaled"),
            node(
                "TopK",
                &["scaled", "k"],
                &["vals", "idx"],
                &[("axis", Attr::Int(-1))],
            ),
            axis("Softmax", &["vals"], "p"),
            n("CumSum", &["p", "last"], "c"),
            n("Sub", &["c", "p"], "before"),
            n("Max", &["top_p", "eps"], "tp"),
            n("Less", &[nucleus, "tp"], "keep"),
            cast("keep", "keep_f", 1),
            n("Mul", &["p", "keep_f"], "kept"),
            n("ReduceSum", &["kept", "axes"], "total"),
            n("CumSum", &["kept", "last"], "kept_cum"),
            n("Mul", &["random_u", "total"], "threshold"),
            n("LessOrEqual", &["kept_cum", "threshold"], "below"),
            cast("below", "below_i", 7),
            node(
                "ReduceSum",
                &["below_i", "axes"],
                &["count"],
                &[("keepdims", Attr::Int(0))],
            ),
            n("Sub", &["k", "one_i"], "k_last"),
            n("Min", &["count", "k_last"], "choice"),
            n("Unsqueeze", &["choice", "one_i"], "choice_col"),
            node(
                "GatherElements",
                &["idx", "choice_col"],
                &["token"],
                &[("axis", Attr::Int(1))],
            ),
            n("Reshape", &["token", "one_i"], "next_token"),
        ];
        let vi = |name: &str, dtype, shape: Vec<usize>| ValueInfo {
            name: name.into(),
            dtype,
            shape: shape.into_iter().map(Dim::Known).collect(),
        };
        Graph {
            name: "choice".into(),
            inputs: vec![
                vi("logits", DType::F32, vec![1, 100]),
                vi("temperature", DType::F32, vec![1]),
                vi("top_k", DType::I64, vec![1]),
                vi("top_p", DType::F32, vec![1]),
                vi("random_u", DType::F32, vec![1]),
            ],
            outputs: vec![vi("next_token", DType::I64, vec![1])],
            nodes,
            initializers: vec![
                init("zero_f", DType::F32, &[], &[0.0f32]),
                init("zero_i", DType::I64, &[1], &[0i64]),
                init("one_i", DType::I64, &[1], &[1i64]),
                init("v", DType::I64, &[1], &[100i64]),
                init("eps", DType::F32, &[], &[1e-6f32]),
                init("last", DType::I64, &[], &[-1i64]),
                init("axes", DType::I64, &[1], &[-1i64]),
            ],
            ..Default::default()
        }
    }

    /// Runs `graph` node by node through the generic ops (the oracle), returning its outputs by name.
    pub fn run_graph(graph: &Graph, inputs: &[(&str, Tensor)]) -> BTreeMap<String, Tensor> {
        let mut vals: BTreeMap<String, Tensor> = inputs
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        for i in &graph.initializers {
            vals.insert(
                i.name.clone(),
                Tensor::mapped(i.dtype, &i.dims, i.data.clone()),
            );
        }
        for n in &graph.nodes {
            let args: Vec<Option<&Tensor>> = n
                .inputs
                .iter()
                .map(|s| (!s.is_empty()).then(|| &vals[s]))
                .collect();
            let outs = ops::run_node(n, &args).unwrap();
            for (o, t) in n.outputs.iter().zip(outs) {
                vals.insert(o.clone(), t);
            }
        }
        graph
            .outputs
            .iter()
            .map(|o| (o.name.clone(), vals[&o.name].clone()))
            .collect()
    }

    /// Runs `plan`'s steps on the CPU (exact precision), returning the graph outputs by name. Its
    /// caches start empty (a step at position 0); `inputs` naming them are left out.
    pub fn run_plan(plan: &Plan, inputs: &[(&str, Tensor)]) -> BTreeMap<String, Tensor> {
        let mut env: Vec<Option<Tensor>> = vec![None; plan.names.len()];
        for (n, t) in inputs {
            if let Some(&v) = plan.inputs.get(*n) {
                env[v] = Some(t.clone());
            }
        }
        let shapes: Vec<_> = plan
            .caches
            .iter()
            .map(|c| (c.dtype, c.shape.clone()))
            .collect();
        let pages = crate::kv::PagedCache::new(&shapes, 4).unwrap();
        let mut run = CpuRun::new(Precision::Exact, None);
        for s in &plan.steps {
            exec_step(plan, s, &mut env, Some((&pages, 0)), &mut run).unwrap();
        }
        plan.outputs
            .iter()
            .map(|(n, &v)| {
                let t = env[v].clone().or_else(|| plan.consts[v].clone()).unwrap();
                (n.clone(), t)
            })
            .collect()
    }

    /// Asserts that `plan` computes what `graph` (which it was made from) does, to `tol` relative to
    /// the largest magnitude of each output.
    pub fn assert_same(graph: &Graph, plan: &Plan, inputs: &[(&str, Tensor)], tol: f32) {
        let want = run_graph(graph, inputs);
        let got = run_plan(plan, inputs);
        assert_eq!(want.len(), got.len());
        for (name, w) in &want {
            let g = &got[name];
            assert_eq!(w.shape, g.shape, "`{name}`: shape");
            let (w, g) = (w.typed::<f32>(), g.typed::<f32>());
            let scale = w.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
            for (i, (a, b)) in w.iter().zip(g).enumerate() {
                assert!(
                    (a - b).abs() <= tol * scale,
                    "`{name}`[{i}]: graph {a}, plan {b}"
                );
            }
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
        /// A residual `Add` after it, done in its epilogue (`out` is then that `Add`'s output).
        residual: Option<Residual>,
        /// Output `[.., N]`.
        out: ValId,
    },
    /// `act(g)·u` fused (the gated MLP's activation).
    Gate(Gate),
    /// The token embedding: rows of a table gathered by the token ids and decoded.
    Embedding(Embedding),
    /// The token choice after its `TopK`: softmax, nucleus, draw (see [`TokenChoice`]).
    TokenChoice(TokenChoice),
    /// Linear layers of one input as one step, with the norm before and the gate after them (see
    /// [`LinearGroup`]).
    LinearGroup(LinearGroup),
    /// `RotaryEmbedding(Transpose(x))`: the rotary reading its input token-major (see [`Rope`]).
    Rope(Rope),
    /// The new cache rows' `Cast` to f16 and back as one step (see [`RoundTrip`]).
    RoundTrip(RoundTrip),
    /// An RMS norm and the residual `Add` after it (see [`NormResidual`]).
    NormResidual(NormResidual),
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
        /// The steps between the projections and this attention that it does itself (see
        /// [`AttnInputs`]): `q` and `new` are then values of those steps.
        inputs: Option<Box<AttnInputs>>,
    },
}

/// The projections an attention reads itself (`plan/attention_inputs.rs`): the rotaries of q and k,
/// v's transpose to heads-first, an f16 cache's round trip of the new rows and the `Identity`s naming
/// them are its own steps. A kernel reading the projections token-major does them all; the CPU runs
/// [`AttnInputs::steps`] in order before attending.
#[derive(Debug)]
#[cfg_attr(not(feature = "gpu"), allow(dead_code))] // (what a one-kernel backend binds)
pub struct AttnInputs {
    /// Queries `[1, T, H, D]` (the projection, reshaped), before the rotary.
    pub q: ValId,
    /// New keys `[1, T, KVH, D]`, before the rotary.
    pub k: ValId,
    /// New values `[1, T, KVH, D]`.
    pub v: ValId,
    /// The rotary's cos table (a constant).
    pub cos: ValId,
    /// The rotary's sin table (a constant).
    pub sin: ValId,
    /// The rotary's position ids.
    pub pos: ValId,
    /// Interleaved rotary pairs.
    pub interleaved: bool,
    /// The per-head norms of q and k before their rotaries (QK-norm), where the graph has them.
    pub norms: Option<[FoldedNorm; 2]>,
    /// The steps taken in, in graph order.
    pub steps: Vec<Step>,
    /// The graph outputs those steps write (the caches' new rows).
    pub writes: Vec<ValId>,
}

/// The residual `Add(linear output, other)` a linear layer does in its epilogue: `out = x·Wᵀ (+ bias)
/// + other`.
#[derive(Debug, Clone, Copy)]
pub struct Residual {
    /// Index of the `Add` node (for the broadcasting form, and names in errors).
    pub add: usize,
    /// The `Add`'s other input.
    pub other: ValId,
    /// Whether the linear's output is the `Add`'s first input.
    pub linear_first: bool,
}

/// `RotaryEmbedding(Transpose(x, perm=[0,2,1,3]), rest..)` as one step: the rotary reads the
/// projection `[1, T, H, D]` as the transposed `[1, H, T, D]` it rotates (`plan/rope.rs`).
#[derive(Debug)]
pub struct Rope {
    /// Index of the `Transpose` node.
    pub transpose: usize,
    /// Index of the `RotaryEmbedding` node.
    pub node: usize,
    /// The transpose's input `[1, T, H, D]`.
    pub x: ValId,
    /// The rotary's other inputs as the node lists them: cos table, sin table, position ids.
    pub rest: Vec<Option<ValId>>,
    /// The RMS norm of each head between the transpose and the rotary (QK-norm: qwen3, gemma3).
    pub norm: Option<FoldedNorm>,
    /// Output `[1, H, T, D]`.
    pub out: ValId,
}

/// An `RMSNormalization` over the last axis with a constant rank-1 f32 scale and f32 statistics, done
/// by the step that reads it (a rotary's per-head norm, `plan/rope.rs`; a residual's norm,
/// `plan/norm_residual.rs`).
#[derive(Debug, Clone, Copy)]
pub struct FoldedNorm {
    /// Index of the `RMSNormalization` node.
    pub node: usize,
    /// Its scale `[D]` (a constant).
    pub scale: ValId,
    /// Its epsilon (read by the GPU kernels; the CPU runs the node, which has it).
    #[cfg_attr(not(feature = "gpu"), allow(dead_code))]
    pub epsilon: f32,
}

/// `Add(other, RMSNormalization(x))` as one step (`plan/norm_residual.rs`; Gemma's norms after the
/// attention and the MLP): `out = norm(x)·scale + other`.
#[derive(Debug, Clone, Copy)]
pub struct NormResidual {
    /// The norm.
    pub norm: FoldedNorm,
    /// The norm's input.
    pub x: ValId,
    /// The `Add` and its other operand (`linear_first`: the norm's output is its first operand).
    pub residual: Residual,
    /// The `Add`'s output.
    pub out: ValId,
}

/// `half = Cast(x, f16)` (a cache output) and `out = Cast(half, f32)` (its only reader) as one step
/// (`plan/round.rs`).
#[derive(Debug)]
pub struct RoundTrip {
    /// Index of the cast to f16.
    pub first: usize,
    /// Index of the cast back to f32.
    pub node: usize,
    /// The rows, f32.
    pub x: ValId,
    /// The rows as f16: the cache output.
    pub half: ValId,
    /// The rows rounded to f16 precision, f32.
    pub out: ValId,
}

/// Linear layers reading one value as one step (`plan/group.rs`): q/k/v, or gate/up with the gate
/// (SiLU or GELU-tanh) joining them; the RMS norm producing their input folded in where only they read it.
#[derive(Debug)]
pub struct LinearGroup {
    /// The norm whose output is `x`, done first by the step.
    pub norm: Option<GroupNorm>,
    /// The members' input (with a norm, written and read inside the step).
    pub x: ValId,
    /// The members, each a [`Step::Linear`] without a residual, in the order their rows are stacked.
    pub members: Vec<Step>,
    /// The gate over the first member's output (`g`) and the second's (`u`), done last (their
    /// outputs are then read inside the step only).
    pub gate: Option<Gate>,
}

/// An `RMSNormalization` over the last axis folded into a [`LinearGroup`].
#[derive(Debug)]
#[cfg_attr(not(feature = "gpu"), allow(dead_code))] // (the CPU runs the node itself)
pub struct GroupNorm {
    /// Index of the node.
    pub node: usize,
    /// Its input.
    pub x: ValId,
    /// Its scale (a constant f32 `[K]`).
    pub scale: ValId,
    /// Its epsilon.
    pub epsilon: f32,
}

impl AttnInputs {
    /// What the taken-in steps read from outside them.
    fn reads(&self) -> Vec<ValId> {
        let inside: Vec<ValId> = self.steps.iter().flat_map(|s| s.writes()).collect();
        let mut r = Vec::new();
        for v in self.steps.iter().flat_map(|s| s.reads()) {
            if !inside.contains(&v) && !r.contains(&v) {
                r.push(v);
            }
        }
        r
    }
}

impl LinearGroup {
    /// The members' `(weights, output)`, in stacking order.
    pub fn linears(&self) -> impl Iterator<Item = (&Arc<LinearWeights>, ValId)> {
        self.members.iter().filter_map(|m| match m {
            Step::Linear { w, out, .. } => Some((w, *out)),
            _ => None,
        })
    }
}

/// What a backend runs of the linear groups: the planner makes only groups within these.
#[derive(Debug, Clone, Copy)]
pub struct GroupCaps {
    /// Most members in a group.
    pub max_members: usize,
    /// Most bytes of the members' weights together (a GPU's one binding).
    pub max_bytes: u64,
    /// Whether the norm before the members is folded in.
    pub norm: bool,
    /// Whether the gate after a pair (either activation) is folded in.
    pub gate: bool,
    /// Which weights may be members (the encodings a GPU's kernels read).
    pub takes: fn(&LinearWeights) -> bool,
}

impl GroupCaps {
    /// Any group: the CPU runs every member with its own kernel.
    pub const ANY: GroupCaps = GroupCaps {
        max_members: usize::MAX,
        max_bytes: u64::MAX,
        norm: true,
        gate: true,
        takes: |_| true,
    };
}

/// Which fusions the planner makes (all by default); both backends run every fused form.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    /// A residual `Add` after a linear layer goes into its epilogue.
    pub residual: bool,
    /// A `Transpose` before a `RotaryEmbedding` goes into the rotary's step.
    pub transpose_rope: bool,
    /// The f16 round trip of new cache rows is one step.
    pub round_trip: bool,
    /// Linear layers of one input are one step, within these bounds (`None`: no groups).
    pub linear_groups: Option<GroupCaps>,
    /// A cache attention takes in the rotaries, transposes and round trips of its inputs.
    pub attention_inputs: bool,
    /// With `attention_inputs`: whether rotaries with a per-head norm before them (QK-norm) go in too
    /// (the GPU kernel binds two more buffers for them).
    pub attention_input_norms: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            residual: true,
            transpose_rope: true,
            round_trip: true,
            linear_groups: Some(GroupCaps::ANY),
            attention_inputs: true,
            attention_input_norms: true,
        }
    }
}

/// The gated MLP's activation as one kernel: `act(g)·u`.
#[derive(Debug)]
pub struct Gate {
    /// Index of the outer `Mul` node.
    pub node: usize,
    /// The activation.
    pub act: GateAct,
    /// Gate input.
    pub g: ValId,
    /// Up input.
    pub u: ValId,
    /// Output.
    pub out: ValId,
}

/// A gate's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateAct {
    /// `Mul(Mul(g, Sigmoid(g)), u)`: SiLU (llama's SwiGLU).
    Silu,
    /// `Mul(Gelu(g, approximate="tanh"), u)`: GELU-tanh (Gemma's GeGLU).
    GeluTanh,
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
    /// Bytes of weights those linear layers read, each once (a decode step reads them all).
    pub linear_weight_bytes: usize,
    /// Attention steps reading the cache in place.
    pub cache_attention: usize,
    /// Fused gated-MLP activations: SiLU gates.
    pub silu_gate: usize,
    /// GELU-tanh gates.
    pub gelu_gate: usize,
    /// Token embeddings bound to their table (and of those, tied to an output layer's weights).
    pub embedding: usize,
    /// Embeddings sharing their table with an output layer.
    pub embedding_tied: usize,
    /// Token choices bound to one step after their `TopK`.
    pub token_choice: usize,
    /// Bias `Add`s folded into the linear layer before them.
    pub linear_bias: usize,
    /// Residual `Add`s done in the epilogue of the linear layer before them.
    pub residual: usize,
    /// Rotaries reading their input through the `Transpose` before them.
    pub transpose_rope: usize,
    /// f16 round trips of new cache rows done as one step.
    pub round_trip: usize,
    /// Linear groups (sets of layers reading one value, run as one step).
    pub linear_groups: usize,
    /// Norms folded into the linear group after them.
    pub group_norms: usize,
    /// Gates (SiLU or GELU-tanh) folded into the linear pair before them.
    pub group_gates: usize,
    /// Residual `Add`s done by the RMS norm before them.
    pub norm_residual: usize,
    /// Cache attentions reading their projections (rotaries, transposes and round trips taken in).
    pub attention_inputs: usize,
    /// Nodes folded into constants.
    pub folded: usize,
    /// Nodes removed as dead or absorbed.
    pub removed: usize,
}

/// Ops that only relabel a tensor's shape.
pub(crate) fn is_view_op(op: &str) -> bool {
    matches!(op, "Reshape" | "Squeeze" | "Unsqueeze" | "Identity")
}

/// A pass over one node: whether it took the node (bound it to a step, or folded or absorbed it).
type NodePass = fn(&mut Planning, usize) -> Result<bool>;

/// The per-node passes, in the order they are tried on each node.
const NODE_PASSES: &[NodePass] = &[
    fold::fold,
    linear::layer,
    linear::bias,
    residual::residual,
    norm_residual::norm_residual,
    gate::gate,
    attention::cache_attention,
    rope::rope,
    round::round_trip,
];

impl Plan {
    /// Plans `graph`: the per-node passes over every node in order, then the token embedding, the
    /// token choice and liveness.
    #[cfg(test)]
    pub fn new(graph: Graph) -> Result<Plan> {
        Self::with_options(graph, PlanOptions::default())
    }

    /// Plans `graph` with only the fusions `options` leave on.
    pub fn with_options(graph: Graph, options: PlanOptions) -> Result<Plan> {
        let mut p = Planning::new(graph, options)?;
        for ni in 0..p.graph.nodes.len() {
            for pass in NODE_PASSES {
                if pass(&mut p, ni)? {
                    break;
                }
            }
        }
        Self::embedding(&mut p);
        Self::token_choice(&mut p);
        attention_inputs::attention_inputs(&mut p);
        group::groups(&mut p);
        let steps = liveness::live_steps(&mut p);
        let frees = liveness::frees(&p, &steps);
        Ok(Plan {
            graph: p.graph,
            names: p.names,
            consts: p.consts,
            steps,
            frees,
            caches: p.caches,
            inputs: p.inputs,
            outputs: p.outputs,
            stats: p.stats,
        })
    }

    /// The token embeddings (see `embedding.rs`), sharing their table with a tied output layer.
    fn embedding(p: &mut Planning) {
        let Some(&ids) = p.inputs.get(crate::contract::INPUT_IDS) else {
            return;
        };
        let taken = p.taken();
        let found = p.graphs(&taken).embeddings(ids);
        for f in found {
            for &m in &f.absorbs {
                p.absorbed[m] = true;
            }
            // A tied output layer: one set of weights for both.
            let shared = p.kind.iter().find_map(|k| match k {
                Some(Step::Linear { w, .. }) if w.same_weights(&f.w) => Some(w.clone()),
                _ => None,
            });
            p.stats.embedding += 1;
            p.stats.embedding_tied += usize::from(shared.is_some());
            p.kind[f.leader] = Some(Step::Embedding(Embedding {
                node: f.leader,
                ids: f.ids,
                w: shared.unwrap_or_else(|| Arc::new(f.w)),
                out: f.out,
            }));
        }
    }

    /// The token choice after its `TopK` (see `choice.rs`).
    fn token_choice(p: &mut Planning) {
        let Some(&out) = p.outputs.get(crate::contract::NEXT_TOKEN) else {
            return;
        };
        let taken = p.taken();
        if let Some((absorbs, c)) = p.graphs(&taken).token_choice(out) {
            for m in absorbs {
                p.absorbed[m] = true;
            }
            p.stats.token_choice += 1;
            let node = c.node;
            p.kind[node] = Some(Step::TokenChoice(c));
        }
    }
}

impl Step {
    /// The values the step reads.
    pub fn reads(&self) -> Vec<ValId> {
        match self {
            Step::Node { inputs, .. } => inputs.iter().flatten().copied().collect(),
            Step::Linear { x, residual, .. } => {
                let mut r = vec![*x];
                r.extend(residual.map(|r| r.other));
                r
            }
            Step::Gate(sg) => vec![sg.g, sg.u],
            Step::NormResidual(nr) => vec![nr.x, nr.norm.scale, nr.residual.other],
            Step::Embedding(e) => vec![e.ids],
            Step::TokenChoice(c) => vec![c.vals, c.idx, c.k, c.top_p, c.u],
            Step::Rope(r) => std::iter::once(r.x)
                .chain(r.rest.iter().flatten().copied())
                .chain(r.norm.map(|n| n.scale))
                .collect(),
            Step::RoundTrip(r) => vec![r.x],
            Step::LinearGroup(g) => match &g.norm {
                Some(n) => vec![n.x, n.scale],
                None => vec![g.x],
            },
            Step::CacheAttention {
                q,
                new,
                mask,
                inputs,
                ..
            } => {
                let mut r = match inputs {
                    Some(a) => a.reads(),
                    None => vec![*q, new[0], new[1]],
                };
                r.extend(mask);
                r
            }
        }
    }

    /// The values the step writes.
    pub fn writes(&self) -> Vec<ValId> {
        match self {
            Step::Node { outputs, .. } => outputs.clone(),
            Step::RoundTrip(r) => vec![r.half, r.out],
            Step::LinearGroup(g) => match &g.gate {
                Some(sg) => vec![sg.out],
                None => g.linears().map(|(_, out)| out).collect(),
            },
            Step::Linear { out, .. }
            | Step::Rope(Rope { out, .. })
            | Step::Gate(Gate { out, .. })
            | Step::NormResidual(NormResidual { out, .. })
            | Step::Embedding(Embedding { out, .. })
            | Step::TokenChoice(TokenChoice { out, .. }) => vec![*out],
            Step::CacheAttention { out, inputs, .. } => {
                let mut w = vec![*out];
                w.extend(inputs.iter().flat_map(|a| a.writes.iter().copied()));
                w
            }
        }
    }

    /// What the step is called in profiles: a generic node's op, a fused step's kind in brackets.
    pub fn label<'g>(&self, graph: &'g Graph) -> &'g str {
        match self {
            Step::Node { node, .. } => graph.nodes[*node].op.as_str(),
            Step::Linear { .. } => "[linear]",
            Step::Gate(Gate {
                act: GateAct::Silu, ..
            }) => "[silu gate]",
            Step::Gate(_) => "[gelu gate]",
            Step::NormResidual(_) => "[norm + residual]",
            Step::Embedding(_) => "[embedding]",
            Step::TokenChoice(_) => "[token choice]",
            Step::Rope(_) => "[transposed rotary]",
            Step::LinearGroup(_) => "[linear group]",
            Step::RoundTrip(_) => "[f16 round trip]",
            Step::CacheAttention { .. } => "[cache attention]",
        }
    }
}

/// The value slots a step reads ([`Step::reads`]).
pub fn step_reads(s: &Step) -> Vec<ValId> {
    s.reads()
}
