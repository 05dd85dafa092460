//! The tokenizer: a thin wrapper over the `tokenizers` crate, built from the `tokenizer.json` carried in
//! the model file.

use crate::contract::ModelInfo;
use crate::error::{Error, Result};

/// Text ↔ token ids for one model.
///
/// Encoding always parses special tokens written in the text (so `<|im_start|>` in a rendered chat
/// template becomes its single id) and never runs the tokenizer's own post-processor; BOS is handled
/// by [`Tokenizer::encode`] from the model's metadata instead, so the behavior does not depend on how a
/// given `tokenizer.json` spells its template processing.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

fn tok_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{what}: {e}"))
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.json` text; BOS handling follows `info`
    /// (`add_bos` and `bos_id`).
    pub fn from_json(json: &str, info: &ModelInfo) -> Result<Self> {
        Self::from_json_with(json, info.bos_id, info.add_bos)
    }

    /// Builds the tokenizer from `tokenizer.json` text with explicit BOS settings.
    pub fn from_json_with(json: &str, bos_id: Option<u32>, add_bos: bool) -> Result<Self> {
        // `tokenizers` 0.22 panics (`expect`) on some malformed files instead of returning an error: a
        // JSON syntax error inside the `decoder` section (found by the onnx_load fuzz target), or a
        // `Precompiled` normalizer whose charsmap is not a string. Syntax is checked here first (this
        // also holds under `panic = "abort"`); any other panic inside the parser is caught and
        // reported as an error where panics unwind.
        serde_json::from_str::<serde::de::IgnoredAny>(json)
            .map_err(|e| tok_err("tokenizer.json is not valid JSON", e))?;
        // BPE files through the one-pass reader (a fraction of the crate's memory and time on large
        // vocabularies), other models through the crate's.
        let inner = std::panic::catch_unwind(|| match super::tokenizer_json::read_bpe(json) {
            Some(read) => read,
            None => tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| e.to_string()),
        })
        .map_err(|_| Error::Tokenizer("tokenizer.json is malformed (the parser panicked)".into()))?
        .map_err(|e| tok_err("cannot read tokenizer.json", e))?;
        if add_bos && bos_id.is_none() {
            return Err(Error::Tokenizer(
                "add_bos is set but the model has no BOS id".into(),
            ));
        }
        Ok(Self {
            inner,
            bos_id,
            add_bos,
        })
    }

    /// Encodes `text` into ids. Special tokens written in the text are recognized. If the model asks
    /// for BOS (`add_bos`) it is prepended, unless the text already starts with it (as a chat template
    /// that writes `bos_token` itself does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_raw(text)?;
        if self.add_bos {
            if let Some(bos) = self.bos_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Encodes `text` without adding BOS (special tokens in the text are still recognized).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err("encode failed", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids into text; `skip_special` leaves special tokens (`<|im_end|>`, ...) out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| tok_err("decode failed", e))
    }

    /// The id of a token string (including added/special tokens).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id (including added/special tokens).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// BOS id used by [`Tokenizer::encode`], if any.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The SmolLM2-135M-Instruct tokenizer (exported by `testdata/make_fixtures.py`).
    pub(crate) const SMOLLM2_TOKENIZER: &str = include_str!("testdata/smollm2_tokenizer.json");
    pub(crate) const CHAT_EXPECTED: &str = include_str!("testdata/chat_expected.json");

    /// Fuzz regressions (onnx_load): malformed tokenizer.json files that made `tokenizers` panic are
    /// typed errors.
    #[test]
    fn malformed_tokenizer_json_is_an_error_not_a_panic() {
        let good = include_str!("../../../tests/fixtures/tiny/llama_f16/tokenizer.json");
        Tokenizer::from_json_with(good, None, false).expect("the tiny tokenizer reads");
        let at = good.find("\"decoder\"").expect("has a decoder");
        // A raw control character inside a string of the decoder section (the fuzzer's find).
        let q = at + good[at..].find("\"ByteLevel\"").expect("ByteLevel decoder") + 2;
        let bad = format!("{}\u{1}{}", &good[..q], &good[q..]);
        assert!(matches!(
            Tokenizer::from_json_with(&bad, None, false),
            Err(Error::Tokenizer(_))
        ));
        // Valid JSON that `tokenizers` 0.22 `expect`s on: a Precompiled normalizer with a number.
        let bad = good.replacen(
            "\"normalizer\": null",
            "\"normalizer\": {\"type\": \"Precompiled\", \"precompiled_charsmap\": 5}",
            1,
        );
        assert_ne!(bad, good);
        assert!(matches!(
            Tokenizer::from_json_with(&bad, None, false),
            Err(Error::Tokenizer(_))
        ));
    }

    pub(crate) fn smollm2() -> Tokenizer {
        Tokenizer::from_json_with(SMOLLM2_TOKENIZER, Some(1), false).expect("fixture tokenizer")
    }

    /// One shared instance (building it takes a while; property tests use it many times).
    pub(crate) fn smollm2_shared() -> &'static Tokenizer {
        static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
        TOK.get_or_init(smollm2)
    }

    #[test]
    fn encodes_like_transformers() {
        let tok = smollm2();
        let expected: serde_json::Value = serde_json::from_str(CHAT_EXPECTED).unwrap();
        let encs = expected["encodings"].as_array().unwrap();
        assert!(encs.len() >= 5);
        for e in encs {
            let text = e["text"].as_str().unwrap();
            let ids: Vec<u32> = e["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tok.encode(text).unwrap(), ids, "text {text:?}");
            // Round trip (without skipping special tokens) gives the text back.
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
    }

    #[test]
    fn special_tokens_in_text_are_single_ids() {
        let tok = smollm2();
        let ids = tok.encode("<|im_start|>user\nhi<|im_end|>").unwrap();
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&2));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
    }

    #[test]
    fn bos_prepended_only_when_asked_and_not_doubled() {
        let with = Tokenizer::from_json_with(SMOLLM2_TOKENIZER, Some(1), true).unwrap();
        let without = smollm2();
        let plain = without.encode("Hello there").unwrap();
        let bos = with.encode("Hello there").unwrap();
        assert_eq!(bos[0], 1);
        assert_eq!(&bos[1..], &plain[..]);
        // Text that already starts with BOS does not get a second one.
        let templ = with.encode("<|im_start|>user").unwrap();
        assert_eq!(templ, without.encode("<|im_start|>user").unwrap());
        assert!(Tokenizer::from_json_with(SMOLLM2_TOKENIZER, None, true).is_err());
    }

    #[test]
    fn bad_json_is_a_tokenizer_error() {
        let e = Tokenizer::from_json_with("{not json", None, false).unwrap_err();
        assert!(matches!(e, Error::Tokenizer(_)), "{e}");
    }
}
