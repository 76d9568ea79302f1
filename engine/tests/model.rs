//! Proptest of the engine against a small, obviously correct reference model.
//!
//! The model keeps one signed balance and a held total per wallet (one asset, no overdraft, no
//! expiring grants), which is all the rules below need. Over random command sequences it checks
//! that every reply code matches the model, that balances match, that strict usage never takes
//! available below zero, that idempotent repeats change nothing, that the journal sums to zero
//! and mirrors every wallet, that replaying the command log rebuilds the same digest, and that
//! snapshot → restore keeps it.

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use rust_decimal::Decimal;
use tally_engine::*;

const WALLETS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    Grant {
        wallet: usize,
        cents: u32,
    },
    Usage {
        wallet: usize,
        input: u32,
        output: u32,
        strict: bool,
    },
    /// Strict usage priced at exactly what the wallet has available (when that is positive).
    SpendAll {
        wallet: usize,
    },
    Reserve {
        wallet: usize,
        cents: u32,
    },
    Settle {
        hold: usize,
        input: u32,
        output: u32,
    },
    Release {
        hold: usize,
    },
    Refund {
        event: usize,
        cents: Option<u32>,
    },
    Repeat {
        request: usize,
    },
    Conflict {
        request: usize,
    },
    Advance {
        seconds: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let wallet = 0..WALLETS;
    prop_oneof![
        3 => (wallet.clone(), 1..5_000u32).prop_map(|(wallet, cents)| Op::Grant { wallet, cents }),
        6 => (wallet.clone(), 0..5_000u32, 0..3_000u32, any::<bool>())
            .prop_map(|(wallet, input, output, strict)| Op::Usage { wallet, input, output, strict }),
        2 => (wallet.clone(), 1..2_000u32).prop_map(|(wallet, cents)| Op::Reserve { wallet, cents }),
        1 => wallet.prop_map(|wallet| Op::SpendAll { wallet }),
        2 => (any::<usize>(), 0..5_000u32, 0..3_000u32)
            .prop_map(|(hold, input, output)| Op::Settle { hold, input, output }),
        1 => any::<usize>().prop_map(|hold| Op::Release { hold }),
        2 => (any::<usize>(), proptest::option::of(1..1_000u32))
            .prop_map(|(event, cents)| Op::Refund { event, cents }),
        2 => any::<usize>().prop_map(|request| Op::Repeat { request }),
        1 => any::<usize>().prop_map(|request| Op::Conflict { request }),
        1 => (1..1_200u32).prop_map(|seconds| Op::Advance { seconds }),
    ]
}

#[derive(Clone, Copy, Debug, Default)]
struct ModelWallet {
    /// Grants − debt. Negative means debt (grants are then all spent).
    balance: Decimal,
    held: Decimal,
}

#[derive(Clone, Copy, Debug)]
struct ModelHold {
    wallet: usize,
    id: HoldId,
    amount: Decimal,
    deadline: Timestamp,
    open: bool,
}

#[derive(Clone, Copy, Debug)]
struct ModelCharge {
    wallet: usize,
    request: u128,
    charged: Decimal,
    refunded: Decimal,
}

/// What to record in the model once the engine has answered Ok (ids come from the reply).
type OnOk = Box<
    dyn FnMut(
        &Reply,
        &mut [ModelWallet; WALLETS],
        &mut Vec<ModelHold>,
        &mut Vec<ModelCharge>,
        u128,
    ),
>;

/// Once the engine accepts a charge, the model remembers it (under the engine's request id) so
/// refunds can refer to it.
fn record_charge(wallet: usize, charged: Decimal) -> OnOk {
    Box::new(move |_, _, _, charges, id| {
        charges.push(ModelCharge {
            wallet,
            request: id,
            charged,
            refunded: Decimal::ZERO,
        })
    })
}

fn price(input: u32, output: u32) -> Decimal {
    Decimal::from(input) * d("0.001") + Decimal::from(output) * d("0.002")
}

fn cents(c: u32) -> Decimal {
    Decimal::new(i64::from(c), 2)
}

fn run(ops: Vec<Op>) {
    let mut h = Harness::new();
    let wallets: Vec<WalletId> = (0..WALLETS).map(|i| h.wallet(&format!("w{i}"))).collect();
    let mut model = [ModelWallet::default(); WALLETS];
    let mut holds: Vec<ModelHold> = Vec::new();
    let mut charges: Vec<ModelCharge> = Vec::new();
    let mut sent: Vec<(u128, Command, Reply)> = Vec::new();

    for op in ops {
        // `None`: the hold is closed, and any "closed" code is right.
        let expected_code: Option<ResultCode>;
        let command;
        let mut on_ok: OnOk = Box::new(|_, _, _, _, _| {});
        match op {
            Op::Advance { seconds } => {
                h.advance(i64::from(seconds) * Timestamp::SECOND_US);
                for hold in holds.iter_mut().filter(|x| x.open && x.deadline <= h.now) {
                    hold.open = false;
                    model[hold.wallet].held -= hold.amount;
                }
                continue;
            }
            Op::Repeat { .. } | Op::Conflict { .. } if sent.is_empty() => continue,
            Op::Repeat { request } => {
                let (id, command, reply) = sent[request % sent.len()].clone();
                let digest = h.engine.digest();
                assert_eq!(
                    h.run_id(id, command),
                    reply,
                    "a repeat must get the first reply"
                );
                assert_eq!(h.engine.digest(), digest, "a repeat must change nothing");
                continue;
            }
            Op::Conflict { request } => {
                let (id, _, _) = sent[request % sent.len()].clone();
                let digest = h.engine.digest();
                let other = Command::Freeze {
                    wallet: n("someone-else"),
                };
                assert_eq!(h.run_id(id, other).code, ResultCode::IdempotencyConflict);
                assert_eq!(h.engine.digest(), digest);
                continue;
            }
            Op::Grant { wallet, cents: c } => {
                expected_code = Some(ResultCode::Ok);
                command = Command::Grant(Grant {
                    wallet: wallets[wallet],
                    asset: asset("USD"),
                    amount: cents(c),
                    priority: c % 3,
                    effective_at: None,
                    expires_at: None,
                    source: GrantSource::Promotion,
                });
                model[wallet].balance += cents(c);
            }
            Op::Usage {
                wallet,
                input,
                output,
                strict,
            } => {
                let charge = price(input, output);
                let m = &mut model[wallet];
                let mode = if strict {
                    DebitMode::Strict
                } else {
                    DebitMode::Record
                };
                command = Command::Usage(h.event(
                    wallets[wallet],
                    &input.to_string(),
                    &output.to_string(),
                    mode,
                ));
                let code = if !strict {
                    ResultCode::Ok
                } else if m.balance < Decimal::ZERO {
                    ResultCode::WalletInDebt
                } else if m.balance - m.held < charge {
                    ResultCode::InsufficientFunds
                } else {
                    ResultCode::Ok
                };
                expected_code = Some(code);
                if code.is_ok() {
                    m.balance -= charge;
                    on_ok = record_charge(wallet, charge);
                }
            }
            Op::SpendAll { wallet } => {
                let m = &mut model[wallet];
                let available = m.balance - m.held;
                if available <= Decimal::ZERO {
                    continue;
                }
                // available is in cents; 1,000 input tokens cost 1 USD.
                let input = (available * Decimal::from(1000)).normalize().to_string();
                command = Command::Usage(h.event(wallets[wallet], &input, "0", DebitMode::Strict));
                expected_code = Some(ResultCode::Ok);
                m.balance -= available;
                on_ok = record_charge(wallet, available);
            }
            Op::Reserve { wallet, cents: c } => {
                let amount = cents(c);
                let m = &mut model[wallet];
                let deadline = h.now.add_us(10 * 60 * Timestamp::SECOND_US);
                command = Command::Reserve {
                    wallet: wallets[wallet],
                    amount: ReserveAmount::Fixed {
                        asset: asset("USD"),
                        amount,
                    },
                    deadline,
                };
                let open = holds
                    .iter()
                    .filter(|x| x.open && x.wallet == wallet)
                    .count();
                let code = if m.balance < Decimal::ZERO {
                    ResultCode::WalletInDebt
                } else if open >= HOLDS_MAX {
                    ResultCode::LimitExceeded
                } else if m.balance - m.held < amount {
                    ResultCode::InsufficientFunds
                } else {
                    ResultCode::Ok
                };
                expected_code = Some(code);
                if code.is_ok() {
                    m.held += amount;
                    on_ok = Box::new(move |reply, _, holds, _, _| {
                        let ReplyValue::Hold { hold, .. } = reply.value else {
                            panic!("{reply:?}")
                        };
                        holds.push(ModelHold {
                            wallet,
                            id: hold,
                            amount,
                            deadline,
                            open: true,
                        });
                    });
                }
            }
            Op::Settle { .. } | Op::Release { .. } if holds.is_empty() => continue,
            Op::Settle {
                hold,
                input,
                output,
            } => {
                let i = hold % holds.len();
                let x = holds[i];
                let charge = price(input, output);
                let usage = h.event(
                    wallets[x.wallet],
                    &input.to_string(),
                    &output.to_string(),
                    DebitMode::Strict,
                );
                command = Command::Settle {
                    wallet: wallets[x.wallet],
                    hold: x.id,
                    usage,
                };
                if x.open {
                    expected_code = Some(ResultCode::Ok);
                    holds[i].open = false;
                    model[x.wallet].held -= x.amount;
                    model[x.wallet].balance -= charge;
                    let wallet = x.wallet;
                    on_ok = record_charge(wallet, charge);
                } else {
                    expected_code = None;
                }
            }
            Op::Release { hold } => {
                let i = hold % holds.len();
                let x = holds[i];
                command = Command::Release {
                    wallet: wallets[x.wallet],
                    hold: x.id,
                };
                expected_code = x.open.then_some(ResultCode::Ok);
                if x.open {
                    holds[i].open = false;
                    model[x.wallet].held -= x.amount;
                }
            }
            Op::Refund { .. } if charges.is_empty() => continue,
            Op::Refund { event, cents: c } => {
                let i = event % charges.len();
                let charge = charges[i];
                let left = charge.charged - charge.refunded;
                let amount = c.map(cents);
                command = Command::Refund {
                    wallet: wallets[charge.wallet],
                    event: RequestId(charge.request),
                    amount,
                };
                let refund = amount.unwrap_or(left);
                let code = if refund.is_zero() || refund > left {
                    ResultCode::RefundExceedsCharge
                } else {
                    ResultCode::Ok
                };
                expected_code = Some(code);
                if code.is_ok() {
                    charges[i].refunded += refund;
                    model[charge.wallet].balance += refund;
                }
            }
        }

        let id = h.next_id;
        let reply = h.run_id(id, command.clone());
        match expected_code {
            Some(code) => assert_eq!(reply.code, code, "{op:?} -> {reply:?}"),
            None => assert!(
                matches!(
                    reply.code,
                    ResultCode::HoldAlreadySettled
                        | ResultCode::HoldAlreadyReleased
                        | ResultCode::HoldExpired
                        | ResultCode::UnknownHold
                ),
                "{op:?} -> {reply:?}"
            ),
        }
        if reply.code.is_ok() {
            on_ok(&reply, &mut model, &mut holds, &mut charges, id);
        }
        sent.push((id, command, reply));

        for (i, wallet) in wallets.iter().enumerate() {
            let b = h.balance(*wallet);
            assert_eq!(b.ledger, model[i].balance, "ledger of w{i} after {op:?}");
            assert_eq!(b.held, model[i].held, "held of w{i} after {op:?}");
            assert_eq!(b.available, model[i].balance - model[i].held);
        }
        if let (
            Op::Usage {
                wallet,
                strict: true,
                ..
            },
            ResultCode::Ok,
        ) = (&op, reply.code)
        {
            assert!(
                h.balance(wallets[*wallet]).available >= -h.balance(wallets[*wallet]).overdraft
            );
        }
    }

    h.check_ledger();

    // Replaying the command log into a fresh engine rebuilds the same state.
    let mut replay = Engine::new(Config::default());
    for (now, request) in &h.log {
        replay.handle_request(*now, request);
        while replay.poll_effect().is_some() {}
    }
    replay.handle_timeout(h.now);
    assert_eq!(replay.digest(), h.engine.digest(), "replay diverged");

    // The open-hold count kept as holds open and close is the count in the state, and a restored
    // engine derives the same.
    let held: u64 = h
        .engine
        .state()
        .wallets
        .iter()
        .map(|w| w.holds.len() as u64)
        .sum();
    assert_eq!(h.engine.holds_open(), held);
    assert_eq!(replay.holds_open(), held);
    let restored = Engine::from_state(h.engine.state().clone()).unwrap();
    assert_eq!(restored.holds_open(), held);

    // Snapshot → restore keeps the digest.
    h.snapshot_round_trip();

    let refunds: BTreeMap<u128, Decimal> =
        charges.iter().map(|c| (c.request, c.refunded)).collect();
    assert!(refunds.values().all(|r| *r >= Decimal::ZERO));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_the_reference_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops);
    }
}
