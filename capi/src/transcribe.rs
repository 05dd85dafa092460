//! Speech to text through the C ABI: a transcriber handle over a transcription model (Whisper
//! exported by `onestep-export`), over [`onestep::generate::Transcriber`]. The same rules as the
//! session functions: statuses and the per-thread message, NULL checks, caught panics, a busy
//! handle refused, a cancel any thread may send. The transcriber's state, its checks and the
//! transcript's JSON are the ones the JNI bindings run too (`onestep_ffi::TranscriberCell`).

use std::ffi::{c_char, c_void};
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};

use onestep::generate::TranscribeOptions;
use onestep_ffi::TranscriberCell;

use crate::{
    boundary, c_string, check_size, non_null, non_null_mut, owned_c_string, utf8, FfiResult,
    OnestepModel, OnestepStatus,
};

/// Longest audio one [`onestep_transcribe`] call takes: 4 hours (at 16 kHz, 0.9 GB of samples).
pub const ONESTEP_TRANSCRIBE_MAX_SECONDS: u32 = 4 * 3600;
// The literal is cbindgen's to print; the limit is the one the bindings share.
const _: () = assert!(ONESTEP_TRANSCRIBE_MAX_SECONDS == onestep_ffi::TRANSCRIBE_MAX_SECONDS);

/// A transcription session over a transcription model (its own decoder state, reused call after
/// call). Free with [`onestep_transcriber_free`].
pub struct OnestepTranscriber {
    cell: TranscriberCell,
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
    // 0 is refused by `TranscriberCell::transcribe`, as for every binding.
    out.max_tokens_per_window = o.max_tokens_per_window as usize;
    out.timestamps = o.timestamps;
    Ok(out)
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
        let cell = TranscriberCell::new(m.model.clone())?;
        *out = Box::into_raw(Box::new(OnestepTranscriber { cell }));
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
    unsafe { transcriber.as_ref() }.map_or(0, |t| t.cell.sample_rate())
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
        t.cell.cancel();
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
        // The rate and the length before a sample is read.
        t.cell.check_audio(sample_rate, samples_len)?;
        let opts = transcribe_options_from_c(options)?;
        // SAFETY: non-NULL, `samples_len` readable floats per the contract; the length is bounded
        // above, far below `isize::MAX` bytes.
        let samples = unsafe { std::slice::from_raw_parts(samples, samples_len) };
        let mut on_text = |piece: &str| -> ControlFlow<()> {
            let Some(cb) = callback else {
                return ControlFlow::Continue(());
            };
            let c = c_string(piece);
            let len = c.as_bytes().len();
            // SAFETY: the caller's callback, with a NUL-terminated string alive for the call.
            if unsafe { cb(c.as_ptr(), len, user_data) } {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        };
        let done = t
            .cell
            .transcribe(samples, sample_rate, &opts, &mut on_text)?;
        if !json_out.is_null() {
            // SAFETY: non-NULL, writable (contract).
            unsafe { *json_out = owned_c_string(&done.json()).0 };
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
}
