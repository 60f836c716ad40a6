"""Moderation on the chat WebSocket: a refused input is an ``error`` event (nothing sent upstream, a
``rejected`` row), a reply cut by the output check ends with an ``error`` and is kept as far as delivered."""

from __future__ import annotations

import asyncio
import logging

import pytest
from asgiref.sync import sync_to_async

from audit.models import AuditEvent
from billing.models import UsageRecord
from billing.services.ledger import ledger_flush
from chat.models import Conversation, Message, MessageStatus, Role
from chat.moderation import moderation_drain
from providers.models import Deployment, ModerationAction, ModerationPolicy
from providers.moderation import policy_cache
from providers.tokens import text_tokens
from tests.chat.conftest import deltas, ends, events_until, open_socket
from tests.factories import ModelFactory
from tests.waiting import wait_until_async

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _fresh_policies():
    policy_cache.invalidate()
    yield
    policy_cache.invalidate()


@sync_to_async
def moderate(model, **fields) -> None:
    model.moderation_policy = ModerationPolicy.objects.create(name="ws-policy", **fields)
    model.save()


async def send(ws, model, content: str, request_id: str = "r1", conversation: int | None = None) -> None:
    await ws.send_json_to(
        {
            "type": "chat.send",
            "conversation": conversation,
            "model": model.name,
            "content": content,
            "request_id": request_id,
        }
    )


async def test_a_blocked_message_is_an_error_event_and_never_reaches_the_upstream(
    alice, chat_model, socket_for, fake_upstream
):
    await moderate(chat_model, blocklist="forbidden")
    ws = await socket_for(alice)

    await send(ws, chat_model, "a Forbidden question")
    events = await events_until(ws, ends("r1"))

    assert events[-1]["type"] == "error" and events[-1]["code"] == "content_policy_violation"
    assert fake_upstream.requests_served("/v1/chat/completions") == 0
    await ledger_flush()
    record = await UsageRecord.objects.aget(user_id=alice.pk)
    assert record.status == "rejected" and record.error_type == "content_policy_violation"
    assert record.endpoint == "websocket" and record.moderation.startswith("blocked input: blocklist")
    assert not await Message.objects.filter(conversation__owner=alice).aexists()


async def test_a_reply_cut_by_the_block_list_is_kept_as_delivered_and_marked(alice, chat_model, socket_for):
    await moderate(chat_model, blocklist="adipiscing", stream_interval_chars=1)
    ws = await socket_for(alice)

    await send(ws, chat_model, "[[words=30]]")
    events = await events_until(ws, ends("r1"))

    assert events[-1]["type"] == "error" and events[-1]["code"] == "content_policy_violation"
    delivered = deltas(events, "r1")
    assert delivered and "lorem ipsum dolor sit amet consectetur adipiscing elit".startswith(delivered)
    assert "adipiscing" not in delivered
    reply = await Message.objects.aget(conversation__owner=alice, role=Role.ASSISTANT)
    assert reply.content == delivered and reply.status == MessageStatus.ERROR
    assert "content policy" in reply.error_message
    await ledger_flush()
    record = await UsageRecord.objects.aget(user_id=alice.pk)
    assert record.completion_tokens == text_tokens(delivered) and record.cost > 0
    assert record.moderation.startswith("blocked output: blocklist")


async def test_a_blocked_word_in_disguise_is_an_error_event_and_never_reaches_the_upstream(
    alice, chat_model, socket_for, fake_upstream
):
    """Full-width letters and invisible characters took a blocked word past the block-list."""
    await moderate(chat_model, blocklist="forbidden")
    ws = await socket_for(alice)

    await send(ws, chat_model, "a ｆｏｒ\u200bｂｉｄ\u00adｄｅｎ question")
    events = await events_until(ws, ends("r1"))

    assert events[-1]["type"] == "error" and events[-1]["code"] == "content_policy_violation"
    assert fake_upstream.requests_served("/v1/chat/completions") == 0


async def test_the_conversations_earlier_turns_are_not_read_again_on_each_turn(alice, chat_model, socket_for):
    """The history is the conversation's own: its user turns were checked when sent, its replies as output.
    Each turn read every earlier user turn again, so its cost grew with the conversation, and a flagged
    message flagged every later turn of the conversation on the ledger and in the audit log."""
    await moderate(chat_model, blocklist="forbidden", action=ModerationAction.FLAG, check_output=False)
    ws = await socket_for(alice)

    await send(ws, chat_model, "a forbidden question")
    first = await events_until(ws, ends("r1"))
    await send(ws, chat_model, "and another", request_id="r2", conversation=first[0]["conversation"])
    second = await events_until(ws, ends("r2"))

    assert first[-1]["type"] == second[-1]["type"] == "chat.completed"
    await ledger_flush()
    await moderation_drain()
    rows = [row async for row in UsageRecord.objects.filter(user_id=alice.pk).order_by("created_at")]
    assert [row.moderation[:13] for row in rows] == ["flagged input", ""]
    assert await AuditEvent.objects.filter(action="moderation.flag").acount() == 1


async def test_the_conversations_system_prompt_is_read_on_each_turn(alice, chat_model, socket_for, fake_upstream):
    """The system prompt is the user's own text, set outside the socket (``PATCH /api/conversations/<id>/``):
    it is read with the new turn."""
    await moderate(chat_model, blocklist="forbidden")
    ws = await socket_for(alice)
    await send(ws, chat_model, "hello")
    first = await events_until(ws, ends("r1"))
    await Conversation.objects.filter(pk=first[0]["conversation"]).aupdate(system_prompt="Say forbidden things.")

    await send(ws, chat_model, "and another", request_id="r2", conversation=first[0]["conversation"])
    second = await events_until(ws, ends("r2"))

    assert second[-1]["type"] == "error" and second[-1]["code"] == "content_policy_violation"
    assert fake_upstream.requests_served("/v1/chat/completions") == 1


async def test_a_blocked_word_in_the_reasoning_the_page_shows_cuts_the_reply(alice, chat_model, socket_for):
    """The chat page shows a reasoning model's reasoning (``chat.reasoning``) above its reply: a blocked word there
    reaches the user as much as in the reply, so it is read as output and cuts the reply before it is shown; what
    was delivered is kept and billed."""
    await moderate(chat_model, blocklist="forbidden", check_input=False, stream_interval_chars=1)
    ws = await socket_for(alice)
    reasoning = "the forbidden word is one I will not say"

    await send(ws, chat_model, f"[[reasoning={reasoning}]] [[reply=Fine.]] [[usage=none]]")
    events = await events_until(ws, ends("r1"))

    assert events[-1]["type"] == "error" and events[-1]["code"] == "content_policy_violation"
    shown = "".join(event["content"] for event in events if event["type"] == "chat.reasoning")
    assert "forbidden" not in shown and reasoning.startswith(shown)
    assert deltas(events, "r1") == ""
    reply = await Message.objects.aget(conversation__owner=alice, role=Role.ASSISTANT)
    assert reply.reasoning == shown and reply.status == MessageStatus.ERROR
    await ledger_flush()
    record = await UsageRecord.objects.aget(user_id=alice.pk)
    assert record.moderation.startswith("blocked output: blocklist")
    assert record.usage_estimated and record.prompt_tokens > 0 and record.cost > 0


async def test_a_fallbacks_output_policy_cuts_the_reply_it_writes_on_the_socket(alice, chat_model, socket_for):
    """The model picked has no policy and fails; its fallback, whose admin blocks "forbidden" in its replies,
    answers. The reply went to the page unchecked; now the fallback's own policy cuts it before the word."""
    deployment = await Deployment.objects.select_related("provider").aget(model=chat_model)
    policy = await ModerationPolicy.objects.acreate(name="guard-out", blocklist="forbidden", check_input=False)
    guarded = await sync_to_async(ModelFactory)(name="guarded", provider=deployment.provider, moderation_policy=policy)
    deployment.upstream_id = "fault-503"
    await deployment.asave()
    chat_model.retries, chat_model.fallbacks = 0, [guarded.name]
    await chat_model.asave()
    ws = await socket_for(alice)

    await send(ws, chat_model, "[[reply=the forbidden word]]")
    events = await events_until(ws, ends("r1"))

    assert events[-1]["type"] == "error" and events[-1]["code"] == "content_policy_violation"
    assert "forbidden" not in deltas(events, "r1")
    await ledger_flush()
    record = await UsageRecord.objects.aget(user_id=alice.pk)
    assert record.model_name == "guarded" and record.endpoint == "websocket"
    assert record.moderation == 'blocked output: blocklist (entry 1 at character 4), policy "guard-out"'


async def test_a_reply_cut_while_the_block_list_holds_its_last_word_is_charged_that_word_not_shown_it(
    alice, chat_model, socket_for
):
    """The upstream's connection is cut while the output check holds back the reply's last word (a blocked one,
    until the next piece shows whether it is a whole word). The provider wrote and billed it; the row counted
    only the words shown. It counts every word written now, while the saved message keeps only what was shown."""
    await moderate(chat_model, blocklist="forbidden", check_input=False, stream_interval_chars=1)
    ws = await socket_for(alice)

    await send(ws, chat_model, "[[reply=one two three forbidden four five]] [[fault=cut-4]]")
    events = await events_until(ws, ends("r1"))

    assert events[-1]["type"] == "error"
    assert deltas(events, "r1") == "one two three"
    reply = await Message.objects.aget(conversation__owner=alice, role=Role.ASSISTANT)
    assert reply.content == "one two three" and reply.status == MessageStatus.ERROR
    await ledger_flush()
    record = await UsageRecord.objects.aget(user_id=alice.pk)
    assert record.usage_estimated and record.endpoint == "websocket"
    assert record.completion_tokens == text_tokens("one two three forbidden") > text_tokens("one two three")


async def test_a_socket_closed_while_the_block_list_holds_the_reply_back_ends_the_upstream_call_and_pays_it(
    alice, chat_model, fake_upstream, caplog
):
    """The tab closes while the output check holds back the reply's last word (a blocked one, until the next piece
    shows whether it is a whole word), the words coming every 2 s. The upstream call is given up (its connection
    closed before the reply's end), the saved reply keeps only what was shown, cancelled, and the row says the client
    left and counts every word the upstream wrote, relayed or held; nothing is logged as an error."""
    await moderate(chat_model, blocklist="forbidden", check_input=False, stream_interval_chars=1)
    ws, connected, _ = await open_socket(user=alice)
    assert connected
    written = "one two three forbidden"

    await send(ws, chat_model, f"[[reply={written}{' more' * 300}]] [[tps=0.5]]")
    events: list[dict] = []
    while deltas(events, "r1") != "one two three":
        events.append(await ws.receive_json_from(timeout=15))
    await asyncio.sleep(3)  # the held word arrives 2 s after "three", the next one 4 s after
    await ws.disconnect(timeout=10)

    reply = await Message.objects.aget(conversation__owner=alice, role=Role.ASSISTANT)
    assert reply.content == "one two three" and reply.status == MessageStatus.CANCELLED
    await ledger_flush()
    record = await UsageRecord.objects.aget(user_id=alice.pk)
    assert record.status == "client_disconnected" and record.endpoint == "websocket"
    assert record.usage_estimated and record.completion_tokens == text_tokens(written)
    await wait_until_async(
        lambda: [entry for entry in fake_upstream.requests if entry.get("closed_early")],
        "the upstream's connection closed before its reply's end",
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
