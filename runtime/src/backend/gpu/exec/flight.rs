//! A step in flight: begun (recorded and submitted up to its first read-back), finished (waited for,
//! the host tail run, the new cache rows written back), and the next decode step run ahead of it with
//! its token ids fed on the GPU ([`Feed`]).

use super::*;

/// Per-step transfer and submission counters.
#[derive(Debug, Default)]
pub(super) struct Counts {
    /// Host milliseconds packing cache pages into upload memory.
    pub(super) pack_ms: f64,
    pub(super) dispatches: usize,
    pub(super) submits: usize,
    pub(super) waits: usize,
    pub(super) up: u64,
    pub(super) down: u64,
    pub(super) wait: f64,
}

/// A command of a step, in stream order.
#[derive(Debug, Clone, Copy)]
pub(super) enum Cmd {
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
pub(super) struct Feed {
    /// The uploaded value that holds the chunk's token ids (`input_ids` or a host view of it).
    pub(super) ids: ValId,
    /// The chosen token on the GPU: the `TokenChoice`'s output, or, where the choice's tail runs on the
    /// host, the `TopK`'s indices (whose first is the token when the choice is greedy).
    pub(super) token: ValId,
    /// Graph inputs other than the ids read before the first step that waits for the GPU: a step run
    /// ahead holds for a call whose inputs equal these.
    pub(super) early: Vec<ValId>,
    /// The other graph inputs (read by the host after the wait): taken from the real call.
    pub(super) late: Vec<ValId>,
}

/// A step on its way ([`GpuPlan::begin`] → [`GpuPlan::finish`]).
pub struct Flight {
    /// The inputs read before its read-back (`Feed::early`) it was begun with, when it runs ahead
    /// (for [`GpuPlan::holds_for`]).
    pub(super) early: Vec<Option<Tensor>>,
    pub(super) env: Vec<Option<Tensor>>,
    pub(super) meta: Vec<Option<Meta>>,
    pub(super) params: Vec<u8>,
    pub(super) pending: Vec<Cmd>,
    pub(super) count: Counts,
    pub(super) kv: Kv,
    pub(super) described: usize,
    pub(super) t_step: std::time::Instant,
    /// The step's cache rows, when a read-back after the last GPU step brought them.
    pub(super) rows_back: Option<Vec<u8>>,
    /// Dispatches queued when the last early submission went.
    pub(super) submitted: usize,
    pub(super) position: usize,
    pub(super) tokens: usize,
    pub(super) want: Vec<ValId>,
    /// The next step to run.
    pub(super) next: usize,
    /// The read-back submitted and not waited for.
    pub(super) read: Option<Read>,
    /// Which of the state's two sets of read-back buffers it uses (a step run ahead takes the other
    /// one than the step it follows).
    pub(super) parity: usize,
    /// The value filled by [`Cmd::Feed`] (a step run ahead).
    pub(super) fed: Option<ValId>,
    /// Whether its token choice was saved into [`GpuState::token`].
    pub(super) token_saved: bool,
    pub(super) ahead: bool,
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
pub(super) struct Read {
    /// Values and the buffers they are copied into.
    pub(super) reads: Vec<(ValId, Arc<wgpu::Buffer>, Meta)>,
    /// Bytes of new cache rows it brings.
    pub(super) rows: u64,
    /// After the step's last GPU work.
    pub(super) last: bool,
    /// Dispatches with timestamps (profiling).
    pub(super) timed: Vec<(usize, usize)>,
    pub(super) index: wgpu::SubmissionIndex,
    pub(super) t0: std::time::Instant,
}

impl GpuPlan {
    /// How a decode step can take its token ids from the step before it on the GPU (see
    /// [`GpuPlan::begin`]), given the first CPU step that waits for the GPU. Needs: that wait after the
    /// last GPU step (none in the middle); the ids' contents reaching the GPU as one uploaded value,
    /// through host views only (other host steps may read their shape, not their values); one token
    /// choice (`TopK`) on the GPU.
    pub(super) fn find_feed(&self, plan: &Plan, first_wait: Option<usize>) -> Option<Feed> {
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

    /// Whether step `f` (begun, not finished) can have the next one run ahead of it (see
    /// [`GpuPlan::begin`]): the plan feeds its token ids from its token choice, `f` is a decode step
    /// whose token choice ran on the GPU and was saved for the next step,
    /// every cache layer is resident, nothing is profiled, and
    /// [`crate::backend::gpu::GpuOptions::run_ahead`] is on.
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
    pub(super) fn forget_slots_on_error<T>(&self, state: &GpuState, r: Result<T>) -> Result<T> {
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
    pub(super) fn begin_inner(
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

    pub(super) fn finish_inner(
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
}
