//! Behaviour of the snapshot directory on real files: round trips, every kind of damage,
//! recovery fallback, retention and temp files.

mod common;

use std::fs;

use common::*;
use tally_engine::{name, Engine, Timestamp};
use tally_snapshots::{
    read_header, Error, Header, SnapshotDir, FORMAT_VERSION, FORMAT_VERSION_OLDEST, HEADER_BYTES,
    MAGIC,
};

#[test]
fn round_trip_keeps_the_digest() {
    let (_tmp, dir) = tempdir();
    let shard = Shard::new(5);
    let info = dir
        .write(2, 4, 777, Timestamp(T0 + 5), shard.engine.state())
        .unwrap();
    assert_eq!(
        info.path.file_name().unwrap(),
        "shard-0002-00000000000000000777.snap"
    );
    assert_eq!(info.size_bytes, file_len(&info.path));
    let header = info.header.unwrap();
    assert_eq!(
        (
            header.shard,
            header.shard_count,
            header.lsn,
            header.created_at
        ),
        (2, 4, 777, Timestamp(T0 + 5))
    );
    assert_eq!(header.file_bytes(), info.size_bytes);
    assert_eq!(
        names(&dir),
        ["shard-0002-00000000000000000777.snap"],
        "no temp file left"
    );

    assert_eq!(dir.list().unwrap(), vec![info.clone()]);
    assert_eq!(dir.verify(&info).unwrap(), header);
    assert_eq!(read_header(&info.path).unwrap(), header);
    let restored = Engine::from_state(dir.load(&info).unwrap()).unwrap();
    assert_eq!(restored.digest(), shard.engine.digest());
    // Derived fields (`#[serde(skip)]`) are rebuilt by `from_state`, so whole states compare.
    assert!(
        restored.state() == shard.engine.state(),
        "restored state differs"
    );

    // The state's one `String` and its decimals survive exactly (1.10 keeps its scale).
    let recovered = dir.load_newest(2).unwrap();
    assert!(recovered.warnings.is_empty());
    let (newest, state) = recovered.newest.unwrap();
    assert_eq!(newest, info);
    let adjustment = &state.wallets[0].adjustments[0];
    assert_eq!(adjustment.reason, REASON);
    assert_eq!(adjustment.amount.to_string(), "1.10");
}

#[test]
fn an_empty_state_and_lsn_zero_round_trip() {
    let (_tmp, dir) = tempdir();
    let engine = Engine::new(tally_engine::Config::default());
    let info = write(&dir, 0, 1, 0, &engine);
    let restored = Engine::from_state(dir.load(&info).unwrap()).unwrap();
    assert_eq!(restored.digest(), engine.digest());
    assert_eq!(dir.oldest_kept_lsn(0).unwrap(), Some(0));
    assert_eq!(dir.oldest_kept_lsn(1).unwrap(), None);
}

#[test]
fn a_truncated_file_is_refused() {
    let (_tmp, dir) = tempdir();
    let shard = Shard::new(3);
    let info = write(&dir, 0, 1, 9, &shard.engine);
    let full = info.size_bytes;
    for len in [full - 1, full / 2, HEADER_BYTES as u64, 40, 10, 3, 0] {
        truncate(&info.path, len);
        let expected = if len < HEADER_BYTES as u64 {
            HEADER_BYTES as u64
        } else {
            full
        };
        for error in [dir.verify(&info).unwrap_err(), dir.load(&info).unwrap_err()] {
            match error {
                Error::Truncated {
                    path,
                    bytes_expected,
                    bytes_found,
                } => {
                    assert_eq!(path, info.path);
                    assert_eq!((bytes_expected, bytes_found), (expected, len), "len {len}");
                }
                other => panic!("truncated to {len}: {other:?}"),
            }
        }
        let _ = write(&dir, 0, 1, 9, &shard.engine);
    }
}

#[test]
fn a_flipped_payload_bit_is_refused() {
    let (_tmp, dir) = tempdir();
    let shard = Shard::new(3);
    let info = write(&dir, 1, 2, 50, &shard.engine);
    let payload_bits = (info.size_bytes - HEADER_BYTES as u64) * 8;
    for bit in [0, 1, payload_bits / 3, payload_bits - 1] {
        let info = write(&dir, 1, 2, 50, &shard.engine);
        flip_bit(&info.path, HEADER_BYTES as u64 * 8 + bit);
        assert!(
            dir.list().unwrap()[0].header.is_some(),
            "the header is fine"
        );
        for error in [dir.verify(&info).unwrap_err(), dir.load(&info).unwrap_err()] {
            assert!(
                matches!(&error, Error::PayloadChecksum { path, stored, computed }
                    if *path == info.path && stored != computed),
                "bit {bit}: {error:?}"
            );
        }
    }
}

#[test]
fn every_flipped_header_bit_is_refused_with_the_matching_error() {
    let (_tmp, dir) = tempdir();
    let shard = Shard::new(1);
    let info = write(&dir, 0, 1, 3, &shard.engine);
    let good = fs::read(&info.path).unwrap();
    for bit in 0..HEADER_BYTES as u64 * 8 {
        fs::write(&info.path, &good).unwrap();
        flip_bit(&info.path, bit);
        let error = dir.load(&info).unwrap_err();
        let byte = bit / 8;
        let right = match &error {
            Error::NotASnapshot { .. } => byte < 8,
            Error::UnsupportedVersion { version, .. } => {
                (8..12).contains(&byte) && *version == FORMAT_VERSION ^ (1 << (bit - 64))
            }
            // A version bit that turns it into another supported version: the checksum.
            Error::HeaderChecksum { .. } => {
                byte >= 12
                    || (8..12).contains(&byte)
                        && (FORMAT_VERSION_OLDEST..=FORMAT_VERSION)
                            .contains(&(FORMAT_VERSION ^ (1 << (bit - 64))))
            }
            _ => false,
        };
        assert!(right, "bit {bit}: {error:?}");
        assert_eq!(error.path(), Some(info.path.as_path()));
        assert!(error.is_corruption());
        assert!(dir.list().unwrap()[0].header.is_none(), "bit {bit}");
    }
}

#[test]
fn a_wrong_magic_is_not_a_snapshot() {
    let (_tmp, dir) = tempdir();
    let shard = Shard::new(1);
    let info = write(&dir, 0, 1, 3, &shard.engine);
    let mut bytes = fs::read(&info.path).unwrap();
    bytes[..8].copy_from_slice(b"TALLYWAL");
    fs::write(&info.path, &bytes).unwrap();
    assert!(matches!(dir.verify(&info), Err(Error::NotASnapshot { .. })));

    // Some other file that happens to have a snapshot's name.
    fs::write(&info.path, "{\"hello\": \"world\"}\n").unwrap();
    let error = dir.load(&info).unwrap_err();
    assert!(matches!(error, Error::NotASnapshot { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains(&info.path.display().to_string()),
        "{message}"
    );
    assert!(message.contains("not a tally snapshot"), "{message}");
}

#[test]
fn a_future_version_is_its_own_error() {
    let (_tmp, dir) = tempdir();
    let shard = Shard::new(1);
    let info = write(&dir, 0, 1, 3, &shard.engine);
    // A later writer would lay out its own header; only magic and version are shared.
    let future = FORMAT_VERSION + 1;
    let mut bytes = fs::read(&info.path).unwrap();
    bytes[8..12].copy_from_slice(&future.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    fs::write(&info.path, &bytes).unwrap();
    for error in [dir.verify(&info).unwrap_err(), dir.load(&info).unwrap_err()] {
        assert!(
            matches!(&error, Error::UnsupportedVersion { version, path }
                if *version == future && *path == info.path),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains(&format!("version {future}")), "{message}");
        assert!(
            message.contains(&format!("reads versions 1 to {FORMAT_VERSION}")),
            "{message}"
        );
    }
}

#[test]
fn consistent_checksums_with_inconsistent_contents_are_malformed() {
    let (_tmp, dir) = tempdir();
    let shard = Shard::new(2);
    let info = write(&dir, 0, 2, 30, &shard.engine);
    let good = fs::read(&info.path).unwrap();
    let header = read_header(&info.path).unwrap();
    let with_header = |header: Header, payload: &[u8]| {
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        fs::write(&info.path, bytes).unwrap();
    };
    let malformed = |what: &str| {
        let error = dir.load(&info).unwrap_err();
        assert!(
            matches!(error, Error::Malformed { .. }),
            "{what}: {error:?}"
        );
        error.to_string()
    };

    // Renamed to another LSN (or shard).
    let renamed = dir.path().join("shard-0000-00000000000000000031.snap");
    fs::copy(&info.path, &renamed).unwrap();
    let error = dir.load(&info_for(renamed.clone(), 0, 31)).unwrap_err();
    assert!(
        error.to_string().contains("name says shard 0 at LSN 31"),
        "{error}"
    );
    fs::remove_file(renamed).unwrap();

    // Bytes after the payload.
    let mut longer = good.clone();
    longer.push(0);
    fs::write(&info.path, &longer).unwrap();
    assert!(malformed("trailing byte").contains("1 bytes follow"));

    // Shard out of range, reserved bytes set, absurd payload length.
    with_header(Header { shard: 2, ..header }, &good[HEADER_BYTES..]);
    assert!(malformed("shard").contains("shard index 2"));
    with_header(
        Header {
            shard_count: 0,
            shard: 0,
            ..header
        },
        &good[HEADER_BYTES..],
    );
    assert!(malformed("shard count").contains("shard count 0"));
    let mut bytes = header.to_bytes();
    bytes[55] = 1;
    let crc = crc32c::crc32c(&bytes[..60]);
    bytes[60..].copy_from_slice(&crc.to_le_bytes());
    fs::write(&info.path, [&bytes[..], &good[HEADER_BYTES..]].concat()).unwrap();
    assert!(malformed("reserved").contains("reserved"));
    with_header(
        Header {
            payload_bytes: u64::MAX,
            ..header
        },
        &good[HEADER_BYTES..],
    );
    assert!(malformed("length").contains("more than the limit"));

    // A checksummed payload that is not a state, or has bytes after the state.
    let garbage = vec![0xff; 100];
    with_header(
        Header {
            payload_bytes: 100,
            payload_crc32c: crc32c::crc32c(&garbage),
            ..header
        },
        &garbage,
    );
    assert!(malformed("garbage").contains("does not decode"));
    let mut padded = good[HEADER_BYTES..].to_vec();
    padded.extend_from_slice(&[0; 5]);
    with_header(
        Header {
            payload_bytes: padded.len() as u64,
            payload_crc32c: crc32c::crc32c(&padded),
            ..header
        },
        &padded,
    );
    dir.verify(&info).unwrap(); // verify checks checksums only
    assert!(malformed("padded").contains("5 payload bytes follow"));

    fs::write(&info.path, &good).unwrap();
    dir.load(&info).unwrap();
}

#[test]
fn a_lying_string_length_is_refused_without_allocating_it() {
    let (_tmp, dir) = tempdir();
    let shard = Shard::new(1);
    let info = write(&dir, 0, 1, 30, &shard.engine);
    let bytes = fs::read(&info.path).unwrap();
    let payload = &bytes[HEADER_BYTES..];
    // bincode's standard config writes a string as a varint length then the bytes; a length
    // below 251 is one byte, and 253 introduces an 8-byte length.
    let at = payload
        .windows(REASON.len())
        .position(|w| w == REASON.as_bytes())
        .unwrap();
    assert_eq!(payload[at - 1] as usize, REASON.len());
    for claimed in [u64::MAX, 1 << 40, 1 << 20] {
        let mut lying = payload[..at - 1].to_vec();
        lying.push(253);
        lying.extend_from_slice(&claimed.to_le_bytes());
        lying.extend_from_slice(&payload[at..]);
        let header = Header {
            payload_bytes: lying.len() as u64,
            payload_crc32c: crc32c::crc32c(&lying),
            ..read_header(&info.path).unwrap()
        };
        fs::write(&info.path, [&header.to_bytes()[..], &lying].concat()).unwrap();
        let error = dir.load(&info).unwrap_err();
        assert!(
            matches!(error, Error::Malformed { .. }),
            "{claimed}: {error:?}"
        );
    }
}

#[test]
fn a_corrupt_newest_snapshot_falls_back_with_warnings_naming_the_files() {
    let (_tmp, dir) = tempdir();
    let mut shard = Shard::new(2);
    let mut digests = Vec::new();
    for lsn in [10, 20, 30] {
        shard.usage(name("w0"), "100", "10");
        write(&dir, 0, 1, lsn, &shard.engine);
        digests.push(shard.engine.digest());
    }
    assert_ne!(digests[0], digests[2]);
    let path = |lsn: u64| dir.path().join(format!("shard-0000-{lsn:020}.snap"));
    flip_bit(&path(30), (HEADER_BYTES as u64 + 7) * 8);
    truncate(&path(20), 100);

    let recovered = dir.load_newest(0).unwrap();
    let (info, state) = recovered.newest.unwrap();
    assert_eq!(info.lsn, 10);
    assert_eq!(info.path, path(10));
    assert_eq!(info.size_bytes, file_len(&path(10)));
    assert_eq!(Engine::from_state(state).unwrap().digest(), digests[0]);

    let warnings = recovered.warnings;
    assert_eq!(warnings.len(), 2);
    assert_eq!(warnings[0].path, path(30));
    assert!(matches!(warnings[0].error, Error::PayloadChecksum { .. }));
    assert_eq!(warnings[1].path, path(20));
    assert!(matches!(warnings[1].error, Error::Truncated { .. }));
    for (warning, lsn) in warnings.iter().zip([30, 20]) {
        let message = warning.to_string();
        let file = format!("shard-0000-{lsn:020}.snap");
        assert!(message.contains(&file), "{message}");
        assert!(message.contains("older snapshot"), "{message}");
    }

    // Nothing usable at all: no state, and still every warning.
    flip_bit(&path(10), 0);
    let recovered = dir.load_newest(0).unwrap();
    assert!(recovered.newest.is_none());
    assert_eq!(recovered.warnings.len(), 3);
    assert!(matches!(
        recovered.warnings[2].error,
        Error::NotASnapshot { .. }
    ));

    // Another shard is unaffected and has nothing.
    let recovered = dir.load_newest(1).unwrap();
    assert!(recovered.newest.is_none() && recovered.warnings.is_empty());
}

#[test]
fn prune_keeps_the_newest_k_per_shard_and_removes_temp_files() {
    let (_tmp, dir) = tempdir();
    let mut shard = Shard::new(1);
    for lsn in 1..=5 {
        shard.usage(name("w0"), "1", "1");
        for s in 0..3 {
            write(&dir, s, 3, lsn * 10 + u64::from(s), &shard.engine);
        }
    }
    // Leftovers of crashes mid-write, and files that are none of our business.
    fs::write(
        dir.path().join("shard-0001-00000000000000000099.snap.tmp"),
        b"half",
    )
    .unwrap();
    fs::write(
        dir.path().join("shard-0002-00000000000000000001.snap.tmp"),
        b"",
    )
    .unwrap();
    fs::write(dir.path().join("README"), b"operator notes").unwrap();
    fs::write(dir.path().join("shard-1-5.snap"), b"not ours").unwrap();
    fs::create_dir(dir.path().join("shard-0000-00000000000000000999.snap")).unwrap();
    assert_eq!(dir.list().unwrap().len(), 15);

    assert!(matches!(dir.prune(0), Err(Error::InvalidArgument(_))));
    let mut removed: Vec<String> = dir
        .prune(2)
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    removed.sort();
    let mut expected: Vec<String> = (0..3u64)
        .flat_map(|s| (1..=3u64).map(move |l| format!("shard-{s:04}-{:020}.snap", l * 10 + s)))
        .chain([
            "shard-0001-00000000000000000099.snap.tmp".to_string(),
            "shard-0002-00000000000000000001.snap.tmp".to_string(),
        ])
        .collect();
    expected.sort();
    assert_eq!(removed, expected);

    let listed = dir.list().unwrap();
    assert_eq!(
        listed.iter().map(|i| (i.shard, i.lsn)).collect::<Vec<_>>(),
        [(0, 40), (0, 50), (1, 41), (1, 51), (2, 42), (2, 52)]
    );
    for s in 0..3 {
        assert_eq!(dir.oldest_kept_lsn(s).unwrap(), Some(40 + u64::from(s)));
        assert_eq!(dir.list_shard(s).unwrap().len(), 2);
    }
    assert_eq!(dir.oldest_kept_lsn(3).unwrap(), None);
    assert!(names(&dir).contains(&"README".to_string()));
    assert!(names(&dir).contains(&"shard-1-5.snap".to_string()));
    assert!(names(&dir).contains(&"shard-0000-00000000000000000999.snap".to_string()));

    // Idempotent.
    assert!(dir.prune(2).unwrap().is_empty());
    assert_eq!(dir.prune(1).unwrap().len(), 3);
}

#[test]
fn prune_never_deletes_the_newest_snapshot_that_verifies() {
    let (_tmp, dir) = tempdir();
    let shard = Shard::new(1);
    for lsn in [1, 2, 3, 4] {
        write(&dir, 0, 1, lsn, &shard.engine);
    }
    let path = |lsn: u64| dir.path().join(format!("shard-0000-{lsn:020}.snap"));
    flip_bit(&path(4), (HEADER_BYTES as u64) * 8);
    flip_bit(&path(3), 100);
    let removed = dir.prune(2).unwrap();
    assert_eq!(removed, [path(1)]);
    assert_eq!(dir.oldest_kept_lsn(0).unwrap(), Some(2));
    let recovered = dir.load_newest(0).unwrap();
    assert_eq!(recovered.newest.unwrap().0.lsn, 2);
    assert_eq!(recovered.warnings.len(), 2);
}

#[test]
fn a_leftover_temp_file_never_counts_as_a_snapshot() {
    let (_tmp, dir) = tempdir();
    let mut shard = Shard::new(1);
    let old = write(&dir, 0, 1, 5, &shard.engine);
    let old_digest = shard.engine.digest();
    // A crash after the file was fully written and synced but before the rename: even a
    // complete, valid file under the temp name is not a snapshot.
    shard.usage(name("w0"), "5", "5");
    let newer = write(&dir, 0, 1, 6, &shard.engine);
    let temp = dir.path().join("shard-0000-00000000000000000006.snap.tmp");
    fs::rename(&newer.path, &temp).unwrap();
    // And one torn mid-write at a higher LSN.
    fs::write(
        dir.path().join("shard-0000-00000000000000000007.snap.tmp"),
        MAGIC,
    )
    .unwrap();

    assert_eq!(dir.list().unwrap(), vec![old.clone()]);
    assert_eq!(dir.oldest_kept_lsn(0).unwrap(), Some(5));
    let recovered = dir.load_newest(0).unwrap();
    assert!(recovered.warnings.is_empty());
    let (info, state) = recovered.newest.unwrap();
    assert_eq!(info, old);
    assert_eq!(Engine::from_state(state).unwrap().digest(), old_digest);
}

#[test]
fn writing_the_same_checkpoint_again_replaces_it() {
    let (_tmp, dir) = tempdir();
    let mut shard = Shard::new(1);
    write(&dir, 0, 1, 5, &shard.engine);
    shard.usage(name("w0"), "5", "5");
    let info = dir
        .write(0, 1, 5, Timestamp(T0 + 99), shard.engine.state())
        .unwrap();
    assert_eq!(dir.list().unwrap(), vec![info.clone()]);
    assert_eq!(info.created_at(), Some(Timestamp(T0 + 99)));
    let state = dir.load(&info).unwrap();
    assert_eq!(
        Engine::from_state(state).unwrap().digest(),
        shard.engine.digest()
    );
}

#[test]
fn bad_arguments_are_refused_before_touching_the_disk() {
    let (_tmp, dir) = tempdir();
    let engine = Engine::new(tally_engine::Config::default());
    for (shard, count) in [(1, 1), (0, 0), (5000, 5001), (4096, 4096)] {
        let error = dir
            .write(shard, count, 1, Timestamp(T0), engine.state())
            .unwrap_err();
        assert!(
            matches!(error, Error::InvalidArgument(_)),
            "{shard}/{count}: {error:?}"
        );
    }
    dir.write(4095, 4096, 1, Timestamp(T0), engine.state())
        .unwrap();
    assert_eq!(names(&dir), ["shard-4095-00000000000000000001.snap"]);
}

#[test]
fn open_creates_the_directory_and_refuses_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let nested = tmp.path().join("a/b/snapshots");
    let dir = SnapshotDir::open(&nested).unwrap();
    assert!(nested.is_dir());
    assert_eq!(dir.path(), nested);
    assert!(dir.list().unwrap().is_empty());
    assert!(dir.load_newest(0).unwrap().newest.is_none());
    assert!(dir.prune(3).unwrap().is_empty());

    let file = tmp.path().join("plain");
    fs::write(&file, b"").unwrap();
    let error = SnapshotDir::open(&file).unwrap_err();
    assert!(matches!(error, Error::Io { .. }), "{error:?}");
    assert!(error.to_string().contains("not a directory"), "{error}");
}

#[test]
fn shard_threads_can_share_one_directory_while_it_is_pruned() {
    let (_tmp, dir) = tempdir();
    let shard = Shard::new(3);
    std::thread::scope(|scope| {
        for s in 0..2u32 {
            let (dir, engine) = (&dir, &shard.engine);
            scope.spawn(move || {
                for lsn in 1..=20 {
                    write(dir, s, 2, lsn, engine);
                }
            });
        }
        scope.spawn(|| {
            for _ in 0..20 {
                dir.prune(3).unwrap();
            }
        });
    });
    // Whatever the interleaving, no write failed (a pruned temp file would have failed its
    // rename), and after a final prune each shard has its newest three.
    dir.prune(3).unwrap();
    for s in 0..2 {
        let lsns: Vec<u64> = dir.list_shard(s).unwrap().iter().map(|i| i.lsn).collect();
        assert_eq!(lsns, [18, 19, 20]);
        for info in dir.list_shard(s).unwrap() {
            dir.verify(&info).unwrap();
        }
    }
}

#[test]
fn a_version_1_snapshot_is_converted_on_load() {
    use tally_engine::{Command, Reply, ReplyValue, Request, RequestId, ResultCode};
    let (_tmp, dir) = tempdir();
    let shard = Shard::new(3);
    let state = shard.engine.state().clone();
    // What the previous release wrote: the same wallets, one remembered request.
    let reply = Reply {
        code: ResultCode::Ok,
        value: ReplyValue::None,
    };
    let command = Command::Freeze {
        wallet: state.wallets[0].id,
    };
    let fingerprint = tally_engine::fingerprint(&command);
    let v1 = tally_engine::legacy::v1_for_tests(
        &state,
        &[(RequestId(77), fingerprint, state.now, reply)],
    );
    let payload = bincode::serde::encode_to_vec(&v1, bincode::config::standard()).unwrap();
    let info = write(&dir, 0, 1, 3, &shard.engine);
    let header = Header {
        version: 1,
        payload_bytes: payload.len() as u64,
        payload_crc32c: crc32c::crc32c(&payload),
        ..read_header(&info.path).unwrap()
    };
    let mut bytes = header.to_bytes().to_vec();
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(&payload);
    fs::write(&info.path, &bytes).unwrap();

    dir.verify(&info).unwrap();
    let loaded = dir.load(&info).unwrap();
    assert_eq!(loaded.wallets, state.wallets);
    assert_eq!(loaded.legacy.len(), 1);
    let mut engine = Engine::from_state(loaded).unwrap();
    // The request remembered by version 1 is still a repeat (by id, as then), not applied again.
    let request = Request {
        id: RequestId(77),
        command,
    };
    assert_eq!(engine.handle_request(state.now, &request), reply);
    assert!(!engine.state().wallets[0].frozen);
    // Past the window, the old records are gone and the id is free.
    let later = state
        .now
        .add_us(state.config.idempotency_retention_us + 2_000_000);
    assert_eq!(engine.handle_request(later, &request).code, ResultCode::Ok);
    assert!(engine.state().legacy.is_empty());
    assert!(engine.state().wallets[0].frozen);
}

#[test]
fn a_version_2_snapshot_is_converted_on_load() {
    let (_tmp, dir) = tempdir();
    let shard = Shard::new(3);
    let state = shard.engine.state().clone();
    // What the previous release wrote: the same state without the late refunds.
    let v2 = tally_engine::legacy::v2_for_tests(&state);
    let payload = bincode::serde::encode_to_vec(&v2, bincode::config::standard()).unwrap();
    let info = write(&dir, 0, 1, 3, &shard.engine);
    let header = Header {
        version: 2,
        payload_bytes: payload.len() as u64,
        payload_crc32c: crc32c::crc32c(&payload),
        ..read_header(&info.path).unwrap()
    };
    let mut bytes = header.to_bytes().to_vec();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(&payload);
    fs::write(&info.path, &bytes).unwrap();
    dir.verify(&info).unwrap();
    let mut loaded = dir.load(&info).unwrap();
    assert!(loaded.late_refunds.is_empty());
    // Charges applied before the conversion are not refunded past the idempotency window.
    assert_eq!(loaded.recorded_refunds_from, state.now);
    loaded.recorded_refunds_from = state.recorded_refunds_from;
    // The same state (compared by encoding: derived fields are not encoded), whose current
    // encoding is not a version 2 payload: versions are not interchangeable.
    let encode = |s: &tally_engine::State| {
        bincode::serde::encode_to_vec(s, bincode::config::standard()).unwrap()
    };
    assert_eq!(encode(&loaded), encode(&state));
    assert_ne!(encode(&state), payload);
    Engine::from_state(loaded).unwrap();
}
