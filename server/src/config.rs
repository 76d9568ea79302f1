//! Server configuration: defaults, a TOML file, `TALLY_*` environment variables and flags,
//! merged in that order (a later source wins) and validated once, with errors that name the bad
//! setting.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// WAL durability, as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilitySetting {
    /// fdatasync every group commit (default).
    Sync,
    /// No sync: survives a process crash, not a power loss. Benchmarks only.
    None,
}

/// The validated configuration of a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where WALs, snapshots, outbound files and the lock live.
    pub data_dir: PathBuf,
    /// Shard count. Fixed for the life of a data directory (it is recorded there).
    pub shards: u32,
    /// WAL durability.
    pub durability: DurabilitySetting,
    /// Size of each WAL segment file.
    pub wal_segment_bytes: u64,
    /// Most requests one group commit takes.
    pub batch_max: usize,
    /// Most requests waiting in each shard's inbound queue (a batch frame counts each of its
    /// items); a request or batch that would go over it is answered "busy" (one always fits in
    /// an empty queue).
    pub queue_depth: usize,
    /// Most effects waiting in the outbound queue for the sinks (a message that would go over
    /// it waits, and one always fits in an empty queue): shards, and recovery's replay, wait
    /// when it is full.
    pub outbound_queue_depth: usize,
    /// Take a checkpoint after this many WAL records in a shard (0: never by count).
    pub snapshot_every_records: u64,
    /// Take a checkpoint after this many seconds (0: never by time).
    pub snapshot_every_secs: u64,
    /// Checkpoints kept per shard.
    pub snapshots_keep: usize,
    /// Idempotency window, seconds.
    pub idempotency_retention_secs: u64,
    /// Most request ids each shard remembers at once (about 48 bytes each); beyond it the
    /// oldest are forgotten before the window ends.
    pub idempotency_max_ids: u64,
    /// Where the QUIC listener binds (`host:port`).
    pub listen: String,
    /// A PEM certificate chain to serve instead of the generated self-signed one (with
    /// `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Most client connections open at once.
    pub connections_max: u32,
    /// Most streams one connection may have open.
    pub streams_max: u32,
    /// Most request items one connection may have unanswered (a batch counts each item).
    pub in_flight_max: u32,
    /// Threads of the network runtime.
    pub net_threads: usize,
    /// A QUIC connection must authenticate within this many milliseconds or is closed.
    pub auth_deadline_ms: u64,
    /// Most QUIC connections in their handshake or not yet authenticated; beyond it a new one
    /// closes the oldest unauthenticated connection (see `tally_net::Limits`).
    pub unauthenticated_max: u32,
    /// Where the HTTP/JSON API binds (`host:port`).
    pub http_listen: String,
    /// Serve the HTTP API over TLS with the QUIC certificate.
    pub http_tls: bool,
    /// Keep the SQLite history store (`<data-dir>/history.sqlite3`); on by default.
    pub history_store: bool,
    /// Also write every effect to JSON-lines files in `<data-dir>/outbound/`.
    pub export_jsonl: bool,
    /// Seal a JSON-lines file at this size.
    pub jsonl_rotate_bytes: u64,
    /// Seal a non-empty JSON-lines file after this many seconds.
    pub jsonl_rotate_secs: u64,
    /// Sealed JSON-lines files kept per stream.
    pub jsonl_keep: u64,
    /// Delete history rows older than this many days (0: keep everything).
    pub history_retention_days: u64,
    /// A usage event can be refunded for this many days after it happened (at most 366):
    /// inside the idempotency window from the engine's memory, beyond it from the history
    /// store. 0: only inside the idempotency window.
    pub refund_window_days: u32,
    /// Copy the history store to this PostgreSQL database (a libpq URL; never logged).
    pub export_postgres: Option<String>,
    /// Stripe's secret API key; without it top-up requests wait (never logged).
    pub stripe_secret_key: Option<Secret>,
    /// Stripe's API base URL (tests point it at localstripe); `None`: Stripe's.
    pub stripe_api_base: Option<String>,
    /// The signing secret of the Stripe webhook endpoint (never logged).
    pub stripe_webhook_secret: Option<Secret>,
    /// Freeze a wallet when a chargeback of its top-up opens.
    pub stripe_dispute_freeze: bool,
    /// Look a top-up up at Stripe by its metadata after this many seconds without an outcome.
    pub stripe_reconcile_secs: u64,
    /// The first retry of a failed webhook delivery waits this long; each next one twice as
    /// long (at most 10 hours), for up to 3 days.
    pub webhook_retry_base_ms: u64,
    /// `wallet.balance.low` fires when a balance's available value falls below this many USD
    /// (`"0"`: never).
    pub alert_low_balance_usd: rust_decimal::Decimal,
    /// `grant.expiring` fires this many seconds before a grant with a remainder expires (0:
    /// never).
    pub alert_grant_expiring_secs: u64,
    /// How portal links begin (`https://billing.example.com`); default: the HTTP API's own
    /// address.
    pub portal_public_url: Option<String>,
    /// A portal session ends after this many seconds without a request.
    pub portal_idle_secs: u64,
    /// A portal session ends this many seconds after it began.
    pub portal_session_max_secs: u64,
    /// Where the portal loads Stripe.js from.
    pub portal_stripe_js: String,
    /// Origins allowed to frame the portal (its CSP `frame-ancestors`), e.g.
    /// `https://app.example.com`.
    pub portal_frame_ancestors: Vec<String>,
    /// Stripe's publishable key (`pk_...`), for the portal's card form.
    pub stripe_publishable_key: Option<String>,
}

/// A secret setting: compared and cloned like a string, never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from("./tally-data"),
            shards: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            durability: DurabilitySetting::Sync,
            wal_segment_bytes: 64 * 1024 * 1024,
            batch_max: 4096,
            queue_depth: 65_536,
            outbound_queue_depth: 65_536,
            snapshot_every_records: 5_000_000,
            snapshot_every_secs: 600,
            snapshots_keep: 2,
            idempotency_retention_secs: 24 * 3600,
            idempotency_max_ids: 16_000_000,
            listen: "127.0.0.1:7400".into(),
            tls_cert: None,
            tls_key: None,
            connections_max: 1024,
            streams_max: 64,
            in_flight_max: 16_384,
            net_threads: 2,
            auth_deadline_ms: 10_000,
            unauthenticated_max: 256,
            http_listen: "127.0.0.1:7480".into(),
            http_tls: false,
            history_store: true,
            export_jsonl: false,
            jsonl_rotate_bytes: 64 * 1024 * 1024,
            jsonl_rotate_secs: 3600,
            jsonl_keep: 24,
            history_retention_days: 0,
            refund_window_days: 90,
            export_postgres: None,
            stripe_secret_key: None,
            stripe_api_base: None,
            stripe_webhook_secret: None,
            stripe_dispute_freeze: true,
            stripe_reconcile_secs: 3600,
            webhook_retry_base_ms: 5000,
            alert_low_balance_usd: rust_decimal::Decimal::ZERO,
            alert_grant_expiring_secs: 3 * 86_400,
            portal_public_url: None,
            portal_idle_secs: 900,
            portal_session_max_secs: 12 * 3600,
            portal_stripe_js: "https://js.stripe.com/v3/".into(),
            portal_frame_ancestors: Vec::new(),
            stripe_publishable_key: None,
        }
    }
}

/// Settings as they come from one source; `None` leaves the earlier value.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// See [`Config::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`Config::shards`].
    pub shards: Option<u32>,
    /// See [`Config::durability`].
    pub durability: Option<DurabilitySetting>,
    /// See [`Config::wal_segment_bytes`].
    pub wal_segment_bytes: Option<u64>,
    /// See [`Config::batch_max`].
    pub batch_max: Option<usize>,
    /// See [`Config::queue_depth`].
    pub queue_depth: Option<usize>,
    /// See [`Config::outbound_queue_depth`].
    pub outbound_queue_depth: Option<usize>,
    /// See [`Config::snapshot_every_records`].
    pub snapshot_every_records: Option<u64>,
    /// See [`Config::snapshot_every_secs`].
    pub snapshot_every_secs: Option<u64>,
    /// See [`Config::snapshots_keep`].
    pub snapshots_keep: Option<usize>,
    /// See [`Config::idempotency_retention_secs`].
    pub idempotency_retention_secs: Option<u64>,
    /// See [`Config::idempotency_max_ids`].
    pub idempotency_max_ids: Option<u64>,
    /// See [`Config::listen`].
    pub listen: Option<String>,
    /// See [`Config::http_listen`].
    pub http_listen: Option<String>,
    /// See [`Config::auth_deadline_ms`].
    pub auth_deadline_ms: Option<u64>,
    /// See [`Config::unauthenticated_max`].
    pub unauthenticated_max: Option<u32>,
    /// See [`Config::http_tls`].
    pub http_tls: Option<bool>,
    /// See [`Config::history_store`].
    pub history_store: Option<bool>,
    /// See [`Config::export_jsonl`].
    pub export_jsonl: Option<bool>,
    /// See [`Config::jsonl_rotate_bytes`].
    pub jsonl_rotate_bytes: Option<u64>,
    /// See [`Config::jsonl_rotate_secs`].
    pub jsonl_rotate_secs: Option<u64>,
    /// See [`Config::jsonl_keep`].
    pub jsonl_keep: Option<u64>,
    /// See [`Config::history_retention_days`].
    pub history_retention_days: Option<u64>,
    /// See [`Config::refund_window_days`].
    pub refund_window_days: Option<u32>,
    /// See [`Config::export_postgres`].
    pub export_postgres: Option<String>,
    /// See [`Config::stripe_secret_key`].
    pub stripe_secret_key: Option<Secret>,
    /// See [`Config::stripe_api_base`].
    pub stripe_api_base: Option<String>,
    /// See [`Config::stripe_webhook_secret`].
    pub stripe_webhook_secret: Option<Secret>,
    /// See [`Config::stripe_dispute_freeze`].
    pub stripe_dispute_freeze: Option<bool>,
    /// See [`Config::stripe_reconcile_secs`].
    pub stripe_reconcile_secs: Option<u64>,
    /// See [`Config::webhook_retry_base_ms`].
    pub webhook_retry_base_ms: Option<u64>,
    /// See [`Config::alert_low_balance_usd`].
    pub alert_low_balance_usd: Option<rust_decimal::Decimal>,
    /// See [`Config::alert_grant_expiring_secs`].
    pub alert_grant_expiring_secs: Option<u64>,
    /// See [`Config::portal_public_url`].
    pub portal_public_url: Option<String>,
    /// See [`Config::portal_idle_secs`].
    pub portal_idle_secs: Option<u64>,
    /// See [`Config::portal_session_max_secs`].
    pub portal_session_max_secs: Option<u64>,
    /// See [`Config::portal_stripe_js`].
    pub portal_stripe_js: Option<String>,
    /// See [`Config::portal_frame_ancestors`].
    pub portal_frame_ancestors: Option<Vec<String>>,
    /// See [`Config::stripe_publishable_key`].
    pub stripe_publishable_key: Option<String>,
    /// See [`Config::tls_cert`].
    pub tls_cert: Option<PathBuf>,
    /// See [`Config::tls_key`].
    pub tls_key: Option<PathBuf>,
    /// See [`Config::connections_max`].
    pub connections_max: Option<u32>,
    /// See [`Config::streams_max`].
    pub streams_max: Option<u32>,
    /// See [`Config::in_flight_max`].
    pub in_flight_max: Option<u32>,
    /// See [`Config::net_threads`].
    pub net_threads: Option<usize>,
}

/// A configuration problem, naming the setting and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

const ENV: &[(&str, &str)] = &[
    ("TALLY_DATA_DIR", "data_dir"),
    ("TALLY_SHARDS", "shards"),
    ("TALLY_DURABILITY", "durability"),
    ("TALLY_WAL_SEGMENT_BYTES", "wal_segment_bytes"),
    ("TALLY_BATCH_MAX", "batch_max"),
    ("TALLY_QUEUE_DEPTH", "queue_depth"),
    ("TALLY_OUTBOUND_QUEUE_DEPTH", "outbound_queue_depth"),
    ("TALLY_SNAPSHOT_EVERY_RECORDS", "snapshot_every_records"),
    ("TALLY_SNAPSHOT_EVERY_SECS", "snapshot_every_secs"),
    ("TALLY_SNAPSHOTS_KEEP", "snapshots_keep"),
    (
        "TALLY_IDEMPOTENCY_RETENTION_SECS",
        "idempotency_retention_secs",
    ),
    ("TALLY_IDEMPOTENCY_MAX_IDS", "idempotency_max_ids"),
    ("TALLY_LISTEN", "listen"),
    ("TALLY_HTTP_LISTEN", "http_listen"),
    ("TALLY_AUTH_DEADLINE_MS", "auth_deadline_ms"),
    ("TALLY_UNAUTHENTICATED_MAX", "unauthenticated_max"),
    ("TALLY_HTTP_TLS", "http_tls"),
    ("TALLY_HISTORY_STORE", "history_store"),
    ("TALLY_EXPORT_JSONL", "export_jsonl"),
    ("TALLY_JSONL_ROTATE_BYTES", "jsonl_rotate_bytes"),
    ("TALLY_JSONL_ROTATE_SECS", "jsonl_rotate_secs"),
    ("TALLY_JSONL_KEEP", "jsonl_keep"),
    ("TALLY_HISTORY_RETENTION_DAYS", "history_retention_days"),
    ("TALLY_REFUND_WINDOW_DAYS", "refund_window_days"),
    ("TALLY_EXPORT_POSTGRES", "export_postgres"),
    ("TALLY_STRIPE_SECRET_KEY", "stripe_secret_key"),
    ("TALLY_STRIPE_API_BASE", "stripe_api_base"),
    ("TALLY_STRIPE_WEBHOOK_SECRET", "stripe_webhook_secret"),
    ("TALLY_STRIPE_DISPUTE_FREEZE", "stripe_dispute_freeze"),
    ("TALLY_STRIPE_RECONCILE_SECS", "stripe_reconcile_secs"),
    ("TALLY_WEBHOOK_RETRY_BASE_MS", "webhook_retry_base_ms"),
    ("TALLY_ALERT_LOW_BALANCE_USD", "alert_low_balance_usd"),
    (
        "TALLY_ALERT_GRANT_EXPIRING_SECS",
        "alert_grant_expiring_secs",
    ),
    ("TALLY_PORTAL_PUBLIC_URL", "portal_public_url"),
    ("TALLY_PORTAL_IDLE_SECS", "portal_idle_secs"),
    ("TALLY_PORTAL_SESSION_MAX_SECS", "portal_session_max_secs"),
    ("TALLY_PORTAL_STRIPE_JS", "portal_stripe_js"),
    ("TALLY_PORTAL_FRAME_ANCESTORS", "portal_frame_ancestors"),
    ("TALLY_STRIPE_PUBLISHABLE_KEY", "stripe_publishable_key"),
    ("TALLY_TLS_CERT", "tls_cert"),
    ("TALLY_TLS_KEY", "tls_key"),
    ("TALLY_CONNECTIONS_MAX", "connections_max"),
    ("TALLY_STREAMS_MAX", "streams_max"),
    ("TALLY_IN_FLIGHT_MAX", "in_flight_max"),
    ("TALLY_NET_THREADS", "net_threads"),
];

impl Overrides {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Overrides, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// Reads `TALLY_*` variables through `get` (the process environment in production).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Overrides, ConfigError> {
        let mut table = toml::Table::new();
        for (var, key) in ENV {
            if let Some(value) = get(var) {
                let parsed = match *key {
                    "data_dir"
                    | "durability"
                    | "listen"
                    | "http_listen"
                    | "tls_cert"
                    | "tls_key"
                    | "export_postgres"
                    | "stripe_secret_key"
                    | "stripe_api_base"
                    | "stripe_webhook_secret"
                    | "alert_low_balance_usd"
                    | "portal_public_url"
                    | "portal_stripe_js"
                    | "stripe_publishable_key" => toml::Value::String(value),
                    // Space- or comma-separated origins.
                    "portal_frame_ancestors" => toml::Value::Array(
                        value
                            .split([',', ' '])
                            .filter(|o| !o.is_empty())
                            .map(|o| toml::Value::String(o.to_string()))
                            .collect(),
                    ),
                    "http_tls" | "export_jsonl" | "history_store" | "stripe_dispute_freeze" => {
                        match value.trim() {
                            "1" | "true" => toml::Value::Boolean(true),
                            "0" | "false" => toml::Value::Boolean(false),
                            _ => return Err(ConfigError(format!("{var} is not true or false"))),
                        }
                    }
                    // The value is not echoed: a variable may hold a secret.
                    _ => value
                        .trim()
                        .parse::<i64>()
                        .map(toml::Value::Integer)
                        .map_err(|_| ConfigError(format!("{var} is not a whole number")))?,
                };
                table.insert((*key).to_string(), parsed);
            }
        }
        Overrides::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError(format!("environment: {e}")))
    }

    /// Applies these overrides on top of `config`.
    pub fn apply(self, config: &mut Config) {
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { config.$field = v; } )* };
        }
        take!(
            data_dir,
            shards,
            durability,
            wal_segment_bytes,
            batch_max,
            queue_depth,
            outbound_queue_depth,
            snapshot_every_records,
            snapshot_every_secs,
            snapshots_keep,
            idempotency_retention_secs,
            idempotency_max_ids,
            listen,
            http_listen,
            auth_deadline_ms,
            unauthenticated_max,
            http_tls,
            history_store,
            export_jsonl,
            jsonl_rotate_bytes,
            jsonl_rotate_secs,
            jsonl_keep,
            history_retention_days,
            refund_window_days,
            stripe_dispute_freeze,
            stripe_reconcile_secs,
            webhook_retry_base_ms,
            alert_low_balance_usd,
            alert_grant_expiring_secs,
            portal_idle_secs,
            portal_session_max_secs,
            portal_stripe_js,
            portal_frame_ancestors,
            connections_max,
            streams_max,
            in_flight_max,
            net_threads
        );
        if self.tls_cert.is_some() {
            config.tls_cert = self.tls_cert;
        }
        if self.portal_public_url.is_some() {
            config.portal_public_url = self.portal_public_url;
        }
        if self.stripe_publishable_key.is_some() {
            config.stripe_publishable_key = self.stripe_publishable_key;
        }
        if self.tls_key.is_some() {
            config.tls_key = self.tls_key;
        }
        if self.export_postgres.is_some() {
            config.export_postgres = self.export_postgres;
        }
        if self.stripe_secret_key.is_some() {
            config.stripe_secret_key = self.stripe_secret_key;
        }
        if self.stripe_api_base.is_some() {
            config.stripe_api_base = self.stripe_api_base;
        }
        if self.stripe_webhook_secret.is_some() {
            config.stripe_webhook_secret = self.stripe_webhook_secret;
        }
    }
}

impl Config {
    /// The Stripe worker's settings.
    pub fn stripe(&self) -> tally_outbound::stripe::StripeConfig {
        tally_outbound::stripe::StripeConfig {
            secret_key: self.stripe_secret_key.as_ref().map(|s| s.0.clone()),
            api_base: self.stripe_api_base.clone(),
            webhook_secret: self.stripe_webhook_secret.as_ref().map(|s| s.0.clone()),
            dispute_freeze: self.stripe_dispute_freeze,
            reconcile_after: std::time::Duration::from_secs(self.stripe_reconcile_secs),
        }
    }

    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |setting: &str, why: &str| Err(ConfigError(format!("{setting}: {why}")));
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir", "must not be empty");
        }
        if !(1..=256).contains(&self.shards) {
            return bad("shards", "must be between 1 and 256");
        }
        if !(tally_wal::SEGMENT_BYTES_MIN..=tally_wal::SEGMENT_BYTES_MAX)
            .contains(&self.wal_segment_bytes)
            || self.wal_segment_bytes % 4096 != 0
        {
            return bad(
                "wal_segment_bytes",
                "must be a multiple of 4096 between 64 KiB and 1 GiB",
            );
        }
        if self.wal_segment_bytes < 64 * 1024 {
            return bad("wal_segment_bytes", "must be at least 64 KiB");
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("listen", "must be an address like 127.0.0.1:7400");
        }
        if !(10..=600_000).contains(&self.auth_deadline_ms) {
            return bad("auth_deadline_ms", "must be between 10 and 600000");
        }
        if !(1..=1_000_000).contains(&self.unauthenticated_max) {
            return bad("unauthenticated_max", "must be between 1 and 1000000");
        }
        if self.http_listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("http_listen", "must be an address like 127.0.0.1:7480");
        }
        if self.jsonl_rotate_bytes < 4096 || self.jsonl_rotate_secs == 0 || self.jsonl_keep == 0 {
            return bad(
                "jsonl_rotate_bytes",
                "JSON-lines rotation needs at least 4096 bytes, 1 second and 1 kept file",
            );
        }
        if self.refund_window_days > 366 {
            return bad("refund_window_days", "must be between 0 and 366");
        }
        if self.export_postgres.is_some() && !self.history_store {
            return bad(
                "export_postgres",
                "the PostgreSQL export copies the history store: keep history_store on",
            );
        }
        if let Some(base) = &self.stripe_api_base {
            if !(base.starts_with("https://") || base.starts_with("http://"))
                || !base.ends_with('/')
            {
                return bad(
                    "stripe_api_base",
                    "must be an http(s) URL ending in `/`, like https://api.stripe.com/",
                );
            }
        }
        if !(60..=82_800).contains(&self.stripe_reconcile_secs) {
            return bad(
                "stripe_reconcile_secs",
                "must be between 60 and 82800 (23 hours: Stripe keeps idempotency keys 24 hours)",
            );
        }
        if !(10..=3_600_000).contains(&self.webhook_retry_base_ms) {
            return bad(
                "webhook_retry_base_ms",
                "must be between 10 and 3600000 (one hour)",
            );
        }
        if self.alert_low_balance_usd < rust_decimal::Decimal::ZERO
            || self.alert_low_balance_usd > tally_engine::AMOUNT_MAX
        {
            return bad(
                "alert_low_balance_usd",
                "must be a decimal string between \"0\" and the largest amount",
            );
        }
        let url = |v: &str| v.starts_with("https://") || v.starts_with("http://");
        if self.portal_public_url.as_deref().is_some_and(|u| !url(u)) {
            return bad("portal_public_url", "must be an http(s) URL");
        }
        if !url(&self.portal_stripe_js) {
            return bad("portal_stripe_js", "must be an http(s) URL");
        }
        if let Some(o) = self
            .portal_frame_ancestors
            .iter()
            .find(|o| !url(o) || o.contains([';', '\'', '"', ' ']))
        {
            return bad(
                "portal_frame_ancestors",
                &format!("{o:?} is not an http(s) origin"),
            );
        }
        if !(1..=86_400).contains(&self.portal_idle_secs) {
            return bad("portal_idle_secs", "must be between 1 and 86400");
        }
        if !(60..=7 * 86_400).contains(&self.portal_session_max_secs) {
            return bad(
                "portal_session_max_secs",
                "must be between 60 and 604800 (7 days)",
            );
        }
        if self.alert_grant_expiring_secs > 366 * 86_400 {
            return bad(
                "alert_grant_expiring_secs",
                "must be between 0 and 31622400 (366 days)",
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert", "tls_cert and tls_key must be set together");
        }
        if !(1..=1_000_000).contains(&self.connections_max) {
            return bad("connections_max", "must be between 1 and 1000000");
        }
        if !(1..=10_000).contains(&self.streams_max) {
            return bad("streams_max", "must be between 1 and 10000");
        }
        if !(1..=1_000_000).contains(&self.in_flight_max) {
            return bad("in_flight_max", "must be between 1 and 1000000");
        }
        if !(1..=256).contains(&self.net_threads) {
            return bad("net_threads", "must be between 1 and 256");
        }
        if !(1..=65_536).contains(&self.batch_max) {
            return bad("batch_max", "must be between 1 and 65536");
        }
        if !(1..=1 << 24).contains(&self.queue_depth) {
            return bad("queue_depth", "must be between 1 and 16777216");
        }
        if !(1..=1 << 24).contains(&self.outbound_queue_depth) {
            return bad("outbound_queue_depth", "must be between 1 and 16777216");
        }
        if !(1..=1000).contains(&self.snapshots_keep) {
            return bad("snapshots_keep", "must be between 1 and 1000");
        }
        if !(1_000..=1 << 31).contains(&self.idempotency_max_ids) {
            return bad("idempotency_max_ids", "must be between 1000 and 2147483648");
        }
        if !(1..=366 * 24 * 3600).contains(&self.idempotency_retention_secs) {
            return bad(
                "idempotency_retention_secs",
                "must be between 1 and 31622400 (366 days)",
            );
        }
        Ok(())
    }

    /// The engine settings this configuration implies.
    pub fn engine(&self) -> tally_engine::Config {
        tally_engine::Config {
            idempotency_retention_us: self.idempotency_retention_secs as i64 * 1_000_000,
            idempotency_max_ids: self.idempotency_max_ids,
            low_balance_usd: self.alert_low_balance_usd,
            grant_expiring_lead_us: self.alert_grant_expiring_secs as i64 * 1_000_000,
            ..tally_engine::Config::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_url_in_the_environment_is_text_and_never_echoed() {
        let url = "postgresql://tally:s3cret@db.internal:5432/history";
        let env =
            Overrides::from_env(|k| (k == "TALLY_EXPORT_POSTGRES").then(|| url.into())).unwrap();
        assert_eq!(env.export_postgres.as_deref(), Some(url));
        let error = Overrides::from_env(|k| (k == "TALLY_SHARDS").then(|| "s3cret".into()))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("TALLY_SHARDS") && !error.contains("s3cret"),
            "{error}"
        );
    }

    #[test]
    fn sources_merge_in_order_and_errors_name_the_setting() {
        let mut config = Config::default();
        let file: Overrides = toml::from_str("shards = 3\nbatch_max = 10\n").unwrap();
        file.apply(&mut config);
        let env = Overrides::from_env(|k| (k == "TALLY_SHARDS").then(|| "5".to_string())).unwrap();
        env.apply(&mut config);
        assert_eq!((config.shards, config.batch_max), (5, 10));
        config.validate().unwrap();

        let error = Overrides::from_env(|k| (k == "TALLY_SHARDS").then(|| "many".into()));
        assert!(error.unwrap_err().0.contains("TALLY_SHARDS"));
        let unknown = toml::from_str::<Overrides>("shard = 3\n");
        assert!(unknown.is_err(), "unknown keys are refused");
        config.shards = 0;
        assert!(config.validate().unwrap_err().0.starts_with("shards"));
        let mut config = Config {
            durability: DurabilitySetting::None,
            ..Config::default()
        };
        config.wal_segment_bytes = 1000;
        assert!(config
            .validate()
            .unwrap_err()
            .0
            .starts_with("wal_segment_bytes"));
        let bad_durability =
            Overrides::from_env(|k| (k == "TALLY_DURABILITY").then(|| "maybe".into()));
        assert!(bad_durability.is_err());
    }
}
