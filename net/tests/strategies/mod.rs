//! Proptest strategies for every message the protocol carries, built from engine types.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use rust_decimal::Decimal;
use tally_engine::*;
use tally_net::*;

pub fn name() -> impl Strategy<Value = Name> {
    prop_oneof![
        "[a-z0-9_.-]{1,64}",
        // Non-ASCII, non-control text; at most 4 bytes a character keeps it within 64 bytes.
        "\\PC{1,16}",
    ]
    .prop_map(|s| Name::new(&s).expect("strategy builds valid names"))
}

pub fn asset_code() -> impl Strategy<Value = AssetCode> {
    "[A-Za-z]{1,16}".prop_map(|s| AssetCode::new(&s).expect("valid asset code"))
}

pub fn decimal() -> impl Strategy<Value = Decimal> {
    const LIMIT: i128 = (1i128 << 96) - 1;
    prop_oneof![
        Just(Decimal::MAX),
        Just(Decimal::MIN),
        Just(Decimal::ZERO),
        (-LIMIT..=LIMIT, 0u32..=28).prop_map(|(m, s)| Decimal::from_i128_with_scale(m, s)),
        (-1_000_000i64..1_000_000, 0u32..=8).prop_map(|(m, s)| Decimal::new(m, s)),
    ]
}

fn time() -> impl Strategy<Value = Timestamp> {
    any::<i64>().prop_map(Timestamp)
}

fn pairs() -> impl Strategy<Value = Vec<(Name, Name)>> {
    vec((name(), name()), 0..4)
}

fn quantities() -> impl Strategy<Value = Vec<Quantity>> {
    vec(
        (name(), decimal()).prop_map(|(dimension, value)| Quantity { dimension, value }),
        0..4,
    )
}

pub fn usage() -> impl Strategy<Value = UsageEvent> {
    (
        name(),
        name(),
        quantities(),
        pairs(),
        decimal(),
        time(),
        any::<bool>(),
    )
        .prop_map(
            |(wallet, product, quantities, attributes, cost_usd, occurred_at, strict)| UsageEvent {
                wallet,
                product,
                quantities,
                attributes,
                cost_usd,
                occurred_at,
                mode: if strict {
                    DebitMode::Strict
                } else {
                    DebitMode::Record
                },
            },
        )
}

fn reserve_amount() -> impl Strategy<Value = ReserveAmount> {
    prop_oneof![
        (asset_code(), decimal())
            .prop_map(|(asset, amount)| ReserveAmount::Fixed { asset, amount }),
        (name(), quantities(), pairs()).prop_map(|(product, quantities, attributes)| {
            ReserveAmount::Estimate {
                product,
                quantities,
                attributes,
            }
        }),
    ]
}

fn tiers() -> impl Strategy<Value = Vec<Tier>> {
    vec(
        (option::of(decimal()), decimal(), decimal()).prop_map(|(up_to, unit_price, flat_fee)| {
            Tier {
                up_to,
                unit_price,
                flat_fee,
            }
        }),
        0..3,
    )
}

fn rounding() -> impl Strategy<Value = Rounding> {
    prop_oneof![
        Just(Rounding::HalfEven),
        Just(Rounding::HalfUp),
        Just(Rounding::Up),
        Just(Rounding::Down)
    ]
}

fn rule() -> impl Strategy<Value = PriceRule> {
    let price = prop_oneof![
        decimal().prop_map(|unit_price| PriceModel::PerUnit { unit_price }),
        tiers().prop_map(|tiers| PriceModel::Graduated { tiers }),
        tiers().prop_map(|tiers| PriceModel::Volume { tiers }),
    ];
    let component = (name(), price).prop_map(|(dimension, price)| Component { dimension, price });
    (
        name(),
        pairs(),
        vec(component, 0..3),
        option::of(decimal()),
        rounding(),
    )
        .prop_map(
            |(product, filters, components, minimum_charge, rounding)| PriceRule {
                product,
                filters,
                components,
                minimum_charge,
                rounding,
            },
        )
}

fn source() -> impl Strategy<Value = GrantSource> {
    prop_oneof![
        name().prop_map(|payment_id| GrantSource::TopUp { payment_id }),
        Just(GrantSource::Promotion),
        Just(GrantSource::Refund),
        Just(GrantSource::Adjustment),
    ]
}

fn topup_rule() -> impl Strategy<Value = TopUpRule> {
    (
        asset_code(),
        decimal(),
        (any::<bool>(), decimal()),
        any::<u32>(),
        any::<i64>(),
        (option::of(decimal()), option::of(decimal())),
        name(),
    )
        .prop_map(
            |(
                asset,
                threshold,
                (fixed, a),
                attempts_max,
                cooldown_us,
                (daily_cap, monthly_cap),
                pm,
            )| TopUpRule {
                monthly_cap,
                asset,
                threshold,
                amount: if fixed {
                    TopUpAmount::Fixed(a)
                } else {
                    TopUpAmount::Target(a)
                },
                attempts_max,
                cooldown_us,
                daily_cap,
                payment_method: pm,
            },
        )
}

/// Every `Command` variant.
pub fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (asset_code(), any::<u32>(), decimal()).prop_map(|(code, scale, usd_value)| {
            Command::DefineAsset {
                code,
                scale,
                usd_value,
            }
        }),
        (name(), vec(name(), 0..4))
            .prop_map(|(code, dimensions)| Command::DefineProduct { code, dimensions }),
        (name(), option::of(name()), asset_code(), vec(rule(), 0..3)).prop_map(
            |(plan, custom_for, asset, rules)| Command::DraftPlan {
                plan,
                custom_for,
                asset,
                rules
            }
        ),
        name().prop_map(|plan| Command::PublishPlan { plan }),
        (
            name(),
            vec(
                (asset_code(), decimal()).prop_map(|(asset, amount)| Limit { asset, amount }),
                0..3
            ),
            pairs()
        )
            .prop_map(|(wallet, overdraft, metadata)| Command::CreateWallet(
                CreateWallet {
                    wallet,
                    overdraft,
                    metadata
                }
            )),
        (name(), asset_code(), decimal()).prop_map(|(wallet, asset, limit)| {
            Command::SetOverdraft {
                wallet,
                asset,
                limit,
            }
        }),
        name().prop_map(|wallet| Command::Freeze { wallet }),
        name().prop_map(|wallet| Command::Unfreeze { wallet }),
        (name(), name(), any::<u32>(), time()).prop_map(|(wallet, plan, version, t)| {
            Command::AssignPlan {
                wallet,
                plan,
                version,
                effective_from: t,
            }
        }),
        (
            name(),
            asset_code(),
            decimal(),
            any::<u32>(),
            option::of(time()),
            option::of(time()),
            source()
        )
            .prop_map(
                |(wallet, asset, amount, priority, effective_at, expires_at, source)| {
                    Command::Grant(Grant {
                        wallet,
                        asset,
                        amount,
                        priority,
                        effective_at,
                        expires_at,
                        source,
                    })
                }
            ),
        usage().prop_map(Command::Usage),
        (name(), reserve_amount(), time()).prop_map(|(wallet, amount, deadline)| {
            Command::Reserve {
                wallet,
                amount,
                deadline,
            }
        }),
        (name(), any::<u64>(), usage()).prop_map(|(wallet, hold, usage)| Command::Settle {
            wallet,
            hold: HoldId(hold),
            usage
        }),
        (name(), any::<u64>()).prop_map(|(wallet, hold)| Command::Release {
            wallet,
            hold: HoldId(hold)
        }),
        (name(), any::<u128>(), option::of(decimal())).prop_map(|(wallet, event, amount)| {
            Command::Refund {
                wallet,
                event: RequestId(event),
                amount,
            }
        }),
        (name(), any::<u64>(), any::<bool>()).prop_map(|(wallet, grant, freeze)| {
            Command::Dispute {
                wallet,
                grant: GrantId(grant),
                freeze,
            }
        }),
        (name(), any::<u64>()).prop_map(|(wallet, grant)| Command::DisputeWon {
            wallet,
            grant: GrantId(grant)
        }),
        (name(), asset_code(), decimal(), "\\PC{0,40}").prop_map(
            |(wallet, asset, amount, reason)| Command::Adjust {
                wallet,
                asset,
                amount,
                reason
            }
        ),
        (name(), topup_rule()).prop_map(|(wallet, rule)| Command::SetTopUpRule { wallet, rule }),
        (name(), asset_code())
            .prop_map(|(wallet, asset)| Command::RemoveTopUpRule { wallet, asset }),
        (name(), asset_code(), any::<u64>(), name(), decimal()).prop_map(
            |(wallet, asset, trigger, payment_id, amount)| Command::TopUpSucceeded {
                wallet,
                asset,
                trigger,
                payment_id,
                amount
            }
        ),
        (name(), asset_code(), any::<u64>(), name()).prop_map(
            |(wallet, asset, trigger, reason)| Command::TopUpFailed {
                wallet,
                asset,
                trigger,
                reason,
            }
        ),
        (asset_code(), option::of((name(), decimal()))).prop_map(|(asset, price)| {
            Command::PriceAsset {
                asset,
                price: price.map(|(currency, unit_amount)| TopUpPrice {
                    currency,
                    unit_amount,
                }),
            }
        }),
        (name(), option::of(name()), option::of(name())).prop_map(
            |(wallet, customer, payment_method)| Command::SetBilling {
                wallet,
                customer,
                payment_method,
            }
        ),
        (
            name(),
            name(),
            prop_oneof![
                any::<bool>().prop_map(|freeze| PaymentEvent::Disputed { freeze }),
                Just(PaymentEvent::DisputeWon),
                decimal().prop_map(|refunded| PaymentEvent::Refunded { refunded }),
            ]
        )
            .prop_map(|(wallet, payment_id, event)| Command::Payment {
                wallet,
                payment_id,
                event,
            }),
    ]
}

/// Every `Query` variant and margin scope.
pub fn query() -> impl Strategy<Value = Query> {
    let scope = prop_oneof![
        Just(MarginScope::Total),
        name().prop_map(MarginScope::Wallet),
        name().prop_map(MarginScope::Product),
        (name(), any::<u32>())
            .prop_map(|(plan, version)| MarginScope::PlanVersion { plan, version }),
        (time(), time()).prop_map(|(from, to)| MarginScope::Hours { from, to }),
    ];
    prop_oneof![
        name().prop_map(|wallet| Query::Wallet { wallet }),
        (name(), asset_code()).prop_map(|(wallet, asset)| Query::Balance { wallet, asset }),
        scope.prop_map(Query::Margin),
        usage().prop_map(Query::PricePreview),
        (name(), vec(usage(), 0..4)).prop_map(|(plan, events)| Query::DraftTest { plan, events }),
    ]
}

pub fn result_code() -> impl Strategy<Value = ResultCode> {
    prop::sample::select(ResultCode::ALL)
}

pub fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(ErrorCode::ALL)
}

pub fn reply() -> impl Strategy<Value = Reply> {
    let value = prop_oneof![
        Just(ReplyValue::None),
        (any::<u64>(), decimal()).prop_map(|(g, debt_paid)| ReplyValue::Grant {
            grant: GrantId(g),
            debt_paid
        }),
        (asset_code(), decimal(), decimal(), decimal()).prop_map(|(asset, c, d, a)| {
            ReplyValue::Charge {
                asset,
                charged: c,
                debt_added: d,
                available: a,
            }
        }),
        (any::<u64>(), asset_code(), decimal(), decimal()).prop_map(|(h, asset, amount, a)| {
            ReplyValue::Hold {
                hold: HoldId(h),
                asset,
                amount,
                available: a,
            }
        }),
        (any::<u64>(), decimal(), decimal()).prop_map(|(g, r, left)| ReplyValue::Refund {
            grant: GrantId(g),
            refunded: r,
            refundable: left
        }),
        (decimal(), decimal()).prop_map(|(c, d)| ReplyValue::Dispute {
            clawed_back: c,
            debt_added: d
        }),
        any::<u32>().prop_map(|version| ReplyValue::Version { version }),
        (asset_code(), decimal(), decimal()).prop_map(|(asset, s, r)| ReplyValue::Shortfall {
            asset,
            spendable: s,
            required: r
        }),
    ];
    (result_code(), value).prop_map(|(code, value)| Reply { code, value })
}

fn balance() -> impl Strategy<Value = BalanceView> {
    (
        asset_code(),
        [
            decimal(),
            decimal(),
            decimal(),
            decimal(),
            decimal(),
            decimal(),
        ],
    )
        .prop_map(
            |(asset, [ledger, available, held, debt, pending, overdraft])| BalanceView {
                asset,
                ledger,
                available,
                held,
                debt,
                pending,
                overdraft,
            },
        )
}

fn margin() -> impl Strategy<Value = MarginView> {
    (any::<u64>(), [decimal(), decimal(), decimal(), decimal()]).prop_map(|(events, d)| {
        MarginView {
            events,
            revenue_usd: d[0],
            cost_usd: d[1],
            refunded_usd: d[2],
            margin_usd: d[3],
        }
    })
}

fn row() -> impl Strategy<Value = DraftTestRow> {
    (
        any::<[u64; 3]>(),
        [decimal(), decimal(), decimal(), decimal(), decimal()],
    )
        .prop_map(|(n, d)| DraftTestRow {
            events: n[0],
            revenue_current_usd: d[0],
            revenue_draft_usd: d[1],
            cost_usd: d[2],
            margin_current_usd: d[3],
            margin_draft_usd: d[4],
            unpriced_current: n[1],
            unpriced_draft: n[2],
        })
}

fn wallet_info() -> impl Strategy<Value = WalletInfo> {
    let grant = (
        any::<u64>(),
        asset_code(),
        decimal(),
        decimal(),
        any::<u32>(),
        option::of(time()),
        option::of(time()),
        source(),
    )
        .prop_map(
            |(id, asset, amount, remaining, priority, e, x, source)| GrantView {
                id: GrantId(id),
                asset,
                amount,
                remaining,
                priority,
                effective_at: e,
                expires_at: x,
                source,
            },
        );
    let topup_status = (
        asset_code(),
        option::of((any::<u64>(), decimal(), time())),
        any::<u32>(),
        option::of(name()),
    )
        .prop_map(|(asset, in_flight, failures, last_failure)| TopUpStatus {
            asset,
            in_flight,
            failures,
            last_failure,
        });
    let hold = (any::<u64>(), asset_code(), decimal(), time()).prop_map(
        |(id, asset, amount, deadline)| HoldInfo {
            id: HoldId(id),
            asset,
            amount,
            deadline,
        },
    );
    (
        (name(), any::<bool>(), vec(asset_code(), 0..3), pairs()),
        (vec(balance(), 0..3), vec(grant, 0..3), vec(hold, 0..3)),
        (
            vec((name(), any::<u32>(), time()), 0..3),
            vec(topup_rule(), 0..2),
            margin(),
        ),
        (
            option::of(name()),
            option::of(name()),
            vec(topup_status, 0..2),
        ),
    )
        .prop_map(
            |(
                (wallet, frozen, topup_flagged, metadata),
                (balances, grants, holds),
                (plans, topup_rules, margin),
                (customer, payment_method, topups),
            )| WalletInfo {
                wallet,
                frozen,
                topup_flagged,
                metadata,
                balances,
                grants,
                holds,
                plans,
                topup_rules,
                margin,
                customer,
                payment_method,
                topups,
            },
        )
}

fn answer() -> impl Strategy<Value = Answer> {
    let price = (asset_code(), decimal(), name(), any::<u32>(), any::<u32>()).prop_map(
        |(asset, amount, plan, version, rule)| PriceView {
            asset,
            amount,
            plan,
            version,
            rule,
        },
    );
    let draft = (
        name(),
        option::of(any::<u32>()),
        vec((name(), row()), 0..3),
        row(),
    )
        .prop_map(|(plan, current_version, wallets, total)| DraftTestReport {
            plan,
            current_version,
            wallets,
            total,
        });
    prop_oneof![
        wallet_info().prop_map(Answer::Wallet),
        balance().prop_map(Answer::Balance),
        margin().prop_map(Answer::Margin),
        price.prop_map(Answer::Price),
        draft.prop_map(Answer::DraftTest),
    ]
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,32}"
}

/// Every message kind.
pub fn message() -> impl Strategy<Value = Message> {
    let reserve_item = (any::<u128>(), name(), reserve_amount(), time()).prop_map(
        |(id, wallet, amount, deadline)| ReserveItem {
            id: RequestId(id),
            wallet,
            amount,
            deadline,
        },
    );
    let outcome = prop_oneof![reply().prop_map(Ok), error_code().prop_map(Err)];
    prop_oneof![
        (any::<u8>(), any::<u8>(), any::<u32>(), text()).prop_map(|(a, b, m, client)| {
            Message::Hello(Hello {
                version_min: a,
                version_max: b,
                frame_payload_max: m,
                client,
            })
        }),
        (any::<u8>(), any::<[u32; 3]>(), text()).prop_map(|(version, l, server)| {
            Message::Welcome(Welcome {
                version,
                frame_payload_max: l[0],
                in_flight_max: l[1],
                batch_items_max: l[2],
                server,
            })
        }),
        vec(any::<u8>(), 0..64).prop_map(|key| Message::Auth { key }),
        (any::<u64>(), any::<bool>()).prop_map(|(key_id, admin)| Message::AuthOk {
            key_id,
            scope: if admin { Scope::Admin } else { Scope::Gateway }
        }),
        (error_code(), text())
            .prop_map(|(code, message)| Message::Error(ErrorFrame { code, message })),
        (any::<u128>(), command()).prop_map(|(id, command)| Message::Request(Request {
            id: RequestId(id),
            command
        })),
        vec((any::<u128>().prop_map(RequestId), usage()), 0..6).prop_map(Message::UsageBatch),
        vec(reserve_item, 0..6).prop_map(Message::ReserveBatch),
        query().prop_map(Message::Query),
        (name(), any::<bool>()).prop_map(|(label, admin)| Message::KeyCreate {
            label,
            scope: if admin { Scope::Admin } else { Scope::Gateway }
        }),
        any::<u64>().prop_map(|key_id| Message::KeyRevoke { key_id }),
        Just(Message::Snapshot),
        Just(Message::Health),
        reply().prop_map(Message::Reply),
        vec(outcome, 0..8).prop_map(Message::BatchReply),
        answer().prop_map(|a| Message::Answer(Ok(a))),
        result_code()
            .prop_filter("a refusal is not Ok", |c| !c.is_ok())
            .prop_map(|c| Message::Answer(Err(c))),
        (any::<u64>(), text()).prop_map(|(key_id, secret)| Message::KeyCreated { key_id, secret }),
        Just(Message::Done),
        vec(any::<[u64; 4]>(), 0..4).prop_map(|v| Message::SnapshotTaken(
            v.into_iter()
                .map(|x| CheckpointInfo {
                    shard: x[0] as u32,
                    lsn: x[1],
                    digest: x[2],
                    stall_us: x[3]
                })
                .collect()
        )),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<[u64; 4]>(),
            text(),
            proptest::collection::vec((text(), any::<u64>(), any::<u64>()), 0..4)
        )
            .prop_map(|(s, r, u, c, server, sinks)| {
                Message::HealthReport(HealthReport {
                    shards: s,
                    shards_running: r,
                    uptime_us: u,
                    connections_open: c[0],
                    rejected_unauthenticated: c[1],
                    rejected_key: c[2],
                    rejected_scope: c[3],
                    server,
                    sinks: sinks
                        .into_iter()
                        .map(|(name, effects, lag_us)| tally_net::SinkLag {
                            name,
                            effects,
                            lag_us,
                        })
                        .collect(),
                })
            }),
    ]
}
