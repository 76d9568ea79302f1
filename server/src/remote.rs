//! The CLI client: the `tally` commands that talk to a *running* server over QUIC through
//! `tally_client::Client` (`tally wallet …`, `tally grant …`, `tally usage …`, `tally key …`, …).
//!
//! `main.rs` holds the clap definitions and turns each command into an [`Op`]; this module does
//! the rest. The `parse_*` functions are the clap value parsers, so a bad decimal, name or time is
//! refused before anything is sent. [`run`] then reads any input file, gives a mutating command
//! its idempotency id (`--id`, or a fresh random `u128` that is printed so a retry can reuse it),
//! connects in a current-thread tokio runtime, sends one request and prints the outcome: text, or
//! exactly one JSON document on stdout with `json`. Money is `Decimal` from strings throughout,
//! never a float.
//!
//! Exit status ([`run`]'s return value): [`EXIT_OK`] on success; [`EXIT_FAILED`] when the engine
//! or the server refused the request or no connection could be made (stderr says
//! `tally: error: rejected: <name> (<number>)` for a code); [`EXIT_INPUT`] for bad input found
//! before anything was sent.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rust_decimal::Decimal;
use serde_json::{json, Map, Value};
use tally_client::{Client, ClientConfig, Error};
use tally_engine::{
    AssetCode, BalanceView, Command, CreateWallet, DebitMode, DraftTestReport, DraftTestRow, Grant,
    GrantId, GrantSource, HoldId, Limit, MarginScope, MarginView, Name, PriceRule, Quantity, Query,
    Reply, ReplyValue, Request, RequestId, ReserveAmount, Timestamp, TopUpAmount, TopUpRule,
    UsageEvent, WalletId, TOPUP_PRIORITY,
};
use tally_net::message::{CheckpointInfo, HealthReport, ReserveItem, Scope, WalletInfo};
use tally_net::Answer;

/// The command succeeded.
pub const EXIT_OK: i32 = 0;
/// The engine or the server refused the request, or the connection failed.
pub const EXIT_FAILED: i32 = 1;
/// Bad input (an argument, a file) found before anything was sent.
pub const EXIT_INPUT: i32 = 2;

/// Where the server is and how to talk to it.
#[derive(Clone)]
pub struct Remote {
    /// `host:port`.
    pub addr: String,
    /// The server's certificate (PEM), pinned.
    pub cert: PathBuf,
    /// The API key.
    pub api_key: String,
    /// Print one JSON document instead of text.
    pub json: bool,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("addr", &self.addr)
            .field("cert", &self.cert)
            .field("api_key", &"<redacted>")
            .field("json", &self.json)
            .finish()
    }
}

/// The shape of a usage event given on the command line.
#[derive(Clone, Debug)]
pub struct EventSpec {
    /// The product (meter).
    pub product: Name,
    /// Quantities per dimension.
    pub quantities: Vec<Quantity>,
    /// Attributes.
    pub attributes: Vec<(Name, Name)>,
    /// When it happened; `None` is now.
    pub occurred_at: Option<Timestamp>,
}

/// Where a grant's credit comes from, as `--source` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// A payment (`topup`, also `purchase`); needs a payment id.
    TopUp,
    /// A promotion or goodwill credit (the default).
    Promotion,
    /// A refund issued as credit.
    Refund,
    /// A manual adjustment.
    Adjustment,
}

/// One CLI command, with its arguments already parsed.
#[derive(Clone, Debug)]
pub enum Op {
    /// `tally asset define`.
    DefineAsset {
        /// The code.
        code: AssetCode,
        /// Decimal places.
        scale: u32,
        /// USD per unit.
        usd_value: Decimal,
    },
    /// `tally asset price`.
    AssetPrice {
        /// The asset.
        asset: AssetCode,
        /// The price, or `None` to remove it.
        price: Option<tally_engine::TopUpPrice>,
    },
    /// `tally wallet billing`.
    Billing {
        /// The wallet.
        wallet: WalletId,
        /// The Stripe customer.
        customer: Option<Name>,
        /// The default payment method.
        payment_method: Option<Name>,
    },
    /// `tally product define`.
    DefineProduct {
        /// The code.
        code: Name,
        /// Its dimensions.
        dimensions: Vec<Name>,
    },
    /// `tally wallet create`.
    WalletCreate {
        /// The wallet.
        wallet: WalletId,
        /// Metadata.
        metadata: Vec<(Name, Name)>,
        /// Overdraft limits.
        overdraft: Vec<Limit>,
    },
    /// `tally wallet get`.
    WalletGet {
        /// The wallet.
        wallet: WalletId,
    },
    /// `tally wallet freeze`.
    Freeze {
        /// The wallet.
        wallet: WalletId,
    },
    /// `tally wallet unfreeze`.
    Unfreeze {
        /// The wallet.
        wallet: WalletId,
    },
    /// `tally wallet overdraft`.
    SetOverdraft {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
        /// The limit.
        limit: Decimal,
    },
    /// `tally grant`.
    Grant {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
        /// The amount.
        amount: Decimal,
        /// Priority; default 100 for top-ups, 0 otherwise.
        priority: Option<u32>,
        /// Usable from.
        effective_at: Option<Timestamp>,
        /// Expires at.
        expires_at: Option<Timestamp>,
        /// Source.
        source: SourceKind,
        /// The payment id (top-ups).
        payment_id: Option<Name>,
    },
    /// `tally usage`.
    Usage {
        /// The wallet.
        wallet: WalletId,
        /// The event.
        event: EventSpec,
        /// Vendor cost in USD.
        cost_usd: Decimal,
        /// Record mode instead of strict.
        record: bool,
    },
    /// `tally price`: a price preview.
    Price {
        /// The wallet.
        wallet: WalletId,
        /// The event.
        event: EventSpec,
    },
    /// `tally reserve`: a fixed amount (`asset` and `amount`) or a priced estimate (`product`).
    Reserve {
        /// The wallet.
        wallet: WalletId,
        /// Fixed: the asset.
        asset: Option<AssetCode>,
        /// Fixed: the amount.
        amount: Option<Decimal>,
        /// Estimate: the product.
        product: Option<Name>,
        /// Estimate: quantities.
        quantities: Vec<Quantity>,
        /// Estimate: attributes.
        attributes: Vec<(Name, Name)>,
        /// The deadline; `None` is now + `ttl_secs`.
        deadline: Option<Timestamp>,
        /// Seconds until the deadline when none is given.
        ttl_secs: u64,
    },
    /// `tally settle`.
    Settle {
        /// The wallet.
        wallet: WalletId,
        /// The hold.
        hold: u64,
        /// The actual usage.
        event: EventSpec,
        /// Vendor cost in USD.
        cost_usd: Decimal,
    },
    /// `tally release`.
    Release {
        /// The wallet.
        wallet: WalletId,
        /// The hold.
        hold: u64,
    },
    /// `tally refund`.
    Refund {
        /// The wallet.
        wallet: WalletId,
        /// The request id of the usage or settle.
        event: u128,
        /// The amount; `None` is all that is left.
        amount: Option<Decimal>,
    },
    /// `tally dispute` (or, with `won`, the dispute was won).
    Dispute {
        /// The wallet.
        wallet: WalletId,
        /// The top-up grant.
        grant: u64,
        /// Also freeze the wallet.
        freeze: bool,
        /// The dispute was won: credit the grant again.
        won: bool,
    },
    /// `tally adjust`.
    Adjust {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
        /// Signed amount.
        amount: Decimal,
        /// Why.
        reason: String,
    },
    /// `tally plan draft`.
    PlanDraft {
        /// The plan.
        plan: Name,
        /// JSON file holding `Vec<PriceRule>`.
        file: PathBuf,
        /// The plan's asset.
        asset: AssetCode,
        /// The wallet it is the custom plan of.
        custom_for: Option<WalletId>,
    },
    /// `tally plan publish`.
    PlanPublish {
        /// The plan.
        plan: Name,
    },
    /// `tally plan assign`.
    PlanAssign {
        /// The wallet.
        wallet: WalletId,
        /// The plan.
        plan: Name,
        /// The published version.
        version: u32,
        /// From; `None` is now.
        from: Option<Timestamp>,
    },
    /// `tally plan test`.
    PlanTest {
        /// The plan.
        plan: Name,
        /// JSON file holding `Vec<UsageEvent>`.
        events: PathBuf,
    },
    /// `tally topup-rule set`.
    TopUpSet {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
        /// Trigger below this available balance.
        threshold: Decimal,
        /// Charge this amount …
        fixed: Option<Decimal>,
        /// … or enough to reach this balance.
        target: Option<Decimal>,
        /// The saved payment method.
        payment_method: Name,
        /// Failures in a row before the wallet is flagged.
        attempts_max: u32,
        /// Least seconds between two requests.
        cooldown_secs: u64,
        /// Most per UTC day.
        daily_cap: Option<Decimal>,
        /// Most per UTC calendar month.
        monthly_cap: Option<Decimal>,
    },
    /// `tally topup-rule remove`.
    TopUpRemove {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
    },
    /// `tally balance`.
    Balance {
        /// The wallet.
        wallet: WalletId,
        /// The asset.
        asset: AssetCode,
    },
    /// `tally margin`; no scope at all is the total.
    Margin {
        /// One wallet.
        wallet: Option<WalletId>,
        /// One product.
        product: Option<Name>,
        /// One plan (with `version`).
        plan: Option<Name>,
        /// The plan's version.
        version: Option<u32>,
        /// Hours from (with `to`).
        from: Option<Timestamp>,
        /// Hours to.
        to: Option<Timestamp>,
    },
    /// `tally key create`.
    KeyCreate {
        /// The label.
        label: Name,
        /// The scope.
        scope: Scope,
    },
    /// `tally key revoke`.
    KeyRevoke {
        /// The key's id.
        key_id: u64,
    },
    /// `tally snapshot create` with an API key: an online snapshot.
    Snapshot,
    /// `tally health`.
    Health,
}

impl Op {
    /// Whether the command changes state and so carries an idempotency id.
    pub fn is_mutating(&self) -> bool {
        !matches!(
            self,
            Op::WalletGet { .. }
                | Op::Price { .. }
                | Op::PlanTest { .. }
                | Op::Balance { .. }
                | Op::Margin { .. }
                | Op::KeyCreate { .. }
                | Op::KeyRevoke { .. }
                | Op::Snapshot
                | Op::Health
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Argument parsers (clap value parsers): every one refuses bad input with a message.

/// An exact decimal (`10.00`, `-3.5`); no exponent, no float.
pub fn parse_decimal(s: &str) -> Result<Decimal, String> {
    let t = s.trim();
    let digits = t.strip_prefix('-').unwrap_or(t);
    let ok = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().filter(|&b| b == b'.').count() <= 1
        && digits.bytes().any(|b| b.is_ascii_digit());
    if !ok {
        return Err(format!("{s:?} is not a decimal number (e.g. 10.00)"));
    }
    Decimal::from_str_exact(t).map_err(|e| format!("{s:?} is not an exact decimal: {e}"))
}

/// A name (wallet, product, plan, dimension, …): 1 to 64 bytes, no control characters.
pub fn parse_name(s: &str) -> Result<Name, String> {
    Name::new(s).map_err(|e| format!("{s:?}: {e}"))
}

/// An asset code: 1 to 16 bytes.
pub fn parse_asset(s: &str) -> Result<AssetCode, String> {
    AssetCode::new(s).map_err(|e| format!("{s:?}: asset code: {e}"))
}

/// An RFC 3339 UTC time, e.g. `2026-11-24T18:00:00Z`.
pub fn parse_time(s: &str) -> Result<Timestamp, String> {
    crate::ops::parse_rfc3339(s)
        .map_err(|e| format!("{s:?} is not an RFC 3339 UTC time (e.g. 2026-11-24T18:00:00Z): {e}"))
}

fn split_pair<'a>(s: &'a str, what: &str) -> Result<(&'a str, &'a str), String> {
    s.split_once('=')
        .ok_or_else(|| format!("{s:?} is not {what} (expected KEY=VALUE)"))
}

/// `key=value`, both names.
pub fn parse_pair(s: &str) -> Result<(Name, Name), String> {
    let (k, v) = split_pair(s, "a key=value pair")?;
    Ok((parse_name(k)?, parse_name(v)?))
}

/// `dimension=value`, e.g. `tokens=1200`.
pub fn parse_quantity(s: &str) -> Result<Quantity, String> {
    let (k, v) = split_pair(s, "a quantity")?;
    Ok(Quantity {
        dimension: parse_name(k)?,
        value: parse_decimal(v)?,
    })
}

/// `ASSET=AMOUNT`, e.g. `USD=5.00`.
pub fn parse_limit(s: &str) -> Result<Limit, String> {
    let (k, v) = split_pair(s, "an asset amount")?;
    Ok(Limit {
        asset: parse_asset(k)?,
        amount: parse_decimal(v)?,
    })
}

/// `gateway` or `admin`.
pub fn parse_scope(s: &str) -> Result<Scope, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "gateway" => Ok(Scope::Gateway),
        "admin" => Ok(Scope::Admin),
        _ => Err(format!("{s:?} is not a scope (gateway or admin)")),
    }
}

/// `topup` (also `top-up`, `purchase`), `promotion`, `refund` or `adjustment`.
pub fn parse_source(s: &str) -> Result<SourceKind, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "topup" | "top-up" | "purchase" | "payment" => Ok(SourceKind::TopUp),
        "promotion" | "promo" => Ok(SourceKind::Promotion),
        "refund" => Ok(SourceKind::Refund),
        "adjustment" => Ok(SourceKind::Adjustment),
        _ => Err(format!(
            "{s:?} is not a grant source (topup, promotion, refund or adjustment)"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Ids and time.

/// A fresh random request id: 16 bytes of `/dev/urandom`, or (without it) the clock's
/// nanoseconds mixed with the process id.
pub fn fresh_request_id() -> u128 {
    let mut bytes = [0u8; 16];
    if let Ok(mut file) = std::fs::File::open("/dev/urandom") {
        if file.read_exact(&mut bytes).is_ok() {
            let id = u128::from_le_bytes(bytes);
            if id != 0 {
                return id;
            }
        }
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let pid = u64::from(std::process::id());
    let mix = |mut z: u64| {
        // splitmix64's finaliser.
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let high = mix(nanos as u64 ^ pid.rotate_left(32));
    let low = mix((nanos >> 64) as u64 ^ pid ^ high ^ 0x9e37_79b9_7f4a_7c15);
    (u128::from(high) << 64 | u128::from(low)).max(1)
}

/// Now, from the system clock.
pub fn now() -> Timestamp {
    let us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    Timestamp(i64::try_from(us).unwrap_or(i64::MAX))
}

/// A time as RFC 3339 UTC (`2026-11-24T18:00:00Z`, with microseconds when there are any).
pub fn format_rfc3339(t: Timestamp) -> String {
    t.to_rfc3339()
}

// ---------------------------------------------------------------------------------------------
// Building the request.

/// What is sent: one request to the server.
#[derive(Clone, Debug)]
enum Call {
    Command(Request),
    Reserve(ReserveItem),
    Query(Query),
    KeyCreate { label: Name, scope: Scope },
    KeyRevoke(u64),
    Snapshot,
    Health,
}

/// How to repeat a mutating request exactly: its id, and the times that defaulted to "now"
/// (a repeat with the same id but another time is an `IdempotencyConflict`).
#[derive(Clone, Debug)]
struct Retry {
    id: RequestId,
    flags: String,
}

impl Call {
    fn retry(&self) -> Option<Retry> {
        let (id, time) = match self {
            Call::Command(r) => (
                r.id,
                match &r.command {
                    Command::Usage(e) => Some(("--occurred-at", e.occurred_at)),
                    Command::Settle { usage, .. } => Some(("--occurred-at", usage.occurred_at)),
                    Command::AssignPlan { effective_from, .. } => Some(("--from", *effective_from)),
                    _ => None,
                },
            ),
            Call::Reserve(item) => (item.id, Some(("--deadline", item.deadline))),
            _ => return None,
        };
        let mut flags = format!("--id {}", id.0);
        if let Some((flag, time)) = time {
            flags += &format!(" {flag} {}", format_rfc3339(time));
        }
        Some(Retry { id, flags })
    }
}

fn event(
    wallet: WalletId,
    spec: EventSpec,
    cost_usd: Decimal,
    mode: DebitMode,
    now: Timestamp,
) -> UsageEvent {
    UsageEvent {
        wallet,
        product: spec.product,
        quantities: spec.quantities,
        attributes: spec.attributes,
        cost_usd,
        occurred_at: spec.occurred_at.unwrap_or(now),
        mode,
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} does not hold {what}: {e}", path.display()))
}

/// Turns an op into the request to send; reads input files. Errors are bad input.
fn prepare(op: Op, id: RequestId, now: Timestamp) -> Result<Call, String> {
    let command = |command: Command| Ok(Call::Command(Request { id, command }));
    match op {
        Op::DefineAsset {
            code,
            scale,
            usd_value,
        } => command(Command::DefineAsset {
            code,
            scale,
            usd_value,
        }),
        Op::DefineProduct { code, dimensions } => {
            command(Command::DefineProduct { code, dimensions })
        }
        Op::WalletCreate {
            wallet,
            metadata,
            overdraft,
        } => command(Command::CreateWallet(CreateWallet {
            wallet,
            overdraft,
            metadata,
        })),
        Op::WalletGet { wallet } => Ok(Call::Query(Query::Wallet { wallet })),
        Op::Freeze { wallet } => command(Command::Freeze { wallet }),
        Op::AssetPrice { asset, price } => command(Command::PriceAsset { asset, price }),
        Op::Billing {
            wallet,
            customer,
            payment_method,
        } => command(Command::SetBilling {
            wallet,
            customer,
            payment_method,
        }),
        Op::Unfreeze { wallet } => command(Command::Unfreeze { wallet }),
        Op::SetOverdraft {
            wallet,
            asset,
            limit,
        } => command(Command::SetOverdraft {
            wallet,
            asset,
            limit,
        }),
        Op::Grant {
            wallet,
            asset,
            amount,
            priority,
            effective_at,
            expires_at,
            source,
            payment_id,
        } => {
            let source = match (source, payment_id) {
                (SourceKind::TopUp, Some(payment_id)) => GrantSource::TopUp { payment_id },
                (SourceKind::TopUp, None) => {
                    return Err("a top-up grant needs --payment-id".into());
                }
                (_, Some(_)) => {
                    return Err("--payment-id goes with --source topup only".into());
                }
                (SourceKind::Promotion, None) => GrantSource::Promotion,
                (SourceKind::Refund, None) => GrantSource::Refund,
                (SourceKind::Adjustment, None) => GrantSource::Adjustment,
            };
            let default_priority = match source {
                GrantSource::TopUp { .. } => TOPUP_PRIORITY,
                _ => 0,
            };
            command(Command::Grant(Grant {
                wallet,
                asset,
                amount,
                priority: priority.unwrap_or(default_priority),
                effective_at,
                expires_at,
                source,
            }))
        }
        Op::Usage {
            wallet,
            event: spec,
            cost_usd,
            record,
        } => {
            let mode = if record {
                DebitMode::Record
            } else {
                DebitMode::Strict
            };
            command(Command::Usage(event(wallet, spec, cost_usd, mode, now)))
        }
        Op::Price {
            wallet,
            event: spec,
        } => Ok(Call::Query(Query::PricePreview(event(
            wallet,
            spec,
            Decimal::ZERO,
            DebitMode::Strict,
            now,
        )))),
        Op::Reserve {
            wallet,
            asset,
            amount,
            product,
            quantities,
            attributes,
            deadline,
            ttl_secs,
        } => {
            let amount = match (asset, amount, product) {
                (Some(asset), Some(amount), None)
                    if quantities.is_empty() && attributes.is_empty() =>
                {
                    ReserveAmount::Fixed { asset, amount }
                }
                (None, None, Some(product)) => ReserveAmount::Estimate {
                    product,
                    quantities,
                    attributes,
                },
                _ => {
                    return Err(
                        "say what to hold: --asset and --amount, or --product with --qty \
                                (and --attr)"
                            .into(),
                    )
                }
            };
            let ttl_us = i64::try_from(ttl_secs)
                .ok()
                .and_then(|s| s.checked_mul(Timestamp::SECOND_US))
                .ok_or("--ttl is too large")?;
            Ok(Call::Reserve(ReserveItem {
                id,
                wallet,
                amount,
                deadline: deadline.unwrap_or(now.add_us(ttl_us)),
            }))
        }
        Op::Settle {
            wallet,
            hold,
            event: spec,
            cost_usd,
        } => command(Command::Settle {
            wallet,
            hold: HoldId(hold),
            usage: event(wallet, spec, cost_usd, DebitMode::Record, now),
        }),
        Op::Release { wallet, hold } => command(Command::Release {
            wallet,
            hold: HoldId(hold),
        }),
        Op::Refund {
            wallet,
            event,
            amount,
        } => command(Command::Refund {
            wallet,
            event: RequestId(event),
            amount,
        }),
        Op::Dispute {
            wallet,
            grant,
            freeze,
            won,
        } => {
            if won {
                if freeze {
                    return Err("--freeze does not go with --won".into());
                }
                command(Command::DisputeWon {
                    wallet,
                    grant: GrantId(grant),
                })
            } else {
                command(Command::Dispute {
                    wallet,
                    grant: GrantId(grant),
                    freeze,
                })
            }
        }
        Op::Adjust {
            wallet,
            asset,
            amount,
            reason,
        } => {
            if reason.trim().is_empty() {
                return Err("--reason must not be empty".into());
            }
            command(Command::Adjust {
                wallet,
                asset,
                amount,
                reason,
            })
        }
        Op::PlanDraft {
            plan,
            file,
            asset,
            custom_for,
        } => {
            let rules: Vec<PriceRule> = read_json(&file, "a JSON list of price rules")?;
            command(Command::DraftPlan {
                plan,
                custom_for,
                asset,
                rules,
            })
        }
        Op::PlanPublish { plan } => command(Command::PublishPlan { plan }),
        Op::PlanAssign {
            wallet,
            plan,
            version,
            from,
        } => command(Command::AssignPlan {
            wallet,
            plan,
            version,
            effective_from: from.unwrap_or(now),
        }),
        Op::PlanTest { plan, events } => {
            let events: Vec<UsageEvent> = read_json(&events, "a JSON list of usage events")?;
            Ok(Call::Query(Query::DraftTest { plan, events }))
        }
        Op::TopUpSet {
            wallet,
            asset,
            threshold,
            fixed,
            target,
            payment_method,
            attempts_max,
            cooldown_secs,
            daily_cap,
            monthly_cap,
        } => {
            let amount = match (fixed, target) {
                (Some(a), None) => TopUpAmount::Fixed(a),
                (None, Some(t)) => TopUpAmount::Target(t),
                _ => return Err("say how much to top up: --amount or --target".into()),
            };
            let cooldown_us = i64::try_from(cooldown_secs)
                .ok()
                .and_then(|s| s.checked_mul(Timestamp::SECOND_US))
                .ok_or("--cooldown is too large")?;
            command(Command::SetTopUpRule {
                wallet,
                rule: TopUpRule {
                    asset,
                    threshold,
                    amount,
                    attempts_max,
                    cooldown_us,
                    daily_cap,
                    monthly_cap,
                    payment_method,
                },
            })
        }
        Op::TopUpRemove { wallet, asset } => command(Command::RemoveTopUpRule { wallet, asset }),
        Op::Balance { wallet, asset } => Ok(Call::Query(Query::Balance { wallet, asset })),
        Op::Margin {
            wallet,
            product,
            plan,
            version,
            from,
            to,
        } => {
            let scope = match (wallet, product, plan, version, from, to) {
                (None, None, None, None, None, None) => MarginScope::Total,
                (Some(w), None, None, None, None, None) => MarginScope::Wallet(w),
                (None, Some(p), None, None, None, None) => MarginScope::Product(p),
                (None, None, Some(plan), Some(version), None, None) => {
                    MarginScope::PlanVersion { plan, version }
                }
                (None, None, None, None, Some(from), Some(to)) => MarginScope::Hours { from, to },
                _ => {
                    return Err("give one margin scope: --wallet W, --product P, --plan P \
                                --version N, or --from T --to T (none: the total)"
                        .into())
                }
            };
            Ok(Call::Query(Query::Margin(scope)))
        }
        Op::KeyCreate { label, scope } => Ok(Call::KeyCreate { label, scope }),
        Op::KeyRevoke { key_id } => Ok(Call::KeyRevoke(key_id)),
        Op::Snapshot => Ok(Call::Snapshot),
        Op::Health => Ok(Call::Health),
    }
}

// ---------------------------------------------------------------------------------------------
// Running.

/// What came back.
#[derive(Debug)]
enum Outcome {
    Reply(Reply),
    Answer(Box<Answer>),
    KeyCreated { key_id: u64, secret: String },
    Done,
    Snapshot(Vec<CheckpointInfo>),
    Health(HealthReport),
}

async fn execute(client: &Client, call: &Call) -> Result<Outcome, Error> {
    Ok(match call {
        Call::Command(request) => Outcome::Reply(client.command(request.clone()).await?),
        Call::Reserve(item) => Outcome::Reply(client.reserve(item.clone()).await?),
        Call::Query(query) => Outcome::Answer(Box::new(client.query(query.clone()).await?)),
        Call::KeyCreate { label, scope } => {
            let (key_id, secret) = client.create_key(*label, *scope).await?;
            Outcome::KeyCreated { key_id, secret }
        }
        Call::KeyRevoke(key_id) => {
            client.revoke_key(*key_id).await?;
            Outcome::Done
        }
        Call::Snapshot => Outcome::Snapshot(client.snapshot().await?),
        Call::Health => Outcome::Health(client.health().await?),
    })
}

/// Runs one CLI command against the server and prints its outcome; returns the exit status.
/// `id` is `--id` (mutating commands only; `None` draws a fresh random one).
pub fn run(remote: &Remote, id: Option<u128>, op: Op) -> i32 {
    let printer = Printer { json: remote.json };
    let mutating = op.is_mutating();
    let id = RequestId(id.unwrap_or_else(fresh_request_id));
    let call = match prepare(op, id, now()) {
        Ok(call) => call,
        Err(why) => {
            printer.input_error(&why);
            return EXIT_INPUT;
        }
    };
    let retry = if mutating { call.retry() } else { None };
    let config = match ClientConfig::from_files(&remote.addr, &remote.cert, &remote.api_key) {
        Ok(config) => config,
        Err(e) => {
            printer.input_error(&e.to_string());
            return EXIT_INPUT;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            printer.failure(
                &Error::Config(format!("cannot start a runtime: {e}")),
                retry.as_ref(),
            );
            return EXIT_FAILED;
        }
    };
    let result = runtime.block_on(async {
        let client = Client::connect(config).await?;
        let outcome = execute(&client, &call).await;
        // Waits until the close reached the server, so it frees the connection at once.
        client.close().await;
        outcome
    });
    match result {
        Ok(outcome) => {
            printer.success(&call, retry.as_ref(), outcome);
            EXIT_OK
        }
        Err(error) => {
            printer.failure(&error, retry.as_ref());
            EXIT_FAILED
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Printing.

struct Printer {
    json: bool,
}

fn id_json(id: RequestId) -> Value {
    Value::String(id.0.to_string())
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or_else(|e| Value::String(format!("unprintable: {e}")))
}

fn print_json(value: &Value) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("tally: error: cannot print JSON: {e}"),
    }
}

impl Printer {
    fn input_error(&self, why: &str) {
        eprintln!("tally: error: {why} (nothing was sent)");
        if self.json {
            print_json(&json!({
                "ok": false,
                "code": null,
                "name": "InvalidInput",
                "message": why,
            }));
        }
    }

    fn failure(&self, error: &Error, retry: Option<&Retry>) {
        let (code, name) = match error {
            Error::Rejected { code, .. } => (Some(*code as u16), code.name()),
            Error::Transport { code, .. } => (Some(*code as u16), code.name()),
            Error::Connect(_) => (None, "Connect"),
            Error::ConnectionLost(_) => (None, "ConnectionLost"),
            Error::Protocol(_) => (None, "Protocol"),
            Error::Config(_) => (None, "Config"),
        };
        match error {
            Error::Transport { code, message } => {
                eprintln!("tally: error: rejected: {code}: {message}")
            }
            other => eprintln!("tally: error: {other}"),
        }
        let reply = match error {
            Error::Rejected {
                reply: Some(reply), ..
            } => Some(reply),
            _ => None,
        };
        if let Some(Reply {
            value:
                ReplyValue::Shortfall {
                    asset,
                    spendable,
                    required,
                },
            ..
        }) = reply
        {
            eprintln!("tally: spendable {spendable} {asset}, required {required} {asset}");
        }
        if let Some(retry) = retry {
            match error {
                // The engine answered; a repeat gets the same answer.
                Error::Rejected { .. } => eprintln!("tally: request id {}", retry.id.0),
                _ => eprintln!(
                    "tally: request id {}: it may have been applied or not; to retry it \
                     safely, repeat the command with {}",
                    retry.id.0, retry.flags
                ),
            }
        }
        if self.json {
            let mut doc = json!({
                "ok": false,
                "code": code,
                "name": name,
                "message": error.to_string(),
            });
            if let Some(retry) = retry {
                doc["id"] = id_json(retry.id);
                doc["retry"] = Value::String(retry.flags.clone());
            }
            if let Some(reply) = reply {
                doc["reply"] = to_json(reply);
            }
            print_json(&doc);
        }
    }

    fn success(&self, call: &Call, retry: Option<&Retry>, outcome: Outcome) {
        let (text, mut doc) = render(call, &outcome);
        if self.json {
            let mut out = Map::new();
            out.insert("ok".into(), Value::Bool(true));
            if let Some(retry) = retry {
                out.insert("id".into(), id_json(retry.id));
                out.insert("retry".into(), Value::String(retry.flags.clone()));
            }
            if let Value::Object(fields) = doc.take() {
                out.extend(fields);
            }
            print_json(&Value::Object(out));
        } else {
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            if let Some(retry) = retry {
                println!("request id: {} (repeat with: {})", retry.id.0, retry.flags);
            }
        }
    }
}

fn amount(value: Decimal, asset: impl fmt::Display) -> String {
    format!("{value} {asset}")
}

fn charge_text(
    asset: AssetCode,
    charged: Decimal,
    debt_added: Decimal,
    available: Decimal,
) -> String {
    let [charged, available, debt_added_text] =
        <[String; 3]>::try_from(same_scale(&[charged, available, debt_added]))
            .expect("three amounts");
    let mut text = format!("charged {charged} {asset}, remaining {available} {asset}");
    if !debt_added.is_zero() {
        text += &format!(", debt added {debt_added_text} {asset}");
    }
    text
}

fn reply_text(command: &Command, value: &ReplyValue) -> String {
    let generic = || match *value {
        ReplyValue::None => "done".to_string(),
        ReplyValue::Grant { grant, debt_paid } => {
            let mut text = format!("grant {}", grant.0);
            if !debt_paid.is_zero() {
                text += &format!(", {debt_paid} of it paid debt");
            }
            text
        }
        ReplyValue::Charge {
            asset,
            charged,
            debt_added,
            available,
        } => charge_text(asset, charged, debt_added, available),
        ReplyValue::Hold {
            hold,
            asset,
            amount: held,
            available,
        } => format!(
            "hold {} of {}, remaining {}",
            hold.0,
            amount(held, asset),
            amount(available, asset)
        ),
        ReplyValue::Refund {
            grant,
            refunded,
            refundable,
        } => format!(
            "refunded {refunded} as grant {}, {refundable} left to refund",
            grant.0
        ),
        ReplyValue::Dispute {
            clawed_back,
            debt_added,
        } => format!("clawed back {clawed_back}, debt added {debt_added}"),
        ReplyValue::Version { version } => format!("version {version}"),
        ReplyValue::Shortfall {
            asset,
            spendable,
            required,
        } => format!(
            "spendable {}, required {}",
            amount(spendable, asset),
            amount(required, asset)
        ),
    };
    match (command, value) {
        (
            Command::DefineAsset {
                code,
                scale,
                usd_value,
            },
            _,
        ) => format!("asset {code} defined (scale {scale}, 1 {code} = {usd_value} USD)"),
        (Command::DefineProduct { code, dimensions }, _) => format!(
            "product {code} defined (dimensions: {})",
            dimensions
                .iter()
                .map(Name::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        (
            Command::DraftPlan {
                plan, asset, rules, ..
            },
            _,
        ) => format!(
            "draft of plan {plan} written ({} rules, in {asset})",
            rules.len()
        ),
        (Command::PublishPlan { plan }, ReplyValue::Version { version }) => {
            format!("published plan {plan} version {version}")
        }
        (Command::CreateWallet(c), _) => format!("wallet {} created", c.wallet),
        (
            Command::SetOverdraft {
                wallet,
                asset,
                limit,
            },
            _,
        ) => format!("overdraft of {wallet} set to {}", amount(*limit, asset)),
        (Command::Freeze { wallet }, _) => format!("wallet {wallet} frozen"),
        (Command::Unfreeze { wallet }, _) => format!("wallet {wallet} unfrozen"),
        (
            Command::AssignPlan {
                wallet,
                plan,
                version,
                effective_from,
            },
            _,
        ) => format!(
            "wallet {wallet} on plan {plan} version {version} from {}",
            format_rfc3339(*effective_from)
        ),
        (Command::Grant(g), ReplyValue::Grant { grant, debt_paid }) => {
            let mut text = format!(
                "granted {} to {} as grant {}",
                amount(g.amount, g.asset),
                g.wallet,
                grant.0
            );
            if !debt_paid.is_zero() {
                text += &format!(" ({} of it paid debt)", amount(*debt_paid, g.asset));
            }
            text
        }
        (Command::Settle { hold, .. }, _) => format!("settled hold {}: {}", hold.0, generic()),
        (Command::Release { hold, .. }, _) => format!("released hold {}", hold.0),
        (Command::Dispute { grant, freeze, .. }, _) => format!(
            "disputed grant {}: {}{}",
            grant.0,
            generic(),
            if *freeze { "; wallet frozen" } else { "" }
        ),
        (Command::DisputeWon { grant, .. }, ReplyValue::Grant { grant: new, .. }) => format!(
            "dispute of grant {} won: credited again as grant {}",
            grant.0, new.0
        ),
        (Command::Adjust { .. }, ReplyValue::Grant { .. }) => {
            format!("adjusted: credit as {}", generic())
        }
        (Command::Adjust { .. }, _) => format!("adjusted: {}", generic()),
        (Command::SetTopUpRule { wallet, rule }, _) => {
            format!("top-up rule of {wallet} in {} set", rule.asset)
        }
        (Command::RemoveTopUpRule { wallet, asset }, _) => {
            format!("top-up rule of {wallet} in {asset} removed")
        }
        (Command::PriceAsset { asset, price }, _) => match price {
            Some(p) => format!(
                "1 {asset} costs {} {} in top-ups",
                p.unit_amount,
                p.currency.as_str().to_uppercase()
            ),
            None => format!("top-up price of {asset} removed"),
        },
        (Command::SetBilling { wallet, .. }, _) => format!("billing of {wallet} set"),
        _ => generic(),
    }
}

fn render(call: &Call, outcome: &Outcome) -> (String, Value) {
    match (call, outcome) {
        (Call::Command(request), Outcome::Reply(reply)) => (
            format!("ok: {}", reply_text(&request.command, &reply.value)),
            json!({ "reply": to_json(reply) }),
        ),
        (Call::Reserve(item), Outcome::Reply(reply)) => {
            let request = Request::from(item.clone());
            (
                format!("ok: {}", reply_text(&request.command, &reply.value)),
                json!({ "reply": to_json(reply) }),
            )
        }
        (_, Outcome::Answer(answer)) => render_answer(answer),
        (Call::KeyCreate { label, scope }, Outcome::KeyCreated { key_id, secret }) => (
            format!(
                "ok: created {} key {key_id} ({label})\nsecret: {secret}\n\
                 (shown once: the server keeps only its hash)\n",
                scope_name(*scope)
            ),
            json!({
                "key_id": key_id,
                "label": label,
                "scope": scope_name(*scope),
                "secret": secret,
            }),
        ),
        (Call::KeyRevoke(key_id), _) => (
            format!("ok: key {key_id} revoked"),
            json!({ "key_id": key_id, "revoked": true }),
        ),
        (_, Outcome::Snapshot(infos)) => {
            let rows = infos
                .iter()
                .map(|c| {
                    vec![
                        c.shard.to_string(),
                        c.lsn.to_string(),
                        format!("{:016x}", c.digest),
                        c.stall_us.to_string(),
                    ]
                })
                .collect();
            (
                format!(
                    "ok: online snapshot of {} shards\n{}",
                    infos.len(),
                    table(&["shard", "lsn", "digest", "stall µs"], rows)
                ),
                json!({
                    "checkpoints": infos.iter().map(|c| json!({
                        "shard": c.shard,
                        "lsn": c.lsn,
                        "digest": format!("{:016x}", c.digest),
                        "stall_us": c.stall_us,
                    })).collect::<Vec<_>>(),
                }),
            )
        }
        (_, Outcome::Health(h)) => (
            format!(
                "ok: {} — {}/{} shards running, up {}s, {} connections open\n\
                 rejected: {} unauthenticated, {} bad key, {} out of scope\n{}",
                h.server,
                h.shards_running,
                h.shards,
                h.uptime_us / 1_000_000,
                h.connections_open,
                h.rejected_unauthenticated,
                h.rejected_key,
                h.rejected_scope,
                h.sinks
                    .iter()
                    .map(|s| format!(
                        "sink {}: {} behind, {:.3}s\n",
                        s.name,
                        s.effects,
                        s.lag_us as f64 / 1e6
                    ))
                    .collect::<String>()
            ),
            json!({
                "health": {
                    "server": h.server,
                    "shards": h.shards,
                    "shards_running": h.shards_running,
                    "uptime_us": h.uptime_us,
                    "connections_open": h.connections_open,
                    "rejected_unauthenticated": h.rejected_unauthenticated,
                    "rejected_key": h.rejected_key,
                    "rejected_scope": h.rejected_scope,
                    "sinks": h.sinks.iter().map(|s| json!({
                        "name": s.name,
                        "lag_effects": s.effects,
                        "lag_us": s.lag_us,
                    })).collect::<Vec<_>>(),
                }
            }),
        ),
        (_, other) => (format!("ok: {other:?}"), json!({})),
    }
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Gateway => "gateway",
        Scope::Admin => "admin",
    }
}

fn render_answer(answer: &Answer) -> (String, Value) {
    match answer {
        Answer::Wallet(w) => (wallet_text(w), json!({ "wallet": wallet_json(w) })),
        Answer::Balance(b) => (
            table(&BALANCE_HEADER, vec![balance_row(b)]),
            json!({ "balance": to_json(b) }),
        ),
        Answer::Margin(m) => (margin_text(m), json!({ "margin": to_json(m) })),
        Answer::Price(p) => (
            format!(
                "price: {} (plan {} version {}, rule {})",
                amount(p.amount, p.asset),
                p.plan,
                p.version,
                p.rule
            ),
            json!({ "price": to_json(p) }),
        ),
        Answer::Asset(a) => (
            format!(
                "asset {}: scale {}, worth {} USD, top-up price {}",
                a.code,
                a.scale,
                a.usd_value.normalize(),
                a.topup_price.map_or("none".to_string(), |p| format!(
                    "{} {}",
                    p.unit_amount.normalize(),
                    p.currency
                ))
            ),
            json!({ "asset": to_json(a) }),
        ),
        Answer::Plans(plans) => (
            plans
                .iter()
                .map(|p| {
                    format!(
                        "plan {}{}: {} published version(s){}",
                        p.plan,
                        p.custom_for
                            .map(|w| format!(" (custom for {w})"))
                            .unwrap_or_default(),
                        p.versions.len(),
                        if p.draft.is_some() { ", a draft" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            json!({ "plans": to_json(plans) }),
        ),
        Answer::DraftTest(report) => (
            draft_test_text(report),
            json!({ "report": to_json(report) }),
        ),
    }
}

const BALANCE_HEADER: [&str; 7] = [
    "asset",
    "available",
    "ledger",
    "held",
    "debt",
    "pending",
    "overdraft",
];

/// Amounts written with as many decimal places as the most precise of them, so that a zero reads
/// `0.00` beside `0.98` (the engine keeps exact values, whose scale depends on how they were
/// computed).
fn same_scale(values: &[Decimal]) -> Vec<String> {
    let scale = values.iter().map(|v| v.scale()).max().unwrap_or(0);
    values
        .iter()
        .map(|v| {
            let mut v = *v;
            v.rescale(scale);
            v.to_string()
        })
        .collect()
}

fn balance_row(b: &BalanceView) -> Vec<String> {
    let mut row = vec![b.asset.to_string()];
    row.extend(same_scale(&[
        b.available,
        b.ledger,
        b.held,
        b.debt,
        b.pending,
        b.overdraft,
    ]));
    row
}

fn margin_text(m: &MarginView) -> String {
    let [revenue, cost, refunded, margin] = <[String; 4]>::try_from(same_scale(&[
        m.revenue_usd,
        m.cost_usd,
        m.refunded_usd,
        m.margin_usd,
    ]))
    .expect("four amounts");
    format!(
        "margin: {} events, revenue {revenue} USD, cost {cost} USD, refunded {refunded} USD, \
         margin {margin} USD",
        m.events
    )
}

fn time_or_dash(t: Option<Timestamp>) -> String {
    t.map_or_else(|| "-".into(), format_rfc3339)
}

fn source_text(source: &GrantSource) -> String {
    match source {
        GrantSource::TopUp { payment_id } => format!("topup ({payment_id})"),
        GrantSource::Promotion => "promotion".into(),
        GrantSource::Refund => "refund".into(),
        GrantSource::Adjustment => "adjustment".into(),
    }
}

fn topup_amount_text(a: &TopUpAmount) -> String {
    match a {
        TopUpAmount::Fixed(d) => format!("fixed {d}"),
        TopUpAmount::Target(d) => format!("up to {d}"),
    }
}

fn wallet_text(w: &WalletInfo) -> String {
    let mut out = format!(
        "wallet   {}\nfrozen   {}\n",
        w.wallet,
        if w.frozen { "yes" } else { "no" }
    );
    if !w.metadata.is_empty() {
        let pairs: Vec<String> = w.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out += &format!("metadata {}\n", pairs.join(" "));
    }
    if !w.topup_flagged.is_empty() {
        let assets: Vec<&str> = w.topup_flagged.iter().map(AssetCode::as_str).collect();
        out += &format!("top-up flagged in {}\n", assets.join(", "));
    }
    if let Some(customer) = &w.customer {
        out += &format!("customer {customer}\n");
    }
    if let Some(method) = &w.payment_method {
        out += &format!("payment  {method}\n");
    }
    for (plan, version, from) in &w.plans {
        out += &format!(
            "plan     {plan} version {version} from {}\n",
            format_rfc3339(*from)
        );
    }
    out += "\nbalances\n";
    out += &table(
        &BALANCE_HEADER,
        w.balances.iter().map(balance_row).collect(),
    );
    if !w.grants.is_empty() {
        out += "\ngrants\n";
        out += &table(
            &[
                "id",
                "asset",
                "amount",
                "remaining",
                "priority",
                "source",
                "effective",
                "expires",
            ],
            w.grants
                .iter()
                .map(|g| {
                    vec![
                        g.id.0.to_string(),
                        g.asset.to_string(),
                        g.amount.to_string(),
                        g.remaining.to_string(),
                        g.priority.to_string(),
                        source_text(&g.source),
                        time_or_dash(g.effective_at),
                        time_or_dash(g.expires_at),
                    ]
                })
                .collect(),
        );
    }
    if !w.holds.is_empty() {
        out += "\nholds\n";
        out += &table(
            &["id", "asset", "amount", "deadline"],
            w.holds
                .iter()
                .map(|h| {
                    vec![
                        h.id.0.to_string(),
                        h.asset.to_string(),
                        h.amount.to_string(),
                        format_rfc3339(h.deadline),
                    ]
                })
                .collect(),
        );
    }
    if !w.topup_rules.is_empty() {
        out += "\ntop-up rules\n";
        out += &table(
            &[
                "asset",
                "threshold",
                "amount",
                "attempts",
                "cooldown s",
                "daily cap",
                "method",
            ],
            w.topup_rules
                .iter()
                .map(|r| {
                    vec![
                        r.asset.to_string(),
                        r.threshold.to_string(),
                        topup_amount_text(&r.amount),
                        r.attempts_max.to_string(),
                        (r.cooldown_us / Timestamp::SECOND_US).to_string(),
                        r.daily_cap.map_or_else(|| "-".into(), |d| d.to_string()),
                        r.payment_method.to_string(),
                    ]
                })
                .collect(),
        );
    }
    if !w.topups.is_empty() {
        out += "\ntop-ups\n";
        out += &table(
            &[
                "asset",
                "in flight",
                "amount",
                "requested",
                "failures",
                "last failure",
            ],
            w.topups
                .iter()
                .map(|t| {
                    let (trigger, amount, at) = match t.in_flight {
                        Some((trigger, amount, at)) => {
                            (trigger.to_string(), amount.to_string(), format_rfc3339(at))
                        }
                        None => ("-".into(), "-".into(), "-".into()),
                    };
                    vec![
                        t.asset.to_string(),
                        trigger,
                        amount,
                        at,
                        t.failures.to_string(),
                        t.last_failure.map_or_else(|| "-".into(), |r| r.to_string()),
                    ]
                })
                .collect(),
        );
    }
    out += "\n";
    out += &margin_text(&w.margin);
    out += "\n";
    out
}

fn wallet_json(w: &WalletInfo) -> Value {
    let metadata: Map<String, Value> = w
        .metadata
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    json!({
        "wallet": w.wallet,
        "frozen": w.frozen,
        "topup_flagged": to_json(&w.topup_flagged),
        "metadata": metadata,
        "balances": to_json(&w.balances),
        "grants": to_json(&w.grants),
        "holds": w.holds.iter().map(|h| json!({
            "id": h.id.0,
            "asset": h.asset,
            "amount": h.amount.to_string(),
            "deadline": h.deadline.0,
        })).collect::<Vec<_>>(),
        "plans": w.plans.iter().map(|(plan, version, from)| json!({
            "plan": plan,
            "version": version,
            "from": from.0,
        })).collect::<Vec<_>>(),
        "topup_rules": to_json(&w.topup_rules),
        "customer": w.customer,
        "payment_method": w.payment_method,
        "topups": to_json(&w.topups),
        "margin": to_json(&w.margin),
    })
}

fn draft_row(label: String, r: &DraftTestRow) -> Vec<String> {
    vec![
        label,
        r.events.to_string(),
        r.revenue_current_usd.to_string(),
        r.revenue_draft_usd.to_string(),
        r.cost_usd.to_string(),
        r.margin_current_usd.to_string(),
        r.margin_draft_usd.to_string(),
        r.unpriced_current.to_string(),
        r.unpriced_draft.to_string(),
    ]
}

fn draft_test_text(report: &DraftTestReport) -> String {
    let current = report.current_version.map_or_else(
        || "no published version".to_string(),
        |v| format!("version {v}"),
    );
    let mut rows: Vec<Vec<String>> = report
        .wallets
        .iter()
        .map(|(w, r)| draft_row(w.to_string(), r))
        .collect();
    rows.push(draft_row("total".into(), &report.total));
    format!(
        "draft of plan {} against {current} (USD)\n{}",
        report.plan,
        table(
            &[
                "wallet",
                "events",
                "revenue now",
                "revenue draft",
                "cost",
                "margin now",
                "margin draft",
                "unpriced now",
                "unpriced draft",
            ],
            rows
        )
    )
}

/// A left-aligned text table.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out += cell;
            } else {
                out += &format!("{cell:<w$}  ");
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_of_one_line_share_a_scale() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert_eq!(
            same_scale(&[d("0"), d("0.98"), d("12.5")]),
            ["0.00", "0.98", "12.50"]
        );
        assert_eq!(same_scale(&[d("3"), d("0")]), ["3", "0"]);
    }

    #[test]
    fn decimals_are_exact_and_refuse_floats_and_junk() {
        assert_eq!(parse_decimal("10.00").unwrap().to_string(), "10.00");
        assert_eq!(parse_decimal("-3.5").unwrap().to_string(), "-3.5");
        for bad in ["", "1e5", "1.2.3", "abc", "0x10", "NaN", "-", ".", "1,5"] {
            assert!(parse_decimal(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pairs_quantities_limits_scopes() {
        let q = parse_quantity("tokens=1200").unwrap();
        assert_eq!(q.dimension.as_str(), "tokens");
        assert_eq!(q.value, Decimal::from(1200));
        assert!(parse_quantity("tokens").is_err());
        assert!(parse_quantity("tokens=x").is_err());
        assert!(parse_pair("=v").is_err());
        let l = parse_limit("USD=5.00").unwrap();
        assert_eq!(l.asset.as_str(), "USD");
        assert!(parse_limit("WAYTOOLONGASSETCODE=1").is_err());
        assert_eq!(parse_scope("Gateway"), Ok(Scope::Gateway));
        assert!(parse_scope("root").is_err());
        assert_eq!(parse_source("purchase"), Ok(SourceKind::TopUp));
        assert!(parse_time("tomorrow").is_err());
    }

    #[test]
    fn times_round_trip() {
        for text in [
            "1970-01-01T00:00:00Z",
            "2000-02-29T23:59:59Z",
            "2026-11-24T18:00:00.250000Z",
            "1969-12-31T23:59:59.999999Z",
        ] {
            let t = parse_time(text).unwrap();
            assert_eq!(format_rfc3339(t), text);
        }
    }

    #[test]
    fn fresh_ids_differ() {
        assert_ne!(fresh_request_id(), fresh_request_id());
    }

    #[test]
    fn bad_combinations_are_input_errors() {
        let w = parse_name("w").unwrap();
        let reserve = Op::Reserve {
            wallet: w,
            asset: None,
            amount: None,
            product: None,
            quantities: vec![],
            attributes: vec![],
            deadline: None,
            ttl_secs: 60,
        };
        assert!(prepare(reserve, RequestId(1), Timestamp(0)).is_err());
        let grant = Op::Grant {
            wallet: w,
            asset: parse_asset("USD").unwrap(),
            amount: Decimal::ONE,
            priority: None,
            effective_at: None,
            expires_at: None,
            source: SourceKind::TopUp,
            payment_id: None,
        };
        assert!(prepare(grant, RequestId(1), Timestamp(0)).is_err());
        let margin = Op::Margin {
            wallet: Some(w),
            product: Some(w),
            plan: None,
            version: None,
            from: None,
            to: None,
        };
        assert!(prepare(margin, RequestId(1), Timestamp(0)).is_err());
    }
}
