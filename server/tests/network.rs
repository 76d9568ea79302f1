//! End to end over real QUIC on loopback: the `tally-client` against the shards behind
//! `tally-net`'s server, with TLS, API keys and limits.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use tally_client::{Client, ClientConfig, Error};
use tally_engine::*;
use tally_net::NetServer;
use tally_server::store::SnapshotStore;
use tally_server::Server;

const ADMIN_KEY: &str = "test-admin-key-0123456789";

/// A server with its network front, in this process.
struct Running {
    server: Option<Server>,
    net: Option<NetServer>,
    config: tally_server::Config,
}

impl Running {
    fn start(dir: &Path, shards: u32) -> Running {
        Self::start_with(common::config(dir, shards))
    }

    fn start_with(mut config: tally_server::Config) -> Running {
        if config.listen == tally_server::Config::default().listen {
            config.listen = "127.0.0.1:0".into();
        }
        let store = SnapshotStore::open(&config).unwrap();
        let server = Server::start(&config, Box::new(store)).unwrap();
        let net =
            tally_server::net::start_network(&config, server.handle(), Some(ADMIN_KEY)).unwrap();
        Running {
            server: Some(server),
            net: Some(net),
            config,
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.net.as_ref().unwrap().local_addr()
    }

    fn cert(&self) -> PathBuf {
        self.config.data_dir.join("tls/cert.pem")
    }

    fn client_config(&self, key: &str) -> ClientConfig {
        ClientConfig::from_files(&self.addr().to_string(), self.cert(), key).unwrap()
    }

    async fn client(&self, key: &str) -> Client {
        Client::connect(self.client_config(key)).await.unwrap()
    }

    async fn stop(mut self) {
        self.net.take().unwrap().shutdown().await;
        let server = self.server.take().unwrap();
        tokio::task::spawn_blocking(move || server.shutdown().unwrap())
            .await
            .unwrap();
    }
}

async fn setup_catalog(client: &Client, wallets: &[&str]) {
    let mut id = 1_000_000_000u128;
    for command in catalog() {
        id += 1;
        client
            .command(Request {
                id: RequestId(id),
                command,
            })
            .await
            .unwrap();
    }
    for w in wallets {
        let wallet = name(w);
        for command in [
            Command::CreateWallet(CreateWallet {
                wallet,
                overdraft: vec![],
                metadata: vec![],
            }),
            Command::AssignPlan {
                wallet,
                plan: name("std"),
                version: 1,
                effective_from: Timestamp(0),
            },
        ] {
            id += 1;
            client
                .command(Request {
                    id: RequestId(id),
                    command,
                })
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_over_quic_with_the_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let running = Running::start(dir.path(), 2);
    let client = running.client(ADMIN_KEY).await;
    let health = client.health().await.unwrap();
    assert_eq!((health.shards, health.shards_running), (2, 2));
    assert_eq!(health.connections_open, 1);
    running.stop().await;
}
