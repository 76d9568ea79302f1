//! tally-benches: workloads shared by the benchmark targets in `benches/benches/`.
//!
//! A [`Workload`] is an engine loaded with many wallets, each on a priced plan and holding grants
//! of mixed priority, plus a ring of prepared usage requests. Benchmarks time
//! [`Workload::debit`], which applies the next request and drains its effects, the way a shard
//! loop does. This crate measures; it asserts nothing about speed.

use std::str::FromStr;

use rust_decimal::Decimal;
use tally_engine::*;

/// Prepared requests in the ring; each is reused with a fresh request id.
pub const RING: usize = 65_536;
/// Simulated time between two debits. With the idempotency window set to one second, the
/// request table holds 100,000 entries in steady state.
pub const STEP_US: i64 = 10;

pub fn d(s: &str) -> Decimal {
    Decimal::from_str(s).expect("literal decimal")
}

/// The benchmark catalog: USD at scale 9, product `chat` with input and output tokens, plan
/// `std` v1 with four attribute-filtered rules.
pub fn catalog() -> Vec<Command> {
    let usd = asset("USD");
    let (input, output) = (name("input_tokens"), name("output_tokens"));
    let rule = |filters: &[(&str, &str)], i: &str, o: &str| PriceRule {
        product: name("chat"),
        filters: filters.iter().map(|(k, v)| (name(k), name(v))).collect(),
        components: vec![
            Component {
                dimension: input,
                price: PriceModel::PerUnit { unit_price: d(i) },
            },
            Component {
                dimension: output,
                price: PriceModel::PerUnit { unit_price: d(o) },
            },
        ],
        minimum_charge: None,
        rounding: Rounding::Up,
    };
    vec![
        Command::DefineAsset {
            code: usd,
            scale: 9,
            usd_value: d("1"),
        },
        Command::DefineProduct {
            code: name("chat"),
            dimensions: vec![input, output],
        },
        Command::DraftPlan {
            plan: name("std"),
            custom_for: None,
            asset: usd,
            rules: vec![
                rule(&[], "0.0000005", "0.0000015"),
                rule(&[("model", "gpt-4o")], "0.0000025", "0.00001"),
                rule(&[("model", "gpt-4o-mini")], "0.00000015", "0.0000006"),
                rule(
                    &[("model", "gpt-4o"), ("tier", "batch")],
                    "0.00000125",
                    "0.000005",
                ),
            ],
        },
        Command::PublishPlan { plan: name("std") },
    ]
}

/// The external id of benchmark wallet `i`.
pub fn wallet_id(i: usize) -> WalletId {
    name(&format!("customer-{i:08}"))
}

/// Creating wallet `i`: create, assign plan `std`, and two grants of mixed priority.
pub fn wallet_commands(i: usize, expires: Timestamp) -> Vec<Command> {
    let wallet = wallet_id(i);
    let usd = asset("USD");
    let mut commands = vec![
        Command::CreateWallet(CreateWallet {
            wallet,
            overdraft: vec![],
            metadata: vec![],
        }),
        Command::AssignPlan {
            wallet,
            plan: name("std"),
            version: 1,
            effective_from: Timestamp(0),
        },
    ];
    for (amount, priority, expires_at) in [("1000", 0, Some(expires)), ("100000", 5, None)] {
        commands.push(Command::Grant(Grant {
            wallet,
            asset: usd,
            amount: d(amount),
            priority,
            effective_at: None,
            expires_at,
            source: GrantSource::Promotion,
        }));
    }
    commands
}

/// A strict priced usage event for wallet `wallet`, stamped now.
pub fn usage_request(id: u128, wallet: usize) -> Request {
    let models = ["gpt-4o", "gpt-4o-mini", "claude", "gpt-4o"];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    Request {
        id: RequestId(id),
        command: Command::Usage(UsageEvent {
            wallet: wallet_id(wallet),
            product: name("chat"),
            quantities: vec![
                Quantity {
                    dimension: name("input_tokens"),
                    value: Decimal::from(100 + id % 2000),
                },
                Quantity {
                    dimension: name("output_tokens"),
                    value: Decimal::from(10 + id % 500),
                },
            ],
            attributes: vec![(name("model"), name(models[id as usize % models.len()]))],
            cost_usd: d("0.0001"),
            occurred_at: Timestamp(now),
            mode: DebitMode::Strict,
        }),
    }
}

/// Loads the catalog and `wallets` wallets through a server handle, many in flight at once.
pub fn setup_requests(handle: &tally_server::Handle, wallets: usize) {
    let mut id = 1u128;
    for command in catalog() {
        let reply = handle
            .call(Request {
                id: RequestId(id),
                command,
            })
            .expect("catalog");
        assert_eq!(reply.code, ResultCode::Ok);
        id += 1;
    }
    let expires = Timestamp(i64::MAX / 2);
    let mut pending = std::collections::VecDeque::new();
    for i in 0..wallets {
        for command in wallet_commands(i, expires) {
            let request = Request {
                id: RequestId(id),
                command,
            };
            id += 1;
            loop {
                match handle.submit(request.clone()) {
                    Ok(p) => {
                        pending.push_back(p);
                        break;
                    }
                    Err(tally_server::CallError::Busy) => match pending.pop_front() {
                        Some(p) => assert_eq!(p.wait().expect("setup").code, ResultCode::Ok),
                        None => std::thread::yield_now(),
                    },
                    Err(e) => panic!("setup: {e}"),
                }
            }
        }
        while pending.len() > 50_000 {
            assert_eq!(
                pending
                    .pop_front()
                    .expect("nonempty")
                    .wait()
                    .expect("setup")
                    .code,
                ResultCode::Ok
            );
        }
    }
    for p in pending {
        assert_eq!(p.wait().expect("setup").code, ResultCode::Ok);
    }
}

/// An engine with wallets and a ring of prepared priced usage events.
#[derive(Debug)]
pub struct Workload {
    /// The engine under test.
    pub engine: Engine,
    /// The simulated clock.
    pub now: Timestamp,
    ring: Vec<Request>,
    next: usize,
    next_id: u128,
    /// Every wallet's id: each debit picks one at random, so all of them are touched.
    wallets: Vec<WalletId>,
    /// The xorshift state that picks them.
    pick: u64,
    /// Debits applied that were not `Ok` (should stay 0).
    pub rejected: u64,
}

impl Workload {
    /// `wallets` wallets, each on plan `std` with two grants: a large expiring one at priority
    /// 0 and a larger one without expiry at priority 5.
    pub fn new(wallets: usize, seed: u64) -> Workload {
        Workload::with_window(wallets, seed, 100_000)
    }

    /// Like [`Workload::new`], with an idempotency window that holds `window_ids` request ids in
    /// steady state (the retention is `window_ids` × [`STEP_US`] of simulated time, at least a
    /// second).
    pub fn with_window(wallets: usize, seed: u64, window_ids: u64) -> Workload {
        let retention = (window_ids as i64 * STEP_US).max(Timestamp::SECOND_US);
        let config = Config {
            idempotency_retention_us: retention,
            ..Config::default()
        };
        let mut w = Workload {
            engine: Engine::new(config),
            now: Timestamp(1_700_000_000_000_000),
            ring: Vec::with_capacity(RING),
            next: 0,
            next_id: 1,
            wallets: Vec::new(),
            pick: seed.rotate_left(17) | 1,
            rejected: 0,
        };
        for command in catalog() {
            w.must(command);
        }
        let (input, output) = (name("input_tokens"), name("output_tokens"));
        let expires = w.now.add_us(365 * Timestamp::DAY_US);
        let mut ids = Vec::with_capacity(wallets);
        for i in 0..wallets {
            ids.push(wallet_id(i));
            for command in wallet_commands(i, expires) {
                w.must(command);
            }
        }
        let models = ["gpt-4o", "gpt-4o-mini", "claude", "gpt-4o"];
        let mut state = seed | 1;
        for i in 0..RING {
            // xorshift64: a fixed, seeded spread of wallets and shapes.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let wallet = ids[(state % wallets as u64) as usize];
            let mut attributes = vec![(name("model"), name(models[i % models.len()]))];
            if i % 8 == 0 {
                attributes.push((name("tier"), name("batch")));
            }
            let event = UsageEvent {
                wallet,
                product: name("chat"),
                quantities: vec![
                    Quantity {
                        dimension: input,
                        value: Decimal::from(100 + (state >> 40) % 2000),
                    },
                    Quantity {
                        dimension: output,
                        value: Decimal::from(10 + (state >> 20) % 500),
                    },
                ],
                attributes,
                cost_usd: d("0.0001"),
                occurred_at: w.now,
                mode: DebitMode::Strict,
            };
            w.ring.push(Request {
                id: RequestId(0),
                command: Command::Usage(event),
            });
        }
        w.wallets = ids;
        w
    }

    fn must(&mut self, command: Command) {
        let request = Request {
            id: RequestId(self.next_id),
            command,
        };
        self.next_id += 1;
        let reply = self.engine.handle_request(self.now, &request);
        assert_eq!(
            reply.code,
            ResultCode::Ok,
            "setup command {:?} failed",
            request.command
        );
        while self.engine.poll_effect().is_some() {}
    }

    /// Applies the next prepared usage event (fresh request id, current time) and drains its
    /// effects. Returns the charged amount's result code.
    #[inline]
    pub fn debit(&mut self) -> ResultCode {
        self.now = self.now.add_us(STEP_US);
        let request = &mut self.ring[self.next];
        self.next = (self.next + 1) % RING;
        request.id = RequestId(self.next_id);
        self.next_id += 1;
        // The ring gives the event's shape; the wallet is drawn afresh, so every wallet is
        // touched (a ring alone would touch at most RING of them).
        self.pick ^= self.pick << 13;
        self.pick ^= self.pick >> 7;
        self.pick ^= self.pick << 17;
        let wallet = self.wallets[(self.pick % self.wallets.len() as u64) as usize];
        if let Command::Usage(event) = &mut request.command {
            event.occurred_at = self.now;
            event.wallet = wallet;
        }
        let reply = self.engine.handle_request(self.now, request);
        let mut effects = 0;
        while let Some(effect) = self.engine.poll_effect() {
            std::hint::black_box(&effect);
            effects += 1;
        }
        std::hint::black_box(effects);
        if !reply.code.is_ok() {
            self.rejected += 1;
        }
        reply.code
    }
}

/// What [`wallet_engine`] built.
#[derive(Debug)]
pub struct Built {
    /// The engine (one shard).
    pub engine: Engine,
    /// The time of the last command applied.
    pub now: Timestamp,
    /// Commands applied: the catalog, then four per wallet. Request ids `1..=commands` are
    /// used, so the next free id is `commands + 1`.
    pub commands: u64,
}

/// An engine (one shard) with the benchmark [`catalog`] and wallets `0..wallets`, each made by
/// [`wallet_commands`] (created, on plan `std`, a priority-0 grant expiring between one year
/// and one year and a day from `start`, and a priority-5 grant without expiry), built by
/// applying the commands one by one as a shard does and draining their effects.
///
/// The clock starts at `start` and advances `step_us` before each wallet, so with a short
/// idempotency window the setup request ids age out as the build goes (with 0, every one stays
/// remembered).
pub fn wallet_engine(config: Config, wallets: usize, start: Timestamp, step_us: i64) -> Built {
    let mut engine = Engine::new(config);
    let mut now = start;
    let mut commands = 0u64;
    let mut apply = |engine: &mut Engine, now: Timestamp, command: Command| {
        commands += 1;
        let request = Request {
            id: RequestId(u128::from(commands)),
            command,
        };
        let reply = engine.handle_request(now, &request);
        assert_eq!(
            reply.code,
            ResultCode::Ok,
            "setup command {:?} failed",
            request.command
        );
        while engine.poll_effect().is_some() {}
    };
    for command in catalog() {
        apply(&mut engine, now, command);
    }
    let year = start.add_us(365 * Timestamp::DAY_US);
    for i in 0..wallets {
        now = now.add_us(step_us);
        let expires = year.add_us((i % 86_400) as i64 * Timestamp::SECOND_US);
        for command in wallet_commands(i, expires) {
            apply(&mut engine, now, command);
        }
    }
    Built {
        engine,
        now,
        commands,
    }
}

/// A strict priced usage request like [`usage_request`], but occurring at `at` instead of the
/// wall clock (for logs replayed at simulated times).
pub fn usage_request_at(id: u128, wallet: usize, at: Timestamp) -> Request {
    let mut request = usage_request(id, wallet);
    if let Command::Usage(event) = &mut request.command {
        event.occurred_at = at;
    }
    request
}
