"""The budget counters' Redis stores on short-lived event loops: a Celery task, a command or a sync caller
(``async_to_sync``, ``asyncio.run``) makes a loop per call and admits or settles from it (``redis_store``). The
store such a loop built must not keep it alive once it is gone, nor until the next loop builds one."""

from __future__ import annotations

import asyncio
import logging
import weakref

from billing.services import counters
from billing.services.counters import redis_store
from tests.loop_leaks import FRESH_LOOPS, LOOPS, closed_without_cancelling, collected, destroyed_reports


@FRESH_LOOPS
def test_loops_that_used_a_counter_store_are_collected(redis_url, run):
    """A loop's store is forgotten when the loop ends (the last one too, with no next loop to drop it)."""
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        assert await redis_store(redis_url).client.ping()

    for _ in range(LOOPS):
        run(call())

    assert collected(refs) == LOOPS
    assert not [loop for loop in list(counters._redis_stores) if loop.is_closed()]


def test_a_loop_closed_without_cancelling_its_tasks_is_collected(redis_url, caplog):
    """``run_until_complete`` then ``close``: the next loop that builds a store drops the closed one's."""
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        assert await redis_store(redis_url).client.ping()

    caplog.set_level(logging.ERROR, logger="asyncio")
    closed_without_cancelling(call)
    asyncio.run(call())

    assert collected(refs) == LOOPS + 1
    assert not destroyed_reports(caplog)
    assert not [loop for loop in list(counters._redis_stores) if loop.is_closed()]
