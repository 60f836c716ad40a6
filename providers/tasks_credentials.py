"""Celery tasks for users' own provider keys (bring your own key)."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from .services.credentials import provider_credentials_revalidate_due

__all__ = ["provider_credentials_revalidate_all"]


@shared_task
def provider_credentials_revalidate_all() -> dict[str, int]:
    """Daily (``setupschedules``): re-check the stored users' keys, ``LLMHUB_BYOK_REVALIDATION_CONCURRENCY`` at
    a time, starting none after ``LLMHUB_BYOK_REVALIDATION_MAX_SECONDS`` (``provider_credentials_revalidate_due``).
    Returns counts: valid, invalid, turned_invalid, unchecked, and left for the next run."""
    return provider_credentials_revalidate_due(
        concurrency=settings.LLMHUB_BYOK_REVALIDATION_CONCURRENCY,
        max_seconds=settings.LLMHUB_BYOK_REVALIDATION_MAX_SECONDS,
    )
