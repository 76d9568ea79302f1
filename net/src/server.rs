//! The QUIC server: connections, streams, the handshake, authentication, limits, and the
//! hand-off of decoded requests to a [`Backend`] (in `tally serve`, the shards).
//!
//! One task per connection accepts bidirectional streams; each stream has a reader task and a
//! writer task joined by a bounded queue. The reader decodes frames and queues each request with
//! the backend at once, in the order it arrived (so requests for one wallet keep their order),
//! then hands the writer a future of its answer. The writer writes answers in request order,
//! coalescing the ones already done into one write.
//!
//! Memory per connection is bounded. A connection may have `in_flight_max` requests unanswered
//! (more are answered `TooManyInFlight` at once); each stream's queue holds at most
//! `in_flight_max` answers. A client that stops reading fills its stream's flow-control window,
//! the writer waits, the queue fills, the reader stops reading, and QUIC flow control stops the
//! client's writes: nothing grows without bound. Catalog commands, key changes and snapshots are
//! awaited by the reader before it reads on, so a stream never overtakes them.
//!
//! Connection slots cannot be held by clients that never authenticate. A connection takes a
//! slot from its first packet. When the open and handshaking connections reach
//! `connections_max`, a new one closes the oldest connection that has finished its handshake
//! but not authenticated (`Unauthenticated`, "closed to make room"); if there is none, it is
//! refused before the TLS handshake (QUIC `CONNECTION_REFUSED`, which costs the server no
//! cryptography). At most `unauthenticated_max` connections may wait for their `Auth` (a new one
//! closes the oldest), and at most `unauthenticated_max` may be in their handshake; past half of
//! that, a client must first prove it owns its address with a stateless QUIC Retry, so forged
//! Initial packets cannot fill the handshake slots, and a handshake must finish within
//! `auth_deadline`, as must the `Auth` after it. A client that authenticates within a round trip
//! of its handshake therefore gets in whenever some slot is held by a connection without a key.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tally_engine::{Command, Query, QueryReply, Reply, Request, ResultCode};
use tokio::sync::mpsc;

use crate::error::ErrorCode;
use crate::frame::{DecodeError, Decoder, Frame, Kind, FRAME_PAYLOAD_BYTES_MAX};
use crate::keys::{KeyError, KeyStore, LiveKey};
use crate::message::{
    Answer, CheckpointInfo, ErrorFrame, HealthReport, Message, Outcome, Scope, Welcome,
    BATCH_ITEMS_MAX, PROTOCOL_VERSIONS,
};
use crate::tls::TlsError;

/// A boxed future, as the [`Backend`] returns them.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What the server hands requests to. Every method queues its work *before* it returns (the
/// future only waits for the answer), so requests keep the order they arrived in.
pub trait Backend: Send + Sync + 'static {
    /// Queues one command; the future resolves once its reply is durable.
    fn command(&self, request: Request) -> BoxFuture<Result<Reply, ErrorCode>>;
    /// Queues many wallet commands (a batch frame); one outcome per request, in order.
    fn batch(&self, requests: Vec<Request>) -> BoxFuture<Result<Vec<Outcome>, ErrorCode>>;
    /// Queues a query.
    fn query(&self, query: Query) -> BoxFuture<Result<Result<QueryReply, ResultCode>, ErrorCode>>;
    /// Queues a listing of one page of one shard's wallets, in creation order, from position
    /// `from` (0 for the first page, then the previous page's `next`), of at most `limit`
    /// wallets matching `filter` (see `tally_engine::Engine::list_wallets`: `limit` is capped at
    /// `WALLET_PAGE_MAX`, 0 counts as 1, and one call looks at no more than `WALLET_SCAN_MAX`
    /// wallets, so a page may be short or empty while `next` is still set). Like a query, it
    /// sees every request queued before it and resolves once those are durable. A `shard` not
    /// below the shard count (see [`Backend::shards`]) is answered [`ErrorCode::Malformed`].
    fn list_wallets(
        &self,
        shard: u32,
        from: u32,
        limit: u32,
        filter: tally_engine::WalletFilter,
    ) -> BoxFuture<Result<tally_engine::WalletPage, ErrorCode>>;
    /// Takes a checkpoint of every shard now.
    fn snapshot(&self) -> BoxFuture<Result<Vec<CheckpointInfo>, String>>;
    /// Shards configured, and shards whose loop is running.
    fn shards(&self) -> (u32, u32);
    /// How far each effect sink is behind (for health reports).
    fn sinks(&self) -> Vec<crate::message::SinkLag>;
}

/// The server's limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most connections open or in their handshake at once; more are refused before the TLS
    /// handshake (the client reports `TooManyConnections`).
    pub connections_max: u32,
    /// Most connections in their handshake or not yet authenticated; beyond it a new connection
    /// closes the oldest unauthenticated one (or is refused while all are handshaking).
    pub unauthenticated_max: u32,
    /// Most bidirectional streams a connection may have open (QUIC stream credit: a client
    /// cannot open more until one ends).
    pub streams_max: u32,
    /// Most request items a connection may have unanswered (a batch counts each of its items);
    /// more are answered `TooManyInFlight`, except that one frame always fits on a connection
    /// with nothing in flight.
    pub in_flight_max: u32,
    /// Largest frame payload accepted.
    pub frame_payload_max: u32,
    /// Most items in one batch frame.
    pub batch_items_max: u32,
    /// A connection with no traffic (not even keep-alives) for this long is closed.
    pub idle_timeout: Duration,
    /// A connection must authenticate within this long of its handshake, or it is closed
    /// (`Unauthenticated`): slots cannot be held by clients that never do.
    pub auth_deadline: Duration,
    /// Largest frame payload accepted before the connection authenticated (`Hello` and `Auth`
    /// are small): an unauthenticated client cannot make the server buffer large frames.
    pub pre_auth_payload_max: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections_max: 1024,
            unauthenticated_max: 256,
            streams_max: 64,
            in_flight_max: 16_384,
            frame_payload_max: FRAME_PAYLOAD_BYTES_MAX,
            batch_items_max: BATCH_ITEMS_MAX as u32,
            idle_timeout: Duration::from_secs(30),
            auth_deadline: Duration::from_secs(10),
            pre_auth_payload_max: 4096,
        }
    }
}

/// Counters of what the server refused.
#[derive(Debug, Default)]
struct Stats {
    connections_open: AtomicU64,
    /// Connections accepted whose handshake has not finished.
    handshaking: AtomicU64,
    /// Open connections closed to make room whose tasks have not ended yet.
    closing: AtomicU64,
    connections_refused: AtomicU64,
    /// Unauthenticated connections closed to make room for a new one.
    evicted_unauthenticated: AtomicU64,
    rejected_unauthenticated: AtomicU64,
    rejected_key: AtomicU64,
    rejected_scope: AtomicU64,
    malformed: AtomicU64,
}

/// A copy of the server's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections open now.
    pub connections_open: u64,
    /// Connections refused or closed at once because the limit was reached.
    pub connections_refused: u64,
    /// Unauthenticated connections closed to make room for a new one (`unauthenticated_max`).
    pub evicted_unauthenticated: u64,
    /// Requests before a successful `Auth`.
    pub rejected_unauthenticated: u64,
    /// Unknown or revoked keys.
    pub rejected_key: u64,
    /// Requests outside the key's scope.
    pub rejected_scope: u64,
    /// Frames whose payload did not decode, or that broke a stream's framing.
    pub malformed: u64,
}

struct Shared {
    backend: Arc<dyn Backend>,
    keys: Arc<KeyStore>,
    limits: Limits,
    stats: Stats,
    started: Instant,
    /// Connections past their handshake that have not authenticated, oldest first.
    unauthenticated: Mutex<VecDeque<Arc<ConnState>>>,
    serial: AtomicU64,
}

impl Shared {
    fn unauthenticated(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<ConnState>>> {
        self.unauthenticated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Closes the oldest connection that has not authenticated, to make room; false if there
    /// is none. Its slot counts as free from now on (`closing`), though it is given back only
    /// when its task ends.
    fn evict_oldest(&self, waiting: &mut VecDeque<Arc<ConnState>>, why: &str) -> bool {
        while let Some(oldest) = waiting.pop_front() {
            // Authentication takes the same lock to set the key and leave the queue, so a
            // connection here has no key; checked anyway, as it costs nothing.
            if oldest.key.get().is_some() || oldest.evicted.swap(true, Ordering::AcqRel) {
                continue;
            }
            self.stats.closing.fetch_add(1, Ordering::AcqRel);
            self.stats
                .evicted_unauthenticated
                .fetch_add(1, Ordering::Relaxed);
            auth_failure("evicted");
            close(&oldest.conn, ErrorCode::Unauthenticated, why);
            return true;
        }
        false
    }

    /// A connection finished its handshake: it waits for its `Auth` among the unauthenticated,
    /// closing the oldest of them if they are at their most.
    fn enter_unauthenticated(&self, state: &Arc<ConnState>) {
        let max = self.limits.unauthenticated_max.max(1) as usize;
        let mut waiting = self.unauthenticated();
        while waiting.len() >= max {
            if !self.evict_oldest(
                &mut waiting,
                "closed to make room: too many connections have not authenticated",
            ) {
                break;
            }
        }
        waiting.push_back(Arc::clone(state));
    }

    /// A connection authenticated: its key is set and it leaves the queue under one lock, so it
    /// cannot be closed to make room once its `Auth` succeeded. False if it was closed already.
    fn authenticate(&self, conn: &ConnState, live: Arc<LiveKey>) -> bool {
        let mut waiting = self.unauthenticated();
        if conn.evicted.load(Ordering::Acquire) {
            return false;
        }
        // Two streams racing to authenticate: the first wins; both were valid.
        let _ = conn.key.set(live);
        if let Some(at) = waiting.iter().position(|s| s.serial == conn.serial) {
            waiting.remove(at);
        }
        true
    }

    /// A connection ended.
    fn leave_unauthenticated(&self, serial: u64) {
        let mut waiting = self.unauthenticated();
        if let Some(at) = waiting.iter().position(|s| s.serial == serial) {
            waiting.remove(at);
        }
    }

    fn refuse(&self, incoming: quinn::Incoming) {
        self.stats
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tally_connections_refused_total", "transport" => "quic").increment(1);
        incoming.refuse();
    }
}

/// A running QUIC listener.
#[derive(Debug)]
pub struct NetServer {
    endpoint: Endpoint,
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("limits", &self.limits)
            .finish()
    }
}

/// The name the server gives in `Welcome` and `HealthReport`.
pub const SERVER_NAME: &str = concat!("tally/", env!("CARGO_PKG_VERSION"));

impl NetServer {
    /// Binds `listen` and starts accepting connections. Must be called inside a tokio runtime.
    pub fn start(
        listen: SocketAddr,
        crypto: rustls::ServerConfig,
        limits: Limits,
        backend: Arc<dyn Backend>,
        keys: Arc<KeyStore>,
    ) -> Result<NetServer, TlsError> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
            .map_err(|e| TlsError(format!("the TLS configuration cannot serve QUIC: {e}")))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(VarInt::from_u32(limits.streams_max))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            // What a client can make the server buffer before flow control stops it: 1 MiB per
            // stream, 4 MiB per connection (a large frame streams through these windows into
            // the stream's decoder, which holds at most one frame).
            .stream_receive_window(VarInt::from_u32(1 << 20))
            .receive_window(VarInt::from_u32(4 << 20))
            .send_window(4 << 20)
            .max_idle_timeout(Some(
                limits
                    .idle_timeout
                    .try_into()
                    .map_err(|_| TlsError("idle timeout out of range".into()))?,
            ));
        config.transport_config(Arc::new(transport));
        let endpoint = Endpoint::server(config, listen)
            .map_err(|e| TlsError(format!("cannot listen on {listen}: {e}")))?;
        let addr = endpoint
            .local_addr()
            .map_err(|e| TlsError(format!("cannot read the listening address: {e}")))?;
        let shared = Arc::new(Shared {
            backend,
            keys,
            limits,
            stats: Stats::default(),
            started: Instant::now(),
            unauthenticated: Mutex::new(VecDeque::new()),
            serial: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        Ok(NetServer {
            endpoint,
            addr,
            shared,
            accept,
        })
    }

    /// The address it listens on (with the port chosen, if `:0` was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.shared.stats;
        StatsSnapshot {
            connections_open: s.connections_open.load(Ordering::Relaxed),
            connections_refused: s.connections_refused.load(Ordering::Relaxed),
            evicted_unauthenticated: s.evicted_unauthenticated.load(Ordering::Relaxed),
            rejected_unauthenticated: s.rejected_unauthenticated.load(Ordering::Relaxed),
            rejected_key: s.rejected_key.load(Ordering::Relaxed),
            rejected_scope: s.rejected_scope.load(Ordering::Relaxed),
            malformed: s.malformed.load(Ordering::Relaxed),
        }
    }

    /// Closes every connection (code `Stopped`) and waits until the peers were told.
    pub async fn shutdown(self) {
        self.accept.abort();
        self.endpoint.close(
            VarInt::from_u32(ErrorCode::Stopped as u32),
            b"the server is shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

async fn accept_loop(endpoint: Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let stats = &shared.stats;
        let handshakes_max = u64::from(shared.limits.unauthenticated_max.max(1));
        let handshaking = stats.handshaking.load(Ordering::Acquire);
        // Many handshakes at once: a client must first show it receives at its address (a
        // stateless Retry, which keeps nothing here), so forged Initials cannot hold the slots.
        if handshaking >= handshakes_max.div_ceil(2)
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            let _ = incoming.retry();
            continue;
        }
        // Handshakes cannot be closed to make room: past their most, refuse.
        if handshaking >= handshakes_max {
            shared.refuse(incoming);
            continue;
        }
        // Full: close the oldest connection that has not authenticated, or refuse before any
        // cryptography if every slot is held by a client with a key (or a handshake).
        let taken = (stats.connections_open.load(Ordering::Acquire) + handshaking)
            .saturating_sub(stats.closing.load(Ordering::Acquire));
        if taken >= u64::from(shared.limits.connections_max)
            && !shared.evict_oldest(
                &mut shared.unauthenticated(),
                "closed to make room: the server is full and this connection has not authenticated",
            )
        {
            shared.refuse(incoming);
            continue;
        }
        stats.handshaking.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(serve_connection(incoming, shared.clone()));
    }
}

/// Per-connection state shared by its streams.
struct ConnState {
    conn: Connection,
    /// Its number among this server's connections.
    serial: u64,
    /// Closed to make room (its slot counts as free already).
    evicted: Arc<AtomicBool>,
    hello: AtomicBool,
    key: OnceLock<Arc<LiveKey>>,
    /// Largest answer payload the client accepts (from `Hello`).
    peer_payload_max: AtomicU32,
    in_flight: Arc<AtomicU32>,
}

struct OpenGuard<'a>(&'a Shared, u64, Arc<AtomicBool>);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        let stats = &self.0.stats;
        stats.connections_open.fetch_sub(1, Ordering::AcqRel);
        if self.2.load(Ordering::Acquire) {
            stats.closing.fetch_sub(1, Ordering::AcqRel);
        }
        self.0.leave_unauthenticated(self.1);
        metrics::gauge!("tally_connections_open", "transport" => "quic").decrement(1.0);
    }
}

fn auth_failure(reason: &'static str) {
    metrics::counter!("tally_auth_failures_total", "transport" => "quic", "reason" => reason)
        .increment(1);
}

fn close(conn: &Connection, code: ErrorCode, reason: &str) {
    conn.close(VarInt::from_u32(code as u32), reason.as_bytes());
}

async fn serve_connection(incoming: quinn::Incoming, shared: Arc<Shared>) {
    // A handshake, too, must finish in time, or its slot is given back.
    let handshake = tokio::time::timeout(shared.limits.auth_deadline, incoming).await;
    let stats = &shared.stats;
    // Counted as open before it stops counting as handshaking, so the accept loop never sees
    // the slot free in between.
    stats.connections_open.fetch_add(1, Ordering::AcqRel);
    stats.handshaking.fetch_sub(1, Ordering::AcqRel);
    let serial = shared.serial.fetch_add(1, Ordering::Relaxed);
    metrics::gauge!("tally_connections_open", "transport" => "quic").increment(1.0);
    let evicted = Arc::new(AtomicBool::new(false));
    let _guard = OpenGuard(&shared, serial, Arc::clone(&evicted));
    let Ok(Ok(conn)) = handshake else { return };
    let state = Arc::new(ConnState {
        conn: conn.clone(),
        serial,
        evicted,
        hello: AtomicBool::new(false),
        key: OnceLock::new(),
        peer_payload_max: AtomicU32::new(FRAME_PAYLOAD_BYTES_MAX),
        in_flight: Arc::new(AtomicU32::new(0)),
    });
    shared.enter_unauthenticated(&state);
    // Authenticate in time or give the slot back.
    tokio::spawn({
        let state = state.clone();
        let deadline = shared.limits.auth_deadline;
        async move {
            tokio::select! {
                _ = tokio::time::sleep(deadline) => {}
                // Gone before the deadline: nothing to do, and nothing kept alive.
                _ = state.conn.closed() => return,
            }
            if state.key.get().is_none() {
                auth_failure("deadline");
                close(
                    &state.conn,
                    ErrorCode::Unauthenticated,
                    &format!("no successful Auth within {} ms", deadline.as_millis()),
                );
            }
        }
    });
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(serve_stream(send, recv, state.clone(), shared.clone()));
    }
}

/// What the writer gets: an answer now, or one to wait for.
enum Out {
    Now(u64, Box<Message>),
    Later(u64, BoxFuture<Message>),
    /// Write this error, then close the connection with its code.
    Close(u64, ErrorFrame),
}

fn now(id: u64, message: Message) -> Out {
    Out::Now(id, Box::new(message))
}

fn error(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error(ErrorFrame {
        code,
        message: message.into(),
    })
}

async fn serve_stream(
    send: SendStream,
    mut recv: RecvStream,
    conn: Arc<ConnState>,
    shared: Arc<Shared>,
) {
    let (tx, rx) = mpsc::channel::<Out>(shared.limits.in_flight_max.max(1) as usize);
    let writer = tokio::spawn(write_answers(send, rx, conn.clone()));
    let mut decoder = Decoder::new(shared.limits.pre_auth_payload_max);
    'read: loop {
        let chunk = match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            // Finished (a partial frame at the end is ignored), reset, or the connection ended.
            Ok(None) | Err(_) => break,
        };
        decoder.feed(&chunk);
        loop {
            // Small frames only until the connection has authenticated.
            decoder.set_payload_max(if conn.key.get().is_some() {
                shared.limits.frame_payload_max
            } else {
                shared.limits.pre_auth_payload_max
            });
            let out = match decoder.next_frame() {
                Ok(Some(frame)) => step(&frame, &conn, &shared).await,
                Ok(None) => break,
                Err(e) => {
                    shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    let code = match e {
                        DecodeError::UnknownKind(_) => ErrorCode::UnknownKind,
                        DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
                        DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                        _ => ErrorCode::Malformed,
                    };
                    let _ = tx
                        .send(Out::Now(0, Box::new(error(code, e.to_string()))))
                        .await;
                    // The framing is lost: stop reading; the writer finishes the stream.
                    let _ = recv.stop(VarInt::from_u32(code as u32));
                    break 'read;
                }
            };
            let closing = matches!(out, Out::Close(..));
            if tx.send(out).await.is_err() || closing {
                break 'read;
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Handles one frame: checks the phase, the key and its scope, decodes, and queues the work.
async fn step(frame: &Frame<'_>, conn: &ConnState, shared: &Shared) -> Out {
    let id = frame.header.request_id;
    let kind = frame.header.kind;
    let stats = &shared.stats;
    let violation = |why: String| {
        Out::Close(
            id,
            ErrorFrame {
                code: ErrorCode::ProtocolViolation,
                message: why,
            },
        )
    };
    match kind {
        Kind::Hello => {
            let Ok(Message::Hello(hello)) = Message::decode(frame) else {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                return violation("Hello does not decode".into());
            };
            if conn.hello.swap(true, Ordering::AcqRel) {
                return violation("a second Hello".into());
            }
            let Some(version) = hello.choose_version(PROTOCOL_VERSIONS) else {
                return Out::Close(
                    id,
                    ErrorFrame {
                        code: ErrorCode::UnsupportedVersion,
                        message: format!(
                            "the client speaks versions {}..={}, the server {}..={}",
                            hello.version_min,
                            hello.version_max,
                            PROTOCOL_VERSIONS.start(),
                            PROTOCOL_VERSIONS.end()
                        ),
                    },
                );
            };
            conn.peer_payload_max
                .store(hello.frame_payload_max, Ordering::Relaxed);
            now(
                id,
                Message::Welcome(Welcome {
                    version,
                    frame_payload_max: shared.limits.frame_payload_max,
                    in_flight_max: shared.limits.in_flight_max,
                    batch_items_max: shared.limits.batch_items_max,
                    server: SERVER_NAME.into(),
                }),
            )
        }
        Kind::Auth => {
            if !conn.hello.load(Ordering::Acquire) {
                return violation("Auth before Hello".into());
            }
            if conn.key.get().is_some() {
                return violation("a second Auth".into());
            }
            let Ok(Message::Auth { key }) = Message::decode(frame) else {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                return violation("Auth does not decode".into());
            };
            match shared.keys.authenticate(&key) {
                Some(live) => {
                    let answer = Message::AuthOk {
                        key_id: live.id,
                        scope: live.scope,
                    };
                    if !shared.authenticate(conn, live) {
                        return Out::Close(
                            id,
                            ErrorFrame {
                                code: ErrorCode::Unauthenticated,
                                message: "closed to make room before Auth arrived".into(),
                            },
                        );
                    }
                    now(id, answer)
                }
                None => {
                    stats.rejected_key.fetch_add(1, Ordering::Relaxed);
                    auth_failure("invalid_key");
                    Out::Close(
                        id,
                        ErrorFrame {
                            code: ErrorCode::InvalidKey,
                            message: "unknown or revoked API key".into(),
                        },
                    )
                }
            }
        }
        Kind::Welcome
        | Kind::AuthOk
        | Kind::Error
        | Kind::Reply
        | Kind::BatchReply
        | Kind::Answer
        | Kind::KeyCreated
        | Kind::Done
        | Kind::SnapshotTaken
        | Kind::HealthReport => violation(format!("{kind} is a server-to-client kind")),
        _ => request(id, frame, conn, shared).await,
    }
}

async fn request(id: u64, frame: &Frame<'_>, conn: &ConnState, shared: &Shared) -> Out {
    let stats = &shared.stats;
    let kind = frame.header.kind;
    let Some(key) = conn.key.get() else {
        stats
            .rejected_unauthenticated
            .fetch_add(1, Ordering::Relaxed);
        auth_failure("missing");
        return now(
            id,
            error(
                ErrorCode::Unauthenticated,
                "send Hello and Auth before any request",
            ),
        );
    };
    if key.is_revoked() {
        stats.rejected_key.fetch_add(1, Ordering::Relaxed);
        auth_failure("invalid_key");
        return Out::Close(
            id,
            ErrorFrame {
                code: ErrorCode::InvalidKey,
                message: format!("API key {} was revoked", key.id),
            },
        );
    }
    if kind.admin_only() && key.scope != Scope::Admin {
        stats.rejected_scope.fetch_add(1, Ordering::Relaxed);
        auth_failure("scope");
        return now(
            id,
            error(
                ErrorCode::OutOfScope,
                format!("{kind} needs an admin key; key {} is gateway", key.id),
            ),
        );
    }
    let message = match Message::decode(frame) {
        Ok(message) => message,
        Err(e) => {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return now(id, error(ErrorCode::Malformed, e.to_string()));
        }
    };
    // In flight counts items, not frames: a batch of 8,192 events is 8,192. A frame that does
    // not fit is refused, except on a connection with nothing in flight (one batch of at most
    // `batch_items_max` always fits), so decoding can never run ahead of applying unbounded.
    let weight = match &message {
        Message::UsageBatch(items) => items.len(),
        Message::ReserveBatch(items) => items.len(),
        _ => 1,
    }
    .clamp(1, u32::MAX as usize) as u32;
    let in_flight = conn.in_flight.fetch_add(weight, Ordering::AcqRel);
    if in_flight > 0 && in_flight.saturating_add(weight) > shared.limits.in_flight_max {
        conn.in_flight.fetch_sub(weight, Ordering::AcqRel);
        return now(
            id,
            error(
                ErrorCode::TooManyInFlight,
                format!(
                    "the connection has {} requests unanswered (the most allowed)",
                    shared.limits.in_flight_max
                ),
            ),
        );
    }
    // From here the writer releases the in-flight slot once the answer is written (one per
    // answer; a batch's other items when its answer is ready, below).
    let backend = &shared.backend;
    let out = match message {
        Message::Request(request) => {
            // Catalog commands reach every shard, and a refund may read the history store
            // before it is queued: later requests on this stream wait for either, so requests
            // are still applied in stream order.
            let catalog = request.command.wallet().is_none()
                || matches!(request.command, Command::Refund { .. });
            let reply = backend.command(request);
            let fut: BoxFuture<Message> = Box::pin(async move {
                match reply.await {
                    Ok(reply) => Message::Reply(reply),
                    Err(code) => error(code, code.name()),
                }
            });
            if catalog {
                Out::Later(id, Box::pin(std::future::ready(fut.await)))
            } else {
                Out::Later(id, fut)
            }
        }
        Message::UsageBatch(items) => batch(
            id,
            shared,
            items
                .into_iter()
                .map(|(id, event)| Request {
                    id,
                    command: Command::Usage(event),
                })
                .collect(),
        ),
        Message::ReserveBatch(items) => {
            batch(id, shared, items.into_iter().map(Request::from).collect())
        }
        Message::Query(query) => {
            let answer = backend.query(query);
            Out::Later(
                id,
                Box::pin(async move {
                    match answer.await {
                        Ok(Ok(reply)) => Message::Answer(Ok(Answer::from(&reply))),
                        Ok(Err(code)) => Message::Answer(Err(code)),
                        Err(code) => error(code, code.name()),
                    }
                }),
            )
        }
        Message::KeyCreate { label, scope } => {
            let keys = shared.keys.clone();
            let made =
                tokio::task::spawn_blocking(move || keys.create(label.as_str(), scope)).await;
            let answer = match made {
                Ok(Ok((key_id, secret))) => Message::KeyCreated { key_id, secret },
                Ok(Err(e)) => key_error(e),
                Err(e) => error(ErrorCode::KeyStoreFailed, e.to_string()),
            };
            Out::Later(id, Box::pin(std::future::ready(answer)))
        }
        Message::KeyRevoke { key_id } => {
            let keys = shared.keys.clone();
            let revoked = tokio::task::spawn_blocking(move || keys.revoke(key_id)).await;
            let answer = match revoked {
                Ok(Ok(())) => Message::Done,
                Ok(Err(e)) => key_error(e),
                Err(e) => error(ErrorCode::KeyStoreFailed, e.to_string()),
            };
            Out::Later(id, Box::pin(std::future::ready(answer)))
        }
        Message::Snapshot => {
            let answer = match backend.snapshot().await {
                Ok(infos) => Message::SnapshotTaken(infos),
                Err(why) => error(ErrorCode::SnapshotFailed, why),
            };
            Out::Later(id, Box::pin(std::future::ready(answer)))
        }
        // The transport's own round trip: no shard, no allocation beyond the answer frame.
        Message::Ping => Out::Later(id, Box::pin(std::future::ready(Message::Done))),
        Message::Health => {
            let (shards, shards_running) = backend.shards();
            let s = &shared.stats;
            let report = HealthReport {
                shards,
                shards_running,
                uptime_us: shared.started.elapsed().as_micros() as u64,
                connections_open: s.connections_open.load(Ordering::Relaxed),
                rejected_unauthenticated: s.rejected_unauthenticated.load(Ordering::Relaxed),
                rejected_key: s.rejected_key.load(Ordering::Relaxed),
                rejected_scope: s.rejected_scope.load(Ordering::Relaxed),
                server: SERVER_NAME.into(),
                sinks: backend.sinks(),
            };
            Out::Later(
                id,
                Box::pin(std::future::ready(Message::HealthReport(report))),
            )
        }
        // Only request kinds reach here (the caller handled the rest), but never panic on it.
        other => {
            conn.in_flight.fetch_sub(weight, Ordering::AcqRel);
            now(
                id,
                error(
                    ErrorCode::ProtocolViolation,
                    format!("{} is not a request", other.kind()),
                ),
            )
        }
    };
    match out {
        Out::Later(id, fut) if weight > 1 => {
            let counter = Arc::clone(&conn.in_flight);
            Out::Later(
                id,
                Box::pin(async move {
                    let message = fut.await;
                    counter.fetch_sub(weight - 1, Ordering::AcqRel);
                    message
                }),
            )
        }
        other => other,
    }
}

fn batch(id: u64, shared: &Shared, requests: Vec<Request>) -> Out {
    if requests.len() > shared.limits.batch_items_max as usize {
        return Out::Later(
            id,
            Box::pin(std::future::ready(error(
                ErrorCode::RequestTooLarge,
                format!(
                    "{} items; the most in one batch frame is {}",
                    requests.len(),
                    shared.limits.batch_items_max
                ),
            ))),
        );
    }
    let outcomes = shared.backend.batch(requests);
    Out::Later(
        id,
        Box::pin(async move {
            match outcomes.await {
                Ok(outcomes) => Message::BatchReply(outcomes),
                Err(code) => error(code, code.name()),
            }
        }),
    )
}

fn key_error(e: KeyError) -> Message {
    let code = match e {
        KeyError::Unknown(_) => ErrorCode::UnknownKey,
        KeyError::LastAdmin(_) => ErrorCode::LastAdminKey,
        KeyError::Storage(_) | KeyError::BadOperatorKey(_) => ErrorCode::KeyStoreFailed,
    };
    error(code, e.to_string())
}

/// Polls a future once, without waiting.
async fn poll_once<T>(fut: &mut BoxFuture<T>) -> Poll<T> {
    poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
}

/// Writes answers in request order; answers already done are coalesced into one write.
async fn write_answers(mut send: SendStream, mut rx: mpsc::Receiver<Out>, conn: Arc<ConnState>) {
    const COALESCE_BYTES: usize = 64 * 1024;
    let mut buf = Vec::with_capacity(COALESCE_BYTES);
    let mut head: Option<Out> = None;
    let mut closing: Option<ErrorFrame> = None;
    'write: loop {
        let item = match head.take() {
            Some(item) => item,
            None => match rx.recv().await {
                Some(item) => item,
                None => break,
            },
        };
        let mut released = 0u32;
        let mut next = Some(item);
        while let Some(item) = next.take() {
            match item {
                Out::Now(id, message) => encode(&conn, id, &message, &mut buf),
                Out::Later(id, mut fut) => {
                    let message = if buf.is_empty() {
                        fut.await
                    } else {
                        match poll_once(&mut fut).await {
                            Poll::Ready(message) => message,
                            Poll::Pending => {
                                // Write what is done; wait for this one next round.
                                head = Some(Out::Later(id, fut));
                                break;
                            }
                        }
                    };
                    released += 1;
                    encode(&conn, id, &message, &mut buf);
                }
                Out::Close(id, frame) => {
                    encode(&conn, id, &Message::Error(frame.clone()), &mut buf);
                    closing = Some(frame);
                    break;
                }
            }
            if buf.len() < COALESCE_BYTES {
                next = rx.try_recv().ok();
            }
        }
        let written = send.write_all(&buf).await;
        buf.clear();
        conn.in_flight.fetch_sub(released, Ordering::AcqRel);
        if written.is_err() || closing.is_some() {
            break 'write;
        }
    }
    // Release the slots of answers that will never be written.
    let mut unreleased = head.map_or(0, |h| u32::from(matches!(h, Out::Later(..))));
    rx.close();
    while let Ok(item) = rx.try_recv() {
        unreleased += u32::from(matches!(item, Out::Later(..)));
    }
    conn.in_flight.fetch_sub(unreleased, Ordering::AcqRel);
    let _ = send.finish();
    if let Some(frame) = closing {
        // Give the error frame a moment to reach the client, then close with its code.
        let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
        close(&conn.conn, frame.code, &frame.message);
    }
}

fn encode(conn: &ConnState, id: u64, message: &Message, buf: &mut Vec<u8>) {
    let max = conn.peer_payload_max.load(Ordering::Relaxed);
    if let Err(e) = message.encode_limited(id, max, buf) {
        let fallback = error(ErrorCode::AnswerTooLarge, e.to_string());
        // An error frame with a short message always fits.
        let _ = fallback.encode(id, buf);
    }
}
