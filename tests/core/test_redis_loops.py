"""The asyncio Redis clients on short-lived event loops: a Celery task, a command or a sync caller
(``async_to_sync``, ``asyncio.run``) makes a loop per call and uses Redis from it (``redis_async_client``: the
counters, breakers, stats, broadcast). The clients such a loop built must not keep it alive once it is gone, and
their connections are closed with it, without an "Unclosed" warning."""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
import weakref

import pytest
from asgiref.sync import async_to_sync

from core import redis as core_redis
from core.redis import redis_async_client

LOOPS = 5


def _gone(refs: list[weakref.ref]) -> int:
    gc.collect()
    return sum(ref() is None for ref in refs)


async def _awaited(coroutine):
    return await coroutine


@pytest.mark.parametrize("run", [asyncio.run, async_to_sync(_awaited)], ids=["asyncio_run", "async_to_sync"])
def test_loops_that_used_redis_are_collected_and_their_connections_closed(redis_url, run, caplog):
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        assert await redis_async_client(redis_url).ping()
        assert await redis_async_client(redis_url, socket_timeout=3).ping()

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        for _ in range(LOOPS):
            run(call())
        assert _gone(refs) == LOOPS
    assert not [loop for loop in list(core_redis._async_clients) if loop.is_closed()]
    assert not [str(warning.message) for warning in caught if "nclosed" in str(warning.message)]
    assert not [record.getMessage() for record in caplog.records if "nclosed" in record.getMessage()]


def test_a_loop_closed_without_cancelling_its_tasks_is_collected(redis_url, caplog):
    """``run_until_complete`` then ``close``: the next loop that builds a client drops the closed one's."""
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        assert await redis_async_client(redis_url).ping()

    caplog.set_level(logging.ERROR, logger="asyncio")
    for _ in range(LOOPS):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(call())
        loop.close()
        del loop
    asyncio.run(call())

    assert _gone(refs) == LOOPS + 1
    # The task that would have closed its clients never runs: it is not reported as "destroyed but pending".
    assert not [record.getMessage() for record in caplog.records if "destroyed" in record.getMessage()]
    assert not [loop for loop in list(core_redis._async_clients) if loop.is_closed()]
