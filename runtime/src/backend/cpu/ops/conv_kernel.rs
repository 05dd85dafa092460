//! `Conv` on the CPU (the kernel of the generic op in [`super::conv`]): N-D convolution as im2col and a
//! matrix product.
//!
//! The output positions of each (batch, group) are cut into tiles of `to` positions; a parallel task
//! takes one tile, writes its im2col panel (`[C/group · kernel, to]`, small enough to stay in L2) and
//! multiplies every output channel's weight row by it, four rows at a time, the inner loop running
//! over the tile's contiguous positions (vectorized by the compiler; on x86-64 the same loop is also
//! compiled for AVX2 and picked at run time — the same operations in the same order, so both give the
//! same bits). Each output is `Σ_k w[k]·col[k]` in increasing `k`, plus the bias last: the result does
//! not depend on the thread count or the tiling.

use crate::backend::cpu::{check_len, mul_dims, pool, shape_err, KernelResult};

const KERNEL: &str = "conv";

/// Bytes of im2col panel a task works on (its rows × the tile width): about half an L2.
const PANEL_BYTES: usize = 256 << 10;

/// The geometry of one convolution: `x` `[batch, in_channels, input..]`, `w`
/// `[out_channels, in_channels / group, kernel..]`, `out` `[batch, out_channels, output..]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvGeom {
    /// N.
    pub batch: usize,
    /// C (all groups).
    pub in_channels: usize,
    /// M (all groups).
    pub out_channels: usize,
    /// Groups (dividing C and M).
    pub group: usize,
    /// Spatial dims of the input.
    pub input: Vec<usize>,
    /// Spatial dims of the kernel.
    pub kernel: Vec<usize>,
    /// Spatial dims of the output.
    pub output: Vec<usize>,
    /// Stride per spatial dim (≥ 1).
    pub strides: Vec<usize>,
    /// Dilation per spatial dim (≥ 1).
    pub dilations: Vec<usize>,
    /// Padding before the first element, per spatial dim (the end padding only sets `output`).
    pub pads_begin: Vec<usize>,
}

impl ConvGeom {
    fn check(&self) -> KernelResult {
        let r = self.input.len();
        if r == 0
            || [
                &self.kernel,
                &self.output,
                &self.strides,
                &self.dilations,
                &self.pads_begin,
            ]
            .iter()
            .any(|v| v.len() != r)
        {
            return Err(shape_err(KERNEL, "spatial ranks differ"));
        }
        if self.group == 0
            || !self.in_channels.is_multiple_of(self.group)
            || !self.out_channels.is_multiple_of(self.group)
        {
            return Err(shape_err(
                KERNEL,
                format!(
                    "group {} does not divide C = {} and M = {}",
                    self.group, self.in_channels, self.out_channels
                ),
            ));
        }
        if self.strides.contains(&0) || self.dilations.contains(&0) {
            return Err(shape_err(KERNEL, "strides and dilations must be ≥ 1"));
        }
        Ok(())
    }
}

/// `out = conv(x, w) + bias` (f32; `bias` one value per output channel).
pub fn conv(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    out: &mut [f32],
) -> KernelResult {
    g.check()?;
    let (c, m, groups) = (g.in_channels, g.out_channels, g.group);
    let (cg, mg) = (c / groups, m / groups);
    let isz = mul_dims(KERNEL, &g.input)?;
    let ksz = mul_dims(KERNEL, &g.kernel)?;
    let osz = mul_dims(KERNEL, &g.output)?;
    let ckk = cg * ksz;
    check_len(KERNEL, "x", mul_dims(KERNEL, &[g.batch, c, isz])?, x.len())?;
    check_len(KERNEL, "w", mul_dims(KERNEL, &[m, ckk])?, w.len())?;
    check_len(
        KERNEL,
        "out",
        mul_dims(KERNEL, &[g.batch, m, osz])?,
        out.len(),
    )?;
    if let Some(b) = bias {
        check_len(KERNEL, "bias", m, b.len())?;
    }
    if out.is_empty() {
        return Ok(());
    }
    if ckk == 0 {
        // An empty kernel or no input channels: every output is its bias.
        for (i, o) in out.iter_mut().enumerate() {
            *o = bias.map_or(0.0, |b| b[(i / osz) % m]);
        }
        return Ok(());
    }
    // Tile width: a multiple of STRIP, the panel within PANEL_BYTES, and at least two tiles per thread
    // where the output is long enough.
    let by_cache = (PANEL_BYTES / 4 / ckk).max(STRIP);
    let by_threads = osz.div_ceil(2 * pool::threads()).max(16);
    let to = by_cache.min(by_threads).min(osz).next_multiple_of(STRIP);
    let tiles = osz.div_ceil(to);
    let mut scratch = vec![0.0f32; tiles * mg * to];
    for n in 0..g.batch {
        for gi in 0..groups {
            let xg = &x[(n * c + gi * cg) * isz..][..cg * isz];
            let wg = &w[gi * mg * ckk..][..mg * ckk];
            pool::for_chunks_mut(&mut scratch, mg * to, &|t, buf| {
                let o0 = t * to;
                let tl = to.min(osz - o0);
                let mut panel = vec![0.0f32; ckk * to];
                fill_panel(xg, g, cg, o0, tl, to, &mut panel);
                buf.fill(0.0);
                gemm_tile(wg, &panel, mg, ckk, to, buf);
            });
            for mi in 0..mg {
                let ch = gi * mg + mi;
                let b = bias.map_or(0.0, |b| b[ch]);
                let orow = &mut out[(n * m + ch) * osz..][..osz];
                for (t, chunk) in orow.chunks_mut(to).enumerate() {
                    let src = &scratch[(t * mg + mi) * to..][..chunk.len()];
                    for (o, &s) in chunk.iter_mut().zip(src) {
                        *o = s + b;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Writes the im2col panel of output positions `o0..o0 + tl` (flat over the output's spatial dims):
/// row `ci·ksz + kf` (input channel, flat kernel position), column `o - o0`: the input element that
/// kernel position reads for output `o`, 0 in the padding. Columns `tl..to` are left as they are.
fn fill_panel(
    xg: &[f32],
    g: &ConvGeom,
    cg: usize,
    o0: usize,
    tl: usize,
    to: usize,
    panel: &mut [f32],
) {
    let r = g.output.len();
    let (last_o, last_i) = (g.output[r - 1], g.input[r - 1]);
    let isz: usize = g.input.iter().product();
    let ksz: usize = g.kernel.iter().product();
    let mut oc = vec![0usize; r];
    let mut kc = vec![0usize; r];
    let mut o = o0;
    // One run of consecutive positions along the last output dim at a time.
    while o < o0 + tl {
        let ol = o % last_o;
        let run = (last_o - ol).min(o0 + tl - o);
        let j0 = o - o0;
        let mut rest = o / last_o;
        for d in (0..r - 1).rev() {
            oc[d] = rest % g.output[d];
            rest /= g.output[d];
        }
        for kf in 0..ksz {
            let mut rest = kf;
            for d in (0..r).rev() {
                kc[d] = rest % g.kernel[d];
                rest /= g.kernel[d];
            }
            // The input row (all dims but the last) this kernel position reads, if inside.
            let mut row = Some(0usize);
            for d in 0..r - 1 {
                let p =
                    (oc[d] * g.strides[d] + kc[d] * g.dilations[d]) as i64 - g.pads_begin[d] as i64;
                row = row.filter(|_| p >= 0 && p < g.input[d] as i64);
                row = row.map(|off| off * g.input[d] + p as usize);
            }
            let base = (ol * g.strides[r - 1] + kc[r - 1] * g.dilations[r - 1]) as i64
                - g.pads_begin[r - 1] as i64;
            for ci in 0..cg {
                let dst = &mut panel[(ci * ksz + kf) * to + j0..][..run];
                match row {
                    None => dst.fill(0.0),
                    Some(off) => {
                        let src = &xg[ci * isz + off * last_i..][..last_i];
                        fill_line(dst, src, base, g.strides[r - 1]);
                    }
                }
            }
        }
        o += run;
    }
}

/// `dst[j] = src[base + j·s]` where that index is inside `src`, else 0.
fn fill_line(dst: &mut [f32], src: &[f32], base: i64, s: usize) {
    let (n, len, s) = (dst.len() as i64, src.len() as i64, s as i64);
    // First j with base + j·s ≥ 0, first j with base + j·s ≥ len.
    let lo = if base >= 0 {
        0
    } else {
        (-base as u64).div_ceil(s as u64) as i64
    }
    .min(n);
    let hi = if len > base {
        ((len - base) as u64).div_ceil(s as u64) as i64
    } else {
        0
    }
    .clamp(lo, n);
    let (lo, hi) = (lo as usize, hi as usize);
    dst[..lo].fill(0.0);
    dst[hi..].fill(0.0);
    if lo == hi {
        return;
    }
    let start = (base + lo as i64 * s) as usize;
    if s == 1 {
        dst[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
    } else {
        for (k, d) in dst[lo..hi].iter_mut().enumerate() {
            *d = src[start + k * s as usize];
        }
    }
}

/// `buf[m, j] += Σ_k w[m, k] · panel[k, j]` for the `mg` rows of `w` (`[mg, ckk]`) and a panel of
/// `[ckk, to]`, in increasing `k`.
fn gemm_tile(w: &[f32], panel: &[f32], mg: usize, ckk: usize, to: usize, buf: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::backend::cpu::simd::best_isa() == crate::backend::cpu::simd::Isa::Avx2 {
        // SAFETY: best_isa() returns Avx2 only after detecting avx2 on this CPU.
        unsafe { gemm_tile_avx2(w, panel, mg, ckk, to, buf) };
        return;
    }
    gemm_tile_body(w, panel, mg, ckk, to, buf);
}

/// [`gemm_tile_body`] compiled for AVX2 (the same operations, eight lanes at a time).
///
/// # Safety
/// The CPU must support avx2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gemm_tile_avx2(
    w: &[f32],
    panel: &[f32],
    mg: usize,
    ckk: usize,
    to: usize,
    buf: &mut [f32],
) {
    gemm_tile_body(w, panel, mg, ckk, to, buf);
}

/// Columns of the register tile: 4 rows × `STRIP` accumulators (eight AVX2 registers).
const STRIP: usize = 16;

#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn gemm_tile_body(w: &[f32], panel: &[f32], mg: usize, ckk: usize, to: usize, buf: &mut [f32]) {
    let mut m = 0;
    // Four rows × STRIP columns accumulated in registers over all of k, then added to `buf`.
    while m + 4 <= mg {
        let ws = &w[m * ckk..(m + 4) * ckk];
        let (w0, rest) = ws.split_at(ckk);
        let (w1, rest) = rest.split_at(ckk);
        let (w2, w3) = rest.split_at(ckk);
        for j0 in (0..to).step_by(STRIP) {
            let mut acc = [[0.0f32; STRIP]; 4];
            for k in 0..ckk {
                let col = &panel[k * to + j0..k * to + j0 + STRIP];
                let a = [w0[k], w1[k], w2[k], w3[k]];
                for r in 0..4 {
                    for j in 0..STRIP {
                        acc[r][j] += a[r] * col[j];
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let dst = &mut buf[(m + r) * to + j0..(m + r) * to + j0 + STRIP];
                for (d, &a) in dst.iter_mut().zip(acc) {
                    *d += a;
                }
            }
        }
        m += 4;
    }
    for m in m..mg {
        let r0 = &mut buf[m * to..(m + 1) * to];
        let ws = &w[m * ckk..(m + 1) * ckk];
        for (k, &a) in ws.iter().enumerate() {
            let col = &panel[k * to..(k + 1) * to];
            for (o, &v) in r0.iter_mut().zip(col) {
                *o += a * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatched tile product (AVX2 where the CPU has it) and the portable one give the same bits,
    /// tail rows (M not a multiple of 4) included.
    #[test]
    fn dispatched_and_portable_tiles_agree() {
        let (mg, ckk, to) = (7usize, 37usize, 2 * STRIP);
        let w: Vec<f32> = (0..mg * ckk).map(|i| (i as f32 * 0.37).sin()).collect();
        let panel: Vec<f32> = (0..ckk * to).map(|i| (i as f32 * 0.11).cos()).collect();
        let (mut a, mut b) = (vec![0.0f32; mg * to], vec![0.0f32; mg * to]);
        gemm_tile(&w, &panel, mg, ckk, to, &mut a);
        gemm_tile_body(&w, &panel, mg, ckk, to, &mut b);
        assert_eq!(a, b);
        // Row 5 (a tail row), column 3, written out.
        let want = (0..ckk).fold(0.0f32, |s, k| s + w[5 * ckk + k] * panel[k * to + 3]);
        assert_eq!(a[5 * to + 3], want);
    }
}
