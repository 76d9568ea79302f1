//! Transport error codes: failures outside the ledger (busy, stopped, unauthenticated, malformed
//! frames, ...), carried by `Error` frames and by batch items.
//!
//! They share one `u16` number space with `tally_engine::ResultCode`: result codes are below
//! 1000, transport codes are 1000 and above, so a batch item's outcome is one number. Numbers are
//! stable forever, like result codes. This module only names the codes; deciding when to send one
//! is the server's business.

use std::fmt;

/// The first transport error number; every `ResultCode` is below it.
pub const ERROR_CODE_MIN: u16 = 1000;

macro_rules! error_codes {
    ($( $(#[doc = $doc:literal])* $name:ident = $num:literal, )*) => {
        /// A transport-level failure. The request was not applied (or, for `Busy`, not queued):
        /// retrying a mutating request with the same request id is always safe.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u16)]
        pub enum ErrorCode {
            $( $(#[doc = $doc])* $name = $num, )*
        }

        impl ErrorCode {
            /// Every code, in number order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The code with this stable number, if there is one.
            pub fn from_u16(n: u16) -> Option<ErrorCode> {
                match n {
                    $( $num => Some(ErrorCode::$name), )*
                    _ => None,
                }
            }

            /// The stable name of the code.
            pub fn name(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => stringify!($name), )*
                }
            }
        }
    };
}

error_codes! {
    /// The payload does not decode; the message names the field. The stream goes on.
    Malformed = 1000,
    /// The frame kind is unknown or not a request. The stream is closed after this.
    UnknownKind = 1001,
    /// No common protocol version, or a header with an unknown version. The stream is closed.
    UnsupportedVersion = 1002,
    /// The frame is over the size limit. The stream is closed.
    FrameTooLarge = 1003,
    /// A request arrived before a successful `Auth`.
    Unauthenticated = 1004,
    /// The API key is unknown or revoked (answer to `Auth`, or to any request after the key
    /// was revoked). The connection is closed.
    InvalidKey = 1005,
    /// The key's scope does not allow this request (a gateway key sending an admin request).
    OutOfScope = 1006,
    /// A shard's queue is full; retry later with the same request id.
    Busy = 1007,
    /// The server or the shard is stopping.
    Stopped = 1008,
    /// A shard's WAL failed; the server must restart and recover. Retry after reconnecting.
    Poisoned = 1009,
    /// The request does not fit in one WAL record (or a batch in one shard message).
    RequestTooLarge = 1010,
    /// The connection already has the most requests in flight the server allows.
    TooManyInFlight = 1011,
    /// An online snapshot could not be written (nothing is lost: the WAL is kept).
    SnapshotFailed = 1012,
    /// A frame that is valid but not allowed now (a second `Hello`, `Auth` before `Hello`, an
    /// answer kind sent by a client). The connection is closed.
    ProtocolViolation = 1013,
    /// The server already has the most connections it allows; the connection is closed at once.
    TooManyConnections = 1014,
    /// `KeyRevoke` of an id that is not an active key.
    UnknownKey = 1015,
    /// `KeyRevoke` of the last active admin key (nobody could manage the server after it).
    LastAdminKey = 1016,
    /// The key file could not be written; no key changed.
    KeyStoreFailed = 1017,
    /// The answer is larger than the frame limit the client announced in `Hello`.
    AnswerTooLarge = 1018,

    // 1100-1199: HTTP only.
    /// The request body or a parameter is not valid JSON of the documented shape (a wrong type,
    /// an unknown or missing field, a bad decimal or time); the message names the field.
    InvalidBody = 1100,
    /// A mutating HTTP request has no `Idempotency-Key` header, or the key is empty, longer than
    /// 255 bytes or not printable ASCII.
    IdempotencyKeyRequired = 1101,
    /// The request body is over the size limit.
    BodyTooLarge = 1102,
    /// No route has this path.
    NotFound = 1103,
    /// The route does not take this method.
    MethodNotAllowed = 1104,
    /// The server is still recovering (or its shards are not all running); retry shortly.
    NotReady = 1105,
    /// The body is not `application/json`.
    UnsupportedMediaType = 1106,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}
