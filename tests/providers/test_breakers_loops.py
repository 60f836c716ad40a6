"""The circuit breakers' syncer on short-lived event loops: a Celery task, a command or a sync caller
(``async_to_sync``, ``asyncio.run``) makes a loop per call and records a provider call's outcome from it
(``breaker_record``), which starts that loop's syncer (its flusher, and its listener subscribed to the breakers'
channel). The syncer must not keep the loop alive once it is gone, and its connections are closed with it,
without an "Unclosed" warning or a task "destroyed but pending"."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import warnings
import weakref

import pytest
from asgiref.sync import async_to_sync

from providers.routing import breakers
from providers.routing.breakers import breaker_record, breaker_reset, breaker_state, breakers_synced
from tests.waiting import wait_until_async

LOOPS = 5
DEPLOYMENT = int(time.time()) % 1_000_000 * 100 + 97  # not one of test_breakers' (they count up from the same base)


def _gone(refs: list[weakref.ref]) -> int:
    gc.collect()
    return sum(ref() is None for ref in refs)


async def _awaited(coroutine):
    return await coroutine


@pytest.fixture
def redis_breakers(redis_url, settings):
    settings.REDIS_URL = redis_url
    settings.LLMHUB_BREAKER_FAILURES = 100  # every loop's failure is counted; none opens the breaker
    breaker_reset(DEPLOYMENT)
    yield
    breaker_reset(DEPLOYMENT)


async def _record_a_failure(count: int) -> None:
    """The loop's ``count``th failure: sent at once by its syncer, which also listens (``breakers_synced``)."""
    breaker_record(DEPLOYMENT, ok=False)
    await asyncio.wait_for(breakers_synced(), timeout=10)
    await wait_until_async(
        lambda: breaker_state(DEPLOYMENT).failures == count, f"failure {count} in Redis", timeout=10.0, interval=0.01
    )


@pytest.mark.parametrize("run", [asyncio.run, async_to_sync(_awaited)], ids=["asyncio_run", "async_to_sync"])
def test_loops_that_recorded_outcomes_are_collected_and_their_connections_closed(redis_breakers, run, caplog):
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        await _record_a_failure(len(refs))

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        for _ in range(LOOPS):
            run(call())
        import sys

        sys.path.insert(0, "/tmp/loops3")
        import dbg

        dbg.who(refs[0], 20)
        assert _gone(refs) == LOOPS
    assert breaker_state(DEPLOYMENT).failures == LOOPS  # every loop's failure reached Redis
    assert not [loop for loop in list(breakers._syncers) if loop.is_closed()]
    assert not [str(warning.message) for warning in caught if "nclosed" in str(warning.message)]
    assert not [record.getMessage() for record in caplog.records if "nclosed" in record.getMessage()]
    assert not [record.getMessage() for record in caplog.records if "destroyed" in record.getMessage()]


def test_a_loop_closed_without_cancelling_its_tasks_is_collected(redis_breakers, caplog):
    """``run_until_complete`` then ``close``: nothing tells the syncer its loop ended. The next loop that starts
    a syncer drops it."""
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        await _record_a_failure(len(refs))

    caplog.set_level(logging.ERROR, logger="asyncio")
    for _ in range(LOOPS):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(call())
        loop.close()
        del loop
    asyncio.run(call())

    assert _gone(refs) == LOOPS + 1
    # Its tasks never run again: they are not reported as "destroyed but pending".
    assert not [record.getMessage() for record in caplog.records if "destroyed" in record.getMessage()]
    assert not [loop for loop in list(breakers._syncers) if loop.is_closed()]
