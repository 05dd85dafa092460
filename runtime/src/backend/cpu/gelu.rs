//! A generic ONNX `Gelu` node without approximation (`approximate = "none"`, the default) on f32,
//! fast: `x·Φ(x)` in f64 lanes with `Φ` from a branch-free erfc ([`erfc_nonneg`]: Numerical
//! Recipes' `erfcc`, `t·e^(−z² + P(t))`, relative error ≤ 1.05e-7 everywhere, so the negative tail
//! keeps its relative precision, which `1 + erf` in f32 — the rational approximation Eigen, XLA,
//! XNNPACK and onnxruntime use — does not: 2.2e-7 absolute off there, 300% relative), over the CPU
//! pool's threads in loops compiled for AVX2+FMA where the CPU has them. Anything else
//! ([`try_node`] answers `None`: the tanh form, other dtypes) runs through the generic op, whose
//! f64 Chebyshev `erfc` stays the reference this file is tested against.
//!
//! Whisper's encoder runs about 11 M exact GELUs a 30 s window; the generic op's erfc and `exp`
//! cost 11% of the encoder (0.45 s on 2 cores), this kernel ~0.02 s. Error against the reference
//! (tested on a dense sweep of [−10, 10], 2·10⁶ points, and on random tensors with ±∞, ±0, ±MAX,
//! NaN): at most 2 ulp (1 ulp of f32 is 6e-8..1.2e-7 relative), ±∞ → ∞/−0 and NaN → NaN as there.

use super::pool;
use crate::graph::{Attr, DType, Node};
use crate::tensor::Tensor;

/// Elements above which the work is split over threads.
const PAR_MIN: usize = 1 << 16;
/// Elements a parallel piece takes.
const PAR_CHUNK: usize = 1 << 13;

/// The output of `node` (a `Gelu`) on `inputs` when this kernel takes them (an f32 input, no
/// `approximate` or `"none"`); `None` for the generic op.
pub(crate) fn try_node(node: &Node, inputs: &[Option<&Tensor>]) -> Option<Tensor> {
    if node.op != "Gelu" || !node.domain.is_empty() {
        return None;
    }
    match node.attrs.get("approximate") {
        None => {}
        Some(Attr::Str(s)) if s == "none" => {}
        Some(_) => return None,
    }
    let x = (*inputs.first()?)?;
    if x.dtype != DType::F32 {
        return None;
    }
    let mut out = Tensor::zeros(DType::F32, &x.shape);
    gelu(x.typed(), out.typed_mut());
    Some(out)
}

/// `out[i] = GELU(x[i])` (equal lengths), split over the pool's threads for large inputs.
pub(crate) fn gelu(x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(x.len(), out.len());
    if x.len() >= PAR_MIN {
        pool::for_chunks_mut(out, PAR_CHUNK, &|i, o| {
            map(&x[i * PAR_CHUNK..i * PAR_CHUNK + o.len()], o)
        });
    } else {
        map(x, out);
    }
}

/// `o[i] = gelu_f32(x[i])`, compiled for AVX2+FMA where the CPU has them.
fn map(x: &[f32], o: &mut [f32]) {
    #[inline(always)]
    fn body(x: &[f32], o: &mut [f32]) {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = gelu_f32(x);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2(x: &[f32], o: &mut [f32]) {
            body(x, o)
        }
        if super::simd::best_isa() == super::simd::Isa::Avx2 {
            // SAFETY: best_isa() returned Avx2 only after detecting avx2 and fma on this CPU.
            return unsafe { avx2(x, o) };
        }
    }
    body(x, o)
}

/// Below this `x·Φ(x)` rounds to −0 in f32 (|x·Φ(x)| < 1e-48); also where −∞ is answered.
const NEG_LIMIT: f32 = -15.0;

/// ONNX `Gelu` (exact form) in f64 lanes, rounded to f32: `x·Φ(x)` with `Φ(x) = erfc(|x|/√2)/2`
/// for `x < 0` and `1 − erfc(|x|/√2)/2` above ([`erfc_nonneg`], so the negative tail keeps its
/// relative precision); −0 below [`NEG_LIMIT`] (and for −∞), `∞` for `∞`, NaN for NaN.
/// Branch-free (selects), so loops over it vectorize (four f64 lanes an AVX2 register).
#[inline(always)]
pub(crate) fn gelu_f32(x: f32) -> f32 {
    let xd = x as f64;
    let c = erfc_nonneg(xd.abs() * std::f64::consts::FRAC_1_SQRT_2);
    let phi = if x >= 0.0 { 1.0 - 0.5 * c } else { 0.5 * c };
    let y = (xd * phi) as f32;
    if x < NEG_LIMIT {
        -0.0
    } else {
        y
    }
}

/// erfc(z) for `z ≥ 0` (and +∞; NaN stays NaN), within 1.1e-7 relative (tested): Numerical
/// Recipes' `erfcc`, `t·e^(−z² + P(t))` with `t = 1/(1 + z/2)` and a degree-9 polynomial `P`
/// (Chebyshev-fitted; fractional error below 1.2e-7 everywhere), the exponential by [`exp_f64`].
#[inline(always)]
pub(crate) fn erfc_nonneg(z: f64) -> f64 {
    const P: [f64; 10] = [
        -1.265_512_23,
        1.000_023_68,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ];
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = P[9];
    for &c in P[..9].iter().rev() {
        p = p * t + c;
    }
    t * exp_f64(p - z * z)
}

/// `e^a` in f64 for `a ≤ 0`, within 1e-9 relative (plenty for [`erfc_nonneg`]'s 1.2e-7),
/// branch-free: `a` clamped below at −700, `a = n·ln2 + r` with `n` rounded to nearest by the
/// 1.5·2⁵² trick, `e^r` by its Taylor polynomial of degree 9 on |r| ≤ ln2/2, `2^n` built in the
/// exponent bits. NaN gives a finite value (callers carry NaN through other operands).
#[inline(always)]
fn exp_f64(a: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5·2⁵²
    let a = a.clamp(-700.0, 0.0);
    let t = a * std::f64::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64);
    let r = a - n * std::f64::consts::LN_2;
    let mut p = 1.0 / 362_880.0;
    for k in (1..9).rev() {
        p = p * r + 1.0 / FACT[k];
    }
    let p = p * r + 1.0;
    p * f64::from_bits(((ni + 1023) << 52) as u64)
}

/// `k!` for `k < 9`.
const FACT: [f64; 9] = [1.0, 1.0, 2.0, 6.0, 24.0, 120.0, 720.0, 5040.0, 40320.0];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::ops;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn gelu_node(approximate: Option<&str>) -> Node {
        Node {
            name: "gelu".into(),
            op: "Gelu".into(),
            domain: String::new(),
            inputs: vec!["x".into()],
            outputs: vec!["y".into()],
            attrs: approximate
                .map(|a| ("approximate".to_string(), Attr::Str(a.into())))
                .into_iter()
                .collect(),
        }
    }

    /// ulps between two finite f32 of the same sign (or ±0).
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    /// ulps from `w` (the reference), or 0 where both are equal (±0 included) or below f32's normals.
    fn off(g: f32, w: f32) -> u32 {
        if g == w || (g.abs() < f32::MIN_POSITIVE && w.abs() < f32::MIN_POSITIVE) {
            0
        } else {
            ulps(g, w)
        }
    }

    /// erfc in f64 for the tests: `1 − erf` (the reference's) below 2, where it does not cancel
    /// (erfc(2) = 4.7e-3), its continued fraction from 2 on (400 terms, converged to 1e-14 there).
    fn erfc_ref(z: f64) -> f64 {
        if z < 2.0 {
            return 1.0 - ops::erf64(z);
        }
        let mut k = z;
        for n in (1..=400).rev() {
            k = z + (n as f64 / 2.0) / k;
        }
        (-z * z).exp() / (std::f64::consts::PI.sqrt() * k)
    }

    #[test]
    fn erfc_within_1_1e_7_relative() {
        let mut worst = 0f64;
        for i in 0..=1_000_000 {
            let z = i as f64 * 1e-5;
            worst = worst.max((erfc_nonneg(z) / erfc_ref(z) - 1.0).abs());
        }
        eprintln!("erfc: max relative error {worst:e} on [0, 10]");
        assert!(worst <= 1.1e-7, "{worst:e}");
        assert_eq!(erfc_nonneg(f64::INFINITY), 0.0);
        assert!(erfc_nonneg(f64::NAN).is_nan());
        for a in [-700.0, -100.0, -1.0, -0.1, 0.0] {
            assert!((exp_f64(a) / a.exp() - 1.0).abs() < 1e-9, "{a}");
        }
    }

    /// A dense sweep of [−10, 10] (2·10⁶ points) through the node against the generic op.
    #[test]
    fn sweep_matches_the_generic_op() {
        let xs: Vec<f32> = (-1_000_000..=1_000_000).map(|i| i as f32 * 1e-5).collect();
        let t = Tensor::f32(&[xs.len()], &xs);
        let n = gelu_node(None);
        let want = ops::run_node(&n, &[Some(&t)]).unwrap().remove(0);
        let got = try_node(&n, &[Some(&t)]).unwrap();
        let (mut worst, mut at, mut abs) = (0u32, 0f32, 0f32);
        for ((&x, &g), &w) in xs.iter().zip(got.typed::<f32>()).zip(want.typed::<f32>()) {
            if off(g, w) > worst {
                (worst, at) = (off(g, w), x);
            }
            abs = abs.max((g - w).abs());
        }
        eprintln!(
            "gelu: at most {worst} ulp from the reference on [−10, 10] (x = {at}), |Δ| ≤ {abs:e}"
        );
        assert!(worst <= 2, "{worst} ulp at {at}");
    }

    #[test]
    fn random_tensors_and_specials_match_the_generic_op() {
        let mut rng = StdRng::seed_from_u64(5);
        for (len, a) in [
            (1usize, 3.0f32),
            (7, 1.0),
            (1000, 8.0),
            (200_000, 4.0),
            (70_001, 30.0),
        ] {
            let mut xs: Vec<f32> = (0..len).map(|_| rng.random_range(-a..a)).collect();
            if len > 10 {
                xs[..6].copy_from_slice(&[
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    0.0,
                    -0.0,
                    f32::MAX,
                    -f32::MAX,
                ]);
            }
            let t = Tensor::f32(&[1, len], &xs);
            for approx in [None, Some("none")] {
                let n = gelu_node(approx);
                let want = ops::run_node(&n, &[Some(&t)]).unwrap().remove(0);
                let got = try_node(&n, &[Some(&t)]).unwrap();
                assert_eq!(got.shape, want.shape);
                for ((&x, &g), &w) in xs.iter().zip(got.typed::<f32>()).zip(want.typed::<f32>()) {
                    assert!(off(g, w) <= 2, "x {x}: {g} vs {w}");
                }
            }
        }
        let nan = Tensor::f32(&[1], &[f32::NAN]);
        let got = try_node(&gelu_node(None), &[Some(&nan)]).unwrap();
        assert!(got.typed::<f32>()[0].is_nan());
    }

    #[test]
    fn declines_the_tanh_form_and_other_dtypes() {
        let t = Tensor::f32(&[2], &[1.0, -1.0]);
        assert!(try_node(&gelu_node(Some("tanh")), &[Some(&t)]).is_none());
        let h = Tensor::zeros(DType::F16, &[2]);
        assert!(try_node(&gelu_node(None), &[Some(&h)]).is_none());
    }
}
