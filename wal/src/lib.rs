//! tally-wal: a memory-mapped, group-committed write-ahead log of opaque records.
//!
//! Each shard loop of tally appends the encoded commands of a batch here, makes the batch
//! durable with one sync, and only then applies the commands and releases replies. Every
//! acknowledged debit rests on this crate, so it is small and boring on purpose.
//!
//! Architecture invariant: wal knows nothing about wallets. A record is an opaque `&[u8]`; the
//! WAL assigns it an LSN, stores it with a checksum, and gives it back in order after a crash.
//! It does not decode payloads, decide when to snapshot, own threads, or retry anything.
//!
//! # Model
//!
//! * **Segments** are files named after their first LSN (`00000000000000000001.wal`),
//!   preallocated with `fallocate` to [`Options::segment_bytes`] and memory-mapped, so a full
//!   disk is [`Error::NoSpace`] when a segment is created, never a SIGBUS during a write. The
//!   log rotates to a new segment when a record does not fit; [`Wal::delete_below`] removes
//!   whole segments below a snapshot's LSN. Creating and removing segments syncs the directory.
//! * **Records** carry length, LSN, a CRC32C, a format version and a batch-end flag; the byte
//!   layout and the recovery rules are in `docs/wal-format.md`.
//! * **LSNs** are `u64`, assigned here, +1 per record, starting at [`Options::first_lsn`] for an
//!   empty log. LSN 0 is never used, so `durable_lsn() == 0` means "nothing durable yet".
//! * **Group commit**: [`Wal::append`] any number of records, then one sync covers the batch.
//!   Batches are atomic across crashes: recovery keeps a batch whole or drops it whole.
//! * **Durability**: [`Durability::Sync`] (default) syncs with `fdatasync`, chosen over
//!   `msync(MS_SYNC)` by measurement (`docs/benchmarks.md`). [`Durability::None`] never syncs:
//!   it survives a process crash but not a power loss, and exists for benchmarks only.
//! * **Poisoning**: a failed sync (or any failed write or segment creation) poisons the log;
//!   every later call returns [`Error::Poisoned`], telling the operator to restart. A sync is
//!   never retried in place: after a failed `fsync` the kernel may have dropped the pages.
//! * **Recovery** ([`Wal::open`]): validates every segment, cuts a torn tail (the unfinished
//!   last batch) and reports it in [`Recovery`], refuses with [`Error::Corrupt`] (segment and
//!   offset) when the damage is not at the tail. [`Wal::scan`] then reads records from an LSN.
//! * **Storage** goes through the small [`Storage`]/[`Segment`] traits: [`FileStorage`] for
//!   real files, [`sim::SimStorage`] to inject torn writes, bit flips, failed syncs and crashes.
//!
//! # Threading contract
//!
//! A [`Wal`] has one owner thread (the shard loop). `append`, `seal`, `commit`, `scan` and
//! `delete_below` take `&mut self` or `&self` on that thread. A [`Syncer`] from
//! [`Wal::syncer`] is `Clone + Send + Sync` and may run [`Syncer::sync`] on another thread at the
//! same time as the owner appends: the owner copies batch N+1 into bytes past batch N while the
//! syncer's `fdatasync` makes batch N durable. Syncs are serialised with each other. A sync
//! covers every batch sealed before it started and returns the new durable LSN;
//! [`Wal::durable_lsn`] and [`Syncer::durable_lsn`] read it at any time. Replies for a record
//! may be released once `durable_lsn() >= its LSN`, never earlier. Dropping a `Wal` discards
//! its unsealed batch (recovery cuts it); it does not sync.
//!
//! ```
//! use tally_wal::{sim::SimStorage, Options, Wal};
//!
//! let mut wal = Wal::open(SimStorage::new(), Options::default())?;
//! // Simple: the shard loop syncs inline.
//! let first = wal.append(b"command 1")?;
//! let last = wal.append(b"command 2")?;
//! assert_eq!(wal.commit()?, last);
//!
//! // Pipelined: seal batch N, hand the sync to another thread, keep filling batch N+1.
//! let syncer = wal.syncer();
//! let sealed = { wal.append(b"command 3")?; wal.seal()? };
//! let sync_thread = std::thread::spawn(move || syncer.sync());
//! wal.append(b"command 4")?; // batch N+1, not yet sealed
//! assert!(sync_thread.join().expect("sync thread")? >= sealed);
//! assert!(wal.durable_lsn() >= sealed);
//!
//! let mut scan = wal.scan(first)?;
//! let mut count = 0;
//! while let Some(record) = scan.next()? {
//!     count += 1;
//!     assert!(record.lsn <= sealed);
//! }
//! assert_eq!(count, 3);
//! # Ok::<(), tally_wal::Error>(())
//! ```

mod error;
mod file;
mod format;
mod recovery;
pub mod sim;
mod storage;
mod wal;

pub use error::{Error, Result};
pub use file::{FileSegment, FileStorage, SyncMethod};
pub use format::{
    record_bytes, FORMAT_VERSION, RECORD_HEADER_BYTES, RECORD_PAYLOAD_MAX, SEGMENT_HEADER_BYTES,
};
pub use storage::{parse_segment_file_name, segment_file_name, Segment, Storage};
pub use wal::{
    Durability, Options, Record, Recovery, Scan, Syncer, Truncation, Wal, SEGMENT_BYTES_DEFAULT,
    SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN,
};
