//! Crash, corruption and poisoning tests against the simulated storage.
//!
//! Every test drives the public API only; faults come from `tally_wal::sim::SimStorage`.

use proptest::prelude::*;
use std::collections::BTreeMap;
use tally_wal::{
    sim::SimStorage, Durability, Error, Options, Storage, Wal, RECORD_HEADER_BYTES,
    SEGMENT_HEADER_BYTES,
};

const SMALL_SEGMENT: u64 = 4096;

fn options() -> Options {
    Options {
        segment_bytes: SMALL_SEGMENT,
        ..Options::default()
    }
}

/// Deterministic payload of a given length for an LSN, so any mix-up is visible.
fn payload(lsn: u64, len: usize) -> Vec<u8> {
    let seed = format!("<{lsn}>");
    seed.bytes().cycle().take(len).collect()
}

fn records(wal: &Wal<SimStorage>) -> Vec<(u64, Vec<u8>)> {
    let mut scan = wal.scan(wal.first_lsn()).expect("scan");
    let mut out = Vec::new();
    while let Some(record) = scan.next().expect("scan record") {
        out.push((record.lsn, record.payload.to_vec()));
    }
    out
}

/// Appends one batch of records with the given payload lengths; returns the expected records.
fn append_batch(wal: &mut Wal<SimStorage>, lens: &[usize]) -> Vec<(u64, Vec<u8>)> {
    lens.iter()
        .map(|&len| {
            let lsn = wal.next_lsn();
            let bytes = payload(lsn, len);
            assert_eq!(wal.append(&bytes).expect("append"), lsn);
            (lsn, bytes)
        })
        .collect()
}

#[test]
fn records_come_back_in_order_across_rotations_and_reopen() {
    let storage = SimStorage::new();
    let mut wal = Wal::open(storage.clone(), options()).expect("open");
    let mut expected = Vec::new();
    for batch in 0..40 {
        expected.extend(append_batch(&mut wal, &[100, 7, 0, 300 + batch]));
        let durable = wal.commit().expect("commit");
        assert_eq!(durable, expected.last().expect("records").0);
        assert_eq!(wal.durable_lsn(), durable);
    }
    assert!(wal.segment_count() > 5, "segments: {}", wal.segment_count());
    assert_eq!(records(&wal), expected);

    let reopened = Wal::open(storage.crash_losing_unsynced(), options()).expect("reopen");
    assert_eq!(reopened.recovery().truncated, None);
    assert_eq!(reopened.next_lsn(), expected.len() as u64 + 1);
    assert_eq!(reopened.durable_lsn(), expected.len() as u64);
    assert_eq!(records(&reopened), expected);

    // Scanning from the middle starts exactly there.
    let mut scan = reopened.scan(77).expect("scan");
    assert_eq!(scan.next().expect("record").expect("some").lsn, 77);
}

/// Unsynced bytes in the order a sequential writer puts them on disk: segment, then offset.
fn unsynced_byte_index(storage: &SimStorage) -> impl Fn(u64, u64) -> u64 {
    let mut base = 0;
    let mut ranges = BTreeMap::new();
    for (first_lsn, start, end) in storage.unsynced_ranges() {
        ranges.insert(first_lsn, (start, base));
        base += end - start;
    }
    move |first_lsn, offset| {
        let (start, base) = ranges[&first_lsn];
        base + (offset - start)
    }
}

fn total_unsynced(storage: &SimStorage) -> u64 {
    storage
        .unsynced_ranges()
        .iter()
        .map(|(_, start, end)| end - start)
        .sum()
}

#[test]
fn crash_at_every_byte_of_the_last_batch_reopens_with_exactly_the_synced_records() {
    let storage = SimStorage::new();
    let mut wal = Wal::open(storage.clone(), options()).expect("open");
    let mut synced = Vec::new();
    for _ in 0..6 {
        synced.extend(append_batch(&mut wal, &[200, 150, 90]));
        wal.commit().expect("commit");
    }
    // The last batch crosses into a new segment, so the cut must also remove a segment.
    let segments_before = wal.segment_count();
    let last_batch = append_batch(&mut wal, &[500, 700, 33, 900, 64]);
    wal.seal().expect("seal");
    assert!(
        wal.segment_count() > segments_before,
        "last batch must rotate"
    );
    let total = total_unsynced(&storage);
    assert!(total > 2000, "unsynced bytes: {total}");
    let index = unsynced_byte_index(&storage);

    for kept in 0..=total {
        let crashed = storage.crash(|lsn, offset| index(lsn, offset) < kept);
        let reopened = Wal::open(crashed.clone(), options())
            .unwrap_or_else(|error| panic!("crash keeping {kept} bytes: {error}"));
        let got = records(&reopened);
        if kept < total {
            assert_eq!(got, synced, "crash keeping {kept} of {total} bytes");
            // The segment the batch rotated into was created durably, so even a crash that
            // kept no byte of the batch cuts something: that empty segment.
            let truncation = reopened.recovery().truncated.clone().expect("a cut");
            assert_eq!(
                truncation.segments_removed, 1,
                "kept {kept}: {truncation:?}"
            );
            assert_eq!(
                truncation.bytes > 0,
                kept > 0,
                "kept {kept}: {truncation:?}"
            );
        } else {
            let mut all = synced.clone();
            all.extend(last_batch.iter().cloned());
            assert_eq!(got, all, "every byte of the last batch survived");
        }
        // The cut tail is clean: the log takes new batches and reopens again without a cut.
        let mut reopened = reopened;
        let more = append_batch(&mut reopened, &[40]);
        reopened.commit().expect("commit after recovery");
        let again = Wal::open(crashed.crash_losing_unsynced(), options()).expect("reopen");
        assert_eq!(again.recovery().truncated, None);
        assert_eq!(records(&again).last(), more.last());
    }
}

#[test]
fn pipelined_batch_torn_before_its_predecessor_synced_is_a_torn_tail_not_corruption() {
    // Batch N is sealed but its sync never finished; batch N+1 was written meanwhile. A crash
    // that persisted N+1's bytes but lost N's must cut both: neither was acknowledged.
    let storage = SimStorage::new();
    let mut wal = Wal::open(storage.clone(), options()).expect("open");
    let mut synced = Vec::new();
    for _ in 0..3 {
        synced.extend(append_batch(&mut wal, &[120, 80]));
        wal.commit().expect("commit");
    }
    let batch_n = append_batch(&mut wal, &[120, 80]);
    wal.seal().expect("seal N");
    let boundary = storage.unsynced_ranges();
    let n_end = boundary.last().expect("unsynced").2;
    append_batch(&mut wal, &[120, 80]);
    wal.seal().expect("seal N+1");

    let crashed = storage.crash(|_, offset| offset >= n_end);
    let reopened = Wal::open(crashed, options()).expect("a torn pipeline is not corruption");
    assert_eq!(records(&reopened), synced);
    let truncation = reopened.recovery().truncated.clone().expect("cut");
    assert_eq!(truncation.records, 0);
    assert!(truncation.bytes > 0);
    drop(batch_n);
}

#[test]
fn a_bit_flip_in_the_middle_is_refused_naming_segment_and_offset() {
    let storage = SimStorage::new();
    let mut wal = Wal::open(storage.clone(), options()).expect("open");
    for _ in 0..30 {
        append_batch(&mut wal, &[100, 100]);
        wal.commit().expect("commit");
    }
    let first_segment = wal.segment_first_lsns()[0];
    // Second record of the first segment: header of 24 bytes + 100 payload = 128 bytes each.
    let record_offset = (SEGMENT_HEADER_BYTES + 128) as u64;
    for flip_at in [
        record_offset,                                   // checksum
        record_offset + 9,                               // LSN
        record_offset + RECORD_HEADER_BYTES as u64 + 50, // payload
    ] {
        let crashed = storage.crash_losing_unsynced();
        assert!(crashed.flip_bit(first_segment, flip_at, 3));
        match Wal::open(crashed, options()) {
            Err(Error::Corrupt {
                segment, offset, ..
            }) => {
                assert_eq!(segment, "sim:00000000000000000001.wal");
                assert_eq!(offset, record_offset);
            }
            other => panic!("flip at {flip_at}: expected Corrupt, got {other:?}"),
        }
    }

    // A flip in a segment header is refused too.
    let crashed = storage.crash_losing_unsynced();
    assert!(crashed.flip_bit(first_segment, 17, 0));
    let error = Wal::open(crashed, options()).expect_err("bad header");
    assert!(matches!(error, Error::BadSegment { .. }), "{error}");
    assert!(
        error.to_string().contains("00000000000000000001.wal"),
        "{error}"
    );
}

#[test]
fn a_bit_flip_in_the_last_synced_batch_is_indistinguishable_from_a_torn_tail() {
    // Known limit, asserted so it cannot change silently: nothing written after the last
    // batch attests that it was durable, so a flip there is cut like a torn write.
    let storage = SimStorage::new();
    let mut wal = Wal::open(storage.clone(), options()).expect("open");
    let first = append_batch(&mut wal, &[100]);
    wal.commit().expect("commit");
    append_batch(&mut wal, &[100]);
    wal.commit().expect("commit");
    let crashed = storage.crash_losing_unsynced();
    assert!(crashed.flip_bit(1, (SEGMENT_HEADER_BYTES + 128 + 60) as u64, 1));
    let reopened = Wal::open(crashed, options()).expect("open");
    assert_eq!(records(&reopened), first);
    assert!(reopened.recovery().truncated.is_some());
}

#[test]
fn a_failed_sync_poisons_the_log_and_nothing_unsynced_survives() {
    let storage = SimStorage::new();
    let mut wal = Wal::open(storage.clone(), options()).expect("open");
    let synced = append_batch(&mut wal, &[64, 64]);
    wal.commit().expect("commit");
    storage.fail_sync_after(0);
    append_batch(&mut wal, &[64]);
    let error = wal.commit().expect_err("sync fails");
    assert!(matches!(error, Error::SyncFailed { .. }), "{error}");
    assert!(wal.is_poisoned());
    assert_eq!(wal.durable_lsn(), 2);

    for error in [
        wal.append(b"more").expect_err("append"),
        wal.seal().expect_err("seal"),
        wal.commit().expect_err("commit"),
        wal.syncer().sync().expect_err("sync"),
    ] {
        let Error::Poisoned { cause } = &error else {
            panic!("expected Poisoned, got {error}");
        };
        assert!(cause.contains("simulated sync failure"), "{cause}");
        assert!(error.to_string().contains("restart"), "{error}");
    }

    let reopened = Wal::open(storage.crash_losing_unsynced(), options()).expect("reopen");
    assert_eq!(records(&reopened), synced);
}

#[test]
fn a_full_disk_at_rotation_is_a_clear_error_loses_nothing_and_recovers_once_space_is_freed() {
    let storage = SimStorage::new();
    let mut wal = Wal::open(storage.clone(), options()).expect("open");
    // Committed records, in more than one segment.
    let mut committed = Vec::new();
    for _ in 0..6 {
        committed.extend(append_batch(&mut wal, &[500, 300]));
        wal.commit().expect("commit");
    }
    storage.fail_next_create();
    let error = loop {
        let lsn = wal.next_lsn();
        match wal.append(&payload(lsn, 500)) {
            // Appended but never committed: nobody was told it is durable.
            Ok(_) => continue,
            Err(error) => break error,
        }
    };
    assert!(matches!(error, Error::NoSpace { .. }), "{error}");
    assert!(error.to_string().contains("disk full"), "{error}");
    assert!(matches!(wal.append(b"x"), Err(Error::Poisoned { .. })));
    assert!(matches!(wal.commit(), Err(Error::Poisoned { .. })));
    drop(wal);
    // The process restarts once space is freed (the next create succeeds): every committed
    // record is there, in order, and the log appends and rotates again.
    let mut wal = Wal::open(storage.crash_losing_unsynced(), options()).expect("reopen");
    let back = records(&wal);
    assert_eq!(back[..committed.len()], committed[..]);
    let segments = wal.segment_count();
    let mut more = Vec::new();
    for _ in 0..6 {
        more.extend(append_batch(&mut wal, &[500, 300]));
        wal.commit().expect("commit after space was freed");
    }
    assert!(wal.segment_count() > segments, "it rotated again");
    let back = records(&wal);
    assert_eq!(back[back.len() - more.len()..], more[..]);
}

#[test]
fn a_record_too_large_is_refused_and_the_log_stays_usable() {
    let mut wal = Wal::open(SimStorage::new(), options()).expect("open");
    let max = options().record_payload_max();
    assert_eq!(
        max,
        (SMALL_SEGMENT as usize) - SEGMENT_HEADER_BYTES - RECORD_HEADER_BYTES
    );
    let error = wal.append(&vec![0u8; max + 1]).expect_err("too large");
    assert!(matches!(error, Error::RecordTooLarge { .. }), "{error}");
    assert_eq!(wal.append(&vec![1u8; max]).expect("max fits"), 1);
    assert_eq!(wal.commit().expect("commit"), 1);
}

#[test]
fn deleting_below_an_lsn_removes_whole_segments_only() {
    let storage = SimStorage::new();
    let mut wal = Wal::open(storage.clone(), options()).expect("open");
    for _ in 0..60 {
        append_batch(&mut wal, &[200]);
        wal.commit().expect("commit");
    }
    let firsts = wal.segment_first_lsns();
    assert!(firsts.len() >= 4, "{firsts:?}");
    // An LSN inside the third segment: the first two go, the third holds LSNs below it too.
    let cut = firsts[2] + 1;
    assert_eq!(wal.delete_below(cut).expect("delete"), 2);
    assert_eq!(wal.first_lsn(), firsts[2]);
    assert_eq!(storage.list().expect("list"), firsts[2..].to_vec());
    assert!(matches!(
        wal.scan(firsts[1]),
        Err(Error::LsnUnavailable { .. })
    ));
    // The active segment is never deleted, even below an LSN past the end.
    let deleted = wal.delete_below(u64::MAX).expect("delete");
    assert_eq!(deleted, firsts.len() - 3);
    assert_eq!(wal.segment_count(), 1);

    let reopened = Wal::open(storage.crash_losing_unsynced(), options()).expect("reopen");
    assert_eq!(reopened.first_lsn(), *firsts.last().expect("segments"));
    assert_eq!(reopened.next_lsn(), 61);
    assert_eq!(
        records(&reopened).first().expect("records").0,
        reopened.first_lsn()
    );
}

#[test]
fn an_empty_log_starts_at_the_given_first_lsn() {
    let storage = SimStorage::new();
    let options = Options {
        first_lsn: 1_000,
        ..options()
    };
    let wal = Wal::open(storage.clone(), options.clone()).expect("open");
    assert_eq!(wal.durable_lsn(), 999);
    drop(wal);
    let mut wal = Wal::open(storage.clone(), Options::default()).expect("reopen empty");
    assert_eq!(
        wal.next_lsn(),
        1_000,
        "first_lsn is ignored once segments exist"
    );
    assert_eq!(wal.append(b"a").expect("append"), 1_000);
    assert_eq!(wal.commit().expect("commit"), 1_000);
    assert!(matches!(
        Wal::open(
            SimStorage::new(),
            Options {
                first_lsn: 0,
                ..options
            }
        ),
        Err(Error::InvalidOptions(_))
    ));
}

#[test]
fn a_sync_thread_makes_sealed_batches_durable_while_the_owner_appends() {
    let storage = SimStorage::new();
    let mut wal = Wal::open(storage.clone(), options()).expect("open");
    let syncer = wal.syncer();
    let (requests, inbox) = std::sync::mpsc::channel::<u64>();
    let (replies, outbox) = std::sync::mpsc::channel::<u64>();
    let sync_thread = std::thread::spawn(move || {
        for sealed in inbox {
            let durable = syncer.sync().expect("sync");
            assert!(durable >= sealed);
            replies.send(durable).expect("reply");
        }
    });
    let mut last_durable = 0;
    for _ in 0..50 {
        append_batch(&mut wal, &[90, 90, 90]);
        let sealed = wal.seal().expect("seal");
        requests.send(sealed).expect("request");
        // Fill the next batch while the previous one syncs.
        append_batch(&mut wal, &[90]);
        let durable = outbox.recv().expect("durable");
        assert!(durable >= last_durable && durable >= sealed);
        last_durable = durable;
        wal.seal().expect("seal");
    }
    drop(requests);
    sync_thread.join().expect("sync thread");
    let final_durable = wal.commit().expect("commit");
    assert_eq!(final_durable, wal.next_lsn() - 1);
    let reopened = Wal::open(storage.crash_losing_unsynced(), options()).expect("reopen");
    assert_eq!(reopened.next_lsn(), wal.next_lsn());
}

#[test]
fn durability_none_reports_sealed_records_durable_without_syncing() {
    let storage = SimStorage::new();
    let options = Options {
        durability: Durability::None,
        ..options()
    };
    let mut wal = Wal::open(storage.clone(), options.clone()).expect("open");
    let syncs_at_open = storage.sync_count();
    append_batch(&mut wal, &[10, 10]);
    assert_eq!(wal.commit().expect("commit"), 2);
    assert_eq!(storage.sync_count(), syncs_at_open);
    // Survives a process crash (the page cache lives on) ...
    let reopened = Wal::open(storage.crash_keeping_unsynced(), options.clone()).expect("reopen");
    assert_eq!(reopened.next_lsn(), 3);
    // ... but not a power loss.
    let reopened = Wal::open(storage.crash_losing_unsynced(), options).expect("reopen");
    assert_eq!(reopened.next_lsn(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any crash, keeping any subset of unsynced bytes, reopens with whole batches only: every
    /// synced batch, then possibly some later ones, never part of one, never corruption.
    #[test]
    fn any_crash_recovers_a_prefix_of_whole_batches(
        batches in prop::collection::vec(prop::collection::vec(0usize..400, 1..6), 1..12),
        synced_batches in 0usize..12,
        keep_bits in prop::collection::vec(any::<bool>(), 64),
    ) {
        let storage = SimStorage::new();
        let mut wal = Wal::open(storage.clone(), options()).expect("open");
        let mut boundaries = vec![0usize];
        let mut all = Vec::new();
        for (index, lens) in batches.iter().enumerate() {
            all.extend(append_batch(&mut wal, lens));
            boundaries.push(all.len());
            if index < synced_batches {
                wal.commit().expect("commit");
            } else {
                wal.seal().expect("seal");
            }
        }
        let synced = boundaries[synced_batches.min(batches.len())];
        let crashed = storage.crash(|lsn, offset| {
            keep_bits[((lsn.wrapping_mul(31) + offset / 64) % 64) as usize]
        });
        let reopened = Wal::open(crashed, options()).expect("never corruption after a crash");
        let got = records(&reopened);
        prop_assert!(boundaries.contains(&got.len()), "{} records is not a batch boundary", got.len());
        prop_assert!(got.len() >= synced);
        prop_assert_eq!(&got[..], &all[..got.len()]);
    }
}
