//! tally-wal: the write-ahead log (being built; see issue 3).
