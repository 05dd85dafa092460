//! A loaded, planned model and the per-sequence state that a generate loop advances.
//!
//! `Model` is immutable after load and shared (`Arc<Model>`) by any number of sessions on any threads;
//! weights live once, in the memory-mapped file. `StepState` owns one sequence's KV cache and scratch.

use std::path::Path;
use std::sync::Arc;

use std::time::Instant;

use bytes::Bytes;

use crate::backend::cpu::exec::{exec_step, logits_linear, CpuRun};
use crate::backend::cpu::linear::Precision;
use crate::contract::{self, meta, ModelInfo};
use crate::error::{Error, Result};
use crate::kv::{KvOptions, KvStats, PagedCache};
use crate::load::{self, LoadOptions};
use crate::plan::{Plan, PlanStats, Step, ValId};
use crate::tensor::Tensor;

/// Sampling controls fed to the graph's in-graph token choice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSampling {
    /// `<= 0` → greedy.
    pub temperature: f32,
    /// `<= 0` → no limit.
    pub top_k: i64,
    /// `>= 1` → no limit.
    pub top_p: f32,
    /// Uniform random number in `[0, 1)`.
    pub random_u: f32,
    /// The draw the next decode step will use, when the caller knows it (a session does: it peeks
    /// at its generator). On the GPU the next step then runs ahead of this one with that draw; without
    /// it a step runs ahead with `random_u` and is dropped if the next call brings another draw.
    pub next_random_u: Option<f32>,
}

impl StepSampling {
    /// Greedy choice.
    pub const GREEDY: StepSampling = StepSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        random_u: 0.0,
        next_random_u: None,
    };
}

/// What one step returns.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// The token the graph chose.
    pub next_token: u32,
    /// Logits of the chunk's last position (`vocab` floats).
    pub logits: Vec<f32>,
}

/// A loaded and planned step graph.
///
/// Loading enforces [`Limits`](crate::load::Limits) (defaults via [`Model::load`], explicit via
/// [`Model::load_with`]).
pub struct Model {
    pub(crate) info: ModelInfo,
    pub(crate) tokenizer_json: String,
    pub(crate) chat_template: Option<String>,
    pub(crate) load_ms: f64,
    plan: Plan,
    #[cfg(feature = "gpu")]
    gpu: Option<crate::backend::gpu::exec::GpuPlan>,
    /// Why `auto` did not use a GPU (no adapter, a software adapter, an unsupported step).
    device_note: Option<String>,
    /// Per-op time accumulated when [`LoadOptions::profile`] is set (op → (calls, seconds)).
    profile: Option<std::sync::Mutex<std::collections::BTreeMap<String, (u64, f64)>>>,
    /// How new states keep their KV cache.
    kv: KvOptions,
    /// How the CPU steps multiply the block-quantized linear layers.
    precision: Precision,
    /// The output layer's output slot, exact whatever the precision ([`logits_linear`]).
    logits_linear: Option<ValId>,
    /// Per plan cache: whether a step other than the fused attention reads the cache input (then the
    /// step gets it materialized in the graph's layout).
    cache_read_elsewhere: Vec<bool>,
}

/// One sequence's state: its KV cache, held by the host in pages ([`crate::kv`]) that are allocated as
/// rows are written (so a session's memory grows with the context it uses, not with `max_cache`), and on
/// a GPU, the resident layers and ring slots of its cache ([`crate::kv::KvOptions::gpu_budget`]).
pub struct StepState {
    /// Number of cache slots written so far (the next position).
    pub(crate) len: usize,
    kv: PagedCache,
    #[cfg(feature = "gpu")]
    gpu: Option<crate::backend::gpu::exec::GpuState>,
    /// The next decode step, run ahead on the GPU (see [`GpuPlan::begin`]), with the token it was
    /// fed (the first of the last step's choice on the GPU).
    #[cfg(feature = "gpu")]
    ahead: Option<(crate::backend::gpu::exec::Flight, i64)>,
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
        let graph = crate::onnx::read::decode_model_with(bytes, name, limits)?;
        let info = load::check(&graph)?;
        let tokenizer_json = graph
            .metadata
            .get(meta::TOKENIZER_JSON)
            .cloned()
            .ok_or_else(|| Error::Metadata {
                key: meta::TOKENIZER_JSON.into(),
                detail: "missing".into(),
            })?;
        let chat_template = graph.metadata.get(meta::CHAT_TEMPLATE).cloned();
        let plan = Plan::new(graph)?;
        for name in plan.inputs.keys() {
            if ![
                contract::INPUT_IDS,
                contract::POSITION,
                contract::TEMPERATURE,
                contract::TOP_K,
                contract::TOP_P,
                contract::RANDOM_U,
            ]
            .contains(&name.as_str())
            {
                return Err(Error::Contract(format!("unknown graph input `{name}`")));
            }
        }
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
        let cache_read_elsewhere = plan
            .caches
            .iter()
            .map(|c| {
                plan.steps.iter().any(|s| {
                    !matches!(s, Step::CacheAttention { .. })
                        && crate::plan::step_reads(s).contains(&c.input_val)
                })
            })
            .collect();
        let logits_linear = logits_linear(&plan);
        #[cfg(feature = "gpu")]
        let (gpu, device_note) = bind_gpu(&plan, &info, options)?;
        #[cfg(not(feature = "gpu"))]
        let device_note = None;
        Ok(Arc::new(Model {
            info,
            tokenizer_json,
            chat_template,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            plan,
            #[cfg(feature = "gpu")]
            gpu,
            device_note,
            profile: options.profile.then(Default::default),
            kv: options.kv,
            precision: options.precision,
            logits_linear,
            cache_read_elsewhere,
        }))
    }
    /// The model description from the file's metadata.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
    /// The `tokenizer.json` carried in the file.
    pub fn tokenizer_json(&self) -> &str {
        &self.tokenizer_json
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
    /// `(op, calls, seconds)`.
    pub fn profile(&self) -> Vec<(String, u64, f64)> {
        #[cfg(feature = "gpu")]
        if let Some(g) = &self.gpu {
            return g.profile();
        }
        let Some(p) = &self.profile else {
            return Vec::new();
        };
        let p = p.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = p.iter().map(|(k, (n, t))| (k.clone(), *n, *t)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }
    /// What the planner did (fused steps, folded nodes).
    pub fn plan_stats(&self) -> &PlanStats {
        &self.plan.stats
    }
    /// The device running the model: `cpu`, or the adapter and backend (`NVIDIA H200 (Vulkan)`).
    pub fn device(&self) -> String {
        #[cfg(feature = "gpu")]
        if let Some(g) = &self.gpu {
            let i = g.context().info();
            return format!("{} ({})", i.name, i.backend);
        }
        "cpu".to_string()
    }

    /// Why `auto` chose the CPU, if it did.
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
        self.gpu.as_ref().map(|g| g.context().info())
    }

    /// The GPU executor's counters (last step's dispatches and transfers), when on a GPU.
    #[cfg(feature = "gpu")]
    pub fn gpu_stats(&self) -> Option<crate::backend::gpu::exec::GpuStats> {
        self.gpu.as_ref().map(|g| g.stats())
    }

    /// A fresh sequence state with an empty cache, kept as the load options said.
    pub fn new_state(&self) -> Result<StepState> {
        self.new_state_with(&self.kv)
    }

    /// A fresh sequence state with an empty cache kept as `kv` says (host page size, GPU budget).
    #[cfg_attr(not(feature = "gpu"), allow(unused_variables))]
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
        Ok(StepState {
            len: 0,
            kv: PagedCache::new(&shapes, kv.page_rows)?,
            #[cfg(feature = "gpu")]
            gpu: match &self.gpu {
                Some(g) => {
                    Some(g.new_state(&self.plan, &shapes, kv.gpu_budget, self.info.max_chunk)?)
                }
                None => None,
            },
            #[cfg(feature = "gpu")]
            ahead: None,
        })
    }

    /// Transfer, residency and memory counters of `state`'s KV cache (last step and since creation).
    pub fn kv_stats(&self, state: &StepState) -> KvStats {
        #[cfg(feature = "gpu")]
        let gpu = state.gpu.as_ref().map(|g| g.kv_stats()).unwrap_or_default();
        #[cfg(not(feature = "gpu"))]
        let gpu = KvStats::default();
        KvStats {
            host_bytes: state.kv.host_bytes(),
            ..gpu
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

    /// Like [`Model::step`]; `want_logits = false` leaves [`StepOutput::logits`] empty on a GPU, so only
    /// the chosen token is read back.
    #[cfg_attr(not(feature = "gpu"), allow(unused_variables))]
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
        #[cfg(feature = "gpu")]
        if let Some(g) = &self.gpu {
            let gs = state.gpu.as_ref().ok_or_else(|| {
                Error::InvalidArgument("this state belongs to another model".into())
            })?;
            let plan = &self.plan;
            let env = self.input_env(ids, position, sampling)?;
            let mut want = vec![plan.outputs[contract::NEXT_TOKEN]];
            if want_logits {
                want.push(plan.outputs[contract::LOGITS]);
            }
            let mut run = CpuRun::new(self.precision, self.logits_linear);
            let mut cpu_step =
                |s: &Step, env: &mut [Option<Tensor>]| exec_step(plan, s, env, None, &mut run);
            // The step run ahead by the last call, if the caller fed the token it guessed and the same
            // inputs; otherwise it is dropped and this step begins now.
            let ahead = state.ahead.take().and_then(|(mut f, fed)| {
                let holds = ids.len() == 1
                    && fed == i64::from(ids[0])
                    && g.holds_for(&mut f, &env, position, &want);
                if !holds {
                    g.missed_ahead();
                }
                holds.then_some(f)
            });
            let flight = match ahead {
                Some(f) => f,
                None => g.begin(
                    plan,
                    gs,
                    &state.kv,
                    env,
                    position,
                    t,
                    &want,
                    &mut cpu_step,
                    None,
                )?,
            };
            // The next decode step goes to the GPU before this one is read back, so the GPU is not
            // idle while the host finishes this one and the caller handles its token. It assumes the
            // token is the one the GPU chose (or, with the choice's tail on the host, the first of its
            // TopK) and the inputs stay as they are, the draw being `next_random_u` when given.
            let next = if g.can_run_ahead(gs, &flight) && position + t < info.max_cache {
                let next = StepSampling {
                    random_u: sampling.next_random_u.unwrap_or(sampling.random_u),
                    next_random_u: None,
                    ..*sampling
                };
                let guess = self.input_env(&[0], position + t, &next)?;
                g.begin(
                    plan,
                    gs,
                    &state.kv,
                    guess,
                    position + t,
                    1,
                    &want,
                    &mut cpu_step,
                    Some(&flight),
                )
                .ok()
            } else {
                None
            };
            let (env, fed) = g.finish(plan, gs, &mut state.kv, flight, &mut cpu_step)?;
            // (A step whose choice ran on the host fed nothing: no step runs ahead of it.)
            state.ahead = next.zip(fed);
            let get = |name: &str| -> Result<Tensor> {
                let slot = plan.outputs[name];
                env[slot]
                    .clone()
                    .or_else(|| plan.consts[slot].clone())
                    .ok_or_else(|| Error::Contract(format!("output `{name}` was not computed")))
            };
            let next_token = get(contract::NEXT_TOKEN)?.scalar_i64(contract::NEXT_TOKEN)?;
            if next_token < 0 || next_token as usize >= info.vocab_size {
                return Err(Error::tensor(
                    contract::NEXT_TOKEN,
                    format!("graph chose token {next_token}, outside the vocabulary"),
                ));
            }
            let logits = if want_logits {
                get(contract::LOGITS)?.to_f32_vec(contract::LOGITS)?
            } else {
                Vec::new()
            };
            state.len += t;
            return Ok(StepOutput {
                next_token: next_token as u32,
                logits,
            });
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
        let mut env = self.input_env(ids, position, sampling)?;
        for ((c, cache), &elsewhere) in plan
            .caches
            .iter()
            .zip(&state.kv.caches)
            .zip(&self.cache_read_elsewhere)
        {
            if elsewhere {
                env[c.input_val] = Some(cache.to_head_major(position));
            }
        }
        self.run_cpu(state, &mut env, t, position)
    }

    /// The graph inputs of one step as a value environment.
    fn input_env(
        &self,
        ids: &[u32],
        position: usize,
        sampling: &StepSampling,
    ) -> Result<Vec<Option<Tensor>>> {
        input_env(&self.plan, ids, position, sampling)
    }

    fn run_cpu(
        &self,
        state: &mut StepState,
        env: &mut [Option<Tensor>],
        t: usize,
        position: usize,
    ) -> Result<StepOutput> {
        let info = &self.info;
        let plan = &self.plan;
        let mut env = env;
        // The mask is one value shared by every layer: check its shape once per step.
        let mut run = CpuRun::new(self.precision, self.logits_linear);
        let profiling = self.profile.is_some();
        for (si, s) in plan.steps.iter().enumerate() {
            let t0 = profiling.then(Instant::now);
            exec_step(plan, s, env, Some((&state.kv, position)), &mut run)?;
            if let (Some(t0), Some(prof)) = (t0, &self.profile) {
                let key = match s {
                    Step::Node { node, .. } => plan.graph.nodes[*node].op.as_str(),
                    Step::Linear { .. } => "[linear]",
                    Step::SiluGate(_) => "[silu gate]",
                    Step::Embedding(_) => "[embedding]",
                    Step::TokenChoice(_) => "[token choice]",
                    Step::CacheAttention { .. } => "[cache attention]",
                };
                let mut p = prof.lock().unwrap_or_else(|e| e.into_inner());
                let e = p.entry(key.to_string()).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += t0.elapsed().as_secs_f64();
            }
            for &v in &plan.frees[si] {
                env[v] = None;
            }
        }
        let env = &mut env;
        let get = |name: &str| -> Result<Tensor> {
            let slot = plan.outputs[name];
            env[slot]
                .clone()
                .or_else(|| plan.consts[slot].clone())
                .ok_or_else(|| Error::Contract(format!("output `{name}` was not computed")))
        };
        let next = get(contract::NEXT_TOKEN)?;
        let next_token = next.scalar_i64(contract::NEXT_TOKEN)?;
        if next_token < 0 || next_token as usize >= info.vocab_size {
            return Err(Error::tensor(
                contract::NEXT_TOKEN,
                format!("graph chose token {next_token}, outside the vocabulary"),
            ));
        }
        let logits = get(contract::LOGITS)?.to_f32_vec(contract::LOGITS)?;
        let mut rows = Vec::with_capacity(plan.caches.len());
        for c in &plan.caches {
            let r = get(&c.output)?;
            let want = [1, c.shape[1], t, c.shape[3]];
            if r.shape != want || r.dtype != c.dtype {
                return Err(Error::tensor(
                    &c.output,
                    format!(
                        "new rows are {} {:?}, the cache needs {} {:?}",
                        r.dtype, r.shape, c.dtype, want
                    ),
                ));
            }
            rows.push(r);
        }
        for (cache, r) in state.kv.caches.iter_mut().zip(&rows) {
            cache.write_head_major(position, r)?;
        }
        state.len += t;
        Ok(StepOutput {
            next_token: next_token as u32,
            logits,
        })
    }
}

/// The graph inputs of one step.
fn input_env(
    plan: &Plan,
    ids: &[u32],
    position: usize,
    sampling: &StepSampling,
) -> Result<Vec<Option<Tensor>>> {
    let t = ids.len();
    let mut env: Vec<Option<Tensor>> = vec![None; plan.names.len()];
    let ids64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    for (name, &slot) in &plan.inputs {
        env[slot] = Some(match name.as_str() {
            contract::INPUT_IDS => Tensor::i64(&[1, t], &ids64),
            contract::POSITION => Tensor::i64(&[1], &[position as i64]),
            contract::TEMPERATURE => Tensor::f32(&[1], &[sampling.temperature]),
            contract::TOP_K => Tensor::i64(&[1], &[sampling.top_k]),
            contract::TOP_P => Tensor::f32(&[1], &[sampling.top_p]),
            contract::RANDOM_U => Tensor::f32(&[1], &[sampling.random_u.clamp(0.0, 0.999_999)]),
            other => return Err(Error::Contract(format!("unknown graph input `{other}`"))),
        });
    }
    Ok(env)
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
    /// Forgets the sequence (frees the host pages; keeps the GPU buffers).
    pub fn reset(&mut self) {
        self.truncate(0);
    }
    /// Drops the cache rows from `len` on, so the sequence continues from there (frees the host pages
    /// wholly past `len`).
    pub fn truncate(&mut self, len: usize) {
        #[cfg(feature = "gpu")]
        if len < self.len {
            self.ahead = None;
        }
        self.len = self.len.min(len);
        self.kv.truncate(self.len);
        #[cfg(feature = "gpu")]
        if let Some(g) = &self.gpu {
            g.truncate(self.len);
        }
    }
}

/// Binds the plan to the GPU `opts` asks for. With `auto`, a device failure (no adapter, a software
/// adapter, a step the kernels do not take, the adapter's limits or memory: [`Error::Device`]) leaves
/// the model on the CPU and says why; any other error (an internal one included) is returned.
#[cfg(feature = "gpu")]
#[allow(clippy::type_complexity)]
fn bind_gpu(
    plan: &Plan,
    info: &ModelInfo,
    opts: &LoadOptions,
) -> Result<(Option<crate::backend::gpu::exec::GpuPlan>, Option<String>)> {
    use crate::backend::gpu::{exec::GpuPlan, DeviceRequest, GpuContext};
    let auto = opts.device == DeviceRequest::Auto;
    if opts.device == DeviceRequest::Cpu {
        return Ok((None, None));
    }
    let ctx = GpuContext::with_options(&opts.device, opts.backend, opts.gpu.clone(), opts.profile);
    let ctx = match or_cpu(auto, ctx)? {
        (Some(c), _) => c,
        (None, note) => return Ok((None, note)),
    };
    let gi = ctx.info();
    if auto && gi.device_type == "Cpu" {
        return Ok((
            None,
            Some(format!(
                "{} is a software adapter; the CPU backend is faster (use --device gpu to force it)",
                gi.name
            )),
        ));
    }
    // Dry-run inputs: the largest chunk at position 0, greedy.
    let ids = vec![0u32; info.max_chunk.clamp(1, info.max_cache.max(1))];
    let env = input_env(plan, &ids, 0, &StepSampling::GREEDY)?;
    let inputs: Vec<(ValId, Tensor)> = env
        .into_iter()
        .enumerate()
        .filter_map(|(i, t)| t.map(|t| (i, t)))
        .collect();
    let mut run = CpuRun::new(opts.precision, logits_linear(plan));
    let r = GpuPlan::new(
        ctx,
        plan,
        &mut |s, env| exec_step(plan, s, env, None, &mut run),
        &inputs,
        opts.kv.gpu_segment_bytes,
    );
    or_cpu(auto, r)
}

/// With `auto`, a device failure ([`Error::Device`]) becomes the CPU and a note saying why; any other
/// error is returned, so that a bug is never hidden behind a fallback.
#[cfg(feature = "gpu")]
fn or_cpu<T>(auto: bool, r: Result<T>) -> Result<(Option<T>, Option<String>)> {
    match r {
        Ok(v) => Ok((Some(v), None)),
        Err(e) if auto && e.is_device() => Ok((None, Some(e.to_string()))),
        Err(e) => Err(e),
    }
}

#[cfg(all(test, feature = "gpu"))]
mod tests {
    use super::*;

    /// `auto` runs on the CPU after a device failure, never after an internal error or a bad model;
    /// an explicit GPU request returns every error.
    #[test]
    fn auto_falls_back_only_for_device_failures() {
        use crate::error::DeviceFault;
        let dev = || {
            Err::<(), _>(Error::device(
                DeviceFault::OutOfMemory,
                "weights of `lm_head`",
            ))
        };
        let (v, note) = or_cpu(true, dev()).unwrap();
        assert!(v.is_none());
        let note = note.unwrap();
        assert!(
            note.contains("out of memory") && note.contains("lm_head"),
            "{note}"
        );
        assert!(or_cpu(false, dev()).unwrap_err().is_device());
        let bug = || Err::<(), _>(Error::internal("step 3 has no GPU weights"));
        assert!(matches!(or_cpu(true, bug()), Err(Error::Internal(_))));
        let bad = || Err::<(), _>(Error::node("n", "MatMul", "shapes"));
        assert!(matches!(or_cpu(true, bad()), Err(Error::Node { .. })));
        assert_eq!(or_cpu(true, Ok(7)).unwrap(), (Some(7), None));
    }
}
