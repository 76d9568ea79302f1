"""A real LiteLLM proxy (litellm[proxy] from PyPI, models answered by LiteLLM's own mock
responses, the cost map read locally) with tally.litellm as its hook, in front of a real
`tally serve`, driven by the openai client.

The mock's usage is pinned to the hook's own estimate (prompt tokens as LiteLLM counts them,
completion tokens = max_tokens), so every hold equals its charge and "a wallet that can afford
exactly N calls" is exact whatever the interleaving.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import litellm
import openai
import pytest
from conftest import ASSET, INPUT_PRICE, OUTPUT_PRICE, PRODUCT, Server, open_wallet, tally_bin

import tally
from tally.litellm import Settings, TallyHook, cost_decimal, estimate_prompt_tokens

MASTER_KEY = "sk-tally-test-master"
MESSAGES = [{"role": "user", "content": "What does a prepaid wallet do for an AI product?"}]
MAX_TOKENS = 16
PROMPT_TOKENS = estimate_prompt_tokens({"model": "chat-mock", "messages": MESSAGES})
MOCK = {
    "id": "chatcmpl-tally-mock",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Paid, then answered."}}],  # noqa: E501
    "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": MAX_TOKENS, "total_tokens": PROMPT_TOKENS + MAX_TOKENS},  # noqa: E501
}
#: What one call holds and is charged under the test plan.
PRICE = PROMPT_TOKENS * INPUT_PRICE + MAX_TOKENS * OUTPUT_PRICE
#: LiteLLM's cost of one call (gpt-4o-mini in its local cost map), as the hook turns it into a decimal.
COST = cost_decimal(litellm.completion_cost(completion_response=litellm.ModelResponse(**MOCK)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proxy:
    """`litellm --config config.yaml` as a child process on a free loopback port."""

    def __init__(self, workdir: Path, server: Server, gateway_key: str, *, callbacks: tuple[str, ...] = ("tally.litellm.handler",)) -> None:  # noqa: E501
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "model_list": [
                {"model_name": "chat-mock", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "sk-mock", "mock_response": MOCK}},  # noqa: E501
                {"model_name": "chat-stream", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "sk-mock", "mock_response": "A streamed answer, cut or not, is paid for once."}},  # noqa: E501
                {"model_name": "chat-fail", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "sk-mock", "mock_response": "litellm.InternalServerError"}},  # noqa: E501
            ],
            "litellm_settings": {"callbacks": list(callbacks), "num_retries": 0},
            "general_settings": {"master_key": MASTER_KEY},
        }
        self.config = workdir / "config.yaml"
        self.config.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.log = workdir / "litellm.log"
        env = dict(os.environ)
        env.update(
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            TALLY_ADDR=server.quic,
            TALLY_CERT=server.cert,
            TALLY_API_KEY=gateway_key,
            TALLY_LITELLM_PRODUCT=PRODUCT,
            TALLY_LITELLM_RETRY_FOR="60",  # rides out a kill -9 (a dead QUIC connection is noticed after its 30 s idle timeout) and restart
            TALLY_LITELLM_STREAM_CUT_GRACE="2",
        )
        litellm_bin = Path(sys.executable).with_name("litellm")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [str(litellm_bin), "--config", str(self.config), "--host", "127.0.0.1", "--port", str(self.port), "--num_workers", "1"],  # noqa: E501
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
            )
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"litellm exited ({self.process.returncode}):\n{self.log.read_text()[-5000:]}")
            try:
                if httpx.get(self.url + "/health/liveliness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("litellm did not start within 180 s:\n" + self.log.read_text()[-5000:])
            time.sleep(0.5)

    def client(self, **options: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url, api_key=MASTER_KEY, max_retries=0, timeout=120, **options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Proxy]]:
    from conftest import prepare_catalog

    workdir = tmp_path_factory.mktemp("litellm")
    server = Server(workdir / "tally").start()
    with server.client() as admin:
        prepare_catalog(admin)
        _, gateway_key = admin.create_key("litellm", "gateway")
    proxy = Proxy(workdir, server, gateway_key)
    try:
        yield server, proxy
    finally:
        proxy.stop()
        if server.process is not None:
            assert server.stop() == 0, "".join(server.log[-50:])


async def complete(client: openai.AsyncOpenAI, wallet: str, *, by: str) -> int:
    """One chat completion for `wallet`, named by the `user` field or the header; its status."""
    extra: dict[str, Any] = {"extra_headers": {"x-tally-wallet": wallet}} if by == "header" else {"user": wallet}
    try:
        reply = await client.chat.completions.create(model="chat-mock", messages=MESSAGES, max_tokens=MAX_TOKENS, **extra)  # type: ignore[arg-type]  # noqa: E501
    except openai.APIStatusError as e:
        return e.status_code
    assert reply.usage is not None and reply.usage.prompt_tokens == PROMPT_TOKENS
    return 200


def wait_closed(admin: tally.Client, wallet: str, timeout: float = 30.0) -> tally.Wallet:
    deadline = time.monotonic() + timeout
    while True:
        info = admin.wallet(wallet)
        if not info.holds or time.monotonic() > deadline:
            return info
        time.sleep(0.2)


def check_paid_exactly(server: Server, admin: tally.Client, wallet: str, n: int, credit: Decimal) -> None:
    info = wait_closed(admin, wallet)
    assert info.holds == [], "holds left open"
    balance = info.balances[ASSET]
    assert balance.available == credit - n * PRICE
    assert balance.held == 0 and balance.debt == 0
    margin = admin.margin(wallet=wallet)
    assert (margin.events, margin.revenue_usd, margin.cost_usd) == (n, n * PRICE, n * COST)
    assert margin.margin_usd == n * (PRICE - COST)
    # The operator's view: `tally margin` over QUIC, as printed by the CLI.
    out = subprocess.run(
        [tally_bin(), "margin", "--wallet", wallet, "--json"],
        env={**os.environ, "TALLY_ADDR": server.quic, "TALLY_CERT": server.cert, "TALLY_API_KEY": server.admin_key},
        capture_output=True, text=True, timeout=60, check=True,
    )
    shown = json.loads(out.stdout)["margin"]
    assert (shown["events"], Decimal(shown["revenue_usd"]), Decimal(shown["cost_usd"])) == (n, n * PRICE, n * COST)


async def test_200_concurrent_calls_against_a_wallet_that_pays_for_n(stack: tuple[Server, Proxy]) -> None:
    server, proxy = stack
    n = 37
    admin = server.client()
    poor = open_wallet(admin, n * PRICE, prefix="poor")
    rich = open_wallet(admin, 1000 * PRICE, prefix="rich")
    callers = [proxy.client() for _ in range(4)]  # several callers, each with its own connections
    calls = [complete(callers[i % 4], poor, by="user" if i % 2 else "header") for i in range(200)]
    calls += [complete(callers[i % 4], rich, by="user") for i in range(20)]
    statuses = await asyncio.gather(*calls)
    for c in callers:
        await c.close()

    poor_statuses, rich_statuses = statuses[:200], statuses[200:]
    assert poor_statuses.count(200) == n
    assert poor_statuses.count(402) == 200 - n, sorted(set(poor_statuses))
    assert rich_statuses == [200] * 20
    check_paid_exactly(server, admin, poor, n, n * PRICE)
    check_paid_exactly(server, admin, rich, 20, 1000 * PRICE)
    admin.close()


async def test_402_says_why(stack: tuple[Server, Proxy]) -> None:
    server, proxy = stack
    with server.client() as admin:
        wallet = open_wallet(admin, "0", prefix="empty")
    client = proxy.client()
    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(model="chat-mock", messages=MESSAGES, max_tokens=MAX_TOKENS, user=wallet)  # type: ignore[arg-type]  # noqa: E501
    assert refused.value.status_code == 402
    assert f"wallet {wallet} cannot pay" in refused.value.message and "InsufficientFunds" in refused.value.message
    with pytest.raises(openai.APIStatusError) as unknown:
        await client.chat.completions.create(model="chat-mock", messages=MESSAGES, user="nobody-at-all")  # type: ignore[arg-type]  # noqa: E501
    assert unknown.value.status_code == 403
    with pytest.raises(openai.APIStatusError) as anonymous:
        await client.chat.completions.create(model="chat-mock", messages=MESSAGES)  # type: ignore[arg-type]
    assert anonymous.value.status_code == 400
    await client.close()


async def test_failed_call_releases_its_hold(stack: tuple[Server, Proxy]) -> None:
    server, proxy = stack
    with server.client() as admin:
        wallet = open_wallet(admin, "1", prefix="fail")
        client = proxy.client()
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model="chat-fail", messages=MESSAGES, user=wallet)  # type: ignore[arg-type]  # noqa: E501
        assert failed.value.status_code >= 500
        await client.close()
        info = wait_closed(admin, wallet)
        assert info.holds == [] and info.balances[ASSET].available == Decimal("1")
        assert info.margin.events == 0


async def test_streams_settle_and_cut_streams_close(stack: tuple[Server, Proxy]) -> None:
    server, proxy = stack
    with server.client() as admin:
        credit = Decimal("1")
        whole = open_wallet(admin, credit, prefix="stream")
        cut = open_wallet(admin, credit, prefix="cut")
        client = proxy.client()

        # A whole stream: settled at its end with the usage LiteLLM reports for it.
        stream = await client.chat.completions.create(model="chat-stream", messages=MESSAGES, max_tokens=50, user=whole, stream=True)  # type: ignore[arg-type]  # noqa: E501
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text.startswith("A streamed answer")
        info = wait_closed(admin, whole)
        assert info.holds == [] and info.margin.events == 1
        assert info.margin.revenue_usd > 0 and info.margin.cost_usd > 0
        assert info.balances[ASSET].available == credit - info.margin.revenue_usd
        assert info.balances[ASSET].debt == 0

        # A stream the client cuts after its first chunk: the hold does not stay open, and
        # whatever was charged is what was accounted for (never more than the hold).
        async with httpx.AsyncClient(base_url=proxy.url, timeout=60) as http:
            body = {"model": "chat-stream", "messages": MESSAGES, "max_tokens": 50, "user": cut, "stream": True}
            async with http.stream("POST", "/chat/completions", json=body, headers={"Authorization": f"Bearer {MASTER_KEY}"}) as response:  # noqa: E501
                assert response.status_code == 200
                async for _line in response.aiter_lines():
                    break  # the client goes away
        info = wait_closed(admin, cut)
        assert info.holds == [], "the cut stream's hold is still open"
        margin = info.margin
        assert margin.events in (0, 1)
        assert info.balances[ASSET].available == credit - margin.revenue_usd
        if margin.events == 1:  # settled with LiteLLM's usage of the stream
            assert margin.revenue_usd == admin.margin(wallet=whole).revenue_usd
        await client.close()


async def test_tally_restart_mid_run_loses_no_settled_usage(stack: tuple[Server, Proxy]) -> None:
    server, proxy = stack
    n = 60
    admin = server.client(retry_for=60)
    wallet = open_wallet(admin, n * PRICE, prefix="restart")
    admin.close()
    callers = [proxy.client() for _ in range(4)]

    async def wave(start: int) -> list[int]:
        return await asyncio.gather(*(complete(callers[i % 4], wallet, by="user") for i in range(start, start + 20)))

    statuses: list[int] = []
    for w in range(10):
        if w == 4:
            # kill -9 while a wave is in flight; its reserves and settles ride out the restart
            # on the hook client's retries (same request ids).
            in_flight = asyncio.ensure_future(wave(w * 20))
            await asyncio.sleep(0.05)
            server.kill()
            await asyncio.sleep(1.0)
            await asyncio.get_running_loop().run_in_executor(None, server.start)
            statuses += await in_flight
        else:
            statuses += await wave(w * 20)
    for c in callers:
        await c.close()
    assert statuses.count(200) == n, sorted(set(statuses))
    assert statuses.count(402) == 200 - n
    with server.client() as admin:
        check_paid_exactly(server, admin, wallet, n, n * PRICE)


async def test_unreachable_tally_fails_closed_or_open(server: Server) -> None:
    """The hook on its own (no proxy), pointed at an address where nothing listens."""
    from fastapi import HTTPException

    cert = server.cert
    data = {"model": "chat-mock", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "user": "w", "litellm_call_id": "c1"}
    base = Settings(addr=f"127.0.0.1:{free_port()}", cert=cert, api_key="k" * 32, retry_for=0.2, connect_timeout=0.3)

    closed = TallyHook(base)
    with pytest.raises(HTTPException) as refused:
        await closed.async_pre_call_hook(None, None, dict(data), "acompletion")
    assert refused.value.status_code == 503
    assert closed.stats["fail_closed"] == 1

    from dataclasses import replace

    opened = TallyHook(replace(base, on_unavailable="open", record_retry_for=0.0))
    assert await opened.async_pre_call_hook(None, None, dict(data), "acompletion") is not None
    assert opened.stats["fail_open"] == 1 and opened.open_calls() == 1
    response = litellm.ModelResponse(**MOCK)
    await opened.async_post_call_success_hook(dict(data), None, response)
    assert opened.stats["retry_queued"] == 1 and opened.open_calls() == 0
    await opened.drain(timeout=30)
    assert opened.stats["lost"] == 1  # record_retry_for=0: given up at once, and counted


def test_cost_decimal() -> None:
    assert cost_decimal(1.155e-05) == Decimal("0.00001155")
    assert cost_decimal(0.1 + 0.2) == Decimal("0.3000000000")  # 0.30000000000000004 -> 10 places
    assert cost_decimal(1.23456789012345e-3, 12) == Decimal("0.001234567890")
    assert cost_decimal(None) == cost_decimal(-1.0) == cost_decimal(float("nan")) == 0
    assert str(cost_decimal(2.5e-11)) == "0E-10"  # below 1e-10 USD rounds half-even to 0


def test_wallet_sources() -> None:
    settings = Settings(api_key="k" * 32, wallet_from=("header:X-Tally-Wallet", "key_metadata:wallet", "user"))
    hook = TallyHook(settings)

    class Key:
        metadata = {"wallet": "from-key"}

    headers = {"proxy_server_request": {"headers": {"x-tally-wallet": "from-header"}}, "user": "from-user"}
    assert hook._wallet_of(headers, Key()) == "from-header"
    assert hook._wallet_of({"user": "from-user"}, Key()) == "from-key"
    assert hook._wallet_of({"user": "from-user"}, None) == "from-user"
    assert hook._wallet_of({}, None) is None
    with pytest.raises(ValueError):
        Settings(api_key="k" * 32, wallet_from=("cookie:x",)).check()
