"""Operations alerts: each kind fires once per incident and clears once, by email and to a Slack-compatible
webhook (a real HTTP server), from requests a live llmhub served on the fake upstream with its faults.

The live server runs in this process, so ``time_machine`` moves its clock too: requests are made at pinned
instants (ticking, so timeouts work) and their ledger rows carry them; the evaluator then runs several times
at later instants, frozen."""

from __future__ import annotations

import importlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
import redis
import time_machine
from celery.exceptions import SoftTimeLimitExceeded
from django.apps import apps as django_apps
from django.conf import settings as django_settings
from django.core import mail
from django.core.exceptions import ValidationError
from django.db import OperationalError, connection

from accounts.services import users_delete
from billing.models import DailyUsage, OpsAlertIncident, OpsAlertKind, OpsAlertRule, Plan, UsageRecord, UsageStatus
from billing.selectors_ops import ops_deployments
from billing.services.keys import api_key_create
from billing.services.ops_alerts import (
    BREAKER_REASON,
    ops_alert_text,
    ops_alerts_evaluate,
    percentile,
    spend_spike_measures,
)
from billing.services.plans import plan_assign
from billing.tasks import OpsAlertRulesNotEvaluatedError, alerts_undelivered_send, ops_alerts_evaluate_task
from providers.models import CatalogModel, Deployment, Incident, ModerationPolicy, Provider
from providers.routing.breaker_machine import CLOSED
from providers.routing.breakers import breaker_record, breaker_reset, breaker_state
from providers.services.health import DeploymentProbe, deployment_probe_record
from tests.factories import ModelFactory, ProviderFactory, UsageRecordFactory, UserFactory
from tests.waiting import wait_for_ledger_rows

pytestmark = pytest.mark.django_db(transaction=True)

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)  # a Tuesday noon, far from a day's edge
OPS = "ops@example.com"
BUDGET_SUBJECT = re.compile(r" is at \d+%$")  # "[llmhub] client's daily token quota is at 50%"
BUDGET_HOOK = re.compile(r" has reached \d+%: ")  # "llmhub: client's daily token quota has reached 50%: …"


@pytest.fixture(autouse=True)
def admins(settings, transactional_db) -> None:
    """Only the rules a test makes (the data migration's may be there or not: a flush removes them). Rules
    without recipients of their own alert ADMINS; no webhook unless a test starts one."""
    OpsAlertRule.objects.all().delete()
    settings.ADMINS = [("", OPS)]
    settings.LLMHUB_ALERT_WEBHOOK_URL = ""


@dataclass
class Gateway:
    http: httpx.Client
    upstream_url: str
    model: str
    deployment: Deployment
    user_id: int

    def chat(self, text: str = "hi", **body: object) -> httpx.Response:
        payload = {"model": self.model, "messages": [{"role": "user", "content": text}], "max_tokens": 5, **body}
        return self.http.post("/v1/chat/completions", json=payload)

    def fault(self, fault: str | None) -> None:
        """A standing fault of the upstream, set (``"503"``) or healed (None) through its control endpoint."""
        httpx.post(f"{self.upstream_url}/__control", json={"fault": fault}).raise_for_status()


@pytest.fixture
def gateway(llmhub_server, fake_upstream, settings, redis_url, webhook) -> Iterator[Gateway]:
    """A live llmhub (breakers and counters in Redis) serving ``watched`` from the fake upstream, for a user
    on an unlimited plan; alerts go to ``OPS`` (ADMINS) and to the ``webhook`` fixture's server."""
    settings.REDIS_URL = redis_url
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    provider = ProviderFactory(name="upstream", base_url=fake_upstream.base_url + "/v1")
    model = ModelFactory(name="watched", provider=provider, input_per_mtok=Decimal("0"), output_per_mtok=Decimal("100"))
    plan = Plan.objects.create(name="Unlimited", allow_all_models=True)
    user = UserFactory(username="client")
    plan_assign(user=user, plan=plan)
    key = api_key_create(user=user, name="ops").secret
    with httpx.Client(base_url=llmhub_server.url, headers={"authorization": f"Bearer {key}"}, timeout=30) as http:
        yield Gateway(http, fake_upstream.base_url, model.name, model.deployments.get(), user.pk)
    httpx.post(f"{fake_upstream.base_url}/__control", json={"fault": None})
    client.flushdb()
    client.close()


def evaluate_at(instant: datetime, times: int = 3) -> None:
    """The evaluator, run ``times`` over at a frozen ``instant`` (as a beat scheduling it each minute may
    run it twice): what it sends must not depend on how often it runs."""
    with time_machine.travel(instant, tick=False):
        for _ in range(times):
            ops_alerts_evaluate()


def rule(kind: str, **fields: object) -> OpsAlertRule:
    """A rule whose incidents clear at the first reading under the threshold, unless a test says otherwise: the
    damping (``clear_after_minutes``, 5 by default) has tests of its own."""
    return OpsAlertRule.objects.create(name=f"test {kind}", kind=kind, **{"clear_after_minutes": 0, **fields})


def watched_deployment() -> Deployment:
    """The deployment of the model ``watched``, under the deployment-down rule."""
    rule(OpsAlertKind.DEPLOYMENT_DOWN)
    return ModelFactory(name="watched").deployments.get()


def requests_at(deployment: Deployment, instant: datetime, status: str) -> None:
    """Three requests to ``deployment`` ending ``status`` at ``instant``, as the live path records each: its outcome
    to the breaker, its row to the ledger."""
    for _ in range(3):
        breaker_record(deployment.pk, ok=status == UsageStatus.OK)
        UsageRecordFactory(model_name="watched", deployment=deployment, status=status, created_at=instant)


def alert_mail() -> list:
    """The operations alerts emailed: Django's own mails to ADMINS of a 5xx answer left out, and the budget
    alerts a user gets about their own quota (at 50 % of it, say, before it refuses them)."""
    return [
        message
        for message in mail.outbox
        if message.subject.startswith("[llmhub]") and not BUDGET_SUBJECT.search(message.subject)
    ]


def ops_hooks(webhook) -> list[dict]:
    """The operations alerts the webhook received, without the budget alerts a user gets about their own quota
    (at 50 % of it, which a request may reach before the quota refuses the next one)."""
    return [entry for entry in webhook.received if not BUDGET_HOOK.search(entry["text"])]


def sent() -> list[tuple[list[str], str]]:
    return [(message.to, message.subject) for message in alert_mail()]


def test_a_model_failing_upstream_alerts_once_then_clears_once(gateway, webhook, settings):
    settings.LLMHUB_BREAKER_FAILURES = 1000  # the deployment stays in rotation: every request reaches it
    watched = rule(
        OpsAlertKind.ERROR_RATE, threshold=Decimal("20"), minimum_requests=4, email_recipients="oncall@example.com"
    )
    with time_machine.travel(T0, tick=True):
        assert [gateway.chat().status_code for _ in range(2)] == [200, 200]
        gateway.fault("503")
        assert all(gateway.chat().status_code >= 500 for _ in range(4))
        wait_for_ledger_rows(6)
    assert UsageRecord.objects.filter(status=UsageStatus.UPSTREAM_ERROR).count() == 4

    evaluate_at(T0 + timedelta(minutes=1))
    evaluate_at(T0 + timedelta(minutes=2))
    incident = OpsAlertIncident.objects.get()
    assert (incident.rule, incident.subject, incident.cleared_at) == (watched, "model:watched", None)
    assert incident.value_at_open.quantize(Decimal("0.1")) == Decimal("66.7")
    assert sent() == [(["oncall@example.com"], "[llmhub] firing: test error_rate (model:watched)")]
    assert len(webhook.received) == 1
    assert (
        "error rate of model watched is 66.7 % over the last 5 minutes (4 of 6 requests failed upstream)"
        in (webhook.received[0]["text"])
    )

    gateway.fault(None)
    with time_machine.travel(T0 + timedelta(minutes=6), tick=True):
        assert {gateway.chat().status_code for _ in range(4)} == {200}
        wait_for_ledger_rows(10)
    evaluate_at(T0 + timedelta(minutes=6, seconds=30))
    evaluate_at(T0 + timedelta(minutes=7))

    incident.refresh_from_db()
    assert incident.cleared_at == T0 + timedelta(minutes=6, seconds=30) and incident.value_at_clear == 0
    assert sent()[1:] == [(["oncall@example.com"], "[llmhub] cleared: test error_rate (model:watched)")]
    assert len(webhook.received) == 2 and webhook.received[1]["text"].startswith("llmhub: cleared: test error_rate")
    assert sorted(incident.delivered) == ["clear:email", "clear:webhook", "open:email", "open:webhook"]


def test_requests_refused_as_invalid_are_no_provider_failure_for_the_alert_nor_the_dashboard(gateway, settings):
    # A client sending requests the provider refuses (its 400s) and replies moderation blocks: the request's
    # fault, so no page about the model, no errors on the dashboard; the provider's 5xx still are both.
    settings.LLMHUB_BREAKER_FAILURES = 1000
    rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("20"), minimum_requests=4)
    model = CatalogModel.objects.get(name=gateway.model)
    model.moderation_policy = ModerationPolicy.objects.create(name="house", blocklist="forbidden", check_input=False)
    model.save()
    with time_machine.travel(T0, tick=True):
        assert [gateway.chat().status_code for _ in range(2)] == [200, 200]
        assert {gateway.chat("hi [[fault=400]]").status_code for _ in range(4)} == {400}
        blocked = [gateway.chat("[[reply=a forbidden answer]]") for _ in range(4)]
        assert {(r.status_code, r.json()["error"]["code"]) for r in blocked} == {(400, "content_policy_violation")}
        wait_for_ledger_rows(10)
    invalid = UsageRecord.objects.filter(status=UsageStatus.INVALID)
    assert sorted(invalid.values_list("error_type", flat=True)) == 4 * ["content_policy_violation"] + 4 * [
        "upstream_bad_request"
    ]
    assert UsageRecord.objects.filter(status=UsageStatus.UPSTREAM_ERROR).count() == 0

    evaluate_at(T0 + timedelta(minutes=1))
    assert not OpsAlertIncident.objects.exists() and alert_mail() == []
    (row,) = ops_deployments(now=T0 + timedelta(minutes=1))
    assert (row.requests, row.errors, row.problems) == (10, 0, ())

    gateway.fault("503")
    with time_machine.travel(T0 + timedelta(minutes=2), tick=True):
        assert all(gateway.chat().status_code >= 500 for _ in range(4))
        wait_for_ledger_rows(14)
    evaluate_at(T0 + timedelta(minutes=3))
    incident = OpsAlertIncident.objects.get()
    assert incident.value_at_open.quantize(Decimal("0.1")) == Decimal("66.7")  # 4 of the 6 it could judge
    (row,) = ops_deployments(now=T0 + timedelta(minutes=3))
    assert (row.requests, row.errors, row.problems) == (14, 4, ("29 % errors",))


def test_slow_replies_alert_on_the_p95_latency_once_then_clear_once(gateway, webhook):
    rule(OpsAlertKind.LATENCY_P95, threshold=Decimal("1000"), minimum_requests=3)
    with time_machine.travel(T0, tick=True):
        assert {gateway.chat("[[latency=1500]] hi").status_code for _ in range(3)} == {200}
        wait_for_ledger_rows(3)
    evaluate_at(T0 + timedelta(minutes=1))
    evaluate_at(T0 + timedelta(minutes=2))

    incident = OpsAlertIncident.objects.get()
    assert incident.subject == "model:watched" and incident.value_at_open >= 1500
    assert sent() == [([OPS], "[llmhub] firing: test latency_p95 (model:watched)")]
    assert len(webhook.received) == 1 and "p95 latency of model watched is" in webhook.received[0]["text"]

    with time_machine.travel(T0 + timedelta(minutes=6), tick=True):
        assert {gateway.chat().status_code for _ in range(3)} == {200}
        wait_for_ledger_rows(6)
    evaluate_at(T0 + timedelta(minutes=6, seconds=30))
    evaluate_at(T0 + timedelta(minutes=7))

    incident.refresh_from_db()
    assert incident.cleared_at is not None
    assert [subject for _, subject in sent()] == [
        "[llmhub] firing: test latency_p95 (model:watched)",
        "[llmhub] cleared: test latency_p95 (model:watched)",
    ]
    assert len(webhook.received) == 2


def test_a_user_using_up_the_daily_token_quota_alerts_once_and_clears_when_it_is_raised(gateway, webhook):
    # Refused long before 100 % is used (admission reserves what a request could cost at most): the refusal
    # is what fires, the 100 % threshold is never reached.
    rule(OpsAlertKind.TOKEN_QUOTA, threshold=Decimal("100"))
    plan = Plan.objects.get(name="Unlimited")
    plan.daily_token_quota = 100
    plan.save()
    statuses = []
    with time_machine.travel(T0, tick=True):
        while 429 not in statuses:
            assert len(statuses) < 20, "the quota never refused a request"
            statuses.append(gateway.chat().status_code)
        wait_for_ledger_rows(len(statuses))
    refused = UsageRecord.objects.get(status=UsageStatus.REJECTED)
    assert refused.error_type == "insufficient_quota"

    evaluate_at(T0 + timedelta(minutes=1))
    evaluate_at(T0 + timedelta(minutes=2))
    incident = OpsAlertIncident.objects.get()
    assert incident.subject == f"user:{gateway.user_id}" and incident.value_at_open < 100
    assert sent() == [([OPS], f"[llmhub] firing: test token_quota (user:{gateway.user_id})")]
    assert len(ops_hooks(webhook)) == 1 and "of a daily quota of 100 (" in ops_hooks(webhook)[0]["text"]

    evaluate_at(T0 + timedelta(minutes=3))  # still refused: nothing changes
    assert len(alert_mail()) == 1

    plan.daily_token_quota = 100_000  # an admin raises the quota; the user's requests go through again
    plan.save()
    # The live server is another process: it sees the change when its cached limits run out (the lookup
    # cache's TTL), as any other server process would.
    time.sleep(django_settings.LLMHUB_LOOKUP_CACHE_TTL + 0.5)
    with time_machine.travel(T0 + timedelta(minutes=4), tick=True):
        assert gateway.chat().status_code == 200
        wait_for_ledger_rows(len(statuses) + 1)
    evaluate_at(T0 + timedelta(minutes=5))
    evaluate_at(T0 + timedelta(minutes=6))
    incident.refresh_from_db()
    assert incident.cleared_at == T0 + timedelta(minutes=5)
    assert [subject for _, subject in sent()][1:] == [f"[llmhub] cleared: test token_quota (user:{gateway.user_id})"]
    assert len(ops_hooks(webhook)) == 2


def test_the_next_day_clears_a_used_up_quota():
    rule(OpsAlertKind.TOKEN_QUOTA, threshold=Decimal("100"))
    plan = Plan.objects.create(name="Tight", allow_all_models=True, daily_token_quota=30)
    user = UserFactory(username="heavy")
    plan_assign(user=user, plan=plan)
    UsageRecordFactory(user=user, prompt_tokens=20, completion_tokens=10, created_at=T0)
    evaluate_at(T0)
    assert OpsAlertIncident.objects.filter(cleared_at__isnull=True).count() == 1
    evaluate_at(T0 + timedelta(days=1) - timedelta(hours=12, seconds=1))  # still that day: 23:59:59
    assert OpsAlertIncident.objects.filter(cleared_at__isnull=True).count() == 1
    evaluate_at(T0 + timedelta(hours=12))  # midnight UTC: a new day, nothing used
    assert OpsAlertIncident.objects.get().cleared_at == T0 + timedelta(hours=12)
    assert len(alert_mail()) == 2


@pytest.mark.parametrize("how", ["shell", "admin"])
def test_a_deleted_users_quota_incident_closes_once_as_no_recovery(how, webhook):
    """A user deleted while their daily token quota's incident was open left no rows to measure (the ledger's go
    to null): the incident read as gone and cleared as a recovery, "cleared … at worst 100 %", the user back under
    their quota. The next evaluator run closes it, told once as closed, not recovered: the user was deleted."""
    rule(OpsAlertKind.TOKEN_QUOTA, threshold=Decimal("100"))
    plan = Plan.objects.create(name="Tight", allow_all_models=True, daily_token_quota=30)
    user, other = UserFactory(username="heavy"), UserFactory(username="also-heavy")
    for each in (user, other):
        plan_assign(user=each, plan=plan)
        UsageRecordFactory(user=each, prompt_tokens=20, completion_tokens=10, created_at=T0)
    evaluate_at(T0)
    assert OpsAlertIncident.objects.filter(cleared_at__isnull=True).count() == 2

    user_id = user.pk
    if how == "shell":
        user.delete()
    else:
        users_delete(user_ids=[user_id])
    with time_machine.travel(T0 + timedelta(minutes=1), tick=False):
        assert ops_alerts_evaluate().cleared == [f"token_quota user:{user_id}"]
    evaluate_at(T0 + timedelta(minutes=2))

    incident = OpsAlertIncident.objects.get(subject=f"user:{user_id}")
    assert (incident.cleared_at, incident.closed_because) == (T0 + timedelta(minutes=1), "the user was deleted")
    assert OpsAlertIncident.objects.get(subject=f"user:{other.pk}").cleared_at is None
    closed = f"[llmhub] closed, not recovered: test token_quota (user:{user_id})"
    assert [subject for _, subject in sent()].count(closed) == 1 and len(alert_mail()) == 3
    assert webhook.received[-1]["text"].startswith(
        f"llmhub: closed, not recovered: test token_quota (user:{user_id}): the user was deleted, so nothing "
        "watches it now"
    )
    assert len(webhook.received) == 3


def test_a_burst_of_spend_alerts_once_against_the_usual_hour_then_clears_once(gateway, webhook):
    spike = rule(OpsAlertKind.SPEND_SPIKE, threshold=Decimal("3"), minimum_baseline_usd=Decimal("0.00001"))
    webhook.fail_next = 2  # the webhook fails twice first: the alert is retried, not lost, nor sent twice
    with time_machine.travel(T0, tick=True):
        assert {gateway.chat("[[words=5]]").status_code for _ in range(3)} == {200}
        wait_for_ledger_rows(3)
    burst = sum(UsageRecord.objects.values_list("cost", flat=True))
    assert burst > 0
    # The week before: one row an hour, the usual hour costing a tenth of the burst.
    for hour in range(1, 24 * 7 + 1):
        UsageRecordFactory(
            user=None, model_name="watched", cost=burst / 10, created_at=T0 - timedelta(hours=hour, minutes=1)
        )

    evaluate_at(T0 + timedelta(minutes=5))
    evaluate_at(T0 + timedelta(minutes=10))
    incident = OpsAlertIncident.objects.get()
    assert (incident.rule, incident.subject) == (spike, "all")
    assert Decimal("9.5") < incident.value_at_open < Decimal("10.5")  # ~10 times the usual hour
    assert sent() == [([OPS], "[llmhub] firing: test spend_spike (all)")]
    assert len(webhook.received) == 1 and "times the usual hour" in webhook.received[0]["text"]

    evaluate_at(T0 + timedelta(hours=1, minutes=5))  # the burst is out of the last hour
    evaluate_at(T0 + timedelta(hours=1, minutes=6))
    incident.refresh_from_db()
    assert incident.cleared_at == T0 + timedelta(hours=1, minutes=5)
    assert [subject for _, subject in sent()] == [
        "[llmhub] firing: test spend_spike (all)",
        "[llmhub] cleared: test spend_spike (all)",
    ]
    assert len(webhook.received) == 2


def test_a_spend_spike_needs_a_usual_hour_worth_its_minimum():
    rule(OpsAlertKind.SPEND_SPIKE, threshold=Decimal("3"), minimum_baseline_usd=Decimal("1"))
    UsageRecordFactory(cost=Decimal("0.01"), created_at=T0 - timedelta(days=2))
    UsageRecordFactory(cost=Decimal("5"), created_at=T0 - timedelta(minutes=5))  # 84 000 times the usual hour
    evaluate_at(T0)
    assert OpsAlertIncident.objects.count() == 0 and alert_mail() == []


def test_a_deployment_whose_breaker_opens_is_one_incident_with_one_alert_each_way(gateway, webhook, settings):
    rule(OpsAlertKind.DEPLOYMENT_DOWN)
    settings.LLMHUB_BREAKER_FAILURES = 3
    settings.LLMHUB_BREAKER_COOLDOWN_SECONDS = 1
    deployment = gateway.deployment
    with time_machine.travel(T0, tick=True):
        gateway.fault("503")
        for _ in range(10):
            gateway.chat()
            if breaker_state(deployment.pk).state != CLOSED:
                break
        assert breaker_state(deployment.pk).state != CLOSED

    evaluate_at(T0 + timedelta(minutes=1))
    evaluate_at(T0 + timedelta(minutes=2))
    incident = Incident.objects.get()
    assert (incident.deployment_id, incident.reason, incident.ended_at) == (deployment.pk, BREAKER_REASON, None)
    assert len(alert_mail()) == 1 and alert_mail()[0].to == [OPS] and alert_mail()[0].subject.endswith("is down")
    assert len(webhook.received) == 1 and "is down since" in webhook.received[0]["text"]

    gateway.fault(None)
    with time_machine.travel(T0 + timedelta(minutes=3), tick=True):  # the cooldown is over: a probe goes through
        statuses = []
        while breaker_state(deployment.pk).state != CLOSED:
            assert len(statuses) < 50, "the breaker never closed"
            statuses.append(gateway.chat().status_code)
            time.sleep(0.1)
        assert 200 in statuses
    evaluate_at(T0 + timedelta(minutes=4))
    evaluate_at(T0 + timedelta(minutes=5))

    incident.refresh_from_db()
    assert incident.ended_at == T0 + timedelta(minutes=4)
    assert len(alert_mail()) == 2 and alert_mail()[1].subject.endswith("is back up")
    assert len(webhook.received) == 2 and "is back up after" in webhook.received[1]["text"]
    assert OpsAlertIncident.objects.count() == 0  # the deployment's own Incident is the one incident


def test_an_incident_health_checks_opened_is_left_to_them(fake_upstream):
    """A deployment found down by its health checks already has its incident (and its alert): the evaluator
    opens no second one, and does not close it when the breaker closes (a passing probe will)."""
    rule(OpsAlertKind.DEPLOYMENT_DOWN)
    deployment = ModelFactory(provider=ProviderFactory(base_url=fake_upstream.base_url + "/v1")).deployments.get()
    Incident.objects.create(deployment=deployment, started_at=T0, reason="the model list failed")
    evaluate_at(T0 + timedelta(minutes=1))  # its breaker is closed (nothing failed since it was reset)
    assert Incident.objects.get().ended_at is None
    assert alert_mail() == []


def test_completions_failing_while_the_model_list_answers_are_one_incident_not_one_every_health_check(settings):
    """What the breaker is there for: a provider whose model list answers while its completions fail. Each
    health check passes and closes the breaker, the requests fail again and open it again: the operator must
    get one "down" and, once completions work again, one "back up", not a pair every round of health checks."""
    settings.REDIS_URL = ""
    settings.LLMHUB_BREAKER_FAILURES = 3
    deployment = watched_deployment()

    requests_at(deployment, T0, UsageStatus.UPSTREAM_ERROR)
    assert breaker_state(deployment.pk).state != CLOSED
    evaluate_at(T0 + timedelta(minutes=1))
    for minutes in (5, 10, 15):  # a round of health checks every 5 minutes: the model list answers
        deployment_probe_record(
            probe=DeploymentProbe(deployment.pk, ok=True, latency_ms=20), at=T0 + timedelta(minutes=minutes)
        )
        requests_at(deployment, T0 + timedelta(minutes=minutes, seconds=30), UsageStatus.UPSTREAM_ERROR)
        evaluate_at(T0 + timedelta(minutes=minutes + 1))
    assert Incident.objects.count() == 1 and Incident.objects.get().ended_at is None
    down = f"[llmhub] deployment {deployment.name} of model watched is down"
    assert [message.subject for message in alert_mail()] == [down]

    breaker_reset(deployment.pk)  # completions answer again: the half-open probe succeeded
    requests_at(deployment, T0 + timedelta(minutes=20), UsageStatus.OK)
    evaluate_at(T0 + timedelta(minutes=21))
    assert Incident.objects.get().ended_at == T0 + timedelta(minutes=21)
    assert [message.subject for message in alert_mail()] == [down, down.replace("is down", "is back up")]


def test_a_paid_health_probe_passing_closes_the_incident_the_breaker_opened():
    """A paid probe is a completion: it sees what the breaker saw, and its passing closes the incident."""
    deployment = watched_deployment()
    Incident.objects.create(deployment=deployment, started_at=T0, reason=BREAKER_REASON)
    deployment_probe_record(probe=DeploymentProbe(deployment.pk, ok=True, latency_ms=20), at=T0 + timedelta(minutes=5))
    assert Incident.objects.get().ended_at is None
    probe = DeploymentProbe(deployment.pk, ok=True, latency_ms=20, paid=True)
    deployment_probe_record(probe=probe, at=T0 + timedelta(minutes=10))
    assert Incident.objects.get().ended_at == T0 + timedelta(minutes=10)


def test_one_failure_in_two_requests_is_no_incident():
    rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=20)
    UsageRecordFactory(model_name="m", created_at=T0 - timedelta(minutes=1))
    UsageRecordFactory(model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 - timedelta(minutes=1))
    evaluate_at(T0)
    assert OpsAlertIncident.objects.count() == 0


@pytest.mark.parametrize("kind", [OpsAlertKind.ERROR_RATE, OpsAlertKind.LATENCY_P95])
def test_an_incident_does_not_clear_because_the_traffic_fell_under_the_minimum_while_it_still_fails(kind):
    """The minimum of requests keeps one slow or failed request out of two from opening an incident. In an
    outage, clients back off and the traffic falls under it: every request still fails, and "cleared" then
    would tell the operator it is over. It clears when the requests are back under the threshold, or there
    are none left to judge."""
    rule(kind, threshold=Decimal("10") if kind == OpsAlertKind.ERROR_RATE else Decimal("1000"), minimum_requests=4)
    bad = (
        {"status": UsageStatus.UPSTREAM_ERROR}
        if kind == OpsAlertKind.ERROR_RATE
        else {"duration_ms": 5000, "stream": False}
    )
    for _ in range(4):
        UsageRecordFactory(model_name="m", created_at=T0 - timedelta(minutes=1), **bad)
    evaluate_at(T0)
    for _ in range(2):
        UsageRecordFactory(model_name="m", created_at=T0 + timedelta(minutes=3), **bad)
    evaluate_at(T0 + timedelta(minutes=5))  # 2 requests in the window, every one bad
    assert OpsAlertIncident.objects.get().cleared_at is None and len(alert_mail()) == 1
    evaluate_at(T0 + timedelta(minutes=9))  # none left in the window
    assert OpsAlertIncident.objects.get().cleared_at == T0 + timedelta(minutes=9) and len(alert_mail()) == 2


def test_concurrent_evaluators_open_one_incident_and_send_one_alert():
    rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2)
    for _ in range(3):
        UsageRecordFactory(model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 - timedelta(minutes=1))
    barrier = threading.Barrier(4)

    def evaluate_in_thread() -> None:
        from django.db import connection

        barrier.wait()
        ops_alerts_evaluate(now=T0)
        connection.close()

    threads = [threading.Thread(target=evaluate_in_thread) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert OpsAlertIncident.objects.count() == 1
    assert len(alert_mail()) == 1


def test_a_slow_evaluation_does_not_open_again_an_incident_a_later_one_cleared():
    """Beat sends the evaluator every minute whether or not the last run finished: a run that measured at T0+1
    (the failures still in its window) and writes only after the run of T0+2 cleared the incident must not
    open a second one: the operator would be paged again, for a breach already over, dated before its clear."""
    rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2)
    for _ in range(2):
        UsageRecordFactory(
            model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 - timedelta(minutes=3, seconds=30)
        )
    evaluate_at(T0, times=1)
    evaluate_at(T0 + timedelta(minutes=2), times=1)  # the failures are out of the 5-minute window: cleared
    assert OpsAlertIncident.objects.get().cleared_at == T0 + timedelta(minutes=2)

    ops_alerts_evaluate(now=T0 + timedelta(minutes=1))  # the slow run, its measure older than that clear
    assert OpsAlertIncident.objects.count() == 1
    assert [subject for _, subject in sent()] == [
        "[llmhub] firing: test error_rate (model:m)",
        "[llmhub] cleared: test error_rate (model:m)",
    ]


def test_a_slow_evaluation_does_not_clear_an_incident_a_later_one_opened():
    """The other way round: a run that measured at T0+1, before the failures, and writes after the run of T0+2
    opened the incident, must not clear it (firing and cleared at once, then firing again a minute later)."""
    rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2)
    for _ in range(2):
        UsageRecordFactory(
            model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 + timedelta(minutes=1, seconds=30)
        )
    evaluate_at(T0 + timedelta(minutes=2), times=1)
    ops_alerts_evaluate(now=T0 + timedelta(minutes=1))  # the slow run: nothing had failed when it measured
    assert OpsAlertIncident.objects.get().cleared_at is None
    assert [subject for _, subject in sent()] == ["[llmhub] firing: test error_rate (model:m)"]


def test_the_task_evaluates_and_a_disabled_rule_is_silent():
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2, enabled=False)
    for _ in range(2):
        UsageRecordFactory(model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 - timedelta(minutes=1))
    with time_machine.travel(T0, tick=False):
        assert ops_alerts_evaluate_task.delay().get() == 0
        OpsAlertRule.objects.filter(pk=watched.pk).update(enabled=True)
        assert ops_alerts_evaluate_task.delay().get() == 1
    assert len(alert_mail()) == 1


def test_a_rule_the_database_cannot_measure_is_logged_and_the_others_are_evaluated(caplog):
    """One rule's measure fails in the database (a heavy window cut by PostgreSQL's statement timeout, say): the
    evaluator stopped there, every minute for as long as it failed, and the rules after it were never evaluated:
    a p95 latency far above its threshold opened no incident and paged nobody. The others are evaluated now; the
    one that failed is logged by its name, and the run ends failed, so that /ops/ shows the task failing."""
    rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2)
    rule(OpsAlertKind.LATENCY_P95, threshold=Decimal("1000"), minimum_requests=2)
    for _ in range(2):
        UsageRecordFactory(model_name="m", duration_ms=5000, stream=False, created_at=T0 - timedelta(minutes=1))

    def error_rate_cut(execute, sql, params, many, context):
        if params and UsageStatus.UPSTREAM_ERROR in params:
            raise OperationalError("canceling statement due to statement timeout")
        return execute(sql, params, many, context)

    with time_machine.travel(T0, tick=False), connection.execute_wrapper(error_rate_cut):
        with pytest.raises(OpsAlertRulesNotEvaluatedError, match="test error_rate"):
            ops_alerts_evaluate_task.apply(throw=True)

    incident = OpsAlertIncident.objects.get()
    assert incident.rule.kind == OpsAlertKind.LATENCY_P95 and incident.cleared_at is None
    assert [subject for _, subject in sent()] == ["[llmhub] firing: test latency_p95 (model:m)"]
    [failure] = [r for r in caplog.records if r.levelname == "ERROR" and r.name == "billing.services.ops_alerts"]
    assert "test error_rate" in failure.getMessage() and failure.exc_info is not None


def test_the_soft_time_limit_inside_one_rule_stops_the_evaluation_before_the_next():
    rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2)
    rule(OpsAlertKind.LATENCY_P95, threshold=Decimal("1000"), minimum_requests=2)
    for _ in range(2):
        UsageRecordFactory(model_name="m", duration_ms=5000, stream=False, created_at=T0 - timedelta(minutes=1))

    def time_is_up(execute, sql, params, many, context):
        if params and UsageStatus.UPSTREAM_ERROR in params:
            raise SoftTimeLimitExceeded()
        return execute(sql, params, many, context)

    with time_machine.travel(T0, tick=False), connection.execute_wrapper(time_is_up):
        with pytest.raises(SoftTimeLimitExceeded):
            ops_alerts_evaluate_task.apply(throw=True)
    assert OpsAlertIncident.objects.count() == 0


def test_the_default_rules_are_installed_and_editable_in_the_admin(admin_client):
    importlib.import_module("billing.migrations.0011_ops_alerts").install_default_rules(django_apps, None)
    assert set(OpsAlertRule.objects.values_list("kind", flat=True)) == set(OpsAlertKind.values)
    error_rate = OpsAlertRule.objects.get(kind=OpsAlertKind.ERROR_RATE)
    assert (error_rate.threshold, error_rate.window_minutes, error_rate.minimum_requests) == (Decimal("10"), 5, 20)

    page = admin_client.get(f"/admin/billing/opsalertrule/{error_rate.pk}/change/")
    assert page.status_code == 200
    form = {
        field: getattr(error_rate, field)
        for field in (
            "name",
            "kind",
            "window_minutes",
            "minimum_requests",
            "minimum_baseline_usd",
            "clear_after_minutes",
            "model_name",
        )
    }
    response = admin_client.post(
        f"/admin/billing/opsalertrule/{error_rate.pk}/change/",
        {**form, "enabled": "on", "threshold": "25", "email_recipients": "a@example.com", "webhook_url": ""},
    )
    assert response.status_code == 302, response.content
    error_rate.refresh_from_db()
    assert error_rate.threshold == Decimal("25") and error_rate.email_recipients == "a@example.com"
    assert admin_client.get("/admin/billing/opsalertincident/").status_code == 200


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        (OpsAlertKind.ERROR_RATE, "window_minutes", "0"),  # an empty window: it could never fire
        (OpsAlertKind.LATENCY_P95, "window_minutes", "0"),
        (OpsAlertKind.TOKEN_QUOTA, "window_minutes", "0"),
        (OpsAlertKind.ERROR_RATE, "threshold", "-5"),
        (OpsAlertKind.ERROR_RATE, "threshold", "100"),  # "above 100 %" of requests failed: never
        (OpsAlertKind.ERROR_RATE, "threshold", "150"),
        (OpsAlertKind.TOKEN_QUOTA, "threshold", "0"),  # 0 % used: every user with a quota, always
        (OpsAlertKind.TOKEN_QUOTA, "threshold", "120"),
        (OpsAlertKind.LATENCY_P95, "threshold", "0"),  # above 0 ms: every request
        (OpsAlertKind.SPEND_SPIKE, "threshold", "0.5"),  # half the usual hour is no spike
        (OpsAlertKind.SPEND_SPIKE, "threshold", "1"),
    ],
)
def test_the_admin_refuses_a_threshold_or_window_that_cannot_mean_an_incident(admin_client, kind, field, value):
    """A window of 0 minutes never holds a request, a percent above 100 is never reached and one of 0 is always
    reached: the rule would never fire, or fire for everything. The form says which field is wrong, on the
    change page and in the list's editable columns alike, and the rule keeps its values."""
    watched = rule(kind, threshold=Decimal("10") if kind != OpsAlertKind.SPEND_SPIKE else Decimal("3"))
    form = {
        "name": watched.name,
        "kind": kind,
        "enabled": "on",
        "threshold": str(watched.threshold),
        "window_minutes": "5",
        "minimum_requests": "20",
        "minimum_baseline_usd": "1",
        "clear_after_minutes": "0",
        "model_name": "",
        "email_recipients": "",
        "webhook_url": "",
        field: value,
    }
    response = admin_client.post(f"/admin/billing/opsalertrule/{watched.pk}/change/", form)
    assert response.status_code == 200  # the form again, not a redirect
    assert field in response.context["adminform"].form.errors

    listed = {
        "form-TOTAL_FORMS": "1",
        "form-INITIAL_FORMS": "1",
        "form-0-id": str(watched.pk),
        "form-0-enabled": "on",
        "form-0-threshold": str(watched.threshold),
        "form-0-window_minutes": "5",
        "form-0-minimum_requests": "20",
        f"form-0-{field}": value,
        "_save": "Save",
    }
    response = admin_client.post("/admin/billing/opsalertrule/", listed)
    assert response.status_code == 200
    assert response.context["cl"].formset.errors[0].get(field)
    refreshed = OpsAlertRule.objects.get(pk=watched.pk)
    assert (refreshed.threshold, refreshed.window_minutes) == (watched.threshold, 5)


def test_a_rules_kind_cannot_be_changed_under_its_open_incidents(admin_client, webhook):
    """An incident of an error-rate rule judged as a p95 latency would clear "at worst 60 ms": a rule's kind is
    what its incidents mean, so it is set when the rule is added and shown read-only after."""
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("50"), minimum_requests=2)
    for status in 3 * [UsageStatus.UPSTREAM_ERROR] + 2 * [UsageStatus.OK]:
        UsageRecordFactory(model_name="m", status=status, created_at=T0 - timedelta(minutes=1))
    evaluate_at(T0)
    form = {
        "name": watched.name,
        "kind": OpsAlertKind.LATENCY_P95,
        "enabled": "on",
        "threshold": "55",
        "window_minutes": "5",
        "minimum_requests": "2",
        "minimum_baseline_usd": "1",
        "clear_after_minutes": "0",
        "model_name": "",
        "email_recipients": "",
        "webhook_url": "",
    }
    response = admin_client.post(f"/admin/billing/opsalertrule/{watched.pk}/change/", form)
    assert response.status_code == 302
    watched.refresh_from_db()
    assert (watched.kind, watched.threshold) == (OpsAlertKind.ERROR_RATE, Decimal("55"))
    page = admin_client.get(f"/admin/billing/opsalertrule/{watched.pk}/change/")
    assert "kind" not in page.context["adminform"].form.fields and "Error rate per model" in page.content.decode()
    evaluate_at(T0 + timedelta(seconds=30))  # still 60 % failed, above 55 %: still open, nothing sent
    assert OpsAlertIncident.objects.get().cleared_at is None and len(webhook.received) == 1
    assert admin_client.get("/admin/billing/opsalertrule/add/").context["adminform"].form.fields["kind"]


@pytest.mark.parametrize(
    "recipients",
    [
        "oncall@example.com; lead@example.com",  # Outlook's separator: the SMTP backend raises on the whole line
        "oncall",  # no domain: the mail server refuses it, and every alert ends exhausted
        "oncall@example.com, lead@",
    ],
)
def test_the_admin_refuses_recipients_that_are_not_addresses(admin_client, recipients):
    """The alerts would be refused at delivery, each one, long after the operator saved the rule: the form says
    which entry is wrong instead."""
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), email_recipients="oncall@example.com")
    form = {
        "name": watched.name,
        "kind": watched.kind,
        "enabled": "on",
        "threshold": "10",
        "window_minutes": "5",
        "minimum_requests": "20",
        "minimum_baseline_usd": "1",
        "clear_after_minutes": "0",
        "model_name": "",
        "email_recipients": recipients,
        "webhook_url": "",
    }
    response = admin_client.post(f"/admin/billing/opsalertrule/{watched.pk}/change/", form)
    assert response.status_code == 200
    (error,) = response.context["adminform"].form.errors["email_recipients"]
    assert "comma" in error
    assert OpsAlertRule.objects.get(pk=watched.pk).email_recipients == "oncall@example.com"

    form["email_recipients"] = "oncall@example.com,\nlead@example.com"
    assert admin_client.post(f"/admin/billing/opsalertrule/{watched.pk}/change/", form).status_code == 302


@pytest.mark.parametrize(
    ("kind", "threshold"),
    [
        (OpsAlertKind.ERROR_RATE, "0"),  # any failure at all
        (OpsAlertKind.ERROR_RATE, "99.9"),
        (OpsAlertKind.TOKEN_QUOTA, "100"),
        (OpsAlertKind.LATENCY_P95, "1"),
        (OpsAlertKind.SPEND_SPIKE, "1.5"),
        (OpsAlertKind.DEPLOYMENT_DOWN, "0"),  # unused
    ],
)
def test_thresholds_that_mean_an_incident_are_accepted(kind, threshold):
    OpsAlertRule(name="r", kind=kind, threshold=Decimal(threshold), window_minutes=1).full_clean()


def test_the_alert_says_what_where_how_bad_since_when_and_against_which_threshold(webhook):
    """Paged, an operator must know from the message alone whether the rule is too touchy or the model is on
    fire: the threshold it went past, and when it clears, how bad it got."""
    rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("20"), minimum_requests=4)
    for status in 3 * [UsageStatus.UPSTREAM_ERROR] + [UsageStatus.OK]:
        UsageRecordFactory(model_name="m", status=status, created_at=T0 - timedelta(minutes=1))
    evaluate_at(T0)
    for _ in range(4):
        UsageRecordFactory(model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 + timedelta(minutes=1))
    evaluate_at(T0 + timedelta(minutes=2))  # worse: 7 of 8
    evaluate_at(T0 + timedelta(minutes=10))  # nothing in the window: cleared
    firing, cleared = (entry["text"] for entry in webhook.received)
    assert firing == (
        "llmhub: test error_rate: error rate of model m is 75.0 % over the last 5 minutes (3 of 4 requests failed "
        "upstream), above the rule's 20 % (from 4 requests) (since 2026-11-24 12:00 UTC)."
    )
    assert cleared == (
        "llmhub: cleared: test error_rate (model:m), after 10\xa0minutes (since 2026-11-24 12:00 UTC); at worst "
        "87.5 %, the rule's threshold 20 %. It began as: error rate of model m is 75.0 % over the last 5 minutes "
        "(3 of 4 requests failed upstream)."
    )
    assert [message.body for message in alert_mail()] == [firing, cleared]


def test_an_alert_quotes_the_threshold_its_incident_opened_under_when_the_rule_was_edited_since(webhook):
    """A threshold an admin edited during an incident: the cleared alert quoted the rule's new one ("the rule's
    threshold 10 %" for an incident opened at 5 %), as if it had opened under it. It quotes the one it opened
    under, and the rule's new one beside it; so does an alert the sweep sends late, and the closing one."""
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("5"), minimum_requests=4)
    for status in [UsageStatus.UPSTREAM_ERROR] + 9 * [UsageStatus.OK]:
        UsageRecordFactory(model_name="m", status=status, created_at=T0 - timedelta(minutes=1))
    evaluate_at(T0)  # 10 %, above 5 %: opened
    incident = OpsAlertIncident.objects.get()
    assert incident.threshold == Decimal("5")
    watched.threshold = Decimal("10")
    watched.save(update_fields=["threshold"])
    assert "above the rule's 5 % (from 4 requests; the rule's threshold is 10 % now)" in ops_alert_text(
        incident, "open"
    )

    evaluate_at(T0 + timedelta(minutes=10))  # nothing in the window: cleared
    firing, cleared = (entry["text"] for entry in webhook.received)
    assert "above the rule's 5 % (from 4 requests)" in firing
    assert "at worst 10.0 %, the rule's threshold 5 % when it opened (10 % now). It began as" in cleared
    incident.refresh_from_db()
    incident.closed_because = "the rule was disabled"
    assert ", the rule's threshold 5 % when it opened (10 % now). It began as" in ops_alert_text(incident, "clear")


def test_an_incident_opened_before_its_threshold_was_kept_quotes_the_rules():
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("20"), minimum_requests=4)
    incident = OpsAlertIncident(
        rule=watched, subject="model:m", opened_at=T0, cleared_at=T0, value_at_open=30, peak=Decimal(30), detail="x"
    )
    assert "at worst 30.0 %, the rule's threshold 20 %. It began as" in ops_alert_text(incident, "clear")


@pytest.mark.parametrize(
    ("kind", "threshold", "words"),
    [
        (OpsAlertKind.LATENCY_P95, "10000", "above the rule's 10000 ms (from 20 requests)"),
        (OpsAlertKind.TOKEN_QUOTA, "90", "the rule alerts at 90 % of the quota used, or when the quota refuses"),
        (OpsAlertKind.SPEND_SPIKE, "3.5", "above the rule's 3.5 times the usual hour (from a usual hour of $1.00)"),
    ],
)
def test_each_kind_of_alert_names_its_threshold(kind, threshold, words):
    watched = rule(kind, threshold=Decimal(threshold), minimum_baseline_usd=Decimal("1"))
    incident = OpsAlertIncident(rule=watched, subject="all", opened_at=T0, value_at_open=1, peak=1, detail="x")
    assert words in ops_alert_text(incident, "open")


def test_nearest_rank_percentile():
    assert percentile([100] * 19 + [5000], 0.95) == 100
    assert percentile([100] * 18 + [5000] * 2, 0.95) == 5000
    assert percentile([7], 0.95) == 7


def test_a_rules_own_webhook_is_called_under_the_outbound_policy(webhook, settings):
    """A rule's webhook (here a loopback server) is refused when private addresses are not allowed: by the
    admin's form, and again when a delivery connects (the email still goes)."""
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = False
    settings.LLMHUB_ALERT_WEBHOOK_URL = ""
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2, webhook_url=webhook.url)
    with pytest.raises(ValidationError) as refused:
        watched.full_clean()
    assert "webhook_url" in refused.value.message_dict and webhook.url not in str(refused.value)

    for _ in range(2):
        UsageRecordFactory(model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 - timedelta(minutes=1))
    evaluate_at(T0)
    assert webhook.received == []
    assert OpsAlertIncident.objects.get().delivered == ["open:email"]

    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True  # allowed: the rule's own webhook, not the global one
    watched.full_clean()
    UsageRecord.objects.all().delete()
    evaluate_at(T0 + timedelta(minutes=1))
    assert [entry["text"][:24] for entry in webhook.received] == ["llmhub: cleared: test er"]


def test_a_young_gateways_usual_hour_is_the_mean_of_the_hours_it_has_run():
    """A gateway two days old, spending the same every hour: spread over a week its usual hour would be two
    sevenths of the real one and every hour 3.5 times it, a spike for days. Its usual hour is the mean of the
    hours its ledger covers; under a day of ledger there is none yet."""
    rule(OpsAlertKind.SPEND_SPIKE, threshold=Decimal("3"), minimum_baseline_usd=Decimal("1"))
    for hour in range(0, 48):
        UsageRecordFactory(cost=Decimal("10"), created_at=T0 - timedelta(hours=hour, minutes=30))
    evaluate_at(T0)
    assert OpsAlertIncident.objects.count() == 0 and alert_mail() == []

    UsageRecordFactory(cost=Decimal("50"), created_at=T0 - timedelta(minutes=10))  # six times the usual hour
    evaluate_at(T0)
    incident = OpsAlertIncident.objects.get()
    assert Decimal("5.5") < incident.value_at_open < Decimal("6.5")
    assert "the mean hour of the 46 hours before" in incident.detail  # its first row to an hour ago


def test_a_model_added_this_week_is_measured_against_its_own_usual_hour():
    """A gateway a month old, a model added two days ago spending the same every hour, a rule watching that
    model: spread over the week, its usual hour would be two sevenths of the real one, and every hour of its
    first days 3.5 times it, a spike. Its usual hour is the mean of the hours it has been used, as a young
    gateway's is; a model used before the week (its days in the rollups) keeps the whole week."""
    watched = rule(
        OpsAlertKind.SPEND_SPIKE, threshold=Decimal("3"), minimum_baseline_usd=Decimal("1"), model_name="new"
    )
    UsageRecordFactory(model_name="old", cost=Decimal("1"), created_at=T0 - timedelta(days=30))
    for hour in range(0, 48):
        UsageRecordFactory(model_name="new", cost=Decimal("10"), created_at=T0 - timedelta(hours=hour, minutes=30))
    evaluate_at(T0)
    assert OpsAlertIncident.objects.count() == 0 and alert_mail() == []

    UsageRecordFactory(model_name="new", cost=Decimal("50"), created_at=T0 - timedelta(minutes=10))
    evaluate_at(T0)
    incident = OpsAlertIncident.objects.get()
    assert Decimal("5.5") < incident.value_at_open < Decimal("6.5")
    assert "spend on model new in the last hour" in incident.detail
    assert "the mean hour of the 46 hours before" in incident.detail

    # Used before the week too (a day in the rollups): 48 hours of spend in a week is its usual, 3.5 times it a spike.
    DailyUsage.objects.create(day=(T0 - timedelta(days=20)).date(), model_name="new", cost=Decimal("1"))
    (measure,) = spend_spike_measures(watched, T0).values()
    assert "the mean hour of the 7 days before" in measure.detail


def test_a_spend_spike_rule_keeps_its_models_usual_hour_and_its_incident_across_a_rename():
    """A spend-spike rule watching one model took its usual hour from the ledger's rows of the model's name: an
    admin renaming the model split its history, and the new name's few hours were no usual hour yet, so a spike
    right after the rename went unseen (or, later, was measured against the new name's hours alone). The rows of
    the model (its pk) are its history, whatever name each was written with, and its incident follows it across
    a rename as the error rate's does: one firing, no second one under the new name."""
    model = ModelFactory(name="m")
    rule(OpsAlertKind.SPEND_SPIKE, threshold=Decimal("3"), minimum_baseline_usd=Decimal("1"), model=model)
    UsageRecordFactory(model_name="other", cost=Decimal("1"), created_at=T0 - timedelta(days=30))
    DailyUsage.objects.create(day=(T0 - timedelta(days=20)).date(), model_name="m", cost=Decimal("240"))
    for hour in range(1, 169):  # $10 an hour for the week; renamed 10 hours ago
        name = "m2" if hour <= 10 else "m"
        UsageRecordFactory(model=model, model_name=name, cost=Decimal("10"), created_at=T0 - timedelta(hours=hour))
    model.name = "m2"
    model.save(update_fields=["name"])
    UsageRecordFactory(model=model, model_name="m2", cost=Decimal("50"), created_at=T0 - timedelta(minutes=10))
    evaluate_at(T0)
    incident = OpsAlertIncident.objects.get()
    assert incident.subject == "model:m2"
    assert Decimal("4.5") < incident.value_at_open < Decimal("5.5")
    assert "spend on model m2 in the last hour" in incident.detail
    assert "the mean hour of the 7 days before" in incident.detail

    model.name = "m3"  # renamed again during the spike
    model.save(update_fields=["name"])
    evaluate_at(T0 + timedelta(minutes=5))
    incident = OpsAlertIncident.objects.get()
    assert (incident.subject, incident.renamed_from, incident.cleared_at) == ("model:m3", "model:m2", None)
    assert [subject for _, subject in sent()] == ["[llmhub] firing: test spend_spike (model:m2)"]


@pytest.mark.parametrize("bound", [True, False], ids=["bound to the model", "by its name"])
def test_a_model_deleted_during_its_spend_spike_has_the_incident_closed_once_and_none_opened_from_its_rows(
    bound, webhook
):
    """A model deleted while its spend spike is open (its rule narrowed to it, bound to it or watching its name
    alone) has the incident closed at the deletion, told once as closed, not recovered ("the model was deleted"),
    never cleared as a recovery; and the rows it left in the last hour open no second incident while they are in
    it, nor after."""
    model = ModelFactory(name="m")
    watched = rule(OpsAlertKind.SPEND_SPIKE, threshold=Decimal("3"), minimum_baseline_usd=Decimal("1"), model=model)
    if not bound:  # its name alone (the release before, during a rolling deploy; a queryset's update): no model
        OpsAlertRule.objects.filter(pk=watched.pk).update(model=None, model_name="m")
    UsageRecordFactory(model_name="other", cost=Decimal("1"), created_at=T0 - timedelta(days=30))
    DailyUsage.objects.create(day=(T0 - timedelta(days=20)).date(), model_name="m", cost=Decimal("240"))
    for hour in range(1, 169):  # $10 an hour for the week
        UsageRecordFactory(model=model, model_name="m", cost=Decimal("10"), created_at=T0 - timedelta(hours=hour))
    for at in (T0 - timedelta(minutes=1), T0 + timedelta(seconds=10)):  # the spike, up to the deletion
        UsageRecordFactory(model=model, model_name="m", cost=Decimal("50"), created_at=at)
    evaluate_at(T0)
    assert OpsAlertIncident.objects.get().cleared_at is None

    with time_machine.travel(T0 + timedelta(seconds=30), tick=False):
        model.delete()
    for minutes in (1, 30, 59, 60.1, 61, 180):  # its rows in the last hour (a spike still), then out of it
        evaluate_at(T0 + timedelta(minutes=minutes))

    incident = OpsAlertIncident.objects.get()
    assert (incident.cleared_at, incident.closed_because) == (T0 + timedelta(seconds=30), "the model was deleted")
    assert [subject for _, subject in sent()] == [
        "[llmhub] firing: test spend_spike (model:m)",
        "[llmhub] closed, not recovered: test spend_spike (model:m)",
    ]
    assert len(webhook.received) == 2
    assert webhook.received[-1]["text"].startswith(
        "llmhub: closed, not recovered: test spend_spike (model:m): the model was deleted, so nothing watches it now"
    )


def test_a_gateway_younger_than_a_day_has_no_usual_hour_yet():
    rule(OpsAlertKind.SPEND_SPIKE, threshold=Decimal("3"), minimum_baseline_usd=Decimal("1"))
    for hour in range(0, 20):
        UsageRecordFactory(cost=Decimal("10"), created_at=T0 - timedelta(hours=hour, minutes=30))
    UsageRecordFactory(cost=Decimal("500"), created_at=T0 - timedelta(minutes=10))
    evaluate_at(T0)
    assert OpsAlertIncident.objects.count() == 0 and alert_mail() == []


# Taken out of evaluation by an admin ---------------------------------------------------------------------


def _rule_disable_in_admin(admin_client, watched: OpsAlertRule, where: str) -> None:
    if where == "form":
        form = {
            "name": watched.name,
            "threshold": str(watched.threshold),
            "window_minutes": str(watched.window_minutes),
            "minimum_requests": str(watched.minimum_requests),
            "minimum_baseline_usd": "1",
            "clear_after_minutes": "0",
            "model_name": "",
            "email_recipients": "",
            "webhook_url": "",
        }
        response = admin_client.post(f"/admin/billing/opsalertrule/{watched.pk}/change/", form)
    else:
        listed = {
            "form-TOTAL_FORMS": "1",
            "form-INITIAL_FORMS": "1",
            "form-0-id": str(watched.pk),
            "form-0-threshold": str(watched.threshold),
            "form-0-window_minutes": str(watched.window_minutes),
            "form-0-minimum_requests": str(watched.minimum_requests),
            "_save": "Save",
        }
        response = admin_client.post("/admin/billing/opsalertrule/", listed)
    assert response.status_code == 302, response.content


@pytest.mark.parametrize("where", ["form", "list"])
def test_disabling_a_rule_closes_its_open_incident_once_saying_who_and_enabling_it_starts_afresh(
    admin_client, admin_user, webhook, where
):
    """A disabled rule is evaluated no more: its open incident used to stay open, a page that never resolved
    (and "cleared after 3 weeks" once the rule was enabled again). It is closed when the rule is disabled, and
    told once, on the same channels, as closed by that admin, not as a recovery."""
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2)
    for _ in range(2):
        UsageRecordFactory(model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 - timedelta(minutes=1))
    evaluate_at(T0)
    with time_machine.travel(T0 + timedelta(minutes=1), tick=False):
        _rule_disable_in_admin(admin_client, watched, where)
    incident = OpsAlertIncident.objects.get()
    assert incident.cleared_at == T0 + timedelta(minutes=1)
    assert incident.closed_because == f"the rule was disabled by {admin_user.username}"
    closed = "[llmhub] closed, not recovered: test error_rate (model:m)"
    assert [subject for _, subject in sent()] == ["[llmhub] firing: test error_rate (model:m)", closed]
    assert len(webhook.received) == 2
    assert webhook.received[1]["text"].startswith(
        f"llmhub: closed, not recovered: test error_rate (model:m): the rule was disabled by {admin_user.username}"
    )
    evaluate_at(T0 + timedelta(minutes=2))  # disabled: nothing more
    assert len(alert_mail()) == 2 and len(webhook.received) == 2

    OpsAlertRule.objects.filter(pk=watched.pk).update(enabled=True)  # still failing: a new incident, a new page
    evaluate_at(T0 + timedelta(minutes=3))
    assert OpsAlertIncident.objects.filter(cleared_at__isnull=True).count() == 1
    assert OpsAlertIncident.objects.count() == 2 and len(alert_mail()) == 3 and len(webhook.received) == 3


def test_a_rule_disabled_outside_the_admin_has_its_open_incident_closed_by_the_evaluator_once(webhook):
    """Disabled from the shell, a bulk ``update`` or ``loaddata``, no admin save closed the rule's incident, and
    nothing evaluates a disabled rule: it stayed open, a page that never resolved. The next evaluator run closes
    it, told once as closed because the rule was disabled."""
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2)
    for _ in range(2):
        UsageRecordFactory(model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 - timedelta(minutes=1))
    evaluate_at(T0)
    OpsAlertRule.objects.filter(pk=watched.pk).update(enabled=False)
    with time_machine.travel(T0 + timedelta(minutes=1), tick=False):
        assert ops_alerts_evaluate().cleared == ["error_rate model:m"]
    incident = OpsAlertIncident.objects.get()
    assert incident.cleared_at == T0 + timedelta(minutes=1)
    assert incident.closed_because == "the rule was disabled"
    closed = "[llmhub] closed, not recovered: test error_rate (model:m)"
    assert [subject for _, subject in sent()] == ["[llmhub] firing: test error_rate (model:m)", closed]
    assert webhook.received[1]["text"].startswith(
        "llmhub: closed, not recovered: test error_rate (model:m): the rule was disabled, so nothing watches it now"
    )
    evaluate_at(T0 + timedelta(minutes=2))
    assert len(alert_mail()) == 2 and len(webhook.received) == 2


def test_a_rule_narrowed_to_one_model_closes_the_incident_it_no_longer_watches_once_as_no_recovery(webhook):
    """A rule watching every model, narrowed to one (its model typed in the admin) while another model's incident
    was open, no longer measured that model: the incident read as gone, and once the rule's wait was over it
    cleared as a recovery ("cleared … at worst 100 %") while every request of that model still failed. It is
    closed at the next run, told once as closed, not recovered, saying what the rule watches now; the model
    still watched keeps its incident."""
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2, clear_after_minutes=5)
    for model_name in ("m", "other"):
        for _ in range(2):
            UsageRecordFactory(
                model_name=model_name, status=UsageStatus.UPSTREAM_ERROR, created_at=T0 - timedelta(minutes=1)
            )
    evaluate_at(T0)
    assert OpsAlertIncident.objects.filter(cleared_at__isnull=True).count() == 2

    watched.model_name = "m"
    watched.save(update_fields=["model_name"])
    with time_machine.travel(T0 + timedelta(minutes=1), tick=False):
        assert ops_alerts_evaluate().cleared == ["error_rate model:other"]
    evaluate_at(T0 + timedelta(minutes=2))

    other = OpsAlertIncident.objects.get(subject="model:other")
    assert (other.cleared_at, other.closed_because) == (T0 + timedelta(minutes=1), "the rule now watches model m only")
    assert OpsAlertIncident.objects.get(subject="model:m").cleared_at is None
    closed = "[llmhub] closed, not recovered: test error_rate (model:other)"
    assert [subject for _, subject in sent()].count(closed) == 1 and len(alert_mail()) == 3
    assert webhook.received[-1]["text"].startswith(
        "llmhub: closed, not recovered: test error_rate (model:other): the rule now watches model m only, so "
        "nothing watches it now"
    )
    assert len(webhook.received) == 3


@pytest.mark.parametrize("kind", [OpsAlertKind.ERROR_RATE, OpsAlertKind.LATENCY_P95])
def test_a_model_renamed_during_its_incident_is_one_incident_one_alert_and_one_clear_once_it_recovers(kind, webhook):
    """Incidents were kept by the model's name: an admin renaming a failing model (its catalog name) had the
    next runs open a second incident under the new name, a second "firing" for one outage, and once the old
    name's rows left the window, clear the first as a recovery while the model still failed. The incident follows
    the model (its pk) across the rename: one firing, and one clear once the model is really back."""
    threshold = Decimal("10") if kind == OpsAlertKind.ERROR_RATE else Decimal("1000")
    rule(kind, threshold=threshold, minimum_requests=2, clear_after_minutes=5)
    model = ModelFactory(name="m")

    def failing(name: str, at: datetime) -> None:
        for _ in range(2):
            if kind == OpsAlertKind.ERROR_RATE:
                UsageRecordFactory(model=model, model_name=name, status=UsageStatus.UPSTREAM_ERROR, created_at=at)
            else:
                UsageRecordFactory(model=model, model_name=name, duration_ms=5000, created_at=at)

    failing("m", T0 - timedelta(minutes=1))
    evaluate_at(T0)
    model.name = "m2"  # renamed by an admin during the outage
    model.save(update_fields=["name"])
    failing("m2", T0 + timedelta(minutes=1))
    evaluate_at(T0 + timedelta(minutes=2))  # the rows of either name in the window
    failing("m2", T0 + timedelta(minutes=4))
    evaluate_at(T0 + timedelta(minutes=5))  # the new name's only
    evaluate_at(T0 + timedelta(minutes=10))  # nothing in the window: under since now, for the rule's 5 minutes

    incident = OpsAlertIncident.objects.get()
    assert (incident.subject, incident.renamed_from, incident.cleared_at) == ("model:m2", "model:m", None)
    assert [subject for _, subject in sent()] == [f"[llmhub] firing: test {kind} (model:m)"]

    evaluate_at(T0 + timedelta(minutes=15))
    evaluate_at(T0 + timedelta(minutes=16))
    assert OpsAlertIncident.objects.get().cleared_at == T0 + timedelta(minutes=15)
    assert [subject for _, subject in sent()] == [
        f"[llmhub] firing: test {kind} (model:m)",
        f"[llmhub] cleared: test {kind} (model:m2, model:m when it opened)",
    ]
    assert webhook.received[-1]["text"].startswith(
        f"llmhub: cleared: test {kind} (model:m2, model:m when it opened), after 15\xa0minutes"
    )
    assert len(webhook.received) == 2


def test_a_rule_narrowed_to_a_model_in_the_admin_follows_the_model_across_a_rename(admin_client, webhook):
    """A rule narrowed to one model watched it by name: an admin renaming the failing model in the catalog had
    its incident closed as no longer watched ("the rule now watches model m only"), and the model, failing on,
    watched by that rule no more. The rule follows the model (its pk): one firing, and one clear once it is back,
    and the admin shows the rule watching the model by its name now."""
    model, other = ModelFactory(name="m"), ModelFactory(name="other")
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2, clear_after_minutes=5)
    form = {
        "name": watched.name,
        "enabled": "on",
        "threshold": "10",
        "window_minutes": "5",
        "minimum_requests": "2",
        "minimum_baseline_usd": "1",
        "clear_after_minutes": "5",
        "model_name": "m",
        "email_recipients": "",
        "webhook_url": "",
    }
    assert admin_client.post(f"/admin/billing/opsalertrule/{watched.pk}/change/", form).status_code == 302

    def failing(each: CatalogModel, at: datetime) -> None:
        for _ in range(2):
            UsageRecordFactory(model=each, model_name=each.name, status=UsageStatus.UPSTREAM_ERROR, created_at=at)

    failing(model, T0 - timedelta(minutes=1))
    failing(other, T0 - timedelta(minutes=1))
    evaluate_at(T0)
    model.name = "m2"  # renamed by an admin during the outage
    model.save(update_fields=["name"])
    failing(model, T0 + timedelta(minutes=1))
    evaluate_at(T0 + timedelta(minutes=2))
    failing(model, T0 + timedelta(minutes=4))
    evaluate_at(T0 + timedelta(minutes=5))
    incident = OpsAlertIncident.objects.get()
    assert (incident.subject, incident.closed_because, incident.cleared_at) == ("model:m2", "", None)

    evaluate_at(T0 + timedelta(minutes=10))
    evaluate_at(T0 + timedelta(minutes=15))
    assert OpsAlertIncident.objects.get().cleared_at == T0 + timedelta(minutes=15)
    assert [subject for _, subject in sent()] == [
        "[llmhub] firing: test error_rate (model:m)",
        "[llmhub] cleared: test error_rate (model:m2, model:m when it opened)",
    ]
    assert len(webhook.received) == 2
    page = admin_client.get(f"/admin/billing/opsalertrule/{watched.pk}/change/")
    assert page.context["adminform"].form["model_name"].value() == "m2"
    assert "m2" in admin_client.get("/admin/billing/opsalertrule/").content.decode()


def test_a_rule_whose_model_is_deleted_watches_no_other_model_and_the_admin_says_so(admin_client):
    """Its model deleted, a rule narrowed to it is not widened to every model: it keeps the name the model had, and
    its list and form say no model of the catalog is named so now."""
    model = ModelFactory(name="m")
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2, model=model)
    model.name = "m2"
    model.save(update_fields=["name"])
    model.delete()
    for _ in range(2):
        UsageRecordFactory(model_name="other", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 - timedelta(minutes=1))
    evaluate_at(T0)
    assert not OpsAlertIncident.objects.exists()
    watched.refresh_from_db()
    assert (watched.model_id, watched.model_name) == (None, "m2")
    assert (
        "m2 (no model of the catalog is named so now)"
        in admin_client.get("/admin/billing/opsalertrule/").content.decode()
    )
    page = admin_client.get(f"/admin/billing/opsalertrule/{watched.pk}/change/")
    assert "m2 (no model of the catalog is named so now)" in page.content.decode()


def test_a_rule_given_a_models_name_in_the_shell_is_bound_to_the_model_and_follows_its_rename():
    """A rule created or edited in the shell with only ``model_name`` was bound to no model until saved in the admin
    (or the migration ran), so it watched by that name, and the model renamed was watched by it no more. Saved with
    an empty model and a name a catalog model has, it is bound to that model (as 0045 binds them); one bound to
    another model is bound to the model its new name names, and a name no model has is watched by that name, bound
    to nothing."""
    model, other = ModelFactory(name="m"), ModelFactory(name="other")
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2, model_name="m")
    assert watched.model_id == model.pk
    chosen = OpsAlertRule.objects.create(name="chosen", kind=OpsAlertKind.LATENCY_P95, threshold=1, model=other)
    chosen.model_name = "m"
    chosen.save(update_fields=["model_name"])
    typo = OpsAlertRule.objects.create(name="typo", kind=OpsAlertKind.SPEND_SPIKE, threshold=3, model_name="mm")
    later = OpsAlertRule.objects.create(name="later", kind=OpsAlertKind.SPEND_SPIKE, threshold=3)
    later.model_name = "m"
    later.save(update_fields=["model_name"])
    rows = {pk: model_id for pk, model_id in OpsAlertRule.objects.values_list("pk", "model_id")}
    assert (rows[chosen.pk], rows[typo.pk], rows[later.pk]) == (model.pk, None, model.pk)

    model.name = "m2"  # renamed by an admin: the rule follows it
    model.save(update_fields=["name"])
    for _ in range(2):
        UsageRecordFactory(model=model, model_name="m2", status=UsageStatus.UPSTREAM_ERROR, created_at=T0)
    evaluate_at(T0 + timedelta(seconds=30))
    assert [subject for _, subject in sent()] == ["[llmhub] firing: test error_rate (model:m2)"]


def test_a_bound_rule_given_another_models_name_in_the_shell_watches_that_model():
    """A rule bound to a model kept it when its ``model_name`` was changed in the shell (or any code) and saved: the
    rule watched the old model under its name while ``model_name`` named another, and the model asked for failed
    unseen. A name changed since the rule was read binds it to the model so named (none for a name no model has,
    watched by that name; an empty one: every model), as the admin's form does; a name left as it was keeps the
    model, renamed since or not."""
    model, other = ModelFactory(name="m"), ModelFactory(name="other")
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2, model=other)
    watched = OpsAlertRule.objects.get(pk=watched.pk)
    watched.model_name = "m"
    watched.save(update_fields=["model_name"])
    for each in (model, other):
        for _ in range(2):
            UsageRecordFactory(model=each, model_name=each.name, status=UsageStatus.UPSTREAM_ERROR, created_at=T0)
    evaluate_at(T0 + timedelta(seconds=30))
    assert [subject for _, subject in sent()] == ["[llmhub] firing: test error_rate (model:m)"]

    CatalogModel.objects.filter(pk=model.pk).update(name="m2")  # its copy of the name stale: the model kept
    watched = OpsAlertRule.objects.get(pk=watched.pk)
    watched.threshold = Decimal("20")
    watched.save()
    assert OpsAlertRule.objects.get(pk=watched.pk).model_id == model.pk
    watched.model_name = "typo"
    watched.save()
    assert (watched.model_id, watched.watched_model_name) == (None, "typo")


def test_a_rule_watching_a_name_no_model_had_is_bound_to_the_model_given_that_name_and_follows_its_rename():
    """A rule given a model's name before the model was added to the catalog (or after its model was deleted)
    watches by that name, bound to nothing; the model then added (or another renamed to that name) was watched by
    the name only, and renamed later, by the rule no more. The model given that name binds the rule to it, and a
    rule bound to another model whose name was edited to it (a queryset's ``update()``) too."""
    early = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2, model_name="m")
    other = ModelFactory(name="other")
    chosen = OpsAlertRule.objects.create(name="chosen", kind=OpsAlertKind.LATENCY_P95, threshold=1, model=other)
    OpsAlertRule.objects.filter(pk=chosen.pk).update(model_name="n")
    renamed = OpsAlertRule.objects.create(name="renamed", kind=OpsAlertKind.SPEND_SPIKE, threshold=3, model_name="n")
    assert (early.model_id, renamed.model_id) == (None, None)
    model = ModelFactory(name="m")
    spare = ModelFactory(name="spare")
    spare.name = "n"
    spare.save(update_fields=["name"])
    rows = dict(OpsAlertRule.objects.values_list("pk", "model_id"))
    assert (rows[early.pk], rows[chosen.pk], rows[renamed.pk]) == (model.pk, spare.pk, spare.pk)

    model.name = "m2"
    model.save(update_fields=["name"])
    for _ in range(2):
        UsageRecordFactory(model=model, model_name="m2", status=UsageStatus.UPSTREAM_ERROR, created_at=T0)
    evaluate_at(T0 + timedelta(seconds=30))
    assert [subject for _, subject in sent()] == ["[llmhub] firing: test error_rate (model:m2)"]


def test_a_rule_watching_a_name_a_model_is_given_through_update_follows_that_model_across_its_next_rename(webhook):
    """A rule watching a name no model had was bound to the model given that name only by the model's ``post_save``:
    a rename through a queryset's ``update()`` (a script, a bulk fix) sends none, so the rule watched the name
    alone, and the model renamed again was watched by it no more, failing unseen. The evaluator binds such a rule
    to the model named so when it runs, whatever renamed it: the model fires and clears under its next name."""
    assert rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2, model_name="n").model is None
    model = ModelFactory(name="spare")
    CatalogModel.objects.filter(pk=model.pk).update(name="n")  # no signal
    evaluate_at(T0 - timedelta(minutes=10))
    CatalogModel.objects.filter(pk=model.pk).update(name="n2")
    for _ in range(2):
        UsageRecordFactory(model=model, model_name="n2", status=UsageStatus.UPSTREAM_ERROR, created_at=T0)
    evaluate_at(T0 + timedelta(seconds=30))
    for _ in range(2):
        UsageRecordFactory(model=model, model_name="n2", created_at=T0 + timedelta(minutes=6))
    evaluate_at(T0 + timedelta(minutes=7))
    assert [subject for _, subject in sent()] == [
        "[llmhub] firing: test error_rate (model:n2)",
        "[llmhub] cleared: test error_rate (model:n2)",
    ]
    assert len(ops_hooks(webhook)) == 2


def test_a_bound_rule_whose_name_is_changed_through_update_watches_the_model_its_name_names(webhook):
    """A rule bound to a model kept it when its ``model_name`` was changed through a queryset's ``update()`` (a
    script, a bulk fix: no ``save`` sees it), so it watched its old model while its name said another, and the model
    its name said failed unseen. The evaluator binds it to the model its name names at its next run, whatever edited
    the name: the old model's incident is closed as no longer watched, the new one fires; a name no model has is
    watched by that name, and a rename of the bound model (its copy of the name stale) keeps the model."""
    model, other = ModelFactory(name="m"), ModelFactory(name="other")
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2, model_name="other")
    assert watched.model_id == other.pk
    for _ in range(2):
        UsageRecordFactory(model=other, model_name="other", status=UsageStatus.UPSTREAM_ERROR, created_at=T0)
    evaluate_at(T0 + timedelta(seconds=30))
    assert [subject for _, subject in sent()] == ["[llmhub] firing: test error_rate (model:other)"]

    OpsAlertRule.objects.filter(pk=watched.pk).update(model_name="m")  # no signal, no save
    for _ in range(2):
        UsageRecordFactory(model=model, model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0)
    evaluate_at(T0 + timedelta(minutes=1))
    assert OpsAlertRule.objects.get(pk=watched.pk).model_id == model.pk
    assert [subject for _, subject in sent()] == [
        "[llmhub] firing: test error_rate (model:other)",
        "[llmhub] closed, not recovered: test error_rate (model:other)",
        "[llmhub] firing: test error_rate (model:m)",
    ]
    assert ops_hooks(webhook)[1]["text"].startswith(
        "llmhub: closed, not recovered: test error_rate (model:other): the rule now watches model m only"
    )

    CatalogModel.objects.filter(pk=model.pk).update(name="m2")  # the rule's copy "m" stale: the model kept
    evaluate_at(T0 + timedelta(minutes=2))
    assert OpsAlertRule.objects.get(pk=watched.pk).model_id == model.pk
    OpsAlertRule.objects.filter(pk=watched.pk).update(model_name="typo")
    evaluate_at(T0 + timedelta(minutes=3))
    assert (OpsAlertRule.objects.get(pk=watched.pk).model_id, len(sent())) == (None, 4)
    assert OpsAlertIncident.objects.filter(cleared_at__isnull=True).count() == 0


def test_the_migration_binds_each_rule_to_the_model_its_name_names_and_back():
    """0045 gives each rule narrowed by name the catalog model so named (its pk, followed across renames from
    then on); one naming no model keeps its name. Reversed, each rule's name is its model's name now."""
    migration = importlib.import_module("billing.migrations.0045_alerts_rename_rule_follows_model")
    model = ModelFactory(name="m")
    named = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), model_name="m")
    unknown = rule(OpsAlertKind.LATENCY_P95, threshold=Decimal("1000"), model_name="typo")
    every = rule(OpsAlertKind.SPEND_SPIKE, threshold=Decimal("3"))
    migration.rules_model(django_apps, None)
    rows = dict(OpsAlertRule.objects.values_list("pk", "model_id"))
    assert (rows[named.pk], rows[unknown.pk], rows[every.pk]) == (model.pk, None, None)

    CatalogModel.objects.filter(pk=model.pk).update(name="m2")  # renamed with no signal: the pk followed
    migration.rules_model_name(django_apps, None)
    names = dict(OpsAlertRule.objects.values_list("pk", "model_name"))
    assert (names[named.pk], names[unknown.pk], names[every.pk]) == ("m2", "typo", "")


@pytest.mark.parametrize("kind", [OpsAlertKind.ERROR_RATE, OpsAlertKind.LATENCY_P95])
@pytest.mark.parametrize("how", ["shell", "bulk"])
def test_a_model_deleted_during_its_incident_has_it_closed_once_as_no_recovery(kind, how, webhook):
    """A model deleted (its admin page, the bulk action, the shell) while its error-rate or latency incident was
    open left its rows in the window, then none: the incident cleared as a recovery, "cleared … at worst 100 %",
    the model back when it was gone. It is closed at the deletion, told once as closed, not recovered ("the model
    was deleted"), and the rows it left in the window open no second incident."""
    threshold = Decimal("10") if kind == OpsAlertKind.ERROR_RATE else Decimal("1000")
    rule(kind, threshold=threshold, minimum_requests=2, clear_after_minutes=5)
    model, other = ModelFactory(name="m"), ModelFactory(name="other")
    for each in (model, other):
        for _ in range(2):
            if kind == OpsAlertKind.ERROR_RATE:
                failed = {"status": UsageStatus.UPSTREAM_ERROR}
            else:
                failed = {"duration_ms": 5000}
            UsageRecordFactory(model=each, model_name=each.name, created_at=T0 - timedelta(minutes=1), **failed)
    evaluate_at(T0)
    assert OpsAlertIncident.objects.filter(cleared_at__isnull=True).count() == 2

    with time_machine.travel(T0 + timedelta(seconds=30), tick=False):
        if how == "shell":
            model.delete()
        else:
            CatalogModel.objects.filter(pk=model.pk).delete()
    for minute in (1, 2, 10, 20):  # its rows in the window, then out of it, past the rule's wait
        evaluate_at(T0 + timedelta(minutes=minute))

    incident = OpsAlertIncident.objects.get(subject="model:m")
    assert (incident.cleared_at, incident.closed_because) == (T0 + timedelta(seconds=30), "the model was deleted")
    assert OpsAlertIncident.objects.get(subject="model:other").cleared_at == T0 + timedelta(minutes=20)  # recovered
    subjects = [subject for _, subject in sent()]
    assert subjects.count(f"[llmhub] firing: test {kind} (model:m)") == 1
    assert subjects.count(f"[llmhub] closed, not recovered: test {kind} (model:m)") == 1
    assert f"[llmhub] cleared: test {kind} (model:m)" not in subjects
    closed = [hook["text"] for hook in webhook.received if "of model m is" in hook["text"]]
    assert len(closed) == 2
    assert closed[-1].startswith(
        f"llmhub: closed, not recovered: test {kind} (model:m): the model was deleted, so nothing watches it now"
    )


def test_an_evaluation_that_read_a_rule_before_it_was_disabled_opens_nothing_after():
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2)
    for _ in range(2):
        UsageRecordFactory(model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 - timedelta(minutes=1))
    from billing.services.ops_alerts import error_rate_measures, ops_incident_open

    (measure,) = error_rate_measures(watched, T0).values()
    OpsAlertRule.objects.filter(pk=watched.pk).update(enabled=False)
    assert ops_incident_open(rule=watched, subject="model:m", measure=measure, now=T0) is None
    assert not OpsAlertIncident.objects.exists() and alert_mail() == []


@pytest.mark.parametrize(
    ("change", "because"),
    [
        ({"enabled": False}, "the deployment was disabled by an admin"),
        ({"breaker_override": "open"}, "its breaker was forced open by an admin"),
        ({"model_enabled": False}, "its model was disabled by an admin"),
        ({"provider_enabled": False}, "its provider was disabled by an admin"),
    ],
)
def test_a_deployment_taken_out_of_service_closes_its_breaker_incident_once_as_no_recovery(
    webhook, settings, change, because
):
    """No request reaches a deployment an admin disabled or forced open, or whose model or provider an admin
    disabled (routing leaves those out): its breaker incident used to stay open for good (the evaluator leaves
    such deployments alone; until 6 December it did not even look at the provider). It is closed, and told as
    taken out of service by an admin, not as back up."""
    settings.REDIS_URL = ""
    deployment = watched_deployment()
    Incident.objects.create(deployment=deployment, started_at=T0, reason=BREAKER_REASON)
    if change.pop("model_enabled", True) is False:
        CatalogModel.objects.filter(pk=deployment.model_id).update(enabled=False)
    if change.pop("provider_enabled", True) is False:
        Provider.objects.filter(pk=deployment.provider_id).update(enabled=False)
    Deployment.objects.filter(pk=deployment.pk).update(**change)
    evaluate_at(T0 + timedelta(minutes=10))
    evaluate_at(T0 + timedelta(minutes=11))
    incident = Incident.objects.get()
    assert incident.ended_at == T0 + timedelta(minutes=10) and incident.ended_because == because
    assert [message.subject for message in alert_mail()] == [
        f"[llmhub] deployment {deployment.name} of model watched is no longer watched (not a recovery)"
    ]
    (hook,) = webhook.received
    assert f"its incident is closed, not recovered: {because}, after 10" in hook["text"]
    assert "back up" not in hook["text"]


def test_a_failing_provider_disabled_by_an_admin_closes_its_deployments_incident_once_and_opens_none_again(
    settings,
):
    """The operator's answer to a provider failing (its breaker open, its deployment's incident open): disable the
    provider. Routing then leaves its deployments out, but the evaluator still followed their breakers: the
    incident stayed open for good, its page never resolved (and, closed, the breaker still open would have opened
    it again a minute later). It is closed once, as no recovery, and none is opened while the provider is off."""
    settings.REDIS_URL = ""
    settings.LLMHUB_BREAKER_FAILURES = 3
    deployment = watched_deployment()
    requests_at(deployment, T0, UsageStatus.UPSTREAM_ERROR)
    evaluate_at(T0 + timedelta(minutes=1))
    assert Incident.objects.get().ended_at is None and breaker_state(deployment.pk).state != CLOSED

    Provider.objects.filter(pk=deployment.provider_id).update(enabled=False)
    for minute in (2, 3, 4):
        evaluate_at(T0 + timedelta(minutes=minute))

    incident = Incident.objects.get()
    assert (incident.ended_at, incident.ended_because) == (
        T0 + timedelta(minutes=2),
        "its provider was disabled by an admin",
    )
    down = f"[llmhub] deployment {deployment.name} of model watched is down"
    assert [message.subject for message in alert_mail()] == [
        down,
        down.replace("is down", "is no longer watched (not a recovery)"),
    ]


def test_a_deployment_whose_breaker_an_admin_forced_closed_has_its_incident_closed_once_its_requests_succeed(
    settings,
):
    """Forced closed, the deployment is always a candidate: requests reach it, and they say whether it is back. The
    evaluator left every deployment with a ``breaker_override`` alone, and closes only the incidents of those
    taken out of service (forced open, disabled), so the breaker incident of one forced closed stayed open for good
    (a free health check passing leaves it open too), a page that never resolved. It now closes, as back up, once
    the latest request judged since it began succeeded; while they still fail it stays open."""
    settings.REDIS_URL = ""
    settings.LLMHUB_BREAKER_FAILURES = 3
    deployment = watched_deployment()

    requests_at(deployment, T0, UsageStatus.UPSTREAM_ERROR)
    evaluate_at(T0 + timedelta(minutes=1))
    assert Incident.objects.get().ended_at is None

    Deployment.objects.filter(pk=deployment.pk).update(breaker_override="closed")  # the admin sends traffic anyway
    requests_at(deployment, T0 + timedelta(minutes=2), UsageStatus.UPSTREAM_ERROR)
    evaluate_at(T0 + timedelta(minutes=3))
    assert Incident.objects.get().ended_at is None  # still failing: still down

    requests_at(deployment, T0 + timedelta(minutes=4), UsageStatus.OK)
    evaluate_at(T0 + timedelta(minutes=5))
    evaluate_at(T0 + timedelta(minutes=6))

    incident = Incident.objects.get()
    assert (incident.ended_at, incident.ended_because) == (T0 + timedelta(minutes=5), "")
    down = f"[llmhub] deployment {deployment.name} of model watched is down"
    assert [message.subject for message in alert_mail()] == [down, down.replace("is down", "is back up")]


def test_disabling_the_deployment_down_rule_closes_the_incidents_it_opened(admin_client, admin_user, settings):
    settings.REDIS_URL = ""
    watched = rule(OpsAlertKind.DEPLOYMENT_DOWN)
    deployment = ModelFactory(name="watched").deployments.get()
    Incident.objects.create(deployment=deployment, started_at=T0, reason=BREAKER_REASON)
    other = ModelFactory(name="other").deployments.get()
    Incident.objects.create(deployment=other, started_at=T0, reason="the model list failed")  # health checks'
    _rule_disable_in_admin(admin_client, watched, "list")
    assert Incident.objects.get(deployment=deployment).ended_because == (
        f"the rule was disabled by {admin_user.username}"
    )
    assert Incident.objects.get(deployment=other).ended_at is None
    assert [message.subject for message in alert_mail()] == [
        f"[llmhub] deployment {deployment.name} of model watched is no longer watched (not a recovery)"
    ]


def test_the_deployment_down_rule_disabled_outside_the_admin_has_its_breaker_incidents_closed_by_the_evaluator(
    settings,
):
    """Only once no deployment-down rule is enabled: another one still enabled keeps following the breakers."""
    settings.REDIS_URL = ""
    watched = rule(OpsAlertKind.DEPLOYMENT_DOWN)
    OpsAlertRule.objects.create(name="second", kind=OpsAlertKind.DEPLOYMENT_DOWN, enabled=False)
    deployment = ModelFactory(name="watched").deployments.get()
    Incident.objects.create(deployment=deployment, started_at=T0, reason=BREAKER_REASON)
    other = ModelFactory(name="other").deployments.get()
    Incident.objects.create(deployment=other, started_at=T0, reason="the model list failed")  # health checks'
    evaluate_at(T0 + timedelta(minutes=1))  # its breaker closed but no request answered since: still down
    assert Incident.objects.get(deployment=deployment).ended_at is None and alert_mail() == []
    OpsAlertRule.objects.filter(pk=watched.pk).update(enabled=False)
    evaluate_at(T0 + timedelta(minutes=2))
    assert Incident.objects.get(deployment=deployment).ended_because == "the rule was disabled"
    assert Incident.objects.get(deployment=other).ended_at is None
    assert [message.subject for message in alert_mail()] == [
        f"[llmhub] deployment {deployment.name} of model watched is no longer watched (not a recovery)"
    ]


@pytest.mark.parametrize("how", ["disabled in the admin", "deleted in the admin", "deleted in the shell"])
def test_a_deployment_down_rule_disabled_or_deleted_while_another_is_enabled_leaves_the_outage_one_incident(
    admin_client, settings, how
):
    """With two deployment-down rules enabled, disabling or deleting one closed the deployments' breaker incidents
    as no longer watched ("the rule was disabled by alice"), though the other still watched them: a minute later
    the breaker, still open, opened the incident again, and on-call got "no longer watched" then "down" again for
    one outage. Another enabled one keeps them open and told nothing; the last one still closes them (above)."""
    settings.REDIS_URL = ""
    settings.LLMHUB_BREAKER_FAILURES = 3
    deployment = watched_deployment()
    first = OpsAlertRule.objects.get(kind=OpsAlertKind.DEPLOYMENT_DOWN)
    OpsAlertRule.objects.create(name="second", kind=OpsAlertKind.DEPLOYMENT_DOWN)
    requests_at(deployment, T0, UsageStatus.UPSTREAM_ERROR)
    evaluate_at(T0 + timedelta(minutes=1))
    assert Incident.objects.get().ended_at is None

    with time_machine.travel(T0 + timedelta(minutes=2), tick=False):
        if how == "disabled in the admin":
            _rule_disable_in_admin(admin_client, first, "list")
        elif how == "deleted in the admin":
            response = admin_client.post(f"/admin/billing/opsalertrule/{first.pk}/delete/", {"post": "yes"})
            assert response.status_code == 302
        else:
            first.delete()
    for minutes in (3, 4):
        evaluate_at(T0 + timedelta(minutes=minutes))

    assert Incident.objects.get().ended_at is None
    assert [message.subject for message in alert_mail()] == [
        f"[llmhub] deployment {deployment.name} of model watched is down"
    ]


# Damping: a value hovering around the threshold -------------------------------------------------------------


def test_an_incident_clears_only_once_the_measure_stayed_under_the_threshold_for_the_rules_clear_after():
    """A rate swinging 9 % / 11 % around a 10 % threshold opened and cleared every minute, a page each time. An
    open incident now clears once the measure has read at or under the threshold for ``clear_after_minutes``,
    over evaluator runs; a reading above starts the wait over. Opening is unchanged."""
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2, clear_after_minutes=5)
    for _ in range(2):
        UsageRecordFactory(model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 - timedelta(minutes=1))
    evaluate_at(T0)  # 100 %: opened
    for _ in range(30):
        UsageRecordFactory(model_name="m", created_at=T0 + timedelta(minutes=1))
    evaluate_at(T0 + timedelta(minutes=2))  # 2 of 32: 6.3 %, under
    assert OpsAlertIncident.objects.get().under_since == T0 + timedelta(minutes=2)
    for _ in range(3):
        UsageRecordFactory(
            model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 + timedelta(minutes=2, seconds=30)
        )
    evaluate_at(T0 + timedelta(minutes=3))  # 5 of 35: 14.3 %, above again: the wait starts over
    assert OpsAlertIncident.objects.get().under_since is None
    evaluate_at(T0 + timedelta(minutes=4))  # the first two out of the window: 3 of 33, 9.1 %
    evaluate_at(T0 + timedelta(minutes=8))  # no request left in the window: under too, 4 minutes so far
    incident = OpsAlertIncident.objects.get()
    assert (incident.cleared_at, incident.under_since) == (None, T0 + timedelta(minutes=4))
    assert [subject for _, subject in sent()] == ["[llmhub] firing: test error_rate (model:m)"]

    evaluate_at(T0 + timedelta(minutes=9))  # 5 minutes at or under: cleared, once
    evaluate_at(T0 + timedelta(minutes=10))
    assert OpsAlertIncident.objects.get().cleared_at == T0 + timedelta(minutes=9)
    assert [subject for _, subject in sent()] == [
        "[llmhub] firing: test error_rate (model:m)",
        "[llmhub] cleared: test error_rate (model:m)",
    ]
    assert watched.clear_after_minutes == 5 == OpsAlertRule._meta.get_field("clear_after_minutes").default


def test_the_wait_before_clearing_is_set_in_the_admin_and_cannot_be_negative(admin_client):
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"))
    form = {
        "name": watched.name,
        "enabled": "on",
        "threshold": "10",
        "window_minutes": "5",
        "minimum_requests": "20",
        "minimum_baseline_usd": "1",
        "model_name": "",
        "email_recipients": "",
        "webhook_url": "",
    }
    page = admin_client.get(f"/admin/billing/opsalertrule/{watched.pk}/change/")
    assert "clear_after_minutes" in page.context["adminform"].form.fields
    response = admin_client.post(
        f"/admin/billing/opsalertrule/{watched.pk}/change/", {**form, "clear_after_minutes": "-1"}
    )
    assert response.status_code == 200 and "clear_after_minutes" in response.context["adminform"].form.errors
    response = admin_client.post(
        f"/admin/billing/opsalertrule/{watched.pk}/change/", {**form, "clear_after_minutes": "10"}
    )
    assert response.status_code == 302
    assert OpsAlertRule.objects.get(pk=watched.pk).clear_after_minutes == 10


@pytest.fixture
def firing_on_its_own_channels(webhook, settings) -> OpsAlertRule:
    """An error-rate rule with its own recipients and webhook (the gateway's webhook unset), whose incident for
    model m opened at ``T0``, told once: what a deleted rule's incident is closed from."""
    settings.LLMHUB_ALERT_WEBHOOK_URL = ""  # the rule's own webhook only
    watched = rule(
        OpsAlertKind.ERROR_RATE,
        threshold=Decimal("10"),
        minimum_requests=2,
        email_recipients="oncall@example.com",
        webhook_url=webhook.url,
    )
    for _ in range(2):
        UsageRecordFactory(model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 - timedelta(minutes=1))
    evaluate_at(T0)
    return watched


def told_closed_once(webhook, because: str) -> None:
    """The firing and the closing of ``firing_on_its_own_channels``'s incident, each told once on the rule's own
    channels, the closing as closed, not recovered, ``because``."""
    assert sent() == [
        (["oncall@example.com"], "[llmhub] firing: test error_rate (model:m)"),
        (["oncall@example.com"], "[llmhub] closed, not recovered: test error_rate (model:m)"),
    ]
    assert len(webhook.received) == 2
    assert webhook.received[1]["text"].startswith(
        f"llmhub: closed, not recovered: test error_rate (model:m): {because}"
    )


@pytest.mark.parametrize("how", ["delete page", "bulk action"])
def test_deleting_a_rule_closes_its_open_incident_once_to_its_own_recipients_saying_who(
    admin_client, admin_user, webhook, firing_on_its_own_channels, how
):
    """Deleting a rule deleted its incidents with it, silently: on-call kept a page that never resolved. The
    open incident is closed and told once, to the rule's own recipients and webhook, as closed because the rule
    was deleted; the incident stays listed, its rule gone (and the webhook it kept for that notice unshown)."""
    watched = firing_on_its_own_channels
    with time_machine.travel(T0 + timedelta(minutes=2), tick=False):
        if how == "delete page":
            response = admin_client.post(f"/admin/billing/opsalertrule/{watched.pk}/delete/", {"post": "yes"})
        else:
            response = admin_client.post(
                "/admin/billing/opsalertrule/",
                {"action": "delete_selected", "_selected_action": [watched.pk], "post": "yes"},
            )
    assert response.status_code == 302
    assert not OpsAlertRule.objects.exists()
    incident = OpsAlertIncident.objects.get()
    assert (incident.rule, incident.cleared_at) == (None, T0 + timedelta(minutes=2))
    assert incident.closed_because == f"the rule was deleted by {admin_user.username}"
    told_closed_once(webhook, f"the rule was deleted by {admin_user.username}")
    evaluate_at(T0 + timedelta(minutes=3))
    with time_machine.travel(T0 + timedelta(minutes=10), tick=False):
        alerts_undelivered_send()
    assert len(alert_mail()) == 2 and len(webhook.received) == 2
    # At the test's own clock: the delete saved the admin's session (its message) at T0, and a session expires
    # two weeks after it was saved, so read on the real date from T0 + 2 weeks the pages were the login's.
    with time_machine.travel(T0 + timedelta(minutes=10), tick=False):
        for page in ("/admin/billing/opsalertincident/", f"/admin/billing/opsalertincident/{incident.pk}/change/"):
            response = admin_client.get(page)
            assert response.status_code == 200 and "secret-path" not in response.content.decode(), page


@pytest.mark.parametrize("how", ["shell", "queryset"])
def test_a_rule_deleted_outside_the_admin_has_its_open_incident_closed_once_where_its_alerts_went(
    webhook, firing_on_its_own_channels, how
):
    """A rule deleted outside the admin (``rule.delete()`` in the shell, a queryset's ``delete()``, a script) left
    its open incident open for good, its rule gone: nothing evaluates it, nothing told on-call, and the admin listed
    a page that never resolves. It is closed at the deletion, told once to the rule's own recipients and webhook as
    closed, not recovered ("the rule was deleted"), as the admin's delete does (naming no one)."""
    watched = firing_on_its_own_channels
    with time_machine.travel(T0 + timedelta(minutes=2), tick=False):
        if how == "shell":
            OpsAlertRule.objects.get(pk=watched.pk).delete()
        else:
            OpsAlertRule.objects.filter(pk=watched.pk).delete()
    for minutes in (3, 10):
        evaluate_at(T0 + timedelta(minutes=minutes))
    with time_machine.travel(T0 + timedelta(minutes=10), tick=False):
        alerts_undelivered_send()

    incident = OpsAlertIncident.objects.get()
    assert (incident.rule, incident.cleared_at) == (None, T0 + timedelta(minutes=2))
    assert (incident.closed_because, incident.rule_name) == ("the rule was deleted", "test error_rate")
    told_closed_once(webhook, "the rule was deleted, so nothing watches it now")


def test_a_deleted_rules_incidents_undelivered_alerts_still_go_where_the_rules_went(admin_client, webhook, settings):
    """The webhook was down when the incident opened and when its rule was deleted: an admin's "send again"
    later sends both, to the rule's own webhook, though the rule is gone."""
    settings.LLMHUB_ALERT_WEBHOOK_URL = ""
    watched = rule(OpsAlertKind.ERROR_RATE, threshold=Decimal("10"), minimum_requests=2, webhook_url=webhook.url)
    for _ in range(2):
        UsageRecordFactory(model_name="m", status=UsageStatus.UPSTREAM_ERROR, created_at=T0 - timedelta(minutes=1))
    webhook.fail_next = 1000
    evaluate_at(T0)
    admin_client.post(f"/admin/billing/opsalertrule/{watched.pk}/delete/", {"post": "yes"})
    incident = OpsAlertIncident.objects.get()
    assert incident.rule is None and incident.delivered == ["open:email", "clear:email"]

    webhook.fail_next = 0
    response = admin_client.post(
        "/admin/billing/opsalertincident/", {"action": "send_again", "_selected_action": [incident.pk]}, follow=True
    )
    assert response.status_code == 200
    assert [entry["text"][:40] for entry in webhook.received] == [
        "llmhub: test error_rate: error rate of m",
        "llmhub: closed, not recovered: test erro",
    ]
