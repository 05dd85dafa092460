//! What the C ABI (`capi/`) and the JNI bindings (`android/jni/`) share, so that they behave as one:
//! the [`Status`] of every runtime failure, a session's state machine ([`SessionCell`]: idle,
//! streaming a pull generation, or lost to a panic) behind one lock that a second concurrent call
//! finds busy, with the cancel flag outside it, and a transcriber the same way ([`TranscriberCell`],
//! with the checks of the audio and the transcript's JSON). Each binding converts its arguments,
//! calls these, and converts the results and failures to its own forms (a C status and the
//! per-thread message; a Kotlin `OneStepException`); neither keeps a session or transcriber state of
//! its own.
//!
//! No function here unwinds on bad input; the bindings still catch panics at their entry points.
#![warn(missing_docs)]

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use onestep::generate::{ChatMessage, Completion, GenerateOptions, OwnedStream, Piece, Session};
use onestep::{Error, Model};

mod transcribe;
pub use transcribe::{Transcribed, TranscriberCell, TRANSCRIBE_MAX_SECONDS};

/// What kind of failure a call reports: the C ABI's `OnestepStatus` values that the runtime produces
/// (the C boundary adds its own: NULL pointers, bad UTF-8, caught panics), Kotlin's `Status` by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// An argument is out of range.
    InvalidArgument,
    /// Reading the model file failed at the OS level.
    Io,
    /// The bytes are not a valid onestep step graph.
    InvalidModel,
    /// Ops or an opset this runtime does not implement.
    Unsupported,
    /// A step failed while running.
    Runtime,
    /// Tokenizer failure.
    Tokenizer,
    /// Chat-template failure (or no chat template).
    Template,
    /// The session is in use by another call.
    Busy,
    /// The call does not fit the session's state.
    BadState,
    /// The operation was cancelled.
    Cancelled,
    /// The requested device cannot be used or failed.
    Device,
    /// A broken invariant inside onestep.
    Internal,
}

impl Status {
    /// The name as Kotlin's `dev.onestep.Status` spells it (`INVALID_ARGUMENT`).
    pub fn name(self) -> &'static str {
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

    /// The status of a runtime error in `phase`.
    pub fn of(e: &Error, phase: Phase) -> Status {
        // The wildcard keeps this compiling when the runtime grows a variant (a resource limit, a GPU
        // error, ...): a new failure while loading is an invalid model, while running a runtime error.
        #[allow(unreachable_patterns)]
        match (e, phase) {
            (Error::Io { .. }, _) => Status::Io,
            (Error::Decode { .. } | Error::Contract(_) | Error::Metadata { .. }, _) => {
                Status::InvalidModel
            }
            (Error::Limit { .. }, _) => Status::InvalidModel,
            (Error::UnsupportedOps(_) | Error::Opset { .. }, _) => Status::Unsupported,
            (Error::Tensor { .. } | Error::Node { .. }, Phase::Load) => Status::InvalidModel,
            (Error::Tensor { .. } | Error::Node { .. }, Phase::Run) => Status::Runtime,
            (Error::InvalidArgument(_), _) => Status::InvalidArgument,
            (Error::Tokenizer(_), _) => Status::Tokenizer,
            (Error::Template(_), _) => Status::Template,
            (Error::Cancelled, _) => Status::Cancelled,
            (Error::Device { .. }, _) => Status::Device,
            (Error::Internal(_), _) => Status::Internal,
            (_, Phase::Load) => Status::InvalidModel,
            (_, Phase::Run) => Status::Runtime,
        }
    }
}

/// Where a runtime error happened: a node or tensor error while loading means a bad model file,
/// while running a failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Loading a model or creating a session over it.
    Load,
    /// Running a generation.
    Run,
}

/// A failed call: its status and the message for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fail {
    /// What kind of failure.
    pub status: Status,
    /// What and where (file, tensor, op).
    pub message: String,
}

impl Fail {
    /// A failure with `status`.
    pub fn new(status: Status, message: impl Into<String>) -> Fail {
        Fail {
            status,
            message: message.into(),
        }
    }

    /// A runtime error in `phase`.
    pub fn runtime(e: Error, phase: Phase) -> Fail {
        Fail::new(Status::of(&e, phase), e.to_string())
    }
}

/// A call's result.
pub type FfiResult<T = ()> = Result<T, Fail>;

/// What a generation continues: a text as it is, or a chat rendered with the model's template.
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    /// A continuation of this text (tokenized as is, from an empty cache).
    Text(&'a str),
    /// The assistant's reply to these messages (the cache is kept between turns).
    Chat(&'a [ChatMessage]),
}

/// One session as a binding holds it: the state machine behind one lock, the cancel flag outside.
pub struct SessionCell {
    model: Arc<Model>,
    cancel: Arc<AtomicBool>,
    inner: Mutex<Inner>,
}

// One per heap-allocated handle, moved only on state changes: the size difference is harmless.
#[allow(clippy::large_enum_variant)]
enum State {
    Idle(Session),
    Streaming(OwnedStream),
    /// Only after a caught panic in the middle of a state change.
    Lost,
}

struct Inner {
    state: State,
    last: Option<Completion>,
}

impl Inner {
    /// The idle session (ending a pull generation in progress, as the Rust iterator's drop does).
    fn take_session(&mut self) -> FfiResult<Session> {
        match std::mem::replace(&mut self.state, State::Lost) {
            State::Idle(s) => Ok(s),
            State::Streaming(st) => Ok(st.into_session()),
            State::Lost => Err(Fail::new(
                Status::BadState,
                "the session was lost to an earlier internal error; free it and create a new one",
            )),
        }
    }
}

impl SessionCell {
    /// A session over `model`.
    pub fn new(model: Arc<Model>) -> FfiResult<SessionCell> {
        let session = Session::new(model.clone()).map_err(|e| Fail::runtime(e, Phase::Load))?;
        Ok(SessionCell {
            model,
            cancel: session.cancel_flag(),
            inner: Mutex::new(Inner {
                state: State::Idle(session),
                last: None,
            }),
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Asks the running generation to stop before its next step (any thread, any time; with nothing
    /// running, the next generation stops before its first step).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }

    /// Locks the session for one call, never blocking: a second concurrent call is [`Status::Busy`].
    fn lock(&self) -> FfiResult<MutexGuard<'_, Inner>> {
        match self.inner.try_lock() {
            Ok(g) => Ok(g),
            // A panic inside an earlier call: the state decides whether the session is usable.
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => Err(Fail::new(
                Status::Busy,
                "the session is in use by another call",
            )),
        }
    }

    /// Forgets the conversation (empties the KV cache) and ends a pull generation in progress.
    pub fn reset(&self) -> FfiResult {
        let mut inner = self.lock()?;
        let mut session = inner.take_session()?;
        session.reset();
        inner.state = State::Idle(session);
        Ok(())
    }

    /// Runs a whole generation of `prompt` with `opts`, `on_piece` seeing each piece (`Break`
    /// stops); returns the generated text. Ends a pull generation in progress.
    pub fn generate(
        &self,
        prompt: Prompt<'_>,
        opts: &GenerateOptions,
        on_piece: &mut dyn FnMut(&Piece) -> ControlFlow<()>,
    ) -> FfiResult<String> {
        let mut inner = self.lock()?;
        let mut session = inner.take_session()?;
        let r = match prompt {
            Prompt::Text(t) => session.generate(t, opts, on_piece),
            Prompt::Chat(m) => session.chat(m, opts, on_piece),
        };
        inner.state = State::Idle(session);
        let completion = r.map_err(|e| Fail::runtime(e, Phase::Run))?;
        let text = completion.text.clone();
        inner.last = Some(completion);
        Ok(text)
    }

    /// Starts a pull generation of `prompt` (read it with [`SessionCell::next_piece`]); another
    /// generation or a reset ends it.
    pub fn start(&self, prompt: Prompt<'_>, opts: &GenerateOptions) -> FfiResult {
        let mut inner = self.lock()?;
        let session = inner.take_session()?;
        let started = match prompt {
            Prompt::Text(t) => session.into_stream(t, opts),
            Prompt::Chat(m) => session.into_chat_stream(m, opts),
        };
        match started {
            Ok(stream) => {
                inner.state = State::Streaming(stream);
                Ok(())
            }
            Err(failed) => {
                let (session, e) = *failed;
                inner.state = State::Idle(session);
                Err(Fail::runtime(e, Phase::Run))
            }
        }
    }

    /// The pull generation's next piece; `None` once it has ended (its statistics are then
    /// [`SessionCell::last`]'s). An error ends the generation; the session stays usable.
    pub fn next_piece(&self) -> FfiResult<Option<Piece>> {
        let mut inner = self.lock()?;
        let State::Streaming(stream) = &mut inner.state else {
            return Err(Fail::new(
                Status::BadState,
                "no generation in progress (start one first)",
            ));
        };
        match stream.next() {
            Some(Ok(p)) => Ok(Some(p)),
            Some(Err(e)) => {
                let session = inner.take_session()?;
                inner.state = State::Idle(session);
                Err(Fail::runtime(e, Phase::Run))
            }
            None => {
                let last = stream.completion();
                let session = inner.take_session()?;
                inner.state = State::Idle(session);
                inner.last = last;
                Ok(None)
            }
        }
    }

    /// `f` of the last finished generation (`None` before the first).
    pub fn last<R>(&self, f: impl FnOnce(Option<&Completion>) -> R) -> FfiResult<R> {
        let inner = self.lock()?;
        Ok(f(inner.last.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Arc<Model> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/micro/micro_llama_q8.onnx"
        );
        Model::load(path).unwrap()
    }

    /// The state machine: a pull generation, the busy lock, the errors that leave the session usable.
    #[test]
    fn one_state_machine_for_every_binding() {
        let cell = SessionCell::new(model()).unwrap();
        let mut opts = GenerateOptions::from_defaults(&cell.model().info().generation);
        opts.max_new_tokens = 3;
        opts.temperature = 0.0;
        opts.ignore_stop_tokens = true;
        assert!(cell.last(|c| c.is_none()).unwrap());
        assert_eq!(cell.next_piece().unwrap_err().status, Status::BadState);

        let whole = cell
            .generate(Prompt::Text("hello"), &opts, &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(cell.last(|c| c.unwrap().stats.generated_tokens).unwrap(), 3);

        cell.start(Prompt::Text("hello"), &opts).unwrap();
        let mut pulled = String::new();
        // A second call while the lock is held is Busy, never a wait.
        {
            let _held = cell.lock().unwrap();
            assert_eq!(cell.reset().unwrap_err().status, Status::Busy);
        }
        while let Some(p) = cell.next_piece().unwrap() {
            pulled.push_str(&p.text);
        }
        assert_eq!(pulled, whole);
        assert_eq!(cell.next_piece().unwrap_err().status, Status::BadState);

        // A prompt longer than the cache: a typed failure, and the session goes on.
        let long = "hello ".repeat(cell.model().info().max_cache + 8);
        let e = cell
            .generate(Prompt::Text(&long), &opts, &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap_err();
        assert_eq!(e.status, Status::InvalidArgument, "{}", e.message);
        let e = cell.start(Prompt::Text(&long), &opts).unwrap_err();
        assert_eq!(e.status, Status::InvalidArgument, "{}", e.message);
        // A cancel before the generation stops it before its first step.
        cell.cancel();
        cell.generate(Prompt::Text("hello"), &opts, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(
            cell.last(|c| c.unwrap().stop_reason.name()).unwrap(),
            "cancelled"
        );
        cell.reset().unwrap();
        assert_eq!(
            cell.generate(
                Prompt::Text("hello"),
                &opts,
                &mut |_| ControlFlow::Continue(())
            )
            .unwrap(),
            whole
        );
    }

    /// Node errors are a bad model while loading and a failed step while running.
    #[test]
    fn statuses_depend_on_the_phase() {
        let node = || Error::node("n", "MatMul", "shapes");
        assert_eq!(Status::of(&node(), Phase::Load), Status::InvalidModel);
        assert_eq!(Status::of(&node(), Phase::Run), Status::Runtime);
        let f = Fail::runtime(Error::internal("x"), Phase::Run);
        assert_eq!((f.status, f.status.name()), (Status::Internal, "INTERNAL"));
    }
}
