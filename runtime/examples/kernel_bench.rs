//! Micro benchmark of the CPU linear kernels on SmolLM2-135M shapes.
//!
//! `cargo run --release -p onestep --example kernel_bench [-- --quick]`
//! (set `RAYON_NUM_THREADS` to pin the thread count). Prints GFLOP/s and weight GB/s per shape, for
//! T = 1 (decode GEMV) and T = 128 (prefill GEMM), in both precisions, and the matvec-only time of one
//! whole decode step (30 layers of q/k/v/o/gate/up/down in 4-bit + the 8-bit tied LM head), with every
//! layer's weights in its own buffer so the weights stream from memory as in a real decode.

use onestep::testing::kernels::{
    linear_cached, linear_with, Activations, Precision, QuantCache, Weights,
};
use std::time::Instant;

struct Q4 {
    b: Vec<u8>,
    s: Vec<f32>,
    z: Vec<f32>,
    n: usize,
    k: usize,
}
struct Q8 {
    b: Vec<u8>,
    s: Vec<f32>,
    z: Vec<u8>,
    n: usize,
    k: usize,
    halves: bool,
}

/// Cheap deterministic pseudo-random bytes (xorshift).
fn bytes(len: usize, seed: &mut u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 24) as u8
        })
        .collect()
}

fn q4(n: usize, k: usize, seed: &mut u64) -> Q4 {
    let nb = n * k / 32;
    Q4 {
        b: bytes(nb * 16, seed),
        s: bytes(nb, seed)
            .iter()
            .map(|v| (*v as f32 + 1.0) * 1e-4)
            .collect(),
        z: bytes(nb, seed).iter().map(|v| (*v % 16) as f32).collect(),
        n,
        k,
    }
}
/// 8-bit blocks of 32, or (`halves`) with a scale and zero point per 16 (GGUF Q6_K's form).
fn q8(n: usize, k: usize, halves: bool, seed: &mut u64) -> Q8 {
    let nb = n * k / 32;
    let ns = nb * (1 + halves as usize);
    Q8 {
        b: bytes(nb * 32, seed),
        s: bytes(ns, seed)
            .iter()
            .map(|v| (*v as f32 + 1.0) * 1e-4)
            .collect(),
        z: vec![128; ns],
        n,
        k,
        halves,
    }
}
impl Q4 {
    fn w(&self) -> Weights<'_> {
        Weights::Q4 {
            b: &self.b,
            scales: &self.s,
            zeros: &self.z,
            n: self.n,
            k: self.k,
        }
    }
}
impl Q8 {
    fn w(&self) -> Weights<'_> {
        Weights::Q8 {
            b: &self.b,
            scales: &self.s,
            zeros: &self.z,
            n: self.n,
            k: self.k,
            halves: self.halves,
        }
    }
}

/// Median seconds of `f` over `reps` runs after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    println!("rayon threads: {}", rayon::current_num_threads());
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let shapes: Vec<(&str, Weights)> = Vec::new();
    drop(shapes);
    let a = q4(1536, 576, &mut seed);
    let b = q4(576, 1536, &mut seed);
    let c = q8(49152, 576, false, &mut seed);
    // Gemma 3 270M Q4_K_M: the Q6_K down projection and the Q8_0 tied output layer.
    let d = q8(640, 2048, true, &mut seed);
    let e = q8(262144, 640, false, &mut seed);
    let f32w: Vec<f32> = bytes(1536 * 576, &mut seed)
        .iter()
        .map(|v| *v as f32 / 255.0 - 0.5)
        .collect();
    let cases: Vec<(&str, Weights)> = vec![
        ("q4 K=576  N=1536 ", a.w()),
        ("q4 K=1536 N=576  ", b.w()),
        ("q8 K=576  N=49152", c.w()),
        ("q8h K=2048 N=640 ", d.w()),
        ("q8 K=640 N=262144", e.w()),
        (
            "f32 K=576 N=1536 ",
            Weights::F32 {
                w: &f32w,
                n: 1536,
                k: 576,
            },
        ),
    ];
    for (name, w) in &cases {
        for t in [1usize, 128] {
            for acts in [Activations::F32, Activations::Int8, Activations::Int8x2] {
                let (n, k) = (w.n(), w.k());
                let x: Vec<f32> = (0..t * k)
                    .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                    .collect();
                let mut y = vec![0f32; t * n];
                let reps = if quick {
                    3
                } else if t == 1 {
                    200
                } else {
                    5
                };
                let s = time(reps, || {
                    let mut q = QuantCache::default();
                    linear_cached(&x, t, w, None, &mut y, acts, &mut q, 0).unwrap()
                });
                let flops = 2.0 * (n * k * t) as f64;
                println!(
                    "{name} T={t:<4} {acts:<8?} {:>9.1} µs  {:>7.1} GFLOP/s  {:>6.2} GB/s weights",
                    s * 1e6,
                    flops / s / 1e9,
                    w.byte_len() as f64 / s / 1e9
                );
            }
        }
    }

    // Whole decode step (matvecs only), weights streaming from memory.
    let layers: Vec<[Q4; 7]> = (0..30)
        .map(|_| {
            [
                q4(576, 576, &mut seed),
                q4(192, 576, &mut seed),
                q4(192, 576, &mut seed),
                q4(576, 576, &mut seed),
                q4(1536, 576, &mut seed),
                q4(1536, 576, &mut seed),
                q4(576, 1536, &mut seed),
            ]
        })
        .collect();
    let x: Vec<f32> = (0..1536)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let mut y = vec![0f32; 49152];
    let bytes_total: usize = layers
        .iter()
        .flat_map(|l| l.iter().map(|q| q.w().byte_len()))
        .sum::<usize>()
        + c.w().byte_len();
    // Bandwidth ceiling: read the same buffers with a trivial parallel reduction.
    let s = time(if quick { 3 } else { 20 }, || {
        use rayon::prelude::*;
        let mut acc = 0u64;
        for l in &layers {
            for q in l {
                acc ^=
                    q.b.par_chunks(4096)
                        .map(|c| c.iter().fold(0u64, |a, v| a.wrapping_add(*v as u64)))
                        .sum::<u64>();
            }
        }
        acc ^=
            c.b.par_chunks(4096)
                .map(|c| c.iter().fold(0u64, |a, v| a.wrapping_add(*v as u64)))
                .sum::<u64>();
        std::hint::black_box(acc);
    });
    let code_bytes: usize = layers
        .iter()
        .flat_map(|l| l.iter().map(|q| q.b.len()))
        .sum::<usize>()
        + c.b.len();
    println!(
        "memory read ceiling (same code bytes, plain sum): {:.2} ms, {:.2} GB/s",
        s * 1e3,
        code_bytes as f64 / s / 1e9
    );
    for prec in [Precision::Exact, Precision::Fast] {
        let s = time(if quick { 3 } else { 20 }, || {
            for l in &layers {
                for q in l {
                    let w = q.w();
                    linear_with(&x[..w.k()], 1, &w, None, &mut y[..w.n()], prec).unwrap();
                }
            }
            linear_with(&x[..576], 1, &c.w(), None, &mut y, prec).unwrap();
        });
        println!(
            "decode step matvecs ({prec:?}): {:.2} ms  = {:.1} tok/s upper bound  ({:.1} MB, {:.2} GB/s)",
            s * 1e3,
            1.0 / s,
            bytes_total as f64 / 1e6,
            bytes_total as f64 / s / 1e9
        );
    }
    attention_decode(quick);
}

/// Decode attention over f16 host pages of 64 rows, SmolLM2's shape (9 query heads over 3 KV heads,
/// D = 64) and Gemma 3 270M's (4 over 1, D = 256), at several positions: µs a layer.
fn attention_decode(quick: bool) {
    use half::f16;
    use onestep::testing::kernels::{attention_paged, AttnShape};
    let rows = 64;
    for (name, heads, kv_heads, d) in [("smollm2", 9, 3, 64), ("gemma3", 4, 1, 256)] {
        for pos in [100usize, 500, 1000] {
            let page = |p: usize| -> Vec<f16> {
                (0..rows * kv_heads * d)
                    .map(|i| f16::from_f32(((i * 7 + p) % 13) as f32 / 13.0 - 0.5))
                    .collect()
            };
            let pages: Vec<Vec<f16>> = (0..pos.div_ceil(rows)).map(page).collect();
            let kr: Vec<&[f16]> = pages.iter().map(|v| v.as_slice()).collect();
            let q: Vec<f32> = (0..heads * d)
                .map(|i| (i % 11) as f32 / 11.0 - 0.5)
                .collect();
            let new: Vec<f32> = (0..kv_heads * d).map(|i| (i % 5) as f32 / 5.0).collect();
            let s = AttnShape {
                heads,
                kv_heads,
                tokens: 1,
                head_dim: d,
                cache_len: 2048,
                q_tokens_first: false,
                kv_tokens_first: false,
            };
            let mut out = vec![0f32; heads * d];
            let secs = time(if quick { 200 } else { 2000 }, || {
                attention_paged(
                    &q, &kr, &kr, rows, &new, &new, pos, None, &s, None, &mut out,
                )
                .unwrap();
            });
            println!(
                "attention decode {name:<8} position {pos:>4}: {:7.2} µs a layer",
                secs * 1e6
            );
        }
    }
}
