//! Fuzz target: the WAL record payload decoder (`tally_server::record::decode`), on raw bytes and
//! on damaged encodings of built records. The check and its properties are in
//! `checks/wal_record.rs`, which `server/tests/record_fuzz.rs` also runs under `cargo test`.

#![no_main]

#[path = "../checks/wal_record.rs"]
mod check;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| check::check(data));
