//! The kernel of [`super::attention::attention_paged`]: attention over a sequence's host KV pages,
//! grouped by KV head and split over keys.
//!
//! Decode attends one query row per head against the whole past. Taken a query head at a time, every
//! key costs a conversion of its K and V rows from f16, a dot product, an `exp` and an axpy, each a
//! call of its own, and the query heads of a GQA group convert the same rows once each: on SmolLM2
//! (9 heads over 3 KV heads, D = 64) that was 26 µs a layer at 100 keys on two threads
//! (`kernel_bench`), 16% of a decode step. Here a task is a (token, KV head, key segment): it
//! converts a block of 64 keys and values once for all the group's query heads, scores the block for
//! each head, exponentiates the scores with the branch-free [`exp_f32`] and accumulates the values,
//! in loops compiled for AVX2+FMA where the CPU has them ([`block_avx2`]).
//!
//! With fewer (token, KV head) pairs than [`TASKS_PER_THREAD`] tasks a thread (decode: 3 pairs on
//! SmolLM2, 1 on Gemma 3) the keys of a row are split into segments of at least [`MIN_SEGMENT`] keys.
//! Each task leaves a partial online-softmax state per head — running max `m`, sum `l` of `e^(s−m)`,
//! accumulator `Σ e^(s−m)·v` — and the partials of a row merge as `M = max m`, `l = Σ lᵢ·e^(mᵢ−M)`,
//! `acc = Σ accᵢ·e^(mᵢ−M)`, output `acc / l`. The segments change only the summation order (tested
//! against the f64 reference with every split count).

use super::attention::{AttnShape, KvElement, Sc};
use super::misc::exp_f32;
use std::cell::RefCell;

/// Keys per block (converted once, scored for every query head of the group).
const KEY_BLOCK: usize = 64;
/// Fewest keys in a segment of a split row.
const MIN_SEGMENT: usize = 32;
/// Tasks a call aims to give each thread when rows are split.
const TASKS_PER_THREAD: usize = 4;
/// Multiply-adds (tokens·heads·keys·D) above which tasks run in parallel.
const PAR_MIN: usize = 1 << 15;

/// One call's inputs: past pages `[page_rows, KVH, D]` of `E` covering the first `position` slots,
/// the chunk's own rows `new_k`/`new_v` (f32, laid out as `s` says), an optional sliding window.
pub(super) struct Paged<'a, E> {
    pub q: &'a [f32],
    pub k_pages: &'a [&'a [E]],
    pub v_pages: &'a [&'a [E]],
    pub page_rows: usize,
    pub new_k: &'a [f32],
    pub new_v: &'a [f32],
    pub position: usize,
    pub window: Option<usize>,
    pub s: &'a AttnShape,
    pub sc: Sc,
}

/// The keys of one query row: past positions `past.0..past.1`, then the chunk's rows `new.0..new.1`.
#[derive(Clone, Copy)]
struct Span {
    past: (usize, usize),
    new: (usize, usize),
}

impl<E: KvElement> Paged<'_, E> {
    /// The keys query row `tt` attends (the window's, else everything before and at it).
    fn row_keys(&self, tt: usize) -> Span {
        let p = self.position;
        let first = self.window.map_or(0, |w| (p + tt + 1).saturating_sub(w));
        Span {
            past: (first.min(p), p),
            new: (first.saturating_sub(p), tt + 1),
        }
    }

    /// Segment `i` of `n` of row `tt`'s keys: the past split evenly, the new rows in the last.
    fn segment(&self, tt: usize, i: usize, n: usize) -> Span {
        let r = self.row_keys(tt);
        let len = r.past.1 - r.past.0;
        let at = |k: usize| r.past.0 + len * k / n;
        let new = if i + 1 == n { r.new } else { (0, 0) };
        Span {
            past: (at(i), at(i + 1)),
            new,
        }
    }

    /// Converts K and V rows `j0..j0 + nb` of KV head `kvh` of `span` (past first) into `kb`/`vb`.
    fn fetch(&self, kvh: usize, span: Span, j0: usize, nb: usize, kb: &mut [f32], vb: &mut [f32]) {
        let (s, d) = (self.s, self.s.head_dim);
        let npast = span.past.1 - span.past.0;
        let mut j = 0;
        while j < nb {
            let (dst, n) = if j0 + j < npast {
                let pos = span.past.0 + j0 + j;
                let (pg, r) = (pos / self.page_rows, pos % self.page_rows);
                // the rows of this block in this page, KVH·D apart
                let run = (nb - j).min(npast - j0 - j).min(self.page_rows - r);
                let (o, stride) = ((r * s.kv_heads + kvh) * d, s.kv_heads * d);
                let dst = j * d..(j + run) * d;
                let (kp, vp) = (&self.k_pages[pg][o..], &self.v_pages[pg][o..]);
                E::rows_to_f32(kp, stride, run, d, &mut kb[dst.clone()]);
                E::rows_to_f32(vp, stride, run, d, &mut vb[dst]);
                (j, run)
            } else {
                let o = s.new_kv_off(kvh, span.new.0 + j0 + j - npast);
                kb[j * d..(j + 1) * d].copy_from_slice(&self.new_k[o..o + d]);
                vb[j * d..(j + 1) * d].copy_from_slice(&self.new_v[o..o + d]);
                (j, 1)
            };
            j = dst + n;
        }
    }

    /// One task: the partial state (`[m; G]`, `[l; G]`, `[acc; G·D]`) of query row `tt`'s heads of KV
    /// head `kvh` over `span`, written into `part`.
    fn task(&self, tt: usize, kvh: usize, span: Span, part: &mut [f32]) {
        let (s, d) = (self.s, self.s.head_dim);
        let g = s.heads / s.kv_heads;
        let (m, rest) = part.split_at_mut(g);
        let (l, acc) = rest.split_at_mut(g);
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        acc.fill(0.0);
        let n = (span.past.1 - span.past.0) + span.new.1.saturating_sub(span.new.0);
        if n == 0 {
            return;
        }
        SCRATCH.with_borrow_mut(|buf| {
            buf.resize(g * d + g * KEY_BLOCK + 2 * KEY_BLOCK * d, 0.0);
            let (qs, rest) = buf.split_at_mut(g * d);
            let (scores, rest) = rest.split_at_mut(g * KEY_BLOCK);
            let (kb, vb) = rest.split_at_mut(KEY_BLOCK * d);
            for (hi, qh) in qs.chunks_exact_mut(d).enumerate() {
                let o = s.q_off(kvh * g + hi, tt);
                qh.copy_from_slice(&self.q[o..o + d]);
            }
            let mut j0 = 0;
            while j0 < n {
                let nb = KEY_BLOCK.min(n - j0);
                self.fetch(kvh, span, j0, nb, kb, vb);
                let st = State { m, l, acc };
                block(qs, &kb[..nb * d], &vb[..nb * d], scores, d, self.sc, st);
                j0 += nb;
            }
        });
    }
}

thread_local! {
    /// A thread's block buffers (query heads, scores, converted K and V), reused across tasks.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs the attention into `out` (`[T, H·D]`), the keys of a row split into `splits` segments
/// (`None`: chosen from the shape and the pool's threads). The caller has checked every length.
pub(super) fn run<E: KvElement>(a: &Paged<E>, splits: Option<usize>, out: &mut [f32]) {
    let s = a.s;
    let (d, t) = (s.head_dim, s.tokens);
    let g = s.heads / s.kv_heads;
    let pairs = t * s.kv_heads;
    let threads = super::pool::threads();
    let first = a.row_keys(0);
    let past = first.past.1 - first.past.0;
    let splits = splits.map_or_else(
        || {
            let want = (TASKS_PER_THREAD * threads).div_ceil(pairs);
            if threads == 1 {
                1
            } else {
                want.min(past / MIN_SEGMENT).max(1)
            }
        },
        |n| n.max(1),
    );
    let part = g * (d + 2);
    let mut parts = vec![0f32; pairs * splits * part];
    let task = |i: usize, p: &mut [f32]| {
        let (tt, kvh, seg) = (
            i / (s.kv_heads * splits),
            i / splits % s.kv_heads,
            i % splits,
        );
        a.task(tt, kvh, a.segment(tt, seg, splits), p);
    };
    let work = t * s.heads * (past + t) * d;
    if work >= PAR_MIN && pairs * splits > 1 {
        super::pool::for_chunks_mut(&mut parts, part, &task);
    } else {
        parts
            .chunks_mut(part)
            .enumerate()
            .for_each(|(i, p)| task(i, p));
    }
    merge(&parts, s, splits, out);
}

/// Merges each row's `splits` partial states into `out` (`[T, H·D]`; zeros where no key was attended).
fn merge(parts: &[f32], s: &AttnShape, splits: usize, out: &mut [f32]) {
    let d = s.head_dim;
    let g = s.heads / s.kv_heads;
    let part = g * (d + 2);
    for (pair, o) in out.chunks_mut(g * d).enumerate() {
        let segs = &parts[pair * splits * part..(pair + 1) * splits * part];
        for (hi, oh) in o.chunks_mut(d).enumerate() {
            let top = segs
                .chunks(part)
                .map(|p| p[hi])
                .fold(f32::NEG_INFINITY, f32::max);
            oh.fill(0.0);
            let mut l = 0.0;
            if top > f32::NEG_INFINITY {
                for p in segs.chunks(part) {
                    if p[hi] > f32::NEG_INFINITY {
                        let c = (p[hi] - top).exp();
                        l += p[g + hi] * c;
                        let acc = &p[2 * g + hi * d..2 * g + (hi + 1) * d];
                        oh.iter_mut().zip(acc).for_each(|(o, a)| *o += a * c);
                    }
                }
            }
            if l > 0.0 {
                let inv = 1.0 / l;
                oh.iter_mut().for_each(|o| *o *= inv);
            }
        }
    }
}

/// A task's running state per query head of the group: max, sum, accumulator (`G·D`).
struct State<'a> {
    m: &'a mut [f32],
    l: &'a mut [f32],
    acc: &'a mut [f32],
}

/// Feeds one block of `nb` keys (`kb`, `vb`: `nb·D` f32) to every query head of `qs` (`G·D`).
fn block(qs: &[f32], kb: &[f32], vb: &[f32], scores: &mut [f32], d: usize, sc: Sc, st: State) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::best_isa() == super::simd::Isa::Avx2 {
        // SAFETY: best_isa() returned Avx2 only after detecting avx2, fma and f16c.
        return unsafe { block_avx2(qs, kb, vb, scores, d, sc, st) };
    }
    block_body(qs, kb, vb, scores, d, sc, st)
}

/// [`block_body`] compiled for AVX2+FMA (its loops vectorize to 8 lanes with fused multiply-adds).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_avx2(qs: &[f32], kb: &[f32], vb: &[f32], scores: &mut [f32], d: usize, sc: Sc, st: State) {
    block_body(qs, kb, vb, scores, d, sc, st)
}

#[inline(always)]
fn block_body(qs: &[f32], kb: &[f32], vb: &[f32], scores: &mut [f32], d: usize, sc: Sc, st: State) {
    let nb = kb.len() / d;
    for (hi, qh) in qs.chunks_exact(d).enumerate() {
        let sh = &mut scores[..nb];
        let mut top = f32::NEG_INFINITY;
        for (sj, kj) in sh.iter_mut().zip(kb.chunks_exact(d)) {
            *sj = sc.apply(dot(qh, kj));
            top = top.max(*sj);
        }
        if top == f32::NEG_INFINITY {
            continue;
        }
        let m_new = st.m[hi].max(top);
        let acc = &mut st.acc[hi * d..(hi + 1) * d];
        if st.m[hi] > f32::NEG_INFINITY && st.m[hi] < m_new {
            let c = exp_f32(st.m[hi] - m_new);
            st.l[hi] *= c;
            acc.iter_mut().for_each(|a| *a *= c);
        }
        st.m[hi] = m_new;
        // exponentials, then their sum in 8 lanes (one loop with a running sum would not vectorize)
        sh.iter_mut().for_each(|sj| *sj = exp_f32(*sj - m_new));
        st.l[hi] += sum(sh);
        for (pj, vj) in sh.iter().zip(vb.chunks_exact(d)) {
            for (a, v) in acc.iter_mut().zip(vj) {
                *a = pj.mul_add(*v, *a);
            }
        }
    }
}

/// `Σ x[i]` with 8 independent accumulators (vectorizes; inlined into [`block_body`]).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let c = x.chunks_exact(8);
    let tail: f32 = c.remainder().iter().sum();
    for v in c {
        for l in 0..8 {
            acc[l] += v[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ a[i]·b[i]` with 8 independent accumulators (vectorizes; inlined into [`block_body`]).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}
