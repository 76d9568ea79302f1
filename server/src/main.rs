//! The `tally` binary: a thin command line over `tally-server`.
//!
//! `tally serve` runs the server on a data directory (default `./tally-data`, one shard per
//! core). The ops commands (`tally snapshot …`, `tally restore …`, `tally wal inspect`) work on
//! a data directory that no server holds. Data goes to stdout (human-readable, or one JSON
//! document with `--json`), diagnostics to stderr; any problem exits non-zero with a message.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tally_server::{Config, DurabilitySetting, Overrides, Server};

#[derive(Parser, Debug)]
#[command(
    name = "tally",
    version,
    about = "tally: a wallet-native prepaid billing engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Work with checkpoints (snapshots) of a data directory no server holds.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Point-in-time restore into a new data directory that `tally serve` can then run.
    Restore(RestoreArgs),
    /// Inspect the write-ahead logs of a data directory no server holds.
    #[command(subcommand)]
    Wal(WalCommand),
}

/// Settings shared by every command that opens a data directory.
#[derive(Args, Debug, Clone)]
struct DataArgs {
    /// A TOML configuration file (settings: see docs/operations.md).
    #[arg(long, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// The data directory [default: ./tally-data].
    #[arg(long, env = "TALLY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Number of shards [default: one per core]; fixed when the data directory is created.
    #[arg(long, env = "TALLY_SHARDS")]
    shards: Option<u32>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    data: DataArgs,
    /// WAL durability: `sync` (default) or `none` (benchmarks only: loses data on power loss).
    #[arg(long, env = "TALLY_DURABILITY")]
    durability: Option<String>,
    /// Where the QUIC listener binds [default: 127.0.0.1:7400].
    #[arg(long, env = "TALLY_LISTEN")]
    listen: Option<String>,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// List checkpoints.
    List(OpsArgs),
    /// Verify every checkpoint's checksums and contents.
    Verify(OpsArgs),
    /// Show what one checkpoint holds.
    Inspect(InspectArgs),
    /// Load the newest checkpoints, replay the WAL, and write a fresh checkpoint.
    Create(OpsArgs),
}

#[derive(Args, Debug)]
struct OpsArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct InspectArgs {
    #[command(flatten)]
    ops: OpsArgs,
    /// The checkpoint file.
    file: PathBuf,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// The new data directory to restore into (must not exist, or be empty).
    #[command(flatten)]
    ops: OpsArgs,
    /// A checkpoint file to start its shard from (`tally snapshot list` shows them); repeat
    /// for several shards. Shards without one start from their newest valid checkpoint.
    #[arg(long)]
    from: Vec<PathBuf>,
    /// The data directory to restore from [default: the one holding the first --from file].
    #[arg(long)]
    source: Option<PathBuf>,
    /// Replay WAL records up to and including this LSN.
    #[arg(long)]
    until_lsn: Option<u64>,
    /// Replay WAL records stamped at or before this time (RFC 3339, UTC, e.g.
    /// 2026-11-24T18:00:00Z).
    #[arg(long)]
    until_time: Option<String>,
}

#[derive(Subcommand, Debug)]
enum WalCommand {
    /// Summarise each shard's WAL: segments, LSN range, record kinds.
    Inspect(OpsArgs),
}

/// Defaults, then the config file, then the environment and flags (clap merges those two).
fn load_config(data: &DataArgs, extra: Overrides) -> Result<Config> {
    let mut config = Config::default();
    if let Some(path) = &data.config {
        Overrides::from_file(path)?.apply(&mut config);
    }
    let mut env = Overrides::from_env(|k| std::env::var(k).ok())?;
    // clap already read TALLY_DATA_DIR and TALLY_SHARDS into the flags.
    env.data_dir = data.data_dir.clone();
    env.shards = data.shards;
    env.apply(&mut config);
    extra.apply(&mut config);
    config.validate()?;
    Ok(config)
}

fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(cli) {
        eprintln!("tally: error: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Snapshot(command) => tally_server::ops::snapshot(match &command {
            SnapshotCommand::List(o) => (
                load_config(&o.data, Overrides::default())?,
                o.json,
                tally_server::ops::SnapshotAction::List,
            ),
            SnapshotCommand::Verify(o) => (
                load_config(&o.data, Overrides::default())?,
                o.json,
                tally_server::ops::SnapshotAction::Verify,
            ),
            SnapshotCommand::Create(o) => (
                load_config(&o.data, Overrides::default())?,
                o.json,
                tally_server::ops::SnapshotAction::Create,
            ),
            SnapshotCommand::Inspect(i) => (
                load_config(&i.ops.data, Overrides::default())?,
                i.ops.json,
                tally_server::ops::SnapshotAction::Inspect(i.file.clone()),
            ),
        }),
        Command::Restore(args) => {
            let target = load_config(&args.ops.data, Overrides::default())?;
            let source = match (&args.source, args.from.first()) {
                (Some(dir), _) => dir.clone(),
                // <source>/snapshots/<file>
                (None, Some(file)) => match file.parent().and_then(Path::parent) {
                    Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                    _ => PathBuf::from("."),
                },
                (None, None) => {
                    bail!("say what to restore from: --from <checkpoint> or --source <data-dir>")
                }
            };
            let config = Config {
                data_dir: source,
                ..target.clone()
            };
            let until_time = match &args.until_time {
                Some(text) => Some(tally_server::ops::parse_rfc3339(text).with_context(|| {
                    format!("--until-time {text:?} is not an RFC 3339 UTC time")
                })?),
                None => None,
            };
            tally_server::ops::restore(
                &config,
                &args.from,
                &target.data_dir,
                tally_server::Until {
                    lsn: args.until_lsn,
                    time: until_time,
                },
                args.ops.json,
            )
        }
        Command::Wal(WalCommand::Inspect(o)) => {
            tally_server::ops::wal_inspect(&load_config(&o.data, Overrides::default())?, o.json)
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let durability = match args.durability.as_deref() {
        None => None,
        Some("sync") => Some(DurabilitySetting::Sync),
        Some("none") => Some(DurabilitySetting::None),
        Some(other) => bail!("durability: {other:?} is not `sync` or `none`"),
    };
    let config = load_config(
        &args.data,
        Overrides {
            durability,
            listen: args.listen.clone(),
            ..Overrides::default()
        },
    )?;
    if config.durability == DurabilitySetting::None {
        eprintln!("tally: warning: durability = none: acknowledged writes are lost on power loss");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install the signal handler")?;
    }
    let store = tally_server::store::SnapshotStore::open(&config)?;
    let server = Server::start(&config, Box::new(store))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.net_threads)
        .thread_name("tally-net")
        .enable_all()
        .build()
        .context("cannot start the network runtime")?;
    let admin_key = std::env::var("TALLY_ADMIN_KEY").ok();
    let network = {
        let _entered = runtime.enter();
        tally_server::net::start_network(&config, server.handle(), admin_key.as_deref())?
    };
    eprintln!(
        "tally: serving {} shards from {} on {} (QUIC, ALPN tally/1; stop with SIGTERM or Ctrl-C)",
        config.shards,
        display(&config.data_dir),
        network.local_addr()
    );
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("tally: stopping: closing connections, draining queues and syncing");
    runtime.block_on(network.shutdown());
    let digests = server.shutdown()?;
    for (shard, digest) in digests.iter().enumerate() {
        eprintln!("tally: shard {shard} stopped, digest {digest:016x}");
    }
    Ok(())
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
