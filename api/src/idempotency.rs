//! `Idempotency-Key` → the engine's 128-bit request id.
//!
//! The engine remembers every request id with the command it carried (for the configured
//! idempotency window): the same id with the same command gets the first reply again and changes
//! nothing; with a different command it is refused with `IdempotencyConflict`. HTTP keys map onto
//! that one mechanism, so a retry is safe whichever transport sends it:
//!
//! - a key of exactly 32 hex digits, or a UUID (`8-4-4-4-12` hex digits), *is* the request id
//!   (case does not matter). A client that mixes HTTP and QUIC sends the same 128 bits both ways
//!   and is charged once;
//! - any other key (1 to 255 printable ASCII bytes) becomes the first 16 bytes of
//!   SHA-256(`"tally-idempotency-key:" + key`), read big-endian.
//!
//! Inside a batch, an event without its own `idempotency_key` gets the id of the key
//! `"<batch key>/<index>"` under the same rule.

use tally_engine::RequestId;
use tally_net::ErrorCode;

use crate::error::ApiError;

/// The longest key accepted.
pub const KEY_BYTES_MAX: usize = 255;

/// The request id of an idempotency key, or why the key is not acceptable.
pub fn request_id(key: &str) -> Result<RequestId, ApiError> {
    if key.is_empty()
        || key.len() > KEY_BYTES_MAX
        || !key.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        return Err(ApiError::transport(
            ErrorCode::IdempotencyKeyRequired,
            "the Idempotency-Key must be 1 to 255 printable ASCII characters without spaces",
        ));
    }
    if let Some(id) = hex_id(key) {
        return Ok(RequestId(id));
    }
    Ok(tally_outbound::derived_id(&format!(
        "tally-idempotency-key:{key}"
    )))
}

/// The 128 bits of a 32-hex-digit key or a UUID.
fn hex_id(key: &str) -> Option<u128> {
    let digits: String = if key.len() == 36 {
        let parts: Vec<&str> = key.split('-').collect();
        let lengths: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        if lengths != [8, 4, 4, 4, 12] {
            return None;
        }
        parts.concat()
    } else if key.len() == 32 {
        key.to_string()
    } else {
        return None;
    };
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(&digits, 16).ok()
}

/// The key of event `index` of a batch sent with `batch_key`.
pub fn batch_item_key(batch_key: &str, index: usize) -> String {
    format!("{batch_key}/{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_uuid_keys_are_the_request_id() {
        let uuid = "5b0c2f9e-1d3a-4c8b-9f6e-2a7d1c0b3e4f";
        let hex = "5B0C2F9E1D3A4C8B9F6E2A7D1C0B3E4F";
        assert_eq!(
            request_id(uuid).unwrap(),
            RequestId(0x5b0c2f9e1d3a4c8b9f6e2a7d1c0b3e4f)
        );
        assert_eq!(request_id(hex).unwrap(), request_id(uuid).unwrap());
    }

    #[test]
    fn other_keys_hash_stably() {
        let a = request_id("order-42").unwrap();
        assert_eq!(a, request_id("order-42").unwrap());
        assert_ne!(a, request_id("order-43").unwrap());
        // Pinned: changing the mapping would make retries across an upgrade charge twice.
        let hash = ring::digest::digest(&ring::digest::SHA256, b"tally-idempotency-key:order-42");
        assert_eq!(a.0.to_be_bytes(), hash.as_ref()[..16]);
    }

    #[test]
    fn bad_keys_are_refused() {
        for bad in ["", "has space", "tab\t", "é", &"k".repeat(256)] {
            assert!(request_id(bad).is_err(), "{bad:?}");
        }
        assert!(request_id(&"k".repeat(255)).is_ok());
    }
}
