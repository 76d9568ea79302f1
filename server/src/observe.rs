//! Metrics of the durable core and of every transport, through the `metrics` facade (the binary
//! installs the Prometheus recorder; without one every call is a no-op).
//!
//! - [`Counted`] wraps the [`Backend`] each front uses: requests by transport, operation (the
//!   protocol's kind name, e.g. `Usage`) and result code, and their latency. HTTP and QUIC both
//!   go through it, so the two transports are counted the same way.
//! - [`ShardMetrics`] holds one shard loop's handles, registered once (recording is an atomic
//!   operation, nothing is allocated per batch): inbound queue depth, batch size, WAL sync
//!   latency, durable LSN, open holds.
//! - The outbound thread (`tally-outbound`) counts what its sinks newly wrote: debits and
//!   amounts by asset, top-ups requested, journal entries, and its own lag.
//!
//! Names follow Prometheus conventions: `_total` counters, `_seconds` and `_bytes` units.

use std::sync::Arc;
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram};
use tally_engine::{Query, QueryReply, Reply, Request, ResultCode, WalletFilter, WalletPage};
use tally_net::message::{command_kind, query_kind, CheckpointInfo};
use tally_net::{Backend, BoxFuture, ErrorCode, Outcome};

/// A [`Backend`] that counts what passes through it.
pub struct Counted {
    inner: Arc<dyn Backend>,
    transport: &'static str,
}

impl std::fmt::Debug for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl Counted {
    /// Counts `inner`'s traffic under `transport` (`quic`, `http`).
    pub fn new(inner: Arc<dyn Backend>, transport: &'static str) -> Counted {
        Counted { inner, transport }
    }
}

fn record(transport: &'static str, operation: &'static str, code: u16, started: Instant) {
    record_many(transport, operation, code, 1, started);
}

/// Counts `n` requests of one operation and code that were answered together, each with the
/// same latency.
fn record_many(
    transport: &'static str,
    operation: &'static str,
    code: u16,
    n: u64,
    started: Instant,
) {
    metrics::counter!("tally_requests_total", "transport" => transport, "operation" => operation, "code" => code.to_string())
        .increment(n);
    metrics::histogram!("tally_request_duration_seconds", "transport" => transport, "operation" => operation)
        .record_many(started.elapsed().as_secs_f64(), n as usize);
}

fn outcome_code(outcome: &Outcome) -> u16 {
    match outcome {
        Ok(reply) => reply.code as u16,
        Err(code) => *code as u16,
    }
}

impl Backend for Counted {
    fn command(&self, request: Request) -> BoxFuture<Result<Reply, ErrorCode>> {
        let operation = command_kind(&request.command).name();
        let transport = self.transport;
        let started = Instant::now();
        let pending = self.inner.command(request);
        Box::pin(async move {
            let outcome = pending.await;
            record(transport, operation, outcome_code(&outcome), started);
            outcome
        })
    }

    fn batch(&self, requests: Vec<Request>) -> BoxFuture<Result<Vec<Outcome>, ErrorCode>> {
        let operations: Vec<&'static str> = requests
            .iter()
            .map(|r| command_kind(&r.command).name())
            .collect();
        let transport = self.transport;
        let started = Instant::now();
        let pending = self.inner.batch(requests);
        Box::pin(async move {
            let outcomes = pending.await;
            // One metric update per (operation, code) of the batch, not one per item.
            let mut counts = std::collections::BTreeMap::<(&'static str, u16), u64>::new();
            match &outcomes {
                Ok(items) => {
                    for (operation, outcome) in operations.iter().zip(items) {
                        *counts
                            .entry((operation, outcome_code(outcome)))
                            .or_default() += 1;
                    }
                }
                Err(code) => {
                    for operation in &operations {
                        *counts.entry((operation, *code as u16)).or_default() += 1;
                    }
                }
            }
            for ((operation, code), n) in counts {
                record_many(transport, operation, code, n, started);
            }
            outcomes
        })
    }

    fn query(&self, query: Query) -> BoxFuture<Result<Result<QueryReply, ResultCode>, ErrorCode>> {
        let operation = query_kind(&query).name();
        let transport = self.transport;
        let started = Instant::now();
        let pending = self.inner.query(query);
        Box::pin(async move {
            let answer = pending.await;
            let code = match &answer {
                Ok(Ok(_)) => 0,
                Ok(Err(code)) => *code as u16,
                Err(code) => *code as u16,
            };
            record(transport, operation, code, started);
            answer
        })
    }

    fn list_wallets(
        &self,
        shard: u32,
        from: u32,
        limit: u32,
        filter: WalletFilter,
    ) -> BoxFuture<Result<WalletPage, ErrorCode>> {
        let transport = self.transport;
        let started = Instant::now();
        let pending = self.inner.list_wallets(shard, from, limit, filter);
        Box::pin(async move {
            let page = pending.await;
            let code = page.as_ref().map_or_else(|c| *c as u16, |_| 0);
            record(transport, "ListWallets", code, started);
            page
        })
    }

    fn snapshot(&self) -> BoxFuture<Result<Vec<CheckpointInfo>, String>> {
        self.inner.snapshot()
    }

    fn shards(&self) -> (u32, u32) {
        self.inner.shards()
    }

    fn sinks(&self) -> Vec<tally_net::SinkLag> {
        self.inner.sinks()
    }
}

/// One shard loop's metric handles.
#[derive(Debug, Clone)]
pub struct ShardMetrics {
    /// Messages waiting in the inbound queue when a batch was taken.
    pub queue_depth: Gauge,
    /// Messages per batch.
    pub batch_size: Histogram,
    /// Seconds per WAL sync (group commit).
    pub sync_seconds: Histogram,
    /// The highest durable LSN.
    pub durable_lsn: Gauge,
    /// Open holds of the shard.
    pub holds_open: Gauge,
    /// WAL records appended.
    pub records: Counter,
    /// Request ids the shard remembers.
    pub idempotency_ids: Gauge,
    /// Request ids forgotten before their retention passed (the table was full).
    pub idempotency_evicted: Gauge,
    /// Reads of a wallet answered at once, their wallet's last write being durable already.
    pub reads_early: Counter,
}

impl ShardMetrics {
    /// Registers the handles of `shard`.
    pub fn new(shard: u32) -> ShardMetrics {
        let s = shard.to_string();
        ShardMetrics {
            queue_depth: metrics::gauge!("tally_shard_queue_depth", "shard" => s.clone()),
            batch_size: metrics::histogram!("tally_shard_batch_size", "shard" => s.clone()),
            sync_seconds: metrics::histogram!("tally_wal_sync_duration_seconds", "shard" => s.clone()),
            durable_lsn: metrics::gauge!("tally_wal_durable_lsn", "shard" => s.clone()),
            holds_open: metrics::gauge!("tally_holds_open", "shard" => s.clone()),
            records: metrics::counter!("tally_wal_records_total", "shard" => s.clone()),
            idempotency_ids: metrics::gauge!("tally_idempotency_ids", "shard" => s.clone()),
            idempotency_evicted: metrics::gauge!(
                "tally_idempotency_evicted_total",
                "shard" => s.clone()
            ),
            reads_early: metrics::counter!("tally_reads_early_total", "shard" => s),
        }
    }
}
