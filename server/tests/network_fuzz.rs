//! Random and mutated frames of every kind, over real QUIC, must never panic the server, wedge
//! it, or stop a shard. Seeded (`TALLY_NET_FUZZ_SEED`), so a failure replays.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::quic::*;
use common::*;
use tally_engine::*;
use tally_net::{Kind, Message};

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// xorshift64*: small, seeded, good enough to pick bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Valid payloads to mutate, by kind.
fn samples() -> Vec<Message> {
    let usage_event = match usage(1, "w1", 10, DebitMode::Strict).command {
        Command::Usage(e) => e,
        _ => unreachable!(),
    };
    let mut samples: Vec<Message> = catalog()
        .into_iter()
        .map(|c| {
            Message::Request(Request {
                id: RequestId(9),
                command: c,
            })
        })
        .collect();
    samples.extend([
        Message::Request(usage(2, "w1", 10, DebitMode::Strict)),
        Message::Request(grant(3, "w1", "5")),
        Message::UsageBatch(vec![(RequestId(4), usage_event.clone())]),
        Message::Query(Query::Wallet { wallet: name("w1") }),
        Message::Query(Query::DraftTest {
            plan: name("std"),
            events: vec![usage_event],
        }),
        Message::KeyCreate {
            label: name("fuzz"),
            scope: tally_net::Scope::Gateway,
        },
        Message::KeyRevoke { key_id: 77 },
    ]);
    samples
}

fn payload_of(message: &Message) -> (u8, Vec<u8>) {
    let mut buf = Vec::new();
    message.encode(0, &mut buf).unwrap();
    (buf[2], buf[tally_net::HEADER_BYTES..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mutated_frames_never_panic_the_server() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let seed: u64 = std::env::var("TALLY_NET_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7a11_5eed);
    eprintln!("network fuzz seed {seed} (TALLY_NET_FUZZ_SEED)");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start(dir.path(), 2);
    let admin = running.client(ADMIN_KEY).await;
    for command in catalog() {
        admin
            .command(Request {
                id: RequestId(rng.next() as u128),
                command,
            })
            .await
            .unwrap();
    }
    let samples: Vec<(u8, Vec<u8>)> = samples().iter().map(payload_of).collect();
    let request_kinds: Vec<u8> = Kind::ALL
        .iter()
        .filter(|k| (0x10..0x80).contains(&(**k as u8)))
        .map(|k| *k as u8)
        .collect();

    // Request kinds on one authenticated stream: every frame gets an answer, the stream lives.
    let raw = raw_connect(&running).await;
    let mut s = raw.authed(ADMIN_KEY).await;
    let frames = 600;
    for id in 1..=frames {
        let (kind, payload) = if rng.below(2) == 0 {
            let (kind, mut payload) = samples[rng.below(samples.len())].clone();
            for _ in 0..=rng.below(4) {
                match rng.below(3) {
                    0 if !payload.is_empty() => {
                        let at = rng.below(payload.len());
                        payload[at] ^= 1 << rng.below(8);
                    }
                    1 if !payload.is_empty() => payload.truncate(rng.below(payload.len())),
                    _ => payload.push(rng.next() as u8),
                }
            }
            (kind, payload)
        } else {
            let kind = request_kinds[rng.below(request_kinds.len())];
            let len = rng.below(96);
            (kind, (0..len).map(|_| rng.next() as u8).collect())
        };
        let mut frame = header(1, kind, payload.len() as u32, id);
        frame.extend_from_slice(&payload);
        s.write_bytes(&frame).await;
    }
    for expected in 1..=frames {
        match s.read().await {
            Some((id, _)) => assert_eq!(id, expected, "answers come in request order"),
            None => panic!("the stream ended after {} answers", expected - 1),
        }
    }

    // Handshake and server-to-client kinds, random bytes, each on a fresh connection: answered
    // or closed, never a crash.
    for _ in 0..20 {
        let raw = raw_connect(&running).await;
        let mut s = raw.stream().await;
        let kind = [
            0x01u8, 0x02, 0x03, 0x04, 0x0f, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86,
        ][rng.below(12)];
        let len = rng.below(64);
        let mut frame = header(1, kind, len as u32, 0);
        frame.extend((0..len).map(|_| rng.next() as u8));
        s.write_bytes(&frame).await;
        let _ = s.read().await;
    }
    // Pure noise as a stream.
    for _ in 0..20 {
        let raw = raw_connect(&running).await;
        let mut s = raw.stream().await;
        let noise: Vec<u8> = (0..rng.below(200) + 1).map(|_| rng.next() as u8).collect();
        s.write_bytes(&noise).await;
        let _ = s.send.finish();
        let _ = s.read().await;
    }

    let health = admin.health().await.unwrap();
    assert_eq!((health.shards, health.shards_running), (2, 2));
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
    running.stop().await;
}
