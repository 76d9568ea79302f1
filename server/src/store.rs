//! Checkpoints on disk: the server's [`Store`] over `tally_snapshots::SnapshotDir`, in
//! `<data-dir>/snapshots/`, plus the views the ops commands print.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use tally_engine::{Engine, State, Timestamp};
use tally_snapshots::SnapshotDir;

use crate::config::Config;
use crate::server::{Error, Loaded, Store};
use crate::shard::Checkpoints;

/// The checkpoint store of a data directory.
#[derive(Clone, Debug)]
pub struct SnapshotStore {
    dir: Arc<SnapshotDir>,
    shard_count: u32,
    keep: usize,
    /// Files to start from instead of the newest, per shard (point-in-time restore).
    pinned: BTreeMap<u32, PathBuf>,
}

/// A checkpoint file as listed.
#[derive(Clone, Debug, Serialize)]
pub struct Listed {
    /// The file.
    pub path: String,
    /// Its shard.
    pub shard: u32,
    /// Last LSN applied.
    pub lsn: u64,
    /// When it was taken, µs since the epoch (0 if its header is unreadable).
    pub created_at_us: i64,
    /// Size.
    pub bytes: u64,
    /// Whether its header checks out.
    pub header_ok: bool,
}

/// The result of verifying one checkpoint.
#[derive(Clone, Debug, Serialize)]
pub struct Verified {
    /// The file.
    pub path: String,
    /// The state digest, when it loaded.
    pub digest: Option<u64>,
    /// Why it is unusable, if it is.
    pub error: Option<String>,
}

/// What one checkpoint holds.
#[derive(Clone, Debug, Serialize)]
pub struct Inspected {
    /// The file.
    pub path: String,
    /// Its shard.
    pub shard: u32,
    /// Last LSN applied.
    pub lsn: u64,
    /// When it was taken.
    pub created_at_us: i64,
    /// Wallets.
    pub wallets: usize,
    /// Assets.
    pub assets: usize,
    /// Products.
    pub products: usize,
    /// Plans.
    pub plans: usize,
    /// Remembered request ids.
    pub requests: usize,
    /// Journal entries written so far.
    pub journal_seq: u64,
    /// State digest.
    pub digest: u64,
}

fn err(e: impl std::fmt::Display) -> Error {
    Error(e.to_string())
}

impl SnapshotStore {
    /// Opens `<data-dir>/snapshots`.
    pub fn open(config: &Config) -> Result<SnapshotStore, Error> {
        let dir = SnapshotDir::open(config.data_dir.join("snapshots")).map_err(err)?;
        Ok(SnapshotStore {
            dir: Arc::new(dir),
            shard_count: config.shards,
            keep: config.snapshots_keep,
            pinned: BTreeMap::new(),
        })
    }

    /// This store, but starting the shard of each given file from that file.
    pub fn pinned(&self, files: &[PathBuf]) -> Result<SnapshotStore, Error> {
        let mut store = self.clone();
        for file in files {
            let header = tally_snapshots::read_header(file).map_err(err)?;
            if store.pinned.insert(header.shard, file.clone()).is_some() {
                return Err(Error(format!(
                    "two --from files for shard {}",
                    header.shard
                )));
            }
        }
        Ok(store)
    }

    /// Every checkpoint file, oldest first per shard.
    pub fn list(&self) -> Result<Vec<Listed>, Error> {
        Ok(self
            .dir
            .list()
            .map_err(err)?
            .into_iter()
            .map(|s| Listed {
                path: s.path.display().to_string(),
                shard: s.shard,
                lsn: s.lsn,
                created_at_us: s.created_at().map_or(0, |t| t.0),
                bytes: s.size_bytes,
                header_ok: s.header.is_some(),
            })
            .collect())
    }

    /// Loads every checkpoint fully and checks its state.
    pub fn verify_all(&self) -> Result<Vec<Verified>, Error> {
        let mut out = Vec::new();
        for info in self.dir.list().map_err(err)? {
            let loaded = self
                .dir
                .load(&info)
                .map_err(|e| e.to_string())
                .and_then(|state| Engine::from_state(state).map_err(|e| e.to_string()));
            out.push(Verified {
                path: info.path.display().to_string(),
                digest: loaded.as_ref().ok().map(Engine::digest),
                error: loaded.err(),
            });
        }
        Ok(out)
    }

    /// Loads one checkpoint file and summarises it.
    pub fn inspect(&self, file: &Path) -> Result<Inspected, Error> {
        let info = self
            .dir
            .list()
            .map_err(err)?
            .into_iter()
            .find(|i| same_file(&i.path, file))
            .ok_or_else(|| {
                Error(format!(
                    "{} is not a checkpoint of {}",
                    file.display(),
                    self.dir.path().display()
                ))
            })?;
        let state = self.dir.load(&info).map_err(err)?;
        let engine = Engine::from_state(state).map_err(err)?;
        let state = engine.state();
        Ok(Inspected {
            path: info.path.display().to_string(),
            shard: info.shard,
            lsn: info.lsn,
            created_at_us: info.created_at().map_or(0, |t| t.0),
            wallets: state.wallets.len(),
            assets: state.assets.len(),
            products: state.products.len(),
            plans: state.plans.len(),
            requests: state.requests.len(),
            journal_seq: state.journal_seq,
            digest: engine.digest(),
        })
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

impl Checkpoints for SnapshotStore {
    fn write(&self, shard: u32, lsn: u64, at: Timestamp, state: &State) -> Result<u64, String> {
        self.dir
            .write(shard, self.shard_count, lsn, at, state)
            .map_err(|e| e.to_string())?;
        self.dir.prune(self.keep).map_err(|e| e.to_string())?;
        let oldest = self.dir.oldest_kept_lsn(shard).map_err(|e| e.to_string())?;
        Ok(oldest.unwrap_or(lsn) + 1)
    }
}

impl Store for SnapshotStore {
    fn load_newest(&self, shard: u32) -> Result<Loaded, String> {
        if let Some(file) = self.pinned.get(&shard) {
            let info = self
                .dir
                .list()
                .map_err(|e| e.to_string())?
                .into_iter()
                .find(|i| same_file(&i.path, file))
                .ok_or_else(|| {
                    format!("{} is not in {}", file.display(), self.dir.path().display())
                })?;
            let state = self.dir.load(&info).map_err(|e| e.to_string())?;
            let engine =
                Engine::from_state(state).map_err(|e| format!("{}: {e}", info.path.display()))?;
            return Ok((Some((info.lsn, engine)), Vec::new()));
        }
        // Newest first; a file that does not load, or whose state breaks the engine's
        // invariants, is skipped with a warning naming it, and the next older one is tried.
        let mut infos = self.dir.list_shard(shard).map_err(|e| e.to_string())?;
        infos.sort_by_key(|i| i.lsn);
        let mut warnings = Vec::new();
        for info in infos.into_iter().rev() {
            if let Some(header) = info.header {
                if header.shard_count != self.shard_count {
                    return Err(format!(
                        "{} was written by {} shards, this data directory has {}",
                        info.path.display(),
                        header.shard_count,
                        self.shard_count
                    ));
                }
            }
            let loaded = self
                .dir
                .load(&info)
                .map_err(|e| e.to_string())
                .and_then(|state| Engine::from_state(state).map_err(|e| e.to_string()));
            match loaded {
                Ok(engine) => return Ok((Some((info.lsn, engine)), warnings)),
                Err(why) => warnings.push(format!(
                    "skipped unusable snapshot {}: {why}",
                    info.path.display()
                )),
            }
        }
        Ok((None, warnings))
    }

    fn clone_box(&self) -> Box<dyn Store> {
        Box::new(self.clone())
    }
}
