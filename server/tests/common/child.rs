//! `tally serve` as a child process, for the tests that kill or break a real server, and the
//! catalog set up over a client.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::thread::JoinHandle;

use tally_client::Client;
use tally_engine::{name, Command, CreateWallet, Request, RequestId};

/// A running `tally serve`, killed if dropped before it exits.
pub struct Serve {
    pub child: std::process::Child,
    /// Its QUIC address.
    pub addr: String,
    /// Its HTTP address.
    pub http: String,
    /// The rest of its stderr, once it exits.
    pub log: Option<JoinHandle<String>>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tally serve` with one shard on `data`, QUIC on `listen`, HTTP on a free port, the
/// admin key `admin` and the extra environment `env`; returns once it is serving.
pub fn serve(data: &Path, listen: &str, admin: &str, env: &[(&str, &str)]) -> Serve {
    let mut child = Process::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--shards", "1", "--data-dir"])
        .arg(data)
        .args(["--listen", listen, "--http-listen", "127.0.0.1:0"])
        .env("TALLY_ADMIN_KEY", admin)
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let (addr, http) = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "serve exited");
        if let Some(rest) = line.split("QUIC on ").nth(1) {
            let http = line.split("HTTP on ").nth(1).unwrap();
            let http = http
                .trim_end()
                .trim_end_matches(';')
                .split([';', ' '])
                .next();
            break (
                rest.split_whitespace().next().unwrap().to_string(),
                http.unwrap().to_string(),
            );
        }
    };
    // Keep reading, so the server never blocks on a full pipe.
    let log = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        rest
    });
    Serve {
        child,
        addr,
        http,
        log: Some(log),
    }
}

/// The test catalog (`super::catalog`) and wallet `w` with a grant of `amount`, over `client`.
pub async fn prepare(client: &Client, amount: &str) {
    for (i, command) in super::catalog().into_iter().enumerate() {
        client
            .command(Request {
                id: RequestId(2 + i as u128),
                command,
            })
            .await
            .unwrap();
    }
    client
        .command(Request {
            id: RequestId(100),
            command: Command::CreateWallet(CreateWallet {
                wallet: name("w"),
                overdraft: vec![],
                metadata: vec![],
            }),
        })
        .await
        .unwrap();
    client
        .command(super::grant(101, "w", amount))
        .await
        .unwrap();
}
