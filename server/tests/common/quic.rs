//! A server with its QUIC front in this process, and raw QUIC connections that write frames by
//! hand, for the network tests.

use std::path::{Path, PathBuf};

use tally_client::{Client, ClientConfig};
use tally_net::{Message, NetServer};
use tally_server::store::SnapshotStore;
use tally_server::Server;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

/// A server with its network front, in this process.
pub struct Running {
    server: Option<Server>,
    net: Option<NetServer>,
    pub config: tally_server::Config,
}

impl Running {
    pub fn start(dir: &Path, shards: u32) -> Running {
        Self::start_with(super::config(dir, shards))
    }

    pub fn start_with(mut config: tally_server::Config) -> Running {
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

    pub fn stats(&self) -> tally_net::StatsSnapshot {
        self.net.as_ref().unwrap().stats()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.net.as_ref().unwrap().local_addr()
    }

    pub fn cert(&self) -> PathBuf {
        self.config.data_dir.join("tls/cert.pem")
    }

    pub fn client_config(&self, key: &str) -> ClientConfig {
        ClientConfig::from_files(&self.addr().to_string(), self.cert(), key).unwrap()
    }

    pub async fn client(&self, key: &str) -> Client {
        Client::connect(self.client_config(key)).await.unwrap()
    }

    pub async fn stop(mut self) {
        self.net.take().unwrap().shutdown().await;
        let server = self.server.take().unwrap();
        tokio::task::spawn_blocking(move || server.shutdown().unwrap())
            .await
            .unwrap();
    }
}

pub struct Raw {
    pub conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

pub struct RawStream {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    decoder: tally_net::Decoder,
}

pub async fn raw_connect(running: &Running) -> Raw {
    try_raw_connect(running).await.unwrap()
}

pub async fn try_raw_connect(running: &Running) -> Result<Raw, quinn::ConnectionError> {
    let cert = tally_net::tls::load_certs(&running.cert())
        .unwrap()
        .remove(0);
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(tally_net::tls::quic_client_config(cert).unwrap());
    let conn = endpoint
        .connect(running.addr(), "localhost")
        .unwrap()
        .await?;
    Ok(Raw {
        conn,
        _endpoint: endpoint,
    })
}

impl Raw {
    pub async fn stream(&self) -> RawStream {
        let (send, recv) = self.conn.open_bi().await.unwrap();
        RawStream {
            send,
            recv,
            decoder: tally_net::Decoder::default(),
        }
    }

    /// A stream on which hello and auth were done.
    pub async fn authed(&self, key: &str) -> RawStream {
        let mut s = self.stream().await;
        s.write(0, &hello(1, 1)).await;
        assert!(matches!(s.read().await, Some((0, Message::Welcome(_)))));
        s.write(
            0,
            &Message::Auth {
                key: key.as_bytes().to_vec(),
            },
        )
        .await;
        assert!(matches!(s.read().await, Some((0, Message::AuthOk { .. }))));
        s
    }
}

pub fn hello(min: u8, max: u8) -> Message {
    Message::Hello(tally_net::Hello {
        version_min: min,
        version_max: max,
        frame_payload_max: tally_net::FRAME_PAYLOAD_BYTES_MAX,
        client: "raw-test".into(),
    })
}

impl RawStream {
    pub async fn write(&mut self, id: u64, message: &Message) {
        let mut buf = Vec::new();
        message.encode(id, &mut buf).unwrap();
        self.send.write_all(&buf).await.unwrap();
    }

    pub async fn write_bytes(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    /// The next answer, or `None` when the stream or connection ended.
    pub async fn read(&mut self) -> Option<(u64, Message)> {
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                let message = Message::decode(&frame).unwrap();
                return Some((frame.header.request_id, message));
            }
            match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                self.recv.read_chunk(1 << 16, true),
            )
            .await
            .expect("an answer within 10 s")
            {
                Ok(Some(chunk)) => self.decoder.feed(&chunk.bytes),
                _ => return None,
            }
        }
    }

    pub async fn expect_error(&mut self, id: u64, code: tally_net::ErrorCode) -> String {
        match self.read().await {
            Some((got, Message::Error(e))) if got == id && e.code == code => e.message,
            other => panic!("expected Error {code} for id {id}, got {other:?}"),
        }
    }
}

/// The header of a frame, written by hand: magic, version, kind, flags, length, request id.
pub fn header(version: u8, kind: u8, length: u32, id: u64) -> Vec<u8> {
    let mut h = vec![tally_net::MAGIC, version, kind, 0];
    h.extend_from_slice(&length.to_le_bytes());
    h.extend_from_slice(&id.to_le_bytes());
    h
}
