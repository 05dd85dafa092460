//! The token choice's selection on the GPU (`select.wgsl`): `TopK` with `k = 1` (greedy) as an arg-max
//! that returns the value and the i64 index, so a greedy step reads back 12 bytes; with `1 < k ≤`
//! [`MAX_K`] (top-k sampling) as k rounds of it; with a larger `k` (top-p over the whole vocabulary)
//! as a bitonic sort of the row ([`sort_schedule`]). The token choice's tail after it runs on the GPU
//! too (`choice.rs`), so a step reads back the token id, not the logits.

use std::sync::Arc;

use super::context::{Bind, GpuContext, Kernel};
use super::Params;
use crate::error::Result;

/// The WGSL of this family.
pub const SOURCE: &str = include_str!("select.wgsl");

/// Largest `k` of the rounds of arg-max; larger ones (top-p over the whole vocabulary) sort the row.
pub const MAX_K: usize = 64;

/// Elements a workgroup of the sort holds (`SORT_B` in `select.wgsl`).
pub const SORT_B: usize = 1024;

/// The kernel for `k`: the arg-max (`k = 1`) or k rounds of it (`1 < k ≤ MAX_K`); bindings X, VALS, IDX.
pub fn kernel(ctx: &GpuContext, k: usize) -> Result<Arc<Kernel>> {
    entry_kernel(ctx, if k == 1 { "argmax" } else { "topk" })
}

/// Entry `entry` of this family: the sort's `sort_local`, `sort_global`, `sort_out` (or the
/// selection's `argmax`, `topk`); bindings X, VALS, IDX.
pub fn entry_kernel(ctx: &GpuContext, entry: &str) -> Result<Arc<Kernel>> {
    ctx.pipeline(
        "select",
        SOURCE,
        entry,
        &[Bind::Read, Bind::Write, Bind::Write],
        &[],
    )
}

/// One dispatch of the sort.
#[derive(Debug, Clone)]
pub struct SortDisp {
    /// Entry point.
    pub entry: &'static str,
    /// Its parameters.
    pub params: Params,
    /// Threads (`sort_global`, `sort_out`: spread with [`super::grid`]) or, for `sort_local`,
    /// workgroups.
    pub items: usize,
}

/// The dispatches that sort one row of `n` values (best first, ties to the lower index) in the
/// indices' buffer (which must hold `n` pairs of words) and write the first `k` out: the blocks
/// sorted whole, then for every merge size above [`SORT_B`] its flip step and half-cleaners down to
/// `SORT_B` over the row, the rest in the blocks. Their number depends on `n` only (`k` is a
/// parameter of the last): 2 for `n ≤ SORT_B`, 29 for a vocabulary of 49,152.
pub fn sort_schedule(n: usize, k: usize) -> Vec<SortDisp> {
    let blocks = n.div_ceil(SORT_B).max(1);
    let mut out = vec![SortDisp {
        entry: "sort_local",
        params: Params::new().u(n).u(0),
        items: blocks,
    }];
    let full = n.next_power_of_two().max(SORT_B);
    let mut size = 2 * SORT_B;
    while size <= full {
        let mut stride = 0;
        loop {
            out.push(SortDisp {
                entry: "sort_global",
                params: Params::new().u(n).u(size).u(stride).u(full / 2),
                items: full / 2,
            });
            stride = if stride == 0 { size / 4 } else { stride / 2 };
            if stride < SORT_B {
                break;
            }
        }
        out.push(SortDisp {
            entry: "sort_local",
            params: Params::new().u(n).u(1),
            items: blocks,
        });
        size *= 2;
    }
    out.push(SortDisp {
        entry: "sort_out",
        params: Params::new().u(k),
        items: k,
    });
    out
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

    /// Runs [`sort_schedule`] on `x` in one pass (as a step records it): TopK's values and indices.
    fn sort_on_gpu(ctx: &GpuContext, x: &[f32], k: usize) -> (Vec<f32>, Vec<i64>) {
        let n = x.len();
        let sched = sort_schedule(n, k);
        let xb = ctx.buffer_with("x", bytemuck::cast_slice(x)).unwrap();
        let vb = ctx.storage("vals", (k * 4) as u64).unwrap();
        let ib = ctx.storage("idx", (n * 8) as u64).unwrap();
        let pbuf = ctx.uniform("p", (256 * sched.len()) as u64);
        let mut groups = Vec::new();
        for (i, d) in sched.iter().enumerate() {
            ctx.queue
                .write_buffer(&pbuf, (i * 256) as u64, d.params.bytes());
            let kern = entry_kernel(ctx, d.entry).unwrap();
            let bg = ctx.bind(&kern, (&pbuf, (i * 256) as u64), &[&xb, &vb, &ib]);
            let g = if d.entry == "sort_local" {
                (d.items as u32, 1)
            } else {
                super::super::grid(d.items, 256, ctx.max_groups)
            };
            groups.push((kern, bg, g));
        }
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for (kern, bg, g) in &groups {
                pass.set_pipeline(&kern.pipeline);
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(g.0, g.1, 1);
            }
        }
        let sv = ctx.staging("sv", (k * 4) as u64);
        let si = ctx.staging("si", (k * 8) as u64);
        enc.copy_buffer_to_buffer(&vb, 0, &sv, 0, (k * 4) as u64);
        enc.copy_buffer_to_buffer(&ib, 0, &si, 0, (k * 8) as u64);
        ctx.queue.submit([enc.finish()]);
        let out = ctx.read_back(&[(&sv, k * 4), (&si, k * 8)], None).unwrap();
        (
            bytemuck::cast_slice(&out[0]).to_vec(),
            bytemuck::cast_slice(&out[1]).to_vec(),
        )
    }

    /// The sort (TopK with k > MAX_K) against the CPU's `top_k` over row lengths around the block and
    /// merge sizes, with ties, NaN, ±0 and ±inf: the same indices in the same order, the same values.
    #[test]
    fn sort_matches_cpu_order() {
        let Some(ctx) = ctx() else { return };
        for (n, k) in [
            (65, 65),
            (100, 70),
            (1024, 1024),
            (1025, 600),
            (3000, 3000),
            (4097, 100),
            (49152, 49152),
        ] {
            let mut x = noise(n, n as u64 + 7);
            // Ties across blocks, NaN (ranks last), −0 below +0, infinities.
            x[0] = 2.5;
            x[n - 1] = 2.5;
            x[n / 2] = 2.5;
            x[3] = f32::NAN;
            x[n - 2] = -0.0;
            x[n / 3] = 0.0;
            x[n / 4] = f32::INFINITY;
            x[n / 5 + 1] = f32::NEG_INFINITY;
            let (vals, idx) = sort_on_gpu(&ctx, &x, k);
            let mut wv = vec![0f32; k];
            let mut wi = vec![0usize; k];
            crate::backend::cpu::misc::top_k(&x, &mut wv, &mut wi).unwrap();
            let got: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
            assert_eq!(got, wi, "n {n} k {k}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&vals), bits(&wv), "n {n} k {k}");
        }
    }

    /// The schedule's length: what a step's dispatch slots are sized for.
    #[test]
    fn sort_schedule_sizes() {
        assert_eq!(sort_schedule(100, 70).len(), 2);
        assert_eq!(sort_schedule(1024, 70).len(), 2);
        // 2048: flip + local; 4096: flip, 1024, local.
        assert_eq!(sort_schedule(1025, 70).len(), 4);
        assert_eq!(sort_schedule(4096, 70).len(), 7);
        assert_eq!(sort_schedule(49152, 49152).len(), 29);
    }

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
                let (mut wv, mut want) = (vec![0.0; k], vec![0; k]);
                crate::backend::cpu::misc::top_k(row, &mut wv, &mut want).unwrap();
                let got: Vec<usize> = idx[r * k..(r + 1) * k]
                    .iter()
                    .map(|&i| i as usize)
                    .collect();
                assert_eq!(got, want, "rows {rows} v {v} k {k}");
                assert_eq!(&vals[r * k..(r + 1) * k], &wv[..]);
            }
        }
    }
}
