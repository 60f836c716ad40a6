"""The alert sweep: every alert's deliveries that no task made, queued again (docs/alerts.md, "Delivery").

An alert is a row committed before its delivery is queued (``budget_alerts_raise``, ``ops_incident_open`` /
``_clear``, ``providers.services.incidents``), and the row records the deliveries made. Whatever kept one
from being made (the broker could not take the task, a task was lost, its retries ran out while the mail
server or the webhook was down) leaves it recorded as not made, and this sweep, run every minute by
``billing.tasks.alerts_undelivered_send``, queues it again:

- only once the alert is ``LLMHUB_ALERT_SWEEP_GRACE_SECONDS`` old, so as not to race the normal path (whose
  task claims the delivery on the row when it runs: a task still waiting in the queue is sent a copy, which
  finds the delivery claimed or made and sends nothing);
- only while the alert is less than ``LLMHUB_ALERT_SWEEP_MAX_AGE_HOURS`` old: after a long outage an old
  backlog is not blasted out (it stays visible in the admin, not delivered);
- a delivery that failed is left to its task's retries for ``core.outbox.REQUEUE_AFTER`` and queued again at
  most ``core.outbox.SWEEP_ROUNDS`` times (``delivery_due``).

Of two sweeps at once, one queues each delivery: it is recorded queued under the row's lock first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from core.outbox import delivery_due, delivery_requeue, delivery_unqueue, logger, task_queue
from providers.models import Incident

from ..models import BudgetAlert, OpsAlertIncident
from .ops_alerts import OpsAlertEvent, ops_alert_webhook_url


@dataclass(frozen=True, slots=True)
class Due:
    """One delivery to queue again: the row, its mark, where it records deliveries, the task and its arguments."""

    row: models.Model
    mark: str
    delivered_field: str
    task: Any
    args: tuple[Any, ...]
    what: str


def alerts_undelivered_requeue(*, now: datetime | None = None) -> int:
    """Queue again every delivery due (see the module); returns how many were queued. Stops at the first the
    broker refuses: it is down, and the next run (a minute later) tries again."""
    now = now or timezone.now()
    newest = now - timedelta(seconds=settings.LLMHUB_ALERT_SWEEP_GRACE_SECONDS)
    oldest = now - timedelta(hours=settings.LLMHUB_ALERT_SWEEP_MAX_AGE_HOURS)
    queued = 0
    for due in _deliveries(oldest=oldest, newest=newest):
        if not delivery_due(due.row, due.mark, delivered_field=due.delivered_field, now=now):
            continue
        model = type(due.row)
        before = delivery_requeue(model, due.row.pk, due.mark, delivered_field=due.delivered_field, now=now)
        if before is None:
            continue  # another sweep queued it, or a task made it, since it was read
        if not task_queue(due.task, *due.args, what=due.what):
            delivery_unqueue(model, due.row.pk, due.mark, before=before, now=now)
            break
        queued += 1
    if queued:
        logger.info("the alert sweep queued %d undelivered alert(s) again", queued)
    return queued


def _deliveries(*, oldest: datetime, newest: datetime) -> Iterator[Due]:
    """Every delivery each alert raised between ``oldest`` and ``newest`` calls for, made or not."""
    from providers.tasks import incident_alert_email, incident_alert_webhook

    from ..tasks import budget_alert_email, budget_alert_webhook, ops_alert_email, ops_alert_webhook

    webhook = bool(settings.LLMHUB_ALERT_WEBHOOK_URL)

    for alert in BudgetAlert.objects.filter(created_at__gte=oldest, created_at__lte=newest):
        yield Due(alert, "email", "channels", budget_alert_email, (alert.pk,), f"budget alert {alert.pk}'s email")
        if webhook:
            what = f"budget alert {alert.pk}'s webhook"
            yield Due(alert, "webhook", "channels", budget_alert_webhook, (alert.pk,), what)

    opened = Q(opened_at__gte=oldest, opened_at__lte=newest)
    cleared = Q(cleared_at__gte=oldest, cleared_at__lte=newest)
    for incident in OpsAlertIncident.objects.filter(opened | cleared).select_related("rule"):
        events = []
        if oldest <= incident.opened_at <= newest:
            events.append(OpsAlertEvent.OPEN)
        if incident.cleared_at is not None and oldest <= incident.cleared_at <= newest:
            events.append(OpsAlertEvent.CLEAR)
        for event in events:
            what = f"ops incident {incident.pk}'s {event}"
            args = (incident.pk, event)
            yield Due(incident, f"{event}:email", "delivered", ops_alert_email, args, f"{what} email")
            if ops_alert_webhook_url(incident.rule):
                yield Due(incident, f"{event}:webhook", "delivered", ops_alert_webhook, args, f"{what} webhook")

    started = Q(started_at__gte=oldest, started_at__lte=newest)
    ended = Q(ended_at__gte=oldest, ended_at__lte=newest)
    incidents = Incident.objects.filter(started | ended).only("started_at", "ended_at", "delivered", "delivery")
    for incident in incidents:
        events = []
        if oldest <= incident.started_at <= newest:
            events.append("down")
        if incident.ended_at is not None and oldest <= incident.ended_at <= newest:
            events.append("recovered")
        for event in events:
            what = f"incident {incident.pk}'s {event}"
            args = (incident.pk, event)
            yield Due(incident, f"{event}:email", "delivered", incident_alert_email, args, f"{what} email")
            if webhook:
                yield Due(incident, f"{event}:webhook", "delivered", incident_alert_webhook, args, f"{what} webhook")
