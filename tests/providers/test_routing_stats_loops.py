"""The routing statistics' flusher on short-lived event loops: a Celery task, a command or a sync caller
(``async_to_sync``, ``asyncio.run``) makes a loop per call and calls a provider from it, which counts the call
(``stats_call_started``) and starts that loop's flusher. Its entry must not keep the loop alive once it is gone."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

from providers.routing import stats
from providers.routing.stats import stats_call_finished, stats_call_started, stats_clear, stats_flush

LOOPS = 5


def test_loops_that_counted_calls_are_collected(redis_url, settings):
    settings.REDIS_URL = redis_url
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        ticket = stats_call_started(4242)
        stats_call_finished(ticket, ok=True, ttft_s=0.1, tokens=3)
        # The count started this loop's flusher, whose exchange may be under way (stats_flush then answers False at
        # once), and an exchange that fails on a loaded machine gives its figures back for the next: the loop is the
        # flusher's once one has gone through.
        deadline = time.monotonic() + 30
        while not await stats_flush():
            assert time.monotonic() < deadline, "no exchange with Redis went through in 30 s"
            await asyncio.sleep(0.05)

    try:
        for _ in range(LOOPS):
            asyncio.run(call())
        gc.collect()
        # The last one too: the request path's fast check (``_known``) forgets a loop whose flusher ended.
        assert sum(ref() is None for ref in refs) == LOOPS
        assert not [loop for loop in list(stats._flushers) if loop.is_closed()]
    finally:
        stats_clear()
