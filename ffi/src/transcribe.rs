//! A transcriber as the bindings hold it ([`TranscriberCell`]): the [`Transcriber`] behind one lock
//! that a second concurrent call finds busy, the cancel flag outside it, the checks of the audio and
//! the options, and the transcript's JSON form ([`Transcribed::json`]), which the C ABI returns and
//! the Kotlin and Swift APIs parse.

use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use onestep::generate::{TranscribeOptions, Transcriber, Transcript};
use onestep::Model;

use crate::{Fail, FfiResult, Phase, Status};

/// Longest audio one [`TranscriberCell::transcribe`] call takes: 4 hours (at 16 kHz, 0.9 GB of
/// samples).
pub const TRANSCRIBE_MAX_SECONDS: u32 = 4 * 3600;

/// One transcriber as a binding holds it: the transcriber behind one lock, the cancel flag outside.
pub struct TranscriberCell {
    sample_rate: u32,
    cancel: AtomicBool,
    /// Held for one call: a second concurrent call finds it busy; poisoned after a caught panic.
    inner: Mutex<Transcriber>,
}

/// A finished transcription: the transcript, and whether a cancel or the text callback stopped it
/// (the transcript then holds the text up to the stop).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transcribed {
    /// The transcript (so far, when stopped).
    pub transcript: Transcript,
    /// Stopped by a cancel or by the text callback.
    pub cancelled: bool,
}

impl Transcribed {
    /// The transcript as JSON: the fields of [`Transcript`] (as its serde form names them) and
    /// `cancelled`: `{"text": "...", "cancelled": false, "segments": [{"start": s, "end": s,
    /// "text": "...", "tokens": [..], "avg_logprob": x, "no_speech_prob": x}, ...], "stats":
    /// {"audio_s": s, "windows": n, "encode_s": s, "decode_s": s, "tokens": n,
    /// "real_time_factor": x}}`, without spaces; a number that is not finite is `null`.
    pub fn json(&self) -> String {
        transcript_json(&self.transcript, self.cancelled)
    }
}

impl TranscriberCell {
    /// A transcriber over `model`, which must be a transcription model (else
    /// [`Status::InvalidArgument`]).
    pub fn new(model: Arc<Model>) -> FfiResult<TranscriberCell> {
        let t = Transcriber::new(model).map_err(|e| Fail::runtime(e, Phase::Load))?;
        Ok(TranscriberCell {
            sample_rate: t.speech().sample_rate,
            cancel: AtomicBool::new(false),
            inner: Mutex::new(t),
        })
    }

    /// The sample rate (samples per second, 16000 for Whisper) the model takes.
    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// Asks the running transcription to stop after the current token (any thread, any time; with
    /// nothing running, the next transcription stops before it starts).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }

    /// Checks `len` samples at `sample_rate` before they are read: the model's rate, at most
    /// [`TRANSCRIBE_MAX_SECONDS`].
    pub fn check_audio(&self, sample_rate: u32, len: usize) -> FfiResult {
        if sample_rate != self.sample_rate {
            return Err(Fail::new(
                Status::InvalidArgument,
                format!(
                    "sample_rate is {sample_rate} Hz; this model takes mono samples at {} Hz \
                     (resample the audio first)",
                    self.sample_rate
                ),
            ));
        }
        let max = TRANSCRIBE_MAX_SECONDS as usize * self.sample_rate as usize;
        if len > max {
            return Err(Fail::new(
                Status::InvalidArgument,
                format!(
                    "samples_len is {len} ({} s at {} Hz); one call takes at most \
                     {TRANSCRIBE_MAX_SECONDS} s ({max} samples)",
                    len / self.sample_rate.max(1) as usize,
                    self.sample_rate
                ),
            ));
        }
        Ok(())
    }

    /// Locks the transcriber for one call, never blocking: a second concurrent call is
    /// [`Status::Busy`].
    fn lock(&self) -> FfiResult<MutexGuard<'_, Transcriber>> {
        const LOST: &str =
            "the transcriber was lost to an earlier internal error; free it and create a new one";
        self.inner.try_lock().map_err(|e| match e {
            TryLockError::WouldBlock => {
                Fail::new(Status::Busy, "the transcriber is in use by another call")
            }
            TryLockError::Poisoned(_) => Fail::new(Status::BadState, LOST),
        })
    }

    /// Transcribes `samples` (mono, finite) recorded at `sample_rate` Hz, which must be the model's
    /// ([`TranscriberCell::check_audio`]), with `opts`; `on_text` sees each piece of text as it is
    /// decoded (`Break` stops, as [`TranscriberCell::cancel`] does). A pending cancel stops the call
    /// before it starts (an empty transcript, cancelled). A failed step is [`Status::Runtime`]; the
    /// transcriber stays usable.
    pub fn transcribe(
        &self,
        samples: &[f32],
        sample_rate: u32,
        opts: &TranscribeOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> FfiResult<Transcribed> {
        self.check_audio(sample_rate, samples.len())?;
        if opts.max_tokens_per_window == 0 {
            return Err(Fail::new(
                Status::InvalidArgument,
                "max_tokens_per_window is 0; it must be at least 1",
            ));
        }
        if let Some(i) = samples.iter().position(|x| !x.is_finite()) {
            return Err(Fail::new(
                Status::InvalidArgument,
                format!("samples[{i}] is {} (audio must be finite)", samples[i]),
            ));
        }
        let mut inner = self.lock()?;
        // A cancel sent while nothing ran stops this call before it starts, as a session's does.
        if self.cancel.swap(false, Ordering::AcqRel) {
            return Ok(Transcribed {
                transcript: Transcript::default(),
                cancelled: true,
            });
        }
        let mut cancelled = false;
        let wrapped = |piece: &str| -> ControlFlow<()> {
            if on_text(piece).is_break() || self.cancel.swap(false, Ordering::AcqRel) {
                cancelled = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        };
        let transcript = inner
            .transcribe(samples, opts, wrapped)
            .map_err(|e| Fail::runtime(e, Phase::Run))?;
        Ok(Transcribed {
            transcript,
            cancelled,
        })
    }
}

/// `x` as a JSON number (shortest form of its own type; `null` when not finite, as serde_json
/// writes it).
fn json_num<T: Into<f64> + std::fmt::Display + Copy>(out: &mut String, x: T) {
    if x.into().is_finite() {
        let _ = write!(out, "{x}");
    } else {
        out.push_str("null");
    }
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn transcript_json(t: &Transcript, cancelled: bool) -> String {
    let mut o = String::with_capacity(256 + t.text.len() * 2);
    o.push_str("{\"text\":");
    json_str(&mut o, &t.text);
    o.push_str(",\"cancelled\":");
    o.push_str(if cancelled { "true" } else { "false" });
    o.push_str(",\"segments\":[");
    for (i, s) in t.segments.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        o.push_str("{\"start\":");
        json_num(&mut o, s.start);
        o.push_str(",\"end\":");
        json_num(&mut o, s.end);
        o.push_str(",\"text\":");
        json_str(&mut o, &s.text);
        o.push_str(",\"tokens\":[");
        for (j, tok) in s.tokens.iter().enumerate() {
            if j > 0 {
                o.push(',');
            }
            let _ = write!(o, "{tok}");
        }
        o.push_str("],\"avg_logprob\":");
        json_num(&mut o, s.avg_logprob);
        o.push_str(",\"no_speech_prob\":");
        json_num(&mut o, s.no_speech_prob);
        o.push('}');
    }
    let st = &t.stats;
    o.push_str("],\"stats\":{\"audio_s\":");
    json_num(&mut o, st.audio_s);
    let _ = write!(o, ",\"windows\":{}", st.windows);
    o.push_str(",\"encode_s\":");
    json_num(&mut o, st.encode_s);
    o.push_str(",\"decode_s\":");
    json_num(&mut o, st.decode_s);
    let _ = write!(o, ",\"tokens\":{}", st.tokens);
    o.push_str(",\"real_time_factor\":");
    json_num(&mut o, st.real_time_factor);
    o.push_str("}}");
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use onestep::generate::Segment;

    /// A text model is not a transcription model: a typed failure naming it.
    #[test]
    fn a_text_model_is_refused() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/micro/micro_llama_q8.onnx"
        );
        let e = TranscriberCell::new(Model::load(path).unwrap())
            .err()
            .unwrap();
        assert_eq!(e.status, Status::InvalidArgument);
        assert!(
            e.message.contains("not a transcription model"),
            "{}",
            e.message
        );
    }

    #[test]
    fn json_escapes_and_non_finite_numbers() {
        let mut t = Transcript {
            text: "a \"b\"\\\n\u{1}é".into(),
            ..Transcript::default()
        };
        t.stats.real_time_factor = f64::INFINITY;
        let j = Transcribed {
            transcript: t.clone(),
            cancelled: true,
        }
        .json();
        assert_eq!(
            j,
            "{\"text\":\"a \\\"b\\\"\\\\\\n\\u0001é\",\"cancelled\":true,\"segments\":[],\
             \"stats\":{\"audio_s\":0,\"windows\":0,\"encode_s\":0,\"decode_s\":0,\"tokens\":0,\
             \"real_time_factor\":null}}"
        );
        t.text = "Hi.".into();
        t.stats.real_time_factor = 2.5;
        t.segments.push(Segment {
            start: 0.0,
            end: 2.16,
            text: " Hi.".into(),
            tokens: vec![50363, 17250, 13],
            avg_logprob: -0.25,
            no_speech_prob: f32::NAN,
        });
        let j = Transcribed {
            transcript: t,
            cancelled: false,
        }
        .json();
        assert_eq!(
            j,
            "{\"text\":\"Hi.\",\"cancelled\":false,\"segments\":[{\"start\":0,\"end\":2.16,\
             \"text\":\" Hi.\",\"tokens\":[50363,17250,13],\"avg_logprob\":-0.25,\
             \"no_speech_prob\":null}],\"stats\":{\"audio_s\":0,\"windows\":0,\"encode_s\":0,\
             \"decode_s\":0,\"tokens\":0,\"real_time_factor\":2.5}}"
        );
    }

    /// With a Whisper export in `WHISPER` (scripts/test-bindings sets it): the checks before any
    /// audio is encoded, a pending cancel, empty audio. Skipped without one.
    #[test]
    fn checks_cancel_and_empty_audio_with_a_whisper_export() {
        let Some(path) = std::env::var_os("WHISPER").filter(|p| !p.is_empty()) else {
            eprintln!("WHISPER not set: skipped");
            return;
        };
        let cell = TranscriberCell::new(Model::load(path).unwrap()).unwrap();
        let rate = cell.sample_rate();
        assert_eq!(rate, 16000);
        let opts = TranscribeOptions::default();
        let mut go_on = |_: &str| ControlFlow::Continue(());
        let audio = vec![0f32; 1600];
        let e = cell
            .transcribe(&audio, 8000, &opts, &mut go_on)
            .unwrap_err();
        assert_eq!(e.status, Status::InvalidArgument);
        assert!(
            e.message.contains("8000") && e.message.contains("16000"),
            "{}",
            e.message
        );
        let too_long = TRANSCRIBE_MAX_SECONDS as usize * rate as usize + 1;
        assert_eq!(
            cell.check_audio(rate, too_long).unwrap_err().status,
            Status::InvalidArgument
        );
        let mut bad = audio.clone();
        bad[7] = f32::NAN;
        let e = cell.transcribe(&bad, rate, &opts, &mut go_on).unwrap_err();
        assert!(e.message.contains("samples[7]"), "{}", e.message);
        let zero = TranscribeOptions {
            max_tokens_per_window: 0,
            ..TranscribeOptions::default()
        };
        let e = cell
            .transcribe(&audio, rate, &zero, &mut go_on)
            .unwrap_err();
        assert_eq!(e.status, Status::InvalidArgument);

        let empty = cell.transcribe(&[], rate, &opts, &mut go_on).unwrap();
        assert_eq!(empty, Transcribed::default());
        cell.cancel();
        let pre = cell.transcribe(&audio, rate, &opts, &mut go_on).unwrap();
        assert!(pre.cancelled && pre.transcript.segments.is_empty());
        // A second call while one holds the lock is Busy, never a wait.
        let held = cell.lock().unwrap();
        let e = cell.transcribe(&[], rate, &opts, &mut go_on).unwrap_err();
        assert_eq!(e.status, Status::Busy);
        drop(held);
        // The cancel was consumed: the next call runs.
        assert!(
            !cell
                .transcribe(&[], rate, &opts, &mut go_on)
                .unwrap()
                .cancelled
        );
    }
}
