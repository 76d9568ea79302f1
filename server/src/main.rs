//! The `tally` binary: a thin command line over `tally-server`.
fn main() {}
