//! Test helpers: a small engine with real billing history, and byte surgery on files.

#![allow(dead_code)]

use std::{
    fs,
    path::{Path, PathBuf},
    str::FromStr,
};

use rust_decimal::Decimal;
use tally_engine::*;
use tally_snapshots::{SnapshotDir, SnapshotInfo};

/// 2023-11-14T22:13:20Z.
pub const T0: i64 = 1_700_000_000_000_000;

/// The reason of the adjustment in every test engine: the only `String` in a state.
pub const REASON: &str = "goodwill credit after outage";

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// An engine that has declared a catalog and run `wallets` wallets through grants, usage and
/// an adjustment, so the state has assets, plans, wallets, grants, margins, remembered
/// requests and a `String`.
pub struct Shard {
    pub engine: Engine,
    pub now: Timestamp,
    pub next_id: u128,
}

impl Shard {
    pub fn new(wallets: usize) -> Shard {
        let mut shard = Shard {
            engine: Engine::new(Config::default()),
            now: Timestamp(T0),
            next_id: 1,
        };
        shard.ok(Command::DefineAsset {
            code: asset("USD"),
            scale: 6,
            usd_value: d("1"),
        });
        shard.ok(Command::DefineProduct {
            code: name("chat"),
            dimensions: vec![name("input_tokens"), name("output_tokens")],
        });
        let component = |dimension: &str, price: &str| Component {
            dimension: name(dimension),
            price: PriceModel::PerUnit {
                unit_price: d(price),
            },
        };
        shard.ok(Command::DraftPlan {
            plan: name("std"),
            custom_for: None,
            asset: asset("USD"),
            rules: vec![PriceRule {
                product: name("chat"),
                filters: vec![],
                components: vec![
                    component("input_tokens", "0.0000025"),
                    component("output_tokens", "0.00001"),
                ],
                minimum_charge: None,
                rounding: Rounding::Up,
            }],
        });
        shard.ok(Command::PublishPlan { plan: name("std") });
        for w in 0..wallets {
            shard.add_wallet(&format!("w{w}"));
        }
        shard
    }

    pub fn add_wallet(&mut self, id: &str) {
        let wallet = name(id);
        self.ok(Command::CreateWallet(CreateWallet {
            wallet,
            overdraft: vec![],
            metadata: vec![(name("tier"), name("gold"))],
        }));
        self.ok(Command::AssignPlan {
            wallet,
            plan: name("std"),
            version: 1,
            effective_from: Timestamp(0),
        });
        self.ok(Command::Grant(Grant {
            wallet,
            asset: asset("USD"),
            amount: d("12.50"),
            priority: 0,
            effective_at: None,
            expires_at: Some(Timestamp(T0 + 86_400_000_000)),
            source: GrantSource::Promotion,
        }));
        self.usage(wallet, "1200", "350");
        self.ok(Command::Adjust {
            wallet,
            asset: asset("USD"),
            amount: d("1.10"),
            reason: REASON.into(),
        });
    }

    /// More history, so a later snapshot differs from an earlier one.
    pub fn usage(&mut self, wallet: WalletId, input: &str, output: &str) {
        self.now = self.now.add_us(1_000);
        let quantity = |dimension: &str, value: &str| Quantity {
            dimension: name(dimension),
            value: d(value),
        };
        self.ok(Command::Usage(UsageEvent {
            wallet,
            product: name("chat"),
            quantities: vec![
                quantity("input_tokens", input),
                quantity("output_tokens", output),
            ],
            attributes: vec![(name("model"), name("gpt-4o"))],
            cost_usd: d("0.0021"),
            occurred_at: self.now,
            mode: DebitMode::Strict,
        }));
    }

    pub fn ok(&mut self, command: Command) -> ReplyValue {
        let request = Request {
            id: RequestId(self.next_id),
            command,
        };
        self.next_id += 1;
        let reply = self.engine.handle_request(self.now, &request);
        assert_eq!(reply.code, ResultCode::Ok, "{request:?} -> {reply:?}");
        reply.value
    }
}

pub fn tempdir() -> (tempfile::TempDir, SnapshotDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = SnapshotDir::open(tmp.path().join("snapshots")).unwrap();
    (tmp, dir)
}

/// Writes a snapshot of `shard` at `lsn` with the default timestamp.
pub fn write(
    dir: &SnapshotDir,
    shard: u32,
    shard_count: u32,
    lsn: u64,
    engine: &Engine,
) -> SnapshotInfo {
    dir.write(
        shard,
        shard_count,
        lsn,
        Timestamp(T0 + lsn as i64),
        engine.state(),
    )
    .unwrap()
}

pub fn flip_bit(path: &Path, bit: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
    fs::write(path, bytes).unwrap();
}

pub fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

/// Names in the directory, sorted.
pub fn names(dir: &SnapshotDir) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

pub fn info_for(path: PathBuf, shard: u32, lsn: u64) -> SnapshotInfo {
    SnapshotInfo {
        size_bytes: file_len(&path),
        path,
        shard,
        lsn,
        header: None,
    }
}
