"""What the client returns: frozen dataclasses with ``decimal.Decimal`` amounts and UTC times."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

__all__ = [
    "Charge",
    "HoldPlaced",
    "GrantAdded",
    "Refunded",
    "Balance",
    "GrantInfo",
    "HoldInfo",
    "Margin",
    "PlanAssignment",
    "Wallet",
    "Price",
    "Health",
    "Session",
    "Checkpoint",
]


def time_of(us: int) -> datetime:
    """A tally time (microseconds since the epoch, UTC) as an aware datetime."""
    return datetime.fromtimestamp(us // 1_000_000, tz=timezone.utc).replace(microsecond=us % 1_000_000)


@dataclass(frozen=True, slots=True)
class Charge:
    """A usage event or a settle was charged."""

    request_id: int
    """The request's id: what a refund names as ``event``."""
    asset: str
    charged: Decimal
    debt_added: Decimal
    """The part of ``charged`` that became debt (record mode, or a settle above its hold)."""
    available: Decimal
    """Available balance afterwards."""


@dataclass(frozen=True, slots=True)
class HoldPlaced:
    """A reserve was accepted."""

    request_id: int
    wallet: str
    hold: int
    """The hold's id, for settle and release."""
    asset: str
    amount: Decimal
    available: Decimal
    deadline: datetime
    """When the hold releases by itself if it is neither settled nor released."""


@dataclass(frozen=True, slots=True)
class GrantAdded:
    """A grant was added."""

    request_id: int
    grant: int
    debt_paid: Decimal
    """How much of it paid debt first."""


@dataclass(frozen=True, slots=True)
class Refunded:
    """A refund was credited (as a grant)."""

    request_id: int
    grant: int
    refunded: Decimal
    refundable: Decimal
    """What is left to refund of the event."""


@dataclass(frozen=True, slots=True)
class Balance:
    """One balance of one wallet."""

    asset: str
    ledger: Decimal
    """Grants (pending too) minus debt: the wallet's ledger account."""
    available: Decimal
    """Active grants minus holds minus debt."""
    held: Decimal
    debt: Decimal
    pending: Decimal
    """Granted but not yet effective."""
    overdraft: Decimal

    @staticmethod
    def of(raw: dict[str, Any]) -> Balance:
        return Balance(
            asset=raw["asset"],
            ledger=Decimal(raw["ledger"]),
            available=Decimal(raw["available"]),
            held=Decimal(raw["held"]),
            debt=Decimal(raw["debt"]),
            pending=Decimal(raw["pending"]),
            overdraft=Decimal(raw["overdraft"]),
        )


@dataclass(frozen=True, slots=True)
class GrantInfo:
    """A grant with a remainder."""

    id: int
    asset: str
    amount: Decimal
    remaining: Decimal
    priority: int
    effective_at: datetime | None
    expires_at: datetime | None
    source: str
    """``topup``, ``promotion``, ``refund`` or ``adjustment``."""
    payment_id: str | None

    @staticmethod
    def of(raw: dict[str, Any]) -> GrantInfo:
        source = raw["source"]
        payment_id = None
        if isinstance(source, dict):
            payment_id = source["TopUp"]["payment_id"]
            source = "topup"
        else:
            source = str(source).lower()
        return GrantInfo(
            id=raw["id"],
            asset=raw["asset"],
            amount=Decimal(raw["amount"]),
            remaining=Decimal(raw["remaining"]),
            priority=raw["priority"],
            effective_at=None if raw["effective_at"] is None else time_of(raw["effective_at"]),
            expires_at=None if raw["expires_at"] is None else time_of(raw["expires_at"]),
            source=source,
            payment_id=payment_id,
        )


@dataclass(frozen=True, slots=True)
class HoldInfo:
    """An open hold."""

    id: int
    asset: str
    amount: Decimal
    deadline: datetime


@dataclass(frozen=True, slots=True)
class Margin:
    """A margin aggregate, in USD."""

    events: int
    revenue_usd: Decimal
    """Revenue net of refunds."""
    cost_usd: Decimal
    """Vendor cost."""
    refunded_usd: Decimal
    margin_usd: Decimal
    """Revenue minus cost."""

    @staticmethod
    def of(raw: dict[str, Any]) -> Margin:
        return Margin(
            events=raw["events"],
            revenue_usd=Decimal(raw["revenue_usd"]),
            cost_usd=Decimal(raw["cost_usd"]),
            refunded_usd=Decimal(raw["refunded_usd"]),
            margin_usd=Decimal(raw["margin_usd"]),
        )


@dataclass(frozen=True, slots=True)
class PlanAssignment:
    """A wallet is on a published plan version from a time on."""

    plan: str
    version: int
    effective_from: datetime


@dataclass(frozen=True, slots=True)
class Wallet:
    """Everything about a wallet."""

    wallet: str
    frozen: bool
    topup_flagged: list[str]
    metadata: dict[str, str]
    balances: dict[str, Balance]
    """By asset."""
    grants: list[GrantInfo]
    holds: list[HoldInfo]
    plans: list[PlanAssignment]
    topup_rules: list[dict[str, Any]]
    """The engine's ``TopUpRule`` shapes, decimals as strings."""
    margin: Margin

    @staticmethod
    def of(raw: dict[str, Any]) -> Wallet:
        return Wallet(
            wallet=raw["wallet"],
            frozen=raw["frozen"],
            topup_flagged=list(raw["topup_flagged"]),
            metadata={k: v for k, v in raw["metadata"]},
            balances={b["asset"]: Balance.of(b) for b in raw["balances"]},
            grants=[GrantInfo.of(g) for g in raw["grants"]],
            holds=[
                HoldInfo(id=h["id"], asset=h["asset"], amount=Decimal(h["amount"]), deadline=time_of(h["deadline"]))
                for h in raw["holds"]
            ],
            plans=[PlanAssignment(plan=p, version=v, effective_from=time_of(t)) for p, v, t in raw["plans"]],
            topup_rules=list(raw["topup_rules"]),
            margin=Margin.of(raw["margin"]),
        )


@dataclass(frozen=True, slots=True)
class Price:
    """What an event would be charged now."""

    asset: str
    amount: Decimal
    plan: str
    version: int
    rule: int
    """Index of the matching rule in the plan version."""


@dataclass(frozen=True, slots=True)
class Health:
    """The server's health."""

    shards: int
    shards_running: int
    uptime_us: int
    connections_open: int
    rejected_unauthenticated: int
    rejected_key: int
    rejected_scope: int
    server: str


@dataclass(frozen=True, slots=True)
class Session:
    """What the server said about this client's connection."""

    key_id: int
    scope: str
    """``gateway`` or ``admin``."""
    in_flight_max: int
    batch_items_max: int


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One shard's part of an online snapshot."""

    shard: int
    lsn: int
    digest: int
    stall_us: int

