//! Pass: the gated MLP's activation. `Mul(Mul(g, Sigmoid(g)), u)` whose intermediates nothing else reads
//! becomes one [`Step::SiluGate`] (`SiLU(g)·u`).

use super::view::Planning;
use super::{SiluGate, Step};
use crate::error::Result;

/// Binds node `ni` (the outer `Mul`) and the two nodes before it to one SiLU gate; whether it did.
pub(super) fn silu_gate(p: &mut Planning, ni: usize) -> Result<bool> {
    let n = &p.graph.nodes[ni];
    let ins = &p.node_in[ni];
    if n.op != "Mul" || !n.domain.is_empty() || ins.len() != 2 {
        return Ok(false);
    }
    let found = (0..2).find_map(|side| {
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
            .then_some((g, u, ai, si))
        })
    });
    let Some((g, u, ai, si)) = found else {
        return Ok(false);
    };
    p.absorbed[ai] = true;
    p.absorbed[si] = true;
    p.kind[ni] = Some(Step::SiluGate(SiluGate {
        node: ni,
        g,
        u,
        out: p.node_out[ni][0],
    }));
    p.stats.silu_gate += 1;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use crate::plan::testutil::{assert_same, graph, node, noise};
    use crate::plan::{Plan, Step};

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
        assert!(matches!(p.steps[..], [Step::SiluGate(_)]));
        assert_same(&g, &p, &inputs(), 1e-6);
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
