"""The operations dashboard (``/ops/`` and ``/ops/data.json``): who may read it, and its figures worked out
from a ledger, health checks, incidents and breakers built for the purpose, with the clock pinned so that
"the last hour" and "the last 24 hours" have known edges."""

from __future__ import annotations

import json
import math
import random
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from cryptography.fernet import Fernet
from django.db import connection
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.roles import Role, role_set
from billing.models import UsageStatus
from billing.selectors_ops import ops_deployments, ops_snapshot
from providers.models import BreakerOverride, Deployment, HealthCheck, Incident
from providers.routing.breakers import breaker_force, breakers_forget_local
from tests.factories import DeploymentFactory, ModelFactory, ProviderFactory, UsageRecordFactory, UserFactory

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 6, 15, 12, 30, tzinfo=UTC)


@pytest.fixture
def clock():
    with time_machine.travel(NOW, tick=False):
        yield NOW


def user_with(role: Role, name: str):
    user = UserFactory(username=name)
    role_set(user, role)
    return user


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def ledger(deployment, *, minutes_ago: float, status=UsageStatus.OK, duration_ms=100, cost="0", **fields):
    return UsageRecordFactory(
        deployment=deployment,
        deployment_name=deployment.name if deployment else "",
        model_name=deployment.model.name if deployment else fields.pop("model_name", "chat"),
        provider_name=deployment.provider.name if deployment else "",
        created_at=NOW - timedelta(minutes=minutes_ago),
        status=status,
        duration_ms=duration_ms,
        cost=Decimal(cost),
        **fields,
    )


@pytest.fixture
def fleet(clock):
    """``chat`` on two providers: ``east`` answers (10 requests, 100…1000 ms), ``west`` fails 6 of 10 in
    the last hour, its breaker open, its last health check failing and an incident open; older rows and a
    disabled deployment must not count."""
    east_provider = ProviderFactory(name="east-cloud")
    west_provider = ProviderFactory(name="west-cloud")
    chat = ModelFactory(name="chat", provider=east_provider)
    east = chat.deployments.get()
    east.name = "east"
    east.save()
    west = DeploymentFactory(model=chat, name="west", provider=west_provider, priority=1)
    spare = DeploymentFactory(model=chat, name="spare", provider=west_provider, priority=2, enabled=False)
    for n in range(10):
        ledger(east, minutes_ago=5 + n, duration_ms=100 * (n + 1), cost="0.25")
    ledger(east, minutes_ago=61, status=UsageStatus.UPSTREAM_ERROR)  # more than an hour ago
    for n in range(4):
        ledger(west, minutes_ago=3 + n, duration_ms=2000 + n)
    for n in range(6):
        ledger(west, minutes_ago=10 + n, status=UsageStatus.UPSTREAM_ERROR, duration_ms=50)
    ledger(west, minutes_ago=20, status=UsageStatus.CLIENT_DISCONNECTED, duration_ms=30)
    HealthCheck.objects.create(deployment=west, checked_at=NOW - timedelta(minutes=9), ok=False, error="HTTP 503")
    HealthCheck.objects.create(deployment=west, checked_at=NOW - timedelta(minutes=40), ok=True)
    HealthCheck.objects.create(deployment=east, checked_at=NOW - timedelta(minutes=2), ok=True, latency_ms=12)
    Incident.objects.create(deployment=west, started_at=NOW - timedelta(minutes=9), reason="3 failed checks")
    breaker_force(west.pk, "open")
    # Refused requests: two rate limits and a budget in the hour; one rate limit before it.
    for minutes, code in ((1, "rate_limit_exceeded"), (30, "rate_limit_exceeded"), (45, "insufficient_quota")):
        ledger(None, minutes_ago=minutes, status=UsageStatus.REJECTED, error_type=code)
    ledger(None, minutes_ago=70, status=UsageStatus.REJECTED, error_type="rate_limit_exceeded")
    # Spend: the current hour (12:xx) has east's $2.50; 3 hours ago $1.20; 24 hours ago is outside.
    ledger(east, minutes_ago=3 * 60, cost="1.20")
    ledger(east, minutes_ago=24 * 60 + 5, cost="9.00")
    return {"east": east, "west": west, "spare": spare}


def figures(user) -> dict:
    response = client_for(user).get("/ops/data.json")
    assert response.status_code == 200
    assert "no-cache" in response["Cache-Control"]
    return response.json()


def by_label(data: dict) -> dict[str, dict]:
    return {d["label"]: d for d in data["deployments"]}


def test_only_those_who_may_read_everyones_usage_see_it(clock):
    anonymous = Client()
    page = anonymous.get("/ops/")
    assert page.status_code == 302 and page["Location"].startswith("/accounts/login/")
    assert anonymous.get("/ops/data.json").status_code == 401
    for role in (Role.MEMBER, Role.VIEWER):
        client = client_for(user_with(role, f"a-{role}"))
        assert client.get("/ops/").status_code == 403
        assert client.get("/ops/data.json").status_code == 403
        assert 'href="/ops/"' not in client.get("/usage/").content.decode()  # no link to a page it cannot open
    for role in (Role.OPERATOR, Role.ADMIN):
        client = client_for(user_with(role, f"a-{role}"))
        assert client.get("/ops/").status_code == 200
        assert client.get("/ops/data.json").status_code == 200
        assert 'href="/ops/"' in client.get("/usage/").content.decode()


def test_each_deployment_with_its_health_breaker_and_last_hour(fleet):
    data = figures(user_with(Role.OPERATOR, "ops"))
    rows = by_label(data)
    assert list(rows) == ["chat / east", "chat / west", "chat / spare"]

    east = rows["chat / east"]
    assert (east["requests"], east["errors"], east["error_rate"]) == (10, 0, 0.0)
    assert (east["p50_ms"], east["p95_ms"]) == (500, 1000)  # nearest rank: the 5th and 10th of 100…1000
    assert east["rpm"] == round(10 / 60, 2)
    assert east["failing"] is False and east["status"] == "OK"
    assert east["breaker"] == "closed" and east["health"] == "ok"

    west = rows["chat / west"]
    # 11 requests in the hour: 4 answered, 6 failed, 1 the client gave up on (neither).
    assert (west["requests"], west["errors"]) == (11, 6)
    assert west["error_rate_text"] == "54.5 %"
    assert (west["p50_ms"], west["p95_ms"]) == (2001, 2003)  # answered requests only
    assert west["failing"] is True
    assert west["breaker"] == "open" and west["health"] == "failing"
    assert west["incident_reason"] == "3 failed checks"
    assert west["health_text"] == "Failing: HTTP 503; incident since 12:21 UTC (3 failed checks)"
    assert west["problems"] == ["open incident", "breaker open", "health check failing", "55 % errors"]
    assert west["status"].startswith("Failing: ")

    spare = rows["chat / spare"]
    assert spare["enabled"] is False and spare["failing"] is False and spare["status"] == "Disabled"
    assert (spare["requests"], spare["p50_ms"], spare["p50_text"]) == (0, None, "—")

    providers = {p["name"]: p for p in data["providers"]}
    assert (providers["east-cloud"]["deployments"], providers["east-cloud"]["failing"]) == (1, 0)
    assert (providers["west-cloud"]["deployments"], providers["west-cloud"]["failing"]) == (2, 1)
    assert data["totals"]["failing"] == 1 and data["totals"]["requests"] == 21


def test_a_high_error_rate_alone_marks_a_deployment_failing(clock):
    deployment = DeploymentFactory(name="flaky")
    for n in range(8):
        ledger(deployment, minutes_ago=n + 1, status=UsageStatus.UPSTREAM_ERROR if n < 2 else UsageStatus.OK)
    (row,) = [d for d in ops_deployments(now=timezone.now()) if d.name == "flaky"]
    assert row.breaker == "closed" and row.problems == ("25 % errors",)
    # Under MIN_REQUESTS requests, a failure or two is not yet a rate worth an alarm.
    quiet = DeploymentFactory(name="quiet")
    ledger(quiet, minutes_ago=1, status=UsageStatus.UPSTREAM_ERROR)
    (row,) = [d for d in ops_deployments(now=timezone.now()) if d.name == "quiet"]
    assert row.problems == ()


def test_a_forced_breaker_is_shown_as_forced(clock):
    deployment = DeploymentFactory(name="parked", breaker_override=BreakerOverride.OPEN)
    (row,) = [d for d in ops_deployments(now=timezone.now()) if d.name == "parked"]
    assert row.breaker == "open" and row.breaker_forced and row.problems == ("breaker forced open",)
    deployment.breaker_override = BreakerOverride.CLOSED
    deployment.save()
    breaker_force(deployment.pk, "open")
    (row,) = [d for d in ops_deployments(now=timezone.now()) if d.name == "parked"]
    assert row.breaker == "closed" and row.problems == ()  # the override wins, as it does for routing


def test_the_breaker_is_read_from_redis_when_it_is_shared(clock, use_redis):
    deployment = DeploymentFactory(name="shared")
    breaker_force(deployment.pk, "open")
    breakers_forget_local()  # another process opened it: this one never saw it happen
    (row,) = [d for d in ops_deployments(now=timezone.now()) if d.name == "shared"]
    assert row.breaker == "open"


def test_a_streams_latency_is_its_time_to_first_token_as_the_latency_alert_reads_it(clock):
    """A stream lasts as long as the client asks it to write (a long answer streams for a minute on a healthy
    deployment): its latency is the time to its first token, as the p95 latency alert measures it; a whole reply's is
    its duration. Before, a deployment serving long streams read p50 and p95 of a minute, whatever its speed."""
    deployment = DeploymentFactory(name="streaming")
    for n in range(10):
        ledger(deployment, minutes_ago=5, stream=True, ttft_ms=200 + n, duration_ms=60_000 + n, request_id=f"s-{n}")
    ledger(deployment, minutes_ago=5, duration_ms=300, request_id="whole")
    ledger(deployment, minutes_ago=5, stream=True, ttft_ms=None, duration_ms=250, request_id="no-first-token")

    [found] = [d for d in ops_deployments(now=timezone.now()) if d.name == "streaming"]

    # 200…209, 250 and 300: the 6th and the 12th of 12.
    assert (found.p50_ms, found.p95_ms) == (205, 300)


def test_percentiles_are_the_exact_nearest_rank_values(clock):
    """Against the textbook definition, on random durations and counts (fixed seed)."""
    rng = random.Random(14)
    expected = {}
    for name, n in (("one", 1), ("two", 2), ("odd", 37), ("many", 200)):
        deployment = DeploymentFactory(name=name)
        durations = [rng.randint(1, 5000) for _ in range(n)]
        for index, duration in enumerate(durations):
            ledger(deployment, minutes_ago=rng.uniform(0, 59), duration_ms=duration, request_id=f"{name}-{index}")
        ordered = sorted(durations)
        expected[name] = (ordered[math.ceil(0.5 * n) - 1], ordered[math.ceil(0.95 * n) - 1])
    found = {d.name: (d.p50_ms, d.p95_ms) for d in ops_deployments(now=timezone.now()) if d.name in expected}
    assert found == expected


def test_spend_per_hour_and_rejections(fleet):
    data = figures(user_with(Role.ADMIN, "boss"))
    hours = data["spend_per_hour"]
    assert len(hours) == 24
    assert hours[-1]["hour"] == "2026-06-15T12:00:00+00:00" and hours[0]["hour"] == "2026-06-14T13:00:00+00:00"
    spent = {h["label"]: (h["cost_text"], h["requests"]) for h in hours if h["requests"]}
    # 12:xx: east's ten $0.25 and west's rows at $0; 09:xx: $1.20. The $9.00 of 24 h 5 min ago is out.
    assert spent["09:00"] == ("$1.20", 1)
    assert spent["12:00"][0] == "$2.50"
    assert data["totals"]["spend_24h"] == "$3.70"

    assert data["rejections"] == [
        {"code": "rate_limit_exceeded", "label": "Rate limit", "count": 2},
        {"code": "insufficient_quota", "label": "Budget or quota", "count": 1},
    ]
    assert data["totals"]["rejected"] == 3


def test_spend_and_requests_per_operation_over_the_last_24_hours(fleet):
    """An operator could not tell how much of the spend went to the Responses API, chat completions, embeddings
    or the Messages API. The dashboard sums the last 24 hours (the spend chart's hours) per operation, largest
    spend first, in its figures and its table."""
    east = fleet["east"]
    ledger(east, minutes_ago=30, cost="4.00", operation="responses")
    ledger(east, minutes_ago=23 * 60, cost="0.0000001", operation="embeddings")
    ledger(east, minutes_ago=24 * 60 + 5, cost="100", operation="messages")  # out of the 24 hours

    data = figures(user_with(Role.OPERATOR, "ops"))

    assert [(o["operation"], o["label"], o["cost_text"], o["requests"]) for o in data["operations"]] == [
        ("responses", "OpenAI responses", "$4.00", 1),
        ("chat", "Chat completion", "$3.70", 27),
        ("embeddings", "Embeddings", "$0.0000001", 1),
    ]
    html = client_for(user_with(Role.ADMIN, "boss")).get("/ops/").content.decode()
    row = re.search(r'<tr data-operation="responses">(.*?)</tr>', html, re.S)[1]
    assert re.findall(r">([^<>]+)<", row) == ["OpenAI responses", "1", "$4.00"]


def test_the_spend_per_hour_and_per_operation_come_from_one_read_of_the_24_hours(fleet):
    """The dashboard read the last 24 hours of raw rows twice (spend per hour, then per operation), the
    heaviest of its reads at millions of rows a day; it reads them once, grouped by hour and operation, and
    both figures add up to the same spend and requests."""
    east = fleet["east"]
    ledger(east, minutes_ago=30, cost="4.00", operation="responses")
    ledger(east, minutes_ago=23 * 60, cost="0.0000001", operation="embeddings")
    ledger(east, minutes_ago=24 * 60 + 5, cost="100", operation="messages")  # out of the 24 hours

    with CaptureQueriesContext(connection) as queries:
        snapshot = ops_snapshot(now=timezone.now())
    first_hour = "2026-06-14"  # the first of the 24 hours starts at 13:00 the day before; nothing else reads it
    assert len([q for q in queries if "billing_usagerecord" in q["sql"] and first_hour in q["sql"]]) == 1

    hours = {h.hour.strftime("%H"): (h.cost, h.requests) for h in snapshot.spend_per_hour if h.requests}
    assert hours == {
        "09": (Decimal("1.2"), 1),
        "11": (Decimal("0"), 3),
        "12": (Decimal("6.5"), 24),
        "13": (Decimal("0.0000001"), 1),
    }
    operations = [(o.operation, o.cost, o.requests) for o in snapshot.spend_per_operation]
    assert operations == [
        ("responses", Decimal("4"), 1),
        ("chat", Decimal("3.7"), 27),
        ("embeddings", Decimal("0.0000001"), 1),
    ]


def test_the_page_draws_with_the_projects_chart_js_and_marks_the_failing_row(fleet):
    html = client_for(user_with(Role.OPERATOR, "ops")).get("/ops/").content.decode()
    scripts = re.findall(r'<script src="([^"]+)"', html)
    assert "/static/vendor/chartjs/chart.umd.min.js" in scripts and "/static/billing/ops.js" in scripts
    assert all(src.startswith("/static/") for src in scripts)  # nothing from a CDN
    assert '<svg class="chart' not in html
    embedded = json.loads(re.search(r'<script id="ops-figures" type="application/json">(.*?)</script>', html, re.S)[1])
    assert by_label(embedded)["chat / west"]["failing"] is True
    west_row = re.search(r'<tr data-deployment="chat / west" class="([^"]*)">(.*?)</tr>', html, re.S)
    assert west_row[1] == "is-failing"
    assert "⚠" in west_row[2] and "Failing: open incident, breaker open" in west_row[2]
    east_row = re.search(r'<tr data-deployment="chat / east" class="([^"]*)">(.*?)</tr>', html, re.S)
    assert east_row[1] == "" and "Failing" not in east_row[2]
    # Every figure of the charts is in a table: each deployment's and each hour's.
    for cell in ("500 ms", "1,000 ms", "54.5 %", "0.17", "Rate limit", "$1.20"):
        assert f">{cell}<" in html, cell


def test_a_deployment_whose_upstream_model_is_missing_says_since_when(clock):
    """The health round found the provider's model list without the deployment's upstream id (a catalog mistake):
    the dashboard names that, not only "health check failing", and forgets it once the id is corrected."""
    deployment = DeploymentFactory(name="typo", upstream_id="gpt-typo")
    Deployment.objects.filter(pk=deployment.pk).update(
        upstream_model_missing_since=NOW - timedelta(hours=2), upstream_model_missing_id="gpt-typo"
    )
    (row,) = [d for d in ops_deployments(now=timezone.now()) if d.name == "typo"]
    assert row.problems == ("upstream model missing since 2026-06-15 10:30 UTC",) and row.failing

    Deployment.objects.filter(pk=deployment.pk).update(upstream_id="gpt-4o")  # the admin's fix
    (row,) = [d for d in ops_deployments(now=timezone.now()) if d.name == "typo"]
    assert row.problems == ()


def test_a_provider_whose_key_no_encryption_key_decrypts_leaves_the_dashboard_whole(clock):
    """A provider key written under an encryption key since dropped from FIELD_ENCRYPTION_KEYS (a rotation gone
    wrong, docs/rotation.md) made /ops/ and its data.json answer 500: the dashboard loaded every provider's key
    and headers with its deployments, and decrypted them once per deployment at each refresh, though it shows
    neither. It reads no secret now: that provider's deployments are listed with the others."""
    with override_settings(FIELD_ENCRYPTION_KEYS=[Fernet.generate_key().decode()]):
        lost = ProviderFactory(name="lost-key", api_key="sk-under-a-dropped-key", extra_headers={"x-org": "o-1"})
        kept = ModelFactory(name="kept", provider=lost).deployments.select_related("model", "provider").get()
    ledger(kept, minutes_ago=5, duration_ms=300)

    operator = user_with(Role.OPERATOR, "ops")
    data = figures(operator)
    row = by_label(data)["kept / lost-key"]
    assert (row["provider"], row["requests"], row["p50_ms"]) == ("lost-key", 1, 300)
    assert {p["name"]: p["deployments"] for p in data["providers"]} == {"lost-key": 1}
    page = client_for(operator).get("/ops/")
    assert page.status_code == 200 and "kept / lost-key" in page.content.decode()


def test_an_incident_open_since_another_day_says_its_date(clock):
    """At 12:30, a deployment down since 23:50 the night before read "incident since 23:50 UTC", and one down for
    two days "incident since 12:21 UTC", as if it had gone down nine minutes ago: the time alone, whatever the
    day. An incident begun on another day (UTC) says its date; one of today keeps its time alone."""
    since = {
        "overnight": NOW.replace(hour=23, minute=50) - timedelta(days=1),
        "long": NOW - timedelta(days=2, minutes=9),
        "today": NOW - timedelta(minutes=9),
    }
    for name, started_at in since.items():
        Incident.objects.create(deployment=DeploymentFactory(name=name), started_at=started_at, reason="HTTP 503")

    operator = user_with(Role.OPERATOR, "ops")
    texts = {d["name"]: d["health_text"] for d in figures(operator)["deployments"] if d["name"] in since}
    assert texts == {
        "overnight": "Not checked; incident since 2026-06-14 23:50 UTC (HTTP 503)",
        "long": "Not checked; incident since 2026-06-13 12:21 UTC (HTTP 503)",
        "today": "Not checked; incident since 12:21 UTC (HTTP 503)",
    }
    html = client_for(operator).get("/ops/").content.decode()
    assert "incident since 2026-06-14 23:50 UTC" in html and "incident since 2026-06-13 12:21 UTC" in html


def test_the_dashboard_reads_the_same_queries_for_two_thousand_deployments_as_for_three(
    fleet, django_assert_max_num_queries
):
    """Every figure of a deployment (health, incident, breaker, traffic, percentiles) is read for all of them at
    once: the page and its JSON cost as many queries at 2,004 deployments on 22 providers as at three on two."""
    operator = client_for(user_with(Role.OPERATOR, "ops"))
    operator.get("/ops/")  # whatever is read once per process (the session, the role), before counting
    with CaptureQueriesContext(connection) as few:
        assert operator.get("/ops/data.json").status_code == 200
    with CaptureQueriesContext(connection) as few_page:
        assert operator.get("/ops/").status_code == 200

    providers = [ProviderFactory(name=f"fleet-{n:02d}") for n in range(20)]
    many = ModelFactory(name="many", provider=providers[0])
    Deployment.objects.bulk_create(
        Deployment(model=many, name=f"d-{n:04d}", provider=providers[n % 20], upstream_id="up", priority=n)
        for n in range(1, 2001)
    )
    deployments = list(Deployment.objects.filter(model=many).order_by("pk")[:50])
    for n, deployment in enumerate(deployments):
        ledger(deployment, minutes_ago=n % 50 + 1, duration_ms=100 + n)
        HealthCheck.objects.create(deployment=deployment, checked_at=NOW - timedelta(minutes=3), ok=n % 2 == 0)
        Incident.objects.create(deployment=deployment, started_at=NOW - timedelta(minutes=n), reason="down")

    with django_assert_max_num_queries(len(few)):
        data = operator.get("/ops/data.json").json()
    with django_assert_max_num_queries(len(few_page)):
        assert operator.get("/ops/").status_code == 200
    assert len(data["deployments"]) == 2004 and len(data["providers"]) == 22
    assert sum(d["failing"] for d in data["deployments"]) == 51  # the fleet's west and the 50 with incidents
