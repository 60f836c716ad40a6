"""Changes every server process must hear of at once, not when its cached copy runs out.

The lookup caches (``core.cache``) are dropped at once in the process that changes a row and within
``LLMHUB_LOOKUP_CACHE_TTL`` in the others. For a change that must not wait even that long (a user's deleted
provider key: no request may go out on it after the delete answered), the changing process also publishes it
here: with ``REDIS_URL`` set, on the Redis channel ``CHANNEL``, to which a listener task in each event loop
that asked for it (``broadcast_listen``) is subscribed; each message runs the handler its topic registered
(``broadcast_handler``) in that loop, within milliseconds of the change. Delivery is what Redis pub/sub
gives, at most once: a listener that is reconnecting (Redis restarting) misses what was said meanwhile, and
the TTL is then the bound again, as it is without Redis (one process, or several that only share the
database). A process hears its own messages too; handlers are idempotent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from django.conf import settings
from redis.asyncio.client import PubSub

from .loops import LoopRegistry, task_abandoned
from .redis import redis_async_client, redis_sync_client

logger = logging.getLogger(__name__)

CHANNEL = "llmhub:broadcast"

_handlers: dict[str, Callable[[str], None]] = {}


@dataclass
class _Listener:
    url: str
    task: asyncio.Task[None] | None = None
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)


# One listener per event loop. An entry's task refers to its loop, so the entry goes when the task ends (its loop
# cancels it: ``asyncio.run`` and ``async_to_sync`` do when their call returns), or, for a loop closed without
# that, when the next loop starts its listener; else every loop that ever listened would stay alive.
_listeners: LoopRegistry[_Listener] = LoopRegistry(on_drop=lambda listener: task_abandoned(listener.task))


def broadcast_handler(topic: str, handler: Callable[[str], None]) -> None:
    """Run ``handler(payload)`` in every listening loop of every process when ``topic`` is published."""
    _handlers[topic] = handler


def broadcast_publish(topic: str, payload: str) -> None:
    """Tell every process's listeners (nothing without Redis). Never raises: a Redis that cannot take the
    message is logged, and the other processes see the change within the lookup caches' TTL."""
    url = settings.REDIS_URL
    if not url:
        return
    try:
        redis_sync_client(url).publish(CHANNEL, json.dumps([topic, payload]))
    except (redis.RedisError, OSError):
        logger.warning("could not broadcast a %s change; other processes see it within the cache TTL", topic)


def broadcast_listen() -> None:
    """Make sure the running event loop listens (a dict lookup once it does): called where a copy that a
    broadcast would drop is made. No-op without Redis or outside a loop."""
    url = settings.REDIS_URL
    if not url:
        return
    loop = asyncio._get_running_loop()
    if loop is None:
        return
    listener = _listeners.get(loop)
    if listener is not None and listener.url == url and listener.task is not None and not listener.task.done():
        return
    listener = _listeners.start(loop, _Listener(url))
    listener.task = loop.create_task(_listen(listener), name="broadcast listener")
    _listeners.forget_when_done(listener.task, listener)


async def broadcast_listening() -> None:
    """Wait until the running loop's listener is subscribed (for tests); returns at once without one."""
    listener = _listeners.get(asyncio.get_running_loop())
    if listener is not None:
        await listener.subscribed.wait()


async def _listen(listener: _Listener) -> None:
    backoff = 0.1
    while settings.REDIS_URL == listener.url:
        pubsub: PubSub | None = redis_async_client(listener.url).pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANNEL)
            listener.subscribed.set()
            backoff = 0.1
            while settings.REDIS_URL == listener.url:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "message":
                    _apply(message["data"])
        except GeneratorExit:
            # Destroyed pending with a loop closed without cancelling it: nothing can be awaited any more.
            pubsub = None
            raise
        except (redis.RedisError, OSError):
            listener.subscribed.clear()
            logger.warning("the broadcast listener lost Redis; listening again in %.1f s", backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
        finally:
            if pubsub is not None:
                try:
                    await pubsub.aclose()
                except (redis.RedisError, OSError):
                    pass


def _apply(data: str) -> None:
    try:
        topic, payload = json.loads(data)
        handler = _handlers.get(topic)
        if handler is not None:
            handler(payload)
    except Exception:
        logger.exception("a broadcast message could not be applied")
