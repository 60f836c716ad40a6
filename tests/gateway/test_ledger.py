"""The usage ledger: exactly one priced row per request, whatever happened to it."""

from __future__ import annotations

import time
from decimal import Decimal

import httpx
import openai
import pytest

from billing.models import UsageRecord
from tests.waiting import wait_for_record

pytestmark = pytest.mark.django_db(transaction=True)

MILLION = Decimal(1_000_000)


def settle_quietly(seconds: float = 0.3) -> None:
    """Give a (wrong) second write the time it would need to show up."""
    time.sleep(seconds)


def test_success_writes_one_row_priced_from_the_catalog(gateway):
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "one two three [[cache=2]]"}]
    )
    completion = raw.parse()
    record = wait_for_record(raw.headers["x-request-id"])
    settle_quietly()
    assert UsageRecord.objects.count() == 1
    usage = completion.usage
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
        2,
    )
    expected = (
        Decimal(usage.prompt_tokens - 2) * Decimal("0.15")
        + 2 * Decimal("0.075")
        + Decimal(usage.completion_tokens) * Decimal("0.60")
    ) / MILLION
    assert record.cost == expected.quantize(Decimal("0.0000000001"))
    assert record.status == "ok" and record.endpoint == "rest" and record.stream is False
    assert record.user_id == gateway.user.pk and record.api_key_id == gateway.api_key.pk
    assert (record.provider_name, record.model_name) == ("fake-openai", "gpt-test")
    assert record.usage_estimated is False and record.duration_ms >= 0


def test_streamed_request_writes_one_row_with_provider_usage(gateway):
    with gateway.client().chat.completions.with_streaming_response.create(
        model="claude-test", messages=[{"role": "user", "content": "[[words=9]]"}], stream=True
    ) as response:
        request_id = response.headers["x-request-id"]
        list(response.iter_lines())
    record = wait_for_record(request_id)
    settle_quietly()
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1
    assert record.stream is True and record.completion_tokens == 9 and record.usage_estimated is False
    assert record.cost == (Decimal(record.prompt_tokens) * Decimal("0.80") + 9 * Decimal("4.00")) / MILLION
    assert record.ttft_ms is not None and record.upstream_latency_ms is not None


def test_upstream_error_writes_one_row(gateway):
    with pytest.raises(openai.APIStatusError) as failed:
        gateway.client().chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
    record = wait_for_record(failed.value.response.headers["x-request-id"])
    settle_quietly()
    assert UsageRecord.objects.count() == 1
    assert record.status == "upstream_error" and record.error_type == "upstream_unavailable"
    assert record.cost == 0 and record.model_name == "broken"


def test_stream_cut_by_the_upstream_counts_what_was_delivered(gateway):
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "[[fault=cut-4]]"}]},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=20,
    ) as response:
        request_id = response.headers["x-request-id"]
        lines = [line for line in response.iter_lines() if line]
    assert '"error"' in lines[-1] and lines[-1] != "data: [DONE]"
    record = wait_for_record(request_id)
    assert record.status == "upstream_error" and record.usage_estimated is True
    assert record.completion_tokens > 0 and record.cost > 0


def test_client_disconnect_mid_stream_writes_one_estimated_row(gateway):
    received = []
    with (
        httpx.Client(timeout=20) as client,
        client.stream(
            "POST",
            gateway.url + "/v1/chat/completions",
            json={
                "model": "gpt-test",
                "stream": True,
                "messages": [{"role": "user", "content": "[[words=400]] [[tps=40]]"}],
            },
            headers={"Authorization": f"Bearer {gateway.key}"},
        ) as response,
    ):
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line.startswith("data: {"):
                received.append(line)
            if len(received) >= 6:
                break
    # Leaving both context managers closes the connection mid-stream.
    record = wait_for_record(request_id, timeout=15)
    settle_quietly()
    assert UsageRecord.objects.filter(request_id=request_id).count() == 1
    assert record.status == "client_disconnected" and record.usage_estimated is True
    # The role chunk plus five words were delivered; a few more may have been in flight.
    assert 5 <= record.completion_tokens < 60
    assert (
        record.cost
        == (Decimal(record.prompt_tokens) * Decimal("0.15") + Decimal(record.completion_tokens) * Decimal("0.60"))
        / MILLION
    )


def test_rejected_request_of_a_known_caller_is_recorded_once(gateway):
    with pytest.raises(openai.NotFoundError) as missing:
        gateway.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    record = wait_for_record(missing.value.response.headers["x-request-id"])
    assert record.status == "rejected" and record.error_type == "model_not_found" and record.cost == 0
    assert gateway.upstream.stats["requests"] == 0


def test_many_concurrent_requests_each_write_exactly_one_row(gateway):
    import concurrent.futures

    client = gateway.client()

    def one(i: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": f"n {i}"}]
        )
        return raw.headers["x-request-id"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(one, range(24)))
    for request_id in ids:
        wait_for_record(request_id)
    settle_quietly()
    assert UsageRecord.objects.count() == 24 == len(set(ids))
