//! Workers on engine effects, off the shard threads: the history sinks (SQLite by default, JSON
//! lines optionally) that every effect is written to exactly once, and the PostgreSQL export that
//! copies the SQLite store exactly once ([`postgres`]).
//!
//! Every effect is tagged with the shard, the LSN of the input that produced it and its index
//! among that input's effects. That tag is deterministic (replay produces the same effects with
//! the same tags), so a sink keeps, durably and with the effects themselves, what it holds per
//! shard and skips anything it already has: after a restart nothing is lost (replay re-emits
//! what was not written) and nothing is written twice.
//!
//! **The exactly-once mechanism.** Recovery replays the WAL only above the newest checkpoint, so a
//! checkpoint at LSN L may be written only once every sink holds every effect at or below L
//! durably. The shard queues its effects in LSN order before it starts a checkpoint, and the
//! checkpoint writer calls [`flush`] first: a flush request queued behind those effects, answered
//! when every sink has synced them. So at any moment an effect is either durable in every sink
//! or re-derivable from the WAL, across `kill -9`, a checkpoint, or a power loss (sinks sync with
//! `fdatasync` / SQLite `synchronous=FULL` before they answer).
//!
//! What this crate deliberately does not know: WALs, checkpoints and shard threads. The server
//! owns the thread this runs on ([`spawn`]) and decides when to flush.

pub mod jsonl;
pub mod payments;
pub mod postgres;
pub mod sqlite;
pub mod stripe;
pub mod webhooks;

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Serialize};
use tally_engine::{Effect, Request, Timestamp};

pub use jsonl::FileSinks;
pub use postgres::PostgresExport;
pub use sqlite::SqliteSink;

/// An effect with its deterministic position and what caused it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tagged {
    /// The shard.
    pub shard: u32,
    /// LSN of the input that produced it.
    pub lsn: u64,
    /// Index among that input's effects.
    pub index: u32,
    /// When the shard applied the input.
    #[serde(default)]
    pub applied_at: Timestamp,
    /// The effect.
    pub effect: Effect,
    /// The request that produced it (`None` for timers), shared by all its effects; sinks take
    /// what effects do not carry from it (a usage event's quantities and attributes, the event a
    /// refund refers to).
    #[serde(skip)]
    pub cause: Option<Arc<Request>>,
}

impl Tagged {
    /// `(lsn, index)`: the order of effects within a shard.
    pub fn position(&self) -> (u64, u32) {
        (self.lsn, self.index)
    }
}

/// The wall clock in microseconds since the Unix epoch (0 before it), as the payments store and
/// the webhook sender keep time.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A request id derived from `text`: the first 128 bits of its SHA-256. The same text always
/// gives the same id, so work repeated after a crash or a retry is a repeated request to the
/// engine, answered with its first reply (Stripe outcomes, webhook events, HTTP idempotency
/// keys).
pub fn derived_id(text: &str) -> tally_engine::RequestId {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    tally_engine::RequestId(u128::from_be_bytes(bytes))
}

/// An outbound failure: the server cannot export and must stop (nothing is lost: the WAL and
/// the last checkpoint that waited for the sinks still hold everything not yet written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "outbound: {}", self.0)
    }
}

impl std::error::Error for Error {}

/// How far one sink is behind, shared with whoever reports health (updated by the sink's
/// worker, read anywhere).
#[derive(Debug)]
pub struct Lag {
    /// The sink's name (`sqlite`, `jsonl`, `postgres`).
    pub name: &'static str,
    effects: std::sync::atomic::AtomicU64,
    micros: std::sync::atomic::AtomicU64,
}

impl Lag {
    /// A sink that is not behind.
    pub fn new(name: &'static str) -> Arc<Lag> {
        Arc::new(Lag {
            name,
            effects: Default::default(),
            micros: Default::default(),
        })
    }

    /// Records that the sink is `effects` effects (rows) and `seconds` behind.
    pub fn set(&self, effects: u64, seconds: f64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.effects.store(effects, Relaxed);
        self.micros.store((seconds * 1e6) as u64, Relaxed);
        metrics::gauge!("tally_outbound_lag_effects", "sink" => self.name).set(effects as f64);
        metrics::gauge!("tally_outbound_lag_seconds", "sink" => self.name).set(seconds);
    }

    /// `(effects, microseconds)` behind.
    pub fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.effects.load(Relaxed), self.micros.load(Relaxed))
    }
}

/// A destination for effects.
pub trait Sink: Send {
    /// A short name for logs and metrics (`sqlite`, `jsonl`).
    fn name(&self) -> &'static str;
    /// Buffers one effect unless the sink already holds it; true if it is new.
    fn write(&mut self, tagged: &Tagged) -> Result<bool, Error>;
    /// Makes everything written so far durable, with the sink's record of what it holds.
    fn flush(&mut self) -> Result<(), Error>;
    /// Effects written but not yet flushed.
    fn unflushed(&self) -> usize;
}

/// Messages to the outbound thread.
#[derive(Debug)]
enum Message {
    /// Effects to write.
    Effects(Vec<Tagged>),
    /// Make everything so far durable and reply.
    Flush(Sender<()>),
}

/// How many effects wait in the queue, shared by its two ends.
#[derive(Debug)]
struct Budget {
    state: Mutex<Queued>,
    room: Condvar,
    max: usize,
}

#[derive(Debug, Default)]
struct Queued {
    effects: usize,
    /// The outbound thread is gone: nothing will make room again.
    stopped: bool,
    /// Senders are let in in the order they came (tickets), so a large message is not kept
    /// out for ever by a stream of small ones from other shards.
    next_ticket: u64,
    serving: u64,
}

/// The sending end of the outbound queue (cloned by every shard). The queue is bounded in
/// effects, not messages: a message may carry one input's effects or a whole replay chunk, so
/// only a count of effects bounds its memory.
#[derive(Debug, Clone)]
pub struct Outbound {
    tx: Sender<Message>,
    budget: Arc<Budget>,
}

/// The receiving end, owned by the outbound thread ([`spawn`]). When it is dropped (the thread
/// ended, by error or panic included) senders stop waiting and get an error.
#[derive(Debug)]
pub struct Inbound {
    rx: Receiver<Message>,
    budget: Arc<Budget>,
}

/// The outbound thread stopped: effects can no longer be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the outbound thread stopped")
    }
}

/// A queue for the outbound thread that holds at most `max_effects` effects, except that one
/// message always fits into an empty queue (so a message larger than the bound still passes).
pub fn queue(max_effects: usize) -> (Outbound, Inbound) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let budget = Arc::new(Budget {
        state: Mutex::new(Queued::default()),
        room: Condvar::new(),
        max: max_effects.max(1),
    });
    (
        Outbound {
            tx,
            budget: Arc::clone(&budget),
        },
        Inbound { rx, budget },
    )
}

impl Outbound {
    /// Queues `effects`, waiting while the queue holds too many (the backpressure that makes a
    /// shard, or a replay, wait for slow sinks instead of piling effects up in memory).
    pub fn send(&self, effects: Vec<Tagged>) -> Result<(), Stopped> {
        let n = effects.len();
        {
            let mut queued = self.budget.state.lock().map_err(|_| Stopped)?;
            let ticket = queued.next_ticket;
            queued.next_ticket += 1;
            while !queued.stopped
                && (queued.serving != ticket
                    || (queued.effects > 0 && queued.effects + n > self.budget.max))
            {
                queued = self.budget.room.wait(queued).map_err(|_| Stopped)?;
            }
            if queued.stopped {
                return Err(Stopped);
            }
            queued.effects += n;
            queued.serving += 1;
            // The next ticket may fit as well.
            self.budget.room.notify_all();
        }
        self.tx.send(Message::Effects(effects)).map_err(|_| Stopped)
    }

    /// Effects queued and not yet taken by the outbound thread.
    pub fn queued(&self) -> usize {
        self.budget.state.lock().map_or(0, |q| q.effects)
    }

    /// Waits until every effect queued before this call is durable in every sink.
    ///
    /// This is the barrier a checkpoint at LSN L passes before it is written (see the crate
    /// docs).
    pub fn flush(&self) -> Result<(), String> {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        self.tx
            .send(Message::Flush(done_tx))
            .map_err(|_| "the outbound thread stopped before the sinks were flushed".to_string())?;
        done_rx
            .recv()
            .map_err(|_| "the outbound thread stopped while flushing the sinks".to_string())
    }
}

impl Inbound {
    /// Frees the room of `n` effects the thread has written.
    fn release(&self, n: usize) {
        if let Ok(mut queued) = self.budget.state.lock() {
            queued.effects = queued.effects.saturating_sub(n);
        }
        self.budget.room.notify_all();
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        if let Ok(mut queued) = self.budget.state.lock() {
            queued.stopped = true;
        }
        self.budget.room.notify_all();
    }
}

/// Writes `tagged` to every sink; counts it once if any sink found it new.
pub fn write_all(sinks: &mut [Box<dyn Sink>], tagged: &Tagged) -> Result<(), Error> {
    let mut new = false;
    for sink in sinks.iter_mut() {
        new |= sink.write(tagged)?;
    }
    if new {
        effect_written(&tagged.effect);
    }
    Ok(())
}

fn flush_all(sinks: &mut [Box<dyn Sink>]) -> Result<(), Error> {
    for sink in sinks.iter_mut() {
        let started = Instant::now();
        sink.flush()?;
        metrics::histogram!("tally_outbound_flush_duration_seconds", "sink" => sink.name())
            .record(started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Flush after this many effects even while more keep coming.
const FLUSH_EVERY: usize = 65_536;
/// Flush at least this often while effects are waiting. The sinks' durability is not on the
/// reply path (replay re-emits anything not yet written), so syncing them per batch would only
/// spend the disk: every sink sync competes with the WAL's group commits for the same disk
/// (measured: 64 callers one at a time made 27 k debits/s with a 100 ms interval, 42 k with 1 s,
/// 67 k without the store; `benches/benches/history.rs`).
const FLUSH_INTERVAL: Duration = Duration::from_millis(1000);

/// Starts the outbound thread over `sinks`. It exits when every sender is dropped, after a final
/// flush, or at the first sink error.
pub fn spawn(
    mut sinks: Vec<Box<dyn Sink>>,
    inbound: Inbound,
    lags: Vec<Arc<Lag>>,
) -> JoinHandle<Result<(), Error>> {
    assert_eq!(lags.len(), sinks.len(), "one lag per sink");
    std::thread::Builder::new()
        .name("tally-outbound".into())
        .spawn(move || {
            let mut last_flush = Instant::now();
            let queued = metrics::gauge!("tally_outbound_queue_depth");
            loop {
                let wait = FLUSH_INTERVAL.saturating_sub(last_flush.elapsed());
                match inbound.rx.recv_timeout(wait) {
                    Ok(Message::Effects(effects)) => {
                        for tagged in &effects {
                            write_all(&mut sinks, tagged)?;
                        }
                        inbound.release(effects.len());
                    }
                    Ok(Message::Flush(done)) => {
                        flush_all(&mut sinks)?;
                        last_flush = Instant::now();
                        let _ = done.send(());
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                }
                let waiting = sinks.iter().map(|s| s.unflushed()).max().unwrap_or(0);
                if waiting >= FLUSH_EVERY || last_flush.elapsed() >= FLUSH_INTERVAL {
                    // Also when nothing waits: the interval restarts, so an idle loop sleeps in
                    // `recv_timeout` instead of spinning.
                    if waiting > 0 {
                        flush_all(&mut sinks)?;
                    }
                    last_flush = Instant::now();
                }
                // Behind: the effects waiting in the queue plus those written but not yet
                // durable; for at most as long as since the last flush.
                let waiting = inbound.budget.state.lock().map_or(0, |q| q.effects) as u64;
                queued.set(waiting as f64);
                for (lag, sink) in lags.iter().zip(&sinks) {
                    let behind = waiting + sink.unflushed() as u64;
                    let seconds = if behind == 0 {
                        0.0
                    } else {
                        last_flush.elapsed().as_secs_f64()
                    };
                    lag.set(behind, seconds);
                }
            }
            flush_all(&mut sinks)
        })
        .expect("spawning the outbound thread")
}

/// Counts an effect a sink wrote for the first time (replayed duplicates are not counted).
fn effect_written(effect: &Effect) {
    match effect {
        Effect::Margin(m) => {
            let asset = m.asset.as_str().to_string();
            metrics::counter!("tally_debits_total", "asset" => asset.clone()).increment(1);
            // Volume for dashboards, in millionths of the asset (the ledger is the exact record).
            metrics::counter!("tally_debited_micros_total", "asset" => asset)
                .increment(micros(m.charged));
            metrics::counter!("tally_revenue_usd_micros_total").increment(micros(m.revenue_usd));
            metrics::counter!("tally_cost_usd_micros_total").increment(micros(m.cost_usd));
        }
        Effect::Journal(_) => metrics::counter!("tally_journal_entries_total").increment(1),
        Effect::TopUpRequested(_) => {
            metrics::counter!("tally_topups_total", "outcome" => "requested").increment(1)
        }
        Effect::TopUpExhausted { .. } => {
            metrics::counter!("tally_topups_total", "outcome" => "exhausted").increment(1)
        }
        Effect::WalletCreated { .. } => {
            metrics::counter!("tally_wallets_created_total").increment(1)
        }
        Effect::WalletFrozen { .. } => {
            metrics::counter!("tally_alerts_total", "type" => "wallet.frozen").increment(1)
        }
        Effect::BalanceAlert { alert, .. } => {
            metrics::counter!("tally_alerts_total", "type" => alert.event_type()).increment(1)
        }
        Effect::GrantExpiring { .. } => {
            metrics::counter!("tally_alerts_total", "type" => "grant.expiring").increment(1)
        }
    }
}

fn micros(amount: rust_decimal::Decimal) -> u64 {
    amount
        .checked_mul(rust_decimal::Decimal::from(1_000_000))
        .and_then(|m| m.trunc().to_u64())
        .unwrap_or(0)
}
