//! Speech to text through the C ABI: a transcriber handle over a transcription model (Whisper
//! exported by `onestep-export`), over [`onestep::generate::Transcriber`]. The same rules as the
//! session functions: statuses and the per-thread message, NULL checks, caught panics, a busy
//! handle refused, a cancel any thread may send.

use std::ffi::{c_char, c_void};
use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use onestep::generate::{TranscribeOptions, Transcriber, Transcript};
use onestep_ffi::Phase;

use crate::{
    boundary, c_string, check_size, fail, non_null, non_null_mut, owned_c_string, runtime_fail,
    utf8, FfiResult, OnestepModel, OnestepStatus,
};

/// Longest audio one [`onestep_transcribe`] call takes: 4 hours (at 16 kHz, 0.9 GB of samples).
pub const ONESTEP_TRANSCRIBE_MAX_SECONDS: u32 = 4 * 3600;

/// A transcription session over a transcription model (its own decoder state, reused call after
/// call). Free with [`onestep_transcriber_free`].
pub struct OnestepTranscriber {
    sample_rate: u32,
    cancel: AtomicBool,
    /// Held for one call: a second concurrent call finds it busy; poisoned after a caught panic.
    inner: Mutex<Transcriber>,
}

/// Options of one transcription. Fill with [`onestep_transcribe_options_default`], then change
/// fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct OnestepTranscribeOptions {
    /// Set to `sizeof(OnestepTranscribeOptions)` by the caller.
    pub struct_size: u32,
    /// Language code (`en`, `de`, ...) of a multilingual model, NUL-terminated UTF-8 borrowed for the
    /// call; NULL: English. A code the model does not know is `ONESTEP_STATUS_INVALID_ARGUMENT`.
    /// Ignored by an English-only model.
    pub language: *const c_char,
    /// Translate into English instead of transcribing (multilingual models; ignored otherwise).
    pub translate: bool,
    /// Most tokens one 30 s window's text may take (at least 1; the default 224 is half the
    /// decoder's positions, which also bound it).
    pub max_tokens_per_window: u32,
    /// Segments timed by the model's timestamp tokens, windows following the last complete
    /// segment (the default, as faster-whisper's); false: one untimed segment a 30 s window
    /// (`<|notimestamps|>`).
    pub timestamps: bool,
}

/// Called with each piece of transcript text as it is decoded: `text` is NUL-terminated UTF-8 of
/// `text_len` bytes, borrowed for the duration of the call only. The pieces concatenate to the
/// segments' text (the transcript's `text` is that, trimmed). Return true to go on, false to stop
/// (as [`onestep_transcriber_cancel`]). Runs on the calling thread, inside [`onestep_transcribe`];
/// it must not call functions on the same transcriber other than [`onestep_transcriber_cancel`].
pub type OnestepTextCallback = Option<
    unsafe extern "C" fn(text: *const c_char, text_len: usize, user_data: *mut c_void) -> bool,
>;

fn transcribe_options_from_c(
    opts: *const OnestepTranscribeOptions,
) -> FfiResult<TranscribeOptions> {
    let mut out = TranscribeOptions::default();
    if opts.is_null() {
        return Ok(out);
    }
    // SAFETY: non-NULL; `struct_size` is the first field of every version.
    let size = unsafe { std::ptr::read(opts as *const u32) };
    check_size::<OnestepTranscribeOptions>(size, "options")?;
    // SAFETY: the caller's struct is at least as large as ours.
    let o = unsafe { &*opts };
    if !o.language.is_null() {
        out.language = Some(utf8(o.language, "options.language")?.to_string());
    }
    out.translate = o.translate;
    if o.max_tokens_per_window == 0 {
        return Err(fail(
            OnestepStatus::InvalidArgument,
            "options.max_tokens_per_window is 0; it must be at least 1",
        ));
    }
    out.max_tokens_per_window = o.max_tokens_per_window as usize;
    out.timestamps = o.timestamps;
    Ok(out)
}

/// Locks the transcriber for one call, never blocking: a second concurrent call is
/// `ONESTEP_STATUS_BUSY`.
fn lock(t: &OnestepTranscriber) -> FfiResult<MutexGuard<'_, Transcriber>> {
    const LOST: &str =
        "the transcriber was lost to an earlier internal error; free it and create a new one";
    t.inner.try_lock().map_err(|e| match e {
        TryLockError::WouldBlock => fail(
            OnestepStatus::Busy,
            "the transcriber is in use by another call",
        ),
        TryLockError::Poisoned(_) => fail(OnestepStatus::BadState, LOST),
    })
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

/// The transcript as JSON: the fields of [`Transcript`] (as its serde form names them) and
/// `cancelled`.
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

/// Creates a transcriber over `model`, which must be a transcription model (else
/// `ONESTEP_STATUS_INVALID_ARGUMENT`). On success `*transcriber_out` holds a transcriber to free with
/// [`onestep_transcriber_free`]; on failure it is set to NULL. The transcriber keeps its own
/// reference to the model.
#[no_mangle]
pub unsafe extern "C" fn onestep_transcriber_new(
    model: *const OnestepModel,
    transcriber_out: *mut *mut OnestepTranscriber,
) -> OnestepStatus {
    boundary("onestep_transcriber_new", || {
        let out = non_null_mut(transcriber_out, "transcriber_out")?;
        *out = std::ptr::null_mut();
        let m = non_null(model, "model")?;
        let t = Transcriber::new(m.model.clone()).map_err(|e| runtime_fail(e, Phase::Load))?;
        *out = Box::into_raw(Box::new(OnestepTranscriber {
            sample_rate: t.speech().sample_rate,
            cancel: AtomicBool::new(false),
            inner: Mutex::new(t),
        }));
        Ok(())
    })
}

/// Frees a transcriber (no call on it may be running). NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn onestep_transcriber_free(transcriber: *mut OnestepTranscriber) {
    if !transcriber.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `transcriber` came from `Box::into_raw` in this library (contract).
            drop(unsafe { Box::from_raw(transcriber) });
        }));
    }
}

/// The sample rate (samples per second, 16000 for Whisper) [`onestep_transcribe`] takes; 0 when
/// `transcriber` is NULL.
#[no_mangle]
pub unsafe extern "C" fn onestep_transcriber_sample_rate(
    transcriber: *const OnestepTranscriber,
) -> u32 {
    // SAFETY: a non-NULL transcriber is valid (contract).
    unsafe { transcriber.as_ref() }.map_or(0, |t| t.sample_rate)
}

/// Asks the running transcription of `transcriber` to stop after the current token: it returns
/// `ONESTEP_STATUS_OK` with the transcript so far (`"cancelled": true` in its JSON). The flag is
/// seen when the next piece of text is decoded (an audio window being encoded is finished first).
/// Safe to call from any thread while the transcriber is alive. A cancel with nothing running stops
/// the next transcription before it starts (an empty transcript). NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn onestep_transcriber_cancel(transcriber: *const OnestepTranscriber) {
    // SAFETY: a non-NULL transcriber is valid (contract); only the atomic flag is touched.
    if let Some(t) = unsafe { transcriber.as_ref() } {
        t.cancel.store(true, Ordering::Release);
    }
}

/// Fills `*options_out` (whose `struct_size` the caller set) with the default transcription
/// options: English (`language` NULL), transcribe (no translation), 224 tokens a window, timestamps.
#[no_mangle]
pub unsafe extern "C" fn onestep_transcribe_options_default(
    options_out: *mut OnestepTranscribeOptions,
) -> OnestepStatus {
    boundary("onestep_transcribe_options_default", || {
        let out = non_null_mut(options_out, "options_out")?;
        check_size::<OnestepTranscribeOptions>(out.struct_size, "options_out")?;
        let d = TranscribeOptions::default();
        *out = OnestepTranscribeOptions {
            struct_size: out.struct_size,
            language: std::ptr::null(),
            translate: d.translate,
            max_tokens_per_window: u32::try_from(d.max_tokens_per_window).unwrap_or(u32::MAX),
            timestamps: d.timestamps,
        };
        Ok(())
    })
}

/// Transcribes `samples_len` mono samples at `samples` (f32, nominally in [-1, 1], finite) recorded
/// at `sample_rate` Hz, which must be the model's rate ([`onestep_transcriber_sample_rate`], 16000
/// for Whisper): any other rate is `ONESTEP_STATUS_INVALID_ARGUMENT` — resampling (and mixing down
/// to mono) is the caller's. At most [`ONESTEP_TRANSCRIBE_MAX_SECONDS`] of audio; a NaN or infinite
/// sample is `ONESTEP_STATUS_INVALID_ARGUMENT` naming it; `samples_len` 0 gives an empty transcript.
/// The audio is decoded greedily in windows of up to 30 s (faster-whisper's `temperature=0`,
/// `beam_size=1`): with timestamps (the default) each segment is the text between two timestamp
/// tokens and a window starts where the last one's complete segments end; without, a window is
/// one segment and windows follow each other every 30 s.
///
/// `options` may be NULL (the defaults of [`onestep_transcribe_options_default`]). `callback` (may be
/// NULL) sees the text as it is decoded, with `user_data`; returning false stops as
/// [`onestep_transcriber_cancel`] does. When `json_out` is not NULL it receives the transcript as
/// JSON (set to NULL on failure), to free with [`onestep_string_free`]:
/// `{"text": "...", "cancelled": false, "segments": [{"start": s, "end": s, "text": "...",
/// "tokens": [..], "avg_logprob": x, "no_speech_prob": x}, ...], "stats": {"audio_s": s,
/// "windows": n, "encode_s": s, "decode_s": s, "tokens": n, "real_time_factor": x}}`
/// (`text` is the segments' text joined and trimmed; a stopped transcription holds the text up to
/// the stop). A step that fails is `ONESTEP_STATUS_RUNTIME`; the transcriber stays usable.
#[no_mangle]
pub unsafe extern "C" fn onestep_transcribe(
    transcriber: *mut OnestepTranscriber,
    samples: *const f32,
    samples_len: usize,
    sample_rate: u32,
    options: *const OnestepTranscribeOptions,
    callback: OnestepTextCallback,
    user_data: *mut c_void,
    json_out: *mut *mut c_char,
) -> OnestepStatus {
    boundary("onestep_transcribe", || {
        if !json_out.is_null() {
            // SAFETY: non-NULL, writable (contract).
            unsafe { *json_out = std::ptr::null_mut() };
        }
        let t = non_null(transcriber, "transcriber")?;
        non_null(samples, "samples")?;
        if sample_rate != t.sample_rate {
            return Err(fail(
                OnestepStatus::InvalidArgument,
                format!(
                    "sample_rate is {sample_rate} Hz; this model takes mono samples at {} Hz \
                     (resample the audio first)",
                    t.sample_rate
                ),
            ));
        }
        let max = ONESTEP_TRANSCRIBE_MAX_SECONDS as usize * t.sample_rate as usize;
        if samples_len > max {
            return Err(fail(
                OnestepStatus::InvalidArgument,
                format!(
                    "samples_len is {samples_len} ({} s at {} Hz); one call takes at most \
                     {ONESTEP_TRANSCRIBE_MAX_SECONDS} s ({max} samples)",
                    samples_len / t.sample_rate.max(1) as usize,
                    t.sample_rate
                ),
            ));
        }
        let opts = transcribe_options_from_c(options)?;
        // SAFETY: non-NULL, `samples_len` readable floats per the contract; the length is bounded
        // above, far below `isize::MAX` bytes.
        let samples = unsafe { std::slice::from_raw_parts(samples, samples_len) };
        if let Some(i) = samples.iter().position(|x| !x.is_finite()) {
            return Err(fail(
                OnestepStatus::InvalidArgument,
                format!("samples[{i}] is {} (audio must be finite)", samples[i]),
            ));
        }
        let mut inner = lock(t)?;
        // A cancel sent while nothing ran stops this call before it starts, as a session's does.
        let (transcript, stopped) = if t.cancel.swap(false, Ordering::AcqRel) {
            (Transcript::default(), true)
        } else {
            let mut stopped = false;
            let on_text = |piece: &str| -> ControlFlow<()> {
                if let Some(cb) = callback {
                    let c = c_string(piece);
                    let len = c.as_bytes().len();
                    // SAFETY: the caller's callback, with a NUL-terminated string alive for the call.
                    if !unsafe { cb(c.as_ptr(), len, user_data) } {
                        stopped = true;
                        return ControlFlow::Break(());
                    }
                }
                if t.cancel.swap(false, Ordering::AcqRel) {
                    stopped = true;
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            };
            let tr = inner
                .transcribe(samples, &opts, on_text)
                .map_err(|e| runtime_fail(e, Phase::Run))?;
            (tr, stopped)
        };
        drop(inner);
        if !json_out.is_null() {
            // SAFETY: non-NULL, writable (contract).
            unsafe { *json_out = owned_c_string(&transcript_json(&transcript, stopped)).0 };
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{onestep_last_error, onestep_model_free, onestep_model_load, onestep_string_free};
    use std::ffi::{CStr, CString};
    use std::ptr;

    fn last_error() -> String {
        unsafe { CStr::from_ptr(onestep_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    /// Without a Whisper export (the C test in tests/c has one): a text model is refused with a
    /// typed error, NULLs are refused, the options' defaults and sizes.
    #[test]
    fn text_model_nulls_and_options() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../runtime/tests/fixtures/step_q8_tied_f16kv.onnx"
        );
        let path = CString::new(path).unwrap();
        unsafe {
            let mut model: *mut OnestepModel = ptr::null_mut();
            assert_eq!(
                onestep_model_load(path.as_ptr(), &mut model),
                OnestepStatus::Ok
            );
            let mut t = ptr::dangling_mut::<OnestepTranscriber>();
            assert_eq!(
                onestep_transcriber_new(model, &mut t),
                OnestepStatus::InvalidArgument
            );
            assert!(t.is_null());
            assert!(
                last_error().contains("not a transcription model"),
                "{}",
                last_error()
            );
            assert_eq!(
                onestep_transcriber_new(ptr::null(), &mut t),
                OnestepStatus::NullPointer
            );
            assert_eq!(
                onestep_transcriber_new(model, ptr::null_mut()),
                OnestepStatus::NullPointer
            );
            onestep_model_free(model);

            let mut json = ptr::dangling_mut::<c_char>();
            let z = [0f32; 4];
            assert_eq!(
                onestep_transcribe(
                    ptr::null_mut(),
                    z.as_ptr(),
                    4,
                    16000,
                    ptr::null(),
                    None,
                    ptr::null_mut(),
                    &mut json
                ),
                OnestepStatus::NullPointer
            );
            assert!(json.is_null());
            assert_eq!(last_error(), "transcriber is NULL");
            onestep_transcriber_cancel(ptr::null());
            onestep_transcriber_free(ptr::null_mut());
            onestep_string_free(json);
            assert_eq!(onestep_transcriber_sample_rate(ptr::null()), 0);

            let mut o: OnestepTranscribeOptions = std::mem::zeroed();
            o.struct_size = 4;
            assert_eq!(
                onestep_transcribe_options_default(&mut o),
                OnestepStatus::InvalidArgument
            );
            o.struct_size = std::mem::size_of::<OnestepTranscribeOptions>() as u32;
            assert_eq!(
                onestep_transcribe_options_default(&mut o),
                OnestepStatus::Ok
            );
            assert!(o.language.is_null() && !o.translate && o.timestamps);
            assert_eq!(o.max_tokens_per_window, 224);
            let r = transcribe_options_from_c(&o)
                .map_err(|f| f.message)
                .unwrap();
            assert_eq!(r, TranscribeOptions::default());
            o.max_tokens_per_window = 0;
            let e = transcribe_options_from_c(&o).err().unwrap();
            assert_eq!(e.status, OnestepStatus::InvalidArgument);
            o.max_tokens_per_window = 7;
            o.translate = true;
            o.language = c"de".as_ptr();
            o.timestamps = false;
            let r = transcribe_options_from_c(&o)
                .map_err(|f| f.message)
                .unwrap();
            assert_eq!(
                (
                    r.language.as_deref(),
                    r.translate,
                    r.max_tokens_per_window,
                    r.timestamps
                ),
                (Some("de"), true, 7, false)
            );
        }
    }

    #[test]
    fn json_escapes_and_non_finite_numbers() {
        let mut t = Transcript {
            text: "a \"b\"\\\n\u{1}é".into(),
            ..Transcript::default()
        };
        t.stats.real_time_factor = f64::INFINITY;
        let j = transcript_json(&t, true);
        assert_eq!(
            j,
            "{\"text\":\"a \\\"b\\\"\\\\\\n\\u0001é\",\"cancelled\":true,\"segments\":[],\
             \"stats\":{\"audio_s\":0,\"windows\":0,\"encode_s\":0,\"decode_s\":0,\"tokens\":0,\
             \"real_time_factor\":null}}"
        );
    }
}
