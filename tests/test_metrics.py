"""Prometheus metrics at /metrics (llmhub/metrics.py, core/metrics.py): protected, summed over worker
processes, and saying what each request did, through a live llmhub and the fake upstream."""

from __future__ import annotations

import asyncio
import fcntl
import json
import linecache
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
import time_machine
from django.test import override_settings
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask
from prometheus_client.parser import text_string_to_metric_families

from billing.services.budgets import api_key_limits_set
from billing.services.keys import api_key_create
from billing.services.spool import spool_append, spool_claim, spool_path
from billing.services.task_runs import task_run_record
from core import metrics as core_metrics
from core.telemetry import AttemptObservation, RequestObservation
from llmhub import metrics as llmhub_metrics
from providers.models import CatalogModel, Deployment
from providers.routing.breakers import breaker_force
from tests.conftest import free_port, process_stop, wait_for_port
from tests.factories import ProviderFactory, UserFactory
from tests.waiting import wait_for_record, wait_until, wait_until_async

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "llmhub-dashboard.json"
TOKEN = "scrape-token-0123456789"
MESSAGES = [{"role": "user", "content": "hello there [[words=6]]"}]
PRICES = {"input_per_mtok": Decimal("0.15"), "output_per_mtok": Decimal("0.60")}

pytestmark = pytest.mark.django_db(transaction=True)


# HELPERS


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for n, got, v in samples(text) if n == name and labels.items() <= got.items())


def scrape_until(url: str, name: str, expected: float, **labels: str) -> str:
    """Scrape until ``name`` reaches ``expected``: the workers that did not answer the scrape write what they
    counted every second (core.metrics.FLUSH_SECONDS)."""
    text = ""

    def reached() -> bool:
        nonlocal text
        text = scrape(url)
        return value(text, name, **labels) == expected

    wait_until(
        reached,
        lambda: f"{name} {labels} reaches {expected} (it is {value(text, name, **labels)})",
        timeout=30,
        interval=0.2,
    )
    return text


def scrape(url: str, token: str = TOKEN) -> str:
    response = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.text


def catalog_model(fake_upstream, name: str, upstream: str = "fake-gpt-4o-mini", **model) -> CatalogModel:
    provider = ProviderFactory(name=f"{name}-provider", base_url=fake_upstream.base_url + "/v1")
    catalog = CatalogModel.objects.create(name=name, **model)
    Deployment.objects.create(model=catalog, name=f"{name}-dep", provider=provider, upstream_id=upstream, **PRICES)
    return catalog


@pytest.fixture
def key():
    return api_key_create(user=UserFactory(username="metered"), name="metrics")


@pytest.fixture
def scraping():
    with override_settings(LLMHUB_METRICS_TOKEN=TOKEN, LLMHUB_METRICS_ALLOWED_IPS=[]):
        yield


def client_for(server, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key.secret, max_retries=0, timeout=30)


def stream_to_end(server, key, model: str, **body) -> str:
    """Stream a chat reply from ``model`` to its end; its request id."""
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key.secret}"},
        json={"model": model, "messages": MESSAGES, "stream": True, **body},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        list(response.iter_lines())
        return response.headers["x-request-id"]


# ACCESS


@pytest.mark.parametrize(
    ("settings_", "headers", "status"),
    [
        ({}, {}, 403),  # neither a token nor an allow-list: closed
        ({"LLMHUB_METRICS_TOKEN": TOKEN}, {}, 401),
        ({"LLMHUB_METRICS_TOKEN": TOKEN}, {"Authorization": "Bearer not-the-token"}, 401),
        ({"LLMHUB_METRICS_TOKEN": TOKEN}, {"Authorization": TOKEN}, 401),  # not a bearer
        ({"LLMHUB_METRICS_TOKEN": TOKEN}, {"Authorization": f"Bearer {TOKEN}"}, 200),
        ({"LLMHUB_METRICS_ALLOWED_IPS": ["10.0.0.0/8"]}, {}, 403),
        ({"LLMHUB_METRICS_ALLOWED_IPS": ["10.0.0.0/8", "127.0.0.1"]}, {}, 200),
        ({"LLMHUB_METRICS_ALLOWED_IPS": ["127.0.0.0/8"]}, {"Authorization": "Bearer guessed"}, 401),
        ({"LLMHUB_METRICS_ALLOWED_IPS": ["127.0.0.0/8"], "LLMHUB_METRICS_TOKEN": TOKEN}, {}, 200),
    ],
)
def test_a_scrape_needs_the_token_or_an_allowed_address(llmhub_server, settings_, headers, status):
    with override_settings(**{"LLMHUB_METRICS_TOKEN": "", "LLMHUB_METRICS_ALLOWED_IPS": [], **settings_}):
        response = httpx.get(llmhub_server.url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == status, response.text
    if status == 200:
        assert "llmhub_requests_in_flight" in response.text
        assert response.headers["content-type"].startswith("text/plain")
    else:
        assert "llmhub_" not in response.text
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("trusted_proxies", "forwarded", "status"),
    [
        # Through a proxy uvicorn does not trust, on an allowed network: the connection is the proxy's, and whoever
        # is behind it (the internet, through the TLS proxy) is not the allowed address.
        ("10.9.9.9", {"X-Forwarded-For": "203.0.113.9"}, 403),
        ("10.9.9.9", {"X-Forwarded-For": "10.1.2.3, 203.0.113.9"}, 403),
        ("10.9.9.9", {"Forwarded": "for=203.0.113.9"}, 403),
        # A proxy uvicorn trusts (--forwarded-allow-ips): the client it names is the address judged.
        ("127.0.0.1", {"X-Forwarded-For": "10.1.2.3"}, 200),
        ("127.0.0.1", {"X-Forwarded-For": "203.0.113.9"}, 403),
        # No proxy: the connection's own address.
        ("10.9.9.9", {}, 200),
    ],
)
def test_the_allow_list_judges_the_client_not_an_untrusted_proxy_in_front_of_it(
    trusted_proxies, forwarded, status, tmp_path
):
    """uvicorn --proxy-headers (the Dockerfile's) takes the client's address from X-Forwarded-For only when the
    connecting proxy is trusted. Otherwise REMOTE_ADDR is the proxy's own address, which sits on the network an
    operator allow-lists for Prometheus (docker-compose.yml's example): every client of the proxy would scrape."""
    env = server_env(tmp_path / "metrics")
    env.update(LLMHUB_METRICS_TOKEN="", LLMHUB_METRICS_ALLOWED_IPS="127.0.0.0/8,10.0.0.0/8")
    process, url = start_server(
        tmp_path / "server.log", env, "--proxy-headers", "--forwarded-allow-ips", trusted_proxies
    )
    try:
        response = httpx.get(url + "/metrics", headers=forwarded, timeout=30)
    finally:
        process_stop(process, grace=60)
    assert response.status_code == status, response.text
    if status == 403:
        assert "llmhub_" not in response.text


def test_metrics_switched_off_record_nothing_and_are_not_served(llmhub_server, fake_upstream, key, scraping):
    catalog_model(fake_upstream, "unmetered")
    client = client_for(llmhub_server, key)
    with override_settings(LLMHUB_METRICS_ENABLED=False):
        raw = client.chat.completions.with_raw_response.create(model="unmetered", messages=MESSAGES)
        wait_for_record(raw.headers["x-request-id"])
        response = httpx.get(llmhub_server.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 404
    assert value(scrape(llmhub_server.url), "llmhub_requests_total", model="unmetered") == 0
    # On again: counted from here.
    raw = client.chat.completions.with_raw_response.create(model="unmetered", messages=MESSAGES)
    wait_for_record(raw.headers["x-request-id"])
    assert value(scrape(llmhub_server.url), "llmhub_requests_total", model="unmetered") == 1


# WHAT A REQUEST LEAVES


def test_a_request_and_a_stream_are_counted_timed_and_priced_with_their_labels(
    llmhub_server, fake_upstream, key, scraping
):
    catalog_model(fake_upstream, "metered")
    client = client_for(llmhub_server, key)
    where = {"model": "metered", "deployment": "metered-dep", "provider": "metered-provider"}
    # What this worker's processes count in flight before: this test judges only the runs it starts.
    before = value(scrape(llmhub_server.url), "llmhub_requests_in_flight")

    raw = client.chat.completions.with_raw_response.create(model="metered", messages=MESSAGES)
    record = wait_for_record(raw.headers["x-request-id"])
    streamed = wait_for_record(stream_to_end(llmhub_server, key, "metered", stream_options={"include_usage": True}))

    text = scrape(llmhub_server.url)
    ok = {**where, "operation": "chat", "transport": "rest", "status": "ok"}
    assert value(text, "llmhub_requests_total", **ok) == 2
    assert value(text, "llmhub_request_duration_seconds_count", **where, operation="chat", transport="rest") == 2
    assert value(text, "llmhub_request_duration_seconds_sum", **where) > 0
    assert value(text, "llmhub_time_to_first_token_seconds_count", **where, transport="rest") == 1
    assert value(text, "llmhub_overhead_seconds_count", model="metered", operation="chat", transport="rest") == 2
    # The overhead's buckets are milliseconds: from a tenth of a millisecond.
    bounds = {labels["le"] for name, labels, _ in samples(text) if name == "llmhub_overhead_seconds_bucket"}
    assert {"0.0001", "0.0005", "0.001", "0.005"} <= bounds
    assert value(text, "llmhub_tokens_total", **where, direction="input") == record.prompt_tokens + (
        streamed.prompt_tokens
    )
    assert value(text, "llmhub_tokens_total", **where, direction="output") == record.completion_tokens + (
        streamed.completion_tokens
    )
    assert value(text, "llmhub_cost_usd_total", **where) == pytest.approx(float(record.cost + streamed.cost))
    assert value(text, "llmhub_upstream_attempts_total", **where, outcome="ok") == 2
    assert value(text, "llmhub_retries_total", model="metered") == 0
    # Both runs left the gauge. A run of an earlier test on this worker's server may still be settling (a stream
    # its client cut, found out by the server a moment later), counted in ``before`` and gone meanwhile: wait as
    # long as a scrape waits for the other workers.
    wait_until(
        lambda: value(scrape(llmhub_server.url), "llmhub_requests_in_flight") <= before,
        f"llmhub_requests_in_flight is back to at most {before}",
        timeout=30,
        interval=0.2,
    )
    # No request id, user or key among the labels.
    for name, labels, _ in samples(text):
        if name.startswith("llmhub_"):
            assert not {"request_id", "user", "api_key", "key"} & labels.keys()
            assert record.request_id not in labels.values()


def test_the_spend_is_counted_per_operation(llmhub_server, fake_upstream, key, scraping):
    """The spend could be charted per model and deployment but not per operation: ``llmhub_cost_usd_total`` had
    no ``operation`` label, though the requests' counter has one. A chat completion and a Responses API request
    to one model now add to two series of it."""
    catalog_model(fake_upstream, "spent")
    client = client_for(llmhub_server, key)
    where = {"model": "spent", "deployment": "spent-dep", "provider": "spent-provider"}

    chat = client.chat.completions.with_raw_response.create(model="spent", messages=MESSAGES)
    responses = client.responses.with_raw_response.create(model="spent", input="hello there [[words=9]]")
    chat_row = wait_for_record(chat.headers["x-request-id"])
    responses_row = wait_for_record(responses.headers["x-request-id"])
    assert (chat_row.operation, responses_row.operation) == ("chat", "responses")
    assert chat_row.cost and responses_row.cost

    text = scrape(llmhub_server.url)
    assert value(text, "llmhub_cost_usd_total", **where, operation="chat") == pytest.approx(float(chat_row.cost))
    assert value(text, "llmhub_cost_usd_total", **where, operation="responses") == pytest.approx(
        float(responses_row.cost)
    )


def test_a_streams_time_to_first_token_is_observed_unrounded_and_within_its_duration(
    llmhub_server, fake_upstream, key, monkeypatch
):
    # The ledger keeps whole milliseconds; the observation (metrics and the span) must not take its time to
    # first token from them: 7.5 ms rounded to 8 once came out longer than a 7.9 ms request.
    catalog_model(fake_upstream, "first-token")
    observed: list[RequestObservation] = []
    monkeypatch.setattr(core_metrics, "request_metrics_record", observed.append)
    streamed_id = stream_to_end(llmhub_server, key, "first-token")
    record = wait_for_record(streamed_id)

    [observation] = [o for o in observed if o.request_id == streamed_id]
    assert 0 < observation.ttft <= observation.duration
    milliseconds = observation.ttft * 1000
    assert abs(milliseconds - round(milliseconds)) > 1e-6  # not the ledger's whole milliseconds
    assert record.ttft_ms == round(milliseconds)


def smallest_finite_bucket(text: str, name: str, **labels: str) -> float | None:
    """The smallest finite ``le`` of histogram ``name`` (its series with ``labels``) whose bucket counts every
    observation of the series: the most a quantile over them can read. None when only +Inf counts them all."""
    buckets = [
        (float(got["le"]), v) for n, got, v in samples(text) if n == name + "_bucket" and labels.items() <= got.items()
    ]
    everything = max(v for _, v in buckets)
    finite = [bound for bound, v in buckets if bound != float("inf") and v == everything]
    return min(finite) if finite else None


def test_first_tokens_and_streams_as_slow_as_llm_requests_get_fall_in_finite_buckets(llmhub_server, scraping, settings):
    """A reasoning model writes its first token once it has thought (a minute or more), up to the request's deadline,
    and a stream then runs as long as it writes (its idle time alone is bounded): each is counted in a finite bucket
    within twice its value, so that a quantile over such requests says how slow they are, rather than the last
    finite bound (30 s for the first token and 300 s for a request, before)."""
    deadline = settings.LLMHUB_REQUEST_DEADLINE_SECONDS
    # Model names of this test's own: the worker's metrics files keep what the tests it ran before counted, and other
    # tests name a model "long" too (their series, of other labels, answered under 50 ms, read as this one's: 0.05).
    run = uuid.uuid4().hex[:8]
    cases = {
        f"thinks-45s-{run}": (45.0, 50.0),
        f"thinks-4min-{run}": (240.0, 260.0),
        f"deadline-{run}": (deadline, deadline + 5),
        f"long-{run}": (2.0, 900.0),
    }
    for model, (ttft, duration) in cases.items():
        core_metrics.request_metrics_record(
            RequestObservation(
                request_id=f"req-{model}",
                transport="rest",
                operation="chat",
                status="ok",
                model=model,
                deployment=f"{model}-dep",
                provider="slow",
                stream=True,
                duration=duration,
                ttft=ttft,
                overhead=0.001,
            )
        )

    text = scrape(llmhub_server.url)
    for model, (ttft, duration) in cases.items():
        for name, observed in (
            ("llmhub_time_to_first_token_seconds", ttft),
            ("llmhub_request_duration_seconds", duration),
        ):
            bound = smallest_finite_bucket(text, name, model=model)
            assert bound is not None and observed <= bound < 2 * observed, (name, model, observed, bound)


def test_rate_limit_and_budget_rejections_are_counted_by_reason(llmhub_server, fake_upstream, key, scraping):
    catalog_model(fake_upstream, "metrics-limited")
    client = client_for(llmhub_server, key)
    api_key_limits_set(api_key=key.api_key, budget_usd=None, rpm=1)
    client.chat.completions.create(model="metrics-limited", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="metrics-limited", messages=MESSAGES)
    assert refused.value.code == "rate_limit_exceeded"

    api_key_limits_set(api_key=key.api_key, budget_usd=Decimal("0"), rpm=None)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="metrics-limited", messages=MESSAGES)
    assert refused.value.code == "insufficient_quota"

    text = scrape(llmhub_server.url)
    assert (
        value(text, "llmhub_rejections_total", model="metrics-limited", reason="rate_limit_exceeded", transport="rest")
        == 1
    )
    assert value(text, "llmhub_rejections_total", model="metrics-limited", reason="insufficient_quota") == 1
    assert value(text, "llmhub_requests_total", model="metrics-limited", status="rejected") == 2
    assert value(text, "llmhub_requests_total", model="metrics-limited", status="ok") == 1
    # A refusal is not timed as a request: only the one that was served.
    assert value(text, "llmhub_request_duration_seconds_count", model="metrics-limited") == 1


def test_a_retry_on_another_deployment_and_a_fallback_are_counted(llmhub_server, fake_upstream, key, scraping):
    # "metrics-retried": its first deployment answers 503, its second answers.
    first = ProviderFactory(name="failing", base_url=fake_upstream.base_url + "/v1")
    second = ProviderFactory(name="healthy", base_url=fake_upstream.base_url + "/v1")
    retried = CatalogModel.objects.create(name="metrics-retried", strategy="priority")
    Deployment.objects.create(model=retried, name="first", provider=first, upstream_id="fault-503", **PRICES)
    Deployment.objects.create(
        model=retried, name="second", provider=second, upstream_id="fake-gpt-4o-mini", priority=1, **PRICES
    )
    # "metrics-broken": its only deployment answers 500; it falls back to "metrics-spare".
    catalog_model(fake_upstream, "metrics-broken", upstream="fault-500", fallbacks=["metrics-spare"])
    catalog_model(fake_upstream, "metrics-spare")
    client = client_for(llmhub_server, key)

    raw = client.chat.completions.with_raw_response.create(model="metrics-retried", messages=MESSAGES)
    assert raw.headers["x-llmhub-deployment"] == "second"
    wait_for_record(raw.headers["x-request-id"])
    raw = client.chat.completions.with_raw_response.create(model="metrics-broken", messages=MESSAGES)
    assert raw.parse().model == "metrics-spare"
    attempts = int(raw.headers["x-llmhub-attempts"])  # "metrics-broken" tried again before its fallback
    assert attempts >= 2
    wait_for_record(raw.headers["x-request-id"])

    text = scrape(llmhub_server.url)
    assert value(text, "llmhub_retries_total", model="metrics-retried") == 1
    assert value(text, "llmhub_fallbacks_total", model="metrics-retried") == 0
    assert value(text, "llmhub_retries_total", model="metrics-broken") == attempts - 1
    assert value(text, "llmhub_fallbacks_total", model="metrics-broken", fallback_model="metrics-spare") == 1
    failed = {"deployment": "first", "provider": "failing", "outcome": "failure"}
    assert value(text, "llmhub_upstream_attempts_total", model="metrics-retried", **failed) == 1
    assert (
        value(text, "llmhub_upstream_attempts_total", model="metrics-retried", deployment="second", outcome="ok") == 1
    )
    assert value(text, "llmhub_upstream_attempts_total", model="metrics-broken", outcome="failure") == attempts - 1
    assert value(text, "llmhub_upstream_attempts_total", model="metrics-spare", outcome="ok") == 1
    # The request is counted once, as the model that answered it.
    assert value(text, "llmhub_requests_total", model="metrics-spare", status="ok") == 1
    assert value(text, "llmhub_requests_total", model="metrics-retried", deployment="second", status="ok") == 1


def test_breaker_state_spool_and_ledger_queue_are_read_at_scrape_time(llmhub_server, fake_upstream, scraping):
    catalog_model(fake_upstream, "steady")
    tripped = catalog_model(fake_upstream, "tripped")
    forced = catalog_model(fake_upstream, "forced")
    Deployment.objects.filter(model=forced).update(breaker_override="open")
    breaker_force(tripped.deployments.get().pk, "open")
    spool_append([json.dumps({"request_id": "spooled-1"}), json.dumps({"request_id": "spooled-2"})])

    text = scrape(llmhub_server.url)
    assert value(text, "llmhub_breaker_state", model="steady", deployment="steady-dep", provider="steady-provider") == 0
    assert value(text, "llmhub_breaker_state", model="tripped", deployment="tripped-dep") == 2
    assert value(text, "llmhub_breaker_state", model="forced") == 2
    assert value(text, "llmhub_ledger_spooled_rows") == 2
    assert value(text, "llmhub_ledger_spool_bytes") > 0
    assert "llmhub_ledger_queue_rows" in text


def bytes_read_by(call) -> tuple[int, object]:
    """What ``call`` read from files on this thread (the kernel's count of bytes read: ``rchar`` of
    ``/proc/thread-self/io``), and what it returned."""

    def read_so_far() -> int:
        with open("/proc/thread-self/io") as io:
            return int(next(line for line in io if line.startswith("rchar:")).split()[1])

    before = read_so_far()
    result = call()
    return read_so_far() - before, result


def test_a_scrape_counts_the_spools_rows_from_what_was_appended_since_the_last(llmhub_server, scraping):
    """A spool grown large in a database outage (every row of an hour) was read whole at every scrape, every 15 s,
    to count its lines: megabytes a scrape. A scrape reads what was appended since the last one (and a few bytes
    of each file's head, to know it for the same file); a file claimed for replay (renamed) is not read again;
    one truncated, rewritten or new is counted afresh."""
    path = spool_path()
    row = json.dumps({"request_id": "spooled", "padding": "x" * 1000})
    spool_append(row for _ in range(3000))
    text = scrape(llmhub_server.url)
    assert value(text, "llmhub_ledger_spooled_rows") == 3000
    assert value(text, "llmhub_ledger_spool_bytes") == path.stat().st_size > 3_000_000

    spool_append([row, row])
    read, (rows, size) = bytes_read_by(llmhub_metrics._spool_contents)
    assert (rows, size) == (3002, path.stat().st_size) and read < 64_000
    # A replay claims the spool (renamed to its own file) while new rows start a new one: only those are read.
    with spool_claim() as claimed:
        spool_append([row] * 5)
        read, (rows, size) = bytes_read_by(llmhub_metrics._spool_contents)
        assert (rows, size) == (3007, os.fstat(claimed[0].fileno()).st_size + path.stat().st_size)
        assert read < 64_000
    assert value(scrape(llmhub_server.url), "llmhub_ledger_spooled_rows") == 5  # replayed: the claimed file is gone

    path.write_text(row + "\n")  # truncated in place: counted afresh
    assert llmhub_metrics._spool_contents() == (1, path.stat().st_size)
    short = "".join(json.dumps({"request_id": f"short-{n}"}) + "\n" for n in range(100))
    path.write_text(short)  # the same file rewritten past what was counted, with other rows: counted afresh
    assert llmhub_metrics._spool_contents() == (100, len(short))
    path.unlink()
    spool_append([row] * 3)  # a new file (which may be given the same inode): counted afresh
    assert value(scrape(llmhub_server.url), "llmhub_ledger_spooled_rows") == 3


def test_the_background_tasks_last_success_and_overdue_are_read_at_scrape_time(llmhub_server, scraping):
    """Per task path of an enabled schedule (two schedules of one task are one series): the latest success,
    absent for a task never successful, and overdue 0 or 1 (the rules are billing/test_ops_tasks')."""
    now = datetime(2026, 6, 15, 12, 30, tzinfo=UTC)
    five = IntervalSchedule.objects.create(every=5, period=IntervalSchedule.MINUTES)
    nightly = CrontabSchedule.objects.create(minute="17", hour="3", timezone="UTC")
    schedules = [
        ("rollup", "billing.tasks.usage_rollup", {"interval": five}),
        ("rollup, nightly too", "billing.tasks.usage_rollup", {"crontab": nightly}),
        ("health", "providers.tasks.providers_health_check_all", {"interval": five}),
        ("alerts", "billing.tasks.ops_alerts_evaluate_task", {"interval": five}),
        ("new", "experiments.tasks.rollout_steps_apply_due_task", {"interval": five}),
        ("off", "billing.tasks.ledger_spool_replay", {"interval": five, "enabled": False}),
    ]
    for name, task, when in schedules:
        PeriodicTask.objects.create(name=name, task=task, **when)
    runs = [
        ("billing.tasks.usage_rollup", now - timedelta(minutes=2), None),
        ("providers.tasks.providers_health_check_all", now - timedelta(hours=2), None),
        ("billing.tasks.ops_alerts_evaluate_task", now - timedelta(minutes=1), ConnectionError("sk-canary-metrics")),
        ("billing.tasks.ledger_spool_replay", now - timedelta(days=3), None),
    ]
    for task, at, error in runs:
        task_run_record(task=task, finished_at=at, duration_seconds=1.0, error=error)

    with time_machine.travel(now, tick=True):
        text = scrape(llmhub_server.url)
    found = {(name, labels["task"]): v for name, labels, v in samples(text) if name.startswith("llmhub_periodic_task_")}
    assert found == {
        ("llmhub_periodic_task_last_success_timestamp_seconds", "billing.tasks.usage_rollup"): (
            now - timedelta(minutes=2)
        ).timestamp(),
        ("llmhub_periodic_task_overdue", "billing.tasks.usage_rollup"): 0,
        ("llmhub_periodic_task_last_success_timestamp_seconds", "providers.tasks.providers_health_check_all"): (
            now - timedelta(hours=2)
        ).timestamp(),
        ("llmhub_periodic_task_overdue", "providers.tasks.providers_health_check_all"): 1,
        ("llmhub_periodic_task_overdue", "billing.tasks.ops_alerts_evaluate_task"): 1,  # never succeeded
        ("llmhub_periodic_task_overdue", "experiments.tasks.rollout_steps_apply_due_task"): 0,  # never ran
    }
    assert "sk-canary-metrics" not in text


def test_ledger_rows_spilled_from_a_full_queue_are_counted(llmhub_server, scraping, settings, tmp_path, monkeypatch):
    """The database writes slower than requests come: the rows past the queue's bound go to the spool, and
    the operator sees why the spool grows (``llmhub_ledger_spilled_rows``), not only that it does."""
    from asgiref.sync import async_to_sync

    from billing.services import ledger
    from billing.services.ledger_rows import UsageData

    settings.LLMHUB_LEDGER_SPOOL = tmp_path / "ledger-spool.jsonl"
    settings.LLMHUB_LEDGER_QUEUE_MAX = 4
    settings.LLMHUB_LEDGER_SPOOL_PROBE_SECONDS = 60  # no replay during the test
    monkeypatch.setattr(ledger, "_write_rows", lambda rows, settled=(): time.sleep(0.5))  # a slow database
    before = value(scrape(llmhub_server.url), "llmhub_ledger_spilled_rows_total")

    async def submit() -> int:
        for n in range(5):
            ledger.usage_record_submit(UsageData(request_id=f"spilled-{n}", endpoint="rest", stream=False, status="ok"))
        writer = ledger._writers[asyncio.get_running_loop()]
        spilled = 5 - len(writer.queue) - len(writer.in_flight)
        await writer.spill
        return spilled

    spilled = async_to_sync(submit)()
    assert spilled == 3  # past 4 rows, the newest beyond 2 went
    core_metrics.metrics_flush()
    text = scrape_until(llmhub_server.url, "llmhub_ledger_spilled_rows_total", before + spilled)
    assert value(text, "llmhub_ledger_spilled_rows_total") == before + spilled
    assert value(text, "llmhub_ledger_spooled_rows") == 5  # and the 2 the writer held, spooled as its loop ended


# SEVERAL WORKERS, ONE ANSWER


def server_env(metrics_dir: Path | None) -> dict[str, str]:
    from tests.conftest import database_url_for_subprocesses

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "DATABASE_URL", "CELERY_BROKER_URL", core_metrics.ENV)
    }
    env.update(
        DJANGO_SETTINGS_MODULE="llmhub.settings.test",
        TEST_DATABASE_URL=database_url_for_subprocesses(),
        PYTHONPATH=str(ROOT),
        LLMHUB_METRICS_TOKEN=TOKEN,
    )
    if metrics_dir is not None:
        env[core_metrics.ENV] = str(metrics_dir)
    return env


def start_server(log: Path, env: dict[str, str], *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "llmhub.asgi:application", "--port", str(port), "--lifespan", "on", *args],
        cwd=ROOT,
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )
    wait_for_port(port, timeout=60, process=process)
    return process, f"http://127.0.0.1:{port}"


def counts_per_process(directory: Path, model: str) -> dict[str, float]:
    """From each process's own file: its requests of ``model``."""
    from prometheus_client import multiprocess

    counts = {}
    for path in directory.glob("counter_*.db"):
        merged = multiprocess.MultiProcessCollector.merge([str(path)])
        counts[path.stem.rsplit("_", 1)[1]] = sum(
            sample.value
            for metric in merged
            for sample in metric.samples
            if sample.name == "llmhub_requests_total" and sample.labels.get("model") == model
        )
    return counts


def test_two_server_processes_sharing_a_directory_report_the_same_sums(fake_upstream, key, tmp_path):
    catalog_model(fake_upstream, "shared")
    metrics_dir = tmp_path / "metrics"
    env = server_env(metrics_dir)
    servers = [start_server(tmp_path / "a.log", env), start_server(tmp_path / "b.log", env)]
    try:
        for (_, url), requests in zip(servers, (3, 2), strict=True):
            client = openai.OpenAI(base_url=url + "/v1", api_key=key.secret, max_retries=0, timeout=30)
            for _ in range(requests):
                raw = client.chat.completions.with_raw_response.create(model="shared", messages=MESSAGES)
                wait_for_record(raw.headers["x-request-id"])
        for _, url in servers:
            text = scrape_until(url, "llmhub_requests_total", 5, model="shared", status="ok")
            assert value(text, "llmhub_requests_total", model="shared", status="ok") == 5
            assert value(text, "llmhub_request_duration_seconds_count", model="shared") == 5
            assert value(text, "llmhub_requests_in_flight") == 0
    finally:
        for process, _ in servers:
            process_stop(process, grace=60)


def test_a_server_that_stops_leaves_every_request_it_answered_counted(fake_upstream, key, tmp_path):
    """uvicorn ends its process by raising the stop signal again once its shutdown is over, so no ``atexit`` handler
    runs: what the process counted since its flusher's last round (up to a second) never reached its files, and a
    scrape of the workers that go on lacked the requests a stopping worker answered last. The lifespan's shutdown
    writes them."""
    catalog_model(fake_upstream, "last-words")
    metrics_dir = tmp_path / "metrics"
    process, url = start_server(tmp_path / "stopping.log", server_env(metrics_dir))
    answered = []
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key.secret, max_retries=0, timeout=30)
        for _ in range(3):
            raw = client.chat.completions.with_raw_response.create(model="last-words", messages=MESSAGES)
            answered.append(raw.headers["x-request-id"])
    finally:
        process_stop(process, grace=60)  # SIGTERM, as an orchestrator stops a container
    for request_id in answered:
        wait_for_record(request_id)  # written by the shutdown's ledger flush

    assert counts_per_process(metrics_dir, "last-words") == {str(process.pid): 3}


def test_uvicorn_workers_report_as_one_and_a_restart_starts_from_zero(fake_upstream, key, tmp_path):
    """``uvicorn --workers 2``: every scrape, whichever worker answers it, has every request of both; the next
    server started on the same directory (a restarted container) starts from zero."""
    catalog_model(fake_upstream, "pooled")
    metrics_dir = tmp_path / "metrics"
    env = server_env(metrics_dir)

    def run(log: str) -> tuple[int, list[float]]:
        process, url = start_server(tmp_path / log, env, "--workers", "2")
        sent = 0
        try:
            # New connections until both workers have served some (the kernel spreads accepts between them).
            for _ in range(100):
                with httpx.Client(timeout=30) as fresh:
                    response = fresh.post(
                        url + "/v1/chat/completions",
                        headers={"Authorization": f"Bearer {key.secret}"},
                        json={"model": "pooled", "messages": MESSAGES},
                    )
                assert response.status_code == 200, response.text
                sent += 1
                if sent >= 4 and len([c for c in counts_per_process(metrics_dir, "pooled").values() if c]) == 2:
                    break
            wait_for_record(response.headers["x-request-id"])
            assert len([c for c in counts_per_process(metrics_dir, "pooled").values() if c]) == 2
            totals = []
            scrape_until(url, "llmhub_requests_total", sent, model="pooled")
            for _ in range(6):
                with httpx.Client(timeout=30) as fresh:
                    response = fresh.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
                assert response.status_code == 200
                totals.append(value(response.text, "llmhub_requests_total", model="pooled"))
            return sent, totals
        finally:
            process_stop(process, grace=60)

    sent, totals = run("first.log")
    assert totals == [sent] * len(totals)
    sent_again, totals_again = run("second.log")
    assert totals_again == [sent_again] * len(totals_again)


def test_without_the_variable_a_servers_workers_share_their_masters_directory(tmp_path, monkeypatch):
    """uvicorn starts its workers with multiprocessing (spawn): each finds the directory of its master."""
    import multiprocessing

    from tests.metrics_worker import directory_in_a_spawned_worker

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=directory_in_a_spawned_worker, args=(str(tmp_path), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    chosen = {queue.get(timeout=120) for _ in workers}
    for worker in workers:
        worker.join(timeout=60)
    assert chosen == {str(tmp_path / f"run-{os.getpid()}")}
    monkeypatch.delenv(core_metrics.ENV)
    assert core_metrics.metrics_directory_choose(tmp_path) == str(tmp_path / f"run-{os.getpid()}")
    assert os.environ[core_metrics.ENV] == str(tmp_path / f"run-{os.getpid()}")


def test_a_new_owner_empties_the_directory_and_a_live_one_keeps_it(tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir()
    dead_pid = _dead_pid()
    (directory / core_metrics.OWNER_FILE).write_text(f"{dead_pid}:12345\n")
    (directory / f"counter_{dead_pid}.db").write_bytes(b"stale")
    core_metrics._directory_prepare(directory)
    assert not (directory / f"counter_{dead_pid}.db").exists()
    me = core_metrics._process_identity(os.getpid())
    assert (directory / core_metrics.OWNER_FILE).read_text().strip() == me

    # A live owner (another server pointed at the same directory): its files stay.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (directory / core_metrics.OWNER_FILE).write_text(f"{core_metrics._process_identity(sleeper.pid)}\n")
        (directory / f"counter_{sleeper.pid}.db").write_bytes(b"live")
        core_metrics._directory_prepare(directory)
        assert (directory / f"counter_{sleeper.pid}.db").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Once it is gone, the next server to start empties it.
    core_metrics._directory_prepare(directory)
    assert not (directory / f"counter_{sleeper.pid}.db").exists()


def test_a_new_owner_keeps_the_files_of_live_processes_that_share_the_directory(tmp_path):
    """The marker names the first process that prepared the directory: a process it was handed to (a server a test
    starts with the directory in its environment) may have been first, and the process that chose the directory, which
    prepared it while that one lived, never wrote its own identity there. Once the first is gone, the next process to
    prepare the directory removed every file, the live process's too, and its metrics were in no scrape after (three
    access tests of a full SQLite run). The files of processes that are gone go; those of live processes stay."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    first, gone_writer = _dead_pid(), _dead_pid()
    (directory / core_metrics.OWNER_FILE).write_text(f"{first}:12345\n")
    live = [directory / f"counter_{os.getpid()}.db", directory / f"gauge_livesum_{os.getpid()}.db"]
    dead = [directory / f"counter_{first}.db", directory / f"histogram_{gone_writer}.db"]
    for path in (*live, *dead):
        path.write_bytes(b"counts")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live.append(directory / f"gauge_livesum_{sleeper.pid}.db")
        live[-1].write_bytes(b"in flight")
        core_metrics._directory_prepare(directory)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert [path.exists() for path in live] == [True] * 3
    assert [path.exists() for path in dead] == [False] * 2


def test_a_sibling_directory_whose_namesake_lives_is_kept_whoever_its_marker_names(tmp_path):
    """A server starting removes the ``run-<pid>`` siblings nobody uses. A directory handed to another process (its
    environment's ``PROMETHEUS_MULTIPROC_DIR``: a Celery worker) can end with that process's identity in its marker
    after it exits, while the process it is named for still uses it: it stays. One whose namesake is gone goes."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    mine = tmp_path / f"run-{os.getpid()}"
    abandoned = tmp_path / f"run-{dead_pid}"
    for directory in (mine, abandoned):
        directory.mkdir()
        (directory / core_metrics.OWNER_FILE).write_text(f"{dead_pid}:12345\n")  # the handed-to process, gone
        (directory / "counter_1.db").write_bytes(b"counts")
    core_metrics._directory_prepare(tmp_path / "run-1")  # another server starting beside them
    assert (mine / "counter_1.db").exists()
    assert not abandoned.exists()


def _dead_pid() -> int:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(gone.stdout)


def test_a_sibling_being_prepared_is_not_swept_and_one_swept_under_a_waiting_preparer_is_made_again(tmp_path):
    """A server starting sweeps the ``run-*`` siblings nobody uses. One whose namesake is gone and whose marker is
    not written yet may be a directory another process is preparing right now (handed to it in its environment):
    while that process holds its lock, the sweep leaves it. And a process that was waiting for the lock of a
    directory the sweep removed under that lock makes the directory again rather than failing to write its
    marker into a removed one."""
    sibling = tmp_path / f"run-{_dead_pid()}"
    sibling.mkdir()
    (sibling / "counter_1.db").write_bytes(b"counts")
    with open(sibling / core_metrics.LOCK_FILE, "a") as preparing:
        fcntl.flock(preparing, fcntl.LOCK_EX)
        core_metrics._directory_prepare(tmp_path / "run-1")
        assert (sibling / "counter_1.db").exists()

        # The sweep judged it unused and removes it holding its lock, while a process waits for that lock.
        errors: list[BaseException] = []

        def prepare() -> None:
            try:
                core_metrics._directory_prepare(sibling)
            except BaseException as error:  # reported to the test's thread
                errors.append(error)

        waiting = threading.Thread(target=prepare)
        waiting.start()
        wait_until(lambda: _waits_for_a_lock(waiting), "the preparer waits for the sibling's lock")
        shutil.rmtree(sibling)
        fcntl.flock(preparing, fcntl.LOCK_UN)
    waiting.join(timeout=30)
    assert not errors
    assert (sibling / core_metrics.OWNER_FILE).read_text().strip() == core_metrics._process_identity(os.getpid())

    # Once nobody holds it and its owner is gone (here: the marker names a dead process), the next sweep removes it.
    (sibling / core_metrics.OWNER_FILE).write_text(f"{_dead_pid()}:12345\n")
    core_metrics._directory_prepare(tmp_path / "run-1")
    assert not sibling.exists()


def _waits_for_a_lock(thread: threading.Thread) -> bool:
    """Whether the thread is inside ``flock`` (its frame's current line calls it)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == "_directory_locked" and "flock" in linecache.getline(
            frame.f_code.co_filename, frame.f_lineno
        ):
            return True
        frame = frame.f_back
    return False


def test_a_dead_workers_in_flight_requests_are_not_summed_for_ever(llmhub_server, scraping, tmp_path):
    """A worker killed with requests in flight leaves its live gauge file; the next scrape drops it."""
    directory = Path(os.environ[core_metrics.ENV])
    script = (
        "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'llmhub.settings.test'); django.setup(); "
        "from core.metrics import inflight_add, metrics_flush; inflight_add(1); inflight_add(1); metrics_flush(); "
        "os._exit(0)"
    )
    env = {**server_env(directory), "PYTHONPATH": str(ROOT)}
    # The live server runs in this test process, whose own gauge may still count requests of an earlier test
    # winding down on a loaded machine: the dead worker's file is what is judged, and the sum against before.
    before = value(scrape(llmhub_server.url), "llmhub_requests_in_flight")
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
    assert worker.wait(timeout=120) == 0
    dead_file = directory / f"gauge_livesum_{worker.pid}.db"
    assert dead_file.exists()
    text = scrape(llmhub_server.url)
    assert not dead_file.exists()
    assert value(text, "llmhub_requests_in_flight") <= before


def test_a_worker_killed_while_creating_its_file_does_not_fail_the_scrape(llmhub_server, scraping):
    """prometheus-client creates a worker's file, then sizes it: a worker killed in between leaves an empty
    file for good, which prometheus-client's own collector cannot read (every scrape was a 500)."""
    directory = Path(os.environ[core_metrics.ENV])
    empty = directory / "counter_4000000.db"
    empty.touch()
    try:
        text = scrape(llmhub_server.url)
    finally:
        empty.unlink()
    assert "llmhub_requests_in_flight" in text


# THE HOT PATH


def test_recording_a_request_costs_an_append_and_the_flush_writes_it():
    """Not a timing assertion: the times are printed (``-s``) for docs/metrics.md."""
    attempts = (
        AttemptObservation("bench-dep", "bench", "openai", "bench-model", "up", 0.0, 0.1, 0, 1, "failure", "timeout"),
        AttemptObservation("bench-dep", "bench", "openai", "bench-model", "up", 0.1, 0.2, 1, 2, "ok"),
    )
    observation = RequestObservation(
        request_id="r",
        transport="rest",
        operation="chat",
        status="ok",
        model="bench-model",
        deployment="bench-dep",
        provider="bench",
        duration=0.2,
        ttft=0.05,
        overhead=0.0008,
        prompt_tokens=12,
        completion_tokens=30,
        cost=Decimal("0.0000213"),
        attempts=attempts,
    )
    core_metrics.request_metrics_record(observation)
    core_metrics.metrics_flush()
    metrics = core_metrics._current()
    assert metrics is not None
    requests = metrics.requests.labels("bench-model", "bench-dep", "bench", "chat", "rest", "ok")
    overhead = metrics.overhead.labels("bench-model", "chat", "rest")
    retries = metrics.retries.labels("bench-model")
    before = (requests._value.get(), overhead._sum.get(), retries._value.get())
    rounds = 20_000
    started = time.perf_counter()
    for _ in range(rounds):
        core_metrics.request_metrics_record(observation)
    recorded = time.perf_counter()
    core_metrics.metrics_flush()
    flushed = time.perf_counter()
    after = (requests._value.get(), overhead._sum.get(), retries._value.get())
    assert after[0] - before[0] == rounds
    assert after[1] - before[1] == pytest.approx(rounds * 0.0008)
    assert after[2] - before[2] == rounds
    print(
        f"\nrequest_metrics_record: {(recorded - started) / rounds * 1e6:.2f} µs per request on the request path; "
        f"metrics_flush: {(flushed - recorded) / rounds * 1e6:.2f} µs per request in the flusher thread"
    )


# THE DASHBOARD


def exported_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
    return names


def traffic_in_every_family(server, fake_upstream, key) -> None:
    """Traffic that leaves a sample in every family: a retry and a fallback, a stream, a rejection, a scheduled
    task that ran."""
    every_minute = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.MINUTES)
    PeriodicTask.objects.create(name="rollup", task="billing.tasks.usage_rollup", interval=every_minute)
    task_run_record(task="billing.tasks.usage_rollup", finished_at=timezone.now(), duration_seconds=1.0, error=None)
    catalog_model(fake_upstream, "charted")
    catalog_model(fake_upstream, "flaky", upstream="fault-500", fallbacks=["charted"])
    client = client_for(server, key)
    raw = client.chat.completions.with_raw_response.create(model="flaky", messages=MESSAGES)
    wait_for_record(raw.headers["x-request-id"])
    stream_to_end(server, key, "charted")
    api_key_limits_set(api_key=key.api_key, budget_usd=Decimal("0"))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="charted", messages=MESSAGES)


def test_the_grafana_dashboard_reads_only_metrics_we_export(llmhub_server, fake_upstream, key, scraping):
    traffic_in_every_family(llmhub_server, fake_upstream, key)
    exported = exported_names(scrape(llmhub_server.url))

    dashboard = json.loads(DASHBOARD.read_text())
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dashboard["templating"]["list"])
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    used: set[str] = set()
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert set(re.findall(r"\b(llmhub_[a-z_]+)\b", variable["definition"])) <= exported
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b(llmhub_[a-z_]+)\b", target["expr"]))
            assert names, f"{panel['title']}: no llmhub metric in {target['expr']}"
            assert names <= exported, f"{panel['title']}: {names - exported} not exported"
            used |= names
    # Every family we export has a panel.
    families = {
        family.name: {sample.name for sample in family.samples}
        for family in text_string_to_metric_families(scrape(llmhub_server.url))
        if family.name.startswith("llmhub_")
    }
    uncharted = {name for name, sample_names in families.items() if not sample_names & used}
    assert not uncharted, f"no panel for {uncharted}"


def test_the_docs_list_every_metric_we_export_with_its_labels(llmhub_server, fake_upstream, key, scraping):
    """docs/metrics.md is the operator's list of what /metrics says: each family we export has its row there,
    with its name as scraped (a counter's ``_total``) and its labels."""
    traffic_in_every_family(llmhub_server, fake_upstream, key)
    rows = {}
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`llmhub_[a-z_]+`", cells[0]):
            rows[cells[0].strip("`")] = set(re.findall(r"\b[a-z_]+\b", re.sub(r"\([^)]*\)", "", cells[2])))
    for family in text_string_to_metric_families(scrape(llmhub_server.url)):
        if not family.name.startswith("llmhub_"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name in rows, f"{name} is exported but not in docs/metrics.md"
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        assert labels == rows[name] - {"none"}, f"{name}: exported with {labels}, documented with {rows[name]}"


def test_compose_gives_the_web_server_a_fresh_metrics_directory_at_every_start():
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    web = compose["services"]["web"]
    directory = web["environment"][core_metrics.ENV]
    assert directory in web["tmpfs"]
    assert f"{core_metrics.ENV}={directory}" in (ROOT / "Dockerfile").read_text()
    assert "LLMHUB_METRICS_TOKEN" in web["environment"] and "LLMHUB_METRICS_ALLOWED_IPS" in web["environment"]


async def test_production_serves_metrics_over_plain_http_to_an_allowed_address(monkeypatch):
    """Prometheus inside the private network scrapes the container over plain HTTP, as the orchestrator probes
    it: /metrics is exempt from production's HTTPS requirement (which /v1 keeps)."""
    from llmhub.handlers import PathPrefixRouter
    from tests import test_security_headers as security

    production = security.production.__wrapped__()
    lean_prefixes = ("/v1/", "/metrics")
    monkeypatch.setattr(
        security,
        "PathPrefixRouter",
        lambda *, prefixes, lean, full: PathPrefixRouter(prefixes=lean_prefixes, lean=lean, full=full),
    )
    with override_settings(**production, LLMHUB_METRICS_ALLOWED_IPS=["127.0.0.1"]):
        metrics_status, _, body = await security.call("/metrics")
        v1_status, _, _ = await security.call("/v1/models")
    assert metrics_status == 200, body
    assert b"llmhub_" in body
    assert v1_status == 403  # https_required


async def test_a_websocket_chat_is_counted_as_websocket(fake_upstream):
    from asgiref.sync import sync_to_async

    from llmhub.metrics import _exposition
    from tests.chat.conftest import ends, events_until, open_socket

    user = await sync_to_async(UserFactory)(username="socket-user")
    await sync_to_async(catalog_model)(fake_upstream, "socketed")
    ws, connected, _ = await open_socket(user=user)
    assert connected
    try:
        await ws.send_json_to(
            {"type": "chat.send", "conversation": None, "model": "socketed", "content": "hi", "request_id": "r1"}
        )
        events = await events_until(ws, ends("r1"))
        assert events[-1]["type"] == "chat.completed", events[-1]
    finally:
        await ws.disconnect()
    where = {"model": "socketed", "deployment": "socketed-dep", "transport": "websocket"}
    text = ""

    async def observed() -> bool:  # the run settles (and is observed) just after its last event
        nonlocal text
        text = (await sync_to_async(_exposition)(""))[0].decode()
        return value(text, "llmhub_requests_total", **where, status="ok") == 1

    await wait_until_async(observed, "the socket's request counted", timeout=10, interval=0.1)
    assert value(text, "llmhub_requests_total", **where, operation="chat", status="ok") == 1
    assert value(text, "llmhub_time_to_first_token_seconds_count", **where) == 1
    assert value(text, "llmhub_requests_total", model="socketed", transport="rest") == 0


def test_the_grafana_dashboards_panels_have_their_own_ids_and_places():
    """Panels added side by side must not share an id (Grafana keeps one) or overlap on the grid."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), sorted(ids)
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]
