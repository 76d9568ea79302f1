//! The bytes of a snapshot file and its name: header encoding and checks, the checksumming
//! reader and writer, and the bounded bincode decoder. `docs/snapshot-format.md` is the
//! contract; change the two together and bump [`FORMAT_VERSION`].
//!
//! This module does no file-system calls of its own; `dir.rs` opens, syncs and renames.

use std::{
    io::{self, Read, Write},
    path::Path,
};

use tally_engine::{State, Timestamp};

use crate::error::{Error, Result};

/// The first 8 bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"TALLYSNP";
/// The format version this build writes.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format version this build reads. Version 1 (the shard state before the compact
/// idempotency table) and version 2 (before refunds past the idempotency window) are converted on
/// load by `tally_engine::legacy`; the next checkpoint writes version 3.
pub const FORMAT_VERSION_OLDEST: u32 = 1;
/// Size of the fixed header; the payload starts right after it.
pub const HEADER_BYTES: usize = 64;
/// Largest payload a snapshot may have (64 GiB). A shard state bigger than this needs more
/// shards. The bound also caps what the decoder may be asked to allocate (see `decode_state`).
pub const PAYLOAD_BYTES_MAX: u64 = 1 << 36;
/// Largest shard count; shard indexes are written with four digits in file names.
pub const SHARD_COUNT_MAX: u32 = 4096;

/// File name suffix of a complete snapshot.
pub(crate) const SUFFIX: &str = ".snap";
/// File name suffix of a snapshot being written (or left behind by a crash).
pub(crate) const TEMP_SUFFIX: &str = ".snap.tmp";

const SHARD_DIGITS: usize = 4;
const LSN_DIGITS: usize = 20;

// `decode_state` uses bincode limits up to 2^40 bytes, and file offsets are u64.
const _: () = assert!(usize::BITS >= 64, "tally-snapshots needs a 64-bit target");
const _: () = assert!(SHARD_COUNT_MAX <= 10_u32.pow(SHARD_DIGITS as u32));
const _: () = assert!(PAYLOAD_BYTES_MAX * CLAIM_BYTES_PER_BYTE_MAX <= 1 << 40);

/// The bincode configuration of the payload: `standard()` (little-endian, variable-length
/// integers). Changing it changes the format.
pub(crate) fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// The parsed, checked header of a snapshot file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The format version the file is in (this build writes [`FORMAT_VERSION`]).
    pub version: u32,
    /// Index of the shard whose state this is.
    pub shard: u32,
    /// Number of shards of the deployment that wrote it.
    pub shard_count: u32,
    /// The last WAL LSN applied to the state (0: none). Replay continues at `lsn + 1`.
    pub lsn: u64,
    /// When the snapshot was taken (the caller's clock; this crate reads none).
    pub created_at: Timestamp,
    /// Length of the bincode payload that follows the header.
    pub payload_bytes: u64,
    /// CRC32C (Castagnoli) of the payload.
    pub payload_crc32c: u32,
}

impl Header {
    /// The 64 header bytes, with the header checksum filled in.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.shard.to_le_bytes());
        b[16..20].copy_from_slice(&self.shard_count.to_le_bytes());
        // 20..24 reserved, zero.
        b[24..32].copy_from_slice(&self.lsn.to_le_bytes());
        b[32..40].copy_from_slice(&self.created_at.0.to_le_bytes());
        b[40..48].copy_from_slice(&self.payload_bytes.to_le_bytes());
        b[48..52].copy_from_slice(&self.payload_crc32c.to_le_bytes());
        // 52..60 reserved, zero.
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks the first bytes of a file (up to [`HEADER_BYTES`]; fewer if the file
    /// is shorter). `path` only names the file in errors.
    ///
    /// Order of checks: magic, version, length, header checksum, field ranges. The version is
    /// checked before the checksum because a later version may lay its header out differently.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Header> {
        let magic_len = bytes.len().min(MAGIC.len());
        if bytes[..magic_len] != MAGIC[..magic_len] {
            return Err(Error::NotASnapshot {
                path: path.to_path_buf(),
            });
        }
        let truncated = || Error::Truncated {
            path: path.to_path_buf(),
            bytes_expected: HEADER_BYTES as u64,
            bytes_found: bytes.len() as u64,
        };
        let Some(version) = bytes.get(8..12) else {
            return Err(truncated());
        };
        let version = u32::from_le_bytes(version.try_into().expect("4 bytes"));
        if !(FORMAT_VERSION_OLDEST..=FORMAT_VERSION).contains(&version) {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        let Some(b) = bytes.get(..HEADER_BYTES) else {
            return Err(truncated());
        };
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let stored = u32_at(60);
        let computed = crc32c::crc32c(&b[..60]);
        if stored != computed {
            return Err(Error::HeaderChecksum {
                path: path.to_path_buf(),
                stored,
                computed,
            });
        }
        let header = Header {
            version,
            shard: u32_at(12),
            shard_count: u32_at(16),
            lsn: u64_at(24),
            created_at: Timestamp(u64_at(32) as i64),
            payload_bytes: u64_at(40),
            payload_crc32c: u32_at(48),
        };
        if u32_at(20) != 0 || u64_at(52) != 0 {
            return Err(Error::malformed(path, "reserved header bytes are not zero"));
        }
        check_shard(header.shard, header.shard_count).map_err(|e| Error::malformed(path, e))?;
        if header.payload_bytes > PAYLOAD_BYTES_MAX {
            return Err(Error::malformed(
                path,
                format!(
                    "header claims a payload of {} bytes, more than the limit of \
                     {PAYLOAD_BYTES_MAX}",
                    header.payload_bytes
                ),
            ));
        }
        Ok(header)
    }

    /// Total file size this header implies.
    pub fn file_bytes(&self) -> u64 {
        HEADER_BYTES as u64 + self.payload_bytes
    }
}

/// Checks a shard index against a shard count, naming the problem.
pub(crate) fn check_shard(shard: u32, shard_count: u32) -> std::result::Result<(), String> {
    if shard_count == 0 || shard_count > SHARD_COUNT_MAX {
        return Err(format!(
            "shard count {shard_count} is not between 1 and {SHARD_COUNT_MAX}"
        ));
    }
    if shard >= shard_count {
        return Err(format!(
            "shard index {shard} is not below the shard count {shard_count}"
        ));
    }
    Ok(())
}

/// `shard-0003-00000000000000004242.snap`: names sort by shard, then LSN.
pub(crate) fn file_name(shard: u32, lsn: u64) -> String {
    format!("shard-{shard:0SHARD_DIGITS$}-{lsn:0LSN_DIGITS$}{SUFFIX}")
}

/// The temp file [`file_name`]'s snapshot is written to before it is renamed.
pub(crate) fn temp_file_name(shard: u32, lsn: u64) -> String {
    format!("shard-{shard:0SHARD_DIGITS$}-{lsn:0LSN_DIGITS$}{TEMP_SUFFIX}")
}

/// What a directory entry's name says it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Named {
    /// A complete snapshot of `shard` at `lsn`.
    Snapshot { shard: u32, lsn: u64 },
    /// A temp file of a snapshot being written, or left behind by a crash.
    Temp,
}

/// Parses a file name written by [`file_name`] (or its temp form). Anything else, including
/// names with other digit counts, is `None`: the store leaves files it did not name alone.
pub(crate) fn parse_name(name: &str) -> Option<Named> {
    let (stem, temp) = if let Some(stem) = name.strip_suffix(TEMP_SUFFIX) {
        (stem, true)
    } else {
        (name.strip_suffix(SUFFIX)?, false)
    };
    let rest = stem.strip_prefix("shard-")?;
    let (shard, lsn) = rest.split_once('-')?;
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(shard, SHARD_DIGITS) || !digits(lsn, LSN_DIGITS) {
        return None;
    }
    let shard: u32 = shard.parse().ok()?;
    let lsn: u64 = lsn.parse().ok()?;
    Some(if temp {
        Named::Temp
    } else {
        Named::Snapshot { shard, lsn }
    })
}

/// Passes writes through, computing the CRC32C and length of everything written. Refuses to
/// grow past [`PAYLOAD_BYTES_MAX`], so an oversized state stops early instead of filling the
/// disk.
pub(crate) struct ChecksumWriter<W> {
    pub inner: W,
    pub crc: u32,
    pub bytes: u64,
    pub too_large: bool,
}

impl<W: Write> ChecksumWriter<W> {
    pub fn new(inner: W) -> Self {
        ChecksumWriter {
            inner,
            crc: 0,
            bytes: 0,
            too_large: false,
        }
    }
}

impl<W: Write> Write for ChecksumWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes + buf.len() as u64 > PAYLOAD_BYTES_MAX {
            self.too_large = true;
            return Err(io::Error::other(
                "snapshot payload exceeds PAYLOAD_BYTES_MAX",
            ));
        }
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Passes reads through, computing the CRC32C of everything read.
pub(crate) struct ChecksumReader<R> {
    pub inner: R,
    pub crc: u32,
}

impl<R: Read> Read for ChecksumReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }
}

/// How many bytes bincode may "claim" per payload byte: it claims a value's in-memory size
/// before reading it, and a one-byte varint can decode to a 16-byte `u128`.
const CLAIM_BYTES_PER_BYTE_MAX: u64 = 16;

/// Decodes a shard state from `reader`, which yields at most `payload_bytes` bytes.
///
/// Why a limit: bincode decodes a `String` (e.g. an adjustment's reason) by allocating the
/// length its prefix claims before reading the bytes, so a damaged length could ask for
/// exabytes and abort the process. bincode's limit is a compile-time constant, so one decoder
/// is instantiated per power of 16 and the smallest one that still admits every valid payload
/// of this size is used: a lying length prefix can then claim at most 256 times the payload
/// size, and a valid payload is never refused.
pub(crate) fn decode_state<R: bincode::de::read::Reader>(
    reader: R,
    payload_bytes: u64,
    version: u32,
) -> std::result::Result<State, bincode::error::DecodeError> {
    let claims_max = payload_bytes.saturating_mul(CLAIM_BYTES_PER_BYTE_MAX);
    macro_rules! with_smallest_limit {
        ($($bits:literal),*) => {
            $(
                if claims_max <= 1 << $bits {
                    let config = bincode_config().with_limit::<{ 1usize << $bits }>();
                    return if version == 1 {
                        bincode::serde::decode_from_reader::<tally_engine::legacy::StateV1, _, _>(
                            reader, config,
                        )
                        .map(State::from)
                    } else if version == 2 {
                        bincode::serde::decode_from_reader::<tally_engine::legacy::StateV2, _, _>(
                            reader, config,
                        )
                        .map(State::from)
                    } else {
                        bincode::serde::decode_from_reader(reader, config)
                    };
                }
            )*
        };
    }
    with_smallest_limit!(16, 20, 24, 28, 32, 36, 40);
    // `Header::parse` refuses payloads over PAYLOAD_BYTES_MAX, and the const assertion above
    // keeps 16 times that within 2^40.
    Err(bincode::error::DecodeError::LimitExceeded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_strangers_are_ignored() {
        let name = file_name(3, 4242);
        assert_eq!(name, "shard-0003-00000000000000004242.snap");
        assert_eq!(
            parse_name(&name),
            Some(Named::Snapshot {
                shard: 3,
                lsn: 4242
            })
        );
        assert_eq!(temp_file_name(3, 4242), format!("{name}.tmp"));
        assert_eq!(parse_name(&temp_file_name(3, 4242)), Some(Named::Temp));
        assert_eq!(
            parse_name(&file_name(4095, u64::MAX)),
            Some(Named::Snapshot {
                shard: 4095,
                lsn: u64::MAX
            })
        );
        for stranger in [
            "shard-3-00000000000000004242.snap",
            "shard-0003-4242.snap",
            "shard-0003-00000000000000004242.snap.bak",
            "shard-00a3-00000000000000004242.snap",
            "shard-0003-99999999999999999999.snap", // over u64::MAX
            "shard-0003-+0000000000000004242.snap",
            "notes.txt",
            ".snap",
        ] {
            assert_eq!(parse_name(stranger), None, "{stranger}");
        }
    }

    #[test]
    fn header_round_trips() {
        let header = Header {
            version: FORMAT_VERSION,
            shard: 2,
            shard_count: 4,
            lsn: u64::MAX,
            created_at: Timestamp(-5),
            payload_bytes: 17,
            payload_crc32c: 0xdead_beef,
        };
        let bytes = header.to_bytes();
        assert_eq!(&bytes[..8], b"TALLYSNP");
        assert_eq!(Header::parse(&bytes, Path::new("x")).unwrap(), header);
    }
}
