//! Linear layers (`linear.wgsl`): every weight encoding of the step graph decoded on the fly from the
//! file's own bytes (uploaded once, never expanded to f32), bias and residual add fused in the epilogue.
//! Weights larger than the adapter's storage-binding limit are split by rows into parts, one dispatch
//! each, so nothing is ever truncated.

use std::sync::Arc;

use super::context::{Bind, GpuContext, Kernel};
use super::{Params, Variant};
use crate::error::{DeviceFault, Error, Result};
use crate::graph::DType;
use crate::plan::GateAct;
use crate::weights::{LinearWeights, WeightForm};

/// The WGSL of this family (the weight decoding, then the kernels).
pub const SOURCE: &str = concat!(
    include_str!("linear_weights.wgsl"),
    include_str!("linear.wgsl")
);
/// The token embedding (`embed`): rows of the weights decoded by token id.
pub const EMBED_SOURCE: &str = concat!(
    include_str!("linear_weights.wgsl"),
    include_str!("linear_embed.wgsl")
);
/// The subgroup variant's entry (`linear_sg`), compiled appended to [`SOURCE`].
pub const SUBGROUP_SOURCE: &str = include_str!("linear_subgroup.wgsl");
/// The tiled GEMM for prefill chunks (`linear_gemm`), compiled appended to [`SOURCE`].
pub const GEMM_SOURCE: &str = include_str!("linear_gemm.wgsl");
/// Tokens (64) and rows (64; gate pairs: 32 items) a `linear_gemm` workgroup computes.
pub const GEMM_TILE: usize = 64;
/// Chunks of at least this many tokens take the tiled GEMM on GPUs ([`GpuOptions::gemm_tokens`](super::GpuOptions::gemm_tokens); 0:
/// never); shorter ones (decode) the GEMV kernels.
pub const GEMM_TOKENS: usize = 16;
/// Output rows a workgroup computes for input width `k`: the 256 threads split into rows × lanes, and
/// each lane walks `k / lanes` elements — short chains for decode (latency-bound), all threads busy.
pub fn rows_for(k: usize) -> usize {
    match k {
        0..=128 => 8,
        129..=256 => 4,
        257..=1024 => 2,
        _ => 1,
    }
}
/// Tokens a workgroup computes (grid z covers the rest).
pub const TOKENS: usize = 8;

/// Row range of a weight part and its buffers.
#[derive(Debug)]
pub struct Part {
    /// First output row.
    pub n0: usize,
    /// Rows in this part.
    pub rows: usize,
    /// Packed weights (u32 words).
    pub w: wgpu::Buffer,
    /// Scales (block / per-row forms; a dummy otherwise).
    pub s: wgpu::Buffer,
    /// Zero points as f32 (block forms; a dummy otherwise).
    pub z: wgpu::Buffer,
}

/// A linear layer's weights resident on the GPU.
#[derive(Debug)]
pub struct GpuLinear {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Row parts (one unless the weights exceed a binding).
    pub parts: Vec<Part>,
    /// Bias `[N]` (a dummy when absent).
    pub bias: wgpu::Buffer,
    /// Whether there is a bias.
    pub has_bias: bool,
    /// The kernel for this encoding.
    pub kernel: Arc<Kernel>,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Output rows a workgroup computes (`0`: one row an invocation, 64 a workgroup).
    pub rows: usize,
    /// The encoding as `linear_weights.wgsl` reads it (`FORM`, `BLOCK`).
    pub enc: Encoding,
    /// Whether the kernels are the subgroup variant (`linear_sg`, `rows` rows a workgroup).
    pub subgroups: bool,
    /// Whether a lane of the subgroup variant takes whole blocks of a row (4- and 8-bit block forms;
    /// [`GpuOptions::block_lanes`](super::GpuOptions::block_lanes) off: one element of every block, as the other forms).
    pub blocks: bool,
    /// The tiled GEMM (`linear_gemm`, plain output) for chunks of at least `gemm_tokens` tokens; None
    /// for the one-row-an-invocation variant (CPU adapters) or when turned off.
    pub gemm: Option<Arc<Kernel>>,
    /// Tokens from which a chunk takes [`GpuLinear::gemm`].
    pub gemm_tokens: usize,
}

/// Whether a lane of the subgroup variant takes whole blocks of encoding `enc` (the 4- and 8-bit block
/// forms) when `on` ([`GpuOptions::block_lanes`](super::GpuOptions::block_lanes)).
fn block_lanes(subgroups: bool, enc: Encoding, on: bool) -> bool {
    on && subgroups && matches!(enc.form, 4 | 5)
}

/// Rows a workgroup of the subgroup variant: as many as the 256 invocations make subgroups of the
/// adapter's smallest size (8 for 32-wide subgroups), so no subgroup idles.
fn subgroup_rows(ctx: &GpuContext) -> usize {
    (256 / ctx.subgroup_min.max(1) as usize).clamp(1, 64)
}

/// A weight encoding as the kernels read it: `FORM` and, for the block forms, `BLOCK` (elements a
/// block; 32 where it does not apply) of `linear_weights.wgsl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// `FORM`: 0 f32, 1 f16, 2 bf16, 3 int8 per row, 4 4-bit blocks, 5 8-bit blocks.
    pub form: u32,
    /// `BLOCK`: elements a block of the block forms.
    pub block: u32,
}

impl Encoding {
    /// The pipeline constants naming it.
    fn constants(self) -> [(&'static str, f64); 2] {
        [("FORM", self.form as f64), ("BLOCK", self.block as f64)]
    }
}

/// The encoding of `w` and the bytes of one of its rows; `None` for what the kernels do not read.
/// Block forms take any power-of-two block from 16 that divides K (GGUF's Q6_K halves: 8-bit blocks
/// of 16).
fn encoding(w: &LinearWeights) -> Option<(Encoding, usize)> {
    let k = w.k;
    let plain = |form| Encoding { form, block: 32 };
    Some(match &w.form {
        WeightForm::F32(_) => (plain(0), 4 * k),
        WeightForm::F16(_) => (plain(1), 2 * k),
        WeightForm::BF16(_) => (plain(2), 2 * k),
        WeightForm::Int8PerChannel { .. } => (plain(3), k),
        WeightForm::Block {
            bits, block, zero, ..
        } => {
            if *block < 16
                || !block.is_power_of_two()
                || !k.is_multiple_of(*block)
                || !matches!(zero.dtype, DType::F32 | DType::U8)
            {
                return None;
            }
            let block = u32::try_from(*block).ok()?;
            match bits {
                4 => (Encoding { form: 4, block }, k / 2),
                8 => (Encoding { form: 5, block }, k),
                _ => return None,
            }
        }
    })
}

impl GpuLinear {
    /// Whether the GPU kernels take this encoding (block forms: power-of-two blocks from 16 that
    /// divide K).
    pub fn supports(w: &LinearWeights) -> bool {
        encoding(w).is_some()
    }

    /// Uploads `w` (and `bias`), split so that no binding exceeds the context's limit.
    pub fn new(
        ctx: &GpuContext,
        name: &str,
        w: &LinearWeights,
        bias: Option<&[f32]>,
    ) -> Result<GpuLinear> {
        Self::with_limit(ctx, name, w, bias, ctx.binding_limit)
    }

    /// Like [`GpuLinear::new`] with an explicit per-buffer limit (tests force splits with it).
    pub fn with_limit(
        ctx: &GpuContext,
        name: &str,
        w: &LinearWeights,
        bias: Option<&[f32]>,
        limit: u64,
    ) -> Result<GpuLinear> {
        Self::with_variant(ctx, name, w, bias, limit, super::variant(ctx))
    }

    /// Like [`GpuLinear::with_limit`], choosing the kernel variant: one output row an invocation
    /// (`linear_rows`), rows × lanes a workgroup (`linear`), or a subgroup a row (`linear_sg`; where the
    /// context has no subgroups, `linear`).
    pub fn with_variant(
        ctx: &GpuContext,
        name: &str,
        w: &LinearWeights,
        bias: Option<&[f32]>,
        limit: u64,
        variant: Variant,
    ) -> Result<GpuLinear> {
        let (enc, row_bytes) = encoding(w).ok_or_else(|| {
            Error::device(
                DeviceFault::Unsupported,
                format!("`{name}`: weight encoding not supported on the GPU"),
            )
        })?;
        let (n, k) = (w.n, w.k);
        let nb = k / enc.block as usize;
        let side_row = match &w.form {
            WeightForm::Block { .. } => 4 * nb,
            _ => 4,
        };
        let per_row = row_bytes.max(side_row) as u64;
        let mut rows_per = ((limit / per_row.max(1)) as usize / 4 * 4).min(n.next_multiple_of(4));
        if rows_per == 0 {
            return Err(Error::device(DeviceFault::Limits, format!(
                "`{name}`: one weight row ({per_row} bytes) exceeds the binding limit of {limit} bytes"
            )));
        }
        if rows_per >= n {
            rows_per = n;
        }
        let mut parts = Vec::new();
        let mut bytes = 0u64;
        let dummy = || ctx.buffer_with("dummy", &[0; 4]);
        let mut n0 = 0;
        while n0 < n {
            let n1 = (n0 + rows_per).min(n);
            let (wb, sb, zb) = match &w.form {
                WeightForm::F32(t) | WeightForm::F16(t) | WeightForm::BF16(t) => {
                    (&t.bytes()[n0 * row_bytes..n1 * row_bytes], None, None)
                }
                WeightForm::Int8PerChannel { q, scale } => (
                    &q.bytes()[n0 * row_bytes..n1 * row_bytes],
                    Some(scale.typed::<f32>()[n0..n1].to_vec()),
                    None,
                ),
                WeightForm::Block {
                    b, scales, zero, ..
                } => {
                    let z: Vec<f32> = match zero.dtype {
                        DType::F32 => zero.typed::<f32>()[n0 * nb..n1 * nb].to_vec(),
                        _ => zero.bytes()[n0 * nb..n1 * nb]
                            .iter()
                            .map(|&v| v as f32)
                            .collect(),
                    };
                    (
                        &b.bytes()[n0 * row_bytes..n1 * row_bytes],
                        Some(scales.typed::<f32>()[n0 * nb..n1 * nb].to_vec()),
                        Some(z),
                    )
                }
            };
            let w = ctx.buffer_with(&format!("{name}.w[{n0}..]"), wb)?;
            bytes += wb.len() as u64;
            let s = match sb {
                Some(v) => {
                    bytes += 4 * v.len() as u64;
                    ctx.buffer_with(&format!("{name}.scales"), bytemuck::cast_slice(&v))?
                }
                None => dummy()?,
            };
            let z = match zb {
                Some(v) => {
                    bytes += 4 * v.len() as u64;
                    ctx.buffer_with(&format!("{name}.zeros"), bytemuck::cast_slice(&v))?
                }
                None => dummy()?,
            };
            parts.push(Part {
                n0,
                rows: n1 - n0,
                w,
                s,
                z,
            });
            n0 = n1;
        }
        let (bias, has_bias) = match bias {
            Some(b) => (
                ctx.buffer_with(&format!("{name}.bias"), bytemuck::cast_slice(b))?,
                true,
            ),
            None => (dummy()?, false),
        };
        // `rows = 0`: one row an invocation (`linear_rows`), for adapters that are CPUs.
        // llvmpipe bounds an invocation's loop iterations (65535): a very wide row takes the lanes variant.
        let subgroups = variant == Variant::Subgroups && ctx.subgroup_min > 0;
        let rows = if variant == Variant::Rows && k < 60_000 {
            0
        } else if subgroups {
            subgroup_rows(ctx)
        } else {
            rows_for(k)
        };
        let blocks = block_lanes(subgroups, enc, ctx.options.block_lanes);
        let kernel = kernel(ctx, enc, rows, subgroups, blocks)?;
        let gemm_tokens = match ctx.options.gemm_tokens {
            0 => usize::MAX,
            n => n,
        };
        let gemm = if rows != 0 && gemm_tokens != usize::MAX {
            Some(gemm_kernel(
                ctx,
                Spec {
                    enc,
                    mode: 0,
                    norm: false,
                    blocks: false,
                },
            )?)
        } else {
            None
        };
        Ok(GpuLinear {
            enc,
            rows,
            subgroups,
            blocks,
            gemm,
            gemm_tokens,
            n,
            k,
            parts,
            bias,
            has_bias,
            kernel,
            bytes,
        })
    }

    /// Parameters of part `i` for `t` tokens (output row stride `n`), with or without a residual.
    pub fn params(&self, i: usize, t: usize, residual: bool) -> Params {
        let p = &self.parts[i];
        Params::new()
            .u(p.rows)
            .u(self.k)
            .u(t)
            .u(p.n0)
            .u(self.n)
            .u(self.has_bias as usize)
            .u(residual as usize)
    }

    /// Whether a chunk of `t` tokens takes the tiled GEMM.
    pub fn uses_gemm(&self, t: usize) -> bool {
        self.gemm.is_some() && t >= self.gemm_tokens
    }

    /// The kernel (GEMV or GEMM) for `t` tokens of the plain form.
    #[cfg(test)]
    pub fn kernel_for(&self, t: usize) -> &Arc<Kernel> {
        match &self.gemm {
            Some(g) if self.uses_gemm(t) => g,
            _ => &self.kernel,
        }
    }

    /// Workgroups of part `i` for `t` tokens (the kernel of [`GpuLinear::kernel_for`]).
    pub fn groups(&self, i: usize, t: usize, max_dim: u32) -> (u32, u32, u32) {
        if self.uses_gemm(t) {
            let (x, y) = super::grid(self.parts[i].rows, GEMM_TILE, max_dim);
            return (x, y, t.div_ceil(GEMM_TILE) as u32);
        }
        let per_group = if self.rows == 0 { 64 } else { self.rows };
        let (x, y) = super::grid(self.parts[i].rows, per_group, max_dim);
        (x, y, t.div_ceil(TOKENS) as u32)
    }
}

impl GpuLinear {
    /// The token-embedding kernel for these weights (`linear_embed.wgsl`): bindings IDS, W, S, Z, -, -, O.
    pub fn embed_kernel(&self, ctx: &GpuContext) -> Result<Arc<Kernel>> {
        pipeline(ctx, "embed", &self.enc.constants())
    }

    /// Parameters of the embedding of `t` token ids from part `i`.
    pub fn embed_params(&self, i: usize, t: usize) -> Params {
        let p = &self.parts[i];
        Params::new().u(p.rows).u(self.k).u(t).u(p.n0).u(self.n)
    }

    /// Workgroups of the embedding of `t` token ids (each part's dispatch covers every element).
    pub fn embed_groups(&self, t: usize, max_dim: u32) -> (u32, u32, u32) {
        let (x, y) = super::grid(t * self.k, 256, max_dim);
        (x, y, 1)
    }
}

/// What a fused linear dispatch computes besides `x · Wᵀ + bias` (see `linear.wgsl`, P[7..]).
#[derive(Debug, Clone, PartialEq)]
pub enum FusedOut {
    /// One output `[T, N]`.
    One,
    /// The rows are `parts` layers: `(rows, element offset of its [T, rows] output in O)` each.
    Parts(Vec<(usize, usize)>),
    /// The first half of the rows are `a`, the second `b`: output `[T, N/2]` = act(a)·b.
    GatePair(GateAct),
}

/// Most layers one parts dispatch writes.
pub const MAX_PARTS: usize = 4;
/// Tokens a workgroup computes in the fused forms.
pub const FUSED_TOKENS: usize = 4;

impl GpuLinear {
    /// The kernels of the fused forms for these weights: one for any token count, or (one item an
    /// invocation) one for a single token and one for chunks. `None` when the weights are split over
    /// several bindings, which the fused forms do not take.
    pub fn fused_kernels(
        &self,
        ctx: &GpuContext,
        out: &FusedOut,
        norm: bool,
    ) -> Result<Option<Vec<Arc<Kernel>>>> {
        if self.parts.len() != 1 {
            return Ok(None);
        }
        if let FusedOut::Parts(p) = out {
            if p.is_empty() || p.len() > MAX_PARTS || p.iter().map(|x| x.0).sum::<usize>() != self.n
            {
                return Ok(None);
            }
        }
        if matches!(out, FusedOut::GatePair(_)) && !self.n.is_multiple_of(2) {
            return Ok(None);
        }
        let spec = Spec {
            enc: self.enc,
            mode: out.mode(),
            norm,
            blocks: self.blocks,
        };
        Ok(Some(if self.rows == 0 {
            vec![
                fused_kernel(ctx, spec, "linear_rows_fused", 8)?,
                fused_kernel(ctx, spec, "linear_rows_fused4", 8)?,
            ]
        } else {
            let gemv = if self.subgroups {
                fused_kernel(ctx, spec, "linear_sg", self.rows)?
            } else {
                // A pair needs both rows in one workgroup.
                fused_kernel(ctx, spec, "linear", self.rows.max(2))?
            };
            match self.gemm {
                Some(_) => vec![gemv, gemm_kernel(ctx, spec)?],
                None => vec![gemv],
            }
        }))
    }

    /// Which of [`GpuLinear::fused_kernels`] runs `t` tokens.
    pub fn fused_pick(&self, t: usize) -> usize {
        if self.rows == 0 {
            usize::from(t != 1)
        } else {
            usize::from(self.uses_gemm(t))
        }
    }

    /// Parameters of the fused forms for `t` tokens: RMS norm of x with `eps` when `norm` is set.
    pub fn fused_params(&self, t: usize, out: &FusedOut, norm: Option<f32>) -> Params {
        let n = match out {
            FusedOut::GatePair(_) => self.n / 2,
            _ => self.n,
        };
        let mode = out.mode() as usize;
        let mut p = Params::new()
            .u(n)
            .u(self.k)
            .u(t)
            .u(0)
            .u(n)
            .u(self.has_bias as usize)
            .u(0)
            .u(mode)
            .u(norm.is_some() as usize)
            .f(norm.unwrap_or(0.0));
        match out {
            FusedOut::Parts(parts) => {
                p = p.u(parts.len());
                let mut end = 0;
                for &(rows, base) in parts {
                    end += rows;
                    p = p.u(end).u(base);
                }
            }
            _ => p = p.u(1),
        }
        p
    }

    /// Workgroups of the fused forms for `t` tokens.
    pub fn fused_groups(&self, t: usize, out: &FusedOut, max_dim: u32) -> (u32, u32, u32) {
        let pair = matches!(out, FusedOut::GatePair(_));
        let items = if pair { self.n / 2 } else { self.n };
        if self.rows != 0 && self.uses_gemm(t) {
            let per = if pair { GEMM_TILE / 2 } else { GEMM_TILE };
            let (x, y) = super::grid(items, per, max_dim);
            return (x, y, t.div_ceil(GEMM_TILE) as u32);
        }
        let per = match self.rows {
            0 => 64,
            r if pair && !self.subgroups => r.max(2) / 2,
            r => r,
        };
        let (x, y) = super::grid(items, per, max_dim);
        (x, y, t.div_ceil(FUSED_TOKENS) as u32)
    }
}

impl FusedOut {
    /// `MODE` in `linear.wgsl`.
    pub fn mode(&self) -> u32 {
        match self {
            FusedOut::One => 0,
            FusedOut::Parts(_) => 1,
            FusedOut::GatePair(GateAct::Silu) => 2,
            FusedOut::GatePair(GateAct::GeluTanh) => 3,
        }
    }
}

/// The pipeline constants of a fused-forms kernel.
#[derive(Debug, Clone, Copy)]
struct Spec {
    enc: Encoding,
    mode: u32,
    norm: bool,
    /// `BLOCKS` of `linear_sg`.
    blocks: bool,
}

/// A fused-forms kernel: `entry` of `linear.wgsl` specialized to `spec`, `rows` rows a workgroup.
fn fused_kernel(ctx: &GpuContext, spec: Spec, entry: &str, rows: usize) -> Result<Arc<Kernel>> {
    let mut constants = spec.enc.constants().to_vec();
    constants.extend([
        ("ROWS", rows as f64),
        ("MODE", spec.mode as f64),
        ("NORM", f64::from(u8::from(spec.norm))),
    ]);
    if entry == "linear_sg" {
        constants.push(("BLOCKS", f64::from(u8::from(spec.blocks))));
    }
    pipeline(ctx, entry, &constants)
}

/// The tiled GEMM (`linear_gemm`) specialized to `spec`.
fn gemm_kernel(ctx: &GpuContext, spec: Spec) -> Result<Arc<Kernel>> {
    let mut constants = spec.enc.constants().to_vec();
    constants.extend([
        ("MODE", spec.mode as f64),
        ("NORM", f64::from(u8::from(spec.norm))),
    ]);
    pipeline(ctx, "linear_gemm", &constants)
}

/// The kernel for encoding `enc` (see `linear.wgsl`) computing `rows` rows a workgroup (`0`: the
/// one-row-an-invocation variant; `subgroups`: the subgroup variant, `blocks`: with whole blocks a
/// lane): bindings X, W, S, Z, BIAS, RES, O.
pub fn kernel(
    ctx: &GpuContext,
    enc: Encoding,
    rows: usize,
    subgroups: bool,
    blocks: bool,
) -> Result<Arc<Kernel>> {
    let mut constants = enc.constants().to_vec();
    let entry = match rows {
        0 => {
            constants.push(("ROWS", 8.0));
            "linear_rows"
        }
        r if subgroups => {
            constants.push(("ROWS", r as f64));
            constants.push(("BLOCKS", f64::from(u8::from(blocks))));
            "linear_sg"
        }
        r => {
            constants.push(("ROWS", r as f64));
            "linear"
        }
    };
    pipeline(ctx, entry, &constants)
}

impl GpuLinear {
    /// Test hook: the subgroup variant's kernel with whole blocks a lane on or off.
    #[cfg(test)]
    pub(crate) fn with_block_lanes(mut self, ctx: &GpuContext, on: bool) -> Result<Self> {
        self.blocks = block_lanes(self.subgroups, self.enc, on);
        self.kernel = kernel(ctx, self.enc, self.rows, self.subgroups, self.blocks)?;
        Ok(self)
    }
}

/// `entry` of `linear.wgsl` (`linear_sg`: of it with `linear_subgroup.wgsl`) with these pipeline
/// constants: bindings X, W, S, Z, BIAS, AUX, O.
fn pipeline(ctx: &GpuContext, entry: &str, constants: &[(&str, f64)]) -> Result<Arc<Kernel>> {
    let mut binds = [Bind::Read; 7];
    binds[6] = Bind::Write;
    static WITH_SG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static WITH_GEMM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let (key, src): (&str, &str) = match entry {
        "linear_sg" => (
            entry,
            WITH_SG.get_or_init(|| format!("{SOURCE}\n{SUBGROUP_SOURCE}")),
        ),
        "linear_gemm" => (
            entry,
            WITH_GEMM.get_or_init(|| format!("{SOURCE}\n{GEMM_SOURCE}")),
        ),
        "embed" => ("linear_embed", EMBED_SOURCE),
        _ => ("linear", SOURCE),
    };
    ctx.pipeline(key, src, entry, &binds, constants)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{ctx, noise, rms_rows};
    use super::*;
    use crate::tensor::Tensor;
    use half::{bf16, f16};

    fn forms(n: usize, k: usize, seed: u64) -> Vec<(&'static str, LinearWeights)> {
        let v = noise(n * k, seed);
        let bytes: Vec<u8> = noise(n * k, seed + 1)
            .iter()
            .map(|x| ((x + 1.0) * 127.9) as u8)
            .collect();
        let nb = k / 32;
        let mut out = vec![
            (
                "f32",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::F32(Tensor::f32(&[n, k], &v)),
                },
            ),
            (
                "f16",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::F16(Tensor::from_slice(
                        DType::F16,
                        &[n, k],
                        &v.iter().map(|x| f16::from_f32(*x)).collect::<Vec<_>>(),
                    )),
                },
            ),
            (
                "bf16",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::BF16(Tensor::from_slice(
                        DType::BF16,
                        &[n, k],
                        &v.iter().map(|x| bf16::from_f32(*x)).collect::<Vec<_>>(),
                    )),
                },
            ),
            (
                "int8",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::Int8PerChannel {
                        q: Tensor::from_slice(
                            DType::I8,
                            &[n, k],
                            &bytes.iter().map(|b| *b as i8).collect::<Vec<_>>(),
                        ),
                        scale: Tensor::f32(&[n], &noise(n, seed + 2)),
                    },
                },
            ),
        ];
        if k.is_multiple_of(32) {
            let scales = Tensor::f32(&[n * nb], &noise(n * nb, seed + 3));
            let zf: Vec<f32> = noise(n * nb, seed + 4)
                .iter()
                .map(|x| 8.0 + 6.0 * x)
                .collect();
            out.push((
                "q4 f32 zero",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::Block {
                        bits: 4,
                        block: 32,
                        b: Tensor::from_slice(DType::U8, &[n * nb * 16], &bytes[..n * nb * 16]),
                        scales: scales.clone(),
                        zero: Tensor::f32(&[n * nb], &zf),
                    },
                },
            ));
            let zu: Vec<u8> = zf.iter().map(|z| *z as u8).collect();
            out.push((
                "q4 u8 zero",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::Block {
                        bits: 4,
                        block: 32,
                        b: Tensor::from_slice(DType::U8, &[n * nb * 16], &bytes[..n * nb * 16]),
                        scales: scales.clone(),
                        zero: Tensor::f32(
                            &[n * nb],
                            &zu.iter().map(|z| *z as f32).collect::<Vec<_>>(),
                        ),
                    },
                },
            ));
            out.push((
                "q8",
                LinearWeights {
                    n,
                    k,
                    form: WeightForm::Block {
                        bits: 8,
                        block: 32,
                        b: Tensor::from_slice(DType::U8, &[n * k], &bytes),
                        scales,
                        zero: Tensor::from_slice(DType::U8, &[n * nb], &vec![128u8; n * nb]),
                    },
                },
            ));
        }
        out.extend(other_blocks(n, k, &bytes, seed));
        out
    }

    /// Block forms of other sizes (where they divide `k`): 8-bit blocks of 16 with u8 zero points
    /// (GGUF Q6_K's halves, zero point 32), 4-bit blocks of 16 and of 64 with f32 zero points.
    fn other_blocks(
        n: usize,
        k: usize,
        bytes: &[u8],
        seed: u64,
    ) -> Vec<(&'static str, LinearWeights)> {
        let mut out = Vec::new();
        let block = |name, bits: u32, block: usize, zero: Tensor| {
            let nb = n * k / block;
            let b = &bytes[..n * k * bits as usize / 8];
            let w = LinearWeights::block(
                n,
                k,
                bits,
                block,
                Tensor::from_slice(DType::U8, &[b.len()], b),
                Tensor::f32(&[nb], &noise(nb, seed + 5)),
                Some(&zero),
            );
            (name, w.unwrap())
        };
        if k.is_multiple_of(16) {
            let nb = n * k / 16;
            let z6: Vec<u8> = (0..nb).map(|i| 32 + (i % 3) as u8).collect();
            out.push(block(
                "q8 b16",
                8,
                16,
                Tensor::from_slice(DType::U8, &[nb], &z6),
            ));
            let zf: Vec<f32> = noise(nb, seed + 6).iter().map(|x| 8.0 + 6.0 * x).collect();
            out.push(block("q4 b16", 4, 16, Tensor::f32(&[nb], &zf)));
        }
        if k.is_multiple_of(64) {
            let nb = n * k / 64;
            let zf: Vec<f32> = noise(nb, seed + 7).iter().map(|x| 8.0 + 6.0 * x).collect();
            out.push(block("q4 b64", 4, 64, Tensor::f32(&[nb], &zf)));
        }
        out
    }

    /// Bytes of one row of `w` on the GPU, its scales and zero points included: what a part's limit
    /// must hold to split it by rows.
    fn split_row(w: &LinearWeights) -> usize {
        let (enc, bytes) = encoding(w).unwrap();
        bytes.max(4 * (w.k / enc.block as usize).max(1))
    }

    const VARIANTS: [Variant; 3] = [Variant::Lanes, Variant::Rows, Variant::Subgroups];

    /// Every variant, and the subgroup variant once more with one element of every block a lane
    /// (`(variant, whole blocks a lane)`).
    fn variants() -> Vec<(Variant, bool)> {
        let mut v: Vec<(Variant, bool)> = VARIANTS.iter().map(|&v| (v, true)).collect();
        v.push((Variant::Subgroups, false));
        v
    }

    /// The subgroup variant is what runs wherever the device has subgroups (lavapipe has: CI covers it);
    /// chunks from [`GEMM_TOKENS`] tokens take the tiled GEMM on every variant but `Rows`.
    fn check_variant(ctx: &GpuContext, g: &GpuLinear, v: Variant, t: usize) {
        assert_eq!(
            g.uses_gemm(t),
            v != Variant::Rows && t >= GEMM_TOKENS,
            "{v:?} t {t}"
        );
        let sg = v == Variant::Subgroups && ctx.info().subgroups;
        assert_eq!(g.subgroups, sg, "{v:?}: {:?}", ctx.info());
        if sg {
            assert!(
                g.kernel.name.starts_with("linear_sg/"),
                "{v:?}: {}",
                g.kernel.name
            );
        }
    }

    #[test]
    fn every_encoding_matches_the_cpu_across_shapes_and_splits() {
        let Some(ctx) = ctx() else { return };
        for (n, k, t) in [
            (1, 32, 1),
            (7, 64, 3),
            (64, 576, 1),
            (100, 96, 9),
            (33, 33, 2),
            (260, 128, 17),
            (130, 96, 70),
        ] {
            for (name, w) in forms(n, k, (n * k + t) as u64) {
                let x: Vec<f32> = noise(t * k, 11);
                let bias = noise(n, 12);
                let res = noise(t * n, 13);
                let mut want = vec![0.0; t * n];
                w.forward(&x, t, Some(&bias), &mut want).unwrap();
                want.iter_mut().zip(&res).for_each(|(w, r)| *w += r);
                // Whole, and split into parts of (about) a quarter of the rows.
                let per = split_row(&w);
                let split = (per * n.div_ceil(4).next_multiple_of(4)) as u64;
                for (limit, (variant, blocks)) in [ctx.binding_limit, split]
                    .into_iter()
                    .flat_map(|l| variants().into_iter().map(move |v| (l, v)))
                {
                    let g = GpuLinear::with_variant(&ctx, name, &w, Some(&bias), limit, variant)
                        .and_then(|g| g.with_block_lanes(&ctx, blocks))
                        .unwrap();
                    check_variant(&ctx, &g, variant, t);
                    let variant = (variant, g.blocks);
                    let got = super::super::exec::run_linear_once(&ctx, &g, &x, &res, t).unwrap();
                    // f32 sums in another order: error relative to the output's scale.
                    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                    let e = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f32::max)
                        / scale;
                    assert!(
                        e < 2e-5,
                        "{name} n {n} k {k} t {t} parts {} {variant:?}: {e}",
                        g.parts.len()
                    );
                    if limit < ctx.binding_limit && n >= 64 {
                        assert!(g.parts.len() > 1, "{name}: expected a split");
                    }
                }
            }
        }
    }

    /// The embedding kernel decodes the rows the CPU reference decodes, bit for bit, for every
    /// encoding, whole and split into parts; negative ids count from the end, ids outside give zeros.
    #[test]
    fn embedding_rows_match_the_cpu_decoder() {
        let Some(ctx) = ctx() else { return };
        for (n, k) in [(1, 32), (7, 64), (100, 96), (260, 576)] {
            let v = n as i64;
            let ids: Vec<i64> = vec![
                0,
                v - 1,
                v / 2,
                -1,
                -v,
                v,
                -v - 1,
                3 % v,
                i64::MAX,
                i64::MIN,
            ];
            for (name, w) in forms(n, k, (3 * n + k) as u64) {
                let per = split_row(&w);
                let split = (per * n.div_ceil(4).next_multiple_of(4)) as u64;
                for limit in [ctx.binding_limit, split] {
                    let g = GpuLinear::with_limit(&ctx, name, &w, None, limit).unwrap();
                    let got = super::super::exec::run_embed_once(&ctx, &g, &ids).unwrap();
                    let mut row = vec![0f32; k];
                    for (&id, got) in ids.iter().zip(got.chunks(k)) {
                        let r = if id < 0 { id.checked_add(v) } else { Some(id) };
                        match r.filter(|r| (0..v).contains(r)) {
                            Some(r) => w.decode_row(r as usize, &mut row),
                            None => row.fill(0.0),
                        }
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(got),
                            bits(&row),
                            "{name} n {n} k {k} id {id} parts {}",
                            g.parts.len()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fused_forms_match_the_cpu_layers_they_replace() {
        let Some(ctx) = ctx() else { return };
        let eps = 1e-5;
        // 1056: wide enough for one row a workgroup (ROWS = 1: pairs still take two).
        for (k, t) in [
            (64, 1),
            (576, 1),
            (96, 3),
            (576, 6),
            (64, 9),
            (1056, 2),
            (96, 20),
            (64, 70),
        ] {
            let x: Vec<f32> = noise(t * k, 21).iter().map(|v| 3.0 * v).collect();
            let gamma: Vec<f32> = noise(k, 22).iter().map(|v| 1.0 + 0.5 * v).collect();
            let sizes = [40usize, 12, 12];
            for name in ["f32", "f16", "int8", "q4 f32 zero", "q8", "q8 b16"] {
                let layers: Vec<LinearWeights> = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        forms(n, k, (7 * i + k) as u64)
                            .into_iter()
                            .find(|f| f.0 == name)
                            .unwrap()
                            .1
                    })
                    .collect();
                let refs: Vec<&LinearWeights> = layers.iter().collect();
                let cat = LinearWeights::concat(&refs).unwrap();
                let ntot: usize = sizes.iter().sum();
                let bias = noise(ntot, 23);
                for norm in [None, Some(eps)] {
                    let xin = match norm {
                        Some(e) => rms_rows(&x, &gamma, e),
                        None => x.clone(),
                    };
                    // Each layer alone on the CPU.
                    let mut want = Vec::new();
                    let mut b0 = 0;
                    for l in &layers {
                        let mut y = vec![0.0; t * l.n];
                        l.forward(&xin, t, Some(&bias[b0..b0 + l.n]), &mut y)
                            .unwrap();
                        want.push(y);
                        b0 += l.n;
                    }
                    let scale = want.iter().flatten().fold(1.0f32, |m, v| m.max(v.abs()));
                    for (variant, blocks) in variants() {
                        let g = GpuLinear::with_variant(
                            &ctx,
                            name,
                            &cat,
                            Some(&bias),
                            ctx.binding_limit,
                            variant,
                        )
                        .and_then(|g| g.with_block_lanes(&ctx, blocks))
                        .unwrap();
                        check_variant(&ctx, &g, variant, t);
                        let variant = (variant, g.blocks);
                        let what = format!("{name} k {k} t {t} norm {norm:?} {variant:?}");
                        // Parts: each layer's [T, n] output at its own (padded) offset.
                        let mut parts = Vec::new();
                        let mut at = 0;
                        for &n in &sizes {
                            parts.push((n, at));
                            at += (t * n).next_multiple_of(64);
                        }
                        let out = FusedOut::Parts(parts.clone());
                        let got = super::super::exec::run_fused_linear_once(
                            &ctx, &g, &out, norm, &x, &gamma, t, at,
                        )
                        .unwrap();
                        for ((n, base), w) in parts.iter().zip(&want) {
                            let e = got[*base..base + t * n]
                                .iter()
                                .zip(w)
                                .map(|(a, b)| (a - b).abs())
                                .fold(0.0, f32::max)
                                / scale;
                            assert!(e < 3e-5, "parts {what}: {e}");
                        }
                        // One output (all rows as one layer).
                        let got = super::super::exec::run_fused_linear_once(
                            &ctx,
                            &g,
                            &FusedOut::One,
                            norm,
                            &x,
                            &gamma,
                            t,
                            t * ntot,
                        )
                        .unwrap();
                        for tt in 0..t {
                            let mut c = 0;
                            for (w, &n) in want.iter().zip(&sizes) {
                                for j in 0..n {
                                    let e = (got[tt * ntot + c + j] - w[tt * n + j]).abs() / scale;
                                    assert!(e < 3e-5, "one {what}: {e}");
                                }
                                c += n;
                            }
                        }
                        // Gate pairs over the last two layers (12 rows each).
                        let pair = LinearWeights::concat(&refs[1..]).unwrap();
                        let gp = GpuLinear::with_variant(
                            &ctx,
                            name,
                            &pair,
                            Some(&bias[40..]),
                            ctx.binding_limit,
                            variant.0,
                        )
                        .and_then(|g| g.with_block_lanes(&ctx, variant.1))
                        .unwrap();
                        for act in [GateAct::Silu, GateAct::GeluTanh] {
                            let got = super::super::exec::run_fused_linear_once(
                                &ctx,
                                &gp,
                                &FusedOut::GatePair(act),
                                norm,
                                &x,
                                &gamma,
                                t,
                                t * 12,
                            )
                            .unwrap();
                            let mut r = vec![0.0; t * 12];
                            let gate = match act {
                                GateAct::Silu => crate::backend::cpu::misc::silu_gate_reference,
                                GateAct::GeluTanh => crate::backend::cpu::misc::gelu_gate_reference,
                            };
                            gate(&want[1], &want[2], &mut r).unwrap();
                            for (i, (v, r)) in got.iter().zip(&r).enumerate() {
                                assert!(
                                    (v - r).abs() / (1.0 + r.abs()) < 1e-4 * scale,
                                    "{act:?} pair {what} at {i}: {v} vs {r}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_larger_than_a_binding_is_an_error() {
        let Some(ctx) = ctx() else { return };
        let (_, w) = forms(4, 64, 1).remove(0);
        let e = GpuLinear::with_limit(&ctx, "big", &w, None, 100).unwrap_err();
        assert!(e.to_string().contains("exceeds the binding limit"), "{e}");
    }
}
