//! Block weights repacked at load into the compact forms the integer kernels read
//! ([`Weights::Packed`]), so a decode step reads fewer bytes.
//!
//! The file keeps every weight in a form onnxruntime runs: `MatMulNBits` of 4 or 8 bits with f32
//! scales and per-block zero points. That costs bytes the source did not have — GGUF Q5_0's 5-bit
//! codes become 8-bit bytes, its f16 scales f32, its one zero point (16) a byte a block — and a
//! decode step reads every weight once, so those bytes are time. When the CPU's integer kernels
//! read packed forms ([`QIsa::packs`]) and the precision is [`Precision::Fast`](super::linear::Precision),
//! the CPU backend repacks each 32-block matrix whose values allow it, **losslessly**:
//!
//! - scales are kept as f16 only when every one is an f16 value (GGUF's are);
//! - one zero point for the whole matrix (Q8_0: 128, Q5_0: 16, Q4_0: 8) becomes a constant;
//!   otherwise (Q4_1's float zero points) each block's `s·z` is kept as f16 only where it is within
//!   a few f32 roundings of an f16 value (`−m`, which Q4_1 stores as f16);
//! - 8-bit codes that are all below 32 (Q5_0's) become 5 bits: the low nibbles as the 4-bit forms
//!   lay them out, plus one u32 of fifth bits a block.
//!
//! Every packed product equals the file form's (the same integer sums, the same factors: tested bit
//! for bit); anything else (block 16, scales off f16, mixed zero points with 8-bit codes) stays as
//! the file has it. The file's pages the packed copy replaces are handed back to the OS
//! ([`release`]), so resident memory falls with the bytes read.
//!
//! Sizes per 32 weights (file form → packed): 8-bit codes 37 → 34 bytes, Q5_0's 37 → 22, 4-bit
//! codes 24 → 20.

use std::collections::HashMap;
use std::sync::Arc;

use half::f16;
use rayon::prelude::*;

use super::linear::{PackedZero, Weights, BLOCK};
use super::linear_q8::QIsa;
use crate::file_map::release;
use crate::graph::DType;
use crate::plan::{Plan, Step};
use crate::tensor::Tensor;
use crate::weights::{LinearWeights, WeightForm};

/// A matrix in a packed form: its buffers owned, or (8- and 4-bit codes) the file's own codes.
#[derive(Debug)]
pub(crate) struct PackedMatrix {
    n: usize,
    k: usize,
    bits: u32,
    codes: Tensor,
    high: Vec<u8>,
    scales: Vec<f16>,
    zero: Zero,
}

/// The owned zero-point term of a [`PackedMatrix`].
#[derive(Debug)]
enum Zero {
    Const(f32),
    Scaled(Vec<f16>),
}

impl PackedMatrix {
    /// The kernels' view.
    pub(crate) fn view(&self) -> Weights<'_> {
        Weights::Packed {
            bits: self.bits,
            codes: self.codes.typed(),
            high: &self.high,
            scales: &self.scales,
            zero: match &self.zero {
                Zero::Const(z) => PackedZero::Const(*z),
                Zero::Scaled(sz) => PackedZero::Scaled(sz),
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
    let scales16 = exact_f16(s32)?;
    let zero = match (bits, zero.dtype) {
        (8, DType::U8) => Zero::Const(constant(zero.typed::<u8>())? as f32),
        (4, DType::F32) => {
            let z: &[f32] = zero.typed();
            match constant(z) {
                Some(c) => Zero::Const(c),
                None => Zero::Scaled(scaled_zeros(s32, z)?),
            }
        }
        _ => return None,
    };
    let codes: &[u8] = b.typed();
    let (bits, codes, high) = match bits {
        8 if codes.iter().all(|&q| q < 32) => {
            let (low, high) = five_bits(codes);
            (5, Tensor::from_slice(DType::U8, &[low.len()], &low), high)
        }
        _ => (*bits, b.clone(), Vec::new()),
    };
    let packed = PackedMatrix {
        n: w.n,
        k: w.k,
        bits,
        codes,
        high,
        scales: scales16,
        zero,
    };
    packed.view().validate().ok()?;
    Some(packed)
}

/// `v` as f16 when every value is one exactly.
fn exact_f16(v: &[f32]) -> Option<Vec<f16>> {
    let mut out = vec![f16::ZERO; v.len()];
    half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut out[..], v);
    let back = out.iter().zip(v).all(|(h, &s)| h.to_f32() == s);
    back.then_some(out)
}

/// The one value every element has.
fn constant<T: Copy + PartialEq>(v: &[T]) -> Option<T> {
    let first = *v.first()?;
    v.iter().all(|&x| x == first).then_some(first)
}

/// Each block's `s·z` as f16, when each is within a few f32 roundings of its f16 value (Q4_1:
/// `s·z = d·(−m/d) ≈ −m`, an f16 in the source).
fn scaled_zeros(s: &[f32], z: &[f32]) -> Option<Vec<f16>> {
    s.iter()
        .zip(z)
        .map(|(&s, &z)| {
            let sz = s * z;
            let h = f16::from_f32(sz);
            let err = (h.to_f32() - sz).abs();
            (sz.is_finite() && err <= sz.abs() * 4.0 * f32::EPSILON).then_some(h)
        })
        .collect()
}

/// 8-bit codes below 32 as 5 bits: the low nibbles in the 4-bit forms' layout (element 2j the low
/// nibble of byte j of its block) and a little-endian u32 a block of fifth bits. Eight codes at a
/// time as one u64; pieces of blocks in parallel.
fn five_bits(codes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    const PIECE: usize = 4096;
    let blocks = codes.len() / BLOCK;
    let mut low = vec![0u8; blocks * 16];
    let mut high = vec![0u8; blocks * 4];
    codes
        .par_chunks(PIECE * BLOCK)
        .zip(low.par_chunks_mut(PIECE * 16))
        .zip(high.par_chunks_mut(PIECE * 4))
        .for_each(|((q, lo), hi)| {
            for ((q, lo), hi) in q
                .chunks_exact(8)
                .zip(lo.chunks_exact_mut(4))
                .zip(hi.iter_mut())
            {
                let w = u64::from_le_bytes(q.try_into().expect("8 codes"));
                // Bit 4 of byte i to bit i: the multiply moves each to its own bit of the top byte.
                *hi = (((w >> 4) & 0x0101_0101_0101_0101).wrapping_mul(0x0102_0408_1020_4080) >> 56)
                    as u8;
                // Byte 2j takes code 2j + 1's nibble above its own; the even bytes are the pairs.
                let nib = w & 0x0F0F_0F0F_0F0F_0F0F;
                let pairs = (nib | nib >> 4).to_le_bytes();
                for (j, l) in lo.iter_mut().enumerate() {
                    *l = pairs[2 * j];
                }
            }
        });
    (low, high)
}

/// The packed forms of a plan's CPU linear layers, by the address of their shared weights.
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
                release_replaced(w, &p);
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

/// Hands back the file pages of `w`'s buffers that `p` no longer reads ([`release`]): its scales and
/// zero points, and its codes when they were repacked.
fn release_replaced(w: &LinearWeights, p: &PackedMatrix) {
    if let WeightForm::Block {
        b, scales, zero, ..
    } = &w.form
    {
        release(scales.bytes());
        release(zero.bytes());
        if p.bits == 5 {
            release(b.bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::linear::{linear_isa, Activations};
    use crate::backend::cpu::linear_q8;
    use crate::backend::cpu::simd::Isa;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The GGUF-like block forms the exporter writes, as the file holds them.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Kind {
        /// 8-bit codes, zero point 128 everywhere.
        Q8_0,
        /// 8-bit codes below 32, zero point 16 everywhere.
        Q5_0,
        /// 4-bit codes, zero point 8 everywhere.
        Q4_0,
        /// 4-bit codes, float zero points `−m/d` (d, m f16).
        Q4_1,
    }

    fn f16_values(rng: &mut StdRng, count: usize, range: f32) -> Vec<f32> {
        (0..count)
            .map(|_| f16::from_f32(rng.random_range(-range..range)).to_f32())
            .collect()
    }

    /// A random `[n, k]` matrix of `kind` in the file's form.
    fn file_form(kind: Kind, n: usize, k: usize, rng: &mut StdRng) -> LinearWeights {
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
        };
        let b = Tensor::from_slice(DType::U8, &[codes.len()], &codes);
        LinearWeights::block(n, k, bits, BLOCK, b, Tensor::f32(&[nb], &d), Some(&zero))
            .expect("a valid block matrix")
    }

    fn product(w: &Weights, x: &[f32], t: usize, acts: Activations, qisa: QIsa) -> Vec<f32> {
        let mut out = vec![f32::NAN; t * w.n()];
        linear_isa(x, t, w, None, &mut out, acts, (Isa::Scalar, qisa), None).expect("runs");
        out
    }

    #[test]
    fn packs_each_gguf_form_into_its_compact_form_with_the_same_values() {
        let mut rng = StdRng::seed_from_u64(7);
        let want_bits = [
            (Kind::Q8_0, 8),
            (Kind::Q5_0, 5),
            (Kind::Q4_0, 4),
            (Kind::Q4_1, 4),
        ];
        for (kind, bits) in want_bits {
            let (n, k) = (5, 96);
            let file = file_form(kind, n, k, &mut rng);
            let packed = pack(&file).unwrap_or_else(|| panic!("{kind:?} packs"));
            assert_eq!(packed.bits, bits, "{kind:?}");
            assert!(packed.byte_len() < file.byte_len(), "{kind:?} shrinks");
            let (fv, pv) = (file.kernel_view().expect("view"), packed.view());
            for row in 0..n {
                for col in 0..k {
                    let (a, b) = (fv.get(row, col), pv.get(row, col));
                    // Q4_1: s·z kept as the f16 it came from, within f32 roundings of the file's.
                    let tol = if kind == Kind::Q4_1 { 1e-6 } else { 0.0 };
                    assert!((a - b).abs() <= tol, "{kind:?} [{row},{col}]: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn packed_products_equal_the_file_forms_on_every_integer_isa() {
        let mut rng = StdRng::seed_from_u64(11);
        // K of 17 blocks: one full group of 16 and a lone block; T = 5: a tile of 4 and a row.
        for (kind, n, k, t) in [
            (Kind::Q8_0, 33, 544, 1),
            (Kind::Q5_0, 33, 544, 5),
            (Kind::Q5_0, 7, 64, 1),
            (Kind::Q4_0, 9, 544, 5),
            (Kind::Q4_1, 9, 544, 1),
            (Kind::Q4_1, 16, 96, 5),
        ] {
            let file = file_form(kind, n, k, &mut rng);
            let packed = pack(&file).expect("packs");
            let x: Vec<f32> = (0..t * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            for qisa in linear_q8::available() {
                for acts in [Activations::Int8, Activations::Int8x2] {
                    // Where an ISA does not read packed forms they run the portable path.
                    let file_isa = if qisa.packs() { qisa } else { QIsa::Scalar };
                    let want = product(&file.kernel_view().expect("view"), &x, t, acts, file_isa);
                    let got = product(&packed.view(), &x, t, acts, qisa);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        if kind == Kind::Q4_1 {
                            let tol = 1e-5 * (1.0 + w.abs());
                            assert!(
                                (g - w).abs() <= tol,
                                "{kind:?} {qisa:?} {acts:?} [{i}]: {g} vs {w}"
                            );
                        } else {
                            assert_eq!(
                                g.to_bits(),
                                w.to_bits(),
                                "{kind:?} {qisa:?} {acts:?} [{i}]: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
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
        // Scales that are not f16 values.
        let off = Tensor::f32(&[nb], &vec![0.1f32; nb]);
        assert!(pack(&make(&off, &vec![16; nb])).is_none(), "f32 scales");
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
