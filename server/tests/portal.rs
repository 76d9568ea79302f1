//! The billing portal's sessions and scope, over real HTTP against a real `tally serve`: a link
//! works once; a tampered, reused or unknown token is refused; a session reads only its own
//! wallet; state changes need the CSRF token; an idle session expires; nothing admin-only is in
//! a portal answer. (The pages themselves are driven in a real browser by `browser/tests`.)

mod common;

use std::time::Duration;

use common::child::serve;
use serde_json::{json, Value};

const ADMIN: &str = "tally_admin_portal_test_key_0123456789";

struct Site {
    http: reqwest::Client,
    base: String,
}

impl Site {
    async fn admin(&self, method: reqwest::Method, path: &str, idem: &str, body: Value) -> Value {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN)
            .header("Idempotency-Key", idem);
        if !body.is_null() {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let value: Value = response.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {value}");
        value
    }

    async fn link(&self, wallet: &str, idem: &str) -> String {
        let link = self
            .admin(
                reqwest::Method::POST,
                "/v1/portal/sessions",
                idem,
                json!({"wallet": wallet, "return_url": "https://app.example.com/account"}),
            )
            .await;
        link["url"].as_str().unwrap().to_string()
    }

    /// Opens a link: the status, and the session cookie it set.
    async fn open(&self, url: &str) -> (u16, Option<String>) {
        let response = self.http.get(url).send().await.unwrap();
        let cookie = response
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string());
        (response.status().as_u16(), cookie)
    }

    async fn get(&self, path: &str, cookie: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .header("Cookie", cookie)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }
}

fn now() -> String {
    use tally_server::Clock;
    tally_server::SystemClock.now().to_rfc3339()
}

fn session_cookie(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

fn meta<'a>(html: &'a str, name: &str) -> &'a str {
    let tag = format!("name=\"{name}\" content=\"");
    let start = html
        .find(&tag)
        .unwrap_or_else(|| panic!("no {name} in {html}"))
        + tag.len();
    &html[start..start + html[start..].find('"').unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_sessions_are_one_time_scoped_and_expire() {
    // reqwest's rustls takes the process's provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let data = tempfile::tempdir().unwrap();
    let server = serve(
        data.path(),
        "127.0.0.1:0",
        ADMIN,
        &[("TALLY_PORTAL_IDLE_SECS", "2")],
    );
    let site = Site {
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        base: format!("http://{}", server.http),
    };
    let post = reqwest::Method::POST;
    site.admin(
        post.clone(),
        "/v1/assets",
        "asset",
        json!({"code": "USD", "scale": 2, "usd_value": "1"}),
    )
    .await;
    for (w, amount) in [("w1", "12.50"), ("w2", "7")] {
        site.admin(
            post.clone(),
            "/v1/wallets",
            &format!("{w}-create"),
            json!({"id": w, "metadata": {"tier": "internal-secret"}}),
        )
        .await;
        site.admin(
            post.clone(),
            &format!("/v1/wallets/{w}/grants"),
            &format!("{w}-grant"),
            json!({"asset": "USD", "amount": amount}),
        )
        .await;
    }

    // A link works once: it sets an HttpOnly session cookie and leads to the portal.
    let url = site.link("w1", "link-1").await;
    assert_eq!(
        site.link("w1", "link-1").await,
        url,
        "a retry gets the same link"
    );
    let conflict = site
        .http
        .post(format!("{}/v1/portal/sessions", site.base))
        .bearer_auth(ADMIN)
        .header("Idempotency-Key", "link-1")
        .json(&json!({"wallet": "w1", "return_url": "https://elsewhere.example.com/"}))
        .send()
        .await
        .unwrap();
    assert_eq!(conflict.status(), 409, "the same key with another body");
    let (status, cookie) = site.open(&url).await;
    assert_eq!(status, 303);
    let set = cookie.unwrap();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );
    let w1 = session_cookie(&set);
    assert_eq!(site.open(&url).await.0, 403, "a used link is refused");
    let mut tampered = url.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(
        site.open(&tampered).await.0,
        403,
        "a tampered link is refused"
    );
    assert_eq!(
        site.open(&format!("{}/portal/session", site.base)).await.0,
        403
    );

    // The page and the API see w1, exactly, and nothing admin-only.
    let (status, page) = site.get("/portal", &w1).await;
    assert_eq!(status, 200);
    assert_eq!(meta(&page, "tally-wallet"), "w1");
    let csrf = meta(&page, "csrf-token").to_string();
    let (status, body) = site.get("/portal/api/wallet", &w1).await;
    assert_eq!(status, 200, "{body}");
    let wallet: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(wallet["wallet"], "w1");
    assert_eq!(wallet["balances"][0]["available"], "12.5");
    assert!(
        !body.contains("internal-secret"),
        "metadata stays admin-only"
    );
    assert!(!body.contains("margin") && !body.contains("cost"), "{body}");

    // A second customer's session sees only w2, with no way to name w1.
    let (_, cookie) = site.open(&site.link("w2", "link-2").await).await;
    let w2 = session_cookie(&cookie.unwrap());
    let (_, body) = site.get("/portal/api/wallet", &w2).await;
    let wallet: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(wallet["wallet"], "w2");
    assert_eq!(wallet["balances"][0]["available"], "7");
    let (status, _) = site.get("/portal/api/wallet?wallet=w1", &w2).await;
    assert_eq!(status, 200, "query parameters name nothing");

    // State changes need the CSRF token.
    let rule = json!({"asset": "USD", "threshold": "5", "amount": "20"});
    let put = |token: Option<&str>| {
        let mut request = site
            .http
            .put(format!("{}/portal/api/auto-topup", site.base))
            .header("Cookie", &w1)
            .json(&rule);
        if let Some(token) = token {
            request = request.header("X-CSRF-Token", token);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(put(None).await, 403);
    assert_eq!(put(Some("forged")).await, 403);
    assert_eq!(
        put(Some(&csrf)).await,
        422,
        "no card saved: auto top-up cannot charge"
    );
    // A frozen wallet's settings stay as they are.
    site.admin(
        post.clone(),
        "/v1/wallets/w1/freeze",
        "w1-freeze",
        Value::Null,
    )
    .await;
    assert_eq!(put(Some(&csrf)).await, 409);
    site.admin(
        post.clone(),
        "/v1/wallets/w1/unfreeze",
        "w1-unfreeze",
        Value::Null,
    )
    .await;

    // The seller can end a wallet's sessions at once.
    let (_, cookie) = site.open(&site.link("w1", "link-3").await).await;
    let w1_again = session_cookie(&cookie.unwrap());
    assert_eq!(site.get("/portal/api/wallet", &w1_again).await.0, 200);
    let ended = site
        .admin(
            reqwest::Method::DELETE,
            "/v1/wallets/w1/portal-sessions",
            "end-w1",
            Value::Null,
        )
        .await;
    assert!(ended["ended"].as_u64().unwrap() >= 1, "{ended}");
    assert_eq!(site.get("/portal/api/wallet", &w1_again).await.0, 401);

    // Unauthenticated and expired sessions get nothing.
    assert_eq!(
        site.get("/portal/api/wallet", "tally_portal=nope").await.0,
        401
    );
    assert_eq!(site.get("/portal", "").await.0, 401);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(site.get("/portal/api/wallet", &w1).await.0, 401, "idle");
    let (status, page) = site.get("/portal", &w2).await;
    assert_eq!(status, 401);
    assert!(page.contains("session-error"));

    // Links for unknown wallets are refused; the link rate is bounded.
    let response = site
        .http
        .post(format!("{}/v1/portal/sessions", site.base))
        .bearer_auth(ADMIN)
        .header("Idempotency-Key", "link-unknown")
        .json(&json!({"wallet": "nobody"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let mut limited = false;
    for i in 0..40 {
        let response = site
            .http
            .post(format!("{}/v1/portal/sessions", site.base))
            .bearer_auth(ADMIN)
            .header("Idempotency-Key", format!("burst-{i}"))
            .json(&json!({"wallet": "w2"}))
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "links are rate-limited per wallet");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_signs_in_with_an_admin_key_and_tests_drafts_on_recorded_usage() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let data = tempfile::tempdir().unwrap();
    let server = serve(data.path(), "127.0.0.1:0", ADMIN, &[]);
    let site = Site {
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        base: format!("http://{}", server.http),
    };
    let (post, put) = (reqwest::Method::POST, reqwest::Method::PUT);
    site.admin(
        post.clone(),
        "/v1/assets",
        "asset",
        json!({"code": "USD", "scale": 6, "usd_value": "1"}),
    )
    .await;
    site.admin(
        post.clone(),
        "/v1/products",
        "product",
        json!({"code": "chat", "dimensions": ["tokens"]}),
    )
    .await;
    let rules = json!([{"product": "chat", "components": [
        {"dimension": "tokens", "price": {"type": "per_unit", "unit_price": "0.001"}}],
        "rounding": "up"}]);
    site.admin(
        put.clone(),
        "/v1/plans/std/draft",
        "draft-1",
        json!({"asset": "USD", "rules": rules}),
    )
    .await;
    site.admin(
        post.clone(),
        "/v1/plans/std/publish",
        "publish-1",
        Value::Null,
    )
    .await;
    site.admin(post.clone(), "/v1/wallets", "w-create", json!({"id": "w"}))
        .await;
    site.admin(
        put.clone(),
        "/v1/wallets/w/plan",
        "w-plan",
        json!({"plan": "std", "version": 1}),
    )
    .await;
    for i in 0..3 {
        site.admin(
            post.clone(),
            "/v1/usage",
            &format!("use-{i}"),
            json!({"wallet": "w", "product": "chat", "quantities": {"tokens": "1000"},
                   "cost_usd": "0.25", "mode": "record", "occurred_at": now()}),
        )
        .await;
    }
    let gateway = site
        .admin(
            post.clone(),
            "/v1/keys",
            "key-gw",
            json!({"label": "gw", "scope": "gateway"}),
        )
        .await;

    // Signing in: an unknown key 401, a gateway key 403, the admin key a session cookie.
    let sign_in = |key: String| {
        let request = site
            .http
            .post(format!("{}/console/session", site.base))
            .json(&json!({ "api_key": key }));
        async move { request.send().await.unwrap() }
    };
    assert_eq!(sign_in("nope".into()).await.status(), 401);
    assert_eq!(
        sign_in(gateway["key"].as_str().unwrap().into())
            .await
            .status(),
        403
    );
    let signed = sign_in(ADMIN.into()).await;
    assert_eq!(signed.status(), 200);
    let set = signed.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    let csrf = signed.json::<Value>().await.unwrap()["csrf"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, page) = site.get("/console", &cookie).await;
    assert_eq!(status, 200);
    assert_eq!(meta(&page, "signed-in"), "true");
    assert_eq!(meta(&page, "csrf-token"), csrf);
    assert_eq!(
        meta(&site.get("/console", "").await.1, "signed-in"),
        "false"
    );

    // The cookie stands for the key: reads work; changes need the CSRF token too.
    let (status, body) = site.get("/v1/wallets", &cookie).await;
    assert_eq!(status, 200, "{body}");
    let freeze = |token: Option<&str>| {
        let mut request = site
            .http
            .post(format!("{}/v1/wallets/w/freeze", site.base))
            .header("Cookie", &cookie)
            .header("Idempotency-Key", "freeze-1");
        if let Some(token) = token {
            request = request.header("X-CSRF-Token", token);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(freeze(None).await, 403);
    assert_eq!(freeze(Some("forged")).await, 403);
    assert_eq!(freeze(Some(&csrf)).await, 200);
    // Keys are not the console's: a session cannot mint a lasting admin key.
    let minted = site
        .http
        .post(format!("{}/v1/keys", site.base))
        .header("Cookie", &cookie)
        .header("X-CSRF-Token", &csrf)
        .header("Idempotency-Key", "mint")
        .json(&json!({"label": "stolen", "scope": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(minted.status(), 401);

    // Plans with their rules in the draft's own shape, and a draft tested on recorded usage.
    let (_, body) = site.get("/v1/plans", &cookie).await;
    let plans: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(plans["data"][0]["plan"], "std");
    assert_eq!(plans["data"][0]["versions"][0]["rules"], rules);
    let mut doubled = rules.clone();
    doubled[0]["components"][0]["price"]["unit_price"] = json!("0.002");
    site.admin(
        put.clone(),
        "/v1/plans/std/draft",
        "draft-2",
        json!({"asset": "USD", "rules": doubled}),
    )
    .await;
    // The history store trails the shards by about a second.
    let mut report = Value::Null;
    for _ in 0..100 {
        report = site
            .admin(
                post.clone(),
                "/v1/plans/std/draft/test",
                "unused",
                json!({"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"}),
            )
            .await;
        if report["total"]["events"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(report["total"]["events"], 3, "{report}");
    assert_eq!(report["total"]["revenue_current_usd"], "3");
    assert_eq!(report["total"]["revenue_draft_usd"], "6");
    let bad = site
        .http
        .post(format!("{}/v1/plans/std/draft/test", site.base))
        .bearer_auth(ADMIN)
        .json(&json!({"from": "2100-01-01T00:00:00Z", "to": "2000-01-01T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);

    // Signing out ends the session: the cookie stands for nothing after.
    let out = site
        .http
        .delete(format!("{}/console/session", site.base))
        .header("Cookie", &cookie)
        .header("X-CSRF-Token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 200);
    assert_eq!(site.get("/v1/wallets", &cookie).await.0, 401);
    drop(server);
}
