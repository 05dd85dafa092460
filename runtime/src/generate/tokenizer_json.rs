//! Reading a BPE `tokenizer.json` in one pass, into the `tokenizers` crate's own types.
//!
//! `tokenizers::Tokenizer::from_bytes` reads the `model` section through two untagged enums and a
//! `serde_json::Value` (the crate's way of accepting files with and without a `"type"` tag): each
//! buffers the whole section in small allocations before the next reads it. For Gemma 3's vocabulary
//! (262,144 tokens, 514,847 merges) that was 330 MB of peak heap, 2 s of load time, and 200 MB that
//! the allocator kept after the buffers were freed — more than the rest of the model's memory
//! besides its weights.
//!
//! [`read_bpe`] takes the same file apart with borrowed slices of the text: the top level as raw JSON
//! values, the vocabulary straight into the map the crate's BPE keeps, the merges straight into the
//! pair list its builder takes (both spellings: `["a", "b"]` and the older `"a b"`). The small sections
//! (normalizer, pre-tokenizer, post-processor, decoder, truncation, padding, added tokens) go through
//! the crate's own `Deserialize` impls and are set the way its reader sets them, added tokens last, so
//! the tokenizer is the one `from_bytes` builds (tested: both serialize to the same JSON). A file
//! whose model is not tagged `"BPE"` is not this reader's: it returns `None` and the caller uses the
//! crate's reader.

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::fmt;
use tokenizers::models::bpe::{BpeBuilder, Merges, Vocab};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PaddingParams, PostProcessorWrapper,
    PreTokenizerWrapper, TruncationParams,
};

/// Builds the tokenizer of a `tokenizer.json` whose model is BPE; `None` when the model is another
/// kind (or untagged), `Some(Err(message))` when the file is a BPE one that does not read.
pub(super) fn read_bpe(json: &str) -> Option<Result<tokenizers::Tokenizer, String>> {
    let top: HashMap<String, &RawValue> = serde_json::from_str(json).ok()?;
    let model = top.get("model")?;
    #[derive(Deserialize)]
    struct Tag<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<&'a str>,
    }
    let tag: Tag = serde_json::from_str(model.get()).ok()?;
    if tag.kind != Some("BPE") {
        return None;
    }
    Some(build(&top, model))
}

fn build(
    top: &HashMap<String, &RawValue>,
    model: &RawValue,
) -> Result<tokenizers::Tokenizer, String> {
    if let Some(v) = section::<String>(top, "version")? {
        if v != "1.0" {
            return Err(format!("unknown tokenizer version '{v}'"));
        }
    }
    let bpe: BpeJson = serde_json::from_str(model.get()).map_err(|e| format!("model: {e}"))?;
    let bpe = bpe.builder.build().map_err(|e| format!("model: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_normalizer(section::<NormalizerWrapper>(top, "normalizer")?)
        .with_pre_tokenizer(section::<PreTokenizerWrapper>(top, "pre_tokenizer")?)
        .with_post_processor(section::<PostProcessorWrapper>(top, "post_processor")?)
        .with_decoder(section::<DecoderWrapper>(top, "decoder")?)
        .with_truncation(section::<TruncationParams>(top, "truncation")?)
        .map_err(|e| format!("truncation: {e}"))?
        .with_padding(section::<PaddingParams>(top, "padding")?);
    let added: Vec<AddedToken> = section(top, "added_tokens")?.unwrap_or_default();
    tok.add_tokens(&added);
    Ok(tok)
}

/// The top-level section `key` read as a `T`; absent and `null` are both `None`.
fn section<'a, T: Deserialize<'a>>(
    top: &HashMap<String, &'a RawValue>,
    key: &str,
) -> Result<Option<T>, String> {
    match top.get(key) {
        None => Ok(None),
        Some(raw) => serde_json::from_str(raw.get()).map_err(|e| format!("{key}: {e}")),
    }
}

/// The `model` section of a BPE tokenizer, read into the crate's builder.
struct BpeJson {
    builder: BpeBuilder,
}

impl<'de> Deserialize<'de> for BpeJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(BpeVisitor)
    }
}

struct BpeVisitor;

impl<'de> Visitor<'de> for BpeVisitor {
    type Value = BpeJson;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a BPE model object")
    }

    /// The fields the crate's own BPE reader takes, with its meaning for each (`null` leaves the
    /// builder's default; unknown fields are skipped).
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BpeJson, A::Error> {
        let mut b = BpeBuilder::new();
        let (mut vocab, mut merges) = (None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "dropout" => {
                    if let Some(p) = map.next_value()? {
                        b = b.dropout(p);
                    }
                }
                "unk_token" => {
                    if let Some(s) = map.next_value()? {
                        b = b.unk_token(s);
                    }
                }
                "continuing_subword_prefix" => {
                    if let Some(s) = map.next_value()? {
                        b = b.continuing_subword_prefix(s);
                    }
                }
                "end_of_word_suffix" => {
                    if let Some(s) = map.next_value()? {
                        b = b.end_of_word_suffix(s);
                    }
                }
                "fuse_unk" => {
                    if let Some(v) = map.next_value()? {
                        b = b.fuse_unk(v);
                    }
                }
                "byte_fallback" => {
                    if let Some(v) = map.next_value()? {
                        b = b.byte_fallback(v);
                    }
                }
                "ignore_merges" => {
                    if let Some(v) = map.next_value()? {
                        b = b.ignore_merges(v);
                    }
                }
                "vocab" => vocab = Some(map.next_value::<VocabJson>()?.0),
                "merges" => merges = Some(map.next_value::<MergesJson>()?.0),
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        match (vocab, merges) {
            (Some(v), Some(m)) => Ok(BpeJson {
                builder: b.vocab_and_merges(v, m),
            }),
            _ => Err(de::Error::custom("missing vocab/merges")),
        }
    }
}

/// `{"token": id, ...}` into the crate's vocabulary map, sized once.
struct VocabJson(Vocab);

impl<'de> Deserialize<'de> for VocabJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = VocabJson;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of token to id")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<VocabJson, A::Error> {
                let mut v = Vocab::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((token, id)) = map.next_entry::<String, u32>()? {
                    v.insert(token, id);
                }
                Ok(VocabJson(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// The merge list, each entry `["a", "b"]` or `"a b"` (exactly one space, as the crate requires).
struct MergesJson(Merges);

impl<'de> Deserialize<'de> for MergesJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MergesJson;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of merges")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MergesJson, A::Error> {
                let mut m = Merges::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(Merge(a, b)) = seq.next_element()? {
                    m.push((a, b));
                }
                Ok(MergesJson(m))
            }
        }
        d.deserialize_seq(V)
    }
}

struct Merge(String, String);

impl<'de> Deserialize<'de> for Merge {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Merge;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a merge: [\"a\", \"b\"] or \"a b\"")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merge, A::Error> {
                let a: String = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let b: String = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(3, &self));
                }
                Ok(Merge(a, b))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Merge, E> {
                let mut parts = s.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok(Merge(a.to_owned(), b.to_owned())),
                    _ => Err(E::invalid_value(de::Unexpected::Str(s), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass reader and the crate's reader build the same tokenizer: same serialized JSON
    /// (vocabulary, merges in rank order, every section, added tokens) and the same ids and text on
    /// the SmolLM2 and tiny-family tokenizers, and on the SmolLM2 one with its merges respelled
    /// `"a b"` and its options changed.
    #[test]
    fn builds_what_the_crate_builds() {
        let smollm2 = include_str!("testdata/smollm2_tokenizer.json");
        let legacy = respell_merges(smollm2);
        let options = smollm2
            .replacen("\"fuse_unk\":false", "\"fuse_unk\":true", 1)
            .replacen("\"dropout\":null", "\"dropout\":0.0", 1)
            .replacen("\"truncation\":null", "\"truncation\":{\"direction\":\"Left\",\"max_length\":7,\"strategy\":\"LongestFirst\",\"stride\":0}", 1);
        assert_eq!(
            options.matches("true").count(),
            smollm2.matches("true").count() + 1
        );
        let mut files = vec![smollm2.to_string(), legacy, options];
        for family in ["llama_f16", "gemma3", "qwen3", "phi3", "mistral"] {
            let path = format!(
                "{}/../tests/fixtures/tiny/{family}/tokenizer.json",
                env!("CARGO_MANIFEST_DIR")
            );
            files.push(std::fs::read_to_string(&path).expect("the tiny fixtures are committed"));
        }
        let texts = [
            "Hello, world! 12345 ünïcödé  spaces\n\ttabs",
            "<|im_start|>user\nWhat is 2+2?<|im_end|>",
            "",
        ];
        for json in &files {
            let ours = read_bpe(json).expect("a BPE file").expect("reads");
            let theirs = tokenizers::Tokenizer::from_bytes(json.as_bytes()).expect("crate reads");
            assert_eq!(
                serde_json::to_string(&ours).unwrap(),
                serde_json::to_string(&theirs).unwrap()
            );
            for t in texts {
                let a = ours.encode(t, false).unwrap();
                let b = theirs.encode(t, false).unwrap();
                assert_eq!(a.get_ids(), b.get_ids(), "{t:?}");
                assert_eq!(
                    ours.decode(a.get_ids(), false).unwrap(),
                    theirs.decode(b.get_ids(), false).unwrap()
                );
            }
        }
    }

    /// `["a", "b"]` merges as `"a b"` strings (the older spelling).
    fn respell_merges(json: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
        let merges = v["model"]["merges"].as_array_mut().unwrap();
        assert!(merges[0].is_array(), "the fixture uses the pair spelling");
        for m in merges.iter_mut() {
            let s = format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap());
            *m = serde_json::Value::String(s);
        }
        serde_json::to_string(&v).unwrap()
    }

    #[test]
    fn other_models_are_not_this_readers() {
        for model in [
            r#"{"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}"#,
            r#"{"vocab": {"a": 0}, "merges": []}"#,
        ] {
            let json = format!(r#"{{"version": "1.0", "model": {model}}}"#);
            assert!(read_bpe(&json).is_none(), "{model}");
        }
        assert!(read_bpe("[1, 2]").is_none());
        assert!(read_bpe(r#"{"version": "1.0"}"#).is_none());
    }

    #[test]
    fn broken_bpe_files_are_errors() {
        let ok = r#"{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [MERGES]}}"#;
        assert!(read_bpe(&ok.replace("MERGES", r#"["a", "b"]"#))
            .unwrap()
            .is_ok());
        for (merges, why) in [
            (r#""a  b""#, "two spaces"),
            (r#""ab""#, "no space"),
            (r#"["a"]"#, "one side"),
            (r#"["a", "b", "c"]"#, "three sides"),
            (r#"["a", "c"]"#, "a side out of the vocabulary"),
            (r#"["b", "a"]"#, "a result out of the vocabulary"),
            ("7", "a number"),
        ] {
            let r = read_bpe(&ok.replace("MERGES", merges)).expect("a BPE file");
            assert!(r.is_err(), "{why}");
        }
        let v2 = ok.replace("MERGES", "").replace("\"1.0\"", "\"2.0\"");
        assert!(read_bpe(&v2).unwrap().unwrap_err().contains("version"));
        let no_merges = r#"{"model": {"type": "BPE", "vocab": {}}}"#;
        assert!(read_bpe(no_merges).unwrap().is_err());
        let bad_decoder = ok.replace("MERGES", "").replacen(
            "{\"version\"",
            "{\"decoder\": {\"type\": 5}, \"version\"",
            1,
        );
        assert!(read_bpe(&bad_decoder)
            .unwrap()
            .unwrap_err()
            .contains("decoder"));
    }
}
