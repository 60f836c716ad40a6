"""Replacing a user's own provider key while a request runs on it: the running request finishes on the key it
started with, and the next request goes out with the new key, against a live llmhub and a fake provider that
records the key each request came with. And two saves of a key at once: one adds, the other replaces."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from django.db import connection

from audit.models import AuditEvent
from billing.services.keys import api_key_create
from llmhub.testing.fake_upstream import FakeUpstream, key_digest
from providers.models import ByokMode, ProviderCredential, ProviderKind
from providers.services.credentials import provider_credential_save
from tests.factories import ModelFactory, ProviderFactory, UserFactory

PLATFORM_KEY = "sk-platform-rotation-0000000000000000"


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream(api_key=PLATFORM_KEY).start()
    yield server
    server.stop()


@pytest.mark.django_db(transaction=True)
def test_a_stream_running_on_the_old_key_finishes_on_it_and_the_next_request_uses_the_new_key(llmhub_server, upstream):
    provider = ProviderFactory(
        name="openai-own",
        kind=ProviderKind.OPENAI,
        base_url=upstream.base_url + "/v1",
        api_key=PLATFORM_KEY,
        byok=ByokMode.OPTIONAL,
    )
    ModelFactory(name="gpt-own", provider=provider, upstream_id="fake-gpt-4o-mini")
    alice = UserFactory(username="alice")
    gateway_key = api_key_create(user=alice, name="rotation", scopes=["keys:manage"]).secret
    old, new = f"sk-old-{secrets.token_hex(12)}", f"sk-new-{secrets.token_hex(12)}"
    upstream.accept_keys(old, new)
    provider_credential_save(owner=alice, provider=provider, api_key=old)
    client = openai.OpenAI(base_url=llmhub_server.url + "/v1", api_key=gateway_key, max_retries=0, timeout=30)
    words = " ".join(f"w{i}" for i in range(30))

    stream = client.chat.completions.create(
        model="gpt-own", messages=[{"role": "user", "content": f"[[tps=20]] {words}"}], stream=True
    )
    chunks = iter(stream)
    first = next(chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content)

    replaced = httpx.post(
        llmhub_server.url + "/api/provider-keys/",
        json={"provider": "openai-own", "api_key": new},
        headers={"Authorization": f"Bearer {gateway_key}"},
        timeout=30,
    )
    assert replaced.status_code == 200, replaced.text
    upstream.accept_keys(new)  # the old key is revoked at the provider too

    rest = list(chunks)
    text = first.choices[0].delta.content + "".join(c.choices[0].delta.content or "" for c in rest if c.choices)
    assert "w29" in text
    assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == ["stop"]

    after = client.chat.completions.create(model="gpt-own", messages=[{"role": "user", "content": "hello"}])
    assert after.choices[0].message.content

    calls = [r["key_sha256"] for r in upstream.requests if r["path"] == "/v1/chat/completions"]
    assert calls == [key_digest(old), key_digest(new)]


@pytest.mark.django_db(transaction=True)
def test_two_saves_of_a_key_at_once_leave_one_key_added_then_replaced(upstream):
    provider = ProviderFactory(
        name="openai-own",
        kind=ProviderKind.OPENAI,
        base_url=upstream.base_url + "/v1",
        api_key=PLATFORM_KEY,
        byok=ByokMode.OPTIONAL,
    )
    alice = UserFactory(username="alice")
    keys = [f"sk-race-{i}-{secrets.token_hex(12)}" for i in range(2)]
    upstream.accept_keys(*keys)

    def save(key: str) -> int:
        try:
            return provider_credential_save(owner=alice, provider=provider, api_key=key).pk
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=2) as pool:
        ids = list(pool.map(save, keys))

    stored = ProviderCredential.objects.get()
    assert ids == [stored.pk, stored.pk]
    assert stored.api_key.reveal() in keys and stored.rotated_at is not None
    events = AuditEvent.objects.filter(action__startswith="provider_key.").order_by("seq")
    assert [e.action for e in events] == ["provider_key.add", "provider_key.replace"]
