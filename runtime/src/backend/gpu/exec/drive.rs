//! Driving a step: its steps in order, each described (or its kept description reused), its inputs
//! uploaded and its dispatches queued when it runs on the GPU; a step on the CPU first reads back what it
//! needs from the GPU (the pause of [`GpuPlan::begin`]).

use super::*;

/// Where a step's description comes from this run.
enum Described {
    /// It runs on the CPU.
    Host,
    /// The description kept for this token count still holds.
    Kept,
    /// Described now (`None`: it runs on the CPU this time).
    Fresh(Option<Desc>),
}

impl GpuPlan {
    /// Runs `f`'s steps from where it stands. With `pause`, it stops at the first step that must wait
    /// for the GPU (or at the end), leaving the read-back submitted in `f.read`; without, it runs to the
    /// end, the new cache rows read back.
    pub(super) fn drive(
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
            let found = self.described(plan, f, &prefix, &mut kept[si])?;
            let desc = match &found {
                Described::Host => None,
                Described::Kept => kept[si].as_ref().map(|k| &k.desc),
                Described::Fresh(d) => d.as_ref(),
            };
            match desc {
                Some(d) => self.queue_gpu_step(plan, state, host, f, d)?,
                None => {
                    if self.host_step(plan, state, host, f, pause, cpu_step)? {
                        return Ok(());
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

    /// Step `f.next`'s description: on the CPU, kept (its reads have the metadata they had), or described
    /// now — and kept for the next step of this token count unless it looked at host contents or is an
    /// attention (whose cache prefix moves every step).
    fn described(
        &self,
        plan: &Plan,
        f: &mut Flight,
        prefix: &std::cell::Cell<Option<(ValId, Option<Attended>)>>,
        kept: &mut Option<Kept>,
    ) -> Result<Described> {
        let si = f.next;
        let s = &plan.steps[si];
        if !self.on_gpu[si] {
            return Ok(Described::Host);
        }
        let e = Env::new(
            plan,
            &f.env,
            &f.meta,
            prefix,
            Stage::Run {
                position: f.position,
            },
        );
        if kept
            .as_ref()
            .is_some_and(|k| k.reads.iter().all(|(v, m)| e.meta_is(*v, m)))
        {
            return Ok(Described::Kept);
        }
        let d = self.describe(si, s, &e)?;
        f.described += 1;
        let keep = !e.looked.get() && !matches!(s, Step::CacheAttention { .. });
        Ok(match d {
            Some(d) if keep => {
                let reads = d
                    .reads
                    .iter()
                    .filter_map(|&v| e.meta(v).map(|m| (v, m)))
                    .collect();
                *kept = Some(Kept { desc: d, reads });
                Described::Kept
            }
            d => {
                *kept = None;
                Described::Fresh(d)
            }
        })
    }

    /// Queues step `f.next` on the GPU as `d` describes it: its host inputs uploaded, its outputs'
    /// metadata set, its dispatches' parameters written; after an attention, its new rows' copy back and
    /// the next streamed layer's upload; a submission when enough is queued.
    fn queue_gpu_step(
        &self,
        plan: &Plan,
        state: &GpuState,
        host: &crate::kv::PagedCache,
        f: &mut Flight,
        d: &Desc,
    ) -> Result<()> {
        let si = f.next;
        let s = &plan.steps[si];
        self.upload_reads(plan, f, d)?;
        for &(o, ref m, _) in &d.outs {
            let h = self.home[o]
                .ok_or_else(|| Error::internal(format!("`{}` has no GPU buffer", plan.names[o])))?;
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
                    f.kv.prefetch(state, host, i + state.nslots, f.position, &mut f.pending)?;
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
        Ok(())
    }

    /// Uploads what `d` reads from the host (the fed token ids excepted: the GPU fills them).
    fn upload_reads(&self, plan: &Plan, f: &mut Flight, d: &Desc) -> Result<()> {
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
            let h = self.home[v]
                .ok_or_else(|| Error::internal(format!("`{}` has no GPU buffer", plan.names[v])))?;
            // A graph input still the tensor uploaded last (a transcription window's K/V): there.
            let input = plan.inputs.values().any(|&i| i == v);
            let mut uploaded = self
                .uploaded
                .lock()
                .map_err(|_| Error::internal("upload record poisoned"))?;
            if input && uploaded[v].as_ref().is_some_and(|u| u.same_storage(t)) {
                f.meta[v] = Some(Meta::of(t));
                continue;
            }
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
            if input {
                uploaded[v] = Some(t.clone());
            }
            f.count.up += b.len() as u64;
            f.meta[v] = Some(Meta::of(t));
        }
        Ok(())
    }

    /// Runs step `f.next` on the CPU, after reading back the GPU values it reads (with what later CPU
    /// steps read, and after the last GPU step the wanted outputs and the new cache rows). With
    /// `pause`, a read-back is left submitted in `f.read` and `true` returned: the step is not run.
    fn host_step(
        &self,
        plan: &Plan,
        state: &GpuState,
        host: &crate::kv::PagedCache,
        f: &mut Flight,
        pause: bool,
        cpu_step: &mut CpuStep,
    ) -> Result<bool> {
        let si = f.next;
        let s = &plan.steps[si];
        let reads = crate::plan::step_reads(s);
        let on_gpu = |v: ValId| f.env[v].is_none() && f.meta[v].is_some();
        let mut fetch: Vec<ValId> = reads.iter().copied().filter(|&v| on_gpu(v)).collect();
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
                return Ok(true);
            }
            self.receive(state, f, read)?;
        }
        cpu_step(s, &mut f.env)?;
        if let Step::Node { outputs, .. } = s {
            for &o in outputs {
                f.meta[o] = None;
            }
        }
        Ok(false)
    }
}

/// Writes `bytes` at the start of `buf`, zero-padded to a multiple of 4 bytes (what a queue write takes).
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
