//! One shard thread: the run loop that owns an `Engine` and its WAL.
//!
//! The loop, in order, for each batch: take up to `batch_max` messages from the bounded inbound
//! queue; stamp the batch with one time (never earlier than the last); append one WAL record
//! per request and seal the batch; apply the requests to the engine; park the replies and the
//! effects until the sync thread reports the batch durable; then send the effects to the
//! outbound queue and the replies to their callers. The sync thread runs `fdatasync` for batch
//! N while this loop collects, logs and applies batch N+1 (group commit with pipelining). No
//! reply and no effect leaves before its records are durable; queries are answered from the
//! applied state but released with the batches before them, so nobody reads a write that could
//! still be lost, except that a read of one wallet (`Wallet`, `Balance`) whose last write is
//! already durable is answered at once, without waiting for the sync of other wallets' writes:
//! the loop keeps the LSN of the last write per bucket of wallets ([`WRITTEN_BUCKETS`], a
//! shared bucket only makes a read wait), and of the last catalog command, tick and settings
//! change, which touch every wallet.
//!
//! A failed sync or write poisons the WAL: every waiting caller gets `Poisoned`, the shard stops,
//! and the process must restart and recover. Nothing is retried in place.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender, TrySendError};
use tally_engine::{
    Engine, Query, QueryReply, Reply, Request, ResultCode, State, Timestamp, WalletFilter,
    WalletPage,
};
use tally_wal::{FileStorage, Wal};
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::observe::ShardMetrics;
use crate::outbound::{self, Tagged};
use crate::record::{self, LogEntry, LogRecord};

/// Why a call did not get a reply from its shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The shard's inbound queue is full; retry later with the same request id.
    Busy,
    /// The shard has stopped (shutdown or a fatal error).
    Stopped,
    /// The shard's WAL failed; the server must be restarted to recover.
    Poisoned(String),
    /// The request does not fit in a WAL record.
    TooLarge,
    /// A checkpoint could not be written (nothing is lost: the WAL is kept).
    Checkpoint(String),
    /// A catalog command could not be recorded before its broadcast (nothing was applied).
    Catalog(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Busy => write!(f, "busy: the shard's queue is full, retry with the same id"),
            CallError::Stopped => write!(f, "the shard has stopped"),
            CallError::Poisoned(why) => {
                write!(f, "the WAL failed ({why}); restart the server to recover")
            }
            CallError::TooLarge => write!(f, "the request is too large for one WAL record"),
            CallError::Checkpoint(why) => write!(f, "checkpoint failed: {why}"),
            CallError::Catalog(why) => {
                write!(f, "the catalog command was not applied: {why}")
            }
        }
    }
}

impl std::error::Error for CallError {}

/// Where a reply goes.
pub type ReplyTo = oneshot::Sender<Result<Reply, CallError>>;
/// Where the replies of a batch go, one per request, in order.
pub type BatchReplyTo = oneshot::Sender<Result<Vec<Result<Reply, CallError>>, CallError>>;

/// Most requests in one batch message.
pub const BATCH_ITEMS_MAX: usize = 8192;

/// Buckets of wallets whose last write LSN the loop keeps, for reads answered early (8 bytes
/// each: 512 KiB per shard).
pub const WRITTEN_BUCKETS: usize = 1 << 16;

/// Where a query answer goes.
pub type AnswerTo = oneshot::Sender<Result<Result<QueryReply, ResultCode>, CallError>>;

/// Where a wallet listing's page goes.
pub type ListTo = oneshot::Sender<Result<WalletPage, CallError>>;

/// A checkpoint request's answer.
pub type CheckpointTo = oneshot::Sender<Result<CheckpointReport, CallError>>;

/// A checkpoint that was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointReport {
    /// The last LSN it includes.
    pub lsn: u64,
    /// The digest of its state.
    pub digest: u64,
    /// How long the shard loop stood still for it (copying the state), in microseconds; the
    /// encoding, writing and syncing happen on another thread.
    pub stall_us: u64,
}

/// Messages to a shard.
#[derive(Debug)]
pub enum Message {
    /// Apply a request.
    Request(Request, ReplyTo),
    /// Apply a refund with the charge the history store recorded
    /// (`Engine::handle_recorded_refund`).
    RecordedRefund(Request, Box<tally_engine::RecordedCharge>, ReplyTo),
    /// Apply many requests of this shard's wallets, answered together (at most
    /// [`BATCH_ITEMS_MAX`]).
    Batch(Vec<Request>, BatchReplyTo),
    /// Answer a query.
    Query(Query, AnswerTo),
    /// List a page of this shard's wallets ([`Engine::list_wallets`]), answered like a query.
    ListWallets {
        /// Position to start at (0, then the previous page's `next`).
        from: u32,
        /// Most wallets to return (capped at `WALLET_PAGE_MAX`; 0 counts as 1).
        limit: u32,
        /// Which wallets.
        filter: WalletFilter,
        /// Where the page goes.
        to: ListTo,
    },
    /// Take a checkpoint now and answer with its LSN and digest.
    Checkpoint(CheckpointTo),
    /// Finish what is queued, then stop.
    Stop,
}

impl Message {
    /// How many requests this message queues: a batch counts each of its items, so a queue
    /// bounded in items bounds the work waiting, whatever the frames look like.
    pub fn items(&self) -> usize {
        match self {
            Message::Batch(requests, _) => requests.len(),
            Message::Stop => 0,
            _ => 1,
        }
    }
}

/// A shard's inbound queue, bounded in requests (a batch counts each of its items), not in
/// messages: decoding can never run ahead of applying by more than `max` requests per shard.
pub fn queue(max: usize) -> (Inbound, Receiver<Message>, Arc<AtomicUsize>) {
    let (tx, rx) = crossbeam_channel::bounded(max.max(1));
    let queued = Arc::new(AtomicUsize::new(0));
    let inbound = Inbound {
        tx,
        queued: queued.clone(),
        max: max.max(1),
    };
    (inbound, rx, queued)
}

/// Why [`Inbound`] did not take a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds its most requests.
    Full,
    /// The shard has stopped.
    Stopped,
}

/// The sending side of a shard's queue (see [`queue`]).
#[derive(Clone, Debug)]
pub struct Inbound {
    tx: Sender<Message>,
    queued: Arc<AtomicUsize>,
    max: usize,
}

impl Inbound {
    /// Queues `message` unless that would put more than the bound's requests in the queue. One
    /// message always fits in an empty queue, however many items it has (a batch is at most
    /// [`BATCH_ITEMS_MAX`]).
    pub fn try_send(&self, message: Message) -> Result<(), Refused> {
        let items = message.items();
        let before = self.queued.fetch_add(items, Ordering::AcqRel);
        if before > 0 && before + items > self.max {
            self.queued.fetch_sub(items, Ordering::AcqRel);
            return Err(Refused::Full);
        }
        self.tx.try_send(message).map_err(|e| {
            self.queued.fetch_sub(items, Ordering::AcqRel);
            match e {
                TrySendError::Full(_) => Refused::Full,
                TrySendError::Disconnected(_) => Refused::Stopped,
            }
        })
    }

    /// Queues `message`, waiting while the channel is full (catalog broadcasts and control
    /// messages, which must reach every shard). It counts against the bound like any other.
    pub fn send(&self, message: Message) -> Result<(), Refused> {
        let items = message.items();
        self.queued.fetch_add(items, Ordering::AcqRel);
        self.tx.send(message).map_err(|_| {
            self.queued.fetch_sub(items, Ordering::AcqRel);
            Refused::Stopped
        })
    }

    /// Requests queued now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

/// Writes checkpoints of a shard's state; implemented over the snapshot directory.
pub trait Checkpoints: Send + Sync + 'static {
    /// Writes `state` as the checkpoint of `shard` at `lsn`, prunes old ones, and returns the
    /// oldest LSN still needed from the WAL (the oldest kept checkpoint's LSN + 1).
    fn write(&self, shard: u32, lsn: u64, at: Timestamp, state: &State) -> Result<u64, String>;
}

enum Ready {
    Reply(ReplyTo, Reply),
    Batch(BatchReplyTo, Vec<Result<Reply, CallError>>),
    Answer(AnswerTo, Box<Result<QueryReply, ResultCode>>),
    Page(ListTo, WalletPage),
}

struct Pending {
    end_lsn: u64,
    ready: Vec<Ready>,
    effects: Vec<Tagged>,
}

/// Settings of one shard loop.
#[derive(Clone, Debug)]
pub struct ShardOptions {
    /// Most messages per batch.
    pub batch_max: usize,
    /// Checkpoint after this many records (0: never by count).
    pub snapshot_every_records: u64,
    /// Checkpoint after this long (zero: never by time).
    pub snapshot_every: Duration,
}

/// A shard's run loop and everything it owns.
pub struct Shard {
    index: u32,
    engine: Engine,
    wal: Wal<FileStorage>,
    applied_lsn: u64,
    last_now: Timestamp,
    inbound: Receiver<Message>,
    /// Requests in `inbound` (see [`queue`]); the loop subtracts what it takes.
    queued: Arc<AtomicUsize>,
    outbound: outbound::Outbound,
    clock: Box<dyn Clock>,
    checkpoints: Arc<dyn Checkpoints>,
    options: ShardOptions,
    writing: Option<Writing>,
    /// Checkpoint requests that arrived while one was being written.
    checkpoint_queue: Vec<CheckpointTo>,
    pending: VecDeque<Pending>,
    buf: Vec<u8>,
    records_since_checkpoint: u64,
    /// Settings changes to log and apply first (see [`Shard::settings`]).
    settings: Vec<LogEntry>,
    last_checkpoint: Instant,
    metrics: ShardMetrics,
    /// Per bucket of wallets, the LSN of the last request applied to one of them.
    written: Box<[u64]>,
    /// The LSN of the last input that touches every wallet (a catalog command, a tick, a
    /// settings change).
    written_all: u64,
    /// Reads answered early, counted for `Server::reads_early` (the metric is the same count).
    reads_early: Arc<std::sync::atomic::AtomicU64>,
}

/// The bucket of `written` a wallet's writes are counted in.
fn written_bucket(wallet: &tally_engine::WalletId) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    wallet.hash(&mut hasher);
    hasher.finish() as usize & (WRITTEN_BUCKETS - 1)
}

/// A checkpoint being written on its own thread.
struct Writing {
    done: Receiver<Result<(u64, u64), String>>,
    lsn: u64,
    stall_us: u64,
    started: Instant,
    waiters: Vec<CheckpointTo>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// A shard ready to run, after recovery produced its engine and WAL.
    #[allow(clippy::too_many_arguments)]
    /// Counts the reads it answers early in `counter` too.
    pub fn counting_early_reads(mut self, counter: Arc<std::sync::atomic::AtomicU64>) -> Shard {
        self.reads_early = counter;
        self
    }

    /// Counts `records` replayed by recovery as not yet checkpointed (so a clean stop or the
    /// record count checkpoints them).
    pub fn replayed(mut self, records: u64) -> Shard {
        self.records_since_checkpoint = records;
        self
    }

    /// The settings the shard should run with (idempotency and alerts): those its state does
    /// not have yet (all of them if the shard is new) are the first thing the shard logs and
    /// applies (`LogEntry::Settings`, `LogEntry::Alerts`).
    pub fn settings(mut self, wanted: tally_engine::Config) -> Shard {
        let have = self.engine.state().config;
        // A new shard logs them too, as its first records: replay without a checkpoint then
        // starts from the settings the records were applied under, whatever the configuration
        // says by then.
        let fresh = self.wal.next_lsn() == 1;
        let entries = |c: tally_engine::Config| {
            [
                LogEntry::Settings {
                    idempotency_retention_us: c.idempotency_retention_us,
                    idempotency_max_ids: c.idempotency_max_ids,
                },
                LogEntry::Alerts {
                    low_balance_usd: c.low_balance_usd,
                    grant_expiring_lead_us: c.grant_expiring_lead_us,
                },
            ]
        };
        for (wanted, have) in entries(wanted).into_iter().zip(entries(have)) {
            if fresh || wanted != have {
                self.settings.push(wanted);
            }
        }
        self
    }

    /// Logs and applies the settings changes set by [`Shard::settings`], if any.
    fn apply_settings(&mut self) -> Result<(), CallError> {
        for entry in std::mem::take(&mut self.settings) {
            tracing::info!(shard = self.index, settings = ?entry, "settings changed");
            self.log_input(entry)?;
        }
        Ok(())
    }

    /// Logs an input that is not a request (a tick or a settings change) as a record of its
    /// own, applies it, and parks its effects behind the record's sync. It touches every
    /// wallet, so reads of any wallet wait for it.
    fn log_input(&mut self, entry: LogEntry) -> Result<(), CallError> {
        let now = self.now();
        let record = LogRecord { at: now, entry };
        record::encode(&record, &mut self.buf);
        let lsn = self
            .wal
            .append(&self.buf)
            .map_err(|e| CallError::Poisoned(e.to_string()))?;
        self.wal
            .seal()
            .map_err(|e| CallError::Poisoned(e.to_string()))?;
        self.written_all = lsn;
        record
            .entry
            .apply(&mut self.engine, now)
            .map_err(CallError::Poisoned)?;
        self.metrics.holds_open.set(self.engine.holds_open() as f64);
        let mut effects = Vec::new();
        self.drain_effects(lsn, now, None, &mut effects);
        self.applied_lsn = lsn;
        self.records_since_checkpoint += 1;
        self.park(lsn, Vec::new(), effects);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: u32,
        engine: Engine,
        wal: Wal<FileStorage>,
        (inbound, queued): (Receiver<Message>, Arc<AtomicUsize>),
        outbound: outbound::Outbound,
        clock: Box<dyn Clock>,
        checkpoints: Arc<dyn Checkpoints>,
        options: ShardOptions,
    ) -> Shard {
        let applied_lsn = wal.next_lsn() - 1;
        let last_now = engine.state().now;
        Shard {
            index,
            engine,
            wal,
            applied_lsn,
            last_now,
            inbound,
            queued,
            outbound,
            clock,
            checkpoints,
            options,
            writing: None,
            checkpoint_queue: Vec::new(),
            pending: VecDeque::new(),
            buf: Vec::with_capacity(4096),
            records_since_checkpoint: 0,
            settings: Vec::new(),
            last_checkpoint: Instant::now(),
            metrics: ShardMetrics::new(index),
            written: vec![0; WRITTEN_BUCKETS].into_boxed_slice(),
            // Everything recovered is durable.
            written_all: applied_lsn,
            reads_early: Arc::default(),
        }
    }

    fn now(&mut self) -> Timestamp {
        let now = self.clock.now().max(self.last_now);
        self.last_now = now;
        now
    }

    /// Runs until `Stop` (or every sender is gone) and everything queued is answered, or until
    /// the WAL fails. Returns the final state's digest.
    pub fn run(mut self) -> Result<u64, CallError> {
        let syncer = self.wal.syncer();
        let sync_seconds = self.metrics.sync_seconds.clone();
        let (sync_tx, sync_rx) = crossbeam_channel::bounded::<()>(1);
        let (synced_tx, synced_rx) = crossbeam_channel::bounded::<Result<u64, String>>(1);
        let sync_thread = std::thread::Builder::new()
            .name(format!("tally-sync-{}", self.index))
            .spawn(move || {
                while sync_rx.recv().is_ok() {
                    let started = Instant::now();
                    let result = syncer.sync().map_err(|e| e.to_string());
                    sync_seconds.record(started.elapsed().as_secs_f64());
                    let failed = result.is_err();
                    if synced_tx.send(result).is_err() || failed {
                        break;
                    }
                }
            })
            .expect("spawning a sync thread");
        let result = self.run_loop(&sync_tx, &synced_rx);
        drop(sync_tx);
        let _ = sync_thread.join();
        if let Err(error) = &result {
            self.fail_all(error.clone());
        }
        result
    }

    fn run_loop(
        &mut self,
        sync_tx: &Sender<()>,
        synced_rx: &Receiver<Result<u64, String>>,
    ) -> Result<u64, CallError> {
        self.apply_settings()?;
        let mut batch: Vec<Message> = Vec::with_capacity(self.options.batch_max);
        let mut syncing = false;
        let mut stopping = false;
        loop {
            let timeout = match self.engine.poll_timeout() {
                Some(at) => {
                    let now = self.clock.now();
                    Duration::from_micros(at.0.saturating_sub(now.0).max(0) as u64)
                }
                None => Duration::from_millis(100),
            };
            if stopping {
                if self.pending.is_empty() {
                    if let Some(writing) = self.writing.take() {
                        let result = writing.done.recv().unwrap_or(Err("writer vanished".into()));
                        self.checkpoint_written(writing, result)?;
                    }
                    // A clean stop leaves nothing to replay: what was applied since the last
                    // checkpoint (all of it durable now) is checkpointed before the thread ends,
                    // so a planned restart loads the state instead of replaying the WAL.
                    if self.records_since_checkpoint > 0 {
                        self.start_checkpoint(Vec::new());
                        let writing = self.writing.take().expect("a checkpoint was just started");
                        let result = writing.done.recv().unwrap_or(Err("writer vanished".into()));
                        self.checkpoint_written(writing, result)?;
                    }
                    return Ok(self.engine.digest());
                }
                let durable = synced_rx.recv().map_err(|_| CallError::Stopped)?;
                syncing = false;
                self.release(durable.map_err(CallError::Poisoned)?)?;
            } else {
                let written = self.writing.as_ref().map(|w| w.done.clone());
                let written = written.unwrap_or_else(crossbeam_channel::never);
                select! {
                    recv(written) -> result => {
                        let writing = self.writing.take().expect("a checkpoint was being written");
                        let result = result.unwrap_or(Err("the checkpoint writer vanished".into()));
                        self.checkpoint_written(writing, result)?;
                    }
                    recv(synced_rx) -> durable => {
                        syncing = false;
                        let durable = durable.map_err(|_| CallError::Stopped)?;
                        self.release(durable.map_err(CallError::Poisoned)?)?;
                    }
                    recv(self.inbound) -> message => match message {
                        Ok(message) => {
                            batch.push(message);
                            while batch.len() < self.options.batch_max {
                                match self.inbound.try_recv() {
                                    Ok(message) => batch.push(message),
                                    Err(_) => break,
                                }
                            }
                        }
                        Err(_) => stopping = true,
                    },
                    default(timeout) => {}
                }
            }
            if !batch.is_empty() {
                stopping |= self.apply_batch(&mut batch)?;
            } else if !stopping
                && self
                    .engine
                    .poll_timeout()
                    .is_some_and(|at| at <= self.clock.now())
            {
                self.tick()?;
            }
            if !syncing && self.wal.sealed_lsn() > self.wal.durable_lsn() {
                sync_tx.send(()).map_err(|_| CallError::Stopped)?;
                syncing = true;
            }
            if self.pending.is_empty() && self.writing.is_none() && self.checkpoint_due() {
                self.start_checkpoint(Vec::new());
            }
        }
    }

    /// Logs, seals and applies one batch. Returns true if it contained `Stop`.
    fn apply_batch(&mut self, batch: &mut Vec<Message>) -> Result<bool, CallError> {
        let now = self.now();
        let items: usize = batch.iter().map(Message::items).sum();
        let queued = self.queued.fetch_sub(items, Ordering::AcqRel) - items;
        self.metrics.batch_size.record(batch.len() as f64);
        self.metrics.queue_depth.set(queued as f64);
        let mut stop = false;
        let record_max = tally_wal::RECORD_PAYLOAD_MAX;
        // Log first: every request of the batch, then one seal. A request too large for a record
        // is answered `TooLarge` and neither logged nor applied.
        let mut logged = 0u64;
        let mut fits = Vec::with_capacity(batch.len());
        for message in batch.iter() {
            let (requests, recorded) = match message {
                Message::Request(request, _) => (std::slice::from_ref(request), None),
                Message::RecordedRefund(request, charge, _) => {
                    (std::slice::from_ref(request), Some(charge))
                }
                Message::Batch(requests, _) => (requests.as_slice(), None),
                _ => (&[][..], None),
            };
            for request in requests {
                match recorded {
                    Some(charge) => record::encode(
                        &LogRecord {
                            at: now,
                            entry: LogEntry::RecordedRefund {
                                request: request.clone(),
                                charge: (**charge).clone(),
                            },
                        },
                        &mut self.buf,
                    ),
                    None => record::encode_request(now, request, &mut self.buf),
                }
                let fit = self.buf.len() <= record_max;
                if fit {
                    self.wal
                        .append(&self.buf)
                        .map_err(|e| CallError::Poisoned(e.to_string()))?;
                    logged += 1;
                }
                fits.push(fit);
            }
        }
        let end_lsn = if logged > 0 {
            self.wal
                .seal()
                .map_err(|e| CallError::Poisoned(e.to_string()))?
        } else {
            self.applied_lsn
        };
        let mut lsn = self.applied_lsn;
        let mut ready = Vec::with_capacity(batch.len());
        let mut effects = Vec::new();
        let mut checkpoint_requests = Vec::new();
        let mut requests = 0;
        for message in batch.drain(..) {
            match message {
                message @ (Message::Request(..) | Message::RecordedRefund(..)) => {
                    let (request, recorded, reply_to) = match message {
                        Message::Request(request, to) => (request, None, to),
                        Message::RecordedRefund(request, charge, to) => (request, Some(charge), to),
                        _ => unreachable!("matched above"),
                    };
                    if !fits[requests] {
                        requests += 1;
                        let _ = reply_to.send(Err(CallError::TooLarge));
                        continue;
                    }
                    requests += 1;
                    lsn += 1;
                    self.wrote(&request, lsn, now);
                    let reply = match recorded {
                        Some(charge) => self.engine.handle_recorded_refund(now, &request, &charge),
                        None => self.engine.handle_request(now, &request),
                    };
                    self.drain_effects(lsn, now, Some(request), &mut effects);
                    ready.push(Ready::Reply(reply_to, reply));
                }
                Message::Batch(batch_requests, reply_to) => {
                    let mut replies = Vec::with_capacity(batch_requests.len());
                    for request in batch_requests {
                        if !fits[requests] {
                            requests += 1;
                            replies.push(Err(CallError::TooLarge));
                            continue;
                        }
                        requests += 1;
                        lsn += 1;
                        self.wrote(&request, lsn, now);
                        replies.push(Ok(self.engine.handle_request(now, &request)));
                        self.drain_effects(lsn, now, Some(request), &mut effects);
                    }
                    ready.push(Ready::Batch(reply_to, replies));
                }
                Message::Query(query, answer_to) => {
                    let answer = self.engine.query(&query);
                    if self.durable_for(&query) {
                        // Nothing it reads can still be lost: no need to wait for the sync of
                        // what this batch and the ones before it wrote to other wallets.
                        self.metrics.reads_early.increment(1);
                        self.reads_early.fetch_add(1, Ordering::Relaxed);
                        let _ = answer_to.send(Ok(answer));
                    } else {
                        ready.push(Ready::Answer(answer_to, Box::new(answer)));
                    }
                }
                Message::ListWallets {
                    from,
                    limit,
                    filter,
                    to,
                } => {
                    let page = self.engine.list_wallets(from, limit as usize, &filter);
                    ready.push(Ready::Page(to, page));
                }
                Message::Checkpoint(to) => checkpoint_requests.push(to),
                Message::Stop => stop = true,
            }
        }
        debug_assert_eq!(lsn, end_lsn);
        self.applied_lsn = end_lsn;
        self.records_since_checkpoint += logged;
        self.metrics.records.increment(logged);
        self.metrics.holds_open.set(self.engine.holds_open() as f64);
        self.metrics
            .idempotency_ids
            .set(self.engine.state().requests.len() as f64);
        self.metrics
            .idempotency_evicted
            .set(self.engine.idempotency_evicted() as f64);
        self.park(end_lsn, ready, effects);
        if !checkpoint_requests.is_empty() {
            // A checkpoint needs a durable state: wait for this batch first.
            self.wait_durable()?;
            match self.writing.as_mut() {
                // One is being written already: its requesters get the next one.
                Some(_) => self.checkpoint_queue.extend(checkpoint_requests),
                None => self.start_checkpoint(checkpoint_requests),
            }
        }
        Ok(stop)
    }

    /// Notes that `request`, logged at `lsn`, is being applied at `now`.
    fn wrote(&mut self, request: &Request, lsn: u64, now: Timestamp) {
        // Timers due by `now` fire first (expiries, holds), in any wallet.
        if self.engine.poll_timeout().is_some_and(|at| at <= now) {
            self.written_all = lsn;
        }
        match request.command.wallet() {
            Some(wallet) => self.written[written_bucket(wallet)] = lsn,
            None => self.written_all = lsn,
        }
    }

    /// Whether everything `query` reads is durable already: a read of one wallet whose last
    /// write (and the last input that touches every wallet) is durable.
    fn durable_for(&self, query: &Query) -> bool {
        let wallet = match query {
            Query::Wallet { wallet } | Query::Balance { wallet, .. } => wallet,
            _ => return false,
        };
        let durable = self.wal.durable_lsn();
        self.written[written_bucket(wallet)] <= durable && self.written_all <= durable
    }

    /// Logs a tick and fires due timers.
    fn tick(&mut self) -> Result<(), CallError> {
        self.log_input(LogEntry::Tick)
    }

    /// Tags the effects of the input at `lsn`; they share its request (moved into one `Arc`,
    /// only if there is an effect) for the sinks that need what effects do not carry.
    fn drain_effects(
        &mut self,
        lsn: u64,
        at: Timestamp,
        request: Option<Request>,
        effects: &mut Vec<Tagged>,
    ) {
        let mut index = 0;
        let mut request = request;
        let mut cause: Option<Arc<Request>> = None;
        while let Some(effect) = self.engine.poll_effect() {
            if cause.is_none() {
                cause = request.take().map(Arc::new);
            }
            effects.push(Tagged {
                shard: self.index,
                lsn,
                index,
                applied_at: at,
                effect,
                cause: cause.clone(),
            });
            index += 1;
        }
    }

    fn park(&mut self, end_lsn: u64, ready: Vec<Ready>, effects: Vec<Tagged>) {
        self.pending.push_back(Pending {
            end_lsn,
            ready,
            effects,
        });
        // Nothing earlier is waiting and this is already durable (e.g. a batch of queries):
        // release now rather than wait for a sync that nobody will request.
        if self.pending.len() == 1 && end_lsn <= self.wal.durable_lsn() {
            let durable = self.wal.durable_lsn();
            // Cannot fail for lack of a sync; only the outbound queue can be gone.
            if self.release(durable).is_err() {
                self.pending.clear();
            }
        }
    }

    /// Releases every parked batch that is now durable.
    fn release(&mut self, durable: u64) -> Result<(), CallError> {
        self.metrics.durable_lsn.set(durable as f64);
        while self.pending.front().is_some_and(|p| p.end_lsn <= durable) {
            let Pending { ready, effects, .. } = self.pending.pop_front().expect("checked");
            if !effects.is_empty() {
                self.outbound
                    .send(effects)
                    .map_err(|_| CallError::Poisoned("the outbound queue stopped".into()))?;
            }
            for r in ready {
                match r {
                    Ready::Reply(to, reply) => {
                        let _ = to.send(Ok(reply));
                    }
                    Ready::Batch(to, replies) => {
                        let _ = to.send(Ok(replies));
                    }
                    Ready::Answer(to, answer) => {
                        let _ = to.send(Ok(*answer));
                    }
                    Ready::Page(to, page) => {
                        let _ = to.send(Ok(page));
                    }
                }
            }
        }
        Ok(())
    }

    /// Syncs inline and releases everything (used before checkpoints).
    fn wait_durable(&mut self) -> Result<(), CallError> {
        let durable = self
            .wal
            .commit()
            .map_err(|e| CallError::Poisoned(e.to_string()))?;
        self.release(durable)
    }

    fn checkpoint_due(&self) -> bool {
        let by_count = self.options.snapshot_every_records > 0
            && self.records_since_checkpoint >= self.options.snapshot_every_records;
        let by_time = !self.options.snapshot_every.is_zero()
            && self.records_since_checkpoint > 0
            && self.last_checkpoint.elapsed() >= self.options.snapshot_every;
        by_count || by_time
    }

    /// Starts writing a checkpoint of the current (durable) state: the loop stalls only to copy
    /// the state; hashing, encoding, writing and syncing run on a thread of their own.
    fn start_checkpoint(&mut self, waiters: Vec<CheckpointTo>) {
        let started = Instant::now();
        let at = self.now();
        let lsn = self.applied_lsn;
        let state = self.engine.state().clone();
        let stall_us = started.elapsed().as_micros() as u64;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let checkpoints = Arc::clone(&self.checkpoints);
        let outbound = self.outbound.clone();
        let shard = self.index;
        std::thread::Builder::new()
            .name(format!("tally-checkpoint-{shard}"))
            .spawn(move || {
                let digest = tally_engine::digest_state(&state);
                // Recovery replays only above the checkpoint, so every effect at or below `lsn`
                // must be durable in the sinks before the checkpoint is: every such effect was
                // queued for the outbound thread before this thread started (the shard releases
                // effects in LSN order and only checkpoints with nothing parked), so one flush
                // behind them is the barrier.
                let result = outbound
                    .flush()
                    .and_then(|()| checkpoints.write(shard, lsn, at, &state))
                    .map(|keep| (keep, digest));
                let _ = tx.send(result);
            })
            .expect("spawning a checkpoint writer");
        self.records_since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        self.writing = Some(Writing {
            done: rx,
            lsn,
            stall_us,
            started,
            waiters,
        });
    }

    /// A checkpoint finished: delete the WAL no kept checkpoint needs and answer its waiters. A
    /// failed write loses nothing (the WAL stays); it is reported and retried at the next turn.
    fn checkpoint_written(
        &mut self,
        writing: Writing,
        result: Result<(u64, u64), String>,
    ) -> Result<(), CallError> {
        let answer = match result {
            Ok((keep_from, digest)) => {
                let deleted = self
                    .wal
                    .delete_below(keep_from)
                    .map_err(|e| CallError::Poisoned(e.to_string()))?;
                tracing::info!(
                    shard = self.index,
                    lsn = writing.lsn,
                    stall_us = writing.stall_us,
                    wal_segments_deleted = deleted,
                    "checkpoint written"
                );
                metrics::gauge!("tally_checkpoint_last_timestamp_seconds", "shard" => self.index.to_string())
                    .set(std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64()));
                metrics::histogram!("tally_checkpoint_duration_seconds", "shard" => self.index.to_string())
                    .record(writing.started.elapsed().as_secs_f64());
                Ok(CheckpointReport {
                    lsn: writing.lsn,
                    digest,
                    stall_us: writing.stall_us,
                })
            }
            Err(why) => {
                tracing::error!(
                    shard = self.index,
                    lsn = writing.lsn,
                    "checkpoint failed: {why}"
                );
                Err(CallError::Checkpoint(why))
            }
        };
        for to in writing.waiters {
            let _ = to.send(answer.clone());
        }
        if !self.checkpoint_queue.is_empty() {
            // Like any checkpoint, it needs every effect at or below its LSN queued for the sinks
            // first (its flush barrier covers only those): make the batches since durable and
            // release them.
            self.wait_durable()?;
            let waiters = std::mem::take(&mut self.checkpoint_queue);
            self.start_checkpoint(waiters);
        }
        Ok(())
    }

    fn fail_all(&mut self, error: CallError) {
        let waiting = self.writing.take().map(|w| w.waiters).unwrap_or_default();
        for to in waiting.into_iter().chain(self.checkpoint_queue.drain(..)) {
            let _ = to.send(Err(error.clone()));
        }
        for pending in self.pending.drain(..) {
            for r in pending.ready {
                match r {
                    Ready::Reply(to, _) => {
                        let _ = to.send(Err(error.clone()));
                    }
                    Ready::Batch(to, _) => {
                        let _ = to.send(Err(error.clone()));
                    }
                    Ready::Answer(to, _) => {
                        let _ = to.send(Err(error.clone()));
                    }
                    Ready::Page(to, _) => {
                        let _ = to.send(Err(error.clone()));
                    }
                }
            }
        }
        while let Ok(message) = self.inbound.try_recv() {
            self.queued.fetch_sub(message.items(), Ordering::AcqRel);
            match message {
                Message::Request(_, to) | Message::RecordedRefund(_, _, to) => {
                    let _ = to.send(Err(error.clone()));
                }
                Message::Batch(_, to) => {
                    let _ = to.send(Err(error.clone()));
                }
                Message::Query(_, to) => {
                    let _ = to.send(Err(error.clone()));
                }
                Message::ListWallets { to, .. } => {
                    let _ = to.send(Err(error.clone()));
                }
                Message::Checkpoint(to) => {
                    let _ = to.send(Err(error.clone()));
                }
                Message::Stop => {}
            }
        }
    }
}
