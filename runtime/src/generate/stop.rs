//! Stop conditions: why a generation ended, and stop strings matched across piece boundaries.

use serde::Serialize;

use crate::error::{Error, Result};

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced one of the model's stop ids (EOS, `<|im_end|>`, ...). The stop token is not
    /// part of the output.
    StopToken {
        /// The id.
        id: u32,
    },
    /// The text produced one of the caller's stop strings; the output ends right before it.
    StopString {
        /// The stop string that matched.
        text: String,
    },
    /// `max_new_tokens` tokens were produced.
    MaxTokens,
    /// The KV cache is full: no room to feed the last token back. Not an error; reset or start a
    /// shorter conversation to go on.
    ContextFull,
    /// The caller cancelled (cancel flag, or the piece callback returned `Break`).
    Cancelled,
}

impl StopReason {
    /// A short stable name: `stop_token`, `stop_string`, `max_tokens`, `context_full`, `cancelled`.
    pub fn name(&self) -> &'static str {
        match self {
            StopReason::StopToken { .. } => "stop_token",
            StopReason::StopString { .. } => "stop_string",
            StopReason::MaxTokens => "max_tokens",
            StopReason::ContextFull => "context_full",
            StopReason::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::StopToken { id } => write!(f, "stop token {id}"),
            StopReason::StopString { text } => write!(f, "stop string {text:?}"),
            other => f.write_str(other.name()),
        }
    }
}

/// Checks caller-provided stop strings given as bytes (the C ABI's form): each must be non-empty,
/// valid UTF-8.
pub fn stop_strings_from_bytes(items: &[&[u8]]) -> Result<Vec<String>> {
    items
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let s = std::str::from_utf8(b).map_err(|e| {
                Error::InvalidArgument(format!("stop string {i} is not valid UTF-8: {e}"))
            })?;
            if s.is_empty() {
                return Err(Error::InvalidArgument(format!("stop string {i} is empty")));
            }
            Ok(s.to_string())
        })
        .collect()
}

/// What one [`StopMatcher::push`] decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopStep {
    /// Text that is safe to emit now.
    pub emit: String,
    /// The stop string that matched; when set, generation ends after emitting `emit`.
    pub stopped: Option<String>,
}

/// Finds stop strings in a stream of text pieces. Text that might be the start of a stop string is held
/// back until the next pieces decide; text before a match is emitted, the match and anything after it
/// is not.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops`; empty stop strings are an [`Error::InvalidArgument`].
    pub fn new(stops: &[String]) -> Result<Self> {
        if let Some(i) = stops.iter().position(|s| s.is_empty()) {
            return Err(Error::InvalidArgument(format!("stop string {i} is empty")));
        }
        Ok(Self {
            stops: stops.to_vec(),
            pending: String::new(),
        })
    }

    /// Adds `text` and returns what may be emitted.
    pub fn push(&mut self, text: &str) -> StopStep {
        if self.stops.is_empty() {
            return StopStep {
                emit: text.to_string(),
                stopped: None,
            };
        }
        self.pending.push_str(text);
        // Earliest match wins; at the same position the longest stop string.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|p| (p, s)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
        if let Some((pos, s)) = hit {
            let emit = self.pending[..pos].to_string();
            let stopped = Some(s.clone());
            self.pending.clear();
            return StopStep { emit, stopped };
        }
        // Hold the longest suffix of `pending` that is a proper prefix of some stop string.
        let hold = self.held_len();
        let cut = self.pending.len() - hold;
        let emit = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopStep {
            emit,
            stopped: None,
        }
    }

    fn held_len(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for s in &self.stops {
            // Candidate suffix starts, longest first, on char boundaries of `pending`.
            let max = (s.len() - 1).min(p.len());
            for start in (p.len() - max..p.len()).filter(|&i| p.is_char_boundary(i)) {
                let suffix = &p[start..];
                if s.starts_with(suffix) {
                    best = best.max(suffix.len());
                    break;
                }
            }
        }
        best
    }

    /// Releases the held text (the stream ended without a match).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops).unwrap();
        let mut out = String::new();
        for p in pieces {
            let st = m.push(p);
            out.push_str(&st.emit);
            if st.stopped.is_some() {
                return (out, st.stopped);
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn stop_string_across_pieces() {
        assert_eq!(
            run(&["</end>"], &["Hello </", "en", "d> more"]),
            ("Hello ".to_string(), Some("</end>".to_string()))
        );
        // A false start is released once it no longer matches.
        assert_eq!(
            run(&["STOP"], &["ST", "OX", " fine"]),
            ("STOX fine".to_string(), None)
        );
        // Earliest of several; multi-byte text before it.
        assert_eq!(
            run(&["b", "日本"], &["x日", "本b"]),
            ("x".to_string(), Some("日本".to_string()))
        );
    }

    #[test]
    fn held_text_never_leaks_a_stop() {
        let stops = vec!["abc".to_string()];
        let mut m = StopMatcher::new(&stops).unwrap();
        assert_eq!(m.push("xxab").emit, "xx");
        assert_eq!(m.push("c").emit, "");
    }

    #[test]
    fn invalid_stop_strings_are_rejected() {
        assert!(matches!(
            StopMatcher::new(&["".to_string()]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            stop_strings_from_bytes(&[b"ok", &[0xff, 0xfe]]),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(
            stop_strings_from_bytes(&["é".as_bytes()]).unwrap(),
            vec!["é".to_string()]
        );
    }

    proptest! {
        #[test]
        fn matches_a_plain_search(
            text in "[ab日\u{1f600}]{0,24}",
            stop in "[ab日\u{1f600}]{1,3}",
            cuts in proptest::collection::vec(0usize..30, 0..8),
        ) {
            // Split `text` at arbitrary char positions into pieces.
            let chars: Vec<char> = text.chars().collect();
            let mut idx: Vec<usize> = cuts.into_iter().filter(|&c| c <= chars.len()).collect();
            idx.push(0);
            idx.push(chars.len());
            idx.sort();
            idx.dedup();
            let pieces: Vec<String> =
                idx.windows(2).map(|w| chars[w[0]..w[1]].iter().collect()).collect();
            let refs: Vec<&str> = pieces.iter().map(|s| s.as_str()).collect();
            let (out, stopped) = run(&[stop.as_str()], &refs);
            match text.find(&stop) {
                Some(p) => {
                    prop_assert_eq!(out, &text[..p]);
                    prop_assert_eq!(stopped, Some(stop.clone()));
                }
                None => {
                    prop_assert_eq!(out, text.clone());
                    prop_assert_eq!(stopped, None);
                }
            }
        }
    }
}
