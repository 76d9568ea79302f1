//! Recovery on hostile segment bytes, under `cargo test`: the `wal_recovery` fuzz target's own
//! check (`fuzz/checks/wal_recovery.rs`, included here) on seeded random inputs. Logs written by
//! the real writer, crashed and damaged, and segments laid out byte by byte must open or be
//! refused as corrupt, never panic; what opens reads back whole, opens again the same, and takes
//! new records. `fuzz/` runs the same check for millions of inputs (docs/operations.md,
//! "Fuzzing").

#[path = "../../fuzz/checks/wal_recovery.rs"]
mod check;

use check::{segment_header, RecordFields};
use tally_wal::{sim::SimStorage, Error, Options, Storage, Wal};

#[test]
fn seeded_inputs_pass_the_recovery_fuzz_check() {
    check::input::run_seeded(0x7a11_0001, 3_000, 400, check::check);
}

/// A simulated log of one 4 KiB segment starting at `first_lsn`, holding `records`.
fn one_segment(first_lsn: u64, records: &[RecordFields]) -> SimStorage {
    let mut image = segment_header(first_lsn).to_vec();
    for record in records {
        image.extend(record.encode(b"payload"));
    }
    let storage = SimStorage::new();
    storage.create(first_lsn, 4096, &image).expect("create");
    storage
}

/// Found by the fuzz target: a segment named and headed LSN 0 opened as an empty log whose last
/// LSN is 0 - 1 (a subtraction overflow: a panic in debug builds, `durable_lsn` u64::MAX in
/// release builds). LSNs start at 1; such a segment is refused.
#[test]
fn a_segment_at_lsn_0_is_refused_not_a_panic() {
    let empty = one_segment(0, &[]);
    let error = Wal::open(empty, Options::default()).expect_err("LSN 0");
    assert!(
        matches!(&error, Error::BadSegment { detail, .. } if detail.contains("first LSN 0")),
        "{error:?}"
    );
    let one = one_segment(0, &[RecordFields::new(0, b"payload", true)]);
    assert!(matches!(
        Wal::open(one, Options::default()),
        Err(Error::BadSegment { .. })
    ));
}

/// The other end of the LSN space: no log reaches LSN u64::MAX, so a segment starting there is
/// refused and a record claiming it ends the log (here as a torn tail) instead of overflowing
/// the LSN count.
#[test]
fn lsn_u64_max_ends_the_log_instead_of_overflowing() {
    let at_max = one_segment(u64::MAX, &[RecordFields::new(u64::MAX, b"payload", true)]);
    assert!(matches!(
        Wal::open(at_max, Options::default()),
        Err(Error::BadSegment { .. })
    ));
    let near_max = one_segment(
        u64::MAX - 1,
        &[
            RecordFields::new(u64::MAX - 1, b"payload", true),
            RecordFields::new(u64::MAX, b"payload", true),
        ],
    );
    let wal = Wal::open(near_max, Options::default()).expect("open");
    assert_eq!(wal.next_lsn(), u64::MAX);
    let cut = wal.recovery().truncated.as_ref().expect("a cut");
    assert!(cut.reason.contains("past the last LSN"), "{cut:?}");
    let mut scan = wal.scan(u64::MAX - 1).expect("scan");
    assert_eq!(
        scan.next().expect("read").map(|r| r.lsn),
        Some(u64::MAX - 1)
    );
    assert!(scan.next().expect("read").is_none());
}

/// Found by the fuzz target: a segment whose size is not a multiple of 8 (cut short) could end
/// with a valid record whose padding lies past the end of the file. Recovery accepted it and
/// positioned the log past the last byte, so reading the log back failed with an I/O error
/// ("access past segment end") instead of recovery refusing the damaged segment.
#[test]
fn a_segment_cut_to_an_unaligned_size_is_refused() {
    let record = RecordFields::new(1, b"12345", true).encode(b"12345");
    let mut image = segment_header(1).to_vec();
    image.extend(&record[..24 + 5]); // the record without its 3 bytes of padding
    let storage = SimStorage::new();
    storage
        .create(1, image.len() as u64, &image)
        .expect("create");
    let error = Wal::open(storage, Options::default()).expect_err("an unaligned segment");
    assert!(
        matches!(&error, Error::BadSegment { detail, .. } if detail.contains("not a multiple of 8")),
        "{error:?}"
    );
}
