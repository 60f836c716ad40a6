"""The budget counters' Redis stores on short-lived event loops: a Celery task, a command or a sync caller
(``async_to_sync``, ``asyncio.run``) makes a loop per call and admits or settles from it (``redis_store``). The
store such a loop built must not keep it alive once it is gone."""

from __future__ import annotations

import asyncio
import gc
import weakref

from billing.services import counters
from billing.services.counters import redis_store

LOOPS = 5


def test_loops_that_used_a_counter_store_are_collected(redis_url):
    """A store is dropped when the next loop builds one after its loop closed."""
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        assert await redis_store(redis_url).client.ping()

    for _ in range(LOOPS + 1):
        asyncio.run(call())
    gc.collect()

    assert sum(ref() is None for ref in refs[:-1]) == LOOPS
    assert len([loop for loop in list(counters._redis_stores) if loop.is_closed()]) <= 1
