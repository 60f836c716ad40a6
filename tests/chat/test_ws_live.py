"""The chat protocol end to end: a live llmhub (uvicorn on a real port) and the ``websockets`` client."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from billing.models import UsageRecord
from billing.services.keys import api_key_create
from billing.services.ledger import ledger_flush
from chat.models import Message, MessageStatus
from tests.chat.conftest import session_cookie
from tests.factories import ModelFactory, ProviderFactory, UserFactory


@dataclass
class Live:
    http_url: str
    ws_url: str
    model: str
    cookie: str
    api_key: str


@pytest.fixture
def live(llmhub_server, fake_upstream) -> Live:
    provider = ProviderFactory(base_url=fake_upstream.base_url + "/v1")
    model = ModelFactory(provider=provider)
    user = UserFactory()
    return Live(
        http_url=llmhub_server.url,
        ws_url=llmhub_server.url.replace("http://", "ws://") + "/ws/chat/",
        model=model.name,
        cookie=f"{settings.SESSION_COOKIE_NAME}={session_cookie(user)}",
        api_key=api_key_create(user=user, name="live").secret,
    )


async def next_event(ws) -> dict:
    return json.loads(await ws.recv(decode=True))


async def until_end(ws, request_id: str) -> list[dict]:
    events = []
    while True:
        event = await next_event(ws)
        events.append(event)
        if event.get("request_id") == request_id and event["type"] in ("chat.completed", "chat.cancelled", "error"):
            return events


async def test_session_socket_streams_cancels_and_continues(live):
    async with connect(live.ws_url, origin=live.http_url, additional_headers={"Cookie": live.cookie}) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert await next_event(ws) == {"type": "pong"}

        await ws.send(
            json.dumps(
                {"type": "chat.send", "conversation": None, "model": live.model, "content": "Hi", "request_id": "a"}
            )
        )
        events = await until_end(ws, "a")
        assert events[0]["type"] == "chat.started"
        assert events[-1]["type"] == "chat.completed"
        assert "".join(e["content"] for e in events if e["type"] == "chat.delta") == "Echo: Hi"
        assert Decimal(events[-1]["usage"]["cost"]) > 0
        conversation = events[0]["conversation"]

        await ws.send(
            json.dumps(
                {
                    "type": "chat.send",
                    "conversation": conversation,
                    "model": live.model,
                    "content": "More [[words=200]] [[tps=25]]",
                    "request_id": "b",
                }
            )
        )
        seen = 0
        while seen < 3:
            seen += (await next_event(ws))["type"] == "chat.delta"
        await ws.send(json.dumps({"type": "chat.cancel", "request_id": "b"}))
        events = await until_end(ws, "b")
        assert events[-1]["type"] == "chat.cancelled"
        message_id = events[-1]["message"]

    await ledger_flush()
    reply = await Message.objects.aget(pk=message_id)
    assert reply.status == MessageStatus.CANCELLED
    assert reply.conversation_id == conversation
    record = await UsageRecord.objects.aget(request_id=reply.request_id)
    assert (record.status, record.endpoint) == ("cancelled", "websocket")


async def test_api_key_socket(live):
    async with connect(live.ws_url, origin=live.http_url) as ws:
        await ws.send(json.dumps({"type": "auth", "api_key": live.api_key}))
        assert await next_event(ws) == {"type": "auth.ok"}
        await ws.send(json.dumps({"type": "chat.send", "conversation": None, "model": live.model, "content": "yo"}))
        events = await until_end(ws, (await next_event(ws))["request_id"])
        assert events[-1]["type"] == "chat.completed"


async def test_anonymous_socket_is_closed_with_4401(live):
    async with connect(live.ws_url, origin=live.http_url) as ws:
        await ws.send(json.dumps({"type": "chat.send", "conversation": None, "model": live.model, "content": "x"}))
        error = await next_event(ws)
        assert (error["type"], error["code"]) == ("error", "auth_required")
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 4401
    assert await sync_to_async(Message.objects.count)() == 0


async def test_cross_site_origin_is_refused_at_the_handshake(live):
    with pytest.raises(InvalidStatus) as refused:
        async with connect(live.ws_url, origin="https://evil.example", additional_headers={"Cookie": live.cookie}):
            pass
    assert refused.value.response.status_code == 403
