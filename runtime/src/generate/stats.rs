//! Timing and throughput of one generation.

use serde::Serialize;

/// What one generation cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GenerateStats {
    /// Milliseconds the model took to load ([`crate::Model::load_ms`]).
    pub load_ms: f64,
    /// Prompt tokens already in the cache from an earlier turn (not computed again).
    pub reused_tokens: usize,
    /// Prompt tokens computed in this generation.
    pub prefill_tokens: usize,
    /// Prefill steps (chunks).
    pub prefill_chunks: usize,
    /// Milliseconds spent in prefill steps.
    pub prefill_ms: f64,
    /// Prefill tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Milliseconds from the call until the first generated token was known (includes tokenizing,
    /// template rendering and prefill).
    pub time_to_first_token_ms: f64,
    /// Tokens fed back one at a time (decode steps).
    pub decode_tokens: usize,
    /// Milliseconds spent in the decode loop (steps, detokenizing, stop checks, callbacks).
    pub decode_ms: f64,
    /// Decode tokens per second.
    pub decode_tokens_per_s: f64,
    /// Tokens generated (including the first one, which prefill produced; excluding a stop token).
    pub generated_tokens: usize,
}

/// `n` per `ms` milliseconds, as per second (0 when nothing was timed).
pub(crate) fn per_second(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1000.0 / ms
    } else {
        0.0
    }
}
