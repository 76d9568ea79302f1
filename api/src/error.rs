//! The one error shape of the API and the HTTP status of every code.
//!
//! Every error body is `{"code": <number>, "name": "<Name>", "message": "<sentence>", ...}` with
//! details beside (a refused debit adds `asset`, `spendable` and `required`; a rejected command
//! adds its `request_id`). `code` is the engine's stable [`ResultCode`] number (below 1000) or a
//! transport [`ErrorCode`] number (1000 and above, HTTP-only ones from 1100): one number space
//! with the QUIC protocol, so a client handles both the same way.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use tally_engine::ResultCode;
use tally_net::ErrorCode;
use utoipa::ToSchema;

/// An error answer: a status and the JSON body.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body.
    pub body: ErrorBody,
}

/// The JSON body of every error.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"code": 40, "name": "InsufficientFunds", "message": "available balance plus the overdraft limit does not cover the amount", "request_id": "6f1c0d3e8a2b4c5d9e7f0a1b2c3d4e5f", "asset": "USD", "spendable": "0.50", "required": "1.20"}))]
pub struct ErrorBody {
    /// The stable code number: a result code (< 1000) or a transport code (>= 1000).
    pub code: u16,
    /// The stable name of the code.
    pub name: String,
    /// What went wrong and what to do, in a sentence.
    pub message: String,
    /// Details that depend on the code (`request_id`, `asset`, `spendable`, `required`, ...).
    #[serde(flatten)]
    #[schema(additional_properties)]
    pub details: Map<String, Value>,
}

impl ApiError {
    /// An engine rejection.
    pub fn rejected(code: ResultCode) -> ApiError {
        ApiError {
            status: result_status(code),
            body: ErrorBody {
                code: code as u16,
                name: code.name().into(),
                message: result_message(code).into(),
                details: Map::new(),
            },
        }
    }

    /// A transport or HTTP failure with its own message.
    pub fn transport(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status: transport_status(code),
            body: ErrorBody {
                code: code as u16,
                name: code.name().into(),
                message: message.into(),
                details: Map::new(),
            },
        }
    }

    /// A transport failure with the standard message of its code.
    pub fn from_code(code: ErrorCode) -> ApiError {
        ApiError::transport(code, transport_message(code))
    }

    /// A body or parameter that does not have the documented shape.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::transport(ErrorCode::InvalidBody, message)
    }

    /// Adds a detail field.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.body.details.insert(key.into(), value.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body.clone())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"tally\""),
            );
        }
        // Handlers' metrics read the code back from here.
        response.extensions_mut().insert(CodeOf(self.body.code));
        response
    }
}

/// The code number an answer carried, for metrics (0 for success).
#[derive(Debug, Clone, Copy)]
pub struct CodeOf(pub u16);

/// The HTTP status of an engine result code.
pub fn result_status(code: ResultCode) -> StatusCode {
    use ResultCode::*;
    match code {
        Ok => StatusCode::OK,
        InvalidAmount
        | PrecisionExceedsScale
        | AmountOverflow
        | InvalidQuantity
        | InvalidPrice
        | LimitExceeded
        | InvalidArgument
        | TimestampOutOfRange
        | UnknownDimension
        | NoMatchingRule
        | AmbiguousRules
        | AssetMismatch
        | InvalidDeadline
        | ReasonRequired
        | InexactCharge
        | NoTopUpPrice
        | RefundExceedsCharge => StatusCode::UNPROCESSABLE_ENTITY,
        UnknownWallet | UnknownAsset | UnknownProduct | UnknownPlan | UnknownPlanVersion
        | UnknownHold | UnknownEvent | UnknownGrant | UnknownPayment | NoTopUpRule => {
            StatusCode::NOT_FOUND
        }
        WalletExists | AssetConflict | ProductConflict | NoDraft | NoPlanAssigned
        | PlanNotAssignable | WalletFrozen | HoldExpired | HoldAlreadySettled
        | HoldAlreadyReleased | AlreadyDisputed | NotDisputed | PaymentConflict
        | IdempotencyConflict | StaleTopUp => StatusCode::CONFLICT,
        InsufficientFunds | WalletInDebt => StatusCode::PAYMENT_REQUIRED,
    }
}

/// A sentence for each result code.
pub fn result_message(code: ResultCode) -> &'static str {
    use ResultCode::*;
    match code {
        Ok => "ok",
        InvalidAmount => "an amount that must be positive is zero or negative",
        PrecisionExceedsScale => "an amount has more decimal places than its asset's scale",
        AmountOverflow => "an amount is above the limit (10^18) or the computation would overflow",
        InvalidQuantity => {
            "a quantity is negative, has more than 6 decimal places, or is above 10^15"
        }
        InvalidPrice => "a price is negative or has more than 12 decimal places",
        LimitExceeded => "a list is longer than its limit (metadata, quantities, attributes, rules, tiers, holds)",
        InvalidArgument => "a field is invalid (e.g. tiers out of order, a duplicate filter or dimension)",
        TimestampOutOfRange => "a time is outside what the command allows (too far in the future, older than the idempotency window, or an expiry not after the start)",
        UnknownWallet => "no wallet has this id",
        WalletExists => "a wallet with this id already exists",
        UnknownAsset => "the asset has not been defined",
        AssetConflict => "the asset exists with a different scale or USD value",
        UnknownProduct => "the product has not been defined",
        ProductConflict => "the product exists with different dimensions",
        UnknownPlan => "the plan does not exist",
        UnknownPlanVersion => "the plan has no such published version",
        NoDraft => "the plan has no draft to publish or test",
        UnknownDimension => "the event names a dimension its product does not have",
        NoMatchingRule => "no rule of the wallet's plan matches the event's product and attributes",
        AmbiguousRules => "two rules for one product have identical filters",
        NoPlanAssigned => "the wallet is on no plan at the event's time",
        PlanNotAssignable => "the plan is the custom plan of another wallet",
        AssetMismatch => "the priced asset differs from the one the command or hold is in",
        InsufficientFunds => "available balance plus the overdraft limit does not cover the amount",
        WalletFrozen => "the wallet is frozen: strict usage and reserves are refused",
        WalletInDebt => "the wallet's debt exceeds its overdraft limit: strict usage and reserves are refused until a grant pays it",
        UnknownHold => "no open or recently closed hold with this id exists on the wallet",
        HoldExpired => "the hold passed its deadline and was released",
        HoldAlreadySettled => "the hold was already settled",
        HoldAlreadyReleased => "the hold was already released",
        InvalidDeadline => "the hold deadline is not in the future or too far away",
        UnknownEvent => "the refunded event is unknown, not a charge of this wallet, or older than the refund window",
        RefundExceedsCharge => "the refund would take the event's refunds above what it was charged",
        UnknownGrant => "no grant with this id was ever a top-up of this wallet",
        AlreadyDisputed => "the grant is already disputed",
        NotDisputed => "the grant is not under dispute",
        ReasonRequired => "an adjustment needs a non-empty reason",
        PaymentConflict => "the payment id was already credited with a different amount or asset",
        IdempotencyConflict => "this Idempotency-Key was used before with a different request; use a new key for a new request",
        NoTopUpRule => "the wallet has no auto top-up rule for this asset",
        StaleTopUp => "the top-up outcome refers to a trigger that is not the one in flight",
        UnknownPayment => "no top-up payment with this id was credited to this wallet",
        NoTopUpPrice => "the asset has no top-up price (set one with PUT /v1/assets/{code}/price)",
        InexactCharge => {
            "the amount is not a whole number of the currency's minor units at the asset's price"
        }
    }
}

/// The HTTP status of a transport code.
pub fn transport_status(code: ErrorCode) -> StatusCode {
    use ErrorCode::*;
    match code {
        Malformed
        | UnknownKind
        | UnsupportedVersion
        | ProtocolViolation
        | IdempotencyKeyRequired => StatusCode::BAD_REQUEST,
        InvalidBody => StatusCode::UNPROCESSABLE_ENTITY,
        FrameTooLarge | RequestTooLarge | BodyTooLarge | AnswerTooLarge => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        Unauthenticated | InvalidKey => StatusCode::UNAUTHORIZED,
        OutOfScope => StatusCode::FORBIDDEN,
        Busy | TooManyInFlight | TooManyConnections => StatusCode::TOO_MANY_REQUESTS,
        Stopped | Poisoned | NotReady => StatusCode::SERVICE_UNAVAILABLE,
        SnapshotFailed | KeyStoreFailed => StatusCode::INTERNAL_SERVER_ERROR,
        UnknownKey | NotFound => StatusCode::NOT_FOUND,
        LastAdminKey => StatusCode::CONFLICT,
        MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
    }
}

/// The standard sentence of a transport code.
pub fn transport_message(code: ErrorCode) -> &'static str {
    use ErrorCode::*;
    match code {
        Busy => "a shard's queue is full; retry shortly with the same Idempotency-Key",
        Stopped => "the server is stopping; retry with the same Idempotency-Key after it restarts",
        Poisoned => "a shard's write-ahead log failed and the server must restart; retry with the same Idempotency-Key",
        RequestTooLarge => "the request does not fit in one log record; send fewer or smaller items",
        NotReady => "the server is recovering; retry shortly",
        Unauthenticated => "send an API key as `Authorization: Bearer <key>`",
        InvalidKey => "the API key is unknown or revoked",
        OutOfScope => "this API key's scope does not allow this request (it needs an admin key)",
        _ => "the request failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rejection_is_a_client_error_with_a_message() {
        for &code in ResultCode::ALL.iter().filter(|c| !c.is_ok()) {
            let status = result_status(code);
            assert!(status.is_client_error(), "{code}: {status}");
            assert!(!result_message(code).is_empty());
        }
        assert_eq!(
            result_status(ResultCode::InsufficientFunds),
            StatusCode::PAYMENT_REQUIRED
        );
        assert_eq!(
            result_status(ResultCode::IdempotencyConflict),
            StatusCode::CONFLICT
        );
        assert_eq!(
            transport_status(ErrorCode::Busy),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
