"""Exceptions raised by the tally client.

Three families, as in the Rust client:

- :class:`Rejected`: the engine refused the request and changed nothing. One subclass per
  result code (``InsufficientFunds``, ``UnknownWallet``, ``HoldExpired``, ...), each with the
  code's stable number as ``code`` and its name as ``name``. ``InsufficientFunds`` and the other
  refusals of a reserve or strict usage carry the shortfall (``asset``, ``spendable``,
  ``required``).
- :class:`TransportError`: the server refused the request outside the ledger (``OutOfScope``,
  ``InvalidKey``, ``Malformed``, ...). One subclass per transport code.
- :class:`Unavailable`: tally could not answer within the client's retry budget: no connection
  (:class:`ConnectFailed`), a connection lost with retries exhausted (:class:`ConnectionLost`), or
  a busy, stopping or poisoned server (:class:`Busy`, :class:`Stopped`, :class:`Poisoned`,
  :class:`TooManyInFlight`, which are transport errors too). A mutating request that failed
  this way may or may not have been applied: repeat it with the same ``request_id``.

:class:`InvalidInput` (also a ``ValueError``) means the request was refused before anything was
sent. Every class derives from :class:`TallyError`.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

__all__ = [
    "TallyError",
    "InvalidInput",
    "ConfigError",
    "ProtocolError",
    "Unavailable",
    "ConnectFailed",
    "ConnectionLost",
    "Rejected",
    "TransportError",
    "RESULT_ERRORS",
    "TRANSPORT_ERRORS",
]


class TallyError(Exception):
    """Any failure of a tally call. ``code`` is the stable number when there is one."""

    code: int | None = None
    name: str = "TallyError"

    def __init__(self, message: str, *, code: int | None = None, name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if name is not None:
            self.name = name


class InvalidInput(TallyError, ValueError):
    """The request was refused before it was sent (a bad amount, name, time or shape)."""

    name = "InvalidInput"


class ConfigError(TallyError, ValueError):
    """The client's configuration is unusable (an address, a certificate file)."""

    name = "Config"


class ProtocolError(TallyError):
    """The server answered with something that does not answer the request."""

    name = "Protocol"


class Unavailable(TallyError):
    """tally did not answer within the retry budget; the request may or may not have been
    applied, so repeat it with the same request id."""


class ConnectFailed(Unavailable):
    """No connection could be made (address, certificate, handshake, timeout)."""

    name = "Connect"


class ConnectionLost(Unavailable):
    """The connection broke and the retry budget ran out."""

    name = "ConnectionLost"


class Rejected(TallyError):
    """The engine refused the request; nothing changed.

    ``reply`` is the engine's reply when there was one (commands). For a shortfall (a reserve
    or strict usage the wallet cannot pay) ``asset``, ``spendable`` (available plus overdraft)
    and ``required`` say by how much.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        name: str | None = None,
        reply: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code, name=name)
        self.reply = reply
        shortfall = (reply or {}).get("value")
        shortfall = shortfall.get("Shortfall") if isinstance(shortfall, dict) else None
        self.asset: str | None = shortfall["asset"] if shortfall else None
        self.spendable: Decimal | None = Decimal(shortfall["spendable"]) if shortfall else None
        self.required: Decimal | None = Decimal(shortfall["required"]) if shortfall else None


class TransportError(TallyError):
    """The server refused the request at the transport level (outside the ledger)."""


# One class per result code, numbers as in tally_engine::ResultCode (stable forever). A test
# checks this table against the codes the native module was built with.
class InvalidAmount(Rejected):
    """An amount that must be positive is zero or negative."""

    code = 10


class PrecisionExceedsScale(Rejected):
    """An amount has more decimal places than its asset's scale."""

    code = 11


class AmountOverflow(Rejected):
    """An amount is above the engine's limit, or a computation would overflow."""

    code = 12


class InvalidQuantity(Rejected):
    """A quantity is negative, has more than 6 decimal places, or is above 10^15."""

    code = 13


class InvalidPrice(Rejected):
    """A price is negative or has more than 12 decimal places."""

    code = 14


class LimitExceeded(Rejected):
    """A list is longer than its limit (metadata, quantities, rules, holds, ...)."""

    code = 15


class InvalidArgument(Rejected):
    """A field is invalid in a way no more specific code covers."""

    code = 16


class TimestampOutOfRange(Rejected):
    """A time is outside what the command allows."""

    code = 17


class UnknownWallet(Rejected):
    """No wallet with this id exists."""

    code = 20


class WalletExists(Rejected):
    """A wallet with this id already exists."""

    code = 21


class UnknownAsset(Rejected):
    """The asset has not been defined."""

    code = 22


class AssetConflict(Rejected):
    """The asset exists with a different scale or USD value."""

    code = 23


class UnknownProduct(Rejected):
    """The product has not been defined."""

    code = 24


class ProductConflict(Rejected):
    """The product exists with different dimensions."""

    code = 25


class UnknownPlan(Rejected):
    """The plan does not exist."""

    code = 26


class UnknownPlanVersion(Rejected):
    """The plan has no such published version."""

    code = 27


class NoDraft(Rejected):
    """The plan has no draft to publish or test."""

    code = 28


class UnknownDimension(Rejected):
    """The event names a dimension its product does not have."""

    code = 29


class NoMatchingRule(Rejected):
    """No rule of the wallet's plan version matches the event."""

    code = 30


class AmbiguousRules(Rejected):
    """Two rules for one product have identical filters."""

    code = 31


class NoPlanAssigned(Rejected):
    """The wallet is on no plan at the event's time."""

    code = 32


class PlanNotAssignable(Rejected):
    """The plan is a custom plan of another wallet."""

    code = 33


class AssetMismatch(Rejected):
    """The priced asset differs from the one the command or hold is in."""

    code = 34


class InsufficientFunds(Rejected):
    """Available balance plus the overdraft limit does not cover the amount."""

    code = 40


class WalletFrozen(Rejected):
    """The wallet is frozen: strict usage and reserves are refused."""

    code = 41


class WalletInDebt(Rejected):
    """The wallet's debt exceeds its overdraft limit: strict usage and reserves are refused."""

    code = 42


class UnknownHold(Rejected):
    """No open or recently closed hold with this id exists on the wallet."""

    code = 43


class HoldExpired(Rejected):
    """The hold passed its deadline and was released."""

    code = 44


class HoldAlreadySettled(Rejected):
    """The hold was already settled."""

    code = 45


class HoldAlreadyReleased(Rejected):
    """The hold was already released."""

    code = 46


class InvalidDeadline(Rejected):
    """The hold deadline is not in the future or too far away (at most 7 days)."""

    code = 47


class UnknownEvent(Rejected):
    """The refunded event is unknown (never seen, not a charge, or too old)."""

    code = 50


class RefundExceedsCharge(Rejected):
    """The refund would exceed what the event was charged."""

    code = 51


class UnknownGrant(Rejected):
    """No grant with this id was ever a top-up of this wallet."""

    code = 52


class AlreadyDisputed(Rejected):
    """The grant is already disputed."""

    code = 53


class NotDisputed(Rejected):
    """The grant is not under dispute."""

    code = 54


class ReasonRequired(Rejected):
    """An adjustment needs a non-empty reason."""

    code = 55


class PaymentConflict(Rejected):
    """The payment id was already credited with a different amount or asset."""

    code = 56


class UnknownPayment(Rejected):
    """No top-up payment with this id was credited to this wallet."""

    code = 57


class IdempotencyConflict(Rejected):
    """The request id was used before with a different request."""

    code = 60


class NoTopUpRule(Rejected):
    """The wallet has no auto top-up rule for this asset."""

    code = 70


class StaleTopUp(Rejected):
    """The top-up outcome refers to a trigger that is not the one in flight."""

    code = 71


class NoTopUpPrice(Rejected):
    """The asset has no top-up price, so a top-up of it could not be charged."""

    code = 72


class InexactCharge(Rejected):
    """The amount is not a whole number of the currency's minor units at the asset's price."""

    code = 73


# Transport codes, numbers as in tally_net::ErrorCode.
class Malformed(TransportError):
    """The request does not decode; the message names the field."""

    code = 1000


class UnknownKind(TransportError):
    """The frame kind is unknown or not a request."""

    code = 1001


class UnsupportedVersion(TransportError):
    """No common protocol version."""

    code = 1002


class FrameTooLarge(TransportError):
    """The frame is over the size limit."""

    code = 1003


class Unauthenticated(TransportError):
    """A request arrived before a successful authentication."""

    code = 1004


class InvalidKey(TransportError):
    """The API key is unknown or revoked."""

    code = 1005


class OutOfScope(TransportError):
    """The key's scope does not allow this request (a gateway key sending an admin request)."""

    code = 1006


class Busy(TransportError, Unavailable):
    """A shard's queue stayed full for the whole retry budget."""

    code = 1007


class Stopped(TransportError, Unavailable):
    """The server or the shard is stopping (and stayed so for the retry budget)."""

    code = 1008


class Poisoned(TransportError, Unavailable):
    """A shard's WAL failed; the server must restart and recover."""

    code = 1009


class RequestTooLarge(TransportError):
    """The request does not fit in one WAL record."""

    code = 1010


class TooManyInFlight(TransportError, Unavailable):
    """The connection had the most requests in flight the server allows."""

    code = 1011


class SnapshotFailed(TransportError):
    """An online snapshot could not be written (nothing is lost)."""

    code = 1012


class ProtocolViolation(TransportError):
    """A frame that is valid but not allowed now."""

    code = 1013


class TooManyConnections(TransportError, Unavailable):
    """The server already has the most connections it allows."""

    code = 1014


class UnknownKey(TransportError):
    """Key revocation of an id that is not an active key."""

    code = 1015


class LastAdminKey(TransportError):
    """Key revocation of the last active admin key."""

    code = 1016


class KeyStoreFailed(TransportError):
    """The key file could not be written; no key changed."""

    code = 1017


class AnswerTooLarge(TransportError):
    """The answer is larger than the client's frame limit."""

    code = 1018


class InvalidBody(TransportError):
    """HTTP only: the body is not JSON of the documented shape."""

    code = 1100


class IdempotencyKeyRequired(TransportError):
    """HTTP only: a mutating request without a valid Idempotency-Key."""

    code = 1101


class BodyTooLarge(TransportError):
    """HTTP only: the body is over the size limit."""

    code = 1102


class NotFound(TransportError):
    """HTTP only: no route has this path."""

    code = 1103


class MethodNotAllowed(TransportError):
    """HTTP only: the route does not take this method."""

    code = 1104


class NotReady(TransportError, Unavailable):
    """HTTP only: the server is still recovering."""

    code = 1105


class UnsupportedMediaType(TransportError):
    """HTTP only: the body is not application/json."""

    code = 1106


def _collect(base: type[TallyError]) -> dict[int, type[TallyError]]:
    table: dict[int, type[TallyError]] = {}
    for value in list(globals().values()):
        if isinstance(value, type) and issubclass(value, base) and value is not base:
            number = value.__dict__.get("code")
            if isinstance(number, int):
                value.name = value.__name__
                table[number] = value
    return table


#: Result code number -> exception class.
RESULT_ERRORS: dict[int, type[TallyError]] = _collect(Rejected)
#: Transport code number -> exception class.
TRANSPORT_ERRORS: dict[int, type[TallyError]] = _collect(TransportError)

__all__ += [cls.__name__ for cls in RESULT_ERRORS.values()]
__all__ += [cls.__name__ for cls in TRANSPORT_ERRORS.values()]


def _from_native(
    kind: str, code: int | None, name: str, message: str, reply: str | None
) -> TallyError:
    """Builds the exception for a failure reported by the native module (called from Rust)."""
    if kind == "rejected":
        cls = RESULT_ERRORS.get(code or -1, Rejected)
        parsed = json.loads(reply) if reply else None
        return cls(message, code=code, name=name, reply=parsed)  # type: ignore[call-arg]
    if kind == "transport":
        return TRANSPORT_ERRORS.get(code or -1, TransportError)(message, code=code, name=name)
    if kind == "connect":
        return ConnectFailed(message)
    if kind == "connection_lost":
        return ConnectionLost(message)
    if kind == "protocol":
        return ProtocolError(message)
    if kind == "config":
        return ConfigError(message)
    return InvalidInput(message)
