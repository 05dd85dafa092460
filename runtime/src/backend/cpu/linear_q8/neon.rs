//! NEON kernels of the integer path: plain, dotprod (`sdot`) and i8mm (`smmla`) (see the parent module's doc).

use super::{QuantX, TileFloats, TileZero, Tiles, Weights, BLOCK};
use crate::backend::cpu::linear::{packed_block_bytes, TILE_ROWS};
use std::arch::aarch64::*;

/// Integer rows on NEON (same formula as `rows_scalar`): signed 8×8→16-bit products, pairs summed in
/// 16 bits (|q·x| ≤ 128·127, two fit in i16), widened to i32. 8-bit codes run as `q − 128`.
///
/// # Safety
/// `w` a validated Q4/Q8; `qx` quantized from `[T, K]`; `out.len() == rows.len()·T`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn rows(
    w: &Weights,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    // SAFETY: the caller's contract.
    unsafe { rows_with::<false>(w, qx, t, rows, out) }
}

/// [`rows`] with each 16-byte product summed by one `sdot` (four products a lane: |Σ| ≤ 4·128·127).
///
/// # Safety
/// As [`rows`], on a CPU with FEAT_DotProd.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn rows_dot(
    w: &Weights,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    // SAFETY: the caller's contract; `DOT` runs `sdot`, which this function's features allow.
    unsafe {
        if matches!(*w, Weights::Packed { .. }) {
            return packed_rows(w, qx, t, rows, out);
        }
        rows_with::<true>(w, qx, t, rows, out)
    }
}

/// `acc + Σ` of each 4 adjacent `a·b` products, a lane each (`sdot`).
///
/// # Safety
/// A CPU with FEAT_DotProd.
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: a register-only instruction the function's features enable.
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// Σ of the 16 products `a·b` as i32: one `sdot` when `DOT`, else widening multiplies and pairwise
/// adds.
///
/// # Safety
/// With `DOT`, a CPU with FEAT_DotProd.
#[inline(always)]
unsafe fn dot16<const DOT: bool>(a: int8x16_t, b: int8x16_t) -> i32 {
    // SAFETY: NEON is baseline; `sdot` per the contract.
    unsafe {
        if DOT {
            vaddvq_s32(sdot(vdupq_n_s32(0), a, b))
        } else {
            let p = vmlal_s8(
                vmull_s8(vget_low_s8(a), vget_low_s8(b)),
                vget_high_s8(a),
                vget_high_s8(b),
            );
            vaddvq_s32(vpaddlq_s16(p))
        }
    }
}

/// One weight row's 32-block: its codes as two signed 16-byte halves (8-bit codes as `q − 128`),
/// each half's scale and zero point (offset to match).
struct Block {
    c: [int8x16_t; 2],
    s: (f32, f32),
    zoff: (f32, f32),
}

/// Block `blk` of `w` (`None` for a form this path does not take).
///
/// # Safety
/// `w` a validated Q4/Q8 and `blk` one of its blocks.
#[inline(always)]
unsafe fn block(w: &Weights, blk: usize) -> Option<Block> {
    // SAFETY: block `blk` is inside B/scales/zeros (validated).
    unsafe {
        match *w {
            Weights::Q4 {
                b, scales, zeros, ..
            } => {
                let raw = vld1q_u8(b.as_ptr().add(blk * 16));
                let lo = vandq_u8(raw, vdupq_n_u8(15));
                let hi = vshrq_n_u8::<4>(raw);
                Some(Block {
                    c: [
                        vreinterpretq_s8_u8(vzip1q_u8(lo, hi)),
                        vreinterpretq_s8_u8(vzip2q_u8(lo, hi)),
                    ],
                    s: (scales[blk], scales[blk]),
                    zoff: (zeros[blk], zeros[blk]),
                })
            }
            Weights::Q8 {
                b,
                scales,
                zeros,
                halves,
                ..
            } => {
                let p = b.as_ptr().add(blk * 32);
                let f = vdupq_n_u8(0x80);
                let sb = if halves { 2 * blk } else { blk };
                let h = if halves { 1 } else { 0 };
                Some(Block {
                    c: [
                        vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p), f)),
                        vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p.add(16)), f)),
                    ],
                    s: (scales[sb], scales[sb + h]),
                    zoff: (zeros[sb] as f32 - 128.0, zeros[sb + h] as f32 - 128.0),
                })
            }
            _ => None,
        }
    }
}

/// Adds block `b`'s term for activation block `xi` to `o`, from the halves' integer sums against
/// the first digit (`one`) and the second (`two`, when `qx` has one). Every path here ends in
/// this one function, so they agree bit for bit.
#[inline(always)]
fn add_block(o: &mut f32, b: &Block, qx: &QuantX, xi: usize, one: [i32; 2], two: [i32; 2]) {
    let (s, zoff) = (b.s, b.zoff);
    let d = qx.d[xi];
    let (i0, i1) = (one[0] as f32, one[1] as f32);
    // Each half's Σ codes·x, the second digit (if any) weighed by d₂.
    let (h0, h1) = if qx.q2.is_empty() {
        (d * i0, d * i1)
    } else {
        let d2 = qx.d2[xi];
        (d * i0 + d2 * two[0] as f32, d * i1 + d2 * two[1] as f32)
    };
    if s.0 == s.1 && zoff.0 == zoff.1 {
        *o += s.0 * (h0 + h1) - s.0 * zoff.0 * qx.ds[xi];
    } else {
        *o += s.0 * h0 - s.0 * zoff.0 * qx.ds2[2 * xi];
        *o += s.1 * h1 - s.1 * zoff.1 * qx.ds2[2 * xi + 1];
    }
}

/// The two halves' integer sums of block `b` against token `tt`'s block `j` of digit `xq`.
///
/// # Safety
/// `xq` holds `[tt·K + 32j, +32)` of a `[T, K]` digit; with `DOT`, a CPU with FEAT_DotProd.
#[inline(always)]
unsafe fn sums<const DOT: bool>(b: &Block, xq: &[i8], at: usize) -> [i32; 2] {
    // SAFETY: the caller's contract.
    unsafe {
        let xp = xq.as_ptr().add(at);
        [
            dot16::<DOT>(b.c[0], vld1q_s8(xp)),
            dot16::<DOT>(b.c[1], vld1q_s8(xp.add(16))),
        ]
    }
}

/// The halves' integer sums of block `b` against both digits of `qx` at `at` (the second `[0; 2]`
/// when `qx` has one digit).
///
/// # Safety
/// As [`sums`].
#[inline(always)]
unsafe fn digit_sums<const DOT: bool>(b: &Block, qx: &QuantX, at: usize) -> [[i32; 2]; 2] {
    // SAFETY: the caller's contract.
    unsafe {
        let one = sums::<DOT>(b, &qx.q, at);
        let two = if qx.q2.is_empty() {
            [0; 2]
        } else {
            sums::<DOT>(b, &qx.q2, at)
        };
        [one, two]
    }
}

/// The body of [`rows`] and [`rows_dot`].
///
/// # Safety
/// As [`rows`]; with `DOT`, a CPU with FEAT_DotProd.
#[inline(always)]
unsafe fn rows_with<const DOT: bool>(
    w: &Weights,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let k = w.k();
    let nb = k / BLOCK;
    for (i, row) in rows.enumerate() {
        let o = &mut out[i * t..(i + 1) * t];
        o.fill(0.0);
        for j in 0..nb {
            // SAFETY: the caller's contract.
            let Some(b) = (unsafe { block(w, row * nb + j) }) else {
                return;
            };
            for (tt, o) in o.iter_mut().enumerate() {
                // SAFETY: `qx` is [T, K] (the caller's contract).
                let [one, two] = unsafe { digit_sums::<DOT>(&b, qx, tt * k + j * BLOCK) };
                add_block(o, &b, qx, tt * nb + j, one, two);
            }
        }
    }
}

/// `acc + A·Bᵀ` for the 2×8 i8 matrices `a` and `b` (row-major halves): lanes `[a₀·b₀, a₀·b₁,
/// a₁·b₀, a₁·b₁]` (`smmla`).
///
/// # Safety
/// A CPU with FEAT_I8MM.
#[target_feature(enable = "neon,i8mm")]
#[inline]
unsafe fn smmla(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: a register-only instruction the function's features enable.
    unsafe {
        std::arch::asm!(
            "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// Pairs the 8-byte chunks of `p` and `q` (16 bytes each): `[p₀ q₀]`, `[p₁ q₁]` as 2×8 matrices.
#[inline(always)]
fn pair(p: int8x16_t, q: int8x16_t) -> [int8x16_t; 2] {
    // SAFETY: NEON is baseline on aarch64.
    unsafe {
        let (p, q) = (vreinterpretq_s64_s8(p), vreinterpretq_s64_s8(q));
        [
            vreinterpretq_s8_s64(vzip1q_s64(p, q)),
            vreinterpretq_s8_s64(vzip2q_s64(p, q)),
        ]
    }
}

/// A 2 rows × 2 tokens tile's halves' integer sums against one digit: `[row][token][half]`.
///
/// # Safety
/// `xq` holds tokens `tt`, `tt + 1` of a `[T, K]` digit, `at` token `tt`'s block; a CPU with
/// FEAT_I8MM.
#[inline(always)]
unsafe fn tile_sums(a: [&Block; 2], xq: &[i8], at: usize, k: usize) -> [[[i32; 2]; 2]; 2] {
    // SAFETY: the caller's contract.
    unsafe {
        let xp = xq.as_ptr().add(at);
        // Half `h`'s four sums, lanes [row·2 + token].
        let half = |h: usize| {
            let wa = pair(a[0].c[h], a[1].c[h]);
            let xb = pair(vld1q_s8(xp.add(16 * h)), vld1q_s8(xp.add(k + 16 * h)));
            let m = smmla(smmla(vdupq_n_s32(0), wa[0], xb[0]), wa[1], xb[1]);
            let mut lanes = [0i32; 4];
            vst1q_s32(lanes.as_mut_ptr(), m);
            lanes
        };
        let mut out = [[[0; 2]; 2]; 2];
        for (lane, (h0, h1)) in half(0).into_iter().zip(half(1)).enumerate() {
            out[lane / 2][lane % 2] = [h0, h1];
        }
        out
    }
}

/// Integer rows with `smmla` (FEAT_I8MM): two weight rows against two tokens a tile, each 8-byte
/// chunk pair one instruction (four dot products of 8, where `sdot` takes one of 16 per lane
/// group: twice the work an instruction). Decode (one token) and the odd row or token go through
/// [`rows_dot`]'s `sdot`; every term ends in the same [`add_block`], so the result equals
/// [`rows`]' bit for bit.
///
/// # Safety
/// As [`rows`], on a CPU with FEAT_DotProd and FEAT_I8MM.
#[target_feature(enable = "neon,dotprod,i8mm")]
pub(super) unsafe fn rows_mm(
    w: &Weights,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    if matches!(*w, Weights::Packed { .. }) {
        // SAFETY: the caller's contract; this function has dotprod.
        return unsafe { packed_rows(w, qx, t, rows, out) };
    }
    let (k, start) = (w.k(), rows.start);
    let nb = k / BLOCK;
    let two = !qx.q2.is_empty();
    let pairs = if t >= 2 { rows.len() / 2 } else { 0 };
    for p in 0..pairs {
        let r = start + 2 * p;
        let o = &mut out[2 * p * t..(2 * p + 2) * t];
        o.fill(0.0);
        for j in 0..nb {
            // SAFETY: the caller's contract.
            let (Some(b0), Some(b1)) =
                (unsafe { (block(w, r * nb + j), block(w, (r + 1) * nb + j)) })
            else {
                return;
            };
            let a = [&b0, &b1];
            let mut tt = 0;
            while tt + 2 <= t {
                let at = tt * k + j * BLOCK;
                // SAFETY: tokens tt and tt + 1 are rows of `qx` (the caller's contract).
                let (one, second) = unsafe {
                    let one = tile_sums(a, &qx.q, at, k);
                    let z = [[[0; 2]; 2]; 2];
                    (one, if two { tile_sums(a, &qx.q2, at, k) } else { z })
                };
                for (ri, b) in a.into_iter().enumerate() {
                    for ti in 0..2 {
                        let o = &mut o[ri * t + tt + ti];
                        add_block(o, b, qx, (tt + ti) * nb + j, one[ri][ti], second[ri][ti]);
                    }
                }
                tt += 2;
            }
            if tt < t {
                let at = tt * k + j * BLOCK;
                for (ri, b) in a.into_iter().enumerate() {
                    // SAFETY: token tt is a row of `qx`; this function has dotprod.
                    let [one, two] = unsafe { digit_sums::<true>(b, qx, at) };
                    add_block(&mut o[ri * t + tt], b, qx, tt * nb + j, one, two);
                }
            }
        }
    }
    let done = 2 * pairs;
    // SAFETY: the caller's contract; this function has dotprod.
    unsafe { rows_with::<true>(w, qx, t, start + done..rows.end, &mut out[done * t..]) }
}

// -----------------------------------------------------------------------------------------------
// Packed tiles
// -----------------------------------------------------------------------------------------------

/// Rows of a quarter tile: one i32 lane of a 128-bit register each (a tile's 64-byte group is
/// four registers: rows 0–3, 4–7, 8–11 and 12–15).
const QUARTER_ROWS: usize = TILE_ROWS / 4;

/// Token rows multiplied per weight register with one activation digit; with two, half as many,
/// so that the integer sums of a whole tile stay in registers.
const TOKENS: usize = 4;

/// Four f16 at `p` as f32 (`fcvtl`, baseline on aarch64; its intrinsic takes an unstable type).
///
/// # Safety
/// `p` points at 4 readable u16.
#[inline(always)]
unsafe fn f16x4(p: *const u16) -> float32x4_t {
    // SAFETY: 8 bytes at p (the caller's contract); `fcvtl` is a register-only instruction.
    unsafe {
        let h = vld1_s16(p as *const i16);
        let f: float32x4_t;
        std::arch::asm!(
            "fcvtl {f:v}.4s, {h:v}.4h",
            f = lateout(vreg) f,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags)
        );
        f
    }
}

/// Entries `at..at + 4` of `v` (f16 or f32) as f32.
///
/// # Safety
/// The 4 entries are inside `v`'s buffer.
#[inline(always)]
unsafe fn floats4(v: TileFloats, at: usize) -> float32x4_t {
    // SAFETY: the caller's contract.
    unsafe {
        if v.wide {
            vld1q_f32((v.ptr as *const f32).add(at))
        } else {
            f16x4((v.ptr as *const u16).add(at))
        }
    }
}

/// The codes of groups `2j` and `2j + 1` (j in 0..4) of tile-block `sb` for the tile's rows
/// `4q..4q + 4`, as i8 (8 bits: `q − 128`): byte `4·r + e` of group g's register is code
/// `4g + e` of row `4q + r`.
///
/// # Safety
/// `sb` inside the validated buffers; `q` in 0..4.
#[inline(always)]
unsafe fn group_pair<const BITS: u32>(f: &Tiles, sb: usize, q: usize, j: usize) -> [int8x16_t; 2] {
    // SAFETY: reads inside tile-block `sb`: the quarter's 16 bytes of 64-byte registers of its
    // packed_block_bytes(BITS) code bytes (and `fifth`'s reads).
    unsafe {
        let base = f.codes.add(sb * packed_block_bytes(BITS) + 16 * q);
        if BITS == 8 {
            let p = base.add(2 * j * 64);
            let flip = vdupq_n_u8(0x80);
            return [
                vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p), flip)),
                vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p.add(64)), flip)),
            ];
        }
        // Register j: group 2j in the low nibbles, 2j + 1 in the high ones.
        let v = vld1q_u8(base.add(j * 64));
        let mut c = [vandq_u8(v, vdupq_n_u8(15)), vshrq_n_u8::<4>(v)];
        if BITS == 5 {
            for (i, c) in c.iter_mut().enumerate() {
                *c = vorrq_u8(*c, fifth(f, sb, q, 2 * j + i));
            }
        }
        [vreinterpretq_s8_u8(c[0]), vreinterpretq_s8_u8(c[1])]
    }
}

/// The fifth bits of group `g` of tile-block `sb` for the tile's rows `4q..4q + 4`: 16 in byte
/// `4·r + e` where code `4g + e` of row `4q + r` has it, else 0.
///
/// # Safety
/// `sb` inside the validated buffers of a 5-bit matrix; `q` in 0..4.
#[inline(always)]
unsafe fn fifth(f: &Tiles, sb: usize, q: usize, g: usize) -> uint8x16_t {
    // SAFETY: the quarter's 2 bytes of word g of tile-block `sb`'s 64 high bytes.
    let bits = unsafe { (f.high.add(sb * 64 + g * 8 + 2 * q) as *const u16).read_unaligned() };
    // Bit `4r + e` of the quarter's u16 is the fifth bit of code e of row 4q + r: byte i takes
    // byte i/8 of the u16, keeps bit i % 8, and becomes 16 where that bit is set.
    let [lo, hi] = bits.to_le_bytes();
    let spread = vcombine_u8(vdup_n_u8(lo), vdup_n_u8(hi));
    let pick = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
    vandq_u8(vtstq_u8(spread, pick), vdupq_n_u8(16))
}

/// The integer sums of tile-block `sb`'s `Q` quarters from `q0` (rows `4·q0..4·(q0 + Q)`, a lane
/// each) with `R` token rows: `[r][digit][quarter]`, the second digit's zero unless `X2`.
/// `xs[digit][r]` points at token r's 32-byte block in that digit, whose bytes `4g..4g + 4` are
/// broadcast for group g. Each lane adds 32 products of |code| ≤ 128 and |x| ≤ 127: exact in i32.
///
/// # Safety
/// A CPU with FEAT_DotProd; `sb` inside the validated buffers; `q0 + Q ≤ 4`; `xs` (the second
/// digit with `X2`) each hold 32 bytes.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn block_sums<const BITS: u32, const X2: bool, const R: usize, const Q: usize>(
    f: &Tiles,
    (sb, q0): (usize, usize),
    xs: [[*const i8; R]; 2],
) -> [[[int32x4_t; Q]; 2]; R] {
    let digits = if X2 { 2 } else { 1 };
    let mut sum = [[[vdupq_n_s32(0); Q]; 2]; R];
    for j in 0..4 {
        let mut c = [[vdupq_n_s8(0); 2]; Q];
        for (i, c) in c.iter_mut().enumerate() {
            // SAFETY: the caller's contract.
            *c = unsafe { group_pair::<BITS>(f, sb, q0 + i, j) };
        }
        for h in 0..2 {
            let g = 2 * j + h;
            for (r, sum) in sum.iter_mut().enumerate() {
                for (sum, x) in sum.iter_mut().zip(xs).take(digits) {
                    // SAFETY: bytes 4g..4g + 4 of the token's 32-byte block (g < 8).
                    let x4 = unsafe { (x[r].add(4 * g) as *const i32).read_unaligned() };
                    let x4 = vreinterpretq_s8_s32(vdupq_n_s32(x4));
                    for (s, c) in sum.iter_mut().zip(&c) {
                        // SAFETY: this function has dotprod.
                        *s = unsafe { sdot(*s, c[h], x4) };
                    }
                }
            }
        }
    }
    sum
}

/// `Q` quarters of tile `tile` from quarter `q0` (a lane a row) times `R` token rows of `qx` from
/// `x0`: each block's integer sums ([`block_sums`]) meet the block's scales in one multiply-add,
/// its zero-point term in another.
///
/// # Safety
/// A CPU with FEAT_DotProd; `tile` inside the validated matrix; `q0 + Q ≤ 4`; `qx` holds
/// ≥ `x0 + R` rows.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn packed_span<const BITS: u32, const X2: bool, const R: usize, const Q: usize>(
    f: &Tiles,
    (tile, q0): (usize, usize),
    qx: &QuantX,
    x0: usize,
) -> [[float32x4_t; Q]; R] {
    let (nb, k) = (f.nb, f.nb * BLOCK);
    let mut acc = [[vdupq_n_f32(0.0); Q]; R];
    // SAFETY: tile-blocks tile·nb + b are inside the buffers (their scales and zero terms at
    // sb·16 + 4·q, 4 each); the qx reads are rows x0..x0 + R of [T, K] and [T, nb].
    unsafe {
        for b in 0..nb {
            let sb = tile * nb + b;
            // Scales; the zero-point term of the codes as multiplied (8 bits: s·z − 128·s).
            let (mut s, mut sz) = ([vdupq_n_f32(0.0); Q], [vdupq_n_f32(0.0); Q]);
            for (i, (s, sz)) in s.iter_mut().zip(&mut sz).enumerate() {
                let at = sb * TILE_ROWS + QUARTER_ROWS * (q0 + i);
                *s = floats4(f.scales, at);
                *sz = match f.zero {
                    TileZero::Const(z) => vmulq_n_f32(*s, z),
                    TileZero::Scaled(p) if BITS == 8 => vfmsq_n_f32(floats4(p, at), *s, 128.0),
                    TileZero::Scaled(p) => floats4(p, at),
                };
            }
            let e = |r: usize| (x0 + r) * k + b * BLOCK;
            let x: [*const i8; R] = std::array::from_fn(|r| qx.q.as_ptr().add(e(r)));
            let x2 = if X2 {
                std::array::from_fn(|r| qx.q2.as_ptr().add(e(r)))
            } else {
                x
            };
            let sums = block_sums::<BITS, X2, R, Q>(f, (sb, q0), [x, x2]);
            for (r, (a, [one, two])) in acc.iter_mut().zip(sums).enumerate() {
                let xi = (x0 + r) * nb + b;
                let d = if X2 {
                    qx.d2.get_unchecked(xi)
                } else {
                    qx.d.get_unchecked(xi)
                };
                let d = *d;
                let ds = *qx.ds.get_unchecked(xi);
                for (i, a) in a.iter_mut().enumerate() {
                    // Two digits meet one factor: d₂·(254·Σc·q + Σc·q₂) (`d₂ = d/254`).
                    let sum = if X2 {
                        vmlaq_n_s32(two[i], one[i], 254)
                    } else {
                        one[i]
                    };
                    *a = vfmaq_f32(*a, vcvtq_f32_s32(sum), vmulq_n_f32(s[i], d));
                    *a = vfmsq_n_f32(*a, sz[i], ds);
                }
            }
        }
    }
    acc
}

/// Writes [`packed_span`]'s lanes for token rows `tt..tt + R` (of `t`) whose rows, from `first`,
/// fall inside `rows`: `out[(row − start)·T + t]`.
fn put<const Q: usize, const R: usize>(
    acc: &[[float32x4_t; Q]; R],
    first: usize,
    rows: &std::ops::Range<usize>,
    (tt, t): (usize, usize),
    out: &mut [f32],
) {
    let mut lanes = [0f32; TILE_ROWS];
    let span = first.max(rows.start)..(first + Q * QUARTER_ROWS).min(rows.end);
    for (r, a) in acc.iter().enumerate() {
        for (l, a) in lanes.chunks_exact_mut(QUARTER_ROWS).zip(a) {
            // SAFETY: 4 f32 into a 4-element chunk.
            unsafe { vst1q_f32(l.as_mut_ptr(), *a) };
        }
        for row in span.clone() {
            out[(row - rows.start) * t + tt + r] = lanes[row - first];
        }
    }
}

/// Token rows `tt..tt + R` times the tiles covering `rows`: a tile `rows` covers whole at once,
/// a tile it starts or ends inside (a linear group's members, the padded last tile) a quarter
/// at a time. Each lane's result is the same either way.
///
/// # Safety
/// As [`rows`], on a CPU with FEAT_DotProd; `tt + R ≤ T`.
#[target_feature(enable = "neon,dotprod")]
unsafe fn packed_tokens<const BITS: u32, const X2: bool, const R: usize>(
    f: &Tiles,
    qx: &QuantX,
    (tt, t): (usize, usize),
    rows: &std::ops::Range<usize>,
    out: &mut [f32],
) {
    for tile in rows.start / TILE_ROWS..rows.end.div_ceil(TILE_ROWS) {
        let first = tile * TILE_ROWS;
        // SAFETY: forwarded contract; the tile and its quarters are inside the matrix.
        unsafe {
            if rows.start <= first && first + TILE_ROWS <= rows.end {
                let acc = packed_span::<BITS, X2, R, 4>(f, (tile, 0), qx, tt);
                put(&acc, first, rows, (tt, t), out);
                continue;
            }
            let from = rows.start.max(first) / QUARTER_ROWS;
            let to = rows.end.min(first + TILE_ROWS).div_ceil(QUARTER_ROWS);
            for q in from..to {
                let acc = packed_span::<BITS, X2, R, 1>(f, (tile, q % 4), qx, tt);
                put(&acc, q * QUARTER_ROWS, rows, (tt, t), out);
            }
        }
    }
}

/// [`packed_tokens`] over all T token rows: tiles of `R`, then one.
///
/// # Safety
/// As [`rows`], on a CPU with FEAT_DotProd.
#[target_feature(enable = "neon,dotprod")]
unsafe fn packed_rows_of<const BITS: u32, const X2: bool, const R: usize>(
    f: &Tiles,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let mut tt = 0;
    // SAFETY: forwarded contract; tt + R <= T (tt + 1 <= T).
    unsafe {
        while tt + R <= t {
            packed_tokens::<BITS, X2, R>(f, qx, (tt, t), &rows, out);
            tt += R;
        }
        while tt < t {
            packed_tokens::<BITS, X2, 1>(f, qx, (tt, t), &rows, out);
            tt += 1;
        }
    }
}

/// Integer rows of a [`Weights::Packed`] with `sdot`: `out[(row − start)·T + t]`.
///
/// # Safety
/// As [`rows`], on a CPU with FEAT_DotProd.
#[target_feature(enable = "neon,dotprod")]
unsafe fn packed_rows(
    w: &Weights,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let Some(f) = Tiles::of(w, true) else {
        return;
    };
    const T2: usize = TOKENS / 2;
    let x2 = !qx.q2.is_empty();
    // SAFETY: forwarded contract.
    unsafe {
        match (f.bits, x2) {
            (4, true) => packed_rows_of::<4, true, T2>(&f, qx, t, rows, out),
            (4, false) => packed_rows_of::<4, false, TOKENS>(&f, qx, t, rows, out),
            (5, true) => packed_rows_of::<5, true, T2>(&f, qx, t, rows, out),
            (5, false) => packed_rows_of::<5, false, TOKENS>(&f, qx, t, rows, out),
            (_, true) => packed_rows_of::<8, true, T2>(&f, qx, t, rows, out),
            (_, false) => packed_rows_of::<8, false, TOKENS>(&f, qx, t, rows, out),
        }
    }
}
