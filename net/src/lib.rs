//! tally-net: tally's wire protocol and its QUIC server. The byte layout is documented in
//! `docs/protocol.md`; the transport (streams, limits, keys, TLS) in its §10.
//!
//! The transport layers:
//!
//! - [`server`]: the quinn listener (ALPN `tally/1`): handshake, authentication, scopes, limits,
//!   backpressure, and the [`Backend`] trait the shards are reached through (implemented by
//!   `tally-server`, which this crate does not depend on).
//! - [`keys`]: API keys, stored hashed in `<data-dir>/keys.json`, with scopes and revocation.
//! - [`tls`]: the server's certificate (configured or generated) and the client's pinning.
//!
//! The codec below them knows nothing about sockets, TLS, threads or clocks: bytes go in through
//! [`Decoder::feed`] and frames come out of [`Decoder::next_frame`]; messages are appended to a
//! caller-owned `Vec<u8>` by [`Message::encode`]. Its layers, outermost first:
//!
//! - [`frame`]: the 16-byte header, frame kinds (opcodes) and the streaming decoder. An error
//!   here means the stream lost its framing and must be closed.
//! - [`message`]: what each kind's payload holds, decoded straight into `tally_engine` types with
//!   every name and decimal validated. An error here names the field; the stream goes on.
//! - [`codec`]: the primitives (little-endian integers, exact decimals, strings, lists).
//! - [`error`]: transport error codes, sharing one number space with `tally_engine::ResultCode`.
//!
//! Nothing here panics on any input: every length is checked before it is used, and a list's
//! count is refused unless the rest of the payload could hold that many items.

pub mod codec;
pub mod error;
pub mod frame;
pub mod keys;
pub mod message;
pub mod server;
pub mod tls;

pub use codec::{BodyError, EncodeError, Problem, DECIMAL_BYTES};
pub use error::{ErrorCode, ERROR_CODE_MIN};
pub use frame::{
    DecodeError, Decoder, Frame, Header, Kind, FRAME_PAYLOAD_BYTES_MAX, HEADER_BYTES, MAGIC,
    PROTOCOL_VERSION,
};
pub use keys::{KeyStore, LiveKey};
pub use message::{
    command_kind, query_kind, Answer, CheckpointInfo, ErrorFrame, HealthReport, Hello, HoldInfo,
    Message, Outcome, ReserveItem, Scope, SinkLag, WalletInfo, Welcome, API_KEY_BYTES_MAX,
    BATCH_ITEMS_MAX, PROTOCOL_VERSIONS,
};
pub use server::{Backend, BoxFuture, Limits, NetServer, StatsSnapshot};
pub use tls::{TlsError, ALPN};
