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
//! - **AVX-VNNI** (the VEX `vpdpbusd` on 256-bit registers: Intel's client cores from Alder Lake on,
//!   which lack AVX-512): the packed tiles as AVX2 lays them out, summed as the AVX-512 kernel sums
//!   them (u8 codes as stored, no i16 pair sums), bit for bit equal to it; row-major forms as AVX2.
//!   No CPU or emulator here executes AVX-VNNI (QEMU's TCG lacks it), so tests run this kernel with
//!   its one instruction emulated exactly in AVX2 (`avx2::rows_vnni`).
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
//! VNNI, AVX-VNNI, AVX2, NEON dotprod and NEON i8mm): 16 weight rows interleaved so that one 64-byte register holds four consecutive
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
//! at a time; f16 scales convert by `fcvtl` (Q4_K's f32 scales and `s·z` terms load as they are). Token rows go four at a time (two with two-digit
//! activations, so a tile's integer sums stay in registers), then one. Not timed on a phone yet.
//!
//! 8-bit weights with a scale and zero point per 16-element half ([`Weights::Q8`] `halves`, GGUF
//! Q6_K's form) keep the 32-blocks of `x`: each half's integer sum is taken apart (the lanes
//! `vpdpbusd`/`maddubs` sum a half into are that half's alone) and meets its own `s·d`, and the
//! zero-point term reads `d · Σ qx` per half ([`QuantX::ds2`]).
//!
//! Files: this one (the ISAs, the activations' quantization, the dispatch, the portable scalar
//! path), `avx512.rs`, `avx2.rs`, `neon.rs` (each ISA's kernels, row-major and packed), `tests.rs`.

use super::linear::{PackedFloats, PackedZero, Weights, BLOCK};

/// The instruction set of the integer dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QIsa {
    /// Portable Rust.
    Scalar,
    /// x86-64 AVX2 (`maddubs`).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// x86-64 AVX2 with AVX-VNNI (`vpdpbusd` on 256-bit registers, VEX-encoded: Intel's client
    /// cores from Alder Lake on, AMD's from Zen 5) for the packed tiles; row-major forms as AVX2.
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
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
            QIsa::AvxVnni => "avx-vnni",
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
    /// Whether its kernels read [`Weights::Packed`]: AVX-512 VNNI, AVX-VNNI, AVX2 and the NEON dot
    /// product ones (NeonDot, NeonI8mm) — the load-time repack, `repack.rs`, is made only then;
    /// plain NEON and Scalar read the file's own forms.
    pub(crate) fn packs(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(self, QIsa::Avx512Vnni | QIsa::AvxVnni | QIsa::Avx2)
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
            // Tests run the AVX-VNNI kernels everywhere, its one instruction emulated where the
            // CPU lacks it (`avx2::rows_vnni`).
            if is_x86_feature_detected!("avxvnni") || cfg!(test) {
                v.push(QIsa::AvxVnni);
            }
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

/// The instruction set of this CPU named `name` (as [`QIsa::name`] reports it); `Err` lists the
/// names this CPU runs.
pub(crate) fn by_name(name: &str) -> Result<QIsa, String> {
    let isas = available();
    isas.iter()
        .copied()
        .find(|q| q.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = isas.iter().map(|q| q.name()).collect();
            format!(
                "`{name}` is not an instruction set this CPU runs ({})",
                names.join(", ")
            )
        })
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
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AvxVnni is only produced by `available` after detecting avx2, fma, f16c and
        // avxvnni (under `cfg(test)` also without avxvnni: `rows_vnni` then emulates it).
        QIsa::AvxVnni => unsafe { avx2::rows_vnni(w, qx, t, rows, out) },
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
            let s = scales.get(at);
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

/// A [`Weights::Packed`] as raw pointers, for the ISA kernels that read the tiles.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
#[derive(Clone, Copy)]
struct Tiles {
    /// 4, 5 or 8.
    bits: u32,
    codes: *const u8,
    high: *const u8,
    scales: TileFloats,
    zero: TileZero,
    /// 32-blocks a row.
    nb: usize,
}

/// A packed matrix's zero-point term ([`PackedZero`]) as a raw pointer.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
#[derive(Clone, Copy)]
enum TileZero {
    Const(f32),
    Scaled(TileFloats),
}

/// [`PackedFloats`] as a raw pointer: f16 (`wide` false) or f32 entries.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
#[derive(Clone, Copy)]
struct TileFloats {
    ptr: *const u8,
    wide: bool,
}

impl From<PackedFloats<'_>> for TileFloats {
    fn from(v: PackedFloats<'_>) -> Self {
        match v {
            PackedFloats::F16(v) => TileFloats {
                ptr: v.as_ptr() as *const u8,
                wide: false,
            },
            PackedFloats::F32(v) => TileFloats {
                ptr: v.as_ptr() as *const u8,
                wide: true,
            },
        }
    }
}

#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
impl Tiles {
    /// `w`'s tiles, `None` for the other forms. `offset_8bit`: the kernel multiplies 8-bit codes as
    /// `q − 128` (no unsigned × signed dot product), so a constant zero point is kept as `z − 128`
    /// (an `s·z` a block the kernel corrects by `128·s` itself).
    fn of(w: &Weights, offset_8bit: bool) -> Option<Tiles> {
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
            return None;
        };
        Some(Tiles {
            bits,
            codes: codes.as_ptr(),
            high: high.as_ptr(),
            scales: scales.into(),
            zero: match zero {
                PackedZero::Const(z) if bits == 8 && offset_8bit => TileZero::Const(z - 128.0),
                PackedZero::Const(z) => TileZero::Const(z),
                PackedZero::Scaled(sz) => TileZero::Scaled(sz.into()),
            },
            nb: k / BLOCK,
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(target_arch = "aarch64")]
mod neon;

#[cfg(test)]
mod tests;
