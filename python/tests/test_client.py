"""The Python client against a real `tally serve`: every operation, every typed error, a restart
while calls retry, and thread and asyncio safety. Balances are checked to the last decimal."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from conftest import ASSET, INPUT_PRICE, OUTPUT_PRICE, PLAN, PRODUCT, Server, open_wallet

import tally
from tally import errors


def charge_of(input_tokens: int, output_tokens: int) -> Decimal:
    return input_tokens * INPUT_PRICE + output_tokens * OUTPUT_PRICE


def test_gateway_operations(admin: tally.Client) -> None:
    wallet = open_wallet(admin, "10")

    # Strict usage: priced under the plan, debited, with the vendor cost for margin.
    charge = admin.usage(wallet, PRODUCT, {"input_tokens": 1000, "output_tokens": 500}, cost_usd=Decimal("0.0042"))
    assert charge.charged == charge_of(1000, 500) == Decimal("0.009")
    assert charge.asset == ASSET and charge.debt_added == 0
    assert charge.available == Decimal("10") - Decimal("0.009")

    # Reserve an estimate, settle for less: the rest of the hold is released.
    hold = admin.reserve(wallet, product=PRODUCT, quantities={"input_tokens": 1000, "output_tokens": 1000}, ttl=60)
    assert hold.amount == charge_of(1000, 1000)
    assert hold.available == charge.available - hold.amount
    assert hold.deadline > datetime.now(timezone.utc)
    balance = admin.balance(wallet, ASSET)
    assert balance.held == hold.amount
    settled = admin.settle(wallet, hold.hold, PRODUCT, {"input_tokens": 900, "output_tokens": 100}, cost_usd="0.001")
    assert settled.charged == charge_of(900, 100)
    assert settled.available == charge.available - settled.charged

    # A fixed reserve, released: nothing charged.
    fixed = admin.reserve(wallet, amount="1.5", asset=ASSET, deadline=datetime.now(timezone.utc) + timedelta(minutes=1))
    assert fixed.amount == Decimal("1.5")
    admin.release(wallet, fixed.hold)

    balance = admin.balance(wallet, ASSET)
    assert balance.available == Decimal("10") - charge.charged - settled.charged
    assert balance.held == 0 and balance.debt == 0 and balance.pending == 0

    price = admin.price(wallet, PRODUCT, {"input_tokens": 10, "output_tokens": 10})
    assert (price.amount, price.plan, price.version, price.rule) == (charge_of(10, 10), PLAN, 1, 0)

    info = admin.wallet(wallet)
    assert info.wallet == wallet and not info.frozen
    assert info.balances[ASSET] == balance
    assert info.holds == []
    assert [(p.plan, p.version) for p in info.plans] == [(PLAN, 1)]
    assert info.margin.events == 2
    assert info.margin.revenue_usd == charge.charged + settled.charged
    assert info.margin.cost_usd == Decimal("0.0052")
    assert [(g.source, g.amount) for g in info.grants] == [("promotion", Decimal("10"))]

    health = admin.health()
    assert health.shards == 2 and health.shards_running == 2 and health.server.startswith("tally/")
    session = admin.session()
    assert session.scope == "admin" and session.in_flight_max > 0


def test_admin_operations(admin: tally.Client) -> None:
    wallet = f"admin-{uuid.uuid4().hex[:8]}"
    admin.create_wallet(wallet, metadata={"team": "ml"}, overdraft={ASSET: "2"})
    admin.assign_plan(wallet, PLAN, 1, effective_from=datetime.now(timezone.utc) - timedelta(hours=1))
    topup = admin.grant(wallet, ASSET, "5", source="topup", payment_id=f"pi_{uuid.uuid4().hex}")
    assert topup.debt_paid == 0
    admin.set_overdraft(wallet, ASSET, "0")

    usage = admin.usage(wallet, PRODUCT, {"input_tokens": 100000}, cost_usd="0.1")
    assert usage.charged == Decimal("0.3")
    refund = admin.refund(wallet, usage.request_id, amount="0.1")
    assert (refund.refunded, refund.refundable) == (Decimal("0.1"), Decimal("0.2"))
    adjusted = admin.adjust(wallet, ASSET, "-0.05", reason="support ticket 7")
    assert Decimal(adjusted["value"]["Charge"]["charged"]) == Decimal("0.05")

    admin.freeze(wallet)
    with pytest.raises(errors.WalletFrozen):
        admin.usage(wallet, PRODUCT, {"input_tokens": 1})
    admin.unfreeze(wallet)

    info = admin.wallet(wallet)
    assert info.metadata == {"team": "ml"}
    assert info.balances[ASSET].available == Decimal("5") - Decimal("0.3") + Decimal("0.1") - Decimal("0.05")
    assert info.grants[0].source in ("topup", "refund")

    by_wallet = admin.margin(wallet=wallet)
    assert by_wallet.events == 1 and by_wallet.cost_usd == Decimal("0.1") and by_wallet.refunded_usd == Decimal("0.1")
    assert admin.margin(plan=PLAN, version=1).events >= 1
    assert admin.margin(product=PRODUCT).events >= 1
    assert admin.margin().events >= by_wallet.events
    now = datetime.now(timezone.utc)
    assert admin.margin(start=now - timedelta(hours=2), end=now + timedelta(hours=1)).events >= 1

    # Plans: a second version, assigned.
    admin.draft_plan(PLAN, ASSET, [tally.per_unit_rule(PRODUCT, {"input_tokens": "0.000001"})])
    version = admin.publish_plan(PLAN)
    assert version >= 2

    key_id, secret = admin.create_key("pytest-gateway", "gateway")
    assert key_id > 0 and len(secret) >= 16
    admin.revoke_key(key_id)
    checkpoints = admin.snapshot()
    assert sorted(c.shard for c in checkpoints) == [0, 1]

    # The raw escape hatches speak the engine's own shapes.
    raw = admin.command({"Freeze": {"wallet": wallet}})
    assert raw == {"code": "Ok", "value": "None"}
    answer = admin.query({"Wallet": {"wallet": wallet}})
    assert answer["Wallet"]["frozen"] is True


async def test_async_operations(server: Server, admin: tally.Client) -> None:
    wallet = open_wallet(admin, "1")
    async with await server.async_client() as client:
        charge = await client.usage(wallet, PRODUCT, {"input_tokens": 10}, cost_usd=0)
        assert charge.charged == Decimal("0.00003")
        hold = await client.reserve(wallet, amount="0.5", asset=ASSET)
        with pytest.raises(errors.InsufficientFunds) as refused:
            await client.reserve(wallet, amount="0.6", asset=ASSET)
        assert refused.value.spendable == Decimal("1") - Decimal("0.00003") - Decimal("0.5")
        assert refused.value.required == Decimal("0.6")
        await client.release(wallet, hold.hold)
        settle_hold = await client.reserve(wallet, product=PRODUCT, quantities={"output_tokens": 100})
        settled = await client.settle(wallet, settle_hold.hold, PRODUCT, {"output_tokens": 50})
        assert settled.charged == charge_of(0, 50)
        assert (await client.balance(wallet, ASSET)).available == Decimal("1") - charge.charged - settled.charged
        assert (await client.wallet(wallet)).margin.events == 2
        assert (await client.price(wallet, PRODUCT, {"input_tokens": 1})).amount == INPUT_PRICE
        assert (await client.health()).shards == 2
        assert (await client.margin(wallet=wallet)).events == 2
        assert (await client.session()).scope == "admin"


def test_every_code_has_its_exception_class() -> None:
    for table, natives in ((errors.RESULT_ERRORS, tally._native.result_codes()), (errors.TRANSPORT_ERRORS, tally._native.error_codes())):
        for number, name in natives:
            if number == 0:
                continue
            cls = table.get(number)
            assert cls is not None, f"no exception class for code {number} ({name})"
            assert (cls.__name__, cls.code, cls.name) == (name, number, name)
        assert len(table) == len([n for n, _ in natives if n != 0])


def test_typed_errors(server: Server, admin: tally.Client) -> None:
    wallet = open_wallet(admin, "0.01")

    with pytest.raises(errors.InsufficientFunds) as e:
        admin.usage(wallet, PRODUCT, {"input_tokens": 10000})
    assert isinstance(e.value, tally.Rejected) and isinstance(e.value, tally.TallyError)
    assert (e.value.code, e.value.name) == (40, "InsufficientFunds")
    assert (e.value.asset, e.value.spendable, e.value.required) == (ASSET, Decimal("0.01"), Decimal("0.03"))
    assert "InsufficientFunds" in str(e.value)

    with pytest.raises(errors.UnknownWallet):
        admin.balance("no-such-wallet", ASSET)
    with pytest.raises(errors.UnknownAsset):
        admin.balance(wallet, "EUR")
    with pytest.raises(errors.WalletExists):
        admin.create_wallet(wallet)
    with pytest.raises(errors.UnknownProduct):
        admin.usage(wallet, "images", {"input_tokens": 1})
    with pytest.raises(errors.UnknownDimension):
        admin.usage(wallet, PRODUCT, {"seconds": 1})
    with pytest.raises(errors.UnknownHold):
        admin.release(wallet, 999_999)
    with pytest.raises(errors.InvalidDeadline):
        admin.reserve(wallet, amount="0.001", asset=ASSET, ttl=8 * 86400)
    with pytest.raises(errors.PrecisionExceedsScale):
        admin.reserve(wallet, amount="0.00000000001", asset=ASSET)

    hold = admin.reserve(wallet, amount="0.001", asset=ASSET)
    admin.settle(wallet, hold.hold, PRODUCT, {"input_tokens": 1})
    with pytest.raises(errors.HoldAlreadySettled):
        admin.release(wallet, hold.hold)
    hold = admin.reserve(wallet, amount="0.001", asset=ASSET)
    admin.release(wallet, hold.hold)
    with pytest.raises(errors.HoldAlreadyReleased):
        admin.settle(wallet, hold.hold, PRODUCT, {"input_tokens": 1})

    # The same request id with another body is a conflict; with the same body, the first answer.
    rid = tally.new_request_id()
    at = datetime.now(timezone.utc)
    first = admin.usage(wallet, PRODUCT, {"input_tokens": 1}, occurred_at=at, request_id=rid)
    again = admin.usage(wallet, PRODUCT, {"input_tokens": 1}, occurred_at=at, request_id=rid)
    assert again == first
    with pytest.raises(errors.IdempotencyConflict):
        admin.usage(wallet, PRODUCT, {"input_tokens": 2}, occurred_at=at, request_id=rid)

    # Transport: a gateway key may not run admin calls; a revoked key may not connect.
    key_id, secret = admin.create_key("pytest-scope", "gateway")
    with server.client(secret) as gateway:
        assert gateway.balance(wallet, ASSET).available >= 0
        with pytest.raises(errors.OutOfScope) as scope:
            gateway.grant(wallet, ASSET, "1")
        assert isinstance(scope.value, tally.TransportError) and scope.value.code == 1006
    admin.revoke_key(key_id)
    with pytest.raises(errors.InvalidKey):
        server.client(secret)

    # Unavailable: nothing listens there.
    with pytest.raises(errors.ConnectFailed) as unreachable:
        tally.Client("127.0.0.1:9", server.cert, server.admin_key, connect_timeout=0.5, retry_for=0)
    assert isinstance(unreachable.value, tally.Unavailable)

    # Refused before sending: floats, naive times, unknown shapes.
    with pytest.raises(errors.InvalidInput):
        admin.usage(wallet, PRODUCT, {"input_tokens": 1.5})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        admin.grant(wallet, ASSET, 0.1)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidInput):
        admin.usage(wallet, PRODUCT, {"input_tokens": 1}, occurred_at=datetime(2026, 1, 1))
    with pytest.raises(errors.InvalidInput):
        admin.reserve(wallet, amount="1")
    with pytest.raises(errors.InvalidInput):
        admin.usage(wallet, "x" * 65, {"input_tokens": 1})
    with pytest.raises(errors.ConfigError):
        tally.Client(server.quic, "/nonexistent/cert.pem", server.admin_key)

    # Nothing above changed the wallet beyond the one settle and the one usage.
    assert admin.balance(wallet, ASSET).available == Decimal("0.01") - 2 * INPUT_PRICE


def test_threads_share_one_client(admin: tally.Client) -> None:
    wallet = open_wallet(admin, "100")
    calls, threads = 50, 16

    def work(_: int) -> Decimal:
        total = Decimal(0)
        for _ in range(calls):
            total += admin.usage(wallet, PRODUCT, {"input_tokens": 7, "output_tokens": 3}).charged
        return total

    with ThreadPoolExecutor(threads) as pool:
        charged = sum(pool.map(work, range(threads)), Decimal(0))
    assert charged == calls * threads * charge_of(7, 3)
    assert admin.balance(wallet, ASSET).available == Decimal("100") - charged
    assert admin.margin(wallet=wallet).events == calls * threads


async def test_asyncio_tasks_share_one_client(server: Server, admin: tally.Client) -> None:
    wallet = open_wallet(admin, "100")
    client = await server.async_client()
    try:
        n = 500
        charges = await asyncio.gather(*(client.usage(wallet, PRODUCT, {"output_tokens": 11}) for _ in range(n)))
        assert sum(c.charged for c in charges) == n * charge_of(0, 11)
        # Holds too: reserve and settle concurrently.
        holds = await asyncio.gather(*(client.reserve(wallet, amount="0.01", asset=ASSET) for _ in range(100)))
        await asyncio.gather(*(client.settle(wallet, h.hold, PRODUCT, {"input_tokens": 1}) for h in holds))
        balance = await client.balance(wallet, ASSET)
        assert balance.held == 0
        assert balance.available == Decimal("100") - n * charge_of(0, 11) - 100 * INPUT_PRICE
    finally:
        await client.close()


async def test_asyncio_and_threads_together(server: Server, admin: tally.Client) -> None:
    """One blocking client used from worker threads while the event loop uses an async one."""
    wallet = open_wallet(admin, "10")
    client = await server.async_client()
    try:
        loop_calls = [client.usage(wallet, PRODUCT, {"input_tokens": 1}) for _ in range(100)]
        thread_calls = [asyncio.to_thread(admin.usage, wallet, PRODUCT, {"input_tokens": 1}) for _ in range(100)]
        await asyncio.gather(*loop_calls, *thread_calls)
        assert (await client.balance(wallet, ASSET)).available == Decimal("10") - 200 * INPUT_PRICE
    finally:
        await client.close()


def test_restart_while_calls_retry(fresh_server: Server) -> None:
    """Calls in flight while the server is killed and restarted are retried with the same
    request id and applied exactly once; acknowledged calls survive the crash."""
    admin = fresh_server.client(retry_for=60)
    wallet = open_wallet(admin, "100")
    n, threads = 400, 8
    at = datetime.now(timezone.utc)
    ids = [tally.new_request_id() for _ in range(n)]
    done: list[tally.Charge] = []
    failures: list[BaseException] = []
    started = threading.Event()

    def work(part: int) -> None:
        for i in range(part, n, threads):
            try:
                done.append(admin.usage(wallet, PRODUCT, {"input_tokens": 1}, occurred_at=at, request_id=ids[i]))
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                failures.append(e)
            started.set()

    workers = [threading.Thread(target=work, args=(p,)) for p in range(threads)]
    for w in workers:
        w.start()
    started.wait(30)
    fresh_server.kill()  # kill -9 mid-run
    time.sleep(1.0)  # calls now retry against a dead address
    fresh_server.start()  # same data directory, same ports
    for w in workers:
        w.join(120)
    assert not failures, failures[:3]
    assert len(done) == n

    # Every call was applied once: the balance and the margin count n events, no more.
    assert admin.margin(wallet=wallet).events == n
    assert admin.balance(wallet, ASSET).available == Decimal("100") - n * INPUT_PRICE
    # A repeat of any of them is answered from the idempotency table and charges nothing.
    again = admin.usage(wallet, PRODUCT, {"input_tokens": 1}, occurred_at=at, request_id=ids[0])
    assert again.charged == INPUT_PRICE
    assert admin.margin(wallet=wallet).events == n
    admin.close()
