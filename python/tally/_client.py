"""The tally client: :class:`Client` (blocking, thread-safe) and :class:`AsyncClient` (asyncio).

Both wrap one native client (``tally._native.NativeClient``, the Rust ``tally-client``): one
QUIC connection with the server's certificate pinned, concurrent usage and reserve calls batched
into shared frames, and retries of lost connections and busy or restarting servers with the
*same* request, so the same idempotency id, for ``retry_for`` seconds. A call that fails after
that raises :class:`tally.errors.Unavailable`; repeat it with the same ``request_id`` (and the
same times) and it is applied at most once.

Amounts are ``decimal.Decimal`` (``int`` and decimal strings are accepted; ``float`` is refused,
because a binary float is not an amount). Times are timezone-aware ``datetime`` objects, or
integers of microseconds since the epoch.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Generic, Literal, TypeVar

from . import _native
from ._types import (
    Balance,
    Charge,
    Checkpoint,
    GrantAdded,
    Health,
    HoldPlaced,
    Margin,
    Price,
    Refunded,
    Session,
    Wallet,
    time_of,
)
from .errors import InvalidInput, ProtocolError

__all__ = ["Client", "AsyncClient", "Amount", "Time", "RequestId", "new_request_id", "per_unit_rule"]

Amount = Decimal | int | str
"""An exact amount: a ``Decimal``, an ``int`` or a decimal string; never a ``float``."""
Time = datetime | int
"""A timezone-aware ``datetime``, or microseconds since the Unix epoch (UTC)."""
RequestId = int | uuid.UUID
"""A 128-bit request id (the idempotency key)."""

#: Priority of top-up grants when none is given (after promotions and refunds at 0), as the CLI.
TOPUP_PRIORITY = 100

T = TypeVar("T")


def new_request_id() -> int:
    """A fresh random 128-bit request id."""
    return uuid.uuid4().int


def _id(request_id: RequestId | None) -> int:
    if request_id is None:
        return new_request_id()
    if isinstance(request_id, uuid.UUID):
        return request_id.int
    if isinstance(request_id, int) and not isinstance(request_id, bool) and 0 <= request_id < 1 << 128:
        return request_id
    raise InvalidInput(f"a request id is an int in [0, 2^128) or a UUID, not {request_id!r}")


def _amount(value: Amount, what: str) -> str:
    """The exact decimal text of an amount (no exponent: the server reads plain decimals)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise InvalidInput(f"{what} must be a Decimal, an int or a decimal string, not {type(value).__name__}")
    if isinstance(value, int):
        return str(value)
    try:
        d = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidInput(f"{what}: {value!r} is not a decimal number") from None
    if not d.is_finite():
        raise InvalidInput(f"{what}: {value!r} is not a finite number")
    return format(d, "f")


def _time(value: Time | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidInput(f"{what} must be timezone-aware (e.g. datetime.now(timezone.utc))")
        delta = value - datetime(1970, 1, 1, tzinfo=timezone.utc)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise InvalidInput(f"{what} must be a datetime or microseconds since the epoch, not {value!r}")


def _now_us() -> int:
    return _time(datetime.now(timezone.utc), "now") or 0


def _quantities(values: Mapping[str, Amount]) -> list[dict[str, str]]:
    return [{"dimension": k, "value": _amount(v, f"quantity {k!r}")} for k, v in values.items()]


def _pairs(values: Mapping[str, str] | None) -> list[list[str]]:
    return [[k, v] for k, v in (values or {}).items()]


def per_unit_rule(
    product: str,
    unit_prices: Mapping[str, Amount],
    *,
    filters: Mapping[str, str] | None = None,
    minimum_charge: Amount | None = None,
    rounding: Literal["HalfEven", "HalfUp", "Up", "Down"] = "Up",
) -> dict[str, Any]:
    """A price rule (the engine's ``PriceRule`` shape) charging a unit price per dimension,
    e.g. ``per_unit_rule("chat", {"input_tokens": "0.0000025"}, filters={"model": "gpt-4o"})``.
    Tiered prices are written as the engine's JSON (see docs/operations.md)."""
    return {
        "product": product,
        "filters": _pairs(filters),
        "components": [
            {"dimension": d, "price": {"PerUnit": {"unit_price": _amount(p, f"unit price of {d!r}")}}}
            for d, p in unit_prices.items()
        ],
        "minimum_charge": None if minimum_charge is None else _amount(minimum_charge, "minimum_charge"),
        "rounding": rounding,
    }


class _Call(Generic[T]):
    """One prepared operation: the native op, its JSON body and how to read the answer."""

    __slots__ = ("op", "body", "read")

    def __init__(self, op: str, body: Any, read: Callable[[Any], T]) -> None:
        self.op = op
        self.body = json.dumps(body, separators=(",", ":")) if body is not None else "null"
        self.read = read


def _value(reply: dict[str, Any], variant: str) -> dict[str, Any]:
    value = reply.get("value")
    if isinstance(value, dict) and variant in value:
        return value[variant]  # type: ignore[no-any-return]
    raise ProtocolError(f"expected a {variant} reply, got {value!r}")


def _command(request_id: int, command: dict[str, Any], read: Callable[[dict[str, Any]], T]) -> _Call[T]:
    return _Call("command", {"id": request_id, "command": command}, read)


def _done(_reply: dict[str, Any]) -> None:
    return None


def _charge(request_id: int) -> Callable[[dict[str, Any]], Charge]:
    def read(reply: dict[str, Any]) -> Charge:
        v = _value(reply, "Charge")
        return Charge(
            request_id=request_id,
            asset=v["asset"],
            charged=Decimal(v["charged"]),
            debt_added=Decimal(v["debt_added"]),
            available=Decimal(v["available"]),
        )

    return read


def _answer(variant: str, read: Callable[[Any], T]) -> Callable[[dict[str, Any]], T]:
    def unwrap(answer: dict[str, Any]) -> T:
        if variant not in answer:
            raise ProtocolError(f"expected a {variant} answer, got {sorted(answer)}")
        return read(answer[variant])

    return unwrap


def _event(
    wallet: str,
    product: str,
    quantities: Mapping[str, Amount],
    attributes: Mapping[str, str] | None,
    cost_usd: Amount,
    occurred_at: Time | None,
    mode: str,
) -> dict[str, Any]:
    return {
        "wallet": wallet,
        "product": product,
        "quantities": _quantities(quantities),
        "attributes": _pairs(attributes),
        "cost_usd": _amount(cost_usd, "cost_usd"),
        "occurred_at": _time(occurred_at, "occurred_at") if occurred_at is not None else _now_us(),
        "mode": mode,
    }


class _Requests:
    """Builds every operation; shared by the blocking and the asyncio client."""

    # ----- gateway: usage, holds, reads --------------------------------------------------

    @staticmethod
    def usage(
        wallet: str,
        product: str,
        quantities: Mapping[str, Amount],
        *,
        attributes: Mapping[str, str] | None = None,
        cost_usd: Amount = 0,
        occurred_at: Time | None = None,
        record: bool = False,
        request_id: RequestId | None = None,
    ) -> _Call[Charge]:
        rid = _id(request_id)
        event = _event(wallet, product, quantities, attributes, cost_usd, occurred_at, "Record" if record else "Strict")
        return _command(rid, {"Usage": event}, _charge(rid))

    @staticmethod
    def reserve(
        wallet: str,
        *,
        amount: Amount | None = None,
        asset: str | None = None,
        product: str | None = None,
        quantities: Mapping[str, Amount] | None = None,
        attributes: Mapping[str, str] | None = None,
        ttl: float | timedelta = 600.0,
        deadline: Time | None = None,
        request_id: RequestId | None = None,
    ) -> _Call[HoldPlaced]:
        rid = _id(request_id)
        if amount is not None and asset is not None and product is None and not quantities and not attributes:
            what: dict[str, Any] = {"Fixed": {"asset": asset, "amount": _amount(amount, "amount")}}
        elif amount is None and asset is None and product is not None and quantities:
            what = {
                "Estimate": {
                    "product": product,
                    "quantities": _quantities(quantities),
                    "attributes": _pairs(attributes),
                }
            }
        else:
            raise InvalidInput("say what to hold: amount= and asset=, or product= with quantities= (and attributes=)")
        if deadline is None:
            seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
            deadline_us = _now_us() + int(seconds * 1_000_000)
        else:
            deadline_us = _time(deadline, "deadline") or 0

        def read(reply: dict[str, Any]) -> HoldPlaced:
            v = _value(reply, "Hold")
            return HoldPlaced(
                request_id=rid,
                wallet=wallet,
                hold=v["hold"],
                asset=v["asset"],
                amount=Decimal(v["amount"]),
                available=Decimal(v["available"]),
                deadline=time_of(deadline_us),
            )

        return _command(rid, {"Reserve": {"wallet": wallet, "amount": what, "deadline": deadline_us}}, read)

    @staticmethod
    def settle(
        wallet: str,
        hold: int,
        product: str,
        quantities: Mapping[str, Amount],
        *,
        attributes: Mapping[str, str] | None = None,
        cost_usd: Amount = 0,
        occurred_at: Time | None = None,
        request_id: RequestId | None = None,
    ) -> _Call[Charge]:
        rid = _id(request_id)
        usage = _event(wallet, product, quantities, attributes, cost_usd, occurred_at, "Record")
        return _command(rid, {"Settle": {"wallet": wallet, "hold": hold, "usage": usage}}, _charge(rid))

    @staticmethod
    def release(wallet: str, hold: int, *, request_id: RequestId | None = None) -> _Call[None]:
        return _command(_id(request_id), {"Release": {"wallet": wallet, "hold": hold}}, _done)

    @staticmethod
    def balance(wallet: str, asset: str) -> _Call[Balance]:
        return _Call("query", {"Balance": {"wallet": wallet, "asset": asset}}, _answer("Balance", Balance.of))

    @staticmethod
    def wallet(wallet: str) -> _Call[Wallet]:
        return _Call("query", {"Wallet": {"wallet": wallet}}, _answer("Wallet", Wallet.of))

    @staticmethod
    def price(
        wallet: str,
        product: str,
        quantities: Mapping[str, Amount],
        *,
        attributes: Mapping[str, str] | None = None,
        occurred_at: Time | None = None,
    ) -> _Call[Price]:
        event = _event(wallet, product, quantities, attributes, 0, occurred_at, "Strict")

        def read(v: dict[str, Any]) -> Price:
            return Price(asset=v["asset"], amount=Decimal(v["amount"]), plan=v["plan"], version=v["version"], rule=v["rule"])

        return _Call("query", {"PricePreview": event}, _answer("Price", read))

    @staticmethod
    def health() -> _Call[Health]:
        return _Call("health", None, lambda v: Health(**v))

    @staticmethod
    def session() -> _Call[Session]:
        return _Call("session", None, lambda v: Session(**v))

    # ----- admin: catalog, wallets, grants, plans, reports, keys ---------------------------

    @staticmethod
    def define_asset(code: str, scale: int, *, usd_value: Amount = 1, request_id: RequestId | None = None) -> _Call[None]:
        body = {"DefineAsset": {"code": code, "scale": scale, "usd_value": _amount(usd_value, "usd_value")}}
        return _command(_id(request_id), body, _done)

    @staticmethod
    def define_product(code: str, dimensions: Iterable[str], *, request_id: RequestId | None = None) -> _Call[None]:
        body = {"DefineProduct": {"code": code, "dimensions": list(dimensions)}}
        return _command(_id(request_id), body, _done)

    @staticmethod
    def create_wallet(
        wallet: str,
        *,
        metadata: Mapping[str, str] | None = None,
        overdraft: Mapping[str, Amount] | None = None,
        request_id: RequestId | None = None,
    ) -> _Call[None]:
        limits = [{"asset": a, "amount": _amount(v, f"overdraft in {a}")} for a, v in (overdraft or {}).items()]
        body = {"CreateWallet": {"wallet": wallet, "overdraft": limits, "metadata": _pairs(metadata)}}
        return _command(_id(request_id), body, _done)

    @staticmethod
    def set_overdraft(wallet: str, asset: str, limit: Amount, *, request_id: RequestId | None = None) -> _Call[None]:
        body = {"SetOverdraft": {"wallet": wallet, "asset": asset, "limit": _amount(limit, "limit")}}
        return _command(_id(request_id), body, _done)

    @staticmethod
    def freeze(wallet: str, *, request_id: RequestId | None = None) -> _Call[None]:
        return _command(_id(request_id), {"Freeze": {"wallet": wallet}}, _done)

    @staticmethod
    def unfreeze(wallet: str, *, request_id: RequestId | None = None) -> _Call[None]:
        return _command(_id(request_id), {"Unfreeze": {"wallet": wallet}}, _done)

    @staticmethod
    def grant(
        wallet: str,
        asset: str,
        amount: Amount,
        *,
        source: Literal["promotion", "topup", "refund", "adjustment"] = "promotion",
        payment_id: str | None = None,
        priority: int | None = None,
        effective_at: Time | None = None,
        expires_at: Time | None = None,
        request_id: RequestId | None = None,
    ) -> _Call[GrantAdded]:
        rid = _id(request_id)
        if source == "topup":
            if payment_id is None:
                raise InvalidInput("a top-up grant needs payment_id=")
            kind: Any = {"TopUp": {"payment_id": payment_id}}
        elif payment_id is not None:
            raise InvalidInput("payment_id= goes with source='topup' only")
        elif source in ("promotion", "refund", "adjustment"):
            kind = source.capitalize()
        else:
            raise InvalidInput(f"source {source!r} is not promotion, topup, refund or adjustment")
        body = {
            "Grant": {
                "wallet": wallet,
                "asset": asset,
                "amount": _amount(amount, "amount"),
                "priority": priority if priority is not None else (TOPUP_PRIORITY if source == "topup" else 0),
                "effective_at": _time(effective_at, "effective_at"),
                "expires_at": _time(expires_at, "expires_at"),
                "source": kind,
            }
        }

        def read(reply: dict[str, Any]) -> GrantAdded:
            v = _value(reply, "Grant")
            return GrantAdded(request_id=rid, grant=v["grant"], debt_paid=Decimal(v["debt_paid"]))

        return _command(rid, body, read)

    @staticmethod
    def draft_plan(
        plan: str,
        asset: str,
        rules: Iterable[Mapping[str, Any]],
        *,
        custom_for: str | None = None,
        request_id: RequestId | None = None,
    ) -> _Call[None]:
        body = {"DraftPlan": {"plan": plan, "custom_for": custom_for, "asset": asset, "rules": [dict(r) for r in rules]}}
        return _command(_id(request_id), body, _done)

    @staticmethod
    def publish_plan(plan: str, *, request_id: RequestId | None = None) -> _Call[int]:
        return _command(_id(request_id), {"PublishPlan": {"plan": plan}}, lambda r: int(_value(r, "Version")["version"]))

    @staticmethod
    def assign_plan(
        wallet: str,
        plan: str,
        version: int,
        *,
        effective_from: Time | None = None,
        request_id: RequestId | None = None,
    ) -> _Call[None]:
        start = _time(effective_from, "effective_from") if effective_from is not None else _now_us()
        body = {"AssignPlan": {"wallet": wallet, "plan": plan, "version": version, "effective_from": start}}
        return _command(_id(request_id), body, _done)

    @staticmethod
    def refund(
        wallet: str, event: RequestId, *, amount: Amount | None = None, request_id: RequestId | None = None
    ) -> _Call[Refunded]:
        rid = _id(request_id)
        body = {
            "Refund": {
                "wallet": wallet,
                "event": _id(event),
                "amount": None if amount is None else _amount(amount, "amount"),
            }
        }

        def read(reply: dict[str, Any]) -> Refunded:
            v = _value(reply, "Refund")
            return Refunded(
                request_id=rid, grant=v["grant"], refunded=Decimal(v["refunded"]), refundable=Decimal(v["refundable"])
            )

        return _command(rid, body, read)

    @staticmethod
    def adjust(
        wallet: str, asset: str, amount: Amount, *, reason: str, request_id: RequestId | None = None
    ) -> _Call[dict[str, Any]]:
        body = {"Adjust": {"wallet": wallet, "asset": asset, "amount": _amount(amount, "amount"), "reason": reason}}
        return _command(_id(request_id), body, lambda r: r)

    @staticmethod
    def margin(
        *,
        wallet: str | None = None,
        product: str | None = None,
        plan: str | None = None,
        version: int | None = None,
        start: Time | None = None,
        end: Time | None = None,
    ) -> _Call[Margin]:
        given = (wallet is not None, product is not None, plan is not None or version is not None, start is not None or end is not None)
        if sum(given) > 1:
            raise InvalidInput("give one margin scope: wallet=, product=, plan= with version=, or start= with end=")
        scope: Any
        if wallet is not None:
            scope = {"Wallet": wallet}
        elif product is not None:
            scope = {"Product": product}
        elif plan is not None and version is not None:
            scope = {"PlanVersion": {"plan": plan, "version": version}}
        elif start is not None and end is not None:
            scope = {"Hours": {"from": _time(start, "start"), "to": _time(end, "end")}}
        elif any(given):
            raise InvalidInput("plan= needs version=, and start= needs end=")
        else:
            scope = "Total"
        return _Call("query", {"Margin": scope}, _answer("Margin", Margin.of))

    @staticmethod
    def create_key(label: str, scope: Literal["gateway", "admin"]) -> _Call[tuple[int, str]]:
        return _Call("key_create", {"label": label, "scope": scope}, lambda v: (int(v["key_id"]), str(v["secret"])))

    @staticmethod
    def revoke_key(key_id: int) -> _Call[None]:
        return _Call("key_revoke", key_id, lambda _v: None)

    @staticmethod
    def snapshot() -> _Call[list[Checkpoint]]:
        return _Call("snapshot", None, lambda v: [Checkpoint(**c) for c in v])

    # ----- anything else, in the engine's own shapes ---------------------------------------

    @staticmethod
    def command(command: Mapping[str, Any], *, request_id: RequestId | None = None) -> _Call[dict[str, Any]]:
        return _command(_id(request_id), dict(command), lambda r: r)

    @staticmethod
    def query(query: Mapping[str, Any] | str) -> _Call[dict[str, Any]]:
        return _Call("query", query if isinstance(query, str) else dict(query), lambda a: a)


def _read(call: _Call[T], text: str) -> T:
    return call.read(json.loads(text))


def _connect_args(
    addr: str | None, cert: str | os.PathLike[str] | None, api_key: str | None
) -> tuple[str, str, str]:
    addr = addr or os.environ.get("TALLY_ADDR", "127.0.0.1:7400")
    cert = cert or os.environ.get("TALLY_CERT", "tally-data/tls/cert.pem")
    api_key = api_key or os.environ.get("TALLY_API_KEY")
    if not api_key:
        raise InvalidInput("no API key: pass api_key= or set TALLY_API_KEY")
    return addr, os.fspath(cert), api_key


class _Base:
    _native: _native.NativeClient
    _requests = _Requests

    def __init__(self, native: _native.NativeClient) -> None:
        self._native = native


class Client(_Base):
    """A blocking client. Thread-safe: share one per process; concurrent calls from several
    threads share the connection and its batch frames (each call releases the GIL while it
    waits).

    ``Client()`` with no arguments reads ``TALLY_ADDR`` (default ``127.0.0.1:7400``),
    ``TALLY_CERT`` (default ``tally-data/tls/cert.pem``) and ``TALLY_API_KEY``, like the CLI.
    """

    def __init__(
        self,
        addr: str | None = None,
        cert: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        *,
        retry_for: float = 10.0,
        connect_timeout: float = 5.0,
        batch_max: int = 1024,
    ) -> None:
        a, c, k = _connect_args(addr, cert, api_key)
        super().__init__(
            _native.NativeClient(a, c, k, retry_for=retry_for, connect_timeout=connect_timeout, batch_max=batch_max)
        )

    def _run(self, call: _Call[T]) -> T:
        return _read(call, self._native.call(call.op, call.body))

    def close(self) -> None:
        """Closes the connection; a later call connects again."""
        self._native.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def usage(self, wallet: str, product: str, quantities: Mapping[str, Amount], *, attributes: Mapping[str, str] | None = None, cost_usd: Amount = 0, occurred_at: Time | None = None, record: bool = False, request_id: RequestId | None = None) -> Charge:  # noqa: E501
        """Reports usage: priced under the wallet's plan and debited. Strict (the default)
        refuses with :class:`~tally.errors.InsufficientFunds` when the wallet cannot pay;
        ``record=True`` always charges, a shortfall becoming debt."""
        return self._run(self._requests.usage(wallet, product, quantities, attributes=attributes, cost_usd=cost_usd, occurred_at=occurred_at, record=record, request_id=request_id))  # noqa: E501

    def reserve(self, wallet: str, *, amount: Amount | None = None, asset: str | None = None, product: str | None = None, quantities: Mapping[str, Amount] | None = None, attributes: Mapping[str, str] | None = None, ttl: float | timedelta = 600.0, deadline: Time | None = None, request_id: RequestId | None = None) -> HoldPlaced:  # noqa: E501
        """Holds a fixed ``amount`` of ``asset``, or the price of an estimated usage
        (``product``, ``quantities``, ``attributes``) under the wallet's plan, until settled,
        released or ``deadline`` (default: ``ttl`` seconds from now, at most 7 days)."""
        return self._run(self._requests.reserve(wallet, amount=amount, asset=asset, product=product, quantities=quantities, attributes=attributes, ttl=ttl, deadline=deadline, request_id=request_id))  # noqa: E501

    def settle(self, wallet: str, hold: int, product: str, quantities: Mapping[str, Amount], *, attributes: Mapping[str, str] | None = None, cost_usd: Amount = 0, occurred_at: Time | None = None, request_id: RequestId | None = None) -> Charge:  # noqa: E501
        """Settles a hold with the actual usage: its price is charged, the rest of the hold
        released; a price above the hold is charged as record usage (a shortfall becomes debt)."""
        return self._run(self._requests.settle(wallet, hold, product, quantities, attributes=attributes, cost_usd=cost_usd, occurred_at=occurred_at, request_id=request_id))  # noqa: E501

    def release(self, wallet: str, hold: int, *, request_id: RequestId | None = None) -> None:
        """Releases a hold without charging."""
        return self._run(self._requests.release(wallet, hold, request_id=request_id))

    def balance(self, wallet: str, asset: str) -> Balance:
        """One balance of a wallet."""
        return self._run(self._requests.balance(wallet, asset))

    def wallet(self, wallet: str) -> Wallet:
        """Everything about a wallet: balances, grants, open holds, plans, margin."""
        return self._run(self._requests.wallet(wallet))

    def price(self, wallet: str, product: str, quantities: Mapping[str, Amount], *, attributes: Mapping[str, str] | None = None, occurred_at: Time | None = None) -> Price:  # noqa: E501
        """What a usage event would be charged, without charging it."""
        return self._run(self._requests.price(wallet, product, quantities, attributes=attributes, occurred_at=occurred_at))  # noqa: E501

    def health(self) -> Health:
        """The server's health."""
        return self._run(self._requests.health())

    def session(self) -> Session:
        """This connection's key, scope and limits."""
        return self._run(self._requests.session())

    def define_asset(self, code: str, scale: int, *, usd_value: Amount = 1, request_id: RequestId | None = None) -> None:  # noqa: E501
        """Declares an asset with its decimal scale and USD value (admin)."""
        return self._run(self._requests.define_asset(code, scale, usd_value=usd_value, request_id=request_id))

    def define_product(self, code: str, dimensions: Iterable[str], *, request_id: RequestId | None = None) -> None:
        """Declares a product (meter) and its quantity dimensions (admin)."""
        return self._run(self._requests.define_product(code, dimensions, request_id=request_id))

    def create_wallet(self, wallet: str, *, metadata: Mapping[str, str] | None = None, overdraft: Mapping[str, Amount] | None = None, request_id: RequestId | None = None) -> None:  # noqa: E501
        """Creates a wallet (admin)."""
        return self._run(self._requests.create_wallet(wallet, metadata=metadata, overdraft=overdraft, request_id=request_id))  # noqa: E501

    def set_overdraft(self, wallet: str, asset: str, limit: Amount, *, request_id: RequestId | None = None) -> None:
        """Sets how far below zero strict usage may take a balance (admin)."""
        return self._run(self._requests.set_overdraft(wallet, asset, limit, request_id=request_id))

    def freeze(self, wallet: str, *, request_id: RequestId | None = None) -> None:
        """Freezes a wallet: strict usage and reserves are refused (admin)."""
        return self._run(self._requests.freeze(wallet, request_id=request_id))

    def unfreeze(self, wallet: str, *, request_id: RequestId | None = None) -> None:
        """Unfreezes a wallet (admin)."""
        return self._run(self._requests.unfreeze(wallet, request_id=request_id))

    def grant(self, wallet: str, asset: str, amount: Amount, *, source: Literal["promotion", "topup", "refund", "adjustment"] = "promotion", payment_id: str | None = None, priority: int | None = None, effective_at: Time | None = None, expires_at: Time | None = None, request_id: RequestId | None = None) -> GrantAdded:  # noqa: E501
        """Adds credit (admin). A top-up needs ``payment_id`` and is idempotent on it."""
        return self._run(self._requests.grant(wallet, asset, amount, source=source, payment_id=payment_id, priority=priority, effective_at=effective_at, expires_at=expires_at, request_id=request_id))  # noqa: E501

    def draft_plan(self, plan: str, asset: str, rules: Iterable[Mapping[str, Any]], *, custom_for: str | None = None, request_id: RequestId | None = None) -> None:  # noqa: E501
        """Writes a plan's draft (admin); ``rules`` in the engine's ``PriceRule`` shape
        (see :func:`per_unit_rule`)."""
        return self._run(self._requests.draft_plan(plan, asset, rules, custom_for=custom_for, request_id=request_id))

    def publish_plan(self, plan: str, *, request_id: RequestId | None = None) -> int:
        """Publishes a plan's draft; returns the new version (admin)."""
        return self._run(self._requests.publish_plan(plan, request_id=request_id))

    def assign_plan(self, wallet: str, plan: str, version: int, *, effective_from: Time | None = None, request_id: RequestId | None = None) -> None:  # noqa: E501
        """Puts a wallet on a published plan version from a time on (default now) (admin)."""
        return self._run(self._requests.assign_plan(wallet, plan, version, effective_from=effective_from, request_id=request_id))  # noqa: E501

    def refund(self, wallet: str, event: RequestId, *, amount: Amount | None = None, request_id: RequestId | None = None) -> Refunded:  # noqa: E501
        """Refunds part (``amount``) or the rest of a usage event or settle, by its request id (admin)."""
        return self._run(self._requests.refund(wallet, event, amount=amount, request_id=request_id))

    def adjust(self, wallet: str, asset: str, amount: Amount, *, reason: str, request_id: RequestId | None = None) -> dict[str, Any]:  # noqa: E501
        """A manual correction with a reason: positive credits, negative debits (admin)."""
        return self._run(self._requests.adjust(wallet, asset, amount, reason=reason, request_id=request_id))

    def margin(self, *, wallet: str | None = None, product: str | None = None, plan: str | None = None, version: int | None = None, start: Time | None = None, end: Time | None = None) -> Margin:  # noqa: E501
        """Revenue, cost and margin in USD: the total, or one wallet, product, plan version or
        time range (admin)."""
        return self._run(self._requests.margin(wallet=wallet, product=product, plan=plan, version=version, start=start, end=end))  # noqa: E501

    def create_key(self, label: str, scope: Literal["gateway", "admin"]) -> tuple[int, str]:
        """Creates an API key; returns its id and secret (shown once). Never retried (admin)."""
        return self._run(self._requests.create_key(label, scope))

    def revoke_key(self, key_id: int) -> None:
        """Revokes an API key (admin)."""
        return self._run(self._requests.revoke_key(key_id))

    def snapshot(self) -> list[Checkpoint]:
        """Checkpoints every shard now (admin)."""
        return self._run(self._requests.snapshot())

    def command(self, command: Mapping[str, Any], *, request_id: RequestId | None = None) -> dict[str, Any]:
        """Any engine command in its serde JSON shape, e.g. ``{"Dispute": {...}}``; returns
        the reply as ``{"code": ..., "value": ...}``."""
        return self._run(self._requests.command(command, request_id=request_id))

    def query(self, query: Mapping[str, Any] | str) -> dict[str, Any]:
        """Any engine query in its serde JSON shape; returns the answer as JSON data."""
        return self._run(self._requests.query(query))


class AsyncClient(_Base):
    """The asyncio client: the same operations as :class:`Client`, as coroutines. Make one
    with ``await AsyncClient.connect(...)``; share it between tasks (and event loops)."""

    @classmethod
    async def connect(
        cls,
        addr: str | None = None,
        cert: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        *,
        retry_for: float = 10.0,
        connect_timeout: float = 5.0,
        batch_max: int = 1024,
    ) -> AsyncClient:
        a, c, k = _connect_args(addr, cert, api_key)
        native = await asyncio.to_thread(
            _native.NativeClient, a, c, k, retry_for=retry_for, connect_timeout=connect_timeout, batch_max=batch_max
        )
        return cls(native)

    async def _run(self, call: _Call[T]) -> T:
        return _read(call, await self._native.call_async(call.op, call.body))

    async def close(self) -> None:
        """Closes the connection; a later call connects again."""
        await asyncio.to_thread(self._native.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def usage(self, wallet: str, product: str, quantities: Mapping[str, Amount], *, attributes: Mapping[str, str] | None = None, cost_usd: Amount = 0, occurred_at: Time | None = None, record: bool = False, request_id: RequestId | None = None) -> Charge:  # noqa: E501
        """See :meth:`Client.usage`."""
        return await self._run(self._requests.usage(wallet, product, quantities, attributes=attributes, cost_usd=cost_usd, occurred_at=occurred_at, record=record, request_id=request_id))  # noqa: E501

    async def reserve(self, wallet: str, *, amount: Amount | None = None, asset: str | None = None, product: str | None = None, quantities: Mapping[str, Amount] | None = None, attributes: Mapping[str, str] | None = None, ttl: float | timedelta = 600.0, deadline: Time | None = None, request_id: RequestId | None = None) -> HoldPlaced:  # noqa: E501
        """See :meth:`Client.reserve`."""
        return await self._run(self._requests.reserve(wallet, amount=amount, asset=asset, product=product, quantities=quantities, attributes=attributes, ttl=ttl, deadline=deadline, request_id=request_id))  # noqa: E501

    async def settle(self, wallet: str, hold: int, product: str, quantities: Mapping[str, Amount], *, attributes: Mapping[str, str] | None = None, cost_usd: Amount = 0, occurred_at: Time | None = None, request_id: RequestId | None = None) -> Charge:  # noqa: E501
        """See :meth:`Client.settle`."""
        return await self._run(self._requests.settle(wallet, hold, product, quantities, attributes=attributes, cost_usd=cost_usd, occurred_at=occurred_at, request_id=request_id))  # noqa: E501

    async def release(self, wallet: str, hold: int, *, request_id: RequestId | None = None) -> None:
        """See :meth:`Client.release`."""
        return await self._run(self._requests.release(wallet, hold, request_id=request_id))

    async def balance(self, wallet: str, asset: str) -> Balance:
        """See :meth:`Client.balance`."""
        return await self._run(self._requests.balance(wallet, asset))

    async def wallet(self, wallet: str) -> Wallet:
        """See :meth:`Client.wallet`."""
        return await self._run(self._requests.wallet(wallet))

    async def price(self, wallet: str, product: str, quantities: Mapping[str, Amount], *, attributes: Mapping[str, str] | None = None, occurred_at: Time | None = None) -> Price:  # noqa: E501
        """See :meth:`Client.price`."""
        return await self._run(self._requests.price(wallet, product, quantities, attributes=attributes, occurred_at=occurred_at))  # noqa: E501

    async def health(self) -> Health:
        """See :meth:`Client.health`."""
        return await self._run(self._requests.health())

    async def session(self) -> Session:
        """See :meth:`Client.session`."""
        return await self._run(self._requests.session())

    async def define_asset(self, code: str, scale: int, *, usd_value: Amount = 1, request_id: RequestId | None = None) -> None:  # noqa: E501
        """See :meth:`Client.define_asset`."""
        return await self._run(self._requests.define_asset(code, scale, usd_value=usd_value, request_id=request_id))

    async def define_product(self, code: str, dimensions: Iterable[str], *, request_id: RequestId | None = None) -> None:  # noqa: E501
        """See :meth:`Client.define_product`."""
        return await self._run(self._requests.define_product(code, dimensions, request_id=request_id))

    async def create_wallet(self, wallet: str, *, metadata: Mapping[str, str] | None = None, overdraft: Mapping[str, Amount] | None = None, request_id: RequestId | None = None) -> None:  # noqa: E501
        """See :meth:`Client.create_wallet`."""
        return await self._run(self._requests.create_wallet(wallet, metadata=metadata, overdraft=overdraft, request_id=request_id))  # noqa: E501

    async def set_overdraft(self, wallet: str, asset: str, limit: Amount, *, request_id: RequestId | None = None) -> None:  # noqa: E501
        """See :meth:`Client.set_overdraft`."""
        return await self._run(self._requests.set_overdraft(wallet, asset, limit, request_id=request_id))

    async def freeze(self, wallet: str, *, request_id: RequestId | None = None) -> None:
        """See :meth:`Client.freeze`."""
        return await self._run(self._requests.freeze(wallet, request_id=request_id))

    async def unfreeze(self, wallet: str, *, request_id: RequestId | None = None) -> None:
        """See :meth:`Client.unfreeze`."""
        return await self._run(self._requests.unfreeze(wallet, request_id=request_id))

    async def grant(self, wallet: str, asset: str, amount: Amount, *, source: Literal["promotion", "topup", "refund", "adjustment"] = "promotion", payment_id: str | None = None, priority: int | None = None, effective_at: Time | None = None, expires_at: Time | None = None, request_id: RequestId | None = None) -> GrantAdded:  # noqa: E501
        """See :meth:`Client.grant`."""
        return await self._run(self._requests.grant(wallet, asset, amount, source=source, payment_id=payment_id, priority=priority, effective_at=effective_at, expires_at=expires_at, request_id=request_id))  # noqa: E501

    async def draft_plan(self, plan: str, asset: str, rules: Iterable[Mapping[str, Any]], *, custom_for: str | None = None, request_id: RequestId | None = None) -> None:  # noqa: E501
        """See :meth:`Client.draft_plan`."""
        return await self._run(self._requests.draft_plan(plan, asset, rules, custom_for=custom_for, request_id=request_id))  # noqa: E501

    async def publish_plan(self, plan: str, *, request_id: RequestId | None = None) -> int:
        """See :meth:`Client.publish_plan`."""
        return await self._run(self._requests.publish_plan(plan, request_id=request_id))

    async def assign_plan(self, wallet: str, plan: str, version: int, *, effective_from: Time | None = None, request_id: RequestId | None = None) -> None:  # noqa: E501
        """See :meth:`Client.assign_plan`."""
        return await self._run(self._requests.assign_plan(wallet, plan, version, effective_from=effective_from, request_id=request_id))  # noqa: E501

    async def refund(self, wallet: str, event: RequestId, *, amount: Amount | None = None, request_id: RequestId | None = None) -> Refunded:  # noqa: E501
        """See :meth:`Client.refund`."""
        return await self._run(self._requests.refund(wallet, event, amount=amount, request_id=request_id))

    async def adjust(self, wallet: str, asset: str, amount: Amount, *, reason: str, request_id: RequestId | None = None) -> dict[str, Any]:  # noqa: E501
        """See :meth:`Client.adjust`."""
        return await self._run(self._requests.adjust(wallet, asset, amount, reason=reason, request_id=request_id))

    async def margin(self, *, wallet: str | None = None, product: str | None = None, plan: str | None = None, version: int | None = None, start: Time | None = None, end: Time | None = None) -> Margin:  # noqa: E501
        """See :meth:`Client.margin`."""
        return await self._run(self._requests.margin(wallet=wallet, product=product, plan=plan, version=version, start=start, end=end))  # noqa: E501

    async def create_key(self, label: str, scope: Literal["gateway", "admin"]) -> tuple[int, str]:
        """See :meth:`Client.create_key`."""
        return await self._run(self._requests.create_key(label, scope))

    async def revoke_key(self, key_id: int) -> None:
        """See :meth:`Client.revoke_key`."""
        return await self._run(self._requests.revoke_key(key_id))

    async def snapshot(self) -> list[Checkpoint]:
        """See :meth:`Client.snapshot`."""
        return await self._run(self._requests.snapshot())

    async def command(self, command: Mapping[str, Any], *, request_id: RequestId | None = None) -> dict[str, Any]:
        """See :meth:`Client.command`."""
        return await self._run(self._requests.command(command, request_id=request_id))

    async def query(self, query: Mapping[str, Any] | str) -> dict[str, Any]:
        """See :meth:`Client.query`."""
        return await self._run(self._requests.query(query))
