//! Normalizations: `RMSNormalization` (on the kernel of `cpu/norm.rs`) and `LayerNormalization`.

use super::elementwise::cast;
use super::{broadcast_offsets, broadcast_shape, floats, input, norm_axis, Ctx};
use crate::error::Result;
use crate::graph::DType;
use crate::tensor::{numel, Tensor};

pub(super) fn rms_norm(ctx: &Ctx, x: &Tensor, scale: &Tensor) -> Result<Tensor> {
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
    crate::backend::cpu::norm::rms_norm(xv, sv, eps, out.typed_mut::<f32>())
        .map_err(|e| ctx.err(e.to_string()))?;
    Ok(out)
}

/// ONNX `LayerNormalization` (opset 17): each run over the axes `axis..` normalized to zero mean and unit
/// variance (both in f64, `stash_type` 1), times `Scale`, plus `B`; both broadcast to the normalized
/// shape. Outputs `Y` (the input's dtype), `Mean` and `InvStdDev` (f32, the input's shape with the
/// normalized dims 1).
pub(super) fn layer_norm(ctx: &Ctx, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>> {
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
