//! One test per billing rule and per rejection, at the engine boundary.

mod common;

use common::*;
use rust_decimal::Decimal;
use tally_engine::*;

const SECOND: i64 = Timestamp::SECOND_US;
const HOUR: i64 = Timestamp::HOUR_US;

fn usd() -> AssetCode {
    asset("USD")
}

fn charged(reply: Reply) -> Decimal {
    match reply.value {
        ReplyValue::Charge { charged, .. } => charged,
        other => panic!("expected a charge, got {reply:?} / {other:?}"),
    }
}

#[test]
fn assets_and_products_are_declared_once() {
    let mut h = Harness::new();
    // Identical repeat is a no-op; a different definition conflicts.
    h.ok(Command::DefineAsset {
        code: usd(),
        scale: 6,
        usd_value: d("1"),
    });
    h.rejects(
        Command::DefineAsset {
            code: usd(),
            scale: 2,
            usd_value: d("1"),
        },
        ResultCode::AssetConflict,
    );
    h.rejects(
        Command::DefineAsset {
            code: asset("big"),
            scale: 19,
            usd_value: d("1"),
        },
        ResultCode::InvalidArgument,
    );
    h.rejects(
        Command::DefineAsset {
            code: asset("neg"),
            scale: 2,
            usd_value: d("-1"),
        },
        ResultCode::InvalidPrice,
    );
    h.rejects(
        Command::DefineProduct {
            code: n("chat"),
            dimensions: vec![n("input_tokens")],
        },
        ResultCode::ProductConflict,
    );
    h.rejects(
        Command::DefineProduct {
            code: n("x"),
            dimensions: vec![n("a"), n("a")],
        },
        ResultCode::InvalidArgument,
    );
}

#[test]
fn wallets_are_created_once_with_limits_and_metadata() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.rejects(
        Command::CreateWallet(CreateWallet {
            wallet: w,
            overdraft: vec![],
            metadata: vec![],
        }),
        ResultCode::WalletExists,
    );
    let metadata: Vec<(Name, Name)> = (0..=METADATA_MAX)
        .map(|i| (n(&format!("k{i}")), n("v")))
        .collect();
    h.rejects(
        Command::CreateWallet(CreateWallet {
            wallet: n("other"),
            overdraft: vec![],
            metadata,
        }),
        ResultCode::LimitExceeded,
    );
    h.rejects(
        Command::CreateWallet(CreateWallet {
            wallet: n("other"),
            overdraft: vec![Limit {
                asset: asset("EUR"),
                amount: d("1"),
            }],
            metadata: vec![],
        }),
        ResultCode::UnknownAsset,
    );
    h.ok(Command::CreateWallet(CreateWallet {
        wallet: n("meta"),
        overdraft: vec![Limit {
            asset: usd(),
            amount: d("5"),
        }],
        metadata: vec![(n("tier"), n("gold"))],
    }));
    let view = h.view(n("meta"));
    assert_eq!(view.metadata, vec![(n("tier"), n("gold"))]);
    assert_eq!(view.balances[0].overdraft, d("5"));
    assert_eq!(
        h.engine.query(&Query::Wallet {
            wallet: n("nobody")
        }),
        Err(ResultCode::UnknownWallet)
    );
    h.rejects(
        Command::Freeze {
            wallet: n("nobody"),
        },
        ResultCode::UnknownWallet,
    );
}

#[test]
fn grants_are_consumed_by_priority_then_soonest_expiry_then_age() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let late = Some(h.now.add_us(10 * HOUR));
    let soon = Some(h.now.add_us(HOUR));
    let promo = GrantSource::Promotion;
    let a = h.grant_with(w, "1", 1, None, promo); // priority 1, never expires
    let b = h.grant_with(w, "1", 1, late, promo); // priority 1, expires late
    let c = h.grant_with(w, "1", 1, soon, promo); // priority 1, expires soon
    let e = h.grant_with(w, "1", 1, None, promo); // like a but younger
    let f = h.grant_with(w, "1", 0, None, promo); // priority 0 first of all
    let order: Vec<GrantId> = h.view(w).grants.iter().map(|g| g.id).collect();
    assert_eq!(order, vec![f, c, b, a, e]);

    // 2.5 USD spans f, c and half of b: one journal entry per part.
    let journal = h.journal.len();
    // 500 input tokens × 0.001 + 1000 output × 0.002 = 2.5
    assert_eq!(
        charged(h.usage(w, "500", "1000", DebitMode::Strict)),
        d("2.5")
    );
    let parts: Vec<(Option<GrantId>, Decimal)> = h.journal[journal..]
        .iter()
        .map(|j| (j.grant, j.amount))
        .collect();
    assert_eq!(
        parts,
        vec![(Some(f), d("1")), (Some(c), d("1")), (Some(b), d("0.5"))]
    );
    assert!(h.journal[journal..]
        .iter()
        .all(|j| j.to == Account::Revenue));
    assert_eq!(h.balance(w).available, d("2.5"));
    h.check_ledger();
}

#[test]
fn expired_grants_leave_as_breakage() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let expires = h.now.add_us(HOUR);
    let g = h.grant_with(w, "3", 0, Some(expires), GrantSource::Promotion);
    h.grant(w, "1");
    h.usage(w, "1000", "0", DebitMode::Strict); // 1 USD from the expiring grant first
    assert_eq!(h.balance(w).available, d("3"));
    assert_eq!(h.engine.poll_timeout(), Some(expires));
    h.advance(HOUR);
    assert_eq!(h.balance(w).available, d("1"));
    let last = h.journal.last().unwrap();
    assert_eq!(
        (last.kind, last.amount, last.to, last.grant),
        (EntryKind::Breakage, d("2"), Account::Breakage, Some(g))
    );
    assert_eq!(last.request, None);
    h.check_ledger();
    // An expiry in the past is refused.
    h.rejects(
        Command::Grant(Grant {
            expires_at: Some(h.now),
            ..grant_of(w, "1")
        }),
        ResultCode::TimestampOutOfRange,
    );
}

#[test]
fn future_grants_wait_for_their_time_then_pay_debt_first() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.usage(w, "1000", "0", DebitMode::Record); // 1 USD of debt
    let starts = h.now.add_us(HOUR);
    h.ok(Command::Grant(Grant {
        effective_at: Some(starts),
        ..grant_of(w, "5")
    }));
    let b = h.balance(w);
    assert_eq!(
        (b.available, b.pending, b.debt, b.ledger),
        (d("-1"), d("5"), d("1"), d("4"))
    );
    h.advance(HOUR);
    let b = h.balance(w);
    assert_eq!(
        (b.available, b.pending, b.debt, b.ledger),
        (d("4"), d("0"), d("0"), d("4"))
    );
    h.check_ledger();
}

#[test]
fn strict_usage_is_all_or_nothing() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "1");
    let event = h.event(w, "1000", "1", DebitMode::Strict); // 1.002 USD
    let before = h.balance(w);
    let reply = h.run(Command::Usage(event));
    assert_eq!(reply.code, ResultCode::InsufficientFunds);
    assert_eq!(
        reply.value,
        ReplyValue::Shortfall {
            asset: usd(),
            spendable: d("1"),
            required: d("1.002")
        }
    );
    assert_eq!(h.balance(w), before);
    assert!(h.margins.is_empty());
    assert_eq!(h.margin(MarginScope::Total).events, 0);
}

#[test]
fn record_usage_creates_debt_which_blocks_strict_until_paid() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "1");
    let reply = h.usage(w, "1500", "0", DebitMode::Record); // 1.5 USD
    assert_eq!(
        reply.value,
        ReplyValue::Charge {
            asset: usd(),
            charged: d("1.5"),
            debt_added: d("0.5"),
            available: d("-0.5")
        }
    );
    h.rejects(
        Command::Usage(h.event(w, "1", "0", DebitMode::Strict)),
        ResultCode::WalletInDebt,
    );
    h.rejects(
        Command::Reserve {
            wallet: w,
            amount: ReserveAmount::Fixed {
                asset: usd(),
                amount: d("0.1"),
            },
            deadline: h.now.add_us(60 * SECOND),
        },
        ResultCode::WalletInDebt,
    );
    // The next grant pays the debt first.
    let value = h.ok(Command::Grant(grant_of(w, "2")));
    assert!(matches!(value, ReplyValue::Grant { debt_paid, .. } if debt_paid == d("0.5")));
    assert_eq!(h.balance(w).available, d("1.5"));
    assert_eq!(charged(h.usage(w, "1000", "0", DebitMode::Strict)), d("1"));
    h.check_ledger();
}

#[test]
fn overdraft_lets_strict_usage_go_below_zero_up_to_the_limit() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.ok(Command::SetOverdraft {
        wallet: w,
        asset: usd(),
        limit: d("2"),
    });
    h.grant(w, "1");
    assert_eq!(
        charged(h.usage(w, "2500", "0", DebitMode::Strict)),
        d("2.5")
    );
    assert_eq!(h.balance(w).available, d("-1.5"));
    h.rejects(
        Command::Usage(h.event(w, "600", "0", DebitMode::Strict)),
        ResultCode::InsufficientFunds,
    );
    assert_eq!(charged(h.usage(w, "500", "0", DebitMode::Strict)), d("0.5"));
    assert_eq!(h.balance(w).available, d("-2"));
    h.check_ledger();
}

#[test]
fn frozen_wallets_refuse_strict_usage_and_reserves_but_record_what_was_served() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "10");
    h.ok(Command::Freeze { wallet: w });
    assert!(h.view(w).frozen);
    h.rejects(
        Command::Usage(h.event(w, "1", "0", DebitMode::Strict)),
        ResultCode::WalletFrozen,
    );
    h.rejects(
        Command::Reserve {
            wallet: w,
            amount: ReserveAmount::Fixed {
                asset: usd(),
                amount: d("1"),
            },
            deadline: h.now.add_us(SECOND),
        },
        ResultCode::WalletFrozen,
    );
    assert_eq!(charged(h.usage(w, "1000", "0", DebitMode::Record)), d("1"));
    h.ok(Command::Unfreeze { wallet: w });
    assert_eq!(charged(h.usage(w, "1000", "0", DebitMode::Strict)), d("1"));
}

fn hold_of(value: ReplyValue) -> HoldId {
    match value {
        ReplyValue::Hold { hold, .. } => hold,
        other => panic!("{other:?}"),
    }
}

#[test]
fn reserve_then_settle_charges_the_actual_and_releases_the_rest() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "10");
    let deadline = h.now.add_us(60 * SECOND);
    let value = h.ok(Command::Reserve {
        wallet: w,
        amount: ReserveAmount::Fixed {
            asset: usd(),
            amount: d("4"),
        },
        deadline,
    });
    assert!(matches!(value, ReplyValue::Hold { available, .. } if available == d("6")));
    let hold = hold_of(value);
    assert_eq!(h.balance(w).held, d("4"));
    // Strict usage sees only what the hold left.
    h.rejects(
        Command::Usage(h.event(w, "7000", "0", DebitMode::Strict)),
        ResultCode::InsufficientFunds,
    );
    let usage = h.event(w, "1000", "500", DebitMode::Strict); // 2 USD
    let settle = Command::Settle {
        wallet: w,
        hold,
        usage,
    };
    let id = h.next_id;
    let first = h.run_id(id, settle.clone());
    assert_eq!(charged(first), d("2"));
    let b = h.balance(w);
    assert_eq!((b.available, b.held), (d("8"), d("0")));
    // The same request again is the same answer; a new request finds the hold settled.
    assert_eq!(h.run_id(id, settle.clone()), first);
    h.rejects(settle, ResultCode::HoldAlreadySettled);
    h.check_ledger();
}

#[test]
fn settle_overrun_is_charged_as_record_usage() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "3");
    let hold = hold_of(h.ok(Command::Reserve {
        wallet: w,
        amount: ReserveAmount::Fixed {
            asset: usd(),
            amount: d("2"),
        },
        deadline: h.now.add_us(SECOND),
    }));
    let usage = h.event(w, "5000", "0", DebitMode::Strict); // 5 USD: 2 over the hold, 2 over all
    let reply = h.run(Command::Settle {
        wallet: w,
        hold,
        usage,
    });
    assert_eq!(
        reply.value,
        ReplyValue::Charge {
            asset: usd(),
            charged: d("5"),
            debt_added: d("2"),
            available: d("-2")
        }
    );
    h.check_ledger();
}

#[test]
fn holds_release_expire_and_say_why_they_are_gone() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "10");
    let fixed = |amount: &str| ReserveAmount::Fixed {
        asset: usd(),
        amount: d(amount),
    };
    let a = hold_of(h.ok(Command::Reserve {
        wallet: w,
        amount: fixed("1"),
        deadline: h.now.add_us(SECOND),
    }));
    let b = hold_of(h.ok(Command::Reserve {
        wallet: w,
        amount: fixed("2"),
        deadline: h.now.add_us(HOUR),
    }));
    h.ok(Command::Release { wallet: w, hold: b });
    h.rejects(
        Command::Release { wallet: w, hold: b },
        ResultCode::HoldAlreadyReleased,
    );
    h.advance(SECOND);
    assert_eq!(h.balance(w).held, d("0"));
    let usage = h.event(w, "1", "0", DebitMode::Strict);
    h.rejects(
        Command::Settle {
            wallet: w,
            hold: a,
            usage: usage.clone(),
        },
        ResultCode::HoldExpired,
    );
    h.rejects(
        Command::Settle {
            wallet: w,
            hold: HoldId(999),
            usage,
        },
        ResultCode::UnknownHold,
    );
    h.rejects(
        Command::Reserve {
            wallet: w,
            amount: fixed("1"),
            deadline: h.now,
        },
        ResultCode::InvalidDeadline,
    );
    h.rejects(
        Command::Reserve {
            wallet: w,
            amount: fixed("11"),
            deadline: h.now.add_us(SECOND),
        },
        ResultCode::InsufficientFunds,
    );
    assert_eq!(h.balance(w).available, d("10"));
}

#[test]
fn reserve_can_hold_a_priced_estimate() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "10");
    let value = h.ok(Command::Reserve {
        wallet: w,
        amount: ReserveAmount::Estimate {
            product: n("chat"),
            quantities: vec![
                Quantity {
                    dimension: n("input_tokens"),
                    value: d("100"),
                },
                Quantity {
                    dimension: n("output_tokens"),
                    value: d("100"),
                },
            ],
            attributes: vec![(n("model"), n("gpt-4o"))],
        },
        deadline: h.now.add_us(SECOND),
    });
    // 100 × 0.01 + 100 × 0.03
    assert!(matches!(value, ReplyValue::Hold { amount, .. } if amount == d("4")));
}

#[test]
fn holds_per_wallet_are_limited() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "1000");
    let fixed = ReserveAmount::Fixed {
        asset: usd(),
        amount: d("0.01"),
    };
    for _ in 0..HOLDS_MAX {
        h.ok(Command::Reserve {
            wallet: w,
            amount: fixed.clone(),
            deadline: h.now.add_us(HOUR),
        });
    }
    h.rejects(
        Command::Reserve {
            wallet: w,
            amount: fixed,
            deadline: h.now.add_us(HOUR),
        },
        ResultCode::LimitExceeded,
    );
}

#[test]
fn the_most_specific_rule_prices_and_rejections_name_what_is_missing() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "100");
    let mut event = h.event(w, "100", "100", DebitMode::Strict);
    event.attributes = vec![(n("model"), n("gpt-4o")), (n("region"), n("eu"))];
    assert_eq!(charged(h.run(Command::Usage(event.clone()))), d("4"));
    event.attributes = vec![(n("model"), n("o1"))];
    assert_eq!(charged(h.run(Command::Usage(event.clone()))), d("0.3"));

    let mut unknown = event.clone();
    unknown.product = n("embed");
    h.rejects(Command::Usage(unknown), ResultCode::UnknownProduct);
    let mut bad_dimension = event.clone();
    bad_dimension.quantities[0].dimension = n("images");
    h.rejects(Command::Usage(bad_dimension), ResultCode::UnknownDimension);
    let mut negative = event.clone();
    negative.quantities[0].value = d("-1");
    h.rejects(Command::Usage(negative), ResultCode::InvalidQuantity);
    let mut fine = event.clone();
    fine.quantities[0].value = d("0.0000001");
    h.rejects(Command::Usage(fine), ResultCode::InvalidQuantity);
    let mut future = event.clone();
    future.occurred_at = h.now.add_us(HOUR);
    h.rejects(Command::Usage(future), ResultCode::TimestampOutOfRange);
    let mut unknown_wallet = event.clone();
    unknown_wallet.wallet = n("nobody");
    h.rejects(Command::Usage(unknown_wallet), ResultCode::UnknownWallet);

    // A wallet on no plan, and a plan without a matching rule.
    let lonely = n("lonely");
    h.ok(Command::CreateWallet(CreateWallet {
        wallet: lonely,
        overdraft: vec![],
        metadata: vec![],
    }));
    h.rejects(
        Command::Usage(h.event(lonely, "1", "1", DebitMode::Record)),
        ResultCode::NoPlanAssigned,
    );
    h.ok(Command::DefineProduct {
        code: n("embed"),
        dimensions: vec![n("tokens")],
    });
    h.ok(Command::DraftPlan {
        plan: n("narrow"),
        custom_for: None,
        asset: usd(),
        rules: vec![rule(&[("model", "gpt-4o")], "1", "1")],
    });
    h.ok(Command::PublishPlan { plan: n("narrow") });
    h.ok(Command::AssignPlan {
        wallet: lonely,
        plan: n("narrow"),
        version: 1,
        effective_from: Timestamp(0),
    });
    h.rejects(
        Command::Usage(h.event(lonely, "1", "1", DebitMode::Record)),
        ResultCode::NoMatchingRule,
    );
}

#[test]
fn plan_versions_are_immutable_and_chosen_by_event_time() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "100");
    // Draft v2 at double the price; v1 must not change while the draft is edited.
    h.ok(Command::DraftPlan {
        plan: n("std"),
        custom_for: None,
        asset: usd(),
        rules: vec![rule(&[], "0.002", "0.004")],
    });
    assert_eq!(charged(h.usage(w, "1000", "0", DebitMode::Strict)), d("1"));
    let version = h.ok(Command::PublishPlan { plan: n("std") });
    assert_eq!(version, ReplyValue::Version { version: 2 });
    h.rejects(Command::PublishPlan { plan: n("std") }, ResultCode::NoDraft);
    let switch = h.now.add_us(HOUR);
    h.ok(Command::AssignPlan {
        wallet: w,
        plan: n("std"),
        version: 2,
        effective_from: switch,
    });
    assert_eq!(charged(h.usage(w, "1000", "0", DebitMode::Strict)), d("1"));
    h.advance(HOUR);
    assert_eq!(charged(h.usage(w, "1000", "0", DebitMode::Strict)), d("2"));
    // A late event from before the switch is priced by v1.
    let mut late = h.event(w, "1000", "0", DebitMode::Strict);
    late.occurred_at = h.now.add_us(-2 * HOUR);
    assert_eq!(charged(h.run(Command::Usage(late))), d("1"));
    h.rejects(
        Command::AssignPlan {
            wallet: w,
            plan: n("std"),
            version: 3,
            effective_from: switch,
        },
        ResultCode::UnknownPlanVersion,
    );
    h.rejects(
        Command::AssignPlan {
            wallet: w,
            plan: n("gold"),
            version: 1,
            effective_from: switch,
        },
        ResultCode::UnknownPlan,
    );
}

#[test]
fn draft_rules_are_validated_against_the_catalog() {
    let mut h = Harness::new();
    let draft = |rules| Command::DraftPlan {
        plan: n("p"),
        custom_for: None,
        asset: usd(),
        rules,
    };
    let mut bad_product = rule(&[], "1", "1");
    bad_product.product = n("embed");
    h.rejects(draft(vec![bad_product]), ResultCode::UnknownProduct);
    let mut bad_dimension = rule(&[], "1", "1");
    bad_dimension.components[0].dimension = n("images");
    h.rejects(draft(vec![bad_dimension]), ResultCode::UnknownDimension);
    h.rejects(
        draft(vec![rule(&[], "1", "1"), rule(&[], "2", "2")]),
        ResultCode::AmbiguousRules,
    );
    h.rejects(draft(vec![rule(&[], "-1", "1")]), ResultCode::InvalidPrice);
    h.rejects(
        Command::DraftPlan {
            plan: n("p"),
            custom_for: None,
            asset: asset("EUR"),
            rules: vec![],
        },
        ResultCode::UnknownAsset,
    );
}

#[test]
fn custom_plans_belong_to_one_wallet() {
    let mut h = Harness::new();
    let acme = h.wallet("acme");
    let other = h.wallet("other");
    h.ok(Command::DraftPlan {
        plan: n("acme-deal"),
        custom_for: Some(acme),
        asset: usd(),
        rules: vec![rule(&[], "0.0005", "0.001")],
    });
    h.ok(Command::PublishPlan {
        plan: n("acme-deal"),
    });
    let assign = |wallet| Command::AssignPlan {
        wallet,
        plan: n("acme-deal"),
        version: 1,
        effective_from: Timestamp(0),
    };
    h.rejects(assign(other), ResultCode::PlanNotAssignable);
    h.ok(assign(acme));
    h.grant(acme, "10");
    assert_eq!(
        charged(h.usage(acme, "1000", "1000", DebitMode::Strict)),
        d("1.5")
    );
}

#[test]
fn price_preview_changes_nothing() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let digest = h.engine.digest();
    let mut event = h.event(w, "10", "20", DebitMode::Strict);
    event.attributes = vec![(n("model"), n("gpt-4o"))];
    let reply = h.engine.query(&Query::PricePreview(event)).unwrap();
    assert_eq!(
        reply,
        QueryReply::Price(PriceView {
            asset: usd(),
            amount: d("0.7"),
            plan: n("std"),
            version: 1,
            rule: 1
        })
    );
    assert_eq!(h.engine.digest(), digest);
}

#[test]
fn draft_test_compares_revenue_and_margin_per_wallet() {
    let mut h = Harness::new();
    let a = h.wallet("a");
    let b = h.wallet("b");
    h.ok(Command::DraftPlan {
        plan: n("std"),
        custom_for: None,
        asset: usd(),
        rules: vec![rule(&[], "0.002", "0.002")],
    });
    let mut events = vec![
        h.event(a, "1000", "0", DebitMode::Record),
        h.event(b, "0", "1000", DebitMode::Record),
    ];
    let mut unpriced = h.event(b, "1", "1", DebitMode::Record);
    unpriced.product = n("embed");
    events.push(unpriced);
    let QueryReply::DraftTest(report) = h
        .engine
        .query(&Query::DraftTest {
            plan: n("std"),
            events,
        })
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(report.current_version, Some(1));
    let (wallet_a, row_a) = report.wallets[0];
    assert_eq!(wallet_a, a);
    assert_eq!(
        (row_a.revenue_current_usd, row_a.revenue_draft_usd),
        (d("1"), d("2"))
    );
    assert_eq!(
        (row_a.margin_current_usd, row_a.margin_draft_usd),
        (d("0.999"), d("1.999"))
    );
    let (_, row_b) = report.wallets[1];
    assert_eq!(
        (row_b.revenue_current_usd, row_b.revenue_draft_usd),
        (d("2"), d("2"))
    );
    assert_eq!(
        (row_b.unpriced_current, row_b.unpriced_draft, row_b.events),
        (1, 1, 2)
    );
    assert_eq!(report.total.revenue_draft_usd, d("4"));
    assert_eq!(report.total.events, 3);
    assert_eq!(
        h.engine.query(&Query::DraftTest {
            plan: n("gold"),
            events: vec![]
        }),
        Err(ResultCode::UnknownPlan)
    );
}

#[test]
fn idempotent_repeats_return_the_first_reply_and_conflicts_are_refused() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "10");
    let event = h.event(w, "1000", "0", DebitMode::Strict);
    let first = h.run_id(42, Command::Usage(event.clone()));
    let digest = h.engine.digest();
    let journal = h.journal.len();
    assert_eq!(h.run_id(42, Command::Usage(event.clone())), first);
    assert_eq!(h.engine.digest(), digest);
    assert_eq!(h.journal.len(), journal);
    let mut other = event.clone();
    other.quantities[0].value = d("2000");
    assert_eq!(
        h.run_id(42, Command::Usage(other)).code,
        ResultCode::IdempotencyConflict
    );
    assert_eq!(h.engine.digest(), digest);
    // A rejection is remembered too: the repeat is rejected again even after funds arrive.
    let big = h.event(w, "20000", "0", DebitMode::Strict);
    assert_eq!(
        h.run_id(43, Command::Usage(big.clone())).code,
        ResultCode::InsufficientFunds
    );
    h.grant(w, "100");
    assert_eq!(
        h.run_id(43, Command::Usage(big)).code,
        ResultCode::InsufficientFunds
    );
    // After the retention window the id is forgotten (and events that old are refused).
    h.advance(Config::default().idempotency_retention_us + SECOND);
    assert_eq!(
        h.run_id(42, Command::Usage(event)).code,
        ResultCode::TimestampOutOfRange
    );
}

fn refund(wallet: WalletId, event: u128, amount: Option<&str>) -> Command {
    Command::Refund {
        wallet,
        event: RequestId(event),
        amount: amount.map(d),
    }
}

#[test]
fn refunds_are_capped_by_what_was_charged() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "10");
    let event = h.event(w, "3000", "0", DebitMode::Strict);
    h.run_id(10_007, Command::Usage(event));
    assert_eq!(h.balance(w).available, d("7"));
    let value = h.ok(refund(w, 10_007, Some("1")));
    assert!(
        matches!(value, ReplyValue::Refund { refunded, refundable, .. }
        if refunded == d("1") && refundable == d("2"))
    );
    h.rejects(
        refund(w, 10_007, Some("2.5")),
        ResultCode::RefundExceedsCharge,
    );
    let value = h.ok(refund(w, 10_007, None));
    assert!(matches!(value, ReplyValue::Refund { refunded, .. } if refunded == d("2")));
    h.rejects(refund(w, 10_007, None), ResultCode::RefundExceedsCharge);
    assert_eq!(h.balance(w).available, d("10"));
    let margin = h.margin(MarginScope::Total);
    assert_eq!((margin.revenue_usd, margin.refunded_usd), (d("0"), d("3")));
    h.rejects(refund(w, 999, None), ResultCode::UnknownEvent);
    let other = h.wallet("other");
    h.rejects(refund(other, 10_007, None), ResultCode::UnknownEvent);
    h.rejects(refund(w, 10_007, Some("0")), ResultCode::InvalidAmount);
    h.check_ledger();
}

fn topup_grant(h: &mut Harness, w: WalletId, amount: &str, payment: &str) -> GrantId {
    h.grant_with(
        w,
        amount,
        TOPUP_PRIORITY,
        None,
        GrantSource::TopUp {
            payment_id: n(payment),
        },
    )
}

#[test]
fn disputes_claw_back_the_remainder_and_turn_the_spent_part_into_debt() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let paid = topup_grant(&mut h, w, "10", "pi_1");
    let promo = h.grant_with(w, "1", 200, None, GrantSource::Promotion);
    h.usage(w, "4000", "0", DebitMode::Strict); // 4 from the top-up (priority 100 < 200)
    let value = h.ok(Command::Dispute {
        wallet: w,
        grant: paid,
        freeze: true,
    });
    assert_eq!(
        value,
        ReplyValue::Dispute {
            clawed_back: d("6"),
            debt_added: d("4")
        }
    );
    let b = h.balance(w);
    // The promotion's 1 stays; the 4 spent is debt: available 1 - 4.
    assert_eq!((b.available, b.debt, b.ledger), (d("-3"), d("4"), d("-3")));
    assert!(h.view(w).frozen);
    h.rejects(
        Command::Dispute {
            wallet: w,
            grant: paid,
            freeze: false,
        },
        ResultCode::AlreadyDisputed,
    );
    h.rejects(
        Command::Dispute {
            wallet: w,
            grant: promo,
            freeze: false,
        },
        ResultCode::UnknownGrant,
    );
    h.rejects(
        Command::DisputeWon {
            wallet: w,
            grant: promo,
        },
        ResultCode::UnknownGrant,
    );
    let won = h.ok(Command::DisputeWon {
        wallet: w,
        grant: paid,
    });
    assert!(matches!(won, ReplyValue::Grant { debt_paid, .. } if debt_paid == d("4")));
    assert_eq!(h.balance(w).available, d("7"));
    h.rejects(
        Command::DisputeWon {
            wallet: w,
            grant: paid,
        },
        ResultCode::UnknownGrant,
    );
    h.check_ledger();
}

#[test]
fn top_up_payments_are_idempotent_on_the_payment_id() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let first = topup_grant(&mut h, w, "10", "pi_1");
    assert_eq!(topup_grant(&mut h, w, "10", "pi_1"), first);
    assert_eq!(h.balance(w).available, d("10"));
    h.rejects(
        Command::Grant(Grant {
            source: GrantSource::TopUp {
                payment_id: n("pi_1"),
            },
            ..grant_of(w, "11")
        }),
        ResultCode::PaymentConflict,
    );
}

#[test]
fn adjustments_need_a_reason_and_may_create_debt() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let adjust = |amount: &str, reason: &str| Command::Adjust {
        wallet: w,
        asset: usd(),
        amount: d(amount),
        reason: reason.into(),
    };
    h.rejects(adjust("5", "  "), ResultCode::ReasonRequired);
    h.rejects(
        adjust("5", &"x".repeat(REASON_BYTES_MAX + 1)),
        ResultCode::LimitExceeded,
    );
    h.rejects(adjust("0", "zero"), ResultCode::InvalidAmount);
    h.rejects(
        adjust("0.0000001", "too fine"),
        ResultCode::PrecisionExceedsScale,
    );
    h.ok(adjust("5", "goodwill after outage"));
    let value = h.ok(adjust("-7", "manual correction"));
    assert_eq!(
        value,
        ReplyValue::Charge {
            asset: usd(),
            charged: d("7"),
            debt_added: d("2"),
            available: d("-2")
        }
    );
    assert_eq!(h.engine.state().wallets[0].adjustments.len(), 2);
    let accounts = h.accounts();
    assert_eq!(accounts[&(usd(), Account::Adjustment)], d("2"));
    h.check_ledger();
}

#[test]
fn amounts_are_exact_and_bounded() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let grant = |amount: &str| Command::Grant(grant_of(w, amount));
    h.rejects(grant("0"), ResultCode::InvalidAmount);
    h.rejects(grant("-5"), ResultCode::InvalidAmount);
    h.rejects(grant("1.0000001"), ResultCode::PrecisionExceedsScale);
    h.rejects(grant("1000000000000000001"), ResultCode::AmountOverflow);
    h.rejects(
        grant("79228162514264337593543950335"),
        ResultCode::AmountOverflow,
    );
    h.ok(grant("1.100000"));
    h.ok(grant("999999999999999998.9"));
    // The ledger is at the limit (10^18): one millionth more is refused, not rounded.
    h.rejects(grant("0.000001"), ResultCode::AmountOverflow);
    // A quantity near the limit times a price would overflow the charge: refused, not rounded.
    h.ok(Command::DraftPlan {
        plan: n("pricey"),
        custom_for: None,
        asset: usd(),
        rules: vec![rule(&[], "1000000000000", "0")],
    });
    h.ok(Command::PublishPlan { plan: n("pricey") });
    h.ok(Command::AssignPlan {
        wallet: w,
        plan: n("pricey"),
        version: 1,
        effective_from: h.now,
    });
    h.rejects(
        Command::Usage(h.event(w, "1000000000000000", "0", DebitMode::Record)),
        ResultCode::AmountOverflow,
    );
    h.rejects(
        Command::Usage(h.event(w, "10000000000000000", "0", DebitMode::Record)),
        ResultCode::InvalidQuantity,
    );
}

#[test]
fn auto_top_up_requests_once_and_credits_on_success() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.billing(w);
    h.grant(w, "10");
    let rule = TopUpRule {
        asset: usd(),
        threshold: d("5"),
        amount: TopUpAmount::Target(d("20")),
        attempts_max: 3,
        cooldown_us: 0,
        daily_cap: None,
        monthly_cap: None,
        payment_method: n("pm_card"),
    };
    h.ok(Command::SetTopUpRule { wallet: w, rule });
    assert!(h.topups.is_empty());
    h.usage(w, "6000", "0", DebitMode::Strict); // available 4 < 5
    assert_eq!(h.topups.len(), 1);
    let request = h.topups[0];
    assert_eq!((request.amount, request.trigger), (d("16"), 1));
    assert_eq!(request.idempotency_key(), "tally-topup:acme:USD:1");
    h.usage(w, "1000", "0", DebitMode::Strict); // still below, but one is in flight
    assert_eq!(h.topups.len(), 1);
    let success = Command::TopUpSucceeded {
        wallet: w,
        asset: usd(),
        trigger: 1,
        payment_id: n("pi_9"),
        amount: d("16"),
    };
    h.ok(success.clone());
    assert_eq!(h.balance(w).available, d("19"));
    // The processor's webhook may repeat: the payment id makes it a no-op.
    h.ok(success);
    assert_eq!(h.balance(w).available, d("19"));
    h.rejects(
        Command::TopUpFailed {
            wallet: w,
            asset: usd(),
            trigger: 1,
            reason: n("card_declined"),
        },
        ResultCode::StaleTopUp,
    );
    h.usage(w, "15000", "0", DebitMode::Strict); // 4 again: trigger 2
    assert_eq!(h.topups.len(), 2);
    assert_eq!(h.topups[1].trigger, 2);
    h.check_ledger();
}

#[test]
fn auto_top_up_backs_off_after_failures_and_flags_the_wallet() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.billing(w);
    let rule = TopUpRule {
        asset: usd(),
        threshold: d("5"),
        amount: TopUpAmount::Fixed(d("10")),
        attempts_max: 2,
        cooldown_us: 10 * SECOND,
        daily_cap: None,
        monthly_cap: None,
        payment_method: n("pm_card"),
    };
    h.ok(Command::SetTopUpRule { wallet: w, rule });
    assert_eq!(
        h.topups.len(),
        1,
        "a rule set below its threshold triggers at once"
    );
    h.ok(Command::TopUpFailed {
        wallet: w,
        asset: usd(),
        trigger: 1,
        reason: n("card_declined"),
    });
    h.advance(9 * SECOND);
    assert_eq!(h.topups.len(), 1, "no retry inside the backoff");
    h.advance(SECOND);
    assert_eq!(h.topups.len(), 2, "retried when the backoff ends");
    h.ok(Command::TopUpFailed {
        wallet: w,
        asset: usd(),
        trigger: 2,
        reason: n("card_declined"),
    });
    assert_eq!(h.exhausted, vec![(w, usd())]);
    assert_eq!(h.view(w).topup_flagged, vec![usd()]);
    h.advance(HOUR);
    assert_eq!(h.topups.len(), 2, "a flagged wallet requests nothing");
    // Setting the rule again clears the flag; trigger numbers keep counting.
    h.ok(Command::SetTopUpRule { wallet: w, rule });
    assert_eq!(h.topups.len(), 3);
    assert_eq!(h.topups[2].trigger, 3);
    h.rejects(
        Command::TopUpFailed {
            wallet: n("acme"),
            asset: asset("credits"),
            trigger: 1,
            reason: n("card_declined"),
        },
        ResultCode::NoTopUpRule,
    );
}

#[test]
fn auto_top_up_respects_the_daily_cap() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.billing(w);
    let rule = TopUpRule {
        asset: usd(),
        threshold: d("5"),
        amount: TopUpAmount::Fixed(d("10")),
        attempts_max: 3,
        cooldown_us: 0,
        daily_cap: Some(d("15")),
        monthly_cap: None,
        payment_method: n("pm_card"),
    };
    h.ok(Command::SetTopUpRule { wallet: w, rule });
    let amounts = |h: &Harness| h.topups.iter().map(|t| t.amount).collect::<Vec<_>>();
    assert_eq!(amounts(&h), vec![d("10")]);
    h.ok(Command::TopUpSucceeded {
        wallet: w,
        asset: usd(),
        trigger: 1,
        payment_id: n("p1"),
        amount: d("10"),
    });
    h.usage(w, "6000", "0", DebitMode::Strict); // 4 left
    assert_eq!(amounts(&h), vec![d("10"), d("5")]);
    h.ok(Command::TopUpSucceeded {
        wallet: w,
        asset: usd(),
        trigger: 2,
        payment_id: n("p2"),
        amount: d("5"),
    });
    h.usage(w, "6000", "0", DebitMode::Strict); // 3 left, cap reached for today
    assert_eq!(h.topups.len(), 2);
    h.advance(Timestamp::DAY_US);
    h.usage(w, "1000", "0", DebitMode::Strict);
    assert_eq!(amounts(&h), vec![d("10"), d("5"), d("10")]);
}

#[test]
fn margin_is_aggregated_per_wallet_product_plan_and_hour() {
    let mut h = Harness::new();
    let a = h.wallet("a");
    let b = h.wallet("b");
    h.grant(a, "10");
    h.grant(b, "10");
    h.usage(a, "1000", "0", DebitMode::Strict); // 1 USD, cost 0.001
    h.advance(HOUR);
    h.usage(b, "2000", "0", DebitMode::Strict); // 2 USD
    let total = h.margin(MarginScope::Total);
    assert_eq!(
        (total.events, total.revenue_usd, total.cost_usd),
        (2, d("3"), d("0.002"))
    );
    assert_eq!(total.margin_usd, d("2.998"));
    assert_eq!(h.margin(MarginScope::Wallet(a)).revenue_usd, d("1"));
    assert_eq!(h.margin(MarginScope::Product(n("chat"))).events, 2);
    assert_eq!(
        h.margin(MarginScope::PlanVersion {
            plan: n("std"),
            version: 1
        })
        .events,
        2
    );
    let first_hour = h.margin(MarginScope::Hours {
        from: Timestamp(T0),
        to: Timestamp(T0),
    });
    assert_eq!(first_hour.revenue_usd, d("1"));
    assert_eq!(h.margins.len(), 2);
    assert_eq!(h.margins[1].revenue_usd, d("2"));
    // Credits are valued through their USD value.
    h.ok(Command::DraftPlan {
        plan: n("credits"),
        custom_for: None,
        asset: asset("credits"),
        rules: vec![rule(&[], "1", "1")],
    });
    h.ok(Command::PublishPlan { plan: n("credits") });
    h.ok(Command::AssignPlan {
        wallet: a,
        plan: n("credits"),
        version: 1,
        effective_from: h.now,
    });
    h.usage(a, "100", "0", DebitMode::Record);
    assert_eq!(h.margins[2].revenue_usd, d("1.00"));
    assert_eq!(h.margins[2].asset, asset("credits"));
}

#[test]
fn snapshot_restore_keeps_the_digest_and_the_future() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.billing(w);
    h.grant_with(w, "5", 0, Some(h.now.add_us(HOUR)), GrantSource::Promotion);
    topup_grant(&mut h, w, "10", "pi_1");
    h.ok(Command::Reserve {
        wallet: w,
        amount: ReserveAmount::Fixed {
            asset: usd(),
            amount: d("2"),
        },
        deadline: h.now.add_us(60 * SECOND),
    });
    h.ok(Command::SetTopUpRule {
        wallet: w,
        rule: TopUpRule {
            asset: usd(),
            threshold: d("1"),
            amount: TopUpAmount::Fixed(d("10")),
            attempts_max: 3,
            cooldown_us: 0,
            daily_cap: None,
            monthly_cap: None,
            payment_method: n("pm"),
        },
    });
    h.usage(w, "1000", "0", DebitMode::Record);
    let mut restored = h.snapshot_round_trip();
    // Both engines go on through timers and commands and stay identical.
    let later = h.now.add_us(2 * HOUR);
    h.advance(2 * HOUR);
    restored.handle_timeout(later);
    while restored.poll_effect().is_some() {}
    let event = h.event(w, "1000", "0", DebitMode::Record);
    let request = Request {
        id: RequestId(999_999),
        command: Command::Usage(event),
    };
    assert_eq!(
        restored.handle_request(later, &request),
        h.engine.handle_request(later, &request)
    );
    assert_eq!(restored.digest(), h.engine.digest());
}

#[test]
fn a_corrupt_state_is_refused_not_trusted() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "5");
    let mut state = h.engine.state().clone();
    std::sync::Arc::make_mut(&mut state.wallets[0]).balances[0].active = d("6");
    assert!(Engine::from_state(state).is_err());
    let mut state = h.engine.state().clone();
    let twin = state.wallets[0].clone();
    state.wallets.push(twin);
    let error = Engine::from_state(state).unwrap_err();
    assert!(error.to_string().contains("appears twice"), "{error}");
}

fn fixed_rule(amount: &str) -> TopUpRule {
    TopUpRule {
        asset: usd(),
        threshold: d("5"),
        amount: TopUpAmount::Fixed(d(amount)),
        attempts_max: 3,
        cooldown_us: 0,
        daily_cap: None,
        monthly_cap: None,
        payment_method: n("default"),
    }
}

#[test]
fn top_up_rules_need_a_price_and_an_exactly_chargeable_amount() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.billing(w);
    h.ok(Command::PriceAsset {
        asset: usd(),
        price: None,
    });
    h.rejects(
        Command::SetTopUpRule {
            wallet: w,
            rule: fixed_rule("10"),
        },
        ResultCode::NoTopUpPrice,
    );
    h.rejects(
        Command::PriceAsset {
            asset: usd(),
            price: Some(TopUpPrice {
                currency: n("US dollars"),
                unit_amount: d("1"),
            }),
        },
        ResultCode::InvalidPrice,
    );
    h.rejects(
        Command::PriceAsset {
            asset: asset("nope"),
            price: None,
        },
        ResultCode::UnknownAsset,
    );
    h.ok(Command::PriceAsset {
        asset: usd(),
        price: Some(TopUpPrice {
            currency: n("usd"),
            unit_amount: d("1"),
        }),
    });
    // 10.005 USD is not a whole number of cents: refused when the rule is set.
    h.rejects(
        Command::SetTopUpRule {
            wallet: w,
            rule: fixed_rule("10.005"),
        },
        ResultCode::InexactCharge,
    );
    assert!(h.topups.is_empty());
    h.ok(Command::SetTopUpRule {
        wallet: w,
        rule: fixed_rule("10.01"),
    });
    let request = h.topups[0];
    assert_eq!(
        (request.customer, request.payment_method, request.currency),
        (n("cus_1"), n("pm_default"), n("usd"))
    );
    assert_eq!(request.minor_amount, 1001);
}

#[test]
fn a_price_step_rounds_targets_up_and_caps_down() {
    let p = TopUpPrice {
        currency: n("usd"),
        unit_amount: d("0.003"),
    };
    // One credit costs 0.3 cents: ten credits are the smallest whole number of cents.
    assert_eq!(p.step(0), Some(d("10")));
    assert_eq!(p.minor_amount(d("10")), Some(3));
    assert_eq!(p.minor_amount(d("5")), None);
    let yen = TopUpPrice {
        currency: n("jpy"),
        unit_amount: d("1.5"),
    };
    assert_eq!(yen.step(2), Some(d("2.00")));
    assert_eq!(yen.minor_amount(d("4")), Some(6));

    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.billing(w);
    h.grant(w, "10");
    h.ok(Command::SetTopUpRule {
        wallet: w,
        rule: TopUpRule {
            amount: TopUpAmount::Target(d("20")),
            daily_cap: Some(d("30.005")),
            ..fixed_rule("1")
        },
    });
    h.usage(w, "6000.5", "0", DebitMode::Strict); // available 3.9995 (a micro-dollar asset)
    let first = h.topups[0];
    assert_eq!(first.amount, d("16.01"), "rounded up to a whole cent");
    assert_eq!(first.minor_amount, 1601);
    h.ok(Command::TopUpSucceeded {
        wallet: w,
        asset: usd(),
        trigger: 1,
        payment_id: n("pi_1"),
        amount: first.amount,
    });
    h.usage(w, "17000", "0", DebitMode::Strict); // 3.0095 left; 13.99 of the cap left
    assert_eq!(h.topups[1].amount, d("13.99"), "capped, rounded down");
}

#[test]
fn frozen_disputed_or_unbilled_wallets_never_trigger_a_top_up() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let paid = topup_grant(&mut h, w, "10", "pi_1");
    h.ok(Command::SetTopUpRule {
        wallet: w,
        rule: fixed_rule("10"),
    });
    h.usage(w, "6000", "0", DebitMode::Strict); // 4 left, but no customer to charge
    assert!(h.topups.is_empty());
    h.ok(Command::Freeze { wallet: w });
    h.billing(w);
    assert!(h.topups.is_empty(), "frozen");
    h.ok(Command::Payment {
        wallet: w,
        payment_id: n("pi_1"),
        event: PaymentEvent::Disputed { freeze: false },
    });
    h.ok(Command::Unfreeze { wallet: w });
    assert!(h.topups.is_empty(), "a chargeback is open");
    h.usage(w, "1", "0", DebitMode::Record);
    assert!(h.topups.is_empty(), "still open");
    let won = h.ok(Command::Payment {
        wallet: w,
        payment_id: n("pi_1"),
        event: PaymentEvent::DisputeWon,
    });
    assert!(matches!(won, ReplyValue::Grant { grant, .. } if grant != paid));
    // Won back: available is 4 again, below the threshold, and nothing holds it back now.
    assert_eq!(h.topups.len(), 1);
    h.check_ledger();
}

#[test]
fn failed_top_ups_do_not_count_against_the_daily_cap() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.billing(w);
    h.ok(Command::SetTopUpRule {
        wallet: w,
        rule: TopUpRule {
            daily_cap: Some(d("10")),
            cooldown_us: SECOND,
            ..fixed_rule("10")
        },
    });
    assert_eq!(h.topups.len(), 1);
    h.ok(Command::TopUpFailed {
        wallet: w,
        asset: usd(),
        trigger: 1,
        reason: n("card_declined"),
    });
    let view = h.view(w);
    assert_eq!(view.topups[0].last_failure, Some(n("card_declined")));
    assert_eq!(view.topups[0].in_flight, None);
    h.advance(SECOND);
    assert_eq!(
        h.topups.len(),
        2,
        "the cap still has room: nothing was taken"
    );
    assert_eq!(h.topups[1].amount, d("10"));
    assert_eq!(h.view(w).topups[0].in_flight.map(|f| f.0), Some(2));
}

#[test]
fn payment_events_find_the_grant_by_payment_id() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    topup_grant(&mut h, w, "10", "pi_1");
    h.usage(w, "3000", "0", DebitMode::Strict); // 7 left of the top-up
    let refunded = |amount: &str| Command::Payment {
        wallet: w,
        payment_id: n("pi_1"),
        event: PaymentEvent::Refunded {
            refunded: d(amount),
        },
    };
    h.rejects(
        Command::Payment {
            wallet: w,
            payment_id: n("pi_unknown"),
            event: PaymentEvent::DisputeWon,
        },
        ResultCode::UnknownPayment,
    );
    h.rejects(refunded("10.5"), ResultCode::RefundExceedsCharge);
    let value = h.ok(refunded("2"));
    assert_eq!(
        value,
        ReplyValue::Dispute {
            clawed_back: d("2"),
            debt_added: d("0")
        }
    );
    assert_eq!(h.balance(w).available, d("5"));
    // Totals: a repeated or older report changes nothing.
    h.ok(refunded("2"));
    h.ok(refunded("1"));
    assert_eq!(h.balance(w).available, d("5"));
    // A full refund takes what is unspent; the spent 3 stays spent.
    h.ok(refunded("10"));
    assert_eq!(h.balance(w).available, d("0"));
    assert_eq!(h.balance(w).debt, d("0"));
    h.check_ledger();

    // A dispute of a partly refunded payment: the refunded part is neither clawed nor debt.
    let mut h = Harness::new();
    let w = h.wallet("acme");
    topup_grant(&mut h, w, "10", "pi_2");
    h.usage(w, "3000", "0", DebitMode::Strict);
    h.ok(Command::Payment {
        wallet: w,
        payment_id: n("pi_2"),
        event: PaymentEvent::Refunded { refunded: d("4") },
    });
    let value = h.ok(Command::Payment {
        wallet: w,
        payment_id: n("pi_2"),
        event: PaymentEvent::Disputed { freeze: true },
    });
    assert_eq!(
        value,
        ReplyValue::Dispute {
            clawed_back: d("3"),
            debt_added: d("3")
        }
    );
    assert!(h.view(w).frozen);
    h.ok(Command::Payment {
        wallet: w,
        payment_id: n("pi_2"),
        event: PaymentEvent::DisputeWon,
    });
    assert_eq!(h.balance(w).available, d("3"), "6 restored, 3 of debt paid");
    h.check_ledger();
}

#[test]
fn operator_notices_fire_once_per_crossing() {
    let mut h = Harness::new_with(Config {
        low_balance_usd: d("2"),
        grant_expiring_lead_us: 2 * HOUR,
        ..Config::default()
    });
    let w = h.wallet("acme");
    h.grant(w, "5");
    assert!(h.notices.is_empty());
    // 5 → 4: above the line; 4 → 1.5: below it (low), once.
    h.usage(w, "1000", "0", DebitMode::Strict);
    assert!(h.notices.is_empty());
    h.usage(w, "2500", "0", DebitMode::Strict);
    let alert = |alert, available: &str| Effect::BalanceAlert {
        wallet: w,
        asset: usd(),
        alert,
        available: d(available),
    };
    assert_eq!(h.notices, vec![alert(Alert::Low, "1.5")]);
    h.usage(w, "500", "0", DebitMode::Strict);
    assert_eq!(h.notices.len(), 1, "still low: no second notice");
    // 1 → -1 in record mode: depleted and in debt in one input.
    h.usage(w, "2000", "0", DebitMode::Record);
    assert_eq!(
        h.notices[1..],
        [alert(Alert::Depleted, "-1"), alert(Alert::InDebt, "-1")]
    );
    // Back above the line, then down again: a new crossing, a new notice.
    h.grant(w, "10");
    h.usage(w, "8000", "0", DebitMode::Strict);
    assert_eq!(h.notices[3..], [alert(Alert::Low, "1")]);
    // Freezing notifies once; freezing a frozen wallet does not.
    h.ok(Command::Freeze { wallet: w });
    h.ok(Command::Freeze { wallet: w });
    assert_eq!(h.notices[4..], [Effect::WalletFrozen { wallet: w }]);
    // An expiring grant is announced `lead` before it expires, with what is left of it.
    let expires = h.now.add_us(3 * HOUR);
    let g = h.grant_with(w, "4", 0, Some(expires), GrantSource::Promotion);
    h.advance(HOUR - SECOND);
    assert_eq!(h.notices.len(), 5);
    h.advance(SECOND);
    assert_eq!(
        h.notices[5..],
        [Effect::GrantExpiring {
            wallet: w,
            asset: usd(),
            grant: g,
            remaining: d("4"),
            expires_at: expires,
        }]
    );
    // Breakage at expiry takes available below the line again: low.
    h.advance(2 * HOUR);
    assert_eq!(h.notices[6..], [alert(Alert::Low, "1")]);
}

#[test]
fn a_lost_dispute_is_final_and_no_longer_holds_top_ups_back() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.billing(w);
    let paid = topup_grant(&mut h, w, "10", "pi_1");
    h.usage(w, "3000", "0", DebitMode::Strict); // 7 left of the top-up
    let event = |event| Command::Payment {
        wallet: w,
        payment_id: n("pi_1"),
        event,
    };
    h.ok(event(PaymentEvent::Disputed { freeze: false }));
    h.ok(Command::SetTopUpRule {
        wallet: w,
        rule: fixed_rule("10"),
    });
    assert!(h.topups.is_empty(), "a chargeback is open");
    // Lost: the clawback stays (0 available, 3 of debt), and top-ups may charge again.
    assert_eq!(
        h.ok(event(PaymentEvent::DisputeLost { freeze: false })),
        ReplyValue::None
    );
    assert_eq!(h.balance(w).available, d("-3"));
    assert_eq!(h.topups.len(), 1, "no open dispute holds the rule back");
    // Final: a repeat changes nothing, and it cannot be won afterwards.
    h.ok(event(PaymentEvent::DisputeLost { freeze: false }));
    h.rejects(event(PaymentEvent::DisputeWon), ResultCode::NotDisputed);
    h.rejects(
        Command::DisputeWon {
            wallet: w,
            grant: paid,
        },
        ResultCode::NotDisputed,
    );
    let grant = h
        .view(w)
        .grants
        .iter()
        .find(|g| g.remaining > Decimal::ZERO)
        .map(|g| g.id);
    assert_eq!(grant, None, "the clawed-back grant is gone");
    assert_eq!(h.balance(w).available, d("-3"));
    h.check_ledger();

    // Lost without ever being reported open: the clawback is made then, once.
    let mut h = Harness::new();
    let w = h.wallet("acme");
    topup_grant(&mut h, w, "10", "pi_2");
    let lost = Command::Payment {
        wallet: w,
        payment_id: n("pi_2"),
        event: PaymentEvent::DisputeLost { freeze: true },
    };
    assert_eq!(
        h.ok(lost.clone()),
        ReplyValue::Dispute {
            clawed_back: d("10"),
            debt_added: d("0")
        }
    );
    h.run(lost);
    assert_eq!(h.balance(w).available, d("0"));
    assert!(h.view(w).frozen);
    h.check_ledger();
}

#[test]
fn auto_top_up_respects_the_monthly_cap_and_a_new_month_resets_it() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.billing(w);
    h.ok(Command::SetTopUpRule {
        wallet: w,
        rule: TopUpRule {
            asset: usd(),
            threshold: d("5"),
            amount: TopUpAmount::Fixed(d("10")),
            attempts_max: 3,
            cooldown_us: 0,
            daily_cap: None,
            monthly_cap: Some(d("25")),
            payment_method: n("pm_card"),
        },
    });
    let amounts = |h: &Harness| h.topups.iter().map(|t| t.amount).collect::<Vec<_>>();
    // Three requests a day apart: 10, 10, then what is left of 25 this month: 5.
    for i in 1..=3u64 {
        let amount = amounts(&h)[i as usize - 1];
        h.ok(Command::TopUpSucceeded {
            wallet: w,
            asset: usd(),
            trigger: i,
            payment_id: n(&format!("p{i}")),
            amount,
        });
        h.advance(Timestamp::DAY_US);
        let available = h.balance(w).available;
        // Spend down to 4, below the threshold.
        let spend = (available - d("4")) * d("1000");
        h.usage(w, &spend.normalize().to_string(), "0", DebitMode::Strict);
    }
    assert_eq!(amounts(&h), vec![d("10"), d("10"), d("5")]);
    assert_eq!(h.topups.len(), 3, "the month's cap is reached");
    // The next month starts from zero again.
    let now = h.now;
    let next_month = Timestamp::parse_rfc3339(&{
        let month = now.month() + 1;
        format!("{:04}-{:02}-01T00:00:00Z", month / 12, month % 12 + 1)
    })
    .unwrap();
    h.advance(next_month.0 - now.0);
    h.usage(w, "1", "0", DebitMode::Strict);
    assert_eq!(amounts(&h).last(), Some(&d("10")));
}

#[test]
fn a_won_dispute_keeps_an_expiry_that_passed_meanwhile() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let expires = h.now.add_us(HOUR);
    let g = h.grant_with(
        w,
        "10",
        TOPUP_PRIORITY,
        Some(expires),
        GrantSource::TopUp {
            payment_id: n("pi_1"),
        },
    );
    h.ok(Command::Dispute {
        wallet: w,
        grant: g,
        freeze: false,
    });
    assert_eq!(h.balance(w).available, d("0"));
    h.advance(2 * HOUR);
    h.ok(Command::DisputeWon {
        wallet: w,
        grant: g,
    });
    // Restored, and expired at once: the remainder leaves as breakage, not as credit forever.
    h.advance(SECOND);
    assert_eq!(h.balance(w).available, d("0"));
    let last = h.journal.last().unwrap();
    assert_eq!((last.kind, last.amount), (EntryKind::Breakage, d("10")));
    h.check_ledger();
}

// ----- issue 14: rules that lost money or trust -------------------------------------------

fn hold_usd(h: &mut Harness, w: WalletId, amount: &str, lasts_us: i64) -> HoldId {
    hold_of(h.ok(Command::Reserve {
        wallet: w,
        amount: ReserveAmount::Fixed {
            asset: usd(),
            amount: d(amount),
        },
        deadline: h.now.add_us(lasts_us),
    }))
}

#[test]
fn late_usage_is_recorded_while_a_retry_of_it_would_still_be_recognised() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "10");
    let served = h.now;
    // Recorded usage reported 23 hours late is recorded, in the hour it occurred.
    h.advance(23 * HOUR);
    let mut late = h.event(w, "1000", "0", DebitMode::Record);
    late.occurred_at = served;
    assert_eq!(
        charged(h.run_id(7_001, Command::Usage(late.clone()))),
        d("1")
    );
    assert_eq!(
        h.margin(MarginScope::Hours {
            from: served,
            to: served.add_us(SECOND)
        })
        .revenue_usd,
        d("1")
    );
    // Its retry a day later must not be charged again: the id is forgotten by then, and only
    // the event's age tells it apart, so an event that old is refused.
    h.advance(24 * HOUR + SECOND);
    h.rejects(
        Command::Usage(late.clone()),
        ResultCode::TimestampOutOfRange,
    );
    assert_eq!(
        h.run_id(7_001, Command::Usage(late)).code,
        ResultCode::TimestampOutOfRange
    );
    assert_eq!(h.balance(w).available, d("9"));
    // A settlement is never too late: its hold can be settled once.
    let hold = hold_usd(&mut h, w, "2", 7 * 24 * HOUR);
    let reserved = h.now;
    h.advance(3 * 24 * HOUR);
    let mut usage = h.event(w, "2000", "0", DebitMode::Record);
    usage.occurred_at = reserved;
    assert_eq!(
        charged(h.run(Command::Settle {
            wallet: w,
            hold,
            usage
        })),
        d("2")
    );
    // The future bound stays for all.
    let mut ahead = h.event(w, "1000", "0", DebitMode::Record);
    ahead.occurred_at = h.now.add_us(HOUR);
    h.rejects(Command::Usage(ahead), ResultCode::TimestampOutOfRange);
    h.check_ledger();
}

fn usd_rule(threshold: &str, amount: &str, attempts_max: u32) -> TopUpRule {
    TopUpRule {
        asset: usd(),
        threshold: d(threshold),
        amount: TopUpAmount::Fixed(d(amount)),
        attempts_max,
        cooldown_us: 0,
        daily_cap: Some(d("100")),
        monthly_cap: None,
        payment_method: n("pm_card"),
    }
}

/// What wallet `w`'s USD rule counts against its daily cap today.
fn requested_today(h: &Harness, w: WalletId) -> Decimal {
    let state = h.engine.state();
    let wallet = state.wallets.iter().find(|x| x.id == w).unwrap();
    wallet.topups[0].day_total
}

#[test]
fn a_top_up_whose_outcome_never_comes_times_out_and_auto_top_up_goes_on() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.billing(w);
    h.grant(w, "10");
    h.ok(Command::SetTopUpRule {
        wallet: w,
        rule: usd_rule("5", "20", 3),
    });
    h.usage(w, "6000", "0", DebitMode::Strict); // 4 < 5: trigger 1
    assert_eq!(h.topups.len(), 1);
    // The outcome is lost. Before the timeout nothing more is asked.
    h.advance(TOPUP_IN_FLIGHT_TIMEOUT_US - SECOND);
    h.usage(w, "1000", "0", DebitMode::Strict);
    assert_eq!(h.topups.len(), 1);
    h.advance(SECOND);
    let status = &h.view(w).topups[0];
    assert!(status.in_flight.is_none(), "{status:?}");
    assert_eq!(status.last_failure, Some(n(TOPUP_TIMED_OUT)));
    assert_eq!(status.failures, 1);
    // After the back-off (1 s for a rule without cooldown) the rule asks again.
    h.advance(SECOND);
    assert_eq!(h.topups.len(), 2);
    assert_eq!(h.topups[1].trigger, 2);
    // The first charge may have been taken: it still counts against the daily cap (20 + 20).
    assert_eq!(requested_today(&h, w), d("40"));
    // A failure reported for the timed-out trigger is stale; its late success is credited.
    h.rejects(
        Command::TopUpFailed {
            wallet: w,
            asset: usd(),
            trigger: 1,
            reason: n("card_declined"),
        },
        ResultCode::StaleTopUp,
    );
    h.ok(Command::TopUpSucceeded {
        wallet: w,
        asset: usd(),
        trigger: 1,
        payment_id: n("pi_late"),
        amount: d("20"),
    });
    assert_eq!(h.balance(w).available, d("23"));
    // The timeout survives a restart: a fresh engine from the state times trigger 2 out too.
    let state = h.engine.state().clone();
    h.engine = Engine::from_state(state).unwrap();
    h.advance(TOPUP_IN_FLIGHT_TIMEOUT_US);
    assert_eq!(h.view(w).topups[0].failures, 2);
    h.check_ledger();
}

#[test]
fn a_top_up_of_another_amount_than_asked_is_credited_and_stops_the_rule() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.billing(w);
    h.grant(w, "10");
    h.ok(Command::SetTopUpRule {
        wallet: w,
        rule: usd_rule("5", "20", 3),
    });
    h.usage(w, "6000", "0", DebitMode::Strict);
    assert_eq!(h.topups[0].amount, d("20"));
    h.ok(Command::TopUpSucceeded {
        wallet: w,
        asset: usd(),
        trigger: 1,
        payment_id: n("pi_1"),
        amount: d("200"),
    });
    // Paid is paid: 4 + 200. But the rule is stopped and the operator told.
    assert_eq!(h.balance(w).available, d("204"));
    assert_eq!(h.view(w).topup_flagged, vec![usd()]);
    assert_eq!(requested_today(&h, w), d("200"));
    assert_eq!(h.exhausted, vec![(w, usd())]);
    h.usage(w, "200000", "0", DebitMode::Strict); // 4 left: below the threshold
    assert_eq!(h.topups.len(), 1, "a stopped rule asks for nothing");
    h.check_ledger();
}

#[test]
fn money_behind_a_hold_is_set_aside_from_other_debits() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "10");
    let hold = hold_usd(&mut h, w, "8", HOUR);
    // Recorded usage of 5 finds 2 free: the other 3 is debt, the hold keeps its 8.
    let reply = h.usage(w, "5000", "0", DebitMode::Record);
    assert!(
        matches!(reply.value, ReplyValue::Charge { debt_added, available, .. }
            if debt_added == d("3") && available == d("-3")),
        "{reply:?}"
    );
    let b = h.balance(w);
    assert_eq!((b.held, b.debt), (d("8"), d("3")));
    // A debit adjustment likewise.
    let reply = h.run(Command::Adjust {
        wallet: w,
        asset: usd(),
        amount: d("-1"),
        reason: "correction".into(),
    });
    assert!(matches!(reply.value, ReplyValue::Charge { debt_added, .. } if debt_added == d("1")));
    // The hold's own settlement spends what it set aside.
    let usage = h.event(w, "8000", "0", DebitMode::Strict);
    let reply = h.run(Command::Settle {
        wallet: w,
        hold,
        usage,
    });
    assert!(
        matches!(reply.value, ReplyValue::Charge { charged, debt_added, .. }
            if charged == d("8") && debt_added == d("0")),
        "{reply:?}"
    );
    let b = h.balance(w);
    assert_eq!((b.available, b.held, b.debt), (d("-4"), d("0"), d("4")));
    h.check_ledger();
}

#[test]
fn expiry_never_takes_the_money_behind_a_hold() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let expires = h.now.add_us(HOUR);
    h.grant_with(w, "10", 0, Some(expires), GrantSource::Promotion);
    let hold = hold_usd(&mut h, w, "6", 2 * HOUR);
    h.advance(HOUR + SECOND);
    // The grant expired: 4 left as breakage, the 6 behind the hold is kept for it.
    let b = h.balance(w);
    assert_eq!((b.available, b.held, b.ledger), (d("0"), d("6"), d("6")));
    let breakage: Decimal = h
        .journal
        .iter()
        .filter(|j| j.kind == EntryKind::Breakage)
        .map(|j| j.amount)
        .sum();
    assert_eq!(breakage, d("4"));
    // Settling for 2 spends from it; the 4 no longer needed expires at once.
    let usage = h.event(w, "2000", "0", DebitMode::Record);
    let reply = h.run(Command::Settle {
        wallet: w,
        hold,
        usage,
    });
    assert!(matches!(reply.value, ReplyValue::Charge { debt_added, .. } if debt_added.is_zero()));
    let b = h.balance(w);
    assert_eq!((b.available, b.held, b.ledger), (d("0"), d("0"), d("0")));
    let breakage: Decimal = h
        .journal
        .iter()
        .filter(|j| j.kind == EntryKind::Breakage)
        .map(|j| j.amount)
        .sum();
    assert_eq!(breakage, d("8"));

    // A hold that is released or expires gives its kept money to breakage the same way.
    let v = h.wallet("beta");
    h.grant_with(v, "5", 0, Some(h.now.add_us(HOUR)), GrantSource::Promotion);
    hold_usd(&mut h, v, "5", 2 * HOUR);
    h.advance(HOUR + SECOND);
    assert_eq!(h.balance(v).ledger, d("5"));
    h.advance(HOUR);
    assert_eq!(h.balance(v).ledger, d("0"));
    h.check_ledger();
}

#[test]
fn a_dispute_of_an_expired_top_up_turns_only_the_spent_part_into_debt() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let g = h.grant_with(
        w,
        "10",
        TOPUP_PRIORITY,
        Some(h.now.add_us(HOUR)),
        GrantSource::TopUp {
            payment_id: n("pi_1"),
        },
    );
    h.usage(w, "3000", "0", DebitMode::Strict); // 3 spent
    h.advance(2 * HOUR); // 7 expired
    let value = h.ok(Command::Dispute {
        wallet: w,
        grant: g,
        freeze: false,
    });
    assert_eq!(
        value,
        ReplyValue::Dispute {
            clawed_back: d("0"),
            debt_added: d("3")
        }
    );
    let b = h.balance(w);
    assert_eq!((b.debt, b.ledger), (d("3"), d("-3")));
    // The breakage booked for the 7 is reversed into the dispute.
    let accounts = h.accounts();
    let usd = usd();
    assert_eq!(accounts[&(usd, Account::Breakage)], d("0"));
    assert_eq!(accounts[&(usd, Account::Dispute)], d("10"));
    // Won: the 3 of debt is paid back, and the 7 is breakage again.
    h.ok(Command::DisputeWon {
        wallet: w,
        grant: g,
    });
    h.advance(SECOND);
    let accounts = h.accounts();
    assert_eq!(h.balance(w).ledger, d("0"));
    assert_eq!(accounts[&(usd, Account::Breakage)], d("7"));
    assert_eq!(accounts[&(usd, Account::Dispute)], d("0"));
    h.check_ledger();
}

#[test]
fn a_refund_credit_keeps_the_priority_and_expiry_of_what_paid() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let expires = h.now.add_us(HOUR);
    h.grant_with(w, "5", 3, Some(expires), GrantSource::Promotion);
    h.grant(w, "5"); // priority 0, never expires: consumed first
    h.run_id(
        500,
        Command::Usage(h.event(w, "7000", "0", DebitMode::Strict)),
    ); // 5 + 2
    let value = h.ok(refund(w, 500, Some("4")));
    let ReplyValue::Refund { grant, .. } = value else {
        panic!("{value:?}")
    };
    let last = *h.journal.last().unwrap();
    assert_eq!(
        (last.kind, last.from, last.grant),
        (EntryKind::Refund, Account::Refund, Some(grant))
    );
    // Paid by a never-expiring grant (and an expiring one): the credit never expires, and
    // is spent where the first paying grant was.
    let view = h.view(w);
    let credit = view.grants.iter().find(|g| g.id == grant).unwrap();
    assert_eq!((credit.priority, credit.expires_at), (0, None));

    // Paid only by expiring credit: the refund expires with it; after that, at once.
    let v = h.wallet("beta");
    h.grant_with(v, "5", 7, Some(expires), GrantSource::Promotion);
    h.run_id(
        600,
        Command::Usage(h.event(v, "2000", "0", DebitMode::Strict)),
    );
    h.run_id(
        601,
        Command::Usage(h.event(v, "2000", "0", DebitMode::Strict)),
    );
    let ReplyValue::Refund { grant, .. } = h.ok(refund(v, 600, None)) else {
        panic!()
    };
    let view = h.view(v);
    let credit = view.grants.iter().find(|g| g.id == grant).unwrap();
    assert_eq!((credit.priority, credit.expires_at), (7, Some(expires)));
    h.advance(2 * HOUR);
    assert_eq!(h.balance(v).ledger, d("0"));
    h.ok(refund(v, 601, None));
    let last = *h.journal.last().unwrap();
    assert_eq!((last.kind, last.amount), (EntryKind::Breakage, d("2")));
    assert_eq!(h.balance(v).ledger, d("0"));
    // Usage that went into debt refunds as cash: it pays the debt, never expires.
    let x = h.wallet("gamma");
    h.run_id(
        700,
        Command::Usage(h.event(x, "2000", "0", DebitMode::Record)),
    );
    h.ok(refund(x, 700, None));
    assert_eq!((h.balance(x).debt, h.balance(x).ledger), (d("0"), d("0")));
    h.check_ledger();
}

#[test]
fn request_ids_are_scoped_by_wallet_so_shards_cannot_disagree() {
    // Two wallets on one engine, and the same two on two engines (two shards): the same request
    // id applies once per wallet either way.
    let mut one = Harness::new();
    let (a, b) = (one.wallet("a"), one.wallet("b"));
    one.grant(a, "5");
    one.grant(b, "5");
    let ua = Command::Usage(one.event(a, "1000", "0", DebitMode::Strict));
    let ub = Command::Usage(one.event(b, "1000", "0", DebitMode::Strict));
    assert_eq!(charged(one.run_id(900, ua.clone())), d("1"));
    assert_eq!(charged(one.run_id(900, ub.clone())), d("1"));
    // Exact repeats are repeats; a changed body for the same wallet is a conflict.
    assert_eq!(charged(one.run_id(900, ua.clone())), d("1"));
    assert_eq!(one.balance(a).available, d("4"));
    let changed = Command::Usage(one.event(a, "1001", "0", DebitMode::Strict));
    assert_eq!(
        one.run_id(900, changed).code,
        ResultCode::IdempotencyConflict
    );
    let mut two = [Harness::new(), Harness::new()];
    two[0].wallet("a");
    two[1].wallet("b");
    two[0].grant(a, "5");
    two[1].grant(b, "5");
    two[0].run_id(900, ua);
    two[1].run_id(900, ub);
    assert_eq!(two[0].balance(a), one.balance(a));
    assert_eq!(two[1].balance(b), one.balance(b));
    one.check_ledger();
}

#[test]
fn the_idempotency_table_is_bounded_and_forgets_the_oldest_first() {
    let mut h = Harness::new_with(Config {
        idempotency_max_ids: 1_000,
        ..Config::default()
    });
    let w = h.wallet("acme");
    h.grant(w, "100");
    let first = h.next_id;
    let usage = Command::Usage(h.event(w, "1", "0", DebitMode::Strict)); // 0.001
    let reply = h.run_id(first, usage.clone());
    assert_eq!(charged(reply), d("0.001"));
    // A repeat gets the first outcome and amounts, and the balance as it is now.
    h.ok(Command::Grant(grant_of(w, "5")));
    let again = h.run_id(first, usage.clone());
    assert_eq!(
        again.value,
        ReplyValue::Charge {
            asset: usd(),
            charged: d("0.001"),
            debt_added: d("0"),
            available: d("104.999")
        }
    );
    assert_eq!(h.engine.state().requests.len(), h.next_id as usize - 1);
    // 1,000 more requests: the table never holds more than 1,000, the oldest go first.
    for _ in 0..1_000 {
        h.advance(SECOND);
        h.usage(w, "1", "0", DebitMode::Record);
    }
    assert_eq!(h.engine.state().requests.len(), 1_000);
    assert!(h.engine.idempotency_evicted() > 0);
    let newest = h.next_id - 1;
    assert_eq!(
        charged(h.run_id(
            newest,
            Command::Usage(h.event(w, "1", "0", DebitMode::Record))
        )),
        d("0.001")
    );
    assert_eq!(h.balance(w).available, d("103.999"));
    // The first id was forgotten early, so the table no longer answers for events that old:
    // its retry is refused rather than charged again.
    assert_eq!(h.run_id(first, usage).code, ResultCode::TimestampOutOfRange);
    assert_eq!(h.balance(w).available, d("103.999"));
    // Snapshot and restore keep the table and its answers.
    let state = h.engine.state().clone();
    let restored = Engine::from_state(state).unwrap();
    assert_eq!(restored.digest(), h.engine.digest());
    h.engine = restored;
    assert_eq!(
        h.run_id(
            newest,
            Command::Usage(h.event(w, "1", "0", DebitMode::Record))
        )
        .code,
        ResultCode::Ok
    );
    assert_eq!(h.balance(w).available, d("103.999"));
    h.check_ledger();
}

#[test]
fn balances_of_a_fine_asset_stay_exact_or_are_refused() {
    // An asset with 18 decimal places: Decimal holds 28 digits, so balances are capped at 10^10
    // units and every sum stays exact. Before, three grants of 2.6 × 10^10 summed to a rounded
    // ledger without a word.
    let mut h = Harness::new();
    h.ok(Command::DefineAsset {
        code: asset("ETH"),
        scale: 18,
        usd_value: d("3000"),
    });
    let w = h.wallet("acme");
    let grant = |amount: &str| {
        Command::Grant(Grant {
            asset: asset("ETH"),
            ..grant_of(w, amount)
        })
    };
    h.rejects(
        grant("26000000000.000000000000000001"),
        ResultCode::AmountOverflow,
    );
    h.ok(grant("9999999999.999999999999999999"));
    h.rejects(grant("0.000000000000000002"), ResultCode::AmountOverflow);
    h.rejects(grant("1"), ResultCode::AmountOverflow);
    let view = h.view(w);
    let eth = view
        .balances
        .iter()
        .find(|b| b.asset == asset("ETH"))
        .unwrap();
    assert_eq!(eth.ledger, d("9999999999.999999999999999999"));
    // A debit adjustment beyond the debt limit is refused too.
    h.ok(Command::Adjust {
        wallet: w,
        asset: asset("ETH"),
        amount: d("-9999999999.999999999999999999"),
        reason: "spent".into(),
    });
    let more = Command::Adjust {
        wallet: w,
        asset: asset("ETH"),
        amount: d("-9999999999.999999999999999999"),
        reason: "more".into(),
    };
    h.ok(more.clone()); // all of it debt, at the limit
    h.rejects(more, ResultCode::AmountOverflow);
    h.check_ledger();
}

#[test]
fn a_wallet_has_at_most_one_top_up_in_flight_whatever_the_asset() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.billing(w);
    h.ok(Command::SetTopUpRule {
        wallet: w,
        rule: usd_rule("5", "20", 3),
    });
    h.ok(Command::SetTopUpRule {
        wallet: w,
        rule: TopUpRule {
            asset: asset("credits"),
            threshold: d("100"),
            amount: TopUpAmount::Fixed(d("500")),
            ..usd_rule("5", "20", 3)
        },
    });
    // Both balances are below their thresholds; only one charge goes out.
    assert_eq!(h.topups.len(), 1);
    let first = h.topups[0];
    // When its outcome comes, the other asset's turn comes.
    h.ok(Command::TopUpSucceeded {
        wallet: w,
        asset: first.asset,
        trigger: first.trigger,
        payment_id: n("pi_1"),
        amount: first.amount,
    });
    assert_eq!(h.topups.len(), 2);
    assert_ne!(h.topups[1].asset, first.asset);
    // A failure ends it just as well.
    let second = h.topups[1];
    h.ok(Command::TopUpFailed {
        wallet: w,
        asset: second.asset,
        trigger: second.trigger,
        reason: n("card_declined"),
    });
    h.check_ledger();
}

#[test]
fn a_settle_reports_the_balance_after_what_its_hold_kept_from_expiring() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant_with(
        w,
        "3.75",
        0,
        Some(h.now.add_us(60 * SECOND)),
        GrantSource::Promotion,
    );
    let hold = hold_usd(&mut h, w, "3.75", 120 * SECOND);
    h.advance(60 * SECOND); // expired, kept behind the hold
    assert_eq!(h.balance(w).ledger, d("3.75"));
    let usage = h.event(w, "10", "0", DebitMode::Record); // 0.01
    let reply = h.run(Command::Settle {
        wallet: w,
        hold,
        usage,
    });
    // The other 3.74 broke with the settle: the reply says so.
    assert_eq!(
        reply.value,
        ReplyValue::Charge {
            asset: usd(),
            charged: d("0.01"),
            debt_added: d("0"),
            available: d("0")
        }
    );
    assert_eq!(h.balance(w).ledger, d("0"));
    h.check_ledger();
}

#[test]
fn a_restored_shard_keeps_what_a_hold_kept_from_expiring() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant_with(
        w,
        "1",
        0,
        Some(h.now.add_us(60 * SECOND)),
        GrantSource::Promotion,
    );
    hold_usd(&mut h, w, "1", 60 * SECOND + 1);
    h.advance(60 * SECOND); // expired, kept behind the hold for one more microsecond
    h.grant(w, "1");
    // A shard restored from this state must do what the live one does at its next input.
    let mut restored = Engine::from_state(h.engine.state().clone()).unwrap();
    let request = Request {
        id: RequestId(1_000_000),
        command: Command::Usage(h.event(w, "0", "0", DebitMode::Record)),
    };
    let live = h.engine.handle_request(h.now, &request);
    let again = restored.handle_request(h.now, &request);
    assert_eq!(live, again);
    assert_eq!(restored.digest(), h.engine.digest());
}

#[test]
fn idempotency_settings_can_change_as_an_input() {
    let mut h = Harness::new_with(Config {
        idempotency_max_ids: 100,
        ..Config::default()
    });
    let w = h.wallet("acme");
    h.grant(w, "10");
    let first = h.next_id;
    let usage = Command::Usage(h.event(w, "1000", "0", DebitMode::Record));
    h.run_id(first, usage.clone());
    for _ in 0..20 {
        h.advance(SECOND);
        h.usage(w, "0", "0", DebitMode::Record);
    }
    let before = h.engine.state().requests.len();
    // A smaller bound forgets the oldest at once; the first usage's retry is then refused, not
    // charged again.
    h.engine.set_idempotency(h.now, 24 * HOUR, 10).unwrap();
    assert_eq!(h.engine.state().requests.len(), 10);
    assert!(before > 10);
    assert_eq!(h.run_id(first, usage).code, ResultCode::TimestampOutOfRange);
    assert_eq!(h.balance(w).available, d("9"));
    // A longer window does not claim to remember what the shorter one forgot.
    h.engine.set_idempotency(h.now, HOUR, 100).unwrap();
    h.advance(2 * HOUR);
    h.engine.set_idempotency(h.now, 24 * HOUR, 100).unwrap();
    let mut old = h.event(w, "1000", "0", DebitMode::Record);
    old.occurred_at = h.now.add_us(-90 * 60 * SECOND);
    h.rejects(Command::Usage(old), ResultCode::TimestampOutOfRange);
    // Bad settings are refused and change nothing.
    assert!(h.engine.set_idempotency(h.now, 0, 100).is_err());
    assert_eq!(h.engine.state().config.idempotency_retention_us, 24 * HOUR);
    h.check_ledger();
}

#[test]
fn a_repeat_of_a_reply_kept_whole_reports_the_balance_of_now_too() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    // 2,147,483,649 tokens at 0.001: a debt whose mantissa does not fit the packed record.
    let usage = Command::Usage(h.event(w, "2147483649", "0", DebitMode::Record));
    let first = h.run_id(4_242, usage.clone());
    assert!(
        matches!(first.value, ReplyValue::Charge { debt_added, .. } if debt_added == d("2147483.649"))
    );
    h.grant(w, "1000");
    let again = h.run_id(4_242, usage);
    assert_eq!(
        again.value,
        ReplyValue::Charge {
            asset: usd(),
            charged: d("2147483.649"),
            debt_added: d("2147483.649"),
            available: d("-2146483.649")
        }
    );
    assert_eq!(h.balance(w).available, d("-2146483.649"));
}

#[test]
fn alert_settings_can_change_as_an_input() {
    let mut h = Harness::new_with(Config {
        grant_expiring_lead_us: HOUR,
        ..Config::default()
    });
    let w = h.wallet("acme");
    let expiring = |h: &Harness| -> Vec<GrantId> {
        h.notices
            .iter()
            .filter_map(|n| match n {
                Effect::GrantExpiring { grant, .. } => Some(*grant),
                _ => None,
            })
            .collect()
    };
    let at = |h: &Harness, us: i64| Some(h.now.add_us(us));
    // Inside the one-hour lead at once: announced at once.
    let a = h.grant_with(w, "1", 0, at(&h, 30 * 60 * SECOND), GrantSource::Promotion);
    let b = h.grant_with(w, "2", 0, at(&h, 2 * HOUR), GrantSource::Promotion);
    let c = h.grant_with(w, "3", 0, at(&h, 5 * HOUR), GrantSource::Promotion);
    assert_eq!(expiring(&h), [a]);
    // A three-hour lead: b is inside it and was never announced, so it is now; a is not again;
    // c's notice moves from 4 h to 2 h from now.
    h.engine.set_alerts(h.now, Decimal::ZERO, 3 * HOUR).unwrap();
    h.advance(0);
    assert_eq!(expiring(&h), [a, b]);
    h.advance(2 * HOUR - SECOND);
    assert_eq!(expiring(&h), [a, b]);
    h.advance(SECOND);
    assert_eq!(expiring(&h), [a, b, c]);
    // Notices off: a grant inside any lead is not announced.
    h.engine.set_alerts(h.now, Decimal::ZERO, 0).unwrap();
    h.grant_with(w, "4", 0, at(&h, 60 * SECOND), GrantSource::Promotion);
    h.advance(30 * SECOND);
    assert_eq!(expiring(&h), [a, b, c]);
    // A low-balance line set later applies from then on.
    let low = |h: &Harness| {
        h.notices
            .iter()
            .filter(|n| {
                matches!(
                    n,
                    Effect::BalanceAlert {
                        alert: Alert::Low,
                        ..
                    }
                )
            })
            .count()
    };
    h.grant(w, "10"); // 3 + 4 + 10 = 17
    h.usage(w, "14000", "0", DebitMode::Strict); // 17 → 3, no line yet
    assert_eq!(low(&h), 0);
    h.grant(w, "10");
    h.engine.set_alerts(h.now, d("4"), 0).unwrap();
    h.usage(w, "10000", "0", DebitMode::Strict); // 13 → 3, across the line of 4
    assert_eq!(low(&h), 1);
    // Bad settings are refused and change nothing.
    assert!(h.engine.set_alerts(h.now, d("-1"), HOUR).is_err());
    assert!(h.engine.set_alerts(h.now, d("1"), -1).is_err());
    assert_eq!(h.engine.state().config.low_balance_usd, d("4"));
    assert_eq!(h.engine.state().config.grant_expiring_lead_us, 0);
    h.check_ledger();
}

/// The charge of the newest margin record as the history store records it, with a refund
/// window of `window` from when it occurred.
fn recorded(h: &Harness, applied_at: Timestamp, window: i64) -> RecordedCharge {
    let m = h.margins.last().expect("a charge");
    RecordedCharge {
        asset: m.asset,
        charged: m.charged,
        product: m.product,
        plan: m.plan,
        version: m.version,
        occurred_at: m.occurred_at,
        applied_at,
        credit_priority: m.credit_priority,
        credit_expires_at: m.credit_expires_at,
        refundable_until: m.occurred_at.add_us(window),
    }
}

fn recorded_refund(h: &mut Harness, id: u128, refund: Command, charge: &RecordedCharge) -> Reply {
    let request = Request {
        id: RequestId(id),
        command: refund,
    };
    let reply = h.engine.handle_recorded_refund(h.now, &request, charge);
    h.advance(0);
    reply
}

#[test]
fn a_charge_past_the_idempotency_window_is_refunded_as_recorded_never_above_what_was_charged() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let expires = h.now.add_us(400 * 24 * HOUR);
    h.grant_with(w, "10", 7, Some(expires), GrantSource::Promotion);
    let applied = h.now;
    let event = RequestId(h.next_id);
    h.usage(w, "4000", "0", DebitMode::Strict); // 4 charged
    let m = *h.margins.last().unwrap();
    assert_eq!((m.credit_priority, m.credit_expires_at), (7, Some(expires)));
    // Inside the window: 1 refunded from the remembered charge.
    let refund = |amount: Option<&str>| Command::Refund {
        wallet: w,
        event,
        amount: amount.map(d),
    };
    assert!(h.run(refund(Some("1"))).code.is_ok());
    // Thirty days on, the table has forgotten the event: a plain refund does not know it.
    h.advance(30 * 24 * HOUR);
    assert_eq!(h.run(refund(Some("1"))).code, ResultCode::UnknownEvent);
    let charge = recorded(&h, applied, 90 * 24 * HOUR);
    // What was refunded inside the window still counts: 3 are left, not 4.
    let id = h.next_id + 100;
    let reply = recorded_refund(&mut h, id, refund(Some("3.01")), &charge);
    assert_eq!(reply.code, ResultCode::RefundExceedsCharge);
    let reply = recorded_refund(&mut h, id + 1, refund(Some("2")), &charge);
    assert_eq!(reply.code, ResultCode::Ok);
    let ReplyValue::Refund {
        grant, refundable, ..
    } = reply.value
    else {
        panic!("{reply:?}")
    };
    assert_eq!(refundable, d("1"));
    // The credit takes the place of what paid: the grant's priority and expiry.
    let view = h.view(w);
    let credit = view.grants.iter().find(|g| g.id == grant).unwrap();
    assert_eq!((credit.priority, credit.expires_at), (7, Some(expires)));
    // A retry is a repeat, answered from memory, not applied again.
    let again = recorded_refund(&mut h, id + 1, refund(Some("2")), &charge);
    assert_eq!(again.value, reply.value);
    assert_eq!(h.balance(w).available, d("9"));
    // Across a snapshot: the rest (1), and then nothing.
    h.engine = Engine::from_state(h.engine.state().clone()).unwrap();
    let reply = recorded_refund(&mut h, id + 2, refund(None), &charge);
    assert!(matches!(reply.value, ReplyValue::Refund { refunded, .. } if refunded == d("1")));
    let reply = recorded_refund(&mut h, id + 3, refund(None), &charge);
    assert_eq!(reply.code, ResultCode::RefundExceedsCharge);
    assert_eq!(h.balance(w).available, d("10"));
    // Past the refund window: refused.
    h.advance(61 * 24 * HOUR);
    let reply = recorded_refund(&mut h, id + 4, refund(Some("0.01")), &charge);
    assert_eq!(reply.code, ResultCode::UnknownEvent);
    // What the engine kept of it goes once the longest window any server allows has passed
    // (it was refunded inside the idempotency window, before any window was known).
    assert_eq!(h.engine.state().late_refunds.len(), 1);
    h.advance(LATE_REFUND_KEEP_US - 90 * 24 * HOUR);
    assert!(h.engine.state().late_refunds.is_empty());
    h.check_ledger();
}

#[test]
fn a_recorded_charge_is_not_taken_for_an_event_the_table_still_answers_for() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "10");
    let applied = h.now;
    let event = RequestId(h.next_id);
    h.usage(w, "4000", "0", DebitMode::Strict);
    let mut charge = recorded(&h, applied, 90 * 24 * HOUR);
    // A charge the engine remembers is refunded from its own record: a recorded one claiming
    // more is ignored.
    charge.charged = d("1000");
    let refund = |amount: &str| Command::Refund {
        wallet: w,
        event,
        amount: Some(d(amount)),
    };
    let reply = recorded_refund(&mut h, 900, refund("5"), &charge);
    assert_eq!(reply.code, ResultCode::RefundExceedsCharge);
    // An event applied since the table answers for, that it does not hold, was not a charge:
    // a forged record of one is refused.
    let forged = RequestId(424_242);
    let reply = recorded_refund(
        &mut h,
        901,
        Command::Refund {
            wallet: w,
            event: forged,
            amount: Some(d("1")),
        },
        &charge,
    );
    assert_eq!(reply.code, ResultCode::UnknownEvent);
    assert_eq!(h.balance(w).available, d("6"));
    assert!(h.engine.state().late_refunds.is_empty());
}

#[test]
fn a_wallet_keeps_only_its_latest_adjustments() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    let extra = 6;
    for i in 0..ADJUSTMENTS_KEPT + extra {
        h.ok(Command::Adjust {
            wallet: w,
            asset: usd(),
            amount: d("0.01"),
            reason: format!("goodwill {i}"),
        });
    }
    let wallet = h
        .engine
        .state()
        .wallets
        .iter()
        .find(|x| x.id == w)
        .unwrap()
        .clone();
    assert_eq!(wallet.adjustments.len(), ADJUSTMENTS_KEPT);
    assert_eq!(wallet.adjustments[0].reason, format!("goodwill {extra}"));
    assert_eq!(
        wallet.adjustments.last().unwrap().reason,
        format!("goodwill {}", ADJUSTMENTS_KEPT + extra - 1)
    );
    // Every adjustment still moved money and is in the journal.
    assert_eq!(h.balance(w).available, d("0.70"));
    h.check_ledger();
}

#[test]
fn a_refund_window_raised_later_never_finds_a_refunded_charge_forgotten() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "10");
    let applied = h.now;
    let event = RequestId(h.next_id);
    h.usage(w, "4000", "0", DebitMode::Strict); // 4
    let refund = Command::Refund {
        wallet: w,
        event,
        amount: None,
    };
    h.advance(2 * 24 * HOUR);
    // Refunded in full under a 30-day window...
    let short = recorded(&h, applied, 30 * 24 * HOUR);
    assert!(recorded_refund(&mut h, 500, refund.clone(), &short)
        .code
        .is_ok());
    // ... then, past it, under a 90-day one: nothing is left.
    h.advance(29 * 24 * HOUR);
    let long = recorded(&h, applied, 90 * 24 * HOUR);
    assert_eq!(
        recorded_refund(&mut h, 501, refund, &long).code,
        ResultCode::RefundExceedsCharge
    );
    assert_eq!(h.balance(w).available, d("10"));
}

#[test]
fn a_request_id_reused_after_the_window_never_refunds_either_charge_beyond_itself() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "20");
    let id = 7_000;
    let refund = |amount: Option<&str>| Command::Refund {
        wallet: w,
        event: RequestId(id),
        amount: amount.map(d),
    };
    // Charge A (4), refunded in full past the window.
    let a_applied = h.now;
    h.run_id(
        id,
        Command::Usage(h.event(w, "4000", "0", DebitMode::Strict)),
    );
    let a = recorded(&h, a_applied, 90 * 24 * HOUR);
    h.advance(2 * 24 * HOUR);
    assert!(recorded_refund(&mut h, 8_000, refund(None), &a)
        .code
        .is_ok());
    // The id is reused for charge B (4), partly refunded inside its window.
    h.run_id(
        id,
        Command::Usage(h.event(w, "4000", "0", DebitMode::Strict)),
    );
    assert!(h.run(refund(Some("0.5"))).code.is_ok());
    h.advance(2 * 24 * HOUR);
    // A is not refundable again.
    assert_eq!(
        recorded_refund(&mut h, 8_001, refund(Some("0.01")), &a).code,
        ResultCode::RefundExceedsCharge
    );
    assert_eq!(h.balance(w).available, d("16.5"));
    // Live and restored engines keep the same entries, to the end.
    let restored = Engine::from_state(h.engine.state().clone()).unwrap();
    h.advance(400 * 24 * HOUR);
    let mut restored = restored;
    restored.handle_timeout(h.now);
    assert!(h.engine.state().late_refunds.is_empty());
    assert_eq!(restored.state().late_refunds, h.engine.state().late_refunds);
    assert_eq!(restored.digest(), h.engine.digest());
}

#[test]
fn charges_applied_before_a_conversion_are_not_refunded_past_the_window() {
    let mut h = Harness::new();
    let w = h.wallet("acme");
    h.grant(w, "10");
    let applied = h.now;
    let event = RequestId(h.next_id);
    h.usage(w, "4000", "0", DebitMode::Strict);
    // The previous release wrote this state; it did not keep what was refunded of forgotten
    // charges.
    let v2 = tally_engine::legacy::v2_for_tests(h.engine.state());
    h.engine = Engine::from_state(State::from(v2)).unwrap();
    h.advance(2 * 24 * HOUR);
    let charge = recorded(&h, applied, 90 * 24 * HOUR);
    let refund = Command::Refund {
        wallet: w,
        event,
        amount: Some(d("1")),
    };
    assert_eq!(
        recorded_refund(&mut h, 600, refund, &charge).code,
        ResultCode::UnknownEvent
    );
    // A charge made after the conversion is.
    let applied = h.now;
    let event = RequestId(h.next_id);
    h.usage(w, "1000", "0", DebitMode::Strict);
    h.advance(2 * 24 * HOUR);
    let charge = recorded(&h, applied, 90 * 24 * HOUR);
    let refund = Command::Refund {
        wallet: w,
        event,
        amount: None,
    };
    assert!(recorded_refund(&mut h, 601, refund, &charge).code.is_ok());
}
