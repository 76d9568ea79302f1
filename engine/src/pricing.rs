//! Pricing: plan rules, their validation, and the price of one usage event ("matching").
//!
//! A plan version holds rules per product. A rule matches an event when every one of its
//! attribute filters equals an attribute of the event. The most specific matching rule wins:
//! the one with the most filters. Two rules of one product with the same filter set are refused
//! when the draft is written ([`ResultCode::AmbiguousRules`]); among rules with equally many
//! (different) filters that both match, the one listed first in the version wins. That is the
//! documented tie rule, and it is deterministic.
//!
//! Tiers apply to the quantity of one event: a graduated tier prices the part of the quantity
//! that falls inside it (plus its flat fee once the quantity enters it); a volume tier prices the
//! whole quantity at the price of the tier the quantity falls in. A rule's components are summed,
//! raised to the rule's minimum charge, then rounded to the asset's scale in the rule's
//! [`Rounding`] mode. Rounding happens there and nowhere else.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::code::ResultCode;
use crate::money::{self, dec, Rounding};
use crate::types::Name;

/// Rules one plan version may hold.
pub const RULES_MAX: usize = 1024;
/// Attribute filters one rule may hold.
pub const FILTERS_MAX: usize = 8;
/// Priced dimensions one rule may hold.
pub const COMPONENTS_MAX: usize = 8;
/// Tiers one price may hold.
pub const TIERS_MAX: usize = 16;

/// A quantity of one dimension in a usage event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Quantity {
    /// The dimension, e.g. `input_tokens`.
    pub dimension: Name,
    /// How much; non-negative, at most 6 decimal places.
    #[serde(with = "dec")]
    pub value: Decimal,
}

/// One price rule of a plan version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PriceRule {
    /// The product (meter) this rule prices.
    pub product: Name,
    /// Attribute filters, `(attribute, value)`; all must match. Empty matches every event.
    pub filters: Vec<(Name, Name)>,
    /// The price of each dimension. A dimension the rule does not name costs nothing.
    pub components: Vec<Component>,
    /// The least this rule charges for one event, if set.
    #[serde(with = "dec::option")]
    pub minimum_charge: Option<Decimal>,
    /// How the summed charge is rounded to the asset's scale.
    pub rounding: Rounding,
}

/// The price of one quantity dimension.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Component {
    /// The dimension, e.g. `input_tokens`.
    pub dimension: Name,
    /// How its quantity is priced.
    pub price: PriceModel,
}

/// How a quantity becomes an amount.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PriceModel {
    /// `quantity × unit_price`.
    PerUnit {
        /// Price of one unit.
        #[serde(with = "dec")]
        unit_price: Decimal,
    },
    /// Each tier prices the part of the quantity inside it.
    Graduated {
        /// Tiers in ascending `up_to`; the last has none.
        tiers: Vec<Tier>,
    },
    /// The tier the whole quantity falls in prices all of it.
    Volume {
        /// Tiers in ascending `up_to`; the last has none.
        tiers: Vec<Tier>,
    },
}

/// One tier of a tiered price.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tier {
    /// Inclusive upper bound of the tier's quantity; `None` for the last, unbounded tier.
    #[serde(with = "dec::option")]
    pub up_to: Option<Decimal>,
    /// Price of one unit inside the tier.
    #[serde(with = "dec")]
    pub unit_price: Decimal,
    /// A flat fee charged once when the quantity reaches into the tier.
    #[serde(with = "dec")]
    pub flat_fee: Decimal,
}

/// Checks one rule's shape; product and dimension existence are checked by the caller, which
/// knows the catalog.
pub fn validate_rule(rule: &PriceRule) -> Result<(), ResultCode> {
    if rule.filters.len() > FILTERS_MAX || rule.components.len() > COMPONENTS_MAX {
        return Err(ResultCode::LimitExceeded);
    }
    if rule.components.is_empty() && rule.minimum_charge.is_none() {
        return Err(ResultCode::InvalidArgument);
    }
    for (i, (key, _)) in rule.filters.iter().enumerate() {
        if rule.filters[..i].iter().any(|(k, _)| k == key) {
            return Err(ResultCode::InvalidArgument);
        }
    }
    for (i, component) in rule.components.iter().enumerate() {
        if rule.components[..i]
            .iter()
            .any(|c| c.dimension == component.dimension)
        {
            return Err(ResultCode::InvalidArgument);
        }
        match &component.price {
            PriceModel::PerUnit { unit_price } => {
                money::check_price(*unit_price)?;
            }
            PriceModel::Graduated { tiers } | PriceModel::Volume { tiers } => {
                validate_tiers(tiers)?
            }
        }
    }
    if let Some(minimum) = rule.minimum_charge {
        money::check_price(minimum)?;
    }
    Ok(())
}

fn validate_tiers(tiers: &[Tier]) -> Result<(), ResultCode> {
    if tiers.is_empty() {
        return Err(ResultCode::InvalidArgument);
    }
    if tiers.len() > TIERS_MAX {
        return Err(ResultCode::LimitExceeded);
    }
    let mut previous = Decimal::ZERO;
    for (i, tier) in tiers.iter().enumerate() {
        money::check_price(tier.unit_price)?;
        money::check_price(tier.flat_fee)?;
        let last = i + 1 == tiers.len();
        match tier.up_to {
            None if last => {}
            None => return Err(ResultCode::InvalidArgument),
            Some(_) if last => return Err(ResultCode::InvalidArgument),
            Some(up_to) => {
                money::check_quantity(up_to)?;
                if up_to <= previous {
                    return Err(ResultCode::InvalidArgument);
                }
                previous = up_to;
            }
        }
    }
    Ok(())
}

/// Checks a whole rule set: every rule, the count, and that no two rules of one product have the
/// same filter set (which would make the winner depend on listing order alone).
pub fn validate_rules(rules: &[PriceRule]) -> Result<(), ResultCode> {
    if rules.len() > RULES_MAX {
        return Err(ResultCode::LimitExceeded);
    }
    for (i, rule) in rules.iter().enumerate() {
        validate_rule(rule)?;
        let same = |other: &PriceRule| {
            other.product == rule.product
                && other.filters.len() == rule.filters.len()
                && other.filters.iter().all(|f| rule.filters.contains(f))
        };
        if rules[..i].iter().any(same) {
            return Err(ResultCode::AmbiguousRules);
        }
    }
    Ok(())
}

/// The index of the rule that prices an event of `product` with `attributes`, if any.
///
/// `order` lists rule indexes most specific first (ties in listing order), as
/// [`specificity_order`] builds it, so the first match wins.
pub fn find_rule(
    rules: &[PriceRule],
    order: &[u32],
    product: &Name,
    attributes: &[(Name, Name)],
) -> Option<usize> {
    order.iter().map(|&i| i as usize).find(|&i| {
        let rule = &rules[i];
        rule.product == *product && rule.filters.iter().all(|f| attributes.contains(f))
    })
}

/// Rule indexes ordered most filters first, then by listing order.
pub fn specificity_order(rules: &[PriceRule]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..rules.len() as u32).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(rules[i as usize].filters.len()), i));
    order
}

/// The charge of `rule` for `quantities`, rounded to `scale` places in the rule's mode.
pub fn charge(
    rule: &PriceRule,
    quantities: &[Quantity],
    scale: u32,
) -> Result<Decimal, ResultCode> {
    let mut total = Decimal::ZERO;
    for component in &rule.components {
        let quantity = quantities
            .iter()
            .find(|q| q.dimension == component.dimension)
            .map_or(Decimal::ZERO, |q| q.value);
        let part = price_quantity(&component.price, quantity)?;
        total = money::add(total, part)?;
    }
    if let Some(minimum) = rule.minimum_charge {
        total = total.max(minimum);
    }
    let rounded = rule.rounding.apply(total, scale);
    if rounded > money::limit(scale) {
        return Err(ResultCode::AmountOverflow);
    }
    Ok(rounded)
}

fn price_quantity(price: &PriceModel, quantity: Decimal) -> Result<Decimal, ResultCode> {
    match price {
        PriceModel::PerUnit { unit_price } => money::mul_exact(quantity, *unit_price),
        PriceModel::Graduated { tiers } => {
            if quantity.is_zero() {
                return Ok(Decimal::ZERO);
            }
            let mut total = Decimal::ZERO;
            let mut floor = Decimal::ZERO;
            for tier in tiers {
                let ceiling = tier.up_to.map_or(quantity, |u| u.min(quantity));
                let inside = money::mul_exact(money::sub(ceiling, floor)?, tier.unit_price)?;
                total = money::add(money::add(total, inside)?, tier.flat_fee)?;
                match tier.up_to {
                    Some(up_to) if up_to < quantity => floor = up_to,
                    _ => break,
                }
            }
            Ok(total)
        }
        PriceModel::Volume { tiers } => {
            if quantity.is_zero() {
                return Ok(Decimal::ZERO);
            }
            let tier = tiers
                .iter()
                .find(|t| t.up_to.is_none_or(|u| quantity <= u))
                .ok_or(ResultCode::InvalidArgument)?;
            money::add(money::mul_exact(quantity, tier.unit_price)?, tier.flat_fee)
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
    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }
    fn tier(up_to: Option<&str>, unit: &str, flat: &str) -> Tier {
        Tier {
            up_to: up_to.map(d),
            unit_price: d(unit),
            flat_fee: d(flat),
        }
    }
    fn rule(filters: &[(&str, &str)], price: PriceModel) -> PriceRule {
        PriceRule {
            product: n("chat"),
            filters: filters.iter().map(|(k, v)| (n(k), n(v))).collect(),
            components: vec![Component {
                dimension: n("tokens"),
                price,
            }],
            minimum_charge: None,
            rounding: Rounding::Up,
        }
    }

    #[test]
    fn graduated_prices_each_part_in_its_tier() {
        let r = rule(
            &[],
            PriceModel::Graduated {
                tiers: vec![tier(Some("100"), "1", "0"), tier(None, "0.5", "10")],
            },
        );
        let q = |x: &str| {
            vec![Quantity {
                dimension: n("tokens"),
                value: d(x),
            }]
        };
        assert_eq!(charge(&r, &q("0"), 2), Ok(d("0")));
        assert_eq!(charge(&r, &q("50"), 2), Ok(d("50")));
        assert_eq!(charge(&r, &q("100"), 2), Ok(d("100")));
        // 100 × 1 + 50 × 0.5 + flat 10
        assert_eq!(charge(&r, &q("150"), 2), Ok(d("135")));
    }

    #[test]
    fn volume_prices_everything_in_the_reached_tier() {
        let r = rule(
            &[],
            PriceModel::Volume {
                tiers: vec![tier(Some("100"), "1", "0"), tier(None, "0.5", "0")],
            },
        );
        let q = |x: &str| {
            vec![Quantity {
                dimension: n("tokens"),
                value: d(x),
            }]
        };
        assert_eq!(charge(&r, &q("100"), 2), Ok(d("100")));
        assert_eq!(charge(&r, &q("150"), 2), Ok(d("75")));
    }

    #[test]
    fn minimum_and_rounding() {
        let mut r = rule(
            &[],
            PriceModel::PerUnit {
                unit_price: d("0.0000025"),
            },
        );
        let q = vec![Quantity {
            dimension: n("tokens"),
            value: d("1001"),
        }];
        // 0.0025025 rounded up to cents
        assert_eq!(charge(&r, &q, 2), Ok(d("0.01")));
        r.rounding = Rounding::Down;
        assert_eq!(charge(&r, &q, 2), Ok(d("0")));
        r.minimum_charge = Some(d("0.05"));
        assert_eq!(charge(&r, &q, 2), Ok(d("0.05")));
    }

    #[test]
    fn most_specific_rule_wins_and_ties_go_to_the_first_listed() {
        let per = |p: &str| PriceModel::PerUnit { unit_price: d(p) };
        let rules = vec![
            rule(&[], per("1")),
            rule(&[("model", "gpt-4o")], per("2")),
            rule(&[("model", "gpt-4o"), ("region", "eu")], per("3")),
            rule(&[("region", "eu")], per("4")),
        ];
        validate_rules(&rules).unwrap();
        let order = specificity_order(&rules);
        let attrs = |pairs: &[(&str, &str)]| -> Vec<(Name, Name)> {
            pairs.iter().map(|(k, v)| (n(k), n(v))).collect()
        };
        let find = |a: &[(Name, Name)]| find_rule(&rules, &order, &n("chat"), a);
        assert_eq!(
            find(&attrs(&[("model", "gpt-4o"), ("region", "eu")])),
            Some(2)
        );
        assert_eq!(find(&attrs(&[("model", "gpt-4o")])), Some(1));
        assert_eq!(find(&attrs(&[("region", "eu"), ("model", "o1")])), Some(3));
        assert_eq!(find(&attrs(&[])), Some(0));
        // Tie: both one-filter rules match; the first listed (index 1) wins.
        let both = attrs(&[("model", "gpt-4o"), ("region", "us")]);
        assert_eq!(find(&both), Some(1));
        assert_eq!(find_rule(&rules, &order, &n("embed"), &both), None);
    }

    #[test]
    fn invalid_rules_are_refused() {
        let per = |p: &str| PriceModel::PerUnit { unit_price: d(p) };
        let dup = vec![
            rule(&[("model", "a")], per("1")),
            rule(&[("model", "a")], per("2")),
        ];
        assert_eq!(validate_rules(&dup), Err(ResultCode::AmbiguousRules));
        assert_eq!(
            validate_rule(&rule(&[], per("-1"))),
            Err(ResultCode::InvalidPrice)
        );
        assert_eq!(
            validate_rule(&rule(&[], per("0.0000000000001"))),
            Err(ResultCode::InvalidPrice)
        );
        let unordered = PriceModel::Graduated {
            tiers: vec![
                tier(Some("10"), "1", "0"),
                tier(Some("5"), "1", "0"),
                tier(None, "1", "0"),
            ],
        };
        assert_eq!(
            validate_rule(&rule(&[], unordered)),
            Err(ResultCode::InvalidArgument)
        );
        let unbounded_middle = PriceModel::Volume {
            tiers: vec![tier(None, "1", "0"), tier(Some("5"), "1", "0")],
        };
        assert_eq!(
            validate_rule(&rule(&[], unbounded_middle)),
            Err(ResultCode::InvalidArgument)
        );
    }
}
