//! Pass: the residual after a norm. `Add(other, RMSNormalization(x, scale))` — the norm over the last
//! axis with a constant scale, its output read by nothing else, `other` ready before the norm runs —
//! is one [`Step::NormResidual`]: Gemma's norms after the attention and after the MLP, each of which
//! a plain graph runs as a norm and an `Add` over the hidden state. The CPU runs the two nodes' ops in
//! turn (the `Add` in place where the shapes agree); the GPU adds `other` in the norm kernel's
//! epilogue. Off with the residual epilogue ([`PlanOptions::residual`](super::PlanOptions)).

use super::view::Planning;
use super::{NormResidual, Residual, Step};
use crate::error::Result;

/// Binds node `ni` (an `Add`) and the norm producing one of its operands to one step; whether it did.
pub(super) fn norm_residual(p: &mut Planning, ni: usize) -> Result<bool> {
    let Some((a, b)) = super::residual::residual_add(p, ni) else {
        return Ok(false);
    };
    let found = [(a, b, true), (b, a, false)]
        .into_iter()
        .find_map(|(y, other, norm_first)| {
            let (norm, x) = p.folded_norm(y, ni)?;
            // The other operand exists when the norm runs: a constant, a graph input or an earlier
            // node's output.
            let ready =
                p.consts[other].is_some() || p.producer[other].is_none_or(|pi| pi < norm.node);
            ready.then_some((norm, x, other, norm_first))
        });
    let Some((norm, x, other, norm_first)) = found else {
        return Ok(false);
    };
    p.absorbed[ni] = true;
    p.kind[norm.node] = Some(Step::NormResidual(NormResidual {
        norm,
        x,
        residual: Residual {
            add: ni,
            other,
            linear_first: norm_first,
        },
        out: p.node_out[ni][0],
    }));
    p.stats.norm_residual += 1;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use crate::graph::{Attr, DType, Graph};
    use crate::plan::testutil::{assert_same, graph, init, node, noise};
    use crate::plan::{Plan, PlanOptions, Step};

    /// `h + RMSNormalization(x)` (the norm's output first or second), `extra` reading the norm's output
    /// too when set.
    fn post_norm(norm_first: bool, extra: bool) -> Graph {
        let ins = if norm_first { ["xn", "h"] } else { ["h", "xn"] };
        let mut nodes = vec![
            node(
                "RMSNormalization",
                &["x", "scale"],
                &["xn"],
                &[("epsilon", Attr::Float(1e-6))],
            ),
            node("Add", &ins, &["y"], &[]),
        ];
        let mut outs = vec!["y"];
        if extra {
            nodes.push(node("Neg", &["xn"], &["z"], &[]));
            outs.push("z");
        }
        let scale = noise(&[8], 1).typed::<f32>().to_vec();
        graph(
            &[("x", &[3, 8]), ("h", &[3, 8])],
            &outs,
            nodes,
            vec![init("scale", DType::F32, &[8], &scale)],
        )
    }

    fn inputs() -> [(&'static str, crate::tensor::Tensor); 2] {
        [("x", noise(&[3, 8], 2)), ("h", noise(&[3, 8], 3))]
    }

    /// Either operand order: one step computing exactly what the two nodes do; off with the residual
    /// fusion.
    #[test]
    fn a_norm_then_its_residual_add_becomes_one_step() {
        for first in [true, false] {
            let g = post_norm(first, false);
            let p = Plan::new(g.clone()).unwrap();
            assert_eq!((p.stats.norm_residual, p.steps.len()), (1, 1));
            let Step::NormResidual(nr) = &p.steps[0] else {
                panic!("{:?}", p.steps);
            };
            assert_eq!(nr.residual.linear_first, first);
            assert_eq!((nr.norm.epsilon, nr.out), (1e-6, p.outputs["y"]));
            assert_same(&g, &p, &inputs(), 0.0);
            let off = PlanOptions {
                residual: false,
                ..PlanOptions::default()
            };
            let p = Plan::with_options(g.clone(), off).unwrap();
            assert_eq!((p.stats.norm_residual, p.steps.len()), (0, 2));
        }
    }

    /// A norm output another node reads, or an operand computed after the norm, keeps the nodes.
    #[test]
    fn a_shared_norm_or_a_late_operand_stays_two_nodes() {
        let g = post_norm(true, true);
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.stats.norm_residual, 0);
        assert_same(&g, &p, &inputs(), 0.0);

        let mut g = post_norm(true, false);
        g.nodes[1].inputs[1] = "late".into();
        g.nodes.insert(1, node("Neg", &["h"], &["late"], &[]));
        g.nodes.swap(0, 1);
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.stats.norm_residual, 1, "Neg before the norm: ready");
        let mut g = post_norm(true, false);
        g.nodes[1].inputs[1] = "late".into();
        g.nodes.insert(1, node("Neg", &["h"], &["late"], &[]));
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.stats.norm_residual, 0, "Neg after the norm: not ready");
        assert_same(&g, &p, &inputs(), 0.0);
    }
}
