//! RotaryEmbedding (`rope.wgsl`): one thread an element, positions read as i64 (low words), optionally
//! reading a `[1, T, H, D]` input so the graph's preceding transpose costs no dispatch.

use std::sync::Arc;

use super::context::{Bind, GpuContext, Kernel};
use super::Params;
use crate::error::Result;

/// The WGSL of this family.
pub const SOURCE: &str = include_str!("rope.wgsl");

/// The kernel: bindings X, COS, SIN, POS (i64), O.
pub fn kernel(ctx: &GpuContext) -> Result<Arc<Kernel>> {
    ctx.pipeline(
        "rope",
        SOURCE,
        "rope",
        &[Bind::Read, Bind::Read, Bind::Read, Bind::Read, Bind::Write],
        &[],
    )
}

/// Parameters: `h` heads, `t` tokens, head size `d`, rotated prefix `rot`.
pub fn params(
    h: usize,
    t: usize,
    d: usize,
    rot: usize,
    interleaved: bool,
    tokens_first: bool,
) -> Params {
    Params::new()
        .u(h)
        .u(t)
        .u(d)
        .u(rot)
        .u(interleaved as usize)
        .u(tokens_first as usize)
        .u(h * t * d)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{ctx, max_rel, noise};
    use super::super::{exec::run_kernel_once, grid};
    use super::*;
    use crate::backend::cpu::rope::{reference, RopeShape};

    #[test]
    fn rope_matches_cpu_reference() {
        let Some(ctx) = ctx() else { return };
        let k = kernel(&ctx).unwrap();
        for (h, t, d, rot, inter, tf) in [
            (9, 1, 64, 64, false, false),
            (3, 5, 64, 64, true, false),
            (4, 7, 32, 16, false, true),
            (2, 3, 128, 64, true, true),
        ] {
            let max_pos = 50;
            let cos = noise(max_pos * rot / 2, 1);
            let sin = noise(max_pos * rot / 2, 2);
            let pos: Vec<i64> = (0..t as i64)
                .map(|i| (i * 7 + 3) % max_pos as i64)
                .collect();
            let x = noise(h * t * d, 3);
            let shape = RopeShape {
                heads: h,
                tokens: t,
                head_dim: d,
                rotary_dim: rot,
                tokens_first: tf,
                interleaved: inter,
            };
            let mut want = vec![0.0; x.len()];
            reference(&x, &shape, &cos, &sin, &pos, &mut want).unwrap();
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
                &params(h, t, d, rot, inter, tf),
                &[
                    bytemuck::cast_slice(&x),
                    bytemuck::cast_slice(&cos),
                    bytemuck::cast_slice(&sin),
                    bytemuck::cast_slice(&pos),
                ],
                n * 4,
                grid(n, 256, ctx.max_groups),
            )
            .unwrap();
            let e = max_rel(bytemuck::cast_slice(&got), &want);
            assert!(e < 1e-6, "{h} {t} {d} {rot} {inter} {tf}: {e}");
        }
    }
}
