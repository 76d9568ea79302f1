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

    /// The UTC calendar month, counted from year 0 (`year * 12 + month - 1`).
    pub fn month(self) -> i64 {
        // Civil from days (Howard Hinnant's algorithm), as in `to_rfc3339`.
        let z = self.day() + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        year * 12 + month - 1
    }

    /// Parses an RFC 3339 UTC time (`2026-11-24T18:00:00Z`, an optional fraction of up to 9
    /// digits of which the first 6 count, `Z` or `+00:00`). Other offsets are refused rather
    /// than converted, so a time is always read as the caller wrote it.
    pub fn parse_rfc3339(text: &str) -> Result<Timestamp, String> {
        let text = text.trim();
        let body = text
            .strip_suffix('Z')
            .or_else(|| text.strip_suffix('z'))
            .or_else(|| text.strip_suffix("+00:00"))
            .ok_or("only UTC times (ending in Z or +00:00) are accepted")?;
        let (date, time) = body
            .split_once(['T', 't'])
            .ok_or("expected a T between date and time")?;
        let num = |s: &str| -> Result<i64, String> {
            if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("{s:?} is not a number"));
            }
            s.parse::<i64>()
                .map_err(|_| format!("{s:?} is not a number"))
        };
        let mut d = date.split('-');
        let (year, month, day) = match (d.next(), d.next(), d.next(), d.next()) {
            (Some(y), Some(m), Some(d), None) if y.len() == 4 => (num(y)?, num(m)?, num(d)?),
            _ => return Err("expected YYYY-MM-DD".into()),
        };
        let (hms, fraction) = time
            .split_once('.')
            .map_or((time, None), |(a, b)| (a, Some(b)));
        let mut t = hms.split(':');
        let (hour, minute, second) = match (t.next(), t.next(), t.next(), t.next()) {
            (Some(h), Some(m), Some(s), None) => (num(h)?, num(m)?, num(s)?),
            _ => return Err("expected HH:MM:SS".into()),
        };
        let days_in_month = match month {
            2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        if !(1..=12).contains(&month)
            || !(1..=days_in_month).contains(&day)
            || hour > 23
            || minute > 59
            || second > 60
        {
            return Err("a field is out of range".into());
        }
        let micros = match fraction {
            None => 0,
            Some(f) if !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) => {
                format!("{f:0<6}")[..6]
                    .parse::<i64>()
                    .map_err(|e| e.to_string())?
            }
            Some(_) => return Err("bad fractional seconds".into()),
        };
        // Days from civil (Howard Hinnant's algorithm).
        let y = if month <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (month + 9) % 12;
        let doy = (153 * mp + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
        Ok(Timestamp(seconds * Self::SECOND_US + micros))
    }

    /// Formats as RFC 3339 UTC with microseconds when there are any
    /// (`2023-11-14T22:13:20Z`, `2023-11-14T22:13:20.500000Z`).
    pub fn to_rfc3339(self) -> String {
        let days = self.0.div_euclid(Self::DAY_US);
        let in_day = self.0.rem_euclid(Self::DAY_US);
        // Civil from days (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let seconds = in_day / Self::SECOND_US;
        let micros = in_day % Self::SECOND_US;
        let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
        if micros == 0 {
            format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
        } else {
            format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{micros:06}Z")
        }
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
    fn rfc3339() {
        let parse = Timestamp::parse_rfc3339;
        assert_eq!(parse("1970-01-01T00:00:00Z").unwrap(), Timestamp(0));
        assert_eq!(
            parse("2023-11-14T22:13:20Z").unwrap(),
            Timestamp(1_700_000_000_000_000)
        );
        assert_eq!(
            parse("2023-11-14T22:13:20.5+00:00").unwrap(),
            Timestamp(1_700_000_000_500_000)
        );
        assert!(parse("2023-11-14T22:13:20+02:00").is_err());
        assert!(parse("2023-13-14T22:13:20Z").is_err());
        assert!(parse("2023-02-29T00:00:00Z").is_err());
        assert!(parse("2024-02-29T00:00:00Z").is_ok());
        assert!(parse("+2023-01-01T00:00:00Z").is_err());
        assert!(parse("yesterday").is_err());
        for t in [
            0,
            1_700_000_000_000_000,
            1_700_000_000_500_000,
            -1,
            951_782_400_000_001,
        ] {
            let text = Timestamp(t).to_rfc3339();
            assert_eq!(parse(&text), Ok(Timestamp(t)), "{text}");
        }
        assert_eq!(
            Timestamp(1_700_000_000_500_000).to_rfc3339(),
            "2023-11-14T22:13:20.500000Z"
        );
    }

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
        assert_eq!(
            Timestamp::parse_rfc3339("2026-11-30T23:59:59Z")
                .unwrap()
                .month(),
            2026 * 12 + 10
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2026-12-01T00:00:00Z")
                .unwrap()
                .month(),
            2026 * 12 + 11
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2027-01-01T00:00:00Z")
                .unwrap()
                .month(),
            2027 * 12
        );
        assert_eq!(t.hour(), 26);
        assert_eq!(Timestamp(-1).hour(), -1);
    }
}
