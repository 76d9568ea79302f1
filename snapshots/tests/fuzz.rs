//! Fuzz-like property tests of the reader: random and mutated bytes must come back as an
//! error, never as a panic, an abort or a wrong state.
//!
//! Three depths: bytes that are not a snapshot at all; a valid snapshot with random damage
//! (the checksums must catch every change); and damaged payloads under a freshly computed,
//! matching header, which drives the bincode decoder itself over hostile input.
//!
//! Last, the `snapshot` fuzz target's own check (`fuzz/checks/snapshot.rs`, included here) runs
//! on seeded random inputs: raw files, arbitrary payloads under a correct header, and damaged
//! real states in formats 1 and 2. `fuzz/` runs the same check for millions of inputs
//! (docs/operations.md, "Fuzzing").

mod common;

#[path = "../../fuzz/checks/snapshot.rs"]
mod fuzz_check;

use std::{fs, path::PathBuf, sync::OnceLock};

use common::*;
use proptest::prelude::*;
use tally_engine::Engine;
use tally_snapshots::{Error, Header, SnapshotDir, SnapshotInfo, FORMAT_VERSION, HEADER_BYTES};

/// A valid snapshot file's bytes and header (built once; every case starts from it).
fn good() -> &'static (Vec<u8>, Header) {
    static GOOD: OnceLock<(Vec<u8>, Header)> = OnceLock::new();
    GOOD.get_or_init(|| {
        let (_tmp, dir) = tempdir();
        let shard = Shard::new(2);
        let info = write(&dir, 0, 1, 7, &shard.engine);
        (fs::read(&info.path).unwrap(), info.header.unwrap())
    })
}

/// Puts `bytes` where shard 0's snapshot at LSN 7 lives and returns its info.
fn place(dir: &SnapshotDir, bytes: &[u8]) -> SnapshotInfo {
    let path: PathBuf = dir.path().join("shard-0000-00000000000000000007.snap");
    fs::write(&path, bytes).unwrap();
    info_for(path, 0, 7)
}

/// One way to damage bytes.
#[derive(Clone, Debug)]
enum Mutation {
    Xor { at: usize, mask: u8 },
    Insert { at: usize, byte: u8 },
    Remove { at: usize },
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Xor { at, mask }),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        1 => any::<usize>().prop_map(|at| Mutation::Remove { at }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::Xor { at, mask } if len > 0 => bytes[at % len] ^= mask,
            Mutation::Insert { at, byte } => bytes.insert(at % (len + 1), byte),
            Mutation::Remove { at } if len > 0 => {
                bytes.remove(at % len);
            }
            Mutation::Truncate { at } => bytes.truncate(at % (len + 1)),
            _ => {}
        }
    }
}

/// Any prefix a snapshot might start with, to get random bytes past the first checks.
fn prefix() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(b"TALLYSNP".to_vec()),
        Just([&b"TALLYSNP"[..], &FORMAT_VERSION.to_le_bytes()].concat()),
        Just(good().0[..HEADER_BYTES].to_vec()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_refused(
        prefix in prefix(),
        tail in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let (_tmp, dir) = tempdir();
        let bytes = [prefix, tail].concat();
        let _ = Header::parse(&bytes, std::path::Path::new("x"));
        let info = place(&dir, &bytes);
        prop_assert!(dir.verify(&info).is_err());
        let error = dir.load(&info).unwrap_err();
        prop_assert!(error.is_corruption(), "{error:?}");
        prop_assert_eq!(error.path(), Some(info.path.as_path()));
        let recovered = dir.load_newest(0).unwrap();
        prop_assert!(recovered.newest.is_none());
        prop_assert_eq!(recovered.warnings.len(), 1);
    }

    #[test]
    fn any_damage_to_a_snapshot_is_detected(
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let (_tmp, dir) = tempdir();
        let (good, _) = good();
        let mut bytes = good.clone();
        apply(&mut bytes, &mutations);
        let info = place(&dir, &bytes);
        if bytes == *good {
            // The mutations cancelled out.
            dir.load(&info).unwrap();
        } else {
            prop_assert!(dir.verify(&info).is_err());
            let error = dir.load(&info).unwrap_err();
            prop_assert!(error.is_corruption(), "{error:?}");
        }
    }

    #[test]
    fn damaged_payloads_under_a_matching_header_never_panic(
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let (_tmp, dir) = tempdir();
        let (good, header) = good();
        let mut payload = good[HEADER_BYTES..].to_vec();
        apply(&mut payload, &mutations);
        let header = Header {
            payload_bytes: payload.len() as u64,
            payload_crc32c: crc32c::crc32c(&payload),
            ..*header
        };
        let info = place(&dir, &[&header.to_bytes()[..], &payload].concat());
        prop_assert_eq!(dir.verify(&info).unwrap(), header);
        match dir.load(&info) {
            // A mutation can produce another decodable state; the engine's own restore
            // checks decide whether it is usable, and must not panic either.
            Ok(state) => {
                let _ = Engine::from_state(state);
            }
            Err(error) => prop_assert!(
                matches!(error, Error::Malformed { .. }),
                "{error:?}"
            ),
        }
    }
}

#[test]
fn seeded_inputs_pass_the_snapshot_fuzz_check() {
    let (_tmp, dir) = tempdir();
    fuzz_check::input::run_seeded(0x7a11_0003, 1_000, 300, |input| {
        fuzz_check::check(&dir, input)
    });
}
