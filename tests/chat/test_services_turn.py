"""The chat turn (``chat.services_turn``) driven without a socket: a ``report`` callback collects what it
says, against the real pipeline, the fake upstream and the database."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async

from billing.models import UsageRecord
from billing.services.ledger import ledger_flush
from chat import selectors
from chat.models import Conversation, Message, MessageStatus, Role
from chat.pipeline import Caller
from chat.services_turn import (
    ChatTurn,
    TurnCancelled,
    TurnCompleted,
    TurnDelta,
    TurnEvent,
    TurnFailed,
    TurnStarted,
)
from tests.waiting import wait_until_async

pytestmark = pytest.mark.django_db(transaction=True)


class Recorder:
    """A ``report`` callback: keeps every event, and can stop the turn once it has seen ``stop_after`` deltas."""

    def __init__(self, *, stop_after: int | None = None) -> None:
        self.events: list[TurnEvent] = []
        self.stop_after = stop_after
        self.turn: ChatTurn | None = None

    async def __call__(self, event: TurnEvent) -> None:
        self.events.append(event)
        if self.stop_after is not None and self.turn is not None and len(self.of(TurnDelta)) == self.stop_after:
            self.turn.stop(by_user=True)

    def of(self, kind: type) -> list:
        return [event for event in self.events if isinstance(event, kind)]

    @property
    def text(self) -> str:
        return "".join(delta.content for delta in self.of(TurnDelta))


def turn_for(user, model_name: str, content: str, *, conversation_id: int | None = None, **recorder) -> ChatTurn:
    report = Recorder(**recorder)
    turn = ChatTurn(
        caller=Caller(user_id=user.pk, username=user.username),
        conversation_id=conversation_id,
        model_name=model_name,
        content=content,
        report=report,
    )
    report.turn = turn
    return turn


async def test_a_turn_reports_its_reply_and_writes_it(alice, chat_model):
    turn = turn_for(alice, chat_model.name, "Hello there")
    await turn.run()
    events = turn.report.events
    started, completed = events[0], events[-1]
    assert isinstance(started, TurnStarted) and isinstance(completed, TurnCompleted)
    assert [type(event) for event in events[1:-1]] == [TurnDelta] * (len(events) - 2)
    assert turn.report.text == "Echo: Hello there"
    deployment = await chat_model.deployments.select_related("provider").aget()
    assert (started.model, started.provider, started.deployment) == (
        chat_model.name,
        deployment.provider.name,
        deployment.name,
    )
    assert started.title == "Hello there" and turn.conversation_id == started.conversation_id
    assert completed.finish_reason == "stop" and completed.usage.completion_tokens == 3
    assert completed.usage.cost > 0

    messages = [m async for m in Message.objects.filter(conversation_id=started.conversation_id)]
    assert [(m.role, m.content, m.status) for m in messages] == [
        (Role.USER, "Hello there", MessageStatus.COMPLETE),
        (Role.ASSISTANT, "Echo: Hello there", MessageStatus.COMPLETE),
    ]
    await ledger_flush()
    record = await UsageRecord.objects.aget(request_id=messages[1].request_id)
    assert (record.status, record.endpoint, record.cost) == ("ok", "websocket", completed.usage.cost)


async def test_a_stopped_turn_keeps_what_was_written_and_ends_normally(alice, chat_model):
    turn = turn_for(alice, chat_model.name, "A long one [[words=300]] [[tps=50]]", stop_after=3)
    await turn.run()  # returns: the cancellation was the turn's own
    cancelled = turn.report.events[-1]
    assert isinstance(cancelled, TurnCancelled) and cancelled.by_user
    assert 3 <= len(turn.report.of(TurnDelta)) < 100
    reply = await Message.objects.aget(pk=cancelled.message_id)
    assert (reply.status, reply.content) == (MessageStatus.CANCELLED, turn.report.text)
    await ledger_flush()
    record = await UsageRecord.objects.aget(request_id=reply.request_id)
    assert record.status == "cancelled"
    assert (cancelled.usage.completion_tokens, cancelled.usage.cost) == (record.completion_tokens, record.cost)


async def test_a_turn_whose_owner_goes_away_before_it_is_admitted_writes_nothing(alice, chat_model):
    turn = turn_for(alice, chat_model.name, "hi")
    task = asyncio.create_task(turn.run())
    turn.stop(by_user=False)
    await task
    assert turn.report.events == [TurnCancelled(message_id=None, usage=None, by_user=False)]
    assert await Message.objects.acount() == 0
    await ledger_flush()
    assert await UsageRecord.objects.acount() == 0


async def test_a_turn_stopped_by_its_user_before_it_is_admitted_keeps_the_message(alice, chat_model):
    """The user's message is not dropped however early the stop: it is kept under an empty stopped reply (until 7
    December nothing was written, and the page's transcript showed a message no reload would)."""
    turn = turn_for(alice, chat_model.name, "hi")
    task = asyncio.create_task(turn.run())
    turn.stop(by_user=True)
    await task
    started, cancelled = turn.report.events
    assert isinstance(started, TurnStarted) and started.deployment is None
    assert cancelled == TurnCancelled(message_id=started.message_id, usage=cancelled.usage, by_user=True)
    messages = [m async for m in Message.objects.filter(conversation_id=started.conversation_id)]
    assert [(m.role, m.content, m.status) for m in messages] == [
        (Role.USER, "hi", MessageStatus.COMPLETE),
        (Role.ASSISTANT, "", MessageStatus.CANCELLED),
    ]
    await ledger_flush()
    record = await UsageRecord.objects.aget()
    assert (record.request_id, record.status, record.completion_tokens) == (messages[1].request_id, "cancelled", 0)


async def test_the_history_is_trimmed_to_the_resolved_models_context_window(alice, chat_model, fake_upstream):
    """The pipeline resolves the model and the turn's ``shape`` trims the history to its window: 40 turns
    of 400 characters (about 104 tokens each) do not fit 2,000 tokens less a 500-token reserve."""
    chat_model.context_window, chat_model.max_output_tokens = 2_000, 500
    await chat_model.asave(update_fields=["context_window", "max_output_tokens"])
    conversation = await Conversation.objects.acreate(owner=alice, title="t", system_prompt="Be brief.")
    for n in range(20):
        await Message.objects.acreate(conversation=conversation, role=Role.USER, content=f"q{n:02d} " + "x" * 396)
        await Message.objects.acreate(conversation=conversation, role=Role.ASSISTANT, content=f"a{n:02d} " + "y" * 396)

    turn = turn_for(alice, chat_model.name, "And now?", conversation_id=conversation.pk)
    await turn.run()
    assert isinstance(turn.report.events[-1], TurnCompleted), turn.report.events[-1]
    sent = fake_upstream.requests[-1]["body"]["messages"]
    assert sent[0] == {"role": "system", "content": "Be brief."}
    assert sent[-1] == {"role": "user", "content": "And now?"}
    # An unbroken run of the newest turns: (1500 - 7 - 6) // 104 = 14 of the 40.
    assert [m["content"][:3] for m in sent[1:-1]] == [f"{kind}{n:02d}" for n in range(13, 20) for kind in ("q", "a")]


async def test_an_unknown_model_fails_the_turn_with_a_rejected_row(alice, chat_model):
    turn = turn_for(alice, "no-such-model", "hi")
    await turn.run()
    [failed] = turn.report.events
    assert isinstance(failed, TurnFailed) and failed.error.code == "model_not_found"
    await ledger_flush()
    record = await UsageRecord.objects.aget()
    assert (record.status, record.endpoint, record.model_name) == ("rejected", "websocket", "no-such-model")
    assert await Message.objects.acount() == 0


async def test_an_upstream_failure_keeps_the_partial_reply_as_an_error(alice, chat_model):
    turn = turn_for(alice, chat_model.name, "one two three four [[fault=error-event]]")
    await turn.run()
    events = turn.report.events
    assert isinstance(events[0], TurnStarted) and isinstance(events[-1], TurnFailed)
    assert events[-1].error.code.startswith("upstream")
    reply = await Message.objects.aget(pk=events[0].message_id)
    assert reply.status == MessageStatus.ERROR and reply.error_message
    assert reply.content == turn.report.text != ""


async def test_another_users_conversation_is_not_found(alice, bob, chat_model):
    conversation = await Conversation.objects.acreate(owner=alice, title="mine")
    turn = turn_for(bob, chat_model.name, "let me in", conversation_id=conversation.pk)
    await turn.run()
    [failed] = turn.report.events
    assert isinstance(failed, TurnFailed) and failed.error.code == "not_found"
    assert await Message.objects.acount() == 0
    await ledger_flush()
    record = await UsageRecord.objects.aget()
    assert (record.status, record.user_id, record.error_type) == ("rejected", bob.pk, "not_found")


async def test_a_turn_in_an_archived_conversation_brings_it_back_to_the_list(alice, chat_model):
    """Sending into an archived conversation is using it again: it comes back to the sidebar, as in ChatGPT.
    A send the pipeline refuses is not a use, and leaves it archived."""
    conversation = await Conversation.objects.acreate(owner=alice, title="old thread", archived=True)

    refused = turn_for(alice, "no-such-model", "hello?", conversation_id=conversation.pk)
    await refused.run()
    assert isinstance(refused.report.events[-1], TurnFailed)
    await conversation.arefresh_from_db()
    assert conversation.archived is True

    turn = turn_for(alice, chat_model.name, "picking this up again", conversation_id=conversation.pk)
    await turn.run()
    assert isinstance(turn.report.events[-1], TurnCompleted), turn.report.events[-1]
    await conversation.arefresh_from_db()
    assert conversation.archived is False
    reach = selectors.ConversationReach(user_id=alice.pk)
    listed = await sync_to_async(lambda: [c.pk for c in selectors.conversation_list(reach=reach)])()
    assert listed == [conversation.pk]


@pytest.mark.period_instants(tick=True, only=["last-second-of-month"])
async def test_a_turn_stamps_its_replys_heartbeat_also_while_it_waits_for_the_first_token(alice, chat_model, settings):
    """The heartbeat is what tells other processes the reply is alive (``selectors.messages_abandoned``): it
    beats from the reply's first write, and through a long wait for the first token, when no chunk (and no
    checkpoint) arrives."""
    settings.LLMHUB_CHAT_HEARTBEAT_INTERVAL = 0.2
    turn = turn_for(alice, chat_model.name, "Think first [[ttft=2500]]")
    running = asyncio.create_task(turn.run())
    try:
        reply = await wait_until_async(
            lambda: Message.objects.filter(role=Role.ASSISTANT, conversation__owner=alice).afirst(), "the reply begins"
        )
        begun = reply.heartbeat_at
        assert begun is not None

        async def beat_since() -> bool:
            await reply.arefresh_from_db()
            return reply.heartbeat_at > begun + timedelta(seconds=1)

        await wait_until_async(beat_since, "the reply's heartbeat is stamped again", timeout=10)
        assert turn.report.of(TurnDelta) == [] and reply.status == MessageStatus.STREAMING  # no token yet
    finally:
        await running
    assert isinstance(turn.report.events[-1], TurnCompleted)
    await reply.arefresh_from_db()
    last = reply.heartbeat_at
    await asyncio.sleep(0.6)  # the turn is over: nothing beats any more
    await reply.arefresh_from_db()
    assert reply.heartbeat_at == last and reply.status == MessageStatus.COMPLETE
