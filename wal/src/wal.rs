//! The log itself: appending, group commit, the durable LSN, scanning and segment deletion.
//!
//! [`Wal`] is owned by one thread (the shard loop): [`Wal::append`] copies records into the
//! active segment, [`Wal::seal`] closes a batch, [`Wal::commit`] seals and syncs in place. A
//! [`Syncer`] (cloneable, `Send + Sync`) syncs sealed batches from any thread while the owner
//! keeps appending the next batch into later bytes. Recovery lives in `recovery.rs`.
//!
//! This module does not interpret payloads, and does not decide when to snapshot: the caller
//! says which LSN a snapshot covers and the WAL deletes whole segments below it.

use crate::{
    error::{Error, Result},
    format::{
        durable_distance, encode_segment_header, read_slot, record_bytes, RecordHeader, Slot,
        FLAG_BATCH_END, RECORD_ALIGN, RECORD_HEADER_BYTES, RECORD_PAYLOAD_MAX,
        SEGMENT_HEADER_BYTES,
    },
    recovery,
    storage::{Segment, Storage},
    FileStorage,
};
use std::{
    fmt, io,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
};

/// Default segment size: 64 MiB (about 430,000 records of 128 bytes).
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Smallest segment size accepted (tests use it to exercise rotation).
pub const SEGMENT_BYTES_MIN: u64 = 4096;
/// Largest segment size accepted (it must fit a memory mapping on every target).
pub const SEGMENT_BYTES_MAX: u64 = 1 << 30;

const _: () = assert!(
    SEGMENT_BYTES_DEFAULT >= (SEGMENT_HEADER_BYTES + record_bytes(RECORD_PAYLOAD_MAX)) as u64,
    "a default segment must hold the largest record"
);
const _: () = assert!(SEGMENT_BYTES_MIN % RECORD_ALIGN as u64 == 0);

/// What "durable" means for [`Wal::commit`] and [`Syncer::sync`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit ends with a sync to stable storage (`fdatasync`). The default, and the only
    /// mode for production.
    #[default]
    Sync,
    /// No sync at all: records survive a crash of the process (they are in the page cache) but
    /// not a power loss or kernel crash. For benchmarks only.
    None,
}

/// How to open a log. Validated once by [`Wal::open`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Size of each newly created segment file, in bytes (multiple of 8,
    /// [`SEGMENT_BYTES_MIN`]..=[`SEGMENT_BYTES_MAX`]). Existing segments keep their size.
    pub segment_bytes: u64,
    /// See [`Durability`].
    pub durability: Durability,
    /// LSN of the first record of a log that has no segment yet (1 for a new shard; the LSN
    /// after the snapshot when rebuilding from one). Ignored when segments exist. Must be ≥ 1:
    /// LSN 0 means "nothing" in [`Wal::durable_lsn`].
    pub first_lsn: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            durability: Durability::Sync,
            first_lsn: 1,
        }
    }
}

impl Options {
    fn validate(&self) -> Result<()> {
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes)
            || self.segment_bytes % RECORD_ALIGN as u64 != 0
        {
            return Err(Error::InvalidOptions(format!(
                "segment_bytes {} must be a multiple of {RECORD_ALIGN} between \
                 {SEGMENT_BYTES_MIN} and {SEGMENT_BYTES_MAX}",
                self.segment_bytes
            )));
        }
        if self.first_lsn == 0 || self.first_lsn == u64::MAX {
            return Err(Error::InvalidOptions(
                "first_lsn must be at least 1 (and below u64::MAX)".to_string(),
            ));
        }
        Ok(())
    }

    /// Largest payload one record may have with these options: [`RECORD_PAYLOAD_MAX`], or less
    /// if the segment is too small to hold that.
    pub fn record_payload_max(&self) -> usize {
        let room = self.segment_bytes as usize - SEGMENT_HEADER_BYTES;
        let room = room - room % RECORD_ALIGN - RECORD_HEADER_BYTES;
        room.min(RECORD_PAYLOAD_MAX)
    }
}

/// What [`Wal::open`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// LSN of the oldest record still held (or the next LSN if the log is empty).
    pub first_lsn: u64,
    /// LSN the next appended record gets.
    pub next_lsn: u64,
    /// Segments in the log after recovery.
    pub segment_count: usize,
    /// The torn tail that was cut off, if there was one.
    pub truncated: Option<Truncation>,
}

/// A torn tail cut off during recovery: the unfinished last batch of a crashed writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// Segment where the cut starts.
    pub segment: String,
    /// Byte offset in that segment where the cut starts (the start of the unfinished batch).
    pub offset: u64,
    /// Non-zero bytes that were zeroed or removed, counting later segments.
    pub bytes: u64,
    /// Complete-looking records dropped with it (members of the unfinished batch).
    pub records: u64,
    /// Later segments deleted because they held only the unfinished batch.
    pub segments_removed: usize,
    /// Why valid data stopped where it did.
    pub reason: String,
}

/// One record read back by a [`Scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub lsn: u64,
    pub payload: &'a [u8],
}

/// A segment with the name errors use for it.
#[derive(Debug)]
pub(crate) struct NamedSegment<G> {
    pub(crate) first_lsn: u64,
    pub(crate) name: String,
    pub(crate) segment: G,
}

/// A segment of the log and the end of its written bytes (known only to the owner thread).
#[derive(Debug)]
pub(crate) struct SegmentSlot<G> {
    pub(crate) segment: Arc<NamedSegment<G>>,
    pub(crate) end: u64,
}

/// State shared between the owner and its [`Syncer`]s.
struct Shared<G> {
    durability: Durability,
    /// Highest LSN whose batch is sealed and synced (in `Durability::None`: sealed and "synced"
    /// by a no-op). Callers release replies up to it.
    durable_lsn: AtomicU64,
    /// Highest LSN really synced to stable storage. Written into record headers as proof for
    /// recovery (see `docs/wal-format.md`, "attested durability"); never advanced by
    /// `Durability::None`.
    synced_lsn: AtomicU64,
    poisoned: AtomicBool,
    poison_cause: Mutex<Option<String>>,
    sealed: Mutex<Sealed<G>>,
    /// Serialises syncs, so `durable_lsn` only ever moves to a value all of whose bytes synced.
    sync_serial: Mutex<()>,
}

/// What the next sync must cover.
struct Sealed<G> {
    lsn: u64,
    /// Segments written since the last sync started.
    dirty: Vec<Arc<NamedSegment<G>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<G: Segment> Shared<G> {
    fn check_poisoned(&self) -> Result<()> {
        if !self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        let cause = lock(&self.poison_cause)
            .clone()
            .unwrap_or_else(|| "unknown".to_string());
        Err(Error::Poisoned { cause })
    }

    /// Poisons the log with `error` as the cause, and hands the error back.
    fn poison(&self, error: Error) -> Error {
        let mut cause = lock(&self.poison_cause);
        if cause.is_none() {
            *cause = Some(error.to_string());
        }
        self.poisoned.store(true, Ordering::Release);
        error
    }

    fn sync(&self) -> Result<u64> {
        let _serial = lock(&self.sync_serial);
        self.check_poisoned()?;
        let (target, dirty) = {
            let mut sealed = lock(&self.sealed);
            (sealed.lsn, std::mem::take(&mut sealed.dirty))
        };
        if self.durability == Durability::Sync {
            for segment in &dirty {
                if let Err(source) = segment.segment.sync() {
                    // Never retried: after a failed fsync the kernel may have dropped the
                    // dirty pages and marked them clean, so a retry could "succeed" over lost
                    // data. The process must restart and recover from what is on disk.
                    return Err(self.poison(Error::SyncFailed {
                        segment: segment.name.clone(),
                        source,
                    }));
                }
            }
            self.synced_lsn.fetch_max(target, Ordering::AcqRel);
        }
        self.durable_lsn.fetch_max(target, Ordering::AcqRel);
        Ok(self.durable_lsn.load(Ordering::Acquire))
    }
}

/// A record whose payload is written but whose header is not yet: the header says whether the
/// record ends its batch, which is known only when the next record arrives or the batch is
/// sealed.
#[derive(Debug, Clone, Copy)]
struct Unfinished {
    offset: u64,
    lsn: u64,
    payload_len: u32,
    payload_checksum: u32,
}

/// A write-ahead log of opaque records, owned by one thread.
///
/// See the crate documentation for the threading contract and an example.
pub struct Wal<S: Storage> {
    storage: S,
    options: Options,
    record_payload_max: usize,
    /// Oldest first; the last one is active. Never empty.
    segments: Vec<SegmentSlot<S::Segment>>,
    next_lsn: u64,
    sealed_lsn: u64,
    unfinished: Option<Unfinished>,
    shared: Arc<Shared<S::Segment>>,
    recovery: Recovery,
}

impl<S: Storage> fmt::Debug for Wal<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wal")
            .field("storage", &self.storage)
            .field("segments", &self.segments.len())
            .field("next_lsn", &self.next_lsn)
            .field("sealed_lsn", &self.sealed_lsn)
            .field("durable_lsn", &self.durable_lsn())
            .finish_non_exhaustive()
    }
}

impl Wal<FileStorage> {
    /// Opens (or creates) the log in directory `dir` with real, memory-mapped files.
    pub fn open_dir(dir: impl AsRef<Path>, options: Options) -> Result<Self> {
        let dir = dir.as_ref();
        let storage = FileStorage::open(dir).map_err(|source| Error::Io {
            operation: "open the WAL directory",
            target: dir.display().to_string(),
            source,
        })?;
        Self::open(storage, options)
    }
}

impl<S: Storage> Wal<S> {
    /// Opens the log: validates every segment, cuts a torn tail, refuses corruption, syncs what
    /// it recovered, and positions the writer after the last complete batch. On an empty
    /// storage it creates the first segment at `options.first_lsn`. See [`Wal::recovery`] for
    /// what was found.
    pub fn open(storage: S, options: Options) -> Result<Self> {
        options.validate()?;
        let recovered = recovery::recover(&storage, &options)?;
        let last_lsn = recovered.recovery.next_lsn - 1;
        let shared = Arc::new(Shared {
            durability: options.durability,
            durable_lsn: AtomicU64::new(last_lsn),
            synced_lsn: AtomicU64::new(last_lsn),
            poisoned: AtomicBool::new(false),
            poison_cause: Mutex::new(None),
            sealed: Mutex::new(Sealed {
                lsn: last_lsn,
                dirty: Vec::new(),
            }),
            sync_serial: Mutex::new(()),
        });
        Ok(Self {
            record_payload_max: options.record_payload_max(),
            storage,
            options,
            segments: recovered.segments,
            next_lsn: recovered.recovery.next_lsn,
            sealed_lsn: last_lsn,
            unfinished: None,
            shared,
            recovery: recovered.recovery,
        })
    }

    /// What opening found: LSN range and any torn tail that was cut.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Appends one record to the current batch and returns its LSN. The record is neither
    /// readable by [`Wal::scan`] nor durable until its batch is sealed and synced.
    ///
    /// Errors: [`Error::RecordTooLarge`] leaves the log usable; any other error (a full disk
    /// when a new segment is needed, an I/O error) poisons it.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64> {
        self.shared.check_poisoned()?;
        if payload.len() > self.record_payload_max {
            return Err(Error::RecordTooLarge {
                payload_bytes: payload.len(),
                payload_bytes_max: self.record_payload_max,
            });
        }
        let bytes = record_bytes(payload.len()) as u64;
        let active = self.active();
        if active.end + bytes > active.segment.segment.capacity() {
            self.rotate().map_err(|error| self.shared.poison(error))?;
        }
        let lsn = self.next_lsn;
        let offset = self.active().end;
        self.write(offset + RECORD_HEADER_BYTES as u64, payload)?;
        // The previous record's header goes out only now: it is known not to end the batch.
        self.finish_unfinished(0)?;
        self.unfinished = Some(Unfinished {
            offset,
            lsn,
            payload_len: payload.len() as u32,
            payload_checksum: crc32c::crc32c(payload),
        });
        let active = self
            .segments
            .last_mut()
            .expect("a log always has a segment");
        active.end += bytes;
        self.next_lsn += 1;
        Ok(lsn)
    }

    /// Ends the current batch: its last record is marked as the end of a batch, so recovery
    /// keeps the batch whole or drops it whole, and the batch becomes visible to syncs. Returns
    /// the last LSN sealed. Cheap (no sync); a no-op if nothing was appended since the last
    /// seal.
    pub fn seal(&mut self) -> Result<u64> {
        self.shared.check_poisoned()?;
        if self.unfinished.is_none() {
            return Ok(self.sealed_lsn);
        }
        self.finish_unfinished(FLAG_BATCH_END)?;
        self.sealed_lsn = self.next_lsn - 1;
        let active = Arc::clone(&self.active().segment);
        let mut sealed = lock(&self.shared.sealed);
        sealed.lsn = self.sealed_lsn;
        if !sealed.dirty.iter().any(|s| Arc::ptr_eq(s, &active)) {
            sealed.dirty.push(active);
        }
        Ok(self.sealed_lsn)
    }

    /// Seals the current batch and syncs on this thread (one sync for the whole batch).
    /// Returns the durable LSN: replies for records up to it may be released.
    pub fn commit(&mut self) -> Result<u64> {
        self.seal()?;
        self.shared.sync()
    }

    /// A handle that syncs sealed batches from another thread (see the crate docs).
    pub fn syncer(&self) -> Syncer<S> {
        Syncer {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Highest LSN that is durable: callers release replies only up to it.
    pub fn durable_lsn(&self) -> u64 {
        self.shared.durable_lsn.load(Ordering::Acquire)
    }

    /// Highest LSN sealed (durable once a sync that started after the seal returns).
    pub fn sealed_lsn(&self) -> u64 {
        self.sealed_lsn
    }

    /// LSN the next appended record gets.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// LSN of the oldest record still held (equal to `next_lsn` for an empty log).
    pub fn first_lsn(&self) -> u64 {
        self.segments[0].segment.first_lsn
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// First LSNs of the segments, oldest first.
    pub fn segment_first_lsns(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.segment.first_lsn).collect()
    }

    /// The storage (for tests and tools).
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Whether an earlier failure poisoned the log.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// Deletes every segment all of whose records have LSNs below `lsn` (call it after a
    /// snapshot covering everything below `lsn` is durable). The active segment is never
    /// deleted. Returns how many segments were deleted; the directory is synced once.
    pub fn delete_below(&mut self, lsn: u64) -> Result<usize> {
        // Segment i holds LSNs first(i)..first(i+1); it may go when first(i+1) <= lsn.
        let count = self
            .segments
            .windows(2)
            .take_while(|pair| pair[1].segment.first_lsn <= lsn)
            .count();
        if count == 0 {
            return Ok(0);
        }
        let doomed: Vec<u64> = self.segments[..count]
            .iter()
            .map(|s| s.segment.first_lsn)
            .collect();
        self.storage.remove(&doomed).map_err(|source| Error::Io {
            operation: "delete old segments starting with",
            target: self.segments[0].segment.name.clone(),
            source,
        })?;
        self.segments.drain(..count);
        Ok(count)
    }

    /// Reads sealed records in LSN order, starting at `from_lsn` (which may be `next_lsn`, for
    /// nothing). Checksums are verified again while reading.
    pub fn scan(&self, from_lsn: u64) -> Result<Scan<'_, S>> {
        if from_lsn < self.first_lsn() || from_lsn > self.sealed_lsn + 1 {
            return Err(Error::LsnUnavailable {
                requested: from_lsn,
                first_lsn: self.first_lsn(),
                next_lsn: self.sealed_lsn + 1,
            });
        }
        let index = self
            .segments
            .iter()
            .rposition(|s| s.segment.first_lsn <= from_lsn)
            .unwrap_or(0);
        Ok(Scan {
            wal: self,
            index,
            buffer: Vec::new(),
            offset: 0,
            loaded: false,
            next_lsn: self.segments[index].segment.first_lsn,
            from_lsn,
            end_lsn: self.sealed_lsn + 1,
        })
    }

    fn active(&self) -> &SegmentSlot<S::Segment> {
        self.segments.last().expect("a log always has a segment")
    }

    fn write(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        let active = &self.active().segment;
        // SAFETY: only the owner thread writes, and it reads nothing concurrently; syncers
        // touch no bytes. The range lies past every sealed record, so no scan reads it.
        unsafe { active.segment.write_at(offset, bytes) }.map_err(|source| {
            self.shared.poison(Error::Io {
                operation: "write a record to",
                target: active.name.clone(),
                source,
            })
        })
    }

    fn finish_unfinished(&mut self, flags: u8) -> Result<()> {
        let Some(unfinished) = self.unfinished.take() else {
            return Ok(());
        };
        let synced = self.shared.synced_lsn.load(Ordering::Acquire);
        let header = RecordHeader {
            payload_len: unfinished.payload_len,
            lsn: unfinished.lsn,
            durable_distance: durable_distance(unfinished.lsn, synced),
            flags,
        };
        self.write(
            unfinished.offset,
            &header.encode(unfinished.payload_checksum),
        )
    }

    /// Moves to a new segment: the unfinished record of the old one gets its header, the old
    /// one is queued for the next sync, and a preallocated segment starts at `next_lsn`.
    fn rotate(&mut self) -> Result<()> {
        self.finish_unfinished(0)?;
        let old = Arc::clone(&self.active().segment);
        {
            let mut sealed = lock(&self.shared.sealed);
            if !sealed.dirty.iter().any(|s| Arc::ptr_eq(s, &old)) {
                sealed.dirty.push(old);
            }
        }
        let segment = create_segment(&self.storage, self.next_lsn, self.options.segment_bytes)?;
        self.segments.push(SegmentSlot {
            segment: Arc::new(segment),
            end: SEGMENT_HEADER_BYTES as u64,
        });
        Ok(())
    }
}

/// Creates a preallocated segment starting at `first_lsn`, mapping a full disk to
/// [`Error::NoSpace`].
pub(crate) fn create_segment<S: Storage>(
    storage: &S,
    first_lsn: u64,
    capacity: u64,
) -> Result<NamedSegment<S::Segment>> {
    let name = storage.describe(first_lsn);
    let header = encode_segment_header(first_lsn);
    match storage.create(first_lsn, capacity, &header) {
        Ok(segment) => Ok(NamedSegment {
            first_lsn,
            name,
            segment,
        }),
        Err(source)
            if source.raw_os_error() == Some(libc::ENOSPC)
                || source.kind() == io::ErrorKind::StorageFull =>
        {
            Err(Error::NoSpace {
                segment: name,
                bytes: capacity,
            })
        }
        Err(source) => Err(Error::Io {
            operation: "create segment",
            target: name,
            source,
        }),
    }
}

/// Syncs sealed batches from any thread; cloneable.
///
/// Each [`Syncer::sync`] makes durable every batch sealed before it started (one sync per
/// written segment, normally one) and returns the durable LSN. Syncs are serialised with each
/// other but run concurrently with [`Wal::append`]/[`Wal::seal`] on the owner thread.
pub struct Syncer<S: Storage> {
    shared: Arc<Shared<S::Segment>>,
}

impl<S: Storage> Clone for Syncer<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: Storage> fmt::Debug for Syncer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Syncer")
            .field("durable_lsn", &self.durable_lsn())
            .finish_non_exhaustive()
    }
}

impl<S: Storage> Syncer<S> {
    /// Makes every sealed batch durable; returns the durable LSN. A failure poisons the log.
    pub fn sync(&self) -> Result<u64> {
        self.shared.sync()
    }

    /// Highest durable LSN.
    pub fn durable_lsn(&self) -> u64 {
        self.shared.durable_lsn.load(Ordering::Acquire)
    }

    /// Highest sealed LSN (what the next sync will make durable, at least).
    pub fn sealed_lsn(&self) -> u64 {
        lock(&self.shared.sealed).lsn
    }
}

/// Reads records back in LSN order; created by [`Wal::scan`].
///
/// A lending reader rather than an `Iterator`: each [`Record`] borrows the scan's buffer, which
/// holds one segment at a time.
pub struct Scan<'w, S: Storage> {
    wal: &'w Wal<S>,
    index: usize,
    buffer: Vec<u8>,
    offset: usize,
    loaded: bool,
    next_lsn: u64,
    from_lsn: u64,
    end_lsn: u64,
}

impl<S: Storage> fmt::Debug for Scan<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scan")
            .field("next_lsn", &self.next_lsn)
            .field("end_lsn", &self.end_lsn)
            .finish_non_exhaustive()
    }
}

impl<S: Storage> Scan<'_, S> {
    /// The next record at or after the starting LSN, or `None` after the last sealed one.
    #[allow(clippy::should_implement_trait)] // lending: the record borrows the scan
    pub fn next(&mut self) -> Result<Option<Record<'_>>> {
        loop {
            if self.next_lsn >= self.end_lsn {
                return Ok(None);
            }
            let slot = &self.wal.segments[self.index];
            if !self.loaded {
                let len = slot.end as usize;
                self.buffer.resize(len, 0);
                // SAFETY: the scan borrows the Wal, so the owner thread cannot append meanwhile;
                // syncers touch no bytes.
                unsafe { slot.segment.segment.read_at(0, &mut self.buffer) }.map_err(|source| {
                    Error::Io {
                        operation: "read",
                        target: slot.segment.name.clone(),
                        source,
                    }
                })?;
                self.offset = SEGMENT_HEADER_BYTES;
                self.loaded = true;
            }
            if self.offset >= self.buffer.len() {
                self.index += 1;
                self.loaded = false;
                if self.index >= self.wal.segments.len() {
                    return Ok(None);
                }
                continue;
            }
            let (lsn, start, len) = match read_slot(&self.buffer, self.offset) {
                Slot::Valid {
                    header,
                    payload,
                    next_offset,
                } if header.lsn == self.next_lsn => {
                    let start = self.offset + RECORD_HEADER_BYTES;
                    self.offset = next_offset;
                    self.next_lsn += 1;
                    (header.lsn, start, payload.len())
                }
                Slot::End if self.index + 1 < self.wal.segments.len() => {
                    self.offset = self.buffer.len();
                    continue;
                }
                other => {
                    return Err(Error::Corrupt {
                        segment: slot.segment.name.clone(),
                        offset: self.offset as u64,
                        detail: format!(
                            "expected record LSN {} but found {}; the segment changed after it \
                             was opened",
                            self.next_lsn,
                            describe_slot(&other)
                        ),
                    });
                }
            };
            if lsn >= self.from_lsn {
                return Ok(Some(Record {
                    lsn,
                    payload: &self.buffer[start..start + len],
                }));
            }
        }
    }
}

/// A short description of a slot for error messages (never the payload bytes).
pub(crate) fn describe_slot(slot: &Slot<'_>) -> String {
    match slot {
        Slot::End => "no record (zeroes)".to_string(),
        Slot::Valid { header, .. } => format!("a valid record with LSN {}", header.lsn),
        Slot::Bad(bad) => bad.to_string(),
    }
}

// The threading contract, checked by the compiler: a log can move to its shard thread, and a
// syncer can be shared with a sync thread.
const _: () = {
    const fn assert_send<T: Send>() {}
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send::<Wal<FileStorage>>();
    assert_send::<Wal<crate::sim::SimStorage>>();
    assert_send_sync::<Syncer<FileStorage>>();
    assert_send_sync::<Syncer<crate::sim::SimStorage>>();
};
