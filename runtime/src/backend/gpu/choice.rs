//! The token choice's tail on the GPU (`choice.wgsl`): after the `TopK`, the softmax, the nucleus of
//! mass `top_p` and the draw `u` in one workgroup, so a step reads back the chosen id (8 bytes) —
//! the planner's [`TokenChoice`](crate::plan::TokenChoice), on the CPU
//! [`nucleus_pick`](crate::backend::cpu::misc::nucleus_pick).

use std::sync::Arc;

use super::context::{Bind, GpuContext, Kernel};
use super::Params;
use crate::error::Result;

/// The WGSL of this family.
pub const SOURCE: &str = include_str!("choice.wgsl");

/// The kernel: bindings VALS (read), IDX (read, i64), OUT (i64, one).
pub fn kernel(ctx: &GpuContext) -> Result<Arc<Kernel>> {
    ctx.pipeline(
        "choice",
        SOURCE,
        "choose",
        &[Bind::Read, Bind::Read, Bind::Write],
        &[],
    )
}

/// Parameters: a row of `k ≥ 1` sorted values, the nucleus mass, the draw.
pub fn params(k: usize, top_p: f32, u: f32) -> Params {
    Params::new().u(k).f(top_p).f(u)
}

#[cfg(test)]
mod tests {
    use super::super::exec::run_kernel_multi;
    use super::super::testutil::{ctx, noise};
    use super::*;
    use crate::backend::cpu::misc::nucleus_pick;

    /// The kernel against the CPU's pick on random sorted rows over k, top_p and draws. The sums
    /// round in another order (runs of ceil(k / 256) combined by a scan, where the CPU makes one long
    /// sum), so where the picks differ the GPU's must still be right in f64: the draw's threshold
    /// within 1e-4 of the kept mass of the interval it picked. That happens only on the long row
    /// (49,152 values whose probabilities are ~1e-5 each): short rows must agree.
    #[test]
    fn choose_matches_cpu_pick() {
        let Some(ctx) = ctx() else { return };
        let kern = kernel(&ctx).unwrap();
        let (mut same, mut differ) = (0, 0);
        for (case, &k) in [1usize, 2, 3, 40, 64, 255, 256, 257, 1000, 49152]
            .iter()
            .enumerate()
        {
            let scale = if k > 1000 { 6.0 } else { 3.0 };
            let mut vals: Vec<f32> = noise(k, case as u64 + 1)
                .iter()
                .map(|v| v * scale)
                .collect();
            vals.sort_by(|a, b| b.total_cmp(a));
            if k > 4 {
                vals[3] = vals[2];
            }
            let ids: Vec<i64> = (0..k as i64).map(|i| (i * 7919 + 5) % 49_152).collect();
            let draws = noise(6, k as u64);
            for top_p in [1.0f32, 0.95, 0.5, 0.05, 1e-6] {
                for &d in &draws {
                    let u = (d * 0.5 + 0.5).clamp(0.0, 0.999_999);
                    let outs = run_kernel_multi(
                        &ctx,
                        &kern,
                        &params(k, top_p, u),
                        &[bytemuck::cast_slice(&vals), bytemuck::cast_slice(&ids)],
                        &[8],
                        (1, 1),
                    )
                    .unwrap();
                    let got = bytemuck::cast_slice::<u8, i64>(&outs[0])[0];
                    let j = nucleus_pick(&vals, top_p, u).unwrap();
                    if got == ids[j] {
                        same += 1;
                        continue;
                    }
                    differ += 1;
                    assert!(
                        k > 1000,
                        "k {k} top_p {top_p} u {u}: got {got}, want {}",
                        ids[j]
                    );
                    let g = ids
                        .iter()
                        .position(|&i| i == got)
                        .expect("an id of the row");
                    // f64: the kept prefix sums around the pick bracket the threshold.
                    let m = vals[0] as f64;
                    let e: Vec<f64> = vals.iter().map(|&v| (v as f64 - m).exp()).collect();
                    let s: f64 = e.iter().sum();
                    let (mut c, mut ck) = (0.0, vec![0.0]);
                    for &x in &e {
                        let p = x / s;
                        let kept = if c < top_p as f64 { p } else { 0.0 };
                        c += p;
                        ck.push(ck.last().unwrap() + kept);
                    }
                    let total = *ck.last().unwrap();
                    let thr = u as f64 * total;
                    let tol = 1e-4 * total;
                    assert!(
                        ck[g] - tol <= thr && thr <= ck[g + 1] + tol,
                        "k {k} top_p {top_p} u {u}: picked {g} ({} … {}), threshold {thr}",
                        ck[g],
                        ck[g + 1]
                    );
                }
            }
        }
        assert!(same >= 280 && differ <= 20, "same {same}, differ {differ}");
    }
}
