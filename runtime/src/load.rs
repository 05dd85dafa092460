//! ONNX bytes → checked [`Graph`]: opsets, supported ops (all unsupported ones listed at once), graph
//! well-formedness (every value defined before use, unique outputs) and the step-graph contract.
//!
//! [`Limits`] bounds what a file may make the loader do (file size, tensor and node counts, metadata
//! string length, KV-cache bytes per sequence); [`LoadOptions`] carries them to
//! [`Model::load_with`](crate::Model::load_with). A file over a limit fails with [`Error::Limit`].

use std::collections::HashSet;

use crate::backend::cpu::ops;
#[cfg(feature = "gpu")]
use crate::backend::gpu::GpuOptions;
use crate::contract::{self, ModelInfo};
use crate::error::{Error, Result};
use crate::graph::Graph;
pub(crate) use onestep_format::limits::limit;
pub use onestep_format::limits::Limits;

/// Highest default-domain opset this runtime implements.
pub const MAX_OPSET: i64 = 23;

/// Options of [`Model::load_with`](crate::Model::load_with): resource limits, the device and how it
/// runs. Everything the runtime can be asked to do differently is a field here (the library reads no
/// environment variable); [`LoadOptions::set`] takes the tuning fields as `key=value` text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Resource limits.
    pub limits: Limits,
    /// `auto` (default: a hardware GPU when there is one, else the CPU), `cpu`, `gpu`, `gpu:N`.
    #[cfg(feature = "gpu")]
    pub device: crate::backend::gpu::DeviceRequest,
    /// Which wgpu backends may be used.
    #[cfg(feature = "gpu")]
    pub backend: crate::backend::gpu::BackendFilter,
    /// How sequence states keep their KV cache (host page size, GPU budget); the default of
    /// [`Model::new_state`](crate::Model::new_state).
    pub kv: crate::kv::KvOptions,
    /// How the CPU multiplies the 4- and 8-bit block weights: `Fast` (the default: activations
    /// quantized to 8 bits per block, integer dot products) or `Exact` (f32 activations, what
    /// onnxruntime computes). GPU kernels are always exact: to compare the two backends token for
    /// token, load the CPU one with `Exact`.
    pub precision: crate::Precision,
    /// Time every op (CPU) or every dispatch (GPU: timestamps where the adapter has them, else each
    /// dispatch submitted alone, without run-ahead): [`Model::profile`](crate::Model::profile). Slows
    /// the GPU down; for measurements only.
    pub profile: bool,
    /// How the GPU backend runs (kernel variant, fusions, submission cadence, run-ahead, pipeline
    /// cache folder).
    #[cfg(feature = "gpu")]
    pub gpu: crate::backend::gpu::GpuOptions,
    /// The instruction set of the CPU's integer kernels under `Fast`, by the name
    /// [`fast_isa`](crate::system::fast_isa) reports (`avx512-vnni`, `avx-vnni`, `avx2`, `neon-i8mm`,
    /// `neon-dotprod`, `neon`, `scalar`); `None`: the best this CPU has. For measuring one path on a
    /// CPU that has several; a name this CPU cannot run fails the load.
    pub cpu_isa: Option<String>,
}

/// The keys [`LoadOptions::set`] takes, with their values (for `--help` and error messages).
#[cfg(feature = "gpu")]
pub const SETTING_KEYS: &str = "precision=exact|fast, profile=on|off, cpu_isa=NAME, \
gpu_variant=auto|rows|lanes|subgroups, gpu_no_fuse=all|none|group+attn+res+tr+round, gpu_split_keys=N, \
gpu_split_chunk=N, gpu_submit_every=auto|N, gpu_run_ahead=on|off, gpu_gemm_tokens=N, \
gpu_block_lanes=on|off, gpu_pipeline_cache=none|DIR, gpu_trial_software=on|off, \
gpu_encoder_software=on|off";

/// The keys [`LoadOptions::set`] takes, with their values (for `--help` and error messages).
#[cfg(not(feature = "gpu"))]
pub const SETTING_KEYS: &str = "precision=exact|fast, profile=on|off, cpu_isa=NAME";

impl LoadOptions {
    /// The planner's fusions these options leave on (`gpu_no_fuse` names them; both backends run
    /// every fused form, so a fusion turned off is off for both).
    pub(crate) fn plan_options(&self) -> crate::plan::PlanOptions {
        #[cfg(feature = "gpu")]
        {
            let f = &self.gpu.fusions;
            crate::plan::PlanOptions {
                residual: f.residual,
                transpose_rope: f.transpose_rope,
                round_trip: f.f16_round_trip,
                linear_groups: f.linear_groups.then_some(crate::plan::GroupCaps::ANY),
                attention_inputs: f.attention_inputs,
                attention_input_norms: f.attention_inputs,
            }
        }
        #[cfg(not(feature = "gpu"))]
        crate::plan::PlanOptions::default()
    }

    /// Options from their textual forms — the CLI's flags, the C ABI's and the mobile bindings' strings:
    /// `device` `auto|cpu|gpu|gpu:N`, `backend` `vulkan|metal|dx12|gl` (`None`: any, or `WGPU_BACKEND`),
    /// `gpu_cache_budget` `all|BYTES|N%` (bytes with an optional `K`/`M`/`G` suffix), `page_rows`
    /// positions a host KV page (0: the default). A GPU device in a build without the `gpu` feature is
    /// an [`Error::InvalidArgument`].
    pub fn parse(
        device: &str,
        backend: Option<&str>,
        gpu_cache_budget: &str,
        page_rows: usize,
    ) -> Result<Self> {
        let kv = crate::kv::KvOptions {
            page_rows: if page_rows == 0 {
                crate::kv::DEFAULT_PAGE_ROWS
            } else {
                page_rows
            },
            gpu_budget: gpu_cache_budget.parse()?,
            gpu_segment_bytes: None,
        };
        #[cfg(feature = "gpu")]
        {
            Ok(LoadOptions {
                device: device.parse()?,
                backend: match backend {
                    Some(b) => b.parse()?,
                    None => Default::default(),
                },
                kv,
                ..LoadOptions::default()
            })
        }
        #[cfg(not(feature = "gpu"))]
        {
            let _ = backend;
            if device != "auto" && device != "cpu" {
                return Err(Error::InvalidArgument(format!(
                    "device `{device}`: this build has no GPU backend (feature `gpu`)"
                )));
            }
            Ok(LoadOptions {
                kv,
                ..LoadOptions::cpu()
            })
        }
    }

    /// These options with the precision named by `text` (`exact` or `fast`, see
    /// [`LoadOptions::precision`]); another name is an [`Error::InvalidArgument`].
    pub fn with_precision(mut self, text: &str) -> Result<Self> {
        self.precision = text.parse().map_err(Error::InvalidArgument)?;
        Ok(self)
    }

    /// Applies `settings`: `key=value` pairs separated by commas (or newlines), the form the CLI's
    /// `--set`, the C ABI's `settings` and the Kotlin and Swift `settings` take. Keys: `precision`,
    /// `profile` and the GPU tuning keys of `backend::gpu::GpuOptions` (see
    /// [`SETTING_KEYS`]). An unknown key, a pair without `=` or a value that does not parse is an
    /// [`Error::InvalidArgument`] naming it, and leaves `self` unchanged.
    pub fn set(&mut self, settings: &str) -> Result<()> {
        let mut next = self.clone();
        for pair in settings
            .split([',', '\n'])
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(Error::InvalidArgument(format!(
                    "setting `{pair}`: expected key=value ({SETTING_KEYS})"
                )));
            };
            let (key, value) = (key.trim(), value.trim());
            match key {
                "precision" => next = next.with_precision(value)?,
                "profile" => next.profile = switch(key, value)?,
                "cpu_isa" => {
                    crate::backend::cpu::linear_q8::by_name(value)
                        .map_err(|e| Error::InvalidArgument(format!("`{key}={value}`: {e}")))?;
                    next.cpu_isa = Some(value.to_string());
                }
                #[cfg(feature = "gpu")]
                _ if set_gpu(&mut next.gpu, key, value)? => {}
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "setting `{key}`: unknown key (known: {SETTING_KEYS})"
                    )))
                }
            }
        }
        *self = next;
        Ok(())
    }

    /// The integer kernels' instruction set [`LoadOptions::cpu_isa`] names (`None`: the best);
    /// one this CPU lacks is an [`Error::InvalidArgument`].
    pub(crate) fn fast_isa(&self) -> Result<Option<crate::backend::cpu::linear_q8::QIsa>> {
        self.cpu_isa
            .as_deref()
            .map(|name| {
                crate::backend::cpu::linear_q8::by_name(name)
                    .map_err(|e| Error::InvalidArgument(format!("cpu_isa: {e}")))
            })
            .transpose()
    }

    /// Default limits on the CPU backend (what [`Model::load`](crate::Model::load) uses).
    pub fn cpu() -> Self {
        Self {
            #[cfg(feature = "gpu")]
            device: crate::backend::gpu::DeviceRequest::Cpu,
            ..Default::default()
        }
    }
}

/// Sets the GPU option named by `key` from its text `value`; `Ok(false)` when `key` is not a GPU key. A
/// value that does not parse is an [`Error::InvalidArgument`] naming the key.
#[cfg(feature = "gpu")]
fn set_gpu(o: &mut GpuOptions, key: &str, value: &str) -> Result<bool> {
    match key {
        "gpu_variant" => {
            o.variant = match value {
                "auto" => None,
                "rows" => Some(crate::backend::gpu::Variant::Rows),
                "lanes" => Some(crate::backend::gpu::Variant::Lanes),
                "subgroups" => Some(crate::backend::gpu::Variant::Subgroups),
                _ => return Err(bad_setting(key, value, "auto, rows, lanes or subgroups")),
            }
        }
        "gpu_no_fuse" => o.fusions = crate::backend::gpu::GpuFusions::without(value)?,
        "gpu_split_keys" => o.split_keys = number(key, value)?,
        "gpu_split_chunk" => {
            o.split_chunk = number(key, value)?;
            if o.split_chunk == 0 {
                return Err(bad_setting(key, value, "a number of keys, at least 1"));
            }
        }
        "gpu_submit_every" => {
            o.submit_every = match value {
                "auto" => None,
                v => Some(number(key, v)?),
            }
        }
        "gpu_run_ahead" => o.run_ahead = switch(key, value)?,
        "gpu_gemm_tokens" => o.gemm_tokens = number(key, value)?,
        "gpu_block_lanes" => o.block_lanes = switch(key, value)?,
        "gpu_pipeline_cache" => {
            o.pipeline_cache = match value {
                "" | "none" => None,
                dir => Some(std::path::PathBuf::from(dir)),
            }
        }
        "gpu_trial_software" => o.trial_software = switch(key, value)?,
        "gpu_encoder_software" => o.encoder_software = switch(key, value)?,
        _ => return Ok(false),
    }
    Ok(true)
}

/// A non-negative integer setting.
#[cfg(feature = "gpu")]
fn number(key: &str, value: &str) -> Result<usize> {
    value
        .trim()
        .parse()
        .map_err(|_| bad_setting(key, value, "a non-negative integer"))
}

fn bad_setting(key: &str, value: &str, expected: &str) -> Error {
    Error::InvalidArgument(format!("`{key}={value}`: expected {expected}"))
}

/// An on/off setting: `1`/`on`/`true`/`yes` or `0`/`off`/`false`/`no`.
fn switch(key: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Ok(true),
        "0" | "off" | "false" | "no" => Ok(false),
        _ => Err(bad_setting(key, value, "on or off (1/0, true/false)")),
    }
}

/// Checks `graph` and reads its [`ModelInfo`].
pub fn check(graph: &Graph) -> Result<ModelInfo> {
    check_nodes(graph)?;
    check_contract(graph)
}

/// Checks what any graph the runtime plans must be: known opsets, supported ops (all missing ones
/// listed at once), every value defined once and before it is read, every output produced.
pub(crate) fn check_nodes(graph: &Graph) -> Result<()> {
    for (domain, &version) in &graph.opsets {
        let ok = match domain.as_str() {
            "" | "ai.onnx" => (13..=MAX_OPSET).contains(&version),
            contract::MS_DOMAIN => version == 1,
            _ => true, // unused domains are harmless; nodes using them fail the op check below
        };
        if !ok {
            return Err(Error::Opset {
                domain: domain.clone(),
                version,
            });
        }
    }
    let mut unsupported: Vec<String> = Vec::new();
    for n in &graph.nodes {
        let key = ops::op_key(&n.domain, &n.op);
        if !ops::SUPPORTED.contains(&key.as_str()) && !unsupported.contains(&key) {
            unsupported.push(key);
        }
    }
    if !unsupported.is_empty() {
        let mut detail = Vec::new();
        for op in &unsupported {
            let first = graph
                .nodes
                .iter()
                .find(|n| &ops::op_key(&n.domain, &n.op) == op)
                .map(|n| n.name.clone())
                .unwrap_or_default();
            detail.push(format!("{op} (first at node `{first}`)"));
        }
        return Err(Error::UnsupportedOps(detail));
    }
    let mut defined: HashSet<&str> = graph.inputs.iter().map(|v| v.name.as_str()).collect();
    defined.extend(graph.initializers.iter().map(|i| i.name.as_str()));
    for n in &graph.nodes {
        for i in n.inputs.iter().filter(|s| !s.is_empty()) {
            if !defined.contains(i.as_str()) {
                return Err(Error::node(
                    &n.name,
                    &n.op,
                    format!("input `{i}` is not defined before this node (graph not topologically sorted, or a missing tensor)"),
                ));
            }
        }
        for o in n.outputs.iter().filter(|s| !s.is_empty()) {
            if !defined.insert(o.as_str()) {
                return Err(Error::node(
                    &n.name,
                    &n.op,
                    format!("output `{o}` is defined twice"),
                ));
            }
        }
    }
    for o in &graph.outputs {
        if !defined.contains(o.name.as_str()) {
            return Err(Error::Contract(format!(
                "graph output `{}` is never produced",
                o.name
            )));
        }
    }
    Ok(())
}

/// The step graph's contract: its metadata, the token and position inputs, the token and logits
/// outputs, a cache input and new-rows output per layer.
fn check_contract(graph: &Graph) -> Result<ModelInfo> {
    let info = ModelInfo::from_metadata(&graph.metadata)?;
    let has_input = |n: &str| graph.inputs.iter().any(|v| v.name == n);
    let has_output = |n: &str| graph.outputs.iter().any(|v| v.name == n);
    for name in [contract::INPUT_IDS, contract::POSITION] {
        if !has_input(name) {
            return Err(Error::Contract(format!("graph input `{name}` is missing")));
        }
    }
    for name in [contract::NEXT_TOKEN, contract::LOGITS] {
        if !has_output(name) {
            return Err(Error::Contract(format!("graph output `{name}` is missing")));
        }
    }
    for l in 0..info.num_layers {
        for (p, n) in [
            (contract::past_key(l), contract::new_key(l)),
            (contract::past_value(l), contract::new_value(l)),
        ] {
            if !has_input(&p) || !has_output(&n) {
                return Err(Error::Contract(format!(
                    "layer {l}: cache input `{p}` / output `{n}` missing"
                )));
            }
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cpu_isa` takes the names of the instruction sets this CPU runs (scalar everywhere) and
    /// refuses others, naming the key and the choices; a name set directly fails at `fast_isa`.
    #[test]
    fn cpu_isa_takes_this_cpus_instruction_sets_only() {
        for q in crate::backend::cpu::linear_q8::available() {
            let mut o = LoadOptions::default();
            o.set(&format!("cpu_isa={}", q.name())).unwrap();
            assert_eq!(o.fast_isa().unwrap(), Some(q));
        }
        let mut o = LoadOptions::default();
        let e = o.set("cpu_isa=avx9000").unwrap_err().to_string();
        assert!(e.contains("cpu_isa=avx9000") && e.contains("scalar"), "{e}");
        assert_eq!(
            o.cpu_isa, None,
            "a bad setting leaves the options unchanged"
        );
        assert_eq!(o.fast_isa().unwrap(), None);
        o.cpu_isa = Some("avx9000".into());
        assert!(o.fast_isa().unwrap_err().to_string().contains("cpu_isa"));
    }

    #[cfg(feature = "gpu")]
    #[test]
    fn every_gpu_key_parses_and_bad_values_name_the_key() {
        let mut o = GpuOptions::default();
        use crate::backend::gpu::{GpuFusions, Variant};
        use std::path::PathBuf;
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
            ("gpu_trial_software", "on"),
            ("gpu_encoder_software", "on"),
        ] {
            assert!(set_gpu(&mut o, k, v).unwrap(), "{k}");
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
                trial_software: true,
                encoder_software: true,
            }
        );
        assert!(!set_gpu(&mut o, "threads", "2").unwrap());
        assert_eq!(GpuFusions::without("all").unwrap(), GpuFusions::NONE);
        for (k, v) in [
            ("gpu_variant", "fast"),
            ("gpu_no_fuse", "group+nope"),
            ("gpu_split_keys", "-1"),
            ("gpu_split_chunk", "0"),
            ("gpu_run_ahead", "maybe"),
        ] {
            let e = set_gpu(&mut o, k, v).unwrap_err().to_string();
            assert!(e.contains(k), "{e}");
        }
    }

    /// A settings string applies every pair or none: one bad pair leaves the options as they were.
    #[test]
    fn settings_apply_all_or_nothing() {
        let mut o = LoadOptions::cpu();
        assert_eq!(o.precision, crate::Precision::Fast, "the default");
        o.set("profile=on, precision=exact").unwrap();
        assert!(o.profile);
        assert_eq!(o.precision, crate::Precision::Exact);
        let before = o.clone();
        let e = o.set("profile=off,colour=blue").unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        assert_eq!(o, before);
        assert!(o
            .set("profile")
            .unwrap_err()
            .to_string()
            .contains("key=value"));
    }
}
