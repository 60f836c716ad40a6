"""Admin for the encryption-key rotation: read-only progress per encrypted column (rows done of total,
started, finished, resumed runs, last error), and an action that queues a run, which resumes the columns
where the last one stopped. The rows are written by ``provider_rotate_encryption`` only."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import EncryptionRotation
from .services.encryption import encryption_key_id
from .tasks import providers_rotate_encryption_task


@admin.register(EncryptionRotation)
class EncryptionRotationAdmin(admin.ModelAdmin):
    list_display = ("column", "progress", "state", "runs", "started_at", "finished_at", "updated_at", "error")
    list_filter = (("finished_at", admin.EmptyFieldListFilter),)
    readonly_fields = (
        "column",
        "key_id",
        "last_pk",
        "rows_done",
        "rows_total",
        "rows_rewritten",
        "runs",
        "started_at",
        "finished_at",
        "updated_at",
        "last_error",
    )
    actions = ("run_now",)

    @admin.display(description="rows done")
    def progress(self, obj: EncryptionRotation) -> str:
        if not obj.rows_total:
            return f"{obj.rows_done} / 0"
        return f"{obj.rows_done} / {obj.rows_total} ({100 * obj.rows_done // obj.rows_total}%)"

    @admin.display(description="state")
    def state(self, obj: EncryptionRotation) -> str:
        if obj.key_id != encryption_key_id():
            # Its rows are under an earlier first key, which the next run moves them from: "finished" here
            # would tell the operator that key can be dropped.
            return "to do: FIELD_ENCRYPTION_KEYS has a new first key"
        if obj.finished_at is not None:
            return "finished"
        return "stopped" if obj.last_error else "in progress"

    @admin.display(description="last error")
    def error(self, obj: EncryptionRotation) -> str:
        return obj.last_error[:120]

    @admin.action(description="Run the rotation now (resumes every unfinished column)")
    def run_now(self, request: HttpRequest, queryset: QuerySet[EncryptionRotation]) -> None:
        providers_rotate_encryption_task.delay()
        self.message_user(request, "Queued a rotation run; refresh this page for its progress.", messages.SUCCESS)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: EncryptionRotation | None = None) -> bool:
        return False
