"""Celery tasks of the chat app."""

from __future__ import annotations

from celery import shared_task

from .services import messages_close_abandoned


@shared_task
def messages_close_abandoned_task() -> int:
    """Every 5 minutes: replies a crashed server left ``streaming`` are marked cancelled."""
    return messages_close_abandoned()
