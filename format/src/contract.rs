//! The exporter ↔ runtime contract: graph input/output names, metadata keys and the format version.
//!
//! Both sides use only this module, so a name can never drift between them. `docs/GRAPH.md` describes
//! the graph that these names belong to.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::graph::DType;

/// Version of the step-graph contract written by the exporter and accepted by the runtime.
pub const FORMAT_VERSION: u32 = 1;

/// Default-domain opset the exporter writes (RMSNormalization, RotaryEmbedding, Attention need 23).
pub const OPSET: i64 = 23;
/// Microsoft contrib domain (`MatMulNBits`).
pub const MS_DOMAIN: &str = "com.microsoft";
/// Version of the contrib domain imported.
pub const MS_OPSET: i64 = 1;

/// Graph input: token ids, int64 `[1, T]`.
pub const INPUT_IDS: &str = "input_ids";
/// Graph input: index of the first token of the chunk, int64 `[1]`.
pub const POSITION: &str = "position";
/// Graph input: sampling temperature, float `[1]`; `<= 0` means greedy.
pub const TEMPERATURE: &str = "temperature";
/// Graph input: top-k, int64 `[1]`; `<= 0` means no limit.
pub const TOP_K: &str = "top_k";
/// Graph input: top-p (nucleus), float `[1]`; `>= 1` means no limit.
pub const TOP_P: &str = "top_p";
/// Graph input: a uniform random number in `[0, 1)` drawn by the caller, float `[1]`.
pub const RANDOM_U: &str = "random_u";
/// Graph output: the chosen token, int64 `[1]`.
pub const NEXT_TOKEN: &str = "next_token";
/// Graph output: logits of the last position, float `[1, vocab]`.
pub const LOGITS: &str = "logits";
/// Name of the symbolic chunk-length dimension.
pub const CHUNK_DIM: &str = "T";

/// Graph input `past.{layer}.key`: `[1, kv_heads, max_cache, head_dim]`.
pub fn past_key(layer: usize) -> String {
    format!("past.{layer}.key")
}
/// Graph input `past.{layer}.value`: `[1, kv_heads, max_cache, head_dim]`.
pub fn past_value(layer: usize) -> String {
    format!("past.{layer}.value")
}
/// Graph output `new.{layer}.key`: `[1, kv_heads, T, head_dim]`, only the rows of this chunk.
pub fn new_key(layer: usize) -> String {
    format!("new.{layer}.key")
}
/// Graph output `new.{layer}.value`: `[1, kv_heads, T, head_dim]`, only the rows of this chunk.
pub fn new_value(layer: usize) -> String {
    format!("new.{layer}.value")
}

/// Metadata keys (ONNX `metadata_props`).
pub mod meta {
    /// Contract version, decimal.
    pub const FORMAT_VERSION: &str = "onestep.format_version";
    /// Architecture name (`llama`, `qwen2`).
    pub const ARCHITECTURE: &str = "onestep.architecture";
    /// Where the weights came from (file name, source format).
    pub const SOURCE: &str = "onestep.source";
    /// Number of decoder layers.
    pub const NUM_LAYERS: &str = "onestep.num_layers";
    /// Hidden size.
    pub const HIDDEN_SIZE: &str = "onestep.hidden_size";
    /// Number of attention (query) heads.
    pub const NUM_HEADS: &str = "onestep.num_heads";
    /// Number of key/value heads.
    pub const NUM_KV_HEADS: &str = "onestep.num_kv_heads";
    /// Head dimension.
    pub const HEAD_DIM: &str = "onestep.head_dim";
    /// Vocabulary size (logits width).
    pub const VOCAB_SIZE: &str = "onestep.vocab_size";
    /// Static cache length (slots per layer).
    pub const MAX_CACHE: &str = "onestep.max_cache";
    /// Largest chunk (T) the graph is meant to run.
    pub const MAX_CHUNK: &str = "onestep.max_chunk";
    /// Cache element type: `f16` or `f32`.
    pub const KV_DTYPE: &str = "onestep.kv_dtype";
    /// Weight encoding summary (`source`, `f16`, `int8`, `int4`, ...).
    pub const WEIGHT_ENCODING: &str = "onestep.weight_encoding";
    /// Beginning-of-sequence token id (absent if none).
    pub const BOS_ID: &str = "onestep.bos_id";
    /// Whether the tokenizer prompt should start with BOS (`true`/`false`).
    pub const ADD_BOS: &str = "onestep.add_bos";
    /// End-of-sequence token id.
    pub const EOS_ID: &str = "onestep.eos_id";
    /// All ids that end generation, comma-separated.
    pub const STOP_IDS: &str = "onestep.stop_ids";
    /// The full `tokenizer.json` (Hugging Face `tokenizers` format).
    pub const TOKENIZER_JSON: &str = "onestep.tokenizer_json";
    /// The chat template (Jinja, as in `tokenizer_config.json`).
    pub const CHAT_TEMPLATE: &str = "onestep.chat_template";
    /// Default generation settings, JSON ([`super::GenerationDefaults`]).
    pub const GENERATION: &str = "onestep.generation";
}

/// Default generation settings carried in the file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GenerationDefaults {
    /// Temperature; `<= 0` is greedy.
    pub temperature: f32,
    /// Top-k; `0` disables.
    pub top_k: u32,
    /// Top-p; `1.0` disables.
    pub top_p: f32,
    /// Maximum new tokens for one reply.
    pub max_new_tokens: u32,
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 256,
        }
    }
}

/// Everything the runtime needs to know about a model, read from (and written to) metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Architecture name.
    pub architecture: String,
    /// Decoder layers.
    pub num_layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Cache slots per layer.
    pub max_cache: usize,
    /// Largest chunk.
    pub max_chunk: usize,
    /// Cache dtype (F16 or F32).
    pub kv_dtype: DType,
    /// BOS id, if the vocabulary has one.
    pub bos_id: Option<u32>,
    /// Whether prompts get BOS prepended.
    pub add_bos: bool,
    /// EOS id.
    pub eos_id: u32,
    /// Ids that end generation (includes `eos_id`).
    pub stop_ids: Vec<u32>,
    /// Default generation settings.
    pub generation: GenerationDefaults,
}

fn get<'a>(m: &'a BTreeMap<String, String>, key: &str) -> Result<&'a str> {
    m.get(key)
        .map(String::as_str)
        .ok_or_else(|| Error::Metadata {
            key: key.to_string(),
            detail: "missing".into(),
        })
}

fn num<T: std::str::FromStr>(m: &BTreeMap<String, String>, key: &str) -> Result<T> {
    let v = get(m, key)?;
    v.trim().parse().map_err(|_| Error::Metadata {
        key: key.to_string(),
        detail: format!("`{v}` is not a valid number"),
    })
}

impl ModelInfo {
    /// Reads and validates the model description from metadata.
    pub fn from_metadata(m: &BTreeMap<String, String>) -> Result<Self> {
        let version: u32 = num(m, meta::FORMAT_VERSION)?;
        if version != FORMAT_VERSION {
            return Err(Error::Contract(format!(
                "format version {version} is not supported (this runtime reads version {FORMAT_VERSION}); re-export the model"
            )));
        }
        let kv_dtype = match get(m, meta::KV_DTYPE)? {
            "f16" => DType::F16,
            "f32" => DType::F32,
            other => {
                return Err(Error::Metadata {
                    key: meta::KV_DTYPE.into(),
                    detail: format!("`{other}` is not f16 or f32"),
                })
            }
        };
        let stop_ids = get(m, meta::STOP_IDS)?
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim().parse::<u32>().map_err(|_| Error::Metadata {
                    key: meta::STOP_IDS.into(),
                    detail: format!("`{s}` is not a token id"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let generation = match m.get(meta::GENERATION) {
            Some(s) => serde_json::from_str(s).map_err(|e| Error::Metadata {
                key: meta::GENERATION.into(),
                detail: e.to_string(),
            })?,
            None => GenerationDefaults::default(),
        };
        let info = ModelInfo {
            architecture: get(m, meta::ARCHITECTURE)?.to_string(),
            num_layers: num(m, meta::NUM_LAYERS)?,
            hidden_size: num(m, meta::HIDDEN_SIZE)?,
            num_heads: num(m, meta::NUM_HEADS)?,
            num_kv_heads: num(m, meta::NUM_KV_HEADS)?,
            head_dim: num(m, meta::HEAD_DIM)?,
            vocab_size: num(m, meta::VOCAB_SIZE)?,
            max_cache: num(m, meta::MAX_CACHE)?,
            max_chunk: num(m, meta::MAX_CHUNK)?,
            kv_dtype,
            bos_id: match m.get(meta::BOS_ID) {
                Some(_) => Some(num(m, meta::BOS_ID)?),
                None => None,
            },
            add_bos: m.get(meta::ADD_BOS).map(|s| s == "true").unwrap_or(false),
            eos_id: num(m, meta::EOS_ID)?,
            stop_ids,
            generation,
        };
        if info.num_layers == 0 || info.max_cache == 0 || info.max_chunk == 0 || info.head_dim == 0
        {
            return Err(Error::Contract(
                "num_layers, max_cache, max_chunk and head_dim must be positive".into(),
            ));
        }
        if info.num_kv_heads == 0 || !info.num_heads.is_multiple_of(info.num_kv_heads) {
            return Err(Error::Contract(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                info.num_heads, info.num_kv_heads
            )));
        }
        Ok(info)
    }

    /// Writes the model description into metadata (the exporter's side).
    pub fn to_metadata(&self, m: &mut BTreeMap<String, String>) {
        m.insert(meta::FORMAT_VERSION.into(), FORMAT_VERSION.to_string());
        m.insert(meta::ARCHITECTURE.into(), self.architecture.clone());
        m.insert(meta::NUM_LAYERS.into(), self.num_layers.to_string());
        m.insert(meta::HIDDEN_SIZE.into(), self.hidden_size.to_string());
        m.insert(meta::NUM_HEADS.into(), self.num_heads.to_string());
        m.insert(meta::NUM_KV_HEADS.into(), self.num_kv_heads.to_string());
        m.insert(meta::HEAD_DIM.into(), self.head_dim.to_string());
        m.insert(meta::VOCAB_SIZE.into(), self.vocab_size.to_string());
        m.insert(meta::MAX_CACHE.into(), self.max_cache.to_string());
        m.insert(meta::MAX_CHUNK.into(), self.max_chunk.to_string());
        m.insert(
            meta::KV_DTYPE.into(),
            if self.kv_dtype == DType::F16 {
                "f16"
            } else {
                "f32"
            }
            .into(),
        );
        if let Some(b) = self.bos_id {
            m.insert(meta::BOS_ID.into(), b.to_string());
        }
        m.insert(meta::ADD_BOS.into(), self.add_bos.to_string());
        m.insert(meta::EOS_ID.into(), self.eos_id.to_string());
        let stops: Vec<String> = self.stop_ids.iter().map(|s| s.to_string()).collect();
        m.insert(meta::STOP_IDS.into(), stops.join(","));
        m.insert(
            meta::GENERATION.into(),
            serde_json::to_string(&self.generation).expect("plain struct serializes"),
        );
    }
}
