//! [`Handle`]: how in-process callers (the network layer, benchmarks, tests) reach the shards.
//!
//! Wallet commands and queries go to the wallet's shard (`tally_engine::shard_for`). Catalog
//! commands (assets, products, plans) go to every shard, one at a time under a lock, so that all
//! shards see them in the same order and a usage event never meets a plan version its shard has
//! not seen. A full inbound queue answers [`CallError::Busy`] instead of growing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tally_engine::{
    shard_for, Margin, MarginScope, Query, QueryReply, Reply, Request, ResultCode, Usd,
    WalletFilter, WalletId, WalletPage,
};
use tokio::sync::oneshot::{self, Receiver};

use crate::shard::{CallError, CheckpointReport, Inbound, Message, Refused};

/// A cloneable entry point to all shards.
#[derive(Clone, Debug)]
pub struct Handle {
    shards: Arc<[Inbound]>,
    broadcast: Arc<Mutex<()>>,
    /// Per shard: whether its loop is still running (cleared when the thread ends).
    alive: Arc<[AtomicBool]>,
    /// How far each effect sink (and the PostgreSQL export) is behind.
    lags: Arc<[Arc<tally_outbound::Lag>]>,
    /// Where catalog commands are recorded before their broadcast (`crate::catalog`).
    data_dir: Option<Arc<std::path::Path>>,
    /// A catalog broadcast failed part way: no other is sent (see [`Handle::call`]).
    catalog_failed: Arc<AtomicBool>,
}

/// A reply that will arrive once the request's batch is durable.
#[derive(Debug)]
pub struct PendingReply(Receiver<Result<Reply, CallError>>);

impl PendingReply {
    /// Waits for the reply, blocking the thread (never call this inside an async task; await
    /// the `PendingReply` instead).
    pub fn wait(self) -> Result<Reply, CallError> {
        self.0.blocking_recv().unwrap_or(Err(CallError::Stopped))
    }
}

impl Future for PendingReply {
    type Output = Result<Reply, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(CallError::Stopped)))
    }
}

/// What one shard answers for its part of a batch.
type BatchAnswer = Result<Vec<Result<Reply, CallError>>, CallError>;

/// The replies of a batch that will arrive once its requests are durable.
#[derive(Debug)]
pub struct PendingBatch {
    /// Per shard: the positions of its requests in the caller's batch, and its replies.
    parts: Vec<(Vec<usize>, Receiver<BatchAnswer>)>,
    /// Replies already known (catalog commands, which are applied one by one).
    done: Vec<(usize, Result<Reply, CallError>)>,
    len: usize,
}

impl PendingBatch {
    /// Waits for every reply, blocking the thread; they come back in the order of the submitted
    /// requests.
    pub fn wait(self) -> Vec<Result<Reply, CallError>> {
        let (mut replies, parts) = self.start();
        for (positions, rx) in parts {
            place(&mut replies, positions, rx.blocking_recv());
        }
        replies
    }

    /// Awaits every reply; they come back in the order of the submitted requests.
    pub async fn recv(self) -> Vec<Result<Reply, CallError>> {
        let (mut replies, parts) = self.start();
        for (positions, rx) in parts {
            place(&mut replies, positions, rx.await);
        }
        replies
    }

    #[allow(clippy::type_complexity)]
    fn start(
        self,
    ) -> (
        Vec<Result<Reply, CallError>>,
        Vec<(Vec<usize>, Receiver<BatchAnswer>)>,
    ) {
        let mut replies: Vec<Result<Reply, CallError>> = vec![Err(CallError::Stopped); self.len];
        for (position, reply) in self.done {
            replies[position] = reply;
        }
        (replies, self.parts)
    }
}

/// Puts one shard's answer to its part of a batch in place.
fn place<E>(
    replies: &mut [Result<Reply, CallError>],
    positions: Vec<usize>,
    answer: Result<BatchAnswer, E>,
) {
    match answer.unwrap_or(Err(CallError::Stopped)) {
        Ok(part) => {
            for (position, reply) in positions.into_iter().zip(part) {
                replies[position] = reply;
            }
        }
        Err(error) => {
            for position in positions {
                replies[position] = Err(error.clone());
            }
        }
    }
}

/// What a query is answered with.
pub type QueryAnswer = Result<Result<QueryReply, ResultCode>, CallError>;

/// A query's answer that will arrive.
#[derive(Debug)]
pub struct PendingQuery {
    parts: Vec<Receiver<QueryAnswer>>,
    /// Whether the parts are per-shard margins to merge.
    merge: bool,
}

impl PendingQuery {
    /// Waits for the answer, blocking the thread.
    pub fn wait(self) -> QueryAnswer {
        let answers = self
            .parts
            .into_iter()
            .map(|rx| rx.blocking_recv().unwrap_or(Err(CallError::Stopped)));
        Self::combine(self.merge, answers)
    }

    /// Awaits the answer.
    pub async fn recv(self) -> QueryAnswer {
        let mut answers = Vec::with_capacity(self.parts.len());
        for rx in self.parts {
            answers.push(rx.await.unwrap_or(Err(CallError::Stopped)));
        }
        Self::combine(self.merge, answers.into_iter())
    }

    fn combine(merge: bool, mut answers: impl Iterator<Item = QueryAnswer>) -> QueryAnswer {
        if !merge {
            return answers.next().unwrap_or(Err(CallError::Stopped));
        }
        let mut total = Margin::default();
        for answer in answers {
            if let Err(code) = merge_margin(&mut total, answer?) {
                return Ok(Err(code));
            }
        }
        Ok(Ok(QueryReply::Margin(total.into())))
    }
}

impl Handle {
    /// Queues many requests at once (e.g. a batch frame of usage events): one message per
    /// shard, one group commit for all of it. Catalog commands in the batch are applied one by
    /// one, in order, before it is queued. All or nothing per shard when a queue is full.
    pub fn submit_batch(&self, requests: Vec<Request>) -> Result<PendingBatch, CallError> {
        let len = requests.len();
        let mut per_shard: Vec<(Vec<usize>, Vec<Request>)> = (0..self.shards.len())
            .map(|_| (Vec::new(), Vec::new()))
            .collect();
        let mut done = Vec::new();
        for (position, request) in requests.into_iter().enumerate() {
            match request.command.wallet().copied() {
                Some(wallet) => {
                    let shard = shard_for(&wallet, self.shard_count()) as usize;
                    per_shard[shard].0.push(position);
                    per_shard[shard].1.push(request);
                }
                None => done.push((position, self.call(request))),
            }
        }
        if per_shard
            .iter()
            .any(|(_, r)| r.len() > crate::shard::BATCH_ITEMS_MAX)
        {
            return Err(CallError::TooLarge);
        }
        let mut parts = Vec::new();
        for (shard, (positions, requests)) in per_shard.into_iter().enumerate() {
            if requests.is_empty() {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            match self.shards[shard].try_send(Message::Batch(requests, tx)) {
                Ok(()) => parts.push((positions, rx)),
                Err(Refused::Full) => {
                    for position in positions {
                        done.push((position, Err(CallError::Busy)));
                    }
                }
                Err(Refused::Stopped) => return Err(CallError::Stopped),
            }
        }
        Ok(PendingBatch { parts, done, len })
    }

    pub(crate) fn new(
        shards: Vec<Inbound>,
        alive: Arc<[AtomicBool]>,
        lags: Arc<[Arc<tally_outbound::Lag>]>,
    ) -> Handle {
        Handle {
            shards: shards.into(),
            broadcast: Arc::new(Mutex::new(())),
            alive,
            lags,
            data_dir: None,
            catalog_failed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Records catalog commands in `data_dir` before their broadcast (`crate::catalog`).
    pub(crate) fn recording_catalog_in(mut self, data_dir: &std::path::Path) -> Handle {
        self.data_dir = Some(Arc::from(data_dir));
        self
    }

    /// Each sink's name and how far it is behind: `(name, effects, microseconds)`.
    pub fn sink_lags(&self) -> Vec<(&'static str, u64, u64)> {
        self.lags
            .iter()
            .map(|l| {
                let (effects, micros) = l.get();
                (l.name, effects, micros)
            })
            .collect()
    }

    /// How many shard loops are running (a poisoned or stopped shard's loop has ended).
    pub fn shards_running(&self) -> u32 {
        self.alive
            .iter()
            .filter(|a| a.load(Ordering::Acquire))
            .count() as u32
    }

    /// The number of shards.
    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    fn shard(&self, wallet: &WalletId) -> &Inbound {
        &self.shards[shard_for(wallet, self.shard_count()) as usize]
    }

    /// Queues a request without waiting for it (catalog commands wait for their broadcast).
    pub fn submit(&self, request: Request) -> Result<PendingReply, CallError> {
        let Some(wallet) = request.command.wallet().copied() else {
            // Catalog commands take the ordered broadcast, which waits for every shard.
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(self.call(request));
            return Ok(PendingReply(rx));
        };
        let (tx, rx) = oneshot::channel();
        match self.shard(&wallet).try_send(Message::Request(request, tx)) {
            Ok(()) => Ok(PendingReply(rx)),
            Err(Refused::Full) => Err(CallError::Busy),
            Err(Refused::Stopped) => Err(CallError::Stopped),
        }
    }

    /// Queues a refund with the charge the history store recorded for its event (see
    /// `Engine::handle_recorded_refund`); like [`Handle::submit`].
    pub fn submit_recorded_refund(
        &self,
        request: Request,
        charge: tally_engine::RecordedCharge,
    ) -> Result<PendingReply, CallError> {
        let Some(wallet) = request.command.wallet().copied() else {
            return self.submit(request);
        };
        let (tx, rx) = oneshot::channel();
        let message = Message::RecordedRefund(request, Box::new(charge), tx);
        match self.shard(&wallet).try_send(message) {
            Ok(()) => Ok(PendingReply(rx)),
            Err(Refused::Full) => Err(CallError::Busy),
            Err(Refused::Stopped) => Err(CallError::Stopped),
        }
    }

    /// Applies a request and waits for its durable reply.
    pub fn call(&self, request: Request) -> Result<Reply, CallError> {
        if request.command.wallet().is_some() {
            return self.submit(request)?.wait();
        }
        // A poisoned lock only means another broadcaster panicked; the order is still ours.
        let _order = self.broadcast.lock().unwrap_or_else(|e| e.into_inner());
        // Only the last catalog command may have reached some shards and not others (the next
        // start gives it to the rest): after a broadcast failed part way, or with a shard
        // stopped, no other is sent.
        if self.catalog_failed.load(Ordering::Acquire) || self.shards_running() < self.shard_count()
        {
            return Err(CallError::Catalog(
                "a shard has stopped, or an earlier catalog command reached only some shards; \
                 restart the server (the start gives that command to the shards that missed it)"
                    .into(),
            ));
        }
        // Recorded first, so that a crash between two shards leaves the shards behind a command
        // the next start can give them (`crate::catalog`).
        if let Some(dir) = &self.data_dir {
            crate::catalog::record(dir, &request).map_err(|e| {
                CallError::Catalog(format!(
                    "cannot record it in {}: {e}",
                    dir.join(crate::catalog::FILE).display()
                ))
            })?;
        }
        let failed = |e: CallError| {
            self.catalog_failed.store(true, Ordering::Release);
            e
        };
        let mut waiting = Vec::with_capacity(self.shards.len());
        for shard in self.shards.iter() {
            let (tx, rx) = oneshot::channel();
            // Blocking send: a broadcast must reach every shard, or the catalogs would differ.
            shard
                .send(Message::Request(request.clone(), tx))
                .map_err(|_| failed(CallError::Stopped))?;
            waiting.push(rx);
        }
        let mut first: Option<Reply> = None;
        for (shard, rx) in waiting.into_iter().enumerate() {
            let reply = rx
                .blocking_recv()
                .unwrap_or(Err(CallError::Stopped))
                .map_err(failed)?;
            match &first {
                None => first = Some(reply),
                // Shards may remember different request ids (each table is bounded on its
                // own), so a retry can be a repeat on one shard and a refusal on another. The
                // catalogs stay equal; the first shard's answer stands.
                Some(f) if f.code != reply.code => tracing::warn!(
                    shard,
                    first = ?f.code,
                    this = ?reply.code,
                    "shards answered a catalog command differently"
                ),
                Some(_) => {}
            }
        }
        first.ok_or(CallError::Stopped)
    }

    /// Answers a query from the shard that owns its wallet (or shard 0 for catalog questions;
    /// shard-wide margins are merged over all shards), blocking the thread.
    pub fn query(&self, query: Query) -> QueryAnswer {
        self.submit_query(query)?.wait()
    }

    /// Queues a query now (so it sees every request queued before it) without waiting.
    pub fn submit_query(&self, query: Query) -> Result<PendingQuery, CallError> {
        match self.query_route(&query) {
            Some(shard) => Ok(PendingQuery {
                parts: vec![Self::ask(shard, query)?],
                merge: false,
            }),
            None => Ok(PendingQuery {
                parts: self
                    .shards
                    .iter()
                    .map(|shard| Self::ask(shard, query.clone()))
                    .collect::<Result<_, _>>()?,
                merge: true,
            }),
        }
    }

    /// The shard that answers `query`, or `None` for shard-wide margins (merged over all).
    fn query_route(&self, query: &Query) -> Option<&Inbound> {
        Some(match query {
            Query::Wallet { wallet } | Query::Balance { wallet, .. } => self.shard(wallet),
            Query::PricePreview(event) => self.shard(&event.wallet),
            Query::Margin(MarginScope::Wallet(wallet)) => self.shard(wallet),
            Query::Margin(_) => return None,
            Query::DraftTest { .. } | Query::Asset { .. } | Query::Plans => &self.shards[0],
        })
    }

    fn ask(shard: &Inbound, query: Query) -> Result<Receiver<QueryAnswer>, CallError> {
        let (tx, rx) = oneshot::channel();
        match shard.try_send(Message::Query(query, tx)) {
            Ok(()) => Ok(rx),
            Err(Refused::Full) => Err(CallError::Busy),
            Err(Refused::Stopped) => Err(CallError::Stopped),
        }
    }

    /// Queues a listing of one page of `shard`'s wallets (see `tally_engine::Engine::list_wallets`)
    /// without waiting: it sees every request queued before it and is answered, like a query,
    /// only once the writes before it are durable. A full queue is [`CallError::Busy`], a
    /// stopped shard [`CallError::Stopped`].
    ///
    /// `shard` must be below [`Handle::shard_count`]; callers taking it from outside validate it
    /// first (the network backend answers `Malformed`). A shard that does not exist has no
    /// wallets: it gets an empty last page (`next` is `None`) at once, rather than a panic.
    pub fn submit_list_wallets(
        &self,
        shard: u32,
        from: u32,
        limit: u32,
        filter: WalletFilter,
    ) -> Result<Receiver<Result<WalletPage, CallError>>, CallError> {
        let (to, rx) = oneshot::channel();
        let Some(shard) = self.shards.get(shard as usize) else {
            let _ = to.send(Ok(WalletPage {
                wallets: Vec::new(),
                next: None,
            }));
            return Ok(rx);
        };
        let message = Message::ListWallets {
            from,
            limit,
            filter,
            to,
        };
        match shard.try_send(message) {
            Ok(()) => Ok(rx),
            Err(Refused::Full) => Err(CallError::Busy),
            Err(Refused::Stopped) => Err(CallError::Stopped),
        }
    }

    /// Takes a checkpoint of every shard now and waits until each is written.
    pub fn checkpoint(&self) -> Result<Vec<CheckpointReport>, CallError> {
        let mut waiting = Vec::new();
        for shard in self.shards.iter() {
            let (tx, rx) = oneshot::channel();
            shard
                .send(Message::Checkpoint(tx))
                .map_err(|_| CallError::Stopped)?;
            waiting.push(rx);
        }
        waiting
            .into_iter()
            .map(|rx| rx.blocking_recv().unwrap_or(Err(CallError::Stopped)))
            .collect()
    }

    pub(crate) fn stop(&self) {
        for shard in self.shards.iter() {
            let _ = shard.send(Message::Stop);
        }
    }
}

/// Adds one shard's margin answer to `total`.
fn merge_margin(
    total: &mut Margin,
    answer: Result<QueryReply, ResultCode>,
) -> Result<(), ResultCode> {
    match answer? {
        QueryReply::Margin(m) => {
            total.merge(&Margin {
                events: m.events,
                revenue_usd: Usd::of(m.revenue_usd),
                cost_usd: Usd::of(m.cost_usd),
                refunded_usd: Usd::of(m.refunded_usd),
            });
            Ok(())
        }
        other => unreachable!("a margin query answered {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::queue;
    use tally_engine::{Command, RequestId};

    fn freeze(id: u128, wallet: &WalletId) -> Request {
        Request {
            id: RequestId(id),
            command: Command::Freeze { wallet: *wallet },
        }
    }

    #[test]
    fn shard_queues_are_bounded_in_items_not_messages() {
        let (inbound, rx, queued) = queue(10);
        let handle = Handle::new(
            vec![inbound],
            Arc::from(vec![AtomicBool::new(true)]),
            Arc::from(Vec::new()),
        );
        let wallet: WalletId = "w".parse().unwrap();
        let batch = |from: u128, n: u128| (from..from + n).map(|i| freeze(i, &wallet)).collect();
        // A batch of 8 fits an empty queue of 10; a second batch of 8 would make 16: busy, all of
        // it, though it is one message where a message-bounded queue would take it.
        let first = handle.submit_batch(batch(0, 8)).unwrap();
        assert_eq!(queued.load(Ordering::Acquire), 8);
        let second = handle.submit_batch(batch(100, 8)).unwrap().wait();
        assert!(
            second.iter().all(|r| r == &Err(CallError::Busy)),
            "{second:?}"
        );
        // Single requests fill what is left, then are busy too.
        let _a = handle.submit(freeze(200, &wallet)).unwrap();
        let _b = handle.submit(freeze(201, &wallet)).unwrap();
        assert_eq!(
            handle.submit(freeze(202, &wallet)).unwrap_err(),
            CallError::Busy
        );
        assert_eq!(queued.load(Ordering::Acquire), 10);
        // The shard takes the batch (as its loop does: it subtracts the items it takes), and
        // there is room again; a batch larger than the bound fits only an empty queue.
        let taken = rx.try_recv().unwrap();
        queued.fetch_sub(taken.items(), Ordering::AcqRel);
        assert!(handle.submit(freeze(203, &wallet)).is_ok());
        assert!(handle
            .submit_batch(batch(300, 12))
            .unwrap()
            .wait()
            .iter()
            .all(|r| r == &Err(CallError::Busy)));
        while let Ok(message) = rx.try_recv() {
            queued.fetch_sub(message.items(), Ordering::AcqRel);
        }
        assert_eq!(queued.load(Ordering::Acquire), 0);
        let big = handle.submit_batch(batch(400, 12)).unwrap();
        assert_eq!(queued.load(Ordering::Acquire), 12);
        drop((first, big, taken));
    }
}
