//! A shard whose WAL fails takes `tally serve` down with a non-zero exit, so that a supervisor
//! restarts it and recovery runs, instead of leaving a process that is half alive.

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tally_client::{Client, ClientConfig};
use tally_engine::{name, Command, CreateWallet, DebitMode, Request, RequestId};

const ADMIN: &str = "shard-failure-admin-key-0123456789";

/// The child, killed if the test fails before it exits.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wal_stops_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let serve = |data: &std::path::Path| {
        let mut child = Process::new(env!("CARGO_BIN_EXE_tally"))
            .args(["serve", "--shards", "1", "--data-dir"])
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .env("TALLY_ADMIN_KEY", ADMIN)
            // Small segments, so the WAL rotates (and creates a file) often.
            .env("TALLY_WAL_SEGMENT_BYTES", "65536")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let addr = loop {
            line.clear();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "serve exited");
            if let Some(rest) = line.split("QUIC on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        let log = std::thread::spawn(move || {
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
            rest
        });
        (Child(child), addr, log)
    };
    let (mut child, addr, log) = serve(&data);
    let config = ClientConfig::from_files(&addr, data.join("tls/cert.pem"), ADMIN).unwrap();
    let client = Client::connect(config).await.unwrap();
    let mut id = 1u128;
    for command in catalog() {
        id += 1;
        client
            .command(Request {
                id: RequestId(id),
                command,
            })
            .await
            .unwrap();
    }
    client
        .command(Request {
            id: RequestId(100),
            command: Command::CreateWallet(CreateWallet {
                wallet: name("w"),
                overdraft: vec![],
                metadata: vec![],
            }),
        })
        .await
        .unwrap();
    client.command(grant(101, "w", "1000000")).await.unwrap();
    // The WAL's directory disappears: the next segment cannot be made, the WAL fails.
    std::fs::remove_dir_all(data.join("shard-000").join("wal")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve is still running after its WAL failed"
        );
        id += 1;
        let request = usage(1_000 + id, "w", 50, DebitMode::Record);
        let _ = tokio::time::timeout(Duration::from_secs(1), client.command(request)).await;
    };
    assert!(
        !status.success(),
        "serve exited with {status} after its WAL failed"
    );
    let log = log.join().unwrap();
    assert!(log.contains("shards stopped"), "{log}");
}
