//! Rebuilds a Hugging Face `tokenizer.json` from a GGUF vocabulary (`tokenizer.ggml.*`) so that encoding
//! matches llama.cpp exactly, and derives the stop ids the way llama.cpp does.
//!
//! llama.cpp's BPE path is: split the text on special tokens (longest first), split each remaining
//! fragment with the pre-tokenizer's regexes applied one after another (matches and the gaps between
//! them both become pieces), byte-level encode each piece (GPT-2's byte → char table) and merge by rank.
//! The `tokenizers` equivalent is: added tokens for the special tokens, a `Sequence` of `Split`
//! pre-tokenizers with behaviour `Isolated` (one per regex, same order), `ByteLevel` with
//! `use_regex = false`, and a `BPE` model with the same merges.
//!
//! llama.cpp's SentencePiece path (`tokenizer.ggml.model = "llama"`, `llm_tokenizer_spm`) is: split the
//! text on special and user-defined tokens (longest first), then in each remaining fragment replace every
//! space by `▁` (U+2581), prepend one `▁` if `tokenizer.ggml.add_space_prefix` (default true), split into
//! characters and repeatedly merge the adjacent pair whose concatenation is a vocabulary piece with the
//! highest score (ties: leftmost), and finally spell characters that are not pieces as `<0xNN>` byte
//! tokens. The `tokenizers` equivalent is: the same added tokens, a `Replace(" ", "▁")` normalizer (after a
//! `Prepend("▁")` when the prefix is on), no pre-tokenizer, and a `BPE` model with `byte_fallback` whose
//! merges are every split of every piece into two pieces, ranked by the whole piece's score, highest
//! first (`spm_merges`).
//!
//! The tokenizer built here never adds BOS/EOS itself (no post-processor): callers prepend
//! [`TokenizerData::bos_id`] when [`TokenizerData::add_bos`] is set.

use std::collections::{BTreeSet, HashMap};

use serde::{Serialize, Serializer};
use serde_json::{json, Value};

use super::{SourceError, TokenizerData};

/// GPT-2's pre-tokenizer regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_GPT2`), with the trailing `\s+` that
/// Hugging Face's `ByteLevel` adds (it only ever matches what would otherwise be a one-character gap,
/// which `Isolated` splitting emits as the same piece).
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3 (`llama-bpe`), as adapted by llama.cpp (case-insensitive contractions spelled out).
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: like Llama 3 but digits one at a time.
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp token types (`tokenizer.ggml.token_type`).
mod toktype {
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
}

/// Token texts llama.cpp treats as end of generation (`special_eog_ids`, llama-vocab.cpp).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
];
/// Token texts llama.cpp detects as the EOT token when `tokenizer.ggml.eot_token_id` is absent.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
/// FIM pad / repo / file-separator texts: llama.cpp makes these end of generation too.
const FIM_EOG_TEXTS: &[&[&str]] = &[
    &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    &[
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ],
    &["<|file_sep|>"],
];
/// Other FIM texts llama.cpp marks as control (prefix / suffix / middle).
const FIM_CONTROL_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];

/// The GGUF vocabulary fields (`tokenizer.ggml.*`, `tokenizer.chat_template`) the tokenizer is built from.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model` (`gpt2`, `llama`, ...).
    pub model: String,
    /// `tokenizer.ggml.pre` (pre-tokenizer name), if present.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (llama.cpp token types), if present.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges` (`"a b"` strings), if present.
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.scores` (SentencePiece), if present.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece; llama.cpp's default is true).
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`.
    pub eot_id: Option<u32>,
    /// `tokenizer.ggml.eom_token_id`.
    pub eom_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

/// A pre-tokenizer: llama.cpp's regex list for it, whether it ignores merges for whole-vocab words, and
/// whether it adds BOS by default.
struct PreTokenizer {
    regexes: Vec<&'static str>,
    ignore_merges: bool,
    add_bos_default: bool,
}

/// llama.cpp's regex list for a `tokenizer.ggml.pre` name (llama-vocab.cpp, `llm_tokenizer_bpe`).
fn pre_tokenizer(name: Option<&str>) -> Option<PreTokenizer> {
    let p = |regexes: Vec<&'static str>| PreTokenizer {
        regexes,
        ignore_merges: false,
        add_bos_default: false,
    };
    Some(match name.unwrap_or("default") {
        "default" => p(vec![
            r"[\p{P}\$\+<=>\^~\|]+",
            RE_GPT2,
            r"\p{N}+",
            r"[0-9][0-9][0-9]",
        ]),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => PreTokenizer {
            regexes: vec![RE_LLAMA3],
            ignore_merges: true,
            add_bos_default: true,
        },
        "dbrx" | "smaug-bpe" => p(vec![RE_LLAMA3]),
        "falcon" => p(vec![r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, r"[0-9][0-9][0-9]"]),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            p(vec![r"\p{N}", RE_GPT2])
        }
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "mpt" | "olmo" | "jais" | "exaone4" | "mellum" | "trillion" | "granite-docling" => {
            p(vec![RE_GPT2])
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" | "hunyuan" => p(vec![RE_QWEN2]),
        "chatglm-bpe" | "glm4" => p(vec![RE_LLAMA3]),
        _ => return None,
    })
}

fn format_err(path: &str, detail: String) -> SourceError {
    SourceError::Format {
        path: path.into(),
        detail,
    }
}

fn key_err(path: &str, key: &str, detail: String) -> SourceError {
    SourceError::Key {
        path: path.into(),
        key: key.into(),
        detail,
    }
}

/// Builds [`TokenizerData`] (a complete `tokenizer.json`, chat template, BOS/EOS and stop ids) from a
/// GGUF vocabulary. `path` names the file in errors.
pub fn from_gguf(path: &str, v: &GgufVocab) -> Result<TokenizerData, SourceError> {
    let n = v.tokens.len();
    if n == 0 {
        return Err(key_err(path, "tokenizer.ggml.tokens", "empty".into()));
    }
    // llama.cpp ignores `tokenizer.ggml.pre` for SentencePiece vocabularies.
    let pre = match v.model.as_str() {
        "gpt2" => {
            Some(
                pre_tokenizer(v.pre.as_deref()).ok_or_else(|| SourceError::Unsupported {
                    path: path.into(),
                    what: format!(
                        "pre-tokenizer `{}` (tokenizer.ggml.pre)",
                        v.pre.as_deref().unwrap_or("")
                    ),
                })?,
            )
        }
        "llama" => None,
        other => {
            return Err(SourceError::Unsupported {
                path: path.into(),
                what: format!(
                    "tokenizer model `{other}` (tokenizer.ggml.model; only `gpt2` BPE and `llama` \
                     SentencePiece are rebuilt)"
                ),
            })
        }
    };
    if let Some(t) = &v.token_types {
        if t.len() < n {
            return Err(key_err(
                path,
                "tokenizer.ggml.token_type",
                format!("{} entries for {n} tokens", t.len()),
            ));
        }
    }
    let check_id = |key: &str, id: Option<u32>| -> Result<Option<u32>, SourceError> {
        match id {
            Some(i) if i as usize >= n => Err(key_err(
                path,
                key,
                format!("id {i} out of the vocabulary (size {n})"),
            )),
            other => Ok(other),
        }
    };
    let bos_id = check_id("tokenizer.ggml.bos_token_id", v.bos_id)?;
    let unk_key = check_id("tokenizer.ggml.unknown_token_id", v.unk_id)?;
    let eos_key = check_id("tokenizer.ggml.eos_token_id", v.eos_id)?;
    let eot_key = check_id("tokenizer.ggml.eot_token_id", v.eot_id)?;
    let eom_key = check_id("tokenizer.ggml.eom_token_id", v.eom_id)?;

    let index = index_tokens(path, &v.tokens)?;
    let Roles {
        control,
        user_defined,
        mut eog,
        eot_id,
    } = roles(v, &index, eos_key, eot_key, eom_key);

    let eos_id = eos_key
        .or(eot_id)
        .or_else(|| eog.iter().next().copied())
        .ok_or_else(|| {
            key_err(
                path,
                "tokenizer.ggml.eos_token_id",
                "missing, and no end-of-generation token could be found by its text".into(),
            )
        })?;
    eog.insert(eos_id);

    // llama.cpp adds BOS by default for SentencePiece, and per pre-tokenizer for BPE.
    let add_bos = v
        .add_bos
        .unwrap_or(pre.as_ref().is_none_or(|p| p.add_bos_default));
    if add_bos && bos_id.is_none() {
        return Err(key_err(
            path,
            "tokenizer.ggml.bos_token_id",
            "missing, but add_bos_token is true".into(),
        ));
    }

    // Added tokens: control/unknown become special, user-defined stay non-special; both are matched
    // atomically in text, as llama.cpp does with `parse_special`.
    let added: Vec<Value> = (0..n)
        .filter(|&i| control[i] || user_defined[i])
        .map(|i| {
            json!({
                "id": i,
                "content": v.tokens[i],
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": control[i],
            })
        })
        .collect();

    let (normalizer, pre_tokenizer, decoder, model) = match &pre {
        Some(pre) => bpe_parts(path, v, &index, pre)?,
        None => spm_parts(path, v, &index, unk_key)?,
    };
    let tokenizer = TokenizerJson {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens: added,
        normalizer,
        pre_tokenizer,
        post_processor: None,
        decoder,
        model,
    };
    let tokenizer_json = serde_json::to_string(&tokenizer)
        .map_err(|e| format_err(path, format!("serializing tokenizer.json: {e}")))?;
    // Prove that it loads.
    tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes())
        .map_err(|e| format_err(path, format!("rebuilt tokenizer.json does not load: {e}")))?;

    Ok(TokenizerData {
        tokenizer_json,
        chat_template: v.chat_template.clone(),
        bos_id,
        add_bos,
        eos_id,
        stop_ids: eog.into_iter().collect(),
    })
}

/// Token text → id (llama.cpp refuses empty and duplicate tokens; so do we).
fn index_tokens<'a>(
    path: &str,
    tokens: &'a [String],
) -> Result<HashMap<&'a str, u32>, SourceError> {
    let n = tokens.len();
    let mut index: HashMap<&str, u32> = HashMap::with_capacity(n);
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err(key_err(
                path,
                "tokenizer.ggml.tokens",
                format!("token {i} is empty"),
            ));
        }
        if let Some(prev) = index.insert(t.as_str(), i as u32) {
            return Err(key_err(
                path,
                "tokenizer.ggml.tokens",
                format!("duplicate token {t:?} (ids {prev} and {i})"),
            ));
        }
    }
    Ok(index)
}

/// Each token's role as llama.cpp derives it from the types and the texts.
struct Roles {
    /// Matched atomically in text and special (control and unknown types, and EOT/EOM/FIM/EOG texts).
    control: Vec<bool>,
    /// Matched atomically in text, not special.
    user_defined: Vec<bool>,
    /// The ids that end generation.
    eog: BTreeSet<u32>,
    /// The end-of-turn id (the file's, else found by its text).
    eot_id: Option<u32>,
}

/// [`Roles`], with llama.cpp's text-based overrides.
fn roles(
    v: &GgufVocab,
    index: &HashMap<&str, u32>,
    eos_key: Option<u32>,
    eot_key: Option<u32>,
    eom_key: Option<u32>,
) -> Roles {
    let n = v.tokens.len();
    // Token attributes, with llama.cpp's text-based overrides (EOT/EOM/FIM/EOG tokens become control).
    let ty = |i: usize| v.token_types.as_ref().map_or(1, |t| t[i]);
    let mut control: Vec<bool> = (0..n)
        .map(|i| matches!(ty(i), toktype::CONTROL | toktype::UNKNOWN))
        .collect();
    let user_defined: Vec<bool> = (0..n).map(|i| ty(i) == toktype::USER_DEFINED).collect();
    let find = |texts: &[&str]| -> Vec<u32> {
        texts
            .iter()
            .filter_map(|t| index.get(t).copied())
            .collect::<Vec<_>>()
    };
    let mut eog: BTreeSet<u32> = BTreeSet::new();
    for texts in FIM_EOG_TEXTS {
        // llama.cpp keeps one id per FIM role; any of them (each is control) ends generation.
        if let Some(&id) = find(texts).iter().min() {
            eog.insert(id);
            control[id as usize] = true;
        }
    }
    for id in find(FIM_CONTROL_TEXTS) {
        control[id as usize] = true;
    }
    let eot_id = eot_key.or_else(|| find(EOT_TEXTS).into_iter().min());
    for id in find(EOG_TEXTS) {
        eog.insert(id);
        control[id as usize] = true;
    }
    if let Some(id) = find(&["<|eom_id|>"]).first() {
        control[*id as usize] = true;
    }
    for id in [eos_key, eot_id, eom_key].into_iter().flatten() {
        eog.insert(id);
    }
    // llama.cpp: with both <|return|> and <|call|> (or <|calls|> and <|flush|>), <|end|> does not end.
    let has = |eog: &BTreeSet<u32>, t: &str| index.get(t).is_some_and(|id| eog.contains(id));
    if (has(&eog, "<|return|>") && has(&eog, "<|call|>"))
        || (has(&eog, "<|calls|>") && has(&eog, "<|flush|>"))
    {
        if let Some(id) = index.get("<|end|>") {
            eog.remove(id);
        }
    }
    // llama.cpp (gemma4, paddleocr): with <|tool_response>, </s> does not end generation.
    if has(&eog, "<|tool_response>") {
        if let Some(id) = index.get("</s>") {
            eog.remove(id);
        }
    }
    Roles {
        control,
        user_defined,
        eog,
        eot_id,
    }
}

/// A `tokenizer.json`, serialized straight from the vocabulary: as a `Value` tree its 262k vocabulary
/// entries and half a million merges would be built and then copied again.
#[derive(Serialize)]
struct TokenizerJson<'a> {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<Value>,
    normalizer: Value,
    pre_tokenizer: Value,
    post_processor: Option<()>,
    decoder: Value,
    model: BpeJson<'a>,
}

/// `tokenizer.json`'s BPE `model`.
#[derive(Serialize)]
struct BpeJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: Option<&'a str>,
    end_of_word_suffix: Option<&'a str>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: VocabJson<'a>,
    merges: Vec<(&'a str, &'a str)>,
}

/// The vocabulary as a JSON object of token → id, in id order.
struct VocabJson<'a>(&'a [String]);

impl Serialize for VocabJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().enumerate().map(|(i, t)| (t, i)))
    }
}

/// The model-specific parts of a `tokenizer.json`: normalizer, pre-tokenizer, decoder and model.
type Parts<'a> = (Value, Value, Value, BpeJson<'a>);

/// GPT-2-style byte-level BPE: llama.cpp's regexes as `Split` pre-tokenizers, the file's merges.
fn bpe_parts<'a>(
    path: &str,
    v: &'a GgufVocab,
    index: &HashMap<&str, u32>,
    pre: &PreTokenizer,
) -> Result<Parts<'a>, SourceError> {
    // Merges: llama.cpp splits each at the first space after position 0. Merges whose parts or result
    // are not in the vocabulary can never produce a token (llama.cpp falls back to bytes) and the
    // `tokenizers` BPE refuses them, so they are dropped; order (= rank) is kept.
    let merges_src = v.merges.as_ref().ok_or_else(|| {
        key_err(
            path,
            "tokenizer.ggml.merges",
            "missing (required for gpt2 BPE)".into(),
        )
    })?;
    let mut merges = Vec::with_capacity(merges_src.len());
    for m in merges_src {
        // Byte search: the first character may be multi-byte, and ' ' is always a char boundary.
        let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
            continue;
        };
        let (a, b) = (&m[..pos], &m[pos + 1..]);
        if index.contains_key(a)
            && index.contains_key(b)
            && index.contains_key(format!("{a}{b}").as_str())
        {
            merges.push((a, b));
        }
    }

    let mut pretoks: Vec<Value> = pre
        .regexes
        .iter()
        .map(|re| {
            json!({
                "type": "Split",
                "pattern": {"Regex": re},
                "behavior": "Isolated",
                "invert": false,
            })
        })
        .collect();
    pretoks.push(json!({
        "type": "ByteLevel",
        "add_prefix_space": false,
        "trim_offsets": false,
        "use_regex": false,
    }));

    Ok((
        Value::Null,
        json!({"type": "Sequence", "pretokenizers": pretoks}),
        json!({
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": false,
            "use_regex": false,
        }),
        BpeJson {
            kind: "BPE",
            dropout: None,
            unk_token: None,
            continuing_subword_prefix: None,
            end_of_word_suffix: None,
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges: pre.ignore_merges,
            vocab: VocabJson(&v.tokens),
            merges,
        },
    ))
}

/// SentencePiece as llama.cpp runs it (`llm_tokenizer_spm`): spaces to `▁`, an optional `▁` prefix, score
/// merges with byte fallback (see the module doc and `spm_merges`).
fn spm_parts<'a>(
    path: &str,
    v: &'a GgufVocab,
    index: &HashMap<&str, u32>,
    unk_id: Option<u32>,
) -> Result<Parts<'a>, SourceError> {
    const KEY: &str = "tokenizer.ggml.scores";
    let n = v.tokens.len();
    let scores = v.scores.as_deref().ok_or_else(|| {
        key_err(
            path,
            KEY,
            "missing (required for llama SentencePiece)".into(),
        )
    })?;
    if scores.len() != n {
        return Err(key_err(
            path,
            KEY,
            format!("{} scores for {n} tokens", scores.len()),
        ));
    }
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(key_err(path, KEY, format!("score of token {i} is NaN")));
    }
    let unk = unk_id
        .or_else(|| index.get("<unk>").copied())
        .map(|i| v.tokens[i as usize].as_str());
    let prefix = v.add_space_prefix.unwrap_or(true);

    let merges = spm_merges(&v.tokens, scores, index);
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
    let normalizer = if prefix {
        json!({
            "type": "Sequence",
            "normalizers": [{"type": "Prepend", "prepend": "▁"}, replace],
        })
    } else {
        replace
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok((
        normalizer,
        Value::Null,
        json!({"type": "Sequence", "decoders": decoders}),
        BpeJson {
            kind: "BPE",
            dropout: None,
            unk_token: unk,
            continuing_subword_prefix: None,
            end_of_word_suffix: None,
            fuse_unk: true,
            byte_fallback: true,
            ignore_merges: false,
            vocab: VocabJson(&v.tokens),
            merges,
        },
    ))
}

/// BPE merges that make `tokenizers`' rank-ordered BPE do what llama.cpp's score-ordered SentencePiece
/// merging does.
///
/// llama.cpp starts from the characters and repeatedly merges the adjacent pair whose concatenation is a
/// vocabulary piece of the highest score (ties: leftmost). Every symbol it holds is a piece (or a
/// character that is none, which can only become bytes — `tokenizers` spells it as bytes at once). So the
/// pairs it can ever merge are exactly the splits of a piece into two pieces, and ranking those merges by
/// the whole piece's score, highest first, makes "lowest rank, then leftmost" pick the same pair at every
/// step as "highest score, then leftmost" — whenever the competing pairs make different pieces of
/// different scores (true for every normal piece of a SentencePiece model, whose scores are distinct).
/// Only competing pairs that make the same score then depend on the tie order here: the same piece
/// split two ways (parts of higher score first, as transformers' GGUF converter orders them), or pieces
/// of equal score (lower id first).
///
/// Every piece takes part, control and byte pieces included, as llama.cpp looks any concatenation up in
/// the whole vocabulary. One split per character boundary, each half a hash lookup: linear in the
/// vocabulary's text.
fn spm_merges<'a>(
    tokens: &'a [String],
    scores: &[f32],
    index: &HashMap<&str, u32>,
) -> Vec<(&'a str, &'a str)> {
    // llama.cpp compares scores with `<`, where -0.0 equals 0.0; `total_cmp` would order them.
    let score = |id: u32| {
        let s = scores[id as usize];
        if s == 0.0 {
            0.0
        } else {
            s
        }
    };
    let mut merges: Vec<(u32, u32, u32)> = Vec::new();
    for (piece, text) in tokens.iter().enumerate() {
        for (at, _) in text.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (index.get(&text[..at]), index.get(&text[at..])) {
                merges.push((piece as u32, l, r));
            }
        }
    }
    merges.sort_unstable_by(|a, b| {
        score(b.0)
            .total_cmp(&score(a.0))
            .then(a.0.cmp(&b.0))
            .then(score(b.1).total_cmp(&score(a.1)))
            .then(score(b.2).total_cmp(&score(a.2)))
            .then(a.1.cmp(&b.1))
    });
    merges
        .into_iter()
        .map(|(_, l, r)| (tokens[l as usize].as_str(), tokens[r as usize].as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny SentencePiece vocabulary: control tokens, two user-defined newline runs, the 256 byte
    /// tokens, and pieces whose scores fall with length (as a SentencePiece BPE model's do).
    fn spm_vocab(add_space_prefix: bool) -> GgufVocab {
        let mut tokens: Vec<String> = Vec::new();
        let mut types = Vec::new();
        let mut scores = Vec::new();
        let mut push = |t: &str, ty: i32, s: f32| {
            tokens.push(t.to_string());
            types.push(ty);
            scores.push(s);
        };
        for (t, ty) in [
            ("<pad>", 3),
            ("<eos>", 3),
            ("<bos>", 3),
            ("<unk>", 2),
            ("<start_of_turn>", 3),
            ("<end_of_turn>", 3),
            ("\n", 4),
            ("\n\n", 4),
        ] {
            push(t, ty, -1000.0);
        }
        for b in 0..=255u8 {
            push(&format!("<0x{b:02X}>"), 6, 0.0);
        }
        // (piece, score): distinct scores, every piece's characters are pieces.
        for (t, s) in [
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -3.0),
            ("c", -4.0),
            ("d", -5.0),
            ("é", -6.0),
            ("<", -7.0),
            (">", -8.0),
            ("ab", -9.0),
            ("bc", -10.0),
            ("▁a", -11.0),
            ("cd", -12.0),
            ("aa", -13.0),
            ("▁▁", -14.0),
            ("abc", -15.0),
            ("▁ab", -16.0),
            ("ca", -17.0),
            ("bcd", -18.0),
            ("aaa", -19.0),
            ("éa", -20.0),
            ("abcd", -21.0),
            ("▁abc", -22.0),
            ("<a", -23.0),
            ("a>", -24.0),
            ("dab", -25.0),
            ("aaaa", -26.0),
        ] {
            push(t, 1, s);
        }
        GgufVocab {
            model: "llama".into(),
            pre: Some("default".into()),
            tokens,
            token_types: Some(types),
            scores: Some(scores),
            add_space_prefix: Some(add_space_prefix),
            bos_id: Some(2),
            eos_id: Some(1),
            unk_id: Some(3),
            pad_id: Some(0),
            ..Default::default()
        }
    }

    /// llama.cpp's SentencePiece tokenizer, written out plainly (`tokenizer_st_partition` with
    /// `parse_special`, then `llm_tokenizer_spm`), as the reference.
    fn llama_cpp_spm(v: &GgufVocab, text: &str) -> Vec<u32> {
        let id = |t: &str| v.tokens.iter().position(|x| x == t).map(|i| i as u32);
        let types = v.token_types.as_ref().unwrap();
        let scores = v.scores.as_ref().unwrap();
        // Special (control, unknown, user-defined) tokens, longest first, each split out of every fragment.
        let mut special: Vec<usize> = (0..v.tokens.len())
            .filter(|&i| matches!(types[i], 2..=4))
            .collect();
        special.sort_by_key(|&i| std::cmp::Reverse(v.tokens[i].len()));
        enum Frag {
            Text(String),
            Token(u32),
        }
        let mut frags = vec![Frag::Text(text.to_string())];
        for &s in &special {
            let pat = v.tokens[s].as_str();
            let mut out = Vec::new();
            for f in frags {
                match f {
                    Frag::Text(t) => {
                        let mut rest = t.as_str();
                        while let Some(at) = rest.find(pat) {
                            if at > 0 {
                                out.push(Frag::Text(rest[..at].to_string()));
                            }
                            out.push(Frag::Token(s as u32));
                            rest = &rest[at + pat.len()..];
                        }
                        if !rest.is_empty() {
                            out.push(Frag::Text(rest.to_string()));
                        }
                    }
                    tok => out.push(tok),
                }
            }
            frags = out;
        }
        let mut ids = Vec::new();
        for f in frags {
            let t = match f {
                Frag::Token(t) => {
                    ids.push(t);
                    continue;
                }
                Frag::Text(t) => t,
            };
            let prefixed = if v.add_space_prefix.unwrap_or(true) {
                format!(" {t}")
            } else {
                t
            };
            let escaped = prefixed.replace(' ', "▁");
            let mut syms: Vec<String> = escaped.chars().map(String::from).collect();
            loop {
                let mut best: Option<(usize, f32)> = None;
                for i in 0..syms.len().saturating_sub(1) {
                    if let Some(p) = id(&format!("{}{}", syms[i], syms[i + 1])) {
                        let s = scores[p as usize];
                        if best.is_none_or(|(_, b)| s > b) {
                            best = Some((i, s));
                        }
                    }
                }
                let Some((i, _)) = best else { break };
                let r = syms.remove(i + 1);
                syms[i].push_str(&r);
            }
            for s in syms {
                match id(&s) {
                    Some(p) => ids.push(p),
                    None => ids.extend(s.bytes().map(|b| id(&format!("<0x{b:02X}>")).unwrap())),
                }
            }
        }
        ids
    }

    fn hf(v: &GgufVocab) -> (TokenizerData, tokenizers::Tokenizer) {
        let data = from_gguf("vocab.gguf", v).expect("tokenizer");
        let tok = tokenizers::Tokenizer::from_bytes(data.tokenizer_json.as_bytes()).expect("loads");
        (data, tok)
    }

    fn ids(tok: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, false).expect("encode").get_ids().to_vec()
    }

    fn pieces(v: &GgufVocab, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| v.tokens[i as usize].clone()).collect()
    }

    #[test]
    fn spm_merges_by_score_with_byte_fallback() {
        let v = spm_vocab(false);
        let (data, tok) = hf(&v);
        assert!(
            data.add_bos,
            "llama.cpp adds BOS to SentencePiece by default"
        );
        assert_eq!((data.bos_id, data.eos_id), (Some(2), 1));
        assert_eq!(data.stop_ids, vec![1, 5]);
        let cases: &[(&str, &[&str])] = &[
            // "ab" (-9) beats "bc" (-10); then "abc" (-15) beats nothing better; "abcd" (-21) last.
            ("abcd", &["abcd"]),
            // "cd" (-12) first, then "ab", then "abcd" (-21) beats "dab" (-25) which is not adjacent.
            ("abcdab", &["abcd", "ab"]),
            // Leftmost of equal pairs: "aa" at 0, then "aa" (-13) at 1 beats "aaa" (-19) at 0, then
            // "aaa" (-19) beats "aaaa" (-26).
            ("aaaaa", &["aa", "aaa"]),
            // Spaces become ▁ (no prefix): "ab" (-9) beats "▁a" (-11), then "▁ab" (-16).
            ("a ab", &["a", "▁ab"]),
            (" abc", &["▁abc"]),
            // Byte fallback for characters that are not pieces.
            ("xé", &["<0x78>", "é"]),
            ("中a", &["<0xE4>", "<0xB8>", "<0xAD>", "a"]),
            // Control and user-defined tokens split the text first.
            ("a<start_of_turn>b", &["a", "<start_of_turn>", "b"]),
            ("<a<eos>a>", &["<a", "<eos>", "a>"]),
            ("\n\n\na", &["\n\n", "\n", "a"]),
            ("", &[]),
        ];
        for (text, want) in cases {
            let got = ids(&tok, text);
            assert_eq!(got, llama_cpp_spm(&v, text), "{text:?} vs the reference");
            assert_eq!(pieces(&v, &got), *want, "{text:?}");
        }
    }

    #[test]
    fn spm_space_prefix() {
        let v = spm_vocab(true);
        let (_, tok) = hf(&v);
        // A ▁ before every fragment, also after a special token.
        assert_eq!(pieces(&v, &ids(&tok, "abc")), ["▁abc"]);
        assert_eq!(
            pieces(&v, &ids(&tok, "ab<end_of_turn>ab")),
            ["▁ab", "<end_of_turn>", "▁ab"]
        );
        // "▁▁a": "▁a" (-11) beats "▁▁" (-14).
        assert_eq!(pieces(&v, &ids(&tok, " a")), ["▁", "▁a"]);
        // Decoding strips the prefix again.
        let text = "abc dab é";
        let got = ids(&tok, text);
        assert_eq!(got, llama_cpp_spm(&v, text));
        assert_eq!(tok.decode(&got, false).expect("decode"), text);
        let v = spm_vocab(false);
        let (_, tok) = hf(&v);
        assert_eq!(pieces(&v, &ids(&tok, "abc")), ["abc"]);
    }

    /// Random texts over the pieces' characters, characters that are no piece, spaces and special tokens
    /// encode exactly as the reference llama.cpp algorithm does, and decode back.
    #[test]
    fn spm_matches_reference_on_random_text() {
        let atoms = [
            "a",
            "a",
            "a",
            "b",
            "b",
            "c",
            "d",
            "é",
            " ",
            " ",
            "▁",
            "<",
            ">",
            "\n",
            "x",
            "中",
            "🦀",
            "<eos>",
            "<start_of_turn>",
            "<unk>",
            "ab",
            "aa",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for prefix in [false, true] {
            let v = spm_vocab(prefix);
            let (_, tok) = hf(&v);
            for _ in 0..2000 {
                let len = next(12);
                let text: String = (0..len).map(|_| atoms[next(atoms.len())]).collect();
                let got = ids(&tok, &text);
                assert_eq!(
                    got,
                    llama_cpp_spm(&v, &text),
                    "{text:?} (prefix {prefix}): {:?}",
                    pieces(&v, &got)
                );
                // Decoding gives the text back, a literal ▁ as the space it stands for (with the prefix
                // on, every fragment after a special token shows its ▁ as a space, so check only text
                // with none).
                let back = tok.decode(&got, false).expect("decode");
                if !prefix || !text.contains(['<', '\n']) {
                    assert_eq!(back, text.replace('▁', " "), "{text:?}");
                }
            }
        }
    }

    #[test]
    fn spm_scores_are_required() {
        let mut v = spm_vocab(false);
        v.scores = None;
        match from_gguf("vocab.gguf", &v) {
            Err(SourceError::Key { path, key, detail }) => {
                assert_eq!(
                    (path.as_str(), key.as_str()),
                    ("vocab.gguf", "tokenizer.ggml.scores")
                );
                assert!(detail.contains("missing"), "{detail}");
            }
            other => panic!("expected a key error, got {other:?}"),
        }
        let mut v = spm_vocab(false);
        let n = v.tokens.len();
        v.scores.as_mut().unwrap().pop();
        match from_gguf("vocab.gguf", &v) {
            Err(SourceError::Key { path, key, detail }) => {
                assert_eq!(
                    (path.as_str(), key.as_str()),
                    ("vocab.gguf", "tokenizer.ggml.scores")
                );
                assert_eq!(detail, format!("{} scores for {n} tokens", n - 1));
            }
            other => panic!("expected a key error, got {other:?}"),
        }
        let mut v = spm_vocab(false);
        v.scores.as_mut().unwrap()[270] = f32::NAN;
        assert!(matches!(
            from_gguf("vocab.gguf", &v),
            Err(SourceError::Key { key, .. }) if key == "tokenizer.ggml.scores"
        ));
    }

    #[test]
    fn other_models_are_unsupported() {
        let mut v = spm_vocab(false);
        v.model = "bert".into();
        assert!(matches!(
            from_gguf("vocab.gguf", &v),
            Err(SourceError::Unsupported { what, .. }) if what.contains("`bert`")
        ));
    }
}
