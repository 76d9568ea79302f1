//! What the server writes into each WAL record: one engine input with the time it was applied.
//!
//! Layout: one version byte (`RECORD_VERSION`), then the bincode (standard config) encoding of
//! [`LogRecord`]. The WAL itself adds length, LSN and checksum around it.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tally_engine::{Engine, RecordedCharge, Request, Timestamp};

/// Version of the payload layout inside a WAL record.
pub const RECORD_VERSION: u8 = 1;

/// One logged engine input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The time the shard stamped on the batch.
    pub at: Timestamp,
    /// The input.
    pub entry: LogEntry,
}

/// An engine input. (Records are built one at a time and encoded at once, so the size gap
/// between variants costs nothing.)
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogEntry {
    /// `Engine::handle_request(at, request)`.
    Request(Request),
    /// `Engine::handle_timeout(at)`: logged when an idle shard fires due timers, so that their
    /// effects have an LSN and replay fires them at the same point.
    Tick,
    /// `Engine::set_idempotency(at, ..)`: logged when a shard starts with other idempotency
    /// settings than its state's, so that replay applies them at the same point.
    Settings {
        /// The new window.
        idempotency_retention_us: i64,
        /// The new bound.
        idempotency_max_ids: u64,
    },
    /// `Engine::set_alerts(at, ..)`: logged when a shard starts with other alert settings than
    /// its state's (or is new), so that replay applies them at the same point.
    Alerts {
        /// The low-balance line in USD (zero: none).
        #[serde(with = "tally_engine::dec")]
        low_balance_usd: Decimal,
        /// How long before a grant expires its notice goes out (zero: never).
        grant_expiring_lead_us: i64,
    },
    /// `Engine::handle_recorded_refund(at, request, charge)`: a refund with the charge the
    /// history store recorded, for a charge past the idempotency window.
    RecordedRefund {
        /// The refund.
        request: Request,
        /// The charge as the store recorded it.
        charge: RecordedCharge,
    },
}

impl LogEntry {
    /// Applies the input to `engine` at `at`: what the shard did when it logged it, and what
    /// replay does.
    pub fn apply(&self, engine: &mut Engine, at: Timestamp) -> Result<(), String> {
        match self {
            LogEntry::Request(request) => {
                engine.handle_request(at, request);
            }
            LogEntry::Tick => engine.handle_timeout(at),
            LogEntry::Settings {
                idempotency_retention_us,
                idempotency_max_ids,
            } => engine.set_idempotency(at, *idempotency_retention_us, *idempotency_max_ids)?,
            LogEntry::Alerts {
                low_balance_usd,
                grant_expiring_lead_us,
            } => engine.set_alerts(at, *low_balance_usd, *grant_expiring_lead_us)?,
            LogEntry::RecordedRefund { request, charge } => {
                engine.handle_recorded_refund(at, request, charge);
            }
        }
        Ok(())
    }
}

/// Why a WAL record's payload cannot be decoded.
#[derive(Debug)]
pub enum DecodeError {
    /// The payload is empty.
    Empty,
    /// A version this build does not know.
    Version(u8),
    /// The bincode body is malformed.
    Body(bincode::error::DecodeError),
    /// Bytes are left after the record.
    Trailing(usize),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "empty WAL record payload"),
            DecodeError::Version(v) => write!(
                f,
                "WAL record version {v} is not supported by this build (expects {RECORD_VERSION}); \
                 run the tally version that wrote it"
            ),
            DecodeError::Body(e) => write!(f, "malformed WAL record payload: {e}"),
            DecodeError::Trailing(n) => write!(f, "{n} unexpected bytes after a WAL record"),
        }
    }
}

impl std::error::Error for DecodeError {}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 16 * 1024 * 1024 }>()
}

/// A borrowed view of [`LogRecord`] with the same serde shape, so the shard loop can log a
/// request without copying it. Encodes to exactly the bytes `LogRecord` does.
#[derive(Serialize)]
#[serde(rename = "LogRecord")]
struct RecordRef<'a> {
    at: Timestamp,
    entry: EntryRef<'a>,
}

#[derive(Serialize)]
#[serde(rename = "LogEntry")]
enum EntryRef<'a> {
    Request(&'a Request),
    #[allow(dead_code)] // keeps the variant index of `LogEntry::Tick`
    Tick,
}

/// Encodes a request record into `buf` (cleared first) without copying the request.
pub fn encode_request(at: Timestamp, request: &Request, buf: &mut Vec<u8>) {
    buf.clear();
    buf.push(RECORD_VERSION);
    let record = RecordRef {
        at,
        entry: EntryRef::Request(request),
    };
    bincode::serde::encode_into_std_write(&record, buf, config())
        .expect("encoding into a Vec cannot fail");
}

/// Encodes `record` into `buf` (cleared first).
pub fn encode(record: &LogRecord, buf: &mut Vec<u8>) {
    buf.clear();
    buf.push(RECORD_VERSION);
    bincode::serde::encode_into_std_write(record, buf, config())
        .expect("encoding into a Vec cannot fail");
}

/// Decodes a WAL record payload.
pub fn decode(bytes: &[u8]) -> Result<LogRecord, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != RECORD_VERSION {
        return Err(DecodeError::Version(version));
    }
    let (record, used) =
        bincode::serde::decode_from_slice(body, config()).map_err(DecodeError::Body)?;
    if used != body.len() {
        return Err(DecodeError::Trailing(body.len() - used));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_engine::{name, Command, RequestId};

    #[test]
    fn round_trip_and_refusals() {
        let record = LogRecord {
            at: Timestamp(42),
            entry: LogEntry::Request(Request {
                id: RequestId(7),
                command: Command::Freeze { wallet: name("w") },
            }),
        };
        let mut buf = Vec::new();
        encode(&record, &mut buf);
        assert_eq!(decode(&buf).unwrap(), record);
        let mut borrowed = Vec::new();
        let LogEntry::Request(request) = &record.entry else {
            unreachable!()
        };
        encode_request(record.at, request, &mut borrowed);
        assert_eq!(
            borrowed, buf,
            "the borrowed encoding must be byte-identical"
        );
        assert!(matches!(decode(&[]), Err(DecodeError::Empty)));
        let mut future = buf.clone();
        future[0] = 99;
        assert!(matches!(decode(&future), Err(DecodeError::Version(99))));
        assert!(matches!(
            decode(&buf[..buf.len() - 1]),
            Err(DecodeError::Body(_))
        ));
        let mut long = buf.clone();
        long.push(0);
        assert!(matches!(decode(&long), Err(DecodeError::Trailing(1))));
        // Arbitrary bytes never panic.
        for seed in 0..2_000u32 {
            let bytes: Vec<u8> = (0..(seed % 97))
                .map(|i| (seed.wrapping_mul(31) ^ i) as u8)
                .collect();
            let mut v = vec![RECORD_VERSION];
            v.extend(bytes);
            let _ = decode(&v);
        }
    }
}
