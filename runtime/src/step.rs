//! What one step takes and gives: the sampling inputs, the output, the graph inputs built from them
//! ([`input_env`]) and the outputs read back from a step's values ([`outputs`]) — the same for every
//! backend, written once.

use std::collections::BTreeMap;

use crate::contract::{self, ModelInfo};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::tensor::Tensor;

/// Sampling controls fed to the graph's in-graph token choice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSampling {
    /// `<= 0` → greedy.
    pub temperature: f32,
    /// `<= 0` → no limit.
    pub top_k: i64,
    /// `>= 1` → no limit.
    pub top_p: f32,
    /// Uniform random number in `[0, 1)`.
    pub random_u: f32,
    /// The draw the next decode step will use, when the caller knows it (a session does: it peeks
    /// at its generator). On the GPU the next step then runs ahead of this one with that draw; without
    /// it a step runs ahead with `random_u` and is dropped if the next call brings another draw.
    pub next_random_u: Option<f32>,
}

impl StepSampling {
    /// Greedy choice.
    pub const GREEDY: StepSampling = StepSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        random_u: 0.0,
        next_random_u: None,
    };
}

/// What one step returns.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// The token the graph chose.
    pub next_token: u32,
    /// Logits of the chunk's last position (`vocab` floats).
    pub logits: Vec<f32>,
}

/// The graph inputs of one step; `held` gives the inputs the sequence state holds (a transcription
/// model's `cross.*` and `first_token`).
pub(crate) fn input_env(
    plan: &Plan,
    ids: &[u32],
    position: usize,
    sampling: &StepSampling,
    held: &BTreeMap<String, Tensor>,
) -> Result<Vec<Option<Tensor>>> {
    let t = ids.len();
    let mut env: Vec<Option<Tensor>> = vec![None; plan.names.len()];
    let ids64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    for (name, &slot) in &plan.inputs {
        env[slot] = Some(match name.as_str() {
            contract::INPUT_IDS => Tensor::i64(&[1, t], &ids64),
            contract::POSITION => Tensor::i64(&[1], &[position as i64]),
            contract::TEMPERATURE => Tensor::f32(&[1], &[sampling.temperature]),
            contract::TOP_K => Tensor::i64(&[1], &[sampling.top_k]),
            contract::TOP_P => Tensor::f32(&[1], &[sampling.top_p]),
            contract::RANDOM_U => Tensor::f32(&[1], &[sampling.random_u.clamp(0.0, 0.999_999)]),
            other => match held.get(other) {
                Some(t) => t.clone(),
                None if contract::encoded_for(other).is_some() => {
                    return Err(Error::InvalidArgument(format!(
                        "input `{other}` has no value yet: encode a window of audio first"
                    )))
                }
                None => return Err(Error::Contract(format!("unknown graph input `{other}`"))),
            },
        });
    }
    Ok(env)
}

/// Output `name` among a step's values (or a constant of the plan).
pub(crate) fn value(plan: &Plan, env: &[Option<Tensor>], name: &str) -> Result<Tensor> {
    let slot = plan.outputs[name];
    env[slot]
        .clone()
        .or_else(|| plan.consts[slot].clone())
        .ok_or_else(|| Error::Contract(format!("output `{name}` was not computed")))
}

/// The step's result from its values: the chosen token (checked to be in the vocabulary) and, when
/// `want_logits`, the logits.
pub(crate) fn outputs(
    plan: &Plan,
    info: &ModelInfo,
    env: &[Option<Tensor>],
    want_logits: bool,
) -> Result<StepOutput> {
    let next = value(plan, env, contract::NEXT_TOKEN)?.scalar_i64(contract::NEXT_TOKEN)?;
    if next < 0 || next as usize >= info.vocab_size {
        return Err(Error::tensor(
            contract::NEXT_TOKEN,
            format!("graph chose token {next}, outside the vocabulary"),
        ));
    }
    let logits = if want_logits {
        value(plan, env, contract::LOGITS)?.to_f32_vec(contract::LOGITS)?
    } else {
        Vec::new()
    };
    Ok(StepOutput {
        next_token: next as u32,
        logits,
    })
}
