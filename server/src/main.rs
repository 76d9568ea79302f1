//! The `tally` binary: a thin command line over `tally-server`.
//!
//! `tally serve` runs the server on a data directory (default `./tally-data`, one shard per
//! core). The ops commands (`tally snapshot …`, `tally restore …`, `tally wal inspect`) work on
//! a data directory that no server holds. The client commands (`tally wallet …`, `tally grant`,
//! `tally usage`, `tally key …`, …; [`tally_server::remote`]) talk to a running server over
//! QUIC. Data goes to stdout (human-readable, or one JSON document with `--json`), diagnostics
//! to stderr; any problem exits non-zero with a message.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use rust_decimal::Decimal;
use tally_engine::{AssetCode, Limit, Name, Quantity, Timestamp, WalletId};
use tally_net::message::Scope;
use tally_server::remote::{self, EventSpec, Op, Remote, SourceKind};
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
    /// Work with checkpoints (snapshots) of a data directory no server holds (`create` also
    /// online, with an API key).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Point-in-time restore into a new data directory that `tally serve` can then run.
    Restore(RestoreArgs),
    /// Inspect the write-ahead logs of a data directory no server holds.
    #[command(subcommand)]
    Wal(WalCommand),
    /// Define assets (admin; talks to a running server, like every command below).
    #[command(subcommand)]
    Asset(AssetCommand),
    /// Define products (meters) (admin).
    #[command(subcommand)]
    Product(ProductCommand),
    /// Create, show, freeze and unfreeze wallets.
    #[command(subcommand)]
    Wallet(WalletCommand),
    /// Add a grant (credit) to a wallet (admin).
    Grant(GrantArgs),
    /// Report usage: priced under the wallet's plan, then debited (strict unless --record).
    Usage(UsageArgs),
    /// Preview the price of a usage event without applying it.
    Price(PriceArgs),
    /// Hold a fixed amount (--asset --amount) or a priced estimate (--product --qty).
    Reserve(ReserveArgs),
    /// Settle a hold with the actual usage.
    Settle(SettleArgs),
    /// Release a hold without charging.
    Release(ReleaseArgs),
    /// Refund part or all of a usage event (or settled hold) by its request id (admin).
    Refund(RefundArgs),
    /// Dispute (chargeback) a top-up grant, or record that the dispute was won (admin).
    Dispute(DisputeArgs),
    /// A manual correction: a positive amount credits, a negative one debits (admin).
    Adjust(AdjustArgs),
    /// Draft, publish, assign and test plans (admin).
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Set or remove a wallet's auto top-up rule (admin).
    #[command(subcommand)]
    TopupRule(TopUpRuleCommand),
    /// One balance of one wallet.
    Balance(BalanceArgs),
    /// Margin aggregates: the total, or one wallet, product, plan version or time range (admin).
    Margin(MarginArgs),
    /// Create and revoke API keys (admin).
    #[command(subcommand)]
    Key(KeyCommand),
    /// The running server's health.
    Health(RemoteArgs),
    /// Top a wallet up now through Stripe (admin; over the HTTP API): charge its saved payment
    /// method, or with --session print a client secret for Stripe.js. Prints the top-up.
    Topup(TopupArgs),
}

/// How the client commands reach the server.
#[derive(Args, Debug, Clone)]
struct RemoteArgs {
    /// The server's address.
    #[arg(long, env = "TALLY_ADDR", default_value = "127.0.0.1:7400")]
    addr: String,
    /// The server's certificate (PEM); it is pinned: the only one trusted.
    #[arg(long, env = "TALLY_CERT", default_value = "./tally-data/tls/cert.pem")]
    cert: PathBuf,
    /// The API key (admin, or gateway for usage, reserve, settle, release and reads).
    #[arg(long, env = "TALLY_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Print exactly one JSON document on stdout instead of text.
    #[arg(long)]
    json: bool,
}

/// `tally topup`: a caller's top-up, over the HTTP API (Stripe lives behind it).
#[derive(Args, Debug, Clone)]
struct TopupArgs {
    /// The wallet's id.
    wallet: String,
    /// How much of the asset to buy (the charge must be whole cents at the asset's price).
    #[arg(long, allow_hyphen_values = true)]
    amount: rust_decimal::Decimal,
    /// The asset to credit; it needs a top-up price (`tally asset price`).
    #[arg(long)]
    asset: String,
    /// The payment method to charge [default: the wallet's].
    #[arg(long)]
    payment_method: Option<String>,
    /// Start a browser payment: print its client secret instead of charging now.
    #[arg(long)]
    session: bool,
    /// The server's HTTP API.
    #[arg(long, env = "TALLY_HTTP_URL", default_value = "http://127.0.0.1:7480")]
    http: String,
    /// The server's certificate (PEM), pinned, for an https:// URL.
    #[arg(long, env = "TALLY_CERT", default_value = "./tally-data/tls/cert.pem")]
    cert: PathBuf,
    /// An admin API key.
    #[arg(long, env = "TALLY_API_KEY", hide_env_values = true)]
    api_key: String,
    /// The Idempotency-Key [default: a fresh random one, printed so that a retry can reuse it].
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Print exactly one JSON document on stdout instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `tally topup`: one POST to `/v1/wallets/{id}/topups`.
fn topup(args: TopupArgs) -> Result<i32> {
    let key = args.idempotency_key.clone().unwrap_or_else(|| {
        let id = remote::fresh_request_id();
        format!("cli-topup-{id:032x}")
    });
    if args.idempotency_key.is_none() && !args.json {
        eprintln!("idempotency key: {key} (pass --idempotency-key {key} to retry)");
    }
    // reqwest's TLS takes the process's provider (for http:// too, when it is built).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(90));
    if args.http.starts_with("https://") {
        let pinned = tally_net::tls::load_certs(&args.cert)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("{} holds no certificate", args.cert.display()))?;
        let mut tls = tally_net::tls::client_crypto(pinned).map_err(|e| anyhow::anyhow!("{e}"))?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        builder = builder.use_preconfigured_tls(tls);
    }
    let client = builder.build()?;
    let url = format!(
        "{}/v1/wallets/{}/topups",
        args.http.trim_end_matches('/'),
        args.wallet
    );
    let body = serde_json::json!({
        "asset": args.asset,
        "amount": args.amount.normalize().to_string(),
        "payment_method": args.payment_method,
        "session": args.session,
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, answer) = runtime.block_on(async {
        let response = client
            .post(&url)
            .bearer_auth(&args.api_key)
            .header("Idempotency-Key", &key)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let answer: serde_json::Value = response.json().await?;
        Ok::<_, reqwest::Error>((status, answer))
    })?;
    if args.json {
        println!("{answer}");
    } else if status.is_success() {
        println!(
            "top-up {}: {} {} of {} ({} {} minor units){}{}",
            answer["id"].as_str().unwrap_or(""),
            answer["status"].as_str().unwrap_or(""),
            answer["amount"].as_str().unwrap_or(""),
            answer["asset"].as_str().unwrap_or(""),
            answer["amount_minor"],
            answer["currency"].as_str().unwrap_or(""),
            answer["failure_reason"]
                .as_str()
                .map(|r| format!(", failed: {r}"))
                .unwrap_or_default(),
            answer["client_secret"]
                .as_str()
                .map(|s| format!("\nclient secret: {s}"))
                .unwrap_or_default(),
        );
    } else {
        eprintln!(
            "tally: error: {} {} ({}): {}",
            status.as_u16(),
            answer["name"].as_str().unwrap_or(""),
            answer["code"],
            answer["message"].as_str().unwrap_or("")
        );
    }
    Ok(if status.is_success() && answer["status"] != "failed" {
        0
    } else {
        1
    })
}

/// A client command that changes state.
#[derive(Args, Debug, Clone)]
struct MutateArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// The request's idempotency id (a u128) [default: a fresh random one, printed so that a
    /// retry can reuse it].
    #[arg(long, value_name = "N")]
    id: Option<u128>,
}

#[derive(Subcommand, Debug)]
enum AssetCommand {
    /// Declare an asset; repeating it with identical values is a no-op.
    Define {
        #[command(flatten)]
        common: MutateArgs,
        /// The code, e.g. USD.
        #[arg(value_parser = remote::parse_asset)]
        code: AssetCode,
        /// Decimal places balances keep (at most 18).
        #[arg(long)]
        scale: u32,
        /// What one unit is worth in USD, for margin reporting.
        #[arg(long, allow_hyphen_values = true, value_parser = remote::parse_decimal)]
        usd_value: Decimal,
    },
    /// Set what one unit costs when a top-up buys it (auto top-up rules need it), or remove it.
    Price {
        #[command(flatten)]
        common: MutateArgs,
        /// The code, e.g. credits.
        #[arg(value_parser = remote::parse_asset)]
        code: AssetCode,
        /// The currency, lower case as Stripe writes it, e.g. usd.
        #[arg(long, value_parser = remote::parse_name, required_unless_present = "remove")]
        currency: Option<Name>,
        /// The price of one unit in the currency's major unit, e.g. 0.01 (one cent).
        #[arg(long, allow_hyphen_values = true, value_parser = remote::parse_decimal, required_unless_present = "remove")]
        unit_amount: Option<Decimal>,
        /// Remove the price instead: top-ups of the asset are no longer requested.
        #[arg(long, conflicts_with_all = ["currency", "unit_amount"])]
        remove: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ProductCommand {
    /// Declare a product (meter) and its quantity dimensions.
    Define {
        #[command(flatten)]
        common: MutateArgs,
        /// The code, e.g. chat.
        #[arg(value_parser = remote::parse_name)]
        code: Name,
        /// A quantity dimension, e.g. input_tokens (repeat; at most 8).
        #[arg(long = "dimension", value_name = "DIM", required = true, value_parser = remote::parse_name)]
        dimensions: Vec<Name>,
    },
}

#[derive(Subcommand, Debug)]
enum WalletCommand {
    /// Create a wallet (admin).
    Create {
        #[command(flatten)]
        common: MutateArgs,
        /// The wallet's id.
        #[arg(value_parser = remote::parse_name)]
        wallet: WalletId,
        /// Metadata, key=value (repeat; at most 16).
        #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = remote::parse_pair)]
        meta: Vec<(Name, Name)>,
        /// An overdraft limit, ASSET=AMOUNT (repeat).
        #[arg(long, value_name = "ASSET=AMOUNT", value_parser = remote::parse_limit)]
        overdraft: Vec<Limit>,
    },
    /// Show everything about a wallet: balances, grants, holds, plans, rules, margin.
    Get {
        #[command(flatten)]
        remote: RemoteArgs,
        /// The wallet's id.
        #[arg(value_parser = remote::parse_name)]
        wallet: WalletId,
    },
    /// Set a wallet's payment profile at Stripe: customer and default payment method (admin).
    /// A field not given is cleared.
    Billing {
        #[command(flatten)]
        common: MutateArgs,
        /// The wallet's id.
        #[arg(value_parser = remote::parse_name)]
        wallet: WalletId,
        /// The Stripe customer id (cus_...).
        #[arg(long, value_parser = remote::parse_name)]
        customer: Option<Name>,
        /// The default payment method top-ups charge (pm_...).
        #[arg(long, value_parser = remote::parse_name)]
        payment_method: Option<Name>,
    },
    /// Freeze a wallet: strict usage and reserves are refused until it is unfrozen (admin).
    Freeze {
        #[command(flatten)]
        common: MutateArgs,
        /// The wallet's id.
        #[arg(value_parser = remote::parse_name)]
        wallet: WalletId,
    },
    /// Unfreeze a wallet (admin).
    Unfreeze {
        #[command(flatten)]
        common: MutateArgs,
        /// The wallet's id.
        #[arg(value_parser = remote::parse_name)]
        wallet: WalletId,
    },
    /// Set a wallet's overdraft limit in one asset (admin).
    Overdraft {
        #[command(flatten)]
        common: MutateArgs,
        /// The wallet's id.
        #[arg(value_parser = remote::parse_name)]
        wallet: WalletId,
        /// The asset, e.g. USD.
        #[arg(long, value_parser = remote::parse_asset)]
        asset: AssetCode,
        /// How far below zero strict usage may take available balance.
        #[arg(long, allow_hyphen_values = true, value_parser = remote::parse_decimal)]
        limit: Decimal,
    },
}

#[derive(Args, Debug)]
struct GrantArgs {
    #[command(flatten)]
    common: MutateArgs,
    /// The wallet's id.
    #[arg(value_parser = remote::parse_name)]
    wallet: WalletId,
    /// The asset, e.g. USD.
    #[arg(long, value_parser = remote::parse_asset)]
    asset: AssetCode,
    /// The amount, a decimal such as 25.00.
    #[arg(long, allow_hyphen_values = true, value_parser = remote::parse_decimal)]
    amount: Decimal,
    /// Consumption priority, lower first [default: 100 for top-ups, else 0].
    #[arg(long)]
    priority: Option<u32>,
    /// Not usable before this time (RFC 3339 UTC).
    #[arg(long, value_parser = remote::parse_time)]
    effective_at: Option<Timestamp>,
    /// The remainder leaves as breakage at this time (RFC 3339 UTC).
    #[arg(long, value_parser = remote::parse_time)]
    expires_at: Option<Timestamp>,
    /// topup (alias purchase; needs --payment-id), promotion, refund or adjustment.
    #[arg(long, default_value = "promotion", value_parser = remote::parse_source)]
    source: SourceKind,
    /// The payment processor's id of a top-up (makes the grant idempotent on it).
    #[arg(long, value_parser = remote::parse_name)]
    payment_id: Option<Name>,
}

/// A usage event's shape.
#[derive(Args, Debug)]
struct EventArgs {
    /// The product (meter).
    #[arg(long, value_parser = remote::parse_name)]
    product: Name,
    /// A quantity, dimension=value (repeat per dimension).
    #[arg(long = "qty", value_name = "DIM=VALUE", required = true, value_parser = remote::parse_quantity)]
    qty: Vec<Quantity>,
    /// An attribute rules filter on, key=value (repeat).
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = remote::parse_pair)]
    attr: Vec<(Name, Name)>,
    /// When the usage happened (RFC 3339 UTC) [default: now].
    #[arg(long, value_parser = remote::parse_time)]
    occurred_at: Option<Timestamp>,
}

impl EventArgs {
    fn spec(self) -> EventSpec {
        EventSpec {
            product: self.product,
            quantities: self.qty,
            attributes: self.attr,
            occurred_at: self.occurred_at,
        }
    }
}

#[derive(Args, Debug)]
struct UsageArgs {
    #[command(flatten)]
    common: MutateArgs,
    /// The wallet's id.
    #[arg(value_parser = remote::parse_name)]
    wallet: WalletId,
    #[command(flatten)]
    event: EventArgs,
    /// What the event cost the seller, in USD.
    #[arg(long, allow_hyphen_values = true, default_value = "0", value_parser = remote::parse_decimal)]
    cost_usd: Decimal,
    /// Record mode (already served: always applied, a shortfall becomes debt) instead of strict.
    #[arg(long)]
    record: bool,
}

#[derive(Args, Debug)]
struct PriceArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// The wallet's id.
    #[arg(value_parser = remote::parse_name)]
    wallet: WalletId,
    #[command(flatten)]
    event: EventArgs,
}

#[derive(Args, Debug)]
struct ReserveArgs {
    #[command(flatten)]
    common: MutateArgs,
    /// The wallet's id.
    #[arg(value_parser = remote::parse_name)]
    wallet: WalletId,
    /// Fixed amount: the asset.
    #[arg(long, value_parser = remote::parse_asset, requires = "amount", conflicts_with = "product")]
    asset: Option<AssetCode>,
    /// Fixed amount: the amount.
    #[arg(long, allow_hyphen_values = true, value_parser = remote::parse_decimal, requires = "asset")]
    amount: Option<Decimal>,
    /// Estimate: the product whose priced usage shape is held.
    #[arg(long, value_parser = remote::parse_name, required_unless_present = "asset")]
    product: Option<Name>,
    /// Estimate: a quantity, dimension=value (repeat).
    #[arg(long = "qty", value_name = "DIM=VALUE", requires = "product", value_parser = remote::parse_quantity)]
    qty: Vec<Quantity>,
    /// Estimate: an attribute, key=value (repeat).
    #[arg(long = "attr", value_name = "KEY=VALUE", requires = "product", value_parser = remote::parse_pair)]
    attr: Vec<(Name, Name)>,
    /// When the hold expires (RFC 3339 UTC) [default: now + --ttl].
    #[arg(long, value_parser = remote::parse_time, conflicts_with = "ttl")]
    deadline: Option<Timestamp>,
    /// Seconds until the hold expires (at most 7 days).
    #[arg(long, default_value_t = 600)]
    ttl: u64,
}

#[derive(Args, Debug)]
struct SettleArgs {
    #[command(flatten)]
    common: MutateArgs,
    /// The wallet's id.
    #[arg(value_parser = remote::parse_name)]
    wallet: WalletId,
    /// The hold's id (from `tally reserve`).
    #[arg(long)]
    hold: u64,
    #[command(flatten)]
    event: EventArgs,
    /// What the usage cost the seller, in USD.
    #[arg(long, allow_hyphen_values = true, default_value = "0", value_parser = remote::parse_decimal)]
    cost_usd: Decimal,
}

#[derive(Args, Debug)]
struct ReleaseArgs {
    #[command(flatten)]
    common: MutateArgs,
    /// The wallet's id.
    #[arg(value_parser = remote::parse_name)]
    wallet: WalletId,
    /// The hold's id.
    #[arg(long)]
    hold: u64,
}

#[derive(Args, Debug)]
struct RefundArgs {
    #[command(flatten)]
    common: MutateArgs,
    /// The wallet's id.
    #[arg(value_parser = remote::parse_name)]
    wallet: WalletId,
    /// The request id of the usage or settle to refund.
    #[arg(long, value_name = "REQUEST_ID")]
    event: u128,
    /// The amount [default: whatever is left to refund].
    #[arg(long, allow_hyphen_values = true, value_parser = remote::parse_decimal)]
    amount: Option<Decimal>,
}

#[derive(Args, Debug)]
struct DisputeArgs {
    #[command(flatten)]
    common: MutateArgs,
    /// The wallet's id.
    #[arg(value_parser = remote::parse_name)]
    wallet: WalletId,
    /// The top-up grant's id.
    #[arg(long)]
    grant: u64,
    /// Also freeze the wallet.
    #[arg(long)]
    freeze: bool,
    /// The dispute was won: credit the grant's amount again.
    #[arg(long, conflicts_with = "freeze")]
    won: bool,
}

#[derive(Args, Debug)]
struct AdjustArgs {
    #[command(flatten)]
    common: MutateArgs,
    /// The wallet's id.
    #[arg(value_parser = remote::parse_name)]
    wallet: WalletId,
    /// The asset, e.g. USD.
    #[arg(long, value_parser = remote::parse_asset)]
    asset: AssetCode,
    /// Signed amount: positive credits, negative debits (e.g. --amount -2.50).
    #[arg(long, allow_hyphen_values = true, value_parser = remote::parse_decimal)]
    amount: Decimal,
    /// Why (required, at most 256 bytes; goes to the journal).
    #[arg(long)]
    reason: String,
}

#[derive(Subcommand, Debug)]
enum PlanCommand {
    /// Write (replace) a plan's draft from a JSON file holding a list of price rules.
    Draft {
        #[command(flatten)]
        common: MutateArgs,
        /// The plan.
        #[arg(value_parser = remote::parse_name)]
        plan: Name,
        /// JSON: a list of `tally_engine::PriceRule` (docs/operations.md has an example).
        #[arg(long)]
        file: PathBuf,
        /// The asset the plan's prices are in.
        #[arg(long, default_value = "USD", value_parser = remote::parse_asset)]
        asset: AssetCode,
        /// For a new plan: the wallet it is the custom plan of.
        #[arg(long, value_parser = remote::parse_name)]
        custom_for: Option<WalletId>,
    },
    /// Publish a plan's draft as its next version.
    Publish {
        #[command(flatten)]
        common: MutateArgs,
        /// The plan.
        #[arg(value_parser = remote::parse_name)]
        plan: Name,
    },
    /// Put a wallet on a published plan version.
    Assign {
        #[command(flatten)]
        common: MutateArgs,
        /// The wallet's id.
        #[arg(value_parser = remote::parse_name)]
        wallet: WalletId,
        /// The plan.
        #[arg(value_parser = remote::parse_name)]
        plan: Name,
        /// The published version.
        #[arg(long)]
        version: u32,
        /// Events at or after this time (RFC 3339 UTC) are priced by it [default: now].
        #[arg(long, value_parser = remote::parse_time)]
        from: Option<Timestamp>,
    },
    /// Price recorded events under the draft and under the latest published version.
    Test {
        #[command(flatten)]
        remote: RemoteArgs,
        /// The plan.
        #[arg(value_parser = remote::parse_name)]
        plan: Name,
        /// JSON: a list of `tally_engine::UsageEvent`.
        #[arg(long)]
        events: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum TopUpRuleCommand {
    /// Set (replace) a wallet's auto top-up rule for one asset.
    Set {
        #[command(flatten)]
        common: MutateArgs,
        /// The wallet's id.
        #[arg(value_parser = remote::parse_name)]
        wallet: WalletId,
        /// The asset, e.g. USD.
        #[arg(long, value_parser = remote::parse_asset)]
        asset: AssetCode,
        /// A top-up is requested when available drops below this.
        #[arg(long, allow_hyphen_values = true, value_parser = remote::parse_decimal)]
        threshold: Decimal,
        /// Charge this fixed amount.
        #[arg(long, allow_hyphen_values = true, value_parser = remote::parse_decimal, required_unless_present = "target", conflicts_with = "target")]
        amount: Option<Decimal>,
        /// Charge enough to bring available up to this balance.
        #[arg(long, allow_hyphen_values = true, value_parser = remote::parse_decimal)]
        target: Option<Decimal>,
        /// The saved payment method to charge (default: the wallet's default payment method).
        #[arg(long, value_parser = remote::parse_name, default_value = "default")]
        payment_method: Name,
        /// Failed attempts in a row after which the wallet is flagged.
        #[arg(long, default_value_t = 3)]
        attempts_max: u32,
        /// Least seconds between two requests.
        #[arg(long, default_value_t = 60)]
        cooldown: u64,
        /// Most that may be requested per UTC day.
        #[arg(long, allow_hyphen_values = true, value_parser = remote::parse_decimal)]
        daily_cap: Option<Decimal>,
        /// Most that may be requested per UTC calendar month.
        #[arg(long, allow_hyphen_values = true, value_parser = remote::parse_decimal)]
        monthly_cap: Option<Decimal>,
    },
    /// Remove a wallet's auto top-up rule for one asset.
    Remove {
        #[command(flatten)]
        common: MutateArgs,
        /// The wallet's id.
        #[arg(value_parser = remote::parse_name)]
        wallet: WalletId,
        /// The asset, e.g. USD.
        #[arg(long, value_parser = remote::parse_asset)]
        asset: AssetCode,
    },
}

#[derive(Args, Debug)]
struct BalanceArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// The wallet's id.
    #[arg(value_parser = remote::parse_name)]
    wallet: WalletId,
    /// The asset, e.g. USD.
    #[arg(long, value_parser = remote::parse_asset)]
    asset: AssetCode,
}

#[derive(Args, Debug)]
struct MarginArgs {
    #[command(flatten)]
    remote: RemoteArgs,
    /// One wallet.
    #[arg(long, value_parser = remote::parse_name, conflicts_with_all = ["product", "plan", "from"])]
    wallet: Option<WalletId>,
    /// One product.
    #[arg(long, value_parser = remote::parse_name, conflicts_with_all = ["plan", "from"])]
    product: Option<Name>,
    /// One plan version (with --version).
    #[arg(long, value_parser = remote::parse_name, requires = "version", conflicts_with = "from")]
    plan: Option<Name>,
    /// The plan's version.
    #[arg(long, requires = "plan")]
    version: Option<u32>,
    /// Events from this time's UTC hour (RFC 3339; with --to).
    #[arg(long, value_parser = remote::parse_time, requires = "to")]
    from: Option<Timestamp>,
    /// … to this time (RFC 3339).
    #[arg(long, value_parser = remote::parse_time, requires = "from")]
    to: Option<Timestamp>,
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Create an API key; its secret is printed once (the server keeps only its hash).
    Create {
        #[command(flatten)]
        remote: RemoteArgs,
        /// A label, e.g. which gateway uses the key.
        #[arg(long, value_parser = remote::parse_name)]
        label: Name,
        /// gateway (usage, reserve, settle, release, reads) or admin (everything).
        #[arg(long, value_parser = remote::parse_scope)]
        scope: Scope,
    },
    /// Revoke an API key by id.
    Revoke {
        #[command(flatten)]
        remote: RemoteArgs,
        /// The key's id.
        key_id: u64,
    },
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
    /// Where the HTTP/JSON API binds [default: 127.0.0.1:7480].
    #[arg(long, env = "TALLY_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Serve the HTTP API over TLS with the QUIC certificate (for anything beyond loopback).
    #[arg(long)]
    http_tls: bool,
    /// Copy the history store to this PostgreSQL database (libpq URL; never logged).
    #[arg(long, env = "TALLY_EXPORT_POSTGRES", hide_env_values = true)]
    export_postgres: Option<String>,
    /// Also write every effect to JSON-lines files in <data-dir>/outbound/.
    #[arg(long)]
    export_jsonl: bool,
    /// Log lines as `text` (default) or `json`; levels from TALLY_LOG (or RUST_LOG).
    #[arg(long, env = "TALLY_LOG_FORMAT", default_value = "text")]
    log_format: tally_server::logging::LogFormat,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// List checkpoints.
    List(OpsArgs),
    /// Verify every checkpoint's checksums and contents.
    Verify(OpsArgs),
    /// Show what one checkpoint holds.
    Inspect(InspectArgs),
    /// Write a fresh checkpoint of every shard. With an API key (--api-key or TALLY_API_KEY,
    /// admin) it goes ONLINE: the running server at --addr takes the snapshot. Without one it
    /// works offline on a data directory no server holds: load the newest checkpoints, replay the
    /// WAL, and write a fresh checkpoint.
    Create(SnapshotCreateArgs),
}

#[derive(Args, Debug)]
struct SnapshotCreateArgs {
    #[command(flatten)]
    ops: OpsArgs,
    /// Online: the server's address.
    #[arg(long, env = "TALLY_ADDR", default_value = "127.0.0.1:7400")]
    addr: String,
    /// Online: the server's certificate (PEM), pinned.
    #[arg(long, env = "TALLY_CERT", default_value = "./tally-data/tls/cert.pem")]
    cert: PathBuf,
    /// An admin API key: when given, snapshot the running server instead of a data directory.
    #[arg(long, env = "TALLY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
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
    match run(cli) {
        Ok(0) => {}
        Ok(status) => std::process::exit(status),
        Err(error) => {
            eprintln!("tally: error: {error:#}");
            std::process::exit(1);
        }
    }
}

/// Runs a command; returns the exit status.
fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Serve(args) => serve(args).map(|()| 0),
        Command::Topup(args) => topup(args),
        Command::Snapshot(SnapshotCommand::Create(args)) if args.api_key.is_some() => {
            let remote = Remote {
                addr: args.addr,
                cert: args.cert,
                api_key: args.api_key.unwrap_or_default(),
                json: args.ops.json,
            };
            Ok(remote::run(&remote, None, Op::Snapshot))
        }
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
            SnapshotCommand::Create(c) => (
                load_config(&c.ops.data, Overrides::default())?,
                c.ops.json,
                tally_server::ops::SnapshotAction::Create,
            ),
            SnapshotCommand::Inspect(i) => (
                load_config(&i.ops.data, Overrides::default())?,
                i.ops.json,
                tally_server::ops::SnapshotAction::Inspect(i.file.clone()),
            ),
        })
        .map(|()| 0),
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
            .map(|()| 0)
        }
        Command::Wal(WalCommand::Inspect(o)) => {
            tally_server::ops::wal_inspect(&load_config(&o.data, Overrides::default())?, o.json)
                .map(|()| 0)
        }
        client => {
            let (remote, id, op) = client_op(client);
            Ok(remote::run(&remote, id, op))
        }
    }
}

impl From<RemoteArgs> for Remote {
    fn from(r: RemoteArgs) -> Remote {
        Remote {
            addr: r.addr,
            cert: r.cert,
            api_key: r.api_key,
            json: r.json,
        }
    }
}

/// A client command's connection, `--id` and operation.
fn client_op(command: Command) -> (Remote, Option<u128>, Op) {
    let read = |r: RemoteArgs| (Remote::from(r), None);
    let write = |m: MutateArgs| (Remote::from(m.remote), m.id);
    let ((remote, id), op) = match command {
        Command::Serve(_)
        | Command::Topup(_)
        | Command::Snapshot(_)
        | Command::Restore(_)
        | Command::Wal(_) => {
            unreachable!("not a client command")
        }
        Command::Asset(AssetCommand::Define {
            common,
            code,
            scale,
            usd_value,
        }) => (
            write(common),
            Op::DefineAsset {
                code,
                scale,
                usd_value,
            },
        ),
        Command::Asset(AssetCommand::Price {
            common,
            code,
            currency,
            unit_amount,
            remove: _,
        }) => (
            write(common),
            Op::AssetPrice {
                asset: code,
                price: currency.zip(unit_amount).map(|(currency, unit_amount)| {
                    tally_engine::TopUpPrice {
                        currency,
                        unit_amount,
                    }
                }),
            },
        ),
        Command::Wallet(WalletCommand::Billing {
            common,
            wallet,
            customer,
            payment_method,
        }) => (
            write(common),
            Op::Billing {
                wallet,
                customer,
                payment_method,
            },
        ),
        Command::Product(ProductCommand::Define {
            common,
            code,
            dimensions,
        }) => (write(common), Op::DefineProduct { code, dimensions }),
        Command::Wallet(WalletCommand::Create {
            common,
            wallet,
            meta,
            overdraft,
        }) => (
            write(common),
            Op::WalletCreate {
                wallet,
                metadata: meta,
                overdraft,
            },
        ),
        Command::Wallet(WalletCommand::Get { remote, wallet }) => {
            (read(remote), Op::WalletGet { wallet })
        }
        Command::Wallet(WalletCommand::Freeze { common, wallet }) => {
            (write(common), Op::Freeze { wallet })
        }
        Command::Wallet(WalletCommand::Unfreeze { common, wallet }) => {
            (write(common), Op::Unfreeze { wallet })
        }
        Command::Wallet(WalletCommand::Overdraft {
            common,
            wallet,
            asset,
            limit,
        }) => (
            write(common),
            Op::SetOverdraft {
                wallet,
                asset,
                limit,
            },
        ),
        Command::Grant(a) => (
            write(a.common),
            Op::Grant {
                wallet: a.wallet,
                asset: a.asset,
                amount: a.amount,
                priority: a.priority,
                effective_at: a.effective_at,
                expires_at: a.expires_at,
                source: a.source,
                payment_id: a.payment_id,
            },
        ),
        Command::Usage(a) => (
            write(a.common),
            Op::Usage {
                wallet: a.wallet,
                event: a.event.spec(),
                cost_usd: a.cost_usd,
                record: a.record,
            },
        ),
        Command::Price(a) => (
            read(a.remote),
            Op::Price {
                wallet: a.wallet,
                event: a.event.spec(),
            },
        ),
        Command::Reserve(a) => (
            write(a.common),
            Op::Reserve {
                wallet: a.wallet,
                asset: a.asset,
                amount: a.amount,
                product: a.product,
                quantities: a.qty,
                attributes: a.attr,
                deadline: a.deadline,
                ttl_secs: a.ttl,
            },
        ),
        Command::Settle(a) => (
            write(a.common),
            Op::Settle {
                wallet: a.wallet,
                hold: a.hold,
                event: a.event.spec(),
                cost_usd: a.cost_usd,
            },
        ),
        Command::Release(a) => (
            write(a.common),
            Op::Release {
                wallet: a.wallet,
                hold: a.hold,
            },
        ),
        Command::Refund(a) => (
            write(a.common),
            Op::Refund {
                wallet: a.wallet,
                event: a.event,
                amount: a.amount,
            },
        ),
        Command::Dispute(a) => (
            write(a.common),
            Op::Dispute {
                wallet: a.wallet,
                grant: a.grant,
                freeze: a.freeze,
                won: a.won,
            },
        ),
        Command::Adjust(a) => (
            write(a.common),
            Op::Adjust {
                wallet: a.wallet,
                asset: a.asset,
                amount: a.amount,
                reason: a.reason,
            },
        ),
        Command::Plan(PlanCommand::Draft {
            common,
            plan,
            file,
            asset,
            custom_for,
        }) => (
            write(common),
            Op::PlanDraft {
                plan,
                file,
                asset,
                custom_for,
            },
        ),
        Command::Plan(PlanCommand::Publish { common, plan }) => {
            (write(common), Op::PlanPublish { plan })
        }
        Command::Plan(PlanCommand::Assign {
            common,
            wallet,
            plan,
            version,
            from,
        }) => (
            write(common),
            Op::PlanAssign {
                wallet,
                plan,
                version,
                from,
            },
        ),
        Command::Plan(PlanCommand::Test {
            remote,
            plan,
            events,
        }) => (read(remote), Op::PlanTest { plan, events }),
        Command::TopupRule(TopUpRuleCommand::Set {
            common,
            wallet,
            asset,
            threshold,
            amount,
            target,
            payment_method,
            attempts_max,
            cooldown,
            daily_cap,
            monthly_cap,
        }) => (
            write(common),
            Op::TopUpSet {
                wallet,
                asset,
                threshold,
                fixed: amount,
                target,
                payment_method,
                attempts_max,
                cooldown_secs: cooldown,
                daily_cap,
                monthly_cap,
            },
        ),
        Command::TopupRule(TopUpRuleCommand::Remove {
            common,
            wallet,
            asset,
        }) => (write(common), Op::TopUpRemove { wallet, asset }),
        Command::Balance(a) => (
            read(a.remote),
            Op::Balance {
                wallet: a.wallet,
                asset: a.asset,
            },
        ),
        Command::Margin(a) => (
            read(a.remote),
            Op::Margin {
                wallet: a.wallet,
                product: a.product,
                plan: a.plan,
                version: a.version,
                from: a.from,
                to: a.to,
            },
        ),
        Command::Key(KeyCommand::Create {
            remote,
            label,
            scope,
        }) => (read(remote), Op::KeyCreate { label, scope }),
        Command::Key(KeyCommand::Revoke { remote, key_id }) => {
            (read(remote), Op::KeyRevoke { key_id })
        }
        Command::Health(remote) => (read(remote), Op::Health),
    };
    (remote, id, op)
}

fn serve(args: ServeArgs) -> Result<()> {
    tally_server::logging::init(args.log_format).map_err(anyhow::Error::msg)?;
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
            http_listen: args.http_listen.clone(),
            http_tls: args.http_tls.then_some(true),
            export_postgres: args.export_postgres.clone(),
            export_jsonl: args.export_jsonl.then_some(true),
            ..Overrides::default()
        },
    )?;
    if config.durability == DurabilitySetting::None {
        tracing::warn!("durability = none: acknowledged writes are lost on power loss");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install the signal handler")?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.net_threads)
        .thread_name("tally-net")
        .enable_all()
        .build()
        .context("cannot start the network runtime")?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", display(&config.data_dir)))?;
    let crypto = tally_server::net::tls_crypto(&config)?;
    let admin_key = std::env::var("TALLY_ADMIN_KEY").ok();
    let keys = tally_server::net::open_keys(&config, admin_key.as_deref())?;
    // HTTP first: /healthz answers and /readyz says "recovering" while the shards replay.
    let (api, http) = runtime.block_on(tally_server::http::start_http(
        &config,
        Arc::clone(&keys),
        Some(crypto.clone()),
    ))?;
    let store = tally_server::store::SnapshotStore::open(&config)?;
    let server = Server::start(&config, Box::new(store))?;
    tally_server::http::ready(&api, server.handle(), &config)?;
    let (network, stripe) = {
        let _entered = runtime.enter();
        let stripe = tally_server::http::start_stripe(
            &config,
            server.handle(),
            server.payments_wake(),
            server.notices_wake(),
            &api,
        )?;
        (
            tally_server::net::start_quic(&config, server.handle(), keys, crypto)?,
            stripe,
        )
    };
    tracing::info!(
        "serving {} shards from {}: QUIC on {} (ALPN tally/1), HTTP on {}{}; stop with SIGTERM \
         or Ctrl-C",
        config.shards,
        config.data_dir.display(),
        network.local_addr(),
        http.local_addr(),
        if config.http_tls { " (TLS)" } else { "" },
    );
    let watched = server.handle();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        // A shard that stopped (a failed WAL sync or write, a panic) takes the process down, so
        // a supervisor restarts it and recovery runs; it is never left half alive.
        if watched.shards_running() < watched.shard_count() {
            tracing::error!(
                "{} of {} shards stopped: shutting down so that a restart recovers",
                watched.shard_count() - watched.shards_running(),
                watched.shard_count()
            );
            break;
        }
    }
    tracing::info!("stopping: closing connections, draining queues and syncing");
    runtime.block_on(async {
        stripe.abort();
        http.shutdown().await;
        network.shutdown().await;
    });
    let digests = server.shutdown()?;
    for (shard, digest) in digests.iter().enumerate() {
        tracing::info!("shard {shard} stopped, digest {digest:016x}");
    }
    Ok(())
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
