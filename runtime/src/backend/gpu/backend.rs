//! The GPU backend ([`GpuBackend`]): binds a plan to a device at load ([`bind`]) and runs its steps
//! through the executor ([`GpuPlan`]), one decode step run ahead of the caller where the plan allows it
//! (docs/GPU.md, "Decode steps run ahead"). Steps the GPU does not take run on the CPU executor.

use super::context::Probed;
use super::exec::{Flight, GpuPlan, GpuState};
use super::GpuContext;
use crate::backend::cpu::exec::{exec_step, logits_linear, CpuRun};
use crate::backend::cpu::linear::Precision;
use crate::backend::{caches_read_elsewhere, materialize_caches, Backend, SeqState, StepCall};
use crate::contract::{self, ModelInfo};
use crate::error::{Error, Result};
use crate::graph::DType;
use crate::kv::{KvOptions, KvStats, PagedCache};
use crate::load::LoadOptions;
use crate::plan::{Plan, Step, ValId};
use crate::step::{input_env, StepSampling};
use crate::tensor::Tensor;

/// A sequence on the GPU: its cache buffers, and the next decode step when one was run ahead, with the
/// token it was fed (the one the GPU chose for the step before).
pub(crate) struct GpuSeq {
    state: GpuState,
    ahead: Option<(Flight, i64)>,
}

impl GpuSeq {
    /// The sequence ends at `len`; `shorter`: rows were dropped, so a step run ahead is stale.
    pub(crate) fn truncate(&mut self, len: usize, shorter: bool) {
        if shorter {
            self.ahead = None;
        }
        self.state.truncate(len);
    }
}

/// The GPU backend: the executor bound to the plan, and how its CPU steps multiply.
pub(crate) struct GpuBackend {
    exec: GpuPlan,
    precision: Precision,
    logits_linear: Option<ValId>,
    /// Per plan cache: read by a step on the host besides the fused attention (see
    /// [`caches_read_elsewhere`]); such plans never run a step ahead, whose cache rows would not be
    /// on the host yet.
    cache_read_elsewhere: Vec<bool>,
}

impl GpuBackend {
    fn cpu_run(&self) -> CpuRun {
        CpuRun::new(self.precision, self.logits_linear)
    }
}

/// Binds `plan` to the GPU `opts.device` names (for `auto`, the high-performance adapter; `probed`:
/// already picked): opens the device, places and uploads the weights, compiles the kernels. Every failure is returned; `auto`'s
/// fallback to the CPU is [`crate::backend::auto`]'s.
pub(crate) fn bind(
    plan: &Plan,
    info: &ModelInfo,
    opts: &LoadOptions,
    probed: Option<&Probed>,
) -> Result<GpuBackend> {
    let ctx = GpuContext::on_probed(
        probed,
        &opts.device,
        opts.backend,
        opts.gpu.clone(),
        opts.profile,
    )?;
    // Dry-run inputs: the largest chunk at position 0, greedy (a transcription model's held inputs:
    // zeros of their declared shapes).
    let ids = vec![0u32; info.max_chunk.clamp(1, info.max_cache.max(1))];
    let mut env = input_env(
        plan,
        &ids,
        0,
        &StepSampling::GREEDY,
        &held_placeholders(plan)?,
    )?;
    // (caches a host step reads: empty ones, as at position 0)
    for (c, &e) in plan.caches.iter().zip(&caches_read_elsewhere(plan)) {
        if e {
            env[c.input_val] = Some(Tensor::zeros(c.dtype, &c.shape));
        }
    }
    let inputs: Vec<(ValId, Tensor)> = env
        .into_iter()
        .enumerate()
        .filter_map(|(i, t)| t.map(|t| (i, t)))
        .collect();
    let logits = logits_linear(plan);
    let mut run = CpuRun::new(opts.precision, logits);
    let exec = GpuPlan::new(
        ctx,
        plan,
        &mut |s, env| exec_step(plan, s, env, None, &mut run),
        &inputs,
        opts.kv.gpu_segment_bytes,
    )?;
    Ok(GpuBackend {
        exec,
        precision: opts.precision,
        logits_linear: logits,
        cache_read_elsewhere: caches_read_elsewhere(plan),
    })
}

impl Backend for GpuBackend {
    fn new_seq(
        &self,
        plan: &Plan,
        shapes: &[(DType, Vec<usize>)],
        kv: &KvOptions,
        max_chunk: usize,
    ) -> Result<SeqState> {
        let state = self
            .exec
            .new_state(plan, shapes, kv.gpu_budget, max_chunk)?;
        Ok(SeqState::Gpu(Box::new(GpuSeq { state, ahead: None })))
    }

    fn step(
        &self,
        call: &StepCall<'_>,
        seq: &mut SeqState,
        host: &mut PagedCache,
    ) -> Result<Vec<Option<Tensor>>> {
        let SeqState::Gpu(seq) = seq else {
            return Err(Error::InvalidArgument(
                "this state belongs to another model".into(),
            ));
        };
        let g = &self.exec;
        let (plan, position, t, sampling) =
            (call.plan, call.position, call.ids.len(), call.sampling);
        let mut env = input_env(plan, call.ids, position, sampling, call.held)?;
        let elsewhere = &self.cache_read_elsewhere;
        materialize_caches(plan, host, position, elsewhere, &mut env);
        let mut run = self.cpu_run();
        let mut cpu_step =
            |s: &Step, env: &mut [Option<Tensor>]| exec_step(plan, s, env, None, &mut run);
        // The step run ahead by the last call, if the caller fed the token it guessed and the same
        // inputs; otherwise it is dropped and this step begins now.
        let ahead = seq.ahead.take().and_then(|(mut f, fed)| {
            let holds = t == 1
                && fed == i64::from(call.ids[0])
                && g.holds_for(&mut f, &env, position, call.want);
            if !holds {
                g.missed_ahead();
            }
            holds.then_some(f)
        });
        let flight = match ahead {
            Some(f) => f,
            None => g.begin(
                plan,
                &seq.state,
                host,
                env,
                position,
                t,
                call.want,
                &mut cpu_step,
                None,
            )?,
        };
        // The next decode step goes to the GPU before this one is read back, so the GPU is not idle
        // while the host finishes this one and the caller handles its token. It assumes the token is
        // the one the GPU chose (or, with the choice's tail on the host, the first of its TopK) and the
        // inputs stay as they are, the draw being `next_random_u` when given.
        let fits = position + t < call.max_cache;
        let next = if g.can_run_ahead(&seq.state, &flight) && fits && !elsewhere.contains(&true) {
            let next = StepSampling {
                random_u: sampling.next_random_u.unwrap_or(sampling.random_u),
                next_random_u: None,
                ..*sampling
            };
            let guess = input_env(plan, &[0], position + t, &next, call.held)?;
            g.begin(
                plan,
                &seq.state,
                host,
                guess,
                position + t,
                1,
                call.want,
                &mut cpu_step,
                Some(&flight),
            )
            .ok()
        } else {
            None
        };
        let (env, fed) = g.finish(plan, &seq.state, host, flight, &mut cpu_step)?;
        // A cache attended on the host: its new rows went through the host too.
        for ((c, cache), &e) in plan
            .caches
            .iter()
            .zip(host.caches.iter_mut())
            .zip(elsewhere)
        {
            if e {
                cache.write_head_major(position, &crate::step::value(plan, &env, &c.output)?)?;
            }
        }
        // (A step whose choice ran on the host fed nothing: no step runs ahead of it.)
        seq.ahead = next.zip(fed);
        Ok(env)
    }

    fn kv_stats(&self, seq: &SeqState) -> KvStats {
        match seq {
            SeqState::Gpu(g) => g.state.kv_stats(),
            SeqState::Host => KvStats::default(),
        }
    }

    fn profile(&self) -> Vec<(String, u64, f64)> {
        self.exec.profile()
    }

    fn device(&self) -> String {
        let i = self.exec.context().info();
        format!("{} ({})", i.name, i.backend)
    }

    fn gpu(&self) -> Option<&GpuPlan> {
        Some(&self.exec)
    }
}

/// Zeros for the inputs a transcription model's sequence holds (`cross.*`, `first_token`), of their
/// declared dtypes and shapes, for the dry run; none for a text model.
fn held_placeholders(plan: &Plan) -> Result<std::collections::BTreeMap<String, Tensor>> {
    let mut held = std::collections::BTreeMap::new();
    for vi in &plan.graph.inputs {
        let name = vi.name.as_str();
        if name != contract::FIRST_TOKEN && contract::encoded_for(name).is_none() {
            continue;
        }
        let shape: Option<Vec<usize>> = vi
            .shape
            .iter()
            .map(|d| match d {
                crate::graph::Dim::Known(n) => Some(*n),
                _ => None,
            })
            .collect();
        let shape = shape.ok_or_else(|| {
            Error::Contract(format!(
                "input `{name}`: its shape must be fixed ({:?})",
                vi.shape
            ))
        })?;
        held.insert(vi.name.clone(), Tensor::zeros(vi.dtype, &shape));
    }
    Ok(held)
}
