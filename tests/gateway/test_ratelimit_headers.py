"""The rate-limit headers the official SDKs and dashboards read, over the live server: ``retry-after-ms``,
which both SDKs wait rather than ``Retry-After``'s whole seconds."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import httpx
import openai
import pytest
import time_machine

from billing.services.budgets import api_key_limits_set

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "hi"}]


def recording_client(gateway, answers: list, **kwargs) -> openai.OpenAI:
    http_client = httpx.Client(event_hooks={"response": [answers.append]})
    return openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=gateway.key, timeout=20, http_client=http_client, **kwargs
    )


def test_the_openai_sdk_waits_the_exact_retry_after_ms_of_a_requests_per_minute_limit(gateway, caplog):
    api_key_limits_set(api_key=gateway.api_key, budget_usd=None, rpm=1)
    answers: list[httpx.Response] = []
    client = recording_client(gateway, answers, max_retries=1)
    with time_machine.travel(datetime(2026, 12, 5, 12, 0, tzinfo=UTC), tick=True) as traveller:
        client.chat.completions.create(model="gpt-test", messages=HELLO, max_tokens=5)
        # 59.8 s on, the first request (sent a few ms after 12:00:00) fills the window for some 200 ms more.
        traveller.move_to(datetime(2026, 12, 5, 12, 0, 59, 800_000, tzinfo=UTC))
        with caplog.at_level(logging.INFO, logger="openai._base_client"):
            served = client.chat.completions.with_raw_response.create(model="gpt-test", messages=HELLO, max_tokens=5)

    assert served.retries_taken == 1  # refused once, then served after the wait
    assert [answer.status_code for answer in answers] == [200, 429, 200]
    refused = answers[1].headers
    assert refused["retry-after"] == "1"  # as before, whole seconds
    wait_ms = int(refused["retry-after-ms"])
    assert 0 < wait_ms < 1000  # the first request's slot frees within a second: Retry-After says a whole one
    assert refused["x-ratelimit-reset-requests"] == f"{wait_ms}ms"
    # The SDK's own decision: it waited the milliseconds, not Retry-After's whole second.
    assert f"Retrying request in {wait_ms / 1000:f} seconds" in caplog.text
