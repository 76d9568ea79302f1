//! Payload primitives: little-endian integers, exact decimals, length-prefixed strings, lists,
//! options and tags, with a bounds-checked [`Reader`] whose errors name the field.
//!
//! Everything here works on byte slices and caller-owned `Vec<u8>`s; nothing reads a socket.
//! Primitive layouts (all little-endian):
//!
//! - `u8 u16 u32 u64 u128 i64`: fixed width; `bool` is a `u8` that must be 0 or 1.
//! - `decimal`: 17 bytes, an `i128` mantissa then a `u8` scale; the value is
//!   `mantissa × 10^-scale`, with `|mantissa| < 2^96` and `scale <= 28`.
//! - `name` (`str8`): `u8` length then UTF-8 bytes; names hold at most 64 bytes, asset codes 16.
//! - `str16` / `bytes16`: `u16` length then bytes (UTF-8 for `str16`).
//! - `list<T>`: `u16` count then the items; `list32<T>`: `u32` count.
//! - `option<T>`: `u8` 0 (absent) or 1 followed by `T`.

use std::fmt;

use rust_decimal::Decimal;
use tally_engine::{AssetCode, InlineStr, NameError};

/// Bytes in an encoded decimal.
pub const DECIMAL_BYTES: usize = 17;
/// The largest decimal scale (`rust_decimal`'s limit).
pub const DECIMAL_SCALE_MAX: u8 = 28;

/// What is wrong with a payload field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The payload ends before the field does.
    Truncated,
    /// Bytes are left after the last field.
    TrailingBytes(usize),
    /// A decimal's scale is above 28 or its mantissa does not fit 96 bits.
    InvalidDecimal,
    /// A string is not UTF-8.
    InvalidUtf8,
    /// A name or asset code is empty, too long or contains a control character.
    Name(NameError),
    /// A tag, bool or option byte has a value the format does not define.
    UnknownTag(u16),
    /// A result code or error code number that does not exist.
    UnknownCode(u16),
    /// A list announces more items than the rest of the payload could hold.
    CountTooLarge(u32),
    /// The frame kind does not carry this message in this direction (e.g. a reply kind where a
    /// request was expected).
    UnexpectedKind(u8),
}

/// Why a frame's payload does not decode. The frame itself was intact, so the stream can go on:
/// the server answers it with a `Malformed` error frame naming the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyError {
    /// The field, e.g. `usage.wallet` or `rules[].components[].price`.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: Problem,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}`: ", self.field)?;
        match self.problem {
            Problem::Truncated => write!(f, "payload ends inside it"),
            Problem::TrailingBytes(n) => write!(f, "{n} bytes after the last field"),
            Problem::InvalidDecimal => {
                write!(
                    f,
                    "invalid decimal (scale above 28 or mantissa over 96 bits)"
                )
            }
            Problem::InvalidUtf8 => write!(f, "not UTF-8"),
            Problem::Name(e) => write!(f, "{e}"),
            Problem::UnknownTag(t) => write!(f, "unknown tag {t}"),
            Problem::UnknownCode(c) => write!(f, "unknown code {c}"),
            Problem::CountTooLarge(n) => write!(f, "count {n} does not fit in the payload"),
            Problem::UnexpectedKind(k) => write!(f, "frame kind 0x{k:02x} is not expected here"),
        }
    }
}

impl std::error::Error for BodyError {}

/// Why a message cannot be encoded. Encoding never writes a partial frame: on error the buffer is
/// left as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The payload would be longer than the frame limit.
    TooLarge {
        /// Payload bytes it would take.
        length: usize,
        /// The limit.
        max: u32,
    },
    /// A value the format cannot express (an `Answer` refused with code `Ok`).
    Invalid {
        /// The field.
        field: &'static str,
    },
    /// A list or string is longer than its length prefix can say.
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        length: usize,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::TooLarge { length, max } => {
                write!(
                    f,
                    "payload of {length} bytes is over the frame limit of {max}"
                )
            }
            EncodeError::Invalid { field } => write!(f, "field `{field}` cannot be encoded"),
            EncodeError::TooLong { field, length } => {
                write!(
                    f,
                    "field `{field}` has {length} items or bytes, more than its prefix holds"
                )
            }
        }
    }
}

impl std::error::Error for EncodeError {}

/// Appends primitives to a caller-owned buffer.
#[derive(Debug)]
pub struct Writer<'a> {
    pub(crate) buf: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    /// Writes into `buf`, after what it already holds.
    pub fn new(buf: &'a mut Vec<u8>) -> Writer<'a> {
        Writer { buf }
    }

    /// A `u8`.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// A `u16`.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A `u32`.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A `u64`.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// An `i64`.
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A `u128`.
    pub fn u128(&mut self, v: u128) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A `bool` as 0 or 1.
    pub fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    /// A decimal: `i128` mantissa, `u8` scale. A negative zero is written as zero.
    pub fn decimal(&mut self, v: &Decimal) {
        self.buf.extend_from_slice(&v.mantissa().to_le_bytes());
        // `Decimal` keeps scale <= 28, so it fits a byte.
        self.u8(v.scale() as u8);
    }
    /// A name or asset code (`u8` length; inline strings hold at most 255 bytes).
    pub fn name<const N: usize>(&mut self, v: &InlineStr<N>) {
        let bytes = v.as_bytes();
        self.u8(bytes.len() as u8);
        self.buf.extend_from_slice(bytes);
    }
    /// Bytes with a `u16` length.
    pub fn bytes16(&mut self, field: &'static str, v: &[u8]) -> Result<(), EncodeError> {
        let length = u16::try_from(v.len()).map_err(|_| EncodeError::TooLong {
            field,
            length: v.len(),
        })?;
        self.u16(length);
        self.buf.extend_from_slice(v);
        Ok(())
    }
    /// A `u16` list count.
    pub fn count16(&mut self, field: &'static str, n: usize) -> Result<(), EncodeError> {
        let n = u16::try_from(n).map_err(|_| EncodeError::TooLong { field, length: n })?;
        self.u16(n);
        Ok(())
    }
    /// A `u32` list count.
    pub fn count32(&mut self, field: &'static str, n: usize) -> Result<(), EncodeError> {
        let n = u32::try_from(n).map_err(|_| EncodeError::TooLong { field, length: n })?;
        self.u32(n);
        Ok(())
    }
}

/// Reads primitives from a payload, never past its end.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

fn error(field: &'static str, problem: Problem) -> BodyError {
    BodyError { field, problem }
}

impl<'a> Reader<'a> {
    /// Reads `bytes` from the start.
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, position: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    /// Succeeds only if every byte was read.
    pub fn finish(&self, field: &'static str) -> Result<(), BodyError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(error(field, Problem::TrailingBytes(n))),
        }
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], BodyError> {
        if self.remaining() < n {
            return Err(error(field, Problem::Truncated));
        }
        let slice = &self.bytes[self.position..self.position + n];
        self.position += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], BodyError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    /// A `u8`.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, BodyError> {
        Ok(self.array::<1>(field)?[0])
    }
    /// A `u16`.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, BodyError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    /// A `u32`.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, BodyError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    /// A `u64`.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, BodyError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    /// An `i64`.
    pub fn i64(&mut self, field: &'static str) -> Result<i64, BodyError> {
        Ok(i64::from_le_bytes(self.array(field)?))
    }
    /// A `u128`.
    pub fn u128(&mut self, field: &'static str) -> Result<u128, BodyError> {
        Ok(u128::from_le_bytes(self.array(field)?))
    }
    /// A `bool` (0 or 1).
    pub fn bool(&mut self, field: &'static str) -> Result<bool, BodyError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            t => Err(error(field, Problem::UnknownTag(t.into()))),
        }
    }
    /// An option's presence byte (0 or 1).
    pub fn present(&mut self, field: &'static str) -> Result<bool, BodyError> {
        self.bool(field)
    }
    /// A decimal, validated: scale <= 28 and a mantissa of at most 96 bits.
    pub fn decimal(&mut self, field: &'static str) -> Result<Decimal, BodyError> {
        let mantissa = i128::from_le_bytes(self.array(field)?);
        let scale = self.u8(field)?;
        if scale > DECIMAL_SCALE_MAX {
            return Err(error(field, Problem::InvalidDecimal));
        }
        Decimal::try_from_i128_with_scale(mantissa, scale.into())
            .map_err(|_| error(field, Problem::InvalidDecimal))
    }
    /// An optional decimal.
    pub fn decimal_option(&mut self, field: &'static str) -> Result<Option<Decimal>, BodyError> {
        if self.present(field)? {
            self.decimal(field).map(Some)
        } else {
            Ok(None)
        }
    }
    /// A name (at most 64 bytes) or asset code (at most 16), validated like `Name::new`.
    pub fn name<const N: usize>(&mut self, field: &'static str) -> Result<InlineStr<N>, BodyError> {
        let length = self.u8(field)?;
        let bytes = self.take(field, length.into())?;
        let s = std::str::from_utf8(bytes).map_err(|_| error(field, Problem::InvalidUtf8))?;
        InlineStr::new(s).map_err(|e| error(field, Problem::Name(e)))
    }
    /// An asset code.
    pub fn asset(&mut self, field: &'static str) -> Result<AssetCode, BodyError> {
        self.name(field)
    }
    /// Bytes with a `u16` length.
    pub fn bytes16(&mut self, field: &'static str) -> Result<&'a [u8], BodyError> {
        let length = self.u16(field)?;
        self.take(field, length.into())
    }
    /// A UTF-8 string with a `u16` length.
    pub fn str16(&mut self, field: &'static str) -> Result<&'a str, BodyError> {
        let bytes = self.bytes16(field)?;
        std::str::from_utf8(bytes).map_err(|_| error(field, Problem::InvalidUtf8))
    }
    /// A `u16` list count, refused if `count × item_bytes_min` exceeds what is left, so a lying
    /// count cannot make the caller allocate more than the payload justifies.
    pub fn count16(
        &mut self,
        field: &'static str,
        item_bytes_min: usize,
    ) -> Result<usize, BodyError> {
        let n = self.u16(field)?;
        self.check_count(field, n.into(), item_bytes_min)
    }
    /// A `u32` list count, checked like [`Reader::count16`].
    pub fn count32(
        &mut self,
        field: &'static str,
        item_bytes_min: usize,
    ) -> Result<usize, BodyError> {
        let n = self.u32(field)?;
        self.check_count(field, n, item_bytes_min)
    }

    fn check_count(
        &self,
        field: &'static str,
        n: u32,
        item_bytes_min: usize,
    ) -> Result<usize, BodyError> {
        let n_usize = n as usize;
        if n_usize.saturating_mul(item_bytes_min.max(1)) > self.remaining() {
            return Err(error(field, Problem::CountTooLarge(n)));
        }
        Ok(n_usize)
    }

    /// An error naming `field`, for tags and codes the caller does not know.
    pub fn unknown_tag(field: &'static str, tag: u16) -> BodyError {
        error(field, Problem::UnknownTag(tag))
    }

    /// An error naming `field`, for result or error code numbers that do not exist.
    pub fn unknown_code(field: &'static str, code: u16) -> BodyError {
        error(field, Problem::UnknownCode(code))
    }
}
