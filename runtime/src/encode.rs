//! The encoder phase of a transcription model ([`crate::phases`]): one window of 16 kHz samples →
//! per decoder layer the cross-attention keys and values, which the sequence state then holds as
//! the decoder steps' `cross.*` inputs (never recomputed per token). Planned once at load, run on
//! the CPU with the load's precision; under `fast` its 8-bit block linears (a `--quantize q8`
//! export's) are repacked at load for the integer kernels as the decoder's are (`repack.rs`). When
//! the decoder runs on a GPU, the phase is placed there too ([`Encoder::place_on_gpu`]).

use std::sync::Arc;

use crate::backend::cpu::exec::{run_once, CpuRun, OpProfile};
use crate::backend::cpu::linear::Precision;
use crate::backend::cpu::linear_q8::{self, QIsa};
use crate::backend::cpu::repack::PackedSet;
use crate::contract::{self, Speech};
use crate::error::{Error, Result};
use crate::graph::{DType, Dim, Graph};
use crate::plan::{Plan, ValId};
use crate::tensor::Tensor;

/// The encoder graph planned, with the slots it reads and writes.
struct Phase {
    plan: Plan,
    /// Slots of `audio` and `audio_samples`.
    audio: ValId,
    samples: ValId,
    /// Per decoder-step input it feeds (`cross.0.key`), the output's slot.
    feeds: Vec<(String, ValId)>,
}

impl Phase {
    /// Plans `graph` with `options` and finds its slots: one output for each of `step_inputs`'
    /// `cross.*`.
    fn new(graph: Graph, step_inputs: &[&str], options: crate::plan::PlanOptions) -> Result<Phase> {
        let plan = Plan::with_options(graph, options)?;
        let slot = |name: &str| {
            plan.inputs.get(name).copied().ok_or_else(|| {
                Error::Contract(format!("the encoder phase does not read input `{name}`"))
            })
        };
        let (audio, samples) = (slot(contract::AUDIO)?, slot(contract::AUDIO_SAMPLES)?);
        let mut feeds = Vec::new();
        for input in step_inputs {
            let Some(out) = contract::encoded_for(input) else {
                continue;
            };
            let v = plan.outputs.get(&out).copied().ok_or_else(|| {
                Error::Contract(format!(
                    "decoder input `{input}` has no encoder output `{out}` to come from"
                ))
            })?;
            feeds.push((input.to_string(), v));
        }
        Ok(Phase {
            plan,
            audio,
            samples,
            feeds,
        })
    }

    /// The inputs: the window's samples (`audio`, a whole window) of which the first `n` are audio.
    fn inputs(&self, audio: &[f32], n: usize) -> Vec<Option<Tensor>> {
        let mut env: Vec<Option<Tensor>> = vec![None; self.plan.names.len()];
        env[self.audio] = Some(Tensor::f32(&[1, audio.len()], audio));
        env[self.samples] = Some(Tensor::i64(&[1], &[n as i64]));
        env
    }

    /// The `cross.*` inputs from the computed `env`.
    fn outputs(&self, mut env: Vec<Option<Tensor>>) -> Result<Vec<(String, Tensor)>> {
        self.feeds
            .iter()
            .map(|(name, v)| {
                let t = env[*v]
                    .take()
                    .or_else(|| self.plan.consts[*v].clone())
                    .ok_or_else(|| {
                        Error::Contract(format!("`{name}`'s source was not computed"))
                    })?;
                Ok((name.clone(), t))
            })
            .collect()
    }
}

/// The encoder phase placed on the decoder's GPU (`--device gpu`): planned for that GPU's kernels,
/// run through the same executor as a step; what no kernel takes (the log-mel front end's
/// convolutions among them) runs on the CPU at exact precision.
#[cfg(feature = "gpu")]
struct OnGpu {
    phase: Phase,
    exec: crate::backend::gpu::exec::GpuPlan,
    state: crate::backend::gpu::exec::GpuState,
    /// One window at a time: the executor's buffers are the phase's, not a sequence's.
    lock: std::sync::Mutex<()>,
}

/// A planned encoder phase.
pub(crate) struct Encoder {
    cpu: Phase,
    /// The phase on the GPU, when the decoder runs there.
    #[cfg(feature = "gpu")]
    gpu: Option<OnGpu>,
    /// The window's length in samples.
    window: usize,
    precision: Precision,
    /// The integer kernels' instruction set (`None`: this CPU's best).
    qisa: Option<QIsa>,
    /// The linear layers repacked for the integer kernels (under `Fast`, where they read them).
    packed: Arc<PackedSet>,
    /// Time per op kind when profiling.
    profile: Option<OpProfile>,
}

impl Encoder {
    /// Checks and plans the encoder graph: inputs `audio` f32 `[1, window]` and `audio_samples`,
    /// outputs `encoded.*`, one for each of `step_inputs`' `cross.*`.
    pub(crate) fn new(
        graph: Graph,
        speech: &Speech,
        step_inputs: &[&str],
        options: &crate::LoadOptions,
    ) -> Result<Encoder> {
        crate::load::check_nodes(&graph)?;
        let audio = graph.inputs.iter().find(|v| v.name == contract::AUDIO);
        let want = [Dim::Known(1), Dim::Known(speech.window_samples)];
        if !audio.is_some_and(|a| a.dtype == DType::F32 && a.shape == want) {
            return Err(Error::Contract(format!(
                "the encoder phase needs input `{}` f32 [1, {}] (the window of the speech metadata)",
                contract::AUDIO,
                speech.window_samples
            )));
        }
        for v in &graph.inputs {
            if v.name != contract::AUDIO && v.name != contract::AUDIO_SAMPLES {
                return Err(Error::Contract(format!(
                    "the encoder phase reads input `{}`: it takes only `{}` and `{}`",
                    v.name,
                    contract::AUDIO,
                    contract::AUDIO_SAMPLES
                )));
            }
        }
        let cpu = Phase::new(graph, step_inputs, options.plan_options())?;
        let qisa = options.fast_isa()?;
        let packed = match options.precision {
            Precision::Fast => PackedSet::for_plan(&cpu.plan, qisa.unwrap_or_else(linear_q8::best)),
            Precision::Exact => PackedSet::default(),
        };
        Ok(Encoder {
            cpu,
            #[cfg(feature = "gpu")]
            gpu: None,
            window: speech.window_samples,
            precision: options.precision,
            qisa,
            packed: Arc::new(packed),
            profile: options.profile.then(Default::default),
        })
    }

    /// Time per op kind of the windows encoded so far (empty unless profiling): `(op, calls,
    /// seconds)`, slowest first.
    pub(crate) fn profile(&self) -> Vec<(String, u64, f64)> {
        self.profile
            .as_ref()
            .map(OpProfile::rows)
            .unwrap_or_default()
    }

    /// Encodes one window (`samples` at most a window long; zeros after them) into the decoder
    /// steps' `cross.*` inputs.
    pub(crate) fn run(&self, samples: &[f32]) -> Result<Vec<(String, Tensor)>> {
        if samples.len() > self.window {
            return Err(Error::InvalidArgument(format!(
                "{} samples exceed the window of {}",
                samples.len(),
                self.window
            )));
        }
        if let Some(i) = samples.iter().position(|x| !x.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "sample {i} is {} (audio must be finite)",
                samples[i]
            )));
        }
        let mut audio = vec![0f32; self.window];
        audio[..samples.len()].copy_from_slice(samples);
        #[cfg(feature = "gpu")]
        if let Some(g) = &self.gpu {
            return g.run(&audio, samples.len());
        }
        let env = self.cpu.inputs(&audio, samples.len());
        let run = CpuRun::new(self.precision, None)
            .with_packed(Arc::clone(&self.packed))
            .on(self.qisa);
        let env = run_once(&self.cpu.plan, env, run, self.profile.as_ref())?;
        self.cpu.outputs(env)
    }

    /// Places the phase (`graph`, as [`Encoder::new`] took it) on `ctx`, the GPU the decoder runs on:
    /// windows are encoded there from now on. Placement runs the phase once over a silent window.
    #[cfg(feature = "gpu")]
    pub(crate) fn place_on_gpu(
        &mut self,
        graph: Graph,
        step_inputs: &[&str],
        options: &crate::LoadOptions,
        ctx: Arc<crate::backend::gpu::GpuContext>,
    ) -> Result<()> {
        use crate::backend::gpu::{exec::GpuPlan, plan_options_for};
        let phase = Phase::new(
            graph,
            step_inputs,
            plan_options_for(options.plan_options(), &ctx),
        )?;
        let env = phase.inputs(&vec![0f32; self.window], self.window);
        let given: Vec<(ValId, Tensor)> = env
            .iter()
            .enumerate()
            .filter_map(|(v, t)| t.clone().map(|t| (v, t)))
            .collect();
        let mut run = CpuRun::new(Precision::Exact, None);
        let mut cpu_step = |s: &crate::plan::Step, env: &mut [Option<Tensor>]| {
            crate::backend::cpu::exec::exec_step(&phase.plan, s, env, None, &mut run)
        };
        let exec = GpuPlan::placed(ctx, &phase.plan, &mut cpu_step, &given, None, false)?;
        let state = exec.new_state(&phase.plan, &[], crate::kv::GpuCacheBudget::All, 1)?;
        self.gpu = Some(OnGpu {
            phase,
            exec,
            state,
            lock: Default::default(),
        });
        // The CPU's repacked copy of the weights is not read from now on.
        self.packed = Arc::default();
        Ok(())
    }

    /// Whether windows are encoded on the GPU ([`Encoder::place_on_gpu`]).
    pub(crate) fn on_gpu(&self) -> bool {
        #[cfg(feature = "gpu")]
        if self.gpu.is_some() {
            return true;
        }
        false
    }

    /// What the planner made of the encoder (for the GPU, where it runs there).
    pub(crate) fn plan_stats(&self) -> &crate::PlanStats {
        #[cfg(feature = "gpu")]
        if let Some(g) = &self.gpu {
            return &g.phase.plan.stats;
        }
        &self.cpu.plan.stats
    }
}

#[cfg(feature = "gpu")]
impl OnGpu {
    /// One window (`audio`, a whole window, of which `n` samples are audio) through the executor.
    fn run(&self, audio: &[f32], n: usize) -> Result<Vec<(String, Tensor)>> {
        let (plan, exec) = (&self.phase.plan, &self.exec);
        let env = self.phase.inputs(audio, n);
        let want: Vec<ValId> = self.phase.feeds.iter().map(|f| f.1).collect();
        let mut run = CpuRun::new(Precision::Exact, None);
        let mut cpu_step = |s: &crate::plan::Step, env: &mut [Option<Tensor>]| {
            crate::backend::cpu::exec::exec_step(plan, s, env, None, &mut run)
        };
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut host = crate::kv::PagedCache::new(&[], 1)?;
        let f = exec.begin(
            plan,
            &self.state,
            &host,
            env,
            0,
            1,
            &want,
            &mut cpu_step,
            None,
        )?;
        let (env, _) = exec.finish(plan, &self.state, &mut host, f, &mut cpu_step)?;
        self.phase.outputs(env)
    }
}
