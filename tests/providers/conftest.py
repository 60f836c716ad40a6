"""Helpers of the adapter tests (a fake upstream whose connections are all ours to count) and of the tests of
emails to users (a mail server that fails once)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from llmhub.testing.fake_upstream import FakeUpstream
from tests.attachments import pdf_counts  # noqa: F401  (a fixture)
from tests.connections import established_connections
from tests.mail import MailFailingOnce


@pytest.fixture(scope="module")
def private_upstream() -> Iterator[FakeUpstream]:
    """A fake upstream of the test module's own, so that every connection to its port is the module's."""
    server = FakeUpstream().start()
    yield server
    server.stop()


async def open_connections_once_closed(port: int) -> int:
    """``open_connections_to`` after the event loop has run the close it was asked for: aiohttp (the
    adapters' transport) closes a released connection's socket on the loop's next turns, not inside
    ``aclose``. A handful of turns, no waiting on the clock."""
    for _ in range(5):
        await asyncio.sleep(0)
    return open_connections_to(port)


def open_connections_to(port: int) -> int:
    """This process's established TCP connections to ``port`` (its clients' ends)."""
    return established_connections(peer_port=port)


async def two_content_chunks(stream: AsyncIterator[dict[str, Any]]) -> None:
    received = 0
    async for chunk in stream:
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            received += 1
            if received == 2:
                return


async def assert_cancelling_the_consumer_closes_the_response(adapter: Any, request: Any, port: int) -> None:
    """A task consuming ``adapter.stream(request)`` (a reply long and slow enough to be mid-stream), cancelled once
    it has two content chunks: the cancellation reaches the task, and no connection to ``port`` is left open.
    The adapter is closed after."""
    two_chunks = asyncio.Event()

    async def consume() -> None:
        stream = adapter.stream(request)
        await two_content_chunks(stream)
        two_chunks.set()
        async for _chunk in stream:
            pass

    try:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(two_chunks.wait(), timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        assert open_connections_to(port) == 0
    finally:
        await adapter.aclose()


@pytest.fixture
def mail_fails_once(settings):
    MailFailingOnce.failed = False
    settings.EMAIL_BACKEND = f"{MailFailingOnce.__module__}.MailFailingOnce"
    yield
    assert MailFailingOnce.failed
