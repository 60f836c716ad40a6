"""Redis clients every app builds the same way: one asyncio client per event loop, one sync client per process.

After a Redis restart every pooled connection is dead. A connection idle longer than
``REDIS_HEALTH_CHECK_INTERVAL`` is pinged (and replaced) before use, TCP keepalive finds peers that vanished,
and a command that fails on a dead connection is sent again on a fresh one (``REDIS_RETRIES`` times, after
50 ms, 100 ms, ... at most 0.5 s). Only send idempotent commands through these clients, or make them
idempotent (a Lua script that remembers its answer): a retried command may have run once already.

An asyncio client (and its pool) is bound to the event loop that created it, hence one per loop. A loop's
clients refer to it (their connections' streams), so they are forgotten and closed when the loop ends (their
keeper: ``asyncio.run`` and ``async_to_sync`` cancel the tasks left), or dropped when the next loop builds its
first client if it was closed without that (``core.loops``). https://redis.readthedocs.io/en/stable/retry.html
"""

from __future__ import annotations

import asyncio
import logging
import threading

import redis
import redis.asyncio
from django.conf import settings
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .loops import LoopRegistry, task_abandoned

logger = logging.getLogger(__name__)


class _LoopClients(dict[str, redis.asyncio.Redis]):
    """One loop's clients, by URL and timeout, and the task that closes them when the loop ends (held here:
    the loop keeps only a weak reference to its tasks)."""

    keeper: asyncio.Task[None] | None = None


async def _clients_close(per_loop: _LoopClients) -> None:
    for client in list(per_loop.values()):
        try:
            await client.aclose()
        except Exception:
            logger.warning("closing a Redis client of an ended event loop failed", exc_info=True)


# A loop's clients refer to it (their connections' streams): forgotten and closed when it ends (their keeper), or
# dropped when the next loop builds its first client if it was closed without cancelling its tasks.
_async_clients: LoopRegistry[_LoopClients] = LoopRegistry(on_drop=lambda per_loop: task_abandoned(per_loop.keeper))
_sync_clients: dict[str, redis.Redis] = {}
_sync_lock = threading.Lock()


def _options(*, socket_timeout: float | None) -> dict:
    return {
        "decode_responses": True,
        "health_check_interval": settings.REDIS_HEALTH_CHECK_INTERVAL,
        "socket_keepalive": True,
        "socket_connect_timeout": 5,
        "socket_timeout": socket_timeout,
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }


def redis_async_client(url: str, *, socket_timeout: float | None = None) -> redis.asyncio.Redis:
    """The running event loop's client for ``url`` (built at its first use in that loop).

    ``socket_timeout``: seconds a command may wait for its reply (None: forever, as redis-py's default);
    clients with different timeouts are different clients."""
    loop = asyncio.get_running_loop()
    per_loop = _async_clients.get(loop)
    if per_loop is None:
        per_loop = _clients_start(loop)
    key = f"{url}#{socket_timeout}"
    client = per_loop.get(key)
    if client is None:
        retry = AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), settings.REDIS_RETRIES)
        # Blocking: past REDIS_MAX_CONNECTIONS commands at once, a command waits for a connection (up to
        # REDIS_POOL_TIMEOUT) rather than failing with "Too many connections" as redis-py's default pool does.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=settings.REDIS_MAX_CONNECTIONS,
            timeout=settings.REDIS_POOL_TIMEOUT,
            retry=retry,
            **_options(socket_timeout=socket_timeout),
        )
        client = per_loop[key] = redis.asyncio.Redis.from_pool(pool)
    return client


def _clients_start(loop: asyncio.AbstractEventLoop) -> _LoopClients:
    per_loop = _async_clients.start(loop, _LoopClients())
    per_loop.keeper = _async_clients.keep(loop, per_loop, _clients_close)
    return per_loop


def redis_sync_client(url: str, *, socket_timeout: float | None = 5) -> redis.Redis:
    """This process's sync client for ``url`` (thread-safe: its pool hands each thread a connection), for
    admin pages, Celery tasks and management commands."""
    key = f"{url}#{socket_timeout}"
    client = _sync_clients.get(key)
    if client is None:
        with _sync_lock:
            client = _sync_clients.get(key)
            if client is None:
                retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), settings.REDIS_RETRIES)
                client = _sync_clients[key] = redis.Redis.from_url(
                    url, retry=retry, **_options(socket_timeout=socket_timeout)
                )
    return client
