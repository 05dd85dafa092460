//! The wgpu backend: WGSL kernels (one file per kernel family, the `.wgsl` beside its `.rs`) and the
//! executor that runs a [`crate::plan::Plan`] on the GPU.
//!
//! Placement is decided once, when the model is loaded ([`exec::GpuPlan::new`]): a step runs on the GPU
//! when a kernel supports its dtypes and shapes and it reads a GPU-resident value (or is heavy: linear
//! layers, attention); everything else — the small int64 shape arithmetic, the embedding's byte
//! unpacking, the sampling tail after the top-k — runs on the CPU through the same generic ops, and the
//! executor moves the few values that cross (the input rows, the mask, the chosen token).

pub mod attention;
pub mod attention_plain;
pub(crate) mod backend;
pub mod choice;
#[cfg(test)]
mod conformance;
pub mod context;
pub mod elementwise;
pub mod exec;
pub mod graph;
pub mod linear;
pub mod norm;
pub mod options;
pub mod rope;
pub mod select;

pub use context::{BackendFilter, DeviceRequest, GpuContext, GpuInfo};
pub use options::{GpuFusions, GpuOptions};

/// Words of the per-dispatch parameter block (`struct Params` in every kernel).
pub const PARAM_WORDS: usize = 64;

/// The parameter block every kernel reads at `@group(0) @binding(0)`: 64 u32 words (floats bit-cast).
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// The words.
    pub w: [u32; PARAM_WORDS],
    len: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            w: [0; PARAM_WORDS],
            len: 0,
        }
    }
}

impl Params {
    /// An empty block.
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends a u32 (usize values are checked to fit).
    pub fn u(mut self, v: usize) -> Self {
        self.w[self.len] = u32::try_from(v).unwrap_or(u32::MAX);
        self.len += 1;
        self
    }
    /// Appends an f32.
    pub fn f(mut self, v: f32) -> Self {
        self.w[self.len] = v.to_bits();
        self.len += 1;
        self
    }
    /// Sets word `i`.
    pub fn set(mut self, i: usize, v: u32) -> Self {
        self.w[i] = v;
        self.len = self.len.max(i + 1);
        self
    }
    /// Bytes to upload.
    pub fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.w)
    }
}

/// WGSL shared by every kernel: the parameter block and its accessors, the soft cap (tanh).
pub const PRELUDE: &str = r#"
struct Params { w: array<vec4<u32>, 16> }
@group(0) @binding(0) var<uniform> P: Params;
fn pu(i: u32) -> u32 { return P.w[i / 4u][i % 4u]; }
fn pf(i: u32) -> f32 { return bitcast<f32>(P.w[i / 4u][i % 4u]); }
// c·tanh(s/c) for a soft cap c > 0, s itself for c <= 0; tanh through exp of a non-positive argument
// (WGSL's tanh may overflow for large |x| on some drivers).
fn soft_cap(s: f32, c: f32) -> f32 {
    if (c <= 0.0) { return s; }
    let e = exp(-2.0 * abs(s / c));
    return c * sign(s) * (1.0 - e) / (1.0 + e);
}
"#;

/// Workgroups needed for `n` items at `per` items a workgroup, spread over x/y so that neither exceeds
/// `max_dim` (the adapter's `max_compute_workgroups_per_dimension`). Kernels recover the linear index as
/// `wid.x + wid.y * num_workgroups.x`.
pub fn grid(n: usize, per: usize, max_dim: u32) -> (u32, u32) {
    let groups = n.div_ceil(per.max(1)).max(1) as u64;
    let max = u64::from(max_dim.max(1));
    if groups <= max {
        (groups as u32, 1)
    } else {
        let y = groups.div_ceil(max);
        (groups.div_ceil(y) as u32, y as u32)
    }
}

/// How the kernels with several variants (`linear*`, `attention*`) split their work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// One item an invocation, no barriers: adapters that are CPUs (lavapipe, SwiftShader), which run
    /// invocations as SIMD lanes and pay dearly for workgroup barriers.
    Rows,
    /// Rows × lanes a workgroup, lane sums reduced through workgroup memory.
    Lanes,
    /// Like `Lanes`, a row's lanes one subgroup reduced with `subgroupAdd` (linear layers; the other
    /// kernels run their `Lanes` form): GPUs with subgroup operations.
    Subgroups,
}

/// The variant for this context: the one its [`GpuOptions::variant`] names (`Subgroups` only where the
/// device has them, else `Lanes`), else `Rows` on CPU adapters, `Subgroups` where the device has
/// subgroup operations, `Lanes` otherwise.
pub fn variant(ctx: &context::GpuContext) -> Variant {
    let sg = ctx.subgroup_min > 0;
    match ctx.options.variant {
        Some(Variant::Subgroups) if !sg => Variant::Lanes,
        Some(v) => v,
        None if ctx.info().is_software() => Variant::Rows,
        None if sg => Variant::Subgroups,
        None => Variant::Lanes,
    }
}

/// `base` within what `adapter` runs (probed, no device opened):
/// - linear groups of at most [`linear::MAX_PARTS`] members, of encodings the kernels read, stacked
///   within one binding; the norm and the SiLU gate folded in except under [`Variant::Rows`] (CPU
///   adapters), which would compute every row's `x·scale` product (the norm's cost times N) where a
///   GPU hides it behind the weight loads, and ran the SiLU pair slower on lavapipe than the parts and
///   the gate's own dispatch;
/// - the attention reading its projections where a shader stage has the storage buffers it binds.
pub(crate) fn plan_options(
    base: crate::plan::PlanOptions,
    adapter: &context::Probed,
    options: &GpuOptions,
) -> crate::plan::PlanOptions {
    let rows = match options.variant {
        Some(v) => v == Variant::Rows,
        None => adapter.id.is_software(),
    };
    bounded(base, &adapter.limits(), rows)
}

/// `base` within what an opened context's kernels run (its limits and [`variant`]).
pub(crate) fn plan_options_for(
    base: crate::plan::PlanOptions,
    ctx: &context::GpuContext,
) -> crate::plan::PlanOptions {
    bounded(base, &ctx.device.limits(), variant(ctx) == Variant::Rows)
}

/// `base` within `limits`, for the rows variant or not (no norm or gate in its linear groups).
fn bounded(
    base: crate::plan::PlanOptions,
    limits: &wgpu::Limits,
    rows: bool,
) -> crate::plan::PlanOptions {
    let groups = crate::plan::GroupCaps {
        max_members: linear::MAX_PARTS,
        max_bytes: limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size),
        norm: !rows,
        gate: !rows,
        takes: linear::GpuLinear::supports,
    };
    let rope_binds = |qk_norm| {
        let inputs = attention::Inputs::Rope {
            interleaved: false,
            qk_norm,
        };
        limits.max_storage_buffers_per_shader_stage >= inputs.bindings()
    };
    crate::plan::PlanOptions {
        linear_groups: base.linear_groups.map(|_| groups),
        attention_inputs: base.attention_inputs && rope_binds(false),
        attention_input_norms: base.attention_input_norms && rope_binds(true),
        ..base
    }
}

/// Whether kernels with a one-item-an-invocation variant use it ([`Variant::Rows`]).
pub fn rows_variant(ctx: &context::GpuContext) -> bool {
    variant(ctx) == Variant::Rows
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A lavapipe (or real) device for kernel tests; tests skip with a note when no adapter exists.
    use super::*;
    use std::sync::{Arc, OnceLock};

    /// The shared test context, or `None` (printed once) when this machine has no wgpu adapter.
    pub fn ctx() -> Option<Arc<GpuContext>> {
        static CTX: OnceLock<Option<Arc<GpuContext>>> = OnceLock::new();
        CTX.get_or_init(
            || match GpuContext::new(&DeviceRequest::Gpu(None), BackendFilter::Any) {
                Ok(c) => Some(c),
                Err(e) => {
                    if std::env::var_os("ONESTEP_REQUIRE_GPU").is_some() {
                        panic!("ONESTEP_REQUIRE_GPU is set but no adapter: {e}");
                    }
                    eprintln!("note: no wgpu adapter, GPU kernel tests skipped: {e}");
                    None
                }
            },
        )
        .clone()
    }

    pub use crate::backend::testutil::noise;

    /// `x`'s rows (`[.., w.len()]`) RMS-normalized with scale `w`: `x / sqrt(mean(x²) + eps) · w`, the
    /// sums in f64 (the reference of the kernels' folded norms).
    pub fn rms_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        let d = w.len();
        x.chunks(d)
            .flat_map(|r| {
                let ms = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                r.iter()
                    .zip(w)
                    .map(move |(v, s)| (*v as f64 * inv) as f32 * s)
            })
            .collect()
    }

    /// Max |a - b| / (1 + |b|).
    pub fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0, f32::max)
    }
}
