//! One sequence's GPU side of its KV cache ([`GpuState`]): resident layers and the ring of two streamed
//! slots, and the per-step bookkeeping of the cache traffic ([`Kv`]).

use super::*;

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
    pub(super) home: Vec<usize>,
    /// Per plan cache: rows a segment holds (the cache's slots when it is not split).
    pub(super) seg_rows: Vec<usize>,
    pub(super) bufs: Vec<wgpu::Buffer>,
    /// Per plan cache: the ring index of its layer when streamed.
    pub(super) ring: Vec<Option<usize>>,
    /// Streamed layers' cache pairs in ring order.
    pub(super) streams: Vec<[usize; 2]>,
    /// Ring slots.
    pub(super) nslots: usize,
    /// Per buffer: (the plan cache whose rows it holds, how many leading rows match the host).
    pub(super) held: Mutex<Vec<(Option<usize>, usize)>>,
    pub(super) groups: HashMap<(usize, usize), wgpu::BindGroup>,
    /// Upload memory (host-visible, recycled after each submission).
    pub(super) belt: Mutex<wgpu::util::StagingBelt>,
    /// New rows of every cache for one step (read back once, at the end of the step), in two sets: a
    /// step run ahead uses the other one than the step it follows (see [`Flight::parity`]).
    pub(super) rows: [wgpu::Buffer; 2],
    /// Read-back buffers by value, in the same two sets.
    pub(super) fetch: Mutex<[HashMap<ValId, Arc<wgpu::Buffer>>; 2]>,
    /// The first index of the last token choice on the GPU, saved from the shared activation buffers
    /// when the step reads back (a step run ahead is fed from here: another sequence's steps,
    /// submitted in between, may have overwritten the shared buffer).
    pub(super) token: wgpu::Buffer,
    pub(super) stats: Mutex<crate::kv::KvStats>,
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
    pub(super) fn for_pieces(
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

impl GpuPlan {
    /// A fresh sequence state for `caches` (`(dtype, [1, KVH, S, D])` of every plan cache) under a GPU
    /// memory budget: resident layers first, the rest through a ring of two slots (see [`GpuState`]).
    pub fn new_state(
        &self,
        plan: &Plan,
        caches: &[(DType, Vec<usize>)],
        budget: crate::kv::GpuCacheBudget,
        max_chunk: usize,
    ) -> Result<GpuState> {
        if let Some((_, s)) = caches.iter().find(|(_, s)| s.len() != 4) {
            return Err(Error::device(
                DeviceFault::Unsupported,
                format!("cache shape {s:?} is not [1, KVH, S, D]"),
            ));
        }
        let r = residency(plan, caches, budget)?;
        let rows_bytes: u64 = caches
            .iter()
            .map(|(dt, shape)| (shape[1] * shape[3] * dt.size() * max_chunk.max(1)) as u64)
            .sum();
        let mut st = GpuState {
            home: vec![usize::MAX; caches.len()],
            seg_rows: vec![1; caches.len()],
            bufs: Vec::new(),
            ring: vec![None; caches.len()],
            streams: r.layers[r.resident..].to_vec(),
            nslots: r.nslots,
            held: Mutex::new(Vec::new()),
            groups: HashMap::new(),
            belt: Mutex::new(wgpu::util::StagingBelt::new(
                self.ctx.device.clone(),
                (4 << 20).min(r.layer_bytes.max(1 << 16)),
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
        let gpu_bytes = self.cache_buffers(&mut st, caches, &r)?;
        if let Ok(mut k) = st.stats.lock() {
            k.layers_resident = r.resident;
            k.layers_streamed = r.layers.len() - r.resident;
            k.slots = r.nslots;
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

    /// Creates `st`'s cache buffers as `r` places the layers (the resident ones, then the ring's
    /// slots; caches no attention reads get their own), split into segments of whole rows; the bytes.
    fn cache_buffers(
        &self,
        st: &mut GpuState,
        caches: &[(DType, Vec<usize>)],
        r: &Residency,
    ) -> Result<u64> {
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
        for (li, pair) in r.layers.iter().enumerate() {
            if li < r.resident {
                for &c in pair {
                    let first = alloc(st, format!("cache {c}"), c, caches[c].1[2])?;
                    held.resize(st.bufs.len(), (None, 0));
                    held[first] = (Some(c), usize::MAX);
                    st.home[c] = first;
                }
            } else {
                let i = li - r.resident;
                if i < r.nslots {
                    let mut b = [0; 2];
                    for (k, bk) in b.iter_mut().enumerate() {
                        let c = pair[k];
                        *bk = alloc(st, format!("cache slot {i}.{k}"), c, caches[c].1[2])?;
                        held.resize(st.bufs.len(), (None, 0));
                    }
                    slot_bufs.push(b);
                }
                for (k, &c) in pair.iter().enumerate() {
                    st.home[c] = slot_bufs[i % r.nslots][k];
                    st.ring[c] = Some(i);
                }
            }
        }
        // Caches no attention step reads (none in a step graph) still get a buffer of their own.
        for (c, (_, shape)) in caches.iter().enumerate() {
            if st.home[c] == usize::MAX {
                let first = alloc(st, format!("cache {c}"), c, shape[2])?;
                held.resize(st.bufs.len(), (None, 0));
                held[first] = (Some(c), usize::MAX);
                st.home[c] = first;
            }
        }
        st.held = Mutex::new(held);
        Ok(gpu_bytes)
    }
}

/// Where a state's layers live under a budget ([`residency`]).
struct Residency {
    /// The attention steps' cache pairs, in plan order.
    layers: Vec<[usize; 2]>,
    /// Layers resident on the GPU (the first ones).
    resident: usize,
    /// Ring slots the streamed layers share (0–2).
    nslots: usize,
    /// The largest layer's bytes (both caches).
    layer_bytes: u64,
}

/// The layers of `plan` that `budget` keeps resident, and the ring slots for the rest: all resident if
/// they fit, else two fewer than fit (the two slots take their room). Streamed layers must share one
/// cache shape (a slot serves each of them).
fn residency(
    plan: &Plan,
    caches: &[(DType, Vec<usize>)],
    budget: crate::kv::GpuCacheBudget,
) -> Result<Residency> {
    use crate::kv::GpuCacheBudget;
    let bytes_of = |c: usize| -> u64 {
        caches
            .get(c)
            .map(|(dt, shape)| (shape.iter().product::<usize>() * dt.size()) as u64)
            .unwrap_or(0)
    };
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
    if let Some(first) = layers.get(resident) {
        if layers[resident..]
            .iter()
            .any(|p| (0..2).any(|k| caches.get(p[k]) != caches.get(first[k])))
        {
            let why = "streamed layers have caches of different shapes; use a budget that \
                       keeps them resident (`--gpu-cache-budget all`)";
            return Err(Error::device(DeviceFault::Unsupported, why));
        }
    }
    Ok(Residency {
        layers,
        resident,
        nslots,
        layer_bytes,
    })
}

/// Per-step bookkeeping of the KV cache traffic (see [`GpuState`]).
pub(super) struct Kv {
    /// Working copy of [`GpuState::held`].
    pub(super) held: Vec<(Option<usize>, usize)>,
    /// Per ring index: dispatches recorded when its upload was issued (None: nothing uploaded).
    pub(super) up_at: Vec<Option<usize>>,
    pub(super) stalls: u64,
    pub(super) up: u64,
    pub(super) down: u64,
    /// Bytes of new rows copied so far (the next offset in the rows buffer).
    pub(super) off: u64,
    /// The caches whose new rows were copied, with their offsets in the rows buffer.
    pub(super) downs: Vec<(usize, u64)>,
    /// Dispatches recorded so far.
    pub(super) ndisp: usize,
}

impl Kv {
    /// Issues the upload of streamed layer `i`'s missing rows (`< position`) into its slot.
    pub(super) fn prefetch(
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
    pub(super) fn before_attention(&mut self, state: &GpuState, past: [usize; 2]) {
        if let Some(i) = state.ring[past[0]] {
            if self.up_at.get(i).copied().flatten() == Some(self.ndisp) {
                self.stalls += 1;
            }
        }
    }
}
