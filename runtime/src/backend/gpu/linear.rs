//! Linear layers (`linear.wgsl`): every weight encoding of the step graph decoded on the fly from the
//! file's own bytes (uploaded once, never expanded to f32), bias and residual add fused in the epilogue.
//! Weights larger than the adapter's storage-binding limit are split by rows into parts, one dispatch
//! each, so nothing is ever truncated.

use std::sync::Arc;

use super::context::{Bind, GpuContext, Kernel};
use super::Params;
use crate::error::{Error, Result};
use crate::graph::DType;
use crate::weights::{LinearWeights, WeightForm};

/// The WGSL of this family.
pub const SOURCE: &str = include_str!("linear.wgsl");
/// Output rows a workgroup computes for input width `k`: the 256 threads split into rows × lanes, and
/// each lane walks `k / lanes` elements — short chains for decode (latency-bound), all threads busy.
pub fn rows_for(k: usize) -> usize {
    match k {
        0..=128 => 8,
        129..=256 => 4,
        257..=1024 => 2,
        _ => 1,
    }
}
/// Tokens a workgroup computes (grid z covers the rest).
pub const TOKENS: usize = 8;

/// Row range of a weight part and its buffers.
#[derive(Debug)]
pub struct Part {
    /// First output row.
    pub n0: usize,
    /// Rows in this part.
    pub rows: usize,
    /// Packed weights (u32 words).
    pub w: wgpu::Buffer,
    /// Scales (block / per-row forms; a dummy otherwise).
    pub s: wgpu::Buffer,
    /// Zero points as f32 (block forms; a dummy otherwise).
    pub z: wgpu::Buffer,
}

/// A linear layer's weights resident on the GPU.
#[derive(Debug)]
pub struct GpuLinear {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Row parts (one unless the weights exceed a binding).
    pub parts: Vec<Part>,
    /// Bias `[N]` (a dummy when absent).
    pub bias: wgpu::Buffer,
    /// Whether there is a bias.
    pub has_bias: bool,
    /// The kernel for this encoding.
    pub kernel: Arc<Kernel>,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Output rows a workgroup computes (`0`: one row an invocation, 64 a workgroup).
    pub rows: usize,
}

fn form_code(w: &LinearWeights) -> Option<(u32, usize)> {
    let k = w.k;
    Some(match &w.form {
        WeightForm::F32(_) => (0, 4 * k),
        WeightForm::F16(_) => (1, 2 * k),
        WeightForm::BF16(_) => (2, 2 * k),
        WeightForm::Int8PerChannel { .. } => (3, k),
        WeightForm::Block {
            bits, block, zero, ..
        } => {
            if *block != 32 || k % 32 != 0 || !matches!(zero.dtype, DType::F32 | DType::U8) {
                return None;
            }
            match bits {
                4 => (4, k / 32 * 16),
                8 => (5, k / 32 * 32),
                _ => return None,
            }
        }
    })
}

impl GpuLinear {
    /// Whether the GPU kernel takes this encoding (block forms need blocks of 32).
    pub fn supports(w: &LinearWeights) -> bool {
        form_code(w).is_some()
    }

    /// Uploads `w` (and `bias`), split so that no binding exceeds the context's limit.
    pub fn new(
        ctx: &GpuContext,
        name: &str,
        w: &LinearWeights,
        bias: Option<&[f32]>,
    ) -> Result<GpuLinear> {
        Self::with_limit(ctx, name, w, bias, ctx.binding_limit)
    }

    /// Like [`GpuLinear::new`] with an explicit per-buffer limit (tests force splits with it).
    pub fn with_limit(
        ctx: &GpuContext,
        name: &str,
        w: &LinearWeights,
        bias: Option<&[f32]>,
        limit: u64,
    ) -> Result<GpuLinear> {
        Self::with_variant(ctx, name, w, bias, limit, super::rows_variant(ctx))
    }

    /// Like [`GpuLinear::with_limit`], choosing the kernel variant: `rows_per_thread` runs one output row
    /// an invocation (`linear_rows`), else rows × lanes a workgroup (`linear`).
    pub fn with_variant(
        ctx: &GpuContext,
        name: &str,
        w: &LinearWeights,
        bias: Option<&[f32]>,
        limit: u64,
        rows_per_thread: bool,
    ) -> Result<GpuLinear> {
        let (code, row_bytes) = form_code(w).ok_or_else(|| {
            Error::Gpu(format!(
                "`{name}`: weight encoding not supported on the GPU"
            ))
        })?;
        let (n, k) = (w.n, w.k);
        let nb = k / 32;
        let side_row = match &w.form {
            WeightForm::Block { .. } => 4 * nb,
            _ => 4,
        };
        let per_row = row_bytes.max(side_row) as u64;
        let mut rows_per = ((limit / per_row.max(1)) as usize / 4 * 4).min(n.next_multiple_of(4));
        if rows_per == 0 {
            return Err(Error::Gpu(format!(
                "`{name}`: one weight row ({per_row} bytes) exceeds the binding limit of {limit} bytes"
            )));
        }
        if rows_per >= n {
            rows_per = n;
        }
        let mut parts = Vec::new();
        let mut bytes = 0u64;
        let dummy = || ctx.buffer_with("dummy", &[0; 4]);
        let mut n0 = 0;
        while n0 < n {
            let n1 = (n0 + rows_per).min(n);
            let (wb, sb, zb) = match &w.form {
                WeightForm::F32(t) | WeightForm::F16(t) | WeightForm::BF16(t) => {
                    (&t.bytes()[n0 * row_bytes..n1 * row_bytes], None, None)
                }
                WeightForm::Int8PerChannel { q, scale } => (
                    &q.bytes()[n0 * row_bytes..n1 * row_bytes],
                    Some(scale.typed::<f32>()[n0..n1].to_vec()),
                    None,
                ),
                WeightForm::Block {
                    b, scales, zero, ..
                } => {
                    let z: Vec<f32> = match zero.dtype {
                        DType::F32 => zero.typed::<f32>()[n0 * nb..n1 * nb].to_vec(),
                        _ => zero.bytes()[n0 * nb..n1 * nb]
                            .iter()
                            .map(|&v| v as f32)
                            .collect(),
                    };
                    (
                        &b.bytes()[n0 * row_bytes..n1 * row_bytes],
                        Some(scales.typed::<f32>()[n0 * nb..n1 * nb].to_vec()),
                        Some(z),
                    )
                }
            };
            let w = ctx.buffer_with(&format!("{name}.w[{n0}..]"), wb)?;
            bytes += wb.len() as u64;
            let s = match sb {
                Some(v) => {
                    bytes += 4 * v.len() as u64;
                    ctx.buffer_with(&format!("{name}.scales"), bytemuck::cast_slice(&v))?
                }
                None => dummy()?,
            };
            let z = match zb {
                Some(v) => {
                    bytes += 4 * v.len() as u64;
                    ctx.buffer_with(&format!("{name}.zeros"), bytemuck::cast_slice(&v))?
                }
                None => dummy()?,
            };
            parts.push(Part {
                n0,
                rows: n1 - n0,
                w,
                s,
                z,
            });
            n0 = n1;
        }
        let (bias, has_bias) = match bias {
            Some(b) => (
                ctx.buffer_with(&format!("{name}.bias"), bytemuck::cast_slice(b))?,
                true,
            ),
            None => (dummy()?, false),
        };
        // `rows = 0`: one row an invocation (`linear_rows`), for adapters that are CPUs.
        // llvmpipe bounds an invocation's loop iterations (65535): a very wide row takes the lanes variant.
        let rows = if rows_per_thread && k < 60_000 {
            0
        } else {
            rows_for(k)
        };
        let kernel = kernel(ctx, code, rows)?;
        Ok(GpuLinear {
            rows,
            n,
            k,
            parts,
            bias,
            has_bias,
            kernel,
            bytes,
        })
    }

    /// Parameters of part `i` for `t` tokens (output row stride `n`), with or without a residual.
    pub fn params(&self, i: usize, t: usize, residual: bool) -> Params {
        let p = &self.parts[i];
        Params::new()
            .u(p.rows)
            .u(self.k)
            .u(t)
            .u(p.n0)
            .u(self.n)
            .u(self.has_bias as usize)
            .u(residual as usize)
    }

    /// Workgroups of part `i` for `t` tokens.
    pub fn groups(&self, i: usize, t: usize, max_dim: u32) -> (u32, u32, u32) {
        let per_group = if self.rows == 0 { 64 } else { self.rows };
        let (x, y) = super::grid(self.parts[i].rows, per_group, max_dim);
        (x, y, t.div_ceil(TOKENS) as u32)
    }
}

/// The kernel for encoding `code` (see `linear.wgsl`) computing `rows` rows a workgroup (`0`: the
/// one-row-an-invocation variant): bindings X, W, S, Z, BIAS, RES, O.
pub fn kernel(ctx: &GpuContext, code: u32, rows: usize) -> Result<Arc<Kernel>> {
    let (entry, rows) = if rows == 0 {
        ("linear_rows", 8)
    } else {
        ("linear", rows)
    };
    ctx.pipeline(
        "linear",
        SOURCE,
        entry,
        &[
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::Write,
        ],
        &[("FORM", code as f64), ("ROWS", rows as f64)],
    )
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{ctx, noise};
    use super::*;
    use crate::tensor::Tensor;
    use half::{bf16, f16};

    fn forms(n: usize, k: usize, seed: u64) -> Vec<(&'static str, LinearWeights)> {
        let v = noise(n * k, seed);
        let bytes: Vec<u8> = noise(n * k, seed + 1)
            .iter()
            .map(|x| ((x + 1.0) * 127.9) as u8)
            .collect();
        let nb = k / 32;
        let mut out = vec![
            (
                "f32",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::F32(Tensor::f32(&[n, k], &v)),
                },
            ),
            (
                "f16",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::F16(Tensor::from_slice(
                        DType::F16,
                        &[n, k],
                        &v.iter().map(|x| f16::from_f32(*x)).collect::<Vec<_>>(),
                    )),
                },
            ),
            (
                "bf16",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::BF16(Tensor::from_slice(
                        DType::BF16,
                        &[n, k],
                        &v.iter().map(|x| bf16::from_f32(*x)).collect::<Vec<_>>(),
                    )),
                },
            ),
            (
                "int8",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::Int8PerChannel {
                        q: Tensor::from_slice(
                            DType::I8,
                            &[n, k],
                            &bytes.iter().map(|b| *b as i8).collect::<Vec<_>>(),
                        ),
                        scale: Tensor::f32(&[n], &noise(n, seed + 2)),
                    },
                },
            ),
        ];
        if k % 32 == 0 {
            let scales = Tensor::f32(&[n * nb], &noise(n * nb, seed + 3));
            let zf: Vec<f32> = noise(n * nb, seed + 4)
                .iter()
                .map(|x| 8.0 + 6.0 * x)
                .collect();
            out.push((
                "q4 f32 zero",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::Block {
                        bits: 4,
                        block: 32,
                        b: Tensor::from_slice(DType::U8, &[n * nb * 16], &bytes[..n * nb * 16]),
                        scales: scales.clone(),
                        zero: Tensor::f32(&[n * nb], &zf),
                    },
                },
            ));
            let zu: Vec<u8> = zf.iter().map(|z| *z as u8).collect();
            out.push((
                "q4 u8 zero",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::Block {
                        bits: 4,
                        block: 32,
                        b: Tensor::from_slice(DType::U8, &[n * nb * 16], &bytes[..n * nb * 16]),
                        scales: scales.clone(),
                        zero: Tensor::f32(
                            &[n * nb],
                            &zu.iter().map(|z| *z as f32).collect::<Vec<_>>(),
                        ),
                    },
                },
            ));
            out.push((
                "q8",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::Block {
                        bits: 8,
                        block: 32,
                        b: Tensor::from_slice(DType::U8, &[n * k], &bytes),
                        scales,
                        zero: Tensor::from_slice(DType::U8, &[n * nb], &vec![128u8; n * nb]),
                    },
                },
            ));
        }
        out
    }

    #[test]
    fn every_encoding_matches_the_cpu_across_shapes_and_splits() {
        let Some(ctx) = ctx() else { return };
        for (n, k, t) in [
            (1, 32, 1),
            (7, 64, 3),
            (64, 576, 1),
            (100, 96, 9),
            (33, 33, 2),
            (260, 128, 17),
        ] {
            for (name, w) in forms(n, k, (n * k + t) as u64) {
                let x: Vec<f32> = noise(t * k, 11);
                let bias = noise(n, 12);
                let res = noise(t * n, 13);
                let mut want = vec![0.0; t * n];
                w.forward(&x, t, Some(&bias), &mut want).unwrap();
                want.iter_mut().zip(&res).for_each(|(w, r)| *w += r);
                // Whole, and split into parts of (about) a quarter of the rows.
                let per = form_code(&w).unwrap().1.max(4 * (k / 32).max(1));
                for (limit, rows_per_thread) in [
                    (ctx.binding_limit, false),
                    (ctx.binding_limit, true),
                    ((per * n.div_ceil(4).next_multiple_of(4)) as u64, false),
                    ((per * n.div_ceil(4).next_multiple_of(4)) as u64, true),
                ] {
                    let g = GpuLinear::with_variant(
                        &ctx,
                        name,
                        &w,
                        Some(&bias),
                        limit,
                        rows_per_thread,
                    )
                    .unwrap();
                    let got = super::super::exec::run_linear_once(&ctx, &g, &x, &res, t).unwrap();
                    // f32 sums in another order: error relative to the output's scale.
                    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                    let e = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f32::max)
                        / scale;
                    assert!(
                        e < 2e-5,
                        "{name} n {n} k {k} t {t} parts {} per-thread {rows_per_thread}: {e}",
                        g.parts.len()
                    );
                    if limit < ctx.binding_limit && n >= 64 {
                        assert!(g.parts.len() > 1, "{name}: expected a split");
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_larger_than_a_binding_is_an_error() {
        let Some(ctx) = ctx() else { return };
        let (_, w) = forms(4, 64, 1).remove(0);
        let e = GpuLinear::with_limit(&ctx, "big", &w, None, 100).unwrap_err();
        assert!(e.to_string().contains("exceeds the binding limit"), "{e}");
    }
}
