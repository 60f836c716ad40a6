"""A chat completion's ``web_search_options`` charged as OpenAI bills it: its search models (gpt-4o-search-preview
and the like) search the web once before each answer, billed per 1,000 calls apart from the tokens, and report
the search in no usage. Called with the openai SDK on ``/v1/chat/completions`` against the fake upstream (whose
reply to ``web_search_options`` cites a source, as a search model's does), whole, streamed and resumed, each row
counts the searches (``web_search_requests``) and prices them at the deployment's ``web_search_per_1k``; a model
whose translation drops the field (Claude) is charged none, and admission reserves the search."""

from __future__ import annotations

from decimal import Decimal

import anthropic
import openai
import pytest
from django.db.models import Sum

from billing.models import UsageRecord
from billing.services.budgets import api_key_limits_set
from providers.models import CatalogModel, Deployment, ProviderKind
from tests.factories import ModelFactory, ProviderFactory
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

SEARCH = {"search_context_size": "low"}
# 6 prompt tokens (3 + 3 words, the directive's two words included), a reply of 2 tokens.
ASK = [{"role": "user", "content": "weather [[reply=sunny today]]"}]
# 6 × $1/M input + 2 × $2/M output + 1 × $25/1,000 searches. (Before, the search was free: 0.0000100000.)
COST = Decimal("0.0250100000")
PRICES = {"input_per_mtok": Decimal(1), "output_per_mtok": Decimal(2), "web_search_per_1k": Decimal(25)}


@pytest.fixture
def priced(gateway):
    Deployment.objects.filter(model__name__in=("gpt-test", "claude-test")).update(**PRICES)
    return gateway


def sent(upstream) -> dict:
    return upstream.requests[-1]["body"]


def test_a_chat_completion_that_searched_the_web_is_charged_its_search(priced):
    raw = priced.client().chat.completions.with_raw_response.create(
        model="gpt-test", messages=ASK, extra_body={"web_search_options": SEARCH}
    )
    completion = raw.parse()
    assert sent(priced.upstream)["web_search_options"] == SEARCH
    assert completion.choices[0].message.annotations[0].type == "url_citation"  # a search model's answer
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.prompt_tokens, record.completion_tokens, record.web_search_requests) == (6, 2, 1)
    assert (record.cost, record.usage_estimated) == (COST, False)


def test_a_streamed_chat_completion_is_charged_its_search(priced):
    with priced.client().chat.completions.with_streaming_response.create(
        model="gpt-test",
        messages=ASK,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"web_search_options": SEARCH},
    ) as response:
        request_id = response.headers["x-request-id"]
        assert any('"url_citation"' in line for line in response.iter_lines())
    record = wait_for_record(request_id)
    assert (record.prompt_tokens, record.completion_tokens, record.web_search_requests) == (6, 2, 1)
    assert (record.cost, record.usage_estimated) == (COST, False)


def test_without_web_search_options_nothing_is_searched_nor_charged(priced):
    raw = priced.client().chat.completions.with_raw_response.create(model="gpt-test", messages=ASK)
    assert "web_search_options" not in sent(priced.upstream)
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.web_search_requests, record.cost) == (0, Decimal("0.0000100000"))


@pytest.mark.parametrize("stream", [False, True])
def test_a_translated_model_drops_web_search_options_and_charges_no_search(priced, stream):
    """Claude has no ``web_search_options`` (Anthropic's web search is a server tool): the translation leaves it out,
    no search runs, and none is charged, whatever the deployment's search price."""
    client = priced.client()
    body = {"model": "claude-test", "messages": ASK, "extra_body": {"web_search_options": SEARCH}}
    if stream:
        with client.chat.completions.with_streaming_response.create(**body, stream=True) as response:
            request_id = response.headers["x-request-id"]
            list(response.iter_lines())
    else:
        raw = client.chat.completions.with_raw_response.create(**body)
        request_id = raw.headers["x-request-id"]
    assert "web_search_options" not in sent(priced.upstream)
    record = wait_for_record(request_id)
    # 6 prompt tokens as Anthropic counts them (no system prompt), 2 of reply: $0.0000100000, no search.
    assert (record.web_search_requests, record.cost, record.usage_estimated) == (0, Decimal("0.0000100000"), False)


def test_ollama_ignores_web_search_options_and_is_charged_no_search(gateway):
    """Ollama reads no ``web_search_options`` and searches nothing: an OpenAI-protocol model served by it is charged
    no search, whatever its deployment's price."""
    provider = ProviderFactory(
        name="fake-ollama", kind=ProviderKind.OLLAMA, base_url=gateway.upstream.base_url + "/ollama/v1"
    )
    ModelFactory(name="llama-test", provider=provider, upstream_id="llama3.2")
    Deployment.objects.filter(model__name="llama-test").update(**PRICES)
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="llama-test", messages=ASK, extra_body={"web_search_options": SEARCH}
    )
    assert not raw.parse().choices[0].message.annotations  # no search model answered
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.web_search_requests, record.cost) == (0, Decimal("0.0000100000"))


def test_admission_reserves_the_search(priced):
    """A key with $0.02 left pays for a chat completion of a few tokens, but not for one that also searches the web
    at $25 per 1,000 ($0.025): refused before the provider is called. Before, the search was reserved at nothing and
    the request went through, spending past the budget."""
    api_key_limits_set(api_key=priced.api_key, budget_usd=Decimal("0.02"))
    client = priced.client()
    assert client.chat.completions.create(model="gpt-test", messages=ASK, max_tokens=10).choices
    requests = priced.upstream.stats["requests"]
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model="gpt-test", messages=ASK, max_tokens=10, extra_body={"web_search_options": SEARCH}
        )
    assert "this request could need up to" in refused.value.message
    assert priced.upstream.stats["requests"] == requests


def resuming_model(upstream) -> CatalogModel:
    """``searching``: a stream resumed on failure (``resume_on_failure``) whose first deployment is cut after 3
    chunks and whose second answers, both at ``PRICES``."""
    model = CatalogModel.objects.create(name="searching", strategy="priority", resume_on_failure=True)
    for priority, (name, upstream_id) in enumerate((("first", "fault-cut-3"), ("second", "fake-gpt-4o-mini"))):
        provider = ProviderFactory(name=f"searching-{name}", base_url=upstream.base_url + "/v1")
        Deployment.objects.create(
            model=model, name=name, provider=provider, upstream_id=upstream_id, priority=priority, **PRICES
        )
    return model


def test_a_resumed_stream_is_charged_the_search_of_each_attempt_that_answered(gateway, fake_upstream):
    """A search model's stream cut midway and resumed on the next deployment (``resume_on_failure``): each attempt
    searched before it answered, and OpenAI billed both; the row counts both, at the answering deployment's price."""
    resuming_model(fake_upstream)

    with gateway.client().chat.completions.with_streaming_response.create(
        model="searching",
        messages=[{"role": "user", "content": "hello there [[words=8]]"}],
        stream=True,
        extra_body={"web_search_options": SEARCH},
    ) as response:
        request_id = response.headers["x-request-id"]
        list(response.iter_lines())

    assert [entry["body"].get("web_search_options") for entry in fake_upstream.requests[-2:]] == [SEARCH, SEARCH]
    record = wait_for_record(request_id)
    assert (record.status, record.resumed, record.deployment_name) == ("ok", True, "second")
    assert record.web_search_requests == 2
    tokens = Decimal(record.prompt_tokens) / 1_000_000 + Decimal(record.completion_tokens) * 2 / 1_000_000
    assert record.cost == (tokens + Decimal("0.05")).quantize(Decimal("0.0000000001"))


# OpenAI's search models search the web before every answer, asked or not (its web search guide: "When using Chat
# Completions, the model always retrieves information from the web before responding"), and bill the search per call.
SEARCH_MODEL = "gpt-4o-search-preview"


@pytest.fixture
def search_model(gateway):
    """``gpt-search``: one deployment of OpenAI's gpt-4o-search-preview on the fake's OpenAI route, whose answer cites
    what it found as that model's does, with or without ``web_search_options``."""
    provider = ProviderFactory(name="fake-openai-search", base_url=gateway.upstream.base_url + "/v1")
    ModelFactory(name="gpt-search", provider=provider, upstream_id=SEARCH_MODEL)
    Deployment.objects.filter(model__name="gpt-search").update(**PRICES)
    return gateway


@pytest.mark.parametrize("stream", [False, True])
def test_a_search_model_is_charged_its_search_without_web_search_options(search_model, stream):
    """A request to gpt-4o-search-preview without ``web_search_options`` searched all the same (its answer cites a
    source) and OpenAI billed it: the row counts the search at the deployment's price. Before, it counted none
    (0.0000100000), as if only ``web_search_options`` searched."""
    client = search_model.client()
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-search", messages=ASK, stream=True, stream_options={"include_usage": True}
        ) as response:
            request_id = response.headers["x-request-id"]
            assert any('"url_citation"' in line for line in response.iter_lines())
    else:
        raw = client.chat.completions.with_raw_response.create(model="gpt-search", messages=ASK)
        request_id = raw.headers["x-request-id"]
        assert raw.parse().choices[0].message.annotations[0].type == "url_citation"
    assert "web_search_options" not in sent(search_model.upstream)
    record = wait_for_record(request_id)
    assert (record.prompt_tokens, record.completion_tokens, record.web_search_requests) == (6, 2, 1)
    assert (record.cost, record.usage_estimated) == (COST, False)


def test_a_search_model_asked_with_web_search_options_is_charged_one_search(search_model):
    """The request's ``web_search_options`` still reach the model (its search context size) and it still searches
    once: one search charged, not two."""
    raw = search_model.client().chat.completions.with_raw_response.create(
        model="gpt-search", messages=ASK, extra_body={"web_search_options": {"search_context_size": "high"}}
    )
    assert sent(search_model.upstream)["web_search_options"] == {"search_context_size": "high"}
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.web_search_requests, record.cost) == (1, COST)


@pytest.mark.parametrize("stream", [False, True])
def test_a_search_model_answering_v1_messages_is_charged_its_search(search_model, stream):
    """/v1/messages translated to a search model (OpenAI's protocol), whole or streamed: no field of Anthropic's asks
    for a search, but the model searched before answering, and the row counts it."""
    sdk = anthropic.Anthropic(base_url=search_model.url, api_key=search_model.key, max_retries=0, timeout=20)
    if stream:
        with sdk.messages.with_streaming_response.create(
            model="gpt-search", max_tokens=50, messages=ASK, stream=True
        ) as response:
            request_id = response.headers["x-request-id"]
            assert any('"sunny"' in line for line in response.iter_lines())
    else:
        raw = sdk.messages.with_raw_response.create(model="gpt-search", max_tokens=50, messages=ASK)
        assert raw.parse().content[0].text == "sunny today"
        request_id = raw.headers["x-request-id"]
    record = wait_for_record(request_id)
    assert record.web_search_requests == 1
    tokens = Decimal(record.prompt_tokens) / 1_000_000 + Decimal(record.completion_tokens) * 2 / 1_000_000
    assert record.cost == tokens + Decimal("0.025")


def test_admission_reserves_a_search_models_search(search_model):
    """A key with $0.02 left cannot pay for gpt-4o-search-preview's search ($0.025) beside the tokens: refused before
    the provider is called, though the request names no ``web_search_options``. Before, it went through and spent
    past the budget."""
    api_key_limits_set(api_key=search_model.api_key, budget_usd=Decimal("0.02"))
    requests = search_model.upstream.stats["requests"]
    with pytest.raises(openai.RateLimitError) as refused:
        search_model.client().chat.completions.create(model="gpt-search", messages=ASK, max_tokens=10)
    assert "this request could need up to" in refused.value.message
    assert search_model.upstream.stats["requests"] == requests


def test_an_admin_says_which_deployments_search_on_every_request(gateway):
    """The setting an admin changes: a deployment of another model that searches on every request (a Perplexity-like
    server behind openai_compatible) is charged its search when set to ``always``; a search model's id set to
    ``never`` (say, a deployment an operator knows is not one) is charged none without ``web_search_options``."""
    provider = ProviderFactory(name="fake-openai-search", base_url=gateway.upstream.base_url + "/v1")
    ModelFactory(name="always-searching", provider=provider, upstream_id="fake-gpt-4o-mini")
    ModelFactory(name="never-searching", provider=provider, upstream_id=SEARCH_MODEL)
    Deployment.objects.filter(model__name="always-searching").update(searches_every_request="always", **PRICES)
    Deployment.objects.filter(model__name="never-searching").update(searches_every_request="never", **PRICES)
    client = gateway.client()
    searched = client.chat.completions.with_raw_response.create(model="always-searching", messages=ASK)
    unsearched = client.chat.completions.with_raw_response.create(model="never-searching", messages=ASK)
    assert wait_for_record(searched.headers["x-request-id"]).web_search_requests == 1
    record = wait_for_record(unsearched.headers["x-request-id"])
    assert (record.web_search_requests, record.cost) == (0, Decimal("0.0000100000"))


def test_admission_reserves_the_searches_of_a_stream_that_may_be_resumed(gateway, fake_upstream):
    """Each attempt that answers a resumed stream searched, and is charged its search: a key with $0.04 left is
    refused a searching stream that a model resuming on failure may answer twice ($0.05 of searches) before the
    provider is called, and with $0.065 left it is answered, resumed and charged both within its budget. Before,
    one search was reserved, the stream went through at $0.04 and spent $0.05. A model that does not resume still
    reserves its one search."""
    resuming_model(fake_upstream)
    Deployment.objects.filter(model__name="gpt-test").update(**PRICES)
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.04"))
    client = gateway.client()
    body = {
        "messages": [{"role": "user", "content": "hello there [[words=8]]"}],
        "max_tokens": 20,
        "stream": True,
        "extra_body": {"web_search_options": SEARCH},
    }
    requests = fake_upstream.stats["requests"]
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="searching", **body)
    assert "this request could need up to" in refused.value.message
    assert fake_upstream.stats["requests"] == requests
    with client.chat.completions.with_streaming_response.create(model="gpt-test", **body) as response:
        list(response.iter_lines())  # one attempt may answer: one search reserved, within $0.04

    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.09"))  # $0.025 spent on gpt-test's search
    with client.chat.completions.with_streaming_response.create(model="searching", **body) as response:
        request_id = response.headers["x-request-id"]
        list(response.iter_lines())
    record = wait_for_record(request_id)
    assert (record.status, record.resumed, record.web_search_requests) == ("ok", True, 2)
    spent = UsageRecord.objects.filter(api_key=gateway.api_key).aggregate(total=Sum("cost"))["total"]
    assert spent <= Decimal("0.09")


@pytest.mark.parametrize("kind", [ProviderKind.ANTHROPIC, ProviderKind.OLLAMA])
def test_always_on_a_provider_that_counts_no_such_search_holds_none(gateway, kind):
    """``always`` on a provider whose adapter counts no search a model runs unasked (Claude, Ollama), saved before
    71844da refused it or through a queryset update, as here: each request held a $0.025 search at admission that its
    row was never charged, so a key with $0.02 left was refused a request of $0.00001 (and a lost row, charged what
    was reserved, counted a search never made). The deployment's snapshot reads it as never: served, charged none."""
    if kind == ProviderKind.OLLAMA:
        provider = ProviderFactory(name="fake-ollama", kind=kind, base_url=gateway.upstream.base_url + "/ollama/v1")
        ModelFactory(name="llama-test", provider=provider, upstream_id="llama3.2")
        name = "llama-test"
    else:
        name = "claude-test"
    Deployment.objects.filter(model__name=name).update(searches_every_request="always", **PRICES)
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.02"))
    raw = gateway.client().chat.completions.with_raw_response.create(model=name, messages=ASK, max_tokens=10)
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.status, record.web_search_requests) == ("ok", 0)
    assert record.cost < Decimal("0.0001")
