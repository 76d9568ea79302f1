//! Property check of WAL recovery (`Wal::open`) over segment bytes built from fuzz input.
//!
//! Shared by the cargo-fuzz target `wal_recovery` and by `wal/tests/recovery_fuzz.rs`, which
//! runs it on seeded random inputs under `cargo test`. It needs only `tally-wal` and `crc32c`.
//!
//! The first input byte picks how the segments are made:
//!
//! * **written** (even): the real writer appends batches (some committed, some only sealed,
//!   maybe an unsealed tail) to segments of the minimum size, so they rotate; then a simulated
//!   crash keeps none, all, or an input-chosen subset of the unsynced bytes, and up to four
//!   input-chosen byte edits damage the segments.
//! * **crafted** (odd): up to three segments laid out by the input: a valid, a misnamed or a raw
//!   segment header, then records encoded here with correct or broken checksums, any LSN,
//!   durability attestation, version, flags and (lying) length, plus gaps of zeroes and raw
//!   garbage. Recovery never sees a checksum the input had to guess.
//!
//! Properties: opening never panics and fails only with `Corrupt` or `BadSegment`. When it
//! succeeds, every record from the first LSN to the last reads back in LSN order; opening again
//! what the first open left durable finds the same log and nothing to cut (so the cut was made
//! durable); and a batch appended after recovery reads back after a further crash. For an
//! undamaged written log, recovery loses no committed batch, keeps whole batches only, returns
//! exactly the payloads written, and after a process crash (page cache kept) every sealed batch.

#![allow(dead_code)] // each user calls only part of it

#[path = "input.rs"]
pub mod input;

use input::Input;
use tally_wal::{
    record_bytes, sim::SimStorage, Error, Options, Storage, Wal, FORMAT_VERSION,
    RECORD_HEADER_BYTES, SEGMENT_BYTES_MIN, SEGMENT_HEADER_BYTES,
};

/// Runs the check on one input; panics when a property fails.
pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let storage = SimStorage::new();
    let options = Options {
        segment_bytes: SEGMENT_BYTES_MIN,
        ..Options::default()
    };
    if mode & 1 == 0 {
        let (crashed, written) = write_log(&storage, &mut input, &options);
        let recovered = open_and_check(&crashed, &options);
        if let Some(written) = written {
            let recovered = recovered.expect("a crash alone is never corruption");
            written.check(&recovered);
        }
    } else {
        craft(&storage, &mut input);
        open_and_check(&storage, &options);
    }
}

/// What the writer wrote, when nothing but a crash touched it afterwards.
struct Written {
    first_lsn: u64,
    payloads: Vec<Vec<u8>>,
    /// Record counts at the end of each sealed batch (0 first).
    boundaries: Vec<usize>,
    /// Records in batches that a commit made durable.
    synced: usize,
    /// The crash kept every unsynced byte.
    kept_all: bool,
}

impl Written {
    fn check(&self, recovered: &[(u64, Vec<u8>)]) {
        let count = recovered.len();
        assert!(
            self.boundaries.contains(&count),
            "{count} records recovered is not a batch boundary of {:?}",
            self.boundaries
        );
        assert!(
            count >= self.synced,
            "{count} records recovered, {} were committed",
            self.synced
        );
        if self.kept_all {
            assert_eq!(count, *self.boundaries.last().expect("0 is always there"));
        }
        for (index, (lsn, payload)) in recovered.iter().enumerate() {
            assert_eq!(*lsn, self.first_lsn + index as u64);
            assert!(
                *payload == self.payloads[index],
                "payload of LSN {lsn} changed"
            );
        }
    }
}

fn payload(lsn: u64, len: usize) -> Vec<u8> {
    lsn.to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

/// The writer's log, crashed and possibly damaged; `Written` if it was not damaged.
fn write_log(
    storage: &SimStorage,
    input: &mut Input<'_>,
    options: &Options,
) -> (SimStorage, Option<Written>) {
    let first_lsn = 1 + u64::from(input.u8());
    let options = Options {
        first_lsn,
        ..options.clone()
    };
    let mut wal = Wal::open(storage.clone(), options).expect("open an empty log");
    let mut written = Written {
        first_lsn,
        payloads: Vec::new(),
        boundaries: vec![0],
        synced: 0,
        kept_all: false,
    };
    let batches = input.u8() % 12;
    for _ in 0..batches {
        let shape = input.u8();
        for _ in 0..=shape % 4 {
            // Up to 1,020 bytes: a 4 KiB segment holds a few, so batches straddle rotations.
            let payload = payload(wal.next_lsn(), usize::from(input.u8()) * 4);
            wal.append(&payload).expect("append");
            written.payloads.push(payload);
        }
        if shape & 0x80 != 0 {
            wal.commit().expect("commit");
            written.synced = written.payloads.len();
        } else {
            wal.seal().expect("seal");
        }
        written.boundaries.push(written.payloads.len());
    }
    // Records of a batch that was never sealed: their bytes may be on disk, minus a header.
    for _ in 0..input.u8() % 3 {
        let payload = payload(wal.next_lsn(), usize::from(input.u8()) * 4);
        wal.append(&payload).expect("append");
    }
    drop(wal);

    let how = input.u8();
    let keep = input.u64();
    let crashed = match how % 3 {
        0 => storage.crash_losing_unsynced(),
        1 => {
            written.kept_all = true;
            storage.crash_keeping_unsynced()
        }
        _ => storage.crash(|lsn, offset| {
            let bit = lsn.wrapping_mul(31).wrapping_add(offset / 64) % 64;
            keep >> bit & 1 == 1
        }),
    };

    // Damage: up to four edits (a non-zero xor mask, a segment, an offset).
    let segments = crashed.list().expect("list");
    let mut damaged = false;
    for _ in 0..4 {
        let mask = input.u8();
        if mask == 0 {
            break;
        }
        let first_lsn = segments[usize::from(input.u8()) % segments.len()];
        let offset = u64::from(input.u16()) % SEGMENT_BYTES_MIN;
        for bit in 0..8 {
            if mask >> bit & 1 == 1 {
                crashed.flip_bit(first_lsn, offset, bit);
            }
        }
        damaged = true;
    }
    (crashed, (!damaged).then_some(written))
}

/// Segments laid out by the input (see the module comment).
fn craft(storage: &SimStorage, input: &mut Input<'_>) {
    let mut next_lsn = u64::from(input.u8());
    for _ in 0..=input.u8() % 3 {
        let choice = input.u8();
        let first_lsn = match choice % 8 {
            0 => input.u64(),
            1 => next_lsn.wrapping_add(u64::from(input.u8())),
            _ => next_lsn,
        };
        let capacity = match (choice >> 3) % 8 {
            0 => usize::from(input.u8()), // any size, even too small or unaligned
            _ => 8 * (7 + usize::from(input.u16() % 256)), // 56 to 2,096 bytes
        };
        let mut image = vec![0u8; capacity];
        let header = match (choice >> 6) % 4 {
            0 => {
                let mut raw = [0u8; SEGMENT_HEADER_BYTES];
                let taken = input.bytes(SEGMENT_HEADER_BYTES);
                raw[..taken.len()].copy_from_slice(taken);
                raw
            }
            1 => segment_header(first_lsn.wrapping_add(1)),
            _ => segment_header(first_lsn),
        };
        put(&mut image, 0, &header);
        let mut offset = SEGMENT_HEADER_BYTES;
        let mut lsn = first_lsn;
        while offset < capacity {
            match input.u8() % 8 {
                0 => break,
                1 => offset += 8 * (1 + usize::from(input.u8() % 8)),
                2 => {
                    let len = 1 + usize::from(input.u8() % 32);
                    let garbage = input.bytes(len);
                    put(&mut image, offset, garbage);
                    offset += garbage.len();
                }
                _ => {
                    let (bytes, record_lsn) = record(input, lsn);
                    put(&mut image, offset, &bytes);
                    offset += bytes.len();
                    lsn = record_lsn.wrapping_add(1);
                }
            }
        }
        next_lsn = lsn;
        // Two segments with one first LSN cannot exist on disk (one file name).
        if !storage.list().expect("list").contains(&first_lsn) {
            storage
                .create(first_lsn, capacity as u64, &image)
                .expect("create a simulated segment");
        }
    }
}

/// A record with input-chosen fields, encoded as `docs/wal-format.md` lays it out and padded
/// to its aligned size. Returns the bytes and the record's LSN.
fn record(input: &mut Input<'_>, expected_lsn: u64) -> (Vec<u8>, u64) {
    let flags = input.u8();
    let len = usize::from(input.u8() % 48);
    let payload = input.bytes(len);
    let fields = input.u8();
    let lsn = match fields % 16 {
        0 => input.u64(),
        1 => expected_lsn.wrapping_add(1),
        2 => expected_lsn.wrapping_sub(1),
        _ => expected_lsn,
    };
    let durable_distance = match (fields >> 4) % 4 {
        0 => u32::MAX, // attests nothing
        1 => input.u32(),
        _ => u32::from(input.u8() % 8),
    };
    let mut header = RecordFields {
        payload_len: payload.len() as u32,
        lsn,
        durable_distance,
        version: 1,
        flags: flags & 0x03, // bit 0: batch end; bit 1: a flag no writer sets
        reserved: if flags & 0x10 != 0 { 0xff } else { 0 },
    };
    if flags & 0x08 != 0 {
        header.payload_len = input.u32(); // a lying length, under a checksum that covers it
    }
    if flags & 0x40 != 0 {
        header.version = input.u8();
    }
    let mut bytes = header.encode(payload);
    if flags & 0x20 != 0 {
        bytes[usize::from(flags >> 7)] ^= 1; // a broken checksum
    }
    (bytes, lsn)
}

/// The fields of a record header.
#[derive(Clone, Copy, Debug)]
pub struct RecordFields {
    pub payload_len: u32,
    pub lsn: u64,
    pub durable_distance: u32,
    pub version: u8,
    pub flags: u8,
    pub reserved: u8,
}

impl RecordFields {
    /// A record of the current version with these essentials, attesting nothing.
    pub fn new(lsn: u64, payload: &[u8], batch_end: bool) -> Self {
        Self {
            payload_len: payload.len() as u32,
            lsn,
            durable_distance: u32::MAX,
            version: 1,
            flags: u8::from(batch_end),
            reserved: 0,
        }
    }

    /// Header (with a correct checksum) and payload, padded to the record's aligned size.
    pub fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; record_bytes(payload.len())];
        bytes[4..8].copy_from_slice(&self.payload_len.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.lsn.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.durable_distance.to_le_bytes());
        bytes[20] = self.version;
        bytes[21] = self.flags;
        bytes[22] = self.reserved;
        let checksum =
            crc32c::crc32c_append(crc32c::crc32c(payload), &bytes[4..RECORD_HEADER_BYTES]);
        bytes[0..4].copy_from_slice(&checksum.to_le_bytes());
        bytes[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload.len()].copy_from_slice(payload);
        bytes
    }
}

/// A valid segment header (`docs/wal-format.md`).
pub fn segment_header(first_lsn: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    header[0..8].copy_from_slice(b"TALLYWAL");
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&first_lsn.to_le_bytes());
    let checksum = crc32c::crc32c(&header[0..28]);
    header[28..32].copy_from_slice(&checksum.to_le_bytes());
    header
}

/// Copies what fits of `bytes` to `offset` of `image`.
fn put(image: &mut [u8], offset: usize, bytes: &[u8]) {
    if let Some(room) = image.get_mut(offset..) {
        let len = room.len().min(bytes.len());
        room[..len].copy_from_slice(&bytes[..len]);
    }
}

/// Every record of a log, in order; checks they are consecutive from its first LSN to its last.
fn records(wal: &Wal<SimStorage>) -> Vec<(u64, Vec<u8>)> {
    let mut scan = wal
        .scan(wal.first_lsn())
        .expect("a recovered log scans from its first LSN");
    let mut records = Vec::new();
    while let Some(record) = scan.next().expect("a recovered log reads back") {
        assert_eq!(record.lsn, wal.first_lsn() + records.len() as u64);
        records.push((record.lsn, record.payload.to_vec()));
    }
    assert_eq!(
        wal.first_lsn() + records.len() as u64,
        wal.next_lsn(),
        "records missing before the next LSN"
    );
    records
}

/// Opens the log and checks the properties of a successful recovery; returns its records, or
/// `None` when recovery refused the log.
fn open_and_check(storage: &SimStorage, options: &Options) -> Option<Vec<(u64, Vec<u8>)>> {
    let mut wal = match Wal::open(storage.clone(), options.clone()) {
        Ok(wal) => wal,
        Err(Error::Corrupt { .. } | Error::BadSegment { .. }) => return None,
        Err(other) => panic!("recovery failed with an unexpected error: {other:?}"),
    };
    let recovery = wal.recovery().clone();
    assert_eq!(recovery.first_lsn, wal.first_lsn());
    assert_eq!(recovery.next_lsn, wal.next_lsn());
    assert_eq!(recovery.segment_count, wal.segment_count());
    let recovered = records(&wal);

    // What recovery left is durable and final: a power cut now changes nothing.
    let again = Wal::open(storage.crash_losing_unsynced(), options.clone())
        .expect("a recovered log opens again");
    assert_eq!(again.recovery().truncated, None, "a second open cut more");
    assert_eq!(again.first_lsn(), recovery.first_lsn);
    assert_eq!(again.next_lsn(), recovery.next_lsn);
    assert!(
        records(&again) == recovered,
        "a second open read other records"
    );
    drop(again);

    // The writer continues where recovery stopped (unless a crafted log left it too close to
    // the end of the LSN space, 2^64 records away from any real log).
    if wal.next_lsn() > u64::MAX - 3 {
        return Some(recovered);
    }
    let mut expected = recovered.clone();
    for len in [0, 300] {
        let payload = payload(wal.next_lsn(), len);
        let lsn = wal.append(&payload).expect("append after recovery");
        expected.push((lsn, payload));
    }
    wal.commit().expect("commit after recovery");
    drop(wal);
    let after = Wal::open(storage.crash_losing_unsynced(), options.clone())
        .expect("reopen after appending");
    assert!(
        records(&after) == expected,
        "records appended after recovery did not read back"
    );
    Some(recovered)
}
