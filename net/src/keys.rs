//! API keys: who may talk to the server, and with which [`Scope`].
//!
//! Keys are kept in `<data-dir>/keys.json`, hashed (SHA-256 of the key's bytes); the secret itself
//! is shown once, when it is made, and never stored or logged. The file is rewritten whole on every
//! change: temp file, sync, rename, directory sync, so a crash leaves the old or the new list.
//!
//! On the first start (no `keys.json` yet) the initial admin key comes from the caller: the
//! operator's `TALLY_ADMIN_KEY`, or a generated one that is written to `<data-dir>/admin.key`
//! with mode 0600 (the caller prints it once). A revoked key stays in the file, marked, so its id
//! is never reused; connections holding it see the revocation on their next request, through a
//! shared flag.
//!
//! Every file-system call goes through [`storage::Storage`]: the real file system by default,
//! the simulated disk of [`sim`] in the power-loss tests ([`KeyStore::open_in`]).

pub mod sim;
pub mod storage;

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::message::{Scope, API_KEY_BYTES_MAX};
use storage::{FileStorage, Storage};

/// The key file's name in the data directory.
pub const KEYS_FILE: &str = "keys.json";
/// Where a generated initial admin key is written (mode 0600).
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// Shortest key accepted from `TALLY_ADMIN_KEY`.
pub const OPERATOR_KEY_BYTES_MIN: usize = 16;
/// Most labels' bytes.
const LABEL_BYTES_MAX: usize = 64;

/// A key that authenticated a connection. The connection keeps it and checks
/// [`LiveKey::is_revoked`] before each request.
#[derive(Debug)]
pub struct LiveKey {
    /// The key's id.
    pub id: u64,
    /// What it may do.
    pub scope: Scope,
    revoked: AtomicBool,
}

impl LiveKey {
    /// Whether the key was revoked after the connection authenticated with it.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
}

/// A key as listed (no secret, no hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// Its id.
    pub id: u64,
    /// Who it is for.
    pub label: String,
    /// What it may do.
    pub scope: Scope,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// Why a key operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// No key has this id, or it is already revoked.
    Unknown(u64),
    /// Revoking it would leave no admin key, and nobody could manage the server again.
    LastAdmin(u64),
    /// The key file could not be read or written; nothing changed.
    Storage(String),
    /// `TALLY_ADMIN_KEY` is too short or too long.
    BadOperatorKey(String),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Unknown(id) => write!(f, "no active API key has id {id}"),
            KeyError::LastAdmin(id) => write!(
                f,
                "key {id} is the last active admin key; create another admin key first"
            ),
            KeyError::Storage(why) => write!(f, "API key file: {why}"),
            KeyError::BadOperatorKey(why) => write!(f, "TALLY_ADMIN_KEY: {why}"),
        }
    }
}

impl std::error::Error for KeyError {}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    keys: Vec<KeyRecord>,
}

#[derive(Clone, Serialize, Deserialize)]
struct KeyRecord {
    id: u64,
    label: String,
    scope: String,
    /// Hex SHA-256 of the key's bytes.
    sha256: String,
    revoked: bool,
}

struct Inner {
    records: Vec<KeyRecord>,
    by_hash: HashMap<[u8; 32], Arc<LiveKey>>,
    by_id: HashMap<u64, Arc<LiveKey>>,
}

/// The server's API keys.
pub struct KeyStore {
    path: PathBuf,
    /// The file system: [`FileStorage`] unless a test opened the store with
    /// [`KeyStore::open_in`].
    storage: Arc<dyn Storage>,
    inner: Mutex<Inner>,
    /// Held by a change for its whole read-write-swap, so changes apply one at a time while
    /// `inner` is locked only to read or to swap: `authenticate`, on the network threads, never
    /// waits for the key file to be written and synced.
    writer: Mutex<()>,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("path", &self.path)
            .finish()
    }
}

/// What [`KeyStore::open`] did on a first start.
#[derive(Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// The key file already existed.
    Existing,
    /// The initial admin key is the operator's `TALLY_ADMIN_KEY`.
    FromOperator,
    /// A key was generated; it is here (to print once) and in the file.
    Generated {
        /// The secret.
        key: String,
        /// Where it was written.
        file: PathBuf,
    },
}

impl KeyStore {
    /// Opens `<data_dir>/keys.json`, creating it on the first start with one admin key: the
    /// `operator_key` if given, otherwise a generated one (also written to `admin.key`, 0600).
    pub fn open(
        data_dir: &Path,
        operator_key: Option<&str>,
    ) -> Result<(KeyStore, Bootstrap), KeyError> {
        KeyStore::open_in(FileStorage, data_dir, operator_key)
    }

    /// [`KeyStore::open`] on another [`Storage`], such as the simulated disk of [`sim`] in
    /// power-loss tests.
    pub fn open_in(
        storage: impl Storage,
        data_dir: &Path,
        operator_key: Option<&str>,
    ) -> Result<(KeyStore, Bootstrap), KeyError> {
        let store = Arc::new(storage);
        let storage = &*store;
        let path = data_dir.join(KEYS_FILE);
        let failed = |e: std::io::Error| KeyError::Storage(format!("{}: {e}", path.display()));
        let (records, bootstrap) = match storage.read(&path) {
            Ok(bytes) => {
                let file: KeyFile = serde_json::from_slice(&bytes)
                    .map_err(|e| KeyError::Storage(format!("{}: {e}", path.display())))?;
                if file.version != 1 {
                    return Err(KeyError::Storage(format!(
                        "{}: unknown version {}",
                        path.display(),
                        file.version
                    )));
                }
                (file.keys, Bootstrap::Existing)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (key, bootstrap) = match operator_key {
                    Some(key) => {
                        if key.len() < OPERATOR_KEY_BYTES_MIN || key.len() > API_KEY_BYTES_MAX {
                            return Err(KeyError::BadOperatorKey(format!(
                                "must be {OPERATOR_KEY_BYTES_MIN} to {API_KEY_BYTES_MAX} bytes, \
                                 got {}",
                                key.len()
                            )));
                        }
                        (key.to_string(), Bootstrap::FromOperator)
                    }
                    None => {
                        let key = generate_secret()?;
                        let file = data_dir.join(ADMIN_KEY_FILE);
                        write_private(storage, &file, format!("{key}\n").as_bytes())
                            .map_err(|e| KeyError::Storage(format!("{}: {e}", file.display())))?;
                        (key.clone(), Bootstrap::Generated { key, file })
                    }
                };
                let records = vec![KeyRecord {
                    id: 1,
                    label: "initial admin".into(),
                    scope: scope_name(Scope::Admin).into(),
                    sha256: hex(&hash(key.as_bytes())),
                    revoked: false,
                }];
                save(storage, &path, &records).map_err(failed)?;
                (records, bootstrap)
            }
            Err(e) => return Err(failed(e)),
        };
        let mut inner = Inner {
            records: Vec::new(),
            by_hash: HashMap::new(),
            by_id: HashMap::new(),
        };
        for record in records {
            inner.index(record, &path)?;
        }
        Ok((
            KeyStore {
                path,
                storage: store,
                inner: Mutex::new(inner),
                writer: Mutex::new(()),
            },
            bootstrap,
        ))
    }

    /// The live key these bytes are, if any (unknown and revoked keys are `None`).
    pub fn authenticate(&self, key: &[u8]) -> Option<Arc<LiveKey>> {
        let digest = hash(key);
        let inner = self.lock();
        inner
            .by_hash
            .get(&digest)
            .filter(|k| !k.is_revoked())
            .cloned()
    }

    /// Makes a key; returns its id and its secret (shown once, stored only hashed).
    pub fn create(&self, label: &str, scope: Scope) -> Result<(u64, String), KeyError> {
        let secret = generate_secret()?;
        let _writing = self.write_lock();
        let mut records = self.lock().records.clone();
        let id = records.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        let mut label = label.to_string();
        label.truncate(LABEL_BYTES_MAX);
        let record = KeyRecord {
            id,
            label,
            scope: scope_name(scope).into(),
            sha256: hex(&hash(secret.as_bytes())),
            revoked: false,
        };
        records.push(record.clone());
        save(&*self.storage, &self.path, &records)
            .map_err(|e| KeyError::Storage(format!("{}: {e}", self.path.display())))?;
        self.lock().index(record, &self.path)?;
        Ok((id, secret))
    }

    /// Revokes a key: it no longer authenticates, and open connections using it are refused on
    /// their next request. The last active admin key cannot be revoked.
    pub fn revoke(&self, id: u64) -> Result<(), KeyError> {
        let _writing = self.write_lock();
        let mut records = self.lock().records.clone();
        let Some(position) = records.iter().position(|r| r.id == id && !r.revoked) else {
            return Err(KeyError::Unknown(id));
        };
        let admin = scope_name(Scope::Admin);
        let admins = records
            .iter()
            .filter(|r| !r.revoked && r.scope == admin)
            .count();
        if records[position].scope == admin && admins == 1 {
            return Err(KeyError::LastAdmin(id));
        }
        records[position].revoked = true;
        save(&*self.storage, &self.path, &records)
            .map_err(|e| KeyError::Storage(format!("{}: {e}", self.path.display())))?;
        let mut inner = self.lock();
        inner.records = records;
        if let Some(live) = inner.by_id.get(&id) {
            live.revoked.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Every key, revoked ones too.
    pub fn list(&self) -> Vec<KeyInfo> {
        let inner = self.lock();
        inner
            .records
            .iter()
            .map(|r| KeyInfo {
                id: r.id,
                label: r.label.clone(),
                scope: parse_scope(&r.scope).unwrap_or(Scope::Gateway),
                revoked: r.revoked,
            })
            .collect()
    }

    fn write_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The inner maps are only changed after the file is written, so a panic elsewhere
        // cannot leave them half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn index(&mut self, record: KeyRecord, path: &Path) -> Result<(), KeyError> {
        let bad = |why: String| {
            KeyError::Storage(format!("{}: key {}: {why}", path.display(), record.id))
        };
        let scope = parse_scope(&record.scope)
            .ok_or_else(|| bad(format!("unknown scope {:?}", record.scope)))?;
        let digest =
            unhex(&record.sha256).ok_or_else(|| bad("sha256 is not 64 hex digits".into()))?;
        let live = Arc::new(LiveKey {
            id: record.id,
            scope,
            revoked: AtomicBool::new(record.revoked),
        });
        if self.by_id.insert(record.id, live.clone()).is_some() {
            return Err(bad("duplicate id".into()));
        }
        self.by_hash.insert(digest, live);
        self.records.push(record);
        Ok(())
    }
}

/// The name of a scope in files, flags and output.
pub fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Gateway => "gateway",
        Scope::Admin => "admin",
    }
}

/// The scope with this name (`gateway` or `admin`).
pub fn parse_scope(name: &str) -> Option<Scope> {
    match name {
        "gateway" => Some(Scope::Gateway),
        "admin" => Some(Scope::Admin),
        _ => None,
    }
}

fn hash(bytes: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// A new secret: `tally_` and 64 hex digits (256 random bits).
fn generate_secret() -> Result<String, KeyError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| KeyError::Storage("the system random source failed".into()))?;
    Ok(format!("tally_{}", hex(&bytes)))
}

/// Writes `bytes` to a new file only its owner can read, synced.
fn write_private(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = storage.create_private(path)?;
    file.write_all(bytes)?;
    file.sync()
}

fn save(storage: &dyn Storage, path: &Path, records: &[KeyRecord]) -> std::io::Result<()> {
    let file = KeyFile {
        version: 1,
        keys: records.to_vec(),
    };
    let json = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    write_private(storage, &tmp, &json)?;
    storage.rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        storage.sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn first_start_generates_an_admin_key_file_only_the_owner_reads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (store, bootstrap) = KeyStore::open(dir.path(), None).unwrap();
        let Bootstrap::Generated { key, file } = bootstrap else {
            panic!("expected a generated key, got {bootstrap:?}")
        };
        assert!(key.starts_with("tally_") && key.len() == 70);
        let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_to_string(&file).unwrap().trim(), key);
        let live = store
            .authenticate(key.as_bytes())
            .expect("the admin key works");
        assert_eq!((live.id, live.scope), (1, Scope::Admin));
        // Only the hash is stored.
        let stored = fs::read_to_string(dir.path().join(KEYS_FILE)).unwrap();
        assert!(!stored.contains(&key[6..]));
        assert!(store.authenticate(b"tally_wrong").is_none());
        // The second start keeps the key and generates nothing.
        drop(store);
        let (store, bootstrap) = KeyStore::open(dir.path(), Some("ignored-operator-key")).unwrap();
        assert_eq!(bootstrap, Bootstrap::Existing);
        assert!(store.authenticate(key.as_bytes()).is_some());
        assert!(store.authenticate(b"ignored-operator-key").is_none());
    }

    #[test]
    fn operator_key_create_revoke_and_the_last_admin() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            KeyStore::open(dir.path(), Some("short")),
            Err(KeyError::BadOperatorKey(_))
        ));
        let (store, bootstrap) =
            KeyStore::open(dir.path(), Some("operator-chosen-admin-key")).unwrap();
        assert_eq!(bootstrap, Bootstrap::FromOperator);
        assert!(!dir.path().join(ADMIN_KEY_FILE).exists());
        let admin = store.authenticate(b"operator-chosen-admin-key").unwrap();
        assert_eq!(store.revoke(admin.id), Err(KeyError::LastAdmin(admin.id)));

        let (gw_id, gw_secret) = store.create("gateway-eu", Scope::Gateway).unwrap();
        let gw = store.authenticate(gw_secret.as_bytes()).unwrap();
        assert_eq!((gw.id, gw.scope), (gw_id, Scope::Gateway));
        store.revoke(gw_id).unwrap();
        assert!(gw.is_revoked(), "open connections see the revocation");
        assert!(store.authenticate(gw_secret.as_bytes()).is_none());
        assert_eq!(store.revoke(gw_id), Err(KeyError::Unknown(gw_id)));
        assert_eq!(store.revoke(99), Err(KeyError::Unknown(99)));

        // Revocation and ids survive a restart; ids are never reused.
        drop(store);
        let (store, _) = KeyStore::open(dir.path(), None).unwrap();
        assert!(store.authenticate(gw_secret.as_bytes()).is_none());
        let (next, _) = store.create("second", Scope::Admin).unwrap();
        assert_eq!(next, gw_id + 1);
        store.revoke(admin.id).unwrap();
        let listed = store.list();
        assert_eq!(listed.len(), 3);
        assert!(listed.iter().filter(|k| k.revoked).count() == 2);
    }

    #[test]
    fn concurrent_changes_apply_one_at_a_time_and_every_key_works() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = KeyStore::open(dir.path(), Some("operator-key-0123456789")).unwrap();
        let store = Arc::new(store);
        let secrets: Vec<(u64, String)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|t| {
                    let store = Arc::clone(&store);
                    s.spawn(move || {
                        (0..5)
                            .map(|i| {
                                // Reads go on while keys are written.
                                assert!(store.authenticate(b"operator-key-0123456789").is_some());
                                store.create(&format!("k{t}-{i}"), Scope::Gateway).unwrap()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        let mut ids: Vec<u64> = secrets.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 40, "ids are unique");
        for (id, secret) in &secrets {
            assert_eq!(store.authenticate(secret.as_bytes()).unwrap().id, *id);
        }
        // And the file holds them all: a reopened store knows every key.
        drop(store);
        let (again, _) = KeyStore::open(dir.path(), None).unwrap();
        assert_eq!(again.list().len(), 41);
    }

    #[test]
    fn a_damaged_key_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEYS_FILE), b"{not json").unwrap();
        let err = KeyStore::open(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("keys.json"), "{err}");
    }
}
