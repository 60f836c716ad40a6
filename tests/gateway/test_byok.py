"""Bring your own key on the request path, against a live llmhub and a fake upstream that knows the
platform's key and, besides it, the keys users brought (``/__control {"accept_keys": [...]}``). The fake
records the SHA-256 of the key each request arrived with: that is how a test sees which key was used.

A user with their own key is served with it and the ledger says the user's key paid; a user without one
is served on the provider's key (``optional``) or refused with a clear message (``required``); retries and
fallbacks that cross a deployment on the user's key and one on the platform's bill whoever answered."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import openai
import pytest
import time_machine
from django.conf import settings
from websockets.asyncio.client import connect

from billing.models import BillingSource, BudgetPeriod, Plan, UsageRecord
from billing.pricing import cost_for
from billing.services.budgets import api_key_limits_set
from billing.services.keys import api_key_create
from billing.services.plans import plan_assign
from core.cache import lookup_caches_invalidate
from llmhub.testing.fake_upstream import UpstreamSpec, key_digest
from providers.fields import Secret
from providers.models import (
    ByokMode,
    CatalogModel,
    CredentialStatus,
    Deployment,
    Provider,
    ProviderCredential,
    ProviderKind,
)
from providers.routing.stats import stats_clear
from providers.selectors import model_resolve_sync
from tests.chat.conftest import session_cookie
from tests.factories import ProviderFactory, UserFactory
from tests.waiting import wait_for_record, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

PLATFORM_KEY = "sk-fake-upstream-key-0000000000000000"  # ProviderFactory's
ALICE_KEY = "sk-alice-own-key-7f3a9c1e5b2d4a68"
PRICES = {"input_per_mtok": Decimal("2.00"), "output_per_mtok": Decimal("8.00")}
MESSAGES = [{"role": "user", "content": "hello [[words=5]]"}]


@dataclass
class World:
    url: str
    upstream: object
    alice: object
    alice_api_key: object  # her gateway key (its row)
    alice_key: str  # and its secret
    bob: object
    bob_api_key: object
    bob_key: str

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def keys_seen(self) -> list[str]:
        """The digests of the provider keys the upstream's chat requests came with, in order."""
        return [r["key_sha256"] for r in self.upstream.requests if r["path"].endswith("/chat/completions")]


def model_on(name: str, *providers, strategy: str = "priority", upstream_ids=()) -> CatalogModel:
    catalog = CatalogModel.objects.create(name=name, strategy=strategy)
    for position, provider in enumerate(providers):
        upstream_id = upstream_ids[position] if position < len(upstream_ids) else "fake-gpt-4o-mini"
        Deployment.objects.create(
            model=catalog,
            name=f"{name}-{position}",
            provider=provider,
            upstream_id=upstream_id,
            priority=position,
            **PRICES,
        )
    return catalog


def own_key(user, provider, key: str = ALICE_KEY, **fields) -> ProviderCredential:
    return ProviderCredential.objects.create(
        owner=user, provider=provider, api_key=key, hint=Secret(key).hint, status=CredentialStatus.VALID, **fields
    )


@pytest.fixture
def world(llmhub_server, fake_upstreams) -> World:
    upstream = fake_upstreams(UpstreamSpec(name="byok", api_key=PLATFORM_KEY))["byok"]
    httpx.post(upstream.base_url + "/__control", json={"accept_keys": [ALICE_KEY]}, timeout=5).raise_for_status()
    base_url = upstream.base_url + "/v1"
    optional = ProviderFactory(name="optional-openai", base_url=base_url, byok=ByokMode.OPTIONAL)
    required = ProviderFactory(name="required-openai", base_url=base_url, byok=ByokMode.REQUIRED)
    platform = ProviderFactory(name="platform-openai", base_url=base_url)  # byok disabled
    model_on("opt-model", optional)
    model_on("req-model", required)
    model_on("platform-model", platform)
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    own_key(alice, optional)
    own_key(alice, required)
    alice_created, bob_created = api_key_create(user=alice, name="alice"), api_key_create(user=bob, name="bob")
    return World(
        url=llmhub_server.url,
        upstream=upstream,
        alice=alice,
        alice_api_key=alice_created.api_key,
        alice_key=alice_created.secret,
        bob=bob,
        bob_api_key=bob_created.api_key,
        bob_key=bob_created.secret,
    )


def only_row_of(user, timeout: float = 10.0) -> UsageRecord:
    """The one ledger row of ``user``, once the background writer has written it."""
    rows = wait_until(lambda: list(UsageRecord.objects.filter(user=user)), f"a ledger row for {user}", timeout=timeout)
    assert len(rows) == 1
    return rows[0]


def assert_row(raw, *, source: str, model: str, counted: bool = False) -> UsageRecord:
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.status == "ok"
    assert record.billing_source == source
    answered = model_resolve_sync(model)
    bound = answered.on(next(d for d in answered.deployments if d.name == record.deployment_name))
    price = cost_for(
        model=bound,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        cached_tokens=record.cached_tokens,
    )
    assert price > 0
    if source == BillingSource.USER_KEY:
        assert record.user_key_cost == price  # what the user's own provider account was charged
        assert record.cost == (price if counted else 0)  # what counts against the platform's budgets
    else:
        assert record.user_key_cost is None
        assert record.cost == price
    return record


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_user_with_their_own_key_is_served_with_it(world, stream, caplog):
    caplog.set_level(logging.DEBUG)
    raw = world.client(world.alice_key).chat.completions.with_raw_response.create(
        model="opt-model", messages=MESSAGES, stream=stream
    )
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        text = raw.parse().choices[0].message.content
    assert text

    assert world.keys_seen() == [key_digest(ALICE_KEY)]
    assert_row(raw, source=BillingSource.USER_KEY, model="opt-model")
    body = "" if stream else raw.http_response.text  # a stream's text was read above, through the SDK
    assert ALICE_KEY not in body + str(raw.headers) + caplog.text


def test_the_messages_api_on_an_anthropic_provider_sends_the_users_own_key(world):
    anthropic = ProviderFactory(
        name="anthropic-byok", kind=ProviderKind.ANTHROPIC, base_url=world.upstream.base_url, byok=ByokMode.OPTIONAL
    )
    model_on("claude-own", anthropic, upstream_ids=["fake-claude-haiku"])
    own_key(world.alice, anthropic)

    response = httpx.post(
        world.url + "/v1/messages",
        json={"model": "claude-own", "max_tokens": 50, "messages": MESSAGES},
        headers={"x-api-key": world.alice_key, "anthropic-version": "2023-06-01"},
        timeout=30,
    )

    assert response.status_code == 200, response.text
    assert [r["key_sha256"] for r in world.upstream.requests] == [key_digest(ALICE_KEY)]
    record = wait_for_record(response.headers["x-request-id"])
    assert record.billing_source == BillingSource.USER_KEY and record.cost == 0 and record.user_key_cost > 0


def test_a_user_without_a_key_is_served_on_the_providers_key_when_own_keys_are_optional(world):
    raw = world.client(world.bob_key).chat.completions.with_raw_response.create(model="opt-model", messages=MESSAGES)

    assert raw.parse().choices[0].message.content
    assert world.keys_seen() == [key_digest(PLATFORM_KEY)]
    assert_row(raw, source=BillingSource.PLATFORM, model="opt-model")


def test_the_users_own_key_goes_out_without_the_platforms_openai_organization(world):
    """The provider's ``organization`` is the platform's OpenAI organization: OpenAI refuses a key of another
    account sent with it (401 ``mismatched_organization``), which would mark every user's key invalid. The
    user's key goes out alone; the provider's key, still with it."""
    provider = Provider.objects.get(name="optional-openai")
    provider.organization = "org-platform0123456789"
    provider.save()
    chats = lambda: [r for r in world.upstream.requests if r["path"].endswith("/chat/completions")]  # noqa: E731

    world.client(world.alice_key).chat.completions.create(model="opt-model", messages=MESSAGES)
    world.client(world.bob_key).chat.completions.create(model="opt-model", messages=MESSAGES)

    alices, bobs = chats()
    assert alices["key_sha256"] == key_digest(ALICE_KEY) and "openai-organization" not in alices["headers"]
    assert bobs["key_sha256"] == key_digest(PLATFORM_KEY)
    assert bobs["headers"]["openai-organization"] == "org-platform0123456789"


# An admin's headers on a provider: credentials and account scope of the platform's (which must not go out
# with a user's own key), and harmless ones (which must).
PLATFORM_HEADERS = {
    "Authorization": f"Bearer {PLATFORM_KEY}",
    "OpenAI-Project": "proj_platform0123456789",
    "cf-aig-authorization": "Bearer cf-gateway-token-0123456789",
    "Helicone-Auth": "Bearer sk-helicone-0123456789",
    "X-Account-Id": "acct_platform0123456789",
    "X-Workspace": "ws_platform0123456789",
}
HARMLESS_HEADERS = {"HTTP-Referer": "https://hub.example.com", "X-Title": "llmhub"}


def test_the_users_own_key_goes_out_without_the_providers_credential_and_account_headers(world):
    """An admin may put the platform's credentials or account scope in a provider's ``extra_headers``. Sent with
    a user's own key, an ``Authorization`` there replaced the user's key (the request ran, unbilled to the user,
    on the platform's account) and the others went to wherever the user's traffic is billed. With the user's
    key they stay home; harmless headers go; the provider's own key still goes out with all of them."""
    provider = Provider.objects.get(name="optional-openai")
    provider.extra_headers = {**PLATFORM_HEADERS, **HARMLESS_HEADERS}
    provider.save()
    chats = lambda: [r for r in world.upstream.requests if r["path"].endswith("/chat/completions")]  # noqa: E731

    world.client(world.alice_key).chat.completions.create(model="opt-model", messages=MESSAGES)
    world.client(world.bob_key).chat.completions.create(model="opt-model", messages=MESSAGES)

    alices, bobs = chats()
    assert alices["key_sha256"] == key_digest(ALICE_KEY)
    assert not {name.lower() for name in PLATFORM_HEADERS if name != "Authorization"} & set(alices["headers"])
    assert {alices["headers"][name.lower()] for name in HARMLESS_HEADERS} == set(HARMLESS_HEADERS.values())
    assert bobs["key_sha256"] == key_digest(PLATFORM_KEY)
    assert {name.lower() for name in {**PLATFORM_HEADERS, **HARMLESS_HEADERS}} <= set(bobs["headers"])


def test_the_users_own_anthropic_key_goes_out_without_the_providers_x_api_key_but_with_its_beta_header(world):
    anthropic = ProviderFactory(
        name="anthropic-byok",
        kind=ProviderKind.ANTHROPIC,
        base_url=world.upstream.base_url,
        byok=ByokMode.OPTIONAL,
        extra_headers={"x-api-key": PLATFORM_KEY, "anthropic-beta": "prompt-caching-2024-07-31"},
    )
    model_on("claude-own", anthropic, upstream_ids=["fake-claude-haiku"])
    own_key(world.alice, anthropic)

    response = httpx.post(
        world.url + "/v1/messages",
        json={"model": "claude-own", "max_tokens": 50, "messages": MESSAGES},
        headers={"x-api-key": world.alice_key, "anthropic-version": "2023-06-01"},
        timeout=30,
    )

    assert response.status_code == 200, response.text
    (sent,) = world.upstream.requests
    assert sent["key_sha256"] == key_digest(ALICE_KEY)
    # The fake shows a key header by its last four characters: none of the platform's key went along.
    keys_sent = [sent["headers"][name] for name in ("authorization", "x-api-key") if name in sent["headers"]]
    assert keys_sent and all(value.endswith(ALICE_KEY[-4:]) for value in keys_sent)
    assert sent["headers"]["anthropic-beta"] == "prompt-caching-2024-07-31"
    record = wait_for_record(response.headers["x-request-id"])
    assert record.billing_source == BillingSource.USER_KEY


def test_a_provider_that_takes_no_own_keys_uses_its_own_key_even_for_a_user_who_has_one(world):
    own_key(world.alice, Provider.objects.get(name="platform-openai"))

    raw = world.client(world.alice_key).chat.completions.with_raw_response.create(
        model="platform-model", messages=MESSAGES
    )

    assert world.keys_seen() == [key_digest(PLATFORM_KEY)]
    assert_row(raw, source=BillingSource.PLATFORM, model="platform-model")


def test_a_user_without_a_key_is_refused_clearly_when_own_keys_are_required(world):
    with pytest.raises(openai.PermissionDeniedError) as refused:
        world.client(world.bob_key).chat.completions.create(model="req-model", messages=MESSAGES)

    error = refused.value
    assert error.status_code == 403 and error.code == "own_key_required"
    assert "your own API key for required-openai" in error.message
    assert "/api/provider-keys/" in error.message
    assert world.keys_seen() == []  # nothing went upstream
    record = wait_for_record(error.response.headers["x-request-id"])
    assert record.status == "rejected" and record.error_type == "own_key_required"

    # Alice, who has one, is served on it.
    raw = world.client(world.alice_key).chat.completions.with_raw_response.create(model="req-model", messages=MESSAGES)
    assert world.keys_seen() == [key_digest(ALICE_KEY)]
    assert_row(raw, source=BillingSource.USER_KEY, model="req-model")


def test_a_deleted_key_sends_the_user_back_to_the_providers_key_at_once(world):
    world.client(world.alice_key).chat.completions.create(model="opt-model", messages=MESSAGES)  # cached now
    ProviderCredential.objects.filter(owner=world.alice, provider__name="optional-openai").delete()

    raw = world.client(world.alice_key).chat.completions.with_raw_response.create(model="opt-model", messages=MESSAGES)

    assert world.keys_seen() == [key_digest(ALICE_KEY), key_digest(PLATFORM_KEY)]
    assert_row(raw, source=BillingSource.PLATFORM, model="opt-model")


def test_v1_models_lists_a_model_that_requires_an_own_key_only_to_a_user_who_has_a_usable_one(world):
    listed = {model.id for model in world.client(world.bob_key).models.list()}
    assert listed == {"opt-model", "platform-model"}  # req-model would always answer 403 own_key_required
    with pytest.raises(openai.NotFoundError):
        world.client(world.bob_key).models.retrieve("req-model")

    assert {model.id for model in world.client(world.alice_key).models.list()} == {
        "opt-model",
        "req-model",
        "platform-model",
    }
    assert world.client(world.alice_key).models.retrieve("req-model").owned_by == "required-openai"

    # A key the provider refused is no usable key: the model goes, as her requests would be refused up front.
    ProviderCredential.objects.filter(owner=world.alice, provider__name="required-openai").update(
        status=CredentialStatus.INVALID
    )
    lookup_caches_invalidate()
    assert "req-model" not in {model.id for model in world.client(world.alice_key).models.list()}
    assert world.keys_seen() == []  # listing asks no provider


def test_v1_models_lists_a_model_on_an_own_key_provider_when_its_fallback_serves_a_user_without_one(world):
    fallback_to = CatalogModel.objects.get(name="req-model")
    fallback_to.fallbacks = ["platform-model"]
    fallback_to.save()

    assert "req-model" in {model.id for model in world.client(world.bob_key).models.list()}
    reply = world.client(world.bob_key).chat.completions.create(model="req-model", messages=MESSAGES)
    assert reply.model == "platform-model"


def test_a_plan_that_counts_own_key_spend_charges_it_to_the_platform_budget_too(world):
    plan_assign(
        user=world.alice,
        plan=Plan.objects.create(name="Counted", allow_all_models=True, byok_counts_against_budget=True),
    )

    raw = world.client(world.alice_key).chat.completions.with_raw_response.create(model="opt-model", messages=MESSAGES)

    assert world.keys_seen() == [key_digest(ALICE_KEY)]
    assert_row(raw, source=BillingSource.USER_KEY, model="opt-model", counted=True)


def test_a_retry_from_the_users_key_to_a_platform_deployment_bills_the_platform(world):
    optional = ProviderCredential.objects.get(owner=world.alice, provider__name="optional-openai").provider
    platform = Provider.objects.get(name="platform-openai")
    model_on("mixed", optional, platform, upstream_ids=["fault-500", "fake-gpt-4o-mini"])

    raw = world.client(world.alice_key).chat.completions.with_raw_response.create(model="mixed", messages=MESSAGES)

    assert raw.headers["x-llmhub-attempts"] == "2"
    assert world.keys_seen() == [key_digest(ALICE_KEY), key_digest(PLATFORM_KEY)]
    record = assert_row(raw, source=BillingSource.PLATFORM, model="mixed")
    assert record.deployment_name == "mixed-1"


def test_a_fallback_from_a_platform_model_to_one_on_the_users_key_bills_the_user(world):
    optional = ProviderCredential.objects.get(owner=world.alice, provider__name="optional-openai").provider
    platform = Provider.objects.get(name="platform-openai")
    model_on("on-user-key", optional)
    broken = model_on("broken-platform", platform, upstream_ids=["fault-503"])
    broken.retries = 0
    broken.fallbacks = ["on-user-key"]
    broken.save()

    raw = world.client(world.alice_key).chat.completions.with_raw_response.create(
        model="broken-platform", messages=MESSAGES
    )

    assert world.keys_seen() == [key_digest(PLATFORM_KEY), key_digest(ALICE_KEY)]
    record = assert_row(raw, source=BillingSource.USER_KEY, model="on-user-key")
    assert record.requested_model == "broken-platform"


def test_a_platform_budget_the_user_has_spent_does_not_refuse_a_request_served_only_on_their_own_key(world):
    """A spending budget (here the gateway key's, in total) of nothing: a model that only the
    user's own key serves is not held to it (the platform pays nothing); one on the provider's key is."""
    for key in (world.alice_api_key, world.bob_api_key):
        api_key_limits_set(api_key=key, budget_usd=Decimal("0"), budget_period=BudgetPeriod.TOTAL)

    raw = world.client(world.alice_key).chat.completions.with_raw_response.create(model="opt-model", messages=MESSAGES)
    assert_row(raw, source=BillingSource.USER_KEY, model="opt-model")

    with pytest.raises(openai.RateLimitError) as refused:
        world.client(world.bob_key).chat.completions.create(model="opt-model", messages=MESSAGES)
    assert refused.value.code == "insufficient_quota"

    # Her plan counting own-key spend, the same budget refuses her too.
    plan_assign(
        user=world.alice,
        plan=Plan.objects.create(name="Counted", allow_all_models=True, byok_counts_against_budget=True),
    )
    with pytest.raises(openai.RateLimitError):
        world.client(world.alice_key).chat.completions.create(model="opt-model", messages=MESSAGES)
    assert world.keys_seen() == [key_digest(ALICE_KEY)]


def test_the_daily_token_quota_applies_on_the_users_own_key_too(world):
    few_tokens = Plan.objects.create(name="Few tokens", allow_all_models=True, daily_token_quota=1)
    plan_assign(user=world.alice, plan=few_tokens)

    with pytest.raises(openai.RateLimitError) as refused:
        world.client(world.alice_key).chat.completions.create(model="opt-model", messages=MESSAGES)

    assert refused.value.code == "insufficient_quota"
    assert "daily token quota" in refused.value.message
    assert world.keys_seen() == []


def test_rate_limits_apply_on_the_users_own_key_too(world):
    plan_assign(user=world.alice, plan=Plan.objects.create(name="One a minute", allow_all_models=True, rpm=1))
    world.client(world.alice_key).chat.completions.create(model="opt-model", messages=MESSAGES)

    with pytest.raises(openai.RateLimitError) as refused:
        world.client(world.alice_key).chat.completions.create(model="opt-model", messages=MESSAGES)

    assert refused.value.code != "insufficient_quota"
    assert world.keys_seen() == [key_digest(ALICE_KEY)]


@pytest.mark.parametrize(("cap", "platform_served"), [({"rpm_limit": 2}, 2), ({"tpm_limit": 1}, 1)], ids=["rpm", "tpm"])
def test_requests_on_users_own_keys_neither_count_toward_nor_are_refused_by_a_deployments_caps(
    world, cap, platform_served
):
    """A deployment's rpm/tpm caps stand for the platform's account with the provider: one user's traffic on
    their own key (their account) neither uses them up for everyone on the platform's key nor is refused by
    them. The platform's key traffic still meets them."""
    Deployment.objects.filter(model__name="opt-model").update(**cap)
    stats_clear()
    alice, bob = world.client(world.alice_key), world.client(world.bob_key)
    with time_machine.travel(datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC), tick=True):
        for _ in range(4):  # past the cap, on her own key
            alice.chat.completions.create(model="opt-model", messages=MESSAGES)
        for _ in range(platform_served):
            bob.chat.completions.create(model="opt-model", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as capped:
            bob.chat.completions.create(model="opt-model", messages=MESSAGES)
    stats_clear()

    assert capped.value.code == "deployments_at_capacity"
    assert world.keys_seen() == [key_digest(ALICE_KEY)] * 4 + [key_digest(PLATFORM_KEY)] * platform_served


async def test_the_websocket_chat_uses_the_users_own_key(world):
    from asgiref.sync import sync_to_async

    cookie = f"{settings.SESSION_COOKIE_NAME}={await sync_to_async(session_cookie)(world.alice)}"
    ws_url = world.url.replace("http://", "ws://") + "/ws/chat/"
    async with connect(ws_url, origin=world.url, additional_headers={"Cookie": cookie}) as ws:
        await ws.send(
            json.dumps(
                {"type": "chat.send", "conversation": None, "model": "opt-model", "content": "hi", "request_id": "w"}
            )
        )
        events = []
        while not events or events[-1]["type"] not in ("chat.completed", "error"):
            events.append(json.loads(await ws.recv(decode=True)))

    assert events[-1]["type"] == "chat.completed", events[-1]
    assert world.keys_seen() == [key_digest(ALICE_KEY)]
    record = await sync_to_async(only_row_of)(world.alice)
    assert record.billing_source == BillingSource.USER_KEY and record.cost == 0 and record.user_key_cost > 0
