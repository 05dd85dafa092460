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
    /// Borrows the weights in the kernel's form (no copy). Fails only for block sizes other than 32
    /// (and 16 for 8-bit codes with `K % 32 == 0`), which then run through [`LinearWeights::apply`].
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
                // Blocks of 32, or 8-bit blocks of 16 in rows of whole 32s (their halves).
                let halves =
                    *block == linear::BLOCK / 2 && *bits == 8 && k.is_multiple_of(linear::BLOCK);
                if *block != linear::BLOCK && !halves {
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
                        halves,
                    },
                    _ => return None,
                }
            }
        })
    }

    /// `out[m, n] = x[m, k] · Wᵀ (+ bias)` with the fastest exact kernel for the encoding.
    #[cfg(test)]
    pub fn forward(
        &self,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<(), String> {
        let mut cache = linear::QuantCache::default();
        self.forward_with(x, m, bias, out, linear::Activations::F32, &mut cache, 0)
    }

    /// [`LinearWeights::forward`] at kernel level `acts`; quantized activations of input `key` come
    /// from (or go into) `cache` (see [`linear::linear_cached`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with(
        &self,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
        acts: linear::Activations,
        cache: &mut linear::QuantCache,
        key: usize,
    ) -> Result<(), String> {
        match self.kernel_view() {
            Some(w) => linear::linear_cached(x, m, &w, bias, out, acts, cache, key)
                .map_err(|e| e.to_string()),
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
    /// Bytes of weight data one product reads (every buffer of the encoding, bias excluded).
    pub fn byte_len(&self) -> usize {
        match &self.form {
            WeightForm::F32(w) | WeightForm::F16(w) | WeightForm::BF16(w) => w.bytes().len(),
            WeightForm::Int8PerChannel { q, scale } => q.bytes().len() + scale.bytes().len(),
            WeightForm::Block {
                b, scales, zero, ..
            } => b.bytes().len() + scales.bytes().len() + zero.bytes().len(),
        }
    }

    /// The encoding as [`LinearWeights::concat`] compares it: the form, its bits and block size, and
    /// the element types of its tensors.
    fn encoding(&self) -> (std::mem::Discriminant<WeightForm>, u32, usize, Vec<DType>) {
        let d = std::mem::discriminant(&self.form);
        match &self.form {
            WeightForm::F32(t) | WeightForm::F16(t) | WeightForm::BF16(t) => {
                (d, 0, 0, vec![t.dtype])
            }
            WeightForm::Int8PerChannel { q, scale } => (d, 8, 0, vec![q.dtype, scale.dtype]),
            WeightForm::Block {
                bits,
                block,
                b,
                scales,
                zero,
            } => (d, *bits, *block, vec![b.dtype, scales.dtype, zero.dtype]),
        }
    }

    /// Whether [`LinearWeights::concat`] takes `parts` (the same `k` and encoding), without the copy.
    pub fn stackable(parts: &[&LinearWeights]) -> bool {
        let Some(first) = parts.first() else {
            return false;
        };
        let e = first.encoding();
        parts.iter().all(|p| p.k == first.k && p.encoding() == e)
    }

    /// The rows of `parts` stacked into one `[Σ n, k]` layer (a copy), for kernels that run several
    /// layers of one input as one pass. `None` unless every part has the same `k` and the same encoding
    /// (for block forms: bits, block size and zero-point type).
    #[cfg(feature = "gpu")]
    pub fn concat(parts: &[&LinearWeights]) -> Option<LinearWeights> {
        let first = parts.first()?;
        let k = first.k;
        let n = parts.iter().map(|p| p.n).sum();
        if parts.iter().any(|p| p.k != k) {
            return None;
        }
        let cat = |get: &dyn Fn(&LinearWeights) -> Option<&Tensor>| -> Option<Tensor> {
            let ts: Vec<&Tensor> = parts.iter().map(|p| get(p)).collect::<Option<_>>()?;
            let dtype = ts[0].dtype;
            if ts.iter().any(|t| t.dtype != dtype) {
                return None;
            }
            let mut bytes = Vec::with_capacity(ts.iter().map(|t| t.bytes().len()).sum());
            let mut len = 0;
            for t in &ts {
                bytes.extend_from_slice(t.bytes());
                len += t.numel();
            }
            Some(Tensor::mapped(dtype, &[len], bytes.into()))
        };
        let form = match &first.form {
            WeightForm::F32(_) => WeightForm::F32(cat(&|p| match &p.form {
                WeightForm::F32(t) => Some(t),
                _ => None,
            })?),
            WeightForm::F16(_) => WeightForm::F16(cat(&|p| match &p.form {
                WeightForm::F16(t) => Some(t),
                _ => None,
            })?),
            WeightForm::BF16(_) => WeightForm::BF16(cat(&|p| match &p.form {
                WeightForm::BF16(t) => Some(t),
                _ => None,
            })?),
            WeightForm::Int8PerChannel { .. } => WeightForm::Int8PerChannel {
                q: cat(&|p| match &p.form {
                    WeightForm::Int8PerChannel { q, .. } => Some(q),
                    _ => None,
                })?,
                scale: cat(&|p| match &p.form {
                    WeightForm::Int8PerChannel { scale, .. } => Some(scale),
                    _ => None,
                })?,
            },
            WeightForm::Block { bits, block, .. } => {
                let same = |p: &LinearWeights| match &p.form {
                    WeightForm::Block {
                        bits: b, block: k, ..
                    } => b == bits && k == block,
                    _ => false,
                };
                if !parts.iter().all(|p| same(p)) {
                    return None;
                }
                fn field(p: &LinearWeights, i: usize) -> Option<&Tensor> {
                    match &p.form {
                        WeightForm::Block {
                            b, scales, zero, ..
                        } => Some([b, scales, zero][i]),
                        _ => None,
                    }
                }
                WeightForm::Block {
                    bits: *bits,
                    block: *block,
                    b: cat(&|p| field(p, 0))?,
                    scales: cat(&|p| field(p, 1))?,
                    zero: cat(&|p| field(p, 2))?,
                }
            }
        };
        Some(LinearWeights { n, k, form })
    }

    /// Whether `other` is the same matrix in the same encoding over the same bytes (a tied embedding
    /// and output layer): the main tensors are the same memory; zero points unpacked per layer may be
    /// copies, compared by value.
    pub fn same_weights(&self, other: &LinearWeights) -> bool {
        let same =
            |a: &Tensor, b: &Tensor| a.dtype == b.dtype && std::ptr::eq(a.bytes(), b.bytes());
        if self.n != other.n || self.k != other.k {
            return false;
        }
        match (&self.form, &other.form) {
            (WeightForm::F32(a), WeightForm::F32(b))
            | (WeightForm::F16(a), WeightForm::F16(b))
            | (WeightForm::BF16(a), WeightForm::BF16(b)) => same(a, b),
            (
                WeightForm::Int8PerChannel { q, scale },
                WeightForm::Int8PerChannel {
                    q: q2,
                    scale: scale2,
                },
            ) => same(q, q2) && same(scale, scale2),
            (
                WeightForm::Block {
                    bits,
                    block,
                    b,
                    scales,
                    zero,
                },
                WeightForm::Block {
                    bits: bits2,
                    block: block2,
                    b: b2,
                    scales: scales2,
                    zero: zero2,
                },
            ) => {
                bits == bits2
                    && block == block2
                    && same(b, b2)
                    && same(scales, scales2)
                    && zero.dtype == zero2.dtype
                    && zero.bytes() == zero2.bytes()
            }
            _ => false,
        }
    }

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
        let arg = |i: usize, what: &str| -> Result<Tensor, String> {
            Ok(inputs
                .get(i)
                .copied()
                .flatten()
                .ok_or(format!("input {what} is missing"))?
                .clone())
        };
        Self::block(
            n,
            k,
            bits,
            block,
            arg(1, "B")?,
            arg(2, "scales")?,
            inputs.get(3).copied().flatten(),
        )
    }

    /// A `[n, k]` matrix of `bits`-bit blocks of `block` along K (the `MatMulNBits` layout): `b` u8
    /// `[n, k/block, block·bits/8]`, `scales` f32 (`n·k/block`), zero points f32 (`n·k/block`), u8
    /// (8-bit: one a byte; 4-bit: two a byte, unpacked here) or absent (the midpoint).
    pub fn block(
        n: usize,
        k: usize,
        bits: u32,
        block: usize,
        b: Tensor,
        scales: Tensor,
        zero: Option<&Tensor>,
    ) -> Result<Self, String> {
        if !(bits == 4 || bits == 8) || block < 16 || !block.is_power_of_two() {
            return Err(format!(
                "bits={bits} block_size={block} not supported (bits 4 or 8, power-of-two blocks ≥ 16)"
            ));
        }
        let nb = k.div_ceil(block);
        let blob = block * bits as usize / 8;
        if b.dtype != DType::U8 || b.numel() != n * nb * blob {
            return Err(format!(
                "B must be u8 with {} bytes ([{n}, {nb}, {blob}]), got {} {:?}",
                n * nb * blob,
                b.dtype,
                b.shape
            ));
        }
        if scales.dtype != DType::F32 || scales.numel() != n * nb {
            return Err(format!(
                "scales must be f32 with {} entries, got {} {:?}",
                n * nb,
                scales.dtype,
                scales.shape
            ));
        }
        let default_zero = 1u32 << (bits - 1);
        let zero = match zero {
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
        if !k.is_multiple_of(block) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Attr;

    /// `MatMulNBits` with 4-bit zero points packed two per byte (MatMulNBits' standard layout, what
    /// `--quantize int4` writes): K = 96 gives three blocks per row, so each row's zero points take two
    /// bytes whose last high nibble is padding.
    #[test]
    fn packed_4bit_zero_points_odd_block_count() {
        let (n, k, nb) = (3usize, 96usize, 3usize);
        let mut node = Node {
            name: "l0.mlp.up".into(),
            op: "MatMulNBits".into(),
            domain: crate::contract::MS_DOMAIN.into(),
            inputs: vec![],
            outputs: vec![],
            attrs: Default::default(),
        };
        for (a, v) in [("K", k), ("N", n), ("bits", 4), ("block_size", 32)] {
            node.attrs.insert(a.into(), Attr::Int(v as i64));
        }
        // nibbles vary with position; zero points z(row, blk) distinct and spanning 0..15
        let b: Vec<u8> = (0..n * nb * 16)
            .map(|i| ((i * 7 % 16) | ((i * 5 + 3) % 16) << 4) as u8)
            .collect();
        let scales: Vec<f32> = (0..n * nb).map(|i| 0.01 + 0.003 * i as f32).collect();
        let z = |row: usize, blk: usize| ((row * 5 + blk * 3 + 1) % 16) as u8;
        let zp: Vec<u8> = (0..n)
            .flat_map(|r| [z(r, 0) | (z(r, 1) << 4), z(r, 2) | (15 << 4)])
            .collect();
        let bt = Tensor::from_slice(DType::U8, &[n, nb, 16], &b);
        let st = Tensor::f32(&[n * nb], &scales);
        let zt = Tensor::from_slice(DType::U8, &[n * 2], &zp);
        let w = LinearWeights::from_matmul_nbits(&node, &[None, Some(&bt), Some(&st), Some(&zt)])
            .unwrap();
        // decode_row against the MatMulNBits definition (the padding nibble 15 must not be read)
        let mut row = vec![0f32; k];
        for r in 0..n {
            w.decode_row(r, &mut row);
            for (col, &got) in row.iter().enumerate() {
                let (blk, i) = (col / 32, col % 32);
                let byte = b[(r * nb + blk) * 16 + i / 2];
                let q = if i % 2 == 0 { byte & 15 } else { byte >> 4 };
                let want = (q as f32 - z(r, blk) as f32) * scales[r * nb + blk];
                assert_eq!(got, want, "row {r} col {col}");
            }
        }
        // the kernel path agrees with the reference path on random input
        let m = 2;
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let (mut fast, mut slow) = (vec![0f32; m * n], vec![0f32; m * n]);
        w.forward(&x, m, None, &mut fast).unwrap();
        w.apply(&x, m, &mut slow);
        for (a, b) in fast.iter().zip(&slow) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
