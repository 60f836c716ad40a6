"""The pipeline's shutdown state on short-lived event loops (``_shutdowns``: one per loop a server serves on).
A WebSocket consumer waits in ``shutdown_began`` for its server to stop; the lifespan's ``runs_drain`` begins the
shutdown. A loop must not be kept alive by its entry once it is gone: ended by ``asyncio.run`` (which cancels
the tasks left), or closed with a consumer's wait still pending."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import weakref

import pytest
from asgiref.sync import sync_to_async

import core.metrics as core_metrics
from billing.models import UsageRecord
from chat import pipeline
from chat.pipeline import Caller, completion_start, runs_drain, shutdown_began
from providers.exceptions import ProviderError
from tests.loop_leaks import LOOPS, collected
from tests.waiting import wait_until_async


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

    assert collected(refs) == LOOPS
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

    assert collected(refs) == LOOPS + 1
    assert not [loop for loop in list(pipeline._shutdowns) if loop.is_closed()]


@pytest.mark.django_db(transaction=True)
def test_a_loop_closed_with_a_request_still_talking_to_its_provider_is_not_kept_by_the_pipeline(chat_model, alice):
    """A request served on a loop closed (``run_until_complete`` then ``close``) while it waits for its provider's
    answer: its server holds its task, and what the pipeline keeps to drain or cut it at shutdown
    (``_requests_in_flight``, ``_active_runs``) must not keep that task, and with it the loop, alive for good. The
    collector closes the request's coroutine as closed, not as a provider error that nothing awaits (which pytest
    would keep, with its frames and their loop, as an unraisable exception)."""
    refs: list[weakref.ref] = []
    caller = Caller(user_id=alice.pk, username=alice.username)
    body = {"model": chat_model.name, "messages": [{"role": "user", "content": "hi [[latency=3000]]"}]}

    async def request() -> None:
        run = await completion_start(caller=caller, body=body, endpoint="rest")
        await run.complete()

    async def serve() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        task = asyncio.create_task(request())
        task._log_destroy_pending = False  # this test's own task, left pending on purpose with its closed loop
        await wait_until_async(lambda: task in pipeline._active_runs.values(), "the request reached its provider")
        assert task in pipeline._requests_in_flight

    async def served() -> None:
        quick = {**body, "messages": [{"role": "user", "content": "hi"}]}
        run = await completion_start(caller=caller, body=quick, endpoint="rest")
        await run.complete()

    ended: list[type[BaseException]] = []
    previous = sys.unraisablehook

    def unraisable(seen: sys.UnraisableHookArgs) -> None:
        ended.append(type(seen.exc_value))  # the type alone: the exception would keep its frames, and their loop
        previous(seen)

    gauge = core_metrics._inflight
    sys.unraisablehook = unraisable
    try:
        for _ in range(LOOPS):
            loop = asyncio.new_event_loop()
            loop.run_until_complete(serve())
            loop.close()
            del loop
        # The next loop that serves a request: the pooled clients of the closed ones, whose connections refer to
        # the requests' tasks, are let go (``providers.adapters.registry``).
        asyncio.run(served())
    finally:
        sys.unraisablehook = previous
    # asgiref's ``sync_to_async`` keeps the last loop that called it (per thread), here the first (the lookups it
    # made are cached for the others): one more call, from a loop that pools nothing, lets it go.
    asyncio.run(sync_to_async(lambda: None)())

    assert collected(refs) == LOOPS
    assert not [kind for kind in ended if issubclass(kind, ProviderError)]
    assert not [task for task in pipeline._requests_in_flight if task.get_loop().is_closed()]
    assert not [task for task in pipeline._active_runs.values() if task.get_loop().is_closed()]
    assert core_metrics._inflight == gauge  # nor the requests-in-flight gauge


@pytest.mark.django_db(transaction=True)
def test_a_request_cut_by_its_loop_closing_is_left_to_the_lost_request_sweep(chat_model, alice, caplog):
    """A request served on a loop closed while it waits for its provider's answer is closed by the collector,
    outside any loop: its settlement cannot submit a row from there (the ledger's writer is a task of a loop), and
    must not try and log a failure, nor claim a row is written. Its in-flight record stays for the lost-request
    sweep."""
    caller = Caller(user_id=alice.pk, username=alice.username)
    body = {"model": chat_model.name, "messages": [{"role": "user", "content": "hi [[latency=3000]]"}]}
    runs = []

    async def serve() -> None:
        run = await completion_start(caller=caller, body=body, endpoint="rest")
        runs.append(run.request_id)
        task = asyncio.create_task(run.complete())
        task._log_destroy_pending = False  # this test's own task, left pending on purpose with its closed loop
        await wait_until_async(lambda: task in pipeline._active_runs.values(), "the request reached its provider")

    async def served() -> None:
        quick = {**body, "messages": [{"role": "user", "content": "hi"}]}
        run = await completion_start(caller=caller, body=quick, endpoint="rest")
        await run.complete()

    gauge = core_metrics._inflight
    with caplog.at_level(logging.WARNING):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(serve())
        loop.close()
        del loop
        # The next loop that serves a request lets the closed one's pooled clients go (as above).
        asyncio.run(served())
        gc.collect()

    assert not [record.getMessage() for record in caplog.records if record.name.startswith(("chat", "billing"))]
    assert not UsageRecord.objects.filter(request_id=runs[0]).exists()
    # Both runs left the requests-in-flight gauge: the cut one as the one served (a scrape of this process
    # counted the cut one in flight for as long as it lived).
    assert core_metrics._inflight == gauge
