//! A shard whose WAL fails takes `tally serve` down with a non-zero exit, so that a supervisor
//! restarts it and recovery runs, instead of leaving a process that is half alive.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::child::{prepare, serve};
use common::*;
use tally_client::{Client, ClientConfig};
use tally_engine::DebitMode;

const ADMIN: &str = "shard-failure-admin-key-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wal_stops_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Small segments, so the WAL rotates (and creates a file) often.
    let mut server = serve(
        &data,
        "127.0.0.1:0",
        ADMIN,
        &[("TALLY_WAL_SEGMENT_BYTES", "65536")],
    );
    let config = ClientConfig::from_files(&server.addr, data.join("tls/cert.pem"), ADMIN).unwrap();
    let client = Client::connect(config).await.unwrap();
    prepare(&client, "1000000").await;
    let mut id = 1_000u128;
    // The WAL's directory disappears: the next segment cannot be made, the WAL fails.
    std::fs::remove_dir_all(data.join("shard-000").join("wal")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve is still running after its WAL failed"
        );
        id += 1;
        let request = usage(id, "w", 50, DebitMode::Record);
        let _ = tokio::time::timeout(Duration::from_secs(1), client.command(request)).await;
    };
    assert!(
        !status.success(),
        "serve exited with {status} after its WAL failed"
    );
    let log = server.log.take().unwrap().join().unwrap();
    assert!(log.contains("shards stopped"), "{log}");
}
