"""Which adapter speaks for which kind of provider, and the pool of live adapters.

Kinds map to dotted paths in ``settings.LLMHUB_ADAPTERS`` (loaded once with ``import_string``; an
unknown kind is a configuration error). Adapters hold a pooled SDK client, so one is kept per
provider configuration and per event loop (an httpx client must not cross loops; Celery tasks run
each in a loop of their own), rebuilt when the configuration changes, never one per request.

Users' own keys (bring your own key) each need a client of their own (``ProviderConfig.pool_key``:
provider and credential), and thousands of users must not open thousands of connection pools: those
clients are bounded by ``LLMHUB_ADAPTER_POOL_SIZE`` per loop and evicted least-recently-used. The
providers' own clients are kept apart and never evicted: there is one per provider, start-up warms them,
and every platform request needs its provider's. A user's key that is deleted, replaced or refused has its
clients retired at once (``adapters_forget``, from ``providers.signals``). An evicted or replaced client is
closed once the calls on it (a stream may run for minutes) have finished.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from core.loops import LoopRegistry, task_abandoned

from ..types import ProviderConfig

if TYPE_CHECKING:
    from .base import BaseAdapter

logger = logging.getLogger(__name__)

_PoolKey = tuple[int, int | None]


@dataclass
class _Pool:
    """One event loop's adapters: the providers' own (by provider id) and users' keys' (LRU, bounded)."""

    platform: dict[int, BaseAdapter] = field(default_factory=dict)
    users: OrderedDict[_PoolKey, BaseAdapter] = field(default_factory=OrderedDict)
    retiring: set[BaseAdapter] = field(default_factory=set)  # evicted or replaced, closed once idle
    closing: set[asyncio.Task[None]] = field(default_factory=set)  # the tasks closing them (``_close_later``)
    keeper: asyncio.Task[None] | None = None  # closes the clients when its loop cancels it (``_pool_start``)


# An entry's clients refer to its loop (their connections' transports), so an entry must go for its loop to be
# collected: when its keeper task is cancelled (``asyncio.run`` and ``async_to_sync`` cancel the tasks left when
# their call returns: a Celery task, a command, a sync view make a loop per call), its clients then closed; or,
# for a loop closed without that, when the next loop starts its pool (its clients cannot be closed on a closed
# loop). Listed under its lock by ``adapters_forget`` (called from any thread).
_pools: LoopRegistry[_Pool] = LoopRegistry(on_drop=lambda pool: _pool_dropped(pool))
# How often a retired client is checked for calls still running on it (soon at first, since most calls are
# short, then every second at most), and the longest it is kept for them.
_IDLE_POLL_FIRST_SECONDS = 0.05
_IDLE_POLL_SECONDS = 1.0
_RETIRE_MAX_SECONDS = 600.0


@functools.cache
def adapter_class_for_kind(kind: str) -> type[BaseAdapter]:
    try:
        dotted = settings.LLMHUB_ADAPTERS[kind]
    except KeyError:
        raise ImproperlyConfigured(f"No adapter is configured for provider kind {kind!r}.") from None
    return import_string(dotted)


def sends_service_tier(config: ProviderConfig) -> bool:
    """Whether a request's ``service_tier`` is sent to the provider ``config`` (``BaseAdapter.sends_service_tier``);
    True for a kind no adapter is configured for, which serves nothing."""
    try:
        return adapter_class_for_kind(config.kind).sends_service_tier(config)
    except ImproperlyConfigured:
        return True


def counts_every_request_search(kind: str) -> bool:
    """Whether the adapter of a provider of ``kind`` counts the search of a model that searches on every request
    (``BaseAdapter.counts_every_request_search``); False for a kind no adapter is configured for, which serves
    nothing."""
    try:
        return adapter_class_for_kind(kind).counts_every_request_search
    except ImproperlyConfigured:
        return False


def every_request_search_refusal(kind: str) -> str:
    """Why a deployment on a provider of ``kind`` may not be set to search on every request (``searches_every_request``
    ``always``), for the admin's form and the catalog file; "" when it may. Its adapter counts no such search
    (``BaseAdapter.counts_every_request_search``: only OpenAI's protocol has models that search unasked), so each
    request would hold a search at admission and be charged none."""
    if counts_every_request_search(kind):
        return ""
    kinds = ", ".join(
        name for name in settings.LLMHUB_ADAPTERS if adapter_class_for_kind(name).counts_every_request_search
    )
    return (
        f"a provider of kind {kind} has no model that searches the web on every request for llmhub to charge (only "
        f"OpenAI's protocol does: kinds {kinds}), so each request would hold a search at admission and be charged "
        "none. Leave it empty or choose never."
    )


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
    pool = _pools.get(loop)
    if pool is None:
        pool = _pool_start(loop)
    if config.credential_id is None:
        return _platform_adapter(pool, config, loop)
    return _user_adapter(pool, config, loop)


def _pool_start(loop: asyncio.AbstractEventLoop) -> _Pool:
    """The pool of ``loop``, new (its first client, or its last pool was closed)."""
    pool = _pools.start(loop, _Pool())
    pool.keeper = _pools.keep(loop, pool, _pool_close)
    return pool


def _pool_dropped(pool: _Pool) -> None:
    """``pool``'s loop was closed without cancelling its tasks: they will never run."""
    for task in [pool.keeper, *pool.closing]:
        task_abandoned(task)


async def _pool_close(pool: _Pool) -> None:
    for adapter in [*pool.platform.values(), *pool.users.values(), *pool.retiring]:
        try:
            await adapter.aclose()
        except Exception:
            logger.warning("closing a %s client failed", adapter.config.name, exc_info=True)


def _platform_adapter(pool: _Pool, config: ProviderConfig, loop: asyncio.AbstractEventLoop) -> BaseAdapter:
    adapter = pool.platform.get(config.id)
    if adapter is not None and adapter.config.cache_key == config.cache_key:
        return adapter
    fresh = pool.platform[config.id] = adapter_class_for_kind(config.kind)(config)
    if adapter is not None:
        _retire(pool, adapter, loop)
    return fresh


def _user_adapter(pool: _Pool, config: ProviderConfig, loop: asyncio.AbstractEventLoop) -> BaseAdapter:
    key = config.pool_key
    adapter = pool.users.get(key)
    if adapter is not None and adapter.config.cache_key == config.cache_key:
        pool.users.move_to_end(key)
        return adapter
    fresh = adapter_class_for_kind(config.kind)(config)
    pool.users[key] = fresh
    pool.users.move_to_end(key)
    if adapter is not None:  # the user replaced their key: the old one's calls finish on its client
        _retire(pool, adapter, loop)
    limit = max(1, settings.LLMHUB_ADAPTER_POOL_SIZE)
    while len(pool.users) > limit:
        _, evicted = pool.users.popitem(last=False)
        _retire(pool, evicted, loop)
    return fresh


def adapters_forget(credential_id: int) -> None:
    """Retire the pooled clients of a user's key that was deleted, replaced or refused, in every event loop of
    this process (callable from any thread): nothing is to keep the key, nor its connections, until the pool
    happens to evict them. A call running on one finishes first (``_retire``)."""
    pools = _pools.snapshot()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for loop, pool in pools:
        if loop is running:
            _forget(pool, credential_id, loop)
            continue
        try:
            loop.call_soon_threadsafe(_forget, pool, credential_id, loop)
        except RuntimeError:  # the loop closed meanwhile, and its clients with it
            pass


def _forget(pool: _Pool, credential_id: int, loop: asyncio.AbstractEventLoop) -> None:
    for key in [key for key in pool.users if key[1] == credential_id]:
        _retire(pool, pool.users.pop(key), loop)


def _retire(pool: _Pool, adapter: BaseAdapter, loop: asyncio.AbstractEventLoop) -> None:
    pool.retiring.add(adapter)
    task = loop.create_task(_close_later(adapter, pool))
    # Held by its pool (a loop holds its tasks only weakly), not by the process: one of a loop closed before it
    # ran would keep that loop alive.
    pool.closing.add(task)
    task.add_done_callback(pool.closing.discard)


async def _close_later(adapter: BaseAdapter, pool: _Pool | None = None, delay: float = _RETIRE_MAX_SECONDS) -> None:
    """Close ``adapter``'s client once no call runs on it (a stream relaying, a request waiting for its
    answer), or after ``delay`` seconds whatever runs."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + delay
    try:
        # Polled: httpcore's pool signals no "last response closed" (a stream's end) to wait on.
        poll = _IDLE_POLL_FIRST_SECONDS
        while loop.time() < give_up:
            if not _busy(adapter):
                break
            await asyncio.sleep(min(poll, max(0.0, give_up - loop.time())))
            poll = min(poll * 2, _IDLE_POLL_SECONDS)
        await adapter.aclose()
    except Exception:
        logger.warning("closing a retired %s client failed", adapter.config.name, exc_info=True)
    finally:
        if pool is not None:
            pool.retiring.discard(adapter)


def _busy(adapter: BaseAdapter) -> bool:
    """Whether a call is running on ``adapter``'s HTTP client: a connection of its pool is not idle (a
    request in flight, a response being read). An adapter whose pool cannot be seen counts as busy, so that
    it is closed after the longest wait rather than under a stream."""
    connections = _connections(adapter)
    if connections is None:
        return True
    return any(not connection.is_idle() and not connection.is_closed() for connection in connections)


def _connections(adapter: BaseAdapter) -> list | None:
    # adapter → SDK client → its httpx2 client → our transport (``providers.outbound``) → httpcore2's pool.
    sdk = getattr(adapter, "_client", None)
    http = getattr(sdk, "_client", None)
    transport = getattr(http, "_transport", None)
    in_use = getattr(transport, "connections_in_use", None)
    if in_use is not None:  # aiohttp's (``aiohttp_client.GuardedAiohttpTransport``): only the busy ones
        return in_use()
    pool = getattr(transport, "_pool", None)
    connections = getattr(pool, "connections", None)
    return list(connections) if connections is not None else None


def adapters_open() -> int:
    """How many adapters of the running loop hold a client not yet closed: pooled, and retired but still
    finishing their calls."""
    pool = _pools.get(asyncio.get_running_loop())
    if pool is None:
        return 0
    return len(pool.platform) + len(pool.users) + len(pool.retiring)


async def adapters_close_all() -> None:
    """Close every pooled client of the running loop (graceful shutdown, test teardown)."""
    with _pools.lock:
        pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is None:
        return
    if pool.keeper is not None:
        pool.keeper.cancel()
    for adapter in [*pool.platform.values(), *pool.users.values(), *pool.retiring]:
        await adapter.aclose()
