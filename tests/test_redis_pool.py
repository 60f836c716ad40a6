"""The asyncio Redis clients (core.redis) share a blocking pool: more commands at once than it holds wait for a
connection instead of failing. redis-py's default pool raises "Too many connections" at its 100th: a burst of
budgeted requests at concurrency 32 once had its admissions and the ledger's settles fail that way (503s)."""

from __future__ import annotations

import asyncio

from billing.services.counters import redis_store
from core.redis import redis_async_client


async def test_more_commands_at_once_than_connections_wait_for_one(redis_url, settings):
    settings.REDIS_MAX_CONNECTIONS = 4
    client = redis_async_client(redis_url, socket_timeout=7.25)  # a timeout of its own: a client of its own
    await client.delete("pool-burst")
    replies = await asyncio.gather(*(client.incr("pool-burst") for _ in range(200)))
    assert sorted(replies) == list(range(1, 201))
    assert client.connection_pool.max_connections == 4


async def test_the_budget_counters_use_the_loops_shared_client(redis_url):
    assert redis_store(redis_url).client is redis_async_client(redis_url)
