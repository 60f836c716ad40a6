"""Celery tasks of billing. Each takes primary keys or nothing, loads what it needs and calls a service."""

from __future__ import annotations

import smtplib

from celery import shared_task
from django.conf import settings

from core.outbox import delivery_claim, delivery_failed

from .models import BudgetAlert, OpsAlertIncident, ScopeKind, UserPlan
from .services.alert_sweep import alerts_undelivered_requeue
from .services.alerts import WebhookDeliveryError, budget_alert_email_send, budget_alert_webhook_send
from .services.counters import budget_counters_reconcile, budget_scope_counters_reconcile, inflight_lost_settle
from .services.ledger import ledger_replay_spool
from .services.ops_alerts import (
    ops_alert_email_send,
    ops_alert_webhook_send,
    ops_alerts_evaluate,
    ops_incident_webhook_url,
)
from .services.retention import ledger_retention_apply
from .services.rollups import daily_usage_rebuild_recent


@shared_task
def usage_rollup(days: int = 2) -> int:
    """Every 10 minutes: today's and yesterday's ``DailyUsage`` from the ledger."""
    return daily_usage_rebuild_recent(days=days)


@shared_task
def ledger_retention() -> int:
    """Daily: raw ledger rows past LLMHUB_LEDGER_RETENTION_DAYS deleted, once their day is rolled up
    (``services/retention.py``); nothing while the setting is unset."""
    return ledger_retention_apply()


class LostRequestsNotSettledError(Exception):
    """A run that could not settle every lost request (each is logged, and tried again next run); the others were."""


class CountersNotReconciledError(Exception):
    """A reconcile run that could not put every budget counter back on the ledger's figure (each is logged, and
    tried again next run); the others were."""


class ReconcileNotCompleteError(LostRequestsNotSettledError, CountersNotReconciledError):
    """A reconcile run that could neither settle every lost request nor reconcile every counter: both at once."""


@shared_task
def budget_counters_put_back(
    *, key_id: int | None = None, user_id: int | None = None, plan_id: int | None = None
) -> int:
    """After a budget changed (``signals``): the counters of the key, of the user, or of the plan's users back on the
    ledger's figure."""
    if key_id is not None:
        return budget_scope_counters_reconcile(scope_kind=ScopeKind.KEY, scope_ids=[key_id])
    users = (
        [user_id] if user_id is not None else UserPlan.objects.filter(plan_id=plan_id).values_list("user_id", flat=True)
    )
    return budget_scope_counters_reconcile(scope_kind=ScopeKind.USER, scope_ids=list(users))


@shared_task
def reservations_reconcile() -> int:
    """Every 5 minutes: stale reservations released, budget counters put back on the ledger's figure. The lost
    requests are settled first, then each counter on its own; a request or a counter that could not be does not
    stop the others, and the run then ends failed naming them (``LostRequestsNotSettledError``,
    ``CountersNotReconciledError``, or ``ReconcileNotCompleteError`` for both), so that the operations dashboard
    shows the task failing."""
    failed: list[str] = []
    counters_failed: list[str] = []
    adjusted = budget_counters_reconcile(failed=failed, counters_failed=counters_failed)
    if not failed and not counters_failed:
        return adjusted
    parts = [f"lost requests not settled: {', '.join(failed)}"] if failed else []
    if counters_failed:
        parts.append(f"budget counters not reconciled: {', '.join(counters_failed)}")
    error = (
        ReconcileNotCompleteError
        if failed and counters_failed
        else LostRequestsNotSettledError
        if failed
        else CountersNotReconciledError
    )
    raise error(
        f"{'; '.join(parts)} (the others were, these are tried again next run); "
        f"{adjusted} counters put back on the ledger's figure"
    )


@shared_task
def reservations_lost_settle() -> int:
    """Every 30 seconds: requests whose server process died get their ``lost`` ledger row and release
    what they held, within a minute of the death. Each server sweeps too (LLMHUB_INFLIGHT_SWEEP_INTERVAL);
    this covers a deployment whose servers all died, and runs alongside them safely. A request that could not
    be settled does not stop the others; the run then ends with ``LostRequestsNotSettledError`` naming it, so
    that the operations dashboard shows the task failing (a server's own sweep only logs it)."""
    failed: list[str] = []
    settled = inflight_lost_settle(failed=failed)
    if failed:
        raise LostRequestsNotSettledError(
            f"lost requests not settled: {', '.join(failed)}; the others were, these are tried again next run"
        )
    return settled


@shared_task
def ledger_spool_replay() -> int:
    """Every minute: ledger rows a server spooled to disk while the database failed, written now.

    A server replays its spool itself, at start-up and as soon as the database answers again; this
    catches rows no live server watches: a process that died, or servers without lifespan (daphne).
    The spool is shared (docker-compose.yml mounts it in every app container), and concurrent replays
    each claim what they write (billing/services/spool.py)."""
    return ledger_replay_spool()


# The alerts' deliveries: each claims its delivery on the alert's row before sending (``core.outbox``), so a
# copy queued by the sweep (``alerts_undelivered_send``) sends nothing twice, and records a failure for the
# admin and the sweep before retrying.


@shared_task(bind=True, max_retries=5, default_retry_delay=60)
def budget_alert_email(self, alert_id: int) -> bool:
    alert = BudgetAlert.objects.select_related("user").filter(pk=alert_id).first()
    if alert is None or not delivery_claim(BudgetAlert, alert_id, "email", delivered_field="channels"):
        return False
    try:
        return budget_alert_email_send(alert=alert)
    except (smtplib.SMTPException, OSError) as exc:
        delivery_failed(self, BudgetAlert, alert_id, "email", exc)
        raise self.retry(exc=exc) from None


@shared_task(bind=True, max_retries=8)
def budget_alert_webhook(self, alert_id: int) -> bool:
    url = settings.LLMHUB_ALERT_WEBHOOK_URL
    alert = BudgetAlert.objects.select_related("user").filter(pk=alert_id).first()
    if not url or alert is None or not delivery_claim(BudgetAlert, alert_id, "webhook", delivered_field="channels"):
        return False
    try:
        budget_alert_webhook_send(alert=alert, url=url)
    except WebhookDeliveryError as exc:
        delivery_failed(self, BudgetAlert, alert_id, "webhook", exc)
        # 10 s, 20 s, 40 s … up to 10 minutes between attempts.
        raise self.retry(exc=exc, countdown=min(600, 10 * 2**self.request.retries)) from None
    return True


@shared_task
def alerts_undelivered_send() -> int:
    """Every minute: the deliveries of budget alerts and of both kinds of incident that no task made (the broker
    could not take it, a task was lost, its retries ran out) queued again, within the sweep's window
    (``services.alert_sweep``); returns how many. Concurrent runs are safe: each queues a delivery once."""
    return alerts_undelivered_requeue()


class OpsAlertRulesNotEvaluatedError(Exception):
    """An evaluation that could not evaluate every rule (each is logged); the others were."""


@shared_task
def ops_alerts_evaluate_task() -> int:
    """Every minute: the operations alerts' incidents opened and cleared (``services.ops_alerts``); returns how
    many changed. Concurrent runs are safe: each incident opens and clears once. A rule that could not be
    evaluated does not stop the others; the run then ends with ``OpsAlertRulesNotEvaluatedError``, so that the
    operations dashboard shows the task failing."""
    evaluation = ops_alerts_evaluate()
    if evaluation.failed:
        raise OpsAlertRulesNotEvaluatedError(f"rules not evaluated: {', '.join(evaluation.failed)}; the others were")
    return len(evaluation.opened) + len(evaluation.cleared)


@shared_task(bind=True, max_retries=5, default_retry_delay=60)
def ops_alert_email(self, incident_id: int, event: str) -> bool:
    mark = f"{event}:email"
    incident = OpsAlertIncident.objects.select_related("rule").filter(pk=incident_id).first()
    if incident is None or not delivery_claim(OpsAlertIncident, incident_id, mark, delivered_field="delivered"):
        return False
    try:
        return ops_alert_email_send(incident=incident, event=event)
    except (smtplib.SMTPException, OSError) as exc:
        delivery_failed(self, OpsAlertIncident, incident_id, mark, exc)
        raise self.retry(exc=exc) from None


@shared_task(bind=True, max_retries=8)
def ops_alert_webhook(self, incident_id: int, event: str) -> bool:
    mark = f"{event}:webhook"
    incident = OpsAlertIncident.objects.select_related("rule").filter(pk=incident_id).first()
    if (
        incident is None
        or not ops_incident_webhook_url(incident)
        or not delivery_claim(OpsAlertIncident, incident_id, mark, delivered_field="delivered")
    ):
        return False
    try:
        return ops_alert_webhook_send(incident=incident, event=event)
    except WebhookDeliveryError as exc:
        delivery_failed(self, OpsAlertIncident, incident_id, mark, exc)
        # 10 s, 20 s, 40 s … up to 10 minutes between attempts, as the budget alerts' webhook.
        raise self.retry(exc=exc, countdown=min(600, 10 * 2**self.request.retries)) from None
