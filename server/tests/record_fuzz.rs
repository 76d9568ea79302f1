//! The WAL record payload decoder on hostile bytes, under `cargo test`: the `wal_record` fuzz
//! target's own check (`fuzz/checks/wal_record.rs`, included here) on seeded random inputs, raw
//! and as damaged encodings of built records. Nothing panics, what decodes round-trips, and an
//! undamaged record decodes to itself. `fuzz/` runs the same check for millions of inputs
//! (docs/operations.md, "Fuzzing").

#[path = "../../fuzz/checks/wal_record.rs"]
mod check;

#[test]
fn seeded_inputs_pass_the_record_fuzz_check() {
    check::input::run_seeded(0x7a11_0002, 20_000, 300, check::check);
}
