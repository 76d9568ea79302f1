//! tally-loadtest: drives a running tally over QUIC with `tally-client`, the way gateways do.
//!
//! - **Open loop** (`rate: Some(r)`): requests are scheduled at fixed intended times
//!   (`start + i / r`), whatever the server does; each request's latency is measured from its
//!   intended send time, so a stall shows up in the latency of every request it delayed (no
//!   coordinated omission).
//! - **Closed loop** (`rate: None`): every connection keeps `in_flight` callers busy; the
//!   achieved rate is the maximum the server sustains at that concurrency.
//!
//! Workload: wallets picked uniformly, by a Zipf law, or from a hot set taking a share of
//! traffic; an operation mix of strict usage, record usage, reserve + settle, and balance reads;
//! `events_per_frame` > 1 sends usage as `UsageBatch` frames. [`prepare`] defines the catalog and
//! creates the wallets with a large grant each (idempotent: running it again changes nothing).
//! Latencies go into hdrhistogram; [`Report`] has the named fields of `--json`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rust_decimal::Decimal;
use serde::Serialize;
use tally_client::{Client, Error};
use tally_engine::{
    asset, name, Command, Component, CreateWallet, DebitMode, Grant, GrantSource, PriceModel,
    PriceRule, Quantity, Query, Request, RequestId, ReserveAmount, Rounding, Timestamp, UsageEvent,
    WalletId,
};
use tally_net::{Message, ReserveItem};

/// How wallets are picked for each operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Distribution {
    /// Every wallet equally.
    Uniform,
    /// Wallet of rank k with weight 1 / k^s.
    Zipf {
        /// The exponent.
        s: f64,
    },
    /// `share` of operations on the first `wallets` wallets, the rest uniform over all.
    Hot {
        /// How many hot wallets.
        wallets: usize,
        /// Their share of operations, 0 to 1.
        share: f64,
    },
}

/// Weights of the operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix {
    /// Strict usage debits.
    pub strict: u32,
    /// Record usage debits.
    pub record: u32,
    /// Reserve, then settle (one operation, two calls).
    pub reserve_settle: u32,
    /// Balance reads.
    pub balance: u32,
    /// Pings: answered by the server's network layer alone (no shard), the transport's ceiling.
    pub ping: u32,
}

impl Mix {
    /// Parses `strict=70,record=10,reserve=10,balance=10` (names may be omitted; weights are
    /// relative).
    pub fn parse(text: &str) -> Result<Mix, String> {
        let mut mix = Mix {
            strict: 0,
            record: 0,
            reserve_settle: 0,
            balance: 0,
            ping: 0,
        };
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("mix: {part:?} is not name=weight"))?;
            let weight: u32 = value
                .trim()
                .parse()
                .map_err(|_| format!("mix: {value:?} is not a whole number"))?;
            match key.trim() {
                "strict" => mix.strict = weight,
                "record" => mix.record = weight,
                "reserve" | "reserve_settle" => mix.reserve_settle = weight,
                "balance" => mix.balance = weight,
                "ping" => mix.ping = weight,
                other => {
                    return Err(format!(
                        "mix: unknown operation {other:?} (strict, record, reserve, balance, ping)"
                    ))
                }
            }
        }
        if mix.total() == 0 {
            return Err("mix: every weight is zero".into());
        }
        Ok(mix)
    }

    fn total(&self) -> u32 {
        self.strict + self.record + self.reserve_settle + self.balance + self.ping
    }

    fn pick(&self, roll: u64) -> Op {
        let mut r = (roll % u64::from(self.total())) as u32;
        for (weight, op) in [
            (self.strict, Op::Strict),
            (self.record, Op::Record),
            (self.reserve_settle, Op::ReserveSettle),
            (self.balance, Op::Balance),
            (self.ping, Op::Ping),
        ] {
            if r < weight {
                return op;
            }
            r -= weight;
        }
        Op::Balance
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Strict,
    Record,
    ReserveSettle,
    Balance,
    Ping,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Strict => "strict_usage",
            Op::Record => "record_usage",
            Op::ReserveSettle => "reserve_settle",
            Op::Balance => "balance",
            Op::Ping => "ping",
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// QUIC connections (one `Client` each).
    pub connections: usize,
    /// Closed loop: callers per connection. Open loop: ignored.
    pub in_flight: usize,
    /// Wallets in use (prepared as `lt-00000000` …).
    pub wallets: usize,
    /// Index of the first wallet (runs with different offsets use disjoint wallets).
    pub wallet_offset: usize,
    /// How wallets are picked.
    pub distribution: Distribution,
    /// The operation mix.
    pub mix: Mix,
    /// Usage events per frame (> 1: `UsageBatch` frames; usage operations only).
    pub events_per_frame: usize,
    /// Open loop at this many operations per second; `None`: closed loop.
    pub rate: Option<f64>,
    /// Measured time.
    pub duration: Duration,
    /// Time run before measuring (not recorded).
    pub warmup: Duration,
    /// Seed of the wallet and operation choices.
    pub seed: u64,
}

/// Latency percentiles, in microseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// The outcome of a run (the `--json` document).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `open` or `closed`.
    pub mode: &'static str,
    /// Operations per second asked for (open loop), or `null`.
    pub offered_rate: Option<f64>,
    /// Successful operations per second: those meant to start in the measured window, over the
    /// time from the window's start to the last one's completion (at least the duration).
    pub achieved_rate: f64,
    /// Usage debits per second (each event of a batch frame counts).
    pub debits_per_sec: f64,
    /// Operations completed in the measured window (successful or not).
    pub operations: u64,
    /// Failed operations by code name (`InsufficientFunds`, `Busy`, `connection_lost`, …).
    pub errors: BTreeMap<String, u64>,
    /// Latency of successful operations, from intended send time (open loop) or send time.
    pub latency_us: Latency,
    /// The same, per operation kind.
    pub latency_by_op_us: BTreeMap<String, Latency>,
    /// Settings, for the record.
    pub connections: usize,
    /// Callers per connection (closed loop).
    pub in_flight: usize,
    /// Wallets.
    pub wallets: usize,
    /// Distribution, as given.
    pub distribution: String,
    /// Events per usage frame.
    pub events_per_frame: usize,
    /// Seconds the rates are computed over (the duration, or longer if the last operations
    /// finished after it).
    pub duration_secs: f64,
}

/// A small seeded generator (xorshift64*): wallet and operation choices.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks wallet indexes.
#[derive(Clone, Debug)]
pub struct Picker {
    wallets: usize,
    offset: usize,
    distribution: Distribution,
    /// Zipf: cumulative weights.
    cdf: Arc<Vec<f64>>,
}

impl Picker {
    /// A picker over `wallets` wallets, from index `offset` on.
    pub fn with_offset(wallets: usize, offset: usize, distribution: Distribution) -> Picker {
        Picker {
            offset,
            ..Picker::new(wallets, distribution)
        }
    }

    /// A picker over `wallets` wallets.
    pub fn new(wallets: usize, distribution: Distribution) -> Picker {
        let cdf = match &distribution {
            Distribution::Zipf { s } => {
                let mut total = 0.0;
                let mut cdf = Vec::with_capacity(wallets);
                for k in 1..=wallets {
                    total += 1.0 / (k as f64).powf(*s);
                    cdf.push(total);
                }
                cdf.iter_mut().for_each(|c| *c /= total);
                cdf
            }
            _ => Vec::new(),
        };
        Picker {
            wallets: wallets.max(1),
            offset: 0,
            distribution,
            cdf: Arc::new(cdf),
        }
    }

    /// The next wallet index.
    pub fn pick(&self, rng: &mut Rng) -> usize {
        self.offset + self.pick_rank(rng)
    }

    fn pick_rank(&self, rng: &mut Rng) -> usize {
        match &self.distribution {
            Distribution::Uniform => (rng.next_u64() % self.wallets as u64) as usize,
            Distribution::Zipf { .. } => {
                let u = rng.unit();
                self.cdf.partition_point(|c| *c < u).min(self.wallets - 1)
            }
            Distribution::Hot { wallets, share } => {
                if rng.unit() < *share {
                    (rng.next_u64() % (*wallets).clamp(1, self.wallets) as u64) as usize
                } else {
                    (rng.next_u64() % self.wallets as u64) as usize
                }
            }
        }
    }
}

/// The wallet id of index `i`.
pub fn wallet_id(i: usize) -> WalletId {
    name(&format!("lt-{i:08}"))
}

fn dec(text: &str) -> Decimal {
    text.parse().expect("a literal decimal")
}

/// The load test's catalog: USD (scale 6), product `llm` with `input_tokens` and
/// `output_tokens`, plan `lt-std` at 0.000002 and 0.000008 USD per token.
pub fn catalog() -> Vec<Command> {
    let (input, output) = (name("input_tokens"), name("output_tokens"));
    vec![
        Command::DefineAsset {
            code: asset("USD"),
            scale: 6,
            usd_value: dec("1"),
        },
        Command::DefineProduct {
            code: name("llm"),
            dimensions: vec![input, output],
        },
        Command::DraftPlan {
            plan: name("lt-std"),
            custom_for: None,
            asset: asset("USD"),
            rules: vec![PriceRule {
                product: name("llm"),
                filters: vec![],
                components: vec![
                    Component {
                        dimension: input,
                        price: PriceModel::PerUnit {
                            unit_price: dec("0.000002"),
                        },
                    },
                    Component {
                        dimension: output,
                        price: PriceModel::PerUnit {
                            unit_price: dec("0.000008"),
                        },
                    },
                ],
                minimum_charge: None,
                rounding: Rounding::Up,
            }],
        },
        Command::PublishPlan {
            plan: name("lt-std"),
        },
    ]
}

fn now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64),
    )
}

fn usage_event(wallet: usize, mode: DebitMode, rng: &mut Rng) -> UsageEvent {
    let input = 200 + rng.next_u64() % 1800;
    let output = 50 + rng.next_u64() % 450;
    UsageEvent {
        wallet: wallet_id(wallet),
        product: name("llm"),
        quantities: vec![
            Quantity {
                dimension: name("input_tokens"),
                value: input.into(),
            },
            Quantity {
                dimension: name("output_tokens"),
                value: output.into(),
            },
        ],
        attributes: vec![],
        cost_usd: dec("0.001"),
        occurred_at: now(),
        mode,
    }
}

/// Defines the catalog (once) and creates the wallets of indexes `wallets` on plan `lt-std` with a grant of
/// 1,000,000 USD each, `parallel` calls at a time. Safe to run again.
pub async fn prepare(
    admin: &Client,
    wallets: std::ops::Range<usize>,
    parallel: usize,
) -> anyhow::Result<()> {
    use tally_engine::ResultCode as R;
    // The catalog: identical definitions are accepted again; a published plan stays.
    let published = admin
        .query(Query::PricePreview(UsageEvent {
            wallet: wallet_id(0),
            ..usage_event(0, DebitMode::Strict, &mut Rng::new(1))
        }))
        .await;
    let catalog_ready = published.is_ok();
    if !catalog_ready {
        for command in catalog() {
            let request = Request {
                // Fresh ids: a catalog step may legitimately be repeated after the window.
                id: next_id(),
                command,
            };
            match admin.command(request).await {
                Ok(_) => {}
                Err(Error::Rejected { code, .. })
                    if matches!(code, R::AssetConflict | R::ProductConflict) =>
                {
                    anyhow::bail!("prepare: the server has a different catalog ({code:?})")
                }
                Err(e) => anyhow::bail!("prepare: catalog: {e}"),
            }
        }
    }
    let next = Arc::new(AtomicU64::new(wallets.start as u64));
    let wallets = wallets.end;
    let tasks: Vec<_> = (0..parallel.max(1))
        .map(|_| {
            let admin = admin.clone();
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= wallets {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let wallet = wallet_id(i);
                    let base = (i as u128) << 2 | 0x6c74_0000_0000_0000_0000_0000_0000_0000;
                    let steps = [
                        Command::CreateWallet(CreateWallet {
                            wallet,
                            overdraft: vec![],
                            metadata: vec![],
                        }),
                        Command::AssignPlan {
                            wallet,
                            plan: name("lt-std"),
                            version: 1,
                            effective_from: Timestamp(0),
                        },
                        Command::Grant(Grant {
                            wallet,
                            asset: asset("USD"),
                            amount: dec("1000000"),
                            priority: 0,
                            effective_at: None,
                            expires_at: None,
                            source: GrantSource::TopUp {
                                payment_id: name(&format!("lt-seed-{i}")),
                            },
                        }),
                    ];
                    for (k, command) in steps.into_iter().enumerate() {
                        let request = Request {
                            id: RequestId(base | k as u128),
                            command,
                        };
                        match admin.command(request).await {
                            Ok(_) => {}
                            Err(Error::Rejected {
                                code: R::WalletExists | R::PaymentConflict,
                                ..
                            }) => {}
                            Err(e) => anyhow::bail!("prepare: wallet {i}: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// A request id no other call of this process, and no earlier process, used: a per-process
/// random nonce in the high bits, a process-wide counter in the low bits.
fn next_id() -> RequestId {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    RequestId(fresh_id(COUNTER.fetch_add(1, Ordering::Relaxed)))
}

fn fresh_id(n: u64) -> u128 {
    static NONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let nonce = *NONCE.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng::new(t ^ u64::from(std::process::id())).next_u64()
    });
    (u128::from(nonce) << 64) | u128::from(n)
}

/// Shared counters of a run.
struct Tally {
    started: Instant,
    warmup: Duration,
    end: Instant,
    histogram: Histogram<u64>,
    by_op: BTreeMap<Op, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    succeeded: u64,
    operations: u64,
    debits: u64,
    /// When the last counted operation finished.
    last_done: Instant,
}

impl Tally {
    fn record(&mut self, op: Op, intended: Instant, done: Instant, outcome: Outcome) {
        // Only operations meant to start inside the measured window count.
        if intended < self.started + self.warmup || intended >= self.end {
            return;
        }
        self.operations += 1;
        self.last_done = self.last_done.max(done);
        match outcome {
            Outcome::Ok { debits } => {
                self.succeeded += 1;
                self.debits += debits;
                let us = done.duration_since(intended).as_micros() as u64;
                let _ = self.histogram.record(us.max(1));
                let _ = self
                    .by_op
                    .entry(op)
                    .or_insert_with(|| Histogram::new(3).expect("valid sigfig"))
                    .record(us.max(1));
            }
            Outcome::Failed(code) => *self.errors.entry(code).or_default() += 1,
        }
    }
}

enum Outcome {
    Ok { debits: u64 },
    Failed(String),
}

fn error_name(e: &Error) -> String {
    match e {
        Error::Rejected { code, .. } => code.name().to_string(),
        Error::Transport { code, .. } => code.name().to_string(),
        Error::Connect(_) => "connect".into(),
        Error::ConnectionLost(_) => "connection_lost".into(),
        Error::Protocol(_) => "protocol".into(),
        Error::Config(_) => "config".into(),
    }
}

/// One operation, start to finish.
async fn operate(
    client: &Client,
    op: Op,
    wallet: usize,
    events_per_frame: usize,
    picker: &Picker,
    rng: &mut Rng,
) -> Outcome {
    let id = next_id;
    let result: Result<u64, Error> = match op {
        Op::Strict | Op::Record => {
            let mode = if op == Op::Strict {
                DebitMode::Strict
            } else {
                DebitMode::Record
            };
            if events_per_frame <= 1 {
                let event = usage_event(wallet, mode, rng);
                client.usage(id(), event).await.map(|_| 1)
            } else {
                let events: Vec<(RequestId, UsageEvent)> = (0..events_per_frame)
                    .map(|k| {
                        // The first event on the chosen wallet, the rest picked the same way.
                        let w = if k == 0 { wallet } else { picker.pick(rng) };
                        (id(), usage_event(w, mode, rng))
                    })
                    .collect();
                match client.send(Message::UsageBatch(events)).await {
                    Ok(Message::BatchReply(outcomes)) => {
                        let failed = outcomes.iter().find_map(|o| match o {
                            Ok(r) if r.code.is_ok() => None,
                            Ok(r) => Some(r.code.name().to_string()),
                            Err(code) => Some(code.name().to_string()),
                        });
                        match failed {
                            None => Ok(outcomes.len() as u64),
                            Some(code) => return Outcome::Failed(code),
                        }
                    }
                    Ok(other) => Err(Error::Protocol(format!("{:?}", other.kind()))),
                    Err(e) => Err(e),
                }
            }
        }
        Op::ReserveSettle => {
            let item = ReserveItem {
                id: id(),
                wallet: wallet_id(wallet),
                amount: ReserveAmount::Fixed {
                    asset: asset("USD"),
                    amount: dec("0.05"),
                },
                deadline: Timestamp(now().0 + 60_000_000),
            };
            match client.reserve(item).await {
                Ok(reply) => match reply.value {
                    tally_engine::ReplyValue::Hold { hold, .. } => client
                        .command(Request {
                            id: id(),
                            command: Command::Settle {
                                wallet: wallet_id(wallet),
                                hold,
                                usage: usage_event(wallet, DebitMode::Strict, rng),
                            },
                        })
                        .await
                        .map(|_| 1),
                    other => Err(Error::Protocol(format!("a reserve answered {other:?}"))),
                },
                Err(e) => Err(e),
            }
        }
        Op::Balance => client
            .balance(wallet_id(wallet), asset("USD"))
            .await
            .map(|_| 0),
        Op::Ping => client.ping().await.map(|_| 0),
    };
    match result {
        Ok(debits) => Outcome::Ok { debits },
        Err(e) => Outcome::Failed(error_name(&e)),
    }
}

/// Runs one operation (kind, wallet, events per frame) and records it against `intended`, the
/// time it was meant to start.
async fn measure(
    client: &Client,
    (op, wallet, per_frame): (Op, usize, usize),
    picker: &Picker,
    rng: &mut Rng,
    tally: &Mutex<Tally>,
    intended: Instant,
) {
    let outcome = operate(client, op, wallet, per_frame, picker, rng).await;
    let done = Instant::now();
    tally
        .lock()
        .expect("not poisoned")
        .record(op, intended, done, outcome);
}

/// Runs the load against already-connected clients (one per connection).
pub async fn run(clients: &[Client], options: &Options) -> Report {
    let started = Instant::now();
    let end = started + options.warmup + options.duration;
    let tally = Arc::new(Mutex::new(Tally {
        started,
        warmup: options.warmup,
        end,
        histogram: Histogram::new(3).expect("valid sigfig"),
        by_op: BTreeMap::new(),
        errors: BTreeMap::new(),
        succeeded: 0,
        operations: 0,
        debits: 0,
        last_done: started,
    }));
    let picker = Picker::with_offset(
        options.wallets,
        options.wallet_offset,
        options.distribution.clone(),
    );
    let mut tasks = Vec::new();
    match options.rate {
        None => {
            for (c, client) in clients.iter().enumerate() {
                for caller in 0..options.in_flight.max(1) {
                    let client = client.clone();
                    let tally = tally.clone();
                    let picker = picker.clone();
                    let mix = options.mix.clone();
                    let per_frame = options.events_per_frame;
                    let mut rng = Rng::new(options.seed ^ ((c as u64) << 32) ^ caller as u64);
                    tasks.push(tokio::spawn(async move {
                        while Instant::now() < end {
                            let op = mix.pick(rng.next_u64());
                            let wallet = picker.pick(&mut rng);
                            let sent = Instant::now();
                            let job = (op, wallet, per_frame);
                            measure(&client, job, &picker, &mut rng, &tally, sent).await;
                        }
                    }));
                }
            }
        }
        Some(rate) => {
            // One scheduler; each operation its own task, latency from its intended time. The
            // schedule is kept by an OS thread: tokio's timer rounds sleeps up to the next
            // millisecond, which would add up to 1 ms of the generator's own delay to every
            // request at low rates (`std::thread::sleep` overshoots by tens of microseconds).
            let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let (due_tx, mut due) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
            let scheduler = std::thread::spawn(move || {
                let mut i: u64 = 0;
                loop {
                    let intended = started + interval.mul_f64(i as f64);
                    if intended >= end {
                        break;
                    }
                    let now = Instant::now();
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    if due_tx.send((i, intended)).is_err() {
                        break;
                    }
                    i += 1;
                }
            });
            let mut rng = Rng::new(options.seed);
            let outstanding = Arc::new(AtomicU64::new(0));
            while let Some((i, intended)) = due.recv().await {
                let op = options.mix.pick(rng.next_u64());
                let wallet = picker.pick(&mut rng);
                let client = clients[(i as usize) % clients.len()].clone();
                let picker = picker.clone();
                let tally = tally.clone();
                let per_frame = options.events_per_frame;
                let mut task_rng = Rng::new(rng.next_u64());
                let outstanding = outstanding.clone();
                outstanding.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let job = (op, wallet, per_frame);
                    measure(&client, job, &picker, &mut task_rng, &tally, intended).await;
                    outstanding.fetch_sub(1, Ordering::Relaxed);
                });
            }
            let _ = scheduler.join();
            // Wait for the stragglers (bounded: the client's retry budget).
            let deadline = Instant::now() + Duration::from_secs(30);
            while outstanding.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    let tally = tally.lock().expect("not poisoned");
    // From the start of the measured window to the last counted completion: an overloaded server
    // finishes the window's operations late, and its achieved rate is what it got through.
    let measured_from = started + options.warmup;
    let seconds = options
        .duration
        .as_secs_f64()
        .max(
            tally
                .last_done
                .saturating_duration_since(measured_from)
                .as_secs_f64(),
        )
        .max(1e-9);
    Report {
        mode: if options.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        offered_rate: options.rate,
        achieved_rate: tally.succeeded as f64 / seconds,
        debits_per_sec: tally.debits as f64 / seconds,
        operations: tally.operations,
        errors: tally.errors.clone(),
        latency_us: Latency::of(&tally.histogram),
        latency_by_op_us: tally
            .by_op
            .iter()
            .map(|(op, h)| (op.name().to_string(), Latency::of(h)))
            .collect(),
        connections: clients.len(),
        in_flight: if options.rate.is_some() {
            0
        } else {
            options.in_flight
        },
        wallets: options.wallets,
        distribution: match &options.distribution {
            Distribution::Uniform => "uniform".into(),
            Distribution::Zipf { s } => format!("zipf:{s}"),
            Distribution::Hot { wallets, share } => format!("hot:{wallets}:{share}"),
        },
        events_per_frame: options.events_per_frame,
        duration_secs: seconds,
    }
}

impl Report {
    /// A readable report.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let offered = self
            .offered_rate
            .map_or("closed loop".to_string(), |r| format!("offered {r:.0}/s"));
        out.push_str(&format!(
            "{} ({} connections{}, {} wallets {}, {} events/frame, {:.1} s)\n",
            offered,
            self.connections,
            if self.in_flight > 0 {
                format!(" x {} in flight", self.in_flight)
            } else {
                String::new()
            },
            self.wallets,
            self.distribution,
            self.events_per_frame,
            self.duration_secs
        ));
        out.push_str(&format!(
            "  achieved {:.0} ops/s, {:.0} debits/s, {} operations\n",
            self.achieved_rate, self.debits_per_sec, self.operations
        ));
        let l = &self.latency_us;
        out.push_str(&format!(
            "  latency us: p50 {} p90 {} p99 {} p99.9 {} max {}\n",
            l.p50, l.p90, l.p99, l.p999, l.max
        ));
        for (op, l) in &self.latency_by_op_us {
            out.push_str(&format!(
                "    {op:<15} p50 {} p99 {} max {}\n",
                l.p50, l.p99, l.max
            ));
        }
        if self.errors.is_empty() {
            out.push_str("  errors: none\n");
        } else {
            for (code, n) in &self.errors {
                out.push_str(&format!("  errors: {code}: {n}\n"));
            }
        }
        out
    }
}

/// An SVG plot of latency (p50, p99) against achieved throughput, one point per report.
pub fn plot_svg(title: &str, reports: &[Report]) -> String {
    let (w, h, left, bottom, top, right) = (720.0, 420.0, 70.0, 50.0, 40.0, 20.0);
    let max_x = reports
        .iter()
        .map(|r| r.achieved_rate)
        .fold(1.0f64, f64::max)
        * 1.1;
    let max_y = reports
        .iter()
        .map(|r| r.latency_us.p99 as f64 / 1000.0)
        .fold(0.1f64, f64::max)
        * 1.1;
    let x = |v: f64| left + (v / max_x) * (w - left - right);
    let y = |v: f64| h - bottom - (v / max_y) * (h - bottom - top);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        w / 2.0,
        xml(title)
    );
    // Axes and ticks.
    svg.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{0}\" stroke=\"black\"/>\n",
        h - bottom,
        w - right
    ));
    for i in 0..=5 {
        let vx = max_x * i as f64 / 5.0;
        let vy = max_y * i as f64 / 5.0;
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.1}</text>\n\
             <line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\n",
            x(vx),
            h - bottom + 18.0,
            human(vx),
            left - 6.0,
            y(vy) + 4.0,
            vy,
            y(vy),
            w - right,
            y(vy)
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">achieved debits/s</text>\n\
         <text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" \
         text-anchor=\"middle\">ack latency (ms)</text>\n",
        (left + w - right) / 2.0,
        h - 10.0,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0
    ));
    let mut sorted: Vec<&Report> = reports.iter().collect();
    sorted.sort_by(|a, b| a.achieved_rate.total_cmp(&b.achieved_rate));
    for (label, color, get) in [
        (
            "p50",
            "#1f77b4",
            (|r: &Report| r.latency_us.p50) as fn(&Report) -> u64,
        ),
        ("p99", "#d62728", |r: &Report| r.latency_us.p99),
    ] {
        let points: Vec<String> = sorted
            .iter()
            .map(|r| format!("{:.1},{:.1}", x(r.achieved_rate), y(get(r) as f64 / 1000.0)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            points.join(" ")
        ));
        for p in &points {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            svg.push_str(&format!(
                "<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{color}\"/>\n"
            ));
        }
        let legend_y = if label == "p50" {
            top + 10.0
        } else {
            top + 26.0
        };
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{legend_y:.1}\" fill=\"{color}\">{label}</text>\n",
            w - right - 40.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse_and_refuse_nonsense() {
        let mix = Mix::parse("strict=70,record=10,reserve=10,balance=10").unwrap();
        assert_eq!(
            (mix.strict, mix.record, mix.reserve_settle, mix.balance),
            (70, 10, 10, 10)
        );
        assert!(Mix::parse("strict=0").is_err());
        assert!(Mix::parse("refund=5").unwrap_err().contains("unknown"));
        assert!(Mix::parse("strict=x").is_err());
        let pings = Mix::parse("ping=1").unwrap();
        assert!((0..100).all(|r| pings.pick(r) == Op::Ping));
        let only = Mix::parse("balance=1").unwrap();
        assert!((0..100).all(|r| only.pick(r) == Op::Balance));
    }

    #[test]
    fn hot_sets_and_zipf_concentrate_traffic() {
        let mut rng = Rng::new(7);
        let hot = Picker::new(
            100_000,
            Distribution::Hot {
                wallets: 10,
                share: 0.9,
            },
        );
        let on_hot = (0..10_000).filter(|_| hot.pick(&mut rng) < 10).count();
        assert!((8_800..=9_200).contains(&on_hot), "{on_hot}");
        let zipf = Picker::new(1_000, Distribution::Zipf { s: 1.0 });
        let first = (0..10_000).filter(|_| zipf.pick(&mut rng) == 0).count();
        // 1 / H(1000) ≈ 13 % of picks go to rank 1.
        assert!((1_100..=1_500).contains(&first), "{first}");
        let uniform = Picker::new(10, Distribution::Uniform);
        assert!((0..1_000).all(|_| uniform.pick(&mut rng) < 10));
    }

    #[test]
    fn the_plot_has_both_lines_and_escapes_its_title() {
        let report = |rate: f64, p50: u64, p99: u64| Report {
            mode: "open",
            offered_rate: Some(rate),
            achieved_rate: rate,
            debits_per_sec: rate,
            operations: 1,
            errors: BTreeMap::new(),
            latency_us: Latency {
                p50,
                p90: p99,
                p99,
                p999: p99,
                max: p99,
            },
            latency_by_op_us: BTreeMap::new(),
            connections: 1,
            in_flight: 0,
            wallets: 1,
            distribution: "uniform".into(),
            events_per_frame: 1,
            duration_secs: 1.0,
        };
        let svg = plot_svg(
            "a < b",
            &[report(1000.0, 500, 900), report(5000.0, 800, 4000)],
        );
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt; b"));
    }
}
