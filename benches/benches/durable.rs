//! Durable debits through the server's `Handle`: the WAL in `sync` mode, group commit, one
//! shard per core, 1 M wallets (10 k under `cargo test`, which runs this once as a smoke test).
//!
//! Reports, in one run: the disk's raw `pwrite` + `fdatasync` latency (the floor), closed-loop
//! maximum throughput, and ack latency p50/p99/p99.9 at several open-loop offered loads, with
//! latency measured from each request's *intended* send time (no coordinated omission).
//!
//! Run: `cargo bench -p tally-benches --bench durable`.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tally_benches::{setup_requests, usage_request};
use tally_engine::shard_for;
use tally_server::store::SnapshotStore;
use tally_server::{
    CallError, Config, DurabilitySetting, Handle, PendingBatch, PendingReply, Server,
};

fn raw_fdatasync_us(dir: &std::path::Path, samples: usize) -> Histogram<u64> {
    let path = dir.join("fdatasync-probe");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.set_len(samples as u64 * 4096).unwrap();
    file.sync_all().unwrap();
    let page = [0x5au8; 4096];
    let mut histogram = Histogram::new(3).unwrap();
    for i in 0..samples {
        let start = Instant::now();
        // SAFETY: pwrite of a stack buffer to a file we own.
        let n = unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                page.as_ptr().cast(),
                page.len(),
                (i * 4096) as i64,
            )
        };
        assert_eq!(n, 4096);
        // SAFETY: fdatasync on a file we own.
        assert_eq!(unsafe { libc::fdatasync(file.as_raw_fd()) }, 0);
        histogram
            .record(start.elapsed().as_micros() as u64)
            .unwrap();
    }
    file.flush().unwrap();
    std::fs::remove_file(path).unwrap();
    histogram
}

/// Closed loop for `duration`: `connections` callers each keep `window` requests in flight.
fn closed_loop(
    handle: &Handle,
    wallets: usize,
    connections: usize,
    window: usize,
    duration: Duration,
    base: u128,
) -> (f64, Histogram<u64>) {
    let start = Instant::now();
    let deadline = start + duration;
    let results: Vec<Histogram<u64>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..connections)
            .map(|c| {
                let handle = handle.clone();
                s.spawn(move || {
                    let mut histogram = Histogram::<u64>::new(3).unwrap();
                    let mut pending: VecDeque<(Instant, PendingReply)> = VecDeque::new();
                    let mut i = 0usize;
                    loop {
                        let open = Instant::now() < deadline;
                        if !open && pending.is_empty() {
                            break;
                        }
                        if open && pending.len() < window {
                            let id = base + (c as u128) * 100_000_000 + i as u128;
                            let request = usage_request(id, (c * 7919 + i * 104_729) % wallets);
                            match handle.submit(request) {
                                Ok(p) => {
                                    pending.push_back((Instant::now(), p));
                                    i += 1;
                                }
                                Err(CallError::Busy) => std::thread::yield_now(),
                                Err(e) => panic!("{e}"),
                            }
                            continue;
                        }
                        let (sent, p) = pending.pop_front().unwrap();
                        let reply = p.wait().unwrap();
                        assert!(reply.code.is_ok(), "{reply:?}");
                        histogram.record(sent.elapsed().as_micros() as u64).unwrap();
                    }
                    histogram
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut histogram = Histogram::<u64>::new(3).unwrap();
    for h in results {
        histogram.add(h).unwrap();
    }
    (histogram.len() as f64 / elapsed, histogram)
}

/// Closed loop for `duration`: `connections` callers each keep `window` batches of `size` usage
/// events in flight (the shape of batch frames from a gateway).
fn closed_loop_batched(
    handle: &Handle,
    wallets: usize,
    connections: usize,
    size: usize,
    window: usize,
    duration: Duration,
    base: u128,
) -> (f64, Histogram<u64>) {
    let start = Instant::now();
    let deadline = start + duration;
    let results: Vec<(usize, Histogram<u64>)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..connections)
            .map(|c| {
                let handle = handle.clone();
                s.spawn(move || {
                    let mut histogram = Histogram::<u64>::new(3).unwrap();
                    let mut pending: VecDeque<(Instant, PendingBatch)> = VecDeque::new();
                    let (mut next, mut events) = (0usize, 0usize);
                    loop {
                        let open = Instant::now() < deadline;
                        if !open && pending.is_empty() {
                            break;
                        }
                        if open && pending.len() < window {
                            let requests = (0..size)
                                .map(|k| {
                                    let i = next + k;
                                    let id = base + (c as u128) * 100_000_000 + i as u128;
                                    usage_request(id, (c * 7919 + i * 104_729) % wallets)
                                })
                                .collect();
                            match handle.submit_batch(requests) {
                                Ok(p) => {
                                    pending.push_back((Instant::now(), p));
                                    next += size;
                                }
                                Err(e) => panic!("{e}"),
                            }
                            continue;
                        }
                        let (sent, p) = pending.pop_front().unwrap();
                        for reply in p.wait() {
                            match reply {
                                Ok(r) => assert!(r.code.is_ok(), "{r:?}"),
                                Err(CallError::Busy) => continue,
                                Err(e) => panic!("{e}"),
                            }
                            events += 1;
                        }
                        histogram.record(sent.elapsed().as_micros() as u64).unwrap();
                    }
                    (events, histogram)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut histogram = Histogram::<u64>::new(3).unwrap();
    let mut events = 0;
    for (n, h) in results {
        events += n;
        histogram.add(h).unwrap();
    }
    (events as f64 / elapsed, histogram)
}

/// Open loop at `rate` requests/s for `duration`: latency from the intended send time.
fn open_loop(
    handle: &Handle,
    wallets: usize,
    rate: f64,
    duration: Duration,
    base: u128,
) -> (f64, Histogram<u64>, u64) {
    let shards = handle.shard_count();
    let total = (rate * duration.as_secs_f64()) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| crossbeam_channel::unbounded::<(Instant, PendingReply)>())
        .unzip();
    let start = Instant::now();
    let (histogram, busy) = std::thread::scope(|s| {
        let collectors: Vec<_> = receivers
            .into_iter()
            .map(|rx| {
                s.spawn(move || {
                    let mut histogram = Histogram::<u64>::new(3).unwrap();
                    for (intended, p) in rx {
                        assert!(p.wait().unwrap().code.is_ok());
                        histogram
                            .record(intended.elapsed().as_micros() as u64)
                            .unwrap();
                    }
                    histogram
                })
            })
            .collect();
        let mut busy = 0u64;
        for i in 0..total {
            let intended = start + interval * i as u32;
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            let wallet = (i * 104_729) % wallets;
            let request = usage_request(base + i as u128, wallet);
            let shard = match &request.command {
                tally_engine::Command::Usage(e) => shard_for(&e.wallet, shards),
                _ => unreachable!(),
            };
            match handle.submit(request) {
                Ok(p) => senders[shard as usize].send((intended, p)).unwrap(),
                Err(CallError::Busy) => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        drop(senders);
        let mut histogram = Histogram::<u64>::new(3).unwrap();
        for c in collectors {
            histogram.add(c.join().unwrap()).unwrap();
        }
        (histogram, busy)
    });
    let achieved = histogram.len() as f64 / start.elapsed().as_secs_f64();
    (achieved, histogram, busy)
}

fn show(h: &Histogram<u64>) -> String {
    format!(
        "p50={}us p99={}us p99.9={}us max={}us",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    )
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let mut wallets = if bench { 1_000_000 } else { 10_000 };
    if let Some(n) = std::env::var("TALLY_BENCH_WALLETS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        wallets = n;
    }
    let scale: f64 = if bench { 1.0 } else { 0.05 };
    let temp =
        tempfile::tempdir_in(std::env::var("TALLY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .unwrap();
    let config = Config {
        data_dir: temp.path().join("data"),
        durability: DurabilitySetting::Sync,
        snapshot_every_records: 0,
        snapshot_every_secs: 0,
        ..Config::default()
    };
    let raw = raw_fdatasync_us(temp.path(), if bench { 500 } else { 20 });
    println!("durable: raw pwrite+fdatasync 4 KiB: {}", show(&raw));

    let server = Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
    let handle = server.handle();
    let started = Instant::now();
    setup_requests(&handle, wallets);
    println!(
        "durable: setup of {wallets} wallets (create, assign, grant) in {:.1?}",
        started.elapsed()
    );

    let run = Duration::from_secs_f64(if bench { 5.0 } else { 0.3 });
    let mut base = 1_000_000_000_000u128;
    for (connections, window) in [(1, 1), (8, 1), (64, 1), (64, 64)] {
        let (rate, h) = closed_loop(&handle, wallets, connections, window, run, base);
        base += 100_000_000_000;
        println!(
            "durable: closed loop connections={connections} in_flight_each={window}: {rate:.0} debits/s, ack {}",
            show(&h)
        );
    }
    for (connections, size, window) in [(4, 256, 4), (4, 2048, 2)] {
        let (rate, h) = closed_loop_batched(&handle, wallets, connections, size, window, run, base);
        base += 100_000_000_000;
        println!(
            "durable: batched connections={connections} events_per_batch={size} batches_in_flight_each={window}: {rate:.0} debits/s, batch ack {}",
            show(&h)
        );
    }
    let mut base = 5_000_000_000u128;
    for rate in [5_000.0, 20_000.0, 50_000.0, 100_000.0, 200_000.0] {
        let duration = Duration::from_secs_f64(if bench { 5.0 } else { 0.2 });
        let (achieved, h, busy) =
            open_loop(&handle, wallets, rate * scale.max(0.1), duration, base);
        base += 10_000_000;
        println!(
            "durable: open loop offered={:.0}/s achieved={achieved:.0}/s busy={busy} ack {}",
            rate * scale.max(0.1),
            show(&h)
        );
    }
    let started = Instant::now();
    let reports = handle.checkpoint().unwrap();
    let stall = reports.iter().map(|r| r.stall_us).max().unwrap_or(0);
    println!(
        "durable: checkpoint of {wallets} wallets: shard loop stalled at most {stall}us; \
         written in {:.1?}",
        started.elapsed()
    );
    let stop = Instant::now();
    let digests = server.shutdown().unwrap();
    println!(
        "durable: shutdown in {:.1?}, {} shards",
        stop.elapsed(),
        digests.len()
    );
}
