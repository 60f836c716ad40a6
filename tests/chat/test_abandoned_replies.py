"""Replies a stopped server left streaming are closed by the beat task, and only those: a reply whose process
stopped stamping its heartbeat, or one from before the heartbeat that is old enough."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from chat.models import Conversation, Message, MessageStatus, Role
from chat.selectors import ConversationBusyError, ConversationReach
from chat.services import chat_turn_begin
from chat.tasks import messages_close_abandoned_task
from tests.factories import UsageRecordFactory, UserFactory

pytestmark = pytest.mark.django_db


def reply(conversation, *, age: timedelta, request_id: str, status=MessageStatus.STREAMING) -> Message:
    message = Message.objects.create(
        conversation=conversation, role=Role.ASSISTANT, content="partial", status=status, request_id=request_id
    )
    Message.objects.filter(pk=message.pk).update(created_at=timezone.now() - age)
    return message


@pytest.mark.period_instants  # ages in hours and seconds, over a midnight, a month's end and a leap day
def test_only_abandoned_streaming_replies_are_closed():
    conversation = Conversation.objects.create(owner=UserFactory(), title="t", model_name="m")
    ancient = reply(conversation, age=timedelta(hours=2), request_id="req_a")
    settled = reply(conversation, age=timedelta(minutes=10), request_id="req_b")
    UsageRecordFactory(request_id="req_b")
    live = reply(conversation, age=timedelta(minutes=10), request_id="req_c")  # still streaming, no ledger row
    fresh = reply(conversation, age=timedelta(seconds=5), request_id="req_d")
    done = reply(conversation, age=timedelta(hours=3), request_id="req_e", status=MessageStatus.COMPLETE)

    assert messages_close_abandoned_task() == 2

    statuses = {m.pk: m.status for m in Message.objects.all()}
    assert statuses[ancient.pk] == statuses[settled.pk] == MessageStatus.CANCELLED
    assert statuses[live.pk] == statuses[fresh.pk] == MessageStatus.STREAMING
    assert statuses[done.pk] == MessageStatus.COMPLETE
    assert Message.objects.get(pk=ancient.pk).content == "partial"


def begin(conversation, content: str = "next"):
    return chat_turn_begin(
        reach=ConversationReach(user_id=conversation.owner_id),
        conversation_id=conversation.pk,
        model_name="m",
        provider_name="p",
        content=content,
        request_id="req_" + content,
    )


@pytest.mark.period_instants
def test_a_streaming_reply_keeps_its_conversation_busy_until_it_is_judged_abandoned():
    """The busy check reads the database (another process's reply counts too), and a reply a crashed server
    left streaming holds its conversation only until ``messages_close_abandoned`` would close it."""
    conversation = Conversation.objects.create(owner=UserFactory(), title="t", model_name="m")
    live = reply(conversation, age=timedelta(minutes=10), request_id="req_live")  # no ledger row: still running

    with pytest.raises(ConversationBusyError) as refused:
        begin(conversation, "refused")
    assert (refused.value.code, refused.value.status_code) == ("conversation_busy", 409)
    assert Message.objects.count() == 1

    UsageRecordFactory(request_id="req_live")  # its run has ended: the server died before finishing the message
    rows = begin(conversation, "accepted")
    live.refresh_from_db()
    assert live.status == MessageStatus.CANCELLED and live.content == "partial"
    assert rows.assistant_message.status == MessageStatus.STREAMING
    with pytest.raises(ConversationBusyError):
        begin(conversation, "refused again")  # the new reply is streaming now


@pytest.mark.period_instants
def test_a_reply_streaming_for_hours_without_a_ledger_row_does_not_lock_its_conversation():
    conversation = Conversation.objects.create(owner=UserFactory(), title="t", model_name="m")
    ancient = reply(conversation, age=timedelta(hours=2), request_id="req_ancient")
    begin(conversation)
    ancient.refresh_from_db()
    assert ancient.status == MessageStatus.CANCELLED


def beating_reply(conversation, *, begun: timedelta, last_beat: timedelta, request_id: str) -> Message:
    """A streaming reply begun ``begun`` ago whose process last stamped its heartbeat ``last_beat`` ago."""
    message = reply(conversation, age=begun, request_id=request_id)
    Message.objects.filter(pk=message.pk).update(heartbeat_at=timezone.now() - last_beat)
    return message


@pytest.mark.period_instants
@override_settings(LLMHUB_CHAT_HEARTBEAT_INTERVAL=10)
def test_a_reply_whose_process_stopped_beating_frees_its_conversation_within_seconds():
    """A server killed mid-reply leaves its reply ``streaming`` with no ledger row (nobody settled it): it
    held the conversation for an hour. Now it is dead once its heartbeat is 4 intervals old (40 s here)."""
    conversation = Conversation.objects.create(owner=UserFactory(), title="t", model_name="m")
    silent = beating_reply(conversation, begun=timedelta(seconds=50), last_beat=timedelta(seconds=39), request_id="r1")

    with pytest.raises(ConversationBusyError):
        begin(conversation, "refused")  # 39 s without a beat: maybe a slow database, still alive

    Message.objects.filter(pk=silent.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=41))
    rows = begin(conversation, "accepted")
    silent.refresh_from_db()
    assert silent.status == MessageStatus.CANCELLED and silent.content == "partial"
    assert rows.assistant_message.status == MessageStatus.STREAMING
    assert rows.assistant_message.heartbeat_at == timezone.now()  # beating from its first write


@pytest.mark.period_instants
@override_settings(LLMHUB_CHAT_HEARTBEAT_INTERVAL=10)
def test_the_sweep_closes_silent_replies_and_leaves_beating_ones_however_long_they_run():
    conversation = Conversation.objects.create(owner=UserFactory(), title="t", model_name="m")
    silent = beating_reply(conversation, begun=timedelta(minutes=2), last_beat=timedelta(minutes=1), request_id="r1")
    # Two hours long and still beating (a slow model, a long reply): alive, with or without its ledger row.
    long = beating_reply(conversation, begun=timedelta(hours=2), last_beat=timedelta(seconds=3), request_id="r2")
    settled = beating_reply(conversation, begun=timedelta(hours=2), last_beat=timedelta(seconds=3), request_id="r3")
    UsageRecordFactory(request_id="r3")

    assert messages_close_abandoned_task() == 1

    statuses = {m.pk: m.status for m in Message.objects.all()}
    assert statuses[silent.pk] == MessageStatus.CANCELLED
    assert statuses[long.pk] == statuses[settled.pk] == MessageStatus.STREAMING


def test_the_sweep_reads_the_streaming_replies_from_their_index_not_every_message():
    """The beat runs the sweep every 5 minutes, and the messages table holds every message ever sent (10 M and
    more, nothing deletes them): it read the whole table each time to find the few replies streaming now. Every
    query it runs on the messages finds them in their partial index (``chat_msg_streaming_idx``); on SQLite and
    on PostgreSQL, told not to read a table whole, as a small table would be."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    conversation = Conversation.objects.create(owner=UserFactory(), title="t", model_name="m")
    Message.objects.bulk_create(
        Message(conversation=conversation, role=Role.USER, content=f"question {n}") for n in range(300)
    )
    reply(conversation, age=timedelta(hours=2), request_id="req_old")
    with CaptureQueriesContext(connection) as captured:
        assert messages_close_abandoned_task() == 1
    sweeps = [q["sql"] for q in captured.captured_queries if '"chat_message"' in q["sql"]]
    assert sweeps
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL enable_seqscan = off")
            explain = "EXPLAIN"
        else:
            explain = "EXPLAIN QUERY PLAN"
        for sql in sweeps:
            cursor.execute(f"{explain} {sql}")
            plan = "\n".join(str(row[-1]) for row in cursor.fetchall())
            assert "chat_msg_streaming_idx" in plan, f"{sql}\n{plan}"
