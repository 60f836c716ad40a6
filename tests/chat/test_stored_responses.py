"""Stored responses of ``/v1/responses`` in the database: who keeps them when a key or a user is deleted (as their
conversations), the retention task's batches, and the admin, which shows them read-only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.services.keys import api_key_create
from chat.models import StoredResponse
from chat.selectors import ConversationReach, NotFoundError, stored_response_get
from chat.services_responses import stored_response_save, stored_responses_expire
from chat.tasks import stored_responses_expire_task
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def stored(user, key=None, *, number: int = 1, now: datetime = NOW) -> StoredResponse:
    response = {
        "id": f"resp_{number}",
        "object": "response",
        "created_at": int(now.timestamp()),
        "status": "completed",
        "model": "gpt-test",
        "instructions": None,
        "output": [],
        "store": True,
    }
    return stored_response_save(
        user_id=user.pk, api_key_id=key.pk if key else None, response=response, input="private words", now=now
    )


def test_a_deleted_key_leaves_its_responses_to_their_owner_and_a_deleted_user_takes_them(settings):
    user = UserFactory()
    key = api_key_create(user=user, name="app").api_key
    kept = stored(user, key)
    key.delete()
    kept.refresh_from_db()
    assert kept.api_key_id is None
    with time_machine.travel(NOW, tick=False):
        assert stored_response_get(reach=ConversationReach(user_id=user.pk), response_id="resp_1") == kept
        with pytest.raises(NotFoundError):  # no other key reaches what a deleted key made, as for conversations
            other = api_key_create(user=user, name="other").api_key
            stored_response_get(
                reach=ConversationReach(user_id=user.pk, key_id=other.pk, whole_history=False), response_id="resp_1"
            )
    user.delete()
    assert not StoredResponse.objects.exists()


def test_the_task_deletes_the_expired_ones_in_batches_and_keeps_the_rest(settings):
    settings.LLMHUB_RESPONSES_RETENTION_DAYS = 30
    user = UserFactory()
    for number in range(5):
        stored(user, number=number, now=NOW - timedelta(days=31))
    fresh = stored(user, number=9, now=NOW - timedelta(days=29))
    with time_machine.travel(NOW, tick=False):
        assert stored_responses_expire(batch_size=2) == 5
        assert stored_responses_expire_task() == 0
    assert list(StoredResponse.objects.all()) == [fresh]


def test_the_admin_shows_them_read_only_and_finds_one_by_its_id(admin_client):
    response = stored(UserFactory(username="alice"))
    changelist = reverse("admin:chat_storedresponse_changelist")
    found = admin_client.get(changelist, {"q": " resp_1 "})
    assert found.status_code == 200 and list(found.context["cl"].result_list) == [response]
    assert list(admin_client.get(changelist, {"q": "alice"}).context["cl"].result_list) == [response]
    assert list(admin_client.get(changelist, {"q": "private"}).context["cl"].result_list) == []
    page = admin_client.get(reverse("admin:chat_storedresponse_change", args=[response.pk]))
    assert page.status_code == 200 and "private words" in page.content.decode()
    assert 'name="_save"' not in page.content.decode()
    assert admin_client.get(reverse("admin:chat_storedresponse_add")).status_code == 403


def test_the_admin_list_reads_no_stored_conversation(admin_client):
    """The list shows ids, owners, models and dates; it read every column of its 100 rows, each response's whole
    input with it (a chain's every turn, its images as data URLs: megabytes a row). Its own page shows them."""
    response = stored(UserFactory(username="alice"))
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(reverse("admin:chat_storedresponse_changelist"))
    assert page.status_code == 200 and "resp_1" in page.content.decode()
    read = [query["sql"] for query in queries if 'FROM "chat_storedresponse"' in query["sql"]]
    assert read and not any(column in sql for sql in read for column in ('"input_items"', '"output_items"'))
    page = admin_client.get(reverse("admin:chat_storedresponse_change", args=[response.pk]))
    assert "private words" in page.content.decode()


def test_the_admin_lists_its_status_filter_without_reading_the_table(admin_client):
    """The status filter's choices came from a SELECT DISTINCT over every stored response (no index): on each load of
    the list. The statuses a stored response can have are two; the filter still filters."""
    kept = stored(UserFactory(username="alice"))
    changelist = reverse("admin:chat_storedresponse_changelist")
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(changelist)
    assert page.status_code == 200 and "incomplete" in page.content.decode()
    assert not [query["sql"] for query in queries if "DISTINCT" in query["sql"]]
    assert list(admin_client.get(changelist, {"status": "completed"}).context["cl"].result_list) == [kept]
    assert list(admin_client.get(changelist, {"status": "incomplete"}).context["cl"].result_list) == []
