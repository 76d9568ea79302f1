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
