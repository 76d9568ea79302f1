//! The `tally-loadtest` binary against a real server with its QUIC front (in this process):
//! closed loop, open loop with a sweep and a plot, hot-set and batched runs, and errors counted
//! by code.

use std::process::Command;

use tally_server::store::SnapshotStore;
use tally_server::{Config, Server};

const ADMIN_KEY: &str = "loadtest-admin-key-0123456789";

struct Running {
    _runtime: tokio::runtime::Runtime,
    server: Option<Server>,
    addr: String,
    cert: String,
}

fn start(dir: &std::path::Path) -> Running {
    let config = Config {
        data_dir: dir.to_path_buf(),
        shards: 2,
        wal_segment_bytes: 1 << 20,
        snapshot_every_records: 0,
        snapshot_every_secs: 0,
        listen: "127.0.0.1:0".into(),
        ..Config::default()
    };
    let server = Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let net = {
        let _entered = runtime.enter();
        tally_server::net::start_network(&config, server.handle(), Some(ADMIN_KEY)).unwrap()
    };
    let addr = net.local_addr().to_string();
    // The listener lives as long as the runtime.
    std::mem::forget(net);
    Running {
        _runtime: runtime,
        server: Some(server),
        addr,
        cert: dir.join("tls/cert.pem").display().to_string(),
    }
}

impl Running {
    fn loadtest(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_tally-loadtest"))
            .args([
                "--addr",
                &self.addr,
                "--cert",
                &self.cert,
                "--api-key",
                ADMIN_KEY,
            ])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.shutdown();
        }
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn closed_open_hot_and_batched_runs_report_named_fields() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path());
    let common = ["--wallets", "200", "--duration", "0.5", "--warmup", "0.1"];

    // Closed loop, mixed operations: it prepares wallets itself.
    let (ok, out, err) = running.loadtest(
        &[
            &common[..],
            &[
                "--connections",
                "2",
                "--in-flight",
                "8",
                "--json",
                "--mix",
                "strict=60,record=10,reserve=20,balance=10",
            ],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    let report = json(&out);
    assert_eq!(report["mode"], "closed");
    assert!(report["offered_rate"].is_null());
    assert!(report["achieved_rate"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["errors"].as_object().unwrap().is_empty(), "{report}");
    for p in ["p50", "p90", "p99", "p999", "max"] {
        assert!(report["latency_us"][p].as_u64().unwrap() > 0, "{report}");
    }
    for op in ["strict_usage", "record_usage", "reserve_settle", "balance"] {
        assert!(report["latency_by_op_us"][op].is_object(), "{op}: {report}");
    }

    // Open loop, a sweep of two rates with a plot; a hot set; already prepared. One second per
    // rate, so a late tail (the rate is taken up to the last completion) weighs little.
    let plot = dir.path().join("plot.svg");
    let (ok, out, err) = running.loadtest(
        &[
            &["--wallets", "200", "--duration", "1", "--warmup", "0.1"][..],
            &[
                "--no-prepare",
                "--connections",
                "2",
                "--distribution",
                "hot:10:0.9",
                "--sweep",
                "200,400",
                "--json",
                "--plot",
                plot.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    let reports = json(&out);
    let reports = reports.as_array().unwrap();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0]["offered_rate"], 200.0);
    assert_eq!(reports[1]["mode"], "open");
    let achieved = reports[1]["achieved_rate"].as_f64().unwrap();
    assert!(
        (300.0..=500.0).contains(&achieved),
        "open loop holds its rate: {achieved}: {out}"
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("<polyline"), "{svg}");

    // Batched usage frames: 16 debits per operation.
    let (ok, out, err) = running.loadtest(
        &[
            &common[..],
            &["--no-prepare", "--events-per-frame", "16", "--json"],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    let report = json(&out);
    let ops = report["achieved_rate"].as_f64().unwrap();
    let debits = report["debits_per_sec"].as_f64().unwrap();
    assert!(
        (debits - 16.0 * ops).abs() < 1e-6 * debits.max(1.0),
        "{report}"
    );

    // Wallets that do not exist: every operation fails, counted by its result code.
    let (ok, out, err) = running.loadtest(&[
        "--wallets",
        "50",
        "--wallet-offset",
        "100000",
        "--duration",
        "0.3",
        "--warmup",
        "0",
        "--no-prepare",
        "--json",
    ]);
    assert!(ok, "{err}");
    let report = json(&out);
    assert_eq!(report["achieved_rate"], 0.0, "{report}");
    let unknown = report["errors"]["UnknownWallet"].as_u64().unwrap();
    assert_eq!(unknown, report["operations"].as_u64().unwrap(), "{report}");
    assert!(unknown > 0);
    let (ok, _, err) = running.loadtest(&["--mix", "refund=1"]);
    assert!(!ok);
    assert!(err.contains("unknown operation"), "{err}");
    let (ok, _, err) = running.loadtest(&["--distribution", "hot:10:2"]);
    assert!(!ok);
    assert!(err.contains("share"), "{err}");
}
