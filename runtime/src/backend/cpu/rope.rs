//! Rotary position embedding (ONNX `RotaryEmbedding`, batch 1).
//!
//! `x` is `[H, T, D]` (heads first, ONNX 4-D input) or `[T, H, D]` (tokens first, ONNX 3-D input
//! `[1, T, H·D]`), see [`RopeShape::tokens_first`]. `cos`/`sin` are the caches `[max_pos, R/2]` where
//! `R = rotary_dim ≤ D`; `positions [T]` picks the cache row per token. Only the first `R` values of each
//! head are rotated:
//! - non-interleaved: pairs `(i, i + R/2)`;
//! - interleaved: pairs `(2i, 2i + 1)`;
//!
//! with `(a, b) → (a·cos − b·sin, b·cos + a·sin)`. Positions outside `[0, max_pos)` are an error.

use super::{check_len, mul_dims, shape_err, KernelResult};

/// Elements above which rows are rotated in parallel (over the CPU pool's threads).
const PAR_MIN: usize = 1 << 16;
/// Elements (whole rows) a parallel piece takes at least.
const PAR_CHUNK: usize = 1 << 13;

/// Shape and mode of a rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeShape {
    /// Number of heads `H`.
    pub heads: usize,
    /// Number of tokens `T`.
    pub tokens: usize,
    /// Head size `D`.
    pub head_dim: usize,
    /// Rotated prefix `R` of each head (even, `≤ D`); the cache rows hold `R/2` values.
    pub rotary_dim: usize,
    /// `x` is `[T, H, D]` instead of `[H, T, D]`.
    pub tokens_first: bool,
    /// Pairs are `(2i, 2i+1)` instead of `(i, i + R/2)`.
    pub interleaved: bool,
}

/// Validates everything; returns the positions as cache row indices.
fn check(
    x_len: usize,
    s: &RopeShape,
    cos: &[f32],
    sin: &[f32],
    positions: &[i64],
) -> KernelResult<Vec<usize>> {
    const K: &str = "rope";
    check_len(
        K,
        "x",
        mul_dims(K, &[s.heads, s.tokens, s.head_dim])?,
        x_len,
    )?;
    check_len(K, "positions", s.tokens, positions.len())?;
    let r = s.rotary_dim;
    if r == 0 || !r.is_multiple_of(2) || r > s.head_dim {
        return Err(shape_err(
            K,
            format!(
                "rotary_dim {r} must be even, > 0 and ≤ head_dim {}",
                s.head_dim
            ),
        ));
    }
    let half = r / 2;
    if !cos.len().is_multiple_of(half) {
        return Err(shape_err(
            K,
            format!(
                "cos cache has {} values, not a multiple of rotary_dim/2 = {half}",
                cos.len()
            ),
        ));
    }
    check_len(K, "sin", cos.len(), sin.len())?;
    let max_pos = cos.len() / half;
    positions
        .iter()
        .map(|&p| {
            usize::try_from(p)
                .ok()
                .filter(|&p| p < max_pos)
                .ok_or_else(|| {
                    shape_err(K, format!("position {p} outside the cache [0, {max_pos})"))
                })
        })
        .collect()
}

fn rotate(row: &mut [f32], c: &[f32], sn: &[f32], interleaved: bool) {
    let half = c.len();
    if interleaved {
        for ((pair, c), s) in row[..2 * half].chunks_exact_mut(2).zip(c).zip(sn) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = b * c + a * s;
        }
    } else {
        let (lo, hi) = row[..2 * half].split_at_mut(half);
        for (((a, b), c), s) in lo.iter_mut().zip(hi.iter_mut()).zip(c).zip(sn) {
            let (x, y) = (*a, *b);
            *a = x * c - y * s;
            *b = y * c + x * s;
        }
    }
}

/// Rotates `x` in place.
pub fn rope_in_place(
    x: &mut [f32],
    s: &RopeShape,
    cos: &[f32],
    sin: &[f32],
    positions: &[i64],
) -> KernelResult {
    let pos = check(x.len(), s, cos, sin, positions)?;
    let half = s.rotary_dim / 2;
    let d = s.head_dim;
    if d == 0 {
        return Ok(());
    }
    let f = |(i, row): (usize, &mut [f32])| {
        let t = if s.tokens_first {
            i / s.heads
        } else {
            i % s.tokens
        };
        let p = pos[t];
        rotate(
            row,
            &cos[p * half..(p + 1) * half],
            &sin[p * half..(p + 1) * half],
            s.interleaved,
        );
    };
    if x.len() >= PAR_MIN {
        super::pool::for_rows_mut(x, d, PAR_CHUNK, &|r0, rows| {
            rows.chunks_mut(d)
                .enumerate()
                .for_each(|(i, row)| f((r0 + i, row)))
        });
    } else {
        x.chunks_mut(d).enumerate().for_each(f);
    }
    Ok(())
}

/// Out-of-place [`rope_in_place`]: `out = rope(x)`.
#[cfg(test)]
pub fn rope(
    x: &[f32],
    s: &RopeShape,
    cos: &[f32],
    sin: &[f32],
    positions: &[i64],
    out: &mut [f32],
) -> KernelResult {
    check_len("rope", "out", x.len(), out.len())?;
    check(x.len(), s, cos, sin, positions)?;
    out.copy_from_slice(x);
    rope_in_place(out, s, cos, sin, positions)
}

/// The test oracle: the ONNX definition written out with explicit indices, in f64.
#[cfg(test)]
pub fn reference(
    x: &[f32],
    s: &RopeShape,
    cos: &[f32],
    sin: &[f32],
    positions: &[i64],
    out: &mut [f32],
) -> KernelResult {
    check_len("rope", "out", x.len(), out.len())?;
    let pos = check(x.len(), s, cos, sin, positions)?;
    let (d, half) = (s.head_dim, s.rotary_dim / 2);
    for h in 0..s.heads {
        for t in 0..s.tokens {
            let base = if s.tokens_first {
                (t * s.heads + h) * d
            } else {
                (h * s.tokens + t) * d
            };
            out[base..base + d].copy_from_slice(&x[base..base + d]);
            for i in 0..half {
                let (ia, ib) = if s.interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                let c = cos[pos[t] * half + i] as f64;
                let sn = sin[pos[t] * half + i] as f64;
                let (a, b) = (x[base + ia] as f64, x[base + ib] as f64);
                out[base + ia] = (a * c - b * sn) as f32;
                out[base + ib] = (b * c + a * sn) as f32;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cache(max_pos: usize, half: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
        let mut c = vec![];
        let mut s = vec![];
        for p in 0..max_pos {
            for i in 0..half {
                let a = p as f64 / theta.powf(2.0 * i as f64 / (2 * half) as f64);
                c.push(a.cos() as f32);
                s.push(a.sin() as f32);
            }
        }
        (c, s)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_reference(
            heads in 1usize..5, tokens in 1usize..6, half_d in 1usize..40, partial in any::<bool>(),
            tokens_first in any::<bool>(), interleaved in any::<bool>(), seed in any::<u64>(),
        ) {
            let d = 2 * half_d;
            let r = if partial && half_d > 1 { 2 * (half_d / 2) } else { d };
            let s = RopeShape { heads, tokens, head_dim: d, rotary_dim: r, tokens_first, interleaved };
            let (c, sn) = cache(50, r / 2, 10000.0);
            let x: Vec<f32> = (0..heads * tokens * d).map(|i| (((i as u64 + 1).wrapping_mul(seed | 1)) % 1999) as f32 / 500.0 - 1.999 + 1e-3).collect();
            let positions: Vec<i64> = (0..tokens).map(|t| ((seed as usize).wrapping_add(7 * t) % 50) as i64).collect();
            let mut want = vec![0f32; x.len()];
            reference(&x, &s, &c, &sn, &positions, &mut want).unwrap();
            let mut got = vec![0f32; x.len()];
            rope(&x, &s, &c, &sn, &positions, &mut got).unwrap();
            for i in 0..x.len() {
                prop_assert!((got[i] - want[i]).abs() <= 1e-6 * (1.0 + want[i].abs()), "{}: {} vs {}", i, got[i], want[i]);
            }
        }
    }

    #[test]
    fn known_rotation_and_layouts() {
        // D = 4, position 1 with angle π/2 on pair 0 and 0 on pair 1.
        let cos = [1.0, 1.0, 0.0, 1.0];
        let sin = [0.0, 0.0, 1.0, 0.0];
        let s = RopeShape {
            heads: 1,
            tokens: 1,
            head_dim: 4,
            rotary_dim: 4,
            tokens_first: false,
            interleaved: false,
        };
        let mut x = [1.0, 2.0, 3.0, 4.0]; // pairs (x0,x2) and (x1,x3)
        rope_in_place(&mut x, &s, &cos, &sin, &[1]).unwrap();
        assert_eq!(x, [-3.0, 2.0, 1.0, 4.0]);
        let s = RopeShape {
            interleaved: true,
            ..s
        };
        let mut x = [1.0, 2.0, 3.0, 4.0]; // pairs (x0,x1) and (x2,x3)
        rope_in_place(&mut x, &s, &cos, &sin, &[1]).unwrap();
        assert_eq!(x, [-2.0, 1.0, 3.0, 4.0]);
        // Large input takes the parallel path and agrees with the reference (T > 1, tokens first).
        let s = RopeShape {
            heads: 9,
            tokens: 128,
            head_dim: 64,
            rotary_dim: 64,
            tokens_first: true,
            interleaved: false,
        };
        let (c, sn) = cache(256, 32, 1e5);
        let x: Vec<f32> = (0..9 * 128 * 64)
            .map(|i| (i % 97) as f32 / 50.0 - 0.97)
            .collect();
        let pos: Vec<i64> = (100..228).collect();
        let (mut a, mut b) = (x.clone(), vec![0f32; x.len()]);
        rope_in_place(&mut a, &s, &c, &sn, &pos).unwrap();
        reference(&x, &s, &c, &sn, &pos, &mut b).unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()));
        }
    }

    #[test]
    fn errors() {
        let s = RopeShape {
            heads: 1,
            tokens: 1,
            head_dim: 4,
            rotary_dim: 4,
            tokens_first: false,
            interleaved: false,
        };
        let (c, sn) = cache(2, 2, 1e4);
        let mut x = [1.0f32; 4];
        assert!(rope_in_place(&mut x, &s, &c, &sn, &[2]).is_err());
        assert!(rope_in_place(&mut x, &s, &c, &sn, &[-1]).is_err());
        assert!(rope_in_place(&mut x, &s, &c, &sn, &[0, 1]).is_err());
        assert!(rope_in_place(&mut x[..3], &s, &c, &sn, &[0]).is_err());
        assert!(rope_in_place(&mut x, &RopeShape { rotary_dim: 3, ..s }, &c, &sn, &[0]).is_err());
        assert!(rope_in_place(&mut x, &RopeShape { rotary_dim: 6, ..s }, &c, &sn, &[0]).is_err());
        assert!(rope_in_place(&mut x, &s, &c, &sn[..3], &[0]).is_err());
        assert!(rope(&x, &s, &c, &sn, &[0], &mut [0.0; 3]).is_err());
    }
}
