"""Reading the audit log for staff: one filter set shared by the admin's export and ``/api/audit/``."""

from __future__ import annotations

import ipaddress
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
        events = events.filter(audit_actor_q(filters.actor))
    if filters.target_type:
        events = events.filter(target_type=filters.target_type)
    if filters.target_id:
        events = events.filter(target_id=filters.target_id)
    if filters.since is not None:
        events = events.filter(created_at__gte=filters.since)
    if filters.until is not None:
        events = events.filter(created_at__lt=filters.until)
    return events


def audit_actor_q(actor: str) -> Q:
    """Events by ``actor``: a username, a key prefix, "system" (``actor_repr``), or "<actor_type>:<actor_id>"."""
    actor_type, _, actor_id = actor.partition(":")
    by_id = Q(actor_type=actor_type, actor_id=actor_id) if actor_id else Q(pk__in=[])
    return Q(actor_repr=actor) | by_id


def audit_search_q(term: str) -> Q:
    """The admin's search: events whose actor (as ``audit_actor_q``), action, target id or name, or IP address is
    ``term``, whole. Each is the first column of an index of the log, so the search is a few index probes;
    ``LIKE '%term%'`` read every row (docs/ledger.md, "The admin at scale")."""
    found = audit_actor_q(term) | Q(action=term) | Q(target_id=term) | Q(target_repr=term)
    try:
        ipaddress.ip_address(term)
    except ValueError:
        return found
    return found | Q(ip_address=term)
