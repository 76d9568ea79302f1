//! The CLI client end to end: a real `tally serve` child process, and `tally asset define`,
//! `tally wallet …`, `tally grant`, `tally usage`, … run against it over QUIC as further child
//! processes, checking balances, exit statuses, error names and JSON output.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::thread::JoinHandle;

use serde_json::Value;

const ADMIN_KEY: &str = "remote-cli-test-admin-key-0123456789";

struct Server {
    child: Child,
    addr: String,
    cert: PathBuf,
    stderr: Option<JoinHandle<String>>,
}

impl Server {
    fn start(data: &Path) -> Server {
        let mut child = Process::new(env!("CARGO_BIN_EXE_tally"))
            .args(["serve", "--data-dir"])
            .arg(data)
            .args(["--shards", "2", "--listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .env("TALLY_ADMIN_KEY", ADMIN_KEY)
            .env_remove("TALLY_API_KEY")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let addr = loop {
            line.clear();
            assert!(
                stderr.read_line(&mut line).unwrap() > 0,
                "serve exited before serving"
            );
            if line.contains("serving") {
                // "... QUIC on 127.0.0.1:PORT (ALPN ..."
                let rest = line.split("QUIC on ").nth(1).unwrap();
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        let stderr = std::thread::spawn(move || {
            let mut rest = String::new();
            stderr.read_to_string(&mut rest).unwrap();
            rest
        });
        Server {
            child,
            addr,
            cert: data.join("tls").join("cert.pem"),
            stderr: Some(stderr),
        }
    }

    /// Stops the server with SIGTERM; returns the rest of its stderr.
    fn stop(mut self) -> String {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "serve exited with {status}");
        self.stderr.take().unwrap().join().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.stderr.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "exit {}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not one JSON document ({e}): {:?}", self.stdout))
    }
}

/// Runs `tally ARGS` against `server` with `key` in `TALLY_API_KEY` (and the address and
/// certificate in `TALLY_ADDR` / `TALLY_CERT`).
fn tally(server: &Server, key: &str, args: &[&str]) -> Out {
    let out = Process::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("TALLY_ADDR", &server.addr)
        .env("TALLY_CERT", &server.cert)
        .env("TALLY_API_KEY", key)
        .output()
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn admin(server: &Server, args: &[&str]) -> Out {
    tally(server, ADMIN_KEY, args)
}

fn available(server: &Server) -> String {
    let doc = admin(server, &["balance", "w1", "--asset", "USD", "--json"])
        .ok()
        .json();
    assert_eq!(doc["ok"], true);
    doc["balance"]["available"].as_str().unwrap().to_string()
}

fn rules(unit_price: &str) -> String {
    format!(
        r#"[{{"product": "chat", "filters": [],
             "components": [{{"dimension": "tokens", "price": {{"PerUnit": {{"unit_price": "{unit_price}"}}}}}}],
             "minimum_charge": null, "rounding": "Up"}}]"#
    )
}

#[test]
fn cli_client_drives_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data);

    // Catalog: asset, product, plan (drafted from a JSON file), published.
    admin(
        &server,
        &["asset", "define", "USD", "--scale", "2", "--usd-value", "1"],
    )
    .ok();
    admin(
        &server,
        &["product", "define", "chat", "--dimension", "tokens"],
    )
    .ok();
    let rules_file = dir.path().join("rules.json");
    std::fs::write(&rules_file, rules("0.001")).unwrap();
    let out = admin(
        &server,
        &[
            "plan",
            "draft",
            "std",
            "--file",
            rules_file.to_str().unwrap(),
        ],
    );
    assert!(
        out.ok().stdout.contains("draft of plan std written"),
        "{}",
        out.stdout
    );
    let doc = admin(&server, &["plan", "publish", "std", "--json"])
        .ok()
        .json();
    assert_eq!(doc["reply"]["value"]["Version"]["version"], 1);

    // A wallet on the plan, with credit.
    admin(
        &server,
        &[
            "wallet",
            "create",
            "w1",
            "--meta",
            "tier=pro",
            "--overdraft",
            "USD=0",
        ],
    )
    .ok();
    admin(&server, &["plan", "assign", "w1", "std", "--version", "1"]).ok();
    let doc = admin(
        &server,
        &[
            "grant", "w1", "--asset", "USD", "--amount", "10.00", "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(doc["ok"], true);
    assert!(doc["reply"]["value"]["Grant"]["grant"].is_u64(), "{doc}");
    assert_eq!(available(&server), "10.00");

    // Usage: 350 tokens at 0.001 = 0.35, exactly; the id is printed and reusable.
    let out = admin(
        &server,
        &[
            "usage",
            "w1",
            "--product",
            "chat",
            "--qty",
            "tokens=350",
            "--cost-usd",
            "0.10",
            "--id",
            "4242",
        ],
    );
    assert!(
        out.ok()
            .stdout
            .contains("ok: charged 0.35 USD, remaining 9.65 USD"),
        "{}",
        out.stdout
    );
    // The id is printed with the time that defaulted to now: repeating the command with both is
    // answered from the idempotency table, so nothing is charged twice.
    let repeat = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("request id: 4242 (repeat with: "))
        .unwrap_or_else(|| panic!("no repeat hint in {}", out.stdout))
        .trim_end_matches(')')
        .to_string();
    assert!(repeat.starts_with("--id 4242 --occurred-at 20"), "{repeat}");
    assert_eq!(available(&server), "9.65");
    let mut args = vec![
        "usage",
        "w1",
        "--product",
        "chat",
        "--qty",
        "tokens=350",
        "--cost-usd",
        "0.10",
        "--json",
    ];
    args.extend(repeat.split(' '));
    let doc = admin(&server, &args).ok().json();
    assert_eq!(doc["id"], "4242");
    assert_eq!(doc["retry"], repeat.as_str());
    assert_eq!(doc["reply"]["value"]["Charge"]["available"], "9.65");
    assert_eq!(available(&server), "9.65");
    // The same id with another event is a conflict, not a second charge.
    let out = admin(
        &server,
        &[
            "usage",
            "w1",
            "--product",
            "chat",
            "--qty",
            "tokens=1",
            "--id",
            "4242",
        ],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("IdempotencyConflict"), "{}", out.stderr);

    // Reserve a fixed amount, settle it with the actual usage.
    let doc = admin(
        &server,
        &[
            "reserve", "w1", "--asset", "USD", "--amount", "1.00", "--json",
        ],
    )
    .ok()
    .json();
    let hold = &doc["reply"]["value"]["Hold"];
    assert_eq!(hold["available"], "8.65");
    let hold_id = hold["hold"].as_u64().unwrap().to_string();
    let out = admin(
        &server,
        &[
            "settle",
            "w1",
            "--hold",
            &hold_id,
            "--product",
            "chat",
            "--qty",
            "tokens=200",
        ],
    );
    assert!(
        out.ok()
            .stdout
            .contains("charged 0.20 USD, remaining 9.45 USD"),
        "{}",
        out.stdout
    );
    // Reserve a priced estimate, release it.
    let doc = admin(
        &server,
        &[
            "reserve",
            "w1",
            "--product",
            "chat",
            "--qty",
            "tokens=100",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(doc["reply"]["value"]["Hold"]["amount"], "0.10");
    let hold_id = doc["reply"]["value"]["Hold"]["hold"]
        .as_u64()
        .unwrap()
        .to_string();
    admin(&server, &["release", "w1", "--hold", &hold_id]).ok();
    assert_eq!(available(&server), "9.45");

    // Refund part of the usage event by its request id.
    let doc = admin(
        &server,
        &[
            "refund", "w1", "--event", "4242", "--amount", "0.05", "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(doc["reply"]["value"]["Refund"]["refunded"], "0.05");
    assert_eq!(available(&server), "9.50");

    // A top-up grant, disputed: its remainder is clawed back.
    let doc = admin(
        &server,
        &[
            "grant",
            "w1",
            "--asset",
            "USD",
            "--amount",
            "5.00",
            "--source",
            "topup",
            "--payment-id",
            "pay_1",
            "--json",
        ],
    )
    .ok()
    .json();
    let topup = doc["reply"]["value"]["Grant"]["grant"]
        .as_u64()
        .unwrap()
        .to_string();
    assert_eq!(available(&server), "14.50");
    let doc = admin(&server, &["dispute", "w1", "--grant", &topup, "--json"])
        .ok()
        .json();
    assert_eq!(doc["reply"]["value"]["Dispute"]["clawed_back"], "5.00");
    assert_eq!(available(&server), "9.50");

    // A manual debit needs a reason.
    let out = admin(
        &server,
        &["adjust", "w1", "--asset", "USD", "--amount", "-0.50"],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    admin(
        &server,
        &[
            "adjust",
            "w1",
            "--asset",
            "USD",
            "--amount",
            "-0.50",
            "--reason",
            "goodwill reversal",
        ],
    )
    .ok();
    assert_eq!(available(&server), "9.00");

    // Auto top-up rule, on a priced asset, charging the wallet's default payment method.
    admin(
        &server,
        &[
            "asset",
            "price",
            "USD",
            "--currency",
            "usd",
            "--unit-amount",
            "1",
        ],
    )
    .ok();
    admin(
        &server,
        &[
            "wallet",
            "billing",
            "w1",
            "--customer",
            "cus_1",
            "--payment-method",
            "pm_1",
        ],
    )
    .ok();
    let doc = admin(&server, &["wallet", "get", "w1", "--json"])
        .ok()
        .json();
    assert_eq!(doc["wallet"]["customer"], "cus_1", "{doc}");
    admin(
        &server,
        &[
            "topup-rule",
            "set",
            "w1",
            "--asset",
            "USD",
            "--threshold",
            "1.00",
            "--amount",
            "20.00",
        ],
    )
    .ok();

    // Margin, total and per wallet.
    let doc = admin(&server, &["margin", "--json"]).ok().json();
    assert!(doc["margin"]["events"].as_u64().unwrap() >= 2, "{doc}");
    let doc = admin(&server, &["margin", "--wallet", "w1", "--json"])
        .ok()
        .json();
    assert_eq!(doc["margin"]["cost_usd"], "0.1");
    let doc = admin(
        &server,
        &["margin", "--plan", "std", "--version", "1", "--json"],
    )
    .ok()
    .json();
    assert!(doc["margin"]["events"].as_u64().unwrap() >= 2, "{doc}");

    // Wallet, as a table and as JSON.
    let out = admin(&server, &["wallet", "get", "w1"]);
    let text = &out.ok().stdout;
    for needle in ["wallet   w1", "tier=pro", "std version 1", "9.00", "pm_1"] {
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    let doc = admin(&server, &["wallet", "get", "w1", "--json"])
        .ok()
        .json();
    assert_eq!(doc["wallet"]["frozen"], false);
    assert_eq!(doc["wallet"]["metadata"]["tier"], "pro");
    assert_eq!(doc["wallet"]["balances"][0]["available"], "9.00");

    // A new draft tested against the published version on recorded events.
    std::fs::write(&rules_file, rules("0.002")).unwrap();
    admin(
        &server,
        &[
            "plan",
            "draft",
            "std",
            "--file",
            rules_file.to_str().unwrap(),
        ],
    )
    .ok();
    let events_file = dir.path().join("events.json");
    std::fs::write(
        &events_file,
        r#"[{"wallet": "w1", "product": "chat",
             "quantities": [{"dimension": "tokens", "value": "1000"}], "attributes": [],
             "cost_usd": "0.20", "occurred_at": 0, "mode": "Record"}]"#,
    )
    .unwrap();
    let doc = admin(
        &server,
        &[
            "plan",
            "test",
            "std",
            "--events",
            events_file.to_str().unwrap(),
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(doc["report"]["total"]["revenue_current_usd"], "1.00");
    assert_eq!(doc["report"]["total"]["revenue_draft_usd"], "2.00");

    // A frozen wallet refuses strict usage: non-zero exit, the code's name on stderr, and with
    // --json a JSON document on stdout.
    admin(&server, &["wallet", "freeze", "w1"]).ok();
    let usage = ["usage", "w1", "--product", "chat", "--qty", "tokens=10"];
    let out = admin(&server, &usage);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("tally: error: rejected: WalletFrozen (41)"),
        "{}",
        out.stderr
    );
    let out = admin(&server, &[&usage[..], &["--json"]].concat());
    assert_eq!(out.code, 1);
    let doc = out.json();
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["code"], 41);
    assert_eq!(doc["name"], "WalletFrozen");
    admin(&server, &["wallet", "unfreeze", "w1"]).ok();
    assert_eq!(available(&server), "9.00");

    // Bad input is refused before anything is sent.
    for bad in [
        &["grant", "w1", "--asset", "USD", "--amount", "1.2.3"][..],
        &["grant", "w1", "--asset", "USD", "--amount", "1e3"][..],
        &[
            "grant",
            "w1",
            "--asset",
            "USD",
            "--amount",
            "1",
            "--expires-at",
            "tomorrow",
        ][..],
        &["usage", "w1", "--product", "chat", "--qty", "tokens"][..],
        &[
            "grant", "w1", "--asset", "USD", "--amount", "1", "--source", "topup",
        ][..],
    ] {
        let out = admin(&server, bad);
        assert_eq!(out.code, 2, "{bad:?}: {}", out.stderr);
    }
    assert_eq!(available(&server), "9.00");

    // A negative amount is an amount, not a flag: the server refuses it with its code.
    for negative in [
        &["grant", "w1", "--asset", "USD", "--amount", "-1.00"][..],
        &["reserve", "w1", "--asset", "USD", "--amount", "-1.00"][..],
    ] {
        let out = admin(&server, negative);
        assert_eq!(out.code, 1, "{negative:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("InvalidAmount") || out.stderr.contains("InvalidDeadline"),
            "{negative:?}: {}",
            out.stderr
        );
    }
    assert_eq!(available(&server), "9.00");
    // Every flag of `grant` has a help line.
    let help = admin(&server, &["grant", "--help"]).ok().stdout.clone();
    for (flag, says) in [
        ("--asset <ASSET>", "The asset"),
        ("--amount <AMOUNT>", "The amount"),
    ] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(flag))
            .unwrap_or_default();
        assert!(line.contains(says), "{flag:?} has no help line: {help}");
    }

    // A gateway key: usage works, a grant is out of scope.
    let doc = admin(
        &server,
        &[
            "key", "create", "--label", "gw1", "--scope", "gateway", "--json",
        ],
    )
    .ok()
    .json();
    let gateway = doc["secret"].as_str().unwrap().to_string();
    let gateway_id = doc["key_id"].as_u64().unwrap().to_string();
    let out = tally(&server, &gateway, &usage);
    assert!(
        out.ok()
            .stdout
            .contains("ok: charged 0.01 USD, remaining 8.99 USD"),
        "{}",
        out.stdout
    );
    let out = tally(
        &server,
        &gateway,
        &["grant", "w1", "--asset", "USD", "--amount", "1"],
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("rejected: OutOfScope (1006)"),
        "{}",
        out.stderr
    );
    let out = tally(
        &server,
        &gateway,
        &["grant", "w1", "--asset", "USD", "--amount", "1", "--json"],
    );
    assert_eq!(out.json()["name"], "OutOfScope");
    // Revoked, it is refused.
    admin(&server, &["key", "revoke", &gateway_id]).ok();
    let out = tally(&server, &gateway, &usage);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("InvalidKey (1005)"), "{}", out.stderr);
    // So is a key the server never issued, given with --api-key.
    let out = tally(
        &server,
        "",
        &["health", "--api-key", "not-a-key-the-server-knows"],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("InvalidKey"), "{}", out.stderr);

    // Online snapshot and health.
    let doc = admin(&server, &["snapshot", "create", "--json"])
        .ok()
        .json();
    assert_eq!(doc["checkpoints"].as_array().unwrap().len(), 2, "{doc}");
    let doc = admin(&server, &["health", "--json"]).ok().json();
    assert_eq!(doc["health"]["shards"], 2);
    assert_eq!(doc["health"]["shards_running"], 2);
    assert!(doc["health"]["rejected_scope"].as_u64().unwrap() >= 1);

    let rest = server.stop();
    assert!(rest.contains("shard 1 stopped"), "{rest}");
    // The online snapshot left checkpoint files behind.
    let snapshots = std::fs::read_dir(data.join("snapshots")).unwrap().count();
    assert!(snapshots >= 2, "{snapshots} checkpoint files");
}
