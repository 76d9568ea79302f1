//! Inputs and their answers: [`Request`] (a request id and a [`Command`]) and [`Reply`].
//!
//! These are the engine's domain types. They are serde data so the server can log them in the
//! WAL; the network protocol has its own wire types and converts at the edge.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::code::ResultCode;
use crate::money::dec;
use crate::pricing::{PriceRule, Quantity};
use crate::types::{AssetCode, GrantId, HoldId, Name, RequestId, Timestamp, WalletId};

/// One mutating input: the client's request id (idempotency key) and the command.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Request {
    /// Client-chosen id; a repeat with the same command gets the first reply again.
    pub id: RequestId,
    /// What to do.
    pub command: Command,
}

/// Every mutating command. Catalog commands (assets, products, plans) must reach every shard in
/// the same order; wallet commands go to the wallet's shard only.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Command {
    /// Declares an asset. Repeating it with identical values is a no-op.
    DefineAsset {
        /// The code, e.g. `USD`.
        code: AssetCode,
        /// Decimal places balances in this asset keep (at most 18).
        scale: u32,
        /// What one unit is worth in USD, for margin reporting.
        #[serde(with = "dec")]
        usd_value: Decimal,
    },
    /// Declares a product (meter) and its quantity dimensions.
    DefineProduct {
        /// The code, e.g. `chat`.
        code: Name,
        /// Quantity dimensions, e.g. `input_tokens`, `output_tokens` (at most 8).
        dimensions: Vec<Name>,
    },
    /// Writes (replaces) a plan's draft. Creates the plan if it does not exist.
    DraftPlan {
        /// The plan.
        plan: Name,
        /// For a new plan: the wallet it is the custom plan of, or `None` for a public plan.
        custom_for: Option<WalletId>,
        /// The asset its prices are in.
        asset: AssetCode,
        /// Its rules.
        rules: Vec<PriceRule>,
    },
    /// Publishes a plan's draft as its next version, which never changes afterwards.
    PublishPlan {
        /// The plan.
        plan: Name,
    },
    /// Creates a wallet.
    CreateWallet(CreateWallet),
    /// Sets a wallet's overdraft limit in one asset.
    SetOverdraft {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
        /// How far below zero strict usage may take available balance.
        #[serde(with = "dec")]
        limit: Decimal,
    },
    /// Freezes a wallet: strict usage and reserves are refused until it is unfrozen.
    Freeze {
        /// The wallet.
        wallet: WalletId,
    },
    /// Unfreezes a wallet.
    Unfreeze {
        /// The wallet.
        wallet: WalletId,
    },
    /// Puts a wallet on a published plan version from a given time on.
    AssignPlan {
        /// The wallet.
        wallet: WalletId,
        /// The plan.
        plan: Name,
        /// Its published version.
        version: u32,
        /// Events at or after this time are priced by it.
        effective_from: Timestamp,
    },
    /// Adds a grant (credit) to a wallet.
    Grant(Grant),
    /// Reports usage: priced, then debited.
    Usage(UsageEvent),
    /// Holds an amount, or a priced estimate, until settled, released or the deadline.
    Reserve {
        /// The wallet.
        wallet: WalletId,
        /// What to hold.
        amount: ReserveAmount,
        /// When the hold expires and releases by itself.
        deadline: Timestamp,
    },
    /// Settles a hold with the actual usage.
    Settle {
        /// The wallet.
        wallet: WalletId,
        /// The hold.
        hold: HoldId,
        /// The actual usage; its `wallet` must equal the wallet and its mode is ignored (an
        /// overrun is charged as in record mode).
        usage: UsageEvent,
    },
    /// Releases a hold without charging.
    Release {
        /// The wallet.
        wallet: WalletId,
        /// The hold.
        hold: HoldId,
    },
    /// Refunds part or all of a usage event (or settled hold) by its request id.
    Refund {
        /// The wallet.
        wallet: WalletId,
        /// The request id of the usage or settle command.
        event: RequestId,
        /// The amount; `None` refunds whatever is left to refund.
        #[serde(with = "dec::option")]
        amount: Option<Decimal>,
    },
    /// A chargeback of a top-up grant: its remainder is clawed back, the spent part becomes debt.
    Dispute {
        /// The wallet.
        wallet: WalletId,
        /// The top-up grant.
        grant: GrantId,
        /// Also freeze the wallet.
        freeze: bool,
    },
    /// The dispute was won: the grant's amount is credited again.
    DisputeWon {
        /// The wallet.
        wallet: WalletId,
        /// The disputed grant.
        grant: GrantId,
    },
    /// A manual correction: positive credits a grant, negative debits (a shortfall becomes debt).
    Adjust {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
        /// Signed amount.
        #[serde(with = "dec")]
        amount: Decimal,
        /// Why; required, at most 256 bytes.
        reason: String,
    },
    /// Sets (replaces) a wallet's auto top-up rule for one asset and clears its failure flag.
    SetTopUpRule {
        /// The wallet.
        wallet: WalletId,
        /// The rule.
        rule: TopUpRule,
    },
    /// Removes a wallet's auto top-up rule for one asset.
    RemoveTopUpRule {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
    },
    /// The payment of a requested top-up succeeded: adds a grant. Idempotent on the payment id.
    TopUpSucceeded {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
        /// The trigger sequence number from the `TopUpRequested` effect.
        trigger: u64,
        /// The payment processor's id for the payment.
        payment_id: Name,
        /// The amount paid, in the asset.
        #[serde(with = "dec")]
        amount: Decimal,
    },
    /// The payment of a requested top-up failed.
    TopUpFailed {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
        /// The trigger sequence number from the `TopUpRequested` effect.
        trigger: u64,
        /// Why, in the processor's words (a decline code such as `card_declined`, or
        /// `authentication_required`); shown in the wallet until the next outcome.
        reason: Name,
    },
    /// Sets (or with `None`, removes) what one unit of an asset costs when it is bought by a
    /// top-up. Catalog: every shard applies it. Auto top-up rules need it.
    PriceAsset {
        /// The asset.
        asset: AssetCode,
        /// The price.
        price: Option<TopUpPrice>,
    },
    /// Sets the wallet's payment profile at the processor: the customer and the default
    /// payment method that top-ups charge. `None` clears a field.
    SetBilling {
        /// The wallet.
        wallet: WalletId,
        /// The processor's customer id (Stripe `cus_...`).
        customer: Option<Name>,
        /// The default payment method (Stripe `pm_...`).
        payment_method: Option<Name>,
    },
    /// Something the payment processor reports about a credited top-up payment, found by its
    /// payment id (the engine resolves the grant it funded).
    Payment {
        /// The wallet.
        wallet: WalletId,
        /// The processor's payment id, as credited by `TopUpSucceeded` or a top-up grant.
        payment_id: Name,
        /// What happened.
        event: PaymentEvent,
    },
}

/// What a payment processor reports about a payment after it was credited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PaymentEvent {
    /// A chargeback was opened: as [`Command::Dispute`] of the payment's grant.
    Disputed {
        /// Also freeze the wallet.
        freeze: bool,
    },
    /// The chargeback was won: as [`Command::DisputeWon`].
    DisputeWon,
    /// The chargeback was lost: the clawback stands for good (made now if the dispute was
    /// never reported open), and the payment no longer counts as an open dispute, so auto
    /// top-up may charge the wallet again once it is not frozen.
    DisputeLost {
        /// Freeze the wallet too, when the clawback is made now.
        freeze: bool,
    },
    /// Money was returned outside tally. `refunded` is the payment's refunded total so far in
    /// the asset (processors report totals, so a repeated or late report changes nothing); the
    /// part of it not yet removed comes out of the grant's unspent remainder.
    Refunded {
        /// The refunded total, in the asset.
        #[serde(with = "dec")]
        refunded: Decimal,
    },
}

/// What one unit of an asset costs in a currency, for charging top-ups exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TopUpPrice {
    /// ISO 4217 code in lower case, as Stripe writes it (`usd`).
    pub currency: Name,
    /// The price of one unit of the asset in the currency's major unit (0.01 = one cent).
    #[serde(with = "dec")]
    pub unit_amount: Decimal,
}

impl TopUpPrice {
    /// Digits after the decimal point of the currency's minor unit, as Stripe counts them:
    /// zero-decimal currencies (JPY, KRW, ...) charge whole units, three-decimal ones (KWD, ...)
    /// thousandths, every other currency hundredths.
    pub fn minor_digits(currency: &str) -> u32 {
        const ZERO: &[&str] = &[
            "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd",
            "vuv", "xaf", "xof", "xpf",
        ];
        const THREE: &[&str] = &["bhd", "jod", "kwd", "omr", "tnd"];
        if ZERO.contains(&currency) {
            0
        } else if THREE.contains(&currency) {
            3
        } else {
            2
        }
    }

    /// The charge for `amount` of the asset in the currency's minor units, or `None` when it is
    /// not a whole number of minor units (or does not fit).
    pub fn minor_amount(&self, amount: Decimal) -> Option<i64> {
        let digits = Self::minor_digits(self.currency.as_str());
        let major = amount.checked_mul(self.unit_amount)?;
        let minor = major.checked_mul(Decimal::from(10i64.pow(digits)))?;
        if minor.fract() != Decimal::ZERO {
            return None;
        }
        rust_decimal::prelude::ToPrimitive::to_i64(&minor.trunc())
    }

    /// The smallest positive amount of an asset with `scale` decimal places that costs a whole
    /// number of minor units; every chargeable amount is a multiple of it. `None` if it does
    /// not fit a decimal.
    pub fn step(&self, scale: u32) -> Option<Decimal> {
        let digits = Self::minor_digits(self.currency.as_str());
        let per_unit = self
            .unit_amount
            .checked_mul(Decimal::from(10i64.pow(digits)))?
            .normalize();
        // k·10^-scale of the asset costs k·per_unit·10^-scale minor units, whole exactly when
        // k is a multiple of the denominator of per_unit·10^-scale in lowest terms.
        let exponent = per_unit.scale() + scale;
        if exponent > 28 {
            return None;
        }
        let pow = 10u128.pow(exponent);
        let (mut a, mut b) = (per_unit.mantissa().unsigned_abs(), pow);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        let k = i128::try_from(pow / a).ok()?;
        Decimal::try_from_i128_with_scale(k, scale).ok()
    }

    /// Checks the shape: a three-letter lower-case currency and a positive unit amount.
    pub fn is_valid(&self) -> bool {
        let c = self.currency.as_str();
        c.len() == 3
            && c.bytes().all(|b| b.is_ascii_lowercase())
            && self.unit_amount > Decimal::ZERO
            && self.unit_amount <= crate::money::AMOUNT_MAX
    }
}

impl Command {
    /// Checks the sizes of the command's lists and texts against the engine's limits, without
    /// the state: what a server checks before it logs a request, so a request over a limit is
    /// answered `LimitExceeded` without costing the log anything. The engine checks the same
    /// limits again when it applies a command.
    pub fn check_shape(&self) -> Result<(), ResultCode> {
        use crate::engine::{
            ASSETS_MAX, ATTRIBUTES_MAX, METADATA_MAX, QUANTITIES_MAX, REASON_BYTES_MAX,
        };
        use crate::pricing::{PriceModel, COMPONENTS_MAX, FILTERS_MAX, RULES_MAX, TIERS_MAX};
        let over = |ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(ResultCode::LimitExceeded)
            }
        };
        let event = |quantities: usize, attributes: usize| {
            over(quantities <= QUANTITIES_MAX && attributes <= ATTRIBUTES_MAX)
        };
        match self {
            Command::DefineProduct { dimensions, .. } => over(dimensions.len() <= QUANTITIES_MAX),
            Command::DraftPlan { rules, .. } => {
                over(rules.len() <= RULES_MAX)?;
                for rule in rules {
                    over(
                        rule.filters.len() <= FILTERS_MAX
                            && rule.components.len() <= COMPONENTS_MAX,
                    )?;
                    for c in &rule.components {
                        if let PriceModel::Graduated { tiers } | PriceModel::Volume { tiers } =
                            &c.price
                        {
                            over(tiers.len() <= TIERS_MAX)?;
                        }
                    }
                }
                Ok(())
            }
            Command::CreateWallet(c) => {
                over(c.metadata.len() <= METADATA_MAX && c.overdraft.len() <= ASSETS_MAX)
            }
            Command::Usage(u) | Command::Settle { usage: u, .. } => {
                event(u.quantities.len(), u.attributes.len())
            }
            Command::Reserve {
                amount:
                    ReserveAmount::Estimate {
                        quantities,
                        attributes,
                        ..
                    },
                ..
            } => event(quantities.len(), attributes.len()),
            Command::Adjust { reason, .. } => over(reason.len() <= REASON_BYTES_MAX),
            _ => Ok(()),
        }
    }

    /// The wallet this command belongs to, or `None` for catalog commands that every shard
    /// applies.
    pub fn wallet(&self) -> Option<&WalletId> {
        match self {
            Command::DefineAsset { .. }
            | Command::DefineProduct { .. }
            | Command::DraftPlan { .. }
            | Command::PublishPlan { .. }
            | Command::PriceAsset { .. } => None,
            Command::CreateWallet(c) => Some(&c.wallet),
            Command::Grant(g) => Some(&g.wallet),
            Command::Usage(u) => Some(&u.wallet),
            Command::SetOverdraft { wallet, .. }
            | Command::Freeze { wallet }
            | Command::Unfreeze { wallet }
            | Command::AssignPlan { wallet, .. }
            | Command::Reserve { wallet, .. }
            | Command::Settle { wallet, .. }
            | Command::Release { wallet, .. }
            | Command::Refund { wallet, .. }
            | Command::Dispute { wallet, .. }
            | Command::DisputeWon { wallet, .. }
            | Command::Adjust { wallet, .. }
            | Command::SetTopUpRule { wallet, .. }
            | Command::RemoveTopUpRule { wallet, .. }
            | Command::TopUpSucceeded { wallet, .. }
            | Command::TopUpFailed { wallet, .. }
            | Command::SetBilling { wallet, .. }
            | Command::Payment { wallet, .. } => Some(wallet),
        }
    }
}

/// What the history store recorded about a charge (a usage event or a settle) that the engine
/// no longer remembers: the server passes it with a refund that names such a charge
/// ([`crate::Engine::handle_recorded_refund`]). It never comes from a client.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecordedCharge {
    /// The asset charged.
    pub asset: AssetCode,
    /// The amount charged.
    #[serde(with = "dec")]
    pub charged: Decimal,
    /// The product.
    pub product: Name,
    /// The plan.
    pub plan: Name,
    /// The plan version.
    pub version: u32,
    /// When the usage happened.
    pub occurred_at: Timestamp,
    /// When the shard applied it.
    pub applied_at: Timestamp,
    /// The priority a refund credit gets ([`crate::MarginRecord::credit_priority`]).
    pub credit_priority: u32,
    /// When a refund credit expires ([`crate::MarginRecord::credit_expires_at`]).
    pub credit_expires_at: Option<Timestamp>,
    /// The end of the refund window the server allows for it: refused after.
    pub refundable_until: Timestamp,
}

/// Creates a wallet.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CreateWallet {
    /// External id, at most 64 bytes.
    pub wallet: WalletId,
    /// Overdraft limits per asset (default zero).
    pub overdraft: Vec<Limit>,
    /// Free-form metadata, at most 16 entries.
    pub metadata: Vec<(Name, Name)>,
}

/// An amount in an asset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Limit {
    /// The asset.
    pub asset: AssetCode,
    /// The amount.
    #[serde(with = "dec")]
    pub amount: Decimal,
}

/// Adds a grant.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grant {
    /// The wallet.
    pub wallet: WalletId,
    /// The asset.
    pub asset: AssetCode,
    /// The amount.
    #[serde(with = "dec")]
    pub amount: Decimal,
    /// Consumption priority: lower is consumed first.
    pub priority: u32,
    /// Not usable before this time, if set.
    pub effective_at: Option<Timestamp>,
    /// Its remainder leaves as breakage at this time, if set.
    pub expires_at: Option<Timestamp>,
    /// Where the credit comes from.
    pub source: GrantSource,
}

/// Where a grant's credit comes from; decides the journal's counter-account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GrantSource {
    /// A payment; idempotent on the payment id, and the only kind a dispute can claw back.
    TopUp {
        /// The payment processor's id.
        payment_id: Name,
    },
    /// A promotion or goodwill credit.
    Promotion,
    /// A refund issued as credit.
    Refund,
    /// A manual adjustment.
    Adjustment,
}

/// How a usage event is debited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DebitMode {
    /// Pay before serve: all or nothing; refused when available plus overdraft is short.
    Strict,
    /// Already served: always applied; a shortfall becomes debt.
    Record,
}

/// One usage event.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UsageEvent {
    /// The wallet.
    pub wallet: WalletId,
    /// The product (meter).
    pub product: Name,
    /// Quantities per dimension (at most 8).
    pub quantities: Vec<Quantity>,
    /// Attributes rules filter on, e.g. `model = gpt-4o` (at most 16).
    pub attributes: Vec<(Name, Name)>,
    /// What the event cost the seller, in USD.
    #[serde(with = "dec")]
    pub cost_usd: Decimal,
    /// When the usage happened; chooses the plan version and the margin hour.
    pub occurred_at: Timestamp,
    /// Strict or record.
    pub mode: DebitMode,
}

/// What a reserve holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReserveAmount {
    /// A fixed amount.
    Fixed {
        /// The asset.
        asset: AssetCode,
        /// The amount.
        #[serde(with = "dec")]
        amount: Decimal,
    },
    /// The price of an estimated usage shape under the wallet's plan now.
    Estimate {
        /// The product.
        product: Name,
        /// Estimated quantities.
        quantities: Vec<Quantity>,
        /// Attributes.
        attributes: Vec<(Name, Name)>,
    },
}

/// An auto top-up rule for one wallet and asset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TopUpRule {
    /// The asset.
    pub asset: AssetCode,
    /// A top-up is requested when available drops below this.
    #[serde(with = "dec")]
    pub threshold: Decimal,
    /// How much to charge.
    pub amount: TopUpAmount,
    /// Failed attempts in a row after which the wallet is flagged and triggers stop.
    pub attempts_max: u32,
    /// Least time between two requests; failures back off from it, doubling per failure.
    pub cooldown_us: i64,
    /// Most that may be requested per UTC day, if set.
    #[serde(with = "dec::option")]
    pub daily_cap: Option<Decimal>,
    /// Most that may be requested per UTC calendar month, if set.
    #[serde(with = "dec::option")]
    pub monthly_cap: Option<Decimal>,
    /// The saved payment method to charge; `default` means the wallet's default payment method
    /// (see [`Command::SetBilling`]).
    pub payment_method: Name,
}

/// How much a top-up charges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TopUpAmount {
    /// Always this amount.
    Fixed(#[serde(with = "dec")] Decimal),
    /// Enough to bring available up to this balance.
    Target(#[serde(with = "dec")] Decimal),
}

/// The answer to a mutating command. Stored with the request id, so a repeat gets it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The outcome.
    pub code: ResultCode,
    /// Details; which variant depends on the command and code.
    pub value: ReplyValue,
}

impl Reply {
    pub(crate) fn ok(value: ReplyValue) -> Reply {
        Reply {
            code: ResultCode::Ok,
            value,
        }
    }

    pub(crate) fn rejected(code: ResultCode) -> Reply {
        Reply {
            code,
            value: ReplyValue::None,
        }
    }
}

/// Details of a [`Reply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyValue {
    /// Nothing to add.
    None,
    /// A grant was added (or credited by a dispute won or a top-up).
    Grant {
        /// Its id.
        grant: GrantId,
        /// How much of it paid debt first.
        #[serde(with = "dec")]
        debt_paid: Decimal,
    },
    /// A usage event, settle or debit adjustment was charged.
    Charge {
        /// The asset charged.
        asset: AssetCode,
        /// The amount charged.
        #[serde(with = "dec")]
        charged: Decimal,
        /// The part of it that became debt.
        #[serde(with = "dec")]
        debt_added: Decimal,
        /// Available balance afterwards.
        #[serde(with = "dec")]
        available: Decimal,
    },
    /// A hold was placed.
    Hold {
        /// Its id.
        hold: HoldId,
        /// The asset held.
        asset: AssetCode,
        /// The amount held.
        #[serde(with = "dec")]
        amount: Decimal,
        /// Available balance afterwards.
        #[serde(with = "dec")]
        available: Decimal,
    },
    /// A refund was credited.
    Refund {
        /// Its grant.
        grant: GrantId,
        /// The amount refunded now.
        #[serde(with = "dec")]
        refunded: Decimal,
        /// What is left to refund of the event.
        #[serde(with = "dec")]
        refundable: Decimal,
    },
    /// A dispute clawed back a grant.
    Dispute {
        /// The remainder taken back.
        #[serde(with = "dec")]
        clawed_back: Decimal,
        /// The spent part that became debt.
        #[serde(with = "dec")]
        debt_added: Decimal,
    },
    /// A plan version was published.
    Version {
        /// The version number (1, 2, ...).
        version: u32,
    },
    /// Why strict usage or a reserve was refused.
    Shortfall {
        /// The asset.
        asset: AssetCode,
        /// Available balance plus overdraft.
        #[serde(with = "dec")]
        spendable: Decimal,
        /// What was asked.
        #[serde(with = "dec")]
        required: Decimal,
    },
}

/// Helper for building [`Name`]s in tests and examples: panics on an invalid name.
///
/// Not for input from outside: use `Name::new` there and handle the error.
pub fn name(s: &str) -> Name {
    Name::new(s).unwrap_or_else(|e| panic!("invalid name {s:?}: {e}"))
}

/// Helper for building [`AssetCode`]s in tests and examples: panics on an invalid code.
pub fn asset(s: &str) -> AssetCode {
    AssetCode::new(s).unwrap_or_else(|e| panic!("invalid asset code {s:?}: {e}"))
}
