#!/usr/bin/env python
"""What routing costs a request, in-process: ``route_candidates`` for a model of three deployments under
each strategy, and ``call_started`` + ``call_finished`` around one attempt, per call.

    .venv/bin/python bench/route_hotpath.py [--calls 200000] [--redis redis://127.0.0.1:6379/0]

With ``--redis`` the statistics are shared (the background exchange runs on the same event loop, as in a
server) and the figures include the request path's check that the exchange is running. No network on the
request path either way: what is measured is pure Python over in-process dicts.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings.test")

import django

django.setup()

from django.conf import settings  # noqa: E402

from providers.fields import Secret  # noqa: E402
from providers.routing import Outcome, call_finished, call_started, route_candidates  # noqa: E402
from providers.routing.breakers import breaker_record  # noqa: E402
from providers.routing.stats import stats_call_finished, stats_call_started, stats_clear  # noqa: E402
from providers.types import ProviderConfig, ResolvedDeployment, ResolvedModel, RoutingStrategy  # noqa: E402


def three_deployments(strategy: str) -> ResolvedModel:
    deployments = tuple(
        ResolvedDeployment(
            id=9_000 + i,
            name=f"d{i}",
            provider=ProviderConfig(id=i, name=f"p{i}", kind="openai_compatible", base_url="", api_key=Secret("k")),
            upstream_id="m",
            input_per_mtok=Decimal(i + 1),
            output_per_mtok=Decimal(2 * i + 1),
            weight=3 if i == 0 else 1,
            priority=i,
            rpm_limit=10**9,
            quality=0.5 + i / 10,
        )
        for i in range(3)
    )
    first = deployments[0]
    return ResolvedModel(
        id=1,
        name="bench",
        upstream_id=first.upstream_id,
        provider=first.provider,
        input_per_mtok=Decimal(3),
        output_per_mtok=Decimal(5),
        cached_input_per_mtok=None,
        context_window=8192,
        max_output_tokens=None,
        deployments=deployments,
        strategy=strategy,
    )


def per_call_us(fn, calls: int) -> float:
    for _ in range(min(calls // 10, 10_000)):
        fn()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    return best


async def main(calls: int) -> None:
    stats_clear()
    print(f"per call, best of 3 runs of {calls:,} (microseconds); statistics shared: {bool(settings.REDIS_URL)}")
    for strategy in (
        RoutingStrategy.WEIGHTED,
        RoutingStrategy.PRIORITY,
        RoutingStrategy.LOWEST_LATENCY,
        RoutingStrategy.LEAST_BUSY,
        RoutingStrategy.CHEAPEST,
    ):
        model = three_deployments(strategy)
        cost = per_call_us(functools.partial(route_candidates, model), calls)
        print(f"  route_candidates, 3 deployments, {strategy:<15} {cost:6.2f}")
    model = three_deployments(RoutingStrategy.WEIGHTED)
    cost = per_call_us(functools.partial(route_candidates, model, hint="quality"), calls)
    print(f"  route_candidates, 3 deployments, hint=quality    {cost:6.2f}")

    def one_attempt() -> None:
        ticket = call_started(9_000)
        call_finished(ticket, outcome=Outcome.OK, ttft_s=0.01, tokens=20)

    def statistics_only() -> None:
        stats_call_finished(stats_call_started(9_000), ok=True, ttft_s=0.01, tokens=20)

    print(f"  call_started + call_finished                     {per_call_us(one_attempt, calls):6.2f}")
    print(f"    of which the statistics (stats_call_*)         {per_call_us(statistics_only, calls):6.2f}")
    breaker = per_call_us(functools.partial(breaker_record, 9_000, ok=True), calls)
    print(f"    of which the breaker (breaker_record)          {breaker:6.2f}")
    await asyncio.sleep(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--redis", default="", help="share the statistics through this Redis")
    options = parser.parse_args()
    settings.REDIS_URL = options.redis
    asyncio.run(main(options.calls))
