//! Long runs keep flat memory: one session generating many tokens (reset whenever the context is full),
//! and creating/dropping many sessions on one model. Memory is measured two ways: live heap bytes (a
//! counting global allocator: exact) and VmRSS from /proc/self/status (Linux only).
//!
//! Short versions run in CI on the committed micro model (tests/fixtures/micro). Full versions:
//! `ONESTEP_SOAK_FULL=1 ONESTEP_SOAK_MODEL=/tmp/smollm2.onnx cargo test --release -p onestep --test soak
//! -- --nocapture` (10,000 tokens, 1,000 sessions; numbers printed).

use std::alloc::{GlobalAlloc, Layout, System};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use onestep::generate::{GenerateOptions, Session, StopReason};
use onestep::Model;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The tests of this file measure process-wide memory: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn full() -> bool {
    std::env::var_os("ONESTEP_SOAK_FULL").is_some_and(|v| v != "0")
}

fn model() -> Arc<Model> {
    let path = std::env::var_os("ONESTEP_SOAK_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/micro/micro_llama_q8.onnx")
        });
    Model::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// VmRSS in KiB (None off Linux).
fn rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Generates with sampling until `total` tokens were produced, resetting the session whenever its
/// context is full. Returns the tokens generated.
fn generate_tokens(s: &mut Session, total: usize, seed: u64) -> usize {
    let vocab = s.model().info().vocab_size as u32;
    let mut opts = s.default_options();
    opts.temperature = 0.9;
    opts.top_k = 40;
    opts.ignore_stop_tokens = true;
    opts.max_new_tokens = u32::MAX;
    let mut made = 0;
    let mut round = 0u64;
    while made < total {
        let prompt: Vec<u32> = (0..3)
            .map(|i| ((round * 31 + i * 7 + 5) as u32) % vocab)
            .collect();
        let opts = GenerateOptions {
            seed: Some(seed + round),
            max_new_tokens: (total - made) as u32,
            ..opts.clone()
        };
        let c = s
            .generate_ids(&prompt, &opts, |_| ControlFlow::Continue(()))
            .expect("generate");
        assert!(
            matches!(
                c.stop_reason,
                StopReason::ContextFull | StopReason::MaxTokens
            ),
            "{:?}",
            c.stop_reason
        );
        made += c.token_ids.len();
        s.reset();
        round += 1;
    }
    made
}

#[test]
fn long_generation_keeps_memory_flat() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let total = if full() { 10_000 } else { 3_000 };
    let m = model();
    let mut s = Session::new(m.clone()).unwrap();
    // Warm-up: every buffer, cache page and tokenizer cache that a generation touches.
    generate_tokens(&mut s, total / 10, 1);
    let (live0, rss0) = (live(), rss_kib());
    let t = Instant::now();
    let made = generate_tokens(&mut s, total, 1000);
    let secs = t.elapsed().as_secs_f64();
    let (live1, rss1) = (live(), rss_kib());
    println!(
        "soak: {made} tokens in {secs:.1}s ({:.0} tok/s); live heap {live0} -> {live1} bytes; \
         VmRSS {rss0:?} -> {rss1:?} KiB",
        made as f64 / secs
    );
    assert!(made >= total);
    // A leak of even one small allocation per token (>= 16 bytes x total) would show.
    let grew = live1 - live0;
    assert!(
        grew < 8 * 1024,
        "live heap grew by {grew} bytes over {made} tokens"
    );
    if let (Some(a), Some(b)) = (rss0, rss1) {
        assert!(b < a + 16 * 1024, "VmRSS grew from {a} to {b} KiB");
    }
}

#[test]
fn creating_and_dropping_sessions_leaks_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = if full() { 1_000 } else { 200 };
    let m = model();
    let one = |i: u64| {
        let mut s = Session::new(m.clone()).unwrap();
        generate_tokens(&mut s, 4, i);
    };
    for i in 0..5 {
        one(i);
    }
    let (live0, rss0) = (live(), rss_kib());
    let t = Instant::now();
    for i in 0..n {
        one(i as u64);
    }
    let secs = t.elapsed().as_secs_f64();
    let (live1, rss1) = (live(), rss_kib());
    println!(
        "churn: {n} sessions in {secs:.1}s; live heap {live0} -> {live1} bytes; VmRSS {rss0:?} -> {rss1:?} KiB"
    );
    let grew = live1 - live0;
    assert!(
        grew < 8 * 1024,
        "live heap grew by {grew} bytes over {n} sessions"
    );
    assert_eq!(Arc::strong_count(&m), 1, "every session released the model");
    if let (Some(a), Some(b)) = (rss0, rss1) {
        assert!(b < a + 16 * 1024, "VmRSS grew from {a} to {b} KiB");
    }
}
