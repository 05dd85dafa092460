//! A loaded, planned model and the per-sequence state that a generate loop advances.
//!
//! `Model` is immutable after load and shared (`Arc<Model>`) by any number of sessions on any threads;
//! weights live once, in the memory-mapped file. `StepState` owns one sequence's KV cache and scratch.

use std::path::Path;
use std::sync::Arc;

use crate::contract::ModelInfo;
use crate::error::Result;

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
}

impl StepSampling {
    /// Greedy choice.
    pub const GREEDY: StepSampling = StepSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        random_u: 0.0,
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

/// A loaded and planned step graph.
pub struct Model {
    pub(crate) info: ModelInfo,
    pub(crate) tokenizer_json: String,
    pub(crate) chat_template: Option<String>,
    pub(crate) load_ms: f64,
}

/// One sequence's state: its KV cache (CPU-resident) and planned scratch buffers.
pub struct StepState {
    /// Number of cache slots written so far (the next position).
    pub(crate) len: usize,
}

impl Model {
    /// Memory-maps, decodes, checks and plans the model at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Arc<Model>> {
        let _ = path;
        todo!("engine: load")
    }
    /// Loads from bytes already in memory (Android assets, iOS bundles).
    pub fn load_from_bytes(bytes: bytes::Bytes, name: &str) -> Result<Arc<Model>> {
        let _ = (bytes, name);
        todo!("engine: load_from_bytes")
    }
    /// The model description from the file's metadata.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
    /// The `tokenizer.json` carried in the file.
    pub fn tokenizer_json(&self) -> &str {
        &self.tokenizer_json
    }
    /// The chat template carried in the file, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
    /// Milliseconds spent in [`Model::load`].
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }
    /// A fresh sequence state with an empty cache.
    pub fn new_state(&self) -> Result<StepState> {
        todo!("engine: new_state")
    }
    /// Runs one step: `ids` (1..=max_chunk tokens) at `position` (must equal `state.len()`; the chunk must
    /// fit in the cache). Writes the chunk's K/V rows into the state's cache and advances it.
    pub fn step(
        &self,
        state: &mut StepState,
        ids: &[u32],
        sampling: &StepSampling,
    ) -> Result<StepOutput> {
        let _ = (state, ids, sampling);
        todo!("engine: step")
    }
}

impl StepState {
    /// Tokens in the cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Forgets the sequence (keeps the allocations).
    pub fn reset(&mut self) {
        self.len = 0;
    }
    /// Drops the cache rows from `len` on, so the sequence continues from there.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}
