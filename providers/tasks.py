"""Periodic provider chores. Tasks take primary keys, load rows and call services."""

from __future__ import annotations

import logging
import smtplib

from celery import Task, shared_task
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from core.outbox import delivery_claim, delivery_failed
from core.time_limits import time_limit_reraise

from .models import Incident, Provider
from .services.encryption import provider_rotate_encryption
from .services.health import health_check_round, provider_health_check, provider_health_unchecked
from .services.incidents import WebhookDeliveryError, incident_alert_email_send, incident_alert_webhook_send
from .types import HealthResult

logger = logging.getLogger(__name__)


class ProvidersNotCheckedError(Exception):
    """A health-check run that could not check every provider (each is logged and shown on its row)."""


@shared_task
def providers_health_check_all() -> dict[str, bool]:
    """Every 5 minutes (``setupschedules``): check every enabled provider and the deployments it serves
    (``health_check_round``: breakers, incidents and their alerts follow), then drop old ``HealthCheck``
    rows. A provider that cannot be loaded or checked does not stop the others: it is logged, its row shows
    the failure (``provider_health_unchecked``), and the run ends with ``ProvidersNotCheckedError`` once
    the others are checked, so that the operations dashboard shows the task failing. Returns whether each
    provider answered."""
    providers: list[Provider] = []
    unchecked: list[str] = []
    for provider_id in Provider.objects.filter(enabled=True).values_list("pk", flat=True):
        # One row at a time: a row that cannot be loaded (its key lost with an old encryption key) is
        # reported on its own instead of failing the query for every provider.
        try:
            providers.append(Provider.objects.get(pk=provider_id))
        except Exception as exc:
            time_limit_reraise(exc)
            logger.exception("provider %s could not be loaded for its health check", provider_id)
            provider_health_unchecked(
                provider_id=provider_id, why=f"its row could not be loaded ({type(exc).__name__})"
            )
            unchecked.append(f"id {provider_id}")
    healthy: dict[str, bool] = {}
    for checked in health_check_round(providers=providers):
        if isinstance(checked.result, HealthResult):
            healthy[checked.provider.name] = checked.result.ok
        else:
            logger.error("health check of provider %s could not run", checked.provider.name, exc_info=checked.result)
            unchecked.append(checked.provider.name)
    if unchecked:
        raise ProvidersNotCheckedError(f"providers not checked: {', '.join(unchecked)}; the others were")
    return healthy


# Retries back off exponentially with full jitter (Celery's ``retry_backoff``): the n-th retry waits a random
# time up to factor × 2ⁿ seconds, at most ``retry_backoff_max``, so that the workers retrying after the same
# database or broker hiccup do not all come back in the same second.


@shared_task(
    bind=True,
    max_retries=3,
    default_retry_delay=60,  # only a run lost with its worker (CELERY_TASK_RETRY_ON_WORKER_LOST)
    autoretry_for=(Exception,),
    retry_backoff=15,
    retry_backoff_max=300,
    retry_jitter=True,
)
def provider_health_check_task(self: Task, provider_id: int) -> bool | None:
    """Check one provider. An upstream failure is a result (stored on the row), not a reason to retry;
    anything else (a bug, a database hiccup) is retried: up to 15 s, 30 s, 60 s later (jittered)."""
    provider = Provider.objects.filter(pk=provider_id).first()
    if provider is None:
        return None  # deleted since the task was queued
    return provider_health_check(provider=provider).ok


@shared_task(
    bind=True,
    max_retries=5,
    default_retry_delay=60,  # only a run lost with its worker (CELERY_TASK_RETRY_ON_WORKER_LOST)
    autoretry_for=(Exception,),
    dont_autoretry_for=(ImproperlyConfigured,),
    retry_backoff=60,
    retry_backoff_max=900,
    retry_jitter=True,
)
def providers_rotate_encryption_task(self: Task) -> int:
    """Re-encrypt stored secrets under the newest key, so that old keys can be retired. Batches commit as
    they go: a retry (up to 1, 2, 4, 8, 15 minutes later, jittered) or the next night's run resumes after the
    last one. A value no key decrypts is not retried: it needs a person (the key it was written under put back
    in FIELD_ENCRYPTION_KEYS)."""
    try:
        rewritten = provider_rotate_encryption()
    except ImproperlyConfigured:
        logger.exception("encryption-key rotation stopped at a value no key decrypts")
        raise
    logger.info("re-encrypted %d stored secret(s) under the first FIELD_ENCRYPTION_KEYS key", rewritten)
    return rewritten


def _incident(incident_id: int) -> Incident | None:
    # The provider's name is all an alert says of it: its secrets are not even decrypted.
    return (
        Incident.objects.select_related("deployment__model", "deployment__provider")
        .defer("deployment__provider__api_key", "deployment__provider__extra_headers")
        .filter(pk=incident_id)
        .first()
    )


@shared_task(bind=True, max_retries=8)
def incident_alert_email(self: Task, incident_id: int, event: str) -> bool:
    """Email an incident's alert (``event``: down or recovered) to the admins; retried while the mail server
    fails. Claimed first: a copy queued by the alert sweep sends nothing twice."""
    mark = f"{event}:email"
    incident = _incident(incident_id)
    if incident is None or not delivery_claim(Incident, incident_id, mark, delivered_field="delivered"):
        return False  # its deployment was deleted since, or it is sent (or being sent) already
    try:
        return incident_alert_email_send(incident=incident, event=event)
    except (smtplib.SMTPException, OSError) as exc:
        delivery_failed(self, Incident, incident_id, mark, exc)
        raise self.retry(exc=exc, countdown=min(600, 10 * 2**self.request.retries)) from None


@shared_task(bind=True, max_retries=8)
def incident_alert_webhook(self: Task, incident_id: int, event: str) -> bool:
    """POST an incident's alert to ``LLMHUB_ALERT_WEBHOOK_URL``; retried while it fails."""
    mark = f"{event}:webhook"
    url = settings.LLMHUB_ALERT_WEBHOOK_URL
    incident = _incident(incident_id)
    if not url or incident is None or not delivery_claim(Incident, incident_id, mark, delivered_field="delivered"):
        return False
    try:
        incident_alert_webhook_send(incident=incident, event=event, url=url)
    except WebhookDeliveryError as exc:
        delivery_failed(self, Incident, incident_id, mark, exc)
        # 10 s, 20 s, 40 s … up to 10 minutes between attempts.
        raise self.retry(exc=exc, countdown=min(600, 10 * 2**self.request.retries)) from None
    return True


# Users' own provider keys: the daily re-validation (``tasks_credentials``), registered with Celery here.
from .tasks_credentials import *  # noqa: E402,F403
