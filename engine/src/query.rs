//! Read-only questions: wallets, balances, margin, price previews and draft tests.
//!
//! Queries change nothing and are not logged. They see the state as of the shard's last input;
//! the shard loop calls `handle_timeout(now)` first when it wants expiries applied. Margin answers
//! are per shard: the server merges shards with [`crate::Margin::merge`].

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::code::ResultCode;
use crate::command::{GrantSource, TopUpRule, UsageEvent};
use crate::engine::Engine;
use crate::money::{self, dec};
use crate::state::{Balance, GrantState, Margin, PlanVersion};
use crate::types::{AssetCode, GrantId, HoldId, Name, Timestamp, WalletId};

/// Events one draft test may price.
pub const DRAFT_TEST_EVENTS_MAX: usize = 100_000;

/// Most wallets one [`Engine::list_wallets`] call looks at, matching or not.
pub const WALLET_SCAN_MAX: usize = 4096;

/// Most wallets one [`Engine::list_wallets`] call returns.
pub const WALLET_PAGE_MAX: usize = 1000;

/// A question.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// Everything about one wallet.
    Wallet {
        /// The wallet.
        wallet: WalletId,
    },
    /// One balance of one wallet.
    Balance {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
    },
    /// Margin aggregates.
    Margin(MarginScope),
    /// The price an event would be charged, without applying it.
    PricePreview(UsageEvent),
    /// Every plan with its published versions and draft.
    Plans,
    /// A declared asset: its scale, USD value and top-up price.
    Asset {
        /// The asset.
        asset: AssetCode,
    },
    /// Prices recorded events under a plan's draft and under its latest published version.
    DraftTest {
        /// The plan.
        plan: Name,
        /// The events (at most 100,000).
        events: Vec<UsageEvent>,
    },
}

/// Which margin aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MarginScope {
    /// All usage of the shard.
    Total,
    /// One wallet.
    Wallet(WalletId),
    /// One product.
    Product(Name),
    /// One plan version.
    PlanVersion {
        /// The plan.
        plan: Name,
        /// The version.
        version: u32,
    },
    /// Events whose time falls in `[from, to)`, by whole UTC hours.
    Hours {
        /// Start (its hour is included).
        from: Timestamp,
        /// End (its hour is excluded unless `from` is in it).
        to: Timestamp,
    },
}

/// An answer.
// A wallet view is the big variant; answers are built once per query, off the debit path, so
// boxing it would cost every caller a pattern change for nothing measurable.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryReply {
    /// See [`Query::Wallet`].
    Wallet(WalletView),
    /// See [`Query::Balance`].
    Balance(BalanceView),
    /// See [`Query::Margin`].
    Margin(MarginView),
    /// See [`Query::PricePreview`].
    Price(PriceView),
    /// See [`Query::DraftTest`].
    DraftTest(DraftTestReport),
    /// See [`Query::Asset`].
    Asset(crate::state::Asset),
    /// See [`Query::Plans`].
    Plans(Vec<PlanView>),
}

/// A plan as [`Query::Plans`] shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanView {
    /// Its name.
    pub plan: Name,
    /// The wallet it is the custom plan of, if any.
    pub custom_for: Option<WalletId>,
    /// Published versions, version 1 first.
    pub versions: Vec<PlanVersionView>,
    /// The draft, if any.
    pub draft: Option<PlanVersionView>,
}

/// A version or draft of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanVersionView {
    /// Its number (0 for a draft).
    pub version: u32,
    /// The asset its prices are in.
    pub asset: AssetCode,
    /// Its rules, in listing order.
    pub rules: Vec<crate::PriceRule>,
    /// When it was written (a draft) or published.
    pub at: Timestamp,
}

/// A wallet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletView {
    /// External id.
    pub wallet: WalletId,
    /// Frozen.
    pub frozen: bool,
    /// Flagged after exhausted top-up attempts, in these assets.
    pub topup_flagged: Vec<AssetCode>,
    /// Metadata.
    pub metadata: Vec<(Name, Name)>,
    /// Balances.
    pub balances: Vec<BalanceView>,
    /// Grants with a remainder, in consumption order per asset (pending ones last).
    pub grants: Vec<GrantView>,
    /// Open holds.
    pub holds: Vec<HoldView>,
    /// Plan assignments: plan, version, from.
    pub plans: Vec<(Name, u32, Timestamp)>,
    /// Auto top-up rules.
    pub topup_rules: Vec<TopUpRule>,
    /// Margin of its usage.
    pub margin: MarginView,
    /// The payment processor's customer id.
    pub customer: Option<Name>,
    /// The default payment method top-ups charge.
    pub payment_method: Option<Name>,
    /// Per asset with auto top-up state: what is in flight and how the last attempts went.
    pub topups: Vec<TopUpStatus>,
}

/// The state of a wallet's auto top-up in one asset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopUpStatus {
    /// The asset.
    pub asset: AssetCode,
    /// The request waiting for its outcome: trigger, amount, when requested.
    pub in_flight: Option<(u64, Decimal, Timestamp)>,
    /// Failures in a row.
    pub failures: u32,
    /// Why the last request failed.
    pub last_failure: Option<Name>,
}

/// Which wallets [`Engine::list_wallets`] returns: every condition given must hold (the default
/// matches every wallet).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletFilter {
    /// Only wallets that are (`Some(true)`) or are not (`Some(false)`) frozen.
    pub frozen: Option<bool>,
    /// Only wallets that have (`Some(true)`) or have not (`Some(false)`) debt > 0 in some
    /// balance.
    pub in_debt: Option<bool>,
    /// Only wallets whose metadata holds every one of these key-value pairs.
    pub metadata: Vec<(Name, Name)>,
}

/// One page of a wallet listing of one shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletPage {
    /// The matching wallets, in creation order, as [`Query::Wallet`] shows them.
    pub wallets: Vec<WalletView>,
    /// The position to continue from, or `None` when the shard has no wallets left at or after
    /// it. A page may be short, even empty, while `next` is set: a call looks at no more than
    /// [`WALLET_SCAN_MAX`] wallets.
    pub next: Option<u32>,
}

/// A balance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceView {
    /// The asset.
    pub asset: AssetCode,
    /// Grants (pending too) − debt: the wallet's ledger account.
    #[serde(with = "dec")]
    pub ledger: Decimal,
    /// Active grants − holds − debt.
    #[serde(with = "dec")]
    pub available: Decimal,
    /// Held by open reserves.
    #[serde(with = "dec")]
    pub held: Decimal,
    /// Debt.
    #[serde(with = "dec")]
    pub debt: Decimal,
    /// Granted but not yet effective.
    #[serde(with = "dec")]
    pub pending: Decimal,
    /// Overdraft limit.
    #[serde(with = "dec")]
    pub overdraft: Decimal,
}

impl BalanceView {
    fn of(b: &Balance) -> BalanceView {
        BalanceView {
            asset: b.asset,
            ledger: b.ledger(),
            available: b.available(),
            held: b.held,
            debt: b.debt,
            pending: b.pending.iter().map(|g| g.remaining).sum(),
            overdraft: b.overdraft,
        }
    }

    fn empty(asset: AssetCode) -> BalanceView {
        BalanceView::of(&Balance::new(asset))
    }
}

/// A grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    /// Its id.
    pub id: GrantId,
    /// The asset.
    pub asset: AssetCode,
    /// Granted.
    #[serde(with = "dec")]
    pub amount: Decimal,
    /// Left.
    #[serde(with = "dec")]
    pub remaining: Decimal,
    /// Priority.
    pub priority: u32,
    /// Effective from.
    pub effective_at: Option<Timestamp>,
    /// Expires at.
    pub expires_at: Option<Timestamp>,
    /// Source.
    pub source: GrantSource,
}

impl GrantView {
    fn of(asset: AssetCode, g: &GrantState) -> GrantView {
        GrantView {
            id: g.id,
            asset,
            amount: g.amount,
            remaining: g.remaining,
            priority: g.priority,
            effective_at: g.effective_at,
            expires_at: g.expires_at,
            source: g.source,
        }
    }
}

/// An open hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldView {
    /// Its id.
    pub id: HoldId,
    /// The asset.
    pub asset: AssetCode,
    /// Held.
    #[serde(with = "dec")]
    pub amount: Decimal,
    /// Deadline.
    pub deadline: Timestamp,
}

/// A margin aggregate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarginView {
    /// Priced events.
    pub events: u64,
    /// Revenue in USD, net of refunds.
    #[serde(with = "dec")]
    pub revenue_usd: Decimal,
    /// Vendor cost in USD.
    #[serde(with = "dec")]
    pub cost_usd: Decimal,
    /// Refunds in USD.
    #[serde(with = "dec")]
    pub refunded_usd: Decimal,
    /// Revenue − cost.
    #[serde(with = "dec")]
    pub margin_usd: Decimal,
}

impl From<Margin> for MarginView {
    fn from(m: Margin) -> MarginView {
        MarginView {
            events: m.events,
            revenue_usd: m.revenue_usd.to_decimal(),
            cost_usd: m.cost_usd.to_decimal(),
            refunded_usd: m.refunded_usd.to_decimal(),
            margin_usd: m.margin_usd().to_decimal(),
        }
    }
}

/// A price preview.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceView {
    /// The asset.
    pub asset: AssetCode,
    /// The charge.
    #[serde(with = "dec")]
    pub amount: Decimal,
    /// The plan.
    pub plan: Name,
    /// Its version.
    pub version: u32,
    /// Index of the matching rule in the version.
    pub rule: u32,
}

/// One wallet's line of a draft test.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DraftTestRow {
    /// Events.
    pub events: u64,
    /// Revenue under the version in force, USD.
    #[serde(with = "dec")]
    pub revenue_current_usd: Decimal,
    /// Revenue under the draft, USD.
    #[serde(with = "dec")]
    pub revenue_draft_usd: Decimal,
    /// Vendor cost, USD.
    #[serde(with = "dec")]
    pub cost_usd: Decimal,
    /// Revenue − cost under the version in force.
    #[serde(with = "dec")]
    pub margin_current_usd: Decimal,
    /// Revenue − cost under the draft.
    #[serde(with = "dec")]
    pub margin_draft_usd: Decimal,
    /// Events the version in force could not price (no version, no matching rule, bad shape).
    pub unpriced_current: u64,
    /// Events the draft could not price.
    pub unpriced_draft: u64,
}

impl DraftTestRow {
    fn add(&mut self, other: &DraftTestRow) {
        self.events += other.events;
        self.revenue_current_usd = self
            .revenue_current_usd
            .saturating_add(other.revenue_current_usd);
        self.revenue_draft_usd = self
            .revenue_draft_usd
            .saturating_add(other.revenue_draft_usd);
        self.cost_usd = self.cost_usd.saturating_add(other.cost_usd);
        self.unpriced_current += other.unpriced_current;
        self.unpriced_draft += other.unpriced_draft;
        self.finish();
    }

    fn finish(&mut self) {
        self.margin_current_usd = self.revenue_current_usd.saturating_sub(self.cost_usd);
        self.margin_draft_usd = self.revenue_draft_usd.saturating_sub(self.cost_usd);
    }
}

/// The result of a draft test.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DraftTestReport {
    /// The plan.
    pub plan: Name,
    /// The version the draft is compared with (the latest published), if any.
    pub current_version: Option<u32>,
    /// Per wallet, by wallet id.
    pub wallets: Vec<(WalletId, DraftTestRow)>,
    /// All wallets.
    pub total: DraftTestRow,
}

impl Engine {
    /// Answers a query. Rejections are result codes, as for commands.
    pub fn query(&self, query: &Query) -> Result<QueryReply, ResultCode> {
        match query {
            Query::Wallet { wallet } => self.wallet_view(wallet).map(QueryReply::Wallet),
            Query::Balance { wallet, asset } => {
                let w = self.wallet(wallet)?;
                self.asset_code(asset)?;
                let view = w
                    .balance(asset)
                    .map_or(BalanceView::empty(*asset), BalanceView::of);
                Ok(QueryReply::Balance(view))
            }
            Query::Margin(scope) => self.margin(scope).map(|m| QueryReply::Margin(m.into())),
            Query::Asset { asset } => self.asset(asset).map(QueryReply::Asset),
            Query::Plans => {
                let state = self.state();
                let view = |version: u32, v: &crate::state::PlanVersion| PlanVersionView {
                    version,
                    asset: state.assets[v.asset as usize].code,
                    rules: v.rules.clone(),
                    at: v.at,
                };
                Ok(QueryReply::Plans(
                    state
                        .plans
                        .iter()
                        .map(|p| PlanView {
                            plan: p.name,
                            custom_for: p.custom_for,
                            versions: p
                                .versions
                                .iter()
                                .enumerate()
                                .map(|(i, v)| view(i as u32 + 1, v))
                                .collect(),
                            draft: p.draft.as_ref().map(|d| view(0, d)),
                        })
                        .collect(),
                ))
            }
            Query::PricePreview(event) => {
                let w = self.wallet_index(&event.wallet)?;
                let p = self.price(
                    w,
                    &event.product,
                    &event.quantities,
                    &event.attributes,
                    event.occurred_at,
                )?;
                let state = self.state();
                Ok(QueryReply::Price(PriceView {
                    asset: state.assets[p.asset as usize].code,
                    amount: p.amount,
                    plan: state.plans[p.plan as usize].name,
                    version: p.version,
                    rule: p.rule,
                }))
            }
            Query::DraftTest { plan, events } => {
                self.draft_test(plan, events).map(QueryReply::DraftTest)
            }
        }
    }

    fn wallet(&self, wallet: &WalletId) -> Result<&crate::state::Wallet, ResultCode> {
        let w = self.wallet_index(wallet)?;
        Ok(&self.state().wallets[w as usize])
    }

    fn asset_code(&self, asset: &AssetCode) -> Result<(), ResultCode> {
        self.asset_index(asset).map(drop)
    }

    /// Lists this shard's wallets in creation order, starting at position `from` (an index into
    /// [`crate::State::wallets`]; 0 for the first page, then the previous page's `next`).
    ///
    /// Looks at no more than [`WALLET_SCAN_MAX`] wallets and returns at most
    /// `limit.min(WALLET_PAGE_MAX)` of those that match `filter` (a `limit` of 0 counts as 1),
    /// so one call costs a bounded amount of work however few wallets match. `next` is the
    /// position after the last wallet looked at, or `None` when no wallet is left at or after
    /// it; a `from` past the end is an empty last page.
    pub fn list_wallets(&self, from: u32, limit: usize, filter: &WalletFilter) -> WalletPage {
        let wallets = &self.state().wallets;
        let limit = limit.clamp(1, WALLET_PAGE_MAX);
        let start = (from as usize).min(wallets.len());
        let end = start.saturating_add(WALLET_SCAN_MAX).min(wallets.len());
        // A wallet's metadata has at most `METADATA_MAX` pairs with distinct keys, so a filter
        // with more distinct pairs matches nothing; deduplicating also bounds the work per wallet.
        let mut wanted = filter.metadata.clone();
        wanted.sort_unstable();
        wanted.dedup();
        let possible = wanted.len() <= crate::engine::METADATA_MAX;
        let mut page = Vec::new();
        let mut next = end;
        if possible {
            for (position, w) in wallets.iter().enumerate().take(end).skip(start) {
                if filter.frozen.is_some_and(|f| w.frozen != f)
                    || filter
                        .in_debt
                        .is_some_and(|d| w.balances.iter().any(|b| b.debt > Decimal::ZERO) != d)
                    || !wanted.iter().all(|pair| w.metadata.contains(pair))
                {
                    continue;
                }
                page.push(self.view_of(w));
                if page.len() == limit {
                    next = position + 1;
                    break;
                }
            }
        }
        WalletPage {
            wallets: page,
            // Wallet positions are `u32` (see `wallet_index`), so this fits.
            next: (next < wallets.len()).then_some(next as u32),
        }
    }

    fn wallet_view(&self, wallet: &WalletId) -> Result<WalletView, ResultCode> {
        self.wallet(wallet).map(|w| self.view_of(w))
    }

    fn view_of(&self, w: &crate::state::Wallet) -> WalletView {
        let state = self.state();
        let mut grants = Vec::new();
        for b in &w.balances {
            grants.extend(
                b.grants
                    .iter()
                    .chain(&b.pending)
                    .map(|g| GrantView::of(b.asset, g)),
            );
        }
        WalletView {
            wallet: w.id,
            frozen: w.frozen,
            topup_flagged: w
                .topups
                .iter()
                .filter(|t| t.flagged)
                .map(|t| t.asset)
                .collect(),
            metadata: w.metadata.clone(),
            balances: w.balances.iter().map(BalanceView::of).collect(),
            grants,
            holds: w
                .holds
                .iter()
                .map(|h| HoldView {
                    id: h.id,
                    asset: h.asset,
                    amount: h.amount,
                    deadline: h.deadline,
                })
                .collect(),
            plans: w
                .plans
                .iter()
                .map(|a| (state.plans[a.plan as usize].name, a.version, a.from))
                .collect(),
            topup_rules: w.topups.iter().filter_map(|t| t.rule).collect(),
            margin: w.margin.into(),
            customer: w.customer,
            payment_method: w.payment_method,
            topups: w
                .topups
                .iter()
                .map(|t| TopUpStatus {
                    asset: t.asset,
                    in_flight: t.in_flight.map(|f| (f.trigger, f.amount, f.at)),
                    failures: t.failures,
                    last_failure: t.last_failure,
                })
                .collect(),
        }
    }

    fn margin(&self, scope: &MarginScope) -> Result<Margin, ResultCode> {
        let state = self.state();
        let margins = &state.margins;
        Ok(match scope {
            MarginScope::Total => margins.total,
            MarginScope::Wallet(wallet) => self.wallet(wallet)?.margin,
            MarginScope::Product(product) => {
                let p = state
                    .products
                    .iter()
                    .position(|p| p.code == *product)
                    .ok_or(ResultCode::UnknownProduct)?;
                margins
                    .by_product
                    .get(&(p as u32))
                    .copied()
                    .unwrap_or_default()
            }
            MarginScope::PlanVersion { plan, version } => {
                let p = state
                    .plans
                    .iter()
                    .position(|p| p.name == *plan)
                    .ok_or(ResultCode::UnknownPlan)?;
                if *version == 0 || *version as usize > state.plans[p].versions.len() {
                    return Err(ResultCode::UnknownPlanVersion);
                }
                margins
                    .by_plan
                    .get(&(p as u32, *version))
                    .copied()
                    .unwrap_or_default()
            }
            MarginScope::Hours { from, to } => {
                if to < from {
                    return Err(ResultCode::InvalidArgument);
                }
                let mut sum = Margin::default();
                let last = if to.hour() > from.hour() && to.0 == to.hour() * Timestamp::HOUR_US {
                    to.hour() - 1
                } else {
                    to.hour()
                };
                for (_, m) in margins.by_hour.range(from.hour()..=last.max(from.hour())) {
                    sum.merge(m);
                }
                sum
            }
        })
    }

    fn draft_test(
        &self,
        plan: &Name,
        events: &[UsageEvent],
    ) -> Result<DraftTestReport, ResultCode> {
        if events.len() > DRAFT_TEST_EVENTS_MAX {
            return Err(ResultCode::LimitExceeded);
        }
        let state = self.state();
        let plan = state
            .plans
            .iter()
            .find(|p| p.name == *plan)
            .ok_or(ResultCode::UnknownPlan)?;
        let draft = plan.draft.as_ref().ok_or(ResultCode::NoDraft)?;
        let current = plan.versions.last();
        let mut rows: BTreeMap<WalletId, DraftTestRow> = BTreeMap::new();
        let revenue = |version: &PlanVersion, event: &UsageEvent| -> Option<Decimal> {
            let (_, amount) = self
                .price_in(
                    version,
                    &event.product,
                    &event.quantities,
                    &event.attributes,
                )
                .ok()?;
            money::usd_valuation(amount, state.assets[version.asset as usize].usd_value).ok()
        };
        for event in events {
            let row = rows.entry(event.wallet).or_default();
            row.events += 1;
            row.cost_usd = row.cost_usd.saturating_add(event.cost_usd);
            let valid = self
                .check_shape(&event.product, &event.quantities, &event.attributes)
                .is_ok();
            match current.filter(|_| valid).and_then(|v| revenue(v, event)) {
                Some(r) => row.revenue_current_usd = row.revenue_current_usd.saturating_add(r),
                None => row.unpriced_current += 1,
            }
            match Some(draft)
                .filter(|_| valid)
                .and_then(|v| revenue(v, event))
            {
                Some(r) => row.revenue_draft_usd = row.revenue_draft_usd.saturating_add(r),
                None => row.unpriced_draft += 1,
            }
        }
        let mut total = DraftTestRow::default();
        let wallets = rows
            .into_iter()
            .map(|(w, mut row)| {
                row.finish();
                total.add(&row);
                (w, row)
            })
            .collect();
        Ok(DraftTestReport {
            plan: plan.name,
            current_version: current.map(|_| plan.versions.len() as u32),
            wallets,
            total,
        })
    }
}
