"""Figures for docs/benchmarks.md: the latency tally's hook adds to a LiteLLM proxy call, and the
Python client's own throughput. Not a test; run it with the venv of scripts/python-tests:

    target/tools/python-venv/bin/python python/bench/gateway.py [--calls 1000] [--json]

It starts a `tally serve` ($TALLY_BIN, default target/release/tally) on a temporary data
directory, and three LiteLLM proxies on the same machine in the same run: with no callback, with
a callback that does nothing (what LiteLLM itself costs for having one) and with the tally hook,
all answering from LiteLLM's mock responses. Latency: one call at a time, rotating between the
proxies, so all see the same noise; then each at 16 calls in flight. Throughput: usage events through `tally.Client` from 1 and 16 threads, and through
`tally.AsyncClient` with 256 tasks in flight, over several wallets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("TALLY_BIN", str(HERE.parents[1] / "target" / "release" / "tally"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

#: A callback with every hook tally's uses, doing nothing: what LiteLLM costs for having one.
NOOP_HOOK = """
from litellm.integrations.custom_logger import CustomLogger


class Noop(CustomLogger):
    async def async_pre_call_hook(self, user_api_key_dict, cache, data, call_type):
        return data

    async def async_post_call_success_hook(self, data, user_api_key_dict, response):
        return response

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        pass


handler = Noop()
"""

import openai  # noqa: E402
from conftest import PRODUCT, Server, open_wallet, prepare_catalog  # noqa: E402
from test_litellm import MASTER_KEY, MAX_TOKENS, MESSAGES, PRICE, Proxy  # noqa: E402

import tally  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3), "mean_ms": round(statistics.fmean(ms), 3)}  # noqa: E501


def sequential_latency(proxies: dict[str, Proxy], wallet: str, calls: int) -> dict[str, dict[str, float]]:
    clients = {name: openai.OpenAI(base_url=p.url, api_key=MASTER_KEY, max_retries=0) for name, p in proxies.items()}
    times: dict[str, list[float]] = {name: [] for name in proxies}
    names = list(proxies)
    for i in range(calls + 50):
        order = names[i % len(names):] + names[: i % len(names)]  # rotate who goes first
        for name in order:
            start = time.perf_counter()
            clients[name].chat.completions.create(model="chat-mock", messages=MESSAGES, max_tokens=MAX_TOKENS, user=wallet)  # type: ignore[arg-type]  # noqa: E501
            if i >= 50:  # the first 50 warm both up
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: summary(t) for name, t in times.items()}


async def concurrent_latency(proxies: dict[str, Proxy], wallet: str, calls: int, in_flight: int) -> dict[str, dict[str, float]]:  # noqa: E501
    out = {}
    for name, proxy in proxies.items():
        client = openai.AsyncOpenAI(base_url=proxy.url, api_key=MASTER_KEY, max_retries=0)
        times: list[float] = []
        gate = asyncio.Semaphore(in_flight)

        async def one() -> None:
            async with gate:
                start = time.perf_counter()
                await client.chat.completions.create(model="chat-mock", messages=MESSAGES, max_tokens=MAX_TOKENS, user=wallet)  # type: ignore[arg-type]  # noqa: E501
                times.append((time.perf_counter() - start) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(calls)))
        elapsed = time.perf_counter() - started
        out[name] = summary(times) | {"calls_per_s": round(calls / elapsed, 1)}
        await client.close()
    return out


def thread_throughput(server: Server, wallets: list[str], threads: int, seconds: float) -> dict[str, float]:
    client = server.client()
    stop = time.perf_counter() + seconds
    counts = [0] * threads
    latencies: list[list[float]] = [[] for _ in range(threads)]

    def work(t: int) -> None:
        wallet = wallets[t % len(wallets)]
        while time.perf_counter() < stop:
            start = time.perf_counter()
            client.usage(wallet, PRODUCT, {"input_tokens": 10})
            latencies[t].append((time.perf_counter() - start) * 1000)
            counts[t] += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    client.close()
    return {"calls_per_s": round(sum(counts) / elapsed, 1)} | summary([x for ls in latencies for x in ls])


async def async_throughput(server: Server, wallets: list[str], in_flight: int, seconds: float) -> dict[str, float]:
    client = await server.async_client()
    stop = time.perf_counter() + seconds
    count = 0
    latencies: list[float] = []

    async def worker(i: int) -> None:
        nonlocal count
        wallet = wallets[i % len(wallets)]
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await client.usage(wallet, PRODUCT, {"input_tokens": 10})
            latencies.append((time.perf_counter() - start) * 1000)
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(in_flight)))
    elapsed = time.perf_counter() - started
    await client.close()
    return {"calls_per_s": round(count / elapsed, 1)} | summary(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000, help="calls per proxy in the sequential run")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each client throughput run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tally-bench-") as tmp:
        work = Path(tmp)
        server = Server(work / "tally").start()
        proxies: dict[str, Proxy] = {}
        try:
            with server.client() as admin:
                prepare_catalog(admin)
                _, gateway_key = admin.create_key("bench", "gateway")
                wallet = open_wallet(admin, 100_000 * PRICE, prefix="bench")
                wallets = [open_wallet(admin, Decimal(1_000_000), prefix="tp") for _ in range(64)]
            for name, callbacks in (("plain", ()), ("noop", ("noop_hook.handler",)), ("hook", ("tally.litellm.handler",))):
                (work / name).mkdir()
                (work / name / "noop_hook.py").write_text(NOOP_HOOK)
                proxies[name] = Proxy(work / name, server, gateway_key, callbacks=callbacks)
            results = {
                "litellm_sequential": sequential_latency(proxies, wallet, args.calls),
                "litellm_16_in_flight": asyncio.run(concurrent_latency(proxies, wallet, args.calls, 16)),
                "client_1_thread": thread_throughput(server, wallets, 1, args.seconds),
                "client_16_threads": thread_throughput(server, wallets, 16, args.seconds),
                "client_async_256_tasks": asyncio.run(async_throughput(server, wallets, 256, args.seconds)),
            }
        finally:
            for proxy in proxies.values():
                proxy.stop()
            server.stop()

    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| LiteLLM proxy, chat completion (mock) | p50 ms | p99 ms | mean ms | calls/s |")
    print("|---|---:|---:|---:|---:|")
    for run in ("litellm_sequential", "litellm_16_in_flight"):
        label = {"plain": "no callback", "noop": "a no-op callback", "hook": "the tally hook"}
        for name in ("plain", "noop", "hook"):
            r = results[run][name]
            print(f"| {run.removeprefix('litellm_')}, {label[name]} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_ms']} | {r.get('calls_per_s', '')} |")  # noqa: E501
        for base in ("plain", "noop"):
            added = {k: round(results[run]["hook"][k] - results[run][base][k], 3) for k in ("p50_ms", "p99_ms")}
            print(f"| {run.removeprefix('litellm_')}, tally hook minus {label[base]} | {added['p50_ms']} | {added['p99_ms']} | | |")  # noqa: E501
    print()
    print("| tally Python client, usage events | calls/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for run in ("client_1_thread", "client_16_threads", "client_async_256_tasks"):
        r = results[run]
        print(f"| {run.removeprefix('client_').replace('_', ' ')} | {r['calls_per_s']} | {r['p50_ms']} | {r['p99_ms']} |")


if __name__ == "__main__":
    main()
