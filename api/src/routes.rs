//! The routes: extractors for the caller, the idempotency key and JSON bodies, and one thin
//! handler per operation (parse, check scope, call the backend, map the answer).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, RawQuery, Request, State};
use axum::http::{header, request::Parts, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tally_engine::{
    Command, MarginScope, Query, QueryReply, Reply, ReplyValue, Request as EngineRequest,
    RequestId, Timestamp, WalletFilter,
};
use tally_net::message::{command_kind, query_kind, Scope as WireScope};
use tally_net::{ErrorCode, Kind, LiveKey, Outcome};

use crate::error::{result_status, ApiError, CodeOf, ErrorBody};
use crate::idempotency;
use crate::json::{asset, name};
use crate::model::*;
use crate::{ApiState, BODY_BYTES_MAX, PAGE_LIMIT_MAX};
use tally_outbound::now_us;

type AppState = State<Arc<ApiState>>;

pub(crate) fn router(state: Arc<ApiState>) -> Router {
    let v1 = Router::new()
        .route("/assets", post(define_asset))
        .route(
            "/assets/{asset}/price",
            put(price_asset).delete(unprice_asset),
        )
        .route("/wallets/{wallet}/billing", put(set_billing))
        .route("/stripe/webhook", post(stripe_webhook))
        .route("/products", post(define_product))
        .route("/plans", get(list_plans))
        .route("/plans/{plan}/draft", put(draft_plan))
        .route("/plans/{plan}/draft/test", post(test_draft))
        .route("/plans/{plan}/publish", post(publish_plan))
        .route("/wallets", post(create_wallet).get(list_wallets))
        .route("/wallets/{wallet}", get(get_wallet))
        .route("/wallets/{wallet}/freeze", post(freeze))
        .route("/wallets/{wallet}/unfreeze", post(unfreeze))
        .route("/wallets/{wallet}/overdraft", put(set_overdraft))
        .route("/wallets/{wallet}/plan", put(assign_plan))
        .route("/wallets/{wallet}/grants", post(create_grant))
        .route("/wallets/{wallet}/balances/{asset}", get(get_balance))
        .route("/wallets/{wallet}/margin", get(wallet_margin))
        .route("/wallets/{wallet}/usage", get(wallet_usage))
        .route("/wallets/{wallet}/transactions", get(wallet_transactions))
        .route(
            "/wallets/{wallet}/topups",
            get(wallet_topups).post(create_topup),
        )
        .route("/topups/{topup}", get(get_topup))
        .route("/portal/sessions", post(create_portal_session))
        .route(
            "/wallets/{wallet}/portal-sessions",
            axum::routing::delete(end_portal_sessions),
        )
        .route(
            "/webhook_endpoints",
            post(create_webhook_endpoint).get(list_webhook_endpoints),
        )
        .route(
            "/webhook_endpoints/{endpoint}",
            axum::routing::delete(delete_webhook_endpoint),
        )
        .route(
            "/webhook_endpoints/{endpoint}/attempts",
            get(webhook_attempts),
        )
        .route("/analytics/margin", get(margin_analytics))
        .route("/wallets/{wallet}/holds", post(create_hold))
        .route("/wallets/{wallet}/holds/{hold}/settle", post(settle_hold))
        .route("/wallets/{wallet}/holds/{hold}/release", post(release_hold))
        .route("/wallets/{wallet}/refunds", post(create_refund))
        .route("/wallets/{wallet}/disputes", post(create_dispute))
        .route("/wallets/{wallet}/disputes/{grant}/won", post(dispute_won))
        .route("/wallets/{wallet}/adjustments", post(create_adjustment))
        .route(
            "/wallets/{wallet}/topup-rules/{asset}",
            put(set_topup_rule).delete(remove_topup_rule),
        )
        .route("/usage", post(report_usage))
        .route("/usage/batch", post(report_usage_batch))
        .route("/price-preview", post(price_preview))
        .route("/margin", get(margin))
        .route("/keys", post(create_key).get(list_keys))
        .route("/keys/{id}", axum::routing::delete(revoke_key))
        .route("/health", get(health))
        .route("/snapshots", post(snapshot))
        .route("/openapi.json", get(openapi_document));
    let portal = Router::new()
        .route("/session", get(crate::portal::open_link))
        .route("/assets/{file}", get(crate::portal::asset_file))
        .route("/api/wallet", get(crate::portal::wallet))
        .route("/api/usage", get(crate::portal::usage))
        .route("/api/spend.svg", get(crate::portal::spend_chart))
        .route(
            "/api/topups",
            get(crate::portal::topups).post(crate::portal::create_topup),
        )
        .route("/api/cards/setup", post(crate::portal::card_setup))
        .route("/api/cards", post(crate::portal::card_saved))
        .route("/api/auto-topup", put(crate::portal::set_auto))
        .route(
            "/api/auto-topup/{asset}",
            axum::routing::delete(crate::portal::remove_auto),
        );
    Router::new()
        .nest("/v1", v1)
        .route("/console", get(crate::console::page))
        .route(
            "/console/session",
            post(crate::console::sign_in).delete(crate::console::sign_out),
        )
        .route("/console/assets/{file}", get(crate::console::asset_file))
        .route("/portal", get(crate::portal::page))
        .nest("/portal", portal)
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(observe))
        // Read a little past the limit, so that a body just over it is answered 413 after it
        // was read (the client then gets the answer instead of a reset while still sending).
        .layer(axum::extract::DefaultBodyLimit::max(
            BODY_BYTES_MAX + 64 * 1024,
        ))
        .with_state(state)
}

// ----- extractors -----------------------------------------------------------------------------

/// The authenticated caller.
pub(crate) struct Caller(Arc<LiveKey>);

impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Caller, ApiError> {
        let failed = |reason: &'static str, code: ErrorCode| {
            metrics::counter!("tally_auth_failures_total", "transport" => "http", "reason" => reason)
                .increment(1);
            ApiError::from_code(code)
        };
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            // The console's session cookie stands for the admin key it signed in with; a
            // request that changes state must also carry the session's CSRF token.
            let session = crate::session::cookie(&parts.headers, crate::console::COOKIE)
                .and_then(|id| state.console.session(&id));
            return match session {
                // Keys are minted and revoked with the bearer key only: a page script that
                // got hold of a console session cannot make itself a lasting admin key.
                Some(_)
                    if parts
                        .extensions
                        .get::<axum::extract::OriginalUri>()
                        .map_or(parts.uri.path(), |u| u.0.path())
                        .starts_with("/v1/keys") =>
                {
                    Err(failed("console_keys", ErrorCode::Unauthenticated).with(
                        "detail",
                        "API keys are managed with a bearer key, not the console",
                    ))
                }
                Some((key, csrf)) => {
                    let reads = parts.method == Method::GET || parts.method == Method::HEAD;
                    let sent = parts
                        .headers
                        .get("x-csrf-token")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if reads || crate::session::same(sent, &csrf) {
                        Ok(Caller(key))
                    } else {
                        Err(failed("csrf", ErrorCode::OutOfScope)
                            .with("detail", "send the console's CSRF token in X-CSRF-Token"))
                    }
                }
                None => Err(failed("missing", ErrorCode::Unauthenticated)),
            };
        };
        let Some(key) = value.to_str().ok().and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        }) else {
            return Err(failed("malformed", ErrorCode::Unauthenticated));
        };
        match state.keys.authenticate(key.trim().as_bytes()) {
            Some(live) if !live.is_revoked() => Ok(Caller(live)),
            _ => Err(failed("invalid_key", ErrorCode::InvalidKey)),
        }
    }
}

impl Caller {
    fn allow(&self, kind: Kind) -> Result<(), ApiError> {
        if kind.admin_only() && self.0.scope != WireScope::Admin {
            metrics::counter!("tally_auth_failures_total", "transport" => "http", "reason" => "scope")
                .increment(1);
            return Err(ApiError::from_code(ErrorCode::OutOfScope));
        }
        Ok(())
    }

    fn admin(&self) -> Result<(), ApiError> {
        self.allow(Kind::KeyCreate)
    }
}

/// Path parameters, with errors in the API's shape (`/v1/keys/-1` is a 422 naming the value).
pub(crate) struct Path<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Path<T>, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| ApiError::invalid(format!("path: {}", e.body_text())))
    }
}

/// The `Idempotency-Key` of a mutating request.
pub(crate) struct Idem {
    key: String,
    id: RequestId,
}

impl<S: Send + Sync> FromRequestParts<S> for Idem {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Idem, ApiError> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Err(ApiError::transport(
                ErrorCode::IdempotencyKeyRequired,
                "this request changes state: send an Idempotency-Key header (e.g. a UUID) so a \
                 retry cannot apply it twice",
            ));
        };
        let key = value.to_str().map_err(|_| {
            ApiError::transport(
                ErrorCode::IdempotencyKeyRequired,
                "the Idempotency-Key must be printable ASCII",
            )
        })?;
        Ok(Idem {
            key: key.to_string(),
            id: idempotency::request_id(key)?,
        })
    }
}

/// A JSON body of type `T`, with errors in the API's shape.
pub(crate) struct Body<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Body<T>, ApiError> {
        if let Some(kind) = request.headers().get(header::CONTENT_TYPE) {
            let kind = kind.to_str().unwrap_or("");
            let essence = kind.split(';').next().unwrap_or("").trim();
            if !essence.eq_ignore_ascii_case("application/json") {
                return Err(ApiError::transport(
                    ErrorCode::UnsupportedMediaType,
                    format!("the body must be application/json, not {kind:?}"),
                ));
            }
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::transport(
                    ErrorCode::BodyTooLarge,
                    format!("the body is over the limit of {BODY_BYTES_MAX} bytes"),
                )
            } else {
                ApiError::invalid(format!("cannot read the body: {e}"))
            }
        })?;
        if bytes.len() > BODY_BYTES_MAX {
            return Err(ApiError::transport(
                ErrorCode::BodyTooLarge,
                format!("the body is over the limit of {BODY_BYTES_MAX} bytes"),
            ));
        }
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
    }
}

fn wallet_id(text: &str) -> Result<tally_engine::WalletId, ApiError> {
    name("wallet", text)
}

// ----- calling the backend --------------------------------------------------------------------

/// The error answer of a rejected reply, with its details.
fn rejection(id: RequestId, reply: &Reply) -> ApiError {
    let mut error = ApiError::rejected(reply.code).with("request_id", request_id_hex(id));
    if let ReplyValue::Shortfall {
        asset,
        spendable,
        required,
    } = reply.value
    {
        error = error
            .with("asset", asset.as_str())
            .with("spendable", spendable.normalize().to_string())
            .with("required", required.normalize().to_string());
    }
    error
}

async fn command(
    state: &ApiState,
    caller: &Caller,
    id: RequestId,
    command: Command,
) -> Result<Json<CommandResult>, ApiError> {
    caller.allow(command_kind(&command))?;
    let backend = state.backend()?;
    let reply = backend
        .command(EngineRequest { id, command })
        .await
        .map_err(ApiError::from_code)?;
    if reply.code.is_ok() {
        Ok(Json(CommandResult::of(id, &reply)))
    } else {
        Err(rejection(id, &reply))
    }
}

async fn query(state: &ApiState, caller: &Caller, query: Query) -> Result<QueryReply, ApiError> {
    caller.allow(query_kind(&query))?;
    let backend = state.backend()?;
    backend
        .query(query)
        .await
        .map_err(ApiError::from_code)?
        .map_err(ApiError::rejected)
}

fn unexpected(answer: QueryReply) -> ApiError {
    tracing::error!(
        ?answer,
        "http: the backend answered a query with the wrong kind"
    );
    ApiError::transport(
        ErrorCode::Malformed,
        "the server answered with the wrong kind",
    )
}

// ----- handlers -------------------------------------------------------------------------------

/// Declare an asset.
#[utoipa::path(post, path = "/v1/assets", tag = "catalog", request_body = DefineAsset,
    params(("Idempotency-Key" = String, Header, description = "Makes retries safe (see the docs)", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn define_asset(
    State(state): AppState,
    caller: Caller,
    idem: Idem,
    Body(body): Body<DefineAsset>,
) -> Result<Json<CommandResult>, ApiError> {
    command(&state, &caller, idem.id, body.command()?).await
}

/// Declare a product (meter) and its dimensions.
#[utoipa::path(post, path = "/v1/products", tag = "catalog", request_body = DefineProduct,
    params(("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn define_product(
    State(state): AppState,
    caller: Caller,
    idem: Idem,
    Body(body): Body<DefineProduct>,
) -> Result<Json<CommandResult>, ApiError> {
    command(&state, &caller, idem.id, body.command()?).await
}

/// Write (replace) a plan's draft; creates the plan if needed.
#[utoipa::path(put, path = "/v1/plans/{plan}/draft", tag = "plans", request_body = DraftPlan,
    params(("plan" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn draft_plan(
    State(state): AppState,
    caller: Caller,
    Path(plan): Path<String>,
    idem: Idem,
    Body(body): Body<DraftPlan>,
) -> Result<Json<CommandResult>, ApiError> {
    command(&state, &caller, idem.id, body.command(&plan)?).await
}

/// Publish a plan's draft as its next version (which never changes afterwards).
#[utoipa::path(post, path = "/v1/plans/{plan}/publish", tag = "plans",
    params(("plan" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn publish_plan(
    State(state): AppState,
    caller: Caller,
    Path(plan): Path<String>,
    idem: Idem,
) -> Result<Json<CommandResult>, ApiError> {
    let plan = name("plan", &plan)?;
    command(&state, &caller, idem.id, Command::PublishPlan { plan }).await
}

/// Price recorded events under a plan's draft and its latest version (changes nothing).
#[utoipa::path(post, path = "/v1/plans/{plan}/draft/test", tag = "plans", request_body = DraftTest,
    params(("plan" = String, Path)),
    responses((status = 200, body = DraftTestReport), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn test_draft(
    State(state): AppState,
    caller: Caller,
    Path(plan): Path<String>,
    Body(body): Body<DraftTest>,
) -> Result<Json<DraftTestReport>, ApiError> {
    caller.admin()?;
    let plan = name("plan", &plan)?;
    let events = match (&body.events, body.from, body.to) {
        (Some(events), None, None) => events
            .iter()
            .map(UsageEvent::to_engine)
            .collect::<Result<_, _>>()?,
        (None, Some(from), Some(to)) if from < to => {
            let recorded = read_history(&state, &caller, move |r| {
                r.recorded(plan.as_str(), from, to, 100_000)
            })
            .await?
            .ok_or_else(|| {
                ApiError::invalid("more than 100000 events in the period: choose a shorter one")
            })?;
            recorded
                .iter()
                .map(recorded_event)
                .collect::<Result<_, _>>()?
        }
        _ => {
            return Err(ApiError::invalid(
                "give either events, or from and to (from before to)",
            ))
        }
    };
    match query(&state, &caller, Query::DraftTest { plan, events }).await? {
        QueryReply::DraftTest(r) => Ok(Json(DraftTestReport::of(&r))),
        other => Err(unexpected(other)),
    }
}

/// A recorded event as the engine prices it again (in record mode: priced, never refused).
fn recorded_event(
    r: &tally_outbound::sqlite::Recorded,
) -> Result<tally_engine::UsageEvent, ApiError> {
    let pairs = |m: &std::collections::BTreeMap<String, String>, what: &'static str| {
        m.iter()
            .map(|(k, v)| Ok((name(what, k)?, name(what, v)?)))
            .collect::<Result<Vec<_>, ApiError>>()
    };
    Ok(tally_engine::UsageEvent {
        wallet: wallet_id(&r.wallet)?,
        product: name("product", &r.product)?,
        quantities: r
            .quantities
            .iter()
            .map(|(k, v)| {
                Ok(tally_engine::Quantity {
                    dimension: name("quantity", k)?,
                    value: crate::json::parse_decimal(v).map_err(ApiError::invalid)?,
                })
            })
            .collect::<Result<_, ApiError>>()?,
        attributes: pairs(&r.attributes, "attribute")?,
        cost_usd: r.cost_usd,
        occurred_at: r.occurred_at,
        mode: tally_engine::DebitMode::Record,
    })
}

/// Create a wallet.
#[utoipa::path(post, path = "/v1/wallets", tag = "wallets", request_body = CreateWallet,
    params(("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create_wallet(
    State(state): AppState,
    caller: Caller,
    idem: Idem,
    Body(body): Body<CreateWallet>,
) -> Result<Json<CommandResult>, ApiError> {
    command(&state, &caller, idem.id, body.command()?).await
}

/// List wallets, a page at a time, optionally filtered.
///
/// Filters: `frozen=true|false`, `in_debt=true|false`, and `metadata[KEY]=VALUE` (repeatable; all
/// must match). Pages follow shard order, then creation order. Each call looks at a bounded
/// number of wallets, so with a selective filter a page may hold fewer than `limit` wallets (even
/// none) while `has_more` is true: keep following `next_cursor`.
#[utoipa::path(get, path = "/v1/wallets", tag = "wallets",
    params(
        ("limit" = Option<u32>, Query, description = "1 to 100 (default 20)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
        ("frozen" = Option<bool>, Query),
        ("in_debt" = Option<bool>, Query),
        ("metadata" = Option<std::collections::BTreeMap<String, String>>, Query, style = DeepObject, explode, description = "metadata[KEY]=VALUE"),
    ),
    responses((status = 200, body = WalletList), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn list_wallets(
    State(state): AppState,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<WalletList>, ApiError> {
    caller.admin()?;
    let mut limit = 20u32;
    let mut cursor = (0u32, 0u32);
    let mut filter = WalletFilter::default();
    let flag = |key: &str, value: &str| match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ApiError::invalid(format!(
            "{key}: {value:?} is not true or false"
        ))),
    };
    for (key, value) in parse_query(raw.as_deref().unwrap_or(""))? {
        match key.as_str() {
            "limit" => limit = limit_param(&value, PAGE_LIMIT_MAX)?,
            "cursor" => cursor = parse_cursor(&value)?,
            "frozen" => filter.frozen = Some(flag("frozen", &value)?),
            "in_debt" => filter.in_debt = Some(flag("in_debt", &value)?),
            other => match other
                .strip_prefix("metadata[")
                .and_then(|k| k.strip_suffix(']'))
            {
                Some(k) => {
                    if filter.metadata.len() >= 16 {
                        return Err(ApiError::invalid("at most 16 metadata filters"));
                    }
                    filter
                        .metadata
                        .push((name("metadata", k)?, name("metadata", &value)?))
                }
                None => {
                    return Err(ApiError::invalid(format!(
                        "unknown query parameter {other:?} (limit, cursor, frozen, in_debt, \
                         metadata[KEY])"
                    )))
                }
            },
        }
    }
    let backend = state.backend()?;
    let (shards, _) = backend.shards();
    let (mut shard, mut from) = cursor;
    if shard >= shards {
        return Err(ApiError::invalid("cursor: not a cursor of this server"));
    }
    let mut data = Vec::new();
    // A bounded number of shard calls per page.
    for _ in 0..(2 * shards).max(4) {
        let page = backend
            .list_wallets(shard, from, limit - data.len() as u32, filter.clone())
            .await
            .map_err(ApiError::from_code)?;
        data.extend(page.wallets.iter().map(Wallet::of));
        match page.next {
            Some(next) => from = next,
            None => {
                shard += 1;
                from = 0;
            }
        }
        if shard >= shards || data.len() as u32 >= limit {
            break;
        }
    }
    let has_more = shard < shards;
    Ok(Json(WalletList {
        data,
        has_more,
        next_cursor: has_more.then(|| format!("w{shard}.{from}")),
    }))
}

fn parse_cursor(text: &str) -> Result<(u32, u32), ApiError> {
    text.strip_prefix('w')
        .and_then(|t| t.split_once('.'))
        .and_then(|(s, p)| Some((s.parse().ok()?, p.parse().ok()?)))
        .ok_or_else(|| ApiError::invalid(format!("cursor: {text:?} is not a cursor")))
}

/// A time parameter (RFC 3339 UTC).
fn time_param(key: &str, value: &str) -> Result<Timestamp, ApiError> {
    Timestamp::parse_rfc3339(value)
        .map_err(|e| ApiError::invalid(format!("{key}: {value:?} is not an RFC 3339 time: {e}")))
}

/// A `limit` parameter, 1 to `max`.
pub(crate) fn limit_param(value: &str, max: u32) -> Result<u32, ApiError> {
    value
        .parse()
        .ok()
        .filter(|l| (1..=max).contains(l))
        .ok_or_else(|| ApiError::invalid(format!("limit: {value:?} is not 1 to {max}")))
}

/// `key=value` pairs of a query string, percent-decoded.
pub(crate) fn parse_query(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    let decode = |s: &str| -> Result<String, ApiError> {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| ApiError::invalid("query: bad percent-encoding"))?;
                out.push(hex);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).map_err(|_| ApiError::invalid("query: not UTF-8"))
    };
    let pairs: Vec<&str> = raw.split('&').filter(|p| !p.is_empty()).collect();
    if pairs.len() > 64 {
        return Err(ApiError::invalid("query: more than 64 parameters"));
    }
    pairs
        .into_iter()
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

/// The filters of a history page: `from`, `to` (RFC 3339), `limit` (1 to 1000, default 50),
/// `cursor`, and for usage `product` and `model`.
fn history_filter(
    wallet: &str,
    raw: Option<&str>,
    usage: bool,
) -> Result<tally_outbound::sqlite::Filter, ApiError> {
    let mut filter = tally_outbound::sqlite::Filter {
        wallet: wallet_id(wallet)?.as_str().to_string(),
        limit: 50,
        ..Default::default()
    };
    for (key, value) in parse_query(raw.unwrap_or(""))? {
        match key.as_str() {
            "from" => filter.from = Some(time_param(&key, &value)?),
            "to" => filter.to = Some(time_param(&key, &value)?),
            "limit" => filter.limit = limit_param(&value, 1000)?,
            "cursor" => {
                filter.cursor = Some(tally_outbound::sqlite::Cursor::decode(&value).ok_or_else(
                    || ApiError::invalid(format!("cursor: {value:?} is not a cursor")),
                )?)
            }
            "product" if usage => filter.product = Some(name("product", &value)?.as_str().into()),
            "model" if usage => filter.model = Some(name("model", &value)?.as_str().into()),
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {other:?} (from, to, limit, cursor{})",
                    if usage { ", product, model" } else { "" }
                )))
            }
        }
    }
    Ok(filter)
}

fn history_error(e: tally_outbound::Error) -> ApiError {
    tracing::error!(error = %e, "http: history store");
    ApiError::transport(ErrorCode::Stopped, format!("the history store failed: {e}"))
}

async fn read_history<T: Send + 'static>(
    state: &Arc<ApiState>,
    caller: &Caller,
    read: impl FnOnce(&tally_outbound::sqlite::Reader) -> Result<T, tally_outbound::Error>
        + Send
        + 'static,
) -> Result<T, ApiError> {
    caller.allow(Kind::QueryWallet)?;
    let reader = Arc::clone(state.history()?);
    blocking(move || read(&reader).map_err(history_error)).await
}

/// A wallet's usage events, newest first, with the charge, revenue, cost and refunds of each.
///
/// From the history store, which trails the shards by at most the outbound flush interval
/// (1 s) plus queueing.
#[utoipa::path(get, path = "/v1/wallets/{wallet}/usage", tag = "history",
    params(("wallet" = String, Path),
        ("from" = Option<String>, Query, format = DateTime), ("to" = Option<String>, Query, format = DateTime),
        ("product" = Option<String>, Query), ("model" = Option<String>, Query),
        ("limit" = Option<u32>, Query, description = "1 to 1000 (default 50)"), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = UsagePage), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn wallet_usage(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<UsagePage>, ApiError> {
    let filter = history_filter(&wallet, raw.as_deref(), true)?;
    let page = read_history(&state, &caller, move |r| r.usage(&filter)).await?;
    Ok(Json(UsagePage {
        has_more: page.next.is_some(),
        next_cursor: page.next.map(|c| c.encode()),
        data: page.rows,
    }))
}

/// A wallet's journal entries (every balance change, double-entry), newest first.
#[utoipa::path(get, path = "/v1/wallets/{wallet}/transactions", tag = "history",
    params(("wallet" = String, Path),
        ("from" = Option<String>, Query, format = DateTime), ("to" = Option<String>, Query, format = DateTime),
        ("limit" = Option<u32>, Query, description = "1 to 1000 (default 50)"), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = TransactionPage), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn wallet_transactions(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<TransactionPage>, ApiError> {
    let filter = history_filter(&wallet, raw.as_deref(), false)?;
    let page = read_history(&state, &caller, move |r| r.transactions(&filter)).await?;
    Ok(Json(TransactionPage {
        has_more: page.next.is_some(),
        next_cursor: page.next.map(|c| c.encode()),
        data: page.rows,
    }))
}

/// A wallet's auto top-up requests, newest first.
#[utoipa::path(get, path = "/v1/wallets/{wallet}/topups", tag = "history",
    params(("wallet" = String, Path),
        ("from" = Option<String>, Query, format = DateTime), ("to" = Option<String>, Query, format = DateTime),
        ("limit" = Option<u32>, Query, description = "1 to 1000 (default 50)"), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = TopUpPage), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn wallet_topups(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<TopUpPage>, ApiError> {
    let filter = history_filter(&wallet, raw.as_deref(), false)?;
    let page = read_history(&state, &caller, move |r| r.topups(&filter)).await?;
    Ok(Json(TopUpPage {
        has_more: page.next.is_some(),
        next_cursor: page.next.map(|c| c.encode()),
        data: page.rows,
    }))
}

/// Margin per wallet, product, plan version or model, or per hour or day: who costs more than
/// they pay.
///
/// `group_by` = wallet | product | plan | model | hour | day | metadata:KEY (the value of one
/// wallet metadata key, `-` when absent); `from`, `to` (RFC 3339) bound when
/// the usage happened; `order` = margin (lowest first, the default), revenue, cost (highest
/// first) or key; `limit` 1 to 10,000 (default 100). Summed exactly from the history store, which
/// trails the shards by about 1 s; for live totals see `/v1/margin`.
#[utoipa::path(get, path = "/v1/analytics/margin", tag = "margin",
    params(("group_by" = String, Query, description = "wallet, product, plan, model, hour, day or metadata:KEY"),
        ("from" = Option<String>, Query, format = DateTime), ("to" = Option<String>, Query, format = DateTime),
        ("order" = Option<String>, Query, description = "margin (default), revenue, cost or key"),
        ("limit" = Option<u32>, Query, description = "1 to 10000 (default 100)")),
    responses((status = 200, body = MarginAnalytics), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn margin_analytics(
    State(state): AppState,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<MarginAnalytics>, ApiError> {
    caller.allow(Kind::QueryMargin)?;
    let (mut group_by, mut from, mut to, mut limit) = (None, None, None, 100u32);
    let mut order = tally_outbound::sqlite::Order::Margin;
    for (key, value) in parse_query(raw.as_deref().unwrap_or(""))? {
        match key.as_str() {
            "group_by" => {
                group_by = Some(
                    value
                        .parse()
                        .map_err(|e| ApiError::invalid(format!("group_by: {e}")))?,
                )
            }
            "from" => from = Some(time_param(&key, &value)?),
            "to" => to = Some(time_param(&key, &value)?),
            "order" => {
                order = value
                    .parse()
                    .map_err(|e| ApiError::invalid(format!("order: {e}")))?
            }
            "limit" => limit = limit_param(&value, 10_000)?,
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {other:?} (group_by, from, to, order, limit)"
                )))
            }
        }
    }
    let group_by = group_by.ok_or_else(|| {
        ApiError::invalid(
            "group_by is required: wallet, product, plan, model, hour, day or metadata:KEY",
        )
    })?;
    let reader = Arc::clone(state.history()?);
    let groups = blocking(move || {
        reader
            .margin(group_by, from, to, order, limit)
            .map_err(history_error)
    })
    .await?;
    Ok(Json(MarginAnalytics { data: groups }))
}

/// Everything about one wallet.
#[utoipa::path(get, path = "/v1/wallets/{wallet}", tag = "wallets",
    params(("wallet" = String, Path)),
    responses((status = 200, body = Wallet), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn get_wallet(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
) -> Result<Json<Wallet>, ApiError> {
    let wallet = wallet_id(&wallet)?;
    match query(&state, &caller, Query::Wallet { wallet }).await? {
        QueryReply::Wallet(w) => Ok(Json(Wallet::of(&w))),
        other => Err(unexpected(other)),
    }
}

/// Freeze a wallet: strict usage and reserves are refused until it is unfrozen.
#[utoipa::path(post, path = "/v1/wallets/{wallet}/freeze", tag = "wallets",
    params(("wallet" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn freeze(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    idem: Idem,
) -> Result<Json<CommandResult>, ApiError> {
    let wallet = wallet_id(&wallet)?;
    command(&state, &caller, idem.id, Command::Freeze { wallet }).await
}

/// Unfreeze a wallet.
#[utoipa::path(post, path = "/v1/wallets/{wallet}/unfreeze", tag = "wallets",
    params(("wallet" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn unfreeze(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    idem: Idem,
) -> Result<Json<CommandResult>, ApiError> {
    let wallet = wallet_id(&wallet)?;
    command(&state, &caller, idem.id, Command::Unfreeze { wallet }).await
}

/// Set a wallet's overdraft limit in one asset.
#[utoipa::path(put, path = "/v1/wallets/{wallet}/overdraft", tag = "wallets", request_body = SetOverdraft,
    params(("wallet" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn set_overdraft(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    idem: Idem,
    Body(body): Body<SetOverdraft>,
) -> Result<Json<CommandResult>, ApiError> {
    let c = Command::SetOverdraft {
        wallet: wallet_id(&wallet)?,
        asset: asset("asset", &body.asset)?,
        limit: body.limit,
    };
    command(&state, &caller, idem.id, c).await
}

/// Put a wallet on a published plan version from a given time on.
#[utoipa::path(put, path = "/v1/wallets/{wallet}/plan", tag = "plans", request_body = AssignPlan,
    params(("wallet" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn assign_plan(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    idem: Idem,
    Body(body): Body<AssignPlan>,
) -> Result<Json<CommandResult>, ApiError> {
    let c = Command::AssignPlan {
        wallet: wallet_id(&wallet)?,
        plan: name("plan", &body.plan)?,
        version: body.version,
        effective_from: body.effective_from.unwrap_or(Timestamp(0)),
    };
    command(&state, &caller, idem.id, c).await
}

/// Add a grant (credit) to a wallet.
#[utoipa::path(post, path = "/v1/wallets/{wallet}/grants", tag = "wallets", request_body = CreateGrant,
    params(("wallet" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create_grant(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    idem: Idem,
    Body(body): Body<CreateGrant>,
) -> Result<Json<CommandResult>, ApiError> {
    let c = body.command(wallet_id(&wallet)?)?;
    command(&state, &caller, idem.id, c).await
}

/// One balance of one wallet.
#[utoipa::path(get, path = "/v1/wallets/{wallet}/balances/{asset}", tag = "wallets",
    params(("wallet" = String, Path), ("asset" = String, Path)),
    responses((status = 200, body = Balance), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn get_balance(
    State(state): AppState,
    caller: Caller,
    Path((wallet, asset_code)): Path<(String, String)>,
) -> Result<Json<Balance>, ApiError> {
    let q = Query::Balance {
        wallet: wallet_id(&wallet)?,
        asset: asset("asset", &asset_code)?,
    };
    match query(&state, &caller, q).await? {
        QueryReply::Balance(b) => Ok(Json(Balance::of(&b))),
        other => Err(unexpected(other)),
    }
}

/// The margin of one wallet's usage.
#[utoipa::path(get, path = "/v1/wallets/{wallet}/margin", tag = "margin",
    params(("wallet" = String, Path)),
    responses((status = 200, body = Margin), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn wallet_margin(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
) -> Result<Json<Margin>, ApiError> {
    let scope = MarginScope::Wallet(wallet_id(&wallet)?);
    margin_of(&state, &caller, scope).await
}

async fn margin_of(
    state: &ApiState,
    caller: &Caller,
    scope: MarginScope,
) -> Result<Json<Margin>, ApiError> {
    match query(state, caller, Query::Margin(scope)).await? {
        QueryReply::Margin(m) => Ok(Json(Margin::of(&m))),
        other => Err(unexpected(other)),
    }
}

/// Margin aggregates: all usage, or one product, plan version or time range.
///
/// Give at most one of: `product`; `plan` with `version`; `from` with `to` (RFC 3339, whole UTC
/// hours). The figures are the shards' live aggregates, current as of the request.
#[utoipa::path(get, path = "/v1/margin", tag = "margin",
    params(
        ("product" = Option<String>, Query),
        ("plan" = Option<String>, Query),
        ("version" = Option<u32>, Query),
        ("from" = Option<String>, Query, format = DateTime),
        ("to" = Option<String>, Query, format = DateTime),
    ),
    responses((status = 200, body = Margin), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn margin(
    State(state): AppState,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<Margin>, ApiError> {
    let (mut product, mut plan, mut version, mut from, mut to) = (None, None, None, None, None);
    for (key, value) in parse_query(raw.as_deref().unwrap_or(""))? {
        match key.as_str() {
            "product" => product = Some(name("product", &value)?),
            "plan" => plan = Some(name("plan", &value)?),
            "version" => {
                version = Some(value.parse::<u32>().map_err(|_| {
                    ApiError::invalid(format!("version: {value:?} is not a number"))
                })?)
            }
            "from" => from = Some(time_param(&key, &value)?),
            "to" => to = Some(time_param(&key, &value)?),
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {other:?} (product, plan, version, from, to)"
                )))
            }
        }
    }
    let scope = match (product, plan, version, from, to) {
        (None, None, None, None, None) => MarginScope::Total,
        (Some(p), None, None, None, None) => MarginScope::Product(p),
        (None, Some(plan), Some(version), None, None) => MarginScope::PlanVersion { plan, version },
        (None, None, None, Some(from), Some(to)) => MarginScope::Hours { from, to },
        _ => {
            return Err(ApiError::invalid(
                "give at most one of: product; plan with version; from with to",
            ))
        }
    };
    margin_of(&state, &caller, scope).await
}

/// Hold an amount, or a priced estimate, until it is settled, released or its deadline passes.
#[utoipa::path(post, path = "/v1/wallets/{wallet}/holds", tag = "holds", request_body = CreateHold,
    params(("wallet" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create_hold(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    idem: Idem,
    Body(body): Body<CreateHold>,
) -> Result<Json<CommandResult>, ApiError> {
    let c = body.command(wallet_id(&wallet)?)?;
    command(&state, &caller, idem.id, c).await
}

/// Settle a hold with the actual usage (an overrun is charged as in record mode).
#[utoipa::path(post, path = "/v1/wallets/{wallet}/holds/{hold}/settle", tag = "holds", request_body = Settle,
    params(("wallet" = String, Path), ("hold" = u64, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn settle_hold(
    State(state): AppState,
    caller: Caller,
    Path((wallet, hold)): Path<(String, u64)>,
    idem: Idem,
    Body(body): Body<Settle>,
) -> Result<Json<CommandResult>, ApiError> {
    let wallet = wallet_id(&wallet)?;
    let c = Command::Settle {
        wallet,
        hold: tally_engine::HoldId(hold),
        usage: body.to_engine(wallet)?,
    };
    command(&state, &caller, idem.id, c).await
}

/// Release a hold without charging.
#[utoipa::path(post, path = "/v1/wallets/{wallet}/holds/{hold}/release", tag = "holds",
    params(("wallet" = String, Path), ("hold" = u64, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn release_hold(
    State(state): AppState,
    caller: Caller,
    Path((wallet, hold)): Path<(String, u64)>,
    idem: Idem,
) -> Result<Json<CommandResult>, ApiError> {
    let c = Command::Release {
        wallet: wallet_id(&wallet)?,
        hold: tally_engine::HoldId(hold),
    };
    command(&state, &caller, idem.id, c).await
}

/// Refund part or all of a usage event (or settled hold).
#[utoipa::path(post, path = "/v1/wallets/{wallet}/refunds", tag = "adjustments", request_body = CreateRefund,
    params(("wallet" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create_refund(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    idem: Idem,
    Body(body): Body<CreateRefund>,
) -> Result<Json<CommandResult>, ApiError> {
    let event = idempotency::request_id(&body.event)
        .map_err(|_| ApiError::invalid("event: not an idempotency key or request id"))?;
    let c = Command::Refund {
        wallet: wallet_id(&wallet)?,
        event,
        amount: body.amount,
    };
    command(&state, &caller, idem.id, c).await
}

/// Dispute (charge back) a top-up grant: its remainder is clawed back, the spent part is debt.
#[utoipa::path(post, path = "/v1/wallets/{wallet}/disputes", tag = "adjustments", request_body = CreateDispute,
    params(("wallet" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create_dispute(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    idem: Idem,
    Body(body): Body<CreateDispute>,
) -> Result<Json<CommandResult>, ApiError> {
    let c = Command::Dispute {
        wallet: wallet_id(&wallet)?,
        grant: tally_engine::GrantId(body.grant),
        freeze: body.freeze,
    };
    command(&state, &caller, idem.id, c).await
}

/// Record that a dispute was won: the grant's amount is credited again.
#[utoipa::path(post, path = "/v1/wallets/{wallet}/disputes/{grant}/won", tag = "adjustments",
    params(("wallet" = String, Path), ("grant" = u64, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn dispute_won(
    State(state): AppState,
    caller: Caller,
    Path((wallet, grant)): Path<(String, u64)>,
    idem: Idem,
) -> Result<Json<CommandResult>, ApiError> {
    let c = Command::DisputeWon {
        wallet: wallet_id(&wallet)?,
        grant: tally_engine::GrantId(grant),
    };
    command(&state, &caller, idem.id, c).await
}

/// A manual correction with a reason.
#[utoipa::path(post, path = "/v1/wallets/{wallet}/adjustments", tag = "adjustments", request_body = CreateAdjustment,
    params(("wallet" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create_adjustment(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    idem: Idem,
    Body(body): Body<CreateAdjustment>,
) -> Result<Json<CommandResult>, ApiError> {
    let c = Command::Adjust {
        wallet: wallet_id(&wallet)?,
        asset: asset("asset", &body.asset)?,
        amount: body.amount,
        reason: body.reason,
    };
    command(&state, &caller, idem.id, c).await
}

/// Set (replace) a wallet's auto top-up rule for one asset.
#[utoipa::path(put, path = "/v1/wallets/{wallet}/topup-rules/{asset}", tag = "top-ups", request_body = SetTopUpRule,
    params(("wallet" = String, Path), ("asset" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn set_topup_rule(
    State(state): AppState,
    caller: Caller,
    Path((wallet, asset_code)): Path<(String, String)>,
    idem: Idem,
    Body(body): Body<SetTopUpRule>,
) -> Result<Json<CommandResult>, ApiError> {
    let c = body.command(wallet_id(&wallet)?, &asset_code)?;
    command(&state, &caller, idem.id, c).await
}

/// Set what one unit of an asset costs when a top-up buys it (auto top-up rules need it).
#[utoipa::path(put, path = "/v1/assets/{asset}/price", tag = "top-ups", request_body = AssetPrice,
    params(("asset" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn price_asset(
    State(state): AppState,
    caller: Caller,
    Path(asset_code): Path<String>,
    idem: Idem,
    Body(body): Body<AssetPrice>,
) -> Result<Json<CommandResult>, ApiError> {
    let c = body.command(&asset_code)?;
    command(&state, &caller, idem.id, c).await
}

/// Remove an asset's top-up price: top-ups of it are no longer requested.
#[utoipa::path(delete, path = "/v1/assets/{asset}/price", tag = "top-ups",
    params(("asset" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn unprice_asset(
    State(state): AppState,
    caller: Caller,
    Path(asset_code): Path<String>,
    idem: Idem,
) -> Result<Json<CommandResult>, ApiError> {
    let c = Command::PriceAsset {
        asset: asset("asset", &asset_code)?,
        price: None,
    };
    command(&state, &caller, idem.id, c).await
}

/// Set a wallet's payment profile: its Stripe customer and default payment method.
#[utoipa::path(put, path = "/v1/wallets/{wallet}/billing", tag = "top-ups", request_body = SetBilling,
    params(("wallet" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn set_billing(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    idem: Idem,
    Body(body): Body<SetBilling>,
) -> Result<Json<CommandResult>, ApiError> {
    let c = body.command(wallet_id(&wallet)?)?;
    command(&state, &caller, idem.id, c).await
}

/// Stripe's webhook endpoint: `payment_intent.succeeded` and `.payment_failed` settle top-ups,
/// `charge.dispute.*` dispute or restore the grant a charge funded, `charge.refunded` removes
/// the unspent part of it. Authenticated by the `Stripe-Signature` header (the endpoint's
/// signing secret), not by an API key; each event id is applied once.
#[utoipa::path(post, path = "/v1/stripe/webhook", tag = "top-ups",
    request_body(content = Object, description = "A Stripe event, as Stripe sends it"),
    params(("Stripe-Signature" = String, Header, description = "t=TIMESTAMP,v1=HMAC-SHA256")),
    responses((status = 200, body = WebhookReceived), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
pub(crate) async fn stripe_webhook(
    State(state): AppState,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Json<WebhookReceived>, ApiError> {
    use tally_outbound::stripe::WebhookError;
    let stripe = state.stripe.get().ok_or_else(|| {
        ApiError::transport(
            ErrorCode::NotFound,
            "Stripe is not configured on this server (stripe_webhook_secret)",
        )
    })?;
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    match stripe.webhook(&body, signature).await {
        Ok(outcome) => Ok(Json(WebhookReceived {
            received: true,
            outcome: outcome.into(),
        })),
        Err(e @ WebhookError::NotConfigured) => {
            Err(ApiError::transport(ErrorCode::NotFound, e.to_string()))
        }
        // 400, as Stripe's own endpoints answer a delivery that cannot be verified.
        Err(e @ (WebhookError::BadSignature(_) | WebhookError::BadPayload(_))) => {
            let mut error = ApiError::invalid(e.to_string());
            error.status = StatusCode::BAD_REQUEST;
            Err(error)
        }
        Err(e @ WebhookError::Unavailable(_)) => {
            Err(ApiError::transport(ErrorCode::NotReady, e.to_string()))
        }
    }
}

/// Remove a wallet's auto top-up rule for one asset.
#[utoipa::path(delete, path = "/v1/wallets/{wallet}/topup-rules/{asset}", tag = "top-ups",
    params(("wallet" = String, Path), ("asset" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn remove_topup_rule(
    State(state): AppState,
    caller: Caller,
    Path((wallet, asset_code)): Path<(String, String)>,
    idem: Idem,
) -> Result<Json<CommandResult>, ApiError> {
    let c = Command::RemoveTopUpRule {
        wallet: wallet_id(&wallet)?,
        asset: asset("asset", &asset_code)?,
    };
    command(&state, &caller, idem.id, c).await
}

/// Report one usage event: priced under the wallet's plan, then debited.
#[utoipa::path(post, path = "/v1/usage", tag = "usage", request_body = UsageEvent,
    params(("Idempotency-Key" = String, Header, description = "Makes retries safe; refunds refer to the event by it", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CommandResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn report_usage(
    State(state): AppState,
    caller: Caller,
    idem: Idem,
    Body(body): Body<UsageEvent>,
) -> Result<Json<CommandResult>, ApiError> {
    if body.idempotency_key.is_some() {
        return Err(ApiError::invalid(
            "idempotency_key: only events inside a batch take one; send the Idempotency-Key header",
        ));
    }
    let c = Command::Usage(body.to_engine()?);
    command(&state, &caller, idem.id, c).await
}

/// Report many usage events in one call (one group commit per shard); each is answered.
#[utoipa::path(post, path = "/v1/usage/batch", tag = "usage", request_body = UsageBatch,
    params(("Idempotency-Key" = String, Header, description = "Event i without its own key gets the key \"<this key>/<i>\"", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = BatchResult), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn report_usage_batch(
    State(state): AppState,
    caller: Caller,
    idem: Idem,
    Body(body): Body<UsageBatch>,
) -> Result<Json<BatchResult>, ApiError> {
    caller.allow(Kind::UsageBatch)?;
    let items_max = tally_net::message::BATCH_ITEMS_MAX;
    if body.events.is_empty() || body.events.len() > items_max {
        return Err(ApiError::invalid(format!(
            "events: give 1 to {items_max} events"
        )));
    }
    let mut requests = Vec::with_capacity(body.events.len());
    for (i, event) in body.events.iter().enumerate() {
        let key = match &event.idempotency_key {
            Some(k) => k.clone(),
            None => idempotency::batch_item_key(&idem.key, i),
        };
        let id = idempotency::request_id(&key).map_err(|e| {
            ApiError::invalid(format!("events[{i}].idempotency_key: {}", e.body.message))
        })?;
        let usage = event
            .to_engine()
            .map_err(|e| ApiError::invalid(format!("events[{i}]: {}", e.body.message)))?;
        requests.push(EngineRequest {
            id,
            command: Command::Usage(usage),
        });
    }
    let ids: Vec<RequestId> = requests.iter().map(|r| r.id).collect();
    let backend = state.backend()?;
    let outcomes = backend.batch(requests).await.map_err(ApiError::from_code)?;
    let items = ids
        .into_iter()
        .zip(outcomes)
        .map(|(id, outcome)| batch_item(id, outcome))
        .collect();
    Ok(Json(BatchResult { items }))
}

fn batch_item(id: RequestId, outcome: Outcome) -> BatchItem {
    let failed = |e: ApiError| BatchItem {
        request_id: request_id_hex(id),
        status: e.status.as_u16(),
        result: None,
        error: Some(e.body),
    };
    match outcome {
        Ok(reply) if reply.code.is_ok() => BatchItem {
            request_id: request_id_hex(id),
            status: result_status(reply.code).as_u16(),
            result: Some(CommandResult::of(id, &reply)),
            error: None,
        },
        Ok(reply) => failed(rejection(id, &reply)),
        Err(code) => failed(ApiError::from_code(code)),
    }
}

/// The price an event would be charged, without applying it.
#[utoipa::path(post, path = "/v1/price-preview", tag = "usage", request_body = UsageEvent,
    responses((status = 200, body = PricePreview), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn price_preview(
    State(state): AppState,
    caller: Caller,
    Body(body): Body<UsageEvent>,
) -> Result<Json<PricePreview>, ApiError> {
    match query(&state, &caller, Query::PricePreview(body.to_engine()?)).await? {
        QueryReply::Price(p) => Ok(Json(PricePreview {
            asset: p.asset.as_str().into(),
            amount: p.amount,
            plan: p.plan.as_str().into(),
            version: p.version,
            rule: p.rule,
        })),
        other => Err(unexpected(other)),
    }
}

fn scope_of(scope: WireScope) -> Scope {
    match scope {
        WireScope::Gateway => Scope::Gateway,
        WireScope::Admin => Scope::Admin,
    }
}

fn key_error(e: tally_net::keys::KeyError) -> ApiError {
    use tally_net::keys::KeyError;
    let code = match &e {
        KeyError::Unknown(_) => ErrorCode::UnknownKey,
        KeyError::LastAdmin(_) => ErrorCode::LastAdminKey,
        KeyError::Storage(_) | KeyError::BadOperatorKey(_) => ErrorCode::KeyStoreFailed,
    };
    ApiError::transport(code, e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::transport(ErrorCode::Stopped, e.to_string())))
}

/// Create an API key. The secret is in this answer only.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKey,
    params(("Idempotency-Key" = String, Header, description = "Required like every mutating call (a key is created per call; the header is not remembered for keys)", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = CreatedKey), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create_key(
    State(state): AppState,
    caller: Caller,
    _idem: Idem,
    Body(body): Body<CreateKey>,
) -> Result<Json<CreatedKey>, ApiError> {
    caller.admin()?;
    if body.label.is_empty() || body.label.len() > 64 || body.label.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "label: 1 to 64 bytes without control characters",
        ));
    }
    let scope = match body.scope {
        Scope::Gateway => WireScope::Gateway,
        Scope::Admin => WireScope::Admin,
    };
    let keys = Arc::clone(&state.keys);
    let (id, key) = blocking(move || keys.create(&body.label, scope).map_err(key_error)).await?;
    tracing::info!(key_id = id, scope = ?body.scope, "http: API key created");
    Ok(Json(CreatedKey { id, key }))
}

/// List API keys (no secrets).
#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses((status = 200, body = KeyList), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn list_keys(
    State(state): AppState,
    caller: Caller,
) -> Result<Json<KeyList>, ApiError> {
    caller.admin()?;
    let data = state
        .keys
        .list()
        .into_iter()
        .map(|k| KeyInfo {
            id: k.id,
            label: k.label,
            scope: scope_of(k.scope),
            revoked: k.revoked,
        })
        .collect();
    Ok(Json(KeyList { data }))
}

/// Revoke an API key; connections using it are refused from their next request.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = u64, Path), ("Idempotency-Key" = String, Header, description = "Required like every mutating call", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = KeyInfo), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn revoke_key(
    State(state): AppState,
    caller: Caller,
    Path(id): Path<u64>,
    _idem: Idem,
) -> Result<Json<KeyInfo>, ApiError> {
    caller.admin()?;
    let keys = Arc::clone(&state.keys);
    blocking(move || keys.revoke(id).map_err(key_error)).await?;
    tracing::info!(key_id = id, "http: API key revoked");
    let info = state
        .keys
        .list()
        .into_iter()
        .find(|k| k.id == id)
        .ok_or_else(|| ApiError::from_code(ErrorCode::UnknownKey))?;
    Ok(Json(KeyInfo {
        id: info.id,
        label: info.label,
        scope: scope_of(info.scope),
        revoked: info.revoked,
    }))
}

/// Shards configured and running.
#[utoipa::path(get, path = "/v1/health", tag = "operations",
    responses((status = 200, body = Health), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn health(
    State(state): AppState,
    caller: Caller,
) -> Result<Json<Health>, ApiError> {
    caller.allow(Kind::Health)?;
    let backend = state.backend()?;
    let (shards, running) = backend.shards();
    Ok(Json(Health {
        shards,
        shards_running: running,
        status: if shards == running { "ok" } else { "degraded" }.into(),
        sinks: backend
            .sinks()
            .into_iter()
            .map(|s| SinkHealth {
                name: s.name,
                lag_effects: s.effects,
                lag_seconds: s.lag_us as f64 / 1e6,
            })
            .collect(),
    }))
}

/// Take a checkpoint of every shard now (online snapshot).
#[utoipa::path(post, path = "/v1/snapshots", tag = "operations",
    params(("Idempotency-Key" = String, Header, description = "Required like every mutating call (each call takes a checkpoint)", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = Snapshot), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn snapshot(
    State(state): AppState,
    caller: Caller,
    _idem: Idem,
) -> Result<Json<Snapshot>, ApiError> {
    caller.allow(Kind::Snapshot)?;
    let taken = state
        .backend()?
        .snapshot()
        .await
        .map_err(|why| ApiError::transport(ErrorCode::SnapshotFailed, why))?;
    Ok(Json(Snapshot {
        checkpoints: taken
            .into_iter()
            .map(|c| Checkpoint {
                shard: c.shard,
                lsn: c.lsn,
                digest: format!("{:016x}", c.digest),
                stall_us: c.stall_us,
            })
            .collect(),
    }))
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub(crate) async fn openapi_document() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document(),
    )
        .into_response()
}

async fn metrics_text(State(state): AppState) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::transport(ErrorCode::NotFound, "metrics are not enabled").into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): AppState) -> Response {
    match state.backend.get() {
        Some(backend) => {
            let (shards, running) = backend.shards();
            if shards == running {
                "ready\n".into_response()
            } else {
                ApiError::transport(
                    ErrorCode::NotReady,
                    format!("{running} of {shards} shards are running"),
                )
                .into_response()
            }
        }
        None => ApiError::from_code(ErrorCode::NotReady).into_response(),
    }
}

fn standard_method(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

async fn not_found() -> ApiError {
    ApiError::transport(ErrorCode::NotFound, "no such route; see /v1/openapi.json")
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::transport(
        ErrorCode::MethodNotAllowed,
        format!("this route does not take {method}"),
    )
}

/// Counts every HTTP request by method, route and code (`tally_http_requests_total`), and logs
/// it. What reaches the engine is also counted by transport and operation in the server.
async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    // Labels come only from the route table and the standard methods, so a client cannot make
    // new series.
    let method = request.method().clone();
    let route = match &route {
        Some(r) => format!("{} {r}", standard_method(&method)),
        None => "unmatched".to_string(),
    };
    let response = next.run(request).await;
    let code = response.extensions().get::<CodeOf>().map_or(0, |c| c.0);
    let status = response.status().as_u16();
    let seconds = started.elapsed().as_secs_f64();
    metrics::counter!("tally_http_requests_total", "route" => route.clone(), "code" => code.to_string())
        .increment(1);
    metrics::histogram!("tally_http_request_duration_seconds", "route" => route.clone())
        .record(seconds);
    tracing::debug!(%method, %route, status, code, micros = (seconds * 1e6) as u64, "http request");
    response
}

// ----- callers' top-ups and webhooks out --------------------------------------------------------

/// `key=value` pairs of a query string (no percent-decoding: the values here are numbers).
fn query_pairs(raw: Option<&str>) -> Vec<(&str, &str)> {
    raw.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

/// Top up a wallet now: charge its saved payment method (or the one given) for `amount` of an
/// asset with a top-up price, or, with `session: true`, get a PaymentIntent client secret for
/// Stripe.js to confirm in the customer's browser. Either way the grant is added once, when
/// Stripe says the money is in (at once for a saved card that needs nothing more; by Stripe's
/// webhook or the reconciler otherwise). The same Idempotency-Key answers with the same top-up;
/// it needs an admin key.
#[utoipa::path(post, path = "/v1/wallets/{wallet}/topups", tag = "top-ups", request_body = CreateTopUp,
    params(("wallet" = String, Path), ("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = TopUpResource), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create_topup(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
    idem: Idem,
    Body(body): Body<CreateTopUp>,
) -> Result<Json<TopUpResource>, ApiError> {
    caller.admin()?;
    let wallet = wallet_id(&wallet)?;
    let (row, secret) = start_topup(&state, wallet, &body, &idem.key, idem.id).await?;
    Ok(Json(TopUpResource::of(&row, secret)))
}

/// Asks the engine directly, without a caller's scope (the portal's session is its scope).
pub(crate) async fn ask(state: &ApiState, query: Query) -> Result<QueryReply, ApiError> {
    state
        .backend()?
        .query(query)
        .await
        .map_err(ApiError::from_code)?
        .map_err(ApiError::rejected)
}

/// A caller's top-up of `wallet` (the admin route and the portal): checked against what the
/// engine knows, then stored and charged (or made a browser payment) by the Stripe worker.
pub(crate) async fn start_topup(
    state: &ApiState,
    wallet: tally_engine::WalletId,
    body: &CreateTopUp,
    idem_key: &str,
    idem_id: RequestId,
) -> Result<(tally_outbound::payments::TopUp, Option<String>), ApiError> {
    use tally_outbound::payments::{Kind as TopUpKind, State as TopUpState, TopUp};
    use tally_outbound::stripe::ManualError;
    let code = asset("asset", &body.asset)?;
    let payment_method = body
        .payment_method
        .as_deref()
        .map(|p| name("payment_method", p))
        .transpose()?;
    // What the engine knows decides what may be charged: checked before Stripe is called.
    let view = match ask(state, Query::Wallet { wallet }).await? {
        QueryReply::Wallet(w) => w,
        other => return Err(unexpected(other)),
    };
    let a = match ask(state, Query::Asset { asset: code }).await? {
        QueryReply::Asset(a) => a,
        other => return Err(unexpected(other)),
    };
    if view.frozen {
        return Err(ApiError::rejected(tally_engine::ResultCode::WalletFrozen));
    }
    let price = a
        .topup_price
        .ok_or_else(|| ApiError::rejected(tally_engine::ResultCode::NoTopUpPrice))?;
    if body.amount <= rust_decimal::Decimal::ZERO {
        return Err(ApiError::invalid("amount must be positive"));
    }
    // Never charge what the wallet could not be credited: the asset's bound less its ledger.
    let ledger = view
        .balances
        .iter()
        .find(|b| b.asset == code)
        .map_or(rust_decimal::Decimal::ZERO, |b| b.ledger);
    if body.amount > tally_engine::amount_limit(a.scale) - ledger {
        return Err(ApiError::rejected(tally_engine::ResultCode::AmountOverflow));
    }
    if body.amount.normalize().scale() > a.scale {
        return Err(ApiError::invalid(format!(
            "amount has more than the asset's {} decimal places",
            a.scale
        )));
    }
    let minor_amount = price
        .minor_amount(body.amount)
        .filter(|m| *m > 0)
        .ok_or_else(|| ApiError::rejected(tally_engine::ResultCode::InexactCharge))?;
    let customer = view.customer.ok_or_else(|| {
        ApiError::invalid(
            "the wallet has no Stripe customer: set it with PUT /v1/wallets/{wallet}/billing",
        )
    })?;
    let kind = if body.session {
        TopUpKind::Session
    } else {
        TopUpKind::Manual
    };
    let method = match (kind, payment_method.or(view.payment_method)) {
        // Only a method the caller names: otherwise the customer picks one in the browser.
        (TopUpKind::Session, _) => payment_method
            .map(|m| m.as_str().to_string())
            .unwrap_or_default(),
        (_, Some(m)) => m.as_str().to_string(),
        (_, None) => {
            return Err(ApiError::invalid(
                "the wallet has no default payment method: give payment_method, or set one \
                 with PUT /v1/wallets/{wallet}/billing",
            ))
        }
    };
    let now = now_us();
    let amount = body.amount.normalize();
    let row = TopUp {
        kind,
        key: format!(
            "tally-{}:{}:{}",
            kind.as_str(),
            wallet,
            &request_id_hex(idem_id)[..24]
        ),
        wallet: wallet.as_str().into(),
        asset: code.as_str().into(),
        trigger: 0,
        amount,
        currency: price.currency.as_str().into(),
        minor_amount,
        customer: customer.as_str().into(),
        payment_method: method,
        state: TopUpState::Pending,
        payment_intent: None,
        reason: None,
        attempts: 0,
        // A browser payment is settled by Stripe's webhook; the reconciler looks later.
        next_attempt_us: if body.session {
            now + state.stripe()?.reconcile_after_us()
        } else {
            now
        },
        requested_us: now,
    };
    let hash = format!(
        "{}|{}|{}|{}|{}",
        kind.as_str(),
        code,
        amount,
        row.payment_method,
        idem_key
    );
    state
        .stripe()?
        .manual_topup(row, &hash)
        .await
        .map_err(|e| match e {
            ManualError::Conflict => {
                ApiError::rejected(tally_engine::ResultCode::IdempotencyConflict)
            }
            ManualError::NotConfigured => ApiError::transport(ErrorCode::NotFound, e.to_string()),
            ManualError::Stripe(_) | ManualError::Store(_) => {
                tracing::warn!("top-up not started: {e}");
                ApiError::transport(ErrorCode::NotReady, e.to_string())
            }
        })
}

/// One top-up by id (auto or a caller's), with its status at Stripe as tally knows it.
#[utoipa::path(get, path = "/v1/topups/{topup}", tag = "top-ups",
    params(("topup" = String, Path)),
    responses((status = 200, body = TopUpResource), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn get_topup(
    State(state): AppState,
    caller: Caller,
    Path(topup): Path<String>,
) -> Result<Json<TopUpResource>, ApiError> {
    caller.admin()?;
    let row = state
        .payments()?
        .get(&topup)
        .map_err(store_error)?
        .ok_or_else(|| ApiError::transport(ErrorCode::NotFound, "no such top-up"))?;
    Ok(Json(TopUpResource::of(&row, None)))
}

fn store_error(e: tally_outbound::Error) -> ApiError {
    tracing::error!("{e}");
    ApiError::transport(
        ErrorCode::NotReady,
        "the payments store failed; retry shortly",
    )
}

/// Register an endpoint for webhooks out: notices (`topup.*`, `dispute.*`, `wallet.*`,
/// `grant.expiring`) are posted to it signed in the Standard Webhooks format with the secret
/// returned here (only here), delivered at least once, retried for 3 days. The id derives
/// from the Idempotency-Key, so a retry answers with the same endpoint.
#[utoipa::path(post, path = "/v1/webhook_endpoints", tag = "webhooks", request_body = CreateWebhookEndpoint,
    params(("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = WebhookEndpoint), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create_webhook_endpoint(
    State(state): AppState,
    caller: Caller,
    idem: Idem,
    Body(body): Body<CreateWebhookEndpoint>,
) -> Result<Json<WebhookEndpoint>, ApiError> {
    use tally_outbound::webhooks::EndpointError;
    caller.admin()?;
    let id = format!("we_{}", &request_id_hex(idem.id)[..24]);
    let store = state.payments()?;
    let added = store.add_endpoint(
        &id,
        &body.url,
        &body.events,
        &body.description,
        body.secret.as_deref(),
        now_us(),
    );
    match added {
        Ok((endpoint, secret)) => Ok(Json(WebhookEndpoint::of(&endpoint, Some(secret)))),
        Err(EndpointError::Exists(found)) => {
            let (endpoint, secret) = *found;
            if endpoint.url == body.url {
                Ok(Json(WebhookEndpoint::of(&endpoint, Some(secret))))
            } else {
                Err(ApiError::rejected(
                    tally_engine::ResultCode::IdempotencyConflict,
                ))
            }
        }
        Err(EndpointError::Store(e)) => Err(store_error(e)),
        Err(e) => Err(ApiError::invalid(e.to_string())),
    }
}

/// The endpoints for webhooks out (without their secrets).
#[utoipa::path(get, path = "/v1/webhook_endpoints", tag = "webhooks",
    responses((status = 200, body = WebhookEndpointList), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn list_webhook_endpoints(
    State(state): AppState,
    caller: Caller,
) -> Result<Json<WebhookEndpointList>, ApiError> {
    caller.admin()?;
    let endpoints = state.payments()?.endpoints().map_err(store_error)?;
    Ok(Json(WebhookEndpointList {
        data: endpoints
            .iter()
            .map(|e| WebhookEndpoint::of(e, None))
            .collect(),
    }))
}

/// Remove an endpoint; what it was not delivered yet is dropped.
#[utoipa::path(delete, path = "/v1/webhook_endpoints/{endpoint}", tag = "webhooks",
    params(("endpoint" = String, Path)),
    responses((status = 200, body = WebhookEndpointList), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn delete_webhook_endpoint(
    State(state): AppState,
    caller: Caller,
    Path(endpoint): Path<String>,
) -> Result<Json<WebhookEndpointList>, ApiError> {
    caller.admin()?;
    let store = state.payments()?;
    if !store.remove_endpoint(&endpoint).map_err(store_error)? {
        return Err(ApiError::transport(ErrorCode::NotFound, "no such endpoint"));
    }
    let endpoints = store.endpoints().map_err(store_error)?;
    Ok(Json(WebhookEndpointList {
        data: endpoints
            .iter()
            .map(|e| WebhookEndpoint::of(e, None))
            .collect(),
    }))
}

/// An endpoint's delivery log: every attempt, newest first, with the status answered and
/// where the delivery stands. `limit` 1 to 100 (default 50); `before` from `next_before`.
#[utoipa::path(get, path = "/v1/webhook_endpoints/{endpoint}/attempts", tag = "webhooks",
    params(("endpoint" = String, Path), ("limit" = Option<u32>, Query), ("before" = Option<String>, Query)),
    responses((status = 200, body = WebhookAttemptPage), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn webhook_attempts(
    State(state): AppState,
    caller: Caller,
    Path(endpoint): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<WebhookAttemptPage>, ApiError> {
    caller.admin()?;
    let (mut limit, mut before) = (50usize, None);
    for (k, v) in query_pairs(raw.as_deref()) {
        match k {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=PAGE_LIMIT_MAX as usize).contains(l))
                    .ok_or_else(|| ApiError::invalid("limit must be 1 to 100"))?
            }
            "before" => {
                before = Some(
                    v.parse::<i64>()
                        .map_err(|_| ApiError::invalid("before must come from next_before"))?,
                )
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter `{}`",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    let store = state.payments()?;
    if store.endpoint(&endpoint).map_err(store_error)?.is_none() {
        return Err(ApiError::transport(ErrorCode::NotFound, "no such endpoint"));
    }
    let rows = store
        .attempts(&endpoint, before, limit + 1)
        .map_err(store_error)?;
    let more = rows.len() > limit;
    let rows = &rows[..rows.len().min(limit)];
    Ok(Json(WebhookAttemptPage {
        next_before: more
            .then(|| rows.last().map(|a| a.at_us.to_string()))
            .flatten(),
        data: rows
            .iter()
            .map(|a| WebhookAttempt {
                event_id: a.event_id.clone(),
                event_type: a.event_type.clone(),
                attempt: a.attempt,
                at: Timestamp(a.at_us).to_rfc3339(),
                status: a.status,
                error: a.error.clone(),
                duration_ms: a.duration_ms,
                delivery: a.delivery.clone(),
            })
            .collect(),
    }))
}

/// Open the billing portal for one wallet's customer: a one-time link (valid `expires_in`
/// seconds, default 3600) that starts a session scoped to that wallet. The same
/// Idempotency-Key answers with the same link. At most 30 links per wallet per minute.
#[utoipa::path(post, path = "/v1/portal/sessions", tag = "portal", request_body = crate::portal::CreatePortalSession,
    params(("Idempotency-Key" = String, Header, description = "Makes retries safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 200, body = crate::portal::PortalSessionLink), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create_portal_session(
    State(state): AppState,
    caller: Caller,
    idem: Idem,
    Body(body): Body<crate::portal::CreatePortalSession>,
) -> Result<Json<crate::portal::PortalSessionLink>, ApiError> {
    caller.admin()?;
    Ok(Json(
        crate::portal::create_link(&state, &body, idem.id).await?,
    ))
}

/// Every plan, with its published versions and draft; rules in the shape the draft route takes.
#[utoipa::path(get, path = "/v1/plans", tag = "plans",
    responses((status = 200, body = PlanList), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn list_plans(
    State(state): AppState,
    caller: Caller,
) -> Result<Json<PlanList>, ApiError> {
    match query(&state, &caller, Query::Plans).await? {
        QueryReply::Plans(plans) => Ok(Json(PlanList {
            data: plans.iter().map(PlanResource::of).collect(),
        })),
        other => Err(unexpected(other)),
    }
}

/// The portal sessions ended by [`end_portal_sessions`].
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct PortalSessionsEnded {
    /// The wallet.
    pub wallet: String,
    /// How many live sessions were ended.
    pub ended: usize,
}

/// End every portal session of a wallet at once (a leaked link, a customer who left); links
/// already made stay usable until used or expired, so make new ones only when wanted.
#[utoipa::path(delete, path = "/v1/wallets/{wallet}/portal-sessions", tag = "portal",
    params(("wallet" = String, Path)),
    responses((status = 200, body = PortalSessionsEnded), (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn end_portal_sessions(
    State(state): AppState,
    caller: Caller,
    Path(wallet): Path<String>,
) -> Result<Json<PortalSessionsEnded>, ApiError> {
    caller.admin()?;
    let wallet = wallet_id(&wallet)?;
    let ended = crate::portal::end_wallet_sessions(&state, wallet.as_str())?;
    Ok(Json(PortalSessionsEnded {
        wallet: wallet.as_str().into(),
        ended,
    }))
}
