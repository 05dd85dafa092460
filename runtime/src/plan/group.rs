//! Pass: linear groups. Linear layers reading one value (q/k/v; gate/up) become one
//! [`Step::LinearGroup`], with the `RMSNormalization` producing that value folded in where only they
//! read it, and the SiLU gate joining a pair folded in where it is their only reader. A lone linear
//! after such a norm (the output layer) is a group of one. What a group may hold is the backend's
//! say ([`GroupCaps`]): a GPU runs a group as one dispatch over the members' stacked weights, so it
//! takes only weights its kernels have, of one encoding, within one binding.

use std::collections::BTreeMap;

use super::view::Planning;
use super::{Gate, GroupCaps, GroupNorm, LinearGroup, Step, ValId};
use crate::weights::LinearWeights;

/// Binds every set of linear layers sharing an input (and the norm before, the gate after) that
/// `p.options.linear_groups` allows into one step, at its first member's place.
pub(super) fn groups(p: &mut Planning) {
    let Some(caps) = p.options.linear_groups else {
        return;
    };
    // (found once: the groups have distinct inputs, and binding one changes no reader of another's
    // input, members' outputs or norm)
    let readers = p.step_readers();
    let mut by_x: BTreeMap<ValId, Vec<usize>> = BTreeMap::new();
    for (ni, k) in p.kind.iter().enumerate() {
        // A layer with a residual in its epilogue runs alone.
        if let Some(Step::Linear {
            x, residual: None, ..
        }) = k
        {
            by_x.entry(*x).or_default().push(ni);
        }
    }
    for (x, members) in by_x {
        if let Some(found) = find(p, &caps, &readers, x, members) {
            bind(p, found);
        }
    }
}

/// A group found: its members' nodes (in concatenation order), the norm's node with its input and
/// scale, the gate's node.
struct Found {
    x: ValId,
    members: Vec<usize>,
    norm: Option<(usize, ValId, ValId)>,
    gate: Option<usize>,
}

/// The members' weights, in node order.
fn weights(p: &Planning, members: &[usize]) -> Vec<std::sync::Arc<LinearWeights>> {
    members
        .iter()
        .filter_map(|&m| match &p.kind[m] {
            Some(Step::Linear { w, .. }) => Some(w.clone()),
            _ => None,
        })
        .collect()
}

/// The group of the linear layers `members` reading `x`, when `caps` allow one.
fn find(
    p: &Planning,
    caps: &GroupCaps,
    readers: &[Vec<usize>],
    x: ValId,
    mut members: Vec<usize>,
) -> Option<Found> {
    let ws = weights(p, &members);
    let refs: Vec<&LinearWeights> = ws.iter().map(|w| &**w).collect();
    let bytes: usize = refs.iter().map(|w| w.byte_len()).sum();
    if members.len() > caps.max_members
        || !refs.iter().all(|w| (caps.takes)(w))
        || !LinearWeights::stackable(&refs)
        || bytes as u64 > caps.max_bytes
    {
        return None;
    }
    let out = |m: usize| match &p.kind[m] {
        Some(Step::Linear { out, .. }) => *out,
        _ => usize::MAX,
    };
    let is_output = |v: ValId| p.graph_outputs.contains(&v);
    // The members' outputs share one buffer on a GPU: none may be a graph output.
    if members.len() > 1 && members.iter().any(|&m| is_output(out(m))) {
        return None;
    }
    let only_members = {
        let mut r = readers[x].clone();
        r.sort_unstable();
        r == members && !is_output(x)
    };
    let norm = p.producer[x]
        .filter(|_| caps.norm && only_members)
        .and_then(|ni| folds_norm(p, ni, refs[0].k).map(|(xin, scale)| (ni, xin, scale)));
    let mut gate = None;
    if let (&[a, b], true) = (&members[..], caps.gate) {
        let (oa, ob) = (out(a), out(b));
        let only = |o: ValId| readers[o].len() == 1 && !is_output(o);
        if only(oa) && only(ob) && readers[oa] == readers[ob] {
            let gi = readers[oa][0];
            if let Some(Step::Gate(Gate { g, u, .. })) = &p.kind[gi] {
                if (*g, *u) == (ob, oa) {
                    members.swap(0, 1);
                    gate = Some(gi);
                } else if (*g, *u) == (oa, ob) {
                    gate = Some(gi);
                }
            }
        }
    }
    (members.len() > 1 || norm.is_some()).then_some(Found {
        x,
        members,
        norm,
        gate,
    })
}

/// Node `ni`'s input and scale when it is a norm a step can do ([`Planning::norm_node`]) over `k`
/// features.
fn folds_norm(p: &Planning, ni: usize, k: usize) -> Option<(ValId, ValId)> {
    let (norm, x) = p.norm_node(ni)?;
    let k_ok = p.consts[norm.scale]
        .as_ref()
        .is_some_and(|t| t.numel() == k);
    k_ok.then_some((x, norm.scale))
}

/// Moves the found members, norm and gate into one step at the first member's node.
fn bind(p: &mut Planning, f: Found) {
    let leader = *f.members.iter().min().unwrap_or(&f.members[0]);
    let members: Vec<Step> = f.members.iter().filter_map(|&m| p.kind[m].take()).collect();
    for &m in &f.members {
        p.absorbed[m] = true;
    }
    let norm = f.norm.map(|(ni, x, scale)| {
        p.absorbed[ni] = true;
        GroupNorm {
            node: ni,
            x,
            scale,
            epsilon: p.graph.nodes[ni].attr_float("epsilon", 1e-5),
        }
    });
    let gate = f.gate.and_then(|gi| match p.kind[gi].take() {
        Some(Step::Gate(g)) => {
            p.absorbed[gi] = true;
            Some(g)
        }
        _ => None,
    });
    p.stats.linear_groups += 1;
    p.stats.group_norms += usize::from(norm.is_some());
    p.stats.group_gates += usize::from(gate.is_some());
    p.absorbed[leader] = false;
    p.kind[leader] = Some(Step::LinearGroup(LinearGroup {
        norm,
        x: f.x,
        members,
        gate,
    }));
}

#[cfg(test)]
mod tests {
    use crate::graph::{Attr, DType, Graph, Node};
    use crate::plan::testutil::{assert_same, graph, init, node, noise};
    use crate::plan::{GateAct, GroupCaps, Plan, PlanOptions, Step};
    use crate::tensor::Tensor;

    const K: usize = 8;

    fn f32s(n: usize, seed: u64) -> Vec<f32> {
        noise(&[n], seed).typed::<f32>().to_vec()
    }

    fn gemm(x: &str, w: &str, y: &str) -> Node {
        node("Gemm", &[x, w], &[y], &[("transB", Attr::Int(1))])
    }

    fn norm() -> Node {
        node(
            "RMSNormalization",
            &["x", "scale"],
            &["n"],
            &[("epsilon", Attr::Float(1e-5))],
        )
    }

    /// `RMSNormalization(x)` read by three linear layers (q 6 rows, k and v 4); q negated, k and v
    /// multiplied (not added: an `Add` would go into v's epilogue).
    fn qkv() -> Graph {
        let mut inits = vec![init("scale", DType::F32, &[K], &f32s(K, 9))];
        for (i, (w, n)) in [("wq", 6), ("wk", 4), ("wv", 4)].into_iter().enumerate() {
            inits.push(init(w, DType::F32, &[n, K], &f32s(n * K, i as u64)));
        }
        graph(
            &[("x", &[2, K])],
            &["qs", "kv"],
            vec![
                norm(),
                gemm("n", "wq", "q"),
                gemm("n", "wk", "k"),
                gemm("n", "wv", "v"),
                node("Mul", &["k", "v"], &["kv"], &[]),
                node("Neg", &["q"], &["qs"], &[]),
            ],
            inits,
        )
    }

    /// `up` before `gate` in the graph, joined by `Mul(Mul(gate, Sigmoid(gate)), up)`.
    fn mlp() -> Graph {
        mlp_with(vec![
            node("Sigmoid", &["gate"], &["sg"], &[]),
            node("Mul", &["gate", "sg"], &["act"], &[]),
        ])
    }

    /// `up` before `gate`, joined by `act` (nodes from `gate` to `act`) and `Mul(act, up)`.
    fn mlp_with(act: Vec<Node>) -> Graph {
        let mut nodes = vec![norm(), gemm("n", "wu", "up"), gemm("n", "wg", "gate")];
        nodes.extend(act);
        nodes.push(node("Mul", &["act", "up"], &["y"], &[]));
        graph(
            &[("x", &[3, K])],
            &["y"],
            nodes,
            vec![
                init("scale", DType::F32, &[K], &f32s(K, 9)),
                init("wu", DType::F32, &[5, K], &f32s(5 * K, 1)),
                init("wg", DType::F32, &[5, K], &f32s(5 * K, 2)),
            ],
        )
    }

    fn with(caps: Option<GroupCaps>) -> PlanOptions {
        PlanOptions {
            linear_groups: caps,
            ..PlanOptions::default()
        }
    }

    fn x(rows: usize) -> Vec<(&'static str, Tensor)> {
        vec![("x", noise(&[rows, K], 4))]
    }

    /// q/k/v and the norm before them become one step; its outputs are what the nodes compute.
    #[test]
    fn qkv_and_their_norm_become_one_step() {
        let g = qkv();
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(
            (
                p.stats.linear_groups,
                p.stats.group_norms,
                p.stats.group_gates
            ),
            (1, 1, 0)
        );
        let Step::LinearGroup(gr) = &p.steps[0] else {
            panic!("expected the group first: {:?}", p.steps);
        };
        assert_eq!(gr.members.len(), 3);
        assert!(gr.norm.is_some() && gr.gate.is_none());
        assert_eq!(p.steps.len(), 3, "the group, the Mul and the Neg");
        assert_same(&g, &p, &x(2), 1e-6);
    }

    /// gate/up with their SiLU: the gate's layer stacked first whatever the graph's order.
    #[test]
    fn gate_and_up_with_their_silu_become_one_step() {
        let g = mlp();
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.steps.len(), 1);
        let Step::LinearGroup(gr) = &p.steps[0] else {
            panic!("{:?}", p.steps);
        };
        let outs: Vec<_> = gr.linears().map(|(_, o)| p.names[o].as_str()).collect();
        assert_eq!(outs, ["gate", "up"]);
        assert!(gr.gate.is_some());
        assert_same(&g, &p, &x(3), 1e-6);
    }

    /// Gemma's GeGLU: gate/up with `Mul(Gelu(gate, approximate="tanh"), up)` fold the same way.
    #[test]
    fn gate_and_up_with_their_gelu_become_one_step() {
        let g = mlp_with(vec![node(
            "Gelu",
            &["gate"],
            &["act"],
            &[("approximate", Attr::Str("tanh".into()))],
        )]);
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.steps.len(), 1, "{:?}", p.steps);
        let Step::LinearGroup(gr) = &p.steps[0] else {
            panic!("{:?}", p.steps);
        };
        assert_eq!(gr.gate.as_ref().map(|g| g.act), Some(GateAct::GeluTanh));
        let outs: Vec<_> = gr.linears().map(|(_, o)| p.names[o].as_str()).collect();
        assert_eq!(outs, ["gate", "up"]);
        assert_eq!((p.stats.group_gates, p.stats.gelu_gate), (1, 1));
        assert_same(&g, &p, &x(3), 1e-6);
    }

    /// What the backend's caps leave out stays out: no norm or gate folded, too many members, weights
    /// it does not take, too many bytes, no groups at all.
    #[test]
    fn the_caps_bound_the_groups() {
        let plain = GroupCaps {
            norm: false,
            gate: false,
            ..GroupCaps::ANY
        };
        let p = Plan::with_options(mlp(), with(Some(plain))).unwrap();
        assert_eq!(
            (
                p.stats.linear_groups,
                p.stats.group_norms,
                p.stats.group_gates
            ),
            (1, 0, 0)
        );
        assert_same(&mlp(), &p, &x(3), 1e-6);
        for caps in [
            GroupCaps {
                max_members: 2,
                norm: false,
                ..GroupCaps::ANY
            },
            GroupCaps {
                takes: |w| w.n != 4,
                norm: false,
                ..GroupCaps::ANY
            },
            GroupCaps {
                max_bytes: 4 * 13 * K as u64,
                norm: false,
                ..GroupCaps::ANY
            },
        ] {
            let p = Plan::with_options(qkv(), with(Some(caps))).unwrap();
            assert_eq!(p.stats.linear_groups, 0, "{caps:?}");
        }
        let p = Plan::with_options(qkv(), with(None)).unwrap();
        assert_eq!((p.stats.linear_groups, p.steps.len()), (0, 6));
    }

    /// Two members whose output is a graph output do not share a buffer: no group (a norm read by
    /// another node stays a node too).
    #[test]
    fn a_member_graph_output_or_a_shared_norm_refuses() {
        let mut g = qkv();
        g.outputs.push(g.outputs[0].clone());
        g.outputs[1].name = "q".into();
        let p = Plan::with_options(g, with(Some(GroupCaps::ANY))).unwrap();
        assert_eq!(p.stats.linear_groups, 0);
        let mut g = mlp();
        g.outputs.push(g.outputs[0].clone());
        g.outputs[1].name = "n".into();
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!((p.stats.linear_groups, p.stats.group_norms), (1, 0));
        assert_same(&g, &p, &x(3), 1e-6);
    }
}
