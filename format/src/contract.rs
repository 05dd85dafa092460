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

/// Graph input of a transcription model: `true` runs the encoder phase (`audio` → `encoded.*`),
/// `false` a decoder step. bool `[1]`; the graph's one `If` branches on it (docs/GRAPH.md).
pub const ENCODE: &str = "encode";
/// Graph input: one window of 16 kHz mono samples, f32 `[1, window_samples]` (read by the encoder
/// phase only).
pub const AUDIO: &str = "audio";
/// Graph input: how many of `audio`'s samples are the recording, int64 `[1]` (the rest are zeros; the
/// front end's frames past them are 0, as faster-whisper pads).
pub const AUDIO_SAMPLES: &str = "audio_samples";
/// Graph input: bool `[1]`, `true` when this step chooses the transcript's first token (the
/// begin-suppress set of tokens is then not chosen).
pub const FIRST_TOKEN: &str = "first_token";

/// Encoder-phase output `encoded.{layer}.key`: decoder layer `layer`'s cross-attention keys over the
/// window, `[1, heads, audio_frames, head_dim]`; fed back as [`cross_key`] to every decoder step.
pub fn encoded_key(layer: usize) -> String {
    format!("encoded.{layer}.key")
}
/// Encoder-phase output `encoded.{layer}.value` (as [`encoded_key`]).
pub fn encoded_value(layer: usize) -> String {
    format!("encoded.{layer}.value")
}
/// Decoder-step input `cross.{layer}.key`: what the encoder phase gave as [`encoded_key`].
pub fn cross_key(layer: usize) -> String {
    format!("cross.{layer}.key")
}
/// Decoder-step input `cross.{layer}.value`: what the encoder phase gave as [`encoded_value`].
pub fn cross_value(layer: usize) -> String {
    format!("cross.{layer}.value")
}
/// The encoder-phase output a decoder-step input `cross.*` is fed from (`cross.0.key` →
/// `encoded.0.key`), or `None` for any other name.
pub fn encoded_for(input: &str) -> Option<String> {
    input.strip_prefix("cross.").map(|r| format!("encoded.{r}"))
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
    /// A transcription model's audio front end and special tokens, JSON ([`super::Speech`]); absent
    /// for a text model.
    pub const SPEECH: &str = "onestep.speech";
}

/// What a transcription (speech-to-text) model's file says about its audio and its prompt tokens.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Speech {
    /// Samples per second the front end takes (16000).
    pub sample_rate: u32,
    /// Samples in one window the encoder takes (30 s: 480000).
    pub window_samples: usize,
    /// Mel bins of the front end.
    pub mel_bins: usize,
    /// Encoder positions per window (the cross-attention length, 1500).
    pub audio_frames: usize,
    /// Seconds one timestamp token step stands for (0.02).
    pub time_precision: f32,
    /// Whether the model takes a language token (multilingual) or is English-only.
    pub multilingual: bool,
    /// Special tokens.
    pub tokens: SpeechTokens,
    /// Language code → its token id (`en` → 50259), multilingual models only.
    #[serde(default)]
    pub languages: BTreeMap<String, u32>,
    /// Tokens the graph never chooses (for the host's log-probabilities: the graph applies them).
    #[serde(default)]
    pub suppress: Vec<u32>,
    /// Tokens the graph does not choose first (`first_token`).
    #[serde(default)]
    pub suppress_begin: Vec<u32>,
}

/// The special token ids of a Whisper-style prompt and transcript.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct SpeechTokens {
    /// `<|startoftranscript|>`.
    pub sot: u32,
    /// `<|endoftext|>`: ends the transcript.
    pub eot: u32,
    /// `<|transcribe|>`.
    pub transcribe: u32,
    /// `<|translate|>`.
    pub translate: u32,
    /// `<|notimestamps|>`.
    pub no_timestamps: u32,
    /// `<|nospeech|>` / `<|nocaptions|>`: its probability after `sot` is the no-speech probability.
    pub no_speech: u32,
    /// `<|0.00|>`, the first timestamp token (every id from here on is a timestamp).
    pub timestamp_begin: u32,
    /// `<|startofprev|>`: starts the previous window's text given as a prompt.
    pub sot_prev: u32,
}

impl Speech {
    /// Reads the speech description from metadata: `None` for a text model.
    pub fn from_metadata(m: &BTreeMap<String, String>) -> Result<Option<Self>> {
        let Some(s) = m.get(meta::SPEECH) else {
            return Ok(None);
        };
        let sp: Speech = serde_json::from_str(s).map_err(|e| Error::Metadata {
            key: meta::SPEECH.into(),
            detail: e.to_string(),
        })?;
        if sp.sample_rate == 0 || sp.window_samples == 0 || sp.audio_frames == 0 {
            return Err(Error::Metadata {
                key: meta::SPEECH.into(),
                detail: "sample rate, window and audio frames must be positive".into(),
            });
        }
        Ok(Some(sp))
    }
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
