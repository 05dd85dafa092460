//! The machine's memory read bandwidth, measured: the roofline a decode step is held against.
//!
//! A decode step reads every weight once and the cache's used rows once, and does little arithmetic
//! per byte, so on a CPU its ceiling is the rate at which the cores can stream memory. [`read_gbps`]
//! measures that rate with the threads the kernels use (the CPU pool: the caller and its workers): a
//! buffer of [`BUFFER_BYTES`] — larger than any last-level cache, on huge pages where the OS gives
//! them, as the packed weights are (`huge_pages.rs`) — is touched once, then summed by all threads
//! in the pool's parallel regions, and the best of [`PASSES`] passes is reported. `onestep
//! bench` prints a decode rate as the fraction `bytes read per token × tokens/s ÷ bandwidth`.

use super::huge_pages::HugeBuf;
use super::pool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Bytes streamed per pass: 256 MiB, several times the largest last-level caches of the CPUs we run
/// on, so the passes read memory rather than cache.
pub const BUFFER_BYTES: usize = 256 << 20;

/// Passes timed; the fastest is reported (the others lose time to the OS, not to memory).
pub const PASSES: usize = 3;

/// Bytes a parallel task sums: 1 MiB, so a pass has 256 tasks to spread over the threads.
const TASK_BYTES: usize = 1 << 20;

/// Measures the read bandwidth of the CPU pool's threads in GB/s (10⁹ bytes a second). Allocates and
/// frees `BUFFER_BYTES`; takes a few tenths of a second.
pub fn read_gbps() -> f64 {
    read_gbps_over(BUFFER_BYTES, PASSES)
}

/// [`read_gbps`] over `bytes` (rounded up to whole tasks) and `passes` passes (tests use small ones).
pub(crate) fn read_gbps_over(bytes: usize, passes: usize) -> f64 {
    let words = bytes.div_ceil(TASK_BYTES) * (TASK_BYTES / 8);
    // Distinct non-zero values, so every page is really backed (not the shared zero page).
    let mut buf = HugeBuf::<u64>::zeroed(words);
    for (i, w) in buf.iter_mut().enumerate() {
        *w = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    let sink = AtomicU64::new(0);
    let mut best = f64::INFINITY;
    for _ in 0..passes.max(1) {
        let t0 = Instant::now();
        let per_task = TASK_BYTES / 8;
        pool::run(words / per_task, &|i| {
            let s = sum(&buf[i * per_task..(i + 1) * per_task]);
            sink.fetch_xor(s, Ordering::Relaxed);
        });
        best = best.min(t0.elapsed().as_secs_f64());
    }
    // The sink keeps the sums (and so the reads) from being optimized away.
    std::hint::black_box(sink.load(Ordering::Relaxed));
    (words * 8) as f64 / best.max(1e-9) / 1e9
}

/// The wrapping sum of `v` in eight independent lanes (vectorized by the compiler: the loads, not
/// the adds, bound it).
fn sum(v: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in v.chunks_exact(8) {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*x);
        }
    }
    acc.iter().fold(0, |a, x| a.wrapping_add(*x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_word_and_reports_a_plausible_rate() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(sum(&v[..992]), 992 * 993 / 2);
        let gbps = read_gbps_over(8 << 20, 2);
        // Any machine that runs this reads between 100 MB/s and 10 TB/s.
        assert!(
            gbps.is_finite() && (0.1..10_000.0).contains(&gbps),
            "{gbps}"
        );
    }
}
