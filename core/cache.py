"""A small in-process TTL cache for lookups made on every request.

Each process keeps its own copy; the process that changes a row clears its entries at once (see the
apps' ``signals``), other processes see the change when the TTL runs out (``LLMHUB_LOOKUP_CACHE_TTL``).
Negative results are cached too, so an unknown model or key costs one query per TTL, not per request.

While the database is down, a lookup whose copy has run out is answered from that copy for a while
longer (``LLMHUB_LOOKUP_STALE_IF_ERROR``, as HTTP's ``stale-if-error``): callers seen lately keep being
served. Without a copy, the lookup raises ``DatabaseUnavailableError`` (a 503), never the driver's error.

Concurrent misses of one key share one load (``get_or_load``, "single flight"): when a copy runs out
under load, or a burst of new streams arrives on a cold process, a hundred requests for the same key
would otherwise each run the same query, one after another through the database's thread, and the last
would wait for all of them (measured: a burst of 100 streams 1.3 s slower to its first token after the
copies ran out than with them warm, docs/streams.md). The load runs as a task of its own, so a caller
that goes away (a client disconnecting) does not cancel it for the others; a change that invalidates
the key while it runs makes the next caller load again, and the result that was loaded before the
change is not kept.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections, transaction

from .exceptions import DATABASE_OUTAGE_ERRORS, DatabaseUnavailableError

V = TypeVar("V")
_MISSING = object()
# Every cache made, for ``lookup_caches_invalidate``.
_CACHES: weakref.WeakSet[TTLCache] = weakref.WeakSet()


def lookup_caches_invalidate() -> None:
    """Empty every lookup cache of this process: for the tests, whose rows (and their ids, reused once the
    database is emptied) do not outlive a test while cached copies would."""
    for cache in list(_CACHES):
        cache.invalidate()


def forget_now_and_after_commit(forget: Callable[[], None]) -> None:
    """Run ``forget`` (a cache invalidation) now and again when the current transaction commits (at once
    outside one): a request that reads the rows between the change and its commit still sees them as they
    were, for every other connection, and would cache that copy for the TTL."""
    forget()
    transaction.on_commit(forget)


def _replace_broken_connections() -> None:
    """What Django's ``close_old_connections`` does at the end of a request, on this thread's connections,
    leaving alone one inside a transaction (whose caller decides)."""
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()


def _retrieved(task: asyncio.Task[object]) -> None:
    """A failed load whose callers all went away is not reported as "never retrieved"."""
    if not task.cancelled():
        task.exception()


class TTLCache(Generic[V]):
    def __init__(self, name: str, *, max_entries: int = 10_000) -> None:
        self.name = name
        self.max_entries = max_entries
        self._data: dict[Hashable, tuple[float, V]] = {}
        # Loads in flight: key -> (the loop it runs in, its task, the invalidations seen when it began).
        self._loading: dict[Hashable, tuple[asyncio.AbstractEventLoop, asyncio.Task[V], int]] = {}
        self._invalidations = 0
        _CACHES.add(self)

    def get(self, key: Hashable) -> V | object:
        entry = self._data.get(key)
        if entry is None or entry[0] < time.monotonic():
            return _MISSING
        return entry[1]

    def set(self, key: Hashable, value: V, ttl: float | None = None) -> None:
        if len(self._data) >= self.max_entries:
            self._data.clear()
        ttl = settings.LLMHUB_LOOKUP_CACHE_TTL if ttl is None else ttl
        self._data[key] = (time.monotonic() + ttl, value)

    async def get_or_load(self, key: Hashable, load: Callable[[], Awaitable[V]]) -> V:
        entry = self._data.get(key)
        now = time.monotonic()
        if entry is not None and entry[0] >= now:
            return entry[1]
        try:
            value = await asyncio.shield(self._load_shared(key, load))
        except DATABASE_OUTAGE_ERRORS as exc:
            if entry is not None and now - entry[0] <= settings.LLMHUB_LOOKUP_STALE_IF_ERROR:
                return entry[1]
            raise DatabaseUnavailableError() from exc
        return value

    def _load_shared(self, key: Hashable, load: Callable[[], Awaitable[V]]) -> asyncio.Task[V]:
        """The load of ``key`` in flight in this loop, or a new one (a cache is shared by the loops of a
        process: the test suite's, a thread's ``async_to_sync``; a task belongs to one)."""
        loop = asyncio.get_running_loop()
        flight = self._loading.get(key)
        if flight is not None and flight[0] is loop and flight[2] == self._invalidations and not flight[1].done():
            return flight[1]
        task = loop.create_task(self._load(key, load, self._invalidations))
        task.add_done_callback(_retrieved)
        self._loading[key] = (loop, task, self._invalidations)
        return task

    async def _load(self, key: Hashable, load: Callable[[], Awaitable[V]], invalidations: int) -> V:
        try:
            try:
                value = await load()
            except DATABASE_OUTAGE_ERRORS:
                # A persistent connection the database dropped while it was idle (a restart) fails its
                # first query; Django replaces it only when a request cycle ends, which on /v1 is after
                # the response (llmhub/handlers.py), so the lookup would fail a request the database
                # could serve. Replace a broken connection now, on the thread the ORM uses, and try once
                # more; a database still down fails again at once.
                await sync_to_async(_replace_broken_connections)()
                value = await load()
            if invalidations == self._invalidations:  # nothing changed while it was loading
                self.set(key, value)
            return value
        finally:
            flight = self._loading.get(key)
            if flight is not None and flight[1] is asyncio.current_task():
                del self._loading[key]

    def invalidate(self, key: Hashable | None = None) -> None:
        self._invalidations += 1  # a load in flight began before this change: its result is not kept
        if key is None:
            self._data.clear()
        else:
            self._data.pop(key, None)
