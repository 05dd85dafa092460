//! The GPU executor: runs a [`Plan`] with every step it can on the GPU.
//!
//! [`GpuPlan::new`] does a *dry run* of the plan at the largest chunk (`max_chunk` tokens): CPU steps run
//! for real (on placeholders where they read GPU values), GPU steps only infer their output shapes. That
//! fixes, once: where each step runs, the size of every GPU buffer, every pipeline and every bind group.
//! A step then records its dispatches into one compute pass; the pass is submitted only when a CPU step
//! needs a GPU value (for the step graph: once, at the token choice's tail) and only those values are
//! read back. KV caches: the host pages ([`crate::kv`]) are the truth; per [`GpuState`], the layers the
//! budget allows stay resident and the rest stream through a ring of two slots (uploads recorded in the
//! command stream, ahead of the layer before). The attention kernel writes each chunk's new K/V rows into
//! its buffer and only those rows are copied back, with the chosen token (and logits when asked).
//!
//! The rooms, in the order a model meets them:
//! - [`groups`]: the plan's linear groups bound to the GPU (stacked weights);
//! - [`place`]: [`GpuPlan::new`], the dry run: placement, buffer sizes, pipelines, bind groups;
//! - [`desc`]: what a step does on the GPU ([`desc::Desc`]), the executor's view of its inputs and
//!   the stage it is described at ([`Stage`]: placement at load, or a step at run time);
//! - [`describe`]: one description function per step kind (generic nodes by op);
//! - [`state`]: a sequence's GPU KV cache ([`GpuState`]): resident layers and the streamed ring;
//! - [`flight`]: a step begun, finished, and the next decode step run ahead of it;
//! - [`record`]: commands into compute passes, submissions, read-backs, profiling timestamps;
//! - `harness` (tests): a kernel or a linear layer run once on given inputs.

mod cache_attention;
mod desc;
mod describe;
mod drive;
mod flight;
mod groups;
#[cfg(test)]
mod harness;
mod node;
mod place;
mod record;
mod state;

pub use desc::Meta;
pub use flight::Flight;
pub use state::GpuState;

use desc::{check_positions, BufRef, Desc, Disp, Env, Kept, Stage};
use flight::{Cmd, Counts, Feed, Read};
use groups::GpuGroup;
#[cfg(test)]
pub(crate) use harness::*;
use record::Stamps;
use state::Kv;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::attention::{self, AttnParams};
use super::context::{GpuContext, Kernel};
use super::elementwise::{self as ew, BinOp, UnOp};
use super::linear::{self, GpuLinear};
use super::{choice, grid, norm, rope, rows_variant, select, Params};
use crate::backend::cpu::ops;
use crate::backend::mask::Attended;
use crate::error::{DeviceFault, Error, Result};
use crate::graph::{Attr, DType};
use crate::plan::{GateAct, Plan, RoundTrip, Step, ValId};
use crate::tensor::Tensor;

/// Runs one plan step on the CPU (the model's generic path).
pub type CpuStep<'a> = dyn FnMut(&Step, &mut [Option<Tensor>]) -> Result<()> + 'a;

/// Counters of the GPU executor.
#[derive(Debug, Default, Clone)]
pub struct GpuStats {
    /// Plan steps placed on the GPU.
    pub gpu_steps: usize,
    /// Plan steps on the CPU.
    pub cpu_steps: usize,
    /// Dispatches recorded by the last step.
    pub dispatches: usize,
    /// Command submissions in the last step.
    pub submits: usize,
    /// Of those, the ones the host waited for (read-backs).
    pub waits: usize,
    /// Bytes uploaded in the last step.
    pub bytes_up: u64,
    /// Bytes read back in the last step.
    pub bytes_down: u64,
    /// Weight bytes resident on the GPU.
    pub weight_bytes: u64,
    /// Milliseconds of the last step (CPU steps, recording, submission and waits).
    pub step_ms: f64,
    /// Of those, milliseconds waiting for the GPU (submit → results mapped).
    pub wait_ms: f64,
    /// Of the wait, milliseconds inside `queue.submit` (wgpu's validation and resource tracking).
    pub submit_ms: f64,
    /// Activation buffer bytes.
    pub scratch_bytes: u64,
    /// Fused linear groups (several layers of one input as one dispatch, or a layer with its norm).
    pub linear_groups: usize,
    /// Of those, groups that fold the RMS norm before them.
    pub fused_norms: usize,
    /// Linear layers (and groups) whose kernel reduces with subgroup operations (`linear_sg`).
    pub subgroup_linears: usize,
    /// Whether the last step ran ahead (recorded and submitted before the step it follows was read
    /// back, its token ids fed on the GPU).
    pub ahead: bool,
    /// Steps that ran ahead and held.
    pub ahead_steps: u64,
    /// Steps run ahead that did not hold (the caller fed another token or changed the inputs): dropped.
    pub ahead_missed: u64,
    /// GPU steps the last step described anew (the others reused the description of the last step of
    /// the same token count: a decode step describes its attention and what reads token ids or positions).
    pub described: usize,
}

/// The plan bound to a GPU.
pub struct GpuPlan {
    ctx: Arc<GpuContext>,
    /// Per step: placed on the GPU.
    on_gpu: Vec<bool>,
    /// Per value: index into `bufs` (views share their source's).
    home: Vec<Option<usize>>,
    bufs: Vec<wgpu::Buffer>,
    caps: Vec<u64>,
    /// Per value: a constant already uploaded to its home buffer.
    const_loaded: Vec<bool>,
    /// Per graph input: the tensor its home buffer last received. An input the sequence state holds
    /// from step to step (a transcription window's cross-attention K/V) is uploaded once while it
    /// is the same tensor (the same shared storage: kept alive here, so no other tensor can take its
    /// address). Every value has its own buffer (views aside), which nothing but uploads writes.
    uploaded: Mutex<Vec<Option<Tensor>>>,
    linears: HashMap<usize, GpuLinear>,
    /// Steps whose weights are another step's: a tied embedding → its output layer's step.
    lin_alias: HashMap<usize, usize>,
    dummy: wgpu::Buffer,
    /// Largest KV-cache buffer (bytes): a layer's cache beyond it is split into segments of whole rows.
    seg_bytes: u64,
    /// One-item-an-invocation kernel variants ([`super::rows_variant`], decided once).
    rows_variant: bool,
    /// Partials of split-cache attention (sized by the dry run).
    part: wgpu::Buffer,
    /// Keys from which a decode step's attention is split over workgroups, and keys a workgroup then
    /// ([`super::GpuOptions::split_keys`], [`super::GpuOptions::split_chunk`]).
    split_keys: usize,
    split_chunk: usize,
    /// Dispatches after which a step submits what it has recorded and goes on recording, so the GPU
    /// works while the host prepares the rest ([`super::GpuOptions::submit_every`]; 0: one submission a
    /// step, the default on CPU adapters and always when profiling).
    submit_every: usize,
    /// Bytes of partials the dry run asked for.
    part_need: std::sync::atomic::AtomicU64,
    params: wgpu::Buffer,
    /// Per step: first parameter slot, kernels and bind groups (None where the group is per state).
    slot0: Vec<usize>,
    kernels: Vec<Vec<Arc<Kernel>>>,
    groups: Vec<Vec<Option<wgpu::BindGroup>>>,
    binds: Vec<Vec<Vec<BufRef>>>,
    lock: Mutex<GpuStats>,
    /// Held while a step records and submits (what the shared buffers hold between submissions belongs
    /// to one step at a time).
    recording: Mutex<()>,
    /// How a decode step's token ids can come from the step before it (see [`GpuPlan::begin`]).
    feed: Option<Feed>,
    /// Whether decode steps run ahead where they can ([`super::GpuOptions::run_ahead`]; off
    /// when profiling).
    ahead: bool,
    /// The plan's linear groups the kernels take, by step.
    lin_groups: HashMap<usize, GpuGroup>,
    /// Per value: byte offset into its home buffer (non-zero for the parts of a fused linear).
    offs: Vec<u64>,
    /// `queue.submit` time accumulated during the current step.
    submit_ms: Mutex<f64>,
    /// Per-kernel GPU time when profiling ([`crate::LoadOptions::profile`]): from GPU timestamps around each
    /// dispatch where the
    /// adapter has them ([`Stamps`]), else each dispatch submitted and waited for alone.
    profile: Option<Mutex<std::collections::BTreeMap<String, (u64, f64)>>>,
    stamps: Option<Stamps>,
    /// What the CPU steps read, `(step, value)` in step order: a read-back for one CPU step also
    /// fetches what later CPU steps read and the GPU already holds (the token choice after a GPU `TopK`
    /// reads both its outputs: one wait, not two).
    cpu_reads: Vec<(usize, ValId)>,
    /// Every step a kernel takes was placed on the GPU ([`GpuPlan::placed`]).
    place_all: bool,
    /// The last step placed on the GPU: a read-back after it also takes the step's cache rows and the
    /// wanted outputs, so the step needs no other submission.
    last_gpu: Option<usize>,
    /// Step descriptions by token count (see [`Kept`]): a decode step describes only what changes
    /// (the attention, the token's embedding row) instead of every step of the plan.
    kept: Mutex<HashMap<usize, Vec<Option<Kept>>>>,
}

impl std::fmt::Debug for GpuPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuPlan")
            .field("gpu", &self.ctx.info().name)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Dispatches a partial submission on GPUs (see [`GpuPlan::submit_every`]): SmolLM2's decode step
/// (154 dispatches) goes in three.
const SUBMIT_EVERY: usize = 64;

/// Token counts whose step descriptions are kept (decode and a few prefill chunk sizes).
const KEPT_SIZES: usize = 4;

impl GpuPlan {
    /// GPU time per kernel (`(kernel, dispatches, seconds)`, slowest first) when profiling.
    pub fn profile(&self) -> Vec<(String, u64, f64)> {
        let Some(p) = &self.profile else {
            return Vec::new();
        };
        let p = p.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = p.iter().map(|(k, (n, t))| (k.clone(), *n, *t)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    /// Whether step `si` was placed on the GPU.
    pub fn step_on_gpu(&self, si: usize) -> bool {
        self.on_gpu.get(si).copied().unwrap_or(false)
    }

    /// The context.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// Counters (the last step's dispatches, transfers; resident bytes).
    pub fn stats(&self) -> GpuStats {
        self.lock.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn buf_for<'a>(
        &'a self,
        si: usize,
        r: BufRef,
        state: Option<&'a GpuState>,
    ) -> Result<(&'a wgpu::Buffer, u64)> {
        if let BufRef::Val(v) = r {
            let h = self.home[v]
                .ok_or_else(|| Error::internal(format!("value {v} has no GPU buffer")))?;
            return Ok((&self.bufs[h], self.offs[v]));
        }
        Ok((
            match r {
                BufRef::Val(_) => unreachable!("handled above"),
                BufRef::Dummy => &self.dummy,
                BufRef::LinW(i) => &self.linear(si)?.parts[i].w,
                BufRef::LinS(i) => &self.linear(si)?.parts[i].s,
                BufRef::LinZ(i) => &self.linear(si)?.parts[i].z,
                BufRef::LinBias => &self.linear(si)?.bias,
                BufRef::Part => &self.part,
                BufRef::CacheK(c, seg) | BufRef::CacheV(c, seg) => {
                    let st =
                        state.ok_or_else(|| Error::internal("cache binding without a state"))?;
                    st.home
                        .get(c)
                        .and_then(|&b| st.bufs.get(b + seg))
                        .ok_or_else(|| {
                            Error::internal(format!("state has no cache {c} segment {seg}"))
                        })?
                }
            },
            0,
        ))
    }

    /// Rows a cache segment holds and the number of segments, for caches of `slots` rows of `row` bytes.
    fn segs(&self, row: usize, slots: usize, head_dim: usize) -> Result<(usize, usize)> {
        let mut rows = (self.seg_bytes / row.max(1) as u64) as usize;
        if rows == 0 {
            return Err(Error::device(
                DeviceFault::Limits,
                format!(
                    "one KV-cache row ({row} bytes) exceeds the largest cache buffer ({} bytes)",
                    self.seg_bytes
                ),
            ));
        }
        if self.rows_variant && !attention::rows_ok(head_dim, rows.min(slots)) {
            // CPU adapters attend one (head, token) an invocation, within llvmpipe's loop bound: a
            // cache longer than that is split like one beyond a buffer (its chunk rows included).
            rows = rows.min(slots);
            while rows > 1 && !attention::rows_ok(head_dim, 2 * rows) {
                rows /= 2;
            }
        }
        let rows = rows.min(slots.max(1));
        Ok((rows, slots.div_ceil(rows).max(1)))
    }

    /// Whether `v` is a constant table (rows: rank ≥ 2) a GPU `Gather` reads in place: loaded once, it
    /// must fit one binding.
    fn gather_table(&self, plan: &Plan, v: ValId) -> bool {
        plan.consts[v]
            .as_ref()
            .is_some_and(|t| t.rank() >= 2 && t.bytes().len() as u64 <= self.seg_bytes)
    }

    /// Whether step `s` gathers rows of a constant table (an embedding): such a step runs on the GPU
    /// even when its indices come from the host, so the whole step from the token ids on stays there
    /// (and the ids can be fed from the previous step's token choice on the GPU).
    fn embedding(&self, plan: &Plan, s: &Step) -> bool {
        match s {
            Step::Node { node, inputs, .. } => {
                plan.graph.nodes[*node].op == "Gather"
                    && inputs
                        .first()
                        .copied()
                        .flatten()
                        .is_some_and(|d| self.gather_table(plan, d))
            }
            _ => false,
        }
    }

    fn linear(&self, si: usize) -> Result<&GpuLinear> {
        let si = self.lin_alias.get(&si).copied().unwrap_or(si);
        self.linears
            .get(&si)
            .ok_or_else(|| Error::internal(format!("step {si} has no GPU weights")))
    }

    fn bind_group(&self, si: usize, j: usize, state: Option<&GpuState>) -> Result<wgpu::BindGroup> {
        let bufs: Vec<(&wgpu::Buffer, u64)> = self.binds[si][j]
            .iter()
            .map(|r| self.buf_for(si, *r, state))
            .collect::<Result<_>>()?;
        Ok(self.ctx.bind_at(
            &self.kernels[si][j],
            (&self.params, ((self.slot0[si] + j) * 256) as u64),
            &bufs,
        ))
    }
}

fn e_is_const(plan: &Plan, v: ValId) -> bool {
    plan.consts[v].is_some()
}
