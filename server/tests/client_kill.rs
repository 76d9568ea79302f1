//! A gateway's client across a `kill -9` of `tally serve`: the client notices the dead
//! connection within its idle timeout (a few seconds, not QUIC's default 30 s), reconnects to the
//! restarted server, and its retried call is applied once.

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tally_client::{Client, ClientConfig};
use tally_engine::{asset, name, Command, CreateWallet, Query, Request, RequestId};

const ADMIN: &str = "client-kill-admin-key-0123456789";

fn serve(data: &Path, port: u16) -> Child {
    let mut child = Process::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--shards", "1", "--data-dir"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--http-listen", "127.0.0.1:0"])
        .env("TALLY_ADMIN_KEY", ADMIN)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "serve exited");
        if line.contains("serving") {
            break;
        }
    }
    std::thread::spawn(move || {
        let mut sink = String::new();
        while stderr.read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    });
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_is_noticed_in_seconds_and_the_retry_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = serve(&data, port);
    let mut config = ClientConfig::from_files(
        &format!("127.0.0.1:{port}"),
        data.join("tls/cert.pem"),
        ADMIN,
    )
    .unwrap();
    // Less than QUIC's default idle timeout: the call must not need 30 s to notice.
    config.retry_for = Duration::from_secs(20);
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
    client.command(grant(101, "w", "5")).await.unwrap();

    // kill -9, then a restart on the same port a moment later.
    child.kill().unwrap();
    child.wait().unwrap();
    let restarted = std::thread::spawn({
        let data = data.clone();
        move || {
            std::thread::sleep(Duration::from_millis(500));
            serve(&data, port)
        }
    });
    let started = Instant::now();
    let reply = client.command(grant(102, "w", "1")).await.unwrap();
    let took = started.elapsed();
    assert!(reply.code.is_ok(), "{reply:?}");
    let mut child = restarted.join().unwrap();
    // The same request again (a caller's own retry) changes nothing.
    assert!(client
        .command(grant(102, "w", "1"))
        .await
        .unwrap()
        .code
        .is_ok());
    let balance = client
        .query(Query::Balance {
            wallet: name("w"),
            asset: asset("USD"),
        })
        .await
        .unwrap();
    let tally_net::Answer::Balance(b) = balance else {
        panic!("{balance:?}")
    };
    assert_eq!(b.available, d("6"), "the retried grant was applied once");
    println!("the call across the kill took {took:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}
