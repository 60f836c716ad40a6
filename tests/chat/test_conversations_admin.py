"""The conversations' admin at production size: its list reads and counts like the messages' (one row a
chat, millions of them), and a conversation's page shows its latest messages, not thousands."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from chat.models import Conversation, Message
from tests.admin_pages import changelist_page
from tests.factories import ModelFactory, UserFactory

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:chat_conversation_changelist")


def listed(client: Client, **params: str) -> tuple[list[str], list[str], str]:
    """The titles the list shows, the SQL of every query that read the conversations, and the page."""
    page = changelist_page(client, CHANGELIST, "chat_conversation", params)
    return [c.title for c in page.rows], page.reads, page.html


@pytest.fixture
def chats() -> list[Conversation]:
    ModelFactory(name="gpt-east")
    alice = UserFactory(username="alice", email="alice@example.com")
    bob = UserFactory(username="bob")
    return [
        Conversation.objects.create(owner=alice, title="trip", model_name="gpt-east"),
        Conversation.objects.create(owner=bob, title="bob's alice plans", model_name="old-model"),
        Conversation.objects.create(owner=alice, title="recipes", model_name="gpt-east"),
    ]


def test_the_list_is_newest_first_off_the_primary_key_with_one_count_and_no_distinct(admin_client, chats):
    shown, reads, page = listed(admin_client)

    assert shown == ["recipes", "bob's alice plans", "trip"]
    listing = next(sql for sql in reads if "ORDER BY" in sql)
    assert 'ORDER BY "chat_conversation"."id" DESC' in listing
    assert len([sql for sql in reads if "COUNT(" in sql]) == 1
    assert not [sql for sql in reads if "DISTINCT" in sql], reads
    assert 'href="?model_name=gpt-east"' in page  # the catalog's models, not every conversation's
    assert listed(admin_client, model_name="old-model")[0] == ["bob's alice plans"]


def test_the_search_names_a_user_or_a_conversation_whole(admin_client, chats):
    shown, reads, _ = listed(admin_client, q=" ALICE@example.com ")
    assert shown == ["recipes", "trip"]  # not bob's, whose title mentions alice
    assert not [sql for sql in reads if "LIKE" in sql], reads
    assert listed(admin_client, q="alice")[0] == ["recipes", "trip"]
    assert listed(admin_client, q=str(chats[1].pk))[0] == ["bob's alice plans"]
    assert listed(admin_client, q="ali")[0] == []


def test_a_long_conversation_shows_its_latest_messages_and_links_to_all(admin_client, chats):
    conversation = chats[0]
    for number in range(60):
        Message.objects.create(conversation=conversation, role="user", content=f"message {number:02}")

    response = admin_client.get(reverse("admin:chat_conversation_change", args=[conversation.pk]))
    assert response.status_code == 200
    formset = next(f for f in response.context["inline_admin_formsets"] if f.formset.model is Message)
    contents = [form.instance.content for form in formset.formset.forms]
    assert contents == [f"message {number:02}" for number in range(10, 60)]  # the latest 50, oldest first
    page = response.content.decode()
    assert "60 (the latest 50 are below)" in page
    all_url = reverse("admin:chat_message_changelist") + f"?conversation__id__exact={conversation.pk}"
    assert all_url.replace("&", "&amp;") in page
    everything = admin_client.get(all_url)
    assert everything.status_code == 200 and len(everything.context["cl"].result_list) == 60

    short = chats[2]
    Message.objects.create(conversation=short, role="user", content="hello")
    page = admin_client.get(reverse("admin:chat_conversation_change", args=[short.pk])).content.decode()
    assert "1 (all are below)" in page


def test_the_delete_page_of_conversations_costs_the_same_queries_however_many_messages(admin_client, chats):
    """A conversation's delete page and the delete of several lists the first 100 messages and counts the rest
    (Django's read and rendered every message); the same queries for 3 messages as for 3,000."""
    conversation = chats[0]
    url = reverse("admin:chat_conversation_delete", args=[conversation.pk])

    def page():
        with CaptureQueriesContext(connection) as queries:
            response = admin_client.get(url)
        assert response.status_code == 200 and not response.context["protected"]
        return response, len(queries)

    Message.objects.bulk_create(Message(conversation=conversation, role="user", content=f"m{n}") for n in range(3))
    page()  # the first view fills Django's caches (content types): not counted
    _, few = page()
    Message.objects.bulk_create(Message(conversation=conversation, role="user", content=f"m{n}") for n in range(2_997))
    response, many = page()
    assert many == few
    assert dict(response.context["model_count"]) == {"conversations": 1, "messages": 3_000}
    assert "… and 2900 more messages" in response.content.decode()

    selected = {"action": "delete_selected", "_selected_action": [chat.pk for chat in chats], "post": "yes"}
    assert admin_client.post(CHANGELIST, selected).status_code == 302
    assert not Conversation.objects.exists() and not Message.objects.exists()
