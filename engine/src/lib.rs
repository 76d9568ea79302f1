//! tally-engine (being built).
