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

    /// The balance of `wallet` in `asset` (empty when the wallet never touched the asset).
    pub fn balance_in(&self, wallet: WalletId, asset: AssetCode) -> BalanceView {
        match self
            .engine
            .query(&Query::Balance { wallet, asset })
            .unwrap()
        {
            QueryReply::Balance(b) => b,
            other => panic!("{other:?}"),
        }
    }

    /// What the journal says happened to each grant it names.
    pub fn grant_flows(&self) -> BTreeMap<GrantId, GrantFlow> {
        let mut flows: BTreeMap<GrantId, GrantFlow> = BTreeMap::new();
        for j in &self.journal {
            let Some(grant) = j.grant else { continue };
            let flow = flows.entry(grant).or_default();
            let (into_wallet, out_of_wallet) = (
                matches!(j.to, Account::Wallet(_)),
                matches!(j.from, Account::Wallet(_)),
            );
            match (j.kind, into_wallet, out_of_wallet) {
                (EntryKind::Grant | EntryKind::DisputeWon | EntryKind::Refund, true, false) => {
                    flow.credited += j.amount;
                    flow.creations += 1;
                }
                (EntryKind::Debit, false, true) => flow.debited += j.amount,
                (EntryKind::Breakage, false, true) => flow.broken += j.amount,
                (EntryKind::Dispute, false, true) => flow.clawed += j.amount,
                (EntryKind::Dispute, false, false) if j.from == Account::Breakage => {
                    flow.reversed += j.amount
                }
                (EntryKind::Refund, false, true) => flow.refunded += j.amount,
                (EntryKind::DisputeWon, false, false) if j.to == Account::Breakage => {
                    flow.rebooked += j.amount
                }
                _ => flow.unexpected += 1,
            }
            let wallet = match (j.from, j.to) {
                (Account::Wallet(w), _) | (_, Account::Wallet(w)) => Some(w),
                _ => None,
            };
            if flow.first.is_none() {
                flow.first = Some(j.kind);
                flow.wallet = wallet;
                flow.asset = Some(j.asset);
            } else if (wallet.is_some() && wallet != flow.wallet) || flow.asset != Some(j.asset) {
                flow.unexpected += 1;
            }
        }
        flows
    }

    /// The ledger invariants, each of which a wrong journal or state can break (a journal
    /// summing to zero per asset proves nothing: every entry moves an amount from one account to
    /// another, so it holds by construction):
    ///
    /// - the journal sequence is gapless from 1, amounts are positive, time never goes backwards
    ///   and no entry is later than the harness clock;
    /// - each entry kind moves money between the accounts it may (a `Debit` leaves a wallet for
    ///   revenue or an adjustment and names a grant, a `Debt` names none, ...);
    /// - every grant the journal names was created by exactly one entry, the first naming it,
    ///   and all entries naming it are in one wallet and asset;
    /// - every live grant of the state was credited its `amount`, and what the journal took out
    ///   of it by name leaves at least its `remaining` (the difference is the debt it paid on
    ///   arrival, never more than its amount);
    /// - each wallet's account equals the wallet's ledger balance, and the journal has no money
    ///   in a wallet balance the state does not have;
    /// - per asset, the revenue account equals the sum charged by the margin records of the
    ///   usage and settles applied;
    /// - the accounts that only ever give (promotion, top-up clearing, refund) are not positive,
    ///   and those that only ever receive net (revenue, breakage, dispute) are not negative.
    pub fn check_ledger(&self) {
        let mut last_at = Timestamp(i64::MIN);
        for (i, j) in self.journal.iter().enumerate() {
            assert_eq!(j.seq, i as u64 + 1, "journal sequence has a gap at {j:?}");
            assert!(
                j.amount > Decimal::ZERO,
                "a journal amount is not positive: {j:?}"
            );
            assert!(j.at >= last_at, "journal time went backwards at {j:?}");
            assert!(j.at <= self.now, "journal entry from the future: {j:?}");
            last_at = j.at;
            assert!(
                entry_shape_ok(j),
                "journal entry of an impossible shape: {j:?}"
            );
        }

        let flows = self.grant_flows();
        for (grant, flow) in &flows {
            assert_eq!(
                flow.unexpected, 0,
                "grant {grant:?}: unexpected entries {flow:?}"
            );
            assert_eq!(flow.creations, 1, "grant {grant:?} created {flow:?}");
            assert!(
                matches!(
                    flow.first,
                    Some(EntryKind::Grant | EntryKind::DisputeWon | EntryKind::Refund)
                ),
                "grant {grant:?} was named before it was created: {flow:?}"
            );
            // What was spent, expired or refunded of a grant is at most its credit. (A
            // dispute's entries are not bounded per grant: they settle the whole payment,
            // whose credit may have passed through several grants by then.)
            assert!(
                flow.debited + flow.broken + flow.refunded <= flow.credited,
                "grant {grant:?} gave more than it got: {flow:?}"
            );
        }

        let accounts = self.accounts();
        let mut wallet_balances = BTreeMap::new();
        for wallet in &self.engine.state().wallets {
            for balance in &wallet.balances {
                wallet_balances.insert((balance.asset, wallet.id), balance.ledger());
                for g in balance.grants.iter().chain(&balance.pending) {
                    let flow = flows
                        .get(&g.id)
                        .unwrap_or_else(|| panic!("grant {:?} is not in the journal", g.id));
                    assert_eq!(flow.wallet, Some(wallet.id), "grant {:?} wallet", g.id);
                    assert_eq!(flow.asset, Some(balance.asset), "grant {:?} asset", g.id);
                    assert_eq!(flow.credited, g.amount, "grant {:?} credit", g.id);
                    let net =
                        flow.credited - flow.debited - flow.broken - flow.clawed - flow.refunded
                            + flow.reversed;
                    let debt_paid = net - g.remaining;
                    assert!(
                        debt_paid >= Decimal::ZERO && debt_paid <= g.amount,
                        "grant {:?}: the journal leaves {net} of it, the state {}",
                        g.id,
                        g.remaining
                    );
                }
                let account = accounts
                    .get(&(balance.asset, Account::Wallet(wallet.id)))
                    .copied()
                    .unwrap_or(Decimal::ZERO);
                assert_eq!(
                    account,
                    balance.ledger(),
                    "wallet {} {}: journal account vs ledger",
                    wallet.id,
                    balance.asset
                );
            }
        }
        for ((asset, account), amount) in &accounts {
            match account {
                Account::Wallet(w) => assert!(
                    wallet_balances.contains_key(&(*asset, *w)) || amount.is_zero(),
                    "the journal holds {amount} {asset} for wallet {w}, which has no such balance"
                ),
                Account::Promotion | Account::TopUpClearing | Account::Refund => assert!(
                    *amount <= Decimal::ZERO,
                    "{account:?} {asset} received money: {amount}"
                ),
                Account::Revenue | Account::Breakage | Account::Dispute => assert!(
                    *amount >= Decimal::ZERO,
                    "{account:?} {asset} gave money: {amount}"
                ),
                Account::Adjustment => {}
            }
        }

        let mut charged: BTreeMap<AssetCode, Decimal> = BTreeMap::new();
        for m in &self.margins {
            *charged.entry(m.asset).or_insert(Decimal::ZERO) += m.charged;
        }
        let assets: std::collections::BTreeSet<AssetCode> = charged
            .keys()
            .copied()
            .chain(accounts.keys().map(|(a, _)| *a))
            .collect();
        for asset in assets {
            let revenue = accounts
                .get(&(asset, Account::Revenue))
                .copied()
                .unwrap_or(Decimal::ZERO);
            let margin = charged.get(&asset).copied().unwrap_or(Decimal::ZERO);
            assert_eq!(
                revenue, margin,
                "{asset}: the revenue account differs from the sum charged by usage and settles"
            );
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

/// What the journal says happened to one grant (see [`Harness::grant_flows`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantFlow {
    /// The wallet and asset of its first entry.
    pub wallet: Option<WalletId>,
    pub asset: Option<AssetCode>,
    /// The kind of its first entry.
    pub first: Option<EntryKind>,
    /// Credited into the wallet when it was created (`Grant`, `DisputeWon`, refund credit).
    pub credited: Decimal,
    /// Creation entries (exactly one for a well-formed grant).
    pub creations: u32,
    /// Consumed by usage, settles and debit adjustments.
    pub debited: Decimal,
    /// Expired as breakage.
    pub broken: Decimal,
    /// Taken back by a dispute (wallet to dispute).
    pub clawed: Decimal,
    /// Breakage of it reversed by a dispute (breakage to dispute).
    pub reversed: Decimal,
    /// Returned by a refund of its payment (wallet to top-up clearing).
    pub refunded: Decimal,
    /// Reversed breakage booked as breakage again when its dispute was won (dispute to
    /// breakage).
    pub rebooked: Decimal,
    /// Entries that should not name a grant this way, or that name it in another wallet or
    /// asset.
    pub unexpected: u32,
}

/// Whether a journal entry moves money between accounts its kind may move it between.
pub fn entry_shape_ok(j: &JournalEntry) -> bool {
    use Account::*;
    let wallet = |a: Account| matches!(a, Wallet(_));
    match j.kind {
        EntryKind::Grant => {
            matches!(j.from, TopUpClearing | Promotion | Refund | Adjustment)
                && wallet(j.to)
                && j.grant.is_some()
        }
        EntryKind::Debit => {
            wallet(j.from) && matches!(j.to, Revenue | Adjustment) && j.grant.is_some()
        }
        EntryKind::Debt => {
            wallet(j.from) && matches!(j.to, Revenue | Adjustment) && j.grant.is_none()
        }
        EntryKind::Breakage => wallet(j.from) && j.to == Breakage && j.grant.is_some(),
        EntryKind::Refund => {
            j.grant.is_some()
                && ((wallet(j.from) && j.to == TopUpClearing) || (j.from == Refund && wallet(j.to)))
        }
        EntryKind::Dispute => {
            // A clawback names the disputed grant; a reversal of breakage names none.
            j.to == Dispute
                && ((wallet(j.from) && j.grant.is_some())
                    || (j.from == Breakage && j.grant.is_none()))
        }
        EntryKind::DisputeWon => {
            j.from == Dispute
                && ((wallet(j.to) && j.grant.is_some()) || (j.to == Breakage && j.grant.is_none()))
        }
    }
}
