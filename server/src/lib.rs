//! tally-server: the durable service around the engine.
//!
//! One thread per shard owns an `Engine` and its WAL and runs the group-commit loop
//! ([`shard`]); a [`Handle`] routes in-process calls to shards; effects leave through the
//! [`outbound`] queue to sinks; [`server`] recovers every shard at start (newest valid
//! checkpoint + WAL replay) and stops them cleanly. The `tally` binary (`src/main.rs`) is a thin
//! CLI over this library.
//!
//! This crate is the only place in tally that owns threads, files, clocks and signals. It knows
//! the engine only through its `handle_*` / `poll_*` API and the WAL only as bytes.

pub mod catalog;
pub mod clock;
pub mod config;
pub mod handle;
pub mod http;
pub mod logging;
pub mod net;
pub mod observe;
/// The effect sinks (re-exported from `tally-outbound`).
pub use tally_outbound as outbound;
pub mod ops;
pub mod record;
pub mod remote;
pub mod server;
pub mod shard;
pub mod store;

pub use clock::{Clock, SystemClock};
pub use config::{Config, ConfigError, DurabilitySetting, Overrides};
pub use handle::{Handle, PendingBatch, PendingQuery, PendingReply, QueryAnswer};
pub use server::{
    recover_shard, wal_dir, write_rules, DataDirLock, Error, Loaded, Recovered, Server, Store,
    Until,
};
pub use shard::{CallError, CheckpointReport, Checkpoints};
