"""The providers' pooled clients on short-lived event loops: a Celery task, a management command or a
synchronous caller (``async_to_sync``, ``asyncio.run``) makes a loop per call and calls a provider from it
(``adapter_for``: the pipeline, the moderation guard, ``aprovider_health_check``). The pool such a loop started
must not keep the loop alive once it is gone, and its clients are closed with it, without an "Unclosed" warning.
(The health-check task's round uses one-off clients it closes itself: nothing of it is pooled.)"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import warnings
import weakref

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from providers.adapters import registry
from providers.fields import Secret
from providers.selectors import provider_config
from providers.services.health import aprovider_health_check
from tests.factories import ModelFactory, ProviderFactory

pytestmark = pytest.mark.django_db(transaction=True)

LOOPS = 5


def _gone(refs: list[weakref.ref]) -> int:
    gc.collect()
    return sum(ref() is None for ref in refs)


def _asgiref_forgets_the_last_loop(run) -> None:
    """asgiref's ``sync_to_async`` (under the ORM's ``aupdate``) keeps the last loop that called it (per thread)
    until the next call: one more call, from a loop that pools nothing, lets that one go."""
    run(sync_to_async(lambda: None)())


async def _awaited(coroutine):
    return await coroutine


@pytest.fixture(params=["aiohttp", "httpx"])
def provider(request, settings, fake_upstream):
    settings.LLMHUB_PROVIDER_HTTP_CLIENT = request.param
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    ModelFactory(provider=provider, upstream_id="fake-gpt-4o-mini")
    return provider


@pytest.mark.parametrize("run", [asyncio.run, async_to_sync(_awaited)], ids=["asyncio_run", "async_to_sync"])
def test_loops_that_called_a_provider_are_collected_and_their_clients_closed(provider, run, caplog):
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        assert (await aprovider_health_check(provider=provider)).ok
        assert registry.adapters_open() == 1

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        for _ in range(LOOPS):
            run(call())
        _asgiref_forgets_the_last_loop(run)
        assert _gone(refs) == LOOPS
    assert not [loop for loop in list(registry._pools) if loop.is_closed()]
    assert not [str(warning.message) for warning in caught if "nclosed" in str(warning.message)]
    assert not [record.getMessage() for record in caplog.records if "nclosed" in record.getMessage()]


def test_a_loop_closed_without_cancelling_its_tasks_is_collected(provider, caplog):
    """``run_until_complete`` then ``close``: nothing tells the pool its loop ended. The next loop that pools a
    client drops it."""
    refs: list[weakref.ref] = []

    async def call() -> None:
        refs.append(weakref.ref(asyncio.get_running_loop()))
        assert (await aprovider_health_check(provider=provider)).ok

    caplog.set_level(logging.ERROR, logger="asyncio")
    for _ in range(LOOPS):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(call())
        loop.close()
        del loop
    asyncio.run(call())
    _asgiref_forgets_the_last_loop(asyncio.run)

    assert _gone(refs) == LOOPS + 1
    # The task that would have closed its clients never runs: it is not reported as "destroyed but pending".
    assert not [record.getMessage() for record in caplog.records if "destroyed" in record.getMessage()]
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

    assert _gone(refs) == LOOPS + 1
    assert not [record.getMessage() for record in caplog.records if "destroyed" in record.getMessage()]
    assert not [loop for loop in list(registry._pools) if loop.is_closed()]
