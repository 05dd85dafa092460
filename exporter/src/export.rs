//! The export pipeline: source → weight forms → traced step graph → ONNX file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use onestep_format::contract::{meta, ModelInfo};
use onestep_format::graph::DType;
use onestep_format::GenerationDefaults;

use crate::arch::{self, ArchOptions, Weights};
use crate::quant::{self, QuantError, Quantize};
use crate::source::{SourceError, SourceModel};
use crate::trace::TraceError;
use crate::write::{self, WriteError};

/// What to export and how.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Static cache slots (capped at the model's context length).
    pub max_cache: usize,
    /// Largest chunk the graph is meant to run (metadata; the graph accepts any `T`).
    pub max_chunk: usize,
    /// Cache dtype: F16 (default) or F32.
    pub kv_dtype: DType,
    /// Weight encoding.
    pub quantize: Quantize,
    /// Default generation settings written into the file (`None`: the source's, else the defaults).
    pub generation: Option<GenerationDefaults>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            max_cache: 2048,
            max_chunk: 128,
            kv_dtype: DType::F16,
            quantize: Quantize::Keep,
            generation: None,
        }
    }
}

/// What an export did.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// Output file.
    pub path: PathBuf,
    /// Number of weight parameters (elements of the model's matrices and vectors).
    pub parameters: u64,
    /// File size in bytes.
    pub file_bytes: u64,
    /// Bytes of weight data (initializers) per parameter.
    pub bytes_per_weight: f64,
    /// `domain::op` → count.
    pub op_histogram: BTreeMap<String, usize>,
    /// Weight forms used: form name → number of matrices.
    pub forms: BTreeMap<String, usize>,
    /// Seconds per stage (`quantize`, `trace`, `write`).
    pub timings: Vec<(String, f64)>,
    /// The cache size actually used.
    pub max_cache: usize,
    /// Source tensors the graph does not use.
    pub unused_tensors: Vec<String>,
}

/// Export errors; each names the file, tensor or node at fault.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A tensor cannot be put in the requested form.
    #[error("{origin}: {source}")]
    Quant {
        /// Source.
        origin: String,
        /// Cause.
        #[source]
        source: QuantError,
    },
    /// Building the graph failed.
    #[error("{origin}: {source}")]
    Trace {
        /// Source.
        origin: String,
        /// Cause.
        #[source]
        source: TraceError,
    },
    /// Writing the file failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// Bad options.
    #[error("{0}")]
    Options(String),
}

/// Progress reporting for the stages (the CLI draws bars; library users may ignore it).
pub trait Progress {
    /// A stage starts with `total` units (tensors or bytes).
    fn stage(&mut self, _name: &str, _total: u64) {}
    /// `done` units of the current stage are finished; `what` names the current item.
    fn tick(&mut self, _done: u64, _what: &str) {}
    /// The current stage is finished.
    fn finish_stage(&mut self) {}
}

/// A [`Progress`] that reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Encodes every source tensor into its weight form (vectors → f32; matrices → the requested form).
pub fn encode_weights(
    src: &SourceModel,
    q: Quantize,
    progress: &mut dyn Progress,
) -> Result<Weights, ExportError> {
    let mut w = Weights::default();
    progress.stage("quantize", src.tensors.len() as u64);
    for (i, (name, t)) in src.tensors.iter().enumerate() {
        let qe = |source| ExportError::Quant {
            origin: src.origin.clone(),
            source,
        };
        match t.shape.len() {
            1 => {
                w.vectors
                    .insert(name.clone(), quant::vector_f32(name, t).map_err(qe)?);
            }
            2 => {
                w.matrices
                    .insert(name.clone(), quant::encode_matrix(name, t, q).map_err(qe)?);
            }
            _ => {
                return Err(qe(QuantError {
                    tensor: name.clone(),
                    detail: format!("rank-{} tensors are not supported", t.shape.len()),
                }))
            }
        }
        progress.tick(i as u64 + 1, name);
    }
    progress.finish_stage();
    Ok(w)
}

/// Exports `src` into the ONNX step graph at `out`.
pub fn export(
    src: &SourceModel,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn Progress,
) -> Result<ExportSummary, ExportError> {
    let cfg = &src.config;
    if !matches!(opts.kv_dtype, DType::F16 | DType::F32) {
        return Err(ExportError::Options(format!(
            "kv dtype must be f16 or f32, not {}",
            opts.kv_dtype
        )));
    }
    if opts.max_cache == 0 || opts.max_chunk == 0 {
        return Err(ExportError::Options(
            "max cache and max chunk must be positive".into(),
        ));
    }
    let max_cache = if cfg.max_position_embeddings > 0 {
        opts.max_cache.min(cfg.max_position_embeddings)
    } else {
        opts.max_cache
    };
    let max_chunk = opts.max_chunk.min(max_cache);
    let mut timings = Vec::new();

    let t0 = Instant::now();
    let weights = encode_weights(src, opts.quantize, progress)?;
    timings.push(("quantize".to_string(), t0.elapsed().as_secs_f64()));

    let t0 = Instant::now();
    progress.stage("trace", cfg.num_layers as u64);
    let arch_opts = ArchOptions {
        max_cache,
        kv_dtype: opts.kv_dtype,
    };
    let mut graph =
        arch::build(cfg, &weights, &arch_opts).map_err(|source| ExportError::Trace {
            origin: src.origin.clone(),
            source,
        })?;
    progress.tick(cfg.num_layers as u64, "graph");
    progress.finish_stage();
    let tk = &src.tokenizer;
    let mut stop_ids = tk.stop_ids.clone();
    if !stop_ids.contains(&tk.eos_id) {
        stop_ids.insert(0, tk.eos_id);
    }
    let info = ModelInfo {
        architecture: cfg.architecture.clone(),
        num_layers: cfg.num_layers,
        hidden_size: cfg.hidden_size,
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        vocab_size: cfg.vocab_size,
        max_cache,
        max_chunk,
        kv_dtype: opts.kv_dtype,
        bos_id: tk.bos_id,
        add_bos: tk.add_bos,
        eos_id: tk.eos_id,
        stop_ids,
        generation: opts
            .generation
            .clone()
            .or_else(|| src.generation.clone())
            .unwrap_or_default(),
    };
    info.to_metadata(&mut graph.metadata);
    graph
        .metadata
        .insert(meta::SOURCE.into(), src.origin.clone());
    graph
        .metadata
        .insert(meta::WEIGHT_ENCODING.into(), opts.quantize.name().into());
    graph
        .metadata
        .insert(meta::TOKENIZER_JSON.into(), tk.tokenizer_json.clone());
    if let Some(tpl) = &tk.chat_template {
        graph
            .metadata
            .insert(meta::CHAT_TEMPLATE.into(), tpl.clone());
    }
    timings.push(("trace".to_string(), t0.elapsed().as_secs_f64()));

    let t0 = Instant::now();
    let total_bytes: u64 = graph.initializers.iter().map(|i| i.data.len() as u64).sum();
    progress.stage("write", total_bytes);
    let input = Path::new(&src.origin);
    let file_bytes = write::write_model(&graph, out, Some(input), &mut |d, _| {
        progress.tick(d, "weights")
    })?;
    progress.finish_stage();
    timings.push(("write".to_string(), t0.elapsed().as_secs_f64()));

    // statistics
    let used: std::collections::HashSet<&str> =
        graph.initializers.iter().map(|i| i.name.as_str()).collect();
    let mut parameters = 0u64;
    let mut forms = BTreeMap::new();
    for m in weights.matrices.values() {
        parameters += (m.n * m.k) as u64;
        *forms.entry(m.form_name().to_string()).or_insert(0) += 1;
    }
    for v in weights.vectors.values() {
        parameters += v.len() as u64 / 4;
    }
    let unused_tensors = src
        .tensors
        .keys()
        .filter(|n| {
            !used
                .iter()
                .any(|u| initializer_source(u).as_deref() == Some(n.as_str()))
        })
        .cloned()
        .collect();
    let weight_bytes: u64 = graph
        .initializers
        .iter()
        .filter(|i| !i.name.starts_with("const.") && !i.name.starts_with("rope."))
        .map(|i| i.data.len() as u64)
        .sum();
    Ok(ExportSummary {
        path: out.to_path_buf(),
        parameters,
        file_bytes,
        bytes_per_weight: if parameters > 0 {
            weight_bytes as f64 / parameters as f64
        } else {
            0.0
        },
        op_histogram: graph.op_histogram(),
        forms,
        timings,
        max_cache,
        unused_tensors,
    })
}

/// The canonical source tensor an initializer came from (`l3.attn.q_proj.scales` → `blk.3.attn_q.weight`).
pub fn initializer_source(init: &str) -> Option<String> {
    const MAP: &[(&str, &str)] = &[
        ("attn.q_proj.bias", "attn_q.bias"),
        ("attn.k_proj.bias", "attn_k.bias"),
        ("attn.v_proj.bias", "attn_v.bias"),
        ("attn.q_proj", "attn_q.weight"),
        ("attn.k_proj", "attn_k.weight"),
        ("attn.v_proj", "attn_v.weight"),
        ("attn.o_proj", "attn_output.weight"),
        ("mlp.gate", "ffn_gate.weight"),
        ("mlp.up", "ffn_up.weight"),
        ("mlp.down", "ffn_down.weight"),
    ];
    if init == "output_norm.weight" {
        return Some(init.to_string());
    }
    for top in ["token_embd", "output"] {
        if let Some(rest) = init.strip_prefix(top).and_then(|r| r.strip_prefix('.')) {
            if matches!(rest, "weight" | "scales" | "zero_points" | "mins") {
                return Some(format!("{top}.weight"));
            }
        }
    }
    let rest = init.strip_prefix('l')?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    // A norm's weight keeps its canonical name (`l3.attn_norm.weight` ← `blk.3.attn_norm.weight`).
    if rest.ends_with("norm.weight") {
        return Some(format!("blk.{layer}.{rest}"));
    }
    MAP.iter()
        .find(|(k, _)| rest.starts_with(k))
        .map(|(_, v)| format!("blk.{layer}.{v}"))
}

#[cfg(test)]
mod tests {
    use super::initializer_source;

    /// Every weight initializer names its canonical tensor: a norm of any family by its own name.
    #[test]
    fn initializers_name_their_source_tensor() {
        for (init, src) in [
            ("l3.attn.q_proj.scales", "blk.3.attn_q.weight"),
            ("l0.attn.k_proj.bias", "blk.0.attn_k.bias"),
            ("l1.mlp.down.zero_points", "blk.1.ffn_down.weight"),
            ("l2.attn_q_norm.weight", "blk.2.attn_q_norm.weight"),
            ("l1.post_ffw_norm.weight", "blk.1.post_ffw_norm.weight"),
            ("l0.ffn_norm.weight", "blk.0.ffn_norm.weight"),
            ("token_embd.mins", "token_embd.weight"),
            ("output_norm.weight", "output_norm.weight"),
        ] {
            assert_eq!(initializer_source(init).as_deref(), Some(src), "{init}");
        }
        for other in ["rope.cos", "const.3", "lx.attn_norm.weight"] {
            assert_eq!(initializer_source(other), None, "{other}");
        }
    }
}
