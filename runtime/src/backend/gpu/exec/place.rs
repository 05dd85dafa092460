//! Placement at load ([`GpuPlan::new`]): weights bound ([`Weights`]), the plan dry-run at the largest
//! chunk ([`DryRun`]: which step runs where, every buffer's size), then buffers, pipelines and bind
//! groups made once.

use super::*;

/// The GPU weights of a plan, uploaded once: every linear layer the kernels take, linear groups
/// (stacked), untied token tables.
struct Weights {
    linears: HashMap<usize, GpuLinear>,
    lin_alias: HashMap<usize, usize>,
    lin_groups: HashMap<usize, GpuGroup>,
    weight_bytes: u64,
}

impl Weights {
    fn bind(ctx: &Arc<GpuContext>, plan: &Plan) -> Result<Weights> {
        let mut linears = HashMap::new();
        let mut weight_bytes = 0;
        let lin_groups = GpuPlan::bind_groups(ctx, plan, &mut linears, &mut weight_bytes)?;
        for (si, s) in plan.steps.iter().enumerate() {
            if let Step::Linear { node, w, bias, .. } = s {
                if GpuLinear::supports(w) {
                    let name = &plan.graph.nodes[*node].name;
                    let b = bias.as_ref().map(|b| b.typed::<f32>());
                    let g = GpuLinear::new(ctx, name, w, b)?;
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
            // (a group of one: the output layer with its norm folded in)
            let tied = plan.steps.iter().enumerate().find_map(|(j, t)| {
                let w = match t {
                    Step::Linear { w, .. } => w,
                    Step::LinearGroup(g) if g.members.len() == 1 => g.linears().next()?.0,
                    _ => return None,
                };
                (Arc::ptr_eq(w, &emb.w) && linears.get(&j).is_some_and(|g| g.n == w.n)).then_some(j)
            });
            if let Some(j) = tied {
                lin_alias.insert(si, j);
            } else if GpuLinear::supports(&emb.w) {
                let g = GpuLinear::new(ctx, &plan.graph.nodes[emb.node].name, &emb.w, None)?;
                weight_bytes += g.bytes;
                linears.insert(si, g);
            }
        }
        Ok(Weights {
            linears,
            lin_alias,
            lin_groups,
            weight_bytes,
        })
    }
}

/// What the dry run learns about values: their contents or placeholders on the host (`env`), their
/// metadata on the GPU (`meta`), the buffer each lives in (`root`: views share their source's) and the
/// bytes it needs, the values uploaded from the host and the constants read, the first CPU step that
/// waits for the GPU, and the parameter slots taken.
struct DryRun {
    env: Vec<Option<Tensor>>,
    meta: Vec<Option<Meta>>,
    root: Vec<Option<ValId>>,
    need: HashMap<ValId, u64>,
    first_wait: Option<usize>,
    uploads: HashSet<ValId>,
    consts: HashSet<ValId>,
    slot: usize,
}

impl DryRun {
    fn new(plan: &Plan, inputs: &[(ValId, Tensor)]) -> DryRun {
        let nvals = plan.names.len();
        let mut env: Vec<Option<Tensor>> = vec![None; nvals];
        for (v, t) in inputs {
            env[*v] = Some(t.clone());
        }
        DryRun {
            env,
            meta: vec![None; nvals],
            root: vec![None; nvals],
            need: HashMap::new(),
            first_wait: None,
            uploads: HashSet::new(),
            consts: HashSet::new(),
            slot: 0,
        }
    }
}

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
        Self::placed(ctx, plan, cpu_step, inputs, seg_bytes, false)
    }

    /// [`GpuPlan::new`]; `all`: every step a kernel takes goes to the GPU, the light ones that read only
    /// host values too (for checking the kernels op by op: [`super::super::graph::run_graph`]).
    pub(crate) fn placed(
        ctx: Arc<GpuContext>,
        plan: &Plan,
        cpu_step: &mut CpuStep,
        inputs: &[(ValId, Tensor)],
        seg_bytes: Option<u64>,
        all: bool,
    ) -> Result<GpuPlan> {
        let weights = Weights::bind(&ctx, plan)?;
        let mut me = GpuPlan::unplaced(&ctx, plan, weights, seg_bytes)?;
        me.place_all = all;
        let mut dry = DryRun::new(plan, inputs);
        for (si, s) in plan.steps.iter().enumerate() {
            match me.dry_describe(plan, si, s, &dry)? {
                Some(d) => me.place_on_gpu(plan, si, d, &mut dry)?,
                None => me.place_on_cpu(plan, si, s, &mut dry, cpu_step)?,
            }
        }
        me.size_top_k(plan, &mut dry);
        me.allocate(plan, &dry)?;
        me.bind_all(plan, dry.first_wait)?;
        ctx.check("planning")?;
        ctx.save_pipeline_cache();
        Ok(me)
    }

    /// The plan with its weights bound and nothing placed yet.
    fn unplaced(
        ctx: &Arc<GpuContext>,
        plan: &Plan,
        weights: Weights,
        seg_bytes: Option<u64>,
    ) -> Result<GpuPlan> {
        let nvals = plan.names.len();
        let Weights {
            linears,
            lin_alias,
            lin_groups,
            weight_bytes,
        } = weights;
        let dummy = ctx.buffer_with("dummy", &[0; 4])?;
        Ok(GpuPlan {
            ctx: ctx.clone(),
            on_gpu: vec![false; plan.steps.len()],
            home: vec![None; nvals],
            bufs: Vec::new(),
            caps: Vec::new(),
            const_loaded: vec![false; nvals],
            uploaded: Mutex::new(vec![None; nvals]),
            linears,
            lin_alias,
            seg_bytes: seg_bytes
                .unwrap_or(ctx.binding_limit)
                .min(ctx.binding_limit)
                .min(ctx.device.limits().max_buffer_size),
            rows_variant: rows_variant(ctx),
            part: ctx.buffer_with("attention partials", &[0; 4])?,
            split_keys: ctx.options.split_keys,
            submit_every: match ctx.options.submit_every {
                _ if ctx.profiling => 0,
                Some(n) => n,
                None if ctx.info().is_software() => 0,
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
            lin_groups,
            offs: vec![0; nvals],
            submit_ms: Mutex::new(0.0),
            profile: ctx.profiling.then(|| Mutex::new(Default::default())),
            stamps: None,
            cpu_reads: Vec::new(),
            place_all: false,
            last_gpu: None,
            kept: Mutex::default(),
        })
    }

    /// Step `si`'s description at the dry run when it runs on the GPU: the heavy steps (and the steps a
    /// fusion took) always, the others when they read a value the GPU holds.
    fn dry_describe(&self, plan: &Plan, si: usize, s: &Step, dry: &DryRun) -> Result<Option<Desc>> {
        let no_prefix = std::cell::Cell::new(None);
        let e = Env::new(plan, &dry.env, &dry.meta, &no_prefix, Stage::Place);
        let d = self.describe(si, s, &e)?;
        let heavy = matches!(
            s,
            Step::Linear { .. }
                | Step::LinearGroup(_)
                | Step::CacheAttention { .. }
                | Step::Embedding(_)
        ) || self.embedding(plan, s)
            || self.place_all;
        let reads_gpu = || {
            crate::plan::step_reads(s)
                .iter()
                .any(|v| dry.meta[*v].is_some())
        };
        Ok(d.filter(|_| heavy || reads_gpu()))
    }

    /// Places step `si` on the GPU as `d` describes it: the fusion it took, the values it reads (uploaded or
    /// constant), its outputs' buffers and sizes, its kernels and bindings.
    fn place_on_gpu(&mut self, plan: &Plan, si: usize, d: Desc, dry: &mut DryRun) -> Result<()> {
        let DryRun {
            env,
            meta,
            root,
            need,
            uploads,
            consts,
            slot,
            ..
        } = dry;
        self.on_gpu[si] = true;
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
            self.offs[*o] = match (d.at.iter().find(|a| a.0 == *o), src) {
                (Some(&(_, off)), _) => off,
                (None, Some(s)) => self.offs[*s],
                (None, None) => 0,
            };
            let e = need.entry(r).or_insert(0);
            *e = (*e).max(self.offs[*o] + m.bytes());
            meta[*o] = Some(m.clone());
            env[*o] = None;
        }
        self.slot0[si] = *slot;
        *slot += d.disp.len();
        for dd in d.disp {
            self.kernels[si].push(dd.kernel.ok_or_else(|| Error::internal("no kernel"))?);
            self.binds[si].push(dd.binds);
        }
        Ok(())
    }

    /// Runs step `si` on the CPU at the dry run (on zeros where it reads GPU values), after checking that
    /// no fusion counted on it running on the GPU.
    fn place_on_cpu(
        &mut self,
        plan: &Plan,
        si: usize,
        s: &Step,
        dry: &mut DryRun,
        cpu_step: &mut CpuStep,
    ) -> Result<()> {
        let DryRun {
            env,
            meta,
            first_wait,
            ..
        } = dry;
        if let Step::CacheAttention { node, .. } = s {
            let n = &plan.graph.nodes[*node];
            return Err(Error::device(
                DeviceFault::Unsupported,
                format!(
                    "attention `{}` cannot run on the GPU (its inputs do not fit the kernel)",
                    n.name
                ),
            ));
        }
        for v in crate::plan::step_reads(s) {
            if let Some(m) = &meta[v] {
                first_wait.get_or_insert(si);
                if env[v].is_none() {
                    env[v] = Some(Tensor::zeros(m.dtype, &m.shape));
                }
            }
        }
        cpu_step(s, env)?;
        if let Step::Node { outputs, .. } = s {
            for &o in outputs {
                meta[o] = None;
            }
        }
        Ok(())
    }

    /// Sizes the token choice's outputs for any k.
    fn size_top_k(&self, plan: &Plan, dry: &mut DryRun) {
        let DryRun {
            meta, root, need, ..
        } = dry;
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
            if !self.on_gpu[si] || plan.graph.nodes[*node].op != "TopK" {
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
                    *e = (*e).max(self.offs[o] + (rows * per * m.dtype.size()) as u64);
                }
            }
        }
    }

    /// Creates the buffers the dry run sized (one per root value) and uploads the constants the GPU steps
    /// read, the parameter block and the attention partials.
    fn allocate(&mut self, plan: &Plan, dry: &DryRun) -> Result<()> {
        let (ctx, nvals) = (self.ctx.clone(), plan.names.len());
        let DryRun {
            root,
            need,
            uploads,
            consts,
            slot,
            ..
        } = dry;
        let slot = *slot;
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
                    self.bufs.push(b);
                    self.caps.push(bytes);
                    index.insert(r, self.bufs.len() - 1);
                    self.bufs.len() - 1
                }
            };
            if root[v].is_some() || need.contains_key(&v) {
                self.home[v] = Some(bi);
            }
        }
        for &v in uploads {
            if self.home[v].is_none() {
                return Err(Error::internal(format!(
                    "no buffer for `{}`",
                    plan.names[v]
                )));
            }
        }
        for &v in consts {
            let t = plan.consts[v]
                .as_ref()
                .ok_or_else(|| Error::internal("constant vanished"))?;
            let b = ctx.buffer_with(&plan.names[v], t.bytes())?;
            self.caps.push(b.size());
            self.bufs.push(b);
            self.home[v] = Some(self.bufs.len() - 1);
            self.const_loaded[v] = true;
        }
        self.params = ctx.uniform("params", (slot.max(1) * 256) as u64);
        if self.profile.is_some() && ctx.info().timestamps {
            self.stamps = Some(Stamps::new(&ctx, slot));
        }
        let part = self.part_need.load(std::sync::atomic::Ordering::Relaxed);
        if part > 0 {
            self.part = ctx.storage("attention partials", part)?;
        }
        if let Ok(mut st) = self.lock.lock() {
            st.scratch_bytes = scratch;
        }
        Ok(())
    }

    /// Creates the bind groups that do not depend on a sequence's state, and what run time needs of the
    /// placement: the last GPU step, the fed token ids, what CPU steps read; counters.
    fn bind_all(&mut self, plan: &Plan, first_wait: Option<usize>) -> Result<()> {
        for si in 0..plan.steps.len() {
            let mut gs = Vec::new();
            for (j, b) in self.binds[si].iter().enumerate() {
                let per_state = b
                    .iter()
                    .any(|r| matches!(r, BufRef::CacheK(..) | BufRef::CacheV(..)));
                gs.push(if per_state {
                    None
                } else {
                    Some(self.bind_group(si, j, None)?)
                });
            }
            self.groups[si] = gs;
        }
        self.last_gpu = self.on_gpu.iter().rposition(|g| *g);
        self.feed = self.find_feed(plan, first_wait);
        for (si, s) in plan.steps.iter().enumerate() {
            if !self.on_gpu[si] {
                self.cpu_reads
                    .extend(crate::plan::step_reads(s).into_iter().map(|v| (si, v)));
            }
        }
        if let Ok(mut st) = self.lock.lock() {
            st.gpu_steps = self.on_gpu.iter().filter(|g| **g).count();
            st.linear_groups = self.lin_groups.len();
            st.fused_norms = self
                .lin_groups
                .values()
                .filter(|g| g.norm.is_some())
                .count();
            // Linear layers (an untied embedding's table is uploaded in their layout, not run as one).
            st.subgroup_linears = self
                .linears
                .iter()
                .filter(|(si, l)| {
                    l.subgroups
                        && matches!(plan.steps[**si], Step::Linear { .. } | Step::LinearGroup(_))
                })
                .count();
            st.cpu_steps = self.on_gpu.len() - st.gpu_steps;
        }
        Ok(())
    }
}
