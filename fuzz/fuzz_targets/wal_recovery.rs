//! Fuzz target: WAL recovery (`tally_wal::Wal::open` on the simulated storage) over segments
//! written by the real writer, crashed and damaged, or laid out byte by byte. The check and its
//! properties are in `checks/wal_recovery.rs`, which `wal/tests/recovery_fuzz.rs` also runs
//! under `cargo test`. No files: the segments live in memory.

#![no_main]

#[path = "../checks/wal_recovery.rs"]
mod check;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| check::check(data));
