//! Outputs: the effects an input produces, drained with `Engine::poll_effect`.
//!
//! Journal entries are double-entry: each moves `amount` of `asset` from one account to another,
//! so per asset the accounts always sum to zero. The wallet account of a wallet equals its grants'
//! remainders minus its debt; tests rebuild it from the journal and compare.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::dec;
use crate::types::{AssetCode, GrantId, Name, RequestId, Timestamp, WalletId};

/// A ledger account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Account {
    /// What the seller owes the wallet's owner in prepaid value.
    Wallet(WalletId),
    /// Earned by usage.
    Revenue,
    /// Money received through top-up payments, before it is earned.
    TopUpClearing,
    /// Promotional and goodwill credit given away.
    Promotion,
    /// Expired grant remainders.
    Breakage,
    /// Refunds of usage.
    Refund,
    /// Chargebacks.
    Dispute,
    /// Manual adjustments.
    Adjustment,
}

/// Why a journal entry was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// A grant was credited.
    Grant,
    /// Usage (or a settle, or a debit adjustment) consumed a grant's part.
    Debit,
    /// Usage beyond all grants became debt.
    Debt,
    /// A grant expired with a remainder.
    Breakage,
    /// A refund.
    Refund,
    /// A dispute clawed back a top-up.
    Dispute,
    /// A dispute was won.
    DisputeWon,
}

/// One double-entry journal record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Shard-local sequence number, gapless from 1.
    pub seq: u64,
    /// When it was applied.
    pub at: Timestamp,
    /// The request that caused it, or `None` for timers (expiry).
    pub request: Option<RequestId>,
    /// Why.
    pub kind: EntryKind,
    /// The asset.
    pub asset: AssetCode,
    /// The amount moved; always positive.
    #[serde(with = "dec")]
    pub amount: Decimal,
    /// The account that loses `amount`.
    pub from: Account,
    /// The account that gains `amount`.
    pub to: Account,
    /// The grant concerned, where there is one.
    pub grant: Option<GrantId>,
}

/// Revenue and cost of one priced usage event (or settle), for margin export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarginRecord {
    /// The request id of the usage or settle.
    pub request: RequestId,
    /// The wallet.
    pub wallet: WalletId,
    /// The product.
    pub product: Name,
    /// The plan.
    pub plan: Name,
    /// Its version.
    pub version: u32,
    /// The asset charged.
    pub asset: AssetCode,
    /// The amount charged in the asset.
    #[serde(with = "dec")]
    pub charged: Decimal,
    /// The charge valued in USD.
    #[serde(with = "dec")]
    pub revenue_usd: Decimal,
    /// What the event cost the seller, in USD.
    #[serde(with = "dec")]
    pub cost_usd: Decimal,
    /// When the usage happened.
    pub occurred_at: Timestamp,
    /// The priority a refund credit gets: that of the first grant the charge consumed.
    #[serde(default)]
    pub credit_priority: u32,
    /// When a refund credit expires: the latest expiry among the grants that paid, `None` if
    /// one of them never expires or part of the charge became debt.
    #[serde(default)]
    pub credit_expires_at: Option<Timestamp>,
}

/// A request to charge a saved payment method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopUpRequest {
    /// The wallet.
    pub wallet: WalletId,
    /// The asset to credit.
    pub asset: AssetCode,
    /// The amount to charge.
    #[serde(with = "dec")]
    pub amount: Decimal,
    /// The trigger's sequence number; the outcome command must name it.
    pub trigger: u64,
    /// The payment method to charge: the rule's, or else the wallet's default.
    pub payment_method: Name,
    /// The wallet's customer at the payment processor.
    pub customer: Name,
    /// The currency to charge in (`usd`).
    pub currency: Name,
    /// The charge in the currency's minor units (cents), exact: the asset's top-up price times
    /// `amount`.
    pub minor_amount: i64,
    /// When it was requested.
    pub at: Timestamp,
}

impl TopUpRequest {
    /// The payment processor's idempotency key: derived from the wallet, asset and trigger
    /// sequence only, so a retry or a restart can never charge twice.
    pub fn idempotency_key(&self) -> String {
        format!(
            "tally-topup:{}:{}:{}",
            self.wallet, self.asset, self.trigger
        )
    }
}

/// Something the shard loop must carry out or export after an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// A ledger record to export.
    Journal(JournalEntry),
    /// A margin record to export.
    Margin(MarginRecord),
    /// Charge a payment method; answer with `TopUpSucceeded` or `TopUpFailed`.
    TopUpRequested(TopUpRequest),
    /// A wallet's top-ups failed `attempts_max` times in a row; it is flagged and no further
    /// top-up is requested until its rule is set again.
    TopUpExhausted {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
    },
    /// A wallet was created (its metadata is in the command; the history store keeps it so
    /// analytics can group by it).
    WalletCreated {
        /// The wallet.
        wallet: WalletId,
    },
    /// A wallet that was not frozen is now frozen (by `Freeze`, or by a chargeback).
    WalletFrozen {
        /// The wallet.
        wallet: WalletId,
    },
    /// One input took a balance across an alert level, downwards (see [`Alert`]). Each level
    /// is reported once per crossing: it fires again only after the balance went back above.
    BalanceAlert {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
        /// Which level was crossed.
        alert: Alert,
        /// Available after the input.
        #[serde(with = "dec")]
        available: Decimal,
    },
    /// A grant with a remainder expires within the configured lead time
    /// (`Config::grant_expiring_lead_us`).
    GrantExpiring {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
        /// The grant.
        grant: GrantId,
        /// What is left of it now.
        #[serde(with = "dec")]
        remaining: Decimal,
        /// When it expires.
        expires_at: Timestamp,
    },
}

/// The levels a [`Effect::BalanceAlert`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Alert {
    /// Available value fell below `Config::low_balance_usd`.
    Low,
    /// Available fell from above zero to zero or below.
    Depleted,
    /// Debt appeared where there was none.
    InDebt,
}

impl Alert {
    /// The operator-facing event name.
    pub fn event_type(self) -> &'static str {
        match self {
            Alert::Low => "wallet.balance.low",
            Alert::Depleted => "wallet.balance.depleted",
            Alert::InDebt => "wallet.in_debt",
        }
    }
}
