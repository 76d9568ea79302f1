//! The payments store: every top-up the engine requested, durably, until Stripe's outcome is
//! back in the engine (`<data-dir>/payments.sqlite3`).
//!
//! [`PaymentsSink`] is a [`Sink`]: it writes each `TopUpRequested` effect as a `pending` row,
//! keyed by the request's deterministic idempotency key, so replay after a crash inserts nothing
//! twice and the checkpoint barrier (see the crate docs) guarantees that no requested top-up is
//! lost between the WAL and this table. The Stripe worker ([`crate::stripe`]) takes pending rows,
//! charges them with that same key, reports the outcome to the engine, and only then marks the
//! row settled: a crash anywhere in between leaves it pending, and the retry gets Stripe's stored
//! answer for the key instead of a second charge.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use rust_decimal::Decimal;
use tally_engine::{Effect, TopUpRequest};

use crate::webhooks::Notice;
use crate::{Error, Sink, Tagged};

/// The file name of the store in the data directory.
pub const FILE: &str = "payments.sqlite3";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS topups (
    key TEXT PRIMARY KEY,
    wallet TEXT NOT NULL,
    asset TEXT NOT NULL,
    trigger INTEGER NOT NULL,
    amount TEXT NOT NULL,
    currency TEXT NOT NULL,
    minor_amount INTEGER NOT NULL,
    customer TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    state TEXT NOT NULL,
    payment_intent TEXT,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_us INTEGER NOT NULL,
    requested_us INTEGER NOT NULL,
    settled_us INTEGER,
    kind TEXT NOT NULL DEFAULT 'auto',
    request_hash TEXT
);
CREATE INDEX IF NOT EXISTS topups_wallet ON topups (wallet, requested_us);
CREATE INDEX IF NOT EXISTS topups_due ON topups (state, next_attempt_us);
CREATE INDEX IF NOT EXISTS topups_intent ON topups (payment_intent);
CREATE TABLE IF NOT EXISTS stripe_events (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    received_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS disputes (
    id TEXT PRIMARY KEY,
    payment_intent TEXT NOT NULL,
    status TEXT NOT NULL,
    event_created INTEGER NOT NULL
);
";

/// Where a top-up stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Not charged yet, or charged and the outcome not yet in the engine.
    Pending,
    /// The money is in: the engine credited the grant.
    Succeeded,
    /// Stripe refused it: the engine recorded the failure.
    Failed,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
        }
    }

    fn parse(s: &str) -> State {
        match s {
            "succeeded" => State::Succeeded,
            "failed" => State::Failed,
            _ => State::Pending,
        }
    }
}

/// Who asked for a top-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The engine's auto top-up rule (`TopUpRequested`).
    Auto,
    /// A caller, charging the saved payment method (`POST /v1/wallets/{id}/topups`).
    Manual,
    /// A caller, for a payment the customer confirms in the browser (a client secret).
    Session,
}

impl Kind {
    /// Its name in the store and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Auto => "auto",
            Kind::Manual => "manual",
            Kind::Session => "session",
        }
    }

    fn parse(s: &str) -> Kind {
        match s {
            "manual" => Kind::Manual,
            "session" => Kind::Session,
            _ => Kind::Auto,
        }
    }
}

impl State {
    /// Its name in the store and the API.
    pub fn name(self) -> &'static str {
        self.as_str()
    }
}

/// What inserting a caller's top-up found.
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    /// A new row.
    New(TopUp),
    /// The same request was made before: its row.
    Repeat(TopUp),
    /// The key was used before with another request.
    Conflict,
}

/// One requested top-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopUp {
    /// Who asked for it.
    pub kind: Kind,
    /// The Stripe idempotency key (`tally-topup:WALLET:ASSET:TRIGGER`).
    pub key: String,
    /// The wallet.
    pub wallet: String,
    /// The asset credited.
    pub asset: String,
    /// The engine's trigger number.
    pub trigger: u64,
    /// The amount credited, in the asset.
    pub amount: Decimal,
    /// The currency charged.
    pub currency: String,
    /// The charge in the currency's minor units.
    pub minor_amount: i64,
    /// The Stripe customer.
    pub customer: String,
    /// The payment method charged.
    pub payment_method: String,
    /// Where it stands.
    pub state: State,
    /// The PaymentIntent, once Stripe created one.
    pub payment_intent: Option<String>,
    /// Why it failed (a decline code).
    pub reason: Option<String>,
    /// Calls to Stripe so far.
    pub attempts: u32,
    /// Not before this time (microseconds since the epoch).
    pub next_attempt_us: i64,
    /// When the engine requested it.
    pub requested_us: i64,
}

impl TopUp {
    /// The row for an engine request.
    pub fn of(r: &TopUpRequest) -> TopUp {
        TopUp {
            kind: Kind::Auto,
            key: r.idempotency_key(),
            wallet: r.wallet.as_str().into(),
            asset: r.asset.as_str().into(),
            trigger: r.trigger,
            amount: r.amount,
            currency: r.currency.as_str().into(),
            minor_amount: r.minor_amount,
            customer: r.customer.as_str().into(),
            payment_method: r.payment_method.as_str().into(),
            state: State::Pending,
            payment_intent: None,
            reason: None,
            attempts: 0,
            next_attempt_us: r.at.0,
            requested_us: r.at.0,
        }
    }

    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<TopUp> {
        let amount: String = row.get("amount")?;
        Ok(TopUp {
            kind: Kind::parse(&row.get::<_, String>("kind")?),
            key: row.get("key")?,
            wallet: row.get("wallet")?,
            asset: row.get("asset")?,
            trigger: row.get::<_, i64>("trigger")? as u64,
            amount: Decimal::from_str(&amount).unwrap_or_default(),
            currency: row.get("currency")?,
            minor_amount: row.get("minor_amount")?,
            customer: row.get("customer")?,
            payment_method: row.get("payment_method")?,
            state: State::parse(&row.get::<_, String>("state")?),
            payment_intent: row.get("payment_intent")?,
            reason: row.get("reason")?,
            attempts: row.get::<_, i64>("attempts")? as u32,
            next_attempt_us: row.get("next_attempt_us")?,
            requested_us: row.get("requested_us")?,
        })
    }
}

fn db(e: rusqlite::Error) -> Error {
    Error(format!("payments store: {e}"))
}

/// The store, shared by the sink (on the outbound thread), the Stripe worker and the webhook
/// receiver. Each statement is short; SQLite's own locking orders writers.
#[derive(Debug, Clone)]
pub struct Payments {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl Payments {
    /// Opens (creating) `<data_dir>/payments.sqlite3`.
    pub fn open(data_dir: &Path) -> Result<Payments, Error> {
        let path = data_dir.join(FILE);
        let conn = Connection::open(&path).map_err(db)?;
        // FULL: a row is on disk before the checkpoint that relies on it is written.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=10000;",
        )
        .map_err(db)?;
        // Stores made before manual top-ups lack two columns (and their index needs them).
        let has_kind = conn
            .prepare("SELECT 1 FROM pragma_table_info('topups') WHERE name = 'kind'")
            .and_then(|mut s| s.exists([]))
            .map_err(db)?;
        let has_table = conn
            .prepare("SELECT 1 FROM sqlite_master WHERE name = 'topups'")
            .and_then(|mut s| s.exists([]))
            .map_err(db)?;
        if has_table && !has_kind {
            conn.execute_batch(
                "ALTER TABLE topups ADD COLUMN kind TEXT NOT NULL DEFAULT 'auto';
                 ALTER TABLE topups ADD COLUMN request_hash TEXT;",
            )
            .map_err(db)?;
        }
        conn.execute_batch(SCHEMA).map_err(db)?;
        conn.execute_batch(crate::webhooks::SCHEMA).map_err(db)?;
        Ok(Payments {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (statements are atomic).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts the rows that are new (by key) in one transaction; the number inserted.
    pub fn insert(&self, rows: &[TopUp]) -> Result<usize, Error> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(db)?;
        let mut inserted = 0;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO topups (key, wallet, asset, trigger, amount, currency,
                     minor_amount, customer, payment_method, state, next_attempt_us,
                     requested_us) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending', ?10, ?11)",
                )
                .map_err(db)?;
            for r in rows {
                inserted += stmt
                    .execute(params![
                        r.key,
                        r.wallet,
                        r.asset,
                        r.trigger as i64,
                        r.amount.to_string(),
                        r.currency,
                        r.minor_amount,
                        r.customer,
                        r.payment_method,
                        r.next_attempt_us,
                        r.requested_us,
                    ])
                    .map_err(db)?;
            }
        }
        tx.commit().map_err(db)?;
        Ok(inserted)
    }

    /// Inserts a caller's top-up unless its key exists: a repeat of the same request (same
    /// `request_hash`) gets the existing row, another request under the key a conflict.
    pub fn insert_manual(&self, row: &TopUp, request_hash: &str) -> Result<Inserted, Error> {
        let conn = self.lock();
        let existing = conn
            .query_row(
                "SELECT request_hash FROM topups WHERE key = ?1",
                [&row.key],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map_err(db)?;
        if let Some(hash) = existing {
            drop(conn);
            if hash.as_deref() != Some(request_hash) {
                return Ok(Inserted::Conflict);
            }
            return Ok(match self.get(&row.key)? {
                Some(found) => Inserted::Repeat(found),
                None => Inserted::Conflict,
            });
        }
        conn.execute(
            "INSERT INTO topups (key, wallet, asset, trigger, amount, currency, minor_amount,
             customer, payment_method, state, next_attempt_us, requested_us, kind, request_hash)
             VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, ?8, 'pending', ?9, ?10, ?11, ?12)",
            params![
                row.key,
                row.wallet,
                row.asset,
                row.amount.to_string(),
                row.currency,
                row.minor_amount,
                row.customer,
                row.payment_method,
                row.next_attempt_us,
                row.requested_us,
                row.kind.as_str(),
                request_hash
            ],
        )
        .map_err(db)?;
        Ok(Inserted::New(row.clone()))
    }

    /// A wallet's top-ups, newest first: at most `limit` requested before `before_us`.
    pub fn of_wallet(
        &self,
        wallet: &str,
        before_us: Option<i64>,
        limit: usize,
    ) -> Result<Vec<TopUp>, Error> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT * FROM topups WHERE wallet = ?1 AND requested_us < ?2
                 ORDER BY requested_us DESC, key DESC LIMIT ?3",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(
                params![wallet, before_us.unwrap_or(i64::MAX), limit as i64],
                TopUp::from_row,
            )
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    }

    /// Pending rows due at `now_us`, oldest first, at most `limit`.
    pub fn due(&self, now_us: i64, limit: usize) -> Result<Vec<TopUp>, Error> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT * FROM topups WHERE state = 'pending' AND next_attempt_us <= ?1
                 ORDER BY next_attempt_us LIMIT ?2",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![now_us, limit as i64], TopUp::from_row)
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    }

    /// When the next pending row is due, if any.
    pub fn next_due(&self) -> Result<Option<i64>, Error> {
        self.lock()
            .query_row(
                "SELECT MIN(next_attempt_us) FROM topups WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
            .map_err(db)
    }

    /// Pending rows (for metrics and health).
    pub fn pending(&self) -> Result<u64, Error> {
        self.lock()
            .query_row(
                "SELECT COUNT(*) FROM topups WHERE state = 'pending'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(db)
    }

    /// One row by key.
    pub fn get(&self, key: &str) -> Result<Option<TopUp>, Error> {
        self.lock()
            .query_row(
                "SELECT * FROM topups WHERE key = ?1",
                [key],
                TopUp::from_row,
            )
            .optional()
            .map_err(db)
    }

    /// The row of a PaymentIntent.
    pub fn by_intent(&self, payment_intent: &str) -> Result<Option<TopUp>, Error> {
        self.lock()
            .query_row(
                "SELECT * FROM topups WHERE payment_intent = ?1",
                [payment_intent],
                TopUp::from_row,
            )
            .optional()
            .map_err(db)
    }

    /// Records that Stripe created `payment_intent` for the row (before its outcome is known).
    pub fn set_intent(&self, key: &str, payment_intent: &str) -> Result<(), Error> {
        self.lock()
            .execute(
                "UPDATE topups SET payment_intent = ?2 WHERE key = ?1",
                params![key, payment_intent],
            )
            .map(drop)
            .map_err(db)
    }

    /// Counts an attempt and sets when to try again.
    pub fn retry_at(&self, key: &str, next_attempt_us: i64) -> Result<(), Error> {
        self.lock()
            .execute(
                "UPDATE topups SET attempts = attempts + 1, next_attempt_us = ?2 WHERE key = ?1",
                params![key, next_attempt_us],
            )
            .map(drop)
            .map_err(db)
    }

    /// Marks a row settled, once the engine has the outcome, and stores the operator's
    /// notice of it in the same transaction.
    pub fn settle(
        &self,
        key: &str,
        state: State,
        payment_intent: Option<&str>,
        reason: Option<&str>,
        now_us: i64,
        notice: Option<&Notice>,
    ) -> Result<(), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(db)?;
        tx.execute(
            "UPDATE topups SET state = ?2, payment_intent = COALESCE(?3, payment_intent),
             reason = ?4, settled_us = ?5, attempts = attempts + 1 WHERE key = ?1",
            params![key, state.as_str(), payment_intent, reason, now_us],
        )
        .map_err(db)?;
        if let Some(notice) = notice {
            crate::webhooks::notify_in(&tx, std::slice::from_ref(notice))?;
        }
        tx.commit().map_err(db)
    }

    /// Remembers a Stripe event id; false if it was seen before.
    pub fn first_sight(&self, event_id: &str, kind: &str, now_us: i64) -> Result<bool, Error> {
        self.lock()
            .execute(
                "INSERT OR IGNORE INTO stripe_events (id, type, received_us) VALUES (?1, ?2, ?3)",
                params![event_id, kind, now_us],
            )
            .map(|n| n == 1)
            .map_err(db)
    }

    /// Forgets a Stripe event id (its handling failed and Stripe will send it again).
    pub fn forget(&self, event_id: &str) -> Result<(), Error> {
        self.lock()
            .execute("DELETE FROM stripe_events WHERE id = ?1", [event_id])
            .map(drop)
            .map_err(db)
    }

    /// Records a dispute's status as of the applied event that reported it. Only moves
    /// forward: an event older than the one recorded changes nothing, so late or reordered
    /// deliveries never undo a newer state.
    pub fn dispute_status(
        &self,
        dispute: &str,
        payment_intent: &str,
        status: &str,
        event_created: i64,
    ) -> Result<(), Error> {
        self.lock()
            .execute(
                "INSERT INTO disputes (id, payment_intent, status, event_created)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET status = ?3, event_created = ?4
                 WHERE excluded.event_created > disputes.event_created",
                params![dispute, payment_intent, status, event_created],
            )
            .map(drop)
            .map_err(db)
    }

    /// When the last applied event of a dispute was made (Stripe's `created`), if any.
    pub fn dispute_applied_at(&self, dispute: &str) -> Result<Option<i64>, Error> {
        self.lock()
            .query_row(
                "SELECT event_created FROM disputes WHERE id = ?1",
                [dispute],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)
    }
}

/// The sink that writes requested top-ups to the store (see the module docs).
pub struct PaymentsSink {
    store: Payments,
    buffered: Vec<TopUp>,
    notices: Vec<Notice>,
    notify: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for PaymentsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentsSink")
            .field("store", &self.store.path)
            .field("buffered", &self.buffered.len())
            .finish()
    }
}

impl PaymentsSink {
    /// A sink over `store`; `notify` is called after a flush wrote new rows (to wake the
    /// Stripe worker).
    pub fn new(store: Payments, notify: Option<Arc<dyn Fn() + Send + Sync>>) -> PaymentsSink {
        PaymentsSink {
            store,
            buffered: Vec::new(),
            notices: Vec::new(),
            notify,
        }
    }
}

impl Sink for PaymentsSink {
    fn name(&self) -> &'static str {
        "payments"
    }

    fn write(&mut self, tagged: &Tagged) -> Result<bool, Error> {
        match &tagged.effect {
            Effect::TopUpRequested(r) => {
                self.buffered.push(TopUp::of(r));
                Ok(true)
            }
            _ => match Notice::of(tagged) {
                Some(notice) => {
                    self.notices.push(notice);
                    Ok(true)
                }
                None => Ok(false),
            },
        }
    }

    fn flush(&mut self) -> Result<(), Error> {
        if self.buffered.is_empty() && self.notices.is_empty() {
            return Ok(());
        }
        let inserted = self.store.insert(&self.buffered)? + self.store.notify(&self.notices)?;
        self.buffered.clear();
        self.notices.clear();
        if inserted > 0 {
            if let Some(notify) = &self.notify {
                notify();
            }
        }
        Ok(())
    }

    fn unflushed(&self) -> usize {
        self.buffered.len() + self.notices.len()
    }
}
