"""Alerts are never lost to a broker that is down (docs/alerts.md, "Delivery"): raising one commits its row and
never fails the caller; the sweep (``alerts_undelivered_send``) queues what no task delivered, after a grace
period and within a cut-off, and a delivery is claimed on the row before it is sent, so the normal path, the
sweep and concurrent runs of either send each alert once. Real email (Django's test outbox), a real webhook
server, a broker on a port nothing listens on."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from asgiref.sync import sync_to_async
from celery._state import _set_task_join_will_block
from django.core import mail
from django.db import connection

from billing.models import BudgetAlert, BudgetPeriod, OpsAlertKind, OpsAlertRule, UsageRecord
from billing.services.admission import admission_acquire
from billing.services.alerts import Crossing, budget_alerts_raise
from billing.services.budgets import CounterRef, CounterSpec, api_key_limits_set
from billing.services.keys import api_key_create
from billing.services.ledger import ledger_flush, usage_record_submit
from billing.services.ledger_rows import UsageData
from billing.services.ops_alerts import Measure, ops_incident_clear, ops_incident_open
from billing.services.plans import plan_assign
from billing.tasks import alerts_undelivered_send, budget_alert_email, budget_alert_webhook
from core.outbox import delivery_claim
from providers.models import Incident
from providers.selectors import resolved_model
from providers.services.incidents import incident_close, incident_open
from tests.billing.conftest import FLAT_TOKEN
from tests.factories import ModelFactory, UserFactory
from tests.trickling import TricklingMailServer, TricklingWebhook

pytestmark = pytest.mark.django_db(transaction=True)

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
GRACE = timedelta(seconds=120)  # LLMHUB_ALERT_SWEEP_GRACE_SECONDS's default


@pytest.fixture(autouse=True)
def _eager_joins_allowed_after():
    """Celery's eager ``delay`` sets a process-wide "a join would block" flag and puts back the value it found:
    two threads doing it at once can leave it set, and every later ``.get()`` in this process refuses."""
    yield
    _set_task_join_will_block(False)


@pytest.fixture
def account(plans, catalog, settings):
    """Alice's key has a $0.01 monthly budget (100 tokens of the flat model); counters in the database."""
    settings.REDIS_URL = ""
    user = UserFactory(username="alice", email="alice@example.com")
    plan_assign(user=user, plan=plans["Enterprise"])
    api_key = api_key_create(user=user, name="ci").api_key
    api_key_limits_set(api_key=api_key, budget_usd=100 * FLAT_TOKEN, budget_period=BudgetPeriod.MONTHLY)
    return {"user": user, "key": api_key, "flat": resolved_model(catalog["flat"])}


def alerts() -> list[tuple[int, list[str]]]:
    return list(BudgetAlert.objects.order_by("threshold").values_list("threshold", "channels"))


def sweep() -> int:
    return alerts_undelivered_send()


def crossing(user, threshold: int) -> Crossing:
    ref = CounterRef("user", user.pk, "cost", BudgetPeriod.MONTHLY, datetime(2026, 12, 1, tzinfo=UTC))
    return Crossing(CounterSpec(ref, Decimal("10"), "the monthly budget"), threshold, Decimal("5"))


async def test_a_settlement_while_the_broker_is_down_succeeds_and_the_sweep_delivers_its_alerts_once(
    account, webhook, broker, caplog
):
    with time_machine.travel(T0, tick=False) as clock:
        broker.down()
        admission = await admission_acquire(
            user_id=account["user"].pk,
            api_key_id=account["key"].pk,
            key_allowed_model_ids=None,
            model=account["flat"],
            body={"model": "flat-model", "messages": [], "max_tokens": 90},
            request_id="req_broker_down",
            prompt_tokens_upper=0,
        )
        with caplog.at_level(logging.WARNING):
            # Through the ledger's writer, as a request settles: 90 % crosses 50 % and 80 % at once.
            usage_record_submit(
                UsageData(
                    request_id="req_broker_down",
                    endpoint="rest",
                    stream=False,
                    status="ok",
                    user_id=account["user"].pk,
                    api_key_id=account["key"].pk,
                    model_name="flat-model",
                    completion_tokens=90,
                    cost=90 * FLAT_TOKEN,
                ),
                admission=admission,
            )
            await ledger_flush()
        assert await UsageRecord.objects.filter(request_id="req_broker_down").aexists()
        # Both crossings recorded (the first one's failed queueing used to stop the second), nothing sent,
        # and no error logged: the settlement did not fail.
        assert await sync_to_async(alerts)() == [(50, []), (80, [])]
        assert mail.outbox == [] and webhook.received == []
        assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
        assert "could not be queued" in caplog.text

        broker.up()
        assert await sync_to_async(sweep)() == 0  # still in the grace period
        clock.shift(GRACE + timedelta(seconds=1))
        assert await sync_to_async(sweep)() == 4
        assert sorted(message.subject[-9:] for message in mail.outbox) == ["is at 50%", "is at 80%"]
        assert len(webhook.received) == 2
        assert await sync_to_async(alerts)() == [(50, ["email", "webhook"]), (80, ["email", "webhook"])]

        clock.shift(timedelta(hours=1))
        assert await sync_to_async(sweep)() == 0
        assert len(mail.outbox) == 2 and len(webhook.received) == 2


def test_incidents_opened_and_cleared_while_the_broker_is_down_are_delivered_once_by_the_sweep(
    webhook, broker, settings
):
    settings.ADMINS = [("Ops", "ops@example.com")]
    deployment = ModelFactory(name="gpt-4o-mini").deployments.get()
    rule = OpsAlertRule.objects.create(name="test error rate", kind=OpsAlertKind.ERROR_RATE)
    measure = Measure(Decimal(50), True, "error rate of model gpt-4o-mini is 50 %")
    with time_machine.travel(T0, tick=False) as clock:
        broker.down()
        assert incident_open(deployment_id=deployment.pk, reason="503 from upstream", at=T0) is not None
        ops = ops_incident_open(rule=rule, subject="model:gpt-4o-mini", measure=measure, now=T0)
        clock.shift(timedelta(minutes=1))
        assert incident_close(deployment_id=deployment.pk, at=T0 + timedelta(minutes=1)) is not None
        assert ops_incident_clear(incident=ops, measure=None, now=T0 + timedelta(minutes=1)) is not None
        assert mail.outbox == [] and webhook.received == []

        broker.up()
        clock.shift(GRACE - timedelta(seconds=30))  # the openings are past the grace period, the clearings not yet
        assert sweep() == 4
        clock.shift(timedelta(minutes=1))
        assert sweep() == 4
        clock.shift(timedelta(minutes=10))
        assert sweep() == 0

    assert sorted(message.subject for message in mail.outbox) == [
        "[llmhub] cleared: test error rate (model:gpt-4o-mini)",
        f"[llmhub] deployment {deployment.name} of model gpt-4o-mini is back up",
        f"[llmhub] deployment {deployment.name} of model gpt-4o-mini is down",
        "[llmhub] firing: test error rate (model:gpt-4o-mini)",
    ]
    assert len(webhook.received) == 4
    assert Incident.objects.get().delivered == ["down:email", "down:webhook", "recovered:email", "recovered:webhook"]
    ops.refresh_from_db()
    assert ops.delivered == ["open:email", "open:webhook", "clear:email", "clear:webhook"]


def test_a_webhook_set_up_after_alerts_were_raised_is_not_sent_them_by_the_sweep(webhook, settings):
    """Alerts raised while no webhook was set (a budget alert, a deployment incident, an operations incident, each
    opened and cleared) had their webhook delivery left with no entry, as one the broker refused: once an operator
    set LLMHUB_ALERT_WEBHOOK_URL, the sweep posted every alert of the last day to it at once, cleared incidents
    included. Raised without a webhook, that delivery has nobody to go to, as an email without an address."""
    settings.ADMINS = [("Ops", "ops@example.com")]
    settings.LLMHUB_ALERT_WEBHOOK_URL = ""
    user = UserFactory(username="erin", email="erin@example.com")
    deployment = ModelFactory(name="gpt-4o-mini").deployments.get()
    rule = OpsAlertRule.objects.create(name="test error rate", kind=OpsAlertKind.ERROR_RATE)
    measure = Measure(Decimal(50), True, "error rate of model gpt-4o-mini is 50 %")
    with time_machine.travel(T0, tick=False) as clock:
        budget_alerts_raise(crossings=[crossing(user, 50)], user_id=user.pk)
        incident_open(deployment_id=deployment.pk, reason="503 from upstream", at=T0)
        ops = ops_incident_open(rule=rule, subject="model:gpt-4o-mini", measure=measure, now=T0)
        clock.shift(timedelta(minutes=1))
        incident_close(deployment_id=deployment.pk, at=T0 + timedelta(minutes=1))
        ops_incident_clear(incident=ops, measure=None, now=T0 + timedelta(minutes=1))
        assert len(mail.outbox) == 5

        settings.LLMHUB_ALERT_WEBHOOK_URL = webhook.url  # the operator sets one up, the next hour
        for _ in range(3):
            clock.shift(timedelta(minutes=20))
            assert sweep() == 0
        budget_alerts_raise(crossings=[crossing(user, 80)], user_id=user.pk)  # raised since then: posted
    assert len(mail.outbox) == 6 and len(webhook.received) == 1
    assert alerts() == [(50, ["email"]), (80, ["email", "webhook"])]


def test_the_sweep_sends_nothing_the_normal_path_delivered(webhook):
    user = UserFactory(username="bob", email="bob@example.com")
    with time_machine.travel(T0, tick=False) as clock:
        webhook.fail_next = 2  # retried by its task: delivered, late
        budget_alerts_raise(crossings=[crossing(user, 50)], user_id=user.pk)
        assert len(mail.outbox) == 1 and len(webhook.received) == 1
        for _ in range(3):
            clock.shift(timedelta(minutes=20))
            assert sweep() == 0
    assert len(mail.outbox) == 1 and len(webhook.received) == 1
    assert alerts() == [(50, ["email", "webhook"])]


def test_the_sweep_leaves_alerts_in_their_grace_period_and_past_the_cut_off(webhook, broker):
    user = UserFactory(username="carol", email="carol@example.com")
    with time_machine.travel(T0, tick=False) as clock:
        broker.down()
        budget_alerts_raise(crossings=[crossing(user, 50)], user_id=user.pk)
        clock.shift(timedelta(hours=24))
        budget_alerts_raise(crossings=[crossing(user, 80)], user_id=user.pk)
        broker.up()

        clock.shift(GRACE - timedelta(seconds=1))
        assert sweep() == 0  # the 80 % alert is in its grace period; the 50 % one too old
        clock.shift(timedelta(minutes=2))
        assert sweep() == 2  # the 80 % alert's email and webhook; the 50 % one is past 24 hours
    assert [message.subject[-9:] for message in mail.outbox] == ["is at 80%"]
    assert len(webhook.received) == 1
    assert alerts() == [(50, []), (80, ["email", "webhook"])]


def test_two_tasks_sending_one_alert_at_once_send_it_once(webhook, broker):
    """The normal path's task and the sweep's copy (or a task redelivered) running together: one claims it."""
    user = UserFactory(username="dave", email="dave@example.com")
    broker.down()
    (alert,) = budget_alerts_raise(crossings=[crossing(user, 50)], user_id=user.pk)
    broker.up()
    webhook.delay = 0.5
    barrier = threading.Barrier(2)

    def send() -> None:
        barrier.wait()
        budget_alert_webhook.delay(alert.pk)
        connection.close()

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(webhook.received) == 1
    assert alerts() == [(50, ["webhook"])]


def test_two_sweeps_at_once_deliver_once(webhook, broker):
    user = UserFactory(username="erin", email="erin@example.com")
    with time_machine.travel(T0, tick=False) as clock:
        broker.down()
        budget_alerts_raise(crossings=[crossing(user, 100)], user_id=user.pk)
        broker.up()
        clock.shift(GRACE + timedelta(seconds=1))
        webhook.delay = 0.5
        barrier = threading.Barrier(2)
        queued: list[int] = []

        def run() -> None:
            barrier.wait()
            queued.append(sweep())
            connection.close()

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sum(queued) == 2  # the email and the webhook, each queued by one of the two
    assert len(mail.outbox) == 1 and len(webhook.received) == 1
    assert alerts() == [(100, ["email", "webhook"])]


def test_a_delivery_whose_retries_ran_out_stays_visible_and_the_sweep_tries_it_again_a_few_times(webhook):
    user = UserFactory(username="frank", email="frank@example.com")
    with time_machine.travel(T0, tick=False) as clock:
        webhook.fail_next = 1000
        (alert,) = budget_alerts_raise(crossings=[crossing(user, 50)], user_id=user.pk)
        alert.refresh_from_db()
        assert alert.channels == ["email"]
        assert alert.delivery["webhook"]["state"] == "exhausted"
        assert alert.delivery["webhook"]["error"] == "WebhookDeliveryError: the alert webhook answered HTTP 500"

        clock.shift(timedelta(minutes=5))
        assert sweep() == 0  # left to rest a while: the webhook has just failed 9 times
        for _ in range(3):  # three more rounds, each with the task's retries
            clock.shift(timedelta(minutes=16))
            assert sweep() == 1
        clock.shift(timedelta(minutes=16))
        assert sweep() == 0
        alert.refresh_from_db()
        assert alert.channels == ["email"] and alert.delivery["webhook"]["state"] == "exhausted"
        assert alert.delivery["webhook"]["rounds"] == 3

    webhook.fail_next = 0
    with time_machine.travel(T0 + timedelta(hours=2), tick=False):
        alert.delivery = {"webhook": {**alert.delivery["webhook"], "rounds": 0}}  # as an admin would reset it
        alert.save(update_fields=["delivery"])
        assert sweep() == 1
    assert len(webhook.received) == 1 and alerts() == [(50, ["email", "webhook"])]


# An admin's "send again" ----------------------------------------------------------------------------------


def test_an_admin_sends_again_the_deliveries_whose_retries_ran_out_of_every_kind_of_alert(
    webhook, settings, admin_client
):
    """The webhook was down for hours: every alert's webhook delivery spent its task's retries (and, for the
    budget alert, the sweep's rounds too). Once it is back, an admin selects the alerts and sends them again:
    each undelivered delivery goes out once, the ones made are not repeated, and a second run finds nothing."""
    settings.ADMINS = [("Ops", "ops@example.com")]
    user = UserFactory(username="grace", email="grace@example.com")
    deployment = ModelFactory(name="gpt-4o-mini").deployments.get()
    rule = OpsAlertRule.objects.create(name="test error rate", kind=OpsAlertKind.ERROR_RATE)
    measure = Measure(Decimal(50), True, "error rate of model gpt-4o-mini is 50 %")
    webhook.fail_next = 1000
    with time_machine.travel(T0, tick=False):
        (alert,) = budget_alerts_raise(crossings=[crossing(user, 50)], user_id=user.pk)
        incident = incident_open(deployment_id=deployment.pk, reason="503 from upstream", at=T0)
        ops = ops_incident_open(rule=rule, subject="model:gpt-4o-mini", measure=measure, now=T0)
    alert.delivery = {"webhook": {**BudgetAlert.objects.get().delivery["webhook"], "rounds": 3}}
    alert.save(update_fields=["delivery"])
    for row in (alert, incident, ops):
        row.refresh_from_db()
        (state,) = [entry["state"] for mark, entry in row.delivery.items() if mark.endswith("webhook")]
        assert state == "exhausted"
    emails = len(mail.outbox)
    assert emails == 3 and webhook.received == []

    webhook.fail_next = 0
    pages = {
        "/admin/billing/budgetalert/": alert,
        "/admin/providers/incident/": incident,
        "/admin/billing/opsalertincident/": ops,
    }
    for page, row in pages.items():
        response = admin_client.post(page, {"action": "send_again", "_selected_action": [row.pk]}, follow=True)
        assert response.status_code == 200
        assert "Queued 1 undelivered delivery(ies) again." in response.content.decode(), page
    assert len(webhook.received) == 3 and len(mail.outbox) == emails  # the emails were made: not again
    alert.refresh_from_db()
    incident.refresh_from_db()
    ops.refresh_from_db()
    assert alert.channels == ["email", "webhook"] and alert.delivery == {}
    assert incident.delivered == ["down:email", "down:webhook"] and incident.delivery == {}
    assert ops.delivered == ["open:email", "open:webhook"] and ops.delivery == {}

    response = admin_client.post(
        "/admin/billing/budgetalert/", {"action": "send_again", "_selected_action": [alert.pk]}, follow=True
    )
    assert "Nothing to send again" in response.content.decode()
    assert len(webhook.received) == 3


# A broker that went silent -------------------------------------------------------------------------------

PUBLISH_ONCE = """
import django
django.setup()
from llmhub.celery import app
from billing.tasks import alerts_undelivered_send
from core.outbox import task_queue
app.conf.task_always_eager = False
app.conf.broker_url = __import__("os").environ["REDIS_URL"]
app._after_fork()
print("queued" if task_queue(alerts_undelivered_send, what="the probe") else "not queued", flush=True)
"""


def test_a_broker_that_accepts_connections_and_never_answers_fails_a_publish_instead_of_holding_it():
    """A Redis broker gone silent without closing its connections (a failover, a firewall dropping them, a
    paused server): with kombu's default of no socket timeout a publish waited forever, and an alert raised
    in the ledger's writer held it. The settings' broker options (the Redis branch, as production runs it)
    bound it: ``task_queue`` logs and returns, and the sweep queues the alert later. Run in a process of its
    own, since the settings are read at start-up."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []

    def hold() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "llmhub.settings.test",
        "PYTHONPATH": str(root),
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "CELERY_BROKER_SOCKET_TIMEOUT": "1",
    }
    try:
        done = subprocess.run(
            [sys.executable, "-c", PUBLISH_ONCE], env=env, cwd=root, capture_output=True, text=True, timeout=60
        )
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes ``hold`` from ``accept``: closing alone would not (Linux)
        listener.close()
        holder.join(timeout=10)
        for held in accepted:
            held.close()
    assert accepted, "the publisher never connected to the silent broker"
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "not queued"
    assert "could not be queued" in done.stderr and "the alert sweep will queue it again" in done.stderr


# A receiver that trickles its answer ----------------------------------------------------------------------


def test_a_webhook_that_trickles_its_answer_is_cut_at_the_deadline_and_retried_as_a_failure(settings):
    """The webhook's 10 s timeout was per step (connect, each write, each read): a receiver sending a byte now and
    then held a worker as long as it liked, and past the 5-minute claim the sweep sent a second copy. The whole
    delivery is now bounded by ``LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS``: past it the attempt is a failure,
    recorded and retried as any other, until the retries run out."""
    receiver = TricklingWebhook()
    settings.LLMHUB_ALERT_WEBHOOK_URL = receiver.url
    settings.LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS = 0.3
    user = UserFactory(username="hank", email="hank@example.com")
    try:
        (alert,) = budget_alerts_raise(crossings=[crossing(user, 50)], user_id=user.pk)
    finally:
        receiver.close()
    alert.refresh_from_db()
    assert alert.channels == ["email"]
    assert alert.delivery["webhook"]["state"] == "exhausted"
    assert alert.delivery["webhook"]["error"] == (
        "WebhookDeliveryError: the alert webhook did not answer within 0.3 s (LLMHUB_ALERT_WEBHOOK_DEADLINE_SECONDS)"
    )
    assert receiver.sessions == 1 + budget_alert_webhook.max_retries  # each attempt cut, then retried
    assert receiver.accepted == 0


# A mail server that trickles its answers --------------------------------------------------------------------


@pytest.fixture
def trickling_mail_server(settings):
    server = TricklingMailServer()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", server.port, 10
    yield server
    server.close()


def test_a_mail_server_that_trickles_its_answers_is_cut_at_the_deadline_and_retried_as_a_failure(
    trickling_mail_server, settings
):
    """An email's only bound was SMTP's per-step timeout (``EMAIL_TIMEOUT``, for each read): a mail server answering
    a byte now and then held the worker as long as it liked, past the delivery's claim, and the sweep sent a second
    copy. The whole delivery is now bounded by ``LLMHUB_ALERT_EMAIL_DEADLINE_SECONDS``: past it the session is cut,
    and the attempt is a failure, recorded and retried as any other, until the retries run out."""
    settings.LLMHUB_ALERT_EMAIL_DEADLINE_SECONDS = 0.3
    user = UserFactory(username="ivan", email="ivan@example.com")

    (alert,) = budget_alerts_raise(crossings=[crossing(user, 50)], user_id=user.pk)

    alert.refresh_from_db()
    assert alert.channels == []
    assert alert.delivery["email"]["state"] == "exhausted"
    assert alert.delivery["email"]["error"] == (
        "MailDeadlineExceeded: the mail server did not finish within 0.3 s (LLMHUB_ALERT_EMAIL_DEADLINE_SECONDS)"
    )
    assert trickling_mail_server.sessions == 1 + budget_alert_email.max_retries  # each attempt cut, then retried
    assert trickling_mail_server.accepted == 0


def test_a_mail_server_that_answers_slowly_within_the_deadline_gets_the_email_once(trickling_mail_server, settings):
    settings.LLMHUB_ALERT_EMAIL_DEADLINE_SECONDS = 60
    trickling_mail_server.pause = 0.005
    user = UserFactory(username="judy", email="judy@example.com")

    (alert,) = budget_alerts_raise(crossings=[crossing(user, 50)], user_id=user.pk)

    alert.refresh_from_db()
    assert alert.channels == ["email"] and "email" not in alert.delivery  # no webhook set: it has nobody to go to
    assert alert.delivery["webhook"]["state"] == "nobody"
    assert (trickling_mail_server.sessions, trickling_mail_server.accepted) == (1, 1)


def test_a_claim_outlives_the_longest_delivery_the_deadlines_allow(settings, broker):
    """A claim younger than its lease is a task still sending: the sweep leaves it. A deadline raised past the
    5-minute lease lengthens it, so that a delivery still within its deadline is not sent a second time."""
    settings.LLMHUB_ALERT_EMAIL_DEADLINE_SECONDS = 600
    user = UserFactory(username="kim", email="kim@example.com")
    with time_machine.travel(T0, tick=False) as clock:
        broker.down()
        (alert,) = budget_alerts_raise(crossings=[crossing(user, 50)], user_id=user.pk)
        broker.up()
        assert delivery_claim(BudgetAlert, alert.pk, "email", delivered_field="channels")  # a task sends, slowly

        clock.shift(timedelta(minutes=11))  # the deadline (10 minutes) is past, not the lease
        assert sweep() == 0 and mail.outbox == []

        clock.shift(timedelta(minutes=10))  # the sender died: its claim has run out
        assert sweep() == 1
    assert len(mail.outbox) == 1 and alerts() == [(50, ["email"])]
