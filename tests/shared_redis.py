"""llmhub's Redis in a test: the session's redis-server (``redis_url``), emptied before the test and after it, so
that no test reads the admission counters, breakers or keys another left there. ``use_redis`` points llmhub at it
(``settings.REDIS_URL``) for the test and answers its URL; a module asks for it by importing it, or through
``request.getfixturevalue("use_redis")`` for a fixture's Redis parametrisation. ``redis_emptied`` is the emptying
alone, for a fixture that wants the client (decoded, say) or sets more than the URL."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import redis


@contextlib.contextmanager
def redis_emptied(url: str, *, decode_responses: bool = False) -> Iterator[redis.Redis]:
    """A client of the Redis at ``url``, its database emptied before the block and after it."""
    client = redis.Redis.from_url(url, decode_responses=decode_responses)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def use_redis(settings, redis_url: str) -> Iterator[str]:
    """llmhub keeps what it shares between processes (admission, counters, breakers, broadcasts) in the session's
    redis-server for this test, emptied before and after it."""
    settings.REDIS_URL = redis_url
    with redis_emptied(redis_url):
        yield redis_url
