"""Which of a user's conversations a gateway key reaches.

A key handed to an app reaches only the conversations it started itself, unless it holds the
``conversations:manage`` scope; a person (web session, JWT) reaches all of theirs. The same rule on REST
(list, read, rename, delete, feedback) and on the WebSocket (sending into a conversation); a conversation
out of reach answers 404 (``not_found`` on the socket), exactly like a missing one."""

from __future__ import annotations

import jwt
import pytest
from asgiref.sync import sync_to_async
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import ExternalIdentity
from billing.models import ApiKey, KeyScope, UsageRecord
from billing.services.keys import api_key_change, api_key_create
from billing.services.ledger import ledger_flush
from chat.models import Conversation, Message, MessageStatus, Role
from tests.chat.conftest import deltas, ends, events_until
from tests.factories import UserFactory

CONVERSATIONS = KeyScope.CONVERSATIONS.value


def conversation_with_reply(owner, title: str, api_key: ApiKey | None = None) -> tuple[Conversation, Message]:
    """A conversation as the socket leaves it: started by ``api_key``, or by its owner (None)."""
    conversation = Conversation.objects.create(owner=owner, api_key=api_key, title=title, model_name="gpt-test")
    Message.objects.create(conversation=conversation, role=Role.USER, content="A private question")
    reply = Message.objects.create(
        conversation=conversation,
        role=Role.ASSISTANT,
        content="A private answer",
        request_id=f"req_{title}",
        status=MessageStatus.COMPLETE,
    )
    return conversation, reply


def key_client(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def listed(client) -> list[str]:
    response = client.get("/api/conversations/")
    assert response.status_code == 200, response.content
    return sorted(c["title"] for c in response.json()["results"])


def attempts(client, conversation: Conversation, reply: Message) -> list:
    """Every REST request on one conversation; each either reaches it or answers 404."""
    return [
        client.get(f"/api/conversations/{conversation.pk}/"),
        client.patch(f"/api/conversations/{conversation.pk}/", {"title": "renamed"}, format="json"),
        client.post(f"/api/messages/{reply.pk}/feedback/", {"value": -1}, format="json"),
        client.delete(f"/api/conversations/{conversation.pk}/"),
    ]


@pytest.fixture
def alice(db):
    return UserFactory()


@pytest.mark.django_db
def test_a_key_without_the_scope_reaches_only_the_conversations_it_started(alice):
    app = api_key_create(user=alice, name="app")
    other = api_key_create(user=alice, name="other app")
    personal, personal_reply = conversation_with_reply(alice, "personal")
    others, others_reply = conversation_with_reply(alice, "other app's", api_key=other.api_key)
    mine, mine_reply = conversation_with_reply(alice, "the app's", api_key=app.api_key)
    client = key_client(app.secret)

    assert listed(client) == ["the app's"]
    for conversation, reply in ((personal, personal_reply), (others, others_reply)):
        for response in attempts(client, conversation, reply):
            assert response.status_code == 404, response.content
            error = response.json()["error"]
            assert error["code"] == "not_found" and "private" not in response.content.decode()
        conversation.refresh_from_db()
        reply.refresh_from_db()
        assert conversation.title != "renamed" and reply.feedback is None

    reached = attempts(client, mine, mine_reply)
    assert [r.status_code for r in reached] == [200, 200, 200, 204]
    assert reached[0].json()["messages"][0]["content"] == "A private question"
    assert reached[1].json()["title"] == "renamed"
    assert reached[2].json()["feedback"] == -1
    assert not Conversation.objects.filter(pk=mine.pk).exists()


@pytest.mark.django_db
def test_a_key_reaches_the_conversations_of_the_keys_created_under_it(alice):
    """Without the scope, a key reaches what it and its subtree (the keys created under it, at any depth,
    the subtree ``keys:manage`` manages) started; a child does not reach its parent's, nor a sibling's."""
    parent = api_key_create(user=alice, name="parent", scopes=[KeyScope.KEYS_MANAGE])
    created = key_client(parent.secret).post("/api/keys/", {"name": "child", "scopes": ["keys:manage"]}, format="json")
    assert created.status_code == 201, created.content
    child_secret = created.json()["secret"]
    created = key_client(child_secret).post("/api/keys/", {"name": "grandchild"}, format="json")
    assert created.status_code == 201, created.content
    child, grandchild = ApiKey.objects.get(name="child"), ApiKey.objects.get(name="grandchild")
    other = api_key_create(user=alice, name="other app")
    conversation_with_reply(alice, "the parent's", api_key=parent.api_key)
    childs, childs_reply = conversation_with_reply(alice, "the child's", api_key=child)
    conversation_with_reply(alice, "the grandchild's", api_key=grandchild)
    conversation_with_reply(alice, "other app's", api_key=other.api_key)
    conversation_with_reply(alice, "personal")

    assert listed(key_client(parent.secret)) == ["the child's", "the grandchild's", "the parent's"]
    assert listed(key_client(child_secret)) == ["the child's", "the grandchild's"]
    assert listed(key_client(created.json()["secret"])) == ["the grandchild's"]
    reached = attempts(key_client(parent.secret), childs, childs_reply)
    assert [r.status_code for r in reached] == [200, 200, 200, 204], [r.content for r in reached]
    assert reached[0].json()["messages"][1]["content"] == "A private answer"


@pytest.mark.django_db
def test_a_key_with_the_scope_reaches_all_of_its_owners_conversations(alice):
    reader = api_key_create(user=alice, name="assistant", scopes=[CONVERSATIONS])
    other = api_key_create(user=alice, name="other app")
    personal, personal_reply = conversation_with_reply(alice, "personal")
    conversation_with_reply(alice, "other app's", api_key=other.api_key)
    conversation_with_reply(UserFactory(), "someone else's")
    client = key_client(reader.secret)

    assert listed(client) == ["other app's", "personal"]
    assert [r.status_code for r in attempts(client, personal, personal_reply)] == [200, 200, 200, 204]


@pytest.mark.django_db
def test_a_person_reaches_every_conversation_of_theirs_whichever_key_started_it(alice):
    app = api_key_create(user=alice, name="app")
    started, reply = conversation_with_reply(alice, "the app's", api_key=app.api_key)
    conversation_with_reply(alice, "personal")
    client = Client()
    client.force_login(alice)

    assert listed(client) == ["personal", "the app's"]
    response = client.post(f"/api/messages/{reply.pk}/feedback/", {"value": 1}, content_type="application/json")
    assert response.status_code == 200
    assert client.delete(f"/api/conversations/{started.pk}/").status_code == 204


@pytest.mark.django_db
def test_a_jwt_user_reaches_every_conversation_of_theirs(settings):
    settings.LLMHUB_JWT_HS256_SECRET = secret = "a-shared-secret-for-hs256-of-32+-bytes-0123456789"
    settings.LLMHUB_JWT_ISSUER, settings.LLMHUB_JWT_AUDIENCE = "https://idp.test.example", "llmhub-tests"
    settings.LLMHUB_JWT_ALGORITHMS = ["HS256"]
    claims = {"iss": "https://idp.test.example", "aud": "llmhub-tests", "sub": "ada-1", "exp": 4_000_000_000}
    client = key_client(jwt.encode(claims, secret, algorithm="HS256"))
    assert listed(client) == []  # the first token creates the user
    ada = ExternalIdentity.objects.get(subject="ada-1").user
    app = api_key_create(user=ada, name="app")
    conversation_with_reply(ada, "the app's", api_key=app.api_key)
    conversation_with_reply(ada, "personal")

    assert listed(client) == ["personal", "the app's"]


@pytest.mark.django_db
def test_a_child_key_gets_the_scope_only_from_a_parent_that_holds_it(alice):
    plain = api_key_create(user=alice, name="plain", scopes=[KeyScope.KEYS_MANAGE])
    refused = key_client(plain.secret).post("/api/keys/", {"name": "escape", "scopes": [CONVERSATIONS]}, format="json")
    assert refused.status_code == 400, refused.content
    assert refused.json()["error"]["param"] == "scopes"

    parent = api_key_create(user=alice, name="parent", scopes=[KeyScope.KEYS_MANAGE, CONVERSATIONS])
    parents, _ = conversation_with_reply(alice, "the parent's", api_key=parent.api_key)
    conversation_with_reply(alice, "personal")
    narrow = key_client(parent.secret).post("/api/keys/", {"name": "narrow"}, format="json")
    wide = key_client(parent.secret).post("/api/keys/", {"name": "wide", "scopes": [CONVERSATIONS]}, format="json")
    assert (narrow.status_code, wide.status_code) == (201, 201), (narrow.content, wide.content)
    assert wide.json()["scopes"] == [CONVERSATIONS]

    assert listed(key_client(narrow.json()["secret"])) == []
    assert key_client(narrow.json()["secret"]).get(f"/api/conversations/{parents.pk}/").status_code == 404
    assert listed(key_client(wide.json()["secret"])) == ["personal", "the parent's"]


@pytest.mark.django_db
def test_the_scope_taken_from_a_parent_is_taken_from_its_children(alice):
    parent = api_key_create(user=alice, name="parent", scopes=[KeyScope.KEYS_MANAGE, CONVERSATIONS])
    conversation_with_reply(alice, "personal")
    child = key_client(parent.secret).post("/api/keys/", {"name": "child", "scopes": [CONVERSATIONS]}, format="json")
    as_child = key_client(child.json()["secret"])
    assert listed(as_child) == ["personal"]

    parent.api_key.scopes = [KeyScope.KEYS_MANAGE.value]
    api_key_change(api_key=parent.api_key)

    assert listed(as_child) == []


@pytest.mark.django_db
def test_the_scope_is_offered_and_given_on_the_keys_api(alice):
    client = Client()
    client.force_login(alice)
    response = client.post(
        "/api/keys/", {"name": "assistant", "scopes": [CONVERSATIONS]}, content_type="application/json"
    )
    assert response.status_code == 201, response.content
    assert ApiKey.objects.get(name="assistant").scopes == [CONVERSATIONS]
    schema = client.get("/api/schema/", {"format": "json"}).json()
    assert CONVERSATIONS in str(schema["components"]["schemas"])


@pytest.mark.django_db
def test_a_deleted_keys_conversations_stay_their_owners(alice):
    app = api_key_create(user=alice, name="app")
    started, _ = conversation_with_reply(alice, "the app's", api_key=app.api_key)
    app.api_key.delete()

    started.refresh_from_db()
    assert started.api_key_id is None
    client = Client()
    client.force_login(alice)
    assert listed(client) == ["the app's"]


# THE WEBSOCKET


async def key_socket(socket_for, secret: str):
    ws = await socket_for(None)
    await ws.send_json_to({"type": "auth", "api_key": secret})
    assert await ws.receive_json_from(timeout=5) == {"type": "auth.ok"}
    return ws


async def send(ws, model, request_id: str, conversation: int | None, content: str = "Hello there") -> list[dict]:
    await ws.send_json_to(
        {
            "type": "chat.send",
            "conversation": conversation,
            "model": model.name,
            "content": content,
            "request_id": request_id,
        }
    )
    return await events_until(ws, ends(request_id))


@pytest.mark.django_db(transaction=True)
async def test_a_key_socket_continues_only_the_conversations_it_started(alice, chat_model, socket_for):
    app = await sync_to_async(api_key_create)(user=alice, name="app")
    personal, _ = await sync_to_async(conversation_with_reply)(alice, "personal")
    ws = await key_socket(socket_for, app.secret)

    events = await send(ws, chat_model, "new", None)
    assert events[-1]["type"] == "chat.completed", events[-1]
    started = await Conversation.objects.aget(pk=events[0]["conversation"])
    assert started.api_key_id == app.api_key.pk

    again = await send(ws, chat_model, "again", started.pk, content="And again")
    assert again[-1]["type"] == "chat.completed" and deltas(again, "again") == "Echo: And again"

    refused = await send(ws, chat_model, "into-personal", personal.pk)
    assert [(e["type"], e["code"]) for e in refused] == [("error", "not_found")]
    assert "private" not in refused[0]["message"]
    assert await Message.objects.filter(conversation=personal).acount() == 2
    await ledger_flush()
    rejected = await UsageRecord.objects.aget(api_key=app.api_key, status="rejected")
    assert rejected.error_type == "not_found"


@pytest.mark.django_db(transaction=True)
async def test_a_parents_socket_continues_what_its_child_started_and_not_the_reverse(alice, chat_model, socket_for):
    parent = await sync_to_async(api_key_create)(user=alice, name="parent", scopes=[KeyScope.KEYS_MANAGE])
    child = await sync_to_async(api_key_create)(user=alice, name="child", parent=parent.api_key)
    as_child = await key_socket(socket_for, child.secret)
    started = await send(as_child, chat_model, "by-child", None)
    assert started[-1]["type"] == "chat.completed", started[-1]
    childs = started[0]["conversation"]
    as_parent = await key_socket(socket_for, parent.secret)
    started = await send(as_parent, chat_model, "by-parent", None)
    parents = started[0]["conversation"]

    continued = await send(as_parent, chat_model, "into-childs", childs, content="From the parent")
    assert continued[-1]["type"] == "chat.completed", continued[-1]
    assert deltas(continued, "into-childs") == "Echo: From the parent"
    refused = await send(as_child, chat_model, "into-parents", parents)
    assert [(e["type"], e["code"]) for e in refused] == [("error", "not_found")]
    assert [c.api_key_id async for c in Conversation.objects.order_by("pk")] == [child.api_key.pk, parent.api_key.pk]


@pytest.mark.django_db(transaction=True)
async def test_a_socket_of_a_key_with_the_scope_or_of_a_person_continues_any(alice, chat_model, socket_for):
    reader = await sync_to_async(api_key_create)(user=alice, name="assistant", scopes=[CONVERSATIONS])
    app = await sync_to_async(api_key_create)(user=alice, name="app")
    personal, _ = await sync_to_async(conversation_with_reply)(alice, "personal")
    apps, _ = await sync_to_async(conversation_with_reply)(alice, "the app's", api_key=app.api_key)

    ws = await key_socket(socket_for, reader.secret)
    events = await send(ws, chat_model, "into-personal", personal.pk)
    assert events[-1]["type"] == "chat.completed", events[-1]

    session = await socket_for(alice)
    events = await send(session, chat_model, "into-apps", apps.pk)
    assert events[-1]["type"] == "chat.completed", events[-1]
    # Continued by others, the conversations keep who started them.
    assert [c.api_key_id async for c in Conversation.objects.order_by("pk")] == [None, app.api_key.pk]


@pytest.mark.django_db(transaction=True)
async def test_a_scope_taken_away_reaches_the_open_socket(alice, chat_model, socket_for):
    reader = await sync_to_async(api_key_create)(user=alice, name="assistant", scopes=[CONVERSATIONS])
    personal, _ = await sync_to_async(conversation_with_reply)(alice, "personal")
    ws = await key_socket(socket_for, reader.secret)
    assert (await send(ws, chat_model, "before", personal.pk))[-1]["type"] == "chat.completed"

    reader.api_key.scopes = []
    await sync_to_async(api_key_change)(api_key=reader.api_key)

    refused = await send(ws, chat_model, "after", personal.pk)
    assert [(e["type"], e["code"]) for e in refused] == [("error", "not_found")]
