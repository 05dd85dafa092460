//! Pass: the residual epilogue. `Add(linear(x), other)` — the linear layer's output read by nothing
//! else, `other` ready before the layer runs — is done by the layer: `out = x·Wᵀ (+ bias) + other`. The
//! CPU adds `other` to the output it just wrote (the `Add`'s broadcasting where the shapes differ); the
//! GPU in the linear kernel's epilogue.

use super::view::Planning;
use super::{Residual, Step, ValId};
use crate::error::Result;

/// Node `ni`'s two distinct operands when it is an `Add` a residual fusion may take (the fusion on).
pub(super) fn residual_add(p: &Planning, ni: usize) -> Option<(ValId, ValId)> {
    let n = &p.graph.nodes[ni];
    let ins = &p.node_in[ni];
    if !p.options.residual || n.op != "Add" || !n.domain.is_empty() || ins.len() != 2 {
        return None;
    }
    let (Some(a), Some(b)) = (ins[0], ins[1]) else {
        return None;
    };
    (a != b).then_some((a, b))
}

/// Moves node `ni` into the epilogue of the linear layer before it when it is a residual `Add` of
/// that layer's output; whether it did.
pub(super) fn residual(p: &mut Planning, ni: usize) -> Result<bool> {
    let Some((a, b)) = residual_add(p, ni) else {
        return Ok(false);
    };
    let found = [(a, b, true), (b, a, false)]
        .into_iter()
        .find_map(|(y, other, linear_first)| {
            let li = p.producer[y]?;
            let is_linear = matches!(
                &p.kind[li],
                Some(Step::Linear { residual: None, out, .. }) if *out == y
            );
            // The other input exists when the layer runs: a constant, a graph input or a node's
            // output from before it.
            let ready = p.consts[other].is_some() || p.producer[other].is_none_or(|pi| pi < li);
            (is_linear && ready && p.only_consumer(y, ni)).then_some((li, other, linear_first))
        });
    let Some((li, other, linear_first)) = found else {
        return Ok(false);
    };
    let added = p.node_out[ni][0];
    if let Some(Step::Linear { residual, out, .. }) = p.kind[li].as_mut() {
        *residual = Some(Residual {
            add: ni,
            other,
            linear_first,
        });
        *out = added;
    }
    p.absorbed[ni] = true;
    p.stats.residual += 1;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use crate::graph::{Attr, DType};
    use crate::plan::testutil::{assert_same, graph, init, node, noise};
    use crate::plan::{Plan, PlanOptions, Step};

    fn w(seed: u64) -> crate::graph::Initializer {
        let v = noise(&[40], seed).typed::<f32>().to_vec();
        init("w", DType::F32, &[5, 8], &v)
    }

    /// `h + Gemm(x)` (either order) becomes the linear layer with the residual in its epilogue; with
    /// the fusion off, the `Add` stays.
    #[test]
    fn a_residual_add_goes_into_the_linear() {
        for first in [true, false] {
            let ins = if first { ["xw", "h"] } else { ["h", "xw"] };
            let g = graph(
                &[("x", &[3, 8]), ("h", &[3, 5])],
                &["y"],
                vec![
                    node("Gemm", &["x", "w"], &["xw"], &[("transB", Attr::Int(1))]),
                    node("Add", &ins, &["y"], &[]),
                ],
                vec![w(1)],
            );
            let inputs = [("x", noise(&[3, 8], 2)), ("h", noise(&[3, 5], 3))];
            let p = Plan::new(g.clone()).unwrap();
            assert_eq!(p.stats.residual, 1);
            match &p.steps[..] {
                [Step::Linear {
                    residual: Some(r),
                    out,
                    ..
                }] => {
                    assert_eq!((r.linear_first, *out), (first, p.outputs["y"]));
                }
                s => panic!("expected one linear step with a residual, got {s:?}"),
            }
            assert_same(&g, &p, &inputs, 1e-6);
            let options = PlanOptions {
                residual: false,
                ..PlanOptions::default()
            };
            let off = Plan::with_options(g.clone(), options).unwrap();
            assert_eq!((off.stats.residual, off.steps.len()), (0, 2));
            assert_same(&g, &off, &inputs, 1e-6);
        }
    }

    /// A residual that broadcasts (`[5]` over `[3, 5]`, not a bias: not constant) runs as the `Add`
    /// would.
    #[test]
    fn a_broadcast_residual_adds_as_the_graph_does() {
        let g = graph(
            &[("x", &[3, 8]), ("h", &[5])],
            &["y"],
            vec![
                node("Gemm", &["x", "w"], &["xw"], &[("transB", Attr::Int(1))]),
                node("Add", &["h", "xw"], &["y"], &[]),
            ],
            vec![w(4)],
        );
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.stats.residual, 1);
        assert_same(
            &g,
            &p,
            &[("x", noise(&[3, 8], 5)), ("h", noise(&[5], 6))],
            1e-6,
        );
    }

    /// An `other` computed after the layer, or a layer output read twice, keeps the `Add` apart.
    #[test]
    fn a_late_or_shared_operand_stays_generic() {
        let g = graph(
            &[("x", &[3, 8])],
            &["y"],
            vec![
                node("Gemm", &["x", "w"], &["xw"], &[("transB", Attr::Int(1))]),
                node("Neg", &["xw"], &["late"], &[]),
                node("Add", &["xw", "late"], &["y"], &[]),
            ],
            vec![w(7)],
        );
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.stats.residual, 0);
        assert_same(&g, &p, &[("x", noise(&[3, 8], 8))], 1e-6);

        let g = graph(
            &[("x", &[3, 8]), ("h", &[3, 5])],
            &["y"],
            vec![
                node("Gemm", &["x", "w"], &["xw"], &[("transB", Attr::Int(1))]),
                node("Neg", &["h"], &["late"], &[]),
                node("Add", &["xw", "late"], &["y"], &[]),
            ],
            vec![w(9)],
        );
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.stats.residual, 0);
        let inputs = [("x", noise(&[3, 8], 10)), ("h", noise(&[3, 5], 11))];
        assert_same(&g, &p, &inputs, 1e-6);
    }
}
