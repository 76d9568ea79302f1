//! The billing portal: pages for one wallet's customer, opened by a one-time link.
//!
//! **Sessions.** `POST /v1/portal/sessions` (admin) makes a link whose token is an HMAC of the
//! caller's Idempotency-Key under a secret kept in `<data-dir>/portal.sqlite3` (so a retry gets
//! the same link); only the token's SHA-256 is stored. Opening the link uses the token up and
//! sets a session cookie (`HttpOnly`, `SameSite=Lax`, `Path=/portal`, `Secure` under TLS) whose
//! value, also stored hashed, names one wallet. A session ends after `idle` without a request
//! and in any case `max` after it began. Every state-changing request must carry the session's
//! CSRF token in `X-CSRF-Token`. Links are limited to 30 per wallet per minute.
//!
//! **Scope.** Every `/portal/api` handler takes the wallet from the session, never from the
//! request, and answers only what the customer may see: balances, grants, usage charges, top-ups
//! and the auto top-up setting, never metadata, costs or margins.
//!
//! The page (`api/portal/`) is static, compiled in, with no inline script: the CSP allows
//! scripts from this server and from the configured Stripe.js origin only, and framing by the
//! configured origins only. See `docs/portal-contract.md` for the routes and the page's ids.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRequestParts, RawQuery, State};
use axum::http::{header, request::Parts, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use rusqlite::{params, Connection, OptionalExtension};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tally_engine::{
    Command, Query, QueryReply, Request as EngineRequest, RequestId, Timestamp, WalletId,
};
use tally_net::ErrorCode;

use crate::error::ApiError;
use crate::json::{self, asset, name};
use crate::model::CreateTopUp;
use crate::routes::{ask, start_topup, Path};
use crate::session::{cookie, random_token, same, sha256_hex};
use crate::ApiState;
use tally_outbound::now_us;

/// The page and its assets, compiled in.
const INDEX_HTML: &str = include_str!("../portal/index.html");
const PORTAL_JS: &str = include_str!("../portal/portal.js");
const PORTAL_CSS: &str = include_str!("../portal/portal.css");

/// The session cookie.
const COOKIE: &str = "tally_portal";
/// Links per wallet per minute.
const LINKS_PER_MINUTE: i64 = 30;
/// Card setups (Stripe SetupIntents) per wallet per hour.
const CARD_SETUPS_PER_HOUR: i64 = 10;
/// Top-up attempts from the portal per wallet per hour.
const TOPUPS_PER_HOUR: i64 = 20;

/// The portal's settings.
#[derive(Clone)]
pub struct PortalConfig {
    /// How links begin (`https://billing.example.com`), without a trailing `/`.
    pub public_url: String,
    /// A session ends after this long without a request.
    pub idle: Duration,
    /// A session ends this long after it began, however used.
    pub max: Duration,
    /// Where the page loads Stripe.js from (tests: localstripe's fake one).
    pub stripe_js: String,
    /// The publishable key Stripe.js runs with; empty: cards cannot be saved.
    pub stripe_key: String,
    /// Origins that may frame the portal (besides itself).
    pub frame_ancestors: Vec<String>,
    /// Cookies are `Secure` (the API runs under TLS).
    pub secure: bool,
}

impl std::fmt::Debug for PortalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortalConfig")
            .field("public_url", &self.public_url)
            .field("idle", &self.idle)
            .field("max", &self.max)
            .field("stripe_js", &self.stripe_js)
            .field("frame_ancestors", &self.frame_ancestors)
            .finish_non_exhaustive()
    }
}

/// Sessions and links (`portal.sqlite3`), with the settings.
pub struct Portal {
    config: PortalConfig,
    db: Mutex<Connection>,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Portal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Portal")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One customer's live session.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    id_hash: String,
    pub(crate) wallet: WalletId,
    csrf: String,
    return_url: String,
}

/// A store failure as the customer sees it: no path, no SQL, only that it failed.
fn read_failed(e: tally_outbound::Error) -> ApiError {
    tracing::error!("portal: {e}");
    ApiError::transport(
        ErrorCode::NotReady,
        "this could not be read now; try again shortly",
    )
}

fn store_failed(e: rusqlite::Error) -> ApiError {
    tracing::error!("portal store: {e}");
    ApiError::transport(
        ErrorCode::NotReady,
        "the portal store failed; retry shortly",
    )
}

/// A new link: its URL's token and when it stops working.
#[derive(Debug)]
pub(crate) struct Link {
    token: String,
    expires_us: i64,
}

impl Portal {
    /// Opens (creating) `<data_dir>/portal.sqlite3`.
    pub fn open(data_dir: &std::path::Path, config: PortalConfig) -> Result<Portal, String> {
        let path = data_dir.join("portal.sqlite3");
        let fail = |e: rusqlite::Error| format!("{}: {e}", path.display());
        let conn = Connection::open(&path).map_err(fail)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=2000;
             CREATE TABLE IF NOT EXISTS portal_secret (id INTEGER PRIMARY KEY, secret TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS portal_link (
                 token_hash TEXT PRIMARY KEY, wallet TEXT NOT NULL, return_url TEXT NOT NULL,
                 created_us INTEGER NOT NULL, expires_us INTEGER NOT NULL, used_us INTEGER,
                 request_hash TEXT NOT NULL UNIQUE, nonce TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS portal_link_wallet ON portal_link (wallet, created_us);
             CREATE TABLE IF NOT EXISTS portal_actions (
                 wallet TEXT NOT NULL, kind TEXT NOT NULL, at_us INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS portal_actions_wallet ON portal_actions (wallet, kind, at_us);
             CREATE TABLE IF NOT EXISTS portal_sessions (
                 id_hash TEXT PRIMARY KEY, wallet TEXT NOT NULL, csrf TEXT NOT NULL,
                 return_url TEXT NOT NULL, created_us INTEGER NOT NULL, last_us INTEGER NOT NULL);",
        )
        .map_err(fail)?;
        let secret: Option<String> = conn
            .query_row("SELECT secret FROM portal_secret WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(fail)?;
        let secret = match secret {
            Some(s) => s,
            None => {
                let s = random_token();
                conn.execute(
                    "INSERT INTO portal_secret (id, secret) VALUES (1, ?1)",
                    [&s],
                )
                .map_err(fail)?;
                s
            }
        };
        Ok(Portal {
            config,
            db: Mutex::new(conn),
            secret: secret.into_bytes(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The link of `(wallet, request)`: the same request (a retry) gets the same link.
    fn create_link(
        &self,
        wallet: &str,
        return_url: &str,
        life: Duration,
        request: RequestId,
    ) -> Result<Link, ApiError> {
        // The token is an HMAC of the request and a random nonce kept with the link: a retry of
        // the same request gets the same link, and once a link is pruned its token can never
        // come back (a new request for the same key gets a new nonce).
        let token_of = |nonce: &str| {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.secret);
            let tag = ring::hmac::sign(&key, format!("link:{:032x}:{nonce}", request.0).as_bytes());
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
        };
        let request_hash = sha256_hex(&format!("{:032x}", request.0));
        let now = now_us();
        let conn = self.lock();
        let existing: Option<(String, String, i64, i64, String)> = conn
            .query_row(
                "SELECT wallet, return_url, created_us, expires_us, nonce FROM portal_link
                 WHERE request_hash = ?1",
                [&request_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(store_failed)?;
        if let Some((owner, url, created_us, expires_us, nonce)) = existing {
            let same_life = expires_us - created_us == life.as_micros() as i64;
            if owner != wallet || url != return_url || !same_life {
                return Err(ApiError::rejected(
                    tally_engine::ResultCode::IdempotencyConflict,
                ));
            }
            return Ok(Link {
                token: token_of(&nonce),
                expires_us,
            });
        }
        let nonce = random_token();
        let token = token_of(&nonce);
        let hash = sha256_hex(&token);
        let recent: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM portal_link WHERE wallet = ?1 AND created_us > ?2",
                params![wallet, now - 60_000_000],
                |r| r.get(0),
            )
            .map_err(store_failed)?;
        if recent >= LINKS_PER_MINUTE {
            return Err(ApiError::transport(
                ErrorCode::Busy,
                format!("at most {LINKS_PER_MINUTE} portal links per wallet per minute"),
            ));
        }
        // Old links and sessions go as new ones come.
        let _ = conn.execute(
            "DELETE FROM portal_link WHERE expires_us < ?1",
            [now - 86_400_000_000],
        );
        let _ = conn.execute(
            "DELETE FROM portal_sessions WHERE created_us < ?1 OR last_us < ?2",
            params![
                now - self.config.max.as_micros() as i64,
                now - self.config.idle.as_micros() as i64
            ],
        );
        let expires_us = now + life.as_micros() as i64;
        conn.execute(
            "INSERT INTO portal_link (token_hash, wallet, return_url, created_us, expires_us,
             request_hash, nonce) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                hash,
                wallet,
                return_url,
                now,
                expires_us,
                request_hash,
                nonce
            ],
        )
        .map_err(store_failed)?;
        Ok(Link { token, expires_us })
    }

    /// Counts one `kind` action of `wallet`; refused (429) past `per_hour` in the last hour.
    fn limit(&self, wallet: &str, kind: &str, per_hour: i64) -> Result<(), ApiError> {
        let now = now_us();
        let hour = 3_600_000_000;
        let conn = self.lock();
        let _ = conn.execute("DELETE FROM portal_actions WHERE at_us < ?1", [now - hour]);
        let recent: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM portal_actions WHERE wallet = ?1 AND kind = ?2",
                params![wallet, kind],
                |r| r.get(0),
            )
            .map_err(store_failed)?;
        if recent >= per_hour {
            return Err(ApiError::transport(
                ErrorCode::Busy,
                "too many attempts from this account in the last hour; try again later",
            ));
        }
        conn.execute(
            "INSERT INTO portal_actions (wallet, kind, at_us) VALUES (?1, ?2, ?3)",
            params![wallet, kind, now],
        )
        .map_err(store_failed)?;
        Ok(())
    }

    /// Ends every session of `wallet` (the seller revoked its portal access); how many.
    pub(crate) fn end_sessions(&self, wallet: &str) -> Result<usize, ApiError> {
        self.lock()
            .execute("DELETE FROM portal_sessions WHERE wallet = ?1", [wallet])
            .map_err(store_failed)
    }

    /// Uses a link up: a new session's cookie value, or `None` (unknown, used or expired).
    fn exchange(&self, token: &str) -> Result<Option<String>, ApiError> {
        let now = now_us();
        let hash = sha256_hex(token);
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(store_failed)?;
        let link: Option<(String, String)> = tx
            .query_row(
                "SELECT wallet, return_url FROM portal_link
                 WHERE token_hash = ?1 AND used_us IS NULL AND expires_us > ?2",
                params![hash, now],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(store_failed)?;
        let Some((wallet, return_url)) = link else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE portal_link SET used_us = ?2 WHERE token_hash = ?1",
            params![hash, now],
        )
        .map_err(store_failed)?;
        let session = random_token();
        tx.execute(
            "INSERT INTO portal_sessions (id_hash, wallet, csrf, return_url, created_us, last_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![
                sha256_hex(&session),
                wallet,
                random_token(),
                return_url,
                now
            ],
        )
        .map_err(store_failed)?;
        tx.commit().map_err(store_failed)?;
        Ok(Some(session))
    }

    /// The live session of a cookie value, touched (its idle time starts again).
    fn session(&self, cookie: &str) -> Result<Option<Session>, ApiError> {
        let now = now_us();
        let id_hash = sha256_hex(cookie);
        let conn = self.lock();
        let row: Option<(String, String, String)> = conn
            .query_row(
                "SELECT wallet, csrf, return_url FROM portal_sessions
                 WHERE id_hash = ?1 AND created_us > ?2 AND last_us > ?3",
                params![
                    id_hash,
                    now - self.config.max.as_micros() as i64,
                    now - self.config.idle.as_micros() as i64
                ],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(store_failed)?;
        let Some((wallet, csrf, return_url)) = row else {
            return Ok(None);
        };
        // Touched at most every quarter of the idle time (30 s at most): a busy page must not
        // turn into a write per request.
        let every = (self.config.idle.as_micros() as i64 / 4).min(30_000_000);
        conn.execute(
            "UPDATE portal_sessions SET last_us = ?2 WHERE id_hash = ?1 AND last_us < ?3",
            params![id_hash, now, now - every],
        )
        .map_err(store_failed)?;
        let Ok(wallet) = tally_engine::Name::new(&wallet) else {
            return Ok(None);
        };
        Ok(Some(Session {
            id_hash,
            wallet,
            csrf,
            return_url,
        }))
    }

    /// The page's Content-Security-Policy.
    fn csp(&self) -> String {
        let stripe = origin(&self.config.stripe_js).unwrap_or_default();
        // Real Stripe.js talks to its API and shows 3-D Secure from its own hosts; a test
        // double (localstripe) serves everything from one origin.
        let (connect, frame) = if stripe == "https://js.stripe.com" {
            (
                format!("{stripe} https://api.stripe.com"),
                format!("{stripe} https://*.js.stripe.com https://hooks.stripe.com"),
            )
        } else if stripe.is_empty() {
            (String::new(), "'none'".to_string())
        } else {
            (stripe.clone(), stripe.clone())
        };
        let mut ancestors = vec!["'self'".to_string()];
        ancestors.extend(self.config.frame_ancestors.iter().cloned());
        format!(
            "default-src 'self'; script-src 'self' {stripe}; connect-src 'self' {connect}; \
             frame-src {frame}; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
             base-uri 'none'; form-action 'self'; frame-ancestors {}",
            ancestors.join(" "),
        )
    }
}

/// `scheme://host[:port]` of an http(s) URL; `None` for anything that could inject into a CSP
/// (userinfo, a query or fragment in the authority, spaces, quotes, semicolons).
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let host = rest.split(['/', '?', '#']).next()?;
    let clean = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    (!host.is_empty() && clean).then(|| format!("{scheme}://{host}"))
}

fn portal(state: &ApiState) -> Result<&Arc<Portal>, ApiError> {
    state
        .portal
        .get()
        .ok_or_else(|| ApiError::transport(ErrorCode::NotFound, "the portal is not enabled"))
}

fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The session of a portal request; state-changing requests must carry its CSRF token.
pub(crate) struct PortalSession(pub(crate) Session);

impl FromRequestParts<Arc<ApiState>> for PortalSession {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<PortalSession, ApiError> {
        let portal = portal(state)?;
        let expired = || {
            ApiError::transport(
                ErrorCode::Unauthenticated,
                "the portal session has expired: open the billing portal again from the app",
            )
        };
        let cookie = cookie(&parts.headers, COOKIE).ok_or_else(expired)?;
        let session = portal.session(&cookie)?.ok_or_else(expired)?;
        if parts.method != Method::GET && parts.method != Method::HEAD {
            let sent = parts
                .headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !same(sent, &session.csrf) {
                return Err(ApiError::transport(
                    ErrorCode::OutOfScope,
                    "send the page's CSRF token in X-CSRF-Token",
                ));
            }
        }
        Ok(PortalSession(session))
    }
}

// ----- admin: links --------------------------------------------------------------------------

/// Asks for a portal link.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"wallet": "acme", "return_url": "https://app.example.com/account"}))]
pub struct CreatePortalSession {
    /// The wallet whose customer opens it.
    pub wallet: String,
    /// Where the page's "back" link leads (http or https).
    #[serde(default)]
    pub return_url: Option<String>,
    /// Seconds the link stays usable (60 to 86400, default 3600); it works once.
    #[serde(default)]
    pub expires_in: Option<u64>,
}

/// A portal link.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PortalSessionLink {
    /// Open this once: it sets the session cookie and shows the portal.
    pub url: String,
    /// The wallet.
    pub wallet: String,
    /// When the link stops working if unused (RFC 3339).
    pub token_expires_at: String,
}

pub(crate) async fn create_link(
    state: &ApiState,
    body: &CreatePortalSession,
    request: RequestId,
) -> Result<PortalSessionLink, ApiError> {
    let portal = portal(state)?;
    let wallet = name("wallet", &body.wallet)?;
    // The wallet must exist.
    ask(state, Query::Wallet { wallet }).await?;
    let return_url = body.return_url.clone().unwrap_or_default();
    let web = return_url.starts_with("https://") || return_url.starts_with("http://");
    if !(return_url.is_empty() || web) || return_url.len() > 2048 {
        return Err(ApiError::invalid(
            "return_url must be an http:// or https:// URL of at most 2048 bytes",
        ));
    }
    let life = body.expires_in.unwrap_or(3600);
    if !(60..=86_400).contains(&life) {
        return Err(ApiError::invalid("expires_in must be 60 to 86400 seconds"));
    }
    let link = portal.create_link(
        wallet.as_str(),
        &return_url,
        Duration::from_secs(life),
        request,
    )?;
    Ok(PortalSessionLink {
        url: format!(
            "{}/portal/session?token={}",
            portal.config.public_url, link.token
        ),
        wallet: wallet.as_str().into(),
        token_expires_at: Timestamp(link.expires_us).to_rfc3339(),
    })
}

/// Ends every session of `wallet`; how many.
pub(crate) fn end_wallet_sessions(state: &ApiState, wallet: &str) -> Result<usize, ApiError> {
    portal(state)?.end_sessions(wallet)
}

// ----- pages ---------------------------------------------------------------------------------

fn error_page(status: StatusCode, text: &str) -> Response {
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Billing portal</title><link rel=\"stylesheet\" href=\"/portal/assets/portal.css\">\
         </head><body><main><h1>Billing portal</h1><p id=\"session-error\">{}</p></main></body></html>",
        html_escape(text)
    );
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// `GET /portal/session?token=`: uses the link up and starts the session.
pub(crate) async fn open_link(
    State(state): State<Arc<ApiState>>,
    RawQuery(raw): RawQuery,
) -> Response {
    let Ok(portal) = portal(&state) else {
        return error_page(StatusCode::NOT_FOUND, "The billing portal is not enabled.");
    };
    let token = raw
        .as_deref()
        .unwrap_or("")
        .split('&')
        .find_map(|p| p.strip_prefix("token="))
        .unwrap_or("");
    let refused = || {
        error_page(
            StatusCode::FORBIDDEN,
            "This link is invalid, expired or already used. Open the billing portal again from the app.",
        )
    };
    if token.is_empty() || token.len() > 128 {
        return refused();
    }
    match portal.exchange(token) {
        Ok(Some(session)) => {
            let mut cookie = format!("{COOKIE}={session}; HttpOnly; SameSite=Lax; Path=/portal");
            if portal.config.secure {
                cookie.push_str("; Secure");
            }
            let mut response =
                (StatusCode::SEE_OTHER, [(header::LOCATION, "/portal")]).into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Ok(None) => refused(),
        Err(e) => e.into_response(),
    }
}

/// `GET /portal`: the page, for a live session.
pub(crate) async fn page(
    State(state): State<Arc<ApiState>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let Ok(portal) = portal(&state) else {
        return error_page(StatusCode::NOT_FOUND, "The billing portal is not enabled.");
    };
    let session = match cookie(&headers, COOKIE).map(|c| portal.session(&c)) {
        Some(Ok(Some(s))) => s,
        Some(Err(e)) => return e.into_response(),
        _ => {
            return error_page(
                StatusCode::UNAUTHORIZED,
                "Your session has expired. Open the billing portal again from the app.",
            )
        }
    };
    let stripe_key = if state.stripe.get().is_some_and(|s| s.configured()) {
        portal.config.stripe_key.as_str()
    } else {
        ""
    };
    let html = INDEX_HTML
        .replace("{{csrf}}", &html_escape(&session.csrf))
        .replace("{{wallet}}", &html_escape(session.wallet.as_str()))
        .replace("{{stripe_js}}", &html_escape(&portal.config.stripe_js))
        .replace("{{stripe_key}}", &html_escape(stripe_key))
        .replace("{{return_url}}", &html_escape(&session.return_url));
    let mut response = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response();
    let headers = response.headers_mut();
    // Fail closed: a policy that cannot be sent means no page.
    match HeaderValue::from_str(&portal.csp()) {
        Ok(csp) => headers.insert(header::CONTENT_SECURITY_POLICY, csp),
        Err(_) => {
            return error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The portal's security policy is misconfigured.",
            )
        }
    };
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let _ = &session.id_hash;
    response
}

/// `GET /portal/assets/{file}`.
pub(crate) async fn asset_file(Path(file): Path<String>) -> Response {
    let (kind, body) = match file.as_str() {
        "portal.js" => ("text/javascript; charset=utf-8", PORTAL_JS),
        "portal.css" => ("text/css; charset=utf-8", PORTAL_CSS),
        _ => return error_page(StatusCode::NOT_FOUND, "No such file."),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

// ----- the customer's JSON API ---------------------------------------------------------------

fn dec(d: Decimal) -> String {
    d.normalize().to_string()
}

/// `GET /portal/api/wallet`.
pub(crate) async fn wallet(
    State(state): State<Arc<ApiState>>,
    PortalSession(session): PortalSession,
) -> Result<Json<Value>, ApiError> {
    let view = view_of(&state, session.wallet).await?;
    let balances: Vec<Value> = view
        .balances
        .iter()
        .map(|b| {
            json!({
                "asset": b.asset.as_str(), "available": dec(b.available), "held": dec(b.held),
                "debt": dec(b.debt), "overdraft": dec(b.overdraft), "pending": dec(b.pending),
            })
        })
        .collect();
    let grants: Vec<Value> = view
        .grants
        .iter()
        .map(|g| {
            let source = match g.source {
                tally_engine::GrantSource::TopUp { .. } => "top_up",
                tally_engine::GrantSource::Promotion => "promotion",
                tally_engine::GrantSource::Refund => "refund",
                tally_engine::GrantSource::Adjustment => "adjustment",
            };
            json!({
                "id": g.id.0, "asset": g.asset.as_str(), "amount": dec(g.amount),
                "remaining": dec(g.remaining), "priority": g.priority, "source": source,
                "effective_at": g.effective_at.map(Timestamp::to_rfc3339),
                "expires_at": g.expires_at.map(Timestamp::to_rfc3339),
            })
        })
        .collect();
    let auto: Vec<Value> = view
        .topup_rules
        .iter()
        .map(|r| {
            let status = view.topups.iter().find(|t| t.asset == r.asset);
            json!({
                "asset": r.asset.as_str(), "threshold": dec(r.threshold),
                "amount": match r.amount {
                    tally_engine::TopUpAmount::Fixed(a) => dec(a),
                    tally_engine::TopUpAmount::Target(t) => dec(t),
                },
                "daily_cap": r.daily_cap.map(dec),
                "monthly_cap": r.monthly_cap.map(dec),
                "kind": match r.amount {
                    tally_engine::TopUpAmount::Fixed(_) => "fixed",
                    tally_engine::TopUpAmount::Target(_) => "target",
                },
                "flagged": view.topup_flagged.contains(&r.asset),
                "last_failure": status.and_then(|t| t.last_failure).map(|f| f.as_str().to_string()),
            })
        })
        .collect();
    // The assets the customer can buy: those of the wallet's balances and rules with a price.
    let mut codes: Vec<tally_engine::AssetCode> = view.balances.iter().map(|b| b.asset).collect();
    codes.extend(view.topup_rules.iter().map(|r| r.asset));
    codes.sort();
    codes.dedup();
    let mut assets = Vec::new();
    for code in codes {
        if let QueryReply::Asset(a) = ask(&state, Query::Asset { asset: code }).await? {
            if let Some(p) = a.topup_price {
                assets.push(json!({
                    "code": a.code.as_str(), "scale": a.scale,
                    "currency": p.currency.as_str(), "unit_amount": dec(p.unit_amount),
                }));
            }
        }
    }
    Ok(Json(json!({
        "wallet": view.wallet.as_str(),
        "frozen": view.frozen,
        "balances": balances,
        "grants": grants,
        "auto_topup": auto,
        "card": {"saved": view.payment_method.is_some(),
                 "payment_method": view.payment_method.map(|p| p.as_str().to_string())},
        "assets": assets,
    })))
}

/// `GET /portal/api/usage?limit&cursor&product&model`.
pub(crate) async fn usage(
    State(state): State<Arc<ApiState>>,
    PortalSession(session): PortalSession,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let mut filter = tally_outbound::sqlite::Filter {
        wallet: session.wallet.as_str().to_string(),
        limit: 20,
        ..Default::default()
    };
    for (key, value) in crate::routes::parse_query(raw.as_deref().unwrap_or(""))? {
        match key.as_str() {
            "limit" => filter.limit = crate::routes::limit_param(&value, 100)?,
            "cursor" => {
                filter.cursor = Some(
                    tally_outbound::sqlite::Cursor::decode(&value)
                        .ok_or_else(|| ApiError::invalid("cursor: not a cursor"))?,
                )
            }
            "product" if !value.is_empty() => {
                filter.product = Some(name("product", &value)?.as_str().into())
            }
            "model" if !value.is_empty() => {
                filter.model = Some(name("model", &value)?.as_str().into())
            }
            "product" | "model" => {}
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {:?} (limit, cursor, product, model)",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    let reader = Arc::clone(state.history()?);
    let page = tokio::task::spawn_blocking(move || reader.usage(&filter))
        .await
        .map_err(|_| ApiError::invalid("the history read failed"))?
        .map_err(read_failed)?;
    let data: Vec<Value> = page
        .rows
        .iter()
        .map(|u| {
            json!({
                "request_id": u.request_id, "product": u.product,
                "model": u.attributes.get("model"), "asset": u.asset,
                "charged": u.charged.normalize().to_string(),
                "refunded": u.refunded.normalize().to_string(),
                "quantities": u.quantities, "occurred_at": u.occurred_at,
            })
        })
        .collect();
    Ok(Json(json!({
        "data": data,
        "has_more": page.next.is_some(),
        "next_cursor": page.next.map(|c| c.encode()),
    })))
}

/// `GET /portal/api/spend.svg?days=30`: spend per day as bars.
pub(crate) async fn spend_chart(
    State(state): State<Arc<ApiState>>,
    PortalSession(session): PortalSession,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut days = 30i64;
    for (key, value) in crate::routes::parse_query(raw.as_deref().unwrap_or(""))? {
        match key.as_str() {
            "days" => {
                days = value
                    .parse::<i64>()
                    .ok()
                    .filter(|d| (1..=366).contains(d))
                    .ok_or_else(|| ApiError::invalid("days must be 1 to 366"))?
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {:?} (days)",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    let today = now_us().div_euclid(Timestamp::DAY_US) * Timestamp::DAY_US;
    let from = Timestamp(today - (days - 1) * Timestamp::DAY_US);
    let to = Timestamp(today + Timestamp::DAY_US);
    let reader = Arc::clone(state.history()?);
    let wallet = session.wallet.as_str().to_string();
    let rows = tokio::task::spawn_blocking(move || reader.spend_per_day(&wallet, from, to))
        .await
        .map_err(|_| ApiError::invalid("the history read failed"))?
        .map_err(read_failed)?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        spend_svg(&rows, from, days),
    )
        .into_response())
}

/// Bars of spend per day, the tallest scaled to the chart's height; one asset (the one with
/// the most days) when there are several.
pub(crate) fn spend_svg(
    rows: &[(Timestamp, String, Decimal)],
    from: Timestamp,
    days: i64,
) -> String {
    use std::fmt::Write;
    let mut assets: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assets.sort_unstable();
    let asset = assets
        .chunk_by(|a, b| a == b)
        .max_by_key(|c| c.len())
        .and_then(|c| c.first().copied())
        .unwrap_or("");
    let per_day: Vec<(Timestamp, Decimal)> = (0..days)
        .map(|i| {
            let day = Timestamp(from.0 + i * Timestamp::DAY_US);
            let sum = rows
                .iter()
                .filter(|r| r.0 == day && r.1 == asset)
                .try_fold(Decimal::ZERO, |acc, r| acc.checked_add(r.2))
                .unwrap_or(Decimal::MAX);
            (day, sum)
        })
        .collect();
    let top = per_day
        .iter()
        .map(|d| d.1)
        .max()
        .unwrap_or_default()
        .max(Decimal::ZERO);
    let (width, height, bar) = (days * 12, 120i64, 10i64);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {h}\" role=\"img\" \
         aria-labelledby=\"t\"><title id=\"t\">Spend per day over the last {days} days{}</title>",
        if asset.is_empty() {
            String::new()
        } else {
            format!(", in {}", html_escape(asset))
        },
        h = height + 2,
    );
    for (i, (day, sum)) in per_day.iter().enumerate() {
        let h = if top > Decimal::ZERO && *sum > Decimal::ZERO {
            (sum.checked_mul(Decimal::from(height))
                .and_then(|s| s.checked_div(top))
                .unwrap_or(Decimal::from(height))
                .round()
                .to_string()
                .parse::<i64>()
                .unwrap_or(0))
            .max(1)
        } else {
            0
        };
        let date = day.to_rfc3339();
        let _ = write!(
            svg,
            "<rect x=\"{}\" y=\"{}\" width=\"{bar}\" height=\"{h}\" fill=\"#3b6fd8\">\
             <title>{}: {} {}</title></rect>",
            i as i64 * 12 + 1,
            height - h + 1,
            &date[..10],
            sum.normalize(),
            html_escape(asset)
        );
    }
    svg.push_str(&format!(
        "<line x1=\"0\" y1=\"{y}\" x2=\"{width}\" y2=\"{y}\" stroke=\"#888\" stroke-width=\"1\"/></svg>",
        y = height + 1
    ));
    svg
}

/// `GET /portal/api/topups`.
pub(crate) async fn topups(
    State(state): State<Arc<ApiState>>,
    PortalSession(session): PortalSession,
) -> Result<Json<Value>, ApiError> {
    let rows = state
        .payments()?
        .of_wallet(session.wallet.as_str(), None, 50)
        .map_err(read_failed)?;
    let data: Vec<Value> = rows
        .iter()
        .map(|t| {
            json!({
                "id": t.key, "kind": t.kind.as_str(), "asset": t.asset,
                "amount": dec(t.amount), "status": t.state.name(),
                "failure_reason": t.reason, "requested_at": Timestamp(t.requested_us).to_rfc3339(),
            })
        })
        .collect();
    Ok(Json(json!({ "data": data })))
}

/// Body of `POST /portal/api/topups`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortalTopUp {
    asset: String,
    #[serde(with = "json::decimal")]
    amount: Decimal,
}

/// `POST /portal/api/topups`: charges the saved card.
pub(crate) async fn create_topup(
    State(state): State<Arc<ApiState>>,
    PortalSession(session): PortalSession,
    headers: axum::http::HeaderMap,
    crate::routes::Body(body): crate::routes::Body<PortalTopUp>,
) -> Result<Json<Value>, ApiError> {
    let click = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::transport(
                ErrorCode::IdempotencyKeyRequired,
                "send an Idempotency-Key header (a fresh UUID per click)",
            )
        })?;
    // Scoped to the session, so one customer's keys never meet another's.
    let key = format!("portal:{}:{click}", session.id_hash);
    portal(&state)?.limit(session.wallet.as_str(), "topup", TOPUPS_PER_HOUR)?;
    let id = tally_outbound::derived_id(&key);
    let request = CreateTopUp {
        asset: body.asset.clone(),
        amount: body.amount,
        payment_method: None,
        session: false,
    };
    let (row, _) = start_topup(&state, session.wallet, &request, &key, id).await?;
    Ok(Json(json!({
        "id": row.key, "status": row.state.name(), "amount": dec(row.amount),
        "asset": row.asset, "failure_reason": row.reason,
    })))
}

async fn command(state: &ApiState, id: RequestId, command: Command) -> Result<(), ApiError> {
    let reply = state
        .backend()?
        .command(EngineRequest { id, command })
        .await
        .map_err(ApiError::from_code)?;
    if reply.code.is_ok() {
        Ok(())
    } else {
        Err(ApiError::rejected(reply.code))
    }
}

fn stripe_failed(e: tally_outbound::stripe::ManualError) -> ApiError {
    use tally_outbound::stripe::ManualError;
    match e {
        ManualError::NotConfigured => ApiError::transport(
            ErrorCode::NotFound,
            "cards cannot be saved here: Stripe is not configured",
        ),
        other => {
            tracing::warn!("portal: {other}");
            ApiError::transport(
                ErrorCode::NotReady,
                "the payment service could not be reached; try again shortly",
            )
        }
    }
}

/// `POST /portal/api/cards/setup`: a SetupIntent's client secret (and the customer, made now
/// if the wallet has none).
pub(crate) async fn card_setup(
    State(state): State<Arc<ApiState>>,
    PortalSession(session): PortalSession,
) -> Result<Json<Value>, ApiError> {
    let stripe = Arc::clone(state.stripe()?);
    let view = view_of(&state, session.wallet).await?;
    not_frozen(&view)?;
    // Each setup is a call to Stripe on the seller's account: bounded per wallet.
    portal(&state)?.limit(session.wallet.as_str(), "card", CARD_SETUPS_PER_HOUR)?;
    let customer = match view.customer {
        Some(c) => c.as_str().to_string(),
        None => {
            let customer = stripe
                .create_customer(session.wallet.as_str())
                .await
                .map_err(stripe_failed)?;
            let id = tally_outbound::derived_id(&format!(
                "portal-customer:{}:{customer}",
                session.wallet
            ));
            command(
                &state,
                id,
                Command::SetBilling {
                    wallet: session.wallet,
                    customer: Some(name("customer", &customer)?),
                    payment_method: view.payment_method,
                },
            )
            .await?;
            customer
        }
    };
    let secret = stripe.setup_card(&customer).await.map_err(stripe_failed)?;
    Ok(Json(json!({ "client_secret": secret })))
}

/// Body of `POST /portal/api/cards`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedCard {
    setup_intent: String,
}

/// `POST /portal/api/cards`: the card a confirmed SetupIntent saved becomes the default.
pub(crate) async fn card_saved(
    State(state): State<Arc<ApiState>>,
    PortalSession(session): PortalSession,
    crate::routes::Body(body): crate::routes::Body<SavedCard>,
) -> Result<Json<Value>, ApiError> {
    let stripe = Arc::clone(state.stripe()?);
    let view = view_of(&state, session.wallet).await?;
    not_frozen(&view)?;
    let customer = view
        .customer
        .ok_or_else(|| ApiError::invalid("no card setup was started for this wallet"))?;
    let setup = name("setup_intent", &body.setup_intent)?;
    // Only a SetupIntent id goes into Stripe's URL (nothing that could name another resource).
    let id_ok = setup.as_str().strip_prefix("seti_").is_some_and(|rest| {
        !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    if !id_ok {
        return Err(ApiError::invalid(
            "setup_intent must be a SetupIntent id (seti_...)",
        ));
    }
    let method = stripe
        .saved_card(setup.as_str(), customer.as_str())
        .await
        .map_err(|e| {
            tracing::warn!("portal: a saved card was refused: {e}");
            ApiError::invalid("the card could not be saved: start again")
        })?;
    let id = tally_outbound::derived_id(&format!("portal-card:{}:{setup}", session.wallet));
    command(
        &state,
        id,
        Command::SetBilling {
            wallet: session.wallet,
            customer: Some(customer),
            payment_method: Some(name("payment_method", &method)?),
        },
    )
    .await?;
    Ok(Json(json!({ "saved": true, "payment_method": method })))
}

/// Body of `PUT /portal/api/auto-topup`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AutoTopUp {
    asset: String,
    #[serde(with = "json::decimal")]
    threshold: Decimal,
    /// A fixed amount to add; or else `target`.
    #[serde(default, with = "json::decimal::option")]
    amount: Option<Decimal>,
    /// Top up to this available balance.
    #[serde(default, with = "json::decimal::option")]
    target: Option<Decimal>,
    /// Ignored: a daily cap is the seller's to set (kept as it is).
    #[serde(default, rename = "daily_cap", with = "json::decimal::option")]
    _daily_cap: Option<Decimal>,
    #[serde(default, with = "json::decimal::option")]
    monthly_cap: Option<Decimal>,
}

async fn view_of(state: &ApiState, wallet: WalletId) -> Result<tally_engine::WalletView, ApiError> {
    match ask(state, Query::Wallet { wallet }).await? {
        QueryReply::Wallet(w) => Ok(w),
        _ => Err(ApiError::invalid("unexpected answer")),
    }
}

/// A frozen wallet's settings stay as they are until the seller unfreezes it.
fn not_frozen(view: &tally_engine::WalletView) -> Result<(), ApiError> {
    if view.frozen {
        return Err(ApiError::rejected(tally_engine::ResultCode::WalletFrozen));
    }
    Ok(())
}

fn fresh_id() -> RequestId {
    let token = random_token();
    tally_outbound::derived_id(&token)
}

/// `PUT /portal/api/auto-topup`: sets (replaces) the rule; needs a saved card.
pub(crate) async fn set_auto(
    State(state): State<Arc<ApiState>>,
    PortalSession(session): PortalSession,
    crate::routes::Body(body): crate::routes::Body<AutoTopUp>,
) -> Result<Json<Value>, ApiError> {
    let code = asset("asset", &body.asset)?;
    let view = view_of(&state, session.wallet).await?;
    not_frozen(&view)?;
    if view.payment_method.is_none() {
        return Err(ApiError::invalid(
            "save a card first: auto top-up charges it",
        ));
    }
    // What the seller set stays: attempts, cooldown, daily cap and payment method.
    let seller = view.topup_rules.iter().find(|r| r.asset == code);
    let amount = match (body.amount, body.target) {
        (Some(a), None) if a > Decimal::ZERO => tally_engine::TopUpAmount::Fixed(a),
        (None, Some(t)) if t > body.threshold => tally_engine::TopUpAmount::Target(t),
        _ => {
            return Err(ApiError::invalid(
                "give a positive amount, or a target above the threshold (not both)",
            ))
        }
    };
    if body.threshold < Decimal::ZERO {
        return Err(ApiError::invalid("the threshold must not be negative"));
    }
    let rule = tally_engine::TopUpRule {
        asset: code,
        threshold: body.threshold,
        amount,
        attempts_max: seller.map_or(3, |r| r.attempts_max),
        cooldown_us: seller.map_or(60 * Timestamp::SECOND_US, |r| r.cooldown_us),
        daily_cap: seller.and_then(|r| r.daily_cap),
        monthly_cap: body.monthly_cap,
        payment_method: seller.map_or(
            tally_engine::name(tally_engine::DEFAULT_PAYMENT_METHOD),
            |r| r.payment_method,
        ),
    };
    command(
        &state,
        fresh_id(),
        Command::SetTopUpRule {
            wallet: session.wallet,
            rule,
        },
    )
    .await?;
    Ok(Json(json!({
        "asset": code.as_str(), "threshold": dec(body.threshold),
        "amount": body.amount.map(dec), "target": body.target.map(dec),
        "daily_cap": rule.daily_cap.map(dec), "monthly_cap": body.monthly_cap.map(dec),
        "enabled": true,
    })))
}

/// `DELETE /portal/api/auto-topup/{asset}`.
pub(crate) async fn remove_auto(
    State(state): State<Arc<ApiState>>,
    PortalSession(session): PortalSession,
    Path(code): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let code = asset("asset", &code)?;
    not_frozen(&view_of(&state, session.wallet).await?)?;
    command(
        &state,
        fresh_id(),
        Command::RemoveTopUpRule {
            wallet: session.wallet,
            asset: code,
        },
    )
    .await?;
    Ok(Json(json!({ "asset": code.as_str(), "enabled": false })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_scales_bars_and_names_each_day() {
        let day = Timestamp(20_000 * Timestamp::DAY_US);
        let rows = vec![
            (day, "USD".to_string(), Decimal::new(35, 1)),
            (
                Timestamp(day.0 + Timestamp::DAY_US),
                "USD".to_string(),
                Decimal::new(7, 0),
            ),
        ];
        let svg = spend_svg(&rows, day, 3);
        assert!(svg.contains("height=\"60\""), "{svg}");
        assert!(svg.contains("height=\"120\""), "{svg}");
        assert!(svg.contains("3.5 USD"), "{svg}");
        assert_eq!(svg.matches("<rect").count(), 3);
    }

    #[test]
    fn origins_and_escaping() {
        assert_eq!(
            origin("http://127.0.0.1:8420/js.stripe.com/v3/").as_deref(),
            Some("http://127.0.0.1:8420")
        );
        assert_eq!(origin("nope"), None);
        assert_eq!(origin("https://a@b.test/x"), None);
        assert_eq!(origin("https://b.test; script-src *"), None);
        assert_eq!(origin("javascript://x"), None);
        assert_eq!(
            origin("https://js.stripe.com/v3/?x=1").as_deref(),
            Some("https://js.stripe.com")
        );
        assert_eq!(
            html_escape("<a href=\"x\">'"),
            "&lt;a href=&quot;x&quot;&gt;&#39;"
        );
    }
}
