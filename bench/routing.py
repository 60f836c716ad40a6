"""The routing decision's own cost, in-process: what ``chat.pipeline`` asks ``providers.routing`` on every
request (the candidates in order, the breaker's word on the first, the model bound to it, the attempt's start
and end), timed per request for each routed benchmark model, the models taking turns request by request so
that the machine's mood hits them alike.

Run by ``bench/run.py`` as ``python -m bench.routing MODEL...`` with the benchmark's environment (its database
and Redis, like the server's); prints JSON. Whatever ``providers.routing`` holds (strategies, breakers, shared
statistics) is measured through its public interface only.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from typing import Any

REQUESTS = 20_000
WARMUP = 2_000


def _setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def measure(names: list[str], requests: int = REQUESTS, warmup: int = WARMUP) -> dict[str, Any]:
    from providers.routing import Outcome, breaker_allows, call_finished, call_started, route_candidates
    from providers.selectors import model_resolve

    models = {name: await model_resolve(name) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    chosen: dict[str, Counter[str]] = {name: Counter() for name in names}
    refused: Counter[str] = Counter()
    clock = time.perf_counter_ns
    for index in range(requests + warmup):
        for name, model in models.items():
            started = clock()
            candidates = route_candidates(model)
            deployment = candidates[0]
            allowed = await breaker_allows(deployment)
            model.on(deployment)
            ticket = call_started(deployment.id)
            call_finished(ticket, outcome=Outcome.OK, ttft_s=0.0005, tokens=20)
            elapsed_us = (clock() - started) / 1000
            if index >= warmup:
                samples[name].append(elapsed_us)
                chosen[name][deployment.name] += 1
                refused[name] += not allowed
    return {
        name: {
            "deployments": len(models[name].deployments),
            "requests": requests,
            "p50_us": round(_percentile(samples[name], 50), 2),
            "p99_us": round(_percentile(samples[name], 99), 2),
            "mean_us": round(sum(samples[name]) / len(samples[name]), 2),
            "first_choice": dict(sorted(chosen[name].items())),
            "breaker_refused": refused[name],
        }
        for name in names
    }


def main() -> None:
    _setup()
    print(json.dumps(asyncio.run(measure(sys.argv[1:]))))


if __name__ == "__main__":
    main()
