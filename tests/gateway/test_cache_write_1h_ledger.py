"""Writes to Anthropic's 1-hour prompt cache charged as Anthropic bills them (2× input, against 1.25× for the
5-minute cache), end to end: the fake upstream reports ``cache_creation.ephemeral_1h_input_tokens``
(``[[cache_write_1h=N]]``) beside ``cache_creation_input_tokens``; called with the anthropic SDK on ``/v1/messages``
and with the openai SDK on ``/v1/chat/completions``, streamed and not, each ledger row keeps how many of the writes
went to the 1-hour cache and prices them at the deployment's 1-hour price."""

from __future__ import annotations

from decimal import Decimal

import anthropic
import pytest

from billing.models import UsageRecord
from providers.models import Deployment
from tests.gateway.test_cache_write_ledger import anthropic_client
from tests.gateway.test_ledger import settle_quietly
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

# 14 prompt tokens (3 + 11 words, the directives' words included): 3 read from the cache, 5 written to it (2 of
# them to the 1-hour cache), 6 neither; the reply is 2 tokens.
PROMPT = "one two three four five six [[cache=3]] [[cache_write=5]] [[cache_write_1h=2]] [[reply=hello there]]"
# Per million: 6 × 0.80 input + 3 × 0.08 cached + 3 × 1.00 five-minute writes + 2 × 1.60 one-hour writes
# + 2 × 4.00 output. (Before, the 2 one-hour writes were charged at 1.00: 0.00001804.)
COST = Decimal("0.0000192400")


@pytest.fixture
def priced(gateway):
    Deployment.objects.filter(model__name="claude-test").update(
        cached_input_per_mtok=Decimal("0.08"),
        cache_write_per_mtok=Decimal("1.00"),
        cache_write_1h_per_mtok=Decimal("1.60"),
    )
    return gateway


def assert_row(request_id: str) -> None:
    record = wait_for_record(request_id)
    settle_quietly()
    assert UsageRecord.objects.count() == 1
    assert (record.prompt_tokens, record.cached_tokens, record.cache_write_tokens, record.cache_write_1h_tokens) == (
        14,
        3,
        5,
        2,
    )
    assert (record.completion_tokens, record.cost, record.usage_estimated) == (2, COST, False)


@pytest.mark.parametrize("stream", [False, True])
def test_a_message_that_writes_the_1_hour_cache_is_charged_those_writes_at_its_price(priced, stream):
    client = anthropic_client(priced)
    body = {"model": "claude-test", "max_tokens": 50, "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        with client.messages.stream(**body) as streamed:
            usage = streamed.get_final_message().usage
            request_id = streamed.response.headers["x-request-id"]
    else:
        raw = client.messages.with_raw_response.create(**body)
        usage, request_id = raw.parse().usage, raw.headers["x-request-id"]
    # The client reads Anthropic's usage as the upstream reported it.
    assert usage.cache_creation_input_tokens == 5
    assert usage.cache_creation is not None
    assert (usage.cache_creation.ephemeral_5m_input_tokens, usage.cache_creation.ephemeral_1h_input_tokens) == (3, 2)
    assert_row(request_id)


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_completion_translated_from_anthropic_is_charged_the_same(priced, stream):
    client = priced.client()
    messages = [{"role": "user", "content": PROMPT}]
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model="claude-test", messages=messages, stream=True, stream_options={"include_usage": True}
        ) as response:
            request_id = response.headers["x-request-id"]
            usage = list(response.parse())[-1].usage
    else:
        raw = client.chat.completions.with_raw_response.create(model="claude-test", messages=messages)
        request_id, usage = raw.headers["x-request-id"], raw.parse().usage
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (14, 3)
    assert_row(request_id)


def test_without_a_1_hour_price_the_writes_cost_what_they_did(gateway):
    """A deployment priced before the 1-hour price existed keeps its prices: every write at its cache-write price."""
    Deployment.objects.filter(model__name="claude-test").update(
        cached_input_per_mtok=Decimal("0.08"), cache_write_per_mtok=Decimal("1.00")
    )
    raw = anthropic_client(gateway).messages.with_raw_response.create(
        model="claude-test", max_tokens=50, messages=[{"role": "user", "content": PROMPT}]
    )
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.cache_write_tokens, record.cache_write_1h_tokens) == (5, 2)
    assert record.cost == Decimal("0.0000180400")


def test_a_request_is_reserved_at_the_1_hour_cache_write_price_of_a_model_it_may_end_on(gateway):
    """The reservation covers the dearest prompt price among the models a request may end on: a fallback whose
    1-hour cache writes cost $0.50 a token makes a key with $1 left refuse a request of a few prompt tokens."""
    from billing.services.budgets import api_key_limits_set
    from providers.models import CatalogModel, Provider

    provider = Provider.objects.get(name="fake-anthropic")
    cheap = {"input_per_mtok": Decimal(1), "output_per_mtok": Decimal(1), "cache_write_per_mtok": Decimal(1)}
    for name, model in (("written", {}), ("primary", {"fallbacks": ["written"]})):
        catalog = CatalogModel.objects.create(name=name, **model)
        Deployment.objects.create(model=catalog, provider=provider, upstream_id="fake-claude-haiku", **cheap)
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal(1))
    client = anthropic_client(gateway)
    body = {"max_tokens": 10, "messages": [{"role": "user", "content": "hello"}]}

    assert client.messages.create(model="primary", **body).content  # within the budget at these prices
    written = Deployment.objects.get(model__name="written")
    written.cache_write_1h_per_mtok = Decimal(500_000)
    written.save()  # as the admin saves it: the catalog's caches hear of it

    with pytest.raises(anthropic.RateLimitError) as refused:
        client.messages.create(model="primary", **body)
    assert "this request could need up to" in refused.value.message
