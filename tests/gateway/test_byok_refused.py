"""A user's own provider key refused upstream: the user is told, by every entry point, that it is their own
key (named by its hint) with a 401, not that an administrator must act; the key turns invalid in the
background, so that the next request uses the provider's key (``optional``) or is refused up front
(``required``); the deployment's breaker does not count one user's bad key against everyone; and the key
appears in no response and no log line.

The fake upstream answers a key containing ``-refused`` with 401 invalid_api_key and one containing
``-noaccess`` with 403 and one containing ``-nomodel`` with 404 (OpenAI's "does not exist or you do not have
access to it"), as a provider does."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from websockets.asyncio.client import connect

from audit.models import AuditEvent
from billing.models import BillingSource, UsageStatus
from billing.services.keys import api_key_create
from llmhub.testing.fake_upstream import UpstreamSpec, key_digest
from providers.fields import Secret
from providers.models import ByokMode, CredentialStatus, ProviderCredential, ProviderKind
from tests.chat.conftest import session_cookie
from tests.factories import ProviderFactory, UserFactory
from tests.gateway.test_byok import PLATFORM_KEY, model_on
from tests.waiting import wait_for_ledger_rows, wait_for_record, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

REFUSED_KEY = "sk-alice-refused-canary-51c0ffee9d"
NO_ACCESS_KEY = "sk-alice-noaccess-canary-7e11a2b3"
NO_MODEL_KEY = "sk-alice-nomodel-canary-2f3a4b5c"
NO_QUOTA_KEY = "sk-alice-noquota-canary-3d4e5f60"
ANTHROPIC_NO_CREDIT_KEY = "sk-ant-alice-noquota-canary-8a9b0c1d"
MESSAGES = [{"role": "user", "content": "hello [[words=5]]"}]
ENTRY_POINTS = ["chat", "chat-stream", "messages", "websocket"]


@pytest.fixture
def setup(llmhub_server, fake_upstreams, caplog):
    caplog.set_level(logging.DEBUG)
    upstream = fake_upstreams(UpstreamSpec(name="byok", api_key=PLATFORM_KEY))["byok"]
    accepted = {"accept_keys": [REFUSED_KEY, NO_ACCESS_KEY, NO_MODEL_KEY, NO_QUOTA_KEY, ANTHROPIC_NO_CREDIT_KEY]}
    httpx.post(upstream.base_url + "/__control", json=accepted, timeout=5).raise_for_status()
    base_url = upstream.base_url + "/v1"
    optional = ProviderFactory(name="optional-openai", base_url=base_url, byok=ByokMode.OPTIONAL)
    required = ProviderFactory(name="required-openai", base_url=base_url, byok=ByokMode.REQUIRED)
    model_on("opt-model", optional)
    model_on("req-model", required)
    alice = UserFactory(username="alice")
    return {
        "server": llmhub_server,
        "upstream": upstream,
        "alice": alice,
        "secret": api_key_create(user=alice, name="alice").secret,
        "optional": optional,
        "required": required,
    }


def credential(owner, provider, key: str = REFUSED_KEY) -> ProviderCredential:
    return ProviderCredential.objects.create(
        owner=owner, provider=provider, api_key=key, hint=Secret(key).hint, status=CredentialStatus.VALID
    )


def ask(setup, entry: str, model: str) -> tuple[int | None, str]:
    """One request through ``entry``: the HTTP status (on the socket: 200 for a completed reply, None for an
    error event, which has no status) and the whole text the client received."""
    url, secret = setup["server"].url, setup["secret"]
    headers = {"Authorization": f"Bearer {secret}"}
    if entry == "websocket":
        return _ask_socket(setup, model)
    if entry == "messages":
        body = {"model": model, "max_tokens": 50, "messages": MESSAGES}
        response = httpx.post(url + "/v1/messages", json=body, headers=headers, timeout=30)
        return response.status_code, response.text
    body = {"model": model, "messages": MESSAGES, "stream": entry == "chat-stream"}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as response:
        return response.status_code, response.read().decode()


def _ask_socket(setup, model: str) -> tuple[int | None, str]:
    import asyncio

    async def run() -> tuple[int | None, str]:
        cookie = f"{settings.SESSION_COOKIE_NAME}={await sync_to_async(session_cookie)(setup['alice'])}"
        server = setup["server"].url
        received: list[str] = []
        send = {"type": "chat.send", "conversation": None, "model": model, "content": "hi", "request_id": "r"}
        async with connect(
            server.replace("http://", "ws://") + "/ws/chat/", origin=server, additional_headers={"Cookie": cookie}
        ) as ws:
            await ws.send(json.dumps(send))
            while True:
                event = json.loads(await ws.recv(decode=True))
                received.append(json.dumps(event, ensure_ascii=False))
                if event["type"] == "chat.completed":
                    return 200, "\n".join(received)
                if event["type"] == "error":
                    return None, "\n".join(received)

    return asyncio.run(run())


def wait_for_status(row: ProviderCredential, status: str, timeout: float = 10.0) -> ProviderCredential:
    def reached() -> bool:
        row.refresh_from_db()
        return row.status == status

    wait_until(reached, lambda: f"the key turns {status} (it stayed {row.status})", timeout=timeout, interval=0.05)
    return row


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_refused_own_key_is_the_users_401_naming_it_then_invalid_and_the_providers_key_serves(setup, entry, caplog):
    row = credential(setup["alice"], setup["optional"])
    hint = Secret(REFUSED_KEY).hint

    status, text = ask(setup, entry, "opt-model")

    assert status == (None if entry == "websocket" else 401), text
    # OpenAI's error shape (and the socket's error event) carry our code; Anthropic's (/v1/messages) its type.
    assert ("authentication_error" if entry == "messages" else "user_key_refused") in text
    assert f"refused your own API key {hint}" in text
    assert "administrator" not in text
    assert setup["upstream"].requests[-1]["key_sha256"] == key_digest(REFUSED_KEY)

    row = wait_for_status(row, CredentialStatus.INVALID)
    assert "refused" in row.status_detail
    event = AuditEvent.objects.get(action="provider_key.validation_failed")
    assert event.target_id == str(row.pk) and event.actor_type == "system"

    # The next request is served on the provider's key, and says so in the ledger.
    status, text = ask(setup, entry, "opt-model")
    assert status == 200, text
    assert setup["upstream"].requests[-1]["key_sha256"] == key_digest(PLATFORM_KEY)

    for leaked in (text, caplog.text, json.dumps(list(AuditEvent.objects.values()), default=str)):
        assert REFUSED_KEY not in leaked


def test_a_refused_own_key_on_a_provider_that_requires_one_refuses_the_next_request_up_front(setup):
    row = credential(setup["alice"], setup["required"])
    assert ask(setup, "chat", "req-model")[0] == 401
    wait_for_status(row, CredentialStatus.INVALID)
    served_before = setup["upstream"].requests_served()

    status, text = ask(setup, "chat", "req-model")

    assert status == 403 and "own_key_required" in text
    assert setup["upstream"].requests_served() == served_before  # nothing more went upstream


def test_the_up_front_refusal_of_a_user_whose_own_key_was_refused_says_to_replace_that_key(setup):
    """The user has a key for the provider, marked invalid: "add one" would send them looking for a key they
    already have. The refusal names theirs by its hint and says it was refused."""
    row = credential(setup["alice"], setup["required"])
    row.status, row.status_detail = CredentialStatus.INVALID, "required-openai refused the key (HTTP 401)."
    row.save()

    status, text = ask(setup, "chat", "req-model")

    assert status == 403
    error = json.loads(text)["error"]
    assert error["code"] == "own_key_required"
    assert row.hint in error["message"] and "refused" in error["message"] and "replace" in error["message"]
    assert "add one" not in error["message"]
    assert REFUSED_KEY not in text


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_own_key_without_the_model_ends_the_request_with_the_users_error_not_on_the_platforms_key(setup, entry):
    """A 404 on the user's own key (OpenAI's answer to an account without access to the model) is about their
    key, like a 403: the request ends with their 401 naming the key by its hint and the model, and does not
    move on to the next deployment, on the platform's key, which would pay for it. The key stays valid (it may
    serve the provider's other models), and the ledger row is ``invalid``, not the provider failing."""
    platform = ProviderFactory(name="platform-openai", base_url=setup["upstream"].base_url + "/v1")
    model_on("mixed-model", setup["optional"], platform)  # her key first, then the platform's
    row = credential(setup["alice"], setup["optional"], key=NO_MODEL_KEY)

    status, text = ask(setup, entry, "mixed-model")

    assert status == (None if entry == "websocket" else 401), text
    assert ("authentication_error" if entry == "messages" else "user_key_refused") in text
    assert f"refused your own API key {row.hint}: it has no access to the model 'fake-gpt-4o-mini' (HTTP 404)" in text
    assert NO_MODEL_KEY not in text
    calls = [r for r in setup["upstream"].requests if r["path"] in ("/v1/chat/completions", "/v1/messages")]
    assert [r["key_sha256"] for r in calls] == [key_digest(NO_MODEL_KEY)]  # the platform's key was not tried
    assert wait_for_ledger_rows(1, user=setup["alice"], status=UsageStatus.INVALID) == 1
    row.refresh_from_db()
    assert row.status == CredentialStatus.VALID


def test_a_key_replaced_since_the_refusal_is_not_marked_invalid(setup):
    """The mark compares the key: a refusal of the old key cannot mark the new one (here, the row is changed
    before the refused request is even answered: the mark finds another key and leaves it)."""
    from providers.byok import byok_credential_refused

    row = credential(setup["alice"], setup["optional"])
    row.api_key = "sk-alice-new-key-0000000000000001"
    row.save()

    assert byok_credential_refused(credential_id=row.pk, api_key=Secret(REFUSED_KEY), reason="refused") is False
    row.refresh_from_db()
    assert row.status == CredentialStatus.VALID
    assert not AuditEvent.objects.filter(action="provider_key.validation_failed").exists()


def test_one_users_refused_key_does_not_open_the_breaker_for_everyone(setup):
    """A key without access to the model (403) is refused on every request and kept (it may serve the
    provider's other models): more refusals than the breaker's failure threshold, and other users are still
    served on that deployment."""
    credential(setup["alice"], setup["optional"], key=NO_ACCESS_KEY)
    for _ in range(settings.LLMHUB_BREAKER_FAILURES + 2):
        status, text = ask(setup, "chat", "opt-model")
        assert status == 401 and "has no access to the model 'fake-gpt-4o-mini' (HTTP 403)" in text

    bob = UserFactory(username="bob")
    client = openai.OpenAI(
        base_url=setup["server"].url + "/v1", api_key=api_key_create(user=bob, name="bob").secret, max_retries=0
    )
    raw = client.chat.completions.with_raw_response.create(model="opt-model", messages=MESSAGES)

    assert raw.parse().choices[0].message.content
    assert setup["upstream"].requests[-1]["key_sha256"] == key_digest(PLATFORM_KEY)
    assert wait_for_record(raw.headers["x-request-id"]).billing_source == BillingSource.PLATFORM
    assert ProviderCredential.objects.get(owner=setup["alice"]).status == CredentialStatus.VALID


@pytest.mark.parametrize("entry", ["chat", "chat-stream"])
@pytest.mark.parametrize(
    "fault",
    ["status=429,retry_after=0", "404"],
    ids=["own-key-rate-limited", "own-key-without-the-model"],
)
def test_one_users_rate_limited_or_model_less_own_key_does_not_open_the_breaker_for_everyone(setup, entry, fault):
    """A 429 on a user's own key is their provider account's rate limit, and a 404 (OpenAI's "does not exist
    or you do not have access to it") their account's access to the model: neither says anything of the
    deployment, which serves everyone else on the platform's key. More of them than the breaker's failure
    threshold, and another user is still served there."""
    own = "sk-alice-own-limited-canary-0f1e2d3c"
    httpx.post(setup["upstream"].base_url + "/__control", json={"accept_keys": [own]}, timeout=5).raise_for_status()
    credential(setup["alice"], setup["optional"], key=own)
    url, headers = setup["server"].url, {"Authorization": f"Bearer {setup['secret']}"}
    body = {
        "model": "opt-model",
        "messages": [{"role": "user", "content": f"hello [[fault={fault}]]"}],
        "stream": entry == "chat-stream",
    }
    for _ in range(settings.LLMHUB_BREAKER_FAILURES + 2):
        response = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert response.status_code in (401, 429), response.text  # hers: her key's rate limit, its access
        assert setup["upstream"].requests[-1]["key_sha256"] == key_digest(own)

    bob = UserFactory(username="bob")
    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key_create(user=bob, name="bob").secret, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="opt-model", messages=MESSAGES)

    assert raw.parse().choices[0].message.content
    assert setup["upstream"].requests[-1]["key_sha256"] == key_digest(PLATFORM_KEY)
    # Judged as the breaker judges them: hers, not the provider's failures; the error-rate alert counts none.
    failed = settings.LLMHUB_BREAKER_FAILURES + 2
    assert wait_for_ledger_rows(failed, user=setup["alice"], status=UsageStatus.INVALID) == failed


@pytest.mark.parametrize("entry", ["chat", "chat-stream", "messages"])
def test_an_own_key_rate_limited_is_said_to_be_the_users_key_not_the_gateway(setup, entry):
    """The provider limits the account behind the user's own key: the 429 names that key by its hint, rather
    than telling them the gateway is rate limited (which would send them to the platform's operators)."""
    own = "sk-alice-own-limited-canary-5a6b7c8d"
    httpx.post(setup["upstream"].base_url + "/__control", json={"accept_keys": [own]}, timeout=5).raise_for_status()
    row = credential(setup["alice"], setup["optional"], key=own)
    url, headers = setup["server"].url, {"Authorization": f"Bearer {setup['secret']}"}
    content = "hello [[fault=status=429,retry_after=0]]"
    if entry == "messages":
        body = {"model": "opt-model", "max_tokens": 50, "messages": [{"role": "user", "content": content}]}
        response = httpx.post(url + "/v1/messages", json=body, headers=headers, timeout=30)
    else:
        body = {"model": "opt-model", "messages": [{"role": "user", "content": content}], "stream": entry != "chat"}
        response = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)

    assert response.status_code == 429, response.text
    message = response.json()["error"]["message"]
    assert f"rate limiting your own API key {row.hint}" in message and "the gateway" not in message
    assert own not in response.text


def test_an_own_key_out_of_quota_is_the_users_429_and_the_platform_does_not_pay_instead(setup):
    """OpenAI's 429 insufficient_quota on the user's key: their account is empty. Not retried (no wait helps
    that key) and not moved to the provider's key (the platform would pay for what their account could not);
    the key stays valid (a top-up fixes it)."""
    row = credential(setup["alice"], setup["optional"], NO_QUOTA_KEY)

    status, text = ask(setup, "chat", "opt-model")

    assert status == 429
    error = json.loads(text)["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "user_key_quota_exhausted")
    assert "your own API key" in error["message"] and row.hint in error["message"]
    assert NO_QUOTA_KEY not in text
    calls = [r for r in setup["upstream"].requests if r["path"] == "/v1/chat/completions"]
    assert [r["key_sha256"] for r in calls] == [key_digest(NO_QUOTA_KEY)]
    row.refresh_from_db()
    assert row.status == CredentialStatus.VALID
    # Theirs to fix, not the provider's failure: the row says so, and the error-rate alert does not count it.
    assert wait_for_ledger_rows(1, error_type="user_key_quota_exhausted", status=UsageStatus.INVALID) == 1


def test_an_own_anthropic_key_without_credit_is_the_users_429_not_a_bad_request(setup):
    """Anthropic says an empty account as a 400 invalid_request_error ("Your credit balance is too low ..."),
    not OpenAI's 429 insufficient_quota: it is the same exhausted quota of the user's own key, not a fault of
    the request."""
    anthropic = ProviderFactory(
        name="anthropic-own", kind=ProviderKind.ANTHROPIC, base_url=setup["upstream"].base_url, byok=ByokMode.OPTIONAL
    )
    model_on("claude-own", anthropic, upstream_ids=["fake-claude-haiku"])
    row = credential(setup["alice"], anthropic, ANTHROPIC_NO_CREDIT_KEY)

    status, text = ask(setup, "chat", "claude-own")

    assert status == 429, text
    error = json.loads(text)["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "user_key_quota_exhausted")
    assert "your own API key" in error["message"] and row.hint in error["message"]
    calls = [r for r in setup["upstream"].requests if r["path"] == "/v1/messages"]
    assert [r["key_sha256"] for r in calls] == [key_digest(ANTHROPIC_NO_CREDIT_KEY)]  # the platform did not pay
    row.refresh_from_db()
    assert row.status == CredentialStatus.VALID
