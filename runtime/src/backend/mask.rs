//! The attended-prefix analysis of the contract's mask, shared by the backends: a step whose mask is
//! the standard one (past slots `< p` attended, the chunk causal among itself) attends the first `p`
//! cache rows, so the attention kernels read only those.

use crate::graph::DType;
use crate::tensor::Tensor;

/// If `mask` is the contract's mask — `[T, S+T]` (leading dims of 1 allowed), past slots `< p`
/// attended and the rest masked in every row, the chunk causal among itself — returns `p`.
pub(crate) fn standard_prefix(mask: &Tensor, t: usize, slots: usize) -> Option<usize> {
    let r = mask.rank();
    if r < 2 || mask.shape[r - 2] != t || mask.shape[r - 1] != slots + t {
        return None;
    }
    if mask.shape[..r - 2].iter().any(|&d| d != 1) {
        return None;
    }
    // Boolean (true = attend) or additive float (0 = attend, -inf = masked) masks; read in place (this
    // runs for every attention of every step).
    match mask.dtype {
        DType::Bool => prefix_of(mask.typed::<u8>(), t, slots, |&b| Some(b != 0)),
        DType::F32 => prefix_of(mask.typed::<f32>(), t, slots, |&x| {
            if x == 0.0 {
                Some(true)
            } else if x == f32::NEG_INFINITY {
                Some(false)
            } else {
                None
            }
        }),
        _ => None,
    }
}

/// [`standard_prefix`] over mask elements `m` (`[t, slots + t]`), `allowed` telling an attended element
/// from a masked one (`None`: neither, not a standard mask).
fn prefix_of<T>(
    m: &[T],
    t: usize,
    slots: usize,
    allowed: impl Fn(&T) -> Option<bool>,
) -> Option<usize> {
    let w = slots + t;
    if m.len() != t * w {
        return None;
    }
    let mut p = 0;
    while p < slots && allowed(&m[p])? {
        p += 1;
    }
    for ti in 0..t {
        let row = &m[ti * w..(ti + 1) * w];
        for (j, x) in row.iter().enumerate() {
            let want = if j < slots { j < p } else { j - slots <= ti };
            if allowed(x)? != want {
                return None;
            }
        }
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract's mask for `t` new tokens after `p` of `slots` cache slots, as bools.
    fn mask(t: usize, slots: usize, p: usize) -> Vec<bool> {
        let mut m = Vec::new();
        for ti in 0..t {
            m.extend((0..slots).map(|j| j < p));
            m.extend((0..t).map(|j| j <= ti));
        }
        m
    }

    fn f32_mask(m: &[bool], t: usize, w: usize) -> Tensor {
        let v: Vec<f32> = m
            .iter()
            .map(|&a| if a { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        Tensor::from_slice(DType::F32, &[1, 1, t, w], &v)
    }

    #[test]
    fn standard_prefix_finds_the_attended_cache_prefix_and_rejects_other_masks() {
        for (t, slots, p) in [(1, 8, 0), (1, 8, 5), (3, 16, 7), (4, 4, 4), (2, 9, 0)] {
            let m = mask(t, slots, p);
            let w = slots + t;
            let b: Vec<u8> = m.iter().map(|&a| a as u8).collect();
            let bt = Tensor::from_slice(DType::Bool, &[1, t, w], &b);
            assert_eq!(
                standard_prefix(&bt, t, slots),
                Some(p),
                "bool {t} {slots} {p}"
            );
            assert_eq!(
                standard_prefix(&f32_mask(&m, t, w), t, slots),
                Some(p),
                "f32 {t} {slots} {p}"
            );
            // A hole in the prefix, a later slot attended, a non-causal chunk, another value, a
            // wrong shape: not the standard mask.
            let mut bad = Vec::new();
            if p > 1 {
                let mut x = m.clone();
                x[(t - 1) * w + p / 2] = false;
                bad.push(x);
            }
            if p < slots {
                let mut x = m.clone();
                x[slots - 1] = true;
                bad.push(x);
            }
            if t > 1 {
                let mut x = m.clone();
                x[slots + 1] = true;
                bad.push(x);
            }
            for x in bad {
                assert_eq!(standard_prefix(&f32_mask(&x, t, w), t, slots), None);
            }
            let mut odd: Vec<f32> = m.iter().map(|&a| if a { 0.0 } else { -1e9 }).collect();
            odd[0] = 0.5;
            let ot = Tensor::from_slice(DType::F32, &[1, 1, t, w], &odd);
            assert_eq!(standard_prefix(&ot, t, slots), None);
            assert_eq!(standard_prefix(&f32_mask(&m, t, w), t, slots + 1), None);
        }
    }
}
