"""Prompt-cache writes charged as Anthropic bills them, end to end: a native Anthropic deployment whose upstream
(the fake one, ``[[cache_write=N]]``) reports ``cache_creation_input_tokens``, called with the anthropic SDK on
``/v1/messages`` (passed through) and with the openai SDK on ``/v1/chat/completions`` (translated); each ledger row
keeps the tokens written to the cache and prices them at the deployment's cache-write price."""

from __future__ import annotations

import json
from decimal import Decimal

import anthropic
import pytest

from billing.models import UsageRecord
from providers.models import Deployment
from tests.gateway.test_ledger import settle_quietly
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

# 13 prompt tokens (3 + 10 words, the directives' words included): 3 read from the cache, 5 written to it, 5
# neither; the reply is 2 tokens.
PROMPT = "one two three four five six [[cache=3]] [[cache_write=5]] [[reply=hello there]]"
# At claude-test's prices, per million: 5 × 0.80 input + 3 × 0.08 cached + 5 × 1.00 cache write + 2 × 4.00 output.
# (Before, the 5 written were charged as input: 0.00001624.)
COST = Decimal("0.0000172400")


@pytest.fixture
def priced(gateway):
    Deployment.objects.filter(model__name="claude-test").update(
        cached_input_per_mtok=Decimal("0.08"), cache_write_per_mtok=Decimal("1.00")
    )
    return gateway


def anthropic_client(gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)


def assert_row(request_id: str) -> UsageRecord:
    record = wait_for_record(request_id)
    settle_quietly()
    assert UsageRecord.objects.count() == 1
    assert (record.prompt_tokens, record.cached_tokens, record.cache_write_tokens, record.completion_tokens) == (
        13,
        3,
        5,
        2,
    )
    assert record.cost == COST and not record.usage_estimated
    return record


def test_a_message_that_writes_the_cache_is_charged_its_writes_at_the_cache_write_price(priced):
    raw = anthropic_client(priced).messages.with_raw_response.create(
        model="claude-test", max_tokens=50, messages=[{"role": "user", "content": PROMPT}]
    )
    usage = raw.parse().usage
    # The client reads Anthropic's usage as the upstream reported it.
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (5, 3, 5)
    assert_row(raw.headers["x-request-id"])


def test_a_streamed_message_is_charged_the_writes_message_start_reported(priced):
    with anthropic_client(priced).messages.stream(
        model="claude-test", max_tokens=50, messages=[{"role": "user", "content": PROMPT}]
    ) as stream:
        message = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert (message.usage.input_tokens, message.usage.cache_creation_input_tokens) == (5, 5)
    assert_row(request_id)


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_completion_translated_from_anthropic_is_charged_the_same(priced, stream):
    """OpenAI's ``prompt_tokens`` counts every prompt token, those read from and written to the cache included:
    neither dropped nor counted twice."""
    client = priced.client()
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model="claude-test",
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            stream_options={"include_usage": True},
        ) as response:
            request_id = response.headers["x-request-id"]
            chunks = list(response.parse())
        usage = chunks[-1].usage
    else:
        raw = client.chat.completions.with_raw_response.create(
            model="claude-test", messages=[{"role": "user", "content": PROMPT}]
        )
        request_id, usage = raw.headers["x-request-id"], raw.parse().usage
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (13, 3)
    assert_row(request_id)


def test_a_stream_cut_after_message_start_is_charged_the_writes_message_start_counted(priced):
    """The upstream fails midway: the row is an estimate of what was relayed, but the prompt is message_start's
    count, its cache writes at their price."""
    from tests.gateway.test_messages_api import raw_events

    words = " ".join(f"w{n}" for n in range(200))
    content = f"{words} [[words=9]] [[cache=50]] [[cache_write=100]] [[fault=cut-3]]"
    body = {"model": "claude-test", "max_tokens": 50, "messages": [{"role": "user", "content": content}]}
    reply, events = raw_events(priced, body)
    assert events[-1][0] == "error"
    [opened] = [json.loads(data)["message"]["usage"] for name, data in events if name == "message_start"]
    assert (opened["input_tokens"], opened["cache_creation_input_tokens"]) == (57, 100)  # 207 - 50 - 100

    record = wait_for_record(reply.headers["x-request-id"])
    assert record.status == "upstream_error" and record.usage_estimated
    assert (record.prompt_tokens, record.cached_tokens, record.cache_write_tokens) == (207, 50, 100)
    expected = (
        57 * Decimal("0.80") + 50 * Decimal("0.08") + 100 * Decimal("1.00") + record.completion_tokens * Decimal("4")
    ) / 1_000_000
    assert record.completion_tokens > 0 and record.cost == expected.quantize(Decimal("0.0000000001"))


def test_a_request_that_may_end_on_a_fallback_is_reserved_at_the_fallbacks_cache_write_price(gateway):
    """The reservation covers every model a request may end on (the dearest prices of them all): a fallback
    whose cache writes cost $0.50 a token makes a key with $1 left refuse a request of a few prompt tokens, which
    its own model's prices would have let through to spend past the budget."""
    from billing.services.budgets import api_key_limits_set
    from providers.models import CatalogModel, Provider

    provider = Provider.objects.get(name="fake-anthropic")
    cheap = {"input_per_mtok": Decimal(1), "output_per_mtok": Decimal(1)}
    for name, model in (("written", {}), ("primary", {"fallbacks": ["written"]})):
        catalog = CatalogModel.objects.create(name=name, **model)
        Deployment.objects.create(model=catalog, provider=provider, upstream_id="fake-claude-haiku", **cheap)
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal(1))
    client = anthropic_client(gateway)
    body = {"max_tokens": 10, "messages": [{"role": "user", "content": "hello"}]}

    assert client.messages.create(model="primary", **body).content  # within the budget at these prices
    written = Deployment.objects.get(model__name="written")
    written.cache_write_per_mtok = Decimal(500_000)
    written.save()  # as the admin saves it: the catalog's caches hear of it

    with pytest.raises(anthropic.RateLimitError) as refused:
        client.messages.create(model="primary", **body)
    assert "this request could need up to" in refused.value.message
