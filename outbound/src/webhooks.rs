//! Webhooks out: signed notices to the operator's own endpoints, delivered at least once.
//!
//! **Where notices come from.** Engine effects (`WalletFrozen`, `BalanceAlert`,
//! `GrantExpiring`) are written by the payments sink, inside the checkpoint barrier, so a notice
//! is never lost between the WAL and this store; their ids derive from the effect's
//! deterministic position, so replay after a crash inserts nothing twice. The Stripe worker
//! writes `topup.*` notices in the same transaction that settles the top-up, and `dispute.*`
//! notices once the engine applied Stripe's event; their ids derive from the top-up key and
//! Stripe's event id.
//!
//! **Delivery.** A notice is fanned out, when it is stored, to every endpoint whose filter
//! takes its type (endpoints registered later do not get older notices). Each delivery is a
//! `POST` of the JSON notice signed in the Standard Webhooks format: `webhook-id` (the notice
//! id, stable across retries, so the receiver can drop duplicates), `webhook-timestamp` (Unix
//! seconds) and `webhook-signature` (`v1,` + base64 HMAC-SHA256 over `"{id}.{timestamp}.{body}"`
//! with the endpoint secret `whsec_<base64 key>`). A 2xx answer delivers it; anything else
//! (another status, a timeout after 10 s, a refused connection) is retried with exponential
//! backoff from `retry_base` doubling to at most 10 hours, until 3 days after the notice, when
//! the delivery is marked failed. Every attempt is logged and readable through the API.
//! Deliveries are rows in `payments.sqlite3` (`synchronous=FULL`), so they survive restarts.
//!
//! Notices, deliveries and attempts older than 30 days are pruned.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use serde_json::{json, Value};
use tally_engine::{Effect, Timestamp};

use crate::payments::Payments;
use crate::{now_us, Error, Tagged};

/// Every notice type, as endpoints filter them.
pub const EVENT_TYPES: [&str; 10] = [
    "wallet.balance.low",
    "wallet.balance.depleted",
    "wallet.in_debt",
    "wallet.frozen",
    "grant.expiring",
    "topup.succeeded",
    "topup.failed",
    "topup.requires_action",
    "dispute.opened",
    "dispute.closed",
];

/// Deliveries are given up this long after their notice was made.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(3 * 24 * 3600);
/// The longest wait between two attempts.
const BACKOFF_MAX_US: i64 = 10 * 3600 * 1_000_000;
/// What is kept of notices, deliveries and attempts.
const RETENTION_US: i64 = 30 * 24 * 3600 * 1_000_000;
/// One attempt may take this long.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many endpoints.
pub const ENDPOINTS_MAX: i64 = 100;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    events TEXT NOT NULL,
    description TEXT NOT NULL,
    created_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_events (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    event_id TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_us INTEGER NOT NULL,
    created_us INTEGER NOT NULL,
    PRIMARY KEY (event_id, endpoint_id)
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (state, next_attempt_us);
CREATE TABLE IF NOT EXISTS webhook_attempts (
    endpoint_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at_us INTEGER NOT NULL,
    status INTEGER,
    error TEXT,
    duration_ms INTEGER NOT NULL,
    PRIMARY KEY (endpoint_id, event_id, attempt)
);
CREATE INDEX IF NOT EXISTS webhook_attempts_at ON webhook_attempts (endpoint_id, at_us);
";

/// One notice for the operator.
#[derive(Clone, Debug, PartialEq)]
pub struct Notice {
    /// Stable id (`evt_` + 32 hex digits), derived from what caused it.
    pub id: String,
    /// One of [`EVENT_TYPES`].
    pub kind: &'static str,
    /// The notice's `data`.
    pub data: Value,
    /// When it happened (microseconds since the epoch).
    pub at_us: i64,
}

impl Notice {
    /// A notice whose id derives from `source` (the same source, the same id).
    pub fn new(source: &str, kind: &'static str, data: Value, at_us: i64) -> Notice {
        let digest = ring::digest::digest(&ring::digest::SHA256, source.as_bytes());
        let hex: String = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Notice {
            id: format!("evt_{hex}"),
            kind,
            data,
            at_us,
        }
    }

    /// The notice of an engine effect, if it is one.
    pub fn of(tagged: &Tagged) -> Option<Notice> {
        let (kind, data) = match &tagged.effect {
            Effect::WalletFrozen { wallet } => ("wallet.frozen", json!({ "wallet": wallet })),
            Effect::BalanceAlert {
                wallet,
                asset,
                alert,
                available,
            } => (
                alert.event_type(),
                json!({ "wallet": wallet, "asset": asset, "available": available.normalize().to_string() }),
            ),
            Effect::GrantExpiring {
                wallet,
                asset,
                grant,
                remaining,
                expires_at,
            } => (
                "grant.expiring",
                json!({
                    "wallet": wallet,
                    "asset": asset,
                    "grant": grant.0,
                    "remaining": remaining.normalize().to_string(),
                    "expires_at": expires_at.to_rfc3339(),
                }),
            ),
            _ => return None,
        };
        let source = format!("effect:{}:{}:{}", tagged.shard, tagged.lsn, tagged.index);
        Some(Notice::new(&source, kind, data, tagged.applied_at.0))
    }

    /// The body sent: `{id, type, timestamp, data}`.
    pub fn body(&self) -> String {
        json!({
            "id": self.id,
            "type": self.kind,
            "timestamp": Timestamp(self.at_us).to_rfc3339(),
            "data": self.data,
        })
        .to_string()
    }
}

fn db(e: rusqlite::Error) -> Error {
    Error(format!("webhooks store: {e}"))
}

/// A registered endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// `we_` + 24 hex digits.
    pub id: String,
    /// Where notices are posted.
    pub url: String,
    /// The notice types it takes; empty: all.
    pub events: Vec<String>,
    /// The operator's note.
    pub description: String,
    /// When it was registered (microseconds since the epoch).
    pub created_us: i64,
}

/// One delivery attempt, as the delivery log shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attempt {
    /// The notice.
    pub event_id: String,
    /// Its type.
    pub event_type: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When (microseconds since the epoch).
    pub at_us: i64,
    /// The HTTP status answered, if any.
    pub status: Option<u16>,
    /// Why it failed, when no status came back.
    pub error: Option<String>,
    /// How long it took.
    pub duration_ms: u64,
    /// Where the delivery stands now: `pending`, `delivered` or `failed`.
    pub delivery: String,
}

/// Why an endpoint was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum EndpointError {
    /// The URL is not an absolute http(s) URL.
    BadUrl,
    /// An event type is not one of [`EVENT_TYPES`].
    UnknownEvent(String),
    /// The secret is not `whsec_` + base64 of 24 to 64 bytes.
    BadSecret,
    /// [`ENDPOINTS_MAX`] endpoints exist.
    TooMany,
    /// An endpoint with this id exists (the same request repeated, or a conflict): it and its
    /// secret.
    Exists(Box<(Endpoint, String)>),
    /// The store failed.
    Store(Error),
}

impl std::fmt::Display for EndpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointError::BadUrl => write!(f, "url must be an absolute http:// or https:// URL"),
            EndpointError::UnknownEvent(e) => write!(
                f,
                "unknown event type `{e}`; known: {}",
                EVENT_TYPES.join(", ")
            ),
            EndpointError::BadSecret => {
                write!(
                    f,
                    "secret must be `whsec_` and the base64 of 24 to 64 bytes"
                )
            }
            EndpointError::TooMany => write!(f, "at most {ENDPOINTS_MAX} endpoints"),
            EndpointError::Exists(e) => write!(f, "endpoint {} exists", e.0.id),
            EndpointError::Store(e) => write!(f, "{e}"),
        }
    }
}

/// Decodes an endpoint secret (`whsec_<base64>`) into its key bytes.
pub fn secret_key(secret: &str) -> Option<Vec<u8>> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_")?)
        .ok()?;
    (24..=64).contains(&key.len()).then_some(key)
}

/// The Standard Webhooks `webhook-signature` value for one delivery.
pub fn signature(secret: &str, id: &str, timestamp: i64, body: &str) -> Option<String> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret_key(secret)?);
    let tag = ring::hmac::sign(&key, format!("{id}.{timestamp}.{body}").as_bytes());
    Some(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    ))
}

/// Waits before attempt `attempts + 1`: `base` doubling, at most 10 hours.
fn backoff_us(base_us: i64, attempts: u32) -> i64 {
    base_us
        .saturating_mul(1i64 << attempts.saturating_sub(1).min(30))
        .min(BACKOFF_MAX_US)
}

impl Payments {
    /// Stores notices that are new (by id) and fans each out to the endpoints that take it, in
    /// one transaction; the number of new deliveries.
    pub fn notify(&self, notices: &[Notice]) -> Result<usize, Error> {
        if notices.is_empty() {
            return Ok(0);
        }
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(db)?;
        let deliveries = notify_in(&tx, notices)?;
        tx.commit().map_err(db)?;
        Ok(deliveries)
    }

    /// Registers endpoint `id`; `secret` `None` generates one. Returns it and its secret.
    pub fn add_endpoint(
        &self,
        id: &str,
        url: &str,
        events: &[String],
        description: &str,
        secret: Option<&str>,
        now_us: i64,
    ) -> Result<(Endpoint, String), EndpointError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| EndpointError::BadUrl)?;
        if !matches!(parsed.scheme(), "http" | "https")
            || parsed.host_str().is_none()
            || url.len() > 2048
        {
            return Err(EndpointError::BadUrl);
        }
        if let Some(e) = events.iter().find(|e| !EVENT_TYPES.contains(&e.as_str())) {
            return Err(EndpointError::UnknownEvent(e.chars().take(64).collect()));
        }
        let secret = match secret {
            Some(s) => {
                secret_key(s).ok_or(EndpointError::BadSecret)?;
                s.to_string()
            }
            None => {
                use ring::rand::SecureRandom;
                let mut bytes = [0u8; 32];
                ring::rand::SystemRandom::new()
                    .fill(&mut bytes)
                    .expect("the system's random source works");
                format!(
                    "whsec_{}",
                    base64::engine::general_purpose::STANDARD.encode(bytes)
                )
            }
        };
        let mut events: Vec<String> = events.to_vec();
        events.sort();
        events.dedup();
        let endpoint = Endpoint {
            id: id.to_string(),
            url: url.to_string(),
            events,
            description: description.chars().take(500).collect(),
            created_us: now_us,
        };
        let conn = self.lock();
        let existing = conn
            .query_row(
                "SELECT id, url, events, description, created_us, secret FROM webhook_endpoints
                 WHERE id = ?1",
                [id],
                |r| Ok((endpoint_of(r)?, r.get::<_, String>(5)?)),
            )
            .optional()
            .map_err(|e| EndpointError::Store(db(e)))?;
        if let Some((found, secret)) = existing {
            return Err(EndpointError::Exists(Box::new((found, secret))));
        }
        let count: i64 = conn
            .query_row("SELECT COUNT(*) FROM webhook_endpoints", [], |r| r.get(0))
            .map_err(|e| EndpointError::Store(db(e)))?;
        if count >= ENDPOINTS_MAX {
            return Err(EndpointError::TooMany);
        }
        conn.execute(
            "INSERT INTO webhook_endpoints (id, url, secret, events, description, created_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                endpoint.id,
                endpoint.url,
                secret,
                serde_json::to_string(&endpoint.events).unwrap_or_else(|_| "[]".into()),
                endpoint.description,
                endpoint.created_us
            ],
        )
        .map_err(|e| EndpointError::Store(db(e)))?;
        Ok((endpoint, secret))
    }

    /// Every endpoint, oldest first.
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, Error> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, url, events, description, created_us FROM webhook_endpoints
                 ORDER BY created_us, id",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], endpoint_of)
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    }

    /// One endpoint.
    pub fn endpoint(&self, id: &str) -> Result<Option<Endpoint>, Error> {
        self.lock()
            .query_row(
                "SELECT id, url, events, description, created_us FROM webhook_endpoints
                 WHERE id = ?1",
                [id],
                endpoint_of,
            )
            .optional()
            .map_err(db)
    }

    /// Removes an endpoint and what it had not been delivered yet; false if there was none.
    pub fn remove_endpoint(&self, id: &str) -> Result<bool, Error> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(db)?;
        let n = tx
            .execute("DELETE FROM webhook_endpoints WHERE id = ?1", [id])
            .map_err(db)?;
        tx.execute(
            "DELETE FROM webhook_deliveries WHERE endpoint_id = ?1 AND state = 'pending'",
            [id],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(n == 1)
    }

    /// An endpoint's delivery log, newest first: at most `limit` attempts before `before_us`.
    pub fn attempts(
        &self,
        endpoint: &str,
        before_us: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Attempt>, Error> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT a.event_id, e.type, a.attempt, a.at_us, a.status, a.error, a.duration_ms,
                        COALESCE(d.state, 'failed')
                 FROM webhook_attempts a
                 JOIN webhook_events e ON e.id = a.event_id
                 LEFT JOIN webhook_deliveries d
                   ON d.event_id = a.event_id AND d.endpoint_id = a.endpoint_id
                 WHERE a.endpoint_id = ?1 AND a.at_us < ?2
                 ORDER BY a.at_us DESC, a.attempt DESC LIMIT ?3",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(
                params![endpoint, before_us.unwrap_or(i64::MAX), limit as i64],
                |r| {
                    Ok(Attempt {
                        event_id: r.get(0)?,
                        event_type: r.get(1)?,
                        attempt: r.get::<_, i64>(2)? as u32,
                        at_us: r.get(3)?,
                        status: r.get::<_, Option<i64>>(4)?.map(|s| s as u16),
                        error: r.get(5)?,
                        duration_ms: r.get::<_, i64>(6)? as u64,
                        delivery: r.get(7)?,
                    })
                },
            )
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    }

    /// Pending deliveries (for metrics).
    pub fn deliveries_pending(&self) -> Result<u64, Error> {
        self.lock()
            .query_row(
                "SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(db)
    }

    fn due_deliveries(&self, now_us: i64, limit: usize) -> Result<Vec<Due>, Error> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT d.event_id, d.endpoint_id, d.attempts, e.payload, e.created_us,
                        p.url, p.secret
                 FROM webhook_deliveries d
                 JOIN webhook_events e ON e.id = d.event_id
                 JOIN webhook_endpoints p ON p.id = d.endpoint_id
                 WHERE d.state = 'pending' AND d.next_attempt_us <= ?1
                 ORDER BY d.next_attempt_us LIMIT ?2",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![now_us, limit as i64], |r| {
                Ok(Due {
                    event_id: r.get(0)?,
                    endpoint_id: r.get(1)?,
                    attempts: r.get::<_, i64>(2)? as u32,
                    payload: r.get(3)?,
                    created_us: r.get(4)?,
                    url: r.get(5)?,
                    secret: r.get(6)?,
                })
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    }

    fn next_delivery(&self) -> Result<Option<i64>, Error> {
        self.lock()
            .query_row(
                "SELECT MIN(next_attempt_us) FROM webhook_deliveries WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
            .map_err(db)
    }

    fn record_attempt(&self, due: &Due, result: &AttemptResult, state: &str, next_us: i64) {
        let mut conn = self.lock();
        let run = |tx: &rusqlite::Transaction<'_>| -> rusqlite::Result<()> {
            tx.execute(
                "INSERT OR REPLACE INTO webhook_attempts
                 (endpoint_id, event_id, attempt, at_us, status, error, duration_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    due.endpoint_id,
                    due.event_id,
                    due.attempts as i64 + 1,
                    result.at_us,
                    result.status.map(i64::from),
                    result.error,
                    result.duration_ms as i64
                ],
            )?;
            tx.execute(
                "UPDATE webhook_deliveries SET state = ?3, attempts = attempts + 1,
                 next_attempt_us = ?4 WHERE event_id = ?1 AND endpoint_id = ?2",
                params![due.event_id, due.endpoint_id, state, next_us],
            )?;
            Ok(())
        };
        let done = conn
            .transaction()
            .and_then(|tx| run(&tx).and_then(|()| tx.commit()));
        if let Err(e) = done {
            tracing::error!("{}", db(e));
        }
    }

    fn prune_notices(&self, now_us: i64) -> Result<(), Error> {
        let horizon = now_us - RETENTION_US;
        let conn = self.lock();
        conn.execute("DELETE FROM webhook_attempts WHERE at_us < ?1", [horizon])
            .map_err(db)?;
        conn.execute(
            "DELETE FROM webhook_deliveries WHERE state != 'pending' AND created_us < ?1",
            [horizon],
        )
        .map_err(db)?;
        conn.execute(
            "DELETE FROM webhook_events WHERE created_us < ?1 AND NOT EXISTS
             (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = webhook_events.id)",
            [horizon],
        )
        .map_err(db)?;
        Ok(())
    }
}

/// Stores `notices` and fans them out inside an open transaction (the Stripe worker settles a
/// top-up and tells the operator in one).
pub(crate) fn notify_in(
    tx: &rusqlite::Transaction<'_>,
    notices: &[Notice],
) -> Result<usize, Error> {
    let mut deliveries = 0;
    for n in notices {
        let inserted = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO webhook_events (id, type, payload, created_us)
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut s| s.execute(params![n.id, n.kind, n.body(), n.at_us]))
            .map_err(db)?;
        if inserted == 0 {
            continue;
        }
        deliveries += tx
            .prepare_cached(
                "INSERT OR IGNORE INTO webhook_deliveries
                 (event_id, endpoint_id, state, next_attempt_us, created_us)
                 SELECT ?1, id, 'pending', ?3, ?3 FROM webhook_endpoints
                 WHERE events = '[]' OR EXISTS (SELECT 1 FROM json_each(events) WHERE value = ?2)",
            )
            .and_then(|mut s| s.execute(params![n.id, n.kind, n.at_us]))
            .map_err(db)?;
    }
    Ok(deliveries)
}

fn endpoint_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Endpoint> {
    let events: String = r.get(2)?;
    Ok(Endpoint {
        id: r.get(0)?,
        url: r.get(1)?,
        events: serde_json::from_str(&events).unwrap_or_default(),
        description: r.get(3)?,
        created_us: r.get(4)?,
    })
}

/// A delivery due now, with what sending it needs.
#[derive(Debug)]
struct Due {
    event_id: String,
    endpoint_id: String,
    attempts: u32,
    payload: String,
    created_us: i64,
    url: String,
    secret: String,
}

#[derive(Debug)]
struct AttemptResult {
    at_us: i64,
    status: Option<u16>,
    error: Option<String>,
    duration_ms: u64,
}

/// The sender: posts due deliveries until stopped.
pub struct Sender {
    store: Payments,
    client: reqwest::Client,
    retry_base: Duration,
    wake: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("retry_base", &self.retry_base)
            .finish()
    }
}

impl Sender {
    /// A sender over `store`; `wake` is notified when new deliveries are stored; the first
    /// retry waits `retry_base`.
    pub fn new(
        store: Payments,
        retry_base: Duration,
        wake: Arc<tokio::sync::Notify>,
    ) -> Result<Sender, Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error(format!("webhook TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tally-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error(format!("webhook client: {e}")))?;
        Ok(Sender {
            store,
            client,
            retry_base: retry_base.max(Duration::from_millis(10)),
            wake,
        })
    }

    /// Delivers until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let pending = metrics::gauge!("tally_webhook_deliveries_pending");
        let mut pruned_at = 0i64;
        loop {
            let now = now_us();
            if now - pruned_at > 3600 * 1_000_000 {
                pruned_at = now;
                if let Err(e) = self.store.prune_notices(now) {
                    tracing::error!("{e}");
                }
            }
            match self.store.due_deliveries(now, 32) {
                Ok(due) => {
                    let mut sends = tokio::task::JoinSet::new();
                    for d in due {
                        let client = self.client.clone();
                        sends.spawn(async move {
                            let result = attempt(&client, &d).await;
                            (d, result)
                        });
                    }
                    while let Some(done) = sends.join_next().await {
                        if let Ok((d, result)) = done {
                            self.finish(&d, &result);
                        }
                    }
                }
                Err(e) => tracing::error!("{e}"),
            }
            if let Ok(n) = self.store.deliveries_pending() {
                pending.set(n as f64);
            }
            let mut wait = Duration::from_secs(5);
            if let Ok(Some(next)) = self.store.next_delivery() {
                wait = wait.min(Duration::from_micros((next - now_us()).max(0) as u64));
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn finish(&self, d: &Due, result: &AttemptResult) {
        let ok = result.status.is_some_and(|s| (200..300).contains(&s));
        let (state, next) = if ok {
            ("delivered", result.at_us)
        } else {
            let next =
                result.at_us + backoff_us(self.retry_base.as_micros() as i64, d.attempts + 1);
            if next - d.created_us > GIVE_UP_AFTER.as_micros() as i64 {
                ("failed", result.at_us)
            } else {
                ("pending", next)
            }
        };
        metrics::counter!("tally_webhook_attempts_total", "outcome" => if ok { "delivered" } else { "failed" })
            .increment(1);
        if !ok {
            tracing::warn!(
                endpoint = %d.endpoint_id,
                event = %d.event_id,
                attempt = d.attempts + 1,
                status = result.status,
                error = result.error.as_deref().unwrap_or(""),
                state,
                "webhook delivery failed"
            );
        }
        self.store.record_attempt(d, result, state, next);
    }
}

async fn attempt(client: &reqwest::Client, d: &Due) -> AttemptResult {
    let start = std::time::Instant::now();
    let at_us = now_us();
    let timestamp = at_us / 1_000_000;
    let Some(signature) = signature(&d.secret, &d.event_id, timestamp, &d.payload) else {
        return AttemptResult {
            at_us,
            status: None,
            error: Some("the endpoint's secret is not valid".into()),
            duration_ms: 0,
        };
    };
    let sent = client
        .post(&d.url)
        .header("content-type", "application/json")
        .header("webhook-id", &d.event_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(d.payload.clone())
        .send()
        .await;
    let duration_ms = start.elapsed().as_millis() as u64;
    match sent {
        Ok(response) => AttemptResult {
            at_us,
            status: Some(response.status().as_u16()),
            error: None,
            duration_ms,
        },
        Err(e) => AttemptResult {
            at_us,
            status: None,
            error: Some(if e.is_timeout() {
                "timed out".into()
            } else if e.is_connect() {
                "could not connect".into()
            } else {
                "request failed".into()
            }),
            duration_ms,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            signature(secret, id, 1614265330, body).as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
        assert_eq!(signature("whsec_short", id, 1, body), None);
        assert_eq!(signature("nope", id, 1, body), None);
    }

    #[test]
    fn backoff_doubles_to_ten_hours() {
        assert_eq!(backoff_us(1_000_000, 1), 1_000_000);
        assert_eq!(backoff_us(1_000_000, 2), 2_000_000);
        assert_eq!(backoff_us(1_000_000, 4), 8_000_000);
        assert_eq!(backoff_us(5_000_000, 40), BACKOFF_MAX_US);
    }

    #[test]
    fn endpoints_are_checked_and_notices_fan_out_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Payments::open(dir.path()).unwrap();
        assert_eq!(
            store
                .add_endpoint("we_1", "ftp://x", &[], "", None, 1)
                .unwrap_err(),
            EndpointError::BadUrl
        );
        assert!(matches!(
            store.add_endpoint("we_1", "https://x.test/h", &["nope".into()], "", None, 1),
            Err(EndpointError::UnknownEvent(_))
        ));
        assert_eq!(
            store
                .add_endpoint("we_1", "https://x.test/h", &[], "", Some("whsec_abc"), 1)
                .unwrap_err(),
            EndpointError::BadSecret
        );
        let (all, secret) = store
            .add_endpoint("we_2", "https://x.test/all", &[], "", None, 1)
            .unwrap();
        assert!(secret_key(&secret).is_some());
        let (only, _) = store
            .add_endpoint(
                "we_3",
                "https://x.test/f",
                &["topup.failed".into()],
                "",
                None,
                1,
            )
            .unwrap();
        let frozen = Notice::new("a", "wallet.frozen", json!({"wallet": "w"}), 10);
        let failed = Notice::new("b", "topup.failed", json!({"wallet": "w"}), 10);
        assert_eq!(store.notify(&[frozen.clone(), failed.clone()]).unwrap(), 3);
        assert_eq!(
            store.notify(&[frozen, failed]).unwrap(),
            0,
            "ids are stable"
        );
        let due = store.due_deliveries(10, 10).unwrap();
        assert_eq!(due.len(), 3);
        assert_eq!(due.iter().filter(|d| d.endpoint_id == only.id).count(), 1);
        assert!(store.remove_endpoint(&all.id).unwrap());
        assert!(!store.remove_endpoint(&all.id).unwrap());
        assert_eq!(store.due_deliveries(10, 10).unwrap().len(), 1);
    }
}
