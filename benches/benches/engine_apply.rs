//! Engine apply: priced usage debits per second on one thread, and heap allocations per debit
//! in steady state, across 1 M wallets (10 k under `cargo test`, which runs this once as a smoke
//! test).
//!
//! Run: `cargo bench -p tally-benches --bench engine_apply`. It prints a summary line with the
//! median of five timed runs of 1 M debits and the allocations counted over them, then lets
//! criterion time single debits.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use criterion::Criterion;
use tally_benches::Workload;

/// Counts every allocation and reallocation, so the bench can report allocations per debit.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (mut wallets, warmup, run, runs) = if bench {
        (1_000_000, 400_000, 1_000_000, 5)
    } else {
        (10_000, 200_000, 50_000, 1)
    };
    // TALLY_BENCH_WALLETS overrides the wallet count (e.g. to separate cache effects).
    if let Some(n) = std::env::var("TALLY_BENCH_WALLETS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        wallets = n;
    }

    // The idempotency window in request ids: 10 M by default under --bench (a realistic memory
    // bound; 24 h at these rates would not fit in any machine's memory), TALLY_BENCH_WINDOW_IDS
    // overrides it.
    let window: u64 = std::env::var("TALLY_BENCH_WINDOW_IDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 10_000_000 } else { 100_000 });

    let started = Instant::now();
    let mut workload = Workload::with_window(wallets, 0x7a11, window);
    eprintln!(
        "setup: {wallets} wallets, window {window} ids, in {:.1?}",
        started.elapsed()
    );

    // Warm up past the idempotency window so every table has reached its steady size.
    let warmup = warmup.max(window as usize + window as usize / 20);
    for _ in 0..warmup {
        workload.debit();
    }
    let mut rates = Vec::with_capacity(runs);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..runs {
        let start = Instant::now();
        for _ in 0..run {
            workload.debit();
        }
        rates.push(run as f64 / start.elapsed().as_secs_f64());
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!(
        "engine_apply: wallets={wallets} window_ids={window} debits_per_run={run} runs={runs} \
         median_debits_per_s={median:.0} min={:.0} max={:.0} allocations_per_debit={:.6} rejected={}",
        rates[0],
        rates[rates.len() - 1],
        allocations as f64 / (run * runs) as f64,
        workload.rejected,
    );

    let mut criterion = Criterion::default().configure_from_args();
    criterion.bench_function("engine/apply_priced_debit", |b| b.iter(|| workload.debit()));
    criterion.final_summary();
}
