//! The Stripe worker: charges the top-ups the engine requested and reports each outcome back to
//! the engine, exactly once; and the receiver of Stripe's webhooks.
//!
//! **Exactly once.** A pending row in the [`Payments`] store is charged with a PaymentIntent
//! (off-session, confirmed, on the wallet's customer and payment method) whose idempotency key
//! is the row's key, derived by the engine from the wallet, asset and trigger. The outcome goes
//! to the engine as `TopUpSucceeded` (payment id = the PaymentIntent) or `TopUpFailed` (with
//! the decline code) under a request id derived from the same key, and only then is the row
//! marked settled. A crash at any point leaves the row pending; the retry sends the same key,
//! Stripe answers with the PaymentIntent it already made, and the engine answers the repeated
//! request id with its first reply (and would refuse a second grant for the same payment id
//! anyway). So there is never a second charge and never a second grant.
//!
//! **Failures.** Timeouts, connection errors, 429 and 5xx are retried with the same key, backing
//! off from one second to five minutes. A 402 (a decline, or `authentication_required` for an
//! off-session payment that needs the customer) is the outcome: the engine records it and
//! applies its own backoff and attempt limit. A PaymentIntent still `processing` is looked up
//! again until it settles (or its webhook arrives). After `reconcile_after`, a row whose
//! PaymentIntent was never seen is looked up by its `tally_key` metadata; Stripe keeps
//! idempotency keys for 24 hours, so past 23 hours a row that search cannot find is failed as
//! `lost` rather than charged again.
//!
//! **Webhooks in** ([`Stripe::webhook`]): signed with the endpoint secret (`Stripe-Signature`,
//! HMAC-SHA256, five minutes of tolerance). Each event is handled once by its id, and every
//! engine command it causes carries a request id derived from the event id, so a replayed,
//! late or reordered delivery changes nothing twice.
//!
//! Without a secret key nothing is charged: rows wait (counted in `tally_topups_waiting`) and
//! are charged once the server runs with a key. A row never sent to Stripe is charged however
//! old it is (nothing can have been charged for it); only a row that was sent and got no answer
//! for 23 hours can end as `lost`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::Value;
use stripe::{IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_core::customer::CreateCustomer;
use stripe_core::payment_intent::{
    CancelPaymentIntent, CreatePaymentIntent, CreatePaymentIntentOffSession, RetrievePaymentIntent,
    SearchPaymentIntent,
};
use stripe_core::setup_intent::{CreateSetupIntent, RetrieveSetupIntent};
use stripe_shared::{PaymentIntent, PaymentIntentStatus};
use tally_engine::{AssetCode, Command, Name, PaymentEvent, Reply, Request, ResultCode};

use crate::payments::{Inserted, Kind, Payments, State, TopUp};
use crate::webhooks::Notice;
use crate::{derived_id, now_us, Error};

/// Stripe's settings. The secrets never reach a log line (`Debug` redacts them).
#[derive(Clone)]
pub struct StripeConfig {
    /// The secret API key (`sk_...`); `None`: requests wait.
    pub secret_key: Option<String>,
    /// The API base URL (ends with `/`); `None`: Stripe's.
    pub api_base: Option<String>,
    /// The webhook endpoint's signing secret (`whsec_...`); `None`: webhooks are refused.
    pub webhook_secret: Option<String>,
    /// Freeze a wallet when a chargeback of its top-up opens.
    pub dispute_freeze: bool,
    /// Look a top-up up by its metadata after this long without an outcome.
    pub reconcile_after: Duration,
}

impl std::fmt::Debug for StripeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeConfig")
            .field(
                "secret_key",
                &self.secret_key.as_ref().map(|_| "<redacted>"),
            )
            .field("api_base", &self.api_base)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("dispute_freeze", &self.dispute_freeze)
            .field("reconcile_after", &self.reconcile_after)
            .finish()
    }
}

/// A future the engine answers.
pub type Answer = Pin<Box<dyn Future<Output = Result<Reply, String>> + Send>>;

/// How the worker reaches the engine: one command, answered once it is durable. The server
/// implements it over its shards (the same path as the network front ends).
pub trait Submit: Send + Sync + 'static {
    /// Applies `request`; `Err` when the engine cannot answer now (stopping, a failed shard).
    fn submit(&self, request: Request) -> Answer;
}

/// Why a webhook was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum WebhookError {
    /// No webhook secret is configured.
    NotConfigured,
    /// The signature is missing, malformed, stale or wrong.
    BadSignature(&'static str),
    /// The payload is not a Stripe event.
    BadPayload(&'static str),
    /// The engine could not take the outcome now; Stripe retries.
    Unavailable(String),
}

impl std::fmt::Display for WebhookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WebhookError::NotConfigured => write!(f, "no Stripe webhook secret is configured"),
            WebhookError::BadSignature(why) => write!(f, "Stripe-Signature: {why}"),
            WebhookError::BadPayload(why) => write!(f, "payload: {why}"),
            WebhookError::Unavailable(why) => write!(f, "cannot apply the event now: {why}"),
        }
    }
}

/// Signatures older or newer than this are refused (Stripe's default tolerance).
pub const WEBHOOK_TOLERANCE_SECS: i64 = 300;
/// Stripe keeps an idempotency key this long; past it a retry could charge again.
const KEY_LIFETIME_US: i64 = 23 * 3600 * 1_000_000;
/// Longest wait between two attempts of one row.
const BACKOFF_MAX_US: i64 = 300 * 1_000_000;

/// The worker and webhook receiver (see the module docs).
pub struct Stripe {
    store: Payments,
    client: Option<stripe::Client>,
    config: StripeConfig,
    engine: Arc<dyn Submit>,
    wake: Arc<tokio::sync::Notify>,
    wake_notices: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Stripe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stripe")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}

/// Waits before the next attempt after `attempts` attempts: one second, doubling, at most
/// [`BACKOFF_MAX_US`].
fn backoff_us(attempts: u32) -> i64 {
    (1_000_000i64 << attempts.min(20)).min(BACKOFF_MAX_US)
}

/// What a charge attempt came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The money is in.
    Succeeded(String),
    /// Refused, with the PaymentIntent if one exists and the reason.
    Failed(Option<String>, String),
    /// Not settled yet (processing, or Stripe unreachable): try again later.
    Later(Option<String>, String),
}

/// What a PaymentIntent carries to find its top-up again (reconciliation searches by
/// `tally_key`).
fn metadata(row: &TopUp) -> HashMap<String, String> {
    [
        ("tally_key", row.key.clone()),
        ("tally_wallet", row.wallet.clone()),
        ("tally_asset", row.asset.clone()),
        ("tally_trigger", row.trigger.to_string()),
        ("tally_amount", row.amount.to_string()),
        ("tally_kind", row.kind.as_str().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Why a caller's top-up was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ManualError {
    /// The idempotency key was used with another request.
    Conflict,
    /// A browser payment needs a Stripe key.
    NotConfigured,
    /// Stripe refused or could not be reached.
    Stripe(String),
    /// The payments store failed.
    Store(Error),
}

impl std::fmt::Display for ManualError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManualError::Conflict => {
                write!(f, "this Idempotency-Key was used with a different top-up")
            }
            ManualError::NotConfigured => write!(
                f,
                "no Stripe secret key is configured: a browser payment cannot be started"
            ),
            ManualError::Stripe(e) => write!(f, "Stripe: {e}"),
            ManualError::Store(e) => write!(f, "{e}"),
        }
    }
}

/// Stripe's error in a few words (never the request, which may hold ids the log must not).
fn stripe_error_text(e: &StripeError) -> String {
    match e {
        StripeError::Stripe(err, status) => format!(
            "{status} {}",
            err.message.clone().unwrap_or_else(|| "error".into())
        ),
        other => other.to_string(),
    }
}

fn classify(pi: &PaymentIntent) -> Outcome {
    let id = pi.id.as_str().to_string();
    let reason = || {
        pi.last_payment_error
            .as_ref()
            .and_then(|e| {
                e.decline_code
                    .clone()
                    .or_else(|| e.code.as_ref().map(|c| c.as_str().to_string()))
            })
            .unwrap_or_else(|| "payment_failed".into())
    };
    match &pi.status {
        PaymentIntentStatus::Succeeded => Outcome::Succeeded(id),
        PaymentIntentStatus::RequiresAction => {
            Outcome::Failed(Some(id), "authentication_required".into())
        }
        PaymentIntentStatus::RequiresPaymentMethod => Outcome::Failed(Some(id), reason()),
        PaymentIntentStatus::Canceled => Outcome::Failed(Some(id), "canceled".into()),
        other => Outcome::Later(Some(id), other.as_str().to_string()),
    }
}

fn classify_error(e: StripeError) -> Outcome {
    match e {
        StripeError::Stripe(err, status) => {
            let pi = err
                .payment_intent
                .as_ref()
                .map(|p| p.id.as_str().to_string());
            let code = err.code.as_ref().map(|c| c.as_str().to_string());
            match status {
                // A decline: the PaymentIntent exists and says why.
                402 => Outcome::Failed(
                    pi,
                    err.decline_code
                        .clone()
                        .or(code)
                        .unwrap_or_else(|| "card_declined".into()),
                ),
                // Our key or Stripe's state, not the customer's card: try again later rather
                // than count a failure against the wallet.
                401 | 403 | 409 | 429 | 500.. => {
                    Outcome::Later(pi, format!("stripe answered {status}"))
                }
                _ => Outcome::Failed(pi, code.unwrap_or_else(|| format!("http_{status}"))),
            }
        }
        other => Outcome::Later(None, other.to_string()),
    }
}

impl Stripe {
    /// The worker over `store`, reporting to `engine`; `wake` is notified when new rows are
    /// in the store (the payments sink does it after each flush); the worker notifies
    /// `wake_notices` when it stored a notice for the operator (the webhook sender waits on it).
    pub fn new(
        config: StripeConfig,
        store: Payments,
        engine: Arc<dyn Submit>,
        wake: Arc<tokio::sync::Notify>,
        wake_notices: Arc<tokio::sync::Notify>,
    ) -> Result<Arc<Stripe>, Error> {
        let client = match &config.secret_key {
            None => None,
            Some(key) => {
                let mut builder = stripe::ClientBuilder::new(key.clone())
                    .timeout(Duration::from_secs(30))
                    .app_info("tally", Some(env!("CARGO_PKG_VERSION").into()), None);
                if let Some(base) = &config.api_base {
                    builder = builder.url(base.clone());
                }
                Some(
                    builder
                        .build()
                        .map_err(|e| Error(format!("stripe client: {e}")))?,
                )
            }
        };
        Ok(Arc::new(Stripe {
            store,
            client,
            config,
            engine,
            wake,
            wake_notices,
        }))
    }

    /// How long a top-up waits for its outcome before it is looked up (microseconds).
    pub fn reconcile_after_us(&self) -> i64 {
        self.config.reconcile_after.as_micros() as i64
    }

    /// The worker loop: charges due rows until `stop` resolves.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let waiting = metrics::gauge!("tally_topups_waiting");
        loop {
            match self.store.pending() {
                Ok(n) => waiting.set(n as f64),
                Err(e) => tracing::error!("{e}"),
            }
            let mut wait = Duration::from_secs(5);
            if self.client.is_some() {
                match self.store.due(now_us(), 64) {
                    Ok(rows) => {
                        for row in rows {
                            self.process(row).await;
                        }
                    }
                    Err(e) => tracing::error!("{e}"),
                }
                if let Ok(Some(next)) = self.store.next_due() {
                    let until = (next - now_us()).max(0) as u64;
                    wait = wait.min(Duration::from_micros(until));
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Charges one pending row (or looks it up) and settles it if Stripe has an answer.
    pub async fn process(&self, row: TopUp) {
        let Some(client) = &self.client else { return };
        let now = now_us();
        let age = now - row.requested_us;
        let outcome = if row.kind == Kind::Session {
            self.look_up_session(client, &row, age).await
        } else if let Some(pi) = &row.payment_intent {
            // Known PaymentIntent: its state is the answer.
            match RetrievePaymentIntent::new(pi.as_str()).send(client).await {
                Ok(pi) => classify(&pi),
                Err(e) => classify_error(e),
            }
        } else if row.attempts > 0
            && (age >= KEY_LIFETIME_US || age >= self.config.reconcile_after.as_micros() as i64)
        {
            self.reconcile(client, &row, age).await
        } else {
            self.charge(client, &row).await
        };
        // Test-only failpoint: die like `kill -9` between Stripe's answer and the engine's
        // (`server/tests/stripe.rs` proves the restart charges nothing twice).
        if !matches!(outcome, Outcome::Later(..))
            && std::env::var_os("TALLY_FAILPOINT").is_some_and(|v| v == "stripe-after-charge")
        {
            std::process::abort();
        }
        metrics::counter!("tally_stripe_calls_total", "outcome" => match &outcome {
            Outcome::Succeeded(_) => "succeeded",
            Outcome::Failed(..) => "failed",
            Outcome::Later(..) => "later",
        })
        .increment(1);
        match outcome {
            Outcome::Succeeded(pi) => self.settle(&row, Ok(&pi)).await,
            Outcome::Failed(pi, reason) => self.settle(&row, Err((pi.as_deref(), &reason))).await,
            Outcome::Later(pi, why) => {
                tracing::warn!(key = %row.key, attempts = row.attempts + 1, "top-up not settled yet: {why}");
                if let Some(pi) = &pi {
                    if row.payment_intent.is_none() {
                        let _ = self.store.set_intent(&row.key, pi);
                    }
                }
                if let Err(e) = self
                    .store
                    .retry_at(&row.key, now + backoff_us(row.attempts))
                {
                    tracing::error!("{e}");
                }
            }
        }
    }

    async fn charge(&self, client: &stripe::Client, row: &TopUp) -> Outcome {
        let currency = match stripe_types::Currency::from_str(&row.currency) {
            Ok(c) => c,
            Err(_) => return Outcome::Failed(None, "unsupported_currency".into()),
        };
        let key = match IdempotencyKey::new(&row.key) {
            Ok(k) => k,
            Err(_) => return Outcome::Failed(None, "invalid_idempotency_key".into()),
        };
        let request = CreatePaymentIntent::new(row.minor_amount, currency)
            .customer(row.customer.clone())
            .payment_method(row.payment_method.clone())
            .confirm(true)
            .off_session(CreatePaymentIntentOffSession::Bool(true))
            .description(format!("tally top-up of {} {}", row.amount, row.asset))
            .metadata(metadata(row));
        match request
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(client)
            .await
        {
            Ok(pi) => classify(&pi),
            Err(e) => classify_error(e),
        }
    }

    /// A browser payment's PaymentIntent: settled when the customer paid (or Stripe canceled
    /// it). One the customer left unpaid is canceled after 23 hours, so it cannot be paid
    /// once tally stopped waiting for it; if the cancel fails it was paid meanwhile, and the
    /// next look finds that.
    async fn look_up_session(&self, client: &stripe::Client, row: &TopUp, age: i64) -> Outcome {
        let Some(id) = &row.payment_intent else {
            // The caller's request never reached Stripe: nothing can be paid.
            return Outcome::Failed(None, "abandoned".into());
        };
        let pi = match RetrievePaymentIntent::new(id.as_str()).send(client).await {
            Ok(pi) => pi,
            Err(e) => return classify_error(e),
        };
        match pi.status {
            PaymentIntentStatus::Succeeded => Outcome::Succeeded(id.clone()),
            PaymentIntentStatus::Canceled => Outcome::Failed(Some(id.clone()), "canceled".into()),
            PaymentIntentStatus::Processing => {
                Outcome::Later(Some(id.clone()), "processing".into())
            }
            _ if age < KEY_LIFETIME_US => {
                Outcome::Later(Some(id.clone()), "waiting for the customer".into())
            }
            _ => match CancelPaymentIntent::new(id.as_str()).send(client).await {
                Ok(_) => Outcome::Failed(Some(id.clone()), "abandoned".into()),
                Err(e) => classify_error(e),
            },
        }
    }

    /// A caller's top-up (`POST /v1/wallets/{id}/topups`): stored under `key` (derived from
    /// the caller's idempotency key), then charged at once on the saved payment method, or,
    /// for a `session`, made into a PaymentIntent whose client secret the customer's browser
    /// confirms. The grant is added when Stripe says the money is in, once. A repeat of the
    /// same request answers with the same top-up (and the same client secret).
    pub async fn manual_topup(
        &self,
        row: TopUp,
        request_hash: &str,
    ) -> Result<(TopUp, Option<String>), ManualError> {
        let session = row.kind == Kind::Session;
        if session && self.client.is_none() {
            return Err(ManualError::NotConfigured);
        }
        let row = match self
            .store
            .insert_manual(&row, request_hash)
            .map_err(ManualError::Store)?
        {
            Inserted::Conflict => return Err(ManualError::Conflict),
            Inserted::New(row) | Inserted::Repeat(row) => row,
        };
        let Some(client) = &self.client else {
            // Waits, like an auto top-up, until the server runs with a key.
            return Ok((row, None));
        };
        if !session {
            if row.state == State::Pending {
                self.process(row.clone()).await;
            }
            let row = self
                .store
                .get(&row.key)
                .map_err(ManualError::Store)?
                .unwrap_or(row);
            return Ok((row, None));
        }
        let pi = match &row.payment_intent {
            Some(id) => RetrievePaymentIntent::new(id.as_str()).send(client).await,
            None => {
                let currency = stripe_types::Currency::from_str(&row.currency)
                    .map_err(|_| ManualError::Stripe("unsupported currency".into()))?;
                let key = IdempotencyKey::new(&row.key)
                    .map_err(|_| ManualError::Stripe("invalid idempotency key".into()))?;
                let mut create = CreatePaymentIntent::new(row.minor_amount, currency)
                    .customer(row.customer.clone())
                    .description(format!("tally top-up of {} {}", row.amount, row.asset))
                    .metadata(metadata(&row));
                // A card the customer picked in the browser; otherwise Stripe.js collects one.
                if !row.payment_method.is_empty() {
                    create = create.payment_method(row.payment_method.clone());
                }
                create
                    .customize()
                    .request_strategy(RequestStrategy::Idempotent(key))
                    .send(client)
                    .await
            }
        };
        let pi = pi.map_err(|e| ManualError::Stripe(stripe_error_text(&e)))?;
        if row.payment_intent.is_none() {
            self.store
                .set_intent(&row.key, pi.id.as_str())
                .map_err(ManualError::Store)?;
        }
        let row = self
            .store
            .get(&row.key)
            .map_err(ManualError::Store)?
            .unwrap_or(row);
        Ok((row, pi.client_secret))
    }

    /// Whether a Stripe key is configured (cards can be saved, top-ups charged).
    pub fn configured(&self) -> bool {
        self.client.is_some()
    }

    /// Creates the Stripe customer of `wallet` (the key `tally-customer:WALLET` makes a retry
    /// return the same one); its id.
    pub async fn create_customer(&self, wallet: &str) -> Result<String, ManualError> {
        let client = self.client.as_ref().ok_or(ManualError::NotConfigured)?;
        let key = IdempotencyKey::new(format!("tally-customer:{wallet}"))
            .map_err(|_| ManualError::Stripe("invalid idempotency key".into()))?;
        let metadata: HashMap<String, String> =
            [("tally_wallet".to_string(), wallet.to_string())].into();
        CreateCustomer::new()
            .description(format!("tally wallet {wallet}"))
            .metadata(metadata)
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(client)
            .await
            .map(|c| c.id.as_str().to_string())
            .map_err(|e| ManualError::Stripe(stripe_error_text(&e)))
    }

    /// A SetupIntent to save a card on `customer` for later off-session charges: its client
    /// secret, which Stripe.js confirms in the customer's browser.
    pub async fn setup_card(&self, customer: &str) -> Result<String, ManualError> {
        let client = self.client.as_ref().ok_or(ManualError::NotConfigured)?;
        let intent = CreateSetupIntent::new()
            .customer(customer.to_string())
            .usage(stripe_core::setup_intent::CreateSetupIntentUsage::OffSession)
            .send(client)
            .await
            .map_err(|e| ManualError::Stripe(stripe_error_text(&e)))?;
        intent
            .client_secret
            .ok_or_else(|| ManualError::Stripe("the SetupIntent has no client secret".into()))
    }

    /// The card a SetupIntent saved on `customer`: its payment method id, once it succeeded
    /// and only if it belongs to that customer.
    pub async fn saved_card(
        &self,
        setup_intent: &str,
        customer: &str,
    ) -> Result<String, ManualError> {
        let client = self.client.as_ref().ok_or(ManualError::NotConfigured)?;
        let intent = RetrieveSetupIntent::new(setup_intent)
            .send(client)
            .await
            .map_err(|e| ManualError::Stripe(stripe_error_text(&e)))?;
        let owner = intent
            .customer
            .as_ref()
            .map(|c| c.id().as_str().to_string());
        if owner.as_deref() != Some(customer) {
            return Err(ManualError::Stripe(
                "the SetupIntent is not this wallet's".into(),
            ));
        }
        if intent.status != stripe_shared::SetupIntentStatus::Succeeded {
            return Err(ManualError::Stripe(format!(
                "the SetupIntent is {}",
                intent.status.as_str()
            )));
        }
        intent
            .payment_method
            .map(|p| p.id().as_str().to_string())
            .ok_or_else(|| ManualError::Stripe("the SetupIntent saved no payment method".into()))
    }

    /// Finds the PaymentIntent of a row that never got an answer, by its metadata.
    async fn reconcile(&self, client: &stripe::Client, row: &TopUp, age: i64) -> Outcome {
        let query = format!("metadata['tally_key']:'{}'", row.key.replace('\'', "\\'"));
        match SearchPaymentIntent::new(query).send(client).await {
            Ok(found) => match found.data.first() {
                Some(pi) => classify(pi),
                // Never created. Inside the key's lifetime a create is still safe (Stripe
                // would replay one it had made); past it, failing is the safe answer.
                None if age < KEY_LIFETIME_US || row.attempts == 0 => {
                    self.charge(client, row).await
                }
                None => Outcome::Failed(None, "lost".into()),
            },
            Err(e) => classify_error(e),
        }
    }

    /// Reports an outcome to the engine, then marks the row settled. Leaves it pending when
    /// the engine cannot answer (the next attempt reports again).
    async fn settle(&self, row: &TopUp, outcome: Result<&str, (Option<&str>, &str)>) {
        let (Ok(wallet), Ok(asset)) = (Name::new(&row.wallet), AssetCode::new(&row.asset)) else {
            tracing::error!(key = %row.key, "top-up row with an invalid wallet or asset");
            return;
        };
        let (request, state, pi, reason) = match outcome {
            Ok(pi) => {
                let Ok(payment_id) = Name::new(pi) else {
                    tracing::error!(key = %row.key, "payment intent id too long");
                    return;
                };
                let command = Command::TopUpSucceeded {
                    wallet,
                    asset,
                    trigger: row.trigger,
                    payment_id,
                    amount: row.amount,
                };
                let id = derived_id(&format!("{}:succeeded", row.key));
                (Request { id, command }, State::Succeeded, Some(pi), None)
            }
            Err((pi, reason)) => {
                let short: String = reason.chars().take(64).collect();
                let command = Command::TopUpFailed {
                    wallet,
                    asset,
                    trigger: row.trigger,
                    reason: Name::new(&short).unwrap_or_else(|_| tally_engine::name("failed")),
                };
                let id = derived_id(&format!("{}:failed", row.key));
                (Request { id, command }, State::Failed, pi, Some(reason))
            }
        };
        let kind = match (state, reason) {
            (State::Succeeded, _) => "topup.succeeded",
            (_, Some("authentication_required")) => "topup.requires_action",
            _ => "topup.failed",
        };
        let mut data = serde_json::json!({
            "topup": row.key,
            "wallet": row.wallet,
            "asset": row.asset,
            "amount": row.amount.normalize().to_string(),
            "currency": row.currency,
            "amount_minor": row.minor_amount,
            "payment_intent": pi,
        });
        if let Some(reason) = reason {
            data["reason"] = reason.into();
        }
        let notice = Notice::new(&format!("{kind}:{}", row.key), kind, data, now_us());
        if row.kind != Kind::Auto && state == State::Failed {
            // Nothing is in flight in the engine for a caller's top-up: a failure changes no
            // balance, it is only recorded here and told.
            if let Err(e) = self
                .store
                .settle(&row.key, state, pi, reason, now_us(), Some(&notice))
            {
                tracing::error!("{e}");
            }
            self.wake_notices.notify_one();
            tracing::info!(key = %row.key, reason = reason.unwrap_or(""), "top-up failed");
            return;
        }
        match self.engine.submit(request).await {
            Ok(reply) => {
                // Already settled by another path (a webhook, an earlier attempt) is settled.
                let fine = matches!(
                    reply.code,
                    ResultCode::Ok | ResultCode::StaleTopUp | ResultCode::IdempotencyConflict
                );
                if !fine {
                    tracing::error!(key = %row.key, code = %reply.code, "the engine refused a top-up outcome");
                }
                tracing::info!(key = %row.key, state = ?state, reason = reason.unwrap_or(""), "top-up settled");
                let settled =
                    self.store
                        .settle(&row.key, state, pi, reason, now_us(), Some(&notice));
                self.wake_notices.notify_one();
                if let Err(e) = settled {
                    tracing::error!("{e}");
                }
            }
            Err(e) => {
                tracing::warn!(key = %row.key, "engine unavailable for a top-up outcome: {e}");
                // Stripe's answer is safe with its key; ask again later, not in a loop.
                let next = now_us() + backoff_us(row.attempts);
                if let Err(e) = self.store.retry_at(&row.key, next) {
                    tracing::error!("{e}");
                }
            }
        }
    }

    // ----- webhooks in -------------------------------------------------------------------

    /// Verifies and applies one Stripe webhook delivery; `Ok` with what was done.
    pub async fn webhook(
        &self,
        payload: &[u8],
        signature: Option<&str>,
    ) -> Result<&'static str, WebhookError> {
        let secret = self
            .config
            .webhook_secret
            .as_deref()
            .ok_or(WebhookError::NotConfigured)?;
        verify_signature(
            secret,
            payload,
            signature.ok_or(WebhookError::BadSignature("missing"))?,
            now_us() / 1_000_000,
        )?;
        let event: Value =
            serde_json::from_slice(payload).map_err(|_| WebhookError::BadPayload("not JSON"))?;
        let id = event["id"]
            .as_str()
            .ok_or(WebhookError::BadPayload("no event id"))?;
        let kind = event["type"]
            .as_str()
            .ok_or(WebhookError::BadPayload("no event type"))?;
        let created = event["created"].as_i64().unwrap_or(0);
        let object = &event["data"]["object"];
        let unavailable = |e: Error| WebhookError::Unavailable(e.to_string());
        if !self
            .store
            .first_sight(id, kind, now_us())
            .map_err(unavailable)?
        {
            return Ok("duplicate");
        }
        let result = self.apply_event(id, kind, created, object).await;
        if result.is_err() {
            // Not applied: let Stripe's retry find it new.
            let _ = self.store.forget(id);
        }
        result
    }

    async fn apply_event(
        &self,
        id: &str,
        kind: &str,
        created: i64,
        object: &Value,
    ) -> Result<&'static str, WebhookError> {
        let unavailable = |e: Error| WebhookError::Unavailable(e.to_string());
        let str_of = |v: &Value| v.as_str().map(str::to_string);
        match kind {
            "payment_intent.succeeded" | "payment_intent.payment_failed" => {
                let pi = str_of(&object["id"]).ok_or(WebhookError::BadPayload("no id"))?;
                let row = match str_of(&object["metadata"]["tally_key"]) {
                    Some(key) => self.store.get(&key).map_err(unavailable)?,
                    None => self.store.by_intent(&pi).map_err(unavailable)?,
                };
                let Some(row) = row else {
                    return Ok("not a tally top-up");
                };
                // Paid after tally gave up on it (a lost answer failed after 23 hours): the
                // money is in, so the grant is too.
                if row.state == State::Succeeded
                    || (row.state == State::Failed && kind != "payment_intent.succeeded")
                {
                    return Ok("already settled");
                }
                if kind == "payment_intent.succeeded" {
                    self.settle(&row, Ok(&pi)).await;
                } else {
                    let error = &object["last_payment_error"];
                    let reason = str_of(&error["decline_code"])
                        .or_else(|| str_of(&error["code"]))
                        .unwrap_or_else(|| "payment_failed".into());
                    self.settle(&row, Err((Some(&pi), &reason))).await;
                }
                let after = self.store.get(&row.key).map_err(unavailable)?;
                if after.is_some_and(|r| r.state == row.state) {
                    return Err(WebhookError::Unavailable(
                        "the engine did not answer".into(),
                    ));
                }
                Ok("settled")
            }
            "charge.dispute.created" | "charge.dispute.closed" | "charge.dispute.updated" => {
                let dispute = str_of(&object["id"]).ok_or(WebhookError::BadPayload("no id"))?;
                let pi = str_of(&object["payment_intent"])
                    .ok_or(WebhookError::BadPayload("no payment_intent"))?;
                let status = str_of(&object["status"]).unwrap_or_default();
                // Updates change nothing in tally; and they must not hide a later-delivered
                // `created` behind their newer timestamp.
                if kind == "charge.dispute.updated" {
                    return Ok("ignored");
                }
                // Opened and closed are applied in the order Stripe made them: an event older
                // than the last applied one for this dispute is late and changes nothing.
                if self
                    .store
                    .dispute_applied_at(&dispute)
                    .map_err(unavailable)?
                    .is_some_and(|at| at >= created)
                {
                    return Ok("older than the dispute's known state");
                }
                let event = match (kind, status.as_str()) {
                    ("charge.dispute.closed", "won") => PaymentEvent::DisputeWon,
                    // Lost: final. Made now if tally never saw it open.
                    ("charge.dispute.closed", _) => PaymentEvent::DisputeLost {
                        freeze: self.config.dispute_freeze,
                    },
                    // Opened: the clawback.
                    _ => PaymentEvent::Disputed {
                        freeze: self.config.dispute_freeze,
                    },
                };
                let outcome = self.payment_event(id, &pi, event).await?;
                if let Some(row) = self.store.by_intent(&pi).map_err(unavailable)? {
                    let (kind, frozen) = match kind {
                        "charge.dispute.created" => ("dispute.opened", self.config.dispute_freeze),
                        _ => ("dispute.closed", false),
                    };
                    let mut data = serde_json::json!({
                        "wallet": row.wallet,
                        "payment_intent": pi,
                        "dispute": dispute,
                        "status": status,
                    });
                    if kind == "dispute.opened" {
                        data["frozen"] = frozen.into();
                    }
                    let notice = Notice::new(&format!("{kind}:{id}"), kind, data, now_us());
                    self.store.notify(&[notice]).map_err(unavailable)?;
                    self.wake_notices.notify_one();
                }
                // Recorded only once applied: a delivery the engine could not take is retried
                // by Stripe and must not look late then.
                self.store
                    .dispute_status(&dispute, &pi, &status, created)
                    .map_err(unavailable)?;
                Ok(outcome)
            }
            "charge.refunded" => {
                let pi = str_of(&object["payment_intent"])
                    .ok_or(WebhookError::BadPayload("no payment_intent"))?;
                let refunded_minor = object["amount_refunded"]
                    .as_i64()
                    .ok_or(WebhookError::BadPayload("no amount_refunded"))?;
                let Some(row) = self.store.by_intent(&pi).map_err(unavailable)? else {
                    return Ok("not a tally top-up");
                };
                if row.minor_amount <= 0 {
                    return Ok("nothing was charged");
                }
                // Back into the asset, in proportion, never more than was credited.
                let scale = row.amount.scale();
                let refunded = (row.amount * Decimal::from(refunded_minor.min(row.minor_amount))
                    / Decimal::from(row.minor_amount))
                .round_dp_with_strategy(scale, rust_decimal::RoundingStrategy::ToZero);
                if refunded <= Decimal::ZERO {
                    return Ok("nothing to remove");
                }
                self.payment_event(id, &pi, PaymentEvent::Refunded { refunded })
                    .await
            }
            _ => Ok("ignored"),
        }
    }

    async fn payment_event(
        &self,
        event_id: &str,
        pi: &str,
        event: PaymentEvent,
    ) -> Result<&'static str, WebhookError> {
        let unavailable = |e: Error| WebhookError::Unavailable(e.to_string());
        let Some(row) = self.store.by_intent(pi).map_err(unavailable)? else {
            return Ok("not a tally top-up");
        };
        let (Ok(wallet), Ok(payment_id)) = (Name::new(&row.wallet), Name::new(pi)) else {
            return Err(WebhookError::BadPayload("invalid wallet or payment id"));
        };
        let request = Request {
            id: derived_id(&format!("stripe-event:{event_id}")),
            command: Command::Payment {
                wallet,
                payment_id,
                event,
            },
        };
        let reply = self
            .engine
            .submit(request)
            .await
            .map_err(WebhookError::Unavailable)?;
        tracing::info!(wallet = %row.wallet, payment_intent = pi, code = %reply.code, ?event, "Stripe payment event applied");
        Ok(match reply.code {
            ResultCode::Ok => "applied",
            _ => "no change",
        })
    }
}

/// Checks a `Stripe-Signature` header (`t=TIMESTAMP,v1=HEX[,v1=HEX...]`) against `payload`:
/// HMAC-SHA256 with `secret` over `"{t}.{payload}"`, within [`WEBHOOK_TOLERANCE_SECS`] of
/// `now_secs`.
pub fn verify_signature(
    secret: &str,
    payload: &[u8],
    header: &str,
    now_secs: i64,
) -> Result<(), WebhookError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", s)) => signatures.push(s),
            _ => {}
        }
    }
    let t = timestamp.ok_or(WebhookError::BadSignature("no timestamp"))?;
    if (now_secs - t).abs() > WEBHOOK_TOLERANCE_SECS {
        return Err(WebhookError::BadSignature(
            "timestamp outside the tolerance",
        ));
    }
    if signatures.is_empty() {
        return Err(WebhookError::BadSignature("no v1 signature"));
    }
    let (key, signed) = signing_input(secret, payload, t);
    for s in signatures {
        if let Some(tag) = hex_decode(s) {
            if ring::hmac::verify(&key, &signed, &tag).is_ok() {
                return Ok(());
            }
        }
    }
    Err(WebhookError::BadSignature("no signature matches"))
}

/// Signs `payload` as Stripe does (for tests and tools).
pub fn sign(secret: &str, payload: &[u8], t: i64) -> String {
    let (key, signed) = signing_input(secret, payload, t);
    let tag = ring::hmac::sign(&key, &signed);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// Stripe's signing scheme: HMAC-SHA256 with the endpoint secret over `"{t}.{payload}"`.
fn signing_input(secret: &str, payload: &[u8], t: i64) -> (ring::hmac::Key, Vec<u8>) {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(payload);
    (key, signed)
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_refuse() {
        let body = br#"{"id":"evt_1"}"#;
        let header = sign("whsec_x", body, 1_000);
        assert_eq!(verify_signature("whsec_x", body, &header, 1_100), Ok(()));
        assert_eq!(
            verify_signature("whsec_y", body, &header, 1_100),
            Err(WebhookError::BadSignature("no signature matches"))
        );
        assert_eq!(
            verify_signature("whsec_x", br#"{"id":"evt_2"}"#, &header, 1_100),
            Err(WebhookError::BadSignature("no signature matches"))
        );
        assert_eq!(
            verify_signature("whsec_x", body, &header, 1_000 + 301),
            Err(WebhookError::BadSignature(
                "timestamp outside the tolerance"
            ))
        );
        assert!(verify_signature("whsec_x", body, "garbage", 1_000).is_err());
        assert!(verify_signature("whsec_x", body, "t=1000,v1=zz", 1_000).is_err());
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(derived_id("a"), derived_id("a"));
        assert_ne!(derived_id("a:succeeded"), derived_id("a:failed"));
    }
}
