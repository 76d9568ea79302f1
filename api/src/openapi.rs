//! The OpenAPI 3.1 document, generated from the handlers and types (utoipa). It is served at
//! `GET /v1/openapi.json` and committed as `docs/openapi.json`; a test fails when they differ.

use std::sync::OnceLock;

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::ErrorBody;
use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tally",
        description = "A wallet-native prepaid billing engine for AI products. Amounts are exact decimal strings, times RFC 3339 UTC. Every call needs `Authorization: Bearer <key>`; every call that changes state needs an `Idempotency-Key` header. Errors are `{code, name, message, ...details}`; see docs/http-api.md.",
        license(name = "Apache-2.0")
    ),
    paths(
        routes::define_asset, routes::define_product, routes::draft_plan, routes::publish_plan,
        routes::test_draft, routes::create_wallet, routes::list_wallets, routes::get_wallet,
        routes::freeze, routes::unfreeze, routes::set_overdraft, routes::assign_plan,
        routes::create_grant, routes::get_balance, routes::wallet_margin, routes::margin,
        routes::create_hold, routes::settle_hold, routes::release_hold, routes::create_refund,
        routes::create_dispute, routes::dispute_won, routes::create_adjustment,
        routes::set_topup_rule, routes::remove_topup_rule, routes::price_asset,
        routes::unprice_asset, routes::set_billing, routes::stripe_webhook, routes::report_usage,
        routes::report_usage_batch, routes::price_preview, routes::create_key, routes::list_keys,
        routes::revoke_key, routes::health, routes::snapshot, routes::openapi_document,
        routes::wallet_usage, routes::wallet_transactions, routes::wallet_topups,
        routes::margin_analytics, routes::create_topup, routes::get_topup,
        routes::create_webhook_endpoint, routes::list_webhook_endpoints,
        routes::delete_webhook_endpoint, routes::webhook_attempts, routes::create_portal_session, routes::list_plans, routes::end_portal_sessions,
    ),
    components(schemas(ErrorBody)),
    modifiers(&Bearer),
)]
struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document as pretty JSON (built once).
pub fn document() -> String {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut text = ApiDoc::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serializes");
        text.push('\n');
        text
    })
    .clone()
}
