"""The broadcast listener on short-lived event loops: a Celery task, a command or a sync caller (``async_to_sync``,
``asyncio.run``) makes a loop per call, and a lookup made from it (a user's own provider keys,
``providers.byok``) starts that loop's listener (``broadcast_listen``). The listener must not keep the loop alive
once it is gone, and its connection is closed with it, without an "Unclosed" warning or a task "destroyed but
pending"."""

from __future__ import annotations

import asyncio
import logging
import weakref

import pytest

from core import broadcast
from core.broadcast import broadcast_handler, broadcast_listen, broadcast_listening, broadcast_publish
from tests.loop_leaks import FRESH_LOOPS, LOOPS, closed_without_cancelling, collected, destroyed_reports, leak_reports
from tests.waiting import wait_until_async

TOPIC = "test-broadcast-loops"


@pytest.fixture
def heard(redis_url, settings):
    """What this process's listeners heard on ``TOPIC``."""
    settings.REDIS_URL = redis_url
    heard: list[str] = []
    broadcast_handler(TOPIC, heard.append)
    yield heard
    broadcast._handlers.pop(TOPIC, None)


async def _listen_and_hear(heard: list[str], payload: str) -> None:
    broadcast_listen()
    await asyncio.wait_for(broadcast_listening(), timeout=10)
    broadcast_publish(TOPIC, payload)
    await wait_until_async(lambda: payload in heard, f"{payload} heard", timeout=10.0, interval=0.01)


@FRESH_LOOPS
def test_loops_that_listened_are_collected_and_their_connections_closed(heard, run, caplog):
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        await _listen_and_hear(heard, f"loop-{len(refs)}")

    with leak_reports(caplog) as reports:
        for _ in range(LOOPS):
            run(call())
        assert collected(refs) == LOOPS
    assert not [loop for loop in list(broadcast._listeners) if loop.is_closed()]
    assert not reports.unclosed()
    assert not destroyed_reports(caplog)


def test_a_loop_closed_without_cancelling_its_tasks_is_collected(heard, caplog):
    """``run_until_complete`` then ``close``: nothing tells the listener its loop ended. The next loop that
    listens drops it."""
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        await _listen_and_hear(heard, f"loop-{len(refs)}")

    caplog.set_level(logging.ERROR, logger="asyncio")
    closed_without_cancelling(call)
    asyncio.run(call())

    assert collected(refs) == LOOPS + 1
    # Its task never runs again: it is not reported as "destroyed but pending".
    assert not destroyed_reports(caplog)
    assert not [loop for loop in list(broadcast._listeners) if loop.is_closed()]
