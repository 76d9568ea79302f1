//! tally's HTTP/JSON API: every engine operation under `/v1`, its OpenAPI 3.1 document, and the
//! operator endpoints (`/metrics` in Prometheus text, `/healthz`, `/readyz`).
//!
//! The API is a thin edge. A handler authenticates the caller (`Authorization: Bearer <key>`,
//! the same keys and scopes as QUIC), turns the `Idempotency-Key` header into the engine's
//! request id ([`idempotency`]), parses and validates the JSON body into an engine command
//! ([`model`]), hands it to the same [`tally_net::Backend`] the QUIC server uses (so there is
//! no second path into the shards), and maps the engine's [`tally_engine::ResultCode`] to one
//! documented HTTP status and error body ([`error`]). No billing rule lives here.
//!
//! What this crate deliberately does not know: shards, WALs and threads (the `Backend` does);
//! how keys are stored (`tally_net::keys` does); where the process's metrics recorder comes from
//! (the binary installs it and passes the handle in).
//!
//! The server is hyper's HTTP/1.1 on the caller's tokio runtime, plain or TLS (the certificate
//! QUIC uses). Connections, header read time and body size are bounded.

pub mod console;
pub mod error;
pub mod idempotency;
pub mod json;
pub mod model;
pub mod openapi;
pub mod portal;
mod routes;
mod session;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tally_net::{Backend, KeyStore};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use error::{ApiError, ErrorBody};

/// The largest request body accepted (a batch of 8,192 small events fits).
pub const BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Most wallets one page of `GET /v1/wallets` returns.
pub const PAGE_LIMIT_MAX: u32 = 100;

/// What the API serves from: the backend (set once recovery is done), the keys, the metrics.
pub struct ApiState {
    backend: OnceLock<Arc<dyn Backend>>,
    history: OnceLock<Arc<tally_outbound::sqlite::Reader>>,
    stripe: OnceLock<Arc<tally_outbound::stripe::Stripe>>,
    payments: OnceLock<tally_outbound::payments::Payments>,
    portal: OnceLock<Arc<portal::Portal>>,
    console: console::Console,
    keys: Arc<KeyStore>,
    metrics: Option<PrometheusHandle>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("ready", &self.backend.get().is_some())
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// A state with no backend yet: until [`ApiState::set_backend`], `/healthz` answers, the key
    /// routes work (keys do not live in the shards), and every route that needs the shards is
    /// `503 NotReady`.
    pub fn new(keys: Arc<KeyStore>, metrics: Option<PrometheusHandle>) -> Arc<ApiState> {
        Arc::new(ApiState {
            backend: OnceLock::new(),
            history: OnceLock::new(),
            stripe: OnceLock::new(),
            payments: OnceLock::new(),
            portal: OnceLock::new(),
            console: console::Console::default(),
            keys,
            metrics,
        })
    }

    /// Sets the backend once recovery is done. A second call is ignored.
    pub fn set_backend(&self, backend: Arc<dyn Backend>) {
        let _ = self.backend.set(backend);
    }

    /// Sets the Stripe worker, which receives Stripe's webhooks. A second call is ignored.
    pub fn set_stripe(&self, stripe: Arc<tally_outbound::stripe::Stripe>) {
        let _ = self.stripe.set(stripe);
    }

    /// Sets the payments store (webhook endpoints and their delivery log, callers' top-ups).
    /// A second call is ignored.
    pub fn set_payments(&self, payments: tally_outbound::payments::Payments) {
        let _ = self.payments.set(payments);
    }

    fn payments(&self) -> Result<&tally_outbound::payments::Payments, ApiError> {
        self.payments
            .get()
            .ok_or_else(|| ApiError::from_code(tally_net::ErrorCode::NotReady))
    }

    fn stripe(&self) -> Result<&Arc<tally_outbound::stripe::Stripe>, ApiError> {
        self.stripe
            .get()
            .ok_or_else(|| ApiError::from_code(tally_net::ErrorCode::NotReady))
    }

    /// The seller's console sessions.
    pub fn console(&self) -> &console::Console {
        &self.console
    }

    /// Enables the billing portal. A second call is ignored.
    pub fn set_portal(&self, portal: portal::Portal) {
        let _ = self.portal.set(Arc::new(portal));
    }

    /// Sets the history store's reader. A second call is ignored.
    pub fn set_history(&self, reader: Arc<tally_outbound::sqlite::Reader>) {
        let _ = self.history.set(reader);
    }

    fn history(&self) -> Result<&Arc<tally_outbound::sqlite::Reader>, ApiError> {
        self.history.get().ok_or_else(|| {
            ApiError::transport(
                tally_net::ErrorCode::NotFound,
                "this server keeps no history store",
            )
        })
    }

    fn backend(&self) -> Result<&Arc<dyn Backend>, ApiError> {
        self.backend
            .get()
            .ok_or_else(|| ApiError::from_code(tally_net::ErrorCode::NotReady))
    }
}

/// Where and how the API listens.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The address to bind.
    pub listen: SocketAddr,
    /// TLS, or `None` for plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Most connections open at once; more are closed at once.
    pub connections_max: usize,
    /// A connection must send a request's headers within this long.
    pub header_timeout: Duration,
}

impl ApiConfig {
    /// Plain HTTP on `listen` with the default limits.
    pub fn plain(listen: SocketAddr) -> ApiConfig {
        ApiConfig {
            listen,
            tls: None,
            connections_max: 1024,
            header_timeout: Duration::from_secs(30),
        }
    }
}

/// A running API server.
#[derive(Debug)]
pub struct ApiServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    /// Binds and starts serving on the current tokio runtime.
    pub async fn start(config: ApiConfig, state: Arc<ApiState>) -> std::io::Result<ApiServer> {
        let listener = TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        let app = routes::router(state);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, app, config, stopped));
        Ok(ApiServer {
            local_addr,
            stop,
            task,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets requests in progress finish, and returns when every connection
    /// closed (or after 10 s).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// The tls config for HTTP/1.1 over `crypto` (ALPN `http/1.1`).
pub fn tls_config(mut crypto: rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    crypto.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(crypto)
}

async fn accept_loop(
    listener: TcpListener,
    app: axum::Router,
    config: ApiConfig,
    mut stopped: watch::Receiver<bool>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let acceptor = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        if open.load(Ordering::Relaxed) >= config.connections_max {
            metrics::counter!("tally_connections_refused_total", "transport" => "http")
                .increment(1);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        open.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("tally_connections_open", "transport" => "http").increment(1.0);
        let app = app.clone();
        let acceptor = acceptor.clone();
        let stopped = stopped.clone();
        let open = Arc::clone(&open);
        let header_timeout = config.header_timeout;
        connections.spawn(async move {
            match acceptor {
                None => serve_connection(stream, app, header_timeout, stopped).await,
                Some(acceptor) => {
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_connection(tls, app, header_timeout, stopped).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "http: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "http: TLS handshake timed out"),
                    }
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!("tally_connections_open", "transport" => "http").decrement(1.0);
        });
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}

async fn serve_connection<S>(
    io: S,
    app: axum::Router,
    header_timeout: Duration,
    mut stopped: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = stopped.changed() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
