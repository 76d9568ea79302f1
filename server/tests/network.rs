//! End to end over real QUIC on loopback: the `tally-client` against the shards behind
//! `tally-net`'s server, with TLS, API keys and limits.

mod common;

use common::quic::*;
use common::*;
use tally_client::{Client, ClientConfig, Error};
use tally_engine::*;

async fn setup_catalog(client: &Client, wallets: &[&str]) {
    let mut id = 1_000_000_000u128;
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
    for w in wallets {
        let wallet = name(w);
        for command in [
            Command::CreateWallet(CreateWallet {
                wallet,
                overdraft: vec![],
                metadata: vec![],
            }),
            Command::AssignPlan {
                wallet,
                plan: name("std"),
                version: 1,
                effective_from: Timestamp(0),
            },
        ] {
            id += 1;
            client
                .command(Request {
                    id: RequestId(id),
                    command,
                })
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_over_quic_with_the_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start(dir.path(), 2);
    let client = running.client(ADMIN_KEY).await;
    let health = client.health().await.unwrap();
    assert_eq!((health.shards, health.shards_running), (2, 2));
    assert_eq!(health.connections_open, 1);
    // Ping: the network layer answers Done, many at once, with no shard involved.
    let pings: Vec<_> = (0..64).map(|_| client.ping()).collect();
    for ping in pings {
        ping.await.unwrap();
    }
    running.stop().await;
}

use tally_net::{ErrorCode, Kind, Message};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_truncated_oversized_and_unknown_frames_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start(dir.path(), 2);
    let raw = raw_connect(&running).await;

    // A request before the handshake.
    let mut s = raw.stream().await;
    s.write(5, &Message::Health).await;
    s.expect_error(5, ErrorCode::Unauthenticated).await;

    let mut s = raw.authed(ADMIN_KEY).await;
    // A payload that does not decode: the error names the field, the stream goes on.
    let mut frame = header(1, 0x1a, 3, 7);
    frame.extend_from_slice(&[1, 2, 3]);
    s.write_bytes(&frame).await;
    let why = s.expect_error(7, ErrorCode::Malformed).await;
    assert!(why.contains("field"), "{why}");
    s.write(8, &Message::Health).await;
    assert!(matches!(
        s.read().await,
        Some((8, Message::HealthReport(_)))
    ));

    // An unknown opcode: error, then the server ends the stream.
    let mut s = raw.stream().await;
    s.write_bytes(&header(1, 0x7e, 0, 9)).await;
    s.expect_error(0, ErrorCode::UnknownKind).await;
    assert!(s.read().await.is_none(), "the stream is closed");

    // An unknown header version.
    let mut s = raw.stream().await;
    s.write_bytes(&header(9, 0x53, 0, 10)).await;
    s.expect_error(0, ErrorCode::UnsupportedVersion).await;

    // An oversized frame is refused from its header, before any payload.
    let mut s = raw.stream().await;
    s.write_bytes(&header(1, 0x1a, 9 << 20, 11)).await;
    s.expect_error(0, ErrorCode::FrameTooLarge).await;

    // A truncated frame at the end of a stream is ignored; the connection stays usable.
    let mut s = raw.stream().await;
    let mut buf = Vec::new();
    Message::Health.encode(12, &mut buf).unwrap();
    s.write_bytes(&buf[..10]).await;
    s.send.finish().unwrap();
    assert!(s.read().await.is_none());
    let mut s = raw.stream().await;
    s.write(13, &Message::Health).await;
    assert!(matches!(
        s.read().await,
        Some((13, Message::HealthReport(_)))
    ));

    // A server-to-client kind from a client closes the connection.
    s.write(14, &Message::Done).await;
    s.expect_error(14, ErrorCode::ProtocolViolation).await;
    let reason = raw.conn.closed().await;
    assert!(reason.to_string().contains("server-to-client"), "{reason}");

    // No common version: refused, connection closed with the code.
    let raw = raw_connect(&running).await;
    let mut s = raw.stream().await;
    s.write(0, &hello(5, 7)).await;
    s.expect_error(0, ErrorCode::UnsupportedVersion).await;
    // Auth before Hello.
    let raw = raw_connect(&running).await;
    let mut s = raw.stream().await;
    s.write(
        0,
        &Message::Auth {
            key: ADMIN_KEY.into(),
        },
    )
    .await;
    s.expect_error(0, ErrorCode::ProtocolViolation).await;

    // The server is fine.
    let client = running.client(ADMIN_KEY).await;
    let health = client.health().await.unwrap();
    assert_eq!(health.shards_running, 2);
    assert!(health.rejected_unauthenticated >= 1);
    running.stop().await;
}

fn transport_code(result: Result<impl std::fmt::Debug, Error>) -> ErrorCode {
    match result {
        Err(Error::Transport { code, .. }) => code,
        other => panic!("expected a transport error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_scopes_and_revocation_on_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start(dir.path(), 2);
    // A wrong key is refused at connect.
    let wrong = Client::connect(running.client_config("not-a-key-at-all")).await;
    assert_eq!(transport_code(wrong), ErrorCode::InvalidKey);

    let admin = running.client(ADMIN_KEY).await;
    setup_catalog(&admin, &["w1"]).await;
    admin.command(grant(1, "w1", "10")).await.unwrap();
    let (gw_id, gw_secret) = admin
        .create_key(name("gateway-eu"), tally_net::Scope::Gateway)
        .await
        .unwrap();
    let gateway = running.client(&gw_secret).await;
    let session = gateway.session().await.unwrap();
    assert_eq!(
        (session.key_id, session.scope),
        (gw_id, tally_net::Scope::Gateway)
    );
    gateway.ping().await.unwrap();

    // In scope: usage and balance reads.
    let reply = gateway
        .command(usage(2, "w1", 100, DebitMode::Strict))
        .await
        .unwrap();
    assert_eq!(reply.code, ResultCode::Ok);
    let balance = gateway.balance(name("w1"), asset("USD")).await.unwrap();
    assert_eq!(balance.available, d("9.9"));
    // Out of scope: grants, key management, snapshots; nothing changes.
    assert_eq!(
        transport_code(gateway.command(grant(3, "w1", "5")).await),
        ErrorCode::OutOfScope
    );
    assert_eq!(
        transport_code(gateway.create_key(name("x"), tally_net::Scope::Admin).await),
        ErrorCode::OutOfScope
    );
    assert_eq!(
        transport_code(gateway.snapshot().await),
        ErrorCode::OutOfScope
    );
    assert_eq!(
        admin
            .balance(name("w1"), asset("USD"))
            .await
            .unwrap()
            .available,
        d("9.9")
    );

    // Key management errors.
    assert_eq!(
        transport_code(admin.revoke_key(999).await),
        ErrorCode::UnknownKey
    );
    assert_eq!(
        transport_code(admin.revoke_key(1).await),
        ErrorCode::LastAdminKey
    );

    // Revocation reaches the open connection on its next request, and new connections.
    admin.revoke_key(gw_id).await.unwrap();
    let after = gateway
        .command(usage(4, "w1", 100, DebitMode::Strict))
        .await;
    assert_eq!(transport_code(after), ErrorCode::InvalidKey);
    let again = Client::connect(running.client_config(&gw_secret)).await;
    assert_eq!(transport_code(again), ErrorCode::InvalidKey);
    assert_eq!(
        admin
            .balance(name("w1"), asset("USD"))
            .await
            .unwrap()
            .available,
        d("9.9"),
        "the refused usage changed nothing"
    );

    // Keys survive a restart; the counters saw every refusal.
    let health = admin.health().await.unwrap();
    assert!(health.rejected_key >= 3, "{health:?}");
    assert!(health.rejected_scope >= 3, "{health:?}");
    running.stop().await;
    let running = Running::start(dir.path(), 2);
    let admin = running.client(ADMIN_KEY).await;
    assert!(admin.health().await.is_ok());
    let revoked = Client::connect(running.client_config(&gw_secret)).await;
    assert_eq!(transport_code(revoked), ErrorCode::InvalidKey);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start(dir.path(), 1);
    let other = tempfile::tempdir().unwrap();
    let (identity, made) = tally_net::tls::self_signed(other.path()).unwrap();
    assert!(made);
    let config = ClientConfig::new(running.addr(), identity.certs[0].clone(), ADMIN_KEY);
    match Client::connect(config).await {
        Err(Error::Connect(why)) => assert!(why.contains("certificate"), "{why}"),
        other => panic!("expected a refused certificate, got {other:?}"),
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_stream_limits() {
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start_with(tally_server::Config {
        connections_max: 2,
        streams_max: 2,
        ..common::config(dir.path(), 1)
    });
    let a = running.client(ADMIN_KEY).await;
    let b = running.client(ADMIN_KEY).await;
    let c = Client::connect(running.client_config(ADMIN_KEY)).await;
    assert_eq!(transport_code(c), ErrorCode::TooManyConnections);
    a.close().await;
    // The slot frees once the server sees the close.
    let mut connected = None;
    for _ in 0..50 {
        if let Ok(c) = Client::connect(running.client_config(ADMIN_KEY)).await {
            connected = Some(c);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(connected.is_some(), "a closed connection frees its slot");
    drop(b);
    running.stop().await;

    // Streams (on a server of its own): a third concurrent stream waits for QUIC stream credit.
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start_with(tally_server::Config {
        streams_max: 2,
        ..common::config(dir.path(), 1)
    });
    let raw = raw_connect(&running).await;
    let s1 = raw.authed(ADMIN_KEY).await;
    let mut s2 = raw.stream().await;
    s2.write(1, &Message::Health).await;
    assert!(s2.read().await.is_some());
    let third =
        tokio::time::timeout(std::time::Duration::from_millis(300), raw.conn.open_bi()).await;
    assert!(third.is_err(), "a third stream must wait");
    drop(s1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_backpressure_not_server_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start_with(tally_server::Config {
        in_flight_max: 64,
        ..common::config(dir.path(), 1)
    });
    let raw = raw_connect(&running).await;
    let mut slow = raw.authed(ADMIN_KEY).await;
    // 64 MiB of requests, never reading an answer: the writes must stall.
    let mut frame = Vec::new();
    Message::Health.encode(1, &mut frame).unwrap();
    let flood: Vec<u8> = frame.iter().copied().cycle().take(64 << 20).collect();
    let stalled = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        slow.send.write_all(&flood),
    )
    .await;
    assert!(
        stalled.is_err(),
        "the server kept reading from a client that does not read"
    );

    // Other clients are served meanwhile.
    let other = running.client(ADMIN_KEY).await;
    let started = std::time::Instant::now();
    other.health().await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(2));

    // When the slow client reads, answers flow: the first 64 were in flight, the rest of what
    // the server read meanwhile was refused with TooManyInFlight.
    let mut answered = 0;
    let mut refused = 0;
    while answered + refused < 200 {
        match slow.read().await {
            Some((1, Message::HealthReport(_))) => answered += 1,
            Some((1, Message::Error(e))) if e.code == ErrorCode::TooManyInFlight => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(answered >= 64, "{answered}");
    assert!(refused > 0, "{refused}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_event_is_applied_once_across_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start(dir.path(), 2);
    let addr = running.addr();
    let admin = running.client(ADMIN_KEY).await;
    setup_catalog(&admin, &["w1"]).await;
    admin.command(grant(1, "w1", "10")).await.unwrap();

    // An event the server applies but whose answer the client never reads (a lost answer).
    let lost = usage(777, "w1", 100, DebitMode::Strict);
    let raw = raw_connect(&running).await;
    let mut s = raw.authed(ADMIN_KEY).await;
    s.write(1, &Message::Request(lost.clone())).await;
    let mut applied = false;
    for _ in 0..100 {
        if admin
            .balance(name("w1"), asset("USD"))
            .await
            .unwrap()
            .available
            == d("9.9")
        {
            applied = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(applied);
    drop(s);
    drop(raw);

    // The server stops; a call made while it is down keeps retrying until it is back.
    running.stop().await;
    let during = usage(778, "w1", 100, DebitMode::Strict);
    let retrying = tokio::spawn({
        let admin = admin.clone();
        let during = during.clone();
        async move { admin.command(during).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!retrying.is_finished());
    let running = Running::start_with(tally_server::Config {
        listen: addr.to_string(),
        ..common::config(dir.path(), 2)
    });
    let reply = retrying.await.unwrap().unwrap();
    assert_eq!(reply.code, ResultCode::Ok);

    // Retrying both events with their ids: the first answers come back, nothing is applied again.
    let first = admin.command(lost).await.unwrap();
    assert!(
        matches!(first.value, ReplyValue::Charge { .. }),
        "{first:?}"
    );
    let again = admin.command(during).await.unwrap();
    assert_eq!(again, reply);
    assert_eq!(
        admin
            .balance(name("w1"), asset("USD"))
            .await
            .unwrap()
            .available,
        d("9.8")
    );
    running.stop().await;
}

fn req(id: u128, command: Command) -> Request {
    Request {
        id: RequestId(id),
        command,
    }
}

fn charged(reply: &Reply) -> (rust_decimal::Decimal, rust_decimal::Decimal) {
    match reply.value {
        ReplyValue::Charge {
            charged, available, ..
        } => (charged, available),
        other => panic!("expected a charge, got {other:?}"),
    }
}

fn rejected(result: Result<Reply, Error>) -> ResultCode {
    match result {
        Err(Error::Rejected { code, .. }) => code,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn later(seconds: i64) -> Timestamp {
    use tally_server::Clock;
    Timestamp(tally_server::SystemClock.now().0 + seconds * 1_000_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start(dir.path(), 2);
    let c = running.client(ADMIN_KEY).await;
    // Catalog and wallets: DefineAsset, DefineProduct, DraftPlan, PublishPlan, CreateWallet,
    // AssignPlan.
    setup_catalog(&c, &["w1", "w2"]).await;
    let w1 = name("w1");
    let usd = asset("USD");
    let ok = |r: Result<Reply, Error>| {
        let r = r.unwrap();
        assert_eq!(r.code, ResultCode::Ok);
        r
    };
    ok(c.command(req(
        1,
        Command::SetOverdraft {
            wallet: w1,
            asset: usd,
            limit: d("0"),
        },
    ))
    .await);
    let topup = ok(c
        .command(req(
            2,
            Command::Grant(Grant {
                wallet: w1,
                asset: usd,
                amount: d("10"),
                priority: 0,
                effective_at: None,
                expires_at: None,
                source: GrantSource::TopUp {
                    payment_id: name("pi_1"),
                },
            }),
        ))
        .await);
    let ReplyValue::Grant { grant: g1, .. } = topup.value else {
        panic!("{topup:?}")
    };
    // Usage: 100 tokens at 0.001.
    let used = ok(c.command(usage(10, "w1", 100, DebitMode::Strict)).await);
    assert_eq!(charged(&used), (d("0.1"), d("9.9")));
    // Reserve, settle.
    let hold = ok(c
        .reserve(tally_net::ReserveItem {
            id: RequestId(11),
            wallet: w1,
            amount: ReserveAmount::Fixed {
                asset: usd,
                amount: d("1"),
            },
            deadline: later(60),
        })
        .await);
    let ReplyValue::Hold {
        hold: h1,
        available,
        ..
    } = hold.value
    else {
        panic!("{hold:?}")
    };
    assert_eq!(available, d("8.9"));
    let Command::Usage(actual) = usage(0, "w1", 50, DebitMode::Strict).command else {
        unreachable!()
    };
    let settled = ok(c
        .command(req(
            12,
            Command::Settle {
                wallet: w1,
                hold: h1,
                usage: actual,
            },
        ))
        .await);
    assert_eq!(charged(&settled), (d("0.05"), d("9.85")));
    // Reserve an estimate, release it.
    let estimate = ok(c
        .command(req(
            13,
            Command::Reserve {
                wallet: w1,
                amount: ReserveAmount::Estimate {
                    product: name("chat"),
                    quantities: vec![Quantity {
                        dimension: name("tokens"),
                        value: 200.into(),
                    }],
                    attributes: vec![],
                },
                deadline: later(60),
            },
        ))
        .await);
    let ReplyValue::Hold {
        hold: h2, amount, ..
    } = estimate.value
    else {
        panic!("{estimate:?}")
    };
    assert_eq!(amount, d("0.2"));
    ok(c.command(req(
        14,
        Command::Release {
            wallet: w1,
            hold: h2,
        },
    ))
    .await);
    assert_eq!(c.balance(w1, usd).await.unwrap().available, d("9.85"));
    // Refund the first usage, adjust.
    ok(c.command(req(
        15,
        Command::Refund {
            wallet: w1,
            event: RequestId(10),
            amount: None,
        },
    ))
    .await);
    ok(c.command(req(
        16,
        Command::Adjust {
            wallet: w1,
            asset: usd,
            amount: d("1"),
            reason: "goodwill".into(),
        },
    ))
    .await);
    assert_eq!(c.balance(w1, usd).await.unwrap().available, d("10.95"));
    // Top-up rules (on a priced asset) and payment outcomes.
    ok(c.command(req(
        9_117,
        Command::PriceAsset {
            asset: usd,
            price: Some(TopUpPrice {
                currency: name("usd"),
                unit_amount: d("1"),
            }),
        },
    ))
    .await);
    ok(c.command(req(
        17,
        Command::SetTopUpRule {
            wallet: w1,
            rule: TopUpRule {
                asset: usd,
                threshold: d("1"),
                amount: TopUpAmount::Fixed(d("20")),
                attempts_max: 3,
                cooldown_us: 60_000_000,
                daily_cap: None,
                monthly_cap: None,
                payment_method: name("pm_card"),
            },
        },
    ))
    .await);
    ok(c.command(req(
        18,
        Command::RemoveTopUpRule {
            wallet: w1,
            asset: usd,
        },
    ))
    .await);
    // A payment's success adds a grant (idempotent on the payment id).
    ok(c.command(req(
        19,
        Command::TopUpSucceeded {
            wallet: w1,
            asset: usd,
            trigger: 42,
            payment_id: name("pi_2"),
            amount: d("20"),
        },
    ))
    .await);
    let failed_trigger = rejected(
        c.command(req(
            20,
            Command::TopUpFailed {
                wallet: w1,
                asset: usd,
                trigger: 42,
                reason: name("card_declined"),
            },
        ))
        .await,
    );
    assert_eq!(failed_trigger, ResultCode::StaleTopUp);
    // Freeze blocks strict usage; unfreeze.
    ok(c.command(req(21, Command::Freeze { wallet: w1 })).await);
    let frozen = rejected(c.command(usage(22, "w1", 1, DebitMode::Strict)).await);
    ok(c.command(req(23, Command::Unfreeze { wallet: w1 })).await);
    assert_eq!(frozen, ResultCode::WalletFrozen);
    // Dispute the top-up, then win it.
    ok(c.command(req(
        24,
        Command::Dispute {
            wallet: w1,
            grant: g1,
            freeze: false,
        },
    ))
    .await);
    ok(c.command(req(
        25,
        Command::DisputeWon {
            wallet: w1,
            grant: g1,
        },
    ))
    .await);

    // Batch frames, sent as such.
    ok(c.command(grant(30, "w2", "5")).await);
    let events: Vec<(RequestId, UsageEvent)> = (0..3)
        .map(
            |i| match usage(31 + i, "w2", 10, DebitMode::Strict).command {
                Command::Usage(e) => (RequestId(31 + i), e),
                _ => unreachable!(),
            },
        )
        .collect();
    let Message::BatchReply(outcomes) = c.send(Message::UsageBatch(events)).await.unwrap() else {
        panic!("expected a batch reply")
    };
    assert_eq!(outcomes.len(), 3);
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, Ok(r) if r.code.is_ok())));
    let reserves: Vec<tally_net::ReserveItem> = (0..2)
        .map(|i| tally_net::ReserveItem {
            id: RequestId(40 + i),
            wallet: name("w2"),
            amount: ReserveAmount::Fixed {
                asset: usd,
                amount: d("0.5"),
            },
            deadline: later(60),
        })
        .collect();
    let Message::BatchReply(outcomes) = c.send(Message::ReserveBatch(reserves)).await.unwrap()
    else {
        panic!("expected a batch reply")
    };
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, Ok(r) if r.code.is_ok())));
    // Concurrent calls are batched by the client; each gets its own reply.
    let calls: Vec<_> = (0..64u128)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.command(usage(100 + i, "w2", 1, DebitMode::Strict)).await })
        })
        .collect();
    for call in calls {
        assert_eq!(charged(&call.await.unwrap().unwrap()).0, d("0.001"));
    }
    // 5 - 3 × 0.01 - 2 × 0.5 held - 64 × 0.001
    assert_eq!(
        c.balance(name("w2"), usd).await.unwrap().available,
        d("3.906")
    );

    // Queries.
    let info = c.wallet(w1).await.unwrap();
    assert_eq!(info.wallet, w1);
    assert!(!info.frozen);
    assert_eq!(info.plans[0].0, name("std"));
    let total = c.margin(MarginScope::Total).await.unwrap();
    let by_wallet = c.margin(MarginScope::Wallet(name("w2"))).await.unwrap();
    assert_eq!(by_wallet.events, 67);
    assert!(total.events >= by_wallet.events + 2, "{total:?}");
    let Command::Usage(preview) = usage(0, "w1", 100, DebitMode::Strict).command else {
        unreachable!()
    };
    match c.query(Query::PricePreview(preview.clone())).await.unwrap() {
        tally_net::Answer::Price(p) => assert_eq!((p.amount, p.version), (d("0.1"), 1)),
        other => panic!("{other:?}"),
    }
    ok(c.command(req(
        50,
        Command::DraftPlan {
            plan: name("std"),
            custom_for: None,
            asset: usd,
            rules: vec![PriceRule {
                product: name("chat"),
                filters: vec![],
                components: vec![Component {
                    dimension: name("tokens"),
                    price: PriceModel::PerUnit {
                        unit_price: d("0.002"),
                    },
                }],
                minimum_charge: None,
                rounding: Rounding::Up,
            }],
        },
    ))
    .await);
    match c
        .query(Query::DraftTest {
            plan: name("std"),
            events: vec![preview],
        })
        .await
        .unwrap()
    {
        tally_net::Answer::DraftTest(report) => {
            assert_eq!(report.plan, name("std"));
            assert_eq!(report.current_version, Some(1));
        }
        other => panic!("{other:?}"),
    }
    // A query the engine refuses comes back as a typed rejection.
    let missing = c.balance(name("nobody"), usd).await;
    assert!(
        matches!(missing, Err(Error::Rejected { .. })),
        "{missing:?}"
    );

    // Online snapshot and health.
    let snapshot = c.snapshot().await.unwrap();
    assert_eq!(
        snapshot.iter().map(|s| s.shard).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert!(snapshot.iter().all(|s| s.lsn > 0));
    let health = c.health().await.unwrap();
    assert_eq!(health.shards_running, 2);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_auth_only_small_frames_and_only_for_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), 1);
    config.auth_deadline_ms = 400;
    let running = Running::start_with(config);
    let raw = raw_connect(&running).await;
    // A frame over the pre-auth limit is refused from its header, before its bytes are kept.
    let mut s = raw.stream().await;
    s.write(0, &hello(1, 1)).await;
    assert!(matches!(s.read().await, Some((0, Message::Welcome(_)))));
    s.write_bytes(&header(1, Kind::Usage as u8, 5_000, 7)).await;
    s.expect_error(0, ErrorCode::FrameTooLarge).await;
    // Authenticated (a connection of its own: Hello is once per connection), the same size is
    // a frame like any other (here a malformed one).
    let raw = raw_connect(&running).await;
    let mut s = raw.authed(ADMIN_KEY).await;
    let mut frame = header(1, Kind::Usage as u8, 5_000, 8);
    frame.extend(std::iter::repeat_n(0u8, 5_000));
    s.write_bytes(&frame).await;
    match s.read().await {
        Some((_, Message::Error(e))) => assert_ne!(e.code, ErrorCode::FrameTooLarge, "{e:?}"),
        other => panic!("{other:?}"),
    }
    // A connection that never authenticates is closed at the deadline, freeing its slot.
    let idle = raw_connect(&running).await;
    let mut s = idle.stream().await;
    s.write(0, &hello(1, 1)).await;
    assert!(matches!(s.read().await, Some((0, Message::Welcome(_)))));
    let reason = tokio::time::timeout(std::time::Duration::from_secs(5), idle.conn.closed())
        .await
        .expect("closed within the deadline");
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(ErrorCode::Unauthenticated as u32)),
        "{reason:?}"
    );
    // The authenticated connection is still served.
    assert!(raw.conn.close_reason().is_none());
    running.stop().await;
}

#[test]
fn a_decoder_gives_back_the_memory_of_a_large_frame() {
    let mut decoder = tally_net::Decoder::default();
    let big = Message::Auth {
        key: vec![b'k'; 200],
    };
    let mut bytes = Vec::new();
    big.encode(1, &mut bytes).unwrap();
    // A large partial frame grows the buffer...
    let mut large = header(1, Kind::Usage as u8, 3_000_000, 9);
    large.extend(std::iter::repeat_n(0u8, 3_000_000));
    decoder.feed(&large);
    assert!(decoder.next_frame().unwrap().is_some());
    assert!(decoder.capacity() >= 3_000_000);
    // ...and small traffic afterwards shrinks it.
    decoder.feed(&bytes);
    assert!(decoder.next_frame().unwrap().is_some());
    decoder.feed(&bytes);
    assert!(decoder.capacity() < 1_000_000, "{}", decoder.capacity());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_limits_is_refused_before_it_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start(dir.path(), 1);
    let client = running.client(ADMIN_KEY).await;
    setup_catalog(&client, &["w1"]).await;
    client.command(grant(500, "w1", "10")).await.unwrap();
    let mut event = match usage(501, "w1", 5, DebitMode::Strict).command {
        Command::Usage(u) => u,
        _ => unreachable!(),
    };
    let honest = event.clone();
    event.attributes = (0..8_059)
        .map(|i| (name(&format!("a{i}")), name("x")))
        .collect();
    let refused = client.command(req(501, Command::Usage(event))).await;
    assert_eq!(rejected(refused), ResultCode::LimitExceeded);
    // Not logged: the same id with an honest body is a new request, not an idempotency conflict.
    let reply = client
        .command(req(501, Command::Usage(honest)))
        .await
        .unwrap();
    assert!(reply.code.is_ok(), "{reply:?}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_limits_count_batch_items_not_frames() {
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start_with(tally_server::Config {
        in_flight_max: 64,
        ..common::config(dir.path(), 1)
    });
    let admin = running.client(ADMIN_KEY).await;
    setup_catalog(&admin, &["w1"]).await;
    admin.command(grant(1, "w1", "1000000")).await.unwrap();
    let batch = |from: u128, n: u128| {
        Message::UsageBatch(
            (from..from + n)
                .map(|i| {
                    let r = usage(i, "w1", 1, DebitMode::Strict);
                    match r.command {
                        Command::Usage(u) => (r.id, u),
                        _ => unreachable!(),
                    }
                })
                .collect(),
        )
    };
    let raw = raw_connect(&running).await;
    let mut s = raw.authed(ADMIN_KEY).await;
    // One batch larger than the limit fits on an idle connection.
    s.write(10, &batch(1_000, 100)).await;
    match s.read().await {
        Some((10, Message::BatchReply(outcomes))) => assert_eq!(outcomes.len(), 100),
        other => panic!("unexpected {other:?}"),
    }
    // Two batches of 60 in one write: the second arrives while the first's 60 items are in
    // flight (they wait for a WAL sync), and 60 + 60 > 64 is refused.
    let mut bytes = Vec::new();
    batch(2_000, 60).encode(11, &mut bytes).unwrap();
    batch(3_000, 60).encode(12, &mut bytes).unwrap();
    s.write_bytes(&bytes).await;
    let mut answers = Vec::new();
    for _ in 0..2 {
        answers.push(s.read().await.unwrap());
    }
    assert!(
        matches!(&answers[0], (11, Message::BatchReply(o)) if o.len() == 60),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[1], (12, Message::Error(e)) if e.code == ErrorCode::TooManyInFlight),
        "{answers:?}"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_keep_a_client_with_a_key_out() {
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start_with(tally_server::Config {
        connections_max: 6,
        unauthenticated_max: 2,
        // Long: here it is room, not the deadline, that closes idle connections.
        auth_deadline_ms: 60_000,
        ..common::config(dir.path(), 1)
    });
    let closed_for_room = |reason: &quinn::ConnectionError| {
        matches!(reason, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(ErrorCode::Unauthenticated as u32)
                && c.reason.starts_with(b"closed to make room"))
    };
    let idle = || idle_connection(&running);
    // Two connections that finish the handshake and never authenticate fill the room for them.
    let (idle1, _s1) = idle().await;
    let (idle2, _s2) = idle().await;
    assert!(idle1.conn.close_reason().is_none() && idle2.conn.close_reason().is_none());
    // A third closes the oldest.
    let (idle3, _s3) = idle().await;
    assert!(closed_for_room(&wait_closed(&idle1, "idle1").await));
    assert!(idle2.conn.close_reason().is_none());
    // A client with a key always gets in: it closes the oldest idle one, then authenticates
    // and is no longer counted among the unauthenticated.
    let client = running.client(ADMIN_KEY).await;
    assert!(closed_for_room(&wait_closed(&idle2, "idle2").await));
    client.health().await.unwrap();
    assert_eq!(running.stats().evicted_unauthenticated, 2);
    // Authenticated connections are never closed to make room: more idle ones rotate among
    // themselves.
    let (idle4, _s4) = idle().await;
    let (idle5, _s5) = idle().await;
    assert!(closed_for_room(&wait_closed(&idle3, "idle3").await));
    client.health().await.unwrap();
    assert!(idle5.conn.close_reason().is_none());
    // Clients fill the slots (each new one closes an idle connection while it is itself
    // unauthenticated, so count what is open), and the next is refused before its TLS
    // handshake, which the client reports as 1014.
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(running.client(ADMIN_KEY).await);
    }
    // Six clients with keys hold the six slots (the idle connections were closed to make
    // room; their slots come back when their tasks end).
    settle(&running, 6).await;
    let refused_before = running.stats().connections_refused;
    let c = Client::connect(running.client_config(ADMIN_KEY)).await;
    assert_eq!(transport_code(c), ErrorCode::TooManyConnections);
    assert_eq!(running.stats().connections_refused, refused_before + 1);
    // Refused by QUIC before the TLS handshake, not closed by the application after it.
    match try_raw_connect(&running).await {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            assert_eq!(
                close.error_code,
                quinn::TransportErrorCode::CONNECTION_REFUSED
            )
        }
        Err(other) => panic!("refused with {other:?}"),
        Ok(_) => panic!("a connection past connections_max"),
    }
    client.health().await.unwrap();
    drop((idle4, idle5, clients));
    running.stop().await;

    // A full server whose slots are partly held by connections without a key: a client with a
    // key closes the oldest of them and gets in (here the room for unauthenticated connections
    // is as large as the server, so only fullness closes them).
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start_with(tally_server::Config {
        connections_max: 3,
        unauthenticated_max: 3,
        auth_deadline_ms: 60_000,
        ..common::config(dir.path(), 1)
    });
    let idle = || idle_connection(&running);
    let closed_for_a_full_server = |reason: &quinn::ConnectionError| {
        matches!(reason, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(ErrorCode::Unauthenticated as u32)
                && c.reason.starts_with(b"closed to make room: the server is full"))
    };
    let (idle1, _s1) = idle().await;
    let (idle2, _s2) = idle().await;
    let a = running.client(ADMIN_KEY).await;
    settle(&running, 3).await;
    let b = running.client(ADMIN_KEY).await;
    assert!(closed_for_a_full_server(
        &wait_closed(&idle1, "idle1").await
    ));
    assert!(idle2.conn.close_reason().is_none());
    let c = running.client(ADMIN_KEY).await;
    assert!(closed_for_a_full_server(
        &wait_closed(&idle2, "idle2").await
    ));
    settle(&running, 3).await;
    // Now every slot is held by a client with a key: refused.
    let d = Client::connect(running.client_config(ADMIN_KEY)).await;
    assert_eq!(transport_code(d), ErrorCode::TooManyConnections);
    for client in [&a, &b, &c] {
        client.health().await.unwrap();
    }
    running.stop().await;
}

/// An idle connection: handshake and Hello, never Auth. The Welcome shows the server has
/// counted it (it does so before it serves any stream), so connections made one after another
/// are in the server's order.
async fn idle_connection(running: &Running) -> (Raw, RawStream) {
    let raw = raw_connect(running).await;
    let mut s = raw.stream().await;
    s.write(0, &hello(1, 1)).await;
    assert!(matches!(s.read().await, Some((0, Message::Welcome(_)))));
    (raw, s)
}

/// Waits (at most 5 s) for the server to close `raw`, and returns why it did.
async fn wait_closed(raw: &Raw, which: &str) -> quinn::ConnectionError {
    tokio::time::timeout(std::time::Duration::from_secs(5), raw.conn.closed())
        .await
        .unwrap_or_else(|_| panic!("{which} was not closed to make room"))
}

/// Waits until the server counts `open` connections (closed ones give their slot back when
/// their task ends).
async fn settle(running: &Running, open: u64) {
    for _ in 0..500 {
        if running.stats().connections_open == open {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!(
        "{} connections open, not {open}",
        running.stats().connections_open
    );
}
