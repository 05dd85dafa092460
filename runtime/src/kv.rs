//! The KV cache of one sequence, held by the host in fixed-size pages.
//!
//! Every cache of the step graph (`past.{i}.key` / `past.{i}.value`, declared `[1, KVH, S, D]`) is kept
//! here **token-major**: a page holds `page_rows` consecutive positions, each position all KV heads' `D`
//! values (`[page_rows, KVH, D]`). Pages are allocated when the rows that fall in them are first written and
//! freed when the sequence is truncated below them, so a session's memory grows with the context it uses,
//! not with `max_cache`. Token-major pages make the rows of a chunk one contiguous byte range: the new rows
//! a step writes, and the used prefix a GPU slot needs, are each one copy per page.
//!
//! The host copy is the truth. The CPU backend attends over the pages directly; the GPU backend keeps as
//! many layers resident as its budget allows and streams the rest through a ring of slots, uploading only
//! the pages of the used prefix a slot does not hold yet (see `backend/gpu/exec/state.rs`), and reads back only
//! the new rows of each step.

use crate::error::{Error, Result};
use crate::graph::DType;
use crate::tensor::Tensor;

/// Default rows (positions) per page.
pub const DEFAULT_PAGE_ROWS: usize = 64;

/// How a sequence's KV cache is kept (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvOptions {
    /// Positions per host page (≥ 1).
    pub page_rows: usize,
    /// GPU memory for KV caches (GPU backend only): how many layers stay resident; the others stream
    /// through a ring of two slots.
    pub gpu_budget: GpuCacheBudget,
    /// Largest single GPU buffer for one layer's K or V (GPU backend; default and maximum: the adapter's
    /// storage-binding limit). A longer cache is split into segments of whole rows, each attended by its
    /// own dispatch and combined, so a context longer than any one allocation the adapter allows runs.
    /// Fixed when the model is loaded ([`crate::LoadOptions::kv`]).
    pub gpu_segment_bytes: Option<u64>,
}

impl Default for KvOptions {
    fn default() -> Self {
        KvOptions {
            page_rows: DEFAULT_PAGE_ROWS,
            gpu_budget: GpuCacheBudget::All,
            gpu_segment_bytes: None,
        }
    }
}

/// The GPU memory the KV caches of one sequence may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuCacheBudget {
    /// Every layer resident.
    All,
    /// At most this many bytes (resident layers plus the two ring slots; never less than the two slots).
    Bytes(u64),
    /// This percentage (1..=100) of what all layers resident would take. (wgpu does not report an
    /// adapter's memory size, so a share of the cache is what can be stated portably.)
    Percent(u8),
}

impl std::str::FromStr for GpuCacheBudget {
    type Err = Error;

    /// `all`, a byte count with an optional `K`/`M`/`G` (or `KiB`/`MiB`/`GiB`, all binary) suffix, or a
    /// whole percentage of the full cache (`50%`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!(
                "GPU cache budget `{s}`: expected `all`, bytes (`48M`, `1GiB`) or a percentage (`50%`)"
            ))
        };
        let t = s.trim();
        if t.eq_ignore_ascii_case("all") {
            return Ok(GpuCacheBudget::All);
        }
        if let Some(p) = t.strip_suffix('%') {
            let v: u8 = p.trim().parse().map_err(|_| bad())?;
            if !(1..=100).contains(&v) {
                return Err(bad());
            }
            return Ok(GpuCacheBudget::Percent(v));
        }
        let lower = t.to_ascii_lowercase();
        let (num, mul) = [
            ("gib", 1u64 << 30),
            ("mib", 1 << 20),
            ("kib", 1 << 10),
            ("g", 1 << 30),
            ("m", 1 << 20),
            ("k", 1 << 10),
            ("b", 1),
        ]
        .iter()
        .find_map(|(suf, m)| lower.strip_suffix(suf).map(|n| (n.trim().to_string(), *m)))
        .unwrap_or((lower.clone(), 1));
        let v: u64 = num.parse().map_err(|_| bad())?;
        v.checked_mul(mul)
            .map(GpuCacheBudget::Bytes)
            .ok_or_else(bad)
    }
}

/// One cache (`K` or `V` of a layer) in host pages.
#[derive(Debug, Clone)]
pub struct CachePages {
    /// Element type.
    pub dtype: DType,
    /// KV heads.
    pub heads: usize,
    /// Positions (`max_cache`).
    pub slots: usize,
    /// Head size.
    pub dim: usize,
    page_rows: usize,
    pages: Vec<Tensor>,
}

impl CachePages {
    /// An empty cache of `slots` positions of `heads × dim` elements.
    pub fn new(dtype: DType, heads: usize, slots: usize, dim: usize, page_rows: usize) -> Self {
        CachePages {
            dtype,
            heads,
            slots,
            dim,
            // A page never needs more rows than the cache has.
            page_rows: page_rows.clamp(1, slots.max(1)),
            pages: Vec::new(),
        }
    }

    /// Bytes of one position (all heads).
    pub fn row_bytes(&self) -> usize {
        self.heads * self.dim * self.dtype.size()
    }

    /// Positions per page.
    pub fn page_rows(&self) -> usize {
        self.page_rows
    }

    /// The allocated pages (`[page_rows, KVH, D]` each), in position order.
    pub fn pages(&self) -> &[Tensor] {
        &self.pages
    }

    /// Bytes of host memory the allocated pages take.
    pub fn host_bytes(&self) -> u64 {
        (self.pages.len() * self.page_rows * self.row_bytes()) as u64
    }

    fn ensure(&mut self, rows: usize) {
        let need = rows.div_ceil(self.page_rows);
        while self.pages.len() < need {
            self.pages.push(Tensor::zeros(
                self.dtype,
                &[self.page_rows, self.heads, self.dim],
            ));
        }
    }

    /// Writes `rows` positions from `at` (token-major bytes, `rows × row_bytes`).
    pub fn write_rows(&mut self, at: usize, rows: usize, src: &[u8]) -> Result<()> {
        let rb = self.row_bytes();
        if at + rows > self.slots || src.len() != rows * rb {
            return Err(Error::InvalidArgument(format!(
                "cache write of {} bytes as {rows} rows at {at} (rows of {rb} bytes, {} slots)",
                src.len(),
                self.slots
            )));
        }
        self.ensure(at + rows);
        let mut done = 0;
        while done < rows {
            let p = at + done;
            let (pg, r) = (p / self.page_rows, p % self.page_rows);
            let n = (self.page_rows - r).min(rows - done);
            self.pages[pg].bytes_mut()[r * rb..(r + n) * rb]
                .copy_from_slice(&src[done * rb..(done + n) * rb]);
            done += n;
        }
        Ok(())
    }

    /// Writes `t` new rows from the graph's head-major `[1, KVH, T, D]` output at position `at`.
    pub fn write_head_major(&mut self, at: usize, new: &Tensor) -> Result<()> {
        let (h, d, es) = (self.heads, self.dim, self.dtype.size());
        if new.dtype != self.dtype || new.rank() != 4 || new.shape[1] != h || new.shape[3] != d {
            return Err(Error::InvalidArgument(format!(
                "new rows {} {:?} do not fit a cache of {} [1, {h}, _, {d}]",
                new.dtype, new.shape, self.dtype
            )));
        }
        let t = new.shape[2];
        if at + t > self.slots {
            return Err(Error::InvalidArgument(format!(
                "cache write of {t} rows at {at} ({} slots)",
                self.slots
            )));
        }
        self.ensure(at + t);
        // Head-major source, token-major pages: one D-element run per (head, row).
        let (src, run, pr) = (new.bytes(), d * es, self.page_rows);
        for r in 0..t {
            let (pg, pr_row) = ((at + r) / pr, (at + r) % pr);
            let page = self.pages[pg].bytes_mut();
            for head in 0..h {
                let from = (head * t + r) * run;
                let to = (pr_row * h + head) * run;
                page[to..to + run].copy_from_slice(&src[from..from + run]);
            }
        }
        Ok(())
    }

    /// Calls `f(position, bytes)` for the pieces (at most one a page) of positions `a..b`.
    pub fn for_range(&self, a: usize, b: usize, mut f: impl FnMut(usize, &[u8])) {
        let rb = self.row_bytes();
        let mut p = a;
        while p < b {
            let (pg, r) = (p / self.page_rows, p % self.page_rows);
            let n = (self.page_rows - r).min(b - p);
            match self.pages.get(pg) {
                Some(page) => f(p, &page.bytes()[r * rb..(r + n) * rb]),
                None => f(p, &vec![0u8; n * rb]),
            }
            p += n;
        }
    }

    /// Frees the pages wholly at or past position `len`.
    pub fn truncate(&mut self, len: usize) {
        self.pages.truncate(len.div_ceil(self.page_rows));
    }

    /// The first `len` positions as the graph's head-major `[1, KVH, S, D]` tensor (zeros past `len`), for
    /// graphs that read a cache other than through the fused attention.
    pub fn to_head_major(&self, len: usize) -> Tensor {
        let (h, d, es, s) = (self.heads, self.dim, self.dtype.size(), self.slots);
        let mut t = Tensor::zeros(self.dtype, &[1, h, s, d]);
        let out = t.bytes_mut();
        self.for_range(0, len.min(s), |p0, bytes| {
            for (i, row) in bytes.chunks(h * d * es).enumerate() {
                for head in 0..h {
                    let to = (head * s + p0 + i) * d * es;
                    out[to..to + d * es].copy_from_slice(&row[head * d * es..(head + 1) * d * es]);
                }
            }
        });
        t
    }
}

/// Every cache of one sequence.
#[derive(Debug, Clone)]
pub struct PagedCache {
    /// One per plan cache, in the plan's order.
    pub caches: Vec<CachePages>,
}

impl PagedCache {
    /// Empty caches for `(dtype, [1, KVH, S, D])` each.
    pub fn new(shapes: &[(DType, Vec<usize>)], page_rows: usize) -> Result<Self> {
        let caches = shapes
            .iter()
            .map(|(dt, s)| {
                if s.len() != 4 || s[0] != 1 {
                    return Err(Error::Contract(format!(
                        "cache shape {s:?} is not [1, KVH, S, D]"
                    )));
                }
                Ok(CachePages::new(*dt, s[1], s[2], s[3], page_rows))
            })
            .collect::<Result<_>>()?;
        Ok(PagedCache { caches })
    }

    /// Host bytes of all allocated pages.
    pub fn host_bytes(&self) -> u64 {
        self.caches.iter().map(|c| c.host_bytes()).sum()
    }

    /// Frees pages past `len` in every cache.
    pub fn truncate(&mut self, len: usize) {
        self.caches.iter_mut().for_each(|c| c.truncate(len));
    }
}

/// Transfer and residency counters of one sequence's KV cache.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvStats {
    /// Layers (attention steps) whose caches stay on the GPU.
    pub layers_resident: usize,
    /// Layers streamed through the ring.
    pub layers_streamed: usize,
    /// Ring slots (each one layer's K and V).
    pub slots: usize,
    /// GPU bytes the caches take (resident layers + slots).
    pub gpu_bytes: u64,
    /// Host bytes of the allocated pages.
    pub host_bytes: u64,
    /// Bytes uploaded to the GPU by the last step (cache pages only).
    pub step_bytes_up: u64,
    /// Bytes read back by the last step (new cache rows only).
    pub step_bytes_down: u64,
    /// Uploads of the last step that could not be issued ahead of the previous layer's compute.
    pub step_stalls: u64,
    /// Host milliseconds of the last step spent packing pages into upload buffers.
    pub step_pack_ms: f64,
    /// Steps since the state was created.
    pub steps: u64,
    /// Cache bytes uploaded since the state was created.
    pub bytes_up: u64,
    /// Cache bytes read back since the state was created.
    pub bytes_down: u64,
    /// Stalls since the state was created.
    pub stalls: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn rows_cross_pages_and_read_back_in_order() {
        let mut c = CachePages::new(DType::F16, 3, 50, 4, 8);
        let rb = c.row_bytes();
        assert_eq!(rb, 24);
        let a = pattern(13 * rb, 1);
        c.write_rows(0, 13, &a).unwrap();
        assert_eq!(c.pages().len(), 2);
        let b = pattern(7 * rb, 2);
        c.write_rows(13, 7, &b).unwrap();
        assert_eq!(c.pages().len(), 3);
        let mut got = Vec::new();
        let mut pieces = 0;
        c.for_range(0, 20, |p, bytes| {
            assert_eq!(p * rb, got.len());
            got.extend_from_slice(bytes);
            pieces += 1;
        });
        assert_eq!(pieces, 3);
        assert_eq!(&got[..13 * rb], &a[..]);
        assert_eq!(&got[13 * rb..], &b[..]);
        assert_eq!(c.host_bytes(), 3 * 8 * 24);
        c.truncate(9);
        assert_eq!(c.pages().len(), 2);
        assert!(c.write_rows(45, 6, &pattern(6 * rb, 3)).is_err());
        assert!(c.write_rows(0, 1, &[0; 5]).is_err());
    }

    #[test]
    fn head_major_round_trip() {
        let (h, t, d) = (2, 5, 3);
        let src: Vec<f32> = (0..h * t * d).map(|i| i as f32 * 0.5 - 3.0).collect();
        let new = Tensor::f32(&[1, h, t, d], &src);
        let mut c = CachePages::new(DType::F32, h, 9, d, 4);
        c.write_head_major(2, &new).unwrap();
        let full = c.to_head_major(7);
        assert_eq!(full.shape, vec![1, h, 9, d]);
        let f = full.typed::<f32>();
        for head in 0..h {
            for r in 0..t {
                for i in 0..d {
                    assert_eq!(f[(head * 9 + 2 + r) * d + i], src[(head * t + r) * d + i]);
                }
            }
            assert!(f[head * 9 * d..(head * 9 + 2) * d]
                .iter()
                .all(|&v| v == 0.0));
        }
        let bad = Tensor::f32(&[1, 3, 1, d], &[0.0; 9]);
        assert!(c.write_head_major(0, &bad).is_err());
    }

    #[test]
    fn budgets_parse() {
        use GpuCacheBudget::*;
        assert_eq!("all".parse::<GpuCacheBudget>().unwrap(), All);
        assert_eq!("50%".parse::<GpuCacheBudget>().unwrap(), Percent(50));
        assert_eq!("48M".parse::<GpuCacheBudget>().unwrap(), Bytes(48 << 20));
        assert_eq!("1GiB".parse::<GpuCacheBudget>().unwrap(), Bytes(1 << 30));
        assert_eq!("1234".parse::<GpuCacheBudget>().unwrap(), Bytes(1234));
        for bad in [
            "",
            "x",
            "0%",
            "150%",
            "12.5%",
            "-3",
            "99999999999999999999G",
        ] {
            assert!(bad.parse::<GpuCacheBudget>().is_err(), "{bad}");
        }
    }
}
