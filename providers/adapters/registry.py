"""Which adapter speaks for which kind of provider, and the pool of live adapters.

Kinds map to dotted paths in ``settings.LLMHUB_ADAPTERS`` (loaded once with ``import_string``; an
unknown kind is a configuration error). Adapters hold a pooled SDK client, so one is kept per
provider configuration and per event loop (an httpx client must not cross loops; Celery tasks run
each in a loop of their own), rebuilt when the configuration changes, never one per request.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from ..types import ProviderConfig

if TYPE_CHECKING:
    from .base import BaseAdapter

# loop -> {(provider id, user credential id): adapter}; entries vanish with their loop.
_PoolKey = tuple[int, int | None]
_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_PoolKey, BaseAdapter]] = weakref.WeakKeyDictionary()
_retired: set[asyncio.Task[None]] = set()


@functools.cache
def adapter_class_for_kind(kind: str) -> type[BaseAdapter]:
    try:
        dotted = settings.LLMHUB_ADAPTERS[kind]
    except KeyError:
        raise ImproperlyConfigured(f"No adapter is configured for provider kind {kind!r}.") from None
    return import_string(dotted)


@receiver(setting_changed)
def _reset_registry(*, setting: str, **kwargs: object) -> None:
    if setting == "LLMHUB_ADAPTERS":
        adapter_class_for_kind.cache_clear()


def adapter_for(config: ProviderConfig) -> BaseAdapter:
    """The live adapter for ``config`` in the running event loop (or a fresh one outside a loop)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return adapter_class_for_kind(config.kind)(config)
    pool = _pools.setdefault(loop, {})
    adapter = pool.get(config.pool_key)
    if adapter is not None and adapter.config.cache_key == config.cache_key:
        return adapter
    fresh = adapter_class_for_kind(config.kind)(config)
    pool[config.pool_key] = fresh
    if adapter is not None:
        # Streams still running on the old client finish first; then its connections close.
        task = loop.create_task(_close_later(adapter))
        _retired.add(task)
        task.add_done_callback(_retired.discard)
    return fresh


async def _close_later(adapter: BaseAdapter, delay: float = 600.0) -> None:
    await asyncio.sleep(delay)
    await adapter.aclose()


async def adapters_close_all() -> None:
    """Close every pooled client of the running loop (graceful shutdown, test teardown)."""
    pool = _pools.pop(asyncio.get_running_loop(), {})
    for adapter in pool.values():
        await adapter.aclose()
