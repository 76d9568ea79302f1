//! The server core end to end in-process: shards, group commit, replies only when durable,
//! outbound export, and recovery after a clean stop and after a dropped (unsynced) process state.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use tally_engine::*;
use tally_server::{CallError, Checkpoints, Server, Store};

/// A checkpoint store that keeps states in memory (so WAL deletion is exercised) and can be
/// shared between server runs in one test.
#[derive(Clone, Default)]
struct MemoryStore(Arc<Mutex<Vec<(u32, u64, State)>>>);

impl Checkpoints for MemoryStore {
    fn write(&self, shard: u32, lsn: u64, _at: Timestamp, state: &State) -> Result<u64, String> {
        let mut all = self.0.lock().unwrap();
        all.push((shard, lsn, state.clone()));
        Ok(lsn + 1)
    }
}

impl Store for MemoryStore {
    fn load_newest(&self, shard: u32) -> Result<tally_server::Loaded, String> {
        let all = self.0.lock().unwrap();
        let newest = all.iter().filter(|c| c.0 == shard).max_by_key(|c| c.1);
        let engine = |c: &(u32, u64, State)| Engine::from_state(c.2.clone()).map(|e| (c.1, e));
        Ok((
            newest.map(engine).transpose().map_err(|e| e.to_string())?,
            Vec::new(),
        ))
    }
    fn clone_box(&self) -> Box<dyn Store> {
        Box::new(self.clone())
    }
}

#[test]
fn requests_are_durable_and_survive_restart_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::default();
    let wallets: Vec<String> = ["alice", "bob", "carol", "dave"].map(String::from).to_vec();
    let server = Server::start(&config(dir.path(), 2), Box::new(store.clone())).unwrap();
    let handle = server.handle();
    setup(&handle, &wallets);
    for (i, w) in wallets.iter().enumerate() {
        assert!(handle
            .call(grant(900_000 + i as u128, w, "10"))
            .unwrap()
            .code
            .is_ok());
    }
    // Concurrent submissions share group commits.
    let pending: Vec<_> = (0..200u128)
        .map(|i| {
            handle
                .submit(usage(i, &wallets[i as usize % 4], 100, DebitMode::Strict))
                .unwrap()
        })
        .collect();
    for p in pending {
        assert_eq!(p.wait().unwrap().code, ResultCode::Ok);
    }
    assert_eq!(available(&handle, "alice"), d("5")); // 50 × 0.1
    let margin = handle
        .query(Query::Margin(MarginScope::Total))
        .unwrap()
        .unwrap();
    assert!(matches!(margin, QueryReply::Margin(m) if m.events == 200));
    let digests = server.shutdown().unwrap();

    // Restart: the same state, and a retried request is answered from memory, not applied.
    let server = Server::start(&config(dir.path(), 2), Box::new(store.clone())).unwrap();
    let recovered: Vec<u64> = server.recovered().iter().map(|r| r.digest).collect();
    assert_eq!(recovered, digests);
    let handle = server.handle();
    let retry = handle
        .call(usage(0, "alice", 100, DebitMode::Strict))
        .unwrap();
    assert_eq!(
        retry.code,
        ResultCode::IdempotencyConflict,
        "different time ⇒ different body"
    );
    assert_eq!(available(&handle, "alice"), d("5"));

    // A checkpoint, more work, then a restart from checkpoint + WAL.
    let checkpoints = handle.checkpoint().unwrap();
    assert_eq!(checkpoints.len(), 2);
    assert_eq!(
        handle
            .call(usage(5000, "bob", 1000, DebitMode::Strict))
            .unwrap()
            .code,
        ResultCode::Ok
    );
    let digests = server.shutdown().unwrap();
    let server = Server::start(&config(dir.path(), 2), Box::new(store)).unwrap();
    assert!(server.recovered().iter().all(|r| r.checkpoint_lsn > 0));
    let recovered: Vec<u64> = server.recovered().iter().map(|r| r.digest).collect();
    assert_eq!(recovered, digests);
    assert_eq!(available(&server.handle(), "bob"), d("4"));
    server.shutdown().unwrap();

    // Every journal entry was exported exactly once despite the restarts and replays.
    let journal = std::fs::read_to_string(dir.path().join("outbound/journal.jsonl")).unwrap();
    let mut tags: Vec<(u64, u64, u64)> = journal
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["shard"].as_u64().unwrap(),
                v["lsn"].as_u64().unwrap(),
                v["index"].as_u64().unwrap(),
            )
        })
        .collect();
    let count = tags.len();
    tags.sort();
    tags.dedup();
    assert_eq!(tags.len(), count, "a journal entry was exported twice");
    // 4 grants + 201 debits.
    assert_eq!(count, 4 + 201);
}

#[test]
fn a_second_process_cannot_open_the_same_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&config(dir.path(), 2), Box::new(MemoryStore::default())).unwrap();
    let second = Server::start(&config(dir.path(), 2), Box::new(MemoryStore::default()));
    let error = second.unwrap_err().to_string();
    assert!(error.contains("in use by another tally process"), "{error}");
    server.shutdown().unwrap();
    let mut other = config(dir.path(), 2);
    other.shards = 3;
    let error = Server::start(&other, Box::new(MemoryStore::default()))
        .unwrap_err()
        .to_string();
    assert!(error.contains("--shards 2"), "{error}");
}

#[test]
fn a_full_queue_answers_busy() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 2);
    config.shards = 1;
    config.queue_depth = 1;
    config.batch_max = 1;
    let server = Server::start(&config, Box::new(MemoryStore::default())).unwrap();
    let handle = server.handle();
    setup(&handle, &["alice".to_string()]);
    assert!(handle
        .call(grant(900_000, "alice", "10"))
        .unwrap()
        .code
        .is_ok());
    let mut busy = 0;
    let mut pending = Vec::new();
    for i in 0..2_000u128 {
        match handle.submit(usage(i, "alice", 1, DebitMode::Strict)) {
            Ok(p) => pending.push(p),
            Err(CallError::Busy) => busy += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(busy > 0, "a queue of depth 1 never filled");
    for p in pending {
        assert_eq!(p.wait().unwrap().code, ResultCode::Ok);
    }
    server.shutdown().unwrap();
}

#[test]
fn batches_are_applied_durably_and_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&config(dir.path(), 2), Box::new(MemoryStore::default())).unwrap();
    let handle = server.handle();
    let wallets: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    setup(&handle, &wallets);
    for (i, w) in wallets.iter().enumerate() {
        assert!(handle
            .call(grant(900_000 + i as u128, w, "1"))
            .unwrap()
            .code
            .is_ok());
    }
    // 300 strict debits of 0.01 over 10 wallets (30 each, 0.3 of 1 USD), a catalog command in
    // the middle, and one debit too many for its wallet's balance at the end.
    let mut requests: Vec<Request> = (0..300u128)
        .map(|i| usage(i, &wallets[i as usize % 10], 10, DebitMode::Strict))
        .collect();
    requests.insert(
        150,
        Request {
            id: RequestId(777_777),
            command: Command::DefineAsset {
                code: asset("credits"),
                scale: 2,
                usd_value: d("0.01"),
            },
        },
    );
    requests.push(usage(5_000, "b3", 800, DebitMode::Strict));
    let replies = handle.submit_batch(requests).unwrap().wait();
    assert_eq!(replies.len(), 302);
    assert!(replies[..301]
        .iter()
        .all(|r| r.as_ref().unwrap().code.is_ok()));
    assert_eq!(
        replies[301].as_ref().unwrap().code,
        ResultCode::InsufficientFunds
    );
    assert_eq!(available(&handle, "b3"), d("0.7"));
    let digests = server.shutdown().unwrap();
    let server = Server::start(&config(dir.path(), 2), Box::new(MemoryStore::default())).unwrap();
    let recovered: Vec<u64> = server.recovered().iter().map(|r| r.digest).collect();
    assert_eq!(recovered, digests);
    server.shutdown().unwrap();
}

#[test]
fn wallets_are_listed_per_shard_after_the_writes_queued_before() {
    use tally_net::server::Backend;
    use tally_net::ErrorCode;
    use tally_server::net::ShardBackend;

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&config(dir.path(), 2), Box::new(MemoryStore::default())).unwrap();
    let handle = server.handle();
    let wallets: Vec<String> = (0..40).map(|i| format!("l{i}")).collect();
    setup(&handle, &wallets);
    // A wallet created without waiting is listed by a listing queued after it.
    let late = handle
        .submit(Request {
            id: RequestId(880_000),
            command: Command::CreateWallet(CreateWallet {
                wallet: name("late"),
                overdraft: vec![],
                metadata: vec![],
            }),
        })
        .unwrap();
    let mut listed = Vec::new();
    for shard in 0..handle.shard_count() {
        let mut from = 0;
        loop {
            let page = handle
                .submit_list_wallets(shard, from, 7, WalletFilter::default())
                .unwrap()
                .blocking_recv()
                .unwrap()
                .unwrap();
            assert!(page.wallets.len() <= 7);
            for view in &page.wallets {
                assert_eq!(shard_for(&view.wallet, 2), shard);
                listed.push(view.wallet);
            }
            match page.next {
                Some(next) => from = next,
                None => break,
            }
        }
    }
    assert_eq!(late.wait().unwrap().code, ResultCode::Ok);
    let mut expected: Vec<WalletId> = wallets.iter().map(|w| name(w)).collect();
    expected.push(name("late"));
    expected.sort();
    listed.sort();
    assert_eq!(listed, expected);

    // A shard that does not exist: an empty last page from the handle, `Malformed` from the
    // network backend; never a panic.
    let page = handle
        .submit_list_wallets(2, 0, 10, WalletFilter::default())
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    assert_eq!(page.wallets, vec![]);
    assert_eq!(page.next, None);
    let backend = ShardBackend::new(handle.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let frozen = WalletFilter {
        frozen: Some(true),
        ..WalletFilter::default()
    };
    assert_eq!(
        runtime.block_on(backend.list_wallets(2, 0, 10, frozen.clone())),
        Err(ErrorCode::Malformed)
    );
    assert_eq!(
        runtime.block_on(backend.list_wallets(u32::MAX, 0, 10, frozen.clone())),
        Err(ErrorCode::Malformed)
    );
    let page = runtime
        .block_on(backend.list_wallets(0, 0, 10, frozen))
        .unwrap();
    assert_eq!(page.wallets, vec![]);
    assert_eq!(page.next, None);
    server.shutdown().unwrap();
}

/// A store that keeps no checkpoint, and so the whole WAL: every restart replays all of it.
#[derive(Clone, Default)]
struct NoCheckpoints;

impl Checkpoints for NoCheckpoints {
    fn write(&self, _: u32, _: u64, _: Timestamp, _: &State) -> Result<u64, String> {
        Ok(1)
    }
}

impl Store for NoCheckpoints {
    fn load_newest(&self, _: u32) -> Result<tally_server::Loaded, String> {
        Ok((None, Vec::new()))
    }
    fn clone_box(&self) -> Box<dyn Store> {
        Box::new(NoCheckpoints)
    }
}

#[test]
fn a_wal_written_under_other_billing_rules_is_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("RULES");
    let wallets = vec![String::from("alice")];
    let server = Server::start(&config(dir.path(), 1), Box::new(NoCheckpoints)).unwrap();
    setup(&server.handle(), &wallets);
    server.shutdown().unwrap();
    assert_eq!(
        std::fs::read_to_string(&rules).unwrap().trim(),
        RULES_VERSION.to_string()
    );

    // As an earlier release left it: no RULES file, and WAL records to replay. Refused, saying
    // what to do.
    std::fs::remove_file(&rules).unwrap();
    let Err(error) = Server::start(&config(dir.path(), 1), Box::new(NoCheckpoints)) else {
        panic!("an earlier release's WAL was replayed");
    };
    let message = error.to_string();
    assert!(message.contains("earlier tally release"), "{message}");
    assert!(message.contains("SIGTERM"), "{message}");
    assert!(!rules.exists());
    // A newer release's: refused too.
    std::fs::write(&rules, format!("{}\n", RULES_VERSION + 1)).unwrap();
    let Err(error) = Server::start(&config(dir.path(), 1), Box::new(NoCheckpoints)) else {
        panic!("a newer release's WAL was replayed");
    };
    assert!(error.to_string().contains("newer tally release"), "{error}");

    // An earlier release that stopped cleanly left nothing to replay: it starts, and says so.
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("RULES");
    let store = MemoryStore::default();
    let server = Server::start(&config(dir.path(), 1), Box::new(store.clone())).unwrap();
    setup(&server.handle(), &wallets);
    server.shutdown().unwrap();
    std::fs::remove_file(&rules).unwrap();
    let server = Server::start(&config(dir.path(), 1), Box::new(store)).unwrap();
    assert!(server.recovered().iter().all(|r| r.replayed == 0));
    server.shutdown().unwrap();
    assert_eq!(
        std::fs::read_to_string(&rules).unwrap().trim(),
        RULES_VERSION.to_string()
    );
}

#[test]
fn idempotency_settings_change_at_a_restart_and_replay_applies_them_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let wallets = vec![String::from("alice")];
    let with_max = |max: u64| {
        let mut c = config(dir.path(), 1);
        c.idempotency_max_ids = max;
        c
    };
    // No checkpoints: every start replays the whole WAL, settings records included.
    let server = Server::start(&with_max(5_000), Box::new(NoCheckpoints)).unwrap();
    setup(&server.handle(), &wallets);
    let handle = server.handle();
    assert!(handle
        .call(grant(1_000, "alice", "10"))
        .unwrap()
        .code
        .is_ok());
    let digests = server.shutdown().unwrap();

    // Restart with another bound: replay runs under the logged one (same digest), then the
    // shard logs and applies the new one.
    let server = Server::start(&with_max(1_000), Box::new(NoCheckpoints)).unwrap();
    let recovered: Vec<u64> = server.recovered().iter().map(|r| r.digest).collect();
    assert_eq!(
        recovered, digests,
        "replay ran under the settings of its records"
    );
    let handle = server.handle();
    // A repeat is still a repeat.
    assert_eq!(
        handle.call(grant(1_000, "alice", "10")).unwrap().code,
        ResultCode::Ok
    );
    assert_eq!(available(&handle, "alice"), d("10"));
    let digests = server.shutdown().unwrap();
    // And a third start, with the same bound, replays both settings records in order.
    let server = Server::start(&with_max(1_000), Box::new(NoCheckpoints)).unwrap();
    let recovered: Vec<u64> = server.recovered().iter().map(|r| r.digest).collect();
    assert_eq!(recovered, digests);
    server.shutdown().unwrap();
    // A bound below 1,000 is refused by the configuration before anything starts.
    assert!(Server::start(&with_max(10), Box::new(NoCheckpoints)).is_err());
}

#[test]
fn alert_settings_change_at_a_restart_and_replay_applies_them_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let wallets = vec![String::from("alice")];
    let with_line = |usd: &str| {
        let mut c = config(dir.path(), 1);
        c.alert_low_balance_usd = d(usd);
        c
    };
    let low_alerts = || {
        exported(dir.path(), "alerts")
            .iter()
            .filter(|l| l["effect"]["BalanceAlert"]["alert"] == "Low")
            .count()
    };
    // No line: crossing 8 USD says nothing.
    let server = Server::start(&with_line("0"), Box::new(NoCheckpoints)).unwrap();
    let handle = server.handle();
    setup(&handle, &wallets);
    assert!(handle
        .call(grant(1_000, "alice", "10"))
        .unwrap()
        .code
        .is_ok());
    let debit = |handle: &tally_server::Handle, id: u128| {
        let reply = handle
            .call(usage(id, "alice", 3_000, DebitMode::Strict))
            .unwrap();
        assert_eq!(reply.code, ResultCode::Ok);
    };
    debit(&handle, 1); // 10 → 7
    let digests = server.shutdown().unwrap();
    assert_eq!(low_alerts(), 0);

    // A line of 5 USD from the next start: replay runs under the logged settings (same digest),
    // then the shard logs and applies the new ones, and the next crossing is announced.
    let server = Server::start(&with_line("5"), Box::new(NoCheckpoints)).unwrap();
    let recovered: Vec<u64> = server.recovered().iter().map(|r| r.digest).collect();
    assert_eq!(
        recovered, digests,
        "replay ran under the settings of its records"
    );
    let handle = server.handle();
    debit(&handle, 2); // 7 → 4
    let digests = server.shutdown().unwrap();
    assert_eq!(low_alerts(), 1);
    // A third start with the same settings replays both settings records in order, logs none,
    // and announces nothing twice.
    let server = Server::start(&with_line("5"), Box::new(NoCheckpoints)).unwrap();
    let recovered: Vec<u64> = server.recovered().iter().map(|r| r.digest).collect();
    assert_eq!(recovered, digests);
    server.shutdown().unwrap();
    assert_eq!(low_alerts(), 1);
}

/// Logs `request` in one shard's WAL only, as a crash in the middle of a broadcast leaves it.
fn log_on_one_shard(config: &tally_server::Config, shard: u32, request: &Request) {
    let dir = tally_server::server::wal_dir(&config.data_dir, shard);
    let options = tally_wal::Options {
        segment_bytes: config.wal_segment_bytes,
        ..Default::default()
    };
    let mut wal = tally_wal::Wal::open_dir(dir, options).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let mut bytes = Vec::new();
    tally_server::record::encode_request(Timestamp(now), request, &mut bytes);
    wal.append(&bytes).unwrap();
    wal.commit().unwrap();
}

fn define_asset(id: u128, code: &str) -> Request {
    Request {
        id: RequestId(id),
        command: Command::DefineAsset {
            code: asset(code),
            scale: 2,
            usd_value: "1.25".parse().unwrap(),
        },
    }
}

#[test]
fn a_catalog_command_that_reached_only_some_shards_reaches_the_others_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 2);
    let start = || {
        Server::start(
            &config,
            Box::new(tally_server::store::SnapshotStore::open(&config).unwrap()),
        )
    };
    let server = start().unwrap();
    setup(&server.handle(), &["w".to_string()]);
    // A broadcast records its command before any shard sees it.
    let eur = define_asset(7_000, "EUR");
    assert!(server.handle().call(eur.clone()).unwrap().code.is_ok());
    let mut recorded = Vec::new();
    tally_server::record::encode_request(Timestamp(0), &eur, &mut recorded);
    let file = dir.path().join(tally_server::catalog::FILE);
    assert_eq!(std::fs::read(&file).unwrap(), recorded);
    server.shutdown().unwrap();

    // The next broadcast is recorded and logged by shard 1 only; then the process dies.
    let gbp = define_asset(7_001, "GBP");
    tally_server::catalog::record(dir.path(), &gbp).unwrap();
    log_on_one_shard(&config, 1, &gbp);
    let gbp_on = |server: &Server| {
        matches!(
            server.handle().query(Query::Asset {
                asset: asset("GBP")
            }),
            Ok(Ok(QueryReply::Asset(_)))
        )
    };
    // The next start gives it to shard 0 (which answers catalog questions) before serving.
    let server = start().unwrap();
    assert!(gbp_on(&server), "shard 0 got the command at the start");
    // Both shards now remember it: a retry is a repeat everywhere (shards would disagree on
    // the reply otherwise), and the catalogs stay equal across another restart.
    assert!(server.handle().call(gbp.clone()).unwrap().code.is_ok());
    server.shutdown().unwrap();
    let server = start().unwrap();
    assert!(gbp_on(&server));

    // The same for a command that is not idempotent by its content: publishing a plan's draft
    // (a second publication would make another version). A new draft is broadcast whole; its
    // publication reaches shard 1 only.
    let draft = catalog()
        .into_iter()
        .find(|c| matches!(c, Command::DraftPlan { .. }))
        .unwrap();
    let reply = server.handle().call(Request {
        id: RequestId(7_010),
        command: draft,
    });
    assert!(reply.unwrap().code.is_ok());
    server.shutdown().unwrap();
    let publish = Request {
        id: RequestId(7_011),
        command: Command::PublishPlan { plan: name("std") },
    };
    tally_server::catalog::record(dir.path(), &publish).unwrap();
    log_on_one_shard(&config, 1, &publish);
    let server = start().unwrap();
    let versions = |server: &Server| match server.handle().query(Query::Plans) {
        Ok(Ok(QueryReply::Plans(plans))) => plans
            .iter()
            .find(|p| p.plan == name("std"))
            .map(|p| p.versions.len()),
        other => panic!("{other:?}"),
    };
    assert_eq!(versions(&server), Some(2), "shard 0 published it once");
    // Shard 1 too has exactly two versions: version 2 can be assigned there, version 3 cannot.
    let on_shard_1 = (0..)
        .map(|i| format!("w{i}"))
        .find(|w| shard_for(&name(w), 2) == 1)
        .unwrap();
    setup(&server.handle(), std::slice::from_ref(&on_shard_1));
    let assign = |id: u128, version: u32| {
        let request = Request {
            id: RequestId(id),
            command: Command::AssignPlan {
                wallet: name(&on_shard_1),
                plan: name("std"),
                version,
                effective_from: Timestamp(0),
            },
        };
        server.handle().call(request).unwrap().code
    };
    assert!(assign(7_020, 2).is_ok());
    assert!(!assign(7_021, 3).is_ok());
    server.shutdown().unwrap();

    // Catalogs that the last recorded command does not explain stop the start.
    log_on_one_shard(&config, 1, &define_asset(7_002, "CHF"));
    let Err(error) = start() else {
        panic!("the start is refused")
    };
    assert!(error.0.contains("catalogs"), "{error}");
    assert!(error.0.contains("does not explain"), "{error}");

    // A point-in-time restore finds the command among what each shard replayed (as it would
    // for a broadcast that straddles the point restored to), and gives it to the others.
    let restored = tempfile::tempdir().unwrap();
    let to = restored.path().join("data");
    tally_server::ops::restore(&config, &[], &to, tally_server::Until::default(), true).unwrap();
    let config = tally_server::Config {
        data_dir: to,
        ..config.clone()
    };
    let server = Server::start(
        &config,
        Box::new(tally_server::store::SnapshotStore::open(&config).unwrap()),
    )
    .unwrap();
    assert!(matches!(
        server.handle().query(Query::Asset {
            asset: asset("CHF")
        }),
        Ok(Ok(QueryReply::Asset(_)))
    ));
    server.shutdown().unwrap();
}

/// Polls `future` once, without waiting.
fn poll_once<F: std::future::Future + Unpin>(future: &mut F) -> std::task::Poll<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    std::pin::Pin::new(future).poll(&mut cx)
}

#[test]
fn a_read_of_a_wallet_whose_writes_are_durable_does_not_wait_for_other_wallets_syncs() {
    let dir = tempfile::tempdir().unwrap();
    // One shard, so the two wallets' requests share its batches and syncs.
    let config = config(dir.path(), 1);
    let server = Server::start(
        &config,
        Box::new(tally_server::store::SnapshotStore::open(&config).unwrap()),
    )
    .unwrap();
    let handle = server.handle();
    setup(&handle, &["a".to_string(), "b".to_string()]);
    for (id, wallet) in [(1, "a"), (2, "b")] {
        assert!(handle.call(grant(id, wallet, "1000")).unwrap().code.is_ok());
    }
    // Many large writes to b in one batch (megabytes for its sync), then a read of a and a
    // read of b behind them.
    let big: Vec<Request> = (0..8192u128)
        .map(|i| {
            let mut request = usage(10_000 + i, "b", 1, DebitMode::Record);
            if let Command::Usage(event) = &mut request.command {
                event.attributes = (0..8)
                    .map(|k| {
                        (
                            name(&format!("k{k}")),
                            name(&format!("{k}{}", "v".repeat(60))),
                        )
                    })
                    .collect();
            }
            request
        })
        .collect();
    let mut writes = Box::pin(handle.submit_batch(big).unwrap().recv());
    let balance = |wallet: &str| Query::Balance {
        wallet: name(wallet),
        asset: asset("USD"),
    };
    let early = server.reads_early();
    let read_a = handle.submit_query(balance("a")).unwrap();
    let mut read_b = Box::pin(handle.submit_query(balance("b")).unwrap().recv());
    // a's answer is released at once (counted) instead of with b's writes after their sync.
    // (Where a sync is nearly free, as on a tmpfs, the order of the answers could not tell.)
    let a = read_a.wait();
    assert!(matches!(a, Ok(Ok(QueryReply::Balance(_)))), "{a:?}");
    // (b's read too, if b's writes were durable by the time the shard took it.)
    assert!(
        server.reads_early() > early,
        "a's read was answered at once"
    );
    // b's read waits for b's writes, and sees them.
    let replies = loop {
        if let std::task::Poll::Ready(replies) = poll_once(&mut writes) {
            break replies;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    assert!(replies
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.code.is_ok())));
    let b = loop {
        if let std::task::Poll::Ready(b) = poll_once(&mut read_b) {
            break b;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    let Ok(Ok(QueryReply::Balance(b))) = b else {
        panic!("{b:?}")
    };
    assert!(b.available < "1000".parse().unwrap(), "{b:?}");
    server.shutdown().unwrap();
}

#[test]
fn a_replay_larger_than_the_outbound_queue_waits_for_the_sinks_and_exports_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = NoCheckpoints;
    // Room for 16 effects: replay chunks (4,096 effects) and live batches pass one at a time.
    let config = tally_server::Config {
        outbound_queue_depth: 16,
        ..config(dir.path(), 2)
    };
    let wallets: Vec<String> = ["alice", "bob"].map(String::from).to_vec();
    let server = Server::start(&config, Box::new(store.clone())).unwrap();
    let handle = server.handle();
    setup(&handle, &wallets);
    for (i, w) in wallets.iter().enumerate() {
        assert!(handle
            .call(grant(900_000 + i as u128, w, "100000"))
            .unwrap()
            .code
            .is_ok());
    }
    let pending: Vec<_> = (0..6_000u128)
        .map(|i| {
            handle
                .submit(usage(i, &wallets[i as usize % 2], 1, DebitMode::Strict))
                .unwrap()
        })
        .collect();
    for p in pending {
        assert_eq!(p.wait().unwrap().code, ResultCode::Ok);
    }
    server.shutdown().unwrap();
    // The exports are lost and no checkpoint was kept: recovery re-derives every effect from
    // the WAL, about 12,000 of them, through a queue with room for 16.
    std::fs::remove_dir_all(dir.path().join("outbound")).unwrap();
    let server = Server::start(&config, Box::new(store)).unwrap();
    server.shutdown().unwrap();
    let margin = exported(dir.path(), "margin");
    let mut ids: Vec<u64> = margin
        .iter()
        .map(|l| l["effect"]["Margin"]["request"].as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), margin.len(), "a usage event was exported twice");
    assert!(
        ids.iter().copied().eq(0..6_000),
        "{} of 6,000 usage events exported",
        ids.len()
    );
}

#[test]
fn a_charge_past_the_idempotency_window_is_refunded_from_the_history_store() {
    use tally_net::server::Backend;
    use tally_server::net::ShardBackend;
    let dir = tempfile::tempdir().unwrap();
    // A one-second idempotency window, so the engine forgets the charge within the test.
    let config = tally_server::Config {
        idempotency_retention_secs: 1,
        ..config(dir.path(), 1)
    };
    let server = Server::start(&config, Box::new(NoCheckpoints)).unwrap();
    let handle = server.handle();
    setup(&handle, &["alice".to_string()]);
    assert!(handle
        .call(grant(900_000, "alice", "10"))
        .unwrap()
        .code
        .is_ok());
    assert!(handle
        .call(usage(7, "alice", 4_000, DebitMode::Strict))
        .unwrap()
        .code
        .is_ok()); // 4 charged
                   // The window passes, and a checkpoint makes the store hold the event (it flushes the sinks).
    std::thread::sleep(std::time::Duration::from_millis(2_500));
    handle.checkpoint().unwrap();
    let refund = |id: u128, amount: Option<&str>| Request {
        id: RequestId(id),
        command: Command::Refund {
            wallet: name("alice"),
            event: RequestId(7),
            amount: amount.map(d),
        },
    };
    // Without the store, the engine no longer knows the event.
    assert_eq!(
        handle.call(refund(100, Some("1"))).unwrap().code,
        ResultCode::UnknownEvent
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let backend = ShardBackend::with_history(handle.clone(), &config).unwrap();
    let call = |r: Request| runtime.block_on(backend.command(r)).unwrap();
    let first = call(refund(101, Some("3")));
    assert!(
        matches!(first.value, ReplyValue::Refund { refunded, refundable, .. }
            if refunded == d("3") && refundable == d("1")),
        "{first:?}"
    );
    assert_eq!(
        call(refund(102, Some("2"))).code,
        ResultCode::RefundExceedsCharge
    );
    // A retry is answered from memory.
    assert_eq!(call(refund(101, Some("3"))), first);
    assert_eq!(available(&handle, "alice"), d("9"));
    let digests = server.shutdown().unwrap();

    // Replay applies the recorded refunds as they were: the same state, the same cap.
    let server = Server::start(&config, Box::new(NoCheckpoints)).unwrap();
    let recovered: Vec<u64> = server.recovered().iter().map(|r| r.digest).collect();
    assert_eq!(recovered, digests);
    let handle = server.handle();
    let backend = ShardBackend::with_history(handle.clone(), &config).unwrap();
    let call = |r: Request| runtime.block_on(backend.command(r)).unwrap();
    let rest = call(refund(103, None));
    assert!(
        matches!(rest.value, ReplyValue::Refund { refunded, .. } if refunded == d("1")),
        "{rest:?}"
    );
    assert_eq!(
        call(refund(104, None)).code,
        ResultCode::RefundExceedsCharge
    );
    assert_eq!(available(&handle, "alice"), d("10"));
    server.shutdown().unwrap();
    // The store links the refunds to the event.
    let reader = tally_server::outbound::sqlite::Reader::open(dir.path()).unwrap();
    let page = reader
        .usage(&tally_server::outbound::sqlite::Filter {
            wallet: "alice".into(),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(page.rows.len(), 1);
    assert_eq!(page.rows[0].refunded, d("4"));

    // With no refund window, a charge past the idempotency window is not refundable.
    let closed = tally_server::Config {
        refund_window_days: 0,
        ..config.clone()
    };
    let server = Server::start(&closed, Box::new(NoCheckpoints)).unwrap();
    let backend = ShardBackend::with_history(server.handle(), &closed).unwrap();
    assert_eq!(
        runtime
            .block_on(backend.command(refund(105, Some("0.5"))))
            .unwrap()
            .code,
        ResultCode::UnknownEvent
    );
    server.shutdown().unwrap();
}
