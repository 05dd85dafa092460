//! The token choice's selection on the GPU (`select.wgsl`): `TopK` with `k = 1` (greedy) as an arg-max
//! that returns the value and the i64 index, so a greedy step reads back 12 bytes.

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

/// Parameters: `rows` rows of `v` values.
pub fn params(rows: usize, v: usize) -> Params {
    Params::new().u(rows).u(v)
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
                &params(rows, v),
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
}
