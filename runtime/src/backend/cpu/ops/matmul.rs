//! Matrix products: `MatMul`, `Gemm`, `com.microsoft::MatMulNBits`, and `DequantizeLinear`.

use super::elementwise::cast;
use super::shape::transpose;
use super::{broadcast_offsets, broadcast_shape, input, norm_axis, Ctx};
use crate::error::Result;
use crate::graph::DType;
use crate::tensor::Tensor;

/// `MatMul` as numpy's `matmul`: `[.., M, K] × [.., K, N]` with the batch dims broadcast, a 1-D
/// operand taken as a row (`[K]` × ..) or a column (.. × `[K]`) whose dim is dropped from the result.
pub(super) fn matmul(ctx: &Ctx, a: &Tensor, b: &Tensor) -> Result<Tensor> {
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

pub(super) fn gemm(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
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

pub(super) fn dequantize_linear(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
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

pub(super) fn matmul_nbits(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Tensor> {
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
