//! JSON field encodings shared by every body: exact decimals as strings, RFC 3339 UTC times,
//! names within the engine's limits.
//!
//! Decimals are strings so no JSON parser on the way rounds them through a float: an optional
//! `-`, digits, an optional `.` and digits, at most 28 significant digits. `1e3`, `1_000`,
//! `+1`, ` 1` and JSON numbers are refused with a message that says so. Answers write every
//! amount exactly and without trailing zeros (`8.5`, `10`, `0.0000025`), whatever scale the
//! computation that produced it carried, so equal amounts always read the same.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{de::Error as _, Deserialize, Deserializer, Serializer};
use tally_engine::{AssetCode, Name, Timestamp};

use crate::error::ApiError;

/// Parses an API decimal: `-?[0-9]+(\.[0-9]+)?`, at most 28 digits.
pub fn parse_decimal(text: &str) -> Result<Decimal, String> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, "0"));
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !plain(whole) || !plain(fraction) {
        return Err(format!(
            "{text:?} is not a decimal string (digits with an optional sign and point, e.g. \"12.50\")"
        ));
    }
    if whole.len() + fraction.len() > 28 {
        return Err(format!("{text:?} has more than 28 digits"));
    }
    Decimal::from_str(text).map_err(|e| format!("{text:?}: {e}"))
}

/// Serde for a decimal carried as a JSON string.
pub mod decimal {
    use super::*;

    /// Writes the decimal as a string without trailing zeros (`1.10` is written `1.1`).
    pub fn serialize<S: Serializer>(value: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&value.normalize())
    }

    /// Reads a decimal string (see [`parse_decimal`]).
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
        let text = String::deserialize(deserializer)
            .map_err(|e| D::Error::custom(format!("{e}; decimals are JSON strings")))?;
        parse_decimal(&text).map_err(D::Error::custom)
    }

    /// Serde for an optional decimal string.
    pub mod option {
        use super::*;

        /// Writes `Some` as a string and `None` as null.
        pub fn serialize<S: Serializer>(
            value: &Option<Decimal>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match value {
                Some(v) => serializer.collect_str(&v.normalize()),
                None => serializer.serialize_none(),
            }
        }

        /// Reads an optional decimal string.
        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Decimal>, D::Error> {
            let text = Option::<String>::deserialize(deserializer)
                .map_err(|e| D::Error::custom(format!("{e}; decimals are JSON strings")))?;
            text.map(|t| parse_decimal(&t).map_err(D::Error::custom))
                .transpose()
        }
    }
}

/// Serde for a time carried as an RFC 3339 UTC string.
pub mod time {
    use super::*;

    /// Writes the time as RFC 3339 UTC.
    pub fn serialize<S: Serializer>(value: &Timestamp, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&value.to_rfc3339())
    }

    /// Reads an RFC 3339 UTC time.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Timestamp, D::Error> {
        let text = String::deserialize(deserializer)?;
        Timestamp::parse_rfc3339(&text)
            .map_err(|e| D::Error::custom(format!("{text:?} is not an RFC 3339 time: {e}")))
    }

    /// Serde for an optional time.
    pub mod option {
        use super::*;

        /// Writes `Some` as RFC 3339 and `None` as null.
        pub fn serialize<S: Serializer>(
            value: &Option<Timestamp>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match value {
                Some(v) => serializer.serialize_str(&v.to_rfc3339()),
                None => serializer.serialize_none(),
            }
        }

        /// Reads an optional RFC 3339 time.
        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Timestamp>, D::Error> {
            let text = Option::<String>::deserialize(deserializer)?;
            text.map(|t| {
                Timestamp::parse_rfc3339(&t)
                    .map_err(|e| D::Error::custom(format!("{t:?} is not an RFC 3339 time: {e}")))
            })
            .transpose()
        }
    }
}

/// A name field (wallet, product, plan, dimension, attribute, metadata), checked against the
/// engine's limit of 64 bytes without control characters.
pub fn name(field: &str, text: &str) -> Result<Name, ApiError> {
    Name::new(text).map_err(|e| ApiError::invalid(format!("{field}: {text:?}: {e}")))
}

/// An asset code, at most 16 bytes.
pub fn asset(field: &str, text: &str) -> Result<AssetCode, ApiError> {
    AssetCode::new(text).map_err(|e| ApiError::invalid(format!("{field}: {text:?}: {e}")))
}

/// `(key, value)` pairs from a JSON object, keys in sorted order (so the same object always
/// makes the same engine command, whatever order its keys came in).
pub fn pairs(
    field: &str,
    map: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<(Name, Name)>, ApiError> {
    map.iter()
        .map(|(k, v)| Ok((name(field, k)?, name(field, v)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_strict() {
        for good in [
            "0",
            "1",
            "-1",
            "1.10",
            "0.0000025",
            "123456789012345678.1234567890",
        ] {
            assert_eq!(parse_decimal(good).unwrap().to_string(), good);
        }
        for bad in [
            "",
            "-",
            "1.",
            ".5",
            "+1",
            " 1",
            "1e3",
            "1_000",
            "NaN",
            "0x10",
            "1.2.3",
            "12345678901234567890123456789",
        ] {
            assert!(parse_decimal(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
