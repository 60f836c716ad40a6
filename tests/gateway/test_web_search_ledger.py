"""Anthropic's web searches charged as Anthropic bills them ($10 per 1,000 searches, beside the tokens), end to end:
the fake upstream reports ``usage.server_tool_use.web_search_requests`` (``[[web_search=N]]``: in the message's
usage, streamed in ``message_delta``'s); called with the anthropic SDK on ``/v1/messages``, whole, streamed, and
streamed with the connection cut after ``message_delta``, each ledger row keeps the searches and prices them at the
deployment's price per 1,000."""

from __future__ import annotations

from decimal import Decimal

import pytest

from billing.models import UsageRecord
from providers.models import Deployment
from tests.gateway.test_cache_write_ledger import anthropic_client
from tests.gateway.test_ledger import settle_quietly
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
# 7 prompt tokens (3 + 4 words, the directives' words included), a reply of 2 tokens, 3 searches.
PROMPT = "weather [[web_search=3]] [[reply=sunny today]]"
# 7 × $1/M input + 2 × $2/M output + 3 × $10/1,000 searches. (Before, the searches were free: 0.0000110000.)
COST = Decimal("0.0300110000")


@pytest.fixture
def priced(gateway):
    Deployment.objects.filter(model__name="claude-test").update(
        input_per_mtok=Decimal(1), output_per_mtok=Decimal(2), web_search_per_1k=Decimal(10)
    )
    return gateway


def assert_row(request_id: str, *, estimated: bool = False) -> UsageRecord:
    record = wait_for_record(request_id)
    settle_quietly()
    assert UsageRecord.objects.count() == 1
    assert (record.prompt_tokens, record.completion_tokens, record.web_search_requests) == (7, 2, 3)
    assert (record.cost, record.usage_estimated) == (COST, estimated)
    return record


def test_a_message_that_searched_the_web_is_charged_its_searches(priced):
    raw = anthropic_client(priced).messages.with_raw_response.create(
        model="claude-test", max_tokens=50, tools=[WEB_SEARCH], messages=[{"role": "user", "content": PROMPT}]
    )
    # The client reads Anthropic's usage as the upstream reported it.
    assert raw.parse().usage.server_tool_use.web_search_requests == 3
    assert_row(raw.headers["x-request-id"])


def test_a_streamed_message_is_charged_the_searches_its_message_delta_counted(priced):
    client = anthropic_client(priced)
    body = {"model": "claude-test", "max_tokens": 50, "tools": [WEB_SEARCH]}
    with client.messages.stream(**body, messages=[{"role": "user", "content": PROMPT}]) as streamed:
        assert streamed.get_final_message().usage.server_tool_use.web_search_requests == 3
        request_id = streamed.response.headers["x-request-id"]
    assert_row(request_id)


def test_a_stream_cut_after_its_message_delta_is_charged_the_searches(priced):
    """The usage ``message_delta`` reported is the provider's final count, searches included, even when the
    connection breaks before ``message_stop``."""
    client = anthropic_client(priced)
    body = {"model": "claude-test", "max_tokens": 50, "tools": [WEB_SEARCH]}
    content = PROMPT + " [[fault=drop-after-usage]]"
    with client.messages.with_streaming_response.create(
        **body, stream=True, messages=[{"role": "user", "content": content}]
    ) as response:
        request_id = response.headers["x-request-id"]
        events = [line for line in response.iter_lines() if line.startswith("event: ")]
    assert events[-1] == "event: error"  # the relay tells the client the stream broke
    record = wait_for_record(request_id)
    settle_quietly()
    # 5 words: the fault's directive is one more prompt word.
    assert (record.prompt_tokens, record.completion_tokens, record.web_search_requests) == (8, 2, 3)
    assert record.cost == Decimal("0.0300120000")
    assert (record.status, record.usage_estimated) == ("upstream_error", False)


def test_without_a_search_price_the_searches_cost_nothing(gateway):
    """A deployment priced before the search price existed keeps its prices; the row still counts the searches."""
    Deployment.objects.filter(model__name="claude-test").update(input_per_mtok=Decimal(1), output_per_mtok=Decimal(2))
    raw = anthropic_client(gateway).messages.with_raw_response.create(
        model="claude-test", max_tokens=50, tools=[WEB_SEARCH], messages=[{"role": "user", "content": PROMPT}]
    )
    record = wait_for_record(raw.headers["x-request-id"])
    assert (record.web_search_requests, record.cost) == (3, Decimal("0.0000110000"))


def test_a_request_with_the_web_search_tool_reserves_its_searches(priced):
    """Admission reserves the searches a request may make, beside its tokens: ``max_uses`` of each web search tool
    (``WEB_SEARCHES_UNBOUNDED`` when it sets none) at the model's dearest search price. A key with $0.02 left pays
    for a request that may search once, and refuses one that may search five times, or any number, before the
    provider is called; before, the searches were reserved at nothing and both went through."""
    import anthropic

    from billing.services.budgets import api_key_limits_set

    api_key_limits_set(api_key=priced.api_key, budget_usd=Decimal("0.02"))
    client = anthropic_client(priced)
    body = {"model": "claude-test", "max_tokens": 10, "messages": [{"role": "user", "content": "hi [[web_search=1]]"}]}

    assert client.messages.create(**body, tools=[{**WEB_SEARCH, "max_uses": 1}]).content
    requests = priced.upstream.stats["requests"]
    for tool in ({**WEB_SEARCH, "max_uses": 5}, {"type": "web_search_20250305", "name": "web_search"}):
        with pytest.raises(anthropic.RateLimitError) as refused:
            client.messages.create(**body, tools=[tool])
        assert "this request could need up to" in refused.value.message
    assert priced.upstream.stats["requests"] == requests


def test_a_stream_cut_before_its_message_delta_is_charged_the_searches_whose_results_arrived(priced):
    """Cut midway, a stream has no final usage: the row is an estimate of its tokens, and the searches whose
    results (``web_search_tool_result``) the client got ran, and were billed; before, they were charged nothing."""
    content = "weather [[web_search=2]] [[reply=sunny today]] [[fault=cut-1]]"
    with anthropic_client(priced).messages.with_streaming_response.create(
        model="claude-test",
        max_tokens=50,
        tools=[WEB_SEARCH],
        stream=True,
        messages=[{"role": "user", "content": content}],
    ) as response:
        request_id = response.headers["x-request-id"]
        lines = list(response.iter_lines())
    assert sum('"type":"web_search_tool_result"' in line for line in lines) == 2
    record = wait_for_record(request_id)
    assert (record.status, record.usage_estimated, record.web_search_requests) == ("upstream_error", True, 2)
    tokens = Decimal(record.prompt_tokens) / 1_000_000 + Decimal(record.completion_tokens) * 2 / 1_000_000
    assert record.cost == (tokens + Decimal("0.02")).quantize(Decimal("0.0000000001"))


def searching_model(upstream, first: str) -> None:
    """``searching``, resumable (``resume_on_failure``): its deployment ``first`` (the fake upstream's model of a
    fault) before ``second``, a healthy Claude, both at $10 per 1,000 searches."""
    from providers.models import CatalogModel
    from tests.factories import ProviderFactory

    model = CatalogModel.objects.create(name="searching", strategy="priority", resume_on_failure=True)
    for priority, (name, upstream_id) in enumerate((("first", first), ("second", "fake-claude-haiku"))):
        provider = ProviderFactory(name=f"searching-{name}", kind="anthropic", base_url=upstream.base_url)
        Deployment.objects.create(
            model=model,
            name=name,
            provider=provider,
            upstream_id=upstream_id,
            priority=priority,
            input_per_mtok=Decimal(1),
            output_per_mtok=Decimal(2),
            web_search_per_1k=Decimal(10),
        )


def searching_stream(gateway, content: str) -> tuple[str, list[str]]:
    with anthropic_client(gateway).messages.with_streaming_response.create(
        model="searching",
        max_tokens=50,
        tools=[WEB_SEARCH],
        stream=True,
        messages=[{"role": "user", "content": content}],
    ) as response:
        return response.headers["x-request-id"], list(response.iter_lines())


def test_a_stream_that_searched_then_broke_is_not_resumed_and_is_charged_its_searches(gateway):
    """94d8b03 said a resumed stream adds its failed attempts' searches to its count: no test showed it. A message
    whose attempt searched holds blocks that are not text (each search's ``server_tool_use`` and its results), which
    no other deployment can continue (``_MessagesSplice``): cut midway after its searches, it is not resumed, even on
    a model that opted in; the client is told the stream broke, and the row is charged the two searches whose results
    it got, beside its estimated tokens."""
    searching_model(gateway.upstream, "fault-cut-3")
    request_id, lines = searching_stream(gateway, "weather [[web_search=2]] [[words=8]]")

    assert sum('"type":"web_search_tool_result"' in line for line in lines) == 2
    assert "event: error" in lines and "event: message_stop" not in lines
    record = wait_for_record(request_id)
    assert (record.status, record.resumed, record.attempts, record.deployment_name) == (
        "upstream_error",
        False,
        1,
        "first",
    )
    assert (record.web_search_requests, record.usage_estimated) == (2, True)
    tokens = Decimal(record.prompt_tokens) / 1_000_000 + Decimal(record.completion_tokens) * 2 / 1_000_000
    assert record.cost == (tokens + Decimal("0.02")).quantize(Decimal("0.0000000001"))


def test_a_stream_that_failed_over_before_its_first_byte_is_charged_the_answering_attempts_searches(gateway):
    """The first deployment refused the stream before anything was sent (a 500: no search ran there, none billed);
    the second answered whole, its ``message_delta`` counting its two searches: the row has those two, not four."""
    searching_model(gateway.upstream, "fault-500")
    request_id, lines = searching_stream(gateway, "weather [[web_search=2]] [[reply=sunny today]]")

    assert "event: message_stop" in lines
    record = wait_for_record(request_id)
    assert (record.status, record.attempts, record.deployment_name) == ("ok", 2, "second")
    # 7 prompt tokens (3 + 4 words) at $1/M, 2 of reply at $2/M, 2 searches at $10/1,000.
    assert (record.prompt_tokens, record.completion_tokens, record.web_search_requests) == (7, 2, 2)
    assert (record.cost, record.usage_estimated) == (Decimal("0.0200110000"), False)
