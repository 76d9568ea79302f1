//! A gateway's client across a `kill -9` of `tally serve`: the client notices the dead
//! connection within its idle timeout (a few seconds, not QUIC's default 30 s), reconnects to the
//! restarted server, and its retried call is applied once.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::child::{prepare, serve};
use common::*;
use tally_client::{Client, ClientConfig};
use tally_engine::{asset, name, Query};

const ADMIN: &str = "client-kill-admin-key-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_is_noticed_in_seconds_and_the_retry_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = serve(&data, &listen, ADMIN, &[]);
    let mut config = ClientConfig::from_files(&listen, data.join("tls/cert.pem"), ADMIN).unwrap();
    // Less than QUIC's default idle timeout: the call must not need 30 s to notice.
    config.retry_for = Duration::from_secs(20);
    let client = Client::connect(config).await.unwrap();
    prepare(&client, "5").await;

    // kill -9, then a restart on the same port a moment later.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let restarted = std::thread::spawn({
        let data = data.clone();
        move || {
            std::thread::sleep(Duration::from_millis(500));
            serve(&data, &listen, ADMIN, &[])
        }
    });
    let started = Instant::now();
    let reply = client.command(grant(102, "w", "1")).await.unwrap();
    let took = started.elapsed();
    assert!(reply.code.is_ok(), "{reply:?}");
    let _server = restarted.join().unwrap();
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
}
