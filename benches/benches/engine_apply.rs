//! Engine apply bench (being written).
fn main() {}
