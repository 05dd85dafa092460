//! Hugging Face folder reader: `config.json`, one or many `*.safetensors` (memory-mapped, zero-copy),
//! `tokenizer.json` (verbatim), `tokenizer_config.json`, and the optional `generation_config.json`.
//!
//! The family is found by `model_type` (else `architectures[0]`) in [`crate::arch::ARCHS`]; this module
//! reads the keys every family shares and lets the family read its own ([`HfKeys`]). Tensor names are
//! mapped to the canonical (GGUF) names of [`super::canonical`], the family first; shapes stay
//! `[out, in]`.

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
use crate::arch::{family, Arch};

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

/// The `config.json` fields every family shares (names as written by transformers 4.x and 5.x).
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
    /// LongRoPE (classic form): the pretrained context.
    original_max_position_embeddings: Option<usize>,
    /// The share of each head that rotates.
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

/// Reads a Hugging Face folder of any family in [`crate::arch::ARCHS`] into a [`SourceModel`].
pub fn read(dir: &Path) -> Result<SourceModel, SourceError> {
    let config_path = dir.join("config.json");
    let text = read_text(&config_path)?;
    let invalid = |e: serde_json::Error| SourceError::Format {
        path: show(&config_path),
        detail: format!("invalid config: {e}"),
    };
    let raw: HfConfig = serde_json::from_str(&text).map_err(invalid)?;
    let json: Value = serde_json::from_str(&text).map_err(invalid)?;
    let tensors_raw = read_safetensors(dir)?;
    let (arch, mut config) = model_config(&config_path, &raw, &json)?;

    // Map names; decide tying from the config, else from the presence of `lm_head.weight`.
    let has_lm_head = tensors_raw.contains_key("lm_head.weight");
    config.tie_word_embeddings = raw.tie_word_embeddings.unwrap_or(!has_lm_head);
    let tensors = canonical_tensors(arch, &config, tensors_raw)?;
    check::check_tensors(&show(dir), arch, &config, &tensors)?;

    let (tokenizer, generation) = read_tokenizer(dir, &raw, config.vocab_size)?;
    Ok(SourceModel {
        origin: show(dir),
        config,
        tensors,
        tokenizer,
        generation,
    })
}

/// The folder's tensors by canonical name: a layer tensor the family names or stores its own way
/// (`Arch::hf_layer_tensor`), else the common names; an unknown name is refused, naming its file.
fn canonical_tensors(
    arch: &dyn Arch,
    config: &ModelConfig,
    raw: BTreeMap<String, (PathBuf, SourceTensor)>,
) -> Result<BTreeMap<String, SourceTensor>, SourceError> {
    let mut tensors = BTreeMap::new();
    for (name, (file, t)) in raw {
        let unsupported = |what| SourceError::Unsupported {
            path: show(&file),
            what,
        };
        if let Some((i, suffix)) = layer_of(&name) {
            let parts = arch.hf_layer_tensor(config, &name, i, suffix, &t);
            if let Some(parts) = parts.map_err(unsupported)? {
                tensors.extend(parts);
                continue;
            }
        }
        let Some(canon) = canonical_name(&name) else {
            if name.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            return Err(unsupported(format!(
                "tensor `{name}` (no counterpart in the supported architectures)"
            )));
        };
        if canon == canonical::OUTPUT && config.tie_word_embeddings {
            continue;
        }
        tensors.insert(canon, t);
    }
    Ok(tensors)
}

/// config.json's keys for a family's own reading (`Arch::read_hf`): typed look-ups whose errors name
/// the file and the key; an absent key and `null` both read as `None`.
pub struct HfKeys<'a> {
    path: &'a Path,
    json: &'a Value,
}

impl<'a> HfKeys<'a> {
    /// The keys of `json`, read from `path`.
    pub fn new(path: &'a Path, json: &'a Value) -> Self {
        HfKeys { path, json }
    }
    /// The value of `key`, if present and not `null`.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }
    /// An error naming the file and `key`.
    pub fn err(&self, key: &str, detail: impl Into<String>) -> SourceError {
        key_err(self.path, key, detail)
    }
    /// A refusal of something the exporter does not build, naming the file.
    pub fn unsupported(&self, what: String) -> SourceError {
        SourceError::Unsupported {
            path: show(self.path),
            what,
        }
    }
    /// A non-negative integer.
    pub fn usize(&self, key: &str) -> Result<Option<usize>, SourceError> {
        self.typed(key, "a non-negative integer", |v| {
            v.as_u64().and_then(|x| usize::try_from(x).ok())
        })
    }
    /// A positive integer (0 is an error).
    pub fn positive(&self, key: &str) -> Result<Option<usize>, SourceError> {
        match self.usize(key)? {
            Some(0) => Err(self.err(key, "must be positive")),
            v => Ok(v),
        }
    }
    /// A number.
    pub fn f64(&self, key: &str) -> Result<Option<f64>, SourceError> {
        self.typed(key, "a number", Value::as_f64)
    }
    /// A string.
    pub fn str(&self, key: &str) -> Result<Option<&'a str>, SourceError> {
        self.typed(key, "a string", Value::as_str)
    }
    /// A list of strings.
    pub fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>, SourceError> {
        self.typed(key, "a list of strings", |v| {
            v.as_array()?.iter().map(Value::as_str).collect()
        })
    }
    fn typed<T>(
        &self,
        key: &str,
        what: &str,
        f: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, SourceError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => f(v)
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected {what}, got {v}"))),
        }
    }
}

/// The family of `c`: by `model_type`, else by `architectures[0]`; an unknown one is refused with the
/// supported names (a related model a family does not build, with the family's reason).
fn detect(path: &Path, c: &HfConfig) -> Result<&'static dyn Arch, SourceError> {
    let unsupported = |what| SourceError::Unsupported {
        path: show(path),
        what,
    };
    match (
        c.model_type.as_deref(),
        c.architectures.first().map(String::as_str),
    ) {
        (Some(t), _) => family::find_hf_model_type(t).ok_or_else(|| match family::hf_refusal(t) {
            Some(why) => unsupported(format!("model_type `{t}` ({why})")),
            None => unsupported(format!(
                "architecture `{t}` (supported model_type values: {})",
                family::supported(|a| a.hf_model_types())
            )),
        }),
        (None, Some(class)) => family::find_hf_class(class).ok_or_else(|| {
            unsupported(format!(
                "architecture `{class}` (supported architectures: {})",
                family::supported(|a| a.hf_classes())
            ))
        }),
        (None, None) => Err(key_err(path, "model_type", "missing")),
    }
}

/// The config of `c` (`json` the same file, for the family's own keys) and its family.
fn model_config(
    path: &Path,
    c: &HfConfig,
    json: &Value,
) -> Result<(&'static dyn Arch, ModelConfig), SourceError> {
    let arch = detect(path, c)?;
    let req = |v: Option<usize>, key: &str| -> Result<usize, SourceError> {
        match v {
            Some(0) => Err(key_err(path, key, "must be positive")),
            Some(x) => Ok(x),
            None => Err(key_err(path, key, "missing")),
        }
    };
    let hidden_size = req(c.hidden_size, "hidden_size")?;
    let num_heads = req(c.num_attention_heads, "num_attention_heads")?;
    let (num_kv_heads, head_dim) = heads(path, c, hidden_size, num_heads)?;
    let keys = HfKeys::new(path, json);
    check_activation(&keys, arch)?;
    for (key, on) in [
        ("mlp_bias", c.mlp_bias),
        ("use_sliding_window", c.use_sliding_window),
    ] {
        if on == Some(true) {
            return Err(keys.unsupported(format!("{key} = true")));
        }
    }
    let rms_eps = c
        .rms_norm_eps
        .ok_or_else(|| key_err(path, "rms_norm_eps", "missing"))? as f32;
    let (rope_theta, rope_scaling) = global_rope(path, c, head_dim)?;
    let mut config = ModelConfig {
        architecture: arch.name().into(),
        hidden_size,
        intermediate_size: req(c.intermediate_size, "intermediate_size")?,
        num_layers: req(c.num_hidden_layers, "num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size: req(c.vocab_size, "vocab_size")?,
        rms_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings: req(c.max_position_embeddings, "max_position_embeddings")?,
        tie_word_embeddings: false, // decided by the caller, which sees the tensors
        attention_bias: c.attention_bias == Some(true),
        rope_interleaved: false,
        ..ModelConfig::default()
    };
    arch.read_hf(&keys, &mut config)?;
    Ok((arch, config))
}

/// KV heads (dividing the heads) and the head size (`head_dim`, else hidden / heads).
fn heads(
    path: &Path,
    c: &HfConfig,
    hidden_size: usize,
    num_heads: usize,
) -> Result<(usize, usize), SourceError> {
    let num_kv_heads = match c.num_key_value_heads.unwrap_or(num_heads) {
        0 => return Err(key_err(path, "num_key_value_heads", "must be positive")),
        n => n,
    };
    if !num_heads.is_multiple_of(num_kv_heads) {
        return Err(key_err(
            path,
            "num_key_value_heads",
            format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
        ));
    }
    let head_dim = match c.head_dim {
        Some(0) => return Err(key_err(path, "head_dim", "must be positive")),
        Some(d) => d,
        None if hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
        None => {
            return Err(key_err(
                path,
                "num_attention_heads",
                format!("{num_heads} does not divide hidden_size {hidden_size}"),
            ))
        }
    };
    Ok((num_kv_heads, head_dim))
}

/// The MLP activation, from the first of the family's keys present, must be one the family computes.
fn check_activation(keys: &HfKeys<'_>, arch: &dyn Arch) -> Result<(), SourceError> {
    let (names, takes) = arch.hf_activation();
    for &key in names {
        if let Some(act) = keys.str(key)? {
            if !takes.contains(&act) {
                return Err(keys.unsupported(format!(
                    "{key} `{act}` (a `{}` model takes `{}`)",
                    arch.name(),
                    takes[0]
                )));
            }
            return Ok(());
        }
    }
    Ok(())
}

/// The rotary base and scaling of the layers that attend the whole context (transformers 5 may keep
/// one `rope_parameters` entry per layer kind), with LongRoPE's factors checked against the head size;
/// a partial rotation is refused.
fn global_rope(
    path: &Path,
    c: &HfConfig,
    head_dim: usize,
) -> Result<(f32, Option<RopeScaling>), SourceError> {
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
    Ok((rope_theta, rope_scaling))
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

/// `model.layers.{i}.{suffix}` → `(i, suffix)`, for the index as HF writes it (not "01", "+1").
fn layer_of(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (idx, suffix) = rest.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    (i.to_string() == idx).then_some((i, suffix))
}

/// HF tensor name → canonical name in the common (llama) naming, or `None` for names it lacks.
fn canonical_name(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some(canonical::TOKEN_EMBD.into()),
        "model.norm.weight" => return Some(canonical::OUTPUT_NORM.into()),
        "lm_head.weight" => return Some(canonical::OUTPUT.into()),
        _ => {}
    }
    let (i, suffix) = layer_of(name)?;
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
            let canon = canonical_name(name).expect("known name");
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
        // Unsupported architecture: named, with the supported ones.
        write_json(d.0.join("config.json"), &config("gemma"));
        match read(&d.0) {
            Err(SourceError::Unsupported { what, .. }) => {
                assert!(what.contains("`gemma`") && what.contains("qwen3"), "{what}")
            }
            other => panic!("{other:?}"),
        }

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

    /// Gemma's config: global layers from `layer_types` or the pattern, the local rotary base from
    /// transformers 5's per-kind `rope_parameters`, the scale from `query_pre_attn_scalar`, the `1 + w`
    /// norm offset; a bad layer list, an exact GELU and a missing window are refused by key.
    #[test]
    fn gemma_config_from_either_transformers_form() {
        let cfg = |extra: &str| -> Result<ModelConfig, SourceError> {
            config_of(&format!(
                r#"{{"model_type": "gemma3_text", "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 8, "vocab_size": 32, "rms_norm_eps": 1e-6,
                "max_position_embeddings": 64, "query_pre_attn_scalar": 16{extra}}}"#
            ))
        };
        let act = r#", "hidden_activation": "gelu_pytorch_tanh""#;
        let c = cfg(&format!(
            r#"{act}, "sliding_window": 4, "sliding_window_pattern": 2,
            "rope_theta": 1e6, "rope_local_base_freq": 1e4"#
        ))
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
        let c = cfg(&format!("{act}{five}")).unwrap();
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
            (
                r#", "sliding_window": 4, "sliding_window_pattern": 0"#,
                "sliding_window_pattern",
            ),
            (
                r#", "sliding_window": 4, "attn_logit_softcapping": -1"#,
                "attn_logit_softcapping",
            ),
            ("", "sliding_window"),
        ] {
            match cfg(&format!("{act}{extra}")) {
                Err(SourceError::Key { key: k, .. }) => assert_eq!(k, key, "{extra}"),
                other => panic!("{extra}: {other:?}"),
            }
        }
        let exact = r#", "hidden_activation": "gelu", "hidden_act": "gelu_pytorch_tanh",
            "sliding_window": 4"#;
        match cfg(exact) {
            Err(SourceError::Unsupported { what, .. }) => {
                assert!(what.contains("hidden_activation `gelu`"), "{what}")
            }
            other => panic!("{other:?}"),
        }
        // The multimodal Gemma 3 is refused by name, saying which model_type is read.
        match config_of(r#"{"model_type": "gemma3"}"#) {
            Err(SourceError::Unsupported { what, .. }) => {
                assert!(what.contains("gemma3_text"), "{what}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// `model_config` of a config.json text.
    fn config_of(text: &str) -> Result<ModelConfig, SourceError> {
        let c: HfConfig = serde_json::from_str(text).unwrap();
        let json: Value = serde_json::from_str(text).unwrap();
        model_config(Path::new("config.json"), &c, &json).map(|(_, c)| c)
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
