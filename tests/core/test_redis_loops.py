"""The asyncio Redis clients on short-lived event loops: a Celery task, a command or a sync caller
(``async_to_sync``, ``asyncio.run``) makes a loop per call and uses Redis from it (``redis_async_client``: the
counters, breakers, stats, broadcast). The clients such a loop built must not keep it alive once it is gone, and
their connections are closed with it, without an "Unclosed" warning."""

from __future__ import annotations

import asyncio
import logging
import weakref

from core import redis as core_redis
from core.redis import redis_async_client
from tests.loop_leaks import FRESH_LOOPS, LOOPS, closed_without_cancelling, collected, destroyed_reports, leak_reports


@FRESH_LOOPS
def test_loops_that_used_redis_are_collected_and_their_connections_closed(redis_url, run, caplog):
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        assert await redis_async_client(redis_url).ping()
        assert await redis_async_client(redis_url, socket_timeout=3).ping()

    with leak_reports(caplog) as reports:
        for _ in range(LOOPS):
            run(call())
        assert collected(refs) == LOOPS
    assert not [loop for loop in list(core_redis._async_clients) if loop.is_closed()]
    assert not reports.unclosed()


def test_a_loop_closed_without_cancelling_its_tasks_is_collected(redis_url, caplog):
    """``run_until_complete`` then ``close``: the next loop that builds a client drops the closed one's."""
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        assert await redis_async_client(redis_url).ping()

    caplog.set_level(logging.ERROR, logger="asyncio")
    closed_without_cancelling(call)
    asyncio.run(call())

    assert collected(refs) == LOOPS + 1
    # The task that would have closed its clients never runs: it is not reported as "destroyed but pending".
    assert not destroyed_reports(caplog)
    assert not [loop for loop in list(core_redis._async_clients) if loop.is_closed()]
