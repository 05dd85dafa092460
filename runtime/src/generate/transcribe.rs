//! Speech to text over a transcription model (Whisper exported by `onestep-export`): the audio taken
//! in windows of up to 30 s, each encoded once ([`Model::encode`]), then decoded greedily from the
//! prompt `[<|startofprev|> previous text…] <|startoftranscript|> [language task]` — the decoding
//! faster-whisper does with `temperature=0, beam_size=1, condition_on_previous_text=True`, whose
//! transcripts the tests hold this to.
//!
//! With timestamps (the default, as faster-whisper's): the tokens are chosen on the host under
//! Whisper's timestamp rules (`timestamps.rs`), a window's text is split into segments at each
//! timestamp pair, and the next window starts at the last timestamp closing a pair (its unfinished
//! text is decoded again there) or, after a final lone timestamp, at the window's end. Without
//! (`<|notimestamps|>` ends the prompt): the graph chooses each token, a window is one segment and
//! windows follow each other every 30 s.
//!
//! A window whose no-speech probability (of `<|nocaptions|>` after the start token) is above
//! [`TranscribeOptions::no_speech_threshold`] while its mean log-probability is below
//! [`TranscribeOptions::log_prob_threshold`] is silence: it gives no segment.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use crate::contract::Speech;
use crate::error::{Error, Result};
use crate::generate::timestamps::{self, Advance, TimestampRules};
use crate::generate::{StreamDecoder, Tokenizer};
use crate::model::{Model, StepSampling, StepState};

/// What to transcribe and how.
#[derive(Debug, Clone, PartialEq)]
pub struct TranscribeOptions {
    /// Language code (`en`, `de`, …) of a multilingual model; `None`: English. Ignored by an
    /// English-only model.
    pub language: Option<String>,
    /// Translate into English instead of transcribing (multilingual models).
    pub translate: bool,
    /// Most tokens a window's text may take (at most half the decoder's positions).
    pub max_tokens_per_window: usize,
    /// Give each window the text decoded so far as its prompt (`<|startofprev|>`, last 223 tokens).
    pub condition_on_previous_text: bool,
    /// A window above this no-speech probability…
    pub no_speech_threshold: f32,
    /// …and below this mean log-probability gives no segment.
    pub log_prob_threshold: f32,
    /// Segments timed by the model's timestamp tokens (else one segment a 30 s window).
    pub timestamps: bool,
    /// The latest the first timestamp of a window may be, in seconds.
    pub max_initial_timestamp: f32,
}

impl Default for TranscribeOptions {
    fn default() -> Self {
        TranscribeOptions {
            language: None,
            translate: false,
            max_tokens_per_window: 224,
            condition_on_previous_text: true,
            no_speech_threshold: 0.6,
            log_prob_threshold: -1.0,
            timestamps: true,
            max_initial_timestamp: 1.0,
        }
    }
}

/// A timed piece of the transcript: the text between two timestamps, or (without timestamps) one
/// window's.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Segment {
    /// Start in seconds.
    pub start: f32,
    /// End in seconds.
    pub end: f32,
    /// The text (with its leading space, as decoded).
    pub text: String,
    /// The tokens of the text (its timestamp tokens included).
    pub tokens: Vec<u32>,
    /// Mean log-probability of its window's chosen tokens and end of text (over the logits the choice
    /// saw: the suppressed tokens left out, as CTranslate2 computes it).
    pub avg_logprob: f32,
    /// Probability of the no-speech token after its window's start token.
    pub no_speech_prob: f32,
}

/// Time and counts of one transcription.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TranscribeStats {
    /// Seconds of audio.
    pub audio_s: f64,
    /// Windows encoded.
    pub windows: usize,
    /// Seconds spent in the encoder.
    pub encode_s: f64,
    /// Seconds spent in the decoder steps.
    pub decode_s: f64,
    /// Tokens decoded (prompts not counted).
    pub tokens: usize,
    /// Audio seconds per wall second.
    pub real_time_factor: f64,
}

/// A transcription.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Transcript {
    /// The segments' text joined, trimmed.
    pub text: String,
    /// The segments, in time order.
    pub segments: Vec<Segment>,
    /// Timing.
    pub stats: TranscribeStats,
}

/// A transcription session over a shared model: its own decoder state, reused call after call.
pub struct Transcriber {
    model: Arc<Model>,
    speech: Speech,
    tokenizer: Arc<Tokenizer>,
    state: StepState,
}

impl Transcriber {
    /// A session over `model`, which must be a transcription model.
    pub fn new(model: Arc<Model>) -> Result<Transcriber> {
        let speech = model.speech().cloned().ok_or_else(|| {
            Error::InvalidArgument("this is not a transcription model (no encoder phase)".into())
        })?;
        let tokenizer = model.tokenizer()?;
        let state = model.new_state()?;
        Ok(Transcriber {
            model,
            speech,
            tokenizer,
            state,
        })
    }

    /// The model's audio description (sample rate, window, tokens).
    pub fn speech(&self) -> &Speech {
        &self.speech
    }

    /// Transcribes `samples` (mono, at [`Speech::sample_rate`], finite). `on_text` receives the text
    /// as it is decoded; returning `Break` stops after the current token (the transcript so far is
    /// returned).
    pub fn transcribe(
        &mut self,
        samples: &[f32],
        opts: &TranscribeOptions,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Transcript> {
        self.transcribe_with(samples, opts, on_text, |_| ControlFlow::Continue(()))
    }

    /// Like [`Transcriber::transcribe`], also giving each segment to `on_segment` once it is complete
    /// (its times known); returning `Break` from either stops.
    pub fn transcribe_with(
        &mut self,
        samples: &[f32],
        opts: &TranscribeOptions,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
        mut on_segment: impl FnMut(&Segment) -> ControlFlow<()>,
    ) -> Result<Transcript> {
        let t0 = Instant::now();
        let sp = self.speech.clone();
        let prompt_tail = self.prompt_tail(opts)?;
        // Mel frames: `hop` samples each, `window` a window; the audio's whole frames.
        let window = (2 * sp.audio_frames).max(1);
        let hop = (sp.window_samples / window).max(1);
        let content = samples.len() / hop;
        let frames_per_step =
            ((sp.time_precision * sp.sample_rate as f32 / hop as f32).round() as usize).max(1);
        let seconds = |frames: usize| (frames * hop) as f32 / sp.sample_rate as f32;
        let mut out = Transcript::default();
        let mut previous: Vec<u32> = Vec::new();
        let mut stopped = false;
        let mut seek = 0;
        while seek < content && !stopped {
            let size = window.min(content - seek);
            let te = Instant::now();
            self.model
                .encode(&mut self.state, &samples[seek * hop..(seek + size) * hop])?;
            out.stats.encode_s += te.elapsed().as_secs_f64();
            out.stats.windows += 1;
            let td = Instant::now();
            let mut prefix = Vec::new();
            if opts.condition_on_previous_text && !previous.is_empty() {
                let keep = previous.len().min(self.model.info().max_cache / 2 - 1);
                prefix.push(sp.tokens.sot_prev);
                prefix.extend_from_slice(&previous[previous.len() - keep..]);
            }
            prefix.push(sp.tokens.sot);
            let win =
                self.decode_window(&prefix, &prompt_tail, opts, &mut on_text, &mut stopped)?;
            out.stats.decode_s += td.elapsed().as_secs_f64();
            out.stats.tokens += win.tokens.len() + 1;
            let silent = win.no_speech_prob > opts.no_speech_threshold
                && win.avg_logprob < opts.log_prob_threshold;
            if silent {
                seek += size;
                continue;
            }
            let steps = (size / frames_per_step) as u32;
            let (pieces, advance) = if opts.timestamps {
                timestamps::split(&win.tokens, sp.tokens.timestamp_begin, steps)
            } else {
                let whole = timestamps::Piece {
                    start: 0,
                    end: steps,
                    tokens: win.tokens,
                };
                (vec![whole], Advance::Window)
            };
            let at = |step: u32| seconds(seek + step as usize * frames_per_step);
            for p in pieces {
                let text = self.text(&p.tokens)?;
                let (start, end) = match opts.timestamps {
                    true => (at(p.start), at(p.end)),
                    false => (seconds(seek), seconds(seek + size)),
                };
                if start == end || text.trim().is_empty() {
                    continue;
                }
                previous.extend_from_slice(&p.tokens);
                let seg = Segment {
                    start,
                    end,
                    text,
                    tokens: p.tokens,
                    avg_logprob: win.avg_logprob,
                    no_speech_prob: win.no_speech_prob,
                };
                stopped |= on_segment(&seg).is_break();
                out.segments.push(seg);
            }
            seek += match advance {
                Advance::Window => size,
                Advance::To(step) => step as usize * frames_per_step,
            };
        }
        out.text = out
            .segments
            .iter()
            .map(|s| s.text.as_str())
            .collect::<String>()
            .trim()
            .to_string();
        out.stats.audio_s = samples.len() as f64 / sp.sample_rate as f64;
        out.stats.real_time_factor = out.stats.audio_s / t0.elapsed().as_secs_f64().max(1e-9);
        Ok(out)
    }

    /// The prompt after the start token: language and task (multilingual models), then
    /// `<|notimestamps|>` unless timed.
    fn prompt_tail(&self, opts: &TranscribeOptions) -> Result<Vec<u32>> {
        let t = &self.speech.tokens;
        let mut tail = Vec::new();
        if self.speech.multilingual {
            let lang = opts.language.as_deref().unwrap_or("en");
            let id = self.speech.languages.get(lang).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "language `{lang}` is not one of the model's ({} known)",
                    self.speech.languages.len()
                ))
            })?;
            tail.push(*id);
            tail.push(if opts.translate {
                t.translate
            } else {
                t.transcribe
            });
        }
        if !opts.timestamps {
            tail.push(t.no_timestamps);
        }
        Ok(tail)
    }

    /// Decodes the encoded window greedily after `prefix` (ending in the start token) and `tail`
    /// (empty for an English-only model with timestamps: the start token's step gives the first
    /// choice). With timestamps each token is chosen here, under [`TimestampRules`]; without, the
    /// graph's choice is taken.
    fn decode_window(
        &mut self,
        prefix: &[u32],
        tail: &[u32],
        opts: &TranscribeOptions,
        on_text: &mut impl FnMut(&str) -> ControlFlow<()>,
        stopped: &mut bool,
    ) -> Result<Window> {
        let (model, state) = (&self.model, &mut self.state);
        let info = model.info();
        let t = &self.speech.tokens;
        let chunk = info.max_chunk.max(1);
        // The start token's logits give the no-speech probability.
        let mut last = None;
        for part in prefix.chunks(chunk) {
            last = Some(model.step(state, part, &StepSampling::GREEDY)?);
        }
        let last = last.ok_or_else(|| Error::internal("a window's prompt is empty"))?;
        let no_speech = softmax_at(&last.logits, t.no_speech as usize);
        // CTranslate2's bound, min(224, 448 − (prompt − 1)): the last token needs no cache slot.
        let room = info.max_cache.saturating_sub(prefix.len() + tail.len()) + 1;
        let limit = opts.max_tokens_per_window.min(room);
        let mut out = if tail.is_empty() {
            last
        } else {
            state.set_first_token(true);
            let o = model.step(state, tail, &StepSampling::GREEDY)?;
            state.set_first_token(false);
            o
        };
        let rules = opts.timestamps.then(|| TimestampRules {
            eot: t.eot,
            no_timestamps: t.no_timestamps,
            begin: t.timestamp_begin,
            max_initial: t.timestamp_begin
                + (opts.max_initial_timestamp.max(0.0) / self.speech.time_precision).round() as u32,
        });
        let mut tokens = Vec::new();
        let mut logprob = 0.0f64;
        let mut stream = StreamDecoder::new();
        loop {
            let mut seen = out.logits;
            let begin = if tokens.is_empty() {
                &self.speech.suppress_begin[..]
            } else {
                &[]
            };
            for &i in self.speech.suppress.iter().chain(begin) {
                if let Some(x) = seen.get_mut(i as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
            let tok = match &rules {
                Some(r) => {
                    r.apply(&mut seen, &tokens);
                    argmax(&seen)
                }
                None => out.next_token,
            };
            logprob += log_softmax_at(&seen, tok as usize);
            if tok == t.eot || tokens.len() >= limit {
                break;
            }
            tokens.push(tok);
            if tok < t.sot {
                let piece = stream.push(&self.tokenizer, tok)?;
                if !piece.is_empty() && on_text(&piece).is_break() {
                    *stopped = true;
                    break;
                }
            }
            if state.len() >= info.max_cache {
                break;
            }
            out = model.step(state, &[tok], &StepSampling::GREEDY)?;
        }
        let rest = stream.finish(&self.tokenizer)?;
        if !rest.is_empty() && !*stopped {
            let _ = on_text(&rest);
        }
        Ok(Window {
            avg_logprob: (logprob / (tokens.len() + 1) as f64) as f32,
            tokens,
            no_speech_prob: no_speech as f32,
        })
    }

    /// The text of `tokens`, special and timestamp tokens left out.
    fn text(&self, tokens: &[u32]) -> Result<String> {
        let text: Vec<u32> = tokens
            .iter()
            .copied()
            .filter(|&i| i < self.speech.tokens.eot)
            .collect();
        self.tokenizer.decode(&text, true)
    }
}

/// One window's decode.
struct Window {
    tokens: Vec<u32>,
    avg_logprob: f32,
    no_speech_prob: f32,
}

/// `log softmax(logits)[i]`, in f64.
fn log_softmax_at(logits: &[f32], i: usize) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    logits
        .get(i)
        .map_or(f64::NEG_INFINITY, |&x| x as f64 - m - sum.ln())
}

/// The first index of the largest of `logits`.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `softmax(logits)[i]`.
fn softmax_at(logits: &[f32], i: usize) -> f64 {
    log_softmax_at(logits, i).exp()
}
