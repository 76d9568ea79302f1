//! The complete state of one shard as plain serde data: what snapshots store and restore.
//!
//! Everything here is ordered deterministically (vectors in creation order, `BTreeMap`s), so the
//! same command log always serializes to the same bytes and hashes to the same digest. Lookup
//! indexes and timers are derived from it and rebuilt by `Engine::from_state`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::command::{GrantSource, Reply, TopUpRule};
use crate::money::{dec, Usd};
use crate::pricing::PriceRule;
pub use crate::remember::{Fifo, Key, Remembered};
use crate::types::{AssetCode, GrantId, HoldId, Name, RequestId, Timestamp, WalletId};

/// Settings that are part of the state: changing them changes what replay produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// How long a request id is remembered. A repeat within the window gets the first reply; a
    /// usage event can be refunded by its id within the window; events older than the window
    /// are refused. Default 24 hours.
    pub idempotency_retention_us: i64,
    /// The most request ids remembered at once. When the table is full the oldest id is
    /// forgotten before its retention has passed (counted by
    /// [`crate::Engine::idempotency_evicted`]), so memory stays bounded whatever the rate: about
    /// 48 bytes per id, so a GiB holds 22 M ids, a 24-hour window at 250 requests/s. Default
    /// 16 M (about 770 MiB when full).
    pub idempotency_max_ids: u64,
    /// How far in the future an event's `occurred_at` may be. Default 5 minutes.
    pub future_skew_us: i64,
    /// A balance whose available value in USD falls below this during one input produces an
    /// [`crate::Effect::BalanceAlert`] of kind `Low` (once per crossing). Zero: no `Low` alerts.
    #[serde(with = "dec")]
    pub low_balance_usd: Decimal,
    /// How long before a grant expires an [`crate::Effect::GrantExpiring`] is produced for it.
    /// Zero: none. Default 3 days.
    pub grant_expiring_lead_us: i64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            idempotency_retention_us: 24 * Timestamp::HOUR_US,
            idempotency_max_ids: 16_000_000,
            future_skew_us: 5 * 60 * Timestamp::SECOND_US,
            low_balance_usd: Decimal::ZERO,
            grant_expiring_lead_us: 3 * Timestamp::DAY_US,
        }
    }
}

impl Config {
    /// Checks the settings, naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !(Timestamp::SECOND_US..=366 * Timestamp::DAY_US)
            .contains(&self.idempotency_retention_us)
        {
            return Err("idempotency_retention_us must be between 1 second and 366 days".into());
        }
        if !(1..=1 << 31).contains(&self.idempotency_max_ids) {
            return Err("idempotency_max_ids must be between 1 and 2^31".into());
        }
        if !(0..=Timestamp::DAY_US).contains(&self.future_skew_us) {
            return Err("future_skew_us must be between 0 and 1 day".into());
        }
        if self.low_balance_usd < Decimal::ZERO || self.low_balance_usd > crate::AMOUNT_MAX {
            return Err("low_balance_usd must be between 0 and the largest amount".into());
        }
        if !(0..=366 * Timestamp::DAY_US).contains(&self.grant_expiring_lead_us) {
            return Err("grant_expiring_lead_us must be between 0 and 366 days".into());
        }
        Ok(())
    }
}

/// One shard's whole state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Settings.
    pub config: Config,
    /// The latest time the shard has seen; time never goes backwards inside the engine.
    pub now: Timestamp,
    /// Declared assets, in declaration order (the index is the asset's number).
    pub assets: Vec<Asset>,
    /// Declared products, in declaration order.
    pub products: Vec<Product>,
    /// Plans, in creation order.
    pub plans: Vec<Plan>,
    /// Wallets, in creation order. Each is behind an `Arc` so that copying the state for a
    /// checkpoint copies pointers, not wallets: the engine clones a wallet only when it
    /// changes one that a checkpoint still shares (copy-on-write).
    pub wallets: Vec<Arc<Wallet>>,
    /// Remembered requests, oldest first.
    pub requests: Fifo<Remembered>,
    /// Sequence number of `requests[0]`.
    pub requests_first_seq: u64,
    /// Replies too big for their packed record, by the record's sequence number.
    pub spilled: BTreeMap<u64, Reply>,
    /// Charges a refund may name, oldest first: those of the remembered requests (usage and
    /// settles), ordered by their request's sequence number.
    pub charges: Fifo<ChargeRef>,
    /// The table answers for ids applied from this time on: the window's start, or later when
    /// ids were forgotten early because the table was full. Usage that occurred before it is
    /// refused (a retry of it could no longer be recognised).
    pub remembered_from: Timestamp,
    /// The largest lead (`occurred_at` − the shard's clock) of any usage event applied: an
    /// earlier application of an event happened no earlier than its `occurred_at` minus this.
    pub max_lead_us: i64,
    /// Requests remembered by a previous format, by id alone (see [`crate::legacy`]); empty once
    /// the idempotency window has passed over them.
    pub legacy: BTreeMap<RequestId, crate::legacy::LegacyRequest>,
    /// Margin aggregates of this shard.
    pub margins: Margins,
    /// Next grant id.
    pub next_grant: u64,
    /// Next hold id.
    pub next_hold: u64,
    /// Last journal sequence number written.
    pub journal_seq: u64,
    /// What was refunded of charges the idempotency table no longer holds, by the key of the
    /// charge's request (wallet and id): refunds past the window name the charge as the history
    /// store recorded it, and this caps them at what was charged. Kept until the refund window
    /// of the charge ends.
    pub late_refunds: BTreeMap<Key, LateRefund>,
    /// Refunds past the idempotency window are refused for charges applied up to this time:
    /// the state was converted from a format that did not keep what was refunded of forgotten
    /// charges (the time of the conversion; the beginning of time for a state made since).
    pub recorded_refunds_from: Timestamp,
}

/// What was refunded of a charge the idempotency table has forgotten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LateRefund {
    /// Refunded so far.
    #[serde(with = "dec")]
    pub refunded: Decimal,
    /// Kept until then: no refund of the charge is accepted later.
    pub until: Timestamp,
}

/// How long what was refunded of a charge is kept once the charge has left the idempotency
/// window, from the start of the hour the charge occurred in: longer than the longest refund
/// window a server allows (366 days), whatever window a refund named, so a window raised later
/// never finds a refunded charge forgotten.
pub const LATE_REFUND_KEEP_US: i64 = 367 * Timestamp::DAY_US;

/// Until when what was refunded of a charge that occurred in `hour` is kept.
pub(crate) fn late_refund_until(hour: i64) -> Timestamp {
    Timestamp(
        hour.saturating_mul(Timestamp::HOUR_US)
            .saturating_add(LATE_REFUND_KEEP_US),
    )
}

impl State {
    /// An empty shard.
    pub fn new(config: Config) -> State {
        State {
            config,
            now: Timestamp(0),
            assets: Vec::new(),
            products: Vec::new(),
            plans: Vec::new(),
            wallets: Vec::new(),
            requests: Fifo::default(),
            requests_first_seq: 0,
            spilled: BTreeMap::new(),
            charges: Fifo::default(),
            remembered_from: Timestamp(i64::MIN),
            max_lead_us: 0,
            legacy: BTreeMap::new(),
            margins: Margins::default(),
            next_grant: 1,
            next_hold: 1,
            journal_seq: 0,
            late_refunds: BTreeMap::new(),
            recorded_refunds_from: Timestamp(i64::MIN),
        }
    }
}

/// A declared asset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Asset {
    /// Its code.
    pub code: AssetCode,
    /// Decimal places.
    pub scale: u32,
    /// USD value of one unit.
    #[serde(with = "dec")]
    pub usd_value: Decimal,
    /// What one unit costs when bought by a top-up; auto top-up rules need it.
    pub topup_price: Option<crate::command::TopUpPrice>,
}

/// A declared product.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// Its code.
    pub code: Name,
    /// Its quantity dimensions.
    pub dimensions: Vec<Name>,
}

/// A price plan: an optional draft and its published versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Its name.
    pub name: Name,
    /// The wallet it is the custom plan of, if any.
    pub custom_for: Option<WalletId>,
    /// The editable draft, if any.
    pub draft: Option<PlanVersion>,
    /// Published versions; version `n` is at index `n - 1`. They never change.
    pub versions: Vec<PlanVersion>,
}

/// The rules of a draft or published version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanVersion {
    /// Index of the asset its prices are in.
    pub asset: u32,
    /// Rules in listing order.
    pub rules: Vec<PriceRule>,
    /// When it was written (draft) or published.
    pub at: Timestamp,
    /// Rule indexes, most specific first; derived from `rules`.
    #[serde(skip)]
    pub order: Vec<u32>,
}

/// A wallet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wallet {
    /// External id.
    pub id: WalletId,
    /// When it was created.
    pub created_at: Timestamp,
    /// Frozen wallets refuse strict usage and reserves, and never trigger a top-up.
    pub frozen: bool,
    /// The payment processor's customer id.
    pub customer: Option<Name>,
    /// The default payment method top-ups charge.
    pub payment_method: Option<Name>,
    /// Free-form metadata.
    pub metadata: Vec<(Name, Name)>,
    /// One entry per asset the wallet has touched.
    pub balances: Vec<Balance>,
    /// Open holds.
    pub holds: Vec<Hold>,
    /// The most recently closed holds (at most [`CLOSED_HOLDS_KEPT`]), to answer a late settle
    /// with why it is too late.
    pub closed_holds: VecDeque<ClosedHold>,
    /// Plan assignments, ascending by `from`.
    pub plans: Vec<Assignment>,
    /// Auto top-up state per asset.
    pub topups: Vec<TopUpState>,
    /// Every top-up grant ever credited, for payment-id idempotency and disputes.
    pub payments: Vec<Payment>,
    /// The latest manual adjustments (at most [`ADJUSTMENTS_KEPT`], oldest first). Every one is
    /// in the journal, with its reason in the history store; these are only the recent ones.
    pub adjustments: Vec<AdjustmentRecord>,
    /// Margin of this wallet's usage.
    pub margin: Margin,
}

/// Makes room for one more element, doubling from one instead of starting at four: most wallets
/// hold one balance and a few grants, and `Vec`'s default first allocation of four slots was
/// most of a wallet's memory.
pub(crate) fn grow_tight<T>(v: &mut Vec<T>) {
    if v.len() == v.capacity() {
        v.reserve_exact(v.len().max(1));
    }
}

/// Closed holds remembered per wallet.
pub const CLOSED_HOLDS_KEPT: usize = 64;

/// Adjustments kept per wallet: a wallet adjusted every day would otherwise grow without bound.
pub const ADJUSTMENTS_KEPT: usize = 64;

impl Wallet {
    /// The balance entry of `asset`, if the wallet has one.
    pub fn balance(&self, asset: &AssetCode) -> Option<&Balance> {
        self.balances.iter().find(|b| b.asset == *asset)
    }

    /// The balance entry of `asset`, created empty if missing.
    pub fn balance_mut(&mut self, asset: &AssetCode) -> &mut Balance {
        match self.balances.iter().position(|b| b.asset == *asset) {
            Some(i) => &mut self.balances[i],
            None => {
                grow_tight(&mut self.balances);
                self.balances.push(Balance::new(*asset));
                self.balances.last_mut().expect("just pushed")
            }
        }
    }
}

/// A wallet's position in one asset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    /// The asset.
    pub asset: AssetCode,
    /// How far below zero strict usage and reserves may take `available`.
    #[serde(with = "dec")]
    pub overdraft: Decimal,
    /// Active grants with a remainder, in consumption order.
    pub grants: Vec<GrantState>,
    /// Grants not yet effective, in creation order.
    pub pending: Vec<GrantState>,
    /// Sum of `grants[].remaining`.
    #[serde(with = "dec")]
    pub active: Decimal,
    /// Sum of the open holds in this asset.
    #[serde(with = "dec")]
    pub held: Decimal,
    /// Usage not covered by grants; the next grant pays it first.
    #[serde(with = "dec")]
    pub debt: Decimal,
}

impl Balance {
    /// An empty balance.
    pub fn new(asset: AssetCode) -> Balance {
        Balance {
            asset,
            overdraft: Decimal::ZERO,
            grants: Vec::new(),
            pending: Vec::new(),
            active: Decimal::ZERO,
            held: Decimal::ZERO,
            debt: Decimal::ZERO,
        }
    }

    /// Active grants − holds − debt.
    pub fn available(&self) -> Decimal {
        self.active - self.held - self.debt
    }

    /// What strict usage and reserves may still take: available + overdraft.
    pub fn spendable(&self) -> Decimal {
        self.available() + self.overdraft
    }

    /// Debt beyond the overdraft limit blocks strict usage and reserves.
    pub fn in_debt(&self) -> bool {
        self.debt > self.overdraft
    }

    /// The ledger balance: every grant's remainder (pending too) − debt. Equals the wallet's
    /// account in the journal.
    pub fn ledger(&self) -> Decimal {
        let pending: Decimal = self.pending.iter().map(|g| g.remaining).sum();
        self.active + pending - self.debt
    }
}

/// A grant with a remainder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantState {
    /// Its id.
    pub id: GrantId,
    /// The amount granted.
    #[serde(with = "dec")]
    pub amount: Decimal,
    /// What is left.
    #[serde(with = "dec")]
    pub remaining: Decimal,
    /// Lower is consumed first.
    pub priority: u32,
    /// Usable from.
    pub effective_at: Option<Timestamp>,
    /// Expires at.
    pub expires_at: Option<Timestamp>,
    /// Where it came from.
    pub source: GrantSource,
}

impl GrantState {
    /// The consumption order key: priority, soonest expiry (none last), oldest.
    pub fn order_key(&self) -> (u32, i64, u64) {
        (
            self.priority,
            self.expires_at.map_or(i64::MAX, |t| t.0),
            self.id.0,
        )
    }
}

/// An open hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// Its id.
    pub id: HoldId,
    /// The asset held.
    pub asset: AssetCode,
    /// The amount held.
    #[serde(with = "dec")]
    pub amount: Decimal,
    /// When it expires.
    pub deadline: Timestamp,
    /// When it was placed.
    pub created_at: Timestamp,
}

/// A hold that ended, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedHold {
    /// Its id.
    pub id: HoldId,
    /// How it ended.
    pub end: HoldEnd,
    /// When.
    pub at: Timestamp,
}

/// How a hold ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldEnd {
    /// Settled with actual usage.
    Settled,
    /// Released by a command.
    Released,
    /// Passed its deadline.
    Expired,
}

/// A wallet's plan from a time on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// From when.
    pub from: Timestamp,
    /// Plan index.
    pub plan: u32,
    /// Published version number.
    pub version: u32,
}

/// Auto top-up state of one wallet and asset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopUpState {
    /// The asset.
    pub asset: AssetCode,
    /// The rule; `None` once removed (the trigger counter must survive removal so that a new
    /// rule never reuses an idempotency key).
    pub rule: Option<TopUpRule>,
    /// Last trigger sequence number used.
    pub trigger: u64,
    /// The request waiting for an outcome.
    pub in_flight: Option<InFlight>,
    /// Failures in a row.
    pub failures: u32,
    /// Set after `attempts_max` failures in a row; cleared by setting the rule again.
    pub flagged: bool,
    /// No request before this time (cooldown, backoff).
    pub next_allowed: Timestamp,
    /// A timer at `next_allowed` will check the rule again.
    pub retry_armed: bool,
    /// The UTC day `day_total` counts.
    pub day: i64,
    /// Requested so far on `day`, not counting failed requests.
    #[serde(with = "dec")]
    pub day_total: Decimal,
    /// The UTC month (`Timestamp::month`) `month_total` counts.
    pub month: i64,
    /// Requested so far in `month`, not counting failed requests.
    #[serde(with = "dec")]
    pub month_total: Decimal,
    /// Why the last request failed (`None` after a success).
    pub last_failure: Option<Name>,
}

/// A requested top-up waiting for its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// Its trigger sequence number.
    pub trigger: u64,
    /// The amount requested.
    #[serde(with = "dec")]
    pub amount: Decimal,
    /// When.
    pub at: Timestamp,
}

/// A credited top-up payment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// The processor's payment id.
    pub payment_id: Name,
    /// The grant it created.
    pub grant: GrantId,
    /// The asset.
    pub asset: AssetCode,
    /// The amount.
    #[serde(with = "dec")]
    pub amount: Decimal,
    /// The grant's priority.
    pub priority: u32,
    /// The grant's expiry.
    pub expires_at: Option<Timestamp>,
    /// Under dispute (the grant was clawed back).
    pub disputed: bool,
    /// The dispute was lost: the clawback is final and the dispute no longer open.
    #[serde(default)]
    pub dispute_lost: bool,
    /// The refunded total the processor reported, in the asset.
    #[serde(with = "dec")]
    pub refunded: Decimal,
    /// How much of the grant's remainder refunds removed (at most `refunded`: a refund of
    /// credit already spent removes nothing).
    #[serde(with = "dec")]
    pub refund_removed: Decimal,
    /// How much of the grant expired unspent (breakage). A dispute turns into debt only what
    /// was spent, never what expired.
    #[serde(with = "dec")]
    pub expired: Decimal,
}

/// A manual adjustment, for audit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjustmentRecord {
    /// The request.
    pub request: RequestId,
    /// When.
    pub at: Timestamp,
    /// The asset.
    pub asset: AssetCode,
    /// Signed amount.
    #[serde(with = "dec")]
    pub amount: Decimal,
    /// Why.
    pub reason: String,
}

/// What a refund needs to know of a charged event, kept for the idempotency window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeRef {
    /// The sequence number of the request that made it (in `State::requests`).
    pub seq: u64,
    /// Wallet index.
    pub wallet: u32,
    /// Asset index.
    pub asset: u32,
    /// The amount charged.
    #[serde(with = "dec")]
    pub charged: Decimal,
    /// Refunded so far.
    #[serde(with = "dec")]
    pub refunded: Decimal,
    /// Product index.
    pub product: u32,
    /// Plan index.
    pub plan: u32,
    /// Plan version.
    pub version: u32,
    /// Hour bucket of the event.
    pub hour: i64,
    /// The priority a refund credit gets: that of the first grant the charge consumed.
    pub priority: u32,
    /// When a refund credit expires: the latest expiry among the grants that paid, `None` if
    /// one of them never expires or part of the charge became debt.
    pub expires_at: Option<Timestamp>,
}

/// Running revenue and cost, as exact USD totals ([`crate::money::Usd`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Margin {
    /// Priced events.
    pub events: u64,
    /// Revenue, net of refunds.
    pub revenue_usd: Usd,
    /// Vendor cost.
    pub cost_usd: Usd,
    /// Refunds (already taken out of `revenue_usd`).
    pub refunded_usd: Usd,
}

impl Margin {
    /// Revenue − cost.
    pub fn margin_usd(&self) -> Usd {
        self.revenue_usd.saturating_sub(self.cost_usd)
    }

    pub(crate) fn add_event(&mut self, revenue_usd: Decimal, cost_usd: Decimal) {
        self.events += 1;
        self.revenue_usd = self.revenue_usd.saturating_add(Usd::of(revenue_usd));
        self.cost_usd = self.cost_usd.saturating_add(Usd::of(cost_usd));
    }

    pub(crate) fn add_refund(&mut self, refund_usd: Decimal) {
        self.revenue_usd = self.revenue_usd.saturating_sub(Usd::of(refund_usd));
        self.refunded_usd = self.refunded_usd.saturating_add(Usd::of(refund_usd));
    }

    /// Adds another aggregate (for merging shards or hours).
    pub fn merge(&mut self, other: &Margin) {
        self.events += other.events;
        self.revenue_usd = self.revenue_usd.saturating_add(other.revenue_usd);
        self.cost_usd = self.cost_usd.saturating_add(other.cost_usd);
        self.refunded_usd = self.refunded_usd.saturating_add(other.refunded_usd);
    }
}

/// Margin aggregates of one shard. Wallet aggregates live in each wallet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Margins {
    /// Everything.
    pub total: Margin,
    /// Per product index.
    pub by_product: BTreeMap<u32, Margin>,
    /// Per (plan index, version).
    pub by_plan: BTreeMap<(u32, u32), Margin>,
    /// Per UTC hour (hours since the epoch) of the event.
    pub by_hour: BTreeMap<i64, Margin>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_sizes_stay_small() {
        // One `Remembered` per request in the window, one `ChargeRef` per charge a refund may
        // still name; the crate docs quote both sizes. Growing one is a memory decision.
        assert_eq!(std::mem::size_of::<Remembered>(), 40);
        let size = std::mem::size_of::<ChargeRef>();
        assert!(size <= 104, "ChargeRef grew to {size} bytes");
    }
}
