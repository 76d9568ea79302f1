//! Power loss during checkpoints and pruning, on the simulated disk of `tally_snapshots::sim`.
//!
//! Each case runs a seeded workload (checkpoints of three shards at growing LSNs, prunes),
//! cuts the power after a seeded number of storage operations (inside a write, between a write
//! and its sync, between a rename and the directory sync, in a prune, or not at all), and
//! recovers from what the disk kept: only synced data and names, or, in every other case, a
//! seeded share of the unsynced writes too. Then for every shard: the directory opens, no file
//! is damaged, `load_newest` returns exactly a state that was written, and never one older than
//! the newest checkpoint whose `write` returned Ok, whatever prunes ran; and no file a prune
//! that returned Ok deleted comes back.
//!
//! `TALLY_POWER_LOSS_CASES` sets the number of cases (default 200).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use common::{Shard, T0};
use tally_engine::{name, Engine, State, Timestamp};
use tally_snapshots::{sim::SimStorage, Error, SnapshotDir, Storage};

const SHARDS: u32 = 3;
const DIR: &str = "/data/snapshots";

fn cases() -> u64 {
    std::env::var("TALLY_POWER_LOSS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// splitmix64: the test's only source of choices, seeded per case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A disk whose data directory exists durably, as the server's does.
fn disk() -> SimStorage {
    let sim = SimStorage::new();
    sim.create_dir(Path::new("/data")).unwrap();
    sim.sync_dir(Path::new("/")).unwrap();
    sim
}

/// What the workload did before the power went.
#[derive(Default)]
struct Outcome {
    /// Every state a `write` was called with, by (shard, LSN).
    attempted: BTreeMap<(u32, u64), State>,
    /// The newest LSN whose `write` returned Ok, per shard.
    acknowledged: BTreeMap<u32, u64>,
    /// Files a prune that returned Ok deleted (and no later write made again).
    pruned: BTreeSet<PathBuf>,
    /// Where the power loss interrupted it: the call and the failed file-system operation.
    interrupted: Option<String>,
}

/// The seeded workload. Stops at the first error, which must be the power loss.
fn workload(sim: &SimStorage, seed: u64) -> Outcome {
    let mut rng = Rng(seed);
    let mut out = Outcome::default();
    let stop = |out: &mut Outcome, call: &str, error: Error| {
        assert!(
            sim.crashed(),
            "seed {seed}: {call} failed without a crash: {error}"
        );
        let operation = match &error {
            Error::Io { operation, .. } => *operation,
            other => panic!("seed {seed}: {call} failed with {other}"),
        };
        out.interrupted = Some(format!("{call}: {operation}"));
    };
    let dir = match SnapshotDir::open_in(sim.clone(), DIR) {
        Ok(dir) => dir,
        Err(e) => {
            stop(&mut out, "open", e);
            return out;
        }
    };
    let mut shards: Vec<Shard> = (0..SHARDS).map(|s| Shard::new(1 + s as usize)).collect();
    let mut lsns = [0u64; SHARDS as usize];
    for step in 0..12 {
        if step > 2 && rng.below(3) == 0 {
            let keep = 1 + rng.below(2) as usize;
            match dir.prune(keep) {
                Ok(deleted) => out.pruned.extend(deleted),
                Err(e) => {
                    stop(&mut out, "prune", e);
                    return out;
                }
            }
            continue;
        }
        let s = rng.below(u64::from(SHARDS)) as u32;
        let shard = &mut shards[s as usize];
        // Now and then the same LSN (so the same state) again: the rename replaces the file.
        if lsns[s as usize] == 0 || rng.below(6) != 0 {
            shard.usage(name("w0"), &(100 + rng.below(900)).to_string(), "7");
            lsns[s as usize] += 1 + rng.below(50);
        }
        let lsn = lsns[s as usize];
        let state = shard.engine.state().clone();
        let at = Timestamp(T0 + lsn as i64);
        out.pruned
            .remove(&Path::new(DIR).join(format!("shard-{s:04}-{lsn:020}.snap")));
        let result = dir.write(s, SHARDS, lsn, at, &state);
        out.attempted.insert((s, lsn), state);
        match result {
            Ok(info) => {
                assert_eq!((info.shard, info.lsn), (s, lsn));
                out.acknowledged.insert(s, lsn);
            }
            Err(e) => {
                stop(&mut out, "write", e);
                return out;
            }
        }
    }
    out
}

/// Recovery on the disk the power loss left, checked against what the workload did.
fn check(after: &SimStorage, out: &Outcome, seed: u64) {
    let dir = SnapshotDir::open_in(after.clone(), DIR)
        .unwrap_or_else(|e| panic!("seed {seed}: the directory does not open: {e}"));
    for info in dir.list().unwrap() {
        dir.verify(&info)
            .unwrap_or_else(|e| panic!("seed {seed}: a damaged snapshot is visible: {e}"));
        assert!(
            !out.pruned.contains(&info.path),
            "seed {seed}: {} came back after a prune that returned Ok",
            info.path.display()
        );
    }
    for shard in 0..SHARDS {
        let recovered = dir.load_newest(shard).unwrap();
        assert!(
            recovered.warnings.is_empty(),
            "seed {seed}: shard {shard} fell back: {:?}",
            recovered.warnings
        );
        let acknowledged = out.acknowledged.get(&shard).copied();
        let Some((info, state)) = recovered.newest else {
            assert_eq!(
                acknowledged, None,
                "seed {seed}: shard {shard} lost every checkpoint, one was acknowledged"
            );
            continue;
        };
        assert!(
            info.lsn >= acknowledged.unwrap_or(0),
            "seed {seed}: shard {shard} recovered LSN {} though LSN {acknowledged:?} was \
             acknowledged",
            info.lsn
        );
        let written = out.attempted.get(&(shard, info.lsn)).unwrap_or_else(|| {
            panic!(
                "seed {seed}: shard {shard} LSN {} was never written",
                info.lsn
            )
        });
        // Derived fields (`#[serde(skip)]`) are rebuilt by `from_state`: whole states compare.
        let restored = Engine::from_state(state)
            .unwrap_or_else(|e| panic!("seed {seed}: shard {shard}: invalid state: {e:?}"));
        assert!(
            restored.state() == written,
            "seed {seed}: shard {shard} LSN {} is not the state written",
            info.lsn
        );
    }
    // The directory works on: a prune clears temp files a crash left, a write lands.
    dir.prune(1).unwrap();
    let names = after.list(Path::new(DIR)).unwrap();
    assert!(
        names
            .iter()
            .all(|(n, _)| !n.to_string_lossy().ends_with(".tmp")),
        "seed {seed}: temp files left after prune: {names:?}"
    );
    let fresh = Shard::new(1);
    dir.write(0, SHARDS, 1_000_000, Timestamp(T0), fresh.engine.state())
        .unwrap();
}

#[test]
fn checkpoints_and_prunes_survive_power_loss_at_every_point() {
    let cases = cases();
    let mut interrupted: BTreeMap<String, u64> = BTreeMap::new();
    for case in 0..cases {
        let seed = 0x5eed_0000 + case;
        // A dry run counts the workload's operations; the crash lands anywhere among them
        // (or after the last: no crash).
        let dry = disk();
        let before = dry.ops();
        workload(&dry, seed);
        let ops = dry.ops() - before;

        let sim = disk();
        let mut rng = Rng(seed ^ 0xc0ff_ee00);
        sim.crash_after(rng.below(ops + 1));
        let out = workload(&sim, seed);
        *interrupted
            .entry(out.interrupted.clone().unwrap_or_else(|| "no crash".into()))
            .or_default() += 1;

        // Even cases keep only synced data and names; odd ones some unsynced writes too.
        let after = if case % 2 == 0 {
            sim.power_loss()
        } else {
            sim.power_loss_with(|n| rng.below(n as u64 + 1) as usize)
        };
        check(&after, &out, seed);
    }
    eprintln!("{cases} cases, interrupted in: {interrupted:#?}");
    if cases >= 200 {
        for point in [
            "write: create temp file",
            "write: write",
            "write: write header of",
            "write: sync temp file",
            "write: rename temp file into",
            "write: sync directory",
            "prune: delete",
            "prune: sync directory",
            "no crash",
        ] {
            assert!(
                interrupted.contains_key(point),
                "never interrupted in {point}"
            );
        }
    }
}

#[test]
fn a_directory_created_with_its_parents_survives_power_loss() {
    let sim = SimStorage::new();
    let dir = SnapshotDir::open_in(sim.clone(), "/new/data/snapshots").unwrap();
    let shard = Shard::new(1);
    dir.write(0, 1, 7, Timestamp(T0), shard.engine.state())
        .unwrap();
    let after = SnapshotDir::open_in(sim.power_loss(), "/new/data/snapshots").unwrap();
    let (info, _) = after
        .load_newest(0)
        .unwrap()
        .newest
        .expect("the acknowledged snapshot and its directory survive");
    assert_eq!(info.lsn, 7);
}
