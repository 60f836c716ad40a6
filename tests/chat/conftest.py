"""Fixtures for the chat tests: a catalog model served by the fake upstream, users, and sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from billing.services.ledger import ledger_flush
from providers.adapters.registry import adapter_class_for_kind
from providers.models import CatalogModel
from tests.factories import ModelFactory, ProviderFactory, UserFactory

ORIGIN = "http://127.0.0.1:8000"


@pytest.fixture(scope="session")
def provider_sdks_imported() -> None:
    """The providers' SDKs imported, once per test process, as the server's start-up imports them before its first
    request (``llmhub.lifespan._warm_up``; a socket test runs the app without its lifespan). Otherwise a worker's
    first reply imports them inside its first upstream call, on the event loop: seconds (over 10 with four workers
    on two cores) in which no heartbeat is stamped, no frame handled and no test's wait runs, so a reply begun then
    was taken for abandoned, and a wait for its end timed out."""
    for kind in settings.LLMHUB_ADAPTERS:
        adapter_class_for_kind(kind)


@pytest.fixture
def chat_model(transactional_db, fake_upstream, provider_sdks_imported) -> CatalogModel:
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    return ModelFactory(provider=provider, context_window=16_000, max_output_tokens=1_000)


@pytest.fixture
def alice(transactional_db):
    return UserFactory()


@pytest.fixture
def bob(transactional_db):
    return UserFactory()


def session_cookie(user) -> str:
    """A real session for ``user``, as the login form would create it."""
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


async def open_socket(
    *, user=None, origin: str | None = ORIGIN, path: str = "/ws/chat/"
) -> tuple[WebsocketCommunicator, bool, Any]:
    from llmhub.asgi import application

    headers = [(b"host", b"127.0.0.1:8000")]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    if user is not None:
        cookie = await sync_to_async(session_cookie)(user)
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, subprotocol_or_code = await communicator.connect(timeout=5)
    return communicator, connected, subprotocol_or_code


@pytest.fixture
async def socket_for() -> Callable[..., Awaitable[WebsocketCommunicator]]:
    """Open a connected socket (a session for ``user``, or none); every one is disconnected afterwards."""
    opened: list[WebsocketCommunicator] = []

    async def factory(user=None, **kwargs: Any) -> WebsocketCommunicator:
        communicator, connected, _ = await open_socket(user=user, **kwargs)
        assert connected
        opened.append(communicator)
        return communicator

    yield factory
    for communicator in opened:
        await communicator.disconnect(timeout=10)
    # Ledger rows are written in the background: let them land before the test's rows are flushed.
    await ledger_flush()


async def events_until(
    communicator: WebsocketCommunicator,
    done: Callable[[dict[str, Any]], bool],
    *,
    timeout: float = 15.0,
) -> list[dict[str, Any]]:
    """Events received up to and including the first one for which ``done`` is true."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            event = await communicator.receive_json_from(timeout=timeout)
            events.append(event)
            if done(event):
                return events


def ends(request_id: str) -> Callable[[dict[str, Any]], bool]:
    """True for the event that ends the reply ``request_id``: completed, cancelled or an error."""
    return lambda event: (
        event.get("request_id") == request_id
        and event["type"]
        in (
            "chat.completed",
            "chat.cancelled",
            "error",
        )
    )


def deltas(events: list[dict[str, Any]], request_id: str) -> str:
    return "".join(e["content"] for e in events if e["type"] == "chat.delta" and e["request_id"] == request_id)
