"""A 429 that no wait can lift (a budget or quota spent, a request larger than its tokens-per-minute limit, a
limit of 0) says so with ``x-should-retry: false``, which both official SDKs obey: otherwise each call is sent
again twice with back-off (seconds of delay and a rejected ledger row each) for the same refusal. A 429 that a
wait lifts leaves the SDKs to retry as before."""

from __future__ import annotations

from decimal import Decimal

import anthropic
import openai
import pytest

from billing.models import UsageRecord
from billing.services.budgets import api_key_limits_set
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "hi"}]


def sdk(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, timeout=20)  # the SDK's own retries


def rejected_rows(refused: Exception) -> int:
    wait_for_record(refused.response.headers["x-request-id"])  # the last call's row: any earlier one is written
    return UsageRecord.objects.filter(status="rejected").count()


@pytest.mark.parametrize(
    "limits",
    [
        {"budget_usd": Decimal("0.0001")},  # spent by any request reserving 4,000 tokens
        {"budget_usd": None, "tpm": 50},  # the request alone is more than a minute allows
        {"budget_usd": None, "rpm": 0},
    ],
)
def test_a_refusal_no_wait_can_lift_is_not_retried_by_the_openai_sdk(gateway, limits):
    api_key_limits_set(api_key=gateway.api_key, **limits)
    with pytest.raises(openai.RateLimitError) as refused:
        sdk(gateway).chat.completions.create(model="gpt-test", messages=HELLO, max_tokens=4000)
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in refused.value.response.headers
    assert rejected_rows(refused.value) == 1  # one call, one refusal: no retries
    assert gateway.upstream.stats["requests"] == 0


def test_the_anthropic_sdk_does_not_retry_a_spent_budget_either(gateway):
    api_key_limits_set(api_key=gateway.api_key, budget_usd=Decimal("0.0001"))
    client = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, timeout=20)
    with pytest.raises(anthropic.RateLimitError) as refused:
        client.messages.create(model="claude-test", max_tokens=4000, messages=HELLO)
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert rejected_rows(refused.value) == 1


def test_a_refusal_a_wait_lifts_leaves_the_sdk_to_retry(gateway):
    api_key_limits_set(api_key=gateway.api_key, budget_usd=None, rpm=1)
    client = sdk(gateway).with_options(max_retries=0)
    client.chat.completions.create(model="gpt-test", messages=HELLO, max_tokens=5)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="gpt-test", messages=HELLO, max_tokens=5)
    assert "x-should-retry" not in refused.value.response.headers
    assert refused.value.response.headers["retry-after"]
