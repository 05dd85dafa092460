//! The integer path of the 4- and 8-bit block linears ([`Precision::Fast`](super::linear::Precision)):
//! activations quantized per 32-block to int8 once, block dot products in integers.
//!
//! Per token row and 32-block `b` of `x`: `d_b = amax_b / 127`, `qx_i = round(x_i / d_b)` (as
//! llama.cpp's q8 activations), and `ds_b = d_b · Σ qx_i`. A weight row with codes `q` (4-bit nibbles
//! or 8-bit bytes, both unsigned), scales `s_b` and zero points `z_b` then gives
//!
//! ```text
//! y = Σ_b s_b·d_b·Σ_i q_i·qx_i  −  Σ_b s_b·z_b·ds_b   ( = Σ_b Σ_i s_b(q_i − z_b) · d_b·qx_i )
//! ```
//!
//! which is the exact product of the dequantized weights with the dequantized activations, up to f32
//! rounding: the error against exact math is `Σ w_i·(d_b·qx_i − x_i)`, at most `Σ_b (d_b/2)·Σ|w_i|`
//! (tested as a hard bound). The inner sums `Σ q_i·qx_i` are exact in i32.
//!
//! Instruction sets ([`QIsa`], chosen at run time from the CPU's features, tests force each one):
//! - **AVX-512 VNNI** (`vpdpbusd`: u8 × i8, four products summed into each i32 lane): two blocks a
//!   512-bit register, the 4-bit codes unpacked to bytes in natural order by a widening move, a shift
//!   and a blend; the per-block factors `s·d` spread over the lanes by one permute.
//! - **AVX2** (`vpmaddubsw` + `vpmaddwd`): one block a 256-bit register. `maddubs` saturates its i16
//!   pair sums, so 8-bit codes run as `q − 128` with `x` taking their sign (`vpsignb`), the zero point
//!   corrected by `z − 128`. The packed tiles below too, a tile's 64-byte group as two registers.
//! - **NEON dotprod** on aarch64 (`sdot`: i8 × i8, four products summed into each i32 lane; ARMv8.2's
//!   optional dot product, on every phone core since the Cortex-A75/A55): 16 bytes an instruction, 8-bit
//!   codes as `q − 128` as below. With FEAT_I8MM too (`smmla`: a 2×8 by 8×2 i8 matrix product into
//!   four i32 lanes), prompts run in tiles of 2 weight rows × 2 tokens: twice the products an
//!   instruction. Both through inline `asm!`: their intrinsics are not stable Rust yet. Both read
//!   the packed tiles too (below), with one `sdot` kernel.
//! - **NEON** on aarch64 without it (widening `smull`/`smlal`, pairwise adds), and portable scalar
//!   elsewhere.
//!
//! The activations are in natural element order for every instruction set, so one [`QuantX`] serves
//! every linear that reads the same input.
//!
//! **Packed tiles** ([`Weights::Packed`], made at load by `repack.rs` where [`QIsa::packs`]: AVX-512
//! VNNI, AVX2, NEON dotprod and NEON i8mm): 16 weight rows interleaved so that one 64-byte register holds four consecutive
//! codes of each row. Each token's four activation bytes are broadcast, so `vpdpbusd` sums a row's
//! products in its own i32 lane: a block's eight groups accumulate in integers, then meet the
//! block's 16 scales in one conversion and one multiply-add. The row-major forms above pay that
//! float work every 64 bytes, which bounds prompt products; the tiles pay it every 512 (8-bit codes)
//! and share each weight register among four tokens. AVX2 takes a tile as two halves of 8 rows (a
//! 256-bit register of each group): `maddubs` + `madd` in place of `vpdpbusd`, 4- and 5-bit codes
//! adding their i16 pair sums over eight and four groups before widening (below saturation), 8-bit
//! codes as `q − 128` as in its row-major path; 4- and 5-bit products equal AVX-512's bit for bit.
//! NEON dotprod (and i8mm, which runs the same kernel) takes a tile as four quarters of 4 rows (a
//! 128-bit register of each group): each token's four bytes duplicated across the lanes, `sdot`
//! (signed × signed) sums a row's products in its lane, exact in i32; 4- and 5-bit codes are valid
//! i8 as they are, 8-bit codes run as `q − 128` with the zero-point term `s·z − 128·s`. A tile the
//! task's rows cover whole runs its four quarters at once, one they start or end inside a quarter
//! at a time; the scales convert by `fcvtl`. Token rows go four at a time (two with two-digit
//! activations, so a tile's integer sums stay in registers), then one. Not timed on a phone yet.
//!
//! 8-bit weights with a scale and zero point per 16-element half ([`Weights::Q8`] `halves`, GGUF
//! Q6_K's form) keep the 32-blocks of `x`: each half's integer sum is taken apart (the lanes
//! `vpdpbusd`/`maddubs` sum a half into are that half's alone) and meets its own `s·d`, and the
//! zero-point term reads `d · Σ qx` per half ([`QuantX::ds2`]).

use super::linear::{Weights, BLOCK};

/// The instruction set of the integer dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QIsa {
    /// Portable Rust.
    Scalar,
    /// x86-64 AVX2 (`maddubs`).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// x86-64 AVX-512 F/BW/VL with VNNI (`vpdpbusd` on 512-bit registers).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// aarch64 Advanced SIMD.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// aarch64 Advanced SIMD with the dot product extension (`sdot`, FEAT_DotProd).
    #[cfg(target_arch = "aarch64")]
    NeonDot,
    /// aarch64 with the dot product and the int8 matrix multiply (`smmla`, FEAT_I8MM) extensions.
    #[cfg(target_arch = "aarch64")]
    NeonI8mm,
}

impl QIsa {
    /// Its name in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            QIsa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            QIsa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            QIsa::Avx512Vnni => "avx512-vnni",
            #[cfg(target_arch = "aarch64")]
            QIsa::Neon => "neon",
            #[cfg(target_arch = "aarch64")]
            QIsa::NeonDot => "neon-dotprod",
            #[cfg(target_arch = "aarch64")]
            QIsa::NeonI8mm => "neon-i8mm",
        }
    }
}

impl QIsa {
    /// Whether its kernels read [`Weights::Packed`]: AVX-512 VNNI, AVX2 and the NEON dot product
    /// ones (NeonDot, NeonI8mm) — the load-time repack, `repack.rs`, is made only then; plain NEON
    /// and Scalar read the file's own forms.
    pub(crate) fn packs(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(self, QIsa::Avx512Vnni | QIsa::Avx2)
        }
        #[cfg(target_arch = "aarch64")]
        {
            matches!(self, QIsa::NeonDot | QIsa::NeonI8mm)
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            false
        }
    }
}

/// Every integer instruction set this CPU can run, best last.
pub(crate) fn available() -> Vec<QIsa> {
    #[allow(unused_mut)]
    let mut v = vec![QIsa::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            v.push(QIsa::Avx2);
        }
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
        {
            v.push(QIsa::Avx512Vnni);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        v.push(QIsa::Neon);
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            v.push(QIsa::NeonDot);
            if std::arch::is_aarch64_feature_detected!("i8mm") {
                v.push(QIsa::NeonI8mm);
            }
        }
    }
    v
}

/// The best integer instruction set of this CPU (detected once).
pub(crate) fn best() -> QIsa {
    static BEST: std::sync::OnceLock<QIsa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| *available().last().unwrap_or(&QIsa::Scalar))
}

/// Activations `[T, K]` quantized per 32-block (natural element order), in one int8 digit or two.
#[derive(Debug, Clone, Default)]
pub(crate) struct QuantX {
    /// i8 `[T, K]`.
    pub(crate) q: Vec<i8>,
    /// Block scales `[T, K/32]` (`amax/127`).
    pub(crate) d: Vec<f32>,
    /// The second digit (empty for one): i8 `[T, K]`, `round((x − d·q)/d₂)`.
    pub(crate) q2: Vec<i8>,
    /// The second digit's scales `d₂ = d/254` `[T, K/32]` (empty for one digit): the first digit's
    /// remainder is within `±d/2`, so `q₂` spans ±127.
    pub(crate) d2: Vec<f32>,
    /// `d · Σ q (+ d₂ · Σ q₂)` per block `[T, K/32]`: the zero-point term's factor.
    pub(crate) ds: Vec<f32>,
    /// `d · Σ q (+ d₂ · Σ q₂)` per 16-element half `[T, K/16]`: the zero-point term's factor for
    /// weights with a zero point per half ([`Weights::Q8`] with `halves`).
    pub(crate) ds2: Vec<f32>,
}

impl QuantX {
    /// Quantizes `x` (`K % 32 == 0`; a tail shorter than a block is ignored — callers validate `K`),
    /// in two digits when `two`. Values round to nearest, ties to even, on every instruction set.
    pub(crate) fn new(x: &[f32], two: bool) -> QuantX {
        let nblk = x.len() / BLOCK;
        let mut qx = QuantX {
            q: vec![0i8; nblk * BLOCK],
            d: vec![0f32; nblk],
            ds: vec![0f32; nblk],
            ds2: vec![0f32; 2 * nblk],
            ..QuantX::default()
        };
        qx.first_digit(x);
        if two {
            qx.second_digit(x);
        }
        qx.half_sums();
        qx
    }

    /// The first digit, with AVX2 where the CPU has it.
    fn first_digit(&mut self, x: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if best() != QIsa::Scalar {
            // SAFETY: every x86 integer ISA above Scalar has avx2 (checked by `available`).
            unsafe { avx2::quantize(x, self) };
            return;
        }
        self.quantize_scalar(x);
    }

    /// Adds the second digit: the remainder of each value after the first, in steps of `d/254`;
    /// [`QuantX::ds`] becomes the two digits' block sum.
    fn second_digit(&mut self, x: &[f32]) {
        self.q2 = vec![0i8; self.q.len()];
        self.d2 = self.d.iter().map(|d| d / 254.0).collect();
        #[cfg(target_arch = "x86_64")]
        if best() != QIsa::Scalar {
            // SAFETY: every x86 integer ISA above Scalar has avx2 (checked by `available`).
            unsafe { self.second_digit_avx2(x) };
            return;
        }
        self.second_digit_body(x);
    }

    /// [`QuantX::second_digit`]'s loop compiled for AVX2 (the rounding becomes `vroundps`, not a call
    /// to `rintf` per value; the same values: no operation is contracted or reordered).
    ///
    /// # Safety
    /// The CPU must support avx2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn second_digit_avx2(&mut self, x: &[f32]) {
        self.second_digit_body(x)
    }

    #[inline(always)]
    fn second_digit_body(&mut self, x: &[f32]) {
        for (b, ((xb, qb), q2b)) in x
            .chunks_exact(BLOCK)
            .zip(self.q.chunks_exact(BLOCK))
            .zip(self.q2.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let (d, d2) = (self.d[b], self.d2[b]);
            let inv = if d2 > 0.0 { 1.0 / d2 } else { 0.0 };
            let mut sum2 = 0i32;
            for ((v, q), q2) in xb.iter().zip(qb).zip(q2b.iter_mut()) {
                let r = v - d * *q as f32;
                *q2 = (r * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
                sum2 += *q2 as i32;
            }
            self.ds[b] += d2 * sum2 as f32;
        }
    }

    /// Fills [`QuantX::ds2`] from the quantized values (a pass over `T·K` bytes, small beside any
    /// linear that reads them).
    fn half_sums(&mut self) {
        for (i, (h, ds2)) in self
            .q
            .chunks_exact(BLOCK / 2)
            .zip(&mut self.ds2)
            .enumerate()
        {
            let sum: i32 = h.iter().map(|&v| v as i32).sum();
            *ds2 = self.d[i / 2] * sum as f32;
            if let Some(h2) = self.q2.get(i * BLOCK / 2..(i + 1) * BLOCK / 2) {
                let sum2: i32 = h2.iter().map(|&v| v as i32).sum();
                *ds2 += self.d2[i / 2] * sum2 as f32;
            }
        }
    }

    /// The portable body of [`QuantX::new`].
    fn quantize_scalar(&mut self, x: &[f32]) {
        let qx = self;
        for (b, (xb, qb)) in x
            .chunks_exact(BLOCK)
            .zip(qx.q.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qb.iter_mut().zip(xb) {
                *q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
                sum += *q as i32;
            }
            qx.d[b] = d;
            qx.ds[b] = d * sum as f32;
        }
    }
}

/// Rows `rows` of `W · qx` for the T token rows of `qx`: writes `out[(row − start)·T + t]`.
/// Other weight forms than Q4/Q8 leave `out` untouched (callers route only those here).
///
/// # Panics
/// Never for validated inputs: `w` validated, `qx` quantized from `[T, K]`, `out.len() == rows.len()·T`.
pub(crate) fn rows(
    w: &Weights,
    qx: &QuantX,
    t: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    isa: QIsa,
) {
    if matches!(w, Weights::Packed { .. }) && !isa.packs() {
        // Packed forms are made only where `isa.packs()`; elsewhere (tests) the portable path.
        return rows_scalar(w, qx, t, rows, out);
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx512Vnni is only produced by `available` after detecting avx512f/bw/vl/vnni.
        QIsa::Avx512Vnni => unsafe { avx512::rows(w, qx, t, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 is only produced by `available` after detecting avx2, fma and f16c.
        QIsa::Avx2 => unsafe { avx2::rows(w, qx, t, rows, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is baseline on aarch64.
        QIsa::Neon => unsafe { neon::rows(w, qx, t, rows, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NeonDot is only produced by `available` after detecting dotprod.
        QIsa::NeonDot => unsafe { neon::rows_dot(w, qx, t, rows, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NeonI8mm is only produced by `available` after detecting dotprod and i8mm.
        QIsa::NeonI8mm => unsafe { neon::rows_mm(w, qx, t, rows, out) },
        QIsa::Scalar => rows_scalar(w, qx, t, rows, out),
    }
}

/// The scale `s` and zero-point term `s·z` of one block, or of each 16-element half of it.
enum Factors {
    /// One for the block.
    Whole(f32, f32),
    /// One per half.
    Halves([(f32, f32); 2]),
}

/// One weight row's block codes and factors at block `blk`.
#[inline]
fn block(w: &Weights, blk: usize, codes: &mut [i32; BLOCK]) -> Option<Factors> {
    match *w {
        Weights::Q4 {
            b, scales, zeros, ..
        } => {
            for (i, byte) in b[blk * 16..blk * 16 + 16].iter().enumerate() {
                codes[2 * i] = (byte & 15) as i32;
                codes[2 * i + 1] = (byte >> 4) as i32;
            }
            Some(Factors::Whole(scales[blk], scales[blk] * zeros[blk]))
        }
        Weights::Q8 {
            b,
            scales,
            zeros,
            halves,
            ..
        } => {
            for (q, byte) in codes.iter_mut().zip(&b[blk * 32..blk * 32 + 32]) {
                *q = *byte as i32;
            }
            let sz = |i: usize| (scales[i], scales[i] * zeros[i] as f32);
            Some(if halves {
                Factors::Halves([sz(2 * blk), sz(2 * blk + 1)])
            } else {
                let (s, sz) = sz(blk);
                Factors::Whole(s, sz)
            })
        }
        Weights::Packed {
            scales, zero, k, ..
        } => {
            let nb = k / BLOCK;
            let (row, col) = (blk / nb, (blk % nb) * BLOCK);
            let mut at = 0;
            for (i, q) in codes.iter_mut().enumerate() {
                let (code, sb) = w.packed_code(row, col + i);
                (*q, at) = (code as i32, sb);
            }
            let s = scales[at].to_f32();
            Some(Factors::Whole(s, zero.sz(at, s)))
        }
        _ => None,
    }
}

/// Portable integer path.
fn rows_scalar(w: &Weights, qx: &QuantX, t: usize, rows: std::ops::Range<usize>, out: &mut [f32]) {
    let k = w.k();
    let nb = k / BLOCK;
    let mut codes = [0i32; BLOCK];
    for (i, row) in rows.enumerate() {
        let o = &mut out[i * t..(i + 1) * t];
        o.fill(0.0);
        for j in 0..nb {
            let blk = row * nb + j;
            let Some(factors) = block(w, blk, &mut codes) else {
                return;
            };
            for (tt, o) in o.iter_mut().enumerate() {
                let at = tt * k + j * BLOCK..tt * k + (j + 1) * BLOCK;
                let (xb, xb2) = (&qx.q[at.clone()], qx.q2.get(at));
                let xi = tt * nb + j;
                // Σ codes·x over elements `h`, each digit weighed by its scale.
                let dot = |h: std::ops::Range<usize>| -> f32 {
                    let one = |xq: &[i8]| -> f32 {
                        let d: i32 = codes[h.clone()]
                            .iter()
                            .zip(&xq[h.clone()])
                            .map(|(a, b)| a * *b as i32)
                            .sum();
                        d as f32
                    };
                    match xb2 {
                        None => qx.d[xi] * one(xb),
                        Some(xb2) => qx.d[xi] * one(xb) + qx.d2[xi] * one(xb2),
                    }
                };
                match factors {
                    Factors::Whole(s, sz) => {
                        *o += s * dot(0..BLOCK) - sz * qx.ds[xi];
                    }
                    Factors::Halves([(s0, sz0), (s1, sz1)]) => {
                        *o += s0 * dot(0..16) - sz0 * qx.ds2[2 * xi];
                        *o += s1 * dot(16..BLOCK) - sz1 * qx.ds2[2 * xi + 1];
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// AVX-512 VNNI
// ---------------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{QuantX, Weights, BLOCK};
    use crate::backend::cpu::linear::{packed_block_bytes, PackedZero, TILE_ROWS};
    use std::arch::x86_64::*;

    /// Token rows multiplied per decoded weight pair in the GEMM path.
    const TILE: usize = 4;

    /// A packed matrix's zero-point term ([`PackedZero`]) as a raw pointer.
    #[derive(Clone, Copy)]
    enum TileZero {
        Const(f32),
        Scaled(*const u16),
    }

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
                    *a = _mm512_fnmadd_ps(
                        sz,
                        _mm512_maskz_loadu_ps(m, dsp.add((x0 + r) * ns + g)),
                        *a,
                    );
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
                            let xq =
                                _mm512_loadu_si512(q2p.add((x0 + r) * k + e) as *const __m512i);
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
                            qp.add((x0 + r) * k + e) as *const __m256i,
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

    /// A [`Weights::Packed`] as raw pointers.
    #[derive(Clone, Copy)]
    struct Tiles {
        codes: *const u8,
        high: *const u8,
        scales: *const u16,
        zero: TileZero,
        /// 32-blocks a row.
        nb: usize,
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
                let half = |p: *const u16| {
                    _mm512_cvtph_ps(_mm256_loadu_si256(p.add(sb * 16) as *const __m256i))
                };
                let s = half(f.scales);
                let sz = match f.zero {
                    TileZero::Const(z) => _mm512_mul_ps(s, _mm512_set1_ps(z)),
                    TileZero::Scaled(p) => half(p),
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
        let put = |acc: &[__m512],
                   tile: usize,
                   tt: usize,
                   lanes: &mut [f32; TILE_ROWS],
                   out: &mut [f32]| {
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
        let Weights::Packed {
            bits,
            codes,
            high,
            scales,
            zero,
            k,
            ..
        } = *w
        else {
            return;
        };
        let f = Tiles {
            codes: codes.as_ptr(),
            high: high.as_ptr(),
            scales: scales.as_ptr() as *const u16,
            zero: match zero {
                PackedZero::Const(z) => TileZero::Const(z),
                PackedZero::Scaled(sz) => TileZero::Scaled(sz.as_ptr() as *const u16),
            },
            nb: k / BLOCK,
        };
        let x2 = !qx.q2.is_empty();
        // SAFETY: forwarded contract.
        unsafe {
            match (bits, x2) {
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
}

// ---------------------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QuantX, Weights, BLOCK};
    use crate::backend::cpu::linear::{packed_block_bytes, PackedZero, TILE_ROWS};
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
                        let xq = _mm256_loadu_si256(
                            q2p.add((x0 + r) * k + $j * BLOCK) as *const __m256i
                        );
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
                return packed_rows(w, qx, t, rows, out);
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

    /// A packed matrix's zero-point term ([`PackedZero`]) as a raw pointer. For 8-bit codes, which
    /// the kernel multiplies as `q − 128`, a constant zero point is kept as `z − 128`.
    #[derive(Clone, Copy)]
    enum TileZero {
        Const(f32),
        Scaled(*const u16),
    }

    /// A [`Weights::Packed`] as raw pointers.
    #[derive(Clone, Copy)]
    struct Tiles {
        codes: *const u8,
        high: *const u8,
        scales: *const u16,
        zero: TileZero,
        /// 32-blocks a row.
        nb: usize,
    }

    /// The codes of groups `2j` and `2j + 1` (j in 0..4) of tile-block `sb` for the tile's rows
    /// `8·half..8·half + 8`, as u8: byte `4·r + e` of group g's register is code `4g + e` of row
    /// `8·half + r`.
    ///
    /// # Safety
    /// avx2 available; `sb` inside the validated buffers; `half` 0 or 1.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_pair<const BITS: u32>(
        f: &Tiles,
        sb: usize,
        half: usize,
        j: usize,
    ) -> [__m256i; 2] {
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
        let bits =
            unsafe { (f.high.add(sb * 64 + g * 8 + 4 * half) as *const i32).read_unaligned() };
        // Bit `4r + e` of the half's u32 is the fifth bit of code e of row r: byte i takes byte i/8
        // of the word, keeps bit i % 8, and becomes 16 where that bit is set.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits),
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
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

    /// One half tile (rows `8·half..+8` of tile `tile`, a lane each) times `R` token rows of `qx`
    /// from `x0`: each block's integer sums ([`half_sums`]) meet the block's scales in one
    /// conversion and one multiply-add, its zero-point term in another.
    ///
    /// # Safety
    /// avx2+fma+f16c available; `tile` inside the validated matrix; `qx` holds ≥ `x0 + R` rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn packed_half<const BITS: u32, const X2: bool, const R: usize>(
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
                let s = _mm256_cvtph_ps(_mm_loadu_si128(f.scales.add(at) as *const __m128i));
                // The zero-point term of the codes as multiplied (8 bits: s·z − 128·s).
                let sz = match f.zero {
                    TileZero::Const(z) => _mm256_mul_ps(s, _mm256_set1_ps(z)),
                    TileZero::Scaled(p) => {
                        let sz = _mm256_cvtph_ps(_mm_loadu_si128(p.add(at) as *const __m128i));
                        if BITS == 8 {
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
                let sums = half_sums::<BITS, X2, R>(f, (sb, half), (x, x2));
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
    unsafe fn packed_rows_of<const BITS: u32, const X2: bool>(
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
                    let acc = packed_half::<BITS, X2, TILE>(f, (h / 2, h % 2), qx, tt);
                    put(&acc, h, tt, out);
                }
                tt += TILE;
            }
            while tt < t {
                for h in halves.clone() {
                    let acc = packed_half::<BITS, X2, 1>(f, (h / 2, h % 2), qx, tt);
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
    unsafe fn packed_rows(
        w: &Weights,
        qx: &QuantX,
        t: usize,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let Weights::Packed {
            bits,
            codes,
            high,
            scales,
            zero,
            k,
            ..
        } = *w
        else {
            return;
        };
        let f = Tiles {
            codes: codes.as_ptr(),
            high: high.as_ptr(),
            scales: scales.as_ptr() as *const u16,
            zero: match zero {
                PackedZero::Const(z) if bits == 8 => TileZero::Const(z - 128.0),
                PackedZero::Const(z) => TileZero::Const(z),
                PackedZero::Scaled(sz) => TileZero::Scaled(sz.as_ptr() as *const u16),
            },
            nb: k / BLOCK,
        };
        let x2 = !qx.q2.is_empty();
        // SAFETY: forwarded contract.
        unsafe {
            match (bits, x2) {
                (4, true) => packed_rows_of::<4, true>(&f, qx, t, rows, out),
                (4, false) => packed_rows_of::<4, false>(&f, qx, t, rows, out),
                (5, true) => packed_rows_of::<5, true>(&f, qx, t, rows, out),
                (5, false) => packed_rows_of::<5, false>(&f, qx, t, rows, out),
                (_, true) => packed_rows_of::<8, true>(&f, qx, t, rows, out),
                (_, false) => packed_rows_of::<8, false>(&f, qx, t, rows, out),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// NEON
// ---------------------------------------------------------------------------------------------------

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{QuantX, Weights, BLOCK};
    use crate::backend::cpu::linear::{packed_block_bytes, PackedZero, TILE_ROWS};
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

    /// A packed matrix's zero-point term ([`PackedZero`]) as a raw pointer. For 8-bit codes, which
    /// `sdot` multiplies as `q − 128`, a constant zero point is kept as `z − 128`.
    #[derive(Clone, Copy)]
    enum TileZero {
        Const(f32),
        Scaled(*const u16),
    }

    /// A [`Weights::Packed`] as raw pointers.
    #[derive(Clone, Copy)]
    struct Tiles {
        codes: *const u8,
        high: *const u8,
        scales: *const u16,
        zero: TileZero,
        /// 32-blocks a row.
        nb: usize,
    }

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

    /// The codes of groups `2j` and `2j + 1` (j in 0..4) of tile-block `sb` for the tile's rows
    /// `4q..4q + 4`, as i8 (8 bits: `q − 128`): byte `4·r + e` of group g's register is code
    /// `4g + e` of row `4q + r`.
    ///
    /// # Safety
    /// `sb` inside the validated buffers; `q` in 0..4.
    #[inline(always)]
    unsafe fn group_pair<const BITS: u32>(
        f: &Tiles,
        sb: usize,
        q: usize,
        j: usize,
    ) -> [int8x16_t; 2] {
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
                    *s = f16x4(f.scales.add(at));
                    *sz = match f.zero {
                        TileZero::Const(z) => vmulq_n_f32(*s, z),
                        TileZero::Scaled(p) if BITS == 8 => {
                            vfmsq_n_f32(f16x4(p.add(at)), *s, 128.0)
                        }
                        TileZero::Scaled(p) => f16x4(p.add(at)),
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
        let Weights::Packed {
            bits,
            codes,
            high,
            scales,
            zero,
            k,
            ..
        } = *w
        else {
            return;
        };
        let f = Tiles {
            codes: codes.as_ptr(),
            high: high.as_ptr(),
            scales: scales.as_ptr() as *const u16,
            zero: match zero {
                PackedZero::Const(z) if bits == 8 => TileZero::Const(z - 128.0),
                PackedZero::Const(z) => TileZero::Const(z),
                PackedZero::Scaled(sz) => TileZero::Scaled(sz.as_ptr() as *const u16),
            },
            nb: k / BLOCK,
        };
        const T2: usize = TOKENS / 2;
        let x2 = !qx.q2.is_empty();
        // SAFETY: forwarded contract.
        unsafe {
            match (bits, x2) {
                (4, true) => packed_rows_of::<4, true, T2>(&f, qx, t, rows, out),
                (4, false) => packed_rows_of::<4, false, TOKENS>(&f, qx, t, rows, out),
                (5, true) => packed_rows_of::<5, true, T2>(&f, qx, t, rows, out),
                (5, false) => packed_rows_of::<5, false, TOKENS>(&f, qx, t, rows, out),
                (_, true) => packed_rows_of::<8, true, T2>(&f, qx, t, rows, out),
                (_, false) => packed_rows_of::<8, false, TOKENS>(&f, qx, t, rows, out),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_digits_come_within_half_a_second_step() {
        let x: Vec<f32> = (0..32 * 9)
            .map(|i| ((i * 7919) % 2003) as f32 / 97.0 - 10.0)
            .chain([0.0; 32])
            .collect();
        let one = QuantX::new(&x, false);
        let two = QuantX::new(&x, true);
        assert_eq!(
            (one.q.clone(), one.d.clone()),
            (two.q.clone(), two.d.clone())
        );
        assert!(one.q2.is_empty() && one.d2.is_empty());
        for (b, xb) in x.chunks(BLOCK).enumerate() {
            let (d, d2) = (two.d[b], two.d2[b]);
            assert_eq!(d2, d / 254.0);
            let mut sum = 0f64;
            for (i, v) in xb.iter().enumerate() {
                let at = b * BLOCK + i;
                let got = d * two.q[at] as f32 + d2 * two.q2[at] as f32;
                assert!((got - v).abs() <= d2 * 0.5001 + 1e-30, "[{at}] {v} → {got}");
                sum += got as f64;
            }
            assert!(
                (two.ds[b] as f64 - sum).abs() <= 1e-5 * (1.0 + sum.abs()),
                "block {b}"
            );
            let halves = two.ds2[2 * b] + two.ds2[2 * b + 1];
            assert!((halves - two.ds[b]).abs() <= 1e-5 * (1.0 + two.ds[b].abs()));
        }
    }

    #[test]
    fn quantization_is_the_same_on_every_isa_and_within_half_a_step() {
        let mut x: Vec<f32> = (0..32 * 37)
            .map(|i| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0)
            .collect();
        x[32..64].fill(0.0); // d = 0
        x[64..96]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32 - 15.5); // ties at ±0.5 steps
        x[100] = 1e30;
        let fast = QuantX::new(&x, false);
        let mut plain = QuantX {
            q2: Vec::new(),
            d2: Vec::new(),
            q: vec![0; x.len()],
            d: vec![0.0; x.len() / BLOCK],
            ds: vec![0.0; x.len() / BLOCK],
            ds2: vec![0.0; 2 * x.len() / BLOCK],
        };
        plain.quantize_scalar(&x);
        plain.half_sums();
        assert_eq!(fast.q, plain.q);
        assert_eq!(fast.d, plain.d);
        assert_eq!(fast.ds, plain.ds);
        assert_eq!(fast.ds2, plain.ds2);
        // The second digit's loop (AVX2 where the CPU has it) and its portable body agree too.
        let two = QuantX::new(&x, true);
        let mut plain2 = QuantX {
            q2: vec![0; x.len()],
            d2: plain.d.iter().map(|d| d / 254.0).collect(),
            q: plain.q.clone(),
            d: plain.d.clone(),
            ds: plain.ds.clone(),
            ds2: plain.ds2.clone(),
        };
        plain2.second_digit_body(&x);
        plain2.half_sums();
        assert_eq!(two.q2, plain2.q2);
        assert_eq!(two.ds, plain2.ds);
        assert_eq!(two.ds2, plain2.ds2);
        assert!(two.q2.iter().any(|&q| q != 0));
        for (b, xb) in x.chunks(BLOCK).enumerate() {
            let d = fast.d[b];
            let sum: i32 = fast.q[b * BLOCK..(b + 1) * BLOCK]
                .iter()
                .map(|&q| q as i32)
                .sum();
            assert_eq!(fast.ds[b], d * sum as f32);
            for (i, v) in xb.iter().enumerate() {
                let q = fast.q[b * BLOCK + i] as f32;
                assert!(
                    (q * d - v).abs() <= d * 0.5001 + 1e-30,
                    "block {b} [{i}]: {v} → {q}·{d}"
                );
            }
        }
    }

    /// Times each integer ISA's product (scalar excluded) of the row-major file form against its
    /// packed tiles, on the calling thread, for Gemma-3-270M-like shapes: decode (T = 1, two-digit
    /// activations, as the executor runs decode) and a prompt chunk (T = 64, one digit). Medians of
    /// several runs; the activations are quantized once, outside the timing.
    ///
    /// `cargo test --release -p onestep --lib -- --ignored bench_packed --nocapture --test-threads 1`
    #[test]
    #[ignore = "timing: run with --ignored --nocapture --test-threads 1"]
    fn bench_packed_vs_rows() {
        use crate::backend::cpu::repack::{pack, tests::file_form, tests::Kind};
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(5);
        println!("| form | K | N | T | acts | isa | rows µs | packed µs | rows ÷ packed |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for kind in [Kind::Q8_0, Kind::Q5_0, Kind::Q4_0, Kind::Q4_1] {
            for (k, n) in [(640, 2048), (2048, 640), (640, 1024)] {
                let file = file_form(kind, n, k, &mut rng);
                let packed = pack(&file).expect("packs");
                let (fv, pv) = (file.kernel_view().expect("view"), packed.view());
                for (t, two, runs) in [(1, true, 51), (64, false, 9)] {
                    let x: Vec<f32> = (0..t * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                    let qx = QuantX::new(&x, two);
                    let mut out = vec![0f32; n * t];
                    for isa in available().into_iter().filter(|&i| i != QIsa::Scalar) {
                        let mut median = |w: &Weights| {
                            rows(w, &qx, t, 0..n, &mut out, isa);
                            let mut us: Vec<f64> = (0..runs)
                                .map(|_| {
                                    let start = std::time::Instant::now();
                                    rows(w, &qx, t, 0..n, &mut out, isa);
                                    start.elapsed().as_secs_f64() * 1e6
                                })
                                .collect();
                            us.sort_by(f64::total_cmp);
                            us[runs / 2]
                        };
                        let (a, b) = (median(&fv), median(&pv));
                        let packs = if isa.packs() { "" } else { " (not read)" };
                        let acts = if two { "int8x2" } else { "int8" };
                        println!(
                            "| {kind:?} | {k} | {n} | {t} | {acts} | {} | {a:.1} | {b:.1}{packs} | {:.2}× |",
                            isa.name(),
                            a / b
                        );
                    }
                }
            }
        }
    }

    /// `sdot` and `smmla` sum the same integers as the widening multiplies, so the NEON paths agree
    /// bit for bit on every weight form and both precisions, with odd rows and tokens left over from
    /// the 2×2 tiles (their accuracy is the proptest's in `linear.rs`, which runs every ISA `available`
    /// lists). Under `qemu-aarch64 -cpu max` (CI) the CPU has dotprod and i8mm.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_dotprod_and_i8mm_equal_neon() {
        let isas: Vec<QIsa> = available()
            .into_iter()
            .filter(|i| matches!(i, QIsa::NeonDot | QIsa::NeonI8mm))
            .collect();
        if isas.is_empty() {
            eprintln!("note: no dotprod on this CPU; sdot/smmla paths not run");
            return;
        }
        for t in [1, 2, 3, 4, 5] {
            neon_paths_agree(&isas, 5, t);
            neon_paths_agree(&isas, 4, t);
        }
    }

    #[cfg(target_arch = "aarch64")]
    fn neon_paths_agree(isas: &[QIsa], n: usize, t: usize) {
        let k = 96;
        let nb = n * k / BLOCK;
        let wave = |i: usize, m: usize| (i * 7919 + 13) % m;
        let bytes: Vec<u8> = (0..n * k).map(|i| wave(i, 256) as u8).collect();
        let scales: Vec<f32> = (0..2 * nb)
            .map(|i| 0.01 + wave(i, 17) as f32 / 500.0)
            .collect();
        let fzeros: Vec<f32> = (0..nb).map(|i| wave(i, 16) as f32 + 0.25).collect();
        let zeros: Vec<u8> = (0..2 * nb).map(|i| wave(i, 251) as u8).collect();
        let x: Vec<f32> = (0..t * k)
            .map(|i| wave(i, 2003) as f32 / 97.0 - 10.0)
            .collect();
        let forms = [
            Weights::Q4 {
                b: &bytes[..n * k / 2],
                scales: &scales[..nb],
                zeros: &fzeros,
                n,
                k,
            },
            Weights::Q8 {
                b: &bytes,
                scales: &scales[..nb],
                zeros: &zeros[..nb],
                halves: false,
                n,
                k,
            },
            Weights::Q8 {
                b: &bytes,
                scales: &scales,
                zeros: &zeros,
                halves: true,
                n,
                k,
            },
        ];
        for (f, w) in forms.iter().enumerate() {
            for two in [false, true] {
                let qx = QuantX::new(&x, two);
                let run = |isa| {
                    let mut out = vec![0f32; n * t];
                    rows(w, &qx, t, 0..n, &mut out, isa);
                    out
                };
                let plain = run(QIsa::Neon);
                assert!(plain.iter().any(|v| *v != 0.0));
                for &isa in isas {
                    assert_eq!(
                        run(isa),
                        plain,
                        "{isa:?}, {n}×{t}, form {f}, two digits: {two}"
                    );
                }
            }
        }
    }
}
