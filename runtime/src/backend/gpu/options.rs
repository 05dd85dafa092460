//! The GPU backend's typed settings: which kernel variant runs, which pattern fusions apply, how decode
//! attention splits, how often a step is submitted, whether decode steps run ahead, where the tiled GEMM
//! starts, and where compiled pipelines are kept between runs.
//!
//! They are fields of [`LoadOptions::gpu`](crate::LoadOptions::gpu), chosen at load and fixed for the
//! model's life: the library reads no environment variable. The defaults are what ran fastest on the
//! adapters measured (README's GPU section); the other values exist to compare and bisect (`onestep bench
//! --set gpu_no_fuse=all`) and to let the tests drive every kernel form in one process. The text form
//! ([`GpuOptions::set`], `key=value`) is what the CLI's `--set`, the C ABI's `settings` string and the
//! Kotlin and Swift `settings` take.

use std::path::PathBuf;

use super::Variant;
use crate::error::{Error, Result};
use crate::load::switch;

/// Pattern fusions of the GPU executor; each on by default. Turning one off runs the steps it would
/// have fused as their own dispatches (same results within the kernels' tolerance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuFusions {
    /// Linear layers reading one value run as one dispatch (q/k/v; gate/up with the SiLU), the norm
    /// before them folded in on GPUs (`group`).
    pub linear_groups: bool,
    /// Attention reads the q/k/v projections and applies the rotary itself (`attn`).
    pub attention_inputs: bool,
    /// A residual `Add` after a linear layer runs in the linear's epilogue (`res`).
    pub residual: bool,
    /// A `Transpose` feeding `RotaryEmbedding` is read through by the rotary kernel (`tr`).
    pub transpose_rope: bool,
    /// An f32 → f16 → f32 round trip of the cache rows is one kernel (`round`).
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
    /// subgroup operations, else `Lanes` ([`super::variant`]). `Subgroups` on a device without them runs
    /// `Lanes`.
    pub variant: Option<Variant>,
    /// Which pattern fusions apply.
    pub fusions: GpuFusions,
    /// A one-token attention over at least this many keys is split over chunks of keys, combined by a
    /// second dispatch (default 256; 0: never split).
    pub split_keys: usize,
    /// Keys a workgroup of a split attention (default [`super::attention::SPLIT_CHUNK`]; at least 1).
    pub split_chunk: usize,
    /// Submit a step's commands every this many dispatches, so the GPU starts before recording ends;
    /// `Some(0)`: one submission a step; `None` (default): one on CPU adapters, else every 64.
    pub submit_every: Option<usize>,
    /// Record and submit the next decode step before this one is read back, fed from the GPU's own token
    /// choice (default on).
    pub run_ahead: bool,
    /// Chunks of at least this many tokens take the tiled GEMM (default
    /// [`super::linear::GEMM_TOKENS`]; 0: never).
    pub gemm_tokens: usize,
    /// A lane of the subgroup linear kernels takes whole 4- and 8-bit blocks (default on; off: one
    /// element of every block a lane, as the other forms).
    pub block_lanes: bool,
    /// Folder keeping the driver's compiled pipelines between runs (a file per adapter and driver);
    /// `None` (default): compiled at every load. The CLI passes the user's cache folder; an app its own.
    pub pipeline_cache: Option<PathBuf>,
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
        }
    }
}

impl GpuOptions {
    /// Sets the field named by `key` from its text `value`; `Ok(false)` when `key` is not a GPU key. A
    /// value that does not parse is an [`Error::InvalidArgument`] naming the key.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "gpu_variant" => {
                self.variant = match value {
                    "auto" => None,
                    "rows" => Some(Variant::Rows),
                    "lanes" => Some(Variant::Lanes),
                    "subgroups" => Some(Variant::Subgroups),
                    _ => return Err(bad(key, value, "auto, rows, lanes or subgroups")),
                }
            }
            "gpu_no_fuse" => self.fusions = GpuFusions::without(value)?,
            "gpu_split_keys" => self.split_keys = number(key, value)?,
            "gpu_split_chunk" => {
                self.split_chunk = number(key, value)?;
                if self.split_chunk == 0 {
                    return Err(bad(key, value, "a number of keys, at least 1"));
                }
            }
            "gpu_submit_every" => {
                self.submit_every = match value {
                    "auto" => None,
                    v => Some(number(key, v)?),
                }
            }
            "gpu_run_ahead" => self.run_ahead = switch(key, value)?,
            "gpu_gemm_tokens" => self.gemm_tokens = number(key, value)?,
            "gpu_block_lanes" => self.block_lanes = switch(key, value)?,
            "gpu_pipeline_cache" => {
                self.pipeline_cache = match value {
                    "" | "none" => None,
                    dir => Some(PathBuf::from(dir)),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// A non-negative integer value.
fn number(key: &str, value: &str) -> Result<usize> {
    value
        .trim()
        .parse()
        .map_err(|_| bad(key, value, "a non-negative integer"))
}

fn bad(key: &str, value: &str, expected: &str) -> Error {
    Error::InvalidArgument(format!("`{key}={value}`: expected {expected}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses_and_bad_values_name_the_key() {
        let mut o = GpuOptions::default();
        for (k, v) in [
            ("gpu_variant", "lanes"),
            ("gpu_no_fuse", "res+tr"),
            ("gpu_split_keys", "1"),
            ("gpu_split_chunk", "3"),
            ("gpu_submit_every", "3"),
            ("gpu_run_ahead", "off"),
            ("gpu_gemm_tokens", "0"),
            ("gpu_block_lanes", "0"),
            ("gpu_pipeline_cache", "/tmp/p"),
        ] {
            assert!(o.set(k, v).unwrap(), "{k}");
        }
        assert_eq!(
            o,
            GpuOptions {
                variant: Some(Variant::Lanes),
                fusions: GpuFusions {
                    residual: false,
                    transpose_rope: false,
                    ..GpuFusions::ALL
                },
                split_keys: 1,
                split_chunk: 3,
                submit_every: Some(3),
                run_ahead: false,
                gemm_tokens: 0,
                block_lanes: false,
                pipeline_cache: Some(PathBuf::from("/tmp/p")),
            }
        );
        assert!(!o.set("threads", "2").unwrap());
        assert_eq!(GpuFusions::without("all").unwrap(), GpuFusions::NONE);
        for (k, v) in [
            ("gpu_variant", "fast"),
            ("gpu_no_fuse", "group+nope"),
            ("gpu_split_keys", "-1"),
            ("gpu_split_chunk", "0"),
            ("gpu_run_ahead", "maybe"),
        ] {
            let e = o.set(k, v).unwrap_err().to_string();
            assert!(e.contains(k), "{e}");
        }
    }
}
