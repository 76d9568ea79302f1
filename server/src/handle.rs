//! [`Handle`]: how in-process callers (the network layer, benchmarks, tests) reach the shards.
//!
//! Wallet commands and queries go to the wallet's shard (`tally_engine::shard_for`). Catalog
//! commands (assets, products, plans) go to every shard, one at a time under a lock, so that all
//! shards see them in the same order and a usage event never meets a plan version its shard has
//! not seen. A full inbound queue answers [`CallError::Busy`] instead of growing.

use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tally_engine::{
    shard_for, Margin, MarginScope, Query, QueryReply, Reply, Request, ResultCode, WalletId,
};

use crate::shard::{CallError, CheckpointReport, Message};

/// A cloneable entry point to all shards.
#[derive(Clone, Debug)]
pub struct Handle {
    shards: Arc<[Sender<Message>]>,
    broadcast: Arc<Mutex<()>>,
}

/// A reply that will arrive once the request's batch is durable.
#[derive(Debug)]
pub struct PendingReply(Receiver<Result<Reply, CallError>>);

impl PendingReply {
    /// Waits for the reply.
    pub fn wait(self) -> Result<Reply, CallError> {
        self.0.recv().unwrap_or(Err(CallError::Stopped))
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
    /// Waits for every reply; they come back in the order of the submitted requests.
    pub fn wait(self) -> Vec<Result<Reply, CallError>> {
        let mut replies: Vec<Result<Reply, CallError>> = vec![Err(CallError::Stopped); self.len];
        for (position, reply) in self.done {
            replies[position] = reply;
        }
        for (positions, rx) in self.parts {
            match rx.recv().unwrap_or(Err(CallError::Stopped)) {
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
        replies
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
            let (tx, rx) = crossbeam_channel::bounded(1);
            match self.shards[shard].try_send(Message::Batch(requests, tx)) {
                Ok(()) => parts.push((positions, rx)),
                Err(TrySendError::Full(_)) => {
                    for position in positions {
                        done.push((position, Err(CallError::Busy)));
                    }
                }
                Err(TrySendError::Disconnected(_)) => return Err(CallError::Stopped),
            }
        }
        Ok(PendingBatch { parts, done, len })
    }

    pub(crate) fn new(shards: Vec<Sender<Message>>) -> Handle {
        Handle {
            shards: shards.into(),
            broadcast: Arc::new(Mutex::new(())),
        }
    }

    /// The number of shards.
    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    fn shard(&self, wallet: &WalletId) -> &Sender<Message> {
        &self.shards[shard_for(wallet, self.shard_count()) as usize]
    }

    /// Queues a request without waiting for it (catalog commands wait for their broadcast).
    pub fn submit(&self, request: Request) -> Result<PendingReply, CallError> {
        let Some(wallet) = request.command.wallet().copied() else {
            // Catalog commands take the ordered broadcast, which waits for every shard.
            let (tx, rx) = crossbeam_channel::bounded(1);
            let _ = tx.send(self.call(request));
            return Ok(PendingReply(rx));
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        match self.shard(&wallet).try_send(Message::Request(request, tx)) {
            Ok(()) => Ok(PendingReply(rx)),
            Err(TrySendError::Full(_)) => Err(CallError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(CallError::Stopped),
        }
    }

    /// Applies a request and waits for its durable reply.
    pub fn call(&self, request: Request) -> Result<Reply, CallError> {
        if request.command.wallet().is_some() {
            return self.submit(request)?.wait();
        }
        // A poisoned lock only means another broadcaster panicked; the order is still ours.
        let _order = self.broadcast.lock().unwrap_or_else(|e| e.into_inner());
        let mut waiting = Vec::with_capacity(self.shards.len());
        for shard in self.shards.iter() {
            let (tx, rx) = crossbeam_channel::bounded(1);
            // Blocking send: a broadcast must reach every shard, or the catalogs would differ.
            shard
                .send(Message::Request(request.clone(), tx))
                .map_err(|_| CallError::Stopped)?;
            waiting.push(rx);
        }
        let mut first = None;
        for rx in waiting {
            let reply = rx.recv().unwrap_or(Err(CallError::Stopped))?;
            match first {
                None => first = Some(reply),
                Some(f) => assert_eq!(f.code, reply.code, "shards disagree on a catalog command"),
            }
        }
        first.ok_or(CallError::Stopped)
    }

    /// Answers a query from the shard that owns its wallet (or shard 0 for catalog questions).
    pub fn query(&self, query: Query) -> Result<Result<QueryReply, ResultCode>, CallError> {
        let shard = match &query {
            Query::Wallet { wallet } | Query::Balance { wallet, .. } => self.shard(wallet),
            Query::PricePreview(event) => self.shard(&event.wallet),
            Query::Margin(MarginScope::Wallet(wallet)) => self.shard(wallet),
            Query::Margin(_) => return self.margin(query).map(|m| m.map(QueryReply::Margin)),
            Query::DraftTest { .. } => &self.shards[0],
        };
        Self::ask(shard, query)
    }

    fn ask(
        shard: &Sender<Message>,
        query: Query,
    ) -> Result<Result<QueryReply, ResultCode>, CallError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        match shard.try_send(Message::Query(query, tx)) {
            Ok(()) => rx.recv().unwrap_or(Err(CallError::Stopped)),
            Err(TrySendError::Full(_)) => Err(CallError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(CallError::Stopped),
        }
    }

    /// Shard-wide margin scopes, merged over all shards.
    fn margin(
        &self,
        query: Query,
    ) -> Result<Result<tally_engine::MarginView, ResultCode>, CallError> {
        let mut total = Margin::default();
        for shard in self.shards.iter() {
            match Self::ask(shard, query.clone())? {
                Ok(QueryReply::Margin(m)) => total.merge(&Margin {
                    events: m.events,
                    revenue_usd: m.revenue_usd,
                    cost_usd: m.cost_usd,
                    refunded_usd: m.refunded_usd,
                }),
                Ok(other) => unreachable!("a margin query answered {other:?}"),
                Err(code) => return Ok(Err(code)),
            }
        }
        Ok(Ok(total.into()))
    }

    /// Takes a checkpoint of every shard now and waits until each is written.
    pub fn checkpoint(&self) -> Result<Vec<CheckpointReport>, CallError> {
        let mut waiting = Vec::new();
        for shard in self.shards.iter() {
            let (tx, rx) = crossbeam_channel::bounded(1);
            shard
                .send(Message::Checkpoint(tx))
                .map_err(|_| CallError::Stopped)?;
            waiting.push(rx);
        }
        waiting
            .into_iter()
            .map(|rx| rx.recv().unwrap_or(Err(CallError::Stopped)))
            .collect()
    }

    pub(crate) fn stop(&self) {
        for shard in self.shards.iter() {
            let _ = shard.send(Message::Stop);
        }
    }
}
