"""The rate-limit headers the official SDKs and dashboards read, over the live server: ``retry-after-ms``,
which both SDKs wait rather than ``Retry-After``'s whole seconds, and Anthropic's ``anthropic-ratelimit-*`` on
the Messages API."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime

import anthropic
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


def test_the_messages_api_answers_carry_anthropics_rate_limit_headers(gateway):
    """A 200, a stream and a 429 on /v1/messages, as the anthropic SDK's raw responses show them."""
    api_key_limits_set(api_key=gateway.api_key, budget_usd=None, rpm=2, tpm=10_000)
    client = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    reset_at = "2026-12-05T12:01:00.000Z"  # a minute after the first request, when its slot frees
    with time_machine.travel(datetime(2026, 12, 5, 12, 0, tzinfo=UTC), tick=False):
        answered = client.messages.with_raw_response.create(model="claude-test", max_tokens=5, messages=HELLO)
        with client.messages.stream(model="claude-test", max_tokens=5, messages=HELLO) as stream:
            stream.until_done()
            streamed = stream.response.headers
        with pytest.raises(anthropic.RateLimitError) as refused:
            client.messages.create(model="claude-test", max_tokens=5, messages=HELLO)

    headers = answered.headers
    assert headers["anthropic-ratelimit-requests-limit"] == "2"
    assert headers["anthropic-ratelimit-requests-remaining"] == "1"
    assert headers["anthropic-ratelimit-requests-reset"] == reset_at
    assert headers["anthropic-ratelimit-tokens-limit"] == "10000"
    assert int(headers["anthropic-ratelimit-tokens-remaining"]) < 10_000
    assert headers["anthropic-ratelimit-tokens-reset"] == reset_at
    assert headers["x-ratelimit-remaining-requests"] == "1"  # OpenAI's names as well
    # Our tokens-per-minute limit counts input and output together: no input/output split is invented.
    assert not [
        name for name in headers if name.startswith(("anthropic-ratelimit-input", "anthropic-ratelimit-output"))
    ]
    assert streamed["anthropic-ratelimit-requests-remaining"] == "0"
    assert streamed["anthropic-ratelimit-requests-reset"] == reset_at
    limited = refused.value.response.headers
    assert limited["anthropic-ratelimit-requests-remaining"] == "0"
    assert limited["anthropic-ratelimit-requests-reset"] == reset_at
    assert limited["retry-after-ms"] == "60000"
    # The 429 tells the tokens window too, as it stands (the refused request not counted), in both names.
    assert limited["anthropic-ratelimit-tokens-limit"] == limited["x-ratelimit-limit-tokens"] == "10000"
    assert limited["anthropic-ratelimit-tokens-remaining"] == limited["x-ratelimit-remaining-tokens"]
    assert int(limited["x-ratelimit-remaining-tokens"]) >= int(streamed["anthropic-ratelimit-tokens-remaining"])


def test_a_429_through_the_openai_sdk_carries_the_requests_and_the_tokens_headers(gateway):
    api_key_limits_set(api_key=gateway.api_key, budget_usd=None, rpm=1, tpm=10_000)
    client = gateway.client()
    with time_machine.travel(datetime(2026, 12, 5, 12, 0, tzinfo=UTC), tick=False):
        served = client.chat.completions.with_raw_response.create(model="gpt-test", messages=HELLO, max_tokens=5)
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model="gpt-test", messages=HELLO, max_tokens=5)
    headers = refused.value.response.headers
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("1", "0")
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert headers["x-ratelimit-limit-tokens"] == "10000"
    # What the first request used, once settled, is what the tokens window still holds.
    assert int(headers["x-ratelimit-remaining-tokens"]) >= int(served.headers["x-ratelimit-remaining-tokens"])
    assert headers["x-ratelimit-reset-tokens"] == "1m0s"


def test_a_request_too_large_for_the_tokens_left_is_told_the_real_remaining(gateway):
    """The first request's 500-word reply leaves some 490 of the key's 1,000 tokens a minute: the next, which asks
    for 600, is refused, and its 429 says what is left (until 5 December it said 0, as if the window were spent),
    with the wait until it fits in Retry-After and the reset: the first request's minute. Both SDKs, both names."""
    api_key_limits_set(api_key=gateway.api_key, budget_usd=None, tpm=1000)
    client = gateway.client()
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    with time_machine.travel(datetime(2026, 12, 5, 12, 0, tzinfo=UTC), tick=False):
        client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "[[words=500]]"}], max_tokens=600
        )
        with pytest.raises(openai.RateLimitError) as by_openai:
            client.chat.completions.create(model="gpt-test", messages=HELLO, max_tokens=600)
        with pytest.raises(anthropic.RateLimitError) as by_anthropic:
            sdk.messages.create(model="claude-test", max_tokens=600, messages=HELLO)

    for refused in (by_openai.value, by_anthropic.value):
        headers = refused.response.headers
        message = refused.body["error"]["message"] if "error" in refused.body else refused.body["message"]
        used = int(re.search(r"used ([\d,]+)", message).group(1).replace(",", ""))
        assert 500 <= used < 1000, message  # the first request's real use, settled
        assert headers["x-ratelimit-limit-tokens"] == "1000"
        assert headers["x-ratelimit-remaining-tokens"] == str(1000 - used)
        assert (headers["retry-after"], headers["retry-after-ms"]) == ("60", "60000")  # when the first leaves
        assert headers["x-ratelimit-reset-tokens"] == "1m0s"
    limited = by_anthropic.value.response.headers
    assert limited["anthropic-ratelimit-tokens-remaining"] == limited["x-ratelimit-remaining-tokens"]
    assert limited["anthropic-ratelimit-tokens-reset"] == "2026-12-05T12:01:00.000Z"


def test_chat_completions_keep_openais_names_alone(gateway):
    api_key_limits_set(api_key=gateway.api_key, budget_usd=None, rpm=2)
    answered = gateway.client().chat.completions.with_raw_response.create(model="gpt-test", messages=HELLO)
    assert answered.headers["x-ratelimit-remaining-requests"] == "1"
    assert not [name for name in answered.headers if name.startswith("anthropic-ratelimit")]


def test_count_tokens_counts_toward_requests_per_minute_and_not_tokens(gateway):
    """``/v1/messages/count_tokens`` is charged nothing, but a client could call it without bound: it takes a
    slot of the key's requests per minute (not of its tokens: nothing is used), refused as /v1/messages is when
    the window is full. ``/v1/models`` stays unlimited."""
    from billing.models import Operation
    from providers.tokens import prompt_tokens

    api_key_limits_set(api_key=gateway.api_key, budget_usd=None, rpm=3, tpm=1000)
    sdk = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0, timeout=20)
    long = [{"role": "user", "content": "x" * 4000}]  # more than the tokens limit, at any estimate's bound
    with time_machine.travel(datetime(2026, 12, 5, 12, 0, tzinfo=UTC), tick=False):
        counted = sdk.messages.with_raw_response.count_tokens(model="claude-test", messages=long)
        sdk.messages.count_tokens(model="claude-test", messages=long)
        answered = sdk.messages.with_raw_response.create(model="claude-test", max_tokens=5, messages=HELLO)
        with pytest.raises(anthropic.RateLimitError) as refused:
            sdk.messages.count_tokens(model="claude-test", messages=long)
        listed = sdk.models.list()

    assert counted.parse().input_tokens > 0
    assert counted.headers["anthropic-ratelimit-requests-limit"] == "3"
    assert counted.headers["anthropic-ratelimit-requests-remaining"] == "2"
    assert counted.headers["anthropic-ratelimit-requests-reset"] == "2026-12-05T12:01:00.000Z"
    assert counted.headers["x-ratelimit-remaining-requests"] == "2"
    assert answered.headers["anthropic-ratelimit-requests-remaining"] == "0"
    # The two counts took no tokens: the window holds the message's own bound alone.
    body = {"model": "claude-test", "max_tokens": 5, "messages": HELLO}
    own = prompt_tokens(body, operation=Operation.MESSAGES, upper_bound=True) + 5
    assert answered.headers["anthropic-ratelimit-tokens-remaining"] == str(1000 - own)
    assert refused.value.body["error"]["type"] == "rate_limit_error"
    limited = refused.value.response.headers
    assert limited["anthropic-ratelimit-requests-remaining"] == "0"
    assert limited["retry-after-ms"] == "60000"
    assert [model.id for model in listed.data]  # not limited
    # Claude's provider counted the two admitted (free of charge); the one refused was not sent.
    assert gateway.upstream.stats["by_path"] == {"/v1/messages/count_tokens": 2, "/v1/messages": 1}


def test_a_long_prompt_that_fits_the_tokens_limit_is_served_not_called_too_large(gateway):
    """A 30,000-character English prompt is about 7,500 tokens: a key with 10,000 tokens a minute must serve it.
    Measured at its upper bound (two characters a token, some 15,000) it was told, for ever, that it was too
    large for the limit. A prompt whose likely size is over the limit still is, and is not retried."""
    api_key_limits_set(api_key=gateway.api_key, budget_usd=None, tpm=10_000)
    client = gateway.client()
    words = "The quick brown fox jumps over the lazy dog. "
    fits = (words * (30_000 // len(words) + 1))[:30_000]
    with time_machine.travel(datetime(2026, 12, 5, 12, 0, tzinfo=UTC), tick=False):
        served = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": fits}], max_tokens=100
        )
        assert served.status_code == 200
        # It counts as much of the window as the limit allows: nothing else until it settles or leaves.
        assert served.headers["x-ratelimit-remaining-tokens"] == "0"

    gateway_too_large = gateway.client()
    with pytest.raises(openai.RateLimitError) as refused:
        gateway_too_large.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": fits * 2}], max_tokens=100
        )
    message = refused.value.body["message"]
    assert message.startswith("Request too large for this API key"), message
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in refused.value.response.headers
