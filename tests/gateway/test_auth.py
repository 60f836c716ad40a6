"""Gateway key authentication on /v1: every way a key can be wrong, and both header styles."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from billing.models import ApiKey
from billing.services.keys import api_key_create, api_key_revoke, hash_key

pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def post(gateway, headers):
    return httpx.post(gateway.url + "/v1/chat/completions", json=BODY, headers=headers, timeout=20)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer not-a-llmhub-key"},
        {"Authorization": "Bearer sk-llmhub-aaaaaaaa-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"},
        {"x-api-key": "sk-llmhub-aaaaaaaa-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"},
    ],
)
def test_missing_malformed_or_wrong_keys_get_401_in_openai_shape(gateway, headers):
    response = post(gateway, headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] in ("invalid_api_key", "missing_api_key")
    assert response.headers["x-request-id"].startswith("req_")
    assert gateway.upstream.stats["requests"] == 0


def test_both_header_styles_work(gateway):
    assert post(gateway, {"Authorization": f"Bearer {gateway.key}"}).status_code == 200
    assert post(gateway, {"x-api-key": gateway.key}).status_code == 200


def test_revoked_key_stops_working_at_once(gateway):
    headers = {"Authorization": f"Bearer {gateway.key}"}
    assert post(gateway, headers).status_code == 200  # now cached
    api_key_revoke(api_key=ApiKey.objects.get(pk=gateway.api_key.pk))
    response = post(gateway, headers)
    assert response.status_code == 401


@pytest.mark.period_instants  # pinned: the key's one second of validity cannot run out during the first call
def test_expired_key_is_refused(gateway):
    created = api_key_create(user=gateway.user, name="old", expires_at=timezone.now() + timedelta(seconds=1))
    headers = {"Authorization": f"Bearer {created.secret}"}
    assert post(gateway, headers).status_code == 200
    ApiKey.objects.filter(pk=created.api_key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    from billing.services.keys import key_cache

    key_cache.invalidate()
    response = post(gateway, headers)
    assert response.status_code == 401 and response.json()["error"]["code"] == "expired_api_key"


def test_only_the_hash_of_a_key_is_stored(gateway):
    row = ApiKey.objects.get(pk=gateway.api_key.pk)
    assert row.secret_hash == hash_key(gateway.key)
    assert gateway.key not in repr(row.__dict__)


def test_key_allow_list_limits_models(gateway):
    from providers.models import CatalogModel

    restricted = api_key_create(user=gateway.user, name="restricted")
    restricted.api_key.allowed_models.add(CatalogModel.objects.get(name="claude-test"))
    headers = {"Authorization": f"Bearer {restricted.secret}"}
    response = post(gateway, headers)
    # Answered as a model that does not exist (tests/gateway/test_model_access.py).
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    listed = httpx.get(gateway.url + "/v1/models", headers=headers).json()
    assert [m["id"] for m in listed["data"]] == ["claude-test"]
