"""The providers' pooled clients on short-lived event loops: a Celery task, a management command or a
synchronous caller (``async_to_sync``, ``asyncio.run``) makes a loop per call and calls a provider from it
(``adapter_for``: the pipeline, the moderation guard, ``aprovider_health_check``). The pool such a loop started
must not keep the loop alive once it is gone, and its clients are closed with it, without an "Unclosed" warning.
(The health-check task's round uses one-off clients it closes itself: nothing of it is pooled.)"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref

import pytest
from asgiref.sync import sync_to_async

from providers.adapters import registry
from providers.fields import Secret
from providers.selectors import provider_config
from providers.services.health import aprovider_health_check
from tests.factories import ModelFactory, ProviderFactory
from tests.loop_leaks import (
    FRESH_LOOPS,
    LOOPS,
    awaited,
    closed_without_cancelling,
    collected,
    destroyed_reports,
    leak_reports,
)
from tests.waiting import wait_until_async

pytestmark = pytest.mark.django_db(transaction=True)


def _asgiref_forgets_the_last_loop(run) -> None:
    """asgiref's ``sync_to_async`` (under the ORM's ``aupdate``) keeps the last loop that called it (per thread)
    until the next call: one more call, from a loop that pools nothing, lets that one go."""
    run(sync_to_async(lambda: None)())


@pytest.fixture(params=["aiohttp", "httpx"])
def provider(request, settings, fake_upstream):
    settings.LLMHUB_PROVIDER_HTTP_CLIENT = request.param
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    ModelFactory(provider=provider, upstream_id="fake-gpt-4o-mini")
    return provider


@FRESH_LOOPS
def test_loops_that_called_a_provider_are_collected_and_their_clients_closed(provider, run, caplog):
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        assert (await aprovider_health_check(provider=provider)).ok
        assert registry.adapters_open() == 1

    with leak_reports(caplog) as reports:
        for _ in range(LOOPS):
            run(call())
        _asgiref_forgets_the_last_loop(run)
        assert collected(refs) == LOOPS
    assert not [loop for loop in list(registry._pools) if loop.is_closed()]
    assert not reports.unclosed()


def test_a_loop_closed_without_cancelling_its_tasks_is_collected(provider, caplog):
    """``run_until_complete`` then ``close``: nothing tells the pool its loop ended. The next loop that pools a
    client drops it."""
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        assert (await aprovider_health_check(provider=provider)).ok

    caplog.set_level(logging.ERROR, logger="asyncio")
    closed_without_cancelling(call)
    asyncio.run(call())
    _asgiref_forgets_the_last_loop(asyncio.run)

    assert collected(refs) == LOOPS + 1
    # The task that would have closed its clients never runs: it is not reported as "destroyed but pending".
    assert not destroyed_reports(caplog)
    assert not [loop for loop in list(registry._pools) if loop.is_closed()]


def test_a_loop_closed_with_a_client_retirement_pending_is_collected(provider, caplog):
    """``run_until_complete`` then ``close`` right after a user's key was forgotten (``adapters_forget``): the task
    that would close its client once idle never runs. The next loop that pools a client drops the loop's pool,
    and nothing else keeps the loop: its retirement is let go with it, not reported "destroyed but pending"."""
    base = provider_config(provider)
    refs: list[weakref.ref] = []

    async def call(n: int) -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        config = dataclasses.replace(base, api_key=Secret(f"sk-user-{n:05d}-own-key-0000"), credential_id=100_000 + n)
        registry.adapter_for(config)
        registry.adapters_forget(config.credential_id)  # retired: closed once idle, by a task of this loop

    caplog.set_level(logging.ERROR, logger="asyncio")
    for n in range(LOOPS):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(call(n))
        loop.close()
        del loop
    asyncio.run(call(LOOPS))

    assert collected(refs) == LOOPS + 1
    assert not destroyed_reports(caplog)
    assert not [loop for loop in list(registry._pools) if loop.is_closed()]


@pytest.mark.parametrize(
    ("kind", "path", "model"),
    [
        ("openai_compatible", "/v1", "fake-gpt-4o-mini"),
        ("anthropic", "", "fake-claude-haiku"),
        ("cohere", "/cohere", "command-a-03-2025"),
        ("gemini", "", "gemini-2.5-flash"),
    ],
)
@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_a_call_cut_by_its_loop_closing_ends_as_closed_not_as_a_provider_failure(
    settings, fake_upstream, kind, path, model, client
):
    """A loop closed (``run_until_complete`` then ``close``) while a call waits for its provider's answer: the
    collector closes the call's coroutine outside the loop (and outside its context), where the transport's cleanup
    fails on the dead loop. The call ends as closed (``GeneratorExit``): no provider failure (malformed JSON, a
    lost connection) is made of it, which nothing would await and the pipeline would count and settle."""
    settings.LLMHUB_PROVIDER_HTTP_CLIENT = client
    provider = ProviderFactory(kind=kind, base_url=fake_upstream.base_url + path)
    config = provider_config(provider)
    body = {"model": model, "messages": [{"role": "user", "content": "hi [[latency=3000]]"}]}
    calls = []
    before = fake_upstream.requests_served()

    async def serve() -> None:
        call = registry.adapter_for(config).complete(body)
        calls.append(call)
        task = asyncio.create_task(awaited(call))
        task._log_destroy_pending = False  # this test's own task, left pending on purpose with its closed loop
        await wait_until_async(lambda: fake_upstream.requests_served() > before, "the call reached its provider")
        assert not task.done()

    loop = asyncio.new_event_loop()
    loop.run_until_complete(serve())
    loop.close()
    calls.pop().close()  # what the collector does with it: raises whatever the coroutine ends with but its close
