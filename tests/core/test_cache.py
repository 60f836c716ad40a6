"""core.cache.TTLCache: concurrent misses share one load (no stampede on a cold or expired copy), a caller
that goes away does not cancel it for the others, and an invalidation while it runs is not undone."""

from __future__ import annotations

import asyncio

import pytest
from django.db import OperationalError

from core.cache import TTLCache
from core.exceptions import DatabaseUnavailableError


def test_concurrent_misses_share_one_load():
    cache: TTLCache[int] = TTLCache("test")
    loads = 0

    async def load() -> int:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.01)
        return 42

    async def main() -> list[int]:
        return await asyncio.gather(*(cache.get_or_load("k", load) for _ in range(100)))

    assert asyncio.run(main()) == [42] * 100
    assert loads == 1
    assert cache.get("k") == 42


def test_a_caller_gone_does_not_cancel_the_load_for_the_others():
    cache: TTLCache[str] = TTLCache("test")

    async def main() -> str:
        began = asyncio.Event()

        async def load() -> str:
            began.set()
            await asyncio.sleep(0.02)
            return "loaded"

        first = asyncio.create_task(cache.get_or_load("k", load))
        await began.wait()
        second = asyncio.create_task(cache.get_or_load("k", load))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    assert asyncio.run(main()) == "loaded"
    assert cache.get("k") == "loaded"


def test_an_invalidation_during_a_load_is_not_undone():
    """The row changed while the old value was being read: that value is handed to the callers that
    asked before the change, not kept; the next caller loads again and sees the change."""
    cache: TTLCache[str] = TTLCache("test")
    value = "old"

    async def main() -> tuple[str, str, str]:
        gate = asyncio.Event()
        read = asyncio.Event()

        async def load() -> str:
            seen = value
            read.set()
            await gate.wait()
            return seen

        before = asyncio.create_task(cache.get_or_load("k", load))
        await read.wait()
        read.clear()
        nonlocal_change()
        after = asyncio.create_task(cache.get_or_load("k", load))  # a new load, not the stale one's
        await asyncio.sleep(0)
        gate.set()
        return await before, await after, cache.get("k")

    def nonlocal_change() -> None:
        nonlocal value
        value = "new"
        cache.invalidate("k")

    assert asyncio.run(main()) == ("old", "new", "new")


def test_a_failed_load_fails_every_caller_and_is_not_cached(monkeypatch):
    import core.cache

    monkeypatch.setattr(core.cache, "_replace_broken_connections", lambda: None)  # no database in this test
    cache: TTLCache[int] = TTLCache("test")
    calls = 0

    async def load() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise OperationalError("the database went away")

    async def main() -> list[object]:
        return await asyncio.gather(*(cache.get_or_load("k", load) for _ in range(5)), return_exceptions=True)

    results = asyncio.run(main())
    assert calls == 2  # one shared load, tried once more on a fresh connection
    assert all(isinstance(result, DatabaseUnavailableError) for result in results)

    async def ok() -> int:
        return 7

    assert asyncio.run(cache.get_or_load("k", ok)) == 7  # the failure was not kept


def test_loads_in_different_event_loops_do_not_share_a_task():
    """A cache lives as long as the process; a task belongs to its loop: each asyncio.run loads for itself."""
    cache: TTLCache[int] = TTLCache("test")
    loads = 0

    async def load() -> int:
        nonlocal loads
        loads += 1
        return loads

    assert asyncio.run(cache.get_or_load("a", load)) == 1
    cache.invalidate()
    assert asyncio.run(cache.get_or_load("a", load)) == 2


def test_a_connection_the_database_dropped_is_replaced_and_the_lookup_served(monkeypatch):
    """After a database restart nobody saw, a persistent connection fails its first query. Django would
    replace it only at the end of the request, after the lookup failed it: the load replaces it at once
    (``_replace_broken_connections`` on the ORM's thread) and tries once more."""
    import core.cache

    events: list[str] = []
    monkeypatch.setattr(core.cache, "_replace_broken_connections", lambda: events.append("replaced"))
    cache: TTLCache[int] = TTLCache("test")

    async def load() -> int:
        events.append("load")
        if events.count("load") == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return 42

    assert asyncio.run(cache.get_or_load("k", load)) == 42
    assert events == ["load", "replaced", "load"]
    assert cache.get("k") == 42


def test_lookup_caches_invalidate_empties_every_cache_of_the_process_the_billing_limits_too():
    """The tests' fresh start (``conftest._fresh_lookup_caches``): a user's plan limits cached for the last
    test's user of that id answered for the next test's user, whose id the emptied database gave again."""
    from billing.selectors import limits_cache
    from core.cache import lookup_caches_invalidate
    from experiments.assignment import assignment_cache
    from providers.selectors import catalog_cache

    own = TTLCache("a test's own")
    for cache in (own, limits_cache, assignment_cache, catalog_cache):
        cache.set(("user", 2), "cached")
    lookup_caches_invalidate()
    for cache in (own, limits_cache, assignment_cache, catalog_cache):
        assert cache.get(("user", 2)) != "cached", cache.name
