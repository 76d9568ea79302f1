//! Framing: the 16-byte frame header, frame kinds, the streaming [`Decoder`] and frame encoding.
//!
//! A frame is a fixed header followed by `length` payload bytes. This module checks the header
//! (magic, version, kind, flags, length against the limit) and cuts frames out of a byte stream;
//! it does not look inside payloads (that is [`crate::message`]) and knows nothing about sockets:
//! bytes come in through [`Decoder::feed`] and go out into a caller-owned `Vec<u8>`.
//!
//! ```text
//! offset  size  field
//! 0       1     magic       0x74 ('t')
//! 1       1     version     1
//! 2       1     kind        frame kind / opcode (see `Kind`)
//! 3       1     flags       0 in version 1 (any set bit is refused)
//! 4       4     length      payload bytes, u32 little-endian, <= FRAME_PAYLOAD_BYTES_MAX
//! 8       8     request id  u64 little-endian, chosen by the client, echoed by the answer
//! 16      ...   payload
//! ```

use std::fmt;

/// The first byte of every frame.
pub const MAGIC: u8 = 0x74;
/// The protocol version this crate speaks, and the only one its decoder accepts in a header.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes in a frame header.
pub const HEADER_BYTES: usize = 16;
/// The largest payload a frame may carry (8 MiB). A peer may announce a smaller limit in
/// `Hello` / `Welcome`; nothing larger is ever accepted, and the decoder refuses a larger length
/// as soon as the header is complete, before buffering the payload.
pub const FRAME_PAYLOAD_BYTES_MAX: u32 = 8 << 20;

// The length field must be able to express the limit, and a whole frame must fit in memory
// arithmetic on 32-bit targets.
const _: () = assert!((FRAME_PAYLOAD_BYTES_MAX as u64) + (HEADER_BYTES as u64) < u32::MAX as u64);

macro_rules! kinds {
    ($( $(#[doc = $doc:literal])* $name:ident = $num:literal, )*) => {
        /// What a frame carries: a handshake step, one request (one opcode per engine command,
        /// query and admin operation), a batch, an answer or an error. Numbers are stable.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum Kind {
            $( $(#[doc = $doc])* $name = $num, )*
        }

        impl Kind {
            /// Every kind, in number order.
            pub const ALL: &'static [Kind] = &[$(Kind::$name,)*];

            /// The kind with this number, if there is one.
            pub fn from_u8(n: u8) -> Option<Kind> {
                match n {
                    $( $num => Some(Kind::$name), )*
                    _ => None,
                }
            }

            /// The stable name of the kind, for logs and the protocol document.
            pub fn name(self) -> &'static str {
                match self {
                    $( Kind::$name => stringify!($name), )*
                }
            }
        }
    };
}

kinds! {
    /// Client → server, first frame: versions and limits the client speaks.
    Hello = 0x01,
    /// Server → client: the chosen version and the server's limits.
    Welcome = 0x02,
    /// Client → server, after `Welcome`: the API key.
    Auth = 0x03,
    /// Server → client: the key was accepted; its id and scope.
    AuthOk = 0x04,
    /// Server → client: a transport-level failure (see `ErrorCode`).
    Error = 0x0f,

    /// Command `DefineAsset`.
    DefineAsset = 0x10,
    /// Command `DefineProduct`.
    DefineProduct = 0x11,
    /// Command `DraftPlan`.
    DraftPlan = 0x12,
    /// Command `PublishPlan`.
    PublishPlan = 0x13,
    /// Command `CreateWallet`.
    CreateWallet = 0x14,
    /// Command `SetOverdraft`.
    SetOverdraft = 0x15,
    /// Command `Freeze`.
    Freeze = 0x16,
    /// Command `Unfreeze`.
    Unfreeze = 0x17,
    /// Command `AssignPlan`.
    AssignPlan = 0x18,
    /// Command `Grant`.
    Grant = 0x19,
    /// Command `Usage`.
    Usage = 0x1a,
    /// Command `Reserve`.
    Reserve = 0x1b,
    /// Command `Settle`.
    Settle = 0x1c,
    /// Command `Release`.
    Release = 0x1d,
    /// Command `Refund`.
    Refund = 0x1e,
    /// Command `Dispute`.
    Dispute = 0x1f,
    /// Command `DisputeWon`.
    DisputeWon = 0x20,
    /// Command `Adjust`.
    Adjust = 0x21,
    /// Command `SetTopUpRule`.
    SetTopUpRule = 0x22,
    /// Command `RemoveTopUpRule`.
    RemoveTopUpRule = 0x23,
    /// Command `TopUpSucceeded`.
    TopUpSucceeded = 0x24,
    /// Command `TopUpFailed`.
    TopUpFailed = 0x25,
    /// Command `PriceAsset`.
    PriceAsset = 0x26,
    /// Command `SetBilling`.
    SetBilling = 0x27,
    /// Command `Payment`.
    Payment = 0x28,

    /// Many usage events in one frame, answered by one `BatchReply`.
    UsageBatch = 0x30,
    /// Many reserves in one frame, answered by one `BatchReply`.
    ReserveBatch = 0x31,

    /// Query `Wallet`.
    QueryWallet = 0x40,
    /// Query `Balance`.
    QueryBalance = 0x41,
    /// Query `Margin`.
    QueryMargin = 0x42,
    /// Query `PricePreview`.
    QueryPricePreview = 0x43,
    /// Query `DraftTest`.
    QueryDraftTest = 0x44,
    /// Query `Asset`.
    QueryAsset = 0x45,
    /// Query `Plans`.
    QueryPlans = 0x46,

    /// Admin: create an API key.
    KeyCreate = 0x50,
    /// Admin: revoke an API key.
    KeyRevoke = 0x51,
    /// Admin: take an online snapshot (checkpoint) of every shard.
    Snapshot = 0x52,
    /// Health check (any authenticated key).
    Health = 0x53,
    /// Ping (any authenticated key): answered `Done` by the network layer alone, without a
    /// shard, to measure the transport's own round trip.
    Ping = 0x54,

    /// Answer to a command: result code and value.
    Reply = 0x80,
    /// Answer to a batch: one outcome per item, in order.
    BatchReply = 0x81,
    /// Answer to a query: result code and, when `Ok`, the answer.
    Answer = 0x82,
    /// Answer to `KeyCreate`: the new key's id and secret.
    KeyCreated = 0x83,
    /// Answer to an admin operation that returns nothing (`KeyRevoke`).
    Done = 0x84,
    /// Answer to `Snapshot`: one checkpoint report per shard.
    SnapshotTaken = 0x85,
    /// Answer to `Health`.
    HealthReport = 0x86,
}

impl Kind {
    /// True for requests only an `admin` key may send; everything else a `gateway` key may send
    /// too (usage, reserve, settle, release, their batches, balance and wallet reads, price
    /// previews and health). Answers and handshake kinds are not requests and return false.
    pub fn admin_only(self) -> bool {
        use Kind::*;
        matches!(
            self,
            DefineAsset
                | DefineProduct
                | DraftPlan
                | PublishPlan
                | CreateWallet
                | SetOverdraft
                | Freeze
                | Unfreeze
                | AssignPlan
                | Grant
                | Refund
                | Dispute
                | DisputeWon
                | Adjust
                | SetTopUpRule
                | RemoveTopUpRule
                | TopUpSucceeded
                | TopUpFailed
                | PriceAsset
                | SetBilling
                | Payment
                | QueryMargin
                | QueryDraftTest
                | QueryPlans
                | KeyCreate
                | KeyRevoke
                | Snapshot
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:02x})", self.name(), *self as u8)
    }
}

/// A checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the frame carries.
    pub kind: Kind,
    /// The client's id for the request; an answer carries the id of the request it answers.
    pub request_id: u64,
    /// Payload bytes.
    pub length: u32,
}

/// Why bytes are not a frame. Every variant means the stream has lost its framing: the
/// connection should answer with an `Error` frame (where it can) and close the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The first byte is not [`MAGIC`]: not a tally stream.
    BadMagic(u8),
    /// The header names a version this decoder does not speak.
    UnsupportedVersion(u8),
    /// The header names a kind that does not exist.
    UnknownKind(u8),
    /// The header sets flags version 1 does not define.
    UnknownFlags(u8),
    /// The payload length is above the limit; refused before any payload is buffered.
    TooLarge {
        /// The length the header announced.
        length: u32,
        /// The limit in force.
        max: u32,
    },
    /// The stream ended in the middle of a frame (see [`Decoder::finish`]).
    Truncated {
        /// Bytes of the unfinished frame that arrived.
        buffered: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadMagic(b) => write!(f, "not a tally frame (first byte 0x{b:02x})"),
            DecodeError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "unsupported protocol version {v} (this side speaks {PROTOCOL_VERSION})"
                )
            }
            DecodeError::UnknownKind(k) => write!(f, "unknown frame kind 0x{k:02x}"),
            DecodeError::UnknownFlags(x) => write!(f, "unknown frame flags 0x{x:02x}"),
            DecodeError::TooLarge { length, max } => {
                write!(
                    f,
                    "frame payload of {length} bytes is over the limit of {max}"
                )
            }
            DecodeError::Truncated { buffered } => {
                write!(
                    f,
                    "stream ended inside a frame ({buffered} bytes of it arrived)"
                )
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Checks a complete 16-byte header.
pub fn decode_header(bytes: &[u8; HEADER_BYTES], payload_max: u32) -> Result<Header, DecodeError> {
    if bytes[0] != MAGIC {
        return Err(DecodeError::BadMagic(bytes[0]));
    }
    if bytes[1] != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(bytes[1]));
    }
    let kind = Kind::from_u8(bytes[2]).ok_or(DecodeError::UnknownKind(bytes[2]))?;
    if bytes[3] != 0 {
        return Err(DecodeError::UnknownFlags(bytes[3]));
    }
    let length = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let max = payload_max.min(FRAME_PAYLOAD_BYTES_MAX);
    if length > max {
        return Err(DecodeError::TooLarge { length, max });
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[8..16]);
    Ok(Header {
        kind,
        request_id: u64::from_le_bytes(id),
        length,
    })
}

/// Writes a header. `length` is the payload length that follows it.
pub fn encode_header(buf: &mut Vec<u8>, kind: Kind, request_id: u64, length: u32) {
    buf.extend_from_slice(&[MAGIC, PROTOCOL_VERSION, kind as u8, 0]);
    buf.extend_from_slice(&length.to_le_bytes());
    buf.extend_from_slice(&request_id.to_le_bytes());
}

/// One frame cut out of the stream; the payload borrows the decoder's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The checked header.
    pub header: Header,
    /// Exactly `header.length` bytes.
    pub payload: &'a [u8],
}

/// A streaming frame decoder: feed it bytes as they arrive, take frames out as they complete.
///
/// It never panics on any input and never allocates more than the bytes it was fed: a header
/// announcing an oversized payload is refused when its 16th byte arrives. After an error the
/// decoder stays failed (every later call returns the same error), because the stream's framing
/// is lost. The caller owns the decoder and reuses it (and its buffer) for the whole stream.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the bytes not yet returned as a frame.
    start: usize,
    payload_max: u32,
    failed: Option<DecodeError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(FRAME_PAYLOAD_BYTES_MAX)
    }
}

impl Decoder {
    /// A decoder accepting payloads up to `payload_max` bytes (capped at
    /// [`FRAME_PAYLOAD_BYTES_MAX`]).
    pub fn new(payload_max: u32) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            payload_max: payload_max.min(FRAME_PAYLOAD_BYTES_MAX),
            failed: None,
        }
    }

    /// The payload limit in force.
    pub fn payload_max(&self) -> u32 {
        self.payload_max
    }

    /// Changes the payload limit (capped at [`FRAME_PAYLOAD_BYTES_MAX`]) for the frames whose
    /// header is not yet complete, e.g. raised once the connection authenticated.
    pub fn set_payload_max(&mut self, payload_max: u32) {
        self.payload_max = payload_max.min(FRAME_PAYLOAD_BYTES_MAX);
    }

    /// Appends bytes that arrived. Bytes of frames already returned are dropped first, so the
    /// buffer holds at most one partial frame plus what was just fed; a buffer that grew for a
    /// large frame gives its memory back once it holds little.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        const KEEP_BYTES: usize = 256 * 1024;
        if self.buf.capacity() > KEEP_BYTES && self.buf.len() + bytes.len() <= KEEP_BYTES / 4 {
            self.buf.shrink_to(KEEP_BYTES / 4);
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes of memory the buffer holds (for tests of the memory bound).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes buffered that are not yet part of a returned frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the error that ends the
    /// stream. Header fields are checked as soon as the header is complete.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, DecodeError> {
        if let Some(error) = self.failed {
            return Err(error);
        }
        let available = &self.buf[self.start..];
        if let Some(&first) = available.first() {
            // Refuse a foreign stream at its first byte rather than waiting for 16.
            if first != MAGIC {
                return Err(self.fail(DecodeError::BadMagic(first)));
            }
        }
        let Some(head) = available.first_chunk::<HEADER_BYTES>() else {
            return Ok(None);
        };
        let header = match decode_header(head, self.payload_max) {
            Ok(header) => header,
            Err(error) => return Err(self.fail(error)),
        };
        let end = HEADER_BYTES + header.length as usize;
        if available.len() < end {
            return Ok(None);
        }
        let begin = self.start + HEADER_BYTES;
        self.start += end;
        Ok(Some(Frame {
            header,
            payload: &self.buf[begin..self.start],
        }))
    }

    /// Call when the stream has ended: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if let Some(error) = self.failed {
            return Err(error);
        }
        match self.buffered() {
            0 => Ok(()),
            buffered => Err(DecodeError::Truncated { buffered }),
        }
    }

    fn fail(&mut self, error: DecodeError) -> DecodeError {
        self.failed = Some(error);
        error
    }
}
