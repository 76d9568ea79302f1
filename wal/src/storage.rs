//! The small trait the WAL stores segments through, so tests can swap the disk for a simulation.
//!
//! [`crate::FileStorage`] is the real one (preallocated, memory-mapped files);
//! [`crate::sim::SimStorage`] keeps bytes in memory and can tear writes, flip bits, fail syncs and
//! crash. The trait knows segments only by their first LSN; it does not know what a record is.

use std::{fmt::Debug, io};

/// A directory of segments, each named by the LSN of its first record.
pub trait Storage: Send + Debug + 'static {
    /// One segment: a fixed-capacity byte array that can be synced.
    type Segment: Segment;

    /// First LSNs of the segments present, ascending.
    fn list(&self) -> io::Result<Vec<u64>>;

    /// Creates a segment of `capacity` bytes whose first bytes are `header`, the rest zeroes.
    ///
    /// Atomic and durable: when this returns, the segment exists with its header on stable
    /// storage and the directory entry is synced; after a crash it either exists so, or not at
    /// all. A full disk fails here (with `ErrorKind::StorageFull`), never during a later write.
    fn create(&self, first_lsn: u64, capacity: u64, header: &[u8]) -> io::Result<Self::Segment>;

    /// Opens an existing segment.
    fn open(&self, first_lsn: u64) -> io::Result<Self::Segment>;

    /// Removes segments and syncs the directory once, so the removal is durable.
    fn remove(&self, first_lsns: &[u64]) -> io::Result<()>;

    /// How errors name the segment (a path for files).
    fn describe(&self, first_lsn: u64) -> String;
}

/// One segment's bytes.
///
/// The read and write methods are `unsafe` because the real implementation is a shared memory
/// mapping: two threads touching the same bytes at once would be a data race. The WAL upholds
/// the contract by having exactly one writer thread and never reading bytes while they may be
/// written; [`Segment::sync`] touches no bytes and may run on any thread at any time.
pub trait Segment: Send + Sync + Debug + 'static {
    /// Size in bytes, fixed at creation.
    fn capacity(&self) -> u64;

    /// Copies `buf.len()` bytes starting at `offset` into `buf`.
    ///
    /// # Safety
    /// No other thread may be writing any of these bytes during the call.
    unsafe fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Copies `bytes` to `offset`. Not durable until a later [`Segment::sync`] returns `Ok`.
    ///
    /// # Safety
    /// No other thread may be reading or writing any of these bytes during the call.
    unsafe fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()>;

    /// Makes every byte written before the call durable. An error means some of them may be
    /// lost; the caller must not retry (the WAL poisons itself instead).
    fn sync(&self) -> io::Result<()>;
}

/// File name of the segment whose first record has `first_lsn`: 20 zero-padded digits, so names
/// sort like the numbers.
pub fn segment_file_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}.wal")
}

/// The first LSN encoded in a segment file name, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_reject_strangers() {
        assert_eq!(segment_file_name(1), "00000000000000000001.wal");
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(
            parse_segment_file_name("00000000000000000001.wal.tmp"),
            None
        );
        assert_eq!(parse_segment_file_name("1.wal"), None);
        assert_eq!(parse_segment_file_name("0000000000000000000x.wal"), None);
    }
}
