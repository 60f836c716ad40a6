"""A small in-process TTL cache for lookups made on every request.

Each process keeps its own copy; the process that changes a row clears its entries at once (see the
apps' ``signals``), other processes see the change when the TTL runs out (``LLMHUB_LOOKUP_CACHE_TTL``).
Negative results are cached too, so an unknown model or key costs one query per TTL, not per request.

While the database is down, a lookup whose copy has run out is answered from that copy for a while
longer (``LLMHUB_LOOKUP_STALE_IF_ERROR``, as HTTP's ``stale-if-error``): callers seen lately keep being
served. Without a copy, the lookup raises ``DatabaseUnavailableError`` (a 503), never the driver's error.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from django.conf import settings

from .exceptions import DATABASE_OUTAGE_ERRORS, DatabaseUnavailableError

V = TypeVar("V")
_MISSING = object()


class TTLCache(Generic[V]):
    def __init__(self, name: str, *, max_entries: int = 10_000) -> None:
        self.name = name
        self.max_entries = max_entries
        self._data: dict[Hashable, tuple[float, V]] = {}

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
            value = await load()
        except DATABASE_OUTAGE_ERRORS as exc:
            if entry is not None and now - entry[0] <= settings.LLMHUB_LOOKUP_STALE_IF_ERROR:
                return entry[1]
            raise DatabaseUnavailableError() from exc
        self.set(key, value)
        return value

    def invalidate(self, key: Hashable | None = None) -> None:
        if key is None:
            self._data.clear()
        else:
            self._data.pop(key, None)
