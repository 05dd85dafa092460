//! Instruction-set detection and the small f32 vector helpers the kernels share (dot, axpy, scale).
//!
//! Each helper has a portable scalar body (written with 8 independent accumulators so the compiler can
//! vectorize it) plus an AVX2+FMA body on x86-64 and a NEON body on aarch64.

/// The instruction set a kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Portable Rust, no explicit SIMD.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C (checked at run time; every AVX2 CPU has F16C).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// aarch64 Advanced SIMD (always present on aarch64).
    #[cfg(target_arch = "aarch64")]
    Neon,
}

/// The best instruction set this CPU offers (cached by std's feature detection).
#[inline]
pub(crate) fn best_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        return Isa::Neon;
    }
    #[allow(unreachable_code)]
    Isa::Scalar
}

/// Σ a[i]·b[i] over the common length (callers pass equal lengths).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    match best_isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: best_isa() returned Avx2 only after detecting avx2, fma and f16c on this CPU.
        Isa::Avx2 => unsafe { x86::dot(a, b) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is part of the aarch64 baseline.
        Isa::Neon => unsafe { neon::dot(a, b) },
        Isa::Scalar => dot_scalar(a, b),
    }
}

/// Portable dot product with 8 lanes of accumulation.
pub(crate) fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s = x.mul_add(*y, s);
    }
    s
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Horizontal sum of 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Dot product of equal-length slices.
    ///
    /// # Safety
    /// The CPU must support avx2, fma and f16c; `a.len() == b.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads [i, i+8) with i + 8 <= n (or i + 32 <= n), inside both slices.
        unsafe {
            while i + 32 <= n {
                for (j, a) in acc.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(pa.add(i + 8 * j));
                    let y = _mm256_loadu_ps(pb.add(i + 8 * j));
                    *a = _mm256_fmadd_ps(x, y, *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i)),
                    _mm256_loadu_ps(pb.add(i)),
                    acc[0],
                );
                i += 8;
            }
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut s = hsum(v);
        while i < n {
            s = a[i].mul_add(b[i], s);
            i += 1;
        }
        s
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use std::arch::aarch64::*;

    /// Dot product of equal-length slices.
    ///
    /// # Safety
    /// `a.len() == b.len()` (NEON is baseline on aarch64).
    #[target_feature(enable = "neon")]
    pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        // SAFETY: loads read [i, i+4·k) inside both slices.
        unsafe {
            while i + 16 <= n {
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = vfmaq_f32(
                        *a,
                        vld1q_f32(pa.add(i + 4 * j)),
                        vld1q_f32(pb.add(i + 4 * j)),
                    );
                }
                i += 16;
            }
            while i + 4 <= n {
                acc[0] = vfmaq_f32(acc[0], vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
                i += 4;
            }
        }
        let v = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
        let mut s = vaddvq_f32(v);
        while i < n {
            s = a[i].mul_add(b[i], s);
            i += 1;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_exact_on_odd_lengths() {
        for n in [0usize, 1, 7, 8, 9, 31, 33, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() + 0.1).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() - 0.2).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - exact).abs() < 1e-4, "n={n}");
        }
    }
}
