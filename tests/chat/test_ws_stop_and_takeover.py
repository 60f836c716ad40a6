"""The chat WebSocket's Stop at any moment of a send.

A Stop pressed while the turn does its first database read (the conversation's history, ``selectors.turn_context``)
is held there with an event, not raced with sleeps: the read waits until the test has seen the consumer take the
cancel (a ``ping`` sent after it is answered only once the cancel has been handled: a socket's frames are handled
in order)."""

from __future__ import annotations

import asyncio

import pytest

from billing.models import UsageRecord
from billing.services.ledger import ledger_flush
from chat import selectors, services_turn
from chat.models import Message, MessageStatus, Role
from tests.chat.conftest import ends, events_until

pytestmark = pytest.mark.django_db(transaction=True)

LONG_REPLY = "Tell me a long story [[words=300]] [[tps=20]]"


async def send(communicator, *, content: str, model, conversation=None, request_id: str) -> None:
    await communicator.send_json_to(
        {
            "type": "chat.send",
            "conversation": conversation,
            "model": model.name,
            "content": content,
            "request_id": request_id,
        }
    )


async def handled(communicator) -> None:
    """Every frame sent before has been handled by the consumer: it answers frames in order."""
    await communicator.send_json_to({"type": "ping"})
    assert (await events_until(communicator, lambda event: event["type"] == "pong"))[-1] == {"type": "pong"}


class HeldRead:
    """A turn's first database read (``selectors.turn_context``) held in flight once ``armed``, until ``release``;
    ``entered`` is set once a turn is held there. Held on the event loop, not in the database thread: every frame's
    dispatch (Channels closes stale connections first) takes that thread too, and the cancel could not be handled
    while the thread was held."""

    def __init__(self) -> None:
        self.armed = False
        self.entered, self.release = asyncio.Event(), asyncio.Event()


@pytest.fixture
def held_first_read(monkeypatch):
    held = HeldRead()
    real = services_turn.database_sync_to_async

    def holding(func):
        threaded = real(func)
        if func is not selectors.turn_context:
            return threaded

        async def in_flight(**kwargs):
            if held.armed:
                held.entered.set()
                await held.release.wait()
            return await threaded(**kwargs)

        return in_flight

    monkeypatch.setattr(services_turn, "database_sync_to_async", holding)
    return held


@pytest.mark.parametrize("new_conversation", [True, False], ids=["new-conversation", "existing-conversation"])
async def test_a_stop_during_the_first_read_keeps_the_message_with_a_stopped_reply(
    alice, chat_model, socket_for, held_first_read, new_conversation
):
    """Stopped before its turn was admitted, a send was answered ``chat.cancelled`` with no message and nothing was
    stored: the page showed the message under a "Stopped." reply, and a reload (or the next send, into a conversation
    that never had it) lost it. It is now kept, with an empty stopped reply, as a Stop a moment later keeps it; the
    request reached the pipeline, and has its one ledger row."""
    ws = await socket_for(alice)
    conversation_id = None
    if not new_conversation:
        await send(ws, content="hi", model=chat_model, request_id="r0")
        conversation_id = (await events_until(ws, ends("r0")))[0]["conversation"]
    held_first_read.armed = True
    await send(ws, content=LONG_REPLY, model=chat_model, conversation=conversation_id, request_id="r1")
    await asyncio.wait_for(held_first_read.entered.wait(), 10)
    await ws.send_json_to({"type": "chat.cancel", "request_id": "r1"})
    await handled(ws)
    held_first_read.release.set()

    events = await events_until(ws, ends("r1"))
    assert [e["type"] for e in events] == ["chat.started", "chat.cancelled"], events
    started, cancelled = events
    assert cancelled["message"] == started["message"] is not None
    if conversation_id is not None:
        assert started["conversation"] == conversation_id
    reply = await Message.objects.aget(pk=cancelled["message"])
    assert (reply.status, reply.content) == (MessageStatus.CANCELLED, "")
    users = [m.content async for m in Message.objects.filter(conversation_id=reply.conversation_id, role=Role.USER)]
    assert users[-1] == LONG_REPLY
    await ledger_flush()
    record = await UsageRecord.objects.aget(request_id=reply.request_id)
    assert (record.status, record.endpoint, record.completion_tokens) == ("cancelled", "websocket", 0)
    assert await UsageRecord.objects.acount() == (1 if new_conversation else 2)
