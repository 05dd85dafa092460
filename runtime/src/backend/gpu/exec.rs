//! The GPU executor: runs a [`Plan`] with every step it can on the GPU.
//!
//! [`GpuPlan::new`] does a *dry run* of the plan at the largest chunk (`max_chunk` tokens): CPU steps run
//! for real (on placeholders where they read GPU values), GPU steps only infer their output shapes. That
//! fixes, once: where each step runs, the size of every GPU buffer, every pipeline and every bind group.
//! A step then records its dispatches into one compute pass; the pass is submitted only when a CPU step
//! needs a GPU value (for the step graph: once, at the token choice's tail) and only those values are
//! read back. KV caches: the host pages ([`crate::kv`]) are the truth; per [`GpuState`], the layers the
//! budget allows stay resident and the rest stream through a ring of two slots (uploads recorded in the
//! command stream, ahead of the layer before). The attention kernel writes each chunk's new K/V rows into
//! its buffer and only those rows are copied back, with the chosen token (and logits when asked).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::attention::{self, AttnParams};
use super::context::{GpuContext, Kernel};
use super::elementwise::{self as ew, BinOp, UnOp};
use super::linear::GpuLinear;
use super::{choice, grid, norm, rope, select, Params};
use crate::backend::cpu::ops;
use crate::error::{DeviceFault, Error, Result};
use crate::graph::DType;
use crate::plan::{Plan, Step, ValId};
use crate::tensor::Tensor;

/// Runs one plan step on the CPU (the model's generic path).
pub type CpuStep<'a> = dyn FnMut(&Step, &mut [Option<Tensor>]) -> Result<()> + 'a;

/// Element type and shape of a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl Meta {
    fn of(t: &Tensor) -> Meta {
        Meta {
            dtype: t.dtype,
            shape: t.shape.clone(),
        }
    }
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn bytes(&self) -> u64 {
        ((self.numel() * self.dtype.size()) as u64).next_multiple_of(4)
    }
}

/// A buffer a dispatch binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BufRef {
    Val(ValId),
    Dummy,
    LinW(usize),
    LinS(usize),
    LinZ(usize),
    LinBias,
    /// Segment `.1` of plan cache `.0` (a per-state buffer).
    CacheK(usize, usize),
    /// Segment `.1` of plan cache `.0` (a per-state buffer).
    CacheV(usize, usize),
    /// The attention partials of split caches (plan scratch).
    Part,
}

struct Disp {
    kernel: Option<Arc<Kernel>>,
    binds: Vec<BufRef>,
    params: Params,
    groups: (u32, u32, u32),
}

/// What a GPU step does this run.
struct Desc {
    /// Dry run only: a fusion this description takes — (the other step, the value it reads).
    fused: Option<(usize, ValId)>,
    /// Output values with their metadata; `Some(src)` when the output is a view of `src`'s buffer.
    outs: Vec<(ValId, Meta, Option<ValId>)>,
    /// Outputs that live at a byte offset into their `src`'s buffer (the parts of a fused linear).
    at: Vec<(ValId, u64)>,
    /// Non-constant inputs the dispatches read.
    reads: Vec<ValId>,
    disp: Vec<Disp>,
}

impl Desc {
    /// A step another step does: no dispatch, no output.
    fn empty() -> Desc {
        Desc {
            fused: None,
            at: Vec::new(),
            outs: Vec::new(),
            reads: Vec::new(),
            disp: Vec::new(),
        }
    }
}

/// Counters of the GPU executor.
#[derive(Debug, Default, Clone)]
pub struct GpuStats {
    /// Plan steps placed on the GPU.
    pub gpu_steps: usize,
    /// Plan steps on the CPU.
    pub cpu_steps: usize,
    /// Dispatches recorded by the last step.
    pub dispatches: usize,
    /// Command submissions in the last step.
    pub submits: usize,
    /// Of those, the ones the host waited for (read-backs).
    pub waits: usize,
    /// Bytes uploaded in the last step.
    pub bytes_up: u64,
    /// Bytes read back in the last step.
    pub bytes_down: u64,
    /// Weight bytes resident on the GPU.
    pub weight_bytes: u64,
    /// Milliseconds of the last step (CPU steps, recording, submission and waits).
    pub step_ms: f64,
    /// Of those, milliseconds waiting for the GPU (submit → results mapped).
    pub wait_ms: f64,
    /// Of the wait, milliseconds inside `queue.submit` (wgpu's validation and resource tracking).
    pub submit_ms: f64,
    /// Activation buffer bytes.
    pub scratch_bytes: u64,
    /// Fused linear groups (several layers of one input as one dispatch, or a layer with its norm).
    pub linear_groups: usize,
    /// Of those, groups that fold the RMS norm before them.
    pub fused_norms: usize,
    /// Linear layers (and groups) whose kernel reduces with subgroup operations (`linear_sg`).
    pub subgroup_linears: usize,
    /// Whether the last step ran ahead (recorded and submitted before the step it follows was read
    /// back, its token ids fed on the GPU).
    pub ahead: bool,
    /// Steps that ran ahead and held.
    pub ahead_steps: u64,
    /// Steps run ahead that did not hold (the caller fed another token or changed the inputs): dropped.
    pub ahead_missed: u64,
    /// GPU steps the last step described anew (the others reused the description of the last step of
    /// the same token count: a decode step describes its attention and what reads token ids or positions).
    pub described: usize,
}

/// Per-step transfer and submission counters.
#[derive(Debug, Default)]
struct Counts {
    /// Host milliseconds packing cache pages into upload memory.
    pack_ms: f64,
    dispatches: usize,
    submits: usize,
    waits: usize,
    up: u64,
    down: u64,
    wait: f64,
}

/// One sequence's GPU state: the GPU side of its KV cache and the attention bind groups over it.
///
/// The host pages ([`crate::kv::PagedCache`]) are the truth. The first `resident` attention layers (in plan
/// order) keep their caches in GPU buffers of their own; the other layers share a ring of two slots (a K
/// and a V buffer each, `[S, KVH, D]` token-major): streamed layer `i` uses slot `i % 2`, and the pages
/// of its used prefix that the slot does not hold yet are uploaded right after the attention of layer
/// `i - 2` (the slot's previous user), i.e. before layer `i - 1` computes. Every attention writes its new
/// rows into its buffer; only those rows are copied back to the host.
pub struct GpuState {
    /// Per plan cache: index into `bufs` of its first segment (segments follow).
    home: Vec<usize>,
    /// Per plan cache: rows a segment holds (the cache's slots when it is not split).
    seg_rows: Vec<usize>,
    bufs: Vec<wgpu::Buffer>,
    /// Per plan cache: the ring index of its layer when streamed.
    ring: Vec<Option<usize>>,
    /// Streamed layers' cache pairs in ring order.
    streams: Vec<[usize; 2]>,
    /// Ring slots.
    nslots: usize,
    /// Per buffer: (the plan cache whose rows it holds, how many leading rows match the host).
    held: Mutex<Vec<(Option<usize>, usize)>>,
    groups: HashMap<(usize, usize), wgpu::BindGroup>,
    /// Upload memory (host-visible, recycled after each submission).
    belt: Mutex<wgpu::util::StagingBelt>,
    /// New rows of every cache for one step (read back once, at the end of the step), in two sets: a
    /// step run ahead uses the other one than the step it follows (see [`Flight::parity`]).
    rows: [wgpu::Buffer; 2],
    /// Read-back buffers by value, in the same two sets.
    fetch: Mutex<[HashMap<ValId, Arc<wgpu::Buffer>>; 2]>,
    /// The first index of the last token choice on the GPU, saved from the shared activation buffers
    /// when the step reads back (a step run ahead is fed from here: another sequence's steps,
    /// submitted in between, may have overwritten the shared buffer).
    token: wgpu::Buffer,
    stats: Mutex<crate::kv::KvStats>,
}

impl std::fmt::Debug for GpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuState")
            .field("bufs", &self.bufs.len())
            .field("ring", &self.ring.iter().flatten().count())
            .finish()
    }
}

impl GpuState {
    /// Transfer and residency counters (host bytes are the caller's to fill in).
    pub fn kv_stats(&self) -> crate::kv::KvStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Calls `f(buffer, first local row, lo, hi)` for each segment buffer covering rows `a..b` (as
    /// `lo..hi`) of plan cache `c`.
    fn for_pieces(
        &self,
        c: usize,
        a: usize,
        b: usize,
        mut f: impl FnMut(&wgpu::Buffer, usize, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let rows = self.seg_rows[c].max(1);
        let mut lo = a;
        while lo < b {
            let seg = lo / rows;
            let hi = b.min((seg + 1) * rows);
            let buf = self
                .bufs
                .get(self.home[c] + seg)
                .ok_or_else(|| Error::internal(format!("cache {c} has no segment {seg}")))?;
            f(buf, lo - seg * rows, lo, hi)?;
            lo = hi;
        }
        Ok(())
    }

    /// Forgets slot contents past `len` rows (after a truncation or reset of the sequence).
    pub fn truncate(&self, len: usize) {
        if let Ok(mut h) = self.held.lock() {
            for e in h.iter_mut() {
                e.1 = e.1.min(len);
            }
        }
    }
}

/// A command of a step, in stream order.
#[derive(Debug, Clone, Copy)]
enum Cmd {
    /// Dispatch `j` of step `si` with these workgroups.
    Disp(usize, usize, (u32, u32, u32)),
    /// Upload rows `a..b` of plan cache `c` into its buffer.
    Up { c: usize, a: usize, b: usize },
    /// Copy rows `p..p+t` of plan cache `c` into the rows buffer of `parity` at `off`.
    Down {
        c: usize,
        p: usize,
        t: usize,
        off: u64,
        parity: usize,
    },
    /// Copy the state's saved token ([`GpuState::token`]) into buffer `to`: the ids of a step run
    /// ahead.
    Feed { to: usize, to_off: u64 },
}

/// How a step's token ids come from the step before it on the GPU, found at plan time (see
/// [`GpuPlan::begin`]).
#[derive(Debug, Clone)]
struct Feed {
    /// The uploaded value that holds the chunk's token ids (`input_ids` or a host view of it).
    ids: ValId,
    /// The chosen token on the GPU: the `TokenChoice`'s output, or, where the choice's tail runs on the
    /// host, the `TopK`'s indices (whose first is the token when the choice is greedy).
    token: ValId,
    /// Graph inputs other than the ids read before the first step that waits for the GPU: a step run
    /// ahead holds for a call whose inputs equal these.
    early: Vec<ValId>,
    /// The other graph inputs (read by the host after the wait): taken from the real call.
    late: Vec<ValId>,
}

/// A step on its way ([`GpuPlan::begin`] → [`GpuPlan::finish`]).
pub struct Flight {
    /// The inputs read before its read-back (`Feed::early`) it was begun with, when it runs ahead
    /// (for [`GpuPlan::holds_for`]).
    early: Vec<Option<Tensor>>,
    env: Vec<Option<Tensor>>,
    meta: Vec<Option<Meta>>,
    params: Vec<u8>,
    pending: Vec<Cmd>,
    count: Counts,
    kv: Kv,
    described: usize,
    t_step: std::time::Instant,
    /// The step's cache rows, when a read-back after the last GPU step brought them.
    rows_back: Option<Vec<u8>>,
    /// Dispatches queued when the last early submission went.
    submitted: usize,
    position: usize,
    tokens: usize,
    want: Vec<ValId>,
    /// The next step to run.
    next: usize,
    /// The read-back submitted and not waited for.
    read: Option<Read>,
    /// Which of the state's two sets of read-back buffers it uses (a step run ahead takes the other
    /// one than the step it follows).
    parity: usize,
    /// The value filled by [`Cmd::Feed`] (a step run ahead).
    fed: Option<ValId>,
    /// Whether its token choice was saved into [`GpuState::token`].
    token_saved: bool,
    ahead: bool,
}

impl std::fmt::Debug for Flight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flight")
            .field("position", &self.position)
            .field("tokens", &self.tokens)
            .field("next", &self.next)
            .field("ahead", &self.ahead)
            .finish()
    }
}

/// A submitted read-back.
struct Read {
    /// Values and the buffers they are copied into.
    reads: Vec<(ValId, Arc<wgpu::Buffer>, Meta)>,
    /// Bytes of new cache rows it brings.
    rows: u64,
    /// After the step's last GPU work.
    last: bool,
    /// Dispatches with timestamps (profiling).
    timed: Vec<(usize, usize)>,
    index: wgpu::SubmissionIndex,
    t0: std::time::Instant,
}

/// The plan bound to a GPU.
pub struct GpuPlan {
    ctx: Arc<GpuContext>,
    /// Per step: placed on the GPU.
    on_gpu: Vec<bool>,
    /// Per value: index into `bufs` (views share their source's).
    home: Vec<Option<usize>>,
    bufs: Vec<wgpu::Buffer>,
    caps: Vec<u64>,
    /// Per value: a constant already uploaded to its home buffer.
    const_loaded: Vec<bool>,
    linears: HashMap<usize, GpuLinear>,
    /// Steps whose weights are another step's: a tied embedding → its output layer's step.
    lin_alias: HashMap<usize, usize>,
    dummy: wgpu::Buffer,
    /// Largest KV-cache buffer (bytes): a layer's cache beyond it is split into segments of whole rows.
    seg_bytes: u64,
    /// One-item-an-invocation kernel variants ([`super::rows_variant`], decided once).
    rows_variant: bool,
    /// Partials of split-cache attention (sized by the dry run).
    part: wgpu::Buffer,
    /// Keys from which a decode step's attention is split over workgroups, and keys a workgroup then
    /// ([`super::GpuOptions::split_keys`], [`super::GpuOptions::split_chunk`]).
    split_keys: usize,
    split_chunk: usize,
    /// Dispatches after which a step submits what it has recorded and goes on recording, so the GPU
    /// works while the host prepares the rest ([`super::GpuOptions::submit_every`]; 0: one submission a
    /// step, the default on CPU adapters and always when profiling).
    submit_every: usize,
    /// Bytes of partials the dry run asked for.
    part_need: std::sync::atomic::AtomicU64,
    params: wgpu::Buffer,
    /// Per step: first parameter slot, kernels and bind groups (None where the group is per state).
    slot0: Vec<usize>,
    kernels: Vec<Vec<Arc<Kernel>>>,
    groups: Vec<Vec<Option<wgpu::BindGroup>>>,
    binds: Vec<Vec<Vec<BufRef>>>,
    lock: Mutex<GpuStats>,
    /// Held while a step records and submits (what the shared buffers hold between submissions belongs
    /// to one step at a time).
    recording: Mutex<()>,
    /// How a decode step's token ids can come from the step before it (see [`GpuPlan::begin`]).
    feed: Option<Feed>,
    /// Whether decode steps run ahead where they can ([`super::GpuOptions::run_ahead`]; off
    /// when profiling).
    ahead: bool,
    /// Fusion candidates found in the plan (see [`Fusions`]) and the ones the dry run took.
    cand: Fusions,
    /// Steps whose work another step does (their descriptions are empty).
    skipped: HashSet<usize>,
    /// Fused linear groups by leader step.
    lin_groups: HashMap<usize, GpuGroup>,
    /// Attention steps reading the projections themselves (see [`AttnIn`]).
    attn_in: HashMap<usize, AttnIn>,
    /// Steps a fused linear group does (members other than the leader, the norm, the gate).
    absorbed: HashSet<usize>,
    /// Per value: byte offset into its home buffer (non-zero for the parts of a fused linear).
    offs: Vec<u64>,
    /// Linear steps that add the residual in their epilogue (and write the `Add`'s output).
    res_fused: HashSet<usize>,
    /// `queue.submit` time accumulated during the current step.
    submit_ms: Mutex<f64>,
    /// Per-kernel GPU time when profiling ([`crate::LoadOptions::profile`]): from GPU timestamps around each dispatch where the
    /// adapter has them ([`Stamps`]), else each dispatch submitted and waited for alone.
    profile: Option<Mutex<std::collections::BTreeMap<String, (u64, f64)>>>,
    stamps: Option<Stamps>,
    /// Rotary steps reading the untransposed `[1, T, H, D]` input.
    tr_src: HashMap<usize, ValId>,
    /// `Cast(f16→f32)` steps computing `f32(f16(x))` from the first cast's input.
    round_src: HashMap<usize, ValId>,
    /// What the CPU steps read, `(step, value)` in step order: a read-back for one CPU step also
    /// fetches what later CPU steps read and the GPU already holds (the token choice after a GPU `TopK`
    /// reads both its outputs: one wait, not two).
    cpu_reads: Vec<(usize, ValId)>,
    /// The last step placed on the GPU: a read-back after it also takes the step's cache rows and the
    /// wanted outputs, so the step needs no other submission.
    last_gpu: Option<usize>,
    /// Step descriptions by token count (see [`Kept`]): a decode step describes only what changes
    /// (the attention, the token's embedding row) instead of every step of the plan.
    kept: Mutex<HashMap<usize, Vec<Option<Kept>>>>,
}

/// GPU timestamps around every dispatch of a submission (profiling, on adapters with timestamp
/// queries inside passes): the per-kernel profile then measures the kernels as they run in the step.
struct Stamps {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    /// Dispatches a submission can time (two queries each).
    cap: usize,
    /// Nanoseconds a tick.
    period: f64,
}

impl Stamps {
    fn new(ctx: &GpuContext, dispatches: usize) -> Stamps {
        let cap = dispatches.clamp(1, wgpu::QUERY_SET_MAX_QUERIES as usize / 2);
        let bytes = (16 * cap) as u64;
        Stamps {
            set: ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("dispatch timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * cap as u32,
            }),
            resolve: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            read: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamps read-back"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            cap,
            period: f64::from(ctx.queue.get_timestamp_period()),
        }
    }
}

/// Patterns of standard ops the GPU runs as fewer dispatches (found once from the plan's structure).
#[derive(Debug, Default)]
struct Fusions {
    /// Linear step → (its only consumer, an `Add` step; the Add's other input; the Add's output).
    res: HashMap<usize, (usize, ValId, ValId)>,
    /// `Transpose(perm 0,2,1,3)` step → (its only consumer, a `RotaryEmbedding` step; the input).
    tr: HashMap<usize, (usize, ValId)>,
    /// `Cast(f32→f16)` of a cache output → (its only consumer, a `Cast(f16→f32)` step; the input).
    round: HashMap<usize, (usize, ValId)>,
    /// Linear layers of one input, with the RMS norm producing it and the SiLU gate joining them.
    groups: Vec<LinGroup>,
    /// Attention step → the projections it can read itself (rotary, transposes and casts absorbed).
    attn: HashMap<usize, AttnIn>,
}

/// The inputs of an attention whose rotary embeddings, transposes and f16 round trips (the graph's
/// `Transpose → RotaryEmbedding` for q and k, `Transpose` for v, `Cast(f16) → Cast(f32)` of the new
/// rows) the attention kernel does itself, reading the projections token-major.
#[derive(Debug, Clone)]
struct AttnIn {
    /// Queries `[1, T, H, D]` (the projection, reshaped).
    q: ValId,
    /// New keys `[1, T, KVH, D]`, before the rotary.
    k: ValId,
    /// New values `[1, T, KVH, D]`.
    v: ValId,
    /// The rotary's cos table.
    cos: ValId,
    /// The rotary's sin table.
    sin: ValId,
    /// The rotary's position ids.
    pos: ValId,
    /// Interleaved rotary pairs.
    interleaved: bool,
    /// The steps the kernel does.
    absorbs: Vec<usize>,
}

/// Linear layers that read one input, run as one dispatch over their concatenated rows (q/k/v; gate/up),
/// with the `RMSNormalization` before them and the `SiluGate` after them folded in where only they use
/// those values. A lone linear after a norm (the output layer) is a group of one.
#[derive(Debug, Clone)]
struct LinGroup {
    /// The linear steps, in the order their rows are concatenated.
    members: Vec<usize>,
    /// `(step, its input, its scale, epsilon)` of the `RMSNormalization` that only the members read.
    norm: Option<(usize, ValId, ValId, f32)>,
    /// The `SiluGate` step reading exactly the two members' outputs (the gate is the first member).
    silu: Option<usize>,
}

impl Fusions {
    fn find(plan: &Plan, on: &super::GpuFusions) -> Fusions {
        let nvals = plan.names.len();
        let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); nvals];
        for (si, s) in plan.steps.iter().enumerate() {
            for v in crate::plan::step_reads(s) {
                if !consumers[v].contains(&si) {
                    consumers[v].push(si);
                }
            }
        }
        let outs: HashSet<ValId> = plan.outputs.values().copied().collect();
        let cache_out: HashSet<ValId> = plan.caches.iter().map(|c| c.output_val).collect();
        let node = |si: usize| generic_node(plan, si);
        let mut f = Fusions::default();
        for (si, s) in plan.steps.iter().enumerate() {
            match s {
                Step::Linear { out, .. } => {
                    if let ([ai], false) = (consumers[*out].as_slice(), outs.contains(out)) {
                        if let Some((n, ins, os)) = node(*ai) {
                            if n.op == "Add" && ins.len() == 2 && os.len() == 1 {
                                if let (Some(a), Some(b)) = (ins[0], ins[1]) {
                                    if a != b {
                                        let other = if a == *out { b } else { a };
                                        if on.residual {
                                            f.res.insert(si, (*ai, other, os[0]));
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                Step::Node {
                    node: ni,
                    inputs,
                    outputs,
                } => {
                    let n = &plan.graph.nodes[*ni];
                    let (Some(&o), Some(Some(x))) = (outputs.first(), inputs.first()) else {
                        continue;
                    };
                    if outs.contains(&o) && !cache_out.contains(&o) {
                        continue;
                    }
                    let [ci] = consumers[o].as_slice() else {
                        continue;
                    };
                    let Some((cn, cins, _)) = node(*ci) else {
                        continue;
                    };
                    if n.op == "Transpose"
                        && n.attr_ints("perm") == Some(&[0, 2, 1, 3][..])
                        && !outs.contains(&o)
                        && cn.op == "RotaryEmbedding"
                        && cins.first().copied().flatten() == Some(o)
                        && on.transpose_rope
                    {
                        f.tr.insert(si, (*ci, *x));
                    }
                    if n.op == "Cast"
                        && n.attr_int("to", 0) == DType::F16.onnx_code() as i64
                        && cache_out.contains(&o)
                        && cn.op == "Cast"
                        && cn.attr_int("to", 0) == DType::F32.onnx_code() as i64
                        && on.f16_round_trip
                    {
                        f.round.insert(si, (*ci, *x));
                    }
                }
                _ => {}
            }
        }
        if on.attention_inputs {
            f.attn = AttnIn::find(plan, &consumers, &outs, &f);
        }
        if on.linear_groups {
            f.groups = LinGroup::find(plan, &consumers, &outs);
            for g in &f.groups {
                for m in &g.members {
                    f.res.remove(m);
                }
            }
        }
        f
    }
}

impl AttnIn {
    fn find(
        plan: &Plan,
        consumers: &[Vec<usize>],
        outs: &HashSet<ValId>,
        f: &Fusions,
    ) -> HashMap<usize, AttnIn> {
        let mut producer: HashMap<ValId, usize> = HashMap::new();
        for (si, s) in plan.steps.iter().enumerate() {
            if let Step::Node { outputs, .. } = s {
                for &o in outputs {
                    producer.insert(o, si);
                }
            }
        }
        let node = |si: usize| generic_node(plan, si);
        let only = |v: ValId, si: usize| consumers[v].as_slice() == [si];
        // `v` = Cast(f32) of Cast(f16) of x (the round pair), read only by `user`: (x, the two casts).
        let unround = |v: ValId, user: usize| -> Option<(ValId, Vec<usize>)> {
            let c2 = *producer.get(&v)?;
            let (c1, &(_, x)) = f.round.iter().find(|(_, (second, _))| *second == c2)?;
            (only(v, user) && !outs.contains(&v)).then(|| (x, vec![*c1, c2]))
        };
        // `v` = RotaryEmbedding(Transpose(src)) read only by `user`: (src, [cos, sin, positions],
        // interleaved, the two steps).
        type Roped = (ValId, [ValId; 3], bool, Vec<usize>);
        let unrope = |v: ValId, user: usize| -> Option<Roped> {
            let r = *producer.get(&v)?;
            let (n, ins, _) = node(r)?;
            if n.op != "RotaryEmbedding"
                || n.attr_int("rotary_embedding_dim", 0) != 0
                || !only(v, user)
            {
                return None;
            }
            let (Some(Some(x)), Some(Some(c)), Some(Some(sn)), Some(Some(p))) =
                (ins.first(), ins.get(1), ins.get(2), ins.get(3))
            else {
                return None;
            };
            let tr = *producer.get(x)?;
            let &(rs, src) = f.tr.get(&tr)?;
            (rs == r && plan.consts[*c].is_some() && plan.consts[*sn].is_some()).then(|| {
                (
                    src,
                    [*c, *sn, *p],
                    n.attr_int("interleaved", 0) != 0,
                    vec![tr, r],
                )
            })
        };
        // `v` = Identity(x) read only by `*user`: (x, [the Identity step]); `*user` becomes it.
        let through_identity = |v: ValId, user: &mut usize| -> (ValId, Vec<usize>) {
            let Some(&si) = producer.get(&v) else {
                return (v, Vec::new());
            };
            match node(si) {
                Some((n, ins, _)) if n.op == "Identity" && only(v, *user) => {
                    match ins.first().copied().flatten() {
                        Some(x) => {
                            *user = si;
                            (x, vec![si])
                        }
                        None => (v, Vec::new()),
                    }
                }
                _ => (v, Vec::new()),
            }
        };
        let mut found = HashMap::new();
        for (ai, s) in plan.steps.iter().enumerate() {
            let Step::CacheAttention { q, new, past, .. } = s else {
                continue;
            };
            let f16 = plan.caches[past[0]].dtype == DType::F16;
            let Some((q_src, rq, inter, mut absorbs)) = unrope(*q, ai) else {
                continue;
            };
            if outs.contains(q) {
                continue;
            }
            // The new rows: through the round pair for an f16 cache; the cache output itself for f32.
            let plain = |v: ValId| Some((v, Vec::new()));
            let (Some((k1, kc)), Some((v1, vc))) = (
                if f16 {
                    unround(new[0], ai)
                } else {
                    plain(new[0])
                },
                if f16 {
                    unround(new[1], ai)
                } else {
                    plain(new[1])
                },
            ) else {
                continue;
            };
            let mut k_user = kc.first().copied().unwrap_or(ai);
            let mut v_user = vc.first().copied().unwrap_or(ai);
            // An f32 cache's new rows may be named through an `Identity` (the graph output).
            let (k1, ki) = through_identity(k1, &mut k_user);
            let (v1, vi) = through_identity(v1, &mut v_user);
            absorbs.extend(ki);
            absorbs.extend(vi);
            let Some((k_src, rk, kinter, ka)) = unrope(k1, k_user) else {
                continue;
            };
            // v: Transpose(perm 0,2,1,3) of the projection.
            let Some(tv) = producer.get(&v1).copied() else {
                continue;
            };
            let Some((tn, tins, _)) = node(tv) else {
                continue;
            };
            let Some(Some(v_src)) = tins.first().copied() else {
                continue;
            };
            if rk != rq
                || kinter != inter
                || tn.op != "Transpose"
                || tn.attr_ints("perm") != Some(&[0, 2, 1, 3][..])
                || !only(v1, v_user)
            {
                continue;
            }
            absorbs.extend(ka);
            absorbs.extend(kc);
            absorbs.extend(vc);
            absorbs.push(tv);
            found.insert(
                ai,
                AttnIn {
                    q: q_src,
                    k: k_src,
                    v: v_src,
                    cos: rq[0],
                    sin: rq[1],
                    pos: rq[2],
                    interleaved: inter,
                    absorbs,
                },
            );
        }
        found
    }
}

impl LinGroup {
    fn find(plan: &Plan, consumers: &[Vec<usize>], outs: &HashSet<ValId>) -> Vec<LinGroup> {
        let mut producer: HashMap<ValId, usize> = HashMap::new();
        let mut by_x: std::collections::BTreeMap<ValId, Vec<usize>> = Default::default();
        for (si, s) in plan.steps.iter().enumerate() {
            match s {
                Step::Node { outputs, .. } => {
                    for &o in outputs {
                        producer.insert(o, si);
                    }
                }
                Step::Linear { x, .. } => by_x.entry(*x).or_default().push(si),
                _ => {}
            }
        }
        let out_of = |si: usize| match &plan.steps[si] {
            Step::Linear { out, .. } => *out,
            _ => usize::MAX,
        };
        let mut groups = Vec::new();
        for (x, mut members) in by_x {
            if members.len() > super::linear::MAX_PARTS {
                continue;
            }
            let only_members = {
                let mut c = consumers[x].clone();
                c.sort_unstable();
                c == members && !outs.contains(&x)
            };
            let norm = producer.get(&x).and_then(|&ni| {
                let Step::Node { node, inputs, .. } = &plan.steps[ni] else {
                    return None;
                };
                let n = &plan.graph.nodes[*node];
                let (Some(Some(xin)), Some(Some(w))) = (inputs.first(), inputs.get(1)) else {
                    return None;
                };
                let w_ok = plan.consts[*w]
                    .as_ref()
                    .is_some_and(|t| t.dtype == DType::F32 && t.rank() == 1);
                (n.op == "RMSNormalization"
                    && (n.domain.is_empty() || n.domain == "ai.onnx")
                    && n.attr_int("axis", -1) == -1
                    && n.attr_int("stash_type", 1) == 1
                    && inputs.len() == 2
                    && w_ok
                    && only_members)
                    .then(|| (ni, *xin, *w, n.attr_float("epsilon", 1e-5)))
            });
            if members.len() > 1 && members.iter().any(|&m| outs.contains(&out_of(m))) {
                continue;
            }
            let mut silu = None;
            if let [a, b] = members[..] {
                let (oa, ob) = (out_of(a), out_of(b));
                let only = |o: ValId| consumers[o].len() == 1 && !outs.contains(&o);
                if only(oa) && only(ob) && consumers[oa] == consumers[ob] {
                    let si = consumers[oa][0];
                    if let Step::SiluGate(sg) = &plan.steps[si] {
                        if sg.g == ob && sg.u == oa {
                            members.swap(0, 1);
                            silu = Some(si);
                        } else if sg.g == oa && sg.u == ob {
                            silu = Some(si);
                        }
                    }
                }
            }
            if members.len() > 1 || norm.is_some() {
                groups.push(LinGroup {
                    members,
                    norm,
                    silu,
                });
            }
        }
        groups
    }
}

/// A [`LinGroup`] bound to the GPU: its concatenated weights are the leader's (its first step's)
/// [`GpuLinear`]; the other members, the norm and the gate are absorbed.
#[derive(Debug)]
struct GpuGroup {
    /// The members' node names, joined by `+` (for errors).
    name: String,
    /// `(step, output, rows)` of every member, in concatenation order.
    members: Vec<(usize, ValId, usize)>,
    /// The members' input.
    x: ValId,
    /// `(input, scale, epsilon)` of the folded norm.
    norm: Option<(ValId, ValId, f32)>,
    /// Output of the folded SiLU gate.
    silu_out: Option<ValId>,
    /// [`GpuLinear::fused_kernels`]: one dispatch slot each; a step records the one for its token count.
    kernels: Vec<Arc<Kernel>>,
    /// Element offsets of the members' outputs in the shared buffer (parts form; set by the dry run).
    bases: Mutex<Vec<usize>>,
}

impl std::fmt::Debug for GpuPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuPlan")
            .field("gpu", &self.ctx.info().name)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Inputs of one step as the executor sees them.
struct Env<'a> {
    plan: &'a Plan,
    cpu: &'a [Option<Tensor>],
    meta: &'a [Option<Meta>],
    /// Set when a description looked at the contents of a host value that is not a constant (token ids,
    /// positions): such a description holds for this step only and is not cached.
    looked: std::cell::Cell<bool>,
    /// The cache prefix a mask lets attend ([`crate::backend::mask::standard_prefix`]), found once a step.
    prefix: &'a std::cell::Cell<Option<(ValId, Option<usize>)>>,
}

impl<'a> Env<'a> {
    fn new(
        plan: &'a Plan,
        cpu: &'a [Option<Tensor>],
        meta: &'a [Option<Meta>],
        prefix: &'a std::cell::Cell<Option<(ValId, Option<usize>)>>,
    ) -> Env<'a> {
        Env {
            plan,
            cpu,
            meta,
            looked: std::cell::Cell::new(false),
            prefix,
        }
    }
    /// [`crate::backend::mask::standard_prefix`] of mask `m` (every attention of a step has the same mask).
    fn mask_prefix(&self, m: ValId, t: usize, slots: usize) -> Option<usize> {
        if let Some((v, p)) = self.prefix.get() {
            if v == m {
                self.looked.set(true);
                return p;
            }
        }
        let p = self
            .cpu(m)
            .and_then(|x| crate::backend::mask::standard_prefix(x, t, slots));
        self.prefix.set(Some((m, p)));
        p
    }
    fn meta(&self, v: ValId) -> Option<Meta> {
        if let Some(m) = &self.meta[v] {
            return Some(m.clone());
        }
        self.cpu[v]
            .as_ref()
            .or(self.plan.consts[v].as_ref())
            .map(Meta::of)
    }
    /// Whether `v` has metadata `m` (without building it).
    fn meta_is(&self, v: ValId, m: &Meta) -> bool {
        match (
            &self.meta[v],
            self.cpu[v].as_ref().or(self.plan.consts[v].as_ref()),
        ) {
            (Some(g), _) => g == m,
            (None, Some(t)) => t.dtype == m.dtype && t.shape == m.shape,
            (None, None) => false,
        }
    }
    fn cpu(&self, v: ValId) -> Option<&Tensor> {
        if self.cpu[v].is_some() && self.plan.consts[v].is_none() {
            self.looked.set(true);
        }
        self.cpu[v].as_ref().or(self.plan.consts[v].as_ref())
    }
}

/// A step's description kept for the next step of the same token count (decode: every step): valid while
/// the values it reads have the metadata they had (see [`Env::looked`] for what is never kept).
struct Kept {
    desc: Desc,
    reads: Vec<(ValId, Meta)>,
}

/// Dispatches a partial submission on GPUs (see [`GpuPlan::submit_every`]): SmolLM2's decode step
/// (154 dispatches) goes in three.
const SUBMIT_EVERY: usize = 64;

/// Token counts whose step descriptions are kept (decode and a few prefill chunk sizes).
const KEPT_SIZES: usize = 4;

const HEAVY_NONE: &[BufRef] = &[];

impl GpuPlan {
    /// Binds `plan` to `ctx`: uploads weights, dry-runs the plan at `max_chunk` tokens and creates every
    /// buffer, pipeline and bind group. Fails (typed) when a step the GPU must run is not supported.
    ///
    /// `seg_bytes` caps one KV-cache buffer (default and maximum: the adapter's storage-binding limit); a
    /// layer's cache larger than that is split into segments of whole rows, attended one segment a
    /// dispatch and combined, so a context longer than any single allocation still runs.
    pub fn new(
        ctx: Arc<GpuContext>,
        plan: &Plan,
        cpu_step: &mut CpuStep,
        inputs: &[(ValId, Tensor)],
        seg_bytes: Option<u64>,
    ) -> Result<GpuPlan> {
        let nvals = plan.names.len();
        let mut linears = HashMap::new();
        let mut weight_bytes = 0;
        let cand = Fusions::find(plan, &ctx.options.fusions);
        // Attention reading the projections needs 10 storage buffers a stage (7 otherwise).
        let rope_binds = attention::Inputs::Rope { interleaved: false }.bindings();
        let attn_in: HashMap<usize, AttnIn> =
            if ctx.device.limits().max_storage_buffers_per_shader_stage >= rope_binds {
                cand.attn.clone()
            } else {
                HashMap::new()
            };
        let (lin_groups, mut absorbed) =
            Self::bind_groups(&ctx, plan, &cand, &mut linears, &mut weight_bytes)?;
        absorbed.extend(attn_in.values().flat_map(|a| a.absorbs.iter().copied()));
        for (si, s) in plan.steps.iter().enumerate() {
            if let Step::Linear { node, w, bias, .. } = s {
                if linears.contains_key(&si) || absorbed.contains(&si) {
                    continue;
                }
                if GpuLinear::supports(w) {
                    let name = &plan.graph.nodes[*node].name;
                    let b = bias.as_ref().map(|b| b.typed::<f32>());
                    let g = GpuLinear::new(&ctx, name, w, b)?;
                    weight_bytes += g.bytes;
                    linears.insert(si, g);
                }
            }
        }
        // Token embeddings: a tied output layer's weights when that layer runs alone (not stacked
        // with others), else the table uploaded in the same layout.
        let mut lin_alias = HashMap::new();
        for (si, s) in plan.steps.iter().enumerate() {
            let Step::Embedding(emb) = s else { continue };
            let tied = plan.steps.iter().enumerate().find_map(|(j, t)| match t {
                Step::Linear { w, .. }
                    if Arc::ptr_eq(w, &emb.w)
                        && linears.get(&j).is_some_and(|g| g.n == w.n)
                        && lin_groups.get(&j).is_none_or(|g| g.members.len() == 1) =>
                {
                    Some(j)
                }
                _ => None,
            });
            if let Some(j) = tied {
                lin_alias.insert(si, j);
            } else if GpuLinear::supports(&emb.w) {
                let g = GpuLinear::new(&ctx, &plan.graph.nodes[emb.node].name, &emb.w, None)?;
                weight_bytes += g.bytes;
                linears.insert(si, g);
            }
        }
        let dummy = ctx.buffer_with("dummy", &[0; 4])?;
        let mut me = GpuPlan {
            ctx: ctx.clone(),
            on_gpu: vec![false; plan.steps.len()],
            home: vec![None; nvals],
            bufs: Vec::new(),
            caps: Vec::new(),
            const_loaded: vec![false; nvals],
            linears,
            lin_alias,
            seg_bytes: seg_bytes
                .unwrap_or(ctx.binding_limit)
                .min(ctx.binding_limit)
                .min(ctx.device.limits().max_buffer_size),
            rows_variant: super::rows_variant(&ctx),
            part: ctx.buffer_with("attention partials", &[0; 4])?,
            split_keys: ctx.options.split_keys,
            submit_every: match ctx.options.submit_every {
                _ if ctx.profiling => 0,
                Some(n) => n,
                None if ctx.info().device_type == "Cpu" => 0,
                None => SUBMIT_EVERY,
            },
            split_chunk: ctx.options.split_chunk.max(1),
            part_need: std::sync::atomic::AtomicU64::new(0),
            dummy,
            params: ctx.uniform("params", 256),
            slot0: vec![0; plan.steps.len()],
            kernels: vec![Vec::new(); plan.steps.len()],
            groups: (0..plan.steps.len()).map(|_| Vec::new()).collect(),
            binds: vec![Vec::new(); plan.steps.len()],
            recording: Mutex::new(()),
            feed: None,
            ahead: ctx.options.run_ahead && !ctx.profiling,
            lock: Mutex::new(GpuStats {
                weight_bytes,
                ..Default::default()
            }),
            cand,
            lin_groups,
            attn_in,
            absorbed,
            offs: vec![0; nvals],
            submit_ms: Mutex::new(0.0),
            profile: ctx.profiling.then(|| Mutex::new(Default::default())),
            stamps: None,
            skipped: HashSet::new(),
            res_fused: HashSet::new(),
            tr_src: HashMap::new(),
            round_src: HashMap::new(),
            cpu_reads: Vec::new(),
            last_gpu: None,
            kept: Mutex::default(),
        };
        // Dry run.
        let no_prefix = std::cell::Cell::new(None);
        let mut env: Vec<Option<Tensor>> = vec![None; nvals];
        for (v, t) in inputs {
            env[*v] = Some(t.clone());
        }
        let mut meta: Vec<Option<Meta>> = vec![None; nvals];
        let mut root: Vec<Option<ValId>> = vec![None; nvals];
        let mut need: HashMap<ValId, u64> = HashMap::new();
        // The first CPU step that reads a value of the GPU (it waits for it).
        let mut first_wait: Option<usize> = None;
        let mut uploads: HashSet<ValId> = HashSet::new();
        let mut consts: HashSet<ValId> = HashSet::new();
        let mut slot = 0usize;
        for (si, s) in plan.steps.iter().enumerate() {
            let desc = {
                let e = Env::new(plan, &env, &meta, &no_prefix);
                let d = me.describe(si, s, &e, true, 0)?;
                let heavy = matches!(
                    s,
                    Step::Linear { .. } | Step::CacheAttention { .. } | Step::Embedding(_)
                ) || me.embedding(plan, s)
                    || me.skipped.contains(&si)
                    || me.absorbed.contains(&si);
                match d {
                    Some(d)
                        if heavy
                            || crate::plan::step_reads(s)
                                .iter()
                                .any(|v| meta[*v].is_some()) =>
                    {
                        Some(d)
                    }
                    _ => None,
                }
            };
            match desc {
                Some(d) => {
                    me.on_gpu[si] = true;
                    if let Some((other, target)) = d.fused {
                        match s {
                            Step::Linear { .. } => {
                                me.res_fused.insert(si);
                                me.skipped.insert(other);
                            }
                            _ if me.cand.tr.contains_key(&si) => {
                                me.skipped.insert(si);
                                me.tr_src.insert(other, target);
                            }
                            _ => {
                                me.skipped.insert(si);
                                me.round_src.insert(other, target);
                            }
                        }
                    }
                    for &v in &d.reads {
                        if e_is_const(plan, v) {
                            consts.insert(v);
                        } else if meta[v].is_none() {
                            uploads.insert(v);
                            let b = env[v].as_ref().map(|t| Meta::of(t).bytes()).unwrap_or(4);
                            let e = need.entry(v).or_insert(0);
                            *e = (*e).max(b);
                        }
                    }
                    for (o, m, src) in &d.outs {
                        let r = match src {
                            Some(s) => root[*s].unwrap_or(*s),
                            None => *o,
                        };
                        root[*o] = Some(r);
                        // A view starts where its source does; a fused part where the group put it.
                        me.offs[*o] = match (d.at.iter().find(|a| a.0 == *o), src) {
                            (Some(&(_, off)), _) => off,
                            (None, Some(s)) => me.offs[*s],
                            (None, None) => 0,
                        };
                        let e = need.entry(r).or_insert(0);
                        *e = (*e).max(me.offs[*o] + m.bytes());
                        meta[*o] = Some(m.clone());
                        env[*o] = None;
                    }
                    me.slot0[si] = slot;
                    slot += d.disp.len();
                    for dd in d.disp {
                        me.kernels[si].push(dd.kernel.ok_or_else(|| Error::internal("no kernel"))?);
                        me.binds[si].push(dd.binds);
                    }
                }
                None => {
                    if me.tr_src.contains_key(&si)
                        || me.round_src.contains_key(&si)
                        || me.skipped.contains(&si)
                        || me.absorbed.contains(&si)
                        || me.lin_groups.contains_key(&si)
                    {
                        return Err(Error::device(
                            DeviceFault::Unsupported,
                            format!(
                                "step {si} was fused with an earlier one but cannot run on the GPU"
                            ),
                        ));
                    }
                    if let Step::CacheAttention { node, .. } = s {
                        let n = &plan.graph.nodes[*node];
                        return Err(Error::device(DeviceFault::Unsupported, format!(
                            "attention `{}` cannot run on the GPU (its inputs do not fit the kernel)",
                            n.name
                        )));
                    }
                    for v in crate::plan::step_reads(s) {
                        if let Some(m) = &meta[v] {
                            first_wait.get_or_insert(si);
                            if env[v].is_none() {
                                env[v] = Some(Tensor::zeros(m.dtype, &m.shape));
                            }
                        }
                    }
                    cpu_step(s, &mut env)?;
                    if let Step::Node { outputs, .. } = s {
                        for &o in outputs {
                            meta[o] = None;
                        }
                    }
                }
            }
        }
        // The token choice's outputs hold up to MAX_K of each row, whatever k the dry run had, and
        // rows longer than MAX_K all of it: the indices' buffer is where the GPU sorts a row.
        for (si, s) in plan.steps.iter().enumerate() {
            let Step::Node {
                node,
                inputs,
                outputs,
            } = s
            else {
                continue;
            };
            if !me.on_gpu[si] || plan.graph.nodes[*node].op != "TopK" {
                continue;
            }
            let row = inputs
                .first()
                .copied()
                .flatten()
                .and_then(|x| meta[x].as_ref())
                .and_then(|m| m.shape.last().copied())
                .unwrap_or(0);
            for &o in outputs.iter().take(2) {
                if let Some(m) = &meta[o] {
                    let rows = m.numel() / m.shape.last().copied().unwrap_or(1).max(1);
                    let per = row.max(select::MAX_K);
                    let r = root[o].unwrap_or(o);
                    let e = need.entry(r).or_insert(0);
                    *e = (*e).max(me.offs[o] + (rows * per * m.dtype.size()) as u64);
                }
            }
        }
        // Buffers: one per root value (views share), sized for the dry run's largest chunk.
        let mut index: HashMap<ValId, usize> = HashMap::new();
        let mut scratch = 0;
        #[allow(clippy::needless_range_loop)]
        for v in 0..nvals {
            let r = root[v].unwrap_or(v);
            let Some(&bytes) = need.get(&r) else { continue };
            let bi = match index.get(&r) {
                Some(&bi) => bi,
                None => {
                    let b = ctx.storage(&plan.names[r], bytes)?;
                    scratch += bytes;
                    me.bufs.push(b);
                    me.caps.push(bytes);
                    index.insert(r, me.bufs.len() - 1);
                    me.bufs.len() - 1
                }
            };
            if root[v].is_some() || need.contains_key(&v) {
                me.home[v] = Some(bi);
            }
        }
        for &v in &uploads {
            if me.home[v].is_none() {
                return Err(Error::internal(format!(
                    "no buffer for `{}`",
                    plan.names[v]
                )));
            }
        }
        for &v in &consts {
            let t = plan.consts[v]
                .as_ref()
                .ok_or_else(|| Error::internal("constant vanished"))?;
            let b = ctx.buffer_with(&plan.names[v], t.bytes())?;
            me.caps.push(b.size());
            me.bufs.push(b);
            me.home[v] = Some(me.bufs.len() - 1);
            me.const_loaded[v] = true;
        }
        me.params = ctx.uniform("params", (slot.max(1) * 256) as u64);
        if me.profile.is_some() && ctx.info().timestamps {
            me.stamps = Some(Stamps::new(&ctx, slot));
        }
        let part = me.part_need.load(std::sync::atomic::Ordering::Relaxed);
        if part > 0 {
            me.part = ctx.storage("attention partials", part)?;
        }
        for si in 0..plan.steps.len() {
            let mut gs = Vec::new();
            for (j, b) in me.binds[si].iter().enumerate() {
                let per_state = b
                    .iter()
                    .any(|r| matches!(r, BufRef::CacheK(..) | BufRef::CacheV(..)));
                gs.push(if per_state {
                    None
                } else {
                    Some(me.bind_group(si, j, None)?)
                });
            }
            me.groups[si] = gs;
        }
        me.last_gpu = me.on_gpu.iter().rposition(|g| *g);
        me.feed = me.find_feed(plan, first_wait);
        for (si, s) in plan.steps.iter().enumerate() {
            if !me.on_gpu[si] {
                me.cpu_reads
                    .extend(crate::plan::step_reads(s).into_iter().map(|v| (si, v)));
            }
        }
        if let Ok(mut st) = me.lock.lock() {
            st.scratch_bytes = scratch;
            st.gpu_steps = me.on_gpu.iter().filter(|g| **g).count();
            st.linear_groups = me.lin_groups.len();
            st.fused_norms = me.lin_groups.values().filter(|g| g.norm.is_some()).count();
            // Linear layers (an untied embedding's table is uploaded in their layout, not run as one).
            st.subgroup_linears = me
                .linears
                .iter()
                .filter(|(si, l)| l.subgroups && matches!(plan.steps[**si], Step::Linear { .. }))
                .count();
            st.cpu_steps = me.on_gpu.len() - st.gpu_steps;
        }
        ctx.check("planning")?;
        ctx.save_pipeline_cache();
        Ok(me)
    }

    /// Uploads the concatenated weights of every fused linear group the GPU kernel takes (into
    /// `linears`, under the group's first step) and returns the groups and the steps they absorb.
    fn bind_groups(
        ctx: &Arc<GpuContext>,
        plan: &Plan,
        cand: &Fusions,
        linears: &mut HashMap<usize, GpuLinear>,
        weight_bytes: &mut u64,
    ) -> Result<(HashMap<usize, GpuGroup>, HashSet<usize>)> {
        use super::linear::FusedOut;
        let mut groups = HashMap::new();
        let mut absorbed = HashSet::new();
        // CPU adapters compute every row's x·scale product (the norm's cost times N), where a GPU hides
        // it behind the weight loads: there the norm stays a dispatch of its own. The SiLU pair (two rows
        // an invocation there) also ran slower on lavapipe than parts + the gate's own dispatch.
        let cpu_adapter = super::rows_variant(ctx);
        for gr in &cand.groups {
            let mut gr = gr.clone();
            if cpu_adapter {
                gr.norm = None;
                gr.silu = None;
            }
            if gr.members.len() < 2 && gr.norm.is_none() {
                continue;
            }
            let mut ws = Vec::new();
            let mut biases = Vec::new();
            let mut members = Vec::new();
            let mut x0 = None;
            for &si in &gr.members {
                if let Step::Linear {
                    w, bias, out, x, ..
                } = &plan.steps[si]
                {
                    ws.push(&**w);
                    biases.push(bias.as_ref().map(|b| b.typed::<f32>().to_vec()));
                    members.push((si, *out, w.n));
                    x0 = Some(*x);
                }
            }
            let Some(x) = x0 else { continue };
            if members.len() != gr.members.len() || !ws.iter().all(|w| GpuLinear::supports(w)) {
                continue;
            }
            let Some(cat) = crate::weights::LinearWeights::concat(&ws) else {
                continue;
            };
            if let Some((_, _, w, _)) = gr.norm {
                if plan.consts[w].as_ref().map(|t| t.numel()) != Some(cat.k) {
                    continue;
                }
            }
            let bias: Option<Vec<f32>> = biases.iter().any(|b| b.is_some()).then(|| {
                biases
                    .iter()
                    .zip(&members)
                    .flat_map(|(b, m)| b.clone().unwrap_or_else(|| vec![0.0; m.2]))
                    .collect()
            });
            let names: Vec<&str> = gr
                .members
                .iter()
                .map(|&si| match &plan.steps[si] {
                    Step::Linear { node, .. } => plan.graph.nodes[*node].name.as_str(),
                    _ => "",
                })
                .collect();
            let name = names.join("+");
            let Ok(g) = GpuLinear::new(ctx, &name, &cat, bias.as_deref()) else {
                // Too large for one binding together: the members run alone.
                continue;
            };
            let out = if gr.silu.is_some() {
                FusedOut::SiluPair
            } else if members.len() > 1 {
                FusedOut::Parts(members.iter().map(|m| (m.2, 0)).collect())
            } else {
                FusedOut::One
            };
            let Some(kernels) = g.fused_kernels(ctx, &out, gr.norm.is_some())? else {
                continue;
            };
            let leader = *gr.members.iter().min().unwrap_or(&members[0].0);
            *weight_bytes += g.bytes;
            linears.insert(leader, g);
            absorbed.extend(gr.members.iter().copied().filter(|&m| m != leader));
            absorbed.extend(gr.norm.map(|n| n.0));
            absorbed.extend(gr.silu);
            let silu_out = gr.silu.and_then(|si| match &plan.steps[si] {
                Step::SiluGate(sg) => Some(sg.out),
                _ => None,
            });
            groups.insert(
                leader,
                GpuGroup {
                    name,
                    members,
                    x,
                    norm: gr.norm.map(|(_, xin, w, eps)| (xin, w, eps)),
                    silu_out,
                    kernels,
                    bases: Mutex::new(Vec::new()),
                },
            );
        }
        Ok((groups, absorbed))
    }

    /// GPU time per kernel (`(kernel, dispatches, seconds)`, slowest first) when profiling.
    pub fn profile(&self) -> Vec<(String, u64, f64)> {
        let Some(p) = &self.profile else {
            return Vec::new();
        };
        let p = p.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = p.iter().map(|(k, (n, t))| (k.clone(), *n, *t)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    /// The context.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// Counters (the last step's dispatches, transfers; resident bytes).
    pub fn stats(&self) -> GpuStats {
        self.lock.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn buf_for<'a>(
        &'a self,
        si: usize,
        r: BufRef,
        state: Option<&'a GpuState>,
    ) -> Result<(&'a wgpu::Buffer, u64)> {
        if let BufRef::Val(v) = r {
            let h = self.home[v]
                .ok_or_else(|| Error::internal(format!("value {v} has no GPU buffer")))?;
            return Ok((&self.bufs[h], self.offs[v]));
        }
        Ok((
            match r {
                BufRef::Val(_) => unreachable!("handled above"),
                BufRef::Dummy => &self.dummy,
                BufRef::LinW(i) => &self.linear(si)?.parts[i].w,
                BufRef::LinS(i) => &self.linear(si)?.parts[i].s,
                BufRef::LinZ(i) => &self.linear(si)?.parts[i].z,
                BufRef::LinBias => &self.linear(si)?.bias,
                BufRef::Part => &self.part,
                BufRef::CacheK(c, seg) | BufRef::CacheV(c, seg) => {
                    let st =
                        state.ok_or_else(|| Error::internal("cache binding without a state"))?;
                    st.home
                        .get(c)
                        .and_then(|&b| st.bufs.get(b + seg))
                        .ok_or_else(|| {
                            Error::internal(format!("state has no cache {c} segment {seg}"))
                        })?
                }
            },
            0,
        ))
    }

    /// Rows a cache segment holds and the number of segments, for caches of `slots` rows of `row` bytes.
    fn segs(&self, row: usize, slots: usize, head_dim: usize) -> Result<(usize, usize)> {
        let mut rows = (self.seg_bytes / row.max(1) as u64) as usize;
        if rows == 0 {
            return Err(Error::device(
                DeviceFault::Limits,
                format!(
                    "one KV-cache row ({row} bytes) exceeds the largest cache buffer ({} bytes)",
                    self.seg_bytes
                ),
            ));
        }
        if self.rows_variant && !attention::rows_ok(head_dim, rows.min(slots)) {
            // CPU adapters attend one (head, token) an invocation, within llvmpipe's loop bound: a
            // cache longer than that is split like one beyond a buffer (its chunk rows included).
            rows = rows.min(slots);
            while rows > 1 && !attention::rows_ok(head_dim, 2 * rows) {
                rows /= 2;
            }
        }
        let rows = rows.min(slots.max(1));
        Ok((rows, slots.div_ceil(rows).max(1)))
    }

    /// How a decode step can take its token ids from the step before it on the GPU (see
    /// [`GpuPlan::begin`]), given the first CPU step that waits for the GPU. Needs: that wait after the
    /// last GPU step (none in the middle); the ids' contents reaching the GPU as one uploaded value,
    /// through host views only (other host steps may read their shape, not their values); one token
    /// choice (`TopK`) on the GPU.
    fn find_feed(&self, plan: &Plan, first_wait: Option<usize>) -> Option<Feed> {
        let last = self.last_gpu?;
        let tail = first_wait.unwrap_or(plan.steps.len());
        if tail < last {
            return None;
        }
        let ids_in = *plan.inputs.get(crate::contract::INPUT_IDS)?;
        let mut holds_ids: HashSet<ValId> = [ids_in].into_iter().collect();
        let mut uploaded: HashSet<ValId> = HashSet::new();
        for (si, s) in plan.steps.iter().enumerate() {
            let hits: Vec<ValId> = crate::plan::step_reads(s)
                .into_iter()
                .filter(|v| holds_ids.contains(v))
                .collect();
            if hits.is_empty() {
                continue;
            }
            if self.on_gpu[si] {
                uploaded.extend(hits);
                continue;
            }
            let Step::Node {
                node,
                inputs,
                outputs,
            } = s
            else {
                return None;
            };
            match plan.graph.nodes[*node].op.as_str() {
                "Shape" => {}
                op if crate::plan::is_view_op(op)
                    && hits.len() == 1
                    && inputs.first().copied().flatten() == Some(hits[0]) =>
                {
                    holds_ids.insert(*outputs.first()?);
                }
                _ => return None,
            }
        }
        let mut uploaded = uploaded.into_iter();
        let ids = uploaded.next()?;
        if uploaded.next().is_some() {
            return None;
        }
        let mut tops = plan.steps.iter().enumerate().filter_map(|(si, s)| match s {
            Step::Node { node, outputs, .. }
                if self.on_gpu[si]
                    && plan.graph.nodes[*node].op == "TopK"
                    && outputs.len() == 2 =>
            {
                Some(outputs[1])
            }
            _ => None,
        });
        let top = tops.next()?;
        if tops.next().is_some() {
            return None;
        }
        // The chosen token itself when the whole choice is on the GPU; else the TopK's first index.
        let token = plan
            .steps
            .iter()
            .enumerate()
            .find_map(|(si, s)| match s {
                Step::TokenChoice(c) if self.on_gpu[si] && c.idx == top => Some(c.out),
                _ => None,
            })
            .unwrap_or(top);
        if self.home[token].is_none() || self.home[ids].is_none() {
            return None;
        }
        let inputs: HashSet<ValId> = plan.inputs.values().copied().collect();
        let mut early: Vec<ValId> = plan.steps[..tail]
            .iter()
            .flat_map(crate::plan::step_reads)
            .filter(|v| inputs.contains(v) && *v != ids_in)
            .collect();
        early.sort_unstable();
        early.dedup();
        let late = inputs
            .into_iter()
            .filter(|v| *v != ids_in && !early.contains(v))
            .collect();
        Some(Feed {
            ids,
            token,
            early,
            late,
        })
    }

    /// Whether `v` is a constant table (rows: rank ≥ 2) a GPU `Gather` reads in place: loaded once, it
    /// must fit one binding.
    fn gather_table(&self, plan: &Plan, v: ValId) -> bool {
        plan.consts[v]
            .as_ref()
            .is_some_and(|t| t.rank() >= 2 && t.bytes().len() as u64 <= self.seg_bytes)
    }

    /// Whether step `s` gathers rows of a constant table (an embedding): such a step runs on the GPU
    /// even when its indices come from the host, so the whole step from the token ids on stays there
    /// (and the ids can be fed from the previous step's token choice on the GPU).
    fn embedding(&self, plan: &Plan, s: &Step) -> bool {
        match s {
            Step::Node { node, inputs, .. } => {
                plan.graph.nodes[*node].op == "Gather"
                    && inputs
                        .first()
                        .copied()
                        .flatten()
                        .is_some_and(|d| self.gather_table(plan, d))
            }
            _ => false,
        }
    }

    fn linear(&self, si: usize) -> Result<&GpuLinear> {
        let si = self.lin_alias.get(&si).copied().unwrap_or(si);
        self.linears
            .get(&si)
            .ok_or_else(|| Error::internal(format!("step {si} has no GPU weights")))
    }

    fn bind_group(&self, si: usize, j: usize, state: Option<&GpuState>) -> Result<wgpu::BindGroup> {
        let bufs: Vec<(&wgpu::Buffer, u64)> = self.binds[si][j]
            .iter()
            .map(|r| self.buf_for(si, *r, state))
            .collect::<Result<_>>()?;
        Ok(self.ctx.bind_at(
            &self.kernels[si][j],
            (&self.params, ((self.slot0[si] + j) * 256) as u64),
            &bufs,
        ))
    }

    /// A fresh sequence state for `caches` (`(dtype, [1, KVH, S, D])` of every plan cache) under a GPU
    /// memory budget: resident layers first, the rest through a ring of two slots (see [`GpuState`]).
    pub fn new_state(
        &self,
        plan: &Plan,
        caches: &[(DType, Vec<usize>)],
        budget: crate::kv::GpuCacheBudget,
        max_chunk: usize,
    ) -> Result<GpuState> {
        use crate::kv::GpuCacheBudget;
        if let Some((_, s)) = caches.iter().find(|(_, s)| s.len() != 4) {
            return Err(Error::device(
                DeviceFault::Unsupported,
                format!("cache shape {s:?} is not [1, KVH, S, D]"),
            ));
        }
        let bytes_of = |c: usize| -> u64 {
            caches
                .get(c)
                .map(|(dt, shape)| (shape.iter().product::<usize>() * dt.size()) as u64)
                .unwrap_or(0)
        };
        // Layers: the attention steps' cache pairs, in plan order.
        let layers: Vec<[usize; 2]> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::CacheAttention { past, .. } => Some(*past),
                _ => None,
            })
            .collect();
        let layer_bytes = layers
            .iter()
            .map(|p| bytes_of(p[0]) + bytes_of(p[1]))
            .max()
            .unwrap_or(0);
        let full: u64 = layers.iter().map(|p| bytes_of(p[0]) + bytes_of(p[1])).sum();
        let fits = match budget {
            GpuCacheBudget::All => layers.len(),
            GpuCacheBudget::Bytes(b) => (b / layer_bytes.max(1)) as usize,
            GpuCacheBudget::Percent(pc) => (full * pc as u64 / 100 / layer_bytes.max(1)) as usize,
        };
        let resident = if fits >= layers.len() {
            layers.len()
        } else {
            fits.saturating_sub(2)
        };
        let nslots = (layers.len() - resident).min(2);
        // A slot serves every streamed layer: they must share one cache shape.
        if let Some(first) = layers.get(resident) {
            if layers[resident..]
                .iter()
                .any(|p| (0..2).any(|k| caches.get(p[k]) != caches.get(first[k])))
            {
                return Err(Error::device(DeviceFault::Unsupported, "streamed layers have caches of different shapes; use a budget that keeps them \
                     resident (`--gpu-cache-budget all`)"));
            }
        }
        let rows_bytes: u64 = caches
            .iter()
            .map(|(dt, shape)| (shape[1] * shape[3] * dt.size() * max_chunk.max(1)) as u64)
            .sum();
        let mut st = GpuState {
            home: vec![usize::MAX; caches.len()],
            seg_rows: vec![1; caches.len()],
            bufs: Vec::new(),
            ring: vec![None; caches.len()],
            streams: layers[resident..].to_vec(),
            nslots,
            held: Mutex::new(Vec::new()),
            groups: HashMap::new(),
            belt: Mutex::new(wgpu::util::StagingBelt::new(
                self.ctx.device.clone(),
                (4 << 20).min(layer_bytes.max(1 << 16)),
            )),
            // A step run ahead is one token: its set needs one row of each cache.
            rows: [
                self.ctx.staging("cache rows", rows_bytes),
                self.ctx
                    .staging("cache rows (ahead)", rows_bytes / max_chunk.max(1) as u64),
            ],
            fetch: Mutex::default(),
            token: self.ctx.storage("fed token", 16)?,
            stats: Mutex::new(Default::default()),
        };
        let mut held = Vec::new();
        let mut gpu_bytes = 0;
        // Segments: per cache, rows a buffer holds.
        for (c, (dt, shape)) in caches.iter().enumerate() {
            st.seg_rows[c] = self
                .segs(shape[1] * shape[3] * dt.size(), shape[2], shape[3])?
                .0;
        }
        // One logical buffer = its segments, consecutive in `bufs` (`held` is indexed by the first).
        let mut alloc =
            |st: &mut GpuState, label: String, c: usize, slots: usize| -> Result<usize> {
                let (dt, shape) = &caches[c];
                let (rows, row) = (st.seg_rows[c], shape[1] * shape[3] * dt.size());
                let first = st.bufs.len();
                let mut r0 = 0;
                while r0 < slots.max(1) {
                    let n = rows.min(slots.max(1) - r0);
                    st.bufs.push(
                        self.ctx
                            .storage(&format!("{label}[{r0}..]"), (n * row) as u64)?,
                    );
                    gpu_bytes += (n * row) as u64;
                    r0 += n;
                }
                Ok(first)
            };
        let mut slot_bufs: Vec<[usize; 2]> = Vec::new();
        for (li, pair) in layers.iter().enumerate() {
            if li < resident {
                for &c in pair {
                    let first = alloc(&mut st, format!("cache {c}"), c, caches[c].1[2])?;
                    held.resize(st.bufs.len(), (None, 0));
                    held[first] = (Some(c), usize::MAX);
                    st.home[c] = first;
                }
            } else {
                let i = li - resident;
                if i < nslots {
                    let mut b = [0; 2];
                    for (k, bk) in b.iter_mut().enumerate() {
                        let c = pair[k];
                        *bk = alloc(&mut st, format!("cache slot {i}.{k}"), c, caches[c].1[2])?;
                        held.resize(st.bufs.len(), (None, 0));
                    }
                    slot_bufs.push(b);
                }
                for (k, &c) in pair.iter().enumerate() {
                    st.home[c] = slot_bufs[i % nslots][k];
                    st.ring[c] = Some(i);
                }
            }
        }
        // Caches no attention step reads (none in a step graph) still get a buffer of their own.
        for (c, (_, shape)) in caches.iter().enumerate() {
            if st.home[c] == usize::MAX {
                let first = alloc(&mut st, format!("cache {c}"), c, shape[2])?;
                held.resize(st.bufs.len(), (None, 0));
                held[first] = (Some(c), usize::MAX);
                st.home[c] = first;
            }
        }
        st.held = Mutex::new(held);
        if let Ok(mut k) = st.stats.lock() {
            k.layers_resident = resident;
            k.layers_streamed = layers.len() - resident;
            k.slots = nslots;
            k.gpu_bytes = gpu_bytes;
        }
        for si in 0..self.binds.len() {
            for j in 0..self.binds[si].len() {
                if self.groups[si][j].is_none() {
                    let g = self.bind_group(si, j, Some(&st))?;
                    st.groups.insert((si, j), g);
                }
            }
        }
        self.ctx.check("allocating a cache")?;
        Ok(st)
    }

    /// What step `si` does on the GPU with these inputs, or `None` when it must run on the CPU.
    fn describe(
        &self,
        si: usize,
        s: &Step,
        e: &Env,
        dry: bool,
        position: usize,
    ) -> Result<Option<Desc>> {
        let ctx = &self.ctx;
        let plan = e.plan;
        let k = |f: &dyn Fn() -> Result<Arc<Kernel>>| -> Result<Option<Arc<Kernel>>> {
            if dry {
                f().map(Some)
            } else {
                Ok(None)
            }
        };
        let f32m = |v: ValId| e.meta(v).filter(|m| m.dtype == DType::F32);
        let ew_disp = |entry: &'static str,
                       binds: Vec<BufRef>,
                       params: Params,
                       items: usize|
         -> Result<Disp> {
            let (x, y) = grid(items, 256, ctx.max_groups);
            Ok(Disp {
                kernel: k(&|| ew::kernel(ctx, entry))?,
                binds,
                params,
                groups: (x, y, 1),
            })
        };
        let _ = HEAVY_NONE;
        if self.absorbed.contains(&si) {
            return Ok(Some(Desc::empty()));
        }
        if let Some(gr) = self.lin_groups.get(&si) {
            return self.describe_group(si, gr, e, dry).map(Some);
        }
        match s {
            Step::Linear { x, out, .. } => {
                let Some(g) = self.linears.get(&si) else {
                    return Ok(None);
                };
                let Some(xm) = f32m(*x) else { return Ok(None) };
                if xm.shape.last() != Some(&g.k) {
                    return Ok(None);
                }
                let m = xm.numel() / g.k.max(1);
                let mut shape = xm.shape.clone();
                if let Some(l) = shape.last_mut() {
                    *l = g.n;
                }
                // Residual add in the epilogue: the Add's other input is ready and has this output's shape.
                let fuse = if dry {
                    self.cand.res.get(&si).copied().filter(|(_, other, _)| {
                        e.meta(*other)
                            .is_some_and(|m| m.dtype == DType::F32 && m.shape == shape)
                    })
                } else if self.res_fused.contains(&si) {
                    self.cand.res.get(&si).copied()
                } else {
                    None
                };
                let (res, target) = match fuse {
                    Some((_, other, aout)) => {
                        if e.meta(other).map(|m| m.shape) != Some(shape.clone()) {
                            return Err(Error::device(
                                DeviceFault::Unsupported,
                                format!(
                                    "`{}`: residual has another shape than the linear output",
                                    plan.names[aout]
                                ),
                            ));
                        }
                        (BufRef::Val(other), aout)
                    }
                    None => (BufRef::Dummy, *out),
                };
                // Each part: the GEMV slot and, on GPUs, the tiled-GEMM slot; a step records the one
                // its token count takes (the other has no workgroups).
                let gemm = g.uses_gemm(m);
                let mut disp = Vec::new();
                for i in 0..g.parts.len() {
                    let kernels = std::iter::once((&g.kernel, !gemm))
                        .chain(g.gemm.as_ref().map(|k| (k, gemm)));
                    for (kernel, taken) in kernels {
                        disp.push(Disp {
                            kernel: if dry { Some(kernel.clone()) } else { None },
                            binds: vec![
                                BufRef::Val(*x),
                                BufRef::LinW(i),
                                BufRef::LinS(i),
                                BufRef::LinZ(i),
                                BufRef::LinBias,
                                res,
                                BufRef::Val(target),
                            ],
                            params: g.params(i, m, fuse.is_some()),
                            groups: if taken {
                                g.groups(i, m, ctx.max_groups)
                            } else {
                                (0, 0, 0)
                            },
                        });
                    }
                }
                let mut reads = vec![*x];
                if let Some((_, other, _)) = fuse {
                    reads.push(other);
                }
                Ok(Some(Desc {
                    fused: fuse.filter(|_| dry).map(|(ai, other, _)| (ai, other)),
                    at: Vec::new(),
                    outs: vec![(
                        target,
                        Meta {
                            dtype: DType::F32,
                            shape,
                        },
                        None,
                    )],
                    reads,
                    disp,
                }))
            }
            Step::Embedding(emb) => {
                let Ok(g) = self.linear(si) else {
                    return Ok(None);
                };
                let Some(im) = e.meta(emb.ids).filter(|m| m.dtype == DType::I64) else {
                    return Ok(None);
                };
                // Ids the host holds are checked here (the GPU writes zeros for one outside).
                if e.meta[emb.ids].is_none() && !dry {
                    let Some(it) = e.cpu(emb.ids) else {
                        return Ok(None);
                    };
                    let rows = g.n as i64;
                    if let Some(bad) = it.typed::<i64>().iter().find(|&&i| i < -rows || i >= rows) {
                        let n = &plan.graph.nodes[emb.node];
                        return Err(Error::node(
                            &n.name,
                            &n.op,
                            format!("token id {bad} is out of range for the {rows}-row embedding"),
                        ));
                    }
                }
                let t = im.numel();
                let mut shape = im.shape.clone();
                shape.push(g.k);
                let disp = (0..g.parts.len())
                    .map(|i| -> Result<Disp> {
                        Ok(Disp {
                            kernel: k(&|| g.embed_kernel(ctx))?,
                            binds: vec![
                                BufRef::Val(emb.ids),
                                BufRef::LinW(i),
                                BufRef::LinS(i),
                                BufRef::LinZ(i),
                                BufRef::Dummy,
                                BufRef::Dummy,
                                BufRef::Val(emb.out),
                            ],
                            params: g.embed_params(i, t),
                            groups: g.embed_groups(t, ctx.max_groups),
                        })
                    })
                    .collect::<Result<_>>()?;
                Ok(Some(Desc {
                    fused: None,
                    at: Vec::new(),
                    outs: vec![(
                        emb.out,
                        Meta {
                            dtype: DType::F32,
                            shape,
                        },
                        None,
                    )],
                    reads: vec![emb.ids],
                    disp,
                }))
            }
            Step::SiluGate(sg) => {
                let (Some(gm), Some(um)) = (f32m(sg.g), f32m(sg.u)) else {
                    return Ok(None);
                };
                if gm.shape != um.shape {
                    return Ok(None);
                }
                let n = gm.numel();
                Ok(Some(Desc {
                    fused: None,
                    at: Vec::new(),
                    outs: vec![(sg.out, gm, None)],
                    reads: vec![sg.g, sg.u],
                    disp: vec![ew_disp(
                        "silu_gate",
                        vec![BufRef::Val(sg.g), BufRef::Val(sg.u), BufRef::Val(sg.out)],
                        Params::new().u(n),
                        n,
                    )?],
                }))
            }
            Step::CacheAttention {
                node,
                q,
                past,
                new,
                mask,
                out,
                tokens_first,
            } => {
                let n = &plan.graph.nodes[*node];
                // The kernel reads the projections themselves when the rotary, transposes and casts
                // before this attention were absorbed (see [`AttnIn`]).
                let fin = self.attn_in.get(&si);
                let (q, new, inputs) = match fin {
                    Some(a) => (
                        &a.q,
                        &[a.k, a.v],
                        attention::Inputs::Rope {
                            interleaved: a.interleaved,
                        },
                    ),
                    None => (q, new, attention::Inputs::Graph),
                };
                let (Some(qm), Some(km), Some(vm)) = (f32m(*q), f32m(new[0]), f32m(new[1])) else {
                    return Ok(None);
                };
                let (ck, cv) = (&plan.caches[past[0]], &plan.caches[past[1]]);
                if qm.shape.len() != 4 || ck.dtype != cv.dtype || ck.shape != cv.shape {
                    return Ok(None);
                }
                let (h, t, d) = match fin {
                    Some(_) => (qm.shape[2], qm.shape[1], qm.shape[3]),
                    None => (qm.shape[1], qm.shape[2], qm.shape[3]),
                };
                let (kvh, slots) = (ck.shape[1], ck.shape[2]);
                let rows_shape = match fin {
                    Some(_) => [1, t, kvh, d],
                    None => [1, kvh, t, d],
                };
                if kvh == 0
                    || h % kvh != 0
                    || d % 2 != 0
                    || d > attention::MAX_HEAD_DIM
                    || km.shape != rows_shape
                    || vm.shape != rows_shape
                    || ck.shape[3] != d
                    || !matches!(ck.dtype, DType::F16 | DType::F32)
                    || (fin.is_none() && !self.writes_rows(plan, past, new))
                {
                    if fin.is_some() {
                        return Err(Error::device(DeviceFault::Unsupported, format!(
                            "attention `{}` with its rotary absorbed: inputs {:?} {:?} {:?} do not fit",
                            n.name, qm.shape, km.shape, vm.shape
                        )));
                    }
                    return Ok(None);
                }
                let mut extra = Vec::new();
                if let Some(a) = fin {
                    let (Some(ct), Some(pt)) = (plan.consts[a.cos].as_ref(), e.cpu(a.pos)) else {
                        return Err(Error::device(
                            DeviceFault::Unsupported,
                            format!("attention `{}`: rotary positions or tables missing", n.name),
                        ));
                    };
                    if ct.rank() != 2
                        || ct.shape[1] != d / 2
                        || pt.dtype != DType::I64
                        || pt.numel() != t
                    {
                        return Err(Error::device(
                            DeviceFault::Unsupported,
                            format!(
                                "attention `{}`: rotary tables {:?} or positions {:?} do not fit",
                                n.name, ct.shape, pt.shape
                            ),
                        ));
                    }
                    if !dry {
                        check_positions(n, pt, ct.shape[0])?;
                    }
                    extra = vec![BufRef::Val(a.cos), BufRef::Val(a.sin), BufRef::Val(a.pos)];
                }
                let Some(mv) = mask else { return Ok(None) };
                let Some(mm) = f32m(*mv) else { return Ok(None) };
                let r = mm.shape.len();
                if r < 2
                    || mm.shape[r - 1] != slots + t
                    || mm.shape[r - 2] != t
                    || mm.shape[..r - 2].iter().any(|&x| x != 1)
                {
                    return Ok(None);
                }
                // Visit only the cache prefix the (CPU-computed) mask allows; all slots otherwise.
                let npast = e.mask_prefix(*mv, t, slots).unwrap_or(slots);
                // Keys never exceed the slots (position + chunk ≤ S): one kernel serves every step.
                let rows = self.rows_variant && attention::rows_ok(d, slots);
                let oshape = if *tokens_first {
                    vec![1, t, h, d]
                } else {
                    vec![1, h, t, d]
                };
                let ap = AttnParams {
                    heads: h,
                    kv_heads: kvh,
                    tokens: t,
                    head_dim: d,
                    slots,
                    npast,
                    position,
                    scale: n.attr_float("scale", 1.0 / (d as f32).sqrt()),
                    tokens_first: *tokens_first,
                    write_cache: true,
                    mask_stride: Some(slots + t),
                    segment: None,
                    split: None,
                };
                let f16c = ck.dtype == DType::F16;
                let (seg_rows, nseg) = self.segs(kvh * d * ck.dtype.size(), slots, d)?;
                let binds_to = |o: BufRef| -> Vec<BufRef> {
                    [
                        BufRef::Val(*q),
                        BufRef::Val(new[0]),
                        BufRef::Val(new[1]),
                        BufRef::Val(*mv),
                        BufRef::CacheK(past[0], 0),
                        BufRef::CacheV(past[1], 0),
                        o,
                    ]
                    .into_iter()
                    .chain(extra.iter().copied())
                    .collect()
                };
                let disp = if nseg == 1 && (rows || self.split_keys == 0) {
                    vec![Disp {
                        kernel: k(&|| attention::kernel(ctx, f16c, rows, inputs))?,
                        binds: binds_to(BufRef::Val(*out)),
                        params: ap.params(),
                        groups: attention::groups(ctx, h * t, rows),
                    }]
                } else if nseg == 1 {
                    // One token over many keys: chunks of keys a workgroup each, then the combine
                    // (three slots; a step records the whole attention or the split pair).
                    let ch = self.split_chunk;
                    let nkeys = npast + t;
                    let chunks = nkeys.div_ceil(ch);
                    let split = t == 1 && nkeys >= self.split_keys && chunks >= 2;
                    self.part_need.fetch_max(
                        ((slots + 1).div_ceil(ch) * h * (d + 2) * 4) as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    let sp = AttnParams {
                        split: Some((ch, chunks)),
                        ..ap
                    };
                    let (gx, gy, _) = attention::groups(ctx, h * t, false);
                    let on = |yes: bool, g: (u32, u32, u32)| if yes { g } else { (0, 0, 0) };
                    vec![
                        Disp {
                            kernel: k(&|| attention::kernel(ctx, f16c, false, inputs))?,
                            binds: binds_to(BufRef::Val(*out)),
                            params: ap.params(),
                            groups: on(!split, (gx, gy, 1)),
                        },
                        Disp {
                            kernel: k(&|| attention::kernel(ctx, f16c, false, inputs))?,
                            binds: binds_to(BufRef::Part),
                            params: sp.params(),
                            groups: on(split, (gx, gy, chunks as u32)),
                        },
                        Disp {
                            kernel: k(&|| attention::combine_kernel(ctx))?,
                            binds: vec![BufRef::Part, BufRef::Val(*out)],
                            params: sp.params(),
                            groups: on(split, attention::groups(ctx, h * t, true)),
                        },
                    ]
                } else {
                    // The cache is split over `nseg` buffers: a partial softmax a segment, then one
                    // combine.
                    if d % 4 != 0 || d > attention::MAX_HEAD_DIM {
                        return Ok(None);
                    }
                    self.part_need.fetch_max(
                        (nseg * h * t * (d + 2) * 4) as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    let mut v = Vec::new();
                    for sg in 0..nseg {
                        let seg = attention::Segment {
                            r0: sg * seg_rows,
                            r1: ((sg + 1) * seg_rows).min(slots),
                            with_new: sg + 1 == nseg,
                            index: sg,
                            count: nseg,
                        };
                        v.push(Disp {
                            kernel: k(&|| attention::part_kernel(ctx, f16c, inputs))?,
                            binds: vec![
                                BufRef::Val(*q),
                                BufRef::Val(new[0]),
                                BufRef::Val(new[1]),
                                BufRef::Val(*mv),
                                BufRef::CacheK(past[0], sg),
                                BufRef::CacheV(past[1], sg),
                                BufRef::Part,
                            ]
                            .into_iter()
                            .chain(extra.iter().copied())
                            .collect(),
                            params: AttnParams {
                                segment: Some(seg),
                                ..ap
                            }
                            .params(),
                            groups: attention::groups(ctx, h * t, true),
                        });
                    }
                    v.push(Disp {
                        kernel: k(&|| attention::combine_kernel(ctx))?,
                        binds: vec![BufRef::Part, BufRef::Val(*out)],
                        params: AttnParams {
                            segment: Some(attention::Segment {
                                r0: 0,
                                r1: slots,
                                with_new: true,
                                index: 0,
                                count: nseg,
                            }),
                            ..ap
                        }
                        .params(),
                        groups: attention::groups(ctx, h * t, true),
                    });
                    v
                };
                Ok(Some(Desc {
                    fused: None,
                    at: Vec::new(),
                    outs: vec![(
                        *out,
                        Meta {
                            dtype: DType::F32,
                            shape: oshape,
                        },
                        None,
                    )],
                    reads: [*q, new[0], new[1], *mv]
                        .into_iter()
                        .chain(fin.map(|a| [a.cos, a.sin, a.pos]).into_iter().flatten())
                        .collect(),
                    disp,
                }))
            }
            Step::TokenChoice(c) => {
                let (Some(vm), Some(im)) = (e.meta[c.vals].clone(), e.meta[c.idx].clone()) else {
                    return Ok(None);
                };
                let kk = vm.numel();
                if vm.dtype != DType::F32
                    || im.dtype != DType::I64
                    || vm.shape != [1, kk]
                    || im.shape != vm.shape
                    || kk == 0
                {
                    return Ok(None);
                }
                // The nucleus mass and the draw are parameters (read now: never a kept description).
                let one = |v: ValId| -> Option<f32> {
                    let t = e.cpu(v)?;
                    (t.dtype == DType::F32 && t.numel() == 1).then(|| t.typed::<f32>()[0])
                };
                let (Some(top_p), Some(u)) = (one(c.top_p), one(c.u)) else {
                    return Ok(None);
                };
                let k_in = e.cpu(c.k).map(|t| t.to_i64_vec(&plan.names[c.k]));
                if !matches!(k_in, Some(Ok(ref v)) if v[..] == [kk as i64]) {
                    return Ok(None);
                }
                Ok(Some(Desc {
                    fused: None,
                    at: Vec::new(),
                    outs: vec![(
                        c.out,
                        Meta {
                            dtype: DType::I64,
                            shape: c.out_shape.clone(),
                        },
                        None,
                    )],
                    reads: vec![c.vals, c.idx],
                    disp: vec![Disp {
                        kernel: k(&|| choice::kernel(ctx))?,
                        binds: vec![BufRef::Val(c.vals), BufRef::Val(c.idx), BufRef::Val(c.out)],
                        params: choice::params(kk, top_p, u),
                        groups: (1, 1, 1),
                    }],
                }))
            }
            Step::Node {
                node,
                inputs,
                outputs,
            } => {
                let n = &plan.graph.nodes[*node];
                if !(n.domain.is_empty() || n.domain == "ai.onnx") || outputs.is_empty() {
                    return Ok(None);
                }
                let inp = |i: usize| inputs.get(i).copied().flatten();
                let out = outputs[0];
                // Fused into a neighbour: an Add done by the linear before it; a Transpose read by the
                // rotary after it; the first of two casts done by the second.
                let first_of_pair = if dry {
                    let x = inp(0).and_then(|x| e.meta[x].clone().map(|m| (x, m)));
                    match (self.cand.tr.get(&si), self.cand.round.get(&si), x) {
                        (Some(&(ri, src)), _, Some((_, m)))
                            if m.dtype == DType::F32 && m.shape.len() == 4 =>
                        {
                            Some((ri, src, m))
                        }
                        (_, Some(&(bi, src)), Some((_, m))) if m.dtype == DType::F32 => {
                            Some((bi, src, m))
                        }
                        _ => None,
                    }
                } else if self.skipped.contains(&si) && n.op != "Add" {
                    let src = inp(0).ok_or_else(|| Error::internal("fused step lost its input"))?;
                    let m = e
                        .meta(src)
                        .ok_or_else(|| Error::internal("fused step input missing"))?;
                    Some((0, src, m))
                } else {
                    None
                };
                if self.skipped.contains(&si) && n.op == "Add" {
                    return Ok(Some(Desc::empty()));
                }
                if let Some((other, src, m)) = first_of_pair {
                    let om = if n.op == "Transpose" {
                        Meta {
                            dtype: m.dtype,
                            shape: vec![m.shape[0], m.shape[2], m.shape[1], m.shape[3]],
                        }
                    } else {
                        Meta {
                            dtype: DType::F16,
                            shape: m.shape,
                        }
                    };
                    return Ok(Some(Desc {
                        fused: dry.then_some((other, src)),
                        at: Vec::new(),
                        outs: vec![(out, om, None)],
                        reads: vec![src],
                        disp: Vec::new(),
                    }));
                }
                if let Some(&x) = self.round_src.get(&si) {
                    let Some(xm) = f32m(x) else { return Ok(None) };
                    let nn = xm.numel();
                    return Ok(Some(Desc {
                        fused: None,
                        at: Vec::new(),
                        outs: vec![(out, xm, None)],
                        reads: vec![x],
                        disp: vec![ew_disp(
                            "unary",
                            vec![BufRef::Val(x), BufRef::Dummy, BufRef::Val(out)],
                            Params::new().u(nn).u(UnOp::RoundF16 as usize),
                            nn,
                        )?],
                    }));
                }
                match n.op.as_str() {
                    op if crate::plan::is_view_op(op) => {
                        let Some(x) = inp(0) else { return Ok(None) };
                        let Some(xm) = e.meta[x].clone() else {
                            return Ok(None);
                        };
                        let placeholder = Tensor::shape_only(xm.dtype, &xm.shape);
                        let mut args: Vec<Option<&Tensor>> = vec![Some(&placeholder)];
                        for i in 1..inputs.len() {
                            match inp(i) {
                                Some(v) => match e.cpu(v) {
                                    Some(t) => args.push(Some(t)),
                                    None => return Ok(None),
                                },
                                None => args.push(None),
                            }
                        }
                        let o = ops::run_node(n, &args)?;
                        let m = Meta::of(&o[0]);
                        Ok(Some(Desc {
                            fused: None,
                            at: Vec::new(),
                            outs: vec![(out, m, Some(x))],
                            reads: vec![x],
                            disp: Vec::new(),
                        }))
                    }
                    "Add" | "Sub" | "Mul" | "Div" if inputs.len() == 2 => {
                        let (Some(a), Some(b)) = (inp(0), inp(1)) else {
                            return Ok(None);
                        };
                        let (Some(am), Some(bm)) = (f32m(a), f32m(b)) else {
                            return Ok(None);
                        };
                        let Some(os) = ops::broadcast_shape(&am.shape, &bm.shape) else {
                            return Ok(None);
                        };
                        if os.len() > ew::MAX_RANK {
                            return Ok(None);
                        }
                        let op = BinOp::from_onnx(&n.op).ok_or_else(|| Error::internal("op"))?;
                        let p = ew::binary_params(op, &am.shape, &bm.shape, &os)?;
                        let nn = os.iter().product();
                        Ok(Some(Desc {
                            fused: None,
                            at: Vec::new(),
                            outs: vec![(
                                out,
                                Meta {
                                    dtype: DType::F32,
                                    shape: os,
                                },
                                None,
                            )],
                            reads: vec![a, b],
                            disp: vec![ew_disp(
                                "binary",
                                vec![BufRef::Val(a), BufRef::Val(b), BufRef::Val(out)],
                                p,
                                nn,
                            )?],
                        }))
                    }
                    "Sigmoid" | "Neg" => {
                        let Some(a) = inp(0) else { return Ok(None) };
                        let Some(am) = f32m(a) else { return Ok(None) };
                        let op = if n.op == "Sigmoid" {
                            UnOp::Sigmoid
                        } else {
                            UnOp::Neg
                        };
                        let nn = am.numel();
                        Ok(Some(Desc {
                            fused: None,
                            at: Vec::new(),
                            outs: vec![(out, am, None)],
                            reads: vec![a],
                            disp: vec![ew_disp(
                                "unary",
                                vec![BufRef::Val(a), BufRef::Dummy, BufRef::Val(out)],
                                Params::new().u(nn).u(op as usize),
                                nn,
                            )?],
                        }))
                    }
                    "Cast" => {
                        let Some(a) = inp(0) else { return Ok(None) };
                        let Some(am) = e.meta(a) else { return Ok(None) };
                        let to = DType::from_onnx(n.attr_int("to", 0) as i32);
                        let nn = am.numel();
                        let entry = match (am.dtype, to) {
                            (x, Some(y)) if x == y => {
                                if e.meta[a].is_none() {
                                    return Ok(None);
                                }
                                return Ok(Some(Desc {
                                    fused: None,
                                    at: Vec::new(),
                                    outs: vec![(out, am, Some(a))],
                                    reads: vec![a],
                                    disp: Vec::new(),
                                }));
                            }
                            (DType::F32, Some(DType::F16)) => ("cast_to_f16", nn.div_ceil(2)),
                            (DType::F16, Some(DType::F32)) => ("cast_from_f16", nn),
                            // Byte elements need a GPU source: a host value casts on the host.
                            (DType::U8, Some(DType::F32)) if e.meta[a].is_some() => {
                                ("cast_from_u8", nn)
                            }
                            (DType::I8, Some(DType::F32)) if e.meta[a].is_some() => {
                                ("cast_from_i8", nn)
                            }
                            _ => return Ok(None),
                        };
                        let to = to.unwrap_or(DType::F32);
                        Ok(Some(Desc {
                            fused: None,
                            at: Vec::new(),
                            outs: vec![(
                                out,
                                Meta {
                                    dtype: to,
                                    shape: am.shape,
                                },
                                None,
                            )],
                            reads: vec![a],
                            disp: vec![ew_disp(
                                entry.0,
                                vec![BufRef::Val(a), BufRef::Dummy, BufRef::Val(out)],
                                Params::new().u(nn),
                                entry.1,
                            )?],
                        }))
                    }
                    "Transpose" => {
                        let Some(a) = inp(0) else { return Ok(None) };
                        let Some(am) = e.meta(a) else { return Ok(None) };
                        let r = am.shape.len();
                        let perm: Vec<usize> = match n.attr_ints("perm") {
                            Some(p) => p.iter().map(|&x| x as usize).collect(),
                            None => (0..r).rev().collect(),
                        };
                        let mut sorted = perm.clone();
                        sorted.sort_unstable();
                        if sorted != (0..r).collect::<Vec<_>>() {
                            return Ok(None);
                        }
                        let oshape: Vec<usize> = perm.iter().map(|&p| am.shape[p]).collect();
                        let (entry, shape, perm, items) = match am.dtype.size() {
                            4 => ("transpose32", am.shape.clone(), perm, am.numel()),
                            2 => (
                                "transpose16",
                                am.shape.clone(),
                                perm,
                                am.numel().div_ceil(2),
                            ),
                            8 => {
                                let mut s = am.shape.clone();
                                s.push(2);
                                let mut p = perm.clone();
                                p.push(r);
                                ("transpose32", s, p, am.numel() * 2)
                            }
                            _ => return Ok(None),
                        };
                        if shape.len() > ew::MAX_RANK {
                            return Ok(None);
                        }
                        let p = ew::transpose_params(&shape, &perm)?;
                        Ok(Some(Desc {
                            fused: None,
                            at: Vec::new(),
                            outs: vec![(
                                out,
                                Meta {
                                    dtype: am.dtype,
                                    shape: oshape,
                                },
                                None,
                            )],
                            reads: vec![a],
                            disp: vec![ew_disp(
                                entry,
                                vec![BufRef::Val(a), BufRef::Dummy, BufRef::Val(out)],
                                p,
                                items,
                            )?],
                        }))
                    }
                    "Gather" => {
                        let (Some(d), Some(ix)) = (inp(0), inp(1)) else {
                            return Ok(None);
                        };
                        let Some(dm) = e.meta(d) else { return Ok(None) };
                        let Some(im) = e.meta(ix) else {
                            return Ok(None);
                        };
                        // The data on the GPU already, or a constant table (an embedding) that is
                        // loaded once and fits one binding.
                        let table = self.gather_table(plan, d);
                        if n.attr_int("axis", 0) != 0
                            || dm.shape.is_empty()
                            || im.dtype != DType::I64
                            || (e.meta[d].is_none() && !table)
                        {
                            return Ok(None);
                        }
                        let row_bytes = dm.shape[1..].iter().product::<usize>() * dm.dtype.size();
                        let rows = dm.shape[0] as i64;
                        // Indices the host holds are checked here; ones on the GPU (a fed-back
                        // token) are in range by construction, and the kernel gives zeros if not.
                        if e.meta[ix].is_none() {
                            let Some(it) = e.cpu(ix) else { return Ok(None) };
                            if !dry && it.typed::<i64>().iter().any(|&i| i < -rows || i >= rows) {
                                return Err(Error::node(
                                    &n.name,
                                    &n.op,
                                    format!("index out of range for {rows} rows"),
                                ));
                            }
                        }
                        let mut shape = im.shape.clone();
                        shape.extend_from_slice(&dm.shape[1..]);
                        let nidx = im.numel();
                        let (entry, unit) = if row_bytes % 4 == 0 {
                            ("gather_rows", 4)
                        } else {
                            ("gather_bytes", 1)
                        };
                        let words = row_bytes / unit;
                        let threads = (nidx * row_bytes).div_ceil(4);
                        Ok(Some(Desc {
                            fused: None,
                            at: Vec::new(),
                            outs: vec![(
                                out,
                                Meta {
                                    dtype: dm.dtype,
                                    shape,
                                },
                                None,
                            )],
                            reads: vec![d, ix],
                            disp: vec![ew_disp(
                                entry,
                                vec![BufRef::Val(d), BufRef::Val(ix), BufRef::Val(out)],
                                Params::new().u(nidx).u(words).u(dm.shape[0]),
                                threads,
                            )?],
                        }))
                    }
                    "RMSNormalization" => {
                        let (Some(x), Some(w)) = (inp(0), inp(1)) else {
                            return Ok(None);
                        };
                        let Some(xm) = f32m(x) else { return Ok(None) };
                        let Some(wt) = plan.consts[w].as_ref() else {
                            return Ok(None);
                        };
                        let r = xm.shape.len();
                        let ax = n.attr_int("axis", -1);
                        let h = *xm.shape.last().unwrap_or(&0);
                        if r == 0
                            || !(ax == -1 || ax == r as i64 - 1)
                            || wt.dtype != DType::F32
                            || wt.numel() != h
                            || n.attr_int("stash_type", 1) != 1
                        {
                            return Ok(None);
                        }
                        let rows = xm.numel() / h.max(1);
                        let (gx, gy) = grid(rows, 1, ctx.max_groups);
                        Ok(Some(Desc {
                            fused: None,
                            at: Vec::new(),
                            outs: vec![(out, xm, None)],
                            reads: vec![x, w],
                            disp: vec![Disp {
                                kernel: k(&|| norm::kernel(ctx))?,
                                binds: vec![BufRef::Val(x), BufRef::Val(w), BufRef::Val(out)],
                                params: norm::params(rows, h, n.attr_float("epsilon", 1e-5)),
                                groups: (gx, gy, 1),
                            }],
                        }))
                    }
                    "RotaryEmbedding" => {
                        let (Some(x0), Some(c), Some(sn), Some(pv)) =
                            (inp(0), inp(1), inp(2), inp(3))
                        else {
                            return Ok(None);
                        };
                        // After a fused transpose the input is still [1, T, H, D].
                        let tf = self.tr_src.get(&si).copied();
                        let x = tf.unwrap_or(x0);
                        let Some(mut xm) = f32m(x) else {
                            return Ok(None);
                        };
                        if tf.is_some() && xm.shape.len() == 4 {
                            xm.shape = vec![xm.shape[0], xm.shape[2], xm.shape[1], xm.shape[3]];
                        }
                        let (Some(ct), Some(st)) =
                            (plan.consts[c].as_ref(), plan.consts[sn].as_ref())
                        else {
                            return Ok(None);
                        };
                        let Some(pt) = e.cpu(pv) else { return Ok(None) };
                        if xm.shape.len() != 4
                            || xm.shape[0] != 1
                            || ct.dtype != DType::F32
                            || st.dtype != DType::F32
                            || ct.rank() != 2
                            || st.shape != ct.shape
                            || pt.dtype != DType::I64
                        {
                            return Ok(None);
                        }
                        let (h, t, d) = (xm.shape[1], xm.shape[2], xm.shape[3]);
                        let rot = match n.attr_int("rotary_embedding_dim", 0) {
                            0 => d,
                            r if r > 0 => r as usize,
                            _ => return Ok(None),
                        };
                        if rot % 2 != 0 || rot > d || ct.shape[1] != rot / 2 || pt.numel() != t {
                            return Ok(None);
                        }
                        if !dry {
                            check_positions(n, pt, ct.shape[0])?;
                        }
                        let nn = h * t * d;
                        let (gx, gy) = grid(nn, 256, ctx.max_groups);
                        Ok(Some(Desc {
                            fused: None,
                            at: Vec::new(),
                            outs: vec![(out, xm, None)],
                            reads: vec![x, c, sn, pv],
                            disp: vec![Disp {
                                kernel: k(&|| rope::kernel(ctx))?,
                                binds: vec![
                                    BufRef::Val(x),
                                    BufRef::Val(c),
                                    BufRef::Val(sn),
                                    BufRef::Val(pv),
                                    BufRef::Val(out),
                                ],
                                params: rope::params(
                                    h,
                                    t,
                                    d,
                                    rot,
                                    n.attr_int("interleaved", 0) != 0,
                                    tf.is_some(),
                                ),
                                groups: (gx, gy, 1),
                            }],
                        }))
                    }
                    "TopK" if outputs.len() == 2 => {
                        let (Some(x), Some(kv)) = (inp(0), inp(1)) else {
                            return Ok(None);
                        };
                        let Some(xm) = f32m(x) else { return Ok(None) };
                        let Some(kt) = e.cpu(kv) else { return Ok(None) };
                        let r = xm.shape.len();
                        let ax = n.attr_int("axis", -1);
                        if r == 0
                            || !(ax == -1 || ax == r as i64 - 1)
                            || n.attr_int("largest", 1) != 1
                            || n.attr_int("sorted", 1) != 1
                        {
                            return Ok(None);
                        }
                        let v = xm.shape[r - 1];
                        let rows = xm.numel() / v.max(1);
                        // Rows longer than MAX_K have the sort's slots (their number is fixed by the
                        // row length); it runs when there is one row (the token choice's) and the
                        // indices' buffer holds all of it (planned so at load).
                        let sorts = v > select::MAX_K;
                        let sortable = sorts
                            && rows == 1
                            && (self.home[outputs[1]]).is_some_and(|h| {
                                self.offs[outputs[1]] + (v * 8) as u64 <= self.caps[h]
                            });
                        let kk = match kt.to_i64_vec(&n.name)?[..] {
                            [k] if k >= 1 && (k as usize <= select::MAX_K || sortable || dry) => {
                                k as usize
                            }
                            _ => return Ok(None),
                        };
                        if v < kk || rows > ctx.max_groups as usize {
                            return Ok(None);
                        }
                        let mut os = xm.shape.clone();
                        os[r - 1] = kk;
                        // Two slots, the arg-max (k = 1) and the k rounds; a step records the one its k
                        // takes (the buffers are sized for MAX_K at load).
                        let binds = vec![
                            BufRef::Val(x),
                            BufRef::Val(outputs[0]),
                            BufRef::Val(outputs[1]),
                        ];
                        let slot = |kernel, on: bool| Disp {
                            kernel,
                            binds: binds.clone(),
                            params: select::params(rows, v, kk),
                            groups: (if on { rows as u32 } else { 0 }, 1, 1),
                        };
                        let mut disp = vec![
                            slot(k(&|| select::kernel(ctx, 1))?, kk == 1),
                            slot(
                                k(&|| select::kernel(ctx, 2))?,
                                1 < kk && kk <= select::MAX_K,
                            ),
                        ];
                        // The sort's slots follow whatever k this step has (their number is v's).
                        if sorts {
                            let on = kk > select::MAX_K;
                            for d in select::sort_schedule(v, kk) {
                                let groups = if d.entry == "sort_local" {
                                    (d.items as u32, 1)
                                } else {
                                    grid(d.items, 256, ctx.max_groups)
                                };
                                disp.push(Disp {
                                    kernel: k(&|| select::entry_kernel(ctx, d.entry))?,
                                    binds: binds.clone(),
                                    params: d.params,
                                    groups: (if on { groups.0 } else { 0 }, groups.1, 1),
                                });
                            }
                        }
                        Ok(Some(Desc {
                            fused: None,
                            at: Vec::new(),
                            outs: vec![
                                (
                                    outputs[0],
                                    Meta {
                                        dtype: DType::F32,
                                        shape: os.clone(),
                                    },
                                    None,
                                ),
                                (
                                    outputs[1],
                                    Meta {
                                        dtype: DType::I64,
                                        shape: os,
                                    },
                                    None,
                                ),
                            ],
                            reads: vec![x],
                            disp,
                        }))
                    }
                    _ => Ok(None),
                }
            }
        }
    }

    /// Whether the attention's new-row inputs are exactly the cache outputs (directly, or through a Cast to
    /// f32 of an f16 output) — then writing them back into the cache reproduces the graph's outputs.
    /// A fused linear group's one dispatch (see [`LinGroup`]).
    fn describe_group(&self, si: usize, gr: &GpuGroup, e: &Env, dry: bool) -> Result<Desc> {
        use super::linear::FusedOut;
        let g = self.linear(si)?;
        let xin = gr.norm.map_or(gr.x, |n| n.0);
        let name = &gr.name;
        let xm = e
            .meta(xin)
            .filter(|m| m.dtype == DType::F32 && m.shape.last() == Some(&g.k))
            .ok_or_else(|| {
                Error::device(
                    DeviceFault::Unsupported,
                    format!(
                        "fused linear `{name}`: its input `{}` is not f32 [.., {}]",
                        e.plan.names[xin], g.k
                    ),
                )
            })?;
        let m = xm.numel() / g.k.max(1);
        let meta = |n: usize| {
            let mut shape = xm.shape.clone();
            if let Some(l) = shape.last_mut() {
                *l = n;
            }
            Meta {
                dtype: DType::F32,
                shape,
            }
        };
        let mut at = Vec::new();
        let (out, outs) = if let Some(so) = gr.silu_out {
            (FusedOut::SiluPair, vec![(so, meta(g.n / 2), None)])
        } else if gr.members.len() == 1 {
            (FusedOut::One, vec![(gr.members[0].1, meta(g.n), None)])
        } else {
            let mut bases = gr
                .bases
                .lock()
                .map_err(|_| Error::internal("group lock poisoned"))?;
            if dry {
                // Each member's [T, rows] at an offset a binding may start at.
                let align = (self.ctx.device.limits().min_storage_buffer_offset_alignment as usize
                    / 4)
                .max(1);
                bases.clear();
                let mut b = 0;
                for mb in &gr.members {
                    bases.push(b);
                    b = (b + m * mb.2).next_multiple_of(align);
                }
            }
            let o0 = gr.members[0].1;
            let mut outs = Vec::new();
            for (mb, &b) in gr.members.iter().zip(bases.iter()) {
                outs.push((mb.1, meta(mb.2), (mb.1 != o0).then_some(o0)));
                at.push((mb.1, 4 * b as u64));
            }
            (
                FusedOut::Parts(
                    gr.members
                        .iter()
                        .zip(bases.iter())
                        .map(|(mb, &b)| (mb.2, b))
                        .collect(),
                ),
                outs,
            )
        };
        let target = outs[0].0;
        let mut reads = vec![xin];
        let aux = match gr.norm {
            Some((_, w, _)) => {
                reads.push(w);
                BufRef::Val(w)
            }
            None => BufRef::Dummy,
        };
        let pick = g.fused_pick(m);
        let disp = gr
            .kernels
            .iter()
            .enumerate()
            .map(|(j, kernel)| Disp {
                kernel: dry.then(|| kernel.clone()),
                binds: vec![
                    BufRef::Val(xin),
                    BufRef::LinW(0),
                    BufRef::LinS(0),
                    BufRef::LinZ(0),
                    BufRef::LinBias,
                    aux,
                    BufRef::Val(target),
                ],
                params: g.fused_params(m, &out, gr.norm.map(|n| n.2)),
                // The slot not taken this step records nothing.
                groups: if j == pick {
                    g.fused_groups(m, &out, self.ctx.max_groups)
                } else {
                    (0, 0, 0)
                },
            })
            .collect();
        Ok(Desc {
            fused: None,
            at,
            outs,
            reads,
            disp,
        })
    }

    fn writes_rows(&self, plan: &Plan, past: &[usize; 2], new: &[ValId; 2]) -> bool {
        (0..2).all(|j| {
            let c = &plan.caches[past[j]];
            if new[j] == c.output_val {
                return c.dtype == DType::F32;
            }
            plan.steps.iter().any(|s| match s {
                Step::Node {
                    node,
                    inputs,
                    outputs,
                } => {
                    let n = &plan.graph.nodes[*node];
                    n.op == "Cast"
                        && outputs.first() == Some(&new[j])
                        && inputs.first().copied().flatten() == Some(c.output_val)
                        && n.attr_int("to", 0) == DType::F32.onnx_code() as i64
                        && c.dtype == DType::F16
                }
                _ => false,
            })
        })
    }

    /// Whether step `f` (begun, not finished) can have the next one run ahead of it (see
    /// [`GpuPlan::begin`]): the plan feeds its token ids from its token choice, `f` is a decode step
    /// whose token choice ran on the GPU and was saved for the next step,
    /// every cache layer is resident, nothing is profiled, and [`super::GpuOptions::run_ahead`] is on.
    pub fn can_run_ahead(&self, state: &GpuState, f: &Flight) -> bool {
        self.ahead && f.tokens == 1 && state.streams.is_empty() && f.token_saved
    }

    /// Records and submits a step up to its first read-back (the host tail of the token choice) and
    /// returns it in flight; [`GpuPlan::finish`] waits for it and runs the rest. `env` holds the graph
    /// inputs; after `finish` it holds the CPU-side values (the outputs the caller reads: `next_token`,
    /// and `logits` when `want` lists it). `cpu_step` runs a step on the CPU.
    ///
    /// The KV cache: `host` holds every cache's rows before `position`; streamed layers' missing pages
    /// are uploaded on the way (see [`GpuState`]), and the chunk's `tokens` new rows of every cache come
    /// back into `host` at `position`.
    ///
    /// With `after` (a decode step in flight, see [`GpuPlan::can_run_ahead`]) this step runs ahead of
    /// it: its token ids are not in `env` (a placeholder of one token is) but copied on the GPU from
    /// `after`'s chosen token ([`Feed::token`]), so the GPU goes on with this step while the host
    /// finishes `after`. Whether the guess holds — the token `after` chose is that element, and the
    /// caller's inputs are the ones assumed — is for the caller to check ([`GpuPlan::finish`],
    /// [`GpuPlan::holds_for`]); a step that does not is dropped unfinished (its cache rows past the
    /// sequence are overwritten by the real step).
    #[allow(clippy::too_many_arguments)]
    pub fn begin(
        &self,
        plan: &Plan,
        state: &GpuState,
        host: &crate::kv::PagedCache,
        env: Vec<Option<Tensor>>,
        position: usize,
        tokens: usize,
        want: &[ValId],
        cpu_step: &mut CpuStep,
        after: Option<&Flight>,
    ) -> Result<Flight> {
        let r = self.begin_inner(
            plan, state, host, env, position, tokens, want, cpu_step, after,
        );
        self.forget_slots_on_error(state, r)
    }

    /// Completes a step [`GpuPlan::begin`] returned: waits for its read-back, runs the rest, writes its
    /// new cache rows into `host` and returns the CPU-side values (the outputs the caller reads), with
    /// the token its token choice put first on the GPU (what a step run ahead of it was fed; `None` when
    /// the choice ran on the host).
    pub fn finish(
        &self,
        plan: &Plan,
        state: &GpuState,
        host: &mut crate::kv::PagedCache,
        f: Flight,
        cpu_step: &mut CpuStep,
    ) -> Result<(Vec<Option<Tensor>>, Option<i64>)> {
        let r = self.finish_inner(plan, state, host, f, cpu_step);
        self.forget_slots_on_error(state, r)
    }

    /// `r`; when it is an error, what the slots hold is unknown after the failed step: everything is
    /// uploaded next time.
    fn forget_slots_on_error<T>(&self, state: &GpuState, r: Result<T>) -> Result<T> {
        if r.is_err() {
            if let Ok(mut h) = state.held.lock() {
                for e in h.iter_mut().filter(|e| e.1 != usize::MAX) {
                    *e = (None, 0);
                }
            }
        }
        r
    }

    /// Whether `f`, run ahead, holds for a call with these graph inputs (`input` from the caller's
    /// `input_env`; the ids are checked by the caller against [`GpuPlan::finish`]): its position, its
    /// wanted outputs, and every input read before its read-back equal. Inputs read only after it (the
    /// sampling draw) are then taken from `input`.
    pub fn holds_for(
        &self,
        f: &mut Flight,
        input: &[Option<Tensor>],
        position: usize,
        want: &[ValId],
    ) -> bool {
        let Some(feed) = &self.feed else { return false };
        let same = |a: Option<&Tensor>, b: Option<&Tensor>| match (a, b) {
            (Some(a), Some(b)) => {
                a.dtype == b.dtype && a.shape == b.shape && a.bytes() == b.bytes()
            }
            (None, None) => true,
            _ => false,
        };
        if f.position != position
            || f.want != want
            || !feed
                .early
                .iter()
                .zip(&f.early)
                .all(|(&v, begun)| same(begun.as_ref(), input[v].as_ref()))
        {
            return false;
        }
        for &v in &feed.late {
            f.env[v] = input[v].clone();
        }
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn begin_inner(
        &self,
        plan: &Plan,
        state: &GpuState,
        host: &crate::kv::PagedCache,
        env: Vec<Option<Tensor>>,
        position: usize,
        tokens: usize,
        want: &[ValId],
        cpu_step: &mut CpuStep,
        after: Option<&Flight>,
    ) -> Result<Flight> {
        if host.caches.len() != state.home.len() {
            return Err(Error::internal(format!(
                "host cache has {} tensors, the GPU state {}",
                host.caches.len(),
                state.home.len()
            )));
        }
        let kv = Kv {
            held: state
                .held
                .lock()
                .map_err(|_| Error::internal("cache lock poisoned"))?
                .clone(),
            up_at: vec![None; state.streams.len()],
            stalls: 0,
            up: 0,
            down: 0,
            off: 0,
            downs: Vec::new(),
            ndisp: 0,
        };
        let nvals = plan.names.len();
        let mut f = Flight {
            early: Vec::new(),
            env,
            meta: vec![None; nvals],
            params: Vec::new(),
            pending: Vec::new(),
            count: Counts::default(),
            kv,
            described: 0,
            t_step: std::time::Instant::now(),
            rows_back: None,
            submitted: 0,
            position,
            tokens,
            want: want.to_vec(),
            next: 0,
            read: None,
            parity: 0,
            fed: None,
            token_saved: false,
            ahead: after.is_some(),
        };
        if let Some(a) = after {
            let feed = self
                .feed
                .as_ref()
                .filter(|_| self.can_run_ahead(state, a))
                .ok_or_else(|| Error::internal("this step cannot run ahead"))?;
            if a.position + a.tokens != position {
                return Err(Error::internal(format!(
                    "a step at {position} cannot run ahead of one at {}",
                    a.position
                )));
            }
            let to = self.home[feed.ids]
                .ok_or_else(|| Error::internal("the fed token ids have no GPU buffer"))?;
            f.parity = 1 - a.parity;
            f.fed = Some(feed.ids);
            f.early = feed.early.iter().map(|&v| f.env[v].clone()).collect();
            f.pending.push(Cmd::Feed {
                to,
                to_off: self.offs[feed.ids],
            });
        }
        for i in 0..state.nslots.min(state.streams.len()) {
            f.kv.prefetch(state, host, i, position, &mut f.pending)?;
        }
        self.drive(plan, state, host, &mut f, true, cpu_step)?;
        Ok(f)
    }

    fn finish_inner(
        &self,
        plan: &Plan,
        state: &GpuState,
        host_mut: &mut crate::kv::PagedCache,
        mut f: Flight,
        cpu_step: &mut CpuStep,
    ) -> Result<(Vec<Option<Tensor>>, Option<i64>)> {
        if let Some(read) = f.read.take() {
            self.receive(state, &mut f, read)?;
        }
        self.drive(plan, state, host_mut, &mut f, false, cpu_step)?;
        // The first of the token choice's indices, when the choice ran on the GPU in this step.
        let fed = self.feed.as_ref().and_then(|feed| {
            f.meta[feed.token].as_ref()?;
            let t = f.env[feed.token].as_ref()?;
            (t.dtype == DType::I64).then(|| t.typed::<i64>().first().copied())?
        });
        let rows = f.rows_back.take().unwrap_or_default();
        // Every cache's new rows, in the order they were copied, into the host pages.
        for &(c, off) in &f.kv.downs {
            let n = f.tokens * host_mut.caches[c].row_bytes();
            let piece = rows
                .get(off as usize..off as usize + n)
                .ok_or_else(|| Error::internal("cache rows were not read back"))?;
            host_mut.caches[c].write_rows(f.position, f.tokens, piece)?;
        }
        let mut kv = f.kv;
        // Slots that were current now also hold this chunk's rows (as the host does).
        for e in kv.held.iter_mut() {
            if e.0.is_some() && e.1 == f.position {
                e.1 = f.position + f.tokens;
            }
        }
        *state
            .held
            .lock()
            .map_err(|_| Error::internal("cache lock poisoned"))? = kv.held;
        if let Ok(mut k) = state.stats.lock() {
            k.step_bytes_up = kv.up;
            k.step_bytes_down = kv.down;
            k.step_stalls = kv.stalls;
            k.step_pack_ms = f.count.pack_ms;
            k.steps += 1;
            k.bytes_up += kv.up;
            k.bytes_down += kv.down;
            k.stalls += kv.stalls;
        }
        let mut stats = self
            .lock
            .lock()
            .map_err(|_| Error::internal("executor lock poisoned"))?;
        let Counts {
            dispatches,
            submits,
            waits,
            up,
            down,
            wait,
            ..
        } = f.count;
        stats.step_ms = f.t_step.elapsed().as_secs_f64() * 1e3;
        if let Ok(mut sm) = self.submit_ms.lock() {
            stats.submit_ms = *sm;
            *sm = 0.0;
        }
        stats.wait_ms = wait;
        stats.described = f.described;
        stats.dispatches = dispatches;
        stats.submits = submits;
        stats.waits = waits;
        stats.bytes_up = up;
        stats.bytes_down = down;
        stats.ahead = f.ahead;
        if f.ahead {
            stats.ahead_steps += 1;
        }
        Ok((f.env, fed))
    }

    /// Counts a step run ahead that did not hold (dropped unfinished).
    pub fn missed_ahead(&self) {
        if let Ok(mut s) = self.lock.lock() {
            s.ahead_missed += 1;
        }
    }

    /// Runs `f`'s steps from where it stands. With `pause`, it stops at the first step that must wait
    /// for the GPU (or at the end), leaving the read-back submitted in `f.read`; without, it runs to the
    /// end, the new cache rows read back.
    fn drive(
        &self,
        plan: &Plan,
        state: &GpuState,
        host: &crate::kv::PagedCache,
        f: &mut Flight,
        pause: bool,
        cpu_step: &mut CpuStep,
    ) -> Result<()> {
        let prefix = std::cell::Cell::new(None);
        // The executor is one per model: recording (and what the GPU buffers hold between submissions)
        // is one step at a time; waits and host tails of different sequences may overlap.
        let _rec = self
            .recording
            .lock()
            .map_err(|_| Error::internal("executor lock poisoned"))?;
        let mut kept_all = self
            .kept
            .lock()
            .map_err(|_| Error::internal("description cache lock poisoned"))?;
        if !kept_all.contains_key(&f.tokens) && kept_all.len() >= KEPT_SIZES {
            kept_all.clear();
        }
        let kept = kept_all
            .entry(f.tokens)
            .or_insert_with(|| (0..plan.steps.len()).map(|_| None).collect());
        while f.next < plan.steps.len() {
            let si = f.next;
            let s = &plan.steps[si];
            let fresh: Option<Desc>;
            let desc: Option<&Desc> = if self.on_gpu[si] {
                let e = Env::new(plan, &f.env, &f.meta, &prefix);
                let hit = kept[si]
                    .as_ref()
                    .is_some_and(|k| k.reads.iter().all(|(v, m)| e.meta_is(*v, m)));
                if hit {
                    kept[si].as_ref().map(|k| &k.desc)
                } else {
                    let d = self.describe(si, s, &e, false, f.position)?;
                    f.described += 1;
                    let keep = !e.looked.get() && !matches!(s, Step::CacheAttention { .. });
                    match d {
                        Some(d) if keep => {
                            let reads = d
                                .reads
                                .iter()
                                .filter_map(|&v| e.meta(v).map(|m| (v, m)))
                                .collect();
                            kept[si] = Some(Kept { desc: d, reads });
                            kept[si].as_ref().map(|k| &k.desc)
                        }
                        d => {
                            kept[si] = None;
                            fresh = d;
                            fresh.as_ref()
                        }
                    }
                }
            } else {
                None
            };
            match desc {
                Some(d) => {
                    for &v in &d.reads {
                        if f.meta[v].is_some() || self.const_loaded[v] {
                            continue;
                        }
                        let t = f.env[v].as_ref().ok_or_else(|| {
                            Error::internal(format!(
                                "`{}` is neither on the GPU nor on the CPU",
                                plan.names[v]
                            ))
                        })?;
                        if f.fed == Some(v) {
                            // Filled on the GPU by the step's first command (the fed token).
                            f.meta[v] = Some(Meta::of(t));
                            continue;
                        }
                        let h = self.home[v].ok_or_else(|| {
                            Error::internal(format!("`{}` has no GPU buffer", plan.names[v]))
                        })?;
                        let b = t.bytes();
                        if self.offs[v] != 0 {
                            return Err(Error::internal(format!(
                                "`{}` is a part of a fused output and cannot be uploaded",
                                plan.names[v]
                            )));
                        }
                        if b.len() as u64 > self.caps[h] {
                            return Err(Error::internal(format!(
                                "`{}` needs {} bytes, {} were planned",
                                plan.names[v],
                                b.len(),
                                self.caps[h]
                            )));
                        }
                        write_padded(&self.ctx.queue, &self.bufs[h], b);
                        f.count.up += b.len() as u64;
                        f.meta[v] = Some(Meta::of(t));
                    }
                    for &(o, ref m, _) in &d.outs {
                        let h = self.home[o].ok_or_else(|| {
                            Error::internal(format!("`{}` has no GPU buffer", plan.names[o]))
                        })?;
                        if self.offs[o] + m.bytes() > self.caps[h] {
                            return Err(Error::internal(format!(
                                "`{}` needs {} bytes, {} were planned",
                                plan.names[o],
                                self.offs[o] + m.bytes(),
                                self.caps[h]
                            )));
                        }
                        f.meta[o] = Some(m.clone());
                        f.env[o] = None;
                    }
                    let past = match s {
                        Step::CacheAttention { past, .. } => Some(*past),
                        _ => None,
                    };
                    if let Some(past) = past {
                        f.kv.before_attention(state, past);
                    }
                    if d.disp.len() != self.kernels[si].len() {
                        return Err(Error::internal(format!(
                            "step {si} described {} dispatches, {} were planned",
                            d.disp.len(),
                            self.kernels[si].len()
                        )));
                    }
                    for (j, dd) in d.disp.iter().enumerate() {
                        let slot = self.slot0[si] + j;
                        let at = slot * 256;
                        if f.params.len() < at + 256 {
                            f.params.resize(at + 256, 0);
                        }
                        if dd.groups.0 == 0 {
                            continue;
                        }
                        f.params[at..at + 256].copy_from_slice(dd.params.bytes());
                        f.pending.push(Cmd::Disp(si, j, dd.groups));
                        f.kv.ndisp += 1;
                    }
                    if let Some(past) = past {
                        // This layer's new rows go back to the host; its slot's next user's pages go up.
                        for c in past {
                            let rb = host.caches[c].row_bytes();
                            f.pending.push(Cmd::Down {
                                c,
                                p: f.position,
                                t: f.tokens,
                                off: f.kv.off,
                                parity: f.parity,
                            });
                            f.kv.downs.push((c, f.kv.off));
                            f.kv.off += (rb * f.tokens) as u64;
                            f.kv.down += (rb * f.tokens) as u64;
                        }
                        if let Some(i) = state.ring[past[0]] {
                            if i + state.nslots < state.streams.len() {
                                f.kv.prefetch(
                                    state,
                                    host,
                                    i + state.nslots,
                                    f.position,
                                    &mut f.pending,
                                )?;
                            }
                        }
                    }
                    // Enough queued: the GPU starts on it while the rest of the step is recorded.
                    if self.submit_every > 0
                        && f.kv.ndisp - f.submitted >= self.submit_every
                        && self.last_gpu.is_some_and(|l| si < l)
                    {
                        self.submit_early(state, host, &mut f.pending, &f.params, &mut f.count)?;
                        f.submitted = f.kv.ndisp;
                    }
                }
                None => {
                    let reads = crate::plan::step_reads(s);
                    let on_gpu = |v: ValId| f.env[v].is_none() && f.meta[v].is_some();
                    let mut fetch: Vec<ValId> =
                        reads.iter().copied().filter(|&v| on_gpu(v)).collect();
                    if !fetch.is_empty() {
                        for &(sj, v) in &self.cpu_reads {
                            if sj > si && on_gpu(v) && !fetch.contains(&v) {
                                fetch.push(v);
                            }
                        }
                        let last = self.last_gpu.is_none_or(|l| si >= l);
                        if last {
                            for &v in &f.want {
                                if on_gpu(v) && !fetch.contains(&v) {
                                    fetch.push(v);
                                }
                            }
                        }
                        let rows = if last { f.kv.off } else { 0 };
                        let read = self.send(state, host, f, &fetch, rows, last)?;
                        if pause {
                            f.read = Some(read);
                            return Ok(());
                        }
                        self.receive(state, f, read)?;
                    }
                    cpu_step(s, &mut f.env)?;
                    if let Step::Node { outputs, .. } = s {
                        for &o in outputs {
                            f.meta[o] = None;
                        }
                    }
                }
            }
            f.next += 1;
        }
        let fetch: Vec<ValId> = f
            .want
            .iter()
            .copied()
            .filter(|&v| f.env[v].is_none() && f.meta[v].is_some())
            .collect();
        // The rows, unless the read-back after the last GPU step brought them already.
        let rows_left = if f.rows_back.is_none() { f.kv.off } else { 0 };
        if !f.pending.is_empty() || !fetch.is_empty() || rows_left > 0 {
            let read = self.send(state, host, f, &fetch, rows_left, true)?;
            if pause {
                f.read = Some(read);
                return Ok(());
            }
            self.receive(state, f, read)?;
        }
        Ok(())
    }

    /// Records `cmds` into `enc`: runs of dispatches in one compute pass each, cache uploads (through the
    /// state's staging belt) and row copies between them, in order.
    fn record(
        &self,
        enc: &mut wgpu::CommandEncoder,
        state: &GpuState,
        host: &crate::kv::PagedCache,
        cmds: &[Cmd],
        count: &mut Counts,
        mut timed: Option<(&Stamps, &mut Vec<(usize, usize)>)>,
    ) -> Result<()> {
        let mut i = 0;
        while i < cmds.len() {
            match cmds[i] {
                Cmd::Disp(..) => {
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("step"),
                        timestamp_writes: None,
                    });
                    while let Some(&Cmd::Disp(si, j, (x, y, z))) = cmds.get(i) {
                        let g = match &self.groups[si][j] {
                            Some(g) => g,
                            None => state.groups.get(&(si, j)).ok_or_else(|| {
                                Error::internal("state has no bind group for an attention step")
                            })?,
                        };
                        pass.set_pipeline(&self.kernels[si][j].pipeline);
                        pass.set_bind_group(0, g, &[]);
                        let stamp = match &mut timed {
                            Some((st, done)) if done.len() < st.cap => {
                                let q = 2 * done.len() as u32;
                                done.push((si, j));
                                Some((&st.set, q))
                            }
                            _ => None,
                        };
                        if let Some((set, q)) = stamp {
                            pass.write_timestamp(set, q);
                        }
                        pass.dispatch_workgroups(x, y, z);
                        if let Some((set, q)) = stamp {
                            pass.write_timestamp(set, q + 1);
                        }
                        count.dispatches += 1;
                        i += 1;
                    }
                }
                Cmd::Up { c, a, b } => {
                    let t0 = std::time::Instant::now();
                    let pages = &host.caches[c];
                    let rb = pages.row_bytes() as u64;
                    let mut belt = state
                        .belt
                        .lock()
                        .map_err(|_| Error::internal("staging lock poisoned"))?;
                    state.for_pieces(c, a, b, |buf, la, lo, hi| {
                        let (at, n) = (la as u64 * rb, (hi - lo) as u64 * rb);
                        let Some(size) = copy_range(buf, at, n)? else {
                            return Ok(());
                        };
                        let mut view = belt.write_buffer(enc, buf, at, size);
                        pages.for_range(lo, hi, |p, bytes| {
                            let o = (p - lo) * rb as usize;
                            view.slice(o..o + bytes.len()).copy_from_slice(bytes);
                        });
                        count.up += n;
                        Ok(())
                    })?;
                    count.pack_ms += t0.elapsed().as_secs_f64() * 1e3;
                    i += 1;
                }
                Cmd::Down {
                    c,
                    p,
                    t,
                    off,
                    parity,
                } => {
                    let rb = host.caches[c].row_bytes() as u64;
                    let mut dst = off;
                    let rows = &state.rows[parity];
                    state.for_pieces(c, p, p + t, |buf, la, lo, hi| {
                        let (at, n) = (la as u64 * rb, (hi - lo) as u64 * rb);
                        copy_range(buf, at, n)?;
                        copy_range(rows, dst, n)?;
                        enc.copy_buffer_to_buffer(buf, at, rows, dst, n);
                        dst += n;
                        Ok(())
                    })?;
                    i += 1;
                }
                Cmd::Feed { to, to_off } => {
                    copy_range(&self.bufs[to], to_off, 8)?;
                    enc.copy_buffer_to_buffer(&state.token, 0, &self.bufs[to], to_off, 8);
                    i += 1;
                }
            }
        }
        Ok(())
    }

    /// Records and submits what is pending without waiting for it (the step goes on; see
    /// [`GpuPlan::submit_every`]). The parameter block is written whole: slots of commands already
    /// submitted get the values they had.
    fn submit_early(
        &self,
        state: &GpuState,
        host: &crate::kv::PagedCache,
        pending: &mut Vec<Cmd>,
        params: &[u8],
        count: &mut Counts,
    ) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        self.ctx.queue.write_buffer(&self.params, 0, params);
        let mut enc = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step part"),
            });
        let cmds = std::mem::take(pending);
        self.record(&mut enc, state, host, &cmds, count, None)?;
        self.submit(state, enc)?;
        count.submits += 1;
        Ok(())
    }

    /// Submits `enc` (after closing the state's upload belt) and recycles the belt.
    fn submit(&self, state: &GpuState, enc: wgpu::CommandEncoder) -> Result<wgpu::SubmissionIndex> {
        let mut belt = state
            .belt
            .lock()
            .map_err(|_| Error::internal("staging lock poisoned"))?;
        belt.finish();
        let t0 = std::time::Instant::now();
        let index = self.ctx.queue.submit([enc.finish()]);
        if let Ok(mut st) = self.submit_ms.lock() {
            *st += t0.elapsed().as_secs_f64() * 1e3;
        }
        belt.recall();
        Ok(index)
    }

    /// Submits `f`'s pending commands with copies of `fetch` (and the first `rows` bytes of new cache
    /// rows) into the state's read-back buffers of `f`'s parity, without waiting. `last`: the read-back
    /// after the step's last GPU work (it brings the rows).
    fn send(
        &self,
        state: &GpuState,
        host: &crate::kv::PagedCache,
        f: &mut Flight,
        fetch: &[ValId],
        rows: u64,
        last: bool,
    ) -> Result<Read> {
        if !f.params.is_empty() {
            self.ctx.queue.write_buffer(&self.params, 0, &f.params);
        }
        if let (Some(prof), None) = (&self.profile, &self.stamps) {
            // Profiling without timestamps: every command alone, timed from submit to completion.
            for cmd in f.pending.drain(..) {
                let mut enc = self.ctx.device.create_command_encoder(&Default::default());
                self.record(&mut enc, state, host, &[cmd], &mut f.count, None)?;
                let t0 = std::time::Instant::now();
                self.submit(state, enc)?;
                self.ctx
                    .device
                    .poll(wgpu::PollType::Wait {
                        submission_index: None,
                        timeout: None,
                    })
                    .map_err(|e| {
                        Error::device(DeviceFault::Lost, format!("waiting for the GPU: {e}"))
                    })?;
                let dt = t0.elapsed().as_secs_f64();
                let name = match cmd {
                    Cmd::Disp(si, j, _) => self.kernels[si][j].name.clone(),
                    Cmd::Up { .. } => "[kv upload]".to_string(),
                    Cmd::Down { .. } => "[kv rows back]".to_string(),
                    Cmd::Feed { .. } => "[token fed]".to_string(),
                };
                let mut p = prof.lock().unwrap_or_else(|e| e.into_inner());
                let e = p.entry(name).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += dt;
            }
        }
        let mut enc = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step"),
            });
        let cmds = std::mem::take(&mut f.pending);
        let mut timed = Vec::new();
        let stamps = self.stamps.as_ref().filter(|_| self.profile.is_some());
        self.record(
            &mut enc,
            state,
            host,
            &cmds,
            &mut f.count,
            stamps.map(|s| (s, &mut timed)),
        )?;
        if let (Some(st), false) = (stamps, timed.is_empty()) {
            let n = 2 * timed.len() as u32;
            enc.resolve_query_set(&st.set, 0..n, &st.resolve, 0);
            enc.copy_buffer_to_buffer(&st.resolve, 0, &st.read, 0, 8 * u64::from(n));
        }
        // The token choice, once it ran on the GPU: saved for a step run ahead of this one.
        if let Some(feed) = self.feed.as_ref().filter(|_| !f.token_saved) {
            if let (Some(_), Some(h)) = (&f.meta[feed.token], self.home[feed.token]) {
                copy_range(&self.bufs[h], self.offs[feed.token], 8)?;
                enc.copy_buffer_to_buffer(&self.bufs[h], self.offs[feed.token], &state.token, 0, 8);
                f.token_saved = true;
            }
        }
        let mut reads = Vec::new();
        {
            let mut sets = state
                .fetch
                .lock()
                .map_err(|_| Error::internal("staging lock poisoned"))?;
            for &v in fetch {
                let m = f.meta[v]
                    .as_ref()
                    .ok_or_else(|| Error::internal("fetch of a value not on the GPU"))?;
                let h = self.home[v].ok_or_else(|| Error::internal("no buffer"))?;
                // A read-back buffer per value and parity, made at its first use, sized for the
                // value's buffer.
                let st = sets[f.parity]
                    .entry(v)
                    .or_insert_with(|| Arc::new(self.ctx.staging("read-back", self.caps[h])))
                    .clone();
                let bytes = m.bytes();
                if bytes > st.size() {
                    return Err(Error::internal(format!(
                        "read-back of {bytes} bytes exceeds the planned {}",
                        st.size()
                    )));
                }
                enc.copy_buffer_to_buffer(&self.bufs[h], self.offs[v], &st, 0, bytes);
                reads.push((v, st, m.clone()));
            }
        }
        let t0 = std::time::Instant::now();
        let index = self.submit(state, enc)?;
        f.count.submits += 1;
        Ok(Read {
            reads,
            rows,
            last,
            timed,
            index,
            t0,
        })
    }

    /// Waits for `read` (and only for its submission), stores the fetched values in `f.env`, and the
    /// rows in `f.rows_back` when it was the read-back after the last GPU work.
    fn receive(&self, state: &GpuState, f: &mut Flight, read: Read) -> Result<()> {
        let stamps = self.stamps.as_ref().filter(|_| self.profile.is_some());
        let timed = &read.timed;
        let mut maps: Vec<(&wgpu::Buffer, usize)> = read
            .reads
            .iter()
            .map(|(_, b, m)| (&**b, m.numel() * m.dtype.size()))
            .collect();
        if read.rows > 0 {
            maps.push((&state.rows[f.parity], read.rows as usize));
        }
        if let (Some(st), false) = (stamps, timed.is_empty()) {
            maps.push((&st.read, 16 * timed.len()));
        }
        let mut raw = self.ctx.read_back(&maps, Some(read.index.clone()))?;
        if let (Some(st), Some(prof), false) = (stamps, &self.profile, timed.is_empty()) {
            let ticks = raw.pop().unwrap_or_default();
            let ticks: &[u64] = bytemuck::try_cast_slice(&ticks)
                .map_err(|e| Error::device(DeviceFault::Lost, format!("timestamps: {e}")))?;
            let mut p = prof.lock().unwrap_or_else(|e| e.into_inner());
            for (k, &(si, j)) in timed.iter().enumerate() {
                let dt = ticks[2 * k + 1].saturating_sub(ticks[2 * k]) as f64 * st.period * 1e-9;
                let e = p
                    .entry(self.kernels[si][j].name.clone())
                    .or_insert((0, 0.0));
                e.0 += 1;
                e.1 += dt;
            }
            // The whole submission, first dispatch start to last dispatch end (gaps included).
            let span =
                ticks[2 * timed.len() - 1].saturating_sub(ticks[0]) as f64 * st.period * 1e-9;
            let e = p
                .entry("(span: first dispatch start to last end)".into())
                .or_insert((0, 0.0));
            e.0 += 1;
            e.1 += span;
        }
        let rows = if read.rows > 0 {
            raw.pop().unwrap_or_default()
        } else {
            Vec::new()
        };
        for (bytes, (v, _, m)) in raw.into_iter().zip(read.reads) {
            let mut t = Tensor::zeros(m.dtype, &m.shape);
            t.bytes_mut().copy_from_slice(&bytes);
            f.count.down += t.bytes().len() as u64;
            f.env[v] = Some(t);
        }
        f.count.down += rows.len() as u64;
        f.count.waits += 1;
        f.count.wait += read.t0.elapsed().as_secs_f64() * 1e3;
        if read.last {
            f.rows_back = Some(rows);
        }
        Ok(())
    }
}

/// Per-step bookkeeping of the KV cache traffic (see [`GpuState`]).
struct Kv {
    /// Working copy of [`GpuState::held`].
    held: Vec<(Option<usize>, usize)>,
    /// Per ring index: dispatches recorded when its upload was issued (None: nothing uploaded).
    up_at: Vec<Option<usize>>,
    stalls: u64,
    up: u64,
    down: u64,
    /// Bytes of new rows copied so far (the next offset in the rows buffer).
    off: u64,
    /// The caches whose new rows were copied, with their offsets in the rows buffer.
    downs: Vec<(usize, u64)>,
    /// Dispatches recorded so far.
    ndisp: usize,
}

impl Kv {
    /// Issues the upload of streamed layer `i`'s missing rows (`< position`) into its slot.
    fn prefetch(
        &mut self,
        state: &GpuState,
        host: &crate::kv::PagedCache,
        i: usize,
        position: usize,
        pending: &mut Vec<Cmd>,
    ) -> Result<()> {
        let pair = state
            .streams
            .get(i)
            .ok_or_else(|| Error::internal(format!("no streamed layer {i}")))?;
        for &c in pair {
            let b = state.home[c];
            let (who, v) = self.held[b];
            let a = if who == Some(c) { v.min(position) } else { 0 };
            if a < position {
                pending.push(Cmd::Up { c, a, b: position });
                self.up += ((position - a) * host.caches[c].row_bytes()) as u64;
                self.up_at[i] = Some(self.ndisp);
            }
            self.held[b] = (Some(c), position);
        }
        Ok(())
    }

    /// Counts a stall when the layer's upload was issued with no compute between it and this attention.
    fn before_attention(&mut self, state: &GpuState, past: [usize; 2]) {
        if let Some(i) = state.ring[past[0]] {
            if self.up_at.get(i).copied().flatten() == Some(self.ndisp) {
                self.stalls += 1;
            }
        }
    }
}

/// Checks that bytes `at..at + n` of `buf` can take part in a copy (4-byte aligned, inside the buffer);
/// the size as a `BufferSize`, `None` when empty.
fn copy_range(buf: &wgpu::Buffer, at: u64, n: u64) -> Result<Option<wgpu::BufferSize>> {
    if !at.is_multiple_of(4) || !n.is_multiple_of(4) || at + n > buf.size() {
        return Err(Error::internal(format!(
            "a KV-cache copy of bytes {at}..{} does not fit a {}-byte buffer or is not 4-byte aligned",
            at + n,
            buf.size()
        )));
    }
    Ok(wgpu::BufferSize::new(n))
}

/// Step `si` when it is a generic node: (the node, its input slots, its output slots).
#[allow(clippy::type_complexity)]
fn generic_node(
    plan: &Plan,
    si: usize,
) -> Option<(&crate::graph::Node, &Vec<Option<ValId>>, &Vec<ValId>)> {
    match &plan.steps[si] {
        Step::Node {
            node,
            inputs,
            outputs,
        } => Some((&plan.graph.nodes[*node], inputs, outputs)),
        _ => None,
    }
}

/// Rotary positions (i64) must index the `rows` rows of the cos/sin tables (`n`: the node, for errors).
fn check_positions(n: &crate::graph::Node, pos: &Tensor, rows: usize) -> Result<()> {
    if pos
        .typed::<i64>()
        .iter()
        .any(|&p| p < 0 || p as usize >= rows)
    {
        return Err(Error::node(
            &n.name,
            &n.op,
            format!("position outside the {rows} rows of the cos/sin cache"),
        ));
    }
    Ok(())
}

fn e_is_const(plan: &Plan, v: ValId) -> bool {
    plan.consts[v].is_some()
}

fn write_padded(queue: &wgpu::Queue, buf: &wgpu::Buffer, bytes: &[u8]) {
    if bytes.len().is_multiple_of(4) {
        if !bytes.is_empty() {
            queue.write_buffer(buf, 0, bytes);
        }
    } else {
        let mut v = bytes.to_vec();
        v.resize(bytes.len().next_multiple_of(4), 0);
        queue.write_buffer(buf, 0, &v);
    }
}

/// Test helper: runs `kernel` once with `inputs` bound at 1.. and `outs` zeroed buffers after them;
/// returns the outputs, then every input bound as writable (in order).
#[cfg(test)]
pub(crate) fn run_kernel_multi(
    ctx: &GpuContext,
    kernel: &Kernel,
    params: &Params,
    inputs: &[&[u8]],
    outs: &[usize],
    groups: (u32, u32),
) -> Result<Vec<Vec<u8>>> {
    run_kernel_multi_tail(
        ctx,
        kernel,
        params,
        inputs,
        outs,
        &[],
        (groups.0, groups.1, 1),
    )
}

/// [`run_kernel_multi`] with more read-only inputs bound after the outputs (`tail`).
#[cfg(test)]
pub(crate) fn run_kernel_multi_tail(
    ctx: &GpuContext,
    kernel: &Kernel,
    params: &Params,
    inputs: &[&[u8]],
    outs: &[usize],
    tail: &[&[u8]],
    groups: (u32, u32, u32),
) -> Result<Vec<Vec<u8>>> {
    let pbuf = ctx.uniform("p", 256);
    ctx.queue.write_buffer(&pbuf, 0, params.bytes());
    let mut bufs: Vec<wgpu::Buffer> = inputs
        .iter()
        .map(|b| ctx.buffer_with("in", b))
        .collect::<Result<_>>()?;
    for &n in outs {
        bufs.push(ctx.storage("out", n as u64)?);
    }
    for b in tail {
        bufs.push(ctx.buffer_with("tail", b)?);
    }
    let refs: Vec<&wgpu::Buffer> = bufs.iter().collect();
    let bg = ctx.bind(kernel, (&pbuf, 0), &refs);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
    }
    // Outputs, then inputs that are bound writable (the attention's caches).
    let writable: Vec<usize> = (0..inputs.len())
        .filter(|&i| kernel.name.starts_with("attention") && (i == 4 || i == 5))
        .collect();
    let mut order: Vec<(usize, usize)> = outs
        .iter()
        .enumerate()
        .map(|(i, &n)| (inputs.len() + i, n))
        .collect();
    order.extend(writable.iter().map(|&i| (i, inputs[i].len())));
    let stagings: Vec<wgpu::Buffer> = order
        .iter()
        .map(|&(_, n)| ctx.staging("s", n as u64))
        .collect();
    for ((bi, n), st) in order.iter().zip(&stagings) {
        enc.copy_buffer_to_buffer(&bufs[*bi], 0, st, 0, (*n as u64).next_multiple_of(4));
    }
    ctx.queue.submit([enc.finish()]);
    ctx.read_back(
        &stagings
            .iter()
            .zip(&order)
            .map(|(s, &(_, n))| (s, n))
            .collect::<Vec<_>>(),
        None,
    )
}

/// Test helper: one output.
#[cfg(test)]
pub(crate) fn run_kernel_once(
    ctx: &GpuContext,
    kernel: &Kernel,
    params: &Params,
    inputs: &[&[u8]],
    out: usize,
    groups: (u32, u32),
) -> Result<Vec<u8>> {
    Ok(run_kernel_multi(ctx, kernel, params, inputs, &[out], groups)?.remove(0))
}

/// Test helper: `x · Wᵀ + bias + res` through every part of `g`.
#[cfg(test)]
pub(crate) fn run_linear_once(
    ctx: &GpuContext,
    g: &GpuLinear,
    x: &[f32],
    res: &[f32],
    t: usize,
) -> Result<Vec<f32>> {
    let xb = ctx.buffer_with("x", bytemuck::cast_slice(x))?;
    let rb = ctx.buffer_with("res", bytemuck::cast_slice(res))?;
    let ob = ctx.storage("o", (t * g.n * 4) as u64)?;
    let pbuf = ctx.uniform("p", (256 * g.parts.len()) as u64);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    let mut groups = Vec::new();
    for (i, part) in g.parts.iter().enumerate() {
        ctx.queue
            .write_buffer(&pbuf, (i * 256) as u64, g.params(i, t, true).bytes());
        groups.push(ctx.bind(
            g.kernel_for(t),
            (&pbuf, (i * 256) as u64),
            &[&xb, &part.w, &part.s, &part.z, &g.bias, &rb, &ob],
        ));
    }
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&g.kernel_for(t).pipeline);
        for (i, bg) in groups.iter().enumerate() {
            pass.set_bind_group(0, bg, &[]);
            let (x, y, z) = g.groups(i, t, ctx.max_groups);
            pass.dispatch_workgroups(x, y, z);
        }
    }
    let st = ctx.staging("s", (t * g.n * 4) as u64);
    enc.copy_buffer_to_buffer(&ob, 0, &st, 0, (t * g.n * 4) as u64);
    ctx.queue.submit([enc.finish()]);
    let v = ctx.read_back(&[(&st, t * g.n * 4)], None)?.remove(0);
    Ok(bytemuck::cast_slice(&v).to_vec())
}

/// Test helper: the token embedding of `ids` from the weights `g` (every part's dispatch), `[ids, K]`.
#[cfg(test)]
pub(crate) fn run_embed_once(ctx: &GpuContext, g: &GpuLinear, ids: &[i64]) -> Result<Vec<f32>> {
    let t = ids.len();
    let len = (t * g.k * 4) as u64;
    let kernel = g.embed_kernel(ctx)?;
    let ib = ctx.buffer_with("ids", bytemuck::cast_slice(ids))?;
    // Filled with NaN: an element no dispatch writes shows.
    let ob = ctx.buffer_with("o", &vec![0xff; len as usize])?;
    let dummy = ctx.buffer_with("dummy", &[0; 4])?;
    let pbuf = ctx.uniform("p", (256 * g.parts.len()) as u64);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    let mut groups = Vec::new();
    for (i, part) in g.parts.iter().enumerate() {
        ctx.queue
            .write_buffer(&pbuf, (i * 256) as u64, g.embed_params(i, t).bytes());
        groups.push(ctx.bind(
            &kernel,
            (&pbuf, (i * 256) as u64),
            &[&ib, &part.w, &part.s, &part.z, &dummy, &dummy, &ob],
        ));
    }
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&kernel.pipeline);
        for bg in &groups {
            pass.set_bind_group(0, bg, &[]);
            let (x, y, z) = g.embed_groups(t, ctx.max_groups);
            pass.dispatch_workgroups(x, y, z);
        }
    }
    let st = ctx.staging("s", len);
    enc.copy_buffer_to_buffer(&ob, 0, &st, 0, len);
    ctx.queue.submit([enc.finish()]);
    let v = ctx.read_back(&[(&st, len as usize)], None)?.remove(0);
    Ok(bytemuck::cast_slice(&v).to_vec())
}

/// Test helper: the fused forms of `g` ([`super::linear::FusedOut`]) over `x` (`aux`: the norm's scale),
/// returning `out_len` floats of the output buffer.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_fused_linear_once(
    ctx: &GpuContext,
    g: &GpuLinear,
    out: &super::linear::FusedOut,
    norm: Option<f32>,
    x: &[f32],
    aux: &[f32],
    t: usize,
    out_len: usize,
) -> Result<Vec<f32>> {
    let kernel = g
        .fused_kernels(ctx, out, norm.is_some())?
        .ok_or_else(|| {
            Error::device(
                DeviceFault::Unsupported,
                "no fused kernel for these weights",
            )
        })?
        .swap_remove(g.fused_pick(t));
    let xb = ctx.buffer_with("x", bytemuck::cast_slice(x))?;
    let ab = ctx.buffer_with("aux", bytemuck::cast_slice(aux))?;
    let ob = ctx.storage("o", (out_len * 4) as u64)?;
    let pbuf = ctx.uniform("p", 256);
    ctx.queue
        .write_buffer(&pbuf, 0, g.fused_params(t, out, norm).bytes());
    let p = &g.parts[0];
    let bg = ctx.bind(
        &kernel,
        (&pbuf, 0),
        &[&xb, &p.w, &p.s, &p.z, &g.bias, &ab, &ob],
    );
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bg, &[]);
        let (gx, gy, gz) = g.fused_groups(t, out, ctx.max_groups);
        pass.dispatch_workgroups(gx, gy, gz);
    }
    let st = ctx.staging("s", (out_len * 4) as u64);
    enc.copy_buffer_to_buffer(&ob, 0, &st, 0, (out_len * 4) as u64);
    ctx.queue.submit([enc.finish()]);
    let v = ctx.read_back(&[(&st, out_len * 4)], None)?.remove(0);
    Ok(bytemuck::cast_slice(&v).to_vec())
}
