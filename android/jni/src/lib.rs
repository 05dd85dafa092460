//! JNI bindings of the onestep runtime: the native half of the Kotlin API in
//! `android/src/main/kotlin/dev/onestep/` (class `dev.onestep.Native`). Built as a cdylib for Android
//! (`android/build-so.sh`) and for the desktop JVM (tests in `android/test-jvm`).
//!
//! The bindings add no logic: each native method converts its arguments, calls the safe Rust API
//! ([`onestep::Model`], [`onestep::generate::Session`]) and converts the result. Runtime errors become
//! a `dev.onestep.OneStepException` carrying a `dev.onestep.Status` and the runtime's message; JNI failures and Rust panics
//! become a `java.lang.RuntimeException` (every entry point runs inside `EnvUnowned::with_env`, which
//! catches panics): nothing aborts the VM.
//!
//! Handles are `Box` pointers passed to Kotlin as `long`; Kotlin owns them and frees each once
//! (`close()`).
#![warn(missing_docs)]

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use jni::errors::ThrowRuntimeExAndDefault;
use jni::objects::{JByteArray, JClass, JObject, JObjectArray, JString, JThrowable, JValue};
use jni::sys::{jboolean, jdouble, jfloat, jint, jlong};
use jni::{jni_sig, jni_str, Env, EnvUnowned};

use onestep::generate::{
    ChatMessage, Completion, GenerateOptions, OwnedStream, Session, StopReason,
};
use onestep::{LoadOptions, Model};

type JResult<T> = Result<T, jni::errors::Error>;

/// What kind of failure a `dev.onestep.OneStepException` reports: the name of a `dev.onestep.Status`
/// constant (the C ABI's `OnestepStatus` values by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    InvalidArgument,
    Io,
    InvalidModel,
    Unsupported,
    Runtime,
    Tokenizer,
    Template,
    Busy,
    BadState,
    Cancelled,
    Device,
    Internal,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::InvalidArgument => "INVALID_ARGUMENT",
            Status::Io => "IO",
            Status::InvalidModel => "INVALID_MODEL",
            Status::Unsupported => "UNSUPPORTED",
            Status::Runtime => "RUNTIME",
            Status::Tokenizer => "TOKENIZER",
            Status::Template => "TEMPLATE",
            Status::Busy => "BUSY",
            Status::BadState => "BAD_STATE",
            Status::Cancelled => "CANCELLED",
            Status::Device => "DEVICE",
            Status::Internal => "INTERNAL",
        }
    }

    /// The status of a runtime error; `loading`: a node or tensor error then means a bad model file,
    /// while running it means a failed step.
    fn of(e: &onestep::Error, loading: bool) -> Status {
        use onestep::Error as E;
        #[allow(unreachable_patterns)]
        match e {
            E::Io { .. } => Status::Io,
            E::Decode { .. } | E::Contract(_) | E::Metadata { .. } | E::Limit { .. } => {
                Status::InvalidModel
            }
            E::UnsupportedOps(_) | E::Opset { .. } => Status::Unsupported,
            E::Tensor { .. } | E::Node { .. } if loading => Status::InvalidModel,
            E::InvalidArgument(_) => Status::InvalidArgument,
            E::Tokenizer(_) => Status::Tokenizer,
            E::Template(_) => Status::Template,
            E::Cancelled => Status::Cancelled,
            E::Device { .. } => Status::Device,
            E::Internal(_) => Status::Internal,
            _ if loading => Status::InvalidModel,
            _ => Status::Runtime,
        }
    }
}

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

/// `r`'s value, or its error thrown (a failed step: see [`Status::of`]).
fn or_throw<T>(env: &mut Env<'_>, r: onestep::Result<T>) -> JResult<T> {
    match r {
        Ok(v) => Ok(v),
        Err(e) => throw(env, Status::of(&e, false), e.to_string()),
    }
}

/// Like [`or_throw`], for a model being loaded.
fn or_throw_load<T>(env: &mut Env<'_>, r: onestep::Result<T>) -> JResult<T> {
    match r {
        Ok(v) => Ok(v),
        Err(e) => throw(env, Status::of(&e, true), e.to_string()),
    }
}

/// A session handle: the cancel flag is reachable without the lock (any thread may cancel).
struct SessionHandle {
    cancel: Arc<AtomicBool>,
    inner: Mutex<Inner>,
}

// One per heap-allocated handle, moved only on state changes: the size difference is harmless.
#[allow(clippy::large_enum_variant)]
enum State {
    Idle(Session),
    Streaming(OwnedStream),
    Lost,
}

struct Inner {
    state: State,
    last: Option<Completion>,
}

impl Inner {
    fn take_session(&mut self) -> Option<Session> {
        match std::mem::replace(&mut self.state, State::Lost) {
            State::Idle(s) => Some(s),
            State::Streaming(st) => Some(st.into_session()),
            State::Lost => None,
        }
    }
}

fn model_ref<'a>(env: &mut Env<'_>, handle: jlong) -> JResult<&'a Arc<Model>> {
    // SAFETY: Kotlin passes handles made by `modelLoad*` and not yet freed (it zeroes them on close).
    match unsafe { (handle as *const Arc<Model>).as_ref() } {
        Some(m) => Ok(m),
        None => throw(env, Status::BadState, "the model is closed"),
    }
}

fn session_ref<'a>(env: &mut Env<'_>, handle: jlong) -> JResult<&'a SessionHandle> {
    // SAFETY: as above, for `sessionNew`.
    match unsafe { (handle as *const SessionHandle).as_ref() } {
        Some(s) => Ok(s),
        None => throw(env, Status::BadState, "the session is closed"),
    }
}

fn lock<'a>(env: &mut Env<'_>, s: &'a SessionHandle) -> JResult<MutexGuard<'a, Inner>> {
    match s.inner.try_lock() {
        Ok(g) => Ok(g),
        Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        Err(TryLockError::WouldBlock) => {
            throw(env, Status::Busy, "the session is in use by another call")
        }
    }
}

fn take_session(env: &mut Env<'_>, inner: &mut Inner) -> JResult<Session> {
    match inner.take_session() {
        Some(s) => Ok(s),
        None => throw(
            env,
            Status::Internal,
            "the session was lost to an internal error; close it",
        ),
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
    or_throw(env, v)?;
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
/// (null: the defaults `cpu`, any, `all`, `exact`, none) and page rows (0: the default).
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
    or_throw_load(env, o)
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
        let m = or_throw_load(env, m)?;
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
        let m = or_throw_load(env, m)?;
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
        let s = Session::new(m);
        let s = or_throw(env, s)?;
        let h = SessionHandle {
            cancel: s.cancel_flag(),
            inner: Mutex::new(Inner {
                state: State::Idle(s),
                last: None,
            }),
        };
        Ok(Box::into_raw(Box::new(h)) as jlong)
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
            drop(unsafe { Box::from_raw(handle as *mut SessionHandle) });
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
        session_ref(env, handle)?
            .cancel
            .store(true, Ordering::Release);
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
        let h = session_ref(env, handle)?;
        let mut inner = lock(env, h)?;
        let mut s = take_session(env, &mut inner)?;
        s.reset();
        inner.state = State::Idle(s);
        Ok(())
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
        let h = session_ref(env, handle)?;
        let mut inner = lock(env, h)?;
        let mut session = take_session(env, &mut inner)?;
        let result = (|| {
            let opts = options(
                env,
                session.model(),
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                has_seed,
                seed,
                &stop_strings,
                ignore_stop_tokens,
            )?;
            let chat = if prompt.is_null() {
                Some(messages(env, &roles, &contents)?)
            } else {
                None
            };
            let text = if prompt.is_null() {
                None
            } else {
                Some(prompt.try_to_string(env)?)
            };
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
            let r = match (&text, &chat) {
                (Some(t), _) => session.generate(t, &opts, &mut on_piece),
                (None, Some(m)) => session.chat(m, &opts, &mut on_piece),
                (None, None) => unreachable!("either a prompt or messages"),
            };
            if let Some(e) = java_error {
                return Err(e);
            }
            or_throw(env, r)
        })();
        inner.state = State::Idle(session);
        let completion = result?;
        let text = env.new_string(&completion.text)?;
        inner.last = Some(completion);
        Ok(text.into())
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
        let h = session_ref(env, handle)?;
        let mut inner = lock(env, h)?;
        let session = take_session(env, &mut inner)?;
        let args = (|| {
            let opts = options(
                env,
                session.model(),
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                has_seed,
                seed,
                &stop_strings,
                ignore_stop_tokens,
            )?;
            if prompt.is_null() {
                Ok((opts, None, Some(messages(env, &roles, &contents)?)))
            } else {
                Ok((opts, Some(prompt.try_to_string(env)?), None))
            }
        })();
        let (opts, text, chat) = match args {
            Ok(a) => a,
            Err(e) => {
                inner.state = State::Idle(session);
                return Err(e);
            }
        };
        let started = match (text, chat) {
            (Some(t), _) => session.into_stream(&t, &opts),
            (None, Some(m)) => session.into_chat_stream(&m, &opts),
            (None, None) => unreachable!("either a prompt or messages"),
        };
        match started {
            Ok(st) => {
                inner.state = State::Streaming(st);
                Ok(())
            }
            Err(failed) => {
                let (s, e) = *failed;
                inner.state = State::Idle(s);
                throw(env, Status::of(&e, false), e.to_string())
            }
        }
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
        let h = session_ref(env, handle)?;
        let mut inner = lock(env, h)?;
        let State::Streaming(stream) = &mut inner.state else {
            return throw(env, Status::BadState, "no generation in progress");
        };
        match stream.next() {
            Some(Ok(p)) => Ok(env.new_string(&p.text)?.into()),
            Some(Err(e)) => {
                let s = take_session(env, &mut inner)?;
                inner.state = State::Idle(s);
                throw(env, Status::of(&e, false), e.to_string())
            }
            None => {
                let last = stream.completion();
                let s = take_session(env, &mut inner)?;
                inner.state = State::Idle(s);
                inner.last = last;
                Ok(JObject::null())
            }
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
        let h = session_ref(env, handle)?;
        let inner = lock(env, h)?;
        match inner.last.as_ref().map(|c| c.stop_reason.name()) {
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
        let h = session_ref(env, handle)?;
        let inner = lock(env, h)?;
        let Some(c) = inner.last.as_ref() else {
            return Ok(JObject::null());
        };
        let st = &c.stats;
        let stop_id = match c.stop_reason {
            StopReason::StopToken { id } => id as jdouble,
            _ => -1.0,
        };
        let v = [
            c.prompt_tokens as jdouble,
            st.reused_tokens as jdouble,
            st.generated_tokens as jdouble,
            st.time_to_first_token_ms,
            st.prefill_ms,
            st.decode_ms,
            st.decode_tokens_per_s,
            stop_id,
        ];
        let arr = env.new_double_array(v.len())?;
        arr.set_region(env, 0, &v)?;
        Ok(arr.into())
    })
    .resolve::<ThrowRuntimeExAndDefault>()
}
