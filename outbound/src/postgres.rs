//! The PostgreSQL export for production: the history store's rows copied into a PostgreSQL
//! database (schema `tally`, the same tables with `numeric` amounts, `timestamptz` times and
//! `jsonb` quantities), exactly once, by a thread of its own.
//!
//! It tails the SQLite store rather than the effect queue, so a slow or stopped PostgreSQL never
//! holds up the shards: the backlog is the SQLite file on disk (retention keeps every row not yet
//! exported), and the lag is in `/metrics`. Per shard it reads the next rows of the three tables
//! in tag order up to a common tag (the store holds a prefix of each shard's effects, because the
//! outbound thread writes them in order and commits atomically), inserts them and moves its
//! cursor `tally.export_progress` **in the same PostgreSQL transaction**, so a crash on either
//! side re-sends exactly what was not committed, and `ON CONFLICT DO NOTHING` on the tags makes a
//! repeat harmless. A refund's journal row adds its amount to the refunded event's `refunded`
//! when (and only when) it is inserted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::params;

use crate::sqlite::{self, sql};
use crate::Error;

/// Rows read per table per round.
const ROWS_PER_ROUND: usize = 2000;

const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS tally;
CREATE TABLE IF NOT EXISTS tally.usage_events (
    shard integer NOT NULL, lsn bigint NOT NULL, idx integer NOT NULL,
    request_id text NOT NULL, wallet text NOT NULL, product text NOT NULL, plan text NOT NULL,
    plan_version integer NOT NULL, asset text NOT NULL, charged numeric NOT NULL,
    revenue_usd numeric NOT NULL, cost_usd numeric NOT NULL, quantities jsonb NOT NULL,
    attributes jsonb NOT NULL, model text, occurred_at timestamptz NOT NULL,
    applied_at timestamptz NOT NULL, refunded numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (shard, lsn, idx)
);
CREATE INDEX IF NOT EXISTS usage_by_wallet ON tally.usage_events (wallet, occurred_at);
CREATE INDEX IF NOT EXISTS usage_by_request ON tally.usage_events (request_id);
CREATE TABLE IF NOT EXISTS tally.journal (
    shard integer NOT NULL, lsn bigint NOT NULL, idx integer NOT NULL,
    seq bigint NOT NULL, at timestamptz NOT NULL, request_id text, kind text NOT NULL,
    asset text NOT NULL, amount numeric NOT NULL, from_account text NOT NULL,
    to_account text NOT NULL, wallet text, grant_id bigint, refund_of text,
    PRIMARY KEY (shard, lsn, idx)
);
CREATE INDEX IF NOT EXISTS journal_by_wallet ON tally.journal (wallet, at);
ALTER TABLE tally.journal ADD COLUMN IF NOT EXISTS reason text;
CREATE TABLE IF NOT EXISTS tally.topups (
    shard integer NOT NULL, lsn bigint NOT NULL, idx integer NOT NULL,
    event text NOT NULL, wallet text NOT NULL, asset text NOT NULL, amount numeric,
    trigger_seq bigint, payment_method text, idempotency_key text, at timestamptz NOT NULL,
    PRIMARY KEY (shard, lsn, idx)
);
CREATE TABLE IF NOT EXISTS tally.wallets (
    shard integer NOT NULL, lsn bigint NOT NULL, idx integer NOT NULL,
    wallet text NOT NULL UNIQUE, metadata jsonb NOT NULL, created_at timestamptz NOT NULL,
    PRIMARY KEY (shard, lsn, idx)
);
CREATE TABLE IF NOT EXISTS tally.export_progress (
    shard integer PRIMARY KEY, lsn bigint NOT NULL, idx integer NOT NULL
);
";

/// A running exporter.
#[derive(Debug)]
pub struct PostgresExport {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    lag: Arc<crate::Lag>,
}

impl PostgresExport {
    /// Starts copying `data_dir`'s history store (of `shards` shards) to `url`. Connection
    /// failures are retried with backoff for as long as it runs; they are logged and counted.
    pub fn start(url: &str, data_dir: &Path, shards: u32) -> Result<PostgresExport, Error> {
        let config: postgres::Config = url
            .parse()
            .map_err(|e| Error(format!("export_postgres: not a PostgreSQL URL: {e}")))?;
        let store = data_dir.join(sqlite::FILE);
        // Prepared already (the usual case, see `prepare`): then nothing is written here, so a
        // busy history writer cannot make this start wait on its lock.
        let conn = sqlite::open(&store)?;
        let marked: u32 = conn
            .query_row(
                "SELECT count(*) FROM export_cursor WHERE sink = 'postgres' AND shard < ?1",
                [shards],
                |row| row.get(0),
            )
            .unwrap_or(0);
        if marked < shards {
            Self::prepare(data_dir, shards)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let lag = crate::Lag::new("postgres");
        let thread = std::thread::Builder::new()
            .name("tally-export-postgres".into())
            .spawn({
                let stop = Arc::clone(&stop);
                let lag = Arc::clone(&lag);
                move || run(config, store, shards, &stop, &lag)
            })
            .map_err(|e| Error(format!("cannot start the PostgreSQL export: {e}")))?;
        Ok(PostgresExport {
            stop,
            thread: Some(thread),
            lag,
        })
    }

    /// Marks every shard as exported from the start, so that retention keeps what is not
    /// copied yet. Call it before anything else writes the store (the server does, before its
    /// outbound thread starts): the history writer holds its write lock for up to a second at a
    /// time and takes it again at once, so a write racing it can wait past SQLite's busy
    /// timeout, which failed a start during a large replay ("database is locked").
    pub fn prepare(data_dir: &Path, shards: u32) -> Result<(), Error> {
        let conn = sqlite::open(&data_dir.join(sqlite::FILE))?;
        conn.execute_batch(sqlite::SCHEMA)
            .map_err(|e| sql("schema", e))?;
        for shard in 0..shards {
            conn.execute(
                "INSERT OR IGNORE INTO export_cursor (sink, shard, lsn, idx) \
                 VALUES ('postgres', ?1, 0, 0)",
                [shard],
            )
            .map_err(|e| sql("export cursor", e))?;
        }
        Ok(())
    }

    /// How far the export is behind the store.
    pub fn lag(&self) -> Arc<crate::Lag> {
        Arc::clone(&self.lag)
    }

    /// Stops after the round in progress.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for PostgresExport {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn run(config: postgres::Config, store: PathBuf, shards: u32, stop: &AtomicBool, lag: &crate::Lag) {
    let up = metrics::gauge!("tally_export_postgres_up");
    let mut backoff = Duration::from_millis(100);
    let mut caught_up = Instant::now();
    let mut client: Option<postgres::Client> = None;
    let mut sqlite: Option<rusqlite::Connection> = None;
    while !stop.load(Ordering::Acquire) {
        let round = (|| -> Result<bool, Error> {
            if sqlite.is_none() {
                sqlite = Some(sqlite::open(&store)?);
            }
            if client.is_none() {
                let mut c = config
                    .connect(postgres::NoTls)
                    .map_err(|e| Error(format!("connect: {e}")))?;
                c.batch_execute(SCHEMA)
                    .map_err(|e| Error(format!("schema: {e}")))?;
                client = Some(c);
                tracing::info!("history export to PostgreSQL connected");
            }
            let (Some(pg), Some(lite)) = (client.as_mut(), sqlite.as_ref()) else {
                unreachable!("both connections were just opened")
            };
            let mut moved = false;
            for shard in 0..shards {
                moved |= export_shard(pg, lite, shard)?;
            }
            Ok(moved)
        })();
        match round {
            Ok(moved) => {
                up.set(1.0);
                backoff = Duration::from_millis(100);
                if moved {
                    let rows = sqlite.as_ref().map_or(0, |lite| backlog(lite).unwrap_or(0));
                    lag.set(rows, caught_up.elapsed().as_secs_f64());
                } else {
                    caught_up = Instant::now();
                    lag.set(0, 0.0);
                    sleep_unless(stop, Duration::from_millis(100));
                }
            }
            Err(e) => {
                up.set(0.0);
                let rows = sqlite.as_ref().map_or(0, |lite| backlog(lite).unwrap_or(0));
                lag.set(rows, caught_up.elapsed().as_secs_f64());
                metrics::counter!("tally_export_postgres_errors_total").increment(1);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "history export to PostgreSQL failed; retrying");
                client = None;
                sleep_unless(stop, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Usage rows the export has not copied yet (by the store's own record of the export's cursor).
fn backlog(lite: &rusqlite::Connection) -> Result<u64, Error> {
    lite.query_row(
        "SELECT count(*) FROM usage_events u JOIN export_cursor c \
         ON c.sink = 'postgres' AND c.shard = u.shard AND (u.lsn, u.idx) > (c.lsn, c.idx)",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
    .map_err(|e| sql("backlog", e))
}

fn sleep_unless(stop: &AtomicBool, total: Duration) {
    let until = Instant::now() + total;
    while !stop.load(Ordering::Acquire) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20).min(total));
    }
}

type Tag = (i64, i64);
/// A row read for export: its tag and its columns as text.
type Row = (Tag, Vec<Option<String>>);

/// The rows of `table` of `shard` after `from`, in tag order, as text columns.
fn read(
    lite: &rusqlite::Connection,
    table: &str,
    columns: &str,
    shard: u32,
    from: Tag,
) -> Result<Vec<Row>, Error> {
    let n = columns.split(',').count();
    let mut statement = lite
        .prepare_cached(&format!(
            "SELECT lsn, idx, {columns} FROM {table} WHERE shard = ?1 AND (lsn, idx) > (?2, ?3) \
             ORDER BY lsn, idx LIMIT {ROWS_PER_ROUND}"
        ))
        .map_err(|e| sql("prepare export", e))?;
    let rows = statement
        .query_map(params![shard, from.0, from.1], |r| {
            let tag = (r.get::<_, i64>(0)?, r.get::<_, i64>(1)?);
            let mut values = Vec::with_capacity(n);
            for i in 0..n {
                values.push(match r.get_ref(i + 2)? {
                    rusqlite::types::ValueRef::Null => None,
                    rusqlite::types::ValueRef::Integer(v) => Some(v.to_string()),
                    rusqlite::types::ValueRef::Text(t) => {
                        Some(String::from_utf8_lossy(t).into_owned())
                    }
                    other => Some(format!("{other:?}")),
                });
            }
            Ok((tag, values))
        })
        .map_err(|e| sql("read export", e))?;
    rows.collect::<Result<_, _>>()
        .map_err(|e| sql("read export", e))
}

const USAGE: &str =
    "request_id, wallet, product, plan, plan_version, asset, charged, revenue_usd, \
                     cost_usd, quantities, attributes, model, occurred_at, applied_at";
const JOURNAL: &str = "seq, at, request_id, kind, asset, amount, from_account, to_account, \
                       wallet, grant_id, refund_of, reason";
const TOPUPS: &str = "event, wallet, asset, amount, trigger_seq, payment_method, \
                      idempotency_key, at";
const WALLETS: &str = "wallet, metadata, created_at";

/// One parameter of a multi-row insert.
#[derive(Debug, Clone)]
enum Param {
    Int(i32),
    Big(i64),
    Text(Option<String>),
}

impl Param {
    fn sql(&self) -> &(dyn postgres::types::ToSql + Sync) {
        match self {
            Param::Int(v) => v,
            Param::Big(v) => v,
            Param::Text(v) => v,
        }
    }
}

/// Rows per insert statement.
const ROWS_PER_STATEMENT: usize = 500;

/// The cast of a time column: the store's microseconds since the epoch become a `timestamptz`
/// in SQL, exactly.
const TIME: &str = "time";

/// `INSERT INTO {table} VALUES (...), (...) ON CONFLICT DO NOTHING{returning}` of `rows` of
/// `shard`, in statements of [`ROWS_PER_STATEMENT`] rows: each row is its tag, then its columns
/// as text with `casts[i]` appended to column `i`'s placeholder ([`TIME`] for times). Returns what
/// `returning` returned.
fn insert_many(
    tx: &mut postgres::Transaction<'_>,
    table: &str,
    casts: &[&str],
    returning: &str,
    shard: u32,
    rows: &[Row],
) -> Result<Vec<postgres::Row>, postgres::Error> {
    let mut returned = Vec::new();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut text = format!("INSERT INTO {table} VALUES ");
        let mut params = Vec::with_capacity(chunk.len() * (casts.len() + 3));
        for (i, ((lsn, idx), columns)) in chunk.iter().enumerate() {
            debug_assert_eq!(columns.len(), casts.len());
            let n = params.len();
            text += &format!(
                "{}(${}, ${}, ${}",
                if i == 0 { "" } else { ", " },
                n + 1,
                n + 2,
                n + 3
            );
            params.extend([
                Param::Int(shard as i32),
                Param::Big(*lsn),
                Param::Int(*idx as i32),
            ]);
            for (cast, column) in casts.iter().zip(columns) {
                params.push(Param::Text(column.clone()));
                let n = params.len();
                text += &if *cast == TIME {
                    format!(
                        ", (timestamptz 'epoch' + ${n}::text::bigint * interval '1 microsecond')"
                    )
                } else {
                    format!(", ${n}{cast}")
                };
            }
            text += ")";
        }
        text += " ON CONFLICT DO NOTHING";
        text += returning;
        let params: Vec<&(dyn postgres::types::ToSql + Sync)> =
            params.iter().map(Param::sql).collect();
        returned.extend(tx.query(&text, &params)?);
    }
    Ok(returned)
}

/// Copies the next rows of one shard; true if any were copied.
fn export_shard(
    pg: &mut postgres::Client,
    lite: &rusqlite::Connection,
    shard: u32,
) -> Result<bool, Error> {
    let pg_error = |what: &str, e: postgres::Error| Error(format!("{what}: {e}"));
    let from: Tag = pg
        .query_opt(
            "SELECT lsn, idx FROM tally.export_progress WHERE shard = $1",
            &[&(shard as i32)],
        )
        .map_err(|e| pg_error("read progress", e))?
        .map_or((0, -1), |r| {
            (r.get::<_, i64>(0), i64::from(r.get::<_, i32>(1)))
        });
    // One read transaction: the four tables as of one commit of the store, so a commit between
    // the reads cannot make the cursor pass rows that were not read.
    lite.execute_batch("BEGIN DEFERRED")
        .map_err(|e| sql("begin read", e))?;
    let read_all = || -> Result<_, Error> {
        Ok((
            read(lite, "usage_events", USAGE, shard, from)?,
            read(lite, "journal", JOURNAL, shard, from)?,
            read(lite, "topups", TOPUPS, shard, from)?,
            read(lite, "wallets", WALLETS, shard, from)?,
        ))
    };
    let read_result = read_all();
    lite.execute_batch("COMMIT")
        .map_err(|e| sql("end read", e))?;
    let (usage, journal, topups, wallets) = read_result?;
    // Rows are complete up to the smallest last tag of a table that filled its round.
    let mut upto: Option<Tag> = None;
    for rows in [&usage, &journal, &topups, &wallets] {
        if rows.len() == ROWS_PER_ROUND {
            let last = rows.last().expect("a full round").0;
            upto = Some(upto.map_or(last, |u: Tag| u.min(last)));
        }
    }
    let upto = match upto {
        Some(u) => u,
        None => match [&usage, &journal, &topups, &wallets]
            .iter()
            .filter_map(|rows| rows.last().map(|r| r.0))
            .max()
        {
            Some(u) => u,
            None => return Ok(false),
        },
    };
    let within =
        |rows: &[Row]| -> Vec<Row> { rows.iter().filter(|(t, _)| *t <= upto).cloned().collect() };
    let (usage, journal, topups, wallets) = (
        within(&usage),
        within(&journal),
        within(&topups),
        within(&wallets),
    );
    let mut tx = pg.transaction().map_err(|e| pg_error("begin", e))?;
    // Multi-row inserts, a few hundred rows a statement (PostgreSQL takes at most 65,535
    // parameters in one).
    insert_many(
        &mut tx,
        "tally.usage_events (shard, lsn, idx, request_id, wallet, product, plan, plan_version, \
         asset, charged, revenue_usd, cost_usd, quantities, attributes, model, occurred_at, \
         applied_at)",
        &[
            "",
            "",
            "",
            "",
            "::text::integer",
            "",
            "::text::numeric",
            "::text::numeric",
            "::text::numeric",
            "::text::jsonb",
            "::text::jsonb",
            "",
            TIME,
            TIME,
        ],
        "",
        shard,
        &usage,
    )
    .map_err(|e| pg_error("insert usage", e))?;
    // Only the rows inserted now carry their refund to the refunded event.
    let refunds = insert_many(
        &mut tx,
        "tally.journal (shard, lsn, idx, seq, at, request_id, kind, asset, amount, from_account, \
         to_account, wallet, grant_id, refund_of, reason)",
        &[
            "::text::bigint",
            TIME,
            "",
            "",
            "",
            "::text::numeric",
            "",
            "",
            "",
            "::text::bigint",
            "",
            "",
        ],
        " RETURNING refund_of, amount::text",
        shard,
        &journal,
    )
    .map_err(|e| pg_error("insert journal", e))?;
    for row in refunds {
        let (event, amount): (Option<String>, String) = (row.get(0), row.get(1));
        if let Some(event) = event {
            tx.execute(
                "UPDATE tally.usage_events SET refunded = refunded + $1::text::numeric \
                 WHERE request_id = $2",
                &[&amount, &event],
            )
            .map_err(|e| pg_error("refund", e))?;
        }
    }
    insert_many(
        &mut tx,
        "tally.topups (shard, lsn, idx, event, wallet, asset, amount, trigger_seq, \
         payment_method, idempotency_key, at)",
        &[
            "",
            "",
            "",
            "::text::numeric",
            "::text::bigint",
            "",
            "",
            TIME,
        ],
        "",
        shard,
        &topups,
    )
    .map_err(|e| pg_error("insert top-up", e))?;
    insert_many(
        &mut tx,
        "tally.wallets (shard, lsn, idx, wallet, metadata, created_at)",
        &["", "::text::jsonb", TIME],
        "",
        shard,
        &wallets,
    )
    .map_err(|e| pg_error("insert wallet", e))?;
    tx.execute(
        "INSERT INTO tally.export_progress (shard, lsn, idx) VALUES ($1, $2, $3) \
         ON CONFLICT (shard) DO UPDATE SET lsn = EXCLUDED.lsn, idx = EXCLUDED.idx",
        &[&(shard as i32), &upto.0, &(upto.1 as i32)],
    )
    .map_err(|e| pg_error("progress", e))?;
    tx.commit().map_err(|e| pg_error("commit", e))?;
    let copied = usage.len() + journal.len() + topups.len() + wallets.len();
    metrics::counter!("tally_export_postgres_rows_total").increment(copied as u64);
    // Retention may now delete what PostgreSQL holds (a late or lost update only keeps rows).
    lite.execute(
        "UPDATE export_cursor SET lsn = ?1, idx = ?2 WHERE sink = 'postgres' AND shard = ?3",
        params![upto.0, upto.1, shard],
    )
    .map_err(|e| sql("export cursor", e))?;
    Ok(true)
}
