//! The bytes on disk: segment header and record header, encoded and decoded.
//!
//! Everything is little-endian and fixed-size; `docs/wal-format.md` draws the same layout. This
//! module only turns bytes into checked values: it never does IO and never panics on corrupt
//! input (every read is bounds-checked and reported as a [`Slot::Bad`] or an `Err`).

/// First eight bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TALLYWAL";
/// Version of the segment header and record layout. A reader refuses any other value.
pub const FORMAT_VERSION: u32 = 1;
/// Version byte inside each record header. It is never zero, so a valid header is never all
/// zeroes and a zero header marks the end of the written area of a preallocated segment.
pub const RECORD_VERSION: u8 = 1;
/// Size of the segment header; records start at this offset.
pub const SEGMENT_HEADER_BYTES: usize = 32;
/// Size of the record header that precedes every payload.
pub const RECORD_HEADER_BYTES: usize = 24;
/// Records start on multiples of this many bytes (the payload is zero-padded up to it).
pub const RECORD_ALIGN: usize = 8;
/// Largest payload of one record. Bigger commands are a caller bug, not a WAL concern.
pub const RECORD_PAYLOAD_MAX: usize = 1 << 20;
/// Flag bit: this record is the last one of its batch (the batch is complete on disk).
pub const FLAG_BATCH_END: u8 = 1;
/// `durable_distance` value meaning "this record attests nothing about durability".
pub const DISTANCE_UNKNOWN: u32 = u32::MAX;

/// Bytes one record takes in a segment: header + payload, rounded up to [`RECORD_ALIGN`].
pub const fn record_bytes(payload_len: usize) -> usize {
    (RECORD_HEADER_BYTES + payload_len).next_multiple_of(RECORD_ALIGN)
}

/// Encodes a segment header for the segment whose first record has `first_lsn`.
pub fn encode_segment_header(first_lsn: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    header[0..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    // 12..16 reserved, zero.
    header[16..24].copy_from_slice(&first_lsn.to_le_bytes());
    // 24..28 reserved, zero.
    let checksum = crc32c::crc32c(&header[0..28]);
    header[28..32].copy_from_slice(&checksum.to_le_bytes());
    header
}

/// Decodes a segment header and returns its first LSN, or a sentence saying what is wrong.
pub fn decode_segment_header(bytes: &[u8]) -> Result<u64, String> {
    let Some(header) = bytes.get(0..SEGMENT_HEADER_BYTES) else {
        return Err(format!(
            "file is {} bytes, shorter than the {SEGMENT_HEADER_BYTES}-byte segment header",
            bytes.len()
        ));
    };
    if header[0..8] != SEGMENT_MAGIC {
        return Err("bad magic: not a tally WAL segment".to_string());
    }
    let stored = read_u32(header, 28);
    let computed = crc32c::crc32c(&header[0..28]);
    if stored != computed {
        return Err(format!(
            "segment header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    let version = read_u32(header, 8);
    if version != FORMAT_VERSION {
        return Err(format!(
            "segment format version {version}, this build reads only version {FORMAT_VERSION}"
        ));
    }
    Ok(read_u64(header, 16))
}

/// The record header fields that the writer fills in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub payload_len: u32,
    pub lsn: u64,
    /// `lsn - durable_lsn` at the time the header was written, or [`DISTANCE_UNKNOWN`].
    pub durable_distance: u32,
    pub flags: u8,
}

impl RecordHeader {
    /// Encodes the header; `payload_checksum` is `crc32c(payload)`, which the writer computes
    /// once when it copies the payload in (the header may be written later, see `wal.rs`).
    pub fn encode(&self, payload_checksum: u32) -> [u8; RECORD_HEADER_BYTES] {
        let mut header = [0u8; RECORD_HEADER_BYTES];
        header[4..8].copy_from_slice(&self.payload_len.to_le_bytes());
        header[8..16].copy_from_slice(&self.lsn.to_le_bytes());
        header[16..20].copy_from_slice(&self.durable_distance.to_le_bytes());
        header[20] = RECORD_VERSION;
        header[21] = self.flags;
        // 22..24 reserved, zero.
        let checksum = crc32c::crc32c_append(payload_checksum, &header[4..]);
        header[0..4].copy_from_slice(&checksum.to_le_bytes());
        header
    }

    /// The highest LSN this record proves was durable before it was written, if any.
    pub fn attested_durable_lsn(&self) -> Option<u64> {
        if self.durable_distance == DISTANCE_UNKNOWN {
            return None;
        }
        self.lsn.checked_sub(u64::from(self.durable_distance))
    }
}

/// Distance field for a record with `lsn` written while everything up to `durable_lsn` was
/// durable. Saturates to [`DISTANCE_UNKNOWN`], which claims nothing (the safe direction).
pub fn durable_distance(lsn: u64, durable_lsn: u64) -> u32 {
    let distance = lsn.saturating_sub(durable_lsn);
    u32::try_from(distance).unwrap_or(DISTANCE_UNKNOWN)
}

/// What the bytes at one aligned offset of a segment hold.
#[derive(Debug)]
pub enum Slot<'a> {
    /// An all-zero header, or too little room left for a header: no record starts here.
    End,
    /// A record whose version, length and checksum are right (its LSN is checked by the caller).
    Valid {
        header: RecordHeader,
        payload: &'a [u8],
        /// Offset just past this record (aligned): where the next one starts.
        next_offset: usize,
    },
    /// Something is here, but not a valid record.
    Bad(BadRecord),
}

/// Why the bytes at an offset are not a valid record (kept small: recovery may probe many
/// offsets of garbage and must not allocate for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRecord {
    Version(u8),
    Length(u32),
    Checksum { stored: u32, computed: u32 },
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Version(version) => write!(
                f,
                "record version {version}, this build reads only version {RECORD_VERSION}"
            ),
            Self::Length(len) => write!(
                f,
                "record length {len} runs past the end of the segment or over the \
                 {RECORD_PAYLOAD_MAX}-byte limit"
            ),
            Self::Checksum { stored, computed } => write!(
                f,
                "record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
        }
    }
}

/// Reads the slot at `offset` of a segment's bytes.
pub fn read_slot(segment: &[u8], offset: usize) -> Slot<'_> {
    let Some(header) = offset
        .checked_add(RECORD_HEADER_BYTES)
        .and_then(|end| segment.get(offset..end))
    else {
        return Slot::End;
    };
    if header.iter().all(|&b| b == 0) {
        return Slot::End;
    }
    let version = header[20];
    if version != RECORD_VERSION {
        return Slot::Bad(BadRecord::Version(version));
    }
    let payload_len = read_u32(header, 4);
    let payload_start = offset + RECORD_HEADER_BYTES;
    let payload = usize::try_from(payload_len)
        .ok()
        .filter(|&len| len <= RECORD_PAYLOAD_MAX)
        .and_then(|len| segment.get(payload_start..payload_start + len));
    let Some(payload) = payload else {
        return Slot::Bad(BadRecord::Length(payload_len));
    };
    let stored = read_u32(header, 0);
    let computed = crc32c::crc32c_append(crc32c::crc32c(payload), &header[4..]);
    if stored != computed {
        return Slot::Bad(BadRecord::Checksum { stored, computed });
    }
    let header = RecordHeader {
        payload_len,
        lsn: read_u64(header, 8),
        durable_distance: read_u32(header, 16),
        flags: header[21],
    };
    Slot::Valid {
        header,
        payload,
        next_offset: offset + record_bytes(payload.len()),
    }
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_header_round_trips_and_rejects_a_flip() {
        let mut header = encode_segment_header(42);
        assert_eq!(decode_segment_header(&header), Ok(42));
        header[17] ^= 1;
        assert!(decode_segment_header(&header).is_err());
        assert!(decode_segment_header(&header[..10]).is_err());
    }

    #[test]
    fn record_round_trips_and_every_bit_flip_is_caught() {
        let payload = b"hello, wal";
        let header = RecordHeader {
            payload_len: payload.len() as u32,
            lsn: 7,
            durable_distance: durable_distance(7, 5),
            flags: FLAG_BATCH_END,
        };
        let mut bytes = vec![0u8; 64];
        bytes[..RECORD_HEADER_BYTES].copy_from_slice(&header.encode(crc32c::crc32c(payload)));
        bytes[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload.len()].copy_from_slice(payload);
        match read_slot(&bytes, 0) {
            Slot::Valid {
                header: decoded,
                payload: read,
                next_offset,
            } => {
                assert_eq!(decoded, header);
                assert_eq!(read, payload);
                assert_eq!(next_offset, 40);
                assert_eq!(decoded.attested_durable_lsn(), Some(5));
            }
            other => panic!("expected a valid record, got {other:?}"),
        }
        for bit in 0..(RECORD_HEADER_BYTES + payload.len()) * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !matches!(read_slot(&flipped, 0), Slot::Valid { .. }),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn zero_header_is_end_and_short_tail_is_end() {
        assert!(matches!(read_slot(&[0u8; 64], 8), Slot::End));
        assert!(matches!(read_slot(&[1u8; 30], 8), Slot::End));
        assert!(matches!(read_slot(&[1u8; 64], 0), Slot::Bad(_)));
    }

    #[test]
    fn distance_saturates_to_unknown() {
        assert_eq!(durable_distance(10, 9), 1);
        assert_eq!(durable_distance(u64::MAX, 0), DISTANCE_UNKNOWN);
        let header = RecordHeader {
            payload_len: 0,
            lsn: 1,
            durable_distance: DISTANCE_UNKNOWN,
            flags: 0,
        };
        assert_eq!(header.attested_durable_lsn(), None);
    }
}
