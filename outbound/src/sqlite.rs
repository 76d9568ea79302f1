//! The embedded history store: one SQLite file (`<data-dir>/history.sqlite3`) with every usage
//! event, journal entry and top-up request, written by [`SqliteSink`] and read by [`Reader`].
//!
//! Writes: each effect is one `INSERT OR IGNORE` keyed by its tag `(shard, lsn, idx)` inside a
//! transaction that [`Sink::flush`] commits, with `journal_mode=WAL` and `synchronous=FULL`, so a
//! commit is durable when flush returns and a replayed effect is ignored: exactly once. A refund's
//! journal entry also adds its amount to the refunded usage event's `refunded` column, only when
//! that entry is new. Amounts are exact decimal TEXT; times are microseconds since the epoch (UTC).
//! The same transaction records, per shard, the tag through which the store holds everything it
//! was given (`store_progress`): replayed effects at or below it are skipped in memory.
//!
//! Retention: rows older than `retention` (by the time they happened) are deleted at most once an
//! hour, in the flush transaction. The schema is in `docs/history.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use rust_decimal::Decimal;
use serde::Serialize;
use tally_engine::{Account, Command, Effect, EntryKind, Request, Timestamp};

use crate::{Error, Sink, Tagged};

/// The file name in the data directory.
pub const FILE: &str = "history.sqlite3";

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage_events (
    shard INTEGER NOT NULL, lsn INTEGER NOT NULL, idx INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    wallet TEXT NOT NULL, product TEXT NOT NULL, plan TEXT NOT NULL, plan_version INTEGER NOT NULL,
    asset TEXT NOT NULL, charged TEXT NOT NULL, revenue_usd TEXT NOT NULL, cost_usd TEXT NOT NULL,
    quantities TEXT NOT NULL, attributes TEXT NOT NULL, model TEXT,
    occurred_at INTEGER NOT NULL, applied_at INTEGER NOT NULL,
    refunded TEXT NOT NULL DEFAULT '0',
    credit_priority INTEGER, credit_expires_at INTEGER,
    PRIMARY KEY (shard, lsn, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_wallet ON usage_events (wallet, occurred_at, shard, lsn, idx);
CREATE INDEX IF NOT EXISTS usage_by_request ON usage_events (request_id);
CREATE INDEX IF NOT EXISTS usage_by_time ON usage_events (occurred_at);
CREATE TABLE IF NOT EXISTS journal (
    shard INTEGER NOT NULL, lsn INTEGER NOT NULL, idx INTEGER NOT NULL,
    seq INTEGER NOT NULL, at INTEGER NOT NULL, request_id TEXT, kind TEXT NOT NULL,
    asset TEXT NOT NULL, amount TEXT NOT NULL,
    from_account TEXT NOT NULL, to_account TEXT NOT NULL, wallet TEXT, grant_id INTEGER,
    refund_of TEXT, reason TEXT,
    PRIMARY KEY (shard, lsn, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS journal_by_wallet ON journal (wallet, at, shard, lsn, idx);
CREATE TABLE IF NOT EXISTS topups (
    shard INTEGER NOT NULL, lsn INTEGER NOT NULL, idx INTEGER NOT NULL,
    event TEXT NOT NULL, wallet TEXT NOT NULL, asset TEXT NOT NULL, amount TEXT,
    trigger_seq INTEGER, payment_method TEXT, idempotency_key TEXT, at INTEGER NOT NULL,
    PRIMARY KEY (shard, lsn, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS topups_by_wallet ON topups (wallet, at, shard, lsn, idx);
CREATE TABLE IF NOT EXISTS wallets (
    shard INTEGER NOT NULL, lsn INTEGER NOT NULL, idx INTEGER NOT NULL,
    wallet TEXT NOT NULL UNIQUE, metadata TEXT NOT NULL, created_at INTEGER NOT NULL,
    PRIMARY KEY (shard, lsn, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS export_cursor (
    sink TEXT NOT NULL, shard INTEGER NOT NULL, lsn INTEGER NOT NULL, idx INTEGER NOT NULL,
    PRIMARY KEY (sink, shard)
);
CREATE TABLE IF NOT EXISTS store_progress (
    shard INTEGER PRIMARY KEY, lsn INTEGER NOT NULL, idx INTEGER NOT NULL
);
";

/// Brings a store written by an earlier release up to [`SCHEMA`]: columns added since
/// (`usage_events.credit_priority`, `credit_expires_at`, `journal.reason`; NULL in older rows).
/// One transaction, so a writer and a reader opening the store at once do not both add them.
fn migrate(conn: &Connection) -> Result<(), Error> {
    const ADDED: [(&str, &str, &str); 3] = [
        ("usage_events", "credit_priority", "INTEGER"),
        ("usage_events", "credit_expires_at", "INTEGER"),
        ("journal", "reason", "TEXT"),
    ];
    let missing = |(table, column, _): &(&str, &str, &str)| {
        conn.query_row(
            &format!("SELECT count(*) FROM pragma_table_info('{table}') WHERE name = '{column}'"),
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n == 0)
    };
    // Without a lock first: a store already up to date (every start after the first) does not
    // wait for the writer's open transaction.
    let any_missing = ADDED
        .iter()
        .try_fold(false, |any, added| Ok(any || missing(added)?))
        .map_err(|e| sql("migrate", e))?;
    if !any_missing {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| sql("migrate", e))?;
    let altered = ADDED.iter().try_for_each(|added| {
        if missing(added)? {
            let (table, column, kind) = added;
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
        Ok(())
    });
    match altered.and_then(|()| conn.execute_batch("COMMIT")) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(sql("migrate", e))
        }
    }
}

/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

pub(crate) fn sql(what: &str, e: rusqlite::Error) -> Error {
    Error(format!("history store: {what}: {e}"))
}

pub(crate) fn open(path: &Path) -> Result<Connection, Error> {
    let conn = Connection::open(path).map_err(|e| sql(&format!("open {}", path.display()), e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| sql("busy timeout", e))?;
    Ok(conn)
}

/// The writer.
pub struct SqliteSink {
    conn: Connection,
    in_transaction: bool,
    unflushed: usize,
    /// Per shard, the tag through which the store holds every effect it was given, committed
    /// (`store_progress`): replay's effects at or below it are skipped without a statement.
    held: BTreeMap<u32, (u64, u32)>,
    /// The same, including what the open transaction holds.
    given: BTreeMap<u32, (u64, u32)>,
    retention: Option<Duration>,
    last_retention: Instant,
}

impl std::fmt::Debug for SqliteSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteSink").finish_non_exhaustive()
    }
}

/// The request id as 32 lowercase hex digits (as the HTTP API shows it).
pub fn request_hex(id: tally_engine::RequestId) -> String {
    format!("{:032x}", id.0)
}

fn account(a: &Account) -> (&'static str, Option<String>) {
    match a {
        Account::Wallet(w) => ("wallet", Some(w.as_str().to_string())),
        Account::Revenue => ("revenue", None),
        Account::TopUpClearing => ("topup_clearing", None),
        Account::Promotion => ("promotion", None),
        Account::Breakage => ("breakage", None),
        Account::Refund => ("refund", None),
        Account::Dispute => ("dispute", None),
        Account::Adjustment => ("adjustment", None),
    }
}

fn kind(k: EntryKind) -> &'static str {
    match k {
        EntryKind::Grant => "grant",
        EntryKind::Debit => "debit",
        EntryKind::Debt => "debt",
        EntryKind::Breakage => "breakage",
        EntryKind::Refund => "refund",
        EntryKind::Dispute => "dispute",
        EntryKind::DisputeWon => "dispute_won",
    }
}

fn usage_of(cause: Option<&Request>) -> Option<&tally_engine::UsageEvent> {
    match &cause?.command {
        Command::Usage(u) => Some(u),
        Command::Settle { usage, .. } => Some(usage),
        _ => None,
    }
}

impl SqliteSink {
    /// Opens (creating) the store in `data_dir`. `retention`: delete rows older than this.
    pub fn open(data_dir: &Path, retention: Option<Duration>) -> Result<SqliteSink, Error> {
        let conn = open(&data_dir.join(FILE))?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
            .map_err(|e| sql("pragmas", e))?;
        conn.execute_batch(SCHEMA).map_err(|e| sql("schema", e))?;
        migrate(&conn)?;
        let held = {
            let mut select = conn
                .prepare("SELECT shard, lsn, idx FROM store_progress")
                .map_err(|e| sql("read progress", e))?;
            let rows = select
                .query_map([], |r| {
                    Ok((r.get::<_, u32>(0)?, (r.get::<_, i64>(1)? as u64, r.get(2)?)))
                })
                .map_err(|e| sql("read progress", e))?;
            rows.collect::<Result<BTreeMap<_, _>, _>>()
                .map_err(|e| sql("read progress", e))?
        };
        Ok(SqliteSink {
            conn,
            in_transaction: false,
            unflushed: 0,
            given: held.clone(),
            held,
            retention,
            // Due at the first flush: a server restarted more often than hourly still prunes.
            last_retention: Instant::now()
                .checked_sub(RETENTION_EVERY)
                .unwrap_or_else(Instant::now),
        })
    }

    fn begin(&mut self) -> Result<(), Error> {
        if !self.in_transaction {
            self.conn
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(|e| sql("begin", e))?;
            self.in_transaction = true;
        }
        Ok(())
    }

    fn insert(&mut self, t: &Tagged) -> Result<bool, Error> {
        let (shard, lsn, idx) = (t.shard, t.lsn as i64, t.index);
        let changed = match &t.effect {
            Effect::Margin(m) => {
                let usage = usage_of(t.cause.as_deref());
                let quantities: BTreeMap<&str, String> = usage
                    .map(|u| {
                        u.quantities
                            .iter()
                            .map(|q| (q.dimension.as_str(), q.value.to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let attributes: BTreeMap<&str, &str> = usage
                    .map(|u| {
                        u.attributes
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect()
                    })
                    .unwrap_or_default();
                let model = attributes.get("model").map(|m| m.to_string());
                self.conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO usage_events (shard, lsn, idx, request_id, wallet, \
                         product, plan, plan_version, asset, charged, revenue_usd, cost_usd, \
                         quantities, attributes, model, occurred_at, applied_at, credit_priority, \
                         credit_expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, \
                         ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            shard,
                            lsn,
                            idx,
                            request_hex(m.request),
                            m.wallet.as_str(),
                            m.product.as_str(),
                            m.plan.as_str(),
                            m.version,
                            m.asset.as_str(),
                            m.charged.to_string(),
                            m.revenue_usd.to_string(),
                            m.cost_usd.to_string(),
                            serde_json::to_string(&quantities).unwrap_or_default(),
                            serde_json::to_string(&attributes).unwrap_or_default(),
                            model,
                            m.occurred_at.0,
                            t.applied_at.0,
                            m.credit_priority,
                            m.credit_expires_at.map(|t| t.0),
                        ])
                    })
                    .map_err(|e| sql("insert usage", e))?
            }
            Effect::Journal(j) => {
                let (from, from_wallet) = account(&j.from);
                let (to, to_wallet) = account(&j.to);
                let wallet = from_wallet.or(to_wallet);
                let refund_of = match t.cause.as_deref().map(|c| &c.command) {
                    Some(Command::Refund { event, .. }) if j.from == Account::Refund => {
                        Some(request_hex(*event))
                    }
                    _ => None,
                };
                // An adjustment's reason is kept here, with its entry: the engine keeps only a
                // wallet's latest few.
                let reason = match t.cause.as_deref().map(|c| &c.command) {
                    Some(Command::Adjust { reason, .. }) => Some(reason.as_str()),
                    _ => None,
                };
                let n = self
                    .conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO journal (shard, lsn, idx, seq, at, request_id, kind, \
                         asset, amount, from_account, to_account, wallet, grant_id, refund_of, \
                         reason) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            shard,
                            lsn,
                            idx,
                            j.seq as i64,
                            j.at.0,
                            j.request.map(request_hex),
                            kind(j.kind),
                            j.asset.as_str(),
                            j.amount.to_string(),
                            from,
                            to,
                            wallet,
                            j.grant.map(|g| g.0 as i64),
                            refund_of,
                            reason,
                        ])
                    })
                    .map_err(|e| sql("insert journal", e))?;
                if let (1, Some(event)) = (n, &refund_of) {
                    self.add_refunded(event, j.amount)?;
                }
                n
            }
            Effect::TopUpRequested(r) => self
                .conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO topups (shard, lsn, idx, event, wallet, asset, amount, \
                     trigger_seq, payment_method, idempotency_key, at) VALUES \
                     (?1, ?2, ?3, 'requested', ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        shard,
                        lsn,
                        idx,
                        r.wallet.as_str(),
                        r.asset.as_str(),
                        r.amount.to_string(),
                        r.trigger as i64,
                        r.payment_method.as_str(),
                        r.idempotency_key(),
                        r.at.0,
                    ])
                })
                .map_err(|e| sql("insert top-up", e))?,
            Effect::WalletCreated { wallet } => {
                let metadata: BTreeMap<&str, &str> = match t.cause.as_deref().map(|c| &c.command) {
                    Some(Command::CreateWallet(c)) => c
                        .metadata
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect(),
                    _ => BTreeMap::new(),
                };
                self.conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO wallets (shard, lsn, idx, wallet, metadata, \
                         created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            shard,
                            lsn,
                            idx,
                            wallet.as_str(),
                            serde_json::to_string(&metadata).unwrap_or_default(),
                            t.applied_at.0
                        ])
                    })
                    .map_err(|e| sql("insert wallet", e))?
            }
            Effect::TopUpExhausted { wallet, asset } => self
                .conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO topups (shard, lsn, idx, event, wallet, asset, at) \
                     VALUES (?1, ?2, ?3, 'exhausted', ?4, ?5, ?6)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        shard,
                        lsn,
                        idx,
                        wallet.as_str(),
                        asset.as_str(),
                        t.applied_at.0
                    ])
                })
                .map_err(|e| sql("insert top-up", e))?,
            // Notices for the operator: the payments store keeps them (webhooks out).
            Effect::WalletFrozen { .. }
            | Effect::BalanceAlert { .. }
            | Effect::GrantExpiring { .. } => return Ok(false),
        };
        Ok(changed == 1)
    }

    fn add_refunded(&mut self, request: &str, amount: Decimal) -> Result<(), Error> {
        let current: Option<String> = self
            .conn
            .prepare_cached("SELECT refunded FROM usage_events WHERE request_id = ?1")
            .and_then(|mut s| s.query_row([request], |r| r.get(0)).optional())
            .map_err(|e| sql("read refunded", e))?;
        // The event may be older than the retention: then there is nothing to update.
        if let Some(current) = current {
            let current = Decimal::from_str(&current)
                .map_err(|e| Error(format!("history store: refunded {current:?}: {e}")))?;
            let total = current
                .checked_add(amount)
                .ok_or_else(|| Error("history store: refunded total overflows".into()))?;
            self.conn
                .prepare_cached("UPDATE usage_events SET refunded = ?1 WHERE request_id = ?2")
                .and_then(|mut s| s.execute(params![total.to_string(), request]))
                .map_err(|e| sql("update refunded", e))?;
        }
        Ok(())
    }

    fn retain(&mut self) -> Result<(), Error> {
        let Some(retention) = self.retention else {
            return Ok(());
        };
        if self.last_retention.elapsed() < RETENTION_EVERY {
            return Ok(());
        }
        self.last_retention = Instant::now();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        let cutoff = now - retention.as_micros() as i64;
        for (table, column) in [
            ("usage_events", "occurred_at"),
            ("journal", "at"),
            ("topups", "at"),
        ] {
            // Rows an export (PostgreSQL) has not copied yet stay, whatever their age.
            self.conn
                .execute(
                    &format!(
                        "DELETE FROM {table} WHERE {column} < ?1 AND NOT EXISTS (\
                         SELECT 1 FROM export_cursor c WHERE c.shard = {table}.shard \
                         AND (c.lsn, c.idx) < ({table}.lsn, {table}.idx))"
                    ),
                    [cutoff],
                )
                .map_err(|e| sql("retention", e))?;
        }
        Ok(())
    }
}

impl Sink for SqliteSink {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn write(&mut self, tagged: &Tagged) -> Result<bool, Error> {
        if self
            .held
            .get(&tagged.shard)
            .is_some_and(|&p| tagged.position() <= p)
        {
            return Ok(false);
        }
        self.begin()?;
        let new = self.insert(tagged)?;
        self.given.insert(tagged.shard, tagged.position());
        // Counted whether new or not: the open transaction holds the write lock until flushed,
        // so a run of replayed duplicates must be committed (ended) like new rows.
        self.unflushed += 1;
        Ok(new)
    }

    fn flush(&mut self) -> Result<(), Error> {
        if !self.in_transaction {
            return Ok(());
        }
        self.retain()?;
        for (&shard, &(lsn, idx)) in &self.given {
            if self.held.get(&shard) != Some(&(lsn, idx)) {
                self.conn
                    .execute(
                        "INSERT OR REPLACE INTO store_progress (shard, lsn, idx) \
                         VALUES (?1, ?2, ?3)",
                        rusqlite::params![shard, lsn as i64, idx],
                    )
                    .map_err(|e| sql("progress", e))?;
            }
        }
        self.conn
            .execute_batch("COMMIT")
            .map_err(|e| sql("commit", e))?;
        self.held.clone_from(&self.given);
        self.in_transaction = false;
        self.unflushed = 0;
        Ok(())
    }

    fn unflushed(&self) -> usize {
        self.unflushed
    }
}

/// Decimals are written as exact strings without trailing zeros, like the HTTP API's.
fn normalized<S: serde::Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&d.normalize())
}

fn normalized_option<S: serde::Serializer>(d: &Option<Decimal>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.collect_str(&d.normalize()),
        None => s.serialize_none(),
    }
}

// ----- reading --------------------------------------------------------------------------------

/// A usage event as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct UsageRow {
    /// The request id of the usage or settle (32 hex digits).
    pub request_id: String,
    /// The wallet.
    pub wallet: String,
    /// The product.
    pub product: String,
    /// The plan that priced it.
    pub plan: String,
    /// Its version.
    pub plan_version: u32,
    /// The asset charged.
    pub asset: String,
    /// The charge, in the asset.
    #[serde(serialize_with = "normalized")]
    #[schema(value_type = String)]
    pub charged: Decimal,
    /// The charge in USD.
    #[serde(serialize_with = "normalized")]
    #[schema(value_type = String)]
    pub revenue_usd: Decimal,
    /// What it cost the seller, in USD.
    #[serde(serialize_with = "normalized")]
    #[schema(value_type = String)]
    pub cost_usd: Decimal,
    /// Refunded so far, in the asset.
    #[serde(serialize_with = "normalized")]
    #[schema(value_type = String)]
    pub refunded: Decimal,
    /// Quantities per dimension.
    #[schema(value_type = BTreeMap<String, String>)]
    pub quantities: BTreeMap<String, String>,
    /// Attributes.
    pub attributes: BTreeMap<String, String>,
    /// When it happened (RFC 3339).
    pub occurred_at: String,
    /// When tally applied it (RFC 3339).
    pub applied_at: String,
}

/// A journal entry of a wallet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TransactionRow {
    /// Shard-local sequence number.
    pub seq: u64,
    /// When (RFC 3339).
    pub at: String,
    /// The request that caused it (absent for expiries).
    pub request_id: Option<String>,
    /// grant, debit, debt, breakage, refund, dispute or dispute_won.
    pub kind: String,
    /// The asset.
    pub asset: String,
    /// The amount moved (positive).
    #[serde(serialize_with = "normalized")]
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// The account that lost it (`wallet` is the wallet itself).
    pub from: String,
    /// The account that gained it.
    pub to: String,
    /// The grant concerned.
    pub grant_id: Option<u64>,
    /// For an adjustment: the reason the operator gave.
    pub reason: Option<String>,
}

/// A top-up request of a wallet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TopUpRow {
    /// `requested`, or `exhausted` (the rule gave up after its attempts).
    pub event: String,
    /// The asset.
    pub asset: String,
    /// The amount requested.
    #[serde(serialize_with = "normalized_option")]
    #[schema(value_type = Option<String>)]
    pub amount: Option<Decimal>,
    /// The trigger's sequence number.
    pub trigger: Option<u64>,
    /// The payment method.
    pub payment_method: Option<String>,
    /// The payment processor's idempotency key.
    pub idempotency_key: Option<String>,
    /// When (RFC 3339).
    pub at: String,
}

/// What a history page asks for.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The wallet.
    pub wallet: String,
    /// At or after.
    pub from: Option<Timestamp>,
    /// Before.
    pub to: Option<Timestamp>,
    /// Usage only: the product.
    pub product: Option<String>,
    /// Usage only: the `model` attribute.
    pub model: Option<String>,
    /// Continue after this cursor (from the previous page).
    pub cursor: Option<Cursor>,
    /// Most rows.
    pub limit: u32,
}

/// A position in a newest-first listing: the row's time and tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The time.
    pub at: i64,
    /// The shard.
    pub shard: u32,
    /// The LSN.
    pub lsn: i64,
    /// The index.
    pub idx: u32,
}

impl Cursor {
    /// The opaque text form.
    pub fn encode(&self) -> String {
        format!("h{}.{}.{}.{}", self.at, self.shard, self.lsn, self.idx)
    }

    /// Parses [`Cursor::encode`]'s form.
    pub fn decode(text: &str) -> Option<Cursor> {
        let mut parts = text.strip_prefix('h')?.split('.');
        let cursor = Cursor {
            at: parts.next()?.parse().ok()?,
            shard: parts.next()?.parse().ok()?,
            lsn: parts.next()?.parse().ok()?,
            idx: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(cursor)
    }
}

/// A page of rows, newest first.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The rows.
    pub rows: Vec<T>,
    /// The cursor of the next page, if there may be more.
    pub next: Option<Cursor>,
}

/// Reads the store (its own connection; SQLite's WAL mode lets it read while the sink writes).
pub struct Reader {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("path", &self.path).finish()
    }
}

fn decimal(text: String) -> rusqlite::Result<Decimal> {
    Decimal::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn time(us: i64) -> String {
    Timestamp(us).to_rfc3339()
}

/// `AND`-ed conditions and their parameters for a page query over `table` keyed by `at_column`.
fn page_conditions(filter: &Filter, at_column: &str) -> (String, Vec<Box<dyn rusqlite::ToSql>>) {
    let mut sql = String::from("wallet = ?");
    let mut values: Vec<Box<dyn rusqlite::ToSql>> = vec![Box::new(filter.wallet.clone())];
    if let Some(from) = filter.from {
        sql += &format!(" AND {at_column} >= ?");
        values.push(Box::new(from.0));
    }
    if let Some(to) = filter.to {
        sql += &format!(" AND {at_column} < ?");
        values.push(Box::new(to.0));
    }
    if let Some(c) = filter.cursor {
        sql += &format!(" AND ({at_column}, shard, lsn, idx) < (?, ?, ?, ?)");
        values.push(Box::new(c.at));
        values.push(Box::new(c.shard));
        values.push(Box::new(c.lsn));
        values.push(Box::new(c.idx));
    }
    (sql, values)
}

impl Reader {
    /// Opens the store of `data_dir` for reading (creating the schema if the sink has not yet).
    pub fn open(data_dir: &Path) -> Result<Reader, Error> {
        let path = data_dir.join(FILE);
        let conn = open(&path)?;
        conn.execute_batch("PRAGMA journal_mode=WAL;")
            .map_err(|e| sql("pragmas", e))?;
        conn.execute_batch(SCHEMA).map_err(|e| sql("schema", e))?;
        migrate(&conn)?;
        Ok(Reader {
            conn: Mutex::new(conn),
            path,
        })
    }

    fn query<T>(
        &self,
        table: &str,
        columns: &str,
        at_column: &str,
        extra: Option<(String, Vec<Box<dyn rusqlite::ToSql>>)>,
        filter: &Filter,
        row: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Page<T>, Error> {
        let (mut conditions, mut values) = page_conditions(filter, at_column);
        if let Some((more, more_values)) = extra {
            conditions += &more;
            values.extend(more_values);
        }
        let limit = filter.limit.clamp(1, 1000);
        let text = format!(
            "SELECT {columns}, {at_column}, shard, lsn, idx FROM {table} WHERE {conditions} \
             ORDER BY {at_column} DESC, shard DESC, lsn DESC, idx DESC LIMIT {}",
            limit + 1
        );
        let conn = self
            .conn
            .lock()
            .map_err(|_| Error("history store: a reader panicked".into()))?;
        let mut statement = conn.prepare_cached(&text).map_err(|e| sql("prepare", e))?;
        let n = columns.split(',').count();
        let mut rows = Vec::new();
        let mut last = None;
        let mut result = statement
            .query(rusqlite::params_from_iter(values.iter()))
            .map_err(|e| sql("query", e))?;
        while let Some(r) = result.next().map_err(|e| sql("query", e))? {
            if rows.len() == limit as usize {
                return Ok(Page { rows, next: last });
            }
            rows.push(row(r).map_err(|e| sql("read row", e))?);
            last = Some(Cursor {
                at: r.get(n).map_err(|e| sql("read row", e))?,
                shard: r.get(n + 1).map_err(|e| sql("read row", e))?,
                lsn: r.get(n + 2).map_err(|e| sql("read row", e))?,
                idx: r.get(n + 3).map_err(|e| sql("read row", e))?,
            });
        }
        Ok(Page { rows, next: None })
    }

    /// The charge of wallet `wallet`'s usage event (or settle) `request`, as the store recorded
    /// it, for refund `refund` past the idempotency window. `None` when the store cannot vouch
    /// for one charge: no such event; two (the id was reused after the window); one recorded
    /// before the store kept a charge's credit terms; or `refund` itself already applied (its
    /// journal entry is here), so that a refund retried after its own id was forgotten is not
    /// applied again. `refundable_until` is the event's time plus `window_us`.
    pub fn recorded_charge(
        &self,
        wallet: &str,
        request: tally_engine::RequestId,
        refund: tally_engine::RequestId,
        window_us: i64,
    ) -> Result<Option<tally_engine::RecordedCharge>, Error> {
        type Row = (
            String,
            String,
            String,
            String,
            u32,
            i64,
            i64,
            Option<u32>,
            Option<i64>,
        );
        let conn = self
            .conn
            .lock()
            .map_err(|_| Error("history store lock".into()))?;
        let rows: Vec<Row> = conn
            .prepare_cached(
                "SELECT asset, charged, product, plan, plan_version, occurred_at, applied_at, \
                 credit_priority, credit_expires_at FROM usage_events \
                 WHERE request_id = ?1 AND wallet = ?2 LIMIT 2",
            )
            .and_then(|mut s| {
                s.query_map(params![request_hex(request), wallet], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                    ))
                })?
                .collect()
            })
            .map_err(|e| sql("recorded charge", e))?;
        let Ok([(asset, charged, product, plan, version, occurred, applied, priority, expires)]) =
            <[Row; 1]>::try_from(rows)
        else {
            return Ok(None);
        };
        let Some(priority) = priority else {
            return Ok(None);
        };
        let applied_before: bool = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM journal WHERE request_id = ?1 AND wallet = ?2)",
            )
            .and_then(|mut s| s.query_row(params![request_hex(refund), wallet], |r| r.get(0)))
            .map_err(|e| sql("recorded charge", e))?;
        if applied_before {
            return Ok(None);
        }
        let bad = |what: &str| Error(format!("history store: usage event {what} is unreadable"));
        let name = |s: &str, what: &str| tally_engine::Name::new(s).map_err(|_| bad(what));
        Ok(Some(tally_engine::RecordedCharge {
            asset: tally_engine::AssetCode::new(&asset).map_err(|_| bad("asset"))?,
            charged: Decimal::from_str(&charged).map_err(|_| bad("charged"))?,
            product: name(&product, "product")?,
            plan: name(&plan, "plan")?,
            version,
            occurred_at: Timestamp(occurred),
            applied_at: Timestamp(applied),
            credit_priority: priority,
            credit_expires_at: expires.map(Timestamp),
            refundable_until: Timestamp(occurred.saturating_add(window_us)),
        }))
    }

    /// A wallet's usage events, newest first.
    pub fn usage(&self, filter: &Filter) -> Result<Page<UsageRow>, Error> {
        let mut extra = String::new();
        let mut values: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        if let Some(p) = &filter.product {
            extra += " AND product = ?";
            values.push(Box::new(p.clone()));
        }
        if let Some(m) = &filter.model {
            extra += " AND model = ?";
            values.push(Box::new(m.clone()));
        }
        self.query(
            "usage_events",
            "request_id, wallet, product, plan, plan_version, asset, charged, revenue_usd, \
             cost_usd, refunded, quantities, attributes, applied_at",
            "occurred_at",
            Some((extra, values)),
            filter,
            |r| {
                let json = |i: usize| -> rusqlite::Result<BTreeMap<String, String>> {
                    let text: String = r.get(i)?;
                    serde_json::from_str(&text).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            i,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })
                };
                Ok(UsageRow {
                    request_id: r.get(0)?,
                    wallet: r.get(1)?,
                    product: r.get(2)?,
                    plan: r.get(3)?,
                    plan_version: r.get(4)?,
                    asset: r.get(5)?,
                    charged: decimal(r.get(6)?)?,
                    revenue_usd: decimal(r.get(7)?)?,
                    cost_usd: decimal(r.get(8)?)?,
                    refunded: decimal(r.get(9)?)?,
                    quantities: json(10)?,
                    attributes: json(11)?,
                    applied_at: time(r.get(12)?),
                    occurred_at: time(r.get(13)?),
                })
            },
        )
    }

    /// A wallet's journal entries, newest first.
    pub fn transactions(&self, filter: &Filter) -> Result<Page<TransactionRow>, Error> {
        self.query(
            "journal",
            "seq, request_id, kind, asset, amount, from_account, to_account, grant_id, reason",
            "at",
            None,
            filter,
            |r| {
                Ok(TransactionRow {
                    seq: r.get::<_, i64>(0)? as u64,
                    request_id: r.get(1)?,
                    kind: r.get(2)?,
                    asset: r.get(3)?,
                    amount: decimal(r.get(4)?)?,
                    from: r.get(5)?,
                    to: r.get(6)?,
                    grant_id: r.get::<_, Option<i64>>(7)?.map(|g| g as u64),
                    reason: r.get(8)?,
                    at: time(r.get(9)?),
                })
            },
        )
    }

    /// A wallet's top-up requests, newest first.
    pub fn topups(&self, filter: &Filter) -> Result<Page<TopUpRow>, Error> {
        self.query(
            "topups",
            "event, asset, amount, trigger_seq, payment_method, idempotency_key",
            "at",
            None,
            filter,
            |r| {
                Ok(TopUpRow {
                    event: r.get(0)?,
                    asset: r.get(1)?,
                    amount: r.get::<_, Option<String>>(2)?.map(decimal).transpose()?,
                    trigger: r.get::<_, Option<i64>>(3)?.map(|t| t as u64),
                    payment_method: r.get(4)?,
                    idempotency_key: r.get(5)?,
                    at: time(r.get(6)?),
                })
            },
        )
    }

    /// Counts per table (for tests and `tally health`).
    pub fn counts(&self) -> Result<(u64, u64, u64), Error> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| Error("history store: a reader panicked".into()))?;
        let count = |table: &str| -> Result<u64, Error> {
            conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(|e| sql("count", e))
        };
        Ok((count("usage_events")?, count("journal")?, count("topups")?))
    }
}

// ----- analytics ------------------------------------------------------------------------------

/// How margin analytics group usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    /// Per wallet.
    Wallet,
    /// Per product.
    Product,
    /// Per plan and version (`plan@version`).
    Plan,
    /// Per `model` attribute (`-` when absent).
    Model,
    /// Per UTC hour of `occurred_at` (RFC 3339 of the hour's start).
    Hour,
    /// Per UTC day of `occurred_at`.
    Day,
    /// Per value of one wallet metadata key (`-` when the wallet has none).
    Metadata(String),
}

impl FromStr for GroupBy {
    type Err = String;

    fn from_str(s: &str) -> Result<GroupBy, String> {
        Ok(match s {
            "wallet" => GroupBy::Wallet,
            "product" => GroupBy::Product,
            "plan" => GroupBy::Plan,
            "model" => GroupBy::Model,
            "hour" => GroupBy::Hour,
            "day" => GroupBy::Day,
            other => match other.strip_prefix("metadata:") {
                Some(key) if !key.is_empty() && key.len() <= 64 => GroupBy::Metadata(key.into()),
                _ => {
                    return Err(format!(
                        "{other:?} is not wallet, product, plan, model, hour, day or \
                         metadata:<key>"
                    ))
                }
            },
        })
    }
}

/// Margin of one group, in USD, exact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct MarginGroup {
    /// The group's key (a wallet, product, `plan@version`, model, or an hour or day).
    pub key: String,
    /// Priced events.
    pub events: u64,
    /// Revenue net of refunds.
    #[serde(serialize_with = "normalized")]
    #[schema(value_type = String)]
    pub revenue_usd: Decimal,
    /// Vendor cost.
    #[serde(serialize_with = "normalized")]
    #[schema(value_type = String)]
    pub cost_usd: Decimal,
    /// Refunds (valued at the event's own rate: revenue / charge).
    #[serde(serialize_with = "normalized")]
    #[schema(value_type = String)]
    pub refunded_usd: Decimal,
    /// Revenue − cost.
    #[serde(serialize_with = "normalized")]
    #[schema(value_type = String)]
    pub margin_usd: Decimal,
}

/// How groups are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Lowest margin first: who costs more than they pay.
    Margin,
    /// Highest revenue first.
    Revenue,
    /// Highest cost first.
    Cost,
    /// By key (time series).
    Key,
}

impl FromStr for Order {
    type Err = String;

    fn from_str(s: &str) -> Result<Order, String> {
        Ok(match s {
            "margin" => Order::Margin,
            "revenue" => Order::Revenue,
            "cost" => Order::Cost,
            "key" => Order::Key,
            other => return Err(format!("{other:?} is not margin, revenue, cost or key")),
        })
    }
}

/// One priced usage event as recorded, to price it again (a draft test).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The wallet.
    pub wallet: String,
    /// The product.
    pub product: String,
    /// Quantities per dimension.
    pub quantities: BTreeMap<String, String>,
    /// Attributes.
    pub attributes: BTreeMap<String, String>,
    /// What it cost the seller.
    pub cost_usd: Decimal,
    /// When it happened.
    pub occurred_at: Timestamp,
}

impl Reader {
    /// The usage priced by `plan` that happened in `[from, to)`, oldest first; `None` if there
    /// are more than `max`.
    pub fn recorded(
        &self,
        plan: &str,
        from: Timestamp,
        to: Timestamp,
        max: usize,
    ) -> Result<Option<Vec<Recorded>>, Error> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| Error("history store: a reader panicked".into()))?;
        let mut statement = conn
            .prepare_cached(
                "SELECT wallet, product, quantities, attributes, cost_usd, occurred_at \
                 FROM usage_events WHERE plan = ?1 AND occurred_at >= ?2 AND occurred_at < ?3 \
                 ORDER BY occurred_at LIMIT ?4",
            )
            .map_err(|e| sql("prepare", e))?;
        let mut rows = statement
            .query(params![plan, from.0, to.0, max as i64 + 1])
            .map_err(|e| sql("query", e))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(|e| sql("query", e))? {
            if out.len() == max {
                return Ok(None);
            }
            let read = |e| sql("read row", e);
            let map = |text: String| -> Result<BTreeMap<String, String>, Error> {
                serde_json::from_str(&text)
                    .map_err(|e| Error(format!("history store: a stored map: {e}")))
            };
            out.push(Recorded {
                wallet: r.get(0).map_err(read)?,
                product: r.get(1).map_err(read)?,
                quantities: map(r.get(2).map_err(read)?)?,
                attributes: map(r.get(3).map_err(read)?)?,
                cost_usd: decimal(r.get(4).map_err(read)?).map_err(read)?,
                occurred_at: Timestamp(r.get(5).map_err(read)?),
            });
        }
        Ok(Some(out))
    }

    /// What one wallet spent per UTC day and asset over usage that happened in `[from, to)`:
    /// `(day start, asset, charged − refunded)`, summed exactly, oldest day first.
    pub fn spend_per_day(
        &self,
        wallet: &str,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<(Timestamp, String, Decimal)>, Error> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| Error("history store: a reader panicked".into()))?;
        let mut statement = conn
            .prepare_cached(
                "SELECT occurred_at, asset, charged, refunded FROM usage_events \
                 WHERE wallet = ?1 AND occurred_at >= ?2 AND occurred_at < ?3",
            )
            .map_err(|e| sql("prepare", e))?;
        let mut rows = statement
            .query(params![wallet, from.0, to.0])
            .map_err(|e| sql("query", e))?;
        let mut days: BTreeMap<(i64, String), Decimal> = BTreeMap::new();
        while let Some(r) = rows.next().map_err(|e| sql("query", e))? {
            let read = |e| sql("read row", e);
            let at: i64 = r.get(0).map_err(read)?;
            let asset: String = r.get(1).map_err(read)?;
            let charged = decimal(r.get(2).map_err(read)?).map_err(read)?;
            let refunded = decimal(r.get(3).map_err(read)?).map_err(read)?;
            let day = at.div_euclid(Timestamp::DAY_US) * Timestamp::DAY_US;
            let sum = days.entry((day, asset)).or_default();
            *sum = sum
                .checked_add(charged - refunded)
                .ok_or_else(|| Error("history store: a spend sum overflows".into()))?;
        }
        Ok(days
            .into_iter()
            .map(|((day, asset), sum)| (Timestamp(day), asset, sum))
            .collect())
    }

    /// Margin per group over usage that happened in `[from, to)`, exact decimals summed in
    /// Rust (SQLite would sum the TEXT amounts as floats). At most `limit` groups.
    pub fn margin(
        &self,
        group_by: GroupBy,
        from: Option<Timestamp>,
        to: Option<Timestamp>,
        order: Order,
        limit: u32,
    ) -> Result<Vec<MarginGroup>, Error> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| Error("history store: a reader panicked".into()))?;
        let mut statement = conn
            .prepare_cached(
                "SELECT u.wallet, u.product, u.plan, u.plan_version, u.model, u.occurred_at, \
                 u.charged, u.revenue_usd, u.cost_usd, u.refunded, \
                 json_extract(w.metadata, '$.' || json_quote(?3)) \
                 FROM usage_events u LEFT JOIN wallets w ON w.wallet = u.wallet \
                 WHERE u.occurred_at >= ?1 AND u.occurred_at < ?2",
            )
            .map_err(|e| sql("prepare", e))?;
        let metadata_key = match &group_by {
            GroupBy::Metadata(key) => key.clone(),
            _ => String::new(),
        };
        let mut rows = statement
            .query(params![
                from.map_or(i64::MIN, |t| t.0),
                to.map_or(i64::MAX, |t| t.0),
                metadata_key
            ])
            .map_err(|e| sql("query", e))?;
        let mut groups: BTreeMap<String, MarginGroup> = BTreeMap::new();
        let overflow = || Error("history store: a margin sum overflows".into());
        while let Some(r) = rows.next().map_err(|e| sql("query", e))? {
            let read = |e| sql("read row", e);
            let occurred: i64 = r.get(5).map_err(read)?;
            let key = match &group_by {
                GroupBy::Wallet => r.get::<_, String>(0).map_err(read)?,
                GroupBy::Product => r.get::<_, String>(1).map_err(read)?,
                GroupBy::Plan => format!(
                    "{}@{}",
                    r.get::<_, String>(2).map_err(read)?,
                    r.get::<_, i64>(3).map_err(read)?
                ),
                GroupBy::Model => r
                    .get::<_, Option<String>>(4)
                    .map_err(read)?
                    .unwrap_or_else(|| "-".into()),
                GroupBy::Hour => {
                    Timestamp(occurred.div_euclid(Timestamp::HOUR_US) * Timestamp::HOUR_US)
                        .to_rfc3339()
                }
                GroupBy::Day => {
                    Timestamp(occurred.div_euclid(Timestamp::DAY_US) * Timestamp::DAY_US)
                        .to_rfc3339()
                }
                GroupBy::Metadata(_) => r
                    .get::<_, Option<String>>(10)
                    .map_err(read)?
                    .unwrap_or_else(|| "-".into()),
            };
            let charged = decimal(r.get(6).map_err(read)?).map_err(read)?;
            let revenue = decimal(r.get(7).map_err(read)?).map_err(read)?;
            let cost = decimal(r.get(8).map_err(read)?).map_err(read)?;
            let refunded = decimal(r.get(9).map_err(read)?).map_err(read)?;
            let refunded_usd = if refunded.is_zero() || charged.is_zero() {
                Decimal::ZERO
            } else {
                (refunded * revenue / charged).round_dp(12)
            };
            let g = groups.entry(key.clone()).or_insert_with(|| MarginGroup {
                key,
                events: 0,
                revenue_usd: Decimal::ZERO,
                cost_usd: Decimal::ZERO,
                refunded_usd: Decimal::ZERO,
                margin_usd: Decimal::ZERO,
            });
            g.events += 1;
            g.revenue_usd = g
                .revenue_usd
                .checked_add(revenue - refunded_usd)
                .ok_or_else(overflow)?;
            g.cost_usd = g.cost_usd.checked_add(cost).ok_or_else(overflow)?;
            g.refunded_usd = g
                .refunded_usd
                .checked_add(refunded_usd)
                .ok_or_else(overflow)?;
        }
        let mut groups: Vec<MarginGroup> = groups
            .into_values()
            .map(|mut g| {
                g.margin_usd = g.revenue_usd - g.cost_usd;
                g
            })
            .collect();
        match order {
            Order::Margin => groups.sort_by_key(|g| g.margin_usd),
            Order::Revenue => groups.sort_by_key(|g| std::cmp::Reverse(g.revenue_usd)),
            Order::Cost => groups.sort_by_key(|g| std::cmp::Reverse(g.cost_usd)),
            Order::Key => {}
        }
        groups.truncate(limit.clamp(1, 10_000) as usize);
        Ok(groups)
    }
}
