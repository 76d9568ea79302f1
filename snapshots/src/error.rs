//! The snapshot store's typed error: every variant names the file and says what to do.
//!
//! These are operating failures (file system trouble, damaged or foreign files, misuse by the
//! caller). Nothing read from disk can cause a panic: every check on file bytes ends here.

use std::{
    fmt, io,
    path::{Path, PathBuf},
};

use crate::format::{FORMAT_VERSION, FORMAT_VERSION_OLDEST};

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What recovery does when a snapshot is unusable, appended to every "this file is bad" message.
const MOVE_AWAY: &str = "recovery skips it and uses the next older snapshot of the shard plus a \
                         longer WAL replay; move the file out of the snapshot directory to keep \
                         it for inspection";

/// Everything that can go wrong in the snapshot store.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A file-system call failed.
    Io {
        /// What the store was doing, e.g. "create temp file".
        operation: &'static str,
        /// The file or directory it was doing it to.
        path: PathBuf,
        source: io::Error,
    },
    /// The file does not start with the snapshot magic bytes: it is not a tally snapshot.
    NotASnapshot { path: PathBuf },
    /// The file is a tally snapshot in a format version this build cannot read.
    UnsupportedVersion { path: PathBuf, version: u32 },
    /// The file is shorter than its header says it is.
    Truncated {
        path: PathBuf,
        bytes_expected: u64,
        bytes_found: u64,
    },
    /// The header's own checksum does not match: the header is damaged.
    HeaderChecksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    /// The payload's checksum does not match: the state bytes are damaged.
    PayloadChecksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    /// The checksums match but the contents are inconsistent: a header field out of range or
    /// disagreeing with the file name, bytes after the payload, or a payload that does not
    /// decode as a shard state. (Written by a buggy or foreign writer, or deliberately edited.)
    Malformed { path: PathBuf, detail: String },
    /// Encoding the state failed for a reason other than IO (a bug in the state's serde code).
    Encode { path: PathBuf, detail: String },
    /// The encoded state is bigger than [`crate::PAYLOAD_BYTES_MAX`]; nothing was kept.
    TooLarge {
        path: PathBuf,
        payload_bytes_max: u64,
    },
    /// The caller passed an argument out of range (shard index, shard count, keep count).
    InvalidArgument(String),
}

impl Error {
    /// The file or directory the error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Io { path, .. }
            | Self::NotASnapshot { path }
            | Self::UnsupportedVersion { path, .. }
            | Self::Truncated { path, .. }
            | Self::HeaderChecksum { path, .. }
            | Self::PayloadChecksum { path, .. }
            | Self::Malformed { path, .. }
            | Self::Encode { path, .. }
            | Self::TooLarge { path, .. } => Some(path),
            Self::InvalidArgument(_) => None,
        }
    }

    /// True when the file's bytes are bad (as opposed to the file system or the caller).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Self::NotASnapshot { .. }
                | Self::UnsupportedVersion { .. }
                | Self::Truncated { .. }
                | Self::HeaderChecksum { .. }
                | Self::PayloadChecksum { .. }
                | Self::Malformed { .. }
        )
    }

    pub(crate) fn io(operation: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
        let path = path.to_path_buf();
        move |source| Error::Io {
            operation,
            path,
            source,
        }
    }

    pub(crate) fn malformed(path: &Path, detail: impl Into<String>) -> Error {
        Error::Malformed {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io {
                operation,
                path,
                source,
            } => write!(
                f,
                "snapshot store could not {operation} {}: {source}; fix the file system problem \
                 (permissions, free space, mount) and retry",
                path.display()
            ),
            Self::NotASnapshot { path } => write!(
                f,
                "{} is not a tally snapshot (wrong magic bytes); {MOVE_AWAY}",
                path.display()
            ),
            Self::UnsupportedVersion { path, version } => write!(
                f,
                "snapshot {} is in format version {version}, but this build reads versions \
                 {FORMAT_VERSION_OLDEST} to {FORMAT_VERSION}; run the tally release that wrote \
                 it, or {MOVE_AWAY}",
                path.display()
            ),
            Self::Truncated {
                path,
                bytes_expected,
                bytes_found,
            } => write!(
                f,
                "snapshot {} is truncated: it has {bytes_found} bytes but needs \
                 {bytes_expected} (an interrupted copy or a damaged disk); {MOVE_AWAY}",
                path.display()
            ),
            Self::HeaderChecksum {
                path,
                stored,
                computed,
            } => write!(
                f,
                "snapshot {} is corrupt: its header checksum is {stored:08x} but the header \
                 hashes to {computed:08x}; {MOVE_AWAY}",
                path.display()
            ),
            Self::PayloadChecksum {
                path,
                stored,
                computed,
            } => write!(
                f,
                "snapshot {} is corrupt: its payload checksum is {stored:08x} but the payload \
                 hashes to {computed:08x}; {MOVE_AWAY}",
                path.display()
            ),
            Self::Malformed { path, detail } => write!(
                f,
                "snapshot {} is malformed: {detail}; {MOVE_AWAY}",
                path.display()
            ),
            Self::Encode { path, detail } => write!(
                f,
                "could not encode the shard state into {}: {detail}; this is a bug in tally, \
                 report it (the previous snapshots are untouched)",
                path.display()
            ),
            Self::TooLarge {
                path,
                payload_bytes_max,
            } => write!(
                f,
                "the shard state does not fit in one snapshot ({}): it encodes to more than \
                 {payload_bytes_max} bytes; use more shards (the previous snapshots are \
                 untouched)",
                path.display()
            ),
            Self::InvalidArgument(detail) => write!(f, "invalid snapshot argument: {detail}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
