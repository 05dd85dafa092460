//! UTF-8-safe streaming detokenizer.
//!
//! Byte-level BPE tokens can end in the middle of a multi-byte character, and decoders such as
//! Metaspace change a token's text depending on its neighbours, so decoding each token alone is wrong.
//! [`StreamDecoder`] decodes a small window of recent ids with the tokenizer's own decoder and emits
//! only the text that grew past what it already emitted, holding back while the window's text ends in
//! an incomplete character (the decoder renders it as U+FFFD). [`StreamDecoder::finish`] releases
//! whatever is still held, so the concatenation of all pieces equals the decode of all ids. Special
//! tokens are skipped.

use crate::error::Result;
use crate::generate::tokenizer::Tokenizer;

const REPLACEMENT: char = '\u{FFFD}';

/// Incremental decoder state for one generated sequence.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the decode window: text of `ids[prefix..read]` has been emitted already.
    prefix: usize,
    /// End of the emitted part of the window.
    read: usize,
}

/// Byte length of the longest common prefix of `a` and `b` that ends on a char boundary of both.
fn common_prefix_len(a: &str, b: &str) -> usize {
    let mut n = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            return i;
        }
        n = i + ca.len_utf8();
    }
    n
}

impl StreamDecoder {
    /// A decoder with nothing decoded yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the newly completed text (empty while a character is still incomplete or
    /// for special tokens).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let done = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        if now.len() <= done.len() || now.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        let piece = if now.starts_with(&done) {
            now[done.len()..].to_string()
        } else {
            // A decoder rewrote earlier text (rare); emit from the first difference on. Keeping the
            // stream well-formed matters more than reproducing an earlier edit.
            now[common_prefix_len(&done, &now)..].to_string()
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(piece)
    }

    /// Releases any held text (an incomplete character at the end renders as U+FFFD) and forgets the
    /// sequence.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let done = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        let rest = if now.starts_with(&done) {
            now[done.len()..].to_string()
        } else {
            now[common_prefix_len(&done, &now)..].to_string()
        };
        *self = Self::default();
        Ok(rest)
    }

    /// Ids pushed since the last [`StreamDecoder::finish`].
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::tokenizer::tests::smollm2_shared as smollm2;
    use proptest::prelude::*;

    fn stream_all(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
        let mut d = StreamDecoder::new();
        let mut pieces: Vec<String> = ids.iter().map(|&id| d.push(tok, id).unwrap()).collect();
        pieces.push(d.finish(tok).unwrap());
        pieces
    }

    #[test]
    fn emoji_split_across_tokens_is_held_back() {
        let tok = smollm2();
        let text = "a😀b日本語c";
        let ids = tok.encode(text).unwrap();
        // The emoji's four bytes span more than one byte-level token in this vocabulary.
        assert!(ids.len() > text.chars().count(), "{ids:?}");
        let pieces = stream_all(tok, &ids);
        for p in &pieces {
            assert!(!p.contains(REPLACEMENT), "{pieces:?}");
        }
        assert_eq!(pieces.concat(), text);
        // Some token produced no text yet (held back), proving the hold-back path ran.
        assert!(
            pieces[..ids.len()].iter().any(|p| p.is_empty()),
            "{pieces:?}"
        );
    }

    #[test]
    fn special_tokens_are_skipped() {
        let tok = smollm2();
        let ids = tok
            .encode("<|im_start|>assistant\nHi there<|im_end|>")
            .unwrap();
        assert_eq!(stream_all(tok, &ids).concat(), "assistant\nHi there");
    }

    #[test]
    fn truncated_character_is_released_at_finish() {
        let tok = smollm2();
        let ids = tok.encode("x😀").unwrap();
        let cut = &ids[..ids.len() - 1];
        let pieces = stream_all(tok, cut);
        assert_eq!(pieces.concat(), tok.decode(cut, true).unwrap());
        assert!(pieces.last().unwrap().contains(REPLACEMENT));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn pieces_concatenate_to_full_decode(
            s in proptest::collection::vec(
                prop_oneof![
                    "[a-zA-Z0-9 .,!?\n]{1,8}",
                    "[\u{4e00}-\u{9fff}]{1,4}",
                    "[\u{1f300}-\u{1f6ff}]{1,3}",
                    "[\u{00c0}-\u{024f}\u{0400}-\u{04ff}]{1,4}",
                    "[\u{0600}-\u{06ff}\u{0900}-\u{097f}]{1,4}",
                ],
                1..12,
            ).prop_map(|v| v.concat())
        ) {
            let tok = smollm2();
            let ids = tok.encode(&s).unwrap();
            let pieces = stream_all(tok, &ids);
            for p in &pieces {
                // Valid UTF-8 by construction (String); no piece carries a broken character.
                prop_assert!(!p.contains(REPLACEMENT), "{:?}", pieces);
            }
            prop_assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap());
            prop_assert_eq!(pieces.concat(), s);
        }

        #[test]
        fn arbitrary_ids_stream_consistently(ids in proptest::collection::vec(0u32..49152, 1..40)) {
            // Random ids may never form valid UTF-8; the stream must still equal the lossy full
            // decode and never split a character.
            let tok = smollm2();
            let pieces = stream_all(tok, &ids);
            prop_assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap());
        }
    }
}
