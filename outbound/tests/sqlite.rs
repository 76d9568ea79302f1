//! The SQLite history store: each effect once however often it is written, refunds reach their
//! events, and retention removes old rows but never one an export has not copied yet.

use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use tally_engine::{
    asset, name, Command, DebitMode, Effect, MarginRecord, Quantity, Request, RequestId, Timestamp,
    UsageEvent,
};
use tally_outbound::sqlite::{Filter, Reader};
use tally_outbound::{Sink, SqliteSink, Tagged};

fn now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64,
    )
}

fn usage(lsn: u64, occurred_at: Timestamp) -> Tagged {
    let event = UsageEvent {
        wallet: name("w"),
        product: name("chat"),
        quantities: vec![Quantity {
            dimension: name("tokens"),
            value: Decimal::from(10),
        }],
        attributes: vec![(name("model"), name("m"))],
        cost_usd: Decimal::new(1, 3),
        occurred_at,
        mode: DebitMode::Strict,
    };
    Tagged {
        shard: 0,
        lsn,
        index: 0,
        applied_at: occurred_at,
        effect: Effect::Margin(MarginRecord {
            request: RequestId(lsn as u128),
            wallet: name("w"),
            product: name("chat"),
            plan: name("p"),
            version: 1,
            asset: asset("USD"),
            charged: Decimal::new(10, 2),
            revenue_usd: Decimal::new(10, 2),
            cost_usd: Decimal::new(1, 3),
            occurred_at,
            credit_priority: 0,
            credit_expires_at: None,
        }),
        cause: Some(Arc::new(Request {
            id: RequestId(lsn as u128),
            command: Command::Usage(event),
        })),
    }
}

fn count(dir: &std::path::Path) -> u64 {
    Reader::open(dir).unwrap().counts().unwrap().0
}

#[test]
fn an_effect_is_stored_once_however_often_it_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = SqliteSink::open(dir.path(), None).unwrap();
    for _ in 0..3 {
        for lsn in 1..=5 {
            sink.write(&usage(lsn, now())).unwrap();
        }
        sink.flush().unwrap();
    }
    assert_eq!(count(dir.path()), 5);
    // Reopened (a restart replaying the same effects): still once.
    drop(sink);
    let mut sink = SqliteSink::open(dir.path(), None).unwrap();
    assert!(!sink.write(&usage(3, now())).unwrap());
    sink.flush().unwrap();
    let page = Reader::open(dir.path())
        .unwrap()
        .usage(&Filter {
            wallet: "w".into(),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(page.rows.len(), 5);
    assert_eq!(page.rows[0].quantities["tokens"], "10");
    assert_eq!(page.rows[0].attributes["model"], "m");
}

#[test]
fn retention_keeps_what_an_export_has_not_copied() {
    let dir = tempfile::tempdir().unwrap();
    let old = Timestamp(now().0 - 3 * 86_400 * 1_000_000);
    {
        let mut sink = SqliteSink::open(dir.path(), None).unwrap();
        for lsn in 1..=10 {
            sink.write(&usage(lsn, old)).unwrap();
        }
        sink.write(&usage(11, now())).unwrap();
        sink.flush().unwrap();
    }
    // An export has copied shard 0 up to LSN 4 (as the PostgreSQL export records it).
    let conn = rusqlite::Connection::open(dir.path().join(tally_outbound::sqlite::FILE)).unwrap();
    conn.execute(
        "INSERT INTO export_cursor (sink, shard, lsn, idx) VALUES ('postgres', 0, 4, 0)",
        [],
    )
    .unwrap();
    drop(conn);
    let mut sink = SqliteSink::open(dir.path(), Some(Duration::from_secs(86_400))).unwrap();
    sink.write(&usage(12, now())).unwrap();
    sink.flush().unwrap();
    // 1..=4 were old and copied: gone. 5..=10 are old but not copied: kept. 11, 12 are new.
    assert_eq!(count(dir.path()), 8);
}

#[test]
fn what_the_store_holds_is_skipped_by_its_progress_without_a_statement() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = SqliteSink::open(dir.path(), None).unwrap();
    for lsn in 1..=5 {
        assert!(sink.write(&usage(lsn, now())).unwrap());
    }
    sink.flush().unwrap();
    // Given but not committed: not yet covered by the progress.
    assert!(sink.write(&usage(6, now())).unwrap());
    drop(sink);
    // Take row 3 away behind the store's back: a replay that ran `INSERT OR IGNORE` for every
    // effect would write it again; one that trusts the committed progress does not look.
    let conn = rusqlite::Connection::open(dir.path().join(tally_outbound::sqlite::FILE)).unwrap();
    conn.execute("DELETE FROM usage_events WHERE lsn = 3", [])
        .unwrap();
    drop(conn);
    let mut sink = SqliteSink::open(dir.path(), None).unwrap();
    for lsn in 1..=5 {
        assert!(!sink.write(&usage(lsn, now())).unwrap(), "lsn {lsn}");
    }
    // Above the progress: written (6 was never committed), and the progress moves with it.
    assert!(sink.write(&usage(6, now())).unwrap());
    assert!(sink.write(&usage(7, now())).unwrap());
    sink.flush().unwrap();
    assert_eq!(count(dir.path()), 6);
    drop(sink);
    let mut sink = SqliteSink::open(dir.path(), None).unwrap();
    assert!(!sink.write(&usage(7, now())).unwrap());
    assert!(sink.write(&usage(8, now())).unwrap());
}

#[test]
fn a_store_written_before_the_credit_columns_is_migrated_and_its_charges_read_back() {
    let dir = tempfile::tempdir().unwrap();
    // The usage table as the previous release created it, with one row.
    let conn = rusqlite::Connection::open(dir.path().join(tally_outbound::sqlite::FILE)).unwrap();
    conn.execute_batch(
        "CREATE TABLE usage_events (
            shard INTEGER NOT NULL, lsn INTEGER NOT NULL, idx INTEGER NOT NULL,
            request_id TEXT NOT NULL,
            wallet TEXT NOT NULL, product TEXT NOT NULL, plan TEXT NOT NULL,
            plan_version INTEGER NOT NULL, asset TEXT NOT NULL, charged TEXT NOT NULL,
            revenue_usd TEXT NOT NULL, cost_usd TEXT NOT NULL,
            quantities TEXT NOT NULL, attributes TEXT NOT NULL, model TEXT,
            occurred_at INTEGER NOT NULL, applied_at INTEGER NOT NULL,
            refunded TEXT NOT NULL DEFAULT '0',
            PRIMARY KEY (shard, lsn, idx)
        ) WITHOUT ROWID;
        INSERT INTO usage_events VALUES (1, 1, 0, printf('%032x', 1), 'w', 'chat', 'p', 1, 'USD',
            '0.10', '0.10', '0.001', '{}', '{}', NULL, 1000, 1001, '0');",
    )
    .unwrap();
    drop(conn);
    let mut sink = SqliteSink::open(dir.path(), None).unwrap();
    let mut with_terms = usage(2, now());
    if let Effect::Margin(m) = &mut with_terms.effect {
        m.credit_priority = 3;
        m.credit_expires_at = Some(Timestamp(5_000));
    }
    assert!(sink.write(&with_terms).unwrap());
    sink.flush().unwrap();
    let reader = Reader::open(dir.path()).unwrap();
    let day = 86_400_000_000;
    let refund = RequestId(900);
    // The old row does not say what a refund credit would get: the store does not vouch for it.
    assert!(reader
        .recorded_charge("w", RequestId(1), refund, day)
        .unwrap()
        .is_none());
    let new = reader
        .recorded_charge("w", RequestId(2), refund, day)
        .unwrap()
        .unwrap();
    assert_eq!(new.charged, Decimal::new(10, 2));
    assert_eq!(
        (new.credit_priority, new.credit_expires_at),
        (3, Some(Timestamp(5_000)))
    );
    assert_eq!(new.refundable_until, Timestamp(new.occurred_at.0 + day));
    // Another wallet's event, or none: nothing.
    assert!(reader
        .recorded_charge("v", RequestId(2), refund, day)
        .unwrap()
        .is_none());
    assert!(reader
        .recorded_charge("w", RequestId(9), refund, day)
        .unwrap()
        .is_none());
    // The id reused for a second event: ambiguous, nothing.
    let mut again = with_terms.clone();
    again.lsn = 3;
    assert!(sink.write(&again).unwrap());
    sink.flush().unwrap();
    assert!(reader
        .recorded_charge("w", RequestId(2), refund, day)
        .unwrap()
        .is_none());
}

#[test]
fn a_refund_already_in_the_journal_gets_no_recorded_charge() {
    use tally_engine::{Account, EntryKind, JournalEntry};
    let dir = tempfile::tempdir().unwrap();
    let mut sink = SqliteSink::open(dir.path(), None).unwrap();
    let mut charge = usage(1, now());
    if let Effect::Margin(m) = &mut charge.effect {
        m.credit_priority = 1;
    }
    sink.write(&charge).unwrap();
    // Refund 900 of it was applied: its journal entry is in the store.
    let at = now();
    sink.write(&Tagged {
        shard: 0,
        lsn: 2,
        index: 0,
        applied_at: at,
        effect: Effect::Journal(JournalEntry {
            seq: 1,
            at,
            request: Some(RequestId(900)),
            kind: EntryKind::Refund,
            asset: asset("USD"),
            amount: Decimal::new(5, 2),
            from: Account::Refund,
            to: Account::Wallet(name("w")),
            grant: None,
        }),
        cause: None,
    })
    .unwrap();
    sink.flush().unwrap();
    let reader = Reader::open(dir.path()).unwrap();
    let day = 86_400_000_000;
    assert!(reader
        .recorded_charge("w", RequestId(1), RequestId(900), day)
        .unwrap()
        .is_none());
    assert!(reader
        .recorded_charge("w", RequestId(1), RequestId(901), day)
        .unwrap()
        .is_some());
}

#[test]
fn an_adjustment_keeps_its_reason_in_the_journal() {
    use tally_engine::{Account, EntryKind, JournalEntry};
    let dir = tempfile::tempdir().unwrap();
    let mut sink = SqliteSink::open(dir.path(), None).unwrap();
    let at = now();
    let entry = |lsn: u64, cause: Command| Tagged {
        shard: 0,
        lsn,
        index: 0,
        applied_at: at,
        effect: Effect::Journal(JournalEntry {
            seq: lsn,
            at,
            request: Some(RequestId(lsn as u128)),
            kind: EntryKind::Grant,
            asset: asset("USD"),
            amount: Decimal::new(5, 0),
            from: Account::Adjustment,
            to: Account::Wallet(name("w")),
            grant: None,
        }),
        cause: Some(Arc::new(Request {
            id: RequestId(lsn as u128),
            command: cause,
        })),
    };
    let adjust = Command::Adjust {
        wallet: name("w"),
        asset: asset("USD"),
        amount: Decimal::new(5, 0),
        reason: "goodwill credit after the outage".into(),
    };
    let freeze = Command::Freeze { wallet: name("w") };
    assert!(sink.write(&entry(1, adjust)).unwrap());
    assert!(sink.write(&entry(2, freeze)).unwrap());
    sink.flush().unwrap();
    let page = Reader::open(dir.path())
        .unwrap()
        .transactions(&Filter {
            wallet: "w".into(),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    let reasons: Vec<Option<&str>> = page.rows.iter().map(|r| r.reason.as_deref()).collect();
    assert_eq!(reasons, [None, Some("goodwill credit after the outage")]);
}
