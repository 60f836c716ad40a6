"""An admin's hand on a deployment's circuit breaker: a lasting override kept on the row, felt at once."""

from __future__ import annotations

from functools import partial

from django.db import transaction

from ..models import BreakerOverride, Deployment
from ..routing.breaker_machine import CLOSED, OPEN
from ..routing.breakers import breaker_force, breaker_reset


def deployment_breaker_override_set(*, deployment: Deployment, override: str) -> None:
    """Keep ``override`` (``BreakerOverride``: forced open, forced closed, or none) on the deployment, and move
    its shared breaker the same way now: other processes read the override from their catalog snapshot only
    when it expires (``LLMHUB_LOOKUP_CACHE_TTL``), but hear of the breaker's change within milliseconds.
    Clearing the override also resets the breaker (closed, no failures, the base cooldown). The shared breaker
    moves once the saved override commits: a rolled-back one leaves it as it was."""
    deployment.breaker_override = BreakerOverride(override)
    deployment.save(update_fields=["breaker_override", "updated_at"])
    if override == BreakerOverride.OPEN:
        move = partial(breaker_force, deployment.pk, OPEN)
    elif override == BreakerOverride.CLOSED:
        move = partial(breaker_force, deployment.pk, CLOSED)
    else:
        move = partial(breaker_reset, deployment.pk)
    transaction.on_commit(move, robust=True)


def deployment_upstream_changed(*, deployment: Deployment, previous_upstream_id: str) -> bool:
    """Once ``deployment`` (saved) is committed under another upstream id than ``previous_upstream_id``, reset its
    breaker (closed, failures forgotten, the base cooldown) for every process: what it learnt was of the old id,
    often one the provider lacks (the health round opened it), and the corrected id should not wait out a cooldown
    of 503s. An admin's override stays as they set it. Every path that changes an upstream id calls this after
    saving (the deployment admin, the model admin's deployments, ``providers_load``); False when nothing is due."""
    if deployment.pk is None or deployment.upstream_id == previous_upstream_id or deployment.breaker_override:
        return False
    transaction.on_commit(partial(breaker_reset, deployment.pk), robust=True)
    return True
