"""/api/keys/: a user creates, lists, reads and revokes their own gateway keys, and nobody else's."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from billing.models import ApiKey
from billing.services.keys import api_key_create, hash_key
from tests.factories import ModelFactory, UserFactory

pytestmark = pytest.mark.django_db

KEY_FIELDS = {
    "id",
    "name",
    "prefix",
    "created_at",
    "last_used_at",
    "expires_at",
    "revoked_at",
    "is_active",
    "allowed_models",
    "budget_usd",
    "budget_period",
    "rpm",
    "tpm",
    "scopes",
    "parent",
}


@pytest.fixture
def alice():
    return UserFactory(username="alice")


@pytest.fixture
def client(alice) -> APIClient:
    """Alice, signed in through the web session."""
    client = APIClient()
    client.force_login(alice)
    return client


def key_client(secret: str, header: str = "authorization") -> APIClient:
    client = APIClient()
    if header == "authorization":
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    else:
        client.credentials(HTTP_X_API_KEY=secret)
    return client


def assert_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    return error


def test_create_shows_the_secret_once_and_stores_only_its_hash(client):
    response = client.post("/api/keys/", {"name": "laptop"}, format="json")

    assert response.status_code == 201
    body = response.json()
    secret = body["secret"]
    assert set(body) == KEY_FIELDS | {"secret"}
    assert (
        secret.startswith("sk-llmhub-") and secret.startswith(body["prefix"]) and len(secret) > len(body["prefix"]) + 20
    )
    assert body["name"] == "laptop" and body["is_active"] is True and body["revoked_at"] is None
    assert body["allowed_models"] == []

    row = ApiKey.objects.get(pk=body["id"])
    assert row.secret_hash == hash_key(secret)
    for later in (client.get("/api/keys/"), client.get(f"/api/keys/{body['id']}/")):
        assert later.status_code == 200
        assert secret not in later.content.decode()
        assert row.secret_hash not in later.content.decode()
        assert "secret" not in later.content.decode()


def test_the_created_secret_is_a_working_key(client):
    secret = client.post("/api/keys/", {"name": "ci", "scopes": ["keys:manage"]}, format="json").json()["secret"]

    response = key_client(secret).get("/api/keys/")

    assert response.status_code == 200
    assert [key["name"] for key in response.json()["results"]] == ["ci"]
    assert response.json()["results"][0]["scopes"] == ["keys:manage"]


def test_a_session_sets_the_keys_own_limits(client):
    response = client.post(
        "/api/keys/",
        {"name": "capped", "budget_usd": "2.5", "budget_period": "daily", "rpm": 10, "tpm": 1000},
        format="json",
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["budget_usd"], body["budget_period"], body["rpm"], body["tpm"]) == ("2.5000", "daily", 10, 1000)
    assert body["scopes"] == [] and body["parent"] is None
    row = ApiKey.objects.get(pk=body["id"])
    assert (str(row.budget_usd), row.budget_period, row.rpm, row.tpm) == ("2.5000", "daily", 10, 1000)


def test_create_with_expiry_and_allowed_models(client):
    ModelFactory(name="gpt-a")
    ModelFactory(name="gpt-b")
    expires_at = (timezone.now() + timedelta(days=30)).replace(microsecond=0)

    response = client.post(
        "/api/keys/",
        {"name": "scoped", "expires_at": expires_at.isoformat(), "allowed_models": ["gpt-b", "gpt-a"]},
        format="json",
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["allowed_models"] == ["gpt-a", "gpt-b"]
    row = ApiKey.objects.get(pk=body["id"])
    assert row.expires_at == expires_at
    assert sorted(row.allowed_models.values_list("name", flat=True)) == ["gpt-a", "gpt-b"]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"expires_at": "next tuesday"}, "expires_at"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"allowed_models": ["no-such-model"]}, "allowed_models"),
        ({"allowed_models": ["switched-off"]}, "allowed_models"),
        ({"allowed_models": "gpt-a"}, "allowed_models"),
        ({"scopes": ["keys:everything"]}, "scopes.0"),  # the item at fault, as for any other index
        ({"budget_usd": "-1"}, "budget_usd"),
        ({"budget_period": "weekly"}, "budget_period"),
        ({"rpm": 0}, "rpm"),
    ],
)
def test_create_rejects_bad_input_naming_the_param(client, payload, param):
    ModelFactory(name="gpt-a")
    ModelFactory(name="switched-off", enabled=False)

    response = client.post("/api/keys/", payload, format="json")

    error = assert_error(response, 400, param)
    assert error["type"] == "invalid_request_error"
    assert not ApiKey.objects.exists()


def test_list_shows_own_keys_newest_first_with_prefixes_only(client, alice):
    first = api_key_create(user=alice, name="first")
    second = api_key_create(user=alice, name="second")
    api_key_create(user=UserFactory(username="bob"), name="bobs")

    response = client.get("/api/keys/")

    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 2
    assert [key["name"] for key in body["results"]] == ["second", "first"]
    assert [key["prefix"] for key in body["results"]] == [second.api_key.prefix, first.api_key.prefix]
    assert all(set(key) == KEY_FIELDS for key in body["results"])
    text = response.content.decode()
    assert first.secret not in text and second.secret not in text


def test_list_is_paginated(client, alice):
    for n in range(3):
        api_key_create(user=alice, name=f"key-{n}")

    body = client.get("/api/keys/", {"limit": 2, "offset": 2}).json()

    assert body["count"] == 3
    assert [key["name"] for key in body["results"]] == ["key-0"]


def test_revoke_marks_the_key_and_keeps_the_first_revocation_time(client, alice):
    created = api_key_create(user=alice, name="old")

    response = client.post(f"/api/keys/{created.api_key.pk}/revoke/")

    assert response.status_code == 200
    body = response.json()
    assert body["revoked_at"] is not None and body["is_active"] is False
    again = client.post(f"/api/keys/{created.api_key.pk}/revoke/").json()
    assert again["revoked_at"] == body["revoked_at"]
    assert client.get(f"/api/keys/{created.api_key.pk}/").json()["revoked_at"] == body["revoked_at"]


def test_a_revoked_key_is_refused_at_once(client, alice):
    created = api_key_create(user=alice, name="leaked", scopes=["keys:manage"])
    with_key = key_client(created.secret)
    assert with_key.get("/api/keys/").status_code == 200  # the key is now in this process's cache

    assert client.post(f"/api/keys/{created.api_key.pk}/revoke/").status_code == 200

    error = assert_error(with_key.get("/api/keys/"), 401)
    assert error["code"] == "invalid_api_key"
    assert created.secret not in error["message"]


def test_a_managing_key_can_revoke_itself(alice):
    created = api_key_create(user=alice, name="self", scopes=["keys:manage"])
    with_key = key_client(created.secret, header="x-api-key")

    assert with_key.post(f"/api/keys/{created.api_key.pk}/revoke/").status_code == 200

    assert_error(with_key.get("/api/keys/"), 401)


def test_delete_revokes_and_keeps_the_key_listed(client, alice):
    created = api_key_create(user=alice, name="gone", scopes=["keys:manage"])
    assert key_client(created.secret).get("/api/keys/").status_code == 200

    response = client.delete(f"/api/keys/{created.api_key.pk}/")

    assert response.status_code == 200
    assert response.json()["revoked_at"] is not None
    assert [key["is_active"] for key in client.get("/api/keys/").json()["results"]] == [False]
    assert_error(key_client(created.secret).get("/api/keys/"), 401)


def test_another_users_key_is_indistinguishable_from_a_missing_one(client):
    bobs = api_key_create(user=UserFactory(username="bob"), name="bobs", scopes=["keys:manage"])
    missing_id = bobs.api_key.pk + 1000

    for method, suffix in (("get", ""), ("delete", ""), ("post", "revoke/")):
        theirs = getattr(client, method)(f"/api/keys/{bobs.api_key.pk}/{suffix}")
        missing = getattr(client, method)(f"/api/keys/{missing_id}/{suffix}")
        assert_error(theirs, 404)
        assert theirs.json() == missing.json()

    assert ApiKey.objects.get(pk=bobs.api_key.pk).revoked_at is None
    assert key_client(bobs.secret).get("/api/keys/").status_code == 200
    assert client.get("/api/keys/").json()["count"] == 0


def test_an_absurd_key_id_is_404(client):
    assert_error(client.get(f"/api/keys/{10**30}/"), 404)


def test_anonymous_callers_get_401_in_openai_shape():
    response = APIClient().get("/api/keys/")

    error = assert_error(response, 401)
    assert error["code"] == "invalid_api_key"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert_error(APIClient().post("/api/keys/", {"name": "x"}, format="json"), 401)
