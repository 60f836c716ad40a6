"""REST for conversations and feedback: own rows only, OpenAI-shaped errors, CSRF for the session."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from billing.models import KeyScope, UsageStatus
from billing.services.keys import api_key_create
from chat.models import Conversation, Message, MessageStatus, Role
from experiments.models import Feedback
from tests.factories import UsageRecordFactory, UserFactory

pytestmark = pytest.mark.django_db


def conversation_with_reply(owner, title: str = "Trip to Lisbon") -> tuple[Conversation, Message]:
    conversation = Conversation.objects.create(owner=owner, title=title, model_name="gpt-test")
    Message.objects.create(conversation=conversation, role=Role.USER, content="Plan a trip")
    reply = Message.objects.create(
        conversation=conversation,
        role=Role.ASSISTANT,
        content="Day 1: **Alfama**",
        reasoning="A short trip: the old town first.",
        model_name="gpt-test",
        provider_name="fake-openai",
        request_id="req_1",
        status=MessageStatus.COMPLETE,
    )
    return conversation, reply


@pytest.fixture
def alice():
    return UserFactory()


@pytest.fixture
def client(alice) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    return client


def csrf(client: Client) -> dict[str, str]:
    """The token the page's JavaScript sends back: a page render sets the cookie."""
    client.get("/")
    return {"HTTP_X_CSRFTOKEN": client.cookies["csrftoken"].value}


def test_list_is_own_unarchived_newest_first_and_paginated(client, alice):
    conversation_with_reply(alice, "older")
    conversation_with_reply(alice, "newer")
    archived, _ = conversation_with_reply(alice, "archived")
    Conversation.objects.filter(pk=archived.pk).update(archived=True)
    conversation_with_reply(UserFactory(), "someone else's")

    response = client.get("/api/conversations/")
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 2
    assert [c["title"] for c in body["results"]] == ["newer", "older"]
    assert set(body["results"][0]) == {"id", "title", "model", "archived", "created_at", "updated_at"}

    page = client.get("/api/conversations/?limit=1&offset=1").json()
    assert [c["title"] for c in page["results"]] == ["older"]
    assert page["previous"] is not None


def test_retrieve_has_the_messages(client, alice):
    conversation, reply = conversation_with_reply(alice)
    body = client.get(f"/api/conversations/{conversation.pk}/").json()
    assert body["title"] == "Trip to Lisbon"
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("user", "Plan a trip"),
        ("assistant", "Day 1: **Alfama**"),
    ]
    assert body["messages"][1]["id"] == reply.pk
    assert body["messages"][1]["provider"] == "fake-openai"
    assert body["messages"][1]["status"] == "complete"
    assert [m["reasoning"] for m in body["messages"]] == ["", "A short trip: the old town first."]


def test_rename_and_delete(client, alice):
    conversation, _ = conversation_with_reply(alice)
    headers = csrf(client)
    response = client.patch(
        f"/api/conversations/{conversation.pk}/",
        {"title": "  Lisbon, 3 days  "},
        content_type="application/json",
        **headers,
    )
    assert response.status_code == 200
    assert response.json()["title"] == "Lisbon, 3 days"
    conversation.refresh_from_db()
    assert conversation.title == "Lisbon, 3 days"

    response = client.delete(f"/api/conversations/{conversation.pk}/", **headers)
    assert response.status_code == 204
    assert not Conversation.objects.filter(pk=conversation.pk).exists()
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()


def test_invalid_rename_is_a_400_in_the_openai_shape(client, alice):
    conversation, _ = conversation_with_reply(alice)
    response = client.patch(
        f"/api/conversations/{conversation.pk}/", {"title": "x" * 201}, content_type="application/json", **csrf(client)
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "title" and error["code"] == "invalid_value"
    conversation.refresh_from_db()
    assert conversation.title == "Trip to Lisbon"


def test_writes_without_the_csrf_token_are_refused(client, alice):
    conversation, _ = conversation_with_reply(alice)
    response = client.delete(f"/api/conversations/{conversation.pk}/")
    assert response.status_code == 403
    assert Conversation.objects.filter(pk=conversation.pk).exists()


def test_feedback_on_a_reply(client, alice):
    _, reply = conversation_with_reply(alice)
    headers = csrf(client)
    url = f"/api/messages/{reply.pk}/feedback/"
    response = client.post(url, {"value": -1, "comment": "wrong city"}, content_type="application/json", **headers)
    assert response.status_code == 200
    assert response.json()["feedback"] == -1
    reply.refresh_from_db()
    assert (reply.feedback, reply.feedback_comment) == (-1, "wrong city")

    client.post(url, {"value": None}, content_type="application/json", **headers)
    reply.refresh_from_db()
    assert (reply.feedback, reply.feedback_comment) == (None, "")

    bad = client.post(url, {"value": 5}, content_type="application/json", **headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "value"


def test_the_thumbs_are_the_requests_feedback_record(client, alice):
    """The same ``experiments.Feedback`` record as ``POST /v1/feedback`` writes, which results count."""
    _, reply = conversation_with_reply(alice)
    headers = csrf(client)
    url = f"/api/messages/{reply.pk}/feedback/"

    client.post(url, {"value": -1, "comment": "wrong city"}, content_type="application/json", **headers)
    down = Feedback.objects.get()
    client.post(url, {"value": 1}, content_type="application/json", **headers)
    up = Feedback.objects.get()

    assert (down.request_id, down.user_id, down.metric, down.value, down.comment, down.source) == (
        "req_1",
        alice.pk,
        "thumbs",
        -1.0,
        "wrong city",
        "chat",
    )
    assert (up.pk, up.value, up.comment) == (down.pk, 1.0, "")

    client.post(url, {"value": None}, content_type="application/json", **headers)
    assert not Feedback.objects.exists()


def test_thumbs_on_a_reply_without_a_request_record_no_feedback(client, alice):
    """A reply saved without a request id (none was made) has nothing to attach a record to."""
    _, reply = conversation_with_reply(alice)
    Message.objects.filter(pk=reply.pk).update(request_id="")
    response = client.post(
        f"/api/messages/{reply.pk}/feedback/", {"value": 1}, content_type="application/json", **csrf(client)
    )
    assert response.status_code == 200 and response.json()["feedback"] == 1
    assert not Feedback.objects.exists()


def test_feedback_on_the_users_own_message_is_refused(client, alice):
    conversation, _ = conversation_with_reply(alice)
    question = conversation.messages.get(role=Role.USER)
    response = client.post(
        f"/api/messages/{question.pk}/feedback/", {"value": 1}, content_type="application/json", **csrf(client)
    )
    assert response.status_code == 400
    question.refresh_from_db()
    assert question.feedback is None


def test_another_users_rows_answer_404_like_missing_ones(client):
    mallory_conversation, mallory_reply = conversation_with_reply(UserFactory(), "private")
    headers = csrf(client)
    missing = client.get("/api/conversations/999999/")
    assert missing.status_code == 404
    attempts = [
        client.get(f"/api/conversations/{mallory_conversation.pk}/"),
        client.patch(
            f"/api/conversations/{mallory_conversation.pk}/",
            {"title": "mine"},
            content_type="application/json",
            **headers,
        ),
        client.delete(f"/api/conversations/{mallory_conversation.pk}/", **headers),
        client.post(
            f"/api/messages/{mallory_reply.pk}/feedback/", {"value": 1}, content_type="application/json", **headers
        ),
    ]
    for response in attempts:
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    mallory_conversation.refresh_from_db()
    mallory_reply.refresh_from_db()
    assert mallory_conversation.title == "private"
    assert mallory_reply.feedback is None
    assert not Feedback.objects.exists()


def test_anonymous_requests_are_refused():
    response = Client().get("/api/conversations/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_an_api_key_with_the_conversations_scope_reads_its_owners_conversations(alice):
    """Without the scope a key reaches only the conversations it started (test_conversation_reach.py)."""
    conversation_with_reply(alice, "from a script")
    created = api_key_create(user=alice, name="script", scopes=[KeyScope.CONVERSATIONS])
    response = Client().get("/api/conversations/", HTTP_AUTHORIZATION=f"Bearer {created.secret}")
    assert response.status_code == 200
    assert [c["title"] for c in response.json()["results"]] == ["from a script"]


def test_pages_need_a_login(client):
    anonymous = Client()
    for path in ("/", "/keys/", "/c/1/"):
        response = anonymous.get(path)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")
    page = client.get("/")
    assert page.status_code == 200
    assert b'id="model-picker"' in page.content
    assert client.get("/keys/").status_code == 200


def test_admin_shows_conversations_and_messages(admin_client, alice):
    conversation, reply = conversation_with_reply(alice)
    for url in (
        "/admin/chat/conversation/",
        f"/admin/chat/conversation/{conversation.pk}/change/",
        "/admin/chat/message/?status=complete",
        f"/admin/chat/message/{reply.pk}/change/",
    ):
        response = admin_client.get(url)
        assert response.status_code == 200, url
    assert b"Trip to Lisbon" in admin_client.get("/admin/chat/conversation/").content


def reply_billed(conversation, request_id: str, message_status: str, **ledger) -> Message:
    """A reply and, with ``ledger`` figures, its ledger row (without them: the row is not written yet)."""
    Message.objects.create(conversation=conversation, role=Role.USER, content="Go on")
    reply = Message.objects.create(
        conversation=conversation,
        role=Role.ASSISTANT,
        content="More",
        request_id=request_id,
        usage_record_id=request_id,
        status=message_status,
    )
    if ledger:
        UsageRecordFactory(request_id=request_id, user=conversation.owner, **ledger)
    return reply


def test_retrieve_has_each_replys_usage_from_its_ledger_row(client, alice, django_assert_num_queries):
    conversation = Conversation.objects.create(owner=alice, title="Billing", model_name="gpt-test")
    reply_billed(
        conversation, "req_done", MessageStatus.COMPLETE, prompt_tokens=12, completion_tokens=30, cost="0.0042"
    )
    reply_billed(
        conversation,
        "req_stopped",
        MessageStatus.CANCELLED,
        prompt_tokens=40,
        completion_tokens=7,
        cost="0.0001",
        usage_estimated=True,
        status=UsageStatus.CANCELLED,
    )
    reply_billed(conversation, "req_not_yet", MessageStatus.COMPLETE)

    body = client.get(f"/api/conversations/{conversation.pk}/").json()
    usages = [(m["role"], m["usage"]) for m in body["messages"]]
    assert usages == [
        ("user", None),
        ("assistant", {"prompt_tokens": 12, "completion_tokens": 30, "cost": "0.0042000000", "estimated": False}),
        ("user", None),
        ("assistant", {"prompt_tokens": 40, "completion_tokens": 7, "cost": "0.0001000000", "estimated": True}),
        ("user", None),
        ("assistant", None),
    ]

    # The ledger rows come with the messages, in one query however many replies there are.
    with CaptureQueriesContext(connection) as three_replies:
        client.get(f"/api/conversations/{conversation.pk}/")
    for n in range(5):
        reply_billed(conversation, f"req_more_{n}", MessageStatus.COMPLETE, cost="0.001")
    with django_assert_num_queries(len(three_replies)):
        body = client.get(f"/api/conversations/{conversation.pk}/").json()
    assert sum(m["usage"] is not None for m in body["messages"]) == 7


def test_feedback_answers_with_the_replys_usage(client, alice):
    conversation = Conversation.objects.create(owner=alice, title="Billing", model_name="gpt-test")
    reply = reply_billed(conversation, "req_voted", MessageStatus.COMPLETE, prompt_tokens=3, completion_tokens=4)
    response = client.post(
        f"/api/messages/{reply.pk}/feedback/", {"value": 1}, content_type="application/json", **csrf(client)
    )
    assert response.json()["usage"]["completion_tokens"] == 4


def test_the_list_pages_by_keyset_past_the_newest(client, alice, django_assert_num_queries):
    """The chat page lists the newest 100 conversations: older ones had no way to be reached but offsets, which
    skip or repeat conversations as replies move them to the top. ``before_updated_at`` and ``before_id`` (the
    last listed one's) list those after it in the list's order, in as many queries however far back."""
    conversations = [Conversation.objects.create(owner=alice, title=f"c{n}", model_name="gpt-test") for n in range(5)]
    # Two share an instant: the id breaks the tie, as in the list's order.
    same = conversations[1].updated_at
    Conversation.objects.filter(pk=conversations[2].pk).update(updated_at=same)

    first = client.get("/api/conversations/?limit=2").json()
    titles = [c["title"] for c in first["results"]]
    assert titles == ["c4", "c3"]
    seen = list(titles)
    last = first["results"][-1]
    for _ in range(5):
        page = client.get(
            "/api/conversations/", {"limit": 2, "before_updated_at": last["updated_at"], "before_id": last["id"]}
        ).json()
        seen += [c["title"] for c in page["results"]]
        if page["next"] is None:
            break
        last = page["results"][-1]
    assert seen == ["c4", "c3", "c2", "c1", "c0"]

    def queries_for(cursor: Conversation) -> int:
        with CaptureQueriesContext(connection) as queries:
            response = client.get(
                "/api/conversations/",
                {"limit": 100, "before_updated_at": cursor.updated_at.isoformat(), "before_id": cursor.pk},
            )
        assert response.status_code == 200
        return len(queries)

    few = queries_for(conversations[3])
    for n in range(30):
        Conversation.objects.create(owner=alice, title=f"more {n}", model_name="gpt-test")
    newest = Conversation.objects.filter(owner=alice).order_by("-updated_at", "-id").first()
    with django_assert_num_queries(few):
        queries_for(newest)


@pytest.mark.parametrize(
    "params",
    [
        {"before_updated_at": "yesterday", "before_id": 1},
        {"before_updated_at": "2026-12-06T09:00:00Z"},
        {"before_updated_at": "2026-12-06T09:00:00Z", "before_id": "x"},
    ],
)
def test_a_bad_keyset_cursor_is_a_400(client, params):
    response = client.get("/api/conversations/", params)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["type"] == "invalid_request_error"
