"""A provider an administrator moves to another host: its users' own keys are paused, not sent there.

Two fake upstreams on two ports (two hosts, as far as a key's owner is concerned); both accept Alice's key,
so that a test sees, by the digest each request arrived with, which key reached which host."""

from __future__ import annotations

import httpx
import openai
import pytest
from django.contrib import messages
from django.urls import reverse

from audit.models import AuditEvent
from billing.models import BillingSource
from billing.services.keys import api_key_create
from llmhub.testing.fake_upstream import UpstreamSpec, key_digest
from providers.fields import Secret
from providers.models import (
    ByokMode,
    CatalogModel,
    CredentialStatus,
    Deployment,
    ProviderCredential,
    ProviderKind,
    url_origin,
)
from providers.services.credentials import provider_credentials_revalidate_due
from tests.factories import ProviderFactory, UserFactory, provider_admin_form
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

PLATFORM_KEY = "sk-fake-upstream-key-0000000000000000"  # ProviderFactory's
ALICE_KEY = "sk-alice-own-key-7f3a9c1e5b2d4a68"
MESSAGES = [{"role": "user", "content": "hello [[words=5]]"}]
PRICES = {"input_per_mtok": 1, "output_per_mtok": 1}


def keys_seen(upstream) -> list[str]:
    return [r["key_sha256"] for r in upstream.requests if r["path"].endswith("/chat/completions")]


@pytest.fixture
def hosts(llmhub_server, fake_upstreams):
    group = fake_upstreams(
        UpstreamSpec(name="agreed", api_key=PLATFORM_KEY), UpstreamSpec(name="moved", api_key=PLATFORM_KEY)
    )
    for upstream in group:
        httpx.post(upstream.base_url + "/__control", json={"accept_keys": [ALICE_KEY]}, timeout=5).raise_for_status()
    return group


def provider_with_key(hosts, byok: str, name: str):
    provider = ProviderFactory(name=name, base_url=hosts["agreed"].base_url + "/v1", byok=byok)
    model = CatalogModel.objects.create(name=f"{name}-model")
    Deployment.objects.create(
        model=model, name=f"{name}-d", provider=provider, upstream_id="fake-gpt-4o-mini", **PRICES
    )
    alice = UserFactory(username=f"alice-{name}", email="alice@example.com")
    ProviderCredential.objects.create(
        owner=alice, provider=provider, api_key=ALICE_KEY, hint=Secret(ALICE_KEY).hint, status=CredentialStatus.VALID
    )
    return provider, alice, api_key_create(user=alice, name="k").secret


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_a_users_key_does_not_follow_its_provider_to_another_host(hosts, llmhub_server):
    provider, _alice, gateway_key = provider_with_key(hosts, ByokMode.OPTIONAL, "opt")
    client(llmhub_server, gateway_key).chat.completions.create(model="opt-model", messages=MESSAGES)
    assert keys_seen(hosts["agreed"]) == [key_digest(ALICE_KEY)]

    provider.base_url = hosts["moved"].base_url + "/v1"
    provider.save()
    raw = client(llmhub_server, gateway_key).chat.completions.with_raw_response.create(
        model="opt-model", messages=MESSAGES
    )

    assert keys_seen(hosts["moved"]) == [key_digest(PLATFORM_KEY)]  # never Alice's own key
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.billing_source == BillingSource.PLATFORM


def move(provider, base_url: str) -> None:
    provider.base_url = base_url
    provider.save()


def keys_api(server, user) -> httpx.Client:
    return httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {api_key_create(user=user, name='m', scopes=['keys:manage']).secret}"},
    )


def test_the_url_origin_is_scheme_host_and_port():
    assert (
        url_origin("https://API.openai.com/v1")
        == url_origin("https://api.openai.com:443/other")
        == ("https://api.openai.com")
    )
    assert url_origin("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000"
    assert url_origin("http://127.0.0.1:8001/v1") != url_origin("http://127.0.0.1:8000/v1")
    assert url_origin("http://api.openai.com/v1") != url_origin("https://api.openai.com/v1")


def test_a_path_change_on_the_same_host_keeps_the_key_in_use(hosts, llmhub_server):
    provider, _alice, gateway_key = provider_with_key(hosts, ByokMode.OPTIONAL, "opt")

    move(provider, hosts["agreed"].base_url + "/v1/")  # another path, the same host
    client(llmhub_server, gateway_key).chat.completions.create(model="opt-model", messages=MESSAGES)

    assert keys_seen(hosts["agreed"]) == [key_digest(ALICE_KEY)]


def test_a_paused_key_is_shown_confirmed_by_its_owner_and_then_used_at_the_new_host(hosts, llmhub_server):
    provider, alice, gateway_key = provider_with_key(hosts, ByokMode.OPTIONAL, "opt")
    agreed, moved = url_origin(hosts["agreed"].base_url), url_origin(hosts["moved"].base_url)
    move(provider, hosts["moved"].base_url + "/v1")
    api = keys_api(llmhub_server, alice)

    [shown] = api.get("/api/provider-keys/").json()
    assert shown["status"] == "paused"
    assert shown["confirmed_host"] == agreed and shown["provider_host"] == moved
    assert f"moved the provider opt from {agreed} to {moved}" in shown["status_detail"]
    # Checking it again would send it to the new host: refused, nothing sent.
    refused = api.post(f"/api/provider-keys/{shown['id']}/validate/")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "provider_key_paused"
    assert not [r for r in hosts["moved"].requests if r["key_sha256"] == key_digest(ALICE_KEY)]

    confirmed = api.post(f"/api/provider-keys/{shown['id']}/confirm-host/")
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["status"] == "valid" and confirmed.json()["confirmed_host"] == moved
    event = AuditEvent.objects.get(action="provider_key.host_confirm")
    assert event.changes["confirmed_host"] == [agreed, moved] and ALICE_KEY not in str(event.changes)

    raw = client(llmhub_server, gateway_key).chat.completions.with_raw_response.create(
        model="opt-model", messages=MESSAGES
    )
    assert keys_seen(hosts["moved"]) == [key_digest(ALICE_KEY)]
    assert wait_for_record(raw.headers["x-request-id"]).billing_source == BillingSource.USER_KEY


def test_moving_the_provider_back_to_the_agreed_host_resumes_the_key_unasked(hosts, llmhub_server):
    provider, _alice, gateway_key = provider_with_key(hosts, ByokMode.OPTIONAL, "opt")
    move(provider, hosts["moved"].base_url + "/v1")
    move(provider, hosts["agreed"].base_url + "/v1")

    client(llmhub_server, gateway_key).chat.completions.create(model="opt-model", messages=MESSAGES)

    assert keys_seen(hosts["agreed"]) == [key_digest(ALICE_KEY)]


def test_a_model_requiring_an_own_key_refuses_a_paused_one_clearly_and_sends_nothing(hosts, llmhub_server):
    provider, _alice, gateway_key = provider_with_key(hosts, ByokMode.REQUIRED, "req")
    move(provider, hosts["moved"].base_url + "/v1")

    with pytest.raises(openai.PermissionDeniedError) as refused:
        client(llmhub_server, gateway_key).chat.completions.create(model="req-model", messages=MESSAGES)

    error = refused.value
    assert error.status_code == 403 and error.code == "own_key_required"
    assert "paused because the administrator moved the provider to another host" in error.message
    assert url_origin(hosts["moved"].base_url) in error.message and "/confirm-host/" in error.message
    assert Secret(ALICE_KEY).hint in error.message and ALICE_KEY not in error.message
    assert keys_seen(hosts["moved"]) == [] and keys_seen(hosts["agreed"]) == []
    record = wait_for_record(error.response.headers["x-request-id"])
    assert record.status == "rejected" and record.cost == 0


def test_the_daily_recheck_sends_a_paused_key_nowhere(hosts):
    provider, _alice, _gateway_key = provider_with_key(hosts, ByokMode.OPTIONAL, "opt")
    move(provider, hosts["moved"].base_url + "/v1")

    counts = provider_credentials_revalidate_due(concurrency=2, max_seconds=60)

    assert counts["valid"] == counts["invalid"] == counts["unchecked"] == 0
    assert not [r for g in ("agreed", "moved") for r in hosts[g].requests if r["key_sha256"] == key_digest(ALICE_KEY)]
    assert ProviderCredential.objects.get().status == CredentialStatus.VALID


def test_a_key_given_again_after_the_move_is_agreed_for_the_new_host(hosts, llmhub_server):
    provider, alice, _gateway_key = provider_with_key(hosts, ByokMode.OPTIONAL, "opt")
    move(provider, hosts["moved"].base_url + "/v1")

    saved = keys_api(llmhub_server, alice).post("/api/provider-keys/", json={"provider": "opt", "api_key": ALICE_KEY})
    assert saved.status_code == 200, saved.text
    assert saved.json()["status"] == "valid" and saved.json()["confirmed_host"] == url_origin(hosts["moved"].base_url)


def test_the_admin_is_warned_before_and_told_after_a_move_which_is_audited_and_emailed_once(
    hosts, admin_client, mailoutbox
):
    provider, alice, _gateway_key = provider_with_key(hosts, ByokMode.OPTIONAL, "opt")
    bob = UserFactory(username="bob", email="bob@example.com")
    ProviderCredential.objects.create(owner=bob, provider=provider, api_key="sk-bob-own-key-00000000", hint="sk-…0000")
    change = reverse("admin:providers_provider_change", args=[provider.pk])
    agreed, moved = url_origin(hosts["agreed"].base_url), url_origin(hosts["moved"].base_url)

    page = admin_client.get(change).content.decode()
    assert f"Warning: 2 user(s) gave their own key for {agreed}" in page

    response = admin_client.post(
        change, provider_admin_form(provider, base_url=hosts["moved"].base_url + "/v1"), follow=True
    )

    assert response.status_code == 200
    said = [(m.level, m.message) for m in response.context["messages"]]
    assert (
        messages.WARNING,
        f"opt moved from {agreed} to {moved}: 2 user(s)' own key(s) paused until their owners "
        f"confirm the new host (they are emailed); 0 key(s) given for {moved} are used again.",
    ) in said
    event = AuditEvent.objects.get(action="provider.host_change")
    assert event.changes["host"] == [agreed, moved] and event.changes["keys_paused"] == [None, 2]
    assert sorted(m.to[0] for m in mailoutbox) == ["alice@example.com", "bob@example.com"]
    assert "is paused" in mailoutbox[0].subject and moved in mailoutbox[0].body
    assert ALICE_KEY not in mailoutbox[0].body + mailoutbox[1].body
    keys_page = admin_client.get(reverse("admin:providers_providercredential_changelist")).content.decode()
    assert keys_page.count(">Paused</span>") == 2 and ALICE_KEY not in keys_page

    # Saved again elsewhere on the new host (a path): nothing more paused, nobody emailed again.
    admin_client.post(change, provider_admin_form(provider, base_url=hosts["moved"].base_url + "/v2"))
    assert len(mailoutbox) == 2 and AuditEvent.objects.filter(action="provider.host_change").count() == 1
    assert alice.provider_credentials.get().status == CredentialStatus.VALID  # paused, not marked invalid


def test_a_kind_change_with_an_empty_base_url_is_a_move_too(db):
    provider = ProviderFactory(name="dflt", kind=ProviderKind.OPENAI, base_url="", byok=ByokMode.OPTIONAL)
    credential = ProviderCredential.objects.create(
        owner=UserFactory(), provider=provider, api_key=ALICE_KEY, hint=Secret(ALICE_KEY).hint
    )
    assert credential.confirmed_origin == "https://api.openai.com" and not credential.host_paused

    provider.kind = ProviderKind.OPENROUTER
    provider.save()

    credential = ProviderCredential.objects.select_related("provider").get()
    assert credential.host_paused and credential.shown_status == "paused"
