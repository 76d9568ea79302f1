//! The network path over loopback QUIC, against a real server (WAL in `sync` mode).
//!
//! 1. Transport: `Health` frames (no WAL, no shard) on one long-lived stream with N pipelined
//!    frames in flight, against one stream per request with N streams at once. This is the
//!    measurement behind the stream choice recorded in `docs/protocol.md` §10.
//! 2. Durable usage debits through `tally-client` (automatic batching), N concurrent callers,
//!    with ack latency from hdrhistogram.
//!
//! Run: `cargo bench -p tally-benches --bench network` (under `cargo test` it runs once, tiny).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tally_benches::{setup_requests, usage_request};
use tally_client::{Client, ClientConfig};
use tally_net::{Decoder, Message};
use tally_server::store::SnapshotStore;
use tally_server::{Config, DurabilitySetting, Server};

const ADMIN_KEY: &str = "bench-admin-key-0123456789";

struct Raw {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

async fn raw_connect(addr: std::net::SocketAddr, cert: &std::path::Path) -> Raw {
    let cert = tally_net::tls::load_certs(cert).unwrap().remove(0);
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(tally_net::tls::quic_client_config(cert).unwrap());
    let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    // Authenticate the connection on a first stream, kept open.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut decoder = Decoder::default();
    for message in [
        Message::Hello(tally_net::Hello {
            version_min: 1,
            version_max: 1,
            frame_payload_max: tally_net::FRAME_PAYLOAD_BYTES_MAX,
            client: "bench".into(),
        }),
        Message::Auth {
            key: ADMIN_KEY.into(),
        },
    ] {
        let mut buf = Vec::new();
        message.encode(0, &mut buf).unwrap();
        send.write_all(&buf).await.unwrap();
        read_one(&mut recv, &mut decoder).await;
    }
    std::mem::forget((send, recv));
    Raw {
        conn,
        _endpoint: endpoint,
    }
}

async fn read_one(recv: &mut quinn::RecvStream, decoder: &mut Decoder) -> u64 {
    loop {
        if let Some(frame) = decoder.next_frame().unwrap() {
            return frame.header.request_id;
        }
        let chunk = recv.read_chunk(1 << 16, true).await.unwrap().unwrap();
        decoder.feed(&chunk.bytes);
    }
}

fn health_frame() -> Vec<u8> {
    let mut buf = Vec::new();
    Message::Health.encode(1, &mut buf).unwrap();
    buf
}

/// One stream, `window` frames in flight, for `duration`: answers per second.
async fn pipelined(raw: &Raw, window: usize, duration: Duration) -> f64 {
    let (mut send, mut recv) = raw.conn.open_bi().await.unwrap();
    let frame = health_frame();
    let mut decoder = Decoder::default();
    let batch: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * window)
        .collect();
    send.write_all(&batch).await.unwrap();
    let started = Instant::now();
    let mut answered = 0u64;
    while started.elapsed() < duration {
        read_one(&mut recv, &mut decoder).await;
        answered += 1;
        send.write_all(&frame).await.unwrap();
    }
    answered as f64 / started.elapsed().as_secs_f64()
}

/// A new stream per request, `concurrent` at once, for `duration`: answers per second.
async fn stream_per_request(raw: &Raw, concurrent: usize, duration: Duration) -> f64 {
    let answered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrent)
        .map(|_| {
            let conn = raw.conn.clone();
            let answered = answered.clone();
            tokio::spawn(async move {
                let frame = health_frame();
                while started.elapsed() < duration {
                    let (mut send, mut recv) = conn.open_bi().await.unwrap();
                    send.write_all(&frame).await.unwrap();
                    send.finish().unwrap();
                    let mut decoder = Decoder::default();
                    read_one(&mut recv, &mut decoder).await;
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    answered.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// `callers` concurrent durable debits through the client for `duration`.
async fn debits(
    client: &Client,
    callers: usize,
    wallets: usize,
    duration: Duration,
    next_id: &Arc<AtomicU64>,
) -> (f64, Histogram<u64>) {
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let client = client.clone();
            let histogram = histogram.clone();
            let next_id = next_id.clone();
            tokio::spawn(async move {
                let mut local = Histogram::<u64>::new(3).unwrap();
                let mut n = caller;
                while started.elapsed() < duration {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    n = (n * 7919 + 13) % wallets;
                    let request = usage_request(u128::from(id), n);
                    let sent = Instant::now();
                    let reply = client.command(request).await.unwrap();
                    assert!(reply.code.is_ok());
                    local.record(sent.elapsed().as_micros() as u64).unwrap();
                }
                histogram.lock().unwrap().add(&local).unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let histogram = histogram.lock().unwrap().clone();
    (histogram.len() as f64 / elapsed, histogram)
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let wallets = if bench { 100_000 } else { 1_000 };
    let duration = Duration::from_millis(if bench { 3_000 } else { 100 });
    let temp =
        tempfile::tempdir_in(std::env::var("TALLY_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
            .unwrap();
    let config = Config {
        data_dir: temp.path().join("data"),
        durability: DurabilitySetting::Sync,
        snapshot_every_records: 0,
        snapshot_every_secs: 0,
        listen: "127.0.0.1:0".into(),
        ..Config::default()
    };
    let server = Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
    setup_requests(&server.handle(), wallets);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let net =
            tally_server::net::start_network(&config, server.handle(), Some(ADMIN_KEY)).unwrap();
        let addr = net.local_addr();
        let cert = config.data_dir.join("tls/cert.pem");
        let raw = raw_connect(addr, &cert).await;
        for window in [1usize, 32, 256] {
            let one = pipelined(&raw, window, duration).await;
            let per = stream_per_request(&raw, window, duration).await;
            println!(
                "network: health, {window:>3} in flight: one pipelined stream {:>9.0}/s, \
                 stream per request {:>9.0}/s ({:.1}x)",
                one,
                per,
                one / per
            );
        }
        let client =
            Client::connect(ClientConfig::from_files(&addr.to_string(), &cert, ADMIN_KEY).unwrap())
                .await
                .unwrap();
        let next_id = Arc::new(AtomicU64::new(1 << 40));
        for callers in [1usize, 64, 1024] {
            let (rate, h) = debits(&client, callers, wallets, duration, &next_id).await;
            println!(
                "network: durable debits via tally-client, {callers:>4} callers: {rate:>9.0}/s \
                 p50={}us p99={}us p99.9={}us",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999)
            );
        }
        net.shutdown().await;
    });
    server.shutdown().unwrap();
}
