//! Recording and submission: a step's commands into compute passes and copies, early submissions,
//! read-backs and the GPU timestamps of profiling ([`Stamps`]).

use super::*;

/// GPU timestamps around every dispatch of a submission (profiling, on adapters with timestamp
/// queries inside passes): the per-kernel profile then measures the kernels as they run in the step.
pub(super) struct Stamps {
    pub(super) set: wgpu::QuerySet,
    pub(super) resolve: wgpu::Buffer,
    pub(super) read: wgpu::Buffer,
    /// Dispatches a submission can time (two queries each).
    pub(super) cap: usize,
    /// Nanoseconds a tick.
    pub(super) period: f64,
}

impl Stamps {
    pub(super) fn new(ctx: &GpuContext, dispatches: usize) -> Stamps {
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

impl GpuPlan {
    /// Records `cmds` into `enc`: runs of dispatches in one compute pass each, cache uploads (through the
    /// state's staging belt) and row copies between them, in order.
    pub(super) fn record(
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
    pub(super) fn submit_early(
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
    pub(super) fn submit(
        &self,
        state: &GpuState,
        enc: wgpu::CommandEncoder,
    ) -> Result<wgpu::SubmissionIndex> {
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
    pub(super) fn send(
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
    pub(super) fn receive(&self, state: &GpuState, f: &mut Flight, read: Read) -> Result<()> {
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

/// Checks that bytes `at..at + n` of `buf` can take part in a copy (4-byte aligned, inside the buffer);
/// the size as a `BufferSize`, `None` when empty.
pub(super) fn copy_range(buf: &wgpu::Buffer, at: u64, n: u64) -> Result<Option<wgpu::BufferSize>> {
    if !at.is_multiple_of(4) || !n.is_multiple_of(4) || at + n > buf.size() {
        return Err(Error::internal(format!(
            "a KV-cache copy of bytes {at}..{} does not fit a {}-byte buffer or is not 4-byte aligned",
            at + n,
            buf.size()
        )));
    }
    Ok(wgpu::BufferSize::new(n))
}
