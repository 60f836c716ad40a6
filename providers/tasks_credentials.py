"""Celery tasks for users' own provider keys (bring your own key)."""

from __future__ import annotations

import logging

from celery import shared_task

from .models import ByokMode, ProviderCredential
from .services.credentials import (
    ProviderKeyUncheckedError,
    provider_credential_invalid_notify,
    provider_credential_revalidate,
)

logger = logging.getLogger(__name__)

__all__ = ["provider_credentials_revalidate_all"]


@shared_task
def provider_credentials_revalidate_all() -> dict[str, int]:
    """Daily (``setupschedules``): re-check every stored user key of an enabled provider that takes users'
    keys, with the free model list. A key the provider now refuses is marked invalid and its owner is
    emailed, once when it turns invalid (not every day it stays so); a key refused before and accepted now
    is marked valid again. A provider that cannot be asked leaves its keys as they were. Returns counts."""
    counts = {"valid": 0, "invalid": 0, "turned_invalid": 0, "unchecked": 0}
    ids = (
        ProviderCredential.objects.filter(provider__enabled=True)
        .exclude(provider__byok=ByokMode.DISABLED)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    for credential_id in ids:
        try:
            credential = ProviderCredential.objects.select_related("provider", "owner").get(pk=credential_id)
        except ProviderCredential.DoesNotExist:  # deleted since the list was read
            continue
        except Exception:
            logger.exception("provider key %s could not be loaded for its daily check", credential_id)
            counts["unchecked"] += 1
            continue
        try:
            checked = provider_credential_revalidate(credential=credential)
        except ProviderKeyUncheckedError as exc:
            logger.warning("provider key %s (%s) not checked: %s", credential_id, credential.hint, exc.message)
            counts["unchecked"] += 1
            continue
        except Exception:
            logger.exception("provider key %s (%s) could not be checked", credential_id, credential.hint)
            counts["unchecked"] += 1
            continue
        counts["valid" if checked.valid else "invalid"] += 1
        if checked.turned_invalid:
            counts["turned_invalid"] += 1
            try:
                provider_credential_invalid_notify(credential=credential)
            except Exception:
                logger.exception("the owner of provider key %s could not be emailed", credential_id)
    return counts
