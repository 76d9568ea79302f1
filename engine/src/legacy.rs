//! Reading a shard state written by earlier snapshot formats (versions 1 and 2), so that a data
//! directory written by an earlier release still opens.
//!
//! Version 2 is the current state without [`State::late_refunds`] (refunds past the idempotency
//! window did not exist): it converts with that map empty, and refunds past the window are
//! refused for charges applied before the conversion ([`State::recorded_refunds_from`]), since
//! what was refunded of them inside their window is no longer known.
//!
//! Version 1 differs from the current state in four places: the settings had no
//! `idempotency_max_ids`; a top-up payment did not track what of it expired; a remembered
//! request was a 192-byte record keyed by its id alone (per shard, not per wallet) that carried
//! the reply whole and, for a charge, what a refund needs. Converting keeps every wallet exactly
//! and keeps the old records in [`crate::state::State::legacy`], where they answer repeats by id
//! alone, as version 1 did, and hold what a refund of their charges needs, until the idempotency
//! window has passed over them.
//!
//! What cannot be recovered: how much of a payment had expired before the upgrade (it counts as
//! zero, so a later dispute of a top-up that expired before the upgrade treats the expired part
//! as spent, as version 1 did).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::command::Reply;
use crate::money::{dec, Usd};
use crate::remember::seconds;
use crate::state::{
    AdjustmentRecord, Asset, Assignment, Balance, ChargeRef, ClosedHold, Config, Hold, Margin,
    Margins, Payment, Plan, Product, State, TopUpState, Wallet,
};
use crate::types::{AssetCode, GrantId, Name, RequestId, Timestamp, WalletId};

/// The settings of version 1.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct ConfigV1 {
    idempotency_retention_us: i64,
    future_skew_us: i64,
    #[serde(with = "dec")]
    low_balance_usd: Decimal,
    grant_expiring_lead_us: i64,
}

/// A shard state in snapshot format version 1.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateV1 {
    config: ConfigV1,
    now: Timestamp,
    assets: Vec<Asset>,
    products: Vec<Product>,
    plans: Vec<Plan>,
    wallets: Vec<WalletV1>,
    requests: Vec<RememberedV1>,
    requests_first_seq: u64,
    margins: MarginsV1,
    next_grant: u64,
    next_hold: u64,
    journal_seq: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct WalletV1 {
    id: WalletId,
    created_at: Timestamp,
    frozen: bool,
    customer: Option<Name>,
    payment_method: Option<Name>,
    metadata: Vec<(Name, Name)>,
    balances: Vec<Balance>,
    holds: Vec<Hold>,
    closed_holds: VecDeque<ClosedHold>,
    plans: Vec<Assignment>,
    topups: Vec<TopUpState>,
    payments: Vec<PaymentV1>,
    adjustments: Vec<AdjustmentRecord>,
    margin: MarginV1,
}

/// Margin totals of version 1: `Decimal`s.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct MarginV1 {
    events: u64,
    #[serde(with = "dec")]
    revenue_usd: Decimal,
    #[serde(with = "dec")]
    cost_usd: Decimal,
    #[serde(with = "dec")]
    refunded_usd: Decimal,
}

impl From<MarginV1> for Margin {
    fn from(m: MarginV1) -> Margin {
        Margin {
            events: m.events,
            revenue_usd: Usd::of(m.revenue_usd),
            cost_usd: Usd::of(m.cost_usd),
            refunded_usd: Usd::of(m.refunded_usd),
        }
    }
}

impl From<&Margin> for MarginV1 {
    fn from(m: &Margin) -> MarginV1 {
        MarginV1 {
            events: m.events,
            revenue_usd: m.revenue_usd.to_decimal(),
            cost_usd: m.cost_usd.to_decimal(),
            refunded_usd: m.refunded_usd.to_decimal(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct MarginsV1 {
    total: MarginV1,
    by_product: BTreeMap<u32, MarginV1>,
    by_plan: BTreeMap<(u32, u32), MarginV1>,
    by_hour: BTreeMap<i64, MarginV1>,
}

impl From<MarginsV1> for Margins {
    fn from(m: MarginsV1) -> Margins {
        Margins {
            total: m.total.into(),
            by_product: m
                .by_product
                .into_iter()
                .map(|(k, v)| (k, v.into()))
                .collect(),
            by_plan: m.by_plan.into_iter().map(|(k, v)| (k, v.into())).collect(),
            by_hour: m.by_hour.into_iter().map(|(k, v)| (k, v.into())).collect(),
        }
    }
}

impl From<&Margins> for MarginsV1 {
    fn from(m: &Margins) -> MarginsV1 {
        MarginsV1 {
            total: (&m.total).into(),
            by_product: m.by_product.iter().map(|(k, v)| (*k, v.into())).collect(),
            by_plan: m.by_plan.iter().map(|(k, v)| (*k, v.into())).collect(),
            by_hour: m.by_hour.iter().map(|(k, v)| (*k, v.into())).collect(),
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct PaymentV1 {
    payment_id: Name,
    grant: GrantId,
    asset: AssetCode,
    #[serde(with = "dec")]
    amount: Decimal,
    priority: u32,
    expires_at: Option<Timestamp>,
    disputed: bool,
    dispute_lost: bool,
    #[serde(with = "dec")]
    refunded: Decimal,
    #[serde(with = "dec")]
    refund_removed: Decimal,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct RememberedV1 {
    id: RequestId,
    fingerprint: u64,
    at: Timestamp,
    reply: Reply,
    charge: Option<ChargeRefV1>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct ChargeRefV1 {
    wallet: u32,
    asset: u32,
    #[serde(with = "dec")]
    charged: Decimal,
    #[serde(with = "dec")]
    refunded: Decimal,
    product: u32,
    plan: u32,
    version: u32,
    hour: i64,
}

/// A request remembered by version 1: found by its id alone, whatever its wallet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyRequest {
    /// Fingerprint of the body (the same function as today's).
    pub fingerprint: u64,
    /// When it was applied, in whole seconds.
    pub at: u32,
    /// The reply it got.
    pub reply: Reply,
    /// For a charge: what a refund of it needs.
    pub charge: Option<ChargeRef>,
}

impl From<StateV1> for State {
    fn from(old: StateV1) -> State {
        let config = Config {
            idempotency_retention_us: old.config.idempotency_retention_us,
            future_skew_us: old.config.future_skew_us,
            low_balance_usd: old.config.low_balance_usd,
            grant_expiring_lead_us: old.config.grant_expiring_lead_us,
            ..Config::default()
        };
        let mut state = State::new(config);
        // Nor did version 1 keep what was refunded of charges: see `From<StateV2>`.
        state.recorded_refunds_from = old.now;
        // Version 1 did not track how far ahead events were: assume the most it allowed.
        state.max_lead_us = config.future_skew_us;
        state.now = old.now;
        state.assets = old.assets;
        state.products = old.products;
        state.plans = old.plans;
        state.margins = old.margins.into();
        state.next_grant = old.next_grant;
        state.next_hold = old.next_hold;
        state.journal_seq = old.journal_seq;
        let mut legacy = BTreeMap::new();
        for r in &old.requests {
            let charge = r.charge.map(|c| ChargeRef {
                seq: 0,
                wallet: c.wallet,
                asset: c.asset,
                charged: c.charged,
                refunded: c.refunded,
                product: c.product,
                plan: c.plan,
                version: c.version,
                hour: c.hour,
                // Version 1 credited refunds at priority 0 without expiry.
                priority: 0,
                expires_at: None,
            });
            legacy.insert(
                r.id,
                LegacyRequest {
                    fingerprint: r.fingerprint,
                    at: seconds(r.at),
                    reply: r.reply,
                    charge,
                },
            );
        }
        state.legacy = legacy;
        state.wallets = old
            .wallets
            .into_iter()
            .map(|w| {
                Arc::new(Wallet {
                    id: w.id,
                    created_at: w.created_at,
                    frozen: w.frozen,
                    customer: w.customer,
                    payment_method: w.payment_method,
                    metadata: w.metadata,
                    balances: w.balances,
                    holds: w.holds,
                    closed_holds: w.closed_holds,
                    plans: w.plans,
                    topups: w.topups,
                    payments: w
                        .payments
                        .into_iter()
                        .map(|p| Payment {
                            payment_id: p.payment_id,
                            grant: p.grant,
                            asset: p.asset,
                            amount: p.amount,
                            priority: p.priority,
                            expires_at: p.expires_at,
                            disputed: p.disputed,
                            dispute_lost: p.dispute_lost,
                            refunded: p.refunded,
                            refund_removed: p.refund_removed,
                            expired: Decimal::ZERO,
                        })
                        .collect(),
                    adjustments: w.adjustments,
                    margin: w.margin.into(),
                })
            })
            .collect();
        state
    }
}

/// A version-1 state with `state`'s catalog and wallets and the given remembered requests (id,
/// fingerprint, time, reply; no charges), for tests of the conversion.
#[doc(hidden)]
pub fn v1_for_tests(state: &State, requests: &[(RequestId, u64, Timestamp, Reply)]) -> StateV1 {
    StateV1 {
        config: ConfigV1 {
            idempotency_retention_us: state.config.idempotency_retention_us,
            future_skew_us: state.config.future_skew_us,
            low_balance_usd: state.config.low_balance_usd,
            grant_expiring_lead_us: state.config.grant_expiring_lead_us,
        },
        now: state.now,
        assets: state.assets.clone(),
        products: state.products.clone(),
        plans: state.plans.clone(),
        wallets: state
            .wallets
            .iter()
            .map(|w| WalletV1 {
                id: w.id,
                created_at: w.created_at,
                frozen: w.frozen,
                customer: w.customer,
                payment_method: w.payment_method,
                metadata: w.metadata.clone(),
                balances: w.balances.clone(),
                holds: w.holds.clone(),
                closed_holds: w.closed_holds.clone(),
                plans: w.plans.clone(),
                topups: w.topups.clone(),
                payments: w
                    .payments
                    .iter()
                    .map(|p| PaymentV1 {
                        payment_id: p.payment_id,
                        grant: p.grant,
                        asset: p.asset,
                        amount: p.amount,
                        priority: p.priority,
                        expires_at: p.expires_at,
                        disputed: p.disputed,
                        dispute_lost: p.dispute_lost,
                        refunded: p.refunded,
                        refund_removed: p.refund_removed,
                    })
                    .collect(),
                adjustments: w.adjustments.clone(),
                margin: (&w.margin).into(),
            })
            .collect(),
        requests: requests
            .iter()
            .map(|&(id, fingerprint, at, reply)| RememberedV1 {
                id,
                fingerprint,
                at,
                reply,
                charge: None,
            })
            .collect(),
        requests_first_seq: 0,
        margins: (&state.margins).into(),
        next_grant: state.next_grant,
        next_hold: state.next_hold,
        journal_seq: state.journal_seq,
    }
}

/// A shard state in snapshot format version 2: today's, without `late_refunds` and
/// `recorded_refunds_from`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateV2 {
    config: Config,
    now: Timestamp,
    assets: Vec<Asset>,
    products: Vec<Product>,
    plans: Vec<Plan>,
    wallets: Vec<Arc<Wallet>>,
    requests: crate::state::Fifo<crate::state::Remembered>,
    requests_first_seq: u64,
    spilled: BTreeMap<u64, Reply>,
    charges: crate::state::Fifo<ChargeRef>,
    remembered_from: Timestamp,
    max_lead_us: i64,
    legacy: BTreeMap<RequestId, LegacyRequest>,
    margins: Margins,
    next_grant: u64,
    next_hold: u64,
    journal_seq: u64,
}

impl From<StateV2> for State {
    fn from(old: StateV2) -> State {
        State {
            config: old.config,
            now: old.now,
            assets: old.assets,
            products: old.products,
            plans: old.plans,
            wallets: old.wallets,
            requests: old.requests,
            requests_first_seq: old.requests_first_seq,
            spilled: old.spilled,
            charges: old.charges,
            remembered_from: old.remembered_from,
            max_lead_us: old.max_lead_us,
            legacy: old.legacy,
            margins: old.margins,
            next_grant: old.next_grant,
            next_hold: old.next_hold,
            journal_seq: old.journal_seq,
            late_refunds: BTreeMap::new(),
            // What earlier releases refunded of charges they had forgotten is not known: no
            // charge applied before the conversion is refunded past the idempotency window.
            recorded_refunds_from: old.now,
        }
    }
}

/// `state` in snapshot format version 2 (without `late_refunds`), for tests of the conversion.
#[doc(hidden)]
pub fn v2_for_tests(state: &State) -> StateV2 {
    let s = state.clone();
    StateV2 {
        config: s.config,
        now: s.now,
        assets: s.assets,
        products: s.products,
        plans: s.plans,
        wallets: s.wallets,
        requests: s.requests,
        requests_first_seq: s.requests_first_seq,
        spilled: s.spilled,
        charges: s.charges,
        remembered_from: s.remembered_from,
        max_lead_us: s.max_lead_us,
        legacy: s.legacy,
        margins: s.margins,
        next_grant: s.next_grant,
        next_hold: s.next_hold,
        journal_seq: s.journal_seq,
    }
}
