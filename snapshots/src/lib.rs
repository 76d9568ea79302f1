//! tally-snapshots: versioned, checksummed snapshot files of each shard's engine state.
//!
//! A snapshot is one file holding one shard's whole [`tally_engine::State`] after the WAL
//! records up to a given LSN were applied. Recovery loads the newest usable snapshot of each
//! shard and replays that shard's WAL from the next LSN; snapshots therefore bound recovery
//! time and let the server delete old WAL segments.
//!
//! Architecture invariant: `snapshots` knows nothing about WALs, threads or clocks. It is told
//! the shard, the LSN and the time, and stores and returns states; the server decides when to
//! snapshot, which thread writes, when to prune, and which WAL segments to delete. It does not
//! look inside a state beyond encoding it, and it does not check a state's invariants
//! (`Engine::from_state` does).
//!
//! # Files
//!
//! One flat directory per deployment; one file per shard per checkpoint, named after the shard
//! and the LSN so that names sort by shard, then LSN:
//!
//! ```text
//! <dir>/shard-0003-00000000000000004242.snap       shard 3, state after LSN 4242
//! <dir>/shard-0003-00000000000000004242.snap.tmp   being written, or left by a crash
//! ```
//!
//! Each file is a 64-byte little-endian header (magic `TALLYSNP`, format version, shard,
//! shard count, LSN, creation time, payload length, payload CRC32C, header CRC32C) followed by
//! the payload: the state encoded with bincode 2 (serde, `config::standard()`). The byte layout
//! is in `docs/snapshot-format.md`.
//!
//! # Guarantees
//!
//! * **Atomic and durable writes** ([`SnapshotDir::write`]): temp file in the same directory,
//!   streamed payload, header written last, `fsync`, rename, directory `fsync`. A crash leaves
//!   either the complete file or a temp file, which is never listed or loaded.
//! * **Everything is checked before use** ([`SnapshotDir::verify`], [`SnapshotDir::load`]):
//!   magic, version, header checksum, header fields, name against header, exact file size,
//!   payload checksum, and a payload that decodes to exactly its length. Damage is a typed
//!   [`Error`] naming the file; no byte pattern on disk panics or aborts the process (the
//!   decoder's allocations are bounded, see `format::decode_state`).
//! * **Fallback** ([`SnapshotDir::load_newest`]): a damaged newest snapshot is skipped with a
//!   [`Warning`] that names the file, and the next older one is used.
//! * **Retention** ([`SnapshotDir::prune`]): keeps the newest K snapshots per shard (and always
//!   the newest one that verifies), deletes temp files left by crashes.
//!   [`SnapshotDir::oldest_kept_lsn`] tells the server which WAL records it may delete.
//! * **Power loss is tested**: every file call goes through [`Storage`] ([`FileStorage`] unless
//!   [`SnapshotDir::open_in`] is given another), and `tests/power_loss.rs` runs seeded
//!   checkpoints and prunes on [`sim::SimStorage`], which drops what was not synced.
//!
//! ```
//! use tally_engine::{Config, Engine, Timestamp};
//! use tally_snapshots::SnapshotDir;
//!
//! let tmp = tempfile::tempdir()?;
//! let dir = SnapshotDir::open(tmp.path().join("snapshots"))?;
//! let engine = Engine::new(Config::default());
//! dir.write(0, 1, 42, Timestamp(1_700_000_000_000_000), engine.state())?;
//!
//! let recovered = dir.load_newest(0)?;
//! for warning in &recovered.warnings {
//!     eprintln!("{warning}");
//! }
//! let (info, state) = recovered.newest.expect("written above");
//! assert_eq!(info.lsn, 42); // replay the WAL from LSN 43
//! let restored = Engine::from_state(state).expect("a valid state");
//! assert_eq!(restored.digest(), engine.digest());
//!
//! dir.prune(2)?;
//! assert_eq!(dir.oldest_kept_lsn(0)?, Some(42));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod dir;
mod error;
mod format;
pub mod sim;
mod storage;

pub use dir::{read_header, Recovered, SnapshotDir, SnapshotInfo, Warning};
pub use error::{Error, Result};
pub use format::{
    Header, FORMAT_VERSION, FORMAT_VERSION_OLDEST, HEADER_BYTES, MAGIC, PAYLOAD_BYTES_MAX,
    SHARD_COUNT_MAX,
};
pub use storage::{FileStorage, ReadFile, Storage, WriteFile};
