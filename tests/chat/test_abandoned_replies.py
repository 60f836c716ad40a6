"""Replies a stopped server left streaming are closed by the beat task, and only those."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from chat.models import Conversation, Message, MessageStatus, Role
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
