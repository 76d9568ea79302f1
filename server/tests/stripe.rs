//! Top-ups through Stripe, against real localstripe (`scripts/localstripe`) and a real
//! `tally serve`: a card that succeeds gives one grant of the exact amount; a declined card is
//! recorded with its decline code and backs off; `kill -9` between Stripe's answer and the
//! engine's gives exactly one PaymentIntent and one grant after the restart; webhooks are
//! signed, applied once however often they are delivered, and disputes claw back (and freeze)
//! and restore; a frozen wallet is never charged.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use common::child::{serve, Serve};
use serde_json::{json, Value};

const ADMIN: &str = "tally_admin_stripe_test_key_0123456789";
const WEBHOOK_SECRET: &str = "whsec_tally_test";

/// localstripe on a free loopback port, killed when dropped.
struct LocalStripe {
    child: Child,
    base: String,
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn localstripe() -> LocalStripe {
    // reqwest's rustls takes the process's provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = free_port();
    let mut child = Process::new(repo().join("scripts/localstripe"))
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("scripts/localstripe");
    // The first run installs localstripe into its virtualenv.
    let deadline = Instant::now() + Duration::from_secs(180);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("scripts/localstripe exited: {status}");
        }
        assert!(Instant::now() < deadline, "localstripe did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    LocalStripe {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(serve: &Serve) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: format!("http://{}", serve.http),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, idem: &str, body: Value) -> Value {
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

    async fn post(&self, path: &str, idem: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, idem, body).await
    }

    async fn put(&self, path: &str, idem: &str, body: Value) -> Value {
        self.call(reqwest::Method::PUT, path, idem, body).await
    }

    async fn wallet(&self, id: &str) -> Value {
        let response = self
            .http
            .get(format!("{}/v1/wallets/{id}", self.base))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        response.json().await.unwrap()
    }

    async fn available(&self, id: &str) -> String {
        self.wallet(id).await["balances"][0]["available"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits until `check` holds for the wallet (the worker charges asynchronously).
    async fn until(&self, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let wallet = self.wallet(id).await;
            if check(&wallet) {
                return wallet;
            }
            assert!(Instant::now() < deadline, "{what}: {wallet}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Delivers a Stripe event to the webhook endpoint, signed with `secret`.
    async fn webhook(&self, event: &Value, secret: &str) -> (u16, Value) {
        let payload = serde_json::to_vec(event).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let signature = tally_server::outbound::stripe::sign(secret, &payload, now);
        let response = self
            .http
            .post(format!("{}/v1/stripe/webhook", self.base))
            .header("Stripe-Signature", signature)
            .header("Content-Type", "application/json")
            .body(payload)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }
}

/// A customer with a card (`number`) attached, at localstripe: `(customer, payment_method)`.
async fn customer_with_card(stripe: &LocalStripe, number: &str) -> (String, String) {
    let http = reqwest::Client::new();
    let post = |path: &str, form: Vec<(&str, &str)>| {
        let request = http
            .post(format!("{}{path}", stripe.base))
            .basic_auth("sk_test_tally", Some(""))
            .form(&form);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let value: Value = response.json().await.unwrap();
            assert!(status.is_success(), "{status} {value}");
            value
        }
    };
    let customer = post("/v1/customers", vec![("email", "buyer@example.com")]).await;
    let customer = customer["id"].as_str().unwrap().to_string();
    let method = post(
        "/v1/payment_methods",
        vec![
            ("type", "card"),
            ("card[number]", number),
            ("card[exp_month]", "12"),
            ("card[exp_year]", "2030"),
            ("card[cvc]", "123"),
        ],
    )
    .await;
    let method = method["id"].as_str().unwrap().to_string();
    post(
        &format!("/v1/payment_methods/{method}/attach"),
        vec![("customer", customer.as_str())],
    )
    .await;
    (customer, method)
}

/// The PaymentIntents localstripe holds for a customer.
async fn intents(stripe: &LocalStripe, customer: &str) -> Vec<Value> {
    let response = reqwest::Client::new()
        .get(format!(
            "{}/v1/payment_intents?customer={customer}&limit=100",
            stripe.base
        ))
        .basic_auth("sk_test_tally", Some(""))
        .send()
        .await
        .unwrap();
    let value: Value = response.json().await.unwrap();
    value["data"].as_array().unwrap().clone()
}

fn env(stripe: &LocalStripe) -> Vec<(&'static str, String)> {
    vec![
        ("TALLY_STRIPE_SECRET_KEY", "sk_test_tally".into()),
        ("TALLY_STRIPE_API_BASE", format!("{}/", stripe.base)),
        ("TALLY_STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.into()),
    ]
}

fn start(data: &Path, env: &[(&'static str, String)]) -> Serve {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    serve(data, "127.0.0.1:0", ADMIN, &env)
}

/// The catalog: USD with cents, one USD costs one dollar in top-ups.
async fn catalog(api: &Api) {
    api.post(
        "/v1/assets",
        "asset-usd",
        json!({"code": "USD", "scale": 2, "usd_value": "1"}),
    )
    .await;
    api.put(
        "/v1/assets/USD/price",
        "price-usd",
        json!({"currency": "usd", "unit_amount": "1"}),
    )
    .await;
}

/// Wallet `id` with 10.00, billed to `(customer, method)`, topping up 20.00 below 5.00.
async fn wallet(api: &Api, id: &str, customer: &str, method: &str, attempts: u32) {
    api.post("/v1/wallets", &format!("{id}-create"), json!({"id": id}))
        .await;
    api.post(
        &format!("/v1/wallets/{id}/grants"),
        &format!("{id}-grant"),
        json!({"asset": "USD", "amount": "10.00"}),
    )
    .await;
    api.put(
        &format!("/v1/wallets/{id}/billing"),
        &format!("{id}-billing"),
        json!({"customer": customer, "payment_method": method}),
    )
    .await;
    api.put(
        &format!("/v1/wallets/{id}/topup-rules/USD"),
        &format!("{id}-rule"),
        json!({"threshold": "5.00", "amount": {"fixed": "20.00"}, "attempts_max": attempts, "cooldown_us": 1000000}),
    )
    .await;
}

async fn spend(api: &Api, id: &str, amount: &str, idem: &str) {
    api.post(
        &format!("/v1/wallets/{id}/adjustments"),
        idem,
        json!({"asset": "USD", "amount": format!("-{amount}"), "reason": "usage"}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_ups_through_localstripe_exactly_once() {
    let stripe = localstripe();
    let data = tempfile::tempdir().unwrap();
    let env = env(&stripe);
    let server = start(data.path(), &env);
    let api = Api::new(&server);
    catalog(&api).await;

    // A card that succeeds: one PaymentIntent of 2000 cents, one grant of exactly 20.00.
    let (good_customer, good_card) = customer_with_card(&stripe, "4242424242424242").await;
    wallet(&api, "good", &good_customer, &good_card, 3).await;
    spend(&api, "good", "6.00", "good-spend-1").await; // 4.00 < 5.00
    let after = api
        .until("good", "the top-up is credited", |w| {
            w["balances"][0]["available"] == "24"
        })
        .await;
    assert!(after["topups"][0]["in_flight"].is_null(), "{after}");
    let paid = intents(&stripe, &good_customer).await;
    assert_eq!(paid.len(), 1, "{paid:?}");
    let pi = paid[0]["id"].as_str().unwrap().to_string();
    assert_eq!(paid[0]["amount"], 2000);
    assert_eq!(paid[0]["status"], "succeeded");
    assert_eq!(paid[0]["metadata"]["tally_key"], "tally-topup:good:USD:1");
    let grant = after["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["source"]["type"] == "top_up" && g["source"]["payment_id"] == pi.as_str())
        .unwrap_or_else(|| panic!("no grant paid by {pi}: {after}"));
    assert_eq!(grant["amount"], "20");

    // Stripe's own webhook for that payment, delivered three times: applied once (it was
    // already settled by the worker), the balance unchanged.
    let succeeded = json!({
        "id": "evt_succeeded_1", "object": "event", "type": "payment_intent.succeeded",
        "created": 1_700_000_000,
        "data": {"object": {"id": pi, "object": "payment_intent", "status": "succeeded",
            "metadata": {"tally_key": "tally-topup:good:USD:1"}}}
    });
    for _ in 0..3 {
        let (status, body) = api.webhook(&succeeded, WEBHOOK_SECRET).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(api.available("good").await, "24");

    // A bad signature is a 400 and changes nothing.
    let dispute = json!({
        "id": "evt_dispute_1", "object": "event", "type": "charge.dispute.created",
        "created": 1_700_000_100,
        "data": {"object": {"id": "dp_1", "object": "dispute", "payment_intent": pi,
            "charge": "ch_1", "status": "needs_response", "amount": 2000}}
    });
    let (status, body) = api.webhook(&dispute, "whsec_wrong").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(api.available("good").await, "24");

    // The dispute: the grant's 20.00 are clawed back and the wallet frozen; replays do nothing.
    for _ in 0..3 {
        let (status, body) = api.webhook(&dispute, WEBHOOK_SECRET).await;
        assert_eq!(status, 200, "{body}");
    }
    let disputed = api.wallet("good").await;
    assert_eq!(disputed["balances"][0]["available"], "4", "{disputed}");
    assert_eq!(disputed["frozen"], true);
    // A frozen wallet with an open dispute is never charged, however low it goes.
    spend(&api, "good", "1.00", "good-spend-2").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(intents(&stripe, &good_customer).await.len(), 1);
    // Won: the 20.00 come back.
    let won = json!({
        "id": "evt_dispute_2", "object": "event", "type": "charge.dispute.closed",
        "created": 1_700_000_200,
        "data": {"object": {"id": "dp_1", "object": "dispute", "payment_intent": pi,
            "charge": "ch_1", "status": "won", "amount": 2000}}
    });
    let (status, body) = api.webhook(&won, WEBHOOK_SECRET).await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("applied")));
    assert_eq!(api.available("good").await, "23");
    // A late `created` for the same dispute is older than what is known: nothing happens.
    let (status, body) = api
        .webhook(
            &json!({"id": "evt_dispute_3", "object": "event", "type": "charge.dispute.created",
                "created": 1_700_000_150,
                "data": {"object": {"id": "dp_1", "payment_intent": pi, "status": "needs_response"}}}),
            WEBHOOK_SECRET,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(api.available("good").await, "23");

    // Money returned outside tally (a refund in Stripe's dashboard): the refunded part of the
    // grant is removed, once, whatever the number of deliveries; Stripe reports totals.
    let refunded = json!({
        "id": "evt_refund_1", "object": "event", "type": "charge.refunded",
        "created": 1_700_000_300,
        "data": {"object": {"id": "ch_1", "object": "charge", "payment_intent": pi,
            "amount": 2000, "amount_refunded": 500, "refunded": false}}
    });
    for _ in 0..2 {
        let (status, body) = api.webhook(&refunded, WEBHOOK_SECRET).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(api.available("good").await, "18");

    // A declined card: the failure is recorded with Stripe's decline code, the engine backs off
    // and retries, and after two failures the wallet is flagged.
    let (bad_customer, bad_card) = customer_with_card(&stripe, "4000000000000341").await;
    wallet(&api, "bad", &bad_customer, &bad_card, 2).await;
    spend(&api, "bad", "6.00", "bad-spend-1").await;
    let flagged = api
        .until("bad", "two declines flag the wallet", |w| {
            w["topup_flagged"].as_array().is_some_and(|a| !a.is_empty())
        })
        .await;
    assert_eq!(flagged["topups"][0]["last_failure"], "generic_decline");
    assert_eq!(flagged["topups"][0]["failures"], 2);
    assert_eq!(flagged["balances"][0]["available"], "4");
    let declined = intents(&stripe, &bad_customer).await;
    assert_eq!(
        declined.len(),
        2,
        "one PaymentIntent per attempt: {declined:?}"
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_charge_and_outcome_charges_and_grants_once() {
    let stripe = localstripe();
    let data = tempfile::tempdir().unwrap();
    let mut env = env(&stripe);
    // The first server dies (abort, like kill -9) right after Stripe's answer, before the
    // engine has it.
    env.push(("TALLY_FAILPOINT", "stripe-after-charge".into()));
    let mut server = start(data.path(), &env);
    let api = Api::new(&server);
    catalog(&api).await;
    let (customer, card) = customer_with_card(&stripe, "4242424242424242").await;
    wallet(&api, "w", &customer, &card, 3).await;
    spend(&api, "w", "6.00", "w-spend-1").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the failpoint did not fire");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(intents(&stripe, &customer).await.len(), 1, "charged once");
    drop(server);

    // The restart finds the row pending, asks Stripe again with the same key, gets the same
    // PaymentIntent, and credits it once.
    env.pop();
    server = start(data.path(), &env);
    let api = Api::new(&server);
    let after = api
        .until("w", "the charge is credited after the restart", |w| {
            w["balances"][0]["available"] == "24"
        })
        .await;
    let paid = intents(&stripe, &customer).await;
    assert_eq!(paid.len(), 1, "still one PaymentIntent: {paid:?}");
    let top_ups: Vec<&Value> = after["grants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["source"]["type"] == "top_up")
        .collect();
    assert_eq!(top_ups.len(), 1, "one grant: {after}");
    // And a second restart changes nothing.
    drop(server);
    let server = start(data.path(), &env);
    let api = Api::new(&server);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(api.available("w").await, "24");
    assert_eq!(intents(&stripe, &customer).await.len(), 1);
}

/// One request an operator endpoint received.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: i64,
    signature: String,
    body: String,
}

/// An operator's webhook endpoint on a free loopback port: records every request and answers
/// with the next status of `script` (then 200).
async fn receiver(script: Vec<u16>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Received>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        let mut script = script.into_iter();
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then Content-Length bytes of body.
            let (head, body) = loop {
                let n = socket.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break (String::new(), String::new());
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let head = text[..end].to_string();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + length {
                        break (head, text[end + 4..end + 4 + length].to_string());
                    }
                }
            };
            let header = |name: &str| {
                head.lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                    })
                    .unwrap_or_default()
            };
            log.lock().unwrap().push(Received {
                id: header("webhook-id"),
                timestamp: header("webhook-timestamp").parse().unwrap_or(0),
                signature: header("webhook-signature"),
                body,
            });
            let status = script.next().unwrap_or(200);
            let answer =
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    });
    (url, seen)
}

fn body_type(r: &Received) -> String {
    serde_json::from_str::<Value>(&r.body).unwrap()["type"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_top_ups_and_signed_webhooks_to_the_operator() {
    let stripe = localstripe();
    let data = tempfile::tempdir().unwrap();
    let mut env = env(&stripe);
    env.push(("TALLY_WEBHOOK_RETRY_BASE_MS", "200".into()));
    env.push(("TALLY_ALERT_LOW_BALANCE_USD", "3".into()));
    let server = start(data.path(), &env);
    let api = Api::new(&server);
    catalog(&api).await;

    // Two operator endpoints: one that takes only failures and answers 500 twice, one for all.
    let (flaky_url, flaky) = receiver(vec![500, 500]).await;
    let (all_url, all) = receiver(vec![]).await;
    let flaky_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let created = api
        .post(
            "/v1/webhook_endpoints",
            "endpoint-flaky",
            json!({"url": flaky_url, "events": ["topup.failed"], "secret": flaky_secret}),
        )
        .await;
    let flaky_id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["secret"], flaky_secret);
    let created = api
        .post(
            "/v1/webhook_endpoints",
            "endpoint-all",
            json!({"url": all_url}),
        )
        .await;
    let all_secret = created["secret"].as_str().unwrap().to_string();
    assert!(all_secret.starts_with("whsec_"), "{created}");
    // The same Idempotency-Key answers with the same endpoint; a bad filter is refused.
    let again = api
        .post(
            "/v1/webhook_endpoints",
            "endpoint-all",
            json!({"url": all_url}),
        )
        .await;
    assert_eq!(again["id"], created["id"]);
    let refused = api
        .http
        .post(format!("{}/v1/webhook_endpoints", api.base))
        .bearer_auth(ADMIN)
        .header("Idempotency-Key", "endpoint-bad")
        .json(&json!({"url": all_url, "events": ["wallet.exploded"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let listed = api
        .http
        .get(format!("{}/v1/webhook_endpoints", api.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 2, "{listed}");
    assert!(
        listed["data"][0].get("secret").is_none(),
        "secrets are shown once"
    );

    // A declined auto top-up: `topup.failed` reaches the flaky endpoint on the third attempt,
    // the same notice id each time, each attempt validly signed.
    let (bad_customer, bad_card) = customer_with_card(&stripe, "4000000000000341").await;
    wallet(&api, "bad", &bad_customer, &bad_card, 1).await;
    spend(&api, "bad", "6.00", "bad-spend-1").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while flaky.lock().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "{:?}", flaky.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let got = flaky.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "delivered once it answered 200: {got:?}");
    for r in &got {
        assert_eq!(r.id, got[0].id);
        assert_eq!(body_type(r), "topup.failed");
        let expected =
            tally_server::outbound::webhooks::signature(flaky_secret, &r.id, r.timestamp, &r.body);
        assert_eq!(Some(r.signature.clone()), expected, "{r:?}");
    }
    let failed: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(failed["data"]["wallet"], "bad");
    assert_eq!(failed["data"]["reason"], "generic_decline");
    assert_eq!(failed["data"]["amount_minor"], 2000);
    // The delivery log, newest first.
    let log = api
        .http
        .get(format!(
            "{}/v1/webhook_endpoints/{flaky_id}/attempts",
            api.base
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let statuses: Vec<&Value> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["status"])
        .collect();
    assert_eq!(statuses, [&json!(200), &json!(500), &json!(500)], "{log}");
    assert_eq!(log["data"][0]["delivery"], "delivered");

    // A manual top-up on the saved card: charged at once, the grant is in the answer's wake.
    let (customer, card) = customer_with_card(&stripe, "4242424242424242").await;
    api.post("/v1/wallets", "m-create", json!({"id": "m"}))
        .await;
    api.put(
        "/v1/wallets/m/billing",
        "m-billing",
        json!({"customer": customer, "payment_method": card}),
    )
    .await;
    let topup = api
        .post(
            "/v1/wallets/m/topups",
            "m-topup-1",
            json!({"asset": "USD", "amount": "15.00"}),
        )
        .await;
    assert_eq!(topup["status"], "succeeded", "{topup}");
    assert_eq!(topup["amount_minor"], 1500);
    assert_eq!(api.available("m").await, "15");
    // The same key again: the same top-up, no second charge; another body under it: 409.
    let repeat = api
        .post(
            "/v1/wallets/m/topups",
            "m-topup-1",
            json!({"asset": "USD", "amount": "15.00"}),
        )
        .await;
    assert_eq!(repeat["id"], topup["id"]);
    assert_eq!(api.available("m").await, "15");
    assert_eq!(intents(&stripe, &customer).await.len(), 1);
    let refuse = |idem: &'static str, body: Value| {
        let request = api
            .http
            .post(format!("{}/v1/wallets/m/topups", api.base))
            .bearer_auth(ADMIN)
            .header("Idempotency-Key", idem)
            .json(&body);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(
        refuse("m-topup-1", json!({"asset": "USD", "amount": "16.00"})).await,
        409
    );
    assert_eq!(
        refuse("m-topup-2", json!({"asset": "USD", "amount": "1.005"})).await,
        422
    );
    assert_eq!(
        refuse("m-topup-3", json!({"asset": "USD", "amount": "0"})).await,
        422
    );
    assert_eq!(
        refuse("m-topup-4", json!({"asset": "EUR", "amount": "1"})).await,
        404
    );
    // More than the balance could be credited (its ledger is already 15): refused before
    // anything is charged.
    assert_eq!(
        refuse(
            "m-topup-5",
            json!({"asset": "USD", "amount": "1000000000000000000"})
        )
        .await,
        422
    );
    assert_eq!(
        intents(&stripe, &customer).await.len(),
        1,
        "refusals charge nothing"
    );

    // A browser payment: a client secret now, the grant when Stripe says the money is in.
    let session = api
        .post(
            "/v1/wallets/m/topups",
            "m-session-1",
            json!({"asset": "USD", "amount": "5", "session": true, "payment_method": card}),
        )
        .await;
    assert_eq!(session["status"], "pending", "{session}");
    let secret = session["client_secret"].as_str().unwrap();
    let pi = session["payment_intent"].as_str().unwrap().to_string();
    assert!(secret.starts_with(&pi), "{session}");
    assert_eq!(api.available("m").await, "15", "nothing before the payment");
    // The customer confirms in the browser (Stripe.js); Stripe sends its webhook.
    let confirmed = reqwest::Client::new()
        .post(format!("{}/v1/payment_intents/{pi}/confirm", stripe.base))
        .basic_auth("sk_test_tally", Some(""))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(confirmed["status"], "succeeded", "{confirmed}");
    let event = json!({
        "id": "evt_session_1", "object": "event", "type": "payment_intent.succeeded",
        "created": 1_700_000_400,
        "data": {"object": {"id": pi, "object": "payment_intent", "status": "succeeded",
            "metadata": confirmed["metadata"].clone()}}
    });
    for _ in 0..2 {
        let (status, body) = api.webhook(&event, WEBHOOK_SECRET).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(api.available("m").await, "20");
    let id = session["id"].as_str().unwrap();
    let read = api
        .http
        .get(format!("{}/v1/topups/{id}", api.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(read["status"], "succeeded", "{read}");

    // The CLI: `tally topup` over the HTTP API; a retry with its key charges nothing twice.
    for _ in 0..2 {
        let out = Process::new(env!("CARGO_BIN_EXE_tally"))
            .args(["topup", "m", "--asset", "USD", "--amount", "2.50", "--json"])
            .args([
                "--http",
                &api.base,
                "--api-key",
                ADMIN,
                "--idempotency-key",
                "cli-1",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(printed["status"], "succeeded", "{printed}");
    }
    assert_eq!(api.available("m").await, "22.5");
    assert_eq!(intents(&stripe, &customer).await.len(), 3);

    // Balance notices: 22.50 → 2.50 crosses the 3 USD line (low), then freezing is told too.
    spend(&api, "m", "20.00", "m-spend-1").await;
    api.post("/v1/wallets/m/freeze", "m-freeze", Value::Null)
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let wanted = [
        "topup.failed",
        "topup.succeeded",
        "wallet.balance.low",
        "wallet.frozen",
    ];
    loop {
        let types: Vec<String> = all.lock().unwrap().iter().map(body_type).collect();
        if wanted.iter().all(|w| types.iter().any(|t| t == w)) {
            let succeeded = types.iter().filter(|t| *t == "topup.succeeded").count();
            assert_eq!(succeeded, 3, "one per top-up: {types:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{types:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for r in all.lock().unwrap().iter() {
        let expected =
            tally_server::outbound::webhooks::signature(&all_secret, &r.id, r.timestamp, &r.body);
        assert_eq!(Some(r.signature.clone()), expected);
    }
    // A frozen wallet is refused a manual top-up, and the CLI says why.
    assert_eq!(
        refuse("m-topup-5", json!({"asset": "USD", "amount": "1"})).await,
        409
    );
    let out = Process::new(env!("CARGO_BIN_EXE_tally"))
        .args(["topup", "m", "--asset", "USD", "--amount", "1"])
        .args(["--http", &api.base, "--api-key", ADMIN])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("409 WalletFrozen"), "{said}");

    // Deliveries survive a restart: an endpoint failing four times gets the notice after the
    // server was killed and started again, under the same id.
    let (late_url, late) = receiver(vec![500, 500, 500, 500]).await;
    api.post(
        "/v1/webhook_endpoints",
        "endpoint-late",
        json!({"url": late_url, "events": ["wallet.frozen"], "secret": flaky_secret}),
    )
    .await;
    api.post("/v1/wallets/bad/freeze", "bad-freeze", Value::Null)
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while late.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no first attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(server);
    let server = start(data.path(), &env);
    let deadline = Instant::now() + Duration::from_secs(60);
    while late.lock().unwrap().len() < 5 {
        assert!(Instant::now() < deadline, "{:?}", late.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = late.lock().unwrap().clone();
    assert!(got.iter().all(|r| r.id == got[0].id), "{got:?}");
    assert!(got.iter().all(|r| body_type(r) == "wallet.frozen"));
    let frozen: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(frozen["data"]["wallet"], "bad");
    drop(server);
}
