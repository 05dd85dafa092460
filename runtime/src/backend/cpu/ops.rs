//! Generic ONNX ops on the CPU: every op the step graph may contain, executed node by node.
//!
//! The hot ops (linear layers, static-cache attention) are normally replaced by fused kernels at plan
//! time; the implementations here are the general, always-correct path and the reference the fused
//! kernels are tested against.

use std::borrow::Cow;

use bytemuck::Pod;
use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::graph::{Attr, DType, Node};
use crate::tensor::{numel, Tensor};

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

fn binary<A: Pod, B: Pod, O: Pod>(
    ctx: &Ctx,
    a: &Tensor,
    b: &Tensor,
    odt: DType,
    f: impl Fn(A, B) -> O,
) -> Result<Tensor> {
    let shape = broadcast_shape(&a.shape, &b.shape).ok_or_else(|| {
        ctx.err(format!(
            "shapes {:?} and {:?} do not broadcast",
            a.shape, b.shape
        ))
    })?;
    let (av, bv) = (a.typed::<A>(), b.typed::<B>());
    Ok(Tensor::build(odt, &shape, |o: &mut [O]| {
        if a.shape == shape && b.shape == shape {
            for i in 0..o.len() {
                o[i] = f(av[i], bv[i]);
            }
        } else if a.shape == shape && bv.len() == 1 {
            for i in 0..o.len() {
                o[i] = f(av[i], bv[0]);
            }
        } else if b.shape == shape && av.len() == 1 {
            for i in 0..o.len() {
                o[i] = f(av[0], bv[i]);
            }
        } else {
            let oa = broadcast_offsets(&a.shape, &shape);
            let ob = broadcast_offsets(&b.shape, &shape);
            for i in 0..o.len() {
                o[i] = f(av[oa[i]], bv[ob[i]]);
            }
        }
    }))
}

fn same_dtype(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<DType> {
    if a.dtype != b.dtype {
        return Err(ctx.err(format!("mixed dtypes {} and {}", a.dtype, b.dtype)));
    }
    Ok(a.dtype)
}

fn arith(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dt = same_dtype(ctx, a, b)?;
    let op = ctx.node.op.as_str();
    macro_rules! int_arith {
        ($t:ty) => {{
            let f: fn($t, $t) -> $t = match op {
                "Add" => <$t>::wrapping_add,
                "Sub" => <$t>::wrapping_sub,
                "Mul" => <$t>::wrapping_mul,
                "Div" => |x, y| if y == 0 { 0 } else { x.wrapping_div(y) },
                "Max" => <$t>::max,
                "Min" => <$t>::min,
                _ => unreachable!(),
            };
            binary(ctx, a, b, dt, f)
        }};
    }
    match dt {
        // One `binary` per op (not a function pointer): the element loops inline the op.
        DType::F32 => match op {
            "Add" => binary(ctx, a, b, dt, |x: f32, y: f32| x + y),
            "Sub" => binary(ctx, a, b, dt, |x: f32, y: f32| x - y),
            "Mul" => binary(ctx, a, b, dt, |x: f32, y: f32| x * y),
            "Div" => binary(ctx, a, b, dt, |x: f32, y: f32| x / y),
            "Max" => binary(ctx, a, b, dt, f32::max),
            "Min" => binary(ctx, a, b, dt, f32::min),
            _ => unreachable!(),
        },
        // Integers wrap on overflow; division truncates toward zero (by zero: 0, where ONNX leaves it
        // undefined).
        DType::I64 => int_arith!(i64),
        DType::I32 => int_arith!(i32),
        DType::I8 => int_arith!(i8),
        DType::U8 => int_arith!(u8),
        d => Err(ctx.err(format!("{op} on {d} is not supported"))),
    }
}

fn compare(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dt = same_dtype(ctx, a, b)?;
    let op = ctx.node.op.as_str();
    macro_rules! cmp {
        ($t:ty) => {{
            match op {
                "Less" => binary(ctx, a, b, DType::Bool, |x: $t, y: $t| u8::from(x < y)),
                "LessOrEqual" => binary(ctx, a, b, DType::Bool, |x: $t, y: $t| u8::from(x <= y)),
                "Greater" => binary(ctx, a, b, DType::Bool, |x: $t, y: $t| u8::from(x > y)),
                "Equal" => binary(ctx, a, b, DType::Bool, |x: $t, y: $t| u8::from(x == y)),
                _ => unreachable!(),
            }
        }};
    }
    match dt {
        DType::F32 => cmp!(f32),
        DType::I64 => cmp!(i64),
        DType::I32 => cmp!(i32),
        DType::I8 => cmp!(i8),
        DType::U8 => cmp!(u8),
        DType::Bool if op == "Equal" => cmp!(u8),
        d => Err(ctx.err(format!("{op} on {d} is not supported"))),
    }
}

fn logical(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.expect(DType::Bool, &ctx.node.name)?;
    b.expect(DType::Bool, &ctx.node.name)?;
    match ctx.node.op.as_str() {
        "And" => binary(ctx, a, b, DType::Bool, |x: u8, y: u8| x & y),
        _ => binary(ctx, a, b, DType::Bool, |x: u8, y: u8| x | y),
    }
}

fn unary_f32(ctx: &Ctx, a: &Tensor, f: impl Fn(f32) -> f32) -> Result<Tensor> {
    let v = a.as_f32(&ctx.node.name)?;
    Ok(Tensor::build(DType::F32, &a.shape, |o: &mut [f32]| {
        for (o, &x) in o.iter_mut().zip(v) {
            *o = f(x);
        }
    }))
}

fn cast(ctx: &Ctx, a: &Tensor, to: DType) -> Result<Tensor> {
    if a.dtype == to {
        return Ok(a.clone());
    }
    macro_rules! from_f32 {
        ($src:expr) => {{
            let src: Vec<f32> = $src;
            Ok(match to {
                DType::F32 => Tensor::f32(&a.shape, &src),
                DType::F16 => Tensor::build(to, &a.shape, |o: &mut [f16]| {
                    o.iter_mut()
                        .zip(&src)
                        .for_each(|(o, &s)| *o = f16::from_f32(s))
                }),
                DType::BF16 => Tensor::build(to, &a.shape, |o: &mut [bf16]| {
                    o.iter_mut()
                        .zip(&src)
                        .for_each(|(o, &s)| *o = bf16::from_f32(s))
                }),
                DType::I64 => Tensor::build(to, &a.shape, |o: &mut [i64]| {
                    o.iter_mut().zip(&src).for_each(|(o, &s)| *o = s as i64)
                }),
                DType::I32 => Tensor::build(to, &a.shape, |o: &mut [i32]| {
                    o.iter_mut().zip(&src).for_each(|(o, &s)| *o = s as i32)
                }),
                DType::U8 => Tensor::build(to, &a.shape, |o: &mut [u8]| {
                    o.iter_mut().zip(&src).for_each(|(o, &s)| *o = s as u8)
                }),
                DType::I8 => Tensor::build(to, &a.shape, |o: &mut [i8]| {
                    o.iter_mut().zip(&src).for_each(|(o, &s)| *o = s as i8)
                }),
                DType::Bool => Tensor::build(to, &a.shape, |o: &mut [u8]| {
                    o.iter_mut()
                        .zip(&src)
                        .for_each(|(o, &s)| *o = (s != 0.0) as u8)
                }),
            })
        }};
    }
    // Integer → integer casts stay exact through i64.
    let int_src: Option<Vec<i64>> = match a.dtype {
        DType::I64 => Some(a.typed::<i64>().to_vec()),
        DType::I32 => Some(a.typed::<i32>().iter().map(|&v| v as i64).collect()),
        DType::U8 | DType::Bool => Some(a.typed::<u8>().iter().map(|&v| v as i64).collect()),
        DType::I8 => Some(a.typed::<i8>().iter().map(|&v| v as i64).collect()),
        _ => None,
    };
    if let (Some(src), true) = (
        &int_src,
        matches!(
            to,
            DType::I64 | DType::I32 | DType::U8 | DType::I8 | DType::Bool
        ),
    ) {
        return Ok(match to {
            DType::I64 => Tensor::i64(&a.shape, src),
            DType::I32 => Tensor::build(to, &a.shape, |o: &mut [i32]| {
                o.iter_mut().zip(src).for_each(|(o, &s)| *o = s as i32)
            }),
            DType::U8 => Tensor::build(to, &a.shape, |o: &mut [u8]| {
                o.iter_mut().zip(src).for_each(|(o, &s)| *o = s as u8)
            }),
            DType::I8 => Tensor::build(to, &a.shape, |o: &mut [i8]| {
                o.iter_mut().zip(src).for_each(|(o, &s)| *o = s as i8)
            }),
            _ => Tensor::build(to, &a.shape, |o: &mut [u8]| {
                o.iter_mut()
                    .zip(src)
                    .for_each(|(o, &s)| *o = (s != 0) as u8)
            }),
        });
    }
    let src: Vec<f32> = match a.dtype {
        DType::U8 | DType::Bool => a.typed::<u8>().iter().map(|&v| v as f32).collect(),
        DType::I8 => a.typed::<i8>().iter().map(|&v| v as f32).collect(),
        _ => a.to_f32_vec(&ctx.node.name)?,
    };
    from_f32!(src)
}

fn attr_dtype(ctx: &Ctx, key: &str) -> Result<DType> {
    let code = ctx.node.attr_int(key, -1);
    DType::from_onnx(code as i32).ok_or_else(|| ctx.err(format!("unsupported `{key}` {code}")))
}

fn reshape(ctx: &Ctx, a: &Tensor, spec: &[i64], allowzero: bool) -> Result<Tensor> {
    let mut shape = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                shape.push(1);
            }
            0 if !allowzero => shape.push(
                *a.shape
                    .get(i)
                    .ok_or_else(|| ctx.err(format!("shape entry 0 at {i} has no source dim")))?,
            ),
            d if d >= 0 => shape.push(d as usize),
            d => return Err(ctx.err(format!("bad shape entry {d}"))),
        }
    }
    let n = a.numel();
    if let Some(i) = infer {
        let rest: usize = shape.iter().product();
        if rest == 0 || !n.is_multiple_of(rest) {
            return Err(ctx.err(format!("cannot reshape {:?} to {:?}", a.shape, spec)));
        }
        shape[i] = n / rest;
    }
    if numel(&shape) != n {
        return Err(ctx.err(format!("cannot reshape {:?} to {:?}", a.shape, spec)));
    }
    Ok(a.reshaped(shape))
}

fn axes_input(ctx: &Ctx, inputs: &[Option<&Tensor>], i: usize) -> Result<Option<Vec<i64>>> {
    match inputs.get(i).copied().flatten() {
        Some(t) => Ok(Some(t.to_i64_vec(&ctx.node.name)?)),
        None => Ok(ctx.node.attr_ints("axes").map(|v| v.to_vec())),
    }
}

fn squeeze(ctx: &Ctx, a: &Tensor, axes: Option<Vec<i64>>) -> Result<Tensor> {
    let rank = a.rank();
    let drop: Vec<usize> = match axes {
        Some(ax) => ax
            .iter()
            .map(|&x| norm_axis(ctx, x, rank))
            .collect::<Result<_>>()?,
        None => (0..rank).filter(|&i| a.shape[i] == 1).collect(),
    };
    for &d in &drop {
        if a.shape[d] != 1 {
            return Err(ctx.err(format!("cannot squeeze axis {d} of {:?}", a.shape)));
        }
    }
    let shape = (0..rank)
        .filter(|i| !drop.contains(i))
        .map(|i| a.shape[i])
        .collect();
    Ok(a.reshaped(shape))
}

fn unsqueeze(ctx: &Ctx, a: &Tensor, axes: &[i64]) -> Result<Tensor> {
    let out_rank = a.rank() + axes.len();
    let mut ax: Vec<usize> = axes
        .iter()
        .map(|&x| norm_axis(ctx, x, out_rank))
        .collect::<Result<_>>()?;
    ax.sort_unstable();
    let mut shape = Vec::with_capacity(out_rank);
    let mut src = a.shape.iter();
    for i in 0..out_rank {
        if ax.contains(&i) {
            shape.push(1);
        } else {
            shape.push(*src.next().ok_or_else(|| ctx.err("bad unsqueeze axes"))?);
        }
    }
    Ok(a.reshaped(shape))
}

/// Byte-level gather along `axis` (any dtype).
pub fn gather_bytes(
    data: &Tensor,
    indices: &[i64],
    idx_shape: &[usize],
    axis: usize,
    what: &str,
) -> Result<Tensor> {
    let es = data.dtype.size();
    let outer: usize = data.shape[..axis].iter().product();
    let dim = data.shape[axis];
    let inner: usize = data.shape[axis + 1..].iter().product::<usize>() * es;
    let mut shape = data.shape[..axis].to_vec();
    shape.extend_from_slice(idx_shape);
    shape.extend_from_slice(&data.shape[axis + 1..]);
    let src = data.bytes();
    let mut out = Tensor::zeros(data.dtype, &shape);
    let o = out.bytes_mut();
    let mut w = 0;
    for ob in 0..outer {
        for &ix in indices {
            let i = if ix < 0 { ix + dim as i64 } else { ix };
            if i < 0 || i >= dim as i64 {
                return Err(Error::tensor(
                    what,
                    format!("index {ix} out of range for dimension of size {dim}"),
                ));
            }
            let s = (ob * dim + i as usize) * inner;
            o[w..w + inner].copy_from_slice(&src[s..s + inner]);
            w += inner;
        }
    }
    Ok(out)
}

fn transpose(a: &Tensor, perm: &[usize]) -> Tensor {
    let es = a.dtype.size();
    let r = a.rank();
    let shape: Vec<usize> = perm.iter().map(|&p| a.shape[p]).collect();
    // Moving only dimensions of size 1 keeps the memory order: a view, no copy (decode's T = 1).
    let moved: Vec<usize> = perm.iter().copied().filter(|&p| a.shape[p] != 1).collect();
    if moved.windows(2).all(|w| w[0] < w[1]) {
        return a.reshaped(shape);
    }
    let mut in_strides = vec![0usize; r];
    let mut s = 1;
    for i in (0..r).rev() {
        in_strides[i] = s;
        s *= a.shape[i];
    }
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let src = a.bytes();
    let mut out = Tensor::zeros(a.dtype, &shape);
    let o = out.bytes_mut();
    // An innermost dimension that stays innermost is contiguous on both sides: copied as one run
    // (attention's [T, H, D] ↔ [H, T, D] moves rows of D).
    let (run, dims) = if perm[r - 1] == r - 1 {
        (shape[r - 1], r - 1)
    } else {
        (1, r)
    };
    let bytes = run * es;
    let n = numel(&shape[..dims]);
    let mut idx = vec![0usize; dims];
    let mut off = 0usize;
    for k in 0..n {
        o[k * bytes..(k + 1) * bytes].copy_from_slice(&src[off * es..off * es + bytes]);
        for d in (0..dims).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < shape[d] {
                break;
            }
            off -= strides[d] * idx[d];
            idx[d] = 0;
        }
    }
    out
}

fn concat(ctx: &Ctx, parts: &[&Tensor], axis: i64) -> Result<Tensor> {
    let first = parts.first().ok_or_else(|| ctx.err("no inputs"))?;
    let r = first.rank();
    let ax = norm_axis(ctx, axis, r)?;
    let mut shape = first.shape.clone();
    shape[ax] = 0;
    for p in parts {
        if p.rank() != r || p.dtype != first.dtype {
            return Err(ctx.err("inputs differ in rank or dtype"));
        }
        for d in 0..r {
            if d != ax && p.shape[d] != first.shape[d] {
                return Err(ctx.err(format!(
                    "shapes {:?} and {:?} differ off the concat axis",
                    first.shape, p.shape
                )));
            }
        }
        shape[ax] += p.shape[ax];
    }
    let es = first.dtype.size();
    let outer: usize = shape[..ax].iter().product();
    let inner: usize = shape[ax + 1..].iter().product::<usize>() * es;
    let mut out = Tensor::zeros(first.dtype, &shape);
    let o = out.bytes_mut();
    let mut w = 0;
    for ob in 0..outer {
        for p in parts {
            let chunk = p.shape[ax] * inner;
            o[w..w + chunk].copy_from_slice(&p.bytes()[ob * chunk..(ob + 1) * chunk]);
            w += chunk;
        }
    }
    Ok(out)
}

fn expand(ctx: &Ctx, a: &Tensor, target: &[i64]) -> Result<Tensor> {
    let t: Vec<usize> = target.iter().map(|&d| d.max(0) as usize).collect();
    let shape = broadcast_shape(&a.shape, &t)
        .ok_or_else(|| ctx.err(format!("cannot expand {:?} to {:?}", a.shape, target)))?;
    let es = a.dtype.size();
    let offs = broadcast_offsets(&a.shape, &shape);
    let src = a.bytes();
    let mut out = Tensor::zeros(a.dtype, &shape);
    let o = out.bytes_mut();
    for (k, &off) in offs.iter().enumerate() {
        o[k * es..(k + 1) * es].copy_from_slice(&src[off * es..(off + 1) * es]);
    }
    Ok(out)
}

fn where_op(ctx: &Ctx, c: &Tensor, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    c.expect(DType::Bool, &ctx.node.name)?;
    let dt = same_dtype(ctx, x, y)?;
    let s1 =
        broadcast_shape(&c.shape, &x.shape).ok_or_else(|| ctx.err("shapes do not broadcast"))?;
    let shape = broadcast_shape(&s1, &y.shape).ok_or_else(|| ctx.err("shapes do not broadcast"))?;
    let (oc, ox, oy) = (
        broadcast_offsets(&c.shape, &shape),
        broadcast_offsets(&x.shape, &shape),
        broadcast_offsets(&y.shape, &shape),
    );
    let es = dt.size();
    let (cb, xb, yb) = (c.bytes(), x.bytes(), y.bytes());
    let mut out = Tensor::zeros(dt, &shape);
    let o = out.bytes_mut();
    for k in 0..oc.len() {
        let (src, off) = if cb[oc[k]] != 0 {
            (xb, ox[k])
        } else {
            (yb, oy[k])
        };
        o[k * es..(k + 1) * es].copy_from_slice(&src[off * es..(off + 1) * es]);
    }
    Ok(out)
}

fn range(ctx: &Ctx, s: &Tensor, l: &Tensor, d: &Tensor) -> Result<Tensor> {
    match s.dtype {
        DType::I64 | DType::I32 => {
            let (s, l, d) = (
                s.scalar_i64(&ctx.node.name)?,
                l.scalar_i64(&ctx.node.name)?,
                d.scalar_i64(&ctx.node.name)?,
            );
            if d == 0 {
                return Err(ctx.err("delta is zero"));
            }
            // i128: `l - s` of two hostile i64 values must not overflow.
            let n = ((l as i128 - s as i128) as f64 / d as f64).ceil().max(0.0) as usize;
            if n > (1 << 28) {
                return Err(ctx.err(format!("range of {n} elements is too large")));
            }
            let v: Vec<i64> = (0..n as i64).map(|i| s + i * d).collect();
            Ok(Tensor::i64(&[n], &v))
        }
        DType::F32 => {
            let (s, l, d) = (
                s.as_f32(&ctx.node.name)?[0],
                l.as_f32(&ctx.node.name)?[0],
                d.as_f32(&ctx.node.name)?[0],
            );
            let n = ((l - s) / d).ceil().max(0.0) as usize;
            if d == 0.0 || n > (1 << 28) {
                return Err(ctx.err("bad range"));
            }
            let v: Vec<f32> = (0..n).map(|i| s + i as f32 * d).collect();
            Ok(Tensor::f32(&[n], &v))
        }
        dt => Err(ctx.err(format!("Range on {dt} is not supported"))),
    }
}

fn softmax_rows(v: &mut [f32], n: usize) {
    for row in v.chunks_mut(n.max(1)) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0.0;
        for x in row.iter_mut() {
            *x = if m == f32::NEG_INFINITY {
                0.0
            } else {
                (*x - m).exp()
            };
            s += *x;
        }
        if s > 0.0 {
            row.iter_mut().for_each(|x| *x /= s);
        }
    }
}

/// Runs `f` over every 1-D line along `axis` (outer × inner lines of length `dim`).
fn along_axis(shape: &[usize], axis: usize, mut f: impl FnMut(&dyn Fn(usize) -> usize, usize)) {
    let outer: usize = shape[..axis].iter().product();
    let dim = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    for o in 0..outer {
        for i in 0..inner {
            let base = o * dim * inner + i;
            f(&move |k| base + k * inner, dim);
        }
    }
}

fn softmax(ctx: &Ctx, a: &Tensor) -> Result<Tensor> {
    let ax = norm_axis(ctx, ctx.node.attr_int("axis", -1), a.rank())?;
    let mut out = Tensor::f32(&a.shape, a.as_f32(&ctx.node.name)?);
    if ax + 1 == a.rank() {
        let n = a.shape[ax];
        softmax_rows(out.typed_mut::<f32>(), n);
    } else {
        let shape = a.shape.clone();
        let o = out.typed_mut::<f32>();
        along_axis(&shape, ax, |at, dim| {
            let mut line: Vec<f32> = (0..dim).map(|k| o[at(k)]).collect();
            softmax_rows(&mut line, dim);
            (0..dim).for_each(|k| o[at(k)] = line[k]);
        });
    }
    Ok(out)
}

fn cumsum(ctx: &Ctx, a: &Tensor, axis: &Tensor) -> Result<Tensor> {
    let ax = norm_axis(ctx, axis.scalar_i64(&ctx.node.name)?, a.rank())?;
    let exclusive = ctx.node.attr_int("exclusive", 0) != 0;
    let reverse = ctx.node.attr_int("reverse", 0) != 0;
    let mut out = Tensor::f32(&a.shape, a.as_f32(&ctx.node.name)?);
    let shape = a.shape.clone();
    let o = out.typed_mut::<f32>();
    along_axis(&shape, ax, |at, dim| {
        let mut acc = 0.0f32;
        for j in 0..dim {
            let k = if reverse { dim - 1 - j } else { j };
            let v = o[at(k)];
            if exclusive {
                o[at(k)] = acc;
                acc += v;
            } else {
                acc += v;
                o[at(k)] = acc;
            }
        }
    });
    Ok(out)
}

fn reduce_sum(ctx: &Ctx, a: &Tensor, axes: Option<Vec<i64>>) -> Result<Tensor> {
    let keep = ctx.node.attr_int("keepdims", 1) != 0;
    let noop = ctx.node.attr_int("noop_with_empty_axes", 0) != 0;
    let axes: Vec<usize> = match axes {
        Some(v) if !v.is_empty() => v
            .iter()
            .map(|&x| norm_axis(ctx, x, a.rank()))
            .collect::<Result<_>>()?,
        _ if noop => return Ok(a.clone()),
        _ => (0..a.rank()).collect(),
    };
    let (kept, out_shape) = reduced_shapes(&a.shape, &axes, keep);
    let n_out = numel(&kept);
    // Trailing axes (the sampling tail's sums over the vocabulary): each output sums one contiguous
    // run, in the same order as the general path below.
    let r = a.rank();
    if axes.len() <= r && (r - axes.len()..r).all(|i| axes.contains(&i)) {
        let inner = numel(&a.shape[r - axes.len()..]);
        // One output per run of `inner` elements (none when `inner` is 0: all outputs stay zero).
        fn runs<T: Pod + Default>(
            v: &[T],
            inner: usize,
            n: usize,
            add: impl Fn(T, T) -> T,
        ) -> Vec<T> {
            let mut acc = vec![T::default(); n];
            if inner > 0 {
                for (a, c) in acc.iter_mut().zip(v.chunks(inner)) {
                    *a = c.iter().fold(T::default(), |s, &x| add(s, x));
                }
            }
            acc
        }
        match a.dtype {
            DType::F32 => {
                let acc = runs(a.typed::<f32>(), inner, n_out, |s: f32, x: f32| s + x);
                return Ok(Tensor::f32(&out_shape, &acc));
            }
            DType::I64 => {
                let acc = runs(a.typed::<i64>(), inner, n_out, i64::wrapping_add);
                return Ok(Tensor::i64(&out_shape, &acc));
            }
            _ => {}
        }
    }
    // Map every input element to its output slot via the kept shape.
    let mut strides = vec![0usize; a.rank()];
    let mut s = 1;
    for i in (0..a.rank()).rev() {
        strides[i] = if axes.contains(&i) { 0 } else { s };
        s *= kept[i];
    }
    let offs = broadcast_offsets_with(&a.shape, &strides);
    match a.dtype {
        DType::F32 => {
            let v = a.typed::<f32>();
            let mut acc = vec![0.0f32; n_out];
            for (i, &o) in offs.iter().enumerate() {
                acc[o] += v[i];
            }
            Ok(Tensor::f32(&out_shape, &acc))
        }
        DType::I64 => {
            let v = a.typed::<i64>();
            let mut acc = vec![0i64; n_out];
            for (i, &o) in offs.iter().enumerate() {
                acc[o] = acc[o].wrapping_add(v[i]);
            }
            Ok(Tensor::i64(&out_shape, &acc))
        }
        d => Err(ctx.err(format!("ReduceSum on {d} is not supported"))),
    }
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

fn topk(ctx: &Ctx, a: &Tensor, k: &Tensor) -> Result<Vec<Tensor>> {
    let ax = norm_axis(ctx, ctx.node.attr_int("axis", -1), a.rank())?;
    if ax + 1 != a.rank() {
        return Err(ctx.err("TopK is supported on the last axis only"));
    }
    let largest = ctx.node.attr_int("largest", 1) != 0;
    let v = a.as_f32(&ctx.node.name)?;
    let n = a.shape[ax];
    let k = k.scalar_i64(&ctx.node.name)?;
    if k < 0 || k as usize > n {
        return Err(ctx.err(format!("k = {k} is outside 0..={n}")));
    }
    let k = k as usize;
    let rows = v.len().checked_div(n).unwrap_or(0);
    let mut vals = Vec::with_capacity(rows * k);
    let mut idxs = Vec::with_capacity(rows * k);
    let mut rv = vec![0.0f32; k];
    let mut ri = vec![0usize; k];
    let mut neg = Vec::new();
    for row in v.chunks(n.max(1)).take(rows) {
        // The smallest are the largest of the negated row (ties still to the lower index).
        let x = if largest {
            row
        } else {
            neg.clear();
            neg.extend(row.iter().map(|v| -v));
            &neg[..]
        };
        super::misc::top_k(x, &mut rv, &mut ri).map_err(|e| ctx.err(e.to_string()))?;
        for &i in &ri {
            vals.push(row[i]);
            idxs.push(i as i64);
        }
    }
    let mut shape = a.shape.clone();
    shape[ax] = k;
    Ok(vec![Tensor::f32(&shape, &vals), Tensor::i64(&shape, &idxs)])
}

fn gather_elements(ctx: &Ctx, a: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let ax = norm_axis(ctx, ctx.node.attr_int("axis", 0), a.rank())?;
    if idx.rank() != a.rank() {
        return Err(ctx.err("indices rank differs from data rank"));
    }
    let ind = idx.to_i64_vec(&ctx.node.name)?;
    let es = a.dtype.size();
    let mut a_strides = vec![0usize; a.rank()];
    let mut s = 1;
    for i in (0..a.rank()).rev() {
        a_strides[i] = s;
        s *= a.shape[i];
    }
    let src = a.bytes();
    let mut out = Tensor::zeros(a.dtype, &idx.shape);
    let o = out.bytes_mut();
    let mut pos = vec![0usize; idx.rank()];
    for (k, &ix) in ind.iter().enumerate() {
        let dim = a.shape[ax] as i64;
        let i = if ix < 0 { ix + dim } else { ix };
        if i < 0 || i >= dim {
            return Err(ctx.err(format!("index {ix} out of range for axis of size {dim}")));
        }
        let mut off = 0;
        for d in 0..idx.rank() {
            let p = if d == ax { i as usize } else { pos[d] };
            if p >= a.shape[d] {
                return Err(ctx.err("indices shape exceeds data shape"));
            }
            off += p * a_strides[d];
        }
        o[k * es..(k + 1) * es].copy_from_slice(&src[off * es..(off + 1) * es]);
        for d in (0..idx.rank()).rev() {
            pos[d] += 1;
            if pos[d] < idx.shape[d] {
                break;
            }
            pos[d] = 0;
        }
    }
    Ok(out)
}

fn rms_norm(ctx: &Ctx, x: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let ax = norm_axis(ctx, ctx.node.attr_int("axis", -1), x.rank())?;
    let eps = ctx.node.attr_float("epsilon", 1e-5);
    let n: usize = x.shape[ax..].iter().product();
    let xv = x.as_f32(&ctx.node.name)?;
    // Borrow an f32 scale in place (the usual case); convert other dtypes.
    let converted;
    let sv: &[f32] = if scale.dtype == DType::F32 {
        scale.typed()
    } else {
        converted = scale.to_f32_vec(&ctx.node.name)?;
        &converted
    };
    if sv.len() != n && sv.len() != 1 {
        return Err(ctx.err(format!(
            "scale has {} elements, normalized size is {n}",
            sv.len()
        )));
    }
    let broadcast;
    let sv: &[f32] = if sv.len() == 1 {
        broadcast = vec![sv[0]; n];
        &broadcast
    } else {
        sv
    };
    let mut out = Tensor::zeros(DType::F32, &x.shape);
    super::norm::rms_norm(xv, sv, eps, out.typed_mut::<f32>())
        .map_err(|e| ctx.err(e.to_string()))?;
    Ok(out)
}

/// ONNX `RotaryEmbedding`: `x` as `[B, H, S, D]`, or `[B, S, H·D]` with `num_heads`; with
/// `position_ids` (`[B, S]`) the caches are tables `[positions, R/2]` indexed by them, without they are
/// `[B, S, R/2]`, one row a token.
fn rotary(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let x = input(ctx, inputs, 0)?;
    let name = &ctx.node.name;
    let cos = input(ctx, inputs, 1)?.as_f32(name)?;
    let sin = input(ctx, inputs, 2)?.as_f32(name)?;
    let pos = match inputs.get(3).copied().flatten() {
        Some(p) => Some(p.to_i64_vec(name)?),
        None => None,
    };
    let (b, h, t, d, tokens_first) = match x.shape[..] {
        [b, h, t, d] => (b, h, t, d, false),
        [b, t, hd] => {
            let h = usize::try_from(ctx.node.attr_int("num_heads", 0)).unwrap_or(0);
            if h == 0 || hd % h != 0 {
                return Err(ctx.err(format!(
                    "3-D input {:?} needs num_heads dividing its last dim",
                    x.shape
                )));
            }
            (b, h, t, hd / h, true)
        }
        _ => {
            return Err(ctx.err(format!(
                "RotaryEmbedding takes [B, H, S, D] or [B, S, H·D]; got {:?}",
                x.shape
            )))
        }
    };
    let rot = match ctx.node.attr_int("rotary_embedding_dim", 0) {
        0 => d,
        r if r > 0 => r as usize,
        r => return Err(ctx.err(format!("rotary_embedding_dim {r} is negative"))),
    };
    let shape = super::rope::RopeShape {
        heads: h,
        tokens: t,
        head_dim: d,
        rotary_dim: rot,
        tokens_first,
        interleaved: ctx.node.attr_int("interleaved", 0) != 0,
    };
    let mut out = Tensor::f32(&x.shape, x.as_f32(name)?);
    let per = h * t * d;
    let rows = t * (rot / 2);
    let own: Vec<i64> = (0..t as i64).collect();
    for (bi, xb) in out
        .typed_mut::<f32>()
        .chunks_mut(per.max(1))
        .enumerate()
        .take(b)
    {
        let r = match &pos {
            Some(p) if p.len() == b * t => {
                super::rope::rope_in_place(xb, &shape, cos, sin, &p[bi * t..(bi + 1) * t])
            }
            Some(p) => Err(super::KernelError::Length {
                kernel: "rotary",
                what: "position_ids",
                got: p.len(),
                expected: b * t,
            }),
            None if cos.len() == b * rows && sin.len() == b * rows => {
                let (c, s) = (&cos[bi * rows..][..rows], &sin[bi * rows..][..rows]);
                super::rope::rope_in_place(xb, &shape, c, s, &own)
            }
            None => Err(super::KernelError::Length {
                kernel: "rotary",
                what: "cos_cache without position_ids",
                got: cos.len(),
                expected: b * rows,
            }),
        };
        r.map_err(|e| ctx.err(e.to_string()))?;
    }
    Ok(out)
}

/// Q, K or V of `Attention` as `[B, H, S, D]` values: a 4-D input as it is, a 3-D `[B, S, H·D]` one
/// split into `heads` (the `q_num_heads` / `kv_num_heads` attribute) and transposed.
fn attention_heads(ctx: &Ctx, x: &Tensor, heads: i64) -> Result<(Vec<f32>, [usize; 4])> {
    let v = x.to_f32_vec(&ctx.node.name)?;
    match x.shape[..] {
        [b, h, s, d] => Ok((v, [b, h, s, d])),
        [b, s, hd] => {
            let h = usize::try_from(heads).unwrap_or(0);
            if h == 0 || hd % h != 0 {
                return Err(ctx.err(format!(
                    "3-D input {:?} needs q_num_heads/kv_num_heads dividing its last dim",
                    x.shape
                )));
            }
            let t = transpose(&Tensor::f32(&[b, s, h, hd / h], &v), &[0, 2, 1, 3]);
            Ok((t.typed::<f32>().to_vec(), [b, h, s, hd / h]))
        }
        _ => Err(ctx.err(format!(
            "Attention takes 3-D or 4-D Q, K, V; got {:?}",
            x.shape
        ))),
    }
}

/// ONNX `Attention` (opset 23): softmax(cap(Q·Kᵀ·scale) + mask) · V per batch and head (`cap` the
/// `softcap` attribute's `c·tanh(s/c)` where it is set), K/V heads shared by
/// groups of Q heads, the mask (bool or additive) broadcast to `[B, Hq, T, S]`, `is_causal` keeping keys
/// `s ≤ t` (the upper-left alignment ONNX specifies; the exporter writes explicit masks, and the planner
/// fuses only attentions without `is_causal`). The output has Q's dtype and layout (3-D in, 3-D out).
fn attention(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let q = input(ctx, inputs, 0)?;
    let k = input(ctx, inputs, 1)?;
    let v = input(ctx, inputs, 2)?;
    let mask = inputs.get(3).copied().flatten();
    if inputs.len() > 4 && inputs[4..].iter().any(|i| i.is_some()) {
        return Err(ctx.err("Attention past_key/past_value inputs are not supported"));
    }
    // Gemma 2's cap on the scaled scores, before the mask (as the ONNX reference applies it).
    let softcap = ctx.node.attr_float("softcap", 0.0);
    if !(softcap >= 0.0 && softcap.is_finite()) {
        return Err(ctx.err(format!("softcap {softcap} must be a finite value ≥ 0")));
    }
    let name = &ctx.node.name;
    let (qv, [b, hq, t, d]) = attention_heads(ctx, q, ctx.node.attr_int("q_num_heads", 0))?;
    let kv_heads = ctx.node.attr_int("kv_num_heads", 0);
    let (kv, [bk, hk, s, dk]) = attention_heads(ctx, k, kv_heads)?;
    let (vv, [bv, hv, sv, dv]) = attention_heads(ctx, v, kv_heads)?;
    if bk != b || bv != b || hk == 0 || hq % hk != 0 || dk != d || hv != hk || sv != s {
        return Err(ctx.err(format!(
            "incompatible shapes Q {:?} K {:?} V {:?}",
            q.shape, k.shape, v.shape
        )));
    }
    let scale = match ctx.node.attrs.get("scale") {
        Some(Attr::Float(f)) => *f,
        _ => 1.0 / (d as f32).sqrt(),
    };
    let causal = ctx.node.attr_int("is_causal", 0) != 0;
    // The mask as an additive bias, read through its broadcast strides over [B, Hq, T, S] (0 where it
    // has one element on that axis).
    let full = [b, hq, t, s];
    let bias: Option<(Vec<f32>, [usize; 4])> = match mask {
        None => None,
        Some(m) => {
            if m.rank() > 4 || broadcast_shape(&m.shape, &full).as_deref() != Some(&full[..]) {
                return Err(ctx.err(format!(
                    "attn_mask {:?} does not broadcast to {full:?}",
                    m.shape
                )));
            }
            let vals = if m.dtype == DType::Bool {
                let keep = m.typed::<u8>();
                keep.iter()
                    .map(|&k| if k != 0 { 0.0 } else { f32::NEG_INFINITY })
                    .collect()
            } else {
                m.to_f32_vec(name)?
            };
            let mut strides = [0usize; 4];
            let mut stride = 1;
            for (i, &dim) in m.shape.iter().enumerate().rev() {
                strides[4 - m.rank() + i] = if dim == 1 { 0 } else { stride };
                stride *= dim;
            }
            Some((vals, strides))
        }
    };
    let group = hq / hk;
    let mut o = vec![0.0f32; b * hq * t * dv];
    let mut scores = vec![0.0f32; s];
    for bi in 0..b {
        for h in 0..hq {
            let kh = bi * hk + h / group;
            for ti in 0..t {
                let row = (bi * hq + h) * t + ti;
                let qrow = &qv[row * d..][..d];
                let mrow = bias
                    .as_ref()
                    .map(|(_, st)| bi * st[0] + h * st[1] + ti * st[2]);
                for (si, sc) in scores.iter_mut().enumerate() {
                    let krow = &kv[(kh * s + si) * d..][..d];
                    let dot: f32 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                    *sc = dot * scale;
                    if softcap > 0.0 {
                        *sc = softcap * (*sc / softcap).tanh();
                    }
                    if let (Some((vals, st)), Some(m0)) = (&bias, mrow) {
                        *sc += vals[m0 + si * st[3]];
                    }
                    if causal && si > ti {
                        *sc = f32::NEG_INFINITY;
                    }
                }
                softmax_rows(&mut scores, s);
                let orow = &mut o[row * dv..][..dv];
                for (si, &p) in scores.iter().enumerate() {
                    if p != 0.0 {
                        let vrow = &vv[(kh * s + si) * dv..][..dv];
                        for (o, &x) in orow.iter_mut().zip(vrow) {
                            *o += p * x;
                        }
                    }
                }
            }
        }
    }
    let mut out = Tensor::f32(&[b, hq, t, dv], &o);
    if q.rank() == 3 {
        out = transpose(&out, &[0, 2, 1, 3]);
        out.shape = vec![b, t, hq * dv];
    }
    cast(ctx, &out, q.dtype)
}

/// `MatMul` as numpy's `matmul`: `[.., M, K] × [.., K, N]` with the batch dims broadcast, a 1-D
/// operand taken as a row (`[K]` × ..) or a column (.. × `[K]`) whose dim is dropped from the result.
fn matmul(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.rank() == 0 || b.rank() == 0 {
        return Err(ctx.err(format!("MatMul of a scalar: {:?} × {:?}", a.shape, b.shape)));
    }
    let av = a.to_f32_vec(&ctx.node.name)?;
    let bv = b.to_f32_vec(&ctx.node.name)?;
    let sa = if a.rank() == 1 {
        vec![1, a.shape[0]]
    } else {
        a.shape.clone()
    };
    let sb = if b.rank() == 1 {
        vec![b.shape[0], 1]
    } else {
        b.shape.clone()
    };
    let (ra, rb) = (sa.len(), sb.len());
    let (m, k, kb, n) = (sa[ra - 2], sa[ra - 1], sb[rb - 2], sb[rb - 1]);
    let batch = broadcast_shape(&sa[..ra - 2], &sb[..rb - 2]);
    let Some(batch) = batch.filter(|_| k == kb) else {
        return Err(ctx.err(format!(
            "shapes {:?} × {:?} do not multiply",
            a.shape, b.shape
        )));
    };
    let oa = broadcast_offsets(&sa[..ra - 2], &batch);
    let ob = broadcast_offsets(&sb[..rb - 2], &batch);
    let mut shape = batch.clone();
    if a.rank() > 1 {
        shape.push(m);
    }
    if b.rank() > 1 {
        shape.push(n);
    }
    let mut out = Tensor::zeros(DType::F32, &shape);
    let o = out.typed_mut::<f32>();
    for (bi, (&ia, &ib)) in oa.iter().zip(&ob).enumerate() {
        let (ab, bb) = (&av[ia * m * k..][..m * k], &bv[ib * k * n..][..k * n]);
        let ob = &mut o[bi * m * n..][..m * n];
        for i in 0..m {
            let orow = &mut ob[i * n..(i + 1) * n];
            for kk in 0..k {
                let x = ab[i * k + kk];
                for (o, &w) in orow.iter_mut().zip(&bb[kk * n..(kk + 1) * n]) {
                    *o += x * w;
                }
            }
        }
    }
    Ok(out)
}

fn gemm(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let a = input(ctx, inputs, 0)?;
    let b = input(ctx, inputs, 1)?;
    let c = inputs.get(2).copied().flatten();
    if a.rank() != 2 || b.rank() != 2 {
        return Err(ctx.err("Gemm needs 2-D A and B"));
    }
    let ta = ctx.node.attr_int("transA", 0) != 0;
    let tb = ctx.node.attr_int("transB", 0) != 0;
    let alpha = ctx.node.attr_float("alpha", 1.0);
    let beta = ctx.node.attr_float("beta", 1.0);
    let at = if ta { transpose(a, &[1, 0]) } else { a.clone() };
    let (m, k) = (at.shape[0], at.shape[1]);
    let w = crate::weights::LinearWeights::from_gemm_b(b, tb).map_err(|e| ctx.err(e))?;
    if w.k != k {
        return Err(ctx.err(format!("A is [{m}, {k}] but B gives K = {}", w.k)));
    }
    let mut out = Tensor::zeros(DType::F32, &[m, w.n]);
    w.apply(at.as_f32(&ctx.node.name)?, m, out.typed_mut::<f32>());
    let o = out.typed_mut::<f32>();
    if alpha != 1.0 {
        o.iter_mut().for_each(|x| *x *= alpha);
    }
    if let Some(c) = c {
        let cv = c.to_f32_vec(&ctx.node.name)?;
        let cs = broadcast_offsets(&c.shape, &[m, w.n]);
        for (i, x) in o.iter_mut().enumerate() {
            *x += beta * cv[cs[i]];
        }
    }
    Ok(out)
}

fn dequantize_linear(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let x = input(ctx, inputs, 0)?;
    let s = input(ctx, inputs, 1)?.to_f32_vec(&ctx.node.name)?;
    let zp = inputs.get(2).copied().flatten();
    if ctx.node.attr_int("block_size", 0) != 0 {
        return Err(ctx.err("block-wise DequantizeLinear is not supported"));
    }
    let q: Vec<f32> = match x.dtype {
        DType::I8 => x.typed::<i8>().iter().map(|&v| v as f32).collect(),
        DType::U8 => x.typed::<u8>().iter().map(|&v| v as f32).collect(),
        DType::I32 => x.typed::<i32>().iter().map(|&v| v as f32).collect(),
        d => return Err(ctx.err(format!("DequantizeLinear on {d} is not supported"))),
    };
    let z: Vec<f32> = match zp {
        None => vec![0.0; s.len()],
        Some(z) => cast(ctx, z, DType::F32)?.typed::<f32>().to_vec(),
    };
    if z.len() != s.len() {
        return Err(ctx.err("zero point and scale sizes differ"));
    }
    let out = if s.len() == 1 {
        q.iter().map(|&v| (v - z[0]) * s[0]).collect::<Vec<_>>()
    } else {
        let ax = norm_axis(ctx, ctx.node.attr_int("axis", 1), x.rank())?;
        if x.shape[ax] != s.len() {
            return Err(ctx.err(format!(
                "scale has {} entries, axis {ax} has {}",
                s.len(),
                x.shape[ax]
            )));
        }
        let inner: usize = x.shape[ax + 1..].iter().product();
        let dim = x.shape[ax];
        q.iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = (i / inner) % dim;
                (v - z[c]) * s[c]
            })
            .collect()
    };
    Ok(Tensor::f32(&x.shape, &out))
}

fn matmul_nbits(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let a = input(ctx, inputs, 0)?;
    let w = crate::weights::LinearWeights::from_matmul_nbits(ctx.node, inputs)
        .map_err(|e| ctx.err(e))?;
    let av = a.as_f32(&ctx.node.name)?;
    let k = *a.shape.last().unwrap_or(&0);
    if k != w.k {
        return Err(ctx.err(format!("A has K = {k}, the node says K = {}", w.k)));
    }
    let m = av.len() / k.max(1);
    let mut shape = a.shape.clone();
    if let Some(l) = shape.last_mut() {
        *l = w.n;
    }
    let mut out = Tensor::zeros(DType::F32, &shape);
    w.apply(av, m, out.typed_mut::<f32>());
    if let Some(bias) = inputs.get(5).copied().flatten() {
        let bv = bias.to_f32_vec(&ctx.node.name)?;
        for row in out.typed_mut::<f32>().chunks_mut(w.n) {
            row.iter_mut().zip(&bv).for_each(|(o, b)| *o += b);
        }
    }
    Ok(out)
}

fn bit_op(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.expect(DType::U8, &ctx.node.name)?;
    b.expect(DType::U8, &ctx.node.name)?;
    if ctx.node.op == "BitwiseAnd" {
        return binary(ctx, a, b, DType::U8, |x: u8, y: u8| x & y);
    }
    let right = matches!(ctx.node.attrs.get("direction"), Some(Attr::Str(s)) if s == "RIGHT");
    if right {
        binary(ctx, a, b, DType::U8, |x: u8, y: u8| {
            x.checked_shr(y as u32).unwrap_or(0)
        })
    } else {
        binary(ctx, a, b, DType::U8, |x: u8, y: u8| {
            x.checked_shl(y as u32).unwrap_or(0)
        })
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

/// An element-wise float op: f32 in place of the input's f32 elements, f16/bf16 through f32.
fn unary_float(ctx: &Ctx, a: &Tensor, f: impl Fn(f32) -> f32) -> Result<Tensor> {
    if a.dtype == DType::F32 {
        return unary_f32(ctx, a, f);
    }
    let v: Vec<f32> = floats(ctx, a)?.iter().map(|&x| f(x)).collect();
    cast(ctx, &Tensor::f32(&a.shape, &v), a.dtype)
}

/// A string attribute, or `default` when absent.
fn attr_str<'a>(ctx: &'a Ctx, key: &str, default: &'a str) -> Result<&'a str> {
    match ctx.node.attrs.get(key) {
        None => Ok(default),
        Some(Attr::Str(s)) => Ok(s),
        Some(a) => Err(ctx.err(format!("attribute `{key}` is {a:?}, not a string"))),
    }
}

/// Chebyshev coefficients (in `y = 4t − 2`, `t = 2/(2 + x)`) of `ln(erfc(x)·e^{x²}/t)` for `x ≥ 0`,
/// the form of Numerical Recipes' `erfccheb`. Computed for this file with mpmath at 40 digits from 80
/// Chebyshev nodes; the first omitted term is below 1e-19.
const ERFC_CHEB: [f64; 28] = [
    -1.302_653_719_781_709_4,
    6.419_697_923_564_902e-1,
    1.947_647_320_418_583_6e-2,
    -9.561_514_786_808_632e-3,
    -9.465_953_444_820_369e-4,
    3.668_394_978_527_614_5e-4,
    4.252_332_480_690_777e-5,
    -2.027_857_811_253_424_2e-5,
    -1.624_290_004_647_025_6e-6,
    1.303_655_835_580_523_2e-6,
    1.562_644_172_206_614_2e-8,
    -8.523_809_591_492_654e-8,
    6.529_054_439_098_851_5e-9,
    5.059_343_495_551_469e-9,
    -9.913_641_564_930_33e-10,
    -2.273_651_222_931_836e-10,
    9.646_791_102_015_527e-11,
    2.394_038_083_039_114_6e-12,
    -6.886_027_526_497_553e-12,
    8.944_879_273_090_725e-13,
    3.130_921_399_342_958e-13,
    -1.127_082_236_136_725_2e-13,
    3.810_905_255_189_232e-16,
    7.106_097_613_609_237e-15,
    -1.523_028_201_457_104_3e-15,
    -9.457_494_571_291_233e-17,
    1.210_237_189_224_279e-16,
    -2.816_663_087_747_177e-17,
];

/// erfc(x) for `x ≥ 0` (NaN for NaN): relative error below 1e-15 up to x = 6, below 1e-12 where
/// erfc is still a normal f64 (the rounding of x² in e^{−x²}).
fn erfc_nonneg(x: f64) -> f64 {
    let t = 2.0 / (2.0 + x);
    let y = 4.0 * t - 2.0;
    let (mut d, mut dd) = (0.0f64, 0.0f64);
    for &c in ERFC_CHEB[1..].iter().rev() {
        (d, dd) = (y * d - dd + c, d);
    }
    t * (-x * x + 0.5 * (ERFC_CHEB[0] + y * d) - dd).exp()
}

/// erfc over all of f64.
fn erfc64(x: f64) -> f64 {
    if x < 0.0 {
        2.0 - erfc_nonneg(-x)
    } else {
        erfc_nonneg(x)
    }
}

/// erf in f64, relative error below 1e-15: its Maclaurin series below |x| = 0.5 (the terms fall
/// below 1e-17 of the sum by the 12th), `1 − erfc(|x|)` above.
pub(crate) fn erf64(x: f64) -> f64 {
    if x.abs() < 0.5 {
        let z2 = x * x;
        let (mut term, mut sum) = (x, x);
        for n in 1..=12 {
            term *= -z2 / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if x > 0.0 {
        1.0 - erfc_nonneg(x)
    } else {
        erfc_nonneg(-x) - 1.0
    }
}

/// ONNX `Gelu` without approximation, `x·Φ(x) = x·erfc(−x/√2)/2` in f64 ([`erfc64`]: exact to the f32
/// result, with no cancellation in the negative tail).
pub(crate) fn gelu_exact(x: f32) -> f32 {
    if x.is_infinite() {
        return if x > 0.0 { x } else { -0.0 };
    }
    let x = x as f64;
    (0.5 * x * erfc64(-x * std::f64::consts::FRAC_1_SQRT_2)) as f32
}

/// `b^e` for integers: wrapping on overflow; a negative exponent truncates `1/b^|e|` toward zero (0
/// for `b = 0`, where it is undefined).
fn int_pow(b: i64, e: i64) -> i64 {
    if e >= 0 {
        b.wrapping_pow(u32::try_from(e).unwrap_or(u32::MAX))
    } else {
        match b {
            1 => 1,
            -1 if e % 2 == 0 => 1,
            -1 => -1,
            _ => 0,
        }
    }
}

/// ONNX `Pow`: the base's type out; float bases (f32, f16, bf16) computed in f64 and rounded once,
/// integer bases with an integer exponent exactly (wrapping), with a float exponent in f64 and
/// truncated toward zero (numpy's `power(...).astype(int)`, what the reference does).
fn pow(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let name = &ctx.node.name;
    let float_exp = match b.dtype {
        DType::F32 => Some(b.clone()),
        DType::F16 | DType::BF16 => Some(Tensor::f32(&b.shape, &b.to_f32_vec(name)?)),
        DType::I64 | DType::I32 | DType::I8 | DType::U8 => None,
        d => return Err(ctx.err(format!("Pow with a {d} exponent is not supported"))),
    };
    let int_exp = || cast(ctx, b, DType::I64);
    match a.dtype {
        DType::F32 | DType::F16 | DType::BF16 => {
            let base = match a.dtype {
                DType::F32 => a.clone(),
                _ => Tensor::f32(&a.shape, &a.to_f32_vec(name)?),
            };
            let out = match float_exp {
                Some(e) => binary(ctx, &base, &e, DType::F32, |x: f32, y: f32| {
                    (x as f64).powf(y as f64) as f32
                })?,
                None => binary(ctx, &base, &int_exp()?, DType::F32, |x: f32, y: i64| {
                    (x as f64).powf(y as f64) as f32
                })?,
            };
            cast(ctx, &out, a.dtype)
        }
        DType::I64 | DType::I32 | DType::I8 | DType::U8 => {
            let base = cast(ctx, a, DType::I64)?;
            let out = match float_exp {
                Some(e) => binary(ctx, &base, &e, DType::I64, |x: i64, y: f32| {
                    (x as f64).powf(y as f64) as i64
                })?,
                None => binary(ctx, &base, &int_exp()?, DType::I64, int_pow)?,
            };
            cast(ctx, &out, a.dtype)
        }
        d => Err(ctx.err(format!("Pow on {d} is not supported"))),
    }
}

fn abs(ctx: &Ctx, a: &Tensor) -> Result<Tensor> {
    macro_rules! int_abs {
        ($t:ty) => {{
            let v: Vec<$t> = a.typed::<$t>().iter().map(|x| x.wrapping_abs()).collect();
            Ok(Tensor::from_slice(a.dtype, &a.shape, &v))
        }};
    }
    match a.dtype {
        DType::I64 => int_abs!(i64),
        DType::I32 => int_abs!(i32),
        DType::I8 => int_abs!(i8),
        DType::U8 => Ok(a.clone()),
        _ => unary_float(ctx, a, f32::abs),
    }
}

/// The axes a `Reduce*` node reduces (sorted, distinct), or `None` when it is the identity (no axes and
/// `noop_with_empty_axes`). No axes otherwise means all of them.
fn reduce_axes(ctx: &Ctx, a: &Tensor, axes: Option<Vec<i64>>) -> Result<Option<Vec<usize>>> {
    let noop = ctx.node.attr_int("noop_with_empty_axes", 0) != 0;
    let mut axes: Vec<usize> = match axes {
        Some(v) if !v.is_empty() => v
            .iter()
            .map(|&x| norm_axis(ctx, x, a.rank()))
            .collect::<Result<_>>()?,
        _ if noop => return Ok(None),
        _ => (0..a.rank()).collect(),
    };
    axes.sort_unstable();
    axes.dedup();
    Ok(Some(axes))
}

/// `ReduceMax` and `ReduceMean` (opset 18: axes as an optional input, `keepdims`,
/// `noop_with_empty_axes`). Floats (f16/bf16 through f32): the max propagates NaN, is −∞ over an empty
/// set; the mean sums in f64 (NaN over an empty set). Integers and bool: the max is exact (the type's
/// minimum, `false`, over an empty set); the integer mean is truncated toward zero.
/// A reduction's shapes over `axes`: with the reduced axes kept as 1, and the output's (`keep`: the
/// same; else without them).
fn reduced_shapes(shape: &[usize], axes: &[usize], keep: bool) -> (Vec<usize>, Vec<usize>) {
    let kept: Vec<usize> = (shape.iter().enumerate())
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    let out = match keep {
        true => kept.clone(),
        false => (0..shape.len())
            .filter(|i| !axes.contains(i))
            .map(|i| shape[i])
            .collect(),
    };
    (kept, out)
}

fn reduce_max_mean(ctx: &Ctx, a: &Tensor, axes: Option<Vec<i64>>) -> Result<Tensor> {
    let mean = ctx.node.op == "ReduceMean";
    let Some(axes) = reduce_axes(ctx, a, axes)? else {
        return Ok(a.clone());
    };
    let keep = ctx.node.attr_int("keepdims", 1) != 0;
    let (kept, out_shape) = reduced_shapes(&a.shape, &axes, keep);
    let n_out = numel(&kept);
    let count: usize = axes.iter().map(|&i| a.shape[i]).product();
    let mut strides = vec![0usize; a.rank()];
    let mut s = 1;
    for i in (0..a.rank()).rev() {
        strides[i] = if axes.contains(&i) { 0 } else { s };
        s *= kept[i];
    }
    let offs = broadcast_offsets_with(&a.shape, &strides);
    let ints: Option<(Vec<i64>, i64)> = match a.dtype {
        DType::I64 => Some((a.typed::<i64>().to_vec(), i64::MIN)),
        DType::I32 => Some((
            a.typed::<i32>().iter().map(|&v| v as i64).collect(),
            i32::MIN as i64,
        )),
        DType::I8 => Some((
            a.typed::<i8>().iter().map(|&v| v as i64).collect(),
            i8::MIN as i64,
        )),
        DType::U8 | DType::Bool => Some((a.typed::<u8>().iter().map(|&v| v as i64).collect(), 0)),
        _ => None,
    };
    if let Some((v, min)) = ints {
        let acc: Vec<i64> = if mean {
            if a.dtype == DType::Bool {
                return Err(ctx.err("ReduceMean on bool is not supported"));
            }
            if count == 0 && n_out > 0 {
                return Err(ctx.err("integer ReduceMean over an empty set"));
            }
            let mut acc = vec![0i128; n_out];
            for (&x, &o) in v.iter().zip(&offs) {
                acc[o] += x as i128;
            }
            acc.iter().map(|&s| (s / count as i128) as i64).collect()
        } else {
            let mut acc = vec![min; n_out];
            for (&x, &o) in v.iter().zip(&offs) {
                acc[o] = acc[o].max(x);
            }
            acc
        };
        return cast(ctx, &Tensor::i64(&out_shape, &acc), a.dtype);
    }
    let v = floats(ctx, a)?;
    let acc: Vec<f32> = if mean {
        let mut acc = vec![0f64; n_out];
        for (&x, &o) in v.iter().zip(&offs) {
            acc[o] += x as f64;
        }
        acc.iter().map(|&s| (s / count as f64) as f32).collect()
    } else {
        let mut acc = vec![f32::NEG_INFINITY; n_out];
        for (&x, &o) in v.iter().zip(&offs) {
            if x > acc[o] || x.is_nan() {
                acc[o] = x;
            }
        }
        acc
    };
    cast(ctx, &Tensor::f32(&out_shape, &acc), a.dtype)
}

/// ONNX `LayerNormalization` (opset 17): each run over the axes `axis..` normalized to zero mean and unit
/// variance (both in f64, `stash_type` 1), times `Scale`, plus `B`; both broadcast to the normalized
/// shape. Outputs `Y` (the input's dtype), `Mean` and `InvStdDev` (f32, the input's shape with the
/// normalized dims 1).
fn layer_norm(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
    let x = input(ctx, inputs, 0)?;
    let scale = input(ctx, inputs, 1)?;
    let bias = inputs.get(2).copied().flatten();
    let ax = norm_axis(ctx, ctx.node.attr_int("axis", -1), x.rank())?;
    let eps = ctx.node.attr_float("epsilon", 1e-5) as f64;
    let stash = ctx.node.attr_int("stash_type", 1);
    if stash != 1 {
        return Err(ctx.err(format!("stash_type {stash}: only 1 (float) is implemented")));
    }
    let norm_shape = &x.shape[ax..];
    let n = numel(norm_shape);
    let xv = floats(ctx, x)?;
    // Scale and B as n values each (broadcast to the normalized shape when they are smaller).
    let spread = |t: &Tensor, what: &str| -> Result<Vec<f32>> {
        let v = floats(ctx, t)?;
        if t.shape == norm_shape {
            return Ok(v.into_owned());
        }
        if t.rank() > norm_shape.len()
            || broadcast_shape(&t.shape, norm_shape).as_deref() != Some(norm_shape)
        {
            return Err(ctx.err(format!(
                "{what} {:?} does not broadcast to the normalized shape {norm_shape:?}",
                t.shape
            )));
        }
        Ok(broadcast_offsets(&t.shape, norm_shape)
            .iter()
            .map(|&o| v[o])
            .collect())
    };
    let sv = spread(scale, "Scale")?;
    let bv = match bias {
        Some(b) => Some(spread(b, "B")?),
        None => None,
    };
    let rows = numel(&x.shape[..ax]);
    let mut y = vec![0.0f32; xv.len()];
    let mut means = vec![0.0f32; rows];
    let mut inv_stds = vec![0.0f32; rows];
    if n > 0 {
        for (r, (xr, yr)) in xv.chunks(n).zip(y.chunks_mut(n)).enumerate() {
            let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (var + eps).sqrt();
            for (i, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
                let b = bv.as_ref().map_or(0.0, |b| b[i] as f64);
                *o = ((v as f64 - mean) * inv * sv[i] as f64 + b) as f32;
            }
            means[r] = mean as f32;
            inv_stds[r] = inv as f32;
        }
    }
    let mut stat_shape = x.shape[..ax].to_vec();
    stat_shape.resize(x.rank(), 1);
    Ok(vec![
        cast(ctx, &Tensor::f32(&x.shape, &y), x.dtype)?,
        Tensor::f32(&stat_shape, &means),
        Tensor::f32(&stat_shape, &inv_stds),
    ])
}

/// ONNX `Pad` (opset 11–23): `pads` (int64, all begins then all ends) over all axes or the `axes` input;
/// modes `constant` (the optional `constant_value`, else 0), `reflect`, `edge` and `wrap`. A negative pad
/// crops that many elements first; the other pads then extend what is left.
fn pad(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let name = &ctx.node.name;
    let x = input(ctx, inputs, 0)?;
    let pads = input(ctx, inputs, 1)?.to_i64_vec(name)?;
    let r = x.rank();
    let axes: Vec<usize> = match inputs.get(3).copied().flatten() {
        Some(t) => t
            .to_i64_vec(name)?
            .iter()
            .map(|&a| norm_axis(ctx, a, r))
            .collect::<Result<_>>()?,
        None => (0..r).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(ctx.err(format!(
            "{} pads for {} axes (need two per axis)",
            pads.len(),
            axes.len()
        )));
    }
    let mode = attr_str(ctx, "mode", "constant")?;
    if !matches!(mode, "constant" | "reflect" | "edge" | "wrap") {
        return Err(ctx.err(format!(
            "mode `{mode}` is not one of constant, reflect, edge, wrap"
        )));
    }
    let es = x.dtype.size();
    let mut fill = vec![0u8; es];
    if let Some(c) = inputs.get(2).copied().flatten() {
        if c.dtype != x.dtype || c.numel() > 1 {
            return Err(ctx.err(format!(
                "constant_value must be one {} value, got {} {:?}",
                x.dtype, c.dtype, c.shape
            )));
        }
        if c.numel() == 1 {
            fill.copy_from_slice(c.bytes());
        }
    }
    let (mut begin, mut end) = (vec![0i64; r], vec![0i64; r]);
    let mut seen = vec![false; r];
    for (k, &a) in axes.iter().enumerate() {
        if std::mem::replace(&mut seen[a], true) {
            return Err(ctx.err(format!("axis {a} is listed twice")));
        }
        begin[a] = pads[k];
        end[a] = pads[k + axes.len()];
    }
    // Per axis, the source index of every output index (None: the constant).
    let mut maps: Vec<Vec<Option<usize>>> = Vec::with_capacity(r);
    let mut shape = Vec::with_capacity(r);
    for d in 0..r {
        let dim = x.shape[d] as i64;
        let (b, e) = (begin[d], end[d]);
        let (crop_b, crop_e) = (b.min(0).unsigned_abs(), e.min(0).unsigned_abs());
        let kept = (dim as u64)
            .checked_sub(crop_b)
            .and_then(|k| k.checked_sub(crop_e))
            .ok_or_else(|| ctx.err(format!("pads {b}, {e} crop more than axis {d}'s {dim}")))?;
        let out = kept
            .checked_add(b.max(0) as u64)
            .and_then(|o| o.checked_add(e.max(0) as u64))
            .filter(|&o| o <= MAX_OUTPUT_ELEMENTS as u64)
            .ok_or_else(|| ctx.err(format!("pads {b}, {e} make axis {d} too long")))?;
        if kept == 0 && out > 0 && mode != "constant" {
            return Err(ctx.err(format!("cannot {mode}-pad axis {d}: nothing of it is left")));
        }
        let (kept, lead) = (kept as i64, b.max(0));
        let map = (0..out as i64)
            .map(|o| {
                let j = o - lead;
                let j = if (0..kept).contains(&j) {
                    j
                } else {
                    match mode {
                        "edge" => j.clamp(0, kept - 1),
                        "wrap" => j.rem_euclid(kept),
                        "reflect" if kept == 1 => 0,
                        "reflect" => {
                            let m = j.rem_euclid(2 * (kept - 1));
                            if m >= kept {
                                2 * (kept - 1) - m
                            } else {
                                m
                            }
                        }
                        _ => return None,
                    }
                };
                Some(j as usize + crop_b as usize)
            })
            .collect();
        maps.push(map);
        shape.push(out as usize);
    }
    if shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_none_or(|n| n > MAX_OUTPUT_ELEMENTS)
    {
        return Err(ctx.err(format!("padded shape {shape:?} is too large")));
    }
    if r == 0 {
        return Ok(x.clone());
    }
    let src = x.bytes();
    let mut out = Tensor::zeros(x.dtype, &shape);
    let n_out = out.numel();
    let o = out.bytes_mut();
    let last = shape[r - 1];
    if last == 0 || n_out == 0 {
        return Ok(out);
    }
    let mut in_strides = vec![1usize; r];
    for d in (0..r - 1).rev() {
        in_strides[d] = in_strides[d + 1] * x.shape[d + 1];
    }
    let mut idx = vec![0usize; r - 1];
    for (row, dst) in o.chunks_mut(last * es).enumerate() {
        if row > 0 {
            for d in (0..r - 1).rev() {
                idx[d] += 1;
                if idx[d] < shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        let base: Option<usize> =
            (0..r - 1).try_fold(0, |acc, d| maps[d][idx[d]].map(|s| acc + s * in_strides[d]));
        for (k, e) in dst.chunks_mut(es).enumerate() {
            match (base, maps[r - 1][k]) {
                (Some(b), Some(s)) => e.copy_from_slice(&src[(b + s) * es..(b + s + 1) * es]),
                _ => e.copy_from_slice(&fill),
            }
        }
    }
    Ok(out)
}

/// ONNX `Slice` (opset 13): `starts`, `ends`, optional `axes` and `steps` (int32 or int64); negative
/// indices count from the end, out-of-range ones are clamped, negative steps walk backwards.
fn slice(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let name = &ctx.node.name;
    let x = input(ctx, inputs, 0)?;
    let starts = input(ctx, inputs, 1)?.to_i64_vec(name)?;
    let ends = input(ctx, inputs, 2)?.to_i64_vec(name)?;
    let r = x.rank();
    let axes: Vec<usize> = match inputs.get(3).copied().flatten() {
        Some(t) => t
            .to_i64_vec(name)?
            .iter()
            .map(|&a| norm_axis(ctx, a, r))
            .collect::<Result<_>>()?,
        None => (0..starts.len()).collect(),
    };
    let steps = match inputs.get(4).copied().flatten() {
        Some(t) => t.to_i64_vec(name)?,
        None => vec![1; starts.len()],
    };
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(ctx.err(format!(
            "starts, ends, axes, steps have {}, {}, {}, {} entries",
            starts.len(),
            ends.len(),
            axes.len(),
            steps.len()
        )));
    }
    if axes.iter().any(|&a| a >= r) {
        return Err(ctx.err(format!("an axis is out of range for rank {r}")));
    }
    // Per axis: first index, step, length.
    let mut first = vec![0i64; r];
    let mut step = vec![1i64; r];
    let mut shape = x.shape.clone();
    let mut seen = vec![false; r];
    for k in 0..axes.len() {
        let (a, s) = (axes[k], steps[k]);
        if std::mem::replace(&mut seen[a], true) {
            return Err(ctx.err(format!("axis {a} is listed twice")));
        }
        if s == 0 {
            return Err(ctx.err("a step is 0"));
        }
        let dim = x.shape[a] as i64;
        let wrap = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let (b, e) = (wrap(starts[k]), wrap(ends[k]));
        let len = if dim == 0 {
            0
        } else if s > 0 {
            let (b, e) = (b.clamp(0, dim), e.clamp(0, dim));
            first[a] = b;
            if e > b {
                (e - b - 1) / s + 1
            } else {
                0
            }
        } else {
            let (b, e) = (b.clamp(0, dim - 1), e.clamp(-1, dim - 1));
            first[a] = b;
            if b > e {
                (b - e - 1) / s.saturating_neg() + 1
            } else {
                0
            }
        };
        step[a] = s;
        shape[a] = len as usize;
    }
    let es = x.dtype.size();
    let mut out = Tensor::zeros(x.dtype, &shape);
    if r == 0 || out.numel() == 0 {
        return Ok(out.reshaped(shape));
    }
    let mut in_strides = vec![1i64; r];
    for d in (0..r - 1).rev() {
        in_strides[d] = in_strides[d + 1] * x.shape[d + 1] as i64;
    }
    let src = x.bytes();
    let o = out.bytes_mut();
    let last = shape[r - 1];
    let mut idx = vec![0usize; r - 1];
    for (row, dst) in o.chunks_mut(last * es).enumerate() {
        if row > 0 {
            for d in (0..r - 1).rev() {
                idx[d] += 1;
                if idx[d] < shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        let base: i64 = (0..r - 1)
            .map(|d| (first[d] + idx[d] as i64 * step[d]) * in_strides[d])
            .sum::<i64>()
            + first[r - 1];
        if step[r - 1] == 1 {
            let b = base as usize * es;
            dst.copy_from_slice(&src[b..b + last * es]);
        } else {
            for (k, e) in dst.chunks_mut(es).enumerate() {
                let s = (base + k as i64 * step[r - 1]) as usize * es;
                e.copy_from_slice(&src[s..s + es]);
            }
        }
    }
    Ok(out)
}

/// ONNX `Conv` (opset 11–22): N-D (at least one spatial dim), `strides`, `pads`, `dilations`, `group`,
/// `kernel_shape` (checked against W), `auto_pad`, optional bias; f32, and f16/bf16 through f32. The
/// arithmetic is [`super::ops_conv::conv`]'s.
fn conv(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
    let x = input(ctx, inputs, 0)?;
    let w = input(ctx, inputs, 1)?;
    let bias = inputs.get(2).copied().flatten();
    if x.rank() < 3 || w.rank() != x.rank() {
        return Err(ctx.err(format!(
            "X {:?} and W {:?}: need [N, C, spatial..] and [M, C/group, kernel..] of one rank ≥ 3",
            x.shape, w.shape
        )));
    }
    if w.dtype != x.dtype || bias.is_some_and(|b| b.dtype != x.dtype) {
        return Err(ctx.err("X, W and B differ in dtype"));
    }
    let sp = x.rank() - 2;
    let (batch, c, m) = (x.shape[0], x.shape[1], w.shape[0]);
    let group = usize::try_from(ctx.node.attr_int("group", 1))
        .ok()
        .filter(|&g| g > 0 && c.is_multiple_of(g) && m.is_multiple_of(g) && w.shape[1] * g == c)
        .ok_or_else(|| {
            ctx.err(format!(
                "group {} does not fit X {:?} and W {:?}",
                ctx.node.attr_int("group", 1),
                x.shape,
                w.shape
            ))
        })?;
    let kernel = w.shape[2..].to_vec();
    if let Some(ks) = ctx.node.attr_ints("kernel_shape") {
        if ks.len() != sp || ks.iter().zip(&kernel).any(|(&a, &b)| a != b as i64) {
            return Err(ctx.err(format!("kernel_shape {ks:?} differs from W {:?}", w.shape)));
        }
    }
    let per_dim = |key: &str, default: i64, len: usize, min: i64| -> Result<Vec<usize>> {
        match ctx.node.attr_ints(key) {
            None => Ok(vec![default as usize; len]),
            Some(v) if v.len() == len && v.iter().all(|&x| x >= min) => {
                Ok(v.iter().map(|&x| x as usize).collect())
            }
            Some(v) => Err(ctx.err(format!(
                "`{key}` {v:?}: needs {len} values ≥ {min} for {sp} spatial dims"
            ))),
        }
    };
    let strides = per_dim("strides", 1, sp, 1)?;
    let dilations = per_dim("dilations", 1, sp, 1)?;
    let auto_pad = attr_str(ctx, "auto_pad", "NOTSET")?;
    let pads = match auto_pad {
        "NOTSET" | "" => per_dim("pads", 0, 2 * sp, 0)?,
        "VALID" | "SAME_UPPER" | "SAME_LOWER" => vec![0; 2 * sp],
        other => return Err(ctx.err(format!("auto_pad `{other}` is not a known value"))),
    };
    let mut pads_begin = pads[..sp].to_vec();
    let mut output = Vec::with_capacity(sp);
    for d in 0..sp {
        let input = x.shape[d + 2];
        let too_big = || ctx.err("attribute values overflow");
        // Extent of the dilated kernel.
        let ek = (kernel[d].max(1) - 1)
            .checked_mul(dilations[d])
            .and_then(|e| e.checked_add(1))
            .ok_or_else(too_big)?;
        let out = if auto_pad.starts_with("SAME") {
            let out = input.div_ceil(strides[d]);
            let need = (out.saturating_sub(1))
                .checked_mul(strides[d])
                .and_then(|v| v.checked_add(ek))
                .ok_or_else(too_big)?
                .saturating_sub(input);
            pads_begin[d] = if auto_pad == "SAME_UPPER" {
                need / 2
            } else {
                need - need / 2
            };
            out
        } else {
            let total = input
                .checked_add(pads[d])
                .and_then(|v| v.checked_add(pads[d + sp]))
                .ok_or_else(too_big)?;
            if total < ek {
                return Err(ctx.err(format!(
                    "spatial dim {d}: the kernel ({ek} with dilation) is longer than the padded input ({total})"
                )));
            }
            (total - ek) / strides[d] + 1
        };
        output.push(out);
    }
    let mut shape = vec![batch, m];
    shape.extend_from_slice(&output);
    if shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_none_or(|n| n > MAX_OUTPUT_ELEMENTS)
    {
        return Err(ctx.err(format!("output {shape:?} is too large")));
    }
    let geom = super::ops_conv::ConvGeom {
        batch,
        in_channels: c,
        out_channels: m,
        group,
        input: x.shape[2..].to_vec(),
        kernel,
        output,
        strides,
        dilations,
        pads_begin,
    };
    let (xv, wv) = (floats(ctx, x)?, floats(ctx, w)?);
    let bv = match bias {
        Some(b) if b.numel() != m => {
            return Err(ctx.err(format!(
                "B {:?} is not one value per output channel",
                b.shape
            )))
        }
        Some(b) => Some(floats(ctx, b)?),
        None => None,
    };
    let mut out = Tensor::zeros(DType::F32, &shape);
    super::ops_conv::conv(&xv, &wv, bv.as_deref(), &geom, out.typed_mut::<f32>())
        .map_err(|e| ctx.err(e.to_string()))?;
    cast(ctx, &out, x.dtype)
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

    fn run(op: &str, attrs: &[(&str, Attr)], ins: &[&Tensor]) -> Result<Vec<Tensor>> {
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

    /// ReduceSum over trailing axes (contiguous runs) and over others (the general path), f32 and i64,
    /// kept and dropped dims, against sums written out.
    #[test]
    fn reduce_sum_over_trailing_and_other_axes() {
        let v: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin()).collect();
        let a = Tensor::f32(&[2, 3, 4], &v);
        let at = |i: usize, j: usize, k: usize| v[i * 12 + j * 4 + k];
        let sum = |axes: &[i64], keep: i64| {
            let ax = Tensor::i64(&[axes.len()], axes);
            run("ReduceSum", &[("keepdims", Attr::Int(keep))], &[&a, &ax])
                .unwrap()
                .remove(0)
        };
        let last = sum(&[-1], 1);
        assert_eq!(last.shape, vec![2, 3, 1]);
        for (o, got) in last.typed::<f32>().iter().enumerate() {
            let (i, j) = (o / 3, o % 3);
            assert_eq!(*got, (0..4).fold(0.0, |s, k| s + at(i, j, k)));
        }
        let two = sum(&[1, 2], 0);
        assert_eq!(two.shape, vec![2]);
        for (i, got) in two.typed::<f32>().iter().enumerate() {
            let want = (0..3).flat_map(|j| (0..4).map(move |k| (j, k)));
            assert_eq!(*got, want.fold(0.0, |s, (j, k)| s + at(i, j, k)));
        }
        let middle = sum(&[1], 0);
        assert_eq!(middle.shape, vec![2, 4]);
        for (o, got) in middle.typed::<f32>().iter().enumerate() {
            let (i, k) = (o / 4, o % 4);
            assert_eq!(*got, (0..3).fold(0.0, |s, j| s + at(i, j, k)));
        }
        let ints = Tensor::i64(&[2, 3], &[1, 2, 3, i64::MAX, 1, -5]);
        let ax = Tensor::i64(&[1], &[1]);
        let o = run("ReduceSum", &[], &[&ints, &ax]).unwrap().remove(0);
        assert_eq!(
            o.typed::<i64>(),
            &[6, i64::MAX.wrapping_add(1).wrapping_sub(5)]
        );
        // Repeated axes (more entries than dims) take the general path.
        let rep = Tensor::i64(&[3], &[1, 1, 1]);
        let o = run("ReduceSum", &[], &[&ints, &rep]).unwrap().remove(0);
        assert_eq!(
            o.typed::<i64>(),
            &[6, i64::MAX.wrapping_add(1).wrapping_sub(5)]
        );
        let empty = Tensor::f32(&[2, 0], &[]);
        let o = run("ReduceSum", &[], &[&empty, &ax]).unwrap().remove(0);
        assert_eq!(
            (o.shape.clone(), o.typed::<f32>().to_vec()),
            (vec![2, 1], vec![0.0, 0.0])
        );
    }

    #[test]
    fn broadcasting_add_matches_numpy_rules() {
        let a = Tensor::f32(&[2, 1, 3], &[1., 2., 3., 4., 5., 6.]);
        let b = Tensor::f32(&[4, 1], &[10., 20., 30., 40.]);
        let o = run("Add", &[], &[&a, &b]).unwrap().remove(0);
        assert_eq!(o.shape, vec![2, 4, 3]);
        let v = o.typed::<f32>();
        assert_eq!(&v[..6], &[11., 12., 13., 21., 22., 23.]);
        assert_eq!(v[23], 46.);
        let c = Tensor::f32(&[2], &[1., 2.]);
        assert!(
            run("Add", &[], &[&a, &c]).is_err(),
            "3 vs 2 must not broadcast"
        );
    }

    #[test]
    fn reshape_infers_and_copies_dims() {
        let a = Tensor::f32(&[2, 3, 4], &(0..24).map(|x| x as f32).collect::<Vec<_>>());
        let s = Tensor::i64(&[3], &[0, -1, 2]);
        let o = run("Reshape", &[], &[&a, &s]).unwrap().remove(0);
        assert_eq!(o.shape, vec![2, 6, 2]);
        let bad = Tensor::i64(&[2], &[5, -1]);
        assert!(run("Reshape", &[], &[&a, &bad]).is_err());
    }

    #[test]
    fn gather_negative_and_out_of_range_indices() {
        let a = Tensor::f32(&[3, 2], &[1., 2., 3., 4., 5., 6.]);
        let i = Tensor::i64(&[2], &[-1, 0]);
        let o = run("Gather", &[("axis", Attr::Int(0))], &[&a, &i])
            .unwrap()
            .remove(0);
        assert_eq!(o.typed::<f32>(), &[5., 6., 1., 2.]);
        let bad = Tensor::i64(&[1], &[3]);
        let e = run("Gather", &[], &[&a, &bad]).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn transpose_every_permutation_of_four_axes() {
        let shape = [2usize, 3, 4, 5];
        let vals: Vec<f32> = (0..120).map(|i| i as f32).collect();
        let a = Tensor::f32(&shape, &vals);
        let perms: Vec<[usize; 4]> = (0..256)
            .map(|n| [n % 4, n / 4 % 4, n / 16 % 4, n / 64])
            .filter(|p| (0..4).all(|i| p.contains(&i)))
            .collect();
        assert_eq!(perms.len(), 24);
        for p in perms {
            let got = transpose(&a, &p);
            let out_shape: Vec<usize> = p.iter().map(|&d| shape[d]).collect();
            assert_eq!(got.shape, out_shape);
            // Output element k: its index digits (last axis fastest), each the input axis p[i]'s.
            for (k, &v) in got.typed::<f32>().iter().enumerate() {
                let mut at = [0usize; 4];
                let mut rest = k;
                for i in (0..4).rev() {
                    at[p[i]] = rest % out_shape[i];
                    rest /= out_shape[i];
                }
                let want = ((at[0] * 3 + at[1]) * 4 + at[2]) * 5 + at[3];
                assert_eq!(v, want as f32, "perm {p:?} at {k}");
            }
        }
    }

    #[test]
    fn transpose_real_and_view() {
        let a = Tensor::f32(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let o = run("Transpose", &[("perm", Attr::Ints(vec![1, 0]))], &[&a])
            .unwrap()
            .remove(0);
        assert_eq!(o.typed::<f32>(), &[1., 4., 2., 5., 3., 6.]);
        let b = Tensor::f32(&[1, 1, 2, 3], &[1., 2., 3., 4., 5., 6.]);
        let o = run(
            "Transpose",
            &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
            &[&b],
        )
        .unwrap()
        .remove(0);
        assert_eq!(o.shape, vec![1, 2, 1, 3]);
        assert_eq!(o.typed::<f32>(), b.typed::<f32>());
    }

    #[test]
    fn topk_ties_prefer_lower_index() {
        let a = Tensor::f32(&[1, 5], &[3., 7., 7., 1., 7.]);
        let k = Tensor::i64(&[1], &[2]);
        let o = run("TopK", &[], &[&a, &k]).unwrap();
        assert_eq!(o[1].typed::<i64>(), &[1, 2]);
        let k1 = Tensor::i64(&[1], &[1]);
        let o = run("TopK", &[], &[&a, &k1]).unwrap();
        assert_eq!(o[1].typed::<i64>(), &[1]);
        let k9 = Tensor::i64(&[1], &[9]);
        assert!(run("TopK", &[], &[&a, &k9]).is_err());
    }

    #[test]
    fn cumsum_exclusive_reverse() {
        let a = Tensor::f32(&[4], &[1., 2., 3., 4.]);
        let ax = Tensor::i64(&[], &[0]);
        let o = run("CumSum", &[], &[&a, &ax]).unwrap().remove(0);
        assert_eq!(o.typed::<f32>(), &[1., 3., 6., 10.]);
        let o = run(
            "CumSum",
            &[("exclusive", Attr::Int(1)), ("reverse", Attr::Int(1))],
            &[&a, &ax],
        )
        .unwrap()
        .remove(0);
        assert_eq!(o.typed::<f32>(), &[9., 7., 4., 0.]);
    }

    /// Fuzz regression (onnx_load): a Concat of rank-0 tensors indexed an empty shape.
    #[test]
    fn axis_ops_refuse_scalars() {
        let a = Tensor::i64(&[], &[1]);
        let b = Tensor::i64(&[], &[2]);
        assert!(run("Concat", &[("axis", Attr::Int(0))], &[&a, &b]).is_err());
        assert!(run(
            "Softmax",
            &[("axis", Attr::Int(0))],
            &[&Tensor::f32(&[], &[1.0])]
        )
        .is_err());
        let ok = run(
            "Concat",
            &[("axis", Attr::Int(0))],
            &[&Tensor::i64(&[1], &[1]), &b],
        );
        assert!(ok.is_err(), "rank mismatch is an error too");
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

    #[test]
    fn range_survives_i64_extremes() {
        let s = Tensor::i64(&[], &[i64::MIN]);
        let l = Tensor::i64(&[], &[i64::MAX]);
        let d = Tensor::i64(&[], &[1]);
        assert!(run("Range", &[], &[&s, &l, &d]).is_err());
    }

    #[test]
    fn range_is_bounded() {
        let (s, l, d) = (
            Tensor::i64(&[], &[0]),
            Tensor::i64(&[], &[i64::MAX]),
            Tensor::i64(&[], &[1]),
        );
        assert!(
            run("Range", &[], &[&s, &l, &d]).is_err(),
            "a huge range must be refused"
        );
    }

    #[test]
    fn cast_roundtrips() {
        let a = Tensor::f32(&[3], &[1.5, -2.25, 65504.0]);
        let h = run("Cast", &[("to", Attr::Int(10))], &[&a])
            .unwrap()
            .remove(0);
        let b = run("Cast", &[("to", Attr::Int(1))], &[&h])
            .unwrap()
            .remove(0);
        assert_eq!(b.typed::<f32>(), a.typed::<f32>());
        let i = run("Cast", &[("to", Attr::Int(7))], &[&a])
            .unwrap()
            .remove(0);
        assert_eq!(i.typed::<i64>(), &[1, -2, 65504]);
    }

    /// erf and erfc against mpmath's values (30 digits), relative error below 1e-14; Gelu's exact form
    /// against x·Φ(x) to the f32 result.
    #[test]
    fn erf_and_gelu_match_high_precision_values() {
        let erf_cases = [
            (1e-10, 1.1283791670955126e-10),
            (0.001, 0.0011283787909692365),
            (0.1, 0.1124629160182849),
            (0.49, 0.5116682611885232),
            (0.5, 0.5204998778130465),
            (0.7, 0.6778011938374184),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (3.5, 0.9999992569016276),
            (5.0, 0.9999999999984626),
        ];
        for (x, want) in erf_cases {
            for (x, want) in [(x, want), (-x, -want)] {
                let got = erf64(x);
                assert!(
                    ((got - want) / want).abs() < 1e-14,
                    "erf({x}) = {got}, want {want}"
                );
            }
        }
        for (x, want) in [
            (4.0, 1.541725790028002e-8),
            (10.0, 2.088487583762545e-45),
            (26.0, 5.663192408856143e-296),
        ] {
            let got = erfc64(x);
            assert!(
                ((got - want) / want).abs() < 1e-12,
                "erfc({x}) = {got}, want {want}"
            );
            assert!((erfc64(-x) - (2.0 - want)).abs() < 1e-15);
        }
        assert!(erf64(f64::NAN).is_nan());
        assert_eq!(
            (erf64(f64::INFINITY), erf64(f64::NEG_INFINITY)),
            (1.0, -1.0)
        );
        for (x, want) in [
            (-6.0f32, -5.9195258702261885e-9),
            (-3.0, -0.0040496940948902835),
            (-0.5, -0.15426876936299344),
            (0.25, 0.14967658142073093),
            (1.5, 1.399789198096713),
            (4.0, 3.9998733150326675),
        ] {
            assert_eq!(gelu_exact(x), want as f32, "gelu({x})");
        }
        assert_eq!(gelu_exact(f32::NEG_INFINITY), 0.0);
        assert!(gelu_exact(f32::NAN).is_nan());
    }

    /// A direct convolution from the ONNX definition, in f64: output size and SAME padding computed
    /// here on their own, every output the sum over its receptive field.
    #[allow(clippy::too_many_arguments)]
    fn conv_reference(
        x: &[f32],
        xs: &[usize],
        w: &[f32],
        ws: &[usize],
        b: Option<&[f32]>,
        strides: &[usize],
        dil: &[usize],
        pads: &[usize],
        auto_pad: &str,
        group: usize,
    ) -> (Vec<usize>, Vec<f32>, Vec<f64>) {
        let sp = xs.len() - 2;
        let (n, c, m) = (xs[0], xs[1], ws[0]);
        let (cg, mg) = (c / group, m / group);
        let mut begin = vec![0i64; sp];
        let mut out = vec![0usize; sp];
        for d in 0..sp {
            let ek = (ws[d + 2] - 1) * dil[d] + 1;
            match auto_pad {
                "NOTSET" => {
                    begin[d] = pads[d] as i64;
                    out[d] = (xs[d + 2] + pads[d] + pads[d + sp] - ek) / strides[d] + 1;
                }
                "VALID" => out[d] = (xs[d + 2] - ek) / strides[d] + 1,
                _ => {
                    out[d] = xs[d + 2].div_ceil(strides[d]);
                    let total = ((out[d] - 1) * strides[d] + ek).saturating_sub(xs[d + 2]);
                    let lower = if auto_pad == "SAME_UPPER" {
                        total / 2
                    } else {
                        total - total / 2
                    };
                    begin[d] = lower as i64;
                }
            }
        }
        let osz: usize = out.iter().product();
        let isz: usize = xs[2..].iter().product();
        let ksz: usize = ws[2..].iter().product();
        let mut y = vec![0.0f32; n * m * osz];
        // Σ|w·x| + |b| per output: the scale of the rounding error a float sum may carry.
        let mut mass = vec![0.0f64; n * m * osz];
        for ni in 0..n {
            for mi in 0..m {
                let g = mi / mg;
                for o in 0..osz {
                    let mut oc = vec![0usize; sp];
                    let mut r = o;
                    for d in (0..sp).rev() {
                        oc[d] = r % out[d];
                        r /= out[d];
                    }
                    let bias = b.map_or(0.0, |b| b[mi] as f64);
                    let (mut acc, mut abs) = (bias, bias.abs());
                    for ci in 0..cg {
                        for kf in 0..ksz {
                            let mut kc = vec![0usize; sp];
                            let mut r = kf;
                            for d in (0..sp).rev() {
                                kc[d] = r % ws[d + 2];
                                r /= ws[d + 2];
                            }
                            let mut at = Some(0usize);
                            for d in 0..sp {
                                let p = (oc[d] * strides[d] + kc[d] * dil[d]) as i64 - begin[d];
                                at = at
                                    .filter(|_| p >= 0 && p < xs[d + 2] as i64)
                                    .map(|a| a * xs[d + 2] + p as usize);
                            }
                            if let Some(p) = at {
                                let xv = x[(ni * c + g * cg + ci) * isz + p] as f64;
                                let wv = w[(mi * cg + ci) * ksz + kf] as f64;
                                acc += xv * wv;
                                abs += (xv * wv).abs();
                            }
                        }
                    }
                    y[(ni * m + mi) * osz + o] = acc as f32;
                    mass[(ni * m + mi) * osz + o] = abs;
                }
            }
        }
        let mut shape = vec![n, m];
        shape.extend_from_slice(&out);
        (shape, y, mass)
    }

    /// Conv against [`conv_reference`] on random inputs: 1-D (Whisper's stem in small), 2-D and 3-D;
    /// strides, asymmetric pads, dilations, groups (depthwise too), every auto_pad, with and without
    /// bias, outputs long enough for several tiles. Tolerance: 1e-5 of each output's Σ|w·x| + |b|
    /// (f32 sums of at most a few hundred products stay far inside it).
    #[test]
    fn conv_matches_direct_convolution() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(11);
        struct Case {
            x: Vec<usize>,
            w: Vec<usize>,
            strides: Vec<usize>,
            dil: Vec<usize>,
            pads: Vec<usize>,
            auto_pad: &'static str,
            group: usize,
            bias: bool,
        }
        let case = |x: &[usize], w: &[usize], s: &[usize], d: &[usize], p: &[usize]| Case {
            x: x.to_vec(),
            w: w.to_vec(),
            strides: s.to_vec(),
            dil: d.to_vec(),
            pads: p.to_vec(),
            auto_pad: "NOTSET",
            group: 1,
            bias: true,
        };
        let cases = vec![
            case(&[1, 8, 300], &[12, 8, 3], &[1], &[1], &[1, 1]),
            case(&[1, 12, 300], &[12, 12, 3], &[2], &[1], &[1, 1]),
            case(&[2, 3, 17], &[5, 3, 4], &[3], &[2], &[2, 0]),
            Case {
                group: 2,
                bias: false,
                ..case(&[2, 6, 40], &[4, 3, 5], &[1], &[3], &[0, 4])
            },
            Case {
                group: 6,
                ..case(&[1, 6, 33], &[6, 1, 3], &[1], &[1], &[1, 1])
            },
            case(
                &[1, 3, 9, 11],
                &[7, 3, 3, 2],
                &[2, 1],
                &[1, 2],
                &[1, 0, 2, 1],
            ),
            Case {
                group: 3,
                ..case(
                    &[2, 6, 8, 7],
                    &[9, 2, 2, 3],
                    &[1, 2],
                    &[2, 1],
                    &[0, 1, 1, 0],
                )
            },
            case(
                &[1, 2, 40, 40],
                &[5, 2, 3, 3],
                &[1, 1],
                &[1, 1],
                &[1, 1, 1, 1],
            ),
            case(
                &[1, 2, 4, 5, 6],
                &[3, 2, 2, 3, 2],
                &[1, 2, 1],
                &[1, 1, 2],
                &[1, 0, 1, 0, 1, 1],
            ),
            case(&[1, 4, 1], &[2, 4, 1], &[1], &[1], &[0, 0]),
            Case {
                auto_pad: "SAME_UPPER",
                ..case(&[1, 3, 10, 9], &[4, 3, 4, 3], &[3, 2], &[1, 1], &[])
            },
            Case {
                auto_pad: "SAME_LOWER",
                ..case(&[1, 3, 10, 9], &[4, 3, 4, 3], &[3, 2], &[1, 1], &[])
            },
            Case {
                auto_pad: "VALID",
                ..case(&[1, 3, 10, 9], &[4, 3, 4, 3], &[3, 2], &[1, 1], &[])
            },
        ];
        for c in &cases {
            let xv: Vec<f32> = (0..numel(&c.x))
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let wv: Vec<f32> = (0..numel(&c.w))
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let bv: Vec<f32> = (0..c.w[0]).map(|_| rng.random_range(-1.0..1.0)).collect();
            let ints = |v: &[usize]| Attr::Ints(v.iter().map(|&x| x as i64).collect());
            let mut attrs = vec![
                ("strides", ints(&c.strides)),
                ("dilations", ints(&c.dil)),
                ("group", Attr::Int(c.group as i64)),
                ("kernel_shape", ints(&c.w[2..])),
                ("auto_pad", Attr::Str(c.auto_pad.into())),
            ];
            if !c.pads.is_empty() {
                attrs.push(("pads", ints(&c.pads)));
            }
            let (xt, wt, bt) = (
                Tensor::f32(&c.x, &xv),
                Tensor::f32(&c.w, &wv),
                Tensor::f32(&[c.w[0]], &bv),
            );
            let ins: Vec<&Tensor> = if c.bias {
                vec![&xt, &wt, &bt]
            } else {
                vec![&xt, &wt]
            };
            let got = run("Conv", &attrs, &ins).unwrap().remove(0);
            let (shape, want, mass) = conv_reference(
                &xv,
                &c.x,
                &wv,
                &c.w,
                c.bias.then_some(&bv[..]),
                &c.strides,
                &c.dil,
                &c.pads,
                c.auto_pad,
                c.group,
            );
            assert_eq!(got.shape, shape, "x {:?} w {:?}", c.x, c.w);
            for (i, (&g, &w)) in got.typed::<f32>().iter().zip(&want).enumerate() {
                assert!(
                    ((g - w) as f64).abs() <= 1e-5 * mass[i] + 1e-7,
                    "x {:?} w {:?} at {i}: {g} vs {w}",
                    c.x,
                    c.w
                );
            }
        }
    }

    #[test]
    fn conv_refuses_bad_geometry() {
        let x = Tensor::f32(&[1, 4, 5], &[0.0; 20]);
        let w = Tensor::f32(&[2, 4, 7], &[0.0; 56]);
        let e = run("Conv", &[], &[&x, &w]).unwrap_err().to_string();
        assert!(e.contains("longer than the padded input"), "{e}");
        let w3 = Tensor::f32(&[2, 3, 3], &[0.0; 18]);
        assert!(run("Conv", &[], &[&x, &w3]).is_err(), "C mismatch");
        let w = Tensor::f32(&[2, 4, 3], &[0.0; 24]);
        for (k, v) in [
            ("strides", Attr::Ints(vec![0])),
            ("dilations", Attr::Ints(vec![1, 1])),
            ("pads", Attr::Ints(vec![-1, 0])),
            ("group", Attr::Int(3)),
            ("kernel_shape", Attr::Ints(vec![2])),
            ("auto_pad", Attr::Str("SAME".into())),
            ("pads", Attr::Ints(vec![1 << 40, 1 << 40])),
        ] {
            assert!(
                run("Conv", &[(k, v.clone())], &[&x, &w]).is_err(),
                "{k} {v:?}"
            );
        }
        let b = Tensor::f32(&[3], &[0.0; 3]);
        assert!(run("Conv", &[], &[&x, &w, &b]).is_err(), "bias length");
    }

    /// Whisper's two stem convolutions at full size (release build: `cargo test --release -p onestep
    /// --lib conv_whisper_timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn conv_whisper_timing() {
        for (c, stride) in [(80usize, 1i64), (384, 2)] {
            let x = Tensor::f32(
                &[1, c, 3000],
                &(0..c * 3000)
                    .map(|i| (i as f32 * 0.013).sin())
                    .collect::<Vec<_>>(),
            );
            let w = Tensor::f32(
                &[384, c, 3],
                &(0..384 * c * 3)
                    .map(|i| (i as f32 * 0.007).cos() * 0.05)
                    .collect::<Vec<_>>(),
            );
            let b = Tensor::f32(&[384], &[0.1; 384]);
            let attrs = [
                ("pads", Attr::Ints(vec![1, 1])),
                ("strides", Attr::Ints(vec![stride])),
            ];
            let _ = run("Conv", &attrs, &[&x, &w, &b]).unwrap();
            let reps = 5;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                std::hint::black_box(run("Conv", &attrs, &[&x, &w, &b]).unwrap());
            }
            let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            let flops = 2.0 * 384.0 * c as f64 * 3.0 * (3000 / stride as usize) as f64;
            println!(
                "Conv x [1, {c}, 3000] w [384, {c}, 3] stride {stride}: {ms:.2} ms ({:.1} GFLOP/s, {} threads)",
                flops / ms / 1e6,
                super::super::pool::threads()
            );
        }
    }

    #[test]
    fn pad_modes_and_negative_pads() {
        let a = Tensor::f32(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let pads = |v: &[i64]| Tensor::i64(&[v.len()], v);
        let pad = |mode: &str, p: &[i64]| {
            run("Pad", &[("mode", Attr::Str(mode.into()))], &[&a, &pads(p)])
                .unwrap()
                .remove(0)
        };
        let o = pad("constant", &[0, 1, 1, 0]);
        assert_eq!(o.shape, vec![3, 4]);
        assert_eq!(
            o.typed::<f32>(),
            &[0., 1., 2., 3., 0., 4., 5., 6., 0., 0., 0., 0.]
        );
        let o = pad("reflect", &[0, 2, 0, 3]);
        assert_eq!(
            o.typed::<f32>(),
            &[3., 2., 1., 2., 3., 2., 1., 2., 6., 5., 4., 5., 6., 5., 4., 5.]
        );
        let o = pad("edge", &[0, 1, 0, 1]);
        assert_eq!(o.typed::<f32>(), &[1., 1., 2., 3., 3., 4., 4., 5., 6., 6.]);
        let o = pad("wrap", &[1, 2, 0, 0]);
        assert_eq!(
            o.typed::<f32>(),
            &[5., 6., 4., 5., 6., 2., 3., 1., 2., 3., 5., 6., 4., 5., 6.]
        );
        // Crop one column on the left, pad one on the right with 9.
        let nine = Tensor::f32(&[], &[9.0]);
        let axes = Tensor::i64(&[1], &[-1]);
        let o = run("Pad", &[], &[&a, &pads(&[-1, 1]), &nine, &axes])
            .unwrap()
            .remove(0);
        assert_eq!(o.typed::<f32>(), &[2., 3., 9., 5., 6., 9.]);
        assert!(run("Pad", &[], &[&a, &pads(&[0, -4, 0, 0])]).is_err());
        let i = Tensor::i64(&[2], &[7, 8]);
        let o = run("Pad", &[], &[&i, &pads(&[1, 1])]).unwrap().remove(0);
        assert_eq!(o.typed::<i64>(), &[0, 7, 8, 0]);
    }

    #[test]
    fn slice_steps_and_clamping() {
        let a = Tensor::f32(&[3, 4], &(0..12).map(|v| v as f32).collect::<Vec<_>>());
        let t = |v: &[i64]| Tensor::i64(&[v.len()], v);
        let sl = |s: &[i64], e: &[i64], ax: &[i64], st: &[i64]| {
            run("Slice", &[], &[&a, &t(s), &t(e), &t(ax), &t(st)])
                .unwrap()
                .remove(0)
        };
        let o = sl(&[-1, 3], &[i64::MIN, 0], &[0, 1], &[-2, -1]);
        assert_eq!(o.shape, vec![2, 3]);
        assert_eq!(o.typed::<f32>(), &[11., 10., 9., 3., 2., 1.]);
        let o = sl(&[1], &[i64::MAX], &[-1], &[2]);
        assert_eq!(o.typed::<f32>(), &[1., 3., 5., 7., 9., 11.]);
        let o = sl(&[5], &[10], &[0], &[1]);
        assert_eq!(o.shape, vec![0, 4]);
        let bad = run("Slice", &[], &[&a, &t(&[0]), &t(&[1]), &t(&[0]), &t(&[0])]);
        assert!(bad.is_err(), "step 0");
        let empty = Tensor::f32(&[0, 2], &[]);
        let o = run(
            "Slice",
            &[],
            &[&empty, &t(&[-1]), &t(&[-5]), &t(&[0]), &t(&[-1])],
        )
        .unwrap()
        .remove(0);
        assert_eq!(o.shape, vec![0, 2]);
    }

    #[test]
    fn reduce_max_mean_and_layer_norm() {
        let a = Tensor::f32(&[2, 3], &[1., -2., 3., f32::NAN, 5., 0.5]);
        let ax = Tensor::i64(&[1], &[1]);
        let o = run("ReduceMax", &[("keepdims", Attr::Int(0))], &[&a, &ax])
            .unwrap()
            .remove(0);
        assert_eq!(o.shape, vec![2]);
        assert_eq!(o.typed::<f32>()[0], 3.0);
        assert!(o.typed::<f32>()[1].is_nan());
        let b = Tensor::f32(&[2, 2], &[1., 2., 3., 4.]);
        let o = run("ReduceMean", &[], &[&b]).unwrap().remove(0);
        assert_eq!(
            (o.shape.clone(), o.typed::<f32>()),
            (vec![1, 1], &[2.5f32][..])
        );
        let i = Tensor::i64(&[3], &[-7, 2, 1]);
        let o = run("ReduceMean", &[], &[&i]).unwrap().remove(0);
        assert_eq!(o.typed::<i64>(), &[-1]);
        let none = Tensor::i64(&[0], &[]);
        let o = run(
            "ReduceMax",
            &[("noop_with_empty_axes", Attr::Int(1))],
            &[&i, &none],
        )
        .unwrap()
        .remove(0);
        assert_eq!(o.typed::<i64>(), i.typed::<i64>());

        let x = Tensor::f32(&[2, 4], &[1., 2., 3., 4., -1., -1., -1., -1.]);
        let s = Tensor::f32(&[4], &[1., 2., 1., 1.]);
        let bias = Tensor::f32(&[1], &[0.5]);
        let o = run(
            "LayerNormalization",
            &[("epsilon", Attr::Float(1e-6))],
            &[&x, &s, &bias],
        )
        .unwrap();
        let inv = 1.0 / (1.25f64 + 1e-6).sqrt();
        let want = [-1.5 * inv, -0.5 * inv * 2.0, 0.5 * inv, 1.5 * inv];
        for (g, w) in o[0].typed::<f32>()[..4].iter().zip(want) {
            assert!((*g as f64 - (w + 0.5)).abs() < 1e-6, "{g} vs {w}");
        }
        assert_eq!(o[0].typed::<f32>()[4..], [0.5; 4]);
        assert_eq!(o[1].shape, vec![2, 1]);
        assert_eq!(o[1].typed::<f32>(), &[2.5, -1.0]);
        assert_eq!(o[2].typed::<f32>()[1], 1e3);
    }

    #[test]
    fn pow_keeps_the_base_type() {
        let f = Tensor::f32(&[3], &[2., -3., 4.]);
        let i = Tensor::i64(&[3], &[3, 2, -1]);
        let o = run("Pow", &[], &[&f, &i]).unwrap().remove(0);
        assert_eq!(o.typed::<f32>(), &[8., 9., 0.25]);
        let o = run("Pow", &[], &[&i, &f]).unwrap().remove(0);
        assert_eq!(o.typed::<i64>(), &[9, 0, 1]);
        let half = Tensor::f32(&[], &[0.5]);
        let o = run("Pow", &[], &[&Tensor::f32(&[2], &[9., -1.]), &half])
            .unwrap()
            .remove(0);
        assert_eq!(o.typed::<f32>()[0], 3.0);
        assert!(o.typed::<f32>()[1].is_nan());
    }
}
