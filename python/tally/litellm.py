"""Prepaid wallets in front of a LiteLLM proxy: reserve before each model call, settle after it,
refuse it with HTTP 402 when the wallet cannot pay.

Name the hook in the proxy's ``config.yaml``; it reads its settings from the environment
(:meth:`Settings.from_env`)::

    litellm_settings:
      callbacks: ["tally.litellm.handler"]

Or build your own in a module next to the config (``callbacks: ["my_hook.handler"]``)::

    from tally.litellm import Settings, TallyHook
    handler = TallyHook(Settings(addr="10.0.0.5:7400", cert="/etc/tally/cert.pem", api_key=..., product="chat"))

The contract, per metered call (chat and text completions):

1. **Before the call** (``async_pre_call_hook``): find the caller's wallet (the request's
   ``user``, a header, or the virtual key's metadata, in the order of ``wallet_from``) and
   reserve the price of an estimate: the prompt's tokens (LiteLLM's own counter) and the request's
   ``max_tokens`` (or ``default_max_tokens``), with the public model name as the ``model``
   attribute, under the wallet's plan. A wallet that cannot pay gets **402** and the model is not
   called. The reserve's request id is derived from LiteLLM's call id, so a retried hook cannot
   hold twice.
2. **After a successful call**: settle the hold with the actual prompt and completion tokens and
   LiteLLM's ``response_cost`` as the vendor cost, turned into an exact decimal rounded half-even
   to ``cost_decimals`` places (default 10, i.e. 1e-10 USD), from the float's shortest repr. A
   plain response is settled before it is returned (``async_post_call_success_hook``); a stream
   is settled when it ends, from the usage of its final chunk, or else from LiteLLM's success log.
3. **After a failed call**: release the hold.
4. **A stream cut by the client**: LiteLLM still accounts for what was generated; the hold is
   settled from that (final-chunk usage or LiteLLM's log), and if nothing accounts for it within
   ``stream_cut_grace`` seconds it is released.

Each call is finished once: the first of these paths to reach a call wins and the others do
nothing. A settle that cannot reach tally is retried in the background with the same request id
until it succeeds or the hold expires (then the usage is recorded as ``record`` usage so the
revenue is not lost). When tally is unreachable before a call, ``on_unavailable`` decides:
``"closed"`` (the default) refuses the call with 503; ``"open"`` lets it through unmetered and
records its usage afterwards, counting it in the ``fail_open`` metric.

Metrics are counters in :attr:`TallyHook.stats`, and, when ``prometheus_client`` is installed,
the Prometheus counter ``tally_litellm_events_total{event=...}``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Literal

from fastapi import HTTPException
from litellm.integrations.custom_logger import CustomLogger

from . import errors
from ._client import AsyncClient

__all__ = ["Settings", "TallyHook", "cost_decimal", "estimate_prompt_tokens", "handler"]

log = logging.getLogger("tally.litellm")

#: LiteLLM call types that are metered; others (embeddings, images, ...) pass through.
METERED_CALL_TYPES = frozenset({"completion", "acompletion", "text_completion", "atext_completion"})

#: Refusals of a reserve that mean "this wallet cannot pay now": HTTP 402.
_CANNOT_PAY = (errors.InsufficientFunds, errors.WalletFrozen, errors.WalletInDebt)
#: Refusals that mean "this caller or model is not set up for billing": HTTP 403.
_NOT_SET_UP = (errors.UnknownWallet, errors.NoPlanAssigned, errors.NoMatchingRule, errors.UnknownProduct)

_IDS = uuid.UUID("7d1c3a52-41f0-4c7e-9a55-0c3f6e2b9d10")

#: Every event the hook counts (the values of the Prometheus label ``event``).
EVENTS = (
    "reserved",  # a hold was placed before a call
    "refused",  # a call was refused with 402 (the wallet cannot pay) or 429 (too many holds)
    "not_set_up",  # a call was refused with 403 (unknown wallet, no plan, unpriced model)
    "no_wallet",  # a call was refused with 400 (no wallet found for the caller)
    "fail_closed",  # tally was unreachable before a call, which was refused with 503
    "fail_open",  # tally was unreachable before a call, which went through unmetered
    "settled",  # a hold was settled with the actual usage
    "released",  # a hold was released (failed call, or a cut stream nobody accounted for)
    "recorded",  # usage was recorded without a hold (after fail-open, or an expired hold)
    "stream_cut",  # a stream ended before its last chunk (client went away)
    "retry_queued",  # a settle, release or record could not reach tally and was queued
    "retry_done",  # a queued one got through
    "lost",  # a queued one gave up (see the log): usage that was not billed
)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return default if value is None or value == "" else float(value)


@dataclass(frozen=True)
class Settings:
    """How the hook reaches tally and meters calls."""

    addr: str = "127.0.0.1:7400"
    cert: str = "tally-data/tls/cert.pem"
    api_key: str = ""
    """A gateway-scope key is enough (usage, reserve, settle, release, balance)."""
    product: str = "chat"
    """The tally product (meter) calls are priced as."""
    input_dimension: str = "input_tokens"
    output_dimension: str = "output_tokens"
    model_attribute: str | None = "model"
    """The attribute carrying the requested (public) model name, for per-model rules."""
    wallet_from: tuple[str, ...] = ("header:x-tally-wallet", "user")
    """Where the caller's wallet id comes from, first match wins: ``user`` (the request's
    ``user`` field), ``header:NAME`` (a request header), ``key_metadata:FIELD`` (the virtual
    key's metadata, where the proxy has its database)."""
    default_max_tokens: int = 4096
    """The completion estimate when a request names no ``max_tokens``."""
    hold_ttl: float = 600.0
    """Seconds a hold lives if nothing settles or releases it (the longest call you serve)."""
    on_unavailable: Literal["closed", "open"] = "closed"
    cost_decimals: int = 10
    """Places of USD kept from LiteLLM's float ``response_cost`` (at most 12)."""
    # Longer than the client's 3 s idle timeout, so a call in flight while tally restarts
    # reconnects and goes through instead of failing.
    retry_for: float = 10.0
    """The client's retry budget per call on the request path (seconds)."""
    connect_timeout: float = 2.0
    stream_cut_grace: float = 10.0
    """Seconds to wait for LiteLLM's accounting of a cut or usage-less stream before releasing."""
    record_retry_for: float = 3600.0
    """How long a fail-open call's usage is retried in the background before it is given up."""

    @staticmethod
    def from_env() -> Settings:
        """``TALLY_ADDR``, ``TALLY_CERT``, ``TALLY_API_KEY`` (as the CLI), and
        ``TALLY_LITELLM_PRODUCT``, ``_INPUT_DIMENSION``, ``_OUTPUT_DIMENSION``,
        ``_MODEL_ATTRIBUTE`` (empty: none), ``_WALLET_FROM`` (comma-separated),
        ``_DEFAULT_MAX_TOKENS``, ``_HOLD_TTL``, ``_ON_UNAVAILABLE`` (closed or open),
        ``_COST_DECIMALS``, ``_RETRY_FOR``, ``_CONNECT_TIMEOUT``, ``_STREAM_CUT_GRACE`` and
        ``_RECORD_RETRY_FOR`` (the fields below, upper-cased)."""
        d = Settings()
        env = os.environ.get
        on_unavailable = env("TALLY_LITELLM_ON_UNAVAILABLE", d.on_unavailable)
        if on_unavailable not in ("closed", "open"):
            raise ValueError(f"TALLY_LITELLM_ON_UNAVAILABLE must be closed or open, not {on_unavailable!r}")
        settings = Settings(
            addr=env("TALLY_ADDR", d.addr),
            cert=env("TALLY_CERT", d.cert),
            api_key=env("TALLY_API_KEY", ""),
            product=env("TALLY_LITELLM_PRODUCT", d.product),
            input_dimension=env("TALLY_LITELLM_INPUT_DIMENSION", d.input_dimension),
            output_dimension=env("TALLY_LITELLM_OUTPUT_DIMENSION", d.output_dimension),
            model_attribute=env("TALLY_LITELLM_MODEL_ATTRIBUTE", d.model_attribute or "") or None,
            wallet_from=tuple(
                s.strip() for s in env("TALLY_LITELLM_WALLET_FROM", ",".join(d.wallet_from)).split(",") if s.strip()
            ),
            default_max_tokens=int(env("TALLY_LITELLM_DEFAULT_MAX_TOKENS", str(d.default_max_tokens))),
            hold_ttl=_env_float("TALLY_LITELLM_HOLD_TTL", d.hold_ttl),
            on_unavailable=on_unavailable,  # type: ignore[arg-type]
            cost_decimals=int(env("TALLY_LITELLM_COST_DECIMALS", str(d.cost_decimals))),
            retry_for=_env_float("TALLY_LITELLM_RETRY_FOR", d.retry_for),
            connect_timeout=_env_float("TALLY_LITELLM_CONNECT_TIMEOUT", d.connect_timeout),
            stream_cut_grace=_env_float("TALLY_LITELLM_STREAM_CUT_GRACE", d.stream_cut_grace),
            record_retry_for=_env_float("TALLY_LITELLM_RECORD_RETRY_FOR", d.record_retry_for),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Raises ``ValueError`` on settings that cannot work."""
        if not self.api_key:
            raise ValueError("tally.litellm: no API key (TALLY_API_KEY)")
        if not 0 <= self.cost_decimals <= 12:
            raise ValueError("tally.litellm: cost_decimals must be 0 to 12 (tally keeps 12 places of cost)")
        for source in self.wallet_from:
            kind = source.split(":", 1)[0]
            if source != "user" and not (kind in ("header", "key_metadata") and ":" in source):
                raise ValueError(f"tally.litellm: wallet source {source!r} is not user, header:NAME or key_metadata:FIELD")
        if not 0 < self.hold_ttl <= 7 * 86400:
            raise ValueError("tally.litellm: hold_ttl must be more than 0 and at most 7 days")


def cost_decimal(cost: float | int | str | Decimal | None, decimals: int = 10) -> Decimal:
    """LiteLLM's ``response_cost`` (a float in USD) as an exact decimal: the float's shortest
    repr (what LiteLLM computed, without binary noise), rounded half-even to ``decimals``
    places. ``None``, negative or non-finite costs are 0."""
    if cost is None or isinstance(cost, bool):
        return Decimal(0)
    try:
        value = Decimal(repr(cost)) if isinstance(cost, float) else Decimal(str(cost))
    except InvalidOperation:
        return Decimal(0)
    if not value.is_finite() or value < 0:
        return Decimal(0)
    return value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_EVEN)


def estimate_prompt_tokens(data: Mapping[str, Any]) -> int:
    """The prompt's tokens as LiteLLM counts them for the requested model (its default tokenizer
    for model names it does not know); a quarter of the characters if counting fails."""
    import litellm

    model = str(data.get("model") or "")
    try:
        if data.get("messages") is not None:
            return int(litellm.token_counter(model=model, messages=data["messages"]))
        prompt = data.get("prompt")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt or []))
        return int(litellm.token_counter(model=model, text=text))
    except Exception:  # noqa: BLE001 - the estimate must never break a call
        size = len(str(data.get("messages") or data.get("prompt") or ""))
        return max(1, size // 4)


def _usage_numbers(usage: Any) -> tuple[int, int] | None:
    if usage is None:
        return None
    get = usage.get if isinstance(usage, Mapping) else lambda k, d=None: getattr(usage, k, d)
    prompt, completion = get("prompt_tokens"), get("completion_tokens")
    if prompt is None and completion is None:
        return None
    return int(prompt or 0), int(completion or 0)


@dataclass
class _Open:
    """A metered call between its reserve and its finish."""

    call_id: str
    wallet: str
    model: str
    hold: int | None
    """``None`` for a fail-open call (no hold)."""
    deadline: float
    """Monotonic time after which tally has released the hold by itself."""
    last_usage: tuple[int, int] | None = None
    last_cost: Any = None
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class TallyHook(CustomLogger):
    """The LiteLLM proxy hook. One per proxy process; it owns one :class:`tally.AsyncClient`."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__()
        self.settings = settings or Settings.from_env()
        self.settings.check()
        self._client: AsyncClient | None = None
        self._connecting = asyncio.Lock()
        self._open: collections.OrderedDict[str, _Open] = collections.OrderedDict()
        self._background: set[asyncio.Task[None]] = set()
        #: Counters of :data:`EVENTS` since the hook started.
        self.stats: dict[str, int] = dict.fromkeys(EVENTS, 0)
        self._prometheus = _prometheus_counter()

    # ----- plumbing ------------------------------------------------------------------------

    def _count(self, event: str) -> None:
        self.stats[event] += 1
        if self._prometheus is not None:
            self._prometheus.labels(event=event).inc()

    def request_id(self, call_id: str, step: str) -> int:
        """The request id of one step (``reserve``, ``finish``, ``record``) of one call: derived
        from LiteLLM's call id, so a repeat of the step is the same request to tally."""
        return uuid.uuid5(_IDS, f"{call_id}/{step}").int

    async def client(self) -> AsyncClient:
        """The tally client, connected on first use (and again after a failed first connect)."""
        if self._client is None:
            async with self._connecting:
                if self._client is None:
                    s = self.settings
                    self._client = await AsyncClient.connect(
                        s.addr, s.cert, s.api_key, retry_for=s.retry_for, connect_timeout=s.connect_timeout
                    )
        return self._client

    def _wallet_of(self, data: Mapping[str, Any], key: Any) -> str | None:
        headers: dict[str, str] = {}
        for source in ((data.get("proxy_server_request") or {}).get("headers"), (data.get("metadata") or {}).get("headers")):
            if isinstance(source, Mapping):
                headers.update({str(k).lower(): str(v) for k, v in source.items()})
        for source in self.settings.wallet_from:
            kind, _, name = source.partition(":")
            value: Any = None
            if kind == "user":
                value = data.get("user")
            elif kind == "header":
                value = headers.get(name.lower())
            elif kind == "key_metadata":
                value = (getattr(key, "metadata", None) or {}).get(name)
            if isinstance(value, str) and value.strip():
                return value.strip()
        return None

    def _attributes(self, model: str) -> dict[str, str]:
        return {self.settings.model_attribute: model} if self.settings.model_attribute and model else {}

    def _quantities(self, prompt: int, completion: int) -> dict[str, int]:
        return {self.settings.input_dimension: prompt, self.settings.output_dimension: completion}

    def _sweep(self) -> None:
        """Forgets calls whose hold tally has released by itself (nothing finished them)."""
        now = time.monotonic()
        while self._open:
            call_id, call = next(iter(self._open.items()))
            if call.deadline > now:
                break
            del self._open[call_id]
            log.warning("tally: call %s was never finished; its hold %s expired in tally", call_id, call.hold)

    def _take(self, call_id: str | None) -> _Open | None:
        """The open call, removed: whoever takes it finishes it; everyone else does nothing."""
        call = self._open.pop(call_id, None) if call_id else None
        if call is not None and call.timer is not None:
            call.timer.cancel()
        return call

    # ----- before the call ------------------------------------------------------------------

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: str) -> dict[str, Any]:  # noqa: E501
        if call_type not in METERED_CALL_TYPES:
            return data
        self._sweep()
        s = self.settings
        call_id = str(data.get("litellm_call_id") or uuid.uuid4())
        wallet = self._wallet_of(data, user_api_key_dict)
        if wallet is None:
            self._count("no_wallet")
            raise HTTPException(status_code=400, detail={"error": "tally: no wallet for this caller: set the request's `user`" + (f" or the {s.wallet_from[0]} header" if s.wallet_from[0].startswith("header:") else "")})  # noqa: E501
        model = str(data.get("model") or "")
        max_tokens = data.get("max_tokens") or data.get("max_completion_tokens") or s.default_max_tokens
        estimate = self._quantities(estimate_prompt_tokens(data), int(max_tokens))
        try:
            client = await self.client()
            hold = await client.reserve(
                wallet,
                product=s.product,
                quantities=estimate,
                attributes=self._attributes(model),
                ttl=s.hold_ttl,
                request_id=self.request_id(call_id, "reserve"),
            )
        except _CANNOT_PAY as e:
            self._count("refused")
            detail = f"tally: wallet {wallet} cannot pay for this call ({e.name})"
            if e.required is not None:
                detail += f": it needs {e.required} {e.asset} and has {e.spendable} available"
            raise HTTPException(status_code=402, detail={"error": detail}) from None
        except _NOT_SET_UP as e:
            self._count("not_set_up")
            raise HTTPException(status_code=403, detail={"error": f"tally: wallet {wallet} is not set up to pay for model {model!r} ({e.name})"}) from None  # noqa: E501
        except errors.LimitExceeded:
            self._count("refused")
            raise HTTPException(status_code=429, detail={"error": f"tally: wallet {wallet} has the most calls in flight it may hold (LimitExceeded)"}) from None  # noqa: E501
        except errors.Unavailable as e:
            if s.on_unavailable == "closed":
                self._count("fail_closed")
                log.error("tally unreachable, call refused (fail closed): %s", e)
                raise HTTPException(status_code=503, detail={"error": "tally: billing is unavailable, try again shortly"}) from None  # noqa: E501
            self._count("fail_open")
            log.error("tally unreachable, call let through unmetered (fail open): %s", e)
            self._open[call_id] = _Open(call_id, wallet, model, None, time.monotonic() + s.record_retry_for)
            return data
        self._count("reserved")
        self._open[call_id] = _Open(call_id, wallet, model, hold.hold, time.monotonic() + s.hold_ttl)
        metadata = data.setdefault("metadata", {})
        if isinstance(metadata, dict):
            metadata["tally"] = {"wallet": wallet, "hold": hold.hold, "held": str(hold.amount), "asset": hold.asset}
        return data

    # ----- after the call -------------------------------------------------------------------

    async def async_post_call_success_hook(self, data: dict[str, Any], user_api_key_dict: Any, response: Any) -> Any:
        """A complete (not streamed) response: settle before it is returned."""
        usage = _usage_numbers(getattr(response, "usage", None))
        call = self._take(data.get("litellm_call_id")) if usage is not None else None
        if call is not None:
            hidden = getattr(response, "_hidden_params", None) or {}
            cost = hidden.get("response_cost")
            if cost is None:
                cost = _completion_cost(response)
            await self._settle(call, usage, cost)  # type: ignore[arg-type]
        return response

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        """A stream: passed through; its final usage (LiteLLM adds one to the last chunk) settles
        the hold when it ends, or, if the client cuts it, whatever accounted for it."""
        call_id = request_data.get("litellm_call_id")
        complete = False
        try:
            async for chunk in response:
                call = self._open.get(call_id) if call_id else None
                usage = _usage_numbers(getattr(chunk, "usage", None))
                if call is not None and usage is not None:
                    call.last_usage = usage
                    call.last_cost = getattr(chunk.usage, "cost", None)
                yield chunk
            complete = True
        finally:
            if not complete:
                self._count("stream_cut")
            call = self._open.get(call_id) if call_id else None
            if call is not None:
                if call.last_usage is not None and call.last_cost is not None:
                    self._take(call_id)
                    self._spawn(self._settle(call, call.last_usage, call.last_cost))
                else:
                    # LiteLLM's success log (with usage and cost) usually follows; if it does
                    # not, release after the grace period.
                    loop = asyncio.get_running_loop()
                    call.timer = loop.call_later(self.settings.stream_cut_grace, self._unaccounted, call_id)

    def _unaccounted(self, call_id: str) -> None:
        call = self._open.pop(call_id, None)
        if call is not None:
            log.warning("tally: stream %s ended with no usage reported within %ss: releasing its hold", call_id, self.settings.stream_cut_grace)  # noqa: E501
            self._spawn(self._release(call))

    async def async_log_success_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:  # noqa: E501
        """LiteLLM's success log: finishes a call no other path finished (a stream without
        final usage, a route without the post-call hook)."""
        call = self._take(kwargs.get("litellm_call_id"))
        if call is None:
            return
        usage = _usage_numbers(getattr(response_obj, "usage", None))
        if usage is None:
            self._spawn(self._release(call))
            return
        self._spawn(self._settle(call, usage, kwargs.get("response_cost")))

    async def async_post_call_failure_hook(self, request_data: dict[str, Any], original_exception: Exception, user_api_key_dict: Any, traceback_str: str | None = None) -> None:  # noqa: E501
        call = self._take(request_data.get("litellm_call_id"))
        if call is not None:
            await self._release(call)

    async def async_log_failure_event(self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:  # noqa: E501
        call = self._take(kwargs.get("litellm_call_id"))
        if call is not None:
            self._spawn(self._release(call))

    # ----- finishing ------------------------------------------------------------------------

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settle(self, call: _Open, usage: tuple[int, int], cost: Any) -> None:
        s = self.settings
        quantities = self._quantities(*usage)
        cost_usd = cost_decimal(cost, s.cost_decimals)
        occurred_at = int(time.time() * 1_000_000)
        if call.hold is None:  # fail-open: no hold, record what was served
            step = "record"

            async def send(client: AsyncClient) -> None:
                await client.usage(call.wallet, s.product, quantities, attributes=self._attributes(call.model), cost_usd=cost_usd, occurred_at=occurred_at, record=True, request_id=self.request_id(call.call_id, step))  # noqa: E501
                self._count("recorded")
        else:
            hold = call.hold

            async def send(client: AsyncClient) -> None:
                try:
                    await client.settle(call.wallet, hold, s.product, quantities, attributes=self._attributes(call.model), cost_usd=cost_usd, occurred_at=occurred_at, request_id=self.request_id(call.call_id, "finish"))  # noqa: E501
                    self._count("settled")
                except errors.HoldExpired:
                    # The call outlived its hold: charge what was served anyway (record mode).
                    log.warning("tally: hold %s of call %s expired before its settle: recording the usage", hold, call.call_id)  # noqa: E501
                    await client.usage(call.wallet, s.product, quantities, attributes=self._attributes(call.model), cost_usd=cost_usd, occurred_at=occurred_at, record=True, request_id=self.request_id(call.call_id, "record"))  # noqa: E501
                    self._count("recorded")

        await self._deliver(call, send)

    async def _release(self, call: _Open) -> None:
        if call.hold is None:
            return
        hold = call.hold

        async def send(client: AsyncClient) -> None:
            try:
                await client.release(call.wallet, hold, request_id=self.request_id(call.call_id, "finish"))
            except (errors.HoldExpired, errors.HoldAlreadyReleased):
                pass  # released all the same
            self._count("released")

        await self._deliver(call, send)

    async def _deliver(self, call: _Open, send: Any) -> None:
        """Sends a finishing request; if tally is unreachable, keeps retrying it (same request
        id, same body) in the background until it gets through or the call's time runs out."""
        try:
            await send(await self.client())
            return
        except errors.Unavailable as e:
            log.warning("tally unreachable while finishing call %s (%s): retrying in the background", call.call_id, e)
        except errors.TallyError as e:
            self._count("lost")
            log.error("tally refused to finish call %s (wallet %s, hold %s): %s", call.call_id, call.wallet, call.hold, e)  # noqa: E501
            return
        self._count("retry_queued")
        self._spawn(self._retry(call, send))

    async def _retry(self, call: _Open, send: Any) -> None:
        # A settle may still get through after the hold's deadline (then it records), so a
        # little past it; fail-open usage is retried for record_retry_for.
        give_up = call.deadline + (60.0 if call.hold is not None else 0.0)
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            try:
                await send(await self.client())
                self._count("retry_done")
                return
            except errors.Unavailable as e:
                if time.monotonic() > give_up:
                    self._count("lost")
                    log.error("tally: gave up finishing call %s (wallet %s, hold %s): %s", call.call_id, call.wallet, call.hold, e)  # noqa: E501
                    return
            except errors.TallyError as e:
                self._count("lost")
                log.error("tally refused to finish call %s (wallet %s, hold %s): %s", call.call_id, call.wallet, call.hold, e)  # noqa: E501
                return
            delay = min(delay * 2, 30.0)

    async def drain(self, timeout: float = 30.0) -> None:
        """Waits until background finishing work is done (for tests and graceful shutdown)."""
        deadline = time.monotonic() + timeout
        while self._background and time.monotonic() < deadline:
            await asyncio.wait(set(self._background), timeout=max(0.0, deadline - time.monotonic()))

    def open_calls(self) -> int:
        """Calls reserved and not finished yet."""
        return len(self._open)


def _completion_cost(response: Any) -> float | None:
    try:
        import litellm

        return float(litellm.completion_cost(completion_response=response))
    except Exception:  # noqa: BLE001 - an unknown cost is 0, not a failed call
        return None


def _prometheus_counter() -> Any:
    try:
        from prometheus_client import REGISTRY, Counter
    except ImportError:
        return None
    name = "tally_litellm_events_total"
    existing = getattr(REGISTRY, "_names_to_collectors", {}).get(name)
    if existing is not None:
        return existing
    return Counter(name, "tally's LiteLLM hook: reserves, refusals, settles, releases, fail-open calls", ["event"])


_handler: TallyHook | None = None


def __getattr__(name: str) -> Any:
    """``tally.litellm.handler``: a hook configured from the environment, made on first access
    (LiteLLM's config loader takes it from here); a bad configuration fails the proxy's start."""
    global _handler
    if name == "handler":
        if _handler is None:
            _handler = TallyHook(Settings.from_env())
        return _handler
    raise AttributeError(name)

