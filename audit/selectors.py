"""Reading the audit log for staff: one filter set shared by the admin's export and ``/api/audit/``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Q

from .models import AuditEvent, AuditEventQuerySet


@dataclass(frozen=True, slots=True)
class AuditFilters:
    action: str = ""  # exact, or every action under a prefix ending in "." ("provider_key.")
    actor: str = ""  # a username, a key prefix, "system", or "<actor_type>:<actor_id>"
    target_type: str = ""
    target_id: str = ""
    since: datetime | None = None
    until: datetime | None = None


def audit_event_list(*, filters: AuditFilters | None = None) -> AuditEventQuerySet:
    """Newest first."""
    filters = filters or AuditFilters()
    events = AuditEvent.objects.order_by("-seq")
    if filters.action:
        if filters.action.endswith("."):
            events = events.filter(action__startswith=filters.action)
        else:
            events = events.filter(action=filters.action)
    if filters.actor:
        actor_type, _, actor_id = filters.actor.partition(":")
        by_id = Q(actor_type=actor_type, actor_id=actor_id) if actor_id else Q(pk__in=[])
        events = events.filter(Q(actor_repr=filters.actor) | by_id)
    if filters.target_type:
        events = events.filter(target_type=filters.target_type)
    if filters.target_id:
        events = events.filter(target_id=filters.target_id)
    if filters.since is not None:
        events = events.filter(created_at__gte=filters.since)
    if filters.until is not None:
        events = events.filter(created_at__lt=filters.until)
    return events
