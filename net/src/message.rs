//! Messages: what each frame kind's payload means, and its conversion to and from engine types.
//!
//! [`Message`] is the wire-level view of one frame. Requests decode straight into
//! `tally_engine::Request` / `Query` values: every name is validated the way the engine's
//! `Name::new` validates it and every decimal is range-checked while decoding, so a bad field is a
//! [`BodyError`] that names it, never a panic and never an invalid engine value. Business rules
//! (amounts positive, limits on list lengths, scopes) stay with the engine and the server; this
//! module does not decide whether a request is allowed, and it knows nothing about sockets.
//! Query answers that the engine cannot build outside itself (a wallet's holds) have their own
//! wire types here ([`WalletInfo`], [`HoldInfo`]), converted from the engine's at the edge.

use rust_decimal::Decimal;
use tally_engine::{
    AssetCode, BalanceView, Command, Component, CreateWallet, DebitMode, DraftTestReport,
    DraftTestRow, Grant, GrantId, GrantSource, GrantView, HoldId, Limit, MarginScope, MarginView,
    Name, PaymentEvent, PriceModel, PriceRule, PriceView, Quantity, Query, QueryReply, Reply,
    ReplyValue, Request, RequestId, ReserveAmount, ResultCode, Tier, Timestamp, TopUpAmount,
    TopUpPrice, TopUpRule, TopUpStatus, UsageEvent, WalletId, WalletView,
};

use crate::codec::{BodyError, EncodeError, Problem, Reader, Writer};
use crate::error::{ErrorCode, ERROR_CODE_MIN};
use crate::frame::{
    encode_header, Frame, Kind, FRAME_PAYLOAD_BYTES_MAX, HEADER_BYTES, PROTOCOL_VERSION,
};

/// Most items in one batch frame (`UsageBatch`, `ReserveBatch`).
pub const BATCH_ITEMS_MAX: usize = 8192;
/// Most bytes in an API key (`Auth`).
pub const API_KEY_BYTES_MAX: usize = 256;

/// What an API key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Scope {
    /// Usage, reserve / settle / release (and their batches), balance and wallet reads, price
    /// previews, health.
    Gateway = 1,
    /// Everything.
    Admin = 2,
}

impl Scope {
    /// The scope with this number.
    pub fn from_u8(n: u8) -> Option<Scope> {
        match n {
            1 => Some(Scope::Gateway),
            2 => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// The protocol versions this crate speaks.
pub const PROTOCOL_VERSIONS: std::ops::RangeInclusive<u8> = PROTOCOL_VERSION..=PROTOCOL_VERSION;

/// The client's opening frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the client speaks.
    pub version_min: u8,
    /// Highest protocol version the client speaks.
    pub version_max: u8,
    /// Largest payload the client accepts in answers.
    pub frame_payload_max: u32,
    /// Free text naming the client, e.g. `tally-client/0.1.0` (for server logs).
    pub client: String,
}

impl Hello {
    /// The version a server speaking `supported` should choose: the highest in both ranges, or
    /// `None` (answer `UnsupportedVersion`).
    pub fn choose_version(&self, supported: std::ops::RangeInclusive<u8>) -> Option<u8> {
        let high = self.version_max.min(*supported.end());
        let low = self.version_min.max(*supported.start());
        (low <= high).then_some(high)
    }
}

/// The server's answer to `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The version both sides speak from now on.
    pub version: u8,
    /// Largest payload the server accepts.
    pub frame_payload_max: u32,
    /// Most requests the client may have unanswered at once on the connection.
    pub in_flight_max: u32,
    /// Most items in one batch frame.
    pub batch_items_max: u32,
    /// Free text naming the server, e.g. `tally/0.1.0`.
    pub server: String,
}

/// A transport-level failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorFrame {
    /// What failed.
    pub code: ErrorCode,
    /// A human-readable explanation (e.g. the malformed field); not for matching.
    pub message: String,
}

/// One reserve of a `ReserveBatch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReserveItem {
    /// The idempotency id.
    pub id: RequestId,
    /// The wallet.
    pub wallet: WalletId,
    /// What to hold.
    pub amount: ReserveAmount,
    /// When the hold expires.
    pub deadline: Timestamp,
}

impl From<ReserveItem> for Request {
    fn from(item: ReserveItem) -> Request {
        Request {
            id: item.id,
            command: Command::Reserve {
                wallet: item.wallet,
                amount: item.amount,
                deadline: item.deadline,
            },
        }
    }
}

/// The outcome of one batch item: the engine's reply, or a transport error for that item alone
/// (e.g. `Busy` when its shard's queue was full).
pub type Outcome = Result<Reply, ErrorCode>;

/// An open hold, as a wallet answer lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldInfo {
    /// Its id.
    pub id: HoldId,
    /// The asset.
    pub asset: AssetCode,
    /// Held.
    pub amount: Decimal,
    /// Deadline.
    pub deadline: Timestamp,
}

/// Everything about a wallet (the wire form of `tally_engine::WalletView`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalletInfo {
    /// External id.
    pub wallet: WalletId,
    /// Frozen.
    pub frozen: bool,
    /// Assets whose auto top-up is flagged after exhausted attempts.
    pub topup_flagged: Vec<AssetCode>,
    /// Metadata.
    pub metadata: Vec<(Name, Name)>,
    /// Balances.
    pub balances: Vec<BalanceView>,
    /// Grants with a remainder.
    pub grants: Vec<GrantView>,
    /// Open holds.
    pub holds: Vec<HoldInfo>,
    /// Plan assignments: plan, version, from.
    pub plans: Vec<(Name, u32, Timestamp)>,
    /// Auto top-up rules.
    pub topup_rules: Vec<TopUpRule>,
    /// Margin of its usage.
    pub margin: MarginView,
    /// The payment processor's customer id.
    pub customer: Option<Name>,
    /// The default payment method top-ups charge.
    pub payment_method: Option<Name>,
    /// Auto top-up state per asset.
    pub topups: Vec<TopUpStatus>,
}

impl From<&WalletView> for WalletInfo {
    fn from(v: &WalletView) -> WalletInfo {
        WalletInfo {
            wallet: v.wallet,
            frozen: v.frozen,
            topup_flagged: v.topup_flagged.clone(),
            metadata: v.metadata.clone(),
            balances: v.balances.clone(),
            grants: v.grants.clone(),
            holds: v
                .holds
                .iter()
                .map(|h| HoldInfo {
                    id: h.id,
                    asset: h.asset,
                    amount: h.amount,
                    deadline: h.deadline,
                })
                .collect(),
            plans: v.plans.clone(),
            topup_rules: v.topup_rules.clone(),
            margin: v.margin,
            customer: v.customer,
            payment_method: v.payment_method,
            topups: v.topups.clone(),
        }
    }
}

/// A query's answer (the wire form of `tally_engine::QueryReply`).
// As `QueryReply`: the wallet variant is big and built once per query.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// See `Query::Wallet`.
    Wallet(WalletInfo),
    /// See `Query::Balance`.
    Balance(BalanceView),
    /// See `Query::Margin`.
    Margin(MarginView),
    /// See `Query::PricePreview`.
    Price(PriceView),
    /// See `Query::DraftTest`.
    DraftTest(DraftTestReport),
    /// See `Query::Asset`.
    Asset(tally_engine::Asset),
    /// See `Query::Plans`.
    Plans(Vec<tally_engine::PlanView>),
}

impl From<&QueryReply> for Answer {
    fn from(reply: &QueryReply) -> Answer {
        match reply {
            QueryReply::Wallet(v) => Answer::Wallet(v.into()),
            QueryReply::Balance(v) => Answer::Balance(*v),
            QueryReply::Margin(v) => Answer::Margin(*v),
            QueryReply::Price(v) => Answer::Price(*v),
            QueryReply::DraftTest(v) => Answer::DraftTest(v.clone()),
            QueryReply::Asset(a) => Answer::Asset(*a),
            QueryReply::Plans(p) => Answer::Plans(p.clone()),
        }
    }
}

/// One shard's part of an online snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// The shard.
    pub shard: u32,
    /// The last LSN the checkpoint includes.
    pub lsn: u64,
    /// The digest of the shard's state.
    pub digest: u64,
    /// How long the shard loop stood still for it, in microseconds.
    pub stall_us: u64,
}

/// The answer to `Health`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    /// Shards configured.
    pub shards: u32,
    /// Shards whose loop is running (not stopped or poisoned).
    pub shards_running: u32,
    /// Microseconds since the server started.
    pub uptime_us: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Requests refused because the connection had not authenticated (`Unauthenticated`).
    pub rejected_unauthenticated: u64,
    /// `Auth` frames with an unknown or revoked key, and requests on a revoked key (`InvalidKey`).
    pub rejected_key: u64,
    /// Requests outside the key's scope (`OutOfScope`).
    pub rejected_scope: u64,
    /// Free text naming the server build, e.g. `tally/0.1.0`.
    pub server: String,
    /// How far each effect sink (history store, JSON lines, PostgreSQL export) is behind.
    pub sinks: Vec<SinkLag>,
}

/// How far one effect sink is behind the shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkLag {
    /// The sink: `sqlite`, `jsonl` or `postgres`.
    pub name: String,
    /// Effects (rows, for `postgres`) not yet durable in it.
    pub effects: u64,
    /// How long the oldest of them has waited, in microseconds (at most).
    pub lag_us: u64,
}

/// The payload of one frame, by kind. The header's request id travels beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Kind `Hello`.
    Hello(Hello),
    /// Kind `Welcome`.
    Welcome(Welcome),
    /// Kind `Auth`: the API key's bytes (at most 256).
    Auth {
        /// The key.
        key: Vec<u8>,
    },
    /// Kind `AuthOk`.
    AuthOk {
        /// The key's id.
        key_id: u64,
        /// Its scope.
        scope: Scope,
    },
    /// Kind `Error`.
    Error(ErrorFrame),
    /// One engine command; the kind is the command's opcode.
    Request(Request),
    /// Kind `UsageBatch`.
    UsageBatch(Vec<(RequestId, UsageEvent)>),
    /// Kind `ReserveBatch`.
    ReserveBatch(Vec<ReserveItem>),
    /// One engine query; the kind is the query's opcode.
    Query(Query),
    /// Kind `KeyCreate`.
    KeyCreate {
        /// A label for the key (e.g. which gateway uses it).
        label: Name,
        /// Its scope.
        scope: Scope,
    },
    /// Kind `KeyRevoke`.
    KeyRevoke {
        /// The key's id.
        key_id: u64,
    },
    /// Kind `Snapshot`.
    Snapshot,
    /// Kind `Health`.
    Health,
    /// Kind `Ping`: answered `Done` by the network layer.
    Ping,
    /// Kind `Reply`.
    Reply(Reply),
    /// Kind `BatchReply`.
    BatchReply(Vec<Outcome>),
    /// Kind `Answer`: the answer, or the result code that refused the query (never `Ok`, which
    /// does not encode).
    Answer(Result<Answer, ResultCode>),
    /// Kind `KeyCreated`.
    KeyCreated {
        /// The new key's id.
        key_id: u64,
        /// The secret, shown once; the server keeps only its hash.
        secret: String,
    },
    /// Kind `Done`.
    Done,
    /// Kind `SnapshotTaken`.
    SnapshotTaken(Vec<CheckpointInfo>),
    /// Kind `HealthReport`.
    HealthReport(HealthReport),
}

impl From<Request> for Message {
    fn from(request: Request) -> Message {
        Message::Request(request)
    }
}

impl From<Query> for Message {
    fn from(query: Query) -> Message {
        Message::Query(query)
    }
}

impl From<Reply> for Message {
    fn from(reply: Reply) -> Message {
        Message::Reply(reply)
    }
}

impl From<Result<QueryReply, ResultCode>> for Message {
    /// The engine's query outcome as an `Answer` frame.
    fn from(outcome: Result<QueryReply, ResultCode>) -> Message {
        Message::Answer(outcome.as_ref().map(Answer::from).map_err(|code| *code))
    }
}

impl TryFrom<Message> for Request {
    type Error = Kind;

    /// The engine request a command frame carries; a batch or any other kind is returned as
    /// the error (batches convert item by item).
    fn try_from(message: Message) -> Result<Request, Kind> {
        match message {
            Message::Request(request) => Ok(request),
            other => Err(other.kind()),
        }
    }
}

/// The opcode of a command.
pub fn command_kind(command: &Command) -> Kind {
    match command {
        Command::DefineAsset { .. } => Kind::DefineAsset,
        Command::DefineProduct { .. } => Kind::DefineProduct,
        Command::DraftPlan { .. } => Kind::DraftPlan,
        Command::PublishPlan { .. } => Kind::PublishPlan,
        Command::CreateWallet(_) => Kind::CreateWallet,
        Command::SetOverdraft { .. } => Kind::SetOverdraft,
        Command::Freeze { .. } => Kind::Freeze,
        Command::Unfreeze { .. } => Kind::Unfreeze,
        Command::AssignPlan { .. } => Kind::AssignPlan,
        Command::Grant(_) => Kind::Grant,
        Command::Usage(_) => Kind::Usage,
        Command::Reserve { .. } => Kind::Reserve,
        Command::Settle { .. } => Kind::Settle,
        Command::Release { .. } => Kind::Release,
        Command::Refund { .. } => Kind::Refund,
        Command::Dispute { .. } => Kind::Dispute,
        Command::DisputeWon { .. } => Kind::DisputeWon,
        Command::Adjust { .. } => Kind::Adjust,
        Command::SetTopUpRule { .. } => Kind::SetTopUpRule,
        Command::RemoveTopUpRule { .. } => Kind::RemoveTopUpRule,
        Command::TopUpSucceeded { .. } => Kind::TopUpSucceeded,
        Command::TopUpFailed { .. } => Kind::TopUpFailed,
        Command::PriceAsset { .. } => Kind::PriceAsset,
        Command::SetBilling { .. } => Kind::SetBilling,
        Command::Payment { .. } => Kind::Payment,
    }
}

/// The opcode of a query.
pub fn query_kind(query: &Query) -> Kind {
    match query {
        Query::Wallet { .. } => Kind::QueryWallet,
        Query::Balance { .. } => Kind::QueryBalance,
        Query::Margin(_) => Kind::QueryMargin,
        Query::PricePreview(_) => Kind::QueryPricePreview,
        Query::DraftTest { .. } => Kind::QueryDraftTest,
        Query::Asset { .. } => Kind::QueryAsset,
        Query::Plans => Kind::QueryPlans,
    }
}

impl Message {
    /// The frame kind this message is sent as.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Auth { .. } => Kind::Auth,
            Message::AuthOk { .. } => Kind::AuthOk,
            Message::Error(_) => Kind::Error,
            Message::Request(r) => command_kind(&r.command),
            Message::UsageBatch(_) => Kind::UsageBatch,
            Message::ReserveBatch(_) => Kind::ReserveBatch,
            Message::Query(q) => query_kind(q),
            Message::KeyCreate { .. } => Kind::KeyCreate,
            Message::KeyRevoke { .. } => Kind::KeyRevoke,
            Message::Snapshot => Kind::Snapshot,
            Message::Health => Kind::Health,
            Message::Ping => Kind::Ping,
            Message::Reply(_) => Kind::Reply,
            Message::BatchReply(_) => Kind::BatchReply,
            Message::Answer(_) => Kind::Answer,
            Message::KeyCreated { .. } => Kind::KeyCreated,
            Message::Done => Kind::Done,
            Message::SnapshotTaken(_) => Kind::SnapshotTaken,
            Message::HealthReport(_) => Kind::HealthReport,
        }
    }

    /// Appends this message as one frame to `buf`, within [`FRAME_PAYLOAD_BYTES_MAX`].
    pub fn encode(&self, request_id: u64, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.encode_limited(request_id, FRAME_PAYLOAD_BYTES_MAX, buf)
    }

    /// Appends this message as one frame to `buf`, refusing a payload over `payload_max` (the
    /// peer's announced limit). On error `buf` is left as it was.
    pub fn encode_limited(
        &self,
        request_id: u64,
        payload_max: u32,
        buf: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let start = buf.len();
        encode_header(buf, self.kind(), request_id, 0);
        let result = self.encode_payload(&mut Writer::new(buf));
        let length = buf.len() - start - HEADER_BYTES;
        let max = payload_max.min(FRAME_PAYLOAD_BYTES_MAX);
        let result = match result {
            Ok(()) if length > max as usize => Err(EncodeError::TooLarge { length, max }),
            other => other,
        };
        match result {
            Ok(()) => {
                buf[start + 4..start + 8].copy_from_slice(&(length as u32).to_le_bytes());
                Ok(())
            }
            Err(e) => {
                buf.truncate(start);
                Err(e)
            }
        }
    }

    fn encode_payload(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        match self {
            Message::Hello(h) => {
                w.u8(h.version_min);
                w.u8(h.version_max);
                w.u32(h.frame_payload_max);
                w.bytes16("hello.client", h.client.as_bytes())?;
            }
            Message::Welcome(h) => {
                w.u8(h.version);
                w.u32(h.frame_payload_max);
                w.u32(h.in_flight_max);
                w.u32(h.batch_items_max);
                w.bytes16("welcome.server", h.server.as_bytes())?;
            }
            Message::Auth { key } => w.bytes16("auth.key", key)?,
            Message::AuthOk { key_id, scope } => {
                w.u64(*key_id);
                w.u8(*scope as u8);
            }
            Message::Error(e) => {
                w.u16(e.code as u16);
                w.bytes16("error.message", e.message.as_bytes())?;
            }
            Message::Request(r) => {
                w.u128(r.id.0);
                write_command(w, &r.command)?;
            }
            Message::UsageBatch(items) => {
                w.count16("usage_batch.items", items.len())?;
                for (id, usage) in items {
                    w.u128(id.0);
                    write_usage(w, usage)?;
                }
            }
            Message::ReserveBatch(items) => {
                w.count16("reserve_batch.items", items.len())?;
                for item in items {
                    w.u128(item.id.0);
                    w.name(&item.wallet);
                    write_reserve_amount(w, &item.amount)?;
                    w.i64(item.deadline.0);
                }
            }
            Message::Query(q) => write_query(w, q)?,
            Message::KeyCreate { label, scope } => {
                w.name(label);
                w.u8(*scope as u8);
            }
            Message::KeyRevoke { key_id } => w.u64(*key_id),
            Message::Snapshot | Message::Health | Message::Ping | Message::Done => {}
            Message::Reply(reply) => write_reply(w, reply),
            Message::BatchReply(outcomes) => {
                w.count16("batch_reply.items", outcomes.len())?;
                for outcome in outcomes {
                    match outcome {
                        Ok(reply) => write_reply(w, reply),
                        Err(code) => w.u16(*code as u16),
                    }
                }
            }
            Message::Answer(Ok(answer)) => {
                w.u16(ResultCode::Ok as u16);
                write_answer(w, answer)?;
            }
            Message::Answer(Err(ResultCode::Ok)) => {
                return Err(EncodeError::Invalid {
                    field: "answer.code",
                })
            }
            Message::Answer(Err(code)) => w.u16(*code as u16),
            Message::KeyCreated { key_id, secret } => {
                w.u64(*key_id);
                w.bytes16("key_created.secret", secret.as_bytes())?;
            }
            Message::SnapshotTaken(reports) => {
                w.count16("snapshot_taken.shards", reports.len())?;
                for r in reports {
                    w.u32(r.shard);
                    w.u64(r.lsn);
                    w.u64(r.digest);
                    w.u64(r.stall_us);
                }
            }
            Message::HealthReport(h) => {
                w.u32(h.shards);
                w.u32(h.shards_running);
                w.u64(h.uptime_us);
                w.u64(h.connections_open);
                w.u64(h.rejected_unauthenticated);
                w.u64(h.rejected_key);
                w.u64(h.rejected_scope);
                w.bytes16("health.server", h.server.as_bytes())?;
                w.count16("health.sinks", h.sinks.len())?;
                for sink in &h.sinks {
                    w.bytes16("health.sinks[].name", sink.name.as_bytes())?;
                    w.u64(sink.effects);
                    w.u64(sink.lag_us);
                }
            }
        }
        Ok(())
    }

    /// Decodes a frame's payload. Every byte must be used.
    pub fn decode(frame: &Frame<'_>) -> Result<Message, BodyError> {
        let mut r = Reader::new(frame.payload);
        let message = decode_payload(frame.header.kind, &mut r)?;
        r.finish("payload")?;
        Ok(message)
    }
}

fn text(bytes: &[u8], field: &'static str) -> Result<String, BodyError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| BodyError {
            field,
            problem: Problem::InvalidUtf8,
        })
}

fn scope(r: &mut Reader<'_>, field: &'static str) -> Result<Scope, BodyError> {
    let n = r.u8(field)?;
    Scope::from_u8(n).ok_or(Reader::unknown_tag(field, n.into()))
}

fn decode_payload(kind: Kind, r: &mut Reader<'_>) -> Result<Message, BodyError> {
    Ok(match kind {
        Kind::Hello => Message::Hello(Hello {
            version_min: r.u8("hello.version_min")?,
            version_max: r.u8("hello.version_max")?,
            frame_payload_max: r.u32("hello.frame_payload_max")?,
            client: text(r.bytes16("hello.client")?, "hello.client")?,
        }),
        Kind::Welcome => Message::Welcome(Welcome {
            version: r.u8("welcome.version")?,
            frame_payload_max: r.u32("welcome.frame_payload_max")?,
            in_flight_max: r.u32("welcome.in_flight_max")?,
            batch_items_max: r.u32("welcome.batch_items_max")?,
            server: text(r.bytes16("welcome.server")?, "welcome.server")?,
        }),
        Kind::Auth => Message::Auth {
            key: r.bytes16("auth.key")?.to_vec(),
        },
        Kind::AuthOk => Message::AuthOk {
            key_id: r.u64("auth_ok.key_id")?,
            scope: scope(r, "auth_ok.scope")?,
        },
        Kind::Error => {
            let n = r.u16("error.code")?;
            let code = ErrorCode::from_u16(n).ok_or(Reader::unknown_code("error.code", n))?;
            Message::Error(ErrorFrame {
                code,
                message: text(r.bytes16("error.message")?, "error.message")?,
            })
        }
        Kind::DefineAsset
        | Kind::DefineProduct
        | Kind::DraftPlan
        | Kind::PublishPlan
        | Kind::CreateWallet
        | Kind::SetOverdraft
        | Kind::Freeze
        | Kind::Unfreeze
        | Kind::AssignPlan
        | Kind::Grant
        | Kind::Usage
        | Kind::Reserve
        | Kind::Settle
        | Kind::Release
        | Kind::Refund
        | Kind::Dispute
        | Kind::DisputeWon
        | Kind::Adjust
        | Kind::SetTopUpRule
        | Kind::RemoveTopUpRule
        | Kind::TopUpSucceeded
        | Kind::TopUpFailed
        | Kind::PriceAsset
        | Kind::SetBilling
        | Kind::Payment => {
            let id = RequestId(r.u128("request.id")?);
            Message::Request(Request {
                id,
                command: read_command(kind, r)?,
            })
        }
        Kind::UsageBatch => {
            let n = r.count16("usage_batch.items", 16 + USAGE_BYTES_MIN)?;
            let mut items = Vec::with_capacity(n.min(BATCH_ITEMS_MAX));
            for _ in 0..n {
                let id = RequestId(r.u128("usage_batch.items[].id")?);
                items.push((id, read_usage(r)?));
            }
            Message::UsageBatch(items)
        }
        Kind::ReserveBatch => {
            let n = r.count16("reserve_batch.items", 16 + 2 + 1 + 8)?;
            let mut items = Vec::with_capacity(n.min(BATCH_ITEMS_MAX));
            for _ in 0..n {
                items.push(ReserveItem {
                    id: RequestId(r.u128("reserve_batch.items[].id")?),
                    wallet: r.name("reserve_batch.items[].wallet")?,
                    amount: read_reserve_amount(r)?,
                    deadline: Timestamp(r.i64("reserve_batch.items[].deadline")?),
                });
            }
            Message::ReserveBatch(items)
        }
        Kind::QueryWallet
        | Kind::QueryBalance
        | Kind::QueryMargin
        | Kind::QueryPricePreview
        | Kind::QueryDraftTest
        | Kind::QueryAsset
        | Kind::QueryPlans => Message::Query(read_query(kind, r)?),
        Kind::KeyCreate => Message::KeyCreate {
            label: r.name("key_create.label")?,
            scope: scope(r, "key_create.scope")?,
        },
        Kind::KeyRevoke => Message::KeyRevoke {
            key_id: r.u64("key_revoke.key_id")?,
        },
        Kind::Snapshot => Message::Snapshot,
        Kind::Health => Message::Health,
        Kind::Ping => Message::Ping,
        Kind::Done => Message::Done,
        Kind::Reply => {
            let code = result_code(r, "reply.code")?;
            Message::Reply(read_reply(code, r)?)
        }
        Kind::BatchReply => {
            // An item is at least its 2-byte code (a transport error carries nothing else).
            let n = r.count16("batch_reply.items", 2)?;
            let mut outcomes = Vec::with_capacity(n.min(BATCH_ITEMS_MAX));
            for _ in 0..n {
                let number = r.u16("batch_reply.items[].code")?;
                outcomes.push(if number >= ERROR_CODE_MIN {
                    Err(ErrorCode::from_u16(number)
                        .ok_or(Reader::unknown_code("batch_reply.items[].code", number))?)
                } else {
                    let code = ResultCode::from_u16(number)
                        .ok_or(Reader::unknown_code("batch_reply.items[].code", number))?;
                    Ok(read_reply(code, r)?)
                });
            }
            Message::BatchReply(outcomes)
        }
        Kind::Answer => match result_code(r, "answer.code")? {
            ResultCode::Ok => Message::Answer(Ok(read_answer(r)?)),
            code => Message::Answer(Err(code)),
        },
        Kind::KeyCreated => Message::KeyCreated {
            key_id: r.u64("key_created.key_id")?,
            secret: text(r.bytes16("key_created.secret")?, "key_created.secret")?,
        },
        Kind::SnapshotTaken => {
            let n = r.count16("snapshot_taken.shards", 28)?;
            let mut reports = Vec::with_capacity(n);
            for _ in 0..n {
                reports.push(CheckpointInfo {
                    shard: r.u32("snapshot_taken.shards[].shard")?,
                    lsn: r.u64("snapshot_taken.shards[].lsn")?,
                    digest: r.u64("snapshot_taken.shards[].digest")?,
                    stall_us: r.u64("snapshot_taken.shards[].stall_us")?,
                });
            }
            Message::SnapshotTaken(reports)
        }
        Kind::HealthReport => Message::HealthReport(HealthReport {
            shards: r.u32("health.shards")?,
            shards_running: r.u32("health.shards_running")?,
            uptime_us: r.u64("health.uptime_us")?,
            connections_open: r.u64("health.connections_open")?,
            rejected_unauthenticated: r.u64("health.rejected_unauthenticated")?,
            rejected_key: r.u64("health.rejected_key")?,
            rejected_scope: r.u64("health.rejected_scope")?,
            server: text(r.bytes16("health.server")?, "health.server")?,
            sinks: {
                let n = r.count16("health.sinks", 18)?;
                let mut sinks = Vec::with_capacity(n);
                for _ in 0..n {
                    sinks.push(SinkLag {
                        name: text(r.bytes16("health.sinks[].name")?, "health.sinks[].name")?,
                        effects: r.u64("health.sinks[].effects")?,
                        lag_us: r.u64("health.sinks[].lag_us")?,
                    });
                }
                sinks
            },
        }),
    })
}

fn result_code(r: &mut Reader<'_>, field: &'static str) -> Result<ResultCode, BodyError> {
    let n = r.u16(field)?;
    ResultCode::from_u16(n).ok_or(Reader::unknown_code(field, n))
}

// Smallest encodings, used to refuse list counts the payload cannot hold.
const NAME_BYTES_MIN: usize = 2;
const USAGE_BYTES_MIN: usize = 2 * NAME_BYTES_MIN + 2 + 2 + 17 + 8 + 1;

fn write_pairs(
    w: &mut Writer<'_>,
    field: &'static str,
    pairs: &[(Name, Name)],
) -> Result<(), EncodeError> {
    w.count16(field, pairs.len())?;
    for (k, v) in pairs {
        w.name(k);
        w.name(v);
    }
    Ok(())
}

fn read_pairs(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<(Name, Name)>, BodyError> {
    let n = r.count16(field, 2 * NAME_BYTES_MIN)?;
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        pairs.push((r.name(field)?, r.name(field)?));
    }
    Ok(pairs)
}

fn write_quantities(w: &mut Writer<'_>, quantities: &[Quantity]) -> Result<(), EncodeError> {
    w.count16("quantities", quantities.len())?;
    for q in quantities {
        w.name(&q.dimension);
        w.decimal(&q.value);
    }
    Ok(())
}

fn read_quantities(r: &mut Reader<'_>) -> Result<Vec<Quantity>, BodyError> {
    let n = r.count16("quantities", NAME_BYTES_MIN + 17)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Quantity {
            dimension: r.name("quantities[].dimension")?,
            value: r.decimal("quantities[].value")?,
        });
    }
    Ok(out)
}

fn write_name_option(w: &mut Writer<'_>, name: Option<&Name>) {
    match name {
        None => w.u8(0),
        Some(n) => {
            w.u8(1);
            w.name(n);
        }
    }
}

fn read_name_option(r: &mut Reader<'_>, field: &'static str) -> Result<Option<Name>, BodyError> {
    Ok(if r.present(field)? {
        Some(r.name(field)?)
    } else {
        None
    })
}

fn write_timestamp_option(w: &mut Writer<'_>, t: Option<Timestamp>) {
    match t {
        Some(t) => {
            w.u8(1);
            w.i64(t.0);
        }
        None => w.u8(0),
    }
}

fn read_timestamp_option(
    r: &mut Reader<'_>,
    field: &'static str,
) -> Result<Option<Timestamp>, BodyError> {
    Ok(if r.present(field)? {
        Some(Timestamp(r.i64(field)?))
    } else {
        None
    })
}

fn write_decimal_option(w: &mut Writer<'_>, d: Option<Decimal>) {
    match d {
        Some(d) => {
            w.u8(1);
            w.decimal(&d);
        }
        None => w.u8(0),
    }
}

fn write_usage(w: &mut Writer<'_>, u: &UsageEvent) -> Result<(), EncodeError> {
    w.name(&u.wallet);
    w.name(&u.product);
    write_quantities(w, &u.quantities)?;
    write_pairs(w, "usage.attributes", &u.attributes)?;
    w.decimal(&u.cost_usd);
    w.i64(u.occurred_at.0);
    w.u8(match u.mode {
        DebitMode::Strict => 0,
        DebitMode::Record => 1,
    });
    Ok(())
}

fn read_usage(r: &mut Reader<'_>) -> Result<UsageEvent, BodyError> {
    Ok(UsageEvent {
        wallet: r.name("usage.wallet")?,
        product: r.name("usage.product")?,
        quantities: read_quantities(r)?,
        attributes: read_pairs(r, "usage.attributes")?,
        cost_usd: r.decimal("usage.cost_usd")?,
        occurred_at: Timestamp(r.i64("usage.occurred_at")?),
        mode: match r.u8("usage.mode")? {
            0 => DebitMode::Strict,
            1 => DebitMode::Record,
            t => return Err(Reader::unknown_tag("usage.mode", t.into())),
        },
    })
}

fn write_reserve_amount(w: &mut Writer<'_>, amount: &ReserveAmount) -> Result<(), EncodeError> {
    match amount {
        ReserveAmount::Fixed { asset, amount } => {
            w.u8(0);
            w.name(asset);
            w.decimal(amount);
        }
        ReserveAmount::Estimate {
            product,
            quantities,
            attributes,
        } => {
            w.u8(1);
            w.name(product);
            write_quantities(w, quantities)?;
            write_pairs(w, "reserve.attributes", attributes)?;
        }
    }
    Ok(())
}

fn read_reserve_amount(r: &mut Reader<'_>) -> Result<ReserveAmount, BodyError> {
    Ok(match r.u8("reserve.amount")? {
        0 => ReserveAmount::Fixed {
            asset: r.asset("reserve.asset")?,
            amount: r.decimal("reserve.amount")?,
        },
        1 => ReserveAmount::Estimate {
            product: r.name("reserve.product")?,
            quantities: read_quantities(r)?,
            attributes: read_pairs(r, "reserve.attributes")?,
        },
        t => return Err(Reader::unknown_tag("reserve.amount", t.into())),
    })
}

fn write_rounding(w: &mut Writer<'_>, rounding: tally_engine::Rounding) {
    use tally_engine::Rounding::*;
    w.u8(match rounding {
        HalfEven => 0,
        HalfUp => 1,
        Up => 2,
        Down => 3,
    });
}

fn read_rounding(r: &mut Reader<'_>) -> Result<tally_engine::Rounding, BodyError> {
    use tally_engine::Rounding::*;
    Ok(match r.u8("rules[].rounding")? {
        0 => HalfEven,
        1 => HalfUp,
        2 => Up,
        3 => Down,
        t => return Err(Reader::unknown_tag("rules[].rounding", t.into())),
    })
}

fn write_tiers(w: &mut Writer<'_>, tiers: &[Tier]) -> Result<(), EncodeError> {
    w.count16("tiers", tiers.len())?;
    for t in tiers {
        write_decimal_option(w, t.up_to);
        w.decimal(&t.unit_price);
        w.decimal(&t.flat_fee);
    }
    Ok(())
}

fn read_tiers(r: &mut Reader<'_>) -> Result<Vec<Tier>, BodyError> {
    let n = r.count16("tiers", 1 + 17 + 17)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Tier {
            up_to: r.decimal_option("tiers[].up_to")?,
            unit_price: r.decimal("tiers[].unit_price")?,
            flat_fee: r.decimal("tiers[].flat_fee")?,
        });
    }
    Ok(out)
}

fn write_rules(w: &mut Writer<'_>, rules: &[PriceRule]) -> Result<(), EncodeError> {
    w.count16("rules", rules.len())?;
    for rule in rules {
        w.name(&rule.product);
        write_pairs(w, "rules[].filters", &rule.filters)?;
        w.count16("rules[].components", rule.components.len())?;
        for c in &rule.components {
            w.name(&c.dimension);
            match &c.price {
                PriceModel::PerUnit { unit_price } => {
                    w.u8(0);
                    w.decimal(unit_price);
                }
                PriceModel::Graduated { tiers } => {
                    w.u8(1);
                    write_tiers(w, tiers)?;
                }
                PriceModel::Volume { tiers } => {
                    w.u8(2);
                    write_tiers(w, tiers)?;
                }
            }
        }
        write_decimal_option(w, rule.minimum_charge);
        write_rounding(w, rule.rounding);
    }
    Ok(())
}

fn read_rules(r: &mut Reader<'_>) -> Result<Vec<PriceRule>, BodyError> {
    let n = r.count16("rules", NAME_BYTES_MIN + 2 + 2 + 1 + 1)?;
    let mut rules = Vec::with_capacity(n);
    for _ in 0..n {
        let product = r.name("rules[].product")?;
        let filters = read_pairs(r, "rules[].filters")?;
        let m = r.count16("rules[].components", NAME_BYTES_MIN + 1)?;
        let mut components = Vec::with_capacity(m);
        for _ in 0..m {
            let dimension = r.name("rules[].components[].dimension")?;
            let price = match r.u8("rules[].components[].price")? {
                0 => PriceModel::PerUnit {
                    unit_price: r.decimal("rules[].components[].unit_price")?,
                },
                1 => PriceModel::Graduated {
                    tiers: read_tiers(r)?,
                },
                2 => PriceModel::Volume {
                    tiers: read_tiers(r)?,
                },
                t => return Err(Reader::unknown_tag("rules[].components[].price", t.into())),
            };
            components.push(Component { dimension, price });
        }
        rules.push(PriceRule {
            product,
            filters,
            components,
            minimum_charge: r.decimal_option("rules[].minimum_charge")?,
            rounding: read_rounding(r)?,
        });
    }
    Ok(rules)
}

fn write_topup_rule(w: &mut Writer<'_>, rule: &TopUpRule) {
    w.name(&rule.asset);
    w.decimal(&rule.threshold);
    match rule.amount {
        TopUpAmount::Fixed(d) => {
            w.u8(0);
            w.decimal(&d);
        }
        TopUpAmount::Target(d) => {
            w.u8(1);
            w.decimal(&d);
        }
    }
    w.u32(rule.attempts_max);
    w.i64(rule.cooldown_us);
    write_decimal_option(w, rule.daily_cap);
    write_decimal_option(w, rule.monthly_cap);
    w.name(&rule.payment_method);
}

fn read_topup_rule(r: &mut Reader<'_>) -> Result<TopUpRule, BodyError> {
    Ok(TopUpRule {
        asset: r.asset("topup_rule.asset")?,
        threshold: r.decimal("topup_rule.threshold")?,
        amount: match r.u8("topup_rule.amount")? {
            0 => TopUpAmount::Fixed(r.decimal("topup_rule.amount")?),
            1 => TopUpAmount::Target(r.decimal("topup_rule.amount")?),
            t => return Err(Reader::unknown_tag("topup_rule.amount", t.into())),
        },
        attempts_max: r.u32("topup_rule.attempts_max")?,
        cooldown_us: r.i64("topup_rule.cooldown_us")?,
        daily_cap: r.decimal_option("topup_rule.daily_cap")?,
        monthly_cap: r.decimal_option("topup_rule.monthly_cap")?,
        payment_method: r.name("topup_rule.payment_method")?,
    })
}

fn write_grant_source(w: &mut Writer<'_>, source: &GrantSource) {
    match source {
        GrantSource::TopUp { payment_id } => {
            w.u8(0);
            w.name(payment_id);
        }
        GrantSource::Promotion => w.u8(1),
        GrantSource::Refund => w.u8(2),
        GrantSource::Adjustment => w.u8(3),
    }
}

fn read_grant_source(r: &mut Reader<'_>) -> Result<GrantSource, BodyError> {
    Ok(match r.u8("grant.source")? {
        0 => GrantSource::TopUp {
            payment_id: r.name("grant.source.payment_id")?,
        },
        1 => GrantSource::Promotion,
        2 => GrantSource::Refund,
        3 => GrantSource::Adjustment,
        t => return Err(Reader::unknown_tag("grant.source", t.into())),
    })
}

fn write_command(w: &mut Writer<'_>, command: &Command) -> Result<(), EncodeError> {
    match command {
        Command::DefineAsset {
            code,
            scale,
            usd_value,
        } => {
            w.name(code);
            w.u32(*scale);
            w.decimal(usd_value);
        }
        Command::DefineProduct { code, dimensions } => {
            w.name(code);
            w.count16("define_product.dimensions", dimensions.len())?;
            for d in dimensions {
                w.name(d);
            }
        }
        Command::DraftPlan {
            plan,
            custom_for,
            asset,
            rules,
        } => {
            w.name(plan);
            match custom_for {
                Some(wallet) => {
                    w.u8(1);
                    w.name(wallet);
                }
                None => w.u8(0),
            }
            w.name(asset);
            write_rules(w, rules)?;
        }
        Command::PublishPlan { plan } => w.name(plan),
        Command::CreateWallet(c) => {
            w.name(&c.wallet);
            w.count16("create_wallet.overdraft", c.overdraft.len())?;
            for limit in &c.overdraft {
                w.name(&limit.asset);
                w.decimal(&limit.amount);
            }
            write_pairs(w, "create_wallet.metadata", &c.metadata)?;
        }
        Command::SetOverdraft {
            wallet,
            asset,
            limit,
        } => {
            w.name(wallet);
            w.name(asset);
            w.decimal(limit);
        }
        Command::Freeze { wallet } | Command::Unfreeze { wallet } => w.name(wallet),
        Command::AssignPlan {
            wallet,
            plan,
            version,
            effective_from,
        } => {
            w.name(wallet);
            w.name(plan);
            w.u32(*version);
            w.i64(effective_from.0);
        }
        Command::Grant(g) => {
            w.name(&g.wallet);
            w.name(&g.asset);
            w.decimal(&g.amount);
            w.u32(g.priority);
            write_timestamp_option(w, g.effective_at);
            write_timestamp_option(w, g.expires_at);
            write_grant_source(w, &g.source);
        }
        Command::Usage(u) => write_usage(w, u)?,
        Command::Reserve {
            wallet,
            amount,
            deadline,
        } => {
            w.name(wallet);
            write_reserve_amount(w, amount)?;
            w.i64(deadline.0);
        }
        Command::Settle {
            wallet,
            hold,
            usage,
        } => {
            w.name(wallet);
            w.u64(hold.0);
            write_usage(w, usage)?;
        }
        Command::Release { wallet, hold } => {
            w.name(wallet);
            w.u64(hold.0);
        }
        Command::Refund {
            wallet,
            event,
            amount,
        } => {
            w.name(wallet);
            w.u128(event.0);
            write_decimal_option(w, *amount);
        }
        Command::Dispute {
            wallet,
            grant,
            freeze,
        } => {
            w.name(wallet);
            w.u64(grant.0);
            w.bool(*freeze);
        }
        Command::DisputeWon { wallet, grant } => {
            w.name(wallet);
            w.u64(grant.0);
        }
        Command::Adjust {
            wallet,
            asset,
            amount,
            reason,
        } => {
            w.name(wallet);
            w.name(asset);
            w.decimal(amount);
            w.bytes16("adjust.reason", reason.as_bytes())?;
        }
        Command::SetTopUpRule { wallet, rule } => {
            w.name(wallet);
            write_topup_rule(w, rule);
        }
        Command::RemoveTopUpRule { wallet, asset } => {
            w.name(wallet);
            w.name(asset);
        }
        Command::TopUpSucceeded {
            wallet,
            asset,
            trigger,
            payment_id,
            amount,
        } => {
            w.name(wallet);
            w.name(asset);
            w.u64(*trigger);
            w.name(payment_id);
            w.decimal(amount);
        }
        Command::TopUpFailed {
            wallet,
            asset,
            trigger,
            reason,
        } => {
            w.name(wallet);
            w.name(asset);
            w.u64(*trigger);
            w.name(reason);
        }
        Command::PriceAsset { asset, price } => {
            w.name(asset);
            match price {
                None => w.u8(0),
                Some(p) => {
                    w.u8(1);
                    w.name(&p.currency);
                    w.decimal(&p.unit_amount);
                }
            }
        }
        Command::SetBilling {
            wallet,
            customer,
            payment_method,
        } => {
            w.name(wallet);
            write_name_option(w, customer.as_ref());
            write_name_option(w, payment_method.as_ref());
        }
        Command::Payment {
            wallet,
            payment_id,
            event,
        } => {
            w.name(wallet);
            w.name(payment_id);
            match event {
                PaymentEvent::Disputed { freeze } => {
                    w.u8(0);
                    w.bool(*freeze);
                }
                PaymentEvent::DisputeWon => w.u8(1),
                PaymentEvent::DisputeLost { freeze } => {
                    w.u8(3);
                    w.bool(*freeze);
                }
                PaymentEvent::Refunded { refunded } => {
                    w.u8(2);
                    w.decimal(refunded);
                }
            }
        }
    }
    Ok(())
}

fn read_command(kind: Kind, r: &mut Reader<'_>) -> Result<Command, BodyError> {
    Ok(match kind {
        Kind::DefineAsset => Command::DefineAsset {
            code: r.asset("define_asset.code")?,
            scale: r.u32("define_asset.scale")?,
            usd_value: r.decimal("define_asset.usd_value")?,
        },
        Kind::DefineProduct => {
            let code = r.name("define_product.code")?;
            let n = r.count16("define_product.dimensions", NAME_BYTES_MIN)?;
            let mut dimensions = Vec::with_capacity(n);
            for _ in 0..n {
                dimensions.push(r.name("define_product.dimensions[]")?);
            }
            Command::DefineProduct { code, dimensions }
        }
        Kind::DraftPlan => Command::DraftPlan {
            plan: r.name("draft_plan.plan")?,
            custom_for: if r.present("draft_plan.custom_for")? {
                Some(r.name("draft_plan.custom_for")?)
            } else {
                None
            },
            asset: r.asset("draft_plan.asset")?,
            rules: read_rules(r)?,
        },
        Kind::PublishPlan => Command::PublishPlan {
            plan: r.name("publish_plan.plan")?,
        },
        Kind::CreateWallet => {
            let wallet = r.name("create_wallet.wallet")?;
            let n = r.count16("create_wallet.overdraft", NAME_BYTES_MIN + 17)?;
            let mut overdraft = Vec::with_capacity(n);
            for _ in 0..n {
                overdraft.push(Limit {
                    asset: r.asset("create_wallet.overdraft[].asset")?,
                    amount: r.decimal("create_wallet.overdraft[].amount")?,
                });
            }
            Command::CreateWallet(CreateWallet {
                wallet,
                overdraft,
                metadata: read_pairs(r, "create_wallet.metadata")?,
            })
        }
        Kind::SetOverdraft => Command::SetOverdraft {
            wallet: r.name("set_overdraft.wallet")?,
            asset: r.asset("set_overdraft.asset")?,
            limit: r.decimal("set_overdraft.limit")?,
        },
        Kind::Freeze => Command::Freeze {
            wallet: r.name("freeze.wallet")?,
        },
        Kind::Unfreeze => Command::Unfreeze {
            wallet: r.name("unfreeze.wallet")?,
        },
        Kind::AssignPlan => Command::AssignPlan {
            wallet: r.name("assign_plan.wallet")?,
            plan: r.name("assign_plan.plan")?,
            version: r.u32("assign_plan.version")?,
            effective_from: Timestamp(r.i64("assign_plan.effective_from")?),
        },
        Kind::Grant => Command::Grant(Grant {
            wallet: r.name("grant.wallet")?,
            asset: r.asset("grant.asset")?,
            amount: r.decimal("grant.amount")?,
            priority: r.u32("grant.priority")?,
            effective_at: read_timestamp_option(r, "grant.effective_at")?,
            expires_at: read_timestamp_option(r, "grant.expires_at")?,
            source: read_grant_source(r)?,
        }),
        Kind::Usage => Command::Usage(read_usage(r)?),
        Kind::Reserve => Command::Reserve {
            wallet: r.name("reserve.wallet")?,
            amount: read_reserve_amount(r)?,
            deadline: Timestamp(r.i64("reserve.deadline")?),
        },
        Kind::Settle => Command::Settle {
            wallet: r.name("settle.wallet")?,
            hold: HoldId(r.u64("settle.hold")?),
            usage: read_usage(r)?,
        },
        Kind::Release => Command::Release {
            wallet: r.name("release.wallet")?,
            hold: HoldId(r.u64("release.hold")?),
        },
        Kind::Refund => Command::Refund {
            wallet: r.name("refund.wallet")?,
            event: RequestId(r.u128("refund.event")?),
            amount: r.decimal_option("refund.amount")?,
        },
        Kind::Dispute => Command::Dispute {
            wallet: r.name("dispute.wallet")?,
            grant: GrantId(r.u64("dispute.grant")?),
            freeze: r.bool("dispute.freeze")?,
        },
        Kind::DisputeWon => Command::DisputeWon {
            wallet: r.name("dispute_won.wallet")?,
            grant: GrantId(r.u64("dispute_won.grant")?),
        },
        Kind::Adjust => Command::Adjust {
            wallet: r.name("adjust.wallet")?,
            asset: r.asset("adjust.asset")?,
            amount: r.decimal("adjust.amount")?,
            reason: r.str16("adjust.reason")?.to_owned(),
        },
        Kind::SetTopUpRule => Command::SetTopUpRule {
            wallet: r.name("set_topup_rule.wallet")?,
            rule: read_topup_rule(r)?,
        },
        Kind::RemoveTopUpRule => Command::RemoveTopUpRule {
            wallet: r.name("remove_topup_rule.wallet")?,
            asset: r.asset("remove_topup_rule.asset")?,
        },
        Kind::TopUpSucceeded => Command::TopUpSucceeded {
            wallet: r.name("topup_succeeded.wallet")?,
            asset: r.asset("topup_succeeded.asset")?,
            trigger: r.u64("topup_succeeded.trigger")?,
            payment_id: r.name("topup_succeeded.payment_id")?,
            amount: r.decimal("topup_succeeded.amount")?,
        },
        Kind::TopUpFailed => Command::TopUpFailed {
            wallet: r.name("topup_failed.wallet")?,
            asset: r.asset("topup_failed.asset")?,
            trigger: r.u64("topup_failed.trigger")?,
            reason: r.name("topup_failed.reason")?,
        },
        Kind::PriceAsset => Command::PriceAsset {
            asset: r.asset("price_asset.asset")?,
            price: if r.present("price_asset.price")? {
                Some(TopUpPrice {
                    currency: r.name("price_asset.currency")?,
                    unit_amount: r.decimal("price_asset.unit_amount")?,
                })
            } else {
                None
            },
        },
        Kind::SetBilling => Command::SetBilling {
            wallet: r.name("set_billing.wallet")?,
            customer: read_name_option(r, "set_billing.customer")?,
            payment_method: read_name_option(r, "set_billing.payment_method")?,
        },
        Kind::Payment => Command::Payment {
            wallet: r.name("payment.wallet")?,
            payment_id: r.name("payment.payment_id")?,
            event: match r.u8("payment.event")? {
                0 => PaymentEvent::Disputed {
                    freeze: r.bool("payment.freeze")?,
                },
                1 => PaymentEvent::DisputeWon,
                3 => PaymentEvent::DisputeLost {
                    freeze: r.bool("payment.freeze")?,
                },
                2 => PaymentEvent::Refunded {
                    refunded: r.decimal("payment.refunded")?,
                },
                t => return Err(Reader::unknown_tag("payment.event", t.into())),
            },
        },
        other => return Err(unexpected(other)),
    })
}

fn unexpected(kind: Kind) -> BodyError {
    BodyError {
        field: "kind",
        problem: Problem::UnexpectedKind(kind as u8),
    }
}

fn write_query(w: &mut Writer<'_>, query: &Query) -> Result<(), EncodeError> {
    match query {
        Query::Wallet { wallet } => w.name(wallet),
        Query::Balance { wallet, asset } => {
            w.name(wallet);
            w.name(asset);
        }
        Query::Margin(scope) => match scope {
            MarginScope::Total => w.u8(0),
            MarginScope::Wallet(wallet) => {
                w.u8(1);
                w.name(wallet);
            }
            MarginScope::Product(product) => {
                w.u8(2);
                w.name(product);
            }
            MarginScope::PlanVersion { plan, version } => {
                w.u8(3);
                w.name(plan);
                w.u32(*version);
            }
            MarginScope::Hours { from, to } => {
                w.u8(4);
                w.i64(from.0);
                w.i64(to.0);
            }
        },
        Query::PricePreview(usage) => write_usage(w, usage)?,
        Query::Asset { asset } => w.name(asset),
        Query::Plans => {}
        Query::DraftTest { plan, events } => {
            w.name(plan);
            w.count32("draft_test.events", events.len())?;
            for e in events {
                write_usage(w, e)?;
            }
        }
    }
    Ok(())
}

fn read_query(kind: Kind, r: &mut Reader<'_>) -> Result<Query, BodyError> {
    Ok(match kind {
        Kind::QueryWallet => Query::Wallet {
            wallet: r.name("query_wallet.wallet")?,
        },
        Kind::QueryBalance => Query::Balance {
            wallet: r.name("query_balance.wallet")?,
            asset: r.asset("query_balance.asset")?,
        },
        Kind::QueryMargin => Query::Margin(match r.u8("query_margin.scope")? {
            0 => MarginScope::Total,
            1 => MarginScope::Wallet(r.name("query_margin.wallet")?),
            2 => MarginScope::Product(r.name("query_margin.product")?),
            3 => MarginScope::PlanVersion {
                plan: r.name("query_margin.plan")?,
                version: r.u32("query_margin.version")?,
            },
            4 => MarginScope::Hours {
                from: Timestamp(r.i64("query_margin.from")?),
                to: Timestamp(r.i64("query_margin.to")?),
            },
            t => return Err(Reader::unknown_tag("query_margin.scope", t.into())),
        }),
        Kind::QueryPricePreview => Query::PricePreview(read_usage(r)?),
        Kind::QueryPlans => Query::Plans,
        Kind::QueryAsset => Query::Asset {
            asset: r.asset("query_asset.asset")?,
        },
        Kind::QueryDraftTest => {
            let plan = r.name("draft_test.plan")?;
            let n = r.count32("draft_test.events", USAGE_BYTES_MIN)?;
            let mut events = Vec::with_capacity(n.min(BATCH_ITEMS_MAX));
            for _ in 0..n {
                events.push(read_usage(r)?);
            }
            Query::DraftTest { plan, events }
        }
        other => return Err(unexpected(other)),
    })
}

fn write_reply(w: &mut Writer<'_>, reply: &Reply) {
    w.u16(reply.code as u16);
    match reply.value {
        ReplyValue::None => w.u8(0),
        ReplyValue::Grant { grant, debt_paid } => {
            w.u8(1);
            w.u64(grant.0);
            w.decimal(&debt_paid);
        }
        ReplyValue::Charge {
            asset,
            charged,
            debt_added,
            available,
        } => {
            w.u8(2);
            w.name(&asset);
            w.decimal(&charged);
            w.decimal(&debt_added);
            w.decimal(&available);
        }
        ReplyValue::Hold {
            hold,
            asset,
            amount,
            available,
        } => {
            w.u8(3);
            w.u64(hold.0);
            w.name(&asset);
            w.decimal(&amount);
            w.decimal(&available);
        }
        ReplyValue::Refund {
            grant,
            refunded,
            refundable,
        } => {
            w.u8(4);
            w.u64(grant.0);
            w.decimal(&refunded);
            w.decimal(&refundable);
        }
        ReplyValue::Dispute {
            clawed_back,
            debt_added,
        } => {
            w.u8(5);
            w.decimal(&clawed_back);
            w.decimal(&debt_added);
        }
        ReplyValue::Version { version } => {
            w.u8(6);
            w.u32(version);
        }
        ReplyValue::Shortfall {
            asset,
            spendable,
            required,
        } => {
            w.u8(7);
            w.name(&asset);
            w.decimal(&spendable);
            w.decimal(&required);
        }
    }
}

/// Reads a reply's value; the code was read by the caller.
fn read_reply(code: ResultCode, r: &mut Reader<'_>) -> Result<Reply, BodyError> {
    let value = match r.u8("reply.value")? {
        0 => ReplyValue::None,
        1 => ReplyValue::Grant {
            grant: GrantId(r.u64("reply.grant")?),
            debt_paid: r.decimal("reply.debt_paid")?,
        },
        2 => ReplyValue::Charge {
            asset: r.asset("reply.asset")?,
            charged: r.decimal("reply.charged")?,
            debt_added: r.decimal("reply.debt_added")?,
            available: r.decimal("reply.available")?,
        },
        3 => ReplyValue::Hold {
            hold: HoldId(r.u64("reply.hold")?),
            asset: r.asset("reply.asset")?,
            amount: r.decimal("reply.amount")?,
            available: r.decimal("reply.available")?,
        },
        4 => ReplyValue::Refund {
            grant: GrantId(r.u64("reply.grant")?),
            refunded: r.decimal("reply.refunded")?,
            refundable: r.decimal("reply.refundable")?,
        },
        5 => ReplyValue::Dispute {
            clawed_back: r.decimal("reply.clawed_back")?,
            debt_added: r.decimal("reply.debt_added")?,
        },
        6 => ReplyValue::Version {
            version: r.u32("reply.version")?,
        },
        7 => ReplyValue::Shortfall {
            asset: r.asset("reply.asset")?,
            spendable: r.decimal("reply.spendable")?,
            required: r.decimal("reply.required")?,
        },
        t => return Err(Reader::unknown_tag("reply.value", t.into())),
    };
    Ok(Reply { code, value })
}

fn write_balance(w: &mut Writer<'_>, b: &BalanceView) {
    w.name(&b.asset);
    for d in [
        &b.ledger,
        &b.available,
        &b.held,
        &b.debt,
        &b.pending,
        &b.overdraft,
    ] {
        w.decimal(d);
    }
}

fn read_balance(r: &mut Reader<'_>) -> Result<BalanceView, BodyError> {
    Ok(BalanceView {
        asset: r.asset("balance.asset")?,
        ledger: r.decimal("balance.ledger")?,
        available: r.decimal("balance.available")?,
        held: r.decimal("balance.held")?,
        debt: r.decimal("balance.debt")?,
        pending: r.decimal("balance.pending")?,
        overdraft: r.decimal("balance.overdraft")?,
    })
}

fn write_margin(w: &mut Writer<'_>, m: &MarginView) {
    w.u64(m.events);
    w.decimal(&m.revenue_usd);
    w.decimal(&m.cost_usd);
    w.decimal(&m.refunded_usd);
    w.decimal(&m.margin_usd);
}

fn read_margin(r: &mut Reader<'_>) -> Result<MarginView, BodyError> {
    Ok(MarginView {
        events: r.u64("margin.events")?,
        revenue_usd: r.decimal("margin.revenue_usd")?,
        cost_usd: r.decimal("margin.cost_usd")?,
        refunded_usd: r.decimal("margin.refunded_usd")?,
        margin_usd: r.decimal("margin.margin_usd")?,
    })
}

fn write_row(w: &mut Writer<'_>, row: &DraftTestRow) {
    w.u64(row.events);
    w.decimal(&row.revenue_current_usd);
    w.decimal(&row.revenue_draft_usd);
    w.decimal(&row.cost_usd);
    w.decimal(&row.margin_current_usd);
    w.decimal(&row.margin_draft_usd);
    w.u64(row.unpriced_current);
    w.u64(row.unpriced_draft);
}

const ROW_BYTES: usize = 8 + 5 * 17 + 8 + 8;

fn read_row(r: &mut Reader<'_>) -> Result<DraftTestRow, BodyError> {
    Ok(DraftTestRow {
        events: r.u64("draft_test.row.events")?,
        revenue_current_usd: r.decimal("draft_test.row.revenue_current_usd")?,
        revenue_draft_usd: r.decimal("draft_test.row.revenue_draft_usd")?,
        cost_usd: r.decimal("draft_test.row.cost_usd")?,
        margin_current_usd: r.decimal("draft_test.row.margin_current_usd")?,
        margin_draft_usd: r.decimal("draft_test.row.margin_draft_usd")?,
        unpriced_current: r.u64("draft_test.row.unpriced_current")?,
        unpriced_draft: r.u64("draft_test.row.unpriced_draft")?,
    })
}

fn write_answer(w: &mut Writer<'_>, answer: &Answer) -> Result<(), EncodeError> {
    match answer {
        Answer::Wallet(v) => {
            w.u8(0);
            w.name(&v.wallet);
            w.bool(v.frozen);
            w.count16("wallet.topup_flagged", v.topup_flagged.len())?;
            for a in &v.topup_flagged {
                w.name(a);
            }
            write_pairs(w, "wallet.metadata", &v.metadata)?;
            w.count16("wallet.balances", v.balances.len())?;
            for b in &v.balances {
                write_balance(w, b);
            }
            w.count16("wallet.grants", v.grants.len())?;
            for g in &v.grants {
                w.u64(g.id.0);
                w.name(&g.asset);
                w.decimal(&g.amount);
                w.decimal(&g.remaining);
                w.u32(g.priority);
                write_timestamp_option(w, g.effective_at);
                write_timestamp_option(w, g.expires_at);
                write_grant_source(w, &g.source);
            }
            w.count16("wallet.holds", v.holds.len())?;
            for h in &v.holds {
                w.u64(h.id.0);
                w.name(&h.asset);
                w.decimal(&h.amount);
                w.i64(h.deadline.0);
            }
            w.count16("wallet.plans", v.plans.len())?;
            for (plan, version, from) in &v.plans {
                w.name(plan);
                w.u32(*version);
                w.i64(from.0);
            }
            w.count16("wallet.topup_rules", v.topup_rules.len())?;
            for rule in &v.topup_rules {
                write_topup_rule(w, rule);
            }
            write_margin(w, &v.margin);
            write_name_option(w, v.customer.as_ref());
            write_name_option(w, v.payment_method.as_ref());
            w.count16("wallet.topups", v.topups.len())?;
            for t in &v.topups {
                w.name(&t.asset);
                match t.in_flight {
                    None => w.u8(0),
                    Some((trigger, amount, at)) => {
                        w.u8(1);
                        w.u64(trigger);
                        w.decimal(&amount);
                        w.i64(at.0);
                    }
                }
                w.u32(t.failures);
                write_name_option(w, t.last_failure.as_ref());
            }
        }
        Answer::Balance(b) => {
            w.u8(1);
            write_balance(w, b);
        }
        Answer::Margin(m) => {
            w.u8(2);
            write_margin(w, m);
        }
        Answer::Price(p) => {
            w.u8(3);
            w.name(&p.asset);
            w.decimal(&p.amount);
            w.name(&p.plan);
            w.u32(p.version);
            w.u32(p.rule);
        }
        Answer::Asset(a) => {
            w.u8(5);
            w.name(&a.code);
            w.u32(a.scale);
            w.decimal(&a.usd_value);
            match &a.topup_price {
                Some(p) => {
                    w.u8(1);
                    w.name(&p.currency);
                    w.decimal(&p.unit_amount);
                }
                None => w.u8(0),
            }
        }
        Answer::Plans(plans) => {
            w.u8(6);
            w.count32("plans", plans.len())?;
            let version = |w: &mut Writer<'_>, v: &tally_engine::PlanVersionView| {
                w.u32(v.version);
                w.name(&v.asset);
                w.i64(v.at.0);
                write_rules(w, &v.rules)
            };
            for p in plans {
                w.name(&p.plan);
                write_name_option(w, p.custom_for.as_ref());
                w.count32("plans[].versions", p.versions.len())?;
                for v in &p.versions {
                    version(w, v)?;
                }
                match &p.draft {
                    Some(d) => {
                        w.u8(1);
                        version(w, d)?;
                    }
                    None => w.u8(0),
                }
            }
        }
        Answer::DraftTest(d) => {
            w.u8(4);
            w.name(&d.plan);
            match d.current_version {
                Some(v) => {
                    w.u8(1);
                    w.u32(v);
                }
                None => w.u8(0),
            }
            w.count32("draft_test.wallets", d.wallets.len())?;
            for (wallet, row) in &d.wallets {
                w.name(wallet);
                write_row(w, row);
            }
            write_row(w, &d.total);
        }
    }
    Ok(())
}

fn read_answer(r: &mut Reader<'_>) -> Result<Answer, BodyError> {
    Ok(match r.u8("answer.kind")? {
        0 => {
            let wallet = r.name("wallet.wallet")?;
            let frozen = r.bool("wallet.frozen")?;
            let n = r.count16("wallet.topup_flagged", NAME_BYTES_MIN)?;
            let mut topup_flagged = Vec::with_capacity(n);
            for _ in 0..n {
                topup_flagged.push(r.asset("wallet.topup_flagged[]")?);
            }
            let metadata = read_pairs(r, "wallet.metadata")?;
            let n = r.count16("wallet.balances", NAME_BYTES_MIN + 6 * 17)?;
            let mut balances = Vec::with_capacity(n);
            for _ in 0..n {
                balances.push(read_balance(r)?);
            }
            let n = r.count16("wallet.grants", 8 + NAME_BYTES_MIN + 2 * 17 + 4 + 1 + 1 + 1)?;
            let mut grants = Vec::with_capacity(n);
            for _ in 0..n {
                grants.push(GrantView {
                    id: GrantId(r.u64("wallet.grants[].id")?),
                    asset: r.asset("wallet.grants[].asset")?,
                    amount: r.decimal("wallet.grants[].amount")?,
                    remaining: r.decimal("wallet.grants[].remaining")?,
                    priority: r.u32("wallet.grants[].priority")?,
                    effective_at: read_timestamp_option(r, "wallet.grants[].effective_at")?,
                    expires_at: read_timestamp_option(r, "wallet.grants[].expires_at")?,
                    source: read_grant_source(r)?,
                });
            }
            let n = r.count16("wallet.holds", 8 + NAME_BYTES_MIN + 17 + 8)?;
            let mut holds = Vec::with_capacity(n);
            for _ in 0..n {
                holds.push(HoldInfo {
                    id: HoldId(r.u64("wallet.holds[].id")?),
                    asset: r.asset("wallet.holds[].asset")?,
                    amount: r.decimal("wallet.holds[].amount")?,
                    deadline: Timestamp(r.i64("wallet.holds[].deadline")?),
                });
            }
            let n = r.count16("wallet.plans", NAME_BYTES_MIN + 4 + 8)?;
            let mut plans = Vec::with_capacity(n);
            for _ in 0..n {
                plans.push((
                    r.name("wallet.plans[].plan")?,
                    r.u32("wallet.plans[].version")?,
                    Timestamp(r.i64("wallet.plans[].from")?),
                ));
            }
            let n = r.count16(
                "wallet.topup_rules",
                2 * NAME_BYTES_MIN + 2 * 17 + 1 + 4 + 8 + 1,
            )?;
            let mut topup_rules = Vec::with_capacity(n);
            for _ in 0..n {
                topup_rules.push(read_topup_rule(r)?);
            }
            Answer::Wallet(WalletInfo {
                wallet,
                frozen,
                topup_flagged,
                metadata,
                balances,
                grants,
                holds,
                plans,
                topup_rules,
                margin: read_margin(r)?,
                customer: read_name_option(r, "wallet.customer")?,
                payment_method: read_name_option(r, "wallet.payment_method")?,
                topups: {
                    let n = r.count16("wallet.topups", NAME_BYTES_MIN + 1 + 4 + 1)?;
                    let mut topups = Vec::with_capacity(n);
                    for _ in 0..n {
                        topups.push(TopUpStatus {
                            asset: r.asset("wallet.topups[].asset")?,
                            in_flight: if r.present("wallet.topups[].in_flight")? {
                                Some((
                                    r.u64("wallet.topups[].trigger")?,
                                    r.decimal("wallet.topups[].amount")?,
                                    Timestamp(r.i64("wallet.topups[].at")?),
                                ))
                            } else {
                                None
                            },
                            failures: r.u32("wallet.topups[].failures")?,
                            last_failure: read_name_option(r, "wallet.topups[].last_failure")?,
                        });
                    }
                    topups
                },
            })
        }
        1 => Answer::Balance(read_balance(r)?),
        2 => Answer::Margin(read_margin(r)?),
        3 => Answer::Price(PriceView {
            asset: r.asset("price.asset")?,
            amount: r.decimal("price.amount")?,
            plan: r.name("price.plan")?,
            version: r.u32("price.version")?,
            rule: r.u32("price.rule")?,
        }),
        4 => {
            let plan = r.name("draft_test.plan")?;
            let current_version = if r.present("draft_test.current_version")? {
                Some(r.u32("draft_test.current_version")?)
            } else {
                None
            };
            let n = r.count32("draft_test.wallets", NAME_BYTES_MIN + ROW_BYTES)?;
            let mut wallets = Vec::with_capacity(n.min(BATCH_ITEMS_MAX));
            for _ in 0..n {
                wallets.push((r.name("draft_test.wallets[].wallet")?, read_row(r)?));
            }
            Answer::DraftTest(DraftTestReport {
                plan,
                current_version,
                wallets,
                total: read_row(r)?,
            })
        }
        6 => {
            let version = |r: &mut Reader<'_>| -> Result<tally_engine::PlanVersionView, BodyError> {
                Ok(tally_engine::PlanVersionView {
                    version: r.u32("plans[].version")?,
                    asset: r.asset("plans[].asset")?,
                    at: Timestamp(r.i64("plans[].at")?),
                    rules: read_rules(r)?,
                })
            };
            let n = r.count32("plans", NAME_BYTES_MIN)?;
            let mut plans = Vec::with_capacity(n.min(BATCH_ITEMS_MAX));
            for _ in 0..n {
                let plan = r.name("plans[].plan")?;
                let custom_for = read_name_option(r, "plans[].custom_for")?;
                let m = r.count32("plans[].versions", NAME_BYTES_MIN)?;
                let mut versions = Vec::with_capacity(m.min(BATCH_ITEMS_MAX));
                for _ in 0..m {
                    versions.push(version(r)?);
                }
                let draft = if r.present("plans[].draft")? {
                    Some(version(r)?)
                } else {
                    None
                };
                plans.push(tally_engine::PlanView {
                    plan,
                    custom_for,
                    versions,
                    draft,
                });
            }
            Answer::Plans(plans)
        }
        5 => Answer::Asset(tally_engine::Asset {
            code: r.asset("asset.code")?,
            scale: r.u32("asset.scale")?,
            usd_value: r.decimal("asset.usd_value")?,
            topup_price: if r.present("asset.topup_price")? {
                Some(tally_engine::TopUpPrice {
                    currency: r.name("asset.topup_price.currency")?,
                    unit_amount: r.decimal("asset.topup_price.unit_amount")?,
                })
            } else {
                None
            },
        }),
        t => return Err(Reader::unknown_tag("answer.kind", t.into())),
    })
}
