//! Element-wise and small kernels: fused SiLU gate, softmax over the last axis, top-k selection and
//! f16/bf16 ↔ f32 slice conversion.

use super::{check_len, shape_err, KernelResult};
#[cfg(test)]
use half::slice::HalfFloatSliceExt;
#[cfg(test)]
use half::{bf16, f16};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Elements above which element-wise work is split over threads.
const PAR_MIN: usize = 1 << 16;
/// Elements a parallel piece of an element-wise kernel takes (whole rows at least, for softmax).
const PAR_CHUNK: usize = 1 << 13;

/// `GELU(x)` with the tanh approximation (ONNX `Gelu`, `approximate = "tanh"`; PyTorch's
/// `gelu_pytorch_tanh`): `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
///
/// Computed as `x·sigmoid(2y) = x / (1 + e^(−2y))` with `y = √(2/π)·(x + 0.044715·x³)` (the same
/// value: `(1 + tanh y)/2 = sigmoid(2y)`) and [`exp_f32`], so loops over it vectorize and the
/// negative tail does not cancel; within 2e-6 relative of the f64 formula (tested).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const C2: f32 = 2.0 * 0.797_884_6; // 2·√(2/π)
    x / (1.0 + exp_f32(-C2 * (x + 0.044_715 * x * x * x)))
}

/// `e^x` in f32, branch-free (so loops calling it vectorize; `f32::exp` is a library call): `x`
/// clamped to [−87.3, 88.3], `x = n·ln2 + r` with `n` rounded to nearest by the 1.5·2²³ trick,
/// `e^r` by Cephes' degree-6 polynomial on |r| ≤ ln2/2, `2^n` built in the exponent bits. Within
/// 3e-7 relative of the true value on [−87.3, 88.3] (tested); below, the clamp's 1.2e-38; NaN
/// stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer in the low bits
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((ni + 127) << 23) as u32)
}

#[inline(always)]
fn silu_mul(g: f32, u: f32) -> f32 {
    g / (1.0 + exp_f32(-g)) * u
}

/// Fused gated-MLP activation: `out[i] = g[i]·sigmoid(g[i])·u[i]` (SiLU(g)·u).
pub fn silu_gate(g: &[f32], u: &[f32], out: &mut [f32]) -> KernelResult {
    gate_with("silu_gate", g, u, out, silu_mul)
}

/// Fused gated-MLP activation: `out[i] = GELU_tanh(g[i])·u[i]` (Gemma's GeGLU, [`gelu_tanh`]).
pub fn gelu_gate(g: &[f32], u: &[f32], out: &mut [f32]) -> KernelResult {
    gate_with("gelu_gate", g, u, out, gelu_mul)
}

#[inline(always)]
fn gelu_mul(g: f32, u: f32) -> f32 {
    gelu_tanh(g) * u
}

/// `out[i] = f(g[i], u[i])`, split over the CPU pool's threads for large inputs.
fn gate_with<F: Fn(f32, f32) -> f32 + Copy + Sync>(
    name: &'static str,
    g: &[f32],
    u: &[f32],
    out: &mut [f32],
    f: F,
) -> KernelResult {
    check_len(name, "up", g.len(), u.len())?;
    check_len(name, "out", g.len(), out.len())?;
    if g.len() >= PAR_MIN {
        super::pool::for_chunks_mut(out, PAR_CHUNK, &|i, o| {
            let at = i * PAR_CHUNK..i * PAR_CHUNK + o.len();
            map2(o, &g[at.clone()], &u[at], f)
        });
    } else {
        map2(out, g, u, f);
    }
    Ok(())
}

/// `o[i] = f(g[i], u[i])`, compiled for AVX2+FMA where the CPU has them (the loop vectorizes: `f` is
/// monomorphized, inlined and branch-free, as the gates are).
fn map2<F: Fn(f32, f32) -> f32 + Copy>(o: &mut [f32], g: &[f32], u: &[f32], f: F) {
    #[inline(always)]
    fn body<F: Fn(f32, f32) -> f32>(o: &mut [f32], g: &[f32], u: &[f32], f: F) {
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = f(*g, *u);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2<F: Fn(f32, f32) -> f32>(o: &mut [f32], g: &[f32], u: &[f32], f: F) {
            body(o, g, u, f)
        }
        if super::simd::best_isa() != super::simd::Isa::Scalar {
            // SAFETY: best_isa is Avx2 only after detecting avx2 and fma.
            return unsafe { avx2(o, g, u, f) };
        }
    }
    body(o, g, u, f)
}

/// The oracle for [`gelu_gate`] (f64, tanh from the standard library).
#[cfg(test)]
pub fn gelu_gate_reference(g: &[f32], u: &[f32], out: &mut [f32]) -> KernelResult {
    check_len("gelu_gate", "up", g.len(), u.len())?;
    check_len("gelu_gate", "out", g.len(), out.len())?;
    for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
        let x = *g as f64;
        let c = (2.0 / std::f64::consts::PI).sqrt();
        *o = (0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh()) * *u as f64) as f32;
    }
    Ok(())
}

/// [`silu_gate`] written into the gate buffer: `g[i] = SiLU(g[i])·u[i]`.
#[cfg(test)]
pub fn silu_gate_in_place(g: &mut [f32], u: &[f32]) -> KernelResult {
    check_len("silu_gate", "up", g.len(), u.len())?;
    for (g, u) in g.iter_mut().zip(u) {
        *g = silu_mul(*g, *u);
    }
    Ok(())
}

/// The oracle for [`silu_gate`] (f64).
#[cfg(test)]
pub fn silu_gate_reference(g: &[f32], u: &[f32], out: &mut [f32]) -> KernelResult {
    check_len("silu_gate", "up", g.len(), u.len())?;
    check_len("silu_gate", "out", g.len(), out.len())?;
    for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
        let g = *g as f64;
        *o = (g / (1.0 + (-g).exp()) * *u as f64) as f32;
    }
    Ok(())
}

#[cfg(test)]
fn softmax_row(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    if m == f32::NEG_INFINITY {
        // Every entry is −inf (or the row is empty): no mass anywhere.
        x.fill(0.0);
        return;
    }
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Softmax over the last axis of `x [rows, n]`, written to `out`. The maximum is subtracted first
/// (stable); a row that is entirely −inf becomes zeros.
#[cfg(test)]
pub fn softmax(x: &[f32], n: usize, out: &mut [f32]) -> KernelResult {
    check_len("softmax", "out", x.len(), out.len())?;
    out.copy_from_slice(x);
    softmax_in_place(out, n)
}

/// In-place [`softmax`].
#[cfg(test)]
pub fn softmax_in_place(x: &mut [f32], n: usize) -> KernelResult {
    if n == 0 || !x.len().is_multiple_of(n) {
        return Err(shape_err(
            "softmax",
            format!("{} values are not rows of n = {n}", x.len()),
        ));
    }
    if x.len() >= PAR_MIN && x.len() / n > 1 {
        super::pool::for_rows_mut(x, n, PAR_CHUNK, &|_, rows| {
            rows.chunks_mut(n).for_each(softmax_row)
        });
    } else {
        x.chunks_mut(n).for_each(softmax_row);
    }
    Ok(())
}

/// The oracle for [`softmax`] (f64).
#[cfg(test)]
pub fn softmax_reference(x: &[f32], n: usize, out: &mut [f32]) -> KernelResult {
    check_len("softmax", "out", x.len(), out.len())?;
    if n == 0 || !x.len().is_multiple_of(n) {
        return Err(shape_err(
            "softmax",
            format!("{} values are not rows of n = {n}", x.len()),
        ));
    }
    for (o, x) in out.chunks_mut(n).zip(x.chunks(n)) {
        let m = x.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v as f64));
        let s: f64 = x.iter().map(|v| (*v as f64 - m).exp()).sum();
        for (o, v) in o.iter_mut().zip(x) {
            *o = if m == f64::NEG_INFINITY {
                0.0
            } else {
                ((*v as f64 - m).exp() / s) as f32
            };
        }
    }
    Ok(())
}

/// Ranking of top-k: larger value first, NaN below everything, ties → lower index first.
#[inline]
fn better(a: (f32, usize), b: (f32, usize)) -> Ordering {
    let key = |v: f32| (!v.is_nan(), if v.is_nan() { 0.0 } else { v });
    let (ka, kb) = (key(a.0), key(b.0));
    ka.0.cmp(&kb.0)
        .then(ka.1.total_cmp(&kb.1))
        .then(b.1.cmp(&a.1))
}

/// Heap entry ordered so the *worst* kept candidate is at the top.
struct Worst(f32, usize);
impl PartialEq for Worst {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Worst {
    fn cmp(&self, o: &Self) -> Ordering {
        better((o.0, o.1), (self.0, self.1))
    }
}

/// From this `k` on, [`top_k`] sorts integer keys instead of keeping a heap (top-p sampling over the
/// whole vocabulary asks for every entry sorted: 49,152 for SmolLM2).
const SORT_K: usize = 128;

/// `v`'s place in [`better`]'s order as an unsigned integer: NaN lowest, then −∞ … −0.0, +0.0 … +∞.
#[inline]
fn rank_bits(v: f32) -> u32 {
    if v.is_nan() {
        return 0;
    }
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The indices of `x` in [`better`]'s order, best first: an LSD radix sort (three passes of 11 bits)
/// of the rank's complement, stable, so equal values keep their index order.
fn radix_order(x: &[f32]) -> Vec<u32> {
    const BITS: u32 = 11;
    let n = x.len();
    let mut keys: Vec<u32> = x.iter().map(|&v| !rank_bits(v)).collect();
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let (mut keys2, mut idx2) = (vec![0u32; n], vec![0u32; n]);
    for pass in 0..3 {
        let shift = pass * BITS;
        let digit = |key: u32| ((key >> shift) & ((1 << BITS) - 1)) as usize;
        let mut start = vec![0usize; 1 << BITS];
        for &key in &keys {
            start[digit(key)] += 1;
        }
        let mut sum = 0;
        for c in start.iter_mut() {
            (*c, sum) = (sum, sum + *c);
        }
        for (&key, &i) in keys.iter().zip(&idx) {
            let d = &mut start[digit(key)];
            keys2[*d] = key;
            idx2[*d] = i;
            *d += 1;
        }
        std::mem::swap(&mut keys, &mut keys2);
        std::mem::swap(&mut idx, &mut idx2);
    }
    idx
}

/// The `k = values.len()` largest entries of `x`, sorted descending, ties broken by lower index first
/// (NaN ranks below every number; −0.0 ranks below +0.0). `k = 1` is an argmax in two plain passes; up to
/// `SORT_K` (128), `O(n log k)` with a bounded heap; from there `O(n + k log k)` over one u64 key an entry
/// (the rank's complement, then the index: ascending keys are the wanted order); for `k` of at least a
/// quarter of `x`, a radix sort of all of it. Errors if `k > x.len()` or the output slices differ in
/// length.
pub fn top_k(x: &[f32], values: &mut [f32], indices: &mut [usize]) -> KernelResult {
    let k = values.len();
    check_len("top_k", "indices", k, indices.len())?;
    if k > x.len() {
        return Err(shape_err("top_k", format!("k = {k} > n = {}", x.len())));
    }
    if k == 0 {
        return Ok(());
    }
    if k == 1 {
        let i = argmax(x);
        values[0] = x[i];
        indices[0] = i;
        return Ok(());
    }
    if k >= SORT_K && 4 * k >= x.len() && x.len() <= u32::MAX as usize {
        // Most of x: a stable radix sort of the indices by rank (ties keep index order).
        for ((v, i), j) in values
            .iter_mut()
            .zip(indices.iter_mut())
            .zip(radix_order(x))
        {
            *i = j as usize;
            *v = x[*i];
        }
        return Ok(());
    }
    if k >= SORT_K && x.len() <= u32::MAX as usize {
        let mut keys: Vec<u64> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| (u64::from(!rank_bits(v)) << 32) | i as u64)
            .collect();
        if k < keys.len() {
            keys.select_nth_unstable(k - 1);
            keys.truncate(k);
        }
        keys.sort_unstable();
        for ((v, i), key) in values.iter_mut().zip(indices.iter_mut()).zip(&keys) {
            *i = (key & 0xffff_ffff) as usize;
            *v = x[*i];
        }
        return Ok(());
    }
    let mut heap: BinaryHeap<Worst> = BinaryHeap::with_capacity(k + 1);
    // Once the heap is full, the value of its worst entry: an entry strictly below it cannot get in,
    // and one float compare turns it away (NaN compares false, so it and NaN floors take the full
    // comparison).
    let mut floor = f32::NEG_INFINITY;
    for (i, v) in x.iter().enumerate() {
        if heap.len() < k {
            heap.push(Worst(*v, i));
            if heap.len() == k {
                floor = heap.peek().map_or(floor, |w| w.0);
            }
        } else if *v < floor {
            continue;
        } else if let Some(top) = heap.peek() {
            if better((*v, i), (top.0, top.1)) == Ordering::Greater {
                heap.pop();
                heap.push(Worst(*v, i));
                floor = heap.peek().map_or(floor, |w| w.0);
            }
        }
    }
    // into_sorted_vec is ascending by Ord, i.e. best first.
    for (j, w) in heap.into_sorted_vec().into_iter().enumerate() {
        values[j] = w.0;
        indices[j] = w.1;
    }
    Ok(())
}

/// The index [`top_k`] ranks first in non-empty `x`: the largest number (`+0.0` above `−0.0`), the
/// lowest index among equals, NaN only when there is nothing else. Two plain passes (a max that
/// vectorizes, then the first index holding it) instead of one rank comparison an element: a decode
/// step's greedy choice scans the whole vocabulary.
fn argmax(x: &[f32]) -> usize {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let first = |want: u32| x.iter().position(|v| v.to_bits() == want);
    let found = if m == 0.0 {
        first(0.0f32.to_bits()).or_else(|| first((-0.0f32).to_bits()))
    } else {
        x.iter().position(|&v| v == m)
    };
    // Only all-NaN input finds nothing: then the first NaN is the first entry.
    found.unwrap_or(0)
}

/// The oracle for [`top_k`]: a full stable sort.
#[cfg(test)]
pub fn top_k_reference(x: &[f32], values: &mut [f32], indices: &mut [usize]) -> KernelResult {
    let k = values.len();
    check_len("top_k", "indices", k, indices.len())?;
    if k > x.len() {
        return Err(shape_err("top_k", format!("k = {k} > n = {}", x.len())));
    }
    let mut all: Vec<(f32, usize)> = x.iter().copied().zip(0..).collect();
    all.sort_by(|a, b| better(*b, *a));
    for j in 0..k {
        values[j] = all[j].0;
        indices[j] = all[j].1;
    }
    Ok(())
}

/// The in-graph token choice after its `TopK` (docs/GRAPH.md), over one row of `k` values sorted
/// best first: the softmax `p`, the nucleus (`cumsum(p) − p < top_p`), and the draw — how many
/// prefix sums of the kept mass are `≤ u · Σ kept`, at most `k − 1`. Returns that position in the
/// row. The float operations are the graph's nodes', in their order (sequential sums, division by
/// the softmax's sum), so the position equals the generic nodes' bit for bit; the planner proves
/// that on samples before it uses this (`plan::choice`). Errors on an empty row.
pub fn nucleus_pick(vals: &[f32], top_p: f32, u: f32) -> KernelResult<usize> {
    let k = vals.len();
    if k == 0 {
        return Err(shape_err("nucleus_pick", "no candidates (k = 0)"));
    }
    let m = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = vals
        .iter()
        .map(|&x| {
            if m == f32::NEG_INFINITY {
                0.0
            } else {
                (x - m).exp()
            }
        })
        .collect();
    let s = p.iter().fold(0.0f32, |s, &x| s + x);
    if s > 0.0 {
        p.iter_mut().for_each(|x| *x /= s);
    }
    // p becomes the kept mass (p · keep) in place: p itself is not needed after.
    let mut c = 0.0f32;
    for pi in p.iter_mut() {
        c += *pi;
        let keep = if c - *pi < top_p { 1.0 } else { 0.0 };
        *pi *= keep;
    }
    let total = p.iter().fold(0.0f32, |s, &x| s + x);
    let thr = u * total;
    let mut ck = 0.0f32;
    let mut count = 0usize;
    for &x in &p {
        ck += x;
        count += usize::from(ck <= thr);
    }
    Ok(count.min(k - 1))
}

/// f16 → f32 (SIMD via `half`).
#[cfg(test)]
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) -> KernelResult {
    check_len("f16_to_f32", "dst", src.len(), dst.len())?;
    src.convert_to_f32_slice(dst);
    Ok(())
}

/// f32 → f16, round to nearest even (SIMD via `half`).
#[cfg(test)]
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) -> KernelResult {
    check_len("f32_to_f16", "dst", src.len(), dst.len())?;
    dst.convert_from_f32_slice(src);
    Ok(())
}

/// bf16 → f32.
#[cfg(test)]
pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) -> KernelResult {
    check_len("bf16_to_f32", "dst", src.len(), dst.len())?;
    src.convert_to_f32_slice(dst);
    Ok(())
}

/// f32 → bf16, round to nearest even.
#[cfg(test)]
pub fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) -> KernelResult {
    check_len("f32_to_bf16", "dst", src.len(), dst.len())?;
    dst.convert_from_f32_slice(src);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nz() -> impl Strategy<Value = f32> {
        prop_oneof![-30f32..-1e-3, 1e-3f32..30.0]
    }

    #[test]
    fn exp_f32_is_within_3e_7_relative() {
        let mut worst = 0f64;
        for i in 0..=175_600 {
            let x = -87.3f32 + i as f32 * 0.001;
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            assert!(rel <= 3e-7, "exp({x}) = {} vs {want}: {rel:e}", exp_f32(x));
        }
        assert!(worst > 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(-1e4) < 1.3e-38 && exp_f32(-1e4) >= 0.0);
        assert!(exp_f32(1e4).is_finite() && exp_f32(1e4) > 2e38);
        assert_eq!(exp_f32(0.0), 1.0);
        // The gates' tails: GELU and SiLU go to 0 (not NaN) far left and to x far right.
        assert!(gelu_tanh(-1e4).abs() < 1e-30);
        assert_eq!(gelu_tanh(1e4), 1e4);
        assert!(silu_mul(-1e4, 1.0).abs() < 1e-30);
        assert_eq!(silu_mul(1e4, 1.0), 1e4);
    }

    #[test]
    fn gates_split_over_threads_match_the_serial_loop() {
        let n = PAR_MIN * 2 + 77;
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 4001) as f32 / 200.0 - 10.0)
            .collect();
        let u: Vec<f32> = (0..n).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
        for (gate, act) in [
            (
                silu_gate as fn(&[f32], &[f32], &mut [f32]) -> KernelResult,
                silu_mul as fn(f32, f32) -> f32,
            ),
            (gelu_gate, gelu_mul),
        ] {
            let mut got = vec![f32::NAN; n];
            gate(&g, &u, &mut got).unwrap();
            for i in 0..n {
                assert_eq!(got[i], act(g[i], u[i]), "[{i}]");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn silu_matches(g in prop::collection::vec(nz(), 1..300), seed in any::<u32>()) {
            let u: Vec<f32> = g.iter().enumerate().map(|(i, v)| v * 0.3 + ((i as u32 ^ seed) % 7) as f32 + 0.5).collect();
            let mut want = vec![0f32; g.len()];
            silu_gate_reference(&g, &u, &mut want).unwrap();
            let mut got = vec![0f32; g.len()];
            silu_gate(&g, &u, &mut got).unwrap();
            let mut inplace = g.clone();
            silu_gate_in_place(&mut inplace, &u).unwrap();
            for i in 0..g.len() {
                prop_assert!((got[i] - want[i]).abs() <= 1e-6 * (1.0 + want[i].abs()));
                prop_assert_eq!(got[i], inplace[i]);
            }
        }

        #[test]
        fn gelu_gate_matches(g in prop::collection::vec(nz(), 1..300), seed in any::<u32>()) {
            let u: Vec<f32> = g.iter().enumerate().map(|(i, v)| v * 0.3 + ((i as u32 ^ seed) % 7) as f32 + 0.5).collect();
            let mut want = vec![0f32; g.len()];
            gelu_gate_reference(&g, &u, &mut want).unwrap();
            let mut got = vec![0f32; g.len()];
            gelu_gate(&g, &u, &mut got).unwrap();
            for i in 0..g.len() {
                prop_assert!((got[i] - want[i]).abs() <= 2e-6 * (1.0 + want[i].abs()), "{} {} {}", g[i], got[i], want[i]);
            }
        }

        #[test]
        fn softmax_matches((n, x) in (1usize..200, 1usize..5).prop_flat_map(|(n, r)| (Just(n), prop::collection::vec(nz(), n * r)))) {
            let mut want = vec![0f32; x.len()];
            softmax_reference(&x, n, &mut want).unwrap();
            let mut got = vec![0f32; x.len()];
            softmax(&x, n, &mut got).unwrap();
            for i in 0..x.len() {
                prop_assert!((got[i] - want[i]).abs() <= 1e-6 + 1e-5 * want[i]);
            }
            for row in got.chunks(n) {
                prop_assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }

        #[test]
        fn top_k_matches_sort(
            x in prop::collection::vec(prop_oneof![nz(), Just(1.5f32), Just(-2.0f32)], 1..400),
            kf in 0f64..1.0,
        ) {
            // Repeated values (1.5, −2) exercise the tie rule.
            let k = ((x.len() as f64 * kf) as usize).max(1).min(x.len());
            for k in [1, k, x.len()] {
                let (mut v, mut i) = (vec![0f32; k], vec![0usize; k]);
                let (mut rv, mut ri) = (vec![0f32; k], vec![0usize; k]);
                top_k(&x, &mut v, &mut i).unwrap();
                top_k_reference(&x, &mut rv, &mut ri).unwrap();
                prop_assert_eq!(&v, &rv);
                prop_assert_eq!(&i, &ri);
            }
        }
    }

    #[test]
    fn top_k_edges() {
        let x = [1.0, 3.0, f32::NAN, 3.0, -0.0, 0.0, f32::NEG_INFINITY];
        let (mut v, mut i) = ([0f32; 7], [0usize; 7]);
        top_k(&x, &mut v, &mut i).unwrap();
        assert_eq!(i, [1, 3, 0, 5, 4, 6, 2]);
        let (mut v1, mut i1) = ([0f32; 1], [0usize; 1]);
        top_k(&[f32::NAN, 2.0, 2.0], &mut v1, &mut i1).unwrap();
        assert_eq!((v1[0], i1[0]), (2.0, 1));
        // The single-pass argmax against the rank order: signed zeros, infinities, NaN-only rows.
        let cases: [&[f32]; 7] = [
            &[-0.0, 0.0, -0.0],
            &[-0.0, -0.0, f32::NAN],
            &[f32::NAN, f32::NAN],
            &[f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY],
            &[-1.0, f32::INFINITY, f32::INFINITY],
            &[f32::NAN, -3.0, -5.0, -3.0],
            &[0.0, -0.0, f32::NAN, 0.0],
        ];
        for x in cases {
            let (mut rv, mut ri) = ([0f32; 1], [0usize; 1]);
            top_k(x, &mut v1, &mut i1).unwrap();
            top_k_reference(x, &mut rv, &mut ri).unwrap();
            assert_eq!((v1[0].to_bits(), i1[0]), (rv[0].to_bits(), ri[0]), "{x:?}");
        }
        assert!(top_k(&[1.0], &mut [0.0; 2], &mut [0; 2]).is_err());
        assert!(top_k(&[1.0, 2.0], &mut [0.0; 1], &mut [0; 2]).is_err());
        top_k(&[1.0], &mut [], &mut []).unwrap();
    }

    /// The heap and sorted-keys paths over NaNs, signed zeros, infinities and ties, bit for bit.
    #[test]
    fn top_k_edges_on_every_path() {
        let specials = [
            f32::NAN,
            -0.0,
            0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.5,
            -2.0,
        ];
        let x: Vec<f32> = (0..1000)
            .map(|i| match i % 9 {
                j @ 0..=6 => specials[j],
                _ => ((i * 7919) % 1000) as f32 / 37.0 - 13.0,
            })
            .collect();
        // The heap (k < SORT_K, with its one-compare floor) and the sorted keys, over the same x.
        for k in [2, 7, 40, SORT_K - 1, SORT_K, 500, 999, 1000] {
            let (mut v, mut i) = (vec![0f32; k], vec![0usize; k]);
            let (mut rv, mut ri) = (vec![0f32; k], vec![0usize; k]);
            top_k(&x, &mut v, &mut i).unwrap();
            top_k_reference(&x, &mut rv, &mut ri).unwrap();
            assert_eq!(i, ri, "k {k}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&v), bits(&rv), "k {k}");
        }
    }

    #[test]
    fn softmax_edges() {
        let mut x = [f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        softmax_in_place(&mut x, 2).unwrap();
        assert_eq!(x, [0.0, 0.0, 1.0, 0.0]);
        let mut big = [1000.0f32, 1000.0];
        softmax_in_place(&mut big, 2).unwrap();
        assert_eq!(big, [0.5, 0.5]);
        assert!(softmax_in_place(&mut [1.0; 3], 2).is_err());
        assert!(softmax_in_place(&mut [1.0; 3], 0).is_err());
        assert!(silu_gate(&[1.0; 3], &[1.0; 2], &mut [0.0; 3]).is_err());
        // Large input takes the parallel path.
        let g: Vec<f32> = (0..100_000)
            .map(|i| (i % 200) as f32 / 10.0 - 10.0 + 0.05)
            .collect();
        let (mut a, mut b) = (vec![0f32; g.len()], vec![0f32; g.len()]);
        silu_gate(&g, &g, &mut a).unwrap();
        silu_gate_reference(&g, &g, &mut b).unwrap();
        assert!(a
            .iter()
            .zip(&b)
            .all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + b.abs())));
    }

    #[test]
    fn half_conversions_roundtrip() {
        let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.37 - 5.0 + 0.01).collect();
        let mut h = vec![f16::ZERO; 37];
        f32_to_f16(&x, &mut h).unwrap();
        let mut back = vec![0f32; 37];
        f16_to_f32(&h, &mut back).unwrap();
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 1e-3 * a.abs().max(1e-2));
            assert_eq!(*b, f16::from_f32(*a).to_f32());
        }
        let mut bh = vec![bf16::ZERO; 37];
        f32_to_bf16(&x, &mut bh).unwrap();
        bf16_to_f32(&bh, &mut back).unwrap();
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 8e-3 * a.abs());
        }
        assert!(f16_to_f32(&h, &mut back[..3]).is_err());
    }
}
