//! Pass: constant folding. Zero-copy views of constants (`Reshape(scales)`), small constant subgraphs
//! and `Constant` nodes become constants at plan time — never what feeds a linear layer's weights
//! (that would expand them to f32) and never a subgraph over a large constant.

use super::is_view_op;
use super::view::Planning;
use crate::backend::cpu::ops;
use crate::error::Result;
use crate::tensor::Tensor;

/// Constant subgraphs whose inputs exceed this many elements are not folded (they would copy weights).
const FOLD_LIMIT: usize = 1 << 16;

/// Folds node `ni` when its inputs are constants (or it is a `Constant`); whether it did.
pub(super) fn fold(p: &mut Planning, ni: usize) -> Result<bool> {
    let n = &p.graph.nodes[ni];
    let ins = &p.node_in[ni];
    let all_const = ins.iter().all(|&v| p.is_const(v));
    let fold = if n.op == "Constant" {
        true
    } else if !all_const || ins.is_empty() {
        false
    } else if is_view_op(&n.op) {
        true
    } else if feeds_weights(p, ni) {
        false
    } else {
        let big = ins
            .iter()
            .flatten()
            .any(|&v| p.consts[v].as_ref().is_some_and(|t| t.numel() > FOLD_LIMIT));
        !big && n.op != "Gemm" && n.op != "MatMulNBits"
    };
    if !fold {
        return Ok(false);
    }
    let args: Vec<Option<&Tensor>> = ins
        .iter()
        .map(|v| v.and_then(|v| p.consts[v].as_ref()))
        .collect();
    let outs = ops::run_node(n, &args)?;
    for (&o, t) in p.node_out[ni].iter().zip(outs) {
        p.consts[o] = Some(t);
    }
    p.absorbed[ni] = true;
    p.stats.folded += 1;
    Ok(true)
}

/// Whether an output of node `ni` is a weight input of a `Gemm`, `MatMul` or `MatMulNBits`.
fn feeds_weights(p: &Planning, ni: usize) -> bool {
    p.node_out[ni].iter().any(|&o| {
        p.consumers[o].iter().any(|&c| {
            let cn = &p.graph.nodes[c];
            matches!(cn.op.as_str(), "Gemm" | "MatMul" | "MatMulNBits")
                && p.node_in[c].iter().skip(1).any(|&v| v == Some(o))
        })
    })
}

#[cfg(test)]
mod tests {
    use crate::graph::{Attr, DType};
    use crate::plan::testutil::{assert_same, graph, init, node, noise};
    use crate::plan::{Plan, Step};

    fn f32s(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.25 - 1.0).collect()
    }

    /// A view of a constant and a small subgraph over constants fold; the step reading them is all
    /// that is left, and computes what the graph does.
    #[test]
    fn views_and_small_constant_subgraphs_fold() {
        let g = graph(
            &[("x", &[2, 3])],
            &["y"],
            vec![
                node("Reshape", &["w", "shape"], &["w2"], &[]),
                node("Mul", &["w2", "two"], &["w3"], &[]),
                node("Add", &["x", "w3"], &["y"], &[]),
            ],
            vec![
                init("w", DType::F32, &[6], &f32s(6)),
                init("shape", DType::I64, &[2], &[2i64, 3]),
                init("two", DType::F32, &[1], &[2.0f32]),
            ],
        );
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.stats.folded, 2);
        assert!(matches!(p.steps[..], [Step::Node { .. }]));
        assert_same(&g, &p, &[("x", noise(&[2, 3], 1))], 0.0);
    }

    /// `Constant` nodes fold.
    #[test]
    fn constant_nodes_fold() {
        let c = crate::graph::Initializer {
            name: String::new(),
            ..init("c", DType::F32, &[3], &[1.0f32, 2.0, 3.0])
        };
        let g = graph(
            &[("x", &[3])],
            &["y"],
            vec![
                node("Constant", &[], &["k"], &[("value", Attr::Tensor(c))]),
                node("Mul", &["x", "k"], &["y"], &[]),
            ],
            Vec::new(),
        );
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!((p.stats.folded, p.steps.len()), (1, 1));
        assert_same(&g, &p, &[("x", noise(&[3], 2))], 0.0);
    }

    /// A subgraph over a constant beyond the fold limit stays (folding would copy it), as does a
    /// `Cast` that feeds a linear layer's weights (folding would expand them to f32: the linear
    /// pass reads them through the cast instead).
    #[test]
    fn large_constants_and_weights_stay() {
        let n = super::FOLD_LIMIT + 1;
        let g = graph(
            &[("x", &[n])],
            &["y"],
            vec![
                node("Mul", &["big", "two"], &["big2"], &[]),
                node("Add", &["x", "big2"], &["y"], &[]),
            ],
            vec![
                init("big", DType::F32, &[n], &f32s(n)),
                init("two", DType::F32, &[1], &[2.0f32]),
            ],
        );
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!((p.stats.folded, p.stats.generic), (0, 2));
        assert_same(&g, &p, &[("x", noise(&[n], 3))], 0.0);

        let w: Vec<half::f16> = f32s(12).into_iter().map(half::f16::from_f32).collect();
        let g = graph(
            &[("x", &[1, 4])],
            &["y"],
            vec![
                node("Cast", &["w16"], &["w"], &[("to", Attr::Int(1))]),
                node("Gemm", &["x", "w"], &["y"], &[("transB", Attr::Int(1))]),
            ],
            vec![init("w16", DType::F16, &[3, 4], &w)],
        );
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!((p.stats.folded, p.stats.linear), (0, 1));
        assert!(matches!(p.steps[..], [Step::Linear { .. }]));
        assert_same(&g, &p, &[("x", noise(&[1, 4], 4))], 1e-6);
    }
}
