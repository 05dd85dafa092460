//! Compute backends, behind one interface (the crate-private `Backend` trait) the model facade
//! drives: `cpu` (the step executor and the CPU kernels, one file per kernel family) and, with the `gpu`
//! feature, `gpu` (wgpu).
//! A backend is chosen when the model is loaded (`--device auto` measures which is faster: `auto.rs`); a
//! sequence's device-side state is its `SeqState`.
#[cfg(feature = "gpu")]
pub(crate) mod auto;
pub mod cpu;
#[cfg(feature = "gpu")]
pub mod gpu;
pub(crate) mod mask;

use crate::error::Result;
use crate::graph::DType;
use crate::kv::{KvOptions, KvStats, PagedCache};
use crate::plan::{Plan, ValId};
use crate::step::StepSampling;
use crate::tensor::Tensor;

/// One step as the facade hands it to a backend, checked (the chunk fits the cache, the ids are in the
/// vocabulary, the sequence belongs to the model).
#[cfg_attr(not(feature = "gpu"), allow(dead_code))] // `want`, `max_cache`: the GPU's (read-back, run-ahead)
pub(crate) struct StepCall<'a> {
    /// The plan.
    pub plan: &'a Plan,
    /// The chunk's token ids.
    pub ids: &'a [u32],
    /// Where the chunk starts (the sequence's length).
    pub position: usize,
    /// The token choice's inputs.
    pub sampling: &'a StepSampling,
    /// The outputs the caller reads (`next_token`, and `logits` when wanted).
    pub want: &'a [ValId],
    /// Cache slots: a step runs ahead only where the next position still fits.
    pub max_cache: usize,
    /// The inputs the sequence state holds (a transcription model's `cross.*`, `first_token`).
    pub held: &'a std::collections::BTreeMap<String, Tensor>,
}

/// A sequence's state on its backend, beside the host KV pages the facade keeps.
pub(crate) enum SeqState {
    /// The CPU keeps nothing else.
    Host,
    /// The GPU's cache buffers and the step run ahead.
    #[cfg(feature = "gpu")]
    Gpu(Box<gpu::backend::GpuSeq>),
}

impl SeqState {
    /// The sequence now ends at `len` (`shorter`: rows were dropped, not only kept).
    #[cfg_attr(not(feature = "gpu"), allow(unused_variables))]
    pub(crate) fn truncate(&mut self, len: usize, shorter: bool) {
        match self {
            SeqState::Host => {}
            #[cfg(feature = "gpu")]
            SeqState::Gpu(g) => g.truncate(len, shorter),
        }
    }
}

/// What the model facade asks of a backend.
pub(crate) trait Backend: Send + Sync {
    /// A new sequence's device-side state; `shapes` are the plan's caches (dtype, `[1, KVH, S, D]`).
    fn new_seq(
        &self,
        plan: &Plan,
        shapes: &[(DType, Vec<usize>)],
        kv: &KvOptions,
        max_chunk: usize,
    ) -> Result<SeqState>;
    /// Runs one step: the chunk's new K/V rows go into `host` at the call's position; returns the step's
    /// values, among them the call's `want` outputs.
    fn step(
        &self,
        call: &StepCall<'_>,
        seq: &mut SeqState,
        host: &mut PagedCache,
    ) -> Result<Vec<Option<Tensor>>>;
    /// Transfer and residency counters of `seq`'s device-side cache.
    fn kv_stats(&self, seq: &SeqState) -> KvStats;
    /// Time per op kind (CPU) or kernel (GPU) since load, slowest first, when profiling.
    fn profile(&self) -> Vec<(String, u64, f64)>;
    /// Where the model runs: `cpu`, or the adapter and its API.
    fn device(&self) -> String;
    /// Bytes of the plan's linear weights its kernels do not read, because it holds them in a more
    /// compact form (the CPU's packed weights).
    fn weight_bytes_saved(&self) -> u64 {
        0
    }
    /// The GPU executor, on the GPU backend.
    #[cfg(feature = "gpu")]
    fn gpu(&self) -> Option<&gpu::exec::GpuPlan> {
        None
    }
}

/// The adapter [`plan_options`] picked, for the backend choice to open rather than pick again.
#[derive(Debug, Default)]
pub(crate) struct Probe {
    /// The GPU adapter, when one was asked for (`gpu`, `auto`) and found.
    #[cfg(feature = "gpu")]
    pub(crate) adapter: Option<gpu::context::Probed>,
    /// The plan was bounded by that adapter's kernels and `auto` may still choose the CPU, which then
    /// runs a plan made again for it.
    #[cfg(feature = "gpu")]
    pub(crate) replan_for_cpu: bool,
}

impl Probe {
    /// Whether a CPU that `auto` chooses must plan again ([`Probe::replan_for_cpu`]).
    pub(crate) fn replan_for_cpu(&self) -> bool {
        #[cfg(feature = "gpu")]
        {
            self.replan_for_cpu
        }
        #[cfg(not(feature = "gpu"))]
        {
            false
        }
    }
}

/// The fusions the planner makes for a load with `opts`: those the options leave on, within what the
/// backend it may run on takes. The CPU runs every fused form; for a GPU (or `auto`), the adapter's
/// kernels bound them (the adapter picked without opening a device, and returned for the backend
/// choice; no adapter: the CPU's bounds). `auto` with a software adapter it will not try
/// ([`auto::choose`]) plans for the CPU; a CPU that `auto` chooses after trying the GPU re-plans
/// ([`Probe::replan_for_cpu`]).
pub(crate) fn plan_options(opts: &crate::LoadOptions) -> (crate::plan::PlanOptions, Probe) {
    let o = opts.plan_options();
    #[cfg(feature = "gpu")]
    if opts.device != gpu::DeviceRequest::Cpu {
        if let Ok(p) = gpu::context::Probed::new(&opts.device, opts.backend) {
            let cpu_sure = opts.device == gpu::DeviceRequest::Auto
                && p.id.is_software()
                && !opts.gpu.trial_software;
            if cpu_sure {
                return (
                    o,
                    Probe {
                        adapter: Some(p),
                        replan_for_cpu: false,
                    },
                );
            }
            let g = gpu::plan_options(o, &p, &opts.gpu);
            return (
                g,
                Probe {
                    adapter: Some(p),
                    replan_for_cpu: opts.device == gpu::DeviceRequest::Auto,
                },
            );
        }
    }
    (o, Probe::default())
}

/// Per plan cache: whether a step other than the fused cache attention reads the cache input (an
/// attention the planner could not fuse, e.g. one with a soft cap). Such a step gets the cache
/// materialized in the graph's layout from the host pages ([`materialize_caches`]).
pub(crate) fn caches_read_elsewhere(plan: &Plan) -> Vec<bool> {
    plan.caches
        .iter()
        .map(|c| {
            plan.steps.iter().any(|s| {
                !matches!(s, crate::plan::Step::CacheAttention { .. })
                    && crate::plan::step_reads(s).contains(&c.input_val)
            })
        })
        .collect()
}

/// Puts each cache that `elsewhere` marks into `env` as the graph's `[1, KVH, S, D]` input, its rows
/// before `position` from the host pages.
pub(crate) fn materialize_caches(
    plan: &Plan,
    host: &PagedCache,
    position: usize,
    elsewhere: &[bool],
    env: &mut [Option<Tensor>],
) {
    for ((c, cache), &e) in plan.caches.iter().zip(&host.caches).zip(elsewhere) {
        if e {
            env[c.input_val] = Some(cache.to_head_major(position));
        }
    }
}

/// Test helpers every backend's tests (and the planner's) share.
#[cfg(test)]
pub(crate) mod testutil {
    /// Deterministic noise in [-1, 1) (never all zeros).
    pub fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }
}
