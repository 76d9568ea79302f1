//! Starting, recovering and stopping a server on a data directory.
//!
//! Layout of a data directory:
//!
//! ```text
//! <data-dir>/LOCK              flock'ed by the running server; a second process is refused
//! <data-dir>/shards            the shard count, fixed at creation
//! <data-dir>/RULES             the version of the billing rules its WAL records were applied
//!                              under (`tally_engine::RULES_VERSION`)
//! <data-dir>/catalog-last      the last catalog command, recorded before its broadcast
//!                              (`crate::catalog`)
//! <data-dir>/shard-NNN/wal/    each shard's WAL segments
//! <data-dir>/snapshots/        checkpoints (see docs/snapshot-format.md)
//! <data-dir>/outbound/         JSON-lines exports and their progress
//! ```
//!
//! Recovery of each shard: newest valid checkpoint (falling back past corrupt ones with a
//! warning naming the file), then WAL replay from the checkpoint's LSN + 1; every replayed
//! effect goes to the outbound sinks, which skip what they already hold. The state digest is
//! logged at the end.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tally_engine::{Engine, Timestamp};
use tally_wal::{Durability, FileStorage, Options, Wal};

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, DurabilitySetting};
use crate::handle::Handle;
use crate::outbound::{self, FileSinks, Sink, SqliteSink, Tagged};
use crate::record::{self, LogEntry};
use crate::shard::{CallError, Checkpoints, Shard, ShardOptions};

/// Why a server could not start or stop cleanly. Messages say what to do.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// The newest usable checkpoint as (LSN, engine rebuilt from it), if any, and a warning per newer
/// file skipped as corrupt or inconsistent.
pub type Loaded = (Option<(u64, Engine)>, Vec<String>);

/// Checkpoint storage: writing (through [`Checkpoints`]) and loading the newest valid one.
pub trait Store: Checkpoints {
    /// The newest valid checkpoint of `shard`.
    fn load_newest(&self, shard: u32) -> Result<Loaded, String>;
    /// Another handle on the same storage, for another shard thread.
    fn clone_box(&self) -> Box<dyn Store>;
}

/// `<data-dir>/RULES`.
const RULES_FILE: &str = "RULES";

/// The rules version `<data-dir>/RULES` names (`None`: no file, a directory written by a release
/// from before the file, or a new one).
fn rules_of(data_dir: &Path) -> Result<Option<u32>, Error> {
    let path = data_dir.join(RULES_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            Error(format!(
                "{} does not hold a rules version: {:?}",
                path.display(),
                text.trim()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error(format!("cannot read {}: {e}", path.display()))),
    }
}

/// Refuses to replay `pending` WAL records of `shard` that were applied under other rules than
/// this build's.
fn check_rules(data_dir: &Path, shard: u32, pending: u64) -> Result<(), Error> {
    match rules_of(data_dir)? {
        Some(v) if v == tally_engine::RULES_VERSION => Ok(()),
        Some(v) if v > tally_engine::RULES_VERSION => Err(Error(format!(
            "this data directory was written by a newer tally release (billing rules version \
             {v}; this release has {}): run that release",
            tally_engine::RULES_VERSION
        ))),
        _ if pending > 0 => Err(Error(format!(
            "shard {shard}: this data directory was written by an earlier tally release, and its \
             WAL holds {pending} records after the last checkpoint that were applied under that \
             release's billing rules; replaying them under this release's rules could change \
             what was acknowledged. Start the earlier release once more and stop it with \
             SIGTERM (a clean stop writes a checkpoint and leaves nothing to replay), then start \
             this release"
        ))),
        _ => Ok(()),
    }
}

/// Records in `<data-dir>/RULES` that the WAL's records from now on are applied under this
/// build's rules (written once every shard has recovered; tools that write a WAL themselves, such
/// as the benches, call it too).
pub fn write_rules(data_dir: &Path) -> Result<(), Error> {
    if rules_of(data_dir)? == Some(tally_engine::RULES_VERSION) {
        return Ok(());
    }
    let path = data_dir.join(RULES_FILE);
    let temp = data_dir.join("RULES.tmp");
    let fail = |e: std::io::Error| Error(format!("cannot write {}: {e}", path.display()));
    let mut file = File::create(&temp).map_err(fail)?;
    writeln!(file, "{}", tally_engine::RULES_VERSION).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&temp, &path).map_err(fail)?;
    File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(fail)
}

/// Holds `<data-dir>/LOCK` for as long as it lives.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Locks `dir` (creating it), or explains who holds it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, Error> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join("LOCK");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(Error(format!(
                "{} is in use by another tally process ({}); stop it first, or use another \
                 --data-dir",
                dir.display(),
                holder.trim()
            )));
        }
        file.set_len(0).ok();
        let _ = writeln!(file, "pid {}", std::process::id());
        Ok(DataDirLock { _file: file })
    }
}

/// Reads or records the data directory's shard count.
fn shard_count(dir: &Path, configured: u32) -> Result<u32, Error> {
    let path = dir.join("shards");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let recorded: u32 = text
                .trim()
                .parse()
                .map_err(|_| Error(format!("{} does not hold a shard count", path.display())))?;
            if recorded != configured {
                return Err(Error(format!(
                    "shards: {} was created with {recorded} shards and cannot be opened with \
                     {configured}; pass --shards {recorded}",
                    dir.display()
                )));
            }
            Ok(recorded)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let temp = dir.join("shards.tmp");
            std::fs::write(&temp, format!("{configured}\n"))
                .and_then(|()| File::open(&temp)?.sync_all())
                .and_then(|()| std::fs::rename(&temp, &path))
                .and_then(|()| File::open(dir)?.sync_all())
                .map_err(|e| Error(format!("cannot write {}: {e}", path.display())))?;
            Ok(configured)
        }
        Err(e) => Err(Error(format!("cannot read {}: {e}", path.display()))),
    }
}

/// The WAL directory of a shard.
pub fn wal_dir(data_dir: &Path, shard: u32) -> PathBuf {
    data_dir.join(format!("shard-{shard:03}")).join("wal")
}

fn wal_options(config: &Config, first_lsn: u64) -> Options {
    Options {
        segment_bytes: config.wal_segment_bytes,
        durability: match config.durability {
            DurabilitySetting::Sync => Durability::Sync,
            DurabilitySetting::None => Durability::None,
        },
        first_lsn,
    }
}

/// Recovery's reports, and the threads computing their digests.
type Digesting = (Vec<Recovered>, Vec<JoinHandle<u64>>);

/// What recovering one shard found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Recovered {
    /// The shard.
    pub shard: u32,
    /// LSN of the checkpoint it started from (0: none).
    pub checkpoint_lsn: u64,
    /// WAL records replayed after it.
    pub replayed: u64,
    /// Last LSN applied.
    pub lsn: u64,
    /// State digest after replay.
    pub digest: u64,
    /// Warnings (skipped corrupt checkpoints, a cut torn WAL tail).
    pub warnings: Vec<String>,
}

/// Rebuilds one shard's engine: newest valid checkpoint + WAL replay, stopping after
/// `until_lsn` or before the first record stamped after `until_time` when given. Effects of
/// replayed records go to `effects`.
pub fn recover_shard(
    config: &Config,
    store: &dyn Store,
    shard: u32,
    until: Until,
    effects: &mut dyn FnMut(Tagged),
) -> Result<(Engine, Wal<FileStorage>, Recovered), Error> {
    let (engine, wal, mut recovered) = replay_shard(config, store, shard, until, effects)?;
    recovered.digest = engine.digest();
    Ok((engine, wal, recovered))
}

/// [`recover_shard`] without the digest (`Recovered::digest` is 0): hashing a large state takes
/// seconds, so `Server::start` computes it on another thread while the shard serves.
fn replay_shard(
    config: &Config,
    store: &dyn Store,
    shard: u32,
    until: Until,
    effects: &mut dyn FnMut(Tagged),
) -> Result<(Engine, Wal<FileStorage>, Recovered), Error> {
    let (checkpoint, mut warnings) = store
        .load_newest(shard)
        .map_err(|e| Error(format!("shard {shard}: {e}")))?;
    let (checkpoint_lsn, mut engine) = match checkpoint {
        Some((lsn, engine)) => (lsn, engine),
        None => (0, Engine::new(config.engine())),
    };
    if until.lsn.is_some_and(|l| l < checkpoint_lsn)
        || until.time.is_some_and(|t| t < engine.state().now)
    {
        return Err(Error(format!(
            "shard {shard}: its checkpoint (LSN {checkpoint_lsn}) is newer than the restore \
             point; pick an older checkpoint with --from (see `tally snapshot list`)"
        )));
    }
    let dir = wal_dir(&config.data_dir, shard);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error(format!("cannot create {}: {e}", dir.display())))?;
    let wal = Wal::open_dir(&dir, wal_options(config, checkpoint_lsn + 1))
        .map_err(|e| Error(format!("shard {shard}: {e}")))?;
    if let Some(cut) = &wal.recovery().truncated {
        warnings.push(format!("shard {shard}: cut a torn WAL tail: {cut:?}"));
    }
    // WAL records are inputs, and replay re-applies them under this build's rules: records that
    // an earlier release applied (and answered) under other rules must not be replayed.
    let pending = wal.recovery().next_lsn.saturating_sub(checkpoint_lsn + 1);
    check_rules(&config.data_dir, shard, pending)?;
    if wal.first_lsn() > checkpoint_lsn + 1 {
        return Err(Error(format!(
            "shard {shard}: the WAL starts at LSN {} but the checkpoint ends at {checkpoint_lsn}: \
             records are missing; restore from an older checkpoint with `tally restore`",
            wal.first_lsn()
        )));
    }
    let mut replayed = 0;
    let mut lsn = checkpoint_lsn;
    {
        let mut scan = wal
            .scan(checkpoint_lsn + 1)
            .map_err(|e| Error(format!("shard {shard}: {e}")))?;
        while let Some(r) = scan
            .next()
            .map_err(|e| Error(format!("shard {shard}: {e}")))?
        {
            let decoded = record::decode(r.payload)
                .map_err(|e| Error(format!("shard {shard}: WAL record {}: {e}", r.lsn)))?;
            if until.stops_before(r.lsn, decoded.at) {
                break;
            }
            decoded
                .entry
                .apply(&mut engine, decoded.at)
                .map_err(|e| Error(format!("shard {shard}: WAL record {}: {e}", r.lsn)))?;
            let cause = match decoded.entry {
                LogEntry::Request(request) | LogEntry::RecordedRefund { request, .. } => {
                    Some(Arc::new(request))
                }
                _ => None,
            };
            let mut index = 0;
            while let Some(effect) = engine.poll_effect() {
                effects(Tagged {
                    shard,
                    lsn: r.lsn,
                    index,
                    applied_at: decoded.at,
                    effect,
                    cause: cause.clone(),
                });
                index += 1;
            }
            lsn = r.lsn;
            replayed += 1;
        }
    }
    let recovered = Recovered {
        shard,
        checkpoint_lsn,
        replayed,
        lsn,
        digest: 0,
        warnings,
    };
    Ok((engine, wal, recovered))
}

/// Where replay stops (point-in-time restore).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Until {
    /// Apply records up to and including this LSN.
    pub lsn: Option<u64>,
    /// Apply records stamped at or before this time.
    pub time: Option<Timestamp>,
}

impl Until {
    fn stops_before(&self, lsn: u64, at: Timestamp) -> bool {
        self.lsn.is_some_and(|l| lsn > l) || self.time.is_some_and(|t| at > t)
    }
}

/// The sinks a configuration asks for: the payments store (always: requested top-ups must
/// never be lost), the SQLite history store (unless turned off), JSON lines optionally. `wake`
/// is called when new top-ups are in the payments store.
pub fn open_sinks(
    config: &Config,
    wake: Option<Arc<dyn Fn() + Send + Sync>>,
) -> Result<Vec<Box<dyn Sink>>, Error> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| Error(format!("cannot create {}: {e}", config.data_dir.display())))?;
    let retention = (config.history_retention_days > 0)
        .then(|| Duration::from_secs(config.history_retention_days * 86_400));
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    let payments =
        outbound::payments::Payments::open(&config.data_dir).map_err(|e| Error(e.to_string()))?;
    sinks.push(Box::new(outbound::payments::PaymentsSink::new(
        payments, wake,
    )));
    if config.history_store {
        sinks.push(Box::new(
            SqliteSink::open(&config.data_dir, retention).map_err(|e| Error(e.to_string()))?,
        ));
    }
    if config.export_jsonl {
        let rotation = outbound::jsonl::Rotation {
            bytes: config.jsonl_rotate_bytes,
            age: Duration::from_secs(config.jsonl_rotate_secs),
            keep: config.jsonl_keep,
        };
        sinks.push(Box::new(
            FileSinks::open_with(&config.data_dir.join("outbound"), rotation)
                .map_err(|e| Error(e.to_string()))?,
        ));
    }
    Ok(sinks)
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    handle: Handle,
    shards: Vec<JoinHandle<Result<u64, CallError>>>,
    outbound: Option<JoinHandle<Result<(), outbound::Error>>>,
    outbound_tx: Option<outbound::Outbound>,
    export: Option<outbound::PostgresExport>,
    /// What recovery found; the digests are filled in by [`Server::recovered`] when their
    /// threads are done.
    recovered: std::sync::OnceLock<Vec<Recovered>>,
    digesting: Mutex<Option<Digesting>>,
    reads_early: Arc<std::sync::atomic::AtomicU64>,
    payments_wake: Arc<tokio::sync::Notify>,
    notices_wake: Arc<tokio::sync::Notify>,
    _lock: DataDirLock,
}

impl Server {
    /// Locks the data directory, recovers every shard, and starts the shard threads and the
    /// outbound thread.
    pub fn start(config: &Config, store: Box<dyn Store>) -> Result<Server, Error> {
        Self::start_with_clock(config, store, || Box::new(SystemClock))
    }

    /// [`Server::start`] with another clock (tests).
    pub fn start_with_clock(
        config: &Config,
        store: Box<dyn Store>,
        clock: impl Fn() -> Box<dyn Clock>,
    ) -> Result<Server, Error> {
        config.validate().map_err(|e| Error(e.to_string()))?;
        let lock = DataDirLock::acquire(&config.data_dir)?;
        let count = shard_count(&config.data_dir, config.shards)?;
        // The Stripe worker (started by whoever runs a runtime) waits on this for new top-ups.
        let payments_wake = Arc::new(tokio::sync::Notify::new());
        let notices_wake = Arc::new(tokio::sync::Notify::new());
        let sinks = open_sinks(config, {
            let (wake, notices) = (Arc::clone(&payments_wake), Arc::clone(&notices_wake));
            Some(Arc::new(move || {
                wake.notify_one();
                notices.notify_one();
            }))
        })?;
        let mut lags: Vec<Arc<outbound::Lag>> =
            sinks.iter().map(|s| outbound::Lag::new(s.name())).collect();
        if config.export_postgres.is_some() {
            // Before the outbound thread writes the history store (see `prepare`).
            outbound::PostgresExport::prepare(&config.data_dir, count)
                .map_err(|e| Error(e.to_string()))?;
        }
        let (outbound_tx, outbound_rx) = outbound::queue(config.outbound_queue_depth);
        let outbound = outbound::spawn(sinks, outbound_rx, lags.clone());
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        let mut recovered = Vec::new();
        let mut digests = Vec::new();
        let reads_early = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let alive: Arc<[AtomicBool]> = (0..count).map(|_| AtomicBool::new(true)).collect();
        let options = ShardOptions {
            batch_max: config.batch_max,
            snapshot_every_records: config.snapshot_every_records,
            snapshot_every: Duration::from_secs(config.snapshot_every_secs),
        };
        let shared: Arc<dyn Store> = Arc::from(store.clone_box());
        let checkpoints: Arc<dyn Checkpoints> = shared;
        // Shards recover side by side, each on a thread of its own: recovery time is the
        // slowest shard's, not the sum.
        let recoveries: Vec<Result<_, Error>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..count)
                .map(|shard| {
                    let outbound_tx = outbound_tx.clone();
                    let store = store.as_ref();
                    scope.spawn(move || {
                        // Replayed effects go to the outbound thread in chunks as replay runs
                        // (it skips the ones it already wrote), instead of piling up: 10 M
                        // records make ~20 M effects. The queue is bounded in effects, so replay
                        // waits for the sinks when it outruns them.
                        const CHUNK: usize = 4_096;
                        let mut replayed = Vec::new();
                        let mut outbound_gone = false;
                        let (engine, wal, report) =
                            replay_shard(config, store, shard, Until::default(), &mut |t| {
                                replayed.push(t);
                                if replayed.len() >= CHUNK {
                                    let chunk =
                                        std::mem::replace(&mut replayed, Vec::with_capacity(CHUNK));
                                    outbound_gone |= outbound_tx.send(chunk).is_err();
                                }
                            })?;
                        if !replayed.is_empty() {
                            outbound_gone |= outbound_tx.send(replayed).is_err();
                        }
                        if outbound_gone {
                            return Err(Error(
                                "the outbound thread stopped during recovery".into(),
                            ));
                        }
                        Ok((engine, wal, report))
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err(Error("a shard's recovery panicked".into())))
                })
                .collect()
        });
        if recoveries.iter().all(Result::is_ok) {
            write_rules(&config.data_dir)?;
        }
        let recoveries: Vec<_> = recoveries.into_iter().collect::<Result<_, _>>()?;
        // A crash during a catalog broadcast can leave shards behind by that one command: they
        // get it before anything is served.
        let catalog_behind = {
            let states: Vec<&tally_engine::State> =
                recoveries.iter().map(|(e, _, _)| e.state()).collect();
            crate::catalog::behind(&config.data_dir, &states)?
        };
        for (shard, (engine, wal, report)) in (0..count).zip(recoveries) {
            for warning in &report.warnings {
                tracing::warn!(shard, "{warning}");
            }
            tracing::info!(
                shard,
                checkpoint_lsn = report.checkpoint_lsn,
                replayed = report.replayed,
                lsn = report.lsn,
                "shard recovered"
            );
            // The digest of the recovered state, off the start path: hashing a large state takes
            // seconds. A copy of the state (wallets are shared copy-on-write, as for checkpoints)
            // is hashed on a thread of its own; the log line comes when it is done.
            digests.push({
                let state = engine.state().clone();
                std::thread::Builder::new()
                    .name(format!("tally-digest-{shard}"))
                    .spawn(move || {
                        let digest = tally_engine::digest_state(&state);
                        tracing::info!(
                            shard,
                            digest = %format!("{digest:016x}"),
                            "recovered state digest"
                        );
                        digest
                    })
                    .map_err(|e| Error(format!("cannot start a digest thread: {e}")))?
            });
            let replayed = report.replayed;
            recovered.push(report);
            let (tx, rx, queued) = crate::shard::queue(config.queue_depth);
            senders.push(tx);
            let runner = Shard::new(
                shard,
                engine,
                wal,
                (rx, queued),
                outbound_tx.clone(),
                clock(),
                checkpoints.clone(),
                options.clone(),
            )
            .replayed(replayed)
            .settings(config.engine())
            .counting_early_reads(Arc::clone(&reads_early));
            threads.push(
                std::thread::Builder::new()
                    .name(format!("tally-shard-{shard}"))
                    .spawn({
                        let alive = alive.clone();
                        move || {
                            let result = runner.run();
                            alive[shard as usize].store(false, Ordering::Release);
                            result
                        }
                    })
                    .map_err(|e| Error(format!("cannot start shard thread: {e}")))?,
            );
        }
        if let Some((lagging, request)) = catalog_behind {
            for shard in lagging {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let reply = senders[shard as usize]
                    .send(crate::shard::Message::Request(request.clone(), tx))
                    .map_err(|_| CallError::Stopped)
                    .and_then(|()| rx.blocking_recv().unwrap_or(Err(CallError::Stopped)))
                    .map_err(|e| format!("{e}"))
                    .and_then(|reply| match reply.code.is_ok() {
                        true => Ok(reply),
                        false => Err(format!("it answered {:?}", reply.code)),
                    });
                let reply = match reply {
                    Ok(reply) => reply,
                    Err(why) => {
                        // Stop the shards before the lock goes, then refuse the start.
                        for sender in &senders {
                            let _ = sender.send(crate::shard::Message::Stop);
                        }
                        for thread in threads {
                            let _ = thread.join();
                        }
                        return Err(Error(format!(
                            "shard {shard} missed the last catalog command, and applying it at \
                             the start failed: {why}"
                        )));
                    }
                };
                tracing::warn!(
                    shard,
                    request = %format!("{:032x}", request.id.0),
                    code = ?reply.code,
                    "the process stopped while it sent a catalog command to the shards; this shard \
                     had not logged it and has now applied it"
                );
            }
        }
        let export = match &config.export_postgres {
            Some(url) => Some(
                outbound::PostgresExport::start(url, &config.data_dir, count)
                    .map_err(|e| Error(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Server {
            handle: Handle::new(senders, alive, {
                lags.extend(export.as_ref().map(|e| e.lag()));
                lags.into()
            })
            .recording_catalog_in(&config.data_dir),
            shards: threads,
            outbound: Some(outbound),
            outbound_tx: Some(outbound_tx),
            export,
            recovered: std::sync::OnceLock::new(),
            digesting: Mutex::new(Some((recovered, digests))),
            reads_early,
            payments_wake,
            notices_wake,
            _lock: lock,
        })
    }

    /// The in-process entry point.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Notified whenever new top-up requests reach the payments store (for the Stripe worker).
    pub fn payments_wake(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.payments_wake)
    }

    /// Notified whenever new notices for the operator's webhooks are stored (for the sender).
    pub fn notices_wake(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.notices_wake)
    }

    /// Reads of a wallet answered at once because its last write was durable already (all
    /// shards; also the metric `tally_reads_early_total`).
    pub fn reads_early(&self) -> u64 {
        self.reads_early.load(Ordering::Relaxed)
    }

    /// What recovery found, per shard.
    ///
    /// The digests are computed on threads of their own after recovery; the first call waits
    /// for them.
    pub fn recovered(&self) -> &[Recovered] {
        self.recovered.get_or_init(|| {
            let taken = self
                .digesting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            let Some((mut recovered, digests)) = taken else {
                return Vec::new();
            };
            for (report, digest) in recovered.iter_mut().zip(digests) {
                // A panicking digest thread leaves 0, which no state hashes to in practice.
                report.digest = digest.join().unwrap_or(0);
            }
            recovered
        })
    }

    /// Stops intake, lets every shard finish and sync what it queued, flushes the outbound
    /// sinks, and returns each shard's final digest.
    pub fn shutdown(mut self) -> Result<Vec<u64>, Error> {
        self.handle.stop();
        let mut digests = Vec::new();
        let mut failure = None;
        for (i, thread) in self.shards.drain(..).enumerate() {
            match thread.join() {
                Ok(Ok(digest)) => digests.push(digest),
                Ok(Err(e)) => failure = Some(format!("shard {i}: {e}")),
                Err(_) => failure = Some(format!("shard {i} panicked")),
            }
        }
        drop(self.outbound_tx.take());
        if let Some(export) = self.export.take() {
            export.stop();
        }
        if let Some(outbound) = self.outbound.take() {
            match outbound.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = Some(e.to_string()),
                Err(_) => failure = Some("the outbound thread panicked".into()),
            }
        }
        match failure {
            Some(f) => Err(Error(f)),
            None => Ok(digests),
        }
    }
}
