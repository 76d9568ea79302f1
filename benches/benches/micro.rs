//! Micro benches of the pieces around the engine: frame encode and decode, WAL append + sync,
//! snapshot write and load, and recovery (checkpoint load + WAL replay) the way the server does
//! it.
//!
//! Run: `cargo bench -p tally-benches --bench micro` (figures in `docs/benchmarks.md`). Criterion
//! times the frame, WAL and snapshot cases; recovery is too big for criterion's repetitions, so
//! it runs once per case and prints a summary line with its phases and records per second.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) every case runs once on small data
//! (a 10 k-wallet snapshot, a 1 k-wallet + 10 k-record recovery), so CI stays fast. Set
//! `TALLY_BENCH_DIR` to put the temporary files on another file system than the temporary
//! directory's, `TALLY_BENCH_RECOVERY` to replace the recovery cases, as
//! `wallets:records,wallets:records`, and `TALLY_BENCH_RECOVERY_EFFECTS=drop` to drop replayed
//! effects instead of keeping them as the server does.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput};
use tally_benches::{usage_request, usage_request_at, wallet_engine};
use tally_engine::{Command, Config as EngineConfig, Engine, RequestId, ResultCode, Timestamp};
use tally_net::{Decoder, Message};
use tally_server::outbound::Tagged;
use tally_server::record::{self, LogEntry};
use tally_server::store::SnapshotStore;
use tally_server::{recover_shard, wal_dir, Checkpoints, Config, Until};
use tally_snapshots::SnapshotDir;
use tally_wal::{Durability, Options, Wal};

/// Simulated time between two logged usage records (100 k records per second of load).
const RECORD_STEP_US: i64 = 10;
/// A day-one clock for the simulated shard (2023-11-14), far from the wall clock.
const START: Timestamp = Timestamp(1_700_000_000_000_000);

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let base = std::env::var_os("TALLY_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir);
    let mut criterion = Criterion::default().configure_from_args();

    frames(&mut criterion);
    wal(&mut criterion, &base, full);
    snapshots(&mut criterion, &base, if full { 100_000 } else { 10_000 });

    let cases: Vec<(usize, u64)> = match std::env::var("TALLY_BENCH_RECOVERY") {
        Ok(list) => list
            .split(',')
            .map(|case| {
                let (w, r) = case
                    .split_once(':')
                    .expect("TALLY_BENCH_RECOVERY is wallets:records,...");
                (
                    w.trim().parse().expect("wallet count"),
                    r.trim().parse().expect("record count"),
                )
            })
            .collect(),
        Err(_) if full => vec![(10_000, 1_000_000), (1_000_000, 10_000_000)],
        Err(_) => vec![(1_000, 10_000)],
    };
    for (wallets, records) in cases {
        recovery(&base, wallets, records, full);
    }
    criterion.final_summary();
}

/// Frame encode and decode: one usage request, and a `UsageBatch` of 1,024 events.
fn frames(criterion: &mut Criterion) {
    let single = Message::Request(usage_request(7, 42));
    let batch = Message::UsageBatch(
        (0..1024u128)
            .map(
                |i| match usage_request(1_000 + i, i as usize * 37).command {
                    Command::Usage(event) => (RequestId(1_000 + i), event),
                    _ => unreachable!("usage_request makes usage"),
                },
            )
            .collect(),
    );
    for (name, message, events) in [("usage", &single, 1u64), ("usage_batch_1024", &batch, 1024)] {
        let mut bytes = Vec::new();
        message.encode(1, &mut bytes).expect("encodes");
        println!(
            "frame {name}: {} bytes ({:.1} bytes per event)",
            bytes.len(),
            bytes.len() as f64 / events as f64
        );
        let mut group = criterion.benchmark_group(format!("frame/{name}"));
        group.throughput(Throughput::Elements(events));
        let mut buf = Vec::with_capacity(bytes.len());
        group.bench_function("encode", |b| {
            b.iter(|| {
                buf.clear();
                message.encode(1, &mut buf).expect("encodes");
                black_box(buf.len())
            })
        });
        let mut decoder = Decoder::default();
        group.bench_function("decode", |b| {
            b.iter(|| {
                decoder.feed(&bytes);
                let frame = decoder.next_frame().expect("valid").expect("complete");
                black_box(Message::decode(&frame).expect("decodes"))
            })
        });
        group.finish();
        // The decoded frame is the message that was encoded.
        decoder.feed(&bytes);
        let frame = decoder.next_frame().expect("valid").expect("complete");
        assert_eq!(&Message::decode(&frame).expect("decodes"), message);
    }
}

/// WAL append + sync on a real directory: batches of 1, 64 and 1,024 records of 100 bytes,
/// each batch made durable with one `Wal::commit` (seal + fdatasync).
fn wal(criterion: &mut Criterion, base: &Path, full: bool) {
    let dir = tempfile::tempdir_in(base).expect("bench directory");
    let payload = [0x5au8; 100];
    let mut group = criterion.benchmark_group("wal/append_sync");
    if full {
        group.measurement_time(Duration::from_secs(8));
    }
    let options = Options {
        // The smoke run creates small segments (the full run uses the server's default).
        segment_bytes: if full {
            Config::default().wal_segment_bytes
        } else {
            4 << 20
        },
        ..Options::default()
    };
    for batch in [1usize, 64, 1_024] {
        let path = dir.path().join(format!("batch-{batch}"));
        let mut wal = Wal::open_dir(&path, options.clone()).expect("open wal");
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("batch_{batch}"), |b| {
            b.iter_custom(|iterations| {
                let mut timed = Duration::ZERO;
                for _ in 0..iterations {
                    let start = Instant::now();
                    for _ in 0..batch {
                        wal.append(&payload).expect("append");
                    }
                    let durable = wal.commit().expect("commit");
                    timed += start.elapsed();
                    // Keep the disk use bounded: drop full segments, untimed.
                    if wal.segment_count() > 2 {
                        wal.delete_below(durable).expect("delete old segments");
                    }
                }
                timed
            })
        });
        assert_eq!(wal.durable_lsn(), wal.next_lsn() - 1);
        drop(wal);
        std::fs::remove_dir_all(&path).expect("clean");
    }
    group.finish();
}

/// Snapshot write (temp file, fsync, rename, directory fsync) and load (checksum pass + decode)
/// of the state of an engine with `wallets` wallets and no remembered requests.
fn snapshots(criterion: &mut Criterion, base: &Path, wallets: usize) {
    let started = Instant::now();
    let engine = settled_engine(wallets);
    let state = engine.state();
    eprintln!(
        "snapshot setup: {wallets} wallets in {:.1?}",
        started.elapsed()
    );
    let dir = tempfile::tempdir_in(base).expect("bench directory");
    let snapshots = SnapshotDir::open(dir.path().join("snapshots")).expect("open snapshot dir");
    let info = snapshots
        .write(0, 1, 1, state.now, state)
        .expect("write snapshot");
    println!(
        "snapshot: {wallets} wallets, {} bytes ({:.0} bytes per wallet)",
        info.size_bytes,
        info.size_bytes as f64 / wallets as f64
    );
    let digest = engine.digest();

    let mut group = criterion.benchmark_group(format!("snapshot/{wallets}_wallets"));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    group.throughput(Throughput::Elements(wallets as u64));
    group.bench_function("write", |b| {
        b.iter(|| snapshots.write(0, 1, 1, state.now, state).expect("write"))
    });
    group.bench_function("load", |b| {
        b.iter_batched(
            || (),
            |()| snapshots.load(&info).expect("load"),
            // The loaded state is dropped outside the timing.
            BatchSize::PerIteration,
        )
    });
    group.bench_function("load_and_restore", |b| {
        b.iter_batched(
            || (),
            |()| Engine::from_state(snapshots.load(&info).expect("load")).expect("restore"),
            BatchSize::PerIteration,
        )
    });
    group.finish();
    let restored = Engine::from_state(snapshots.load(&info).expect("load")).expect("restore");
    assert_eq!(restored.digest(), digest, "the snapshot round-trips");
}

/// An engine with `wallets` wallets whose setup request ids have aged out of a one-second
/// idempotency window, so its state is wallets (and the catalog) only.
fn settled_engine(wallets: usize) -> Engine {
    let config = EngineConfig {
        idempotency_retention_us: Timestamp::SECOND_US,
        ..EngineConfig::default()
    };
    let mut built = wallet_engine(config, wallets, START, 1);
    built
        .engine
        .handle_timeout(built.now.add_us(2 * Timestamp::SECOND_US));
    assert_eq!(built.engine.state().requests.len(), 0);
    built.engine
}

/// Recovery of one shard as `tally serve` does it: a checkpoint of `wallets` wallets, then a WAL
/// of `records` priced usage debits logged after it (encoded by `tally_server::record`, in
/// batches of the server's default `batch_max`), recovered with `tally_server::recover_shard`,
/// keeping the replayed effects as `Server::start` does. Further passes time the phases on
/// their own (checkpoint load, WAL open, scan, decode, apply with effects dropped, digest);
/// what the end-to-end time has beyond their sum is mostly keeping the effects.
fn recovery(base: &Path, wallets: usize, records: u64, full: bool) {
    let dir = tempfile::tempdir_in(base).expect("bench directory");
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        shards: 1,
        ..Config::default()
    };
    if !full {
        // Opening a log reads its segments whole; keep the smoke run's small.
        config.wal_segment_bytes = 4 << 20;
    }
    let store = SnapshotStore::open(&config).expect("snapshot store");
    // The WAL below is written under this build's billing rules, as a server would record.
    tally_server::write_rules(&config.data_dir).expect("rules file");

    // The checkpoint: wallets set up two days earlier (so their setup request ids have left
    // the 24 h idempotency window), taken at START. The setup commands count as logged records
    // 1..=commands before it.
    let started = Instant::now();
    let mut built = wallet_engine(
        config.engine(),
        wallets,
        START.add_us(-2 * Timestamp::DAY_US),
        0,
    );
    built.engine.handle_timeout(START);
    assert_eq!(built.engine.state().requests.len(), 0);
    built.now = START;
    let setup = started.elapsed();
    let checkpoint_lsn = built.commands;
    let started = Instant::now();
    store
        .write(0, checkpoint_lsn, built.now, built.engine.state())
        .expect("write checkpoint");
    let checkpoint_write = started.elapsed();
    let checkpoint_bytes: u64 = std::fs::read_dir(dir.path().join("snapshots"))
        .expect("list snapshots")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum();
    let mut now = built.now;
    drop(built);

    // The WAL after it, written as the shard loop writes it.
    let started = Instant::now();
    let path = wal_dir(&config.data_dir, 0);
    std::fs::create_dir_all(&path).expect("wal directory");
    let mut wal = Wal::open_dir(
        &path,
        Options {
            segment_bytes: config.wal_segment_bytes,
            durability: Durability::Sync,
            first_lsn: checkpoint_lsn + 1,
        },
    )
    .expect("open wal");
    let mut buf = Vec::new();
    let mut payload_bytes = 0u64;
    let mut spread = 0x7a11u64;
    for i in 0..records {
        // xorshift64: a fixed, seeded spread of wallets.
        spread ^= spread << 13;
        spread ^= spread >> 7;
        spread ^= spread << 17;
        now = now.add_us(RECORD_STEP_US);
        let id = u128::from(checkpoint_lsn + 1 + i);
        let request = usage_request_at(id, (spread % wallets as u64) as usize, now);
        record::encode_request(now, &request, &mut buf);
        payload_bytes += buf.len() as u64;
        wal.append(&buf).expect("append");
        if (i + 1) % config.batch_max as u64 == 0 {
            wal.commit().expect("commit");
        }
    }
    wal.commit().expect("commit");
    let segments = wal.segment_count();
    drop(wal);
    let wal_write = started.elapsed();
    eprintln!(
        "recovery setup: {wallets} wallets in {setup:.1?}, checkpoint {checkpoint_bytes} bytes \
         written in {checkpoint_write:.1?}; {records} records ({:.0} bytes of payload each, \
         {segments} segments) logged in {wal_write:.1?}",
        payload_bytes as f64 / records.max(1) as f64
    );

    // The real thing, end to end. Like `Server::start`, keep every replayed effect in a vector
    // (to hand to the outbound thread once the shard is recovered), unless told to drop them.
    let keep = std::env::var("TALLY_BENCH_RECOVERY_EFFECTS").map_or(true, |v| v != "drop");
    let mut effects: Vec<Tagged> = Vec::new();
    let mut effect_count = 0usize;
    let started = Instant::now();
    let (engine, wal, recovered) = recover_shard(&config, &store, 0, Until::default(), &mut |e| {
        effect_count += 1;
        if keep {
            effects.push(e);
        } else {
            black_box(e);
        }
    })
    .expect("recover");
    let total = started.elapsed();
    assert_eq!(recovered.replayed, records);
    assert_eq!(recovered.checkpoint_lsn, checkpoint_lsn);
    let digest = recovered.digest;
    drop((engine, wal, effects));

    // Phases, each timed on its own pass: checkpoint load (read, check, decode, rebuild the
    // engine's indexes), WAL open (validates every segment), scan, scan + decode, and
    // applying every record (scan + decode + apply, minus scan + decode).
    let started = Instant::now();
    let (checkpoint, warnings) = tally_server::Store::load_newest(&store, 0).expect("load");
    let load = started.elapsed();
    assert!(warnings.is_empty(), "{warnings:?}");
    let (_, mut engine) = checkpoint.expect("a checkpoint");
    let started = Instant::now();
    let wal = Wal::open_dir(&path, Options::default()).expect("reopen wal");
    let open = started.elapsed();
    let started = Instant::now();
    let mut scan = wal.scan(checkpoint_lsn + 1).expect("scan");
    let mut scanned = 0u64;
    while let Some(r) = scan.next().expect("scan") {
        scanned += black_box(r.payload.len() as u64);
    }
    let scan_only = started.elapsed();
    assert_eq!(scanned, payload_bytes);
    let started = Instant::now();
    let mut scan = wal.scan(checkpoint_lsn + 1).expect("scan");
    while let Some(r) = scan.next().expect("scan") {
        black_box(record::decode(r.payload).expect("decode"));
    }
    let scan_decode = started.elapsed();
    let started = Instant::now();
    let mut rejected = 0u64;
    let mut scan = wal.scan(checkpoint_lsn + 1).expect("scan");
    while let Some(r) = scan.next().expect("scan") {
        let decoded = record::decode(r.payload).expect("decode");
        let LogEntry::Request(request) = decoded.entry else {
            unreachable!("only requests are logged here")
        };
        if engine.handle_request(decoded.at, &request).code != ResultCode::Ok {
            rejected += 1;
        }
        while let Some(effect) = engine.poll_effect() {
            black_box(effect);
        }
    }
    let replay = started.elapsed();
    let started = Instant::now();
    let replayed_digest = engine.digest();
    let digest_time = started.elapsed();
    assert_eq!(
        replayed_digest, digest,
        "both passes rebuild the same state"
    );
    assert_eq!(rejected, 0, "every logged debit applies");
    let apply = replay.saturating_sub(scan_decode);
    let per_s = |d: Duration| records as f64 / d.as_secs_f64();
    println!(
        "recovery: wallets={wallets} records={records} total={total:.3?} \
         records_per_s_end_to_end={:.0} | checkpoint_load={load:.3?} wal_open={open:.3?} \
         scan={scan_only:.3?} ({:.0}/s) decode={:.3?} ({:.0}/s) apply={apply:.3?} ({:.0}/s) \
         replay_total={replay:.3?} ({:.0}/s) digest={digest_time:.3?} \
         effects={effect_count} ({} bytes each, {}) peak_rss={}MiB",
        per_s(total),
        per_s(scan_only),
        scan_decode.saturating_sub(scan_only),
        per_s(scan_decode.saturating_sub(scan_only)),
        per_s(apply),
        per_s(replay),
        std::mem::size_of::<Tagged>(),
        if keep { "kept" } else { "dropped" },
        peak_rss_bytes() >> 20,
    );
}

/// The process's peak resident set (`VmHWM`), in bytes.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
