//! Memory per wallet: the resident bytes one engine (one shard) needs per wallet with two
//! grants, at 1 M and 10 M wallets (10 k under `cargo test`, which runs this once as a smoke
//! test).
//!
//! Run: `cargo bench -p tally-benches --bench memory`. `TALLY_BENCH_WALLETS=1000000,10000000`
//! replaces the list of wallet counts.
//!
//! Each measurement runs in a child process (this binary re-executed with `TALLY_MEMORY_CHILD`
//! set), so every size starts from a fresh process: memory freed by an earlier size is not
//! always handed back to the OS and would blur the next baseline. The child reads its resident
//! set from `/proc/self/statm` (resident pages × page size) and the live heap bytes from a
//! counting global allocator, builds the engine by applying the benchmark catalog and then, per
//! wallet, CreateWallet + AssignPlan + two Grants (priority 0 expiring, priority 5 not), and
//! reads both again. It also sums the sizes of the state's own allocations (wallets, balances,
//! grants, plan assignments), so the difference to the live heap is the engine's private
//! indexes. Two modes:
//!
//! * `wallets`: a one-second idempotency window and the clock advancing 1 ms per wallet, so the
//!   setup request ids age out as the build goes: the cost of the wallets alone (the figure the
//!   design target is about);
//! * `remembered` (up to 1 M wallets): the default 24 h window with every setup request id still
//!   remembered, to price the idempotency table per remembered request.
//!
//! Before each size after the first, the bytes per wallet measured so far are extrapolated; a
//! size that would not fit in `MemAvailable` (less 2 GiB for everyone else) is skipped with a
//! line saying so, and the child sets its OOM score so that it, not a neighbour, is stopped if
//! memory runs out anyway.

use std::alloc::{GlobalAlloc, Layout, System};
use std::mem::size_of;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use tally_benches::wallet_engine;
use tally_engine::model::{Assignment, Balance, GrantState, Remembered, Wallet};
use tally_engine::{Config, State, Timestamp};

/// Counts live heap bytes: every allocation adds its size, every free subtracts it.
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Set in a child process: `wallets:mode`.
const CHILD_ENV: &str = "TALLY_MEMORY_CHILD";
/// The `remembered` mode runs up to this many wallets (4 remembered requests per wallet).
const REMEMBERED_WALLETS_MAX: usize = 1_000_000;
const START: Timestamp = Timestamp(1_700_000_000_000_000);

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = match std::env::var("TALLY_BENCH_WALLETS") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("TALLY_BENCH_WALLETS is a comma-separated list")
            })
            .collect(),
        Err(_) if full => vec![1_000_000, 10_000_000],
        Err(_) => vec![10_000],
    };
    println!(
        "sizes: Wallet {} B, Balance {} B, GrantState {} B, Assignment {} B, Remembered {} B; \
         page {} B",
        size_of::<Wallet>(),
        size_of::<Balance>(),
        size_of::<GrantState>(),
        size_of::<Assignment>(),
        size_of::<Remembered>(),
        page_bytes()
    );
    println!(
        "{:>11} {:<10} {:>10} {:>12} {:>12} {:>14} {:>12} {:>15}",
        "wallets",
        "mode",
        "build s",
        "RSS B/wallet",
        "heap B/wallet",
        "state B/wallet",
        "index B/wallet",
        "RSS after drop"
    );
    // Resident bytes per wallet of the last size measured, to check the next one fits.
    let mut last_rss_per_wallet: Option<f64> = None;
    for &wallets in &sizes {
        if let Some(per_wallet) = last_rss_per_wallet {
            // Growing a table briefly holds its old and new arrays: allow 20 % on top, and keep
            // 2 GiB for everyone else on the machine.
            let needed = per_wallet * wallets as f64 * 1.2;
            let available = mem_available_bytes() as f64;
            if needed > available - (2u64 << 30) as f64 {
                println!(
                    "{wallets:>11} skipped: needs about {:.1} GiB, {:.1} GiB available",
                    needed / (1u64 << 30) as f64,
                    available / (1u64 << 30) as f64
                );
                continue;
            }
        }
        let mut modes = vec!["wallets"];
        if wallets <= REMEMBERED_WALLETS_MAX {
            modes.push("remembered");
        }
        for mode in modes {
            let out = Command::new(std::env::current_exe().expect("own path"))
                .env(CHILD_ENV, format!("{wallets}:{mode}"))
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
                .expect("run the measuring child");
            assert!(out.status.success(), "child {wallets}:{mode} failed");
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .find(|l| l.starts_with("memory-child "))
                .expect("the child reports");
            let field = |key: &str| -> f64 {
                line.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("field {key} in {line}"))
            };
            let n = wallets as f64;
            if mode == "wallets" {
                last_rss_per_wallet = Some((field("rss_after") - field("rss_before")) / n);
            }
            let heap = field("heap_after") - field("heap_before");
            let state = field("state_bytes");
            println!(
                "{wallets:>11} {mode:<10} {:>10.1} {:>12.0} {:>12.0} {:>14.0} {:>12.0} {:>12.0} MiB",
                field("build_s"),
                (field("rss_after") - field("rss_before")) / n,
                heap / n,
                state / n,
                (heap - state) / n,
                field("rss_after_drop") / (1024.0 * 1024.0),
            );
            println!("  {line}");
        }
    }
}

/// Measures one size in this (fresh) process and prints one `memory-child` line.
fn child(spec: &str) {
    let (wallets, mode) = spec.split_once(':').expect("wallets:mode");
    let wallets: usize = wallets.parse().expect("wallet count");
    let (config, step_us) = match mode {
        "wallets" => (
            Config {
                idempotency_retention_us: Timestamp::SECOND_US,
                ..Config::default()
            },
            1_000,
        ),
        "remembered" => (Config::default(), 0),
        other => panic!("unknown mode {other}"),
    };
    // If memory runs out, be the process the kernel stops (raising one's own score needs no
    // privilege; failing to is harmless).
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    let rss_before = rss_bytes();
    let heap_before = LIVE_BYTES.load(Ordering::Relaxed);
    let started = Instant::now();
    let built = wallet_engine(config, wallets, START, step_us);
    let build_s = started.elapsed().as_secs_f64();
    let rss_after = rss_bytes();
    let heap_after = LIVE_BYTES.load(Ordering::Relaxed);
    let state = built.engine.state();
    assert_eq!(state.wallets.len(), wallets);
    let state_bytes = state_heap_bytes(state);
    let requests = state.requests.len();
    drop(built);
    let rss_after_drop = rss_bytes();
    println!(
        "memory-child wallets={wallets} mode={mode} build_s={build_s:.2} rss_before={rss_before} \
         rss_after={rss_after} heap_before={heap_before} heap_after={heap_after} \
         state_bytes={state_bytes} remembered={requests} rss_after_drop={rss_after_drop}"
    );
}

/// Heap bytes the state's wallets hold, from their capacities: the `Arc` allocation of each
/// wallet (two counters + the `Wallet`), its balances, their grants, its plan assignments and
/// other lists, and the wallet pointer vector. Not the catalog, the request table, or the
/// engine's private indexes (wallet id map, timers).
fn state_heap_bytes(state: &State) -> usize {
    let mut bytes = state.wallets.capacity() * size_of::<usize>();
    for wallet in &state.wallets {
        bytes += 2 * size_of::<usize>() + size_of::<Wallet>();
        bytes += wallet.metadata.capacity() * size_of_val_slice(&wallet.metadata);
        bytes += wallet.balances.capacity() * size_of::<Balance>();
        for balance in &wallet.balances {
            bytes +=
                (balance.grants.capacity() + balance.pending.capacity()) * size_of::<GrantState>();
        }
        bytes += wallet.holds.capacity() * size_of_val_slice(&wallet.holds);
        bytes += wallet.closed_holds.capacity() * size_of_val_slice(&wallet.closed_holds);
        bytes += wallet.plans.capacity() * size_of::<Assignment>();
        bytes += wallet.topups.capacity() * size_of_val_slice(&wallet.topups);
        bytes += wallet.payments.capacity() * size_of_val_slice(&wallet.payments);
        bytes += wallet.adjustments.capacity() * size_of_val_slice(&wallet.adjustments);
    }
    bytes
}

/// The size of one element of a collection.
fn size_of_val_slice<C, T>(_: &C) -> usize
where
    for<'a> &'a C: IntoIterator<Item = &'a T>,
{
    size_of::<T>()
}

/// Resident bytes of this process: resident pages (second field of `/proc/self/statm`) × page
/// size.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm has a resident field");
    pages * page_bytes()
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (0 if unreadable).
fn mem_available_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn page_bytes() -> u64 {
    // SAFETY: sysconf reads a constant; no memory is involved.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).unwrap_or(4096)
}
