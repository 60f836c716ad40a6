"""Celery tasks of the chat app."""

from __future__ import annotations

from celery import shared_task

from .services import messages_close_abandoned
from .services_responses import stored_responses_expire


@shared_task
def messages_close_abandoned_task() -> int:
    """Every 5 minutes: replies a crashed server left ``streaming`` are marked cancelled."""
    return messages_close_abandoned()


@shared_task
def stored_responses_expire_task() -> int:
    """Hourly: stored responses of /v1/responses past LLMHUB_RESPONSES_RETENTION_DAYS, or deleted by their owner,
    are deleted once no live response continues them (they are a 404 from the moment they expire or are deleted)."""
    return stored_responses_expire()
