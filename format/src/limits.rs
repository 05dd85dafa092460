//! [`Limits`]: what a model file may make a reader do (file size, tensor and node counts, metadata
//! length, tensor elements, KV-cache bytes), each checked before the resource it bounds is used.

use crate::error::{Error, Result};

/// Resource limits enforced while loading a model (and when a sequence state is allocated).
///
/// The defaults admit any model this project targets on a phone or desktop (SmolLM2-135M uses well under
/// 1% of each) and refuse files that could only be hostile. Every limit is checked before the resource
/// it bounds is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest model file, in bytes (default 32 GiB).
    pub max_file_bytes: u64,
    /// Most initializers (weight tensors) a graph may hold (default 100 000).
    pub max_tensors: usize,
    /// Most nodes a graph may hold (default 1 000 000).
    pub max_nodes: usize,
    /// Longest metadata value, in bytes (default 64 MiB; `tokenizer.json` of a 256k vocabulary is ~20 MB).
    pub max_metadata_bytes: usize,
    /// Most elements one tensor may declare (default 2^40).
    pub max_tensor_elements: u64,
    /// Largest KV cache of one sequence, in bytes, summed over layers (default 16 GiB; SmolLM2-135M with
    /// 2048 f16 slots needs 90 MiB).
    pub max_cache_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 32 << 30,
            max_tensors: 100_000,
            max_nodes: 1_000_000,
            max_metadata_bytes: 64 << 20,
            max_tensor_elements: 1 << 40,
            max_cache_bytes: 16 << 30,
        }
    }
}

/// Fails with [`Error::Limit`] when `value > max`.
pub fn limit(what: &str, value: u64, max: u64) -> Result<()> {
    if value > max {
        return Err(Error::Limit {
            what: what.to_string(),
            value,
            max,
        });
    }
    Ok(())
}
