"""``manage.py auditverify``: check the audit log's hash chain; exit 1 naming the first row that breaks it.

A row edited, deleted or moved after it was written breaks the chain there (``audit.services.audit_verify``).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from audit.models import AuditEvent
from audit.services import audit_verify


class Command(BaseCommand):
    help = "Check that no audit event was edited, removed or reordered after it was written."

    def handle(self, *args: Any, **options: Any) -> None:
        problem = audit_verify()
        if problem is not None:
            raise CommandError(f"audit chain broken at {problem}")
        count = AuditEvent.objects.count()
        self.stdout.write(f"{count} event{'s' if count != 1 else ''}, chain intact")
