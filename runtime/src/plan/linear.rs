//! Passes: linear layers. A `Gemm`/`MatMulNBits` with constant weights becomes a [`Step::Linear`] bound
//! to [`LinearWeights`] that read the mapped bytes in place; a bias `Add` after one (`MatMulNBits` has
//! no bias of its own in our graphs) moves into its epilogue.

use std::sync::Arc;

use super::view::Planning;
use super::{Step, ValId};
use crate::error::{Error, Result};
use crate::graph::DType;
use crate::tensor::Tensor;
use crate::weights::LinearWeights;

/// Binds node `ni` to its weights when it is a linear layer; whether it did.
pub(super) fn layer(p: &mut Planning, ni: usize) -> Result<bool> {
    let Some((w, bias)) = linear_for(p, ni)? else {
        return Ok(false);
    };
    let n = &p.graph.nodes[ni];
    let x = p.node_in[ni][0].ok_or_else(|| Error::node(&n.name, &n.op, "input A missing"))?;
    p.stats.linear_weight_bytes += w.byte_len();
    p.kind[ni] = Some(Step::Linear {
        node: ni,
        x,
        w: Arc::new(w),
        bias,
        residual: None,
        out: p.node_out[ni][0],
    });
    p.stats.linear += 1;
    Ok(true)
}

/// Moves node `ni` into the epilogue of the linear layer before it when it adds a constant `[N]` f32
/// bias to that layer's output (read by nothing else); whether it did.
pub(super) fn bias(p: &mut Planning, ni: usize) -> Result<bool> {
    let n = &p.graph.nodes[ni];
    let ins = &p.node_in[ni];
    if n.op != "Add" || !n.domain.is_empty() || ins.len() != 2 {
        return Ok(false);
    }
    let found = (0..2).find_map(|side| {
        let (y, b) = (ins[side]?, ins[1 - side]?);
        let li = p.producer[y]?;
        let bt = p.consts[b].as_ref()?;
        match &p.kind[li] {
            Some(Step::Linear { w, bias: None, .. })
                if bt.dtype == DType::F32
                    && bt.numel() == w.n
                    && bt.shape.last() == Some(&w.n)
                    && p.only_consumer(y, ni) =>
            {
                Some((li, bt.clone()))
            }
            _ => None,
        }
    });
    let Some((li, bt)) = found else {
        return Ok(false);
    };
    let added = p.node_out[ni][0];
    if let Some(Step::Linear { bias, out, .. }) = p.kind[li].as_mut() {
        *bias = Some(Tensor::f32(&[bt.numel()], bt.typed::<f32>()));
        *out = added;
    }
    p.absorbed[ni] = true;
    p.stats.linear_bias += 1;
    Ok(true)
}

/// The weights (and bias) of node `ni` when it is a linear layer: `MatMulNBits` with constant weights,
/// or `Gemm` (`transB`, no scaling) whose `B` is a constant, a `Cast` of one, or an int8
/// `DequantizeLinear` per output channel without zero points.
fn linear_for(p: &Planning, ni: usize) -> Result<Option<(LinearWeights, Option<Tensor>)>> {
    let (n, ins, consts, producer, graph, node_in) = (
        &p.graph.nodes[ni],
        &p.node_in[ni],
        &p.consts,
        &p.producer,
        &p.graph,
        &p.node_in,
    );
    let c = |v: Option<ValId>| v.and_then(|v| consts[v].as_ref());
    let bias_of = |v: Option<ValId>, nout: usize| -> Result<Option<Tensor>> {
        match v {
            None => Ok(None),
            Some(_) => match c(v) {
                Some(t) if t.numel() == nout => {
                    Ok(Some(Tensor::f32(&[nout], &t.to_f32_vec(&n.name)?)))
                }
                _ => Err(Error::node(&n.name, &n.op, "bias must be a constant [N]")),
            },
        }
    };
    match (n.domain.as_str(), n.op.as_str()) {
        ("com.microsoft", "MatMulNBits") => {
            let args: Vec<Option<&Tensor>> = ins.iter().map(|&v| c(v)).collect();
            if args.len() < 3 || args[1].is_none() || args[2].is_none() {
                return Ok(None);
            }
            if ins.get(3).copied().flatten().is_some() && args[3].is_none() {
                return Ok(None);
            }
            let w = LinearWeights::from_matmul_nbits(n, &args)
                .map_err(|e| Error::node(&n.name, &n.op, e))?;
            let bias = bias_of(ins.get(5).copied().flatten(), w.n)?;
            Ok(Some((w, bias)))
        }
        ("", "Gemm") => {
            if n.attr_int("transA", 0) != 0
                || n.attr_float("alpha", 1.0) != 1.0
                || n.attr_float("beta", 1.0) != 1.0
                || n.attr_int("transB", 0) == 0
            {
                return Ok(None);
            }
            let Some(b) = ins.get(1).copied().flatten() else {
                return Ok(None);
            };
            let w = if let Some(t) = c(Some(b)) {
                LinearWeights::from_gemm_b(t, true).map_err(|e| Error::node(&n.name, &n.op, e))?
            } else if let Some(pi) = producer[b] {
                let p = &graph.nodes[pi];
                let pin = &node_in[pi];
                match p.op.as_str() {
                    "Cast" if p.attr_int("to", 0) == DType::F32.onnx_code() as i64 => {
                        match c(pin[0]) {
                            Some(t) => LinearWeights::from_gemm_b(t, true)
                                .map_err(|e| Error::node(&n.name, &n.op, e))?,
                            None => return Ok(None),
                        }
                    }
                    "DequantizeLinear" => {
                        let (q, s) = (c(pin[0]), c(pin.get(1).copied().flatten()));
                        let zp = pin.get(2).copied().flatten();
                        let zero_ok = match zp {
                            None => true,
                            Some(_) => c(zp).is_some_and(|z| z.bytes().iter().all(|&b| b == 0)),
                        };
                        match (q, s) {
                            (Some(q), Some(s))
                                if q.dtype == DType::I8
                                    && q.rank() == 2
                                    && s.dtype == DType::F32
                                    && s.numel() == q.shape[0]
                                    && p.attr_int("axis", 1) == 0
                                    && p.attr_int("block_size", 0) == 0
                                    && zero_ok =>
                            {
                                LinearWeights {
                                    n: q.shape[0],
                                    k: q.shape[1],
                                    form: crate::weights::WeightForm::Int8PerChannel {
                                        q: q.clone(),
                                        scale: s.clone(),
                                    },
                                }
                            }
                            _ => return Ok(None),
                        }
                    }
                    _ => return Ok(None),
                }
            } else {
                return Ok(None);
            };
            let bias = bias_of(ins.get(2).copied().flatten(), w.n)?;
            Ok(Some((w, bias)))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use crate::graph::{Attr, DType};
    use crate::plan::testutil::{assert_same, graph, init, node, noise};
    use crate::plan::{Plan, Step};

    fn f32s(n: usize, seed: u64) -> Vec<f32> {
        noise(&[n], seed).typed::<f32>().to_vec()
    }

    /// `Gemm(x, W, transB)` with a constant `W` becomes a linear layer, and the `Add` of a constant
    /// `[N]` bias after it moves into its epilogue; the plan computes what the graph does.
    #[test]
    fn gemm_and_its_bias_become_one_linear_step() {
        let g = graph(
            &[("x", &[3, 8])],
            &["y"],
            vec![
                node("Gemm", &["x", "w"], &["xw"], &[("transB", Attr::Int(1))]),
                node("Add", &["b", "xw"], &["y"], &[]),
            ],
            vec![
                init("w", DType::F32, &[5, 8], &f32s(40, 1)),
                init("b", DType::F32, &[5], &f32s(5, 2)),
            ],
        );
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!((p.stats.linear, p.stats.linear_bias), (1, 1));
        match &p.steps[..] {
            [Step::Linear { bias, out, .. }] => {
                assert!(bias.is_some());
                assert_eq!(*out, p.outputs["y"]);
            }
            s => panic!("expected one linear step, got {s:?}"),
        }
        assert_same(&g, &p, &[("x", noise(&[3, 8], 3))], 1e-6);
    }

    /// 4-bit `MatMulNBits` with constant weights, scales and zero points becomes a linear layer.
    #[test]
    fn matmul_nbits_becomes_a_linear_step() {
        let (n, k) = (3usize, 64usize);
        let codes: Vec<u8> = (0..n * k / 2).map(|i| (i * 37 % 251) as u8).collect();
        let zp: Vec<u8> = (0..n).map(|i| (0x87 + i) as u8).collect();
        let g = graph(
            &[("x", &[2, k])],
            &["y"],
            vec![crate::graph::Node {
                domain: "com.microsoft".into(),
                ..node(
                    "MatMulNBits",
                    &["x", "q", "s", "z"],
                    &["y"],
                    &[
                        ("K", Attr::Int(k as i64)),
                        ("N", Attr::Int(n as i64)),
                        ("bits", Attr::Int(4)),
                        ("block_size", Attr::Int(32)),
                    ],
                )
            }],
            vec![
                init("q", DType::U8, &[n, 2, 16], &codes),
                init("s", DType::F32, &[n * 2], &f32s(n * 2, 4)),
                init("z", DType::U8, &[n], &zp),
            ],
        );
        let p = Plan::new(g.clone()).unwrap();
        assert!(matches!(p.steps[..], [Step::Linear { .. }]));
        assert_same(&g, &p, &[("x", noise(&[2, k], 5))], 1e-5);
    }

    /// What the kernel does not take stays generic: a `Gemm` with `transA`, a bias its output's
    /// other readers also see.
    #[test]
    fn other_forms_stay_generic() {
        let g = graph(
            &[("x", &[8, 3])],
            &["y"],
            vec![node(
                "Gemm",
                &["x", "w"],
                &["y"],
                &[("transA", Attr::Int(1)), ("transB", Attr::Int(1))],
            )],
            vec![init("w", DType::F32, &[5, 8], &f32s(40, 6))],
        );
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!((p.stats.linear, p.stats.generic), (0, 1));
        assert_same(&g, &p, &[("x", noise(&[8, 3], 7))], 1e-6);

        let g = graph(
            &[("x", &[1, 8])],
            &["y", "xw"],
            vec![
                node("Gemm", &["x", "w"], &["xw"], &[("transB", Attr::Int(1))]),
                node("Add", &["xw", "b"], &["y"], &[]),
            ],
            vec![
                init("w", DType::F32, &[5, 8], &f32s(40, 8)),
                init("b", DType::F32, &[5], &f32s(5, 9)),
            ],
        );
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!((p.stats.linear, p.stats.linear_bias), (1, 0));
        assert_same(&g, &p, &[("x", noise(&[1, 8], 10))], 1e-6);
    }
}
