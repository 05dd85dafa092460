//! The threads of the CPU kernels' short parallel regions.
//!
//! A decode step runs a few hundred parallel regions of tens of microseconds each (one a linear layer).
//! Handing each to rayon's pool costs a wake-up of sleeping workers and a blocked caller every time, which
//! on two cores ate most of the second core (decode scaled 37 → 58–67 tok/s from one thread to two). Here
//! the caller works too, and the workers spin for a short while after a region before they sleep, so the
//! next region finds them awake — what llama.cpp's threads do.
//!
//! A region is `f(i)` for `i` in `0..n`; every thread claims indices from one counter, so uneven work
//! balances itself. The counter carries the region's number in its high bits, and the job (closure and
//! `n`) its own region's number: a worker claims an index with a compare-exchange on the ticket of the
//! job's region, which fails once that region has ended and cannot succeed before it is published. So a
//! late worker never runs an old region's closure, nor a new region's job (published just before its
//! ticket) under the old region's ticket — which once let an index past the old region's end run twice
//! and the new region's caller return while a worker was still in its closure. Regions are not nested and one runs at a time: a region started inside
//! another, or while another thread's runs, runs on its caller's thread alone.
//!
//! Workers: `rayon::current_num_threads() − 1` when the pool is first used (the CLI's `--threads` sets
//! rayon's pool before that).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next region before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// The region being run: a lifetime-erased `&dyn Fn(usize)` valid while its caller waits in [`run`],
/// its index count, and its number — a worker runs a job only under the ticket of its own region.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
    region: u64,
}

struct Shared {
    /// `(region << 32) | next index`: regions are numbered from 1.
    ticket: AtomicU64,
    /// The current region's job: written by the caller before it publishes the region's ticket, read by
    /// workers after they read that ticket (see the module doc for why it stays valid).
    job: Mutex<Option<Job>>,
    /// Indices of the current region finished.
    done: AtomicUsize,
    /// Workers asleep (or about to be): the caller wakes them when it is not zero.
    sleeping: AtomicUsize,
    wake: Condvar,
    /// One region at a time.
    busy: AtomicBool,
    /// An index of the current region panicked (caught, so every index still counts as done).
    panicked: AtomicBool,
}

// SAFETY: `Job::f` points to a `Sync` closure that is only called while its region's caller waits.
unsafe impl Send for Job {}

struct Pool {
    shared: &'static Shared,
    workers: usize,
}

thread_local! {
    /// Set on pool workers and on a caller inside a region: a nested region runs serially.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(start)
}

/// Starts the workers. Not inlined: the C ABI test's valgrind suppression for the workers (alive
/// until the process exits, like rayon's) names this function.
#[inline(never)]
fn start() -> Pool {
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        ticket: AtomicU64::new(0),
        job: Mutex::new(None),
        done: AtomicUsize::new(0),
        sleeping: AtomicUsize::new(0),
        wake: Condvar::new(),
        busy: AtomicBool::new(false),
        panicked: AtomicBool::new(false),
    }));
    let want = rayon::current_num_threads().saturating_sub(1);
    let mut workers = 0;
    for i in 0..want {
        let spawned = std::thread::Builder::new()
            .name(format!("onestep-cpu-{i}"))
            .spawn(move || worker(shared));
        // A thread that cannot be spawned leaves fewer workers; regions still complete.
        workers += spawned.is_ok() as usize;
    }
    Pool { shared, workers }
}

/// Threads a region runs on (the caller included).
pub(crate) fn threads() -> usize {
    pool().workers + 1
}

/// Runs `f(i)` for every `i` in `0..n`, spread over the pool's threads and the caller; returns when
/// all have returned. A panic in `f` is re-raised here once every index has finished.
pub(crate) fn run(n: usize, f: &(dyn Fn(usize) + Sync)) {
    let p = pool();
    let serial = n <= 1
        || p.workers == 0
        || INSIDE.with(|c| c.get())
        || p.shared
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err();
    if serial {
        (0..n).for_each(f);
        return;
    }
    let s = p.shared;
    // SAFETY (lifetime erasure): workers call `f` only for claimed indices of this region, and this
    // function returns only after every index has finished.
    let region = (s.ticket.load(Ordering::Relaxed) >> 32) + 1;
    let job = Job {
        f: unsafe {
            std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f)
        },
        n,
        region,
    };
    *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
    s.done.store(0, Ordering::Relaxed);
    s.panicked.store(false, Ordering::Relaxed);
    s.ticket.store(region << 32, Ordering::SeqCst);
    if s.sleeping.load(Ordering::SeqCst) > 0 {
        let _g = s.job.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
    INSIDE.with(|c| c.set(true));
    work(s, job);
    while s.done.load(Ordering::Acquire) < n {
        std::hint::spin_loop();
    }
    INSIDE.with(|c| c.set(false));
    let panicked = s.panicked.load(Ordering::Acquire);
    s.busy.store(false, Ordering::Release);
    if panicked {
        panic!("a CPU kernel panicked in a parallel region");
    }
}

/// A pointer that may cross threads: the caller guarantees the accesses through it are disjoint.
struct SendPtr<T>(*mut T);
// SAFETY: used only by `for_chunks_mut`, whose closures touch disjoint chunks.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// Runs `f(i, chunk_i)` over the consecutive `chunk`-element pieces of `data` (the last may be
/// shorter), in parallel as [`run`].
pub(crate) fn for_chunks_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    let (len, chunk) = (data.len(), chunk.max(1));
    let base = SendPtr(data.as_mut_ptr());
    let base = &base;
    run(len.div_ceil(chunk), &|i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: `run` gives each index to one thread once; chunks of distinct indices are disjoint
        // ranges inside `data`, which stays mutably borrowed until `run` returns.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
        f(i, piece);
    });
}

/// Runs `f(first_row, rows)` over pieces of `data` made of whole `row`-element rows, each of at
/// least `min` elements (the last may be shorter), in parallel as [`run`].
pub(crate) fn for_rows_mut<T: Send>(
    data: &mut [T],
    row: usize,
    min: usize,
    f: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    let row = row.max(1);
    let per = min.div_ceil(row).max(1);
    for_chunks_mut(data, per * row, &|i, piece| f(i * per, piece));
}

/// Claims and runs indices of `job`'s region until none is left (or the region has ended).
fn work(s: &Shared, job: Job) {
    loop {
        let t = s.ticket.load(Ordering::Acquire);
        let i = (t & 0xFFFF_FFFF) as usize;
        if t >> 32 != job.region || i >= job.n {
            return;
        }
        if s.ticket
            .compare_exchange_weak(t, t + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            // SAFETY: index i of the live region is claimed and not yet done, so its caller is still
            // waiting and `f` is alive (module doc).
            let f = unsafe { &*job.f };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))).is_err() {
                s.panicked.store(true, Ordering::Release);
            }
            s.done.fetch_add(1, Ordering::Release);
        }
    }
}

fn worker(s: &'static Shared) {
    INSIDE.with(|c| c.set(true));
    let mut seen = 0u64;
    loop {
        // Spin for the next region, then sleep until one is published.
        let start = Instant::now();
        let mut spins = 0u32;
        let region = loop {
            let r = s.ticket.load(Ordering::Acquire) >> 32;
            if r != seen {
                break r;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                let mut g = s.job.lock().unwrap_or_else(|e| e.into_inner());
                s.sleeping.fetch_add(1, Ordering::SeqCst);
                while s.ticket.load(Ordering::SeqCst) >> 32 == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleeping.fetch_sub(1, Ordering::SeqCst);
                drop(g);
                break s.ticket.load(Ordering::Acquire) >> 32;
            }
            std::hint::spin_loop();
        };
        seen = region;
        // The job may already be the next region's (published before its ticket): `work` runs it
        // only once that region's ticket is out, never under this one's.
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            work(s, job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_index_runs_once_across_many_regions() {
        for n in [0usize, 1, 2, 3, 17, 200] {
            for _ in 0..200 {
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "n = {n}"
                );
            }
        }
    }

    /// A worker that read a region's number and then the next region's job (published, its ticket
    /// not yet) must not run that job under the old region's ticket: with a longer next region it
    /// could claim an index past the old one's end, run it twice and let its caller return early.
    /// Regions of alternating sizes, back to back, each index counted.
    #[test]
    fn a_job_runs_only_under_its_own_region() {
        let hits: Vec<AtomicU32> = (0..64).map(|_| AtomicU32::new(0)).collect();
        for round in 0..20_000 {
            let n = if round % 2 == 0 { 2 } else { 64 };
            run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            for (i, h) in hits.iter().enumerate().take(n) {
                assert_eq!(
                    h.swap(0, Ordering::Relaxed),
                    1,
                    "round {round}, index {i} of {n}"
                );
            }
        }
    }

    #[test]
    fn nested_and_concurrent_regions_complete() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..3 {
                sc.spawn(|| {
                    for _ in 0..100 {
                        run(4, &|_| {
                            run(3, &|_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 3 * 100 * 4 * 3);
    }

    #[test]
    fn a_panic_is_reraised_after_the_region_and_the_pool_goes_on() {
        let r = std::panic::catch_unwind(|| {
            run(16, &|i| {
                if i == 5 {
                    panic!("boom");
                }
            })
        });
        assert!(r.is_err());
        let mut v = vec![0u32; 100];
        for_chunks_mut(&mut v, 7, &|i, c| c.iter_mut().for_each(|x| *x = i as u32));
        assert!(v.iter().enumerate().all(|(j, x)| *x == (j / 7) as u32));
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let sum = AtomicUsize::new(0);
        run(8, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN * 5);
        run(8, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 56);
    }
}
