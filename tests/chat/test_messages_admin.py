"""The chat messages' admin list at production size (two rows a chat turn: the fastest-growing table after the
ledger). The timings behind each rule are in docs/ledger.md ("The admin at scale")."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from chat.models import Conversation, Message
from tests.admin_pages import changelist_page
from tests.factories import ModelFactory, UserFactory

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:chat_message_changelist")


def messages_page(client: Client, **params: str) -> tuple[list[str], list[str], str]:
    """The contents the list shows, the SQL of every query that read the messages for it, and the page."""
    page = changelist_page(client, CHANGELIST, "chat_message", params)
    return [m.content for m in page.rows], page.reads, page.html


@pytest.fixture
def chat() -> list[Message]:
    ModelFactory(name="gpt-east")
    ModelFactory(name="idle-model")
    conversation = Conversation.objects.create(owner=UserFactory(), title="trip")
    return [
        Message.objects.create(conversation=conversation, role="user", content="first", model_name="gpt-east"),
        Message.objects.create(
            conversation=conversation, role="assistant", content="second", model_name="gpt-east", request_id="req-2"
        ),
        Message.objects.create(conversation=conversation, role="user", content="third", model_name="old-model"),
    ]


def test_the_list_shows_the_newest_first_off_the_primary_key_with_one_count_and_no_distinct(admin_client, chat):
    shown, reads, page = messages_page(admin_client)

    assert shown == ["third", "second", "first"]
    listing = next(sql for sql in reads if "ORDER BY" in sql)
    assert 'ORDER BY "chat_message"."id" DESC' in listing  # the primary key: no sort of every row
    assert len([sql for sql in reads if "COUNT(" in sql]) == 1  # not a second one for "N total"
    assert not [sql for sql in reads if "DISTINCT" in sql], reads
    # The model filter offers the catalog's models; a name gone from it is still a filter in the address.
    assert 'href="?model_name=idle-model"' in page
    assert messages_page(admin_client, model_name="gpt-east")[0] == ["second", "first"]
    assert messages_page(admin_client, model_name="old-model")[0] == ["third"]


def test_the_search_looks_a_request_id_up_in_its_index(admin_client, chat):
    shown, reads, page = messages_page(admin_client, q=" req-2 ")

    assert shown == ["second"]
    assert not [sql for sql in reads if "LIKE" in sql], reads
    assert messages_page(admin_client, q="second")[0] == []  # no search of the text: it read every message
    assert "request id" in page  # the search box says what it looks up
