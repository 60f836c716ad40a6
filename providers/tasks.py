"""Periodic provider chores. Tasks take primary keys, load rows and call services."""

from __future__ import annotations

import logging

from celery import Task, shared_task

from .models import Provider
from .services.encryption import provider_rotate_encryption
from .services.health import provider_health_check, providers_health_check
from .types import HealthResult

logger = logging.getLogger(__name__)


@shared_task
def providers_health_check_all() -> dict[str, bool]:
    """Check every enabled provider; one that cannot be checked is logged and does not stop the others."""
    providers: list[Provider] = []
    for provider_id in Provider.objects.filter(enabled=True).values_list("pk", flat=True):
        # One row at a time: a row that cannot be loaded (its key lost with an old encryption key) is
        # reported on its own instead of failing the query for every provider.
        try:
            providers.append(Provider.objects.get(pk=provider_id))
        except Exception:
            logger.exception("provider %s could not be loaded for its health check", provider_id)
    healthy: dict[str, bool] = {}
    for provider, outcome in zip(providers, providers_health_check(providers=providers), strict=True):
        if isinstance(outcome, HealthResult):
            healthy[provider.name] = outcome.ok
        else:
            logger.error("health check of provider %s could not run", provider.name, exc_info=outcome)
    return healthy


@shared_task(bind=True, max_retries=3, default_retry_delay=60)
def provider_health_check_task(self: Task, provider_id: int) -> bool | None:
    """Check one provider. An upstream failure is a result (stored on the row), not a reason to retry;
    anything else (a bug, a database hiccup) is retried."""
    provider = Provider.objects.filter(pk=provider_id).first()
    if provider is None:
        return None  # deleted since the task was queued
    try:
        return provider_health_check(provider=provider).ok
    except Exception as exc:
        raise self.retry(exc=exc) from exc


@shared_task
def providers_rotate_encryption_task() -> int:
    """Re-encrypt stored secrets under the newest key, so that old keys can be retired."""
    rewritten = provider_rotate_encryption()
    logger.info("re-encrypted %d stored secret(s) under the first FIELD_ENCRYPTION_KEYS key", rewritten)
    return rewritten
