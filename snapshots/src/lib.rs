//! tally-snapshots: versioned, checksummed snapshot files of one shard's engine state.
