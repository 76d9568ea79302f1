//! The HTTP front: `tally-api` over the same [`ShardBackend`] as QUIC, and the process's
//! Prometheus recorder.
//!
//! The API server starts before recovery so that `/healthz` answers and `/readyz` says
//! "recovering" while the shards replay their WALs; [`ready`] hands it the backend afterwards.

use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tally_api::{ApiConfig, ApiServer, ApiState};
use tally_net::KeyStore;

use crate::config::Config;
use crate::handle::Handle;
use crate::net::ShardBackend;
use crate::server::Error;

/// The process-wide Prometheus recorder, installed on first use. `None` if another recorder was
/// installed first (then `/metrics` answers 404).
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("tally_shard_batch_size".into()),
                    &[
                        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
                        4096.0,
                    ],
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// Starts the HTTP API on `config.http_listen` (TLS with `crypto` when `config.http_tls`); call
/// inside a tokio runtime. Until [`ready`], every `/v1` route answers `503 NotReady`.
pub async fn start_http(
    config: &Config,
    keys: Arc<KeyStore>,
    crypto: Option<rustls::ServerConfig>,
) -> Result<(Arc<ApiState>, ApiServer), Error> {
    let listen = config.http_listen.parse().map_err(|_| {
        Error(format!(
            "http_listen: {:?} is not an address",
            config.http_listen
        ))
    })?;
    let mut api = ApiConfig::plain(listen);
    if !config.http_tls && !std::net::SocketAddr::ip(&listen).is_loopback() {
        tracing::warn!(
            "the HTTP API listens on {listen} without TLS: API keys and amounts cross the network \
             in clear; use --http-tls (or a TLS proxy in front) beyond loopback"
        );
    }
    if config.http_tls {
        let crypto = crypto.ok_or_else(|| Error("http_tls needs a TLS identity".into()))?;
        api.tls = Some(tally_api::tls_config(crypto));
    }
    api.connections_max = config.connections_max as usize;
    let state = ApiState::new(keys, metrics_handle());
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| Error(format!("cannot create {}: {e}", config.data_dir.display())))?;
    // No store, no history routes (404), rather than answers from a file nothing writes.
    if config.history_store {
        let history = tally_outbound::sqlite::Reader::open(&config.data_dir)
            .map_err(|e| Error(e.to_string()))?;
        state.set_history(Arc::new(history));
    }
    let server = ApiServer::start(api, Arc::clone(&state))
        .await
        .map_err(|e| Error(format!("http_listen {}: {e}", config.http_listen)))?;
    // Links name the address actually bound (port 0 picks one) unless a public URL is set.
    let public_url = config.portal_public_url.clone().unwrap_or_else(|| {
        let scheme = if config.http_tls { "https" } else { "http" };
        format!("{scheme}://{}", server.local_addr())
    });
    // Cookies are Secure under TLS, and also when the public URL is https (a TLS proxy in
    // front of a plain listener).
    let cookies_secure = config.http_tls || public_url.starts_with("https://");
    let portal = tally_api::portal::Portal::open(
        &config.data_dir,
        tally_api::portal::PortalConfig {
            public_url: public_url.trim_end_matches('/').to_string(),
            idle: std::time::Duration::from_secs(config.portal_idle_secs),
            max: std::time::Duration::from_secs(config.portal_session_max_secs),
            stripe_js: config.portal_stripe_js.clone(),
            stripe_key: config.stripe_publishable_key.clone().unwrap_or_default(),
            frame_ancestors: config.portal_frame_ancestors.clone(),
            secure: cookies_secure,
        },
    )
    .map_err(Error)?;
    state.set_portal(portal);
    state.console().set_secure(cookies_secure);
    Ok((state, server))
}

/// Recovery is done: the API serves from `handle`.
pub fn ready(state: &ApiState, handle: Handle, config: &Config) -> Result<(), Error> {
    let backend = Arc::new(ShardBackend::with_history(handle, config)?);
    state.set_backend(Arc::new(crate::observe::Counted::new(backend, "http")));
    Ok(())
}

/// The engine as the Stripe worker reaches it: the same backend as the front ends, so its
/// outcomes are logged and answered like any client's commands.
struct EngineSubmit(Arc<dyn tally_net::Backend>);

impl tally_outbound::stripe::Submit for EngineSubmit {
    fn submit(&self, request: tally_engine::Request) -> tally_outbound::stripe::Answer {
        let answer = self.0.command(request);
        Box::pin(async move { answer.await.map_err(|code| code.to_string()) })
    }
}

/// Starts the payments workers on the current tokio runtime over `handle`: the Stripe worker
/// (also given to the API for Stripe's webhooks and callers' top-ups) and the sender of the
/// operator's webhooks. Abort the returned task to stop both: neither keeps anything that a
/// row in the payments store does not (an aborted call is retried with its key, an aborted
/// delivery is delivered again).
pub fn start_stripe(
    config: &Config,
    handle: Handle,
    wake: Arc<tokio::sync::Notify>,
    notices_wake: Arc<tokio::sync::Notify>,
    state: &ApiState,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let store = tally_outbound::payments::Payments::open(&config.data_dir)
        .map_err(|e| Error(e.to_string()))?;
    let engine = Arc::new(EngineSubmit(Arc::new(ShardBackend::new(handle))));
    let sender = tally_outbound::webhooks::Sender::new(
        store.clone(),
        std::time::Duration::from_millis(config.webhook_retry_base_ms),
        Arc::clone(&notices_wake),
    )
    .map_err(|e| Error(e.to_string()))?;
    state.set_payments(store.clone());
    let stripe =
        tally_outbound::stripe::Stripe::new(config.stripe(), store, engine, wake, notices_wake)
            .map_err(|e| Error(e.to_string()))?;
    if config.stripe_secret_key.is_none() {
        tracing::warn!(
            "no Stripe secret key (stripe_secret_key / TALLY_STRIPE_SECRET_KEY): top-ups are \
             requested and kept, and charged once the server runs with a key"
        );
    }
    state.set_stripe(Arc::clone(&stripe));
    Ok(tokio::spawn(async move {
        tokio::join!(
            stripe.run(std::future::pending()),
            sender.run(std::future::pending())
        );
    }))
}
