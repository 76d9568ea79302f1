//! Exact money arithmetic: validation of amounts against an asset's scale, multiplication that
//! refuses to round, explicit rounding modes, and the serde encoding of decimals.
//!
//! `rust_decimal::Decimal` silently reduces scale when a product does not fit its 96-bit
//! mantissa; [`mul_exact`] refuses that instead, so a charge is never rounded except where a
//! pricing rule names a [`Rounding`] mode.

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use crate::code::ResultCode;

/// The largest amount any single command may carry: 10^18 units of its asset. Keeping inputs
/// here leaves ten orders of magnitude of headroom below `Decimal::MAX` for running sums.
pub const AMOUNT_MAX: Decimal = Decimal::from_parts(2_808_348_672, 232_830_643, 0, false, 0);
/// The largest quantity of one dimension in one event: 10^15.
pub const QUANTITY_MAX: Decimal = Decimal::from_parts(2_764_472_320, 232_830, 0, false, 0);
/// Quantities may have at most this many decimal places.
pub const QUANTITY_SCALE_MAX: u32 = 6;
/// Prices may have at most this many decimal places (0.0000025 USD per token needs 7).
pub const PRICE_SCALE_MAX: u32 = 12;
/// Assets may declare at most this many decimal places.
pub const ASSET_SCALE_MAX: u32 = 18;

/// How a computed charge is rounded to its asset's scale. Named by every pricing rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rounding {
    /// Round half to even (banker's rounding).
    HalfEven,
    /// Round half away from zero.
    HalfUp,
    /// Round away from zero: any fraction of the smallest unit is charged.
    Up,
    /// Round toward zero: fractions of the smallest unit are not charged.
    Down,
}

impl Rounding {
    fn strategy(self) -> RoundingStrategy {
        match self {
            Rounding::HalfEven => RoundingStrategy::MidpointNearestEven,
            Rounding::HalfUp => RoundingStrategy::MidpointAwayFromZero,
            Rounding::Up => RoundingStrategy::AwayFromZero,
            Rounding::Down => RoundingStrategy::ToZero,
        }
    }

    /// `value` rounded to `scale` decimal places in this mode.
    pub fn apply(self, value: Decimal, scale: u32) -> Decimal {
        value.round_dp_with_strategy(scale, self.strategy())
    }
}

/// The number of decimal places `value` really needs (trailing zeros do not count).
pub fn significant_scale(value: Decimal) -> u32 {
    if value.scale() == 0 {
        0
    } else {
        value.normalize().scale()
    }
}

/// Checks an amount a command carries for an asset of `scale` decimal places: positive, at most
/// [`AMOUNT_MAX`], and no finer than the asset's scale.
pub fn check_amount(amount: Decimal, scale: u32) -> Result<Decimal, ResultCode> {
    if amount <= Decimal::ZERO {
        return Err(ResultCode::InvalidAmount);
    }
    check_limit(amount, scale)
}

/// Like [`check_amount`] but zero is allowed (overdraft limits, thresholds).
pub fn check_amount_or_zero(amount: Decimal, scale: u32) -> Result<Decimal, ResultCode> {
    if amount < Decimal::ZERO {
        return Err(ResultCode::InvalidAmount);
    }
    check_limit(amount, scale)
}

/// The largest amount, and the largest balance total (ledger, debt), of an asset with `scale`
/// decimal places: 10^18 units, and at most 10^(28 − scale) so that every such number has at
/// most 28 digits. Any sum or difference of a few of them then fits `Decimal`'s 96-bit mantissa
/// exactly (7.9 × 10^28), so balance arithmetic never rounds: what would exceed it is refused
/// with [`ResultCode::AmountOverflow`] before anything changes.
pub fn limit(scale: u32) -> Decimal {
    if scale <= 10 {
        AMOUNT_MAX
    } else {
        Decimal::from_i128_with_scale(10i128.pow(28 - scale.min(28)), 0)
    }
}

/// `value` if its magnitude is within [`limit`]`(scale)`, else [`ResultCode::AmountOverflow`].
pub fn within(value: Decimal, scale: u32) -> Result<Decimal, ResultCode> {
    if value.abs() > limit(scale) {
        return Err(ResultCode::AmountOverflow);
    }
    Ok(value)
}

fn check_limit(amount: Decimal, scale: u32) -> Result<Decimal, ResultCode> {
    if amount > limit(scale) {
        return Err(ResultCode::AmountOverflow);
    }
    if significant_scale(amount) > scale {
        return Err(ResultCode::PrecisionExceedsScale);
    }
    Ok(amount)
}

/// Checks a quantity: non-negative, at most [`QUANTITY_MAX`], at most
/// [`QUANTITY_SCALE_MAX`] decimal places.
pub fn check_quantity(quantity: Decimal) -> Result<Decimal, ResultCode> {
    if quantity < Decimal::ZERO
        || quantity > QUANTITY_MAX
        || significant_scale(quantity) > QUANTITY_SCALE_MAX
    {
        return Err(ResultCode::InvalidQuantity);
    }
    Ok(quantity)
}

/// Checks a price: non-negative, at most [`AMOUNT_MAX`], at most [`PRICE_SCALE_MAX`] places.
pub fn check_price(price: Decimal) -> Result<Decimal, ResultCode> {
    if price < Decimal::ZERO || price > AMOUNT_MAX || significant_scale(price) > PRICE_SCALE_MAX {
        return Err(ResultCode::InvalidPrice);
    }
    Ok(price)
}

/// `a * b`, exactly, or [`ResultCode::AmountOverflow`] when the exact product does not fit.
pub fn mul_exact(a: Decimal, b: Decimal) -> Result<Decimal, ResultCode> {
    let product = a.checked_mul(b).ok_or(ResultCode::AmountOverflow)?;
    // rust_decimal rescales (rounds) a product whose mantissa overflows 96 bits; a smaller scale
    // than the sum of the operands' scales means that happened.
    if product.scale() < a.scale() + b.scale() && !product.is_zero() {
        return Err(ResultCode::AmountOverflow);
    }
    Ok(product)
}

/// `a + b` exactly, or [`ResultCode::AmountOverflow`] (also when `Decimal` would have to round
/// the sum to fit its mantissa, which `checked_add` does silently).
pub fn add(a: Decimal, b: Decimal) -> Result<Decimal, ResultCode> {
    let sum = a.checked_add(b).ok_or(ResultCode::AmountOverflow)?;
    if sum.scale() < a.scale().max(b.scale()) && !sum.is_zero() {
        return Err(ResultCode::AmountOverflow);
    }
    Ok(sum)
}

/// `a - b` exactly, or [`ResultCode::AmountOverflow`] (see [`add`]).
pub fn sub(a: Decimal, b: Decimal) -> Result<Decimal, ResultCode> {
    add(a, -b)
}

/// Decimal places of USD valuations: a charge times its asset's USD value is valued to 10^-18
/// USD (half to even; exact whenever the product has no more places, as with any asset of up to
/// 18 places worth a whole number of dollars, or 9 places worth up to 9 decimals). Vendor costs
/// carry at most 12 places. Margin totals add these up exactly, as [`Usd`].
pub const USD_SCALE: u32 = 18;

/// `amount` of an asset worth `usd_value` per unit, in USD to [`USD_SCALE`] places, or
/// [`ResultCode::AmountOverflow`] when the exact product does not fit a `Decimal`.
pub fn usd_valuation(amount: Decimal, usd_value: Decimal) -> Result<Decimal, ResultCode> {
    let exact = mul_exact(amount, usd_value)?;
    Ok(exact.round_dp_with_strategy(USD_SCALE, RoundingStrategy::MidpointNearestEven))
}

/// A running USD total in units of 10^-18 USD. Sums of valuations never round; a total saturates
/// at ±1.7 × 10^20 USD, beyond any real ledger.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Usd(pub i128);

impl Usd {
    /// A USD value of at most [`USD_SCALE`] places (finer ones are rounded half to even).
    pub fn of(value: Decimal) -> Usd {
        let value = if value.scale() > USD_SCALE {
            value.round_dp_with_strategy(USD_SCALE, RoundingStrategy::MidpointNearestEven)
        } else {
            value
        };
        let units = value
            .mantissa()
            .saturating_mul(10i128.pow(USD_SCALE - value.scale()));
        Usd(units)
    }

    /// `self + other`.
    pub fn saturating_add(self, other: Usd) -> Usd {
        Usd(self.0.saturating_add(other.0))
    }

    /// `self − other`.
    pub fn saturating_sub(self, other: Usd) -> Usd {
        Usd(self.0.saturating_sub(other.0))
    }

    /// The total as a `Decimal`: exact when it fits 28 digits (any total up to 79 billion USD,
    /// and larger ones without trailing places), else its smallest places rounded half to even
    /// to fit.
    pub fn to_decimal(self) -> Decimal {
        const MANTISSA_MAX: u128 = (1 << 96) - 1;
        let (mut m, mut scale) = (self.0, USD_SCALE);
        while scale > 0 && (m % 10 == 0 || m.unsigned_abs() > MANTISSA_MAX) {
            let (q, r) = (m.div_euclid(10), m.rem_euclid(10));
            m = if r > 5 || (r == 5 && q % 2 != 0) {
                q + 1
            } else {
                q
            };
            scale -= 1;
        }
        if m.unsigned_abs() > MANTISSA_MAX {
            return if m > 0 { Decimal::MAX } else { Decimal::MIN };
        }
        Decimal::from_i128_with_scale(m, scale)
    }
}

/// Serde encoding for `Decimal`: its 16 raw bytes in compact binary formats (bincode: the WAL and
/// snapshots), its exact decimal string in human-readable ones (JSON). `rust_decimal`'s own
/// `Deserialize` needs `deserialize_any`, which bincode does not support.
pub mod dec {
    use rust_decimal::Decimal;
    use serde::{de::Error as _, Deserialize, Deserializer, Serialize, Serializer};

    /// Serializes a decimal.
    pub fn serialize<S: Serializer>(value: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(value)
        } else {
            value.serialize().serialize(serializer)
        }
    }

    /// Deserializes a decimal, refusing byte patterns that are not a valid `Decimal`.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
        if deserializer.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
            s.parse::<Decimal>().map_err(D::Error::custom)
        } else {
            let bytes = <[u8; 16]>::deserialize(deserializer)?;
            from_bytes(bytes).ok_or_else(|| D::Error::custom("invalid decimal bytes"))
        }
    }

    /// Decodes `Decimal::serialize` output, validating the flags word (scale ≤ 28, no unknown
    /// bits) so corrupt input cannot build a decimal that panics later.
    pub fn from_bytes(bytes: [u8; 16]) -> Option<Decimal> {
        let flags = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let scale = (flags >> 16) & 0xff;
        if flags & 0x7f00_ffff != 0 || scale > 28 {
            return None;
        }
        Some(Decimal::deserialize(bytes))
    }

    /// Serde encoding for `Option<Decimal>`.
    pub mod option {
        use super::*;

        #[derive(Serialize, Deserialize)]
        struct Wrap(#[serde(with = "super")] Decimal);

        /// Serializes an optional decimal.
        pub fn serialize<S: Serializer>(
            value: &Option<Decimal>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            value.map(Wrap).serialize(serializer)
        }

        /// Deserializes an optional decimal.
        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Decimal>, D::Error> {
            Ok(Option::<Wrap>::deserialize(deserializer)?.map(|w| w.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn limits_are_what_they_say() {
        assert_eq!(AMOUNT_MAX, d("1000000000000000000"));
        assert_eq!(QUANTITY_MAX, d("1000000000000000"));
    }

    #[test]
    fn amounts_are_checked_against_scale() {
        assert_eq!(check_amount(d("1.10"), 2), Ok(d("1.10")));
        assert_eq!(check_amount(d("1.100"), 2), Ok(d("1.100")));
        assert_eq!(
            check_amount(d("1.101"), 2),
            Err(ResultCode::PrecisionExceedsScale)
        );
        assert_eq!(check_amount(d("0"), 2), Err(ResultCode::InvalidAmount));
        assert_eq!(check_amount(d("-1"), 2), Err(ResultCode::InvalidAmount));
        assert_eq!(
            check_amount(d("1000000000000000001"), 0),
            Err(ResultCode::AmountOverflow)
        );
        assert_eq!(check_amount_or_zero(d("0"), 2), Ok(d("0")));
    }

    #[test]
    fn multiplication_never_rounds_silently() {
        assert_eq!(mul_exact(d("0.0000025"), d("1234.5")), Ok(d("0.00308625")));
        let big = d("123456789012345678.123456");
        assert_eq!(
            mul_exact(big, d("1.234567891234")),
            Err(ResultCode::AmountOverflow)
        );
        assert_eq!(
            mul_exact(Decimal::MAX, d("2")),
            Err(ResultCode::AmountOverflow)
        );
    }

    #[test]
    fn rounding_modes() {
        assert_eq!(Rounding::HalfEven.apply(d("0.125"), 2), d("0.12"));
        assert_eq!(Rounding::HalfUp.apply(d("0.125"), 2), d("0.13"));
        assert_eq!(Rounding::Up.apply(d("0.121"), 2), d("0.13"));
        assert_eq!(Rounding::Down.apply(d("0.129"), 2), d("0.12"));
    }

    #[test]
    fn decimal_bytes_round_trip_in_bincode_and_json() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct R {
            #[serde(with = "dec")]
            a: Decimal,
            #[serde(with = "dec::option")]
            b: Option<Decimal>,
        }
        let config = bincode::config::standard();
        for value in [
            Decimal::MAX,
            Decimal::MIN,
            Decimal::ZERO,
            d("1.10"),
            d("-0.0000025"),
        ] {
            let r = R {
                a: value,
                b: Some(value),
            };
            let bytes = bincode::serde::encode_to_vec(&r, config).unwrap();
            let (back, _): (R, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
            assert_eq!(back, r);
            assert_eq!(back.a.scale(), value.scale(), "scale survives: {value}");
            assert_eq!(back.a.to_string(), value.to_string());
        }
        let mut bad = Decimal::ONE.serialize();
        bad[2] = 29; // scale 29
        assert_eq!(dec::from_bytes(bad), None);
    }
}

#[cfg(test)]
mod usd_tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn usd_totals_never_round() {
        // Adding a billion dollars to an atto-dollar: a Decimal sum keeps 28 digits and rounds
        // the atto-dollar away; the total keeps it.
        let big = d("1000000000000");
        let tiny = d("0.000000000000000001");
        assert_ne!(
            big + tiny - big,
            tiny,
            "Decimal rounds this (the reason for Usd)"
        );
        let total = Usd::of(big)
            .saturating_add(Usd::of(tiny))
            .saturating_sub(Usd::of(big));
        assert_eq!(total.to_decimal(), tiny);
        // Exact when it fits, whatever the magnitude, and without trailing places.
        assert_eq!(Usd::of(d("12.50")).to_decimal().to_string(), "12.5");
        assert_eq!(
            Usd::of(d("-3.25"))
                .saturating_add(Usd::of(d("1")))
                .to_decimal(),
            d("-2.25")
        );
        // Too many digits for a Decimal: the smallest places are rounded for display only.
        let huge = Usd::of(big)
            .saturating_add(Usd::of(big))
            .saturating_add(Usd::of(tiny));
        assert_eq!(huge.to_decimal(), d("2000000000000.0000000000000000"));
    }

    #[test]
    fn valuations_keep_18_places() {
        assert_eq!(usd_valuation(d("1.5"), d("0.01")).unwrap(), d("0.015"));
        // 10 + 10 places: the 19th and 20th are rounded half to even.
        let v = usd_valuation(d("0.0000000001"), d("0.0000000015")).unwrap();
        assert_eq!(v, d("0.000000000000000000"));
        let v = usd_valuation(d("0.000000001"), d("0.0000000015")).unwrap();
        assert_eq!(v, d("0.000000000000000002"));
    }
}
