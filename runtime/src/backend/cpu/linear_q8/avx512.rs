//! AVX-512 VNNI kernels of the integer path (see the parent module's doc).

use super::{QuantX, TileFloats, TileZero, Tiles, Weights, BLOCK};
use crate::backend::cpu::linear::{packed_block_bytes, TILE_ROWS};
use std::arch::x86_64::*;

/// Token rows multiplied per decoded weight pair in the GEMM path.
const TILE: usize = 4;

/// One weight matrix's buffers as raw pointers, and its form (`BITS` 4: f32 zero points, 16
/// bytes a block; 8: u8 zero points, 32 bytes a block).
#[derive(Clone, Copy)]
struct Form {
    b: *const u8,
    scales: *const f32,
    zeros: *const u8,
}

impl Form {
    /// Scale blocks `sb0..sb0 + 16` under mask `m`: their scales `s` and zero terms `s·z`.
    ///
    /// # Safety
    /// avx512f/bw/vl available; the masked blocks are inside the validated buffers.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn factors<const BITS: u32>(&self, m: __mmask16, sb0: usize) -> (__m512, __m512) {
        // SAFETY: masked loads of the blocks the caller vouches for.
        unsafe {
            let s = _mm512_maskz_loadu_ps(m, self.scales.add(sb0));
            let z = if BITS == 4 {
                _mm512_maskz_loadu_ps(m, (self.zeros as *const f32).add(sb0))
            } else {
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(
                    m,
                    self.zeros.add(sb0) as *const i8,
                )))
            };
            (s, _mm512_mul_ps(s, z))
        }
    }
}

/// The codes of blocks `blk` and `blk + 1` (`TWO`) or `blk` alone (upper half zero) as 64 u8 in
/// natural element order; `BITS` 4 reads nibbles, 8 bytes.
///
/// # Safety
/// avx512f/bw/vl/vnni available; the block(s) are inside the validated weight buffers.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn codes<const BITS: u32, const TWO: bool>(f: Form, blk: usize) -> __m512i {
    // SAFETY: reads blocks [blk, blk + 1 + TWO) of B only (16 or 32 bytes a block).
    unsafe {
        if BITS == 8 {
            let p = f.b.add(blk * 32);
            return if TWO {
                _mm512_loadu_si512(p as *const __m512i)
            } else {
                _mm512_zextsi256_si512(_mm256_loadu_si256(p as *const __m256i))
            };
        }
        let p = f.b.add(blk * 16);
        let raw = if TWO {
            _mm256_loadu_si256(p as *const __m256i)
        } else {
            _mm256_zextsi128_si256(_mm_loadu_si128(p as *const __m128i))
        };
        // Byte j in 16-bit lane j; shifted left by 4 its high nibble is the lane's high
        // byte: even bytes from `wide`, odd from `shifted`, masked to 4 bits.
        let wide = _mm512_cvtepu8_epi16(raw);
        let shifted = _mm512_slli_epi16::<4>(wide);
        let mixed = _mm512_mask_blend_epi8(0xAAAA_AAAA_AAAA_AAAA, wide, shifted);
        _mm512_and_si512(mixed, _mm512_set1_epi8(15))
    }
}

/// Lane indices taking the factors of register `p`'s scale blocks: blocks of 32 (`H` false) put
/// factor `2p` on lanes 0–7 and `2p + 1` on lanes 8–15; halves (`H`) put factor `4p + i` on lanes
/// `4i..4i + 4`, the lanes `vpdpbusd` sums that half's 16 bytes into.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn spread<const H: bool>(p: usize) -> __m512i {
    if H {
        let base = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        _mm512_add_epi32(base, _mm512_set1_epi32(4 * p as i32))
    } else {
        let base = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        _mm512_add_epi32(base, _mm512_set1_epi32(2 * p as i32))
    }
}

/// Dot products of weight row `row` with `R` token rows of `qx` starting at `x0`, in groups of 16
/// scale blocks (32 elements each, or 16 with halves `H`): the group's factors `s·d` are one
/// vector product and each 64-byte register of codes takes its own by one permute; the
/// zero-point term `Σ s·z·ds` is one multiply-add a group.
///
/// # Safety
/// avx512f/bw/vl/vnni available; `f` a validated Q4/Q8 (`H`: Q8 with halves) of `nb` 32-blocks a
/// row; `qx` holds ≥ `x0 + R` rows of `nb` blocks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<const BITS: u32, const H: bool, const X2: bool, const R: usize>(
    f: Form,
    nb: usize,
    qx: &QuantX,
    x0: usize,
    row: usize,
) -> [f32; R] {
    let k = nb * BLOCK;
    // Scale blocks a row and a 64-byte register; elements a scale block.
    let (ns, per, width) = if H { (2 * nb, 4, 16) } else { (nb, 2, 32) };
    let (qp, dp) = (qx.q.as_ptr(), qx.d.as_ptr());
    let (q2p, d2p) = (qx.q2.as_ptr(), qx.d2.as_ptr());
    let dsp = if H { qx.ds2.as_ptr() } else { qx.ds.as_ptr() };
    let dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    // The first digit's weight in two-digit sums (lanes of Σ c·q are ≤ 4·255·127: ·254 fits i32).
    let k254 = _mm512_set1_epi32(254);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut g = 0;
    // SAFETY: blocks row·nb + j are inside the weight buffers (validated) and the masked group
    // loads stay inside row `row`'s ns scale blocks; the qx reads cover [(x0+r)·K + e, +64) (or
    // +32) within the row and the [T, nb] / [T, ns] factor arrays.
    unsafe {
        while g < ns {
            let left = ns - g;
            let m: __mmask16 = if left >= 16 {
                0xFFFF
            } else {
                (1u16 << left) - 1
            };
            let (s, sz) = f.factors::<BITS>(m, row * ns + g);
            let mut fr = [_mm512_setzero_ps(); R];
            let mut fr2 = [_mm512_setzero_ps(); R];
            // The scales of a digit (d at `p`) for this group's scale blocks.
            let digit = |p: *const f32, r: usize| {
                if H {
                    // Halves g, g+1 share 32-block g/2's scale (ns and g are even).
                    let m8: __mmask8 = if left >= 16 {
                        0xFF
                    } else {
                        ((1u16 << (left / 2)) - 1) as __mmask8
                    };
                    let d8 = _mm256_maskz_loadu_ps(m8, p.add((x0 + r) * nb + g / 2));
                    _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(d8))
                } else {
                    _mm512_maskz_loadu_ps(m, p.add((x0 + r) * nb + g))
                }
            };
            for (r, (a, (fr, fr2))) in acc
                .iter_mut()
                .zip(fr.iter_mut().zip(fr2.iter_mut()))
                .enumerate()
            {
                // Two digits meet one factor: d₂·(254·Σc·q + Σc·q₂) (`d₂ = d/254`).
                if X2 {
                    *fr2 = _mm512_mul_ps(s, digit(d2p, r));
                } else {
                    *fr = _mm512_mul_ps(s, digit(dp, r));
                }
                *a = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(m, dsp.add((x0 + r) * ns + g)), *a);
            }
            let regs = left.min(16) / per;
            for p in 0..regs {
                let e = g * width + 64 * p;
                let c = codes::<BITS, true>(f, row * nb + e / BLOCK);
                let idx = spread::<H>(p);
                for r in 0..R {
                    let xq = _mm512_loadu_si512(qp.add((x0 + r) * k + e) as *const __m512i);
                    let mut dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, xq);
                    let mut f = fr[r];
                    if X2 {
                        let xq = _mm512_loadu_si512(q2p.add((x0 + r) * k + e) as *const __m512i);
                        dot = _mm512_dpbusd_epi32(_mm512_mullo_epi32(dot, k254), c, xq);
                        f = fr2[r];
                    }
                    let fv = _mm512_permutexvar_ps(idx, f);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), fv, acc[r]);
                }
            }
            if left < 16 && left % per != 0 {
                // The row's last 32 elements: one block (both halves of it with `H`).
                let e = g * width + 64 * regs;
                let c = codes::<BITS, false>(f, row * nb + e / BLOCK);
                let idx = spread::<H>(regs);
                for r in 0..R {
                    let xq = _mm512_zextsi256_si512(_mm256_loadu_si256(
                        qp.add((x0 + r) * k + e) as *const __m256i
                    ));
                    let mut dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, xq);
                    let mut f = fr[r];
                    if X2 {
                        let xq = _mm512_zextsi256_si512(_mm256_loadu_si256(
                            q2p.add((x0 + r) * k + e) as *const __m256i,
                        ));
                        dot = _mm512_dpbusd_epi32(_mm512_mullo_epi32(dot, k254), c, xq);
                        f = fr2[r];
                    }
                    // Lanes 8–15 of the dot are zero, whatever factor they meet.
                    let fv = _mm512_permutexvar_ps(idx, f);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), fv, acc[r]);
                }
            }
            g += 16;
        }
    }
    let mut res = [0f32; R];
    for (o, a) in res.iter_mut().zip(&acc) {
        *o = _mm512_reduce_add_ps(*a);
    }
    res
}

/// Integer rows of one form: `out[(row − start)·T + t]`.
///
/// # Safety
/// As [`rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows_of<const BITS: u32, const H: bool, const X2: bool>(
    f: Form,
    nb: usize,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    // Token tiles outermost: the tile of qx stays in L1 while this task's weight rows stream.
    let mut tt = 0;
    // SAFETY: forwarded contract; tt + R <= T; out index (i·T + tt + r) < rows·T.
    unsafe {
        while tt + TILE <= t {
            for (i, row) in rows.clone().enumerate() {
                let r = tile::<BITS, H, X2, TILE>(f, nb, qx, tt, row);
                out[i * t + tt..i * t + tt + TILE].copy_from_slice(&r);
            }
            tt += TILE;
        }
        while tt < t {
            for (i, row) in rows.clone().enumerate() {
                out[i * t + tt] = tile::<BITS, H, X2, 1>(f, nb, qx, tt, row)[0];
            }
            tt += 1;
        }
    }
}

/// The codes of group `g` (0..8) of tile-block `sb`: byte `4·row + e` is code `4g + e` of the
/// tile's row `row`.
///
/// # Safety
/// avx512f/bw/vl/vnni available; `sb` inside the validated buffers.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn group<const BITS: u32>(f: &Tiles, sb: usize, g: usize) -> __m512i {
    // SAFETY: reads inside tile-block `sb` (packed_block_bytes(BITS) code bytes, 64 high bytes).
    unsafe {
        let base = f.codes.add(sb * packed_block_bytes(BITS));
        if BITS == 8 {
            return _mm512_loadu_si512(base.add(g * 64) as *const __m512i);
        }
        let v = _mm512_loadu_si512(base.add((g / 2) * 64) as *const __m512i);
        let v = if g.is_multiple_of(2) {
            v
        } else {
            _mm512_srli_epi16::<4>(v)
        };
        let low = _mm512_and_si512(v, _mm512_set1_epi8(15));
        if BITS != 5 {
            return low;
        }
        let bits = (f.high.add(sb * 64 + g * 8) as *const u64).read_unaligned();
        _mm512_or_si512(
            low,
            _mm512_maskz_mov_epi8(_cvtu64_mask64(bits), _mm512_set1_epi8(16)),
        )
    }
}

/// Entries `at..at + 16` of `v` (f16 or f32) as f32.
///
/// # Safety
/// avx512f available; the 16 entries are inside `v`'s buffer.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn floats16(v: TileFloats, at: usize) -> __m512 {
    // SAFETY: the caller's contract.
    unsafe {
        if v.wide {
            _mm512_loadu_ps((v.ptr as *const f32).add(at))
        } else {
            _mm512_cvtph_ps(_mm256_loadu_si256(
                (v.ptr as *const u16).add(at) as *const __m256i
            ))
        }
    }
}

/// One tile (16 rows, a lane each) times `R` token rows of `qx` from `x0`: for every block, the
/// eight groups' integer dot products accumulate per lane (each token's four codes broadcast),
/// then meet the block's scales once.
///
/// # Safety
/// avx512f/bw/vl/vnni available; `tile` inside the validated matrix; `qx` holds ≥ `x0 + R` rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn packed_tile<const BITS: u32, const X2: bool, const R: usize>(
    f: &Tiles,
    tile: usize,
    qx: &QuantX,
    x0: usize,
) -> [__m512; R] {
    let (nb, k) = (f.nb, f.nb * BLOCK);
    let k254 = _mm512_set1_epi32(254);
    let mut acc = [_mm512_setzero_ps(); R];
    // SAFETY: tile-blocks tile·nb + b are inside the buffers; the qx reads are rows x0..x0+R.
    unsafe {
        for b in 0..nb {
            let sb = tile * nb + b;
            let s = floats16(f.scales, sb * 16);
            let sz = match f.zero {
                TileZero::Const(z) => _mm512_mul_ps(s, _mm512_set1_ps(z)),
                TileZero::Scaled(p) => floats16(p, sb * 16),
            };
            let mut dot = [_mm512_setzero_si512(); R];
            let mut dot2 = [_mm512_setzero_si512(); R];
            for g in 0..8 {
                let c = group::<BITS>(f, sb, g);
                for r in 0..R {
                    let at = (x0 + r) * k + b * BLOCK + 4 * g;
                    let xq = (qx.q.as_ptr().add(at) as *const i32).read_unaligned();
                    dot[r] = _mm512_dpbusd_epi32(dot[r], c, _mm512_set1_epi32(xq));
                    if X2 {
                        let xq2 = (qx.q2.as_ptr().add(at) as *const i32).read_unaligned();
                        dot2[r] = _mm512_dpbusd_epi32(dot2[r], c, _mm512_set1_epi32(xq2));
                    }
                }
            }
            for r in 0..R {
                let xi = (x0 + r) * nb + b;
                // Two digits meet one factor: d₂·(254·Σc·q + Σc·q₂) (`d₂ = d/254`).
                let (sum, d) = if X2 {
                    let sum = _mm512_add_epi32(_mm512_mullo_epi32(dot[r], k254), dot2[r]);
                    (sum, *qx.d2.get_unchecked(xi))
                } else {
                    (dot[r], *qx.d.get_unchecked(xi))
                };
                let fac = _mm512_mul_ps(s, _mm512_set1_ps(d));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), fac, acc[r]);
                let ds = _mm512_set1_ps(*qx.ds.get_unchecked(xi));
                acc[r] = _mm512_fnmadd_ps(sz, ds, acc[r]);
            }
        }
    }
    acc
}

/// [`packed_tile`] over the tiles covering `rows` and all T token rows (tiles of 4, then one):
/// `out[(row − start)·T + t]`.
///
/// # Safety
/// As [`rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn packed_rows_of<const BITS: u32, const X2: bool>(
    f: &Tiles,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let mut lanes = [0f32; TILE_ROWS];
    let put =
        |acc: &[__m512], tile: usize, tt: usize, lanes: &mut [f32; TILE_ROWS], out: &mut [f32]| {
            for (r, a) in acc.iter().enumerate() {
                // SAFETY: 16 f32 into a 16-element array.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *a) };
                let first = (tile * TILE_ROWS).max(rows.start);
                let last = ((tile + 1) * TILE_ROWS).min(rows.end);
                for row in first..last {
                    out[(row - rows.start) * t + tt + r] = lanes[row - tile * TILE_ROWS];
                }
            }
        };
    let tiles = rows.start / TILE_ROWS..rows.end.div_ceil(TILE_ROWS);
    // SAFETY: forwarded contract; tt + R <= T.
    unsafe {
        let mut tt = 0;
        while tt + TILE <= t {
            for tile in tiles.clone() {
                let acc = packed_tile::<BITS, X2, TILE>(f, tile, qx, tt);
                put(&acc, tile, tt, &mut lanes, out);
            }
            tt += TILE;
        }
        while tt < t {
            for tile in tiles.clone() {
                let acc = packed_tile::<BITS, X2, 1>(f, tile, qx, tt);
                put(&acc, tile, tt, &mut lanes, out);
            }
            tt += 1;
        }
    }
}

/// Integer rows of a [`Weights::Packed`]: `out[(row − start)·T + t]`.
///
/// # Safety
/// As [`rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn packed_rows(
    w: &Weights,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let Some(f) = Tiles::of(w, false) else {
        return;
    };
    let x2 = !qx.q2.is_empty();
    // SAFETY: forwarded contract.
    unsafe {
        match (f.bits, x2) {
            (4, true) => packed_rows_of::<4, true>(&f, qx, t, rows, out),
            (4, false) => packed_rows_of::<4, false>(&f, qx, t, rows, out),
            (5, true) => packed_rows_of::<5, true>(&f, qx, t, rows, out),
            (5, false) => packed_rows_of::<5, false>(&f, qx, t, rows, out),
            (_, true) => packed_rows_of::<8, true>(&f, qx, t, rows, out),
            (_, false) => packed_rows_of::<8, false>(&f, qx, t, rows, out),
        }
    }
}

/// Integer rows: `out[(row − start)·T + t]`.
///
/// # Safety
/// avx512f/bw/vl/vnni available; `w` a validated Q4/Q8/Packed; `qx` quantized from `[T, K]`;
/// `out.len() == rows.len()·T`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn rows(
    w: &Weights,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let nb = w.k() / BLOCK;
    let x2 = !qx.q2.is_empty();
    let (f, bits, halves) = match *w {
        Weights::Q4 {
            b, scales, zeros, ..
        } => {
            let f = Form {
                b: b.as_ptr(),
                scales: scales.as_ptr(),
                zeros: zeros.as_ptr() as *const u8,
            };
            (f, 4, false)
        }
        Weights::Q8 {
            b,
            scales,
            zeros,
            halves,
            ..
        } => {
            let f = Form {
                b: b.as_ptr(),
                scales: scales.as_ptr(),
                zeros: zeros.as_ptr(),
            };
            (f, 8, halves)
        }
        // SAFETY: forwarded contract.
        Weights::Packed { .. } => return unsafe { packed_rows(w, qx, t, rows, out) },
        _ => return,
    };
    // SAFETY: forwarded contract.
    unsafe {
        match (bits, halves, x2) {
            (4, _, true) => rows_of::<4, false, true>(f, nb, qx, t, rows, out),
            (4, _, false) => rows_of::<4, false, false>(f, nb, qx, t, rows, out),
            (_, true, true) => rows_of::<8, true, true>(f, nb, qx, t, rows, out),
            (_, true, false) => rows_of::<8, true, false>(f, nb, qx, t, rows, out),
            (_, false, true) => rows_of::<8, false, true>(f, nb, qx, t, rows, out),
            (_, false, false) => rows_of::<8, false, false>(f, nb, qx, t, rows, out),
        }
    }
}
