//! Pass: the gated MLP's activation. `Mul(Mul(g, Sigmoid(g)), u)` (SiLU) or `Mul(Gelu(g,
//! approximate="tanh"), u)` (GELU-tanh) whose intermediates nothing else reads becomes one
//! [`Step::Gate`] (`act(g)·u`).

use super::view::Planning;
use super::{Gate, GateAct, Step, ValId};
use crate::error::Result;
use crate::graph::Attr;

/// A gate found at an outer `Mul`: its activation, `g`, `u` and the nodes it absorbs.
type Found = (GateAct, ValId, ValId, Vec<usize>);

/// Binds node `ni` (the outer `Mul`) and the nodes before it to one gate; whether it did.
pub(super) fn gate(p: &mut Planning, ni: usize) -> Result<bool> {
    let n = &p.graph.nodes[ni];
    if n.op != "Mul" || !n.domain.is_empty() || p.node_in[ni].len() != 2 {
        return Ok(false);
    }
    let Some((act, g, u, absorbed)) = silu(p, ni).or_else(|| gelu_tanh(p, ni)) else {
        return Ok(false);
    };
    for a in absorbed {
        p.absorbed[a] = true;
    }
    p.kind[ni] = Some(Step::Gate(Gate {
        node: ni,
        act,
        g,
        u,
        out: p.node_out[ni][0],
    }));
    match act {
        GateAct::Silu => p.stats.silu_gate += 1,
        GateAct::GeluTanh => p.stats.gelu_gate += 1,
    }
    Ok(true)
}

/// `Mul(Mul(g, Sigmoid(g)), u)`, either operand order at both `Mul`s.
fn silu(p: &Planning, ni: usize) -> Option<Found> {
    let ins = &p.node_in[ni];
    (0..2).find_map(|side| {
        let (a, u) = (ins[side]?, ins[1 - side]?);
        let ai = p.producer[a]?;
        let an = &p.graph.nodes[ai];
        if an.op != "Mul" || p.node_in[ai].len() != 2 || !p.only_consumer(a, ni) {
            return None;
        }
        (0..2).find_map(|gs| {
            let (g, sg) = (p.node_in[ai][gs]?, p.node_in[ai][1 - gs]?);
            let si = p.producer[sg]?;
            (p.graph.nodes[si].op == "Sigmoid"
                && p.node_in[si].first().copied().flatten() == Some(g)
                && p.only_consumer(sg, ai))
            .then(|| (GateAct::Silu, g, u, vec![ai, si]))
        })
    })
}

/// `Mul(Gelu(g, approximate="tanh"), u)`, either operand order.
fn gelu_tanh(p: &Planning, ni: usize) -> Option<Found> {
    let ins = &p.node_in[ni];
    (0..2).find_map(|side| {
        let (a, u) = (ins[side]?, ins[1 - side]?);
        let gi = p.producer[a]?;
        let gn = &p.graph.nodes[gi];
        let tanh = matches!(gn.attrs.get("approximate"), Some(Attr::Str(s)) if s == "tanh");
        if gn.op != "Gelu" || !gn.domain.is_empty() || !tanh || !p.only_consumer(a, ni) {
            return None;
        }
        let g = p.node_in[gi].first().copied().flatten()?;
        Some((GateAct::GeluTanh, g, u, vec![gi]))
    })
}

#[cfg(test)]
mod tests {
    use crate::graph::Attr;
    use crate::plan::testutil::{assert_same, graph, node, noise};
    use crate::plan::{Gate, GateAct, Plan, Step};

    fn gated(outputs: &[&str]) -> crate::graph::Graph {
        graph(
            &[("g", &[2, 6]), ("u", &[2, 6])],
            outputs,
            vec![
                node("Sigmoid", &["g"], &["sg"], &[]),
                node("Mul", &["sg", "g"], &["a"], &[]),
                node("Mul", &["u", "a"], &["y"], &[]),
            ],
            Vec::new(),
        )
    }

    fn inputs() -> Vec<(&'static str, crate::tensor::Tensor)> {
        vec![("g", noise(&[2, 6], 1)), ("u", noise(&[2, 6], 2))]
    }

    /// `Mul(u, Mul(Sigmoid(g), g))` (either operand order) becomes one SiLU gate.
    #[test]
    fn the_gate_becomes_one_step() {
        let g = gated(&["y"]);
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.stats.silu_gate, 1);
        assert!(matches!(p.steps[..], [Step::Gate(_)]));
        assert_same(&g, &p, &inputs(), 1e-6);
    }

    fn gelu_gated(approximate: Option<&str>) -> crate::graph::Graph {
        let attrs: Vec<(&str, Attr)> = approximate
            .map(|a| ("approximate", Attr::Str(a.into())))
            .into_iter()
            .collect();
        graph(
            &[("g", &[2, 6]), ("u", &[2, 6])],
            &["y"],
            vec![
                node("Gelu", &["g"], &["a"], &attrs),
                node("Mul", &["u", "a"], &["y"], &[]),
            ],
            Vec::new(),
        )
    }

    /// `Mul(u, Gelu(g, approximate="tanh"))` becomes one GELU-tanh gate, computing what the nodes do.
    #[test]
    fn the_gelu_tanh_gate_becomes_one_step() {
        let g = gelu_gated(Some("tanh"));
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!((p.stats.gelu_gate, p.stats.silu_gate), (1, 0));
        assert!(matches!(
            p.steps[..],
            [Step::Gate(Gate {
                act: GateAct::GeluTanh,
                ..
            })]
        ));
        assert_same(&g, &p, &inputs(), 1e-6);
    }

    /// The exact GELU (no approximation, or `"none"`) is not the fused kernel's: it stays generic.
    #[test]
    fn the_exact_gelu_stays_generic() {
        for a in [None, Some("none")] {
            let g = gelu_gated(a);
            let p = Plan::new(g.clone()).unwrap();
            assert_eq!((p.stats.gelu_gate, p.stats.generic), (0, 2), "{a:?}");
            // The executor runs the exact GELU through its kernel (backend/cpu/gelu.rs: erfc in f64
            // lanes), within 2 units in the last place of the generic op.
            assert_same(&g, &p, &inputs(), 1e-6);
        }
    }

    /// An intermediate someone else reads (here, a graph output) keeps the nodes apart.
    #[test]
    fn a_shared_intermediate_stays_generic() {
        let g = gated(&["y", "a"]);
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!((p.stats.silu_gate, p.stats.generic), (0, 3));
        assert_same(&g, &p, &inputs(), 0.0);
    }
}
