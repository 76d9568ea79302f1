//! Small value types shared by commands, state and outputs: inline names, time, ids.
//!
//! Every identifier that crosses the engine boundary is a fixed-capacity inline string, so
//! commands, replies, journal entries and effects are plain `Copy` data: the hot path moves them
//! without touching the heap.

use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A non-empty UTF-8 string of at most `N` bytes, stored inline.
///
/// Control characters are refused so that names print safely in logs and CLI output.
#[derive(Clone, Copy)]
pub struct InlineStr<const N: usize> {
    len: u8,
    bytes: [u8; N],
}

/// Why a string cannot become an [`InlineStr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameError {
    /// The string is empty.
    Empty,
    /// The string is longer than the capacity; carries the capacity in bytes.
    TooLong(usize),
    /// The string contains a control character.
    ControlCharacter,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => write!(f, "name is empty"),
            NameError::TooLong(max) => write!(f, "name is longer than {max} bytes"),
            NameError::ControlCharacter => write!(f, "name contains a control character"),
        }
    }
}

impl std::error::Error for NameError {}

impl<const N: usize> InlineStr<N> {
    /// Capacity in bytes.
    pub const CAPACITY: usize = N;

    /// Validates and copies `s`.
    pub fn new(s: &str) -> Result<Self, NameError> {
        const { assert!(N > 0 && N <= u8::MAX as usize) };
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > N {
            return Err(NameError::TooLong(N));
        }
        if s.chars().any(char::is_control) {
            return Err(NameError::ControlCharacter);
        }
        let mut bytes = [0u8; N];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        Ok(InlineStr {
            len: s.len() as u8,
            bytes,
        })
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        // The bytes were copied from a `&str` of exactly `len` bytes in `new`.
        std::str::from_utf8(self.as_bytes()).expect("InlineStr holds the UTF-8 it was built from")
    }

    /// The string's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl<const N: usize> PartialEq for InlineStr<N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl<const N: usize> Eq for InlineStr<N> {}
impl<const N: usize> PartialOrd for InlineStr<N> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<const N: usize> Ord for InlineStr<N> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}
impl<const N: usize> Hash for InlineStr<N> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.as_bytes());
        state.write_u8(0xff);
    }
}
impl<const N: usize> fmt::Debug for InlineStr<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}
impl<const N: usize> fmt::Display for InlineStr<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
impl<const N: usize> std::str::FromStr for InlineStr<N> {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        InlineStr::new(s)
    }
}
impl<const N: usize> Serialize for InlineStr<N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}
impl<'de, const N: usize> Deserialize<'de> for InlineStr<N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<const N: usize>;
        impl<const N: usize> serde::de::Visitor<'_> for Visitor<N> {
            type Value = InlineStr<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a non-empty string of at most {N} bytes")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                InlineStr::new(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor::<N>)
    }
}

/// A name: wallet external ids, products, dimensions, attributes, plans, payment ids.
pub type Name = InlineStr<64>;
/// A wallet's external id (at most 64 bytes), chosen by the operator.
pub type WalletId = Name;
/// An asset code such as `USD` or `credits` (at most 16 bytes).
pub type AssetCode = InlineStr<16>;

/// A point in time: microseconds since the Unix epoch, UTC. The engine never reads a clock;
/// the shard loop stamps every input with one of these.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Microseconds in one second.
    pub const SECOND_US: i64 = 1_000_000;
    /// Microseconds in one hour.
    pub const HOUR_US: i64 = 3_600 * Self::SECOND_US;
    /// Microseconds in one day.
    pub const DAY_US: i64 = 24 * Self::HOUR_US;

    /// This time plus `us` microseconds, saturating.
    pub fn add_us(self, us: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(us))
    }

    /// The start of the UTC hour containing this time, in hours since the epoch.
    pub fn hour(self) -> i64 {
        self.0.div_euclid(Self::HOUR_US)
    }

    /// The UTC day containing this time, in days since the epoch.
    pub fn day(self) -> i64 {
        self.0.div_euclid(Self::DAY_US)
    }
}

/// A client-chosen request id (e.g. a UUID). Every mutating command carries one; it is the
/// idempotency key and, for usage, the event id that refunds refer to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u128);

/// A grant's id, assigned by the shard that holds its wallet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GrantId(pub u64);

/// A hold's (reserve's) id, assigned by the shard that holds its wallet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HoldId(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_str_limits() {
        assert_eq!(Name::new(""), Err(NameError::Empty));
        assert!(Name::new(&"a".repeat(64)).is_ok());
        assert_eq!(Name::new(&"a".repeat(65)), Err(NameError::TooLong(64)));
        assert_eq!(Name::new("a\nb"), Err(NameError::ControlCharacter));
        assert_eq!(AssetCode::new("USD").unwrap().as_str(), "USD");
        assert_eq!(
            AssetCode::new("x".repeat(17).as_str()),
            Err(NameError::TooLong(16))
        );
        let a = Name::new("gpt-4o").unwrap();
        let b = Name::new("gpt-4o").unwrap();
        assert_eq!(a, b);
        assert!(Name::new("a").unwrap() < Name::new("b").unwrap());
    }

    #[test]
    fn time_buckets() {
        let t = Timestamp(Timestamp::DAY_US + Timestamp::HOUR_US * 2 + 5);
        assert_eq!(t.day(), 1);
        assert_eq!(t.hour(), 26);
        assert_eq!(Timestamp(-1).hour(), -1);
    }
}
