"""/v1/embeddings through the official openai SDK against a live llmhub: the same key, model, admission and
ledger steps as a chat completion, priced on input tokens alone."""

from __future__ import annotations

import base64
import json
import math
import struct
from decimal import ROUND_CEILING, Decimal

import httpx
import openai
import pytest
from asgiref.sync import async_to_sync

from billing.models import BudgetPeriod, UsageRecord
from billing.services.admission import models_allowed
from billing.services.budgets import CounterRef, api_key_limits_set, period_bounds
from billing.services.counters import counter_state
from billing.services.ledger import ledger_flush
from llmhub.testing.openapi import validate_openai_schema
from providers.models import CatalogModel, Deployment, ModelMode, Provider, ProviderKind
from providers.tokens import prompt_token_bounds, prompt_tokens
from tests.chat.conftest import ends, events_until, open_socket
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory
from tests.gateway.conftest import EMBEDDING_INPUT_PRICE
from tests.shared_redis import use_redis  # noqa: F401  (a fixture)
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

MILLION = Decimal(1_000_000)
INPUT_PRICE = EMBEDDING_INPUT_PRICE


@pytest.fixture
def other_kinds(embedder):
    """``gemini-embed``, ``cohere-embed`` and ``mistral-embed``: embedding models on providers with their own
    protocols or limits."""
    for name, kind, suffix, upstream_id in (
        ("gemini-embed", ProviderKind.GEMINI, "", "gemini-embedding-001"),
        ("cohere-embed", ProviderKind.COHERE, "/cohere", "embed-v4.0"),
        ("mistral-embed", ProviderKind.MISTRAL, "/mistral/v1", "mistral-embed"),
    ):
        ModelFactory(
            name=name,
            provider=ProviderFactory(name=f"fake-{name}", kind=kind, base_url=embedder.upstream.base_url + suffix),
            upstream_id=upstream_id,
            mode=ModelMode.EMBEDDING,
            input_per_mtok=INPUT_PRICE,
            output_per_mtok=Decimal(0),
        )
    return embedder


@pytest.fixture(params=["database", "redis"])
def store(request, settings):
    """The live server's admission store: database row locks, then the real Redis server (emptied)."""
    if request.param == "redis":
        request.getfixturevalue("use_redis")
    else:
        settings.REDIS_URL = ""
    return request.param


def assert_priced_row(request_id: str, prompt_tokens: int, *, estimated: bool = False) -> UsageRecord:
    record = wait_for_record(request_id)
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1
    assert (record.operation, record.endpoint, record.status) == ("embeddings", "rest", "ok")
    assert (record.model_name, record.provider_name) == ("embed-test", "fake-openai")
    assert (record.prompt_tokens, record.completion_tokens, record.usage_estimated) == (prompt_tokens, 0, estimated)
    assert record.cost == Decimal(prompt_tokens) * INPUT_PRICE / MILLION  # exact: the ledger keeps 10 places
    return record


def decoded(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_float_embeddings_validate_and_write_one_row_priced_on_input(embedder):
    raw = embedder.client().embeddings.with_raw_response.create(
        model="embed-test", input="the quick brown fox", encoding_format="float"
    )
    validate_openai_schema(json.loads(raw.http_response.text), "CreateEmbeddingResponse")
    response = raw.parse()
    assert response.model == "embed-test"
    assert len(response.data) == 1 and len(response.data[0].embedding) == 256
    assert math.isclose(sum(x * x for x in response.data[0].embedding), 1, rel_tol=1e-5)
    assert response.usage.prompt_tokens == 4
    assert_priced_row(raw.headers["x-request-id"], 4)


def test_base64_explicit_and_the_sdks_default_decode_to_the_same_floats(embedder):
    client = embedder.client()
    floats = client.embeddings.create(model="embed-test", input="one two three", encoding_format="float")
    raw = client.embeddings.with_raw_response.create(
        model="embed-test", input="one two three", encoding_format="base64"
    )
    explicit = raw.parse()
    assert isinstance(explicit.data[0].embedding, str)  # asked explicitly: the SDK leaves it encoded
    assert decoded(explicit.data[0].embedding) == floats.data[0].embedding
    assert_priced_row(raw.headers["x-request-id"], 3)

    raw = client.embeddings.with_raw_response.create(model="embed-test", input="one two three")
    assert json.loads(raw.http_response.text)["data"][0]["embedding"] == explicit.data[0].embedding
    assert raw.parse().data[0].embedding == floats.data[0].embedding  # the SDK asked for base64 and decoded it
    assert_priced_row(raw.headers["x-request-id"], 3)


def test_lists_token_arrays_and_dimensions(embedder):
    client = embedder.client()
    raw = client.embeddings.with_raw_response.create(
        model="embed-test", input=["alpha beta", "gamma"], dimensions=16, encoding_format="float"
    )
    texts = raw.parse()
    assert [(item.index, len(item.embedding)) for item in texts.data] == [(0, 16), (1, 16)]
    assert_priced_row(raw.headers["x-request-id"], 3)

    raw = client.embeddings.with_raw_response.create(model="embed-test", input=[[1, 2, 3], [4, 5]], dimensions=8)
    assert [len(item.embedding) for item in raw.parse().data] == [8, 8]
    assert_priced_row(raw.headers["x-request-id"], 5)

    raw = client.embeddings.with_raw_response.create(model="embed-test", input=[7, 8, 9, 10])
    assert len(raw.parse().data) == 1
    assert_priced_row(raw.headers["x-request-id"], 4)
    sent = [r["body"] for r in embedder.upstream.requests if r["path"] == "/v1/embeddings"]
    assert sent[0]["model"] == "fake-embedding-small" and sent[0]["dimensions"] == 16


def test_floats_from_an_upstream_that_ignores_base64_are_encoded(embedder):
    client = embedder.client()
    floats = client.embeddings.create(model="embed-test", input="same words", encoding_format="float")
    asked = client.embeddings.create(
        model="embed-test", input="same words [[encoding=float]]", encoding_format="base64"
    )
    assert isinstance(asked.data[0].embedding, str)
    other = client.embeddings.create(model="embed-test", input="same words [[encoding=float]]", encoding_format="float")
    assert decoded(asked.data[0].embedding) == other.data[0].embedding != floats.data[0].embedding


def test_embeddings_an_upstream_lists_out_of_order_or_without_index_come_in_input_order(embedder):
    client = embedder.client()
    texts = ["first", "second [[order=reversed]]", "third"]
    alone = [client.embeddings.create(model="embed-test", input=text).data[0].embedding for text in texts]
    raw = client.embeddings.with_raw_response.create(model="embed-test", input=texts, encoding_format="float")
    body = json.loads(raw.http_response.text)
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert [item["embedding"] for item in body["data"]] == alone  # the SDK's user reads data[i] for input i

    texts = ["first", "third [[omit=index]]"]
    raw = client.embeddings.with_raw_response.create(model="embed-test", input=texts, encoding_format="float")
    body = json.loads(raw.http_response.text)
    validate_openai_schema(body, "CreateEmbeddingResponse")
    assert [item["index"] for item in body["data"]] == [0, 1]


@pytest.mark.parametrize("model", ["embed-test", "cohere-embed"])
def test_an_upstream_that_answers_fewer_embeddings_than_inputs_is_an_error_not_a_short_list(other_kinds, model):
    # A client pairs data[i] with input i: a list one short would leave its last text without a vector.
    embedder = other_kinds
    with pytest.raises(openai.APIStatusError) as failed:
        embedder.client().embeddings.create(model=model, input=["a", "b", "c [[vectors=2]]"], encoding_format="float")
    assert failed.value.status_code == 502
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    assert (record.operation, record.status, record.cost) == ("embeddings", "upstream_error", 0)


def test_an_upstream_without_usage_is_charged_an_estimate_and_the_row_says_so(embedder):
    text = "no usage here [[usage=none]]"
    raw = embedder.client().embeddings.with_raw_response.create(model="embed-test", input=text, encoding_format="float")
    body = json.loads(raw.http_response.text)
    validate_openai_schema(body, "CreateEmbeddingResponse")  # the usage the spec requires is filled in
    estimate = math.ceil(len(text) / 4)
    assert body["usage"] == {"prompt_tokens": estimate, "total_tokens": estimate}
    assert_priced_row(raw.headers["x-request-id"], estimate, estimated=True)


def test_a_budget_that_cannot_pay_the_input_is_refused_before_the_upstream(store, embedder):
    # $0.0001 pays for 5,000 input tokens: 20,000 characters reserve up to 10,000, a short text a handful.
    api_key_limits_set(api_key=embedder.api_key, budget_usd=Decimal("0.0001"))
    client = embedder.client()
    with pytest.raises(openai.RateLimitError) as refused:
        client.embeddings.create(model="embed-test", input="word " * 4000, encoding_format="float")
    assert refused.value.code == "insufficient_quota"
    # No Retry-After, as OpenAI's: waiting seconds refills no budget (the README says so).
    assert "retry-after" not in refused.value.response.headers
    assert "/v1/embeddings" not in embedder.upstream.stats["by_path"]
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert (record.operation, record.status, record.cost) == ("embeddings", "rejected", 0)

    raw = client.embeddings.with_raw_response.create(model="embed-test", input="short", encoding_format="float")
    assert_priced_row(raw.headers["x-request-id"], 1)


def test_a_provider_counting_a_token_a_byte_is_charged_within_the_budget(store, embedder):
    """The reservation is the input's bound, which must be one for the provider's tokenizer: a byte-level BPE
    (OpenAI's, Mistral's, Cohere's) makes at most one token of each UTF-8 byte, and a text of emoji or of rare CJK
    characters comes close to it. Bounded at two characters a token, this text was admitted on a reservation of
    about 1,000 tokens and charged 8,000, past the key's budget."""
    text = "\U0001f642" * 2000 + " [[count=bytes]]"
    counted = len(text.encode())  # what the fake provider bills, as a byte-level tokenizer at its worst
    client = embedder.client()

    # $0.0001 pays for 5,000 tokens: more than the old bound, less than the provider counts.
    api_key_limits_set(api_key=embedder.api_key, budget_usd=Decimal("0.0001"))
    with pytest.raises(openai.RateLimitError) as refused:
        client.embeddings.create(model="embed-test", input=text, encoding_format="float")
    assert refused.value.code == "insufficient_quota"
    assert "/v1/embeddings" not in embedder.upstream.stats["by_path"]

    # $0.0002 pays for 10,000 tokens, the bound and what is counted.
    api_key_limits_set(api_key=embedder.api_key, budget_usd=Decimal("0.0002"))
    raw = client.embeddings.with_raw_response.create(model="embed-test", input=text, encoding_format="float")
    record = assert_priced_row(raw.headers["x-request-id"], counted)
    assert counted <= prompt_token_bounds({"input": text}, operation="embeddings")[0] <= 10_000
    assert record.cost <= Decimal("0.0002")


def test_a_list_of_token_arrays_reserves_its_exact_size(store, embedder):
    # 5,000 tokens at $0.02 per million cost exactly $0.0001: the budget pays for 5,000 and not for 5,001.
    api_key_limits_set(api_key=embedder.api_key, budget_usd=Decimal("0.0001"))
    client = embedder.client()
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model="embed-test", input=[[1] * 2500, [2] * 2501], encoding_format="float")
    raw = client.embeddings.with_raw_response.create(
        model="embed-test", input=[[1] * 2500, [2] * 2500], encoding_format="float"
    )
    record = assert_priced_row(raw.headers["x-request-id"], 5000)
    start = period_bounds(BudgetPeriod.MONTHLY, record.created_at)[0]
    ref = CounterRef("key", embedder.api_key.pk, "cost", BudgetPeriod.MONTHLY, start)
    assert counter_state(ref) == (Decimal("0.0001"), Decimal(0))  # spent in full, nothing left held


def test_a_chat_model_is_refused_on_embeddings_and_an_embedding_model_on_chat(embedder):
    client = embedder.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="gpt-test", input="hello", encoding_format="float")
    assert (refused.value.param, refused.value.code) == ("model", "model_not_supported")
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert (record.operation, record.status) == ("embeddings", "rejected")

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="embed-test", messages=[{"role": "user", "content": "hello"}])
    assert (refused.value.param, refused.value.code) == ("model", "model_not_supported")
    assert embedder.upstream.stats["requests"] == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "embed-test"}, "input"),
        ({"model": "embed-test", "input": ""}, "input"),
        ({"model": "embed-test", "input": []}, "input"),
        ({"model": "embed-test", "input": ["x"] * 2049}, "input"),
        ({"model": "embed-test", "input": ["fine", ""]}, "input[1]"),
        ({"model": "embed-test", "input": [1, 2.5]}, "input[1]"),
        ({"model": "embed-test", "input": [[1, 2], [True]]}, "input[1][0]"),
        ({"model": "embed-test", "input": [[1], []]}, "input[1]"),
        ({"model": "embed-test", "input": [{"text": "x"}]}, "input[0]"),
        ({"model": "embed-test", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "embed-test", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "embed-test", "input": "x", "user": 7}, "user"),
        ({"input": "x"}, "model"),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(embedder, body, param):
    response = httpx.post(
        embedder.url + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {embedder.key}"}, timeout=20
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert embedder.upstream.stats["requests"] == 0


@pytest.mark.parametrize("model", ["embed-test", "gemini-embed", "cohere-embed"])
def test_an_input_too_long_for_the_model_is_a_400_naming_input(other_kinds, model):
    # An embeddings request has no `messages`: what the provider found too long is its `input`.
    with pytest.raises(openai.BadRequestError) as refused:
        other_kinds.client().embeddings.create(
            model=model, input=["fine", "far too long [[fault=context_length]]"], encoding_format="float"
        )
    assert (refused.value.code, refused.value.param) == ("context_length_exceeded", "input")
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert (record.operation, record.status, record.cost) == ("embeddings", "invalid", 0)


@pytest.mark.parametrize(
    ("model", "path", "size"),
    [
        ("gemini-embed", "/v1beta/models/gemini-embedding-001:batchEmbedContents", 250),
        ("cohere-embed", "/cohere/v2/embed", 250),
        ("mistral-embed", "/mistral/v1/embeddings", 1100),
    ],
)
def test_a_batch_larger_than_the_providers_limit_is_split_in_order_and_billed_once(other_kinds, model, path, size):
    # Gemini embeds at most 100 texts a call, Cohere 96, Mistral 512: a RAG pipeline's chunks take three calls.
    texts = [f"chunk number {i}" for i in range(size)]
    client = other_kinds.client()
    raw = client.embeddings.with_raw_response.create(model=model, input=texts, encoding_format="float")
    body = json.loads(raw.http_response.text)
    validate_openai_schema(body, "CreateEmbeddingResponse")
    assert [item["index"] for item in body["data"]] == list(range(size))
    assert other_kinds.upstream.stats["by_path"][path] == 3
    alone = client.embeddings.create(model=model, input=texts[137], encoding_format="float")
    assert body["data"][137]["embedding"] == alone.data[0].embedding
    record = wait_for_record(raw.headers["x-request-id"])
    assert UsageRecord.objects.filter(request_id=record.request_id).count() == 1
    assert (record.status, record.prompt_tokens) == ("ok", body["usage"]["prompt_tokens"])
    if model != "gemini-embed":  # the provider's counts of the three calls, summed (Gemini reports none)
        assert (record.prompt_tokens, record.usage_estimated) == (3 * size, False)
    assert record.cost == Decimal(record.prompt_tokens) * INPUT_PRICE / MILLION


def test_a_split_request_one_of_whose_calls_reports_no_usage_is_charged_an_estimate(other_kinds):
    texts = [f"chunk number {i}" for i in range(600)]
    texts[550] += " [[usage=none]]"  # the second call's
    raw = other_kinds.client().embeddings.with_raw_response.create(
        model="mistral-embed", input=texts, encoding_format="float"
    )
    body = json.loads(raw.http_response.text)
    validate_openai_schema(body, "CreateEmbeddingResponse")
    record = wait_for_record(raw.headers["x-request-id"])
    assert record.usage_estimated and record.prompt_tokens == body["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize("model", ["gemini-embed", "cohere-embed", "mistral-embed"])
def test_a_refused_batch_among_several_is_the_requests_error_with_one_row(other_kinds, model):
    texts = [f"chunk number {i}" for i in range(600)]
    texts[550] += " [[fault=400]]"  # a later call's
    with pytest.raises(openai.BadRequestError) as refused:
        other_kinds.client().embeddings.create(model=model, input=texts, encoding_format="float")
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert UsageRecord.objects.filter(request_id=record.request_id).count() == 1
    assert (record.operation, record.status) == ("embeddings", "invalid")
    # The calls answered before the refusal were paid (which ones depends on timing: see the test below).
    assert record.cost == Decimal(record.prompt_tokens) * INPUT_PRICE / MILLION


@pytest.mark.parametrize(
    ("model", "size", "paid"),
    [("gemini-embed", 250, 200), ("cohere-embed", 250, 192), ("mistral-embed", 600, 512)],
)
def test_a_split_request_whose_last_call_fails_is_charged_the_calls_the_provider_answered(
    store, other_kinds, model, size, paid
):
    """Gemini embeds 100 texts a call, Cohere 96, Mistral 512: the calls before the one that fails were answered
    (and billed by the provider), so the request's one row carries their tokens and cost, still as a failure,
    and the key's budget is charged that cost."""
    api_key_limits_set(api_key=other_kinds.api_key, budget_usd=Decimal(1))
    texts = [f"chunk number {i}" for i in range(size)]
    texts[-1] += " [[latency=1500]] [[fault=400]]"  # the last call's, answered after the others
    with pytest.raises(openai.BadRequestError) as refused:
        other_kinds.client().embeddings.create(model=model, input=texts, encoding_format="float")
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert UsageRecord.objects.filter(request_id=record.request_id).count() == 1
    assert (record.operation, record.status, record.model_name) == ("embeddings", "invalid", model)
    if model == "gemini-embed":  # Gemini counts no tokens: the answered texts, estimated
        tokens = prompt_tokens({"input": texts[:paid]}, operation="embeddings")
        assert (record.prompt_tokens, record.usage_estimated) == (tokens, True)
    else:  # the provider's counts of the answered calls: three words a text
        assert (record.prompt_tokens, record.usage_estimated) == (3 * paid, False)
    assert record.cost == Decimal(record.prompt_tokens) * INPUT_PRICE / MILLION > 0
    start = period_bounds(BudgetPeriod.MONTHLY, record.created_at)[0]
    ref = CounterRef("key", other_kinds.api_key.pk, "cost", BudgetPeriod.MONTHLY, start)
    assert counter_state(ref) == (record.cost, Decimal(0))  # charged what was paid, nothing left held


def test_a_split_request_failing_on_every_retry_pays_each_answered_call_once_within_its_budget(store, other_kinds):
    """Each input is embedded at most once per request: a retry sends only the calls not answered yet, so the
    second call fails four times while the first is sent and paid once. Until 5 December every attempt sent
    both, and the failed request was charged each attempt's first call: 4 x 1,536 tokens, past the key's budget,
    which held only what the request's 600 inputs can cost once."""
    CatalogModel.objects.filter(name="mistral-embed").update(retries=3)
    price = Decimal(10)  # per million input tokens: a budget's four decimal places can then hold the reservation
    Deployment.objects.filter(model__name="mistral-embed").update(input_per_mtok=price)
    texts = [f"chunk number {i}" for i in range(600)]
    texts[-1] += " [[latency=1000]] [[fault=500]]"  # the second call's, answered after the first
    reserved = prompt_token_bounds({"input": texts}, operation="embeddings")[0] * price / MILLION
    budget = reserved.quantize(Decimal("0.0001"), ROUND_CEILING)  # what admission holds, and no more
    api_key_limits_set(api_key=other_kinds.api_key, budget_usd=budget)
    with pytest.raises(openai.InternalServerError) as failed:
        other_kinds.client().embeddings.create(model="mistral-embed", input=texts, encoding_format="float")
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    assert UsageRecord.objects.filter(request_id=record.request_id).count() == 1
    assert (record.status, record.attempts, record.usage_estimated) == ("upstream_error", 4, False)
    assert other_kinds.upstream.stats["by_path"]["/mistral/v1/embeddings"] == 1 + 4
    assert record.prompt_tokens == 3 * 512
    assert record.cost == Decimal(record.prompt_tokens) * price / MILLION
    start = period_bounds(BudgetPeriod.MONTHLY, record.created_at)[0]
    ref = CounterRef("key", other_kinds.api_key.pk, "cost", BudgetPeriod.MONTHLY, start)
    assert counter_state(ref) == (record.cost, Decimal(0))
    assert record.cost <= budget


def test_a_split_request_retried_after_a_blip_sends_only_the_unanswered_call_and_pays_every_input_once(
    other_kinds,
):
    """The first call is answered, the second fails once: the retry sends the second alone and keeps the first's
    vectors (the same deployment and upstream model: one space). Until 5 December the retry embedded all 600
    again, and the request paid for one of the two embeddings of the first 512 the provider billed."""
    CatalogModel.objects.filter(name="mistral-embed").update(retries=1)
    texts = [f"chunk number {i}" for i in range(600)]
    texts[-1] += " [[latency=1000]] [[fault=500]] [[fault_times=1]]"
    client = other_kinds.client()
    raw = client.embeddings.with_raw_response.create(model="mistral-embed", input=texts, encoding_format="float")
    body = json.loads(raw.http_response.text)
    validate_openai_schema(body, "CreateEmbeddingResponse")
    assert other_kinds.upstream.stats["by_path"]["/mistral/v1/embeddings"] == 1 + 2
    sent = [len(r["body"]["input"]) for r in other_kinds.upstream.requests if r["path"].endswith("/embeddings")]
    assert sorted(sent) == [88, 88, 512]  # every input embedded once, the failed call's sent again
    assert [item["index"] for item in body["data"]] == list(range(600))
    for index in (0, 511, 512, 599):
        alone = client.embeddings.create(model="mistral-embed", input=texts[index], encoding_format="float")
        assert body["data"][index]["embedding"] == alone.data[0].embedding
    record = wait_for_record(raw.headers["x-request-id"])
    words = sum(len(text.split()) for text in texts)
    assert (record.status, record.attempts, record.usage_estimated) == ("ok", 2, False)
    assert record.prompt_tokens == body["usage"]["prompt_tokens"] == words


def test_a_split_request_partly_answered_is_retried_on_the_deployment_that_answered(other_kinds):
    """Another deployment would embed every input again, and in another space if its upstream model differed:
    once a deployment has answered part of a request, the retries go to it alone. Until 5 December the retry
    went to the model's other deployment, which embedded all 600 again."""
    model = CatalogModel.objects.get(name="mistral-embed")
    CatalogModel.objects.filter(pk=model.pk).update(retries=1)
    first = model.deployments.get()
    DeploymentFactory(
        model=model, provider=first.provider, name="second", upstream_id=first.upstream_id, input_per_mtok=INPUT_PRICE
    )
    texts = [f"chunk number {i}" for i in range(600)]
    texts[-1] += " [[latency=1000]] [[fault=500]]"
    with pytest.raises(openai.InternalServerError) as failed:
        other_kinds.client().embeddings.create(model="mistral-embed", input=texts, encoding_format="float")
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    sent = [len(r["body"]["input"]) for r in other_kinds.upstream.requests if r["path"].endswith("/embeddings")]
    assert sorted(sent) == [88, 88, 512]
    assert (record.status, record.attempts, record.prompt_tokens) == ("upstream_error", 2, 3 * 512)


def test_an_embedding_model_of_a_provider_without_embeddings_is_an_error_with_its_row(embedder):
    ModelFactory(
        name="claude-embed",
        provider=Provider.objects.get(name="fake-anthropic"),
        upstream_id="fake-claude-haiku",
        mode=ModelMode.EMBEDDING,
    )
    with pytest.raises(openai.BadRequestError) as refused:
        embedder.client().embeddings.create(model="claude-embed", input="hello", encoding_format="float")
    assert refused.value.code == "embeddings_not_supported"
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert (record.operation, record.status, record.cost) == ("embeddings", "invalid", 0)


def test_v1_models_lists_embedding_models_and_the_chat_picker_does_not(embedder):
    listed = [model.id for model in embedder.client().models.list()]
    assert "embed-test" in listed and "gpt-test" in listed
    assert embedder.client().models.retrieve("embed-test").id == "embed-test"
    picker = async_to_sync(models_allowed)(user_id=embedder.user.pk, key_allowed_model_ids=None)
    assert "gpt-test" in [m.name for m in picker] and "embed-test" not in [m.name for m in picker]


def test_the_chat_page_offers_no_embedding_model(embedder, client):
    client.force_login(embedder.user)
    page = client.get("/").content.decode()
    assert 'value="gpt-test"' in page and "embed-test" not in page


async def test_an_embedding_model_on_the_chat_socket_is_refused(embedder):
    communicator, connected, _ = await open_socket(user=embedder.user)
    assert connected
    try:
        await communicator.send_json_to(
            {"type": "chat.send", "conversation": None, "model": "embed-test", "content": "hi", "request_id": "e1"}
        )
        events = await events_until(communicator, ends("e1"))
    finally:
        await communicator.disconnect(timeout=10)
        await ledger_flush()
    assert events[-1]["type"] == "error"
    assert (events[-1]["code"], events[-1]["param"]) == ("model_not_supported", "model")


def test_an_embedding_model_never_falls_back_to_another_model(embedder):
    # Another model's vectors live in another space (often of another size): a client's index could neither
    # compare nor store them, and a fallback would hand them over as if they were the model's own.
    failing = ModelFactory(
        name="embed-failing",
        provider=Provider.objects.get(name="fake-openai"),
        upstream_id="fault-500",
        mode=ModelMode.EMBEDDING,
        input_per_mtok=INPUT_PRICE,
        output_per_mtok=Decimal(0),
    )
    failing.fallbacks = ["embed-test"]  # saved as a catalog written before the admin refused it would hold it
    failing.save()
    with pytest.raises(openai.InternalServerError) as failed:
        embedder.client().embeddings.create(model="embed-failing", input="hello", encoding_format="float")
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    assert (record.model_name, record.status, record.cost) == ("embed-failing", "upstream_error", 0)
    assert all(r["body"].get("model") != "fake-embedding-small" for r in embedder.upstream.requests)


def test_the_catalog_refuses_fallbacks_on_an_embedding_model(embedder):
    from django.core.exceptions import ValidationError

    model = CatalogModel.objects.get(name="embed-test")
    for field in ("fallbacks", "context_window_fallbacks"):
        setattr(model, field, ["gpt-test"])
        with pytest.raises(ValidationError) as refused:
            model.full_clean()
        assert "another model's" in str(refused.value.message_dict[field])
        setattr(model, field, [])
    model.full_clean()


@pytest.mark.parametrize("model", ["cohere-embed", "gemini-embed"])
def test_a_search_query_is_embedded_as_a_query(other_kinds, model):
    # Cohere and Gemini embed a query apart from the documents it should find (input_type / taskType): a
    # retrieval app embeds its documents one way and each question the other, and the two are compared.
    client = other_kinds.client()

    def vector(**extra):
        return client.embeddings.create(model=model, input="where is the cat", encoding_format="float", **extra)

    document = vector(extra_body={"input_type": "search_document"}).data[0].embedding
    unnamed = vector().data[0].embedding
    # Cohere needs a type and gets documents' when none is named; Gemini keeps its own default (its vectors
    # for a request naming none are what an index built before input_type holds).
    assert (unnamed == document) is (model == "cohere-embed")
    query = vector(extra_body={"input_type": "search_query"}).data[0].embedding
    assert query != document and query != unnamed
    assert vector(extra_body={"input_type": "search_query"}).data[0].embedding == query  # the same each time
    assert vector(extra_body={"input_type": "clustering"}).data[0].embedding not in (query, document)


@pytest.mark.parametrize("model", ["cohere-embed", "gemini-embed"])
@pytest.mark.parametrize("value", ["question", 7, ""])
def test_an_unknown_input_type_is_a_400_naming_the_choices(other_kinds, model, value):
    with pytest.raises(openai.BadRequestError) as refused:
        other_kinds.client().embeddings.create(model=model, input="x", extra_body={"input_type": value})
    error = refused.value.body
    assert error["param"] == "input_type" and "search_query" in error["message"]
    record = wait_for_record(refused.value.response.headers["x-request-id"])
    assert record.cost == 0 and record.status in ("rejected", "invalid")


def test_an_input_type_that_is_not_a_string_is_a_400_on_any_model(embedder):
    # An OpenAI-compatible server may take its own values (NVIDIA's "query"/"passage"), so only the type is
    # judged before it: a string goes through untouched.
    with pytest.raises(openai.BadRequestError) as refused:
        embedder.client().embeddings.create(model="embed-test", input="x", extra_body={"input_type": ["query"]})
    assert refused.value.body["param"] == "input_type"
    assert embedder.upstream.requests == []
