"""Issue 9, point 3: revocation reaches open sockets.

A socket authenticated with a key checks the key again before every ``chat.send`` (through the same
cache as every request) and is closed, with a code that says why, once the key is revoked or expired."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
import time_machine
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.utils import timezone

from accounts.roles import Role, role_set
from billing.models import ApiKey, KeyScope, UsageRecord
from billing.services.keys import api_key_create, api_key_revoke
from billing.services.ledger import ledger_flush
from chat.consumers import CLOSE_FORBIDDEN, CLOSE_KEY_EXPIRED, CLOSE_KEY_REVOKED, CLOSE_UNAUTHENTICATED
from chat.models import Message, MessageStatus
from providers.models import Provider
from tests.chat.conftest import deltas, ends, events_until

pytestmark = pytest.mark.django_db(transaction=True)

LONG_REPLY = "Tell me a long story [[words=300]] [[tps=20]]"


async def key_socket(socket_for, created):
    ws = await socket_for(None)
    await ws.send_json_to({"type": "auth", "api_key": created.secret})
    assert await ws.receive_json_from(timeout=5) == {"type": "auth.ok"}
    return ws


async def send(ws, model, request_id: str, content: str = "Hello there") -> None:
    await ws.send_json_to(
        {"type": "chat.send", "conversation": None, "model": model.name, "content": content, "request_id": request_id}
    )


async def stream_once(ws, model, request_id: str = "first") -> None:
    await send(ws, model, request_id)
    events = await events_until(ws, ends(request_id))
    assert events[-1]["type"] == "chat.completed", events[-1]
    assert deltas(events, request_id) == "Echo: Hello there"


async def assert_closed_for(ws, *, code: str, close_code: int, request_id: str) -> None:
    """The refusal, then the close frame, and nothing was started for the send."""
    error = await ws.receive_json_from(timeout=5)
    assert (error["type"], error["code"], error["request_id"]) == ("error", code, request_id), error
    assert await ws.receive_output(timeout=5) == {"type": "websocket.close", "code": close_code}
    await ledger_flush()
    assert not await UsageRecord.objects.filter(request_id=request_id).aexists()


async def test_a_revoked_key_cannot_send_on_its_open_socket(alice, chat_model, socket_for):
    created = await sync_to_async(api_key_create)(user=alice, name="leaked")
    ws = await key_socket(socket_for, created)
    await stream_once(ws, chat_model)

    await sync_to_async(api_key_revoke)(api_key=created.api_key)
    await send(ws, chat_model, "after")

    await assert_closed_for(ws, code="key_revoked", close_code=CLOSE_KEY_REVOKED, request_id="after")


async def test_revoking_the_parent_closes_a_childs_socket(alice, chat_model, socket_for):
    parent = await sync_to_async(api_key_create)(user=alice, name="parent", scopes=[KeyScope.KEYS_MANAGE])
    child = await sync_to_async(api_key_create)(user=alice, name="child", parent=parent.api_key)
    ws = await key_socket(socket_for, child)
    await stream_once(ws, chat_model)

    await sync_to_async(api_key_revoke)(api_key=parent.api_key)
    await send(ws, chat_model, "after")

    await assert_closed_for(ws, code="key_revoked", close_code=CLOSE_KEY_REVOKED, request_id="after")


async def test_an_expired_key_cannot_send_on_its_open_socket(alice, chat_model, socket_for):
    start = timezone.now()
    created = await sync_to_async(api_key_create)(user=alice, name="short", expires_at=start + timedelta(hours=1))
    with time_machine.travel(start, tick=True):
        ws = await key_socket(socket_for, created)
        await stream_once(ws, chat_model)

    with time_machine.travel(start + timedelta(hours=1, seconds=1), tick=True):
        await send(ws, chat_model, "after")
        await assert_closed_for(ws, code="key_expired", close_code=CLOSE_KEY_EXPIRED, request_id="after")


async def test_a_revocation_by_another_process_is_seen_within_the_cache_ttl(alice, chat_model, socket_for, settings):
    """No invalidation reaches this process (``.update()`` sends no signal): only the cache's TTL bounds it."""
    settings.LLMHUB_LOOKUP_CACHE_TTL = 0.3
    created = await sync_to_async(api_key_create)(user=alice, name="elsewhere")
    ws = await key_socket(socket_for, created)
    await ApiKey.objects.filter(pk=created.api_key.pk).aupdate(revoked_at=timezone.now())
    await asyncio.sleep(0.4)

    await send(ws, chat_model, "after")

    await assert_closed_for(ws, code="key_revoked", close_code=CLOSE_KEY_REVOKED, request_id="after")


async def test_a_reply_streaming_when_the_key_is_caught_revoked_is_stopped_and_kept(alice, chat_model, socket_for):
    created = await sync_to_async(api_key_create)(user=alice, name="busy")
    ws = await key_socket(socket_for, created)
    await send(ws, chat_model, "long", content=LONG_REPLY)
    started = await ws.receive_json_from(timeout=10)
    assert started["type"] == "chat.started"
    assert (await ws.receive_json_from(timeout=10))["type"] == "chat.delta"

    await sync_to_async(api_key_revoke)(api_key=created.api_key)
    await send(ws, chat_model, "after")

    # Deltas of the long reply may still be on their way before the refusal.
    events = await events_until(ws, lambda event: event["type"] == "error")
    assert (events[-1]["code"], events[-1]["request_id"]) == ("key_revoked", "after")
    output = await ws.receive_output(timeout=5)
    while output.get("type") == "websocket.send":
        output = await ws.receive_output(timeout=5)
    assert output == {"type": "websocket.close", "code": CLOSE_KEY_REVOKED}
    await ws.disconnect(timeout=10)  # the client goes too; the consumer waits for the stopped reply to be saved
    await ledger_flush()
    record = await UsageRecord.objects.aget(api_key=created.api_key)
    assert record.completion_tokens < 300  # stopped, not streamed to the end
    message = await Message.objects.aget(pk=started["message"])
    assert message.status == MessageStatus.CANCELLED and message.content


async def refused_and_closed(ws, request_id: str) -> None:
    error = await ws.receive_json_from(timeout=5)
    assert (error["type"], error["code"], error["request_id"]) == ("error", "session_ended", request_id), error
    assert await ws.receive_output(timeout=5) == {"type": "websocket.close", "code": CLOSE_UNAUTHENTICATED}
    await ledger_flush()
    assert not await UsageRecord.objects.filter(request_id=request_id).aexists()


async def test_a_deactivated_users_session_socket_is_closed(alice, chat_model, socket_for):
    """An administrator deactivates a user (someone who left, an account taken over): the chat page they
    still have open must stop answering, as their keys do, not chat on at the company's expense."""
    ws = await socket_for(alice)
    await stream_once(ws, chat_model)

    alice.is_active = False
    await alice.asave(update_fields=["is_active"])
    await send(ws, chat_model, "after")

    await refused_and_closed(ws, "after")


async def test_a_session_socket_ends_with_its_session(alice, chat_model, socket_for, settings):
    """A changed password ends the user's other sessions (Django's session hash), and signing out ends this
    one: a socket opened with a stolen cookie must not outlive either. Another process's change is seen
    within the lookup cache's TTL."""
    settings.LLMHUB_LOOKUP_CACHE_TTL = 0.3
    ws = await socket_for(alice)
    await stream_once(ws, chat_model)

    alice.set_password("a-new-password-after-the-theft")
    await get_user_model().objects.filter(pk=alice.pk).aupdate(password=alice.password)  # no signal: elsewhere
    await asyncio.sleep(0.4)
    await send(ws, chat_model, "after")

    await refused_and_closed(ws, "after")

    other = await socket_for(alice)
    await stream_once(other, chat_model)
    await sync_to_async(Session.objects.all().delete)()  # signed out (or the session expired and was cleared)
    await asyncio.sleep(0.4)
    await send(other, chat_model, "gone")

    await refused_and_closed(other, "gone")


@pytest.mark.parametrize("credential", ["session", "key"])
async def test_a_user_made_a_viewer_can_no_longer_send_on_an_open_socket(credential, alice, chat_model, socket_for):
    """docs/auth.md: a role change reaches the WebSocket within the lookup cache's TTL (at once in the process
    that made it). A member demoted to viewer, who may not chat, must not chat on through a socket opened
    before."""
    if credential == "session":
        ws = await socket_for(alice)
    else:
        ws = await key_socket(socket_for, await sync_to_async(api_key_create)(user=alice, name="ci"))
    await stream_once(ws, chat_model)

    await sync_to_async(role_set)(alice, Role.VIEWER)
    await send(ws, chat_model, "after")

    error = await ws.receive_json_from(timeout=5)
    assert (error["type"], error["code"], error["request_id"]) == ("error", "permission_denied", "after"), error
    assert "viewer" in error["message"]
    assert await ws.receive_output(timeout=5) == {"type": "websocket.close", "code": CLOSE_FORBIDDEN}
    await ledger_flush()
    assert not await UsageRecord.objects.filter(request_id="after").aexists()


async def test_a_session_socket_is_not_affected(alice, chat_model, socket_for):
    """Sessions hold no key: their sends are not re-checked (and never closed for a key)."""
    await sync_to_async(api_key_create)(user=alice, name="unused")
    ws = await socket_for(alice)
    await stream_once(ws, chat_model)
    await stream_once(ws, chat_model, request_id="second")


async def test_a_keys_narrowed_models_reach_its_open_socket(alice, chat_model, socket_for):
    """An administrator narrows a key's models: a socket opened before with the key must not keep the models
    it had at its auth message (the send is refused as on REST, with a rejected ledger row)."""
    from tests.factories import ModelFactory

    other = await sync_to_async(ModelFactory)(provider=await Provider.objects.aget(deployments__model=chat_model))
    created = await sync_to_async(api_key_create)(user=alice, name="narrowed", allowed_models=[chat_model, other])
    ws = await key_socket(socket_for, created)
    await stream_once(ws, chat_model)

    await sync_to_async(created.api_key.allowed_models.set)([other])
    await send(ws, chat_model, "after")

    events = await events_until(ws, ends("after"))
    # Answered as a model that does not exist, as on /v1 (tests/chat/test_ws_model_access.py).
    assert (events[-1]["type"], events[-1]["code"]) == ("error", "model_not_found"), events[-1]
    assert await ws.receive_nothing(timeout=0.2)  # refused, not closed: the key still works for its models
    await send(ws, chat_model, "again")
    assert (await events_until(ws, ends("again")))[-1]["type"] == "error"
