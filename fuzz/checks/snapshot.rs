//! Property check of the snapshot loader (`tally-snapshots`: header + bincode state, formats 1
//! to 3) on file bytes built from fuzz input.
//!
//! Shared by the cargo-fuzz target `snapshot` and by `snapshots/tests/fuzz.rs`, which runs it on
//! seeded random inputs under `cargo test`. Both include `snapshots/tests/common/mod.rs` as the
//! crate's `common` module, for the sample states.
//!
//! The bytes go through a real file and `SnapshotDir::{verify, load, load_newest}`, exactly as
//! recovery reads them (the caller passes the directory; the fuzz target keeps it on tmpfs). The
//! first input byte picks the mode:
//!
//! * **raw** (`% 4 == 0`): the rest of the input is the whole file.
//! * **payload** (`% 4 == 1`): the rest is the payload, under a correct header of format 1, 2 or
//!   3 (the next bits), so the fuzzer works on the bincode decoder directly.
//! * **sample** (otherwise): the payload is one of a few real states (0 to 3 wallets with grants,
//!   usage, an adjustment, remembered requests) encoded in format 3, or converted to format 2 or
//!   1 as earlier releases wrote it, then cut short or damaged by up to four input-chosen byte
//!   edits, under a correct header.
//!
//! Properties: nothing panics. `load` succeeds only if `verify` does, and `load_newest` agrees
//! with `load`; every refusal is a corruption error (never I/O), and under a correct header it is
//! `Malformed`. A loaded state survives a write and a load unchanged (the state's encoding is a
//! fixed point), and `Engine::from_state` accepts or refuses it without panicking. An undamaged
//! sample loads as exactly the state it was made from (the same encoding); a cut one is
//! refused.

#![allow(dead_code)] // each user calls only part of it

#[path = "input.rs"]
pub mod input;

use crate::common::Shard;
use input::Input;
use std::{fs, path::PathBuf, sync::OnceLock};
use tally_engine::{
    fingerprint, Command, Engine, Reply, ReplyValue, RequestId, ResultCode, State, Timestamp,
};
use tally_snapshots::{Error, Header, SnapshotDir, SnapshotInfo, HEADER_BYTES};

/// The shard and LSN of the file every input is placed at.
const SHARD: u32 = 0;
const LSN: u64 = 7;

/// Runs the check on one input, using `dir` (its own, empty directory) for the files.
pub fn check(dir: &SnapshotDir, data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let version = match (mode >> 2) % 3 {
        0 => 3,
        1 => 2,
        _ => 1,
    };
    match mode % 4 {
        0 => {
            load_and_check(dir, input.rest(), false);
        }
        1 => {
            load_and_check(dir, &with_header(version, input.rest()), true);
        }
        _ => {
            let samples = samples();
            let sample = &samples[usize::from(input.u8()) % samples.len()];
            let (mut payload, expected) = match version {
                3 => (sample.v3.clone(), &sample.v3),
                2 => (sample.v2.clone(), &sample.from_v2),
                _ => (sample.v1.clone(), &sample.from_v1),
            };
            let cut = input.u8();
            if cut & 0x80 != 0 {
                payload.truncate(usize::from(input.u16()) % payload.len());
                let loaded = load_and_check(dir, &with_header(version, &payload), true);
                assert!(loaded.is_none(), "a cut payload loads");
            } else if input.damage(&mut payload, 4) {
                load_and_check(dir, &with_header(version, &payload), true);
            } else {
                let loaded = load_and_check(dir, &with_header(version, &payload), true);
                assert!(
                    loaded.as_ref().map(encode).as_ref() == Some(expected),
                    "an undamaged sample loads as another state"
                );
            }
        }
    }
}

/// A real state in both formats. (States are compared by their encoding: a live state holds
/// derived fields that the encoding skips and `Engine::from_state` rebuilds.)
struct Sample {
    /// The state's encoding, the format 3 payload.
    v3: Vec<u8>,
    /// The format 2 payload of the same state.
    v2: Vec<u8>,
    /// The encoding of what the format 2 payload converts to.
    from_v2: Vec<u8>,
    /// The format 1 payload of the same state.
    v1: Vec<u8>,
    /// The encoding of what the format 1 payload converts to.
    from_v1: Vec<u8>,
}

fn samples() -> &'static [Sample] {
    static SAMPLES: OnceLock<Vec<Sample>> = OnceLock::new();
    SAMPLES.get_or_init(|| {
        [0, 1, 3]
            .into_iter()
            .map(|wallets| {
                let shard = Shard::new(wallets);
                let state = shard.engine.state().clone();
                // The previous release remembered requests by id; give it one to carry over.
                let reply = Reply {
                    code: ResultCode::Ok,
                    value: ReplyValue::None,
                };
                let remembered = state.wallets.first().map(|wallet| {
                    let command = Command::Freeze { wallet: wallet.id };
                    (RequestId(77), fingerprint(&command), state.now, reply)
                });
                let v1 = tally_engine::legacy::v1_for_tests(&state, remembered.as_slice());
                let v2 = tally_engine::legacy::v2_for_tests(&state);
                Sample {
                    v3: encode(&state),
                    v2: bincode::serde::encode_to_vec(&v2, bincode::config::standard())
                        .expect("encode a format 2 state"),
                    from_v2: encode(&State::from(v2)),
                    v1: bincode::serde::encode_to_vec(&v1, bincode::config::standard())
                        .expect("encode a format 1 state"),
                    from_v1: encode(&State::from(v1)),
                }
            })
            .collect()
    })
}

fn encode(state: &State) -> Vec<u8> {
    bincode::serde::encode_to_vec(state, bincode::config::standard()).expect("encode a state")
}

/// A snapshot file of format `version` holding `payload` under a correct header.
fn with_header(version: u32, payload: &[u8]) -> Vec<u8> {
    let header = Header {
        version,
        shard: SHARD,
        shard_count: 1,
        lsn: LSN,
        created_at: Timestamp(1_700_000_000_000_000),
        payload_bytes: payload.len() as u64,
        payload_crc32c: crc32c::crc32c(payload),
    };
    let mut bytes = header.to_bytes().to_vec();
    // `to_bytes` writes the current version; an older file says its own.
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    let checksum = crc32c::crc32c(&bytes[..60]);
    bytes[60..64].copy_from_slice(&checksum.to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

fn info(dir: &SnapshotDir, lsn: u64) -> SnapshotInfo {
    let path: PathBuf = dir.path().join(format!("shard-{SHARD:04}-{lsn:020}.snap"));
    SnapshotInfo {
        size_bytes: fs::metadata(&path).map_or(0, |meta| meta.len()),
        path,
        shard: SHARD,
        lsn,
        header: None,
    }
}

/// Writes `bytes` as the snapshot of shard 0 at LSN 7, loads it every way recovery can and
/// checks that the ways agree; returns the state if it loaded.
fn load_and_check(dir: &SnapshotDir, bytes: &[u8], header_is_correct: bool) -> Option<State> {
    let file = info(dir, LSN);
    fs::write(&file.path, bytes).expect("write the input file");
    let file = info(dir, LSN);
    let verified = dir.verify(&file);
    let loaded = dir.load(&file);
    let newest = dir.load_newest(SHARD).expect("list the directory");
    match &loaded {
        Ok(state) => {
            let header = verified.expect("a snapshot that loads verifies");
            assert_eq!(header.file_bytes(), bytes.len() as u64);
            let (info, newest) = newest.newest.expect("load_newest finds what load loads");
            assert_eq!(info.lsn, LSN);
            assert!(newest == *state, "load_newest loaded another state");
        }
        Err(error) => {
            assert!(error.is_corruption(), "not a corruption error: {error:?}");
            if header_is_correct {
                assert!(verified.is_ok(), "a correct header fails verification");
                assert!(
                    matches!(error, Error::Malformed { .. }),
                    "under a correct header: {error:?}"
                );
            }
            assert!(
                newest.newest.is_none(),
                "load_newest loads what load refuses"
            );
            assert_eq!(newest.warnings.len(), 1);
        }
    }
    let state = loaded.ok()?;

    // Written again and loaded again, the state is the same, and so is its encoding.
    let written = dir
        .write(SHARD, 1, LSN + 1, Timestamp(0), &state)
        .expect("write a loaded state");
    let payload = fs::read(&written.path).expect("read the written file");
    assert!(payload[HEADER_BYTES..] == encode(&state)[..]);
    let reloaded = dir.load(&written).expect("load a written state");
    fs::remove_file(&written.path).expect("remove the written file");
    assert!(reloaded == state, "a state changed through write and load");

    // Recovery hands the state to the engine, which checks it; that must not panic either.
    if let Ok(engine) = Engine::from_state(state.clone()) {
        let _ = engine.digest();
    }
    Some(state)
}
