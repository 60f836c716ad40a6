"""The audit log: append-only, each row chained to the one before it by a SHA-256 hash.

``AuditEvent.hash`` covers the row's own fields and ``prev_hash`` (the hash of the row before it), so
editing, deleting or reordering a row after the fact breaks the chain at that row, which
``manage.py auditverify`` reports. ``AuditChainHead`` is one row holding the newest hash: appends lock it,
so two processes never chain onto the same predecessor.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

GENESIS_HASH = "0" * 64


class ActorType(models.TextChoices):
    USER = "user", "User"
    KEY = "key", "Gateway key"
    SYSTEM = "system", "System"
    ANONYMOUS = "anonymous", "Anonymous"


class AuditEventQuerySet(models.QuerySet):
    def in_chain_order(self) -> AuditEventQuerySet:
        return self.order_by("seq")


class AuditEvent(models.Model):
    seq = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    actor_type = models.CharField(max_length=16, choices=ActorType.choices)
    actor_id = models.CharField(max_length=64, blank=True)
    actor_repr = models.CharField(max_length=200, blank=True)
    action = models.CharField(max_length=64, db_index=True, help_text="e.g. provider.change, key.rotate")
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    target_repr = models.CharField(max_length=200, blank=True)
    changes = models.JSONField(default=dict, blank=True, help_text="field: [old, new]; secrets masked")
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=300, blank=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-seq"]
        indexes = [
            models.Index(fields=["target_type", "target_id"]),
            # What the admin's search looks up, whole (audit.selectors.audit_search_q; the API's actor filter too):
            # without them, each search read the whole log (docs/ledger.md, "The admin at scale").
            models.Index(fields=["actor_repr"], name="audit_actor_repr_idx"),
            models.Index(fields=["actor_type", "actor_id"], name="audit_actor_idx"),
            models.Index(fields=["target_id"], name="audit_target_id_idx"),
            models.Index(fields=["target_repr"], name="audit_target_repr_idx"),
            models.Index(fields=["ip_address"], name="audit_ip_address_idx"),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} {self.target_type}:{self.target_id} by {self.actor_repr or self.actor_type}"

    def save(self, *args, **kwargs) -> None:
        if not self._state.adding:
            raise PermissionError("Audit events are append-only.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise PermissionError("Audit events are append-only.")


class AuditChainHead(models.Model):
    """One row (pk 1): the hash of the newest event. Locked by every append."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    last_hash = models.CharField(max_length=64, default=GENESIS_HASH)
    last_seq = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"audit chain head at #{self.last_seq}"
