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
//! The tokenizer built here never adds BOS/EOS itself (no post-processor): callers prepend
//! [`TokenizerData::bos_id`] when [`TokenizerData::add_bos`] is set.

use std::collections::{BTreeSet, HashMap};

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
    match v.model.as_str() {
        "gpt2" => {}
        other => {
            return Err(SourceError::Unsupported {
                path: path.into(),
                what: format!(
                    "tokenizer model `{other}` (tokenizer.ggml.model; only `gpt2` BPE is rebuilt)"
                ),
            })
        }
    }
    let n = v.tokens.len();
    if n == 0 {
        return Err(key_err(path, "tokenizer.ggml.tokens", "empty".into()));
    }
    let pre = pre_tokenizer(v.pre.as_deref()).ok_or_else(|| SourceError::Unsupported {
        path: path.into(),
        what: format!(
            "pre-tokenizer `{}` (tokenizer.ggml.pre)",
            v.pre.as_deref().unwrap_or("")
        ),
    })?;
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
    let eos_key = check_id("tokenizer.ggml.eos_token_id", v.eos_id)?;
    let eot_key = check_id("tokenizer.ggml.eot_token_id", v.eot_id)?;
    let eom_key = check_id("tokenizer.ggml.eom_token_id", v.eom_id)?;

    // Vocabulary (llama.cpp refuses duplicates; so do we).
    let mut vocab = serde_json::Map::with_capacity(n);
    let mut index: HashMap<&str, u32> = HashMap::with_capacity(n);
    for (i, t) in v.tokens.iter().enumerate() {
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
        vocab.insert(t.clone(), json!(i));
    }

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

    let add_bos = v.add_bos.unwrap_or(pre.add_bos_default);
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
            merges.push(json!([a, b]));
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

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretoks},
        "post_processor": null,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": false,
            "use_regex": false,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre.ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
    });
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
