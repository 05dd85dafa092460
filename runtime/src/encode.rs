//! The encoder phase of a transcription model ([`crate::phases`]): one window of 16 kHz samples →
//! per decoder layer the cross-attention keys and values, which the sequence state then holds as
//! the decoder steps' `cross.*` inputs (never recomputed per token). Planned once at load, run on
//! the CPU with the load's precision; under `fast` its 8-bit block linears (a `--quantize q8`
//! export's) are repacked at load for the integer kernels as the decoder's are (`repack.rs`).

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

/// A planned encoder phase.
pub(crate) struct Encoder {
    plan: Plan,
    /// The window's length in samples.
    window: usize,
    /// Slots of `audio` and `audio_samples`.
    audio: ValId,
    samples: ValId,
    /// Per decoder-step input it feeds (`cross.0.key`), the output's slot.
    feeds: Vec<(String, ValId)>,
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
        let plan = Plan::with_options(graph, options.plan_options())?;
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
        let qisa = options.fast_isa()?;
        let packed = match options.precision {
            Precision::Fast => PackedSet::for_plan(&plan, qisa.unwrap_or_else(linear_q8::best)),
            Precision::Exact => PackedSet::default(),
        };
        Ok(Encoder {
            plan,
            window: speech.window_samples,
            audio,
            samples,
            feeds,
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
        let mut env: Vec<Option<Tensor>> = vec![None; self.plan.names.len()];
        env[self.audio] = Some(Tensor::f32(&[1, self.window], &audio));
        env[self.samples] = Some(Tensor::i64(&[1], &[samples.len() as i64]));
        let run = CpuRun::new(self.precision, None)
            .with_packed(Arc::clone(&self.packed))
            .on(self.qisa);
        let mut env = run_once(&self.plan, env, run, self.profile.as_ref())?;
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

    /// What the planner made of the encoder.
    pub(crate) fn plan_stats(&self) -> &crate::PlanStats {
        &self.plan.stats
    }
}
