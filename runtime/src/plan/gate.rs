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
