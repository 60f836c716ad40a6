"""Users' own provider keys (bring your own key): add, replace, delete and re-check them over /api/provider-keys/,
against a fake provider that accepts only the keys it is told to and refuses marked keys as a provider would."""

from __future__ import annotations

import os
import secrets
import signal
import threading
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from asgiref.sync import AsyncToSync, async_to_sync
from billiard.pool import soft_timeout_sighandler
from celery.exceptions import SoftTimeLimitExceeded
from django.core import mail
from django.db.models.signals import pre_save
from django.utils import timezone
from rest_framework.test import APIClient

from audit.models import AuditEvent
from billing.models import TaskRun
from llmhub.testing.fake_upstream import FakeUpstream, key_digest
from providers.byok import byok_credential_refused, user_credentials
from providers.fields import Secret
from providers.models import ByokMode, CredentialStatus, ProviderCredential, ProviderKind
from providers.services.credentials import (
    provider_credential_delete,
    provider_credential_host_confirm,
    provider_credential_save,
    provider_credential_validate,
    provider_credentials_invalid_notices_send,
)
from providers.tasks_credentials import (
    KeyNoticesNotSentError,
    provider_credential_invalid_email,
    provider_credentials_revalidate_all,
    provider_credentials_revalidate_selected,
)
from tests.conftest import free_port
from tests.factories import ProviderFactory, UserFactory
from tests.mail import MailDown, MailWhileSending
from tests.transactions import read_before_commit
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db

PLATFORM_KEY = "sk-platform-key-0000000000000000"
OUTPUT_FIELDS = {
    "id",
    "provider",
    "label",
    "hint",
    "status",
    "status_detail",
    "last_validated_at",
    "created_at",
    "rotated_at",
    "confirmed_host",
    "provider_host",
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    """A provider of the module's own that, like a real one, refuses every key it has not been given."""
    server = FakeUpstream(api_key=PLATFORM_KEY).start()
    yield server
    server.stop()


def accept_keys(upstream: FakeUpstream, *keys: str) -> None:
    response = httpx.post(upstream.base_url + "/__control", json={"accept_keys": list(keys), "reset": True})
    response.raise_for_status()


def new_key(prefix: str = "sk-", marker: str = "") -> str:
    return f"{prefix}user-{secrets.token_hex(12)}{marker}"


@pytest.fixture
def provider(upstream):
    accept_keys(upstream)
    return ProviderFactory(
        name="openai-byok",
        kind=ProviderKind.OPENAI,
        base_url=upstream.base_url + "/v1",
        api_key=PLATFORM_KEY,
        byok=ByokMode.OPTIONAL,
    )


@pytest.fixture
def alice():
    return UserFactory(username="alice", email="alice@example.com")


@pytest.fixture
def client(alice) -> APIClient:
    client = APIClient()
    client.force_login(alice)
    return client


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.content
    return response.json()["error"]


def actions() -> list[str]:
    """The provider-key events recorded, oldest first (other parts of the app record events of their own)."""
    return list(
        AuditEvent.objects.filter(action__startswith="provider_key.").order_by("seq").values_list("action", flat=True)
    )


def test_a_key_is_checked_live_with_the_free_model_list_then_stored_encrypted_and_shown_by_its_hint(
    client, provider, upstream, alice
):
    key = new_key()
    accept_keys(upstream, key)

    response = client.post(
        "/api/provider-keys/", {"provider": "openai-byok", "api_key": key, "label": "mine"}, format="json"
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == OUTPUT_FIELDS
    assert body["provider"] == "openai-byok" and body["label"] == "mine"
    assert body["status"] == "valid" and body["last_validated_at"] and body["rotated_at"] is None
    assert body["hint"] == "sk-…" + key[-4:]
    assert key not in response.content.decode()
    # The check was the model list, sent with the user's key.
    checks = [r for r in upstream.requests if r["path"] == "/v1/models"]
    assert [r["key_sha256"] for r in checks] == [key_digest(key)]
    assert not [r for r in upstream.requests if r["path"] != "/v1/models"]
    stored = ProviderCredential.objects.get(owner=alice)
    assert stored.api_key.reveal() == key
    assert actions() == ["provider_key.add"]
    assert key not in str(AuditEvent.objects.get(action="provider_key.add").changes)

    listed = client.get("/api/provider-keys/")
    assert listed.status_code == 200
    assert [row["id"] for row in listed.json()] == [body["id"]]
    assert key not in listed.content.decode()


def test_a_key_is_checked_without_the_platforms_openai_organization(client, provider, upstream):
    """OpenAI refuses a key sent with an organization it is not in (401 ``mismatched_organization``): checked
    with the provider's, the platform's, every user's key would be refused as not valid."""
    provider.organization = "org-platform0123456789"
    provider.save()
    key = new_key()
    accept_keys(upstream, key)

    response = client.post("/api/provider-keys/", {"provider": "openai-byok", "api_key": key}, format="json")

    assert response.status_code == 201, response.content
    (check,) = [r for r in upstream.requests if r["path"] == "/v1/models"]
    assert check["key_sha256"] == key_digest(key) and "openai-organization" not in check["headers"]


# Headers an admin may give a provider: the platform's credentials and account scope, and harmless ones.
PLATFORM_HEADERS = {
    "Authorization": f"Bearer {PLATFORM_KEY}",
    "OpenAI-Organization": "org-platform0123456789",
    "OpenAI-Project": "proj_platform0123456789",
    "x-goog-api-key": PLATFORM_KEY,
    "X-Upstream-Token": "platform-token-0123456789",
}
HARMLESS_HEADERS = {"HTTP-Referer": "https://hub.example.com", "X-Title": "llmhub"}


def _checked_with(check: dict, key: str) -> None:
    """``check`` (a recorded model list request) went out with ``key`` and the harmless headers only."""
    assert check["key_sha256"] == key_digest(key)
    assert not {name.lower() for name in PLATFORM_HEADERS if name != "Authorization"} & set(check["headers"])
    assert {check["headers"][name.lower()] for name in HARMLESS_HEADERS} == set(HARMLESS_HEADERS.values())


@pytest.mark.parametrize("how", ["save", "check-again", "daily"])
def test_a_key_is_checked_without_the_providers_credential_and_account_headers(client, provider, upstream, alice, how):
    """With the provider's ``Authorization`` header, the check of a user's key ran on the platform's key: any key
    at all passed, and a revoked one stayed valid. The provider's credential and account headers are not sent
    with a user's key, on the check as on a request (``tests/gateway/test_byok.py``); harmless ones are."""
    provider.extra_headers = {**PLATFORM_HEADERS, **HARMLESS_HEADERS}
    provider.save()
    key = new_key()  # one the provider does not know
    if how == "save":
        error = error_of(
            client.post("/api/provider-keys/", {"provider": "openai-byok", "api_key": key}, format="json"), 400
        )
        assert "not a valid API key" in error["message"]
        assert not ProviderCredential.objects.exists()
    else:
        credential = ProviderCredential.objects.create(
            owner=alice,
            provider=provider,
            api_key=key,
            hint=Secret(key).hint,
            status=CredentialStatus.VALID,
            confirmed_origin=provider.origin,
        )
        if how == "check-again":
            assert client.post(f"/api/provider-keys/{credential.pk}/validate/").json()["status"] == "invalid"
        else:
            assert provider_credentials_revalidate_all()["turned_invalid"] == 1
        credential.refresh_from_db()
        assert credential.status == CredentialStatus.INVALID
    (check,) = [r for r in upstream.requests if r["path"] == "/v1/models"]
    _checked_with(check, key)


def test_replacing_a_key_checks_the_new_one_first_and_keeps_the_row(client, provider, upstream, alice):
    old, new = new_key(), new_key()
    accept_keys(upstream, old, new)
    first = client.post("/api/provider-keys/", {"provider": "openai-byok", "api_key": old, "label": "a"}, format="json")

    replaced = client.post("/api/provider-keys/", {"provider": "openai-byok", "api_key": new}, format="json")

    assert replaced.status_code == 200, replaced.content
    body = replaced.json()
    assert body["id"] == first.json()["id"]
    assert body["hint"].endswith(new[-4:]) and body["rotated_at"] and body["label"] == "a"
    assert ProviderCredential.objects.get(owner=alice).api_key.reveal() == new
    assert [r["key_sha256"] for r in upstream.requests if r["path"] == "/v1/models"] == [
        key_digest(old),
        key_digest(new),
    ]
    assert actions() == ["provider_key.add", "provider_key.replace"]
    replace_event = AuditEvent.objects.get(action="provider_key.replace")
    assert replace_event.changes["hint"] == [first.json()["hint"], body["hint"]]
    assert replace_event.changes["api_key"] == ["[secret]", "[secret]"]


@pytest.mark.parametrize(
    ("marker", "words"),
    [
        ("-refused", "not a valid API key"),
        ("-noaccess", "no access"),
        ("-noquota", "quota is exhausted"),
    ],
)
def test_a_key_the_provider_refuses_is_not_stored_and_the_reason_is_said_in_words(
    client, provider, upstream, alice, marker, words
):
    key = new_key(marker=marker)
    accept_keys(upstream, key)

    error = error_of(
        client.post("/api/provider-keys/", {"provider": "openai-byok", "api_key": key}, format="json"), 400
    )

    assert error["code"] == "provider_key_invalid" and error["param"] == "api_key"
    assert words in error["message"] and "sk-…" + key[-4:] in error["message"]
    assert key not in error["message"]
    assert not ProviderCredential.objects.exists()
    assert actions() == ["provider_key.validation_failed"]
    event = AuditEvent.objects.get(action="provider_key.validation_failed")
    assert event.target_type == "providers.provider" and key not in str(event.changes) + event.target_repr


def test_a_refused_replacement_leaves_the_working_key_in_place(client, provider, upstream, alice):
    good = new_key()
    accept_keys(upstream, good)
    client.post("/api/provider-keys/", {"provider": "openai-byok", "api_key": good}, format="json")

    wrong = new_key()  # not accepted by the provider: 401
    error = error_of(
        client.post("/api/provider-keys/", {"provider": "openai-byok", "api_key": wrong}, format="json"), 400
    )

    assert "wrong key" in error["message"]
    stored = ProviderCredential.objects.get(owner=alice)
    assert stored.api_key.reveal() == good and stored.status == CredentialStatus.VALID and stored.rotated_at is None
    assert actions() == ["provider_key.add", "provider_key.validation_failed"]
    assert AuditEvent.objects.get(action="provider_key.validation_failed").target_id == str(stored.pk)


@pytest.mark.parametrize(
    ("kind", "key", "words"),
    [
        (ProviderKind.OPENAI, "pk-0123456789abcdef", "not an OpenAI API key: OpenAI keys start with 'sk-'"),
        (ProviderKind.OPENAI, "sk-ant-0123456789abcdef", "an Anthropic key, not an OpenAI API key"),
        (ProviderKind.ANTHROPIC, "sk-0123456789abcdef", "start with 'sk-ant-'"),
        (ProviderKind.OPENROUTER, "sk-ant-0123456789abcdef", "start with 'sk-or-'"),
        (ProviderKind.OPENAI_COMPATIBLE, "abc def 0123456789", "no spaces"),
        (ProviderKind.OPENAI_COMPATIBLE, "short", "between 8 and 512"),
        (ProviderKind.MISTRAL, "clé-0123456789abcdef", "printable ASCII"),
    ],
)
def test_a_malformed_key_is_refused_before_anything_is_sent(client, upstream, kind, key, words):
    ProviderFactory(name="p", kind=kind, base_url=upstream.base_url + "/v1", byok=ByokMode.REQUIRED)
    accept_keys(upstream)

    error = error_of(client.post("/api/provider-keys/", {"provider": "p", "api_key": key}, format="json"), 400)

    assert error["code"] == "provider_key_invalid" and error["param"] == "api_key"
    assert words in error["message"]
    assert upstream.requests == []
    assert not ProviderCredential.objects.exists()


def test_a_key_that_cannot_be_checked_is_not_stored(client, alice):
    ProviderFactory(
        name="down", kind=ProviderKind.OPENAI, base_url=f"http://127.0.0.1:{free_port()}/v1", byok=ByokMode.OPTIONAL
    )

    error = error_of(client.post("/api/provider-keys/", {"provider": "down", "api_key": new_key()}, format="json"), 400)

    assert error["code"] == "provider_key_invalid"
    assert "could not be checked" in error["message"] and "could not reach" in error["message"]
    assert not ProviderCredential.objects.exists()


def test_a_provider_slower_than_the_validation_timeout_gets_the_key_refused_as_unchecked(
    client, provider, upstream, settings
):
    settings.LLMHUB_BYOK_VALIDATION_TIMEOUT_SECONDS = 0.3
    key = new_key()
    accept_keys(upstream, key)
    httpx.post(upstream.base_url + "/__control", json={"latency_ms": 3000}).raise_for_status()
    try:
        error = error_of(
            client.post("/api/provider-keys/", {"provider": "openai-byok", "api_key": key}, format="json"), 400
        )
    finally:
        httpx.post(upstream.base_url + "/__control", json={"latency_ms": 0}).raise_for_status()

    assert error["code"] == "provider_key_invalid"
    assert "could not be checked" in error["message"] and "within 0.3 seconds" in error["message"]
    assert not ProviderCredential.objects.exists()


@pytest.mark.parametrize(("marker", "status", "words"), [("", 201, None), ("-refused", 400, "not a valid API key")])
def test_an_anthropic_key_is_checked_with_anthropics_model_list(client, upstream, marker, status, words):
    ProviderFactory(name="claude-own", kind=ProviderKind.ANTHROPIC, base_url=upstream.base_url, byok=ByokMode.REQUIRED)
    key = new_key(prefix="sk-ant-", marker=marker)
    accept_keys(upstream, key)

    response = client.post("/api/provider-keys/", {"provider": "claude-own", "api_key": key}, format="json")

    assert response.status_code == status, response.content
    if words:
        assert words in response.json()["error"]["message"]
    assert [r["key_sha256"] for r in upstream.requests if r["path"] == "/v1/models"] == [key_digest(key)]
    assert key not in response.content.decode()


@pytest.mark.parametrize(("marker", "status", "words"), [("", 201, None), ("-refused", 400, "not a valid API key")])
def test_a_gemini_key_google_does_not_know_is_refused_as_not_valid_not_as_uncheckable(
    client, upstream, marker, status, words
):
    """Google answers an unknown key with 400 INVALID_ARGUMENT (reason API_KEY_INVALID), not 401."""
    ProviderFactory(name="gemini-own", kind=ProviderKind.GEMINI, base_url=upstream.base_url, byok=ByokMode.OPTIONAL)
    key = new_key(prefix="AIza", marker=marker)
    accept_keys(upstream, key)

    response = client.post("/api/provider-keys/", {"provider": "gemini-own", "api_key": key}, format="json")

    assert response.status_code == status, response.content
    if words:
        message = response.json()["error"]["message"]
        assert words in message and "could not be checked" not in message


def test_the_live_check_obeys_the_outbound_policy(client):
    ProviderFactory(
        name="metadata", kind=ProviderKind.OPENAI, base_url="http://169.254.169.254/v1", byok=ByokMode.OPTIONAL
    )

    error = error_of(
        client.post("/api/provider-keys/", {"provider": "metadata", "api_key": new_key()}, format="json"), 400
    )

    assert error["code"] == "provider_key_invalid"
    assert "could not be checked" in error["message"] and "may not connect" in error["message"]
    assert not ProviderCredential.objects.exists()


def test_a_provider_that_takes_no_user_keys_refuses_them(client, upstream):
    ProviderFactory(name="closed", kind=ProviderKind.OPENAI, base_url=upstream.base_url + "/v1")
    accept_keys(upstream)

    error = error_of(
        client.post("/api/provider-keys/", {"provider": "closed", "api_key": new_key()}, format="json"), 400
    )

    assert error["code"] == "provider_key_not_accepted" and error["param"] == "provider"
    assert upstream.requests == []
    unknown = error_of(
        client.post("/api/provider-keys/", {"provider": "nope", "api_key": new_key()}, format="json"), 400
    )
    assert unknown["param"] == "provider"
    # A key pasted into the provider field does not come back in the answer.
    pasted = new_key()
    misplaced = client.post("/api/provider-keys/", {"provider": pasted[:64], "api_key": new_key()}, format="json")
    assert error_of(misplaced, 400)["param"] == "provider" and pasted[:64] not in misplaced.content.decode()


def test_the_providers_that_take_user_keys_are_listed_with_their_key_prefix(client, provider):
    ProviderFactory(name="closed", kind=ProviderKind.OPENAI)
    ProviderFactory(name="claude-own", kind=ProviderKind.ANTHROPIC, byok=ByokMode.REQUIRED)
    ProviderFactory(name="local", kind=ProviderKind.VLLM, byok=ByokMode.OPTIONAL)

    response = client.get("/api/provider-keys/providers/")

    assert response.status_code == 200
    assert response.json() == [
        {"name": "claude-own", "kind": "anthropic", "byok": "required", "key_prefix": "sk-ant-"},
        {"name": "local", "kind": "vllm", "byok": "optional", "key_prefix": ""},
        {"name": "openai-byok", "kind": "openai", "byok": "optional", "key_prefix": "sk-"},
    ]


def test_label_change_and_delete_are_the_owners_only(client, provider, upstream, alice):
    key = new_key()
    accept_keys(upstream, key)
    credential_id = client.post(
        "/api/provider-keys/", {"provider": "openai-byok", "api_key": key}, format="json"
    ).json()["id"]
    mallory = APIClient()
    mallory.force_login(UserFactory(username="mallory"))
    url = f"/api/provider-keys/{credential_id}/"

    assert mallory.get(url).status_code == 404
    assert mallory.patch(url, {"label": "mine now"}, format="json").status_code == 404
    assert mallory.post(url + "validate/").status_code == 404
    assert mallory.delete(url).status_code == 404
    assert mallory.get("/api/provider-keys/").json() == []
    assert APIClient().get("/api/provider-keys/").status_code == 401

    renamed = client.patch(url, {"label": "work", "api_key": "ignored"}, format="json")
    assert renamed.status_code == 200 and renamed.json()["label"] == "work"
    assert ProviderCredential.objects.get().api_key.reveal() == key

    assert client.delete(url).status_code == 204
    assert not ProviderCredential.objects.exists()
    assert client.get(url).status_code == 404
    assert actions() == ["provider_key.add", "provider_key.delete"]
    deleted = AuditEvent.objects.get(action="provider_key.delete")
    assert deleted.target_id == str(credential_id) and deleted.actor_repr == "alice"


def test_revalidation_marks_a_key_the_provider_now_refuses_invalid_and_says_why(client, provider, upstream, alice):
    key = new_key()
    accept_keys(upstream, key)
    created = client.post("/api/provider-keys/", {"provider": "openai-byok", "api_key": key}, format="json")
    url = f"/api/provider-keys/{created.json()['id']}/"

    assert client.post(url + "validate/").json()["status"] == "valid"
    accept_keys(upstream)  # the provider revoked it
    checked = client.post(url + "validate/")

    assert checked.status_code == 200
    assert checked.json()["status"] == "invalid" and "wrong key" in checked.json()["status_detail"]
    assert ProviderCredential.objects.get().status == CredentialStatus.INVALID
    assert actions() == ["provider_key.add", "provider_key.validation_failed"]


@pytest.mark.parametrize("closed", [{"enabled": False}, {"byok": ByokMode.DISABLED}], ids=["disabled", "no-own-keys"])
def test_a_key_of_a_provider_closed_to_it_is_not_sent_there_to_be_checked(client, provider, upstream, alice, closed):
    """The admin disabled the provider, or stopped it taking users' keys: the key can be used nowhere, and the
    provider may no longer be one to send it to. Checking it again answers why (as adding one would) and
    sends nothing; the daily check leaves such keys alone too."""
    key = new_key()
    accept_keys(upstream, key)
    credential = provider_credential_save(owner=alice, provider=provider, api_key=key)
    for field, value in closed.items():
        setattr(provider, field, value)
    provider.save()
    accept_keys(upstream, key)  # and the request counts to zero

    error = error_of(client.post(f"/api/provider-keys/{credential.pk}/validate/"), 400)

    assert error["code"] == "provider_key_not_accepted" and error["param"] == "provider"
    assert upstream.requests == []
    credential.refresh_from_db()
    assert credential.status == CredentialStatus.VALID


def test_revalidation_of_an_unreachable_provider_leaves_the_status_as_it_was(client, provider, upstream, alice):
    key = new_key()
    accept_keys(upstream, key)
    credential = provider_credential_save(owner=alice, provider=provider, api_key=key)
    provider.base_url = f"http://127.0.0.1:{free_port()}/v1"
    provider.save()
    provider_credential_host_confirm(credential=credential)  # else paused there, and not sent (test_byok_host.py)

    error = error_of(client.post(f"/api/provider-keys/{credential.pk}/validate/"), 502)

    assert error["code"] == "provider_key_unchecked"
    assert ProviderCredential.objects.get().status == CredentialStatus.VALID


def test_a_check_that_ran_on_a_key_replaced_meanwhile_does_not_mark_the_new_key(provider, upstream, alice):
    old, new = new_key(), new_key()
    accept_keys(upstream, old, new)
    stale = provider_credential_save(owner=alice, provider=provider, api_key=old)
    provider_credential_save(owner=alice, provider=provider, api_key=new)
    accept_keys(upstream, new)  # the old key is revoked at the provider

    assert provider_credential_validate(credential=stale) is False

    current = ProviderCredential.objects.get()
    assert current.api_key.reveal() == new and current.status == CredentialStatus.VALID


def test_the_daily_check_emails_an_owner_once_when_their_key_turns_invalid(provider, upstream, alice):
    bob = UserFactory(username="bob", email="bob@example.com")
    alice_key, bob_key = new_key(), new_key()
    accept_keys(upstream, alice_key, bob_key)
    provider_credential_save(owner=alice, provider=provider, api_key=alice_key)
    provider_credential_save(owner=bob, provider=provider, api_key=bob_key)
    # A key of a provider that no longer takes users' keys is not checked.
    closed = ProviderFactory(name="closed", kind=ProviderKind.OPENAI, base_url=upstream.base_url + "/v1")
    ProviderCredential.objects.create(owner=alice, provider=closed, api_key="sk-unused-0000000000", hint="sk-…0000")
    accept_keys(upstream, bob_key)  # alice's key is revoked

    first = provider_credentials_revalidate_all()

    assert first == {"valid": 1, "invalid": 1, "turned_invalid": 1, "unchecked": 0, "left": 0}
    assert [m.to for m in mail.outbox] == [["alice@example.com"]]
    message = mail.outbox[0]
    assert "alice@example.com" not in message.subject and "sk-…" + alice_key[-4:] in message.subject
    assert "wrong key" in message.body and alice_key not in message.body + message.subject
    assert ProviderCredential.objects.get(owner=alice, provider=provider).status == CredentialStatus.INVALID
    assert ProviderCredential.objects.get(owner=bob).status == CredentialStatus.VALID
    assert len([r for r in upstream.requests if r["path"] == "/v1/models"]) == 2

    second = provider_credentials_revalidate_all()

    assert second["turned_invalid"] == 0 and second["invalid"] == 1
    assert len(mail.outbox) == 1  # still invalid: no second email
    assert actions().count("provider_key.validation_failed") == 1

    accept_keys(upstream, alice_key, bob_key)  # alice topped up her account
    assert provider_credentials_revalidate_all()["valid"] == 2
    assert ProviderCredential.objects.get(owner=alice, provider=provider).status == CredentialStatus.VALID


def stored_key(owner, provider, key: str, checked_days_ago: int | None) -> ProviderCredential:
    """A key as the daily check finds it: last checked that many days ago (None: never)."""
    checked = None if checked_days_ago is None else timezone.now() - timedelta(days=checked_days_ago)
    return ProviderCredential.objects.create(
        owner=owner,
        provider=provider,
        api_key=key,
        hint=Secret(key).hint,
        status=CredentialStatus.VALID,
        last_validated_at=checked,
    )


def models_asked_with(server: FakeUpstream) -> list[str]:
    """The digests of the keys the provider's model list was asked with, in order."""
    return [r["key_sha256"] for r in server.requests if r["path"] == "/v1/models"]


@pytest.fixture
def slow_provider() -> Iterator[tuple[FakeUpstream, object]]:
    """A provider whose model list answers long after the key check's timeout."""
    server = FakeUpstream(api_key=PLATFORM_KEY, latency_ms=60_000).start()
    provider = ProviderFactory(
        name="slow-byok", kind=ProviderKind.OPENAI, base_url=server.base_url + "/v1", byok=ByokMode.OPTIONAL
    )
    yield server, provider
    server.stop()


def test_the_daily_check_is_bounded_and_leaves_what_it_did_not_reach_for_the_next_run_oldest_checked_first(
    slow_provider, settings
):
    """Thousands of keys at a provider that does not answer would keep a run of one check after another, each
    waiting out the timeout, going for days. Checks run side by side (``…_CONCURRENCY``) and no new one starts
    once the run's time is up (``…_MAX_SECONDS``): here the first two, never checked and checked longest ago,
    are waiting out their timeout when the time is up, and the other three are left for the next run, which
    starts with the keys checked longest ago, the two tried (but not checked) last."""
    server, provider = slow_provider
    settings.LLMHUB_BYOK_REVALIDATION_CONCURRENCY = 2
    # The second check starts when the first awaits its answer, after the first's own start (its client built): on
    # a loaded CI that took past a run of 1 s, and the second key was left, not tried.
    settings.LLMHUB_BYOK_REVALIDATION_MAX_SECONDS = 3.0
    settings.LLMHUB_BYOK_VALIDATION_TIMEOUT_SECONDS = 6.0  # longer than the run: nothing new starts after it
    owners = [UserFactory(username=f"owner{n}") for n in range(5)]
    ages = [3, None, 1, 5, 2]  # days since each key was last checked
    keys = [new_key() for _ in ages]
    accept_keys(server, *keys)
    for owner, key, age in zip(owners, keys, ages, strict=True):
        stored_key(owner, provider, key, age)
    oldest_first = [keys[1], keys[3], keys[0], keys[4], keys[2]]

    counts = provider_credentials_revalidate_all()

    assert counts == {"valid": 0, "invalid": 0, "turned_invalid": 0, "unchecked": 2, "left": 3}
    assert sorted(models_asked_with(server)) == sorted(key_digest(k) for k in oldest_first[:2])
    assert ProviderCredential.objects.filter(status=CredentialStatus.VALID).count() == 5  # unchecked: as they were

    # The provider answers again; the next run, one key at a time, starts with those checked longest ago.
    httpx.post(server.base_url + "/__control", json={"latency_ms": 0, "reset": True}).raise_for_status()
    settings.LLMHUB_BYOK_REVALIDATION_CONCURRENCY = 1
    settings.LLMHUB_BYOK_REVALIDATION_MAX_SECONDS = 3600.0

    counts = provider_credentials_revalidate_all()

    assert counts == {"valid": 5, "invalid": 0, "turned_invalid": 0, "unchecked": 0, "left": 0}
    asked = models_asked_with(server)
    assert asked[:3] == [key_digest(k) for k in oldest_first[2:]]
    assert sorted(asked[3:]) == sorted(key_digest(k) for k in oldest_first[:2])


def test_a_provider_that_does_not_answer_does_not_hold_up_the_daily_check_of_the_others(
    slow_provider, provider, upstream, settings
):
    """The slow provider's keys were checked longest ago, so they come first; checked one after another, or
    side by side in that order, they would take every slot until the run's time is up and the other provider's
    keys would never be checked. A provider gets a slot before another that holds more: the other provider's
    keys are checked while the slow one's first check waits out its timeout."""
    slow, slow_byok = slow_provider
    settings.LLMHUB_BYOK_REVALIDATION_CONCURRENCY = 2
    settings.LLMHUB_BYOK_REVALIDATION_MAX_SECONDS = 2.0
    settings.LLMHUB_BYOK_VALIDATION_TIMEOUT_SECONDS = 5.0
    slow_keys, fast_keys = [new_key() for _ in range(3)], [new_key() for _ in range(3)]
    accept_keys(slow, *slow_keys)
    accept_keys(upstream, *fast_keys)
    for n, key in enumerate(slow_keys):
        stored_key(UserFactory(username=f"slow{n}"), slow_byok, key, checked_days_ago=10 + n)
    for n, key in enumerate(fast_keys):
        stored_key(UserFactory(username=f"fast{n}"), provider, key, checked_days_ago=1)

    counts = provider_credentials_revalidate_all()

    assert models_asked_with(upstream) == [key_digest(k) for k in fast_keys]
    assert counts["valid"] == 3 and counts["left"] >= 1  # the slow provider's last key at least waits


def test_the_soft_time_limit_while_one_key_is_recorded_stops_the_daily_check_before_the_next(
    provider, upstream, settings
):
    """The task's soft time limit raised while a key's outcome is written (in the task's thread, where the check's
    database work runs) was logged as that key's failure ("could not be checked") and the run went on to the next
    keys, until the hard limit killed the worker mid-write. It stops the run there, as the other sweeps do
    (``core.time_limits``); the keys not reached are the next run's."""
    settings.LLMHUB_BYOK_REVALIDATION_CONCURRENCY = 1
    keys = [new_key() for _ in range(3)]
    accept_keys(upstream, *keys)
    stored = [stored_key(UserFactory(username=f"owner{n}"), provider, key, 3 - n) for n, key in enumerate(keys)]

    def time_is_up(sender, instance, **kwargs):
        if instance.pk == stored[1].pk:
            raise SoftTimeLimitExceeded()

    pre_save.connect(time_is_up, sender=ProviderCredential)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            provider_credentials_revalidate_all()
    finally:
        pre_save.disconnect(time_is_up, sender=ProviderCredential)

    assert models_asked_with(upstream) == [key_digest(k) for k in keys[:2]]  # the third was not checked


def test_the_soft_time_limit_while_a_key_is_being_checked_ends_the_checks_loop_with_the_task(slow_provider, settings):
    """The soft limit is raised in the worker child's main thread (billiard's SIGUSR1 handler), here while it waits
    for a key's check on the run's event loop (``async_to_sync``). The exception left, and the loop ran on in its
    thread: the check's next database call (``sync_to_async``) was handed to the thread that had left, and waited
    for it for ever, so that thread never ended. The run's loop is stopped before the exception goes on
    (``core.async_bridge.run_async``): the check is cancelled, nothing is written after the limit."""
    server, provider = slow_provider
    settings.LLMHUB_BYOK_REVALIDATION_CONCURRENCY = 1
    settings.LLMHUB_BYOK_VALIDATION_TIMEOUT_SECONDS = 30.0  # the check is in flight when the limit comes
    key = new_key()
    accept_keys(server, key)
    stored = stored_key(UserFactory(username="owner"), provider, key, checked_days_ago=3)
    loops_before = set(AsyncToSync.loop_thread_executors)

    def time_is_up() -> None:  # as the worker's main process does when the soft limit has passed
        wait_until(lambda: models_asked_with(server), "the key's check reached its provider")
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
    timer = threading.Thread(target=time_is_up)
    try:
        timer.start()
        with pytest.raises(SoftTimeLimitExceeded):
            provider_credentials_revalidate_all()
    finally:
        timer.join()
        signal.signal(signal.SIGUSR1, previous)

    assert set(AsyncToSync.loop_thread_executors) <= loops_before  # the run's loop has ended
    stored.refresh_from_db()
    assert stored.unchecked_at is None and stored.status == CredentialStatus.VALID  # nothing written after


def test_the_daily_check_is_scheduled():
    from chat.management.commands.setupschedules import SCHEDULES

    assert "providers.tasks_credentials.provider_credentials_revalidate_all" in {path for _, path, _ in SCHEDULES}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/api/provider-keys/", None),
        ("post", "/api/provider-keys/", "replacement"),
        ("get", "/api/provider-keys/providers/", None),
        ("get", "/api/provider-keys/{id}/", None),
        ("patch", "/api/provider-keys/{id}/", {"label": "taken over"}),
        ("delete", "/api/provider-keys/{id}/", None),
        ("post", "/api/provider-keys/{id}/validate/", None),
    ],
)
def test_a_gateway_key_without_the_manage_scope_cannot_touch_its_owners_provider_keys(
    provider, upstream, alice, method, path, body
):
    """A key that may only call models (no scope; say one restricted to a model, handed to an app) must not
    read, replace or delete its owner's provider keys: a replacement would send the owner's requests out on
    someone else's provider account. As on /api/keys/, only the session or a ``keys:manage`` key may."""
    from billing.services.keys import api_key_create

    mine, theirs = new_key(), new_key()
    accept_keys(upstream, mine, theirs)
    credential = provider_credential_save(owner=alice, provider=provider, api_key=mine, label="mine")
    plain = api_key_create(user=alice, name="app").secret
    caller = APIClient()
    caller.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
    data = {"provider": "openai-byok", "api_key": theirs} if body == "replacement" else body

    response = getattr(caller, method)(path.format(id=credential.pk), data, format="json")

    error = error_of(response, 403)
    assert "keys:manage" in error["message"]
    credential.refresh_from_db()
    assert credential.api_key.reveal() == mine and credential.label == "mine"
    assert ProviderCredential.objects.filter(owner=alice).count() == 1


def test_a_gateway_key_with_the_manage_scope_manages_its_owners_provider_keys(provider, upstream, alice):
    from billing.services.keys import api_key_create

    key = new_key()
    accept_keys(upstream, key)
    managing = api_key_create(user=alice, name="ops", scopes=["keys:manage"]).secret
    caller = APIClient()
    caller.credentials(HTTP_AUTHORIZATION=f"Bearer {managing}")

    added = caller.post("/api/provider-keys/", {"provider": "openai-byok", "api_key": key}, format="json")

    assert added.status_code == 201, added.content
    assert caller.get("/api/provider-keys/").json()[0]["id"] == added.json()["id"]
    assert caller.delete(f"/api/provider-keys/{added.json()['id']}/").status_code == 204


def test_key_checks_are_bounded_per_user_and_answer_429_with_retry_after(client, upstream, provider, settings):
    """Each key added, replaced or checked again asks the provider with it: bounded per user, so that the hub is
    no free way to test keys found elsewhere. Listing is not counted, and another user has a count of their own."""
    from django.core.cache import cache

    cache.clear()
    settings.LLMHUB_PROVIDER_KEY_CHECKS_RATE = "3/hour"
    first, second, third, bobs = (new_key() for _ in range(4))
    accept_keys(upstream, first, second, third, bobs)

    def add(client: APIClient, key: str):
        return client.post("/api/provider-keys/", {"provider": provider.name, "api_key": key}, format="json")

    added = add(client, first)
    assert added.status_code == 201, added.content
    assert all(client.get("/api/provider-keys/").status_code == 200 for _ in range(5))  # not counted
    assert client.post(f"/api/provider-keys/{added.json()['id']}/validate/").status_code == 200
    assert add(client, second).status_code == 200  # replaced: the third check
    checks = len([r for r in upstream.requests if r["path"] == "/v1/models"])

    refused = add(client, third)

    error = error_of(refused, 429)
    assert error["type"] == "rate_limit_error"
    assert 0 < int(refused["Retry-After"]) <= 3600
    assert third not in refused.content.decode()
    assert len([r for r in upstream.requests if r["path"] == "/v1/models"]) == checks  # the provider not asked
    assert ProviderCredential.objects.get().api_key.reveal() == second
    # Someone else is not held back by this user's checks.
    bob = APIClient()
    bob.force_login(UserFactory(username="bob"))
    assert add(bob, bobs).status_code == 201


@pytest.mark.django_db(transaction=True)
def test_a_request_that_reads_a_key_while_its_delete_commits_does_not_keep_it_for_the_next(provider, alice):
    """The delete drops the user's cached keys before it commits; a request of theirs that reads them in
    between still finds the key (not deleted yet, for every other connection) and must not keep that copy:
    the requests after the delete answered would go out on the deleted key for the cache's TTL."""
    key = new_key()
    credential = ProviderCredential.objects.create(
        owner=alice, provider=provider, api_key=key, hint="sk-…", status=CredentialStatus.VALID
    )

    meanwhile = read_before_commit(
        lambda: provider_credential_delete(credential=credential),
        lambda: list(async_to_sync(user_credentials)(alice.pk)),
    )

    assert meanwhile == [provider.pk]  # the delete was not committed yet
    assert async_to_sync(user_credentials)(alice.pk) == {}


def test_an_owner_whose_email_failed_when_their_key_turned_invalid_is_told_on_the_emails_retry(
    provider, upstream, alice, mail_fails_once
):
    """The notice goes out from a Celery task retried while the mail server fails: a failed email used to wait for
    the next daily run (a day later) to be sent again."""
    alice_key = new_key()
    accept_keys(upstream, alice_key)
    provider_credential_save(owner=alice, provider=provider, api_key=alice_key)
    accept_keys(upstream)  # revoked

    assert provider_credentials_revalidate_all()["turned_invalid"] == 1
    assert [m.to for m in mail.outbox] == [["alice@example.com"]]  # the retry, not the next run
    assert "sk-…" + alice_key[-4:] in mail.outbox[0].subject

    provider_credentials_revalidate_all()
    assert len(mail.outbox) == 1  # told once


def test_an_owner_whose_email_failed_when_a_request_found_their_key_refused_is_told_on_the_emails_retry(
    provider, upstream, alice, mail_fails_once
):
    alice_key = new_key()
    accept_keys(upstream, alice_key)
    credential = provider_credential_save(owner=alice, provider=provider, api_key=alice_key)

    assert byok_credential_refused(credential_id=credential.pk, api_key=Secret(alice_key), reason="wrong key")
    assert [m.to for m in mail.outbox] == [["alice@example.com"]]
    assert "wrong key" in mail.outbox[0].body

    accept_keys(upstream)  # still refused at the daily check
    provider_credentials_revalidate_all()
    provider_credentials_revalidate_all()
    assert len(mail.outbox) == 1  # told once


@pytest.fixture
def down_provider() -> Iterator[tuple[FakeUpstream, object]]:
    """A provider that answers every request with a 503: it is down."""
    server = FakeUpstream(api_key=PLATFORM_KEY).start()
    httpx.post(server.base_url + "/__control", json={"fault": "status=503"}).raise_for_status()
    provider = ProviderFactory(
        name="down-byok", kind=ProviderKind.OPENAI, base_url=server.base_url + "/v1", byok=ByokMode.OPTIONAL
    )
    yield server, provider
    server.stop()


def test_a_provider_that_stays_down_is_given_up_for_the_run_and_its_keys_tried_move_behind_the_others(
    down_provider, provider, upstream, settings
):
    """A check that could not be made (the provider unreachable, or answering 5xx) does not mark the key checked,
    good or bad. It used to leave it first in the order, so a provider down for days had the same keys tried first
    every run, and, one after another, they could take the run's time from every other key. Now a run stops asking
    a provider after three checks in a row it did not answer (its other keys are ``left``), and the keys tried move
    behind the others: the next run starts with the keys not tried yet."""
    down, down_byok = down_provider
    settings.LLMHUB_BYOK_REVALIDATION_CONCURRENCY = 1
    down_keys, up_keys = [new_key() for _ in range(5)], [new_key() for _ in range(2)]
    accept_keys(down, *down_keys)  # it would accept them, were it up
    accept_keys(upstream, *up_keys)
    for n, key in enumerate(down_keys):
        stored_key(UserFactory(username=f"down{n}"), down_byok, key, checked_days_ago=10 + (5 - n))
    for n, key in enumerate(up_keys):
        stored_key(UserFactory(username=f"up{n}"), provider, key, checked_days_ago=1)
    before = dict(ProviderCredential.objects.values_list("pk", "last_validated_at"))

    counts = provider_credentials_revalidate_all()

    assert counts == {"valid": 2, "invalid": 0, "turned_invalid": 0, "unchecked": 3, "left": 2}
    assert models_asked_with(down) == [key_digest(k) for k in down_keys[:3]]
    assert models_asked_with(upstream) == [key_digest(k) for k in up_keys]
    unchecked = ProviderCredential.objects.filter(provider=down_byok)
    assert {c.status for c in unchecked} == {CredentialStatus.VALID}  # as they were: not checked, good or bad
    assert all(c.last_validated_at == before[c.pk] for c in unchecked)

    accept_keys(down, *down_keys)  # and the counts to zero; still down
    accept_keys(upstream, *up_keys)

    counts = provider_credentials_revalidate_all()

    # The two keys not tried yet, then the one tried longest ago; still down, so given up again.
    assert models_asked_with(down) == [key_digest(k) for k in (*down_keys[3:], down_keys[0])]
    assert counts == {"valid": 2, "invalid": 0, "turned_invalid": 0, "unchecked": 3, "left": 2}


def test_a_notice_the_daily_run_reaches_while_its_email_is_being_sent_goes_out_once(
    provider, upstream, alice, settings
):
    """The refused request's email task and the daily run's backstop can reach one notice at the same moment (CI
    saw it: the refused call marks the key in the background while the daily run starts). Both read it due and
    both sent it; the notice is now claimed before its email goes out, so the second finds nothing due."""
    alice_key = new_key()
    accept_keys(upstream, alice_key)
    credential = provider_credential_save(owner=alice, provider=provider, api_key=alice_key)
    settings.EMAIL_BACKEND = f"{MailWhileSending.__module__}.MailWhileSending"
    MailWhileSending.during = provider_credentials_invalid_notices_send

    assert byok_credential_refused(credential_id=credential.pk, api_key=Secret(alice_key), reason="wrong key")

    assert [m.to for m in mail.outbox] == [["alice@example.com"]]
    assert not ProviderCredential.objects.get().invalid_notice_due


def test_a_daily_run_whose_due_notice_cannot_be_emailed_checks_the_keys_and_ends_failed(
    provider, upstream, alice, settings, caplog
):
    """A due invalid-key notice whose email failed in the daily run was logged ("tried again next run") while the
    run ended successful, so /ops/ showed the task green with the owner still untold. The keys are checked all
    the same, the notice stays due, and the run ends failed (``KeyNoticesNotSentError``, naming the key)."""
    alice_key, bob_key = new_key(), new_key()
    accept_keys(upstream, alice_key)
    credential = provider_credential_save(owner=alice, provider=provider, api_key=alice_key)
    MailDown.attempts = 0
    settings.EMAIL_BACKEND = f"{MailDown.__module__}.MailDown"
    assert byok_credential_refused(credential_id=credential.pk, api_key=Secret(alice_key), reason="wrong key")
    bob = stored_key(UserFactory(username="bob"), provider, bob_key, checked_days_ago=3)
    accept_keys(upstream, bob_key)
    checked_before = ProviderCredential.objects.get(pk=bob.pk).last_validated_at

    result = provider_credentials_revalidate_all.apply()  # the mail server still down

    assert result.failed() and isinstance(result.result, KeyNoticesNotSentError)
    assert f"provider keys {credential.pk} " in str(result.result) and alice_key not in str(result.result)
    run = TaskRun.objects.get(task=provider_credentials_revalidate_all.name)  # what /ops/ shows
    assert not run.succeeded and run.error_class == "KeyNoticesNotSentError"
    assert ProviderCredential.objects.get(pk=bob.pk).last_validated_at > checked_before  # checked all the same
    assert ProviderCredential.objects.get(pk=credential.pk).invalid_notice_due
    failures = [r for r in caplog.records if r.levelname == "ERROR" and "could not be emailed" in r.getMessage()]
    assert failures and all(str(credential.pk) in r.getMessage() for r in failures)

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert provider_credentials_revalidate_all.apply().successful()
    assert [m.to for m in mail.outbox] == [["alice@example.com"]]


@pytest.mark.parametrize(
    ("run", "counts"),
    [
        # The daily run (``provider_credentials_revalidate_all``).
        ("daily", "turned_invalid 1"),
        # An admin's "check selected keys again" run by a worker (``provider_credentials_revalidate_selected``).
        ("selected", "valid 1, invalid 1, turned_invalid 1"),
    ],
)
def test_a_run_whose_new_notice_the_broker_refuses_checks_the_keys_and_ends_failed(
    run, counts, provider, upstream, alice, broker
):
    """A key a run found refused had its owner's email queued; a broker that refused it was logged while the run
    ended successful, so /ops/ showed the task green with the owner never told. The keys are checked all the same,
    the notice stays due, and the run ends failed (``KeyNoticesNotSentError``, naming the key); the next daily run
    sends it."""
    alice_key, bob_key = new_key(), new_key()
    accept_keys(upstream, alice_key)
    credential = provider_credential_save(owner=alice, provider=provider, api_key=alice_key)
    bob = stored_key(UserFactory(username="bob"), provider, bob_key, checked_days_ago=3)
    accept_keys(upstream, bob_key)  # alice's key is revoked
    checked_before = ProviderCredential.objects.get(pk=bob.pk).last_validated_at
    broker.down()
    task = provider_credentials_revalidate_all if run == "daily" else provider_credentials_revalidate_selected

    result = task.apply() if run == "daily" else task.apply(args=([credential.pk, bob.pk],))

    assert result.failed() and isinstance(result.result, KeyNoticesNotSentError)
    assert f"provider keys {credential.pk} " in str(result.result) and alice_key not in str(result.result)
    assert counts in str(result.result)
    task_run = TaskRun.objects.get(task=task.name)  # what /ops/ shows
    assert not task_run.succeeded and task_run.error_class == "KeyNoticesNotSentError"
    refused = ProviderCredential.objects.get(pk=credential.pk)
    assert refused.status == CredentialStatus.INVALID and refused.invalid_notice_due
    assert ProviderCredential.objects.get(pk=bob.pk).last_validated_at > checked_before  # checked all the same
    assert not mail.outbox

    broker.up()
    assert provider_credentials_revalidate_all.apply().successful()
    assert [m.to for m in mail.outbox] == [["alice@example.com"]]


def test_a_notice_whose_retries_all_failed_is_sent_by_the_next_daily_run_once(provider, upstream, alice, settings):
    """The daily run stays the backstop: a mail server down for longer than the task's retries leaves the notice due."""
    alice_key = new_key()
    accept_keys(upstream, alice_key)
    credential = provider_credential_save(owner=alice, provider=provider, api_key=alice_key)
    MailDown.attempts = 0
    settings.EMAIL_BACKEND = f"{MailDown.__module__}.MailDown"

    assert byok_credential_refused(credential_id=credential.pk, api_key=Secret(alice_key), reason="wrong key")
    assert MailDown.attempts == 1 + provider_credential_invalid_email.max_retries
    assert ProviderCredential.objects.get().invalid_notice_due

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    accept_keys(upstream)
    provider_credentials_revalidate_all()
    provider_credentials_revalidate_all()
    assert [m.to for m in mail.outbox] == [["alice@example.com"]]
