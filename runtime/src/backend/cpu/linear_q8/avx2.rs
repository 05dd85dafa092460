//! AVX2 kernels of the integer path (see the parent module's doc).

use super::{QuantX, TileFloats, TileZero, Tiles, Weights, BLOCK};
use crate::backend::cpu::linear::{packed_block_bytes, TILE_ROWS};
use crate::backend::cpu::simd::x86::hsum;
use std::arch::x86_64::*;

/// Token rows multiplied per decoded weight block in the GEMM path.
const TILE: usize = 4;

/// [`QuantX::new`] in AVX2: the same values (`127/amax` as the factor, ties to even).
///
/// # Safety
/// avx2+fma+f16c available; `qx` sized for `x` by [`QuantX::new`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize(x: &[f32], qx: &mut QuantX) {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    for (b, (xb, qb)) in x
        .chunks_exact(BLOCK)
        .zip(qx.q.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        // SAFETY: xb has 32 f32, qb 32 i8.
        unsafe {
            let p = xb.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
            );
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d > 0.0 { 127.0 / amax } else { 0.0 });
            let lim = _mm256_set1_ps(127.0);
            let neg = _mm256_sub_ps(_mm256_setzero_ps(), lim);
            let mut q = [_mm256_setzero_si256(); 4];
            for (q, v) in q.iter_mut().zip(v) {
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(v, id),
                );
                *q = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(r, lim), neg));
            }
            // i32 → i16 → i8 packs interleave 128-bit lanes; one permute restores the order.
            let w = _mm256_packs_epi32(q[0], q[1]);
            let z = _mm256_packs_epi32(q[2], q[3]);
            let bytes = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(w, z),
                _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
            );
            _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, bytes);
            let s16 = _mm256_madd_epi16(_mm256_add_epi16(w, z), _mm256_set1_epi16(1));
            let s = _mm_add_epi32(
                _mm256_castsi256_si128(s16),
                _mm256_extracti128_si256::<1>(s16),
            );
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            qx.d[b] = d;
            qx.ds[b] = d * _mm_cvtsi128_si32(s) as f32;
        }
    }
}

/// Integer dot products of one weight row with `R` token rows of `qx`.
///
/// # Safety
/// avx2+fma+f16c available; `w` a validated Q4/Q8; `qx` holds ≥ `x0 + R` rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const H: bool, const X2: bool, const R: usize>(
    w: &Weights,
    qx: &QuantX,
    x0: usize,
    row: usize,
) -> [f32; R] {
    let k = w.k();
    let nb = k / BLOCK;
    let ones = _mm256_set1_epi16(1);
    let k254 = _mm256_set1_epi32(254);
    // Two accumulators per token row (even/odd blocks) to hide the FMA latency.
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut corr = [0f32; R];
    let (qp, dp, dsp, ds2p) = (
        qx.q.as_ptr(),
        qx.d.as_ptr(),
        qx.ds.as_ptr(),
        qx.ds2.as_ptr(),
    );
    let (q2p, d2p) = (qx.q2.as_ptr(), qx.d2.as_ptr());
    // One block into accumulator `$slot`: `$codes` unsigned, `$sign` the signed codes whose sign x
    // takes (Q8: q − 128) or None (Q4), `$s`/`$sz` = scale and scale · (zero point − code offset)
    // of the block's two halves (equal unless `H`: the pair sums of lanes 0–3 are the first
    // half's, of lanes 4–7 the second's). A macro, not a closure, so the intrinsics stay inside
    // this function's target features.
    macro_rules! one {
        ($j:expr, $slot:expr, $s:expr, $sz:expr, $codes:expr, $sign:expr) => {
            for r in 0..R {
                let xi = (x0 + r) * nb + $j;
                // [(x0+r)·K + 32j, +32) and block xi (halves 2xi, 2xi+1) are inside qx
                // (x0 + R <= T); the caller's `unsafe` block covers these reads.
                let (xq, d) = (
                    _mm256_loadu_si256(qp.add((x0 + r) * k + $j * BLOCK) as *const __m256i),
                    *dp.add(xi),
                );
                let xq = match $sign {
                    Some(sg) => _mm256_sign_epi8(xq, sg),
                    None => xq,
                };
                let mut p = _mm256_madd_epi16(_mm256_maddubs_epi16($codes, xq), ones);
                let mut d = d;
                if X2 {
                    // The second digit: the same codes; both meet one factor, d₂·(254·p + p₂)
                    // (`d₂ = d/254`; lanes of p are ≤ 2·2·128·127, ·254 fits i32).
                    let xq =
                        _mm256_loadu_si256(q2p.add((x0 + r) * k + $j * BLOCK) as *const __m256i);
                    let xq = match $sign {
                        Some(sg) => _mm256_sign_epi8(xq, sg),
                        None => xq,
                    };
                    let p2 = _mm256_madd_epi16(_mm256_maddubs_epi16($codes, xq), ones);
                    p = _mm256_add_epi32(_mm256_mullo_epi32(p, k254), p2);
                    d = *d2p.add(xi);
                }
                let (s, sz): ((f32, f32), (f32, f32)) = ($s, $sz);
                let fv = if H {
                    _mm256_setr_m128(_mm_set1_ps(s.0 * d), _mm_set1_ps(s.1 * d))
                } else {
                    _mm256_set1_ps(s.0 * d)
                };
                acc[r][$slot] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), fv, acc[r][$slot]);
                corr[r] = if H {
                    sz.1.mul_add(
                        *ds2p.add(2 * xi + 1),
                        sz.0.mul_add(*ds2p.add(2 * xi), corr[r]),
                    )
                } else {
                    sz.0.mul_add(*dsp.add(xi), corr[r])
                };
            }
        };
    }
    for j in 0..nb {
        let blk = row * nb + j;
        // SAFETY: block `blk` is inside B/scales/zeros (validated).
        unsafe {
            match *w {
                Weights::Q4 {
                    b, scales, zeros, ..
                } => {
                    let s = *scales.get_unchecked(blk);
                    let raw = _mm_loadu_si128(b.as_ptr().add(blk * 16) as *const __m128i);
                    // Byte j in 16-bit lane j; its high nibble shifted into the lane's high byte.
                    let wide = _mm256_cvtepu8_epi16(raw);
                    let mixed = _mm256_blendv_epi8(
                        wide,
                        _mm256_slli_epi16::<4>(wide),
                        _mm256_set1_epi16(0xFF00u16 as i16),
                    );
                    let codes = _mm256_and_si256(mixed, _mm256_set1_epi8(15));
                    let sz = s * *zeros.get_unchecked(blk);
                    one!(j, j & 1, (s, s), (sz, sz), codes, None::<__m256i>);
                }
                Weights::Q8 {
                    b, scales, zeros, ..
                } => {
                    let raw = _mm256_loadu_si256(b.as_ptr().add(blk * 32) as *const __m256i);
                    // q − 128 as i8; |q − 128| as u8 (−128 stays 0x80 = 128); x takes the sign
                    // of q − 128.
                    let qs = _mm256_xor_si256(raw, _mm256_set1_epi8(-128));
                    let mag = _mm256_sign_epi8(qs, qs);
                    let sb = if H { 2 * blk } else { blk };
                    let f = |i: usize| {
                        let s = *scales.get_unchecked(sb + i);
                        (s, s * (*zeros.get_unchecked(sb + i) as f32 - 128.0))
                    };
                    let (h0, h1) = if H { (f(0), f(1)) } else { (f(0), f(0)) };
                    one!(j, j & 1, (h0.0, h1.0), (h0.1, h1.1), mag, Some(qs));
                }
                _ => return [0.0; R],
            }
        }
    }
    let mut res = [0f32; R];
    for r in 0..R {
        res[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) - corr[r];
    }
    res
}

/// Integer rows: `out[(row − start)·T + t]`.
///
/// # Safety
/// avx2+fma+f16c available; `w` a validated Q4/Q8/Packed; `qx` quantized from `[T, K]`;
/// `out.len() == rows.len()·T`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows(
    w: &Weights,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    // SAFETY: forwarded contract.
    unsafe {
        if matches!(*w, Weights::Packed { .. }) {
            return packed_rows::<MADDUBS>(w, qx, t, rows, out);
        }
        let h = matches!(*w, Weights::Q8 { halves: true, .. });
        match (h, !qx.q2.is_empty()) {
            (true, true) => rows_of::<true, true>(w, qx, t, rows, out),
            (true, false) => rows_of::<true, false>(w, qx, t, rows, out),
            (false, true) => rows_of::<false, true>(w, qx, t, rows, out),
            (false, false) => rows_of::<false, false>(w, qx, t, rows, out),
        }
    }
}

/// [`rows`] for one scale layout (`H`: a scale and zero point per 16-element half) and one or
/// two activation digits (`X2`).
///
/// # Safety
/// As [`rows`]; `H` only for a Q8 with halves, `X2` only for two-digit `qx`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_of<const H: bool, const X2: bool>(
    w: &Weights,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let mut tt = 0;
    // SAFETY: forwarded contract; tt + R <= T; out index (i·T + tt + r) < rows·T.
    unsafe {
        while tt + TILE <= t {
            for (i, row) in rows.clone().enumerate() {
                let r = tile::<H, X2, TILE>(w, qx, tt, row);
                out[i * t + tt..i * t + tt + TILE].copy_from_slice(&r);
            }
            tt += TILE;
        }
        while tt < t {
            for (i, row) in rows.clone().enumerate() {
                out[i * t + tt] = tile::<H, X2, 1>(w, qx, tt, row)[0];
            }
            tt += 1;
        }
    }
}

// -----------------------------------------------------------------------------------------------
// Packed tiles
// -----------------------------------------------------------------------------------------------

/// Rows of a half tile: one i32 lane of a 256-bit register each (a tile's 64-byte group is two
/// registers, rows 0–7 and rows 8–15).
const HALF_ROWS: usize = TILE_ROWS / 2;

/// The codes of groups `2j` and `2j + 1` (j in 0..4) of tile-block `sb` for the tile's rows
/// `8·half..8·half + 8`, as u8: byte `4·r + e` of group g's register is code `4g + e` of row
/// `8·half + r`.
///
/// # Safety
/// avx2 available; `sb` inside the validated buffers; `half` 0 or 1.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_pair<const BITS: u32>(f: &Tiles, sb: usize, half: usize, j: usize) -> [__m256i; 2] {
    // SAFETY: reads inside tile-block `sb`: the half's 32 bytes of 64-byte registers of its
    // packed_block_bytes(BITS) code bytes (and `fifth`'s reads).
    unsafe {
        let base = f.codes.add(sb * packed_block_bytes(BITS) + 32 * half);
        if BITS == 8 {
            let p = base.add(2 * j * 64);
            return [
                _mm256_loadu_si256(p as *const __m256i),
                _mm256_loadu_si256(p.add(64) as *const __m256i),
            ];
        }
        // Register j: group 2j in the low nibbles, 2j + 1 in the high ones.
        let v = _mm256_loadu_si256(base.add(j * 64) as *const __m256i);
        let m = _mm256_set1_epi8(15);
        let mut c = [
            _mm256_and_si256(v, m),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v), m),
        ];
        if BITS == 5 {
            for (i, c) in c.iter_mut().enumerate() {
                *c = _mm256_or_si256(*c, fifth(f, sb, half, 2 * j + i));
            }
        }
        c
    }
}

/// The fifth bits of group `g` of tile-block `sb` for the tile's rows `8·half..8·half + 8`: 16
/// in byte `4·r + e` where code `4g + e` of row `8·half + r` has it, else 0.
///
/// # Safety
/// avx2 available; `sb` inside the validated buffers of a 5-bit matrix; `half` 0 or 1.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fifth(f: &Tiles, sb: usize, half: usize, g: usize) -> __m256i {
    // SAFETY: the half's 4 bytes of word g of tile-block `sb`'s 64 high bytes.
    let bits = unsafe { (f.high.add(sb * 64 + g * 8 + 4 * half) as *const i32).read_unaligned() };
    // Bit `4r + e` of the half's u32 is the fifth bit of code e of row r: byte i takes byte i/8
    // of the word, keeps bit i % 8, and becomes 16 where that bit is set.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        ),
    );
    let pick = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, pick), pick);
    _mm256_and_si256(set, _mm256_set1_epi8(16))
}

/// Adds group `g`'s products (codes `c`, u8) with `R` token rows to the i16 pair sums `part`
/// (`[r][digit]`): `x[r]` (`x2[r]`) points at token r's block in the first (second) digit, whose
/// bytes `4g..4g + 4` are broadcast. 8 bits: `c` is multiplied as `q − 128`, its magnitude by x
/// taking its sign.
///
/// # Safety
/// avx2 available; `x`, `x2` (with `X2`) each hold 32 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_group<const BITS: u32, const X2: bool, const R: usize>(
    c: __m256i,
    g: usize,
    (x, x2): ([*const i8; R], [*const i8; R]),
    part: &mut [[__m256i; 2]; R],
) {
    // q − 128 as i8 (`sign`), its magnitude as u8 (−128 stays 0x80 = 128).
    let sign = _mm256_xor_si256(c, _mm256_set1_epi8(-128));
    let mag = if BITS == 8 { _mm256_abs_epi8(sign) } else { c };
    let digits = if X2 { 2 } else { 1 };
    for (r, part) in part.iter_mut().enumerate() {
        for (p, part) in [x[r], x2[r]].into_iter().zip(part).take(digits) {
            // SAFETY: bytes 4g..4g + 4 of the token's 32-byte block (g < 8).
            let xq = unsafe { (p.add(4 * g) as *const i32).read_unaligned() };
            let xq = _mm256_set1_epi32(xq);
            let xq = if BITS == 8 {
                _mm256_sign_epi8(xq, sign)
            } else {
                xq
            };
            *part = _mm256_add_epi16(*part, _mm256_maddubs_epi16(mag, xq));
        }
    }
}

/// The integer sums of tile-block `sb`'s rows `8·half..+8` (a lane each) with `R` token rows:
/// `[r][digit]`, the second digit's zero unless `X2`. `xs`: as [`add_group`].
///
/// `maddubs` adds pairs of u8 × i8 products in i16, saturating; these pair sums never reach it:
/// 4-bit codes give |pair| ≤ 2·15·127 = 3810, over all eight groups ≤ 30480; 5-bit codes
/// 2·31·127 = 7874, over four groups ≤ 31496; 8-bit codes run as |q − 128| with x taking the
/// sign of q − 128 (as the row-major path), ≤ 2·128·127 = 32512 for one group. `madd` widens
/// each such run of groups to i32, so the sums are exact.
///
/// # Safety
/// avx2 available; `sb` inside the validated buffers; `xs` as [`add_group`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_sums<const BITS: u32, const X2: bool, const R: usize>(
    f: &Tiles,
    (sb, half): (usize, usize),
    xs: ([*const i8; R], [*const i8; R]),
) -> [[__m256i; 2]; R] {
    // Groups whose i16 pair sums add before they widen (above).
    let run = match BITS {
        4 => 8,
        5 => 4,
        _ => 1,
    };
    let digits = if X2 { 2 } else { 1 };
    let ones = _mm256_set1_epi16(1);
    let mut sum = [[_mm256_setzero_si256(); 2]; R];
    let mut part = [[_mm256_setzero_si256(); 2]; R];
    for j in 0..4 {
        // SAFETY: the caller's contract.
        let pair = unsafe { group_pair::<BITS>(f, sb, half, j) };
        for (i, c) in pair.into_iter().enumerate() {
            let g = 2 * j + i;
            // SAFETY: the caller's contract.
            unsafe { add_group::<BITS, X2, R>(c, g, xs, &mut part) };
            if (g + 1) % run == 0 {
                for (s, p) in sum.iter_mut().zip(part.iter_mut()) {
                    for (s, p) in s.iter_mut().zip(p.iter_mut()).take(digits) {
                        *s = _mm256_add_epi32(*s, _mm256_madd_epi16(*p, ones));
                        *p = _mm256_setzero_si256();
                    }
                }
            }
        }
    }
    sum
}

/// How a packed half tile's integer sums are taken: [`MADDUBS`] (AVX2), [`VNNI`] (AVX-VNNI's
/// `vpdpbusd`) or, in tests on CPUs without AVX-VNNI, [`VNNI_EMULATED`] (the same sums in AVX2).
type Dot = u8;
/// AVX2's `maddubs` pair sums in i16, widened by `madd` ([`half_sums`]).
const MADDUBS: Dot = 0;
/// AVX-VNNI's VEX-encoded `vpdpbusd` ([`half_sums_vnni`]).
const VNNI: Dot = 1;
/// `vpdpbusd`'s exact result computed in AVX2: what tests run where the CPU lacks AVX-VNNI.
#[cfg(test)]
const VNNI_EMULATED: Dot = 2;

/// `acc + Σ a·b` over each i32 lane's four byte pairs (`a` u8, `b` i8), without saturation:
/// AVX-VNNI's `vpdpbusd` (VEX form, through `asm!`: its intrinsic needs the `avxvnni` target
/// feature, which `HW` false must not assume), or with `HW` false the same sums from AVX2's exact
/// 16-bit products (`madd` of widened bytes: |a·b| ≤ 32640, pairs fit i32).
///
/// # Safety
/// avx2 available; with `HW`, avxvnni too.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dpbusd<const HW: bool>(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    if HW {
        let mut acc = acc;
        // SAFETY: the caller vouches for AVX-VNNI; registers only.
        unsafe {
            std::arch::asm!(
                "{{vex}} vpdpbusd {acc}, {a}, {b}",
                acc = inout(ymm_reg) acc,
                a = in(ymm_reg) a,
                b = in(ymm_reg) b,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        return acc;
    }
    let pairs = |a: __m128i, b: __m128i| {
        _mm256_madd_epi16(_mm256_cvtepu8_epi16(a), _mm256_cvtepi8_epi16(b))
    };
    let lo = pairs(_mm256_castsi256_si128(a), _mm256_castsi256_si128(b));
    let hi = pairs(
        _mm256_extracti128_si256::<1>(a),
        _mm256_extracti128_si256::<1>(b),
    );
    // hadd gives lanes [0, 1, 4, 5 | 2, 3, 6, 7] of the quad sums; the permute orders them.
    let quads = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(lo, hi));
    _mm256_add_epi32(acc, quads)
}

/// [`half_sums`] by `vpdpbusd` ([`dpbusd`]): the codes as stored (u8, 8-bit ones unshifted, as
/// the AVX-512 kernel takes them) times each token's broadcast bytes, summed in i32 lanes
/// directly (a lane's eight groups ≤ 8·4·255·127 < 2²¹).
///
/// # Safety
/// As [`half_sums`]; with `HW`, avxvnni available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_sums_vnni<const BITS: u32, const X2: bool, const R: usize, const HW: bool>(
    f: &Tiles,
    (sb, half): (usize, usize),
    (x, x2): ([*const i8; R], [*const i8; R]),
) -> [[__m256i; 2]; R] {
    let digits = if X2 { 2 } else { 1 };
    let mut sum = [[_mm256_setzero_si256(); 2]; R];
    for j in 0..4 {
        // SAFETY: the caller's contract.
        let pair = unsafe { group_pair::<BITS>(f, sb, half, j) };
        for (i, c) in pair.into_iter().enumerate() {
            let g = 2 * j + i;
            for (r, sum) in sum.iter_mut().enumerate() {
                for (p, sum) in [x[r], x2[r]].into_iter().zip(sum).take(digits) {
                    // SAFETY: bytes 4g..4g + 4 of the token's 32-byte block (g < 8); the
                    // caller vouches for AVX-VNNI with `HW`.
                    unsafe {
                        let xq = (p.add(4 * g) as *const i32).read_unaligned();
                        *sum = dpbusd::<HW>(*sum, c, _mm256_set1_epi32(xq));
                    }
                }
            }
        }
    }
    sum
}

/// Entries `at..at + 8` of `v` (f16 or f32) as f32.
///
/// # Safety
/// avx+f16c available; the 8 entries are inside `v`'s buffer.
#[inline]
#[target_feature(enable = "avx,f16c")]
unsafe fn floats8(v: TileFloats, at: usize) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe {
        if v.wide {
            _mm256_loadu_ps((v.ptr as *const f32).add(at))
        } else {
            _mm256_cvtph_ps(_mm_loadu_si128(
                (v.ptr as *const u16).add(at) as *const __m128i
            ))
        }
    }
}

/// One half tile (rows `8·half..+8` of tile `tile`, a lane each) times `R` token rows of `qx`
/// from `x0`: each block's integer sums (taken as `D` says: [`Dot`]) meet the block's scales in
/// one conversion and one multiply-add, its zero-point term in another.
///
/// # Safety
/// avx2+fma+f16c available (and avxvnni for [`VNNI`]); `tile` inside the validated matrix; `qx`
/// holds ≥ `x0 + R` rows; `f` made with 8-bit codes offset exactly when `D` is [`MADDUBS`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn packed_half<const BITS: u32, const X2: bool, const R: usize, const D: Dot>(
    f: &Tiles,
    (tile, half): (usize, usize),
    qx: &QuantX,
    x0: usize,
) -> [__m256; R] {
    let (nb, k) = (f.nb, f.nb * BLOCK);
    let k254 = _mm256_set1_epi32(254);
    let mut acc = [_mm256_setzero_ps(); R];
    // SAFETY: tile-blocks tile·nb + b are inside the buffers (their scales and zero terms at
    // sb·16 + 8·half, 8 each); the qx reads are rows x0..x0 + R of [T, K] and [T, nb].
    unsafe {
        for b in 0..nb {
            let sb = tile * nb + b;
            let at = sb * TILE_ROWS + HALF_ROWS * half;
            let s = floats8(f.scales, at);
            // The zero-point term of the codes as multiplied (8 bits: s·z − 128·s).
            let sz = match f.zero {
                TileZero::Const(z) => _mm256_mul_ps(s, _mm256_set1_ps(z)),
                TileZero::Scaled(p) => {
                    let sz = floats8(p, at);
                    if BITS == 8 && D == MADDUBS {
                        _mm256_fnmadd_ps(s, _mm256_set1_ps(128.0), sz)
                    } else {
                        sz
                    }
                }
            };
            let e = |r: usize| (x0 + r) * k + b * BLOCK;
            let x: [*const i8; R] = std::array::from_fn(|r| qx.q.as_ptr().add(e(r)));
            let x2 = if X2 {
                std::array::from_fn(|r| qx.q2.as_ptr().add(e(r)))
            } else {
                x
            };
            let sums = match D {
                MADDUBS => half_sums::<BITS, X2, R>(f, (sb, half), (x, x2)),
                VNNI => half_sums_vnni::<BITS, X2, R, true>(f, (sb, half), (x, x2)),
                _ => half_sums_vnni::<BITS, X2, R, false>(f, (sb, half), (x, x2)),
            };
            for (r, (a, [one, two])) in acc.iter_mut().zip(sums).enumerate() {
                let xi = (x0 + r) * nb + b;
                // Two digits meet one factor: d₂·(254·Σc·q + Σc·q₂) (`d₂ = d/254`).
                let (sum, d) = if X2 {
                    let sum = _mm256_add_epi32(_mm256_mullo_epi32(one, k254), two);
                    (sum, *qx.d2.get_unchecked(xi))
                } else {
                    (one, *qx.d.get_unchecked(xi))
                };
                let fac = _mm256_mul_ps(s, _mm256_set1_ps(d));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), fac, *a);
                let ds = _mm256_set1_ps(*qx.ds.get_unchecked(xi));
                *a = _mm256_fnmadd_ps(sz, ds, *a);
            }
        }
    }
    acc
}

/// [`packed_half`] over the half tiles covering `rows` and all T token rows (tiles of
/// [`TILE`] tokens, then one): `out[(row − start)·T + t]`.
///
/// # Safety
/// As [`rows`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn packed_rows_of<const BITS: u32, const X2: bool, const D: Dot>(
    f: &Tiles,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let put = |acc: &[__m256], h: usize, tt: usize, out: &mut [f32]| {
        let mut lanes = [0f32; HALF_ROWS];
        let first = (h * HALF_ROWS).max(rows.start);
        let last = ((h + 1) * HALF_ROWS).min(rows.end);
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: 8 f32 into an 8-element array.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
            for row in first..last {
                out[(row - rows.start) * t + tt + r] = lanes[row - h * HALF_ROWS];
            }
        }
    };
    // Half tiles: a task's rows need not start or end on a tile (a linear group's members).
    let halves = rows.start / HALF_ROWS..rows.end.div_ceil(HALF_ROWS);
    // SAFETY: forwarded contract; tt + R <= T.
    unsafe {
        let mut tt = 0;
        while tt + TILE <= t {
            for h in halves.clone() {
                let acc = packed_half::<BITS, X2, TILE, D>(f, (h / 2, h % 2), qx, tt);
                put(&acc, h, tt, out);
            }
            tt += TILE;
        }
        while tt < t {
            for h in halves.clone() {
                let acc = packed_half::<BITS, X2, 1, D>(f, (h / 2, h % 2), qx, tt);
                put(&acc, h, tt, out);
            }
            tt += 1;
        }
    }
}

/// Integer rows of a [`Weights::Packed`]: `out[(row − start)·T + t]`.
///
/// # Safety
/// As [`rows`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn packed_rows<const D: Dot>(
    w: &Weights,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let Some(f) = Tiles::of(w, D == MADDUBS) else {
        return;
    };
    let x2 = !qx.q2.is_empty();
    // SAFETY: forwarded contract.
    unsafe {
        match (f.bits, x2) {
            (4, true) => packed_rows_of::<4, true, D>(&f, qx, t, rows, out),
            (4, false) => packed_rows_of::<4, false, D>(&f, qx, t, rows, out),
            (5, true) => packed_rows_of::<5, true, D>(&f, qx, t, rows, out),
            (5, false) => packed_rows_of::<5, false, D>(&f, qx, t, rows, out),
            (_, true) => packed_rows_of::<8, true, D>(&f, qx, t, rows, out),
            (_, false) => packed_rows_of::<8, false, D>(&f, qx, t, rows, out),
        }
    }
}

/// Integer rows on AVX-VNNI: packed matrices through `vpdpbusd` (the AVX-512 kernel's sums on
/// 256-bit registers, 8 rows a register), the row-major forms through the AVX2 kernels.
/// `out[(row − start)·T + t]`.
///
/// Tests run it on CPUs without AVX-VNNI too (`available` lists it there under `cfg(test)`):
/// `vpdpbusd` is then emulated exactly ([`dpbusd`]), so everything but that one instruction is
/// tested on every AVX2 machine (no CPU or emulator here executes AVX-VNNI).
///
/// # Safety
/// As [`rows`], and avxvnni available (outside tests).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows_vnni(
    w: &Weights,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    // SAFETY: forwarded contract.
    unsafe {
        if !matches!(*w, Weights::Packed { .. }) {
            return self::rows(w, qx, t, rows, out);
        }
        #[cfg(test)]
        if !is_x86_feature_detected!("avxvnni") {
            return packed_rows::<VNNI_EMULATED>(w, qx, t, rows, out);
        }
        packed_rows::<VNNI>(w, qx, t, rows, out)
    }
}
