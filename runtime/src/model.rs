//! A loaded, planned model and the per-sequence state that a generate loop advances.
//!
//! `Model` is immutable after load and shared (`Arc<Model>`) by any number of sessions on any threads;
//! weights live once, in the memory-mapped file. `StepState` owns one sequence's KV cache and scratch.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use std::time::Instant;

use bytes::Bytes;

use crate::backend::cpu::linear::Precision;
use crate::backend::{Backend, SeqState, StepCall};
use crate::contract::{self, meta, ModelInfo, Speech};
use crate::encode::Encoder;
use crate::error::{Error, Result};
use crate::generate::tokenizer::Tokenizer;
use crate::kv::{KvOptions, KvStats, PagedCache};
use crate::load::{self, LoadOptions};
use crate::plan::{Plan, PlanStats};
pub use crate::step::{StepOutput, StepSampling};
use crate::tensor::Tensor;

/// A loaded and planned step graph.
///
/// Loading enforces [`Limits`](crate::load::Limits) (defaults via [`Model::load`], explicit via
/// [`Model::load_with`]).
pub struct Model {
    pub(crate) info: ModelInfo,
    pub(crate) tokenizer_json: String,
    /// The tokenizer built from `tokenizer_json`, once, on the first session's demand: every session
    /// shares it (Gemma 3's 262,144-token vocabulary: 0.5 s and ~75 MB each time it is built).
    tokenizer: OnceLock<Arc<Tokenizer>>,
    pub(crate) chat_template: Option<String>,
    pub(crate) load_ms: f64,
    plan: Plan,
    /// The backend chosen at load: the GPU one when a GPU was asked for and bound, else the CPU's.
    backend: Box<dyn Backend>,
    /// How `auto` chose the backend (the times it measured or remembered, or why the GPU could not
    /// be used).
    device_note: Option<String>,
    /// How new states keep their KV cache.
    kv: KvOptions,
    /// How the CPU steps multiply the block-quantized linear layers.
    precision: Precision,
    /// A transcription model's encoder phase and what its file says about the audio.
    speech: Option<(Encoder, Speech)>,
}

/// One sequence's state: its KV cache, held by the host in pages ([`crate::kv`]) that are allocated as
/// rows are written (so a session's memory grows with the context it uses, not with `max_cache`), and on
/// a GPU, the resident layers and ring slots of its cache ([`crate::kv::KvOptions::gpu_budget`]).
pub struct StepState {
    /// Number of cache slots written so far (the next position).
    pub(crate) len: usize,
    kv: PagedCache,
    /// The backend's side of the sequence (the GPU's cache buffers and the step run ahead).
    seq: SeqState,
    /// The step inputs the state holds: a transcription model's `cross.*` (from
    /// [`Model::encode`]) and `first_token`.
    held: BTreeMap<String, Tensor>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("info", &self.info)
            .field("plan", &self.plan.stats)
            .finish()
    }
}

impl Model {
    /// Memory-maps, decodes, checks and plans the model at `path` for the CPU backend, under the default
    /// [`Limits`](crate::load::Limits).
    pub fn load(path: impl AsRef<Path>) -> Result<Arc<Model>> {
        Self::load_with(path, &LoadOptions::cpu())
    }

    /// Like [`Model::load`], with explicit options (device, resource limits).
    pub fn load_with(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Arc<Model>> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only; the file must not be truncated by another process while
        // the model is loaded (the usual contract of memory-mapped model files).
        let len = file.metadata().map_err(io)?.len();
        load::limit(
            &format!("{}: file size", path.display()),
            len,
            options.limits.max_file_bytes,
        )?;
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let map = crate::file_map::FileMap::new(map);
        Self::load_from_bytes_with(Bytes::from_owner(map), &path.display().to_string(), options)
    }

    /// Loads from bytes already in memory (Android assets, iOS bundles) under the default [`Limits`](crate::load::Limits).
    /// `name` appears in errors.
    pub fn load_from_bytes(bytes: Bytes, name: &str) -> Result<Arc<Model>> {
        Self::load_from_bytes_with(bytes, name, &LoadOptions::cpu())
    }

    /// Like [`Model::load_from_bytes`], with explicit options (device, resource limits).
    pub fn load_from_bytes_with(
        bytes: Bytes,
        name: &str,
        options: &LoadOptions,
    ) -> Result<Arc<Model>> {
        let t0 = Instant::now();
        let limits = &options.limits;
        let graph = crate::onnx::read::decode_model_with(bytes.clone(), name, limits)?;
        let phases = crate::phases::split(graph)?;
        let mut graph = phases.step;
        let info = load::check(&graph)?;
        let speech = Speech::from_metadata(&graph.metadata)?;
        if speech.is_some() != phases.encoder.is_some() {
            return Err(Error::Contract(format!(
                "metadata `{}` and an encoder phase (input `{}`) come together; this file has {}",
                meta::SPEECH,
                contract::ENCODE,
                if speech.is_some() {
                    "only the metadata"
                } else {
                    "only the encoder phase"
                }
            )));
        }
        // Taken out of the graph (the plan keeps the graph): one copy of a file's largest string
        // (Gemma 3's vocabulary: 12 MB).
        let tokenizer_json =
            graph
                .metadata
                .remove(meta::TOKENIZER_JSON)
                .ok_or_else(|| Error::Metadata {
                    key: meta::TOKENIZER_JSON.into(),
                    detail: "missing".into(),
                })?;
        let chat_template = graph.metadata.get(meta::CHAT_TEMPLATE).cloned();
        // A transcription model runs on the CPU (its plan bounded by the CPU's fusions) unless the GPU
        // is asked for.
        let speech_cpu = speech.is_some() && !gpu_forced(options);
        let (plan_options, probe) = match speech_cpu {
            true => (options.plan_options(), Default::default()),
            false => crate::backend::plan_options(options),
        };
        // A plan bounded by a GPU's kernels is made again for a CPU that `auto` chooses after all
        // (a forced GPU never falls back: nothing is kept).
        let cpu_graph = probe.replan_for_cpu().then(|| graph.clone());
        let plan = Plan::with_options(graph, plan_options)?;
        for name in plan.inputs.keys() {
            let text_input = [
                contract::INPUT_IDS,
                contract::POSITION,
                contract::TEMPERATURE,
                contract::TOP_K,
                contract::TOP_P,
                contract::RANDOM_U,
            ]
            .contains(&name.as_str());
            let speech_input = speech.is_some()
                && (name == contract::FIRST_TOKEN || contract::encoded_for(name).is_some());
            if !text_input && !speech_input {
                return Err(Error::Contract(format!("unknown graph input `{name}`")));
            }
        }
        // The encoder graph again for the GPU, when the decoder may run there.
        #[cfg(feature = "gpu")]
        let encoder_graph = phases.encoder.as_ref().filter(|_| !speech_cpu).cloned();
        #[cfg_attr(not(feature = "gpu"), allow(unused_mut))]
        let mut speech = match (phases.encoder, speech) {
            (Some(g), Some(sp)) => {
                let inputs: Vec<&str> = plan.inputs.keys().map(String::as_str).collect();
                let enc = Encoder::new(g, &sp, &inputs, options)?;
                Some((enc, sp))
            }
            _ => None,
        };
        // The caches are allocated per sequence from their declared shapes: bound them before any is.
        let mut cache_bytes: u64 = 0;
        for c in &plan.caches {
            let bytes = c
                .shape
                .iter()
                .try_fold(c.dtype.size() as u64, |a, &d| a.checked_mul(d as u64))
                .and_then(|b| cache_bytes.checked_add(b));
            // On 32-bit targets the cache must also fit the address space.
            cache_bytes = bytes
                .filter(|&b| usize::try_from(b).is_ok())
                .unwrap_or(u64::MAX);
            load::limit(
                &format!("{name}: KV cache bytes (through `{}`)", c.input),
                cache_bytes,
                limits.max_cache_bytes,
            )?;
            if c.shape[2] != info.max_cache {
                return Err(Error::Contract(format!(
                    "cache `{}` has {} slots, metadata says max_cache = {}",
                    c.input, c.shape[2], info.max_cache
                )));
            }
        }
        let (backend, device_note) = match speech_cpu {
            true => cpu_for_speech(&plan, options)?,
            false => choose_backend(&plan, &info, options, &bytes, probe)?,
        };
        let (plan, backend) = match cpu_graph {
            Some(g) if backend.device() == "cpu" => {
                let plan = Plan::with_options(g, options.plan_options())?;
                let cpu = crate::backend::cpu::exec::CpuBackend::new(&plan, options)?;
                (plan, Box::new(cpu) as Box<dyn Backend>)
            }
            _ => (plan, backend),
        };
        // A transcription model's encoder runs where its decoder does (on a software adapter only
        // when asked: `GpuOptions::encoder_software`).
        #[cfg(feature = "gpu")]
        if let (Some((enc, _)), Some(g), Some(gpu)) = (&mut speech, encoder_graph, backend.gpu()) {
            let ctx = gpu.context();
            if !ctx.info().is_software() || options.gpu.encoder_software {
                let inputs: Vec<&str> = plan.inputs.keys().map(String::as_str).collect();
                enc.place_on_gpu(g, &inputs, options, ctx.clone())?;
            }
        }
        Ok(Arc::new(Model {
            info,
            tokenizer_json,
            tokenizer: OnceLock::new(),
            chat_template,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            plan,
            backend,
            device_note,
            kv: options.kv,
            precision: options.precision,
            speech,
        }))
    }
    /// What a transcription model's file says about its audio and prompt tokens; `None` for a text
    /// model.
    pub fn speech(&self) -> Option<&Speech> {
        self.speech.as_ref().map(|(_, s)| s)
    }

    /// Where a transcription model's encoder phase runs: `cpu`, or the device of [`Model::device`]
    /// when the decoder runs on a GPU and the encoder went with it (on a software adapter only with
    /// `GpuOptions::encoder_software`). `None` for a text model.
    pub fn encoder_device(&self) -> Option<String> {
        let (enc, _) = self.speech.as_ref()?;
        Some(match enc.on_gpu() {
            true => self.device(),
            false => "cpu".to_string(),
        })
    }

    /// What the planner made of a transcription model's encoder phase.
    pub fn encoder_plan_stats(&self) -> Option<&PlanStats> {
        self.speech.as_ref().map(|(e, _)| e.plan_stats())
    }

    /// Runs a transcription model's encoder over one window of 16 kHz mono samples (at most
    /// [`Speech::window_samples`]; the rest of the window is silence) and keeps its cross-attention
    /// keys and values in `state` for the decoder steps that follow; the state's cache starts empty.
    /// Samples must be finite. A text model refuses with [`Error::InvalidArgument`].
    pub fn encode(&self, state: &mut StepState, samples: &[f32]) -> Result<()> {
        let (enc, _) = self.speech.as_ref().ok_or_else(|| {
            Error::InvalidArgument("this is not a transcription model: it has no encoder".into())
        })?;
        let held = enc.run(samples)?;
        state.reset();
        state.held.extend(held);
        state.set_first_token(false);
        Ok(())
    }
    /// The model description from the file's metadata.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
    /// The `tokenizer.json` carried in the file.
    pub fn tokenizer_json(&self) -> &str {
        &self.tokenizer_json
    }
    /// The file's tokenizer, built on first use and shared by every session of this model: with the
    /// file's beginning-of-sequence rule for a language model, without one for a transcription model
    /// (whose decoder prompt is its special tokens).
    pub fn tokenizer(&self) -> Result<Arc<Tokenizer>> {
        if let Some(t) = self.tokenizer.get() {
            return Ok(Arc::clone(t));
        }
        let built = Arc::new(if self.speech.is_some() {
            Tokenizer::from_json_with(&self.tokenizer_json, None, false)?
        } else {
            Tokenizer::from_json(&self.tokenizer_json, &self.info)?
        });
        // Two threads may build it at once; both then use the one stored first.
        Ok(Arc::clone(self.tokenizer.get_or_init(|| built)))
    }
    /// The chat template carried in the file, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
    /// Milliseconds spent in [`Model::load`].
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }
    /// Time per op kind since load, slowest first (only when loaded with [`LoadOptions::profile`]):
    /// `(op, calls, seconds)`. A transcription model's encoder phase has its own rows, the op
    /// prefixed `encoder: `.
    pub fn profile(&self) -> Vec<(String, u64, f64)> {
        let mut rows = self.backend.profile();
        if let Some((enc, _)) = &self.speech {
            let encoder = enc.profile().into_iter();
            rows.extend(encoder.map(|(op, n, t)| (format!("encoder: {op}"), n, t)));
            rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        }
        rows
    }
    /// What the planner did (fused steps, folded nodes).
    pub fn plan_stats(&self) -> &PlanStats {
        &self.plan.stats
    }

    /// Bytes a decode step reads at `context` cached positions, for bandwidth rooflines: every
    /// linear layer's weights once plus `context` rows of every cache. An upper estimate: layers with
    /// a sliding window read fewer rows, and the embedding's one row and the norms are left out.
    pub fn decode_read_bytes(&self, context: usize) -> u64 {
        let per_position: u64 = self
            .plan
            .caches
            .iter()
            .map(|c| {
                let all: u64 = c.shape.iter().map(|&d| d as u64).product();
                all / c.shape[2].max(1) as u64 * c.dtype.size() as u64
            })
            .sum();
        let weights = self.plan.stats.linear_weight_bytes as u64;
        weights.saturating_sub(self.backend.weight_bytes_saved()) + per_position * context as u64
    }

    /// The device running the model: `cpu`, or the adapter and backend (`NVIDIA H200 (Vulkan)`).
    pub fn device(&self) -> String {
        self.backend.device()
    }

    /// How `auto` chose the device: the decode-step times it measured on the GPU and the CPU (or read
    /// back from an earlier load), or why the GPU could not be used (no adapter, a software adapter,
    /// a step no kernel takes, a failure during the trial). `None` when a device was forced.
    pub fn device_note(&self) -> Option<&str> {
        self.device_note.as_deref()
    }

    /// How the CPU multiplies the block-quantized linear layers ([`LoadOptions::precision`]).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The GPU adapter's description, when the model runs on a GPU.
    #[cfg(feature = "gpu")]
    pub fn gpu_info(&self) -> Option<crate::backend::gpu::GpuInfo> {
        self.backend.gpu().map(|g| g.context().info())
    }

    /// The GPU executor's counters (last step's dispatches and transfers), when on a GPU.
    #[cfg(feature = "gpu")]
    pub fn gpu_stats(&self) -> Option<crate::backend::gpu::exec::GpuStats> {
        self.backend.gpu().map(|g| g.stats())
    }

    /// A fresh sequence state with an empty cache, kept as the load options said.
    pub fn new_state(&self) -> Result<StepState> {
        self.new_state_with(&self.kv)
    }

    /// A fresh sequence state with an empty cache kept as `kv` says (host page size, GPU budget).
    pub fn new_state_with(&self, kv: &KvOptions) -> Result<StepState> {
        if kv.page_rows == 0 {
            return Err(Error::InvalidArgument(
                "KV cache pages need at least one row".into(),
            ));
        }
        let shapes: Vec<_> = self
            .plan
            .caches
            .iter()
            .map(|c| (c.dtype, c.shape.clone()))
            .collect();
        let mut held = BTreeMap::new();
        if self.plan.inputs.contains_key(contract::FIRST_TOKEN) {
            held.insert(
                contract::FIRST_TOKEN.to_string(),
                Tensor::bool(&[1], &[false]),
            );
        }
        Ok(StepState {
            len: 0,
            held,
            kv: PagedCache::new(&shapes, kv.page_rows)?,
            seq: self
                .backend
                .new_seq(&self.plan, &shapes, kv, self.info.max_chunk)?,
        })
    }

    /// Transfer, residency and memory counters of `state`'s KV cache (last step and since creation).
    pub fn kv_stats(&self, state: &StepState) -> KvStats {
        KvStats {
            host_bytes: state.kv.host_bytes(),
            ..self.backend.kv_stats(&state.seq)
        }
    }

    /// Runs one step: `ids` (1..=max_chunk tokens) at position `state.len()`; the chunk must fit in the
    /// cache. Writes the chunk's K/V rows into the state's cache and advances it. Returns the logits too.
    pub fn step(
        &self,
        state: &mut StepState,
        ids: &[u32],
        sampling: &StepSampling,
    ) -> Result<StepOutput> {
        self.step_with(state, ids, sampling, true)
    }

    /// Like [`Model::step`]; `want_logits = false` leaves [`StepOutput::logits`] empty (on a GPU only the
    /// chosen token is read back).
    pub fn step_with(
        &self,
        state: &mut StepState,
        ids: &[u32],
        sampling: &StepSampling,
        want_logits: bool,
    ) -> Result<StepOutput> {
        let info = &self.info;
        let t = ids.len();
        if t == 0 {
            return Err(Error::InvalidArgument(
                "a step needs at least one token".into(),
            ));
        }
        if t > info.max_chunk {
            return Err(Error::InvalidArgument(format!(
                "chunk of {t} tokens exceeds max_chunk {}",
                info.max_chunk
            )));
        }
        let position = state.len;
        if position + t > info.max_cache {
            return Err(Error::InvalidArgument(format!(
                "{t} tokens at position {position} exceed the cache of {} slots",
                info.max_cache
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= info.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {}",
                info.vocab_size
            )));
        }
        if state.kv.caches.len() != self.plan.caches.len()
            || state
                .kv
                .caches
                .iter()
                .zip(&self.plan.caches)
                .any(|(t, c)| t.dtype != c.dtype || [1, t.heads, t.slots, t.dim] != c.shape[..])
        {
            return Err(Error::InvalidArgument(
                "this state belongs to another model".into(),
            ));
        }
        let plan = &self.plan;
        let mut want = vec![plan.outputs[contract::NEXT_TOKEN]];
        if want_logits {
            want.push(plan.outputs[contract::LOGITS]);
        }
        let call = StepCall {
            plan,
            ids,
            position,
            sampling,
            want: &want,
            max_cache: info.max_cache,
            held: &state.held,
        };
        let env = self.backend.step(&call, &mut state.seq, &mut state.kv)?;
        let out = crate::step::outputs(plan, info, &env, want_logits)?;
        state.len += t;
        Ok(out)
    }
}

impl StepState {
    /// Tokens in the cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether the next step chooses a transcript's first token (a transcription model then never
    /// chooses its begin-suppress set: the blank and the end of text); ignored by a text model.
    pub fn set_first_token(&mut self, first: bool) {
        if let Some(t) = self.held.get_mut(contract::FIRST_TOKEN) {
            *t = Tensor::bool(&[1], &[first]);
        }
    }
    /// Forgets the sequence (frees the host pages; keeps the GPU buffers).
    pub fn reset(&mut self) {
        self.truncate(0);
    }
    /// Drops the cache rows from `len` on, so the sequence continues from there (frees the host pages
    /// wholly past `len`).
    pub fn truncate(&mut self, len: usize) {
        let shorter = len < self.len;
        self.len = self.len.min(len);
        self.kv.truncate(self.len);
        self.seq.truncate(self.len, shorter);
    }
}

/// The CPU backend for a transcription model under `auto` or `cpu`: `auto` does not time the GPU
/// for it (its encoder runs on the CPU, and the decoder step's cross-attention goes
/// back to the host on the GPU), so it says so.
fn cpu_for_speech(plan: &Plan, opts: &LoadOptions) -> Result<(Box<dyn Backend>, Option<String>)> {
    let cpu = crate::backend::cpu::exec::CpuBackend::new(plan, opts)?;
    let note = cfg!(feature = "gpu")
        .then(|| "transcription models run on the CPU unless the GPU is asked for".to_string());
    Ok((Box::new(cpu), note))
}

/// Whether `opts` asks for a GPU (not `auto`).
fn gpu_forced(opts: &LoadOptions) -> bool {
    #[cfg(feature = "gpu")]
    {
        matches!(opts.device, crate::backend::gpu::DeviceRequest::Gpu(_))
    }
    #[cfg(not(feature = "gpu"))]
    {
        let _ = opts;
        false
    }
}

/// The backend for `plan` that `opts.device` asks for ([`crate::backend::auto`] for `auto`), and
/// why `auto` chose it. `model`: the file's bytes, which key `auto`'s remembered decision; `probe`:
/// the adapter the planning picked.
fn choose_backend(
    plan: &Plan,
    info: &ModelInfo,
    opts: &LoadOptions,
    model: &[u8],
    probe: crate::backend::Probe,
) -> Result<(Box<dyn Backend>, Option<String>)> {
    #[cfg(feature = "gpu")]
    {
        crate::backend::auto::choose(plan, info, opts, model, probe.adapter)
    }
    #[cfg(not(feature = "gpu"))]
    {
        let _ = (info, model, probe);
        Ok((
            Box::new(crate::backend::cpu::exec::CpuBackend::new(plan, opts)?),
            None,
        ))
    }
}
