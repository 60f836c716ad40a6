"""The chat WebSocket against the real pipeline and the fake upstream, through the real ASGI stack
(origin check, session middleware) with Channels' ``WebsocketCommunicator``."""

from __future__ import annotations

import asyncio
import itertools
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from billing.models import Plan, UsageRecord
from billing.services.keys import api_key_create, api_key_revoke
from billing.services.ledger import ledger_flush
from billing.services.plans import plan_assign
from chat import consumers
from chat.models import Conversation, Message, MessageStatus, Role
from tests.chat.conftest import deltas, ends, events_until, open_socket

pytestmark = pytest.mark.django_db(transaction=True)

LONG_REPLY = "Tell me a long story [[words=300]] [[tps=20]]"


async def send(communicator, *, content: str, model, conversation=None, request_id: str = "r1") -> None:
    await communicator.send_json_to(
        {
            "type": "chat.send",
            "conversation": conversation,
            "model": model.name,
            "content": content,
            "request_id": request_id,
        }
    )


async def receive_deltas(communicator, request_id: str, count: int) -> list[dict]:
    events = []
    while sum(e["type"] == "chat.delta" for e in events) < count:
        event = await communicator.receive_json_from(timeout=10)
        assert event["type"] in ("chat.started", "chat.delta"), event
        events.append(event)
    return events


async def usage_row(request_id: str) -> UsageRecord:
    await ledger_flush()
    return await UsageRecord.objects.aget(request_id=request_id)


async def test_streamed_reply_is_relayed_and_persisted(alice, chat_model, socket_for):
    ws = await socket_for(alice)
    await send(ws, content="Hello there, how are you?", model=chat_model)
    events = await events_until(ws, ends("r1"))

    started, completed = events[0], events[-1]
    assert started["type"] == "chat.started"
    assert started["model"] == chat_model.name
    assert completed["type"] == "chat.completed", completed
    assert [e["type"] for e in events[1:-1]] == ["chat.delta"] * (len(events) - 2)
    assert len(events) - 2 > 1, "the reply should arrive in several deltas"
    assert deltas(events, "r1") == "Echo: Hello there, how are you?"
    assert completed["finish_reason"] == "stop"
    assert completed["message"] == started["message"]
    usage = completed["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == 6
    assert isinstance(usage["cost"], str) and Decimal(usage["cost"]) > 0

    conversation = await Conversation.objects.aget(pk=started["conversation"])
    assert conversation.owner_id == alice.pk
    assert conversation.title == "Hello there, how are you?"
    assert conversation.model_name == chat_model.name
    messages = [m async for m in conversation.messages.order_by("created_at", "id")]
    assert [(m.role, m.content, m.status) for m in messages] == [
        (Role.USER, "Hello there, how are you?", MessageStatus.COMPLETE),
        (Role.ASSISTANT, "Echo: Hello there, how are you?", MessageStatus.COMPLETE),
    ]
    reply = messages[1]
    assert reply.pk == started["message"]
    assert reply.provider_name == (await chat_model.deployments.select_related("provider").aget()).provider.name

    record = await usage_row(reply.request_id)
    assert record.endpoint == "websocket"
    assert record.status == "ok"
    assert record.user_id == alice.pk
    assert record.completion_tokens == 6
    assert str(record.cost.normalize()) == str(Decimal(usage["cost"]).normalize())
    assert reply.usage_record_id == record.request_id


async def test_a_reply_whose_deltas_say_null_for_none_is_relayed_as_its_text(alice, chat_model, socket_for):
    """An OpenAI-compatible server that says ``"role": null``, ``"tool_calls": null`` and ``"function_call": null``
    in every delta (vLLM, LM Studio, llama.cpp): the chat page gets the text, and no call is made of a null."""
    ws = await socket_for(alice)
    await send(ws, content="Hello there [[nulls=role,tool_calls,function_call]]", model=chat_model)
    events = await events_until(ws, ends("r1"))

    assert events[-1]["type"] == "chat.completed", events[-1]
    assert deltas(events, "r1") == "Echo: Hello there"
    assert events[-1]["finish_reason"] == "stop"
    reply = await Message.objects.aget(pk=events[0]["message"])
    assert (reply.content, reply.status) == ("Echo: Hello there", MessageStatus.COMPLETE)


async def test_a_reasoning_models_reasoning_streams_before_its_reply_and_is_kept_with_it(
    alice, chat_model, socket_for, fake_upstream
):
    """The chat page shows a reasoning model's reasoning (``chat.reasoning`` events, before the reply's deltas); it
    is saved with the reply and read back with the conversation, and not sent to the model again next turn."""
    ws = await socket_for(alice)
    reasoning = "first I weigh the question, then I answer it briefly"
    await send(ws, content=f"[[reasoning={reasoning}]] [[reply=Fine.]]", model=chat_model)
    events = await events_until(ws, ends("r1"))

    kinds = [event["type"] for event in events]
    assert kinds[0] == "chat.started" and kinds[-1] == "chat.completed"
    assert kinds.index("chat.delta") > max(i for i, kind in enumerate(kinds) if kind == "chat.reasoning")
    assert "".join(e["content"] for e in events if e["type"] == "chat.reasoning") == reasoning
    assert deltas(events, "r1") == "Fine."
    reply = await Message.objects.aget(pk=events[0]["message"])
    assert (reply.reasoning, reply.content) == (reasoning, "Fine.")
    user = await Message.objects.aget(conversation_id=events[0]["conversation"], role=Role.USER)
    assert user.reasoning == ""

    await send(ws, content="and then?", model=chat_model, conversation=events[0]["conversation"], request_id="r2")
    await events_until(ws, ends("r2"))
    sent = fake_upstream.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert all("reasoning" not in key for message in sent for key in message)


async def test_the_pages_reasoning_effort_reaches_a_model_that_reasons_and_is_refused_for_one_that_does_not(
    alice, chat_model, socket_for, fake_upstream
):
    """The page's effort control sends ``reasoning_effort``: checked here (one of low, medium, high, or null for
    off) and, for a model whose catalog entry does not say it reasons, refused with its rejected row."""
    ws = await socket_for(alice)
    await ws.send_json_to(
        {"type": "chat.send", "model": chat_model.name, "content": "hi", "reasoning_effort": "extreme"}
    )
    assert (await ws.receive_json_from(timeout=5))["code"] == "invalid_request"

    await ws.send_json_to(
        {"type": "chat.send", "model": chat_model.name, "content": "hi", "reasoning_effort": "high", "request_id": "r0"}
    )
    refused = await events_until(ws, ends("r0"))
    assert refused[-1]["type"] == "error" and refused[-1]["code"] == "unsupported_value"
    assert "reasoning_effort" in refused[-1]["message"]
    assert fake_upstream.stats["requests"] == 0
    await ledger_flush()
    assert await UsageRecord.objects.filter(status="rejected", user_id=alice.pk).acount() == 1

    chat_model.supports_reasoning = True
    await chat_model.asave()
    for request_id, effort in (("r1", "high"), ("r2", None)):
        await ws.send_json_to(
            {
                "type": "chat.send",
                "model": chat_model.name,
                "content": "[[reasoning=weigh it]] hi",
                "reasoning_effort": effort,
                "request_id": request_id,
            }
        )
        events = await events_until(ws, ends(request_id))
        assert events[-1]["type"] == "chat.completed", events[-1]
        assert fake_upstream.requests[-1]["body"].get("reasoning_effort") == effort


async def test_next_turn_sends_the_history(alice, chat_model, socket_for, fake_upstream):
    ws = await socket_for(alice)
    await send(ws, content="My name is Ada.", model=chat_model)
    first = await events_until(ws, ends("r1"))
    conversation_id = first[0]["conversation"]

    await send(ws, content="What is my name?", model=chat_model, conversation=conversation_id, request_id="r2")
    second = await events_until(ws, ends("r2"))
    assert second[0]["conversation"] == conversation_id
    assert deltas(second, "r2") == "Echo: What is my name?"

    sent = fake_upstream.requests[-1]["body"]["messages"]
    assert sent == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Echo: My name is Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    assert await Message.objects.filter(conversation_id=conversation_id).acount() == 4


async def test_system_prompt_goes_first(alice, chat_model, socket_for, fake_upstream):
    conversation = await Conversation.objects.acreate(owner=alice, title="t", system_prompt="Answer in French.")
    ws = await socket_for(alice)
    await send(ws, content="Hi", model=chat_model, conversation=conversation.pk)
    await events_until(ws, ends("r1"))
    sent = fake_upstream.requests[-1]["body"]["messages"]
    assert sent == [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]


async def test_cancel_stops_the_reply_and_keeps_what_was_written(alice, chat_model, socket_for):
    ws = await socket_for(alice)
    await send(ws, content=LONG_REPLY, model=chat_model)
    events = await receive_deltas(ws, "r1", 3)
    await ws.send_json_to({"type": "chat.cancel", "request_id": "r1"})
    events += await events_until(ws, ends("r1"))

    cancelled = events[-1]
    assert cancelled["type"] == "chat.cancelled", cancelled
    assert cancelled["message"] == events[0]["message"]
    received = deltas(events, "r1")
    assert 0 < len(received.split()) < 100, "the stream should stop long before its 300 words"

    reply = await Message.objects.aget(pk=cancelled["message"])
    assert reply.status == MessageStatus.CANCELLED
    assert reply.content == received
    record = await usage_row(reply.request_id)
    assert record.status == "cancelled"
    assert record.endpoint == "websocket"
    assert record.completion_tokens > 0
    # The event carries what the ledger row bills, for the page to show under the stopped reply.
    usage = cancelled["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (record.prompt_tokens, record.completion_tokens)
    assert (Decimal(usage["cost"]), usage["estimated"]) == (record.cost, record.usage_estimated)

    # The socket is still usable, and the conversation is free again.
    await send(ws, content="again", model=chat_model, conversation=events[0]["conversation"], request_id="r2")
    assert (await events_until(ws, ends("r2")))[-1]["type"] == "chat.completed"


async def test_disconnect_mid_stream_keeps_the_partial_reply(alice, chat_model):
    ws, connected, _ = await open_socket(user=alice)
    assert connected
    await send(ws, content=LONG_REPLY, model=chat_model)
    events = await receive_deltas(ws, "r1", 3)
    await ws.disconnect(timeout=10)

    reply = await Message.objects.aget(pk=events[0]["message"])
    assert reply.status == MessageStatus.CANCELLED
    assert reply.content.startswith(deltas(events, "r1"))
    assert 0 < len(reply.content.split()) < 100
    record = await usage_row(reply.request_id)
    assert record.status == "client_disconnected"


async def test_upstream_error_is_reported_and_recorded(alice, chat_model, socket_for):
    ws = await socket_for(alice)
    await send(ws, content="break please [[fault=500]]", model=chat_model)
    events = await events_until(ws, ends("r1"))

    error = events[-1]
    assert error["type"] == "error"
    assert error["request_id"] == "r1"
    assert error["code"].startswith("upstream")
    # Every attempt failed before any output: no deployment answered.
    assert [e["type"] for e in events] == ["chat.started", "error"] and events[0]["deployment"] is None
    assert error["message"]
    reply = await Message.objects.aget(pk=events[0]["message"])
    assert reply.status == MessageStatus.ERROR
    assert reply.error_message
    record = await usage_row(reply.request_id)
    assert record.status == "upstream_error"


async def test_error_event_mid_stream_keeps_the_partial_reply(alice, chat_model, socket_for):
    ws = await socket_for(alice)
    await send(ws, content="one two three four [[fault=error-event]]", model=chat_model)
    events = await events_until(ws, ends("r1"))
    assert events[-1]["type"] == "error"
    reply = await Message.objects.aget(pk=events[0]["message"])
    assert reply.status == MessageStatus.ERROR
    assert reply.content == deltas(events, "r1") != ""


async def test_two_conversations_stream_at_once_on_one_socket(alice, chat_model, socket_for):
    ws = await socket_for(alice)
    await send(ws, content="first [[words=12]] [[tps=40]]", model=chat_model, request_id="a")
    await send(ws, content="second [[words=12]] [[tps=40]]", model=chat_model, request_id="b")
    finished: set[str] = set()
    events = await events_until(
        ws, lambda e: e["type"] == "chat.completed" and (finished.add(e["request_id"]) or finished == {"a", "b"})
    )
    order = [e["request_id"] for e in events if e["type"] == "chat.delta"]
    switches = sum(1 for x, y in itertools.pairwise(order) if x != y)
    assert switches >= 2, f"deltas were not interleaved: {order}"
    assert len(deltas(events, "a").split()) == 12
    assert len(deltas(events, "b").split()) == 12
    started = {e["request_id"]: e for e in events if e["type"] == "chat.started"}
    assert started["a"]["conversation"] != started["b"]["conversation"]
    statuses = [
        m.status async for m in Message.objects.filter(pk__in=[started["a"]["message"], started["b"]["message"]])
    ]
    assert statuses == [MessageStatus.COMPLETE, MessageStatus.COMPLETE]


async def test_second_send_on_a_streaming_conversation_is_refused(alice, chat_model, socket_for):
    ws = await socket_for(alice)
    await send(ws, content="hi", model=chat_model)
    conversation_id = (await events_until(ws, ends("r1")))[0]["conversation"]
    await send(ws, content=LONG_REPLY, model=chat_model, conversation=conversation_id, request_id="r2")
    await receive_deltas(ws, "r2", 1)
    await send(ws, content="me too", model=chat_model, conversation=conversation_id, request_id="r3")
    busy = await events_until(ws, lambda e: e.get("request_id") == "r3")
    assert busy[-1]["type"] == "error" and busy[-1]["code"] == "conversation_busy"
    await ws.send_json_to({"type": "chat.cancel", "request_id": "r2"})
    assert (await events_until(ws, ends("r2")))[-1]["type"] == "chat.cancelled"
    assert await Message.objects.filter(conversation_id=conversation_id, content="me too").aexists() is False


async def test_unknown_model_and_bad_input_write_nothing(alice, chat_model, socket_for):
    ws = await socket_for(alice)
    await ws.send_json_to({"type": "chat.send", "conversation": None, "model": "no-such-model", "content": "hi"})
    error = await ws.receive_json_from(timeout=5)
    assert error["type"] == "error" and error["code"] == "model_not_found"

    for bad, code in [
        ({"type": "chat.send", "model": chat_model.name, "content": "   "}, "invalid_request"),
        ({"type": "chat.send", "model": chat_model.name, "content": "x", "conversation": "1"}, "invalid_request"),
        ({"type": "chat.send", "content": "x"}, "invalid_request"),
        ({"type": "chat.send", "model": chat_model.name, "content": "x", "request_id": "x" * 65}, "invalid_request"),
        ({"type": "chat.cancel", "request_id": "nothing"}, "not_found"),
        ({"type": "nonsense"}, "unknown_type"),
        (["not", "an", "object"], "unknown_type"),
    ]:
        await ws.send_json_to(bad)
        event = await ws.receive_json_from(timeout=5)
        assert (event["type"], event["code"]) == ("error", code), bad
    await ws.send_to(text_data="{not json")
    assert (await ws.receive_json_from(timeout=5))["code"] == "invalid_json"
    await ws.send_json_to({"type": "ping"})
    assert await ws.receive_json_from(timeout=5) == {"type": "pong"}
    assert await Conversation.objects.acount() == 0
    assert await Message.objects.acount() == 0


async def test_another_users_conversation_is_not_found(alice, bob, chat_model, socket_for):
    ws_alice = await socket_for(alice)
    await send(ws_alice, content="secret plans", model=chat_model)
    conversation_id = (await events_until(ws_alice, ends("r1")))[0]["conversation"]

    ws_bob = await socket_for(bob)
    await send(ws_bob, content="let me in", model=chat_model, conversation=conversation_id)
    error = (await events_until(ws_bob, ends("r1")))[-1]
    assert (error["type"], error["code"]) == ("error", "not_found")
    await send(ws_bob, content="let me in", model=chat_model, conversation=999_999, request_id="r2")
    missing = (await events_until(ws_bob, ends("r2")))[-1]
    assert (missing["code"], missing["message"]) == ("not_found", "No conversation 999999.")
    assert error["message"] == f"No conversation {conversation_id}."
    assert await Message.objects.filter(conversation_id=conversation_id).acount() == 2
    assert await Conversation.objects.filter(owner=bob).aexists() is False


async def test_socket_without_session_must_authenticate_first(chat_model, socket_for):
    ws = await socket_for(None)
    await send(ws, content="hi", model=chat_model)
    error = await ws.receive_json_from(timeout=5)
    assert (error["type"], error["code"]) == ("error", "auth_required")
    assert await ws.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}
    assert await Message.objects.acount() == 0


async def test_unauthenticated_socket_is_closed_after_the_auth_timeout(socket_for, monkeypatch):
    monkeypatch.setattr(consumers, "AUTH_TIMEOUT", 0.2)
    ws = await socket_for(None)
    error = await ws.receive_json_from(timeout=5)
    assert (error["type"], error["code"]) == ("error", "auth_timeout")
    assert await ws.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


async def test_foreign_origin_is_rejected(alice):
    for origin in ("http://evil.example", "null"):
        ws, connected, _ = await open_socket(user=alice, origin=origin)
        assert connected is False, origin
        await ws.disconnect()


async def test_api_key_in_the_first_message(alice, chat_model, socket_for):
    created = await sync_to_async(api_key_create)(user=alice, name="script")
    ws = await socket_for(None)
    await ws.send_json_to({"type": "auth", "api_key": created.secret})
    assert await ws.receive_json_from(timeout=5) == {"type": "auth.ok"}
    await send(ws, content="hi from a script", model=chat_model)
    events = await events_until(ws, ends("r1"))
    assert events[-1]["type"] == "chat.completed"
    conversation = await Conversation.objects.aget(pk=events[0]["conversation"])
    assert conversation.owner_id == alice.pk
    record = await usage_row((await Message.objects.aget(pk=events[0]["message"])).request_id)
    assert record.api_key_id == created.api_key.pk
    await ws.send_json_to({"type": "auth", "api_key": created.secret})
    assert (await ws.receive_json_from(timeout=5))["code"] == "already_authenticated"


@pytest.mark.parametrize("variant", ["wrong", "revoked", "missing"])
async def test_bad_api_key_closes_the_socket(alice, socket_for, variant):
    created = await sync_to_async(api_key_create)(user=alice, name="k")
    if variant == "revoked":
        await sync_to_async(api_key_revoke)(api_key=created.api_key)
    keys = {"wrong": {"api_key": created.secret[:-4] + "zzzz"}, "revoked": {"api_key": created.secret}, "missing": {}}
    message = {"type": "auth", **keys[variant]}
    ws = await socket_for(None)
    await ws.send_json_to(message)
    error = await ws.receive_json_from(timeout=5)
    assert error["type"] == "error"
    assert error["code"] == ("missing_api_key" if variant == "missing" else "invalid_api_key")
    assert created.secret not in error["message"]
    assert await ws.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


async def test_api_key_in_the_url_is_ignored(alice, chat_model, socket_for):
    created = await sync_to_async(api_key_create)(user=alice, name="k")
    ws = await socket_for(None, path=f"/ws/chat/?api_key={created.secret}")
    await send(ws, content="hi", model=chat_model)
    assert (await ws.receive_json_from(timeout=5))["code"] == "auth_required"


async def test_model_outside_the_keys_allow_list_is_refused(alice, chat_model, socket_for):
    from tests.factories import ModelFactory

    deployment = await chat_model.deployments.select_related("provider").aget()
    other = await sync_to_async(ModelFactory)(provider=deployment.provider)
    created = await sync_to_async(api_key_create)(user=alice, name="narrow")
    await created.api_key.allowed_models.aset([other])
    ws = await socket_for(None)
    await ws.send_json_to({"type": "auth", "api_key": created.secret})
    await ws.receive_json_from(timeout=5)
    await send(ws, content="hi", model=chat_model)
    error = await ws.receive_json_from(timeout=5)
    # Answered as a model that does not exist, as on /v1 (tests/chat/test_ws_model_access.py); the row says why.
    assert (error["type"], error["code"], error["request_id"]) == ("error", "model_not_found", "r1")
    assert await Conversation.objects.acount() == 0
    await ledger_flush()
    assert await UsageRecord.objects.filter(status="rejected", endpoint="websocket").aexists()


async def test_cancel_before_the_reply_starts(alice, chat_model, socket_for):
    ws = await socket_for(alice)
    await send(ws, content=LONG_REPLY, model=chat_model)
    await ws.send_json_to({"type": "chat.cancel", "request_id": "r1"})
    events = await events_until(ws, ends("r1"))
    assert events[-1]["type"] == "chat.cancelled"
    assert await Message.objects.filter(status=MessageStatus.STREAMING).aexists() is False


async def test_a_program_without_origin_authenticates_with_a_key(alice):
    created = await sync_to_async(api_key_create)(user=alice, name="no-origin")
    ws, connected, _ = await open_socket(user=None, origin=None)
    assert connected is True
    await ws.send_json_to({"type": "auth", "api_key": created.secret})
    assert await ws.receive_json_from(timeout=5) == {"type": "auth.ok"}
    await ws.disconnect()


async def rejected_rows() -> list[UsageRecord]:
    await ledger_flush()
    return [row async for row in UsageRecord.objects.filter(status="rejected")]


async def test_an_unknown_model_is_refused_with_a_rejected_row(alice, chat_model, socket_for):
    ws = await socket_for(alice)
    await ws.send_json_to({"type": "chat.send", "model": "no-such-model", "content": "hi", "request_id": "r1"})
    [error] = await events_until(ws, ends("r1"))
    assert (error["type"], error["code"], error["param"]) == ("error", "model_not_found", "model")

    [row] = await rejected_rows()
    assert (row.endpoint, row.model_name, row.user_id) == ("websocket", "no-such-model", alice.pk)
    assert row.error_type == "model_not_found" and row.cost == 0
    assert await Conversation.objects.acount() == 0


async def test_a_model_outside_the_plan_is_refused_with_a_rejected_row(alice, chat_model, socket_for):
    from billing.models import Plan
    from billing.services.plans import plan_assign

    narrow = await Plan.objects.acreate(name="Nothing", allow_all_models=False)
    await sync_to_async(plan_assign)(user=alice, plan=narrow)
    ws = await socket_for(alice)
    await send(ws, content="hi", model=chat_model)
    [error] = await events_until(ws, ends("r1"))
    assert (error["type"], error["code"]) == ("error", "model_not_allowed")

    [row] = await rejected_rows()
    assert (row.endpoint, row.model_name, row.user_id) == ("websocket", chat_model.name, alice.pk)
    assert row.error_type == "model_not_allowed" and row.cost == 0
    assert await Conversation.objects.acount() == 0
    assert await Message.objects.acount() == 0


async def test_a_turn_that_fails_over_names_the_deployment_that_answered(alice, chat_model, socket_for):
    """The first deployment (by priority) refuses connections; the reply comes from the second, and the
    page is told which one, as the stored reply says."""
    from tests.factories import DeploymentFactory, ProviderFactory

    served_by = await chat_model.deployments.select_related("provider").aget()
    dead = await sync_to_async(ProviderFactory)(base_url="http://127.0.0.1:9/v1")
    await sync_to_async(DeploymentFactory)(model=chat_model, provider=dead, name="dead", priority=0)
    served_by.priority = 1
    await served_by.asave(update_fields=["priority"])
    chat_model.strategy = "priority"
    await chat_model.asave(update_fields=["strategy"])

    ws = await socket_for(alice)
    await send(ws, content="Hello", model=chat_model)
    events = await events_until(ws, ends("r1"))
    started, completed = events[0], events[-1]
    assert completed["type"] == "chat.completed", completed
    assert (started["type"], started["deployment"], started["provider"]) == (
        "chat.started",
        served_by.name,
        served_by.provider.name,
    )
    reply = await Message.objects.aget(pk=started["message"])
    assert (reply.provider_name, reply.status) == (served_by.provider.name, MessageStatus.COMPLETE)
    assert (await usage_row(reply.request_id)).status == "ok"


async def test_a_reply_with_a_nul_character_is_saved_without_it(alice, chat_model, socket_for, monkeypatch):
    """A model may emit U+0000, which PostgreSQL's text cannot hold: the reply is saved (complete, and
    what a reload shows) without it, instead of the save failing and the reply staying "streaming"."""
    from llmhub.testing import fake_upstream as fake

    build = fake._build_reply

    def with_nul(conv, *args, **kwargs):
        if "reply" in conv.directives:
            conv.directives["reply"] = conv.directives["reply"].replace("NUL", "\x00")
        return build(conv, *args, **kwargs)

    monkeypatch.setattr(fake, "_build_reply", with_nul)
    ws = await socket_for(alice)
    await send(ws, content="[[reply=one NUL two]]", model=chat_model)
    events = await events_until(ws, ends("r1"))
    assert events[-1]["type"] == "chat.completed", events[-1]
    assert deltas(events, "r1") == "one \x00 two"
    reply = await Message.objects.aget(pk=events[-1]["message"])
    assert (reply.status, reply.content) == (MessageStatus.COMPLETE, "one  two")


async def test_two_tabs_cannot_stream_into_one_conversation_at_once(alice, chat_model, socket_for):
    """The busy check is the conversation's, not the socket's: a second tab (or a socket on another server
    process) sending while a reply streams is refused, and its send writes and bills nothing."""
    tab1, tab2 = await socket_for(alice), await socket_for(alice)
    await send(tab1, content="hi", model=chat_model)
    conversation_id = (await events_until(tab1, ends("r1")))[0]["conversation"]
    await send(tab1, content=LONG_REPLY, model=chat_model, conversation=conversation_id, request_id="r2")
    await receive_deltas(tab1, "r2", 1)

    await send(tab2, content="me too", model=chat_model, conversation=conversation_id, request_id="r3")
    busy = await events_until(tab2, ends("r3"))
    assert [(e["type"], e.get("code")) for e in busy] == [("error", "conversation_busy")], busy
    assert busy[0]["message"] == "A reply is already streaming in this conversation."

    await tab1.send_json_to({"type": "chat.cancel", "request_id": "r2"})
    assert (await events_until(tab1, ends("r2")))[-1]["type"] == "chat.cancelled"
    assert await Message.objects.filter(conversation_id=conversation_id, content="me too").aexists() is False
    await ledger_flush()
    replies = [m.request_id async for m in Message.objects.filter(conversation_id=conversation_id, role=Role.ASSISTANT)]
    assert sorted([r.request_id async for r in UsageRecord.objects.all()]) == sorted(replies)

    # Once the reply has ended, the other tab may go on.
    await send(tab2, content="me too", model=chat_model, conversation=conversation_id, request_id="r4")
    assert (await events_until(tab2, ends("r4")))[-1]["type"] == "chat.completed"


async def test_two_tabs_sending_at_the_same_moment_get_one_reply(alice, chat_model, socket_for):
    """Both sends may pass the early check before either reply is written: the write itself decides, under
    the conversation's lock, and the loser is refused with nothing written and nothing billed."""
    tab1, tab2 = await socket_for(alice), await socket_for(alice)
    await send(tab1, content="hi", model=chat_model)
    conversation_id = (await events_until(tab1, ends("r1")))[0]["conversation"]

    await asyncio.gather(
        send(tab1, content="from tab one", model=chat_model, conversation=conversation_id, request_id="a"),
        send(tab2, content="from tab two", model=chat_model, conversation=conversation_id, request_id="b"),
    )
    endings = [(await events_until(tab, ends(rid)))[-1] for tab, rid in ((tab1, "a"), (tab2, "b"))]
    assert sorted((e["type"], e.get("code")) for e in endings) == [
        ("chat.completed", None),
        ("error", "conversation_busy"),
    ], endings
    winner = "from tab one" if endings[0]["type"] == "chat.completed" else "from tab two"
    users = [m.content async for m in Message.objects.filter(conversation_id=conversation_id, role=Role.USER)]
    assert users == ["hi", winner]
    await ledger_flush()
    replies = {m.request_id async for m in Message.objects.filter(conversation_id=conversation_id, role=Role.ASSISTANT)}
    extra = [r async for r in UsageRecord.objects.exclude(request_id__in=replies)]
    # Refused before admission: no row; refused after (the race): its reservation released, at no cost.
    assert all((r.status, r.cost, r.error_type) == ("rejected", 0, "conversation_busy") for r in extra), extra


def conversation_read(user, conversation_id: int) -> list[dict]:
    client = Client()
    client.force_login(user)
    response = client.get(f"/api/conversations/{conversation_id}/")
    assert response.status_code == 200, response.content
    return response.json()["messages"]


async def test_a_reply_cut_at_what_the_quota_still_pays_for_is_kept_as_cut(alice, chat_model, socket_for):
    """Under a token quota a reply is capped at what the quota still pays for. Cut there, it was saved and listed
    like a whole reply, and the page could not tell it was cut. Its finish reason is kept and listed with it."""

    def plan_tiny() -> None:
        plan_assign(user=alice, plan=Plan.objects.create(name="tiny", allow_all_models=True, daily_token_quota=80))

    await sync_to_async(plan_tiny)()
    ws = await socket_for(alice)
    await send(ws, content="Hi [[words=3]]", model=chat_model)
    whole = await events_until(ws, ends("r1"))
    await send(ws, content="A story [[words=200]]", model=chat_model, request_id="r2")
    cut = await events_until(ws, ends("r2"))

    assert (whole[-1]["type"], whole[-1]["finish_reason"]) == ("chat.completed", "stop"), whole[-1]
    assert (cut[-1]["type"], cut[-1]["finish_reason"]) == ("chat.completed", "length"), cut[-1]
    assert 0 < len(deltas(cut, "r2").split()) < 200
    reply = await Message.objects.aget(pk=cut[-1]["message"])
    assert (reply.status, reply.finish_reason) == (MessageStatus.COMPLETE, "length")
    listed = await sync_to_async(conversation_read)(alice, cut[0]["conversation"])
    assert [(m["role"], m["status"], m["finish_reason"]) for m in listed] == [
        ("user", "complete", ""),
        ("assistant", "complete", "length"),
    ]
    first = await sync_to_async(conversation_read)(alice, whole[0]["conversation"])
    assert first[-1]["finish_reason"] == "stop"


async def test_a_reply_served_at_priority_is_charged_the_deployments_priority_factor(alice, chat_model, socket_for):
    """The page asks no service tier; a project whose default is priority serves it there (the fake's
    ``[[project_tier=priority]]``), its chunks say so, and the row is charged at the priority factor, as on /v1."""
    from providers.models import Deployment

    await Deployment.objects.filter(model=chat_model).aupdate(priority_price_factor=Decimal(2))
    deployment = await chat_model.deployments.aget()
    ws = await socket_for(alice)
    await send(ws, content="Hello there [[project_tier=priority]]", model=chat_model)
    events = await events_until(ws, ends("r1"))
    assert events[-1]["type"] == "chat.completed", events[-1]

    reply = await Message.objects.aget(pk=events[0]["message"])
    record = await usage_row(reply.request_id)
    standard = (
        record.prompt_tokens * deployment.input_per_mtok + record.completion_tokens * deployment.output_per_mtok
    ) / 1_000_000
    assert record.service_tier == "priority" and record.completion_tokens > 0
    assert record.cost == (2 * standard).quantize(Decimal("0.0000000001")) and record.cost > 0
