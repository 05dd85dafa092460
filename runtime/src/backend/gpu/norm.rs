//! RMSNormalization and LayerNormalization over the last axis (`norm.wgsl`): one workgroup a row, f32
//! accumulation; the RMS norm optionally with the residual `Add` after it in the epilogue
//! ([`NormResidual`](crate::plan::NormResidual)), the layer norm with its optional bias.

use std::sync::Arc;

use super::context::{Bind, GpuContext, Kernel};
use super::Params;
use crate::error::Result;

/// The WGSL of this family.
pub const SOURCE: &str = include_str!("norm.wgsl");

/// The RMS-norm kernel, adding RES to its output when `residual`: bindings X, W (scale), RES (a dummy
/// without), O.
pub fn kernel(ctx: &GpuContext, residual: bool) -> Result<Arc<Kernel>> {
    ctx.pipeline(
        "norm",
        SOURCE,
        "rms_norm",
        &[Bind::Read, Bind::Read, Bind::Read, Bind::Write],
        &[("RESIDUAL", f64::from(u8::from(residual)))],
    )
}

/// The layer-norm kernel: bindings X, W (scale), B (bias; a dummy without), O.
pub fn layer_kernel(ctx: &GpuContext) -> Result<Arc<Kernel>> {
    ctx.pipeline(
        "norm",
        SOURCE,
        "layer_norm",
        &[Bind::Read, Bind::Read, Bind::Read, Bind::Write],
        &[],
    )
}

/// Parameters for `rows` rows of `h` values (`bias`: the layer norm adds one).
pub fn params(rows: usize, h: usize, eps: f32, bias: bool) -> Params {
    Params::new().u(rows).u(h).f(eps).u(bias as usize)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{ctx, max_rel, noise};
    use super::super::{exec::run_kernel_once, grid};
    use super::*;

    /// Every shape, with and without the residual added (the reference's norm plus `res`).
    #[test]
    fn rms_norm_matches_cpu_reference() {
        let Some(ctx) = ctx() else { return };
        for residual in [false, true] {
            let k = kernel(&ctx, residual).unwrap();
            for (rows, h) in [(1, 576), (7, 64), (3, 1000), (64, 576), (2, 3), (5, 640)] {
                let x: Vec<f32> = noise(rows * h, h as u64).iter().map(|v| v * 3.0).collect();
                let w = noise(h, 7);
                let res = noise(rows * h, 9);
                let got = run_kernel_once(
                    &ctx,
                    &k,
                    &params(rows, h, 1e-5, false),
                    &[
                        bytemuck::cast_slice(&x),
                        bytemuck::cast_slice(&w),
                        bytemuck::cast_slice(&res),
                    ],
                    rows * h * 4,
                    grid(rows, 1, ctx.max_groups),
                )
                .unwrap();
                let mut want = vec![0.0; rows * h];
                crate::backend::cpu::norm::reference(&x, &w, 1e-5, &mut want).unwrap();
                if residual {
                    want.iter_mut().zip(&res).for_each(|(w, r)| *w += r);
                }
                let e = max_rel(bytemuck::cast_slice(&got), &want);
                assert!(e < 2e-6, "rows {rows} h {h} residual {residual}: {e}");
            }
        }
    }

    /// LayerNormalization with and without the bias, against the f64 mean/variance reference (rows
    /// offset far from zero: the two-pass variance keeps them).
    #[test]
    fn layer_norm_matches_the_f64_reference() {
        let Some(ctx) = ctx() else { return };
        let k = layer_kernel(&ctx).unwrap();
        for (rows, h) in [(1, 384), (5, 64), (3, 1000), (2, 3)] {
            for bias in [false, true] {
                let x: Vec<f32> = noise(rows * h, h as u64)
                    .iter()
                    .map(|v| 50.0 + 3.0 * v)
                    .collect();
                let (w, b) = (noise(h, 7), noise(h, 8));
                let eps = 1e-5;
                let got = run_kernel_once(
                    &ctx,
                    &k,
                    &params(rows, h, eps, bias),
                    &[
                        bytemuck::cast_slice(&x),
                        bytemuck::cast_slice(&w),
                        bytemuck::cast_slice(&b),
                    ],
                    rows * h * 4,
                    grid(rows, 1, ctx.max_groups),
                )
                .unwrap();
                let want: Vec<f32> = x
                    .chunks(h)
                    .flat_map(|r| {
                        let n = h as f64;
                        let mean = r.iter().map(|&v| v as f64).sum::<f64>() / n;
                        let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                        let inv = 1.0 / (var + eps as f64).sqrt();
                        let (w, b) = (&w, &b);
                        r.iter().enumerate().map(move |(i, &v)| {
                            let y = (v as f64 - mean) * inv * w[i] as f64;
                            (y + if bias { b[i] as f64 } else { 0.0 }) as f32
                        })
                    })
                    .collect();
                let e = max_rel(bytemuck::cast_slice(&got), &want);
                assert!(e < 2e-5, "rows {rows} h {h} bias {bias}: {e}");
            }
        }
    }
}
