"""Celery tasks for users' own provider keys (bring your own key)."""

from __future__ import annotations

import contextlib
import logging
import smtplib
from typing import Any

from celery import Task, shared_task
from django.conf import settings

from audit.context import AuditOrigin, audit_origin
from core.outbox import delivery_failed

from .models import CredentialStatus, HostMoveNotice, ProviderCredential
from .services.credentials import (
    HOST_MOVE_EMAIL,
    host_move_id,
    host_move_notice_claim,
    host_move_notices_unsent,
    provider_credential_host_moved_notify,
    provider_credential_invalid_notify,
    provider_credentials_revalidate,
    provider_credentials_revalidate_due,
)

__all__ = [
    "KeyNoticesNotSentError",
    "provider_credential_host_moved_email",
    "provider_credential_invalid_email",
    "provider_credentials_host_moved_emails",
    "provider_credentials_revalidate_all",
    "provider_credentials_revalidate_selected",
]

logger = logging.getLogger(__name__)


class KeyNoticesNotSentError(Exception):
    """A run (the daily one, or an admin's check of selected keys) that could not email every due invalid-key
    notice, or queue the email of a key it found invalid (each is logged, and stays due for the next daily run);
    the keys were checked all the same."""


def _notices_not_sent_raise(notices_failed: list[int], counts: dict[str, int]) -> None:
    """End a run whose notices ``notices_failed`` (key ids) were not sent with ``KeyNoticesNotSentError``, naming
    the keys by id and what the run checked; nothing when every notice went."""
    if notices_failed:
        keys = ", ".join(str(pk) for pk in notices_failed)
        raise KeyNoticesNotSentError(
            f"invalid-key notices not emailed for provider keys {keys} (tried again next run); the keys were checked: "
            + ", ".join(f"{outcome} {count}" for outcome, count in counts.items())
        )


@shared_task
def provider_credentials_revalidate_all() -> dict[str, int]:
    """Daily (``setupschedules``): re-check the stored users' keys, ``LLMHUB_BYOK_REVALIDATION_CONCURRENCY`` at
    a time, starting none after ``LLMHUB_BYOK_REVALIDATION_MAX_SECONDS`` (``provider_credentials_revalidate_due``).
    Returns counts: valid, invalid, turned_invalid, unchecked, and left for the next run. A due invalid-key notice
    whose email fails, or a key turned invalid whose email the broker does not take, does not stop the others nor
    the checks; the run then ends with ``KeyNoticesNotSentError`` naming the keys, so that the operations dashboard
    shows the task failing."""
    notices_failed: list[int] = []
    counts = provider_credentials_revalidate_due(
        concurrency=settings.LLMHUB_BYOK_REVALIDATION_CONCURRENCY,
        max_seconds=settings.LLMHUB_BYOK_REVALIDATION_MAX_SECONDS,
        notices_failed=notices_failed,
    )
    _notices_not_sent_raise(notices_failed, counts)
    return counts


@shared_task
def provider_credentials_revalidate_selected(
    credential_ids: list[int], origin: dict[str, Any] | None = None
) -> dict[str, int]:
    """An admin's "check again" of the keys selected (``provider_credentials_revalidate``), too many to ask their
    providers within a web request; what it records (a key turned invalid) in the name of ``origin``, the admin who
    asked (``audit.context.AuditOrigin``'s fields). Returns counts, as the daily run; and, as it, a key turned
    invalid whose email the broker does not take stops no other check, and the run then ends with
    ``KeyNoticesNotSentError`` naming the keys (the next daily run sends their notices)."""
    notices_failed: list[int] = []
    with audit_origin(AuditOrigin(**origin)) if origin else contextlib.nullcontext():
        counts = provider_credentials_revalidate(
            credential_ids=credential_ids,
            concurrency=settings.LLMHUB_BYOK_REVALIDATION_CONCURRENCY,
            max_seconds=settings.LLMHUB_BYOK_REVALIDATION_MAX_SECONDS,
            notices_failed=notices_failed,
        )
    _notices_not_sent_raise(notices_failed, counts)
    return counts


@shared_task(bind=True, max_retries=8)
def provider_credential_host_moved_email(
    self: Task, credential_id: int, old_origin: str, new_origin: str, move: str = ""
) -> bool:
    """Tell a key's owner that its provider's move from ``old_origin`` to ``new_origin`` (``move``) paused it, once:
    claimed on the move's notice first, so that a copy of this task (the move's emails run again) sends nothing
    twice; retried while the mail server fails (10 s doubling up to 10 minutes). Nothing is sent for a key
    deleted, or no longer paused, since."""
    credential = ProviderCredential.objects.select_related("owner", "provider").filter(pk=credential_id).first()
    if credential is None or not credential.host_paused:
        return False
    move = host_move_id(move, old_origin, new_origin)
    notice_id = host_move_notice_claim(credential=credential, move=move)
    if notice_id is None:
        return False  # sent already, or being sent
    try:
        return provider_credential_host_moved_notify(
            credential=credential, old_origin=old_origin, new_origin=new_origin, notice_id=notice_id
        )
    except (smtplib.SMTPException, OSError) as exc:
        delivery_failed(self, HostMoveNotice, notice_id, HOST_MOVE_EMAIL, exc)
        raise self.retry(exc=exc, countdown=min(600, 10 * 2**self.request.retries)) from None


@shared_task(bind=True, max_retries=8)
def provider_credential_invalid_email(self: Task, credential_id: int) -> bool:
    """Tell a key's owner that the provider refused their key; retried while the mail server fails (10 s doubling
    up to 10 minutes, about half an hour in all), and past that the next daily run sends it (the key's
    ``invalid_notice_due`` stays set until an email is sent). Nothing is sent for a key deleted, replaced or valid
    again since, or whose notice went out meanwhile."""
    credential = (
        ProviderCredential.objects.select_related("owner", "provider")
        .filter(pk=credential_id, status=CredentialStatus.INVALID, invalid_notice_due=True)
        .first()
    )
    if credential is None:
        return False
    try:
        return provider_credential_invalid_notify(credential=credential)
    except (smtplib.SMTPException, OSError) as exc:
        raise self.retry(exc=exc, countdown=min(600, 10 * 2**self.request.retries)) from None


@shared_task(bind=True, max_retries=5)
def provider_credentials_host_moved_emails(
    self: Task, credential_ids: list[int], old_origin: str, new_origin: str, move: str = ""
) -> int:
    """A provider's move paused these keys: one email task each (``provider_credential_host_moved_email``) for
    those whose owner was not emailed about this move yet. A broker that refuses one of them has this task retried
    for it and those after it (10 s doubling, 5 times); a run again (a retry, or the same message delivered again)
    emails nobody twice. Returns how many were queued."""
    move = host_move_id(move, old_origin, new_origin)
    unsent = host_move_notices_unsent(credential_ids=credential_ids, move=move)
    for index, credential_id in enumerate(unsent):
        try:
            provider_credential_host_moved_email.delay(credential_id, old_origin, new_origin, move)
        except Exception as exc:  # kombu's OperationalError, or whatever else the publish met
            left = unsent[index:]
            logger.warning(
                "the emails of %d provider key(s) paused by a move could not be queued (%s: %s); tried again",
                len(left),
                type(exc).__name__,
                exc,
            )
            countdown = min(600, 10 * 2**self.request.retries)
            raise self.retry(args=(left, old_origin, new_origin, move), exc=exc, countdown=countdown) from None
    return len(unsent)
