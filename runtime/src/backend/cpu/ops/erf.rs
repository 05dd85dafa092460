//! erf, erfc and the exact GELU in f64: the `Erf` and `Gelu` ops (and the tail of the fused GELU in
//! `cpu/gelu.rs`).

/// Chebyshev coefficients (in `y = 4t − 2`, `t = 2/(2 + x)`) of `ln(erfc(x)·e^{x²}/t)` for `x ≥ 0`,
/// the form of Numerical Recipes' `erfccheb`. Computed for this file with mpmath at 40 digits from 80
/// Chebyshev nodes; the first omitted term is below 1e-19.
const ERFC_CHEB: [f64; 28] = [
    -1.302_653_719_781_709_4,
    6.419_697_923_564_902e-1,
    1.947_647_320_418_583_6e-2,
    -9.561_514_786_808_632e-3,
    -9.465_953_444_820_369e-4,
    3.668_394_978_527_614_5e-4,
    4.252_332_480_690_777e-5,
    -2.027_857_811_253_424_2e-5,
    -1.624_290_004_647_025_6e-6,
    1.303_655_835_580_523_2e-6,
    1.562_644_172_206_614_2e-8,
    -8.523_809_591_492_654e-8,
    6.529_054_439_098_851_5e-9,
    5.059_343_495_551_469e-9,
    -9.913_641_564_930_33e-10,
    -2.273_651_222_931_836e-10,
    9.646_791_102_015_527e-11,
    2.394_038_083_039_114_6e-12,
    -6.886_027_526_497_553e-12,
    8.944_879_273_090_725e-13,
    3.130_921_399_342_958e-13,
    -1.127_082_236_136_725_2e-13,
    3.810_905_255_189_232e-16,
    7.106_097_613_609_237e-15,
    -1.523_028_201_457_104_3e-15,
    -9.457_494_571_291_233e-17,
    1.210_237_189_224_279e-16,
    -2.816_663_087_747_177e-17,
];

/// erfc(x) for `x ≥ 0` (NaN for NaN): relative error below 1e-15 up to x = 6, below 1e-12 where
/// erfc is still a normal f64 (the rounding of x² in e^{−x²}).
fn erfc_nonneg(x: f64) -> f64 {
    let t = 2.0 / (2.0 + x);
    let y = 4.0 * t - 2.0;
    let (mut d, mut dd) = (0.0f64, 0.0f64);
    for &c in ERFC_CHEB[1..].iter().rev() {
        (d, dd) = (y * d - dd + c, d);
    }
    t * (-x * x + 0.5 * (ERFC_CHEB[0] + y * d) - dd).exp()
}

/// erfc over all of f64.
fn erfc64(x: f64) -> f64 {
    if x < 0.0 {
        2.0 - erfc_nonneg(-x)
    } else {
        erfc_nonneg(x)
    }
}

/// erf in f64, relative error below 1e-15: its Maclaurin series below |x| = 0.5 (the terms fall
/// below 1e-17 of the sum by the 12th), `1 − erfc(|x|)` above.
pub(crate) fn erf64(x: f64) -> f64 {
    if x.abs() < 0.5 {
        let z2 = x * x;
        let (mut term, mut sum) = (x, x);
        for n in 1..=12 {
            term *= -z2 / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if x > 0.0 {
        1.0 - erfc_nonneg(x)
    } else {
        erfc_nonneg(-x) - 1.0
    }
}

/// ONNX `Gelu` without approximation, `x·Φ(x) = x·erfc(−x/√2)/2` in f64 ([`erfc64`]: exact to the f32
/// result, with no cancellation in the negative tail).
pub(crate) fn gelu_exact(x: f32) -> f32 {
    if x.is_infinite() {
        return if x > 0.0 { x } else { -0.0 };
    }
    let x = x as f64;
    (0.5 * x * erfc64(-x * std::f64::consts::FRAC_1_SQRT_2)) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf and erfc against mpmath's values (30 digits), relative error below 1e-14; Gelu's exact form
    /// against x·Φ(x) to the f32 result.
    #[test]
    fn erf_and_gelu_match_high_precision_values() {
        let erf_cases = [
            (1e-10, 1.1283791670955126e-10),
            (0.001, 0.0011283787909692365),
            (0.1, 0.1124629160182849),
            (0.49, 0.5116682611885232),
            (0.5, 0.5204998778130465),
            (0.7, 0.6778011938374184),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (3.5, 0.9999992569016276),
            (5.0, 0.9999999999984626),
        ];
        for (x, want) in erf_cases {
            for (x, want) in [(x, want), (-x, -want)] {
                let got = erf64(x);
                assert!(
                    ((got - want) / want).abs() < 1e-14,
                    "erf({x}) = {got}, want {want}"
                );
            }
        }
        for (x, want) in [
            (4.0, 1.541725790028002e-8),
            (10.0, 2.088487583762545e-45),
            (26.0, 5.663192408856143e-296),
        ] {
            let got = erfc64(x);
            assert!(
                ((got - want) / want).abs() < 1e-12,
                "erfc({x}) = {got}, want {want}"
            );
            assert!((erfc64(-x) - (2.0 - want)).abs() < 1e-15);
        }
        assert!(erf64(f64::NAN).is_nan());
        assert_eq!(
            (erf64(f64::INFINITY), erf64(f64::NEG_INFINITY)),
            (1.0, -1.0)
        );
        for (x, want) in [
            (-6.0f32, -5.9195258702261885e-9),
            (-3.0, -0.0040496940948902835),
            (-0.5, -0.15426876936299344),
            (0.25, 0.14967658142073093),
            (1.5, 1.399789198096713),
            (4.0, 3.9998733150326675),
        ] {
            assert_eq!(gelu_exact(x), want as f32, "gelu({x})");
        }
        assert_eq!(gelu_exact(f32::NEG_INFINITY), 0.0);
        assert!(gelu_exact(f32::NAN).is_nan());
    }
}
