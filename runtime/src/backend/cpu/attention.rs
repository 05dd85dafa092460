//! Scaled dot-product attention for the static-cache step graph: [`attention_paged`], the runtime's
//! path over a sequence's host KV pages (`crate::kv`).
//!
//! Query `t` (absolute position `p + t`) attends to the past cache slots `0..p` — slots `≥ p` are never
//! read — and to the new rows `0..=t` (causal among themselves), within a sliding window where one is
//! given. Grouped-query attention: query head `h` uses KV head `h / (H / KVH)`. Scores are scaled by
//! `1/√D` unless a scale is given, then soft-capped where a cap is given ([`Scores`]). The past may be
//! f32 or f16 ([`KvElement`]). This file checks the inputs and holds the shapes; the kernel is
//! `attention_paged.rs`: a task per (token, KV head, key segment), each block of keys converted once for
//! the query heads of its group, an online softmax per segment, the segments' states merged.
//!
//! Output layout: `[T, H·D]` (token-major, heads concatenated) — what the following output projection
//! reads directly. Error vs. the f64 references (tests only): ≤ 2e-5·(1 + max|v|) per element.

#[cfg(target_arch = "x86_64")]
use super::simd;
use super::{check_len, mul_dims, shape_err, KernelResult};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Element type of a K/V cache.
pub trait KvElement: Copy + Send + Sync + 'static {
    /// Converts `src` into `dst` (equal lengths).
    fn to_f32_slice(src: &[Self], dst: &mut [f32]);
    /// Converts `rows` rows of `d` elements, `stride` apart from `src[0]` on, into `dst` (`rows·d`,
    /// contiguous): a block of one KV head's keys out of token-major cache pages.
    fn rows_to_f32(src: &[Self], stride: usize, rows: usize, d: usize, dst: &mut [f32]) {
        row_by_row(src, stride, rows, d, dst)
    }
}

fn row_by_row<E: KvElement>(src: &[E], stride: usize, rows: usize, d: usize, dst: &mut [f32]) {
    for (r, o) in dst.chunks_exact_mut(d).take(rows).enumerate() {
        E::to_f32_slice(&src[r * stride..r * stride + d], o);
    }
}

impl KvElement for f32 {
    fn to_f32_slice(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElement for f16 {
    fn to_f32_slice(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn rows_to_f32(src: &[f16], stride: usize, rows: usize, d: usize, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd::best_isa() == simd::Isa::Avx2 {
            // SAFETY: best_isa() returned Avx2 only after detecting avx2, fma and f16c.
            return unsafe { f16_rows_avx2(src, stride, rows, d, dst) };
        }
        row_by_row(src, stride, rows, d, dst)
    }
}

/// [`KvElement::rows_to_f32`] for f16 with F16C, 8 elements an instruction (`half`'s slice conversion
/// costs a feature check and a call per 8 elements: a third of decode attention's time on 64-wide rows).
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_rows_avx2(src: &[f16], stride: usize, rows: usize, d: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    for (r, o) in dst.chunks_exact_mut(d).take(rows).enumerate() {
        let row = &src[r * stride..r * stride + d];
        let mut i = 0;
        // SAFETY: each load reads row[i..i + 8] and each store writes o[i..i + 8], i + 8 <= d.
        unsafe {
            while i + 8 <= d {
                let h = _mm_loadu_si128(row.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(o.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                i += 8;
            }
        }
        for (o, h) in o[i..].iter_mut().zip(&row[i..]) {
            *o = h.to_f32();
        }
    }
}

/// Sizes of an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Query heads `H`.
    pub heads: usize,
    /// Key/value heads `KVH` (divides `H`).
    pub kv_heads: usize,
    /// New tokens `T` (queries).
    pub tokens: usize,
    /// Head size `D`.
    pub head_dim: usize,
    /// Cache length `S` (slots per KV head in the past cache, or keys in the masked variant).
    pub cache_len: usize,
    /// `q` is `[T, H, D]` instead of `[H, T, D]`.
    pub q_tokens_first: bool,
    /// The new K/V rows are `[T, KVH, D]` instead of `[KVH, T, D]` (cached variant only).
    pub kv_tokens_first: bool,
}

impl AttnShape {
    fn check_heads(&self, k: &'static str) -> KernelResult<usize> {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(shape_err(
                k,
                format!(
                    "heads {} not a multiple of kv_heads {}",
                    self.heads, self.kv_heads
                ),
            ));
        }
        Ok(self.heads / self.kv_heads)
    }
    pub(super) fn q_off(&self, h: usize, t: usize) -> usize {
        let d = self.head_dim;
        if self.q_tokens_first {
            (t * self.heads + h) * d
        } else {
            (h * self.tokens + t) * d
        }
    }
    pub(super) fn new_kv_off(&self, kvh: usize, t: usize) -> usize {
        let d = self.head_dim;
        if self.kv_tokens_first {
            (t * self.kv_heads + kvh) * d
        } else {
            (kvh * self.tokens + t) * d
        }
    }
}

/// How scores are treated before the softmax: `cap(q·k · scale)`, `cap(x) = c·tanh(x/c)` with the
/// soft cap `c` where one is set (Gemma 2).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scores {
    /// Multiplies `q·k` (`None`: `1/√D`).
    pub scale: Option<f32>,
    /// The soft cap (`None`: scores are not capped).
    pub softcap: Option<f32>,
}

impl From<Option<f32>> for Scores {
    fn from(scale: Option<f32>) -> Scores {
        Scores {
            scale,
            softcap: None,
        }
    }
}

/// [`Scores`] resolved for head size `D` (`cap` 0: none).
#[derive(Debug, Clone, Copy)]
pub(super) struct Sc {
    scale: f32,
    cap: f32,
}

impl Sc {
    fn of(s: Scores, d: usize) -> Sc {
        Sc {
            scale: s.scale.unwrap_or(1.0 / (d as f32).sqrt()),
            cap: s.softcap.filter(|&c| c > 0.0).unwrap_or(0.0),
        }
    }

    #[inline(always)]
    pub(super) fn apply(self, dot: f32) -> f32 {
        let x = dot * self.scale;
        if self.cap > 0.0 {
            self.cap * (x / self.cap).tanh()
        } else {
            x
        }
    }
}

/// The oracle of masked attention: `q` `[H, T, D]` (or `[T, H, D]`), `k`/`v` `[KVH, S, D]`, `mask`
/// `[T, S]` (true = attend), `out` `[T, H·D]` (zeros for a query with no attended key); materialized
/// scores, two-pass softmax, f64.
#[cfg(test)]
pub(crate) fn reference_masked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[bool],
    s: &AttnShape,
    scores: impl Into<Scores>,
    out: &mut [f32],
) -> KernelResult {
    let group = s.check_heads("attention_masked")?;
    let (d, t, n) = (s.head_dim, s.tokens, s.cache_len);
    check_len("attention_masked", "out", t * s.heads * d, out.len())?;
    check_len("attention_masked", "mask", t * n, mask.len())?;
    check_len("attention_masked", "key", s.kv_heads * n * d, k.len())?;
    check_len("attention_masked", "value", s.kv_heads * n * d, v.len())?;
    check_len("attention_masked", "q", s.heads * t * d, q.len())?;
    let scores = scores.into();
    let scale = scores.scale.map_or(1.0 / (d as f64).sqrt(), |x| x as f64);
    let cap = |x: f64| match scores.softcap {
        Some(c) if c > 0.0 => c as f64 * (x / c as f64).tanh(),
        _ => x,
    };
    for tt in 0..t {
        for h in 0..s.heads {
            let qo = s.q_off(h, tt);
            let base = (h / group) * n * d;
            let scores: Vec<Option<f64>> = (0..n)
                .map(|j| {
                    mask[tt * n + j].then(|| {
                        cap((0..d)
                            .map(|i| q[qo + i] as f64 * k[base + j * d + i] as f64)
                            .sum::<f64>()
                            * scale)
                    })
                })
                .collect();
            let m = scores
                .iter()
                .flatten()
                .fold(f64::NEG_INFINITY, |a, b| a.max(*b));
            let z: f64 = scores.iter().flatten().map(|x| (x - m).exp()).sum();
            for i in 0..d {
                let mut acc = 0.0;
                for (j, sc) in scores.iter().enumerate() {
                    if let Some(sc) = sc {
                        acc += (sc - m).exp() / z * v[base + j * d + i] as f64;
                    }
                }
                out[(tt * s.heads + h) * d + i] = if z > 0.0 { acc as f32 } else { 0.0 };
            }
        }
    }
    Ok(())
}

/// The oracle for [`attention_paged`] (the cache head-major here): builds the concatenated K/V (past slots `0..p`, then the new rows)
/// and the causal mask, then calls [`reference_masked`].
#[allow(clippy::too_many_arguments)]
#[cfg(test)]
pub(crate) fn reference_cached<E: KvElement>(
    q: &[f32],
    past_k: &[E],
    past_v: &[E],
    new_k: &[f32],
    new_v: &[f32],
    position: usize,
    s: &AttnShape,
    scores: impl Into<Scores>,
    out: &mut [f32],
) -> KernelResult {
    reference_windowed(
        q,
        (past_k, past_v),
        (new_k, new_v),
        (position, None),
        s,
        scores,
        out,
    )
}

/// [`reference_cached`] under a sliding window of `w` keys (query row `t` attends positions
/// `> position + t − w`), the oracle of [`attention_paged`]'s window.
#[cfg(test)]
pub(crate) fn reference_windowed<E: KvElement>(
    q: &[f32],
    (past_k, past_v): (&[E], &[E]),
    (new_k, new_v): (&[f32], &[f32]),
    (position, window): (usize, Option<usize>),
    s: &AttnShape,
    scores: impl Into<Scores>,
    out: &mut [f32],
) -> KernelResult {
    const K: &str = "attention";
    let (d, t, p) = (s.head_dim, s.tokens, position);
    check_len(K, "past_key", s.kv_heads * s.cache_len * d, past_k.len())?;
    check_len(K, "past_value", s.kv_heads * s.cache_len * d, past_v.len())?;
    check_len(K, "new_key", s.kv_heads * t * d, new_k.len())?;
    check_len(K, "new_value", s.kv_heads * t * d, new_v.len())?;
    if p > s.cache_len {
        return Err(shape_err(K, "position beyond cache"));
    }
    let total = p + t;
    let mut kk = vec![0f32; s.kv_heads * total * d];
    let mut vv = vec![0f32; s.kv_heads * total * d];
    for h in 0..s.kv_heads {
        for j in 0..total {
            let dst = (h * total + j) * d;
            if j < p {
                let src = (h * s.cache_len + j) * d;
                E::to_f32_slice(&past_k[src..src + d], &mut kk[dst..dst + d]);
                E::to_f32_slice(&past_v[src..src + d], &mut vv[dst..dst + d]);
            } else {
                let src = s.new_kv_off(h, j - p);
                kk[dst..dst + d].copy_from_slice(&new_k[src..src + d]);
                vv[dst..dst + d].copy_from_slice(&new_v[src..src + d]);
            }
        }
    }
    let mask: Vec<bool> = (0..t)
        .flat_map(|tt| {
            (0..total).map(move |j| j <= p + tt && window.is_none_or(|w| j + w > p + tt))
        })
        .collect();
    let s2 = AttnShape {
        cache_len: total,
        ..*s
    };
    reference_masked(q, &kk, &vv, &mask, &s2, scores, out)
}

/// Static-cache attention (see the module docs) over a past cache held in token-major pages
/// (`crate::kv`). `q`: `[H, T, D]` (or `[T, H, D]`); `k_pages`/`v_pages` are
/// `[page_rows, KVH, D]` each, in position order, covering at least the first `position` slots. The new
/// rows are head-major `[KVH, T, D]`. With `window = Some(w)` query row `t` (position `position + t`)
/// attends only keys at positions `> position + t − w` (a sliding window) and reads no other rows.
#[allow(clippy::too_many_arguments)]
pub fn attention_paged<E: KvElement>(
    q: &[f32],
    k_pages: &[&[E]],
    v_pages: &[&[E]],
    page_rows: usize,
    new_k: &[f32],
    new_v: &[f32],
    position: usize,
    window: Option<usize>,
    s: &AttnShape,
    scores: impl Into<Scores>,
    out: &mut [f32],
) -> KernelResult {
    let (new, kv) = ((new_k, new_v), (k_pages, v_pages));
    paged_split(
        q,
        kv,
        page_rows,
        new,
        (position, window),
        s,
        scores,
        None,
        out,
    )
}

/// [`attention_paged`] with each row's keys split into `splits` segments (`None`: chosen from the
/// shape and the threads; tests force every count).
#[allow(clippy::too_many_arguments)]
fn paged_split<E: KvElement>(
    q: &[f32],
    (k_pages, v_pages): (&[&[E]], &[&[E]]),
    page_rows: usize,
    (new_k, new_v): (&[f32], &[f32]),
    (position, window): (usize, Option<usize>),
    s: &AttnShape,
    scores: impl Into<Scores>,
    splits: Option<usize>,
    out: &mut [f32],
) -> KernelResult {
    const K: &str = "attention_paged";
    if window == Some(0) {
        return Err(shape_err(K, "a window of 0 keys"));
    }
    s.check_heads(K)?;
    let (d, t) = (s.head_dim, s.tokens);
    check_len(K, "q", mul_dims(K, &[s.heads, t, d])?, q.len())?;
    let page = mul_dims(K, &[page_rows, s.kv_heads, d])?;
    if page_rows == 0 || k_pages.len() != v_pages.len() {
        return Err(shape_err(K, "pages of K and V differ or are empty"));
    }
    for (kp, vp) in k_pages.iter().zip(v_pages) {
        check_len(K, "key page", page, kp.len())?;
        check_len(K, "value page", page, vp.len())?;
    }
    if position > k_pages.len() * page_rows || position > s.cache_len {
        return Err(shape_err(
            K,
            format!(
                "position {position} beyond the {} paged slots (cache length {})",
                k_pages.len() * page_rows,
                s.cache_len
            ),
        ));
    }
    let new = mul_dims(K, &[s.kv_heads, t, d])?;
    check_len(K, "new_key", new, new_k.len())?;
    check_len(K, "new_value", new, new_v.len())?;
    check_len(K, "out", mul_dims(K, &[t, s.heads, d])?, out.len())?;
    if d == 0 || t == 0 {
        return Ok(());
    }
    let paged = super::attention_paged::Paged {
        q,
        k_pages,
        v_pages,
        page_rows,
        new_k,
        new_v,
        position,
        window,
        s,
        sc: Sc::of(scores.into(), d),
    };
    super::attention_paged::run(&paged, splits, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn rnd(n: usize, rng: &mut StdRng, a: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let v: f32 = rng.random_range(-a..a);
                if v == 0.0 {
                    a / 2.0
                } else {
                    v
                }
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f32], vmax: f32) -> Result<(), String> {
        let tol = 2e-5 * (1.0 + vmax);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            if (g - w).abs() > tol || !g.is_finite() {
                return Err(format!("[{i}] {g} vs {w} (tol {tol})"));
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_cached(
        kvh: usize,
        group: usize,
        t: usize,
        d: usize,
        cache: usize,
        p: usize,
        f16_cache: bool,
        q_tf: bool,
        kv_tf: bool,
        seed: u64,
        qscale: f32,
    ) -> Result<(), String> {
        let mut rng = StdRng::seed_from_u64(seed);
        // A third of the cases soft-cap the scores (Gemma 2), at a cap the scores reach.
        let scores = Scores {
            scale: None,
            softcap: seed.is_multiple_of(3).then_some(1.5),
        };
        let s = AttnShape {
            heads: kvh * group,
            kv_heads: kvh,
            tokens: t,
            head_dim: d,
            cache_len: cache,
            q_tokens_first: q_tf,
            kv_tokens_first: kv_tf,
        };
        let q = rnd(s.heads * t * d, &mut rng, qscale);
        let mut pk = rnd(kvh * cache * d, &mut rng, 2.0);
        let mut pv = rnd(kvh * cache * d, &mut rng, 3.0);
        // Slots ≥ p hold poison: reading them would show up as NaN.
        for h in 0..kvh {
            for j in p..cache {
                for i in 0..d {
                    pk[(h * cache + j) * d + i] = f32::NAN;
                    pv[(h * cache + j) * d + i] = f32::NAN;
                }
            }
        }
        let nk = rnd(kvh * t * d, &mut rng, 2.0);
        let nv = rnd(kvh * t * d, &mut rng, 3.0);
        let mut want = vec![0f32; t * s.heads * d];
        // The cache in token-major pages of 1..=17 rows (poison past `p` too).
        let pr = 1 + (seed % 17) as usize;
        let npages = cache.div_ceil(pr).max(1);
        let paged = |c: &[f32]| -> Vec<Vec<f32>> {
            (0..npages)
                .map(|pg| {
                    let mut page = vec![f32::NAN; pr * kvh * d];
                    for r in 0..pr {
                        let j = pg * pr + r;
                        if j < cache {
                            for h in 0..kvh {
                                page[(r * kvh + h) * d..(r * kvh + h + 1) * d].copy_from_slice(
                                    &c[(h * cache + j) * d..(h * cache + j + 1) * d],
                                );
                            }
                        }
                    }
                    page
                })
                .collect()
        };
        let (kp, vp) = (paged(&pk), paged(&pv));
        let mut got_paged = vec![f32::NAN; t * s.heads * d];
        if f16_cache {
            let hk: Vec<f16> = pk.iter().map(|v| f16::from_f32(*v)).collect();
            let hv: Vec<f16> = pv.iter().map(|v| f16::from_f32(*v)).collect();
            reference_cached(&q, &hk, &hv, &nk, &nv, p, &s, scores, &mut want).unwrap();
            let h16 = |v: &Vec<Vec<f32>>| -> Vec<Vec<f16>> {
                v.iter()
                    .map(|pg| pg.iter().map(|x| f16::from_f32(*x)).collect())
                    .collect()
            };
            let (kh, vh) = (h16(&kp), h16(&vp));
            let kr: Vec<&[f16]> = kh.iter().map(|v| &v[..]).collect();
            let vr: Vec<&[f16]> = vh.iter().map(|v| &v[..]).collect();
            attention_paged(
                &q,
                &kr,
                &vr,
                pr,
                &nk,
                &nv,
                p,
                None,
                &s,
                scores,
                &mut got_paged,
            )
            .unwrap();
        } else {
            reference_cached(&q, &pk, &pv, &nk, &nv, p, &s, scores, &mut want).unwrap();
            let kr: Vec<&[f32]> = kp.iter().map(|v| &v[..]).collect();
            let vr: Vec<&[f32]> = vp.iter().map(|v| &v[..]).collect();
            attention_paged(
                &q,
                &kr,
                &vr,
                pr,
                &nk,
                &nv,
                p,
                None,
                &s,
                scores,
                &mut got_paged,
            )
            .unwrap();
        }
        close(&got_paged, &want, 3.0).map_err(|e| format!("paged ({pr} rows a page): {e}"))?;
        // No window and a sliding one (from one key to past the whole sequence), f32 pages, the keys
        // of a row in every number of segments (more than there are keys too).
        let w = 1 + (seed as usize / 3) % (p + t + 1);
        let kr: Vec<&[f32]> = kp.iter().map(|v| &v[..]).collect();
        let vr: Vec<&[f32]> = vp.iter().map(|v| &v[..]).collect();
        for window in [None, Some(w)] {
            let mut want = vec![0f32; t * s.heads * d];
            let (past, new) = ((&pk[..], &pv[..]), (&nk[..], &nv[..]));
            reference_windowed(&q, past, new, (p, window), &s, scores, &mut want).unwrap();
            for splits in [None, Some(1), Some(2), Some(3), Some(7)] {
                let mut got = vec![f32::NAN; t * s.heads * d];
                let (kv, new) = ((&kr[..], &vr[..]), (&nk[..], &nv[..]));
                paged_split(&q, kv, pr, new, (p, window), &s, scores, splits, &mut got).unwrap();
                close(&got, &want, 3.0).map_err(|e| {
                    format!("window {window:?}, {splits:?} segments ({pr} rows a page): {e}")
                })?;
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn cached_matches_reference(
            kvh in 1usize..4, group in 1usize..4, t in prop_oneof![Just(1usize), 2usize..7], d in 1usize..70,
            cache in 0usize..150, pf in 0f64..=1.0, f16_cache in any::<bool>(), q_tf in any::<bool>(),
            kv_tf in any::<bool>(), seed in any::<u64>(),
        ) {
            let p = (cache as f64 * pf) as usize;
            let r = run_cached(kvh, group, t, d, cache, p, f16_cache, q_tf, kv_tf, seed, 2.0);
            prop_assert!(r.is_ok(), "{:?}", r);
        }

    }

    #[test]
    fn named_cases() {
        // SmolLM2 decode and prefill shapes, parallel path, f16 and f32 caches.
        run_cached(3, 3, 1, 64, 300, 257, true, false, false, 1, 2.0).unwrap();
        run_cached(3, 3, 16, 64, 300, 100, false, true, false, 2, 2.0).unwrap();
        // Position 0 (no past), full cache (p = S).
        run_cached(3, 3, 4, 64, 64, 0, false, false, false, 3, 2.0).unwrap();
        run_cached(1, 2, 2, 8, 33, 33, true, false, true, 4, 2.0).unwrap();
        // Huge scores: online softmax must stay finite and agree.
        run_cached(1, 1, 3, 16, 200, 150, false, false, false, 5, 60.0).unwrap();
    }

    /// A query whose every key the reference's mask hides gives zeros; the paged kernel refuses a
    /// position past its pages or the cache, new rows of the wrong length, heads KV heads do not
    /// divide, a window of 0 keys; equal scores average the values.
    #[test]
    fn fully_masked_row_is_zero_and_bad_shapes_are_errors() {
        let s = AttnShape {
            heads: 2,
            kv_heads: 1,
            tokens: 1,
            head_dim: 2,
            cache_len: 2,
            q_tokens_first: false,
            kv_tokens_first: false,
        };
        let mut out = [f32::NAN; 4];
        let ones = [1.0f32; 4];
        reference_masked(&ones, &ones, &ones, &[false, false], &s, None, &mut out).unwrap();
        assert_eq!(out, [0.0; 4]);
        // One page of the two cache rows, [2, 1, 2].
        let page = [1.0f32; 4];
        let pages: [&[f32]; 1] = [&page];
        let run = |new_k: &[f32], position, window, s: &AttnShape, out: &mut [f32]| {
            attention_paged(
                &ones, &pages, &pages, 2, new_k, &[2.0; 2], position, window, s, None, out,
            )
        };
        assert!(
            run(&[1.0; 2], 3, None, &s, &mut out).is_err(),
            "position past the cache"
        );
        assert!(
            run(&[1.0; 3], 1, None, &s, &mut out).is_err(),
            "new rows of 3"
        );
        assert!(
            run(&[1.0; 2], 1, Some(0), &s, &mut out).is_err(),
            "a window of 0"
        );
        let bad = AttnShape { kv_heads: 3, ..s };
        assert!(
            run(&[1.0; 2], 1, None, &bad, &mut out).is_err(),
            "3 KV heads for 2"
        );
        run(&[1.0; 2], 2, None, &s, &mut out).unwrap();
        // Equal scores: the mean of the values (1, 1, 2) = 4/3.
        assert!(out.iter().all(|v| (v - 4.0 / 3.0).abs() < 1e-6), "{out:?}");
    }
}
