//! tally-net: tally's wire protocol as a pure codec: frames, opcodes, payloads and their
//! conversion to and from engine types. The byte layout is documented in `docs/protocol.md`.
//!
//! The codec knows nothing about sockets, QUIC, TLS, threads or clocks: bytes go in through
//! [`Decoder::feed`] and frames come out of [`Decoder::next_frame`]; messages are appended to a
//! caller-owned `Vec<u8>` by [`Message::encode`]. It also does not decide anything: whether a key
//! is valid, which scope a request needs at run time, or how many requests may be in flight is
//! the server's business (the QUIC server, authentication and the client are built on top).
//!
//! Layers, outermost first:
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
pub mod message;

pub use codec::{BodyError, EncodeError, Problem, DECIMAL_BYTES};
pub use error::{ErrorCode, ERROR_CODE_MIN};
pub use frame::{
    DecodeError, Decoder, Frame, Header, Kind, FRAME_PAYLOAD_BYTES_MAX, HEADER_BYTES, MAGIC,
    PROTOCOL_VERSION,
};
pub use message::{
    command_kind, query_kind, Answer, CheckpointInfo, ErrorFrame, HealthReport, Hello, HoldInfo,
    Message, Outcome, ReserveItem, Scope, WalletInfo, Welcome, API_KEY_BYTES_MAX, BATCH_ITEMS_MAX,
    PROTOCOL_VERSIONS,
};
