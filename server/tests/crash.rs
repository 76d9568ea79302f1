//! Crash test: a workload in a child process logs every acknowledged operation; the parent
//! `kill -9`s it at random moments, restarts it, and at the end checks that every acknowledged
//! operation is present exactly once, that nothing was exported twice, and that the journal
//! agrees with every wallet.
//!
//! `TALLY_CRASH_CYCLES` sets the number of kill cycles (20 by default, as in CI; set 1000 for a
//! long run). `TALLY_CRASH_SEED` replays a run's kill timings (the seed is printed).
//! A second scenario kills the child right after a checkpoint it asked for returned, under
//! light load, and then drops whatever the export files hold beyond their recorded progress (a
//! power loss that loses unsynced writes): a checkpoint must never be durable before the effects
//! it covers are, since recovery re-derives effects only from the WAL above it. A third kills
//! the child while a WAL segment is being created (its `.wal.tmp` file exists): segments are the
//! smallest allowed (64 KiB) in every scenario, so rotation and the deletion of old segments after
//! checkpoints happen every few hundred records.
//!
//! This is a `harness = false` test: the same binary is the parent and, with
//! `TALLY_CRASH_CHILD` set, the child.

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::str::FromStr;
use std::time::Duration;

use common::*;
use rust_decimal::Decimal;
use tally_engine::{asset, name, DebitMode, Query, QueryReply};
use tally_server::store::SnapshotStore;
use tally_server::{Config, Server};

const WALLETS: usize = 4;

fn wallets() -> Vec<String> {
    (0..WALLETS).map(|i| format!("crash-{i}")).collect()
}

fn crash_config(dir: &Path) -> Config {
    Config {
        snapshot_every_records: 300,
        snapshots_keep: 2,
        // The smallest segments: rotation every few hundred records.
        wal_segment_bytes: 64 * 1024,
        // JSON-lines files sealed every 64 KiB, none deleted: exports rotate across kills too.
        jsonl_rotate_bytes: 64 * 1024,
        jsonl_keep: u64::MAX,
        // The parent's PostgreSQL, for the scenario that exports to it.
        export_postgres: std::env::var("TALLY_CRASH_POSTGRES").ok(),
        ..config(dir, 2)
    }
}

/// A child's server with the catalog, the wallets and their grants, and its log of
/// acknowledged ids (one write per acknowledgement, so it holds only acknowledged ids).
fn start_child(dir: &Path) -> (Server, tally_server::Handle, std::fs::File) {
    let config = crash_config(dir);
    let server = Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
    let handle = server.handle();
    setup(&handle, &wallets());
    for (i, w) in wallets().iter().enumerate() {
        // The same ids every cycle: the first grant is applied once, later ones are repeats.
        assert!(handle
            .call(grant(i as u128 + 1, w, "1000000"))
            .unwrap()
            .code
            .is_ok());
    }
    let acks = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("acks.log"))
        .unwrap();
    (server, handle, acks)
}

/// The id of a child's `i`th usage event in `cycle`: above every id `setup` and the grants use
/// (those are repeated every cycle, in the wallets' scopes too), and under 2^64 (the exports
/// carry ids as JSON numbers). Ids of the form `(cycle + 1) × 10^7 + i` met `setup`'s at the
/// hundredth cycle, which a 1,000-cycle run found as an idempotency conflict.
fn usage_id(cycle: u128, i: u128) -> u128 {
    assert!(cycle < 1 << 20 && i < 1 << 24);
    (1 << 40) + (cycle << 24) + i
}

fn child(dir: PathBuf, cycle: u128) {
    let (_server, handle, mut acks) = start_child(&dir);
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut pending = VecDeque::new();
    for i in 0u128.. {
        let id = usage_id(cycle, i);
        let wallet = &wallets()[i as usize % WALLETS];
        let mode = if i % 3 == 0 {
            DebitMode::Record
        } else {
            DebitMode::Strict
        };
        match handle.submit(usage(id, wallet, 1 + (i % 7) as u32, mode)) {
            Ok(p) => pending.push_back((id, p)),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
        if pending.len() >= 64 {
            let (id, p) = pending.pop_front().unwrap();
            let reply = p.wait().unwrap();
            assert!(
                reply.code.is_ok(),
                "request {id} (cycle {cycle}): {reply:?}"
            );
            // One write per acknowledgement: the log holds only acknowledged ids.
            acks.write_all(format!("{id}\n").as_bytes()).unwrap();
        }
    }
}

/// The checkpoint scenario's child: a few acknowledged events, a checkpoint, then it waits to be
/// killed.
fn child_checkpoint(dir: PathBuf, cycle: u128) {
    let (_server, handle, mut acks) = start_child(&dir);
    for i in 0..40u128 {
        let id = usage_id(cycle, i);
        let wallet = &wallets()[i as usize % WALLETS];
        let reply = handle
            .call(usage(id, wallet, 3, DebitMode::Strict))
            .unwrap();
        assert!(reply.code.is_ok(), "{reply:?}");
        acks.write_all(format!("{id}\n").as_bytes()).unwrap();
    }
    handle.checkpoint().unwrap();
    println!("checkpointed");
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Kills `child` (SIGKILL) and checks that it was still running: a child that stopped by itself
/// (a failed assertion in its workload) fails the test.
fn kill(child: &mut std::process::Child, cycle: u64) {
    use std::os::unix::process::ExitStatusExt;
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "child {cycle} stopped by itself before it was killed: {status}"
    );
}

fn run_child(
    exe: &Path,
    dir: &Path,
    cycle: u64,
    scenario: &str,
    first: &str,
) -> std::process::Child {
    let mut child = Process::new(exe)
        .env("TALLY_CRASH_CHILD", dir)
        .env("TALLY_CRASH_CYCLE", cycle.to_string())
        .env("TALLY_CRASH_SCENARIO", scenario)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), first, "child {cycle} did not start");
    child
}

/// A power loss on the export files: everything beyond the offsets their progress file vouches
/// for is dropped (at least every unsynced write). A file sealed after the progress was written
/// was synced before its rename and stays whole; the current file after it was never synced.
fn drop_unsynced_exports(dir: &Path) {
    let outbound = dir.join("outbound");
    let progress: serde_json::Value =
        serde_json::from_slice(&std::fs::read(outbound.join("progress.json")).unwrap()).unwrap();
    for (stream, offset) in progress["offsets"].as_object().unwrap() {
        let sealed = progress["sealed"][stream].as_u64().unwrap_or(0);
        let next = tally_server::outbound::jsonl::sealed_path(&outbound, stream, sealed + 1);
        let keep = if next.exists() {
            0
        } else {
            offset.as_u64().unwrap()
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(outbound.join(format!("{stream}.jsonl")))
            .unwrap();
        file.set_len(keep).unwrap();
    }
}

fn decimal(v: &serde_json::Value) -> Decimal {
    Decimal::from_str(v.as_str().unwrap()).unwrap()
}

fn main() {
    if let Ok(dir) = std::env::var("TALLY_CRASH_CHILD") {
        let cycle = std::env::var("TALLY_CRASH_CYCLE").unwrap().parse().unwrap();
        match std::env::var("TALLY_CRASH_SCENARIO").as_deref() {
            Ok("checkpoint") => child_checkpoint(PathBuf::from(dir), cycle),
            _ => child(PathBuf::from(dir), cycle),
        }
        return;
    }
    kill_after_checkpoint();
    kill_during_rotation();
    kill_at_random();
    println!("3 passed, 0 failed");
}

/// Kills the child right after each checkpoint it asked for, with a power loss on the exports.
fn kill_after_checkpoint() {
    let exe = std::env::current_exe().unwrap();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_path_buf();
    for cycle in 0..5 {
        let mut child = run_child(&exe, &dir, cycle, "checkpoint", "checkpointed");
        kill(&mut child, cycle);
        drop_unsynced_exports(&dir);
    }
    verify(&dir, "kill after checkpoint");
}

/// Whether a shard of `dir` is creating a WAL segment now (its temporary file exists).
fn rotating(dir: &Path) -> bool {
    (0..2).any(|shard| {
        std::fs::read_dir(dir.join(format!("shard-{shard:03}")).join("wal"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
    })
}

/// Kills the child under load while a WAL segment is being created.
fn kill_during_rotation() {
    let exe = std::env::current_exe().unwrap();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_path_buf();
    let cycles = 6;
    let mut caught = 0;
    for cycle in 0..cycles {
        let mut child = run_child(&exe, &dir, cycle, "load", "ready");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut seen = false;
        while !seen && std::time::Instant::now() < deadline {
            seen = rotating(&dir);
        }
        kill(&mut child, cycle);
        caught += usize::from(seen);
    }
    println!("crash test: {caught} of {cycles} kills landed while a WAL segment was being created");
    assert!(caught > 0, "no kill landed during a rotation");
    verify(&dir, "kill during rotation");
}

/// Kills the child under load at random moments, with the history exported to PostgreSQL.
fn kill_at_random() {
    let pg_dir = tempfile::tempdir().unwrap();
    let pg = common::postgres::Postgres::start(&pg_dir.path().join("pg"));
    // SAFETY: set before any thread of this process reads the environment concurrently
    // (the children inherit it).
    unsafe { std::env::set_var("TALLY_CRASH_POSTGRES", &pg.url) };
    let cycles: u64 = std::env::var("TALLY_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut seed: u64 = std::env::var("TALLY_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64 * 2_654_435_761 + 1);
    println!("crash test: {cycles} cycles, TALLY_CRASH_SEED={seed}");
    let exe = std::env::current_exe().unwrap();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_path_buf();
    for cycle in 0..cycles {
        let mut child = run_child(&exe, &dir, cycle, "load", "ready");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(20 + seed % 200));
        kill(&mut child, cycle);
    }
    verify(&dir, "kill at random");
}

/// Recovers `dir` and checks that every acknowledged event was exported exactly once and that the
/// exported journal agrees with every wallet.
fn verify(dir: &Path, scenario: &str) {
    let dir = dir.to_path_buf();
    // Recover in-process, then stop cleanly so the outbound sinks catch up with the replay.
    let config = crash_config(&dir);
    let server = Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
    let handle = server.handle();
    let mut ledger = BTreeMap::new();
    for w in wallets() {
        let reply = handle.query(Query::Balance {
            wallet: name(&w),
            asset: asset("USD"),
        });
        let QueryReply::Balance(b) = reply.unwrap().unwrap() else {
            panic!()
        };
        ledger.insert(w, b.ledger);
    }
    let digests = server.shutdown().unwrap();
    let server = Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
    let again: Vec<u64> = server.recovered().iter().map(|r| r.digest).collect();
    assert_eq!(
        again, digests,
        "a second recovery rebuilt a different state"
    );
    server.shutdown().unwrap();

    let acked: Vec<u128> = std::fs::read_to_string(dir.join("acks.log"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let mut exported_ids = BTreeMap::<u128, u32>::new();
    for line in exported(&dir, "margin") {
        let id = line["effect"]["Margin"]["request"].as_u64().unwrap() as u128;
        *exported_ids.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = exported_ids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "usage exported twice: {twice:?}");
    let missing: BTreeSet<_> = acked
        .iter()
        .filter(|id| !exported_ids.contains_key(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged usage events were lost",
        missing.len()
    );

    // The journal, replayed, gives every wallet its ledger balance, and sums to zero.
    let mut accounts = BTreeMap::<String, Decimal>::new();
    let journal = exported(&dir, "journal");
    for line in &journal {
        let entry = &line["effect"]["Journal"];
        let amount = decimal(&entry["amount"]);
        *accounts.entry(entry["from"].to_string()).or_default() -= amount;
        *accounts.entry(entry["to"].to_string()).or_default() += amount;
    }
    assert_eq!(accounts.values().copied().sum::<Decimal>(), Decimal::ZERO);
    for (w, balance) in &ledger {
        let key = serde_json::json!({ "Wallet": w }).to_string();
        assert_eq!(
            accounts.get(&key).copied().unwrap_or_default(),
            *balance,
            "wallet {w}"
        );
    }
    // The SQLite history store holds the same, exactly once: every acknowledged event, and a
    // journal that gives every wallet its balance.
    let reader = tally_server::outbound::sqlite::Reader::open(&dir).unwrap();
    let mut stored = BTreeMap::<String, u32>::new();
    for w in wallets() {
        let mut filter = tally_server::outbound::sqlite::Filter {
            wallet: w.clone(),
            limit: 1000,
            ..Default::default()
        };
        loop {
            let page = reader.usage(&filter).unwrap();
            for row in &page.rows {
                *stored.entry(row.request_id.clone()).or_default() += 1;
            }
            match page.next {
                Some(next) => filter.cursor = Some(next),
                None => break,
            }
        }
        let mut balance = Decimal::ZERO;
        let mut filter = tally_server::outbound::sqlite::Filter {
            wallet: w.clone(),
            limit: 1000,
            ..Default::default()
        };
        loop {
            let page = reader.transactions(&filter).unwrap();
            for row in &page.rows {
                if row.from == "wallet" {
                    balance -= row.amount;
                }
                if row.to == "wallet" {
                    balance += row.amount;
                }
            }
            match page.next {
                Some(next) => filter.cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(balance, ledger[&w], "wallet {w} in the history store");
    }
    assert!(stored.values().all(|n| *n == 1), "usage stored twice");
    for id in &acked {
        assert!(
            stored.contains_key(&format!("{id:032x}")),
            "acknowledged event {id} is not in the history store"
        );
    }
    let (usage_rows, journal_rows, _) = reader.counts().unwrap();
    assert_eq!(usage_rows as usize, exported_ids.len());
    assert_eq!(journal_rows as usize, journal.len());

    // PostgreSQL, when the history was exported there: the same rows, once each.
    if let Some(url) = &config.export_postgres {
        let server =
            Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
        let mut pg = ::postgres::Client::connect(url, ::postgres::NoTls).unwrap();
        common::postgres::wait_for_usage(&mut pg, usage_rows as i64);
        server.shutdown().unwrap();
        let ids: Vec<String> = pg
            .query("SELECT request_id FROM tally.usage_events", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let distinct: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(
            distinct.len(),
            ids.len(),
            "usage exported twice to PostgreSQL"
        );
        for id in &acked {
            assert!(
                distinct.contains(&format!("{id:032x}")),
                "acknowledged event {id} is not in PostgreSQL"
            );
        }
        let journal_pg: i64 = pg
            .query_one("SELECT count(*) FROM tally.journal", &[])
            .unwrap()
            .get(0);
        assert!(journal_pg as u64 <= journal_rows);
        println!(
            "crash test ({scenario}): PostgreSQL holds {} usage events, once each",
            ids.len()
        );
    }
    println!(
        "crash test ({scenario}): {} acknowledged usage events, {} exported, {} journal entries, \
         all present once; the margin stream was sealed {} times",
        acked.len(),
        exported_ids.len(),
        journal.len(),
        sealed(&dir, "margin")
    );
}

/// How many files of an outbound stream were sealed (all are kept in these tests).
fn sealed(dir: &Path, stream: &str) -> usize {
    std::fs::read_dir(dir.join("outbound"))
        .unwrap()
        .filter(|e| {
            let file = e.as_ref().unwrap().file_name().into_string().unwrap();
            file.starts_with(&format!("{stream}.")) && file != format!("{stream}.jsonl")
        })
        .count()
}
