//! Small scalar building blocks used by the generic ops (RMSNorm, rotary rows, top-k selection).

/// RMSNorm over rows of length `n`: `y = x / sqrt(mean(x²) + eps) · scale`.
pub fn rms_norm(
    x: &[f32],
    scale: &[f32],
    eps: f32,
    n: usize,
    out: &mut [f32],
) -> Result<(), String> {
    if n == 0 || x.len() % n != 0 || out.len() != x.len() || (scale.len() != n && scale.len() != 1)
    {
        return Err(format!(
            "rms_norm: x {} / out {} / scale {} do not fit rows of {n}",
            x.len(),
            out.len(),
            scale.len()
        ));
    }
    for (xr, or) in x.chunks(n).zip(out.chunks_mut(n)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for j in 0..n {
            let s = if scale.len() == 1 { scale[0] } else { scale[j] };
            or[j] = xr[j] * inv * s;
        }
    }
    Ok(())
}

/// Rotates one head row in place with the cos/sin of its position (`cos.len() == row.len() / 2`).
pub fn rotate_row(row: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = row.len() / 2;
    for i in 0..half {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x0, x1) = (row[a], row[b]);
        row[a] = x0 * cos[i] - x1 * sin[i];
        row[b] = x0 * sin[i] + x1 * cos[i];
    }
}

/// Indices of the `k` largest (or smallest) values, best first; ties go to the lower index.
pub fn top_k(v: &[f32], k: usize, largest: bool) -> Vec<usize> {
    let better = |a: usize, b: usize| -> bool {
        let (x, y) = (v[a], v[b]);
        if x == y {
            a < b
        } else if largest {
            x > y
        } else {
            x < y
        }
    };
    if k == 1 {
        let mut best = 0;
        for i in 1..v.len() {
            if better(i, best) {
                best = i;
            }
        }
        return if v.is_empty() { vec![] } else { vec![best] };
    }
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| {
        if better(a, b) {
            std::cmp::Ordering::Less
        } else if better(b, a) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    idx.truncate(k);
    idx
}

/// Element types a cache may hold.
pub trait CacheElem: bytemuck::Pod + Send + Sync {
    /// Widen to f32.
    fn get(self) -> f32;
}
impl CacheElem for f32 {
    #[inline]
    fn get(self) -> f32 {
        self
    }
}
impl CacheElem for half::f16 {
    #[inline]
    fn get(self) -> f32 {
        self.to_f32()
    }
}

/// Attention of `q` `[H, T, D]` over the first `p` slots of a `[KVH, S, D]` cache plus the chunk's own
/// rows `[KVH, T, D]` (causal among themselves); head `h` uses kv head `h / (H / KVH)`.
/// Writes `out` `[H, T, D]`. Slots `p..S` are never read.
#[allow(clippy::too_many_arguments)]
pub fn cache_attention<E: CacheElem>(
    q: &[f32],
    past_k: &[E],
    past_v: &[E],
    new_k: &[f32],
    new_v: &[f32],
    heads: usize,
    kv_heads: usize,
    t: usize,
    d: usize,
    slots: usize,
    p: usize,
    scale: f32,
    out: &mut [f32],
) {
    use rayon::prelude::*;
    let group = heads / kv_heads;
    out.par_chunks_mut(t * d).enumerate().for_each(|(h, oh)| {
        let kh = h / group;
        let mut scores = vec![0.0f32; p + t];
        for ti in 0..t {
            let qr = &q[(h * t + ti) * d..][..d];
            let n = p + ti + 1;
            for (j, sc) in scores.iter_mut().enumerate().take(n) {
                let mut acc = 0.0f32;
                if j < p {
                    let kr = &past_k[(kh * slots + j) * d..][..d];
                    for x in 0..d {
                        acc += qr[x] * kr[x].get();
                    }
                } else {
                    let kr = &new_k[(kh * t + (j - p)) * d..][..d];
                    for x in 0..d {
                        acc += qr[x] * kr[x];
                    }
                }
                *sc = acc * scale;
            }
            let m = scores[..n]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for s in &mut scores[..n] {
                *s = (*s - m).exp();
                sum += *s;
            }
            let o = &mut oh[ti * d..(ti + 1) * d];
            o.iter_mut().for_each(|x| *x = 0.0);
            for (j, &w) in scores[..n].iter().enumerate() {
                let w = w / sum;
                if j < p {
                    let vr = &past_v[(kh * slots + j) * d..][..d];
                    for x in 0..d {
                        o[x] += w * vr[x].get();
                    }
                } else {
                    let vr = &new_v[(kh * t + (j - p)) * d..][..d];
                    for x in 0..d {
                        o[x] += w * vr[x];
                    }
                }
            }
        }
    });
}
