//! tally-client: the async Rust client inference gateways use to reach tally over QUIC.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tally_client::Error> {
//! use tally_client::{Client, ClientConfig};
//! let config = ClientConfig::from_files("127.0.0.1:7400", "data/tls/cert.pem", "tally_…")?;
//! let client = Client::connect(config).await?;
//! let health = client.health().await?;
//! # Ok(()) }
//! ```
//!
//! - **Pinned certificate.** The server's certificate file is the only one trusted
//!   ([`tally_net::tls`]); there is no mode that skips verification.
//! - **Automatic batching.** Calls are written by one task per connection; whatever calls are
//!   waiting when it writes go out together, and runs of usage events (or of reserves) become one
//!   `UsageBatch` (`ReserveBatch`) frame. Under load a gateway's concurrent calls share frames
//!   without asking; alone, a call goes out at once.
//! - **Retries.** `Busy`, `Stopped`, `Poisoned` and a lost connection are retried with the *same*
//!   request, so the same idempotency id, until [`ClientConfig::retry_for`] runs out: an event
//!   the server applied before the connection broke is answered from its idempotency table, not
//!   applied twice. Key creation is never retried after its frame left.
//! - **Reconnects.** A call finding the connection dead connects again (hello, auth) first.
//! - **Typed errors.** [`Error::Rejected`] carries the engine's [`ResultCode`] and reply;
//!   [`Error::Transport`] the transport's [`ErrorCode`].

use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use tally_engine::{
    BalanceView, Command, MarginScope, MarginView, Query, Reply, Request, RequestId, ResultCode,
    UsageEvent, WalletId,
};
use tally_net::message::{CheckpointInfo, HealthReport, Hello, ReserveItem, Scope, WalletInfo};
use tally_net::{Answer, Decoder, ErrorCode, ErrorFrame, Message, FRAME_PAYLOAD_BYTES_MAX};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

/// The client's name in `Hello`.
pub const CLIENT_NAME: &str = concat!("tally-client/", env!("CARGO_PKG_VERSION"));

/// Why a call failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The engine refused the command or query (it changed nothing); the reply has details.
    Rejected {
        /// The result code.
        code: ResultCode,
        /// The whole reply (for commands; `None` for queries).
        reply: Option<Reply>,
    },
    /// The server refused the request at the transport level (or closed the connection with
    /// this code).
    Transport {
        /// The code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// No connection could be made (address, certificate, handshake, timeout).
    Connect(String),
    /// The connection broke and the retry budget ran out (or the call may not be retried).
    ConnectionLost(String),
    /// The server answered with a frame that does not answer the request.
    Protocol(String),
    /// The client's configuration is unusable (a file, an address).
    Config(String),
}

impl Error {
    /// The stable code number: a result code or a transport code, when there is one.
    pub fn code(&self) -> Option<u16> {
        match self {
            Error::Rejected { code, .. } => Some(*code as u16),
            Error::Transport { code, .. } => Some(*code as u16),
            _ => None,
        }
    }

    fn retryable(&self) -> bool {
        match self {
            Error::Transport { code, .. } => matches!(
                code,
                ErrorCode::Busy
                    | ErrorCode::Stopped
                    | ErrorCode::Poisoned
                    | ErrorCode::TooManyInFlight
            ),
            Error::Connect(_) | Error::ConnectionLost(_) => true,
            _ => false,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Rejected { code, .. } => {
                write!(f, "rejected: {} ({})", code.name(), *code as u16)
            }
            Error::Transport { code, message } => write!(f, "{code}: {message}"),
            Error::Connect(why) => write!(f, "cannot connect: {why}"),
            Error::ConnectionLost(why) => write!(f, "connection lost: {why}"),
            Error::Protocol(why) => write!(f, "protocol error: {why}"),
            Error::Config(why) => write!(f, "configuration: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// How to reach a server.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The server's address.
    pub addr: SocketAddr,
    /// The server's certificate (the leaf), pinned.
    pub cert: CertificateDer<'static>,
    /// The API key.
    pub api_key: String,
    /// Most calls in one batch frame.
    pub batch_max: usize,
    /// How long a call keeps retrying `Busy`, `Stopped`, `Poisoned` and lost connections.
    pub retry_for: Duration,
    /// How long one connection attempt (QUIC + hello + auth) may take.
    pub connect_timeout: Duration,
    /// A connection that hears nothing from the server for this long is given up and calls move
    /// to a new one (keep-alives go every fifth of it). A server killed outright is noticed this
    /// fast, not after QUIC's default 30 s.
    pub idle_timeout: Duration,
}

impl ClientConfig {
    /// A configuration from an address (`host:port`), the server's certificate file (PEM; the
    /// first certificate is pinned) and an API key.
    pub fn from_files(
        addr: &str,
        cert: impl AsRef<Path>,
        api_key: &str,
    ) -> Result<ClientConfig, Error> {
        let addr = addr
            .to_socket_addrs()
            .map_err(|e| Error::Config(format!("address {addr:?}: {e}")))?
            .next()
            .ok_or_else(|| Error::Config(format!("address {addr:?} resolves to nothing")))?;
        let certs =
            tally_net::tls::load_certs(cert.as_ref()).map_err(|e| Error::Config(e.to_string()))?;
        Ok(ClientConfig::new(addr, certs[0].clone(), api_key))
    }

    /// A configuration with the default batching and retry budget.
    pub fn new(addr: SocketAddr, cert: CertificateDer<'static>, api_key: &str) -> ClientConfig {
        ClientConfig {
            addr,
            cert,
            api_key: api_key.to_string(),
            batch_max: 1024,
            retry_for: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3),
        }
    }
}

/// A cloneable handle to one logical connection to a tally server.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    endpoint: Endpoint,
    quic: quinn::ClientConfig,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

/// What the server said about the connection in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// The key's id.
    pub key_id: u64,
    /// The key's scope.
    pub scope: Scope,
    /// Most requests unanswered at once.
    pub in_flight_max: u32,
    /// Most items per batch frame.
    pub batch_items_max: u32,
}

enum Body {
    Usage(RequestId, UsageEvent),
    Reserve(ReserveItem),
    // Boxed: commands and answers are large and rare next to usage and reserves, which the
    // hot path moves by value.
    Other(Box<Message>),
}

struct Call {
    body: Body,
    answer: oneshot::Sender<Result<Message, Error>>,
}

enum Targets {
    One(oneshot::Sender<Result<Message, Error>>),
    Many(Vec<oneshot::Sender<Result<Message, Error>>>),
}

struct Waiter {
    targets: Targets,
    _permit: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    /// Why the connection ended, once it has.
    closed: Option<Error>,
}

#[derive(Debug)]
struct Conn {
    connection: Connection,
    calls: mpsc::Sender<Call>,
    alive: Arc<AtomicBool>,
    session: Session,
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Call")
    }
}

impl Client {
    /// Connects (QUIC, TLS with the pinned certificate, hello, auth). Fails at once on a wrong
    /// key or certificate.
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        let mut quic = tally_net::tls::quic_client_config(config.cert.clone())
            .map_err(|e| Error::Config(e.to_string()))?;
        let mut transport = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
            .map_err(|_| Error::Config("idle_timeout is out of range".into()))?;
        transport.max_idle_timeout(Some(idle));
        transport.keep_alive_interval(Some(config.idle_timeout / 5));
        quic.transport_config(Arc::new(transport));
        let bind: SocketAddr = if config.addr.is_ipv6() {
            "[::]:0".parse().expect("a valid address")
        } else {
            "0.0.0.0:0".parse().expect("a valid address")
        };
        let endpoint =
            Endpoint::client(bind).map_err(|e| Error::Connect(format!("UDP socket: {e}")))?;
        let client = Client {
            inner: Arc::new(Inner {
                config,
                endpoint,
                quic,
                conn: tokio::sync::Mutex::new(None),
            }),
        };
        client.connection().await?;
        Ok(client)
    }

    /// The current session (connecting first if needed).
    pub async fn session(&self) -> Result<Session, Error> {
        Ok(self.connection().await?.session)
    }

    /// Closes the connection and waits (briefly) until the server was told; later calls
    /// connect again.
    pub async fn close(&self) {
        if let Some(conn) = self.inner.conn.lock().await.take() {
            conn.connection.close(0u32.into(), b"client closed");
            let _ =
                tokio::time::timeout(Duration::from_millis(250), self.inner.endpoint.wait_idle())
                    .await;
        }
    }

    async fn connection(&self) -> Result<Arc<Conn>, Error> {
        let mut current = self.inner.conn.lock().await;
        if let Some(conn) = current.as_ref() {
            if conn.alive.load(Ordering::Acquire) {
                return Ok(conn.clone());
            }
        }
        *current = None;
        let conn = tokio::time::timeout(self.inner.config.connect_timeout, self.open())
            .await
            .map_err(|_| {
                Error::Connect(format!(
                    "no answer from {} within {:?}",
                    self.inner.config.addr, self.inner.config.connect_timeout
                ))
            })??;
        let conn = Arc::new(conn);
        *current = Some(conn.clone());
        Ok(conn)
    }

    async fn open(&self) -> Result<Conn, Error> {
        let config = &self.inner.config;
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.quic.clone(), config.addr, "localhost")
            .map_err(|e| Error::Connect(e.to_string()))?;
        let connection = connecting.await.map_err(|e| connect_error(&e))?;
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| connect_error(&e))?;
        let mut decoder = Decoder::new(FRAME_PAYLOAD_BYTES_MAX);
        let hello = Message::Hello(Hello {
            version_min: *tally_net::PROTOCOL_VERSIONS.start(),
            version_max: *tally_net::PROTOCOL_VERSIONS.end(),
            frame_payload_max: FRAME_PAYLOAD_BYTES_MAX,
            client: CLIENT_NAME.into(),
        });
        let welcome = match exchange(&connection, &mut send, &mut recv, &mut decoder, hello).await?
        {
            Message::Welcome(w) => w,
            other => return Err(unexpected(&other)),
        };
        let auth = Message::Auth {
            key: config.api_key.as_bytes().to_vec(),
        };
        let (key_id, scope) =
            match exchange(&connection, &mut send, &mut recv, &mut decoder, auth).await? {
                Message::AuthOk { key_id, scope } => (key_id, scope),
                other => return Err(unexpected(&other)),
            };
        let session = Session {
            key_id,
            scope,
            in_flight_max: welcome.in_flight_max.max(1),
            batch_items_max: welcome.batch_items_max.max(1),
        };
        let alive = Arc::new(AtomicBool::new(true));
        let pending = Arc::new(Mutex::new(Pending::default()));
        let (tx, rx) = mpsc::channel(4096);
        let permits = Arc::new(Semaphore::new(session.in_flight_max as usize));
        tokio::spawn(read_answers(
            recv,
            decoder,
            connection.clone(),
            pending.clone(),
            alive.clone(),
        ));
        tokio::spawn(write_calls(
            send,
            rx,
            pending,
            (permits, session.in_flight_max),
            alive.clone(),
            config
                .batch_max
                .min(session.batch_items_max as usize)
                .max(1),
        ));
        Ok(Conn {
            connection,
            calls: tx,
            alive,
            session,
        })
    }

    /// Sends one call and waits for its answer, retrying what may be retried.
    async fn call(&self, body: impl Fn() -> Body, retry: bool) -> Result<Message, Error> {
        let deadline = Instant::now() + self.inner.config.retry_for;
        let mut backoff = Duration::from_millis(5);
        loop {
            let result = self.call_once(body()).await;
            let result = match result {
                Ok(Message::Error(ErrorFrame { code, message })) => {
                    Err(Error::Transport { code, message })
                }
                other => other,
            };
            match result {
                Err(e) if retry && e.retryable() && Instant::now() + backoff < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    async fn call_once(&self, body: Body) -> Result<Message, Error> {
        let conn = self.connection().await?;
        let (tx, rx) = oneshot::channel();
        conn.calls
            .send(Call { body, answer: tx })
            .await
            .map_err(|_| Error::ConnectionLost("the connection's writer stopped".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(Error::ConnectionLost("the call was dropped".into())))
    }

    /// Sends any request message and returns the server's answer as it came (an `Error` frame
    /// becomes [`Error::Transport`]). Retries like every other call, except key creation.
    pub async fn send(&self, message: Message) -> Result<Message, Error> {
        let retry = !matches!(message, Message::KeyCreate { .. });
        self.call(|| Body::Other(Box::new(message.clone())), retry)
            .await
    }

    /// Applies a command; `Err(Rejected)` if the engine refused it.
    pub async fn command(&self, request: Request) -> Result<Reply, Error> {
        if let Command::Usage(event) = &request.command {
            return self.usage(request.id, event.clone()).await;
        }
        let answer = self.send(Message::Request(request)).await?;
        reply(answer)
    }

    /// Reports one usage event (batched with other concurrent usage calls).
    pub async fn usage(&self, id: RequestId, event: UsageEvent) -> Result<Reply, Error> {
        let answer = self.call(|| Body::Usage(id, event.clone()), true).await?;
        reply(answer)
    }

    /// Reserves (batched with other concurrent reserves).
    pub async fn reserve(&self, item: ReserveItem) -> Result<Reply, Error> {
        let answer = self.call(|| Body::Reserve(item.clone()), true).await?;
        reply(answer)
    }

    /// Asks a query.
    pub async fn query(&self, query: Query) -> Result<Answer, Error> {
        match self.send(Message::Query(query)).await? {
            Message::Answer(Ok(answer)) => Ok(answer),
            Message::Answer(Err(code)) => Err(Error::Rejected { code, reply: None }),
            other => Err(unexpected(&other)),
        }
    }

    /// Everything about a wallet.
    pub async fn wallet(&self, wallet: WalletId) -> Result<WalletInfo, Error> {
        match self.query(Query::Wallet { wallet }).await? {
            Answer::Wallet(info) => Ok(info),
            other => Err(Error::Protocol(format!("expected a wallet, got {other:?}"))),
        }
    }

    /// One balance.
    pub async fn balance(
        &self,
        wallet: WalletId,
        asset: tally_engine::AssetCode,
    ) -> Result<BalanceView, Error> {
        match self.query(Query::Balance { wallet, asset }).await? {
            Answer::Balance(view) => Ok(view),
            other => Err(Error::Protocol(format!(
                "expected a balance, got {other:?}"
            ))),
        }
    }

    /// Margin aggregates.
    pub async fn margin(&self, scope: MarginScope) -> Result<MarginView, Error> {
        match self.query(Query::Margin(scope)).await? {
            Answer::Margin(view) => Ok(view),
            other => Err(Error::Protocol(format!("expected margin, got {other:?}"))),
        }
    }

    /// Creates an API key (admin); returns its id and secret. Not retried once sent.
    pub async fn create_key(
        &self,
        label: tally_engine::Name,
        scope: Scope,
    ) -> Result<(u64, String), Error> {
        match self.send(Message::KeyCreate { label, scope }).await? {
            Message::KeyCreated { key_id, secret } => Ok((key_id, secret)),
            other => Err(unexpected(&other)),
        }
    }

    /// Revokes an API key (admin).
    pub async fn revoke_key(&self, key_id: u64) -> Result<(), Error> {
        match self.send(Message::KeyRevoke { key_id }).await? {
            Message::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Takes an online snapshot of every shard (admin).
    pub async fn snapshot(&self) -> Result<Vec<CheckpointInfo>, Error> {
        match self.send(Message::Snapshot).await? {
            Message::SnapshotTaken(infos) => Ok(infos),
            other => Err(unexpected(&other)),
        }
    }

    /// One round trip to the server's network layer, no shard involved: the transport's own
    /// latency.
    pub async fn ping(&self) -> Result<(), Error> {
        match self.send(Message::Ping).await? {
            Message::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// The server's health.
    pub async fn health(&self) -> Result<HealthReport, Error> {
        match self.send(Message::Health).await? {
            Message::HealthReport(report) => Ok(report),
            other => Err(unexpected(&other)),
        }
    }
}

fn reply(answer: Message) -> Result<Reply, Error> {
    match answer {
        Message::Reply(reply) if reply.code.is_ok() => Ok(reply),
        Message::Reply(reply) => Err(Error::Rejected {
            code: reply.code,
            reply: Some(reply),
        }),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(message: &Message) -> Error {
    match message {
        Message::Error(ErrorFrame { code, message }) => Error::Transport {
            code: *code,
            message: message.clone(),
        },
        other => Error::Protocol(format!("unexpected {} frame", other.kind())),
    }
}

/// The error a broken connection means: the server's close code when it gave one.
fn connection_error(e: &quinn::ConnectionError) -> Error {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let number = close.error_code.into_inner();
            match u16::try_from(number).ok().and_then(ErrorCode::from_u16) {
                Some(code) => Error::Transport {
                    code,
                    message: String::from_utf8_lossy(&close.reason).into_owned(),
                },
                None => Error::ConnectionLost(format!("closed by the server ({number})")),
            }
        }
        // Refused before the handshake: the server has its most connections (or handshakes).
        quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            Error::Transport {
                code: ErrorCode::TooManyConnections,
                message: "the server refused the connection before the handshake: it has its \
                          most connections open or in their handshake"
                    .into(),
            }
        }
        other => Error::ConnectionLost(other.to_string()),
    }
}

fn connect_error(e: &quinn::ConnectionError) -> Error {
    match connection_error(e) {
        Error::ConnectionLost(why) => Error::Connect(why),
        other => other,
    }
}

/// Writes one handshake frame and reads its answer.
async fn exchange(
    connection: &Connection,
    send: &mut SendStream,
    recv: &mut RecvStream,
    decoder: &mut Decoder,
    message: Message,
) -> Result<Message, Error> {
    let mut buf = Vec::new();
    message
        .encode(0, &mut buf)
        .map_err(|e| Error::Config(e.to_string()))?;
    let lost = |connection: &Connection, fallback: String| match connection.close_reason() {
        Some(reason) => connect_error(&reason),
        None => Error::Connect(fallback),
    };
    send.write_all(&buf)
        .await
        .map_err(|e| lost(connection, e.to_string()))?;
    loop {
        if let Some(frame) = decoder
            .next_frame()
            .map_err(|e| Error::Protocol(e.to_string()))?
        {
            let message = Message::decode(&frame).map_err(|e| Error::Protocol(e.to_string()))?;
            return match message {
                Message::Error(ErrorFrame { code, message }) => {
                    Err(Error::Transport { code, message })
                }
                other => Ok(other),
            };
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => decoder.feed(&chunk.bytes),
            Ok(None) => return Err(lost(connection, "the server ended the stream".into())),
            Err(e) => {
                // Let a close frame that is on its way arrive, so its code can be reported.
                let _ = tokio::time::timeout(Duration::from_millis(200), connection.closed()).await;
                return Err(lost(connection, e.to_string()));
            }
        }
    }
}

fn fail_all(pending: &Mutex<Pending>, error: Error) {
    let waiters = {
        let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.closed.is_none() {
            pending.closed = Some(error.clone());
        }
        std::mem::take(&mut pending.waiters)
    };
    for (_, waiter) in waiters {
        deliver(waiter.targets, Err(error.clone()));
    }
}

fn deliver(targets: Targets, answer: Result<Message, Error>) {
    match targets {
        Targets::One(tx) => {
            let _ = tx.send(answer);
        }
        Targets::Many(txs) => match answer {
            Ok(Message::BatchReply(outcomes)) if outcomes.len() == txs.len() => {
                for (tx, outcome) in txs.into_iter().zip(outcomes) {
                    let _ = tx.send(Ok(match outcome {
                        Ok(reply) => Message::Reply(reply),
                        Err(code) => Message::Error(ErrorFrame {
                            code,
                            message: code.name().into(),
                        }),
                    }));
                }
            }
            Ok(Message::BatchReply(outcomes)) => {
                let error = Error::Protocol(format!(
                    "a batch of {} was answered with {} outcomes",
                    txs.len(),
                    outcomes.len()
                ));
                for tx in txs {
                    let _ = tx.send(Err(error.clone()));
                }
            }
            other => {
                for tx in txs {
                    let _ = tx.send(other.clone());
                }
            }
        },
    }
}

async fn read_answers(
    mut recv: RecvStream,
    mut decoder: Decoder,
    connection: Connection,
    pending: Arc<Mutex<Pending>>,
    alive: Arc<AtomicBool>,
) {
    let why = 'read: loop {
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => break 'read Error::Protocol(format!("the answer stream broke: {e}")),
            };
            let id = frame.header.request_id;
            let answer = Message::decode(&frame).map_err(|e| Error::Protocol(e.to_string()));
            let waiter = pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .waiters
                .remove(&id);
            match (waiter, answer) {
                (Some(waiter), answer) => deliver(waiter.targets, answer),
                // A connection-level error (id 0) ends the connection; say why.
                (None, Ok(Message::Error(ErrorFrame { code, message }))) => {
                    break 'read Error::Transport { code, message };
                }
                (None, _) => {}
            }
        }
        match recv.read_chunk(256 * 1024, true).await {
            Ok(Some(chunk)) => decoder.feed(&chunk.bytes),
            Ok(None) => break Error::ConnectionLost("the server ended the stream".into()),
            Err(e) => {
                let _ = tokio::time::timeout(Duration::from_millis(200), connection.closed()).await;
                break match connection.close_reason() {
                    Some(reason) => connection_error(&reason),
                    None => Error::ConnectionLost(e.to_string()),
                };
            }
        }
    };
    alive.store(false, Ordering::Release);
    fail_all(&pending, why);
}

static NEXT_FRAME_ID: AtomicU64 = AtomicU64::new(1);

async fn write_calls(
    mut send: SendStream,
    mut rx: mpsc::Receiver<Call>,
    pending: Arc<Mutex<Pending>>,
    (permits, permits_total): (Arc<Semaphore>, u32),
    alive: Arc<AtomicBool>,
    batch_max: usize,
) {
    let mut calls: Vec<Call> = Vec::new();
    let mut buf = Vec::new();
    while let Some(first) = rx.recv().await {
        calls.push(first);
        while calls.len() < batch_max {
            match rx.try_recv() {
                Ok(call) => calls.push(call),
                Err(_) => break,
            }
        }
        for (message, targets) in frames(&mut calls) {
            // The server counts in-flight items, not frames: a batch takes a permit per item
            // (all of them at most: one batch always fits on an idle connection).
            let items = match &message {
                Message::UsageBatch(items) => items.len(),
                Message::ReserveBatch(items) => items.len(),
                _ => 1,
            };
            let items = (items.max(1) as u64).min(u64::from(permits_total)) as u32;
            let Ok(permit) = permits.clone().acquire_many_owned(items).await else {
                return;
            };
            let id = NEXT_FRAME_ID.fetch_add(1, Ordering::Relaxed);
            let start = buf.len();
            if let Err(e) = message.encode(id, &mut buf) {
                buf.truncate(start);
                deliver(targets, Err(Error::Protocol(format!("cannot encode: {e}"))));
                continue;
            }
            let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(why) = &p.closed {
                let why = why.clone();
                drop(p);
                buf.truncate(start);
                deliver(targets, Err(why));
                continue;
            }
            p.waiters.insert(
                id,
                Waiter {
                    targets,
                    _permit: permit,
                },
            );
        }
        if !buf.is_empty() {
            if let Err(e) = send.write_all(&buf).await {
                alive.store(false, Ordering::Release);
                fail_all(&pending, Error::ConnectionLost(e.to_string()));
            }
            buf.clear();
        }
        if !alive.load(Ordering::Acquire) {
            // Calls still queued find the connection closed and are failed (and retried).
            let why = pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .closed
                .clone()
                .unwrap_or_else(|| Error::ConnectionLost("the connection ended".into()));
            rx.close();
            while let Ok(call) = rx.try_recv() {
                let _ = call.answer.send(Err(why.clone()));
            }
            return;
        }
    }
    let _ = send.finish();
}

/// Groups waiting calls into frames: runs of usage events (or reserves) become one batch frame.
fn frames(calls: &mut Vec<Call>) -> Vec<(Message, Targets)> {
    let mut out = Vec::new();
    let mut drain = calls.drain(..).peekable();
    while let Some(call) = drain.next() {
        match call.body {
            Body::Other(message) => out.push((*message, Targets::One(call.answer))),
            Body::Usage(id, event) => {
                let mut items = vec![(id, event)];
                let mut txs = vec![call.answer];
                while let Some(next) = drain.next_if(|c| matches!(c.body, Body::Usage(..))) {
                    if let Body::Usage(id, event) = next.body {
                        items.push((id, event));
                        txs.push(next.answer);
                    }
                }
                if items.len() == 1 {
                    let (id, event) = items.pop().expect("one item");
                    out.push((
                        Message::Request(Request {
                            id,
                            command: Command::Usage(event),
                        }),
                        Targets::One(txs.pop().expect("one sender")),
                    ));
                } else {
                    out.push((Message::UsageBatch(items), Targets::Many(txs)));
                }
            }
            Body::Reserve(item) => {
                let mut items = vec![item];
                let mut txs = vec![call.answer];
                while let Some(next) = drain.next_if(|c| matches!(c.body, Body::Reserve(..))) {
                    if let Body::Reserve(item) = next.body {
                        items.push(item);
                        txs.push(next.answer);
                    }
                }
                if items.len() == 1 {
                    let item = items.pop().expect("one item");
                    out.push((
                        Message::Request(item.into()),
                        Targets::One(txs.pop().expect("one sender")),
                    ));
                } else {
                    out.push((Message::ReserveBatch(items), Targets::Many(txs)));
                }
            }
        }
    }
    out
}
