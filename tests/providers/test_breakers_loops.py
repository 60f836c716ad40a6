"""The circuit breakers' syncer on short-lived event loops: a Celery task, a command or a sync caller
(``async_to_sync``, ``asyncio.run``) makes a loop per call and records a provider call's outcome from it
(``breaker_record``), which starts that loop's syncer (its flusher, and its listener subscribed to the breakers'
channel). The syncer must not keep the loop alive once it is gone, and its connections are closed with it,
without an "Unclosed" warning or a task "destroyed but pending"."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

import pytest

from providers.routing import breakers
from providers.routing.breakers import breaker_record, breaker_reset, breaker_state, breakers_synced
from tests.loop_leaks import FRESH_LOOPS, LOOPS, closed_without_cancelling, collected, destroyed_reports, leak_reports
from tests.waiting import wait_until_async

DEPLOYMENT = int(time.time()) % 1_000_000 * 100 + 97  # not one of test_breakers' (they count up from the same base)


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


@FRESH_LOOPS
def test_loops_that_recorded_outcomes_are_collected_and_their_connections_closed(redis_breakers, run, caplog):
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        await _record_a_failure(len(refs))

    with leak_reports(caplog) as reports:
        for _ in range(LOOPS):
            run(call())
        assert collected(refs) == LOOPS
    assert breaker_state(DEPLOYMENT).failures == LOOPS  # every loop's failure reached Redis
    assert not [loop for loop in list(breakers._syncers) if loop.is_closed()]
    assert not reports.unclosed()
    assert not destroyed_reports(caplog)


def test_a_loop_closed_without_cancelling_its_tasks_is_collected(redis_breakers, caplog):
    """``run_until_complete`` then ``close``: nothing tells the syncer its loop ended. The next loop that starts
    a syncer drops it."""
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        await _record_a_failure(len(refs))

    caplog.set_level(logging.ERROR, logger="asyncio")
    closed_without_cancelling(call)
    asyncio.run(call())

    assert collected(refs) == LOOPS + 1
    # Its tasks never run again: they are not reported as "destroyed but pending".
    assert not destroyed_reports(caplog)
    assert not [loop for loop in list(breakers._syncers) if loop.is_closed()]
