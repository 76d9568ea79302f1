//! The JSON resources: request bodies (converted to engine commands at the edge, with errors
//! that name the field) and answers (converted from engine views). These are the API's own
//! types, documented in the OpenAPI document; the engine's types never reach the wire.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tally_engine as engine;
use tally_engine::{Reply, ReplyValue, RequestId, Timestamp};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::json::{self, asset, name, pairs};

// ----- catalog --------------------------------------------------------------------------------

/// Declares an asset.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"code": "USD", "scale": 6, "usd_value": "1"}))]
pub struct DefineAsset {
    /// The code, e.g. `USD` or `credits` (at most 16 bytes).
    pub code: String,
    /// Decimal places balances in this asset keep (at most 18).
    pub scale: u32,
    /// What one unit is worth in USD, for margin reporting.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String, example = "1")]
    pub usd_value: Decimal,
}

/// A Stripe webhook was taken.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookReceived {
    /// Always true.
    pub received: bool,
    /// What it changed (`settled`, `applied`, `duplicate`, `ignored`, ...).
    pub outcome: String,
}

/// What one unit of an asset costs when a top-up buys it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"currency": "usd", "unit_amount": "0.01"}))]
pub struct AssetPrice {
    /// ISO 4217 currency code in lower case, as Stripe writes it.
    pub currency: String,
    /// The price of one unit of the asset in the currency's major unit (`0.01` is one cent).
    #[serde(with = "json::decimal")]
    #[schema(value_type = String, example = "0.01")]
    pub unit_amount: Decimal,
}

impl AssetPrice {
    pub(crate) fn command(&self, code: &str) -> Result<engine::Command, ApiError> {
        Ok(engine::Command::PriceAsset {
            asset: asset("asset", code)?,
            price: Some(engine::TopUpPrice {
                currency: name("currency", &self.currency)?,
                unit_amount: self.unit_amount,
            }),
        })
    }
}

/// A wallet's payment profile at Stripe: the customer and the default payment method top-ups
/// charge. An absent field is cleared.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"customer": "cus_PnPf3Ux8rVtGkB", "payment_method": "pm_1P5eQ2Kx"}))]
pub struct SetBilling {
    /// The Stripe customer id.
    #[serde(default)]
    pub customer: Option<String>,
    /// The default payment method (a card saved on that customer).
    #[serde(default)]
    pub payment_method: Option<String>,
}

impl SetBilling {
    pub(crate) fn command(&self, wallet: engine::WalletId) -> Result<engine::Command, ApiError> {
        let opt = |field: &'static str, v: &Option<String>| {
            v.as_deref().map(|v| name(field, v)).transpose()
        };
        Ok(engine::Command::SetBilling {
            wallet,
            customer: opt("customer", &self.customer)?,
            payment_method: opt("payment_method", &self.payment_method)?,
        })
    }
}

impl DefineAsset {
    pub(crate) fn command(&self) -> Result<engine::Command, ApiError> {
        Ok(engine::Command::DefineAsset {
            code: asset("code", &self.code)?,
            scale: self.scale,
            usd_value: self.usd_value,
        })
    }
}

/// Declares a product (meter).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"code": "chat", "dimensions": ["input_tokens", "output_tokens"]}))]
pub struct DefineProduct {
    /// The code, e.g. `chat`.
    pub code: String,
    /// Its quantity dimensions (at most 8).
    pub dimensions: Vec<String>,
}

impl DefineProduct {
    pub(crate) fn command(&self) -> Result<engine::Command, ApiError> {
        Ok(engine::Command::DefineProduct {
            code: name("code", &self.code)?,
            dimensions: self
                .dimensions
                .iter()
                .map(|d| name("dimensions", d))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// How a summed charge is rounded to the asset's scale.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    /// Half to even (banker's rounding).
    HalfEven,
    /// Half away from zero.
    HalfUp,
    /// Away from zero: any fraction of the smallest unit is charged.
    Up,
    /// Toward zero.
    Down,
}

impl From<Rounding> for engine::Rounding {
    fn from(r: Rounding) -> engine::Rounding {
        match r {
            Rounding::HalfEven => engine::Rounding::HalfEven,
            Rounding::HalfUp => engine::Rounding::HalfUp,
            Rounding::Up => engine::Rounding::Up,
            Rounding::Down => engine::Rounding::Down,
        }
    }
}

/// One tier of a tiered price.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Inclusive upper bound of the tier's quantity; absent for the last tier.
    #[serde(default, with = "json::decimal::option")]
    #[schema(value_type = Option<String>, example = "1000000")]
    pub up_to: Option<Decimal>,
    /// Price of one unit inside the tier.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String, example = "0.000002")]
    pub unit_price: Decimal,
    /// A flat fee charged once when the quantity reaches into the tier.
    #[serde(
        default,
        with = "json::decimal::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, example = "0")]
    pub flat_fee: Option<Decimal>,
}

/// How a quantity becomes an amount.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Price {
    /// `quantity × unit_price`.
    PerUnit {
        /// Price of one unit.
        #[serde(with = "json::decimal")]
        #[schema(value_type = String, example = "0.0000025")]
        unit_price: Decimal,
    },
    /// Each tier prices the part of the quantity inside it.
    Graduated {
        /// Tiers in ascending `up_to`; the last has none.
        tiers: Vec<Tier>,
    },
    /// The tier the whole quantity falls in prices all of it.
    Volume {
        /// Tiers in ascending `up_to`; the last has none.
        tiers: Vec<Tier>,
    },
}

/// The price of one dimension.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Component {
    /// The dimension, e.g. `input_tokens`.
    pub dimension: String,
    /// Its price.
    pub price: Price,
}

/// One rule of a plan.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The product it prices.
    pub product: String,
    /// Attribute filters; all must equal the event's attributes. The most specific rule wins.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub filters: BTreeMap<String, String>,
    /// The price of each dimension.
    #[serde(default)]
    pub components: Vec<Component>,
    /// The least the rule charges for one event.
    #[serde(
        default,
        with = "json::decimal::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub minimum_charge: Option<Decimal>,
    /// How the charge is rounded to the asset's scale.
    pub rounding: Rounding,
}

fn tiers(tiers: &[Tier]) -> Vec<engine::Tier> {
    tiers
        .iter()
        .map(|t| engine::Tier {
            up_to: t.up_to,
            unit_price: t.unit_price,
            flat_fee: t.flat_fee.unwrap_or_default(),
        })
        .collect()
}

impl From<engine::Rounding> for Rounding {
    fn from(r: engine::Rounding) -> Rounding {
        match r {
            engine::Rounding::HalfEven => Rounding::HalfEven,
            engine::Rounding::HalfUp => Rounding::HalfUp,
            engine::Rounding::Up => Rounding::Up,
            engine::Rounding::Down => Rounding::Down,
        }
    }
}

fn tiers_of(tiers: &[engine::Tier]) -> Vec<Tier> {
    tiers
        .iter()
        .map(|t| Tier {
            up_to: t.up_to.map(|u| u.normalize()),
            unit_price: t.unit_price.normalize(),
            flat_fee: (!t.flat_fee.is_zero()).then(|| t.flat_fee.normalize()),
        })
        .collect()
}

impl Rule {
    /// A rule as the draft body writes it, so it can be put back unchanged.
    pub fn of(r: &engine::PriceRule) -> Rule {
        Rule {
            product: r.product.as_str().into(),
            filters: r
                .filters
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.as_str().to_string()))
                .collect(),
            components: r
                .components
                .iter()
                .map(|c| Component {
                    dimension: c.dimension.as_str().into(),
                    price: match &c.price {
                        engine::PriceModel::PerUnit { unit_price } => Price::PerUnit {
                            unit_price: unit_price.normalize(),
                        },
                        engine::PriceModel::Graduated { tiers } => Price::Graduated {
                            tiers: tiers_of(tiers),
                        },
                        engine::PriceModel::Volume { tiers } => Price::Volume {
                            tiers: tiers_of(tiers),
                        },
                    },
                })
                .collect(),
            minimum_charge: r.minimum_charge.map(|m| m.normalize()),
            rounding: r.rounding.into(),
        }
    }

    fn to_engine(&self) -> Result<engine::PriceRule, ApiError> {
        Ok(engine::PriceRule {
            product: name("rules.product", &self.product)?,
            filters: pairs("rules.filters", &self.filters)?,
            components: self
                .components
                .iter()
                .map(|c| {
                    Ok(engine::Component {
                        dimension: name("rules.components.dimension", &c.dimension)?,
                        price: match &c.price {
                            Price::PerUnit { unit_price } => engine::PriceModel::PerUnit {
                                unit_price: *unit_price,
                            },
                            Price::Graduated { tiers: t } => {
                                engine::PriceModel::Graduated { tiers: tiers(t) }
                            }
                            Price::Volume { tiers: t } => {
                                engine::PriceModel::Volume { tiers: tiers(t) }
                            }
                        },
                    })
                })
                .collect::<Result<_, ApiError>>()?,
            minimum_charge: self.minimum_charge,
            rounding: self.rounding.into(),
        })
    }
}

/// Writes (replaces) a plan's draft.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"asset": "USD", "rules": [{"product": "chat", "filters": {"model": "gpt-4o"}, "components": [{"dimension": "input_tokens", "price": {"type": "per_unit", "unit_price": "0.0000025"}}], "rounding": "up"}]}))]
pub struct DraftPlan {
    /// The asset its prices are in.
    pub asset: String,
    /// For a new plan: the wallet whose custom plan it is.
    #[serde(default)]
    pub custom_for: Option<String>,
    /// Its rules (at most 1,024).
    pub rules: Vec<Rule>,
}

impl DraftPlan {
    pub(crate) fn command(&self, plan: &str) -> Result<engine::Command, ApiError> {
        Ok(engine::Command::DraftPlan {
            plan: name("plan", plan)?,
            custom_for: self
                .custom_for
                .as_deref()
                .map(|w| name("custom_for", w))
                .transpose()?,
            asset: asset("asset", &self.asset)?,
            rules: self
                .rules
                .iter()
                .map(Rule::to_engine)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Puts a wallet on a published plan version.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"plan": "standard", "version": 1, "effective_from": "2026-01-01T00:00:00Z"}))]
pub struct AssignPlan {
    /// The plan.
    pub plan: String,
    /// The published version.
    pub version: u32,
    /// Events at or after this time are priced by it (default: the Unix epoch, i.e. every
    /// event).
    #[serde(default, with = "json::time::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub effective_from: Option<Timestamp>,
}

/// Prices recorded events under the plan's draft and its latest published version.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DraftTest {
    /// The events (at most 100,000); or else `from` and `to`.
    #[serde(default)]
    pub events: Option<Vec<UsageEvent>>,
    /// With `to`: price the usage recorded in the history store that this plan priced and that
    /// happened in `[from, to)` (RFC 3339; at most 100,000 events).
    #[serde(default, with = "json::time::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub from: Option<Timestamp>,
    /// See `from`.
    #[serde(default, with = "json::time::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub to: Option<Timestamp>,
}

// ----- wallets --------------------------------------------------------------------------------

/// Creates a wallet.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"id": "cus_123", "metadata": {"tier": "pro"}, "overdraft": {"USD": "5.00"}}))]
pub struct CreateWallet {
    /// The wallet's id, chosen by you (at most 64 bytes).
    pub id: String,
    /// Free-form metadata (at most 16 entries).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Overdraft limits per asset.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, String>)]
    pub overdraft: BTreeMap<String, DecimalString>,
}

/// A decimal string inside a map.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(transparent)]
pub struct DecimalString(#[serde(with = "json::decimal")] pub Decimal);

impl CreateWallet {
    pub(crate) fn command(&self) -> Result<engine::Command, ApiError> {
        Ok(engine::Command::CreateWallet(engine::CreateWallet {
            wallet: name("id", &self.id)?,
            overdraft: self
                .overdraft
                .iter()
                .map(|(a, d)| {
                    Ok(engine::Limit {
                        asset: asset("overdraft", a)?,
                        amount: d.0,
                    })
                })
                .collect::<Result<_, ApiError>>()?,
            metadata: pairs("metadata", &self.metadata)?,
        }))
    }
}

/// Sets a wallet's overdraft limit in one asset.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetOverdraft {
    /// The asset.
    pub asset: String,
    /// How far below zero strict usage may take the available balance.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String, example = "10.00")]
    pub limit: Decimal,
}

/// Where a grant's credit comes from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GrantSource {
    /// A payment (idempotent on the payment id; the only kind a dispute can claw back).
    TopUp {
        /// The payment processor's id.
        payment_id: String,
    },
    /// A promotion or goodwill credit.
    Promotion,
    /// A refund issued as credit.
    Refund,
    /// A manual adjustment.
    Adjustment,
}

impl GrantSource {
    fn to_engine(&self) -> Result<engine::GrantSource, ApiError> {
        Ok(match self {
            GrantSource::TopUp { payment_id } => engine::GrantSource::TopUp {
                payment_id: name("source.payment_id", payment_id)?,
            },
            GrantSource::Promotion => engine::GrantSource::Promotion,
            GrantSource::Refund => engine::GrantSource::Refund,
            GrantSource::Adjustment => engine::GrantSource::Adjustment,
        })
    }

    fn of(source: &engine::GrantSource) -> GrantSource {
        match source {
            engine::GrantSource::TopUp { payment_id } => GrantSource::TopUp {
                payment_id: payment_id.as_str().into(),
            },
            engine::GrantSource::Promotion => GrantSource::Promotion,
            engine::GrantSource::Refund => GrantSource::Refund,
            engine::GrantSource::Adjustment => GrantSource::Adjustment,
        }
    }
}

/// Adds a grant (credit).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"asset": "USD", "amount": "25.00", "priority": 0, "expires_at": "2027-01-01T00:00:00Z", "source": {"type": "promotion"}}))]
pub struct CreateGrant {
    /// The asset.
    pub asset: String,
    /// The amount.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String, example = "25.00")]
    pub amount: Decimal,
    /// Consumption priority: lower is consumed first (default 0).
    #[serde(default)]
    pub priority: u32,
    /// Not usable before this time.
    #[serde(default, with = "json::time::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub effective_at: Option<Timestamp>,
    /// Its remainder expires (as breakage) at this time.
    #[serde(default, with = "json::time::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
    /// Where the credit comes from (default: promotion).
    #[serde(default)]
    pub source: Option<GrantSource>,
}

impl CreateGrant {
    pub(crate) fn command(&self, wallet: engine::WalletId) -> Result<engine::Command, ApiError> {
        Ok(engine::Command::Grant(engine::Grant {
            wallet,
            asset: asset("asset", &self.asset)?,
            amount: self.amount,
            priority: self.priority,
            effective_at: self.effective_at,
            expires_at: self.expires_at,
            source: self
                .source
                .as_ref()
                .map_or(Ok(engine::GrantSource::Promotion), GrantSource::to_engine)?,
        }))
    }
}

// ----- usage ----------------------------------------------------------------------------------

/// How a usage event is debited.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DebitMode {
    /// Pay before serve: all or nothing; refused when available plus overdraft is short.
    #[default]
    Strict,
    /// Already served: always applied; a shortfall becomes debt.
    Record,
}

/// One usage event.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"wallet": "cus_123", "product": "chat", "quantities": {"input_tokens": "1200", "output_tokens": "350"}, "attributes": {"model": "gpt-4o"}, "cost_usd": "0.0041", "occurred_at": "2026-11-29T12:00:00Z", "mode": "strict"}))]
pub struct UsageEvent {
    /// The wallet.
    pub wallet: String,
    /// The product (meter).
    pub product: String,
    /// Quantity per dimension (at most 8), as decimal strings.
    #[schema(value_type = BTreeMap<String, String>)]
    pub quantities: BTreeMap<String, DecimalString>,
    /// Attributes that rules filter on, e.g. `model` (at most 16).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// What the event cost you, in USD (default 0).
    #[serde(default, with = "json::decimal::option")]
    #[schema(value_type = Option<String>, example = "0.0041")]
    pub cost_usd: Option<Decimal>,
    /// When the usage happened. Required, so that a retry is the same request: it chooses the
    /// plan version and the margin hour.
    #[serde(with = "json::time")]
    #[schema(value_type = String, format = DateTime)]
    pub occurred_at: Timestamp,
    /// `strict` (default) or `record`.
    #[serde(default)]
    pub mode: DebitMode,
    /// Only inside a batch: this event's own idempotency key (mapped to a request id like the
    /// header). A single event takes its key from the `Idempotency-Key` header.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

fn quantities(map: &BTreeMap<String, DecimalString>) -> Result<Vec<engine::Quantity>, ApiError> {
    map.iter()
        .map(|(d, v)| {
            Ok(engine::Quantity {
                dimension: name("quantities", d)?,
                value: v.0,
            })
        })
        .collect()
}

impl UsageEvent {
    pub(crate) fn to_engine(&self) -> Result<engine::UsageEvent, ApiError> {
        Ok(engine::UsageEvent {
            wallet: name("wallet", &self.wallet)?,
            product: name("product", &self.product)?,
            quantities: quantities(&self.quantities)?,
            attributes: pairs("attributes", &self.attributes)?,
            cost_usd: self.cost_usd.unwrap_or_default(),
            occurred_at: self.occurred_at,
            mode: match self.mode {
                DebitMode::Strict => engine::DebitMode::Strict,
                DebitMode::Record => engine::DebitMode::Record,
            },
        })
    }
}

/// Many usage events in one call (at most 8,192).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageBatch {
    /// The events, answered in order. Each may carry its own `idempotency_key`; by default it
    /// is derived from the batch's `Idempotency-Key` and the event's index.
    pub events: Vec<UsageEvent>,
}

/// The outcome of one event of a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItem {
    /// Its request id.
    pub request_id: String,
    /// The HTTP status it would have had on its own.
    pub status: u16,
    /// The charge, when it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<CommandResult>,
    /// The error, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::error::ErrorBody>,
}

/// The outcomes of a batch, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResult {
    /// One per event.
    pub items: Vec<BatchItem>,
}

/// The actual usage that settles a hold.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"product": "chat", "quantities": {"input_tokens": "1200", "output_tokens": "410"}, "attributes": {"model": "gpt-4o"}, "cost_usd": "0.0045", "occurred_at": "2026-11-29T12:00:03Z"}))]
pub struct Settle {
    /// The product.
    pub product: String,
    /// Quantity per dimension.
    #[schema(value_type = BTreeMap<String, String>)]
    pub quantities: BTreeMap<String, DecimalString>,
    /// Attributes.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// What it cost you, in USD (default 0).
    #[serde(default, with = "json::decimal::option")]
    #[schema(value_type = Option<String>)]
    pub cost_usd: Option<Decimal>,
    /// When the usage happened.
    #[serde(with = "json::time")]
    #[schema(value_type = String, format = DateTime)]
    pub occurred_at: Timestamp,
}

impl Settle {
    pub(crate) fn to_engine(
        &self,
        wallet: engine::WalletId,
    ) -> Result<engine::UsageEvent, ApiError> {
        Ok(engine::UsageEvent {
            wallet,
            product: name("product", &self.product)?,
            quantities: quantities(&self.quantities)?,
            attributes: pairs("attributes", &self.attributes)?,
            cost_usd: self.cost_usd.unwrap_or_default(),
            occurred_at: self.occurred_at,
            mode: engine::DebitMode::Record,
        })
    }
}

/// An estimated usage shape, priced under the wallet's plan now.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Estimate {
    /// The product.
    pub product: String,
    /// Estimated quantities.
    #[schema(value_type = BTreeMap<String, String>)]
    pub quantities: BTreeMap<String, DecimalString>,
    /// Attributes.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// Places a hold: a fixed `asset` + `amount`, or a priced `estimate`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"estimate": {"product": "chat", "quantities": {"input_tokens": "1200", "output_tokens": "4096"}, "attributes": {"model": "gpt-4o"}}, "deadline": "2026-11-29T12:05:00Z"}))]
pub struct CreateHold {
    /// The asset of a fixed hold.
    #[serde(default)]
    pub asset: Option<String>,
    /// The amount of a fixed hold.
    #[serde(default, with = "json::decimal::option")]
    #[schema(value_type = Option<String>)]
    pub amount: Option<Decimal>,
    /// A usage shape to price and hold instead.
    #[serde(default)]
    pub estimate: Option<Estimate>,
    /// When the hold expires and releases by itself.
    #[serde(with = "json::time")]
    #[schema(value_type = String, format = DateTime)]
    pub deadline: Timestamp,
}

impl CreateHold {
    pub(crate) fn command(&self, wallet: engine::WalletId) -> Result<engine::Command, ApiError> {
        let amount = match (&self.asset, self.amount, &self.estimate) {
            (Some(a), Some(amount), None) => engine::ReserveAmount::Fixed {
                asset: asset("asset", a)?,
                amount,
            },
            (None, None, Some(e)) => engine::ReserveAmount::Estimate {
                product: name("estimate.product", &e.product)?,
                quantities: quantities(&e.quantities)?,
                attributes: pairs("estimate.attributes", &e.attributes)?,
            },
            _ => {
                return Err(ApiError::invalid(
                    "a hold takes either `asset` and `amount`, or an `estimate`",
                ))
            }
        };
        Ok(engine::Command::Reserve {
            wallet,
            amount,
            deadline: self.deadline,
        })
    }
}

/// Refunds part or all of a usage event (or settled hold).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"event": "5b0c2f9e-1d3a-4c8b-9f6e-2a7d1c0b3e4f", "amount": "0.50"}))]
pub struct CreateRefund {
    /// The event: the `Idempotency-Key` it was sent with (or its `request_id`).
    pub event: String,
    /// The amount; absent refunds whatever is left to refund.
    #[serde(default, with = "json::decimal::option")]
    #[schema(value_type = Option<String>)]
    pub amount: Option<Decimal>,
}

/// Disputes (charges back) a top-up grant.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDispute {
    /// The top-up grant's id.
    pub grant: u64,
    /// Also freeze the wallet.
    #[serde(default)]
    pub freeze: bool,
}

/// A manual correction: positive credits, negative debits (a shortfall becomes debt).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"asset": "USD", "amount": "-2.00", "reason": "double-counted batch on 2026-11-28"}))]
pub struct CreateAdjustment {
    /// The asset.
    pub asset: String,
    /// Signed amount.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// Why (required, at most 256 bytes).
    pub reason: String,
}

/// How much an auto top-up charges: exactly one of `fixed` or `target`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopUpAmount {
    /// Always this amount.
    #[serde(
        default,
        with = "json::decimal::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub fixed: Option<Decimal>,
    /// Enough to bring the available balance up to this.
    #[serde(
        default,
        with = "json::decimal::option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub target: Option<Decimal>,
}

/// An auto top-up rule for one asset.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"threshold": "5.00", "amount": {"fixed": "20.00"}, "attempts_max": 3, "cooldown_us": 60000000, "daily_cap": "100.00", "payment_method": "pm_card_visa"}))]
pub struct SetTopUpRule {
    /// A top-up is requested when available drops below this.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub threshold: Decimal,
    /// How much to charge.
    pub amount: TopUpAmount,
    /// Failed attempts in a row after which the wallet is flagged (default 3).
    #[serde(default = "default_attempts")]
    pub attempts_max: u32,
    /// Least time between two requests, in microseconds (default 60 s).
    #[serde(default = "default_cooldown")]
    pub cooldown_us: i64,
    /// Most that may be requested per UTC day.
    #[serde(default, with = "json::decimal::option")]
    #[schema(value_type = Option<String>)]
    pub daily_cap: Option<Decimal>,
    /// Most that may be requested per UTC calendar month.
    #[serde(default, with = "json::decimal::option")]
    #[schema(value_type = Option<String>)]
    pub monthly_cap: Option<Decimal>,
    /// The saved payment method to charge; `default` (the default) charges the wallet's default
    /// payment method.
    #[serde(default = "default_method")]
    pub payment_method: String,
}

fn default_method() -> String {
    engine::DEFAULT_PAYMENT_METHOD.to_string()
}

fn default_attempts() -> u32 {
    3
}

fn default_cooldown() -> i64 {
    60 * Timestamp::SECOND_US
}

impl SetTopUpRule {
    pub(crate) fn command(
        &self,
        wallet: engine::WalletId,
        asset_code: &str,
    ) -> Result<engine::Command, ApiError> {
        let amount = match (self.amount.fixed, self.amount.target) {
            (Some(f), None) => engine::TopUpAmount::Fixed(f),
            (None, Some(t)) => engine::TopUpAmount::Target(t),
            _ => {
                return Err(ApiError::invalid(
                    "amount: give exactly one of `fixed` or `target`",
                ))
            }
        };
        Ok(engine::Command::SetTopUpRule {
            wallet,
            rule: engine::TopUpRule {
                asset: asset("asset", asset_code)?,
                threshold: self.threshold,
                amount,
                attempts_max: self.attempts_max,
                cooldown_us: self.cooldown_us,
                daily_cap: self.daily_cap,
                monthly_cap: self.monthly_cap,
                payment_method: name("payment_method", &self.payment_method)?,
            },
        })
    }
}

// ----- keys, snapshots, health ----------------------------------------------------------------

/// An API key's scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Usage, reserve, settle, release and reads of wallets.
    Gateway,
    /// Everything.
    Admin,
}

/// Creates an API key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"label": "gateway-eu", "scope": "gateway"}))]
pub struct CreateKey {
    /// Who it is for (at most 64 bytes).
    pub label: String,
    /// What it may do.
    pub scope: Scope,
}

/// A new API key: the secret is shown here once and never again.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    /// Its id (for revoking).
    pub id: u64,
    /// The secret, to send as `Authorization: Bearer <key>`.
    pub key: String,
}

/// An API key as listed (no secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyInfo {
    /// Its id.
    pub id: u64,
    /// Who it is for.
    pub label: String,
    /// What it may do.
    pub scope: Scope,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// The API keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    /// Every key, revoked ones too.
    pub data: Vec<KeyInfo>,
}

/// A checkpoint taken online.
#[derive(Debug, Serialize, ToSchema)]
pub struct Checkpoint {
    /// The shard.
    pub shard: u32,
    /// The last LSN it includes.
    pub lsn: u64,
    /// Its state digest (hex).
    pub digest: String,
    /// How long the shard loop stood still for it, in microseconds.
    pub stall_us: u64,
}

/// Checkpoints of every shard.
#[derive(Debug, Serialize, ToSchema)]
pub struct Snapshot {
    /// One per shard.
    pub checkpoints: Vec<Checkpoint>,
}

/// The server's health.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Shards configured.
    pub shards: u32,
    /// Shards whose loop is running.
    pub shards_running: u32,
    /// `ok` when every shard runs, else `degraded`.
    pub status: String,
    /// How far each effect sink is behind the shards.
    pub sinks: Vec<SinkHealth>,
}

/// How far one effect sink (history store, JSON lines, PostgreSQL export) is behind.
#[derive(Debug, Serialize, ToSchema)]
pub struct SinkHealth {
    /// `sqlite`, `jsonl` or `postgres`.
    pub name: String,
    /// Effects (rows, for `postgres`) not yet durable in it.
    pub lag_effects: u64,
    /// How long the oldest of them has waited, in seconds (at most).
    pub lag_seconds: f64,
}

// ----- answers --------------------------------------------------------------------------------

/// What a successful command did. Which fields appear depends on the command.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
#[schema(example = json!({"request_id": "5b0c2f9e1d3a4c8b9f6e2a7d1c0b3e4f", "asset": "USD", "charged": "0.0041", "debt_added": "0", "available": "24.9959"}))]
pub struct CommandResult {
    /// The engine request id the `Idempotency-Key` mapped to (32 hex digits).
    pub request_id: String,
    /// A grant that was added (grants, top-ups, won disputes, refunds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<u64>,
    /// How much of a new grant paid debt first.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "json::decimal::option"
    )]
    #[schema(value_type = Option<String>)]
    pub debt_paid: Option<Decimal>,
    /// The asset charged or held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asset: Option<String>,
    /// The amount charged.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "json::decimal::option"
    )]
    #[schema(value_type = Option<String>)]
    pub charged: Option<Decimal>,
    /// The part of the charge (or of a dispute) that became debt.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "json::decimal::option"
    )]
    #[schema(value_type = Option<String>)]
    pub debt_added: Option<Decimal>,
    /// The available balance afterwards.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "json::decimal::option"
    )]
    #[schema(value_type = Option<String>)]
    pub available: Option<Decimal>,
    /// A hold that was placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_id: Option<u64>,
    /// The amount held.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "json::decimal::option"
    )]
    #[schema(value_type = Option<String>)]
    pub held: Option<Decimal>,
    /// The amount refunded now.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "json::decimal::option"
    )]
    #[schema(value_type = Option<String>)]
    pub refunded: Option<Decimal>,
    /// What is left to refund of the event.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "json::decimal::option"
    )]
    #[schema(value_type = Option<String>)]
    pub refundable: Option<Decimal>,
    /// The remainder a dispute took back.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "json::decimal::option"
    )]
    #[schema(value_type = Option<String>)]
    pub clawed_back: Option<Decimal>,
    /// A plan version that was published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
}

/// The request id as 32 lowercase hex digits.
pub fn request_id_hex(id: RequestId) -> String {
    format!("{:032x}", id.0)
}

impl CommandResult {
    /// The answer to a reply with code `Ok`.
    pub fn of(id: RequestId, reply: &Reply) -> CommandResult {
        let mut r = CommandResult {
            request_id: request_id_hex(id),
            ..CommandResult::default()
        };
        match reply.value {
            ReplyValue::None | ReplyValue::Shortfall { .. } => {}
            ReplyValue::Grant { grant, debt_paid } => {
                r.grant_id = Some(grant.0);
                r.debt_paid = Some(debt_paid);
            }
            ReplyValue::Charge {
                asset,
                charged,
                debt_added,
                available,
            } => {
                r.asset = Some(asset.as_str().into());
                r.charged = Some(charged);
                r.debt_added = Some(debt_added);
                r.available = Some(available);
            }
            ReplyValue::Hold {
                hold,
                asset,
                amount,
                available,
            } => {
                r.hold_id = Some(hold.0);
                r.asset = Some(asset.as_str().into());
                r.held = Some(amount);
                r.available = Some(available);
            }
            ReplyValue::Refund {
                grant,
                refunded,
                refundable,
            } => {
                r.grant_id = Some(grant.0);
                r.refunded = Some(refunded);
                r.refundable = Some(refundable);
            }
            ReplyValue::Dispute {
                clawed_back,
                debt_added,
            } => {
                r.clawed_back = Some(clawed_back);
                r.debt_added = Some(debt_added);
            }
            ReplyValue::Version { version } => r.version = Some(version),
        }
        r
    }
}

/// A balance in one asset.
#[derive(Debug, Serialize, ToSchema)]
pub struct Balance {
    /// The asset.
    pub asset: String,
    /// Grants (pending ones too) − debt: the wallet's ledger account.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub ledger: Decimal,
    /// Active grants − holds − debt.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub available: Decimal,
    /// Held by open holds.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub held: Decimal,
    /// Debt.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub debt: Decimal,
    /// Granted but not yet effective.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub pending: Decimal,
    /// The overdraft limit.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub overdraft: Decimal,
}

impl Balance {
    /// From the engine's view.
    pub fn of(b: &engine::BalanceView) -> Balance {
        Balance {
            asset: b.asset.as_str().into(),
            ledger: b.ledger,
            available: b.available,
            held: b.held,
            debt: b.debt,
            pending: b.pending,
            overdraft: b.overdraft,
        }
    }
}

/// A grant with a remainder.
#[derive(Debug, Serialize, ToSchema)]
pub struct Grant {
    /// Its id.
    pub id: u64,
    /// The asset.
    pub asset: String,
    /// Granted.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// Left.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub remaining: Decimal,
    /// Consumption priority (lower first).
    pub priority: u32,
    /// Effective from.
    #[serde(with = "json::time::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub effective_at: Option<Timestamp>,
    /// Expires at.
    #[serde(with = "json::time::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
    /// Where it came from.
    pub source: GrantSource,
}

/// An open hold.
#[derive(Debug, Serialize, ToSchema)]
pub struct Hold {
    /// Its id.
    pub id: u64,
    /// The asset.
    pub asset: String,
    /// Held.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// When it releases by itself.
    #[serde(with = "json::time")]
    #[schema(value_type = String, format = DateTime)]
    pub deadline: Timestamp,
}

/// A plan assignment.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanAssignment {
    /// The plan.
    pub plan: String,
    /// Its version.
    pub version: u32,
    /// From when.
    #[serde(with = "json::time")]
    #[schema(value_type = String, format = DateTime)]
    pub effective_from: Timestamp,
}

/// An auto top-up rule.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopUpRule {
    /// The asset.
    pub asset: String,
    /// The threshold.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub threshold: Decimal,
    /// How much.
    pub amount: TopUpAmount,
    /// Failed attempts before the wallet is flagged.
    pub attempts_max: u32,
    /// Least time between requests, microseconds.
    pub cooldown_us: i64,
    /// Daily cap.
    #[serde(with = "json::decimal::option")]
    #[schema(value_type = Option<String>)]
    pub daily_cap: Option<Decimal>,
    /// Monthly cap.
    #[serde(with = "json::decimal::option")]
    #[schema(value_type = Option<String>)]
    pub monthly_cap: Option<Decimal>,
    /// The payment method.
    pub payment_method: String,
}

/// Margin: revenue against vendor cost, in USD.
#[derive(Debug, Serialize, ToSchema)]
pub struct Margin {
    /// Priced events.
    pub events: u64,
    /// Revenue, net of refunds.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub revenue_usd: Decimal,
    /// Vendor cost.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub cost_usd: Decimal,
    /// Refunds.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub refunded_usd: Decimal,
    /// Revenue − cost.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub margin_usd: Decimal,
}

impl Margin {
    /// From the engine's view.
    pub fn of(m: &engine::MarginView) -> Margin {
        Margin {
            events: m.events,
            revenue_usd: m.revenue_usd,
            cost_usd: m.cost_usd,
            refunded_usd: m.refunded_usd,
            margin_usd: m.margin_usd,
        }
    }
}

/// A wallet.
#[derive(Debug, Serialize, ToSchema)]
pub struct Wallet {
    /// Its id.
    pub id: String,
    /// Frozen: strict usage and reserves are refused.
    pub frozen: bool,
    /// In debt in some asset.
    pub in_debt: bool,
    /// Assets whose auto top-up gave up after its attempts.
    pub topup_flagged: Vec<String>,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
    /// Balances per asset.
    pub balances: Vec<Balance>,
    /// Grants with a remainder, in consumption order per asset.
    pub grants: Vec<Grant>,
    /// Open holds.
    pub holds: Vec<Hold>,
    /// Plan assignments.
    pub plans: Vec<PlanAssignment>,
    /// Auto top-up rules.
    pub topup_rules: Vec<TopUpRule>,
    /// Auto top-up state per asset: what is in flight, failures in a row.
    pub topups: Vec<TopUpStatus>,
    /// The Stripe customer id.
    pub customer: Option<String>,
    /// The default payment method top-ups charge.
    pub payment_method: Option<String>,
    /// Margin of its usage.
    pub margin: Margin,
}

/// The state of a wallet's auto top-up in one asset.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopUpStatus {
    /// The asset.
    pub asset: String,
    /// The request waiting for its payment outcome, if any.
    pub in_flight: Option<InFlightTopUp>,
    /// Failed attempts in a row.
    pub failures: u32,
    /// Why the last attempt failed (a decline code), until the next success.
    pub last_failure: Option<String>,
}

/// A top-up request waiting for its payment outcome.
#[derive(Debug, Serialize, ToSchema)]
pub struct InFlightTopUp {
    /// Its trigger number (part of the Stripe idempotency key).
    pub trigger: u64,
    /// The amount requested, in the asset.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// When it was requested.
    #[serde(with = "json::time")]
    #[schema(value_type = String, format = DateTime)]
    pub requested_at: Timestamp,
}

impl Wallet {
    /// From the engine's view.
    pub fn of(w: &engine::WalletView) -> Wallet {
        Wallet {
            id: w.wallet.as_str().into(),
            frozen: w.frozen,
            in_debt: w.balances.iter().any(|b| b.debt > Decimal::ZERO),
            topup_flagged: w.topup_flagged.iter().map(|a| a.as_str().into()).collect(),
            metadata: w
                .metadata
                .iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect(),
            balances: w.balances.iter().map(Balance::of).collect(),
            grants: w
                .grants
                .iter()
                .map(|g| Grant {
                    id: g.id.0,
                    asset: g.asset.as_str().into(),
                    amount: g.amount,
                    remaining: g.remaining,
                    priority: g.priority,
                    effective_at: g.effective_at,
                    expires_at: g.expires_at,
                    source: GrantSource::of(&g.source),
                })
                .collect(),
            holds: w
                .holds
                .iter()
                .map(|h| Hold {
                    id: h.id.0,
                    asset: h.asset.as_str().into(),
                    amount: h.amount,
                    deadline: h.deadline,
                })
                .collect(),
            plans: w
                .plans
                .iter()
                .map(|(plan, version, from)| PlanAssignment {
                    plan: plan.as_str().into(),
                    version: *version,
                    effective_from: *from,
                })
                .collect(),
            topup_rules: w
                .topup_rules
                .iter()
                .map(|r| TopUpRule {
                    asset: r.asset.as_str().into(),
                    threshold: r.threshold,
                    amount: match r.amount {
                        engine::TopUpAmount::Fixed(f) => TopUpAmount {
                            fixed: Some(f),
                            target: None,
                        },
                        engine::TopUpAmount::Target(t) => TopUpAmount {
                            fixed: None,
                            target: Some(t),
                        },
                    },
                    attempts_max: r.attempts_max,
                    cooldown_us: r.cooldown_us,
                    daily_cap: r.daily_cap,
                    monthly_cap: r.monthly_cap,
                    payment_method: r.payment_method.as_str().into(),
                })
                .collect(),
            topups: w
                .topups
                .iter()
                .map(|t| TopUpStatus {
                    asset: t.asset.as_str().into(),
                    in_flight: t
                        .in_flight
                        .map(|(trigger, amount, requested_at)| InFlightTopUp {
                            trigger,
                            amount,
                            requested_at,
                        }),
                    failures: t.failures,
                    last_failure: t.last_failure.map(|r| r.as_str().into()),
                })
                .collect(),
            customer: w.customer.map(|c| c.as_str().into()),
            payment_method: w.payment_method.map(|p| p.as_str().into()),
            margin: Margin::of(&w.margin),
        }
    }
}

/// A page of wallets.
#[derive(Debug, Serialize, ToSchema)]
pub struct WalletList {
    /// The wallets of this page (may be fewer than `limit` when a filter matches few wallets;
    /// go on while `has_more`).
    pub data: Vec<Wallet>,
    /// Whether there may be more: pass `next_cursor` as `cursor` for the next page.
    pub has_more: bool,
    /// The cursor of the next page.
    pub next_cursor: Option<String>,
}

/// The price an event would be charged.
#[derive(Debug, Serialize, ToSchema)]
pub struct PricePreview {
    /// The asset.
    pub asset: String,
    /// The amount.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// The plan that priced it.
    pub plan: String,
    /// Its version.
    pub version: u32,
    /// The index of the rule that matched.
    pub rule: u32,
}

/// One row of a draft test.
#[derive(Debug, Serialize, ToSchema)]
pub struct DraftTestRow {
    /// The wallet (absent for the total).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wallet: Option<String>,
    /// Events priced.
    pub events: u64,
    /// Revenue under the current version.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub revenue_current_usd: Decimal,
    /// Revenue under the draft.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub revenue_draft_usd: Decimal,
    /// Vendor cost.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub cost_usd: Decimal,
    /// Margin under the current version.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub margin_current_usd: Decimal,
    /// Margin under the draft.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String)]
    pub margin_draft_usd: Decimal,
    /// Events the current version could not price.
    pub unpriced_current: u64,
    /// Events the draft could not price.
    pub unpriced_draft: u64,
}

impl DraftTestRow {
    fn of(wallet: Option<&engine::WalletId>, r: &engine::DraftTestRow) -> DraftTestRow {
        DraftTestRow {
            wallet: wallet.map(|w| w.as_str().into()),
            events: r.events,
            revenue_current_usd: r.revenue_current_usd,
            revenue_draft_usd: r.revenue_draft_usd,
            cost_usd: r.cost_usd,
            margin_current_usd: r.margin_current_usd,
            margin_draft_usd: r.margin_draft_usd,
            unpriced_current: r.unpriced_current,
            unpriced_draft: r.unpriced_draft,
        }
    }
}

/// A draft priced against recorded usage, per wallet and in total.
#[derive(Debug, Serialize, ToSchema)]
pub struct DraftTestReport {
    /// The plan.
    pub plan: String,
    /// Its latest published version, if any.
    pub current_version: Option<u32>,
    /// Per wallet.
    pub wallets: Vec<DraftTestRow>,
    /// In total.
    pub total: DraftTestRow,
}

impl DraftTestReport {
    /// From the engine's report.
    pub fn of(r: &engine::DraftTestReport) -> DraftTestReport {
        DraftTestReport {
            plan: r.plan.as_str().into(),
            current_version: r.current_version,
            wallets: r
                .wallets
                .iter()
                .map(|(w, row)| DraftTestRow::of(Some(w), row))
                .collect(),
            total: DraftTestRow::of(None, &r.total),
        }
    }
}

/// A page of a wallet's usage events.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsagePage {
    /// Newest first.
    pub data: Vec<tally_outbound::sqlite::UsageRow>,
    /// Whether there are more: pass `next_cursor` as `cursor`.
    pub has_more: bool,
    /// The cursor of the next page.
    pub next_cursor: Option<String>,
}

/// A page of a wallet's journal entries.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransactionPage {
    /// Newest first.
    pub data: Vec<tally_outbound::sqlite::TransactionRow>,
    /// Whether there are more.
    pub has_more: bool,
    /// The cursor of the next page.
    pub next_cursor: Option<String>,
}

/// A page of a wallet's top-up requests.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopUpPage {
    /// Newest first.
    pub data: Vec<tally_outbound::sqlite::TopUpRow>,
    /// Whether there are more.
    pub has_more: bool,
    /// The cursor of the next page.
    pub next_cursor: Option<String>,
}

/// Margin per group.
#[derive(Debug, Serialize, ToSchema)]
pub struct MarginAnalytics {
    /// The groups, in the order asked for.
    pub data: Vec<tally_outbound::sqlite::MarginGroup>,
}

// ----- callers' top-ups and webhooks out --------------------------------------------------------

/// A top-up a caller asks for: charge the wallet's saved payment method now, or (`session`)
/// start a payment the customer confirms in the browser with Stripe.js.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"asset": "credits", "amount": "2000"}))]
pub struct CreateTopUp {
    /// The asset credited (it must have a top-up price).
    pub asset: String,
    /// How much of the asset to buy; the charge (amount × price) must be whole minor units.
    #[serde(with = "json::decimal")]
    #[schema(value_type = String, example = "2000")]
    pub amount: Decimal,
    /// The payment method to charge; default: the wallet's.
    #[serde(default)]
    pub payment_method: Option<String>,
    /// True: return a PaymentIntent client secret for the browser instead of charging now.
    #[serde(default)]
    pub session: bool,
}

/// A top-up: the engine's auto top-ups and callers' ones alike.
#[derive(Debug, Serialize, ToSchema)]
pub struct TopUpResource {
    /// Its id (also the Stripe idempotency key and the PaymentIntent's `tally_key` metadata).
    pub id: String,
    /// `auto`, `manual` or `session`.
    pub kind: String,
    /// The wallet.
    pub wallet: String,
    /// The asset credited.
    pub asset: String,
    /// The amount credited.
    #[schema(value_type = String)]
    pub amount: String,
    /// The currency charged.
    pub currency: String,
    /// The charge in the currency's minor units.
    pub amount_minor: i64,
    /// `pending` (not charged yet, or waiting for the customer or Stripe), `succeeded` (the grant
    /// is in the wallet) or `failed`.
    pub status: String,
    /// The Stripe PaymentIntent, once there is one.
    pub payment_intent: Option<String>,
    /// Why it failed (a decline code, `authentication_required`, `abandoned`, `lost`).
    pub failure_reason: Option<String>,
    /// For a `session` top-up: what Stripe.js confirms the payment with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    /// When it was asked for.
    pub requested_at: String,
}

impl TopUpResource {
    pub(crate) fn of(t: &tally_outbound::payments::TopUp, client_secret: Option<String>) -> Self {
        TopUpResource {
            id: t.key.clone(),
            kind: t.kind.as_str().into(),
            wallet: t.wallet.clone(),
            asset: t.asset.clone(),
            amount: t.amount.normalize().to_string(),
            currency: t.currency.clone(),
            amount_minor: t.minor_amount,
            status: t.state.name().into(),
            payment_intent: t.payment_intent.clone(),
            failure_reason: t.reason.clone(),
            client_secret,
            requested_at: Timestamp(t.requested_us).to_rfc3339(),
        }
    }
}

/// Registers an endpoint for webhooks out.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"url": "https://ops.example.com/tally", "events": ["topup.failed", "wallet.balance.low"]}))]
pub struct CreateWebhookEndpoint {
    /// Where notices are posted (http or https).
    pub url: String,
    /// The notice types it takes; empty or absent: all.
    #[serde(default)]
    pub events: Vec<String>,
    /// A note for the operator.
    #[serde(default)]
    pub description: String,
    /// The signing secret (`whsec_` + base64 of 24 to 64 bytes); absent: one is generated.
    #[serde(default)]
    pub secret: Option<String>,
}

/// An endpoint for webhooks out.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpoint {
    /// Its id.
    pub id: String,
    /// Where notices are posted.
    pub url: String,
    /// The notice types it takes; empty: all.
    pub events: Vec<String>,
    /// The operator's note.
    pub description: String,
    /// When it was registered.
    pub created_at: String,
    /// The signing secret: only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl WebhookEndpoint {
    pub(crate) fn of(e: &tally_outbound::webhooks::Endpoint, secret: Option<String>) -> Self {
        WebhookEndpoint {
            id: e.id.clone(),
            url: e.url.clone(),
            events: e.events.clone(),
            description: e.description.clone(),
            created_at: Timestamp(e.created_us).to_rfc3339(),
            secret,
        }
    }
}

/// The registered endpoints.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpointList {
    /// Oldest first.
    pub data: Vec<WebhookEndpoint>,
}

/// One delivery attempt.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAttempt {
    /// The notice (its `webhook-id`).
    pub event_id: String,
    /// Its type.
    pub event_type: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When.
    pub at: String,
    /// The HTTP status the endpoint answered.
    pub status: Option<u16>,
    /// Why no status came back (timed out, could not connect).
    pub error: Option<String>,
    /// How long it took.
    pub duration_ms: u64,
    /// Where the delivery stands now: `pending` (retrying), `delivered` or `failed` (gave up
    /// after 3 days).
    pub delivery: String,
}

/// An endpoint's delivery log.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAttemptPage {
    /// Newest first.
    pub data: Vec<WebhookAttempt>,
    /// Pass as `before` for the next page; absent on the last.
    pub next_before: Option<String>,
}

/// A published version or the draft of a plan.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanVersion {
    /// Its number (absent for the draft).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The asset its prices are in.
    pub asset: String,
    /// When it was written (the draft) or published.
    pub at: String,
    /// Its rules, in the shape `PUT /v1/plans/{plan}/draft` takes.
    pub rules: Vec<Rule>,
}

/// A plan with its versions and draft.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanResource {
    /// Its name.
    pub plan: String,
    /// The wallet it is the custom plan of.
    pub custom_for: Option<String>,
    /// The asset of its latest version (or of the draft when nothing is published).
    pub asset: Option<String>,
    /// Published versions, version 1 first.
    pub versions: Vec<PlanVersion>,
    /// The draft, if any.
    pub draft: Option<PlanVersion>,
}

impl PlanResource {
    /// From the engine's view.
    pub fn of(p: &engine::PlanView) -> PlanResource {
        let version = |v: &engine::PlanVersionView, draft: bool| PlanVersion {
            version: (!draft).then_some(v.version),
            asset: v.asset.as_str().into(),
            at: v.at.to_rfc3339(),
            rules: v.rules.iter().map(Rule::of).collect(),
        };
        PlanResource {
            plan: p.plan.as_str().into(),
            custom_for: p.custom_for.map(|w| w.as_str().to_string()),
            asset: p
                .versions
                .last()
                .or(p.draft.as_ref())
                .map(|v| v.asset.as_str().to_string()),
            versions: p.versions.iter().map(|v| version(v, false)).collect(),
            draft: p.draft.as_ref().map(|d| version(d, true)),
        }
    }
}

/// Every plan.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    /// In creation order.
    pub data: Vec<PlanResource>,
}
