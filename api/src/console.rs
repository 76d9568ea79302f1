//! The seller's console: pages at `/console` that call the admin API under `/v1` with a
//! session cookie standing for the admin key the seller signed in with.
//!
//! **Sessions.** `POST /console/session {api_key}` checks the key (admin scope only) and keeps,
//! in memory, a session holding that live key: a restart signs everyone out, and a revoked key
//! ends its sessions at once. The cookie (`tally_console`, `HttpOnly`, `SameSite=Strict`,
//! `Path=/`, `Secure` under TLS) carries a random id, kept only as its SHA-256; the key itself
//! never reaches the browser's storage. A session ends after 30 minutes without a request and
//! 12 hours after it began; at most 1,000 live at once (the oldest goes first).
//!
//! **CSRF.** A request authenticated by the cookie that changes state must carry the session's
//! token in `X-CSRF-Token` (the page reads it from its `csrf-token` meta tag); with
//! `SameSite=Strict` as a second line.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tally_net::{ErrorCode, LiveKey, Scope};

use crate::error::ApiError;
use crate::routes::{Body, Path};
use crate::session::{cookie, random_token, same, sha256_hex};
use crate::ApiState;

const INDEX_HTML: &str = include_str!("../console/index.html");
const CONSOLE_JS: &str = include_str!("../console/console.js");
const CONSOLE_CSS: &str = include_str!("../console/console.css");

/// The session cookie.
pub(crate) const COOKIE: &str = "tally_console";
const IDLE: Duration = Duration::from_secs(30 * 60);
const MAX: Duration = Duration::from_secs(12 * 3600);
const SESSIONS_MAX: usize = 1000;

struct Entry {
    key: Arc<LiveKey>,
    csrf: String,
    created: Instant,
    last: Instant,
}

/// Live console sessions.
#[derive(Default)]
pub struct Console {
    sessions: Mutex<HashMap<String, Entry>>,
    secure: AtomicBool,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    /// Cookies get `Secure` (the API runs under TLS).
    pub fn set_secure(&self, secure: bool) {
        self.secure.store(secure, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start(&self, key: Arc<LiveKey>) -> (String, String) {
        let (id, csrf) = (random_token(), random_token());
        let now = Instant::now();
        let mut sessions = self.lock();
        sessions.retain(|_, e| live(e, now));
        if sessions.len() >= SESSIONS_MAX {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, e)| e.created)
                .map(|(k, _)| k.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            sha256_hex(&id),
            Entry {
                key,
                csrf: csrf.clone(),
                created: now,
                last: now,
            },
        );
        (id, csrf)
    }

    /// The live key and CSRF token of a cookie's session, touched.
    pub(crate) fn session(&self, id: &str) -> Option<(Arc<LiveKey>, String)> {
        let now = Instant::now();
        let mut sessions = self.lock();
        let hash = sha256_hex(id);
        let entry = sessions.get_mut(&hash)?;
        if !live(entry, now) {
            sessions.remove(&hash);
            return None;
        }
        entry.last = now;
        Some((Arc::clone(&entry.key), entry.csrf.clone()))
    }

    fn end(&self, id: &str) {
        self.lock().remove(&sha256_hex(id));
    }
}

fn live(e: &Entry, now: Instant) -> bool {
    !e.key.is_revoked() && now.duration_since(e.created) < MAX && now.duration_since(e.last) < IDLE
}

fn set_cookie(response: &mut Response, value: &str, secure: bool) {
    let mut cookie = format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/");
    if value.is_empty() {
        cookie.push_str("; Max-Age=0");
    }
    if secure {
        cookie.push_str("; Secure");
    }
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
}

/// `GET /console`: the page, signed in or not.
pub(crate) async fn page(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    let session = cookie(&headers, COOKIE).and_then(|id| state.console.session(&id));
    let html = INDEX_HTML
        .replace(
            "{{csrf}}",
            session.as_ref().map_or("", |(_, csrf)| csrf.as_str()),
        )
        .replace(
            "{{signed_in}}",
            if session.is_some() { "true" } else { "false" },
        );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                 base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        html,
    )
        .into_response()
}

/// `GET /console/assets/{file}`.
pub(crate) async fn asset_file(Path(file): Path<String>) -> Response {
    let (kind, body) = match file.as_str() {
        "console.js" => ("text/javascript; charset=utf-8", CONSOLE_JS),
        "console.css" => ("text/css; charset=utf-8", CONSOLE_CSS),
        _ => return (StatusCode::NOT_FOUND, "no such file\n").into_response(),
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

/// Body of `POST /console/session`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignIn {
    api_key: String,
}

/// `POST /console/session`: signs in with an admin key.
pub(crate) async fn sign_in(
    State(state): State<Arc<ApiState>>,
    Body(body): Body<SignIn>,
) -> Result<Response, ApiError> {
    let failed = |reason: &'static str, code: ErrorCode| {
        metrics::counter!("tally_auth_failures_total", "transport" => "console", "reason" => reason)
            .increment(1);
        ApiError::from_code(code)
    };
    let key = match state.keys.authenticate(body.api_key.trim().as_bytes()) {
        Some(live) if !live.is_revoked() => live,
        _ => return Err(failed("invalid_key", ErrorCode::InvalidKey)),
    };
    if key.scope != Scope::Admin {
        return Err(failed("scope", ErrorCode::OutOfScope));
    }
    let (id, csrf) = state.console.start(key);
    let mut response = Json(json!({ "csrf": csrf })).into_response();
    set_cookie(
        &mut response,
        &id,
        state.console.secure.load(Ordering::Relaxed),
    );
    Ok(response)
}

/// `DELETE /console/session`: signs out (needs the CSRF token).
pub(crate) async fn sign_out(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    let id = cookie(&headers, COOKIE).unwrap_or_default();
    let sent = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match state.console.session(&id) {
        Some((_, csrf)) if same(sent, &csrf) => {
            state.console.end(&id);
            let mut response = Json(json!({ "signed_in": false })).into_response();
            set_cookie(
                &mut response,
                "",
                state.console.secure.load(Ordering::Relaxed),
            );
            response
        }
        Some(_) => ApiError::transport(
            ErrorCode::OutOfScope,
            "send the page's CSRF token in X-CSRF-Token",
        )
        .into_response(),
        None => ApiError::from_code(ErrorCode::Unauthenticated).into_response(),
    }
}
