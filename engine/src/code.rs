//! Result codes: every outcome a caller can get from the engine.
//!
//! A rejection is data, not an error: the command was understood, logged and answered, and it
//! changed nothing. Numbers are stable forever: a code is never renumbered and never changes
//! meaning; new codes take new numbers. Gaps group codes by family.

use serde::{Deserialize, Serialize};

macro_rules! result_codes {
    ($( $(#[doc = $doc:literal])* $name:ident = $num:literal, )*) => {
        /// The outcome of a command or query. `Ok` is 0; everything else is a rejection.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[repr(u16)]
        pub enum ResultCode {
            $( $(#[doc = $doc])* $name = $num, )*
        }

        impl ResultCode {
            /// Every code, in number order.
            pub const ALL: &'static [ResultCode] = &[$(ResultCode::$name,)*];

            /// The code with this stable number, if there is one.
            pub fn from_u16(n: u16) -> Option<ResultCode> {
                match n {
                    $( $num => Some(ResultCode::$name), )*
                    _ => None,
                }
            }

            /// The stable snake_case name of the code, for logs, JSON and CLI output.
            pub fn name(self) -> &'static str {
                match self {
                    $( ResultCode::$name => stringify!($name), )*
                }
            }
        }
    };
}

result_codes! {
    /// The command was applied (or, for a query, answered).
    Ok = 0,

    // 10-19: amounts and quantities.
    /// An amount that must be positive is zero or negative.
    InvalidAmount = 10,
    /// An amount has more decimal places than its asset's declared scale.
    PrecisionExceedsScale = 11,
    /// An amount is above the engine's limit (10^18), or a computation would overflow or lose
    /// precision.
    AmountOverflow = 12,
    /// A quantity is negative, has more than 6 decimal places, or is above 10^15.
    InvalidQuantity = 13,
    /// A price is negative or has more than 12 decimal places.
    InvalidPrice = 14,
    /// A list is longer than its limit (metadata, quantities, attributes, rules, tiers, holds).
    LimitExceeded = 15,
    /// A field is invalid in a way no more specific code covers (e.g. tiers out of order).
    InvalidArgument = 16,
    /// A timestamp is outside what the command allows (an event too far in the future or older
    /// than the idempotency window; an expiry not after the grant becomes effective).
    TimestampOutOfRange = 17,

    // 20-39: unknown or conflicting catalog and wallet objects.
    /// No wallet with this id exists on this shard.
    UnknownWallet = 20,
    /// A wallet with this id already exists.
    WalletExists = 21,
    /// The asset code has not been defined.
    UnknownAsset = 22,
    /// The asset already exists with a different scale or USD value.
    AssetConflict = 23,
    /// The product (meter) has not been defined.
    UnknownProduct = 24,
    /// The product already exists with different dimensions.
    ProductConflict = 25,
    /// The plan does not exist.
    UnknownPlan = 26,
    /// The plan has no such published version.
    UnknownPlanVersion = 27,
    /// The plan has no draft to publish or test.
    NoDraft = 28,
    /// The event names a quantity dimension its product does not have.
    UnknownDimension = 29,
    /// No rule of the wallet's plan version matches the event's product and attributes.
    NoMatchingRule = 30,
    /// Two rules for one product have identical filters, so neither is more specific.
    AmbiguousRules = 31,
    /// The wallet is on no plan at the event's time.
    NoPlanAssigned = 32,
    /// The plan is a custom plan of another wallet.
    PlanNotAssignable = 33,
    /// The priced asset differs from the one the command or hold is in.
    AssetMismatch = 34,

    // 40-49: balance rules.
    /// Available balance plus the overdraft limit does not cover the amount.
    InsufficientFunds = 40,
    /// The wallet is frozen: strict usage and reserves are refused.
    WalletFrozen = 41,
    /// The wallet's debt exceeds its overdraft limit: strict usage and reserves are refused until
    /// a grant pays it.
    WalletInDebt = 42,
    /// No open or recently closed hold with this id exists on the wallet.
    UnknownHold = 43,
    /// The hold passed its deadline and was released.
    HoldExpired = 44,
    /// The hold was already settled.
    HoldAlreadySettled = 45,
    /// The hold was already released.
    HoldAlreadyReleased = 46,
    /// The hold deadline is not in the future or too far away.
    InvalidDeadline = 47,

    // 50-59: refunds, disputes, adjustments.
    /// The refunded event is unknown: never seen, not a charge, or older than the idempotency
    /// window.
    UnknownEvent = 50,
    /// The refund would take the event's refunds above what it was charged.
    RefundExceedsCharge = 51,
    /// No grant with this id was ever a top-up of this wallet.
    UnknownGrant = 52,
    /// The grant is already disputed.
    AlreadyDisputed = 53,
    /// The grant is not under dispute.
    NotDisputed = 54,
    /// An adjustment needs a non-empty reason.
    ReasonRequired = 55,
    /// The payment id was already credited by a different amount or asset.
    PaymentConflict = 56,
    /// No top-up payment with this id was ever credited to this wallet.
    UnknownPayment = 57,

    // 60-69: idempotency.
    /// The request id was used before with a different command body.
    IdempotencyConflict = 60,

    // 70-79: auto top-up.
    /// The wallet has no auto top-up rule for this asset.
    NoTopUpRule = 70,
    /// The top-up outcome refers to a trigger that is not the one in flight.
    StaleTopUp = 71,
    /// The asset has no top-up price, so a top-up of it could not be charged.
    NoTopUpPrice = 72,
    /// The amount does not come to a whole number of the currency's minor units at the asset's
    /// top-up price, so it could not be charged exactly.
    InexactCharge = 73,
}

impl ResultCode {
    /// True for [`ResultCode::Ok`].
    pub fn is_ok(self) -> bool {
        self == ResultCode::Ok
    }
}

impl std::fmt::Display for ResultCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for &code in ResultCode::ALL {
            assert!(seen.insert(code as u16), "duplicate number {}", code as u16);
            assert_eq!(ResultCode::from_u16(code as u16), Some(code));
        }
        assert_eq!(ResultCode::from_u16(9999), None);
        // Stable numbers: a change here breaks every client.
        assert_eq!(ResultCode::InsufficientFunds as u16, 40);
        assert_eq!(ResultCode::IdempotencyConflict as u16, 60);
        assert_eq!(
            ResultCode::InsufficientFunds.to_string(),
            "InsufficientFunds (40)"
        );
    }
}
