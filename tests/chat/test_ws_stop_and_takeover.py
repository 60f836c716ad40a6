"""The chat WebSocket's Stop at any moment of a send, and a client's new socket taking over its conversation.

A Stop pressed while the turn does its first database read (the conversation's history, ``selectors.turn_context``)
is held there with an event, not raced with sleeps: the read waits until the test has seen the consumer take the
cancel (a ``ping`` sent after it is answered only once the cancel has been handled: a socket's frames are handled
in order)."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.test import Client

from billing.models import UsageRecord
from billing.services.ledger import ledger_flush
from chat import selectors, services, services_turn
from chat.models import Conversation, Message, MessageStatus, Role
from chat.pipeline import Caller
from tests.chat.conftest import deltas, ends, events_until
from tests.shared_redis import redis_emptied
from tests.waiting import wait_until_async

pytestmark = pytest.mark.django_db(transaction=True)

LONG_REPLY = "Tell me a long story [[words=300]] [[tps=20]]"


async def send(communicator, *, content: str, model, conversation=None, request_id: str, client=None) -> None:
    event = {"type": "chat.send", "conversation": conversation, "model": model.name, "content": content}
    event["request_id"] = request_id
    if client is not None:
        event["client"] = client
    await communicator.send_json_to(event)


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


async def receive_deltas(communicator, request_id: str, count: int) -> list[dict]:
    events = []
    while sum(e["type"] == "chat.delta" for e in events) < count:
        events.append(await communicator.receive_json_from(timeout=30))
        assert events[-1]["type"] in ("chat.started", "chat.delta"), events[-1]
    return events


async def settled(message_id: int, received: str) -> tuple[Message, UsageRecord] | None:
    """The reply and its ledger row, once its turn has stopped: settled, and its text (at least what the client was
    sent) saved."""
    await ledger_flush()
    reply = await Message.objects.aget(pk=message_id)
    row = await UsageRecord.objects.filter(request_id=reply.request_id).afirst()
    if row is None or reply.status == MessageStatus.STREAMING or not reply.content.startswith(received):
        return None
    return reply, row


async def test_a_clients_new_socket_takes_over_the_conversation_its_lost_socket_streams(alice, chat_model, socket_for):
    """A page whose network vanished mid-reply, without a close, reconnects on a new socket; the server still holds
    the old one (until its keepalive gives up, up to 20 s) and its reply streams on. The page's send into that
    conversation was refused ``conversation_busy`` all that time. The same client's send now takes the conversation
    over: the old reply is stopped as on a disconnect (kept ``cancelled`` with what was written, its one ledger row
    ``client_disconnected`` billing what the upstream wrote) and the new one streams."""
    lost = await socket_for(alice)
    await send(lost, content=LONG_REPLY, model=chat_model, request_id="r1", client="page-1")
    before = await receive_deltas(lost, "r1", 3)
    conversation_id, old_id = before[0]["conversation"], before[0]["message"]

    reconnected = await socket_for(alice)
    await send(
        reconnected, content="again", model=chat_model, conversation=conversation_id, request_id="r2", client="page-1"
    )
    events = await events_until(reconnected, ends("r2"))
    assert events[-1]["type"] == "chat.completed", events[-1]
    assert deltas(events, "r2") == "Echo: again"

    old, old_row = await wait_until_async(
        lambda: settled(old_id, deltas(before, "r1")), "the old reply's turn stops", timeout=15, interval=0.1
    )
    assert (old.status, old.error_message) == (MessageStatus.CANCELLED, services.TAKEN_OVER_NOTE)
    assert 3 <= len(old.content.split()) < 300
    assert (old_row.status, old_row.endpoint) == ("client_disconnected", "websocket")
    assert old_row.completion_tokens >= 3
    users = [m.content async for m in Message.objects.filter(conversation_id=conversation_id, role=Role.USER)]
    assert users == [LONG_REPLY, "again"]
    new = await Message.objects.aget(pk=events[-1]["message"])
    rows = {r.request_id: r.status async for r in UsageRecord.objects.all()}
    assert rows == {old.request_id: "client_disconnected", new.request_id: "ok"}


async def test_two_live_clients_still_stream_one_reply_at_a_time_in_a_conversation(alice, chat_model, socket_for):
    """Another tab is another client: its send is refused while the reply streams, and a socket's own second send
    into the conversation it streams in is refused too, whichever client it names; nothing is written or billed."""
    tab1, tab2 = await socket_for(alice), await socket_for(alice)
    await send(tab1, content=LONG_REPLY, model=chat_model, request_id="r1", client="page-1")
    conversation_id = (await receive_deltas(tab1, "r1", 1))[0]["conversation"]

    for tab, client in ((tab2, "page-2"), (tab1, "page-1"), (tab1, "page-2")):
        await send(
            tab, content="me too", model=chat_model, conversation=conversation_id, request_id="r3", client=client
        )
        refused = (await events_until(tab, ends("r3")))[-1]
        assert (refused["type"], refused["code"]) == ("error", "conversation_busy"), (client, refused)

    await tab1.send_json_to({"type": "chat.cancel", "request_id": "r1"})
    assert (await events_until(tab1, ends("r1")))[-1]["type"] == "chat.cancelled"
    assert await Message.objects.filter(content="me too").aexists() is False
    await ledger_flush()
    assert await UsageRecord.objects.acount() == 1


async def test_a_reply_taken_over_from_another_process_stops_at_its_next_heartbeat(alice, chat_model, settings):
    """The takeover is written in the database, by whichever process the new socket reached: the old reply's turn,
    waiting for a first token that has not come (no checkpoint to notice it), stops at its next heartbeat."""
    # Short, to notice the takeover soon; 4 intervals (10 s) is how late the takeover below may be written after the
    # reply began without finding it abandoned. The providers' SDKs are imported before (``provider_sdks_imported``):
    # imported in the reply's upstream call, they held the loop (the test's wait with it) for over 10 s under xdist.
    settings.LLMHUB_CHAT_HEARTBEAT_INTERVAL = 2.5
    events = []

    async def report(event) -> None:
        events.append(event)

    caller = Caller(user_id=alice.pk, username=alice.username)
    old = services_turn.ChatTurn(
        caller=caller,
        conversation_id=None,
        model_name=chat_model.name,
        content="Think [[ttft=20000]]",
        report=report,
        client="page-1",
    )
    running = asyncio.create_task(old.run())
    reply = await wait_until_async(
        lambda: Message.objects.filter(role=Role.ASSISTANT, conversation__owner=alice).afirst(), "the reply begins"
    )
    reach = selectors.ConversationReach(user_id=alice.pk)
    await sync_to_async(services.chat_turn_begin)(
        reach=reach,
        conversation_id=reply.conversation_id,
        model_name=chat_model.name,
        provider_name="p",
        content="again",
        request_id="req_elsewhere",
        client="page-1",
    )
    await asyncio.wait_for(running, 30)
    # No text came from the upstream: the reply began, and ended cancelled long before its first token.
    assert [type(event) for event in events] == [services_turn.TurnStarted, services_turn.TurnCancelled]
    assert events[1].by_user is False and events[1].message_id == reply.pk
    await reply.arefresh_from_db()
    assert (reply.status, reply.content, reply.error_message) == (MessageStatus.CANCELLED, "", services.TAKEN_OVER_NOTE)
    await ledger_flush()
    record = await UsageRecord.objects.aget(request_id=reply.request_id)
    assert (record.status, record.completion_tokens) == ("client_disconnected", 0)


@pytest.fixture(params=["redis", "in-memory"])
async def shared_channel_layer(request, settings):
    """The channel layer the consumers share: Redis's, as the server processes of a deployment share it, or the
    in-memory one of a single process (llmhub's without ``REDIS_URL``)."""
    if request.param == "in-memory":
        settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
        yield
        return
    url = request.getfixturevalue("redis_url")
    with redis_emptied(url):
        settings.CHANNEL_LAYERS = {
            "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [url]}}
        }
        try:
            yield
        finally:
            await get_channel_layer().close_pools()


async def test_a_reply_taken_over_from_another_socket_stops_when_told_not_at_its_heartbeat(
    shared_channel_layer, alice, chat_model, socket_for, settings
):
    """The consumer streaming the reply is told through the channel layer by the turn that took it over, in whichever
    process: its turn, waiting for a first token (no checkpoint to notice the takeover), stops at once. Until 8
    December it stopped only at its next heartbeat (here a minute away; 10 s by default), the upstream generating
    and billing on meanwhile."""
    settings.LLMHUB_CHAT_HEARTBEAT_INTERVAL = 60
    lost = await socket_for(alice)
    await send(lost, content="Think [[ttft=90000]]", model=chat_model, request_id="r1", client="page-1")
    reply = await wait_until_async(
        lambda: Message.objects.filter(role=Role.ASSISTANT, conversation__owner=alice).afirst(), "the reply begins"
    )

    reconnected = await socket_for(alice)
    await send(
        reconnected,
        content="again",
        model=chat_model,
        conversation=reply.conversation_id,
        request_id="r2",
        client="page-1",
    )
    assert (await events_until(reconnected, ends("r2")))[-1]["type"] == "chat.completed"
    # Well within the heartbeat's minute: the old turn is told; before, nothing came on its socket for that minute.
    events = await events_until(lost, ends("r1"), timeout=30)
    assert [e["type"] for e in events] == ["chat.started", "chat.cancelled"], events
    assert events[1]["message"] == reply.pk
    await reply.arefresh_from_db()
    assert (reply.status, reply.content, reply.error_message) == (MessageStatus.CANCELLED, "", services.TAKEN_OVER_NOTE)
    await ledger_flush()
    record = await UsageRecord.objects.aget(request_id=reply.request_id)
    assert (record.status, record.completion_tokens) == ("client_disconnected", 0)


async def test_a_conversation_deleted_in_another_tab_ends_the_reply_streaming_into_it(alice, chat_model, socket_for):
    """The reply's turn finds its reply gone at its next checkpoint: it stops (settled once for what the upstream
    wrote) and the tab streaming it is told, rather than streaming the rest to nobody."""
    ws = await socket_for(alice)
    await send(ws, content=LONG_REPLY, model=chat_model, request_id="r1")
    events = await receive_deltas(ws, "r1", 2)
    conversation_id = events[0]["conversation"]

    def delete_in_another_tab() -> int:
        client = Client()
        client.force_login(alice)
        return client.delete(f"/api/conversations/{conversation_id}/").status_code

    assert await sync_to_async(delete_in_another_tab)() == 204
    events += await events_until(ws, ends("r1"))
    assert events[-1]["type"] == "chat.cancelled", events[-1]
    assert len(deltas(events, "r1").split()) < 300
    assert await Message.objects.acount() == 0
    await ledger_flush()
    record = await UsageRecord.objects.aget()
    assert (record.status, record.endpoint) == ("client_disconnected", "websocket")
    assert record.completion_tokens >= len(deltas(events, "r1").split())


async def test_another_users_send_naming_the_same_client_is_not_found_and_takes_nothing_over(
    alice, bob, chat_model, socket_for
):
    """The takeover is only within the conversations a caller reaches: another user's send into the conversation,
    whatever client it names, is answered ``not_found`` as before, and the reply streaming there goes on."""
    ws_alice, ws_bob = await socket_for(alice), await socket_for(bob)
    await send(ws_alice, content=LONG_REPLY, model=chat_model, request_id="r1", client="page-1")
    conversation_id = (await receive_deltas(ws_alice, "r1", 1))[0]["conversation"]

    await send(
        ws_bob, content="let me in", model=chat_model, conversation=conversation_id, request_id="b1", client="page-1"
    )
    refused = (await events_until(ws_bob, ends("b1")))[-1]
    assert (refused["type"], refused["code"], refused["message"]) == (
        "error",
        "not_found",
        f"No conversation {conversation_id}.",
    )
    await handled(ws_alice)
    reply = await Message.objects.aget(conversation_id=conversation_id, role=Role.ASSISTANT)
    assert (reply.status, reply.error_message) == (MessageStatus.STREAMING, "")
    assert await Message.objects.filter(content="let me in").aexists() is False
    assert await Conversation.objects.filter(owner=bob).aexists() is False
    await ws_alice.send_json_to({"type": "chat.cancel", "request_id": "r1"})
    assert (await events_until(ws_alice, ends("r1")))[-1]["type"] == "chat.cancelled"
