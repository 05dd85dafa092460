//! A Whisper checkpoint read into canonical tensors: the CTranslate2 layout faster-whisper uses
//! (`model.bin` + `config.json` + `tokenizer.json`) here, a Hugging Face folder in
//! [`super::whisper_hf`]. Its fused projections (self-attention q/k/v,
//! cross-attention k/v) are split into the canonical per-projection tensors by slicing rows — no copy.
//!
//! Canonical names (the graph's initializers carry them): `enc.conv{1,2}.{weight,bias}`, `enc.pos`,
//! `enc.l{i}.{attn_norm,ffn_norm}.{weight,bias}`, `enc.l{i}.attn.{q,k,v,o}.{weight,bias}`,
//! `enc.l{i}.{fc1,fc2}.{weight,bias}`, `enc.norm.{weight,bias}`; `dec.pos`,
//! `dec.l{i}.{attn_norm,cross_norm,ffn_norm}.*`, `dec.l{i}.{attn,cross}.{q,k,v,o}.*`,
//! `dec.l{i}.{fc1,fc2}.*`, `dec.norm.*`; `dec.embed.weight`. A bias the source stores as zeros (k) is left out.

use std::collections::BTreeMap;
use std::path::Path;

use onestep_format::contract::SpeechTokens;

use super::ct2::{self, Ct2Model};
use super::{SourceDType, SourceError, SourceTensor};

/// Whisper's hyper-parameters, from the tensors' shapes and the spec's scalars.
#[derive(Debug, Clone, PartialEq)]
pub struct WhisperConfig {
    /// Mel bins of the front end (80 or 128).
    pub mel_bins: usize,
    /// Model width.
    pub d_model: usize,
    /// Encoder layers.
    pub encoder_layers: usize,
    /// Encoder attention heads.
    pub encoder_heads: usize,
    /// Decoder layers.
    pub decoder_layers: usize,
    /// Decoder attention heads.
    pub decoder_heads: usize,
    /// MLP inner width.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Encoder positions (1500 for 30 s).
    pub audio_ctx: usize,
    /// Decoder positions (448).
    pub text_ctx: usize,
}

/// A Whisper checkpoint ready to trace.
#[derive(Debug, Clone)]
pub struct WhisperSource {
    /// Where it came from (folder), for errors and metadata.
    pub origin: String,
    /// Hyper-parameters.
    pub config: WhisperConfig,
    /// Canonical tensors.
    pub tensors: BTreeMap<String, SourceTensor>,
    /// Special tokens.
    pub tokens: SpeechTokens,
    /// Language code → token id (multilingual checkpoints).
    pub languages: BTreeMap<String, u32>,
    /// Whether the prompt takes a language and a task token.
    pub multilingual: bool,
    /// Tokens never chosen (the source's `suppress_ids` plus the prompt's special tokens).
    pub suppress: Vec<u32>,
    /// Tokens not chosen as the transcript's first token (`suppress_ids_begin`: the blank, eot).
    pub suppress_begin: Vec<u32>,
    /// The `tokenizer.json` text.
    pub tokenizer_json: String,
}

impl WhisperSource {
    /// A canonical tensor, or an error naming it.
    pub fn tensor(&self, name: &str) -> Result<&SourceTensor, SourceError> {
        self.tensors
            .get(name)
            .ok_or_else(|| SourceError::MissingTensor {
                path: self.origin.clone(),
                tensor: name.to_string(),
            })
    }
}

/// Whether `dir` holds a CTranslate2 model (`model.bin`).
pub fn is_ct2(dir: &Path) -> bool {
    dir.join("model.bin").is_file()
}

/// Reads a CTranslate2 Whisper folder.
pub fn read_ct2(dir: &Path) -> Result<WhisperSource, SourceError> {
    let origin = dir.display().to_string();
    let m = Ct2Model::open(&dir.join("model.bin"))?;
    if m.spec != "WhisperSpec" {
        return Err(SourceError::Unsupported {
            path: m.path.clone(),
            what: format!("CTranslate2 model `{}` (only WhisperSpec)", m.spec),
        });
    }
    let cfg = ct2::read_config(dir)?;
    let mut tensors = BTreeMap::new();
    let layers = |prefix: &str| {
        (0..)
            .take_while(|i| {
                m.get_opt(&format!("{prefix}/layer_{i}/ffn/linear_0/weight"))
                    .is_some()
            })
            .count()
    };
    let (enc_layers, dec_layers) = (layers("encoder"), layers("decoder"));
    let conv1 = float(&m, "encoder/conv1/weight")?;
    let (d, mels) = match conv1.shape[..] {
        [d, mels, 3] => (d, mels),
        _ => {
            return Err(shape_err(
                &m,
                "encoder/conv1/weight",
                &conv1.shape,
                &[0, 0, 3],
            ))
        }
    };
    let embed = float(&m, "decoder/embeddings/weight")?;
    let enc_pos = float(&m, "encoder/position_encodings/encodings")?;
    let dec_pos = float(&m, "decoder/position_encodings/encodings")?;
    let ffn = float(&m, "encoder/layer_0/ffn/linear_0/weight")?.shape[0];
    let heads = |name: &str| -> Result<usize, SourceError> {
        let h = m.scalar_i64(name)?;
        usize::try_from(h)
            .ok()
            .filter(|&h| h > 0 && d % h == 0)
            .ok_or_else(|| SourceError::Format {
                path: m.path.clone(),
                detail: format!("`{name}` = {h} does not divide the width {d}"),
            })
    };
    let config = WhisperConfig {
        mel_bins: mels,
        d_model: d,
        encoder_layers: enc_layers,
        encoder_heads: heads("encoder/num_heads")?,
        decoder_layers: dec_layers,
        decoder_heads: heads("decoder/num_heads")?,
        ffn,
        vocab_size: embed.shape[0],
        audio_ctx: enc_pos.shape[0],
        text_ctx: dec_pos.shape[0],
    };
    if enc_layers == 0 || dec_layers == 0 || embed.shape != [config.vocab_size, d] {
        return Err(SourceError::Format {
            path: m.path.clone(),
            detail: format!(
                "{enc_layers} encoder / {dec_layers} decoder layers, embedding {:?} for width {d}",
                embed.shape
            ),
        });
    }
    let mut put = |name: String, t: SourceTensor| {
        tensors.insert(name, t);
    };
    for (src, dst) in [
        ("encoder/conv1", "enc.conv1"),
        ("encoder/conv2", "enc.conv2"),
        ("encoder/layer_norm", "enc.norm"),
        ("decoder/layer_norm", "dec.norm"),
    ] {
        pair(&m, src, dst, &mut put)?;
    }
    put("enc.pos".into(), enc_pos);
    put("dec.pos".into(), dec_pos);
    put("dec.embed.weight".into(), embed);
    for i in 0..enc_layers {
        let (s, c) = (format!("encoder/layer_{i}"), format!("enc.l{i}"));
        self_attention(&m, &s, &c, &mut put)?;
        ffn_layers(&m, &s, &c, &mut put)?;
    }
    for i in 0..dec_layers {
        let (s, c) = (format!("decoder/layer_{i}"), format!("dec.l{i}"));
        self_attention(&m, &s, &c, &mut put)?;
        pair(
            &m,
            &format!("{s}/attention/layer_norm"),
            &format!("{c}.cross_norm"),
            &mut put,
        )?;
        pair(
            &m,
            &format!("{s}/attention/linear_0"),
            &format!("{c}.cross.q"),
            &mut put,
        )?;
        fused(
            &m,
            &format!("{s}/attention/linear_1"),
            &format!("{c}.cross"),
            &["k", "v"],
            &mut put,
        )?;
        pair(
            &m,
            &format!("{s}/attention/linear_2"),
            &format!("{c}.cross.o"),
            &mut put,
        )?;
        ffn_layers(&m, &s, &c, &mut put)?;
    }
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer_json =
        std::fs::read_to_string(&tokenizer_path).map_err(|source| SourceError::Io {
            path: tokenizer_path.display().to_string(),
            source,
        })?;
    let (tokens, languages, sot_lm) =
        special_tokens(&tokenizer_json, &tokenizer_path.display().to_string())?;
    let (suppress, suppress_begin) = decoding_rules(
        &tokens,
        sot_lm,
        cfg.suppress_ids.clone(),
        cfg.suppress_ids_begin.clone(),
    );
    Ok(WhisperSource {
        origin,
        // CTranslate2's rule: a vocabulary of 51865 ids or more.
        multilingual: config.vocab_size >= 51865,
        config,
        tensors,
        tokens,
        languages,
        suppress,
        suppress_begin,
        tokenizer_json,
    })
}

fn shape_err(m: &Ct2Model, name: &str, actual: &[usize], expected: &[usize]) -> SourceError {
    SourceError::Shape {
        path: m.path.clone(),
        tensor: name.to_string(),
        actual: actual.to_vec(),
        expected: expected.to_vec(),
    }
}

/// A float variable as a source tensor.
fn float(m: &Ct2Model, name: &str) -> Result<SourceTensor, SourceError> {
    let v = m.get(name)?;
    v.source_tensor().ok_or_else(|| SourceError::Unsupported {
        path: m.path.clone(),
        what: format!(
            "{} variable `{name}` (float32, float16 and bfloat16 are read)",
            v.dtype.name()
        ),
    })
}

/// `{src}/{weight,bias}` or `{src}/{gamma,beta}` → `{dst}.{weight,bias}`.
fn pair(
    m: &Ct2Model,
    src: &str,
    dst: &str,
    put: &mut impl FnMut(String, SourceTensor),
) -> Result<(), SourceError> {
    let (w, b) = if m.get_opt(&format!("{src}/gamma")).is_some() {
        ("gamma", "beta")
    } else {
        ("weight", "bias")
    };
    put(format!("{dst}.weight"), float(m, &format!("{src}/{w}"))?);
    put(format!("{dst}.bias"), float(m, &format!("{src}/{b}"))?);
    Ok(())
}

/// `{s}/self_attention/{layer_norm, linear_0 (q, k, v fused), linear_1}` → `{c}.{attn_norm, attn.*}`.
fn self_attention(
    m: &Ct2Model,
    s: &str,
    c: &str,
    put: &mut impl FnMut(String, SourceTensor),
) -> Result<(), SourceError> {
    let a = format!("{s}/self_attention");
    pair(
        m,
        &format!("{a}/layer_norm"),
        &format!("{c}.attn_norm"),
        put,
    )?;
    fused(
        m,
        &format!("{a}/linear_0"),
        &format!("{c}.attn"),
        &["q", "k", "v"],
        put,
    )?;
    pair(m, &format!("{a}/linear_1"), &format!("{c}.attn.o"), put)
}

/// `{s}/ffn/{layer_norm, linear_0, linear_1}` → `{c}.{ffn_norm, fc1, fc2}`.
fn ffn_layers(
    m: &Ct2Model,
    s: &str,
    c: &str,
    put: &mut impl FnMut(String, SourceTensor),
) -> Result<(), SourceError> {
    pair(
        m,
        &format!("{s}/ffn/layer_norm"),
        &format!("{c}.ffn_norm"),
        put,
    )?;
    pair(m, &format!("{s}/ffn/linear_0"), &format!("{c}.fc1"), put)?;
    pair(m, &format!("{s}/ffn/linear_1"), &format!("{c}.fc2"), put)
}

/// Rows `[a, b)` of a row-major tensor (a slice of the same bytes).
fn rows(t: &SourceTensor, a: usize, b: usize) -> SourceTensor {
    let row: usize = t.shape[1..].iter().product::<usize>() * t.dtype.block_bytes();
    let mut shape = t.shape.clone();
    shape[0] = b - a;
    SourceTensor {
        dtype: t.dtype,
        shape,
        data: t.data.slice(a * row..b * row),
    }
}

/// A fused projection `{src}/{weight,bias}` (`[n·d, d]`, `[n·d]`) split into `{dst}.{part}.*`; a bias
/// part that is all zeros is left out.
fn fused(
    m: &Ct2Model,
    src: &str,
    dst: &str,
    parts: &[&str],
    put: &mut impl FnMut(String, SourceTensor),
) -> Result<(), SourceError> {
    let wname = format!("{src}/weight");
    let bname = format!("{src}/bias");
    let w = float(m, &wname)?;
    let b = float(m, &bname)?;
    let n = parts.len();
    if w.shape.len() != 2 || w.shape[0] % n != 0 || b.shape != [w.shape[0]] {
        return Err(shape_err(
            m,
            &wname,
            &w.shape,
            &[n * w.shape[1], w.shape[1]],
        ));
    }
    let d = w.shape[0] / n;
    for (j, part) in parts.iter().enumerate() {
        put(format!("{dst}.{part}.weight"), rows(&w, j * d, (j + 1) * d));
        let bias = rows(&b, j * d, (j + 1) * d);
        if bias.data.iter().any(|&x| x != 0) {
            put(format!("{dst}.{part}.bias"), bias);
        }
    }
    Ok(())
}

/// The suppress lists a decode applies: the checkpoint's list plus the prompt's own special tokens
/// (faster-whisper's `suppress_tokens=[-1]`), sorted; the first token's list (default: the end of text).
pub(super) fn decoding_rules(
    tokens: &SpeechTokens,
    sot_lm: Option<u32>,
    suppress: Option<Vec<u32>>,
    begin: Option<Vec<u32>>,
) -> (Vec<u32>, Vec<u32>) {
    let mut suppress = suppress.unwrap_or_default();
    suppress.extend([
        tokens.transcribe,
        tokens.translate,
        tokens.sot,
        tokens.sot_prev,
    ]);
    suppress.extend(sot_lm);
    suppress.sort_unstable();
    suppress.dedup();
    (suppress, begin.unwrap_or_else(|| vec![tokens.eot]))
}

/// The special tokens by their text in `tokenizer.json`'s added tokens, the language tokens, and
/// `<|startoflm|>` where the vocabulary has it.
type Specials = (SpeechTokens, BTreeMap<String, u32>, Option<u32>);

pub(super) fn special_tokens(json: &str, path: &str) -> Result<Specials, SourceError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| SourceError::Format {
        path: path.into(),
        detail: format!("invalid JSON: {e}"),
    })?;
    let mut by_text = BTreeMap::new();
    for t in v["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(c), Some(id)) = (t["content"].as_str(), t["id"].as_u64()) {
            by_text.insert(c.to_string(), id as u32);
        }
    }
    let get = |names: &[&str]| -> Result<u32, SourceError> {
        names
            .iter()
            .find_map(|n| by_text.get(*n).copied())
            .ok_or_else(|| SourceError::Key {
                path: path.into(),
                key: "added_tokens".into(),
                detail: format!("no special token {}", names.join(" or ")),
            })
    };
    let no_timestamps = get(&["<|notimestamps|>"])?;
    let tokens = SpeechTokens {
        sot: get(&["<|startoftranscript|>"])?,
        eot: get(&["<|endoftext|>"])?,
        transcribe: get(&["<|transcribe|>"])?,
        translate: get(&["<|translate|>"])?,
        no_timestamps,
        no_speech: get(&["<|nospeech|>", "<|nocaptions|>"])?,
        // Whisper's tokenizer: the timestamps follow the last special token.
        timestamp_begin: by_text
            .get("<|0.00|>")
            .copied()
            .unwrap_or(no_timestamps + 1),
        sot_prev: get(&["<|startofprev|>"])?,
    };
    let languages = by_text
        .iter()
        .filter_map(|(c, &id)| {
            let code = c.strip_prefix("<|")?.strip_suffix("|>")?;
            let is_lang = (2..=3).contains(&code.len())
                && code.chars().all(|ch| ch.is_ascii_lowercase())
                || code == "haw"
                || code == "yue";
            (is_lang && id > tokens.sot && id < tokens.translate).then(|| (code.to_string(), id))
        })
        .collect();
    Ok((tokens, languages, by_text.get("<|startoflm|>").copied()))
}

/// The f32 values of a float source tensor (conv weights, position tables).
pub fn to_f32(t: &SourceTensor) -> Vec<f32> {
    match t.dtype {
        SourceDType::F32 => t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        SourceDType::F16 => t
            .data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        SourceDType::BF16 => t
            .data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => Vec::new(),
    }
}
