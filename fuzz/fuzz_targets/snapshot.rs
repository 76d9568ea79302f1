//! Fuzz target: the snapshot loader (`tally_snapshots::SnapshotDir`), formats 1 and 2, on raw
//! files, on arbitrary payloads under a correct header, and on damaged real states. The check and
//! its properties are in `checks/snapshot.rs`, which `snapshots/tests/fuzz.rs` also runs under
//! `cargo test`.
//!
//! Each input is written to one file in a directory on tmpfs (`/dev/shm`, else the system temp
//! directory), named `tally-fuzz-snapshot*`; it is left behind when the run ends (one small
//! file).

#![no_main]

#[path = "../../snapshots/tests/common/mod.rs"]
mod common;

#[path = "../checks/snapshot.rs"]
mod check;

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tally_snapshots::SnapshotDir;

fn dir() -> &'static SnapshotDir {
    static DIR: OnceLock<SnapshotDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let new = || {
            let mut builder = tempfile::Builder::new();
            builder.prefix("tally-fuzz-snapshot");
            builder
        };
        let parent = new()
            .tempdir_in("/dev/shm")
            .or_else(|_| new().tempdir())
            .expect("create a temp directory");
        SnapshotDir::open(parent.keep().join("snapshots")).expect("open the snapshot directory")
    })
}

fuzz_target!(|data: &[u8]| check::check(dir(), data));
