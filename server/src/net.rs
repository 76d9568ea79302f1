//! The network front: `tally-net`'s QUIC server in front of this crate's [`Handle`].
//!
//! [`ShardBackend`] implements [`tally_net::Backend`]: wallet commands, batches and queries are
//! queued on their shard at once and awaited without blocking a runtime thread; catalog commands
//! (which wait for every shard in turn) and checkpoints run on the blocking pool.
//! [`tls_crypto`] loads the TLS identity (the configured pair, or `<data-dir>/tls/` generated on
//! the first start), [`open_keys`] the API keys (`<data-dir>/keys.json`; the initial admin key
//! from `TALLY_ADMIN_KEY` or generated into `<data-dir>/admin.key`, never logged), and
//! [`start_quic`] starts listening; [`start_network`] does all three.

use std::future::ready;
use std::sync::Arc;

use tally_engine::{Query, QueryReply, Reply, Request, ResultCode, WalletFilter, WalletPage};
use tally_net::keys::{Bootstrap, KeyStore};
use tally_net::message::CheckpointInfo;
use tally_net::server::{Backend, BoxFuture, Limits, NetServer};
use tally_net::{tls, ErrorCode, Outcome};

use crate::config::Config;
use crate::handle::Handle;
use crate::server::Error;
use crate::shard::CallError;

/// The shards, as the network server sees them.
#[derive(Clone)]
pub struct ShardBackend {
    handle: Handle,
    /// Where refunds past the idempotency window find their charge.
    refunds: Option<Arc<Refunds>>,
}

impl std::fmt::Debug for ShardBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardBackend")
            .field("handle", &self.handle)
            .field("late_refunds", &self.refunds.is_some())
            .finish()
    }
}

/// The history store, read for refunds of charges the engine no longer remembers.
struct Refunds {
    history: tally_outbound::sqlite::Reader,
    window_us: i64,
}

impl ShardBackend {
    /// A backend over `handle`, without refunds past the idempotency window.
    pub fn new(handle: Handle) -> ShardBackend {
        ShardBackend {
            handle,
            refunds: None,
        }
    }

    /// A backend over `handle` that gives a refund the charge the history store recorded for
    /// its event (when `config` keeps the store and a refund window), so that charges older
    /// than the idempotency window stay refundable for `refund_window_days`.
    pub fn with_history(handle: Handle, config: &Config) -> Result<ShardBackend, Error> {
        let refunds = if config.history_store && config.refund_window_days > 0 {
            let history = tally_outbound::sqlite::Reader::open(&config.data_dir)
                .map_err(|e| Error(e.to_string()))?;
            Some(Arc::new(Refunds {
                history,
                window_us: i64::from(config.refund_window_days) * tally_engine::Timestamp::DAY_US,
            }))
        } else {
            None
        };
        Ok(ShardBackend { handle, refunds })
    }
}

/// The transport code for a shard call's failure.
pub fn error_code(error: &CallError) -> ErrorCode {
    match error {
        CallError::Busy => ErrorCode::Busy,
        CallError::Stopped => ErrorCode::Stopped,
        CallError::Poisoned(_) => ErrorCode::Poisoned,
        CallError::TooLarge => ErrorCode::RequestTooLarge,
        CallError::Checkpoint(_) => ErrorCode::SnapshotFailed,
        // The data directory cannot be written: as for a failed WAL, an operator must look.
        CallError::Catalog(_) => ErrorCode::Poisoned,
    }
}

/// The answer to a request over the engine's size limits, given before it is logged.
fn over_limits(request: &Request) -> Option<Reply> {
    request.command.check_shape().err().map(|code| Reply {
        code,
        value: tally_engine::ReplyValue::None,
    })
}

impl Backend for ShardBackend {
    fn command(&self, request: Request) -> BoxFuture<Result<Reply, ErrorCode>> {
        if let Some(reply) = over_limits(&request) {
            return Box::pin(ready(Ok(reply)));
        }
        if let (Some(refunds), tally_engine::Command::Refund { wallet, event, .. }) =
            (&self.refunds, &request.command)
        {
            // The store's read may wait behind a long analytics query: off the runtime threads.
            let (refunds, handle) = (Arc::clone(refunds), self.handle.clone());
            let (wallet, event, id) = (*wallet, *event, request.id);
            return Box::pin(async move {
                let lookup = tokio::task::spawn_blocking(move || {
                    refunds
                        .history
                        .recorded_charge(wallet.as_str(), event, id, refunds.window_us)
                })
                .await;
                let pending = match lookup {
                    Ok(Ok(Some(charge))) => handle.submit_recorded_refund(request, charge),
                    Ok(Ok(None)) => handle.submit(request),
                    Ok(Err(e)) => {
                        // Not applied: the caller retries (an answer now would be remembered).
                        tracing::warn!(error = %e, "a refund could not read its charge");
                        return Err(ErrorCode::Busy);
                    }
                    Err(_) => return Err(ErrorCode::Stopped),
                };
                pending
                    .map_err(|e| error_code(&e))?
                    .await
                    .map_err(|e| error_code(&e))
            });
        }
        if request.command.wallet().is_none() {
            let handle = self.handle.clone();
            let task = tokio::task::spawn_blocking(move || handle.call(request));
            return Box::pin(async move {
                match task.await {
                    Ok(result) => result.map_err(|e| error_code(&e)),
                    Err(_) => Err(ErrorCode::Stopped),
                }
            });
        }
        match self.handle.submit(request) {
            Ok(pending) => Box::pin(async move { pending.await.map_err(|e| error_code(&e)) }),
            Err(e) => Box::pin(ready(Err(error_code(&e)))),
        }
    }

    fn batch(&self, requests: Vec<Request>) -> BoxFuture<Result<Vec<Outcome>, ErrorCode>> {
        // Items over the limits are answered here and never logged; the rest go to the shards.
        if requests.iter().any(|r| over_limits(r).is_some()) {
            let answers: Vec<Option<Reply>> = requests.iter().map(over_limits).collect();
            let fine: Vec<Request> = requests
                .into_iter()
                .zip(&answers)
                .filter(|(_, a)| a.is_none())
                .map(|(r, _)| r)
                .collect();
            let pending = self.batch(fine);
            return Box::pin(async move {
                let mut applied = pending.await?.into_iter();
                Ok(answers
                    .into_iter()
                    .map(|a| match a {
                        Some(reply) => Ok(reply),
                        None => applied.next().unwrap_or(Err(ErrorCode::Stopped)),
                    })
                    .collect())
            });
        }
        match self.handle.submit_batch(requests) {
            Ok(pending) => Box::pin(async move {
                Ok(pending
                    .recv()
                    .await
                    .into_iter()
                    .map(|r| r.map_err(|e| error_code(&e)))
                    .collect())
            }),
            Err(e) => Box::pin(ready(Err(error_code(&e)))),
        }
    }

    fn query(&self, query: Query) -> BoxFuture<Result<Result<QueryReply, ResultCode>, ErrorCode>> {
        match self.handle.submit_query(query) {
            Ok(pending) => {
                Box::pin(async move { pending.recv().await.map_err(|e| error_code(&e)) })
            }
            Err(e) => Box::pin(ready(Err(error_code(&e)))),
        }
    }

    fn list_wallets(
        &self,
        shard: u32,
        from: u32,
        limit: u32,
        filter: WalletFilter,
    ) -> BoxFuture<Result<WalletPage, ErrorCode>> {
        if shard >= self.handle.shard_count() {
            return Box::pin(ready(Err(ErrorCode::Malformed)));
        }
        match self.handle.submit_list_wallets(shard, from, limit, filter) {
            Ok(rx) => Box::pin(async move {
                rx.await
                    .unwrap_or(Err(CallError::Stopped))
                    .map_err(|e| error_code(&e))
            }),
            Err(e) => Box::pin(ready(Err(error_code(&e)))),
        }
    }

    fn snapshot(&self) -> BoxFuture<Result<Vec<CheckpointInfo>, String>> {
        let handle = self.handle.clone();
        let task = tokio::task::spawn_blocking(move || handle.checkpoint());
        Box::pin(async move {
            match task.await {
                Ok(Ok(reports)) => Ok(reports
                    .into_iter()
                    .enumerate()
                    .map(|(shard, r)| CheckpointInfo {
                        shard: shard as u32,
                        lsn: r.lsn,
                        digest: r.digest,
                        stall_us: r.stall_us,
                    })
                    .collect()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("the checkpoint task failed: {e}")),
            }
        })
    }

    fn shards(&self) -> (u32, u32) {
        (self.handle.shard_count(), self.handle.shards_running())
    }

    fn sinks(&self) -> Vec<tally_net::SinkLag> {
        self.handle
            .sink_lags()
            .into_iter()
            .map(|(name, effects, lag_us)| tally_net::SinkLag {
                name: name.into(),
                effects,
                lag_us,
            })
            .collect()
    }
}

/// The network limits a configuration asks for.
pub fn limits(config: &Config) -> Limits {
    Limits {
        connections_max: config.connections_max,
        unauthenticated_max: config.unauthenticated_max,
        streams_max: config.streams_max,
        in_flight_max: config.in_flight_max,
        auth_deadline: std::time::Duration::from_millis(config.auth_deadline_ms),
        ..Limits::default()
    }
}

/// The TLS identity: the configured pair, or the one generated in `<data-dir>/tls/` on the first
/// start. QUIC and (with `http_tls`) HTTP serve the same certificate.
pub fn tls_crypto(config: &Config) -> Result<rustls::ServerConfig, Error> {
    let identity = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            tls::load_identity(cert, key).map_err(|e| Error(format!("tls: {e}")))?
        }
        _ => {
            let (identity, made) =
                tls::self_signed(&config.data_dir).map_err(|e| Error(format!("tls: {e}")))?;
            if made {
                tracing::info!(
                    cert = %tls::generated_paths(&config.data_dir).0.display(),
                    "generated a self-signed TLS certificate (clients pin this file)"
                );
            }
            identity
        }
    };
    tls::server_crypto(identity).map_err(|e| Error(format!("tls: {e}")))
}

/// Opens the API keys shared by QUIC and HTTP. `admin_key` is the operator's `TALLY_ADMIN_KEY`
/// (used only when the data directory has no keys yet). A generated key is never logged: the log
/// says which file holds it.
pub fn open_keys(config: &Config, admin_key: Option<&str>) -> Result<Arc<KeyStore>, Error> {
    let (keys, bootstrap) =
        KeyStore::open(&config.data_dir, admin_key).map_err(|e| Error(e.to_string()))?;
    match bootstrap {
        Bootstrap::Existing => {}
        Bootstrap::FromOperator => {
            tracing::info!("the initial admin key is the one in TALLY_ADMIN_KEY (stored hashed)")
        }
        Bootstrap::Generated { file, .. } => tracing::warn!(
            file = %file.display(),
            "generated the initial admin key; it is in this file (mode 0600) and nowhere else"
        ),
    }
    Ok(Arc::new(keys))
}

/// Sets up TLS and keys and starts the QUIC listener; call inside a tokio runtime. `admin_key`
/// is the operator's `TALLY_ADMIN_KEY` (used only when the data directory has no keys yet).
pub fn start_network(
    config: &Config,
    handle: Handle,
    admin_key: Option<&str>,
) -> Result<NetServer, Error> {
    let crypto = tls_crypto(config)?;
    let keys = open_keys(config, admin_key)?;
    start_quic(config, handle, keys, crypto)
}

/// Starts the QUIC listener on `crypto` and `keys`; call inside a tokio runtime.
pub fn start_quic(
    config: &Config,
    handle: Handle,
    keys: Arc<KeyStore>,
    crypto: rustls::ServerConfig,
) -> Result<NetServer, Error> {
    let listen = config
        .listen
        .parse()
        .map_err(|_| Error(format!("listen: {:?} is not an address", config.listen)))?;
    let backend = Arc::new(ShardBackend::with_history(handle, config)?);
    NetServer::start(
        listen,
        crypto,
        limits(config),
        Arc::new(crate::observe::Counted::new(backend, "quic")),
        keys,
    )
    .map_err(|e| Error(e.to_string()))
}
