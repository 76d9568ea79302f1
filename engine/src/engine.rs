//! The shard state machine: [`Engine`] applies requests and timers to a [`State`] and queues the
//! effects they produce.
//!
//! Every handler validates completely before it mutates anything, so a rejected command changes
//! nothing (not even the margin aggregates). The one thing a rejection does change is the
//! idempotency table: the rejection is remembered, and a repeat of the request gets it again.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use foldhash::fast::RandomState;
use rust_decimal::Decimal;

use crate::code::ResultCode;
use crate::command::{
    Command, CreateWallet, DebitMode, Grant, GrantSource, PaymentEvent, RecordedCharge, Reply,
    ReplyValue, Request, ReserveAmount, TopUpAmount, TopUpPrice, TopUpRule, UsageEvent,
};
use crate::hash::{fingerprint, scope_of, StableHasher};
use crate::money::{self, ASSET_SCALE_MAX};
use crate::output::{Account, Alert, Effect, EntryKind, JournalEntry, MarginRecord, TopUpRequest};
use crate::pricing::{self, Quantity};
use crate::remember::{self, Key};
use crate::state::{
    late_refund_until, AdjustmentRecord, Asset, Assignment, Balance, ChargeRef, ClosedHold, Config,
    GrantState, Hold, HoldEnd, InFlight, LateRefund, Payment, Plan, PlanVersion, Product, State,
    TopUpState, Wallet, ADJUSTMENTS_KEPT, CLOSED_HOLDS_KEPT,
};
use crate::types::{AssetCode, GrantId, HoldId, Name, RequestId, Timestamp, WalletId};

/// Entries of wallet metadata.
pub const METADATA_MAX: usize = 16;
/// Quantity dimensions of one event or product.
pub const QUANTITIES_MAX: usize = 8;
/// Attributes of one event.
pub const ATTRIBUTES_MAX: usize = 16;
/// Open holds per wallet.
pub const HOLDS_MAX: usize = 256;
/// Longest a hold may last.
pub const HOLD_DURATION_MAX_US: i64 = 7 * Timestamp::DAY_US;
/// Plan assignments per wallet.
pub const ASSIGNMENTS_MAX: usize = 64;
/// Declared assets.
pub const ASSETS_MAX: usize = 1024;
/// Declared products.
pub const PRODUCTS_MAX: usize = 4096;
/// Plans.
pub const PLANS_MAX: usize = 65_536;
/// Bytes of an adjustment reason.
pub const REASON_BYTES_MAX: usize = 256;
/// Most failed attempts a top-up rule may allow.
pub const TOPUP_ATTEMPTS_MAX: u32 = 100;
/// Longest top-up cooldown.
pub const TOPUP_COOLDOWN_MAX_US: i64 = 30 * Timestamp::DAY_US;
/// Decimal places of an asset's USD value (with an asset scale of at most 18, a charge times
/// its USD value stays exact within 28 places).
pub const USD_VALUE_SCALE_MAX: u32 = 10;
/// Decimal places of an event's vendor cost.
pub const COST_SCALE_MAX: u32 = 12;
/// Priority of grants created by top-ups: after promotions and refunds at the default 0.
pub const TOPUP_PRIORITY: u32 = 100;
/// How long a requested top-up may wait for its outcome. After that it counts as failed with
/// reason [`TOPUP_TIMED_OUT`] (so one lost outcome cannot stop auto top-up for good); a success
/// reported later is still credited.
pub const TOPUP_IN_FLIGHT_TIMEOUT_US: i64 = Timestamp::HOUR_US;
/// The failure reason of a top-up whose outcome never came.
pub const TOPUP_TIMED_OUT: &str = "timed_out";
/// A top-up rule's payment method that stands for the wallet's default payment method.
pub const DEFAULT_PAYMENT_METHOD: &str = "default";

type Map<K, V> = HashMap<K, V, RandomState>;

/// Wallet id → position in `state.wallets`: a table of 4-byte positions hashed by the id and
/// compared against the wallet itself, which the caller reads next anyway. A map holding a copy
/// of every 64-byte id cost a cache miss of its own per lookup and 72 bytes per wallet.
#[derive(Debug, Default)]
struct WalletIndex {
    table: hashbrown::HashTable<u32>,
    hasher: RandomState,
}

impl WalletIndex {
    fn hash(&self, id: &WalletId) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, id)
    }

    /// The position of wallet `id`.
    fn get(&self, wallets: &[Arc<Wallet>], id: &WalletId) -> Option<u32> {
        self.table
            .find(self.hash(id), |&i| wallets[i as usize].id == *id)
            .copied()
    }

    /// Files wallet `wallets[i]` (whose id is not filed yet).
    fn insert(&mut self, wallets: &[Arc<Wallet>], i: u32) {
        let hash = self.hash(&wallets[i as usize].id);
        let hasher = &self.hasher;
        self.table.insert_unique(hash, i, |&j| {
            std::hash::BuildHasher::hash_one(hasher, &wallets[j as usize].id)
        });
    }
}

/// A deterministic billing state machine for one shard. See the crate docs for the run-loop
/// contract.
#[derive(Debug)]
pub struct Engine {
    state: State,
    index: Index,
    effects: VecDeque<Effect>,
    /// The request being applied, for journal entries; `None` while timers fire.
    request: Option<RequestId>,
    /// The key of the request being applied.
    key: Key,
    /// Set by a charging handler: what a refund of the request will need.
    charge: Option<ChargeRef>,
    /// The recorded charge a refund being applied may name ([`Engine::handle_recorded_refund`]).
    recorded: Option<RecordedCharge>,
    /// Request ids forgotten before their retention passed, because the table was full.
    evicted: u64,
}

/// Lookup structures derived from the state.
#[derive(Debug, Default)]
struct Index {
    wallets: WalletIndex,
    assets: Map<AssetCode, u32>,
    products: Map<Name, u32>,
    plans: Map<Name, u32>,
    /// Positions (sequence numbers, truncated) of `state.requests`, by key.
    requests: hashbrown::HashTable<u32>,
    /// When the newest of `state.legacy` was applied.
    legacy_newest: u32,
    timers: BTreeSet<Timer>,
    /// Open holds over all wallets (for the server's metrics).
    holds_open: u64,
    /// `state.late_refunds` by the time each is forgotten.
    late_by_until: BTreeSet<(Timestamp, Key)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    GrantEffective,
    GrantExpiry,
    GrantExpiring,
    HoldDeadline,
    TopUpRetry,
    TopUpTimeout,
}

/// How many balances of one wallet [`Effect::BalanceAlert`] watches (the first ones created).
const ALERT_ASSETS: usize = 4;
type Levels = [Option<(AssetCode, Decimal, Decimal)>; ALERT_ASSETS];

/// A time-driven action. Ordered by time, then kind, wallet and id: firing order is
/// deterministic. A timer whose object is gone (an exhausted grant, a settled hold) does nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Timestamp,
    kind: TimerKind,
    wallet: u32,
    id: u64,
}

/// Where a refundable charge is kept.
#[derive(Clone, Copy, Debug)]
enum ChargeAt {
    /// At this position of `state.charges`.
    Log(usize),
    /// With the request a previous format remembered.
    Legacy(RequestId),
}

/// Why a [`State`] cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreError(pub String);

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "state is inconsistent: {}", self.0)
    }
}

impl std::error::Error for RestoreError {}

impl From<ResultCode> for Reply {
    fn from(code: ResultCode) -> Reply {
        Reply::rejected(code)
    }
}

type Handled = Result<ReplyValue, Reply>;

/// Where journal entries go while a handler holds a wallet mutably.
struct Out<'a> {
    effects: &'a mut VecDeque<Effect>,
    seq: &'a mut u64,
    at: Timestamp,
    request: Option<RequestId>,
}

impl Out<'_> {
    fn entry(
        &mut self,
        kind: EntryKind,
        asset: AssetCode,
        amount: Decimal,
        from: Account,
        to: Account,
        grant: Option<GrantId>,
    ) {
        debug_assert!(amount >= Decimal::ZERO);
        if amount.is_zero() {
            return;
        }
        *self.seq += 1;
        self.effects.push_back(Effect::Journal(JournalEntry {
            seq: *self.seq,
            at: self.at,
            request: self.request,
            kind,
            asset,
            amount,
            from,
            to,
            grant,
        }));
    }
}

/// A journal sink over `$engine`'s effects, borrowing only `effects` and `state.journal_seq`, so
/// the handler can hold a wallet mutably at the same time.
macro_rules! out {
    ($engine:ident) => {
        Out {
            effects: &mut $engine.effects,
            seq: &mut $engine.state.journal_seq,
            at: $engine.state.now,
            request: $engine.request,
        }
    };
}

/// The remembered requests and the sequence number of the first: what the request index's
/// 4-byte positions (sequence numbers, truncated) point into.
type Remembers<'a> = (&'a remember::Fifo<remember::Remembered>, u64);

/// The position in the remembered requests of the one with `key`, found through `index`.
fn find_in(
    index: &hashbrown::HashTable<u32>,
    (requests, first): Remembers,
    key: Key,
) -> Option<usize> {
    let first = first as u32;
    index
        .find(key.hash(), |&p| {
            requests
                .get(p.wrapping_sub(first) as usize)
                .is_some_and(|r| r.key == key)
        })
        .map(|&p| p.wrapping_sub(first) as usize)
}

/// Files the remembered request with `key` at sequence number `seq` (already among the
/// remembered requests) in `index`.
fn file_in(
    index: &mut hashbrown::HashTable<u32>,
    (requests, first): Remembers,
    key: Key,
    seq: u64,
) {
    let first = first as u32;
    index.insert_unique(key.hash(), seq as u32, |&p| {
        requests
            .get(p.wrapping_sub(first) as usize)
            .map_or(0, |r| r.key.hash())
    });
}

/// Wallet `w` for changing: copied first if a checkpoint still shares it (copy-on-write).
/// Sets what was refunded of the forgotten charge `key`, moving its entry in the index of
/// `State::late_refunds` by time with it.
fn set_late_refund(state: &mut State, index: &mut Index, key: Key, late: LateRefund) {
    if let Some(old) = state.late_refunds.insert(key, late) {
        index.late_by_until.remove(&(old.until, key));
    }
    index.late_by_until.insert((late.until, key));
}

fn wallet_mut(wallets: &mut [Arc<Wallet>], w: u32) -> &mut Wallet {
    Arc::make_mut(&mut wallets[w as usize])
}

/// Adds an active grant to a balance; its amount pays debt first. Returns the debt paid.
fn credit(balance: &mut Balance, mut grant: GrantState) -> Decimal {
    let paid = balance.debt.min(grant.remaining);
    balance.debt -= paid;
    grant.remaining -= paid;
    if !grant.remaining.is_zero() {
        balance.active += grant.remaining;
        let key = grant.order_key();
        let at = balance.grants.partition_point(|g| g.order_key() < key);
        crate::state::grow_tight(&mut balance.grants);
        balance.grants.insert(at, grant);
    }
    paid
}

/// What a debit consumed, for the refund of the charge: a refund credit never outlives, and is
/// spent in the place of, the credit that paid.
#[derive(Clone, Copy, Debug)]
struct Debited {
    /// What the grants could not cover: new debt.
    debt: Decimal,
    /// The priority of the first grant consumed (0 when none was).
    priority: u32,
    /// The latest expiry among the grants consumed; `None` when any of them never expires or
    /// part of the amount became debt (a refund of that part is as good as cash).
    expires_at: Option<Timestamp>,
}

/// Takes `amount` from the active grants in consumption order, writing one journal entry per
/// grant part; what the grants cannot cover becomes debt.
///
/// Money behind open holds is set aside: the grants give at most `active − held`, and the rest
/// of the amount becomes debt even when the grants still hold more. A hold's settlement closes
/// the hold first, so the money it reserved is free for its own charge.
fn debit(
    balance: &mut Balance,
    amount: Decimal,
    wallet: WalletId,
    to: Account,
    out: &mut Out<'_>,
) -> Debited {
    let asset = balance.asset;
    let free = (balance.active - balance.held).max(Decimal::ZERO);
    let mut left = amount.min(free);
    let mut taken = Decimal::ZERO;
    let mut priority = None;
    let mut expires_at = Some(Timestamp(i64::MIN));
    let mut i = 0;
    while !left.is_zero() && i < balance.grants.len() {
        let grant = &mut balance.grants[i];
        let part = left.min(grant.remaining);
        grant.remaining -= part;
        left -= part;
        taken += part;
        priority.get_or_insert(grant.priority);
        expires_at = match (expires_at, grant.expires_at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        let (id, exhausted) = (grant.id, grant.remaining.is_zero());
        out.entry(
            EntryKind::Debit,
            asset,
            part,
            Account::Wallet(wallet),
            to,
            Some(id),
        );
        if exhausted {
            balance.grants.remove(i);
        } else {
            i += 1;
        }
    }
    balance.active -= taken;
    let debt = amount - taken;
    if !debt.is_zero() {
        balance.debt += debt;
        out.entry(
            EntryKind::Debt,
            asset,
            debt,
            Account::Wallet(wallet),
            to,
            None,
        );
        expires_at = None;
    }
    if taken.is_zero() {
        expires_at = None;
    }
    Debited {
        debt,
        priority: priority.unwrap_or(0),
        expires_at,
    }
}

/// Refuses a debit of `amount` whose shortfall (what the grants may not give, holds set aside)
/// would overflow the debt.
fn check_debt_room(
    balance: Option<&Balance>,
    amount: Decimal,
    scale: u32,
) -> Result<(), ResultCode> {
    if let Some(balance) = balance {
        let free = (balance.active - balance.held).max(Decimal::ZERO);
        let shortfall = (amount - free).max(Decimal::ZERO);
        money::within(money::add(balance.debt, shortfall)?, scale)?;
    }
    Ok(())
}

/// The strict-spend rules: not frozen, not in debt, and `amount` within available + overdraft.
fn check_spend(wallet: &Wallet, asset: AssetCode, amount: Decimal) -> Result<(), Reply> {
    if wallet.frozen {
        return Err(ResultCode::WalletFrozen.into());
    }
    let balance = wallet.balance(&asset);
    if balance.is_some_and(Balance::in_debt) {
        return Err(ResultCode::WalletInDebt.into());
    }
    let spendable = balance.map_or(Decimal::ZERO, Balance::spendable);
    if spendable < amount {
        return Err(Reply {
            code: ResultCode::InsufficientFunds,
            value: ReplyValue::Shortfall {
                asset,
                spendable,
                required: amount,
            },
        });
    }
    Ok(())
}

/// A priced event.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Priced {
    pub asset: u32,
    pub amount: Decimal,
    pub product: u32,
    pub plan: u32,
    pub version: u32,
    pub rule: u32,
}

impl Engine {
    /// An empty shard. Panics if `config` is invalid; validate it at the edge first.
    pub fn new(config: Config) -> Engine {
        if let Err(e) = config.validate() {
            panic!("invalid engine config: {e}");
        }
        Engine {
            state: State::new(config),
            index: Index::default(),
            effects: VecDeque::new(),
            request: None,
            key: Key([0; 3]),
            charge: None,
            recorded: None,
            evicted: 0,
        }
    }

    /// The state, for snapshots. Take it only when every effect has been drained.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Rebuilds an engine from a state (a restored snapshot), checking its invariants.
    pub fn from_state(state: State) -> Result<Engine, RestoreError> {
        restore(state)
    }

    /// Open holds over every wallet of this shard, kept as they open and close (O(1)).
    pub fn holds_open(&self) -> u64 {
        self.index.holds_open
    }

    pub(crate) fn rebuild_timers(&mut self) {
        self.index.holds_open = self
            .state
            .wallets
            .iter()
            .map(|w| w.holds.len() as u64)
            .sum();
        let mut timers = BTreeSet::new();
        for (w, wallet) in self.state.wallets.iter().enumerate() {
            let wallet_index = w as u32;
            let timer = |at, kind, id| Timer {
                at,
                kind,
                wallet: wallet_index,
                id,
            };
            for balance in &wallet.balances {
                for g in &balance.pending {
                    let at = g.effective_at.expect("pending grants have effective_at");
                    timers.insert(timer(at, TimerKind::GrantEffective, g.id.0));
                }
                for g in balance.grants.iter().chain(&balance.pending) {
                    // A grant whose expiry has come was dealt with when it came: what it still
                    // holds is kept for open holds, and goes when they close. Re-arming it would
                    // break it early.
                    if let Some(at) = g.expires_at.filter(|&at| at > self.state.now) {
                        timers.insert(timer(at, TimerKind::GrantExpiry, g.id.0));
                        // Notices already due fired before this state was saved.
                        if let Some(notice) = self.expiring_at(at) {
                            if notice > self.state.now && notice < at {
                                timers.insert(timer(notice, TimerKind::GrantExpiring, g.id.0));
                            }
                        }
                    }
                }
            }
            for h in &wallet.holds {
                timers.insert(timer(h.deadline, TimerKind::HoldDeadline, h.id.0));
            }
            for t in &wallet.topups {
                let asset = u64::from(self.index.assets[&t.asset]);
                if t.retry_armed {
                    timers.insert(timer(t.next_allowed, TimerKind::TopUpRetry, asset));
                }
                if let Some(flight) = t.in_flight {
                    let at = flight.at.add_us(TOPUP_IN_FLIGHT_TIMEOUT_US);
                    timers.insert(timer(at, TimerKind::TopUpTimeout, asset));
                }
            }
        }
        self.index.timers = timers;
    }

    /// A hash over the whole state: equal digests mean equal states. Used by tests and by
    /// recovery to check that replay rebuilt what was there.
    pub fn digest(&self) -> u64 {
        digest_state(&self.state)
    }

    /// The time of the next timer, if any: call [`Engine::handle_timeout`] then.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.index.timers.first().map(|t| t.at)
    }

    /// The next queued effect. Drain them all after every input.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// Effects waiting to be drained.
    pub fn pending_effects(&self) -> usize {
        self.effects.len()
    }

    /// Advances time to `now`: expires grants and holds, fires top-up retries, forgets request
    /// ids older than the retention window. Time never goes backwards: an earlier `now` is
    /// treated as the latest time seen.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let now = now.max(self.state.now);
        self.request = None;
        // Each timer fires at its own time, whenever the loop gets round to calling this: what a
        // timer does depends only on the inputs, never on when the shard loop was idle.
        while let Some(&timer) = self.index.timers.first() {
            if timer.at > now {
                break;
            }
            self.index.timers.pop_first();
            self.state.now = self.state.now.max(timer.at);
            let before = self.levels(timer.wallet);
            self.fire(timer);
            self.balance_alerts(timer.wallet, &before);
        }
        self.state.now = now;
        // By 10-ms ticks: an id is kept up to 10 ms longer than the window, never shorter, and
        // ids leave a few at a time (a whole second at once stalled the request that crossed
        // it). What is forgotten depends only on the time, never on how often this is called,
        // so replay forgets exactly what the live shard forgot.
        let retention = self.state.config.idempotency_retention_us;
        while self
            .state
            .requests
            .front()
            .is_some_and(|r| remember::forgotten(r.at, now, retention))
        {
            self.forget_request();
        }
        let horizon = remember::seconds(Timestamp(now.0.saturating_sub(retention)));
        // Requests remembered by a previous format go all at once, when the window has passed
        // over the newest of them.
        if !self.state.legacy.is_empty() && self.index.legacy_newest < horizon {
            self.state.legacy.clear();
        }
        while let Some(&(until, key)) = self.index.late_by_until.first() {
            if until > now {
                break;
            }
            self.index.late_by_until.pop_first();
            self.state.late_refunds.remove(&key);
        }
    }

    /// Applies `request` like [`Engine::handle_request`], except that a refund naming a charge
    /// the engine no longer remembers (its request left the idempotency window) takes the
    /// charge as the history store recorded it, `charge`. The engine keeps what it refunded of
    /// such charges ([`State::late_refunds`]), so refunds never exceed what was charged, and
    /// refuses one after `charge.refundable_until` or one for an event applied since the table
    /// answers for (it would still hold it). A charge the engine remembers is refunded as
    /// always and `charge` is ignored. The caller (the server) reads `charge` from its own
    /// store; it must never come from a client. Like every input, the call is logged with
    /// `charge` and replayed the same way.
    pub fn handle_recorded_refund(
        &mut self,
        now: Timestamp,
        request: &Request,
        charge: &RecordedCharge,
    ) -> Reply {
        self.recorded = Some(charge.clone());
        let reply = self.handle_request(now, request);
        self.recorded = None;
        reply
    }

    /// Request ids forgotten before their retention passed because the table was full
    /// ([`Config::idempotency_max_ids`]); not part of the state.
    pub fn idempotency_evicted(&self) -> u64 {
        self.evicted
    }

    /// Forgets the oldest remembered request before its time (the table is full): from now on
    /// the table answers only for ids applied after the end of that id's tick.
    fn evict_oldest(&mut self) {
        if let Some(front) = self.state.requests.front() {
            let now_tick = remember::tick(self.state.now);
            let age = i64::from((now_tick as u32).wrapping_sub(front.at));
            let end = Timestamp((now_tick - age + 1) * remember::TICK_US);
            self.state.remembered_from = self.state.remembered_from.max(end);
            self.forget_request();
            self.evicted += 1;
        }
    }

    /// Changes the idempotency settings at `now`. This is an input like a request: log it, and
    /// replay applies it at the same point. A shorter window or a smaller bound forgets ids at
    /// once (the oldest first); a longer window does not bring back ids already forgotten, so
    /// usage older than the old window stays refused until the new one has filled.
    pub fn set_idempotency(
        &mut self,
        now: Timestamp,
        retention_us: i64,
        max_ids: u64,
    ) -> Result<(), String> {
        let config = Config {
            idempotency_retention_us: retention_us,
            idempotency_max_ids: max_ids,
            ..self.state.config
        };
        config.validate()?;
        self.handle_timeout(now);
        let old_start = self
            .state
            .now
            .add_us(-self.state.config.idempotency_retention_us);
        self.state.remembered_from = self.state.remembered_from.max(old_start);
        self.state.config = config;
        self.handle_timeout(now);
        while self.state.requests.len() as u64 > max_ids {
            self.evict_oldest();
        }
        Ok(())
    }

    /// Changes the alert settings at `now`. An input like a request: log it, and replay applies
    /// it at the same point. Timers due by `now` fire first, under the old settings. A new lead
    /// re-arms the expiring notices of every grant that has not expired, as a restart under the
    /// new lead would: a notice still ahead moves to its new time, and one that a longer lead
    /// puts in the past goes out now unless the old lead already sent it. A shorter lead can
    /// therefore send a grant's notice a second time (grants do not record that theirs went).
    pub fn set_alerts(
        &mut self,
        now: Timestamp,
        low_balance_usd: Decimal,
        grant_expiring_lead_us: i64,
    ) -> Result<(), String> {
        let config = Config {
            low_balance_usd,
            grant_expiring_lead_us,
            ..self.state.config
        };
        config.validate()?;
        self.handle_timeout(now);
        let old = self.expiring_lead();
        self.state.config = config;
        if old == self.expiring_lead() {
            return Ok(());
        }
        let now = self.state.now;
        self.index
            .timers
            .retain(|t| t.kind != TimerKind::GrantExpiring);
        let mut due = Vec::new();
        for (w, wallet) in self.state.wallets.iter().enumerate() {
            for balance in &wallet.balances {
                for g in balance.grants.iter().chain(&balance.pending) {
                    let Some(at) = g.expires_at.filter(|&at| at > now) else {
                        continue;
                    };
                    let Some(notice) = self.expiring_at(at) else {
                        continue;
                    };
                    let sent = old.is_some_and(|lead| at.0.saturating_sub(lead) <= now.0);
                    if notice > now {
                        due.push((notice, w as u32, g.id.0, false));
                    } else if !sent {
                        due.push((now, w as u32, g.id.0, true));
                    }
                }
            }
        }
        for (at, wallet, id, fire) in due {
            let timer = Timer {
                at,
                kind: TimerKind::GrantExpiring,
                wallet,
                id,
            };
            if fire {
                self.fire(timer);
            } else {
                self.index.timers.insert(timer);
            }
        }
        Ok(())
    }

    /// The lead of expiring notices, `None` when they are off.
    fn expiring_lead(&self) -> Option<i64> {
        let lead = self.state.config.grant_expiring_lead_us;
        (lead > 0).then_some(lead)
    }

    /// Forgets the oldest remembered request.
    fn forget_request(&mut self) {
        let (state, index) = (&mut self.state, &mut self.index);
        let Some(&front) = state.requests.front() else {
            return;
        };
        let seq = state.requests_first_seq;
        if let Ok(entry) = index
            .requests
            .find_entry(front.key.hash(), |&p| p == seq as u32)
        {
            entry.remove();
        }
        if front.spilled() {
            state.spilled.remove(&seq);
        }
        state.requests.pop_front();
        state.requests_first_seq += 1;
        // Requests of a previous format are all older than any of today's: they go first.
        state.legacy.clear();
        // A charge is refundable by its remembered record while its request is remembered; what
        // was refunded of it is kept beyond, for refunds that name the recorded charge.
        while state
            .charges
            .front()
            .is_some_and(|c| c.seq < state.requests_first_seq)
        {
            let charge = *state.charges.front().expect("checked");
            state.charges.pop_front();
            if charge.refunded > Decimal::ZERO {
                let mut late = LateRefund {
                    refunded: charge.refunded,
                    until: late_refund_until(charge.hour),
                };
                // A request id reused for another charge after the window shares the entry:
                // the refunded amounts add up, so neither charge is refunded beyond its own.
                if let Some(old) = state.late_refunds.get(&front.key) {
                    late.refunded = late.refunded.saturating_add(old.refunded);
                    late.until = late.until.max(old.until);
                }
                set_late_refund(state, index, front.key, late);
            }
        }
    }

    /// The position of the remembered request `key` in `state.requests`.
    fn find_request(&self, key: Key) -> Option<usize> {
        let requests = (&self.state.requests, self.state.requests_first_seq);
        find_in(&self.index.requests, requests, key)
    }

    /// Where the charge a refund of `event` for wallet `wallet` names is kept, if anywhere.
    /// The charge log is ordered by request sequence number, so it needs no index of its own:
    /// the request is found by its key, its charge by binary search (refunds are rare).
    fn find_charge(&self, wallet: &WalletId, event: RequestId) -> Option<ChargeAt> {
        if let Some(slot) = self.find_request(Key::of(scope_of(Some(wallet)), event)) {
            let seq = self.state.requests_first_seq + slot as u64;
            let charges = &self.state.charges;
            let (mut lo, mut hi) = (0, charges.len());
            while lo < hi {
                let mid = (lo + hi) / 2;
                if charges.get(mid).is_some_and(|c| c.seq < seq) {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            return charges
                .get(lo)
                .filter(|c| c.seq == seq)
                .map(|_| ChargeAt::Log(lo));
        }
        self.state
            .legacy
            .get(&event)
            .and_then(|r| r.charge)
            .map(|_| ChargeAt::Legacy(event))
    }

    fn charge_at(&self, at: ChargeAt) -> ChargeRef {
        match at {
            ChargeAt::Log(i) => *self.state.charges.get(i).expect("found"),
            ChargeAt::Legacy(id) => self.state.legacy[&id].charge.expect("found"),
        }
    }

    fn charge_at_mut(&mut self, at: ChargeAt) -> &mut ChargeRef {
        match at {
            ChargeAt::Log(i) => self.state.charges.get_mut(i).expect("found"),
            ChargeAt::Legacy(id) => self
                .state
                .legacy
                .get_mut(&id)
                .and_then(|r| r.charge.as_mut())
                .expect("found"),
        }
    }

    /// The reply remembered at position `slot`, with the available balance of now.
    fn remembered_reply(&self, slot: usize, wallet: Option<&WalletId>) -> Reply {
        let record = self
            .state
            .requests
            .get(slot)
            .expect("indexed requests are remembered");
        let wallet = wallet
            .and_then(|w| self.index.wallets.get(&self.state.wallets, w))
            .map(|w| &self.state.wallets[w as usize]);
        let available_now = |asset: AssetCode| {
            wallet
                .and_then(|w| w.balance(&asset))
                .map_or(Decimal::ZERO, Balance::available)
        };
        if record.spilled() {
            // Kept whole, and repeated like a packed one: the balance is the one of now.
            let seq = self.state.requests_first_seq + slot as u64;
            let mut reply = self.state.spilled[&seq];
            match &mut reply.value {
                ReplyValue::Charge {
                    asset, available, ..
                }
                | ReplyValue::Hold {
                    asset, available, ..
                } => *available = available_now(*asset),
                _ => {}
            }
            return reply;
        }
        record.unpack(|i| self.state.assets[i as usize].code, available_now)
    }

    /// Remembers the request being applied (`self.key`) with its reply, and its charge if it
    /// made one. Forgets the oldest id first if the table is full.
    fn remember(&mut self, fingerprint: u64, reply: &Reply) {
        if self.state.requests.len() as u64 >= self.state.config.idempotency_max_ids {
            self.evict_oldest();
        }
        let at = remember::tick(self.state.now) as u32;
        let key = self.key;
        let assets = &self.index.assets;
        let (record, spilled) =
            remember::remember(key, at, fingerprint, reply, |a| assets.get(a).copied());
        let seq = self.state.requests_first_seq + self.state.requests.len() as u64;
        self.state.requests.push_back(record);
        if let Some(reply) = spilled {
            self.state.spilled.insert(seq, reply);
        }
        let requests = (&self.state.requests, self.state.requests_first_seq);
        file_in(&mut self.index.requests, requests, key, seq);
        if let Some(mut charge) = self.charge.take() {
            charge.seq = seq;
            self.state.charges.push_back(charge);
        }
    }

    /// Applies one request at time `now` and returns its reply. Effects are queued for
    /// [`Engine::poll_effect`].
    pub fn handle_request(&mut self, now: Timestamp, request: &Request) -> Reply {
        self.handle_timeout(now);
        let fingerprint = fingerprint(&request.command);
        let wallet = request.command.wallet();
        let key = Key::of(scope_of(wallet), request.id);
        if let Some(old) = self.state.legacy.get(&request.id) {
            // Remembered by a previous format, by id alone: a repeat or a conflict, as then.
            return if old.fingerprint == fingerprint {
                old.reply
            } else {
                Reply::rejected(ResultCode::IdempotencyConflict)
            };
        }
        if let Some(slot) = self.find_request(key) {
            let first = self.state.requests.get(slot).expect("found");
            return if first.fingerprint() == fingerprint {
                self.remembered_reply(slot, wallet)
            } else {
                Reply::rejected(ResultCode::IdempotencyConflict)
            };
        }
        self.request = Some(request.id);
        self.key = key;
        self.charge = None;
        let before = wallet
            .and_then(|w| self.index.wallets.get(&self.state.wallets, w))
            .map(|w| (w, self.levels(w)));
        let reply = match self.apply(&request.command) {
            Ok(value) => Reply::ok(value),
            Err(reply) => reply,
        };
        if let Some((w, before)) = before {
            self.balance_alerts(w, &before);
        }
        self.remember(fingerprint, &reply);
        self.request = None;
        reply
    }

    fn apply(&mut self, command: &Command) -> Handled {
        match command {
            Command::DefineAsset {
                code,
                scale,
                usd_value,
            } => self.define_asset(*code, *scale, *usd_value),
            Command::DefineProduct { code, dimensions } => self.define_product(*code, dimensions),
            Command::DraftPlan {
                plan,
                custom_for,
                asset,
                rules,
            } => self.draft_plan(*plan, *custom_for, *asset, rules),
            Command::PublishPlan { plan } => self.publish_plan(plan),
            Command::CreateWallet(c) => self.create_wallet(c),
            Command::SetOverdraft {
                wallet,
                asset,
                limit,
            } => self.set_overdraft(wallet, *asset, *limit),
            Command::Freeze { wallet } => self.set_frozen(wallet, true),
            Command::Unfreeze { wallet } => self.set_frozen(wallet, false),
            Command::AssignPlan {
                wallet,
                plan,
                version,
                effective_from,
            } => self.assign_plan(wallet, plan, *version, *effective_from),
            Command::Grant(g) => self.grant(g),
            Command::Usage(event) => self.usage(event),
            Command::Reserve {
                wallet,
                amount,
                deadline,
            } => self.reserve(wallet, amount, *deadline),
            Command::Settle {
                wallet,
                hold,
                usage,
            } => self.settle(wallet, *hold, usage),
            Command::Release { wallet, hold } => self.release(wallet, *hold),
            Command::Refund {
                wallet,
                event,
                amount,
            } => self.refund(wallet, *event, *amount),
            Command::Dispute {
                wallet,
                grant,
                freeze,
            } => self.dispute(wallet, *grant, *freeze),
            Command::DisputeWon { wallet, grant } => self.dispute_won(wallet, *grant),
            Command::Adjust {
                wallet,
                asset,
                amount,
                reason,
            } => self.adjust(wallet, *asset, *amount, reason),
            Command::SetTopUpRule { wallet, rule } => self.set_topup_rule(wallet, rule),
            Command::RemoveTopUpRule { wallet, asset } => self.remove_topup_rule(wallet, *asset),
            Command::TopUpSucceeded {
                wallet,
                asset,
                trigger,
                payment_id,
                amount,
            } => self.topup_succeeded(wallet, *asset, *trigger, *payment_id, *amount),
            Command::TopUpFailed {
                wallet,
                asset,
                trigger,
                reason,
            } => self.topup_failed(wallet, *asset, *trigger, *reason),
            Command::PriceAsset { asset, price } => self.price_asset(*asset, *price),
            Command::SetBilling {
                wallet,
                customer,
                payment_method,
            } => self.set_billing(wallet, *customer, *payment_method),
            Command::Payment {
                wallet,
                payment_id,
                event,
            } => self.payment_event(wallet, *payment_id, *event),
        }
    }

    // ----- lookups -------------------------------------------------------------------------

    pub(crate) fn wallet_index(&self, wallet: &WalletId) -> Result<u32, ResultCode> {
        self.index
            .wallets
            .get(&self.state.wallets, wallet)
            .ok_or(ResultCode::UnknownWallet)
    }

    pub(crate) fn asset_index(&self, asset: &AssetCode) -> Result<u32, ResultCode> {
        self.index
            .assets
            .get(asset)
            .copied()
            .ok_or(ResultCode::UnknownAsset)
    }

    pub(crate) fn asset(&self, asset: &AssetCode) -> Result<Asset, ResultCode> {
        Ok(self.state.assets[self.asset_index(asset)? as usize])
    }

    // ----- catalog -------------------------------------------------------------------------

    fn define_asset(&mut self, code: AssetCode, scale: u32, usd_value: Decimal) -> Handled {
        if scale > ASSET_SCALE_MAX {
            return Err(ResultCode::InvalidArgument.into());
        }
        if usd_value < Decimal::ZERO
            || usd_value > money::AMOUNT_MAX
            || money::significant_scale(usd_value) > USD_VALUE_SCALE_MAX
        {
            return Err(ResultCode::InvalidPrice.into());
        }
        if let Ok(existing) = self.asset(&code) {
            return if existing.scale == scale && existing.usd_value == usd_value {
                Ok(ReplyValue::None)
            } else {
                Err(ResultCode::AssetConflict.into())
            };
        }
        if self.state.assets.len() >= ASSETS_MAX {
            return Err(ResultCode::LimitExceeded.into());
        }
        self.index
            .assets
            .insert(code, self.state.assets.len() as u32);
        self.state.assets.push(Asset {
            code,
            scale,
            usd_value,
            topup_price: None,
        });
        Ok(ReplyValue::None)
    }

    fn define_product(&mut self, code: Name, dimensions: &[Name]) -> Handled {
        if dimensions.is_empty() {
            return Err(ResultCode::InvalidArgument.into());
        }
        if dimensions.len() > QUANTITIES_MAX {
            return Err(ResultCode::LimitExceeded.into());
        }
        if (1..dimensions.len()).any(|i| dimensions[..i].contains(&dimensions[i])) {
            return Err(ResultCode::InvalidArgument.into());
        }
        if let Some(&p) = self.index.products.get(&code) {
            return if self.state.products[p as usize].dimensions == dimensions {
                Ok(ReplyValue::None)
            } else {
                Err(ResultCode::ProductConflict.into())
            };
        }
        if self.state.products.len() >= PRODUCTS_MAX {
            return Err(ResultCode::LimitExceeded.into());
        }
        self.index
            .products
            .insert(code, self.state.products.len() as u32);
        self.state.products.push(Product {
            code,
            dimensions: dimensions.to_vec(),
        });
        Ok(ReplyValue::None)
    }

    fn draft_plan(
        &mut self,
        name: Name,
        custom_for: Option<WalletId>,
        asset: AssetCode,
        rules: &[pricing::PriceRule],
    ) -> Handled {
        let asset = self.asset_index(&asset)?;
        pricing::validate_rules(rules)?;
        for rule in rules {
            let product = self
                .index
                .products
                .get(&rule.product)
                .ok_or(ResultCode::UnknownProduct)?;
            let dimensions = &self.state.products[*product as usize].dimensions;
            if rule
                .components
                .iter()
                .any(|c| !dimensions.contains(&c.dimension))
            {
                return Err(ResultCode::UnknownDimension.into());
            }
        }
        let plan = match self.index.plans.get(&name) {
            Some(&p) => {
                let plan = &self.state.plans[p as usize];
                if custom_for.is_some() && custom_for != plan.custom_for {
                    return Err(ResultCode::InvalidArgument.into());
                }
                p
            }
            None => {
                if self.state.plans.len() >= PLANS_MAX {
                    return Err(ResultCode::LimitExceeded.into());
                }
                let p = self.state.plans.len() as u32;
                self.state.plans.push(Plan {
                    name,
                    custom_for,
                    draft: None,
                    versions: Vec::new(),
                });
                self.index.plans.insert(name, p);
                p
            }
        };
        let order = pricing::specificity_order(rules);
        self.state.plans[plan as usize].draft = Some(PlanVersion {
            asset,
            rules: rules.to_vec(),
            at: self.state.now,
            order,
        });
        Ok(ReplyValue::None)
    }

    fn publish_plan(&mut self, name: &Name) -> Handled {
        let &p = self.index.plans.get(name).ok_or(ResultCode::UnknownPlan)?;
        let plan = &mut self.state.plans[p as usize];
        let mut version = plan.draft.take().ok_or(ResultCode::NoDraft)?;
        version.at = self.state.now;
        plan.versions.push(version);
        Ok(ReplyValue::Version {
            version: plan.versions.len() as u32,
        })
    }

    // ----- wallets -------------------------------------------------------------------------

    fn create_wallet(&mut self, c: &CreateWallet) -> Handled {
        if self
            .index
            .wallets
            .get(&self.state.wallets, &c.wallet)
            .is_some()
        {
            return Err(ResultCode::WalletExists.into());
        }
        if c.metadata.len() > METADATA_MAX || c.overdraft.len() > ASSETS_MAX {
            return Err(ResultCode::LimitExceeded.into());
        }
        if (1..c.metadata.len()).any(|i| c.metadata[..i].iter().any(|m| m.0 == c.metadata[i].0)) {
            return Err(ResultCode::InvalidArgument.into());
        }
        let mut balances = Vec::with_capacity(c.overdraft.len());
        for limit in &c.overdraft {
            let asset = self.asset(&limit.asset)?;
            money::check_amount_or_zero(limit.amount, asset.scale)?;
            if balances.iter().any(|b: &Balance| b.asset == limit.asset) {
                return Err(ResultCode::InvalidArgument.into());
            }
            let mut balance = Balance::new(limit.asset);
            balance.overdraft = limit.amount;
            crate::state::grow_tight(&mut balances);
            balances.push(balance);
        }
        let position = self.state.wallets.len() as u32;
        self.state.wallets.push(Arc::new(Wallet {
            id: c.wallet,
            created_at: self.state.now,
            frozen: false,
            customer: None,
            payment_method: None,
            metadata: c.metadata.clone(),
            balances,
            holds: Vec::new(),
            closed_holds: VecDeque::new(),
            plans: Vec::new(),
            topups: Vec::new(),
            payments: Vec::new(),
            adjustments: Vec::new(),
            margin: Default::default(),
        }));
        self.index.wallets.insert(&self.state.wallets, position);
        self.effects
            .push_back(Effect::WalletCreated { wallet: c.wallet });
        Ok(ReplyValue::None)
    }

    fn set_overdraft(&mut self, wallet: &WalletId, asset: AssetCode, limit: Decimal) -> Handled {
        let w = self.wallet_index(wallet)?;
        let scale = self.asset(&asset)?.scale;
        money::check_amount_or_zero(limit, scale)?;
        wallet_mut(&mut self.state.wallets, w)
            .balance_mut(&asset)
            .overdraft = limit;
        Ok(ReplyValue::None)
    }

    fn set_frozen(&mut self, wallet: &WalletId, frozen: bool) -> Handled {
        let w = self.wallet_index(wallet)?;
        let wallet = wallet_mut(&mut self.state.wallets, w);
        if frozen && !wallet.frozen {
            let wallet = wallet.id;
            self.effects.push_back(Effect::WalletFrozen { wallet });
        }
        wallet_mut(&mut self.state.wallets, w).frozen = frozen;
        if !frozen {
            // A frozen wallet triggered nothing; a balance that fell meanwhile may need one now.
            self.check_all_topups(w);
        }
        Ok(ReplyValue::None)
    }

    fn set_billing(
        &mut self,
        wallet: &WalletId,
        customer: Option<Name>,
        payment_method: Option<Name>,
    ) -> Handled {
        let w = self.wallet_index(wallet)?;
        if customer.is_some_and(|c| c.as_str().is_empty())
            || payment_method.is_some_and(|p| p.as_str().is_empty())
        {
            return Err(ResultCode::InvalidArgument.into());
        }
        let wallet = wallet_mut(&mut self.state.wallets, w);
        wallet.customer = customer;
        wallet.payment_method = payment_method;
        // Rules wait for a payment profile; this may be the one they waited for.
        self.check_all_topups(w);
        Ok(ReplyValue::None)
    }

    fn check_all_topups(&mut self, w: u32) {
        let wallet = &self.state.wallets[w as usize];
        if wallet.topups.is_empty() {
            return;
        }
        // In the order the assets were declared, so which one goes first never depends on the
        // order the rules were set in.
        let mut assets: Vec<(u32, AssetCode)> = wallet
            .topups
            .iter()
            .map(|t| (self.index.assets[&t.asset], t.asset))
            .collect();
        assets.sort_unstable();
        for (_, asset) in assets {
            self.check_topup(w, asset);
        }
    }

    fn assign_plan(
        &mut self,
        wallet: &WalletId,
        plan: &Name,
        version: u32,
        from: Timestamp,
    ) -> Handled {
        let w = self.wallet_index(wallet)?;
        let &p = self.index.plans.get(plan).ok_or(ResultCode::UnknownPlan)?;
        let plan = &self.state.plans[p as usize];
        if version == 0 || version as usize > plan.versions.len() {
            return Err(ResultCode::UnknownPlanVersion.into());
        }
        if plan.custom_for.is_some_and(|owner| owner != *wallet) {
            return Err(ResultCode::PlanNotAssignable.into());
        }
        let plans = &mut wallet_mut(&mut self.state.wallets, w).plans;
        let assignment = Assignment {
            from,
            plan: p,
            version,
        };
        match plans.binary_search_by_key(&from, |a| a.from) {
            Ok(i) => plans[i] = assignment,
            Err(_) if plans.len() >= ASSIGNMENTS_MAX => {
                return Err(ResultCode::LimitExceeded.into())
            }
            Err(i) => {
                crate::state::grow_tight(plans);
                plans.insert(i, assignment)
            }
        }
        Ok(ReplyValue::None)
    }

    // ----- grants --------------------------------------------------------------------------

    fn grant(&mut self, g: &Grant) -> Handled {
        let w = self.wallet_index(&g.wallet)?;
        let asset = self.asset(&g.asset)?;
        money::check_amount(g.amount, asset.scale)?;
        let now = self.state.now;
        let effective_at = g.effective_at.filter(|&t| t > now);
        if let Some(expires) = g.expires_at {
            if expires <= now || effective_at.is_some_and(|e| expires <= e) {
                return Err(ResultCode::TimestampOutOfRange.into());
            }
        }
        if let GrantSource::TopUp { payment_id } = g.source {
            if let Some(value) = self.known_payment(w, payment_id, g.asset, g.amount)? {
                return Ok(value);
            }
        }
        let wallet = &self.state.wallets[w as usize];
        if let Some(balance) = wallet.balance(&g.asset) {
            money::within(money::add(balance.ledger(), g.amount)?, asset.scale)?;
        }
        let grant = self.add_grant(
            w,
            g.asset,
            g.amount,
            g.priority,
            effective_at,
            g.expires_at,
            g.source,
        );
        Ok(grant)
    }

    /// If `payment_id` was already credited to this wallet: the first reply when it was for the
    /// same asset and amount, a conflict otherwise.
    fn known_payment(
        &self,
        w: u32,
        payment_id: Name,
        asset: AssetCode,
        amount: Decimal,
    ) -> Result<Option<ReplyValue>, ResultCode> {
        let wallet = &self.state.wallets[w as usize];
        match wallet.payments.iter().find(|p| p.payment_id == payment_id) {
            None => Ok(None),
            Some(p) if p.asset == asset && p.amount == amount => Ok(Some(ReplyValue::Grant {
                grant: p.grant,
                debt_paid: Decimal::ZERO,
            })),
            Some(_) => Err(ResultCode::PaymentConflict),
        }
    }

    /// Creates a grant (already validated): journal entry from the source's account, then
    /// pending or active, expiry timer, payment record.
    #[allow(clippy::too_many_arguments)]
    fn add_grant(
        &mut self,
        w: u32,
        asset: AssetCode,
        amount: Decimal,
        priority: u32,
        effective_at: Option<Timestamp>,
        expires_at: Option<Timestamp>,
        source: GrantSource,
    ) -> ReplyValue {
        let id = GrantId(self.state.next_grant);
        self.state.next_grant += 1;
        let from = match source {
            GrantSource::TopUp { .. } => Account::TopUpClearing,
            GrantSource::Promotion => Account::Promotion,
            GrantSource::Refund => Account::Refund,
            GrantSource::Adjustment => Account::Adjustment,
        };
        let grant = GrantState {
            id,
            amount,
            remaining: amount,
            priority,
            effective_at,
            expires_at,
            source,
        };
        let kind = match source {
            GrantSource::Refund => EntryKind::Refund,
            _ => EntryKind::Grant,
        };
        let mut out = out!(self);
        let wallet = wallet_mut(&mut self.state.wallets, w);
        let wallet_id = wallet.id;
        out.entry(
            kind,
            asset,
            amount,
            from,
            Account::Wallet(wallet_id),
            Some(id),
        );
        if let GrantSource::TopUp { payment_id } = source {
            crate::state::grow_tight(&mut wallet.payments);
            wallet.payments.push(Payment {
                payment_id,
                grant: id,
                asset,
                amount,
                priority,
                expires_at,
                disputed: false,
                dispute_lost: false,
                refunded: Decimal::ZERO,
                refund_removed: Decimal::ZERO,
                expired: Decimal::ZERO,
            });
        }
        let balance = wallet.balance_mut(&asset);
        let debt_paid = match effective_at {
            Some(_) => {
                balance.pending.push(grant);
                Decimal::ZERO
            }
            None => credit(balance, grant),
        };
        // New credit covers open holds: expired grants kept behind them may go now.
        self.expire_overdue(w, asset);
        if let Some(at) = effective_at {
            self.timer(at, TimerKind::GrantEffective, w, id.0);
        }
        if let Some(at) = expires_at {
            self.arm_expiry(at, w, id.0);
        }
        ReplyValue::Grant {
            grant: id,
            debt_paid,
        }
    }

    /// The alert levels of wallet `w`'s first [`ALERT_ASSETS`] balances: (asset, available, debt).
    fn levels(&self, w: u32) -> Levels {
        let mut levels = [None; ALERT_ASSETS];
        if let Some(wallet) = self.state.wallets.get(w as usize) {
            for (slot, b) in levels.iter_mut().zip(&wallet.balances) {
                *slot = Some((b.asset, b.available(), b.debt));
            }
        }
        levels
    }

    /// Emits a [`Effect::BalanceAlert`] for each level one input took a balance across,
    /// downwards, comparing with `before` (from [`Engine::levels`]).
    fn balance_alerts(&mut self, w: u32, before: &Levels) {
        let Some(wallet) = self.state.wallets.get(w as usize) else {
            return;
        };
        let low_usd = self.state.config.low_balance_usd;
        for &(asset, was, debt_was) in before.iter().flatten() {
            let Some(b) = wallet.balance(&asset) else {
                continue;
            };
            let (now, debt) = (b.available(), b.debt);
            let mut alert = |alert| {
                self.effects.push_back(Effect::BalanceAlert {
                    wallet: wallet.id,
                    asset,
                    alert,
                    available: now,
                })
            };
            if low_usd > Decimal::ZERO && now < was {
                let usd = self
                    .index
                    .assets
                    .get(&asset)
                    .map_or(Decimal::ZERO, |&i| self.state.assets[i as usize].usd_value);
                // Compared in the asset's units: threshold / value per unit.
                if let Some(line) = low_usd.checked_div(usd) {
                    if was >= line && now < line {
                        alert(Alert::Low);
                    }
                }
            }
            if was > Decimal::ZERO && now <= Decimal::ZERO {
                alert(Alert::Depleted);
            }
            if debt_was.is_zero() && debt > Decimal::ZERO {
                alert(Alert::InDebt);
            }
        }
    }

    /// When the expiring notice of a grant that expires at `at` is due, if notices are on.
    fn expiring_at(&self, at: Timestamp) -> Option<Timestamp> {
        let lead = self.state.config.grant_expiring_lead_us;
        (lead > 0).then(|| Timestamp(at.0.saturating_sub(lead)))
    }

    /// Arms a grant's expiry, and its expiring notice (at once if it is already inside the
    /// lead time).
    fn arm_expiry(&mut self, at: Timestamp, w: u32, id: u64) {
        self.timer(at, TimerKind::GrantExpiry, w, id);
        if let Some(notice) = self.expiring_at(at) {
            if notice > self.state.now {
                self.timer(notice, TimerKind::GrantExpiring, w, id);
            } else if self.state.now < at {
                // Already inside the lead time: the notice goes now, not at the next input (a
                // restore in between would lose it).
                self.fire(Timer {
                    at: self.state.now,
                    kind: TimerKind::GrantExpiring,
                    wallet: w,
                    id,
                });
            }
        }
    }

    fn timer(&mut self, at: Timestamp, kind: TimerKind, wallet: u32, id: u64) {
        self.index.timers.insert(Timer {
            at,
            kind,
            wallet,
            id,
        });
    }

    // ----- usage ---------------------------------------------------------------------------

    /// Validates an event's product, quantities and attributes; returns the product index.
    pub(crate) fn check_shape(
        &self,
        product: &Name,
        quantities: &[Quantity],
        attributes: &[(Name, Name)],
    ) -> Result<u32, ResultCode> {
        let &p = self
            .index
            .products
            .get(product)
            .ok_or(ResultCode::UnknownProduct)?;
        if quantities.len() > QUANTITIES_MAX || attributes.len() > ATTRIBUTES_MAX {
            return Err(ResultCode::LimitExceeded);
        }
        let dimensions = &self.state.products[p as usize].dimensions;
        for (i, q) in quantities.iter().enumerate() {
            money::check_quantity(q.value)?;
            if !dimensions.contains(&q.dimension) {
                return Err(ResultCode::UnknownDimension);
            }
            if quantities[..i].iter().any(|o| o.dimension == q.dimension) {
                return Err(ResultCode::InvalidArgument);
            }
        }
        for (i, (key, _)) in attributes.iter().enumerate() {
            if attributes[..i].iter().any(|(k, _)| k == key) {
                return Err(ResultCode::InvalidArgument);
            }
        }
        Ok(p)
    }

    /// Validates an event's cost and time. No event may lie more than `future_skew_us` ahead.
    ///
    /// A usage event (strict or recorded) must also be recent enough that, had it been applied
    /// before under the same id, that id is still remembered: an application happened no
    /// earlier than `occurred_at` minus the largest lead any applied event has had (how far its
    /// `occurred_at` was ahead of the shard's clock; zero unless clients send future times), so
    /// that time must not be before the oldest time the table still answers for (the window, or
    /// later if ids were forgotten early because the table was full). Otherwise a retry could
    /// be charged twice, and it is refused with `TimestampOutOfRange`; backfills older than the
    /// window need a longer window.
    /// Settlements name their hold, which can be settled once, so they are never too late.
    fn check_event(&self, event: &UsageEvent, settles_a_hold: bool) -> Result<(), ResultCode> {
        money::check_amount_or_zero(event.cost_usd, COST_SCALE_MAX)?;
        let now = self.state.now;
        let config = &self.state.config;
        if event.occurred_at > now.add_us(config.future_skew_us) {
            return Err(ResultCode::TimestampOutOfRange);
        }
        let horizon = now
            .add_us(-config.idempotency_retention_us)
            .max(self.state.remembered_from);
        if !settles_a_hold && event.occurred_at.add_us(-self.state.max_lead_us) < horizon {
            return Err(ResultCode::TimestampOutOfRange);
        }
        Ok(())
    }

    /// Prices a usage shape for wallet `w` under the plan version it is on at `at`.
    pub(crate) fn price(
        &self,
        w: u32,
        product: &Name,
        quantities: &[Quantity],
        attributes: &[(Name, Name)],
        at: Timestamp,
    ) -> Result<Priced, ResultCode> {
        let p = self.check_shape(product, quantities, attributes)?;
        let wallet = &self.state.wallets[w as usize];
        let assignment = wallet
            .plans
            .iter()
            .rev()
            .find(|a| a.from <= at)
            .ok_or(ResultCode::NoPlanAssigned)?;
        let version =
            &self.state.plans[assignment.plan as usize].versions[assignment.version as usize - 1];
        let (rule, amount) = self.price_in(version, product, quantities, attributes)?;
        Ok(Priced {
            asset: version.asset,
            amount,
            product: p,
            plan: assignment.plan,
            version: assignment.version,
            rule,
        })
    }

    /// Prices an already validated shape in one plan version: the matching rule and the charge.
    pub(crate) fn price_in(
        &self,
        version: &PlanVersion,
        product: &Name,
        quantities: &[Quantity],
        attributes: &[(Name, Name)],
    ) -> Result<(u32, Decimal), ResultCode> {
        let rule = pricing::find_rule(&version.rules, &version.order, product, attributes)
            .ok_or(ResultCode::NoMatchingRule)?;
        let scale = self.state.assets[version.asset as usize].scale;
        Ok((
            rule as u32,
            pricing::charge(&version.rules[rule], quantities, scale)?,
        ))
    }

    fn usage(&mut self, event: &UsageEvent) -> Handled {
        let w = self.wallet_index(&event.wallet)?;
        self.check_event(event, false)?;
        let priced = self.price(
            w,
            &event.product,
            &event.quantities,
            &event.attributes,
            event.occurred_at,
        )?;
        let asset = self.state.assets[priced.asset as usize];
        let revenue_usd = money::usd_valuation(priced.amount, asset.usd_value)?;
        let wallet = &self.state.wallets[w as usize];
        match event.mode {
            DebitMode::Strict => check_spend(wallet, asset.code, priced.amount)?,
            DebitMode::Record => {
                check_debt_room(wallet.balance(&asset.code), priced.amount, asset.scale)?
            }
        }
        let value = self.charge(
            w,
            asset,
            priced,
            revenue_usd,
            event.cost_usd,
            event.occurred_at,
        );
        // How far ahead of the clock an applied event may be: what the horizon must allow for.
        let lead = event.occurred_at.0.saturating_sub(self.state.now.0);
        self.state.max_lead_us = self.state.max_lead_us.max(lead);
        self.check_topup(w, asset.code);
        Ok(value)
    }

    /// Debits a priced, validated charge and records its margin.
    fn charge(
        &mut self,
        w: u32,
        asset: Asset,
        priced: Priced,
        revenue_usd: Decimal,
        cost_usd: Decimal,
        occurred_at: Timestamp,
    ) -> ReplyValue {
        let mut out = out!(self);
        let wallet = wallet_mut(&mut self.state.wallets, w);
        let wallet_id = wallet.id;
        let balance = wallet.balance_mut(&asset.code);
        let debited = debit(
            balance,
            priced.amount,
            wallet_id,
            Account::Revenue,
            &mut out,
        );
        let debt_added = debited.debt;
        let available = balance.available();
        wallet.margin.add_event(revenue_usd, cost_usd);
        let margins = &mut self.state.margins;
        margins.total.add_event(revenue_usd, cost_usd);
        margins
            .by_product
            .entry(priced.product)
            .or_default()
            .add_event(revenue_usd, cost_usd);
        margins
            .by_plan
            .entry((priced.plan, priced.version))
            .or_default()
            .add_event(revenue_usd, cost_usd);
        margins
            .by_hour
            .entry(occurred_at.hour())
            .or_default()
            .add_event(revenue_usd, cost_usd);
        let request = self.request.expect("charges come from requests");
        self.effects.push_back(Effect::Margin(MarginRecord {
            request,
            wallet: wallet_id,
            product: self.state.products[priced.product as usize].code,
            plan: self.state.plans[priced.plan as usize].name,
            version: priced.version,
            asset: asset.code,
            charged: priced.amount,
            revenue_usd,
            cost_usd,
            occurred_at,
            credit_priority: debited.priority,
            credit_expires_at: debited.expires_at,
        }));
        self.charge = Some(ChargeRef {
            seq: 0,
            wallet: w,
            asset: priced.asset,
            charged: priced.amount,
            refunded: Decimal::ZERO,
            product: priced.product,
            plan: priced.plan,
            version: priced.version,
            hour: occurred_at.hour(),
            priority: debited.priority,
            expires_at: debited.expires_at,
        });
        // The caller checks the top-up rule once the whole command is done.
        ReplyValue::Charge {
            asset: asset.code,
            charged: priced.amount,
            debt_added,
            available,
        }
    }

    // ----- holds ---------------------------------------------------------------------------

    fn reserve(
        &mut self,
        wallet: &WalletId,
        amount: &ReserveAmount,
        deadline: Timestamp,
    ) -> Handled {
        let w = self.wallet_index(wallet)?;
        let now = self.state.now;
        let (asset, amount) = match amount {
            ReserveAmount::Fixed { asset, amount } => {
                let a = self.asset(asset)?;
                (a.code, money::check_amount(*amount, a.scale)?)
            }
            ReserveAmount::Estimate {
                product,
                quantities,
                attributes,
            } => {
                let priced = self.price(w, product, quantities, attributes, now)?;
                if priced.amount.is_zero() {
                    return Err(ResultCode::InvalidAmount.into());
                }
                (self.state.assets[priced.asset as usize].code, priced.amount)
            }
        };
        if deadline <= now || deadline > now.add_us(HOLD_DURATION_MAX_US) {
            return Err(ResultCode::InvalidDeadline.into());
        }
        let wallet = &self.state.wallets[w as usize];
        if wallet.holds.len() >= HOLDS_MAX {
            return Err(ResultCode::LimitExceeded.into());
        }
        check_spend(wallet, asset, amount)?;
        let id = HoldId(self.state.next_hold);
        self.state.next_hold += 1;
        let wallet = wallet_mut(&mut self.state.wallets, w);
        wallet.holds.push(Hold {
            id,
            asset,
            amount,
            deadline,
            created_at: now,
        });
        self.index.holds_open += 1;
        let balance = wallet.balance_mut(&asset);
        balance.held += amount;
        let available = balance.available();
        self.timer(deadline, TimerKind::HoldDeadline, w, id.0);
        self.check_topup(w, asset);
        Ok(ReplyValue::Hold {
            hold: id,
            asset,
            amount,
            available,
        })
    }

    /// The open hold `hold` of wallet `w`, or why there is none.
    fn open_hold(&self, w: u32, hold: HoldId) -> Result<usize, ResultCode> {
        let wallet = &self.state.wallets[w as usize];
        if let Some(i) = wallet.holds.iter().position(|h| h.id == hold) {
            return Ok(i);
        }
        Err(
            match wallet
                .closed_holds
                .iter()
                .find(|c| c.id == hold)
                .map(|c| c.end)
            {
                Some(HoldEnd::Settled) => ResultCode::HoldAlreadySettled,
                Some(HoldEnd::Released) => ResultCode::HoldAlreadyReleased,
                Some(HoldEnd::Expired) => ResultCode::HoldExpired,
                None => ResultCode::UnknownHold,
            },
        )
    }

    /// Removes open hold `i` of wallet `w`, returning its amount to available.
    fn close_hold(&mut self, w: u32, i: usize, end: HoldEnd) -> Hold {
        let now = self.state.now;
        let wallet = wallet_mut(&mut self.state.wallets, w);
        let hold = wallet.holds.swap_remove(i);
        self.index.holds_open -= 1;
        wallet.balance_mut(&hold.asset).held -= hold.amount;
        if wallet.closed_holds.len() == CLOSED_HOLDS_KEPT {
            wallet.closed_holds.pop_front();
        }
        wallet.closed_holds.push_back(ClosedHold {
            id: hold.id,
            end,
            at: now,
        });
        hold
    }

    fn settle(&mut self, wallet: &WalletId, hold: HoldId, usage: &UsageEvent) -> Handled {
        let w = self.wallet_index(wallet)?;
        if usage.wallet != *wallet {
            return Err(ResultCode::InvalidArgument.into());
        }
        let i = self.open_hold(w, hold)?;
        self.check_event(usage, true)?;
        let priced = self.price(
            w,
            &usage.product,
            &usage.quantities,
            &usage.attributes,
            usage.occurred_at,
        )?;
        let asset = self.state.assets[priced.asset as usize];
        let hold_asset = self.state.wallets[w as usize].holds[i].asset;
        if asset.code != hold_asset {
            return Err(ResultCode::AssetMismatch.into());
        }
        let revenue_usd = money::usd_valuation(priced.amount, asset.usd_value)?;
        check_debt_room(
            self.state.wallets[w as usize].balance(&asset.code),
            priced.amount,
            asset.scale,
        )?;
        self.close_hold(w, i, HoldEnd::Settled);
        let mut value = self.charge(
            w,
            asset,
            priced,
            revenue_usd,
            usage.cost_usd,
            usage.occurred_at,
        );
        // The charge had first call on what the hold kept from expiring; the rest goes now, and
        // the reply and the top-up rule see the balance after it.
        self.expire_overdue(w, asset.code);
        self.pay_debt(w, asset.code);
        if let ReplyValue::Charge { available, .. } = &mut value {
            *available = self.state.wallets[w as usize]
                .balance(&asset.code)
                .map_or(Decimal::ZERO, Balance::available);
        }
        self.check_topup(w, asset.code);
        Ok(value)
    }

    fn release(&mut self, wallet: &WalletId, hold: HoldId) -> Handled {
        let w = self.wallet_index(wallet)?;
        let i = self.open_hold(w, hold)?;
        let hold = self.close_hold(w, i, HoldEnd::Released);
        self.expire_overdue(w, hold.asset);
        self.pay_debt(w, hold.asset);
        Ok(ReplyValue::None)
    }

    // ----- refunds, disputes, adjustments --------------------------------------------------

    fn refund(&mut self, wallet: &WalletId, event: RequestId, amount: Option<Decimal>) -> Handled {
        let w = self.wallet_index(wallet)?;
        let Some(at) = self.find_charge(wallet, event) else {
            return match self.recorded.take() {
                Some(charge) => self.refund_recorded(w, wallet, event, amount, &charge),
                None => Err(ResultCode::UnknownEvent.into()),
            };
        };
        let charge = self.charge_at(at);
        if charge.wallet != w {
            return Err(ResultCode::UnknownEvent.into());
        }
        let asset = self.state.assets[charge.asset as usize];
        let left = charge.charged - charge.refunded;
        let (amount, refund_usd) = self.refund_amount(w, asset, left, amount)?;
        self.charge_at_mut(at).refunded += amount;
        let grant = self.book_refund(w, asset, amount, refund_usd, &charge);
        Ok(ReplyValue::Refund {
            grant,
            refunded: amount,
            refundable: left - amount,
        })
    }

    /// A refund of a charge the engine no longer remembers, as the history store recorded it
    /// (see [`Engine::handle_recorded_refund`]).
    fn refund_recorded(
        &mut self,
        w: u32,
        wallet: &WalletId,
        event: RequestId,
        amount: Option<Decimal>,
        recorded: &RecordedCharge,
    ) -> Handled {
        let now = self.state.now;
        // Applied since the table answers for: it would hold the charge, so there is none.
        // Past its refund window: refused.
        let horizon = now
            .add_us(-self.state.config.idempotency_retention_us)
            .max(self.state.remembered_from);
        if recorded.applied_at >= horizon
            || recorded.applied_at <= self.state.recorded_refunds_from
            || now > recorded.refundable_until
        {
            return Err(ResultCode::UnknownEvent.into());
        }
        let unknown = || ResultCode::UnknownEvent;
        let asset_index = *self.index.assets.get(&recorded.asset).ok_or_else(unknown)?;
        let product = *self
            .index
            .products
            .get(&recorded.product)
            .ok_or_else(unknown)?;
        let plan = *self.index.plans.get(&recorded.plan).ok_or_else(unknown)?;
        let asset = self.state.assets[asset_index as usize];
        let charged = money::check_amount(recorded.charged, asset.scale)?;
        let key = Key::of(scope_of(Some(wallet)), event);
        let before = self.state.late_refunds.get(&key).copied();
        let refunded = before.map_or(Decimal::ZERO, |l| l.refunded);
        let left = money::sub(charged, refunded).map_err(|_| ResultCode::RefundExceedsCharge)?;
        let (amount, refund_usd) = self.refund_amount(w, asset, left, amount)?;
        let charge = ChargeRef {
            seq: 0,
            wallet: w,
            asset: asset_index,
            charged,
            refunded,
            product,
            plan,
            version: recorded.version,
            hour: recorded.occurred_at.hour(),
            priority: recorded.credit_priority,
            expires_at: recorded.credit_expires_at,
        };
        let late = LateRefund {
            refunded: money::add(refunded, amount)?,
            until: before.map_or(late_refund_until(charge.hour), |l| {
                l.until.max(late_refund_until(charge.hour))
            }),
        };
        let grant = self.book_refund(w, asset, amount, refund_usd, &charge);
        set_late_refund(&mut self.state, &mut self.index, key, late);
        Ok(ReplyValue::Refund {
            grant,
            refunded: amount,
            refundable: left - amount,
        })
    }

    /// The amount a refund asks for (`None`: all that is `left` of the charge) and its USD
    /// value, checked against what is left and against what wallet `w`'s balance can take.
    fn refund_amount(
        &self,
        w: u32,
        asset: Asset,
        left: Decimal,
        amount: Option<Decimal>,
    ) -> Result<(Decimal, Decimal), ResultCode> {
        let amount = match amount {
            Some(amount) => money::check_amount(amount, asset.scale)?,
            None if left <= Decimal::ZERO => return Err(ResultCode::RefundExceedsCharge),
            None => left,
        };
        if amount > left {
            return Err(ResultCode::RefundExceedsCharge);
        }
        let refund_usd = money::usd_valuation(amount, asset.usd_value)?;
        if let Some(balance) = self.state.wallets[w as usize].balance(&asset.code) {
            money::within(money::add(balance.ledger(), amount)?, asset.scale)?;
        }
        Ok((amount, refund_usd))
    }

    /// Books a refund of `amount` (worth `refund_usd`) of `charge` to wallet `w`: the margins,
    /// and the credit. Returns the credit's grant.
    fn book_refund(
        &mut self,
        w: u32,
        asset: Asset,
        amount: Decimal,
        refund_usd: Decimal,
        charge: &ChargeRef,
    ) -> GrantId {
        let margins = &mut self.state.margins;
        margins.total.add_refund(refund_usd);
        margins
            .by_product
            .entry(charge.product)
            .or_default()
            .add_refund(refund_usd);
        margins
            .by_plan
            .entry((charge.plan, charge.version))
            .or_default()
            .add_refund(refund_usd);
        margins
            .by_hour
            .entry(charge.hour)
            .or_default()
            .add_refund(refund_usd);
        wallet_mut(&mut self.state.wallets, w)
            .margin
            .add_refund(refund_usd);
        // The credit takes the place of what paid for the event: the first paying grant's
        // priority and the latest expiry among the paying grants. Credit whose time has passed
        // expires at once (it would have expired unspent had the event not happened).
        let granted = self.add_grant(
            w,
            asset.code,
            amount,
            charge.priority,
            None,
            charge.expires_at,
            GrantSource::Refund,
        );
        let ReplyValue::Grant { grant, .. } = granted else {
            unreachable!("add_grant grants")
        };
        if charge.expires_at.is_some_and(|t| t <= self.state.now) {
            self.expire_overdue(w, asset.code);
        }
        grant
    }

    fn dispute(&mut self, wallet: &WalletId, grant: GrantId, freeze: bool) -> Handled {
        let w = self.wallet_index(wallet)?;
        let wallet = &self.state.wallets[w as usize];
        let payment = wallet
            .payments
            .iter()
            .position(|p| p.grant == grant)
            .ok_or(ResultCode::UnknownGrant)?;
        let p = wallet.payments[payment];
        if p.disputed {
            return Err(ResultCode::AlreadyDisputed.into());
        }
        let balance = wallet
            .balance(&p.asset)
            .expect("a paid grant made the balance");
        let remaining = balance
            .grants
            .iter()
            .chain(&balance.pending)
            .find(|g| g.id == grant)
            .map_or(Decimal::ZERO, |g| g.remaining);
        // What a refund already took out was returned, and what expired was never spent.
        let spent = p.amount - p.refund_removed - p.expired - remaining;
        money::within(
            money::add(balance.debt, spent)?,
            self.asset(&p.asset)?.scale,
        )?;
        let mut out = out!(self);
        let wallet = wallet_mut(&mut self.state.wallets, w);
        let wallet_id = wallet.id;
        wallet.payments[payment].disputed = true;
        if freeze && !wallet.frozen {
            wallet.frozen = true;
            out.effects
                .push_back(Effect::WalletFrozen { wallet: wallet_id });
        }
        let balance = wallet.balance_mut(&p.asset);
        if let Some(i) = balance.grants.iter().position(|g| g.id == grant) {
            balance.grants.remove(i);
            balance.active -= remaining;
        } else if let Some(i) = balance.pending.iter().position(|g| g.id == grant) {
            balance.pending.remove(i);
        }
        balance.debt += spent;
        let (from, to) = (Account::Wallet(wallet_id), Account::Dispute);
        let clawed = p.amount - p.refund_removed - p.expired;
        out.entry(EntryKind::Dispute, p.asset, clawed, from, to, Some(grant));
        // The breakage booked when part of this credit expired is reversed: the payment
        // behind it is disputed.
        // The payment's breakage, booked under one or more of its grants: named by none.
        let (from, to) = (Account::Breakage, Account::Dispute);
        out.entry(EntryKind::Dispute, p.asset, p.expired, from, to, None);
        // A disputed wallet never triggers a top-up here: charging the card that just charged
        // back would be the wrong reflex. The next debit checks the rule as usual.
        Ok(ReplyValue::Dispute {
            clawed_back: remaining,
            debt_added: spent,
        })
    }

    fn dispute_won(&mut self, wallet: &WalletId, grant: GrantId) -> Handled {
        let w = self.wallet_index(wallet)?;
        let wallet = &self.state.wallets[w as usize];
        let payment = wallet
            .payments
            .iter()
            .position(|p| p.grant == grant)
            .ok_or(ResultCode::UnknownGrant)?;
        let p = wallet.payments[payment];
        // A lost dispute is final: it cannot be won afterwards, by this command or by a
        // processor's event.
        if !p.disputed || p.dispute_lost {
            return Err(ResultCode::NotDisputed.into());
        }
        // What a refund removed before the dispute stays returned, and what expired stays
        // expired (its breakage is booked again).
        let amount = p.amount - p.refund_removed - p.expired;
        if let Some(balance) = wallet.balance(&p.asset) {
            money::within(
                money::add(balance.ledger(), amount)?,
                self.asset(&p.asset)?.scale,
            )?;
        }
        wallet_mut(&mut self.state.wallets, w).payments[payment].disputed = false;
        let now = self.state.now;
        if amount.is_zero() {
            // Nothing to restore (all of it was refunded or had expired): no new grant, the
            // expired part is breakage again.
            let mut out = out!(self);
            let (from, to) = (Account::Dispute, Account::Breakage);
            out.entry(EntryKind::DisputeWon, p.asset, p.expired, from, to, None);
            self.check_topup(w, p.asset);
            return Ok(ReplyValue::Grant {
                grant: p.grant,
                debt_paid: Decimal::ZERO,
            });
        }
        let id = GrantId(self.state.next_grant);
        self.state.next_grant += 1;
        // An expiry that passed during the dispute is kept: the restored credit expires at once
        // (its remainder becomes breakage), as it would have without the dispute.
        let expires_at = p.expires_at.map(|t| t.max(now));
        let restored = GrantState {
            id,
            amount,
            remaining: amount,
            priority: p.priority,
            effective_at: None,
            expires_at,
            source: GrantSource::TopUp {
                payment_id: p.payment_id,
            },
        };
        let mut out = out!(self);
        let wallet = wallet_mut(&mut self.state.wallets, w);
        let (from, to) = (Account::Dispute, Account::Wallet(wallet.id));
        out.entry(EntryKind::DisputeWon, p.asset, amount, from, to, Some(id));
        // The payment's breakage, booked under one or more of its grants: named by none.
        let (from, to) = (Account::Dispute, Account::Breakage);
        out.entry(EntryKind::DisputeWon, p.asset, p.expired, from, to, None);
        // The payment record now points at the restored grant, so a second dispute claws it.
        wallet.payments[payment].grant = id;
        wallet.payments[payment].expires_at = expires_at;
        let debt_paid = credit(wallet.balance_mut(&p.asset), restored);
        if let Some(at) = expires_at {
            self.arm_expiry(at, w, id.0);
        }
        // New credit (or credit whose expiry passed during the dispute): expired grants go as
        // far as open holds do not need them.
        self.expire_overdue(w, p.asset);
        // An open dispute held top-ups back; this may have been the last one.
        self.check_topup(w, p.asset);
        Ok(ReplyValue::Grant {
            grant: id,
            debt_paid,
        })
    }

    fn adjust(
        &mut self,
        wallet: &WalletId,
        asset: AssetCode,
        amount: Decimal,
        reason: &str,
    ) -> Handled {
        let w = self.wallet_index(wallet)?;
        if reason.trim().is_empty() {
            return Err(ResultCode::ReasonRequired.into());
        }
        if reason.len() > REASON_BYTES_MAX {
            return Err(ResultCode::LimitExceeded.into());
        }
        let asset = self.asset(&asset)?;
        money::check_amount(amount.abs(), asset.scale)?;
        let balance = self.state.wallets[w as usize].balance(&asset.code);
        if amount > Decimal::ZERO {
            if let Some(balance) = balance {
                money::within(money::add(balance.ledger(), amount)?, asset.scale)?;
            }
        } else {
            check_debt_room(balance, -amount, asset.scale)?;
        }
        let record = AdjustmentRecord {
            request: self.request.expect("adjustments come from requests"),
            at: self.state.now,
            asset: asset.code,
            amount,
            reason: reason.to_owned(),
        };
        let adjustments = &mut wallet_mut(&mut self.state.wallets, w).adjustments;
        if adjustments.len() >= ADJUSTMENTS_KEPT {
            adjustments.drain(..=adjustments.len() - ADJUSTMENTS_KEPT);
        }
        adjustments.push(record);
        if amount > Decimal::ZERO {
            return Ok(self.add_grant(
                w,
                asset.code,
                amount,
                0,
                None,
                None,
                GrantSource::Adjustment,
            ));
        }
        let mut out = out!(self);
        let wallet = wallet_mut(&mut self.state.wallets, w);
        let wallet_id = wallet.id;
        let balance = wallet.balance_mut(&asset.code);
        let debt_added = debit(balance, -amount, wallet_id, Account::Adjustment, &mut out).debt;
        let available = balance.available();
        self.check_topup(w, asset.code);
        Ok(ReplyValue::Charge {
            asset: asset.code,
            charged: -amount,
            debt_added,
            available,
        })
    }

    // ----- auto top-up ---------------------------------------------------------------------

    fn set_topup_rule(&mut self, wallet: &WalletId, rule: &TopUpRule) -> Handled {
        let w = self.wallet_index(wallet)?;
        let asset = self.asset(&rule.asset)?;
        money::check_amount_or_zero(rule.threshold, asset.scale)?;
        match rule.amount {
            TopUpAmount::Fixed(amount) => {
                money::check_amount(amount, asset.scale)?;
            }
            TopUpAmount::Target(target) => {
                money::check_amount(target, asset.scale)?;
                if target <= rule.threshold {
                    return Err(ResultCode::InvalidArgument.into());
                }
            }
        }
        for cap in [rule.daily_cap, rule.monthly_cap].into_iter().flatten() {
            money::check_amount(cap, asset.scale)?;
        }
        if rule.attempts_max == 0 || rule.attempts_max > TOPUP_ATTEMPTS_MAX {
            return Err(ResultCode::InvalidArgument.into());
        }
        if !(0..=TOPUP_COOLDOWN_MAX_US).contains(&rule.cooldown_us) {
            return Err(ResultCode::InvalidArgument.into());
        }
        // Refuse now what could not be charged exactly later: a fixed amount must come to
        // whole minor units. Targets and caps are rounded to the price's step when a request
        // is made (up for a target, down for a cap), so they are always chargeable.
        let price = asset.topup_price.ok_or(ResultCode::NoTopUpPrice)?;
        let chargeable = price.step(asset.scale).is_some()
            && match rule.amount {
                TopUpAmount::Fixed(amount) => price.minor_amount(amount).is_some(),
                TopUpAmount::Target(_) => true,
            };
        if !chargeable {
            return Err(ResultCode::InexactCharge.into());
        }
        let wallet = wallet_mut(&mut self.state.wallets, w);
        match wallet.topups.iter_mut().find(|t| t.asset == rule.asset) {
            Some(t) => {
                t.rule = Some(*rule);
                t.failures = 0;
                t.flagged = false;
            }
            None => wallet.topups.push(TopUpState {
                asset: rule.asset,
                rule: Some(*rule),
                trigger: 0,
                in_flight: None,
                failures: 0,
                flagged: false,
                next_allowed: Timestamp(i64::MIN),
                retry_armed: false,
                day: 0,
                day_total: Decimal::ZERO,
                month: 0,
                month_total: Decimal::ZERO,
                last_failure: None,
            }),
        }
        self.check_topup(w, rule.asset);
        Ok(ReplyValue::None)
    }

    fn price_asset(&mut self, asset: AssetCode, price: Option<TopUpPrice>) -> Handled {
        let &i = self
            .index
            .assets
            .get(&asset)
            .ok_or(ResultCode::UnknownAsset)?;
        if price.is_some_and(|p| !p.is_valid()) {
            return Err(ResultCode::InvalidPrice.into());
        }
        self.state.assets[i as usize].topup_price = price;
        Ok(ReplyValue::None)
    }

    /// A processor's report about a credited payment: resolves the grant it funded now (a won
    /// dispute re-credits under a new grant id) and applies the matching rule.
    fn payment_event(
        &mut self,
        wallet: &WalletId,
        payment_id: Name,
        event: PaymentEvent,
    ) -> Handled {
        let w = self.wallet_index(wallet)?;
        let wallet_ref = &self.state.wallets[w as usize];
        let payment = wallet_ref
            .payments
            .iter()
            .position(|p| p.payment_id == payment_id)
            .ok_or(ResultCode::UnknownPayment)?;
        let p = wallet_ref.payments[payment];
        match event {
            PaymentEvent::Disputed { freeze } => self.dispute(wallet, p.grant, freeze),
            PaymentEvent::DisputeWon => self.dispute_won(wallet, p.grant),
            PaymentEvent::DisputeLost { .. } if p.dispute_lost => Ok(ReplyValue::None),
            PaymentEvent::DisputeLost { freeze } => {
                let value = if p.disputed {
                    ReplyValue::None
                } else {
                    self.dispute(wallet, p.grant, freeze)?
                };
                let wallet = wallet_mut(&mut self.state.wallets, w);
                wallet.payments[payment].dispute_lost = true;
                // That was the open dispute holding top-ups back; this may have been the last.
                self.check_topup(w, p.asset);
                Ok(value)
            }
            PaymentEvent::Refunded { refunded } => {
                let scale = self.asset(&p.asset)?.scale;
                money::check_amount(refunded, scale)?;
                if refunded > p.amount {
                    return Err(ResultCode::RefundExceedsCharge.into());
                }
                // Totals only grow; an older or repeated report changes nothing.
                let new = refunded - p.refunded;
                if new <= Decimal::ZERO {
                    return Ok(ReplyValue::None);
                }
                let mut out = out!(self);
                let wallet = wallet_mut(&mut self.state.wallets, w);
                let wallet_id = wallet.id;
                wallet.payments[payment].refunded = refunded;
                let removed_before = wallet.payments[payment].refund_removed;
                // Only the unspent part of the grant can be taken back; what was already
                // spent stays spent (the seller returned money for delivered usage).
                let balance = wallet.balance_mut(&p.asset);
                let mut removed = Decimal::ZERO;
                if !p.disputed {
                    if let Some(i) = balance.grants.iter().position(|g| g.id == p.grant) {
                        removed = new.min(balance.grants[i].remaining);
                        balance.grants[i].remaining -= removed;
                        balance.active -= removed;
                        if balance.grants[i].remaining.is_zero() {
                            balance.grants.remove(i);
                        }
                    } else if let Some(i) = balance.pending.iter().position(|g| g.id == p.grant) {
                        removed = new.min(balance.pending[i].remaining);
                        balance.pending[i].remaining -= removed;
                        if balance.pending[i].remaining.is_zero() {
                            balance.pending.remove(i);
                        }
                    }
                }
                wallet.payments[payment].refund_removed = removed_before + removed;
                if removed > Decimal::ZERO {
                    let (from, to) = (Account::Wallet(wallet_id), Account::TopUpClearing);
                    out.entry(EntryKind::Refund, p.asset, removed, from, to, Some(p.grant));
                    self.check_topup(w, p.asset);
                }
                Ok(ReplyValue::Dispute {
                    clawed_back: removed,
                    debt_added: Decimal::ZERO,
                })
            }
        }
    }

    fn remove_topup_rule(&mut self, wallet: &WalletId, asset: AssetCode) -> Handled {
        let w = self.wallet_index(wallet)?;
        let wallet = wallet_mut(&mut self.state.wallets, w);
        let t = wallet
            .topups
            .iter_mut()
            .find(|t| t.asset == asset && t.rule.is_some())
            .ok_or(ResultCode::NoTopUpRule)?;
        t.rule = None;
        Ok(ReplyValue::None)
    }

    fn topup_succeeded(
        &mut self,
        wallet: &WalletId,
        asset: AssetCode,
        trigger: u64,
        payment_id: Name,
        amount: Decimal,
    ) -> Handled {
        let w = self.wallet_index(wallet)?;
        let a = self.asset(&asset)?;
        money::check_amount(amount, a.scale)?;
        if let Some(value) = self.known_payment(w, payment_id, asset, amount)? {
            return Ok(value);
        }
        if let Some(balance) = self.state.wallets[w as usize].balance(&asset) {
            money::within(money::add(balance.ledger(), amount)?, a.scale)?;
        }
        // Money was taken: the grant is added whatever the trigger, so no payment is ever lost.
        let now = self.state.now;
        let wallet = wallet_mut(&mut self.state.wallets, w);
        let mut arm = None;
        let mut mismatch = false;
        if let Some(t) = wallet.topups.iter_mut().find(|t| t.asset == asset) {
            if let Some(flight) = t.in_flight.filter(|f| f.trigger == trigger) {
                t.in_flight = None;
                t.failures = 0;
                t.last_failure = None;
                // The processor took another amount than was asked: it is credited (it was
                // paid), counted against the caps as taken, and the rule stops until someone
                // sets it again, because whatever charges the card is not doing what it says.
                if amount != flight.amount {
                    mismatch = true;
                    t.flagged = true;
                    if t.day == flight.at.day() {
                        t.day_total = (t.day_total - flight.amount + amount).max(Decimal::ZERO);
                    }
                    if t.month == flight.at.month() {
                        t.month_total = (t.month_total - flight.amount + amount).max(Decimal::ZERO);
                    }
                }
                let cooldown = t.rule.map_or(0, |r| r.cooldown_us);
                t.next_allowed = now.add_us(cooldown);
                if t.rule.is_some() && cooldown > 0 {
                    t.retry_armed = true;
                    arm = Some(t.next_allowed);
                }
            }
        }
        let wallet_id = wallet.id;
        if mismatch {
            self.effects.push_back(Effect::TopUpExhausted {
                wallet: wallet_id,
                asset,
            });
        }
        let source = GrantSource::TopUp { payment_id };
        let value = self.add_grant(w, asset, amount, TOPUP_PRIORITY, None, None, source);
        if let Some(at) = arm {
            let asset_index = self.asset_index(&asset)?;
            self.timer(at, TimerKind::TopUpRetry, w, u64::from(asset_index));
        }
        // The wallet's one top-up in flight has ended: any asset may need one now.
        self.check_all_topups(w);
        Ok(value)
    }

    fn topup_failed(
        &mut self,
        wallet: &WalletId,
        asset: AssetCode,
        trigger: u64,
        reason: Name,
    ) -> Handled {
        let w = self.wallet_index(wallet)?;
        let asset_index = self.asset_index(&asset)?;
        let t = self.state.wallets[w as usize]
            .topups
            .iter()
            .find(|t| t.asset == asset)
            .ok_or(ResultCode::NoTopUpRule)?;
        if t.in_flight.is_none_or(|f| f.trigger != trigger) {
            return Err(ResultCode::StaleTopUp.into());
        }
        // Money that was not taken does not count against the caps.
        self.fail_topup(w, asset_index, reason, true);
        Ok(ReplyValue::None)
    }

    /// Ends wallet `w`'s top-up in flight for asset `asset_index` as failed: counts the failure,
    /// backs off, and flags the rule after `attempts_max` failures in a row. `not_taken` says
    /// the processor declined it, so its amount stops counting against the caps; a top-up that
    /// timed out may still have been charged and keeps counting.
    fn fail_topup(&mut self, w: u32, asset_index: u32, reason: Name, not_taken: bool) {
        let asset = self.state.assets[asset_index as usize].code;
        let now = self.state.now;
        let wallet = wallet_mut(&mut self.state.wallets, w);
        let wallet_id = wallet.id;
        let Some(t) = wallet.topups.iter_mut().find(|t| t.asset == asset) else {
            return;
        };
        let Some(flight) = t.in_flight.take() else {
            return;
        };
        t.failures += 1;
        t.last_failure = Some(reason);
        if not_taken {
            if t.day == flight.at.day() {
                t.day_total -= flight.amount.min(t.day_total);
            }
            if t.month == flight.at.month() {
                t.month_total -= flight.amount.min(t.month_total);
            }
        }
        let attempts_max = t.rule.map_or(1, |r| r.attempts_max);
        if t.failures >= attempts_max {
            t.flagged = true;
            self.effects.push_back(Effect::TopUpExhausted {
                wallet: wallet_id,
                asset,
            });
            self.check_all_topups(w);
            return;
        }
        // Back off: the cooldown doubles with each failure in a row (at least one second).
        let base = t
            .rule
            .map_or(0, |r| r.cooldown_us)
            .max(Timestamp::SECOND_US);
        let backoff = base.saturating_mul(1 << (t.failures - 1).min(20));
        t.next_allowed = now.add_us(backoff.min(TOPUP_COOLDOWN_MAX_US));
        t.retry_armed = true;
        let at = t.next_allowed;
        self.timer(at, TimerKind::TopUpRetry, w, u64::from(asset_index));
        // The wallet's one top-up in flight has ended: another asset may need one now.
        self.check_all_topups(w);
    }

    /// Requests a top-up if wallet `w`'s rule for `asset` says so now.
    fn check_topup(&mut self, w: u32, asset: AssetCode) {
        let now = self.state.now;
        // This runs after every debit of a wallet with a rule: the cheap "is one due?" checks
        // come first, on the wallet read-only, and the rest only when a top-up is due.
        let wallet = &self.state.wallets[w as usize];
        let Some(t) = wallet.topups.iter().find(|t| t.asset == asset) else {
            return;
        };
        let Some(rule) = t.rule else { return };
        let available = wallet
            .balance(&asset)
            .map_or(Decimal::ZERO, Balance::available);
        if t.flagged || t.in_flight.is_some() || now < t.next_allowed || available >= rule.threshold
        {
            return;
        }
        // At most one top-up in flight per wallet, whatever the asset: one card, one charge at
        // a time. The others are checked again when its outcome comes.
        if wallet.topups.iter().any(|o| o.in_flight.is_some()) {
            return;
        }
        // Never charge a frozen wallet, or the card behind an open chargeback; and only a
        // wallet with somewhere to charge and an asset with a price can be charged at all.
        if wallet.frozen
            || wallet
                .payments
                .iter()
                .any(|p| p.disputed && !p.dispute_lost)
        {
            return;
        }
        let Some(customer) = wallet.customer else {
            return;
        };
        let Some((price, step, scale)) = self.asset(&asset).ok().and_then(|a| {
            let price = a.topup_price?;
            Some((price, price.step(a.scale)?, a.scale))
        }) else {
            return;
        };
        // Never ask for more than the balance can take: a success must always be creditable.
        let limit = money::limit(scale);
        let room = limit
            - wallet
                .balance(&asset)
                .map_or(Decimal::ZERO, Balance::ledger);
        let wallet = wallet_mut(&mut self.state.wallets, w);
        let default_method = wallet.payment_method;
        let wallet_id = wallet.id;
        let Some(t) = wallet.topups.iter_mut().find(|t| t.asset == asset) else {
            return;
        };
        let mut amount = match rule.amount {
            TopUpAmount::Fixed(amount) => amount,
            // Checked: a wallet deep in debt must not overflow the target arithmetic.
            // Rounded up to a chargeable amount, so available reaches at least the target.
            TopUpAmount::Target(target) => match target
                .checked_sub(available)
                .and_then(|a| a.checked_div(step))
                .and_then(|steps| steps.ceil().checked_mul(step))
            {
                Some(amount) => amount,
                None => return,
            },
        };
        if t.day != now.day() {
            t.day = now.day();
            t.day_total = Decimal::ZERO;
        }
        if t.month != now.month() {
            t.month = now.month();
            t.month_total = Decimal::ZERO;
        }
        // What is left of each cap, rounded down to a chargeable amount.
        for (cap, total) in [
            (rule.daily_cap, t.day_total),
            (rule.monthly_cap, t.month_total),
        ] {
            if let Some(cap) = cap {
                let left = ((cap - total) / step).floor() * step;
                amount = amount.min(left);
            }
        }
        if amount > room {
            amount = (room / step).floor() * step;
        }
        if amount <= Decimal::ZERO || amount > limit {
            return;
        }
        let payment_method = if rule.payment_method.as_str() == DEFAULT_PAYMENT_METHOD {
            match default_method {
                Some(method) => method,
                None => return,
            }
        } else {
            rule.payment_method
        };
        // Checked when the rule was set; a price changed since may no longer divide it.
        let Some(minor_amount) = price.minor_amount(amount) else {
            return;
        };
        t.trigger += 1;
        t.in_flight = Some(InFlight {
            trigger: t.trigger,
            amount,
            at: now,
        });
        t.day_total += amount;
        t.month_total += amount;
        self.index.timers.insert(Timer {
            at: now.add_us(TOPUP_IN_FLIGHT_TIMEOUT_US),
            kind: TimerKind::TopUpTimeout,
            wallet: w,
            id: u64::from(self.index.assets[&asset]),
        });
        self.effects.push_back(Effect::TopUpRequested(TopUpRequest {
            wallet: wallet_id,
            asset,
            amount,
            trigger: t.trigger,
            payment_method,
            customer,
            currency: price.currency,
            minor_amount,
            at: now,
        }));
    }

    // ----- timers --------------------------------------------------------------------------

    /// Pays wallet `w`'s debt in `asset` from its grants in consumption order, as far as they
    /// are free (not behind open holds). Debt next to free credit exists only because a hold set
    /// the credit aside when a debit came; once the hold closes the credit pays it, as it would
    /// have without the hold. The ledger does not change (credit and debt shrink together), so
    /// there is no journal entry, as when a new grant pays debt.
    fn pay_debt(&mut self, w: u32, asset: AssetCode) {
        let Some(b) = self.state.wallets[w as usize]
            .balances
            .iter()
            .position(|b| b.asset == asset && b.debt > Decimal::ZERO && b.active > b.held)
        else {
            return;
        };
        let balance = &mut wallet_mut(&mut self.state.wallets, w).balances[b];
        let mut left = balance.debt.min(balance.active - balance.held);
        let paid = left;
        for grant in balance.grants.iter_mut() {
            if left.is_zero() {
                break;
            }
            let part = left.min(grant.remaining);
            grant.remaining -= part;
            left -= part;
        }
        balance.grants.retain(|g| !g.remaining.is_zero());
        balance.active -= paid;
        balance.debt -= paid;
    }

    /// Breaks what the expired grants of wallet `w` in `asset` hold beyond what its open holds
    /// need. Money behind a hold is set aside, expiry included: the expired grants together
    /// keep at most `held − (what the grants that have not expired hold)`, and give up the rest
    /// as breakage, soonest expiry first. Runs when a grant's expiry comes and whenever a hold
    /// closes, so what a hold kept alive expires as soon as the hold no longer needs it.
    fn expire_overdue(&mut self, w: u32, asset: AssetCode) {
        let now = self.state.now;
        let overdue = |g: &GrantState| g.expires_at.is_some_and(|t| t <= now);
        let Some(b) = self.state.wallets[w as usize]
            .balances
            .iter()
            .position(|b| b.asset == asset && b.grants.iter().any(overdue))
        else {
            return;
        };
        let mut out = out!(self);
        let wallet = wallet_mut(&mut self.state.wallets, w);
        let wallet_id = wallet.id;
        let balance = &mut wallet.balances[b];
        let mut order: Vec<(Timestamp, GrantId, usize)> = Vec::new();
        let mut overdue_total = Decimal::ZERO;
        for (i, g) in balance.grants.iter().enumerate() {
            if let Some(at) = g.expires_at.filter(|&t| t <= now) {
                order.push((at, g.id, i));
                overdue_total += g.remaining;
            }
        }
        order.sort_unstable();
        let fresh = balance.active - overdue_total;
        let keep = (balance.held - fresh).max(Decimal::ZERO).min(overdue_total);
        let mut to_break = overdue_total - keep;
        for &(_, id, i) in &order {
            if to_break.is_zero() {
                break;
            }
            let grant = &mut balance.grants[i];
            let part = to_break.min(grant.remaining);
            grant.remaining -= part;
            to_break -= part;
            balance.active -= part;
            let (from, to) = (Account::Wallet(wallet_id), Account::Breakage);
            out.entry(EntryKind::Breakage, asset, part, from, to, Some(id));
            if let GrantSource::TopUp { .. } = grant.source {
                if let Some(p) = wallet.payments.iter_mut().find(|p| p.grant == id) {
                    p.expired += part;
                }
            }
        }
        let before = balance.grants.len();
        balance.grants.retain(|g| !g.remaining.is_zero());
        if balance.grants.len() != before || overdue_total != keep {
            self.check_topup(w, asset);
        }
    }

    fn fire(&mut self, timer: Timer) {
        let w = timer.wallet;
        match timer.kind {
            TimerKind::GrantEffective => {
                let wallet = wallet_mut(&mut self.state.wallets, w);
                for balance in &mut wallet.balances {
                    if let Some(i) = balance.pending.iter().position(|g| g.id.0 == timer.id) {
                        let grant = balance.pending.remove(i);
                        let asset = balance.asset;
                        credit(balance, grant);
                        self.expire_overdue(w, asset);
                        return;
                    }
                }
            }
            TimerKind::GrantExpiry => {
                let asset = self.state.wallets[w as usize]
                    .balances
                    .iter()
                    .find(|b| b.grants.iter().any(|g| g.id.0 == timer.id))
                    .map(|b| b.asset);
                if let Some(asset) = asset {
                    self.expire_overdue(w, asset);
                }
            }
            TimerKind::GrantExpiring => {
                let wallet = &self.state.wallets[w as usize];
                for balance in &wallet.balances {
                    let grant = balance
                        .grants
                        .iter()
                        .chain(&balance.pending)
                        .find(|g| g.id.0 == timer.id);
                    if let Some(g) = grant.filter(|g| g.remaining > Decimal::ZERO) {
                        self.effects.push_back(Effect::GrantExpiring {
                            wallet: wallet.id,
                            asset: balance.asset,
                            grant: g.id,
                            remaining: g.remaining,
                            expires_at: g.expires_at.unwrap_or(timer.at),
                        });
                        return;
                    }
                }
            }
            TimerKind::HoldDeadline => {
                if let Ok(i) = self.open_hold(w, HoldId(timer.id)) {
                    let hold = self.close_hold(w, i, HoldEnd::Expired);
                    self.expire_overdue(w, hold.asset);
                    self.pay_debt(w, hold.asset);
                }
            }
            TimerKind::TopUpTimeout => {
                let asset = self.state.assets[timer.id as usize].code;
                let overdue = self.state.wallets[w as usize]
                    .topups
                    .iter()
                    .find(|t| t.asset == asset)
                    .and_then(|t| t.in_flight)
                    .is_some_and(|f| f.at.add_us(TOPUP_IN_FLIGHT_TIMEOUT_US) <= timer.at);
                if overdue {
                    let reason = Name::new(TOPUP_TIMED_OUT).expect("a valid name");
                    self.fail_topup(w, timer.id as u32, reason, false);
                }
            }
            TimerKind::TopUpRetry => {
                let asset = self.state.assets[timer.id as usize].code;
                let wallet = wallet_mut(&mut self.state.wallets, w);
                if let Some(t) = wallet.topups.iter_mut().find(|t| t.asset == asset) {
                    t.retry_armed = false;
                }
                self.check_topup(w, asset);
            }
        }
    }
}

/// The digest of a state: the same as `Engine::digest` of an engine holding it. Lets a
/// checkpoint writer hash a cloned state off the shard thread.
pub fn digest_state(state: &State) -> u64 {
    struct HashWriter(StableHasher);
    impl bincode::enc::write::Writer for HashWriter {
        fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
            std::hash::Hasher::write(&mut self.0, bytes);
            Ok(())
        }
    }
    let mut writer = HashWriter(StableHasher::new(0xd1_6e57));
    bincode::serde::encode_into_writer(state, &mut writer, bincode::config::standard())
        .expect("hashing never fails");
    std::hash::Hasher::finish(&writer.0)
}

// ----- restore ---------------------------------------------------------------------------

fn restore(state: State) -> Result<Engine, RestoreError> {
    let fail = |what: String| Err(RestoreError(what));
    if let Err(e) = state.config.validate() {
        return fail(e);
    }
    let mut engine = Engine::new(state.config);
    engine.state = state;
    let Engine { state, index, .. } = &mut engine;
    for (i, a) in state.assets.iter().enumerate() {
        if index.assets.insert(a.code, i as u32).is_some() {
            return fail(format!("asset {} appears twice", a.code));
        }
    }
    for (i, p) in state.products.iter().enumerate() {
        if index.products.insert(p.code, i as u32).is_some() {
            return fail(format!("product {} appears twice", p.code));
        }
    }
    for (i, plan) in state.plans.iter_mut().enumerate() {
        if index.plans.insert(plan.name, i as u32).is_some() {
            return fail(format!("plan {} appears twice", plan.name));
        }
        for version in plan.versions.iter_mut().chain(plan.draft.as_mut()) {
            if version.asset as usize >= state.assets.len() {
                return fail(format!("plan {} names asset #{}", plan.name, version.asset));
            }
            version.order = pricing::specificity_order(&version.rules);
        }
    }
    for (i, wallet) in state.wallets.iter().enumerate() {
        if index.wallets.get(&state.wallets, &wallet.id).is_some() {
            return fail(format!("wallet {} appears twice", wallet.id));
        }
        index.wallets.insert(&state.wallets, i as u32);
        for balance in &wallet.balances {
            if !index.assets.contains_key(&balance.asset) {
                return fail(format!(
                    "wallet {} holds unknown asset {}",
                    wallet.id, balance.asset
                ));
            }
            let active: Decimal = balance.grants.iter().map(|g| g.remaining).sum();
            let held: Decimal = wallet
                .holds
                .iter()
                .filter(|h| h.asset == balance.asset)
                .map(|h| h.amount)
                .sum();
            if active != balance.active || held != balance.held {
                return fail(format!(
                    "wallet {} {}: totals disagree",
                    wallet.id, balance.asset
                ));
            }
            if balance.pending.iter().any(|g| g.effective_at.is_none()) {
                return fail(format!(
                    "wallet {}: pending grant without a time",
                    wallet.id
                ));
            }
        }
        for a in &wallet.plans {
            let valid = state
                .plans
                .get(a.plan as usize)
                .is_some_and(|p| a.version >= 1 && a.version as usize <= p.versions.len());
            if !valid {
                return fail(format!("wallet {} is on a missing plan version", wallet.id));
            }
        }
        for t in &wallet.topups {
            if !index.assets.contains_key(&t.asset) {
                return fail(format!("wallet {}: top-up in unknown asset", wallet.id));
            }
        }
    }
    let first = state.requests_first_seq;
    for (i, r) in state.requests.iter().enumerate() {
        let seq = first + i as u64;
        if !r.is_valid(state.assets.len()) {
            return fail(format!("remembered request #{seq} cannot be read"));
        }
        if r.spilled() != state.spilled.contains_key(&seq) {
            return fail(format!(
                "remembered request #{seq} and its kept reply disagree"
            ));
        }
        let requests = (&state.requests, first);
        if find_in(&index.requests, requests, r.key).is_some() {
            return fail(format!("request key {:?} remembered twice", r.key));
        }
        file_in(&mut index.requests, requests, r.key, seq);
    }
    if state.requests.iter().filter(|r| r.spilled()).count() != state.spilled.len() {
        return fail("kept replies without a remembered request".into());
    }
    index.legacy_newest = state.legacy.values().map(|r| r.at).max().unwrap_or(0);
    let requests_end = state.requests_first_seq + state.requests.len() as u64;
    let legacy = state.legacy.values().filter_map(|r| r.charge);
    for c in state.charges.iter().copied().chain(legacy) {
        let valid = (c.wallet as usize) < state.wallets.len()
            && (c.asset as usize) < state.assets.len()
            && (c.product as usize) < state.products.len()
            && state
                .plans
                .get(c.plan as usize)
                .is_some_and(|p| c.version >= 1 && c.version as usize <= p.versions.len())
            && c.refunded <= c.charged;
        if !valid {
            return fail(format!("charge #{} refers to missing objects", c.seq));
        }
    }
    let mut previous = None;
    for c in state.charges.iter() {
        let in_order = previous.is_none_or(|p| p < c.seq)
            && (state.requests_first_seq..requests_end).contains(&c.seq);
        if !in_order {
            return fail(format!("charge #{} is out of order", c.seq));
        }
        previous = Some(c.seq);
    }
    for (key, late) in &engine.state.late_refunds {
        engine.index.late_by_until.insert((late.until, *key));
    }
    engine.rebuild_timers();
    Ok(engine)
}
