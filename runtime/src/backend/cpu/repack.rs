//! Block weights repacked at load into the compact forms the integer kernels read
//! ([`Weights::Packed`]), so a decode step reads fewer bytes.
//!
//! The file keeps every weight in a form onnxruntime runs: `MatMulNBits` of 4 or 8 bits with f32
//! scales and per-block zero points. That costs bytes the source did not have — GGUF Q5_0's 5-bit
//! codes become 8-bit bytes, its f16 scales f32, its one zero point (16) a byte a block — and a
//! decode step reads every weight once, so those bytes are time. When the CPU's integer kernels
//! read packed forms ([`QIsa::packs`]: AVX-512 VNNI, AVX-VNNI, AVX2, and NEON with the dot product —
//! ARMv8.2's `sdot`, every phone core since the Cortex-A55/A75 — but not plain NEON) and the
//! precision is [`Precision::Fast`](super::linear::Precision), the CPU backend repacks each 32-block
//! matrix whose values allow it, **losslessly**:
//!
//! - scales are kept as f16 when every one is an f16 value (GGUF's block scales are), else as f32
//!   (Q4_K's `d·sc`: an f16 times a 6-bit integer);
//! - one zero point for the whole matrix (Q8_0: 128, Q5_0: 16, Q4_0: 8) becomes a constant;
//!   otherwise (the float zero points of Q4_1 and Q4_K) each block's `s·z` is kept, as f16 where
//!   every one is within a few f32 roundings of an f16 value (`−m`, which Q4_1 stores as f16), else
//!   as f32 (Q4_K's `dmin·m`);
//! - 8-bit codes that are all below 32 (Q5_0's) become 5 bits: the low nibbles as the 4-bit forms
//!   lay them out, plus one u32 of fifth bits a block.
//!
//! Every packed product equals the file form's (the same integer sums, the same factors: tested bit
//! for bit; with float zero points within f32 roundings); anything else (block 16, mixed zero points
//! with 8-bit codes, a non-finite `s·z`) stays as the file has it. The file's pages the packed copy replaces are handed back to the OS
//! ([`release`]), so resident memory falls with the bytes read.
//!
//! The packed layout interleaves 16 rows a tile ([`Weights::Packed`]), so the integer kernel sums
//! a row's block in one register lane and pays the float work once a block of 16 rows (2× Gemma 3's
//! prompt speed at 2 threads on AVX-512 VNNI; on AVX2, 8 rows a register, the single-thread products
//! of `linear_q8/tests.rs`' `bench_packed_vs_rows` run 1.7–3.1× the row-major path's; NEON's `sdot`
//! tiles, 4 rows a register, are tested under qemu but not yet timed on a phone; module doc of
//! `linear_q8/`). Sizes per 32 weights (file form → packed): 8-bit codes 37 → 34 bytes, Q5_0's
//! 37 → 22, 4-bit codes 24 → 20 (Q4_K's, with f32 terms: 24 → 24, packed for the tile kernels'
//! speed: Gemma 3's prompt 1.16× faster on one thread); a matrix whose row count is not a multiple of 16 pads its last tile
//! with zero rows.
//!
//! The conversion runs at load, in batches of tiles whose file rows are released as soon as they
//! are converted, so resident memory never holds both forms of a whole matrix. The packed buffers
//! are [`HugeBuf`]s: on 2 MB pages where the OS gives them, which a decode step's stream over
//! every weight reads at up to 2.3× the rate of 4 KB pages (`huge_pages.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use bytemuck::Pod;
use half::f16;
use rayon::prelude::*;

use super::huge_pages::HugeBuf;
use super::linear::{
    packed_block_bytes, packed_lane, PackedFloats, PackedZero, Weights, BLOCK, TILE_ROWS,
};
use super::linear_q8::QIsa;
use crate::file_map::release;
use crate::graph::DType;
use crate::plan::{Plan, Step};
use crate::weights::{LinearWeights, WeightForm};

/// A matrix in the packed tile layout ([`Weights::Packed`]), its buffers owned.
#[derive(Debug)]
pub(crate) struct PackedMatrix {
    n: usize,
    k: usize,
    bits: u32,
    codes: HugeBuf<u8>,
    high: HugeBuf<u8>,
    scales: Floats,
    zero: Zero,
}

/// The owned zero-point term of a [`PackedMatrix`]: one zero point, or `s·z` in tile order.
#[derive(Debug)]
enum Zero {
    Const(f32),
    Scaled(Floats),
}

/// Owned [`PackedFloats`]: f16 where every value is an f16 value, f32 otherwise.
#[derive(Debug)]
enum Floats {
    F16(HugeBuf<f16>),
    F32(HugeBuf<f32>),
}

impl Floats {
    /// Per-(row, block) values `[N, nb]` in tile order: f16 when that loses nothing, else f32.
    fn tiled(v: &[f32], n: usize, nb: usize) -> Floats {
        if all_f16(v) {
            Floats::F16(tiled(v, n, nb, f16::from_f32))
        } else {
            Floats::F32(tiled(v, n, nb, |x| x))
        }
    }

    fn view(&self) -> PackedFloats<'_> {
        match self {
            Floats::F16(v) => PackedFloats::F16(v),
            Floats::F32(v) => PackedFloats::F32(v),
        }
    }
}

impl PackedMatrix {
    /// The kernels' view.
    pub(crate) fn view(&self) -> Weights<'_> {
        Weights::Packed {
            bits: self.bits,
            codes: &self.codes,
            high: &self.high,
            scales: self.scales.view(),
            zero: match &self.zero {
                Zero::Const(z) => PackedZero::Const(*z),
                Zero::Scaled(sz) => PackedZero::Scaled(sz.view()),
            },
            n: self.n,
            k: self.k,
        }
    }

    /// Bytes a product reads.
    pub(crate) fn byte_len(&self) -> usize {
        self.view().byte_len()
    }
}

/// `w` packed, or `None` where its form or values do not allow it losslessly (module doc).
pub(crate) fn pack(w: &LinearWeights) -> Option<PackedMatrix> {
    let WeightForm::Block {
        bits,
        block: BLOCK,
        b,
        scales,
        zero,
    } = &w.form
    else {
        return None;
    };
    let s32: &[f32] = scales.typed();
    let (n, k) = (w.n, w.k);
    let zero = match (bits, zero.dtype) {
        (8, DType::U8) => Zero::Const(constant(zero.typed::<u8>())? as f32),
        (4, DType::F32) => {
            let z: &[f32] = zero.typed();
            match constant(z) {
                Some(c) => Zero::Const(c),
                None => Zero::Scaled(scaled_zeros(s32, z, n, k / BLOCK)?),
            }
        }
        _ => return None,
    };
    let file = FileCodes {
        b: b.typed(),
        bits: *bits,
        k: w.k,
    };
    let bits = match bits {
        8 if file.b.iter().all(|&q| q < 32) => 5,
        _ => *bits,
    };
    let (codes, high) = tile_pass(&file, n, bits);
    let packed = PackedMatrix {
        n,
        k,
        bits,
        codes,
        high,
        scales: Floats::tiled(s32, n, k / BLOCK),
        zero,
    };
    packed.view().validate().ok()?;
    Some(packed)
}

/// A file form's codes: u8 `[N, K]` (8 bits) or nibbles `[N, K/2]` (4 bits, element 2j the low
/// nibble of byte j).
struct FileCodes<'a> {
    b: &'a [u8],
    bits: u32,
    k: usize,
}

impl FileCodes<'_> {
    /// The 32 codes of block `blk` of `row`; zeros past the last row (a tile's padding).
    fn block(&self, n: usize, row: usize, blk: usize) -> [u8; BLOCK] {
        let mut c = [0u8; BLOCK];
        if row >= n {
            return c;
        }
        let e = row * self.k + blk * BLOCK;
        if self.bits == 8 {
            c.copy_from_slice(&self.b[e..e + BLOCK]);
        } else {
            for (j, byte) in self.b[e / 2..e / 2 + BLOCK / 2].iter().enumerate() {
                (c[2 * j], c[2 * j + 1]) = (byte & 15, byte >> 4);
            }
        }
        c
    }
}

/// Per-(row, block) values `[N, nb]` in tile order `[tiles, nb, TILE_ROWS]`, each through `conv`
/// (zero for padding rows). Converted straight into the kept type: no f32 copy of a large
/// vocabulary's scales passes through the allocator on the way.
fn tiled<T: Pod + Send>(
    v: &[f32],
    n: usize,
    nb: usize,
    conv: impl Fn(f32) -> T + Sync,
) -> HugeBuf<T> {
    let mut out = HugeBuf::zeroed(n.div_ceil(TILE_ROWS) * nb * TILE_ROWS);
    out.par_chunks_mut(nb * TILE_ROWS)
        .enumerate()
        .for_each(|(tile, o)| {
            for (b, o) in o.chunks_exact_mut(TILE_ROWS).enumerate() {
                for (r, o) in o.iter_mut().enumerate() {
                    let row = tile * TILE_ROWS + r;
                    if row < n {
                        *o = conv(v[row * nb + b]);
                    }
                }
            }
        });
    out
}

/// Tiles a batch of the tile pass converts before the file rows it read are released.
const BATCH_TILES: usize = 256;

/// The codes in [`Weights::Packed`]'s tile layout (`bits` 4, 5 or 8) and, for 5 bits, their fifth
/// bits: batches of tiles, each converted in parallel and then its file rows released, so the
/// file's pages and the copy are never both resident for the whole matrix.
fn tile_pass(file: &FileCodes, n: usize, bits: u32) -> (HugeBuf<u8>, HugeBuf<u8>) {
    let nb = file.k / BLOCK;
    let (cb, hb) = (packed_block_bytes(bits), if bits == 5 { 64 } else { 0 });
    let tiles = n.div_ceil(TILE_ROWS);
    let mut codes = HugeBuf::zeroed(tiles * nb * cb);
    let mut high = HugeBuf::zeroed(tiles * nb * hb);
    let row_bytes = file.b.len() / n.max(1);
    let batch = BATCH_TILES * nb;
    let mut high_batches = high.chunks_mut((batch * hb).max(1));
    for (i, c) in codes.chunks_mut(batch * cb).enumerate() {
        let h = if hb > 0 { high_batches.next() } else { None };
        let first = i * BATCH_TILES;
        match h {
            Some(h) => c
                .par_chunks_mut(nb * cb)
                .zip(h.par_chunks_mut(nb * hb))
                .enumerate()
                .for_each(|(t, (c, h))| tile(file, n, first + t, c, Some(h))),
            None => c
                .par_chunks_mut(nb * cb)
                .enumerate()
                .for_each(|(t, c)| tile(file, n, first + t, c, None)),
        }
        let rows = first * TILE_ROWS..((first + BATCH_TILES) * TILE_ROWS).min(n);
        release(&file.b[rows.start * row_bytes..rows.end * row_bytes]);
    }
    (codes, high)
}

/// One tile's blocks: its codes into `c` (`nb` blocks of [`packed_block_bytes`]) and, for 5 bits,
/// its fifth bits into `h` (`nb` × 8 u64).
fn tile(file: &FileCodes, n: usize, tile: usize, c: &mut [u8], h: Option<&mut [u8]>) {
    let cb = c.len() / (file.k / BLOCK);
    let mut words = vec![[0u64; 8]; file.k / BLOCK];
    for (b, o) in c.chunks_exact_mut(cb).enumerate() {
        for r in 0..TILE_ROWS {
            let q = file.block(n, tile * TILE_ROWS + r, b);
            let lane = packed_lane(r, 0);
            for g in 0..8 {
                let group = &q[4 * g..4 * g + 4];
                if cb == packed_block_bytes(8) {
                    o[g * 64 + lane..g * 64 + lane + 4].copy_from_slice(group);
                    continue;
                }
                // Group 2j in register j's low nibbles, 2j + 1 in its high ones; 5 bits: the rest.
                let (reg, shift) = (g / 2, 4 * (g % 2));
                for (e, q) in group.iter().enumerate() {
                    o[reg * 64 + lane + e] |= (q & 15) << shift;
                    words[b][g] |= ((q >> 4) as u64 & 1) << (lane + e);
                }
            }
        }
    }
    if let Some(h) = h {
        for (w, o) in words.iter().flatten().zip(h.chunks_exact_mut(8)) {
            o.copy_from_slice(&w.to_le_bytes());
        }
    }
}

/// Whether every value is an f16 value exactly.
fn all_f16(v: &[f32]) -> bool {
    v.par_iter().all(|&s| f16::from_f32(s).to_f32() == s)
}

/// The one value every element has.
fn constant<T: Copy + PartialEq>(v: &[T]) -> Option<T> {
    let first = *v.first()?;
    v.iter().all(|&x| x == first).then_some(first)
}

/// Each block's `s·z` (`s`, `z`: `[N, nb]`), in tile order: as f16 when each is within a few f32
/// roundings of an f16 value (Q4_1: `s·z = d·(−m/d) ≈ −m`, an f16 in the source, so storing it as
/// f16 loses nothing the source had), else as the f32 products (Q4_K: `dmin·m`, an f16 times a
/// 6-bit integer); `None` when one is not finite.
fn scaled_zeros(s: &[f32], z: &[f32], n: usize, nb: usize) -> Option<Floats> {
    let sz: Vec<f32> = s.par_iter().zip(z).map(|(&s, &z)| s * z).collect();
    if !sz.par_iter().all(|sz| sz.is_finite()) {
        return None;
    }
    let near_f16 = sz.par_iter().all(|&sz| {
        let err = (f16::from_f32(sz).to_f32() - sz).abs();
        err <= sz.abs() * 4.0 * f32::EPSILON
    });
    Some(if near_f16 {
        Floats::F16(tiled(&sz, n, nb, f16::from_f32))
    } else {
        Floats::F32(tiled(&sz, n, nb, |x| x))
    })
}

/// The packed forms of a plan's CPU linear layers, by the address of their shared weights: valid
/// with the plan it was made for only (the CPU backend keeps the two together).
#[derive(Debug, Default)]
pub(crate) struct PackedSet {
    by_weights: HashMap<usize, PackedMatrix>,
    /// Σ (file form's bytes − packed bytes).
    saved: usize,
}

impl PackedSet {
    /// Packs every linear layer of `plan` that allows it when `isa` reads packed forms (else an
    /// empty set), handing the replaced file pages back to the OS.
    pub(crate) fn for_plan(plan: &Plan, isa: QIsa) -> PackedSet {
        let mut set = PackedSet::default();
        if !isa.packs() {
            return set;
        }
        let mut linears = Vec::new();
        for s in &plan.steps {
            collect(s, &mut linears);
        }
        let mut seen = std::collections::HashSet::new();
        linears.retain(|w| seen.insert(Arc::as_ptr(w) as usize));
        // Largest first, so the output layer does not start last.
        linears.sort_by_key(|w| std::cmp::Reverse(w.byte_len()));
        let packed: Vec<(usize, usize, PackedMatrix)> = linears
            .par_iter()
            .filter_map(|w| {
                let p = pack(w)?;
                release_replaced(w);
                let saved = w.byte_len().saturating_sub(p.byte_len());
                Some((Arc::as_ptr(w) as usize, saved, p))
            })
            .collect();
        for (key, saved, p) in packed {
            set.saved += saved;
            set.by_weights.insert(key, p);
        }
        set
    }

    /// The packed form of `w`, if it has one.
    pub(crate) fn get(&self, w: &Arc<LinearWeights>) -> Option<&PackedMatrix> {
        self.by_weights.get(&(Arc::as_ptr(w) as usize))
    }

    /// The kernels' view of `w`: its packed form where it has one, else the file's.
    pub(crate) fn view_of<'w>(&'w self, w: &'w Arc<LinearWeights>) -> Option<Weights<'w>> {
        match self.get(w) {
            Some(p) => Some(p.view()),
            None => w.kernel_view(),
        }
    }

    /// Bytes a product of all packed matrices reads fewer than their file forms.
    pub(crate) fn saved_bytes(&self) -> u64 {
        self.saved as u64
    }
}

/// The linear layers a step runs (a group's members, an attention's taken-in steps).
fn collect<'p>(s: &'p Step, out: &mut Vec<&'p Arc<LinearWeights>>) {
    match s {
        Step::Linear { w, .. } => out.push(w),
        Step::LinearGroup(g) => g.members.iter().for_each(|m| collect(m, out)),
        Step::CacheAttention {
            inputs: Some(a), ..
        } => a.steps.iter().for_each(|m| collect(m, out)),
        _ => {}
    }
}

/// Hands back the file pages of `w`'s buffers, which its packed copy replaces ([`release`]).
fn release_replaced(w: &LinearWeights) {
    if let WeightForm::Block {
        b, scales, zero, ..
    } = &w.form
    {
        release(scales.bytes());
        release(zero.bytes());
        release(b.bytes());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::cpu::linear::{linear_isa, Activations};
    use crate::backend::cpu::linear_q8;
    use crate::backend::cpu::simd::Isa;
    use crate::tensor::Tensor;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The GGUF-like block forms the exporter writes, as the file holds them.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub(crate) enum Kind {
        /// 8-bit codes, zero point 128 everywhere.
        Q8_0,
        /// 8-bit codes below 32, zero point 16 everywhere.
        Q5_0,
        /// 4-bit codes, zero point 8 everywhere.
        Q4_0,
        /// 4-bit codes, float zero points `−m/d` (d, m f16).
        Q4_1,
        /// 4-bit codes, scales `d·sc` and zero points `dmin·m / s` (d, dmin f16; sc, m 6-bit): neither
        /// the scales nor the `s·z` terms are f16 values.
        Q4K,
    }

    fn f16_values(rng: &mut StdRng, count: usize, range: f32) -> Vec<f32> {
        (0..count)
            .map(|_| f16::from_f32(rng.random_range(-range..range)).to_f32())
            .collect()
    }

    /// A random `[n, k]` matrix of `kind` in the file's form.
    pub(crate) fn file_form(kind: Kind, n: usize, k: usize, rng: &mut StdRng) -> LinearWeights {
        let nb = n * k / BLOCK;
        let d = f16_values(rng, nb, 0.05);
        let (bits, codes, zero) = match kind {
            Kind::Q8_0 => (8, (0..nb * 32).map(|_| rng.random()).collect(), {
                Tensor::from_slice(DType::U8, &[nb], &vec![128u8; nb])
            }),
            Kind::Q5_0 => (
                8,
                (0..nb * 32).map(|_| rng.random_range(0..32u8)).collect(),
                Tensor::from_slice(DType::U8, &[nb], &vec![16u8; nb]),
            ),
            Kind::Q4_0 => (
                4,
                (0..nb * 16).map(|_| rng.random()).collect::<Vec<u8>>(),
                Tensor::f32(&[nb], &vec![8.0; nb]),
            ),
            Kind::Q4_1 => {
                let m = f16_values(rng, nb, 0.5);
                let z: Vec<f32> = m.iter().zip(&d).map(|(m, d)| -m / d).collect();
                let codes = (0..nb * 16).map(|_| rng.random()).collect::<Vec<u8>>();
                (4, codes, Tensor::f32(&[nb], &z))
            }
            Kind::Q4K => {
                let mins: Vec<f32> = f16_values(rng, nb, 0.05)
                    .iter()
                    .map(|dmin| dmin.abs() * rng.random_range(0..64u8) as f32)
                    .collect();
                let codes = (0..nb * 16).map(|_| rng.random()).collect::<Vec<u8>>();
                return q4k_file(n, k, &d, &mins, codes, rng);
            }
        };
        let b = Tensor::from_slice(DType::U8, &[codes.len()], &codes);
        LinearWeights::block(n, k, bits, BLOCK, b, Tensor::f32(&[nb], &d), Some(&zero))
            .expect("a valid block matrix")
    }

    /// A Q4_K-like file form: scales `d·sc` (`sc` in 1..64), zero points `min / s` (`min = dmin·m`).
    fn q4k_file(
        n: usize,
        k: usize,
        d: &[f32],
        mins: &[f32],
        codes: Vec<u8>,
        rng: &mut StdRng,
    ) -> LinearWeights {
        let s: Vec<f32> = d
            .iter()
            .map(|d| d * rng.random_range(1..64u8) as f32)
            .collect();
        let z: Vec<f32> = mins.iter().zip(&s).map(|(m, s)| m / s).collect();
        let b = Tensor::from_slice(DType::U8, &[codes.len()], &codes);
        let zero = Tensor::f32(&[z.len()], &z);
        LinearWeights::block(n, k, 4, BLOCK, b, Tensor::f32(&[s.len()], &s), Some(&zero))
            .expect("a valid block matrix")
    }

    fn product(w: &Weights, x: &[f32], t: usize, acts: Activations, qisa: QIsa) -> Vec<f32> {
        let mut out = vec![f32::NAN; t * w.n()];
        linear_isa(x, t, w, None, &mut out, acts, (Isa::Scalar, qisa), None).expect("runs");
        out
    }

    /// Σ|w·x| of each result `[T, N]`, the scale of f32 rounding in it.
    fn magnitudes(w: &Weights, x: &[f32], t: usize) -> Vec<f64> {
        let (n, k) = (w.n(), w.k());
        (0..t * n)
            .map(|i| {
                let (tt, row) = (i / n, i % n);
                (0..k)
                    .map(|c| (w.get(row, c) as f64 * x[tt * k + c] as f64).abs())
                    .sum()
            })
            .collect()
    }

    /// `p`'s view with an f16 `s·z` a block (`sz`, tile order) for its zero-point term: the form
    /// Q4_1 packs into, here for any code width (the kernels take it for each).
    fn with_scaled_zero<'a>(p: &'a PackedMatrix, sz: &'a [f16]) -> Weights<'a> {
        let sz = PackedFloats::F16(sz);
        match p.view() {
            Weights::Packed {
                bits,
                codes,
                high,
                scales,
                n,
                k,
                ..
            } => Weights::Packed {
                bits,
                codes,
                high,
                scales,
                zero: PackedZero::Scaled(sz),
                n,
                k,
            },
            other => other,
        }
    }

    #[test]
    fn packs_each_gguf_form_into_its_compact_form_with_the_same_values() {
        let mut rng = StdRng::seed_from_u64(7);
        let want_bits = [
            (Kind::Q8_0, 8),
            (Kind::Q5_0, 5),
            (Kind::Q4_0, 4),
            (Kind::Q4_1, 4),
            (Kind::Q4K, 4),
        ];
        for (kind, bits) in want_bits {
            let (n, k) = (48, 96);
            let file = file_form(kind, n, k, &mut rng);
            let packed = pack(&file).unwrap_or_else(|| panic!("{kind:?} packs"));
            assert_eq!(packed.bits, bits, "{kind:?}");
            // Q4_K keeps f32 scales and s·z terms: as many bytes as the file form, in tiles.
            let wide = matches!(packed.scales, Floats::F32(_))
                && matches!(packed.zero, Zero::Scaled(Floats::F32(_)));
            assert_eq!(wide, kind == Kind::Q4K, "{kind:?}: f32 scales and s·z");
            if kind == Kind::Q4K {
                assert_eq!(packed.byte_len(), file.byte_len(), "{kind:?}");
            } else {
                assert!(packed.byte_len() < file.byte_len(), "{kind:?} shrinks");
            }
            let (fv, pv) = (file.kernel_view().expect("view"), packed.view());
            for row in 0..n {
                for col in 0..k {
                    let (a, b) = (fv.get(row, col), pv.get(row, col));
                    let tol = value_tol(kind);
                    assert!((a - b).abs() <= tol, "{kind:?} [{row},{col}]: {a} vs {b}");
                }
            }
        }
    }

    /// How far a packed value may be from the file's: Q4_1's `s·z` is kept as the f16 it came from,
    /// within f32 roundings of the file's; Q4_K's is `s·(m/s)` rounded once more (values up to ~50
    /// in these forms); the others are equal bit for bit.
    fn value_tol(kind: Kind) -> f32 {
        match kind {
            Kind::Q4_1 => 1e-6,
            Kind::Q4K => 2e-5,
            _ => 0.0,
        }
    }

    /// A tied embedding reads its rows from the packed copy (`exec.rs`): each row as the file's
    /// reference decoder gives it — bit for bit with one zero point, within f32 roundings with Q4_1's
    /// f16 `s·z` and Q4_K's f32 one — padded tile included.
    #[test]
    fn packed_rows_decode_as_the_files() {
        let mut rng = StdRng::seed_from_u64(5);
        for kind in [Kind::Q8_0, Kind::Q5_0, Kind::Q4_0, Kind::Q4_1, Kind::Q4K] {
            let (n, k) = (37, 160);
            let file = file_form(kind, n, k, &mut rng);
            let packed = pack(&file).expect("packs");
            let (mut want, mut got) = (vec![0f32; k], vec![f32::NAN; k]);
            for row in 0..n {
                file.decode_row(row, &mut want);
                packed.view().decode_row(row, &mut got);
                for (col, (a, b)) in want.iter().zip(&got).enumerate() {
                    let tol = value_tol(kind);
                    assert!((a - b).abs() <= tol, "{kind:?} [{row},{col}]: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn packed_products_equal_the_file_forms_on_every_integer_isa() {
        let mut rng = StdRng::seed_from_u64(11);
        // K of 17 blocks; T = 5: a tile of 4 tokens and one more; N not a multiple of 16: a padded
        // tile.
        for (kind, n, k, t) in [
            (Kind::Q8_0, 33, 544, 1),
            (Kind::Q5_0, 33, 544, 5),
            (Kind::Q5_0, 7, 64, 1),
            (Kind::Q4_0, 9, 544, 5),
            (Kind::Q4_1, 9, 544, 1),
            (Kind::Q4_1, 16, 96, 5),
            (Kind::Q4K, 9, 544, 1),
            (Kind::Q4K, 33, 96, 5),
            // More rows than a batch of the tile pass (the last one partial).
            (Kind::Q5_0, 4100, 64, 1),
            (Kind::Q8_0, 4100, 64, 2),
        ] {
            let file = file_form(kind, n, k, &mut rng);
            let packed = pack(&file).expect("packs");
            let fv = file.kernel_view().expect("view");
            let x: Vec<f32> = (0..t * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let mag = magnitudes(&fv, &x, t);
            for acts in [Activations::Int8, Activations::Int8x2] {
                // The portable path sums blocks in the same order for both layouts: equal bits
                // (Q4_1's f16 zero term and Q4_K's f32 one within f32 roundings).
                let want = product(&fv, &x, t, acts, QIsa::Scalar);
                let tol = |i: usize| match kind {
                    Kind::Q4_1 | Kind::Q4K => 1e-6 * mag[i],
                    _ => 0.0,
                };
                let got = product(&packed.view(), &x, t, acts, QIsa::Scalar);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let err = (*g as f64 - *w as f64).abs();
                    assert!(err <= tol(i), "{kind:?} scalar {acts:?} [{i}]: {g} vs {w}");
                }
                // Every instruction set: the same product up to f32 summation order.
                for qisa in linear_q8::available() {
                    let got = product(&packed.view(), &x, t, acts, qisa);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        let err = (*g as f64 - *w as f64).abs();
                        let bound = 1e-6 * mag[i] + tol(i);
                        assert!(err <= bound, "{kind:?} {qisa:?} {acts:?} [{i}]: {g} vs {w}");
                    }
                }
            }
        }
    }

    /// Each integer ISA's packed product across shapes: N not a multiple of 16 (a padded tile; 7:
    /// less than a half tile), K of 1, 3 and 17 blocks, T = 1, 4, 5 and 17 (tiles of four tokens and
    /// the rest), every packed form (8-, 5- and 4-bit codes with their constant zero point, Q4_1's
    /// 4-bit with an f16 `s·z`, Q4_K's 4-bit with f32 scales and `s·z`, and 8- and 5-bit with an f16
    /// `s·z` too) and both activation forms.
    /// The bar is the one above: the file form's product (or, for the forms no GGUF file packs
    /// into, the portable path's on the same packed view) up to f32 summation order. AVX2 and
    /// AVX-512 sum the same integers and apply the same float operations lane by lane to 4- and
    /// 5-bit codes: equal bits there. A task's rows starting and ending inside a tile equal the
    /// whole product's, bit for bit.
    #[test]
    fn packed_products_agree_across_shapes_on_every_integer_isa() {
        let mut rng = StdRng::seed_from_u64(19);
        let isas = linear_q8::available();
        for kind in [Kind::Q8_0, Kind::Q5_0, Kind::Q4_0, Kind::Q4_1, Kind::Q4K] {
            for (n, nb) in [(7, 3), (16, 1), (33, 3), (40, 17)] {
                let k = nb * BLOCK;
                let file = file_form(kind, n, k, &mut rng);
                let packed = pack(&file).expect("packs");
                let sz: Vec<f16> = f16_values(&mut rng, packed.scales.view().len(), 0.5)
                    .into_iter()
                    .map(f16::from_f32)
                    .collect();
                let fv = file.kernel_view().expect("view");
                let views = [
                    (packed.view(), true),
                    (with_scaled_zero(&packed, &sz), false),
                ];
                for (view, from_file) in views {
                    if !from_file && matches!(kind, Kind::Q4_1 | Kind::Q4K) {
                        continue; // the same form as the packed Q4_1 (Q4_K: with f32 terms)
                    }
                    for t in [1, 4, 5, 17] {
                        let x: Vec<f32> = (0..t * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                        let what = format!("{kind:?} s·z {} n{n} k{k} t{t}", !from_file);
                        packed_view_agrees(&view, from_file.then_some(&fv), &x, t, &isas, &what);
                    }
                }
            }
        }
    }

    /// [`packed_products_agree_across_shapes_on_every_integer_isa`] for one view and input.
    fn packed_view_agrees(
        view: &Weights,
        file: Option<&Weights>,
        x: &[f32],
        t: usize,
        isas: &[QIsa],
        what: &str,
    ) {
        let n = view.n();
        let mag = magnitudes(view, x, t);
        // Q4_1's s·z is kept as the f16 it came from: within f32 roundings of the file's.
        let q41 = matches!(
            view,
            Weights::Packed {
                bits: 4,
                zero: PackedZero::Scaled(_),
                ..
            }
        );
        let tol = |i: usize| {
            if q41 && file.is_some() {
                1e-6 * mag[i]
            } else {
                0.0
            }
        };
        for acts in [Activations::Int8, Activations::Int8x2] {
            let want = product(file.unwrap_or(view), x, t, acts, QIsa::Scalar);
            let mut by_isa = Vec::new();
            for &qisa in isas {
                let got = product(view, x, t, acts, qisa);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let err = (*g as f64 - *w as f64).abs();
                    let bound = if qisa == QIsa::Scalar {
                        tol(i)
                    } else {
                        1e-6 * mag[i] + tol(i)
                    };
                    assert!(err <= bound, "{what} {qisa:?} {acts:?} [{i}]: {g} vs {w}");
                }
                by_isa.push((qisa, got));
            }
            let equal = bit_equal_isas(view);
            let same: Vec<_> = by_isa.iter().filter(|(i, _)| equal.contains(i)).collect();
            for pair in same.windows(2) {
                let ((a, ga), (b, gb)) = (pair[0], pair[1]);
                assert_eq!(ga, gb, "{what} {acts:?}: {a:?} and {b:?} bits");
            }
            // Rows from inside a tile to inside another (a linear group's members split so).
            let qx = linear_q8::QuantX::new(x, acts == Activations::Int8x2);
            for &qisa in isas {
                let mut whole = vec![0f32; n * t];
                linear_q8::rows(view, &qx, t, 0..n, &mut whole, qisa);
                let ranges = [3..n - 2, 9..n.min(15), n - 1..n];
                for rows in ranges.into_iter().filter(|r| !r.is_empty()) {
                    let mut part = vec![f32::NAN; rows.len() * t];
                    linear_q8::rows(view, &qx, t, rows.clone(), &mut part, qisa);
                    let same = &whole[rows.start * t..rows.end * t];
                    assert_eq!(part, same, "{what} {qisa:?} {acts:?} rows {rows:?}");
                }
            }
        }
    }

    /// `w` with the codes `code(byte index)` (bytes as the file holds them).
    fn with_codes(w: &LinearWeights, code: impl Fn(usize) -> u8) -> LinearWeights {
        let WeightForm::Block {
            bits,
            block,
            b,
            scales,
            zero,
        } = &w.form
        else {
            panic!("a block form");
        };
        let codes: Vec<u8> = (0..b.typed::<u8>().len()).map(code).collect();
        let b = Tensor::from_slice(DType::U8, &[codes.len()], &codes);
        LinearWeights::block(w.n, w.k, *bits, *block, b, scales.clone(), Some(zero))
            .expect("a valid block matrix")
    }

    /// The codes at the extremes of `maddubs`' i16 pair sums (4 bits: all 15; 5 bits: all 31; 8
    /// bits: 0 and 255 on alternate rows) against activations all at ±127 (every block's values
    /// equal), so the sums the kernels add in i16 before widening reach their bounds
    /// (`linear_q8/avx2.rs`, `half_sums`): each integer ISA still gives the file form's product.
    #[test]
    fn packed_products_hold_at_the_extreme_codes() {
        let mut rng = StdRng::seed_from_u64(23);
        let (n, k, t) = (24, 96, 5);
        let x: Vec<f32> = (0..t * k)
            .map(|i| if (i / k) % 2 == 0 { 1.5 } else { -0.75 })
            .collect();
        let isas = linear_q8::available();
        for kind in [Kind::Q8_0, Kind::Q5_0, Kind::Q4_0, Kind::Q4_1, Kind::Q4K] {
            let random = file_form(kind, n, k, &mut rng);
            let file = with_codes(&random, |i| match kind {
                Kind::Q8_0 if (i / k) % 2 == 0 => 0,
                Kind::Q8_0 => 255,
                Kind::Q5_0 => 31,
                Kind::Q4_0 | Kind::Q4_1 | Kind::Q4K => 0xFF,
            });
            let packed = pack(&file).expect("packs");
            let fv = file.kernel_view().expect("view");
            packed_view_agrees(
                &packed.view(),
                Some(&fv),
                &x,
                t,
                &isas,
                &format!("{kind:?}"),
            );
        }
    }

    /// The integer ISAs whose packed products of `view` are equal bit for bit: AVX-VNNI and AVX-512
    /// on every form (the same sums and float steps), AVX2 too on 4- and 5-bit codes (8-bit codes:
    /// AVX2 multiplies `q − 128`); NEON dotprod and i8mm on every form (one kernel).
    fn bit_equal_isas(view: &Weights) -> Vec<QIsa> {
        #[cfg(target_arch = "x86_64")]
        match view {
            Weights::Packed { bits: 4 | 5, .. } => {
                return vec![QIsa::Avx2, QIsa::AvxVnni, QIsa::Avx512Vnni]
            }
            Weights::Packed { .. } => return vec![QIsa::AvxVnni, QIsa::Avx512Vnni],
            _ => {}
        }
        #[cfg(target_arch = "aarch64")]
        if matches!(view, Weights::Packed { .. }) {
            return vec![QIsa::NeonDot, QIsa::NeonI8mm];
        }
        let _ = view;
        Vec::new()
    }

    #[test]
    fn leaves_alone_what_it_cannot_pack_losslessly() {
        let mut rng = StdRng::seed_from_u64(3);
        let (n, k) = (4, 64);
        let nb = n * k / BLOCK;
        let codes: Vec<u8> = (0..nb * 32).map(|_| rng.random_range(0..32u8)).collect();
        let b = Tensor::from_slice(DType::U8, &[codes.len()], &codes);
        let f16s = Tensor::f32(&[nb], &f16_values(&mut rng, nb, 0.05));
        let make = |scales: &Tensor, zero: &[u8]| {
            let z = Tensor::from_slice(DType::U8, &[nb], zero);
            LinearWeights::block(n, k, 8, BLOCK, b.clone(), scales.clone(), Some(&z)).unwrap()
        };
        // Scales that are not f16 values stay f32 (packed, not narrowed).
        let off = Tensor::f32(&[nb], &vec![0.1f32; nb]);
        let p = pack(&make(&off, &vec![16; nb])).expect("f32 scales pack");
        assert!(matches!(p.scales, Floats::F32(_)), "f32 scales kept as f32");
        // A float zero point whose s·z is not finite.
        let nibbles = Tensor::from_slice(DType::U8, &[nb * 16], &vec![0x21u8; nb * 16]);
        let mut zf = vec![3.0f32; nb];
        zf[1] = f32::INFINITY;
        let inf = LinearWeights::block(
            n,
            k,
            4,
            BLOCK,
            nibbles,
            f16s.clone(),
            Some(&Tensor::f32(&[nb], &zf)),
        )
        .unwrap();
        assert!(pack(&inf).is_none(), "an infinite s·z");
        // A zero point per block that differs.
        let mut mixed = vec![16u8; nb];
        mixed[3] = 15;
        assert!(pack(&make(&f16s, &mixed)).is_none(), "mixed zero points");
        // Blocks of 16 (Q6_K's form).
        let z16 = Tensor::from_slice(DType::U8, &[2 * nb], &vec![32u8; 2 * nb]);
        let s16 = Tensor::f32(&[2 * nb], &vec![0.5; 2 * nb]);
        let halves = LinearWeights::block(n, k, 8, 16, b.clone(), s16, Some(&z16)).unwrap();
        assert!(pack(&halves).is_none(), "blocks of 16");
        // One code of 32 keeps 8 bits.
        let mut wide = codes.clone();
        wide[17] = 32;
        let bw = Tensor::from_slice(DType::U8, &[wide.len()], &wide);
        let z = Tensor::from_slice(DType::U8, &[nb], &vec![16u8; nb]);
        let w = LinearWeights::block(n, k, 8, BLOCK, bw, f16s, Some(&z)).unwrap();
        assert_eq!(pack(&w).expect("packs").bits, 8);
    }
}
