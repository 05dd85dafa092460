//! The token choice's selection on the GPU (`select.wgsl`): `TopK` with `k = 1` (greedy) as an arg-max
//! that returns the value and the i64 index, so a greedy step reads back 12 bytes; with `1 < k ≤`
//! [`MAX_K`] (top-k sampling) as k rounds of it, so a sampled step reads back 12·k bytes, not the logits.

use std::sync::Arc;

use super::context::{Bind, GpuContext, Kernel};
use super::Params;
use crate::error::Result;

/// The WGSL of this family.
pub const SOURCE: &str = include_str!("select.wgsl");

/// The arg-max kernel: bindings X, VALS, IDX.
pub fn argmax(ctx: &GpuContext) -> Result<Arc<Kernel>> {
    ctx.pipeline(
        "select",
        SOURCE,
        "argmax",
        &[Bind::Read, Bind::Write, Bind::Write],
        &[],
    )
}

/// Largest `k` of the GPU `TopK`; larger ones (top-p over the whole vocabulary) run on the host.
pub const MAX_K: usize = 64;

/// The top-k kernel (`1 < k ≤ MAX_K`): bindings X, VALS, IDX.
pub fn topk(ctx: &GpuContext) -> Result<Arc<Kernel>> {
    ctx.pipeline(
        "select",
        SOURCE,
        "topk",
        &[Bind::Read, Bind::Write, Bind::Write],
        &[],
    )
}

/// Parameters: `rows` rows of `v` values, the `k` largest of each.
pub fn params(rows: usize, v: usize, k: usize) -> Params {
    Params::new().u(rows).u(v).u(k)
}

#[cfg(test)]
mod tests {
    use super::super::exec::run_kernel_multi;
    use super::super::testutil::{ctx, noise};
    use super::*;

    #[test]
    fn argmax_matches_cpu_top1() {
        let Some(ctx) = ctx() else { return };
        let k = argmax(&ctx).unwrap();
        for (rows, v) in [(1, 49152), (3, 1000), (2, 7), (1, 1)] {
            let mut x = noise(rows * v, v as u64);
            if v > 10 {
                // A tie: the lower index must win.
                x[5] = 2.0;
                x[9] = 2.0;
            }
            let outs = run_kernel_multi(
                &ctx,
                &k,
                &params(rows, v, 1),
                &[bytemuck::cast_slice(&x)],
                &[rows * 4, rows * 8],
                (rows as u32, 1),
            )
            .unwrap();
            let vals: &[f32] = bytemuck::cast_slice(&outs[0]);
            let idx: &[i64] = bytemuck::cast_slice(&outs[1]);
            for r in 0..rows {
                let row = &x[r * v..(r + 1) * v];
                let want = crate::backend::cpu::basic::top_k(row, 1, true)[0];
                assert_eq!(idx[r] as usize, want, "rows {rows} v {v}");
                assert_eq!(vals[r], row[want]);
            }
        }
    }

    #[test]
    fn topk_matches_cpu_order() {
        let Some(ctx) = ctx() else { return };
        let kern = topk(&ctx).unwrap();
        for (rows, v, k) in [
            (1, 49152, 40),
            (3, 1000, 64),
            (2, 7, 7),
            (1, 300, 2),
            (2, 513, 17),
        ] {
            let mut x = noise(rows * v, (v * k) as u64);
            // Ties (the lower index first), among the largest and across the threads' strides.
            x[3] = 5.0;
            x[v - 1] = 5.0;
            x[1] = 5.0;
            if v > 300 {
                x[256 + 3] = 4.0;
                x[3 + 512 % v] = 4.0;
            }
            let outs = run_kernel_multi(
                &ctx,
                &kern,
                &params(rows, v, k),
                &[bytemuck::cast_slice(&x)],
                &[rows * k * 4, rows * k * 8],
                (rows as u32, 1),
            )
            .unwrap();
            let vals: &[f32] = bytemuck::cast_slice(&outs[0]);
            let idx: &[i64] = bytemuck::cast_slice(&outs[1]);
            for r in 0..rows {
                let row = &x[r * v..(r + 1) * v];
                let want = crate::backend::cpu::basic::top_k(row, k, true);
                let got: Vec<usize> = idx[r * k..(r + 1) * k]
                    .iter()
                    .map(|&i| i as usize)
                    .collect();
                assert_eq!(got, want, "rows {rows} v {v} k {k}");
                let wv: Vec<f32> = want.iter().map(|&i| row[i]).collect();
                assert_eq!(&vals[r * k..(r + 1) * k], &wv[..]);
            }
        }
    }
}
