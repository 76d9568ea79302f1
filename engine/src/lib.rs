//! tally-engine: the deterministic wallet state machine of one shard, with every billing rule.
//!
//! The engine does no IO. It reads no clock, opens no file or socket, starts no thread and
//! draws no random number: time and ids come in as arguments, and outcomes come out as return
//! values and queued effects. Replaying the same inputs always rebuilds the same state, which is
//! what makes the write-ahead log, snapshots and crash recovery of the server possible.
//! Architecture invariant: `engine` knows nothing about WALs, threads, networks or Stripe.
//!
//! # The run-loop contract
//!
//! One shard loop owns one [`Engine`]. Inputs are `handle_*`, outputs are `poll_*`
//! (quinn-proto's vocabulary), and after every input the loop drains every output:
//!
//! ```text
//! loop {
//!     take a batch of requests; stamp it with one time `now` (never earlier than the last)
//!     log the batch durably (the engine's inputs are the log)
//!     for each request: reply = engine.handle_request(now, &request)
//!     while let Some(effect) = engine.poll_effect() { export / act on it }
//!     release the replies
//!     when idle: if engine.poll_timeout() <= now { engine.handle_timeout(now); drain effects }
//! }
//! ```
//!
//! Catalog commands (assets, products, plans) must reach every shard in the same order; wallet
//! commands go only to the shard [`shard_for`] names. Queries ([`Engine::query`]) read the state as
//! of the last input, change nothing and are not logged.
//!
//! # Outcomes, errors, bugs
//!
//! Every outcome a caller can get is a [`ResultCode`] with a stable number; a rejection is data
//! and changes nothing except that its request id is remembered (a repeat gets the same
//! rejection). Broken invariants are bugs and panic; the server then recovers from its log.
//!
//! # Decisions where the brief is silent
//!
//! - Amounts are `rust_decimal::Decimal` everywhere. An amount a command carries must be positive,
//!   at most 10^18 (and at most 10^(28 − scale) for assets with more than 10 decimal places) and
//!   no finer than its asset's scale. Balance totals (ledger, debt) stay within the same bound,
//!   so every number has at most 28 digits and balance arithmetic never rounds (`Decimal` would
//!   round silently past its 96-bit mantissa): a grant, refund or debit that would cross it is
//!   refused with `AmountOverflow` and changes nothing.
//! - Margin is in USD: a charge is valued at its asset's USD value to 18 decimal places (half to
//!   even; exact for every asset whose scale and USD value need no more), costs carry at most 12,
//!   and totals are kept as exact integers of 10^-18 USD ([`Usd`]), so no total ever rounds
//!   (they saturate at 1.7 × 10^20 USD). A report shows a total as a `Decimal`: exact up to
//!   79 billion USD, its last places rounded beyond. Charges are computed exactly (a product
//!   that would need rounding inside `Decimal` is refused with `AmountOverflow`) and rounded to
//!   the asset's scale once, in the rounding mode the matching price rule names.
//! - Tiered prices apply to the quantity of one event (per-event tiers), not to cumulative usage
//!   over a period.
//! - A wallet is "in debt" (and refuses strict usage and reserves) while its debt exceeds its
//!   overdraft limit; with the default limit of zero, any debt blocks. Strict usage and reserves
//!   may take available balance down to minus the overdraft limit; what grants do not cover
//!   becomes debt.
//! - Grants are consumed when usage is applied, by the grants active at that time; an event's own
//!   `occurred_at` chooses the plan version and the margin hour. Events may be up to
//!   `future_skew_us` (5 min) ahead. A usage event, strict or recorded, must be recent enough
//!   that an earlier application of its id would still be remembered: `occurred_at`, less the
//!   largest lead an applied event has had (how far ahead of the clock; zero unless clients send
//!   future times), no earlier than the start of the idempotency window (24 h by default, later if ids were
//!   forgotten early because the table was full). An older event is refused with
//!   `TimestampOutOfRange`, because its retry could no longer be told from a new event and would
//!   be charged twice; recorded usage reported late is recorded as long as this holds, and
//!   backfills older than that need a longer window (48 bytes per id). A settlement names its
//!   hold, which settles once, so it is accepted however late its event occurred.
//! - Frozen wallets refuse strict usage and reserves; record usage, settles, grants and refunds
//!   still apply (they describe what already happened).
//! - Holds last at most 7 days. A settle after the deadline gets `HoldExpired`; the last 64 closed
//!   holds of a wallet are remembered to give that precise answer.
//! - Money behind open holds is set aside. Other debits (strict or recorded usage, debit
//!   adjustments) take from the grants at most `active − held`; the rest of the amount becomes
//!   debt. A settlement closes its hold first, so it spends what the hold reserved. Expiry never
//!   takes held money either: an expired grant keeps what the holds need beyond the grants that
//!   have not expired, and gives that up as breakage as soon as the holds close or new credit
//!   covers them. When a hold closes, free credit pays any debt that the set-aside caused (it
//!   would have paid it without the hold; no journal entry, as when a grant pays debt). Processor
//!   events (a chargeback, a refund of a top-up) are not held back by holds: they take the
//!   grant's remainder, and a settlement that then finds too little creates debt.
//! - A refund credits a new grant (source `Refund`, journal kind `Refund`) and refers to the
//!   usage by its request id. The credit takes the place of what paid: it gets the priority
//!   of the first grant the charge consumed and expires with the latest-expiring paying grant
//!   (never, if a paying grant never expires or part of the charge became debt); if that time
//!   has passed it expires at once. A debit adjustment is charged like record usage.
//! - Top-up grants get priority 100, so promotions (priority 0 by default) are spent first. A successful top-up is always credited, even for a stale trigger: money taken is
//!   never lost. Its payment id makes a repeat a no-op. A failure backs off (cooldown doubled per
//!   failure, at least 1 s) and after `attempts_max` failures in a row the wallet is flagged.
//!   A top-up whose outcome has not come after [`TOPUP_IN_FLIGHT_TIMEOUT_US`] (1 h) counts as a
//!   failure ([`TOPUP_TIMED_OUT`]), so one lost outcome cannot stop auto top-up for good; its
//!   amount keeps counting against the caps (it may have been charged), and a success reported
//!   later is still credited. A success of another amount than requested is credited and stops
//!   the rule (flagged, `TopUpExhausted`): whatever charges the card is not doing what it says.
//!   Frozen wallets and wallets with an open chargeback never trigger a top-up.
//! - A dispute claws back the grant's remainder and turns the spent part into debt; what expired
//!   unspent was never spent, so it is not debt: its breakage is moved to the dispute account.
//!   Winning credits the clawed amount again as a new grant (which pays that debt first) with the
//!   original expiry, and books the expired part as breakage again. A lost dispute is final.
//! - Request ids are scoped by wallet: the idempotency key is (wallet, request id), and catalog
//!   commands share one scope. The same id used for two wallets names two requests, wherever the
//!   two wallets live (shards cannot disagree). Keys are kept as 96-bit digests and bodies
//!   compared by a 64-bit fingerprint.
//! - Request ids are remembered for `idempotency_retention_us` (24 h by default) in a compact
//!   table (`remember`): 40 bytes per id plus its index entry (5–10 bytes), about 48 in all, so a
//!   GiB holds 22 M ids (24 hours at 250 requests/s). The table holds at most
//!   `idempotency_max_ids` (16 M by default); when full, the oldest id is forgotten early and
//!   [`Engine::idempotency_evicted`] counts it. A repeat gets the first reply's code and values,
//!   except the `available` of a charge or hold, which is the balance now. Rejections cost the
//!   same 40 bytes (they carry no value to keep).
//! - Refunds name the charged event by its request id. Within the idempotency window each charge
//!   keeps a ~90-byte record while its request is remembered (what a refund needs: the amount,
//!   what refunds took already, the margin buckets and the credit's terms). Past the window the
//!   engine keeps nothing of a charge unless part of it was refunded: a refund then comes with
//!   the charge as the server's history store recorded it
//!   ([`Engine::handle_recorded_refund`], [`RecordedCharge`], logged with the refund), accepted
//!   until the end of the refund window it names, and the engine keeps only what was refunded
//!   of such charges ([`State::late_refunds`], about 80 bytes per refunded charge, kept up to
//!   [`LATE_REFUND_KEEP_US`]), so the cap "never more than charged" holds. The margin record of
//!   each charge carries the credit's terms for the store. A recorded charge is trusted input:
//!   the server reads it from its own store; no client can send one.

mod code;
mod command;
mod engine;
mod hash;
pub mod legacy;
mod money;
mod output;
mod pricing;
mod query;
mod remember;
mod state;
mod types;

pub use code::ResultCode;
pub use command::{
    asset, name, Command, CreateWallet, DebitMode, Grant, GrantSource, Limit, PaymentEvent,
    RecordedCharge, Reply, ReplyValue, Request, ReserveAmount, TopUpAmount, TopUpPrice, TopUpRule,
    UsageEvent,
};
pub use engine::{digest_state, Engine, RestoreError};
pub use engine::{
    ASSETS_MAX, ASSIGNMENTS_MAX, ATTRIBUTES_MAX, DEFAULT_PAYMENT_METHOD, HOLDS_MAX,
    HOLD_DURATION_MAX_US, METADATA_MAX, PLANS_MAX, PRODUCTS_MAX, QUANTITIES_MAX, REASON_BYTES_MAX,
    TOPUP_IN_FLIGHT_TIMEOUT_US, TOPUP_PRIORITY, TOPUP_TIMED_OUT,
};
pub use hash::{fingerprint, scope_of, shard_for, StableHasher};
pub use money::{dec, limit as amount_limit, Rounding, Usd, AMOUNT_MAX, QUANTITY_MAX, USD_SCALE};
pub use output::{Account, Alert, Effect, EntryKind, JournalEntry, MarginRecord, TopUpRequest};
pub use pricing::{Component, PriceModel, PriceRule, Quantity, Tier};
pub use query::{
    BalanceView, DraftTestReport, DraftTestRow, GrantView, MarginScope, MarginView,
    PlanVersionView, PlanView, PriceView, Query, QueryReply, TopUpStatus, WalletFilter, WalletPage,
    WalletView, WALLET_PAGE_MAX, WALLET_SCAN_MAX,
};
pub use state::{Asset, Config, LateRefund, Margin, State, ADJUSTMENTS_KEPT, LATE_REFUND_KEEP_US};
pub use types::{
    AssetCode, GrantId, HoldId, InlineStr, Name, NameError, RequestId, Timestamp, WalletId,
};

/// The version of the billing rules: two builds with the same version apply the same inputs to
/// the same outcomes. A WAL written under one version is replayed only by a build of the same
/// version (the server refuses otherwise); bump it with any change of a rule's outcome.
/// Version 2: issue 14 (holds set aside, per-wallet idempotency, top-up timeouts, exact
/// balances, ...).
pub const RULES_VERSION: u32 = 2;

/// Every public type, for `use tally_engine::prelude::*` in tests and tools.
pub mod prelude {
    pub use crate::*;
}

/// Internal state types, for snapshot tooling that inspects a [`State`].
pub mod model {
    pub use crate::state::*;
}
