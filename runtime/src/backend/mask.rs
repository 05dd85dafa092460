//! The attended-range analysis of the contract's mask, shared by the backends: a step whose mask is
//! the standard one (past slots `< p` attended, the chunk causal among itself) attends the first `p`
//! cache rows, so the attention kernels read only those; a sliding-window mask (Gemma's local layers,
//! mistral) attends, from query row `i` (position `p + i`), only the keys less than `w` positions
//! behind it, so a kernel that knows `w` reads only those.

use crate::graph::DType;
use crate::tensor::Tensor;

/// What a mask lets each query row attend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attended {
    /// Past slots `< prefix` (the sequence's length) may be attended, later ones never.
    pub prefix: usize,
    /// `Some(w)`: row `i` attends past slot `s` only if `s > prefix + i − w`, and the chunk's row `j`
    /// only if `i − w < j ≤ i`. `None`: every past slot and the chunk causally.
    pub window: Option<usize>,
}

/// For the contract's mask — `[T, S+T]` (leading dims of 1 allowed), past slots `< p` attended and
/// the rest masked in every row, the chunk causal among itself — `p` without a window; for a sliding
/// window's, its prefix and width ([`Attended`]); `None` for any other mask.
pub(crate) fn attended(mask: &Tensor, t: usize, slots: usize) -> Option<Attended> {
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
        DType::Bool => attended_of(mask.typed::<u8>(), t, slots, |&b| Some(b != 0)),
        DType::F32 => attended_of(mask.typed::<f32>(), t, slots, |&x| {
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

/// [`attended`] over mask elements `m` (`[t, slots + t]`), `allowed` telling an attended element from
/// a masked one (`None`: neither). The prefix ends row 0's attended past run; the width comes from the
/// first row whose attended keys start after the sequence's first (none: the standard mask); then every
/// element is checked against that pattern. (A row 0 attending no past while the sequence has one — a
/// window of 1 — is read as prefix 0: no past slot is attended either way.)
fn attended_of<T>(
    m: &[T],
    t: usize,
    slots: usize,
    allowed: impl Fn(&T) -> Option<bool>,
) -> Option<Attended> {
    let cols = slots + t;
    if m.len() != t * cols {
        return None;
    }
    let ok = |i: usize| allowed(&m[i]);
    // the prefix: the end of row 0's attended run of the past (0 when it attends none)
    let mut lo0 = 0;
    while lo0 < slots && !ok(lo0)? {
        lo0 += 1;
    }
    let mut p = lo0;
    while p < slots && ok(p)? {
        p += 1;
    }
    let p = if p == lo0 { 0 } else { p };
    // The width, from the first row whose first attended key (past slot or chunk row) is not the
    // sequence's first: row i's first key is at position p + i + 1 − w.
    let window = (0..t).find_map(|i| {
        let row = &m[i * cols..i * cols + slots + i + 1];
        let first = row.iter().position(|x| allowed(x) == Some(true))?;
        let pos = if first < slots {
            first
        } else {
            p + first - slots
        };
        (pos > 0).then(|| (p + i + 1).checked_sub(pos)).flatten()
    });
    let want = |i: usize, j: usize| match (window, j < slots) {
        (None, true) => j < p,
        (None, false) => j - slots <= i,
        (Some(w), true) => j < p && j + w > p + i,
        (Some(w), false) => j - slots <= i && j - slots + w > i,
    };
    for i in 0..t {
        for j in 0..cols {
            if ok(i * cols + j)? != want(i, j) {
                return None;
            }
        }
    }
    Some(Attended { prefix: p, window })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prefix of a standard (unwindowed) mask.
    fn standard_prefix(mask: &Tensor, t: usize, slots: usize) -> Option<usize> {
        attended(mask, t, slots)
            .filter(|a| a.window.is_none())
            .map(|a| a.prefix)
    }

    /// The contract's mask for `t` new tokens after `p` of `slots` cache slots, as bools.
    fn mask(t: usize, slots: usize, p: usize) -> Vec<bool> {
        let mut m = Vec::new();
        for ti in 0..t {
            m.extend((0..slots).map(|j| j < p));
            m.extend((0..t).map(|j| j <= ti));
        }
        m
    }

    /// A sliding window of `win` keys over the same layout.
    fn window_mask(t: usize, slots: usize, p: usize, win: usize) -> Vec<bool> {
        let mut m = Vec::new();
        for ti in 0..t {
            m.extend((0..slots).map(|j| j < p && j + win > p + ti));
            m.extend((0..t).map(|j| j <= ti && j + win > ti));
        }
        m
    }

    /// Windows narrower than the sequence are found with their width; one that covers everything is
    /// the standard mask; a window with a hole, or two widths, is neither.
    #[test]
    fn sliding_windows_are_found_with_their_width() {
        for (t, slots, p) in [(1, 16, 9), (4, 16, 9), (6, 16, 2), (5, 8, 0), (3, 12, 12)] {
            let cols = slots + t;
            for win in 1..=p + t + 2 {
                let m = window_mask(t, slots, p, win);
                let got = attended(&f32_mask(&m, t, cols), t, slots).expect("found");
                if win >= p + t {
                    assert_eq!(
                        got,
                        Attended {
                            prefix: p,
                            window: None
                        },
                        "{t} {slots} {p} {win}"
                    );
                    continue;
                }
                // What was found attends exactly what the mask does (a window of 1 attends no past
                // slot and may read as an empty prefix); wider windows are found as they are.
                let again = match got.window {
                    Some(w) => window_mask(t, slots, got.prefix, w),
                    None => mask(t, slots, got.prefix),
                };
                assert_eq!(again, m, "{t} {slots} {p} {win}: {got:?}");
                if win > 1 {
                    assert_eq!(
                        got,
                        Attended {
                            prefix: p,
                            window: Some(win)
                        },
                        "{t} {slots} {p} {win}"
                    );
                }
                // A hole in the last row: refused, or (where the hole ends the past) read as the
                // shorter prefix it is — never as more than the mask allows.
                let mut x = m.clone();
                if let Some(k) = (0..cols).find(|&j| x[(t - 1) * cols + j]) {
                    if win > 2 {
                        x[(t - 1) * cols + k + 1] = false;
                        if let Some(a) = attended(&f32_mask(&x, t, cols), t, slots) {
                            let again = match a.window {
                                Some(w) => window_mask(t, slots, a.prefix, w),
                                None => mask(t, slots, a.prefix),
                            };
                            assert_eq!(again, x, "hole: {t} {slots} {p} {win}: {a:?}");
                        }
                    }
                }
            }
        }
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
