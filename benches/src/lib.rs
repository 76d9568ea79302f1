//! tally-benches: shared helpers for the benchmark targets in `benches/benches/`.
