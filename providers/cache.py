"""A small in-process TTL cache for lookups made on every request.

Each process keeps its own copy; the process that changes a row clears its entries at once (see
``signals``), other processes see the change when the TTL runs out (``LLMHUB_LOOKUP_CACHE_TTL``).
Negative results are cached too, so an unknown model or key costs one query per TTL, not per request.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from django.conf import settings

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
        value = self.get(key)
        if value is _MISSING:
            value = await load()
            self.set(key, value)
        return value  # type: ignore[return-value]

    def invalidate(self, key: Hashable | None = None) -> None:
        if key is None:
            self._data.clear()
        else:
            self._data.pop(key, None)
