//! Recognizing the token embedding: the subgraph that turns the token ids into hidden rows by
//! gathering rows of constant tables (`Gather(table, ids)`, then casts, nibble unpacking, zero points
//! and scales) is bound to one [`Step::Embedding`](super::Step::Embedding) over a [`LinearWeights`]
//! — the table in the encoding the linear kernels read, so a tied output layer shares it.
//!
//! The match is proven, not assumed: the subgraph as written is run on sample token ids and must
//! give, bit for bit, the rows the weights decode to. Anything else stays generic nodes.

use std::collections::HashSet;

use crate::backend::cpu::ops;
use crate::graph::{DType, Graph};
use crate::tensor::Tensor;
use crate::weights::LinearWeights;

use super::ValId;

/// The planner's view of the graph this pass reads.
pub(super) struct Graphs<'a> {
    pub graph: &'a Graph,
    pub node_in: &'a [Vec<Option<ValId>>],
    pub node_out: &'a [Vec<ValId>],
    pub consts: &'a [Option<Tensor>],
    pub consumers: &'a [Vec<usize>],
    pub graph_outputs: &'a [ValId],
    /// Nodes the planner already took (folded, absorbed or bound to a fused step).
    pub taken: &'a [bool],
}

/// An embedding found.
pub(super) struct Found {
    /// The node whose output is the hidden rows (the step takes its place).
    pub leader: usize,
    /// The other nodes of the subgraph (absorbed).
    pub absorbs: Vec<usize>,
    /// The token ids the tables are gathered with.
    pub ids: ValId,
    /// The hidden rows `[ids.., K]` f32.
    pub out: ValId,
    /// The table.
    pub w: LinearWeights,
}

impl Graphs<'_> {
    fn is_const(&self, v: Option<ValId>) -> bool {
        v.is_none_or(|v| self.consts[v].is_some())
    }

    /// The embeddings of the token ids `input_ids` (at most one per value the ids reach).
    pub fn embeddings(&self, input_ids: ValId) -> Vec<Found> {
        let g = self.graph;
        // The ids through views of them (`Reshape(input_ids, [-1])`), and the nodes that make them.
        let mut ids_vals: Vec<ValId> = vec![input_ids];
        let mut view_nodes = Vec::new();
        for (ni, n) in g.nodes.iter().enumerate() {
            let ins = &self.node_in[ni];
            if !self.taken[ni]
                && super::is_view_op(&n.op)
                && n.domain.is_empty()
                && ins
                    .first()
                    .copied()
                    .flatten()
                    .is_some_and(|v| ids_vals.contains(&v))
                && ins[1..].iter().all(|&v| self.is_const(v))
                && self.node_out[ni].len() == 1
            {
                ids_vals.push(self.node_out[ni][0]);
                view_nodes.push(ni);
            }
        }
        let mut found = Vec::new();
        for &ids in &ids_vals {
            if let Some(f) = self.embedding_of(ids, input_ids, &view_nodes) {
                found.push(f);
            }
        }
        found
    }

    /// Whether node `ni` gathers rows (axis 0) of a constant table with `ids`.
    fn gathers_with(&self, ni: usize, ids: ValId) -> bool {
        let n = &self.graph.nodes[ni];
        let ins = &self.node_in[ni];
        n.op == "Gather"
            && n.domain.is_empty()
            && n.attr_int("axis", 0) == 0
            && ins.len() == 2
            && ins[1] == Some(ids)
            && ins[0].is_some_and(|d| self.consts[d].as_ref().is_some_and(|t| t.rank() >= 1))
    }

    fn embedding_of(&self, ids: ValId, input_ids: ValId, view_nodes: &[usize]) -> Option<Found> {
        let g = self.graph;
        // The cone: the gathers, then every node that reads only constants and values of the cone.
        let mut cone: Vec<usize> = Vec::new();
        let mut in_cone: HashSet<ValId> = HashSet::new();
        for ni in 0..g.nodes.len() {
            if self.taken[ni] {
                continue;
            }
            let ins = &self.node_in[ni];
            let joins = self.gathers_with(ni, ids)
                || (!cone.is_empty()
                    && ins.iter().flatten().any(|v| in_cone.contains(v))
                    && ins
                        .iter()
                        .all(|&v| self.is_const(v) || v.is_some_and(|v| in_cone.contains(&v))));
            if joins {
                cone.push(ni);
                in_cone.extend(self.node_out[ni].iter().copied());
            }
        }
        // The last value of the cone that is the output of a closed subgraph (its other values used
        // only inside it) and that the table decodes to.
        for &leader in cone.iter().rev() {
            let [out] = self.node_out[leader][..] else {
                continue;
            };
            let members = self.ancestors(leader, &cone, &in_cone);
            if !self.closed(&members, out) {
                continue;
            }
            let tables: Vec<&Tensor> = members
                .iter()
                .filter(|&&m| self.gathers_with(m, ids))
                .filter_map(|&m| self.node_in[m][0].and_then(|d| self.consts[d].as_ref()))
                .collect();
            for w in candidates(&tables) {
                if self.proves(&w, &members, out, ids, input_ids, view_nodes) {
                    return Some(Found {
                        leader,
                        absorbs: members.into_iter().filter(|&m| m != leader).collect(),
                        ids,
                        out,
                        w,
                    });
                }
            }
        }
        None
    }

    /// The cone nodes `leader` depends on (with it), in graph order.
    fn ancestors(&self, leader: usize, cone: &[usize], in_cone: &HashSet<ValId>) -> Vec<usize> {
        let mut keep: HashSet<usize> = [leader].into_iter().collect();
        for &ni in cone.iter().rev() {
            if ni > leader || !keep.contains(&ni) {
                continue;
            }
            for v in self.node_in[ni].iter().flatten() {
                if in_cone.contains(v) {
                    if let Some(&p) = cone.iter().find(|&&c| self.node_out[c].contains(v)) {
                        keep.insert(p);
                    }
                }
            }
        }
        cone.iter().copied().filter(|c| keep.contains(c)).collect()
    }

    /// Runs `nodes` in order on the values in `env` (and the constants), adding their outputs; `None`
    /// when an input is missing or a node fails. How a pass proves a subgraph it binds to a step.
    pub(super) fn run_nodes(
        &self,
        nodes: &[usize],
        env: &mut std::collections::HashMap<ValId, Tensor>,
    ) -> Option<()> {
        for &ni in nodes {
            let args: Vec<Option<Tensor>> = self.node_in[ni]
                .iter()
                .map(|v| v.and_then(|v| env.get(&v).or(self.consts[v].as_ref()).cloned()))
                .collect();
            if args
                .iter()
                .zip(&self.node_in[ni])
                .any(|(a, v)| a.is_none() && v.is_some())
            {
                return None;
            }
            let refs: Vec<Option<&Tensor>> = args.iter().map(|a| a.as_ref()).collect();
            let outs = ops::run_node(&self.graph.nodes[ni], &refs).ok()?;
            env.extend(self.node_out[ni].iter().copied().zip(outs));
        }
        Some(())
    }

    /// Whether every value `members` make, except `out`, is read only by `members`.
    pub(super) fn closed(&self, members: &[usize], out: ValId) -> bool {
        members.iter().all(|&m| {
            self.node_out[m].iter().all(|&o| {
                o == out
                    || (!self.graph_outputs.contains(&o)
                        && self.consumers[o].iter().all(|c| members.contains(c)))
            })
        })
    }

    /// Runs the views of the ids and `members` on sample ids and compares `out` with the rows `w`
    /// decodes to, bit for bit, for two chunk lengths.
    fn proves(
        &self,
        w: &LinearWeights,
        members: &[usize],
        out: ValId,
        ids: ValId,
        input_ids: ValId,
        view_nodes: &[usize],
    ) -> bool {
        if w.n == 0 || w.k == 0 {
            return false;
        }
        let v = w.n as i64;
        let samples: [&[i64]; 2] = [&[0, v / 2 + 1, v - 1], &[v / 3]];
        samples.iter().all(|sample| {
            let sample: Vec<i64> = sample.iter().map(|&i| i.clamp(0, v - 1)).collect();
            let mut env: std::collections::HashMap<ValId, Tensor> = Default::default();
            env.insert(input_ids, Tensor::i64(&[1, sample.len()], &sample));
            let nodes: Vec<usize> = view_nodes.iter().chain(members).copied().collect();
            if self.run_nodes(&nodes, &mut env).is_none() {
                return false;
            }
            let (Some(it), Some(ot)) = (env.get(&ids), env.get(&out)) else {
                return false;
            };
            let Ok(idv) = it.to_i64_vec("ids") else {
                return false;
            };
            let mut shape = it.shape.clone();
            shape.push(w.k);
            if ot.dtype != DType::F32 || ot.shape != shape || idv != sample {
                return false;
            }
            let mut row = vec![0f32; w.k];
            idv.iter()
                .zip(ot.typed::<f32>().chunks(w.k))
                .all(|(&id, got)| {
                    w.decode_row(id as usize, &mut row);
                    row.iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits())
                })
        })
    }
}

/// The encodings the gathered tables may be: a float `[V, K]` table; int8 `[V, K]` with f32 `[V]`
/// scales; `b` u8 `[V, nb, blob]` blocks with f32 scales and optional zero points (4 or 8 bits,
/// the block size following from the blob).
fn candidates(tables: &[&Tensor]) -> Vec<LinearWeights> {
    let mut out = Vec::new();
    match tables {
        [t] if t.rank() == 2 && matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16) => {
            out.extend(LinearWeights::from_gemm_b(t, true));
        }
        [a, b]
            if a.rank() == 2 && a.dtype == DType::I8 || b.rank() == 2 && b.dtype == DType::I8 =>
        {
            let (q, s) = if a.dtype == DType::I8 { (a, b) } else { (b, a) };
            if s.dtype == DType::F32 && s.numel() == q.shape[0] {
                out.push(LinearWeights {
                    n: q.shape[0],
                    k: q.shape[1],
                    form: crate::weights::WeightForm::Int8PerChannel {
                        q: (*q).clone(),
                        scale: (*s).clone(),
                    },
                });
            }
        }
        [_, _] | [_, _, _] => {
            let Some(b) = tables
                .iter()
                .copied()
                .find(|t| t.dtype == DType::U8 && t.rank() == 3)
            else {
                return out;
            };
            let rest: Vec<&Tensor> = tables
                .iter()
                .copied()
                .filter(|t| !std::ptr::eq(*t, b))
                .collect();
            // The scales, and the zero points if any (which is which: both orders are tried, the
            // proof keeps the right one).
            let pairs: Vec<(&Tensor, Option<&Tensor>)> = match rest[..] {
                [s] => vec![(s, None)],
                [x, y] => vec![(x, Some(y)), (y, Some(x))],
                _ => Vec::new(),
            };
            let (n, nb, blob) = (b.shape[0], b.shape[1], b.shape[2]);
            for (s, z) in pairs {
                for bits in [4u32, 8] {
                    let block = blob * 8 / bits as usize;
                    out.extend(LinearWeights::block(
                        n,
                        nb * block,
                        bits,
                        block,
                        b.clone(),
                        s.clone(),
                        z,
                    ));
                }
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::graph::{Attr, DType, Dim, Graph, Initializer, Node, ValueInfo};
    use crate::plan::testutil::init;
    use crate::plan::{Plan, Step};

    fn node(op: &str, ins: &[&str], out: &str, attrs: &[(&str, Attr)]) -> Node {
        crate::plan::testutil::node(op, ins, &[out], attrs)
    }

    /// `input_ids [1, T]` → `Reshape([-1])` → `nodes` → output `x`.
    fn plan(inits: Vec<Initializer>, nodes: Vec<Node>) -> Plan {
        let mut all = vec![node("Reshape", &["input_ids", "flat"], "ids", &[])];
        all.extend(nodes);
        let mut initializers = vec![init("flat", DType::I64, &[1], &[-1i64])];
        initializers.extend(inits);
        let vi = |name: &str, dtype, shape: Vec<Dim>| ValueInfo {
            name: name.into(),
            dtype,
            shape,
        };
        Plan::new(Graph {
            name: "embedding".into(),
            inputs: vec![vi(
                "input_ids",
                DType::I64,
                vec![Dim::Known(1), Dim::Sym("T".into())],
            )],
            outputs: vec![vi("x", DType::F32, Vec::new())],
            nodes: all,
            initializers,
            ..Default::default()
        })
        .unwrap()
    }

    fn embeddings(p: &Plan) -> Vec<(usize, usize)> {
        p.steps
            .iter()
            .filter_map(|s| match s {
                Step::Embedding(e) => Some((e.w.n, e.w.k)),
                _ => None,
            })
            .collect()
    }

    /// A Q8 table written as the exporter writes it (gathers of the blocks, zero points and scales,
    /// casts, sub, mul, reshape) becomes one step, proven against the nodes.
    #[test]
    fn block_table_becomes_one_step() {
        let (v, nb) = (5usize, 2usize);
        let q: Vec<u8> = (0..v * nb * 32).map(|i| (i * 37 % 251) as u8).collect();
        let z: Vec<u8> = (0..v * nb).map(|i| 120 + i as u8).collect();
        let s: Vec<f32> = (0..v * nb).map(|i| 0.01 + i as f32 * 0.003).collect();
        let p = plan(
            vec![
                init("q", DType::U8, &[v, nb, 32], &q),
                init("z", DType::U8, &[v, nb], &z),
                init("s", DType::F32, &[v, nb], &s),
                init("last", DType::I64, &[1], &[-1i64]),
                init("shape", DType::I64, &[2], &[-1i64, (nb * 32) as i64]),
            ],
            vec![
                node("Gather", &["q", "ids"], "rows", &[]),
                node("Cast", &["rows"], "qf", &[("to", Attr::Int(1))]),
                node("Gather", &["z", "ids"], "zg", &[]),
                node("Cast", &["zg"], "zf", &[("to", Attr::Int(1))]),
                node("Unsqueeze", &["zf", "last"], "zu", &[]),
                node("Gather", &["s", "ids"], "sg", &[]),
                node("Unsqueeze", &["sg", "last"], "su", &[]),
                node("Sub", &["qf", "zu"], "c", &[]),
                node("Mul", &["c", "su"], "m", &[]),
                node("Reshape", &["m", "shape"], "x", &[]),
            ],
        );
        assert_eq!(embeddings(&p), vec![(v, nb * 32)]);
        assert_eq!((p.stats.embedding, p.stats.embedding_tied), (1, 0));
        assert_eq!(
            p.steps.len(),
            2,
            "the ids' view and the embedding: {:?}",
            p.steps
        );
    }

    /// Nodes after the gather that are not the table's decoding stay generic: the step is the gather.
    #[test]
    fn only_the_proven_part_is_taken() {
        let t: Vec<f32> = (0..12).map(|i| i as f32 - 4.5).collect();
        let p = plan(
            vec![
                init("t", DType::F32, &[4, 3], &t),
                init("two", DType::F32, &[1], &[2.0f32]),
            ],
            vec![
                node("Gather", &["t", "ids"], "rows", &[]),
                node("Mul", &["rows", "two"], "x", &[]),
            ],
        );
        assert_eq!(embeddings(&p), vec![(4, 3)]);
        assert!(p
            .steps
            .iter()
            .any(|s| matches!(s, Step::Node { node, .. } if p.graph.nodes[*node].op == "Mul")));
    }

    /// An empty table (a hostile file) is left to the generic `Gather`, without a panic.
    #[test]
    fn empty_table_is_left_alone() {
        for dims in [[0usize, 3], [4, 0]] {
            let p = plan(
                vec![init("t", DType::F32, &dims, &[] as &[f32])],
                vec![node("Gather", &["t", "ids"], "x", &[])],
            );
            assert!(embeddings(&p).is_empty(), "{dims:?}");
        }
    }
}
