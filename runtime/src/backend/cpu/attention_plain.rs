//! A generic ONNX `Attention` node (opset 23) on plain tensors, fast: rank-4 f32 Q `[B, H, T, D]`,
//! K `[B, KVH, S, D]`, V `[B, KVH, S, Dv]` (H a multiple of KVH), no past inputs, an optional
//! additive f32 or bool mask broadcast to `[B, H, T, S]`, the `scale`, `softcap` and `is_causal`
//! attributes. Anything else ([`try_node`] answers `None`) runs through the generic op
//! (`ops::attention`), which stays the reference this file is tested against.
//!
//! Whisper's encoder attends 1,500 positions to each other (6 heads of 64): the generic op, a dot
//! product, a library `exp` and an axpy per (query, key), was 58% of the encoder (2.4 s of 4.2 s
//! on 2 cores, EPYC); here it is ~0.11 s (≈ 32 G multiply-adds/s a core, two thirds of AVX2's
//! peak). A task is a block of at most [`MAX_BLOCK`] query rows of one head (fewer where S is so
//! long that the block's scores would pass [`SCORE_FLOATS`]). For rows
//! ≥ [`PACK_ROWS`] each KV head's keys are first packed once, in panels of [`NR`] keys stored `D × NR`
//! (shared by every task of the head's group), and a block's scores against all keys come from a
//! register tile of [`MR`] rows × [`NR`] keys (12 AVX2 accumulators, K and Q each read once a tile);
//! fewer rows (decode's cross-attention, `T = 1`) take dot products straight off K's rows. Then per
//! row, in place over the block's score rows: scale, cap, mask, causal cut, the exact maximum, the
//! branch-free [`exp_f32`] and the sum in f32 (8 lanes); then `P·V` in `MR × 16` tiles over V's rows
//! as stored, divided by the sum at the end. Causal blocks read only the keys before their last row.
//!
//! Error against the reference (f32 sums in another order, `exp_f32` within 3e-7): at most
//! 6e-7·max|V| per output element over the tested shapes (T = S = 1500 included); the tests assert
//! 1e-5·(1 + max|V|), for the AVX2 tiles and the portable loops both.

use super::misc::exp_f32;
use super::pool;
use crate::graph::{Attr, DType, Node};
use crate::tensor::Tensor;
use std::borrow::Cow;
use std::cell::RefCell;

/// Query rows of a register tile.
const MR: usize = 6;
/// Keys of a register tile (a packed panel's width), and the output columns of a `P·V` tile.
const NR: usize = 16;
/// Most query rows of a task (a multiple of [`MR`]): its scores (`rows × S` f32) stay in L2.
const MAX_BLOCK: usize = 48;
/// Most f32 scores a block holds (1 MiB): blocks get fewer rows (down to [`MR`]) for long S.
const SCORE_FLOATS: usize = 1 << 18;
/// Query rows from which K is packed into panels (below, dot products off K's rows).
const PACK_ROWS: usize = 8;
/// Tasks a call aims to give each thread.
const TASKS_PER_THREAD: usize = 4;
/// Multiply-adds below which a call runs on its caller's thread alone.
const PAR_MIN: usize = 1 << 15;

/// The output of `node` (an `Attention`) on `inputs` when this kernel takes them; `None` for the
/// generic op (other ranks or dtypes, past inputs, extra outputs, a mask of another dtype or one
/// that does not broadcast, empty dims, an invalid `softcap`: the generic op reports those).
pub(crate) fn try_node(node: &Node, inputs: &[Option<&Tensor>]) -> Option<Tensor> {
    attend(node, inputs, true)
}

/// [`try_node`], `simd` as [`run`] takes it.
fn attend(node: &Node, inputs: &[Option<&Tensor>], simd: bool) -> Option<Tensor> {
    if node.op != "Attention" || !node.domain.is_empty() {
        return None;
    }
    if inputs.len() > 4 && inputs[4..].iter().any(|i| i.is_some()) {
        return None;
    }
    if node.outputs.iter().skip(1).any(|o| !o.is_empty()) {
        return None;
    }
    let (q, k, v) = (
        inputs.first()?.as_ref()?,
        inputs.get(1)?.as_ref()?,
        inputs.get(2)?.as_ref()?,
    );
    let mask = inputs.get(3).copied().flatten();
    if [q, k, v]
        .iter()
        .any(|x| x.dtype != DType::F32 || x.rank() != 4)
    {
        return None;
    }
    let ([b, h, t, d], [bk, kvh, s, dk], [bv, hv, sv, dv]) = (
        <[usize; 4]>::try_from(&q.shape[..]).ok()?,
        <[usize; 4]>::try_from(&k.shape[..]).ok()?,
        <[usize; 4]>::try_from(&v.shape[..]).ok()?,
    );
    if bk != b || bv != b || kvh == 0 || h % kvh != 0 || dk != d || hv != kvh || sv != s {
        return None;
    }
    if [b, h, t, s, d, dv].contains(&0) {
        return None;
    }
    let softcap = node.attr_float("softcap", 0.0);
    if !(softcap >= 0.0 && softcap.is_finite()) {
        return None;
    }
    // As the reference reads it: a float `scale`, else 1/√D.
    let scale = match node.attrs.get("scale") {
        Some(Attr::Float(f)) => *f,
        _ => 1.0 / (d as f32).sqrt(),
    };
    let full = [b, h, t, s];
    let mask = match mask {
        None => None,
        Some(m) => {
            if m.rank() > 4 {
                return None;
            }
            let off = 4 - m.rank();
            if m.shape
                .iter()
                .enumerate()
                .any(|(i, &n)| n != 1 && n != full[off + i])
            {
                return None;
            }
            let vals: Cow<[f32]> = match m.dtype {
                DType::F32 => Cow::Borrowed(m.typed::<f32>()),
                DType::Bool => Cow::Owned(
                    m.typed::<u8>()
                        .iter()
                        .map(|&keep| if keep != 0 { 0.0 } else { f32::NEG_INFINITY })
                        .collect(),
                ),
                _ => return None,
            };
            let mut strides = [0usize; 4];
            let mut stride = 1;
            for (i, &n) in m.shape.iter().enumerate().rev() {
                strides[off + i] = if n == 1 { 0 } else { stride };
                stride *= n;
            }
            Some(Mask { vals, strides })
        }
    };
    let p = Problem {
        q: q.typed(),
        k: k.typed(),
        v: v.typed(),
        b,
        h,
        kvh,
        t,
        s,
        d,
        dv,
        scale,
        softcap,
        causal: node.attr_int("is_causal", 0) != 0,
        mask,
    };
    let mut out = Tensor::zeros(DType::F32, &[b, h, t, dv]);
    run(&p, out.typed_mut(), simd);
    Some(out)
}

/// The mask as an additive bias read through its strides over `[B, H, T, S]` (0 on a broadcast axis).
struct Mask<'a> {
    vals: Cow<'a, [f32]>,
    strides: [usize; 4],
}

/// One call's checked inputs.
struct Problem<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    b: usize,
    h: usize,
    kvh: usize,
    t: usize,
    s: usize,
    d: usize,
    dv: usize,
    scale: f32,
    /// 0: none.
    softcap: f32,
    causal: bool,
    mask: Option<Mask<'a>>,
}

/// What one task reads besides the problem: K packed (`[B·KVH][panels][D][NR]`) or not.
struct Keys<'a> {
    packed: Option<&'a [f32]>,
    panels: usize,
}

/// Runs `p` into `out` (`[B, H, T, Dv]`); `simd`: with AVX2 where the CPU has it (else, and in a
/// test, the portable loops).
fn run(p: &Problem, out: &mut [f32], simd: bool) {
    let threads = pool::threads();
    let heads = p.b * p.h;
    let work = heads * p.t * p.s * (p.d + p.dv);
    let parallel = work >= PAR_MIN && threads > 1;
    // Blocks per head: at least enough for TASKS_PER_THREAD tasks a thread, rows ≤ MAX_BLOCK.
    let want = if parallel {
        (TASKS_PER_THREAD * threads).div_ceil(heads)
    } else {
        1
    };
    let cap = (SCORE_FLOATS / p.s / MR * MR).clamp(MR, MAX_BLOCK);
    let nblocks = p.t.div_ceil(cap).max(want).min(p.t);
    let mut rows = p.t.div_ceil(nblocks);
    if rows > MR {
        rows = rows.div_ceil(MR) * MR;
    }
    let nblocks = p.t.div_ceil(rows);
    let panels = p.s.div_ceil(NR);
    let packed = (rows >= PACK_ROWS).then(|| pack_keys(p, panels, parallel));
    let keys = Keys {
        packed: packed.as_deref(),
        panels,
    };
    let t_pad = nblocks * rows;
    // Tasks write whole blocks: into `out` itself when the blocks tile T, else into a padded copy.
    let mut padded = (t_pad != p.t).then(|| vec![0f32; heads * t_pad * p.dv]);
    let dst: &mut [f32] = padded.as_deref_mut().unwrap_or(&mut *out);
    let task = |i: usize, o: &mut [f32]| {
        let (bh, blk) = (i / nblocks, i % nblocks);
        let t0 = blk * rows;
        let t1 = (t0 + rows).min(p.t);
        block(p, &keys, simd, bh, t0, t1, &mut o[..(t1 - t0) * p.dv]);
    };
    let chunk = rows * p.dv;
    if parallel {
        pool::for_chunks_mut(dst, chunk, &task);
    } else {
        dst.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, o)| task(i, o));
    }
    if let Some(pad) = padded {
        for (o, src) in out.chunks_mut(p.t * p.dv).zip(pad.chunks(t_pad * p.dv)) {
            o.copy_from_slice(&src[..p.t * p.dv]);
        }
    }
}

/// K packed per KV head in panels of [`NR`] keys, each `D × NR` (key `j` of the panel at column `j`),
/// the last panel's missing keys zero.
fn pack_keys(p: &Problem, panels: usize, parallel: bool) -> Vec<f32> {
    let per = panels * p.d * NR;
    let mut packed = vec![0f32; p.b * p.kvh * per];
    let pack = |kh: usize, dst: &mut [f32]| {
        let k = &p.k[kh * p.s * p.d..(kh + 1) * p.s * p.d];
        for (j, row) in k.chunks_exact(p.d).enumerate() {
            let panel = &mut dst[(j / NR) * p.d * NR..];
            for (c, &x) in row.iter().enumerate() {
                panel[c * NR + j % NR] = x;
            }
        }
    };
    if parallel {
        pool::for_chunks_mut(&mut packed, per, &pack);
    } else {
        packed
            .chunks_mut(per)
            .enumerate()
            .for_each(|(i, o)| pack(i, o));
    }
    packed
}

thread_local! {
    /// A thread's block buffers (Q rows, scores, the output accumulator, row sums), reused.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Query rows `t0..t1` of head `bh` (`b·H + h`) into `out` (`(t1 − t0) × Dv`).
/// The thread's scratch is borrowed here, outside the feature-enabled function: a closure does not
/// inherit its target features, so a body inside one would lose AVX2 and call `fmaf` for every `mul_add`.
fn block(p: &Problem, keys: &Keys, simd: bool, bh: usize, t0: usize, t1: usize, out: &mut [f32]) {
    SCRATCH.with_borrow_mut(|buf| {
        #[cfg(target_arch = "x86_64")]
        if simd && super::simd::best_isa() == super::simd::Isa::Avx2 {
            // SAFETY: best_isa() returned Avx2 only after detecting avx2, fma and f16c on this CPU.
            return unsafe { block_avx2(p, keys, bh, t0, t1, out, buf) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = simd;
        block_body::<{ cfg!(target_arch = "aarch64") }>(p, keys, bh, t0, t1, out, buf)
    })
}

/// [`block_body`] compiled for AVX2+FMA: its loops vectorize, and the tiles are [`x86`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_avx2(
    p: &Problem,
    keys: &Keys,
    bh: usize,
    t0: usize,
    t1: usize,
    out: &mut [f32],
    buf: &mut Vec<f32>,
) {
    block_body::<true>(p, keys, bh, t0, t1, out, buf)
}

/// `a·b + c`, fused where `FMA` (a hardware instruction there; elsewhere `mul_add` is a library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// The block: scores of its rows against the keys they may attend, softmax in place, `P·V` (`buf`: the
/// thread's scratch, grown as needed).
#[inline(always)]
fn block_body<const FMA: bool>(
    p: &Problem,
    keys: &Keys,
    bh: usize,
    t0: usize,
    t1: usize,
    out: &mut [f32],
    buf: &mut Vec<f32>,
) {
    let (d, dv) = (p.d, p.dv);
    let (bi, hi) = (bh / p.h, bh % p.h);
    let kh = bi * p.kvh + hi / (p.h / p.kvh);
    let n = t1 - t0;
    let np = n.div_ceil(MR) * MR;
    // Causal rows attend keys ≤ their own index: none of the block's rows reads a key ≥ t1.
    let keys_len = if p.causal { p.s.min(t1) } else { p.s };
    let sp = keys_len.div_ceil(NR) * NR;
    let kmat = &p.k[kh * p.s * d..(kh + 1) * p.s * d];
    let vmat = &p.v[kh * p.s * dv..(kh + 1) * p.s * dv];
    {
        // Not cleared: every element read below is written first (Q's padding rows here, the
        // accumulator where the tail columns add into it).
        let need = np * d + np * sp + np * dv + np;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let (qs, rest) = buf[..need].split_at_mut(np * d);
        let (sc, rest) = rest.split_at_mut(np * sp);
        let (acc, sums) = rest.split_at_mut(np * dv);
        qs[..n * d].copy_from_slice(&p.q[(bh * p.t + t0) * d..(bh * p.t + t1) * d]);
        qs[n * d..].fill(0.0);

        // Scores Q·Kᵀ (unscaled) into `sc` (`np × sp`).
        match keys.packed {
            Some(packed) => {
                let per = keys.panels * d * NR;
                let kp = &packed[kh * per..(kh + 1) * per];
                for (pi, panel) in kp.chunks_exact(d * NR).take(sp / NR).enumerate() {
                    for r0 in (0..np).step_by(MR) {
                        let q = &qs[r0 * d..(r0 + MR) * d];
                        let o = &mut sc[r0 * sp + pi * NR..];
                        qk_tile::<FMA>(q, panel, d, o, sp);
                    }
                }
            }
            None => {
                for (qr, srow) in qs.chunks_exact(d).zip(sc.chunks_exact_mut(sp)).take(n) {
                    for (sj, kj) in srow.iter_mut().zip(kmat.chunks_exact(d)).take(keys_len) {
                        *sj = dot::<FMA>(qr, kj);
                    }
                }
            }
        }

        // Softmax numerators in place, each row's sum into `sums`; rows past n zero.
        for (r, (srow, l)) in sc.chunks_exact_mut(sp).zip(sums.iter_mut()).enumerate() {
            let row = &mut srow[..keys_len];
            if r >= n {
                row.fill(0.0);
                continue;
            }
            let ti = t0 + r;
            row.iter_mut().for_each(|x| *x *= p.scale);
            if p.softcap > 0.0 {
                let c = p.softcap;
                row.iter_mut().for_each(|x| *x = c * (*x / c).tanh());
            }
            if let Some(m) = &p.mask {
                let st = m.strides;
                let base = bi * st[0] + hi * st[1] + ti * st[2];
                if st[3] == 0 {
                    let bias = m.vals[base];
                    row.iter_mut().for_each(|x| *x += bias);
                } else {
                    let mrow = &m.vals[base..base + keys_len];
                    row.iter_mut().zip(mrow).for_each(|(x, b)| *x += b);
                }
            }
            let live = if p.causal {
                (ti + 1).min(keys_len)
            } else {
                keys_len
            };
            let (row, cut) = row.split_at_mut(live);
            cut.fill(0.0);
            let top = max(row);
            if top == f32::NEG_INFINITY {
                row.fill(0.0);
                *l = 0.0;
                continue;
            }
            row.iter_mut().for_each(|x| *x = exp_f32(*x - top));
            *l = sum(row);
        }

        // P·V into `acc` (`np × Dv`): MR × NR tiles, then the columns past the last whole tile row
        // by row. A block of fewer rows than a tile (decode's cross-attention) takes every column
        // row by row, so the tile's padding rows cost no multiplies.
        let full = if n < MR { 0 } else { dv / NR * NR };
        if full < dv {
            acc.fill(0.0);
        }
        for c0 in (0..full).step_by(NR) {
            for r0 in (0..np).step_by(MR) {
                let pr = &sc[r0 * sp..];
                let o = &mut acc[r0 * dv + c0..];
                pv_tile::<FMA>(pr, sp, &vmat[c0..], dv, keys_len, o, dv);
            }
        }
        if full < dv {
            for (arow, prow) in acc.chunks_exact_mut(dv).zip(sc.chunks_exact(sp)).take(n) {
                let tail = &mut arow[full..];
                for (&pj, vrow) in prow[..keys_len].iter().zip(vmat.chunks_exact(dv)) {
                    for (a, &x) in tail.iter_mut().zip(&vrow[full..]) {
                        *a = madd::<FMA>(pj, x, *a);
                    }
                }
            }
        }

        // Divided by the row sums (rows that attend nothing stay zero).
        for ((o, a), &l) in out
            .chunks_exact_mut(dv)
            .zip(acc.chunks_exact(dv))
            .zip(&sums[..n])
        {
            let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
            o.iter_mut().zip(a).for_each(|(o, &a)| *o = a * inv);
        }
    }
}

/// Scores of `MR` query rows (`q`: `MR × D`) against one packed panel (`D × NR`) into
/// `o[r·ld + j]`.
#[inline(always)]
fn qk_tile<const FMA: bool>(q: &[f32], panel: &[f32], d: usize, o: &mut [f32], ld: usize) {
    assert!(q.len() >= MR * d && panel.len() >= d * NR && o.len() >= (MR - 1) * ld + NR);
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA is true on x86-64 only in `block_avx2` (avx2 and fma detected); the lengths
        // were checked above.
        return unsafe { x86::qk_tile(q.as_ptr(), panel.as_ptr(), d, o.as_mut_ptr(), ld) };
    }
    let mut acc = [[0f32; NR]; MR];
    for c in 0..d {
        let kc = &panel[c * NR..(c + 1) * NR];
        for (r, ar) in acc.iter_mut().enumerate() {
            let x = q[r * d + c];
            for (a, &kj) in ar.iter_mut().zip(kc) {
                *a = madd::<FMA>(x, kj, *a);
            }
        }
    }
    for (r, ar) in acc.iter().enumerate() {
        o[r * ld..r * ld + NR].copy_from_slice(ar);
    }
}

/// `o[r·ldo + c] = Σ_j p[r·ldp + j]·v[j·ldv + c]` for `MR` rows, `NR` columns, `keys` keys.
#[inline(always)]
fn pv_tile<const FMA: bool>(
    p: &[f32],
    ldp: usize,
    v: &[f32],
    ldv: usize,
    keys: usize,
    o: &mut [f32],
    ldo: usize,
) {
    assert!(
        p.len() >= (MR - 1) * ldp + keys
            && (keys == 0 || v.len() >= (keys - 1) * ldv + NR)
            && o.len() >= (MR - 1) * ldo + NR
    );
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `qk_tile`; the lengths were checked above.
        return unsafe {
            x86::pv_tile(p.as_ptr(), ldp, v.as_ptr(), ldv, keys, o.as_mut_ptr(), ldo)
        };
    }
    let mut acc = [[0f32; NR]; MR];
    for j in 0..keys {
        let vj = &v[j * ldv..j * ldv + NR];
        for (r, ar) in acc.iter_mut().enumerate() {
            let x = p[r * ldp + j];
            for (a, &vc) in ar.iter_mut().zip(vj) {
                *a = madd::<FMA>(x, vc, *a);
            }
        }
    }
    for (r, ar) in acc.iter().enumerate() {
        o[r * ldo..r * ldo + NR].copy_from_slice(ar);
    }
}

/// The register tiles with AVX2+FMA intrinsics: 12 accumulators (`MR` rows × two 8-lane halves).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// [`super::qk_tile`].
    ///
    /// # Safety
    /// AVX2 and FMA present; `q` holds `MR·d`, `panel` `d·NR`, `o` `(MR − 1)·ld + NR` elements.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn qk_tile(
        q: *const f32,
        panel: *const f32,
        d: usize,
        o: *mut f32,
        ld: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        // SAFETY: every read is inside the lengths the caller guarantees.
        unsafe {
            for c in 0..d {
                let k0 = _mm256_loadu_ps(panel.add(c * NR));
                let k1 = _mm256_loadu_ps(panel.add(c * NR + 8));
                for (r, a) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*q.add(r * d + c));
                    a[0] = _mm256_fmadd_ps(x, k0, a[0]);
                    a[1] = _mm256_fmadd_ps(x, k1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(r * ld), a[0]);
                _mm256_storeu_ps(o.add(r * ld + 8), a[1]);
            }
        }
    }

    /// [`super::pv_tile`].
    ///
    /// # Safety
    /// AVX2 and FMA present; `p` holds `(MR − 1)·ldp + keys`, `v` `(keys − 1)·ldv + NR` (when
    /// `keys > 0`), `o` `(MR − 1)·ldo + NR` elements.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn pv_tile(
        p: *const f32,
        ldp: usize,
        v: *const f32,
        ldv: usize,
        keys: usize,
        o: *mut f32,
        ldo: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        // SAFETY: every access is inside the lengths the caller guarantees.
        unsafe {
            for j in 0..keys {
                let v0 = _mm256_loadu_ps(v.add(j * ldv));
                let v1 = _mm256_loadu_ps(v.add(j * ldv + 8));
                for (r, a) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*p.add(r * ldp + j));
                    a[0] = _mm256_fmadd_ps(x, v0, a[0]);
                    a[1] = _mm256_fmadd_ps(x, v1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(r * ldo), a[0]);
                _mm256_storeu_ps(o.add(r * ldo + 8), a[1]);
            }
        }
    }
}

/// `Σ a[i]·b[i]` with 8 independent accumulators (vectorizes inside [`block_body`]).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = madd::<FMA>(*x, *y, tail);
    }
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = madd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest element (`-∞` for none) in 8 lanes.
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let c = x.chunks_exact(8);
    let tail = c
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for v in c {
        for l in 0..8 {
            acc[l] = acc[l].max(v[l]);
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// `Σ x[i]` in 8 lanes.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let c = x.chunks_exact(8);
    let tail: f32 = c.remainder().iter().sum();
    for v in c {
        for l in 0..8 {
            acc[l] += v[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ops;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn rnd(n: usize, rng: &mut StdRng, a: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-a..a)).collect()
    }

    fn node(attrs: &[(&str, Attr)], with_mask: bool) -> Node {
        let mut inputs: Vec<String> = vec!["q".into(), "k".into(), "v".into()];
        if with_mask {
            inputs.push("mask".into());
        }
        Node {
            name: "attn".into(),
            op: "Attention".into(),
            domain: String::new(),
            inputs,
            outputs: vec!["y".into()],
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    /// One case: the kernel takes it and agrees with the generic op within 1e-5·(1 + max|V|);
    /// returns the largest error relative to max|V|.
    #[allow(clippy::too_many_arguments)]
    fn case(
        b: usize,
        h: usize,
        kvh: usize,
        t: usize,
        s: usize,
        d: usize,
        dv: usize,
        attrs: &[(&str, Attr)],
        mask: Option<Tensor>,
        seed: u64,
    ) -> f32 {
        let mut rng = StdRng::seed_from_u64(seed);
        // Q large enough that the softmax is far from uniform.
        let q = Tensor::f32(&[b, h, t, d], &rnd(b * h * t * d, &mut rng, 2.0));
        let k = Tensor::f32(&[b, kvh, s, d], &rnd(b * kvh * s * d, &mut rng, 2.0));
        let vv = rnd(b * kvh * s * dv, &mut rng, 3.0);
        let v = Tensor::f32(&[b, kvh, s, dv], &vv);
        let n = node(attrs, mask.is_some());
        let inputs = [Some(&q), Some(&k), Some(&v), mask.as_ref()];
        let want = ops::run_node(&n, &inputs).unwrap().remove(0);
        let vmax = vv.iter().fold(0f32, |m, x| m.max(x.abs()));
        let tol = 1e-5 * (1.0 + vmax);
        let mut worst = 0f32;
        // The SIMD tiles where the CPU has them, and the portable loops.
        for simd in [true, false] {
            let got = attend(&n, &inputs, simd).expect("the kernel takes this case");
            assert_eq!(got.shape, want.shape);
            for (i, (g, w)) in got
                .typed::<f32>()
                .iter()
                .zip(want.typed::<f32>())
                .enumerate()
            {
                let e = (g - w).abs();
                assert!(
                    e <= tol && g.is_finite(),
                    "b{b} h{h} kvh{kvh} t{t} s{s} d{d} dv{dv} {attrs:?} simd {simd}: [{i}] {g} vs {w}"
                );
                worst = worst.max(e / vmax);
            }
        }
        worst
    }

    #[test]
    fn matches_the_generic_op_over_shapes() {
        let mut worst = 0f32;
        // Decode's cross-attention (T = 1), short blocks, odd S and D, Dv ≠ D, batches.
        for (i, &(b, h, kvh, t, s, d, dv)) in [
            (1, 6, 6, 1, 1500, 64, 64),
            (1, 6, 6, 7, 100, 64, 64),
            (1, 2, 2, 3, 37, 24, 40),
            (1, 4, 4, 1, 1, 8, 8),
            (2, 3, 3, 13, 37, 24, 40),
            (1, 2, 2, 40, 129, 64, 64),
            (1, 2, 2, 97, 50, 17, 19),
            (2, 2, 1, 8, 8, 32, 32),
            // S long enough that a block holds MR rows only.
            (1, 1, 1, 20, 50_000, 16, 16),
        ]
        .iter()
        .enumerate()
        {
            worst = worst.max(case(b, h, kvh, t, s, d, dv, &[], None, i as u64));
        }
        eprintln!("worst |Δ|/max|V| = {worst:e}");
    }

    #[test]
    fn gqa_scale_softcap_causal() {
        // (T, S, attributes)
        type Case = (usize, usize, Vec<(&'static str, Attr)>);
        let cases: Vec<Case> = vec![
            (1, 50, vec![("scale", Attr::Float(0.3))]),
            (7, 30, vec![]),
            (60, 75, vec![("softcap", Attr::Float(1.5))]),
            (33, 33, vec![("is_causal", Attr::Int(1))]),
            (
                5,
                20,
                vec![("is_causal", Attr::Int(1)), ("scale", Attr::Float(0.05))],
            ),
            (70, 40, vec![("is_causal", Attr::Int(1))]),
        ];
        for (i, (t, s, attrs)) in cases.iter().enumerate() {
            // 8 query heads over 2 KV heads.
            case(1, 8, 2, *t, *s, 64, 64, attrs, None, 100 + i as u64);
        }
    }

    #[test]
    fn masks_broadcast_like_the_generic_op() {
        let mut rng = StdRng::seed_from_u64(7);
        let (b, h, t, s) = (2, 4, 20, 45);
        let bias = |shape: &[usize], rng: &mut StdRng| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| {
                    if i % 7 == 3 {
                        f32::NEG_INFINITY
                    } else {
                        rng.random_range(-4.0..1.0)
                    }
                })
                .collect();
            Tensor::f32(shape, &v)
        };
        for shape in [
            vec![t, s],
            vec![1, 1, t, s],
            vec![b, 1, 1, s],
            vec![b, h, t, s],
            vec![h, t, 1],
            vec![s],
        ] {
            let m = bias(&shape, &mut rng);
            case(b, h, 2, t, s, 32, 32, &[], Some(m), 11);
            // The same layout over 3 query rows, causal.
            let short: Vec<usize> = shape.iter().map(|&n| if n == t { 3 } else { n }).collect();
            let m = bias(&short, &mut rng);
            case(
                b,
                h,
                2,
                3,
                s,
                32,
                32,
                &[("is_causal", Attr::Int(1))],
                Some(m),
                12,
            );
        }
        // Bool: a causal-looking keep mask with one row attending nothing (its output zero).
        let keep: Vec<bool> = (0..t * s)
            .map(|i| i / s != 4 && i % s <= i / s + 10)
            .collect();
        case(
            b,
            h,
            h,
            t,
            s,
            32,
            32,
            &[],
            Some(Tensor::bool(&[t, s], &keep)),
            13,
        );
    }

    /// Whisper's encoder attention: `[1, 6, 1500, 64]` both sides, no mask.
    #[test]
    fn whisper_encoder_shape() {
        let worst = case(1, 6, 6, 1500, 1500, 64, 64, &[], None, 42);
        eprintln!("T = S = 1500: worst |Δ|/max|V| = {worst:e}");
    }

    #[test]
    fn declines_what_it_does_not_take() {
        let q = Tensor::f32(&[1, 2, 3, 4], &[0.5; 24]);
        let q3 = Tensor::f32(&[1, 3, 8], &[0.5; 24]);
        let k5 = Tensor::f32(&[1, 2, 3, 5], &[0.5; 30]);
        let past = Tensor::f32(&[1, 2, 0, 4], &[]);
        let n = node(&[], false);
        assert!(try_node(&n, &[Some(&q), Some(&q), Some(&q)]).is_some());
        assert!(try_node(&n, &[Some(&q3), Some(&q3), Some(&q3)]).is_none());
        assert!(try_node(&n, &[Some(&q), Some(&k5), Some(&q)]).is_none());
        let six = [Some(&q), Some(&q), Some(&q), None, Some(&past), Some(&past)];
        assert!(try_node(&n, &six).is_none());
        let m = Tensor::f32(&[2, 3], &[0.0; 6]);
        assert!(try_node(&n, &[Some(&q), Some(&q), Some(&q), Some(&m)]).is_none());
        let cap = node(&[("softcap", Attr::Float(-1.0))], false);
        assert!(try_node(&cap, &[Some(&q), Some(&q), Some(&q)]).is_none());
    }
}
