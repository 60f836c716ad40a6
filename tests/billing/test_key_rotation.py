"""Rotating a gateway key: a new secret, the old one kept for a grace period and then refused with 401
(from the cached lookup too), only the newest previous secret kept, both stopped by a revoke; the REST
endpoint with the access rules of the other key endpoints, the admin action, and the audit events of a
key's create / rotate / revoke / delete.

Grace periods are crossed by moving this process's clock (time_machine); the lookup cache runs on the
monotonic clock, which does not move, so a principal cached before the move is what answers after it."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from audit.models import AuditEvent
from audit.services import audit_verify
from billing.models import ApiKey, KeyScope
from billing.services.keys import (
    api_key_create,
    api_key_delete,
    api_key_revoke,
    api_key_rotate,
    api_key_status,
    hash_key,
)
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 6, 10, 12, 0, 0, tzinfo=UTC)
SECRET = re.compile(r"sk-llmhub-[A-Za-z0-9]+-[A-Za-z0-9]+")


@pytest.fixture
def clock():
    with time_machine.travel(NOW, tick=False) as traveller:
        yield traveller


@pytest.fixture
def alice():
    return UserFactory(username="alice")


@pytest.fixture
def session(alice) -> APIClient:
    client = APIClient()
    client.force_login(alice)
    return client


def key_client(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def answer(secret: str):
    """What a request with this secret gets (an endpoint any working key may call)."""
    return key_client(secret).get("/api/usage/summary/")


def works(secret: str) -> bool:
    response = answer(secret)
    assert response.status_code in (200, 401), response.content
    return response.status_code == 200


# THE SERVICE AND THE LOOKUP


def test_the_old_secret_works_for_the_grace_period_then_gets_401(clock, alice):
    created = api_key_create(user=alice, name="laptop")
    assert works(created.secret)  # cached before the rotation

    rotated = api_key_rotate(api_key=created.api_key, grace_seconds=3600)

    assert rotated.secret != created.secret and rotated.api_key.pk == created.api_key.pk
    assert works(created.secret) and works(rotated.secret)
    row = ApiKey.objects.get(pk=created.api_key.pk)
    assert row.secret_hash == hash_key(rotated.secret) and row.previous_secret_hash == hash_key(created.secret)
    assert row.previous_secret_expires_at == NOW + timedelta(hours=1) and row.rotated_at == NOW

    clock.move_to(NOW + timedelta(minutes=59, seconds=59))
    assert works(created.secret)  # the cached principal, still in its grace period
    clock.move_to(NOW + timedelta(hours=1))
    response = answer(created.secret)  # the same cached principal: it carries the end of the grace
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert "rotated" in response.json()["error"]["message"]
    assert created.secret not in response.content.decode()
    assert works(rotated.secret)


def test_the_default_grace_period_is_the_setting(clock, alice, settings):
    settings.LLMHUB_KEY_ROTATION_GRACE_SECONDS = 600
    created = api_key_create(user=alice)

    rotated = api_key_rotate(api_key=created.api_key)

    assert rotated.api_key.previous_secret_expires_at == NOW + timedelta(seconds=600)
    clock.move_to(NOW + timedelta(seconds=599))
    assert works(created.secret)
    clock.move_to(NOW + timedelta(seconds=600))
    assert not works(created.secret)


def test_a_grace_of_zero_stops_the_old_secret_at_once_even_when_cached(alice):
    created = api_key_create(user=alice)
    assert works(created.secret)

    rotated = api_key_rotate(api_key=created.api_key, grace_seconds=0)

    assert not works(created.secret)
    assert works(rotated.secret)
    row = ApiKey.objects.get(pk=created.api_key.pk)
    assert row.previous_secret_hash is None and row.previous_secret_expires_at is None


def test_rotating_twice_keeps_only_the_newest_previous_secret(clock, alice):
    first = api_key_create(user=alice)
    second = api_key_rotate(api_key=first.api_key, grace_seconds=3600)
    assert works(first.secret) and works(second.secret)

    clock.move_to(NOW + timedelta(minutes=10))
    third = api_key_rotate(api_key=first.api_key, grace_seconds=3600)

    assert not works(first.secret)  # its grace had 50 minutes left: a second rotation ends it
    assert works(second.secret) and works(third.secret)
    clock.move_to(NOW + timedelta(minutes=69, seconds=59))
    assert works(second.secret)  # its own grace runs from the second rotation
    clock.move_to(NOW + timedelta(minutes=70))
    assert not works(second.secret)
    assert works(third.secret)


def test_revoking_stops_both_secrets_at_once(alice):
    created = api_key_create(user=alice)
    rotated = api_key_rotate(api_key=created.api_key, grace_seconds=3600)
    assert works(created.secret) and works(rotated.secret)  # both cached

    api_key_revoke(api_key=ApiKey.objects.get(pk=created.api_key.pk))

    assert not works(created.secret)
    assert not works(rotated.secret)


def test_a_revoked_or_expired_key_is_not_rotated(clock, alice):
    revoked = api_key_revoke(api_key=api_key_create(user=alice, name="revoked").api_key)
    expiring = api_key_create(user=alice, name="expiring", expires_at=NOW + timedelta(minutes=1))
    clock.move_to(NOW + timedelta(minutes=2))

    for api_key in (revoked, expiring.api_key):
        before = ApiKey.objects.get(pk=api_key.pk).secret_hash
        with pytest.raises(Exception, match="cannot be rotated"):
            api_key_rotate(api_key=api_key)
        assert ApiKey.objects.get(pk=api_key.pk).secret_hash == before


def test_the_prefix_changes_and_child_keys_keep_working(alice):
    parent = api_key_create(user=alice, name="parent", scopes=[KeyScope.KEYS_MANAGE])
    child = api_key_create(user=alice, name="child", parent=parent.api_key)

    rotated = api_key_rotate(api_key=parent.api_key, grace_seconds=0)

    assert rotated.api_key.prefix != parent.api_key.prefix
    assert rotated.secret.startswith(rotated.api_key.prefix + "-")
    assert works(child.secret)  # a rotation is not a revocation: the keys below are untouched
    assert ApiKey.objects.get(pk=child.api_key.pk).parent_id == parent.api_key.pk


def test_a_websocket_holding_the_old_secret_sees_it_expire(clock, alice):
    created = api_key_create(user=alice)
    api_key_rotate(api_key=created.api_key, grace_seconds=60)
    digest = hash_key(created.secret)

    assert async_to_sync(api_key_status)(digest) == "active"
    clock.move_to(NOW + timedelta(seconds=60))
    assert async_to_sync(api_key_status)(digest) == "expired"


# REST: POST /api/keys/{id}/rotate/


def test_rotate_endpoint_answers_the_new_secret_once(clock, session, alice):
    created = api_key_create(user=alice, name="ci")

    response = session.post(f"/api/keys/{created.api_key.pk}/rotate/", {"grace_seconds": 120}, format="json")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == created.api_key.pk and body["name"] == "ci"
    assert body["secret"].startswith(body["prefix"] + "-") and body["secret"] != created.secret
    assert body["rotated_at"] == "2026-06-10T12:00:00Z"
    assert body["previous_secret_expires_at"] == "2026-06-10T12:02:00Z"
    assert works(body["secret"]) and works(created.secret)
    listed = session.get(f"/api/keys/{created.api_key.pk}/").content.decode()
    assert body["secret"] not in listed and created.secret not in listed and body["prefix"] in listed


def test_rotate_endpoint_defaults_to_24_hours_and_validates_the_grace(clock, session, alice):
    created = api_key_create(user=alice)
    url = f"/api/keys/{created.api_key.pk}/rotate/"

    for bad in (-1, 31 * 86400, "soon"):
        response = session.post(url, {"grace_seconds": bad}, format="json")
        assert response.status_code == 400, response.content
        assert response.json()["error"]["param"] == "grace_seconds"
    assert ApiKey.objects.get(pk=created.api_key.pk).rotated_at is None

    response = session.post(url, format="json")
    assert response.status_code == 200
    assert response.json()["previous_secret_expires_at"] == "2026-06-11T12:00:00Z"


def test_rotate_endpoint_follows_the_key_access_rules(session, alice):
    bob_key = api_key_create(user=UserFactory(username="bob")).api_key
    manager = api_key_create(user=alice, name="manager", scopes=[KeyScope.KEYS_MANAGE])
    child = api_key_create(user=alice, name="child", parent=manager.api_key)
    sibling = api_key_create(user=alice, name="sibling")
    plain = api_key_create(user=alice, name="plain")
    revoked = api_key_revoke(api_key=api_key_create(user=alice, name="gone").api_key)

    def rotate(client: APIClient, api_key: ApiKey):
        return client.post(f"/api/keys/{api_key.pk}/rotate/", {"grace_seconds": 60}, format="json")

    assert rotate(session, bob_key).status_code == 404  # another user's key is not there
    assert rotate(key_client(plain.secret), plain.api_key).status_code == 403  # no keys:manage scope
    assert rotate(key_client(manager.secret), sibling.api_key).status_code == 404  # outside its subtree
    assert rotate(key_client(manager.secret), child.api_key).status_code == 200
    assert rotate(session, revoked).status_code == 400
    assert rotate(APIClient(), sibling.api_key).status_code in (401, 403)
    # A managing key may rotate itself; its old secret, still in its grace period, goes on working.
    response = rotate(key_client(manager.secret), manager.api_key)
    assert response.status_code == 200
    assert key_client(manager.secret).get("/api/keys/").status_code == 200
    assert key_client(response.json()["secret"]).get("/api/keys/").status_code == 200
    assert ApiKey.objects.get(pk=sibling.api_key.pk).rotated_at is None


def test_a_replaced_secret_may_not_mint_new_secrets_during_its_grace(clock, alice):
    """A leaked managing key is rotated by its owner; the leaked secret, in its grace period, must not undo
    that: neither rotate the key again (which would end the owner's new secret and hand the holder one that
    never expires) nor create a child key (which would outlive the grace). It still works for what clients
    do while they switch: calling models, reading."""
    manager = api_key_create(user=alice, name="manager", scopes=[KeyScope.KEYS_MANAGE])
    owners = api_key_rotate(api_key=manager.api_key, grace_seconds=3600)
    leaked = key_client(manager.secret)

    response = leaked.post(f"/api/keys/{manager.api_key.pk}/rotate/", {"grace_seconds": 0}, format="json")
    assert response.status_code == 403, response.content
    assert "replaced" in response.json()["error"]["message"]
    assert manager.secret not in response.content.decode()
    response = leaked.post("/api/keys/", {"name": "persist"}, format="json")
    assert response.status_code == 403, response.content
    assert not ApiKey.objects.filter(name="persist").exists()

    assert works(owners.secret)  # the owner's rotation stands
    assert ApiKey.objects.get(pk=manager.api_key.pk).secret_hash == hash_key(owners.secret)
    assert leaked.get("/api/keys/").status_code == 200 and works(manager.secret)
    # The new secret mints as before.
    assert key_client(owners.secret).post("/api/keys/", {"name": "child"}, format="json").status_code == 201


def test_a_replaced_secret_may_not_revoke_keys_nor_touch_the_owners_provider_keys_during_its_grace(clock, alice):
    """The rule above holds for every key-management endpoint, not only those that mint: the leaked secret may
    not revoke the owner's keys (its own, rotated because of the leak, or a child) nor add, replace, rename,
    delete or re-check the owner's provider keys. Reading them still works while clients switch."""
    from providers.models import Provider, ProviderCredential

    manager = api_key_create(user=alice, name="manager", scopes=[KeyScope.KEYS_MANAGE])
    child = api_key_create(user=alice, name="child", parent=manager.api_key)
    provider = Provider.objects.create(name="byok", kind="openai", base_url="http://127.0.0.1:9/v1")
    credential = ProviderCredential.objects.create(owner=alice, provider=provider, label="mine")
    owners = api_key_rotate(api_key=manager.api_key, grace_seconds=3600)
    leaked = key_client(manager.secret)

    refused = [
        leaked.delete(f"/api/keys/{manager.api_key.pk}/"),
        leaked.post(f"/api/keys/{manager.api_key.pk}/revoke/"),
        leaked.post(f"/api/keys/{child.api_key.pk}/revoke/"),
        leaked.post("/api/provider-keys/", {"provider": "byok", "api_key": "sk-" + "x" * 40}, format="json"),
        leaked.patch(f"/api/provider-keys/{credential.pk}/", {"label": "gone"}, format="json"),
        leaked.delete(f"/api/provider-keys/{credential.pk}/"),
        leaked.post(f"/api/provider-keys/{credential.pk}/validate/"),
    ]
    for response in refused:
        assert response.status_code == 403, (response.request["PATH_INFO"], response.content)
        assert "replaced" in response.json()["error"]["message"]
        assert manager.secret not in response.content.decode()

    assert ApiKey.objects.filter(revoked_at__isnull=False).count() == 0
    assert ProviderCredential.objects.get(pk=credential.pk).label == "mine"
    assert works(owners.secret) and works(child.secret) and works(manager.secret)
    assert leaked.get("/api/keys/").status_code == 200
    assert leaked.get(f"/api/provider-keys/{credential.pk}/").status_code == 200
    # The new secret manages as before.
    assert key_client(owners.secret).post(f"/api/keys/{child.api_key.pk}/revoke/").status_code == 200
    assert (
        key_client(owners.secret)
        .patch(f"/api/provider-keys/{credential.pk}/", {"label": "renamed"}, format="json")
        .status_code
        == 200
    )


# ADMIN


@pytest.fixture
def admin_client() -> Client:
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw-for-tests-123"))
    return client


def test_admin_action_rotates_and_shows_each_new_secret_once(clock, admin_client, alice, settings):
    settings.LLMHUB_KEY_ROTATION_GRACE_SECONDS = 300
    chosen = [api_key_create(user=alice, name=f"chosen-{n}") for n in range(2)]
    other = api_key_create(user=alice, name="other")

    response = admin_client.post(
        reverse("admin:billing_apikey_changelist"),
        {"action": "rotate_selected", "_selected_action": [created.api_key.pk for created in chosen]},
        follow=True,
    )

    assert response.status_code == 200
    shown = [SECRET.findall(m.message) for m in get_messages(response.wsgi_request)]
    secrets = [secret for found in shown for secret in found]
    assert len(secrets) == 2
    assert {hash_key(secret) for secret in secrets} == {
        ApiKey.objects.get(pk=created.api_key.pk).secret_hash for created in chosen
    }
    assert all(works(secret) for secret in secrets)
    assert all(works(created.secret) for created in chosen)  # their grace period
    assert ApiKey.objects.get(pk=other.api_key.pk).rotated_at is None
    clock.move_to(NOW + timedelta(seconds=300))
    assert not any(works(created.secret) for created in chosen)
    page = admin_client.get(reverse("admin:billing_apikey_change", args=[chosen[0].api_key.pk])).content.decode()
    assert not any(secret in page for secret in secrets)


# AUDIT: one event per action, with no secret and no hash in it


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("seq"))


def assert_no_secret(event: AuditEvent, *secrets: str) -> None:
    text = repr(event.changes) + event.target_repr
    for secret in secrets:
        assert secret not in text and hash_key(secret) not in text and secret[-32:] not in text


def test_creating_a_key_records_key_create(alice):
    created = api_key_create(user=alice, name="audited", scopes=[KeyScope.KEYS_MANAGE])

    [event] = events("key.create")
    assert (event.target_type, event.target_id) == ("billing.apikey", str(created.api_key.pk))
    assert event.changes["prefix"] == [None, created.api_key.prefix]
    assert event.changes["name"] == [None, "audited"] and event.changes["scopes"] == [None, ["keys:manage"]]
    assert_no_secret(event, created.secret)
    assert audit_verify() is None


def test_rotating_a_key_records_key_rotate_with_the_session_user(clock, session, alice):
    created = api_key_create(user=alice)

    response = session.post(f"/api/keys/{created.api_key.pk}/rotate/", {"grace_seconds": 60}, format="json")

    [event] = events("key.rotate")
    assert event.target_id == str(created.api_key.pk)
    assert event.changes["prefix"] == [created.api_key.prefix, response.json()["prefix"]]
    assert event.changes["grace_until"] == [None, (NOW + timedelta(seconds=60)).isoformat()]
    assert (event.actor_type, event.actor_id) == ("user", str(alice.pk))
    assert_no_secret(event, created.secret, response.json()["secret"])


def test_revoking_a_key_records_key_revoke_once(alice):
    created = api_key_create(user=alice)

    api_key_revoke(api_key=created.api_key)
    api_key_revoke(api_key=created.api_key)  # harmless, and no second event

    [event] = events("key.revoke")
    assert event.target_id == str(created.api_key.pk) and event.changes["revoked_at"][0] is None
    assert_no_secret(event, created.secret)


def test_deleting_a_key_records_key_delete_and_stops_both_secrets(admin_client, alice):
    created = api_key_create(user=alice, name="doomed", scopes=[KeyScope.KEYS_MANAGE])
    child = api_key_create(user=alice, name="below", parent=created.api_key)
    rotated = api_key_rotate(api_key=created.api_key, grace_seconds=3600)
    assert works(created.secret) and works(rotated.secret)

    response = admin_client.post(
        reverse("admin:billing_apikey_delete", args=[created.api_key.pk]), {"post": "yes"}, follow=True
    )

    assert response.status_code == 200
    assert not ApiKey.objects.filter(pk__in=[created.api_key.pk, child.api_key.pk]).exists()
    [event] = events("key.delete")
    assert event.target_id == str(created.api_key.pk)
    assert event.changes == {"prefix": [rotated.api_key.prefix, None], "keys_below": [[child.api_key.prefix], []]}
    assert event.actor_type == "user" and event.actor_repr == "root"
    assert_no_secret(event, created.secret, rotated.secret)
    assert not works(created.secret) and not works(rotated.secret) and not works(child.secret)


def test_deleting_through_the_service_is_audited_too(alice):
    created = api_key_create(user=alice)
    key_id = created.api_key.pk

    api_key_delete(api_key=created.api_key)

    assert [event.target_id for event in events("key.delete")] == [str(key_id)]
    assert not ApiKey.objects.exists()
    assert audit_verify() is None


def test_a_rotation_by_a_managing_key_is_attributed_to_that_key(alice):
    manager = api_key_create(user=alice, name="manager", scopes=[KeyScope.KEYS_MANAGE])
    child = api_key_create(user=alice, name="child", parent=manager.api_key)

    response = key_client(manager.secret).post(f"/api/keys/{child.api_key.pk}/rotate/", format="json")

    assert response.status_code == 200
    [event] = events("key.rotate")
    assert (event.actor_type, event.actor_id, event.target_id) == (
        "key",
        str(manager.api_key.pk),
        str(child.api_key.pk),
    )
    assert_no_secret(event, manager.secret, child.secret, response.json()["secret"])
