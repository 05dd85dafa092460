//! The token choice's selection on the GPU (`select.wgsl`): `TopK` with `k = 1` (greedy) as an arg-max
//! that returns the value and the i64 index, so a greedy step reads back 12 bytes; with `1 < k ≤`
//! [`MAX_K`] (top-k sampling) as k rounds of it, so a sampled step reads back 12·k bytes, not the logits.

use std::sync::Arc;

use super::context::{Bind, GpuContext, Kernel};
use super::Params;
use crate::error::Result;

/// The WGSL of this family.
pub const SOURCE: &str = include_str!("select.wgsl");

/// Largest `k` of the GPU `TopK`; larger ones (top-p over the whole vocabulary) run on the host.
pub const MAX_K: usize = 64;

/// The kernel for `k`: the arg-max (`k = 1`) or k rounds of it (`1 < k ≤ MAX_K`); bindings X, VALS, IDX.
pub fn kernel(ctx: &GpuContext, k: usize) -> Result<Arc<Kernel>> {
    let entry = if k == 1 { "argmax" } else { "topk" };
    ctx.pipeline(
        "select",
        SOURCE,
        entry,
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

    /// The arg-max (k = 1) and the top-k rounds against the CPU's `top_k`: values, indices, order.
    #[test]
    fn topk_matches_cpu_order() {
        let Some(ctx) = ctx() else { return };
        for (rows, v, k) in [
            (1, 49152, 1),
            (3, 1000, 1),
            (2, 7, 1),
            (1, 1, 1),
            (1, 49152, 40),
            (3, 1000, 64),
            (2, 7, 7),
            (1, 300, 2),
            (2, 513, 17),
        ] {
            let mut x = noise(rows * v, (v * k) as u64);
            // Ties (the lower index first), among the largest and across the threads' strides.
            if v > 3 {
                x[3] = 5.0;
                x[v - 1] = 5.0;
                x[1] = 5.0;
            }
            if v > 300 {
                x[256 + 3] = 4.0;
                x[3 + 512 % v] = 4.0;
            }
            let outs = run_kernel_multi(
                &ctx,
                &kernel(&ctx, k).unwrap(),
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
