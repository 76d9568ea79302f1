//! `tally-loadtest`: drives a running `tally serve` over QUIC. See the crate docs (`lib.rs`) and
//! `docs/benchmarks.md`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tally_client::{Client, ClientConfig};
use tally_loadtest::{plot_svg, prepare, run, Distribution, Mix, Options, Report};

#[derive(Parser, Debug)]
#[command(
    name = "tally-loadtest",
    version,
    about = "Open- and closed-loop load against a running tally over QUIC"
)]
struct Args {
    /// The server's address.
    #[arg(long, env = "TALLY_ADDR", default_value = "127.0.0.1:7400")]
    addr: String,
    /// The server's certificate (pinned).
    #[arg(long, env = "TALLY_CERT", default_value = "./tally-data/tls/cert.pem")]
    cert: PathBuf,
    /// An admin API key (preparing wallets needs admin; the load itself needs gateway).
    #[arg(long, env = "TALLY_API_KEY")]
    api_key: String,
    /// QUIC connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Closed loop: callers per connection (each with one operation outstanding).
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// Wallets used (prepared as lt-00000000 …).
    #[arg(long, default_value_t = 100_000)]
    wallets: usize,
    /// Index of the first wallet (disjoint offsets give disjoint wallets).
    #[arg(long, default_value_t = 0)]
    wallet_offset: usize,
    /// `uniform`, `zipf[:S]` (default S = 1.0), or `hot[:N[:SHARE]]` (default 10 wallets, 0.9).
    #[arg(long, default_value = "uniform")]
    distribution: String,
    /// Operation weights, e.g. `strict=70,record=10,reserve=10,balance=10`.
    #[arg(long, default_value = "strict=1")]
    mix: String,
    /// Usage events per frame (> 1 sends UsageBatch frames).
    #[arg(long, default_value_t = 1)]
    events_per_frame: usize,
    /// Open loop at this many operations/s (omit for closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop at each of these rates in turn (comma-separated), e.g. for `--plot`.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<f64>,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds run before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seed of wallet and operation choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip preparing the catalog and wallets (they exist already).
    #[arg(long)]
    no_prepare: bool,
    /// Print one JSON document (a report, or a list of reports with --sweep).
    #[arg(long)]
    json: bool,
    /// With --sweep: write a latency-versus-throughput SVG plot here.
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn distribution(text: &str) -> Result<Distribution> {
    let mut parts = text.split(':');
    let kind = parts.next().unwrap_or_default();
    let num = |p: Option<&str>, default: f64| -> Result<f64> {
        match p {
            None => Ok(default),
            Some(s) => s
                .parse()
                .with_context(|| format!("distribution: {s:?} is not a number")),
        }
    };
    Ok(match kind {
        "uniform" => Distribution::Uniform,
        "zipf" => Distribution::Zipf {
            s: num(parts.next(), 1.0)?,
        },
        "hot" => {
            let wallets = num(parts.next(), 10.0)? as usize;
            let share = num(parts.next(), 0.9)?;
            if !(0.0..=1.0).contains(&share) || wallets == 0 {
                bail!("distribution: hot needs N ≥ 1 wallets and a share between 0 and 1");
            }
            Distribution::Hot { wallets, share }
        }
        other => bail!("distribution: {other:?} is not uniform, zipf or hot"),
    })
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(e) = runtime.block_on(main_async(args)) {
        eprintln!("tally-loadtest: error: {e:#}");
        std::process::exit(1);
    }
}

async fn main_async(args: Args) -> Result<()> {
    let mix = Mix::parse(&args.mix).map_err(anyhow::Error::msg)?;
    let distribution = distribution(&args.distribution)?;
    if args.connections == 0 || args.wallets == 0 || args.events_per_frame == 0 {
        bail!("connections, wallets and events-per-frame must be at least 1");
    }
    if args.duration <= 0.0 || args.warmup < 0.0 {
        bail!("duration must be positive and warmup not negative");
    }
    if args.rate.is_some_and(|r| r <= 0.0) || args.sweep.iter().any(|r| *r <= 0.0) {
        bail!("rates must be positive");
    }
    let config = ClientConfig::from_files(&args.addr, &args.cert, &args.api_key)?;
    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        clients.push(Client::connect(config.clone()).await?);
    }
    if !args.no_prepare {
        let started = std::time::Instant::now();
        let range = args.wallet_offset..args.wallet_offset + args.wallets;
        prepare(&clients[0], range, 256).await?;
        eprintln!(
            "tally-loadtest: prepared {} wallets in {:.1?}",
            args.wallets,
            started.elapsed()
        );
    }
    let options = Options {
        connections: args.connections,
        in_flight: args.in_flight,
        wallets: args.wallets,
        wallet_offset: args.wallet_offset,
        distribution,
        mix,
        events_per_frame: args.events_per_frame,
        rate: args.rate,
        duration: Duration::from_secs_f64(args.duration),
        warmup: Duration::from_secs_f64(args.warmup),
        seed: args.seed,
    };
    if args.sweep.is_empty() {
        let report = run(&clients, &options).await;
        print(&[report], args.json, false)?;
        return Ok(());
    }
    let mut reports = Vec::new();
    for rate in &args.sweep {
        let report = run(
            &clients,
            &Options {
                rate: Some(*rate),
                ..options.clone()
            },
        )
        .await;
        if !args.json {
            print!("{}", report.text());
        }
        reports.push(report);
    }
    if args.json {
        print(&reports, true, true)?;
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "tally: ack latency vs throughput ({} connections, {} events/frame)",
            args.connections, args.events_per_frame
        );
        std::fs::write(path, plot_svg(&title, &reports))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("tally-loadtest: plot written to {}", path.display());
    }
    Ok(())
}

fn print(reports: &[Report], json: bool, list: bool) -> Result<()> {
    if json {
        let text = if list {
            serde_json::to_string_pretty(reports)?
        } else {
            serde_json::to_string_pretty(&reports[0])?
        };
        println!("{text}");
    } else {
        for report in reports {
            print!("{}", report.text());
        }
    }
    Ok(())
}
