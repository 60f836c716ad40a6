"""OpenAI's service tiers charged as OpenAI bills them, end to end: the fake upstream answers the tier it served
(``service_tier``: the one asked, or for ``auto`` the project's default, ``[[project_tier=NAME]]``), and each ledger
row, called with the openai SDK whole and streamed, on /v1/chat/completions and /v1/responses, is priced at the
deployment's factor for the tier the reply says, and keeps it (``service_tier``). A key's budget that pays for a
request at the standard prices but not at priority's refuses it before any upstream call."""

from __future__ import annotations

from decimal import Decimal

import anthropic
import openai
import pytest

from billing.models import UsageRecord
from billing.services.budgets import api_key_limits_set
from providers.models import CatalogModel, Deployment, ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.gateway.test_cache_write_ledger import anthropic_client
from tests.gateway.test_ledger import settle_quietly
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

QUANTUM = Decimal("0.0000000001")


@pytest.fixture
def priced(gateway):
    Deployment.objects.filter(model__name="gpt-test").update(
        input_per_mtok=Decimal(1),
        output_per_mtok=Decimal(2),
        cached_input_per_mtok=None,
        priority_price_factor=Decimal(2),
        flex_price_factor=Decimal("0.5"),
    )
    return gateway


def assert_charged(request_id: str, factor: Decimal, tier: str) -> UsageRecord:
    record = wait_for_record(request_id)
    settle_quietly()
    standard = Decimal(record.prompt_tokens * 1 + record.completion_tokens * 2) / 1_000_000
    assert record.prompt_tokens and record.completion_tokens and not record.usage_estimated
    assert (record.cost, record.service_tier) == ((standard * factor).quantize(QUANTUM), tier)
    return record


def chat_completion(gateway, body: dict, *, stream: bool) -> tuple[str, set[str]]:
    """A chat completion asked whole or streamed (its usage included): its request id and the tiers its reply
    says it was served at (each chunk's, streamed)."""
    client = gateway.client()
    if stream:
        with client.chat.completions.with_streaming_response.create(
            **body, stream=True, stream_options={"include_usage": True}
        ) as response:
            return response.headers["x-request-id"], {chunk.service_tier for chunk in response.parse()}
    raw = client.chat.completions.with_raw_response.create(**body)
    return raw.headers["x-request-id"], {raw.parse().service_tier}


def message(gateway, body: dict, *, stream: bool) -> tuple[str, anthropic.types.Usage]:
    """A /v1/messages request asked whole or streamed: its request id and the usage its reply says."""
    client = anthropic_client(gateway)
    if stream:
        with client.messages.stream(**body) as streamed:
            usage = streamed.get_final_message().usage
            return streamed.response.headers["x-request-id"], usage
    raw = client.messages.with_raw_response.create(**body)
    return raw.headers["x-request-id"], raw.parse().usage


def assert_refused_before_any_upstream_call(gateway, body: dict) -> None:
    calls = len(gateway.upstream.requests)
    with pytest.raises(openai.RateLimitError) as refused:
        gateway.client().chat.completions.create(**body)
    assert refused.value.code == "insufficient_quota"
    assert len(gateway.upstream.requests) == calls


@pytest.mark.parametrize(
    ("asked", "content", "factor", "tier"),
    [
        ("priority", "one two three", Decimal(2), "priority"),
        ("flex", "one two three", Decimal("0.5"), "flex"),
        ("default", "one two three", Decimal(1), ""),
        (None, "one two three", Decimal(1), ""),
        # A project whose default tier is Priority processing: OpenAI serves auto (or no tier) at priority.
        ("auto", "one two three [[project_tier=priority]]", Decimal(2), "priority"),
        (None, "one two three [[project_tier=priority]]", Decimal(2), "priority"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_completion_is_charged_at_the_tier_the_reply_says(priced, asked, content, factor, tier, stream):
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": content}]}
    if asked is not None:
        body["service_tier"] = asked
    request_id, served = chat_completion(priced, body, stream=stream)
    assert served == {tier or "default"}  # what the client reads is what it is charged at
    assert_charged(request_id, factor, tier)


@pytest.mark.parametrize("stream", [False, True])
def test_a_responses_request_is_charged_at_the_tier_the_reply_says(priced, stream):
    """The Response says the tier it was served at (``service_tier``), as OpenAI's does, whole and in the streamed
    events' response; a project whose default is priority serves auto there."""
    body = {"model": "gpt-test", "input": "one two three [[project_tier=priority]]", "service_tier": "auto"}
    client = priced.client()
    if stream:
        with client.responses.with_streaming_response.create(**body, stream=True) as response:
            request_id = response.headers["x-request-id"]
            events = list(response.parse())
        served = events[-1].response.service_tier
        assert events[-1].type == "response.completed"
    else:
        raw = client.responses.with_raw_response.create(**body)
        request_id, served = raw.headers["x-request-id"], raw.parse().service_tier
    assert served == "priority"
    assert_charged(request_id, Decimal(2), "priority")


@pytest.fixture
def on_azure(gateway):
    """``gpt-azure`` on an Azure OpenAI resource whose api-version reads ``service_tier`` (2025-10-01-preview, Azure's
    priority processing) and ``gpt-azure-old`` on one that does not (2024-10-21: the fake, as Azure, refuses the field
    there), priced 1 and 2 a million tokens (``assert_charged``), priority × 2."""
    for name, version in (("gpt-azure", "2025-10-01-preview"), ("gpt-azure-old", "2024-10-21")):
        provider = ProviderFactory(
            name=f"{name}-resource",
            kind=ProviderKind.AZURE_OPENAI,
            base_url=gateway.upstream.base_url,
            api_version=version,
        )
        prices = {"input_per_mtok": Decimal(1), "output_per_mtok": Decimal(2), "cached_input_per_mtok": None}
        ModelFactory(name=name, provider=provider, **prices)
    Deployment.objects.filter(model__name__startswith="gpt-azure").update(priority_price_factor=Decimal(2))
    return gateway


@pytest.mark.parametrize("stream", [False, True])
def test_a_tier_an_azure_api_version_does_not_take_is_not_sent_nor_charged(on_azure, stream):
    """An Azure api-version older than 2025-10-01-preview knows no ``service_tier`` (Azure's 400 "Unrecognized request
    argument supplied") and has no priority processing. A chat completion asking ``priority`` was sent it, for that
    400 after admission; it is sent none, served at standard processing, and charged so, not at the priority factor
    of the tier it asked, though its reply says no tier."""
    body = {
        "model": "gpt-azure-old",
        "messages": [{"role": "user", "content": "one two three"}],
        "service_tier": "priority",
    }
    request_id, served = chat_completion(on_azure, body, stream=stream)
    assert served == {None}
    assert on_azure.upstream.requests[-1]["body"].get("service_tier") is None
    assert_charged(request_id, Decimal(1), "")


@pytest.mark.parametrize("asked", ["auto", None])
@pytest.mark.parametrize("stream", [False, True])
def test_a_request_asking_no_tier_of_an_azure_deployment_with_priority_on_is_charged_priority(on_azure, asked, stream):
    """An Azure deployment with priority processing on serves a request that asks no tier (or ``auto``) at priority
    and bills it so, but its reply says the tier it served only when the request set one (Microsoft's priority
    processing page). Such a request was sent as it came: its reply said no tier, and the row was charged the standard
    prices for a priority reply (the operator paying the difference). Azure is sent ``auto`` for it, the tier it
    asks anyway: the reply says priority, and the row is charged it."""
    body = {"model": "gpt-azure", "messages": [{"role": "user", "content": "one two three [[project_tier=priority]]"}]}
    if asked is not None:
        body["service_tier"] = asked
    request_id, served = chat_completion(on_azure, body, stream=stream)
    assert_charged(request_id, Decimal(2), "priority")
    assert served == {"priority"}
    assert on_azure.upstream.requests[-1]["body"].get("service_tier") == "auto"


@pytest.mark.parametrize("stream", [False, True])
def test_an_azure_deployment_that_prices_no_priority_is_sent_no_tier_its_client_did_not_ask(on_azure, stream):
    """``auto`` is sent for a request that asks no tier only where the deployment prices priority processing: without
    a factor the tier a reply says changes no price, and the request goes as its client sent it."""
    Deployment.objects.filter(model__name="gpt-azure").update(priority_price_factor=None)
    body = {"model": "gpt-azure", "messages": [{"role": "user", "content": "one two three"}]}
    request_id, _ = chat_completion(on_azure, body, stream=stream)
    assert "service_tier" not in on_azure.upstream.requests[-1]["body"]
    assert_charged(request_id, Decimal(1), "")


def test_a_deployment_without_a_factor_charges_priority_at_its_standard_prices(priced):
    Deployment.objects.filter(model__name="gpt-test").update(priority_price_factor=None)
    raw = priced.client().chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "one two three"}], service_tier="priority"
    )
    assert_charged(raw.headers["x-request-id"], Decimal(1), "priority")


@pytest.mark.parametrize("asked", ["priority", "auto", None])
def test_a_budget_that_pays_for_the_standard_price_but_not_priority_refuses_the_request(priced, asked):
    """10 prompt tokens and 100 output at most: $0.00021 at the standard prices, $0.00042 at priority's. A key
    with $0.0003 left is served at default, and refused one that may be charged priority (asked, or asked auto of
    a project whose default may be priority) before any upstream call, where it was let through to spend past it."""
    api_key_limits_set(api_key=priced.api_key, budget_usd=Decimal("0.0003"))
    words = " ".join(f"w{i}" for i in range(10))
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": words}], "max_tokens": 100}
    served = priced.client().chat.completions.create(**body, service_tier="default")
    assert served.service_tier == "default"
    assert_refused_before_any_upstream_call(priced, {**body, **({} if asked is None else {"service_tier": asked})})


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_asked_at_default_and_answered_at_priority_keeps_its_budget(priced, stream):
    """A request asking ``default`` is reserved at the standard prices; a server that answers it served at priority
    anyway (a compatible server; OpenAI serves default at default) is not let charge past that reservation. A key with
    $0.0003 left: 13 prompt tokens and the reply's 100 are $0.000213 at the standard prices, $0.000426 at priority's.
    Before, the row was charged priority's, and the budget spent past by $0.000126; now it is charged the standard
    prices, the dearest tier the request asked may be served at, and its row says so."""
    api_key_limits_set(api_key=priced.api_key, budget_usd=Decimal("0.0003"))
    words = " ".join(f"w{i}" for i in range(8))
    body = {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": f"{words} [[served_tier=priority]] [[words=100]]"}],
        "max_tokens": 100,
        "service_tier": "default",
    }
    request_id, served = chat_completion(priced, body, stream=stream)
    assert served == {"priority"}
    record = assert_charged(request_id, Decimal(1), "")
    assert (record.prompt_tokens, record.completion_tokens) == (13, 100)
    assert record.cost <= Decimal("0.0003")


@pytest.mark.parametrize("endpoint", ["chat", "messages"])
def test_a_resumed_stream_is_charged_at_the_tier_of_the_attempt_that_finished_it(gateway, fake_upstream, endpoint):
    """A stream resumed on failure (``resume_on_failure``), on /v1/chat/completions and /v1/messages: the first
    deployment (OpenAI, priority × 2) says it served at priority, a project whose default is priority, and is cut
    after three chunks; the second (Claude, priority × 3) continues it and says no tier. The row is charged the
    answering deployment's usage and prices, so at the tier that attempt served (none said: the one asked, none,
    the standard prices). Before, the first attempt's priority was kept, and the whole reply charged at the
    second's priority factor, × 3."""
    model = CatalogModel.objects.create(name="tiered", strategy="priority", resume_on_failure=True)
    attempts = (
        ("first", ProviderKind.OPENAI, "fault-cut-3", 2),
        ("second", ProviderKind.ANTHROPIC, "fake-claude-haiku", 3),
    )
    for priority, (name, kind, upstream_id, factor) in enumerate(attempts):
        base_url = fake_upstream.base_url + ("/v1" if kind == ProviderKind.OPENAI else "")
        Deployment.objects.create(
            model=model,
            name=name,
            provider=ProviderFactory(name=f"tiered-{name}", kind=kind, base_url=base_url),
            upstream_id=upstream_id,
            priority=priority,
            input_per_mtok=Decimal(1),
            output_per_mtok=Decimal(2),
            priority_price_factor=Decimal(factor),
        )
    messages = [{"role": "user", "content": "hello there [[words=8]] [[project_tier=priority]]"}]
    if endpoint == "messages":
        request_id, _ = message(gateway, {"model": "tiered", "max_tokens": 60, "messages": messages}, stream=True)
    else:
        with gateway.client().chat.completions.with_streaming_response.create(
            model="tiered", messages=messages, stream=True
        ) as response:
            request_id = response.headers["x-request-id"]
            said = [chunk.service_tier for chunk in response.parse()]
        assert "priority" in said  # the first attempt's chunks
    record = wait_for_record(request_id)
    assert (record.status, record.resumed, record.deployment_name) == ("ok", True, "second")
    standard = Decimal(record.prompt_tokens * 1 + record.completion_tokens * 2) / 1_000_000
    assert (record.cost, record.service_tier) == (standard.quantize(QUANTUM), "")


@pytest.mark.parametrize("rules", [{"fixed": {"service_tier": "priority"}}, {"drop": ["service_tier"]}])
def test_a_tier_a_parameter_rule_sends_is_reserved_and_charged(priced, rules):
    """A model's parameter rule may send another tier than the client asked: ``fixed`` priority for its ``default``,
    or ``drop`` it, which OpenAI serves at the project's default (priority here). Admission reserved by the client's
    tier (standard prices), and since 2dde3f3 the reply's priority was charged at standard, the operator paying the
    difference. Now admission reserves as the rules send it (a tier a rule changes: the dearest of all), and the row
    is charged the tier served, within what was sent. 10 prompt tokens and 100 output at most: $0.00021 at the
    standard prices, $0.00042 at priority's."""
    model = CatalogModel.objects.get(name="gpt-test")
    model.parameter_rules = rules
    model.save()
    words = " ".join(f"w{i}" for i in range(8))
    body = {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": f"{words} [[project_tier=priority]] [[words=100]]"}],
        "max_tokens": 100,
        "service_tier": "default",
    }
    api_key_limits_set(api_key=priced.api_key, budget_usd=Decimal("0.0003"))
    assert_refused_before_any_upstream_call(priced, body)

    api_key_limits_set(api_key=priced.api_key, budget_usd=Decimal(1))
    raw = priced.client().chat.completions.with_raw_response.create(**body)
    assert raw.parse().service_tier == "priority"
    assert_charged(raw.headers["x-request-id"], Decimal(2), "priority")


@pytest.mark.parametrize(
    ("asked", "project", "factor", "tier", "said"),
    [
        # Anthropic's auto (or none) is sent as no OpenAI tier: charged the tier OpenAI served, priority or flex.
        (None, "priority", Decimal(2), "priority", "priority"),
        (None, "flex", Decimal("0.5"), "flex", "batch"),
        ("auto", "flex", Decimal("0.5"), "flex", "batch"),
        ("auto", "priority", Decimal(2), "priority", "priority"),
        # standard_only: a cheaper tier served is charged as served; a dearer one at most the standard prices.
        ("standard_only", "flex", Decimal("0.5"), "flex", "batch"),
        ("standard_only", "priority", Decimal(1), "", "priority"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_message_is_charged_the_tier_an_openai_deployment_served_whatever_anthropic_tier_it_asked(
    priced, asked, project, factor, tier, said, stream
):
    """/v1/messages to an OpenAI deployment, its Anthropic ``service_tier`` dropped by the translation (Anthropic's
    request has no OpenAI tier to send), so OpenAI serves the project's default; the reply's tier reaches the client
    in Anthropic's usage (``service_tier``), and the row is charged it. A flex reply had no Anthropic word, so its
    tier was lost and the row charged the standard prices (twice what /v1/chat/completions charges the same reply);
    now the message's usage says it (flex as Anthropic's ``batch``, its price), and the row is charged it, within what
    the client asked (``standard_only``: at most the standard prices)."""
    body = {"model": "gpt-test", "max_tokens": 50, **({} if asked is None else {"service_tier": asked})}
    messages = [{"role": "user", "content": f"one two three [[project_tier={project}]]"}]
    request_id, usage = message(priced, {**body, "messages": messages}, stream=stream)
    assert_charged(request_id, factor, tier)
    assert usage.service_tier == said  # what the client reads is what it is charged at
