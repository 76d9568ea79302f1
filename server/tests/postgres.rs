//! The history export to a real PostgreSQL (started by `scripts/postgres`, which installs it
//! with apt-get when it is missing): every row arrives exactly once, the journal sums to zero and
//! matches every wallet, refunds reach their events, and a PostgreSQL outage in the middle of
//! the load neither stops debits nor loses or doubles a row.

#[path = "common/mod.rs"]
mod common;

use std::str::FromStr;
use std::time::{Duration, Instant};

use common::postgres::Postgres;
use common::*;
use rust_decimal::Decimal;
use tally_engine::{asset, name, Command, DebitMode, Query, QueryReply, Request, RequestId};
use tally_server::store::SnapshotStore;
use tally_server::{Handle, Server};

fn ledger(handle: &Handle, wallet: &str) -> Decimal {
    match handle
        .query(Query::Balance {
            wallet: name(wallet),
            asset: asset("USD"),
        })
        .unwrap()
        .unwrap()
    {
        QueryReply::Balance(b) => b.ledger,
        other => panic!("{other:?}"),
    }
}

/// `n` strict usage events over the wallets, each acknowledged.
fn spend(handle: &Handle, wallets: &[String], id: &mut u128, n: usize) -> i64 {
    for i in 0..n {
        *id += 1;
        let w = &wallets[i % wallets.len()];
        let reply = handle.call(usage(*id, w, 7, DebitMode::Strict)).unwrap();
        assert!(reply.code.is_ok(), "{reply:?}");
    }
    n as i64
}

#[test]
fn rows_arrive_once_across_an_outage_and_agree_with_the_ledger() {
    let temp = tempfile::tempdir().unwrap();
    let pg = Postgres::start(&temp.path().join("pg"));
    let data = temp.path().join("data");
    let mut config = config(&data, 2);
    config.export_postgres = Some(pg.url.clone());
    let wallets: Vec<String> = (0..6).map(|i| format!("pg-{i}")).collect();
    let server = Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
    let handle = server.handle();
    setup(&handle, &wallets);
    for (i, w) in wallets.iter().enumerate() {
        assert!(handle
            .call(grant(i as u128 + 1, w, "1000"))
            .unwrap()
            .code
            .is_ok());
    }
    let mut applied = 0i64;
    let mut id = 10_000u128;
    applied += spend(&handle, &wallets, &mut id, 300);
    let mut client = pg.client();
    common::postgres::wait_for_usage(&mut client, applied);

    // PostgreSQL goes away: debits keep flowing into the store; then it comes back.
    drop(client);
    pg.stop();
    applied += spend(&handle, &wallets, &mut id, 300);
    // A refund of the first event while PostgreSQL is down.
    let refund = handle
        .call(Request {
            id: RequestId(99),
            command: Command::Refund {
                wallet: name(&wallets[0]),
                event: RequestId(10_001),
                amount: Some(d("0.003")),
            },
        })
        .unwrap();
    assert!(refund.code.is_ok(), "{refund:?}");
    // And an adjustment, whose reason travels with its journal entry.
    let adjust = handle
        .call(Request {
            id: RequestId(98),
            command: Command::Adjust {
                wallet: name(&wallets[1]),
                asset: asset("USD"),
                amount: d("0.5"),
                reason: "goodwill after the outage".into(),
            },
        })
        .unwrap();
    assert!(adjust.code.is_ok(), "{adjust:?}");
    pg.restart();
    let mut client = pg.client();
    common::postgres::wait_for_usage(&mut client, applied);
    // A restart of tally: the export goes on from its cursor, copying nothing twice.
    server.shutdown().unwrap();
    let server = Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
    let handle = server.handle();
    applied += spend(&handle, &wallets, &mut id, 100);
    common::postgres::wait_for_usage(&mut client, applied);

    let distinct: i64 = client
        .query_one(
            "SELECT count(DISTINCT request_id) FROM tally.usage_events",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(distinct, applied, "a usage event was exported twice");
    let refunded: String = client
        .query_one(
            "SELECT refunded::text FROM tally.usage_events WHERE request_id = $1",
            &[&format!("{:032x}", 10_001u128)],
        )
        .unwrap()
        .get(0);
    assert_eq!(Decimal::from_str(&refunded).unwrap(), d("0.003"));
    // Times arrive to the microsecond: the event's occurred_at in PostgreSQL is the store's.
    let stored = tally_server::outbound::sqlite::Reader::open(&data)
        .unwrap()
        .usage(&tally_server::outbound::sqlite::Filter {
            wallet: wallets[0].clone(),
            limit: 1000,
            ..Default::default()
        })
        .unwrap()
        .rows
        .into_iter()
        .find(|r| r.request_id == format!("{:032x}", 10_001u128))
        .unwrap();
    let micros: i64 = client
        .query_one(
            "SELECT (extract(epoch FROM occurred_at) * 1000000)::bigint \
             FROM tally.usage_events WHERE request_id = $1",
            &[&stored.request_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        tally_engine::Timestamp(micros),
        tally_engine::Timestamp::parse_rfc3339(&stored.occurred_at).unwrap()
    );
    // Wait for the journal too (it trails like the usage), then check it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let zero: Option<String> = client
            .query_one(
                "SELECT sum(amount)::text FROM tally.journal WHERE refund_of IS NOT NULL",
                &[],
            )
            .unwrap()
            .get(0);
        if zero.is_some() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let reasons: Vec<String> = client
        .query(
            "SELECT reason FROM tally.journal WHERE reason IS NOT NULL",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(reasons, ["goodwill after the outage"]);
    let exported_wallets: i64 = client
        .query_one("SELECT count(*) FROM tally.wallets", &[])
        .unwrap()
        .get(0);
    assert_eq!(exported_wallets, wallets.len() as i64);
    for w in &wallets {
        let row = client
            .query_one(
                "SELECT (coalesce(sum(amount) FILTER (WHERE to_account = 'wallet'), 0) \
                 - coalesce(sum(amount) FILTER (WHERE from_account = 'wallet'), 0))::text \
                 FROM tally.journal WHERE wallet = $1",
                &[w],
            )
            .unwrap();
        let balance = Decimal::from_str(&row.get::<_, String>(0)).unwrap();
        assert_eq!(balance, ledger(&handle, w), "wallet {w} in PostgreSQL");
    }
    server.shutdown().unwrap();
}
