"""The server freezes what it holds after start-up and its first requests (core/gc_tuning.py)."""

from __future__ import annotations

import gc
import weakref

import httpx
import pytest

from core.gc_tuning import FREEZE_AFTER_REQUESTS, RequestCounter, gc_freeze_startup


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process's collections go on walking everything, as before


def test_start_up_collects_then_freezes(unfrozen, settings):
    settings.LLMHUB_GC_FREEZE = True
    garbage = [None]
    garbage.append(garbage)  # a reference cycle: garbage once let go of
    del garbage
    gc_freeze_startup()
    assert gc.get_freeze_count() > 0
    assert gc.get_count()[0] < 50  # the collection ran first: nothing young is left uncounted


def test_the_first_requests_are_frozen_at_the_counts_and_not_between(unfrozen, settings):
    settings.LLMHUB_GC_FREEZE = True
    counter = RequestCounter()
    first = min(FREEZE_AFTER_REQUESTS)
    for _ in range(first - 1):
        counter.count()
    assert gc.get_freeze_count() == 0
    counter.count()
    assert gc.get_freeze_count() > 0


def test_switched_off_nothing_is_frozen(unfrozen, settings):
    settings.LLMHUB_GC_FREEZE = False
    gc_freeze_startup()
    counter = RequestCounter()
    for _ in range(max(FREEZE_AFTER_REQUESTS)):
        counter.count()
    assert gc.get_freeze_count() == 0


@pytest.mark.django_db(transaction=True)
def test_the_served_application_freezes_at_start_up(unfrozen, settings, caplog):
    """The lifespan's start-up, as uvicorn drives it, ends with the freeze."""
    import asyncio

    from llmhub.asgi import application

    settings.LLMHUB_GC_FREEZE = True

    async def drive() -> list[str]:
        inbox: asyncio.Queue[dict] = asyncio.Queue()
        sent: list[str] = []
        await inbox.put({"type": "lifespan.startup"})

        async def send(message: dict) -> None:
            sent.append(message["type"])
            if message["type"] == "lifespan.startup.complete":
                await inbox.put({"type": "lifespan.shutdown"})

        await application({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send)
        return sent

    sent = asyncio.run(drive())
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]
    assert gc.get_freeze_count() > 0


@pytest.mark.django_db(transaction=True)
def test_a_live_server_in_the_test_process_freezes_nothing_of_it(unfrozen):
    """A live server run in a thread of the test process (``LiveServer``) runs the lifespan there: its freeze
    moved everything the tests held at that moment out of the collector's reach for the rest of the session, and
    a cycle let go of afterwards was never collected (nor found by a test that looks for leftover objects)."""
    from tests.conftest import LiveServer

    class Held:
        pass

    held = Held()
    held.itself = held  # a reference cycle: only the collector frees it
    ref = weakref.ref(held)
    server = LiveServer().start()
    try:
        assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200
    finally:
        server.stop()
    del held
    gc.collect()
    assert ref() is None, "an object alive when the live server started was never collected"
    assert gc.get_freeze_count() == 0
