//! RotaryEmbedding (`rope.wgsl`): one thread an element, positions read as i64 (low words), optionally
//! reading a `[1, T, H, D]` input so the graph's preceding transpose costs no dispatch, and optionally
//! RMS-normalizing each head first (QK-norm, [`FoldedNorm`](crate::plan::FoldedNorm)) so neither does the
//! norm.

use std::sync::Arc;

use super::context::{Bind, GpuContext, Kernel};
use super::Params;
use crate::error::Result;

/// The WGSL of this family.
pub const SOURCE: &str = include_str!("rope.wgsl");

/// The kernel, each head RMS-normalized first when `norm`: bindings X, COS, SIN, POS (i64), NW (the
/// norm's scale `[D]`; a dummy without), O.
pub fn kernel(ctx: &GpuContext, norm: bool) -> Result<Arc<Kernel>> {
    ctx.pipeline(
        "rope",
        SOURCE,
        "rope",
        &[
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::Read,
            Bind::Write,
        ],
        &[("NORM", f64::from(u8::from(norm)))],
    )
}

/// Where a rotary's input lies and what is done to it before the rotation.
#[derive(Debug, Clone, Copy)]
pub struct RopeIn {
    /// Read from `[1, T, H, D]` (the graph's transpose absorbed) rather than `[1, H, T, D]`.
    pub tokens_first: bool,
    /// The epsilon of the head norm done first, if any.
    pub norm_eps: Option<f32>,
}

/// Parameters: `h` heads, `t` tokens, head size `d`, rotated prefix `rot`.
pub fn params(
    h: usize,
    t: usize,
    d: usize,
    rot: usize,
    interleaved: bool,
    input: RopeIn,
) -> Params {
    Params::new()
        .u(h)
        .u(t)
        .u(d)
        .u(rot)
        .u(interleaved as usize)
        .u(input.tokens_first as usize)
        .u(h * t * d)
        .f(input.norm_eps.unwrap_or(0.0))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{ctx, max_rel, noise, rms_rows};
    use super::super::{exec::run_kernel_once, grid};
    use super::*;
    use crate::backend::cpu::rope::{reference, RopeShape};

    /// Every shape and layout, with and without the head norm first (QK-norm: the CPU reference
    /// normalizes, then rotates).
    #[test]
    fn rope_matches_cpu_reference() {
        let Some(ctx) = ctx() else { return };
        let cases = [
            (9, 1, 64, 64, false, false),
            (3, 5, 64, 64, true, false),
            (4, 7, 32, 16, false, true),
            (2, 3, 128, 64, true, true),
            (4, 6, 256, 256, false, true),
        ];
        for ((h, t, d, rot, inter, tf), norm) in
            cases.into_iter().flat_map(|c| [(c, false), (c, true)])
        {
            let k = kernel(&ctx, norm).unwrap();
            let eps = 1e-6;
            let max_pos = 50;
            let cos = noise(max_pos * rot / 2, 1);
            let sin = noise(max_pos * rot / 2, 2);
            let pos: Vec<i64> = (0..t as i64)
                .map(|i| (i * 7 + 3) % max_pos as i64)
                .collect();
            let x: Vec<f32> = noise(h * t * d, 3).iter().map(|v| 4.0 * v).collect();
            let nw: Vec<f32> = noise(d, 4).iter().map(|v| 1.0 + v).collect();
            let xin = if norm {
                rms_rows(&x, &nw, eps)
            } else {
                x.clone()
            };
            let shape = RopeShape {
                heads: h,
                tokens: t,
                head_dim: d,
                rotary_dim: rot,
                tokens_first: tf,
                interleaved: inter,
            };
            let mut want = vec![0.0; x.len()];
            reference(&xin, &shape, &cos, &sin, &pos, &mut want).unwrap();
            if tf {
                // The GPU writes [H, T, D]; the reference kept [T, H, D].
                let mut hf = vec![0.0; x.len()];
                for hh in 0..h {
                    for tt in 0..t {
                        hf[(hh * t + tt) * d..][..d]
                            .copy_from_slice(&want[(tt * h + hh) * d..][..d]);
                    }
                }
                want = hf;
            }
            let n = h * t * d;
            let got = run_kernel_once(
                &ctx,
                &k,
                &params(
                    h,
                    t,
                    d,
                    rot,
                    inter,
                    RopeIn {
                        tokens_first: tf,
                        norm_eps: norm.then_some(eps),
                    },
                ),
                &[
                    bytemuck::cast_slice(&x),
                    bytemuck::cast_slice(&cos),
                    bytemuck::cast_slice(&sin),
                    bytemuck::cast_slice(&pos),
                    bytemuck::cast_slice(&nw),
                ],
                n * 4,
                grid(n, 256, ctx.max_groups),
            )
            .unwrap();
            let e = max_rel(bytemuck::cast_slice(&got), &want);
            // The norm: inverseSqrt and f32 sums against f64.
            let tol = if norm { 1e-5 } else { 1e-6 };
            assert!(e < tol, "{h} {t} {d} {rot} {inter} {tf} norm {norm}: {e}");
        }
    }
}
