//! Property check of the WAL record payload decoder (`tally_server::record::decode`).
//!
//! Shared by the cargo-fuzz target `wal_record` and by `server/tests/record_fuzz.rs`, which runs
//! it on seeded random inputs under `cargo test`.
//!
//! The first input byte picks the mode:
//!
//! * **raw** (even): the rest of the input is the payload.
//! * **built** (odd): a record is built from the input (a tick, a settings change, or a request
//!   with one of several commands, with input-chosen names, ids, times, decimals, options and
//!   lists), encoded with `record::encode`, then damaged by up to four input-chosen byte edits
//!   or cut short. This reaches deep into the decoder without the fuzzer having to find the
//!   layout first.
//!
//! Properties: decoding never panics. What decodes encodes and decodes back to the same record,
//! and that encoding is a fixed point (what it decodes to encodes to the same bytes again); a
//! request record encodes to the same bytes through `record::encode_request` (the shard loop's
//! borrowed encoder). An undamaged built record decodes to exactly what was built, and any
//! proper prefix of its encoding is refused.

#![allow(dead_code)] // each user calls only part of it

#[path = "input.rs"]
pub mod input;

use input::Input;
use rust_decimal::Decimal;
use tally_engine::{
    AssetCode, Command, CreateWallet, DebitMode, Grant, GrantId, GrantSource, Limit, Name,
    PaymentEvent, Quantity, RecordedCharge, Request, RequestId, Timestamp, UsageEvent,
};
use tally_server::record::{self, LogEntry, LogRecord};

/// Runs the check on one input; panics when a property fails.
pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    if input.u8() & 1 == 0 {
        check_decoded(input.rest());
        return;
    }
    let built = build(&mut input);
    let mut bytes = Vec::new();
    record::encode(&built, &mut bytes);
    let cut = input.u8();
    if cut & 0x80 != 0 {
        let len = usize::from(input.u16()) % bytes.len();
        assert!(
            record::decode(&bytes[..len]).is_err(),
            "a {len}-byte prefix of a {}-byte record decodes",
            bytes.len()
        );
        return;
    }
    if input.damage(&mut bytes, 4) {
        check_decoded(&bytes);
    } else {
        let decoded = record::decode(&bytes).expect("an encoded record decodes");
        assert_eq!(decoded, built);
        check_decoded(&bytes);
    }
}

/// Decodes `bytes` and, if they decode, checks the round trips.
fn check_decoded(bytes: &[u8]) {
    let Ok(decoded) = record::decode(bytes) else {
        return;
    };
    let mut encoded = Vec::new();
    record::encode(&decoded, &mut encoded);
    let again = record::decode(&encoded).expect("a re-encoded record decodes");
    assert_eq!(again, decoded, "a record changed through encode and decode");
    let mut encoded_again = Vec::new();
    record::encode(&again, &mut encoded_again);
    assert_eq!(encoded_again, encoded, "the encoding is not a fixed point");
    if let LogEntry::Request(request) = &decoded.entry {
        let mut borrowed = Vec::new();
        record::encode_request(decoded.at, request, &mut borrowed);
        assert_eq!(borrowed, encoded, "encode_request differs from encode");
    }
}

/// A record with input-chosen contents.
fn build(input: &mut Input<'_>) -> LogRecord {
    let at = Timestamp(input.u64() as i64);
    let entry = match input.u8() % 8 {
        0 => LogEntry::Tick,
        1 => LogEntry::Settings {
            idempotency_retention_us: input.u64() as i64,
            idempotency_max_ids: input.u64(),
        },
        2 => LogEntry::Alerts {
            low_balance_usd: Decimal::new(input.u64() as i64, u32::from(input.u8() % 29)),
            grant_expiring_lead_us: input.u64() as i64,
        },
        3 => LogEntry::RecordedRefund {
            request: Request {
                id: RequestId(u128::from(input.u64())),
                command: Command::Refund {
                    wallet: name(input),
                    event: RequestId(u128::from(input.u64())),
                    amount: (input.u8() & 1 == 0).then(|| decimal(input)),
                },
            },
            charge: RecordedCharge {
                asset: AssetCode::new("USD").expect("a valid code"),
                charged: decimal(input),
                product: name(input),
                plan: name(input),
                version: input.u64() as u32,
                occurred_at: Timestamp(input.u64() as i64),
                applied_at: Timestamp(input.u64() as i64),
                credit_priority: input.u64() as u32,
                credit_expires_at: (input.u8() & 1 == 0).then(|| Timestamp(input.u64() as i64)),
                refundable_until: Timestamp(input.u64() as i64),
            },
        },
        _ => LogEntry::Request(Request {
            id: RequestId(u128::from(input.u64()) << 64 | u128::from(input.u64())),
            command: command(input),
        }),
    };
    LogRecord { at, entry }
}

fn command(input: &mut Input<'_>) -> Command {
    match input.u8() % 9 {
        0 => Command::Freeze {
            wallet: name(input),
        },
        1 => Command::CreateWallet(CreateWallet {
            wallet: name(input),
            overdraft: (0..input.u8() % 3)
                .map(|_| Limit {
                    asset: asset(input),
                    amount: decimal(input),
                })
                .collect(),
            metadata: (0..input.u8() % 3)
                .map(|_| (name(input), name(input)))
                .collect(),
        }),
        2 => Command::Grant(Grant {
            wallet: name(input),
            asset: asset(input),
            amount: decimal(input),
            priority: input.u32(),
            effective_at: input.bool().then(|| Timestamp(input.u64() as i64)),
            expires_at: input.bool().then(|| Timestamp(input.u64() as i64)),
            source: match input.u8() % 4 {
                0 => GrantSource::TopUp {
                    payment_id: name(input),
                },
                1 => GrantSource::Promotion,
                2 => GrantSource::Refund,
                _ => GrantSource::Adjustment,
            },
        }),
        3 => Command::Usage(UsageEvent {
            wallet: name(input),
            product: name(input),
            quantities: (0..input.u8() % 4)
                .map(|_| Quantity {
                    dimension: name(input),
                    value: decimal(input),
                })
                .collect(),
            attributes: (0..input.u8() % 3)
                .map(|_| (name(input), name(input)))
                .collect(),
            cost_usd: decimal(input),
            occurred_at: Timestamp(input.u64() as i64),
            mode: if input.bool() {
                DebitMode::Strict
            } else {
                DebitMode::Record
            },
        }),
        4 => Command::Adjust {
            wallet: name(input),
            asset: asset(input),
            amount: decimal(input),
            reason: {
                let len = usize::from(input.u8() % 40);
                String::from_utf8_lossy(input.bytes(len)).into()
            },
        },
        5 => Command::Refund {
            wallet: name(input),
            event: RequestId(u128::from(input.u64())),
            amount: input.bool().then(|| decimal(input)),
        },
        6 => Command::Dispute {
            wallet: name(input),
            grant: GrantId(input.u64()),
            freeze: input.bool(),
        },
        7 => Command::Payment {
            wallet: name(input),
            payment_id: name(input),
            event: match input.u8() % 4 {
                0 => PaymentEvent::Disputed {
                    freeze: input.bool(),
                },
                1 => PaymentEvent::DisputeWon,
                2 => PaymentEvent::DisputeLost {
                    freeze: input.bool(),
                },
                _ => PaymentEvent::Refunded {
                    refunded: decimal(input),
                },
            },
        },
        _ => Command::DefineAsset {
            code: asset(input),
            scale: u32::from(input.u8() % 20),
            usd_value: decimal(input),
        },
    }
}

/// A valid name of 1 to 64 characters, some outside ASCII.
fn name(input: &mut Input<'_>) -> Name {
    let len = 1 + usize::from(input.u8() % 16);
    Name::new(&text(input, len)).expect("a valid name")
}

/// A valid asset code of 1 to 5 characters.
fn asset(input: &mut Input<'_>) -> AssetCode {
    let len = 1 + usize::from(input.u8() % 5);
    AssetCode::new(&text(input, len)).expect("a valid asset code")
}

/// `len` characters (at most 3 bytes each, none a control character) chosen by the input.
fn text(input: &mut Input<'_>, len: usize) -> String {
    const ALPHABET: [char; 8] = ['a', 'z', '0', '-', '_', '.', 'é', '€'];
    (0..len)
        .map(|_| {
            let byte = input.u8();
            if byte < 0xe0 {
                char::from(b'a' + byte % 26)
            } else {
                ALPHABET[usize::from(byte % 8)]
            }
        })
        .collect()
}

/// Any decimal with a 96-bit mantissa and scale 0 to 28, either sign.
fn decimal(input: &mut Input<'_>) -> Decimal {
    let mantissa = i128::from(input.u64()) << 32 | i128::from(input.u32());
    let mantissa = if input.bool() { -mantissa } else { mantissa };
    Decimal::from_i128_with_scale(mantissa, u32::from(input.u8() % 29))
}
