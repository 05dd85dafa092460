//! C ABI of the onestep runtime: opaque model, session and transcriber handles over the safe Rust
//! API ([`onestep::Model`], [`onestep::generate::Session`], [`onestep::generate::Transcriber`] in
//! `transcribe.rs`). The header `include/onestep.h` is generated from this file and its modules by
//! cbindgen (`cbindgen.toml`).
//!
//! Conventions (also in the header):
//! - Every function returns an [`OnestepStatus`] (except the free functions, `onestep_last_error`,
//!   `onestep_status_name`, `onestep_version`, `onestep_session_cancel`,
//!   `onestep_transcriber_cancel` and `onestep_transcriber_sample_rate`). On failure the per-thread
//!   message is read with [`onestep_last_error`].
//! - Every pointer argument is checked for NULL (`ONESTEP_STATUS_NULL_POINTER`). Pointers must
//!   otherwise be valid for the documented size; strings are NUL-terminated UTF-8.
//! - Every buffer handed to the caller has a matching free function named where it is returned.
//! - No Rust panic crosses the boundary: every entry point catches it and returns
//!   `ONESTEP_STATUS_PANIC`.
//! - Structs the caller passes in or out start with `struct_size`, which the caller sets to
//!   `sizeof(struct)`; a library accepts any size at least as large as the version it knows.
//! - Thread safety: a model may be shared by any number of sessions on any threads. A session is
//!   used by one thread at a time (a second concurrent call gets `ONESTEP_STATUS_BUSY`), except
//!   [`onestep_session_cancel`], which any thread may call at any time while the session is alive.
//!   A transcriber follows the same rules ([`onestep_transcriber_cancel`]).
#![warn(missing_docs)]
#![allow(clippy::missing_safety_doc)] // the safety contract is stated once, above and in the header

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use onestep::generate::{stop_strings_from_bytes, ChatMessage, GenerateOptions, Piece, StopReason};
use onestep::{Error, GenerationDefaults, LoadOptions, Model};
use onestep_ffi::{Phase, Prompt, SessionCell, Status};

mod transcribe;
pub use transcribe::*;

/// Version of this C ABI; bumped on any incompatible change of the header.
pub const ONESTEP_ABI_VERSION: u32 = 1;

/// Outcome of a call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnestepStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullPointer = 1,
    /// An argument is out of range (options, prompt longer than the cache, empty prompt, bad
    /// `struct_size`, ...).
    InvalidArgument = 2,
    /// A string argument is not valid UTF-8.
    InvalidUtf8 = 3,
    /// Reading the model file failed at the OS level (missing file, permissions, ...).
    Io = 4,
    /// The model bytes are not a valid onestep step graph (corrupt, truncated, wrong contract).
    InvalidModel = 5,
    /// The model uses ops or an opset this runtime does not implement.
    Unsupported = 6,
    /// A step failed while running (the session's cache is reset; the session stays usable).
    Runtime = 7,
    /// Tokenizer failure.
    Tokenizer = 8,
    /// Chat-template failure (or the model has no chat template).
    Template = 9,
    /// The session is in use by another call (another thread, or a re-entrant call from a callback).
    Busy = 10,
    /// The call does not fit the session's state (`onestep_session_next_piece` with no generation
    /// started).
    BadState = 11,
    /// The operation was cancelled.
    Cancelled = 12,
    /// An internal error (a Rust panic) was caught; the handle involved may be unusable.
    Panic = 13,
    /// The requested device cannot be used or failed (no GPU adapter, a step its kernels do not take,
    /// its limits or memory, a rejected kernel, device lost).
    Device = 14,
    /// A broken invariant inside onestep: a bug, never the input's fault (please report the message).
    /// The handles stay usable.
    Internal = 15,
}

/// Why a generation ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnestepStopReason {
    /// No generation has finished yet.
    None = 0,
    /// The model produced a stop token (EOS, ...); `stop_token_id` holds it.
    StopToken = 1,
    /// The text reached one of the caller's stop strings (the text ends right before it).
    StopString = 2,
    /// `max_new_tokens` were generated.
    MaxTokens = 3,
    /// The KV cache is full.
    ContextFull = 4,
    /// Cancelled (`onestep_session_cancel`, or the piece callback returned false).
    Cancelled = 5,
}

/// A loaded model (immutable; share it between sessions and threads). Free with
/// [`onestep_model_free`].
pub struct OnestepModel {
    model: Arc<Model>,
    architecture: CString,
    device: CString,
    device_note: Option<CString>,
}

/// One conversation (one KV cache) over a model. Free with [`onestep_session_free`]. Its state
/// machine is the one the JNI bindings run too (`onestep_ffi::SessionCell`).
pub struct OnestepSession {
    cell: SessionCell,
}

/// Options of one generation. Fill with [`onestep_options_default`], then change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct OnestepOptions {
    /// Set to `sizeof(OnestepOptions)` by the caller.
    pub struct_size: u32,
    /// Most tokens to generate (at least 1).
    pub max_new_tokens: u32,
    /// Temperature; `<= 0` is greedy.
    pub temperature: f32,
    /// Top-k; 0 disables.
    pub top_k: u32,
    /// Top-p in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Whether `seed` is used (reseeds the session's generator: same seed, same tokens).
    pub has_seed: bool,
    /// Keep generating past the model's stop tokens.
    pub ignore_stop_tokens: bool,
    /// The seed, when `has_seed`.
    pub seed: u64,
    /// `stop_strings_len` NUL-terminated UTF-8 strings (borrowed for the call); may be NULL when
    /// `stop_strings_len` is 0.
    pub stop_strings: *const *const c_char,
    /// Number of stop strings.
    pub stop_strings_len: usize,
}

/// How a model is loaded. Fill with [`onestep_load_options_default`], then change fields. The strings
/// are borrowed for the call (NUL-terminated UTF-8; NULL takes the default).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct OnestepLoadOptions {
    /// Set to `sizeof(OnestepLoadOptions)` by the caller.
    pub struct_size: u32,
    /// `cpu` (NULL), `auto` (the faster of the GPU and the CPU, measured over a few decode steps on the
    /// first load and remembered in the `gpu_pipeline_cache` folder of `settings`; a software adapter
    /// is left untried), `gpu` (the best GPU; an error when none can be used) or `gpu:N` (adapter N).
    pub device: *const c_char,
    /// The GPU API: `vulkan`, `metal`, `dx12` or `gl`; NULL: any.
    pub gpu_backend: *const c_char,
    /// GPU memory for one session's KV cache: `all` (NULL), bytes (`48M`, `1GiB`) or a share of the
    /// full cache (`50%`). Layers beyond it stay in host memory and stream through two GPU slots.
    pub gpu_cache_budget: *const c_char,
    /// Positions a host KV-cache page; 0: the default (64).
    pub kv_page_rows: u32,
    /// How the CPU multiplies 4- and 8-bit weights: `fast` (NULL, the default: activations quantized
    /// to 8 bits — two 8-bit digits in decode and the output layer — and integer dot products) or
    /// `exact` (f32 activations: onnxruntime's results to ~1e-4, the GPU kernels' math).
    pub precision: *const c_char,
    /// Further settings as `key=value` pairs separated by commas (NULL: none): `profile=on`, and the
    /// GPU tuning keys (`gpu_variant=lanes`, `gpu_no_fuse=all`, `gpu_run_ahead=off`,
    /// `gpu_pipeline_cache=DIR` to keep compiled GPU pipelines between runs, ...; the list is in the
    /// README). An unknown key or a bad value is `ONESTEP_STATUS_INVALID_ARGUMENT` naming it. Callers
    /// built against a header without this field (a smaller `struct_size`) get none.
    pub settings: *const c_char,
}

/// One chat message (borrowed for the call).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct OnestepChatMessage {
    /// `system`, `user`, `assistant`, ... (NUL-terminated UTF-8).
    pub role: *const c_char,
    /// The message text (NUL-terminated UTF-8).
    pub content: *const c_char,
}

/// A piece returned by [`onestep_session_next_piece`].
#[repr(C)]
#[derive(Debug)]
pub struct OnestepPiece {
    /// NUL-terminated UTF-8 text (possibly empty); owned by the caller: free with
    /// [`onestep_string_free`]. NULL when the generation has ended.
    pub text: *mut c_char,
    /// Bytes in `text`, without the terminating NUL.
    pub text_len: usize,
    /// The token that produced the piece.
    pub token_id: u32,
}

/// Facts about a model.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct OnestepModelInfo {
    /// Set to `sizeof(OnestepModelInfo)` by the caller.
    pub struct_size: u32,
    /// Decoder layers.
    pub num_layers: u32,
    /// Hidden size.
    pub hidden_size: u32,
    /// Query heads.
    pub num_heads: u32,
    /// Key/value heads.
    pub num_kv_heads: u32,
    /// Head dimension.
    pub head_dim: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// KV cache slots (prompt plus generated tokens of one conversation).
    pub max_cache: u32,
    /// Largest prefill chunk.
    pub max_chunk: u32,
    /// End-of-sequence id.
    pub eos_id: u32,
    /// Beginning-of-sequence id, when `has_bos`.
    pub bos_id: u32,
    /// Whether the vocabulary has a BOS token.
    pub has_bos: bool,
    /// Whether the model carries a chat template (`onestep_session_chat` works).
    pub has_chat_template: bool,
    /// Milliseconds the load took.
    pub load_ms: f64,
}

/// Statistics of the last finished generation of a session.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct OnestepStats {
    /// Set to `sizeof(OnestepStats)` by the caller.
    pub struct_size: u32,
    /// Why it ended.
    pub stop_reason: OnestepStopReason,
    /// The stop token, when `stop_reason` is `ONESTEP_STOP_REASON_STOP_TOKEN`.
    pub stop_token_id: u32,
    /// Tokens in the prompt (including those reused from the cache).
    pub prompt_tokens: u32,
    /// Prompt tokens reused from the cache (multi-turn chat).
    pub reused_tokens: u32,
    /// Prompt tokens computed.
    pub prefill_tokens: u32,
    /// Tokens fed back one at a time.
    pub decode_tokens: u32,
    /// Tokens generated.
    pub generated_tokens: u32,
    /// Model load time, ms.
    pub load_ms: f64,
    /// Prefill time, ms.
    pub prefill_ms: f64,
    /// Time to the first generated token, ms.
    pub time_to_first_token_ms: f64,
    /// Decode time, ms.
    pub decode_ms: f64,
    /// Prefill throughput, tokens/s.
    pub prefill_tokens_per_s: f64,
    /// Decode throughput, tokens/s.
    pub decode_tokens_per_s: f64,
}

/// Called once per generated piece: `text` is NUL-terminated UTF-8 of `text_len` bytes (possibly
/// empty), borrowed for the duration of the call only. Return true to go on, false to stop (the
/// generation ends as cancelled). Runs on the calling thread, inside the generate call; it must not
/// call functions on the same session other than `onestep_session_cancel`.
pub type OnestepPieceCallback = Option<
    unsafe extern "C" fn(
        text: *const c_char,
        text_len: usize,
        token_id: u32,
        user_data: *mut c_void,
    ) -> bool,
>;

// ---------------------------------------------------------------------------------------------
// Errors and the boundary.

struct Fail {
    status: OnestepStatus,
    message: String,
}

type FfiResult<T = ()> = Result<T, Fail>;

fn fail(status: OnestepStatus, message: impl Into<String>) -> Fail {
    Fail {
        status,
        message: message.into(),
    }
}

impl From<onestep_ffi::Fail> for Fail {
    fn from(f: onestep_ffi::Fail) -> Fail {
        let status = match f.status {
            Status::InvalidArgument => OnestepStatus::InvalidArgument,
            Status::Io => OnestepStatus::Io,
            Status::InvalidModel => OnestepStatus::InvalidModel,
            Status::Unsupported => OnestepStatus::Unsupported,
            Status::Runtime => OnestepStatus::Runtime,
            Status::Tokenizer => OnestepStatus::Tokenizer,
            Status::Template => OnestepStatus::Template,
            Status::Busy => OnestepStatus::Busy,
            Status::BadState => OnestepStatus::BadState,
            Status::Cancelled => OnestepStatus::Cancelled,
            Status::Device => OnestepStatus::Device,
            Status::Internal => OnestepStatus::Internal,
        };
        fail(status, f.message)
    }
}

/// A runtime error in `phase`, with the status the bindings share (`onestep_ffi::Status::of`).
fn runtime_fail(e: Error, phase: Phase) -> Fail {
    onestep_ffi::Fail::runtime(e, phase).into()
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// `s` as a C string; NUL characters (which no normal text holds) become U+FFFD.
fn c_string(s: &str) -> CString {
    let bytes = if s.contains('\0') {
        s.replace('\0', "\u{FFFD}").into_bytes()
    } else {
        s.as_bytes().to_vec()
    };
    // No NUL left: cannot fail.
    CString::new(bytes).unwrap_or_default()
}

fn set_last_error(msg: &str) {
    LAST_ERROR.with(|e| *e.borrow_mut() = c_string(msg));
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs one entry point: errors become a status and the per-thread message, panics are caught.
fn boundary(name: &str, f: impl FnOnce() -> FfiResult) -> OnestepStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => OnestepStatus::Ok,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status
        }
        Err(payload) => {
            set_last_error(&format!(
                "{name}: internal error (panic): {}",
                panic_message(payload.as_ref())
            ));
            OnestepStatus::Panic
        }
    }
}

fn non_null<'a, T>(p: *const T, what: &str) -> FfiResult<&'a T> {
    // SAFETY: the caller promises a non-NULL pointer is valid (header contract).
    unsafe { p.as_ref() }.ok_or_else(|| fail(OnestepStatus::NullPointer, format!("{what} is NULL")))
}

fn non_null_mut<'a, T>(p: *mut T, what: &str) -> FfiResult<&'a mut T> {
    // SAFETY: as above.
    unsafe { p.as_mut() }.ok_or_else(|| fail(OnestepStatus::NullPointer, format!("{what} is NULL")))
}

fn utf8<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    non_null(p, what)?;
    // SAFETY: non-NULL and NUL-terminated per the header contract.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str().map_err(|e| {
        fail(
            OnestepStatus::InvalidUtf8,
            format!(
                "{what} is not valid UTF-8 (first bad byte at offset {})",
                e.valid_up_to()
            ),
        )
    })
}

/// Reads the leading `struct_size` of a caller's struct and checks it covers this version.
fn check_size<T>(struct_size: u32, what: &str) -> FfiResult {
    let need = std::mem::size_of::<T>();
    if (struct_size as usize) < need {
        return Err(fail(
            OnestepStatus::InvalidArgument,
            format!("{what}.struct_size is {struct_size}, this library needs at least {need}"),
        ));
    }
    Ok(())
}

fn options_from_c(
    opts: *const OnestepOptions,
    defaults: &GenerationDefaults,
) -> FfiResult<GenerateOptions> {
    let mut out = GenerateOptions::from_defaults(defaults);
    if opts.is_null() {
        return Ok(out);
    }
    // SAFETY: non-NULL; `struct_size` is the first field of every version.
    let size = unsafe { std::ptr::read(opts as *const u32) };
    check_size::<OnestepOptions>(size, "options")?;
    // SAFETY: the caller's struct is at least as large as ours.
    let o = unsafe { &*opts };
    out.max_new_tokens = o.max_new_tokens;
    out.temperature = o.temperature;
    out.top_k = o.top_k;
    out.top_p = o.top_p;
    out.seed = o.has_seed.then_some(o.seed);
    out.ignore_stop_tokens = o.ignore_stop_tokens;
    if o.stop_strings_len > 0 {
        non_null(o.stop_strings, "options.stop_strings")?;
        // SAFETY: non-NULL, `stop_strings_len` elements per the contract.
        let ptrs = unsafe { std::slice::from_raw_parts(o.stop_strings, o.stop_strings_len) };
        let mut items = Vec::with_capacity(ptrs.len());
        for (i, &p) in ptrs.iter().enumerate() {
            non_null(p, &format!("options.stop_strings[{i}]"))?;
            // SAFETY: non-NULL, NUL-terminated.
            items.push(unsafe { CStr::from_ptr(p) }.to_bytes());
        }
        out.stop_strings =
            stop_strings_from_bytes(&items).map_err(|e| runtime_fail(e, Phase::Run))?;
    }
    out.validate().map_err(|e| runtime_fail(e, Phase::Run))?;
    Ok(out)
}

fn messages_from_c(messages: *const OnestepChatMessage, len: usize) -> FfiResult<Vec<ChatMessage>> {
    non_null(messages, "messages")?;
    // SAFETY: non-NULL, `len` elements per the contract.
    let ms = unsafe { std::slice::from_raw_parts(messages, len) };
    ms.iter()
        .enumerate()
        .map(|(i, m)| {
            Ok(ChatMessage::new(
                utf8(m.role, &format!("messages[{i}].role"))?,
                utf8(m.content, &format!("messages[{i}].content"))?,
            ))
        })
        .collect()
}

fn owned_c_string(s: &str) -> (*mut c_char, usize) {
    let c = c_string(s);
    let len = c.as_bytes().len();
    (c.into_raw(), len)
}

// ---------------------------------------------------------------------------------------------
// Library.

/// The library version (static string; do not free).
#[no_mangle]
pub extern "C" fn onestep_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed call on this thread ("" if none). The pointer stays valid until the
/// next failing call on this thread; do not free it.
#[no_mangle]
pub extern "C" fn onestep_last_error() -> *const c_char {
    catch_unwind(|| LAST_ERROR.with(|e| e.borrow().as_ptr())).unwrap_or(c"internal error".as_ptr())
}

/// A short static name of `status` (`"ok"`, `"null_pointer"`, ...; `"unknown"` for other values).
#[no_mangle]
pub extern "C" fn onestep_status_name(status: i32) -> *const c_char {
    let s: &CStr = match status {
        0 => c"ok",
        1 => c"null_pointer",
        2 => c"invalid_argument",
        3 => c"invalid_utf8",
        4 => c"io",
        5 => c"invalid_model",
        6 => c"unsupported",
        7 => c"runtime",
        8 => c"tokenizer",
        9 => c"template",
        10 => c"busy",
        11 => c"bad_state",
        12 => c"cancelled",
        13 => c"panic",
        14 => c"device",
        15 => c"internal",
        _ => c"unknown",
    };
    s.as_ptr()
}

/// Frees a string returned by this library (`text_out` of the generate calls, `OnestepPiece.text`,
/// `json_out` of `onestep_transcribe`). NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn onestep_string_free(s: *mut c_char) {
    if !s.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `s` came from `CString::into_raw` in this library (contract).
            drop(unsafe { CString::from_raw(s) });
        }));
    }
}

// ---------------------------------------------------------------------------------------------
// Model.

fn model_handle(model: Arc<Model>) -> *mut OnestepModel {
    let architecture = c_string(&model.info().architecture);
    let device = c_string(&model.device());
    let device_note = model.device_note().map(c_string);
    Box::into_raw(Box::new(OnestepModel {
        model,
        architecture,
        device,
        device_note,
    }))
}

/// The runtime's load options from `opts` (NULL: the defaults — the CPU, every KV layer resident).
fn load_options_from_c(opts: *const OnestepLoadOptions) -> FfiResult<LoadOptions> {
    if opts.is_null() {
        return Ok(LoadOptions::cpu());
    }
    // SAFETY: non-NULL; `struct_size` is the first field of every version.
    let size = unsafe { std::ptr::read(opts as *const u32) } as usize;
    // Every field up to `settings` is required; `settings` came later and is NULL when absent.
    let need = std::mem::offset_of!(OnestepLoadOptions, settings);
    if size < need {
        return Err(fail(
            OnestepStatus::InvalidArgument,
            format!("options.struct_size is {size}, this library needs at least {need}"),
        ));
    }
    // SAFETY: all-zero bytes are a valid value (integers 0, pointers NULL); the caller's `size`
    // readable bytes (contract), at most the whole struct, are copied over them.
    let o = unsafe {
        let mut o: OnestepLoadOptions = std::mem::zeroed();
        std::ptr::copy_nonoverlapping(
            opts as *const u8,
            &mut o as *mut OnestepLoadOptions as *mut u8,
            size.min(std::mem::size_of::<OnestepLoadOptions>()),
        );
        o
    };
    // NULL: the default.
    let text = |p: *const c_char, what: &str| -> FfiResult<Option<&str>> {
        if p.is_null() {
            Ok(None)
        } else {
            utf8(p, what).map(Some)
        }
    };
    let device = text(o.device, "options.device")?.unwrap_or("cpu");
    let backend = text(o.gpu_backend, "options.gpu_backend")?;
    let budget = text(o.gpu_cache_budget, "options.gpu_cache_budget")?.unwrap_or("all");
    let precision = text(o.precision, "options.precision")?;
    let settings = text(o.settings, "options.settings")?.unwrap_or("");
    LoadOptions::parse(device, backend, budget, o.kv_page_rows as usize)
        .and_then(|l| match precision {
            Some(p) => l.with_precision(p),
            None => Ok(l),
        })
        .and_then(|mut l| l.set(settings).map(|()| l))
        .map_err(|e| runtime_fail(e, Phase::Load))
}

/// Loads (memory-maps) the model file at `path` (NUL-terminated UTF-8). On success `*model_out`
/// holds a model to free with [`onestep_model_free`]; on failure it is set to NULL.
#[no_mangle]
pub unsafe extern "C" fn onestep_model_load(
    path: *const c_char,
    model_out: *mut *mut OnestepModel,
) -> OnestepStatus {
    // SAFETY: the same contract; NULL options are the defaults (the CPU).
    unsafe { onestep_model_load_with(path, std::ptr::null(), model_out) }
}

/// Loads a model from `len` bytes at `data` (an Android asset, an iOS bundle resource, ...). The bytes
/// are copied: the caller may free `data` when this returns. `name` (NUL-terminated UTF-8, may be
/// NULL) names the buffer in error messages. On success `*model_out` holds a model to free with
/// [`onestep_model_free`]; on failure it is set to NULL.
#[no_mangle]
pub unsafe extern "C" fn onestep_model_load_from_memory(
    data: *const u8,
    len: usize,
    name: *const c_char,
    model_out: *mut *mut OnestepModel,
) -> OnestepStatus {
    // SAFETY: the same contract; NULL options are the defaults (the CPU).
    unsafe { onestep_model_load_from_memory_with(data, len, name, std::ptr::null(), model_out) }
}

/// Fills `*options_out` (whose `struct_size` the caller set) with the default load options: the CPU,
/// any wgpu backend, every KV-cache layer resident on a GPU, 64 positions a host KV page.
#[no_mangle]
pub unsafe extern "C" fn onestep_load_options_default(
    options_out: *mut OnestepLoadOptions,
) -> OnestepStatus {
    boundary("onestep_load_options_default", || {
        let out = non_null_mut(options_out, "options_out")?;
        check_size::<OnestepLoadOptions>(out.struct_size, "options_out")?;
        *out = OnestepLoadOptions {
            struct_size: out.struct_size,
            device: std::ptr::null(),
            gpu_backend: std::ptr::null(),
            gpu_cache_budget: std::ptr::null(),
            kv_page_rows: 0,
            precision: std::ptr::null(),
            settings: std::ptr::null(),
        };
        Ok(())
    })
}

/// Like [`onestep_model_load`], with `options` (NULL: the defaults of
/// [`onestep_load_options_default`]). A device, backend or budget string that does not parse is
/// `ONESTEP_STATUS_INVALID_ARGUMENT`; a GPU that cannot be used (none found, the model does not fit)
/// is `ONESTEP_STATUS_DEVICE` — with `device = "auto"` the model falls back to the CPU instead
/// ([`onestep_model_device_note`] says why).
#[no_mangle]
pub unsafe extern "C" fn onestep_model_load_with(
    path: *const c_char,
    options: *const OnestepLoadOptions,
    model_out: *mut *mut OnestepModel,
) -> OnestepStatus {
    boundary("onestep_model_load_with", || {
        let out = non_null_mut(model_out, "model_out")?;
        *out = std::ptr::null_mut();
        let path = utf8(path, "path")?;
        let opts = load_options_from_c(options)?;
        let model = Model::load_with(path, &opts).map_err(|e| runtime_fail(e, Phase::Load))?;
        *out = model_handle(model);
        Ok(())
    })
}

/// Like [`onestep_model_load_from_memory`], with `options` (NULL: the defaults).
#[no_mangle]
pub unsafe extern "C" fn onestep_model_load_from_memory_with(
    data: *const u8,
    len: usize,
    name: *const c_char,
    options: *const OnestepLoadOptions,
    model_out: *mut *mut OnestepModel,
) -> OnestepStatus {
    boundary("onestep_model_load_from_memory_with", || {
        let out = non_null_mut(model_out, "model_out")?;
        *out = std::ptr::null_mut();
        non_null(data, "data")?;
        let name = if name.is_null() {
            "<memory>"
        } else {
            utf8(name, "name")?
        };
        let opts = load_options_from_c(options)?;
        // SAFETY: non-NULL, `len` readable bytes per the contract.
        let bytes = bytes::Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(data, len) });
        let model = Model::load_from_bytes_with(bytes, name, &opts)
            .map_err(|e| runtime_fail(e, Phase::Load))?;
        *out = model_handle(model);
        Ok(())
    })
}

/// Where `model` runs: `"cpu"`, or the GPU adapter and its backend (`"<adapter> (Vulkan)"`). Static
/// for the model's lifetime; do not free. NULL (with the message set) when `model` is NULL.
#[no_mangle]
pub unsafe extern "C" fn onestep_model_device(model: *const OnestepModel) -> *const c_char {
    // SAFETY: a non-NULL `model` is valid (contract).
    match unsafe { model.as_ref() } {
        Some(m) => m.device.as_ptr(),
        None => {
            set_last_error("model is NULL");
            std::ptr::null()
        }
    }
}

/// How a model loaded with `device = "auto"` chose its device: the decode-step times measured (or
/// remembered) on the GPU and the CPU, or why the GPU could not be used (no adapter, a software
/// adapter, the GPU failed to plan or during the trial). NULL when a device was forced (or `model` is
/// NULL). Static for the model's lifetime.
#[no_mangle]
pub unsafe extern "C" fn onestep_model_device_note(model: *const OnestepModel) -> *const c_char {
    // SAFETY: a non-NULL `model` is valid (contract).
    match unsafe { model.as_ref() }.and_then(|m| m.device_note.as_ref()) {
        Some(n) => n.as_ptr(),
        None => std::ptr::null(),
    }
}

/// Frees a model. Sessions created from it keep their own reference and stay valid. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn onestep_model_free(model: *mut OnestepModel) {
    if !model.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `model` came from `Box::into_raw` in this library (contract).
            drop(unsafe { Box::from_raw(model) });
        }));
    }
}

/// Fills `*info_out` (whose `struct_size` the caller set) with facts about `model`.
#[no_mangle]
pub unsafe extern "C" fn onestep_model_info(
    model: *const OnestepModel,
    info_out: *mut OnestepModelInfo,
) -> OnestepStatus {
    boundary("onestep_model_info", || {
        let m = non_null(model, "model")?;
        let out = non_null_mut(info_out, "info_out")?;
        check_size::<OnestepModelInfo>(out.struct_size, "info_out")?;
        let i = m.model.info();
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        *out = OnestepModelInfo {
            struct_size: out.struct_size,
            num_layers: n(i.num_layers),
            hidden_size: n(i.hidden_size),
            num_heads: n(i.num_heads),
            num_kv_heads: n(i.num_kv_heads),
            head_dim: n(i.head_dim),
            vocab_size: n(i.vocab_size),
            max_cache: n(i.max_cache),
            max_chunk: n(i.max_chunk),
            eos_id: i.eos_id,
            bos_id: i.bos_id.unwrap_or(0),
            has_bos: i.bos_id.is_some(),
            has_chat_template: m.model.chat_template().is_some(),
            load_ms: m.model.load_ms(),
        };
        Ok(())
    })
}

/// The model's architecture name (e.g. "llama"); borrowed: valid while `model` is. NULL if `model`
/// is NULL.
#[no_mangle]
pub unsafe extern "C" fn onestep_model_architecture(model: *const OnestepModel) -> *const c_char {
    // SAFETY: a non-NULL `model` is valid (contract).
    match unsafe { model.as_ref() } {
        Some(m) => m.architecture.as_ptr(),
        None => {
            set_last_error("model is NULL");
            std::ptr::null()
        }
    }
}

/// Fills `*options_out` (whose `struct_size` the caller set) with the model's generation defaults
/// (`model` may be NULL: built-in defaults), no seed, no stop strings.
#[no_mangle]
pub unsafe extern "C" fn onestep_options_default(
    model: *const OnestepModel,
    options_out: *mut OnestepOptions,
) -> OnestepStatus {
    boundary("onestep_options_default", || {
        let out = non_null_mut(options_out, "options_out")?;
        check_size::<OnestepOptions>(out.struct_size, "options_out")?;
        let d = match unsafe { model.as_ref() } {
            Some(m) => m.model.info().generation.clone(),
            None => GenerationDefaults::default(),
        };
        let o = GenerateOptions::from_defaults(&d);
        *out = OnestepOptions {
            struct_size: out.struct_size,
            max_new_tokens: o.max_new_tokens,
            temperature: o.temperature,
            top_k: o.top_k,
            top_p: o.top_p,
            has_seed: false,
            ignore_stop_tokens: false,
            seed: 0,
            stop_strings: std::ptr::null(),
            stop_strings_len: 0,
        };
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Session.

/// Creates a session over `model`. On success `*session_out` holds a session to free with
/// [`onestep_session_free`]; on failure it is set to NULL.
#[no_mangle]
pub unsafe extern "C" fn onestep_session_new(
    model: *const OnestepModel,
    session_out: *mut *mut OnestepSession,
) -> OnestepStatus {
    boundary("onestep_session_new", || {
        let out = non_null_mut(session_out, "session_out")?;
        *out = std::ptr::null_mut();
        let m = non_null(model, "model")?;
        let cell = SessionCell::new(m.model.clone())?;
        *out = Box::into_raw(Box::new(OnestepSession { cell }));
        Ok(())
    })
}

/// Frees a session (no call on it may be running). NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn onestep_session_free(session: *mut OnestepSession) {
    if !session.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `session` came from `Box::into_raw` in this library (contract).
            drop(unsafe { Box::from_raw(session) });
        }));
    }
}

/// Asks the running generation of `session` to stop before its next step (it ends with stop
/// reason `ONESTEP_STOP_REASON_CANCELLED`). Safe to call from any thread while the session is alive.
/// A cancel with nothing running stops the next generation before its first step. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn onestep_session_cancel(session: *const OnestepSession) {
    // SAFETY: a non-NULL session is valid (contract); only the atomic flag is touched.
    if let Some(s) = unsafe { session.as_ref() } {
        s.cell.cancel();
    }
}

/// Forgets the conversation (empties the KV cache) and ends a pull generation in progress.
#[no_mangle]
pub unsafe extern "C" fn onestep_session_reset(session: *mut OnestepSession) -> OnestepStatus {
    boundary("onestep_session_reset", || {
        Ok(non_null(session, "session")?.cell.reset()?)
    })
}

fn run_generation(
    s: &OnestepSession,
    prompt: Prompt<'_>,
    opts: *const OnestepOptions,
    callback: OnestepPieceCallback,
    user_data: *mut c_void,
    text_out: *mut *mut c_char,
) -> FfiResult {
    let opts = options_from_c(opts, &s.cell.model().info().generation)?;
    let mut on_piece = |p: &Piece| -> ControlFlow<()> {
        let Some(cb) = callback else {
            return ControlFlow::Continue(());
        };
        let c = c_string(&p.text);
        let len = c.as_bytes().len();
        // SAFETY: the caller's callback, with a NUL-terminated string alive for the call.
        if unsafe { cb(c.as_ptr(), len, p.token_id, user_data) } {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    };
    let text = s.cell.generate(prompt, &opts, &mut on_piece)?;
    if !text_out.is_null() {
        // SAFETY: non-NULL, writable (contract).
        unsafe { *text_out = owned_c_string(&text).0 };
    }
    Ok(())
}

/// Generates a continuation of `prompt` (NUL-terminated UTF-8, tokenized as is) from an empty cache,
/// with `options` (NULL: the model's defaults). `callback` (may be NULL) sees each piece as it is
/// produced, with `user_data`. When `text_out` is not NULL it receives the whole generated text, to
/// free with [`onestep_string_free`] (set to NULL on failure). Statistics:
/// [`onestep_session_last_stats`].
#[no_mangle]
pub unsafe extern "C" fn onestep_session_generate(
    session: *mut OnestepSession,
    prompt: *const c_char,
    options: *const OnestepOptions,
    callback: OnestepPieceCallback,
    user_data: *mut c_void,
    text_out: *mut *mut c_char,
) -> OnestepStatus {
    boundary("onestep_session_generate", || {
        if !text_out.is_null() {
            // SAFETY: non-NULL, writable (contract).
            unsafe { *text_out = std::ptr::null_mut() };
        }
        let s = non_null(session, "session")?;
        let prompt = utf8(prompt, "prompt")?;
        run_generation(
            s,
            Prompt::Text(prompt),
            options,
            callback,
            user_data,
            text_out,
        )
    })
}

/// Generates the assistant's reply to `messages_len` chat messages (rendered with the model's chat
/// template). The cache is kept between calls: a conversation that grows turn by turn only computes
/// the new tokens. Otherwise as [`onestep_session_generate`].
#[no_mangle]
pub unsafe extern "C" fn onestep_session_chat(
    session: *mut OnestepSession,
    messages: *const OnestepChatMessage,
    messages_len: usize,
    options: *const OnestepOptions,
    callback: OnestepPieceCallback,
    user_data: *mut c_void,
    text_out: *mut *mut c_char,
) -> OnestepStatus {
    boundary("onestep_session_chat", || {
        if !text_out.is_null() {
            // SAFETY: non-NULL, writable (contract).
            unsafe { *text_out = std::ptr::null_mut() };
        }
        let s = non_null(session, "session")?;
        let messages = messages_from_c(messages, messages_len)?;
        run_generation(
            s,
            Prompt::Chat(&messages),
            options,
            callback,
            user_data,
            text_out,
        )
    })
}

fn start_stream(s: &OnestepSession, prompt: Prompt<'_>, opts: *const OnestepOptions) -> FfiResult {
    let opts = options_from_c(opts, &s.cell.model().info().generation)?;
    Ok(s.cell.start(prompt, &opts)?)
}

/// Starts a pull generation of a continuation of `prompt` (as [`onestep_session_generate`]); read
/// the pieces with [`onestep_session_next_piece`]. Starting another generation (or a reset) ends
/// this one.
#[no_mangle]
pub unsafe extern "C" fn onestep_session_start(
    session: *mut OnestepSession,
    prompt: *const c_char,
    options: *const OnestepOptions,
) -> OnestepStatus {
    boundary("onestep_session_start", || {
        let s = non_null(session, "session")?;
        let prompt = utf8(prompt, "prompt")?;
        start_stream(s, Prompt::Text(prompt), options)
    })
}

/// Starts a pull generation of the reply to chat messages (as [`onestep_session_chat`]).
#[no_mangle]
pub unsafe extern "C" fn onestep_session_start_chat(
    session: *mut OnestepSession,
    messages: *const OnestepChatMessage,
    messages_len: usize,
    options: *const OnestepOptions,
) -> OnestepStatus {
    boundary("onestep_session_start_chat", || {
        let s = non_null(session, "session")?;
        let messages = messages_from_c(messages, messages_len)?;
        start_stream(s, Prompt::Chat(&messages), options)
    })
}

/// Produces the next piece of the pull generation. On `ONESTEP_STATUS_OK`: when `*done_out` is false,
/// `*piece_out` holds a piece whose `text` the caller frees with [`onestep_string_free`]; when true,
/// the generation has ended (`piece_out->text` is NULL) and [`onestep_session_last_stats`] describes
/// it. On an error the generation ends (the session stays usable).
#[no_mangle]
pub unsafe extern "C" fn onestep_session_next_piece(
    session: *mut OnestepSession,
    piece_out: *mut OnestepPiece,
    done_out: *mut bool,
) -> OnestepStatus {
    boundary("onestep_session_next_piece", || {
        let s = non_null(session, "session")?;
        let piece = non_null_mut(piece_out, "piece_out")?;
        let done = non_null_mut(done_out, "done_out")?;
        *piece = OnestepPiece {
            text: std::ptr::null_mut(),
            text_len: 0,
            token_id: 0,
        };
        *done = false;
        match s.cell.next_piece()? {
            Some(p) => {
                let (text, text_len) = owned_c_string(&p.text);
                *piece = OnestepPiece {
                    text,
                    text_len,
                    token_id: p.token_id,
                };
            }
            None => *done = true,
        }
        Ok(())
    })
}

fn stop_reason_c(r: &StopReason) -> (OnestepStopReason, u32) {
    match r {
        StopReason::StopToken { id } => (OnestepStopReason::StopToken, *id),
        StopReason::StopString { .. } => (OnestepStopReason::StopString, 0),
        StopReason::MaxTokens => (OnestepStopReason::MaxTokens, 0),
        StopReason::ContextFull => (OnestepStopReason::ContextFull, 0),
        StopReason::Cancelled => (OnestepStopReason::Cancelled, 0),
    }
}

/// Fills `*stats_out` (whose `struct_size` the caller set) with the statistics of the session's last
/// finished generation (`stop_reason` is `ONESTEP_STOP_REASON_NONE` before the first one).
#[no_mangle]
pub unsafe extern "C" fn onestep_session_last_stats(
    session: *const OnestepSession,
    stats_out: *mut OnestepStats,
) -> OnestepStatus {
    boundary("onestep_session_last_stats", || {
        let s = non_null(session, "session")?;
        let out = non_null_mut(stats_out, "stats_out")?;
        check_size::<OnestepStats>(out.struct_size, "stats_out")?;
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        *out = s.cell.last(|last| match last {
            None => OnestepStats {
                struct_size: out.struct_size,
                stop_reason: OnestepStopReason::None,
                stop_token_id: 0,
                prompt_tokens: 0,
                reused_tokens: 0,
                prefill_tokens: 0,
                decode_tokens: 0,
                generated_tokens: 0,
                load_ms: 0.0,
                prefill_ms: 0.0,
                time_to_first_token_ms: 0.0,
                decode_ms: 0.0,
                prefill_tokens_per_s: 0.0,
                decode_tokens_per_s: 0.0,
            },
            Some(c) => {
                let (stop_reason, stop_token_id) = stop_reason_c(&c.stop_reason);
                let st = &c.stats;
                OnestepStats {
                    struct_size: out.struct_size,
                    stop_reason,
                    stop_token_id,
                    prompt_tokens: n(c.prompt_tokens),
                    reused_tokens: n(st.reused_tokens),
                    prefill_tokens: n(st.prefill_tokens),
                    decode_tokens: n(st.decode_tokens),
                    generated_tokens: n(st.generated_tokens),
                    load_ms: st.load_ms,
                    prefill_ms: st.prefill_ms,
                    time_to_first_token_ms: st.time_to_first_token_ms,
                    decode_ms: st.decode_ms,
                    prefill_tokens_per_s: st.prefill_tokens_per_s,
                    decode_tokens_per_s: st.decode_tokens_per_s,
                }
            }
        })?;
        Ok(())
    })
}
