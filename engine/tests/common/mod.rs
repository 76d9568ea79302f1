//! Test harness: an engine with a small catalog, a clock, and the effects it produced.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::str::FromStr;

use rust_decimal::Decimal;
use tally_engine::*;

pub fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

pub fn n(s: &str) -> Name {
    name(s)
}

/// 2023-11-14T22:13:20Z: a realistic start so hour and day buckets are meaningful.
pub const T0: i64 = 1_700_000_000_000_000;

pub struct Harness {
    pub engine: Engine,
    pub now: Timestamp,
    pub next_id: u128,
    pub journal: Vec<JournalEntry>,
    pub margins: Vec<MarginRecord>,
    pub topups: Vec<TopUpRequest>,
    pub exhausted: Vec<(WalletId, AssetCode)>,
    /// Wallets whose creation was announced.
    pub created: Vec<WalletId>,
    /// Operator notices: frozen wallets, balance alerts, expiring grants.
    pub notices: Vec<Effect>,
    /// Every request applied, with its time: the command log.
    pub log: Vec<(Timestamp, Request)>,
}

/// A promotion grant of `amount` USD at priority 0, effective now, never expiring; tests change
/// fields with struct update syntax.
pub fn grant_of(wallet: WalletId, amount: &str) -> Grant {
    Grant {
        wallet,
        asset: asset("USD"),
        amount: d(amount),
        priority: 0,
        effective_at: None,
        expires_at: None,
        source: GrantSource::Promotion,
    }
}

pub fn per_unit(price: &str) -> PriceModel {
    PriceModel::PerUnit {
        unit_price: d(price),
    }
}

pub fn rule(filters: &[(&str, &str)], input: &str, output: &str) -> PriceRule {
    PriceRule {
        product: n("chat"),
        filters: filters.iter().map(|(k, v)| (n(k), n(v))).collect(),
        components: vec![
            Component {
                dimension: n("input_tokens"),
                price: per_unit(input),
            },
            Component {
                dimension: n("output_tokens"),
                price: per_unit(output),
            },
        ],
        minimum_charge: None,
        rounding: Rounding::Up,
    }
}

impl Harness {
    /// USD (scale 6, worth 1) and credits (scale 2, worth 0.01); product `chat` with input and
    /// output tokens; plan `std` v1: 0.001 / 0.002 per token by default, 0.01 / 0.03 for
    /// `model = gpt-4o`.
    pub fn new() -> Harness {
        Harness::new_with(Config::default())
    }

    /// [`Harness::new`] on an engine with `config`.
    pub fn new_with(config: Config) -> Harness {
        let mut h = Harness::bare();
        h.engine = Engine::new(config);
        h.ok(Command::DefineAsset {
            code: asset("USD"),
            scale: 6,
            usd_value: d("1"),
        });
        h.ok(Command::DefineAsset {
            code: asset("credits"),
            scale: 2,
            usd_value: d("0.01"),
        });
        for (code, unit_amount) in [("USD", "1"), ("credits", "0.01")] {
            h.ok(Command::PriceAsset {
                asset: asset(code),
                price: Some(TopUpPrice {
                    currency: n("usd"),
                    unit_amount: d(unit_amount),
                }),
            });
        }
        h.ok(Command::DefineProduct {
            code: n("chat"),
            dimensions: vec![n("input_tokens"), n("output_tokens")],
        });
        h.ok(Command::DraftPlan {
            plan: n("std"),
            custom_for: None,
            asset: asset("USD"),
            rules: vec![
                rule(&[], "0.001", "0.002"),
                rule(&[("model", "gpt-4o")], "0.01", "0.03"),
            ],
        });
        h.ok(Command::PublishPlan { plan: n("std") });
        h
    }

    pub fn bare() -> Harness {
        Harness {
            engine: Engine::new(Config::default()),
            now: Timestamp(T0),
            next_id: 1,
            journal: Vec::new(),
            margins: Vec::new(),
            topups: Vec::new(),
            exhausted: Vec::new(),
            created: Vec::new(),
            notices: Vec::new(),
            log: Vec::new(),
        }
    }

    pub fn advance(&mut self, us: i64) {
        self.now = self.now.add_us(us);
        self.engine.handle_timeout(self.now);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(effect) = self.engine.poll_effect() {
            match effect {
                Effect::Journal(j) => self.journal.push(j),
                Effect::Margin(m) => self.margins.push(m),
                Effect::TopUpRequested(t) => self.topups.push(t),
                Effect::TopUpExhausted { wallet, asset } => self.exhausted.push((wallet, asset)),
                Effect::WalletCreated { wallet } => self.created.push(wallet),
                notice @ (Effect::WalletFrozen { .. }
                | Effect::BalanceAlert { .. }
                | Effect::GrantExpiring { .. }) => self.notices.push(notice),
            }
        }
    }

    /// Applies a command under a fresh request id.
    pub fn run(&mut self, command: Command) -> Reply {
        let id = self.next_id;
        self.next_id += 1;
        self.run_id(id, command)
    }

    pub fn run_id(&mut self, id: u128, command: Command) -> Reply {
        self.next_id = self.next_id.max(id + 1);
        let request = Request {
            id: RequestId(id),
            command,
        };
        let reply = self.engine.handle_request(self.now, &request);
        self.log.push((self.now, request));
        self.drain();
        reply
    }

    /// Applies a command that must succeed.
    pub fn ok(&mut self, command: Command) -> ReplyValue {
        let shown = format!("{command:?}");
        let reply = self.run(command);
        assert_eq!(reply.code, ResultCode::Ok, "{shown} -> {reply:?}");
        reply.value
    }

    /// Applies a command that must be rejected with `code`, and checks it changed no wallet.
    pub fn rejects(&mut self, command: Command, code: ResultCode) {
        let before = self.engine.state().wallets.clone();
        let journal = self.journal.len();
        let shown = format!("{command:?}");
        let reply = self.run(command);
        assert_eq!(reply.code, code, "{shown}");
        assert_eq!(
            self.engine.state().wallets,
            before,
            "a rejection changed a wallet"
        );
        assert_eq!(self.journal.len(), journal, "a rejection wrote the journal");
    }

    /// Creates a wallet on plan `std` v1 from the beginning of time.
    /// Gives the wallet a customer and a default payment method, so its top-ups can be charged.
    pub fn billing(&mut self, wallet: WalletId) {
        self.ok(Command::SetBilling {
            wallet,
            customer: Some(n("cus_1")),
            payment_method: Some(n("pm_default")),
        });
    }

    pub fn wallet(&mut self, id: &str) -> WalletId {
        let wallet = n(id);
        self.ok(Command::CreateWallet(CreateWallet {
            wallet,
            overdraft: vec![],
            metadata: vec![],
        }));
        self.ok(Command::AssignPlan {
            wallet,
            plan: n("std"),
            version: 1,
            effective_from: Timestamp(0),
        });
        wallet
    }

    pub fn grant(&mut self, wallet: WalletId, amount: &str) -> GrantId {
        self.grant_with(wallet, amount, 0, None, GrantSource::Promotion)
    }

    pub fn grant_with(
        &mut self,
        wallet: WalletId,
        amount: &str,
        priority: u32,
        expires_at: Option<Timestamp>,
        source: GrantSource,
    ) -> GrantId {
        match self.ok(Command::Grant(Grant {
            priority,
            expires_at,
            source,
            ..grant_of(wallet, amount)
        })) {
            ReplyValue::Grant { grant, .. } => grant,
            other => panic!("grant replied {other:?}"),
        }
    }

    pub fn event(
        &self,
        wallet: WalletId,
        input: &str,
        output: &str,
        mode: DebitMode,
    ) -> UsageEvent {
        UsageEvent {
            wallet,
            product: n("chat"),
            quantities: vec![
                Quantity {
                    dimension: n("input_tokens"),
                    value: d(input),
                },
                Quantity {
                    dimension: n("output_tokens"),
                    value: d(output),
                },
            ],
            attributes: vec![],
            cost_usd: d("0.001"),
            occurred_at: self.now,
            mode,
        }
    }

    pub fn usage(&mut self, wallet: WalletId, input: &str, output: &str, mode: DebitMode) -> Reply {
        let event = self.event(wallet, input, output, mode);
        self.run(Command::Usage(event))
    }

    pub fn balance(&self, wallet: WalletId) -> BalanceView {
        match self
            .engine
            .query(&Query::Balance {
                wallet,
                asset: asset("USD"),
            })
            .unwrap()
        {
            QueryReply::Balance(b) => b,
            other => panic!("{other:?}"),
        }
    }

    pub fn view(&self, wallet: WalletId) -> WalletView {
        match self.engine.query(&Query::Wallet { wallet }).unwrap() {
            QueryReply::Wallet(w) => w,
            other => panic!("{other:?}"),
        }
    }

    pub fn margin(&self, scope: MarginScope) -> MarginView {
        match self.engine.query(&Query::Margin(scope)).unwrap() {
            QueryReply::Margin(m) => m,
            other => panic!("{other:?}"),
        }
    }

    /// The journal's account balances per asset.
    pub fn accounts(&self) -> BTreeMap<(AssetCode, Account), Decimal> {
        let mut accounts = BTreeMap::new();
        for j in &self.journal {
            *accounts.entry((j.asset, j.from)).or_insert(Decimal::ZERO) -= j.amount;
            *accounts.entry((j.asset, j.to)).or_insert(Decimal::ZERO) += j.amount;
        }
        accounts
    }

    /// The ledger invariants: the journal is gapless, sums to zero per asset, and each wallet's
    /// account equals the wallet's ledger balance.
    pub fn check_ledger(&self) {
        for (i, j) in self.journal.iter().enumerate() {
            assert_eq!(j.seq, i as u64 + 1, "journal sequence has a gap");
            assert!(j.amount > Decimal::ZERO);
        }
        let accounts = self.accounts();
        let mut per_asset: BTreeMap<AssetCode, Decimal> = BTreeMap::new();
        for ((asset, _), amount) in &accounts {
            *per_asset.entry(*asset).or_insert(Decimal::ZERO) += *amount;
        }
        for (asset, sum) in per_asset {
            assert_eq!(sum, Decimal::ZERO, "journal of {asset} sums to {sum}");
        }
        for wallet in &self.engine.state().wallets {
            for balance in &wallet.balances {
                let account = accounts
                    .get(&(balance.asset, Account::Wallet(wallet.id)))
                    .copied()
                    .unwrap_or(Decimal::ZERO);
                assert_eq!(
                    account,
                    balance.ledger(),
                    "wallet {} {}",
                    wallet.id,
                    balance.asset
                );
            }
        }
    }

    /// Snapshots through bincode, restores, and checks the digest survives.
    pub fn snapshot_round_trip(&self) -> Engine {
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(self.engine.state(), config).unwrap();
        let (state, _): (State, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
        let restored = Engine::from_state(state).unwrap();
        assert_eq!(restored.digest(), self.engine.digest());
        restored
    }
}
