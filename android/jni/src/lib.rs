//! JNI bindings of the onestep runtime: the native half of the Kotlin API in
//! `android/src/main/kotlin/dev/onestep/` (class `dev.onestep.Native`). Built as a cdylib for Android
//! (`android/build-so.sh`) and for the desktop JVM (tests in `android/test-jvm`).
//!
//! The bindings add no logic: each native method converts its arguments, calls the safe Rust API
//! ([`onestep::Model`]) or the session state machine and the transcriber the C ABI runs too
//! ([`onestep_ffi::SessionCell`], [`onestep_ffi::TranscriberCell`]), and converts the result. Runtime errors become a `dev.onestep.OneStepException` carrying a
//! `dev.onestep.Status` (the C ABI's status, [`onestep_ffi::Status`]) and the runtime's message; JNI
//! failures and Rust panics
//! become a `java.lang.RuntimeException` (every entry point runs inside `EnvUnowned::with_env`, which
//! catches panics): nothing aborts the VM.
//!
//! Handles are `Box` pointers passed to Kotlin as `long`; Kotlin owns them and frees each once
//! (`close()`).
#![warn(missing_docs)]

use std::ops::ControlFlow;
use std::sync::Arc;

use jni::errors::ThrowRuntimeExAndDefault;
use jni::objects::{
    JByteArray, JClass, JFloatArray, JObject, JObjectArray, JString, JThrowable, JValue,
};
use jni::sys::{jboolean, jdouble, jfloat, jint, jlong};
use jni::{jni_sig, jni_str, Env, EnvUnowned};

use onestep::generate::{ChatMessage, GenerateOptions, StopReason, TranscribeOptions};
use onestep::{LoadOptions, Model};
use onestep_ffi::{Fail, Phase, Prompt, SessionCell, Status, TranscriberCell};

type JResult<T> = Result<T, jni::errors::Error>;

/// Throws `dev.onestep.OneStepException(status, msg)`; the returned error unwinds to the entry point,
/// which leaves the exception pending for Java.
fn throw<T>(env: &mut Env<'_>, status: Status, msg: impl AsRef<str>) -> JResult<T> {
    let s = env.new_string(status.name())?;
    let m = env.new_string(msg.as_ref())?;
    let e = env.new_object(
        jni_str!("dev/onestep/OneStepException"),
        jni_sig!("(Ljava/lang/String;Ljava/lang/String;)V"),
        &[JValue::Object(&s), JValue::Object(&m)],
    )?;
    let e = env.cast_local::<JThrowable>(e)?;
    env.throw(e)?;
    Err(jni::errors::Error::JavaException)
}

/// `r`'s value, or its failure thrown.
fn or_throw<T>(env: &mut Env<'_>, r: Result<T, Fail>) -> JResult<T> {
    match r {
        Ok(v) => Ok(v),
        Err(f) => throw(env, f.status, f.message),
    }
}

/// `r`'s value, or its runtime error thrown with its status in `phase`.
fn or_throw_in<T>(env: &mut Env<'_>, r: onestep::Result<T>, phase: Phase) -> JResult<T> {
    or_throw(env, r.map_err(|e| Fail::runtime(e, phase)))
}

fn model_ref<'a>(env: &mut Env<'_>, handle: jlong) -> JResult<&'a Arc<Model>> {
    // SAFETY: Kotlin passes handles made by `modelLoad*` and not yet freed (it zeroes them on close).
    match unsafe { (handle as *const Arc<Model>).as_ref() } {
        Some(m) => Ok(m),
        None => throw(env, Status::BadState, "the model is closed"),
    }
}

fn session_ref<'a>(env: &mut Env<'_>, handle: jlong) -> JResult<&'a SessionCell> {
    // SAFETY: as above, for `sessionNew`.
    match unsafe { (handle as *const SessionCell).as_ref() } {
        Some(s) => Ok(s),
        None => throw(env, Status::BadState, "the session is closed"),
    }
}

fn transcriber_ref<'a>(env: &mut Env<'_>, handle: jlong) -> JResult<&'a TranscriberCell> {
    // SAFETY: as above, for `transcriberNew`.
    match unsafe { (handle as *const TranscriberCell).as_ref() } {
        Some(t) => Ok(t),
        None => throw(env, Status::BadState, "the transcriber is closed"),
    }
}

/// Options from the Kotlin side: negative / NaN values mean "the model's default".
#[allow(clippy::too_many_arguments)]
fn options(
    env: &mut Env<'_>,
    model: &Model,
    max_new_tokens: jint,
    temperature: jfloat,
    top_k: jint,
    top_p: jfloat,
    has_seed: jboolean,
    seed: jlong,
    stop_strings: &JObjectArray<'_, JString<'_>>,
    ignore_stop_tokens: jboolean,
) -> JResult<GenerateOptions> {
    let mut o = GenerateOptions::from_defaults(&model.info().generation);
    if max_new_tokens >= 0 {
        o.max_new_tokens = max_new_tokens as u32;
    }
    if !temperature.is_nan() {
        o.temperature = temperature;
    }
    if top_k >= 0 {
        o.top_k = top_k as u32;
    }
    if !top_p.is_nan() {
        o.top_p = top_p;
    }
    o.seed = has_seed.then_some(seed as u64);
    o.ignore_stop_tokens = ignore_stop_tokens;
    if !stop_strings.is_null() {
        for i in 0..stop_strings.len(env)? {
            let s = stop_strings.get_element(env, i)?;
            o.stop_strings.push(s.try_to_string(env)?);
        }
    }
    let v = o.validate();
    or_throw_in(env, v, Phase::Run)?;
    Ok(o)
}

fn messages(
    env: &mut Env<'_>,
    roles: &JObjectArray<'_, JString<'_>>,
    contents: &JObjectArray<'_, JString<'_>>,
) -> JResult<Vec<ChatMessage>> {
    let n = roles.len(env)?;
    if contents.len(env)? != n {
        return throw(
            env,
            Status::InvalidArgument,
            "roles and contents differ in length",
        );
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = roles.get_element(env, i)?.try_to_string(env)?;
        let c = contents.get_element(env, i)?.try_to_string(env)?;
        out.push(ChatMessage::new(r, c));
    }
    Ok(out)
}

/// A prompt from the Kotlin side: a text, or (when it is null) chat messages.
enum OwnedPrompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

impl OwnedPrompt {
    fn as_prompt(&self) -> Prompt<'_> {
        match self {
            OwnedPrompt::Text(t) => Prompt::Text(t),
            OwnedPrompt::Chat(m) => Prompt::Chat(m),
        }
    }
}

/// `prompt`, or when it is null the chat messages in `roles`/`contents`.
fn prompt_of(
    env: &mut Env<'_>,
    prompt: &JString<'_>,
    roles: &JObjectArray<'_, JString<'_>>,
    contents: &JObjectArray<'_, JString<'_>>,
) -> JResult<OwnedPrompt> {
    if prompt.is_null() {
        Ok(OwnedPrompt::Chat(messages(env, roles, contents)?))
    } else {
        Ok(OwnedPrompt::Text(prompt.try_to_string(env)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Model.

/// A nullable Java string.
fn opt_string(env: &mut Env<'_>, s: &JString<'_>) -> JResult<Option<String>> {
    if s.is_null() {
        Ok(None)
    } else {
        s.try_to_string(env).map(Some)
    }
}

/// The text options of `LoadOptions` (Kotlin), as Java strings (null: the default).
struct TextOptions<'a, 'l> {
    device: &'a JString<'l>,
    backend: &'a JString<'l>,
    budget: &'a JString<'l>,
    precision: &'a JString<'l>,
    settings: &'a JString<'l>,
}

/// The load options of `LoadOptions` (Kotlin): device, GPU API, KV-cache budget, precision, settings
/// (null: the defaults `cpu`, any, `all`, the library's precision (`fast`), none) and page rows (0: the default).
fn load_options(
    env: &mut Env<'_>,
    t: TextOptions<'_, '_>,
    page_rows: jint,
) -> JResult<LoadOptions> {
    let device = opt_string(env, t.device)?.unwrap_or_else(|| "cpu".into());
    let backend = opt_string(env, t.backend)?;
    let budget = opt_string(env, t.budget)?.unwrap_or_else(|| "all".into());
    let precision = opt_string(env, t.precision)?;
    let settings = opt_string(env, t.settings)?.unwrap_or_default();
    if page_rows < 0 {
        return throw(
            env,
            Status::InvalidArgument,
            format!("kvPageRows {page_rows} is negative"),
        );
    }
    let o = LoadOptions::parse(&device, backend.as_deref(), &budget, page_rows as usize)
        .and_then(|o| match &precision {
            Some(p) => o.with_precision(p),
            None => Ok(o),
        })
        .and_then(|mut o| o.set(&settings).map(|()| o));
    or_throw_in(env, o, Phase::Load)
}

/// `Native.modelLoad(path: String, device: String?, gpuBackend: String?, gpuCacheBudget: String?,
/// kvPageRows: Int, precision: String?, settings: String?): Long`
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_dev_onestep_Native_modelLoad<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    path: JString<'l>,
    device: JString<'l>,
    backend: JString<'l>,
    budget: JString<'l>,
    page_rows: jint,
    precision: JString<'l>,
    settings: JString<'l>,
) -> jlong {
    env.with_env(|env| -> JResult<jlong> {
        let path = path.try_to_string(env)?;
        let text = TextOptions {
            device: &device,
            backend: &backend,
            budget: &budget,
            precision: &precision,
            settings: &settings,
        };
        let opts = load_options(env, text, page_rows)?;
        let m = Model::load_with(&path, &opts);
        let m = or_throw_in(env, m, Phase::Load)?;
        Ok(Box::into_raw(Box::new(m)) as jlong)
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.modelLoadBytes(bytes: ByteArray, name: String, device: String?, gpuBackend: String?,
/// gpuCacheBudget: String?, kvPageRows: Int, precision: String?, settings: String?): Long` (the bytes
/// are copied).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_dev_onestep_Native_modelLoadBytes<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    bytes: JByteArray<'l>,
    name: JString<'l>,
    device: JString<'l>,
    backend: JString<'l>,
    budget: JString<'l>,
    page_rows: jint,
    precision: JString<'l>,
    settings: JString<'l>,
) -> jlong {
    env.with_env(|env| -> JResult<jlong> {
        let data = env.convert_byte_array(&bytes)?;
        let name = name.try_to_string(env)?;
        let text = TextOptions {
            device: &device,
            backend: &backend,
            budget: &budget,
            precision: &precision,
            settings: &settings,
        };
        let opts = load_options(env, text, page_rows)?;
        let m = Model::load_from_bytes_with(bytes::Bytes::from(data), &name, &opts);
        let m = or_throw_in(env, m, Phase::Load)?;
        Ok(Box::into_raw(Box::new(m)) as jlong)
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.modelDevice(handle: Long): Array<String?>` = [device (`cpu` or `<adapter> (<API>)`), why
/// `auto` chose the CPU or null].
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_modelDevice<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> JObject<'l> {
    env.with_env(|env| -> JResult<JObject<'l>> {
        let m = model_ref(env, handle)?;
        let arr = env.new_object_array(2, jni_str!("java/lang/String"), JObject::null())?;
        let d = env.new_string(m.device())?;
        arr.set_element(env, 0, &d)?;
        if let Some(n) = m.device_note() {
            let n = env.new_string(n)?;
            arr.set_element(env, 1, &n)?;
        }
        Ok(arr.into())
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.modelFree(handle: Long)`
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_modelFree<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
) {
    env.with_env(|_env| -> JResult<()> {
        if handle != 0 {
            // SAFETY: a live handle from `modelLoad*`, freed once (Kotlin zeroes it).
            drop(unsafe { Box::from_raw(handle as *mut Arc<Model>) });
        }
        Ok(())
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.modelInfo(handle: Long): LongArray` = [layers, vocab, maxCache, maxChunk, hasChatTemplate].
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_modelInfo<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> JObject<'l> {
    env.with_env(|env| -> JResult<JObject<'l>> {
        let m = model_ref(env, handle)?;
        let i = m.info();
        let v = [
            i.num_layers as jlong,
            i.vocab_size as jlong,
            i.max_cache as jlong,
            i.max_chunk as jlong,
            jlong::from(m.chat_template().is_some()),
        ];
        let arr = env.new_long_array(v.len())?;
        arr.set_region(env, 0, &v)?;
        Ok(arr.into())
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

// ---------------------------------------------------------------------------------------------
// Session.

/// `Native.sessionNew(model: Long): Long`
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_sessionNew<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    model: jlong,
) -> jlong {
    env.with_env(|env| -> JResult<jlong> {
        let m = model_ref(env, model)?.clone();
        let cell = SessionCell::new(m);
        let cell = or_throw(env, cell)?;
        Ok(Box::into_raw(Box::new(cell)) as jlong)
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.sessionFree(handle: Long)`
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_sessionFree<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
) {
    env.with_env(|_env| -> JResult<()> {
        if handle != 0 {
            // SAFETY: a live handle from `sessionNew`, freed once, with no call running.
            drop(unsafe { Box::from_raw(handle as *mut SessionCell) });
        }
        Ok(())
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.sessionCancel(handle: Long)`: any thread, any time while the session is open.
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_sessionCancel<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
) {
    env.with_env(|env| -> JResult<()> {
        session_ref(env, handle)?.cancel();
        Ok(())
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.sessionReset(handle: Long)`
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_sessionReset<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
) {
    env.with_env(|env| -> JResult<()> {
        let r = session_ref(env, handle)?.reset();
        or_throw(env, r)
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.sessionGenerate(handle, prompt, roles, contents, <options>, listener): String` — a chat
/// turn when `prompt` is null (then `roles`/`contents` hold the messages), else a continuation of
/// `prompt`. `listener.onPiece(text: String, tokenId: Int): Boolean` sees each piece (false stops).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_dev_onestep_Native_sessionGenerate<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
    prompt: JString<'l>,
    roles: JObjectArray<'l, JString<'l>>,
    contents: JObjectArray<'l, JString<'l>>,
    max_new_tokens: jint,
    temperature: jfloat,
    top_k: jint,
    top_p: jfloat,
    has_seed: jboolean,
    seed: jlong,
    stop_strings: JObjectArray<'l, JString<'l>>,
    ignore_stop_tokens: jboolean,
    listener: JObject<'l>,
) -> JObject<'l> {
    env.with_env(|env| -> JResult<JObject<'l>> {
        let cell = session_ref(env, handle)?;
        let opts = options(
            env,
            cell.model(),
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            has_seed,
            seed,
            &stop_strings,
            ignore_stop_tokens,
        )?;
        let prompt = prompt_of(env, &prompt, &roles, &contents)?;
        // A Java exception in the listener stops the generation and propagates.
        let mut java_error: Option<jni::errors::Error> = None;
        let mut on_piece = |p: &onestep::generate::Piece| -> ControlFlow<()> {
            if listener.is_null() {
                return ControlFlow::Continue(());
            }
            let r = env.with_local_frame(4, |env| -> JResult<bool> {
                let s = env.new_string(&p.text)?;
                env.call_method(
                    &listener,
                    jni_str!("onPiece"),
                    jni_sig!("(Ljava/lang/String;I)Z"),
                    &[JValue::Object(&s), JValue::Int(p.token_id as jint)],
                )?
                .z()
            });
            match r {
                Ok(true) => ControlFlow::Continue(()),
                Ok(false) => ControlFlow::Break(()),
                Err(e) => {
                    java_error = Some(e);
                    ControlFlow::Break(())
                }
            }
        };
        let r = cell.generate(prompt.as_prompt(), &opts, &mut on_piece);
        if let Some(e) = java_error {
            return Err(e);
        }
        let text = or_throw(env, r)?;
        Ok(env.new_string(&text)?.into())
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.sessionStart(handle, prompt, roles, contents, <options>)`: starts a pull generation
/// (read it with `sessionNextPiece`); `prompt` null means a chat turn, as in `sessionGenerate`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_dev_onestep_Native_sessionStart<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
    prompt: JString<'l>,
    roles: JObjectArray<'l, JString<'l>>,
    contents: JObjectArray<'l, JString<'l>>,
    max_new_tokens: jint,
    temperature: jfloat,
    top_k: jint,
    top_p: jfloat,
    has_seed: jboolean,
    seed: jlong,
    stop_strings: JObjectArray<'l, JString<'l>>,
    ignore_stop_tokens: jboolean,
) {
    env.with_env(|env| -> JResult<()> {
        let cell = session_ref(env, handle)?;
        let opts = options(
            env,
            cell.model(),
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            has_seed,
            seed,
            &stop_strings,
            ignore_stop_tokens,
        )?;
        let prompt = prompt_of(env, &prompt, &roles, &contents)?;
        let r = cell.start(prompt.as_prompt(), &opts);
        or_throw(env, r)
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.sessionNextPiece(handle): String?` — the next piece's text, null once the generation has
/// ended.
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_sessionNextPiece<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> JObject<'l> {
    env.with_env(|env| -> JResult<JObject<'l>> {
        let r = session_ref(env, handle)?.next_piece();
        match or_throw(env, r)? {
            Some(p) => Ok(env.new_string(&p.text)?.into()),
            None => Ok(JObject::null()),
        }
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.sessionLastStopReason(handle): String?` — `stop_token`, `max_tokens`, ... (null before
/// the first finished generation).
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_sessionLastStopReason<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> JObject<'l> {
    env.with_env(|env| -> JResult<JObject<'l>> {
        let r = session_ref(env, handle)?.last(|c| c.map(|c| c.stop_reason.name()));
        match or_throw(env, r)? {
            Some(n) => Ok(env.new_string(n)?.into()),
            None => Ok(JObject::null()),
        }
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.sessionLastStats(handle): DoubleArray?` = [promptTokens, reusedTokens, generatedTokens,
/// timeToFirstTokenMs, prefillMs, decodeMs, decodeTokensPerS, stopTokenId or -1] (null before the
/// first finished generation).
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_sessionLastStats<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> JObject<'l> {
    env.with_env(|env| -> JResult<JObject<'l>> {
        let r = session_ref(env, handle)?.last(|c| {
            c.map(|c| {
                let st = &c.stats;
                let stop_id = match c.stop_reason {
                    StopReason::StopToken { id } => id as jdouble,
                    _ => -1.0,
                };
                [
                    c.prompt_tokens as jdouble,
                    st.reused_tokens as jdouble,
                    st.generated_tokens as jdouble,
                    st.time_to_first_token_ms,
                    st.prefill_ms,
                    st.decode_ms,
                    st.decode_tokens_per_s,
                    stop_id,
                ]
            })
        });
        let Some(v) = or_throw(env, r)? else {
            return Ok(JObject::null());
        };
        let arr = env.new_double_array(v.len())?;
        arr.set_region(env, 0, &v)?;
        Ok(arr.into())
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

// ---------------------------------------------------------------------------------------------
// Transcriber.

/// `Native.transcriberNew(model: Long): Long` — INVALID_ARGUMENT unless the model is a transcription
/// model. The transcriber keeps its own reference to the model.
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_transcriberNew<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    model: jlong,
) -> jlong {
    env.with_env(|env| -> JResult<jlong> {
        let m = model_ref(env, model)?.clone();
        let cell = TranscriberCell::new(m);
        let cell = or_throw(env, cell)?;
        Ok(Box::into_raw(Box::new(cell)) as jlong)
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.transcriberFree(handle: Long)`
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_transcriberFree<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
) {
    env.with_env(|_env| -> JResult<()> {
        if handle != 0 {
            // SAFETY: a live handle from `transcriberNew`, freed once, with no call running.
            drop(unsafe { Box::from_raw(handle as *mut TranscriberCell) });
        }
        Ok(())
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.transcriberCancel(handle: Long)`: any thread, any time while the transcriber is open.
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_transcriberCancel<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
) {
    env.with_env(|env| -> JResult<()> {
        transcriber_ref(env, handle)?.cancel();
        Ok(())
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.transcriberSampleRate(handle: Long): Int` — the rate `transcribe` takes (16000 for
/// Whisper).
#[no_mangle]
pub extern "system" fn Java_dev_onestep_Native_transcriberSampleRate<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
) -> jint {
    env.with_env(|env| -> JResult<jint> {
        let rate = transcriber_ref(env, handle)?.sample_rate();
        Ok(jint::try_from(rate).unwrap_or(jint::MAX))
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}

/// `Native.transcribe(handle, samples: FloatArray, sampleRate: Int, language: String?, translate:
/// Boolean, maxTokensPerWindow: Int, timestamps: Boolean, listener: TextListener?): String` — the
/// transcript as JSON (the C ABI's `onestep_transcribe` format). `listener.onText(text: String):
/// Boolean` sees each piece of text as it is decoded (false stops: the transcript so far, with
/// `"cancelled": true`). A null `language` is English.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_dev_onestep_Native_transcribe<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    handle: jlong,
    samples: JFloatArray<'l>,
    sample_rate: jint,
    language: JString<'l>,
    translate: jboolean,
    max_tokens_per_window: jint,
    timestamps: jboolean,
    listener: JObject<'l>,
) -> JObject<'l> {
    env.with_env(|env| -> JResult<JObject<'l>> {
        let cell = transcriber_ref(env, handle)?;
        let Ok(rate) = u32::try_from(sample_rate) else {
            return throw(
                env,
                Status::InvalidArgument,
                format!("sampleRate {sample_rate} is negative"),
            );
        };
        let Ok(max_tokens) = usize::try_from(max_tokens_per_window) else {
            return throw(
                env,
                Status::InvalidArgument,
                format!("max_tokens_per_window is {max_tokens_per_window}; it must be at least 1"),
            );
        };
        let n = samples.len(env)?;
        // The rate and the length before the samples are copied.
        let r = cell.check_audio(rate, n);
        or_throw(env, r)?;
        let opts = TranscribeOptions {
            language: opt_string(env, &language)?,
            translate,
            max_tokens_per_window: max_tokens,
            timestamps,
            ..TranscribeOptions::default()
        };
        let mut pcm = vec![0f32; n];
        samples.get_region(env, 0, &mut pcm)?;
        // A Java exception in the listener stops the transcription and propagates.
        let mut java_error: Option<jni::errors::Error> = None;
        let mut on_text = |piece: &str| -> ControlFlow<()> {
            if listener.is_null() {
                return ControlFlow::Continue(());
            }
            let r = env.with_local_frame(4, |env| -> JResult<bool> {
                let s = env.new_string(piece)?;
                env.call_method(
                    &listener,
                    jni_str!("onText"),
                    jni_sig!("(Ljava/lang/String;)Z"),
                    &[JValue::Object(&s)],
                )?
                .z()
            });
            match r {
                Ok(true) => ControlFlow::Continue(()),
                Ok(false) => ControlFlow::Break(()),
                Err(e) => {
                    java_error = Some(e);
                    ControlFlow::Break(())
                }
            }
        };
        let r = cell.transcribe(&pcm, rate, &opts, &mut on_text);
        if let Some(e) = java_error {
            return Err(e);
        }
        let done = or_throw(env, r)?;
        Ok(env.new_string(done.json())?.into())
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}
