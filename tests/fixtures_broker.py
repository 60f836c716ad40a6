"""A Celery broker that cannot take a task: the tests run tasks eagerly (``settings/test.py``); this turns that
off and points the broker at a port nothing listens on, as a Redis broker down looks to the publisher. Or at a
real one (``serve``), for a test that runs a worker process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from llmhub.celery import app
from tests.conftest import free_port


class Broker:
    def __init__(self) -> None:
        self._saved = (app.conf.task_always_eager, app.conf.broker_url)

    def down(self) -> None:
        app.conf.task_always_eager = False
        app.conf.broker_url = f"redis://127.0.0.1:{free_port()}/0"
        self._forget_connections()

    def serve(self, url: str) -> None:
        """Tasks go to the broker at ``url``, for a worker to take, instead of running eagerly."""
        app.conf.task_always_eager = False
        app.conf.broker_url = url
        self._forget_connections()

    def up(self) -> None:
        """Back to the tests' broker: tasks run eagerly again, as a worker would take them."""
        app.conf.task_always_eager, app.conf.broker_url = self._saved
        self._forget_connections()

    @staticmethod
    def _forget_connections() -> None:
        # The app keeps a connection pool made from the broker URL it first saw (as after a fork, it must
        # make one from the URL set now).
        app._after_fork()


@pytest.fixture
def broker() -> Iterator[Broker]:
    handle = Broker()
    yield handle
    handle.up()


@pytest.fixture
def broker_queue(broker: Broker, redis_url: str) -> Iterator[redis.Redis]:
    """Tasks go to the default queue (``celery``) of a Redis database of this test's, as in production, instead of
    running in the request; emptied after it (no worker of another test takes them)."""
    url = redis_url.rsplit("/", 1)[0] + "/10"
    broker.serve(url)
    client = redis.Redis.from_url(url)
    try:
        yield client
    finally:
        client.flushdb()
        client.close()
