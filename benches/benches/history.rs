//! The history store's cost and speed, in one run:
//!
//! 1. durable debits/s through the server `Handle` with the SQLite history store on and off
//!    (alternating, `TALLY_BENCH_REPEAT` rounds, medians), batched and one caller per request;
//! 2. the SQLite sink's own sustained write rate (usage effects with their requests, committed
//!    every 65,536 like the outbound thread does), against the durable debit rate of (1);
//! 3. margin analytics and a wallet's usage page over the store that (2) filled (1 M events);
//! 4. the PostgreSQL export's rate (rows/s from the store into a real PostgreSQL started by
//!    `scripts/postgres`), over 100 k events.
//!
//! Run: `cargo bench -p tally-benches --bench history` (under `cargo test` it runs once, small).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tally_benches::{setup_requests, usage_request};
use tally_engine::{asset, name, Effect, MarginRecord, Request, RequestId, Timestamp};
use tally_server::outbound::sqlite::{Filter, GroupBy, Order, Reader};
use tally_server::outbound::{Sink, SqliteSink, Tagged};
use tally_server::store::SnapshotStore;
use tally_server::{Config, DurabilitySetting, Handle, Server};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `threads` callers, each keeping two batches of `size` usage events in flight.
fn batched(handle: &Handle, wallets: usize, run: Duration, base: u128, size: usize) -> f64 {
    let threads = 2;
    let started = Instant::now();
    let done: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let handle = handle.clone();
                s.spawn(move || {
                    let mut n = 0u64;
                    let mut id = base + t as u128 * 1_000_000_000;
                    let make = |id: &mut u128| -> Vec<Request> {
                        (0..size)
                            .map(|_| {
                                *id += 1;
                                usage_request(*id, (*id as usize * 7919) % wallets)
                            })
                            .collect()
                    };
                    let mut pending = std::collections::VecDeque::new();
                    while started.elapsed() < run {
                        while pending.len() < 2 {
                            pending.push_back(handle.submit_batch(make(&mut id)).unwrap());
                        }
                        let replies = pending.pop_front().unwrap().wait();
                        n += replies.iter().filter(|r| r.is_ok()).count() as u64;
                    }
                    for p in pending {
                        n += p.wait().iter().filter(|r| r.is_ok()).count() as u64;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    done as f64 / started.elapsed().as_secs_f64()
}

/// `callers` threads, one request each at a time.
fn single(handle: &Handle, wallets: usize, run: Duration, base: u128, callers: usize) -> f64 {
    let started = Instant::now();
    let done: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..callers)
            .map(|t| {
                let handle = handle.clone();
                s.spawn(move || {
                    let mut n = 0u64;
                    let mut id = base + t as u128 * 1_000_000_000;
                    while started.elapsed() < run {
                        id += 1;
                        let request = usage_request(id, (id as usize * 7919) % wallets);
                        if handle.call(request).is_ok() {
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    done as f64 / started.elapsed().as_secs_f64()
}

fn durable(history_store: bool, wallets: usize, run: Duration, round: u128) -> (f64, f64) {
    let temp =
        tempfile::tempdir_in(std::env::var("TALLY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .unwrap();
    let config = Config {
        data_dir: temp.path().join("data"),
        durability: DurabilitySetting::Sync,
        snapshot_every_records: 0,
        snapshot_every_secs: 0,
        history_store,
        ..Config::default()
    };
    let server = Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
    let handle = server.handle();
    setup_requests(&handle, wallets);
    let base = 1_000_000_000_000 + round * 100_000_000_000;
    let batch = batched(&handle, wallets, run, base, 1024);
    let one = single(&handle, wallets, run, base + 50_000_000_000, 64);
    server.shutdown().unwrap();
    (batch, one)
}

/// A usage effect as the shard tags it, with its request.
fn tagged(i: u64, wallets: usize, at: Timestamp) -> Tagged {
    let request = usage_request(i as u128 + 1, i as usize % wallets);
    let tally_engine::Command::Usage(event) = &request.command else {
        unreachable!()
    };
    Tagged {
        shard: (i % 2) as u32,
        lsn: i / 2 + 1,
        index: 0,
        applied_at: at,
        effect: Effect::Margin(MarginRecord {
            request: RequestId(i as u128 + 1),
            wallet: event.wallet,
            product: event.product,
            plan: name("bench"),
            version: 1,
            asset: asset("USD"),
            charged: rust_decimal::Decimal::new(123 + (i % 1000) as i64, 6),
            revenue_usd: rust_decimal::Decimal::new(123 + (i % 1000) as i64, 6),
            cost_usd: rust_decimal::Decimal::new(100 + (i % 700) as i64, 6),
            occurred_at: Timestamp(at.0 - (i as i64 % 86_400) * 1_000_000),
            credit_priority: 0,
            credit_expires_at: None,
        }),
        cause: Some(Arc::new(request)),
    }
}

fn fill_store(dir: &std::path::Path, events: u64, wallets: usize) -> f64 {
    let mut sink = SqliteSink::open(dir, None).unwrap();
    let now = Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64,
    );
    let started = Instant::now();
    for i in 0..events {
        sink.write(&tagged(i, wallets, now)).unwrap();
        if sink.unflushed() >= 65_536 {
            sink.flush().unwrap();
        }
    }
    sink.flush().unwrap();
    events as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let wallets = if bench { 100_000 } else { 1_000 };
    let run = Duration::from_secs_f64(if bench { 5.0 } else { 0.2 });
    let rounds: usize = std::env::var("TALLY_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 3 } else { 1 });

    // 1. The hot path with and without the store.
    let (mut on_batch, mut off_batch, mut on_one, mut off_one) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let (b, o) = durable(true, wallets, run, round as u128 * 2);
        on_batch.push(b);
        on_one.push(o);
        let (b, o) = durable(false, wallets, run, round as u128 * 2 + 1);
        off_batch.push(b);
        off_one.push(o);
        println!(
            "history: round {round}: batched {b_on:.0} with store / {b_off:.0} without ({:.2}); \
             64 callers {o_on:.0} / {o_off:.0} ({:.2})",
            on_batch[round] / off_batch[round],
            on_one[round] / off_one[round],
            b_on = on_batch[round],
            b_off = off_batch[round],
            o_on = on_one[round],
            o_off = off_one[round],
        );
    }
    let (ob, fb, oo, fo) = (
        median(on_batch),
        median(off_batch),
        median(on_one),
        median(off_one),
    );
    println!(
        "history: durable debits/s, medians of {rounds}: batched {ob:.0} with the store, {fb:.0} \
         without ({:.2}x); 64 callers one at a time {oo:.0} with, {fo:.0} without ({:.2}x)",
        ob / fb,
        oo / fo
    );

    // 2. The SQLite sink on its own.
    let temp =
        tempfile::tempdir_in(std::env::var("TALLY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .unwrap();
    let events: u64 = if bench { 1_000_000 } else { 20_000 };
    let rate = fill_store(temp.path(), events, wallets);
    println!(
        "history: SQLite sink: {events} usage events at {rate:.0}/s ({:.2}x the batched durable \
         debit rate with the store)",
        rate / ob
    );

    // 3. Queries over the filled store.
    let reader = Reader::open(temp.path()).unwrap();
    for (label, group_by) in [
        ("wallet", GroupBy::Wallet),
        ("model", GroupBy::Model),
        ("hour", GroupBy::Hour),
    ] {
        let started = Instant::now();
        let groups = reader
            .margin(group_by, None, None, Order::Margin, 100)
            .unwrap();
        println!(
            "history: margin analytics group_by={label} over {events} events: {:.0} ms ({} groups returned)",
            started.elapsed().as_secs_f64() * 1e3,
            groups.len()
        );
    }
    let wallet = match &tagged(7, wallets, Timestamp(0)).effect {
        Effect::Margin(m) => m.wallet.as_str().to_string(),
        _ => unreachable!(),
    };
    let started = Instant::now();
    let page = reader
        .usage(&Filter {
            wallet,
            limit: 50,
            ..Default::default()
        })
        .unwrap();
    println!(
        "history: one wallet's newest 50 usage events: {:.2} ms ({} rows)",
        started.elapsed().as_secs_f64() * 1e3,
        page.rows.len()
    );

    // 4. The PostgreSQL export, when PostgreSQL can be started here.
    let pg_events: u64 = if bench { 100_000 } else { 2_000 };
    let pg_temp = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/postgres");
    let pg_dir = pg_temp.path().join("pg");
    let started_pg = std::process::Command::new(script)
        .arg("start")
        .arg(&pg_dir)
        .output();
    match started_pg {
        Ok(out) if out.status.success() => {
            let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
            let store = tempfile::tempdir().unwrap();
            fill_store(store.path(), pg_events, wallets);
            let started = Instant::now();
            let export =
                tally_server::outbound::PostgresExport::start(&url, store.path(), 2).unwrap();
            let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            loop {
                let n: i64 = client
                    .query_one("SELECT count(*) FROM tally.usage_events", &[])
                    .map(|r| r.get(0))
                    .unwrap_or(0);
                if n as u64 == pg_events {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let rate = pg_events as f64 / started.elapsed().as_secs_f64();
            export.stop();
            println!(
                "history: PostgreSQL export: {pg_events} usage events at {rate:.0} rows/s \
                 ({:.2}x the batched durable debit rate)",
                rate / ob
            );
            let _ = std::process::Command::new(script)
                .arg("remove")
                .arg(&pg_dir)
                .status();
        }
        _ => println!(
            "history: PostgreSQL export: skipped (scripts/postgres could not start a server)"
        ),
    }
}
