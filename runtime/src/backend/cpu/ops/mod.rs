//! Generic ONNX ops on the CPU: every op the step graph may contain, executed node by node.
//!
//! The hot ops (linear layers, static-cache attention) are normally replaced by fused kernels at plan
//! time; the implementations here are the general, always-correct path and the reference the fused
//! kernels are tested against.
//!
//! One file per op family: `elementwise.rs` (arithmetic, comparisons, logic, `Cast`, `Where`, `Pow`,
//! ...), `shape.rs` (`Reshape`, `Transpose`, `Gather`, `Slice`, `Pad`, ...), `reduce.rs` (`Softmax`,
//! `CumSum`, `Reduce*`, `TopK`), `norm.rs` (`RMSNormalization`, `LayerNormalization`), `attention.rs`
//! (`Attention`, `RotaryEmbedding`), `matmul.rs` (`MatMul`, `Gemm`, `MatMulNBits`, `DequantizeLinear`),
//! `erf.rs` (erf and the exact GELU), `conv.rs` (`Conv`, its kernel in `conv_kernel.rs`). This file holds
//! the supported list, the helpers the families share (numpy broadcasting among them) and [`run_node`].

use std::borrow::Cow;

use crate::error::{Error, Result};
use crate::graph::{Attr, DType, Node};
use crate::tensor::{numel, Tensor};

mod attention;
mod conv;
mod conv_kernel;
mod elementwise;
mod erf;
mod matmul;
mod norm;
mod reduce;
mod shape;

pub(crate) use erf::{erf64, gelu_exact};
pub use shape::gather_bytes;

use attention::{attention, rotary};
use conv::conv;
use elementwise::{
    abs, arith, bit_op, cast, compare, logical, pow, unary_f32, unary_float, where_op,
};
use matmul::{dequantize_linear, gemm, matmul, matmul_nbits};
use norm::{layer_norm, rms_norm};
use reduce::{cumsum, reduce_max_mean, reduce_sum, softmax, topk};
use shape::{
    concat, expand, gather_elements, pad, range, reshape, slice, squeeze, transpose, unsqueeze,
};

/// Ops this module implements (`domain::op` for non-default domains).
pub const SUPPORTED: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "Attention",
    "BitShift",
    "BitwiseAnd",
    "Cast",
    "Concat",
    "Constant",
    "Conv",
    "CumSum",
    "DequantizeLinear",
    "Div",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Gather",
    "GatherElements",
    "Gelu",
    "Gemm",
    "Greater",
    "Identity",
    "LayerNormalization",
    "Less",
    "LessOrEqual",
    "Log",
    "MatMul",
    "Max",
    "Min",
    "Mul",
    "Neg",
    "Not",
    "Or",
    "Pad",
    "Pow",
    "RMSNormalization",
    "Range",
    "ReduceMax",
    "ReduceMean",
    "ReduceSum",
    "Reshape",
    "RotaryEmbedding",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "TopK",
    "Transpose",
    "Unsqueeze",
    "Where",
    "com.microsoft::MatMulNBits",
];

/// Key used in [`SUPPORTED`] for a node.
pub fn op_key(domain: &str, op: &str) -> String {
    if domain.is_empty() || domain == "ai.onnx" {
        op.to_string()
    } else {
        format!("{domain}::{op}")
    }
}

struct Ctx<'a> {
    node: &'a Node,
}

impl Ctx<'_> {
    fn err(&self, detail: impl Into<String>) -> Error {
        Error::node(&self.node.name, &self.node.op, detail)
    }
}

fn input<'a>(ctx: &Ctx, inputs: &'a [Option<&'a Tensor>], i: usize) -> Result<&'a Tensor> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| ctx.err(format!("input {i} is missing")))
}

fn norm_axis(ctx: &Ctx, axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    // Strict: a rank-0 tensor has no axis (ONNX ops with an axis need rank >= 1).
    if a < 0 || a >= r {
        return Err(ctx.err(format!("axis {axis} out of range for rank {rank}")));
    }
    Ok(a as usize)
}

/// Largest element count a broadcast (binary ops, `Where`, `Expand`) may produce: 64× the largest
/// broadcast a real step graph makes (a `[1, 1, chunk, cache]` mask), far below what would exhaust memory.
pub const MAX_BROADCAST_ELEMENTS: usize = 1 << 26;

/// Numpy-style broadcast of two shapes; `None` when they do not broadcast or the result would hold more
/// than [`MAX_BROADCAST_ELEMENTS`].
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    // A broadcast result is allocated element by element (with an offset table): bound it, so that a
    // few small constants cannot make a load or a step allocate gigabytes.
    out.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_BROADCAST_ELEMENTS)?;
    Some(out)
}

/// For every element of `out_shape`, the linear index into a tensor of `in_shape` broadcast to it.
fn broadcast_offsets(in_shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let r = out_shape.len();
    let mut strides = vec![0usize; r];
    let mut s = 1;
    for i in (0..in_shape.len()).rev() {
        let oi = i + r - in_shape.len();
        strides[oi] = if in_shape[i] == 1 { 0 } else { s };
        s *= in_shape[i];
    }
    broadcast_offsets_with(out_shape, &strides)
}

/// Linear offsets for iterating `shape` with explicit per-dimension `strides`.
fn broadcast_offsets_with(shape: &[usize], strides: &[usize]) -> Vec<usize> {
    let r = shape.len();
    let n = numel(shape);
    let mut offs = Vec::with_capacity(n);
    let mut idx = vec![0usize; r];
    let mut off = 0usize;
    for _ in 0..n {
        offs.push(off);
        for d in (0..r).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < shape[d] {
                break;
            }
            off -= strides[d] * idx[d];
            idx[d] = 0;
        }
    }
    offs
}

fn attr_dtype(ctx: &Ctx, key: &str) -> Result<DType> {
    let code = ctx.node.attr_int(key, -1);
    DType::from_onnx(code as i32).ok_or_else(|| ctx.err(format!("unsupported `{key}` {code}")))
}

fn axes_input(ctx: &Ctx, inputs: &[Option<&Tensor>], i: usize) -> Result<Option<Vec<i64>>> {
    match inputs.get(i).copied().flatten() {
        Some(t) => Ok(Some(t.to_i64_vec(&ctx.node.name)?)),
        None => Ok(ctx.node.attr_ints("axes").map(|v| v.to_vec())),
    }
}

/// Largest element count a `Conv` or `Pad` output may have (1 GiB of f32): a few hostile attribute
/// values must not make a step allocate without bound.
const MAX_OUTPUT_ELEMENTS: usize = 1 << 28;

/// A float tensor's (f32, f16, bf16) elements as f32, borrowed when they already are.
fn floats<'a>(ctx: &Ctx, t: &'a Tensor) -> Result<Cow<'a, [f32]>> {
    match t.dtype {
        DType::F32 => Ok(Cow::Borrowed(t.typed())),
        DType::F16 | DType::BF16 => Ok(Cow::Owned(t.to_f32_vec(&ctx.node.name)?)),
        d => Err(ctx.err(format!("{} on {d} is not supported", ctx.node.op))),
    }
}

/// A string attribute, or `default` when absent.
fn attr_str<'a>(ctx: &'a Ctx, key: &str, default: &'a str) -> Result<&'a str> {
    match ctx.node.attrs.get(key) {
        None => Ok(default),
        Some(Attr::Str(s)) => Ok(s),
        Some(a) => Err(ctx.err(format!("attribute `{key}` is {a:?}, not a string"))),
    }
}

/// Executes one node with its inputs (`None` = absent optional input) and returns its outputs.
pub fn run_node(node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let ctx = Ctx { node };
    let i = |k| input(&ctx, inputs, k);
    let name = node.name.as_str();
    let one = |t: Tensor| Ok(vec![t]);
    match op_key(&node.domain, &node.op).as_str() {
        "Identity" => one(i(0)?.clone()),
        "Add" | "Sub" | "Mul" | "Div" => {
            if inputs.len() != 2 {
                return Err(ctx.err("exactly two inputs are supported"));
            }
            one(arith(&ctx, i(0)?, i(1)?)?)
        }
        // Variadic: one input or more, broadcast together.
        "Max" | "Min" => {
            let mut acc = i(0)?.clone();
            for k in 1..inputs.len() {
                acc = arith(&ctx, &acc, i(k)?)?;
            }
            one(acc)
        }
        "Less" | "LessOrEqual" | "Greater" | "Equal" => one(compare(&ctx, i(0)?, i(1)?)?),
        "And" | "Or" => one(logical(&ctx, i(0)?, i(1)?)?),
        "Not" => {
            let a = i(0)?;
            a.expect(DType::Bool, name)?;
            let v: Vec<u8> = a.typed::<u8>().iter().map(|&x| (x == 0) as u8).collect();
            one(Tensor::from_slice(DType::Bool, &a.shape, &v))
        }
        "Neg" => match i(0)?.dtype {
            DType::I64 => {
                let a = i(0)?;
                let v: Vec<i64> = a.typed::<i64>().iter().map(|&x| -x).collect();
                one(Tensor::i64(&a.shape, &v))
            }
            _ => one(unary_f32(&ctx, i(0)?, |x| -x)?),
        },
        "Sigmoid" => one(unary_f32(&ctx, i(0)?, |x| 1.0 / (1.0 + (-x).exp()))?),
        "Exp" => one(unary_f32(&ctx, i(0)?, f32::exp)?),
        "Tanh" => one(unary_f32(&ctx, i(0)?, f32::tanh)?),
        "Gelu" => match node.attrs.get("approximate") {
            None => one(unary_float(&ctx, i(0)?, gelu_exact)?),
            Some(Attr::Str(s)) if s == "none" => one(unary_float(&ctx, i(0)?, gelu_exact)?),
            Some(Attr::Str(s)) if s == "tanh" => {
                one(unary_float(&ctx, i(0)?, super::misc::gelu_tanh)?)
            }
            Some(a) => Err(ctx.err(format!("approximate {a:?}: takes \"none\" or \"tanh\""))),
        },
        "Sqrt" => one(unary_f32(&ctx, i(0)?, f32::sqrt)?),
        "Log" => one(unary_float(&ctx, i(0)?, f32::ln)?),
        "Abs" => one(abs(&ctx, i(0)?)?),
        "Erf" => one(unary_float(&ctx, i(0)?, |x| erf64(x as f64) as f32)?),
        "Pow" => one(pow(&ctx, i(0)?, i(1)?)?),
        "Cast" => one(cast(&ctx, i(0)?, attr_dtype(&ctx, "to")?)?),
        "Constant" => match node.attrs.get("value") {
            Some(Attr::Tensor(t)) => one(Tensor::mapped(t.dtype, &t.dims, t.data.clone())),
            _ => Err(ctx.err("only the `value` tensor form of Constant is supported")),
        },
        "Shape" => {
            let a = i(0)?;
            let r = a.rank() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clamp(node.attr_int("start", 0));
            let end = clamp(node.attr_int("end", r));
            let dims: Vec<i64> = a.shape[start..end.max(start)]
                .iter()
                .map(|&d| d as i64)
                .collect();
            one(Tensor::i64(&[dims.len()], &dims))
        }
        "Reshape" => {
            let spec = i(1)?.to_i64_vec(name)?;
            one(reshape(
                &ctx,
                i(0)?,
                &spec,
                node.attr_int("allowzero", 0) != 0,
            )?)
        }
        "Squeeze" => one(squeeze(&ctx, i(0)?, axes_input(&ctx, inputs, 1)?)?),
        "Unsqueeze" => {
            let axes = axes_input(&ctx, inputs, 1)?.ok_or_else(|| ctx.err("axes missing"))?;
            one(unsqueeze(&ctx, i(0)?, &axes)?)
        }
        "Gather" => {
            let data = i(0)?;
            let idx = i(1)?;
            let ax = norm_axis(&ctx, node.attr_int("axis", 0), data.rank())?;
            one(gather_bytes(
                data,
                &idx.to_i64_vec(name)?,
                &idx.shape,
                ax,
                name,
            )?)
        }
        "GatherElements" => one(gather_elements(&ctx, i(0)?, i(1)?)?),
        "Transpose" => {
            let a = i(0)?;
            let perm: Vec<usize> = match node.attr_ints("perm") {
                Some(p) => p
                    .iter()
                    .map(|&x| norm_axis(&ctx, x, a.rank()))
                    .collect::<Result<_>>()?,
                None => (0..a.rank()).rev().collect(),
            };
            let mut seen = perm.clone();
            seen.sort_unstable();
            if seen != (0..a.rank()).collect::<Vec<_>>() {
                return Err(ctx.err(format!("perm {perm:?} is not a permutation")));
            }
            one(transpose(a, &perm))
        }
        "Concat" => {
            let parts: Vec<&Tensor> = inputs.iter().copied().flatten().collect();
            one(concat(&ctx, &parts, node.attr_int("axis", 0))?)
        }
        "Expand" => one(expand(&ctx, i(0)?, &i(1)?.to_i64_vec(name)?)?),
        "Where" => one(where_op(&ctx, i(0)?, i(1)?, i(2)?)?),
        "Range" => one(range(&ctx, i(0)?, i(1)?, i(2)?)?),
        "Softmax" => one(softmax(&ctx, i(0)?)?),
        "CumSum" => one(cumsum(&ctx, i(0)?, i(1)?)?),
        "ReduceSum" => one(reduce_sum(&ctx, i(0)?, axes_input(&ctx, inputs, 1)?)?),
        "ReduceMax" | "ReduceMean" => {
            one(reduce_max_mean(&ctx, i(0)?, axes_input(&ctx, inputs, 1)?)?)
        }
        "LayerNormalization" => layer_norm(&ctx, inputs),
        "Pad" => one(pad(&ctx, inputs)?),
        "Slice" => one(slice(&ctx, inputs)?),
        "Conv" => one(conv(&ctx, inputs)?),
        "TopK" => topk(&ctx, i(0)?, i(1)?),
        "BitwiseAnd" | "BitShift" => one(bit_op(&ctx, i(0)?, i(1)?)?),
        "RMSNormalization" => one(rms_norm(&ctx, i(0)?, i(1)?)?),
        "RotaryEmbedding" => one(rotary(&ctx, inputs)?),
        "Attention" => one(attention(&ctx, inputs)?),
        "MatMul" => one(matmul(&ctx, i(0)?, i(1)?)?),
        "Gemm" => one(gemm(&ctx, inputs)?),
        "DequantizeLinear" => one(dequantize_linear(&ctx, inputs)?),
        "com.microsoft::MatMulNBits" => one(matmul_nbits(&ctx, inputs)?),
        other => Err(ctx.err(format!("op `{other}` is not supported"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn node(op: &str, attrs: &[(&str, Attr)]) -> Node {
        Node {
            name: format!("t.{op}"),
            op: op.into(),
            domain: String::new(),
            inputs: vec![],
            outputs: vec![],
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    pub(super) fn run(op: &str, attrs: &[(&str, Attr)], ins: &[&Tensor]) -> Result<Vec<Tensor>> {
        let v: Vec<Option<&Tensor>> = ins.iter().map(|t| Some(*t)).collect();
        run_node(&node(op, attrs), &v)
    }

    /// The loader's list and `run_node`'s arms agree: every listed op reaches an arm of its own (called
    /// without inputs it fails on a missing input, not as an unknown op), and an op that is not listed
    /// is refused as unknown.
    #[test]
    fn supported_list_matches_the_op_arms() {
        for key in SUPPORTED {
            let (domain, op) = key.split_once("::").unwrap_or(("", key));
            let n = Node {
                domain: domain.into(),
                ..node(op, &[])
            };
            if let Err(e) = run_node(&n, &[]) {
                assert!(!e.to_string().contains("is not supported"), "{key}: {e}");
            }
        }
        for op in ["Relu", "Einsum", "NonZero", "Floor"] {
            assert!(!SUPPORTED.contains(&op));
            let e = run_node(&node(op, &[]), &[]).unwrap_err().to_string();
            assert!(e.contains(&format!("op `{op}` is not supported")), "{e}");
        }
    }

    #[test]
    fn broadcasts_are_bounded() {
        // 2^20 x 2^20 from two 4 MB constants: refused before anything is allocated.
        let a = Tensor::zeros(DType::U8, &[1 << 20, 1]);
        let b = Tensor::zeros(DType::U8, &[1, 1 << 20]);
        assert!(run("And", &[], &[&a, &b]).is_err());
        let one = Tensor::f32(&[1], &[1.0]);
        assert!(run(
            "Expand",
            &[],
            &[&one, &Tensor::i64(&[3], &[1 << 20, 1 << 20, 1 << 20])]
        )
        .is_err());
        assert!(run(
            "Expand",
            &[],
            &[&one, &Tensor::i64(&[2], &[i64::MAX, i64::MAX])]
        )
        .is_err());
    }
}
