//! GGUF's block encodings (ggml's `Q*_0`, `Q*_1`, `Q*_K`) read as sub-blocks of integer codes with one
//! affine map each — the shape every MatMulNBits form shares — following ggml's `dequantize_row_*`
//! (ggml-quants.c) operation for operation, so [`SubBlock::value`] is llama.cpp's dequantization bit for
//! bit (checked against gguf-py's port in `tests/fixtures/ggml/`).
//!
//! | type | block | sub-block | codes | map |
//! |---|---|---|---|---|
//! | Q8_0 | 32 | 32 | i8 + 128 | (q − 128)·d |
//! | Q4_0 | 32 | 32 | 4 bits | (q − 8)·d |
//! | Q4_1 | 32 | 32 | 4 bits | d·q + m |
//! | Q5_0 | 32 | 32 | 5 bits | (q − 16)·d |
//! | Q5_1 | 32 | 32 | 5 bits | d·q + m |
//! | Q4_K | 256 | 32 | 4 bits | (d·sc)·q − dmin·m (6-bit sc, m) |
//! | Q5_K | 256 | 32 | 5 bits | (d·sc)·q − dmin·m |
//! | Q6_K | 256 | 16 | 6 bits | (d·sc)·(q − 32) (i8 sc) |
//!
//! `d·sc` and `dmin·m` are exact in f32 (an f16 times an integer of at most 8 bits), so each map has a
//! single f32 scale.

use half::f16;

use crate::source::SourceDType;

/// How a sub-block's codes become values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Offset {
    /// `(q − z)·s`: exact in every block form with integer zero points.
    Zero(u8),
    /// `s·q − m` (ggml's "min" forms; Q4_1/Q5_1 store `+m`, kept here negated, which is exact).
    Min(f32),
}

/// Up to 32 codes sharing one scale and offset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubBlock {
    /// Codes, `len` of them used.
    pub q: [u8; 32],
    /// Codes in this sub-block (16 or 32).
    pub len: usize,
    /// Scale `s`.
    pub scale: f32,
    /// Zero point or minimum.
    pub offset: Offset,
}

impl SubBlock {
    /// Value of code `i`, computed as ggml does.
    pub fn value(&self, i: usize) -> f32 {
        let q = self.q[i];
        match self.offset {
            Offset::Zero(z) => (i32::from(q) - i32::from(z)) as f32 * self.scale,
            Offset::Min(m) => self.scale * f32::from(q) - m,
        }
    }

    /// The codes in use.
    pub fn codes(&self) -> &[u8] {
        &self.q[..self.len]
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn sub(len: usize, scale: f32, offset: Offset, code: impl Fn(usize) -> u8) -> SubBlock {
    let mut q = [0u8; 32];
    for (i, v) in q.iter_mut().enumerate().take(len) {
        *v = code(i);
    }
    SubBlock {
        q,
        len,
        scale,
        offset,
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Calls `f` with every sub-block of one stored block of `dtype` (`blk` is exactly
/// [`SourceDType::block_bytes`] long), in element order. Float types have no sub-blocks.
pub fn for_each_sub_block(dtype: SourceDType, blk: &[u8], mut f: impl FnMut(SubBlock)) {
    use SourceDType::*;
    match dtype {
        F32 | F16 | BF16 => {}
        Q8_0 => f(sub(32, f16_at(blk, 0), Offset::Zero(128), |i| {
            (blk[2 + i] as i8 as i16 + 128) as u8
        })),
        Q4_0 | Q4_1 => {
            let (offset, qs) = if dtype == Q4_0 {
                (Offset::Zero(8), &blk[2..18])
            } else {
                (Offset::Min(-f16_at(blk, 2)), &blk[4..20])
            };
            f(sub(32, f16_at(blk, 0), offset, |i| {
                if i < 16 {
                    qs[i] & 15
                } else {
                    qs[i - 16] >> 4
                }
            }))
        }
        Q5_0 | Q5_1 => {
            let (offset, at) = if dtype == Q5_0 {
                (Offset::Zero(16), 2)
            } else {
                (Offset::Min(-f16_at(blk, 2)), 4)
            };
            let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
            let qs = &blk[at + 4..at + 20];
            f(sub(32, f16_at(blk, 0), offset, |i| {
                let low = if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 };
                low | ((((qh >> i) & 1) as u8) << 4)
            }))
        }
        Q4_K | Q5_K => {
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let scales = &blk[4..16];
            let (qh, ql) = if dtype == Q4_K {
                (None, &blk[16..144])
            } else {
                (Some(&blk[16..48]), &blk[48..176])
            };
            for chunk in 0..4 {
                let q = &ql[32 * chunk..32 * chunk + 32];
                for half in 0..2 {
                    let j = 2 * chunk + half;
                    let (sc, m) = scale_min_k4(j, scales);
                    let offset = Offset::Min(dmin * f32::from(m));
                    f(sub(32, d * f32::from(sc), offset, |l| {
                        let low = if half == 0 { q[l] & 15 } else { q[l] >> 4 };
                        let high = qh.map_or(0, |h| (h[l] >> j) & 1);
                        low | (high << 4)
                    }))
                }
            }
        }
        Q6_K => {
            let (ql, qh, sc) = (&blk[..128], &blk[128..192], &blk[192..208]);
            let d = f16_at(blk, 208);
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                // ggml writes y[l + 32·r] for r = 0..4 from ql[l] / ql[l + 32] and bits 2r..2r+2 of qh[l]
                for r in 0..4 {
                    let code = |l: usize| {
                        let low = match r {
                            0 => ql[l] & 15,
                            1 => ql[l + 32] & 15,
                            2 => ql[l] >> 4,
                            _ => ql[l + 32] >> 4,
                        };
                        low | (((qh[l] >> (2 * r)) & 3) << 4)
                    };
                    for is in 0..2 {
                        let s = d * f32::from(sc[is + 2 * r] as i8);
                        f(sub(16, s, Offset::Zero(32), |i| code(16 * is + i)))
                    }
                }
            }
        }
    }
}

/// Dequantizes whole blocks of `dtype` (`data.len()` a multiple of the block size) to f32, as ggml does.
pub fn dequantize_blocks(dtype: SourceDType, data: &[u8], out: &mut Vec<f32>) {
    for blk in data.chunks_exact(dtype.block_bytes()) {
        for_each_sub_block(dtype, blk, |s| out.extend((0..s.len).map(|i| s.value(i))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testutil::make_blocks;
    use crate::quant::{dequantize, dequantize_source, encode_matrix, Form, Quantize};
    use crate::source::SourceTensor;
    use rand::{Rng, SeedableRng};

    const TYPES: [SourceDType; 8] = [
        SourceDType::Q8_0,
        SourceDType::Q4_0,
        SourceDType::Q4_1,
        SourceDType::Q5_0,
        SourceDType::Q5_1,
        SourceDType::Q4_K,
        SourceDType::Q5_K,
        SourceDType::Q6_K,
    ];

    #[test]
    fn every_block_type_dequantizes_as_llama_cpp_does_bit_for_bit() {
        // tests/fixtures/ggml/blocks.json: gguf-py's port of ggml's dequantize_row_* on random blocks
        // (scripts/refs/gen_ggml_blocks.py)
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/fixtures/ggml/blocks.json")).unwrap();
        for dtype in TYPES {
            let case = &fixture[format!("{dtype:?}")];
            let hex = case["blocks"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            let want: Vec<u32> = case["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let mut got = Vec::new();
            dequantize_blocks(dtype, &bytes, &mut got);
            assert_eq!(got.len(), want.len(), "{dtype:?}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    *w,
                    "{dtype:?} element {i}: {g} vs llama.cpp's {}",
                    f32::from_bits(*w)
                );
            }
        }
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn stored_forms_keep_every_value() {
        let (n, k) = (3, 512);
        for (i, dtype) in TYPES.into_iter().enumerate() {
            let mut v = random(n * k, i as u64);
            // a constant sub-block and a zero one
            v[64..96].iter_mut().for_each(|x| *x = -0.25);
            v[96..128].iter_mut().for_each(|x| *x = 0.0);
            let t = SourceTensor {
                dtype,
                shape: vec![n, k],
                data: make_blocks(dtype, &v).into(),
            };
            let src = dequantize_source("w", &t).unwrap();
            let err = src
                .iter()
                .zip(&v)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 0.15, "{dtype:?}: the test quantizer is off by {err}");
            let m = encode_matrix("w", &t, Quantize::Keep).unwrap();
            let exact = match &m.form {
                Form::Block4 { .. } => !matches!(dtype, SourceDType::Q4_1 | SourceDType::Q4_K),
                Form::Block8 { .. } => true,
                other => panic!("{dtype:?} stored as {other:?}"),
            };
            let got = dequantize(&m);
            let mut bounds = Vec::new();
            for blk in t.data.chunks_exact(dtype.block_bytes()) {
                for_each_sub_block(dtype, blk, |sb| {
                    for i in 0..sb.len {
                        let m = match sb.offset {
                            Offset::Zero(_) => 0.0,
                            Offset::Min(m) => m.abs(),
                        };
                        bounds.push((sb.scale * f32::from(sb.q[i])).abs() + m);
                    }
                })
            }
            for (j, ((g, s), b)) in got.iter().zip(&src).zip(&bounds).enumerate() {
                if exact {
                    assert_eq!(g.to_bits(), s.to_bits(), "{dtype:?} element {j}");
                } else {
                    assert!(
                        (g - s).abs() <= b * 2f32.powi(-22),
                        "{dtype:?} {j}: {g} vs {s}"
                    );
                }
            }
            // constant sub-blocks stay exact in every form
            assert_eq!(got[64..128], src[64..128], "{dtype:?}");
        }
    }

    #[test]
    fn q6_k_keeps_its_sixteen_element_blocks() {
        let v = random(2 * 256, 9);
        let t = SourceTensor {
            dtype: SourceDType::Q6_K,
            shape: vec![2, 256],
            data: make_blocks(SourceDType::Q6_K, &v).into(),
        };
        let m = encode_matrix("w", &t, Quantize::Keep).unwrap();
        let Form::Block8 { block, zeros, .. } = &m.form else {
            panic!("{:?}", m.form)
        };
        assert_eq!((*block, zeros.bytes().len()), (16, 32));
        assert_eq!(m.form_name(), "q8");
    }

    #[test]
    fn partial_blocks_and_short_data_name_the_tensor() {
        let t = SourceTensor {
            dtype: SourceDType::Q4_K,
            shape: vec![2, 128],
            data: vec![0u8; 144].into(),
        };
        let e = encode_matrix("blk.0.ffn_up.weight", &t, Quantize::Keep).unwrap_err();
        assert!(e.to_string().contains("blk.0.ffn_up.weight") && e.to_string().contains("256"));
        let t = SourceTensor {
            dtype: SourceDType::Q6_K,
            shape: vec![1, 256],
            data: vec![0u8; 209].into(),
        };
        let e = encode_matrix("output.weight", &t, Quantize::Keep).unwrap_err();
        assert!(e.to_string().contains("210"), "{e}");
    }

    #[test]
    fn every_requested_form_takes_every_block_type() {
        for (i, dtype) in TYPES.into_iter().enumerate() {
            let v = random(4 * 256, 20 + i as u64);
            let t = SourceTensor {
                dtype,
                shape: vec![4, 256],
                data: make_blocks(dtype, &v).into(),
            };
            let src = dequantize_source("w", &t).unwrap();
            for q in [Quantize::F16, Quantize::Int8, Quantize::Q8, Quantize::Int4] {
                let got = dequantize(&encode_matrix("w", &t, q).unwrap());
                let err = got
                    .iter()
                    .zip(&src)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err < 0.15, "{dtype:?} → {q:?}: {err}");
            }
        }
    }
}
