//! Catalog commands reach every shard: all of them, or the ones behind get it at the next start.
//!
//! A catalog command (assets, products, plans) is sent to the shards one after another under a
//! lock ([`crate::Handle::call`]), and each shard logs it in its own WAL. A crash between two
//! shards' syncs would leave it on some shards and not on others, and a usage event would then be
//! priced on one shard and refused on another. So before the broadcast, the command is written
//! durably to `<data-dir>/catalog-last` ([`record`]): under the lock, only the last catalog
//! command can be partly applied. At start, once every shard has recovered, [`behind`] compares
//! the shards' catalogs. If they differ, the shards behind are those whose catalog becomes the
//! others' when that command is applied to it; the server applies it to them (through their WALs,
//! with its own request id) before it serves anything. Catalogs that this does not explain stop
//! the start with an error, rather than serve shards that price differently.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use tally_engine::{Engine, Request, State, Timestamp};

use crate::record::{self, LogEntry};
use crate::server::Error;

/// The file that holds the last catalog command, in the data directory.
pub const FILE: &str = "catalog-last";

/// Writes `request` as the last catalog command, durably (a temporary file, synced, renamed over
/// the old one, and the directory synced), before it is sent to any shard.
pub fn record(data_dir: &Path, request: &Request) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    record::encode_request(Timestamp(0), request, &mut bytes);
    let temp = data_dir.join(format!("{FILE}.tmp"));
    let mut file = File::create(&temp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, data_dir.join(FILE))?;
    File::open(data_dir)?.sync_all()
}

/// The last catalog command recorded, if any.
fn last(data_dir: &Path) -> Result<Option<Request>, Error> {
    let path = data_dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error(format!("cannot read {}: {e}", path.display()))),
    };
    match record::decode(&bytes) {
        Ok(record::LogRecord {
            entry: LogEntry::Request(request),
            ..
        }) => Ok(Some(request)),
        Ok(_) => Err(Error(format!("{} holds no request", path.display()))),
        Err(e) => Err(Error(format!("{} does not decode: {e}", path.display()))),
    }
}

/// What a shard's catalog is, as bytes that are equal exactly when the catalogs are. The times
/// drafts were written and versions published are left out: each shard stamps its own.
fn catalog(state: &State) -> Vec<u8> {
    let mut plans = state.plans.clone();
    for plan in &mut plans {
        for version in plan.draft.iter_mut().chain(plan.versions.iter_mut()) {
            version.at = Timestamp(0);
        }
    }
    bincode::serde::encode_to_vec(
        (&state.assets, &state.products, &plans),
        bincode::config::standard(),
    )
    .expect("a catalog encodes")
}

/// The catalog `state` would have after `request`, applied to the catalog alone.
fn after(state: &State, request: &Request) -> Option<Vec<u8>> {
    let mut only = State::new(state.config);
    only.now = state.now;
    only.assets = state.assets.clone();
    only.products = state.products.clone();
    only.plans = state.plans.clone();
    let mut engine = Engine::from_state(only).ok()?;
    engine.handle_request(state.now, request);
    Some(catalog(engine.state()))
}

fn unexplained(why: &str) -> Error {
    Error(format!(
        "the shards' catalogs (assets, products, plans) differ and {why}; restore the data \
         directory from a backup, or start the release that wrote it"
    ))
}

/// The shards whose catalog is behind the others' by the last catalog command recorded in
/// `data_dir`, and that command; `None` when every shard has the same catalog. An error when the
/// catalogs differ in a way the last command does not explain.
pub fn behind(data_dir: &Path, states: &[&State]) -> Result<Option<(Vec<u32>, Request)>, Error> {
    if same(states) {
        return Ok(None);
    }
    let Some(request) = last(data_dir)? else {
        return Err(unexplained(&format!("{FILE} is missing")));
    };
    explain(states, std::slice::from_ref(&request))
}

/// The last catalog command recorded in `data_dir`, if any (for [`explain`]).
pub fn recorded(data_dir: &Path) -> Result<Option<Request>, Error> {
    last(data_dir)
}

/// Whether every shard has the same catalog.
pub fn same(states: &[&State]) -> bool {
    let catalogs: Vec<Vec<u8>> = states.iter().map(|s| catalog(s)).collect();
    catalogs.windows(2).all(|w| w[0] == w[1])
}

/// Like [`behind`], with the commands that may have reached only some shards given: the first
/// that explains the difference (the shards ahead hold the catalog it leads to, and it brings
/// every other shard there) is returned with the shards it must be applied to.
pub fn explain(
    states: &[&State],
    candidates: &[Request],
) -> Result<Option<(Vec<u32>, Request)>, Error> {
    let catalogs: Vec<Vec<u8>> = states.iter().map(|s| catalog(s)).collect();
    if catalogs.windows(2).all(|w| w[0] == w[1]) {
        return Ok(None);
    }
    'candidates: for request in candidates {
        let afters: Vec<Option<Vec<u8>>> = states.iter().map(|s| after(s, request)).collect();
        // The catalog some shard reaches with the command, that another shard already has.
        let Some(ahead) = afters
            .iter()
            .zip(&catalogs)
            .filter_map(|(next, now)| next.as_ref().filter(|n| *n != now))
            .find(|next| catalogs.contains(next))
            .cloned()
        else {
            continue;
        };
        let mut lagging = Vec::new();
        for (shard, next) in afters.iter().enumerate() {
            if catalogs[shard] == ahead {
                continue;
            }
            if next.as_ref() != Some(&ahead) {
                continue 'candidates;
            }
            lagging.push(shard as u32);
        }
        return Ok(Some((lagging, request.clone())));
    }
    Err(unexplained("the last catalog command does not explain it"))
}
