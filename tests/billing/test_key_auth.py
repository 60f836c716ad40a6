"""Gateway-key authentication on the management API: who gets in, who gets a 401 in OpenAI's shape,
how fast a change to a key takes effect, and that the database never holds a secret."""

from __future__ import annotations

import hashlib
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from billing.models import ApiKey
from billing.services.keys import api_key_authenticate_sync, api_key_create
from tests.factories import ModelFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def created():
    # keys:manage: these tests authenticate against /api/keys/, which other keys are refused (403).
    return api_key_create(user=UserFactory(username="alice"), name="tests", scopes=["keys:manage"])


def get_keys(**headers):
    return APIClient().get("/api/keys/", **headers)


def assert_401(response) -> dict:
    assert response.status_code == 401, response.content
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert response["WWW-Authenticate"] == 'Bearer realm="llmhub"'
    return body["error"]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda secret: {"HTTP_AUTHORIZATION": f"Bearer {secret}"}, id="bearer"),
        pytest.param(lambda secret: {"HTTP_AUTHORIZATION": f"bearer {secret}"}, id="bearer-lowercase"),
        pytest.param(lambda secret: {"HTTP_X_API_KEY": secret}, id="x-api-key"),
    ],
)
def test_a_valid_key_is_accepted_in_either_header(created, headers):
    response = get_keys(**headers(created.secret))

    assert response.status_code == 200
    assert response.json()["results"][0]["prefix"] == created.api_key.prefix


def test_missing_key_is_401():
    assert_401(get_keys())


@pytest.mark.parametrize(
    "raw",
    ["not-a-key", "sk-llmhub-short", "sk-proj-" + "a" * 40, "sk-llmhub-" + "ü" * 40, "sk-llmhub-" + "a" * 200],
)
def test_malformed_key_is_401(raw):
    error = assert_401(get_keys(HTTP_AUTHORIZATION=f"Bearer {raw}"))
    assert raw not in error["message"]


def test_wrong_key_is_401_and_the_message_does_not_echo_it(created):
    wrong = created.secret[:-6] + "zzzzzz"

    for headers in ({"HTTP_AUTHORIZATION": f"Bearer {wrong}"}, {"HTTP_X_API_KEY": wrong}):
        error = assert_401(get_keys(**headers))
        assert wrong not in error["message"]
        assert wrong[-32:] not in error["message"]


def test_revoked_key_is_401(created):
    created.api_key.revoked_at = timezone.now()
    created.api_key.save()

    assert_401(get_keys(HTTP_AUTHORIZATION=f"Bearer {created.secret}"))


@pytest.mark.period_instants
def test_expired_key_is_401(created):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {created.secret}"}
    assert get_keys(**headers).status_code == 200

    ApiKey.objects.filter(pk=created.api_key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    created.api_key.refresh_from_db()
    created.api_key.save()  # as the admin would: the save signal drops the cached copy

    error = assert_401(get_keys(**headers))
    assert "expired" in error["message"]


@pytest.mark.period_instants
def test_a_key_expires_at_its_expiry_instant(created):
    """Valid up to the microsecond before ``expires_at``, refused from that instant on (the clock is pinned)."""
    headers = {"HTTP_AUTHORIZATION": f"Bearer {created.secret}"}
    for expires_in, status in ((timedelta(microseconds=1), 200), (timedelta(0), 401)):
        created.api_key.expires_at = timezone.now() + expires_in
        created.api_key.save()  # the save signal drops the cached copy
        assert get_keys(**headers).status_code == status, expires_in


def test_a_key_of_a_deactivated_user_is_refused_at_once(created):
    headers = {"HTTP_X_API_KEY": created.secret}
    assert get_keys(**headers).status_code == 200

    user = created.api_key.user
    user.is_active = False
    user.save()

    assert_401(get_keys(**headers))


def test_an_edit_made_without_signals_reaches_the_cache_within_the_ttl(created, settings):
    """What another process sees: no invalidation reaches it, only the TTL bounds the staleness."""
    settings.LLMHUB_LOOKUP_CACHE_TTL = 0.3
    headers = {"HTTP_AUTHORIZATION": f"Bearer {created.secret}"}
    assert get_keys(**headers).status_code == 200

    ApiKey.objects.filter(pk=created.api_key.pk).update(revoked_at=timezone.now())  # .update() sends no signal
    assert get_keys(**headers).status_code == 200  # still cached here, as in any other process
    time.sleep(0.4)

    assert_401(get_keys(**headers))


def test_a_changed_allow_list_is_seen_at_once(created):
    model = ModelFactory(name="gpt-only")
    assert api_key_authenticate_sync(created.secret).allowed_model_ids is None

    created.api_key.allowed_models.add(model)

    assert api_key_authenticate_sync(created.secret).allowed_model_ids == frozenset({model.pk})


def test_the_database_holds_only_the_sha256_of_the_secret(created):
    assert created.api_key.secret_hash == hashlib.sha256(created.secret.encode()).hexdigest()
    random_part = created.secret.rsplit("-", 1)[1]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {ApiKey._meta.db_table}")
        stored = [str(value) for row in cursor.fetchall() for value in row]
    assert created.api_key.secret_hash in stored
    assert not any(random_part in value for value in stored)
    assert created.secret not in repr(created.api_key) and created.secret not in str(created.api_key)
    assert random_part not in repr(created)


def test_a_key_whose_owner_was_deleted_meanwhile_is_a_401_not_a_500(created):
    """Another process still holds the key in its lookup cache (for LLMHUB_LOOKUP_CACHE_TTL) after the owner
    and their keys were deleted: the management API answers 401, as for any key that no longer works."""
    from billing.services.keys import hash_key, key_cache

    digest = hash_key(created.secret)
    principal = api_key_authenticate_sync(created.secret)
    created.api_key.user.delete()
    key_cache.set(digest, principal)  # what another process's cache still holds

    error = assert_401(APIClient().get("/api/usage/", HTTP_AUTHORIZATION=f"Bearer {created.secret}"))
    assert created.secret not in error["message"]


def test_a_key_whose_owner_was_deactivated_by_another_process_stops_on_the_management_api(created):
    """Deactivation reached this process's database but not its key cache (no signal here): the management
    API checks the owner at each request, as it does for a JWT's user."""
    assert get_keys(HTTP_AUTHORIZATION=f"Bearer {created.secret}").status_code == 200
    type(created.api_key.user).objects.filter(pk=created.api_key.user_id).update(is_active=False)

    assert_401(get_keys(HTTP_AUTHORIZATION=f"Bearer {created.secret}"))
