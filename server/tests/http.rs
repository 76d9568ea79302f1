//! The HTTP/JSON API end to end: a real server (shards, WAL on disk) in this process, its HTTP
//! front on a free loopback port, and a real HTTP client (reqwest) over TCP, plain and TLS.
//!
//! Every route with exact balances; scopes and keys; idempotent repeats and conflicts (across
//! HTTP and the in-process handle too); malformed, mistyped, unknown, oversized and unauthenticated
//! requests, each a 4xx with the one error shape and nothing changed; the committed OpenAPI
//! document matches the served one (`TALLY_BLESS=1` rewrites it).

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tally_api::{ApiServer, ApiState};
use tally_engine::{Command, Request, RequestId};
use tally_server::store::SnapshotStore;
use tally_server::{Handle, Server};

const ADMIN: &str = "http-test-admin-key-0123456789";

struct Http {
    server: Option<Server>,
    api: Option<ApiServer>,
    state: Arc<ApiState>,
    base: String,
    client: reqwest::Client,
    handle: Handle,
    _dir: tempfile::TempDir,
}

struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    #[track_caller]
    fn ok(&self) -> &Value {
        assert_eq!(self.status, 200, "{}", self.body);
        &self.body
    }

    #[track_caller]
    fn error(&self, status: u16, name: &str) -> &Value {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.body["name"], name, "{}", self.body);
        assert!(self.body["code"].is_u64(), "{}", self.body);
        assert!(
            !self.body["message"].as_str().unwrap().is_empty(),
            "{}",
            self.body
        );
        &self.body
    }
}

impl Http {
    async fn start(tls: bool) -> Http {
        // reqwest's rustls needs a process-wide provider; tally uses ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let mut config = common::config(dir.path(), 2);
        config.listen = "127.0.0.1:0".into();
        config.http_listen = "127.0.0.1:0".into();
        config.http_tls = tls;
        let keys = tally_server::net::open_keys(&config, Some(ADMIN)).unwrap();
        let crypto = tally_server::net::tls_crypto(&config).unwrap();
        let (state, api) = tally_server::http::start_http(&config, keys, Some(crypto))
            .await
            .unwrap();
        let server =
            Server::start(&config, Box::new(SnapshotStore::open(&config).unwrap())).unwrap();
        tally_server::http::ready(&state, server.handle(), &config).unwrap();
        let scheme = if tls { "https" } else { "http" };
        let client = if tls {
            client_for(&dir.path().join("tls/cert.pem"))
        } else {
            reqwest::Client::new()
        };
        Http {
            handle: server.handle(),
            server: Some(server),
            base: format!("{scheme}://{}", api.local_addr()),
            api: Some(api),
            state,
            client,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        self.api.take().unwrap().shutdown().await;
        let server = self.server.take().unwrap();
        tokio::task::spawn_blocking(move || server.shutdown().unwrap())
            .await
            .unwrap();
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        idempotency: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(k) = idempotency {
            request = request.header("Idempotency-Key", k);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer { status, body }
    }

    async fn post(&self, path: &str, idem: &str, body: Value) -> Answer {
        self.send(
            reqwest::Method::POST,
            path,
            Some(ADMIN),
            Some(idem),
            Some(body),
        )
        .await
    }

    async fn put(&self, path: &str, idem: &str, body: Value) -> Answer {
        self.send(
            reqwest::Method::PUT,
            path,
            Some(ADMIN),
            Some(idem),
            Some(body),
        )
        .await
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(reqwest::Method::GET, path, Some(ADMIN), None, None)
            .await
    }

    async fn raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> Answer {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(ADMIN)
            .header("Idempotency-Key", "raw-body")
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.json().await.unwrap();
        Answer { status, body }
    }

    /// USD at scale 6, product `chat` (tokens), plan `std` v1 at 0.001 USD per token, and the
    /// wallets on it.
    async fn catalog(&self, wallets: &[&str]) {
        self.post(
            "/v1/assets",
            "asset-usd",
            json!({"code": "USD", "scale": 6, "usd_value": "1"}),
        )
        .await
        .ok();
        self.post(
            "/v1/products",
            "product-chat",
            json!({"code": "chat", "dimensions": ["tokens"]}),
        )
        .await
        .ok();
        self.put(
            "/v1/plans/std/draft",
            "draft-std",
            json!({"asset": "USD", "rules": [{"product": "chat", "components": [
                {"dimension": "tokens", "price": {"type": "per_unit", "unit_price": "0.001"}}],
                "rounding": "up"}]}),
        )
        .await
        .ok();
        let published = self
            .post("/v1/plans/std/publish", "publish-std", json!(null))
            .await;
        assert_eq!(published.ok()["version"], 1);
        for w in wallets {
            self.post(
                "/v1/wallets",
                &format!("create-{w}"),
                json!({"id": w, "metadata": {"team": if w.ends_with('1') { "red" } else { "blue" }}}),
            )
            .await
            .ok();
            self.put(
                &format!("/v1/wallets/{w}/plan"),
                &format!("assign-{w}"),
                json!({"plan": "std", "version": 1}),
            )
            .await
            .ok();
        }
    }

    async fn available(&self, wallet: &str) -> String {
        self.get(&format!("/v1/wallets/{wallet}/balances/USD"))
            .await
            .ok()["available"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

fn client_for(cert: &Path) -> reqwest::Client {
    let pinned = tally_net::tls::load_certs(cert).unwrap().remove(0);
    let mut crypto = tally_net::tls::client_crypto(pinned).unwrap();
    crypto.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .use_preconfigured_tls(crypto)
        .build()
        .unwrap()
}

fn now() -> String {
    use tally_server::Clock;
    tally_server::SystemClock.now().to_rfc3339()
}

fn usage(wallet: &str, tokens: &str) -> Value {
    json!({"wallet": wallet, "product": "chat", "quantities": {"tokens": tokens},
           "attributes": {"model": "m1"}, "cost_usd": "0.0001", "occurred_at": now()})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_end_to_end_with_exact_balances() {
    let http = Http::start(false).await;
    http.catalog(&["w1", "w2"]).await;
    let grant = http
        .post(
            "/v1/wallets/w1/grants",
            "grant-1",
            json!({"asset": "USD", "amount": "10", "priority": 1,
                   "expires_at": "2099-01-01T00:00:00Z", "source": {"type": "promotion"}}),
        )
        .await;
    assert_eq!(grant.ok()["grant_id"], 1);
    // 1,500 tokens at 0.001 = 1.500.
    let charged = http.post("/v1/usage", "use-1", usage("w1", "1500")).await;
    let charged = charged.ok();
    assert_eq!(charged["charged"], "1.5");
    assert_eq!(charged["available"], "8.5");
    assert_eq!(http.available("w1").await, "8.5");

    // Price preview changes nothing.
    let price = http
        .send(
            reqwest::Method::POST,
            "/v1/price-preview",
            Some(ADMIN),
            None,
            Some(usage("w1", "10")),
        )
        .await;
    assert_eq!(price.ok()["amount"], "0.01");
    assert_eq!(price.body["plan"], "std");
    assert_eq!(http.available("w1").await, "8.5");

    // Hold, settle (actual 200 tokens = 0.200), and release a second hold.
    let deadline = tally_engine::Timestamp(
        tally_server::Clock::now(&tally_server::SystemClock).0 + 60 * 1_000_000,
    )
    .to_rfc3339();
    let hold = http
        .post(
            "/v1/wallets/w1/holds",
            "hold-1",
            json!({"asset": "USD", "amount": "1.000", "deadline": deadline}),
        )
        .await;
    let hold_id = hold.ok()["hold_id"].as_u64().unwrap();
    assert_eq!(hold.body["available"], "7.5");
    let settled = http
        .post(
            &format!("/v1/wallets/w1/holds/{hold_id}/settle"),
            "settle-1",
            json!({"product": "chat", "quantities": {"tokens": "200"}, "occurred_at": now()}),
        )
        .await;
    assert_eq!(settled.ok()["charged"], "0.2");
    assert_eq!(http.available("w1").await, "8.3");
    let estimate = http
        .post(
            "/v1/wallets/w1/holds",
            "hold-2",
            json!({"estimate": {"product": "chat", "quantities": {"tokens": "300"}}, "deadline": deadline}),
        )
        .await;
    let hold_2 = estimate.ok()["hold_id"].as_u64().unwrap();
    assert_eq!(estimate.body["held"], "0.3");
    http.post(
        &format!("/v1/wallets/w1/holds/{hold_2}/release"),
        "release-2",
        json!(null),
    )
    .await
    .ok();
    assert_eq!(http.available("w1").await, "8.3");

    // Refund part of the first event by its Idempotency-Key, then an adjustment.
    let refund = http
        .post(
            "/v1/wallets/w1/refunds",
            "refund-1",
            json!({"event": "use-1", "amount": "0.500"}),
        )
        .await;
    assert_eq!(refund.ok()["refunded"], "0.5");
    assert_eq!(refund.body["refundable"], "1");
    http.post(
        "/v1/wallets/w1/adjustments",
        "adjust-1",
        json!({"asset": "USD", "amount": "-0.800", "reason": "test correction"}),
    )
    .await
    .ok();
    assert_eq!(http.available("w1").await, "8");

    // Overdraft, freeze and unfreeze.
    http.put(
        "/v1/wallets/w2/overdraft",
        "overdraft-w2",
        json!({"asset": "USD", "limit": "1"}),
    )
    .await
    .ok();
    let over = http.post("/v1/usage", "use-w2", usage("w2", "900")).await;
    assert_eq!(over.ok()["available"], "-0.9");
    let short = http.post("/v1/usage", "use-w2-b", usage("w2", "200")).await;
    let short = short.error(402, "InsufficientFunds");
    assert_eq!(short["spendable"], "0.1");
    assert_eq!(short["required"], "0.2");
    http.post("/v1/wallets/w1/freeze", "freeze-w1", json!(null))
        .await
        .ok();
    http.post("/v1/usage", "use-frozen", usage("w1", "1"))
        .await
        .error(409, "WalletFrozen");
    http.post("/v1/wallets/w1/unfreeze", "unfreeze-w1", json!(null))
        .await
        .ok();

    // A top-up grant, disputed and won.
    let topup = http
        .post(
            "/v1/wallets/w2/grants",
            "grant-topup",
            json!({"asset": "USD", "amount": "5", "source": {"type": "top_up", "payment_id": "pi_1"}}),
        )
        .await;
    let topup_id = topup.ok()["grant_id"].as_u64().unwrap();
    assert_eq!(topup.body["debt_paid"], "0.9");
    let dispute = http
        .post(
            "/v1/wallets/w2/disputes",
            "dispute-1",
            json!({"grant": topup_id, "freeze": false}),
        )
        .await;
    assert_eq!(dispute.ok()["clawed_back"], "4.1");
    http.post(
        &format!("/v1/wallets/w2/disputes/{topup_id}/won"),
        "won-1",
        json!(null),
    )
    .await
    .ok();
    assert_eq!(http.available("w2").await, "4.1");

    // Top-up rules: an asset needs a price first, and a fixed amount must be whole cents.
    let unpriced = http
        .put(
            "/v1/wallets/w1/topup-rules/USD",
            "rule-0",
            json!({"threshold": "1", "amount": {"fixed": "20"}}),
        )
        .await;
    unpriced.error(422, "NoTopUpPrice");
    http.put(
        "/v1/assets/USD/price",
        "price-usd",
        json!({"currency": "usd", "unit_amount": "1"}),
    )
    .await
    .ok();
    let inexact = http
        .put(
            "/v1/wallets/w1/topup-rules/USD",
            "rule-00",
            json!({"threshold": "1", "amount": {"fixed": "20.001"}}),
        )
        .await;
    inexact.error(422, "InexactCharge");
    http.put(
        "/v1/wallets/w1/billing",
        "billing-1",
        json!({"customer": "cus_1", "payment_method": "pm_1"}),
    )
    .await
    .ok();
    http.put(
        "/v1/wallets/w1/topup-rules/USD",
        "rule-1",
        json!({"threshold": "1", "amount": {"fixed": "20"}}),
    )
    .await
    .ok();
    let wallet = http.get("/v1/wallets/w1").await;
    let wallet = wallet.ok();
    assert_eq!(wallet["topup_rules"][0]["amount"]["fixed"], "20");
    assert_eq!(wallet["topup_rules"][0]["payment_method"], "default");
    assert_eq!(wallet["customer"], "cus_1");
    assert_eq!(wallet["payment_method"], "pm_1");
    assert_eq!(wallet["metadata"]["team"], "red");
    assert_eq!(wallet["plans"][0]["plan"], "std");
    assert_eq!(wallet["grants"][0]["expires_at"], "2099-01-01T00:00:00Z");
    let removed = http
        .send(
            reqwest::Method::DELETE,
            "/v1/wallets/w1/topup-rules/USD",
            Some(ADMIN),
            Some("rule-1-off"),
            None,
        )
        .await;
    removed.ok();

    // Batch: two events, one per wallet, and one refused; each answered.
    let batch = http
        .post(
            "/v1/usage/batch",
            "batch-1",
            json!({"events": [usage("w1", "100"), usage("w2", "100"),
                              {"wallet": "nobody", "product": "chat", "quantities": {"tokens": "1"}, "occurred_at": now()}]}),
        )
        .await;
    let items = batch.ok()["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["result"]["charged"], "0.1");
    assert_eq!(items[1]["status"], 200);
    assert_eq!(items[2]["status"], 404);
    assert_eq!(items[2]["error"]["name"], "UnknownWallet");
    assert_eq!(http.available("w1").await, "7.9");

    // Margin: w1 1.5 + 0.2 + 0.1 - 0.5 refunded; w2 0.9 + 0.1.
    let margin = http.get("/v1/wallets/w1/margin").await;
    assert_eq!(margin.ok()["revenue_usd"], "1.3");
    assert_eq!(margin.body["events"], 3);
    let total = http.get("/v1/margin").await;
    assert_eq!(total.ok()["revenue_usd"], "2.3");
    let by_product = http.get("/v1/margin?product=chat").await;
    assert_eq!(by_product.ok()["events"], 5);
    let by_plan = http.get("/v1/margin?plan=std&version=1").await;
    assert_eq!(by_plan.ok()["events"], 5);
    http.get("/v1/margin?product=chat&plan=std")
        .await
        .error(422, "InvalidBody");

    // Draft test of a cheaper draft.
    http.put(
        "/v1/plans/std/draft",
        "draft-std-2",
        json!({"asset": "USD", "rules": [{"product": "chat", "components": [
            {"dimension": "tokens", "price": {"type": "per_unit", "unit_price": "0.0005"}}],
            "rounding": "up"}]}),
    )
    .await
    .ok();
    let report = http
        .send(
            reqwest::Method::POST,
            "/v1/plans/std/draft/test",
            Some(ADMIN),
            None,
            Some(json!({"events": [usage("w1", "1000")]})),
        )
        .await;
    assert_eq!(report.ok()["total"]["revenue_current_usd"], "1");
    assert_eq!(report.body["total"]["revenue_draft_usd"], "0.5");

    // Listing: pages, cursors and filters.
    for i in 0..5 {
        http.post(
            "/v1/wallets",
            &format!("extra-{i}"),
            json!({"id": format!("x{i}")}),
        )
        .await
        .ok();
    }
    let mut seen = Vec::new();
    let mut path = "/v1/wallets?limit=2".to_string();
    for _ in 0..20 {
        let page = http.get(&path).await;
        let page = page.ok();
        assert!(page["data"].as_array().unwrap().len() <= 2);
        seen.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["id"].as_str().unwrap().to_string()),
        );
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        path = format!(
            "/v1/wallets?limit=2&cursor={}",
            page["next_cursor"].as_str().unwrap()
        );
    }
    seen.sort();
    assert_eq!(seen, ["w1", "w2", "x0", "x1", "x2", "x3", "x4"]);
    let red = http.get("/v1/wallets?metadata%5Bteam%5D=red").await;
    let ids: Vec<_> = red.ok()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].clone())
        .collect();
    assert_eq!(ids, [json!("w1")]);
    let debt = http.get("/v1/wallets?in_debt=true").await;
    assert!(debt.ok()["data"].as_array().unwrap().is_empty());
    http.get("/v1/wallets?cursor=bogus")
        .await
        .error(422, "InvalidBody");
    http.get("/v1/wallets?limit=0")
        .await
        .error(422, "InvalidBody");
    http.get("/v1/wallets?color=red")
        .await
        .error(422, "InvalidBody");

    // Keys, health, snapshot.
    let created = http
        .post(
            "/v1/keys",
            "key-1",
            json!({"label": "gw", "scope": "gateway"}),
        )
        .await;
    let key_id = created.ok()["id"].as_u64().unwrap();
    let keys = http.get("/v1/keys").await;
    assert!(keys.ok()["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["id"] == key_id && k["scope"] == "gateway"));
    let revoked = http
        .send(
            reqwest::Method::DELETE,
            &format!("/v1/keys/{key_id}"),
            Some(ADMIN),
            Some("revoke-1"),
            None,
        )
        .await;
    assert_eq!(revoked.ok()["revoked"], true);
    let health = http.get("/v1/health").await;
    assert_eq!(health.ok()["status"], "ok");
    assert_eq!(health.body["shards"], 2);
    let sinks: Vec<_> = health.body["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sinks, ["payments", "sqlite", "jsonl"]);
    assert!(health.body["sinks"][0]["lag_effects"].is_u64());
    let snapshot = http.post("/v1/snapshots", "snap-1", json!(null)).await;
    assert_eq!(snapshot.ok()["checkpoints"].as_array().unwrap().len(), 2);

    // Operator endpoints.
    http.send(
        reqwest::Method::GET,
        "/v1/health",
        Some("wrong-key"),
        None,
        None,
    )
    .await
    .error(401, "InvalidKey");
    let ready = http
        .client
        .get(format!("{}/readyz", http.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = http
        .client
        .get(format!("{}/metrics", http.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"tally_http_requests_total{route="POST /v1/usage",code="0"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tally_requests_total{transport="http",operation="Usage",code="40"}"#),
        "{metrics}"
    );
    for name in [
        "tally_shard_queue_depth",
        "tally_shard_batch_size",
        "tally_wal_sync_duration_seconds",
        "tally_wal_durable_lsn",
        "tally_holds_open",
        "tally_checkpoint_duration_seconds",
        "tally_auth_failures_total",
        "tally_connections_open",
    ] {
        assert!(metrics.contains(name), "{name} is missing from /metrics");
    }
    http.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_scopes_are_checked_on_every_route() {
    let http = Http::start(false).await;
    http.catalog(&["w1"]).await;
    http.post(
        "/v1/wallets/w1/grants",
        "grant",
        json!({"asset": "USD", "amount": "5"}),
    )
    .await
    .ok();
    let gateway = http
        .post("/v1/keys", "gw", json!({"label": "gw", "scope": "gateway"}))
        .await;
    let gateway = gateway.ok()["key"].as_str().unwrap().to_string();
    let as_gateway = |method: reqwest::Method, path: &'static str, body: Option<Value>| {
        let gateway = gateway.clone();
        let http = &http;
        async move {
            http.send(method, path, Some(&gateway), Some("gw-call"), body)
                .await
        }
    };
    use reqwest::Method;
    // A gateway key may report usage, read wallets and balances, preview prices, see health.
    as_gateway(Method::POST, "/v1/usage", Some(usage("w1", "100")))
        .await
        .ok();
    as_gateway(Method::GET, "/v1/wallets/w1", None).await.ok();
    as_gateway(Method::GET, "/v1/wallets/w1/balances/USD", None)
        .await
        .ok();
    as_gateway(Method::GET, "/v1/health", None).await.ok();
    // Everything else is refused with 403, and changes nothing.
    for (method, path, body) in [
        (
            Method::POST,
            "/v1/assets",
            json!({"code": "EUR", "scale": 2, "usd_value": "1.1"}),
        ),
        (
            Method::POST,
            "/v1/products",
            json!({"code": "img", "dimensions": ["n"]}),
        ),
        (Method::POST, "/v1/plans/std/publish", json!(null)),
        (Method::POST, "/v1/wallets", json!({"id": "w9"})),
        (
            Method::POST,
            "/v1/wallets/w1/grants",
            json!({"asset": "USD", "amount": "1"}),
        ),
        (Method::POST, "/v1/wallets/w1/freeze", json!(null)),
        (
            Method::POST,
            "/v1/wallets/w1/adjustments",
            json!({"asset": "USD", "amount": "1", "reason": "x"}),
        ),
        (
            Method::POST,
            "/v1/wallets/w1/refunds",
            json!({"event": "x"}),
        ),
        (
            Method::POST,
            "/v1/keys",
            json!({"label": "x", "scope": "admin"}),
        ),
        (Method::GET, "/v1/keys", json!(null)),
        (Method::GET, "/v1/wallets", json!(null)),
        (Method::GET, "/v1/margin", json!(null)),
        (Method::POST, "/v1/snapshots", json!(null)),
    ] {
        let body = (method != Method::GET).then_some(body);
        let answer = as_gateway(method.clone(), path, body).await;
        assert_eq!(answer.status, 403, "{method} {path}: {}", answer.body);
        answer.error(403, "OutOfScope");
    }
    assert_eq!(http.available("w1").await, "4.9");
    // No key, a malformed header, an unknown key: 401.
    http.send(Method::GET, "/v1/health", None, None, None)
        .await
        .error(401, "Unauthenticated");
    let basic = http
        .client
        .get(format!("{}/v1/health", http.base))
        .header("Authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);
    http.send(Method::GET, "/v1/health", Some("not-a-key"), None, None)
        .await
        .error(401, "InvalidKey");
    // A revoked key stops working at once.
    let keys = http.get("/v1/keys").await;
    let id = keys.ok()["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["scope"] == "gateway")
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    http.send(
        Method::DELETE,
        &format!("/v1/keys/{id}"),
        Some(ADMIN),
        Some("revoke"),
        None,
    )
    .await
    .ok();
    as_gateway(Method::GET, "/v1/health", None)
        .await
        .error(401, "InvalidKey");
    // The last admin key cannot be revoked.
    http.send(
        Method::DELETE,
        "/v1/keys/1",
        Some(ADMIN),
        Some("revoke-admin"),
        None,
    )
    .await
    .error(409, "LastAdminKey");
    http.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_repeats_conflicts_and_mixed_transports() {
    let http = Http::start(false).await;
    http.catalog(&["w1"]).await;
    http.post(
        "/v1/wallets/w1/grants",
        "grant",
        json!({"asset": "USD", "amount": "10"}),
    )
    .await
    .ok();
    let event = usage("w1", "1000");
    let first = http.post("/v1/usage", "order-1", event.clone()).await;
    let again = http.post("/v1/usage", "order-1", event.clone()).await;
    assert_eq!(first.status, again.status);
    assert_eq!(first.body, again.body);
    assert_eq!(http.available("w1").await, "9");
    // Same key, different body: 409, nothing charged.
    let other = http.post("/v1/usage", "order-1", usage("w1", "5")).await;
    other.error(409, "IdempotencyConflict");
    assert_eq!(
        other.body["request_id"], first.body["request_id"],
        "the conflict names the request id"
    );
    assert_eq!(http.available("w1").await, "9");
    // A rejection is remembered too: the repeat gets the same 402.
    let big = usage("w1", "100000");
    let refused = http.post("/v1/usage", "order-2", big.clone()).await;
    refused.error(402, "InsufficientFunds");
    let refused_again = http.post("/v1/usage", "order-2", big).await;
    assert_eq!(refused.body, refused_again.body);
    // A missing or bad key: 400 and nothing applied.
    http.send(
        reqwest::Method::POST,
        "/v1/usage",
        Some(ADMIN),
        None,
        Some(usage("w1", "1")),
    )
    .await
    .error(400, "IdempotencyKeyRequired");
    http.post("/v1/usage", "has space", usage("w1", "1"))
        .await
        .error(400, "IdempotencyKeyRequired");
    assert_eq!(http.available("w1").await, "9");

    // A UUID key is the request id: the same request sent in process (as a QUIC client would,
    // with the same 128-bit id) is the same request, charged once.
    let uuid = "5b0c2f9e-1d3a-4c8b-9f6e-2a7d1c0b3e4f";
    let at = now();
    let body = json!({"wallet": "w1", "product": "chat", "quantities": {"tokens": "500"},
                      "attributes": {}, "cost_usd": "0", "occurred_at": at});
    let over_http = http.post("/v1/usage", uuid, body).await;
    assert_eq!(
        over_http.ok()["request_id"],
        "5b0c2f9e1d3a4c8b9f6e2a7d1c0b3e4f"
    );
    let command = Command::Usage(tally_engine::UsageEvent {
        wallet: tally_engine::name("w1"),
        product: tally_engine::name("chat"),
        quantities: vec![tally_engine::Quantity {
            dimension: tally_engine::name("tokens"),
            value: common::d("500"),
        }],
        attributes: vec![],
        cost_usd: common::d("0"),
        occurred_at: tally_engine::Timestamp::parse_rfc3339(&at).unwrap(),
        mode: tally_engine::DebitMode::Strict,
    });
    let handle = http.handle.clone();
    let reply = tokio::task::spawn_blocking(move || {
        handle.call(Request {
            id: RequestId(0x5b0c2f9e1d3a4c8b9f6e2a7d1c0b3e4f),
            command,
        })
    })
    .await
    .unwrap()
    .unwrap();
    assert!(reply.code.is_ok(), "{reply:?}");
    assert_eq!(http.available("w1").await, "8.5", "charged once");
    http.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_clear_4xx_and_change_nothing() {
    let http = Http::start(false).await;
    http.catalog(&["w1"]).await;
    http.post(
        "/v1/wallets/w1/grants",
        "grant",
        json!({"asset": "USD", "amount": "10"}),
    )
    .await
    .ok();
    let cases: Vec<(Value, &str)> = vec![
        (json!({"wallet": "w1"}), "missing field"),
        (
            json!({"wallet": "w1", "product": "chat", "quantities": {"tokens": 5}, "occurred_at": now()}),
            "decimals are JSON strings",
        ),
        (
            json!({"wallet": "w1", "product": "chat", "quantities": {"tokens": "1e3"}, "occurred_at": now()}),
            "not a decimal string",
        ),
        (
            json!({"wallet": "w1", "product": "chat", "quantities": {"tokens": "5"}, "occurred_at": "yesterday"}),
            "RFC 3339",
        ),
        (
            json!({"wallet": "w1", "product": "chat", "quantities": {"tokens": "5"}, "occurred_at": now(), "colour": "red"}),
            "unknown field",
        ),
        (
            json!({"wallet": "w1", "product": "chat", "quantities": {"tokens": "5"}, "occurred_at": now(), "mode": "maybe"}),
            "unknown variant",
        ),
        (
            json!({"wallet": "x".repeat(65), "product": "chat", "quantities": {"tokens": "5"}, "occurred_at": now()}),
            "wallet",
        ),
        (json!([1, 2]), "invalid type"),
    ];
    for (i, (body, says)) in cases.into_iter().enumerate() {
        let answer = http.post("/v1/usage", &format!("bad-{i}"), body).await;
        let error = answer.error(422, "InvalidBody");
        assert!(
            error["message"].as_str().unwrap().contains(says),
            "case {i}: {error}"
        );
    }
    http.raw("/v1/usage", "application/json", b"{\"wallet\": ".to_vec())
        .await
        .error(422, "InvalidBody");
    http.raw("/v1/usage", "text/plain", b"{}".to_vec())
        .await
        .error(415, "UnsupportedMediaType");
    let huge = vec![b' '; tally_api::BODY_BYTES_MAX + 1];
    http.raw("/v1/usage", "application/json", huge)
        .await
        .error(413, "BodyTooLarge");
    // Engine rejections: unknown things are 404, bad amounts 422.
    http.post("/v1/usage", "unknown-wallet", usage("nobody", "1"))
        .await
        .error(404, "UnknownWallet");
    http.post(
        "/v1/wallets/w1/grants",
        "negative",
        json!({"asset": "USD", "amount": "-1"}),
    )
    .await
    .error(422, "InvalidAmount");
    http.post(
        "/v1/wallets/w1/holds",
        "both",
        json!({"asset": "USD", "amount": "1", "estimate": {"product": "chat", "quantities": {}},
               "deadline": now()}),
    )
    .await
    .error(422, "InvalidBody");
    http.get("/v1/nowhere").await.error(404, "NotFound");
    http.send(
        reqwest::Method::DELETE,
        "/v1/keys/-1",
        Some(ADMIN),
        Some("k"),
        None,
    )
    .await
    .error(422, "InvalidBody");
    http.send(
        reqwest::Method::DELETE,
        "/v1/usage",
        Some(ADMIN),
        Some("x"),
        None,
    )
    .await
    .error(405, "MethodNotAllowed");
    // Nothing changed.
    assert_eq!(http.available("w1").await, "10");
    let margin = http.get("/v1/margin").await;
    assert_eq!(margin.ok()["events"], 0);
    http.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_pinned_certificate_and_readiness_before_recovery() {
    let http = Http::start(true).await;
    assert!(http.base.starts_with("https://"));
    http.catalog(&["w1"]).await;
    assert_eq!(http.get("/v1/health").await.ok()["shards_running"], 2);
    // Plain HTTP to the TLS port does not get an answer.
    let plain = reqwest::Client::new()
        .get(format!(
            "{}/v1/health",
            http.base.replacen("https", "http", 1)
        ))
        .bearer_auth(ADMIN)
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    // An API state with no backend yet (recovery running): healthz up, readyz and /v1 503.
    let keys = http.state.clone();
    drop(keys);
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), 1);
    config.http_listen = "127.0.0.1:0".into();
    let keys = tally_server::net::open_keys(&config, Some(ADMIN)).unwrap();
    let (_state, api) = tally_server::http::start_http(&config, keys, None)
        .await
        .unwrap();
    let base = format!("http://{}", api.local_addr());
    let client = reqwest::Client::new();
    let healthz = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);
    let readyz = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 503);
    let v1 = client
        .get(format!("{base}/v1/health"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(v1.status(), 503);
    let body: Value = v1.json().await.unwrap();
    assert_eq!(body["name"], "NotReady");
    api.shutdown().await;
    // With the history store off, the history routes say so (404), and nothing else changes.
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path(), 1);
    config.http_listen = "127.0.0.1:0".into();
    config.history_store = false;
    let keys = tally_server::net::open_keys(&config, Some(ADMIN)).unwrap();
    let (_state, api) = tally_server::http::start_http(&config, keys, None)
        .await
        .unwrap();
    let usage = client
        .get(format!("http://{}/v1/wallets/w1/usage", api.local_addr()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(usage.status(), 404);
    api.shutdown().await;
    http.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_openapi_document_is_the_served_one() {
    let http = Http::start(false).await;
    let served = http
        .client
        .get(format!("{}/v1/openapi.json", http.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    if std::env::var_os("TALLY_BLESS").is_some() {
        std::fs::write(&path, &served).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == served,
        "docs/openapi.json differs from GET /v1/openapi.json: run `TALLY_BLESS=1 cargo test -p \
         tally-server --test http` and commit it"
    );
    let document: Value = serde_json::from_str(&served).unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = document["paths"].as_object().unwrap();
    for route in [
        "/v1/usage",
        "/v1/usage/batch",
        "/v1/wallets",
        "/v1/wallets/{wallet}/holds/{hold}/settle",
        "/v1/keys/{id}",
        "/v1/openapi.json",
    ] {
        assert!(paths.contains_key(route), "{route} is not documented");
    }
    http.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_and_margin_analytics_from_the_store() {
    let http = Http::start(false).await;
    http.catalog(&["w1", "w2"]).await;
    for w in ["w1", "w2"] {
        http.post(
            &format!("/v1/wallets/{w}/grants"),
            &format!("grant-{w}"),
            json!({"asset": "USD", "amount": "100"}),
        )
        .await
        .ok();
    }
    // w1: five cheap events on model m1; w2: two events that cost more than they earn, on m2.
    for i in 0..5 {
        let mut event = usage("w1", "100");
        event["attributes"] = json!({"model": "m1"});
        http.post("/v1/usage", &format!("h-w1-{i}"), event)
            .await
            .ok();
    }
    for i in 0..2 {
        let mut event = usage("w2", "100");
        event["attributes"] = json!({"model": "m2"});
        event["cost_usd"] = json!("0.5");
        http.post("/v1/usage", &format!("h-w2-{i}"), event)
            .await
            .ok();
    }
    http.post(
        "/v1/wallets/w1/refunds",
        "h-refund",
        json!({"event": "h-w1-0", "amount": "0.04"}),
    )
    .await
    .ok();
    // The store trails the shards by the flush interval: wait for the last effect.
    // The page is read only after the refund is seen: a page read before could be empty.
    let mut refunded = false;
    for _ in 0..100 {
        let all = http.get("/v1/wallets/w1/usage?limit=1000").await;
        refunded = all.ok()["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["refunded"] == "0.04");
        if refunded {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(refunded, "the refund never reached the history store");
    let rows = http.get("/v1/wallets/w1/usage?limit=2").await.ok().clone();
    // Pages of 2, newest first, with cursors: every event once.
    assert_eq!(rows["data"].as_array().unwrap().len(), 2);
    assert_eq!(rows["has_more"], true);
    assert_eq!(rows["data"][0]["charged"], "0.1");
    assert_eq!(rows["data"][0]["quantities"]["tokens"], "100");
    assert_eq!(rows["data"][0]["attributes"]["model"], "m1");
    let mut ids = Vec::new();
    let mut path = "/v1/wallets/w1/usage?limit=2".to_string();
    loop {
        let page = http.get(&path).await;
        let page = page.ok();
        ids.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["request_id"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/wallets/w1/usage?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(ids.len(), 5);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5);
    let refunded = http.get("/v1/wallets/w1/usage?limit=1000").await;
    let refunded: Vec<_> = refunded.ok()["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["refunded"] != "0")
        .cloned()
        .collect();
    assert_eq!(refunded.len(), 1);
    assert_eq!(refunded[0]["refunded"], "0.04");
    let m2 = http.get("/v1/wallets/w2/usage?model=m2").await;
    assert_eq!(m2.ok()["data"].as_array().unwrap().len(), 2);
    let none = http.get("/v1/wallets/w2/usage?model=m1").await;
    assert!(none.ok()["data"].as_array().unwrap().is_empty());
    let future = http
        .get("/v1/wallets/w1/usage?from=2099-01-01T00:00:00Z")
        .await;
    assert!(future.ok()["data"].as_array().unwrap().is_empty());

    // The journal gives the wallet's balance: 100 granted, 0.5 spent, 0.04 refunded.
    let journal = http.get("/v1/wallets/w1/transactions?limit=1000").await;
    let mut balance = common::d("0");
    for row in journal.ok()["data"].as_array().unwrap() {
        let amount = common::d(row["amount"].as_str().unwrap());
        if row["from"] == "wallet" {
            balance -= amount;
        }
        if row["to"] == "wallet" {
            balance += amount;
        }
    }
    assert_eq!(balance, common::d("99.54"));
    assert_eq!(http.available("w1").await, "99.54");
    let topups = http.get("/v1/wallets/w1/topups").await;
    assert!(topups.ok()["data"].as_array().unwrap().is_empty());

    // Who costs more than they pay: w2 first (0.2 revenue, 1.0 cost).
    let by_wallet = http.get("/v1/analytics/margin?group_by=wallet").await;
    let groups = by_wallet.ok()["data"].as_array().unwrap().clone();
    assert_eq!(groups[0]["key"], "w2");
    assert_eq!(groups[0]["margin_usd"], "-0.8");
    assert_eq!(groups[1]["key"], "w1");
    assert_eq!(groups[1]["revenue_usd"], "0.46");
    assert_eq!(groups[1]["refunded_usd"], "0.04");
    assert_eq!(groups[1]["events"], 5);
    let by_model = http
        .get("/v1/analytics/margin?group_by=model&order=revenue&limit=1")
        .await;
    let by_model = by_model.ok()["data"].as_array().unwrap().clone();
    assert_eq!(by_model.len(), 1);
    assert_eq!(by_model[0]["key"], "m1");
    let by_day = http
        .get("/v1/analytics/margin?group_by=day&order=key")
        .await;
    assert_eq!(by_day.ok()["data"][0]["events"], 7);
    // Bad parameters.
    http.get("/v1/analytics/margin")
        .await
        .error(422, "InvalidBody");
    http.get("/v1/analytics/margin?group_by=colour")
        .await
        .error(422, "InvalidBody");
    http.get("/v1/wallets/w1/usage?cursor=nope")
        .await
        .error(422, "InvalidBody");
    http.get("/v1/wallets/w1/transactions?model=m1")
        .await
        .error(422, "InvalidBody");
    http.stop().await;
}
