//! Linear-layer weights in the encodings the step graph uses, bound to their (memory-mapped) bytes.
//!
//! A [`LinearWeights`] is what the planner builds once for each linear layer it recognizes
//! (`Gemm` with a constant `B`, possibly behind `Cast`/`DequantizeLinear`; `MatMulNBits` with constant
//! `B`/scales/zero points). The bytes are never expanded to f32: kernels decode blocks on the fly.

use half::{bf16, f16};

use crate::backend::cpu::linear;
use crate::graph::{DType, Node};
use crate::tensor::Tensor;

/// The encoding of a `[N, K]` weight matrix.
#[derive(Debug, Clone)]
pub enum WeightForm {
    /// f32 `[N, K]`.
    F32(Tensor),
    /// f16 `[N, K]`.
    F16(Tensor),
    /// bf16 `[N, K]`.
    BF16(Tensor),
    /// int8 `[N, K]` with one f32 scale per row.
    Int8PerChannel {
        /// Quantized values.
        q: Tensor,
        /// `[N]` scales.
        scale: Tensor,
    },
    /// 4- or 8-bit blocks along K (`MatMulNBits` layout): `b` u8 `[N, K/bs, bs·bits/8]`,
    /// `scales` f32 `[N·K/bs]`, `zero` f32 or u8 `[N·K/bs]` (u8 zero points unpacked).
    Block {
        /// Bits per weight (4 or 8).
        bits: u32,
        /// Block size along K.
        block: usize,
        /// Packed weights.
        b: Tensor,
        /// Scales.
        scales: Tensor,
        /// Zero points, one per block: f32 (4-bit forms) or u8 (8-bit forms) `[N·K/bs]`, read in place.
        zero: Tensor,
    },
}

impl LinearWeights {
    /// Borrows the weights in the kernel's form (no copy). Fails only for block sizes other than 32,
    /// which then run through [`LinearWeights::apply`].
    pub fn kernel_view(&self) -> Option<linear::Weights<'_>> {
        let (n, k) = (self.n, self.k);
        Some(match &self.form {
            WeightForm::F32(w) => linear::Weights::F32 { w: w.typed(), n, k },
            WeightForm::F16(w) => linear::Weights::F16 { w: w.typed(), n, k },
            WeightForm::BF16(w) => linear::Weights::Bf16 { w: w.typed(), n, k },
            WeightForm::Int8PerChannel { q, scale } => linear::Weights::Int8 {
                w: q.typed(),
                scales: scale.typed(),
                n,
                k,
            },
            WeightForm::Block {
                bits,
                block,
                b,
                scales,
                zero,
            } => {
                if *block != linear::BLOCK {
                    return None;
                }
                match (bits, zero.dtype) {
                    (4, DType::F32) => linear::Weights::Q4 {
                        b: b.typed(),
                        scales: scales.typed(),
                        zeros: zero.typed(),
                        n,
                        k,
                    },
                    (8, DType::U8) => linear::Weights::Q8 {
                        b: b.typed(),
                        scales: scales.typed(),
                        zeros: zero.typed(),
                        n,
                        k,
                    },
                    _ => return None,
                }
            }
        })
    }

    /// `out[m, n] = x[m, k] · Wᵀ (+ bias)` with the fastest kernel for the encoding.
    pub fn forward(
        &self,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<(), String> {
        match self.kernel_view() {
            Some(w) => linear::linear(x, m, &w, bias, out).map_err(|e| e.to_string()),
            None => {
                self.apply(x, m, out);
                if let Some(b) = bias {
                    for row in out.chunks_mut(self.n) {
                        row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
                    }
                }
                Ok(())
            }
        }
    }
}

/// A linear layer `y = x · Wᵀ` with `W` of shape `[n, k]`.
#[derive(Debug, Clone)]
pub struct LinearWeights {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Encoding.
    pub form: WeightForm,
}

impl LinearWeights {
    /// From a `Gemm` `B` input: `[N, K]` when `trans_b`, else `[K, N]` (transposed once, here).
    pub fn from_gemm_b(b: &Tensor, trans_b: bool) -> Result<Self, String> {
        if b.rank() != 2 {
            return Err(format!("B must be 2-D, got {:?}", b.shape));
        }
        let b = if trans_b {
            b.clone()
        } else {
            let (k, n) = (b.shape[0], b.shape[1]);
            let v = b.to_f32_vec("B").map_err(|e| e.to_string())?;
            let mut t = vec![0.0f32; n * k];
            for i in 0..k {
                for j in 0..n {
                    t[j * k + i] = v[i * n + j];
                }
            }
            Tensor::f32(&[n, k], &t)
        };
        let (n, k) = (b.shape[0], b.shape[1]);
        let form = match b.dtype {
            DType::F32 => WeightForm::F32(b),
            DType::F16 => WeightForm::F16(b),
            DType::BF16 => WeightForm::BF16(b),
            d => return Err(format!("Gemm B of {d} is not supported")),
        };
        Ok(LinearWeights { n, k, form })
    }

    /// From the inputs of a `MatMulNBits` node (`A, B, scales, zero_points?, g_idx?, bias?`).
    pub fn from_matmul_nbits(node: &Node, inputs: &[Option<&Tensor>]) -> Result<Self, String> {
        let k = node.attr_int("K", 0);
        let n = node.attr_int("N", 0);
        let bits = node.attr_int("bits", 4);
        let block = node.attr_int("block_size", 0);
        if k <= 0 || n <= 0 || !(bits == 4 || bits == 8) || block < 16 || (block & (block - 1)) != 0
        {
            return Err(format!(
                "K={k} N={n} bits={bits} block_size={block} not supported (bits 4 or 8, power-of-two blocks ≥ 16)"
            ));
        }
        if inputs.get(4).copied().flatten().is_some() {
            return Err("g_idx is not supported".into());
        }
        let (k, n, bits, block) = (k as usize, n as usize, bits as u32, block as usize);
        let nb = k.div_ceil(block);
        let blob = block * bits as usize / 8;
        let b = inputs
            .get(1)
            .copied()
            .flatten()
            .ok_or("B is missing")?
            .clone();
        if b.dtype != DType::U8 || b.numel() != n * nb * blob {
            return Err(format!(
                "B must be u8 with {} bytes ([{n}, {nb}, {blob}]), got {} {:?}",
                n * nb * blob,
                b.dtype,
                b.shape
            ));
        }
        let scales = inputs
            .get(2)
            .copied()
            .flatten()
            .ok_or("scales are missing")?
            .clone();
        if scales.dtype != DType::F32 || scales.numel() != n * nb {
            return Err(format!(
                "scales must be f32 with {} entries, got {} {:?}",
                n * nb,
                scales.dtype,
                scales.shape
            ));
        }
        let default_zero = 1u32 << (bits - 1);
        let zero = match inputs.get(3).copied().flatten() {
            Some(z) if z.dtype == DType::F32 && z.numel() == n * nb => z.clone(),
            Some(z) if z.dtype == DType::U8 && bits == 8 && z.numel() == n * nb => z.clone(),
            // Packed 4-bit zero points (two per byte): unpacked once, here (n·nb floats).
            Some(z) if z.dtype == DType::U8 && bits == 4 && z.numel() == n * nb.div_ceil(2) => {
                let zb = z.typed::<u8>();
                let per_row = nb.div_ceil(2);
                let v: Vec<f32> = (0..n * nb)
                    .map(|i| {
                        let (row, blk) = (i / nb, i % nb);
                        let byte = zb[row * per_row + blk / 2];
                        (if blk % 2 == 0 { byte & 15 } else { byte >> 4 }) as f32
                    })
                    .collect();
                Tensor::f32(&[n * nb], &v)
            }
            None if bits == 8 => {
                Tensor::from_slice(DType::U8, &[n * nb], &vec![default_zero as u8; n * nb])
            }
            None => Tensor::f32(&[n * nb], &vec![default_zero as f32; n * nb]),
            Some(z) => {
                return Err(format!(
                    "zero points {} {:?} do not fit {n}×{nb} blocks of {bits} bits",
                    z.dtype, z.shape
                ))
            }
        };
        if k % block != 0 {
            return Err(format!("K = {k} is not a multiple of block_size {block}"));
        }
        Ok(LinearWeights {
            n,
            k,
            form: WeightForm::Block {
                bits,
                block,
                b,
                scales,
                zero,
            },
        })
    }

    /// Decodes row `j` of W into `out` (`k` floats) — the reference decoder.
    pub fn decode_row(&self, j: usize, out: &mut [f32]) {
        let k = self.k;
        match &self.form {
            WeightForm::F32(w) => out.copy_from_slice(&w.typed::<f32>()[j * k..(j + 1) * k]),
            WeightForm::F16(w) => {
                for (o, v) in out.iter_mut().zip(&w.typed::<f16>()[j * k..(j + 1) * k]) {
                    *o = v.to_f32();
                }
            }
            WeightForm::BF16(w) => {
                for (o, v) in out.iter_mut().zip(&w.typed::<bf16>()[j * k..(j + 1) * k]) {
                    *o = v.to_f32();
                }
            }
            WeightForm::Int8PerChannel { q, scale } => {
                let s = scale.typed::<f32>()[j];
                for (o, &v) in out.iter_mut().zip(&q.typed::<i8>()[j * k..(j + 1) * k]) {
                    *o = v as f32 * s;
                }
            }
            WeightForm::Block {
                bits,
                block,
                b,
                scales,
                zero,
            } => {
                let nb = k / block;
                let blob = block * *bits as usize / 8;
                let bytes = b.bytes();
                let sc = scales.typed::<f32>();
                let zf = (zero.dtype == DType::F32).then(|| zero.typed::<f32>());
                let zu = zero.typed::<u8>();
                for blk in 0..nb {
                    let s = sc[j * nb + blk];
                    let z = match zf {
                        Some(zf) => zf[j * nb + blk],
                        None => zu[j * nb + blk] as f32,
                    };
                    let src = &bytes[(j * nb + blk) * blob..][..blob];
                    let dst = &mut out[blk * block..(blk + 1) * block];
                    if *bits == 8 {
                        for (o, &q) in dst.iter_mut().zip(src) {
                            *o = (q as f32 - z) * s;
                        }
                    } else {
                        for (i, &q) in src.iter().enumerate() {
                            dst[2 * i] = ((q & 15) as f32 - z) * s;
                            dst[2 * i + 1] = ((q >> 4) as f32 - z) * s;
                        }
                    }
                }
            }
        }
    }

    /// `out[m, n] = x[m, k] · Wᵀ` — the plain reference path (row decoded once, reused over `m`).
    pub fn apply(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        let mut row = vec![0.0f32; k];
        for j in 0..n {
            self.decode_row(j, &mut row);
            for i in 0..m {
                let xr = &x[i * k..(i + 1) * k];
                let mut acc = 0.0f32;
                for t in 0..k {
                    acc += xr[t] * row[t];
                }
                out[i * n + j] = acc;
            }
        }
    }
}
