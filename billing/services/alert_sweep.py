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

from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from core.outbox import Delivery, deliveries_queue, delivery_due, logger
from providers.models import Incident
from providers.services.incidents import incident_deliveries

from ..models import BudgetAlert, OpsAlertIncident
from .ops_alerts import OpsAlertEvent, ops_incident_webhook_url


def alerts_undelivered_requeue(*, now: datetime | None = None) -> int:
    """Queue again every delivery due (see the module); returns how many were queued. Stops at the first the
    broker refuses: it is down, and the next run (a minute later) tries again."""
    now = now or timezone.now()
    newest = now - timedelta(seconds=settings.LLMHUB_ALERT_SWEEP_GRACE_SECONDS)
    oldest = now - timedelta(hours=settings.LLMHUB_ALERT_SWEEP_MAX_AGE_HOURS)
    # A first look without the lock passes over what is not due (most of the window, most minutes).
    due = (
        delivery
        for delivery in _deliveries(oldest=oldest, newest=newest)
        if delivery_due(delivery.row, delivery.mark, delivered_field=delivery.delivered_field, now=now)
    )
    queued, _refused = deliveries_queue(due, now=now)
    if queued:
        logger.info("the alert sweep queued %d undelivered alert(s) again", queued)
    return queued


def _deliveries(*, oldest: datetime, newest: datetime) -> Iterator[Delivery]:
    """Every delivery each alert raised between ``oldest`` and ``newest`` calls for, made or not."""
    for alert in BudgetAlert.objects.filter(created_at__gte=oldest, created_at__lte=newest):
        yield from budget_alert_deliveries(alert)

    opened = Q(opened_at__gte=oldest, opened_at__lte=newest)
    cleared = Q(cleared_at__gte=oldest, cleared_at__lte=newest)
    for incident in OpsAlertIncident.objects.filter(opened | cleared).select_related("rule"):
        events = []
        if oldest <= incident.opened_at <= newest:
            events.append(OpsAlertEvent.OPEN)
        if incident.cleared_at is not None and oldest <= incident.cleared_at <= newest:
            events.append(OpsAlertEvent.CLEAR)
        yield from ops_incident_deliveries(incident, events)

    started = Q(started_at__gte=oldest, started_at__lte=newest)
    ended = Q(ended_at__gte=oldest, ended_at__lte=newest)
    incidents = Incident.objects.filter(started | ended).only("started_at", "ended_at", "delivered", "delivery")
    for incident in incidents:
        events = []
        if oldest <= incident.started_at <= newest:
            events.append("down")
        if incident.ended_at is not None and oldest <= incident.ended_at <= newest:
            events.append("recovered")
        yield from incident_deliveries(incident, events)


def budget_alert_deliveries(alert: BudgetAlert) -> Iterator[Delivery]:
    """The deliveries a budget alert calls for: its email, and the webhook when one is configured."""
    from ..tasks import budget_alert_email, budget_alert_webhook

    yield Delivery(alert, "email", "channels", budget_alert_email, (alert.pk,), f"budget alert {alert.pk}'s email")
    if settings.LLMHUB_ALERT_WEBHOOK_URL:
        what = f"budget alert {alert.pk}'s webhook"
        yield Delivery(alert, "webhook", "channels", budget_alert_webhook, (alert.pk,), what)


def ops_incident_deliveries(incident: OpsAlertIncident, events: Iterable[str]) -> Iterator[Delivery]:
    """The deliveries of an operations incident's ``events`` (open, clear): the email, and the rule's webhook."""
    from ..tasks import ops_alert_email, ops_alert_webhook

    for event in events:
        what = f"ops incident {incident.pk}'s {event}"
        args = (incident.pk, event)
        yield Delivery(incident, f"{event}:email", "delivered", ops_alert_email, args, f"{what} email")
        if ops_incident_webhook_url(incident):
            yield Delivery(incident, f"{event}:webhook", "delivered", ops_alert_webhook, args, f"{what} webhook")


def ops_incident_events(incident: OpsAlertIncident) -> list[str]:
    """What an operations incident has had to tell: its opening, and its clearing once it cleared."""
    return [OpsAlertEvent.OPEN] + ([OpsAlertEvent.CLEAR] if incident.cleared_at is not None else [])
