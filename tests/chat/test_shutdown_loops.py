"""The pipeline's shutdown state on short-lived event loops (``_shutdowns``: one per loop a server serves on).
A WebSocket consumer waits in ``shutdown_began`` for its server to stop; the lifespan's ``runs_drain`` begins the
shutdown. A loop must not be kept alive by its entry once it is gone: ended by ``asyncio.run`` (which cancels
the tasks left), or closed with a consumer's wait still pending."""

from __future__ import annotations

import asyncio
import gc
import weakref

from chat import pipeline
from chat.pipeline import runs_drain, shutdown_began

LOOPS = 5


def _gone(refs: list[weakref.ref]) -> int:
    gc.collect()
    return sum(ref() is None for ref in refs)


def _watch() -> asyncio.Task[None]:
    """A consumer's wait for its server to stop (``ChatConsumer._close_at_shutdown``)."""
    task = asyncio.create_task(shutdown_began())
    task._log_destroy_pending = False  # this test's own task, left pending on purpose with its closed loop
    return task


def test_loops_that_served_and_drained_are_collected():
    refs: list[weakref.ref] = []

    async def serve() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        served = _watch()
        _watch()  # a consumer still waiting when the call returns: cancelled by asyncio.run
        await asyncio.sleep(0)
        await runs_drain(grace_seconds=0, settle_seconds=0)
        await served

    for _ in range(LOOPS):
        asyncio.run(serve())

    assert _gone(refs) == LOOPS
    assert not [loop for loop in list(pipeline._shutdowns) if loop.is_closed()]


def test_a_loop_closed_with_a_consumer_still_waiting_is_collected():
    """``run_until_complete`` then ``close``: the consumer's wait stays pending on a closed loop. The next loop
    that waits for its own shutdown drops it."""
    refs: list[weakref.ref] = []

    async def serve() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        _watch()
        await asyncio.sleep(0)

    for _ in range(LOOPS):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(serve())
        loop.close()
        del loop
    asyncio.run(serve())

    assert _gone(refs) == LOOPS + 1
    assert not [loop for loop in list(pipeline._shutdowns) if loop.is_closed()]
