//! RMSNorm over the last axis (ONNX `RMSNormalization`, stash type f32):
//! `y = x / sqrt(mean(x²) + eps) · w`, for `x [rows, D]`, `w [D]`.
//!
//! The sum of squares is accumulated in f32 with SIMD (8 lanes); rows are split over the CPU pool's
//! threads only for large inputs (prefill). Error vs. the f64 reference: ≤ 1e-5 relative per element
//! (tested).

use super::simd;
use super::{check_len, pool, shape_err, KernelResult};

/// Rows·D above which rows are normalized in parallel.
const PAR_MIN: usize = 1 << 15;
/// Elements (whole rows) a parallel piece takes at least.
const PAR_CHUNK: usize = 1 << 13;

fn check(x: &[f32], w: &[f32], out_len: usize) -> KernelResult<usize> {
    let d = w.len();
    if d == 0 {
        return Err(shape_err("rms_norm", "scale `w` is empty (D = 0)"));
    }
    if !x.len().is_multiple_of(d) {
        return Err(shape_err(
            "rms_norm",
            format!("x has {} elements, not a multiple of D = {d}", x.len()),
        ));
    }
    check_len("rms_norm", "out", x.len(), out_len)?;
    Ok(d)
}

fn row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = simd::dot(x, x);
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
        *o = x * inv * w;
    }
}

/// `out[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) · w` with `D = w.len()`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> KernelResult {
    let d = check(x, w, out.len())?;
    if x.len() >= PAR_MIN && x.len() / d > 1 {
        pool::for_rows_mut(out, d, PAR_CHUNK, &|r0, o| {
            let x = &x[r0 * d..r0 * d + o.len()];
            for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                row(x, w, eps, o);
            }
        });
    } else {
        for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            row(x, w, eps, o);
        }
    }
    Ok(())
}

/// In-place [`rms_norm`].
#[cfg(test)]
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) -> KernelResult {
    let d = check(x, w, x.len())?;
    let norm = |x: &mut [f32]| {
        let ss = simd::dot(x, x);
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        for (x, w) in x.iter_mut().zip(w) {
            *x = *x * inv * w;
        }
    };
    if x.len() >= PAR_MIN && x.len() / d > 1 {
        pool::for_rows_mut(x, d, PAR_CHUNK, &|_, x| {
            x.chunks_exact_mut(d).for_each(norm)
        });
    } else {
        x.chunks_exact_mut(d).for_each(norm);
    }
    Ok(())
}

/// The test oracle (f64 accumulation). Same checks as [`rms_norm`].
#[cfg(test)]
pub fn reference(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> KernelResult {
    let d = check(x, w, out.len())?;
    for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
            *o = (*x as f64 * inv * *w as f64) as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::KernelError;
    use proptest::prelude::*;

    fn nonzero(len: usize) -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(prop_oneof![-100f32..-1e-3, 1e-3f32..100.0], len)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_reference(
            (rows, x, w) in (1usize..6, 1usize..700).prop_flat_map(|(r, d)| (Just(r), nonzero(r * d), nonzero(d))),
            eps in prop_oneof![Just(1e-5f32), Just(1e-6f32), 0f32..0.1],
        ) {
            let _ = rows;
            let mut want = vec![0f32; x.len()];
            reference(&x, &w, eps, &mut want).unwrap();
            let mut got = vec![f32::NAN; x.len()];
            rms_norm(&x, &w, eps, &mut got).unwrap();
            let mut inplace = x.clone();
            rms_norm_in_place(&mut inplace, &w, eps).unwrap();
            for i in 0..x.len() {
                let tol = 1e-5 * want[i].abs() + 1e-7;
                prop_assert!((got[i] - want[i]).abs() <= tol, "i {}: {} vs {}", i, got[i], want[i]);
                prop_assert_eq!(got[i], inplace[i]);
            }
        }
    }

    #[test]
    fn parallel_rows_and_known_value() {
        // x = [3, 4]: mean(x²) = 12.5, y = x / sqrt(12.5) · w.
        let mut y = [0f32; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut y).unwrap();
        assert!(
            (y[0] - 3.0 / 12.5f32.sqrt()).abs() < 1e-6
                && (y[1] - 8.0 / 12.5f32.sqrt()).abs() < 1e-6
        );
        let d = 576;
        let x: Vec<f32> = (0..d * 128)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 4.99)
            .collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 / d as f32).collect();
        let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        rms_norm(&x, &w, 1e-5, &mut a).unwrap();
        reference(&x, &w, 1e-5, &mut b).unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() <= 1e-5 * b.abs() + 1e-7);
        }
    }

    #[test]
    fn shape_errors() {
        assert!(matches!(
            rms_norm(&[1.0; 5], &[1.0; 2], 1e-5, &mut [0.0; 5]),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            rms_norm(&[1.0; 4], &[1.0; 2], 1e-5, &mut [0.0; 3]),
            Err(KernelError::Length { .. })
        ));
        assert!(rms_norm(&[], &[], 1e-5, &mut []).is_err());
        rms_norm(&[], &[1.0], 1e-5, &mut []).unwrap();
    }
}
