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
