//! `Session`: one conversation over a shared model — tokenize, chunked prefill, the step loop, stop
//! conditions, streaming, stats.

use std::ops::{ControlFlow, Range};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::contract::ModelInfo;
use crate::error::{Error, Result};
use crate::generate::chat::{ChatMessage, ChatTemplate};
use crate::generate::sampling::{GenerateOptions, SamplingRng};
use crate::generate::stats::{per_second, GenerateStats};
use crate::generate::stop::{StopMatcher, StopReason};
use crate::generate::stream::StreamDecoder;
use crate::generate::tokenizer::Tokenizer;
use crate::model::{Model, StepOutput, StepSampling, StepState};

/// One generated token and the text it completed (possibly empty: the token may end inside a
/// character, be a special token, or start what may become a stop string). Concatenating the pieces'
/// text gives [`Completion::text`]. When generation ends on a stop token, held-back text (if any) comes
/// in a last piece carrying that stop token's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Piece {
    /// Text to show now.
    pub text: String,
    /// The token.
    pub token_id: u32,
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    /// The generated text (special tokens skipped, ends before any stop string).
    pub text: String,
    /// Generated token ids (a stop token is not included).
    pub token_ids: Vec<u32>,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Tokens in the prompt (including any reused from the cache).
    pub prompt_tokens: usize,
    /// Timing.
    pub stats: GenerateStats,
}

/// The engine surface the generate loop needs; implemented by [`Model`] and by test doubles.
pub(crate) trait StepEngine {
    type State;
    fn info(&self) -> &ModelInfo;
    fn load_ms(&self) -> f64;
    fn new_state(&self) -> Result<Self::State>;
    fn step(&self, state: &mut Self::State, ids: &[u32], s: &StepSampling) -> Result<StepOutput>;
    fn reset_state(state: &mut Self::State);
    fn truncate_state(state: &mut Self::State, len: usize);
}

impl StepEngine for Model {
    type State = StepState;
    fn info(&self) -> &ModelInfo {
        Model::info(self)
    }
    fn load_ms(&self) -> f64 {
        Model::load_ms(self)
    }
    fn new_state(&self) -> Result<StepState> {
        Model::new_state(self)
    }
    fn step(&self, state: &mut StepState, ids: &[u32], s: &StepSampling) -> Result<StepOutput> {
        // The session reads only the chosen token: on a GPU nothing else comes back.
        Model::step_with(self, state, ids, s, false)
    }
    fn reset_state(state: &mut StepState) {
        state.reset()
    }
    fn truncate_state(state: &mut StepState, len: usize) {
        state.truncate(len)
    }
}

/// Splits `n` prompt tokens into consecutive chunks of at most `max_chunk` (the last may be shorter).
pub fn plan_chunks(n: usize, max_chunk: usize) -> Vec<Range<usize>> {
    let max_chunk = max_chunk.max(1);
    (0..n)
        .step_by(max_chunk)
        .map(|s| s..(s + max_chunk).min(n))
        .collect()
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The session machinery, generic over the engine so tests can drive it with a double.
pub(crate) struct Core<E: StepEngine> {
    engine: Arc<E>,
    state: E::State,
    tokenizer: Arc<Tokenizer>,
    template: Option<Arc<ChatTemplate>>,
    rng: SamplingRng,
    cancel: Arc<AtomicBool>,
    /// The ids whose K/V rows are in `state`, in order (always `state`'s length).
    cached: Vec<u32>,
}

impl<E: StepEngine> Core<E> {
    pub(crate) fn new(
        engine: Arc<E>,
        tokenizer: Arc<Tokenizer>,
        template: Option<Arc<ChatTemplate>>,
    ) -> Result<Self> {
        let state = engine.new_state()?;
        Ok(Self {
            engine,
            state,
            tokenizer,
            template,
            rng: SamplingRng::from_entropy(),
            cancel: Arc::new(AtomicBool::new(false)),
            cached: Vec::new(),
        })
    }

    fn reset(&mut self) {
        E::reset_state(&mut self.state);
        self.cached.clear();
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let t = self
            .template
            .as_ref()
            .ok_or_else(|| Error::Template("the model carries no chat template".into()))?;
        t.render(messages, true)
    }

    /// Checks the prompt and puts the cache where feeding `ids[returned..]` continues it: the longest
    /// cached prefix when `reuse`, else empty.
    fn prepare(&mut self, ids: &[u32], reuse: bool) -> Result<usize> {
        let info = self.engine.info();
        if ids.is_empty() {
            return Err(Error::InvalidArgument("the prompt is empty".into()));
        }
        if ids.len() + 1 > info.max_cache {
            return Err(Error::InvalidArgument(format!(
                "the prompt is {} tokens but the model's cache holds {} (at most {} prompt tokens, \
                 leaving room for one generated token)",
                ids.len(),
                info.max_cache,
                info.max_cache - 1
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= info.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary ({} ids)",
                info.vocab_size
            )));
        }
        let keep = if reuse {
            // At least one token must be fed to get the next one.
            common_prefix(&self.cached, ids).min(ids.len() - 1)
        } else {
            0
        };
        if keep == 0 {
            self.reset();
        } else {
            E::truncate_state(&mut self.state, keep);
            self.cached.truncate(keep);
        }
        Ok(keep)
    }

    /// Starts a generation over prompt `ids`.
    fn start(
        &mut self,
        ids: &[u32],
        reuse: bool,
        opts: &GenerateOptions,
        t_start: Instant,
    ) -> Result<Run> {
        opts.validate()?;
        let stop = StopMatcher::new(&opts.stop_strings)?;
        let keep = self.prepare(ids, reuse)?;
        if let Some(seed) = opts.seed {
            self.rng = SamplingRng::seeded(seed);
        }
        Ok(Run {
            opts: opts.clone(),
            stop,
            detok: StreamDecoder::new(),
            to_feed: ids[keep..].to_vec(),
            prompt_tokens: ids.len(),
            next: None,
            pending_feed: None,
            generated: Vec::new(),
            text: String::new(),
            finished: None,
            failed: false,
            stats: GenerateStats {
                load_ms: self.engine.load_ms(),
                reused_tokens: keep,
                ..GenerateStats::default()
            },
            t_start,
            t_decode: None,
        })
    }

    fn take_cancel(&self) -> bool {
        self.cancel.swap(false, Ordering::AcqRel)
    }

    fn step(&mut self, ids: &[u32], s: &StepSampling) -> Result<u32> {
        match self.engine.step(&mut self.state, ids, s) {
            Ok(out) => {
                self.cached.extend_from_slice(ids);
                Ok(out.next_token)
            }
            Err(e) => {
                // The state may be half-written: forget it so the session keeps working.
                self.reset();
                Err(e)
            }
        }
    }
}

/// One generation in progress (a state machine advanced one token at a time).
pub(crate) struct Run {
    opts: GenerateOptions,
    stop: StopMatcher,
    detok: StreamDecoder,
    to_feed: Vec<u32>,
    prompt_tokens: usize,
    /// Chosen by the last step, not yet processed.
    next: Option<u32>,
    /// Processed and emitted, still to be fed to the model.
    pending_feed: Option<u32>,
    generated: Vec<u32>,
    text: String,
    finished: Option<StopReason>,
    failed: bool,
    stats: GenerateStats,
    t_start: Instant,
    t_decode: Option<Instant>,
}

impl Run {
    fn is_done(&self) -> bool {
        self.finished.is_some() || self.failed
    }

    /// Advances by one token; `Ok(None)` once finished.
    pub(crate) fn advance<E: StepEngine>(&mut self, core: &mut Core<E>) -> Result<Option<Piece>> {
        if self.is_done() {
            return Ok(None);
        }
        let r = self.advance_inner(core);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn advance_inner<E: StepEngine>(&mut self, core: &mut Core<E>) -> Result<Option<Piece>> {
        if self.next.is_none() && self.pending_feed.is_none() {
            self.prefill(core)?;
            if self.finished.is_some() {
                return Ok(None);
            }
        }
        if let Some(tok) = self.pending_feed.take() {
            if core.take_cancel() {
                return self.finish(core, StopReason::Cancelled, tok);
            }
            if core.cached.len() + 1 > core.engine.info().max_cache {
                return self.finish(core, StopReason::ContextFull, tok);
            }
            let u = core.rng.uniform();
            let s = self.opts.step_sampling(u, Some(core.rng.peek()));
            let next = core.step(&[tok], &s)?;
            self.stats.decode_tokens += 1;
            self.next = Some(next);
        }
        let Some(tok) = self.next.take() else {
            return Ok(None);
        };
        if !self.opts.ignore_stop_tokens && core.engine.info().stop_ids.contains(&tok) {
            return self.finish(core, StopReason::StopToken { id: tok }, tok);
        }
        self.generated.push(tok);
        let t = self.detok.push(&core.tokenizer, tok)?;
        let st = self.stop.push(&t);
        let mut text = st.emit;
        if let Some(s) = st.stopped {
            self.end(StopReason::StopString { text: s });
        } else if self.generated.len() >= self.opts.max_new_tokens as usize {
            let (rest, stopped) = self.flush(&core.tokenizer)?;
            text.push_str(&rest);
            self.end(match stopped {
                Some(s) => StopReason::StopString { text: s },
                None => StopReason::MaxTokens,
            });
        } else {
            self.pending_feed = Some(tok);
        }
        self.text.push_str(&text);
        Ok(Some(Piece {
            text,
            token_id: tok,
        }))
    }

    fn prefill<E: StepEngine>(&mut self, core: &mut Core<E>) -> Result<()> {
        let max_chunk = core.engine.info().max_chunk;
        let chunks = plan_chunks(self.to_feed.len(), max_chunk);
        let t0 = Instant::now();
        let last = chunks.len().saturating_sub(1);
        let mut next = None;
        for (i, r) in chunks.into_iter().enumerate() {
            if core.take_cancel() {
                self.stats.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
                self.end(StopReason::Cancelled);
                return Ok(());
            }
            // Only the last chunk's token is used; only it consumes a random number, so the draws do
            // not depend on the chunking.
            let s = if i == last {
                let u = core.rng.uniform();
                self.opts.step_sampling(u, Some(core.rng.peek()))
            } else {
                self.opts.step_sampling(0.0, None)
            };
            next = Some(core.step(&self.to_feed[r.clone()], &s)?);
            self.stats.prefill_tokens += r.len();
            self.stats.prefill_chunks += 1;
        }
        let now = Instant::now();
        self.stats.prefill_ms = (now - t0).as_secs_f64() * 1e3;
        self.stats.prefill_tokens_per_s =
            per_second(self.stats.prefill_tokens, self.stats.prefill_ms);
        self.stats.time_to_first_token_ms = (now - self.t_start).as_secs_f64() * 1e3;
        self.t_decode = Some(now);
        self.to_feed = Vec::new();
        self.next = next;
        Ok(())
    }

    /// Releases the text held by the detokenizer and the stop matcher.
    fn flush(&mut self, tok: &Tokenizer) -> Result<(String, Option<String>)> {
        let t = self.detok.finish(tok)?;
        let st = self.stop.push(&t);
        match st.stopped {
            Some(s) => Ok((st.emit, Some(s))),
            None => Ok((st.emit + &self.stop.finish(), None)),
        }
    }

    /// Ends with `reason`; held text comes out as a last piece tagged with `tok`.
    fn finish<E: StepEngine>(
        &mut self,
        core: &mut Core<E>,
        reason: StopReason,
        tok: u32,
    ) -> Result<Option<Piece>> {
        let (text, stopped) = self.flush(&core.tokenizer)?;
        self.end(match stopped {
            Some(s) => StopReason::StopString { text: s },
            None => reason,
        });
        if text.is_empty() {
            return Ok(None);
        }
        self.text.push_str(&text);
        Ok(Some(Piece {
            text,
            token_id: tok,
        }))
    }

    fn end(&mut self, reason: StopReason) {
        if self.finished.is_none() {
            self.finished = Some(reason);
            if let Some(t) = self.t_decode {
                self.stats.decode_ms = t.elapsed().as_secs_f64() * 1e3;
                self.stats.decode_tokens_per_s =
                    per_second(self.stats.decode_tokens, self.stats.decode_ms);
            }
            self.stats.generated_tokens = self.generated.len();
        }
    }

    /// Stops at the caller's request (the text held back is dropped: the caller has stopped reading).
    fn cancel(&mut self) {
        self.end(StopReason::Cancelled);
    }

    fn completion(&self) -> Option<Completion> {
        Some(Completion {
            text: self.text.clone(),
            token_ids: self.generated.clone(),
            stop_reason: self.finished.clone()?,
            prompt_tokens: self.prompt_tokens,
            stats: self.stats.clone(),
        })
    }
}

impl<E: StepEngine> Core<E> {
    fn run_to_end(
        &mut self,
        mut run: Run,
        on_piece: &mut dyn FnMut(&Piece) -> ControlFlow<()>,
    ) -> Result<Completion> {
        while let Some(p) = run.advance(self)? {
            if on_piece(&p).is_break() {
                run.cancel();
            }
        }
        run.completion()
            .ok_or_else(|| Error::InvalidArgument("generation ended without a reason".into()))
    }

    pub(crate) fn generate_ids(
        &mut self,
        ids: &[u32],
        reuse: bool,
        opts: &GenerateOptions,
        t_start: Instant,
        on_piece: &mut dyn FnMut(&Piece) -> ControlFlow<()>,
    ) -> Result<Completion> {
        let run = self.start(ids, reuse, opts, t_start)?;
        self.run_to_end(run, on_piece)
    }

    fn chat_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.render_chat(messages)?;
        self.tokenizer.encode(&text)
    }
}

/// A generation in progress as an iterator of pieces (see [`Session::stream`]). Dropping it early
/// leaves the session usable; the tokens fed so far stay cached.
pub struct Stream<'a> {
    inner: GenStream<'a, Model>,
}

pub(crate) struct GenStream<'a, E: StepEngine> {
    core: &'a mut Core<E>,
    run: Run,
}

impl<E: StepEngine> Iterator for GenStream<'_, E> {
    type Item = Result<Piece>;
    fn next(&mut self) -> Option<Result<Piece>> {
        self.run.advance(self.core).transpose()
    }
}

impl<E: StepEngine> GenStream<'_, E> {
    fn completion(&self) -> Option<Completion> {
        self.run.completion()
    }
}

impl Iterator for Stream<'_> {
    type Item = Result<Piece>;
    fn next(&mut self) -> Option<Result<Piece>> {
        self.inner.next()
    }
}

impl Stream<'_> {
    /// Stops the generation before the next step.
    pub fn cancel(&mut self) {
        self.inner.run.cancel();
    }
    /// Why the generation ended, once it has.
    pub fn stop_reason(&self) -> Option<&StopReason> {
        self.inner.run.finished.as_ref()
    }
    /// The completion, once the iterator has ended (`None` before, or after an error).
    pub fn completion(&self) -> Option<Completion> {
        self.inner.completion()
    }
}

/// One conversation (one KV cache) over a shared model. Not `Sync`; use one session per thread, any
/// number of sessions per model.
///
/// After any error the session's cache is reset and the session stays usable.
pub struct Session {
    core: Core<Model>,
}

impl Session {
    /// A session over `model`, with the model's tokenizer ([`Model::tokenizer`]: built once, shared)
    /// and the chat template of the model file.
    pub fn new(model: Arc<Model>) -> Result<Self> {
        let tokenizer = model.tokenizer()?;
        let template = match model.chat_template() {
            Some(src) => Some(Arc::new(template_for(src, &tokenizer, model.info())?)),
            None => None,
        };
        Self::with_parts(model, tokenizer, template)
    }

    /// A session sharing an already built tokenizer and template (cheaper for many sessions).
    pub fn with_parts(
        model: Arc<Model>,
        tokenizer: Arc<Tokenizer>,
        template: Option<Arc<ChatTemplate>>,
    ) -> Result<Self> {
        Ok(Self {
            core: Core::new(model, tokenizer, template)?,
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.core.engine
    }
    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.core.tokenizer
    }
    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&Arc<ChatTemplate>> {
        self.core.template.as_ref()
    }
    /// Options from the model file's generation defaults.
    pub fn default_options(&self) -> GenerateOptions {
        GenerateOptions::from_defaults(&self.core.engine.info().generation)
    }
    /// A flag another thread may set to stop the running generation before its next step (it ends
    /// with [`StopReason::Cancelled`], and the flag is cleared). A flag set while nothing runs stops
    /// the next generation before its first step.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.core.cancel.clone()
    }
    /// Forgets the conversation (empties the cache).
    pub fn reset(&mut self) {
        self.core.reset();
    }
    /// Tokens currently in the cache.
    pub fn cached_tokens(&self) -> usize {
        self.core.cached.len()
    }
    /// The KV cache's counters: GPU residency, bytes moved by the last step and since the session
    /// began, host memory in use.
    pub fn kv_stats(&self) -> crate::kv::KvStats {
        self.core.engine.kv_stats(&self.core.state)
    }
    /// Renders `messages` with the chat template, ready for the assistant's reply.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        self.core.render_chat(messages)
    }

    /// Generates a continuation of `prompt` (tokenized as is, BOS per the model), from an empty cache.
    /// `on_piece` sees each piece as it is produced; returning `Break` stops (as cancelled).
    pub fn generate(
        &mut self,
        prompt: &str,
        opts: &GenerateOptions,
        mut on_piece: impl FnMut(&Piece) -> ControlFlow<()>,
    ) -> Result<Completion> {
        let t = Instant::now();
        let ids = self.core.tokenizer.encode(prompt)?;
        self.core.generate_ids(&ids, false, opts, t, &mut on_piece)
    }

    /// Like [`Session::generate`] with the prompt given as token ids.
    pub fn generate_ids(
        &mut self,
        ids: &[u32],
        opts: &GenerateOptions,
        mut on_piece: impl FnMut(&Piece) -> ControlFlow<()>,
    ) -> Result<Completion> {
        self.core
            .generate_ids(ids, false, opts, Instant::now(), &mut on_piece)
    }

    /// Generates the assistant's reply to `messages` (rendered with the chat template). The cache is
    /// kept between calls: when the new prompt starts with tokens already cached (the usual multi-turn
    /// case: earlier turns plus the reply), only the rest is computed.
    pub fn chat(
        &mut self,
        messages: &[ChatMessage],
        opts: &GenerateOptions,
        mut on_piece: impl FnMut(&Piece) -> ControlFlow<()>,
    ) -> Result<Completion> {
        let t = Instant::now();
        let ids = self.core.chat_ids(messages)?;
        self.core.generate_ids(&ids, true, opts, t, &mut on_piece)
    }

    /// [`Session::generate`] as an iterator of pieces.
    pub fn stream(&mut self, prompt: &str, opts: &GenerateOptions) -> Result<Stream<'_>> {
        let t = Instant::now();
        let ids = self.core.tokenizer.encode(prompt)?;
        let run = self.core.start(&ids, false, opts, t)?;
        Ok(Stream {
            inner: GenStream {
                core: &mut self.core,
                run,
            },
        })
    }

    /// [`Session::chat`] as an iterator of pieces.
    pub fn chat_stream(
        &mut self,
        messages: &[ChatMessage],
        opts: &GenerateOptions,
    ) -> Result<Stream<'_>> {
        let t = Instant::now();
        let ids = self.core.chat_ids(messages)?;
        let run = self.core.start(&ids, true, opts, t)?;
        Ok(Stream {
            inner: GenStream {
                core: &mut self.core,
                run,
            },
        })
    }
}

/// A generation in progress that owns its [`Session`] (for bindings — C ABI, JNI — whose pull APIs
/// cannot hold a borrow): an iterator of pieces like [`Stream`]. [`OwnedStream::into_session`] gives the
/// session back (usable, whatever state the generation is in).
pub struct OwnedStream {
    session: Session,
    run: Run,
}

impl Iterator for OwnedStream {
    type Item = Result<Piece>;
    fn next(&mut self) -> Option<Result<Piece>> {
        self.run.advance(&mut self.session.core).transpose()
    }
}

impl OwnedStream {
    /// Stops the generation before the next step.
    pub fn cancel(&mut self) {
        self.run.cancel();
    }
    /// Why the generation ended, once it has.
    pub fn stop_reason(&self) -> Option<&StopReason> {
        self.run.finished.as_ref()
    }
    /// The completion, once the iterator has ended (`None` before, or after an error).
    pub fn completion(&self) -> Option<Completion> {
        self.run.completion()
    }
    /// The session (its cancel flag still works while the stream runs).
    pub fn session(&self) -> &Session {
        &self.session
    }
    /// Ends the stream and returns the session.
    pub fn into_session(self) -> Session {
        self.session
    }
}

impl Session {
    /// [`Session::stream`] that takes the session along; on error the session comes back with it
    /// (boxed: a session is large).
    pub fn into_stream(
        mut self,
        prompt: &str,
        opts: &GenerateOptions,
    ) -> std::result::Result<OwnedStream, Box<(Session, Error)>> {
        let t = Instant::now();
        let run = self
            .core
            .tokenizer
            .encode(prompt)
            .and_then(|ids| self.core.start(&ids, false, opts, t));
        match run {
            Ok(run) => Ok(OwnedStream { session: self, run }),
            Err(e) => Err(Box::new((self, e))),
        }
    }

    /// [`Session::chat_stream`] that takes the session along; on error the session comes back with it
    /// (boxed: a session is large).
    pub fn into_chat_stream(
        mut self,
        messages: &[ChatMessage],
        opts: &GenerateOptions,
    ) -> std::result::Result<OwnedStream, Box<(Session, Error)>> {
        let t = Instant::now();
        let run = self
            .core
            .chat_ids(messages)
            .and_then(|ids| self.core.start(&ids, true, opts, t));
        match run {
            Ok(run) => Ok(OwnedStream { session: self, run }),
            Err(e) => Err(Box::new((self, e))),
        }
    }
}

/// Compiles a model's chat template with its BOS/EOS token strings.
pub fn template_for(source: &str, tokenizer: &Tokenizer, info: &ModelInfo) -> Result<ChatTemplate> {
    let name = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    ChatTemplate::new(source, &name(info.bos_id), &name(Some(info.eos_id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::tokenizer::tests::smollm2;
    use crate::graph::DType;
    use std::sync::Mutex;

    type NextFn = dyn Fn(&[u32], &StepSampling) -> u32 + Send + Sync;

    /// Records every step; the next token is a function of all cached ids (and the sampling input).
    struct Fake {
        info: ModelInfo,
        next: Box<NextFn>,
        calls: Mutex<Vec<Call>>,
        /// Fail the step call with this index (0-based, counted over the fake's life).
        fail_at: Mutex<Option<usize>>,
    }

    #[derive(Debug, Clone)]
    struct Call {
        position: usize,
        ids: Vec<u32>,
        random_u: f32,
    }

    #[derive(Default)]
    struct FakeState {
        ids: Vec<u32>,
    }

    impl StepEngine for Fake {
        type State = FakeState;
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn load_ms(&self) -> f64 {
            12.5
        }
        fn new_state(&self) -> Result<FakeState> {
            Ok(FakeState::default())
        }
        fn step(&self, st: &mut FakeState, ids: &[u32], s: &StepSampling) -> Result<StepOutput> {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.len();
            calls.push(Call {
                position: st.ids.len(),
                ids: ids.to_vec(),
                random_u: s.random_u,
            });
            if *self.fail_at.lock().unwrap() == Some(n) {
                st.ids.push(u32::MAX); // leave a half-written state behind
                return Err(Error::node("l0.attn", "Attention", "injected failure"));
            }
            // The real engine's contract.
            if ids.is_empty() || ids.len() > self.info.max_chunk {
                return Err(Error::InvalidArgument(format!("chunk of {}", ids.len())));
            }
            if st.ids.len() + ids.len() > self.info.max_cache {
                return Err(Error::InvalidArgument("cache overflow".into()));
            }
            st.ids.extend_from_slice(ids);
            Ok(StepOutput {
                next_token: (self.next)(&st.ids, s),
                logits: vec![0.5; 4],
            })
        }
        fn reset_state(st: &mut FakeState) {
            st.ids.clear();
        }
        fn truncate_state(st: &mut FakeState, len: usize) {
            st.ids.truncate(len);
        }
    }

    fn info(max_cache: usize, max_chunk: usize) -> ModelInfo {
        ModelInfo {
            architecture: "fake".into(),
            num_layers: 1,
            hidden_size: 8,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 8,
            vocab_size: 49152,
            max_cache,
            max_chunk,
            kv_dtype: DType::F32,
            bos_id: Some(1),
            add_bos: false,
            eos_id: 2,
            stop_ids: vec![0, 2, 4],
            generation: Default::default(),
        }
    }

    fn core_with(info: ModelInfo, next: Box<NextFn>) -> Core<Fake> {
        let tok = Arc::new(smollm2());
        let template = Arc::new(
            template_for(
                include_str!("testdata/smollm2_chat_template.jinja"),
                &tok,
                &info,
            )
            .unwrap(),
        );
        let fake = Fake {
            info,
            next,
            calls: Mutex::new(Vec::new()),
            fail_at: Mutex::new(None),
        };
        Core::new(Arc::new(fake), tok, Some(template)).unwrap()
    }

    /// A fake that answers with `reply` (then EOS) after a prompt of `prompt_len` tokens.
    fn scripted(info: ModelInfo, prompt_len: usize, reply: Vec<u32>) -> Core<Fake> {
        core_with(
            info,
            Box::new(move |ids: &[u32], _: &StepSampling| {
                ids.len()
                    .checked_sub(prompt_len)
                    .map_or(3, |i| reply.get(i).copied().unwrap_or(2))
            }),
        )
    }

    fn opts(max: u32) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: max,
            ..Default::default()
        }
    }

    fn collect(
        core: &mut Core<Fake>,
        ids: &[u32],
        reuse: bool,
        o: &GenerateOptions,
    ) -> (Result<Completion>, Vec<Piece>) {
        let mut pieces = Vec::new();
        let r = core.generate_ids(ids, reuse, o, Instant::now(), &mut |p: &Piece| {
            pieces.push(p.clone());
            ControlFlow::Continue(())
        });
        (r, pieces)
    }

    fn calls(core: &Core<Fake>) -> Vec<Call> {
        core.engine.calls.lock().unwrap().clone()
    }

    #[test]
    fn chunk_plan() {
        assert_eq!(
            plan_chunks(70, 16),
            vec![0..16, 16..32, 32..48, 48..64, 64..70]
        );
        assert_eq!(plan_chunks(16, 16), vec![0..16]);
        assert_eq!(plan_chunks(1, 16), vec![0..1]);
        assert!(plan_chunks(0, 16).is_empty());
        for (n, c) in [(1000, 7), (5, 1), (33, 32)] {
            let p = plan_chunks(n, c);
            assert!(p.iter().all(|r| !r.is_empty() && r.len() <= c));
            assert_eq!(p.first().unwrap().start, 0);
            assert_eq!(p.last().unwrap().end, n);
            assert!(p.windows(2).all(|w| w[0].end == w[1].start));
        }
    }

    #[test]
    fn chunked_prefill_then_single_steps_and_stop_token() {
        let tok = smollm2();
        let reply_text = "Hello world! 😀 日本語 done.";
        let reply = tok.encode(reply_text).unwrap();
        let prompt: Vec<u32> = (0..70).map(|i| 100 + i * 7).collect();
        let mut core = scripted(info(512, 16), prompt.len(), reply.clone());
        let (c, pieces) = collect(&mut core, &prompt, false, &opts(100));
        let c = c.unwrap();
        assert_eq!(c.stop_reason, StopReason::StopToken { id: 2 });
        assert_eq!(c.text, reply_text);
        assert_eq!(c.token_ids, reply);
        assert_eq!(
            pieces.iter().map(|p| p.text.as_str()).collect::<String>(),
            c.text
        );
        assert_eq!(
            pieces.iter().map(|p| p.token_id).collect::<Vec<_>>(),
            reply,
            "one piece per generated token"
        );
        let calls = calls(&core);
        let sizes: Vec<usize> = calls.iter().map(|c| c.ids.len()).collect();
        assert_eq!(&sizes[..5], &[16, 16, 16, 16, 6]);
        assert!(sizes[5..].iter().all(|&s| s == 1));
        // Every generated token but the stop token was fed back, at consecutive positions.
        assert_eq!(sizes.len(), 5 + reply.len());
        for (i, call) in calls.iter().enumerate() {
            let expect_pos = if i < 5 { i * 16 } else { 70 + (i - 5) };
            assert_eq!(call.position, expect_pos);
        }
        assert_eq!(core.cached.len(), 70 + reply.len());
        assert_eq!(core.state.ids, core.cached);
        assert_eq!(c.stats.prefill_tokens, 70);
        assert_eq!(c.stats.prefill_chunks, 5);
        assert_eq!(c.stats.decode_tokens, reply.len());
        assert_eq!(c.stats.generated_tokens, reply.len());
        assert_eq!(c.stats.load_ms, 12.5);
        assert!(c.stats.time_to_first_token_ms >= c.stats.prefill_ms);
    }

    #[test]
    fn ignore_stop_tokens_runs_to_max() {
        let mut core = scripted(info(512, 4), 3, vec![300, 301]);
        let o = GenerateOptions {
            ignore_stop_tokens: true,
            ..opts(5)
        };
        let (c, _) = collect(&mut core, &[7, 8, 9], false, &o);
        let c = c.unwrap();
        assert_eq!(c.stop_reason, StopReason::MaxTokens);
        assert_eq!(c.token_ids, vec![300, 301, 2, 2, 2]);
    }

    #[test]
    fn stop_string_across_tokens() {
        let tok = smollm2();
        let reply = tok.encode("The answer is 42.\nUser: more text").unwrap();
        let prompt = [5u32, 6, 7];
        let mut core = scripted(info(512, 4), 3, reply);
        let o = GenerateOptions {
            stop_strings: vec!["\nUser:".into()],
            ..opts(100)
        };
        let (c, pieces) = collect(&mut core, &prompt, false, &o);
        let c = c.unwrap();
        assert_eq!(c.text, "The answer is 42.");
        assert_eq!(
            c.stop_reason,
            StopReason::StopString {
                text: "\nUser:".into()
            }
        );
        assert_eq!(
            pieces.iter().map(|p| p.text.as_str()).collect::<String>(),
            c.text
        );
        assert!(pieces.iter().all(|p| !p.text.contains("User")));
    }

    #[test]
    fn max_tokens_releases_held_text() {
        let tok = smollm2();
        let reply = tok.encode("abc STO").unwrap();
        let n = reply.len() as u32;
        let mut core = scripted(info(512, 4), 2, reply);
        let o = GenerateOptions {
            stop_strings: vec!["STOP".into()],
            ..opts(n)
        };
        let (c, pieces) = collect(&mut core, &[9, 9], false, &o);
        let c = c.unwrap();
        assert_eq!(c.stop_reason, StopReason::MaxTokens);
        assert_eq!(
            c.text, "abc STO",
            "held prefix of the stop string is released at the end"
        );
        assert_eq!(pieces.concat_text(), c.text);
        assert_eq!(c.token_ids.len(), n as usize);
    }

    trait ConcatText {
        fn concat_text(&self) -> String;
    }
    impl ConcatText for Vec<Piece> {
        fn concat_text(&self) -> String {
            self.iter().map(|p| p.text.as_str()).collect()
        }
    }

    #[test]
    fn successor_fake_generates_max_tokens() {
        // next = (last id + 1) % vocab, never a stop id in this range.
        let mut core = core_with(
            info(512, 8),
            Box::new(|ids: &[u32], _: &StepSampling| (ids.last().unwrap() + 1) % 49152),
        );
        let (c, _) = collect(&mut core, &[1000, 2000, 3000], false, &opts(10));
        let c = c.unwrap();
        assert_eq!(c.token_ids, (3001..3011).collect::<Vec<u32>>());
        assert_eq!(c.stop_reason, StopReason::MaxTokens);
        assert_eq!(c.text, core.tokenizer.decode(&c.token_ids, true).unwrap());
        // The last token is not fed (nothing would use its output).
        assert_eq!(core.cached.len(), 3 + 9);
    }

    #[test]
    fn context_full_is_a_stop_reason() {
        let mut core = core_with(
            info(20, 8),
            Box::new(|ids: &[u32], _: &StepSampling| 1000 + ids.len() as u32),
        );
        let prompt: Vec<u32> = (0..15).map(|i| 500 + i).collect();
        let (c, _) = collect(&mut core, &prompt, false, &opts(100));
        let c = c.unwrap();
        assert_eq!(c.stop_reason, StopReason::ContextFull);
        // 15 prompt slots + 5 fed tokens fill the cache of 20; 6 tokens were generated.
        assert_eq!(c.token_ids.len(), 6);
        assert_eq!(core.cached.len(), 20);
        // Largest allowed prompt: max_cache - 1.
        let p19: Vec<u32> = (0..19).map(|i| 500 + i).collect();
        let (c, _) = collect(&mut core, &p19, false, &opts(100));
        let c = c.unwrap();
        assert_eq!(c.stop_reason, StopReason::ContextFull);
        assert_eq!(c.token_ids.len(), 2);
    }

    #[test]
    fn bad_prompts_are_invalid_arguments_and_session_recovers() {
        let mut core = core_with(
            info(20, 8),
            Box::new(|ids: &[u32], _: &StepSampling| 1000 + ids.len() as u32),
        );
        let p20: Vec<u32> = (0..20).map(|i| 500 + i).collect();
        match collect(&mut core, &p20, false, &opts(4)).0 {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains("20 tokens") && m.contains("holds 20"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            collect(&mut core, &[], false, &opts(4)).0,
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            collect(&mut core, &[49152], false, &opts(4)).0,
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            collect(&mut core, &[7], false, &opts(0)).0,
            Err(Error::InvalidArgument(_))
        ));
        let (c, _) = collect(&mut core, &[7, 8], false, &opts(3));
        assert_eq!(c.unwrap().token_ids, vec![1002, 1003, 1004]);
    }

    #[test]
    fn engine_error_resets_state_and_session_keeps_working() {
        let mut core = core_with(
            info(256, 4),
            Box::new(|ids: &[u32], _: &StepSampling| 1000 + ids.len() as u32),
        );
        *core.engine.fail_at.lock().unwrap() = Some(4); // prefill has 3 chunks; fail in decode
        let prompt: Vec<u32> = (0..10).map(|i| 300 + i).collect();
        let (r, pieces) = collect(&mut core, &prompt, false, &opts(10));
        match r {
            Err(Error::Node { detail, .. }) => assert_eq!(detail, "injected failure"),
            other => panic!("{other:?}"),
        }
        assert_eq!(pieces.len(), 2);
        assert!(core.cached.is_empty());
        assert!(core.state.ids.is_empty());
        let n_before = calls(&core).len();
        let (c, _) = collect(&mut core, &prompt, true, &opts(3));
        let c = c.unwrap();
        assert_eq!(c.token_ids, vec![1010, 1011, 1012]);
        assert_eq!(c.stats.reused_tokens, 0);
        assert_eq!(calls(&core)[n_before].position, 0);
    }

    #[test]
    fn cancel_flag_and_break() {
        let mut core = core_with(
            info(256, 4),
            Box::new(|ids: &[u32], _: &StepSampling| 1000 + ids.len() as u32),
        );
        let flag = core.cancel.clone();
        let mut n = 0;
        let c = core
            .generate_ids(
                &[5, 6],
                false,
                &opts(50),
                Instant::now(),
                &mut |_p: &Piece| {
                    n += 1;
                    if n == 3 {
                        flag.store(true, Ordering::Release); // as another thread would
                    }
                    ControlFlow::Continue(())
                },
            )
            .unwrap();
        assert_eq!(c.stop_reason, StopReason::Cancelled);
        assert_eq!(c.token_ids.len(), 3);
        assert!(!core.cancel.load(Ordering::Acquire), "flag is consumed");
        // Break from the callback.
        let mut n = 0;
        let c = core
            .generate_ids(
                &[5, 6],
                false,
                &opts(50),
                Instant::now(),
                &mut |_p: &Piece| {
                    n += 1;
                    if n == 2 {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
            )
            .unwrap();
        assert_eq!(c.stop_reason, StopReason::Cancelled);
        assert_eq!(c.token_ids.len(), 2);
        // A flag set before the call stops it before any step.
        core.cancel.store(true, Ordering::Release);
        let before = calls(&core).len();
        let (c, _) = collect(&mut core, &[5, 6], false, &opts(50));
        let c = c.unwrap();
        assert_eq!(c.stop_reason, StopReason::Cancelled);
        assert!(c.token_ids.is_empty());
        assert_eq!(calls(&core).len(), before);
        let (c, _) = collect(&mut core, &[5, 6], false, &opts(2));
        assert_eq!(c.unwrap().stop_reason, StopReason::MaxTokens);
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let next = |ids: &[u32], s: &StepSampling| {
            assert!((0.0..1.0).contains(&s.random_u));
            assert_eq!(s.temperature, 0.8);
            assert_eq!(s.top_k, 40);
            (ids.last().unwrap() + 1 + (s.random_u * 1000.0) as u32) % 40000 + 5
        };
        let mut core = core_with(info(256, 4), Box::new(next));
        let o = GenerateOptions {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            seed: Some(1234),
            ..opts(20)
        };
        let prompt: Vec<u32> = (0..9).map(|i| 300 + i).collect();
        let a = collect(&mut core, &prompt, false, &o).0.unwrap();
        let us_a: Vec<f32> = calls(&core).iter().map(|c| c.random_u).collect();
        let b = collect(&mut core, &prompt, false, &o).0.unwrap();
        assert_eq!(a.token_ids, b.token_ids);
        let us: Vec<f32> = calls(&core).iter().map(|c| c.random_u).collect();
        assert_eq!(&us[us_a.len()..], &us_a[..]);
        // Non-final prefill chunks consume no random number (u = 0); the last chunk and every
        // decode step get fresh ones.
        assert_eq!(&us_a[..2], &[0.0, 0.0]);
        assert!(us_a[2..].iter().all(|&u| u > 0.0));
        let c = collect(
            &mut core,
            &prompt,
            false,
            &GenerateOptions {
                seed: Some(99),
                ..o
            },
        )
        .0
        .unwrap();
        assert_ne!(a.token_ids, c.token_ids);
    }

    #[test]
    fn chat_reuses_the_cached_prefix() {
        let tok = smollm2();
        // The fake replies with "Sure thing." + <|im_end|> whatever the prompt.
        let reply = tok.encode("Sure thing.").unwrap();
        let r2 = reply.clone();
        let mut core = core_with(
            info(1024, 8),
            Box::new(move |ids: &[u32], _: &StepSampling| {
                // Position within the reply = tokens since the last "assistant\n" header.
                let hdr = [1u32, 520, 9531, 198]; // <|im_start|>assistant\n
                match ids.windows(4).rposition(|w| w == hdr) {
                    Some(p) => r2.get(ids.len() - (p + 4)).copied().unwrap_or(2),
                    None => 3, // a non-final prefill chunk: the token is not used
                }
            }),
        );
        assert_eq!(
            tok.encode("<|im_start|>assistant\n").unwrap(),
            vec![1, 520, 9531, 198]
        );
        let mut msgs = vec![ChatMessage::user("Hi!")];
        let ids1 = core.chat_ids(&msgs).unwrap();
        let (c1, _) = collect(&mut core, &ids1, true, &opts(50));
        let c1 = c1.unwrap();
        assert_eq!(c1.text, "Sure thing.");
        assert_eq!(c1.stats.reused_tokens, 0);
        msgs.push(ChatMessage::assistant(c1.text.clone()));
        msgs.push(ChatMessage::user("And again?"));
        let ids2 = core.chat_ids(&msgs).unwrap();
        let cached_before = core.cached.len();
        assert_eq!(cached_before, ids1.len() + reply.len());
        let before = calls(&core).len();
        let (c2, _) = collect(&mut core, &ids2, true, &opts(50));
        let c2 = c2.unwrap();
        assert_eq!(c2.text, "Sure thing.");
        // Everything cached was reused (the reply retokenizes to the generated ids).
        assert_eq!(c2.stats.reused_tokens, cached_before);
        assert_eq!(c2.stats.prefill_tokens, ids2.len() - cached_before);
        assert_eq!(calls(&core)[before].position, cached_before);
        assert_eq!(core.state.ids[..ids2.len()], ids2[..]);
        // An edited history reuses only the common prefix, and the cache stays consistent.
        let edited = vec![ChatMessage::user("Hello!")];
        let ids3 = core.chat_ids(&edited).unwrap();
        let lcp = common_prefix(&ids2, &ids3);
        let (c3, _) = collect(&mut core, &ids3, true, &opts(50));
        let c3 = c3.unwrap();
        assert_eq!(c3.stats.reused_tokens, lcp);
        assert_eq!(core.state.ids[..ids3.len()], ids3[..]);
        assert_eq!(core.state.ids, core.cached);
        // The same prompt again: all but the last token reused (one must be fed).
        let (c4, _) = collect(&mut core, &ids3, true, &opts(50));
        assert_eq!(c4.unwrap().stats.reused_tokens, ids3.len() - 1);
    }

    #[test]
    fn chat_prompt_ids_match_transformers() {
        let exp: serde_json::Value =
            serde_json::from_str(crate::generate::tokenizer::tests::CHAT_EXPECTED).unwrap();
        let core = core_with(info(4096, 8), Box::new(|_: &[u32], _: &StepSampling| 3));
        let mut checked = 0;
        for r in exp["renders"].as_array().unwrap() {
            if r["template"] != "smollm2" || r["add_generation_prompt"] != true {
                continue;
            }
            let msgs: Vec<ChatMessage> = serde_json::from_value(r["messages"].clone()).unwrap();
            let enc = exp["encodings"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["text"] == r["text"])
                .expect("fixture has the ids of every rendered prompt");
            let want: Vec<u32> = serde_json::from_value(enc["ids"].clone()).unwrap();
            assert_eq!(core.chat_ids(&msgs).unwrap(), want);
            checked += 1;
        }
        assert_eq!(checked, 3);
    }

    #[test]
    fn stream_matches_callback_api() {
        let tok = smollm2();
        let reply = tok.encode("streamed 😀 text").unwrap();
        let mut core = scripted(info(256, 4), 3, reply);
        let (c, pieces) = collect(&mut core, &[7, 8, 9], false, &opts(50));
        let c = c.unwrap();
        let run = core
            .start(&[7, 8, 9], false, &opts(50), Instant::now())
            .unwrap();
        let mut s = GenStream {
            core: &mut core,
            run,
        };
        let streamed: Vec<Piece> = s.by_ref().map(|p| p.unwrap()).collect();
        assert_eq!(streamed, pieces);
        let c2 = s.completion().unwrap();
        assert_eq!(c2.text, c.text);
        assert_eq!(c2.stop_reason, c.stop_reason);
        assert!(s.next().is_none());
    }
}
