"""OpenAI's own API reads a reply's output limit as ``max_completion_tokens``: it deprecated ``max_tokens`` for all
its models, and its reasoning models and gpt-5 refuse it (the fake's ``fake-gpt-5`` does, with OpenAI's 400).
llmhub sent ``max_tokens`` wherever it chose the field: a /v1/messages request translated, the limit it picks under
a budget, a ``fixed`` rule's. A deployment on OpenAI (kind openai) is now sent ``max_completion_tokens``, and so is
one on Azure OpenAI whose api-version has the name (2024-09-01-preview on); other OpenAI-compatible servers, and Azure
on an older api-version, keep ``max_tokens``, the one they all read."""

from __future__ import annotations

from decimal import Decimal

import anthropic
import openai
import pytest

from billing.models import BudgetPeriod, UsageRecord
from billing.services.budgets import api_key_limits_set
from providers.models import CatalogModel, ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

BUDGET = Decimal("0.01")


@pytest.fixture
def models(gateway):
    openai_itself = ProviderFactory(
        name="openai-itself", kind=ProviderKind.OPENAI, base_url=gateway.upstream.base_url + "/v1"
    )
    vllm = ProviderFactory(name="vllm-server", kind=ProviderKind.VLLM, base_url=gateway.upstream.base_url + "/v1")
    ModelFactory(name="gpt5-test", provider=openai_itself, upstream_id="fake-gpt-5", max_output_tokens=128_000)
    ModelFactory(name="vllm-test", provider=vllm, upstream_id="fake-gpt-4o-mini")
    return gateway


def message_of(gateway, model: str, stream: bool) -> anthropic.types.Message:
    """A /v1/messages reply of ``model`` (``max_tokens`` 50, answering "done"), whole or streamed, through the SDK."""
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    request = {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "[[reply=done]]"}]}
    if not stream:
        return sdk.messages.create(**request)
    with sdk.messages.stream(**request) as events:
        return events.get_final_message()


def chat_finish_reason(gateway, model: str, *, stream: bool = False, **limit: int) -> str | None:
    """The finish reason of a chat completion of ``model`` asked for ten words under ``limit`` (``max_tokens=3``,
    ``max_completion_tokens=3``), whole or streamed, through the SDK."""
    request = {"model": model, "messages": [{"role": "user", "content": "[[words=10]]"}], **limit}
    if not stream:
        return gateway.client().chat.completions.create(**request).choices[0].finish_reason
    chunks = list(gateway.client().chat.completions.create(**request, stream=True))
    return next(choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason)


def limits_sent(gateway) -> dict[str, int]:
    """The output limits the upstream was last sent, under either name."""
    body = gateway.upstream.requests[-1]["body"]
    return {name: body[name] for name in ("max_tokens", "max_completion_tokens") if name in body}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_messages_request_reaches_openai_with_max_completion_tokens(models, stream):
    message = message_of(models, "gpt5-test", stream)
    assert message.content[-1].text == "done"
    assert limits_sent(models) == {"max_completion_tokens": 50}


def test_a_messages_request_reaches_another_openai_compatible_server_with_max_tokens(models):
    sdk = anthropic.Anthropic(base_url=models.url, api_key=models.key, max_retries=0, timeout=20)
    sdk.messages.create(model="vllm-test", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert limits_sent(models) == {"max_tokens": 50}


def test_a_chat_completions_max_tokens_reaches_openai_as_max_completion_tokens(models):
    assert chat_finish_reason(models, "gpt5-test", max_tokens=3) == "length"
    assert limits_sent(models) == {"max_completion_tokens": 3}


@pytest.mark.parametrize("operation", ["chat", "responses"])
def test_the_limit_llmhub_picks_under_a_budget_reaches_openai_as_max_completion_tokens(models, operation):
    api_key_limits_set(api_key=models.api_key, budget_usd=BUDGET, budget_period=BudgetPeriod.MONTHLY)
    client = models.client()
    if operation == "chat":
        reply = client.chat.completions.create(model="gpt5-test", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "Echo: hi"
    else:
        assert client.responses.create(model="gpt5-test", input="hi").output_text == "Echo: hi"
    assert {name: type(value) for name, value in limits_sent(models).items()} == {"max_completion_tokens": int}


def test_a_fixed_rules_limit_reaches_openai_as_max_completion_tokens(models):
    CatalogModel.objects.filter(name="gpt5-test").update(parameter_rules={"fixed": {"max_tokens": 300}})
    api_key_limits_set(api_key=models.api_key, budget_usd=BUDGET, budget_period=BudgetPeriod.MONTHLY)
    models.client().chat.completions.create(model="gpt5-test", messages=[{"role": "user", "content": "hi"}])
    assert limits_sent(models) == {"max_completion_tokens": 300}


def test_a_budgeted_keys_max_completion_tokens_alone_is_reserved_and_sent(models):
    """The reservation reads the limit the client gave, under either name: a limit the budget cannot pay for is
    refused before any call, and one it can is sent as given, with no limit of llmhub's beside it."""
    api_key_limits_set(api_key=models.api_key, budget_usd=Decimal("0.0002"), budget_period=BudgetPeriod.MONTHLY)
    client = models.client()
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model="gpt5-test", max_completion_tokens=100_000, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.code == "insufficient_quota"
    assert models.upstream.requests == []
    raw = client.chat.completions.with_raw_response.create(
        model="gpt5-test", max_completion_tokens=7, messages=[{"role": "user", "content": "[[words=20]]"}]
    )
    assert raw.parse().choices[0].finish_reason == "length"
    assert limits_sent(models) == {"max_completion_tokens": 7}
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.status, record.completion_tokens) == ("ok", 7)
    assert UsageRecord.objects.filter(api_key=models.api_key).count() == 2


@pytest.fixture
def azure_models(gateway):
    """Azure OpenAI deployments: a gpt-5 on an api-version that has ``max_completion_tokens`` (2024-10-21) and a
    gpt-4o-mini on one older than its 2024-09-01-preview, which the fake (as Azure) refuses it on."""
    for name, version, upstream in (
        ("azure-gpt5", "2024-10-21", "fake-gpt-5"),
        ("azure-old", "2024-06-01", "fake-gpt-4o-mini"),
        ("azure-preview", "2025-04-01-preview", "fake-gpt-5"),
    ):
        provider = ProviderFactory(
            name=f"{name}-resource",
            kind=ProviderKind.AZURE_OPENAI,
            base_url=gateway.upstream.base_url,
            api_version=version,
        )
        ModelFactory(name=name, provider=provider, upstream_id=upstream, max_output_tokens=128_000)
    return gateway


@pytest.mark.parametrize("model", ["azure-gpt5", "azure-preview"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_messages_request_reaches_azure_reasoning_with_max_completion_tokens(azure_models, model, stream):
    """Azure's gpt-5 and o-series deployments refuse ``max_tokens`` as OpenAI's do: a /v1/messages request (whose
    ``max_tokens`` llmhub translates) got Azure's 400 ``unsupported_parameter``."""
    message = message_of(azure_models, model, stream)
    assert message.content[-1].text == "done"
    assert limits_sent(azure_models) == {"max_completion_tokens": 50}


def test_a_chat_completions_max_tokens_reaches_an_azure_reasoning_deployment_as_max_completion_tokens(azure_models):
    assert chat_finish_reason(azure_models, "azure-gpt5", max_tokens=3) == "length"
    assert limits_sent(azure_models) == {"max_completion_tokens": 3}


def test_an_azure_api_version_before_max_completion_tokens_is_sent_max_tokens(azure_models):
    sdk = anthropic.Anthropic(base_url=azure_models.url, api_key=azure_models.key, max_retries=0, timeout=20)
    message = sdk.messages.create(
        model="azure-old", max_tokens=3, messages=[{"role": "user", "content": "[[words=10]]"}]
    )
    assert message.stop_reason == "max_tokens"
    assert limits_sent(azure_models) == {"max_tokens": 3}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_clients_max_completion_tokens_reaches_an_old_azure_api_version_as_max_tokens(azure_models, stream):
    """An api-version older than 2024-09-01-preview refuses ``max_completion_tokens`` (Azure's 400 "Unrecognized
    request argument supplied"): a client's own was sent as written and the client got that 400. It goes as
    ``max_tokens``, the same limit under the name that api-version knows."""
    assert chat_finish_reason(azure_models, "azure-old", stream=stream, max_completion_tokens=3) == "length"
    assert limits_sent(azure_models) == {"max_tokens": 3}
