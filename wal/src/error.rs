//! The WAL's typed error: every variant says what happened, where, and what the operator does.
//!
//! These are operating failures (disk, corruption, misuse by configuration). Broken internal
//! invariants are bugs and assert instead; nothing read from disk can cause a panic.

use std::{fmt, io};

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the WAL.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A file-system call failed (not a sync: see [`Error::SyncFailed`]).
    Io {
        /// What the WAL was doing, e.g. "create segment".
        operation: &'static str,
        /// The segment or directory it was doing it to.
        target: String,
        source: io::Error,
    },
    /// Preallocating a new segment found the disk full. Nothing was written to the segment.
    NoSpace { segment: String, bytes: u64 },
    /// A durability sync failed. The log is now poisoned (see [`Error::Poisoned`]).
    SyncFailed { segment: String, source: io::Error },
    /// An earlier failure poisoned the log; it accepts nothing more until the process restarts.
    Poisoned {
        /// The first failure, as text.
        cause: String,
    },
    /// A record that is not the torn tail is unreadable: valid records written after it was
    /// durable follow it, so cutting it off would lose acknowledged data.
    Corrupt {
        segment: String,
        offset: u64,
        detail: String,
    },
    /// A segment file's header is wrong, or the segments do not line up.
    BadSegment { segment: String, detail: String },
    /// A payload bigger than the limit (nothing was written; the log stays usable).
    RecordTooLarge {
        payload_bytes: usize,
        payload_bytes_max: usize,
    },
    /// A scan asked for an LSN the log does not hold.
    LsnUnavailable {
        requested: u64,
        first_lsn: u64,
        next_lsn: u64,
    },
    /// Invalid [`crate::Options`].
    InvalidOptions(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io {
                operation,
                target,
                source,
            } => write!(
                f,
                "WAL could not {operation} {target}: {source}; fix the file system problem \
                 and restart"
            ),
            Self::NoSpace { segment, bytes } => write!(
                f,
                "WAL disk full: could not preallocate {bytes} bytes for segment {segment}; free \
                 disk space (or take a snapshot so old segments can be deleted) and restart"
            ),
            Self::SyncFailed { segment, source } => write!(
                f,
                "WAL sync of {segment} failed: {source}; the log is poisoned and must not be \
                 written again by this process: restart so recovery can run"
            ),
            Self::Poisoned { cause } => write!(
                f,
                "WAL is poisoned by an earlier failure ({cause}); it refuses all appends: \
                 restart the process so recovery can run"
            ),
            Self::Corrupt {
                segment,
                offset,
                detail,
            } => write!(
                f,
                "WAL corruption in {segment} at byte offset {offset}: {detail}; this is not a \
                 torn tail (records written after it was durable follow), so the log refuses \
                 to open: restore the data directory from a replica or backup, or move the \
                 segment aside knowingly"
            ),
            Self::BadSegment { segment, detail } => write!(
                f,
                "WAL segment {segment} is unusable: {detail}; the log refuses to open: restore \
                 the data directory from a replica or backup"
            ),
            Self::RecordTooLarge {
                payload_bytes,
                payload_bytes_max,
            } => write!(
                f,
                "WAL record of {payload_bytes} bytes exceeds the limit of {payload_bytes_max} \
                 bytes; nothing was written"
            ),
            Self::LsnUnavailable {
                requested,
                first_lsn,
                next_lsn,
            } => write!(
                f,
                "WAL holds LSNs {first_lsn}..{next_lsn} but LSN {requested} was asked for; \
                 recover from a snapshot that matches this log"
            ),
            Self::InvalidOptions(detail) => write!(f, "invalid WAL options: {detail}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } | Self::SyncFailed { source, .. } => Some(source),
            _ => None,
        }
    }
}
