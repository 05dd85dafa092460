//! The GPU backend's typed settings: which kernel variant runs, which pattern fusions apply, how decode
//! attention splits, how often a step is submitted, whether decode steps run ahead, where the tiled GEMM
//! starts, where compiled pipelines (and `auto`'s device decisions) are kept between runs, and whether
//! `auto` tries a software adapter.
//!
//! They are fields of [`LoadOptions::gpu`](crate::LoadOptions::gpu), chosen at load and fixed for the
//! model's life: the library reads no environment variable. The defaults are what ran fastest on the
//! adapters measured (README's GPU section); the other values exist to compare and bisect (`onestep bench
//! --set gpu_no_fuse=all`) and to let the tests drive every kernel form in one process. The text form
//! (`key=value`, parsed by [`LoadOptions::set`](crate::LoadOptions::set)) is what the CLI's `--set`, the C ABI's `settings` string and the
//! Kotlin and Swift `settings` take.

use std::path::PathBuf;

use super::Variant;
use crate::error::{Error, Result};

/// Pattern fusions; each on by default. Turning one off runs the steps it would have fused as their
/// own steps (same results within the kernels' tolerance). All but `attn` are the planner's, so off is
/// off for the CPU too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuFusions {
    /// Linear layers reading one value run as one dispatch (q/k/v; gate/up with the SiLU), the norm
    /// before them folded in on GPUs (`group`): the planner's fusion (`plan/group.rs`), within what the
    /// adapter's kernels take, off for both backends.
    pub linear_groups: bool,
    /// Attention reads the q/k/v projections and applies the rotary itself (`attn`).
    pub attention_inputs: bool,
    /// A residual `Add` after a linear layer runs in the linear's epilogue (`res`): the planner's
    /// fusion, so off it is off for both backends (`LoadOptions::plan_options`).
    pub residual: bool,
    /// A `Transpose` feeding `RotaryEmbedding` is read through by the rotary (`tr`): the planner's
    /// fusion (`plan/rope.rs`), off for both backends.
    pub transpose_rope: bool,
    /// An f32 → f16 → f32 round trip of the cache rows is one step (`round`): the planner's fusion
    /// (`plan/round.rs`), off for both backends.
    pub f16_round_trip: bool,
}

impl Default for GpuFusions {
    fn default() -> Self {
        Self::ALL
    }
}

impl GpuFusions {
    /// Every fusion on (the default).
    pub const ALL: GpuFusions = GpuFusions {
        linear_groups: true,
        attention_inputs: true,
        residual: true,
        transpose_rope: true,
        f16_round_trip: true,
    };
    /// Every fusion off.
    pub const NONE: GpuFusions = GpuFusions {
        linear_groups: false,
        attention_inputs: false,
        residual: false,
        transpose_rope: false,
        f16_round_trip: false,
    };

    /// The fusions left on after turning off those named in `text`: `all`, `none`, or short names
    /// joined by `+` (`group+attn+res+tr+round`).
    pub fn without(text: &str) -> Result<GpuFusions> {
        let mut f = GpuFusions::ALL;
        for name in text.split('+').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "all" => f = GpuFusions::NONE,
                "none" => {}
                "group" => f.linear_groups = false,
                "attn" => f.attention_inputs = false,
                "res" => f.residual = false,
                "tr" => f.transpose_rope = false,
                "round" => f.f16_round_trip = false,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "gpu_no_fuse `{name}`: expected all, none, group, attn, res, tr or round"
                    )))
                }
            }
        }
        Ok(f)
    }
}

/// How the GPU backend runs a model ([`LoadOptions::gpu`](crate::LoadOptions::gpu)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuOptions {
    /// The kernel variant; `None` (default): `Rows` on CPU adapters, `Subgroups` where the device has
    /// subgroup operations, else `Lanes` (`gpu::variant`). `Subgroups` on a device without them runs
    /// `Lanes`.
    pub variant: Option<Variant>,
    /// Which pattern fusions apply.
    pub fusions: GpuFusions,
    /// A one-token attention over at least this many keys is split over chunks of keys, combined by a
    /// second dispatch (default 256; 0: never split).
    pub split_keys: usize,
    /// Keys a workgroup of a split attention (default 64; at least 1).
    pub split_chunk: usize,
    /// Submit a step's commands every this many dispatches, so the GPU starts before recording ends;
    /// `Some(0)`: one submission a step; `None` (default): one on CPU adapters, else every 64.
    pub submit_every: Option<usize>,
    /// Record and submit the next decode step before this one is read back, fed from the GPU's own token
    /// choice (default on).
    pub run_ahead: bool,
    /// Chunks of at least this many tokens take the tiled GEMM (default
    /// 16; 0: never).
    pub gemm_tokens: usize,
    /// A lane of the subgroup linear kernels takes whole 4- and 8-bit blocks (default on; off: one
    /// element of every block a lane, as the other forms).
    pub block_lanes: bool,
    /// Folder keeping the driver's compiled pipelines between runs (a file per adapter and driver) and
    /// `auto`'s device decisions (a file per adapter, driver and model: `backend/auto.rs`);
    /// `None` (default): compiled, and `auto` measured, at every load. The CLI passes the user's cache
    /// folder; an app its own.
    pub pipeline_cache: Option<PathBuf>,
    /// `auto` also runs its trial on a software adapter (lavapipe, WARP, SwiftShader), which it otherwise
    /// leaves for the CPU untried (default off; the tests turn it on to drive the trial on lavapipe).
    pub trial_software: bool,
    /// A transcription model's encoder phase runs on the GPU with its decoder on a software adapter
    /// too; by default it stays on the CPU there, which encodes a Whisper window in a fraction of a
    /// second where lavapipe takes ~40 s (default off; the tests turn it on to run the GPU encoder).
    pub encoder_software: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            variant: None,
            fusions: GpuFusions::ALL,
            split_keys: 256,
            split_chunk: super::attention::SPLIT_CHUNK,
            submit_every: None,
            run_ahead: true,
            gemm_tokens: super::linear::GEMM_TOKENS,
            block_lanes: true,
            pipeline_cache: None,
            trial_software: false,
            encoder_software: false,
        }
    }
}
