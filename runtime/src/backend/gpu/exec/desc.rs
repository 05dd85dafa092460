//! What a step does on the GPU: its description ([`Desc`]: dispatches, the buffers they bind, the
//! values it reads and writes), the executor's view of a step's inputs ([`Env`]) and a description kept
//! for the next step of the same token count ([`Kept`]); and what every description function shares
//! ([`Stage`], [`check_positions`]).

use super::*;

/// Element type and shape of a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl Meta {
    pub(super) fn of(t: &Tensor) -> Meta {
        Meta {
            dtype: t.dtype,
            shape: t.shape.clone(),
        }
    }
    pub(super) fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub(super) fn bytes(&self) -> u64 {
        ((self.numel() * self.dtype.size()) as u64).next_multiple_of(4)
    }
}

/// A buffer a dispatch binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BufRef {
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

pub(super) struct Disp {
    pub(super) kernel: Option<Arc<Kernel>>,
    pub(super) binds: Vec<BufRef>,
    pub(super) params: Params,
    pub(super) groups: (u32, u32, u32),
}

/// What a GPU step does this run.
pub(super) struct Desc {
    /// Output values with their metadata; `Some(src)` when the output is a view of `src`'s buffer.
    pub(super) outs: Vec<(ValId, Meta, Option<ValId>)>,
    /// Outputs that live at a byte offset into their `src`'s buffer (the parts of a fused linear).
    pub(super) at: Vec<(ValId, u64)>,
    /// Non-constant inputs the dispatches read.
    pub(super) reads: Vec<ValId>,
    pub(super) disp: Vec<Disp>,
}

/// Inputs of one step as the executor sees them.
pub(super) struct Env<'a> {
    pub(super) plan: &'a Plan,
    pub(super) cpu: &'a [Option<Tensor>],
    pub(super) meta: &'a [Option<Meta>],
    /// Set when a description looked at the contents of a host value that is not a constant (token ids,
    /// positions): such a description holds for this step only and is not cached.
    pub(super) looked: std::cell::Cell<bool>,
    /// What a mask lets attend ([`crate::backend::mask::attended`]), found once a step.
    pub(super) prefix: &'a std::cell::Cell<Option<(ValId, Option<Attended>)>>,
    /// Placement at load, or a step at run time.
    pub(super) stage: Stage,
}

impl<'a> Env<'a> {
    pub(super) fn new(
        plan: &'a Plan,
        cpu: &'a [Option<Tensor>],
        meta: &'a [Option<Meta>],
        prefix: &'a std::cell::Cell<Option<(ValId, Option<Attended>)>>,
        stage: Stage,
    ) -> Env<'a> {
        Env {
            plan,
            cpu,
            meta,
            looked: std::cell::Cell::new(false),
            prefix,
            stage,
        }
    }
    /// [`crate::backend::mask::attended`] of mask `m` (kept for the last mask asked about: the
    /// attentions of a step share one mask, or two alternating for global and windowed layers).
    pub(super) fn mask_prefix(&self, m: ValId, t: usize, slots: usize) -> Option<Attended> {
        if let Some((v, p)) = self.prefix.get() {
            if v == m {
                self.looked.set(true);
                return p;
            }
        }
        let p = self
            .cpu(m)
            .and_then(|x| crate::backend::mask::attended(x, t, slots));
        self.prefix.set(Some((m, p)));
        p
    }
    /// The metadata of `v` when it is f32.
    pub(super) fn f32m(&self, v: ValId) -> Option<Meta> {
        self.meta(v).filter(|m| m.dtype == DType::F32)
    }
    pub(super) fn meta(&self, v: ValId) -> Option<Meta> {
        if let Some(m) = &self.meta[v] {
            return Some(m.clone());
        }
        self.cpu[v]
            .as_ref()
            .or(self.plan.consts[v].as_ref())
            .map(Meta::of)
    }
    /// Whether `v` has metadata `m` (without building it).
    pub(super) fn meta_is(&self, v: ValId, m: &Meta) -> bool {
        match (
            &self.meta[v],
            self.cpu[v].as_ref().or(self.plan.consts[v].as_ref()),
        ) {
            (Some(g), _) => g == m,
            (None, Some(t)) => t.dtype == m.dtype && t.shape == m.shape,
            (None, None) => false,
        }
    }
    pub(super) fn cpu(&self, v: ValId) -> Option<&Tensor> {
        if self.cpu[v].is_some() && self.plan.consts[v].is_none() {
            self.looked.set(true);
        }
        self.cpu[v].as_ref().or(self.plan.consts[v].as_ref())
    }
}

/// A step's description kept for the next step of the same token count (decode: every step): valid while
/// the values it reads have the metadata they had (see [`Env::looked`] for what is never kept).
pub(super) struct Kept {
    pub(super) desc: Desc,
    pub(super) reads: Vec<(ValId, Meta)>,
}

/// When a description is made: the one thing about load and run time that a description function sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// At load ([`GpuPlan::new`]'s dry run), over placeholders at the largest chunk, as a first chunk:
    /// the kernels are made; a step the kernels do not take is refused (it runs on the CPU); buffer
    /// layouts are decided.
    Place,
    /// At run time, over the step's own values: the dispatches use the kernels placed at load; host
    /// values (token ids, positions) are checked; a step that no longer fits is an error.
    Run {
        /// The step's first token's position.
        position: usize,
    },
}

impl Stage {
    /// `make()` when placing; at run time a dispatch uses the kernel placed at load (`None`).
    pub(super) fn kernel(
        self,
        make: &dyn Fn() -> Result<Arc<Kernel>>,
    ) -> Result<Option<Arc<Kernel>>> {
        match self {
            Stage::Place => make().map(Some),
            Stage::Run { .. } => Ok(None),
        }
    }
    /// A kernel made before (a linear layer's, at binding): kept when placing, as [`Stage::kernel`].
    pub(super) fn made(self, k: &Arc<Kernel>) -> Option<Arc<Kernel>> {
        self.placing().then(|| k.clone())
    }
    /// `check()` at run time, on real values (at load they are placeholders).
    pub(super) fn check(self, check: impl FnOnce() -> Result<()>) -> Result<()> {
        match self {
            Stage::Place => Ok(()),
            Stage::Run { .. } => check(),
        }
    }
    /// A step the kernels do not take: placed on the CPU at load (`None`); at run time, where the
    /// step was placed on the GPU, `err`.
    pub(super) fn refuse<T>(self, err: Error) -> Result<Option<T>> {
        match self {
            Stage::Place => Ok(None),
            Stage::Run { .. } => Err(err),
        }
    }
    /// Whether this is the placement at load (what it decides, a run reuses).
    pub(super) fn placing(self) -> bool {
        self == Stage::Place
    }
    /// The first token's position (0 when placing: the dry run is a first chunk).
    pub(super) fn position(self) -> usize {
        match self {
            Stage::Place => 0,
            Stage::Run { position } => position,
        }
    }
}

/// Rotary positions (i64) must index the `rows` rows of the cos/sin tables (`n`: the node, for errors).
pub(super) fn check_positions(n: &crate::graph::Node, pos: &Tensor, rows: usize) -> Result<()> {
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
