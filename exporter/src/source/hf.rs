//! Hugging Face folder reader: `config.json`, one or many `*.safetensors` (memory-mapped, zero-copy),
//! `tokenizer.json` (verbatim), `tokenizer_config.json`, and the optional `generation_config.json`.
//!
//! Architectures: `llama` and `qwen2`. Tensor names are mapped to the canonical (GGUF) names of
//! [`super::canonical`]; shapes stay `[out, in]`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::check;
use super::{
    canonical, ModelConfig, RopeScaling, SourceDType, SourceError, SourceModel, SourceTensor,
    TokenizerData,
};

pub(super) fn show(p: &Path) -> String {
    p.display().to_string()
}

fn key_err(path: &Path, key: &str, detail: impl Into<String>) -> SourceError {
    SourceError::Key {
        path: show(path),
        key: key.into(),
        detail: detail.into(),
    }
}

fn read_text(path: &Path) -> Result<String, SourceError> {
    std::fs::read_to_string(path).map_err(|source| SourceError::Io {
        path: show(path),
        source,
    })
}

pub(super) fn read_json(path: &Path) -> Result<Value, SourceError> {
    serde_json::from_str(&read_text(path)?).map_err(|e| SourceError::Format {
        path: show(path),
        detail: format!("invalid JSON: {e}"),
    })
}

pub(super) fn read_json_opt(path: &Path) -> Result<Option<Value>, SourceError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// The `config.json` fields we read (names as written by transformers 4.x and 5.x).
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers 5: `{rope_type, rope_theta, factor, ...}`.
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    /// phi3 (classic form): the pretrained context of LongRoPE.
    original_max_position_embeddings: Option<usize>,
    /// phi3/phi4: the share of each head that rotates.
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    /// mistral: keys at most this many positions behind the query are attended (`null`: all).
    sliding_window: Option<usize>,
    /// smollm3: 1 where a layer applies the rotary embedding, 0 where it does not.
    no_rope_layers: Option<Vec<u8>>,
    /// smollm3: every n-th layer has no rotary embedding when `no_rope_layers` is absent (default 4).
    no_rope_layer_interval: Option<usize>,
    /// gemma: the MLP's activation (`gelu_pytorch_tanh`).
    hidden_activation: Option<String>,
    /// gemma: the attention scale is this to the power −½.
    query_pre_attn_scalar: Option<f64>,
    /// gemma2: soft cap of the attention scores.
    attn_logit_softcapping: Option<f64>,
    /// gemma2: soft cap of the logits.
    final_logit_softcapping: Option<f64>,
    /// gemma: `sliding_attention` or `full_attention` per layer.
    layer_types: Option<Vec<String>>,
    /// gemma3 (older configs): every n-th layer is global (default 6).
    sliding_window_pattern: Option<usize>,
    /// gemma3 (transformers 4.x): rotary base of the sliding-window layers (default 10,000).
    rope_local_base_freq: Option<f64>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

/// Reads a Hugging Face folder (`llama`, `mistral`, `phi3`, `qwen2`, `qwen3`, `smollm3`) into a
/// [`SourceModel`].
pub fn read(dir: &Path) -> Result<SourceModel, SourceError> {
    let config_path = dir.join("config.json");
    let raw: HfConfig =
        serde_json::from_str(&read_text(&config_path)?).map_err(|e| SourceError::Format {
            path: show(&config_path),
            detail: format!("invalid config: {e}"),
        })?;
    let tensors_raw = read_safetensors(dir)?;
    let mut config = model_config(&config_path, &raw)?;

    // Map names; decide tying from the config, else from the presence of `lm_head.weight`.
    let has_lm_head = tensors_raw.contains_key("lm_head.weight");
    config.tie_word_embeddings = raw.tie_word_embeddings.unwrap_or(!has_lm_head);
    let mut tensors = BTreeMap::new();
    for (name, (file, t)) in tensors_raw {
        if let Some(parts) =
            split_fused(&config, &name, &t).map_err(|what| SourceError::Unsupported {
                path: show(&file),
                what,
            })?
        {
            tensors.extend(parts);
            continue;
        }
        let Some(canon) = canonical_name(&name, config.architecture.starts_with("gemma")) else {
            if name.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            return Err(SourceError::Unsupported {
                path: show(&file),
                what: format!("tensor `{name}` (no counterpart in the supported architectures)"),
            });
        };
        if canon == canonical::OUTPUT && config.tie_word_embeddings {
            continue;
        }
        tensors.insert(canon, t);
    }
    check::check_tensors(&show(dir), &config, &tensors)?;

    let (tokenizer, generation) = read_tokenizer(dir, &raw, config.vocab_size)?;
    Ok(SourceModel {
        origin: show(dir),
        config,
        tensors,
        tokenizer,
        generation,
    })
}

fn model_config(path: &Path, c: &HfConfig) -> Result<ModelConfig, SourceError> {
    let arch = match (
        c.model_type.as_deref(),
        c.architectures.first().map(String::as_str),
    ) {
        (Some("llama"), _) | (None, Some("LlamaForCausalLM")) => "llama",
        (Some("mistral"), _) | (None, Some("MistralForCausalLM")) => "mistral",
        (Some("phi3"), _) | (None, Some("Phi3ForCausalLM")) => "phi3",
        (Some("qwen2"), _) | (None, Some("Qwen2ForCausalLM")) => "qwen2",
        (Some("qwen3"), _) | (None, Some("Qwen3ForCausalLM")) => "qwen3",
        (Some("smollm3"), _) | (None, Some("SmolLM3ForCausalLM")) => "smollm3",
        (Some("gemma2"), _) | (None, Some("Gemma2ForCausalLM")) => "gemma2",
        (Some("gemma3_text"), _) | (None, Some("Gemma3ForCausalLM")) => "gemma3",
        (Some("gemma3"), _) => {
            return Err(SourceError::Unsupported {
                path: show(path),
                what: "model_type `gemma3` (the multimodal Gemma 3; its text model, \
                       model_type `gemma3_text`, is supported)"
                    .into(),
            })
        }
        (Some(other), _) | (None, Some(other)) => {
            return Err(SourceError::Unsupported {
                path: show(path),
                what: format!("architecture `{other}`"),
            })
        }
        (None, None) => return Err(key_err(path, "model_type", "missing")),
    };
    let req = |v: Option<usize>, key: &str| -> Result<usize, SourceError> {
        match v {
            Some(0) => Err(key_err(path, key, "must be positive")),
            Some(x) => Ok(x),
            None => Err(key_err(path, key, "missing")),
        }
    };
    let hidden_size = req(c.hidden_size, "hidden_size")?;
    let intermediate_size = req(c.intermediate_size, "intermediate_size")?;
    let num_layers = req(c.num_hidden_layers, "num_hidden_layers")?;
    let num_heads = req(c.num_attention_heads, "num_attention_heads")?;
    let num_kv_heads = req(
        c.num_key_value_heads.or(Some(num_heads)),
        "num_key_value_heads",
    )?;
    if num_heads % num_kv_heads != 0 {
        return Err(key_err(
            path,
            "num_key_value_heads",
            format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
        ));
    }
    let head_dim = match c.head_dim {
        Some(d) => req(Some(d), "head_dim")?,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => {
            return Err(key_err(
                path,
                "num_attention_heads",
                format!("{num_heads} does not divide hidden_size {hidden_size}"),
            ))
        }
    };
    let gemma = arch.starts_with("gemma");
    let (act_key, act) = match (gemma, c.hidden_activation.as_deref()) {
        (true, Some(a)) => ("hidden_activation", Some(a)),
        _ => ("hidden_act", c.hidden_act.as_deref()),
    };
    let takes: &[&str] = if gemma {
        &["gelu_pytorch_tanh", "gelu_tanh"]
    } else {
        &["silu"]
    };
    if let Some(act) = act.filter(|a| !takes.contains(a)) {
        return Err(SourceError::Unsupported {
            path: show(path),
            what: format!("{act_key} `{act}` (a `{arch}` model takes `{}`)", takes[0]),
        });
    }
    if c.mlp_bias == Some(true) {
        return Err(SourceError::Unsupported {
            path: show(path),
            what: "mlp_bias = true".into(),
        });
    }
    if c.use_sliding_window == Some(true) {
        return Err(SourceError::Unsupported {
            path: show(path),
            what: "use_sliding_window = true".into(),
        });
    }
    let rms_eps = c
        .rms_norm_eps
        .ok_or_else(|| key_err(path, "rms_norm_eps", "missing"))? as f32;
    // gemma3 in transformers 5 keeps one rope_parameters entry per layer kind
    let params = c.rope_parameters.as_ref().filter(|v| !v.is_null());
    let global_params = params.map(|p| p.get("full_attention").unwrap_or(p));
    let (rope_theta, rope_scaling) = rope(path, c, global_params)?;
    if let Some(RopeScaling::LongRope {
        short_factor,
        long_factor,
        ..
    }) = &rope_scaling
    {
        if short_factor.len() != head_dim / 2 || long_factor.len() != head_dim / 2 {
            return Err(key_err(
                path,
                "rope_scaling",
                format!(
                    "LongRoPE factors must be head_dim / 2 = {} long, got {} and {}",
                    head_dim / 2,
                    short_factor.len(),
                    long_factor.len()
                ),
            ));
        }
    }
    let partial = c
        .partial_rotary_factor
        .or_else(|| {
            c.rope_parameters
                .as_ref()
                .and_then(|p| p.get("partial_rotary_factor"))
                .and_then(Value::as_f64)
        })
        .unwrap_or(1.0);
    if partial != 1.0 {
        return Err(SourceError::Unsupported {
            path: show(path),
            what: format!("partial_rotary_factor = {partial} (a rotation over part of each head)"),
        });
    }
    let no_rope_layers = if arch == "smollm3" {
        no_rope_layers(path, c, num_layers)?
    } else {
        Vec::new()
    };
    let mut config = ModelConfig {
        architecture: arch.into(),
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size: req(c.vocab_size, "vocab_size")?,
        rms_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings: req(c.max_position_embeddings, "max_position_embeddings")?,
        tie_word_embeddings: false, // decided by the caller, which sees the tensors
        attention_bias: arch == "qwen2" || c.attention_bias == Some(true),
        rope_interleaved: false,
        qk_norm: matches!(arch, "qwen3" | "gemma3"),
        no_rope_layers,
        // qwen2/qwen3 write a `sliding_window` that only `use_sliding_window` (refused above) enables
        sliding_window: match (arch, c.sliding_window) {
            ("mistral" | "phi3" | "gemma2" | "gemma3", Some(0)) => {
                return Err(key_err(path, "sliding_window", "must be positive"))
            }
            ("gemma2" | "gemma3", None) => {
                return Err(key_err(
                    path,
                    "sliding_window",
                    "missing (Gemma's local layers need it)",
                ))
            }
            ("mistral" | "phi3" | "gemma2" | "gemma3", w) => w,
            _ => None,
        },
        ..ModelConfig::default()
    };
    if gemma {
        gemma_config(path, c, &mut config, params)?;
    }
    Ok(config)
}

/// Gemma's parameters from config.json: the global layers (`layer_types`, else every
/// `sliding_window_pattern`-th for Gemma 3 — default 6 — and every second for Gemma 2), the local rotary
/// base, the attention scale and the soft caps. Norm weights get 1 added (they scale by `1 + w`).
fn gemma_config(
    path: &Path,
    c: &HfConfig,
    cfg: &mut ModelConfig,
    params: Option<&Value>,
) -> Result<(), SourceError> {
    let (arch, layers, head_dim) = (cfg.architecture.as_str(), cfg.num_layers, cfg.head_dim);
    let global_layers = match (&c.layer_types, c.sliding_window_pattern) {
        (Some(types), _) => {
            if types.len() != layers {
                return Err(key_err(
                    path,
                    "layer_types",
                    format!("{} entries for {layers} layers", types.len()),
                ));
            }
            let mut global = Vec::new();
            for (i, ty) in types.iter().enumerate() {
                match ty.as_str() {
                    "full_attention" => global.push(i),
                    "sliding_attention" => {}
                    other => {
                        return Err(key_err(
                            path,
                            "layer_types",
                            format!("layer {i}: unknown kind `{other}`"),
                        ))
                    }
                }
            }
            global
        }
        (None, Some(0)) => return Err(key_err(path, "sliding_window_pattern", "must be positive")),
        (None, n) => {
            let n = n.unwrap_or(if arch == "gemma3" { 6 } else { 2 });
            (0..layers).filter(|i| i % n == n - 1).collect()
        }
    };
    let local_theta = params
        .and_then(|p| p.get("sliding_attention"))
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(c.rope_local_base_freq);
    let local_rope_theta = match (arch, local_theta) {
        (_, Some(t)) => t as f32,
        ("gemma3", None) => 10_000.0,
        _ => rope(path, c, params)?.0,
    };
    let scalar = c.query_pre_attn_scalar.unwrap_or(head_dim as f64);
    if !(scalar.is_finite() && scalar > 0.0) {
        return Err(key_err(path, "query_pre_attn_scalar", "must be positive"));
    }
    let cap = |v: Option<f64>, key: &str| match v {
        Some(c) if !(c.is_finite() && c > 0.0) => Err(key_err(path, key, "must be positive")),
        v => Ok(v.map(|c| c as f32)),
    };
    cfg.attn_softcap = cap(c.attn_logit_softcapping, "attn_logit_softcapping")?;
    cfg.final_softcap = cap(c.final_logit_softcapping, "final_logit_softcapping")?;
    cfg.norm_offset = 1.0;
    cfg.global_layers = global_layers;
    cfg.local_rope_theta = Some(local_rope_theta);
    cfg.attn_scale = Some(scalar.powf(-0.5) as f32);
    Ok(())
}

/// smollm3's layers without a rotary embedding: where `no_rope_layers` has a 0, else every
/// `no_rope_layer_interval`-th layer (transformers' default, 4).
fn no_rope_layers(path: &Path, c: &HfConfig, layers: usize) -> Result<Vec<usize>, SourceError> {
    match &c.no_rope_layers {
        Some(v) if v.len() != layers || v.iter().any(|&x| x > 1) => Err(key_err(
            path,
            "no_rope_layers",
            format!("must hold one 0 or 1 per layer ({layers}), got {v:?}"),
        )),
        Some(v) => Ok((0..layers).filter(|&i| v[i] == 0).collect()),
        None => match c.no_rope_layer_interval.unwrap_or(4) {
            0 => Err(key_err(path, "no_rope_layer_interval", "must be positive")),
            n => Ok((0..layers).filter(|i| (i + 1) % n == 0).collect()),
        },
    }
}

/// RoPE base and scaling, from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`.
fn rope(
    path: &Path,
    c: &HfConfig,
    params: Option<&Value>,
) -> Result<(f32, Option<RopeScaling>), SourceError> {
    let scaling = params.or(c.rope_scaling.as_ref().filter(|v| !v.is_null()));
    let key = if params.is_some() {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(c.rope_theta)
        .unwrap_or(10_000.0) as f32;
    let Some(s) = scaling else {
        return Ok((theta, None));
    };
    let ty = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64, SourceError> {
        s.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| key_err(path, &format!("{key}.{k}"), "missing or not a number"))
    };
    let scaling = match ty {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")? as f32,
        }),
        "longrope" | "su" => {
            let factors = |k: &str| -> Result<Vec<f32>, SourceError> {
                s.get(k)
                    .and_then(Value::as_array)
                    .and_then(|v| v.iter().map(|x| x.as_f64().map(|f| f as f32)).collect())
                    .ok_or_else(|| key_err(path, &format!("{key}.{k}"), "missing or not numbers"))
            };
            let original = s
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .or(c.original_max_position_embeddings)
                .ok_or_else(|| {
                    key_err(
                        path,
                        "original_max_position_embeddings",
                        "missing (LongRoPE)",
                    )
                })?;
            let max = c.max_position_embeddings.unwrap_or(original);
            let factor = s
                .get("factor")
                .and_then(Value::as_f64)
                .unwrap_or(max as f64 / original as f64);
            let attention_factor = match s.get("attention_factor").and_then(Value::as_f64) {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            Some(RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor: attention_factor as f32,
            })
        }
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")? as f32,
            low_freq_factor: num("low_freq_factor")? as f32,
            high_freq_factor: num("high_freq_factor")? as f32,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => {
            return Err(SourceError::Unsupported {
                path: show(path),
                what: format!("RoPE scaling `{other}` ({key})"),
            })
        }
    };
    Ok((theta, scaling))
}

/// phi3's fused `qkv_proj` and `gate_up_proj` weights as the canonical q/k/v and gate/up tensors
/// (row slices of the same bytes); `None` for every other tensor.
#[allow(clippy::type_complexity)]
fn split_fused(
    c: &ModelConfig,
    name: &str,
    t: &SourceTensor,
) -> Result<Option<Vec<(String, SourceTensor)>>, String> {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return Ok(None);
    };
    let Some((idx, suffix)) = rest.split_once('.') else {
        return Ok(None);
    };
    let Ok(i) = idx.parse::<usize>() else {
        return Ok(None);
    };
    let (q, kv, f) = (
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let rows: &[(&str, usize)] = match suffix {
        "self_attn.qkv_proj.weight" => &[
            ("attn_q.weight", q),
            ("attn_k.weight", kv),
            ("attn_v.weight", kv),
        ],
        "mlp.gate_up_proj.weight" => &[("ffn_gate.weight", f), ("ffn_up.weight", f)],
        _ => return Ok(None),
    };
    let total: usize = rows.iter().map(|r| r.1).sum();
    if t.shape.len() != 2 || t.shape[0] != total || t.dtype.block_elems() != 1 {
        return Err(format!(
            "tensor `{name}` {:?} {:?}: expected {total} rows of a float type to split into {}",
            t.dtype,
            t.shape,
            rows.iter().map(|r| r.0).collect::<Vec<_>>().join(", ")
        ));
    }
    let row_bytes = t.data.len() / total;
    let mut at = 0;
    Ok(Some(
        rows.iter()
            .map(|&(canon, n)| {
                let part = SourceTensor {
                    dtype: t.dtype,
                    shape: vec![n, t.shape[1]],
                    data: t.data.slice(at * row_bytes..(at + n) * row_bytes),
                };
                at += n;
                (canonical::blk(i, canon), part)
            })
            .collect(),
    ))
}

/// HF tensor name → canonical name, or `None` for names we do not know. Gemma's four norms a layer
/// take llama.cpp's Gemma names (its `post_attention_layernorm` follows the attention; llama's precedes
/// the MLP).
fn canonical_name(name: &str, gemma: bool) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some(canonical::TOKEN_EMBD.into()),
        "model.norm.weight" => return Some(canonical::OUTPUT_NORM.into()),
        "lm_head.weight" => return Some(canonical::OUTPUT.into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (idx, suffix) = rest.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    if i.to_string() != idx {
        return None; // "01", "+1": not a layer index HF writes
    }
    let gemma_norm = match suffix {
        "post_attention_layernorm.weight" => Some("post_attention_norm.weight"),
        "pre_feedforward_layernorm.weight" => Some("ffn_norm.weight"),
        "post_feedforward_layernorm.weight" => Some("post_ffw_norm.weight"),
        _ => None,
    };
    if let Some(s) = gemma_norm.filter(|_| gemma) {
        return Some(canonical::blk(i, s));
    }
    let s = match suffix {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(canonical::blk(i, s))
}

/// The safetensors files of the folder: those named by `model.safetensors.index.json`, else every
/// `*.safetensors` file.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| key_err(&index, "weight_map", "missing or not an object"))?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let f = file.as_str().ok_or_else(|| {
                key_err(&index, &format!("weight_map.{tensor}"), "not a file name")
            })?;
            if f.contains('/') || f.contains('\\') || f == ".." {
                return Err(key_err(
                    &index,
                    &format!("weight_map.{tensor}"),
                    format!("`{f}` is not a plain file name"),
                ));
            }
            files.insert(dir.join(f));
        }
        return Ok(files.into_iter().collect());
    }
    let rd = std::fs::read_dir(dir).map_err(|source| SourceError::Io {
        path: show(dir),
        source,
    })?;
    let mut files = Vec::new();
    for e in rd {
        let e = e.map_err(|source| SourceError::Io {
            path: show(dir),
            source,
        })?;
        let p = e.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(SourceError::Format {
            path: show(dir),
            detail: "no *.safetensors file".into(),
        });
    }
    Ok(files)
}

/// Maps every safetensors file and returns each tensor (HF name) with the file it came from.
pub(super) fn read_safetensors(
    dir: &Path,
) -> Result<BTreeMap<String, (PathBuf, SourceTensor)>, SourceError> {
    let mut out = BTreeMap::new();
    for file in safetensors_files(dir)? {
        let io = |source| SourceError::Io {
            path: show(&file),
            source,
        };
        let f = std::fs::File::open(&file).map_err(io)?;
        // SAFETY: read-only mapping; the file must not be modified while mapped (as for any mmap loader).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
        let bytes = Bytes::from_owner(map);
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| SourceError::Format {
                path: show(&file),
                detail: format!("safetensors: {e}"),
            })?;
        let base = bytes.as_ptr() as usize;
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => SourceDType::F32,
                safetensors::Dtype::F16 => SourceDType::F16,
                safetensors::Dtype::BF16 => SourceDType::BF16,
                other => {
                    return Err(SourceError::Unsupported {
                        path: show(&file),
                        what: format!("dtype {other:?} of tensor `{name}`"),
                    })
                }
            };
            let d = view.data();
            // The view borrows from `bytes`, so its offset is in range; checked anyway.
            let start = (d.as_ptr() as usize)
                .checked_sub(base)
                .filter(|s| s + d.len() <= bytes.len())
                .ok_or_else(|| SourceError::Format {
                    path: show(&file),
                    detail: format!("tensor `{name}` lies outside the mapping"),
                })?;
            let t = SourceTensor {
                dtype,
                shape: view.shape().to_vec(),
                data: bytes.slice(start..start + d.len()),
            };
            if out.insert(name.clone(), (file.clone(), t)).is_some() {
                return Err(SourceError::Format {
                    path: show(&file),
                    detail: format!("tensor `{name}` appears in more than one file"),
                });
            }
        }
    }
    Ok(out)
}

/// A token given as a string or as an AddedToken object (`{"content": ...}`) in tokenizer_config.json.
fn token_text(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// Ids from an int or a list of ints (`eos_token_id`).
fn ids_of(v: Option<&Value>) -> Vec<u64> {
    match v {
        Some(Value::Number(n)) => n.as_u64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).collect(),
        _ => Vec::new(),
    }
}

/// Resolves a token's text to its id through tokenizer.json's added tokens, then its model vocabulary.
fn token_id(tok: &Value, text: &str) -> Option<u32> {
    let added = tok
        .get("added_tokens")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter().find_map(|t| {
                (t.get("content").and_then(Value::as_str) == Some(text))
                    .then(|| t.get("id").and_then(Value::as_u64))
                    .flatten()
            })
        });
    added
        .or_else(|| {
            tok.get("model")
                .and_then(|m| m.get("vocab"))
                .and_then(|v| v.get(text))
                .and_then(Value::as_u64)
        })
        .and_then(|i| u32::try_from(i).ok())
}

/// Whether tokenizer.json's post-processor itself puts `bos` first in a single sequence.
fn post_processor_adds(tok: &Value, bos: &str) -> bool {
    fn check(p: &Value, bos: &str) -> bool {
        match p.get("type").and_then(Value::as_str) {
            Some("TemplateProcessing") => {
                p.get("single")
                    .and_then(Value::as_array)
                    .and_then(|s| s.first())
                    .and_then(|f| f.get("SpecialToken"))
                    .and_then(|st| st.get("id"))
                    .and_then(Value::as_str)
                    == Some(bos)
            }
            Some("Sequence") => p
                .get("processors")
                .and_then(Value::as_array)
                .is_some_and(|ps| ps.iter().any(|q| check(q, bos))),
            _ => false,
        }
    }
    tok.get("post_processor").is_some_and(|p| check(p, bos))
}

fn read_tokenizer(
    dir: &Path,
    cfg: &HfConfig,
    vocab_size: usize,
) -> Result<(TokenizerData, Option<onestep_format::GenerationDefaults>), SourceError> {
    let tok_path = dir.join("tokenizer.json");
    let tokenizer_json = read_text(&tok_path)?;
    tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes()).map_err(|e| {
        SourceError::Format {
            path: show(&tok_path),
            detail: format!("does not load: {e}"),
        }
    })?;
    let tok: Value = serde_json::from_str(&tokenizer_json).map_err(|e| SourceError::Format {
        path: show(&tok_path),
        detail: format!("invalid JSON: {e}"),
    })?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = read_json_opt(&tc_path)?.unwrap_or(Value::Null);
    let gc_path = dir.join("generation_config.json");
    let gc = read_json_opt(&gc_path)?;
    let cfg_path = dir.join("config.json");

    let resolve = |key: &str| -> Result<Option<u32>, SourceError> {
        match tc.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                let text =
                    token_text(v).ok_or_else(|| key_err(&tc_path, key, "not a token string"))?;
                token_id(&tok, text).map(Some).ok_or_else(|| {
                    key_err(
                        &tc_path,
                        key,
                        format!("token {text:?} is not in tokenizer.json"),
                    )
                })
            }
        }
    };
    let check_id = |path: &Path, key: &str, id: u64| -> Result<u32, SourceError> {
        u32::try_from(id)
            .ok()
            .filter(|&i| (i as usize) < vocab_size)
            .ok_or_else(|| {
                key_err(
                    path,
                    key,
                    format!("id {id} outside the vocabulary ({vocab_size})"),
                )
            })
    };

    // BOS: tokenizer_config.json (null means none), else config.json.
    let bos_id = match tc.get("bos_token") {
        Some(_) => resolve("bos_token")?,
        None => match ids_of(cfg.bos_token_id.as_ref()).first() {
            Some(&i) => Some(check_id(&cfg_path, "bos_token_id", i)?),
            None => None,
        },
    };
    // EOS: tokenizer_config.json, else config.json, else generation_config.json.
    let cfg_eos = ids_of(cfg.eos_token_id.as_ref());
    let gen_eos = ids_of(gc.as_ref().and_then(|g| g.get("eos_token_id")));
    let eos_id = match resolve("eos_token")? {
        Some(i) => i,
        None => match (cfg_eos.first(), gen_eos.first()) {
            (Some(&i), _) => check_id(&cfg_path, "eos_token_id", i)?,
            (None, Some(&i)) => check_id(&gc_path, "eos_token_id", i)?,
            (None, None) => {
                return Err(key_err(
                    &tc_path,
                    "eos_token",
                    "missing (and no eos_token_id in config.json or generation_config.json)",
                ))
            }
        },
    };
    let mut stop: BTreeSet<u32> = BTreeSet::from([eos_id]);
    for &i in &cfg_eos {
        stop.insert(check_id(&cfg_path, "eos_token_id", i)?);
    }
    for &i in &gen_eos {
        stop.insert(check_id(&gc_path, "eos_token_id", i)?);
    }

    let add_bos = match tc.get("add_bos_token") {
        Some(Value::Bool(b)) => *b,
        Some(Value::Null) | None => {
            let bos_text = tc.get("bos_token").and_then(token_text);
            bos_text.is_some_and(|b| post_processor_adds(&tok, b))
        }
        Some(_) => return Err(key_err(&tc_path, "add_bos_token", "not a bool")),
    };
    if add_bos && bos_id.is_none() {
        return Err(key_err(
            &tc_path,
            "bos_token",
            "missing, but add_bos_token is true",
        ));
    }

    let chat_template = chat_template(dir, &tc_path, &tc)?;

    let generation = match &gc {
        None => None,
        Some(g) => Some(generation_defaults(&gc_path, g)?),
    };
    Ok((
        TokenizerData {
            tokenizer_json,
            chat_template,
            bos_id,
            add_bos,
            eos_id,
            stop_ids: stop.into_iter().collect(),
        },
        generation,
    ))
}

/// Chat template: tokenizer_config.json's `chat_template` (a string, or a list of `{name, template}` of
/// which `default` is taken), else `chat_template.jinja`, else `chat_template.json`.
fn chat_template(dir: &Path, tc_path: &Path, tc: &Value) -> Result<Option<String>, SourceError> {
    match tc.get("chat_template") {
        Some(Value::String(s)) => return Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let found = list.iter().find_map(|e| {
                (e.get("name").and_then(Value::as_str) == Some("default"))
                    .then(|| e.get("template").and_then(Value::as_str))
                    .flatten()
            });
            return found.map(|s| Some(s.to_string())).ok_or_else(|| {
                key_err(
                    tc_path,
                    "chat_template",
                    "list without a `default` template",
                )
            });
        }
        Some(Value::Null) | None => {}
        Some(_) => {
            return Err(key_err(
                tc_path,
                "chat_template",
                "neither a string nor a list",
            ))
        }
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return read_text(&jinja).map(Some);
    }
    let json_path = dir.join("chat_template.json");
    if let Some(v) = read_json_opt(&json_path)? {
        return match v.get("chat_template") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(key_err(
                &json_path,
                "chat_template",
                "missing or not a string",
            )),
        };
    }
    Ok(None)
}

/// generation_config.json → defaults, with transformers' semantics: without `do_sample: true` decoding
/// is greedy; when sampling, absent `temperature`/`top_k`/`top_p` take transformers' defaults (1.0, 50,
/// 1.0).
fn generation_defaults(
    path: &Path,
    g: &Value,
) -> Result<onestep_format::GenerationDefaults, SourceError> {
    let mut d = onestep_format::GenerationDefaults::default();
    let num = |k: &str| -> Result<Option<f64>, SourceError> {
        match g.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| key_err(path, k, "not a number")),
        }
    };
    let do_sample = match g.get("do_sample") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(key_err(path, "do_sample", "not a bool")),
    };
    if do_sample {
        d.temperature = num("temperature")?.unwrap_or(1.0) as f32;
        d.top_k = match num("top_k")? {
            None => 50,
            Some(k) if k >= 0.0 && k.fract() == 0.0 && k <= u32::MAX as f64 => k as u32,
            Some(k) => return Err(key_err(path, "top_k", format!("{k} is not a count"))),
        };
        d.top_p = num("top_p")?.unwrap_or(1.0) as f32;
        if !(d.top_p > 0.0 && d.top_p <= 1.0) {
            return Err(key_err(
                path,
                "top_p",
                format!("{} is outside (0, 1]", d.top_p),
            ));
        }
    } else {
        d.temperature = 0.0;
    }
    if let Some(n) = num("max_new_tokens")? {
        if n >= 1.0 && n.fract() == 0.0 && n <= u32::MAX as f64 {
            d.max_new_tokens = n as u32;
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use crate::source::testutil::noise;
    use safetensors::tensor::TensorView;
    use serde_json::json;

    use super::*;
    use crate::source::tokenizer::{from_gguf, GgufVocab};

    /// A fresh, empty folder under the system temp dir (removed on drop).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "onestep-hf-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    const H: usize = 16;
    const F: usize = 24;
    const HEADS: usize = 4;
    const KV: usize = 2;
    const HD: usize = 4;
    const VOCAB: usize = 8;

    /// One HF tensor: (name, dtype, shape, bytes).
    type HfTensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

    /// HF tensors of a tiny model.
    fn hf_tensors(bias: bool, lm_head: bool, dtype: safetensors::Dtype) -> Vec<HfTensor> {
        let esz = dtype.bitsize() / 8;
        let mut v = Vec::new();
        let mut add = |name: String, shape: Vec<usize>| {
            let n = shape.iter().product::<usize>() * esz;
            let seed = v.len() as u64 + 1;
            v.push((name, dtype, shape, noise(n, seed)));
        };
        add("model.embed_tokens.weight".into(), vec![VOCAB, H]);
        add("model.norm.weight".into(), vec![H]);
        if lm_head {
            add("lm_head.weight".into(), vec![VOCAB, H]);
        }
        for i in 0..2 {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            add(p("input_layernorm.weight"), vec![H]);
            add(p("self_attn.q_proj.weight"), vec![HEADS * HD, H]);
            add(p("self_attn.k_proj.weight"), vec![KV * HD, H]);
            add(p("self_attn.v_proj.weight"), vec![KV * HD, H]);
            if bias {
                add(p("self_attn.q_proj.bias"), vec![HEADS * HD]);
                add(p("self_attn.k_proj.bias"), vec![KV * HD]);
                add(p("self_attn.v_proj.bias"), vec![KV * HD]);
            }
            add(p("self_attn.o_proj.weight"), vec![H, HEADS * HD]);
            add(p("post_attention_layernorm.weight"), vec![H]);
            add(p("mlp.gate_proj.weight"), vec![F, H]);
            add(p("mlp.up_proj.weight"), vec![F, H]);
            add(p("mlp.down_proj.weight"), vec![H, F]);
        }
        v
    }

    fn write_safetensors(path: &Path, ts: &[HfTensor]) {
        let views: Vec<(String, TensorView<'_>)> = ts
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
            .collect();
        let bytes = safetensors::serialize(views, None).expect("serialize");
        std::fs::write(path, bytes).expect("write safetensors");
    }

    fn tokenizer_json() -> String {
        let v = GgufVocab {
            model: "gpt2".into(),
            pre: Some("gpt-2".into()),
            tokens: ["<s>", "</s>", "<|im_end|>", "a", "b", "ab", "Ġ", "Ġa"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            token_types: Some(vec![3, 3, 3, 1, 1, 1, 1, 1]),
            merges: Some(vec!["a b".into(), "Ġ a".into()]),
            eos_id: Some(1),
            ..Default::default()
        };
        from_gguf("test", &v).expect("tokenizer").tokenizer_json
    }

    fn config(model_type: &str) -> Value {
        json!({
            "architectures": ["X"],
            "model_type": model_type,
            "hidden_size": H,
            "intermediate_size": F,
            "num_hidden_layers": 2,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV,
            "vocab_size": VOCAB,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 128,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            "tie_word_embeddings": false,
            "hidden_act": "silu",
            "eos_token_id": 1,
        })
    }

    fn write_json(path: PathBuf, v: &Value) {
        std::fs::write(path, serde_json::to_string_pretty(v).expect("json")).expect("write json");
    }

    /// A complete tiny llama folder.
    fn folder(tag: &str) -> (TempDir, Vec<HfTensor>) {
        let d = TempDir::new(tag);
        let ts = hf_tensors(false, true, safetensors::Dtype::BF16);
        write_safetensors(&d.0.join("model.safetensors"), &ts);
        write_json(d.0.join("config.json"), &config("llama"));
        std::fs::write(d.0.join("tokenizer.json"), tokenizer_json()).expect("write");
        write_json(
            d.0.join("tokenizer_config.json"),
            &json!({
                "bos_token": "<s>",
                "eos_token": {"content": "<|im_end|>", "special": true},
                "add_bos_token": true,
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
            }),
        );
        write_json(
            d.0.join("generation_config.json"),
            &json!({"do_sample": true, "temperature": 0.7, "top_p": 0.9, "eos_token_id": [1, 2]}),
        );
        (d, ts)
    }

    #[test]
    fn reads_a_tiny_llama_folder() {
        let (d, ts) = folder("llama");
        let m = read(&d.0).expect("reads");
        let c = &m.config;
        assert_eq!(c.architecture, "llama");
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_layers),
            (H, F, 2)
        );
        assert_eq!(
            (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size),
            (HEADS, KV, HD, VOCAB)
        );
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64
            })
        );
        assert!(!c.tie_word_embeddings && !c.rope_interleaved && !c.attention_bias);
        assert_eq!(m.tensors.len(), ts.len());
        for (name, _, shape, bytes) in &ts {
            let canon = canonical_name(name, false).expect("known name");
            let t = &m.tensors[&canon];
            assert_eq!(t.dtype, SourceDType::BF16);
            assert_eq!(&t.shape, shape, "{name}");
            assert_eq!(t.data.as_ref(), bytes.as_slice(), "{name}");
        }
        assert!(m.tensors.contains_key("blk.1.ffn_down.weight"));
        let t = &m.tokenizer;
        assert_eq!((t.bos_id, t.eos_id, t.add_bos), (Some(0), 2, true));
        assert_eq!(t.stop_ids, vec![1, 2]);
        assert_eq!(t.chat_template.as_deref(), Some("D"));
        assert_eq!(t.tokenizer_json, tokenizer_json());
        let g = m.generation.expect("generation defaults");
        assert_eq!((g.temperature, g.top_k, g.top_p), (0.7, 50, 0.9));
    }

    #[test]
    fn greedy_without_do_sample_and_string_template() {
        let (d, _) = folder("greedy");
        write_json(
            d.0.join("generation_config.json"),
            &json!({"temperature": 0.6, "eos_token_id": 2}),
        );
        write_json(
            d.0.join("tokenizer_config.json"),
            &json!({"bos_token": null, "eos_token": "</s>", "chat_template": "S"}),
        );
        let m = read(&d.0).expect("reads");
        let g = m.generation.expect("defaults");
        assert_eq!(g.temperature, 0.0);
        assert_eq!((m.tokenizer.bos_id, m.tokenizer.add_bos), (None, false));
        assert_eq!(m.tokenizer.eos_id, 1);
        assert_eq!(m.tokenizer.stop_ids, vec![1, 2]);
        assert_eq!(m.tokenizer.chat_template.as_deref(), Some("S"));
        // Without generation_config.json there are no defaults.
        std::fs::remove_file(d.0.join("generation_config.json")).expect("rm");
        assert!(read(&d.0).expect("reads").generation.is_none());
    }

    #[test]
    fn sharded_qwen2_with_index_and_tied_embeddings() {
        let d = TempDir::new("qwen2");
        let ts = hf_tensors(true, false, safetensors::Dtype::F16);
        let (a, b) = ts.split_at(ts.len() / 2);
        write_safetensors(&d.0.join("model-00001-of-00002.safetensors"), a);
        write_safetensors(&d.0.join("model-00002-of-00002.safetensors"), b);
        let mut map = serde_json::Map::new();
        for (n, _, _, _) in a {
            map.insert(n.clone(), json!("model-00001-of-00002.safetensors"));
        }
        for (n, _, _, _) in b {
            map.insert(n.clone(), json!("model-00002-of-00002.safetensors"));
        }
        write_json(
            d.0.join("model.safetensors.index.json"),
            &json!({"weight_map": map}),
        );
        let mut cfg = config("qwen2");
        let o = cfg.as_object_mut().expect("object");
        o.remove("rope_parameters");
        o.insert("rope_theta".into(), json!(1e6));
        o.insert("tie_word_embeddings".into(), json!(true));
        write_json(d.0.join("config.json"), &cfg);
        std::fs::write(d.0.join("tokenizer.json"), tokenizer_json()).expect("write");
        let m = read(&d.0).expect("reads");
        let c = &m.config;
        assert_eq!(c.architecture, "qwen2");
        assert!(c.attention_bias && c.tie_word_embeddings && !c.rope_interleaved);
        assert_eq!((c.rope_theta, c.rope_scaling.clone()), (1e6, None));
        assert_eq!(m.tensors["blk.1.attn_k.bias"].shape, vec![KV * HD]);
        assert_eq!(m.tensors["blk.0.attn_q.weight"].dtype, SourceDType::F16);
        assert!(!m.tensors.contains_key("output.weight"));
        // No tokenizer_config.json: EOS from config.json, no BOS.
        assert_eq!((m.tokenizer.eos_id, m.tokenizer.bos_id), (1, None));
    }

    #[test]
    fn errors_name_file_key_and_tensor() {
        // Missing required key.
        let (d, _) = folder("key");
        let mut cfg = config("llama");
        cfg.as_object_mut().expect("object").remove("rms_norm_eps");
        write_json(d.0.join("config.json"), &cfg);
        match read(&d.0) {
            Err(SourceError::Key { path, key, .. }) => {
                assert_eq!(key, "rms_norm_eps");
                assert!(path.ends_with("config.json"), "{path}");
            }
            other => panic!("{other:?}"),
        }
        // Missing file.
        std::fs::remove_file(d.0.join("config.json")).expect("rm");
        match read(&d.0) {
            Err(SourceError::Io { path, .. }) => assert!(path.ends_with("config.json")),
            other => panic!("{other:?}"),
        }
        // Unsupported architecture.
        write_json(d.0.join("config.json"), &config("gemma"));
        assert!(
            matches!(read(&d.0), Err(SourceError::Unsupported { what, .. }) if what.contains("gemma"))
        );

        // Unsupported dtype names the tensor.
        let (d, mut ts) = folder("dtype");
        let (name, dt, shape, bytes) = &mut ts[1];
        *dt = safetensors::Dtype::I32;
        bytes.resize(shape.iter().product::<usize>() * 4, 1);
        let name = name.clone();
        write_safetensors(&d.0.join("model.safetensors"), &ts);
        match read(&d.0) {
            Err(SourceError::Unsupported { what, .. }) => assert!(what.contains(&name), "{what}"),
            other => panic!("{other:?}"),
        }

        // Shape disagreeing with the config.
        let (d, _) = folder("shape");
        let mut cfg = config("llama");
        cfg["intermediate_size"] = json!(F + 8);
        write_json(d.0.join("config.json"), &cfg);
        match read(&d.0) {
            Err(SourceError::Shape {
                tensor, expected, ..
            }) => {
                assert_eq!(tensor, "blk.0.ffn_gate.weight");
                assert_eq!(expected, vec![F + 8, H]);
            }
            other => panic!("{other:?}"),
        }

        // Unknown EOS token text.
        let (d, _) = folder("eos");
        write_json(
            d.0.join("tokenizer_config.json"),
            &json!({"eos_token": "<nope>"}),
        );
        match read(&d.0) {
            Err(SourceError::Key { key, path, .. }) => {
                assert_eq!(key, "eos_token");
                assert!(path.ends_with("tokenizer_config.json"));
            }
            other => panic!("{other:?}"),
        }

        // A truncated safetensors file.
        let (d, _) = folder("trunc");
        let p = d.0.join("model.safetensors");
        let bytes = std::fs::read(&p).expect("read");
        for cut in [0, 7, 100, bytes.len() - 1] {
            std::fs::write(&p, &bytes[..cut]).expect("write");
            assert!(
                matches!(read(&d.0), Err(SourceError::Format { .. })),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn phi3_longrope_and_its_attention_factor() {
        let c: HfConfig = serde_json::from_str(
            r#"{"model_type": "phi3", "max_position_embeddings": 256,
                "original_max_position_embeddings": 64, "rope_theta": 10000.0,
                "rope_scaling": {"type": "longrope", "short_factor": [1, 2], "long_factor": [3, 4]}}"#,
        )
        .unwrap();
        let (theta, s) = rope(Path::new("config.json"), &c, None).unwrap();
        let Some(RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
        }) = s
        else {
            panic!("{s:?}")
        };
        assert_eq!(
            (theta, short_factor, long_factor),
            (1e4, vec![1.0, 2.0], vec![3.0, 4.0])
        );
        assert_eq!(original_max_position_embeddings, 64);
        // sqrt(1 + ln(256 / 64) / ln 64)
        assert!(
            (attention_factor - 1.154_700_5).abs() < 1e-6,
            "{attention_factor}"
        );
    }

    #[test]
    fn phi3_fused_projections_split_into_rows() {
        let mut c = model_config(
            Path::new("config.json"),
            &serde_json::from_str(
                r#"{"model_type": "phi3", "hidden_size": 8, "intermediate_size": 4,
                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "vocab_size": 10, "rms_norm_eps": 1e-5, "max_position_embeddings": 16}"#,
            )
            .unwrap(),
        )
        .unwrap();
        c.tie_word_embeddings = true;
        let t = SourceTensor {
            dtype: SourceDType::F32,
            shape: vec![16, 8], // q 8 + k 4 + v 4 rows
            data: Bytes::from((0..16 * 8 * 4).map(|i| i as u8).collect::<Vec<u8>>()),
        };
        let parts = split_fused(&c, "model.layers.0.self_attn.qkv_proj.weight", &t)
            .unwrap()
            .unwrap();
        let names: Vec<_> = parts.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "blk.0.attn_q.weight",
                "blk.0.attn_k.weight",
                "blk.0.attn_v.weight"
            ]
        );
        assert_eq!(parts[1].1.shape, [4, 8]);
        assert_eq!(parts[1].1.data[..], t.data[8 * 32..12 * 32]);
        let bad = SourceTensor {
            shape: vec![12, 8],
            ..t.clone()
        };
        let e = split_fused(&c, "model.layers.0.mlp.gate_up_proj.weight", &bad).unwrap_err();
        assert!(e.contains("gate_up_proj") && e.contains("8 rows"), "{e}");
    }

    #[test]
    fn smollm3_no_rope_layers_from_the_list_or_the_interval() {
        let cfg = |extra: &str| -> HfConfig {
            serde_json::from_str(&format!("{{\"model_type\": \"smollm3\"{extra}}}")).unwrap()
        };
        let p = Path::new("config.json");
        let got = no_rope_layers(p, &cfg(r#", "no_rope_layers": [1, 0, 1, 0]"#), 4).unwrap();
        assert_eq!(got, [1, 3]);
        assert_eq!(no_rope_layers(p, &cfg(""), 8).unwrap(), [3, 7]);
        let got = no_rope_layers(p, &cfg(r#", "no_rope_layer_interval": 2"#), 4).unwrap();
        assert_eq!(got, [1, 3]);
        for bad in [
            r#", "no_rope_layers": [1, 0]"#,
            r#", "no_rope_layers": [1, 2, 1, 1]"#,
        ] {
            let e = no_rope_layers(p, &cfg(bad), 4).unwrap_err().to_string();
            assert!(e.contains("no_rope_layers"), "{e}");
        }
    }

    /// Gemma's config: global layers from `layer_types` or the pattern, the local rotary base from
    /// transformers 5's per-kind `rope_parameters`, the scale from `query_pre_attn_scalar`, the `1 + w`
    /// norm offset; a bad layer list, an exact GELU and a missing window are refused by key.
    #[test]
    fn gemma_config_from_either_transformers_form() {
        let p = Path::new("config.json");
        let cfg = |extra: &str| -> HfConfig {
            serde_json::from_str(&format!(
                r#"{{"model_type": "gemma3_text", "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 8, "vocab_size": 32, "rms_norm_eps": 1e-6,
                "max_position_embeddings": 64, "query_pre_attn_scalar": 16,
                "hidden_activation": "gelu_pytorch_tanh"{extra}}}"#
            ))
            .unwrap()
        };
        let c = model_config(
            p,
            &cfg(r#", "sliding_window": 4, "sliding_window_pattern": 2,
            "rope_theta": 1e6, "rope_local_base_freq": 1e4"#),
        )
        .unwrap();
        assert_eq!(
            (c.architecture.as_str(), c.sliding_window),
            ("gemma3", Some(4))
        );
        assert!(c.qk_norm);
        assert_eq!(c.global_layers, [1, 3]);
        assert_eq!((c.rope_theta, c.local_rope_theta), (1e6, Some(1e4)));
        assert_eq!((c.attn_scale, c.norm_offset), (Some(0.25), 1.0));
        let five = r#", "sliding_window": 4, "layer_types": ["sliding_attention",
            "sliding_attention", "full_attention", "sliding_attention"], "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}"#;
        let c = model_config(p, &cfg(five)).unwrap();
        assert_eq!(c.global_layers, [2]);
        assert_eq!((c.rope_theta, c.local_rope_theta), (1e6, Some(1e4)));
        for (extra, key) in [
            (
                r#", "sliding_window": 4, "layer_types": ["full_attention"]"#,
                "layer_types",
            ),
            (
                r#", "sliding_window": 4, "layer_types": ["a", "b", "c", "d"]"#,
                "layer_types",
            ),
            ("", "sliding_window"),
        ] {
            match model_config(p, &cfg(extra)) {
                Err(SourceError::Key { key: k, .. }) => assert_eq!(k, key, "{extra}"),
                other => panic!("{extra}: {other:?}"),
            }
        }
        let exact = cfg(r#", "sliding_window": 4"#);
        let exact = HfConfig {
            hidden_activation: Some("gelu".into()),
            ..exact
        };
        match model_config(p, &exact) {
            Err(SourceError::Unsupported { what, .. }) => {
                assert!(what.contains("hidden_activation `gelu`"), "{what}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_tensor_names_are_refused() {
        let (d, mut ts) = folder("unknown");
        ts.push((
            "model.layers.0.self_attn.q_norm.weight".into(),
            safetensors::Dtype::BF16,
            vec![HD],
            noise(HD * 2, 9),
        ));
        ts.push((
            "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
            safetensors::Dtype::F32,
            vec![2],
            noise(8, 9),
        ));
        write_safetensors(&d.0.join("model.safetensors"), &ts);
        match read(&d.0) {
            Err(SourceError::Unsupported { what, .. }) => {
                assert!(what.contains("q_norm"), "{what}")
            }
            other => panic!("{other:?}"),
        }
    }
}
