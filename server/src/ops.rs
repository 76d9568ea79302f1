//! Operator commands on a data directory that no server holds: checkpoints, point-in-time
//! restore, WAL inspection. Each takes the data directory's lock for its whole run, prints data
//! to stdout (text, or one JSON document with `json`), and returns an error that says what is
//! wrong.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tally_engine::Timestamp;
use tally_wal::Wal;

use crate::config::Config;
use crate::record::{self, LogEntry};
use crate::server::{recover_shard, wal_dir, DataDirLock, Store, Until};
use crate::store::SnapshotStore;

/// What `tally snapshot` does.
#[derive(Debug, Clone)]
pub enum SnapshotAction {
    /// List checkpoints.
    List,
    /// Verify every checkpoint.
    Verify,
    /// Show one checkpoint.
    Inspect(PathBuf),
    /// Replay and write a fresh checkpoint.
    Create,
}

fn print<T: Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text());
    }
    Ok(())
}

/// Locks an existing data directory (never creates one) and returns the configuration with its
/// recorded shard count, which is what the ops commands work on.
fn open_existing(config: &Config) -> Result<(DataDirLock, Config)> {
    let path = config.data_dir.join("shards");
    if !path.is_file() {
        bail!(
            "{} is not a tally data directory (it has no `shards` file)",
            config.data_dir.display()
        );
    }
    let lock = DataDirLock::acquire(&config.data_dir)?;
    let shards = std::fs::read_to_string(&path)?
        .trim()
        .parse()
        .with_context(|| format!("{} does not hold a shard count", path.display()))?;
    Ok((
        lock,
        Config {
            shards,
            ..config.clone()
        },
    ))
}

/// `tally snapshot list | verify | inspect | create`.
pub fn snapshot((config, json, action): (Config, bool, SnapshotAction)) -> Result<()> {
    let (_lock, config) = open_existing(&config)?;
    let store = SnapshotStore::open(&config)?;
    match action {
        SnapshotAction::List => {
            let list = store.list()?;
            print(json, &list, || {
                let mut out = String::from(
                    "shard  lsn                  created (µs since epoch)  bytes      file\n",
                );
                for s in &list {
                    out += &format!(
                        "{:<5}  {:<19}  {:<24}  {:<9}  {}\n",
                        s.shard, s.lsn, s.created_at_us, s.bytes, s.path
                    );
                }
                if list.is_empty() {
                    out += "(no checkpoints)\n";
                }
                out
            })
        }
        SnapshotAction::Verify => {
            let results = store.verify_all()?;
            let bad = results.iter().filter(|r| r.error.is_some()).count();
            print(json, &results, || {
                let mut out = String::new();
                for r in &results {
                    match &r.error {
                        None => {
                            out += &format!(
                                "ok    {}  digest {:016x}\n",
                                r.path,
                                r.digest.unwrap_or(0)
                            )
                        }
                        Some(e) => out += &format!("BAD   {}  {e}\n", r.path),
                    }
                }
                out += &format!("{} checkpoints, {} bad\n", results.len(), bad);
                out
            })?;
            if bad > 0 {
                bail!("{bad} checkpoint(s) failed verification");
            }
            Ok(())
        }
        SnapshotAction::Inspect(file) => {
            let summary = store.inspect(&file)?;
            print(json, &summary, || {
                format!(
                    "file        {}\nshard       {}\nlsn         {}\ncreated     {} µs\nwallets     {}\nassets      {}\nproducts    {}\nplans       {}\nrequests    {} remembered\njournal     {} entries\ndigest      {:016x}\n",
                    summary.path, summary.shard, summary.lsn, summary.created_at_us, summary.wallets,
                    summary.assets, summary.products, summary.plans, summary.requests,
                    summary.journal_seq, summary.digest
                )
            })
        }
        SnapshotAction::Create => {
            let count = config.shards;
            let mut written = Vec::new();
            // The replayed effects reach the sinks (which skip what they hold) before the
            // checkpoint that makes the WAL below it unnecessary is written: nothing is lost.
            let mut sinks = crate::server::open_sinks(&config, None)?;
            for shard in 0..count {
                let mut failed = None;
                let (engine, wal, report) =
                    recover_shard(&config, &store, shard, Until::default(), &mut |t| {
                        if failed.is_none() {
                            failed = crate::outbound::write_all(&mut sinks, &t).err();
                        }
                    })?;
                if let Some(e) = failed {
                    return Err(e.into());
                }
                for sink in sinks.iter_mut() {
                    sink.flush()?;
                }
                let now = engine.state().now;
                crate::shard::Checkpoints::write(&store, shard, report.lsn, now, engine.state())
                    .map_err(anyhow::Error::msg)?;
                drop(wal);
                written.push(report);
            }
            print(json, &written, || {
                written
                    .iter()
                    .map(|r| {
                        format!(
                            "shard {} checkpoint at LSN {} digest {:016x}\n",
                            r.shard, r.lsn, r.digest
                        )
                    })
                    .collect()
            })
        }
    }
}

/// `tally restore`: rebuilds each shard of the `source` data directory from a checkpoint (the
/// `from` files, or each shard's newest valid one) and its WAL up to a point, and writes the
/// result as the first checkpoint of the new data directory `to`.
pub fn restore(
    source: &Config,
    from: &[PathBuf],
    to: &Path,
    until: Until,
    json: bool,
) -> Result<()> {
    let (_lock, source) = open_existing(source)?;
    let config = &source;
    let count = config.shards;
    if to.exists() && std::fs::read_dir(to)?.next().is_some() {
        bail!(
            "{} exists and is not empty: restore only into a new directory",
            to.display()
        );
    }
    let source = SnapshotStore::open(config)?;
    let source: Box<dyn Store> = Box::new(source.pinned(from)?);
    let target = Config {
        data_dir: to.to_path_buf(),
        shards: count,
        ..config.clone()
    };
    let _target_lock = DataDirLock::acquire(to)?;
    std::fs::write(to.join("shards"), format!("{count}\n"))?;
    let target_store = SnapshotStore::open(&target)?;
    let mut reports = Vec::new();
    let mut engines = Vec::new();
    // The catalog commands that may have reached some shards and not others by the point
    // restored to: the last one each shard replayed, and the last one the source recorded.
    let mut candidates: Vec<tally_engine::Request> = crate::catalog::recorded(&config.data_dir)?
        .into_iter()
        .collect();
    for shard in 0..count {
        let (engine, wal, report) =
            recover_shard(config, source.as_ref(), shard, until, &mut |_| {})?;
        if report.replayed > 0 {
            candidates.extend(last_catalog_command(
                &wal,
                report.checkpoint_lsn + 1,
                report.lsn,
            )?);
        }
        drop(wal);
        engines.push(engine);
        reports.push(report);
    }
    // A broadcast can straddle the point restored to; the shards behind get its command.
    let states: Vec<&tally_engine::State> = engines.iter().map(|e| e.state()).collect();
    if let Some((lagging, request)) = crate::catalog::explain(&states, &candidates)? {
        for shard in lagging {
            let engine = &mut engines[shard as usize];
            engine.handle_request(engine.state().now, &request);
            while engine.poll_effect().is_some() {}
            reports[shard as usize].digest = engine.digest();
        }
    }
    for (shard, (engine, report)) in (0..count).zip(engines.iter().zip(&reports)) {
        crate::shard::Checkpoints::write(
            &target_store,
            shard,
            report.lsn,
            engine.state().now,
            engine.state(),
        )
        .map_err(anyhow::Error::msg)?;
    }
    print(json, &reports, || {
        let mut out = String::new();
        for r in &reports {
            out += &format!(
                "shard {}: restored to LSN {} (checkpoint {} + {} records), digest {:016x}\n",
                r.shard, r.lsn, r.checkpoint_lsn, r.replayed, r.digest
            );
        }
        out += &format!(
            "restored into {}; run it with: tally serve --data-dir {}\n",
            to.display(),
            to.display()
        );
        out
    })
}

/// The last catalog command (a request for no wallet) among the WAL records `from..=to`.
fn last_catalog_command(
    wal: &tally_wal::Wal<tally_wal::FileStorage>,
    from: u64,
    to: u64,
) -> Result<Option<tally_engine::Request>> {
    let mut last = None;
    let mut scan = wal.scan(from)?;
    while let Some(record) = scan.next()? {
        if record.lsn > to {
            break;
        }
        if let Ok(crate::record::LogRecord {
            entry: crate::record::LogEntry::Request(request),
            ..
        }) = crate::record::decode(record.payload)
        {
            if request.command.wallet().is_none() {
                last = Some(request);
            }
        }
    }
    Ok(last)
}

#[derive(Serialize)]
struct WalSummary {
    shard: u32,
    segments: usize,
    first_lsn: u64,
    last_lsn: u64,
    requests: u64,
    ticks: u64,
    first_at_us: Option<i64>,
    last_at_us: Option<i64>,
    torn_tail: Option<String>,
}

/// `tally wal inspect`.
pub fn wal_inspect(config: &Config, json: bool) -> Result<()> {
    let (_lock, config) = open_existing(config)?;
    let config = &config;
    let count = config.shards;
    let mut summaries = Vec::new();
    for shard in 0..count {
        let dir = wal_dir(&config.data_dir, shard);
        let wal = Wal::open_dir(&dir, tally_wal::Options::default())
            .with_context(|| format!("shard {shard}: cannot open {}", dir.display()))?;
        let mut s = WalSummary {
            shard,
            segments: wal.segment_count(),
            first_lsn: wal.first_lsn(),
            last_lsn: wal.next_lsn() - 1,
            requests: 0,
            ticks: 0,
            first_at_us: None,
            last_at_us: None,
            torn_tail: wal.recovery().truncated.as_ref().map(|t| format!("{t:?}")),
        };
        let mut scan = wal.scan(wal.first_lsn())?;
        while let Some(r) = scan.next()? {
            let decoded = record::decode(r.payload)
                .with_context(|| format!("shard {shard}: WAL record {}", r.lsn))?;
            match decoded.entry {
                LogEntry::Request(_) | LogEntry::RecordedRefund { .. } => s.requests += 1,
                LogEntry::Tick | LogEntry::Settings { .. } | LogEntry::Alerts { .. } => {
                    s.ticks += 1
                }
            }
            s.first_at_us.get_or_insert(decoded.at.0);
            s.last_at_us = Some(decoded.at.0);
        }
        summaries.push(s);
    }
    print(json, &summaries, || {
        let mut out = String::new();
        for s in &summaries {
            out += &format!(
                "shard {}: {} segment(s), LSN {}..={}, {} requests, {} ticks{}\n",
                s.shard,
                s.segments,
                s.first_lsn,
                s.last_lsn,
                s.requests,
                s.ticks,
                s.torn_tail
                    .as_ref()
                    .map_or(String::new(), |t| format!(", torn tail cut: {t}"))
            );
        }
        out
    })
}

/// Parses an RFC 3339 UTC time (`2026-11-24T18:00:00Z`, optional fraction, `Z` or `+00:00`).
pub fn parse_rfc3339(text: &str) -> Result<Timestamp> {
    Timestamp::parse_rfc3339(text).map_err(anyhow::Error::msg)
}
