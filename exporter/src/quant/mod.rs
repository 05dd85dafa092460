//! Weight forms (docs/GRAPH.md "Weight forms"): turns each source tensor into the initializers of the form
//! it will be stored in, keeping the source encoding unless the user asked for another one.

use bytes::Bytes;
use half::{bf16, f16};

use crate::source::{SourceDType, SourceTensor};

pub mod ggml;

/// What the user asked for (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantize {
    /// Keep the source encoding (GGUF blocks stay blocks, f16 stays f16).
    #[default]
    Keep,
    /// Everything in f16 (Cast + Gemm form).
    F16,
    /// Per-channel symmetric int8 (DequantizeLinear form).
    Int8,
    /// Symmetric 8-bit blocks of 32 with f16 scales and zero point 128 (GGUF Q8_0's values, in the
    /// MatMulNBits form): what the runtime's integer kernels read fastest. GGUF Q8_0 is kept as it is.
    Q8,
    /// Asymmetric 4-bit blocks of 32 (MatMulNBits form). GGUF Q4_0/Q4_1/Q4_K are already in this form
    /// and are kept as they are.
    Int4,
}

impl Quantize {
    /// Short name for metadata (`source`, `f16`, `int8`, `int4`).
    pub fn name(self) -> &'static str {
        match self {
            Quantize::Keep => "source",
            Quantize::F16 => "f16",
            Quantize::Int8 => "int8",
            Quantize::Q8 => "q8",
            Quantize::Int4 => "int4",
        }
    }
}

/// Block size of the block forms.
pub const BLOCK: usize = 32;

/// A matrix `W [N, K]` (out × in) in one stored form.
#[derive(Debug, Clone, PartialEq)]
pub enum Form {
    /// f32 `[N, K]`.
    F32(Bytes),
    /// f16 `[N, K]`.
    F16(Bytes),
    /// bf16 `[N, K]`.
    BF16(Bytes),
    /// Per-channel int8: q i8 `[N, K]`, scales f32 `[N]`.
    Int8 {
        /// Quantized values.
        q: Bytes,
        /// One scale per row.
        scales: Bytes,
    },
    /// 4-bit blocks: b u8 `[N, K/32, 16]` (element 2j low nibble of byte j), scales f32 `[N, K/32]`,
    /// zero points f32 `[N, K/32]`; value = (q − z)·s.
    Block4 {
        /// Packed nibbles.
        b: Bytes,
        /// Scales.
        scales: Bytes,
        /// Zero points (f32).
        zeros: Bytes,
    },
    /// 4-bit blocks with 4-bit zero points (`--quantize int4`): b as in [`Form::Block4`], scales f32
    /// `[N, K/32]`, zero points u8 `[N, ceil(K/64)]` packed two per byte (block 2j in the low nibble,
    /// 2j+1 in the high nibble of byte j of each row; an odd row's last high nibble is 0) — the
    /// `MatMulNBits` standard layout that onnxruntime and tract both read.
    Int4 {
        /// Packed nibbles.
        b: Bytes,
        /// Scales.
        scales: Bytes,
        /// Packed 4-bit zero points.
        zeros: Bytes,
    },
    /// 8-bit blocks of `block` (32, or 16 for GGUF Q6_K): b u8 `[N, K/block, block]`, scales f32
    /// `[N, K/block]`, and per block either a u8 zero point (value (q − z)·s) or an f32 minimum (value
    /// s·q − m).
    Block8 {
        /// Elements per block.
        block: usize,
        /// Codes, one a byte.
        b: Bytes,
        /// Scales.
        scales: Bytes,
        /// Zero points.
        zeros: Zeros,
    },
}

/// The offsets of [`Form::Block8`], one per block.
///
/// onnxruntime's CPU `MatMulNBits` takes no f32 zero points with 8 bits, so a minimum is not folded
/// into one (which would also cost a rounding): the graph computes `x·(s·q)ᵀ − (Σ x over each
/// block)·mᵀ` instead (`arch::linear`).
#[derive(Debug, Clone, PartialEq)]
pub enum Zeros {
    /// u8 zero points: the integer offsets of GGUF Q8_0 (128), Q5_0 (16) and Q6_K (32).
    U8(Bytes),
    /// f32 minimums `m` (GGUF Q5_1 and Q5_K); the codes' zero point is 0.
    Mins(Bytes),
}

impl Zeros {
    /// The stored bytes.
    pub fn bytes(&self) -> &Bytes {
        match self {
            Zeros::U8(b) | Zeros::Mins(b) => b,
        }
    }
}

/// An encoded matrix with its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Rows (out features / vocabulary).
    pub n: usize,
    /// Columns (in features / hidden).
    pub k: usize,
    /// Stored form.
    pub form: Form,
}

impl Matrix {
    /// Short name of the form (`f32`, `f16`, `bf16`, `int8`, `q4`, `int4`, `q8`, `q8m`).
    pub fn form_name(&self) -> &'static str {
        match self.form {
            Form::F32(_) => "f32",
            Form::F16(_) => "f16",
            Form::BF16(_) => "bf16",
            Form::Int8 { .. } => "int8",
            Form::Block4 { .. } => "q4",
            Form::Int4 { .. } => "int4",
            Form::Block8 {
                zeros: Zeros::U8(_),
                ..
            } => "q8",
            Form::Block8 {
                zeros: Zeros::Mins(_),
                ..
            } => "q8m",
        }
    }
    /// Stored bytes of all its initializers.
    pub fn stored_bytes(&self) -> usize {
        match &self.form {
            Form::F32(b) | Form::F16(b) | Form::BF16(b) => b.len(),
            Form::Int8 { q, scales } => q.len() + scales.len(),
            Form::Block4 { b, scales, zeros } | Form::Int4 { b, scales, zeros } => {
                b.len() + scales.len() + zeros.len()
            }
            Form::Block8 {
                b, scales, zeros, ..
            } => b.len() + scales.len() + zeros.bytes().len(),
        }
    }
}

/// A weight-form error, naming the tensor.
#[derive(Debug, thiserror::Error)]
#[error("tensor `{tensor}`: {detail}")]
pub struct QuantError {
    /// Tensor name.
    pub tensor: String,
    /// What is wrong.
    pub detail: String,
}

fn qerr(tensor: &str, detail: impl Into<String>) -> QuantError {
    QuantError {
        tensor: tensor.to_string(),
        detail: detail.into(),
    }
}

fn f32_bytes(v: Vec<f32>) -> Bytes {
    Bytes::from(bytemuck::cast_slice::<f32, u8>(&v).to_vec())
}

fn read_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn check_len(name: &str, t: &SourceTensor) -> Result<usize, QuantError> {
    let numel: usize = t.shape.iter().product();
    let block = t.dtype.block_elems();
    let row = t.shape.last().copied().unwrap_or(1);
    if !row.is_multiple_of(block) {
        return Err(qerr(
            name,
            format!(
                "{:?} rows of {row} elements are not whole blocks of {block}",
                t.dtype
            ),
        ));
    }
    let want = numel / block * t.dtype.block_bytes();
    if t.data.len() != want {
        return Err(qerr(
            name,
            format!(
                "{:?} {:?} needs {want} bytes, has {}",
                t.dtype,
                t.shape,
                t.data.len()
            ),
        ));
    }
    Ok(numel)
}

/// Dequantizes any source tensor to f32 (the reference every form is checked against).
pub fn dequantize_source(name: &str, t: &SourceTensor) -> Result<Vec<f32>, QuantError> {
    let numel = check_len(name, t)?;
    let d = &t.data[..];
    Ok(match t.dtype {
        SourceDType::F32 => read_f32s(d),
        SourceDType::F16 => d
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        SourceDType::BF16 => d
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => {
            let mut out = Vec::with_capacity(numel);
            ggml::dequantize_blocks(t.dtype, d, &mut out);
            out
        }
    })
}

/// A 1-D tensor (norm weight, bias) as f32 bytes.
pub fn vector_f32(name: &str, t: &SourceTensor) -> Result<Bytes, QuantError> {
    if t.shape.len() != 1 {
        return Err(qerr(
            name,
            format!("expected a vector, shape is {:?}", t.shape),
        ));
    }
    if t.dtype == SourceDType::F32 {
        check_len(name, t)?;
        return Ok(t.data.clone());
    }
    Ok(f32_bytes(dequantize_source(name, t)?))
}

/// Encodes a matrix `[N, K]` into the form `q` asks for.
pub fn encode_matrix(name: &str, t: &SourceTensor, q: Quantize) -> Result<Matrix, QuantError> {
    let (n, k) = match t.shape[..] {
        [n, k] => (n, k),
        _ => {
            return Err(qerr(
                name,
                format!("expected a matrix, shape is {:?}", t.shape),
            ))
        }
    };
    check_len(name, t)?;
    let form = match (q, t.dtype) {
        (Quantize::Keep, SourceDType::F32) => Form::F32(t.data.clone()),
        (Quantize::Keep | Quantize::F16, SourceDType::F16) => Form::F16(t.data.clone()),
        (Quantize::Keep, SourceDType::BF16) => Form::BF16(t.data.clone()),
        (
            Quantize::Keep | Quantize::Int4,
            SourceDType::Q4_0 | SourceDType::Q4_1 | SourceDType::Q4_K,
        ) => repack_blocks(t, n, k),
        (Quantize::Keep | Quantize::Q8, SourceDType::Q8_0) => repack_blocks(t, n, k),
        (
            Quantize::Keep,
            SourceDType::Q5_0 | SourceDType::Q5_1 | SourceDType::Q5_K | SourceDType::Q6_K,
        ) => repack_blocks(t, n, k),
        (Quantize::F16, _) => {
            let v = dequantize_source(name, t)?;
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            Form::F16(Bytes::from(bytemuck::cast_slice::<f16, u8>(&h).to_vec()))
        }
        (Quantize::Int8, _) => int8_per_channel(&dequantize_source(name, t)?, n, k),
        (Quantize::Q8, _) => {
            if k % BLOCK != 0 {
                return Err(qerr(
                    name,
                    format!("q8 needs in-features divisible by {BLOCK}, K = {k}"),
                ));
            }
            q8_blocks(name, &dequantize_source(name, t)?)?
        }
        (Quantize::Int4, _) => {
            if k % BLOCK != 0 {
                return Err(qerr(
                    name,
                    format!("int4 needs in-features divisible by {BLOCK}, K = {k}"),
                ));
            }
            int4_blocks(name, &dequantize_source(name, t)?, n, k)?
        }
    };
    Ok(Matrix { n, k, form })
}

/// A GGUF block type in the MatMulNBits form of its codes (rows are whole blocks: `check_len`):
/// 4-bit codes (Q4_0, Q4_1, Q4_K) as [`Form::Block4`]; wider ones as [`Form::Block8`] in blocks of the
/// type's sub-block (16 for Q6_K), with u8 zero points where ggml's offset is an integer and the
/// minimums themselves where it is one (Q5_1, Q5_K): every 8-bit form is exact.
///
/// A 4-bit minimum `m` becomes the f32 zero point `m / s`, so the stored value `(q − m/s)·s` differs
/// from ggml's `s·q − m` by one rounding of `m / s` plus the runtime's two: within
/// `2⁻²²·(|s·q| + |m|)`. A sub-block with `s = 0` (every value `−m`) is stored exactly as codes 1, zero
/// point 0, scale `−m`.
fn repack_blocks(t: &SourceTensor, n: usize, k: usize) -> Form {
    let four_bits = matches!(
        t.dtype,
        SourceDType::Q4_0 | SourceDType::Q4_1 | SourceDType::Q4_K
    );
    let mut b = Vec::with_capacity(n * k);
    let mut scales = Vec::new();
    // f32 per block: the 4-bit forms' zero points, or the 8-bit forms' minimums; u8 zero points
    let (mut f32s, mut u8s) = (Vec::new(), Vec::new());
    let mut block = 0;
    for blk in t.data.chunks_exact(t.dtype.block_bytes()) {
        ggml::for_each_sub_block(t.dtype, blk, |sb| {
            block = sb.len;
            let mut q = sb.q;
            let s = match sb.offset {
                ggml::Offset::Zero(z) if four_bits => {
                    f32s.push(f32::from(z));
                    sb.scale
                }
                ggml::Offset::Zero(z) => {
                    u8s.push(z);
                    sb.scale
                }
                ggml::Offset::Min(m) if !four_bits => {
                    f32s.push(m);
                    sb.scale
                }
                ggml::Offset::Min(m) if sb.scale == 0.0 => {
                    q = [1; 32];
                    f32s.push(0.0);
                    -m
                }
                ggml::Offset::Min(m) => {
                    f32s.push(m / sb.scale);
                    sb.scale
                }
            };
            scales.push(s);
            let q = &q[..sb.len];
            if four_bits {
                b.extend(q.chunks_exact(2).map(|p| p[0] | (p[1] << 4)));
            } else {
                b.extend_from_slice(q);
            }
        });
    }
    let (b, scales) = (Bytes::from(b), f32_bytes(scales));
    if four_bits {
        Form::Block4 {
            b,
            scales,
            zeros: f32_bytes(f32s),
        }
    } else {
        Form::Block8 {
            block,
            b,
            scales,
            zeros: if u8s.is_empty() {
                Zeros::Mins(f32_bytes(f32s))
            } else {
                Zeros::U8(Bytes::from(u8s))
            },
        }
    }
}

/// Per-channel symmetric int8: s = max|row| / 127, q = round(x / s).
fn int8_per_channel(v: &[f32], n: usize, k: usize) -> Form {
    let mut q = Vec::with_capacity(n * k);
    let mut scales = Vec::with_capacity(n);
    for row in v.chunks_exact(k.max(1)).take(n) {
        let amax = row.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        q.extend(
            row.iter()
                .map(|&x| (x / s).round().clamp(-127.0, 127.0) as i8 as u8),
        );
        scales.push(s);
    }
    Form::Int8 {
        q: Bytes::from(q),
        scales: f32_bytes(scales),
    }
}

/// Symmetric 8-bit per block of 32, GGUF Q8_0's values: s = max|x| / 127 rounded to the nearest f16
/// value (stored as f32; f16-exact, so the runtime keeps it as f16 losslessly), q = round(x / s) + 128
/// in 1..=255, zero point 128 ([`Form::Block8`]).
fn q8_blocks(name: &str, v: &[f32]) -> Result<Form, QuantError> {
    let nb = v.len() / BLOCK;
    let mut b = Vec::with_capacity(v.len());
    let mut scales = Vec::with_capacity(nb);
    for (bi, blk) in v.chunks_exact(BLOCK).enumerate() {
        let amax = blk.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let s = f16::from_f32(amax / 127.0).to_f32();
        if !s.is_finite() {
            return Err(qerr(
                name,
                format!("q8 block {bi} reaches {amax}: its scale does not fit f16 (values must be finite and below 8.3e6)"),
            ));
        }
        let q = |x: f32| match s > 0.0 {
            true => ((x / s).round().clamp(-127.0, 127.0) + 128.0) as u8,
            false => 128,
        };
        b.extend(blk.iter().map(|&x| q(x)));
        scales.push(s);
    }
    Ok(Form::Block8 {
        block: BLOCK,
        b: Bytes::from(b),
        scales: f32_bytes(scales),
        zeros: Zeros::U8(Bytes::from(vec![128u8; nb])),
    })
}

/// Asymmetric 4-bit per block of 32: range [min(x,0), max(x,0)] → s = range/15 rounded to the nearest
/// f16 value (stored as f32: tract keeps MatMulNBits scales as f16, so f16-exact scales give every
/// runtime the same weights), z = round(−min/s) in 0..=15, stored as packed 4-bit zero points
/// ([`Form::Int4`]).
fn int4_blocks(name: &str, v: &[f32], n: usize, k: usize) -> Result<Form, QuantError> {
    let nb = n * k / BLOCK;
    let mut b = Vec::with_capacity(nb * 16);
    let mut scales = Vec::with_capacity(nb);
    let mut zeros = Vec::with_capacity(nb);
    for (bi, blk) in v.chunks_exact(BLOCK).enumerate() {
        let mn = blk.iter().fold(0f32, |a, &x| a.min(x));
        let mx = blk.iter().fold(0f32, |a, &x| a.max(x));
        let s = f16::from_f32((mx - mn) / 15.0).to_f32();
        if !s.is_finite() {
            return Err(qerr(
                name,
                format!(
                    "int4 block {bi} spans [{mn}, {mx}]: its scale does not fit f16 (values must be finite and span < 982560)"
                ),
            ));
        }
        let (s, z) = if s > 0.0 {
            (s, (-mn / s).round().clamp(0.0, 15.0) as u8)
        } else {
            (0.0, 0)
        };
        let q = |x: f32| {
            if s > 0.0 {
                (x / s + z as f32).round().clamp(0.0, 15.0) as u8
            } else {
                0
            }
        };
        b.extend((0..16).map(|j| q(blk[2 * j]) | (q(blk[2 * j + 1]) << 4)));
        scales.push(s);
        zeros.push(z);
    }
    Ok(Form::Int4 {
        b: Bytes::from(b),
        scales: f32_bytes(scales),
        zeros: Bytes::from(pack_nibble_rows(&zeros, k / BLOCK)),
    })
}

/// Packs rows of `per_row` 4-bit values (each `< 16`) two per byte: value 2j in the low nibble and
/// 2j+1 in the high nibble of byte j of its row; each row takes `ceil(per_row / 2)` bytes.
pub fn pack_nibble_rows(v: &[u8], per_row: usize) -> Vec<u8> {
    v.chunks(per_row.max(1))
        .flat_map(|row| {
            row.chunks(2)
                .map(|p| (p[0] & 15) | (p.get(1).copied().unwrap_or(0) << 4))
        })
        .collect()
}

/// Unpacks [`pack_nibble_rows`]: `rows` rows of `per_row` values from `ceil(per_row / 2)` bytes each.
pub fn unpack_nibble_rows(b: &[u8], rows: usize, per_row: usize) -> Vec<u8> {
    let bytes = per_row.div_ceil(2);
    (0..rows * per_row)
        .map(|i| {
            let byte = b[(i / per_row) * bytes + (i % per_row) / 2];
            if (i % per_row).is_multiple_of(2) {
                byte & 15
            } else {
                byte >> 4
            }
        })
        .collect()
}

/// Values `(q − z)·s` of 4-bit blocks (16 bytes per block, element 2j in the low nibble of byte j).
fn block4_values(b: &[u8], s: &[f32], z: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(b.len() * 2);
    for (bi, blob) in b.chunks_exact(16).enumerate() {
        for &byte in blob {
            out.push(((byte & 15) as f32 - z[bi]) * s[bi]);
            out.push(((byte >> 4) as f32 - z[bi]) * s[bi]);
        }
    }
    out
}

/// Dequantizes a stored form back to f32 row-major `[N, K]` — what an ONNX runtime computes.
pub fn dequantize(m: &Matrix) -> Vec<f32> {
    let (n, k) = (m.n, m.k);
    match &m.form {
        Form::F32(b) => read_f32s(b),
        Form::F16(b) => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Form::BF16(b) => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Form::Int8 { q, scales } => {
            let s = read_f32s(scales);
            q.iter()
                .enumerate()
                .map(|(i, &x)| x as i8 as f32 * s[i / k])
                .collect()
        }
        Form::Block4 { b, scales, zeros } => {
            block4_values(b, &read_f32s(scales), &read_f32s(zeros))
        }
        Form::Int4 { b, scales, zeros } => {
            let z: Vec<f32> = unpack_nibble_rows(zeros, n, k / BLOCK)
                .into_iter()
                .map(f32::from)
                .collect();
            block4_values(b, &read_f32s(scales), &z)
        }
        Form::Block8 {
            block,
            b,
            scales,
            zeros,
        } => {
            let s = read_f32s(scales);
            match zeros {
                Zeros::U8(z) => b
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| (f32::from(q) - f32::from(z[i / block])) * s[i / block])
                    .collect(),
                Zeros::Mins(m) => {
                    let m = read_f32s(m);
                    b.iter()
                        .enumerate()
                        .map(|(i, &q)| s[i / block] * f32::from(q) - m[i / block])
                        .collect()
                }
            }
        }
    }
}

/// Test helpers: build GGUF blocks from f32 values (used by unit tests and the end-to-end export tests).
pub mod testutil {
    use half::f16;

    use crate::source::SourceDType;

    /// Quantizes `v` (length a multiple of 32) into GGUF Q8_0 blocks.
    pub fn make_q8_0(v: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for blk in v.chunks_exact(32) {
            let amax = blk.iter().fold(0f32, |a, &x| a.max(x.abs()));
            let d = f16::from_f32(amax / 127.0);
            let df = d.to_f32();
            out.extend(d.to_le_bytes());
            out.extend(blk.iter().map(|&x| {
                if df > 0.0 {
                    (x / df).round().clamp(-127.0, 127.0) as i8 as u8
                } else {
                    0
                }
            }));
        }
        out
    }

    /// Quantizes `v` into GGUF Q4_0 (element j low nibble of byte j, j+16 high).
    pub fn make_q4_0(v: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for blk in v.chunks_exact(32) {
            let amax = blk
                .iter()
                .fold(0f32, |a, &x| if x.abs() > a.abs() { x } else { a });
            let d = f16::from_f32(amax / -8.0);
            let df = d.to_f32();
            out.extend(d.to_le_bytes());
            let q = |x: f32| {
                if df != 0.0 {
                    ((x / df) + 8.5).floor().clamp(0.0, 15.0) as u8
                } else {
                    8
                }
            };
            out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
        }
        out
    }

    /// Quantizes `v` into GGUF Q4_1 (d, m, nibbles).
    pub fn make_q4_1(v: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for blk in v.chunks_exact(32) {
            let mn = blk.iter().fold(f32::INFINITY, |a, &x| a.min(x));
            let mx = blk.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let d = f16::from_f32((mx - mn) / 15.0);
            let m = f16::from_f32(mn);
            let df = d.to_f32();
            out.extend(d.to_le_bytes());
            out.extend(m.to_le_bytes());
            let q = |x: f32| {
                if df != 0.0 {
                    ((x - m.to_f32()) / df).round().clamp(0.0, 15.0) as u8
                } else {
                    0
                }
            };
            out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
        }
        out
    }

    /// Quantizes `v` into any GGUF block type: Q8_0/Q4_0/Q4_1 as above, the others with a plain
    /// min/max quantizer laid out as ggml stores them (length a multiple of the type's block).
    pub fn make_blocks(dtype: SourceDType, v: &[f32]) -> Vec<u8> {
        match dtype {
            SourceDType::Q8_0 => make_q8_0(v),
            SourceDType::Q4_0 => make_q4_0(v),
            SourceDType::Q4_1 => make_q4_1(v),
            SourceDType::Q5_0 => v.chunks_exact(32).flat_map(q5_block(false)).collect(),
            SourceDType::Q5_1 => v.chunks_exact(32).flat_map(q5_block(true)).collect(),
            SourceDType::Q4_K => v.chunks_exact(256).flat_map(|b| k_block(b, 15)).collect(),
            SourceDType::Q5_K => v.chunks_exact(256).flat_map(|b| k_block(b, 31)).collect(),
            SourceDType::Q6_K => v.chunks_exact(256).flat_map(q6_k_block).collect(),
            SourceDType::F32 | SourceDType::F16 | SourceDType::BF16 => {
                panic!("{dtype:?} is not a block type")
            }
        }
    }

    fn q5_block(with_min: bool) -> impl Fn(&[f32]) -> Vec<u8> {
        move |blk| {
            let mn = blk.iter().fold(f32::INFINITY, |a, &x| a.min(x));
            let mx = blk.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let (d, m, z) = if with_min {
                (f16::from_f32((mx - mn) / 31.0), f16::from_f32(mn), 0.0)
            } else {
                (
                    f16::from_f32(mx.abs().max(mn.abs()) / 15.5),
                    f16::ZERO,
                    16.0,
                )
            };
            let q: Vec<u8> = blk
                .iter()
                .map(|&x| code((x - m.to_f32()) / d.to_f32() + z, 31))
                .collect();
            let mut out = d.to_le_bytes().to_vec();
            if with_min {
                out.extend(m.to_le_bytes());
            }
            let qh = (0..32).fold(0u32, |h, i| h | (u32::from(q[i] >> 4) << i));
            out.extend(qh.to_le_bytes());
            out.extend((0..16).map(|j| (q[j] & 15) | ((q[j + 16] & 15) << 4)));
            out
        }
    }

    fn code(x: f32, max: u8) -> u8 {
        if x.is_finite() {
            x.round().clamp(0.0, f32::from(max)) as u8
        } else {
            0
        }
    }

    /// Q4_K (`max` 15) or Q5_K (`max` 31): eight sub-blocks of 32 with 6-bit scales and mins.
    fn k_block(blk: &[f32], max: u8) -> Vec<u8> {
        let (mut scale, mut min) = ([0f32; 8], [0f32; 8]);
        for (j, sb) in blk.chunks_exact(32).enumerate() {
            let mn = sb.iter().fold(0f32, |a, &x| a.min(x));
            let mx = sb.iter().fold(0f32, |a, &x| a.max(x));
            scale[j] = (mx - mn) / f32::from(max);
            min[j] = -mn;
        }
        let d = f16::from_f32(scale.iter().fold(0f32, |a, &x| a.max(x)) / 63.0);
        let dmin = f16::from_f32(min.iter().fold(0f32, |a, &x| a.max(x)) / 63.0);
        let sc: Vec<u8> = scale.iter().map(|&s| code(s / d.to_f32(), 63)).collect();
        let m: Vec<u8> = min.iter().map(|&x| code(x / dmin.to_f32(), 63)).collect();
        let q: Vec<u8> = blk
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let j = i / 32;
                let s = d.to_f32() * f32::from(sc[j]);
                code((x + dmin.to_f32() * f32::from(m[j])) / s, max)
            })
            .collect();
        let mut out = d.to_le_bytes().to_vec();
        out.extend(dmin.to_le_bytes());
        let mut scales = [0u8; 12];
        for i in 0..4 {
            scales[i] = sc[i] | ((sc[i + 4] >> 4) << 6);
            scales[i + 4] = m[i] | ((m[i + 4] >> 4) << 6);
            scales[i + 8] = (sc[i + 4] & 15) | ((m[i + 4] & 15) << 4);
        }
        out.extend(scales);
        if max == 31 {
            out.extend((0..32).map(|l| (0..8).fold(0u8, |h, j| h | ((q[32 * j + l] >> 4) << j))));
        }
        for c in 0..4 {
            out.extend((0..32).map(|l| (q[64 * c + l] & 15) | ((q[64 * c + 32 + l] & 15) << 4)));
        }
        out
    }

    /// Q6_K: sixteen sub-blocks of 16 with i8 scales, codes q − 32.
    fn q6_k_block(blk: &[f32]) -> Vec<u8> {
        let scale: Vec<f32> = blk
            .chunks_exact(16)
            .map(|sb| sb.iter().fold(0f32, |a, &x| a.max(x.abs())) / 31.5)
            .collect();
        let d = f16::from_f32(scale.iter().fold(0f32, |a, &x| a.max(x)) / 127.0);
        let sc: Vec<i8> = scale
            .iter()
            .map(|&s| {
                let r = s / d.to_f32();
                if r.is_finite() {
                    r.round().clamp(-128.0, 127.0) as i8
                } else {
                    0
                }
            })
            .collect();
        let q: Vec<u8> = blk
            .iter()
            .enumerate()
            .map(|(i, &x)| code(x / (d.to_f32() * f32::from(sc[i / 16])) + 32.0, 63))
            .collect();
        let (mut ql, mut qh, mut scales) = ([0u8; 128], [0u8; 64], [0u8; 16]);
        for n in 0..2 {
            let q = &q[128 * n..];
            for l in 0..32 {
                let r = |k: usize| q[l + 32 * k];
                ql[64 * n + l] = (r(0) & 15) | ((r(2) & 15) << 4);
                ql[64 * n + l + 32] = (r(1) & 15) | ((r(3) & 15) << 4);
                qh[32 * n + l] =
                    (r(0) >> 4) | ((r(1) >> 4) << 2) | ((r(2) >> 4) << 4) | ((r(3) >> 4) << 6);
            }
            for k in 0..8 {
                scales[8 * n + k] = sc[8 * n + k] as u8;
            }
        }
        let mut out = ql.to_vec();
        out.extend(qh);
        out.extend(scales);
        out.extend(d.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
    }

    fn tensor(dtype: SourceDType, n: usize, k: usize, data: Vec<u8>) -> SourceTensor {
        SourceTensor {
            dtype,
            shape: vec![n, k],
            data: Bytes::from(data),
        }
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn lossless_forms_equal_source() {
        let (n, k) = (6, 64);
        let v = rand_vec(n * k, 1);
        let cases = [
            (
                SourceDType::F32,
                bytemuck::cast_slice::<f32, u8>(&v).to_vec(),
            ),
            (
                SourceDType::F16,
                v.iter()
                    .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
            (
                SourceDType::BF16,
                v.iter()
                    .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
            (SourceDType::Q8_0, make_q8_0(&v)),
            (SourceDType::Q4_0, make_q4_0(&v)),
        ];
        for (dt, data) in cases {
            let t = tensor(dt, n, k, data);
            let src = dequantize_source("w", &t).unwrap();
            let m = encode_matrix("w", &t, Quantize::Keep).unwrap();
            assert_eq!(dequantize(&m), src, "{dt:?} must be exact");
            // sanity: the source quantizers are close to the values
            assert!(max_rel(&src, &v) < 0.15, "{dt:?}");
        }
    }

    #[test]
    fn q4_1_repack_matches_within_rounding() {
        let (n, k) = (5, 96);
        let mut v = rand_vec(n * k, 2);
        // one constant block (d = 0, m != 0) and one all-zero block
        v[32..64].iter_mut().for_each(|x| *x = 0.375);
        v[64..96].iter_mut().for_each(|x| *x = 0.0);
        let t = tensor(SourceDType::Q4_1, n, k, make_q4_1(&v));
        let src = dequantize_source("w", &t).unwrap();
        let got = dequantize(&encode_matrix("w", &t, Quantize::Keep).unwrap());
        // (q + m/d)·d vs q·d + m: f32 rounding only
        for (a, b) in got.iter().zip(&src) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        assert_eq!(got[32..64], src[32..64], "constant block must be exact");
        assert!(got[32] == 0.375);
    }

    #[test]
    fn q4_nibble_order_is_repacked() {
        // element j of a GGUF block is the low nibble of qs[j]; element j+16 the high nibble
        let mut blk = vec![0u8; 18];
        blk[..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        for j in 0..16 {
            blk[2 + j] = (j as u8) | (((15 - j) as u8) << 4);
        }
        let t = tensor(SourceDType::Q4_0, 1, 32, blk);
        let m = encode_matrix("w", &t, Quantize::Keep).unwrap();
        let Form::Block4 { b, .. } = &m.form else {
            panic!("form")
        };
        // MatMulNBits element 0 = q 0 (low of byte 0), element 1 = q 1 (high of byte 0)
        assert_eq!(b[0], 0x10);
        assert_eq!(b[8], 0xEF); // elements 16 (q=15) and 17 (q=14)
        let d = dequantize(&m);
        assert_eq!(d[0], -8.0);
        assert_eq!(d[16], 7.0);
        assert_eq!(d[31], -8.0 + 0.0); // element 31 = high nibble of qs[15] = 0
    }

    #[test]
    fn int8_error_within_half_step() {
        let (n, k) = (7, 40);
        let v = rand_vec(n * k, 3);
        let t = tensor(
            SourceDType::F32,
            n,
            k,
            bytemuck::cast_slice::<f32, u8>(&v).to_vec(),
        );
        let m = encode_matrix("w", &t, Quantize::Int8).unwrap();
        let Form::Int8 { scales, .. } = &m.form else {
            panic!("form")
        };
        let s = read_f32s(scales);
        let d = dequantize(&m);
        for (i, (a, b)) in d.iter().zip(&v).enumerate() {
            // |error| <= s/2 (plus f32 rounding)
            assert!((a - b).abs() <= s[i / k] * 0.5001, "{a} vs {b}");
        }
    }

    #[test]
    fn q8_error_within_half_step_with_f16_scales() {
        let (n, k) = (5, 96);
        let mut v = rand_vec(n * k, 5);
        v[32..64].fill(0.0); // an all-zero block: scale 0, every code the zero point
        let t = tensor(
            SourceDType::F32,
            n,
            k,
            bytemuck::cast_slice::<f32, u8>(&v).to_vec(),
        );
        let m = encode_matrix("w", &t, Quantize::Q8).unwrap();
        let Form::Block8 {
            block,
            b,
            scales,
            zeros: Zeros::U8(z),
        } = &m.form
        else {
            panic!("form {}", m.form_name())
        };
        assert_eq!((*block, b.len(), z.len()), (BLOCK, n * k, n * k / BLOCK));
        assert!(z.iter().all(|&z| z == 128));
        assert!(
            b.iter().all(|&q| q >= 1),
            "codes stay in 1..=255 (symmetric)"
        );
        let s = read_f32s(scales);
        assert!(s.iter().all(|&s| f16::from_f32(s).to_f32() == s));
        assert_eq!(s[1], 0.0);
        assert!(b[32..64].iter().all(|&q| q == 128));
        let d = dequantize(&m);
        for (i, (a, x)) in d.iter().zip(&v).enumerate() {
            // |error| <= s/2 (plus f32 rounding)
            assert!((a - x).abs() <= s[i / BLOCK] * 0.5001, "{a} vs {x}");
        }
        // In-features that are not whole blocks are refused.
        let bad = encode_matrix(
            "w",
            &tensor(SourceDType::F32, 1, 40, vec![0; 160]),
            Quantize::Q8,
        );
        assert!(bad.unwrap_err().to_string().contains("divisible by 32"));
    }

    #[test]
    fn int4_error_within_one_step_and_q4_kept() {
        let (n, k) = (4, 64);
        let v = rand_vec(n * k, 4);
        let t = tensor(
            SourceDType::F32,
            n,
            k,
            bytemuck::cast_slice::<f32, u8>(&v).to_vec(),
        );
        let m = encode_matrix("w", &t, Quantize::Int4).unwrap();
        let Form::Int4 { scales, zeros, .. } = &m.form else {
            panic!("form")
        };
        // packed 4-bit zero points: [N, ceil(nb/2)] bytes; scales are f16-exact
        assert_eq!(zeros.len(), n * (k / BLOCK).div_ceil(2));
        let s = read_f32s(scales);
        assert!(s.iter().all(|&x| x > 0.0 && f16::from_f32(x).to_f32() == x));
        let d = dequantize(&m);
        for (i, (a, b)) in d.iter().zip(&v).enumerate() {
            // |error| <= one step s (zero point rounding + value rounding)
            assert!((a - b).abs() <= s[i / BLOCK] * 1.0001, "{a} vs {b}");
        }
        // a Q8_0 source requantized to int4 dequantizes first, then obeys the same bound
        let t8 = tensor(SourceDType::Q8_0, n, k, make_q8_0(&v));
        let m8 = encode_matrix("w", &t8, Quantize::Int4).unwrap();
        assert!(max_rel(&dequantize(&m8), &v) < 0.1);
        // Q4_0 with --quantize int4 is kept bit-exact
        let t4 = tensor(SourceDType::Q4_0, n, k, make_q4_0(&v));
        assert_eq!(
            dequantize(&encode_matrix("w", &t4, Quantize::Int4).unwrap()),
            dequantize_source("w", &t4).unwrap()
        );
    }

    #[test]
    fn int4_zero_points_packed_in_matmulnbits_layout() {
        // K = 96: three blocks per row, so each row's zero points take two bytes, the last high nibble 0
        let (n, k) = (3, 96);
        let mut v = rand_vec(n * k, 6);
        // give every block a distinct negative minimum so that the zero points differ
        for (bi, blk) in v.chunks_mut(BLOCK).enumerate() {
            blk[0] = -0.1 - 0.1 * bi as f32;
            blk[1] = 0.9;
        }
        let t = tensor(
            SourceDType::F32,
            n,
            k,
            bytemuck::cast_slice::<f32, u8>(&v).to_vec(),
        );
        let m = encode_matrix("w", &t, Quantize::Int4).unwrap();
        assert_eq!(m.form_name(), "int4");
        let Form::Int4 { zeros, scales, .. } = &m.form else {
            panic!("form")
        };
        let s = read_f32s(scales);
        // the zero point of block (row, j), computed as the quantizer does
        let z = |row: usize, j: usize| {
            let blk = &v[(row * 3 + j) * BLOCK..][..BLOCK];
            let mn = blk.iter().fold(0f32, |a, &x| a.min(x));
            (-mn / s[row * 3 + j]).round() as u8
        };
        assert_eq!(zeros.len(), n * 2);
        for row in 0..n {
            assert_eq!(zeros[row * 2], z(row, 0) | (z(row, 1) << 4), "row {row}");
            assert_eq!(
                zeros[row * 2 + 1],
                z(row, 2),
                "row {row}: high nibble must be 0"
            );
        }
        assert!(
            (0..n).any(|r| z(r, 0) != z(r, 1)),
            "test needs distinct zero points"
        );
        let back = unpack_nibble_rows(zeros, n, 3);
        assert_eq!(pack_nibble_rows(&back, 3), zeros.to_vec());
    }

    #[test]
    fn f16_requantize_and_errors() {
        let (n, k) = (3, 32);
        let v = rand_vec(n * k, 5);
        let t = tensor(
            SourceDType::F32,
            n,
            k,
            bytemuck::cast_slice::<f32, u8>(&v).to_vec(),
        );
        let d = dequantize(&encode_matrix("w", &t, Quantize::F16).unwrap());
        for (a, b) in d.iter().zip(&v) {
            assert!((a - b).abs() <= b.abs() * 4.9e-4 + 6e-8, "{a} vs {b}");
        }
        let bad = tensor(SourceDType::Q8_0, n, k, vec![0u8; 10]);
        let e = encode_matrix("blk.0.attn_q.weight", &bad, Quantize::Keep)
            .unwrap_err()
            .to_string();
        assert!(e.contains("blk.0.attn_q.weight"), "{e}");
    }
}
