//! The `tally` binary: serve with graceful shutdown, and the ops commands on a data directory.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command as Process, Stdio};

use common::*;
use tally_engine::DebitMode;
use tally_server::store::SnapshotStore;
use tally_server::Server;

fn tally(args: &[&str]) -> (bool, String, String) {
    let out = Process::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn serve_stops_cleanly_on_sigterm_and_refuses_a_held_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let mut child = Process::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "serve",
            "--data-dir",
            data,
            "--shards",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "serve exited before serving"
        );
        if line.contains("serving 2 shards") {
            break;
        }
    }
    // While it runs, the directory is held: ops commands are refused with a clear message.
    let (ok, _, err) = tally(&["wal", "inspect", "--data-dir", data, "--shards", "2"]);
    assert!(!ok);
    assert!(err.contains("in use by another tally process"), "{err}");
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(rest.contains("shard 1 stopped"), "{rest}");

    let (ok, _, err) = tally(&["serve", "--data-dir", data, "--shards", "0"]);
    assert!(!ok);
    assert!(err.contains("shards"), "{err}");
}

#[test]
fn ops_commands_list_verify_inspect_create_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = config(&data, 1);
    let wallets: Vec<String> = (0..6).map(|i| format!("w{i}")).collect();
    let (first_lsns, digests) = {
        let server =
            Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
        let handle = server.handle();
        setup(&handle, &wallets);
        for (i, w) in wallets.iter().enumerate() {
            handle.call(grant(i as u128, w, "100")).unwrap();
        }
        let checkpoint = handle.checkpoint().unwrap();
        for i in 0..60u128 {
            let w = &wallets[i as usize % wallets.len()];
            assert!(handle
                .call(usage(100 + i, w, 1000, DebitMode::Strict))
                .unwrap()
                .code
                .is_ok());
        }
        let digests = server.shutdown().unwrap();
        (
            checkpoint.iter().map(|c| c.lsn).collect::<Vec<_>>(),
            digests,
        )
    };
    let d = data.to_str().unwrap();
    let base = ["--data-dir", d, "--shards", "1"];
    let with = |cmd: &[&str], extra: &[&str]| -> Vec<String> {
        cmd.iter()
            .chain(&base)
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        tally(&refs)
    };

    let (ok, out, err) = run(with(&["snapshot", "list"], &["--json"]));
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The one asked for, and the one the clean stop wrote (so a restart replays nothing).
    assert_eq!(list.as_array().unwrap().len(), 2, "{out}");
    let file = list[0]["path"].as_str().unwrap().to_string();
    assert_eq!(list[0]["lsn"].as_u64(), Some(first_lsns[0]), "{out}");

    let (ok, out, err) = run(with(&["snapshot", "verify"], &[]));
    assert!(ok, "{err}");
    assert!(out.contains("2 checkpoints, 0 bad"), "{out}");

    let (ok, out, err) = run(with(&["snapshot", "inspect"], &[&file]));
    assert!(ok, "{err}");
    assert!(out.contains("wallets"), "{out}");

    let (ok, out, err) = run(with(&["wal", "inspect"], &["--json"]));
    assert!(ok, "{err}");
    let wal: serde_json::Value = serde_json::from_str(&out).unwrap();
    let requests: u64 = wal
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["requests"].as_u64().unwrap())
        .sum();
    assert!(requests >= 60, "{out}");

    // A fresh checkpoint equals the state the server stopped with.
    let (ok, out, err) = run(with(&["snapshot", "create"], &["--json"]));
    assert!(ok, "{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let created: Vec<u64> = created
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["digest"].as_u64().unwrap())
        .collect();
    assert_eq!(created, digests);

    // A corrupt newest checkpoint: verify says so, and the server falls back to the previous
    // one (with a warning naming the file) and still recovers the same state.
    let (ok, out, _) = run(with(&["snapshot", "list"], &["--json"]));
    assert!(ok);
    let newest: serde_json::Value = serde_json::from_str(&out).unwrap();
    let newest = newest.as_array().unwrap().last().unwrap()["path"]
        .as_str()
        .unwrap()
        .to_string();
    let mut bytes = std::fs::read(&newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&newest, bytes).unwrap();
    let (ok, out, _) = run(with(&["snapshot", "verify"], &[]));
    assert!(!ok, "verify must fail on a corrupt checkpoint");
    assert!(out.contains("BAD") && out.contains(&newest), "{out}");
    let server = Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
    let report = &server.recovered()[0];
    assert!(
        report.warnings.iter().any(|w| w.contains(&newest)),
        "{:?}",
        report.warnings
    );
    assert_eq!(report.digest, digests[0]);
    server.shutdown().unwrap();

    // Point-in-time restore to the first checkpoint's LSN gives balances before any usage.
    let target = dir.path().join("restored");
    let t = target.to_str().unwrap();
    let until = first_lsns[0].to_string();
    let (ok, out, err) = tally(&[
        "restore",
        "--data-dir",
        t,
        "--from",
        &file,
        "--until-lsn",
        &until,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("tally serve --data-dir"), "{out}");
    let restored = Server::start(
        &common::config(&target, 1),
        Box::new(SnapshotStore::open(&common::config(&target, 1)).unwrap()),
    )
    .unwrap();
    for w in &wallets {
        assert_eq!(available(&restored.handle(), w), common::d("100"));
    }
    restored.shutdown().unwrap();

    // Errors are clear and non-zero.
    let (ok, _, err) = tally(&["restore", "--data-dir", t, "--source", d]);
    assert!(!ok && err.contains("not empty"), "{err}");
    let bad_time = [
        "restore",
        "--data-dir",
        "/tmp/x",
        "--source",
        d,
        "--until-time",
        "yesterday",
    ];
    let (ok, _, err) = tally(&bad_time);
    assert!(!ok && err.contains("RFC 3339"), "{err}");
    let (ok, _, err) = tally(&["restore", "--data-dir", "/tmp/x"]);
    assert!(!ok && err.contains("--from"), "{err}");
    // Ops commands read the shard count from the directory; no --shards needed. The server that
    // fell back past the corrupt checkpoint replayed the WAL above the older one, and its clean
    // stop wrote a good checkpoint at the same LSN over the corrupt file.
    let (ok, out, err) = tally(&["snapshot", "verify", "--data-dir", d]);
    assert!(ok && out.contains("2 checkpoints, 0 bad"), "{out} {err}");
    let missing = dir.path().join("nothing");
    let (ok, _, err) = tally(&["wal", "inspect", "--data-dir", missing.to_str().unwrap()]);
    assert!(!ok && err.contains("not a tally data directory"), "{err}");
}

#[test]
fn a_checkpoint_that_decodes_but_breaks_invariants_is_skipped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 1);
    let (digests, lsn) = {
        let server =
            Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
        let handle = server.handle();
        setup(&handle, &["a".to_string(), "b".to_string()]);
        handle.call(grant(1, "a", "5")).unwrap();
        let lsn = handle.checkpoint().unwrap()[0].lsn;
        (server.shutdown().unwrap(), lsn)
    };
    // A newer checkpoint whose state has the same wallet twice: checksums fine, state not.
    let snapshots = tally_snapshots::SnapshotDir::open(dir.path().join("snapshots")).unwrap();
    let newest = snapshots.list_shard(0).unwrap().pop().unwrap();
    let mut state = snapshots.load(&newest).unwrap();
    let twin = state.wallets[0].clone();
    state.wallets.push(twin);
    let bad = snapshots
        .write(0, 1, lsn + 10, tally_engine::Timestamp(0), &state)
        .unwrap();
    let server = Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
    let report = &server.recovered()[0];
    let shown = bad.path.display().to_string();
    assert!(
        report.warnings.iter().any(|w| w.contains(&shown)),
        "{:?}",
        report.warnings
    );
    assert_eq!(report.checkpoint_lsn, lsn);
    assert_eq!(report.digest, digests[0]);
    server.shutdown().unwrap();
}

#[test]
fn a_clean_stop_leaves_nothing_to_replay_and_shards_recover_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), 2);
    let wallets: Vec<String> = (0..8).map(|i| format!("w{i}")).collect();
    let digests = {
        let server =
            Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
        let handle = server.handle();
        setup(&handle, &wallets);
        for (i, w) in wallets.iter().enumerate() {
            handle.call(grant(i as u128, w, "100")).unwrap();
        }
        server.shutdown().unwrap()
    };
    let server = Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
    for (shard, report) in server.recovered().iter().enumerate() {
        assert_eq!(report.replayed, 0, "shard {shard}: {report:?}");
        assert_eq!(
            report.checkpoint_lsn, report.lsn,
            "shard {shard}: {report:?}"
        );
        assert_eq!(report.digest, digests[shard]);
    }
    for w in &wallets {
        assert_eq!(available(&server.handle(), w), common::d("100"));
    }
    // Nothing applied since: the next clean stop writes no checkpoint.
    let snapshots = |d: &std::path::Path| std::fs::read_dir(d.join("snapshots")).unwrap().count();
    let before = snapshots(dir.path());
    server.shutdown().unwrap();
    assert_eq!(snapshots(dir.path()), before);
}
