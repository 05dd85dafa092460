//! Architectures: one file per family, each an [`Arch`] description (its names, its own config fields and
//! tensor names, its graph) registered in [`ARCHS`] below, over shared blocks (blocks.rs, and the
//! llama-shaped decoder of decoder.rs). This module holds what they share: the weight forms as graph
//! fragments (Linear, Embedding), the rotary tables and the in-graph token choice.

use std::collections::BTreeMap;

use bytes::Bytes;
use onestep_format::graph::{DType, Graph};

use crate::quant::{Form, Matrix, Zeros, BLOCK};
use crate::source::ModelConfig;
use crate::trace::{SDim, Sym, TraceError, Tracer};

pub mod blocks;
/// The llama-shaped decoder graph that llama, mistral, phi3, qwen2, qwen3 and smollm3 share.
pub mod decoder;
pub mod family;
#[cfg(test)]
pub(crate) mod tests;
/// Whisper (speech to text): encoder and decoder step in one graph.
pub mod whisper;

pub use family::{find, Arch};

// The text families: a new one is its file, its `mod` line and its entry in ARCHS.
/// Gemma 2 and 3.
pub mod gemma;
/// Llama.
pub mod llama;
/// Mistral.
pub mod mistral;
/// Phi-3.
pub mod phi3;
/// Qwen2.
pub mod qwen2;
/// Qwen3.
pub mod qwen3;
/// SmolLM3.
pub mod smollm3;

/// Every text family the exporter builds (the readers try them in this order).
pub static ARCHS: &[&dyn Arch] = &[
    &gemma::GEMMA2,
    &gemma::GEMMA3,
    &llama::Llama,
    &mistral::Mistral,
    &phi3::Phi3,
    &qwen2::Qwen2,
    &qwen3::Qwen3,
    &smollm3::SmolLM3,
];

/// Encoded weights by canonical source name (`blk.0.attn_q.weight`, ...).
#[derive(Debug, Clone, Default)]
pub struct Weights {
    /// Matrices (linear layers, embedding, output).
    pub matrices: BTreeMap<String, Matrix>,
    /// Vectors as f32 bytes (norm weights, biases).
    pub vectors: BTreeMap<String, Bytes>,
}

impl Weights {
    /// A matrix by canonical name.
    pub fn matrix(&self, name: &str) -> Result<&Matrix, TraceError> {
        self.matrices
            .get(name)
            .ok_or_else(|| TraceError::Model(format!("missing weight `{name}`")))
    }
    /// A vector by canonical name.
    pub fn vector(&self, name: &str) -> Result<&Bytes, TraceError> {
        self.vectors
            .get(name)
            .ok_or_else(|| TraceError::Model(format!("missing weight `{name}`")))
    }
}

/// Graph-level options an architecture needs.
#[derive(Debug, Clone)]
pub struct ArchOptions {
    /// Static cache slots per layer (also the rotary table length).
    pub max_cache: usize,
    /// KV cache dtype (F16 or F32).
    pub kv_dtype: DType,
}

/// Builds the step graph for `cfg.architecture` with its family's builder.
pub fn build(cfg: &ModelConfig, w: &Weights, opts: &ArchOptions) -> Result<Graph, TraceError> {
    match find(&cfg.architecture) {
        Some(arch) => arch.build(cfg, w, opts),
        None => Err(TraceError::Model(format!(
            "unsupported architecture `{}` (supported: {})",
            cfg.architecture,
            ARCHS
                .iter()
                .map(|a| a.name())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The initializers of one matrix in the graph.
#[derive(Debug, Clone)]
pub enum MatSyms {
    /// f32 `[N, K]`.
    F32(Sym),
    /// f16/bf16 `[N, K]`.
    Half(Sym),
    /// int8 `[N, K]` and f32 scales `[N]`.
    Int8(Sym, Sym),
    /// `MatMulNBits` blocks.
    Block {
        /// u8 `[N, K/bs, bs·bits/8]`.
        b: Sym,
        /// f32 `[N, K/bs]`.
        scales: Sym,
        /// f32 `[N, K/bs]`, u8 `[N, K/bs]` (8 bits) or u8 `[N, ceil(K/2bs)]` packed two a byte (4 bits).
        zeros: Sym,
        /// Bits per code (4 or 8).
        bits: usize,
        /// Block size `bs`.
        block: usize,
        /// f32 `[N, K/bs]` minimums subtracted from each block's values (then the zero points are 0).
        mins: Option<Sym>,
    },
}

/// Adds a matrix's initializers named `{base}.weight` (+ `{base}.scales`, `{base}.zero_points`).
pub fn add_matrix(t: &mut Tracer, base: &str, m: &Matrix) -> Result<MatSyms, TraceError> {
    let (n, k) = (m.n, m.k);
    let wname = format!("{base}.weight");
    let sname = format!("{base}.scales");
    let zname = format!("{base}.zero_points");
    Ok(match &m.form {
        Form::F32(b) => MatSyms::F32(t.weight(&wname, DType::F32, &[n, k], b.clone())?),
        Form::F16(b) => MatSyms::Half(t.weight(&wname, DType::F16, &[n, k], b.clone())?),
        Form::BF16(b) => MatSyms::Half(t.weight(&wname, DType::BF16, &[n, k], b.clone())?),
        Form::Int8 { q, scales } => MatSyms::Int8(
            t.weight(&wname, DType::I8, &[n, k], q.clone())?,
            t.weight(&sname, DType::F32, &[n], scales.clone())?,
        ),
        Form::Block4 { b, scales, zeros } | Form::Int4 { b, scales, zeros } => {
            let nb = k / BLOCK;
            let (zt, zshape) = match m.form {
                Form::Block4 { .. } => (DType::F32, [n, nb]),
                _ => (DType::U8, [n, nb.div_ceil(2)]),
            };
            MatSyms::Block {
                b: t.weight(&wname, DType::U8, &[n, nb, BLOCK / 2], b.clone())?,
                scales: t.weight(&sname, DType::F32, &[n, nb], scales.clone())?,
                zeros: t.weight(&zname, zt, &zshape, zeros.clone())?,
                bits: 4,
                block: BLOCK,
                mins: None,
            }
        }
        Form::Block8 {
            block,
            b,
            scales,
            zeros,
        } => {
            let nb = k / block;
            let (z, mins) = match zeros {
                Zeros::U8(z) => (z.clone(), None),
                Zeros::Mins(m) => {
                    let m = t.weight(&format!("{base}.mins"), DType::F32, &[n, nb], m.clone())?;
                    (Bytes::from(vec![0u8; n * nb]), Some(m))
                }
            };
            MatSyms::Block {
                b: t.weight(&wname, DType::U8, &[n, nb, *block], b.clone())?,
                scales: t.weight(&sname, DType::F32, &[n, nb], scales.clone())?,
                zeros: t.weight(&zname, DType::U8, &[n, nb], z)?,
                bits: 8,
                block: *block,
                mins,
            }
        }
    })
}

/// `Linear(x, W) (+ bias)` in the matrix's form; `name` is the node name (`attn.q_proj`).
pub fn linear(
    t: &mut Tracer,
    name: &str,
    x: &Sym,
    w: &MatSyms,
    bias: Option<&Sym>,
) -> Result<Sym, TraceError> {
    match w {
        MatSyms::F32(w) => t.gemm(name, x, w, bias),
        MatSyms::Half(w) => {
            let wf = t.cast(&format!("{name}.w_f32"), w, DType::F32)?;
            t.gemm(name, x, &wf, bias)
        }
        MatSyms::Int8(q, s) => {
            let wf = t.dequantize_linear(&format!("{name}.dequant"), q, s, 0)?;
            t.gemm(name, x, &wf, bias)
        }
        MatSyms::Block {
            b,
            scales: s,
            zeros: z,
            bits,
            block,
            mins,
        } => {
            let flat = |d: &SDim| match d {
                SDim::N(n) => *n,
                _ => 0,
            };
            let nb = s.shape.iter().map(flat).product::<usize>();
            let nz = z.shape.iter().map(flat).product::<usize>();
            let sf = t.reshape(&format!("{name}.scales_flat"), s, &[SDim::N(nb)])?;
            let zf = t.reshape(&format!("{name}.zero_points_flat"), z, &[SDim::N(nz)])?;
            let y = t.matmul_nbits(name, x, b, &sf, &zf, *bits, *block)?;
            let y = match mins {
                // y − (Σ x over each block)·mᵀ
                Some(m) => {
                    let nb = flat(&m.shape[1]);
                    let xb = t.reshape(
                        &format!("{name}.x_blocks"),
                        x,
                        &[SDim::T(0), SDim::N(nb), SDim::N(*block)],
                    )?;
                    let sums = t.reduce_sum(&format!("{name}.block_sums"), &xb, &[-1], false)?;
                    let corr = t.gemm(&format!("{name}.mins"), &sums, m, None)?;
                    t.sub(&format!("{name}.minus_mins"), &y, &corr)?
                }
                None => y,
            };
            match bias {
                Some(bias) => t.add(&format!("{name}.add_bias"), &y, bias),
                None => Ok(y),
            }
        }
    }
}

/// `Embedding(ids)` with table `E [V, H]` in its form; ids int64 `[T]` → f32 `[T, H]`.
pub fn embedding(t: &mut Tracer, e: &MatSyms, ids: &Sym) -> Result<Sym, TraceError> {
    match e {
        MatSyms::F32(e) => t.gather("embed", e, ids, 0),
        MatSyms::Half(e) => {
            let g = t.gather("embed.gather", e, ids, 0)?;
            t.cast("embed", &g, DType::F32)
        }
        MatSyms::Int8(q, s) => {
            let g = t.gather("embed.gather", q, ids, 0)?;
            let gf = t.cast("embed.cast", &g, DType::F32)?;
            let sg = t.gather("embed.scales", s, ids, 0)?;
            let su = t.unsqueeze("embed.scales_col", &sg, &[1])?;
            t.mul("embed", &gf, &su)
        }
        MatSyms::Block {
            b,
            scales: s,
            zeros: z,
            bits,
            block,
            mins,
        } => {
            let (nb, hidden) = match s.shape[..] {
                [_, SDim::N(nb)] => (nb, nb * block),
                _ => {
                    return Err(TraceError::Model(format!(
                        "embedding scales must be [V, H/{block}]"
                    )))
                }
            };
            let rows = t.gather("embed.rows", b, ids, 0)?;
            let q = if *bits == 4 {
                let both = nibbles(t, "embed", &rows)?;
                t.reshape(
                    "embed.q",
                    &both,
                    &[SDim::T(0), SDim::N(nb), SDim::N(*block)],
                )?
            } else {
                rows
            };
            let qf = t.cast("embed.q_f32", &q, DType::F32)?;
            let sg = t.gather("embed.scales", s, ids, 0)?;
            let su = t.unsqueeze("embed.scales_u", &sg, &[-1])?;
            if let Some(m) = mins {
                // s·q − m
                let x = t.mul("embed.scaled", &qf, &su)?;
                let mg = t.gather("embed.mins", m, ids, 0)?;
                let mu = t.unsqueeze("embed.mins_u", &mg, &[-1])?;
                let x = t.sub("embed.minus_mins", &x, &mu)?;
                return t.reshape("embed", &x, &[SDim::T(0), SDim::N(hidden)]);
            }
            let zg = t.gather("embed.zero_points", z, ids, 0)?;
            let zg = if zg.dtype == DType::F32 {
                zg
            } else if *bits == 4 {
                // packed 4-bit zero points [T, ceil(nb/2)] → [T, nb]
                let both = nibbles(t, "embed.zero_points", &zg)?;
                let nz = 2 * nb.div_ceil(2);
                let all = t.reshape("embed.zero_points_all", &both, &[SDim::T(0), SDim::N(nz)])?;
                let zs = if nz == nb {
                    all
                } else {
                    // odd nb: drop each row's padding nibble
                    let keep: Vec<i64> = (0..nb as i64).collect();
                    let keep = t.const_i64(&keep, false);
                    t.gather("embed.zero_points_used", &all, &keep, 1)?
                };
                t.cast("embed.zero_points_f32", &zs, DType::F32)?
            } else {
                t.cast("embed.zero_points_f32", &zg, DType::F32)?
            };
            let zu = t.unsqueeze("embed.zero_points_u", &zg, &[-1])?;
            let c = t.sub("embed.centered", &qf, &zu)?;
            let x = t.mul("embed.scaled", &c, &su)?;
            t.reshape("embed", &x, &[SDim::T(0), SDim::N(hidden)])
        }
    }
}

/// Splits u8 bytes `[.., m]` into their nibbles `[.., m, 2]` (low nibble first); nodes `{name}.lo`,
/// `{name}.hi`, `{name}.nibbles`.
fn nibbles(t: &mut Tracer, name: &str, bytes: &Sym) -> Result<Sym, TraceError> {
    let c15 = t.const_u8(15);
    let c4 = t.const_u8(4);
    let lo = t.bitwise_and(&format!("{name}.lo"), bytes, &c15)?;
    let hi = t.shift_right(&format!("{name}.hi"), bytes, &c4)?;
    let lo = t.unsqueeze(&format!("{name}.lo_u"), &lo, &[-1])?;
    let hi = t.unsqueeze(&format!("{name}.hi_u"), &hi, &[-1])?;
    t.concat(&format!("{name}.nibbles"), &[&lo, &hi], -1)
}

/// Rotary tables `cos`, `sin`: `[max_cache, head_dim/2]` f32, computed in f64 from `rope_theta` and the
/// scaling (llama3 as HF `_compute_llama3_parameters`, linear = positions / factor).
pub fn rope_tables(cfg: &ModelConfig, max_cache: usize) -> (Vec<f32>, Vec<f32>) {
    use crate::source::RopeScaling;
    let d = cfg.head_dim;
    let half = d / 2;
    let theta = cfg.rope_theta as f64;
    let mut inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match &cfg.rope_scaling {
        Some(RopeScaling::Linear { factor }) => inv.iter_mut().for_each(|f| *f /= *factor as f64),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let (factor, lo, hi) = (
                *factor as f64,
                *low_freq_factor as f64,
                *high_freq_factor as f64,
            );
            let old = *original_max_position_embeddings as f64;
            let low_wl = old / lo;
            let high_wl = old / hi;
            for f in inv.iter_mut() {
                let wl = 2.0 * std::f64::consts::PI / *f;
                let scaled = if wl > low_wl { *f / factor } else { *f };
                let medium = (high_wl..=low_wl).contains(&wl);
                *f = if medium {
                    let smooth = (old / wl - lo) / (hi - lo);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                };
            }
        }
        // The static cache decides: contexts up to the pretrained length use the short factors (as
        // transformers does for them); a cache longer than that takes the long ones throughout.
        Some(RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            ..
        }) => {
            let f = if max_cache > *original_max_position_embeddings {
                long_factor
            } else {
                short_factor
            };
            for (inv, f) in inv.iter_mut().zip(f) {
                *inv /= *f as f64;
            }
        }
        None => {}
    }
    let amp = match &cfg.rope_scaling {
        Some(RopeScaling::LongRope {
            attention_factor, ..
        }) => *attention_factor as f64,
        _ => 1.0,
    };
    let mut cos = Vec::with_capacity(max_cache * half);
    let mut sin = Vec::with_capacity(max_cache * half);
    for p in 0..max_cache {
        for f in &inv {
            let a = p as f64 * f;
            cos.push((a.cos() * amp) as f32);
            sin.push((a.sin() * amp) as f32);
        }
    }
    (cos, sin)
}

/// The in-graph token choice of docs/GRAPH.md: `logits` f32 `[1, V]` → `next_token` int64 `[1]`.
pub fn token_choice(
    t: &mut Tracer,
    logits: &Sym,
    vocab: usize,
    temperature: &Sym,
    top_k: &Sym,
    top_p: &Sym,
    random_u: &Sym,
) -> Result<Sym, TraceError> {
    t.set_scope("sample");
    let zero_f = t.const_f32(0.0);
    let zero_i = t.const_i64(&[0], true);
    let one_i = t.const_i64(&[1], false);
    let v = t.const_i64(&[vocab as i64], false);
    let eps = t.const_f32(1e-6);
    let greedy = t.less_or_equal("greedy", temperature, &zero_f)?;
    let kpos = t.greater("k_pos", top_k, &zero_i)?;
    let kltv = t.less("k_lt_v", top_k, &v)?;
    let kok = t.and("k_ok", &kpos, &kltv)?;
    let kk = t.where_("k_limit", &kok, top_k, &v)?;
    let k = t.where_("k", &greedy, &one_i, &kk)?;
    let temp = t.max("temp", temperature, &eps)?;
    let scaled = t.div("scaled", logits, &temp)?;
    let (vals, idx) = t.topk("topk", &scaled, &k, -1)?;
    let p = t.softmax("probs", &vals, -1)?;
    let c = t.cumsum("cum", &p, -1)?;
    let before = t.sub("cum_before", &c, &p)?;
    let tp = t.max("top_p", top_p, &eps)?;
    let keep = t.less("keep", &before, &tp)?;
    let keepf = t.cast("keep_f32", &keep, DType::F32)?;
    let pk = t.mul("kept", &p, &keepf)?;
    let total = t.reduce_sum("total", &pk, &[-1], true)?;
    let ck = t.cumsum("kept_cum", &pk, -1)?;
    let thr = t.mul("threshold", random_u, &total)?;
    let below = t.less_or_equal("below", &ck, &thr)?;
    let belowi = t.cast("below_i64", &below, DType::I64)?;
    let j = t.reduce_sum("count", &belowi, &[-1], false)?;
    let km1 = t.sub("k_last", &k, &one_i)?;
    let j = t.min("choice", &j, &km1)?;
    let ju = t.unsqueeze("choice_col", &j, &[1])?;
    let tok = t.gather_elements("token", &idx, &ju, 1)?;
    let out = t.reshape("next_token", &tok, &[SDim::N(1)])?;
    t.set_scope("");
    Ok(out)
}
