//! Shared setup for the server tests: a catalog, wallets, and usage requests.

#![allow(dead_code)]

pub mod child;
pub mod postgres;
pub mod quic;

use std::str::FromStr;

use rust_decimal::Decimal;
use tally_engine::*;
use tally_server::{Clock, Handle, SystemClock};

pub fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

pub fn config(dir: &std::path::Path, shards: u32) -> tally_server::Config {
    tally_server::Config {
        data_dir: dir.to_path_buf(),
        shards,
        wal_segment_bytes: 1 << 20,
        snapshot_every_records: 0,
        snapshot_every_secs: 0,
        // The tests read the exports back from the JSON-lines files too.
        export_jsonl: true,
        ..tally_server::Config::default()
    }
}

/// USD (scale 6), product `chat` with one dimension `tokens`, and plan `std` v1 at 0.001 USD per
/// token.
pub fn catalog() -> Vec<Command> {
    vec![
        Command::DefineAsset {
            code: asset("USD"),
            scale: 6,
            usd_value: d("1"),
        },
        Command::DefineProduct {
            code: name("chat"),
            dimensions: vec![name("tokens")],
        },
        Command::DraftPlan {
            plan: name("std"),
            custom_for: None,
            asset: asset("USD"),
            rules: vec![PriceRule {
                product: name("chat"),
                filters: vec![],
                components: vec![Component {
                    dimension: name("tokens"),
                    price: PriceModel::PerUnit {
                        unit_price: d("0.001"),
                    },
                }],
                minimum_charge: None,
                rounding: Rounding::Up,
            }],
        },
        Command::PublishPlan { plan: name("std") },
    ]
}

/// Catalog and wallets; safe to run again after a restart (repeats are no-ops or
/// `WalletExists`).
pub fn setup(handle: &Handle, wallets: &[String]) {
    let mut id = 1_000_000_000;
    let mut call = |command: Command| {
        id += 1;
        let reply = handle
            .call(Request {
                id: RequestId(id),
                command,
            })
            .unwrap();
        assert!(
            matches!(reply.code, ResultCode::Ok | ResultCode::WalletExists),
            "setup: {reply:?}"
        );
    };
    for command in catalog() {
        call(command);
    }
    for w in wallets {
        let wallet = name(w);
        call(Command::CreateWallet(CreateWallet {
            wallet,
            overdraft: vec![],
            metadata: vec![],
        }));
        call(Command::AssignPlan {
            wallet,
            plan: name("std"),
            version: 1,
            effective_from: Timestamp(0),
        });
    }
}

pub fn grant(id: u128, wallet: &str, amount: &str) -> Request {
    Request {
        id: RequestId(id),
        command: Command::Grant(Grant {
            wallet: name(wallet),
            asset: asset("USD"),
            amount: d(amount),
            priority: 0,
            effective_at: None,
            expires_at: None,
            source: GrantSource::Promotion,
        }),
    }
}

pub fn usage(id: u128, wallet: &str, tokens: u32, mode: DebitMode) -> Request {
    Request {
        id: RequestId(id),
        command: Command::Usage(UsageEvent {
            wallet: name(wallet),
            product: name("chat"),
            quantities: vec![Quantity {
                dimension: name("tokens"),
                value: tokens.into(),
            }],
            attributes: vec![],
            cost_usd: d("0.0001"),
            occurred_at: SystemClock.now(),
            mode,
        }),
    }
}

pub fn available(handle: &Handle, wallet: &str) -> Decimal {
    match handle
        .query(Query::Balance {
            wallet: name(wallet),
            asset: asset("USD"),
        })
        .unwrap()
        .unwrap()
    {
        QueryReply::Balance(b) => b.available,
        other => panic!("{other:?}"),
    }
}

/// Lines of an outbound JSON-lines stream, oldest first: its sealed files
/// (`<stream>.<NNNNNN>.jsonl`, which must all still be there), then its current file.
pub fn exported(dir: &std::path::Path, stream: &str) -> Vec<serde_json::Value> {
    let outbound = dir.join("outbound");
    let mut sealed: Vec<u64> = std::fs::read_dir(&outbound)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let file = e.unwrap().file_name().into_string().unwrap();
            let n = file.strip_prefix(stream)?.strip_prefix('.')?;
            n.strip_suffix(".jsonl")?.parse().ok()
        })
        .collect();
    sealed.sort_unstable();
    assert!(
        sealed.iter().copied().eq(1..=sealed.len() as u64),
        "sealed {stream} files are missing (retention deleted some?): {sealed:?}"
    );
    let mut files: Vec<_> = sealed
        .iter()
        .map(|n| tally_server::outbound::jsonl::sealed_path(&outbound, stream, *n))
        .collect();
    files.push(outbound.join(format!("{stream}.jsonl")));
    files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}
