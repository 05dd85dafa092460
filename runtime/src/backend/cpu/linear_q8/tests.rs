use super::*;

#[test]
fn two_digits_come_within_half_a_second_step() {
    let x: Vec<f32> = (0..32 * 9)
        .map(|i| ((i * 7919) % 2003) as f32 / 97.0 - 10.0)
        .chain([0.0; 32])
        .collect();
    let one = QuantX::new(&x, false);
    let two = QuantX::new(&x, true);
    assert_eq!(
        (one.q.clone(), one.d.clone()),
        (two.q.clone(), two.d.clone())
    );
    assert!(one.q2.is_empty() && one.d2.is_empty());
    for (b, xb) in x.chunks(BLOCK).enumerate() {
        let (d, d2) = (two.d[b], two.d2[b]);
        assert_eq!(d2, d / 254.0);
        let mut sum = 0f64;
        for (i, v) in xb.iter().enumerate() {
            let at = b * BLOCK + i;
            let got = d * two.q[at] as f32 + d2 * two.q2[at] as f32;
            assert!((got - v).abs() <= d2 * 0.5001 + 1e-30, "[{at}] {v} → {got}");
            sum += got as f64;
        }
        assert!(
            (two.ds[b] as f64 - sum).abs() <= 1e-5 * (1.0 + sum.abs()),
            "block {b}"
        );
        let halves = two.ds2[2 * b] + two.ds2[2 * b + 1];
        assert!((halves - two.ds[b]).abs() <= 1e-5 * (1.0 + two.ds[b].abs()));
    }
}

#[test]
fn quantization_is_the_same_on_every_isa_and_within_half_a_step() {
    let mut x: Vec<f32> = (0..32 * 37)
        .map(|i| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0)
        .collect();
    x[32..64].fill(0.0); // d = 0
    x[64..96]
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = i as f32 - 15.5); // ties at ±0.5 steps
    x[100] = 1e30;
    let fast = QuantX::new(&x, false);
    let mut plain = QuantX {
        q2: Vec::new(),
        d2: Vec::new(),
        q: vec![0; x.len()],
        d: vec![0.0; x.len() / BLOCK],
        ds: vec![0.0; x.len() / BLOCK],
        ds2: vec![0.0; 2 * x.len() / BLOCK],
    };
    plain.quantize_scalar(&x);
    plain.half_sums();
    assert_eq!(fast.q, plain.q);
    assert_eq!(fast.d, plain.d);
    assert_eq!(fast.ds, plain.ds);
    assert_eq!(fast.ds2, plain.ds2);
    // The second digit's loop (AVX2 where the CPU has it) and its portable body agree too.
    let two = QuantX::new(&x, true);
    let mut plain2 = QuantX {
        q2: vec![0; x.len()],
        d2: plain.d.iter().map(|d| d / 254.0).collect(),
        q: plain.q.clone(),
        d: plain.d.clone(),
        ds: plain.ds.clone(),
        ds2: plain.ds2.clone(),
    };
    plain2.second_digit_body(&x);
    plain2.half_sums();
    assert_eq!(two.q2, plain2.q2);
    assert_eq!(two.ds, plain2.ds);
    assert_eq!(two.ds2, plain2.ds2);
    assert!(two.q2.iter().any(|&q| q != 0));
    for (b, xb) in x.chunks(BLOCK).enumerate() {
        let d = fast.d[b];
        let sum: i32 = fast.q[b * BLOCK..(b + 1) * BLOCK]
            .iter()
            .map(|&q| q as i32)
            .sum();
        assert_eq!(fast.ds[b], d * sum as f32);
        for (i, v) in xb.iter().enumerate() {
            let q = fast.q[b * BLOCK + i] as f32;
            assert!(
                (q * d - v).abs() <= d * 0.5001 + 1e-30,
                "block {b} [{i}]: {v} → {q}·{d}"
            );
        }
    }
}

/// Times each integer ISA's product (scalar excluded) of the row-major file form against its
/// packed tiles, on the calling thread, for Gemma-3-270M-like shapes: decode (T = 1, two-digit
/// activations, as the executor runs decode) and a prompt chunk (T = 64, one digit). Medians of
/// several runs; the activations are quantized once, outside the timing.
///
/// `cargo test --release -p onestep --lib -- --ignored bench_packed --nocapture --test-threads 1`
#[test]
#[ignore = "timing: run with --ignored --nocapture --test-threads 1"]
fn bench_packed_vs_rows() {
    use crate::backend::cpu::repack::{pack, tests::file_form, tests::Kind};
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(5);
    println!("| form | K | N | T | acts | isa | rows µs | packed µs | rows ÷ packed |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for kind in [Kind::Q8_0, Kind::Q5_0, Kind::Q4_0, Kind::Q4_1] {
        for (k, n) in [(640, 2048), (2048, 640), (640, 1024)] {
            let file = file_form(kind, n, k, &mut rng);
            let packed = pack(&file).expect("packs");
            let (fv, pv) = (file.kernel_view().expect("view"), packed.view());
            for (t, two, runs) in [(1, true, 51), (64, false, 9)] {
                let x: Vec<f32> = (0..t * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let qx = QuantX::new(&x, two);
                let mut out = vec![0f32; n * t];
                for isa in available().into_iter().filter(|&i| i != QIsa::Scalar) {
                    let mut median = |w: &Weights| {
                        rows(w, &qx, t, 0..n, &mut out, isa);
                        let mut us: Vec<f64> = (0..runs)
                            .map(|_| {
                                let start = std::time::Instant::now();
                                rows(w, &qx, t, 0..n, &mut out, isa);
                                start.elapsed().as_secs_f64() * 1e6
                            })
                            .collect();
                        us.sort_by(f64::total_cmp);
                        us[runs / 2]
                    };
                    let (a, b) = (median(&fv), median(&pv));
                    let packs = if isa.packs() { "" } else { " (not read)" };
                    let acts = if two { "int8x2" } else { "int8" };
                    println!(
                        "| {kind:?} | {k} | {n} | {t} | {acts} | {} | {a:.1} | {b:.1}{packs} | {:.2}× |",
                        isa.name(),
                        a / b
                    );
                }
            }
        }
    }
}

/// `sdot` and `smmla` sum the same integers as the widening multiplies, so the NEON paths agree
/// bit for bit on every weight form and both precisions, with odd rows and tokens left over from
/// the 2×2 tiles (their accuracy is the proptest's in `linear.rs`, which runs every ISA `available`
/// lists). Under `qemu-aarch64 -cpu max` (CI) the CPU has dotprod and i8mm.
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_dotprod_and_i8mm_equal_neon() {
    let isas: Vec<QIsa> = available()
        .into_iter()
        .filter(|i| matches!(i, QIsa::NeonDot | QIsa::NeonI8mm))
        .collect();
    if isas.is_empty() {
        eprintln!("note: no dotprod on this CPU; sdot/smmla paths not run");
        return;
    }
    for t in [1, 2, 3, 4, 5] {
        neon_paths_agree(&isas, 5, t);
        neon_paths_agree(&isas, 4, t);
    }
}

#[cfg(target_arch = "aarch64")]
fn neon_paths_agree(isas: &[QIsa], n: usize, t: usize) {
    let k = 96;
    let nb = n * k / BLOCK;
    let wave = |i: usize, m: usize| (i * 7919 + 13) % m;
    let bytes: Vec<u8> = (0..n * k).map(|i| wave(i, 256) as u8).collect();
    let scales: Vec<f32> = (0..2 * nb)
        .map(|i| 0.01 + wave(i, 17) as f32 / 500.0)
        .collect();
    let fzeros: Vec<f32> = (0..nb).map(|i| wave(i, 16) as f32 + 0.25).collect();
    let zeros: Vec<u8> = (0..2 * nb).map(|i| wave(i, 251) as u8).collect();
    let x: Vec<f32> = (0..t * k)
        .map(|i| wave(i, 2003) as f32 / 97.0 - 10.0)
        .collect();
    let forms = [
        Weights::Q4 {
            b: &bytes[..n * k / 2],
            scales: &scales[..nb],
            zeros: &fzeros,
            n,
            k,
        },
        Weights::Q8 {
            b: &bytes,
            scales: &scales[..nb],
            zeros: &zeros[..nb],
            halves: false,
            n,
            k,
        },
        Weights::Q8 {
            b: &bytes,
            scales: &scales,
            zeros: &zeros,
            halves: true,
            n,
            k,
        },
    ];
    for (f, w) in forms.iter().enumerate() {
        for two in [false, true] {
            let qx = QuantX::new(&x, two);
            let run = |isa| {
                let mut out = vec![0f32; n * t];
                rows(w, &qx, t, 0..n, &mut out, isa);
                out
            };
            let plain = run(QIsa::Neon);
            assert!(plain.iter().any(|v| *v != 0.0));
            for &isa in isas {
                assert_eq!(
                    run(isa),
                    plain,
                    "{isa:?}, {n}×{t}, form {f}, two digits: {two}"
                );
            }
        }
    }
}
