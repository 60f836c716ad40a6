"""The CPU and wall time of each piece of llmhub's request path, measured alone, in a loop.

A server-level figure says how much llmhub adds; this says which piece adds it: the SDK call against a
bare HTTP client, the cached lookups before the call, budget admission with the database store and with
Redis, and the ledger write (a batch of one row, as at low load, and batches of 50). Run by
``bench/run.py --profile`` against the benchmark's upstreams and database, or by hand with its
environment::

    python -m bench.components -n 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any


async def _measure(call: Callable[[], Awaitable[Any]], count: int, per: int = 1) -> dict[str, float]:
    for _ in range(min(100, count)):
        await call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        await call()
    return {
        "cpu_ms": round((time.process_time() - cpu) * 1000 / (count * per), 4),
        "wall_ms": round((time.perf_counter() - wall) * 1000 / (count * per), 4),
    }


async def _components(count: int) -> dict[str, dict[str, float]]:
    import httpx
    import httpx2
    from asgiref.sync import sync_to_async
    from django.conf import settings

    from billing.services.admission import admission_settle
    from billing.services.ledger import _write_rows
    from billing.services.ledger_rows import UsageData
    from chat.pipeline import caller_from_api_key, completion_start
    from providers.adapters import adapter_for
    from providers.selectors import model_resolve

    url = settings.BENCH_BARE_UPSTREAMS["bench-json"] + "/chat/completions"
    upstream_body = {"model": "fake-gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}]}
    raw_body = json.dumps(upstream_body).encode()
    client_body = {"model": "bench-json", "messages": [{"role": "user", "content": "Say hello."}]}
    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench-upstream"}
    adapter = adapter_for((await model_resolve("bench-json")).provider)
    plain = httpx.AsyncClient()
    plain2 = httpx2.AsyncClient()
    results: dict[str, dict[str, float]] = {}

    async def sdk() -> None:
        await adapter.complete(dict(upstream_body))

    async def bare_httpx2() -> None:
        (await plain2.post(url, content=raw_body, headers=headers)).json()

    async def bare_httpx() -> None:
        (await plain.post(url, content=raw_body, headers=headers)).json()

    results["upstream call: OpenAI SDK (adapter.complete)"] = await _measure(sdk, count)
    results["upstream call: httpx2.AsyncClient.post + .json()"] = await _measure(bare_httpx2, count)
    results["upstream call: httpx.AsyncClient.post + .json() (the bare view)"] = await _measure(bare_httpx, count)

    async def admitted(key: str) -> Any:
        caller = await caller_from_api_key(key)
        return await completion_start(caller=caller, body=client_body, endpoint="rest")

    async def unlimited() -> None:
        await admitted(os.environ["BENCH_KEY"])

    async def budgeted() -> None:
        run = await admitted(os.environ["BENCH_BUDGETED_KEY"])
        await admission_settle(
            admission=run.admission, cost=Decimal("0.00001"), prompt_tokens=14, completion_tokens=6, ok=True
        )

    results["auth + validate + resolve + admit (plan without limits)"] = await _measure(unlimited, count)
    stores = [("database", "")] + ([("Redis", settings.REDIS_URL)] if settings.REDIS_URL else [])
    for name, redis_url in stores:
        settings.REDIS_URL = redis_url
        results[f"… with a budget and a rate limit, {name} store (admit + settle)"] = await _measure(budgeted, count)

    serial = iter(range(10**9))

    def row() -> UsageData:
        return UsageData(
            request_id=f"components-{os.getpid()}-{next(serial)}",
            endpoint="rest",
            stream=False,
            status="ok",
            user_id=None,
            model_name="bench-json",
            prompt_tokens=14,
            completion_tokens=6,
            cost=Decimal("0.0000057"),
        )

    async def ledger_rows(count: int) -> None:
        # As the ledger's writer task does: one transaction per batch, in a worker thread.
        await sync_to_async(_write_rows, thread_sensitive=False)([row() for _ in range(count)])

    async def ledger_one() -> None:
        await ledger_rows(1)

    async def ledger_fifty() -> None:
        await ledger_rows(50)

    results["ledger: a batch of one row (a quiet server)"] = await _measure(ledger_one, count)
    results["ledger: batches of 50 rows (per row)"] = await _measure(ledger_fifty, max(1, count // 50), 50)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    print(json.dumps(asyncio.run(_components(args.n)), indent=2))


if __name__ == "__main__":
    main()
